//! Cluster-wide single-flight (README, "Cluster cache"): facades on different "nodes" (each
//! with its own store and peer listener) share a real `redis-server` holding the download
//! leases. Upstream is a real docker-registry behind a fault proxy that throttles every
//! connection and counts the requests that pass.
//!
//! Shown here: four nodes asking for one new 48 MiB layer at the same moment make one upstream
//! GET of it, and every node's bytes are right; the lease holder killed (a real process, SIGKILL)
//! in the middle of the download is replaced by one of its followers, which goes on from
//! upstream at its offset while the others stream from it: one more upstream GET, not one per
//! follower, and the right bytes everywhere. The leases work the same over a Redis Cluster and
//! through Sentinel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use e2e::Facade;
use e2e::http::request;
use serde_json::{Value, json};
use test_support::fault_proxy::{FaultProxy, Faults};
use test_support::image::{BuiltLayer, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::proc::{KillOnDrop, free_port, wait_for_tcp};
use test_support::redis::Redis;
use test_support::redis_ha::{MASTER_NAME, RedisCluster, RedisSentinel};
use test_support::registry::Registry;
use test_support::wait;

const MIB: u64 = 1 << 20;

struct World {
    _reg: Registry,
    upstream: FaultProxy,
    redis: Redis,
    dir: tempfile::TempDir,
    layer: BuiltLayer,
}

/// An upstream image with one new layer of `layer_size` incompressible bytes, served at most
/// `throttle` bytes/s per connection; Redis; the cluster secret in `peer-secret`.
fn world(layer_size: usize, throttle: u64) -> World {
    let reg = Registry::start().unwrap();
    let upstream = FaultProxy::start(reg.addr).unwrap();
    let layer = build_layer(&[FileEntry::file("ide.bin", e2e::noise(layer_size, 48))], LayerCompression::None);
    push_image(&reg, "ide:1", &ImageBuilder::new().layer(layer.clone()).build(), PushFormat::Oci).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let specs = json!({"ws": {"baseRef": format!("{}/ide:1", upstream.host())}});
    std::fs::write(dir.path().join("specs.json"), specs.to_string()).unwrap();
    std::fs::write(dir.path().join("peer-secret"), "cluster-secret-of-this-test\n").unwrap();
    upstream.set_faults(Faults { throttle_bytes_per_sec: Some(throttle), ..Faults::default() });
    World { _reg: reg, upstream, redis: Redis::start().unwrap(), dir, layer }
}

fn config(w: &World, name: &str, port: u16, metrics: String, peer: String) -> Value {
    let redis = json!({"enabled": true, "singleHostAddr": w.redis.host(), "username": "", "useTLS": false});
    config_over(name, port, metrics, peer, redis)
}

/// A node's configuration with `redis` as its `registry.redis` section.
fn config_over(name: &str, port: u16, metrics: String, peer: String, redis: Value) -> Value {
    json!({
        "registry": {
            "port": port,
            "fixedSpecFN": "specs.json",
            "store": format!("store-{name}"),
            "redis": redis,
        },
        "prometheusAddr": metrics,
        "facade": {
            "listenHost": "127.0.0.1",
            "upstreamReadTimeout": "3s",
            "peerAddr": peer,
            "peerSecretFile": "peer-secret",
            // The blob requests below decide when each node starts downloading.
            "prefetchParallelism": 0,
        },
    })
}

/// An in-process node on free ports.
fn node(w: &World, name: &str) -> Facade {
    Facade::start(&config(w, name, 0, "127.0.0.1:0".into(), "127.0.0.1:0".into()), w.dir.path()).unwrap()
}

/// A node that is a real process (so it can be killed), with its registry and metrics addresses.
fn process_node(w: &World, name: &str) -> (KillOnDrop, String, String) {
    let (port, metrics, peer) = (free_port(), free_port(), free_port());
    let cfg = config(w, name, port, format!("127.0.0.1:{metrics}"), format!("127.0.0.1:{peer}"));
    let path = w.dir.path().join(format!("config-{name}.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    let bin = test_support::cargo_bin::cargo_bin("registry-facade", "registry-facade").unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg(&path).env("RUST_LOG", "info");
    let proc = KillOnDrop::spawn("registry-facade", cmd, &w.dir.path().join(format!("{name}.log"))).unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_for_tcp(addr.parse().unwrap(), Duration::from_secs(120)).unwrap();
    (proc, addr, format!("127.0.0.1:{metrics}"))
}

fn blob_path(w: &World) -> String {
    format!("/v2/fixed/ws/blobs/{}", w.layer.digest)
}

/// The layer, pulled from the node at `addr`, must be whole and right.
fn pull_layer(addr: &str, path: &str, digest: &str, size: u64) {
    let got = e2e::stream::get(addr, path, &[], None).unwrap();
    assert_eq!(got.status, 200, "{addr}");
    assert_eq!((got.received, got.digest.as_str()), (size, digest), "{addr}: wrong bytes");
}

fn layer_gets(w: &World) -> usize {
    w.upstream.count_requests("GET", &w.layer.digest)
}

fn metric_at(admin: &str, series: &str) -> f64 {
    let text = String::from_utf8(request(admin, "GET", "/metrics", &[], b"").body).unwrap();
    test_support::metrics::series(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn metric(f: &Facade, series: &str) -> f64 {
    metric_at(&f.admin[0].to_string(), series)
}

/// Composes the workspace on every node first, so the blob requests below start together.
fn compose(addr: &str) {
    let r = request(
        addr,
        "GET",
        "/v2/fixed/ws/manifests/latest",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        b"",
    );
    assert_eq!(r.status, 200, "{addr}: {}", String::from_utf8_lossy(&r.body));
}

#[test]
fn four_nodes_asking_at_once_make_one_upstream_download() {
    const NODES: usize = 4;
    let w = world(48 * MIB as usize, 16 * MIB);
    let nodes: Vec<Facade> = (0..NODES).map(|i| node(&w, &format!("n{i}"))).collect();
    for n in &nodes {
        compose(&n.host());
    }
    let (digest, size) = (w.layer.digest.clone(), w.layer.size);
    let started = std::time::Instant::now();
    pull_at_once(&w, &nodes);
    let took = started.elapsed();
    assert_one_download(&w, &nodes);
    assert!(summed(&nodes, "registry_facade_peer_served_bytes_total") >= ((NODES - 1) as u64 * size) as f64);
    // Every node keeps its own verified copy: the next pull is local.
    let hex = digest.trim_start_matches("sha256:").to_string();
    wait::until("every node to store the layer", Duration::from_secs(30), || {
        (0..NODES).all(|i| w.dir.path().join(format!("store-n{i}/blobs/sha256/{hex}")).is_file())
    });
    eprintln!(
        "{NODES} nodes, one {size}-byte layer at 16 MiB/s per upstream connection: {} upstream GET, {} upstream bytes, {took:?}",
        layer_gets(&w),
        w.upstream.bytes_to_client()
    );
}

#[test]
fn a_herd_wider_than_the_fan_out_still_makes_one_upstream_download() {
    // Five nodes at once, each serving two followers at most: the holder answers two, the
    // other two find every candidate busy, and must wait for a follower with a prefix to
    // register as a source instead of going upstream themselves.
    const NODES: usize = 5;
    let w = world(32 * MIB as usize, 8 * MIB);
    let two = json!({"peerMaxFollowers": 2});
    let nodes: Vec<Facade> = (0..NODES).map(|i| node_with(&w, &format!("w{i}"), two.clone())).collect();
    for n in &nodes {
        compose(&n.host());
    }
    pull_at_once(&w, &nodes);
    assert_one_download(&w, &nodes);
}

/// Every node's client asks for the layer at the same moment (a barrier); every node's bytes
/// are checked.
fn pull_at_once(w: &World, nodes: &[Facade]) {
    let barrier = Arc::new(Barrier::new(nodes.len()));
    let (path, digest, size) = (blob_path(w), w.layer.digest.clone(), w.layer.size);
    let pulls: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (host, barrier, path, digest) = (n.host(), barrier.clone(), path.clone(), digest.clone());
            std::thread::spawn(move || {
                barrier.wait();
                pull_layer(&host, &path, &digest, size);
            })
        })
        .collect();
    for p in pulls {
        p.join().expect("a node's pull failed");
    }
}

/// One upstream GET of the layer: one node held the lease, every other one followed and
/// streamed the layer from a peer.
fn assert_one_download(w: &World, nodes: &[Facade]) {
    assert_eq!(layer_gets(w), 1, "upstream GETs of the layer: {:?}", w.upstream.requests());
    let followers = (nodes.len() - 1) as f64;
    assert_eq!(summed(nodes, r#"registry_facade_cluster_leases_total{outcome="acquired"}"#), 1.0);
    assert_eq!(summed(nodes, r#"registry_facade_cluster_leases_total{outcome="followed"}"#), followers);
    assert_eq!(summed(nodes, r#"registry_facade_peer_fetches_total{outcome="ok"}"#), followers);
}

/// A series summed over the nodes.
fn summed(nodes: &[Facade], series: &str) -> f64 {
    nodes.iter().map(|n| metric(n, series)).sum()
}

#[test]
fn a_follower_takes_over_when_the_lease_holder_is_killed() {
    const FOLLOWERS: usize = 3;
    let w = world(48 * MIB as usize, 8 * MIB);
    let (path, digest, size) = (blob_path(&w), w.layer.digest.clone(), w.layer.size);
    let (mut holder, holder_addr, holder_metrics) = process_node(&w, "holder");
    let followers: Vec<Facade> = (0..FOLLOWERS).map(|i| node(&w, &format!("f{i}"))).collect();
    compose(&holder_addr);
    for f in &followers {
        compose(&f.host());
    }
    // The holder's own client: it loses its connection when the holder dies.
    let holder_pull = {
        let (a, p) = (holder_addr.clone(), path.clone());
        std::thread::spawn(move || e2e::stream::get(&a, &p, &[], None))
    };
    wait::until("the holder to take the lease and download", Duration::from_secs(60), || {
        !w.redis.keys("registry-facade:lease:*").unwrap_or_default().is_empty()
            && w.upstream.bytes_to_client() > 4 * MIB
    });
    let pulls: Vec<_> = followers
        .iter()
        .map(|f| {
            let (host, path, digest) = (f.host(), path.clone(), digest.clone());
            std::thread::spawn(move || pull_layer(&host, &path, &digest, size))
        })
        .collect();
    // Every follower streams from the holder before it dies.
    wait::until("the followers to stream from the holder", Duration::from_secs(60), || {
        metric_at(&holder_metrics, "registry_facade_peer_served_bytes_total") > (FOLLOWERS as u64 * 16 * MIB) as f64
    });
    let before_kill = w.upstream.bytes_to_client();
    let gets_before_kill = layer_gets(&w);
    assert!(before_kill < size, "the holder finished before it was killed");
    holder.kill();
    for p in pulls {
        p.join().expect("a follower's pull failed after the holder died");
    }
    let _ = holder_pull.join();
    let after = w.upstream.bytes_to_client() - before_kill;
    // The followers went on from their offsets (about 16 MiB each, less what was still in
    // socket buffers): together they fetched far less than three layers.
    assert!(after < FOLLOWERS as u64 * (size - 8 * MIB), "followers re-downloaded from 0: {after}");
    assert!(layer_gets(&w) <= 1 + FOLLOWERS, "{:?}", w.upstream.requests());
    // One follower took the lease over and downloaded the rest; the others streamed from it.
    assert_eq!(layer_gets(&w) - gets_before_kill, 1, "upstream GETs after the kill: {:?}", w.upstream.requests());
    let sum = |series: &str| followers.iter().map(|f| metric(f, series)).sum::<f64>();
    assert_eq!(sum(r#"registry_facade_cluster_leases_total{outcome="taken_over"}"#), 1.0);
    assert_eq!(sum(r#"registry_facade_peer_fetches_total{outcome="ok"}"#), (FOLLOWERS - 1) as f64);
    // Every follower keeps its own verified copy.
    let hex = digest.trim_start_matches("sha256:").to_string();
    wait::until("every follower to store the layer", Duration::from_secs(30), || {
        (0..FOLLOWERS).all(|i| w.dir.path().join(format!("store-f{i}/blobs/sha256/{hex}")).is_file())
    });
    let broken: f64 = followers
        .iter()
        .map(|f| {
            metric(f, r#"registry_facade_peer_fetches_total{outcome="failed"}"#)
                + metric(f, r#"registry_facade_peer_fetches_total{outcome="stalled"}"#)
        })
        .sum();
    assert_eq!(broken, FOLLOWERS as f64, "each follower saw its peer break");
    eprintln!(
        "holder killed at {before_kill} upstream bytes; {FOLLOWERS} followers then fetched {after} bytes upstream in {} GETs",
        layer_gets(&w) - gets_before_kill
    );
}

/// In-process nodes with `facade` keys of their own on top of the common ones.
fn node_with(w: &World, name: &str, extra: Value) -> Facade {
    let mut cfg = config(w, name, 0, "127.0.0.1:0".into(), "127.0.0.1:0".into());
    if let (Value::Object(f), Value::Object(extra)) = (&mut cfg["facade"], extra) {
        f.extend(extra);
    }
    Facade::start(&cfg, w.dir.path()).unwrap()
}

fn sources(w: &World) -> usize {
    let keys = w.redis.keys("registry-facade:lease-sources:*").unwrap_or_default();
    keys.first().map_or(0, |k| {
        let raw = w.redis.command(&["ZCARD", k]).unwrap();
        raw.lines().next().unwrap().trim_start_matches(':').trim().parse().unwrap()
    })
}

#[test]
fn a_full_holder_sends_new_followers_to_followers_with_a_prefix() {
    // Every node serves one other at most: the second follower must read from the first, the
    // third from the second, and upstream still sees one download.
    let w = world(24 * MIB as usize, 4 * MIB);
    let one = json!({"peerMaxFollowers": 1});
    let nodes: Vec<Facade> = (0..4).map(|i| node_with(&w, &format!("c{i}"), one.clone())).collect();
    for n in &nodes {
        compose(&n.host());
    }
    let (path, digest, size) = (blob_path(&w), w.layer.digest.clone(), w.layer.size);
    let mut pulls = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let (host, p, d) = (n.host(), path.clone(), digest.clone());
        pulls.push(std::thread::spawn(move || pull_layer(&host, &p, &d, size)));
        if i == 0 {
            wait::until("the holder to take the lease", Duration::from_secs(60), || {
                !w.redis.keys("registry-facade:lease:*").unwrap_or_default().is_empty()
            });
        } else if i < nodes.len() - 1 {
            wait::until("the follower to register as a source", Duration::from_secs(60), || sources(&w) >= i);
        }
    }
    for p in pulls {
        p.join().expect("a node's pull failed");
    }
    assert_eq!(layer_gets(&w), 1, "upstream GETs of the layer: {:?}", w.upstream.requests());
    let sum = |series: &str| nodes.iter().map(|n| metric(n, series)).sum::<f64>();
    assert_eq!(sum(r#"registry_facade_peer_fetches_total{outcome="ok"}"#), 3.0);
    // The second follower was refused by the holder, the third by the holder and the first.
    assert_eq!(sum(r#"registry_facade_peer_fetches_total{outcome="busy"}"#), 3.0);
    for n in &nodes[1..] {
        assert!(metric(n, "registry_facade_peer_served_bytes_total") <= size as f64);
    }
}

#[test]
fn a_stalled_holder_is_left_for_upstream_at_the_offset_reached() {
    let w = world(24 * MIB as usize, 4 * MIB);
    // The holder's peer listener is reached through a proxy that goes silent after 3 MiB.
    let peer_port = free_port();
    let peer_proxy = FaultProxy::start(format!("127.0.0.1:{peer_port}").parse().unwrap()).unwrap();
    peer_proxy.set_faults(Faults { stall_after: Some(3 * MIB), ..Faults::default() });
    let mut holder_cfg = config(&w, "h", 0, "127.0.0.1:0".into(), format!("127.0.0.1:{peer_port}"));
    holder_cfg["facade"]["peerAdvertiseAddr"] = json!(peer_proxy.host());
    let holder = Facade::start(&holder_cfg, w.dir.path()).unwrap();
    let follower = node(&w, "f");
    compose(&holder.host());
    compose(&follower.host());
    let (path, digest, size) = (blob_path(&w), w.layer.digest.clone(), w.layer.size);
    let holder_pull = {
        let (h, p, d) = (holder.host(), path.clone(), digest.clone());
        std::thread::spawn(move || pull_layer(&h, &p, &d, size))
    };
    wait::until("the holder to take the lease", Duration::from_secs(60), || {
        !w.redis.keys("registry-facade:lease:*").unwrap_or_default().is_empty()
    });
    let started = std::time::Instant::now();
    pull_layer(&follower.host(), &path, &digest, size);
    holder_pull.join().expect("the holder's pull failed");
    assert_eq!(metric(&follower, r#"registry_facade_peer_fetches_total{outcome="stalled"}"#), 1.0);
    // The follower took the lease over from the silent holder (which still downloads).
    assert_eq!(metric(&follower, r#"registry_facade_cluster_leases_total{outcome="taken_over"}"#), 1.0);
    // One download by the holder, one ranged by the follower from where the peer went silent.
    assert_eq!(layer_gets(&w), 2, "{:?}", w.upstream.requests());
    assert!(w.upstream.bytes_to_client() < 2 * size - 2 * MIB, "the follower started over");
    eprintln!("follower of a stalled holder done in {:?}", started.elapsed());
}

/// Three nodes over the Redis whose `registry.redis` section is `redis` ask for one layer at
/// once: one upstream GET, one lease acquired, the right bytes everywhere.
fn one_download_over(w: &World, redis: &Value) {
    const NODES: usize = 3;
    let nodes: Vec<Facade> = (0..NODES)
        .map(|i| {
            let cfg = config_over(&format!("t{i}"), 0, "127.0.0.1:0".into(), "127.0.0.1:0".into(), redis.clone());
            Facade::start(&cfg, w.dir.path()).unwrap()
        })
        .collect();
    for n in &nodes {
        compose(&n.host());
    }
    pull_at_once(w, &nodes);
    assert_one_download(w, &nodes);
    assert_eq!(summed(&nodes, r#"registry_facade_cluster_leases_total{outcome="unavailable"}"#), 0.0);
}

#[test]
fn one_download_per_cluster_over_a_redis_cluster() {
    let w = world(16 * MIB as usize, 8 * MIB);
    let cluster = RedisCluster::start(3).unwrap();
    one_download_over(&w, &json!({"enabled": true, "clusterAddresses": cluster.seeds()}));
    // The released lease is gone; its sources stay beside it, in the lease's slot.
    wait::until("the lease to be released", Duration::from_secs(10), || {
        cluster.keys("registry-facade:lease:*").is_ok_and(|k| k.is_empty())
    });
    assert_eq!(cluster.nodes_holding("registry-facade:lease-sources:*"), 1);
}

#[test]
fn one_download_per_cluster_through_sentinel() {
    let w = world(16 * MIB as usize, 8 * MIB);
    let sentinel = RedisSentinel::start(3).unwrap();
    let redis =
        json!({"enabled": true, "sentinel": {"masterName": MASTER_NAME, "addresses": sentinel.sentinel_addrs()}});
    one_download_over(&w, &redis);
    assert_eq!(sentinel.keys("registry-facade:lease-sources:*").unwrap().len(), 1);
}
