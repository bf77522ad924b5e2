//! Operations (README, "What it does" and `docs/migration.md`), with the real binary: restart under load without a lost pull (SO_REUSEPORT
//! hand-over and drain), config reload with a new static layer, liveness independent of the
//! upstream, TLS and client auth from the config file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use test_support::fault_proxy::{FaultProxy, Faults};
use test_support::image::{
    FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, build_tar, gzip, push_image,
};
use test_support::proc::{free_port, wait_for_tcp};
use test_support::registry::Registry;
use test_support::skopeo;
use test_support::wait;

const BIN: &str = env!("CARGO_BIN_EXE_registry-facade");
const MIB: usize = 1 << 20;

struct Proc(Child);

impl Proc {
    fn start(config: &Path) -> Proc {
        Self::spawn(config, Stdio::inherit())
    }
    /// With the log (stderr) in `log`, for tests that wait for what the facade reports there.
    fn start_logged(config: &Path, log: &Path) -> Proc {
        Self::spawn(config, Stdio::from(std::fs::File::create(log).unwrap()))
    }
    fn spawn(config: &Path, stderr: Stdio) -> Proc {
        let child = Command::new(BIN)
            .arg("run")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Proc(child)
    }
    fn term(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
    }
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait::poll(limit, wait::EVERY, || {
            status = self.0.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(raw.len());
    let status = String::from_utf8_lossy(&raw[..split]).split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, raw.get(split + 4..).unwrap_or_default().to_vec())
}

fn write_config(dir: &Path, port: u16, extra: Value) -> std::path::PathBuf {
    let mut cfg = json!({
        "registry": {"port": port, "fixedSpecFN": "specs.json", "store": "store"},
        "readinessProbeAddr": format!("127.0.0.1:{}", free_port()),
        "facade": {"listenHost": "127.0.0.1", "shutdownGrace": "60s"}
    });
    merge(&mut cfg, extra);
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    p
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

#[test]
fn a_restart_under_load_loses_no_pull() {
    let reg = Registry::start().unwrap();
    let layer = build_layer(
        &[FileEntry::file("big.bin", test_support::wire::noise(256 * MIB, 0x9e3779b97f4a7c15))],
        LayerCompression::None,
    );
    let layer_digest = layer.digest.clone();
    push_image(&reg, "big:1", &ImageBuilder::new().layer(layer).build(), PushFormat::Oci).unwrap();
    // A throttled upstream keeps the pulls in flight while the facade is replaced.
    let proxy = FaultProxy::start(reg.addr).unwrap();
    proxy.set_faults(Faults { throttle_bytes_per_sec: Some(48 * MIB as u64), ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/big:1", proxy.host())}}).to_string(),
    )
    .unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = write_config(dir.path(), port, json!({}));
    let mut old = Proc::start(&config);
    wait_for_tcp(addr, Duration::from_secs(20)).unwrap();

    let image = format!("127.0.0.1:{port}/fixed/ws:latest");
    let outs: Vec<tempfile::TempDir> = (0..10).map(|_| tempfile::tempdir().unwrap()).collect();
    std::thread::scope(|s| {
        let pulls: Vec<_> = outs
            .iter()
            .map(|o| {
                let image = image.clone();
                s.spawn(move || skopeo::copy_to_oci_preserving_digests(&image, o.path(), "latest"))
            })
            .collect();
        // Let the pulls get going, then hand the port over: new process first, then SIGTERM.
        std::thread::sleep(Duration::from_millis(1500));
        // The old process answers `/v2/` too, so the sign the new one is up is its own log line.
        let new_log = dir.path().join("new.log");
        let new = Proc::start_logged(&config, &new_log);
        wait::until("the new facade to serve", Duration::from_secs(20), || {
            std::fs::read_to_string(&new_log).unwrap_or_default().contains("registry-facade serving")
        });
        old.term();
        for p in pulls {
            p.join().unwrap().expect("a pull failed across the restart");
        }
        let status = old.wait_exit(Duration::from_secs(60)).expect("the old facade did not exit after draining");
        assert!(status.success(), "old facade exited with {status}");
        // The new one serves on.
        assert_eq!(http_get(addr, "/v2/fixed/ws/manifests/latest").0, 200);
        drop(new);
    });
    for o in &outs {
        let img = skopeo::read_oci_layout(o.path(), "latest").unwrap();
        assert_eq!(img.manifest["layers"][0]["digest"], layer_digest);
    }
}

#[test]
fn config_reload_swaps_static_layers_and_keeps_earlier_images() {
    let reg = Registry::start().unwrap();
    let base =
        ImageBuilder::new().layer(build_layer(&[FileEntry::file("etc/base", "base")], LayerCompression::Gzip)).build();
    push_image(&reg, "base:1", &base, PushFormat::Oci).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/base:1", reg.host())}}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("tools.tar.gz"), gzip(&build_tar(&[FileEntry::file("opt/tools/v2", "new tool")])))
        .unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = write_config(dir.path(), port, json!({"facade": {"composeTTL": "1s"}}));
    let log = dir.path().join("facade.log");
    let mut facade = Proc::start_logged(&config, &log);
    wait_for_tcp(addr, Duration::from_secs(20)).unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let (status, body) = http_get(addr, "/v2/fixed/ws/manifests/latest");
    assert_eq!(status, 200);
    let before: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(before["layers"].as_array().unwrap().len(), 1);
    let before_digest = test_support::image::sha256_digest(&body);

    // A bad config is rejected and the running one kept. The rejection is logged (the
    // configuration reload exposes no counter of its own), so the test waits for that line:
    // without a reload attempt it never appears.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"registry\"", "\"registry\": {\"bogus\": 1}, \"x\"")).unwrap();
    wait::until("the bad configuration to be rejected", Duration::from_secs(20), || {
        log_text().contains("configuration reload rejected")
    });
    assert!(facade.0.try_wait().unwrap().is_none(), "a rejected reload stopped the facade:\n{}", log_text());
    assert!(!log_text().contains("configuration reloaded"), "the bad configuration was applied:\n{}", log_text());
    let (status, body) = http_get(addr, "/v2/fixed/ws/manifests/latest");
    assert_eq!(status, 200);
    assert_eq!(test_support::image::sha256_digest(&body), before_digest, "the running configuration changed");

    // Now a good one with a static file layer.
    write_config(
        dir.path(),
        port,
        json!({"facade": {"composeTTL": "1s"}, "registry": {"staticLayer": [{"ref": "tools.tar.gz", "type": "file"}]}}),
    );
    let mut after = Value::Null;
    wait::until("the reload to take effect", Duration::from_secs(20), || {
        let (status, body) = http_get(addr, "/v2/fixed/ws/manifests/latest");
        assert_eq!(status, 200);
        after = serde_json::from_slice(&body).unwrap();
        after["layers"].as_array().unwrap().len() == 2
    });
    assert!(log_text().contains("configuration reloaded"), "no reload logged:\n{}", log_text());
    let tool = after["layers"][1]["digest"].as_str().unwrap();
    let (status, blob) = http_get(addr, &format!("/v2/fixed/ws/blobs/{tool}"));
    assert_eq!(status, 200);
    assert_eq!(test_support::image::sha256_digest(&blob), tool);
    // The image composed before is still pullable by digest, with the same bytes.
    let (status, old) = http_get(addr, &format!("/v2/fixed/ws/manifests/{before_digest}"));
    assert_eq!(status, 200);
    assert_eq!(test_support::image::sha256_digest(&old), before_digest);
}

#[test]
fn liveness_does_not_depend_on_the_upstream() {
    let mut reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/base:1", reg.host())}}).to_string(),
    )
    .unwrap();
    let port = free_port();
    let probes = free_port();
    let config = write_config(dir.path(), port, json!({"readinessProbeAddr": format!("127.0.0.1:{probes}")}));
    reg.stop();
    let _facade = Proc::start(&config);
    let probe: SocketAddr = ([127, 0, 0, 1], probes).into();
    wait_for_tcp(probe, Duration::from_secs(20)).unwrap();
    for _ in 0..3 {
        assert_eq!(http_get(probe, "/live").0, 200);
        assert_eq!(http_get(probe, "/ready").0, 200);
        // A pull fails properly meanwhile.
        let (status, _) = http_get(([127, 0, 0, 1], port).into(), "/v2/fixed/ws/manifests/latest");
        assert_eq!(status, 503);
    }
}

#[test]
fn readiness_follows_the_spec_provider_and_liveness_does_not() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
    std::fs::write(dir.path().join("remote.json"), json!({"ws": {"baseRef": "127.0.0.1:1/base:1"}}).to_string())
        .unwrap();
    let (port, probes, spec_port) = (free_port(), free_port(), free_port());
    let config = write_config(
        dir.path(),
        port,
        json!({"readinessProbeAddr": format!("127.0.0.1:{probes}"),
               "registry": {"remoteSpecProvider": [{"addr": format!("127.0.0.1:{spec_port}")}]},
               "facade": {"specTimeout": "500ms"}}),
    );
    let _facade = Proc::start(&config);
    let probe: SocketAddr = ([127, 0, 0, 1], probes).into();
    wait_for_tcp(probe, Duration::from_secs(20)).unwrap();
    let wait_for = |want: u16| {
        wait::until(&format!("/ready to answer {want}"), Duration::from_secs(20), || {
            http_get(probe, "/ready").0 == want
        })
    };
    // No spec server yet: alive, not ready.
    wait_for(503);
    assert_eq!(http_get(probe, "/live").0, 200);
    // The spec server comes up: ready without a restart.
    let mut spec = Command::new(BIN)
        .args(["spec-server", "--file"])
        .arg(dir.path().join("remote.json"))
        .args(["--listen", &format!("127.0.0.1:{spec_port}")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(200);
    // And goes away again: not ready, still alive.
    let _ = spec.kill();
    let _ = spec.wait();
    wait_for(503);
    assert_eq!(http_get(probe, "/live").0, 200);
}

#[test]
fn bad_configs_are_refused_with_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
    for (cfg, needle) in [
        (
            json!({"registry": {"port": 1, "fixedSpecFN": "specs.json", "requireAuth": true}, "facade": {"htpasswd": ""}}),
            "facade.htpasswd: empty",
        ),
        (
            json!({"registry": {"port": 1, "fixedSpecFN": "specs.json", "tls": {"crt": "missing.pem", "key": "k.pem"}}}),
            "registry.tls.crt",
        ),
        (
            json!({"registry": {"port": 1, "fixedSpecFN": "specs.json", "staticLayer": [{"ref": "x", "type": "zip"}]}}),
            "registry.staticLayer[0].type",
        ),
    ] {
        let p = dir.path().join("c.json");
        std::fs::write(&p, cfg.to_string()).unwrap();
        let out = Command::new(BIN).arg("run").arg(&p).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{cfg}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}
