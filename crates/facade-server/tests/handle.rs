//! `App::handle` called directly, without sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::{call, in_process_app as app};
use facade_oci::media_types::OCI_MANIFEST;
use facade_server::ServerConfig;
use http::Method;

fn code(body: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["errors"][0]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn answers_without_a_socket() {
    let app = app(ServerConfig::default());
    let (resp, body) = call(&app, Method::GET, "/v2/remote/ws1/manifests/latest").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], OCI_MANIFEST);
    assert_eq!(&body[..], common::OCI_BODY);
    let (resp, body) = call(&app, Method::HEAD, "/v2/remote/ws1/manifests/latest").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], common::OCI_BODY.len().to_string());
    assert!(body.is_empty());
}

#[tokio::test]
async fn odd_names_never_panic() {
    // The URL limit (8 KiB by default, 414) would answer the 10 KiB cases first; this test is
    // about the name and digest grammar behind it.
    let app = app(ServerConfig { max_url_bytes: 64 << 10, ..ServerConfig::default() });
    let huge = format!("/v2/remote/{}/manifests/latest", "a".repeat(10 * 1024));
    let weird = [
        huge.as_str(),
        "/v2/remote/%ff%fe/manifests/latest",
        "/v2/remote/a%2f..%2fb/manifests/latest",
        "/v2/remote/%2E/manifests/latest",
        "/v2/remote/a~b/manifests/latest",
        "/v2/remote/a!b/manifests/latest",
        "/v2/remote/a__/manifests/latest",
        "/v2/remote/-a/manifests/latest",
        "/v2/remote//a/manifests/latest",
        "/v2//manifests/latest",
    ];
    for uri in weird {
        let (resp, body) = call(&app, Method::GET, uri).await;
        assert_eq!(resp.status(), 400, "{uri}");
        assert_eq!(code(&body), "NAME_INVALID", "{uri}");
        assert_eq!(resp.headers()["docker-distribution-api-version"], "registry/2.0");
    }
    // A huge digest is rejected as a digest, not echoed back whole.
    let huge_digest = format!("/v2/remote/ws1/blobs/sha256:{}", "a".repeat(10 * 1024));
    let (resp, body) = call(&app, Method::GET, &huge_digest).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(code(&body), "DIGEST_INVALID");
    assert!(body.len() < 2048, "error body echoes at most a clipped value");
}

#[tokio::test]
async fn prefix_is_normalized() {
    for prefix in ["registry", "/registry", "/registry/"] {
        let app = app(ServerConfig { prefix: prefix.into(), ..ServerConfig::default() });
        let (resp, _) = call(&app, Method::GET, "/registry/v2/").await;
        assert_eq!(resp.status(), 200, "{prefix}");
        let (resp, _) = call(&app, Method::GET, "/v2/").await;
        assert_eq!(resp.status(), 404, "{prefix}");
    }
}
