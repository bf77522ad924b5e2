//! `registry-facade setup` writes a `hosts.toml` that a real containerd uses for a pull; with
//! `--ca` it is spoken to over TLS, and a missing workspace is "not found" (the
//! installer's own arguments, with the CRI plugin, are in setup_cri.rs).
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
    // No CA anywhere (not even at the installer's path, whatever this machine has there).
    let written = registry_facade::setup::setup(
        &registry_facade::setup::SetupOptions {
            hostname: "127.0.0.1".into(),
            port: facade.addr.port(),
            hostfs: hostfs.path().into(),
            ca: None,
        },
        &hostfs.path().join("no-installer-ca.crt"),
    )
    .unwrap()
    .hosts_toml;
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

#[test]
fn containerd_pulls_over_tls_with_an_explicit_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    assert!(Containerd::available(), "containerd/ctr missing or not root: run `make deps` as root");
    let reg = Registry::start().unwrap();
    let base = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("etc/tls", "pulled over TLS")], LayerCompression::Gzip))
        .build();
    push_image(&reg, "base:1", &base, PushFormat::Oci).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "setup test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
    std::fs::write(dir.path().join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/base:1", reg.host())}}).to_string(),
    )
    .unwrap();
    let facade = Facade::start(
        &json!({
            "registry": {"port": 0, "fixedSpecFN": "specs.json", "tls": {"crt": "tls.crt", "key": "tls.key"}},
            "facade": {"listenHost": "127.0.0.1"}
        }),
        dir.path(),
    )
    .unwrap();

    // An installer CA that must lose against --ca: it is not PEM, so using it would fail.
    let decoy = dir.path().join("installer-ca.crt");
    std::fs::write(&decoy, "not a certificate").unwrap();
    let hostfs = tempfile::tempdir().unwrap();
    let report = registry_facade::setup::setup(
        &registry_facade::setup::SetupOptions {
            hostname: "127.0.0.1".into(),
            port: facade.addr.port(),
            hostfs: hostfs.path().into(),
            ca: Some(dir.path().join("ca.pem")),
        },
        &decoy,
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(report.ca.unwrap()).unwrap(), ca_pem);
    assert_eq!(report.etc_hosts, registry_facade::setup::EtcHosts::NotAName);

    let ctr = Containerd::start().unwrap();
    let pull = |image: &str| {
        let mut cmd = ctr.ctr();
        cmd.args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(hostfs.path().join("etc/containerd/certs.d"))
            .arg(image);
        cmd.output().unwrap()
    };
    let image = format!("{}/fixed/ws:latest", facade.host());
    let out = pull(&image);
    assert!(
        out.status.success(),
        "ctr pull over TLS failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        ctr.log()
    );
    assert_eq!(ctr.rootfs_files(&image).unwrap()["etc/tls"], b"pulled over TLS");

    // The 404 falls back to `server`, which has the CA too: "not found", not an x509 error.
    let out = pull(&format!("{}/fixed/missing:latest", facade.host()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not found") && !stderr.contains("x509"), "{stderr}");
}
