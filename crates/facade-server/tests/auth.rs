//! `requireAuth`: Basic credentials against a bcrypt htpasswd file, the 401 challenge, metrics,
//! reload on change, and a real client (skopeo) pulling over HTTPS with credentials.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::{BOUND, MemBackend, Reply, TestServer, http1_client, send};
use facade_oci::Digest;
use facade_oci::media_types::OCI_LAYER_GZIP;
use facade_server::{AuthFile, Error, ServerConfig};
use http::Method;

const FAILURES: &str = "registry_facade_auth_failures_total";
const RELOADS: &str = "registry_facade_file_reloads_total";

/// Cost 4, bcrypt's minimum: these tests are about the protocol, not the hash strength.
fn line(user: &str, password: &str) -> String {
    format!("{user}:{}\n", bcrypt::hash(password, 4).unwrap())
}

/// Write-then-rename, so a poll never sees a half-written file.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn config(htpasswd: &Path) -> ServerConfig {
    ServerConfig {
        auth: Some(AuthFile { htpasswd: htpasswd.to_path_buf() }),
        file_poll_interval: Duration::from_millis(50),
        ..ServerConfig::default()
    }
}

struct Fixture {
    server: TestServer,
    htpasswd: std::path::PathBuf,
    blob: Digest,
    _dir: tempfile::TempDir,
}

async fn fixture(users: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, users).unwrap();
    let mut backend = MemBackend::standard();
    let blob = backend.add_blob("ws1", Bytes::from_static(b"layer bytes"), OCI_LAYER_GZIP);
    let server = TestServer::try_start(config(&htpasswd), backend).await.unwrap();
    Fixture { server, htpasswd, blob, _dir: dir }
}

fn assert_challenge(r: &Reply, what: &str) {
    assert_eq!(r.status, 401, "{what}");
    assert_eq!(r.header("www-authenticate"), "Basic realm=\"registry-facade\"", "{what}");
    assert_eq!(r.header("docker-distribution-api-version"), "registry/2.0", "{what}");
}

fn assert_unauthorized(r: &Reply, what: &str) {
    assert_challenge(r, what);
    assert_eq!(r.header("content-type"), "application/json", "{what}");
    assert_eq!(r.code(), "UNAUTHORIZED", "{what}");
}

async fn get_as(f: &Fixture, path: &str, authorization: &str) -> Reply {
    send(&http1_client(), Method::GET, &f.server.url(path), &[("authorization", authorization)]).await
}

async fn wait_until_status(f: &Fixture, path: &str, authorization: &str, status: u16) {
    test_support::wait::until_async(&format!("{path} to answer {status}"), BOUND, || async move {
        get_as(f, path, authorization).await.status.as_u16() == status
    })
    .await;
}

#[tokio::test]
async fn every_route_without_credentials_gets_the_challenge() {
    let f = fixture(&line("alice", "secret")).await;
    let client = http1_client();
    let paths = [
        "/v2/".to_string(),
        "/v2".to_string(),
        "/v2/remote/ws1/manifests/latest".to_string(),
        format!("/v2/remote/ws1/blobs/{}", f.blob),
        "/v2/remote/ws1/tags/list".to_string(),
        "/v2/remote/ws1/blobs/uploads/".to_string(),
        "/not-a-registry-path".to_string(),
    ];
    for path in &paths {
        let r = send(&client, Method::GET, &f.server.url(path), &[]).await;
        assert_unauthorized(&r, path);
        let h = send(&client, Method::HEAD, &f.server.url(path), &[]).await;
        assert_challenge(&h, path);
        assert!(h.bytes().is_empty(), "HEAD {path}");
    }
    let post = send(&client, Method::POST, &f.server.url("/v2/remote/ws1/blobs/uploads/"), &[]).await;
    assert_unauthorized(&post, "POST");
    assert!(f.server.backend.manifest_requests.lock().unwrap().is_empty(), "the backend is never asked");
    assert_eq!(f.server.backend.opens.load(Ordering::SeqCst), 0);
    assert_eq!(f.server.counter(FAILURES, &[("reason", "missing")]), 2 * paths.len() as u64 + 1);
}

#[tokio::test]
async fn wrong_credentials_get_401_and_the_right_ones_pull() {
    let f = fixture(&format!("# registry users\n\n{}", line("alice", "s3cr:et"))).await;
    let manifest = "/v2/remote/ws1/manifests/latest";
    let cases = [
        (basic("alice", "wrong"), "wrong_password"),
        (basic("alice", ""), "wrong_password"),
        (basic("alice", "s3cr"), "wrong_password"),
        (basic("mallory", "s3cr:et"), "unknown_user"),
        ("Bearer abc".to_string(), "malformed"),
        ("Basic !!!".to_string(), "malformed"),
        (format!("Basic {}", STANDARD.encode("alice")), "malformed"),
    ];
    for (authorization, reason) in &cases {
        for path in ["/v2/", manifest] {
            let r = get_as(&f, path, authorization).await;
            // Never 403: a client only retries with other credentials after a 401.
            assert_unauthorized(&r, &format!("{authorization} {path}"));
        }
        assert!(f.server.counter(FAILURES, &[("reason", reason)]) >= 2, "{reason}");
    }
    assert_eq!(f.server.counter(FAILURES, &[("reason", "wrong_password")]), 6);
    assert_eq!(f.server.counter(FAILURES, &[("reason", "unknown_user")]), 2);
    assert_eq!(f.server.counter(FAILURES, &[("reason", "malformed")]), 6);

    let right = basic("alice", "s3cr:et");
    let r = get_as(&f, "/v2/", &right).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("www-authenticate"), "");
    let r = get_as(&f, manifest, &right).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), &Bytes::from_static(common::OCI_BODY));
    let r = get_as(&f, &format!("/v2/remote/ws1/blobs/{}", f.blob), &right).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), &Bytes::from_static(b"layer bytes"));
    // Past authentication the usual answers come back.
    let r = get_as(&f, "/v2/remote/ws1/manifests/nope", &right).await;
    assert_eq!((r.status.as_u16(), r.code().as_str()), (404, "MANIFEST_UNKNOWN"));
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let lower = right.replacen("Basic", "basic", 1);
    assert_eq!(get_as(&f, manifest, &lower).await.status, 200);
    // h2c carries the same header.
    let h2 = send(&common::h2c_client(), Method::GET, &f.server.url(manifest), &[("authorization", &right)]).await;
    assert_eq!(h2.status, 200);
}

#[tokio::test]
async fn admin_listener_needs_no_credentials() {
    let f = fixture(&line("alice", "secret")).await;
    f.server.readiness.set_ready(true);
    let client = http1_client();
    for path in ["/metrics", "/ready", "/live"] {
        let r = send(&client, Method::GET, &f.server.admin_url(path), &[]).await;
        assert_eq!(r.status, 200, "{path}");
    }
    let metrics = send(&client, Method::GET, &f.server.admin_url("/metrics"), &[]).await;
    let text = String::from_utf8(metrics.bytes().to_vec()).unwrap();
    assert!(text.contains("registry_facade_auth_failures_total{reason=\"wrong_password\"} 0"), "{text}");
}

#[tokio::test]
async fn htpasswd_changes_apply_without_restart() {
    let alice = line("alice", "a-pass");
    let f = fixture(&alice).await;
    let (as_alice, as_bob) = (basic("alice", "a-pass"), basic("bob", "b-pass"));
    let manifest = "/v2/remote/ws1/manifests/latest";
    assert_eq!(get_as(&f, manifest, &as_alice).await.status, 200);
    assert_unauthorized(&get_as(&f, manifest, &as_bob).await, "bob before");

    replace(&f.htpasswd, &format!("{alice}{}", line("bob", "b-pass")));
    wait_until_status(&f, manifest, &as_bob, 200).await;
    assert_eq!(get_as(&f, manifest, &as_alice).await.status, 200);

    // A file with a hash we cannot check is refused as a whole: the last good one stays.
    replace(&f.htpasswd, "alice:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n");
    wait_until_counter(&f, &[("file", "htpasswd"), ("outcome", "error")], 1).await;
    assert_eq!(get_as(&f, manifest, &as_alice).await.status, 200);
    assert_eq!(get_as(&f, manifest, &as_bob).await.status, 200);

    // Alice is removed: her remembered check must not outlive her line.
    replace(&f.htpasswd, &line("bob", "b-pass"));
    wait_until_status(&f, manifest, &as_alice, 401).await;
    assert_eq!(get_as(&f, manifest, &as_bob).await.status, 200);
    assert_eq!(f.server.counter(RELOADS, &[("file", "htpasswd"), ("outcome", "ok")]), 2);
}

async fn wait_until_counter(f: &Fixture, labels: &[(&str, &str)], at_least: u64) {
    test_support::wait::until_async(&format!("{labels:?} to reach {at_least}"), BOUND, || async move {
        f.server.counter(RELOADS, labels) >= at_least
    })
    .await;
}

#[tokio::test]
async fn bad_htpasswd_files_are_refused_by_try_new() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("htpasswd");
    let cases = [
        (
            format!("{}bob:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n", line("alice", "x")),
            "line 2: user \"bob\": Apache MD5",
        ),
        ("# only a comment\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n".to_string(), "line 2: user \"alice\": SHA-1"),
        ("alice:plain\n".to_string(), "line 1: user \"alice\": unrecognized hash"),
        ("alice\n".to_string(), "line 1: expected `user:hash`"),
    ];
    for (text, want) in cases {
        std::fs::write(&path, &text).unwrap();
        let err = TestServer::try_start(config(&path), MemBackend::standard()).await.err().unwrap();
        assert!(matches!(err, Error::Htpasswd { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains(want), "{msg}");
        assert!(msg.contains("only bcrypt") || want.contains("expected"), "names what is supported: {msg}");
    }
    let missing = dir.path().join("missing");
    let err = TestServer::try_start(config(&missing), MemBackend::standard()).await.err().unwrap();
    assert!(matches!(err, Error::ReadFile { .. }), "{err:?}");
}

#[tokio::test]
async fn lenient_app_without_a_user_list_refuses_everyone_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("htpasswd");
    let server = TestServer::start_lenient(config(&path), MemBackend::standard()).await;
    let f = Fixture { server, htpasswd: path.clone(), blob: Digest::sha256_of(b""), _dir: dir };
    let right = basic("alice", "secret");
    assert_unauthorized(&get_as(&f, "/v2/", &right).await, "no file yet");
    assert_eq!(f.server.counter(FAILURES, &[("reason", "unavailable")]), 1);
    replace(&path, &line("alice", "secret"));
    wait_until_status(&f, "/v2/", &right, 200).await;
}

#[tokio::test]
async fn skopeo_pulls_over_https_with_credentials() {
    // `make test` installs skopeo; a machine without it fails here rather than skipping.
    assert!(
        std::process::Command::new("skopeo").arg("--version").output().is_ok(),
        "skopeo is not installed: run `make deps`"
    );
    use common::tls::Ca;
    use test_support::image::{FileEntry, ImageBuilder, LayerCompression, build_layer};

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let files = common::tls::write_leaf(dir.path(), &ca.leaf("registry"));
    let certs = dir.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    std::fs::write(certs.join("ca.crt"), &ca.pem).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, line("alice", "secret")).unwrap();

    let image =
        ImageBuilder::new().layer(build_layer(&[FileEntry::file("hello.txt", "hi")], LayerCompression::Gzip)).build();
    let mut backend = MemBackend::default();
    backend.add_manifest_bytes(
        "ws1",
        "latest",
        Bytes::from(image.manifest.clone()),
        facade_oci::media_types::OCI_MANIFEST,
    );
    backend.add_blob("ws1", image.config.clone(), facade_oci::media_types::OCI_CONFIG);
    for layer in &image.layers {
        backend.add_blob("ws1", layer.bytes.clone(), &layer.media_type);
    }
    let config = ServerConfig { tls: Some(files), ..config(&htpasswd) };
    let server = TestServer::try_start(config, backend).await.unwrap();
    let src = format!("docker://localhost:{}/remote/ws1:latest", server.addr.port());

    let copy = |creds: &str, dest: &Path| {
        let mut cmd = tokio::process::Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--src-cert-dir"]).arg(&certs);
        cmd.args(["--src-creds", creds, &src]).arg(format!("oci:{}:latest", dest.display()));
        cmd.kill_on_drop(true);
        async move { tokio::time::timeout(Duration::from_secs(120), cmd.output()).await.expect("skopeo in time").unwrap() }
    };
    let wrong = copy("alice:wrong", &dir.path().join("wrong")).await;
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.to_lowercase().contains("unauthorized"), "{stderr}");

    let dest = dir.path().join("pulled");
    let right = copy("alice:secret", &dest).await;
    assert!(right.status.success(), "{}", String::from_utf8_lossy(&right.stderr));
    let pulled = test_support::skopeo::read_oci_layout(&dest, "latest").unwrap();
    assert_eq!(pulled.rootfs().get("hello.txt").map(Vec::as_slice), Some(&b"hi"[..]));
    assert!(server.counter(FAILURES, &[("reason", "wrong_password")]) >= 1);
}
