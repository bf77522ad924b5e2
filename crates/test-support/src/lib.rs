//! Test support: starts the real parts tests talk to (CNCF distribution, skopeo, containerd,
//! Redis, IPFS) on loopback with free ports and temp dirs, builds images from local bytes, and
//! injects faults. Every process is killed on `Drop` and every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cargo_bin;
pub mod containerd;
pub mod cri;
pub mod fault_proxy;
pub mod hostile_registry;
pub mod image;
pub mod ipfs;
pub mod metrics;
pub mod proc;
pub mod redis;
pub mod redis_ha;
pub mod registry;
pub mod skopeo;
pub mod tinyproxy;
pub mod tls_registry;
pub mod token_server;
pub mod wait;
pub mod wire;
