//! One disk budget for everything the facade writes under the store: stored blobs, and the
//! spools of fills under way (README, "Configuration", `facade.storeMaxBytes`).
//!
//! A fill reserves its blob's declared size when its spool is created and releases it when the
//! spool goes (committed or dropped): a manifest that claims 2 GiB can only start a fill that the
//! budget has room for, and a download can never take more than it reserved (the fill fails a
//! source that sends more than the declared size). What the budget refuses is streamed through
//! to its readers without being stored (`blobs/passthrough.rs`). A full disk (ENOSPC, EDQUOT)
//! refuses every reservation for a while and evicts every blob that is not in use or pinned:
//! the node needs the space more than our cache does.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use facade_oci::Digest;

use super::{Inner, LocalStore};
use crate::sync::lock;

/// After the disk was found full, new reservations are refused this long (their blobs are
/// streamed through), so a full disk is not hit again by every cold pull.
pub const DISK_FULL_BACKOFF: Duration = Duration::from_secs(30);

/// Why a blob is streamed through instead of stored; the label of
/// `registry_facade_blob_passthrough_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// Larger than one blob may be (`facade.maxBlobBytes`) or than the whole budget.
    TooLarge,
    /// The budget's room is reserved by fills under way.
    Budget,
    /// The disk was full (ENOSPC or EDQUOT) a short while ago, or became full during the fill.
    NoSpace,
}

impl PassReason {
    /// Every reason, for metric initialisation.
    pub const ALL: [PassReason; 3] = [PassReason::TooLarge, PassReason::Budget, PassReason::NoSpace];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            PassReason::TooLarge => "too_large",
            PassReason::Budget => "budget",
            PassReason::NoSpace => "enospc",
        }
    }
}

impl std::fmt::Display for PassReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PassReason::TooLarge => "larger than a blob the store keeps",
            PassReason::Budget => "the store's disk budget is taken by downloads under way",
            PassReason::NoSpace => "the disk is full",
        })
    }
}

/// Whether an I/O failure means the disk (or the process's quota) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Room for one blob's spool in the disk budget, released on drop.
#[derive(Debug)]
pub struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Reservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let prev = self.inner.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
        if let Some(m) = self.inner.metrics.get() {
            m.reserved.set(i64::try_from(prev.saturating_sub(self.bytes)).unwrap_or(i64::MAX));
        }
    }
}

/// The budget's moving parts, kept in the store's shared state.
#[derive(Debug, Default)]
pub(super) struct BudgetState {
    /// When the disk was last found full.
    pub(super) full_at: Mutex<Option<Instant>>,
    /// Static file layers that could not be written (path, digest): retried by the GC task.
    pub(super) pending_static: Mutex<Vec<(PathBuf, Digest)>>,
}

impl LocalStore {
    /// The largest blob the store keeps: `facade.maxBlobBytes`, and never more than the budget.
    pub fn max_blob_bytes(&self) -> Option<u64> {
        let c = &self.inner.config;
        match (c.max_blob_bytes, c.max_bytes) {
            (Some(b), Some(m)) => Some(b.min(m)),
            (b, m) => b.or(m),
        }
    }

    /// Reserves room for a spool of `size` bytes, or says why there is none. Over the budget
    /// with evictable blobs in the store, the background eviction is woken to make room.
    pub fn reserve(&self, size: u64) -> std::result::Result<Reservation, PassReason> {
        if self.max_blob_bytes().is_some_and(|max| size > max) {
            return Err(PassReason::TooLarge);
        }
        if self.disk_full() {
            return Err(PassReason::NoSpace);
        }
        let max = self.inner.config.max_bytes;
        let reserved = self.inner.reserved.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
            let after = r.checked_add(size)?;
            max.is_none_or(|m| after <= m).then_some(after)
        });
        let Ok(before) = reserved else { return Err(PassReason::Budget) };
        let after = before + size;
        if let Some(m) = self.inner.metrics.get() {
            m.reserved.set(i64::try_from(after).unwrap_or(i64::MAX));
        }
        if max.is_some_and(|m| self.total_bytes().saturating_add(after) > m) {
            self.inner.wake.notify_one();
        }
        Ok(Reservation { inner: self.inner.clone(), bytes: size })
    }

    /// Bytes reserved by spools under way.
    pub fn reserved_bytes(&self) -> u64 {
        self.inner.reserved.load(Ordering::SeqCst)
    }

    /// The disk was found full: refuse reservations for [`DISK_FULL_BACKOFF`] and evict every
    /// blob that is not in use or pinned.
    pub fn no_space(&self) {
        *lock(&self.inner.budget.full_at) = Some(Instant::now());
        self.inner.evict_all.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        tracing::warn!(
            root = %self.inner.root.display(),
            "the disk of the local store is full: evicting what is not in use, streaming blobs through for {:?}",
            DISK_FULL_BACKOFF
        );
    }

    /// Whether the disk was found full less than [`DISK_FULL_BACKOFF`] ago.
    pub fn disk_full(&self) -> bool {
        lock(&self.inner.budget.full_at).is_some_and(|t| t.elapsed() < DISK_FULL_BACKOFF)
    }

    /// Counts a blob streamed through instead of stored.
    pub fn passed_through(&self, reason: PassReason) {
        if let Some(m) = self.inner.metrics.get() {
            m.passthrough.with_label_values(&[reason.label()]).inc();
        }
    }

    /// Counts a fill stopped because nobody read it any more.
    pub fn fill_abandoned(&self) {
        if let Some(m) = self.inner.metrics.get() {
            m.abandoned.inc();
        }
    }

    /// Remembers a static file layer that could not be written, to be retried by the GC task
    /// (and sooner, when a request for it wakes the task: [`LocalStore::retry_static_soon`]).
    pub fn add_pending_static(&self, path: PathBuf, digest: Digest) {
        let mut pending = lock(&self.inner.budget.pending_static);
        if !pending.iter().any(|(_, d)| *d == digest) {
            pending.push((path, digest));
        }
    }

    /// Whether `digest` is a static layer still waiting to be written.
    pub fn is_pending_static(&self, digest: &Digest) -> bool {
        lock(&self.inner.budget.pending_static).iter().any(|(_, d)| d == digest)
    }

    /// Wakes the GC task to retry writing pending static layers now.
    pub fn retry_static_soon(&self) {
        if !lock(&self.inner.budget.pending_static).is_empty() {
            self.inner.wake.notify_one();
        }
    }

    /// Tries once more to write each pending static layer (blocking: reads and hashes files).
    /// A file whose content no longer hashes to the digest it was composed with stays pending:
    /// serving other bytes under that digest is never an option.
    pub fn retry_pending_static(&self) {
        let pending: Vec<(PathBuf, Digest)> = lock(&self.inner.budget.pending_static).clone();
        for (path, digest) in pending {
            let written = std::fs::read(&path).map_err(|e| format!("cannot read: {e}")).and_then(|bytes| {
                if Digest::sha256_of(&bytes) != digest {
                    return Err(format!("the file changed since it was hashed as {digest}"));
                }
                self.pin(&digest).map_err(|e| e.to_string())?;
                self.put_bytes(&digest, &bytes).map_err(|e| e.to_string())
            });
            match written {
                Ok(()) => {
                    lock(&self.inner.budget.pending_static).retain(|(_, d)| *d != digest);
                    tracing::info!(path = %path.display(), %digest, "static layer written to the local store");
                }
                Err(reason) => {
                    tracing::debug!(path = %path.display(), %digest, %reason, "static layer still cannot be written")
                }
            }
        }
    }
}
