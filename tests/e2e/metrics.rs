//! Issue #6: every metric moves when its event happens (requests, first bytes by source,
//! upstream requests and retries, single-flight joins, cache hits, back-fill, digest
//! mismatches, aborted responses, store size).
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

/// Sum of the samples of `name` whose labels include every `key="value"` of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

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
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"big": {"baseRef": format!("{}/big:1", proxy.host())},
               "big2": {"baseRef": format!("{}/big2:1", proxy.host())},
               "small": {"baseRef": format!("{}/small:1", proxy.host())}})
        .to_string(),
    )
    .unwrap();
    let metrics_port = free_port();
    let facade = Facade::start(
        &json!({"registry": {"port": 0, "fixedSpecFN": "specs.json", "store": "store"},
                "prometheusAddr": format!("127.0.0.1:{metrics_port}"),
                "facade": {"listenHost": "127.0.0.1"}}),
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
    // Gauges return to zero once responses and fills are done (bounded wait: an aborted
    // response is dropped when its connection is).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = scrape();
        let (requests, fills) = (
            metric(&now, "registry_facade_inflight_requests", &[]),
            metric(&now, "registry_facade_inflight_fills", &[]),
        );
        let bytes = metric(&now, "registry_facade_inflight_blob_bytes", &[]);
        if requests == 0.0 && fills == 0.0 && bytes == 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "in flight: {requests} requests, {fills} fills, {bytes} bytes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // No series is labelled with a digest or a workspace id.
    for line in after.lines().filter(|l| l.starts_with("registry_facade_")) {
        assert!(!line.contains("sha256") && !line.contains("big") && !line.contains("small"), "{line}");
    }
}
