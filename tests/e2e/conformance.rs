//! The checks of the OCI distribution-spec conformance suite's pull workflow, run
//! against a `fixed` workspace image with an OCI base (the suite's Accept lists OCI types only),
//! plus isolation between workspaces and hostile names and digests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use e2e::Facade;
use e2e::http::request;
use serde_json::{Value, json};
use test_support::image::{
    FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, build_tar, push_image, sha256_digest,
};
use test_support::registry::Registry;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

struct World {
    _reg: Registry,
    dir: tempfile::TempDir,
    facade: Facade,
}

fn world() -> World {
    let reg = Registry::start().unwrap();
    let base =
        ImageBuilder::new().layer(build_layer(&[FileEntry::file("etc/base", "base")], LayerCompression::Gzip)).build();
    push_image(&reg, "base:1", &base, PushFormat::Oci).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let content =
        |s: &str| base64::engine::general_purpose::STANDARD.encode(build_tar(&[FileEntry::file("secret.txt", s)]));
    std::fs::write(
        dir.path().join("specs.json"),
        json!({
            "ws-a": {"baseRef": format!("{}/base:1", reg.host()), "contentLayer": [{"direct": {"content": content("A's secret")}}]},
            "ws-b": {"baseRef": format!("{}/base:1", reg.host()), "contentLayer": [{"direct": {"content": content("B's secret")}}]}
        })
        .to_string(),
    )
    .unwrap();
    let facade = Facade::start(
        &json!({"registry": {"port": 0, "fixedSpecFN": "specs.json", "store": "store"}, "facade": {"listenHost": "127.0.0.1"}}),
        dir.path(),
    )
    .unwrap();
    World { _reg: reg, dir, facade }
}

fn manifest_of(h: &str, name: &str) -> (Value, String) {
    let r = request(h, "GET", &format!("/v2/{name}/manifests/latest"), &[("Accept", OCI_MANIFEST)], b"");
    assert_eq!(r.status, 200);
    (serde_json::from_slice(&r.body).unwrap(), r.header("docker-content-digest").unwrap().to_string())
}

#[test]
fn pull_workflow_checks() {
    let w = world();
    let h = w.facade.host();
    let name = "fixed/ws-a";
    // Ping.
    let r = request(&h, "GET", "/v2/", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-distribution-api-version"), Some("registry/2.0"));

    let (m, digest) = manifest_of(&h, name);
    let config = m["config"]["digest"].as_str().unwrap().to_string();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();

    // Blobs: HEAD and GET on existing digests, digest header equal when present.
    for d in [&config, &layer] {
        for method in ["HEAD", "GET"] {
            let r = request(&h, method, &format!("/v2/{name}/blobs/{d}"), &[], b"");
            assert_eq!(r.status, 200, "{method} {d}");
            if let Some(got) = r.header("docker-content-digest") {
                assert_eq!(got, d);
            }
            if method == "GET" {
                assert_eq!(&sha256_digest(&r.body), d);
            }
        }
    }
    // Non-existent blob.
    let missing = format!("sha256:{}", "f".repeat(64));
    for method in ["HEAD", "GET"] {
        assert_eq!(request(&h, method, &format!("/v2/{name}/blobs/{missing}"), &[], b"").status, 404);
    }
    // Manifests by tag and by digest, OCI Accept, digest header equal to the tag's digest.
    for reference in ["latest", digest.as_str()] {
        for method in ["HEAD", "GET"] {
            let r = request(&h, method, &format!("/v2/{name}/manifests/{reference}"), &[("Accept", OCI_MANIFEST)], b"");
            assert_eq!(r.status, 200, "{method} {reference}");
            assert_eq!(r.header("docker-content-digest").unwrap(), digest);
            assert_eq!(r.header("content-type").unwrap(), OCI_MANIFEST);
        }
    }
    // Stable across calls.
    assert_eq!(manifest_of(&h, name).1, digest);
    // Invalid tag → 404, unknown digest → 404.
    for method in ["HEAD", "GET"] {
        assert_eq!(request(&h, method, &format!("/v2/{name}/manifests/.INVALID_MANIFEST_NAME"), &[], b"").status, 404);
        assert_eq!(request(&h, method, &format!("/v2/{name}/manifests/{missing}"), &[], b"").status, 404);
    }
    // Error codes: a PUT (newer suites) and a GET (older suites) of a garbage digest → 400 with a
    // spec code, or 404; never 405.
    let r = request(
        &h,
        "PUT",
        &format!("/v2/{name}/manifests/sha256:totallywrong"),
        &[("Content-Type", OCI_MANIFEST)],
        b"{garbage",
    );
    assert!(r.status == 400 || r.status == 404, "{}", r.status);
    if r.status == 400 {
        let code = r.error_code().unwrap();
        assert!(
            ["DIGEST_INVALID", "MANIFEST_INVALID", "UNSUPPORTED", "NAME_INVALID"].contains(&code.as_str()),
            "{code}"
        );
    }
    let r = request(&h, "GET", &format!("/v2/{name}/manifests/sha256:totallywrong"), &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (400, Some("DIGEST_INVALID")));
    // Teardown of a pull-only registry: deletes are refused with 405 (accepted by the suite).
    let r = request(&h, "DELETE", &format!("/v2/{name}/manifests/{digest}"), &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
}

#[test]
fn one_workspace_cannot_read_anothers_content_layer() {
    let w = world();
    let h = w.facade.host();
    let (ma, _) = manifest_of(&h, "fixed/ws-a");
    let (mb, _) = manifest_of(&h, "fixed/ws-b");
    let a_secret = ma["layers"][1]["digest"].as_str().unwrap();
    let b_secret = mb["layers"][1]["digest"].as_str().unwrap();
    assert_ne!(a_secret, b_secret);
    assert_eq!(request(&h, "GET", &format!("/v2/fixed/ws-a/blobs/{a_secret}"), &[], b"").status, 200);
    for (name, digest) in [("fixed/ws-a", b_secret), ("fixed/ws-b", a_secret)] {
        for method in ["HEAD", "GET"] {
            let r = request(&h, method, &format!("/v2/{name}/blobs/{digest}"), &[], b"");
            assert_eq!(r.status, 404, "{method} {name} {digest}");
            assert!(!String::from_utf8_lossy(&r.body).contains("secret"));
        }
    }
    // Nor its config, nor its manifest by digest.
    let b_config = mb["config"]["digest"].as_str().unwrap();
    assert_eq!(request(&h, "GET", &format!("/v2/fixed/ws-a/blobs/{b_config}"), &[], b"").status, 404);
    let (_, b_digest) = manifest_of(&h, "fixed/ws-b");
    assert_eq!(request(&h, "GET", &format!("/v2/fixed/ws-a/manifests/{b_digest}"), &[], b"").status, 404);
}

#[test]
fn hostile_names_and_digests_touch_no_file() {
    let w = world();
    let h = w.facade.host();
    // A file outside the store that a traversal would reach.
    let outside = w.dir.path().join("outside.txt");
    std::fs::write(&outside, "not for clients").unwrap();
    let long = "a".repeat(300);
    let paths = [
        "/v2/fixed/../../outside.txt/manifests/latest".to_string(),
        "/v2/fixed/%2e%2e%2fouside/manifests/latest".to_string(),
        "/v2/fixed/ws-a/blobs/sha256:../../outside.txt".to_string(),
        "/v2/fixed/ws-a/blobs/sha256%3a..%2f..%2foutside.txt".to_string(),
        format!("/v2/fixed/ws-a/blobs/sha256:{}", "../".repeat(30)),
        format!("/v2/fixed/{long}/manifests/latest"),
        "/v2/fixed/ws-a/manifests/latest%00".to_string(),
        "/v2/FIXED/ws-a/manifests/latest".to_string(),
        "/v2/fixed/ws-a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".to_string(),
        "/v2/fixed//ws-a/manifests/latest".to_string(),
    ];
    for p in &paths {
        let r = request(&h, "GET", p, &[], b"");
        assert!(r.status == 400 || r.status == 404, "{p}: {}", r.status);
        assert_eq!(r.header("content-type"), Some("application/json"), "{p}");
        assert!(r.error_code().is_some(), "{p}: no OCI error body");
        assert!(!String::from_utf8_lossy(&r.body).contains("not for clients"));
    }
    // Nothing was created outside the store either.
    let mut names: Vec<String> = std::fs::read_dir(w.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["outside.txt", "specs.json", "store"]);
}
