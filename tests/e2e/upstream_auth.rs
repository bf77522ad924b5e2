//! Base images behind htpasswd basic auth and behind a token server, with credentials
//! from the `dockerAuth` file (a docker config.json).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::Facade;
use e2e::http::request;
use serde_json::{Value, json};
use test_support::image::{BuiltImage, FileEntry, ImageBuilder, LayerCompression, build_layer};
use test_support::registry::{Auth, Registry};
use test_support::skopeo;
use test_support::token_server::TokenServer;

fn image() -> BuiltImage {
    ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("private/a", "secret base a")], LayerCompression::Gzip))
        .layer(build_layer(&[FileEntry::file("private/b", "secret base b")], LayerCompression::Gzip))
        .build()
}

/// Pushes with the registry's own authenticated upload API (skopeo would need credentials too).
fn push(reg: &Registry, repo: &str, img: &BuiltImage) {
    for (_, bytes) in img.blobs() {
        reg.push_blob(repo, bytes).unwrap();
    }
    reg.push_manifest(repo, "latest", "application/vnd.oci.image.manifest.v1+json", &img.manifest).unwrap();
}

fn facade_for(reg: &Registry, docker_config: &str) -> (Facade, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("auth.json"), docker_config).unwrap();
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {"baseRef": format!("{}/private/base:latest", reg.host())}}).to_string(),
    )
    .unwrap();
    let cfg = json!({
        "registry": {"port": 0, "fixedSpecFN": "specs.json", "store": "store"},
        "dockerAuth": "auth.json",
        "facade": {"listenHost": "127.0.0.1"}
    });
    (Facade::start(&cfg, dir.path()).unwrap(), dir)
}

fn pull_ok(facade: &Facade) -> skopeo::PulledImage {
    let out = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_preserving_digests(&format!("{}/fixed/ws:latest", facade.host()), out.path(), "latest")
        .unwrap();
    skopeo::read_oci_layout(out.path(), "latest").unwrap()
}

#[test]
fn pulls_through_htpasswd_basic_auth() {
    let auth = Auth::htpasswd("puller", "s3cret-pw");
    let reg = Registry::start_with(auth.clone(), &[]).unwrap();
    push(&reg, "private/base", &image());

    let (facade, _dir) = facade_for(&reg, &auth.docker_config_json(&reg.host()));
    let img = pull_ok(&facade);
    assert_eq!(img.layer_files.len(), 2);
    assert_eq!(img.rootfs()["private/b"], b"secret base b");

    let wrong = Auth::htpasswd("puller", "wrong");
    let (facade, _dir) = facade_for(&reg, &wrong.docker_config_json(&reg.host()));
    let r = request(&facade.host(), "GET", "/v2/fixed/ws/manifests/latest", &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (403, Some("DENIED")), "{}", String::from_utf8_lossy(&r.body));
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains("wrong") && !body.contains("s3cret"), "credentials leaked: {body}");
}

#[test]
fn pulls_through_a_token_server_and_reuses_tokens() {
    let tokens = TokenServer::start("puller", "t0ken-pw").unwrap();
    let reg = Registry::start_with(tokens.auth(), &[]).unwrap();
    push(&reg, "private/base", &image());
    let before = tokens.token_requests();

    let (facade, _dir) = facade_for(&reg, &tokens.auth().docker_config_json(&reg.host()));
    let img = pull_ok(&facade);
    assert_eq!(img.layer_files.len(), 2);
    // HEAD + manifest + config + 2 layers on one repository: one token serves them all.
    let used = tokens.token_requests() - before;
    assert!((1..=2).contains(&used), "token requests for one pull: {used}");

    let (facade, _dir) = facade_for(&reg, r#"{"auths":{}}"#);
    let r = request(&facade.host(), "GET", "/v2/fixed/ws/manifests/latest", &[], b"");
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    // The detail names the host that refused: here the token server, which wants credentials.
    let refused_by = v["errors"][0]["detail"]["upstream"].as_str().unwrap().to_string();
    assert!([reg.host(), tokens.realm()].iter().any(|h| h.contains(&refused_by)), "{refused_by}");
}
