//! Workspace image specs: what a workspace image is made of.
//!
//! Owns the [`ImageSpec`] model, the [`SpecProvider`] trait, the providers (`fixed`: a JSON file;
//! `remote`: gRPC spec servers speaking `registryfacade.SpecProvider`), the spec cache, the
//! mapping of gRPC status codes to [`Error`] ([`Error::from_status`], the only one), the spec
//! provider metrics, and a small spec server over the `fixed` file format for development and
//! tests. It knows nothing of HTTP or blobs.

pub mod cache;
pub mod error;
pub mod fixed;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod proto;
pub mod provider;
pub mod server;

pub use cache::{CacheConfig, CachedSpecProvider};
pub use error::{Error, Result};
pub use fixed::FixedSpecProvider;
pub use grpc::{ClientTls, GrpcConfig, GrpcEndpoint, GrpcSpecProvider};
pub use metrics::SpecMetrics;
pub use model::{ContentLayer, ImageSpec, RemoteContentLayer};
pub use provider::{Providers, SpecProvider};
pub use server::{ServerTls, SpecServer};
