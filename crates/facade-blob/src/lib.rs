//! Composed workspace images and their blobs.
//!
//! Four parts, each a folder:
//! - `images/`: resolving a workspace's spec and its images, composing and caching the result
//!   and the digest → source index blob requests look up ([`Images`]), static layers;
//! - `blobs/`: the chain of sources a blob request reads from ([`BlobChain`]), single-flight
//!   fills with resume and verification ([`Fills`]), spools and readers of growing files;
//! - `store/`: the bounded node-local content-addressed store ([`LocalStore`]);
//! - [`cluster`]: the cache shared by every node's facade (Redis index over IPFS content).
//!
//! It knows no HTTP: the server maps [`Error::kind`] to responses.

mod blobs;
pub mod blocking;
pub mod cluster;
mod error;
mod images;
mod metrics;
mod prefetch;
mod store;
mod sync;

pub use blobs::chain::{BlobChain, BlobStream, Prepared, PreparedBlob};
pub use blobs::fill::peer::{PEER_PATH, PeerConfig, PeerMetrics, PeerOutcome, PeerServe, Peers};
pub use blobs::fill::{ClusterBlobs, FillConfig, Fills, Origin, UpstreamBlob};
pub use blobs::read::{Progress, ResponseBuffers};
pub use cluster::{ClusterCache, ClusterConfig, ClusterMetrics};
pub use error::{Error, ErrorKind, Result};
pub use images::fetch::{FetchConfig, FetchedImage, ImageFetcher};
/// Static layers: `prepare` hashes and stores the configured files.
pub use images::static_layers;
pub use images::static_layers::{StaticLayer, StaticLayerSpec};
pub use images::{BlobEntry, BlobOrigin, ComposedImage, Images, ImagesConfig};
pub use metrics::{ChainMetrics, Source};
pub use prefetch::{
    JobKind, LayerProgress, LayerSource, LayerState, PrefetchConfig, PrefetchMetrics, Prefetcher, ProgressReport,
};
pub use store::{DISK_FULL_BACKOFF, Evicted, InUse, LocalStore, PassReason, StoreConfig, StoreMetrics, StoredBlob};
