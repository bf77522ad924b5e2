//! Connection ceilings over loopback with real sockets: the request-head timeout (a client that
//! sends nothing, half an HTTP/1 head, half or only the HTTP/2 preface), the idle timeout of
//! HTTP/1 keep-alive and HTTP/2 connections, the cut of an HTTP/2 stream whose window the
//! client never opens, and the cap on open connections with its 503.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use facade_oci::Digest;
use facade_server::ServerConfig;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLOSED: &str = "registry_facade_connections_closed_total";
const REFUSED: &str = "registry_facade_connections_refused_total";

/// The HTTP/2 connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn timeouts(head_ms: u64, idle_ms: u64) -> ServerConfig {
    ServerConfig {
        request_head_timeout: Some(Duration::from_millis(head_ms)),
        idle_connection_timeout: Some(Duration::from_millis(idle_ms)),
        ..ServerConfig::default()
    }
}

/// Reads until the server closes the connection (EOF or reset) and returns what came and when
/// it closed; `None` when it was still open after `wait`.
async fn until_closed(s: &mut TcpStream, wait: Duration) -> Option<(Vec<u8>, Instant)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some((got, Instant::now())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends one keep-alive `GET /v2/` and reads its response (`{}`, 2 bytes of body).
async fn one_request(s: &mut TcpStream) {
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: facade\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + BOUND;
    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"{}")) {
        assert!(Instant::now() < deadline, "no response: {:?}", String::from_utf8_lossy(&got));
        let n = tokio::time::timeout(BOUND, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the response ended");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
}

/// hyper-util's protocol sniffing reads with no deadline and hyper's own HTTP/1 head timer
/// only starts once HTTP/1 was chosen: each of these must still be closed.
#[tokio::test]
async fn silence_half_heads_and_a_bare_preface_are_closed_after_the_head_timeout() {
    let server = TestServer::start(timeouts(300, 30_000), MemBackend::standard()).await;
    let cases: [(&str, &[u8]); 5] = [
        ("nothing", b""),
        ("one byte", b"G"),
        ("half an HTTP/1 head", b"GET /v2/ HTTP/1.1\r\nHost: facade\r\n"),
        ("half the HTTP/2 preface", b"PRI * HTTP/2.0\r\n"),
        ("the HTTP/2 preface and no request", H2_PREFACE),
    ];
    let mut sockets = Vec::new();
    for (what, bytes) in cases {
        let started = Instant::now();
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        sockets.push((what, started, s));
    }
    for (what, started, mut s) in sockets {
        let (got, at) = until_closed(&mut s, BOUND).await.unwrap_or_else(|| panic!("{what}: still open"));
        let after = at - started;
        assert!(after >= Duration::from_millis(300), "{what}: closed after {after:?}, before the head timeout");
        assert!(!String::from_utf8_lossy(&got).contains("200"), "{what}: {got:?}");
    }
    assert_eq!(server.counter(CLOSED, &[("reason", "head_timeout")]), 5);
    assert_eq!(server.counter(CLOSED, &[("reason", "idle")]), 0);
}

/// Between HTTP/1 requests the idle timeout runs, not the head timeout; the head timeout
/// starts again with the first byte of the next request.
#[tokio::test]
async fn http1_keep_alive_gets_the_idle_timeout_and_a_next_head_the_head_timeout() {
    // Idle well past the head timeout, and responses that must not count as stuck once sent.
    let config = ServerConfig { response_idle_timeout: Some(Duration::from_millis(300)), ..timeouts(300, 800) };
    let server = TestServer::start(config, MemBackend::standard()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    one_request(&mut s).await;
    let idle_from = Instant::now();
    one_request(&mut s).await; // the same connection serves another request
    let idle_from = idle_from.max(Instant::now());
    let (_, at) = until_closed(&mut s, BOUND).await.expect("an idle keep-alive connection must be closed");
    let idle = at - idle_from;
    assert!(idle >= Duration::from_millis(700), "closed {idle:?} after the response: that is not the idle timeout");
    assert_eq!(server.counter(CLOSED, &[("reason", "idle")]), 1);
    assert_eq!(server.counter(CLOSED, &[("reason", "head_timeout")]), 0);
    assert_eq!(server.counter(CLOSED, &[("reason", "zero_window")]), 0);

    // A long idle timeout: the connection waits silently, but half a head is cut quickly.
    let config = ServerConfig { response_idle_timeout: Some(Duration::from_millis(300)), ..timeouts(300, 60_000) };
    let server = TestServer::start(config, MemBackend::standard()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    one_request(&mut s).await;
    assert!(until_closed(&mut s, Duration::from_secs(1)).await.is_none(), "an idle connection was closed early");
    one_request(&mut s).await;
    s.write_all(b"GET /v2/ HTTP/1.1\r\n").await.unwrap();
    let sent = Instant::now();
    let (_, at) = until_closed(&mut s, BOUND).await.expect("half a head must be cut");
    assert!(at - sent >= Duration::from_millis(300));
    assert_eq!(server.counter(CLOSED, &[("reason", "head_timeout")]), 1);
    assert_eq!(server.counter(CLOSED, &[("reason", "idle")]), 0);
}

/// An HTTP/2 connection with no stream open is closed after the idle timeout (with a GOAWAY,
/// so the client knows), even while the client keeps pinging.
#[tokio::test]
async fn an_idle_h2_connection_is_closed_even_while_it_pings() {
    let server = TestServer::start(timeouts(300, 600), MemBackend::standard()).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(server.url("/v2/")).body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(BOUND, sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"{}");
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(BOUND, conn).await.expect("the idle h2 connection must be closed");
    assert!(ended.unwrap().is_ok(), "a GOAWAY ends the connection cleanly");
    assert!(idle_from.elapsed() >= Duration::from_millis(500), "closed after {:?}", idle_from.elapsed());
    assert_eq!(server.counter(CLOSED, &[("reason", "idle")]), 1);
    assert!(sender.send_request(Request::get(server.url("/v2/")).body(Empty::new()).unwrap()).await.is_err());
}

/// A client that opens a blob stream with a window of zero and never opens it: hyper stops
/// polling the body, nothing is ever pending on the socket, and yet after the response idle
/// timeout the connection is closed. A client that reads is served in full.
#[tokio::test]
async fn an_h2_stream_whose_window_stays_at_zero_is_cut() {
    let data = Bytes::from(vec![5u8; 1 << 20]);
    let mut backend = MemBackend::standard();
    let digest = Digest::sha256_of(&data);
    // 64 KiB pieces: 7-byte frames would make a reading client itself too slow for the timeout.
    backend.add_special("ws1", &digest, Blob::Chunked { data: data.clone(), chunk: 64 << 10 });
    let config = ServerConfig { response_idle_timeout: Some(Duration::from_millis(300)), ..timeouts(5_000, 30_000) };
    let server = TestServer::start(config, backend).await;
    let path = format!("/v2/remote/ws1/blobs/{digest}");

    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(0)
        .adaptive_window(false)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(server.url(&path)).body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(BOUND, sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    // Hold the body without reading it: the window stays at zero.
    let body = resp.into_body();
    let ended = tokio::time::timeout(BOUND, conn).await.expect("the stuck connection must be closed");
    let _ = ended.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250), "cut after {:?}", started.elapsed());
    drop(body);
    assert_eq!(server.counter(CLOSED, &[("reason", "zero_window")]), 1);
    assert_eq!(server.counter("registry_facade_response_aborted_total", &[("reason", "client_gone")]), 1);

    // A client that opens its window reads the whole blob; so does one over HTTP/1.
    for client in [h2c_client(), http1_client()] {
        let r = get(&client, &server.url(&path)).await;
        assert_eq!(r.bytes(), &data);
    }
    assert_eq!(server.counter(CLOSED, &[("reason", "zero_window")]), 1);
}

/// Over the cap, a new connection gets an HTTP/1 503 `UNAVAILABLE` with `Retry-After` and is
/// closed; the per-address request limit still applies below the cap; once a connection
/// closes, the next one is served.
#[tokio::test]
async fn connections_over_the_cap_get_503_with_retry_after() {
    let config = ServerConfig { max_connections: 2, ..timeouts(30_000, 30_000) };
    let server = TestServer::start(config, MemBackend::standard()).await;
    // Two connections hold the cap: one silent, one keep-alive after a request.
    let silent = TcpStream::connect(server.addr).await.unwrap();
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    one_request(&mut kept).await;

    for _ in 0..3 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: facade\r\n\r\n").await.unwrap();
        let (got, _) = until_closed(&mut s, BOUND).await.expect("a refused connection is closed");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains("Retry-After: 1\r\n"), "{text}");
        assert!(text.to_ascii_lowercase().contains("docker-distribution-api-version: registry/2.0\r\n"), "{text}");
        let body = &got[got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["errors"][0]["code"], "UNAVAILABLE");
        assert_eq!(json["errors"][0]["detail"]["maxConnections"], 2);
    }
    assert_eq!(server.counter(REFUSED, &[("reason", "max_connections")]), 3);
    // The kept connection still works.
    one_request(&mut kept).await;

    // One closes: a new connection is served (the server notices the close asynchronously).
    drop(silent);
    let deadline = Instant::now() + BOUND;
    loop {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: facade\r\nConnection: close\r\n\r\n").await.unwrap();
        let (got, _) = until_closed(&mut s, BOUND).await.unwrap();
        if got.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place was never given to a new connection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The open-connections gauge follows connections as they come and go.
#[tokio::test]
async fn open_connections_are_a_gauge() {
    let server = TestServer::start(timeouts(30_000, 30_000), MemBackend::standard()).await;
    let gauge = |server: &TestServer| {
        server
            .registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "registry_facade_open_connections")
            .map(|f| f.get_metric()[0].get_gauge().get_value() as i64)
            .unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        one_request(&mut s).await;
        held.push(s);
    }
    assert_eq!(gauge(&server), 3);
    drop(held);
    let deadline = Instant::now() + BOUND;
    while gauge(&server) != 0 {
        assert!(Instant::now() < deadline, "closed connections still counted: {}", gauge(&server));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
