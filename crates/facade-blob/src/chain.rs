//! The blob chain: where the bytes of one blob of a composed image are read from, in order.
//!
//! 1. the local content store (verified at write time);
//! 2. the cluster cache (Redis index over IPFS) and
//! 3. the blob's own origin from the composition index: an upstream layer. Both go through one
//!    single-flight fill per digest (see [`crate::fill`]): it asks the index once, streams from
//!    IPFS when another node has the blob, goes on from upstream at the same offset when IPFS
//!    fails, verifies the digest before a reader gets the last byte, back-fills the local store
//!    from the same bytes, and adds blobs that came from upstream to IPFS afterwards;
//! 4. bytes held in memory (synthesized config, direct content layers), or a static file kept
//!    in the store.
//!
//! Remote content layers are not opened here: clients are redirected to their URL.

use std::sync::Arc;

use bytes::Bytes;
use facade_oci::Digest;
use futures::stream::BoxStream;

use crate::cluster::{CacheName, ClusterMetrics, LookupResult};
use crate::error::{Error, Result};
use crate::fill::Fills;
use crate::images::{BlobEntry, BlobOrigin};
use crate::metrics::{ChainMetrics, Source};
use crate::read::{bytes_range_stream, file_range_stream};
use crate::store::LocalStore;

/// A body stream of blob bytes.
pub type BlobStream = BoxStream<'static, std::io::Result<Bytes>>;

/// Reads blobs from their sources.
pub struct BlobChain {
    store: Option<LocalStore>,
    fills: Arc<Fills>,
    metrics: ClusterMetrics,
    chain_metrics: ChainMetrics,
}

impl BlobChain {
    /// A chain over `store` (if any) and upstream fills.
    pub fn new(store: Option<LocalStore>, fills: Arc<Fills>) -> Self {
        Self::with_metrics(store, fills, ClusterMetrics::unregistered())
    }

    /// A chain that counts local-store lookups into `metrics` (the fills count the cluster's).
    pub fn with_metrics(store: Option<LocalStore>, fills: Arc<Fills>, metrics: ClusterMetrics) -> Self {
        BlobChain { store, fills, metrics, chain_metrics: ChainMetrics::unregistered() }
    }

    /// Counts reads, first bytes and fills into `metrics` (shared with the fills).
    pub fn with_chain_metrics(mut self, metrics: ChainMetrics) -> Self {
        self.fills.set_chain_metrics(metrics.clone());
        self.chain_metrics = metrics;
        self
    }

    /// The local store, if configured.
    pub fn store(&self) -> Option<&LocalStore> {
        self.store.as_ref()
    }

    /// The URL to redirect a client to, for remote content layers not held locally.
    pub fn redirect_for(&self, digest: &Digest, entry: &BlobEntry) -> Option<String> {
        match &entry.origin {
            BlobOrigin::Remote { url } if !self.store.as_ref().is_some_and(|s| s.contains(digest)) => Some(url.clone()),
            _ => None,
        }
    }

    /// The bytes `[start, end_exclusive)` of blob `digest`.
    pub async fn open(&self, digest: &Digest, entry: &BlobEntry, start: u64, end_exclusive: u64) -> Result<BlobStream> {
        let (source, stream) = self.open_source(digest, entry, start, end_exclusive)?;
        Ok(Box::pin(self.chain_metrics.meter(source, end_exclusive.saturating_sub(start), stream)))
    }

    fn open_source(
        &self,
        digest: &Digest,
        entry: &BlobEntry,
        start: u64,
        end_exclusive: u64,
    ) -> Result<(Source, BlobStream)> {
        if let Some(store) = &self.store
            && let Some(blob) = store.open_blob(digest, entry.size)
        {
            tracing::trace!(%digest, "serving from the local store");
            if matches!(entry.origin, BlobOrigin::Upstream(_)) {
                self.metrics.lookup(CacheName::Local, LookupResult::Hit);
            }
            let guard: Box<dyn Send + Sync> = Box::new(blob.guard);
            return Ok((
                Source::Store,
                file_range_stream(Arc::new(blob.file), start, end_exclusive, entry.size, None, Some(guard)),
            ));
        }
        match &entry.origin {
            BlobOrigin::Bytes(b) => Ok((Source::Memory, bytes_range_stream(b.clone(), start, end_exclusive))),
            BlobOrigin::Upstream(from) => {
                if self.store.is_some() {
                    self.metrics.lookup(CacheName::Local, LookupResult::Miss);
                }
                let (fill, started) = self.fills.join(digest, entry.size, &entry.media_type, from)?;
                tracing::debug!(%digest, started, start, "serving from an upstream fill");
                let file = fill.file();
                let progress = fill.progress();
                Ok((
                    Source::Fill,
                    file_range_stream(file, start, end_exclusive, entry.size, Some(progress), Some(Box::new(fill))),
                ))
            }
            BlobOrigin::Stored => Err(Error::io(
                format!("static layer {digest} is missing from the local store"),
                std::io::ErrorKind::NotFound.into(),
            )),
            BlobOrigin::Remote { .. } => Err(Error::BlobNotInImage { digest: digest.clone() }),
        }
    }
}
