//! Cluster-wide single-flight, the fill's side: one upstream download per cluster instead of one
//! per node (README, "Cluster cache").
//!
//! Before a fill goes to its origin (the cluster index had nothing), it claims the Redis lease of
//! (digest, origin) (`cluster/lease.rs`):
//! - **acquired**: this node downloads; the lease is renewed while the fill runs and released
//!   when it ends, and other nodes stream from this fill through the peer listener;
//! - **held by another node**: the fill streams the blob from the holder (or from a follower of
//!   it that has a prefix and capacity) over `GET /peer/v1/blobs/<digest>` into its own spool,
//!   exactly like the IPFS source: the digest is verified over the whole spool as always;
//! - **the peer failed** (unreachable, refused, stalled, its body broke or ended early): the
//!   follower claims again naming the failed peer, and takes the lease over if it still names
//!   it (`lease.rs`). Of the followers of a dead holder the first to ask becomes the holder and
//!   goes on from the origin at its offset; the others follow it from theirs. Every spool
//!   starts at byte 0 (a follower copies the prefix too), so any node's fill serves any offset
//!   once it gets there. At most [`MAX_ROUNDS`] claims after a failure, then the origin alone;
//! - **the peer is too slow**, or every candidate is busy: the fill goes on from the origin at
//!   the byte offset reached, without a lease (the holder is alive and keeps it);
//! - **unavailable** (Redis down, breaker open): the fill downloads as it did before leases.
//!
//! A node serves peers only from a fill of the same (digest, origin) already running or from a
//! stored blob that origin delivered to it, never by starting a fill, and at most
//! `max_followers` at a time (503 to more), so a hundred nodes spread over the holder and the
//! followers that registered themselves as sources.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use facade_oci::{Digest, RepoName};
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::{Fills, Run, UpstreamBlob};
use crate::blobs::chain::BlobStream;
use crate::blobs::read::{Progress, file_range_stream};
use crate::cluster::ClusterMetrics;
use crate::cluster::lease::{Claim, Lease, Leases};
use crate::error::{Error, Result};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Peers a follower tries (the holder, then registered sources) before it goes upstream.
const MAX_CANDIDATES: usize = 8;

/// Claims after a peer failed before a follower goes to the origin on its own: the holder that
/// took over may die too, but a node must not wait out a cluster that keeps losing nodes.
const MAX_ROUNDS: usize = 3;

/// Claims again after every candidate answered busy. In a herd released at once every
/// follower asks the holder first and the holder serves only `peerMaxFollowers`; the others
/// found no source yet (a follower registers as one with its first bytes, milliseconds later)
/// and went upstream: 3 of 7 followers in the bench's 8-node herd. Waiting a little for the
/// sources to appear costs milliseconds; another upstream download costs the layer again.
const BUSY_RETRIES: usize = 8;

/// The first wait after a busy answer; it doubles up to [`BUSY_MAX_DELAY`] (about 3 s in all).
const BUSY_FIRST_DELAY: std::time::Duration = std::time::Duration::from_millis(25);
const BUSY_MAX_DELAY: std::time::Duration = std::time::Duration::from_millis(800);

/// The path prefix of the peer endpoint.
pub const PEER_PATH: &str = "/peer/v1/blobs/";

/// Knobs of peer fetching and serving.
#[derive(Clone)]
pub struct PeerConfig {
    /// This node's peer URL (`http://host:port`), as other nodes reach its peer listener.
    pub me: String,
    /// The cluster secret every node sends as `Authorization: Bearer`.
    pub secret: String,
    /// Most peers this node serves at once; more get 503 and pick another source.
    pub max_followers: usize,
    /// Longest wait for a peer's response headers (its fill may still wait for its origin).
    pub header_timeout: Duration,
    /// No byte from a peer this long: the fill goes on from the origin.
    pub idle_timeout: Duration,
    /// A peer moving fewer bytes per second than this over `min_rate_window` is left for the
    /// origin.
    pub min_rate: u64,
    /// The window `min_rate` is measured over.
    pub min_rate_window: Duration,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("PeerConfig")
            .field("me", &self.me)
            .field("max_followers", &self.max_followers)
            .field("header_timeout", &self.header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("min_rate", &self.min_rate)
            .finish()
    }
}

impl PeerConfig {
    /// Defaults for a node reachable at `me`: 4 followers, 20 s for headers (a holder's
    /// response waits for its origin's), 10 s without a byte, at least 256 KiB/s over 10 s.
    pub fn new(me: impl Into<String>, secret: impl Into<String>) -> Self {
        PeerConfig {
            me: me.into(),
            secret: secret.into(),
            max_followers: 4,
            header_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(10),
            min_rate: 256 * 1024,
            min_rate_window: Duration::from_secs(10),
        }
    }
}

/// How a peer fetch ended (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerOutcome {
    /// The peer delivered the rest of the blob.
    Ok,
    /// It serves its maximum of followers (503).
    Busy,
    /// It has no fill or stored copy for this origin (404), or answered something else.
    Refused,
    /// It could not be reached or its body broke.
    Failed,
    /// It sent nothing for the idle timeout.
    Stalled,
    /// It moved less than the minimum rate.
    Slow,
}

impl PeerOutcome {
    fn label(self) -> &'static str {
        match self {
            PeerOutcome::Ok => "ok",
            PeerOutcome::Busy => "busy",
            PeerOutcome::Refused => "refused",
            PeerOutcome::Failed => "failed",
            PeerOutcome::Stalled => "stalled",
            PeerOutcome::Slow => "slow",
        }
    }
}

/// `registry_facade_peer_fetches_total{outcome}`, `registry_facade_peer_served_bytes_total`,
/// `registry_facade_cluster_leases_total{outcome}` (one per claim: `acquired`, `taken_over`
/// from a failed peer, `followed`, `unavailable`).
#[derive(Clone, Debug)]
pub struct PeerMetrics {
    fetches: IntCounterVec,
    served: IntCounter,
    leases: IntCounterVec,
}

impl PeerMetrics {
    /// Creates the metrics and registers them in `registry`, every label at zero.
    pub fn register(registry: &Registry) -> Result<Self> {
        let m = Self::new()?;
        for (name, c) in [
            ("registry_facade_peer_fetches_total", Box::new(m.fetches.clone()) as Box<dyn prometheus::core::Collector>),
            ("registry_facade_peer_served_bytes_total", Box::new(m.served.clone())),
            ("registry_facade_cluster_leases_total", Box::new(m.leases.clone())),
        ] {
            registry.register(c).map_err(|source| Error::Metrics { name, source })?;
        }
        Ok(m)
    }

    /// Metrics registered nowhere (tests).
    pub fn unregistered() -> Self {
        // The definitions are constants covered by the tests: construction cannot fail.
        #[allow(clippy::expect_used)]
        Self::new().expect("constant metric definitions are valid")
    }

    fn new() -> Result<Self> {
        let fetches = IntCounterVec::new(
            Opts::new("registry_facade_peer_fetches_total", "Blob fetches from another node's fill, by outcome"),
            &["outcome"],
        )
        .map_err(|source| Error::Metrics { name: "registry_facade_peer_fetches_total", source })?;
        let served = IntCounter::new("registry_facade_peer_served_bytes_total", "Blob bytes served to other nodes")
            .map_err(|source| Error::Metrics { name: "registry_facade_peer_served_bytes_total", source })?;
        let leases = IntCounterVec::new(
            Opts::new(
                "registry_facade_cluster_leases_total",
                "Download leases claimed before going upstream: acquired, taken_over (from a failed holder), followed (another node downloads) or unavailable (Redis)",
            ),
            &["outcome"],
        )
        .map_err(|source| Error::Metrics { name: "registry_facade_cluster_leases_total", source })?;
        for o in ["ok", "busy", "refused", "failed", "stalled", "slow"] {
            fetches.with_label_values(&[o]);
        }
        for o in ["acquired", "taken_over", "followed", "unavailable"] {
            leases.with_label_values(&[o]);
        }
        Ok(PeerMetrics { fetches, served, leases })
    }

    fn fetch(&self, outcome: PeerOutcome) {
        self.fetches.with_label_values(&[outcome.label()]).inc();
    }

    fn lease(&self, outcome: &str) {
        self.leases.with_label_values(&[outcome]).inc();
    }

    /// Count of one fetch outcome (tests).
    pub fn fetches_value(&self, outcome: &str) -> u64 {
        self.fetches.with_label_values(&[outcome]).get()
    }

    /// Count of one lease outcome (tests).
    pub fn leases_value(&self, outcome: &str) -> u64 {
        self.leases.with_label_values(&[outcome]).get()
    }

    /// Bytes served to peers (tests).
    pub fn served_value(&self) -> u64 {
        self.served.get()
    }
}

/// The peer side of a node: its leases, its client of other nodes, and its serving slots.
pub struct Peers {
    config: PeerConfig,
    leases: Arc<Leases>,
    client: HyperClient<HttpConnector, Body>,
    serving: Arc<AtomicUsize>,
    metrics: PeerMetrics,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("config", &self.config).finish()
    }
}

impl Peers {
    /// The peer side over `leases`, counting into `metrics`. Needs a tokio runtime.
    pub fn new(config: PeerConfig, leases: Arc<Leases>, metrics: PeerMetrics) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        http.set_nodelay(true);
        let client = HyperClient::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(http);
        Peers { config, leases, client, serving: Arc::new(AtomicUsize::new(0)), metrics }
    }

    /// The cluster secret peers must present.
    pub fn secret(&self) -> &str {
        &self.config.secret
    }

    /// Asks the peer at `url` for `digest` from byte `offset`. `Err`: why not.
    async fn open(
        &self,
        url: &str,
        digest: &Digest,
        origin: &str,
        size: u64,
        offset: u64,
    ) -> std::result::Result<BoxStream<'static, std::result::Result<Bytes, hyper::Error>>, PeerOutcome> {
        let uri =
            format!("{}{PEER_PATH}{digest}?origin={}&size={size}", url.trim_end_matches('/'), percent_encode(origin));
        let body: Body = BodyExt::boxed_unsync(Empty::new().map_err(|never: std::convert::Infallible| match never {}));
        let req = http::Request::get(&uri)
            .header(http::header::RANGE, format!("bytes={offset}-"))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.config.secret))
            .body(body)
            .map_err(|_| PeerOutcome::Failed)?;
        let resp = match tokio::time::timeout(self.config.header_timeout, self.client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!(peer = url, %digest, error = %e, "peer unreachable");
                return Err(PeerOutcome::Failed);
            }
            Err(_) => return Err(PeerOutcome::Stalled),
        };
        let status = resp.status();
        let range_ok = match status {
            http::StatusCode::PARTIAL_CONTENT => resp
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == format!("bytes {offset}-{}/{size}", size.saturating_sub(1))),
            http::StatusCode::OK => offset == 0,
            http::StatusCode::SERVICE_UNAVAILABLE => return Err(PeerOutcome::Busy),
            _ => false,
        };
        if !range_ok {
            tracing::debug!(peer = url, %digest, %status, "peer refused");
            return Err(PeerOutcome::Refused);
        }
        Ok(resp.into_body().into_data_stream().boxed())
    }
}

/// How following peers ended.
enum Followed {
    /// The spool is complete.
    Done,
    /// The peer at this URL failed; the lease is claimed again naming it.
    Lost(String),
    /// Every candidate was busy: claim again for fresh sources after a pause.
    Busy,
    /// The peer was too slow, or nobody could serve: the origin, without a lease.
    Alone,
}

/// What a node answers a peer.
pub enum PeerServe {
    /// The bytes from the asked offset to the end; the last one only once verified.
    Found {
        /// The blob's size.
        size: u64,
        /// The bytes.
        stream: BlobStream,
    },
    /// No fill of that (digest, origin) runs and no stored copy that origin delivered is here.
    NotFound,
    /// This node serves its maximum of peers now.
    Busy,
}

impl std::fmt::Debug for PeerServe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerServe::Found { size, .. } => write!(f, "Found({size})"),
            PeerServe::NotFound => f.write_str("NotFound"),
            PeerServe::Busy => f.write_str("Busy"),
        }
    }
}

/// One of a node's serving slots, held by the stream it serves.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `registry/repository` as a fill's origin.
fn parse_origin(origin: &str) -> Option<UpstreamBlob> {
    let (registry, repo) = origin.split_once('/')?;
    Some(UpstreamBlob { registry: registry.to_string(), repo: RepoName::parse(repo).ok()? })
}

/// Query-string encoding of an origin (`host:port/repo/name`): unreserved characters, `/` and
/// `:` as they are, anything else as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Fills {
    /// Turns cluster-wide single-flight on for this table (once; later calls are ignored).
    pub fn set_peers(&self, peers: Peers) {
        let _ = self.peers.set(peers);
    }

    /// The peer metrics, when peers are on.
    pub fn peer_metrics(&self) -> Option<&PeerMetrics> {
        self.peers.get().map(|p| &p.metrics)
    }

    /// The cluster metrics the fills count into (the leases count their Redis failures there).
    pub fn cluster_metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// Before the origin: claims the lease, or streams from the node holding it as far as it
    /// can, taking the lease over when that node fails. Returns the lease to hold until the
    /// fill ends. Fails only for what fails the fill (cancelled, more bytes than the blob's
    /// size).
    pub(super) async fn fill_from_peers(&self, run: &mut Run<'_>) -> Result<Option<Lease>> {
        let Some(peers) = self.peers.get() else { return Ok(None) };
        let (digest, origin) = (run.fill.digest.clone(), run.fill.origin.key());
        let mut claim = peers.leases.claim(&digest, &origin).await;
        let (mut busy, mut delay) = (0, BUSY_FIRST_DELAY);
        let (mut round, mut counted) = (0, None);
        while round <= MAX_ROUNDS {
            let (holder, sources) = match claim {
                Claim::Unavailable => {
                    peers.metrics.lease("unavailable");
                    return Ok(None);
                }
                Claim::Acquired(lease) if round == 0 => {
                    peers.metrics.lease("acquired");
                    tracing::debug!(%digest, origin, "download lease acquired; other nodes will stream from this fill");
                    return Ok(Some(lease));
                }
                Claim::Acquired(lease) => {
                    peers.metrics.lease("taken_over");
                    tracing::info!(
                        %digest, origin, offset = run.spool.accepted(),
                        "download lease taken over from a failed peer; going on from upstream, others follow"
                    );
                    return Ok(Some(lease));
                }
                Claim::Held { holder, sources } => (holder, sources),
            };
            // Once per claim of a round: asking again while peers are busy is the same claim.
            if counted != Some(round) {
                counted = Some(round);
                peers.metrics.lease("followed");
            }
            let candidates: Vec<String> = std::iter::once(holder).chain(sources).take(MAX_CANDIDATES).collect();
            let failed = match self.follow(peers, run, &candidates).await? {
                Followed::Done | Followed::Alone => return Ok(None),
                Followed::Busy if busy < BUSY_RETRIES => {
                    busy += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BUSY_MAX_DELAY);
                    claim = peers.leases.claim(&digest, &origin).await;
                    continue;
                }
                Followed::Busy => {
                    tracing::info!(%digest, "every peer stayed busy; downloading from upstream");
                    return Ok(None);
                }
                Followed::Lost(url) => url,
            };
            if round == MAX_ROUNDS {
                break;
            }
            round += 1;
            claim = peers.leases.take_over(&digest, &origin, &failed).await;
        }
        tracing::info!(%digest, offset = run.spool.accepted(), "peers kept failing; downloading from upstream");
        Ok(None)
    }

    /// Streams from the first candidate that answers, as far as it delivers.
    async fn follow(&self, peers: &Peers, run: &mut Run<'_>, candidates: &[String]) -> Result<Followed> {
        let (digest, origin, size) = (run.fill.digest.clone(), run.fill.origin.key(), run.fill.size);
        let mut all_busy = true;
        for (i, url) in candidates.iter().enumerate() {
            let offset = run.spool.accepted();
            let body = match peers.open(url, &digest, &origin, size, offset).await {
                Ok(body) => body,
                Err(outcome) => {
                    peers.metrics.fetch(outcome);
                    all_busy &= outcome == PeerOutcome::Busy;
                    // A holder that cannot serve (gone, restarted, its fill failed) is
                    // replaced; a source that cannot is skipped, the holder may still serve.
                    if i == 0 && outcome != PeerOutcome::Busy {
                        return Ok(Followed::Lost(url.clone()));
                    }
                    continue;
                }
            };
            run.answered();
            let outcome = self.copy_peer(peers, run, body).await?;
            peers.metrics.fetch(outcome);
            let followed = match outcome {
                PeerOutcome::Ok => return Ok(Followed::Done),
                PeerOutcome::Failed | PeerOutcome::Stalled | PeerOutcome::Refused => Followed::Lost(url.clone()),
                PeerOutcome::Slow | PeerOutcome::Busy => Followed::Alone,
            };
            let next = match followed {
                Followed::Lost(_) => "claiming its lease",
                _ => "going on from upstream at this offset",
            };
            tracing::info!(
                %digest, peer = %url, offset = run.spool.accepted(), outcome = outcome.label(),
                "peer could not deliver the blob; {next}"
            );
            return Ok(followed);
        }
        if all_busy {
            tracing::debug!(%digest, "every peer is busy; asking again for sources");
            return Ok(Followed::Busy);
        }
        tracing::info!(%digest, "no peer could serve the blob; downloading from upstream");
        Ok(Followed::Alone)
    }

    /// Copies a peer's body into the spool, registering this node as a source once it has a
    /// prefix.
    async fn copy_peer(
        &self,
        peers: &Peers,
        run: &mut Run<'_>,
        mut body: BoxStream<'static, std::result::Result<Bytes, hyper::Error>>,
    ) -> Result<PeerOutcome> {
        let size = run.fill.size;
        let mut registered = false;
        let mut window = (tokio::time::Instant::now(), run.spool.accepted());
        loop {
            match run.next(self, &mut body, peers.config.idle_timeout).await {
                Ok(Some(Ok(bytes))) => run.append(self, bytes).await?,
                Ok(Some(Err(_))) => return Ok(PeerOutcome::Failed),
                Ok(None) if run.spool.accepted() == size => return Ok(PeerOutcome::Ok),
                Ok(None) => return Ok(PeerOutcome::Failed),
                Err(Error::FillTimeout { .. }) => return Ok(PeerOutcome::Stalled),
                Err(e) => return Err(e),
            }
            if !registered && run.spool.accepted() > 0 {
                registered = true;
                let (leases, digest, origin) = (peers.leases.clone(), run.fill.digest.clone(), run.fill.origin.key());
                tokio::spawn(async move { leases.register_source(&digest, &origin).await });
            }
            let elapsed = window.0.elapsed();
            if elapsed >= peers.config.min_rate_window {
                let moved = run.spool.accepted() - window.1;
                if (moved as f64) < peers.config.min_rate as f64 * elapsed.as_secs_f64() {
                    return Ok(PeerOutcome::Slow);
                }
                window = (tokio::time::Instant::now(), run.spool.accepted());
            }
        }
    }

    /// Answers a peer asking for `digest` of `size` bytes as `origin` (`registry/repository`)
    /// delivers it, from byte `offset`: from a fill of the same (digest, origin) running here
    /// (followed as it grows; the last byte only once verified) or from a stored copy that
    /// origin delivered to this node. Never starts a fill.
    pub async fn serve_peer(&self, digest: &Digest, origin: &str, size: u64, offset: u64) -> PeerServe {
        let Some(peers) = self.peers.get() else { return PeerServe::NotFound };
        if offset >= size {
            return PeerServe::NotFound;
        }
        let Some(slot) = Slot::take(&peers.serving, peers.config.max_followers) else { return PeerServe::Busy };
        let running = self.table().get(digest).into_iter().flatten().filter_map(std::sync::Weak::upgrade).find(|f| {
            f.origin.key() == origin && f.size == size && !matches!(*f.progress.borrow(), Progress::Failed(_))
        });
        let stream = if let Some(fill) = running {
            if fill.answered().await.is_err() {
                return PeerServe::NotFound;
            }
            let (file, following) = (fill.file(), fill.following());
            file_range_stream(file, offset, size, size, Some(following), Some(Box::new((fill, slot))))
        } else {
            let Some(from) = parse_origin(origin) else { return PeerServe::NotFound };
            let Some(store) = &self.store else { return PeerServe::NotFound };
            if !self.vouched.holds(digest, &from) {
                return PeerServe::NotFound;
            }
            match store.open_blob(digest, size) {
                Ok(Some(blob)) => {
                    let guard: Box<dyn Send + Sync> = Box::new((blob.guard, slot));
                    file_range_stream(Arc::new(blob.file), offset, size, size, None, Some(guard))
                }
                _ => return PeerServe::NotFound,
            }
        };
        let served = peers.metrics.served.clone();
        let stream = stream.inspect(move |r| {
            if let Ok(b) = r {
                served.inc_by(b.len() as u64);
            }
        });
        PeerServe::Found { size, stream: Box::pin(stream) }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::AtomicUsize;

    use futures::TryStreamExt;
    use futures::future::BoxFuture;

    use super::*;
    use crate::blobs::fill::{FillConfig, Origin};
    use crate::cluster::lease::LeaseConfig;
    use crate::cluster::{BreakerConfig, ClusterMetrics, RedisConfig};
    use crate::store::LocalStore;

    const SIZE: usize = 3 << 20;

    /// An origin that sends the first MiB at once and the rest once `gate` has a permit.
    struct Gated {
        data: Bytes,
        gate: Arc<tokio::sync::Semaphore>,
        opens: AtomicUsize,
    }

    impl Origin for Gated {
        fn open<'a>(
            &'a self,
            _from: &'a UpstreamBlob,
            _digest: &'a Digest,
            offset: u64,
        ) -> BoxFuture<'a, facade_upstream::Result<facade_upstream::BlobStream>> {
            self.opens.fetch_add(1, Ordering::SeqCst);
            let rest = self.data.slice(offset as usize..);
            let split = rest.len().min(1 << 20);
            let (head, tail, gate) = (rest.slice(..split), rest.slice(split..), self.gate.clone());
            let body = futures::stream::once(async move { Ok(head) })
                .chain(futures::stream::once(async move {
                    let _ = gate.acquire().await;
                    Ok(tail)
                }))
                .boxed();
            Box::pin(async move { Ok(facade_upstream::BlobStream { total_size: Some(SIZE as u64), offset, body }) })
        }
    }

    fn origin(name: &str) -> UpstreamBlob {
        UpstreamBlob { registry: "registry.test".into(), repo: RepoName::parse(name).unwrap() }
    }

    async fn collect(s: BlobStream) -> std::io::Result<Vec<u8>> {
        s.try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
    }

    /// Fills over a store and the gated origin, peers on with `max_followers`; the leases point
    /// at a Redis that is not there (port 1), so every fill downloads from the origin.
    fn setup(dir: &std::path::Path, max_followers: usize) -> (Arc<Fills>, Arc<Gated>, Bytes, Digest) {
        let data = Bytes::from((0..SIZE).map(|i| (i * 13 % 251) as u8).collect::<Vec<u8>>());
        let digest = Digest::sha256_of(&data);
        let gated = Arc::new(Gated {
            data: data.clone(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            opens: AtomicUsize::new(0),
        });
        let store = LocalStore::open(&dir.join("store")).unwrap();
        let config = FillConfig { spool_dir: dir.join("spool"), ..FillConfig::default() };
        let fills =
            Fills::with_origin(config, Some(store), gated.clone(), None, ClusterMetrics::unregistered()).unwrap();
        let leases = Leases::new(
            LeaseConfig {
                redis: RedisConfig::new("127.0.0.1:1"),
                ttl: Duration::from_secs(15),
                me: "http://me:1".into(),
                breaker: BreakerConfig::default(),
            },
            &ClusterMetrics::unregistered(),
        )
        .unwrap();
        let mut config = PeerConfig::new("http://me:1", "secret-of-sixteen-chars");
        config.max_followers = max_followers;
        fills.set_peers(Peers::new(config, leases, PeerMetrics::unregistered()));
        (fills, gated, data, digest)
    }

    #[tokio::test]
    async fn serves_a_running_fill_of_the_same_origin_only_and_never_starts_one() {
        let dir = tempfile::tempdir().unwrap();
        let (fills, gated, data, digest) = setup(dir.path(), 4);
        let size = SIZE as u64;
        // Nothing runs, nothing is stored: not found, and the origin is not asked.
        assert!(matches!(fills.serve_peer(&digest, "registry.test/team/app", size, 0).await, PeerServe::NotFound));
        assert_eq!(gated.opens.load(Ordering::SeqCst), 0);
        assert_eq!(fills.inflight(), 0);

        let (fill, _) = fills.join(&digest, size, "application/octet-stream", &origin("team/app")).unwrap();
        let PeerServe::Found { stream, .. } = fills.serve_peer(&digest, "registry.test/team/app", size, 1000).await
        else {
            panic!("the running fill is not served");
        };
        // Another origin of the same digest, or another size claim: never this fill.
        assert!(matches!(fills.serve_peer(&digest, "registry.test/other/app", size, 0).await, PeerServe::NotFound));
        assert!(matches!(fills.serve_peer(&digest, "registry.test/team/app", size + 1, 0).await, PeerServe::NotFound));
        let reading = tokio::spawn(collect(stream));
        gated.gate.add_permits(1);
        assert_eq!(reading.await.unwrap().unwrap(), data[1000..]);
        drop(fill);
        // Redis is not there: the fill went without a lease, as before leases existed.
        assert_eq!(fills.peer_metrics().unwrap().leases_value("unavailable"), 1);
        assert_eq!(fills.peer_metrics().unwrap().served_value(), size - 1000);

        // Stored now, delivered by team/app: served to a peer naming team/app, not another origin.
        test_support::wait::until_async("the fill to end", Duration::from_secs(10), || async { fills.inflight() == 0 })
            .await;
        let PeerServe::Found { stream, .. } = fills.serve_peer(&digest, "registry.test/team/app", size, 0).await else {
            panic!("the stored blob is not served");
        };
        assert_eq!(collect(stream).await.unwrap(), data[..]);
        assert!(matches!(fills.serve_peer(&digest, "registry.test/other/app", size, 0).await, PeerServe::NotFound));
        assert_eq!(gated.opens.load(Ordering::SeqCst), 1, "a peer request went to the origin");
    }

    #[tokio::test]
    async fn a_node_serves_at_most_its_followers_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (fills, gated, data, digest) = setup(dir.path(), 1);
        let size = SIZE as u64;
        let (_fill, _) = fills.join(&digest, size, "application/octet-stream", &origin("team/app")).unwrap();
        let PeerServe::Found { stream, .. } = fills.serve_peer(&digest, "registry.test/team/app", size, 0).await else {
            panic!("not served");
        };
        assert!(matches!(fills.serve_peer(&digest, "registry.test/team/app", size, 0).await, PeerServe::Busy));
        drop(stream);
        let PeerServe::Found { stream, .. } = fills.serve_peer(&digest, "registry.test/team/app", size, 0).await else {
            panic!("the slot was not given back");
        };
        gated.gate.add_permits(1);
        assert_eq!(collect(stream).await.unwrap(), data[..]);
    }

    #[test]
    fn origins_survive_the_query_string() {
        let o = "registry.test:5000/team/app_1-x";
        assert_eq!(percent_encode(o), o);
        assert_eq!(percent_encode("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(parse_origin(o).map(|u| u.key()), Some(o.to_string()));
        assert!(parse_origin("no-repository").is_none());
    }
}
