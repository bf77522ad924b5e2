//! Composed workspace images and their blobs.
//!
//! Owns image resolution and caching ([`images`], [`fetch`]), static layers, the blob source
//! chain ([`chain`]), single-flight upstream fills with resume ([`fill`]), the bounded local
//! content-addressed store ([`store`]), and the cluster cache shared by every node's facade
//! ([`cluster`]: Redis index over IPFS content). It knows no HTTP: the server maps
//! [`Error::kind`] to responses.

pub mod chain;
pub mod cluster;
pub mod error;
pub mod fetch;
pub mod fill;
pub mod images;
pub mod metrics;
pub mod read;
pub mod static_layers;
pub mod store;

pub use chain::{BlobChain, BlobStream};
pub use cluster::{ClusterCache, ClusterConfig, ClusterMetrics};
pub use error::{Error, ErrorKind, Result};
pub use fetch::{FetchConfig, ImageFetcher};
pub use fill::{FillConfig, Fills, UpstreamBlob};
pub use images::{BlobEntry, BlobOrigin, ComposedImage, Images, ImagesConfig};
pub use metrics::{ChainMetrics, Source};
pub use static_layers::{StaticLayer, StaticLayerSpec};
pub use store::{LocalStore, StoreConfig, StoreMetrics};
