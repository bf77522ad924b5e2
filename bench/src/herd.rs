//! The herd (issue #12, "Fleet scale"; `docs/scale.md`): N nodes asking for one new layer at the
//! same moment, as on the release day of an IDE image. Once as a facade cluster (N facade
//! processes, each with its own store and peer listener, sharing one real `redis-server` for the
//! download leases), once as N distribution pull-through caches, each system behind its own
//! "remote" upstream (`rate_proxy.rs`, the first-pull section's per-connection rate) with a
//! request-counting proxy in front of it. Measured per system: upstream bytes as a multiple of
//! the layer, upstream connections and blob GETs, time from the release to the first and to the
//! last node's last body byte; every node's bytes are hashed, and a wrong one fails the bench.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::json;
use test_support::fault_proxy::FaultProxy;
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::proc::{KillOnDrop, free_port, wait_for_tcp};
use test_support::redis::Redis;
use test_support::registry::Registry;

use crate::client;
use crate::rate_proxy::RateProxy;
use crate::systems::{self, WORKSPACE};

const MIB: u64 = 1 << 20;
/// The upstream repository and tag of the herd's image (a layer no other section pushes).
const REPO: &str = "herd";
const TAG: &str = "1";
/// `facade.peerMaxFollowers` of the nodes: the facade's default, set explicitly so the model's
/// F is the one the nodes run with.
pub const MAX_FOLLOWERS: usize = 4;
/// What a follower logs when every candidate refused it (`blobs/peer.rs`) and it downloads
/// from upstream without a lease.
const ALONE_LOG: &str = "no peer could serve the blob; downloading from upstream";
/// A facade on a loaded two-core machine can take a while to bind.
const START_WAIT: Duration = Duration::from_secs(60);

/// The herd's size and the remote's rate.
#[derive(Clone, Debug)]
pub struct Params {
    /// Nodes per system.
    pub nodes: usize,
    /// Layer payload, MiB.
    pub layer_mib: u64,
    /// Per-connection rate of the upstream, bytes per second.
    pub rate: u64,
}

impl Params {
    /// Eight nodes, a 64 MiB layer (16 MiB with `--quick`), 24 MiB/s per upstream connection
    /// (the first-pull section's "remote").
    pub fn new(quick: bool) -> Params {
        Params { nodes: 8, layer_mib: if quick { 16 } else { 64 }, rate: 24 * MIB }
    }
}

/// Lease and peer counters of the facade cluster, summed over its nodes' `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct ClusterCounters {
    /// `registry_facade_cluster_leases_total{outcome="acquired"}`.
    pub acquired: f64,
    /// `registry_facade_cluster_leases_total{outcome="followed"}`.
    pub followed: f64,
    /// `registry_facade_cluster_leases_total{outcome="unavailable"}` (Redis not answering: the
    /// node went to upstream on its own).
    pub unavailable: f64,
    /// `registry_facade_peer_fetches_total{outcome="ok"}`.
    pub peer_ok: f64,
    /// `registry_facade_peer_fetches_total{outcome="busy"}`: a source at `peerMaxFollowers`
    /// refused, the node asked the next source.
    pub peer_busy: f64,
    /// `registry_facade_peer_fetches_total` of every other outcome (refused, failed, stalled,
    /// slow).
    pub peer_other: f64,
    /// `registry_facade_peer_served_bytes_total`.
    pub peer_served_bytes: f64,
    /// Nodes whose log says no candidate could serve and they went to upstream without a lease
    /// (`blobs/peer.rs`: every candidate busy).
    pub alone: usize,
}

/// What one system did with the herd.
#[derive(Clone, Debug, Default)]
pub struct SystemHerd {
    /// Bytes the rate-limited upstream sent during the herd.
    pub upstream_bytes: u64,
    /// Connections the rate-limited upstream accepted during the herd.
    pub upstream_connections: u64,
    /// Upstream `GET …/blobs/<layer>` requests during the herd.
    pub blob_gets: usize,
    /// Release → the first node's last body byte.
    pub first: Duration,
    /// Release → the last node's last body byte.
    pub last: Duration,
    /// Release → each node's last body byte, seconds, in node order (failed nodes left out).
    pub per_node: Vec<f64>,
    /// Nodes whose pull failed, with why.
    pub failures: Vec<String>,
    /// The facade cluster's lease and peer counters.
    pub cluster: Option<ClusterCounters>,
}

/// The herd row.
#[derive(Clone, Debug)]
pub struct Herd {
    /// Nodes per system.
    pub nodes: usize,
    /// The layer blob's size, bytes.
    pub layer_size: u64,
    /// Per-connection upstream rate, bytes per second.
    pub rate: u64,
    /// The facade cluster (`Err`: why it has no figures).
    pub facade: Result<SystemHerd, String>,
    /// N distribution pull-through caches (`Err`: why they have no figures).
    pub dist: Result<SystemHerd, String>,
    /// One client alone on the upstream through the same kind of remote: S / b_u as this
    /// machine realizes it (`Err`: why it has no figures).
    pub direct: Result<SystemHerd, String>,
}

impl Herd {
    /// `docs/scale.md`'s S / min(b_u, b_p / F), seconds: loopback's b_p is GB/s, so b_u decides.
    pub fn model_download(&self) -> f64 {
        self.layer_size as f64 / self.rate as f64
    }

    /// `docs/scale.md`'s d = ⌈log_F(N)⌉, the levels below the holder.
    pub fn model_depth(&self) -> u32 {
        let (mut reach, mut d) = (1usize, 0u32);
        while reach < self.nodes {
            reach = reach.saturating_mul(MAX_FOLLOWERS);
            d += 1;
        }
        d
    }
}

/// The whole row. `Err` inside: the row has no figures (no Redis, a push that failed); `Err`
/// outside: a node served a wrong byte, which fails the bench.
pub fn run(
    upstream: &Registry,
    bin: &Path,
    p: &Params,
    verified: &mut Vec<String>,
) -> anyhow::Result<Result<Herd, String>> {
    if !Redis::available() {
        return Ok(Err("redis-server is not installed".into()));
    }
    tracing::info!(mib = p.layer_mib, nodes = p.nodes, "herd: building and pushing a new layer");
    let built =
        build_layer(&[FileEntry::file("herd.bin", crate::noise(p.layer_mib * MIB, 12))], LayerCompression::None);
    let (layer, layer_size) = (built.digest.clone(), built.size);
    let image = ImageBuilder::new().layer(built).build();
    // OCI keeps the layer byte for byte (no recompression on push).
    if let Err(e) = push_image(upstream, &format!("{REPO}:{TAG}"), &image, PushFormat::Oci) {
        return Ok(Err(format!("pushing {REPO}:{TAG}: {e:#}")));
    }
    drop(image);
    let target = Target { upstream: upstream.addr, layer: &layer, size: layer_size, rate: p.rate, nodes: p.nodes };

    tracing::info!("herd: one client alone on the remote upstream");
    let direct = match direct_pull(&target) {
        Ok(released) => Ok(released.check(&target, "herd: one client on the upstream", verified)?),
        Err(e) => Err(format!("{e:#}")),
    };
    tracing::info!("herd: {} facades sharing one Redis", p.nodes);
    let facade = match facade_cluster(&target, bin) {
        Ok(released) => Ok(released.check(&target, "herd: facade cluster", verified)?),
        Err(e) => Err(format!("{e:#}")),
    };
    tracing::info!("herd: {} distribution pull-through caches", p.nodes);
    let dist = match dist_caches(&target) {
        Ok(released) => Ok(released.check(&target, "herd: distribution caches", verified)?),
        Err(e) => Err(format!("{e:#}")),
    };
    Ok(Ok(Herd { nodes: p.nodes, layer_size, rate: p.rate, facade, dist, direct }))
}

/// The layer and where it lives.
struct Target<'a> {
    upstream: SocketAddr,
    layer: &'a str,
    size: u64,
    rate: u64,
    nodes: usize,
}

/// A fresh rate-limited upstream for one system, counted twice: connections and bytes by the
/// rate proxy, request lines by the counting proxy in front of it (every connection of the
/// system goes through both, one for one).
struct Remote {
    rate: RateProxy,
    counter: FaultProxy,
}

impl Remote {
    fn start(t: &Target<'_>) -> anyhow::Result<Remote> {
        let rate = RateProxy::start(t.upstream, t.rate).context("rate proxy")?;
        let counter = FaultProxy::start(rate.addr).context("counting proxy")?;
        Ok(Remote { rate, counter })
    }

    /// What the systems are configured with.
    fn host(&self) -> String {
        self.counter.host()
    }

    fn mark(&self) -> (u64, u64) {
        self.counter.reset_counters();
        (self.rate.bytes_to_client(), self.rate.connections())
    }
}

/// Every node's pull, the upstream's counts over them and the cluster's counters.
struct Released {
    /// Per node: release → its last body byte, and the pull; or why it failed.
    pulls: Vec<Result<(Duration, client::Pull), String>>,
    upstream_bytes: u64,
    upstream_connections: u64,
    blob_gets: usize,
    cluster: Option<ClusterCounters>,
}

impl Released {
    fn new(
        remote: &Remote,
        mark: (u64, u64),
        t: &Target<'_>,
        pulls: Vec<Result<(Duration, client::Pull), String>>,
    ) -> Released {
        Released {
            pulls,
            upstream_bytes: remote.rate.bytes_to_client() - mark.0,
            upstream_connections: remote.rate.connections() - mark.1,
            blob_gets: remote.counter.count_requests("GET", &format!("/blobs/{}", t.layer)),
            cluster: None,
        }
    }

    /// Every node's digest must be the layer's; the figures for the row.
    fn check(self, t: &Target<'_>, what: &str, verified: &mut Vec<String>) -> anyhow::Result<SystemHerd> {
        let mut s = SystemHerd {
            upstream_bytes: self.upstream_bytes,
            upstream_connections: self.upstream_connections,
            blob_gets: self.blob_gets,
            cluster: self.cluster,
            ..SystemHerd::default()
        };
        let (mut ok, total) = (0, self.pulls.len());
        for (i, pull) in self.pulls.into_iter().enumerate() {
            match pull {
                Ok((took, pull)) => {
                    let got = pull.digest.as_deref().unwrap_or("(not hashed)");
                    ensure!(got == t.layer, "{what}: node {i} served {got}, the layer is {}", t.layer);
                    s.per_node.push(took.as_secs_f64());
                    ok += 1;
                }
                Err(e) => s.failures.push(format!("node {i}: {e}")),
            }
        }
        let (min, max) = s.per_node.iter().fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(*v), b.max(*v)));
        if ok > 0 {
            (s.first, s.last) = (Duration::from_secs_f64(min), Duration::from_secs_f64(max));
            verified.push(format!("{what} ({ok} of {total})"));
        }
        if let Some(first) = s.failures.first() {
            tracing::warn!("{what}: {} of {total} pulls failed, first: {first}", s.failures.len());
        }
        Ok(s)
    }
}

/// `n` clients, one per node, released together on the blob; each hashes what it gets. The
/// times run from the release (the first client past the barrier) to each last body byte.
fn release(addrs: &[SocketAddr], path: &str) -> Vec<Result<(Duration, client::Pull), String>> {
    let barrier = Barrier::new(addrs.len());
    let outs: Vec<(Instant, Instant, Result<client::Pull, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = addrs
            .iter()
            .map(|addr| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    let pull = client::pull(*addr, path, true).map_err(|e| format!("{e:#}"));
                    (started, Instant::now(), pull)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    let now = Instant::now();
                    (now, now, Err("the client thread panicked".into()))
                })
            })
            .collect()
    });
    let Some(released) = outs.iter().map(|(s, _, _)| *s).min() else { return Vec::new() };
    outs.into_iter().map(|(_, end, pull)| pull.map(|p| (end - released, p))).collect()
}

/// A client's manifest GET, which the systems answer before they serve the manifest's blobs (the
/// facade composes the workspace; distribution fetches the manifest).
fn prime(addr: SocketAddr, path: &str, t: &Target<'_>, log: impl Fn() -> String) -> anyhow::Result<()> {
    let m = client::small(addr, "GET", path)?;
    let manifest: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or_default();
    if m.status != 200 || manifest["layers"][0]["digest"] != t.layer {
        bail!("{addr}: manifest GET answered {} {}; log: {}", m.status, String::from_utf8_lossy(&m.body), log());
    }
    Ok(())
}

/// One facade process of the cluster: its own store, registry, peer and admin listeners.
struct Node {
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _proc: KillOnDrop,
}

impl Node {
    /// Starts node `i` with its config in `dir` (which holds the specs and the peer secret).
    fn start(bin: &Path, dir: &Path, i: usize, redis: &Redis) -> anyhow::Result<Node> {
        let log = dir.join(format!("node-{i}.log"));
        let mut last_err = None;
        // Ports are picked before the facade binds them; another process can win the race.
        for _ in 0..5 {
            let (port, peer, admin) = (free_port(), free_port(), free_port());
            // The key shape of tests/e2e/cluster_herd.rs; IPFS stays off (leases need Redis only).
            let cfg = json!({
                "registry": {
                    "port": port,
                    "fixedSpecFN": "specs.json",
                    "store": format!("store-{i}"),
                    "redis": {"enabled": true, "singleHostAddr": redis.host(), "username": "", "useTLS": false},
                },
                "prometheusAddr": format!("127.0.0.1:{admin}"),
                "facade": {
                    "listenHost": "127.0.0.1",
                    "peerAddr": format!("127.0.0.1:{peer}"),
                    "peerSecretFile": "peer-secret",
                    "peerMaxFollowers": MAX_FOLLOWERS,
                    // The released blob GETs decide when each node starts downloading, not the
                    // manifest GET before them.
                    "prefetchParallelism": 0,
                },
            });
            let cfg_path = dir.join(format!("config-{i}.json"));
            std::fs::write(&cfg_path, cfg.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.arg("run").arg(&cfg_path).env("RUST_LOG", "info");
            let mut proc = KillOnDrop::spawn(&format!("registry-facade node {i}"), cmd, &log)?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
            let peer: SocketAddr = ([127, 0, 0, 1], peer).into();
            let up = wait_for_tcp(addr, START_WAIT)
                .and_then(|()| proc.check_running())
                .and_then(|()| wait_for_tcp(peer, START_WAIT))
                .and_then(|()| wait_for_tcp(admin, START_WAIT));
            match up {
                Ok(()) => return Ok(Node { addr, admin, log, _proc: proc }),
                Err(e) => last_err = Some(anyhow::anyhow!("node {i}: {e:#}; log: {}", tail(&log))),
            }
            proc.kill();
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("node {i} did not start")))
    }

    fn log_tail(&self) -> String {
        tail(&self.log)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        client::admin(self.admin, "GET", "/metrics")
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_default()
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.get(text.len().saturating_sub(2000)..).unwrap_or("").to_string()
}

fn facade_cluster(t: &Target<'_>, bin: &Path) -> anyhow::Result<Released> {
    let redis = Redis::start().context("starting Redis")?;
    let remote = Remote::start(t)?;
    let dir = tempfile::Builder::new().prefix("bench-herd-").tempdir()?;
    let specs = json!({ WORKSPACE: {"baseRef": format!("{}/{REPO}:{TAG}", remote.host())} });
    std::fs::write(dir.path().join("specs.json"), specs.to_string())?;
    std::fs::write(dir.path().join("peer-secret"), "the-bench-herd-cluster-secret\n")?;
    let mut nodes = Vec::with_capacity(t.nodes);
    for i in 0..t.nodes {
        nodes.push(Node::start(bin, dir.path(), i, &redis)?);
    }
    for n in &nodes {
        prime(n.addr, &format!("/v2/fixed/{WORKSPACE}/manifests/latest"), t, || n.log_tail())?;
    }
    let mark = remote.mark();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let pulls = release(&addrs, &format!("/v2/fixed/{WORKSPACE}/blobs/{}", t.layer));
    let mut released = Released::new(&remote, mark, t, pulls);
    let mut c = ClusterCounters::default();
    for n in &nodes {
        let text = n.metrics();
        let v = |name: &str, labels: &[(&str, &str)]| test_support::metrics::value(&text, name, labels);
        c.acquired += v("registry_facade_cluster_leases_total", &[("outcome", "acquired")]);
        c.followed += v("registry_facade_cluster_leases_total", &[("outcome", "followed")]);
        c.unavailable += v("registry_facade_cluster_leases_total", &[("outcome", "unavailable")]);
        let fetches = v("registry_facade_peer_fetches_total", &[]);
        let ok = v("registry_facade_peer_fetches_total", &[("outcome", "ok")]);
        let busy = v("registry_facade_peer_fetches_total", &[("outcome", "busy")]);
        c.peer_ok += ok;
        c.peer_busy += busy;
        c.peer_other += fetches - ok - busy;
        c.peer_served_bytes += v("registry_facade_peer_served_bytes_total", &[]);
        c.alone += usize::from(n.log_text().contains(ALONE_LOG));
    }
    released.cluster = Some(c);
    // A failed node's log is what explains it.
    for (i, pull) in released.pulls.iter_mut().enumerate() {
        if let Err(e) = pull {
            e.push_str(&format!("; log: {}", nodes[i].log_tail()));
        }
    }
    // Above the layer plus its response heads, the leases did not hold: every node's log says
    // whether it acquired, followed, or went to upstream, and why.
    if released.upstream_bytes as f64 > 1.05 * t.size as f64 {
        for (i, n) in nodes.iter().enumerate() {
            tracing::warn!(
                "herd: upstream {} bytes for a {}-byte layer; node {i} log: {}",
                released.upstream_bytes,
                t.size,
                n.log_tail()
            );
        }
    }
    Ok(released)
}

/// The layer straight from a fresh remote, one client: the realized S / b_u.
fn direct_pull(t: &Target<'_>) -> anyhow::Result<Released> {
    let remote = Remote::start(t)?;
    let mark = remote.mark();
    let pulls = release(&[remote.counter.addr], &format!("/v2/{REPO}/blobs/{}", t.layer));
    Ok(Released::new(&remote, mark, t, pulls))
}

/// The distribution caches; each stopped before its directory goes (as in main.rs).
struct Caches(Vec<Registry>);

impl Drop for Caches {
    fn drop(&mut self) {
        for r in &mut self.0 {
            r.stop();
        }
    }
}

fn dist_caches(t: &Target<'_>) -> anyhow::Result<Released> {
    let remote = Remote::start(t)?;
    let mut caches = Caches(Vec::with_capacity(t.nodes));
    for _ in 0..t.nodes {
        caches.0.push(systems::start_distribution_proxy(&remote.host())?.0);
    }
    for c in &caches.0 {
        prime(c.addr, &format!("/v2/{REPO}/manifests/{TAG}"), t, || {
            let log = c.log();
            log.get(log.len().saturating_sub(2000)..).unwrap_or("").to_string()
        })?;
    }
    let mark = remote.mark();
    let addrs: Vec<SocketAddr> = caches.0.iter().map(|c| c.addr).collect();
    let pulls = release(&addrs, &format!("/v2/{REPO}/blobs/{}", t.layer));
    Ok(Released::new(&remote, mark, t, pulls))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn herd(nodes: usize) -> Herd {
        Herd {
            nodes,
            layer_size: 48 * MIB,
            rate: 24 * MIB,
            facade: Err(String::new()),
            dist: Err(String::new()),
            direct: Err(String::new()),
        }
    }

    #[test]
    fn model_depth_is_the_levels_below_the_holder() {
        assert_eq!(MAX_FOLLOWERS, 4);
        assert_eq!([1, 2, 4, 5, 8, 16, 17].map(|n| herd(n).model_depth()), [0, 1, 1, 2, 2, 2, 3]);
        assert_eq!(herd(8).model_download(), 2.0);
    }

    fn pull(digest: &str) -> client::Pull {
        client::Pull {
            bytes: 1,
            ttfb: Duration::ZERO,
            total: Duration::ZERO,
            last_byte_wait: Duration::ZERO,
            digest: Some(digest.into()),
        }
    }

    #[test]
    fn a_wrong_byte_on_any_node_fails_and_failed_pulls_are_counted() {
        let t = Target { upstream: ([127, 0, 0, 1], 1).into(), layer: "sha256:aa", size: 1, rate: 1, nodes: 3 };
        let released =
            |pulls| Released { pulls, upstream_bytes: 1, upstream_connections: 1, blob_gets: 1, cluster: None };
        let secs = Duration::from_secs;
        let mut verified = Vec::new();
        let ok = released(vec![Ok((secs(2), pull("sha256:aa"))), Err("cut".into()), Ok((secs(3), pull("sha256:aa")))])
            .check(&t, "herd", &mut verified)
            .unwrap();
        assert_eq!((ok.first, ok.last, ok.per_node.len(), ok.failures.len()), (secs(2), secs(3), 2, 1));
        assert_eq!(verified, ["herd (2 of 3)"]);
        let wrong = released(vec![Ok((secs(2), pull("sha256:aa"))), Ok((secs(2), pull("sha256:bb")))]);
        assert!(wrong.check(&t, "herd", &mut verified).is_err());
    }
}
