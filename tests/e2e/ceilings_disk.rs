//! One disk budget (README, "Configuration": `facade.storeMaxBytes`, `maxBlobBytes`,
//! `unreadFillGrace`; docs/blob-engine.md): a hostile registry's endless layer never takes the
//! node's disk, a download nobody reads stops, and a full disk never fails a pull. The facade
//! runs in-process with production wiring, against the scripted hostile registry and a real CNCF
//! distribution registry; the full disk is a real tmpfs of 16 MiB (the tests run as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::Facade;
use e2e::http::request;
use e2e::stream::get as stream_get;
use serde_json::{Value, json};
use test_support::hostile_registry::{Behaviour, HostileRegistry};
use test_support::image::{
    FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image, sha256_digest,
};
use test_support::metrics::find as metric;
use test_support::proc::free_port;
use test_support::registry::Registry;
use test_support::wait;

const MIB: u64 = 1 << 20;

/// A facade with a store at `store`, `facade` keys merged in, metrics on a port of its own.
fn facade(dir: &Path, store: &Path, specs: Value, facade_keys: Value, registry_extra: Value) -> (Facade, String) {
    std::fs::write(dir.join("specs.json"), specs.to_string()).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut cfg = json!({
        "registry": {"port": 0, "store": store, "fixedSpecFN": "specs.json"},
        "prometheusAddr": metrics,
        "facade": {"listenHost": "127.0.0.1", "platform": "linux/amd64", "shutdownGrace": "1s"}
    });
    for (k, v) in facade_keys.as_object().unwrap() {
        cfg["facade"][k] = v.clone();
    }
    for (k, v) in registry_extra.as_object().unwrap() {
        cfg["registry"][k] = v.clone();
    }
    (Facade::start(&cfg, dir).unwrap(), metrics)
}

fn scrape(metrics: &str) -> String {
    String::from_utf8(request(metrics, "GET", "/metrics", &[], b"").body).unwrap()
}

/// Bytes of every file under `dir` (blobs, spools, pins): what the facade puts on the disk.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A tmpfs of `size` mounted at `at` for the test's lifetime (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
        let out = out.expect("mount(8) runs");
        assert!(out.status.success(), "mounting a tmpfs (needs root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// (a) A layer declared 2 GiB that streams endlessly, read for 4 MiB and dropped by the client:
/// with a 128 MiB budget it is never stored (too large: streamed through), the download stops
/// with the client, and the store's directory stays within the budget. A smaller layer that
/// fits, trickled below the minimum rate and left unread, stops after the grace.
#[test]
fn an_endless_layer_read_and_dropped_stops_and_stays_within_the_budget() {
    let evil = HostileRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let endless = format!("sha256:{}", "e".repeat(64));
    let trickled = format!("sha256:{}", "7".repeat(64));
    evil.claimed_image("evil/endless", &[(endless.clone(), 2 << 30)]);
    evil.claimed_image("evil/slow", &[(trickled.clone(), 16 * MIB)]);
    evil.blob("evil/endless", &endless, Behaviour::Endless { length: 2 << 30, chunk: 64 << 10 });
    evil.blob(
        "evil/slow",
        &trickled,
        Behaviour::Trickle { bytes: vec![b'x'; 16 * MIB as usize], chunk: 1024, every: Duration::from_millis(500) },
    );
    let specs = json!({
        "ws-endless": {"baseRef": format!("{}/evil/endless:latest", evil.host())},
        "ws-slow": {"baseRef": format!("{}/evil/slow:latest", evil.host())},
    });
    let store = dir.path().join("store");
    let (f, metrics) = facade(dir.path(), &store, specs, json!({"storeMaxBytes": "128MiB"}), json!({}));

    assert_eq!(f.manifest_layers("ws-endless"), vec![(endless.clone(), 2 << 30)]);
    let started = Instant::now();
    let r = stream_get(&f.host(), &format!("/v2/fixed/ws-endless/blobs/{endless}"), &[], Some(4 * MIB)).unwrap();
    assert_eq!((r.status, r.content_length), (200, Some(2 << 30)));
    assert!(r.received >= 4 * MIB);
    // The client is gone: the origin's body stops moving within seconds.
    let mut last = evil.endless_bytes_sent();
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(2) {
        assert!(started.elapsed() < Duration::from_secs(20), "the endless download went on without a reader");
        std::thread::sleep(Duration::from_millis(200));
        let now = evil.endless_bytes_sent();
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
    }
    let sent = evil.endless_bytes_sent();
    assert!(sent < 64 * MIB, "{sent} bytes of the endless layer were downloaded for a 4 MiB read");
    let used = disk_usage(&store);
    assert!(used <= 128 * MIB, "the store dir holds {used} bytes, over its 128 MiB budget");
    let m = scrape(&metrics);
    assert_eq!(metric(&m, "registry_facade_blob_passthrough_total", &[("reason", "too_large")]), Some(1.0), "{m}");
    assert_eq!(metric(&m, "registry_facade_store_budget_bytes", &[]), Some((128 * MIB) as f64));

    // The slow layer fits the budget (16 MiB ≤ 32 MiB, a quarter): it is filled, and when its
    // reader leaves at 2 KiB/s (below the 8 KiB/s minimum) it stops after the 5 s grace.
    let r = stream_get(&f.host(), &format!("/v2/fixed/ws-slow/blobs/{trickled}"), &[], Some(2048)).unwrap();
    assert_eq!(r.status, 200);
    let left = Instant::now();
    wait::until("the unread fill to stop", Duration::from_secs(20), || {
        let m = scrape(&metrics);
        metric(&m, "registry_facade_fills_abandoned_total", &[]) == Some(1.0)
            && metric(&m, "registry_facade_inflight_fills", &[]) == Some(0.0)
    });
    assert!(left.elapsed() >= Duration::from_secs(4), "stopped before the grace: {:?}", left.elapsed());
    wait::until("the spool's reservation released", Duration::from_secs(5), || {
        metric(&scrape(&metrics), "registry_facade_store_reserved_bytes", &[]) == Some(0.0)
    });
    assert!(disk_usage(&store) <= 128 * MIB);
}

/// (b) The store on a 16 MiB tmpfs and an image of three 8 MiB layers pulled at once: the disk
/// fills up under the fills; every layer still arrives whole and verified (the fills' readers
/// go on from the origin), and the next pull streams through while the disk is full.
#[test]
fn a_full_disk_never_fails_a_pull() {
    let reg = Registry::start().unwrap();
    let layers: Vec<_> = (0..3u8)
        .map(|i| {
            build_layer(
                &[FileEntry::file(format!("blob{i}.bin"), e2e::noise(8 * MIB as usize, u64::from(i) + 10))],
                LayerCompression::Gzip,
            )
        })
        .collect();
    let image = layers.iter().cloned().fold(ImageBuilder::new(), |b, l| b.layer(l)).build();
    push_image(&reg, "big/three:1", &image, PushFormat::Oci).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let _tmpfs = Tmpfs::mount(&store, "16m");
    let specs = json!({"ws": {"baseRef": format!("{}/big/three:1", reg.host())}});
    let (f, metrics) = facade(dir.path(), &store, specs, json!({}), json!({}));

    let want: Vec<(String, u64)> = layers.iter().map(|l| (l.digest.clone(), l.bytes.len() as u64)).collect();
    assert_eq!(f.manifest_layers("ws"), want);
    for round in 0..2 {
        let pulls: Vec<_> = want
            .iter()
            .map(|(digest, size)| {
                let (host, digest, size) = (f.host(), digest.clone(), *size);
                std::thread::spawn(move || {
                    let r = stream_get(&host, &format!("/v2/fixed/ws/blobs/{digest}"), &[], None).unwrap();
                    assert_eq!((r.status, r.received, r.truncated), (200, size, false), "round {round}: {digest}");
                    assert_eq!(r.digest, digest, "round {round}: wrong bytes");
                })
            })
            .collect();
        for p in pulls {
            p.join().unwrap();
        }
        // The first round filled the disk: reads went on (or started) from the origin.
        let m = scrape(&metrics);
        let enospc = metric(&m, "registry_facade_blob_passthrough_total", &[("reason", "enospc")]).unwrap_or(0.0);
        assert!(enospc >= 1.0 + round as f64 * 3.0, "round {round}: reads were not streamed through:\n{m}");
    }
}

/// (c) A static file layer that cannot be written at startup (the disk is full): the facade
/// starts anyway, that layer answers 503 until it can be written, and once there is room it is
/// written and served.
#[test]
fn a_static_layer_that_cannot_be_written_at_startup_does_not_stop_the_facade() {
    let reg = Registry::start().unwrap();
    let base = build_layer(&[FileEntry::file("etc/base", "base")], LayerCompression::Gzip);
    push_image(&reg, "base/a:1", &ImageBuilder::new().layer(base).build(), PushFormat::Oci).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let static_layer =
        build_layer(&[FileEntry::file("tool.bin", e2e::noise(3 * MIB as usize, 7))], LayerCompression::Gzip);
    std::fs::write(dir.path().join("static.tar.gz"), &static_layer.bytes).unwrap();
    let store = dir.path().join("store");
    let _tmpfs = Tmpfs::mount(&store, "4m");
    // Fill the disk, leaving less than the layer needs.
    let filler = store.join("filler");
    std::fs::write(&filler, vec![0u8; 2 * MIB as usize]).unwrap();
    let specs = json!({"ws": {"baseRef": format!("{}/base/a:1", reg.host())}});
    let (f, _metrics) = facade(
        dir.path(),
        &store,
        specs,
        json!({}),
        json!({"staticLayer": [{"ref": "static.tar.gz", "type": "file"}]}),
    );
    assert!(f.manifest_layers("ws").contains(&(static_layer.digest.clone(), static_layer.bytes.len() as u64)));
    let path = format!("/v2/fixed/ws/blobs/{}", static_layer.digest);
    let r = request(&f.host(), "GET", &path, &[], b"");
    assert_eq!((r.status, r.error_code()), (503, Some("UNAVAILABLE".into())), "{}", String::from_utf8_lossy(&r.body));

    std::fs::remove_file(&filler).unwrap();
    wait::until("the static layer served once there is room", Duration::from_secs(20), || {
        let r = request(&f.host(), "GET", &path, &[], b"");
        r.status == 200 && sha256_digest(&r.body) == static_layer.digest
    });
}
