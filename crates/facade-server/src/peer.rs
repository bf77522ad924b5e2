//! The peer listener: other nodes' facades stream a blob from this node's fill of it
//! (cluster-wide single-flight, README "Cluster cache").
//!
//! One route, on a listener of its own (`facade.peerAddr`) so it is never reachable as a
//! workspace blob route: `GET /peer/v1/blobs/<digest>?origin=<registry/repo>&size=<n>` with
//! `Range: bytes=<offset>-` and `Authorization: Bearer <cluster secret>`. Answers 206 with the
//! bytes from the offset (the last one only once this node verified the digest), 401 without the
//! secret, 404 when this node has no fill of that (digest, origin) running and no stored copy
//! that origin delivered, 503 when it serves its maximum of peers. What to serve is the
//! [`PeerBlobs`] implementation's decision; this module only checks and frames requests.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use facade_oci::Digest;
use futures::future::BoxFuture;
use http::header::{ACCEPT_RANGES, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::text;
use crate::backend::BlobStream;
use crate::body::Body;
use crate::serve::{ConnLimits, accept_loop};

/// The path prefix of the peer route.
const PREFIX: &str = "/peer/v1/blobs/";

/// A peer request, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRequest {
    /// The blob.
    pub digest: Digest,
    /// `registry/repository` the asking node's image names for it.
    pub origin: String,
    /// Its size in the asking node's manifest.
    pub size: u64,
    /// First byte wanted.
    pub offset: u64,
}

/// What this node has for a peer.
pub enum PeerAnswer {
    /// The bytes from the request's offset to the end of the blob of `size` bytes.
    Found {
        /// The blob's size.
        size: u64,
        /// The bytes.
        stream: BlobStream,
    },
    /// Nothing to serve.
    NotFound,
    /// Serving its maximum of peers.
    Busy,
}

/// Where peer requests are answered from (the binary adapts the blob engine to it).
pub trait PeerBlobs: Send + Sync + 'static {
    /// The answer to `req`.
    fn open(&self, req: PeerRequest) -> BoxFuture<'_, PeerAnswer>;
}

/// Knobs of the peer listener.
#[derive(Clone)]
pub struct PeerServerConfig {
    /// The cluster secret peers must send as `Authorization: Bearer`.
    pub secret: String,
    /// A connection whose peer stops reading is closed after this long.
    pub write_idle: Duration,
}

impl std::fmt::Debug for PeerServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServerConfig").field("write_idle", &self.write_idle).finish()
    }
}

/// Serves peer requests on `listener` until `shutdown`, then drains like [`crate::serve`].
pub async fn serve_peers(
    listener: TcpListener,
    blobs: Arc<dyn PeerBlobs>,
    config: PeerServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
    // The secret is compared as hashes, so the comparison's time says nothing about it.
    let secret = Arc::new(Sha256::digest(format!("Bearer {}", config.secret).as_bytes()));
    let limits = ConnLimits { write_idle: Some(config.write_idle), ..ConnLimits::default() };
    let handler = move |req: Request<Incoming>, _peer: std::net::SocketAddr| {
        let (blobs, secret) = (blobs.clone(), secret.clone());
        async move { Ok::<_, Infallible>(answer(&req, blobs.as_ref(), &secret).await) }
    };
    accept_loop(listener, builder, None, limits, handler, shutdown, "peer").await
}

async fn answer<B>(req: &Request<B>, blobs: &dyn PeerBlobs, secret: &[u8]) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let authorized =
        req.headers().get(AUTHORIZATION).is_some_and(|v| Sha256::digest(v.as_bytes()).as_slice() == secret);
    if !authorized {
        return text(StatusCode::UNAUTHORIZED, "unauthorized\n");
    }
    let parsed = match parse(req) {
        Ok(p) => p,
        Err(why) => return text(StatusCode::BAD_REQUEST, why),
    };
    let offset = parsed.offset;
    let digest = parsed.digest.to_string();
    match blobs.open(parsed).await {
        PeerAnswer::Found { size, stream } => {
            let len = size - offset;
            let mut resp = Response::new(Body::stream(stream, len, offset, digest));
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(CONTENT_LENGTH, HeaderValue::from(len));
            h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {offset}-{}/{size}", size - 1)) {
                h.insert(CONTENT_RANGE, v);
            }
            resp
        }
        PeerAnswer::NotFound => text(StatusCode::NOT_FOUND, "not here\n"),
        PeerAnswer::Busy => text(StatusCode::SERVICE_UNAVAILABLE, "serving enough peers\n"),
    }
}

/// The request's digest, origin, size and offset.
fn parse<B>(req: &Request<B>) -> Result<PeerRequest, &'static str> {
    let digest = req.uri().path().strip_prefix(PREFIX).ok_or("unknown route\n")?;
    let digest = Digest::parse(digest).map_err(|_| "bad digest\n")?;
    let (mut origin, mut size) = (None, None);
    for pair in req.uri().query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("origin", v)) => origin = percent_decode(v),
            Some(("size", v)) => size = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    let origin = origin.filter(|o| o.contains('/')).ok_or("origin missing\n")?;
    let size = size.ok_or("size missing\n")?;
    let offset = match req.headers().get(RANGE) {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.strip_suffix('-'))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("range must be bytes=<offset>-\n")?,
    };
    if offset >= size {
        return Err("offset past the end\n");
    }
    Ok(PeerRequest { digest, origin, size, offset })
}

/// `%XX` decoding of a query value (`None` for bad escapes or non-UTF-8).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Serves 10 bytes of DIGEST from reg.example/app only; "busy" for any other origin.
    struct Ten;

    impl PeerBlobs for Ten {
        fn open(&self, req: PeerRequest) -> BoxFuture<'_, PeerAnswer> {
            Box::pin(async move {
                match req.origin.as_str() {
                    "reg.example:5000/team/app" if req.size == 10 => {
                        let bytes = Bytes::from_static(b"0123456789").slice(req.offset as usize..);
                        PeerAnswer::Found { size: 10, stream: Box::pin(futures::stream::once(async { Ok(bytes) })) }
                    }
                    "busy.example/app" => PeerAnswer::Busy,
                    _ => PeerAnswer::NotFound,
                }
            })
        }
    }

    fn get(path: &str, auth: Option<&str>, range: Option<&str>) -> Request<()> {
        let mut b = Request::get(path);
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a);
        }
        if let Some(r) = range {
            b = b.header(RANGE, r);
        }
        b.body(()).unwrap()
    }

    async fn call(req: Request<()>) -> (StatusCode, Option<String>, Vec<u8>) {
        let secret = Sha256::digest(b"Bearer s3cret");
        let resp = answer(&req, &Ten, &secret).await;
        let status = resp.status();
        let range = resp.headers().get(CONTENT_RANGE).map(|v| v.to_str().unwrap().to_string());
        let body = resp.into_body().collect().await.map(|c| c.to_bytes().to_vec()).unwrap_or_default();
        (status, range, body)
    }

    #[tokio::test]
    async fn serves_the_rest_from_the_offset_to_a_peer_with_the_secret() {
        let path = format!("{PREFIX}{DIGEST}?origin=reg.example%3A5000/team/app&size=10");
        let (status, range, body) = call(get(&path, Some("Bearer s3cret"), Some("bytes=4-"))).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(range.as_deref(), Some("bytes 4-9/10"));
        assert_eq!(body, b"456789");
        let (status, range, body) = call(get(&path, Some("Bearer s3cret"), None)).await;
        assert_eq!(
            (status, range.as_deref(), &body[..]),
            (StatusCode::PARTIAL_CONTENT, Some("bytes 0-9/10"), &b"0123456789"[..])
        );
    }

    #[tokio::test]
    async fn refuses_without_the_secret_and_answers_not_found_busy_and_bad_requests() {
        let path = format!("{PREFIX}{DIGEST}?origin=reg.example:5000/team/app&size=10");
        assert_eq!(call(get(&path, None, None)).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(get(&path, Some("Bearer wrong"), None)).await.0, StatusCode::UNAUTHORIZED);
        let other = format!("{PREFIX}{DIGEST}?origin=evil.example/app&size=10");
        assert_eq!(call(get(&other, Some("Bearer s3cret"), None)).await.0, StatusCode::NOT_FOUND);
        let busy = format!("{PREFIX}{DIGEST}?origin=busy.example/app&size=10");
        assert_eq!(call(get(&busy, Some("Bearer s3cret"), None)).await.0, StatusCode::SERVICE_UNAVAILABLE);
        for bad in [
            format!("/v2/x/blobs/{DIGEST}?origin=reg.example:5000/team/app&size=10"),
            format!("{PREFIX}sha256:nope?origin=reg.example:5000/team/app&size=10"),
            format!("{PREFIX}{DIGEST}?size=10"),
            format!("{PREFIX}{DIGEST}?origin=reg.example:5000/team/app"),
        ] {
            assert_eq!(call(get(&bad, Some("Bearer s3cret"), None)).await.0, StatusCode::BAD_REQUEST, "{bad}");
        }
        for range in ["bytes=10-", "bytes=0-4", "items=1-"] {
            assert_eq!(
                call(get(&path, Some("Bearer s3cret"), Some(range))).await.0,
                StatusCode::BAD_REQUEST,
                "{range}"
            );
        }
        let post = Request::post(&path).header(AUTHORIZATION, "Bearer s3cret").body(()).unwrap();
        assert_eq!(call(post).await.0, StatusCode::METHOD_NOT_ALLOWED);
    }
}
