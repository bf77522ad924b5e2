//! The blob streaming engine against a real upstream behind a fault-injecting proxy:
//! resume after cuts and stalls, corrupt upstream bytes never cached, single-flight for
//! concurrent cold pulls, Range on cold and warm blobs, client disconnects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use e2e::Facade;
use e2e::http::request;
use e2e::stream::get;
use serde_json::{Value, json};
use test_support::fault_proxy::{FaultProxy, Faults};
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::registry::Registry;
use test_support::skopeo;
use test_support::wait;

const MIB: usize = 1 << 20;

struct World {
    _reg: Registry,
    proxy: FaultProxy,
    dir: tempfile::TempDir,
    layer: String,
    layer_size: u64,
}

/// An upstream with one image whose only layer is `size` bytes of noise (uncompressed, so the
/// blob is exactly that big), reached through a fault proxy.
fn world(size: usize) -> World {
    let reg = Registry::start().unwrap();
    let layer = build_layer(&[FileEntry::file("big.bin", e2e::noise(size, 7))], LayerCompression::None);
    let (digest, layer_size) = (layer.digest.clone(), layer.size);
    let img = ImageBuilder::new().layer(layer).build();
    push_image(&reg, "big:1", &img, PushFormat::Oci).unwrap();
    let proxy = FaultProxy::start(reg.addr).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/big:1", proxy.host())}}).to_string(),
    )
    .unwrap();
    World { _reg: reg, proxy, dir, layer: digest, layer_size }
}

fn start(w: &World, store: bool, read_timeout: &str) -> Facade {
    let mut registry = json!({"port": 0, "fixedSpecFN": "specs.json"});
    if store {
        registry["store"] = json!("store");
    }
    // No prefetch on manifest: these tests count and fault the downloads their own clients
    // start (warmup.rs covers prefetch).
    let cfg = json!({"registry": registry, "facade": {"listenHost": "127.0.0.1", "upstreamReadTimeout": read_timeout,
                                                     "prefetchParallelism": 0}});
    Facade::start(&cfg, w.dir.path()).unwrap()
}

fn blob_path(w: &World) -> String {
    format!("/v2/fixed/ws/blobs/{}", w.layer)
}

fn stored(w: &World) -> bool {
    w.dir.path().join("store/blobs/sha256").join(w.layer.trim_start_matches("sha256:")).exists()
}

fn tmp_files(w: &World) -> usize {
    std::fs::read_dir(w.dir.path().join("store/tmp")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn skopeo_pull_survives_connections_cut_every_few_mib() {
    let w = world(256 * MIB);
    let facade = start(&w, true, "5s");
    w.proxy.set_faults(Faults { cut_after: Some(6 * MIB as u64), reset: true, ..Faults::default() });
    let out = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_preserving_digests(&format!("{}/fixed/ws:latest", facade.host()), out.path(), "latest")
        .unwrap();
    // read_oci_layout checks every blob against its digest.
    let img = skopeo::read_oci_layout(out.path(), "latest").unwrap();
    assert_eq!(img.manifest["layers"][0]["digest"], w.layer);
    let resumed = w.proxy.count_requests("GET", &format!("/blobs/{}", w.layer));
    assert!(resumed >= 40, "expected one GET per 6 MiB cut, saw {resumed}");
    assert!(stored(&w), "the resumed download was not committed to the store");
}

#[test]
fn a_stalled_upstream_is_resumed() {
    let w = world(32 * MIB);
    let facade = start(&w, true, "1s");
    // Faults apply to connections opened after they are set, and the facade keeps upstream
    // connections alive: set them before the first request. Only the first connection stalls
    // (after 4 MiB, inside the blob); the resume gets a fresh one.
    w.proxy.set_faults(Faults { stall_after: Some(4 * MIB as u64), connections: Some(1), ..Faults::default() });
    assert_eq!(request(&facade.host(), "GET", "/v2/fixed/ws/manifests/latest", &[], b"").status, 200);
    let started = Instant::now();
    let got = get(&facade.host(), &blob_path(&w), &[], None).unwrap();
    assert_eq!((got.status, got.received, got.digest.as_str()), (200, w.layer_size, w.layer.as_str()));
    assert!(started.elapsed() < Duration::from_secs(20), "resume took {:?}", started.elapsed());
    assert!(w.proxy.count_requests("GET", &format!("/blobs/{}", w.layer)) >= 2);
}

#[test]
fn corrupt_upstream_bytes_are_never_cached_or_completed() {
    let w = world(16 * MIB);
    let facade = start(&w, true, "5s");
    // Set before the first request (faults apply to new connections); 8 MiB into the stream is
    // inside the blob, after the small manifest and config answers.
    w.proxy.set_faults(Faults { corrupt_at: Some(8 * MIB as u64), ..Faults::default() });
    assert_eq!(request(&facade.host(), "GET", "/v2/fixed/ws/manifests/latest", &[], b"").status, 200);
    let got = get(&facade.host(), &blob_path(&w), &[], None).unwrap();
    assert_eq!(got.status, 200);
    assert!(got.truncated, "a corrupt blob was completed: received {} of {}", got.received, w.layer_size);
    assert!(!stored(&w), "a corrupt blob entered the store");
    wait::until("temp files to go", Duration::from_secs(10), || tmp_files(&w) == 0);

    // The upstream is fixed: the next pull succeeds and is cached.
    w.proxy.clear_faults();
    let got = get(&facade.host(), &blob_path(&w), &[], None).unwrap();
    assert_eq!((got.received, got.digest.as_str(), got.truncated), (w.layer_size, w.layer.as_str(), false));
    wait::until("the blob to be stored", Duration::from_secs(10), || stored(&w));
}

#[test]
fn twenty_concurrent_cold_pulls_make_one_upstream_request() {
    let w = world(256 * MIB);
    let facade = start(&w, true, "5s");
    assert_eq!(request(&facade.host(), "GET", "/v2/fixed/ws/manifests/latest", &[], b"").status, 200);
    w.proxy.reset_counters();
    let host = facade.host();
    let path = blob_path(&w);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20).map(|_| s.spawn(|| get(&host, &path, &[], None).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!((r.status, r.received, r.digest.as_str()), (200, w.layer_size, w.layer.as_str()));
    }
    assert_eq!(w.proxy.count_requests("GET", &format!("/blobs/{}", w.layer)), 1, "{:?}", w.proxy.requests());
    let upstream_bytes = w.proxy.bytes_to_client();
    assert!(
        upstream_bytes < w.layer_size + MIB as u64,
        "upstream sent {upstream_bytes} bytes for a {} byte layer",
        w.layer_size
    );
}

#[test]
fn ranges_on_cold_and_warm_blobs() {
    let w = world(8 * MIB);
    let facade = start(&w, true, "5s");
    let (h, p) = (facade.host(), blob_path(&w));
    let size = w.layer_size;
    let full = get(&h, &p, &[("Range", "bytes=0-0")], None).unwrap(); // cold: first byte only
    assert_eq!((full.status, full.received), (206, 1));
    assert_eq!(full.content_range.as_deref(), Some(format!("bytes 0-0/{size}").as_str()));
    wait::until("the blob to be stored", Duration::from_secs(10), || stored(&w));

    // Warm now; every form, checked against a full GET.
    let whole = request(&h, "GET", &p, &[], b"");
    assert_eq!(whole.body.len() as u64, size);
    for (range, start, end) in [
        ("bytes=100-199".to_string(), 100, 199),
        (format!("bytes={}-", size - 10), size - 10, size - 1),
        ("bytes=-5".to_string(), size - 5, size - 1),
        ("bytes=0-".to_string(), 0, size - 1),
        (format!("bytes=5-{}", size + 100), 5, size - 1),
    ] {
        let r = request(&h, "GET", &p, &[("Range", &range)], b"");
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.header("content-range").unwrap(), format!("bytes {start}-{end}/{size}"), "{range}");
        assert_eq!(r.header("content-length").unwrap(), (end - start + 1).to_string());
        assert_eq!(r.body, whole.body[start as usize..=end as usize], "{range}");
    }
    let r = request(&h, "GET", &p, &[("Range", &format!("bytes={size}-"))], b"");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range").unwrap(), format!("bytes */{size}"));
}

#[test]
fn a_range_on_a_cold_blob_is_answered_before_the_whole_blob_arrives() {
    let w = world(64 * MIB);
    let facade = start(&w, true, "5s");
    // 16 MiB/s upstream: the whole blob takes 4 s, the first MiB well under one.
    w.proxy.set_faults(Faults { throttle_bytes_per_sec: Some(16 * MIB as u64), ..Faults::default() });
    assert_eq!(request(&facade.host(), "GET", "/v2/fixed/ws/manifests/latest", &[], b"").status, 200);
    let started = Instant::now();
    let r = get(&facade.host(), &blob_path(&w), &[("Range", "bytes=0-65535")], None).unwrap();
    assert_eq!((r.status, r.received), (206, 65536));
    assert!(started.elapsed() < Duration::from_secs(2), "range waited for the whole blob: {:?}", started.elapsed());
}

#[test]
fn a_client_that_goes_away_leaves_no_partial_files() {
    // With a store, the fill finishes for the cache and is committed verified.
    let w = world(32 * MIB);
    let facade = start(&w, true, "5s");
    w.proxy.set_faults(Faults { throttle_bytes_per_sec: Some(64 * MIB as u64), ..Faults::default() });
    let r = get(&facade.host(), &blob_path(&w), &[], Some(MIB as u64)).unwrap();
    assert!(r.received < w.layer_size);
    wait::until("the blob to be stored", Duration::from_secs(20), || stored(&w));
    assert_eq!(tmp_files(&w), 0);
    drop(facade);

    // Without a store, nobody needs the rest: the upstream download stops.
    let w = world(64 * MIB);
    let facade = start(&w, false, "5s");
    w.proxy.set_faults(Faults { throttle_bytes_per_sec: Some(32 * MIB as u64), ..Faults::default() });
    assert_eq!(request(&facade.host(), "GET", "/v2/fixed/ws/manifests/latest", &[], b"").status, 200);
    w.proxy.reset_counters();
    let r = get(&facade.host(), &blob_path(&w), &[], Some(MIB as u64)).unwrap();
    assert!(r.received < w.layer_size);
    std::thread::sleep(Duration::from_millis(2500));
    let sent = w.proxy.bytes_to_client();
    assert!(sent < w.layer_size / 2, "upstream kept sending after the client left: {sent} bytes");
}

#[test]
fn manifests_are_composed_once_and_tags_resolved_with_head() {
    let w = world(MIB);
    let facade = start(&w, true, "5s");
    w.proxy.reset_counters();
    for _ in 0..50 {
        let head = request(&facade.host(), "HEAD", "/v2/fixed/ws/manifests/latest", &[], b"");
        assert_eq!(head.status, 200);
        let d = head.header("docker-content-digest").unwrap().to_string();
        let get = request(&facade.host(), "GET", &format!("/v2/fixed/ws/manifests/{d}"), &[], b"");
        assert_eq!(get.status, 200);
    }
    let reqs = w.proxy.requests();
    assert_eq!(w.proxy.count_requests("HEAD", "/manifests/1"), 1, "{reqs:?}");
    assert_eq!(w.proxy.count_requests("GET", "/manifests/1"), 0, "tags must be resolved with HEAD: {reqs:?}");
    assert_eq!(w.proxy.count_requests("GET", "/manifests/"), 1, "{reqs:?}");
    let v: Value =
        serde_json::from_slice(&request(&facade.host(), "GET", "/v2/fixed/ws/manifests/latest", &[], b"").body)
            .unwrap();
    assert_eq!(v["layers"][0]["digest"], w.layer);
}
