//! Prefetch and warm-up: filling a workspace image's layers before its client asks for them,
//! and telling anyone how far that is.
//!
//! - **Prefetch**: when a composed manifest is served (GET), every upstream layer that is not
//!   in the local store gets its single-flight fill started, a few at a time. A prefetch holds
//!   each fill like a reader (so the client's blob GETs join it) but reads nothing itself: it
//!   follows the fill's progress until it is verified or failed. It stops — dropping its hold
//!   on the fills — once nobody has asked for anything of that workspace's image for the idle
//!   timeout: the pull it was for went away. Without a store there is nothing to keep a fill
//!   for beyond its readers, so the binary turns prefetch off then (README, "Warm-up").
//! - **Warm-up**: the same, started by the platform through the admin API before a pull;
//!   idleness never stops it (the fills' own deadline bounds it).
//! - **Progress**: per layer (digest, size, bytes done, source, state, last error), totals and
//!   an ETA from the recent rate, kept for a few minutes after a job ends, for a bounded number
//!   of workspaces.
//!
//! A workspace whose job runs is never prefetched twice: a later manifest GET of the same
//! composition only counts as activity, a warm-up takes the running prefetch over.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use facade_oci::{Digest, ParsedManifest};
use futures::StreamExt;
use prometheus::{IntCounterVec, Opts, Registry};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::blobs::fill::{Fills, UpstreamBlob};
use crate::blobs::read::Progress;
use crate::error::{Error, Result};
use crate::images::{BlobEntry, BlobOrigin, ComposedImage};
use crate::store::LocalStore;
use crate::sync::lock;

/// Knobs of prefetch and warm-up.
#[derive(Clone, Debug)]
pub struct PrefetchConfig {
    /// Fills one prefetch or warm-up runs at once (`facade.prefetchParallelism`); 0 turns
    /// prefetch on manifest off (a warm-up then runs [`DEFAULT_PARALLELISM`] at once).
    pub parallelism: usize,
    /// A prefetch stops when no manifest or blob request of its workspace came for this long
    /// (`facade.prefetchIdleTimeout`).
    pub idle_timeout: Duration,
    /// A warm-up still running after this long fails (a fill's own deadline).
    pub warmup_deadline: Duration,
    /// How long the progress of a finished job stays readable.
    pub linger: Duration,
    /// Most workspaces tracked at once (running or lingering).
    pub max_workspaces: usize,
}

/// Fills a job runs at once unless configured otherwise.
///
/// Eight, because containerd's `ctr pull` fetches every layer before it unpacks any: its pull of
/// a ten-layer image through a 24 MiB/s-per-connection link took 0.83× of direct upstream's time
/// with 4 fills at once and 0.71× with 8 (0.73× with 10), bench/RESULTS.md "First pull".
pub const DEFAULT_PARALLELISM: usize = 8;

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            parallelism: DEFAULT_PARALLELISM,
            idle_timeout: Duration::from_secs(30),
            // The fill deadline (blobs/fill.rs): a warm-up is bounded by what one fill may take.
            warmup_deadline: Duration::from_secs(3 * 3600),
            linger: Duration::from_secs(300),
            max_workspaces: 1024,
        }
    }
}

/// What started a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// A manifest GET.
    Prefetch,
    /// The admin API's warm-up.
    Warmup,
}

impl JobKind {
    fn label(self) -> &'static str {
        match self {
            JobKind::Prefetch => "prefetch",
            JobKind::Warmup => "warmup",
        }
    }
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Failed,
    /// Idle (prefetch), replaced by a newer composition, or past its deadline.
    Stopped,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Done, Outcome::Failed, Outcome::Stopped];

    fn label(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::Stopped => "stopped",
        }
    }
}

/// `registry_facade_prefetch_total{outcome}`, `registry_facade_warmups_total{outcome}` and
/// `registry_facade_prefetched_bytes_total{kind}`. No workspace or digest in any label.
#[derive(Clone, Debug)]
pub struct PrefetchMetrics {
    prefetches: IntCounterVec,
    warmups: IntCounterVec,
    bytes: IntCounterVec,
}

impl PrefetchMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self::new()?;
        registry.register(Box::new(m.prefetches.clone()))?;
        registry.register(Box::new(m.warmups.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        Ok(m)
    }

    fn new() -> prometheus::Result<Self> {
        let m = PrefetchMetrics {
            prefetches: IntCounterVec::new(
                Opts::new("registry_facade_prefetch_total", "prefetches on manifest, by how they ended"),
                &["outcome"],
            )?,
            warmups: IntCounterVec::new(
                Opts::new("registry_facade_warmups_total", "warm-ups asked through the admin API, by how they ended"),
                &["outcome"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "registry_facade_prefetched_bytes_total",
                    "bytes of layers that prefetches and warm-ups saw filled and verified",
                ),
                &["kind"],
            )?,
        };
        for o in Outcome::ALL {
            m.prefetches.with_label_values(&[o.label()]);
            m.warmups.with_label_values(&[o.label()]);
        }
        for k in [JobKind::Prefetch, JobKind::Warmup] {
            m.bytes.with_label_values(&[k.label()]);
        }
        Ok(m)
    }

    /// Metrics that go nowhere (tests).
    pub fn unregistered() -> Self {
        // The names and labels above are fixed and valid: creating them cannot fail.
        #[allow(clippy::expect_used)]
        Self::new().expect("static metric definitions")
    }

    fn ended(&self, kind: JobKind, outcome: Outcome) {
        let vec = match kind {
            JobKind::Prefetch => &self.prefetches,
            JobKind::Warmup => &self.warmups,
        };
        vec.with_label_values(&[outcome.label()]).inc();
    }
}

/// Where a layer's bytes come from, as progress reports name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerSource {
    /// Not decided yet.
    Pending,
    /// Already in the local store (and its origin vouched for it).
    Store,
    /// A single-flight fill from the layer's origin registry.
    Upstream,
    /// A single-flight fill from the cluster: IPFS, or another node's download.
    Cluster,
    /// Held in memory (direct content layers).
    Memory,
    /// A remote content layer: clients fetch it from its URL, nothing to fill here.
    Remote,
}

/// A layer's state in a progress report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerState {
    /// Waiting for a fill slot.
    Pending,
    /// Being filled.
    Running,
    /// Available: stored, verified, in memory or remote.
    Done,
    /// The fill failed (or the job stopped before it ended).
    Failed,
}

/// One layer of a progress report.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerProgress {
    /// The layer's digest.
    pub digest: String,
    /// Its size as the manifest gives it.
    pub size: u64,
    /// Bytes available so far.
    pub bytes_done: u64,
    /// Where they come from.
    pub source: LayerSource,
    /// Its state.
    pub state: LayerState,
    /// The last error, if any.
    pub error: Option<String>,
}

/// A workspace's prefetch or warm-up, as the admin API reports it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReport {
    /// `provider/id`.
    pub workspace: String,
    /// `prefetch` or `warmup`.
    pub kind: &'static str,
    /// Digest of the composed manifest whose layers are filled.
    pub manifest: String,
    /// `running`, `done`, `failed` or `stopped`.
    pub state: &'static str,
    /// Every layer, in manifest order.
    pub layers: Vec<LayerProgress>,
    /// Sum of the layers' bytes available.
    pub bytes_done: u64,
    /// Sum of the layers' sizes.
    pub bytes_total: u64,
    /// Layers done.
    pub layers_done: usize,
    /// Layers in the image.
    pub layers_total: usize,
    /// Rate over the last few seconds.
    pub bytes_per_second: f64,
    /// Seconds left at that rate; absent when nothing moves or the job ended.
    pub eta_seconds: Option<f64>,
    /// Seconds since the job started.
    pub elapsed_seconds: f64,
}

impl ProgressReport {
    /// Whether the job ended (done, failed or stopped): its report no longer changes.
    pub fn is_finished(&self) -> bool {
        self.state != "running"
    }
}

type WsKey = (String, String);

/// The rate window the ETA is computed over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// How often a job samples its rate and checks idleness.
const TICK: Duration = Duration::from_millis(250);

struct Job {
    workspace: String,
    manifest_digest: Digest,
    /// Set once a warm-up asked for this job: idleness no longer stops it.
    warmup: AtomicBool,
    stop: CancellationToken,
    state: Mutex<JobState>,
}

struct JobState {
    layers: Vec<LayerProgress>,
    started: Instant,
    last_request: Instant,
    ended: Option<(Instant, Outcome)>,
    samples: VecDeque<(Instant, u64)>,
}

impl JobState {
    fn bytes_done(&self) -> u64 {
        self.layers.iter().map(|l| l.bytes_done).sum()
    }
}

impl Job {
    fn kind(&self) -> JobKind {
        if self.warmup.load(Ordering::Acquire) { JobKind::Warmup } else { JobKind::Prefetch }
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut LayerProgress)) {
        if let Some(l) = lock(&self.state).layers.get_mut(i) {
            f(l);
        }
    }

    fn report(&self) -> ProgressReport {
        let st = lock(&self.state);
        let bytes_done = st.bytes_done();
        let bytes_total = st.layers.iter().map(|l| l.size).sum::<u64>();
        let rate = match (st.samples.front(), st.samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                b1.saturating_sub(*b0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let state = match st.ended {
            None => "running",
            Some((_, o)) => o.label(),
        };
        let eta = (st.ended.is_none() && rate > 0.0).then(|| bytes_total.saturating_sub(bytes_done) as f64 / rate);
        let elapsed = st.ended.map_or_else(|| st.started.elapsed(), |(at, _)| at.duration_since(st.started));
        ProgressReport {
            workspace: self.workspace.clone(),
            kind: self.kind().label(),
            manifest: self.manifest_digest.to_string(),
            state,
            layers_done: st.layers.iter().filter(|l| l.state == LayerState::Done).count(),
            layers_total: st.layers.len(),
            layers: st.layers.clone(),
            bytes_done,
            bytes_total,
            bytes_per_second: rate,
            eta_seconds: eta,
            elapsed_seconds: elapsed.as_secs_f64(),
        }
    }

    fn sample(&self) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let done = st.bytes_done();
        st.samples.push_back((now, done));
        while st.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            st.samples.pop_front();
        }
    }
}

/// Prefetches, warm-ups and their progress.
pub struct Prefetcher {
    config: PrefetchConfig,
    store: Option<LocalStore>,
    fills: Arc<Fills>,
    metrics: PrefetchMetrics,
    jobs: Mutex<HashMap<WsKey, Arc<Job>>>,
}

impl Prefetcher {
    /// Prefetches into `store` through `fills` (the chain's).
    pub fn new(
        config: PrefetchConfig,
        store: Option<LocalStore>,
        fills: Arc<Fills>,
        metrics: PrefetchMetrics,
    ) -> Arc<Self> {
        Arc::new(Prefetcher { config, store, fills, metrics, jobs: Mutex::new(HashMap::new()) })
    }

    /// Whether a manifest GET starts a prefetch: parallelism above 0 and a local store.
    pub fn prefetches_on_manifest(&self) -> bool {
        self.config.parallelism > 0 && self.store.is_some()
    }

    /// A manifest or blob request of this workspace's image came: its prefetch is still wanted.
    pub fn touch(&self, provider: &str, id: &str) {
        let job = lock(&self.jobs).get(&(provider.to_string(), id.to_string())).cloned();
        if let Some(job) = job {
            lock(&job.state).last_request = Instant::now();
        }
    }

    /// A composed manifest was served by GET: start filling its layers, unless prefetch is
    /// off or this workspace's job already runs (or finished filling this composition).
    pub fn manifest_served(self: &Arc<Self>, provider: &str, id: &str, image: &Arc<ComposedImage>) {
        if !self.prefetches_on_manifest() {
            return;
        }
        if let Err(e) = self.start(provider, id, image, JobKind::Prefetch) {
            tracing::debug!(provider, id, error = %e, "no prefetch");
        }
    }

    /// Starts filling every layer of `image` into the local store (or takes over the running
    /// prefetch of the same composition). Returns at once; progress tells the rest.
    pub fn warm_up(self: &Arc<Self>, provider: &str, id: &str, image: &Arc<ComposedImage>) -> Result<()> {
        if self.store.is_none() {
            return Err(Error::Prefetch { reason: "warm-up needs a local store (registry.store)".into() });
        }
        self.start(provider, id, image, JobKind::Warmup)
    }

    /// The progress of this workspace's prefetch or warm-up, if one runs or ended lately.
    pub fn progress(&self, provider: &str, id: &str) -> Option<ProgressReport> {
        let job = lock(&self.jobs).get(&(provider.to_string(), id.to_string())).cloned()?;
        let expired = lock(&job.state).ended.is_some_and(|(at, _)| at.elapsed() > self.config.linger);
        (!expired).then(|| job.report())
    }

    fn start(self: &Arc<Self>, provider: &str, id: &str, image: &Arc<ComposedImage>, kind: JobKind) -> Result<()> {
        let key = (provider.to_string(), id.to_string());
        let mut jobs = lock(&self.jobs);
        if let Some(job) = jobs.get(&key) {
            let same = job.manifest_digest == image.manifest_digest;
            let (running, outcome) = {
                let st = lock(&job.state);
                (st.ended.is_none(), st.ended.map(|(_, o)| o))
            };
            if same && running {
                if kind == JobKind::Warmup {
                    job.warmup.store(true, Ordering::Release);
                }
                lock(&job.state).last_request = Instant::now();
                return Ok(());
            }
            if same && outcome == Some(Outcome::Done) && kind == JobKind::Prefetch {
                return Ok(());
            }
            // A newer composition (or a retry of one that did not finish): the old job's
            // layers are no longer what this workspace pulls.
            job.stop.cancel();
        }
        self.make_room(&mut jobs, &key)?;
        let layers = layer_list(image);
        let now = Instant::now();
        let job = Arc::new(Job {
            workspace: format!("{provider}/{id}"),
            manifest_digest: image.manifest_digest.clone(),
            warmup: AtomicBool::new(kind == JobKind::Warmup),
            stop: CancellationToken::new(),
            state: Mutex::new(JobState {
                layers: layers
                    .iter()
                    .map(|(digest, entry)| LayerProgress {
                        digest: digest.to_string(),
                        size: entry.size,
                        bytes_done: 0,
                        source: LayerSource::Pending,
                        state: LayerState::Pending,
                        error: None,
                    })
                    .collect(),
                started: now,
                last_request: now,
                ended: None,
                samples: VecDeque::new(),
            }),
        });
        jobs.insert(key, job.clone());
        drop(jobs);
        tracing::info!(workspace = %job.workspace, kind = kind.label(), layers = layers.len(), "prefetching a workspace image");
        tokio::spawn(self.clone().run(job, layers));
        Ok(())
    }

    /// Drops lingering reports past their time, then the oldest finished ones while the table
    /// is full; a table full of running jobs refuses a new one.
    fn make_room(&self, jobs: &mut HashMap<WsKey, Arc<Job>>, key: &WsKey) -> Result<()> {
        let linger = self.config.linger;
        jobs.retain(|k, j| k == key || lock(&j.state).ended.is_none_or(|(at, _)| at.elapsed() <= linger));
        while jobs.len() >= self.config.max_workspaces.max(1) && !jobs.contains_key(key) {
            let oldest = jobs
                .iter()
                .filter_map(|(k, j)| lock(&j.state).ended.map(|(at, _)| (at, k.clone())))
                .min_by_key(|(at, _)| *at)
                .map(|(_, k)| k);
            match oldest {
                Some(k) => {
                    jobs.remove(&k);
                }
                None => {
                    return Err(Error::Prefetch {
                        reason: format!("{} workspace images are being prefetched already", jobs.len()),
                    });
                }
            }
        }
        Ok(())
    }

    async fn run(self: Arc<Self>, job: Arc<Job>, layers: Vec<(Digest, BlobEntry)>) {
        let parallelism = if self.config.parallelism == 0 { DEFAULT_PARALLELISM } else { self.config.parallelism };
        let work = futures::stream::iter(layers.into_iter().enumerate())
            .map(|(i, (digest, entry))| self.layer(&job, i, digest, entry))
            .buffer_unordered(parallelism)
            .collect::<Vec<bool>>();
        let outcome = tokio::select! {
            results = work => if results.iter().all(|ok| *ok) { Outcome::Done } else { Outcome::Failed },
            reason = self.watch(&job) => {
                tracing::info!(workspace = %job.workspace, %reason, "prefetch stopped");
                let reason = reason.to_string();
                let mut st = lock(&job.state);
                for l in st.layers.iter_mut().filter(|l| l.state != LayerState::Done) {
                    l.state = LayerState::Failed;
                    l.error = Some(reason.clone());
                }
                Outcome::Stopped
            }
        };
        let kind = job.kind();
        lock(&job.state).ended = Some((Instant::now(), outcome));
        self.metrics.ended(kind, outcome);
        tracing::info!(workspace = %job.workspace, kind = kind.label(), outcome = outcome.label(), "prefetch ended");
    }

    /// Samples the rate; returns why the job must stop: nobody pulls (prefetch only), a newer
    /// job replaced it, or its deadline passed.
    async fn watch(&self, job: &Job) -> String {
        let started = Instant::now();
        loop {
            tokio::select! {
                () = job.stop.cancelled() => return "replaced by a newer composition of the workspace".into(),
                () = tokio::time::sleep(TICK) => {}
            }
            job.sample();
            let idle = lock(&job.state).last_request.elapsed();
            if job.kind() == JobKind::Prefetch && idle > self.config.idle_timeout {
                return format!("no request for this image for {:?}: its pull went away", self.config.idle_timeout);
            }
            if started.elapsed() > self.config.warmup_deadline {
                return format!("not done after {:?}", self.config.warmup_deadline);
            }
        }
    }

    /// Makes one layer available; false if it failed.
    async fn layer(&self, job: &Job, i: usize, digest: Digest, entry: BlobEntry) -> bool {
        let size = entry.size;
        let done = |source| {
            job.update(i, |l| {
                l.source = source;
                l.state = LayerState::Done;
                l.bytes_done = size;
            })
        };
        let from = match &entry.origin {
            BlobOrigin::Bytes(_) => {
                done(LayerSource::Memory);
                return true;
            }
            BlobOrigin::Stored => {
                done(LayerSource::Store);
                return true;
            }
            BlobOrigin::Remote { .. } => {
                done(LayerSource::Remote);
                return true;
            }
            BlobOrigin::Upstream(from) => from,
        };
        match self.stored(&digest, size, from).await {
            Ok(true) => {
                done(LayerSource::Store);
                return true;
            }
            Ok(false) => {}
            Err(e) => {
                job.update(i, |l| {
                    l.state = LayerState::Failed;
                    l.error = Some(e.to_string());
                });
                return false;
            }
        }
        job.update(i, |l| {
            l.source = LayerSource::Upstream;
            l.state = LayerState::Running;
        });
        let result = self.follow_fill(job, i, &digest, &entry, from).await;
        match result {
            Ok(source) => {
                done(source);
                self.metrics.bytes.with_label_values(&[job.kind().label()]).inc_by(size);
                true
            }
            Err(reason) => {
                job.update(i, |l| {
                    l.state = LayerState::Failed;
                    l.error = Some(reason);
                });
                false
            }
        }
    }

    /// Whether the store holds the layer and may serve it to images naming `from` (the same
    /// checks a blob request makes, so a prefetch never counts another tenant's copy as done).
    async fn stored(&self, digest: &Digest, size: u64, from: &UpstreamBlob) -> Result<bool> {
        let Some(store) = &self.store else { return Ok(false) };
        match store.open_blob(digest, size)? {
            Some(blob) => Ok(self.fills.origin_holds(from, digest, &blob.file, size).await),
            None => Ok(false),
        }
    }

    /// Joins (or starts) the layer's fill and follows it to its end without reading: holding
    /// the fill keeps it going for the client's requests to join.
    async fn follow_fill(
        &self,
        job: &Job,
        i: usize,
        digest: &Digest,
        entry: &BlobEntry,
        from: &UpstreamBlob,
    ) -> std::result::Result<LayerSource, String> {
        let (fill, _started) =
            self.fills.join(digest, entry.size, &entry.media_type, from).map_err(|e| e.to_string())?;
        let source = |fill: &crate::blobs::fill::Fill| {
            if fill.came_from_cluster() { LayerSource::Cluster } else { LayerSource::Upstream }
        };
        let mut progress = fill.progress();
        loop {
            let now = progress.borrow_and_update().clone();
            match now {
                Progress::Running { written, .. } => job.update(i, |l| {
                    l.bytes_done = written;
                    l.source = source(&fill);
                }),
                Progress::Verified => return Ok(source(&fill)),
                Progress::Failed(reason) => return Err(reason.to_string()),
            }
            if progress.changed().await.is_err() {
                return match &*progress.borrow() {
                    Progress::Verified => Ok(source(&fill)),
                    Progress::Failed(reason) => Err(reason.to_string()),
                    Progress::Running { .. } => Err("the fill ended without verifying the blob".into()),
                };
            }
        }
    }
}

/// The image's layers in manifest order, with their index entries (the config is not a layer:
/// it is served from memory).
fn layer_list(image: &ComposedImage) -> Vec<(Digest, BlobEntry)> {
    let order: Vec<Digest> = match ParsedManifest::parse(&image.manifest, Some(&image.media_type)) {
        Ok(ParsedManifest::Image(m)) => m.layers.into_iter().map(|d| d.digest).collect(),
        _ => Vec::new(),
    };
    order.into_iter().filter_map(|d| image.blobs.get(&d).cloned().map(|e| (d, e))).collect()
}

#[cfg(test)]
mod tests;
