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
//! A blob the store does not keep (larger than `facade.maxBlobBytes`, no room in the disk
//! budget, a full disk) is streamed through from its origin to each reader instead of filled
//! (see [`crate::blobs::passthrough`]); the readers of a fill that hits a full disk go on the
//! same way from where they are.
//!
//! Remote content layers are not opened here: clients are redirected to their URL.

use std::sync::Arc;

use bytes::Bytes;
use facade_oci::Digest;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::blobs::fill::{Fill, Fills, UpstreamBlob};
use crate::blobs::read::{bytes_range_stream, file_range_stream};
use crate::cluster::{CacheName, ClusterMetrics, LookupResult};
use crate::error::{Error, Result};
use crate::images::{BlobEntry, BlobOrigin};
use crate::metrics::{ChainMetrics, Source};
use crate::store::{LocalStore, PassReason, StoredBlob};

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

    /// The fills behind this chain (the peer listener serves other nodes from them).
    pub fn fills(&self) -> &Arc<Fills> {
        &self.fills
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
        let (source, stream) = match self.open_source(blob, start, end_exclusive)? {
            Opened::Ready(source, stream) => (source, stream),
            Opened::Fill(stream, fill) => {
                fill.answered().await?;
                (Source::Fill, stream)
            }
            Opened::PassThrough { digest, size, from, reason } => {
                tracing::debug!(%digest, size, %reason, "streaming a blob through without storing it");
                if let Some(store) = &self.store {
                    store.passed_through(reason);
                }
                let stream = self.fills.pass_through(&digest, size, &from, (start, end_exclusive), None).await?;
                (Source::Fill, stream)
            }
        };
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
            return Ok(Opened::Ready(
                Source::Store,
                file_range_stream(Arc::new(stored.file), start, end_exclusive, entry.size, None, Some(guard)),
            ));
        }
        match &entry.origin {
            BlobOrigin::Bytes(b) => {
                Ok(Opened::Ready(Source::Memory, bytes_range_stream(b.clone(), start, end_exclusive)))
            }
            BlobOrigin::Upstream(from) => {
                if self.store.is_some() {
                    self.metrics.lookup(CacheName::Local, LookupResult::Miss);
                }
                let (fill, started) = match self.fills.join(&digest, entry.size, &entry.media_type, from) {
                    Ok(joined) => joined,
                    Err(Error::NoRoom { reason, .. }) => {
                        return Ok(Opened::PassThrough { digest, size: entry.size, from: from.clone(), reason });
                    }
                    Err(e) => return Err(e),
                };
                tracing::debug!(%digest, started, start, "serving from an upstream fill");
                let stream = follow_fill(self.fills.clone(), self.store.clone(), fill.clone(), (start, end_exclusive));
                Ok(Opened::Fill(stream, fill))
            }
            // A static layer the store could not take at startup (a full disk): unavailable
            // until the store's background task has written it.
            BlobOrigin::Stored if self.store.as_ref().is_some_and(|s| s.is_pending_static(&digest)) => {
                if let Some(store) = &self.store {
                    store.retry_static_soon();
                }
                Err(Error::NoRoom { digest, reason: PassReason::NoSpace })
            }
            BlobOrigin::Stored => Err(Error::io(
                format!("static layer {digest} is missing from the local store"),
                std::io::ErrorKind::NotFound.into(),
            )),
            BlobOrigin::Remote { .. } => Err(Error::BlobNotInImage { digest }),
        }
    }
}

/// An opened source.
enum Opened {
    /// Bytes ready to stream.
    Ready(Source, BlobStream),
    /// A fill's stream, once the fill's source has answered.
    Fill(BlobStream, Arc<Fill>),
    /// Not stored: streamed through from the origin.
    PassThrough { digest: Digest, size: u64, from: UpstreamBlob, reason: PassReason },
}

/// A reader of a fill: the fill's file as it grows; if the fill ends because the disk filled
/// up, the rest from the origin, at the offset this reader reached (see [`Fill::fallback`]).
fn follow_fill(fills: Arc<Fills>, store: Option<LocalStore>, fill: Arc<Fill>, (start, end): (u64, u64)) -> BlobStream {
    let size = fill.size;
    let guard: Box<dyn Send + Sync> = Box::new(fill.clone());
    let file = file_range_stream(fill.file(), start, end, size, Some(fill.following()), Some(guard));
    let state = Follow { fills, store, fill, pos: start, end, inner: file, switched: false };
    Box::pin(futures::stream::try_unfold(state, |mut st| async move {
        loop {
            match st.inner.next().await {
                Some(Ok(b)) => {
                    st.pos += b.len() as u64;
                    return Ok(Some((b, st)));
                }
                None => return Ok(None),
                Some(Err(e)) => {
                    let Some(fallback) = st.fill.fallback().filter(|_| !st.switched).cloned() else { return Err(e) };
                    st.switched = true;
                    let resume = Resume { fills: st.fills.clone(), store: st.store.clone(), fill: st.fill.clone() };
                    st.inner = resume.go_on(&fallback, st.pos, st.end).await.map_err(std::io::Error::other)?;
                }
            }
        }
    }))
}

/// The state of one [`follow_fill`] reader.
struct Follow {
    fills: Arc<Fills>,
    store: Option<LocalStore>,
    fill: Arc<Fill>,
    /// The next byte this reader gets.
    pos: u64,
    end: u64,
    inner: BlobStream,
    /// Already going on from the origin (the fallback is taken once).
    switched: bool,
}

/// What a [`Follow`] reader needs to go on from the origin (apart from its stream, which is
/// not `Sync`).
struct Resume {
    fills: Arc<Fills>,
    store: Option<LocalStore>,
    fill: Arc<Fill>,
}

impl Resume {
    /// The rest of this reader's range after its fill hit a full disk: what the spool file
    /// holds (readable through the descriptor the fill keeps open), then the origin from the
    /// spool's end, hashed on from the spool's hash state. Without that state, the origin from
    /// byte 0, skipping what this reader already has.
    async fn go_on(&self, fallback: &crate::blobs::fill::Fallback, pos: u64, end: u64) -> Result<BlobStream> {
        if let Some(store) = &self.store {
            store.passed_through(PassReason::NoSpace);
        }
        let (digest, size, from) = (&self.fill.digest, self.fill.size, self.fill.origin());
        let Some(prefix) = fallback.prefix.as_ref().filter(|p| p.len >= pos) else {
            return self.fills.pass_through(digest, size, from, (pos, end), None).await;
        };
        tracing::debug!(%digest, offset = pos, spooled = prefix.len, "going on from the origin after a full disk");
        if prefix.len == size {
            // Every byte is in the spool: only its hash is left to check.
            let actual = prefix.hasher.clone().finish();
            if actual != *digest {
                return Err(Error::DigestMismatch { expected: digest.clone(), actual, size });
            }
            return Ok(file_range_stream(self.fill.file(), pos, end, size, None, None));
        }
        let spooled = prefix.len.min(end);
        let head = file_range_stream(self.fill.file(), pos, spooled, size, None, None);
        if spooled >= end {
            return Ok(head);
        }
        let tail = self.fills.pass_through(digest, size, from, (prefix.len, end), Some(fallback)).await?;
        Ok(Box::pin(head.chain(tail)))
    }
}

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
