//! Every metric (README, "Metrics") moves when its event happens (requests, first bytes by source,
//! upstream requests and retries, single-flight joins, cache hits, back-fill, digest
//! mismatches, aborted responses, store size), and so do the Go facade's legacy series that
//! dashboards query (`gitpod_registry_facade_{registry,downstream}_*`, `facade.legacyMetrics`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::Facade;
use e2e::http::request;
use e2e::stream::get;
use serde_json::{Value, json};
use test_support::fault_proxy::{FaultProxy, Faults};
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::proc::free_port;
use test_support::registry::Registry;

const MIB: usize = 1 << 20;

use test_support::metrics::value as metric;

#[test]
fn every_metric_moves_when_its_event_happens() {
    let reg = Registry::start().unwrap();
    let layer = build_layer(&[FileEntry::file("big.bin", e2e::noise(24 * MIB, 3))], LayerCompression::None);
    let layer_digest = layer.digest.clone();
    push_image(&reg, "big:1", &ImageBuilder::new().layer(layer).build(), PushFormat::Oci).unwrap();
    let layer2 = build_layer(&[FileEntry::file("big2.bin", e2e::noise(24 * MIB, 4))], LayerCompression::None);
    let layer2_digest = layer2.digest.clone();
    push_image(&reg, "big2:1", &ImageBuilder::new().layer(layer2).build(), PushFormat::Oci).unwrap();
    let small = build_layer(&[FileEntry::file("small.txt", "small")], LayerCompression::Gzip);
    let small_digest = small.digest.clone();
    push_image(&reg, "small:1", &ImageBuilder::new().layer(small).build(), PushFormat::Oci).unwrap();
    let proxy = FaultProxy::start(reg.addr).unwrap();
    // A second way to the same registry that refuses every connection: upstream requests that
    // get no answer at all (a host of its own, so no pooled connection gets through).
    let refusing = FaultProxy::start(reg.addr).unwrap();
    refusing.set_faults(Faults { refuse: true, ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"big": {"baseRef": format!("{}/big:1", proxy.host())},
               "big2": {"baseRef": format!("{}/big2:1", proxy.host())},
               "small": {"baseRef": format!("{}/small:1", proxy.host())},
               "unreachable": {"baseRef": format!("{}/small:1", refusing.host())}})
        .to_string(),
    )
    .unwrap();
    let metrics_port = free_port();
    // No prefetch on manifest: it would download big2's layer before the corrupt fault below
    // is set; the counts here are of the client's own downloads (warmup.rs covers prefetch).
    let facade = Facade::start(
        &json!({"registry": {"port": 0, "fixedSpecFN": "specs.json", "store": "store"},
                "prometheusAddr": format!("127.0.0.1:{metrics_port}"),
                "facade": {"listenHost": "127.0.0.1", "prefetchParallelism": 0}}),
        dir.path(),
    )
    .unwrap();
    let h = facade.host();
    let scrape =
        || String::from_utf8(request(&format!("127.0.0.1:{metrics_port}"), "GET", "/metrics", &[], b"").body).unwrap();
    let before = scrape();
    assert!(before.contains("registry_facade_http_requests_total"), "{before}");

    // Connections cut every 4 MiB (faults apply to connections opened after they are set, so
    // before the first request): the fill resumes (retries), and four concurrent readers share
    // it (joins).
    proxy.set_faults(Faults { cut_after: Some(4 * MIB as u64), reset: true, ..Faults::default() });
    let m: Value =
        serde_json::from_slice(&request(&h, "GET", "/v2/fixed/small/manifests/latest", &[], b"").body).unwrap();
    let config = m["config"]["digest"].as_str().unwrap().to_string();
    assert_eq!(request(&h, "GET", &format!("/v2/fixed/small/blobs/{config}"), &[], b"").status, 200);
    assert_eq!(request(&h, "GET", "/v2/fixed/big/manifests/latest", &[], b"").status, 200);
    assert_eq!(request(&h, "GET", "/v2/fixed/big2/manifests/latest", &[], b"").status, 200);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| get(&h, &format!("/v2/fixed/big/blobs/{layer_digest}"), &[], None).unwrap()))
            .collect();
        for x in hs {
            let r = x.join().unwrap();
            assert_eq!(r.digest, layer_digest);
        }
    });
    // A corrupt upstream (on the connections opened after a cut): mismatch counted, response
    // aborted, nothing back-filled.
    proxy.set_faults(Faults { corrupt_at: Some(MIB as u64), ..Faults::default() });
    let r = get(&h, &format!("/v2/fixed/big2/blobs/{layer2_digest}"), &[], None).unwrap();
    assert!(r.truncated, "a corrupt blob was completed");
    proxy.clear_faults();
    // Warm: from the store.
    let warm = get(&h, &format!("/v2/fixed/big/blobs/{layer_digest}"), &[], None).unwrap();
    assert_eq!(warm.digest, layer_digest);
    let _ = get(&h, &format!("/v2/fixed/small/blobs/{small_digest}"), &[], None).unwrap();
    // An upstream that never answers: the manifest request fails (5xx) on our side too.
    let unreachable = request(&h, "GET", "/v2/fixed/unreachable/manifests/latest", &[], b"");
    assert!(unreachable.status >= 500, "{}", unreachable.status);

    let after = scrape();
    let moved = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (metric(&before, name, labels), metric(&after, name, labels));
        assert!(a > b, "{name}{labels:?} did not move: {b} -> {a}");
    };
    moved("registry_facade_http_requests_total", &[("route", "manifest"), ("status_class", "2xx")]);
    moved("registry_facade_http_requests_total", &[("route", "blob")]);
    moved("registry_facade_http_request_duration_seconds_count", &[("route", "blob")]);
    moved("registry_facade_http_response_bytes_total", &[("route", "blob")]);
    moved("registry_facade_response_aborted_total", &[]);
    moved("registry_facade_blob_first_byte_seconds_count", &[("source", "fill")]);
    moved("registry_facade_blob_first_byte_seconds_count", &[("source", "store")]);
    moved("registry_facade_blob_first_byte_seconds_count", &[("source", "memory")]);
    moved("registry_facade_blob_bytes_total", &[("source", "store")]);
    moved("registry_facade_blob_source_requests_total", &[("source", "fill"), ("outcome", "ok")]);
    moved("registry_facade_blob_source_requests_total", &[("source", "fill"), ("outcome", "error")]);
    moved("registry_facade_upstream_requests_total", &[("kind", "manifest"), ("status_class", "2xx")]);
    moved("registry_facade_upstream_requests_total", &[("kind", "blob"), ("status_class", "2xx")]);
    moved("registry_facade_upstream_request_duration_seconds_count", &[("kind", "blob")]);
    moved("registry_facade_upstream_retries_total", &[("reason", "body")]);
    moved("registry_facade_singleflight_joins_total", &[]);
    moved("registry_facade_digest_mismatches_total", &[("source", "upstream")]);
    moved("registry_facade_cache_lookups_total", &[("cache", "local"), ("result", "hit")]);
    moved("registry_facade_cache_lookups_total", &[("cache", "local"), ("result", "miss")]);
    moved("registry_facade_backfill_total", &[("store", "local"), ("outcome", "ok")]);
    moved("registry_facade_backfill_total", &[("store", "local"), ("outcome", "failed")]);
    moved("registry_facade_store_bytes", &[]);

    // The Go facade's series, under its names, kinds and labels (docs/migration.md has the
    // mapping): requests served to clients ...
    let reg_ = |n: &str| format!("gitpod_registry_facade_registry_{n}");
    moved(&reg_("manifest_req_seconds_count"), &[]);
    moved(&reg_("blob_req_total"), &[]);
    moved(&reg_("req_failed_total"), &[("type", "manifest")]);
    moved(&reg_("req_failed_total"), &[("type", "blob")]);
    for source in ["blobstore", "proxy", "config"] {
        moved(&reg_("blob_req_dl_total"), &[("blobSource", source), ("ok", "true")]);
        moved(&reg_("blob_req_bytes_total"), &[("blobSource", source)]);
        moved(&reg_("blob_req_bytes_second_count"), &[("blobSource", source)]);
    }
    moved(&reg_("blob_req_dl_total"), &[("blobSource", "proxy"), ("ok", "false")]);
    // ... and requests made upstream.
    let down = |n: &str| format!("gitpod_registry_facade_downstream_{n}");
    moved(&down("manifest_req_seconds_count"), &[]);
    moved(&down("blob_req_total"), &[]);
    moved(&down("req_failed_total"), &[("type", "manifest")]);
    moved(&down("blob_req_dl_total"), &[("blobSource", "proxy"), ("ok", "true")]);
    // Registered for dashboards, never counted into (as in the Go facade): bytes from upstream
    // are in the registry-side series.
    assert!(after.contains("gitpod_registry_facade_downstream_blob_req_bytes_total{"), "{after}");
    // Kinds and buckets as the Go facade declared them.
    for (name, kind) in [
        ("gitpod_registry_facade_registry_manifest_req_seconds", "histogram"),
        ("gitpod_registry_facade_registry_req_failed_total", "counter"),
        ("gitpod_registry_facade_registry_blob_req_total", "counter"),
        ("gitpod_registry_facade_registry_blob_req_dl_total", "counter"),
        ("gitpod_registry_facade_registry_blob_req_bytes_total", "counter"),
        ("gitpod_registry_facade_registry_blob_req_bytes_second", "histogram"),
        ("gitpod_registry_facade_downstream_manifest_req_seconds", "histogram"),
        ("gitpod_registry_facade_downstream_req_failed_total", "counter"),
        ("gitpod_registry_facade_downstream_blob_req_total", "counter"),
        ("gitpod_registry_facade_downstream_blob_req_dl_total", "counter"),
        ("gitpod_registry_facade_downstream_blob_req_bytes_total", "counter"),
    ] {
        assert!(after.contains(&format!("# TYPE {name} {kind}")), "{name} is not a {kind}");
    }
    assert!(after.contains(r#"gitpod_registry_facade_registry_manifest_req_seconds_bucket{le="1800"}"#));
    assert!(after.contains(
        r#"gitpod_registry_facade_registry_blob_req_bytes_second_bucket{blobSource="proxy",le="17179869184"}"#
    ));
    // Gauges return to zero once responses and fills are done (bounded wait: an aborted
    // response is dropped when its connection is).
    // `find`: a series that is missing is not a drained one.
    let mut last = (None, None, None);
    let drained = test_support::wait::poll(std::time::Duration::from_secs(10), test_support::wait::EVERY, || {
        let now = scrape();
        last = (
            test_support::metrics::find(&now, "registry_facade_inflight_requests", &[]),
            test_support::metrics::find(&now, "registry_facade_inflight_fills", &[]),
            test_support::metrics::find(&now, "registry_facade_inflight_blob_bytes", &[]),
        );
        last == (Some(0.0), Some(0.0), Some(0.0))
    });
    let (requests, fills, bytes) = last;
    assert!(drained, "in flight: {requests:?} requests, {fills:?} fills, {bytes:?} bytes");
    // No series is labelled with a digest or a workspace id.
    for line in after.lines().filter(|l| l.starts_with("registry_facade_") || l.starts_with("gitpod_")) {
        assert!(!line.contains("sha256") && !line.contains("big") && !line.contains("small"), "{line}");
    }
}

#[test]
fn legacy_metric_names_can_be_turned_off() {
    let reg = Registry::start().unwrap();
    let small = build_layer(&[FileEntry::file("small.txt", "small")], LayerCompression::Gzip);
    let small_digest = small.digest.clone();
    push_image(&reg, "small:1", &ImageBuilder::new().layer(small).build(), PushFormat::Oci).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"small": {"baseRef": format!("{}/small:1", reg.host())}}).to_string(),
    )
    .unwrap();
    let metrics_port = free_port();
    let facade = Facade::start(
        &json!({"registry": {"port": 0, "fixedSpecFN": "specs.json"},
                "prometheusAddr": format!("127.0.0.1:{metrics_port}"),
                "facade": {"listenHost": "127.0.0.1", "legacyMetrics": false}}),
        dir.path(),
    )
    .unwrap();
    let h = facade.host();
    assert_eq!(request(&h, "GET", "/v2/fixed/small/manifests/latest", &[], b"").status, 200);
    assert_eq!(get(&h, &format!("/v2/fixed/small/blobs/{small_digest}"), &[], None).unwrap().digest, small_digest);
    let text =
        String::from_utf8(request(&format!("127.0.0.1:{metrics_port}"), "GET", "/metrics", &[], b"").body).unwrap();
    assert!(metric(&text, "registry_facade_blob_bytes_total", &[]) > 0.0, "{text}");
    assert!(!text.contains("gitpod_registry_facade_"), "{text}");
}
