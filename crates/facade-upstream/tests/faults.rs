//! The client against a scripted HTTP server on loopback that misbehaves on purpose: token
//! refresh, Basic challenges, redirects across origins, 429/503, stalls, short bodies, resets,
//! ignored ranges, missing or lying digest headers, garbage documents, timeouts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use facade_oci::media_types as mt;
use facade_oci::{Digest, Reference, RepoName};
use facade_upstream::{Client, Config, DockerAuth, Error, ErrorKind, ProxyConfig, UpstreamMetrics};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the fake does after writing `bytes`.
enum After {
    KeepAlive,
    Close,
    Reset,
    Hang,
}

struct Reply {
    bytes: Vec<u8>,
    after: After,
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = format!("HTTP/1.1 {status}\r\n");
    let has_len = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        s.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    s.push_str("\r\n");
    let mut bytes = s.into_bytes();
    bytes.extend_from_slice(body);
    Reply { bytes, after: After::KeepAlive }
}

type Handler = Arc<dyn Fn(&Req) -> Reply + Send + Sync>;

struct Fake {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Fake {
    async fn start(handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let log2 = log.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, handler.clone(), log2.clone()));
            }
        });
        Fake { addr, log }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, pred: impl Fn(&Req) -> bool) -> usize {
        self.requests().iter().filter(|r| pred(r)).count()
    }
}

async fn serve(conn: TcpStream, handler: Handler, log: Arc<Mutex<Vec<Req>>>) {
    let mut conn = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if conn.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let req = Req { method, path, headers };
        log.lock().unwrap().push(req.clone());
        let reply = handler(&req);
        let mut bytes = reply.bytes;
        if req.method == "HEAD" {
            // A HEAD answer has headers only.
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                bytes.truncate(end + 4);
            }
        }
        if conn.get_mut().write_all(&bytes).await.is_err() {
            return;
        }
        let _ = conn.get_mut().flush().await;
        match reply.after {
            After::KeepAlive => {}
            After::Close => return,
            After::Reset => {
                let _ = conn.get_mut().set_zero_linger();
                return;
            }
            After::Hang => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
        }
    }
}

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

fn manifest_reply() -> Reply {
    let d = Digest::sha256_of(MANIFEST);
    response("200 OK", &[("Content-Type", mt::OCI_MANIFEST), ("Docker-Content-Digest", d.as_str())], MANIFEST)
}

fn repo() -> RepoName {
    RepoName::parse("r").unwrap()
}

fn tag() -> Reference {
    Reference::Tag("t".into())
}

/// One answer per call: the tests here look at how each answer is classified. Retries have
/// their own tests (`retried_*` below, and tests/retries.rs against a real registry).
fn fast_config() -> Config {
    Config {
        connect_timeout: Duration::from_secs(2),
        metadata_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_millis(300),
        retry_budget: Duration::ZERO,
        proxy: ProxyConfig::none(),
        ..Config::default()
    }
}

fn retrying_config(budget: Duration) -> Config {
    Config { retry_budget: budget, metadata_timeout: Duration::from_secs(20), ..fast_config() }
}

fn client() -> Client {
    Client::new(fast_config(), DockerAuth::empty()).unwrap()
}

fn creds(host: &str, user: &str, pass: &str) -> DockerAuth {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    DockerAuth::parse(&format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#)).unwrap()
}

/// A registry with Bearer auth whose token endpoint lives on the same fake.
struct BearerScript {
    issued: AtomicUsize,
    valid: Mutex<HashSet<String>>,
}

#[tokio::test]
async fn caches_tokens_and_refreshes_once_on_401() {
    let script = Arc::new(BearerScript { issued: AtomicUsize::new(0), valid: Mutex::new(HashSet::new()) });
    let s = script.clone();
    let addr_cell: Arc<Mutex<String>> = Arc::default();
    let a = addr_cell.clone();
    let fake = Fake::start(move |req| {
        if req.path.starts_with("/token") {
            let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
            let tok = format!("tok-{n}");
            s.valid.lock().unwrap().insert(tok.clone());
            // No expires_in: the client assumes 60 s.
            return response(
                "200 OK",
                &[("Content-Type", "application/json")],
                format!(r#"{{"access_token":"{tok}"}}"#).as_bytes(),
            );
        }
        let ok = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| s.valid.lock().unwrap().contains(t));
        if ok {
            return manifest_reply();
        }
        let challenge =
            format!(r#"Bearer realm="http://{}/token",service="fake",scope="repository:r:pull""#, a.lock().unwrap());
        response("401 Unauthorized", &[("WWW-Authenticate", &challenge)], br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#)
    })
    .await;
    *addr_cell.lock().unwrap() = fake.host();
    let c = client();
    let host = fake.host();
    let unauthorized = |f: &Fake| f.count(|r| r.path.starts_with("/v2/") && r.header("authorization").is_none());

    c.manifest(&host, &repo(), &tag()).await.unwrap();
    assert_eq!(script.issued.load(Ordering::SeqCst), 1);
    let token_req = fake.requests().into_iter().find(|r| r.path.starts_with("/token")).unwrap();
    assert_eq!(token_req.path, "/token?service=fake&scope=repository%3Ar%3Apull");
    assert!(token_req.header("authorization").is_none(), "anonymous token request without credentials");

    // Warm: the token is sent up front, no 401 round trip, no new token.
    c.resolve(&host, &repo(), &tag()).await.unwrap();
    c.manifest(&host, &repo(), &tag()).await.unwrap();
    assert_eq!(script.issued.load(Ordering::SeqCst), 1);
    assert_eq!(unauthorized(&fake), 1);

    // The cached token is revoked: one 401, one fresh token, success.
    script.valid.lock().unwrap().clear();
    c.manifest(&host, &repo(), &tag()).await.unwrap();
    assert_eq!(script.issued.load(Ordering::SeqCst), 2);

    // The refused token was sent, not an anonymous request.
    assert_eq!(unauthorized(&fake), 1);
}

#[tokio::test]
async fn second_401_after_refresh_is_final() {
    let issued = Arc::new(AtomicUsize::new(0));
    let accept = Arc::new(Mutex::new(true));
    let (i, acc) = (issued.clone(), accept.clone());
    let addr_cell: Arc<Mutex<String>> = Arc::default();
    let a = addr_cell.clone();
    let fake = Fake::start(move |req| {
        if req.path.starts_with("/token") {
            let n = i.fetch_add(1, Ordering::SeqCst) + 1;
            return response("200 OK", &[], format!(r#"{{"token":"tok-{n}","expires_in":300}}"#).as_bytes());
        }
        if req.header("authorization").is_some() && *acc.lock().unwrap() {
            return manifest_reply();
        }
        let challenge = format!(r#"Bearer realm="http://{}/token",service="fake""#, a.lock().unwrap());
        response("401 Unauthorized", &[("WWW-Authenticate", &challenge)], b"")
    })
    .await;
    *addr_cell.lock().unwrap() = fake.host();
    let c = client();
    c.manifest(&fake.host(), &repo(), &tag()).await.unwrap();
    assert_eq!(issued.load(Ordering::SeqCst), 1);
    // Without a scope in the challenge the client asks for pull on the repository.
    assert!(fake.requests().iter().any(|r| r.path == "/token?service=fake&scope=repository%3Ar%3Apull"));

    *accept.lock().unwrap() = false;
    let sent_before = fake.count(|r| r.path.starts_with("/v2/"));
    let e = c.manifest(&fake.host(), &repo(), &tag()).await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    // Cached token refused → one fresh token → refused again → stop.
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    assert_eq!(fake.count(|r| r.path.starts_with("/v2/")) - sent_before, 2);
    let tokens_sent: Vec<_> =
        fake.requests().iter().filter_map(|r| r.header("authorization").map(str::to_string)).collect();
    assert!(!format!("{e} {e:?}").contains("tok-"), "tokens never appear in errors: {tokens_sent:?}");
}

#[tokio::test]
async fn basic_challenge_uses_docker_auth_and_is_presented_up_front() {
    let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("u:p"));
    let fake = Fake::start(move |req| {
        if req.header("authorization") == Some(want.as_str()) {
            manifest_reply()
        } else {
            response("401 Unauthorized", &[("WWW-Authenticate", r#"Basic realm="fake registry""#)], b"")
        }
    })
    .await;
    let host = fake.host();
    let e = client().manifest(&host, &repo(), &tag()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert_eq!(fake.requests().len(), 1, "no credentials: nothing to retry with");

    let c = Client::new(fast_config(), creds(&host, "u", "p")).unwrap();
    c.manifest(&host, &repo(), &tag()).await.unwrap();
    c.manifest(&host, &repo(), &tag()).await.unwrap();
    // 1 anonymous + (401, retry) + 1 pre-sent.
    assert_eq!(fake.requests().len(), 4);

    let wrong = Client::new(fast_config(), creds(&host, "u", "nope")).unwrap();
    let e = wrong.manifest(&host, &repo(), &tag()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(!format!("{e:?}").contains("nope"));
}

#[tokio::test]
async fn redirects_drop_authorization_across_origins() {
    let blob = b"blob bytes from the cdn".to_vec();
    let digest = Digest::sha256_of(&blob);
    let b2 = blob.clone();
    let cdn = Fake::start(move |_| response("200 OK", &[], &b2)).await;
    let cdn_url = format!("http://{}/signed/blob?sig=secret-signature", cdn.host());
    let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("u:p"));
    let b3 = blob.clone();
    let registry = Fake::start(move |req| {
        if req.header("authorization") != Some(want.as_str()) {
            return response("401 Unauthorized", &[("WWW-Authenticate", r#"Basic realm="r""#)], b"");
        }
        match req.path.as_str() {
            p if p.starts_with("/v2/r/blobs/") => {
                response("307 Temporary Redirect", &[("Location", "/local/hop")], b"")
            }
            "/local/hop" => response("302 Found", &[("Location", &cdn_url)], b""),
            "/loop" => response("308 Permanent Redirect", &[("Location", "/loop")], b""),
            _ => response("200 OK", &[], &b3),
        }
    })
    .await;
    let host = registry.host();
    let c = Client::new(fast_config(), creds(&host, "u", "p")).unwrap();
    let got = c.blob_bytes(&host, &repo(), &digest).await.unwrap();
    assert_eq!(&got[..], &blob[..]);
    let hop = registry.requests().into_iter().find(|r| r.path == "/local/hop").unwrap();
    assert!(hop.header("authorization").is_some(), "same origin keeps credentials");
    let at_cdn = cdn.requests();
    assert_eq!(at_cdn.len(), 1);
    assert_eq!(at_cdn[0].path, "/signed/blob?sig=secret-signature");
    assert!(at_cdn[0].header("authorization").is_none(), "credentials must not leave the registry's origin");
    assert_eq!(at_cdn[0].header("accept-encoding"), Some("identity"));

    let s = c.blob_stream(&host, &repo(), &digest, 0).await.unwrap();
    assert_eq!(s.total_size, Some(blob.len() as u64));
}

#[tokio::test]
async fn redirect_loops_end() {
    let fake = Fake::start(|req| {
        let next = format!("/v2/r/blobs/hop{}", req.path.len());
        response("307 Temporary Redirect", &[("Location", &next)], b"")
    })
    .await;
    let e = client().blob_stream(&fake.host(), &repo(), &Digest::sha256_of(b"x"), 0).await.unwrap_err();
    assert!(matches!(e, Error::TooManyRedirects { .. }), "{e:?}");
    assert_eq!(fake.requests().len(), 6, "the request and five hops");
}

#[tokio::test]
async fn classifies_statuses_and_retry_after() {
    let fake = Fake::start(|req| match req.path.as_str() {
        p if p.contains("/manifests/busy") => response("429 Too Many Requests", &[("Retry-After", "7")], b""),
        p if p.contains("/manifests/down") => response("503 Service Unavailable", &[("Retry-After", "3")], b""),
        p if p.contains("/manifests/gw") => response("502 Bad Gateway", &[], b""),
        p if p.contains("/manifests/boom") => response("500 Internal Server Error", &[], b""),
        p if p.contains("/manifests/denied") => response("403 Forbidden", &[], b""),
        p if p.contains("/manifests/bad") => response("400 Bad Request", &[], b""),
        _ => response("404 Not Found", &[], br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
    })
    .await;
    let c = client();
    let get = |t: &'static str| {
        let c = c.clone();
        let host = fake.host();
        async move { c.manifest(&host, &repo(), &Reference::Tag(t.into())).await.unwrap_err() }
    };
    let e = get("busy").await;
    assert_eq!(
        (e.kind(), e.is_retryable(), e.retry_after()),
        (ErrorKind::RateLimited, true, Some(Duration::from_secs(7)))
    );
    assert_eq!(e.detail().status, Some(429));
    let e = get("down").await;
    assert_eq!(
        (e.kind(), e.is_retryable(), e.retry_after()),
        (ErrorKind::Unavailable, true, Some(Duration::from_secs(3)))
    );
    let e = get("gw").await;
    assert_eq!((e.kind(), e.is_retryable()), (ErrorKind::Unavailable, true));
    let e = get("boom").await;
    assert_eq!((e.kind(), e.is_retryable()), (ErrorKind::Unavailable, false));
    let e = get("denied").await;
    assert_eq!((e.kind(), e.is_retryable()), (ErrorKind::Denied, false));
    let e = get("bad").await;
    assert_eq!((e.kind(), e.is_retryable()), (ErrorKind::Protocol, false));
    let e = get("other").await;
    assert_eq!((e.kind(), e.is_retryable()), (ErrorKind::NotFound, false));
    let e = c.resolve(&fake.host(), &repo(), &Reference::Tag("busy".into())).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited);
}

fn blob_head(total: usize, extra: &str) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n{extra}\r\n")
}

#[tokio::test]
async fn blob_bodies_fail_on_stall_short_body_and_reset() {
    let fake = Fake::start(|req| {
        let mut bytes = blob_head(100, "").into_bytes();
        bytes.extend_from_slice(&[7u8; 10]);
        let after = match req.path.rsplit('/').next().unwrap_or("") {
            p if p.ends_with("a") => After::Hang,
            p if p.ends_with("b") => After::Close,
            _ => After::Reset,
        };
        Reply { bytes, after }
    })
    .await;
    let c = client();
    let host = fake.host();
    let digest_ending = |c: char| Digest::parse(&format!("sha256:{}{c}", "0".repeat(63))).unwrap();

    let run = |d: Digest| {
        let (c, host) = (c.clone(), host.clone());
        async move {
            let s = c.blob_stream(&host, &repo(), &d, 0).await.unwrap();
            assert_eq!(s.total_size, Some(100));
            let mut body = s.body;
            let mut got = 0;
            let err = loop {
                match body.next().await {
                    Some(Ok(b)) => got += b.len(),
                    Some(Err(e)) => break e,
                    None => panic!("body ended without an error"),
                }
            };
            assert!(body.next().await.is_none(), "the stream ends after its error");
            (got, err)
        }
    };

    let t0 = Instant::now();
    let (got, e) = run(digest_ending('a')).await;
    assert_eq!(got, 10);
    assert!(matches!(e, Error::Stalled { offset: 10, .. }), "{e:?}");
    assert!(e.is_retryable());
    assert!(t0.elapsed() < Duration::from_secs(5));

    let (got, e) = run(digest_ending('b')).await;
    assert_eq!(got, 10);
    assert!(matches!(e, Error::ShortBody { received: 10, expected: 100, .. }), "{e:?}");
    assert!(e.is_retryable());

    // A reset may land before the client has read the headers (the open fails) or after
    // (the body fails); both are a retryable transport error.
    let e = match c.blob_stream(&host, &repo(), &digest_ending('c'), 0).await {
        Err(e) => e,
        Ok(s) => Box::pin(s.body.filter_map(|r| async move { r.err() })).next().await.expect("an error after a reset"),
    };
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert!(e.is_retryable());
    assert_eq!(e.kind(), ErrorKind::Unavailable);
}

#[tokio::test]
async fn ranges_need_a_matching_206() {
    let data: Vec<u8> = (0..100u8).collect();
    let d2 = data.clone();
    let fake = Fake::start(move |req| {
        let mode = req.path.rsplit('/').next().unwrap_or("").chars().last().unwrap_or('0');
        match mode {
            '1' => response("200 OK", &[], &d2),
            '2' => response("206 Partial Content", &[("Content-Range", "bytes 6-99/100")], &d2[6..]),
            '3' => response("206 Partial Content", &[], &d2[5..]),
            '4' => response("200 OK", &[("Content-Encoding", "gzip")], &d2),
            _ => response("206 Partial Content", &[("Content-Range", "bytes 5-99/100")], &d2[5..]),
        }
    })
    .await;
    let c = client();
    let host = fake.host();
    let d = |c: char| Digest::parse(&format!("sha256:{}{c}", "0".repeat(63))).unwrap();

    let s = c.blob_stream(&host, &repo(), &d('0'), 5).await.unwrap();
    assert_eq!((s.offset, s.total_size), (5, Some(100)));
    let body: Vec<u8> = s.body.map(|b| b.unwrap().to_vec()).concat().await;
    assert_eq!(body, data[5..]);
    let last = fake.requests().pop().unwrap();
    assert_eq!(last.header("range"), Some("bytes=5-"));
    assert_eq!(last.header("accept-encoding"), Some("identity"));

    let e = c.blob_stream(&host, &repo(), &d('1'), 5).await.unwrap_err();
    assert!(matches!(e, Error::RangeIgnored { offset: 5, .. }), "{e:?}");
    let e = c.blob_stream(&host, &repo(), &d('2'), 5).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e:?}");
    let e = c.blob_stream(&host, &repo(), &d('3'), 5).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e:?}");
    let e = c.blob_stream(&host, &repo(), &d('4'), 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e:?}");
    // Offset 0 sends no Range and takes the 200.
    let s = c.blob_stream(&host, &repo(), &d('1'), 0).await.unwrap();
    assert_eq!(s.total_size, Some(100));
    assert!(fake.requests().pop().unwrap().header("range").is_none());
}

#[tokio::test]
async fn resolve_uses_head_and_falls_back_to_get_without_digest() {
    let fake = Fake::start(|req| match req.path.as_str() {
        "/v2/r/manifests/nodigest" => response("200 OK", &[("Content-Type", mt::OCI_MANIFEST)], MANIFEST),
        _ => manifest_reply(),
    })
    .await;
    let c = client();
    let host = fake.host();
    let want = Digest::sha256_of(MANIFEST);

    let r = c.resolve(&host, &repo(), &tag()).await.unwrap();
    assert_eq!(
        (r.digest.clone(), r.media_type.as_str(), r.size),
        (want.clone(), mt::OCI_MANIFEST, MANIFEST.len() as u64)
    );
    let reqs = fake.requests();
    assert_eq!(reqs.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(), ["HEAD"]);
    let accept = reqs[0].header("accept").unwrap();
    for t in [mt::OCI_MANIFEST, mt::OCI_INDEX, mt::DOCKER_MANIFEST, mt::DOCKER_MANIFEST_LIST] {
        assert!(accept.contains(t), "{accept}");
    }

    let r = c.resolve(&host, &repo(), &Reference::Tag("nodigest".into())).await.unwrap();
    assert_eq!(r.digest, want);
    let methods: Vec<_> = fake.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["HEAD", "HEAD", "GET"]);

    // By digest, a different announced digest is a mismatch.
    let other = Digest::sha256_of(b"other");
    let e = c.resolve(&host, &repo(), &Reference::Digest(other)).await.unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
}

#[tokio::test]
async fn rejects_bad_manifests() {
    let big = vec![b' '; 2048];
    let fake = Fake::start(move |req| {
        let t = req.path.rsplit('/').next().unwrap_or("");
        match t {
            "lying" => response(
                "200 OK",
                &[("Content-Type", mt::OCI_MANIFEST), ("Docker-Content-Digest", Digest::sha256_of(b"x").as_str())],
                MANIFEST,
            ),
            "garbage" => response("200 OK", &[("Content-Type", mt::OCI_MANIFEST)], b"{not json"),
            "schema1" => response(
                "200 OK",
                &[("Content-Type", mt::DOCKER_MANIFEST_V1_SIGNED)],
                br#"{"schemaVersion":1,"name":"r","tag":"t"}"#,
            ),
            "weird" => response(
                "200 OK",
                &[("Content-Type", "application/json")],
                br#"{"schemaVersion":2,"mediaType":"text/plain"}"#,
            ),
            "bigdeclared" => response("200 OK", &[("Content-Type", mt::OCI_MANIFEST)], &big),
            "bigchunked" => {
                let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n".to_vec();
                bytes.extend_from_slice(&big);
                bytes.extend_from_slice(b"\r\n0\r\n\r\n");
                Reply { bytes, after: After::KeepAlive }
            }
            "badheader" => response(
                "200 OK",
                &[("Content-Type", mt::OCI_MANIFEST), ("Docker-Content-Digest", "sha256:nope")],
                MANIFEST,
            ),
            "nocontenttype" => response("200 OK", &[], MANIFEST),
            _ => manifest_reply(),
        }
    })
    .await;
    let c = Client::new(Config { max_metadata_bytes: 1024, ..fast_config() }, DockerAuth::empty()).unwrap();
    let host = fake.host();
    let get = |t: &str| {
        let (c, host, t) = (c.clone(), host.clone(), t.to_string());
        async move { c.manifest(&host, &repo(), &Reference::Tag(t)).await }
    };
    let e = get("lying").await.unwrap_err();
    assert!(matches!(&e, Error::DigestMismatch { actual, .. } if *actual == Digest::sha256_of(MANIFEST)), "{e:?}");
    for t in ["garbage", "schema1", "weird", "badheader"] {
        let e = get(t).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{t}: {e:?}");
        assert!(!e.is_retryable());
    }
    for t in ["bigdeclared", "bigchunked"] {
        let e = get(t).await.unwrap_err();
        assert!(matches!(e, Error::TooLarge { limit: 1024, .. }), "{t}: {e:?}");
    }
    let m = get("nocontenttype").await.unwrap();
    assert_eq!(m.media_type, mt::OCI_MANIFEST);
    // By digest, the bytes must hash to it.
    let other = Digest::sha256_of(b"other");
    let e = c.manifest(&host, &repo(), &Reference::Digest(other.clone())).await.unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { ref expected, .. } if *expected == other), "{e:?}");
}

#[tokio::test]
async fn times_out_and_fails_to_connect() {
    let fake = Fake::start(|_| Reply { bytes: Vec::new(), after: After::Hang }).await;
    let c = Client::new(Config { metadata_timeout: Duration::from_millis(300), ..fast_config() }, DockerAuth::empty())
        .unwrap();
    let t0 = Instant::now();
    let e = c.manifest(&fake.host(), &repo(), &tag()).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.is_retryable());
    let e = c.blob_stream(&fake.host(), &repo(), &Digest::sha256_of(b"x"), 0).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let e = c.manifest(&closed.to_string(), &repo(), &tag()).await.unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.is_retryable());
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(e.detail().upstream.as_deref(), Some(closed.to_string().as_str()));
}

#[tokio::test]
async fn bad_token_answers_are_protocol_errors() {
    let addr_cell: Arc<Mutex<String>> = Arc::default();
    let a = addr_cell.clone();
    let fake = Fake::start(move |req| {
        if req.path.starts_with("/token") {
            return response("200 OK", &[], b"<html>not json</html>");
        }
        let challenge = format!(r#"Bearer realm="http://{}/token",service="fake""#, a.lock().unwrap());
        response("401 Unauthorized", &[("WWW-Authenticate", &challenge)], b"")
    })
    .await;
    *addr_cell.lock().unwrap() = fake.host();
    let e = client().manifest(&fake.host(), &repo(), &tag()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e:?}");

    let garbage = Fake::start(|_| response("401 Unauthorized", &[("WWW-Authenticate", "\"\"=,,Bearer")], b"")).await;
    let e = client().manifest(&garbage.host(), &repo(), &tag()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e:?}");
}

#[tokio::test]
async fn loopback_names_are_spoken_to_over_http() {
    let fake = Fake::start(|_| manifest_reply()).await;
    let c = client();
    let port = fake.addr.port();
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        c.manifest(&host, &repo(), &tag()).await.unwrap();
    }
    assert_eq!(fake.requests().len(), 2);
}

#[test]
fn accepts_an_extra_ca_bundle() {
    let ts = test_support::token_server::TokenServer::start("u", "p").unwrap();
    let cfg = Config { extra_ca_pem: Some(ts.cert_pem().to_string()), ..Config::default() };
    assert!(Client::new(cfg, DockerAuth::empty()).is_ok());
    let cfg = Config { extra_ca_pem: Some("garbage".into()), ..Config::default() };
    assert!(matches!(Client::new(cfg, DockerAuth::empty()), Err(Error::Config { .. })));
}

/// A registry that answers 503 with `Retry-After: 1` to the first manifest request: the call
/// waits that second and succeeds, within one client call.
#[tokio::test]
async fn retried_503_honours_retry_after() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let fake = Fake::start(move |_| {
        if s.fetch_add(1, Ordering::SeqCst) == 0 {
            response("503 Service Unavailable", &[("Retry-After", "1")], b"")
        } else {
            manifest_reply()
        }
    })
    .await;
    let metrics = UpstreamMetrics::register(&prometheus::Registry::new()).unwrap();
    let c = Client::with_metrics(retrying_config(Duration::from_secs(7)), DockerAuth::empty(), Some(metrics.clone()))
        .unwrap();
    let t0 = Instant::now();
    c.manifest(&fake.host(), &repo(), &tag()).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(1), "Retry-After is a floor: {:?}", t0.elapsed());
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(metrics.retries("manifest", "status"), 1);
}

/// A `Retry-After` longer than the budget is passed on at once (the client answers 429 with
/// it), not slept on.
#[tokio::test]
async fn retry_after_beyond_the_budget_is_not_waited_for() {
    let fake = Fake::start(|_| response("429 Too Many Requests", &[("Retry-After", "30")], b"")).await;
    let c = Client::new(retrying_config(Duration::from_secs(7)), DockerAuth::empty()).unwrap();
    let t0 = Instant::now();
    let e = c.resolve(&fake.host(), &repo(), &tag()).await.unwrap_err();
    assert_eq!((e.kind(), e.retry_after()), (ErrorKind::RateLimited, Some(Duration::from_secs(30))));
    assert_eq!(fake.requests().len(), 1);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// The token server resets the first token request: the manifest call still succeeds, with
/// one retried attempt, and the refused answers are never retried.
#[tokio::test]
async fn retried_token_request_after_a_reset() {
    let tokens = Arc::new(AtomicUsize::new(0));
    let t = tokens.clone();
    let addr_cell: Arc<Mutex<String>> = Arc::default();
    let a = addr_cell.clone();
    let fake = Fake::start(move |req| {
        if req.path.starts_with("/token") {
            if t.fetch_add(1, Ordering::SeqCst) == 0 {
                return Reply { bytes: b"HTTP/1.1 200 OK\r\nContent-Le".to_vec(), after: After::Reset };
            }
            return response("200 OK", &[], br#"{"token":"tok","expires_in":300}"#);
        }
        if req.header("authorization") == Some("Bearer tok") {
            return manifest_reply();
        }
        let challenge = format!(r#"Bearer realm="http://{}/token",service="fake""#, a.lock().unwrap());
        response("401 Unauthorized", &[("WWW-Authenticate", &challenge)], b"")
    })
    .await;
    *addr_cell.lock().unwrap() = fake.host();
    let metrics = UpstreamMetrics::register(&prometheus::Registry::new()).unwrap();
    let c = Client::with_metrics(retrying_config(Duration::from_secs(7)), DockerAuth::empty(), Some(metrics.clone()))
        .unwrap();
    c.manifest(&fake.host(), &repo(), &tag()).await.unwrap();
    assert_eq!(tokens.load(Ordering::SeqCst), 2);
    assert_eq!(metrics.retries("manifest", "reset"), 1);

    // A 404 after the token is final: one request.
    let fake404 = Fake::start(|_| response("404 Not Found", &[], br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#)).await;
    let e = c.manifest(&fake404.host(), &repo(), &tag()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(fake404.requests().len(), 1);
}
