//! The cluster cache (README, "Blobs", source 2). Facades on different "nodes" (each with its own local store)
//! share a real `redis-server` (the index) and a real IPFS node (js-ipfs 0.66 speaking the Kubo
//! RPC API, the content). Upstream is a real docker-registry behind a fault proxy that counts
//! requests; IPFS sits behind a second fault proxy so its streams can be throttled.
//!
//! Shown here: a second node pulls an image another node pulled with zero upstream blob GETs;
//! Redis or IPFS killed in the middle of a pull does not fail it, and after a restart the cache
//! is used again; garbage in the cache never completes a wrong blob nor breaks a pull; a bounded
//! local store evicts and pulls still succeed.
//!
//! The index runs in each Redis mode the facade supports (README, "The cluster cache"): a single
//! `redis-server`, a Redis Cluster of three masters, and a master with a replica behind three
//! sentinels. The sharing scenarios run over each; a Sentinel failover under running pulls
//! loses no pull and keeps the index; pins follow the index (an expired entry's pin is removed
//! and the IPFS repository shrinks after its GC; a byte budget unpins the least recently used).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::Facade;
use e2e::http::request;
use serde_json::{Value, json};
use test_support::fault_proxy::{FaultProxy, Faults};
use test_support::image::{BuiltLayer, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::ipfs::Ipfs;
use test_support::redis::Redis;
use test_support::redis_ha::{MASTER_NAME, RedisCluster, RedisSentinel};
use test_support::registry::Registry;
use test_support::skopeo;
use test_support::wait;

const MIB: usize = 1 << 20;

/// Which Redis the index lives in.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Single,
    Cluster,
    Sentinel,
}

/// The index's Redis, in one of the modes.
enum Index {
    Single(Redis),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

impl Index {
    fn start(mode: Mode) -> Index {
        match mode {
            Mode::Single => Index::Single(Redis::start().unwrap()),
            Mode::Cluster => Index::Cluster(RedisCluster::start(3).unwrap()),
            Mode::Sentinel => Index::Sentinel(RedisSentinel::start(3).unwrap()),
        }
    }

    /// The facade's `registry.redis` section for this Redis.
    fn config(&self) -> Value {
        match self {
            Index::Single(r) => json!({"enabled": true, "singleHostAddr": r.host(), "username": "", "useTLS": false}),
            Index::Cluster(c) => json!({"enabled": true, "clusterAddresses": c.seeds()}),
            Index::Sentinel(s) => {
                json!({"enabled": true, "sentinel": {"masterName": MASTER_NAME, "addresses": s.sentinel_addrs()}})
            }
        }
    }

    fn keys(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        match self {
            Index::Single(r) => r.keys(pattern),
            Index::Cluster(c) => c.keys(pattern),
            Index::Sentinel(s) => s.keys(pattern),
        }
    }

    fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        match self {
            Index::Single(r) => r.command(args),
            Index::Cluster(c) => c.command(args),
            Index::Sentinel(s) => s.command(args),
        }
    }

    fn single(&mut self) -> &mut Redis {
        match self {
            Index::Single(r) => r,
            _ => panic!("this scenario kills a single Redis"),
        }
    }
}

struct World {
    _reg: Registry,
    upstream: FaultProxy,
    redis: Index,
    ipfs: Ipfs,
    ipfs_proxy: FaultProxy,
    dir: tempfile::TempDir,
    /// Workspace id → its upstream layers.
    layers: BTreeMap<&'static str, Vec<BuiltLayer>>,
}

/// An upstream with two images of incompressible layers (`ws1`: three, `ws2`: two, each
/// `layer_size` bytes of file content), a single Redis, and an IPFS node behind a proxy.
fn world(layer_size: usize) -> World {
    world_in(Mode::Single, layer_size)
}

/// The same, with the index in a Redis of `mode`.
fn world_in(mode: Mode, layer_size: usize) -> World {
    let reg = Registry::start().unwrap();
    let upstream = FaultProxy::start(reg.addr).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut layers = BTreeMap::new();
    let mut specs = serde_json::Map::new();
    for (ws, repo, seeds) in [("ws1", "app:1", &[11u64, 12, 13][..]), ("ws2", "app:2", &[21u64, 22][..])] {
        let mut b = ImageBuilder::new();
        let mut built = Vec::new();
        for &seed in seeds {
            let l = build_layer(
                &[FileEntry::file(format!("l{seed}.bin"), e2e::noise(layer_size, seed))],
                LayerCompression::None,
            );
            built.push(l.clone());
            b = b.layer(l);
        }
        push_image(&reg, repo, &b.build(), PushFormat::Oci).unwrap();
        specs.insert(ws.into(), json!({"baseRef": format!("{}/{repo}", upstream.host())}));
        layers.insert(ws, built);
    }
    std::fs::write(dir.path().join("specs.json"), Value::Object(specs).to_string()).unwrap();
    let redis = Index::start(mode);
    let ipfs = Ipfs::start().unwrap();
    let ipfs_proxy = FaultProxy::start(ipfs.api).unwrap();
    World { _reg: reg, upstream, redis, ipfs, ipfs_proxy, dir, layers }
}

/// A facade ("node") with its own store, sharing the world's Redis and IPFS.
fn node(w: &World, name: &str, facade_extra: Value) -> Facade {
    node_with_specs(w, name, "specs.json", facade_extra)
}

fn node_with_specs(w: &World, name: &str, specs: &str, facade_extra: Value) -> Facade {
    let mut facade = json!({"listenHost": "127.0.0.1", "upstreamReadTimeout": "3s"});
    if let (Value::Object(f), Value::Object(extra)) = (&mut facade, facade_extra) {
        f.extend(extra);
    }
    let cfg = json!({
        "registry": {
            "port": 0,
            "fixedSpecFN": specs,
            "store": format!("store-{name}"),
            "redis": w.redis.config(),
            "ipfs": {"enabled": true, "ipfsAddr": format!("/ip4/127.0.0.1/tcp/{}", w.ipfs_proxy.addr.port())},
        },
        "prometheusAddr": "127.0.0.1:0",
        "facade": facade,
    });
    Facade::start(&cfg, w.dir.path()).unwrap()
}

/// Pulls `ws` from the facade at `host` with skopeo and checks every blob against its digest
/// and the layers against `want` (the upstream image's).
fn pull_from(host: &str, ws: &str, want: &[String]) {
    let out = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_preserving_digests(&format!("{host}/fixed/{ws}:latest"), out.path(), "latest").unwrap();
    let img = skopeo::read_oci_layout(out.path(), "latest").unwrap();
    let got: Vec<&str> =
        img.manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap()).collect();
    assert_eq!(got, want.iter().map(String::as_str).collect::<Vec<_>>());
}

fn want(w: &World, ws: &str) -> Vec<String> {
    w.layers[ws].iter().map(|l| l.digest.clone()).collect()
}

fn pull(w: &World, f: &Facade, ws: &str) {
    pull_from(&f.host(), ws, &want(w, ws));
}

/// Starts a pull in a thread (it owns what it needs, so the world can be changed meanwhile).
fn pull_in_background(w: &World, f: &Facade, ws: &'static str) -> std::thread::JoinHandle<()> {
    let (host, want) = (f.host(), want(w, ws));
    std::thread::spawn(move || pull_from(&host, ws, &want))
}

fn layer_bytes(w: &World, ws: &str) -> u64 {
    w.layers[ws].iter().map(|l| l.size).sum()
}

fn upstream_blob_gets(w: &World) -> usize {
    w.upstream.count_requests("GET", "/blobs/")
}

fn indexed(w: &World, ws: &str) -> bool {
    let keys = w.redis.keys("registry-facade:blob:*").unwrap_or_default();
    w.layers[ws].iter().all(|l| keys.contains(&format!("registry-facade:blob:{}", l.digest)))
}

/// The value of one series (`name{labels}`) on the facade's `/metrics`.
fn metric(f: &Facade, series: &str) -> f64 {
    let text = String::from_utf8(request(&f.admin[0].to_string(), "GET", "/metrics", &[], b"").body).unwrap();
    test_support::metrics::series(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn stored(f_dir: &std::path::Path, digest: &str) -> bool {
    f_dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:")).is_file()
}

#[test]
fn a_second_node_pulls_with_zero_upstream_blob_gets() {
    a_second_node_pulls_with_zero_upstream_blob_gets_in(Mode::Single);
}

#[test]
fn a_second_node_pulls_with_zero_upstream_blob_gets_over_a_redis_cluster() {
    a_second_node_pulls_with_zero_upstream_blob_gets_in(Mode::Cluster);
}

#[test]
fn a_second_node_pulls_with_zero_upstream_blob_gets_over_sentinel() {
    a_second_node_pulls_with_zero_upstream_blob_gets_in(Mode::Sentinel);
}

fn a_second_node_pulls_with_zero_upstream_blob_gets_in(mode: Mode) {
    let w = world_in(mode, 4 * MIB);
    let a = node(&w, "a", json!({}));
    pull(&w, &a, "ws1");
    let a_gets = upstream_blob_gets(&w);
    assert!(a_gets > w.layers["ws1"].len(), "node A fetched layers and config upstream: {:?}", w.upstream.requests());
    let a_bytes = w.upstream.bytes_to_client();
    wait::until("node A's IPFS adds and index entries", Duration::from_secs(60), || indexed(&w, "ws1"));
    // The count moves right after the index write the line above saw.
    wait::until("node A's IPFS back-fills to be counted", Duration::from_secs(10), || {
        metric(&a, r#"registry_facade_backfill_total{outcome="ok",store="ipfs"}"#) == 3.0
    });
    assert_eq!(metric(&a, r#"registry_facade_backfill_total{outcome="ok",store="local"}"#), 3.0);
    assert!(w.ipfs.pins().unwrap().len() >= 3, "added blobs are pinned");

    w.upstream.reset_counters();
    let started = Instant::now();
    let b = node(&w, "b", json!({}));
    pull(&w, &b, "ws1");
    let b_time = started.elapsed();
    assert_eq!(upstream_blob_gets(&w), 0, "node B went upstream for blobs: {:?}", w.upstream.requests());
    // Tags, manifests and configs came from Redis too: node B did not talk to upstream at all.
    assert!(w.upstream.requests().is_empty(), "{:?}", w.upstream.requests());
    assert_eq!(metric(&b, r#"registry_facade_cache_lookups_total{cache="cluster",result="hit"}"#), 3.0);
    assert_eq!(metric(&b, r#"registry_facade_backfill_total{outcome="skipped",store="ipfs"}"#), 3.0);
    // Back-filled into B's own store from the IPFS bytes: a second pull is local.
    for l in &w.layers["ws1"] {
        assert!(stored(&w.dir.path().join("store-b"), &l.digest));
    }
    pull(&w, &b, "ws1");
    assert_eq!(metric(&b, r#"registry_facade_cache_lookups_total{cache="local",result="hit"}"#), 3.0);
    // Every call the facades made worked in this mode (one failing kind of call would open the
    // breaker for all the others).
    for f in [&a, &b] {
        assert_eq!(metric(f, r#"registry_facade_cluster_dependency_failures_total{dependency="redis"}"#), 0.0);
    }
    if let Index::Cluster(c) = &w.redis {
        // A real cluster: the keys are spread over its masters by slot.
        assert!(c.nodes_holding("registry-facade:*") >= 2, "keys all on one master: {:?}", c.keys("*"));
    }
    eprintln!(
        "two-node pull: node A {a_gets} upstream blob GETs, {a_bytes} upstream bytes; node B 0 GETs, {} bytes, {:?}",
        w.upstream.bytes_to_client(),
        b_time
    );
}

#[test]
fn redis_killed_mid_pull_then_the_cache_is_used_again() {
    let mut w = world(6 * MIB);
    // 4 MiB/s per upstream connection: the pull takes seconds, so the kill lands inside it.
    w.upstream.set_faults(Faults { throttle_bytes_per_sec: Some(4 * MIB as u64), ..Faults::default() });
    let a = node(&w, "a", json!({}));
    let pulling = pull_in_background(&w, &a, "ws1");
    wait::until("the pull to be under way", Duration::from_secs(60), || w.upstream.bytes_to_client() > 3 * MIB as u64);
    w.redis.single().kill();
    assert!(w.upstream.bytes_to_client() < layer_bytes(&w, "ws1"), "the kill came after the pull");
    pulling.join().expect("the pull failed while Redis was down");
    // The outage was noticed (the index writes after the fills failed) and counted.
    wait::until("the Redis outage to be counted", Duration::from_secs(30), || {
        metric(&a, r#"registry_facade_cluster_dependency_failures_total{dependency="redis"}"#) > 0.0
    });
    assert_eq!(metric(&a, r#"registry_facade_cluster_dependency_up{dependency="redis"}"#), 0.0);

    // Redis comes back (empty: nothing was persisted); node A notices by itself.
    w.redis.single().restart().unwrap();
    w.upstream.clear_faults();
    wait::until("node A to see Redis again", Duration::from_secs(60), || {
        metric(&a, r#"registry_facade_cluster_dependency_up{dependency="redis"}"#) == 1.0
    });
    // Node A uses the cache again: what it pulls now is indexed, and node B gets it from IPFS.
    pull(&w, &a, "ws2");
    wait::until("node A's index entries after the outage", Duration::from_secs(60), || indexed(&w, "ws2"));
    let b = node(&w, "b", json!({}));
    w.upstream.reset_counters();
    pull(&w, &b, "ws2");
    assert_eq!(upstream_blob_gets(&w), 0, "{:?}", w.upstream.requests());
}

#[test]
fn ipfs_killed_mid_pull_then_the_cache_is_used_again() {
    let mut w = world(6 * MIB);
    let a = node(&w, "a", json!({}));
    pull(&w, &a, "ws1");
    pull(&w, &a, "ws2");
    wait::until("node A's index entries", Duration::from_secs(60), || indexed(&w, "ws1") && indexed(&w, "ws2"));

    // Node B streams from IPFS at 2 MiB/s per connection; IPFS dies a few MiB in.
    w.ipfs_proxy.set_faults(Faults { throttle_bytes_per_sec: Some(2 * MIB as u64), ..Faults::default() });
    let b = node(&w, "b", json!({}));
    w.upstream.reset_counters();
    let pulling = pull_in_background(&w, &b, "ws1");
    wait::until("the IPFS streams to be under way", Duration::from_secs(60), || {
        w.ipfs_proxy.bytes_to_client() > 4 * MIB as u64
    });
    w.ipfs.kill();
    let from_ipfs = w.ipfs_proxy.bytes_to_client();
    pulling.join().expect("the pull failed while IPFS was down");
    // The rest came from upstream, resumed at the offsets IPFS had reached: what IPFS delivered
    // was not downloaded again.
    let from_upstream = w.upstream.bytes_to_client();
    assert!(upstream_blob_gets(&w) >= 1, "{:?}", w.upstream.requests());
    assert!(
        from_upstream + 2 * MIB as u64 <= layer_bytes(&w, "ws1"),
        "upstream sent {from_upstream} bytes of {} after IPFS had sent {from_ipfs}",
        layer_bytes(&w, "ws1")
    );
    assert!(w.upstream.requests().iter().all(|r| !r.contains("/manifests/")), "metadata still came from Redis");
    assert_eq!(metric(&b, r#"registry_facade_cluster_dependency_up{dependency="ipfs"}"#), 0.0);

    // IPFS comes back with its repo; node B notices by itself and serves ws2 from it.
    w.ipfs.restart().unwrap();
    w.ipfs_proxy.clear_faults();
    wait::until("node B to see IPFS again", Duration::from_secs(60), || {
        metric(&b, r#"registry_facade_cluster_dependency_up{dependency="ipfs"}"#) == 1.0
    });
    w.upstream.reset_counters();
    pull(&w, &b, "ws2");
    assert_eq!(upstream_blob_gets(&w), 0, "{:?}", w.upstream.requests());
}

#[test]
fn garbage_in_the_cluster_cache_never_completes_a_wrong_blob_nor_breaks_a_pull() {
    garbage_in_the_cluster_cache_in(Mode::Single);
}

#[test]
fn garbage_in_a_redis_cluster_never_completes_a_wrong_blob_nor_breaks_a_pull() {
    garbage_in_the_cluster_cache_in(Mode::Cluster);
}

#[test]
fn garbage_behind_sentinel_never_completes_a_wrong_blob_nor_breaks_a_pull() {
    garbage_in_the_cluster_cache_in(Mode::Sentinel);
}

fn garbage_in_the_cluster_cache_in(mode: Mode) {
    let w = world_in(mode, 2 * MIB);
    let a = node(&w, "a", json!({}));
    pull(&w, &a, "ws1");
    wait::until("node A's index entries", Duration::from_secs(60), || indexed(&w, "ws1"));
    let ws1 = &w.layers["ws1"];
    let key = |l: &BuiltLayer| format!("registry-facade:blob:{}", l.digest);
    let entry_of = |l: &BuiltLayer| -> Value {
        let raw = w.redis.command(&["GET", &key(l)]).unwrap();
        serde_json::from_str(raw.lines().nth(1).unwrap()).unwrap()
    };
    // Layer 0's entry: not JSON. Layer 1's: a CID of a blob the node does not have (it blocks
    // until the node-side timeout). Layer 2's: a real CID of other content of the same size.
    let other_cid = entry_of(&ws1[0])["cid"].as_str().unwrap().to_string();
    let missing = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
    let size_of = |l: &BuiltLayer| l.size.to_string();
    w.redis.command(&["SET", &key(&ws1[0]), "{not json"]).unwrap();
    // The entries name the image's own origin: an entry of another origin is not even used.
    let origins = [format!("{}/app", w.upstream.host())];
    let bogus = json!({"cid": missing, "mediaType": "x", "size": ws1[1].size, "origins": origins}).to_string();
    w.redis.command(&["SET", &key(&ws1[1]), &bogus]).unwrap();
    let wrong = json!({"cid": other_cid, "mediaType": "x", "size": ws1[2].size, "origins": origins}).to_string();
    w.redis.command(&["SET", &key(&ws1[2]), &wrong]).unwrap();
    assert_eq!(size_of(&ws1[0]), size_of(&ws1[2]), "the layers must be the same size for this test");

    let b = node(&w, "b", json!({"clusterIPFSTimeout": "1s"}));
    // The wrong content streams, but its last byte is never sent: the response is cut short,
    // nothing enters B's store, and the entry is removed.
    assert_eq!(request(&b.host(), "GET", "/v2/fixed/ws1/manifests/latest", &[], b"").status, 200);
    let path = format!("/v2/fixed/ws1/blobs/{}", ws1[2].digest);
    let got = e2e::stream::get(&b.host(), &path, &[], None).unwrap();
    assert!(got.truncated, "a wrong blob was completed: {} of {} bytes", got.received, ws1[2].size);
    assert!(!stored(&w.dir.path().join("store-b"), &ws1[2].digest));
    wait::until("the wrong entry to be removed", Duration::from_secs(10), || {
        !w.redis.keys("registry-facade:blob:*").unwrap().contains(&key(&ws1[2]))
    });
    // The client's retry (and a whole pull) now succeeds; the bad entries cost nothing else.
    pull(&w, &b, "ws1");
    assert!(metric(&b, r#"registry_facade_cache_lookups_total{cache="cluster",result="error"}"#) >= 1.0);
}

#[test]
fn a_bounded_store_evicts_old_blobs_and_pulls_still_succeed() {
    let w = world(4 * MIB);
    // Room for three of the five 4 MiB layers: downloads under way reserve their size in the
    // budget (README, `storeMaxBytes`), so ws1's three concurrent layers fit and are stored
    // (`maxBlobBytes` "0": any blob up to the budget), and ws2's two then need room.
    let a = node(&w, "a", json!({"storeMaxBytes": "13MiB", "maxBlobBytes": "0"}));
    let store = w.dir.path().join("store-a");
    let total = || -> u64 {
        std::fs::read_dir(store.join("blobs/sha256")).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum()
    };
    pull(&w, &a, "ws1");
    pull(&w, &a, "ws2");
    wait::until("the store to fit its limit", Duration::from_secs(30), || total() <= 13 * MIB as u64);
    let evictions = metric(&a, "registry_facade_store_evictions_total");
    assert!(evictions >= 2.0, "{evictions} evictions");
    assert!(metric(&a, "registry_facade_store_bytes") <= (13 * MIB) as f64);
    // The most recently pulled image is what stayed.
    assert!(w.layers["ws2"].iter().any(|l| stored(&store, &l.digest)));
    // Evicted blobs come back (from IPFS, where node A put them) and the pull succeeds.
    wait::until("node A's index entries", Duration::from_secs(60), || indexed(&w, "ws1"));
    w.upstream.reset_counters();
    pull(&w, &a, "ws1");
    assert_eq!(upstream_blob_gets(&w), 0, "{:?}", w.upstream.requests());
}

#[test]
fn a_composition_handed_out_by_one_node_is_served_by_digest_by_another() {
    a_composition_handed_out_by_one_node_in(Mode::Single);
}

#[test]
fn a_composition_handed_out_by_one_node_is_served_by_another_over_a_redis_cluster() {
    a_composition_handed_out_by_one_node_in(Mode::Cluster);
}

#[test]
fn a_composition_handed_out_by_one_node_is_served_by_another_over_sentinel() {
    a_composition_handed_out_by_one_node_in(Mode::Sentinel);
}

fn a_composition_handed_out_by_one_node_in(mode: Mode) {
    let w = world_in(mode, MIB);
    let a = node(&w, "a", json!({}));
    let m = request(&a.host(), "GET", "/v2/fixed/ws1/manifests/latest", &[], b"");
    assert_eq!(m.status, 200);
    let digest = m.header("docker-content-digest").unwrap().to_string();
    let manifest: Value = serde_json::from_slice(&m.body).unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    wait::until("the composition to be shared", Duration::from_secs(10), || {
        !w.redis.keys("registry-facade:composed:fixed/ws1:*").unwrap().is_empty()
    });

    // Node B's spec for ws1 changed meanwhile (it now composes app:2): a pull that began on
    // node A still gets exactly the bytes it was promised, config and layers included.
    let specs_b = json!({"ws1": {"baseRef": format!("{}/app:2", w.upstream.host())}, "ws2": {"baseRef": format!("{}/app:2", w.upstream.host())}});
    std::fs::write(w.dir.path().join("specs-b.json"), specs_b.to_string()).unwrap();
    let b = node_with_specs(&w, "b", "specs-b.json", json!({}));
    let current = request(&b.host(), "GET", "/v2/fixed/ws1/manifests/latest", &[], b"");
    assert_ne!(current.header("docker-content-digest"), Some(digest.as_str()), "node B composes something else now");
    let by_digest = request(&b.host(), "GET", &format!("/v2/fixed/ws1/manifests/{digest}"), &[], b"");
    assert_eq!(by_digest.status, 200);
    assert_eq!(by_digest.body, m.body, "served with exactly the bytes node A handed out");
    let cfg = request(&b.host(), "GET", &format!("/v2/fixed/ws1/blobs/{config}"), &[], b"");
    assert_eq!((cfg.status, e2e_sha256(&cfg.body)), (200, config.clone()));
    let layer = &w.layers["ws1"][0].digest;
    let got = e2e::stream::get(&b.host(), &format!("/v2/fixed/ws1/blobs/{layer}"), &[], None).unwrap();
    assert_eq!((got.status, got.digest.as_str()), (200, layer.as_str()));

    // Never across workspaces: ws2 cannot read ws1's composition.
    let other = request(&b.host(), "GET", &format!("/v2/fixed/ws2/manifests/{digest}"), &[], b"");
    assert_eq!(other.status, 404);
}

fn e2e_sha256(b: &[u8]) -> String {
    test_support::image::sha256_digest(b)
}

/// The CIDs the index names for `ws`'s layers (every entry must exist).
fn indexed_cids(w: &World, ws: &str) -> Vec<String> {
    w.layers[ws]
        .iter()
        .map(|l| {
            let raw = w.redis.command(&["GET", &format!("registry-facade:blob:{}", l.digest)]).unwrap();
            let entry: Value = serde_json::from_str(raw.lines().nth(1).unwrap()).unwrap();
            entry["cid"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Whether `cid` is pinned recursively on `ipfs` (asked by CID: js-ipfs lists CIDv1 in
/// base58btc, the index holds base32).
fn is_pinned(ipfs: &Ipfs, cid: &str) -> bool {
    let (status, body) = ipfs.rpc(&format!("pin/ls?arg={cid}&type=recursive")).unwrap();
    let text = String::from_utf8_lossy(&body);
    match status {
        200 => true,
        500 if text.contains("not pinned") => false,
        _ => panic!("pin/ls of {cid}: {status} {text}"),
    }
}

/// The IPFS repository's size (`repo/stat`), after a garbage collection (`repo/gc`).
fn repo_size_after_gc(ipfs: &Ipfs) -> u64 {
    let (status, body) = ipfs.rpc("repo/gc").unwrap();
    assert_eq!(status, 200, "repo/gc: {}", String::from_utf8_lossy(&body));
    let (status, body) = ipfs.rpc("repo/stat").unwrap();
    assert_eq!(status, 200, "repo/stat: {}", String::from_utf8_lossy(&body));
    let stat: Value = serde_json::from_slice(&body).unwrap();
    match &stat["RepoSize"] {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("repo/stat has no RepoSize: {other} in {stat}"),
    }
}

#[test]
fn a_sentinel_failover_under_running_pulls_loses_no_pull_and_keeps_the_index() {
    let mut w = world_in(Mode::Sentinel, 6 * MIB);
    let a = node(&w, "a", json!({}));
    pull(&w, &a, "ws1");
    wait::until("node A's index entries", Duration::from_secs(60), || indexed(&w, "ws1"));
    // The replica has the entries too (asynchronous replication, fast on loopback).
    let Index::Sentinel(sentinel) = &w.redis else { unreachable!() };
    let replica = sentinel.replica_addr();
    wait::until("the entries to reach the replica", Duration::from_secs(30), || {
        let keys = test_support::redis_ha::command_at(replica, &["KEYS", "registry-facade:blob:*"]).unwrap();
        test_support::redis_ha::bulk_strings(&keys).len() >= 3
    });

    // Node B pulls ws2 slowly from upstream while the master dies and a replica takes over.
    w.upstream.set_faults(Faults { throttle_bytes_per_sec: Some(3 * MIB as u64), ..Faults::default() });
    w.upstream.reset_counters();
    let b = node(&w, "b", json!({}));
    let pulling = pull_in_background(&w, &b, "ws2");
    // And node C pulls ws1 (from IPFS, through the index) at the same time, twice.
    let c = node(&w, "c", json!({}));
    let c_pulling = pull_in_background(&w, &c, "ws1");
    wait::until("node B's pull to be under way", Duration::from_secs(60), || {
        w.upstream.bytes_to_client() > 2 * MIB as u64
    });
    let ws2_bytes = layer_bytes(&w, "ws2");
    let Index::Sentinel(sentinel) = &mut w.redis else { unreachable!() };
    let old_master = sentinel.first_master();
    sentinel.kill_master();
    assert!(w.upstream.bytes_to_client() < ws2_bytes, "the failover came after the pull");
    sentinel.wait_for_failover(Duration::from_secs(60)).unwrap();
    assert_ne!(sentinel.master_addr().unwrap(), old_master);
    pulling.join().expect("a pull failed during the failover");
    c_pulling.join().expect("a pull from the index failed during the failover");
    w.upstream.clear_faults();

    // A fresh node finds ws1 through the entries that survived on the promoted replica, and
    // what is published now lands on the new master: another node then pulls ws2 from IPFS.
    let d = node(&w, "d", json!({}));
    w.upstream.reset_counters();
    pull(&w, &d, "ws1");
    assert_eq!(upstream_blob_gets(&w), 0, "{:?}", w.upstream.requests());
    pull(&w, &d, "ws2");
    wait::until("ws2's index entries on the new master", Duration::from_secs(60), || indexed(&w, "ws2"));
    let e = node(&w, "e", json!({}));
    w.upstream.reset_counters();
    pull(&w, &e, "ws2");
    assert_eq!(upstream_blob_gets(&w), 0, "{:?}", w.upstream.requests());
}

#[test]
fn pins_follow_the_index_and_the_ipfs_repository_shrinks() {
    let w = world(4 * MIB);
    let empty = repo_size_after_gc(&w.ipfs);
    // Index entries live 8 s after their last use; the sweep runs every 2 s.
    let a = node(&w, "a", json!({"clusterIndexTTL": "8s"}));
    pull(&w, &a, "ws1");
    wait::until("node A's IPFS back-fills", Duration::from_secs(60), || {
        metric(&a, r#"registry_facade_backfill_total{outcome="ok",store="ipfs"}"#) == 3.0
    });
    // Every add is recorded under the IPFS node's peer ID.
    let records = w.redis.keys("registry-facade:ipfs-pins:*").unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let full = repo_size_after_gc(&w.ipfs);
    let cids = indexed_cids(&w, "ws1");
    assert!(cids.iter().all(|c| is_pinned(&w.ipfs, c)), "{cids:?} not all pinned");
    // js-ipfs' RepoSize is what its datastores report, not the sum of the blobs: the check
    // is that the blobs show and that they go again.
    assert!(full >= empty + layer_bytes(&w, "ws1") / 2, "repository {empty} → {full} bytes with the blobs pinned");

    // Nobody uses the entries: they expire, and the sweep removes their pins.
    wait::until("the pins of the expired entries to be removed", Duration::from_secs(30), || {
        metric(&a, r#"registry_facade_ipfs_unpinned_total{reason="unindexed"}"#) == 3.0
    });
    assert!(w.redis.keys("registry-facade:blob:*").unwrap().is_empty());
    assert!(cids.iter().all(|c| !is_pinned(&w.ipfs, c)), "{cids:?} still pinned");
    assert_eq!(metric(&a, "registry_facade_ipfs_pinned_bytes"), 0.0);
    let after = repo_size_after_gc(&w.ipfs);
    assert!(after <= empty + (full - empty) / 4, "repository {empty} → {full} → {after} bytes after the unpins and GC");
    eprintln!("IPFS repository: {empty} bytes empty, {full} with ws1 pinned, {after} after unpinning and GC");

    // The node still serves the image (from its store), and a pull elsewhere refills IPFS.
    pull(&w, &a, "ws1");
    let b = node(&w, "b", json!({"clusterIndexTTL": "8s"}));
    pull(&w, &b, "ws2");
    wait::until("node B's adds", Duration::from_secs(60), || {
        metric(&b, r#"registry_facade_backfill_total{outcome="ok",store="ipfs"}"#) == 2.0
    });
}

#[test]
fn a_pinned_bytes_budget_unpins_the_least_recently_used_and_its_entry_first() {
    let w = world(4 * MIB);
    // Room for two of ws1's three 4 MiB layers.
    let a = node(&w, "a", json!({"clusterIPFSMaxBytes": "9MiB", "clusterIndexTTL": "40s"}));
    pull(&w, &a, "ws1");
    wait::until("node A's IPFS back-fills", Duration::from_secs(60), || {
        metric(&a, r#"registry_facade_backfill_total{outcome="ok",store="ipfs"}"#) == 3.0
    });
    // The sweep (every 10 s for a 40 s TTL) brings the pinned bytes under the budget.
    wait::until("the budget sweep", Duration::from_secs(60), || {
        metric(&a, r#"registry_facade_ipfs_unpinned_total{reason="budget"}"#) >= 1.0
    });
    assert_eq!(metric(&a, r#"registry_facade_ipfs_unpinned_total{reason="budget"}"#), 1.0);
    assert!(metric(&a, "registry_facade_ipfs_pinned_bytes") <= (9 * MIB) as f64);
    // Exactly one entry went, and it went before its pin: every entry left names a pinned CID.
    let keys = w.redis.keys("registry-facade:blob:*").unwrap();
    let kept: Vec<&BuiltLayer> =
        w.layers["ws1"].iter().filter(|l| keys.contains(&format!("registry-facade:blob:{}", l.digest))).collect();
    assert_eq!(kept.len(), 2, "{keys:?}");
    for l in kept {
        let raw = w.redis.command(&["GET", &format!("registry-facade:blob:{}", l.digest)]).unwrap();
        let entry: Value = serde_json::from_str(raw.lines().nth(1).unwrap()).unwrap();
        assert!(is_pinned(&w.ipfs, entry["cid"].as_str().unwrap()), "{entry} is not pinned");
    }
    // Node B gets the two kept layers from IPFS and only the evicted one from upstream.
    let b = node(&w, "b", json!({}));
    w.upstream.reset_counters();
    pull(&w, &b, "ws1");
    assert_eq!(upstream_blob_gets(&w), 1, "{:?}", w.upstream.requests());
}
