//! `requireAuth` under attack: failed credential checks are budgeted per client address (429
//! with `Retry-After` past it), and bcrypt runs on a lane of its own, so a flood of wrong
//! passwords from many addresses neither starves the blocking pool nor stalls an
//! authenticated pull.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::*;
use facade_oci::media_types::OCI_LAYER_GZIP;
use facade_server::{AuthFile, ServerConfig};
use http::Method;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn htpasswd(dir: &tempfile::TempDir, cost: u32) -> std::path::PathBuf {
    let path = dir.path().join("htpasswd");
    std::fs::write(&path, format!("alice:{}\n", bcrypt::hash("right", cost).unwrap())).unwrap();
    path
}

/// A client whose connections come from `local` (any 127.0.0.0/8 address works on Linux).
fn client_from(local: IpAddr) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(local));
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test]
async fn failed_checks_past_the_budget_get_429_and_remembered_credentials_still_pass() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        auth: Some(AuthFile { htpasswd: htpasswd(&dir, 4) }),
        auth_failures_per_second: 2,
        ..ServerConfig::default()
    };
    let mut backend = MemBackend::standard();
    let blob = backend.add_blob("ws1", Bytes::from_static(b"layer"), OCI_LAYER_GZIP);
    let server = TestServer::start(config, backend).await;
    let client = http1_client();
    let url = server.url(&format!("/v2/remote/ws1/blobs/{blob}"));
    let right = basic("alice", "right");
    let wrong = basic("alice", "wrong");

    // Successes cost nothing: many in a row, and the first one is remembered.
    for _ in 0..6 {
        assert_eq!(send(&client, Method::GET, &url, &[("authorization", &right)]).await.status, 200);
    }
    // A burst of twice the rate is checked (401), then the address is refused before bcrypt.
    for _ in 0..4 {
        assert_eq!(send(&client, Method::GET, &url, &[("authorization", &wrong)]).await.status, 401);
    }
    let r = send(&client, Method::GET, &url, &[("authorization", &wrong)]).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.code(), "TOOMANYREQUESTS");
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(server.counter("registry_facade_limited_requests_total", &[("limit", "auth_failures")]), 1);
    assert_eq!(server.counter("registry_facade_auth_failures_total", &[("reason", "rate_limited")]), 1);
    assert_eq!(server.counter("registry_facade_auth_failures_total", &[("reason", "wrong_password")]), 4);
    // Remembered credentials need no bcrypt and pass while the address is throttled.
    assert_eq!(send(&client, Method::GET, &url, &[("authorization", &right)]).await.status, 200);
    // Missing credentials are not a failed check: the challenge still comes.
    assert_eq!(send(&client, Method::GET, &url, &[]).await.status, 401);
    // Another address has its own budget.
    let other = client_from("127.0.0.2".parse().unwrap());
    assert_eq!(send(&other, Method::GET, &url, &[("authorization", &wrong)]).await.status, 401);
    // The budget refills (2/s).
    let deadline = Instant::now() + BOUND;
    loop {
        let status = send(&client, Method::GET, &url, &[("authorization", &wrong)]).await.status;
        if status == 401 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "the budget never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 40 addresses send wrong passwords as fast as they can (each within its own budget, so only
/// the bcrypt lane stands in the way), on a runtime with only 4 blocking threads. Meanwhile an
/// authenticated pull completes and the blocking pool still runs other work: bcrypt holds at
/// most its 2 threads, and checks beyond its short queue are answered 429 at once.
#[test]
fn a_wrong_password_flood_does_not_stall_pulls_or_the_blocking_pool() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            auth: Some(AuthFile { htpasswd: htpasswd(&dir, 8) }),
            auth_check_threads: 2,
            max_requests_per_client: 0,
            ..ServerConfig::default()
        };
        let data = Bytes::from(vec![9u8; 4 << 20]);
        let mut backend = MemBackend::standard();
        let digest = facade_oci::Digest::sha256_of(&data);
        backend.add_special("ws1", &digest, Blob::Chunked { data: data.clone(), chunk: 64 << 10 });
        let server = TestServer::start(config, backend).await;
        let url = server.url(&format!("/v2/remote/ws1/blobs/{digest}"));
        let right = basic("alice", "right");
        // alice has pulled before the flood: her credentials are remembered.
        let alice = http1_client();
        assert_eq!(send(&alice, Method::GET, &server.url("/v2/"), &[("authorization", &right)]).await.status, 200);

        let flood_until = Instant::now() + Duration::from_secs(3);
        let statuses = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)]);
        let mut flooders = Vec::new();
        for i in 0..40u8 {
            let (url, statuses) = (server.url("/v2/"), Arc::clone(&statuses));
            let client = client_from(IpAddr::from([127, 0, 1, 10 + i]));
            flooders.push(tokio::spawn(async move {
                let wrong = basic("alice", &format!("guess{i}"));
                // Bounded: by time, and by a request count no flooder reaches in 3 s.
                for _ in 0..10_000 {
                    if Instant::now() >= flood_until {
                        break;
                    }
                    let slot = match try_send(&client, Method::GET, &url, &[("authorization", &wrong)]).await {
                        Ok(r) if r.status == 401 => 0,
                        Ok(r) if r.status == 429 => 1,
                        _ => 2,
                    };
                    statuses[slot].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Let the flood build up, then pull and use the blocking pool in the middle of it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let r = send(&alice, Method::GET, &url, &[("authorization", &right)]).await;
        let pull = started.elapsed();
        assert_eq!(r.status, 200);
        assert_eq!(r.bytes(), &data);
        let started = Instant::now();
        tokio::time::timeout(BOUND, tokio::task::spawn_blocking(|| ())).await.unwrap().unwrap();
        let blocking = started.elapsed();
        assert!(Instant::now() < flood_until, "the flood ended before the pull was done: it proves nothing");
        for f in flooders {
            tokio::time::timeout(BOUND, f).await.unwrap().unwrap();
        }
        let [checked, refused, other] = statuses.each_ref().map(|n| n.load(Ordering::Relaxed));
        eprintln!("flood: {checked} checked (401), {refused} refused (429), {other} other; pull {pull:?}, blocking job {blocking:?}");
        assert_eq!(other, 0, "every flood request is answered 401 or 429");
        assert!(checked > 0 && refused > 0, "the lane checked some and refused the overflow");
        assert_eq!(
            server.counter("registry_facade_limited_requests_total", &[("limit", "auth_failures")]) as usize,
            refused
        );
    });
}
