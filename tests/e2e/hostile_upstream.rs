//! A workspace whose base image lives on a registry its author controls must not be able to
//! hurt other workspaces on the node: sections 1, 2, 3 and 6 of
//! `docs/security-model.md` (which lists the test that shows each). The attacker side is a scripted
//! hostile registry (test-support `hostile_registry`); the legitimate side is a real CNCF
//! distribution registry, with a real token server where auth matters; the facade runs
//! in-process with production wiring.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::Facade;
use e2e::http::{Response, request};
use serde_json::{Value, json};
use test_support::fault_proxy::FaultProxy;
use test_support::hostile_registry::{Behaviour, HostileRegistry};
use test_support::image::{
    BuiltImage, BuiltLayer, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, build_tar, gzip,
    push_image, sha256_digest,
};
use test_support::registry::Registry;
use test_support::token_server::{SERVICE, TokenServer};
use test_support::wait;
use test_support::wire::noise;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn layer(path: &str, contents: impl Into<Vec<u8>>) -> BuiltLayer {
    build_layer(&[FileEntry::file(path, contents)], LayerCompression::Gzip)
}

fn image(layers: Vec<BuiltLayer>) -> BuiltImage {
    layers.into_iter().fold(ImageBuilder::new(), |b, l| b.layer(l)).build()
}

fn facade(dir: &Path, specs: Value, registry_extra: Value, docker_config: Option<&str>) -> Facade {
    std::fs::write(dir.join("specs.json"), specs.to_string()).unwrap();
    let mut cfg = json!({
        "registry": {"port": 0, "store": "store", "fixedSpecFN": "specs.json"},
        // Pulls left trickling at the end of a test must not hold the drop for the default 30 s.
        "facade": {"listenHost": "127.0.0.1", "platform": "linux/amd64", "shutdownGrace": "1s"}
    });
    for (k, v) in registry_extra.as_object().unwrap() {
        cfg["registry"][k] = v.clone();
    }
    if let Some(dc) = docker_config {
        std::fs::write(dir.join("auth.json"), dc).unwrap();
        cfg["dockerAuth"] = json!("auth.json");
    }
    Facade::start(&cfg, dir).unwrap()
}

fn get(f: &Facade, path: &str) -> Response {
    request(&f.host(), "GET", path, &[], b"")
}

fn stored(dir: &Path, digest: &str) -> std::path::PathBuf {
    dir.join("store/blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

fn error_of(r: &Response) -> (u16, Option<String>) {
    (r.status, r.error_code())
}

/// 2a: a hostile manifest names a pinned static file layer and a stored IDE layer with wrong
/// sizes. Its workspace's blob requests fail with an OCI error; nothing the legitimate
/// workspace relies on is removed, re-keyed or re-downloaded.
#[test]
fn wrong_size_claims_fail_only_the_claiming_workspace() {
    let reg = Registry::start().unwrap();
    let legit = FaultProxy::start(reg.addr).unwrap();
    let evil = HostileRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let base = image(vec![layer("etc/base", "legit base")]);
    push_image(&reg, "base/a:latest", &base, PushFormat::Oci).unwrap();
    let ide_layer = layer("ide/bin/ide", "the IDE, shared by every workspace on the node");
    push_image(&reg, "ide/code:1", &image(vec![ide_layer.clone()]), PushFormat::Oci).unwrap();
    let static_tar = gzip(&build_tar(&[FileEntry::file("static/tool", "static file layer")]));
    std::fs::write(dir.path().join("static.tar.gz"), &static_tar).unwrap();
    let static_digest = sha256_digest(&static_tar);

    let evil_config = evil.claimed_image(
        "evil/base",
        &[(static_digest.clone(), static_tar.len() as u64 + 1000), (ide_layer.digest.clone(), 3)],
    );
    let specs = json!({
        "ws-a": {"baseRef": format!("{}/base/a:latest", legit.host()), "ideRef": format!("{}/ide/code:1", legit.host())},
        "ws-b": {"baseRef": format!("{}/evil/base:latest", evil.host())},
    });
    let f = facade(dir.path(), specs, json!({"staticLayer": [{"ref": "static.tar.gz", "type": "file"}]}), None);

    // A pulls every layer; the IDE layer's fill commits to the store.
    let a_layers = f.manifest_layers("ws-a");
    assert!(a_layers.contains(&(static_digest.clone(), static_tar.len() as u64)), "{a_layers:?}");
    assert!(a_layers.contains(&(ide_layer.digest.clone(), ide_layer.size)), "{a_layers:?}");
    for (d, _) in &a_layers {
        let r = get(&f, &format!("/v2/fixed/ws-a/blobs/{d}"));
        assert_eq!((r.status, sha256_digest(&r.body)), (200, d.clone()));
    }
    wait::until("the IDE layer in the store", Duration::from_secs(10), || {
        stored(dir.path(), &ide_layer.digest).exists()
    });
    let legit_blob_gets = legit.count_requests("GET", "/blobs/");

    // B's composed manifest carries the attacker's claims; every blob request for them fails
    // with the OCI envelope naming the claim and the verified size.
    let b_layers = f.manifest_layers("ws-b");
    for (digest, right, wrong) in [
        (&static_digest, static_tar.len() as u64, static_tar.len() as u64 + 1000),
        (&ide_layer.digest, ide_layer.size, 3),
    ] {
        assert!(b_layers.contains(&(digest.clone(), wrong)), "{b_layers:?}");
        for method in ["GET", "HEAD"] {
            let r = request(&f.host(), method, &format!("/v2/fixed/ws-b/blobs/{digest}"), &[], b"");
            assert_ne!(r.status, 200, "{method} {digest} was served to the claiming workspace");
            if method == "GET" {
                assert_eq!(
                    error_of(&r),
                    (400, Some("MANIFEST_INVALID".into())),
                    "{}",
                    String::from_utf8_lossy(&r.body)
                );
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                let detail = &v["errors"][0]["detail"];
                assert_eq!(
                    (detail["claimedSize"].as_u64(), detail["size"].as_u64()),
                    (Some(wrong), Some(right)),
                    "{v}"
                );
            }
        }
    }
    // The claims never reached the attacker's registry as blob downloads: the verified copy
    // decided.
    let evil_blobs: Vec<String> =
        evil.requests().into_iter().filter(|r| r.path.contains("/blobs/")).map(|r| r.path).collect();
    assert!(evil_blobs.iter().all(|p| p.ends_with(&evil_config)), "{evil_blobs:?}");

    // A's layers: still stored, still served with the right bytes, without a new download.
    assert_eq!(std::fs::read(stored(dir.path(), &ide_layer.digest)).unwrap(), ide_layer.bytes);
    assert_eq!(std::fs::read(stored(dir.path(), &static_digest)).unwrap(), static_tar);
    for (d, bytes) in [(&static_digest, &static_tar), (&ide_layer.digest, &ide_layer.bytes)] {
        let r = get(&f, &format!("/v2/fixed/ws-a/blobs/{d}"));
        assert_eq!(r.status, 200);
        assert!(r.body == *bytes, "{d}: wrong bytes after the hostile claims");
        let r = request(&f.host(), "HEAD", &format!("/v2/fixed/ws-a/blobs/{d}"), &[], b"");
        assert_eq!(r.header("content-length"), Some(bytes.len().to_string().as_str()));
    }
    assert_eq!(legit.count_requests("GET", "/blobs/"), legit_blob_gets, "the legit registry saw a new blob GET");
}

/// A raw blob GET that reads until the facade ends it; for the pull an attacker holds.
fn background_get(addr: String, path: String) -> std::thread::JoinHandle<(String, Vec<u8>)> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        // Bounded by the read timeout and by the facade closing the connection on drop.
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |p| p + 4);
        (String::from_utf8_lossy(&raw[..split]).into_owned(), raw[split..].to_vec())
    })
}

/// 3: a hostile registry trickles garbage for a digest that a legitimate image also contains.
/// The attacker's pull starts first; the legitimate pull of the same digest neither joins it
/// nor waits for it.
#[test]
fn a_trickling_registry_cannot_hold_a_legit_pull_hostage() {
    let reg = Registry::start().unwrap();
    let evil = HostileRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let big = layer("data/big", noise(512 * 1024, 11));
    push_image(&reg, "base/a:latest", &image(vec![big.clone()]), PushFormat::Oci).unwrap();
    evil.claimed_image("evil/base", &[(big.digest.clone(), big.size)]);
    // 640 B/s of garbage: the whole body would take about 14 minutes.
    evil.blob(
        "evil/base",
        &big.digest,
        Behaviour::Trickle { bytes: noise(big.size as usize, 99), chunk: 64, every: Duration::from_millis(100) },
    );
    let specs = json!({
        "ws-a": {"baseRef": format!("{}/base/a:latest", reg.host())},
        "ws-b": {"baseRef": format!("{}/evil/base:latest", evil.host())},
    });
    let f = facade(dir.path(), specs, json!({}), None);
    f.manifest_layers("ws-a");
    f.manifest_layers("ws-b");

    let blob_path = format!("/v2/evil/base/blobs/{}", big.digest);
    let b = background_get(f.host(), format!("/v2/fixed/ws-b/blobs/{}", big.digest));
    wait::until("the hostile trickle to start", Duration::from_secs(10), || !evil.requests_to(&blob_path).is_empty());

    let started = Instant::now();
    let a = get(&f, &format!("/v2/fixed/ws-a/blobs/{}", big.digest));
    let took = started.elapsed();
    assert_eq!(a.status, 200);
    assert!(a.body == big.bytes, "the legit pull got wrong bytes");
    assert!(took < Duration::from_secs(5), "the legit pull took {took:?}");
    assert!(!b.is_finished(), "the attacker's pull ended before the legit one was checked");

    drop(f);
    drop(evil);
    let (head, body) = b.join().unwrap();
    // The attacker's pull got garbage it cannot pass off as the layer: never the whole body.
    assert!(body.len() < big.bytes.len(), "{head}: {} bytes", body.len());
    assert_ne!(sha256_digest(&body), big.digest);
}

/// 6: the origin's error before any byte reaches the client as that error, in the OCI
/// envelope, never as a 200 that is later cut; the upstream's own body is never echoed.
#[test]
fn origin_error_statuses_reach_the_client_as_oci_errors() {
    let evil = HostileRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let l = layer("x", "a layer the origin will not give");
    let cases: [(&str, Behaviour, u16, &str); 5] = [
        ("s404", Behaviour::status(404, &[]), 404, "BLOB_UNKNOWN"),
        ("s401", Behaviour::challenge(r#"Basic realm="evil""#), 403, "DENIED"),
        ("s403", Behaviour::status(403, &[]), 403, "DENIED"),
        ("s429", Behaviour::status(429, &[("Retry-After", "7")]), 429, "TOOMANYREQUESTS"),
        ("s503", Behaviour::status(503, &[]), 503, "UNAVAILABLE"),
    ];
    let mut specs = serde_json::Map::new();
    for (repo, behaviour, _, _) in &cases {
        let _ = evil.claimed_image(&format!("{repo}/img"), &[(l.digest.clone(), l.size)]);
        evil.blob(&format!("{repo}/img"), &l.digest, behaviour.clone());
        specs.insert(format!("ws-{repo}"), json!({"baseRef": format!("{}/{repo}/img:latest", evil.host())}));
    }
    let f = facade(dir.path(), Value::Object(specs), json!({}), None);
    for (repo, _, status, code) in &cases {
        f.manifest_layers(&format!("ws-{repo}"));
        let r = get(&f, &format!("/v2/fixed/ws-{repo}/blobs/{}", l.digest));
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(error_of(&r), (*status, Some(code.to_string())), "{repo}: {body}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{repo}");
        assert!(!body.contains("scripted"), "{repo}: the upstream's body was echoed: {body}");
        if *repo == "s429" {
            assert_eq!(r.header("retry-after"), Some("7"));
        }
        assert!(!evil.requests_to(&format!("/v2/{repo}/img/blobs/{}", l.digest)).is_empty(), "{repo}");
    }
}

/// 1: a registry that answers with the same Bearer challenge (realm, service, scope) as a
/// private registry the node has credentials for gets neither that registry's token nor its
/// credentials, before or after the legitimate pull; the legitimate pull keeps working.
#[test]
fn a_copied_challenge_never_captures_another_registrys_token() {
    let tokens = TokenServer::start("puller", "t0ken-pw").unwrap();
    let reg = Registry::start_with(tokens.auth(), &[]).unwrap();
    let private = image(vec![layer("private/a", "secret base")]);
    for (_, bytes) in private.blobs() {
        reg.push_blob("private/base", bytes).unwrap();
    }
    reg.push_manifest("private/base", "latest", OCI_MANIFEST, &private.manifest).unwrap();

    let evil = HostileRegistry::start().unwrap();
    let copied =
        format!(r#"Bearer realm="{}",service="{SERVICE}",scope="repository:private/base:pull""#, tokens.realm());
    evil.fallback(Behaviour::challenge(&copied));
    // A second hostile registry names its own realm: does a token request carry credentials?
    let evil2 = HostileRegistry::start().unwrap();
    evil2.fallback(Behaviour::challenge(&format!(
        r#"Bearer realm="http://{}/token",service="{SERVICE}",scope="repository:private/base:pull""#,
        evil2.host()
    )));

    let dir = tempfile::tempdir().unwrap();
    let specs = json!({
        "ws-legit": {"baseRef": format!("{}/private/base:latest", reg.host())},
        "ws-evil": {"baseRef": format!("{}/private/base:latest", evil.host())},
        "ws-evil2": {"baseRef": format!("{}/private/base:latest", evil2.host())},
    });
    let docker_config = tokens.auth().docker_config_json(&reg.host());
    let f = facade(dir.path(), specs, json!({}), Some(&docker_config));

    let pull_legit = || {
        for (d, _) in f.manifest_layers("ws-legit") {
            let r = get(&f, &format!("/v2/fixed/ws-legit/blobs/{d}"));
            assert_eq!((r.status, sha256_digest(&r.body)), (200, d));
        }
    };
    pull_legit();
    assert!(tokens.tokens_issued() >= 1);

    for ws in ["ws-evil", "ws-evil2"] {
        let r = get(&f, &format!("/v2/fixed/{ws}/manifests/latest"));
        assert_eq!(error_of(&r), (403, Some("DENIED".into())), "{ws}: {}", String::from_utf8_lossy(&r.body));
    }
    for (name, h) in [("evil", &evil), ("evil2", &evil2)] {
        let seen = h.requests();
        assert!(!seen.is_empty(), "{name} was never asked");
        for r in &seen {
            // Not assert_eq: a captured token must not end up in the test log either.
            assert!(r.header("authorization").is_none(), "{name} received credentials: {} {}", r.method, r.path);
        }
    }
    assert!(!evil2.requests_to("/token").is_empty(), "evil2's realm was never asked for a token");

    pull_legit();
}

/// 1: a redirect target never gets the `Authorization` header the registry was sent, even when
/// the node holds credentials for that registry.
#[test]
fn redirect_targets_never_get_the_authorization_header() {
    let evil = HostileRegistry::start().unwrap();
    let target = HostileRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let l = layer("r", "redirected layer");
    evil.claimed_image("r/img", &[(l.digest.clone(), l.size)]);
    evil.blob(
        "r/img",
        &l.digest,
        Behaviour::RequireAuth {
            challenge: r#"Basic realm="r""#.into(),
            then: Box::new(Behaviour::Redirect {
                location: format!("http://{}/elsewhere/{}", target.host(), l.digest),
            }),
        },
    );
    target.route(&format!("/elsewhere/{}", l.digest), Behaviour::blob(l.bytes.clone()));
    let auth = test_support::registry::Auth::htpasswd("node", "node-secret");
    let f = facade(
        dir.path(),
        json!({"ws": {"baseRef": format!("{}/r/img:latest", evil.host())}}),
        json!({}),
        Some(&auth.docker_config_json(&evil.host())),
    );
    f.manifest_layers("ws");
    let r = get(&f, &format!("/v2/fixed/ws/blobs/{}", l.digest));
    assert_eq!((r.status, sha256_digest(&r.body)), (200, l.digest.clone()));
    let to_evil = evil.requests_to(&format!("/v2/r/img/blobs/{}", l.digest));
    assert!(to_evil.iter().any(|r| r.header("authorization").is_some()), "the registry was never sent credentials");
    let to_target = target.requests();
    assert!(!to_target.is_empty());
    for r in &to_target {
        assert_eq!(r.header("authorization"), None, "the redirect target got credentials");
    }
}

/// 3 and 6: a hostile registry answers at once with garbage of the right length for a digest a
/// legitimate image contains. The attacker's client never gets the last byte, nothing enters
/// the store, and the legitimate pull afterwards downloads and serves the right bytes.
#[test]
fn garbage_for_a_shared_digest_never_reaches_the_store_or_the_legit_pull() {
    let reg = Registry::start().unwrap();
    let evil = HostileRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shared = layer("data/shared", noise(256 * 1024, 5));
    push_image(&reg, "base/a:latest", &image(vec![shared.clone()]), PushFormat::Oci).unwrap();
    evil.claimed_image("evil/base", &[(shared.digest.clone(), shared.size)]);
    evil.blob("evil/base", &shared.digest, Behaviour::blob(noise(shared.size as usize, 6)));
    let specs = json!({
        "ws-a": {"baseRef": format!("{}/base/a:latest", reg.host())},
        "ws-b": {"baseRef": format!("{}/evil/base:latest", evil.host())},
    });
    let f = facade(dir.path(), specs, json!({}), None);
    f.manifest_layers("ws-b");

    let b = background_get(f.host(), format!("/v2/fixed/ws-b/blobs/{}", shared.digest)).join().unwrap();
    assert!(b.1.len() < shared.bytes.len(), "{}: the attacker's client got every byte", b.0);
    assert!(!stored(dir.path(), &shared.digest).exists(), "unverified bytes entered the store");

    f.manifest_layers("ws-a");
    let a = get(&f, &format!("/v2/fixed/ws-a/blobs/{}", shared.digest));
    assert_eq!(a.status, 200);
    assert!(a.body == shared.bytes, "the legit pull got wrong bytes");
    wait::until("the verified layer in the store", Duration::from_secs(10), || {
        stored(dir.path(), &shared.digest).exists()
    });
    assert_eq!(std::fs::read(stored(dir.path(), &shared.digest)).unwrap(), shared.bytes);
}

/// 5: a registry that redirects a blob to the facade's own metrics port, to a cloud metadata
/// address or to a link-local one gets 403 DENIED for its workspace, and nothing of the target's
/// answer reaches the client.
#[test]
fn redirects_to_the_facades_own_ports_or_link_local_are_refused() {
    let evil = HostileRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let l = layer("x", "a layer behind a forged redirect");
    std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
    let mut specs = serde_json::Map::new();
    for repo in ["own", "meta", "ll"] {
        let _ = evil.claimed_image(&format!("{repo}/img"), &[(l.digest.clone(), l.size)]);
        specs.insert(format!("ws-{repo}"), json!({"baseRef": format!("{}/{repo}/img:latest", evil.host())}));
    }
    let f = {
        std::fs::write(dir.path().join("specs.json"), Value::Object(specs).to_string()).unwrap();
        let cfg = json!({
            "registry": {"port": 0, "store": "store", "fixedSpecFN": "specs.json"},
            "prometheusAddr": "127.0.0.1:0",
            "facade": {"listenHost": "127.0.0.1", "platform": "linux/amd64", "shutdownGrace": "1s"}
        });
        Facade::start(&cfg, dir.path()).unwrap()
    };
    let metrics = f.admin[0];
    assert_eq!(request(&metrics.to_string(), "GET", "/metrics", &[], b"").status, 200);
    let targets = [
        ("own", format!("http://{metrics}/metrics")),
        ("meta", "http://169.254.169.254/latest/meta-data/".to_string()),
        ("ll", "http://169.254.1.1/".to_string()),
    ];
    for (repo, target) in &targets {
        evil.blob(&format!("{repo}/img"), &l.digest, Behaviour::Redirect { location: target.clone() });
        f.manifest_layers(&format!("ws-{repo}"));
        let r = get(&f, &format!("/v2/fixed/ws-{repo}/blobs/{}", l.digest));
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(error_of(&r), (403, Some("DENIED".to_string())), "{repo}: {body}");
        assert!(!body.contains("registry_facade_"), "{repo}: the target's answer reached the client: {body}");
    }
}
