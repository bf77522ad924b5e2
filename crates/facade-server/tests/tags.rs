//! `GET|HEAD /v2/<provider>/<id>/tags/list` through `App::handle`, with the backend's default
//! existence check (the manifest of `latest`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::{MemBackend, call};
use facade_server::{App, ServerConfig};
use http::Method;
use serde_json::{Value, json};

fn app() -> App<MemBackend> {
    common::in_process_app(ServerConfig::default())
}

fn json_of(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap()
}

#[tokio::test]
async fn lists_latest_for_a_known_workspace() {
    let app = app();
    let (resp, body) = call(&app, Method::GET, "/v2/remote/ws1/tags/list").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["docker-distribution-api-version"], "registry/2.0");
    assert_eq!(json_of(&body), json!({"name": "remote/ws1", "tags": ["latest"]}));
    assert_eq!(resp.headers()["content-length"], body.len().to_string());

    let (head, head_body) = call(&app, Method::HEAD, "/v2/remote/ws1/tags/list").await;
    assert_eq!(head.status(), 200);
    assert!(head_body.is_empty());
    assert_eq!(head.headers()["content-length"], body.len().to_string());
}

#[tokio::test]
async fn accepts_pagination_and_other_query_parameters() {
    let app = app();
    for (query, tags) in [
        ("n=10", json!(["latest"])),
        ("n=1&last=", json!(["latest"])),
        ("n=0", json!([])),
        ("last=latest", json!([])),
        ("last=a&n=5", json!(["latest"])),
        ("ns=docker.io", json!(["latest"])),
    ] {
        let (resp, body) = call(&app, Method::GET, &format!("/v2/remote/ws1/tags/list?{query}")).await;
        assert_eq!(resp.status(), 200, "{query}");
        assert_eq!(json_of(&body)["tags"], tags, "{query}");
    }
}

#[tokio::test]
async fn unknown_workspace_or_provider_is_name_unknown() {
    let app = app();
    for uri in
        ["/v2/remote/nope/tags/list", "/v2/other/ws1/tags/list", "/v2/remote/tags/list", "/v2/remote/noname/tags/list"]
    {
        let (resp, body) = call(&app, Method::GET, uri).await;
        assert_eq!(resp.status(), 404, "{uri}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{uri}");
        let v = json_of(&body);
        assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN", "{uri}: {v}");
        assert!(v["errors"][0]["message"].is_string(), "{uri}: {v}");
        let (head, head_body) = call(&app, Method::HEAD, uri).await;
        assert_eq!(head.status(), 404, "{uri}");
        assert!(head_body.is_empty());
    }
}

#[tokio::test]
async fn backend_failures_keep_their_status_and_writes_are_refused() {
    let app = app();
    let (resp, body) = call(&app, Method::GET, "/v2/remote/down/tags/list").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(json_of(&body)["errors"][0]["code"], "UNAVAILABLE");
    let (resp, body) = call(&app, Method::GET, "/v2/Remote/ws1/tags/list").await;
    assert_eq!(resp.status(), 400);
    assert_eq!(json_of(&body)["errors"][0]["code"], "NAME_INVALID");
    for method in [Method::PUT, Method::DELETE, Method::POST] {
        let (resp, body) = call(&app, method.clone(), "/v2/remote/ws1/tags/list").await;
        assert_eq!(resp.status(), 405, "{method}");
        assert_eq!(json_of(&body)["errors"][0]["code"], "UNSUPPORTED", "{method}");
    }
}
