//! Prefetch on manifest, warm-up and progress (README, "Warm-up and progress") against a real
//! registry behind a counting, fault-injecting proxy: a manifest GET fills the layers before
//! the client asks, a prefetch whose pull went away lets go of its fills, a warm-up fills the
//! store so the pull that follows asks upstream for no blob, progress counts the right bytes,
//! and the `prepare` subcommand of the real binary drives all of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use e2e::Facade;
use e2e::http::request;
use serde_json::{Value, json};
use test_support::fault_proxy::{FaultProxy, Faults};
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::metrics;
use test_support::proc::free_port;
use test_support::registry::Registry;
use test_support::{skopeo, wait};

const MIB: usize = 1 << 20;

struct World {
    _reg: Registry,
    proxy: FaultProxy,
    dir: tempfile::TempDir,
    /// Layer digests and sizes, in manifest order.
    layers: Vec<(String, u64)>,
}

impl World {
    fn total(&self) -> u64 {
        self.layers.iter().map(|(_, s)| s).sum()
    }

    /// Upstream GETs of any of the image's layers.
    fn layer_gets(&self) -> usize {
        self.layers.iter().map(|(d, _)| self.proxy.count_requests("GET", &format!("/blobs/{d}"))).sum()
    }
}

/// An upstream image of layers of noise of these sizes (uncompressed: a blob is exactly that
/// big), reached through a proxy; workspaces `ws` and `other` both use it.
fn world(sizes: &[usize], faults: Option<Faults>) -> World {
    let reg = Registry::start().unwrap();
    let mut builder = ImageBuilder::new();
    let mut layers = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let layer = build_layer(
            &[FileEntry::file(format!("l{i}.bin"), e2e::noise(*size, 11 + i as u64))],
            LayerCompression::None,
        );
        layers.push((layer.digest.clone(), layer.size));
        builder = builder.layer(layer);
    }
    push_image(&reg, "img:1", &builder.build(), PushFormat::Oci).unwrap();
    let proxy = FaultProxy::start(reg.addr).unwrap();
    // Faults apply to connections opened after they are set: before the facade's first.
    if let Some(f) = faults {
        proxy.set_faults(f);
    }
    let dir = tempfile::tempdir().unwrap();
    let base = format!("{}/img:1", proxy.host());
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": base}, "other": {"baseRef": base}}).to_string(),
    )
    .unwrap();
    World { _reg: reg, proxy, dir, layers }
}

struct Running {
    facade: Facade,
    admin: String,
}

fn start(w: &World, facade: Value) -> Running {
    let port = free_port();
    let mut f = json!({"listenHost": "127.0.0.1"});
    f.as_object_mut().unwrap().extend(facade.as_object().unwrap().clone());
    let cfg = json!({"registry": {"port": 0, "fixedSpecFN": "specs.json", "store": "store"},
                     "prometheusAddr": format!("127.0.0.1:{port}"), "facade": f});
    let facade = Facade::start(&cfg, w.dir.path()).unwrap();
    Running { facade, admin: format!("127.0.0.1:{port}") }
}

impl Running {
    fn scrape(&self) -> String {
        String::from_utf8(request(&self.admin, "GET", "/metrics", &[], b"").body).unwrap()
    }

    fn progress(&self, ws: &str) -> (u16, Value) {
        let r = request(&self.admin, "GET", &format!("/v1/workspaces/fixed/{ws}/progress"), &[], b"");
        (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    }

    fn wait_finished(&self, ws: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        wait::until(&format!("the job of {ws} to end"), timeout, || {
            let (status, p) = self.progress(ws);
            let ended = status == 200 && p["state"] != "running";
            last = p;
            ended
        });
        last
    }
}

fn stored(w: &World, digest: &str) -> bool {
    w.dir.path().join("store/blobs/sha256").join(digest.trim_start_matches("sha256:")).exists()
}

#[test]
fn a_manifest_get_fills_every_layer_before_the_client_asks() {
    let w = world(&[2 * MIB, 3 * MIB, MIB], None);
    let r = start(&w, json!({}));
    let h = r.facade.host();

    // A HEAD is no pull: nothing is prefetched.
    assert_eq!(request(&h, "HEAD", "/v2/fixed/other/manifests/latest", &[], b"").status, 200);
    assert_eq!(r.progress("other").0, 404);

    assert_eq!(request(&h, "GET", "/v2/fixed/ws/manifests/latest", &[], b"").status, 200);
    // Upstream sees every layer asked for although the client asked for none.
    wait::until("upstream GETs of every layer", Duration::from_secs(30), || {
        w.layers.iter().all(|(d, _)| w.proxy.count_requests("GET", &format!("/blobs/{d}")) >= 1)
    });
    let p = r.wait_finished("ws", Duration::from_secs(60));
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(p["kind"], "prefetch");
    assert_eq!(p["bytesDone"].as_u64(), Some(w.total()));
    assert_eq!(p["bytesTotal"].as_u64(), Some(w.total()));
    assert_eq!((p["layersDone"].as_u64(), p["layersTotal"].as_u64()), (Some(3), Some(3)));
    for (i, (digest, size)) in w.layers.iter().enumerate() {
        let l = &p["layers"][i];
        assert_eq!((l["digest"].as_str(), l["size"].as_u64()), (Some(digest.as_str()), Some(*size)), "{p}");
        assert_eq!((l["state"].as_str(), l["source"].as_str()), (Some("done"), Some("upstream")), "{p}");
        wait::until("the layer in the store", Duration::from_secs(10), || stored(&w, digest));
    }
    // The same composition is not prefetched twice.
    assert_eq!(request(&h, "GET", "/v2/fixed/ws/manifests/latest", &[], b"").status, 200);
    let gets = w.layer_gets();
    assert_eq!(gets, 3, "one upstream GET per layer: {:?}", w.proxy.requests());

    // The client's blob GETs now come from the store.
    for (digest, size) in &w.layers {
        let got = e2e::stream::get(&h, &format!("/v2/fixed/ws/blobs/{digest}"), &[], None).unwrap();
        assert_eq!((got.status, got.received, got.digest.as_str()), (200, *size, digest.as_str()));
    }
    assert_eq!(w.layer_gets(), gets, "the client's pull went upstream again");

    let m = r.scrape();
    assert_eq!(metrics::value(&m, "registry_facade_prefetch_total", &[("outcome", "done")]), 1.0, "{m}");
    assert_eq!(metrics::value(&m, "registry_facade_prefetched_bytes_total", &[("kind", "prefetch")]), w.total() as f64);
    assert!(!m.contains("sha256:"), "a digest in a metric label");
}

#[test]
fn a_prefetch_whose_pull_went_away_lets_go_of_its_fills() {
    // 4 KiB/s: well below what a fill nobody reads may keep going at (8 KiB/s), and a 4 MiB
    // layer would take a quarter of an hour.
    let w = world(&[4 * MIB], Some(Faults { throttle_bytes_per_sec: Some(4096), ..Faults::default() }));
    let r = start(&w, json!({"prefetchIdleTimeout": "1s"}));
    let h = r.facade.host();
    assert_eq!(request(&h, "GET", "/v2/fixed/ws/manifests/latest", &[], b"").status, 200);
    let started = Instant::now();
    wait::until("the prefetch to start its fill", Duration::from_secs(20), || w.layer_gets() >= 1);
    let (status, p) = r.progress("ws");
    assert_eq!((status, p["state"].as_str()), (200, Some("running")), "{p}");

    // Nobody asks for anything of the image any more: the prefetch stops, and its fill with it.
    let p = r.wait_finished("ws", Duration::from_secs(20));
    assert_eq!(p["state"], "stopped", "{p}");
    assert_eq!(p["layers"][0]["state"], "failed", "{p}");
    assert!(p["layers"][0]["error"].as_str().unwrap().contains("went away"), "{p}");
    assert!(p["bytesDone"].as_u64().unwrap() < w.total(), "{p}");
    wait::until("the fill to be dropped", Duration::from_secs(30), || {
        metrics::value(&r.scrape(), "registry_facade_inflight_fills", &[]) == 0.0
    });
    // Long before the fill's own minimum-rate window (60 s) would have failed it.
    assert!(started.elapsed() < Duration::from_secs(45), "took {:?}", started.elapsed());
    let moved = w.proxy.bytes_to_client();
    std::thread::sleep(Duration::from_secs(2));
    assert!(w.proxy.bytes_to_client() - moved < 4096, "upstream bytes still flow after the fill was dropped");
    assert!(!stored(&w, &w.layers[0].0));
    let m = r.scrape();
    assert_eq!(metrics::value(&m, "registry_facade_prefetch_total", &[("outcome", "stopped")]), 1.0, "{m}");
}

#[test]
fn a_warm_up_fills_the_store_so_the_pull_asks_upstream_for_no_blob() {
    let w = world(&[3 * MIB, 2 * MIB, MIB + 17], None);
    // Prefetch on manifest off: only the warm-up fills.
    let r = start(&w, json!({"prefetchParallelism": 0}));
    let resp = request(&r.admin, "POST", "/v1/workspaces/fixed/ws/prepare", &[], b"");
    assert_eq!(resp.status, 202, "{}", String::from_utf8_lossy(&resp.body));
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["workspace"], "fixed/ws");
    assert_eq!(body["progress"], format!("http://{}/v1/workspaces/fixed/ws/progress", r.admin));

    // Server-sent events of the same report until it is done.
    let sse = request(&r.admin, "GET", "/v1/workspaces/fixed/ws/progress", &[("Accept", "text/event-stream")], b"");
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(sse.body).unwrap();
    let events: Vec<Value> =
        text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(|j| serde_json::from_str(j).unwrap()).collect();
    let last = events.last().expect("no event");
    assert_eq!(last["state"], "done", "{text}");
    assert_eq!(last["kind"], "warmup");
    assert_eq!(last["bytesDone"].as_u64(), Some(w.total()));
    assert!(events.windows(2).all(|p| p[0]["bytesDone"].as_u64() <= p[1]["bytesDone"].as_u64()), "{text}");

    let (status, p) = r.progress("ws");
    assert_eq!(status, 200);
    assert_eq!((p["bytesDone"].as_u64(), p["bytesTotal"].as_u64()), (Some(w.total()), Some(w.total())), "{p}");
    assert_eq!((p["layersDone"].as_u64(), p["layersTotal"].as_u64()), (Some(3), Some(3)));
    for (digest, _) in &w.layers {
        wait::until("the layer in the store", Duration::from_secs(10), || stored(&w, digest));
    }

    w.proxy.reset_counters();
    let out = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_preserving_digests(&format!("{}/fixed/ws:latest", r.facade.host()), out.path(), "latest")
        .unwrap();
    let img = skopeo::read_oci_layout(out.path(), "latest").unwrap();
    assert_eq!(img.manifest["layers"].as_array().unwrap().len(), 3);
    assert_eq!(w.layer_gets(), 0, "upstream layer GETs: {:?}", w.proxy.requests());

    let m = r.scrape();
    assert_eq!(metrics::value(&m, "registry_facade_warmups_total", &[("outcome", "done")]), 1.0, "{m}");
    assert_eq!(metrics::value(&m, "registry_facade_prefetched_bytes_total", &[("kind", "warmup")]), w.total() as f64);
    assert_eq!(metrics::value(&m, "registry_facade_prefetch_total", &[]), 0.0, "prefetch was off");
}

#[test]
fn the_admin_api_answers_unknown_workspaces_and_wrong_requests_with_oci_errors() {
    let w = world(&[MIB], None);
    let r = start(&w, json!({}));
    let unknown = request(&r.admin, "POST", "/v1/workspaces/fixed/nope/prepare", &[], b"");
    assert_eq!((unknown.status, unknown.error_code().as_deref()), (404, Some("MANIFEST_UNKNOWN")));
    assert_eq!(unknown.header("content-type"), Some("application/json"));
    let provider = request(&r.admin, "POST", "/v1/workspaces/nosuch/ws/prepare", &[], b"");
    assert_eq!((provider.status, provider.error_code().as_deref()), (404, Some("MANIFEST_UNKNOWN")));
    let none = request(&r.admin, "GET", "/v1/workspaces/fixed/ws/progress", &[], b"");
    assert_eq!((none.status, none.error_code().as_deref()), (404, Some("NAME_UNKNOWN")));
    let bad = request(&r.admin, "POST", "/v1/workspaces/fixed/../prepare", &[], b"");
    assert_eq!((bad.status, bad.error_code().as_deref()), (400, Some("NAME_INVALID")));
    let get = request(&r.admin, "GET", "/v1/workspaces/fixed/ws/prepare", &[], b"");
    assert_eq!((get.status, get.header("allow")), (405, Some("POST")));
    // The registry port has no admin API.
    let on_registry = request(&r.facade.host(), "POST", "/v1/workspaces/fixed/ws/prepare", &[], b"");
    assert_ne!(on_registry.status, 202);
    assert_eq!(w.layer_gets(), 0, "a refused warm-up fetched layers");
    // The probes and metrics are as they were.
    assert_eq!(request(&r.admin, "GET", "/live", &[], b"").status, 200);
    assert!(r.scrape().contains("registry_facade_warmups_total"));
}

#[test]
fn the_prepare_subcommand_warms_up_and_reports_each_layer() {
    let w = world(&[2 * MIB, MIB], None);
    let r = start(&w, json!({"prefetchParallelism": 0}));
    let bin = test_support::cargo_bin::cargo_bin("registry-facade", "registry-facade").unwrap();
    let out =
        std::process::Command::new(&bin).args(["prepare", &r.admin, "fixed/ws", "--timeout", "60s"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (digest, _) in &w.layers {
        assert!(lines.iter().any(|l| l.starts_with(digest.as_str()) && l.ends_with(" upstream done")), "{stdout}");
        assert!(stored(&w, digest) || wait::poll(Duration::from_secs(10), wait::EVERY, || stored(&w, digest)));
    }
    assert!(lines[2].starts_with("fixed/ws: done: 2/2 layers, 3.0 MiB of 3.0 MiB"), "{stdout}");

    let out = std::process::Command::new(&bin)
        .args(["prepare", &r.admin, "fixed/nope", "--timeout", "60s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("404") && stderr.contains("MANIFEST_UNKNOWN"), "{stderr}");
}
