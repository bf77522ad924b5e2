//! Issue #6: `registry-facade setup` writes a `hosts.toml` that a real containerd uses for a pull.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::Facade;
use serde_json::json;
use test_support::containerd::Containerd;
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::registry::Registry;

#[test]
fn containerd_pulls_through_the_written_hosts_toml() {
    assert!(Containerd::available(), "containerd/ctr missing or not root: run `make deps` as root");
    let reg = Registry::start().unwrap();
    let base = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("etc/hello", "hello")], LayerCompression::Gzip))
        .build();
    push_image(&reg, "base:1", &base, PushFormat::Oci).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/base:1", reg.host())}}).to_string(),
    )
    .unwrap();
    let facade = Facade::start(
        &json!({"registry": {"port": 0, "fixedSpecFN": "specs.json"}, "facade": {"listenHost": "127.0.0.1"}}),
        dir.path(),
    )
    .unwrap();

    let hostfs = tempfile::tempdir().unwrap();
    let written = registry_facade::setup::run(&registry_facade::setup::SetupOptions {
        hostname: "127.0.0.1".into(),
        port: facade.addr.port(),
        hostfs: hostfs.path().into(),
        ca: None,
    })
    .unwrap();
    assert!(written.ends_with(format!("127.0.0.1:{}/hosts.toml", facade.addr.port())));

    let ctr = Containerd::start().unwrap();
    let image = format!("{}/fixed/ws:latest", facade.host());
    // No --plain-http: only the hosts.toml tells containerd to speak HTTP to the facade.
    let mut cmd = ctr.ctr();
    cmd.args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
        .arg(hostfs.path().join("etc/containerd/certs.d"))
        .arg(&image);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "ctr pull failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(ctr.rootfs_files(&image).unwrap()["etc/hello"], b"hello");

    // containerd speaks plain HTTP to loopback hosts on its own, so show that it consults the
    // file: pointed at a port where nothing listens, the same pull fails.
    let dead = test_support::proc::free_port();
    let text = std::fs::read_to_string(&written)
        .unwrap()
        .replace(&format!(":{}\"", facade.addr.port()), &format!(":{dead}\""));
    std::fs::write(&written, text).unwrap();
    let mut cmd = ctr.ctr();
    cmd.args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
        .arg(hostfs.path().join("etc/containerd/certs.d"))
        .arg(format!("{}/fixed/ws:other", facade.host()));
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "containerd ignored the hosts.toml");
}
