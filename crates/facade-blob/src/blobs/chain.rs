//! The blob chain: where the bytes of one blob of a composed image are read from, in order.
//!
//! 1. the local content store (verified at write time);
//! 2. the cluster cache (Redis index over IPFS) and
//! 3. the blob's own origin from the composition index: an upstream layer. Both go through one
//!    single-flight fill per digest (see [`crate::blobs::fill`]): it asks the index once, streams from
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

use crate::blobs::fill::Fills;
use crate::blobs::read::{bytes_range_stream, file_range_stream};
use crate::cluster::{CacheName, ClusterMetrics, LookupResult};
use crate::error::{Error, Result};
use crate::images::{BlobEntry, BlobOrigin};
use crate::metrics::{ChainMetrics, Source};
use crate::store::{LocalStore, StoredBlob};

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

    /// Resolves a blob request against the store before anything is answered: a stored blob
    /// is opened now and held open until it is read (so neither this process nor another one
    /// sharing the store can evict it between this decision and the read), a remote content
    /// layer that is not stored is a redirect. A stored blob whose size disagrees with this
    /// workspace's descriptor fails this request only ([`Error::ClaimMismatch`]). A stored
    /// upstream layer is served only if the origin this workspace's image names has shown it
    /// holds the content (see `possession.rs`); otherwise the request fills from that origin.
    pub async fn prepare(&self, digest: &Digest, entry: &BlobEntry) -> Result<Prepared> {
        let mut stored = match &self.store {
            Some(store) => store.open_blob(digest, entry.size)?,
            None => None,
        };
        if let (Some(blob), BlobOrigin::Upstream(from)) = (&stored, &entry.origin)
            && !self.fills.origin_holds(from, digest, &blob.file, entry.size).await
        {
            stored = None;
        }
        match (&entry.origin, stored) {
            (BlobOrigin::Remote { url }, None) => Ok(Prepared::Redirect(url.clone())),
            (_, stored) => Ok(Prepared::Content(PreparedBlob { digest: digest.clone(), entry: entry.clone(), stored })),
        }
    }

    /// The bytes `[start, end_exclusive)` of blob `digest` (prepare and read in one step).
    pub async fn open(&self, digest: &Digest, entry: &BlobEntry, start: u64, end_exclusive: u64) -> Result<BlobStream> {
        match self.prepare(digest, entry).await? {
            Prepared::Content(blob) => self.read(blob, start, end_exclusive).await,
            Prepared::Redirect(_) => Err(Error::BlobNotInImage { digest: digest.clone() }),
        }
    }

    /// The bytes `[start, end_exclusive)` of a prepared blob. A blob that must be fetched is
    /// answered only once its source has answered, so the response's status can still say what
    /// the origin said (404, 401/403, 429) instead of a 200 that is cut.
    pub async fn read(&self, blob: PreparedBlob, start: u64, end_exclusive: u64) -> Result<BlobStream> {
        let (source, stream, fill) = self.open_source(blob, start, end_exclusive)?;
        if let Some(fill) = fill {
            fill.answered().await?;
        }
        Ok(Box::pin(self.chain_metrics.meter(source, end_exclusive.saturating_sub(start), stream)))
    }

    fn open_source(&self, blob: PreparedBlob, start: u64, end_exclusive: u64) -> Result<Opened> {
        let PreparedBlob { digest, entry, stored } = blob;
        if let Some(stored) = stored {
            tracing::trace!(%digest, "serving from the local store");
            if matches!(entry.origin, BlobOrigin::Upstream(_)) {
                self.metrics.lookup(CacheName::Local, LookupResult::Hit);
            }
            let guard: Box<dyn Send + Sync> = Box::new(stored.guard);
            return Ok((
                Source::Store,
                file_range_stream(Arc::new(stored.file), start, end_exclusive, entry.size, None, Some(guard)),
                None,
            ));
        }
        match &entry.origin {
            BlobOrigin::Bytes(b) => Ok((Source::Memory, bytes_range_stream(b.clone(), start, end_exclusive), None)),
            BlobOrigin::Upstream(from) => {
                if self.store.is_some() {
                    self.metrics.lookup(CacheName::Local, LookupResult::Miss);
                }
                let (fill, started) = self.fills.join(&digest, entry.size, &entry.media_type, from)?;
                tracing::debug!(%digest, started, start, "serving from an upstream fill");
                let (file, progress) = (fill.file(), fill.progress());
                let guard: Box<dyn Send + Sync> = Box::new(fill.clone());
                let stream = file_range_stream(file, start, end_exclusive, entry.size, Some(progress), Some(guard));
                Ok((Source::Fill, stream, Some(fill)))
            }
            BlobOrigin::Stored => Err(Error::io(
                format!("static layer {digest} is missing from the local store"),
                std::io::ErrorKind::NotFound.into(),
            )),
            BlobOrigin::Remote { .. } => Err(Error::BlobNotInImage { digest }),
        }
    }
}

/// An opened source: its stream, and the fill to wait on when it is one.
type Opened = (Source, BlobStream, Option<Arc<crate::blobs::fill::Fill>>);

/// What a blob request gets, decided before any byte is read.
#[derive(Debug)]
pub enum Prepared {
    /// Send the client to this URL (a remote content layer not held locally).
    Redirect(String),
    /// Serve the bytes.
    Content(PreparedBlob),
}

/// A blob about to be read; a stored one is already open.
#[derive(Debug)]
pub struct PreparedBlob {
    digest: Digest,
    entry: BlobEntry,
    stored: Option<StoredBlob>,
}

#[cfg(test)]
mod tests;
