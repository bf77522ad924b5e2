//! The server over loopback, driven by a real hyper client (HTTP/1.1 and h2c).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use facade_oci::Digest;
use facade_oci::media_types::{DOCKER_MANIFEST, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST};
use facade_server::ServerConfig;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

const API_VERSION: &str = "docker-distribution-api-version";

fn layer() -> Bytes {
    Bytes::from((0..100u8).collect::<Vec<_>>())
}

async fn standard() -> (TestServer, Digest) {
    let mut backend = MemBackend::standard();
    let digest = backend.add_blob("ws1", layer(), OCI_LAYER_GZIP);
    (TestServer::start(ServerConfig::default(), backend).await, digest)
}

fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status.as_u16(), status, "body: {:?}", reply.body);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.header(API_VERSION), "registry/2.0");
    assert_eq!(reply.code(), code, "body: {:?}", reply.body);
    assert_eq!(reply.header("content-length"), reply.bytes().len().to_string());
}

#[tokio::test]
async fn base_route_answers_empty_json() {
    let (server, _) = standard().await;
    let client = http1_client();
    for path in ["/v2/", "/v2"] {
        let r = get(&client, &server.url(path)).await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.bytes()[..], b"{}");
        assert_eq!(r.header(API_VERSION), "registry/2.0");
        assert_eq!(r.header("content-type"), "application/json");
    }
    let head = send(&client, Method::HEAD, &server.url("/v2/"), &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), "2");
    assert!(head.bytes().is_empty());
}

#[tokio::test]
async fn unmatched_paths_get_an_oci_404() {
    let (server, _) = standard().await;
    let client = http1_client();
    for path in ["/", "/v1/", "/v2x", "/v2/remote/ws1/tags/other", "/v2/remote/ws1/referrers/x", "/healthz"] {
        let r = get(&client, &server.url(path)).await;
        assert_error(&r, 404, "UNSUPPORTED");
    }
}

#[tokio::test]
async fn manifest_by_tag_and_by_digest() {
    let (server, _) = standard().await;
    let client = http1_client();
    let digest = Digest::sha256_of(OCI_BODY);
    for reference in ["latest".to_string(), digest.to_string()] {
        let url = server.url(&format!("/v2/remote/ws1/manifests/{reference}"));
        let r = send(&client, Method::GET, &url, &[("accept", OCI_MANIFEST)]).await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.bytes()[..], OCI_BODY);
        assert_eq!(r.header("content-type"), OCI_MANIFEST);
        assert_eq!(r.header("content-length"), OCI_BODY.len().to_string());
        assert_eq!(r.header("docker-content-digest"), digest.as_str());
        assert_eq!(r.header("etag"), format!("\"{digest}\""));
        assert_eq!(r.header(API_VERSION), "registry/2.0");

        let h = send(&client, Method::HEAD, &url, &[("accept", OCI_MANIFEST)]).await;
        assert_eq!(h.status, 200);
        assert_eq!(h.headers.len(), r.headers.len());
        for (name, value) in &r.headers {
            if name != "date" {
                assert_eq!(h.headers.get(name), Some(value), "{name}");
            }
        }
        assert!(h.bytes().is_empty());
    }
    let requests = server.backend.manifest_requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[0].provider, "remote");
    assert_eq!(requests[0].id, "ws1");
    assert_eq!(requests[0].accept, vec![OCI_MANIFEST.to_string()]);
    assert!(!requests[0].method_head && requests[1].method_head);
}

#[tokio::test]
async fn manifest_errors() {
    let (server, _) = standard().await;
    let client = http1_client();
    let cases: &[(&str, u16, &str)] = &[
        ("/v2/remote/ws1/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("/v2/remote/ws1/manifests/", 404, "MANIFEST_UNKNOWN"),
        ("/v2/remote/ws1/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
        ("/v2/remote/ws1/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("/v2/remote/not-a-valid-image/manifests/latest", 404, "MANIFEST_UNKNOWN"),
        ("/v2/other/ws1/manifests/latest", 404, "MANIFEST_UNKNOWN"),
        ("/v2/remote/manifests/latest", 404, "MANIFEST_UNKNOWN"),
        ("/v2/Remote/ws1/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/remote%2Fws1/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/remote/%2e%2e/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/remote/../manifests/latest", 400, "NAME_INVALID"),
        ("/v2/remote/ws1%00/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/remote/ratelimited/manifests/latest", 429, "TOOMANYREQUESTS"),
        ("/v2/remote/denied/manifests/latest", 403, "DENIED"),
        ("/v2/remote/down/manifests/latest", 503, "UNAVAILABLE"),
        ("/v2/remote/boom/manifests/latest", 500, "UNKNOWN"),
        ("/v2/remote/invalid/manifests/latest", 400, "MANIFEST_INVALID"),
        ("/v2/remote/unauth/manifests/latest", 401, "UNAUTHORIZED"),
        ("/v2/remote/noname/manifests/latest", 404, "NAME_UNKNOWN"),
    ];
    for (path, status, code) in cases {
        let r = get(&client, &server.url(path)).await;
        assert_error(&r, *status, code);
        let h = send(&client, Method::HEAD, &server.url(path), &[]).await;
        assert_eq!(h.status, r.status, "HEAD {path}");
        assert_eq!(h.header("content-length"), r.header("content-length"), "HEAD {path}");
        assert!(h.bytes().is_empty());
    }
    let r = get(&client, &server.url("/v2/remote/ratelimited/manifests/latest")).await;
    assert_eq!(r.header("retry-after"), "42");
    assert_eq!(r.json()["errors"][0]["detail"]["host"], "registry.example");
    let r = get(&client, &server.url("/v2/remote/unauth/manifests/latest")).await;
    assert_eq!(r.header("www-authenticate"), "Basic realm=\"registry-facade\"");
    let r = get(&client, &server.url("/v2/remote/boom/manifests/latest")).await;
    let text = String::from_utf8_lossy(r.bytes()).to_string();
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn long_names_are_rejected_not_crashed() {
    let (server, digest) = standard().await;
    let client = http1_client();
    let name = format!("remote/{}", "a".repeat(260));
    let r = get(&client, &server.url(&format!("/v2/{name}/manifests/latest"))).await;
    assert_error(&r, 400, "NAME_INVALID");
    let name = format!("remote/{}", "abc/".repeat(2_500));
    let r = get(&client, &server.url(&format!("/v2/{name}x/blobs/{digest}"))).await;
    // 10 KB of name is over the URL limit before it is over the name grammar.
    assert_error(&r, 414, "NAME_INVALID");
    let r = get(&client, &server.url("/v2/")).await;
    assert_eq!(r.status, 200, "server still up");
}

#[tokio::test]
async fn manifest_digest_safety_net() {
    let (server, _) = standard().await;
    let client = http1_client();
    // The backend answers with bytes that hash to something else: never serve them.
    let other = Digest::sha256_of(DOCKER_BODY);
    let r = get(&client, &server.url(&format!("/v2/remote/liar/manifests/{other}"))).await;
    assert_error(&r, 404, "MANIFEST_UNKNOWN");
    // By tag with a claimed digest that does not match the bytes: refuse rather than mislead.
    let r = get(&client, &server.url("/v2/remote/wrongdigest/manifests/latest")).await;
    assert_error(&r, 500, "UNKNOWN");
}

#[tokio::test]
async fn accept_negotiation() {
    let (server, _) = standard().await;
    let client = http1_client();
    let url = server.url("/v2/remote/ws1/manifests/docker");
    let r = send(&client, Method::GET, &url, &[("accept", OCI_MANIFEST), ("accept", OCI_INDEX)]).await;
    assert_error(&r, 404, "MANIFEST_UNKNOWN");
    let message = r.json()["errors"][0]["message"].as_str().unwrap().to_string();
    assert!(message.contains(OCI_MANIFEST) && message.contains(OCI_INDEX), "{message}");
    for accept in [
        "*/*",
        "application/*",
        DOCKER_MANIFEST,
        "text/html, application/vnd.docker.distribution.manifest.v2+json;q=0.9",
    ] {
        let r = send(&client, Method::GET, &url, &[("accept", accept)]).await;
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(r.header("content-type"), DOCKER_MANIFEST);
    }
    let r = get(&client, &url).await;
    assert_eq!(r.status, 200, "no Accept means any");
    let r = send(&client, Method::GET, &url, &[("accept", "application/vnd.docker.distribution.manifest.v2+json;q=0")])
        .await;
    assert_eq!(r.status, 404, "q=0 refuses the type");
}

#[tokio::test]
async fn write_methods_are_refused() {
    let (server, digest) = standard().await;
    let client = http1_client();
    let put = send(&client, Method::PUT, &server.url("/v2/remote/ws1/manifests/latest"), &[]).await;
    assert_error(&put, 400, "UNSUPPORTED");
    let put = send(&client, Method::PUT, &server.url("/v2/remote/ws1/manifests/sha256:totallywrong"), &[]).await;
    assert_eq!(put.status, 400);
    let cases = [
        (Method::POST, "/v2/remote/ws1/blobs/uploads/".to_string()),
        (Method::PATCH, "/v2/remote/ws1/blobs/uploads/1234-abcd".to_string()),
        (Method::PUT, format!("/v2/remote/ws1/blobs/uploads/1234-abcd?digest={digest}")),
        (Method::GET, "/v2/remote/ws1/blobs/uploads/1234".to_string()),
        (Method::DELETE, "/v2/remote/ws1/manifests/latest".to_string()),
        (Method::DELETE, format!("/v2/remote/ws1/blobs/{digest}")),
        (Method::PUT, format!("/v2/remote/ws1/blobs/{digest}")),
        (Method::POST, "/v2/".to_string()),
        (Method::OPTIONS, "/v2/remote/ws1/manifests/latest".to_string()),
    ];
    for (method, path) in cases {
        let r = send(&client, method.clone(), &server.url(&path), &[]).await;
        assert_error(&r, 405, "UNSUPPORTED");
        assert_eq!(r.header("allow"), "GET, HEAD", "{method} {path}");
    }
}

#[tokio::test]
async fn blob_get_and_head() {
    let (server, digest) = standard().await;
    let client = http1_client();
    let url = server.url(&format!("/v2/remote/ws1/blobs/{digest}"));
    let r = get(&client, &url).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), &layer());
    assert_eq!(r.header("content-length"), "100");
    assert_eq!(r.header("content-type"), OCI_LAYER_GZIP);
    assert_eq!(r.header("docker-content-digest"), digest.as_str());
    assert_eq!(r.header("accept-ranges"), "bytes");
    assert_eq!(r.header("etag"), format!("\"{digest}\""));
    assert_eq!(r.header(API_VERSION), "registry/2.0");
    assert_eq!(server.backend.opens.load(Ordering::SeqCst), 1);

    let h = send(&client, Method::HEAD, &url, &[]).await;
    assert_eq!(h.status, 200);
    for (name, value) in &r.headers {
        if name != "date" {
            assert_eq!(h.headers.get(name), Some(value), "{name}");
        }
    }
    assert!(h.bytes().is_empty());
    assert_eq!(server.backend.opens.load(Ordering::SeqCst), 1, "HEAD never opens content");
}

#[tokio::test]
async fn blob_errors() {
    let (server, digest) = standard().await;
    let client = http1_client();
    let unknown = Digest::sha256_of(b"not here");
    let cases = [
        (format!("/v2/remote/ws1/blobs/{unknown}"), 404, "BLOB_UNKNOWN"),
        // A blob of ws1 must not be readable through another workspace id.
        (format!("/v2/remote/ws2/blobs/{digest}"), 404, "BLOB_UNKNOWN"),
        (format!("/v2/remote/blobs/{digest}"), 404, "BLOB_UNKNOWN"),
        ("/v2/remote/ws1/blobs/sha256:totallywrong".to_string(), 400, "DIGEST_INVALID"),
        ("/v2/remote/ws1/blobs/latest".to_string(), 400, "DIGEST_INVALID"),
        (format!("/v2/remote/ws1/blobs/{}", digest.as_str().replace(':', "%3A")), 400, "DIGEST_INVALID"),
        (format!("/v2/remote/down/blobs/{digest}"), 503, "UNAVAILABLE"),
    ];
    for (path, status, code) in cases {
        let r = get(&client, &server.url(&path)).await;
        assert_error(&r, status, code);
        let h = send(&client, Method::HEAD, &server.url(&path), &[]).await;
        assert_eq!(h.status.as_u16(), status, "HEAD {path}");
    }
}

#[tokio::test]
async fn ranges() {
    let (server, digest) = standard().await;
    let client = http1_client();
    let url = server.url(&format!("/v2/remote/ws1/blobs/{digest}"));
    let data = layer();
    for (range, start, end) in [
        ("bytes=10-19", 10usize, 19usize),
        ("bytes=90-", 90, 99),
        ("bytes=-5", 95, 99),
        ("bytes=0-", 0, 99),
        ("bytes=95-1000", 95, 99),
    ] {
        let r = send(&client, Method::GET, &url, &[("range", range)]).await;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.header("content-range"), format!("bytes {start}-{end}/100"), "{range}");
        assert_eq!(r.header("content-length"), (end - start + 1).to_string());
        assert_eq!(r.bytes(), &data.slice(start..=end), "{range}");
        let h = send(&client, Method::HEAD, &url, &[("range", range)]).await;
        assert_eq!(h.status, 206);
        assert_eq!(h.header("content-range"), r.header("content-range"));
        assert_eq!(h.header("content-length"), r.header("content-length"));
        assert!(h.bytes().is_empty());
    }
    let opens = server.backend.opens.load(Ordering::SeqCst);
    assert_eq!(opens, 5, "one open per GET, none per HEAD");

    for range in ["bytes=100-", "bytes=200-300", "bytes=-0"] {
        let r = send(&client, Method::GET, &url, &[("range", range)]).await;
        assert_eq!(r.status, 416, "{range}");
        assert_eq!(r.header("content-range"), "bytes */100");
        assert_eq!(r.header(API_VERSION), "registry/2.0");
    }
    for range in ["bytes=0-1,5-6", "bytes=5-1", "items=0-1", "bytes=x"] {
        let r = send(&client, Method::GET, &url, &[("range", range)]).await;
        assert_eq!(r.status, 200, "{range}");
        assert_eq!(r.bytes(), &data);
        assert_eq!(r.header("content-range"), "");
    }
    assert_eq!(server.backend.opens.load(Ordering::SeqCst), opens + 4);
}

#[tokio::test]
async fn zero_size_blob() {
    let mut backend = MemBackend::standard();
    let digest = backend.add_blob("ws1", Bytes::new(), "");
    let server = TestServer::start(ServerConfig::default(), backend).await;
    let client = http1_client();
    let url = server.url(&format!("/v2/remote/ws1/blobs/{digest}"));
    for headers in [&[][..], &[("range", "bytes=0-")][..]] {
        let r = send(&client, Method::GET, &url, headers).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), "0");
        assert_eq!(r.header("content-type"), "application/octet-stream");
        assert_eq!(r.header("docker-content-digest"), digest.as_str());
        assert!(r.bytes().is_empty());
    }
    let h = send(&client, Method::HEAD, &url, &[]).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), "0");
    assert_eq!(server.backend.opens.load(Ordering::SeqCst), 0, "nothing to open");
}

#[tokio::test]
async fn redirects_remote_content_layers() {
    let mut backend = MemBackend::standard();
    let digest = Digest::sha256_of(b"remote layer");
    backend.add_special(
        "ws1",
        &digest,
        Blob::Redirect { size: 12, url: "https://cdn.example/layer.tar.gz?sig=abc".into() },
    );
    let server = TestServer::start(ServerConfig::default(), backend).await;
    let client = http1_client();
    let url = server.url(&format!("/v2/remote/ws1/blobs/{digest}"));
    for method in [Method::GET, Method::HEAD] {
        let r = send(&client, method, &url, &[]).await;
        assert_eq!(r.status, 307);
        assert_eq!(r.header("location"), "https://cdn.example/layer.tar.gz?sig=abc");
        assert_eq!(r.header("docker-content-digest"), digest.as_str());
        assert_eq!(r.header(API_VERSION), "registry/2.0");
    }
}

#[tokio::test]
async fn stream_error_truncates_the_body() {
    let mut backend = MemBackend::standard();
    let data = Bytes::from(vec![7u8; 1000]);
    let digest = Digest::sha256_of(&data);
    backend.add_special("ws1", &digest, Blob::FailsAfter { data: data.clone(), good: 300 });
    let short = Bytes::from(vec![8u8; 10]);
    let short_digest = Digest::sha256_of(&short);
    backend.add_special("ws1", &short_digest, Blob::Short { data: short, claimed: 50 });
    let server = TestServer::start(ServerConfig::default(), backend).await;

    // hyper client: the exchange must fail, never look complete. When the failure comes
    // before hyper flushed the headers, the client sees the connection close instead.
    for client in [http1_client(), h2c_client()] {
        for d in [&digest, &short_digest] {
            match try_send(&client, Method::GET, &server.url(&format!("/v2/remote/ws1/blobs/{d}")), &[]).await {
                Ok(r) => {
                    assert_eq!(r.status, 200);
                    assert!(
                        r.body.is_err(),
                        "truncated body must be an error, got {:?}",
                        r.body.as_ref().map(Bytes::len)
                    );
                }
                Err(e) => assert!(e.contains("Incomplete") || e.contains("Reset"), "{e}"),
            }
        }
    }

    // Raw HTTP/1.1: the connection closes after fewer bytes than Content-Length.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!("GET /v2/remote/ws1/blobs/{digest} HTTP/1.1\r\nhost: x\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(BOUND, tcp.read_to_end(&mut raw)).await.expect("connection closed");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.to_ascii_lowercase().contains("content-length: 1000"), "{head}");
    assert!(body.len() <= 300, "{} body bytes", body.len());

    let metrics = get(&http1_client(), &server.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(metrics.bytes()).to_string();
    assert!(metrics.contains("registry_facade_response_aborted_total{reason=\"source_error\"} 3"), "{metrics}");
    assert!(metrics.contains("registry_facade_response_aborted_total{reason=\"source_short\"} 2"), "{metrics}");
}

#[tokio::test]
async fn prefix_and_query_strings() {
    let mut backend = MemBackend::standard();
    let digest = backend.add_blob("ws1", layer(), OCI_LAYER_GZIP);
    let config = ServerConfig { prefix: "/registry/".into(), ..ServerConfig::default() };
    let server = TestServer::start(config, backend).await;
    let client = http1_client();
    assert_eq!(get(&client, &server.url("/registry/v2/")).await.status, 200);
    let r = get(&client, &server.url("/registry/v2/remote/ws1/manifests/latest?ns=docker.io")).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.bytes()[..], OCI_BODY);
    let r = get(&client, &server.url(&format!("/registry/v2/remote/ws1/blobs/{digest}?ns=docker.io&x=1"))).await;
    assert_eq!(r.status, 200);
    assert_error(&get(&client, &server.url("/v2/")).await, 404, "UNSUPPORTED");
    assert_error(&get(&client, &server.url("/v2/remote/ws1/manifests/latest")).await, 404, "UNSUPPORTED");
}

#[tokio::test]
async fn query_string_is_ignored_without_prefix() {
    let (server, digest) = standard().await;
    let client = http1_client();
    let r = get(&client, &server.url("/v2/remote/ws1/manifests/latest?ns=docker.io")).await;
    assert_eq!(r.status, 200);
    let r = get(&client, &server.url(&format!("/v2/remote/ws1/blobs/{digest}?ns=docker.io"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&client, &server.url("/v2/?ns=docker.io")).await.status, 200);
}

#[tokio::test]
async fn header_deadline_answers_503() {
    let config = ServerConfig { response_header_timeout: Some(Duration::from_millis(200)), ..ServerConfig::default() };
    let server = TestServer::start(config, MemBackend::standard()).await;
    let r = get(&http1_client(), &server.url("/v2/remote/slow/manifests/latest")).await;
    assert_error(&r, 503, "UNAVAILABLE");
}

#[tokio::test]
async fn h2c_serves_the_same_answers() {
    let (server, digest) = standard().await;
    let client = h2c_client();
    let r = get(&client, &server.url("/v2/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header(API_VERSION), "registry/2.0");
    let m = send(&client, Method::HEAD, &server.url("/v2/remote/ws1/manifests/latest"), &[]).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-length"), OCI_BODY.len().to_string());
    assert!(m.bytes().is_empty());
    let url = server.url(&format!("/v2/remote/ws1/blobs/{digest}"));
    let b = send(&client, Method::GET, &url, &[("range", "bytes=10-19")]).await;
    assert_eq!(b.status, 206);
    assert_eq!(b.bytes(), &layer().slice(10..20));
    let h = send(&client, Method::HEAD, &url, &[]).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), "100");
    assert_error(&get(&client, &server.url("/v2/remote/ws1/manifests/nope")).await, 404, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn admin_endpoints() {
    let (server, digest) = standard().await;
    let client = http1_client();
    assert_eq!(get(&client, &server.admin_url("/live")).await.status, 200);
    assert_eq!(get(&client, &server.admin_url("/ready")).await.status, 503);
    server.readiness.set_ready(true);
    assert_eq!(get(&client, &server.admin_url("/ready")).await.status, 200);
    server.readiness.set_ready(false);
    assert_eq!(get(&client, &server.admin_url("/ready")).await.status, 503);
    assert_eq!(get(&client, &server.admin_url("/other")).await.status, 404);

    get(&client, &server.url(&format!("/v2/remote/ws1/blobs/{digest}"))).await;
    get(&client, &server.url("/v2/remote/ws1/manifests/latest")).await;
    get(&client, &server.url("/v2/remote/ws1/manifests/.bad")).await;
    let r = get(&client, &server.admin_url("/metrics")).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").starts_with("text/plain"));
    let text = String::from_utf8_lossy(r.bytes()).to_string();
    for name in [
        "registry_facade_http_requests_total",
        "registry_facade_http_request_duration_seconds",
        "registry_facade_inflight_requests",
        "registry_facade_response_aborted_total",
        "registry_facade_http_response_bytes_total",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert!(
        text.contains(r#"registry_facade_http_requests_total{method="GET",route="blob",status_class="2xx"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"registry_facade_http_requests_total{method="GET",route="manifest",status_class="4xx"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"registry_facade_http_response_bytes_total{route="blob"} 100"#), "{text}");
    assert!(!text.contains("sha256:") && !text.contains("ws1"), "unbounded label values leaked");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_inflight_stream_finish() {
    let mut backend = MemBackend::standard();
    let data = Bytes::from(vec![3u8; 64 * 1024]);
    let digest = Digest::sha256_of(&data);
    let gate = Arc::new(Semaphore::new(0));
    backend.add_special("ws1", &digest, Blob::Gated { data: data.clone(), first: 1024, gate: Arc::clone(&gate) });
    let mut server = TestServer::start(ServerConfig::default(), backend).await;
    let client = http1_client();

    let url = server.url(&format!("/v2/remote/ws1/blobs/{digest}"));
    let req = http::Request::get(&url).body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let resp = tokio::time::timeout(BOUND, client.request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);

    server.shutdown.cancel();
    // New connections are refused once the accept loop stopped (bounded retry while it stops).
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(server.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "listener still accepting after shutdown");
    assert!(!server.task.is_finished(), "serve() must wait for the in-flight stream");

    gate.add_permits(1);
    let body = tokio::time::timeout(BOUND, http_body_util::BodyExt::collect(resp.into_body()))
        .await
        .unwrap()
        .expect("the in-flight stream completes")
        .to_bytes();
    assert_eq!(body, data);
    let task = &mut server.task;
    tokio::time::timeout(BOUND, task).await.expect("serve() returns after draining").unwrap().unwrap();
}

#[tokio::test]
async fn client_going_away_mid_stream_is_counted_and_leaves_no_inflight_request() {
    let mut backend = MemBackend::standard();
    let data = Bytes::from(vec![5u8; 64 * 1024]);
    let digest = Digest::sha256_of(&data);
    let gate = Arc::new(Semaphore::new(0));
    backend.add_special("ws1", &digest, Blob::Gated { data, first: 1024, gate });
    let server = TestServer::start(ServerConfig::default(), backend).await;

    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!("GET /v2/remote/ws1/blobs/{digest} HTTP/1.1\r\nhost: x\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(BOUND, tcp.read(&mut first)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(tcp);

    let client = http1_client();
    let mut seen = String::new();
    for _ in 0..200 {
        let r = get(&client, &server.admin_url("/metrics")).await;
        seen = String::from_utf8_lossy(r.bytes()).to_string();
        if seen.contains(r#"registry_facade_response_aborted_total{reason="client_gone"} 1"#)
            && seen.contains(r#"registry_facade_inflight_requests{route="blob"} 0"#)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("abort not counted or request still in flight:\n{seen}");
}
