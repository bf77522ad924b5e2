//! `registry-facade setup` run with exactly the arguments of the reference installer's
//! init container (`--hostfs=… --hostname=reg.<domain> --port=…`, no CA flag, the CA mounted at
//! /usr/local/share/ca-certificates/gitpod-ca.crt) leaves a node whose containerd pulls a
//! workspace image over TLS through its CRI plugin, the way the kubelet does, and reports a
//! missing workspace as "not found" rather than as a certificate error.
//!
//! The test owns neither this machine's CA directory nor its /etc/hosts: setup and containerd
//! each run in a private mount namespace (`unshare --mount`) where the test's files are mounted
//! over those paths. The temp dir plays the node's root filesystem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;
use test_support::cargo_bin::cargo_bin;
use test_support::containerd::{Containerd, Options};
use test_support::cri::CriImages;
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::proc::{KillOnDrop, free_port, have, run_bytes, wait_for_tcp};
use test_support::registry::Registry;

/// The name the installer passes as `--hostname` (`reg.<domain>`); `.test` never resolves
/// anywhere but through the hosts file setup writes.
const HOST: &str = "reg.registry-facade.test";

/// What the node's hosts file held before setup: no final newline, on purpose.
const NODE_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback";

/// A CA and a serving certificate for [`HOST`] it signed: (CA PEM, cert PEM, key PEM).
fn pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "registry-facade test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![HOST.to_string()]).unwrap();
    (ca_pem, leaf.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
}

/// Runs the real `registry-facade setup` with the installer's arguments, in a mount namespace
/// where `ca` is the file at the installer's mount path. Returns setup's stderr (its log).
fn run_installer_setup(bin: &Path, ca: &Path, hostfs: &Path, port: u16) -> String {
    // A tmpfs over the CA directory hides this machine's CAs from setup only, and lets the test
    // put gitpod-ca.crt there without writing to the real directory.
    let script = r#"set -e
d=/usr/local/share/ca-certificates
if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d"; else mount -t tmpfs tmpfs /usr/local/share; mkdir "$d"; fi
cp "$1" "$d/gitpod-ca.crt"
shift
exec "$@" 2>&1"#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"])
        .arg(ca)
        .arg(bin)
        .arg("setup")
        .arg(format!("--hostfs={}", hostfs.display()))
        .arg(format!("--hostname={HOST}"))
        .arg(format!("--port={port}"));
    let out = run_bytes(cmd, Duration::from_secs(60)).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The real facade binary serving TLS on 127.0.0.1:`port`; killed on drop.
fn start_facade(bin: &Path, dir: &Path, port: u16) -> KillOnDrop {
    let cfg = json!({
        "registry": {
            "port": port,
            "fixedSpecFN": "specs.json",
            "tls": {"crt": "tls.crt", "key": "tls.key"}
        },
        "facade": {"listenHost": "127.0.0.1"}
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg(dir.join("config.json")).env("RUST_LOG", "info");
    let mut facade = KillOnDrop::spawn("registry-facade", cmd, &dir.join("facade.log")).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if let Err(e) = wait_for_tcp(addr, Duration::from_secs(30)) {
        let _ = facade.check_running();
        panic!("{e}: {}", std::fs::read_to_string(dir.join("facade.log")).unwrap_or_default());
    }
    facade
}

#[test]
fn installer_setup_lets_cri_pull_over_tls_and_report_missing_workspaces() {
    // `make test` installs containerd and runs as root; without either this fails, not skips.
    assert!(Containerd::available(), "containerd/ctr missing or not root: run `make deps` as root");
    assert!(have("unshare") && have("mount"), "unshare/mount (util-linux) missing");
    let bin = cargo_bin("registry-facade", "registry-facade").unwrap();

    let reg = Registry::start().unwrap();
    let base = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("etc/hello", "hello over TLS")], LayerCompression::Gzip))
        .build();
    push_image(&reg, "base:1", &base, PushFormat::Oci).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (ca, crt, key) = pki();
    std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
    std::fs::write(dir.path().join("tls.crt"), crt).unwrap();
    std::fs::write(dir.path().join("tls.key"), key).unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/base:1", reg.host())}}).to_string(),
    )
    .unwrap();
    let port = free_port();
    let facade = start_facade(&bin, dir.path(), port);

    // The node: an /etc/hosts of its own and an empty containerd certs.d.
    let node = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(node.path().join("etc/containerd/certs.d")).unwrap();
    std::fs::write(node.path().join("etc/hosts"), NODE_HOSTS).unwrap();

    let log = run_installer_setup(&bin, &dir.path().join("ca.pem"), node.path(), port);
    let host_dir = node.path().join(format!("etc/containerd/certs.d/{HOST}:{port}"));
    assert_eq!(
        std::fs::read_to_string(host_dir.join("hosts.toml")).unwrap(),
        registry_facade::setup::hosts_toml(HOST, port, true),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(host_dir.join("ca.crt")).unwrap(), ca);
    let hosts = format!("{NODE_HOSTS}\n127.0.0.1 {HOST}\n");
    assert_eq!(std::fs::read_to_string(node.path().join("etc/hosts")).unwrap(), hosts, "{log}");
    // The init container runs again on every pod start.
    let log = run_installer_setup(&bin, &dir.path().join("ca.pem"), node.path(), port);
    assert_eq!(std::fs::read_to_string(node.path().join("etc/hosts")).unwrap(), hosts, "{log}");

    let ctr = Containerd::start_with(Options {
        cri_registry_config_path: Some(node.path().join("etc/containerd/certs.d")),
        etc_hosts: Some(node.path().join("etc/hosts")),
    })
    .unwrap();
    let mut cri = CriImages::connect(ctr.socket()).unwrap();
    let image = format!("{HOST}:{port}/fixed/ws:latest");
    let image_ref = cri.pull(&image).unwrap_or_else(|s| {
        panic!(
            "CRI pull of {image} failed: {s}\ncontainerd log:\n{}\nfacade log:\n{}",
            ctr.log(),
            facade_log(dir.path())
        )
    });
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    let status = cri.status(&image).unwrap().expect("CRI knows the pulled image");
    assert_eq!(status.id, image_ref);
    assert!(status.repo_tags.contains(&image), "{:?}", status.repo_tags);
    assert_eq!(ctr.rootfs_files(&image).unwrap()["etc/hello"], b"hello over TLS");

    // A workspace the facade does not know: containerd falls back from the [host] entry to
    // `server` after the 404, and with the CA on both the kubelet hears "not found".
    let missing = format!("{HOST}:{port}/fixed/no-such-workspace:latest");
    let err = cri.pull(&missing).expect_err("a missing workspace cannot be pulled");
    let msg = err.message().to_string();
    assert!(msg.contains("not found"), "{err}");
    assert!(!msg.contains("x509") && !msg.contains("certificate"), "{err}");

    // Control: with the CA on the [host] entry only, the same pull ends in the x509 error the
    // top-level `ca` prevents (containerd reads hosts.toml on every pull).
    let text = std::fs::read_to_string(host_dir.join("hosts.toml")).unwrap();
    let host_only: String = text.lines().filter(|l| *l != "ca = \"ca.crt\"").map(|l| format!("{l}\n")).collect();
    assert_ne!(host_only, text, "the top-level ca line is where the test expects it");
    std::fs::write(host_dir.join("hosts.toml"), host_only).unwrap();
    let err = cri.pull(&missing).expect_err("a missing workspace cannot be pulled");
    assert!(err.message().contains("x509"), "{err}");
    drop(facade);
}

fn facade_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("facade.log")).unwrap_or_default()
}
