//! Single-flight fills: one download per digest, spooled to a temp file that every concurrent
//! reader follows, verified before it is committed to the local store.
//!
//! This is the fix for the reference facade's N downloads for N pods starting with the same IDE
//! layer: the first request starts a fill, later ones join it and read what is already on disk,
//! then follow the rest. A fill reads top-down: [`Fills::join`] → `drive` → `run` → (cluster
//! → origin) into a [`Spool`] → verify → commit.
//!
//! - **Origin** ([`Origin`], the upstream registry): a broken body is resumed from the byte
//!   offset with a Range request (only a 206 starting at that offset is accepted), with
//!   exponential backoff and jitter, inside a budget of resumes and of attempts without progress.
//! - **Cluster** ([`ClusterBlobs`]): a blob another node already has is streamed from IPFS into
//!   the same spool (resumed with `cat` offsets); if IPFS breaks the fill goes on from the
//!   origin at the offset reached — the digest is checked over the whole spool before anything
//!   is committed or a reader gets the last byte. A blob that came from the origin is added to
//!   IPFS afterwards, from the verified spool, in the background.
//! - **Limits**: no byte from a source for `idle_timeout` counts as a broken body; a fill
//!   that runs past `deadline` fails. Without a store, a fill nobody reads stops at once; with
//!   one, after the store's `unread_grace`, unless it keeps the minimum rate.
//! - **Disk budget** (`store/budget.rs`): a fill reserves its blob's size when its spool is
//!   created; when the budget refuses, [`Fills::join`] fails with [`Error::NoRoom`] and the
//!   chain streams the blob through instead (`passthrough.rs`). A full disk while spooling ends
//!   the fill with a [`Fallback`]: its readers go on from the origin at their offset.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use bytes::Bytes;
use facade_oci::{Digest, RepoName};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::watch;

use crate::blobs::passthrough::{HashedPrefix, PassConfig, PassThrough};
use crate::blobs::possession::Vouched;
use crate::blobs::read::{Following, Progress};
use crate::blobs::spool::Spool;
use crate::blobs::tail::{TAIL_BYTES, Tail};
use crate::cluster::{BackfillOutcome, BackfillStore, ClusterCache, ClusterMetrics, IndexEntry};
use crate::error::{Error, Result};
use crate::metrics::{ChainMetrics, RetryReason};
use crate::store::{InUse, LocalStore, PassReason, is_no_space};
use crate::sync::lock;

/// Knobs of fills.
#[derive(Clone, Debug)]
pub struct FillConfig {
    /// Where fills spool when there is no local store.
    pub spool_dir: PathBuf,
    /// First retry delay.
    pub retry_min_delay: Duration,
    /// Longest retry delay.
    pub retry_max_delay: Duration,
    /// Attempts without progress before the fill gives up.
    pub max_attempts_without_progress: usize,
    /// Resumes after bodies that broke having brought less than 1 MiB: a source that flaps
    /// without getting anywhere. (A body that brings more before it breaks costs a resume
    /// without counting: a 256 MiB layer behind a link that drops every few MiB still
    /// completes.)
    pub max_resumes: usize,
    /// Resumes of an IPFS stream before the fill goes on from upstream.
    pub max_cluster_resumes: usize,
    /// No byte from a source for this long: the body is treated as broken (and resumed). A
    /// backstop behind the upstream client's own read timeout.
    pub idle_timeout: Duration,
    /// A fill still running after this long fails (a source that trickles forever).
    pub deadline: Duration,
    /// A fill that moves fewer bytes than this per second, measured over `min_rate_window`,
    /// fails: a source that keeps a download alive with a trickle must not hold its readers.
    pub min_rate: u64,
    /// The window `min_rate` is measured over.
    pub min_rate_window: Duration,
}

impl Default for FillConfig {
    fn default() -> Self {
        FillConfig {
            spool_dir: std::env::temp_dir().join(format!("registry-facade-spool-{}", std::process::id())),
            retry_min_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(2),
            max_attempts_without_progress: 5,
            max_resumes: 64,
            max_cluster_resumes: 2,
            idle_timeout: Duration::from_secs(60),
            // 10 GiB at 3 MiB/s still fits: the deadline is for sources that never end.
            deadline: Duration::from_secs(3 * 3600),
            // 8 KiB/s over a minute: far below any link a pull can finish on, far above a
            // trickle that only keeps a connection open.
            min_rate: 8 * 1024,
            min_rate_window: Duration::from_secs(60),
        }
    }
}

/// Where a fill downloads from: the origin a workspace's image names for the blob. Fills are
/// shared only between requests whose images name the same origin, so a registry one tenant
/// controls can never serve, stall or break another tenant's download of the same digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamBlob {
    /// Registry host as written in the image ref.
    pub registry: String,
    /// Repository.
    pub repo: RepoName,
}

impl UpstreamBlob {
    /// `registry/repository`, as cluster index entries record origins.
    pub fn key(&self) -> String {
        format!("{}/{}", self.registry, self.repo)
    }
}

/// The origin of a blob: its upstream registry. A trait so that the fill can be driven by a
/// scripted origin in tests; [`facade_upstream::Client`] is the real one.
pub trait Origin: Send + Sync {
    /// Opens the blob's body from byte `offset`.
    fn open<'a>(
        &'a self,
        from: &'a UpstreamBlob,
        digest: &'a Digest,
        offset: u64,
    ) -> BoxFuture<'a, facade_upstream::Result<facade_upstream::BlobStream>>;
}

impl Origin for facade_upstream::Client {
    fn open<'a>(
        &'a self,
        from: &'a UpstreamBlob,
        digest: &'a Digest,
        offset: u64,
    ) -> BoxFuture<'a, facade_upstream::Result<facade_upstream::BlobStream>> {
        Box::pin(self.blob_stream(&from.registry, &from.repo, digest, offset))
    }
}

/// What a fill needs of the cluster cache. [`ClusterCache`] is the real one.
pub trait ClusterBlobs: Send + Sync {
    /// Where the cluster has `digest` of `size` bytes.
    fn lookup<'a>(&'a self, digest: &'a Digest, size: u64) -> BoxFuture<'a, Option<IndexEntry>>;
    /// `[offset, offset + length)` of `cid`; `None` when the content cannot be had now.
    fn cat<'a>(
        &'a self,
        cid: &'a str,
        offset: u64,
        length: u64,
    ) -> BoxFuture<'a, Option<BoxStream<'static, Result<Bytes>>>>;
    /// Records a failure the cluster's breaker should know of.
    fn failed(&self, reason: &str);
    /// Removes `digest`'s index entry: its content hashed to something else.
    fn forget<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, ()>;
    /// Adds a verified blob from `file`, downloaded from `origin`, to the cluster.
    fn publish(
        self: Arc<Self>,
        digest: Digest,
        media_type: String,
        origin: UpstreamBlob,
        file: Arc<std::fs::File>,
        size: u64,
    ) -> BoxFuture<'static, BackfillOutcome>;
}

impl ClusterBlobs for ClusterCache {
    fn lookup<'a>(&'a self, digest: &'a Digest, size: u64) -> BoxFuture<'a, Option<IndexEntry>> {
        Box::pin(self.lookup_blob(digest, size))
    }

    fn cat<'a>(
        &'a self,
        cid: &'a str,
        offset: u64,
        length: u64,
    ) -> BoxFuture<'a, Option<BoxStream<'static, Result<Bytes>>>> {
        Box::pin(ClusterCache::cat(self, cid, offset, length))
    }

    fn failed(&self, reason: &str) {
        self.ipfs_failed(&reason);
    }

    fn forget<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, ()> {
        Box::pin(self.forget_blob(digest))
    }

    fn publish(
        self: Arc<Self>,
        digest: Digest,
        media_type: String,
        origin: UpstreamBlob,
        file: Arc<std::fs::File>,
        size: u64,
    ) -> BoxFuture<'static, BackfillOutcome> {
        Box::pin(async move { self.publish_blob(&digest, &media_type, &origin.key(), file, size).await })
    }
}

/// One in-flight download, shared by its readers.
pub struct Fill {
    /// The digest being filled.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    origin: UpstreamBlob,
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
    /// The newest bytes, for readers that keep pace (`tail.rs`).
    tail: Arc<Tail>,
    head: watch::Receiver<Head>,
    /// Keeps the committed blob from eviction while readers (who hold the fill) read it.
    _in_use: Option<InUse>,
    /// Set (before the fill reports its failure) when the disk filled up under the spool.
    fallback: std::sync::OnceLock<Fallback>,
    /// Where the bytes come from now: true while they come from the cluster (IPFS or another
    /// node's fill), false from the origin. For progress reports (README, warm-up).
    from_cluster: std::sync::atomic::AtomicBool,
}

/// How the readers of a fill that hit a full disk go on: from the origin, at the offset the
/// spool reached, with the hash of the bytes before it (the spool file stays readable through
/// the descriptors readers hold), so the whole blob is still verified before its last byte.
#[derive(Clone)]
pub struct Fallback {
    /// Bytes in the spool file, and their hash state (`None`: start hashing from byte 0).
    pub(crate) prefix: Option<HashedPrefix>,
}

impl Fill {
    /// The origin this fill downloads from.
    pub fn origin(&self) -> &UpstreamBlob {
        &self.origin
    }

    /// Whether the fill ended because the disk filled up, and how its readers go on.
    pub fn fallback(&self) -> Option<&Fallback> {
        self.fallback.get()
    }

    /// Whether the bytes come from the cluster (IPFS or another node) rather than the origin:
    /// now, while the fill runs; once it is verified, whether every byte did.
    pub fn came_from_cluster(&self) -> bool {
        self.from_cluster.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_came_from_cluster(&self, cluster: bool) {
        self.from_cluster.store(cluster, std::sync::atomic::Ordering::Relaxed);
    }

    /// The file readers read from (open before any rename, so commit does not disturb them).
    pub fn file(&self) -> Arc<std::fs::File> {
        self.file.clone()
    }

    /// A progress receiver for a new reader.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// What a new reader follows: the progress and the in-memory tail.
    pub fn following(&self) -> Following {
        Following { progress: self.progress.clone(), tail: Some(self.tail.clone()) }
    }

    /// Waits until a source answered (so the response status can follow the origin's), or
    /// returns the failure that ended the fill before any source did: a 404, 401, 403 or 429
    /// of the origin reaches the client as that error, not as a 200 that is cut.
    pub async fn answered(&self) -> Result<()> {
        let mut head = self.head.clone();
        let state = head.wait_for(|h| !matches!(h, Head::Waiting)).await;
        match state.as_deref() {
            Ok(Head::Failed(e)) => Err(Error::Shared(e.clone())),
            Ok(_) => Ok(()),
            Err(_) => Err(Error::Spool { reason: "fill ended before any source answered".into() }),
        }
    }
}

/// Whether a fill's source has answered yet.
#[derive(Clone, Debug)]
enum Head {
    /// No source has answered yet.
    Waiting,
    /// A source answered with the blob's bytes on the way.
    Answered,
    /// The fill failed before any source answered.
    Failed(Arc<Error>),
}

/// The table of in-flight fills.
pub struct Fills {
    config: FillConfig,
    store: Option<LocalStore>,
    origin: Arc<dyn Origin>,
    cluster: Option<Arc<dyn ClusterBlobs>>,
    metrics: ClusterMetrics,
    chain_metrics: std::sync::OnceLock<ChainMetrics>,
    /// The fills of each digest, one per origin at most.
    inflight: Mutex<HashMap<Digest, Vec<Weak<Fill>>>>,
    /// Origins known to hold stored blobs (see `possession.rs`).
    vouched: Vouched,
    /// Cluster-wide single-flight (`peer.rs`), when configured.
    peers: std::sync::OnceLock<peer::Peers>,
}

/// Batches progress notifications: every send wakes every reader, and per-chunk wake-ups of
/// many readers cost more than the copying. Readers are told after each 256 KiB that arrived
/// (they may take it from the tail) or was written, after 20 ms (so a slow trickle still flows
/// to clients), and of the first bytes at once.
#[derive(Default)]
struct Notifier {
    /// `(written, accepted)` last sent.
    sent: (u64, u64),
    at: Option<Instant>,
}

impl Notifier {
    const BYTES: u64 = 256 * 1024;
    const EVERY: Duration = Duration::from_millis(20);

    fn progress(&mut self, tx: &watch::Sender<Progress>, written: u64, accepted: u64) {
        let (w, a) = self.sent;
        let due = a == 0
            || accepted - a >= Self::BYTES
            || written.saturating_sub(w) >= Self::BYTES
            || self.at.is_none_or(|t| t.elapsed() >= Self::EVERY);
        if due {
            self.flush(tx, written, accepted);
        }
    }

    fn flush(&mut self, tx: &watch::Sender<Progress>, written: u64, accepted: u64) {
        if (written, accepted) != self.sent {
            self.sent = (written, accepted);
            self.at = Some(Instant::now());
            let _ = tx.send(Progress::Running { written, accepted });
        }
    }
}

/// Progress a broken body must have brought for its resume not to count against the budget.
const RESUME_PROGRESS: u64 = 1 << 20;

/// How often a fill waiting for bytes looks whether anybody still needs it.
const UNREAD_CHECK: Duration = Duration::from_secs(1);

/// The fill task's ends of its readers' channels.
struct Senders {
    progress: watch::Sender<Progress>,
    head: watch::Sender<Head>,
}

/// Where the bytes of a finished fill came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Came {
    /// All of them from IPFS: the cluster already holds the blob.
    Cluster,
    /// Some or all from the origin.
    Origin,
}

/// What ended one wait of [`Run::next`].
enum Waited<T> {
    /// The body's next item (`None`: it ended).
    Item(Option<T>),
    /// The write under way finished: this many bytes are on disk.
    Written(u64),
    /// Time to look whether the fill is still wanted or stalled.
    Wake,
}

/// One fill's moving parts, handed down the steps of [`Fills::run`].
struct Run<'a> {
    fill: &'a Arc<Fill>,
    spool: Spool,
    tx: &'a watch::Sender<Progress>,
    head: &'a watch::Sender<Head>,
    notify: Notifier,
    /// Start of the current `min_rate` window and the bytes accepted at its start (tokio's
    /// clock, like every other deadline of the fill).
    window: (tokio::time::Instant, u64),
    /// Since when nobody reads the fill, and the bytes accepted then.
    unread: Option<(tokio::time::Instant, u64)>,
}

impl Run<'_> {
    /// Appends a chunk of a source that must not go past the blob's size, tells the readers,
    /// and answers whether the fill should go on.
    async fn append(&mut self, fills: &Fills, bytes: Bytes) -> Result<()> {
        let total = self.spool.accepted() + bytes.len() as u64;
        if total > self.fill.size {
            return Err(Error::SizeMismatch {
                digest: self.fill.digest.clone(),
                expected: self.fill.size,
                actual: total,
            });
        }
        self.fill.tail.push(self.spool.accepted(), bytes.clone());
        self.spool.append(bytes).await?;
        self.notify.progress(self.tx, self.spool.written(), self.spool.accepted());
        if fills.abandoned(self.fill, &mut self.unread, self.spool.accepted()) {
            return Err(Error::Cancelled { digest: self.fill.digest.clone() });
        }
        self.check_rate(&fills.config)
    }

    /// Fails a fill that moved fewer than `min_rate` bytes per second over the last window.
    fn check_rate(&mut self, config: &FillConfig) -> Result<()> {
        let (since, at) = self.window;
        let elapsed = since.elapsed();
        if elapsed < config.min_rate_window {
            return Ok(());
        }
        let moved = self.spool.accepted() - at;
        if (moved as f64) < config.min_rate as f64 * elapsed.as_secs_f64() {
            return Err(Error::FillTimeout {
                digest: self.fill.digest.clone(),
                reason: format!("{moved} bytes in {elapsed:?}, below the minimum of {} bytes/s", config.min_rate),
            });
        }
        self.window = (tokio::time::Instant::now(), self.spool.accepted());
        Ok(())
    }

    /// A source answered: requests waiting to send their status may go on.
    fn answered(&self) {
        self.head.send_if_modified(|h| match h {
            Head::Waiting => {
                *h = Head::Answered;
                true
            }
            _ => false,
        });
    }

    /// The next item of `body`. When nothing is ready, what is pending starts being written,
    /// so readers of a trickle see every byte that arrived, and the body is read on while the
    /// disk works: waiting for each write before the next read halved the cold path's speed
    /// (download and hashing took turns instead of overlapping, bench/RESULTS.md). No item for
    /// `idle` is a stall. While it waits, it looks every [`UNREAD_CHECK`] whether anybody still
    /// needs the fill, so a source that sends nothing cannot keep an unread fill (and its
    /// reservation) alive.
    async fn next<S: Stream + Unpin>(
        &mut self,
        fills: &Fills,
        body: &mut S,
        idle: Duration,
    ) -> Result<Option<S::Item>> {
        if let Some(item) = body.next().now_or_never() {
            return Ok(item);
        }
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            self.spool.kick()?;
            let wake = deadline.min(tokio::time::Instant::now() + UNREAD_CHECK);
            let step = if self.spool.is_writing() {
                tokio::select! {
                    item = body.next() => Waited::Item(item),
                    written = self.spool.write_done() => Waited::Written(written?),
                    () = tokio::time::sleep_until(wake) => Waited::Wake,
                }
            } else {
                match tokio::time::timeout_at(wake, body.next()).await {
                    Ok(item) => Waited::Item(item),
                    Err(_) => Waited::Wake,
                }
            };
            match step {
                Waited::Item(item) => return Ok(item),
                Waited::Written(written) => {
                    self.notify.flush(self.tx, written, self.spool.accepted());
                    continue;
                }
                Waited::Wake => {
                    if fills.abandoned(self.fill, &mut self.unread, self.spool.accepted()) {
                        return Err(Error::Cancelled { digest: self.fill.digest.clone() });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::FillTimeout {
                            digest: self.fill.digest.clone(),
                            reason: format!("no byte for {idle:?} at offset {}", self.spool.accepted()),
                        });
                    }
                }
            }
        }
    }
}

impl Fills {
    /// A table that commits to `store` (if any) and downloads with `upstream`.
    pub fn new(config: FillConfig, store: Option<LocalStore>, upstream: facade_upstream::Client) -> Result<Arc<Self>> {
        Self::with_cluster(config, store, upstream, None, ClusterMetrics::unregistered())
    }

    /// A table that also reads from and back-fills `cluster`, counting into `metrics`.
    pub fn with_cluster(
        config: FillConfig,
        store: Option<LocalStore>,
        upstream: facade_upstream::Client,
        cluster: Option<Arc<ClusterCache>>,
        metrics: ClusterMetrics,
    ) -> Result<Arc<Self>> {
        let cluster = cluster.filter(|c| c.shares_blobs()).map(|c| c as Arc<dyn ClusterBlobs>);
        Self::with_origin(config, store, Arc::new(upstream), cluster, metrics)
    }

    /// A table over any origin and cluster.
    pub fn with_origin(
        config: FillConfig,
        store: Option<LocalStore>,
        origin: Arc<dyn Origin>,
        cluster: Option<Arc<dyn ClusterBlobs>>,
        metrics: ClusterMetrics,
    ) -> Result<Arc<Self>> {
        if store.is_none() {
            std::fs::create_dir_all(&config.spool_dir)
                .map_err(|e| Error::io(format!("creating spool dir {}", config.spool_dir.display()), e))?;
        }
        Ok(Arc::new(Fills {
            config,
            store,
            origin,
            cluster,
            metrics,
            chain_metrics: std::sync::OnceLock::new(),
            inflight: Mutex::new(HashMap::new()),
            vouched: Vouched::new(100_000),
            peers: std::sync::OnceLock::new(),
        }))
    }

    /// Counts joins, retries and mismatches into `metrics` (once; later calls are ignored).
    pub fn set_chain_metrics(&self, metrics: ChainMetrics) {
        let _ = self.chain_metrics.set(metrics);
    }

    fn chain_metrics(&self) -> Option<&ChainMetrics> {
        self.chain_metrics.get()
    }

    /// The table, even after a panic elsewhere poisoned its lock: the map itself is always
    /// consistent (each operation is one insert or remove).
    fn table(&self) -> MutexGuard<'_, HashMap<Digest, Vec<Weak<Fill>>>> {
        lock(&self.inflight)
    }

    /// Whether the node's stored copy of `digest` may be served to a request whose image names
    /// origin `from`: only if `from` has shown it holds the content (see `possession.rs`).
    pub async fn origin_holds(&self, from: &UpstreamBlob, digest: &Digest, stored: &std::fs::File, size: u64) -> bool {
        self.vouched.check(self.origin.as_ref(), from, digest, stored, size).await
    }

    /// Number of fills in flight.
    pub fn inflight(&self) -> usize {
        self.table().values().flatten().filter(|w| w.strong_count() > 0).count()
    }

    /// Takes `fill` out of the table (if it is still there).
    fn remove(table: &mut HashMap<Digest, Vec<Weak<Fill>>>, fill: &Arc<Fill>) {
        if let Some(list) = table.get_mut(&fill.digest) {
            list.retain(|w| w.as_ptr() != Arc::as_ptr(fill) && w.strong_count() > 0);
            if list.is_empty() {
                table.remove(&fill.digest);
            }
        }
    }

    /// Joins the fill of `digest` from origin `from`, starting it if none runs. A fill of the
    /// same digest from another origin is never joined (see [`UpstreamBlob`]). Returns the fill
    /// and whether this call started it.
    pub fn join(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
        media_type: &str,
        from: &UpstreamBlob,
    ) -> Result<(Arc<Fill>, bool)> {
        let mut table = self.table();
        // Upgrading under the lock that `abandoned` takes: a fill is either still wanted, and
        // this reader keeps it going, or already out of the table.
        let existing = table
            .get(digest)
            .into_iter()
            .flatten()
            .filter_map(Weak::upgrade)
            .find(|f| f.origin == *from && !matches!(*f.progress.borrow(), Progress::Failed(_)));
        if let Some(existing) = existing {
            if let Some(m) = self.chain_metrics() {
                m.joined();
            }
            return Ok((existing, false));
        }
        // One disk budget for the store and the spools: the blob's declared size is reserved
        // now, or the blob is streamed through instead (the caller's decision).
        let reservation = match &self.store {
            Some(store) => {
                Some(store.reserve(size).map_err(|reason| Error::NoRoom { digest: digest.clone(), reason })?)
            }
            None => None,
        };
        let spool = match Spool::reserve(self.store.as_ref(), &self.config.spool_dir, digest, reservation) {
            Err(Error::Io { source, .. }) if is_no_space(&source) && self.store.is_some() => {
                if let Some(store) = &self.store {
                    store.no_space();
                }
                return Err(Error::NoRoom { digest: digest.clone(), reason: PassReason::NoSpace });
            }
            other => other?,
        };
        let path = spool.path().ok_or_else(|| Error::Spool { reason: "new spool has no file".into() })?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let (tx, rx) = watch::channel(Progress::Running { written: 0, accepted: 0 });
        let (head_tx, head) = watch::channel(Head::Waiting);
        let in_use = self.store.as_ref().map(|s| s.in_use(digest));
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            size,
            origin: from.clone(),
            file: Arc::new(file),
            progress: rx,
            tail: Arc::new(Tail::new(TAIL_BYTES)),
            head,
            _in_use: in_use,
            fallback: std::sync::OnceLock::new(),
            from_cluster: std::sync::atomic::AtomicBool::new(false),
        });
        table.entry(digest.clone()).or_default().push(Arc::downgrade(&fill));
        drop(table);
        let senders = Senders { progress: tx, head: head_tx };
        tokio::spawn(self.clone().drive(fill.clone(), spool, media_type.to_string(), senders));
        Ok((fill, true))
    }

    /// Whether nobody needs the rest of `fill`: no reader holds it (readers, prefetches
    /// included, hold it as the guard of their stream; the fill's task holds one reference) and
    /// there is no store to fill for later, or there is one but the fill has gone unread for the
    /// store's `unread_grace` and did not keep the minimum rate over it (or the disk is full).
    /// A fill that fits its budget (it reserved its size) and moves keeps filling the store for
    /// later pulls. `unread` is the fill's own record of since when, and from which byte, it is
    /// unread. Decided under the table's lock, and an abandoned fill leaves the table at once,
    /// so a new request never joins a fill that is about to stop.
    fn abandoned(&self, fill: &Arc<Fill>, unread: &mut Option<(tokio::time::Instant, u64)>, accepted: u64) -> bool {
        let mut table = self.table();
        if Arc::strong_count(fill) > 1 {
            *unread = None;
            return false;
        }
        if let Some(store) = &self.store {
            let now = tokio::time::Instant::now();
            let (since, at) = *unread.get_or_insert((now, accepted));
            let unread_for = now - since;
            if unread_for < store.config().unread_grace {
                return false;
            }
            let moving = (accepted - at) as f64 >= self.config.min_rate as f64 * unread_for.as_secs_f64();
            if moving && !store.disk_full() {
                *unread = Some((now, accepted));
                return false;
            }
            store.fill_abandoned();
        }
        Self::remove(&mut table, fill);
        true
    }

    /// The fill's task: runs it, tells the readers how it ended, counts it, publishes what came
    /// from the origin, and leaves the table.
    async fn drive(self: Arc<Self>, fill: Arc<Fill>, spool: Spool, media_type: String, tx: Senders) {
        let started = Instant::now();
        if let Some(m) = self.chain_metrics() {
            m.fill_started();
        }
        let from = fill.origin.clone();
        let run = self.run(&fill, spool, &tx);
        let result = match tokio::time::timeout(self.config.deadline, run).await {
            Ok(r) => r,
            Err(_) => Err(Error::FillTimeout {
                digest: fill.digest.clone(),
                reason: format!("not done after {:?}", self.config.deadline),
            }),
        };
        if let Some(m) = self.chain_metrics() {
            m.fill_ended();
        }
        // Readers take the rest from the file now (verified) or stop (failed).
        fill.tail.close();
        self.report(&fill, &from, started, &result);
        match result {
            Ok(came) => {
                // From the origin, or from the cluster under an entry that names this origin.
                self.vouched.vouch(&fill.digest, &from);
                let _ = tx.progress.send(Progress::Verified);
                self.publish(&fill, &media_type, came);
            }
            Err(e) => {
                let e = Arc::new(e);
                tx.head.send_if_modified(|h| match h {
                    Head::Waiting => {
                        *h = Head::Failed(e.clone());
                        true
                    }
                    _ => false,
                });
                // A fill whose bytes were verified but could not be stored still served them:
                // readers that saw `Verified` keep it (read.rs), new ones must not see a failure.
                if !matches!(*tx.progress.borrow(), Progress::Verified) {
                    let _ = tx.progress.send(Progress::Failed(e.to_string().into()));
                }
            }
        }
        Self::remove(&mut self.table(), &fill);
    }

    /// One log line and the back-fill count of a finished fill. A cancel is no failure.
    fn report(&self, fill: &Fill, from: &UpstreamBlob, started: Instant, result: &Result<Came>) {
        let local = self.store.is_some().then_some(BackfillStore::Local);
        match result {
            Ok(came) => {
                let secs = started.elapsed().as_secs_f64();
                let source = match came {
                    Came::Cluster => "cluster",
                    Came::Origin => "upstream",
                };
                tracing::info!(
                    digest = %fill.digest, registry = %from.registry, repo = %from.repo, source,
                    size = fill.size, seconds = secs,
                    mib_per_second = (fill.size as f64 / 1048576.0) / secs.max(1e-9),
                    "downloaded blob"
                );
                if let Some(store) = local {
                    self.metrics.backfill(store, BackfillOutcome::Ok);
                }
            }
            Err(e @ Error::Cancelled { .. }) => {
                tracing::debug!(digest = %fill.digest, registry = %from.registry, error = %e, "blob fill stopped");
            }
            Err(e) => {
                tracing::warn!(digest = %fill.digest, registry = %from.registry, repo = %from.repo, error = %e, "blob fill failed");
                if let Some(store) = local {
                    self.metrics.backfill(store, BackfillOutcome::Failed);
                }
            }
        }
    }

    /// cluster → origin → verify (the readers get the last byte) → commit. A full disk before
    /// the readers got the last byte ends the fill with a [`Fallback`] for them; at the commit
    /// it only keeps the blob out of the store (they were served already).
    async fn run(&self, fill: &Arc<Fill>, spool: Spool, tx: &Senders) -> Result<Came> {
        let mut run = Run {
            fill,
            spool,
            tx: &tx.progress,
            head: &tx.head,
            notify: Notifier::default(),
            window: (tokio::time::Instant::now(), 0),
            unread: None,
        };
        let came = match self.download(&mut run, tx).await {
            Ok(came) => came,
            Err(e) => {
                if run.spool.out_of_space() {
                    self.out_of_space(fill, &run.spool);
                }
                return Err(e);
            }
        };
        let committed = run.spool.commit(self.store.clone(), &fill.digest, fill.size).await;
        if let Err(Error::Io { source, .. }) = &committed
            && is_no_space(source)
            && let Some(store) = &self.store
        {
            store.no_space();
        }
        committed.map(|()| came)
    }

    /// The disk filled up under `spool`: its readers are told how to go on from the origin
    /// (before the failure reaches them), and the store makes room.
    fn out_of_space(&self, fill: &Fill, spool: &Spool) {
        let prefix = spool.hashed_prefix().map(|(len, hasher)| HashedPrefix { len, hasher });
        tracing::warn!(
            digest = %fill.digest, offset = prefix.as_ref().map(|p| p.len),
            "disk full while downloading a blob; its readers go on streaming from the origin"
        );
        let _ = fill.fallback.set(Fallback { prefix });
        if let Some(store) = &self.store {
            store.no_space();
        }
    }

    /// A pass-through of `[start, end)` of a blob the store does not keep, from origin `from`:
    /// the origin has answered when this returns (see `passthrough.rs`). `resume` continues a
    /// reader of a fill that hit a full disk.
    pub(crate) async fn pass_through(
        &self,
        digest: &Digest,
        size: u64,
        from: &UpstreamBlob,
        (start, end): (u64, u64),
        resume: Option<&Fallback>,
    ) -> Result<futures::stream::BoxStream<'static, std::io::Result<Bytes>>> {
        let c = &self.config;
        let config = PassConfig {
            idle_timeout: c.idle_timeout,
            retry_min_delay: c.retry_min_delay,
            retry_max_delay: c.retry_max_delay,
            max_attempts_without_progress: c.max_attempts_without_progress,
            max_resumes: c.max_resumes,
        };
        let prefix = resume.and_then(|f| f.prefix.clone());
        PassThrough::open(self.origin.clone(), from.clone(), digest.clone(), size, start, end, prefix, config).await
    }

    /// cluster → origin → verify; the readers get the last byte.
    async fn download(&self, run: &mut Run<'_>, tx: &Senders) -> Result<Came> {
        let fill = run.fill;
        let from = &fill.origin;
        let mut came = Came::Origin;
        if let Some(cluster) = &self.cluster
            && let Some(entry) = cluster.lookup(&fill.digest, fill.size).await
            && entry.origins.contains(&from.key())
        {
            fill.set_came_from_cluster(true);
            match self.fill_from_cluster(cluster.as_ref(), &entry, run).await {
                Ok(()) => came = Came::Cluster,
                Err(e @ Error::Cancelled { .. }) => return Err(e),
                Err(e) if run.spool.out_of_space() => return Err(e),
                Err(e) => tracing::info!(
                    digest = %fill.digest, cid = %entry.cid, offset = run.spool.accepted(), error = %e,
                    "IPFS could not deliver the blob; going on from upstream at this offset"
                ),
            }
        }
        // Held until the fill ends: other nodes stream from this fill meanwhile (peer.rs).
        let _lease = if came == Came::Origin {
            fill.set_came_from_cluster(true);
            self.fill_from_peers(run).await?
        } else {
            None
        };
        // What another node delivered in full counts as the cluster's; anything the origin had
        // to complete, as the origin's.
        if came == Came::Origin && run.spool.accepted() < fill.size {
            fill.set_came_from_cluster(false);
            self.fill_from_origin(run, from).await?;
        }
        let verified = run.spool.verify(&fill.digest, fill.size).await;
        if let Err(e) = &verified {
            self.mismatch(fill, came, e).await;
        }
        verified?;
        // Readers get the last byte as soon as the digest checks out; syncing and renaming into
        // the store (slow for a large blob) happens after.
        let _ = tx.progress.send(Progress::Verified);
        Ok(came)
    }

    /// Counts a failed verification; content that came all from IPFS and hashed wrong means
    /// the index points at other content: nobody may use that entry again. (Bytes partly from
    /// the origin prove nothing about the index.)
    async fn mismatch(&self, fill: &Fill, came: Came, e: &Error) {
        if !matches!(e, Error::DigestMismatch { .. } | Error::SizeMismatch { .. }) {
            return;
        }
        if let Some(m) = self.chain_metrics() {
            m.mismatch(came == Came::Cluster);
        }
        if came == Came::Cluster
            && let Some(cluster) = &self.cluster
        {
            tracing::warn!(digest = %fill.digest, "blob assembled from IPFS did not verify; removing its index entry");
            cluster.forget(&fill.digest).await;
        }
    }

    /// Streams the blob from IPFS into the spool, resuming a broken stream at its offset a few
    /// times. Returns an error when the rest must come from elsewhere.
    async fn fill_from_cluster(&self, cluster: &dyn ClusterBlobs, entry: &IndexEntry, run: &mut Run<'_>) -> Result<()> {
        let size = run.fill.size;
        let mut resumes = 0usize;
        loop {
            let offset = run.spool.accepted();
            if offset == size {
                return Ok(());
            }
            let Some(mut stream) = cluster.cat(&entry.cid, offset, size - offset).await else {
                return Err(Error::Cluster { dependency: "ipfs", context: "cat".into(), reason: "no answer".into() });
            };
            run.answered();
            let reason = loop {
                match run.next(self, &mut stream, self.config.idle_timeout).await {
                    Ok(Some(Ok(bytes))) => run.append(self, bytes).await?,
                    Ok(Some(Err(e))) | Err(e @ Error::FillTimeout { .. }) => break e.to_string(),
                    Err(e) => return Err(e),
                    Ok(None) => break format!("stream ended at byte {}", run.spool.accepted()),
                }
            };
            if run.spool.accepted() == size {
                return Ok(());
            }
            resumes += 1;
            if resumes > self.config.max_cluster_resumes {
                cluster.failed(&reason);
                return Err(Error::Cluster { dependency: "ipfs", context: "cat".into(), reason });
            }
            tracing::debug!(digest = %run.fill.digest, offset = run.spool.accepted(), %reason, "IPFS stream broke; resuming");
        }
    }

    /// Streams the rest of the blob from its origin, resuming broken bodies at their offset.
    async fn fill_from_origin(&self, run: &mut Run<'_>, from: &UpstreamBlob) -> Result<()> {
        let digest = run.fill.digest.clone();
        let context = || format!("{}/{}@{digest}", from.registry, from.repo);
        let mut backoff = self.backoff();
        let mut resumes = 0usize;
        loop {
            let offset = run.spool.accepted();
            if offset == run.fill.size {
                return Ok(());
            }
            let broke = match self.origin.open(from, &digest, offset).await {
                Ok(stream) => match self.copy_body(run, stream, &context).await? {
                    None => continue,
                    Some(broke) => {
                        // The resume budget counts bodies that broke before bringing much;
                        // failed requests are bounded by the backoff's attempts without
                        // progress, and slow progress by the minimum rate.
                        if run.spool.accepted() - offset < RESUME_PROGRESS {
                            resumes += 1;
                        }
                        broke
                    }
                },
                Err(e) => {
                    // A ranged request answered oddly is worth one more try; a first one is not.
                    // A 429 before any byte goes to the client with the origin's Retry-After
                    // (the origin asked for a pause, not for our retries).
                    let rate_limited = e.kind() == facade_upstream::ErrorKind::RateLimited && offset == 0;
                    let retry = !rate_limited
                        && (e.is_retryable() || (e.kind() == facade_upstream::ErrorKind::Protocol && offset > 0));
                    let err = Error::upstream(context(), e);
                    if !retry {
                        return Err(err);
                    }
                    self.count_retry(RetryReason::Request);
                    err
                }
            };
            if run.spool.accepted() == run.fill.size {
                return Ok(());
            }
            if resumes > self.config.max_resumes {
                return Err(broke);
            }
            if run.spool.accepted() > offset {
                backoff = self.backoff();
            }
            let Some(delay) = backoff.next() else { return Err(broke) };
            tokio::time::sleep(delay).await;
        }
    }

    /// Copies one origin body into the spool. `Ok(None)`: the body is complete; `Ok(Some)`: it
    /// broke in a way worth a resume (the bytes before the break are kept); `Err`: the fill
    /// must fail.
    async fn copy_body(
        &self,
        run: &mut Run<'_>,
        mut stream: facade_upstream::BlobStream,
        context: &(dyn Fn() -> String + Sync),
    ) -> Result<Option<Error>> {
        let size = run.fill.size;
        if let Some(total) = stream.total_size
            && total != size
        {
            return Err(Error::SizeMismatch { digest: run.fill.digest.clone(), expected: size, actual: total });
        }
        run.answered();
        loop {
            let err = match run.next(self, &mut stream.body, self.config.idle_timeout).await {
                Ok(Some(Ok(bytes))) => {
                    run.append(self, bytes).await?;
                    continue;
                }
                Ok(None) if run.spool.accepted() == size => return Ok(None),
                Ok(None) => Error::Interrupted { digest: run.fill.digest.clone(), offset: run.spool.accepted() },
                Ok(Some(Err(e))) if e.is_retryable() => Error::upstream(context(), e),
                Ok(Some(Err(e))) => return Err(Error::upstream(context(), e)),
                Err(e @ Error::FillTimeout { .. }) => e,
                Err(e) => return Err(e),
            };
            tracing::debug!(digest = %run.fill.digest, offset = run.spool.accepted(), error = %err, "upstream body broke; resuming");
            self.count_retry(RetryReason::Body);
            // Readers get what arrived before the break while we resume.
            let written = run.spool.flush().await?;
            run.notify.flush(run.tx, written, run.spool.accepted());
            return Ok(Some(err));
        }
    }

    fn count_retry(&self, reason: RetryReason) {
        if let Some(m) = self.chain_metrics() {
            m.retry(reason);
        }
    }

    /// Adds a blob that came from the origin to IPFS, from the fill's verified spool (open, so a
    /// commit's rename does not matter), in the background.
    fn publish(&self, fill: &Arc<Fill>, media_type: &str, came: Came) {
        let Some(cluster) = &self.cluster else { return };
        if came == Came::Cluster {
            self.metrics.backfill(BackfillStore::Ipfs, BackfillOutcome::Skipped);
            return;
        }
        let digest = fill.digest.clone();
        let publish = cluster.clone().publish(
            digest.clone(),
            media_type.to_string(),
            fill.origin.clone(),
            fill.file(),
            fill.size,
        );
        tokio::spawn(async move {
            if publish.await == BackfillOutcome::Failed {
                tracing::debug!(%digest, "blob not added to the cluster cache");
            }
        });
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.config.retry_min_delay)
            .with_max_delay(self.config.retry_max_delay)
            .with_max_times(self.config.max_attempts_without_progress)
            .with_jitter()
            .build()
    }
}

// A child module: the peer source appends to this fill's spool like the others do.
#[path = "peer.rs"]
pub mod peer;

#[cfg(test)]
mod tests;
