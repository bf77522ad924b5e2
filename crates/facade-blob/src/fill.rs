//! Single-flight fills: one upstream download per digest, spooled to a temp file that every
//! concurrent reader follows, verified before it is committed to the local store.
//!
//! This is the fix for the reference facade's N downloads for N pods starting with the same IDE
//! layer: the first request starts a fill, later ones join it and read what is already on disk,
//! then follow the rest. A broken upstream body is resumed from the byte offset with a Range
//! request (only a 206 starting at that offset is accepted), with exponential backoff and jitter
//! inside a budget well below containerd's 30 s header / 60 s progress windows.
//!
//! With a cluster cache, a fill first asks the Redis index; a blob another node already has is
//! streamed from IPFS into the same spool (resumed with `cat` offsets), and if IPFS breaks or
//! is down the fill goes on from upstream at the byte offset it reached — the bytes are the same
//! content, and the digest is checked over the whole spool before anything is committed or a
//! reader gets the last byte. A blob that came from upstream is added to IPFS afterwards, from
//! the verified spool, in the background.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use facade_oci::{Digest, RepoName};
use futures::StreamExt;
use tokio::sync::watch;

use crate::cluster::{BackfillOutcome, BackfillStore, ClusterCache, ClusterMetrics, IndexEntry};
use crate::error::{Error, Result};
use crate::metrics::{ChainMetrics, RetryReason};
use crate::read::Progress;
use crate::store::{InUse, LocalStore, TempBlob};

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
    /// Resumes in all (bounds O(n²) re-reads from a flapping upstream).
    pub max_resumes: usize,
    /// Resumes of an IPFS stream before the fill goes on from upstream.
    pub max_cluster_resumes: usize,
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
        }
    }
}

/// Where a fill downloads from.
#[derive(Clone, Debug)]
pub struct UpstreamBlob {
    /// Registry host as written in the image ref.
    pub registry: String,
    /// Repository.
    pub repo: RepoName,
}

/// One in-flight download, shared by its readers.
pub struct Fill {
    /// The digest being filled.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
    /// Keeps the committed blob from eviction while readers (who hold the fill) read it.
    _in_use: Option<InUse>,
}

impl Fill {
    /// The file readers read from (open before any rename, so commit does not disturb them).
    pub fn file(&self) -> Arc<std::fs::File> {
        self.file.clone()
    }

    /// A progress receiver for a new reader.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }
}

/// The table of in-flight fills.
pub struct Fills {
    config: FillConfig,
    store: Option<LocalStore>,
    upstream: facade_upstream::Client,
    cluster: Option<Arc<ClusterCache>>,
    metrics: ClusterMetrics,
    chain_metrics: std::sync::OnceLock<ChainMetrics>,
    inflight: Mutex<HashMap<Digest, Weak<Fill>>>,
}

/// Batches progress notifications: every send wakes every reader, and per-chunk wake-ups of
/// many readers cost more than the copying. Readers are told after each 256 KiB, after 20 ms
/// (so a slow trickle still flows to clients), and of the first bytes at once.
#[derive(Default)]
struct Notifier {
    sent: u64,
    at: Option<Instant>,
}

impl Notifier {
    const BYTES: u64 = 256 * 1024;
    const EVERY: std::time::Duration = std::time::Duration::from_millis(20);

    fn progress(&mut self, tx: &watch::Sender<Progress>, written: u64) {
        let due =
            self.sent == 0 || written - self.sent >= Self::BYTES || self.at.is_none_or(|t| t.elapsed() >= Self::EVERY);
        if due && written > self.sent {
            self.sent = written;
            self.at = Some(Instant::now());
            let _ = tx.send(Progress::Running { written });
        }
    }

    fn flush(&mut self, tx: &watch::Sender<Progress>, written: u64) {
        if written > self.sent {
            self.sent = written;
            self.at = Some(Instant::now());
            let _ = tx.send(Progress::Running { written });
        }
    }
}

/// Where the bytes of a finished fill came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Came {
    /// The cluster had it (all or part came from IPFS): IPFS already holds it.
    Cluster,
    /// Upstream only.
    Upstream,
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
        if store.is_none() {
            std::fs::create_dir_all(&config.spool_dir)
                .map_err(|e| Error::io(format!("creating spool dir {}", config.spool_dir.display()), e))?;
        }
        Ok(Arc::new(Fills {
            config,
            store,
            upstream,
            cluster,
            metrics,
            chain_metrics: std::sync::OnceLock::new(),
            inflight: Mutex::new(HashMap::new()),
        }))
    }

    /// Counts joins, retries and mismatches into `metrics` (once; later calls are ignored).
    pub fn set_chain_metrics(&self, metrics: ChainMetrics) {
        let _ = self.chain_metrics.set(metrics);
    }

    fn chain_metrics(&self) -> Option<&ChainMetrics> {
        self.chain_metrics.get()
    }

    /// Number of fills in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.lock().map(|m| m.values().filter(|w| w.strong_count() > 0).count()).unwrap_or(0)
    }

    /// Joins the fill of `digest`, starting it if none runs. Returns the fill and whether this
    /// call started it.
    pub fn join(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
        media_type: &str,
        from: &UpstreamBlob,
    ) -> Result<(Arc<Fill>, bool)> {
        let mut map =
            self.inflight.lock().map_err(|_| Error::io("fill table poisoned", std::io::ErrorKind::Other.into()))?;
        if let Some(existing) = map.get(digest).and_then(Weak::upgrade)
            && !matches!(*existing.progress.borrow(), Progress::Failed(_))
        {
            if let Some(m) = self.chain_metrics() {
                m.joined();
            }
            return Ok((existing, false));
        }
        let temp = match &self.store {
            Some(store) => store.temp_blob(digest)?,
            None => TempBlob::create(&self.config.spool_dir, digest)?,
        };
        let file =
            std::fs::File::open(temp.path()).map_err(|e| Error::io(format!("opening {}", temp.path().display()), e))?;
        let (tx, rx) = watch::channel(Progress::Running { written: 0 });
        let in_use = self.store.as_ref().map(|s| s.in_use(digest));
        let fill = Arc::new(Fill { digest: digest.clone(), size, file: Arc::new(file), progress: rx, _in_use: in_use });
        map.insert(digest.clone(), Arc::downgrade(&fill));
        drop(map);
        tokio::spawn(self.clone().drive(fill.clone(), temp, from.clone(), media_type.to_string(), tx));
        Ok((fill, true))
    }

    /// The fill's task: runs it, tells the readers how it ended, counts it, publishes what came
    /// from upstream, and leaves the table.
    async fn drive(
        self: Arc<Self>,
        fill: Arc<Fill>,
        temp: TempBlob,
        from: UpstreamBlob,
        media_type: String,
        tx: watch::Sender<Progress>,
    ) {
        let started = Instant::now();
        if let Some(m) = self.chain_metrics() {
            m.fill_started();
        }
        let result = self.run(&fill, temp, &from, &tx).await;
        if let Some(m) = self.chain_metrics() {
            m.fill_ended();
        }
        let local = if self.store.is_some() { Some(BackfillStore::Local) } else { None };
        match &result {
            Ok(came) => {
                let secs = started.elapsed().as_secs_f64();
                let source = match came {
                    Came::Cluster => "cluster",
                    Came::Upstream => "upstream",
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
                let _ = tx.send(Progress::Verified);
            }
            Err(e) => {
                tracing::warn!(digest = %fill.digest, registry = %from.registry, repo = %from.repo, error = %e, "blob fill failed");
                if let Some(store) = local {
                    self.metrics.backfill(store, BackfillOutcome::Failed);
                }
                // A fill whose bytes were verified but could not be stored still served them:
                // readers that saw `Verified` keep it (read.rs), new ones must not see a failure.
                if !matches!(*tx.borrow(), Progress::Verified) {
                    let _ = tx.send(Progress::Failed(e.to_string().into()));
                }
            }
        }
        if let Ok(came) = result {
            self.publish(&fill, &media_type, came);
        }
        if let Ok(mut map) = self.inflight.lock()
            && map.get(&fill.digest).is_some_and(|w| w.as_ptr() == Arc::as_ptr(&fill))
        {
            map.remove(&fill.digest);
        }
    }

    async fn run(
        &self,
        fill: &Arc<Fill>,
        mut temp: TempBlob,
        from: &UpstreamBlob,
        tx: &watch::Sender<Progress>,
    ) -> Result<Came> {
        let digest = &fill.digest;
        let mut came = Came::Upstream;
        if let Some(cluster) = self.cluster.as_ref().filter(|c| c.shares_blobs())
            && let Some(entry) = cluster.lookup_blob(digest, fill.size).await
        {
            came = Came::Cluster;
            match self.fill_from_cluster(cluster, &entry, fill, &mut temp, tx).await {
                Ok(()) => tracing::debug!(%digest, cid = %entry.cid, "blob streamed from IPFS"),
                Err(e) => tracing::info!(
                    %digest, cid = %entry.cid, offset = temp.written(), error = %e,
                    "IPFS could not deliver the blob; going on from upstream at this offset"
                ),
            }
        }
        let result = self.fill_from_upstream(fill, temp, from, tx).await;
        if let (Err(Error::DigestMismatch { .. }), Some(m)) = (&result, self.chain_metrics()) {
            m.mismatch(came == Came::Cluster);
        }
        if came == Came::Cluster
            && let (Err(Error::DigestMismatch { .. }), Some(cluster)) = (&result, &self.cluster)
        {
            // The index pointed at content that is not this blob: nobody may use it again.
            tracing::warn!(%digest, "blob assembled from IPFS did not verify; removing its index entry");
            cluster.forget_blob(digest).await;
        }
        result.map(|()| came)
    }

    /// Streams the blob from IPFS into `temp`, resuming a broken stream at its offset a few
    /// times. Returns an error when the rest must come from elsewhere.
    async fn fill_from_cluster(
        &self,
        cluster: &ClusterCache,
        entry: &IndexEntry,
        fill: &Arc<Fill>,
        temp: &mut TempBlob,
        tx: &watch::Sender<Progress>,
    ) -> Result<()> {
        let mut resumes = 0usize;
        let mut notify = Notifier::default();
        loop {
            let offset = temp.written();
            if offset == fill.size {
                return Ok(());
            }
            let Some(mut stream) = cluster.cat(&entry.cid, offset, fill.size - offset).await else {
                return Err(Error::Cluster { dependency: "ipfs", context: "cat".into(), reason: "no answer".into() });
            };
            let mut broke = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(bytes) => {
                        if temp.written() + bytes.len() as u64 > fill.size {
                            return Err(Error::Cluster {
                                dependency: "ipfs",
                                context: "cat".into(),
                                reason: format!("more than {} bytes", fill.size),
                            });
                        }
                        self.append(fill, temp, &bytes, &mut notify, tx)?;
                    }
                    Err(e) => {
                        broke = Some(e);
                        break;
                    }
                }
            }
            if temp.written() == fill.size {
                return Ok(());
            }
            let reason =
                broke.map(|e| e.to_string()).unwrap_or_else(|| format!("stream ended at byte {}", temp.written()));
            resumes += 1;
            if resumes > self.config.max_cluster_resumes {
                cluster.ipfs_failed(&reason);
                return Err(Error::Cluster { dependency: "ipfs", context: "cat".into(), reason });
            }
            tracing::debug!(digest = %fill.digest, offset = temp.written(), %reason, "IPFS stream broke; resuming");
        }
    }

    /// Adds a blob that came from upstream to IPFS, from the fill's verified spool (open, so a
    /// commit's rename does not matter), in the background.
    fn publish(&self, fill: &Arc<Fill>, media_type: &str, came: Came) {
        let Some(cluster) = self.cluster.as_ref().filter(|c| c.shares_blobs()) else { return };
        if came == Came::Cluster {
            self.metrics.backfill(BackfillStore::Ipfs, BackfillOutcome::Skipped);
            return;
        }
        let (cluster, fill, media_type) = (cluster.clone(), fill.clone(), media_type.to_string());
        tokio::spawn(async move {
            let outcome = cluster.publish_blob(&fill.digest, &media_type, fill.file(), fill.size).await;
            if outcome == BackfillOutcome::Failed {
                tracing::debug!(digest = %fill.digest, "blob not added to the cluster cache");
            }
        });
    }

    async fn fill_from_upstream(
        &self,
        fill: &Arc<Fill>,
        mut temp: TempBlob,
        from: &UpstreamBlob,
        tx: &watch::Sender<Progress>,
    ) -> Result<()> {
        let digest = &fill.digest;
        let mut backoff = self.backoff();
        let mut resumes = 0usize;
        let mut notify = Notifier::default();
        let mut last_err: Option<Error> = None;
        loop {
            let offset = temp.written();
            if offset == fill.size {
                break;
            }
            if resumes > self.config.max_resumes {
                return Err(last_err.unwrap_or_else(|| Error::io("too many resumes", std::io::ErrorKind::Other.into())));
            }
            let progressed_from = offset;
            match self.upstream.blob_stream(&from.registry, &from.repo, digest, offset).await {
                Ok(mut stream) => {
                    if let Some(total) = stream.total_size
                        && total != fill.size
                    {
                        return Err(Error::DigestMismatch {
                            expected: digest.clone(),
                            actual: digest.clone(),
                            size: total,
                        });
                    }
                    while let Some(chunk) = stream.body.next().await {
                        match chunk {
                            Ok(bytes) => {
                                if temp.written() + bytes.len() as u64 > fill.size {
                                    return Err(Error::DigestMismatch {
                                        expected: digest.clone(),
                                        actual: digest.clone(),
                                        size: temp.written() + bytes.len() as u64,
                                    });
                                }
                                self.append(fill, &mut temp, &bytes, &mut notify, tx)?;
                            }
                            Err(e) => {
                                let retry = e.is_retryable();
                                let err = Error::upstream(format!("{}/{}@{digest}", from.registry, from.repo), e);
                                if !retry {
                                    return Err(err);
                                }
                                tracing::debug!(%digest, offset = temp.written(), error = %err, "upstream body broke; resuming");
                                if let Some(m) = self.chain_metrics() {
                                    m.retry(RetryReason::Body);
                                }
                                // Readers get what arrived before the break while we resume.
                                notify.flush(tx, temp.written());
                                last_err = Some(err);
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    let retry =
                        e.is_retryable() || matches!(e.kind(), facade_upstream::ErrorKind::Protocol) && offset > 0;
                    let err = Error::upstream(format!("{}/{}@{digest}", from.registry, from.repo), e);
                    if !retry {
                        return Err(err);
                    }
                    if let Some(m) = self.chain_metrics() {
                        m.retry(RetryReason::Request);
                    }
                    last_err = Some(err);
                }
            }
            if temp.written() == fill.size {
                break;
            }
            resumes += 1;
            if temp.written() > progressed_from {
                backoff = self.backoff();
            }
            match backoff.next() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    return Err(
                        last_err.unwrap_or_else(|| Error::io("retries exhausted", std::io::ErrorKind::Other.into()))
                    );
                }
            }
        }
        let size = fill.size;
        let digest = digest.clone();
        // Readers get the last byte as soon as the digest checks out; syncing and renaming into
        // the store (slow for a large blob) happens after.
        temp.check(&digest, size)?;
        let _ = tx.send(Progress::Verified);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || match store {
            Some(store) => temp.commit(&store, &digest, size),
            None => temp.verify(&digest, size),
        })
        .await
        .map_err(|e| Error::io("commit task", std::io::Error::other(e)))?
    }

    /// Spools bytes, tells the readers, and stops when nobody needs the rest: no reader holds the
    /// fill (readers hold it as the guard of their stream; this task holds one reference) and
    /// there is no store to fill for later.
    fn append(
        &self,
        fill: &Arc<Fill>,
        temp: &mut TempBlob,
        bytes: &[u8],
        notify: &mut Notifier,
        tx: &watch::Sender<Progress>,
    ) -> Result<()> {
        temp.write_all(bytes)?;
        notify.progress(tx, temp.written());
        if self.store.is_none() && Arc::strong_count(fill) <= 1 {
            return Err(Error::io("fill cancelled: no readers left", std::io::ErrorKind::Interrupted.into()));
        }
        Ok(())
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
