//! The request limits over loopback: request head size and header count, URL length, requests
//! in flight per client address, and the response idle timeout (a client that stops reading,
//! a source that stops producing). Raw TCP where the client must misbehave in ways a real
//! HTTP client refuses to.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use facade_oci::Digest;
use facade_oci::media_types::OCI_LAYER_GZIP;
use facade_server::{App, ServerConfig, ServerMetrics};
use http::{Method, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// What came back on a raw connection: the bytes until the server closed it (or the bound).
struct Raw {
    bytes: Vec<u8>,
    closed: bool,
}

impl Raw {
    fn status_line(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        text.lines().next().unwrap_or("").to_string()
    }

    fn body(&self) -> &[u8] {
        let at = self.bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
        &self.bytes[at + 4..]
    }
}

/// Writes `request` (ignoring a write error: the server may close before reading it all) and
/// reads until the server closes the connection, within [`BOUND`].
async fn raw(server: &TestServer, request: &[u8]) -> Raw {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = Instant::now() + BOUND;
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Raw { bytes, closed }
}

fn get_request(path: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: facade\r\n{extra_headers}\r\n").into_bytes()
}

async fn standard(config: ServerConfig) -> TestServer {
    TestServer::start(config, MemBackend::standard()).await
}

fn long_manifest_path(len: usize) -> String {
    let head = "/v2/remote/ws1/manifests/";
    format!("{head}{}", "a".repeat(len - head.len()))
}

#[tokio::test]
async fn an_over_long_url_is_414_name_invalid_with_an_oci_body() {
    let server = standard(ServerConfig::default()).await;
    let path = long_manifest_path(10 << 10);
    for client in [http1_client(), h2c_client()] {
        let r = get(&client, &server.url(&path)).await;
        assert_eq!(r.status, 414, "{:?}", r.body);
        assert_eq!(r.code(), "NAME_INVALID");
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("docker-distribution-api-version"), "registry/2.0");
        assert_eq!(r.json()["errors"][0]["detail"]["max"], 8192);
    }
    // A long but allowed URL still reaches the routes.
    let ok = get(&http1_client(), &server.url(&format!("/v2/remote/ws1/manifests/latest?{}", "x".repeat(7000)))).await;
    assert_eq!(ok.status, 200);
    assert!(server.backend.manifest_requests.lock().unwrap().len() == 1, "the 414s never reached the backend");
    assert_eq!(server.counter("registry_facade_limited_requests_total", &[("limit", "url_length")]), 2);
}

#[tokio::test]
async fn the_url_limit_is_configurable() {
    let server = standard(ServerConfig { max_url_bytes: 100, ..ServerConfig::default() }).await;
    let r = get(&http1_client(), &server.url(&long_manifest_path(101))).await;
    assert_eq!(r.status, 414);
    let r = get(&http1_client(), &server.url("/v2/remote/ws1/manifests/latest")).await;
    assert_eq!(r.status, 200);
}

/// hyper answers a request head over `max_header_bytes` itself: 431 without a body, then it
/// closes the connection. That includes a URL too long for the head buffer (it never gets to
/// the 414 check, which needs a parsed request).
#[tokio::test]
async fn a_huge_request_head_is_431_and_the_connection_closes() {
    let server = standard(ServerConfig::default()).await;
    let big_header = format!("X-Big: {}\r\n", "b".repeat(100 << 10));
    let r = raw(&server, &get_request("/v2/", &big_header)).await;
    assert!(r.status_line().starts_with("HTTP/1.1 431"), "{}", r.status_line());
    assert!(r.closed, "the connection must be closed after a 431");

    let r = raw(&server, &get_request(&long_manifest_path(100 << 10), "")).await;
    assert!(r.status_line().starts_with("HTTP/1.1 431"), "{}", r.status_line());
    assert!(r.closed);

    // Just under the limit is served.
    let fits = format!("X-Big: {}\r\nConnection: close\r\n", "b".repeat(60 << 10));
    let r = raw(&server, &get_request("/v2/", &fits)).await;
    assert!(r.status_line().starts_with("HTTP/1.1 200"), "{}", r.status_line());
    assert_eq!(r.body(), b"{}");
}

#[tokio::test]
async fn too_many_header_fields_is_431() {
    let server = standard(ServerConfig { max_headers: 20, ..ServerConfig::default() }).await;
    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(&server, &get_request("/v2/", &many)).await;
    assert!(r.status_line().starts_with("HTTP/1.1 431"), "{}", r.status_line());
    let few: String = (0..10).map(|i| format!("X-H{i}: v\r\n")).collect::<String>() + "Connection: close\r\n";
    let r = raw(&server, &get_request("/v2/", &few)).await;
    assert!(r.status_line().starts_with("HTTP/1.1 200"), "{}", r.status_line());
}

/// HTTP/2: the limit goes out as SETTINGS_MAX_HEADER_LIST_SIZE, and the h2 server answers a
/// bigger header list with 431 on that stream; the connection stays usable.
#[tokio::test]
async fn h2_header_lists_over_the_limit_are_431() {
    let server = standard(ServerConfig { max_header_bytes: 16 << 10, ..ServerConfig::default() }).await;
    let client = h2c_client();
    assert_eq!(get(&client, &server.url("/v2/")).await.status, 200);
    let big = "b".repeat(32 << 10);
    let r = send(&client, Method::GET, &server.url("/v2/"), &[("x-big", &big)]).await;
    assert_eq!(r.status, 431);
    assert_eq!(get(&client, &server.url("/v2/")).await.status, 200);
}

fn gated_blob(backend: &mut MemBackend, seed: u8, gate: &Arc<Semaphore>) -> Digest {
    let data = Bytes::from(vec![seed; 1000]);
    let digest = Digest::sha256_of(&data);
    backend.add_special("ws1", &digest, Blob::Gated { data, first: 10, gate: Arc::clone(gate) });
    digest
}

/// Two transfers hold the client's two slots until their bodies end, headers sent or not; a
/// third request from the same address gets 429 with `Retry-After: 1`; once a body ends the
/// address may pull again.
#[tokio::test]
async fn requests_in_flight_per_client_are_limited() {
    let gate = Arc::new(Semaphore::new(0));
    let mut backend = MemBackend::standard();
    let d1 = gated_blob(&mut backend, 1, &gate);
    let d2 = gated_blob(&mut backend, 2, &gate);
    let config = ServerConfig { max_requests_per_client: 2, ..ServerConfig::default() };
    let server = TestServer::start(config, backend).await;
    let client = http1_client();

    // Two slow blob bodies: headers arrive, the bodies wait on the gate.
    let mut bodies = Vec::new();
    for d in [&d1, &d2] {
        let req = Request::get(server.url(&format!("/v2/remote/ws1/blobs/{d}"))).body(Default::default()).unwrap();
        let resp = tokio::time::timeout(BOUND, client.request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }

    let r = get(&client, &server.url("/v2/remote/ws1/manifests/latest")).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.code(), "TOOMANYREQUESTS");
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.json()["errors"][0]["detail"]["limit"], 2);
    assert_eq!(server.counter("registry_facade_limited_requests_total", &[("limit", "client_concurrency")]), 1);
    // A request that never reaches a handler (the `/v2/` probe) counts too.
    assert_eq!(get(&client, &server.url("/v2/")).await.status, 429);

    // One body finishes: its slot is free again.
    gate.add_permits(1);
    let first = bodies.remove(0);
    let collected = tokio::time::timeout(BOUND, http_body_util::BodyExt::collect(first)).await.unwrap().unwrap();
    assert_eq!(collected.to_bytes().len(), 1000);
    let deadline = Instant::now() + BOUND;
    loop {
        let r = get(&client, &server.url("/v2/")).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not released after the body ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A dropped (cancelled) body frees its slot as well: both slots can be taken again.
    drop(bodies);
    gate.add_permits(1);
    let deadline = Instant::now() + BOUND;
    loop {
        let mut held = Vec::new();
        for d in [&d1, &d2] {
            let url = server.url(&format!("/v2/remote/ws1/blobs/{d}"));
            let req = Request::get(url).body(Default::default()).unwrap();
            held.push(tokio::time::timeout(BOUND, client.request(req)).await.unwrap().unwrap());
        }
        if held.iter().all(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the dropped body's slot was not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The limit is per address: while one address is at its limit, slow manifests (the backend
/// waits) from it are refused, and `App::handle` (no address: tests, fuzzing) is not limited.
#[tokio::test]
async fn the_limit_counts_per_address_and_handle_without_one_is_unlimited() {
    let registry = prometheus::Registry::new();
    let metrics = ServerMetrics::register(&registry).unwrap();
    let config = ServerConfig {
        max_requests_per_client: 1,
        response_header_timeout: Some(Duration::from_secs(3600)),
        ..ServerConfig::default()
    };
    let app = Arc::new(App::try_new(config, Arc::new(MemBackend::standard()), metrics).unwrap());
    let slow = || Request::get("/v2/remote/slow/manifests/latest").body(()).unwrap();
    let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();

    let app2 = Arc::clone(&app);
    let held = tokio::spawn(async move { app2.handle_from(slow(), a).await });
    // Wait until the slow request holds its slot (it has reached the backend).
    let deadline = Instant::now() + BOUND;
    while app.handle_from(Request::get("/v2/").body(()).unwrap(), a).await.status() != 429 {
        assert!(Instant::now() < deadline, "the slow request never took its slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(app.handle_from(Request::get("/v2/").body(()).unwrap(), b).await.status(), 200);
    assert_eq!(app.handle(Request::get("/v2/").body(()).unwrap()).await.status(), 200);
    held.abort();
    let _ = held.await;
    // The cancelled request released its slot.
    assert_eq!(app.handle_from(Request::get("/v2/").body(()).unwrap(), a).await.status(), 200);
}

/// A blob whose source yields nothing for the idle timeout is cut after its headers: the client
/// sees a short body, and the abort is counted as `source_idle`.
#[tokio::test]
async fn a_source_that_stops_producing_is_cut_after_the_idle_timeout() {
    let gate = Arc::new(Semaphore::new(0));
    let mut backend = MemBackend::standard();
    let digest = gated_blob(&mut backend, 3, &gate);
    let config = ServerConfig { response_idle_timeout: Some(Duration::from_millis(300)), ..ServerConfig::default() };
    let server = TestServer::start(config, backend).await;
    let started = Instant::now();
    let r = get(&http1_client(), &server.url(&format!("/v2/remote/ws1/blobs/{digest}"))).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_err(), "the body must be cut, not completed");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(server.counter("registry_facade_response_aborted_total", &[("reason", "source_idle")]), 1);
}

/// A slow source that keeps producing is never cut, however long the whole body takes.
#[tokio::test]
async fn a_slow_but_moving_source_is_not_cut() {
    let gate = Arc::new(Semaphore::new(0));
    let mut backend = MemBackend::standard();
    let digest = gated_blob(&mut backend, 4, &gate);
    let config = ServerConfig { response_idle_timeout: Some(Duration::from_millis(300)), ..ServerConfig::default() };
    let server = TestServer::start(config, backend).await;
    let opener = Arc::clone(&gate);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        opener.add_permits(1);
    });
    let r = get(&http1_client(), &server.url(&format!("/v2/remote/ws1/blobs/{digest}"))).await;
    assert_eq!(r.bytes().len(), 1000);
}

/// A client that stops reading a big blob: once the socket buffers are full, the server's
/// writes stay pending; after the idle timeout the connection is closed and the transfer's
/// slot released. A client reading slowly but steadily keeps its connection.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_the_idle_timeout() {
    const SIZE: usize = 16 << 20;
    let data = Bytes::from(vec![7u8; SIZE]);
    let digest = Digest::sha256_of(&data);
    let mut backend = MemBackend::standard();
    backend.add_special("ws1", &digest, Blob::Chunked { data, chunk: 64 << 10 });
    let config = ServerConfig {
        response_idle_timeout: Some(Duration::from_millis(300)),
        max_requests_per_client: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, backend).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let mut s = socket.connect(server.addr).await.unwrap();
    s.write_all(&get_request(&format!("/v2/remote/ws1/blobs/{digest}"), "")).await.unwrap();
    // Read nothing for well over the idle timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + BOUND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await.expect("the server must close the connection") {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    assert!(received < SIZE, "the whole blob arrived ({received} bytes): the stalled client was not cut");
    assert_eq!(server.counter("registry_facade_response_aborted_total", &[("reason", "client_gone")]), 1);
    // Its slot is free: the same address may pull again.
    let r = get(&http1_client(), &server.url("/v2/")).await;
    assert_eq!(r.status, 200);

    // Slow but steady: 1 MiB every 100 ms never leaves a write pending for 300 ms.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let mut s = socket.connect(server.addr).await.unwrap();
    s.write_all(&get_request(&format!("/v2/remote/ws1/blobs/{digest}"), "Connection: close\r\n")).await.unwrap();
    let mut received = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut chunk = 0;
        while chunk < (1 << 20) {
            match tokio::time::timeout(BOUND, s.read(&mut buf)).await.unwrap() {
                Ok(0) | Err(_) => break,
                Ok(n) => chunk += n,
            }
        }
        received += chunk;
        if chunk < (1 << 20) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(received > SIZE, "a slow reader was cut after {received} bytes");
}

#[tokio::test]
async fn a_layer_digest_route_still_serves_with_limits_on() {
    let mut backend = MemBackend::standard();
    let digest = backend.add_blob("ws1", Bytes::from_static(b"hello"), OCI_LAYER_GZIP);
    let config = ServerConfig { max_requests_per_client: 1, ..ServerConfig::default() };
    let server = TestServer::start(config, backend).await;
    let client = http1_client();
    // Sequential requests from one address never trip a limit of 1.
    for _ in 0..20 {
        let r = get(&client, &server.url(&format!("/v2/remote/ws1/blobs/{digest}"))).await;
        assert_eq!(&r.bytes()[..], b"hello");
    }
}
