//! Memory ceilings with the real binary: clients that ask for a layer and never read must not
//! grow the facade's memory by what they asked for (README, `facade.maxBufferedResponseBytes`),
//! and a client that does read still gets its layer while they sit there.
//!
//! Without the budget (measured with `maxBufferedResponseBytes: 16GiB`) each such client pinned
//! about 2.2 MiB (a 1 MiB chunk in hyper's write buffer plus a 1 MiB read-ahead): 300 of them
//! took the debug binary from 28 to 693 MiB, past the shipped DaemonSet limit of 512 MiB
//! (deploy/). With the default 64 MiB budget it peaked at 147–162 MiB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::metrics;
use test_support::proc::{KillOnDrop, free_port, wait_for_tcp};
use test_support::registry::Registry;
use test_support::wait;

const MIB: u64 = 1 << 20;
const LAYER: usize = 8 << 20;
const CLIENTS: usize = 300;
/// The bound asserted on the facade's resident memory while the clients sit there: half the
/// shipped DaemonSet limit.
const RSS_BOUND: u64 = 256 * MIB;

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

fn scrape(addr: &str) -> String {
    e2e::http::request(addr, "GET", "/metrics", &[], b"").body.into_iter().map(char::from).collect()
}

fn start_facade(dir: &Path, port: u16, metrics_port: u16) -> KillOnDrop {
    let config = json!({
        "registry": {"port": port, "store": "store", "fixedSpecFN": "specs.json"},
        "prometheusAddr": format!("127.0.0.1:{metrics_port}"),
        // Every client comes from 127.0.0.1: the per-IP limit is not what this test is about.
        "facade": {"listenHost": "127.0.0.1", "maxRequestsPerClient": 1000}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bin = test_support::cargo_bin::cargo_bin("registry-facade", "registry-facade").unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg(dir.join("config.json")).env("RUST_LOG", "warn");
    let facade = KillOnDrop::spawn("registry-facade", cmd, &dir.join("facade.log")).unwrap();
    wait_for_tcp(format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_secs(60)).unwrap();
    facade
}

#[test]
fn clients_that_do_not_read_cannot_grow_memory_past_the_budget() {
    let reg = Registry::start().unwrap();
    let layer = build_layer(&[FileEntry::file("big.bin", e2e::noise(LAYER, 11))], LayerCompression::None);
    let digest = layer.digest.clone();
    push_image(&reg, "big:1", &ImageBuilder::new().layer(layer).build(), PushFormat::Oci).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/big:1", reg.host())}}).to_string(),
    )
    .unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let mut facade = start_facade(dir.path(), port, metrics_port);
    let pid = facade.child.id();
    let addr = format!("127.0.0.1:{port}");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let path = format!("/v2/fixed/ws/blobs/{digest}");

    // Warm: the layer is in the store, so every stalled client reads a stored file.
    let warm = e2e::stream::get(&addr, &path, &[], None).unwrap();
    assert_eq!((warm.status, warm.digest.as_str()), (200, digest.as_str()));
    let before = rss(pid);

    let mut stalled = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();
        stalled.push(s);
    }
    wait::until("every stalled request in flight", Duration::from_secs(60), || {
        metrics::value(&scrape(&metrics_addr), "registry_facade_inflight_requests", &[("route", "blob")])
            >= CLIENTS as f64
    });
    // Settled: the bytes handed to responses stop growing once every stalled client's socket
    // and buffers are full.
    let mut last = -1.0;
    let mut peak = 0;
    let settled = wait::poll(Duration::from_secs(60), Duration::from_millis(500), || {
        peak = peak.max(rss(pid));
        let now = metrics::value(&scrape(&metrics_addr), "registry_facade_blob_bytes_total", &[]);
        std::mem::replace(&mut last, now) == now
    });
    assert!(settled, "blob bytes kept moving to clients that read nothing");

    // Another client still gets the whole layer, verified.
    let pulled = e2e::stream::get(&addr, &path, &[], None).unwrap();
    assert_eq!((pulled.status, pulled.digest.as_str()), (200, digest.as_str()));
    peak = peak.max(rss(pid));
    facade.check_running().unwrap();
    eprintln!(
        "facade RSS: {} MiB before, {} MiB peak with {CLIENTS} stalled clients ({} KiB each)",
        before / MIB,
        peak / MIB,
        peak.saturating_sub(before) / 1024 / CLIENTS as u64
    );
    assert!(
        peak < RSS_BOUND,
        "facade RSS {} MiB with {CLIENTS} stalled clients (bound {} MiB)",
        peak / MIB,
        RSS_BOUND / MIB
    );
    drop(stalled);
}
