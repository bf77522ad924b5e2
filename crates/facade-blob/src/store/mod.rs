//! The node-local content store: content-addressed files under `<root>/blobs/<alg>/<hex>`.
//!
//! Content enters only through [`TempBlob::commit`], which checks digest and size of what was
//! written and then renames the temp file into place, so a reader never sees a partial or wrong
//! blob, and a crash leaves at most a stray temp file (removed at the next start).
//!
//! The store is bounded: a size limit and an idle TTL, enforced by evicting the least recently
//! used blobs. "Used" is the file's mtime, touched when a blob is opened, so the order survives
//! restarts without an index file of its own (the size total is rebuilt by a scan at open).
//! Blobs being read or written hold an [`InUse`] guard and static layers are pinned: eviction
//! never removes either.

use std::collections::{HashMap, HashSet};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use facade_oci::Digest;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::error::{Error, Result};
use crate::sync::lock;

mod budget;
mod temp;
pub use budget::{DISK_FULL_BACKOFF, PassReason, Reservation, is_no_space};
pub use temp::TempBlob;

/// Bounds of the store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Most bytes of blobs kept, spools of fills under way included (`None`: unbounded).
    pub max_bytes: Option<u64>,
    /// The largest blob kept (`None`: as large as `max_bytes`); larger ones are streamed
    /// through to their readers without being stored.
    pub max_blob_bytes: Option<u64>,
    /// A fill nobody reads any more goes on this long, then stops unless it keeps its minimum
    /// rate (it fits the budget: it reserved its size).
    pub unread_grace: Duration,
    /// Blobs not used for this long are evicted (`None`: kept while there is room).
    pub ttl: Option<Duration>,
    /// A blob's use time is written at most this often (it costs a metadata write).
    pub touch_interval: Duration,
    /// How often the background task looks for expired blobs.
    pub gc_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: None,
            max_blob_bytes: None,
            unread_grace: Duration::from_secs(5),
            ttl: None,
            touch_interval: Duration::from_secs(60),
            gc_interval: Duration::from_secs(60),
        }
    }
}

/// The store's metrics.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    bytes: IntGauge,
    evictions: IntCounter,
    /// Bytes reserved by spools under way.
    reserved: IntGauge,
    /// The configured budget (0: unbounded).
    budget: IntGauge,
    /// Blobs streamed through instead of stored, by reason.
    passthrough: IntCounterVec,
    /// Fills stopped because nobody read them any more.
    abandoned: IntCounter,
}

impl StoreMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self> {
        let bytes = IntGauge::new("registry_facade_store_bytes", "Bytes of blobs in the node-local store")
            .map_err(|source| Error::Metrics { name: "registry_facade_store_bytes", source })?;
        let evictions =
            IntCounter::new("registry_facade_store_evictions_total", "Blobs evicted from the node-local store")
                .map_err(|source| Error::Metrics { name: "registry_facade_store_evictions_total", source })?;
        registry
            .register(Box::new(bytes.clone()))
            .map_err(|source| Error::Metrics { name: "registry_facade_store_bytes", source })?;
        registry
            .register(Box::new(evictions.clone()))
            .map_err(|source| Error::Metrics { name: "registry_facade_store_evictions_total", source })?;
        let reserved = IntGauge::new(
            "registry_facade_store_reserved_bytes",
            "Bytes of the store's budget reserved by downloads under way (their spools)",
        )
        .map_err(|source| Error::Metrics { name: "registry_facade_store_reserved_bytes", source })?;
        let budget = IntGauge::new(
            "registry_facade_store_budget_bytes",
            "The store's disk budget for blobs and spools (facade.storeMaxBytes; 0: unbounded)",
        )
        .map_err(|source| Error::Metrics { name: "registry_facade_store_budget_bytes", source })?;
        let passthrough = IntCounterVec::new(
            Opts::new(
                "registry_facade_blob_passthrough_total",
                "Blob reads streamed through from upstream without being stored (too_large, budget, enospc)",
            ),
            &["reason"],
        )
        .map_err(|source| Error::Metrics { name: "registry_facade_blob_passthrough_total", source })?;
        for r in PassReason::ALL {
            passthrough.with_label_values(&[r.label()]);
        }
        let abandoned = IntCounter::new(
            "registry_facade_fills_abandoned_total",
            "Downloads into the store stopped because nobody read them any more",
        )
        .map_err(|source| Error::Metrics { name: "registry_facade_fills_abandoned_total", source })?;
        for (name, c) in [
            (
                "registry_facade_store_reserved_bytes",
                Box::new(reserved.clone()) as Box<dyn prometheus::core::Collector>,
            ),
            ("registry_facade_store_budget_bytes", Box::new(budget.clone())),
            ("registry_facade_blob_passthrough_total", Box::new(passthrough.clone())),
            ("registry_facade_fills_abandoned_total", Box::new(abandoned.clone())),
        ] {
            registry.register(c).map_err(|source| Error::Metrics { name, source })?;
        }
        Ok(StoreMetrics { bytes, evictions, reserved, budget, passthrough, abandoned })
    }

    /// The pass-through counter's value for `reason`.
    pub fn passthrough_value(&self, reason: PassReason) -> u64 {
        self.passthrough.with_label_values(&[reason.label()]).get()
    }

    /// The abandoned-fills counter's value.
    pub fn abandoned_value(&self) -> u64 {
        self.abandoned.get()
    }

    /// The reserved-bytes gauge's value.
    pub fn reserved_value(&self) -> i64 {
        self.reserved.get()
    }

    /// The evictions counter's value.
    pub fn evictions_value(&self) -> u64 {
        self.evictions.get()
    }

    /// The size gauge's value.
    pub fn bytes_value(&self) -> i64 {
        self.bytes.get()
    }
}

/// What one eviction pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Blobs removed.
    pub blobs: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Blobs that would have gone but were in use or pinned.
    pub kept_in_use: u64,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    config: StoreConfig,
    total: AtomicU64,
    /// Readers and writers per digest. Eviction checks and removes under this lock, and guards
    /// are taken under it before a file is opened, so a blob cannot go between the two.
    in_use: Mutex<HashMap<Digest, usize>>,
    /// Digests this process pinned; each has a marker file under `pins/` (see [`LocalStore::pin`]).
    pinned: Mutex<HashSet<Digest>>,
    /// Names this process's pin markers, apart from those of another process on the same store.
    instance: String,
    metrics: std::sync::OnceLock<StoreMetrics>,
    wake: tokio::sync::Notify,
    /// Bytes reserved by spools under way (see `budget.rs`).
    reserved: AtomicU64,
    /// Set when the disk was found full: the next eviction pass removes every blob it may.
    evict_all: std::sync::atomic::AtomicBool,
    budget: budget::BudgetState,
}

/// A content-addressed store on local disk. Cheap to clone (shared state).
#[derive(Clone, Debug)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

/// Keeps one blob from being evicted while it is read or written.
#[derive(Debug)]
pub struct InUse {
    inner: Arc<Inner>,
    digest: Digest,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut m = lock(&self.inner.in_use);
        if let Some(n) = m.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.digest);
                drop(m);
                // A pass that had to keep this blob may now be able to make room.
                if self.inner.config.max_bytes.is_some_and(|max| self.inner.total.load(Ordering::SeqCst) > max) {
                    self.inner.wake.notify_one();
                }
            }
        }
    }
}

/// An open stored blob and the guard that keeps it from being evicted while it is read.
#[derive(Debug)]
pub struct StoredBlob {
    /// The file (read with `pread`).
    pub file: std::fs::File,
    /// Held as long as the blob is read.
    pub guard: InUse,
}

struct BlobFile {
    path: PathBuf,
    digest: Digest,
    size: u64,
    used: SystemTime,
}

/// Temp files untouched this long belong to no running fill (a fill writes continuously, and
/// one stalled this long has given up): a crashed process's leftovers.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// A pin marker not refreshed for this long belongs to a process that is gone. Owners refresh
/// theirs every GC interval (default 60 s).
pub const PIN_LEASE: Duration = Duration::from_secs(600);

/// Removes leftover temp files. Only stale ones: during a restart hand-over the new process
/// opens the store while the old one still fills into it (a regression seen in the restart
/// test: the old process's fills lost their files and its clients their pulls).
fn remove_stale_temp_files(tmp: &Path, max_age: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for e in entries.flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age >= max_age);
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl LocalStore {
    /// Opens (creating) an unbounded store at `root` and removes temp files a previous run left
    /// behind.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, StoreConfig::default())
    }

    /// Opens (creating) the store at `root` with bounds. Scans the blobs once to learn the size
    /// total.
    pub fn open_with(root: &Path, config: StoreConfig) -> Result<Self> {
        for dir in [root.join("blobs/sha256"), root.join("blobs/sha512"), root.join("tmp"), root.join("pins")] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        remove_stale_temp_files(&root.join("tmp"), STALE_TEMP_AGE);
        let store = LocalStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                config,
                total: AtomicU64::new(0),
                in_use: Mutex::new(HashMap::new()),
                pinned: Mutex::new(HashSet::new()),
                instance: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
                metrics: std::sync::OnceLock::new(),
                wake: tokio::sync::Notify::new(),
                reserved: AtomicU64::new(0),
                evict_all: std::sync::atomic::AtomicBool::new(false),
                budget: budget::BudgetState::default(),
            }),
        };
        let total = store.scan().iter().map(|b| b.size).sum();
        store.set_total(total);
        Ok(store)
    }

    /// Reports size and evictions into `metrics` from now on (the first call wins).
    pub fn set_metrics(&self, metrics: StoreMetrics) {
        metrics.bytes.set(i64::try_from(self.total_bytes()).unwrap_or(i64::MAX));
        metrics.reserved.set(i64::try_from(self.reserved_bytes()).unwrap_or(i64::MAX));
        metrics.budget.set(self.inner.config.max_bytes.map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX)));
        let _ = self.inner.metrics.set(metrics);
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The bounds.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Bytes of blobs held (as of the last scan plus commits and evictions since).
    pub fn total_bytes(&self) -> u64 {
        self.inner.total.load(Ordering::SeqCst)
    }

    fn set_total(&self, total: u64) {
        self.inner.total.store(total, Ordering::SeqCst);
        if let Some(m) = self.inner.metrics.get() {
            m.bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        }
    }

    fn add_total(&self, delta: u64) {
        let total = self.inner.total.fetch_add(delta, Ordering::SeqCst) + delta;
        if let Some(m) = self.inner.metrics.get() {
            m.bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        }
    }

    fn sub_total(&self, delta: u64) {
        let prev = self.inner.total.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| Some(t.saturating_sub(delta)));
        if let (Some(m), Ok(prev)) = (self.inner.metrics.get(), prev) {
            m.bytes.set(i64::try_from(prev.saturating_sub(delta)).unwrap_or(i64::MAX));
        }
    }

    /// Where a blob lives. Only verifiable digests have a place; their encoded part is validated
    /// hex, so no digest can name a path outside the store.
    pub fn path_of(&self, digest: &Digest) -> Option<PathBuf> {
        if !digest.is_verifiable() {
            return None;
        }
        Some(self.inner.root.join("blobs").join(digest.algorithm()).join(digest.encoded()))
    }

    /// A guard that keeps `digest` from being evicted until it is dropped (readers and writers
    /// of the blob hold one).
    pub fn in_use(&self, digest: &Digest) -> InUse {
        *lock(&self.inner.in_use).entry(digest.clone()).or_insert(0) += 1;
        InUse { inner: self.inner.clone(), digest: digest.clone() }
    }

    /// Whether a reader or writer holds `digest`.
    pub fn is_in_use(&self, digest: &Digest) -> bool {
        lock(&self.inner.in_use).contains_key(digest)
    }

    /// Never evicts `digest` (static file layers: the store is their only source), in this
    /// process or in another one sharing the store (the restart hand-over runs two): the pin is
    /// a marker file `pins/<alg>-<hex>.<instance>` that every process's eviction honours while
    /// its owner keeps it fresh ([`PIN_LEASE`]; refreshed by the GC task), so a crashed
    /// process's pins lapse on their own.
    pub fn pin(&self, digest: &Digest) -> Result<()> {
        if !digest.is_verifiable() {
            return Ok(());
        }
        lock(&self.inner.pinned).insert(digest.clone());
        let path = self.pin_marker(digest);
        std::fs::write(&path, b"").map_err(|e| Error::io(format!("writing pin {}", path.display()), e))
    }

    fn pin_marker(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("pins").join(format!(
            "{}-{}.{}",
            digest.algorithm(),
            digest.encoded(),
            self.inner.instance
        ))
    }

    /// Re-marks this process's pins as alive (and re-creates a marker someone removed).
    pub fn refresh_pins(&self) {
        let pinned: Vec<Digest> = lock(&self.inner.pinned).iter().cloned().collect();
        let now = SystemTime::now();
        for d in pinned {
            let path = self.pin_marker(&d);
            let fresh = std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(now));
            if fresh.is_err()
                && let Err(e) = std::fs::write(&path, b"")
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot refresh a static layer's pin");
            }
        }
    }

    /// Digests pinned by any live process (its marker refreshed within [`PIN_LEASE`]); markers
    /// of processes gone for longer are removed.
    fn pinned_by_anyone(&self) -> HashSet<Digest> {
        let mut out: HashSet<Digest> = lock(&self.inner.pinned).clone();
        let Ok(entries) = std::fs::read_dir(self.inner.root.join("pins")) else { return out };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((alg_hex, _instance)) = name.split_once('.') else { continue };
            let Some((alg, hex)) = alg_hex.split_once('-') else { continue };
            let Ok(digest) = Digest::parse(&format!("{alg}:{hex}")) else { continue };
            let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a > PIN_LEASE) {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            out.insert(digest);
        }
        out
    }

    /// Opens stored blob `digest` for a descriptor that says it has `size` bytes, marking it
    /// used. `Ok(None)`: not stored. A stored blob of another size stays: it entered the store
    /// verified, so the descriptor is what is wrong, and a manifest's claim must never remove
    /// what other workspaces rely on (README, "Security model"). Only that request fails.
    pub fn open_blob(&self, digest: &Digest, size: u64) -> Result<Option<StoredBlob>> {
        let Some(path) = self.path_of(digest) else { return Ok(None) };
        let guard = self.in_use(digest);
        let Ok(file) = std::fs::File::open(&path) else { return Ok(None) };
        let meta = file.metadata().map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?;
        if meta.len() != size {
            return Err(Error::ClaimMismatch { digest: digest.clone(), claimed: size, stored: meta.len() });
        }
        self.touch(&file, &meta);
        Ok(Some(StoredBlob { file, guard }))
    }

    /// Records a use in the file's mtime (at most once per touch interval).
    fn touch(&self, file: &std::fs::File, meta: &std::fs::Metadata) {
        let now = SystemTime::now();
        let stale = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_none_or(|age| age >= self.inner.config.touch_interval);
        if stale && let Err(e) = file.set_modified(now) {
            tracing::debug!(error = %e, "cannot record a blob's use time");
        }
    }

    /// Whether the store holds `digest`.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path_of(digest).is_some_and(|p| p.is_file())
    }

    /// A new temp file to write a blob into.
    pub fn temp_blob(&self, digest: &Digest) -> Result<TempBlob> {
        TempBlob::create(&self.inner.root.join("tmp"), digest)
    }

    /// Stores bytes already in memory (verified first).
    pub fn put_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut t = self.temp_blob(digest)?;
        t.write_all(bytes)?;
        t.commit(self, digest, bytes.len() as u64)
    }

    fn committed(&self, size: u64) {
        self.add_total(size);
        let used = self.total_bytes().saturating_add(self.reserved_bytes());
        if self.inner.config.max_bytes.is_some_and(|max| used > max) {
            self.inner.wake.notify_one();
        }
    }

    /// Every blob file with its size and last use.
    fn scan(&self) -> Vec<BlobFile> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            let Ok(entries) = std::fs::read_dir(self.inner.root.join("blobs").join(alg)) else { continue };
            for e in entries.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let Some(name) = e.file_name().to_str().map(str::to_string) else { continue };
                let Ok(digest) = Digest::parse(&format!("{alg}:{name}")) else { continue };
                out.push(BlobFile {
                    path: e.path(),
                    digest,
                    size: meta.len(),
                    used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        out
    }

    /// One eviction pass (blocking: it scans the store): removes blobs idle past the TTL, then
    /// least recently used ones until the total fits the limit less what spools under way have
    /// reserved (one budget for both). Blobs in use or pinned stay. After the disk was found
    /// full, every blob that may go goes.
    pub fn evict_now(&self) -> Evicted {
        let mut blobs = self.scan();
        let mut total: u64 = blobs.iter().map(|b| b.size).sum();
        self.set_total(total);
        let max = if self.inner.evict_all.swap(false, Ordering::SeqCst) {
            Some(0)
        } else {
            self.inner.config.max_bytes.map(|m| m.saturating_sub(self.reserved_bytes()))
        };
        let expired_before = self.inner.config.ttl.and_then(|ttl| SystemTime::now().checked_sub(ttl));
        blobs.sort_by_key(|b| b.used);
        let pinned = self.pinned_by_anyone();
        let mut out = Evicted::default();
        for b in blobs {
            let expired = expired_before.is_some_and(|t| b.used < t);
            let over = max.is_some_and(|m| total > m);
            if !expired && !over {
                // Sorted by last use: nothing after this one is expired either.
                break;
            }
            let in_use = lock(&self.inner.in_use);
            if pinned.contains(&b.digest) || in_use.contains_key(&b.digest) {
                out.kept_in_use += 1;
                continue;
            }
            match std::fs::remove_file(&b.path) {
                Ok(()) => {
                    drop(in_use);
                    total = total.saturating_sub(b.size);
                    self.sub_total(b.size);
                    out.blobs += 1;
                    out.bytes += b.size;
                    if let Some(m) = self.inner.metrics.get() {
                        m.evictions.inc();
                    }
                    tracing::debug!(digest = %b.digest, size = b.size, expired, "evicted blob from the local store");
                }
                Err(e) => tracing::warn!(path = %b.path.display(), error = %e, "cannot evict a blob"),
            }
        }
        if out.blobs > 0 {
            tracing::info!(
                blobs = out.blobs,
                bytes = out.bytes,
                total_bytes = total,
                "evicted blobs from the local store"
            );
        }
        if max.is_some_and(|m| total > m) {
            tracing::warn!(
                total_bytes = total,
                max_bytes = max,
                in_use = out.kept_in_use,
                "the local store is over its limit and every remaining blob is in use or pinned"
            );
        }
        out
    }

    /// Runs eviction in the background until `shutdown`: every GC interval (for the TTL) and
    /// whenever a commit took the store over its limit. It also keeps this process's pins
    /// fresh, which matters even to an unbounded store: another process on it may evict.
    pub fn spawn_gc(&self, shutdown: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let bounded = store.inner.config.max_bytes.is_some() || store.inner.config.ttl.is_some();
            let evict_all = |s: &LocalStore| s.inner.evict_all.load(Ordering::SeqCst);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = store.inner.wake.notified() => {}
                    _ = tokio::time::sleep(store.inner.config.gc_interval) => {}
                }
                let s = store.clone();
                let pass = move || {
                    s.refresh_pins();
                    if bounded || evict_all(&s) {
                        s.evict_now();
                    }
                    s.retry_pending_static();
                };
                if let Err(e) = crate::blocking::spawn(crate::blocking::Lane::Housekeeping, pass).await {
                    tracing::warn!(error = %e, "store eviction task failed");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_verified_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        store.put_bytes(&d, b"hello").unwrap();
        assert!(store.contains(&d));
        assert!(store.open_blob(&d, 5).unwrap().is_some());
        assert_eq!(store.total_bytes(), 5);

        let wrong = Digest::sha256_of(b"other");
        let mut t = store.temp_blob(&wrong).unwrap();
        t.write_all(b"hello").unwrap();
        let tmp_path = t.path().to_path_buf();
        assert!(matches!(t.commit(&store, &wrong, 5), Err(Error::DigestMismatch { .. })));
        assert!(!store.contains(&wrong));
        assert!(!tmp_path.exists(), "temp file left behind");
    }

    #[test]
    fn short_content_is_rejected_and_dropped_temp_files_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        let mut t = store.temp_blob(&d).unwrap();
        t.write_all(b"hel").unwrap();
        assert!(t.commit(&store, &d, 5).is_err());
        let t = store.temp_blob(&d).unwrap();
        let p = t.path().to_path_buf();
        drop(t);
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_wrong_size_claim_fails_that_request_and_keeps_the_verified_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        store.put_bytes(&d, b"hello").unwrap();
        store.pin(&d).unwrap();
        assert!(matches!(store.open_blob(&d, 6), Err(Error::ClaimMismatch { claimed: 6, stored: 5, .. })));
        assert!(store.contains(&d), "a manifest's claim removed a verified blob");
        assert_eq!(store.total_bytes(), 5);
        let blob = store.open_blob(&d, 5).unwrap().unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut &blob.file, &mut got).unwrap();
        assert_eq!(got, "hello");
    }

    #[test]
    fn unverifiable_digests_have_no_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert!(store.path_of(&Digest::parse("md5x:abc").unwrap()).is_none());
    }

    fn bounded(dir: &Path, max_bytes: Option<u64>, ttl: Option<Duration>) -> LocalStore {
        LocalStore::open_with(dir, StoreConfig { max_bytes, ttl, ..StoreConfig::default() }).unwrap()
    }

    /// Stores `n` bytes of content `seed` and marks it used `age` ago.
    fn put_aged(store: &LocalStore, seed: u8, n: usize, age: Duration) -> Digest {
        let bytes = vec![seed; n];
        let d = Digest::sha256_of(&bytes);
        store.put_bytes(&d, &bytes).unwrap();
        let f = std::fs::File::options().write(true).open(store.path_of(&d).unwrap()).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        d
    }

    #[test]
    fn evicts_least_recently_used_blobs_until_the_store_fits() {
        let dir = tempfile::tempdir().unwrap();
        let store = bounded(dir.path(), Some(300), None);
        let hour = Duration::from_secs(3600);
        let oldest = put_aged(&store, 1, 100, 4 * hour);
        let old = put_aged(&store, 2, 100, 3 * hour);
        let newer = put_aged(&store, 3, 100, 2 * hour);
        let newest = put_aged(&store, 4, 100, hour);
        assert_eq!(store.total_bytes(), 400);
        let out = store.evict_now();
        assert_eq!((out.blobs, out.bytes), (1, 100));
        assert!(!store.contains(&oldest));
        for d in [&old, &newer, &newest] {
            assert!(store.contains(d));
        }
        assert_eq!(store.total_bytes(), 300);
        // Reading a blob makes it the most recently used: the next victim is `newer`.
        drop(store.open_blob(&old, 100).unwrap().unwrap());
        put_aged(&store, 5, 100, Duration::ZERO);
        store.evict_now();
        assert!(store.contains(&old) && !store.contains(&newer) && store.contains(&newest));
    }

    #[test]
    fn never_evicts_blobs_in_use_or_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = bounded(dir.path(), Some(100), None);
        let hour = Duration::from_secs(3600);
        let read = put_aged(&store, 1, 100, 5 * hour);
        let written = put_aged(&store, 2, 100, 4 * hour);
        let pinned = put_aged(&store, 3, 100, 3 * hour);
        let free = put_aged(&store, 4, 100, 2 * hour);
        let reader = store.open_blob(&read, 100).unwrap().unwrap();
        // Re-age it: the open touched it, and this test is about the guard, not recency.
        reader.file.set_modified(SystemTime::now() - 5 * hour).ok();
        let writer = store.in_use(&written);
        store.pin(&pinned).unwrap();
        let out = store.evict_now();
        assert_eq!((out.blobs, out.kept_in_use), (1, 3), "{out:?}");
        assert!(store.contains(&read) && store.contains(&written) && store.contains(&pinned) && !store.contains(&free));
        // The guards gone, the next pass gets the store under its limit (the pin stays).
        drop((reader, writer));
        store.evict_now();
        assert!(!store.contains(&read) && !store.contains(&written) && store.contains(&pinned));
        assert_eq!(store.total_bytes(), 100);
    }

    #[test]
    fn pins_hold_against_another_process_on_the_same_store_until_their_lease_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        // The old process of a restart hand-over pinned its static layer...
        let old_process = bounded(dir.path(), None, None);
        let layer = put_aged(&old_process, 1, 100, 5 * hour);
        old_process.pin(&layer).unwrap();
        // ...and the new one, with a tight bound and no pins of its own, evicts.
        let new_process = bounded(dir.path(), Some(100), None);
        let other = put_aged(&new_process, 2, 100, hour);
        let out = new_process.evict_now();
        assert!(new_process.contains(&layer), "another process evicted a pinned static layer");
        assert!(!new_process.contains(&other));
        assert_eq!(out.kept_in_use, 1);
        // A pin whose owner stopped refreshing it (a crashed process) lapses.
        let marker = std::fs::read_dir(dir.path().join("pins")).unwrap().next().unwrap().unwrap().path();
        let f = std::fs::File::options().write(true).open(&marker).unwrap();
        f.set_modified(SystemTime::now() - PIN_LEASE - Duration::from_secs(1)).unwrap();
        drop(old_process);
        let newest = put_aged(&new_process, 3, 100, Duration::ZERO);
        new_process.evict_now();
        assert!(!new_process.contains(&layer) && new_process.contains(&newest));
        assert!(!marker.exists(), "a lapsed pin marker was left behind");
    }

    #[test]
    fn refreshing_pins_recreates_a_removed_marker() {
        let dir = tempfile::tempdir().unwrap();
        let store = bounded(dir.path(), None, None);
        let d = put_aged(&store, 1, 10, Duration::ZERO);
        store.pin(&d).unwrap();
        let marker = std::fs::read_dir(dir.path().join("pins")).unwrap().next().unwrap().unwrap().path();
        std::fs::remove_file(&marker).unwrap();
        store.refresh_pins();
        assert!(marker.exists());
    }

    #[test]
    fn evicts_blobs_idle_past_the_ttl_even_when_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = bounded(dir.path(), None, Some(Duration::from_secs(3600)));
        let stale = put_aged(&store, 1, 10, Duration::from_secs(7200));
        let fresh = put_aged(&store, 2, 10, Duration::from_secs(60));
        assert_eq!(store.evict_now().blobs, 1);
        assert!(!store.contains(&stale) && store.contains(&fresh));
    }

    #[test]
    fn size_total_and_use_order_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let (a, b) = {
            let store = bounded(dir.path(), None, None);
            (put_aged(&store, 1, 100, 2 * hour), put_aged(&store, 2, 50, hour))
        };
        let store = bounded(dir.path(), Some(100), None);
        assert_eq!(store.total_bytes(), 150, "the total is rebuilt by a scan at open");
        store.evict_now();
        assert!(!store.contains(&a) && store.contains(&b), "the older blob goes first after a restart too");
    }

    #[test]
    fn metrics_follow_size_and_evictions() {
        let dir = tempfile::tempdir().unwrap();
        let store = bounded(dir.path(), Some(100), None);
        let registry = Registry::new();
        let m = StoreMetrics::register(&registry).unwrap();
        store.set_metrics(m.clone());
        put_aged(&store, 1, 100, Duration::from_secs(60));
        put_aged(&store, 2, 100, Duration::ZERO);
        assert_eq!(m.bytes_value(), 200);
        store.evict_now();
        assert_eq!((m.bytes_value(), m.evictions_value()), (100, 1));
    }

    #[tokio::test]
    async fn a_commit_over_the_limit_wakes_the_background_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_with(
            dir.path(),
            StoreConfig { max_bytes: Some(150), gc_interval: Duration::from_secs(3600), ..StoreConfig::default() },
        )
        .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let gc = store.spawn_gc(stop.clone());
        let first = put_aged(&store, 1, 100, Duration::from_secs(60));
        let second = put_aged(&store, 2, 100, Duration::ZERO);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.contains(&first) {
            assert!(tokio::time::Instant::now() < deadline, "no eviction after the limit was passed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(store.contains(&second));
        stop.cancel();
        gc.await.unwrap();
    }

    #[test]
    fn stale_temp_files_are_removed_on_open_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        LocalStore::open(dir.path()).unwrap();
        let old = dir.path().join("tmp/leftover");
        std::fs::write(&old, b"x").unwrap();
        let f = std::fs::File::options().write(true).open(&old).unwrap();
        f.set_modified(std::time::SystemTime::now() - STALE_TEMP_AGE - std::time::Duration::from_secs(1)).unwrap();
        // A fill of another facade process sharing the store (a restart hand-over) is writing.
        let live = dir.path().join("tmp/in-flight");
        std::fs::write(&live, b"y").unwrap();
        LocalStore::open(dir.path()).unwrap();
        assert!(!old.exists());
        assert!(live.exists(), "another process's in-flight fill was deleted");
    }
}
