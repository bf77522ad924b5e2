//! HTTPS on the registry listener: the certificate served, ALPN, and hot reload when the files
//! change (plain overwrite, Kubernetes `..data` symlink swap, broken files).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tls::{self as t, Ca, Conn, Leaf};
use common::{BOUND, MemBackend, TestServer};
use facade_server::{Error, ServerConfig, TlsFiles};

fn config(files: TlsFiles) -> ServerConfig {
    ServerConfig { tls: Some(files), file_poll_interval: Duration::from_millis(50), ..ServerConfig::default() }
}

async fn wait_for_counter(server: &TestServer, name: &str, labels: &[(&str, &str)], at_least: u64) {
    test_support::wait::until_async(&format!("{name}{labels:?} to reach {at_least}"), BOUND, || async move {
        server.counter(name, labels) >= at_least
    })
    .await;
}

const RELOADS: &str = "registry_facade_file_reloads_total";

/// Write-then-rename, so a poll never sees a half-written file and each call is one version.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn serves_https_with_the_configured_certificate_and_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let leaf = ca.leaf("leaf one");
    let server = TestServer::try_start(config(t::write_leaf(dir.path(), &leaf)), MemBackend::standard()).await.unwrap();

    let s = t::handshake(server.addr, &ca).await.unwrap();
    assert_eq!(t::presented(&s), leaf.der);
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 is offered first and chosen");
    let r = t::get(s, "/v2/remote/ws1/manifests/latest", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], common::OCI_BODY);

    for (alpn, versions, want) in [
        (&[&b"http/1.1"[..]][..], rustls::ALL_VERSIONS, Some(&b"http/1.1"[..])),
        (&[], rustls::ALL_VERSIONS, None),
        (&[&b"h2"[..]][..], &[&rustls::version::TLS12][..], Some(&b"h2"[..])),
        (&[], &[&rustls::version::TLS13][..], None),
    ] {
        let s = t::connect(server.addr, t::client_config(&ca, alpn, versions)).await.unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), want);
        assert_eq!(s.get_ref().1.protocol_version(), Some(versions[0].version));
        let r = t::get(s, "/v2/", &[]).await;
        assert_eq!(r.status, 200, "{want:?} {:?}", versions[0].version);
    }

    // A client that trusts another CA refuses the certificate; plain HTTP gets no answer.
    let other = Ca::new("other ca");
    assert!(t::handshake(server.addr, &other).await.is_err());
    let plain = common::try_send(&common::http1_client(), http::Method::GET, &server.url("/v2/"), &[]).await;
    assert!(plain.is_err(), "plain HTTP must not be served on a TLS listener");
    assert_eq!(server.counter(RELOADS, &[("file", "tls"), ("outcome", "ok")]), 0);
}

#[tokio::test]
async fn next_handshake_after_a_swap_presents_the_new_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (one, two) = (ca.leaf("leaf one"), ca.leaf("leaf two"));
    let server = TestServer::try_start(config(t::write_leaf(dir.path(), &one)), MemBackend::standard()).await.unwrap();
    let s = t::handshake(server.addr, &ca).await.unwrap();
    assert_eq!(t::presented(&s), one.der);
    let mut open = Conn::new(s).await;
    assert_eq!(open.get("/v2/", &[]).await.status, 200);

    t::write_leaf(dir.path(), &two);
    assert!(t::wait_for_leaf(server.addr, &ca, &two).await, "the new certificate was never presented");
    // Every handshake from now on presents it.
    for _ in 0..3 {
        assert_eq!(t::presented(&t::handshake(server.addr, &ca).await.unwrap()), two.der);
    }
    // A connection made before the swap goes on working.
    assert_eq!(open.get("/v2/remote/ws1/manifests/latest", &[]).await.status, 200);
    assert!(server.counter(RELOADS, &[("file", "tls"), ("outcome", "ok")]) >= 1);
}

/// How Kubernetes updates a mounted Secret: the files are symlinks through `..data`, which is
/// atomically re-pointed at a new timestamped directory; the old directory is then deleted.
struct SecretMount {
    root: PathBuf,
    generation: u32,
}

impl SecretMount {
    fn new(root: &Path, leaf: &Leaf) -> Self {
        let mut m = SecretMount { root: root.to_path_buf(), generation: 0 };
        m.publish(leaf);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).unwrap();
        }
        m
    }

    fn files(&self) -> TlsFiles {
        TlsFiles { cert: self.root.join("tls.crt"), key: self.root.join("tls.key") }
    }

    fn publish(&mut self, leaf: &Leaf) {
        self.generation += 1;
        let dir_name = format!("..2024_01_01_00_00_0{}.{}", self.generation, 1000 + self.generation);
        let dir = self.root.join(&dir_name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), &leaf.key_pem).unwrap();
        let data = self.root.join("..data");
        let old = std::fs::read_link(&data).ok();
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&dir_name, &tmp).unwrap();
        std::fs::rename(&tmp, &data).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.root.join(old)).unwrap();
        }
    }
}

#[tokio::test]
async fn kubernetes_secret_symlink_swap_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (one, two, three) = (ca.leaf("leaf one"), ca.leaf("leaf two"), ca.leaf("leaf three"));
    let mut mount = SecretMount::new(dir.path(), &one);
    let server = TestServer::try_start(config(mount.files()), MemBackend::standard()).await.unwrap();
    assert_eq!(t::presented(&t::handshake(server.addr, &ca).await.unwrap()), one.der);

    mount.publish(&two);
    assert!(t::wait_for_leaf(server.addr, &ca, &two).await, "swap to leaf two not picked up");
    mount.publish(&three);
    assert!(t::wait_for_leaf(server.addr, &ca, &three).await, "swap to leaf three not picked up");
    let r = t::get(t::handshake(server.addr, &ca).await.unwrap(), "/v2/", &[]).await;
    assert_eq!(r.status, 200);
    // A symlink swap replaces both files at once: never a half-swapped pair.
    assert_eq!(server.counter(RELOADS, &[("file", "tls"), ("outcome", "error")]), 0);
}

#[tokio::test]
async fn a_broken_new_certificate_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (one, two) = (ca.leaf("leaf one"), ca.leaf("leaf two"));
    let files = t::write_leaf(dir.path(), &one);
    let server = TestServer::try_start(config(files.clone()), MemBackend::standard()).await.unwrap();
    let errors = [("file", "tls"), ("outcome", "error")];

    // A truncated certificate (a half-written file).
    let half = &one.cert_pem[..one.cert_pem.len() / 2];
    replace(&files.cert, half);
    wait_for_counter(&server, RELOADS, &errors, 1).await;
    assert_eq!(t::presented(&t::handshake(server.addr, &ca).await.unwrap()), one.der);

    // Not PEM at all.
    replace(&files.cert, "this is not a certificate\n");
    wait_for_counter(&server, RELOADS, &errors, 2).await;
    assert_eq!(t::presented(&t::handshake(server.addr, &ca).await.unwrap()), one.der);

    // A valid certificate whose key is another one's.
    replace(&files.cert, &two.cert_pem);
    wait_for_counter(&server, RELOADS, &errors, 3).await;
    let s = t::handshake(server.addr, &ca).await.unwrap();
    assert_eq!(t::presented(&s), one.der);
    assert_eq!(t::get(s, "/v2/", &[]).await.status, 200);

    // The matching key arrives: the pair is complete and served.
    replace(&files.key, &two.key_pem);
    assert!(t::wait_for_leaf(server.addr, &ca, &two).await);
    assert_eq!(server.counter(RELOADS, &[("file", "tls"), ("outcome", "ok")]), 1);
    assert_eq!(server.counter(RELOADS, &errors), 3, "each broken version is tried once, not once per poll");
}

#[tokio::test]
async fn bad_files_are_refused_by_try_new_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (one, two) = (ca.leaf("leaf one"), ca.leaf("leaf two"));
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cert = write("one.crt", &one.cert_pem);
    let key = write("one.key", &one.key_pem);
    let other_key = write("two.key", &two.key_pem);
    let garbage = write("garbage", "not PEM\n");
    let missing = dir.path().join("missing.crt");
    let cases: Vec<(TlsFiles, &str)> = vec![
        (TlsFiles { cert: missing.clone(), key: key.clone() }, "cannot read"),
        (TlsFiles { cert: garbage.clone(), key: key.clone() }, "no CERTIFICATE block"),
        (TlsFiles { cert: cert.clone(), key: garbage.clone() }, "no PRIVATE KEY block"),
        (TlsFiles { cert: cert.clone(), key: cert.clone() }, "no PRIVATE KEY block"),
        (TlsFiles { cert: cert.clone(), key: other_key.clone() }, "cannot be used with key"),
    ];
    for (files, want) in cases {
        let err = TestServer::try_start(config(files.clone()), MemBackend::standard()).await.err().unwrap();
        let text = err.to_string();
        assert!(text.contains(want), "{files:?}: {text}");
        let named = if matches!(err, Error::PrivateKey { .. }) { &files.key } else { &files.cert };
        assert!(text.contains(&named.display().to_string()), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }
}

#[tokio::test]
async fn lenient_app_refuses_handshakes_until_the_files_are_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let leaf = ca.leaf("late leaf");
    let files = TlsFiles { cert: dir.path().join("tls.crt"), key: dir.path().join("tls.key") };
    let server = TestServer::start_lenient(config(files), MemBackend::standard()).await;
    assert!(t::handshake(server.addr, &ca).await.is_err(), "no certificate: no handshake, never plain HTTP");
    t::write_leaf(dir.path(), &leaf);
    assert!(t::wait_for_leaf(server.addr, &ca, &leaf).await);
}
