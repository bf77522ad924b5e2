//! The `remote` provider over real gRPC on loopback. The facade runs in-process, the
//! images live on a real upstream registry (CNCF distribution), pulls are made with skopeo, and
//! the spec servers are real: the facade's own `spec-server` code, and one generated from
//! `proto/` in Python with grpcio-tools, standing in for a spec server somebody else wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use e2e::Facade;
use e2e::http::{Response, request};
use facade_spec::{FixedSpecProvider, ServerTls};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, build_tar, push_image};
use test_support::proc::{KillOnDrop, free_port};
use test_support::registry::Registry;
use test_support::skopeo;

/// The facade's deadline for one spec server in these tests.
const SPEC_TIMEOUT: Duration = Duration::from_secs(2);

/// A spec server (facade-spec's, over a specs file) on its own runtime; stopped on drop. Stopping
/// drops its runtime, so open connections die with it, as with a killed process.
struct SpecServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SpecServer {
    fn start(specs: &Path, listen: &str, tls: Option<ServerTls>) -> SpecServer {
        let specs = FixedSpecProvider::load(specs).unwrap();
        let listen = listen.to_string();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let l = match tokio::net::TcpListener::bind(&listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = addr_tx.send(Ok(l.local_addr().unwrap()));
                let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
                let server = tokio::spawn(facade_spec::server::serve(l, specs, tls, async move {
                    let _ = stop_rx.await;
                    let _ = stopping_tx.send(());
                }));
                let _ = stopping.await;
                let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        SpecServer { addr, stop: Some(stop), thread: Some(thread) }
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for SpecServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct World {
    reg: Registry,
    dir: tempfile::TempDir,
}

fn spec(host: &str, content: &str) -> Value {
    let tar = build_tar(&[FileEntry::file("workspace/content.txt", content)]);
    json!({
        "baseRef": format!("{host}/base:latest"),
        "ideRef": format!("{host}/ide:1"),
        "contentLayer": [{"direct": {"content": base64::engine::general_purpose::STANDARD.encode(tar)}}]
    })
}

/// A base and an IDE image upstream, and `specs.json` describing `ws-1` with them.
fn world() -> World {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    e2e::upstream::push_two_layer_base(&reg);
    let ide = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::exec("ide/bin/ide", "#!/bin/sh\n")], LayerCompression::Gzip))
        .env(["GITPOD_ENV_APPEND_PATH=/ide/bin:"])
        .build();
    push_image(&reg, "ide:1", &ide, PushFormat::DockerV2S2).unwrap();
    write_specs(dir.path(), &reg.host(), &["ws-1"]);
    World { reg, dir }
}

fn write_specs(dir: &Path, host: &str, ids: &[&str]) {
    let specs: serde_json::Map<String, Value> =
        ids.iter().map(|id| (id.to_string(), spec(host, &format!("content of {id}")))).collect();
    std::fs::write(dir.join("specs.json"), Value::Object(specs).to_string()).unwrap();
}

fn config(remote: Value, facade: Value) -> Value {
    let mut f = json!({"listenHost": "127.0.0.1", "platform": "linux/amd64", "specTimeout": format!("{}s", SPEC_TIMEOUT.as_secs())});
    for (k, v) in facade.as_object().unwrap() {
        f[k] = v.clone();
    }
    json!({
        "registry": {"port": 0, "fixedSpecFN": "specs.json", "remoteSpecProvider": remote},
        "prometheusAddr": "127.0.0.1:0",
        "facade": f
    })
}

fn plain(addr: SocketAddr) -> Value {
    json!({"addr": format!("dns:///{addr}")})
}

/// Pulls `<provider>/<id>:latest` with skopeo and checks it is the image `specs.json` describes.
fn pull_and_check(facade: &Facade, provider: &str, id: &str) {
    let out = tempfile::tempdir().unwrap();
    let image = format!("{}/{provider}/{id}:latest", facade.host());
    skopeo::copy_to_oci_preserving_digests(&image, out.path(), "latest").unwrap();
    let img = skopeo::read_oci_layout(out.path(), "latest").unwrap();
    let layers = img.manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4, "base 2 + ide 1 + content 1: {}", img.manifest);
    let fs = img.rootfs();
    for f in ["etc/base-1", "etc/base-2", "ide/bin/ide"] {
        assert!(fs.contains_key(f), "{id}: {f} missing from {:?}", fs.keys());
    }
    assert_eq!(fs["workspace/content.txt"], format!("content of {id}").as_bytes());
    let env: Vec<&str> = img.config["config"]["Env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(env.contains(&"PATH=/ide/bin:/usr/bin:/bin"), "{env:?}");
}

fn manifest(facade: &Facade, provider: &str, id: &str) -> (Response, Duration) {
    let started = Instant::now();
    let r = request(
        &facade.host(),
        "GET",
        &format!("/v2/{provider}/{id}/manifests/latest"),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        b"",
    );
    (r, started.elapsed())
}

fn assert_not_found(facade: &Facade, id: &str) {
    let (r, _) = manifest(facade, "remote", id);
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (404, Some("MANIFEST_UNKNOWN")),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

/// A failure that is not a 404 and came within the spec deadline (plus composing slack).
fn assert_fails_fast(facade: &Facade, id: &str, why: &str) {
    let (r, took) = manifest(facade, "remote", id);
    assert!(r.status >= 500, "{why}: {} {}", r.status, String::from_utf8_lossy(&r.body));
    assert!(took < SPEC_TIMEOUT + Duration::from_secs(2), "{why}: took {took:?}");
}

fn metrics(facade: &Facade) -> String {
    let r = request(&facade.admin[0].to_string(), "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).unwrap()
}

#[test]
fn pulls_images_composed_from_the_spec_servers_answer() {
    let w = world();
    let server = SpecServer::start(&w.dir.path().join("specs.json"), "127.0.0.1:0", None);
    let facade = Facade::start(&config(json!([plain(server.addr)]), json!({})), w.dir.path()).unwrap();
    pull_and_check(&facade, "remote", "ws-1");
    assert_not_found(&facade, "no-such-workspace");
    // The operators' readiness probe.
    assert_not_found(&facade, "not-a-valid-image");
    let r = request(&facade.host(), "GET", &format!("/v2/remote/nope/blobs/sha256:{}", "0".repeat(64)), &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("BLOB_UNKNOWN")));
    // `fixed` serves the same file next to it.
    pull_and_check(&facade, "fixed", "ws-1");

    let m = metrics(&facade);
    for needle in [
        r#"registry_facade_spec_requests_total{outcome="ok",provider="remote"}"#,
        r#"registry_facade_spec_requests_total{outcome="not_found",provider="remote"}"#,
        r#"registry_facade_spec_request_duration_seconds_count{provider="remote"}"#,
        r#"registry_facade_spec_cache_lookups_total{provider="remote",result="miss"}"#,
    ] {
        assert!(m.contains(needle), "{needle} not in:\n{m}");
    }
}

#[test]
fn survives_spec_server_outages_and_recovers_without_a_restart() {
    let w = world();
    let specs = w.dir.path().join("specs.json");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Every manifest request composes again and asks the provider again, so each one below
    // exercises the provider and the cache, not an earlier composition.
    let cfg = config(
        json!([{"addr": listen.clone()}]),
        json!({"composeTTL": "0s", "specCacheTTL": "0s", "specNegativeTTL": "0s"}),
    );

    // Lazy connect: the facade starts with its spec server down and serves `fixed` meanwhile.
    let facade = Facade::start(&cfg, w.dir.path()).unwrap();
    let (r, _) = manifest(&facade, "fixed", "ws-1");
    assert_eq!(r.status, 200);
    assert_fails_fast(&facade, "ws-1", "spec server not started yet");

    let mut server = SpecServer::start(&specs, &listen, None);
    pull_and_check(&facade, "remote", "ws-1");

    server.stop();
    // Seen before: served from the last spec while the server is gone.
    pull_and_check(&facade, "remote", "ws-1");
    assert_fails_fast(&facade, "ws-2", "unknown id while the spec server is down");
    assert!(metrics(&facade).contains(r#"registry_facade_spec_cache_lookups_total{provider="remote",result="stale"}"#));

    // Back, now knowing ws-2 too: picked up without restarting the facade.
    write_specs(w.dir.path(), &w.reg.host(), &["ws-1", "ws-2"]);
    let _server = SpecServer::start(&specs, &listen, None);
    pull_and_check(&facade, "remote", "ws-2");
    assert_not_found(&facade, "ws-3");
}

#[test]
fn asks_spec_servers_in_order() {
    let w = world();
    let a = SpecServer::start(&w.dir.path().join("specs.json"), "127.0.0.1:0", None);
    let other = tempfile::tempdir().unwrap();
    write_specs(other.path(), &w.reg.host(), &["ws-b"]);
    let b = SpecServer::start(&other.path().join("specs.json"), "127.0.0.1:0", None);
    let down = format!("127.0.0.1:{}", free_port());
    let facade =
        Facade::start(&config(json!([{"addr": down}, plain(a.addr), plain(b.addr)]), json!({})), w.dir.path()).unwrap();
    let (r, _) = manifest(&facade, "remote", "ws-1");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    pull_and_check(&facade, "remote", "ws-b");
    // Neither running server has it, but the down one might have: not a 404.
    assert_fails_fast(&facade, "ws-c", "unknown id with one spec server down");
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let pem = params.self_signed(&key).unwrap().pem();
    (Issuer::new(params, key), pem)
}

fn leaf(issuer: &Issuer<'static, KeyPair>, name: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    params.extended_key_usages = vec![usage];
    (params.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

/// A test CA, the spec server's certificate (for `ws-manager` only, as the reference's
/// deployment issues it), a client certificate from the same CA, and one from a stranger CA.
fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (root, ca_pem) = ca("registry-facade test CA");
    let (stranger, _) = ca("someone else's CA");
    let files = [
        ("server", leaf(&root, "ws-manager", ExtendedKeyUsagePurpose::ServerAuth)),
        ("client", leaf(&root, "registry-facade", ExtendedKeyUsagePurpose::ClientAuth)),
        ("stranger", leaf(&stranger, "registry-facade", ExtendedKeyUsagePurpose::ClientAuth)),
    ];
    std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
    for (name, (crt, key)) in files {
        std::fs::write(dir.path().join(format!("{name}.crt")), crt).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), key).unwrap();
    }
    Pki { dir }
}

fn tls_entry(addr: SocketAddr, pki: &Pki, client: Option<&str>) -> Value {
    let mut tls = json!({"ca": pki.path("ca.pem")});
    if let Some(c) = client {
        tls["crt"] = json!(pki.path(&format!("{c}.crt")));
        tls["key"] = json!(pki.path(&format!("{c}.key")));
    }
    json!({"addr": format!("dns:///{addr}"), "tls": tls})
}

#[test]
fn mutual_tls_with_a_test_ca_and_a_wrong_client_certificate_refused() {
    let w = world();
    let pki = pki();
    let specs = w.dir.path().join("specs.json");
    let server_tls = |client_ca: bool| ServerTls {
        cert_pem: pki.read("server.crt"),
        key_pem: pki.read("server.key"),
        client_ca_pem: client_ca.then(|| pki.read("ca.pem")),
    };

    let mtls = SpecServer::start(&specs, "127.0.0.1:0", Some(server_tls(true)));
    // The certificate names `ws-manager`, not 127.0.0.1: the default server name is the
    // reference's, whatever the address.
    let good =
        Facade::start(&config(json!([tls_entry(mtls.addr, &pki, Some("client"))]), json!({})), w.dir.path()).unwrap();
    pull_and_check(&good, "remote", "ws-1");
    assert_not_found(&good, "ws-unknown");
    for (why, client) in [("a stranger CA's client certificate", Some("stranger")), ("no client certificate", None)] {
        let bad = Facade::start(&config(json!([tls_entry(mtls.addr, &pki, client)]), json!({})), w.dir.path()).unwrap();
        assert_fails_fast(&bad, "ws-1", why);
    }
    let wrong_name = Facade::start(
        &config(json!([tls_entry(mtls.addr, &pki, Some("client"))]), json!({"specServerName": "spec.example"})),
        w.dir.path(),
    )
    .unwrap();
    assert_fails_fast(&wrong_name, "ws-1", "server certificate for another name");
    let plaintext = Facade::start(&config(json!([plain(mtls.addr)]), json!({})), w.dir.path()).unwrap();
    assert_fails_fast(&plaintext, "ws-1", "plaintext to a TLS spec server");

    // Server-side TLS only.
    let tls = SpecServer::start(&specs, "127.0.0.1:0", Some(server_tls(false)));
    let f = Facade::start(&config(json!([tls_entry(tls.addr, &pki, None)]), json!({})), w.dir.path()).unwrap();
    let (r, _) = manifest(&f, "remote", "ws-1");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // A certificate file that is not one stops the start, naming the key.
    std::fs::write(pki.path("garbage.pem"), "not a certificate").unwrap();
    let mut entry = tls_entry(mtls.addr, &pki, None);
    entry["tls"]["ca"] = json!(pki.path("garbage.pem"));
    let e = Facade::start(&config(json!([entry]), json!({})), w.dir.path())
        .err()
        .expect("a bad CA file must stop the start");
    assert!(format!("{e:#}").contains("registry.remoteSpecProvider"), "{e:#}");
}

/// The Python spec server in `py/`, generated from `proto/` at start; killed on drop.
struct PythonSpecServer {
    addr: SocketAddr,
    _proc: KillOnDrop,
    log: PathBuf,
}

impl PythonSpecServer {
    fn start(specs: &Path, dir: &Path) -> PythonSpecServer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let has_grpc_tools = Command::new("python3")
            .args(["-c", "import grpc_tools, grpc"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            has_grpc_tools,
            "python3 cannot import grpc_tools: run `make deps` (scripts/install-deps.sh installs grpcio-tools)"
        );
        let log = dir.join("python-spec-server.log");
        let mut cmd = Command::new("python3");
        cmd.arg(root.join("e2e/py/spec_server.py"))
            .arg("--proto-dir")
            .arg(root.join("../proto"))
            .arg("--specs")
            .arg(specs)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--workdir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let proc = KillOnDrop { child, name: "python spec server".into() };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let addr = line.trim().strip_prefix("listening on ").and_then(|a| a.parse().ok()).unwrap_or_else(|| {
            panic!("python spec server said {line:?}; log: {}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        PythonSpecServer { addr, _proc: proc, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[test]
fn a_spec_server_generated_from_the_proto_in_python_works() {
    let w = world();
    let py = PythonSpecServer::start(&w.dir.path().join("specs.json"), w.dir.path());
    let facade = Facade::start(&config(json!([plain(py.addr)]), json!({})), w.dir.path()).unwrap();
    pull_and_check(&facade, "remote", "ws-1");
    assert_not_found(&facade, "no-such-workspace");
    let log = py.log();
    assert!(log.contains("GetImageSpec id='ws-1'"), "the Python server was not asked: {log}");
    assert!(log.contains("GetImageSpec id='no-such-workspace' -> NOT_FOUND"), "{log}");
}
