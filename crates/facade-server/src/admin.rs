//! The admin listener: `/metrics`, `/ready`, `/live`, and the workspace warm-up and progress
//! API (`POST /v1/workspaces/<provider>/<id>/prepare`, `GET …/progress`). The listener has
//! no authentication of its own: it must not be reachable from outside the node (README,
//! "Warm-up and progress").

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use bytes::Bytes;
use facade_oci::{ErrorCode, ErrorEnvelope};
use futures::future::BoxFuture;
use http::header::{ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, ErrorKind};
use crate::body::Body;
use crate::serve::{ConnLimits, accept_loop};

/// A shared "ready to serve pulls" flag; starts not ready. Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A flag that is not ready yet.
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Flips the flag (e.g. ready once listeners are bound, not ready again while draining).
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// The current state.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the workspace routes of the admin listener need: start a warm-up, read progress.
pub trait Workspaces: Send + Sync + 'static {
    /// Resolves the workspace's spec, composes its image and starts filling every layer into
    /// the local store. Resolves once the image is composed (the filling goes on); an unknown
    /// workspace is [`ErrorKind::ManifestUnknown`].
    fn prepare<'a>(&'a self, provider: &'a str, id: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;

    /// The workspace's prefetch or warm-up progress, if one runs or ended lately.
    fn progress(&self, provider: &str, id: &str) -> Option<WorkspaceProgress>;
}

/// One progress report, serialized.
#[derive(Clone, Debug)]
pub struct WorkspaceProgress {
    /// The JSON document.
    pub json: Bytes,
    /// Whether the job ended (the report no longer changes).
    pub finished: bool,
}

/// How often a progress event stream sends the report.
const EVENT_INTERVAL: Duration = Duration::from_millis(500);

/// Most events one stream sends (an hour at [`EVENT_INTERVAL`]); a client that wants more
/// reconnects.
const MAX_EVENTS: u64 = 7200;

/// Serves the admin endpoints until `shutdown`, then drains like [`crate::serve`]:
/// `GET /metrics` (Prometheus text exposition of `registry`), `GET /ready` (200 when ready,
/// else 503) and `GET /live` (always 200: it checks this process only, never upstream, so a
/// registry outage never gets the pod restarted).
pub async fn serve_admin(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_admin_with(listener, registry, readiness, None, shutdown).await
}

/// [`serve_admin`], plus the workspace routes answered by `workspaces` (404 without).
pub async fn serve_admin_with(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    workspaces: Option<Arc<dyn Workspaces>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let state = Arc::new((registry, readiness, workspaces));
    let handler = move |req: Request<Incoming>, _peer: std::net::SocketAddr| {
        let state = Arc::clone(&state);
        async move {
            let resp = match (req.uri().path().strip_prefix(WORKSPACES_PREFIX), &state.2) {
                (Some(rest), Some(ws)) => workspace_response(&req, rest, ws.clone()).await,
                _ => admin_response(&req, &state.0, &state.1),
            };
            Ok::<_, Infallible>(resp)
        }
    };
    accept_loop(listener, builder, None, ConnLimits::default(), handler, shutdown, "admin").await
}

fn admin_response<RB>(req: &Request<RB>, registry: &Registry, readiness: &Readiness) -> Response<Body> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/ready" | "/live");
    let head = req.method() == Method::HEAD;
    if known && req.method() != Method::GET && !head {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let resp = match path {
        "/metrics" => metrics(registry),
        "/ready" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/live" => text(StatusCode::OK, "live\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if head { resp.map(Body::into_empty) } else { resp }
}

const WORKSPACES_PREFIX: &str = "/v1/workspaces/";

/// `<provider>/<id>/<action>` after [`WORKSPACES_PREFIX`]: the provider is one path segment,
/// the id the rest, as on the registry's routes.
fn parse_workspace_path(rest: &str) -> Option<(&str, &str, &str)> {
    let (name, action) = rest.rsplit_once('/')?;
    let (provider, id) = name.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    };
    (ok(provider) && !provider.contains('/') && ok(id)).then_some((provider, id, action))
}

async fn workspace_response<RB>(req: &Request<RB>, rest: &str, ws: Arc<dyn Workspaces>) -> Response<Body> {
    let Some((provider, id, action)) = parse_workspace_path(rest) else {
        return oci_error(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, "invalid workspace name");
    };
    let method = req.method();
    match action {
        "prepare" if method == Method::POST => match ws.prepare(provider, id).await {
            Ok(()) => {
                let path = format!("{WORKSPACES_PREFIX}{provider}/{id}/progress");
                let url = match req.headers().get(HOST).and_then(|h| h.to_str().ok()) {
                    Some(host) => format!("http://{host}{path}"),
                    None => path,
                };
                let body = serde_json::json!({ "workspace": format!("{provider}/{id}"), "progress": url });
                json(StatusCode::ACCEPTED, Bytes::from(body.to_string()))
            }
            Err(e) => {
                tracing::info!(provider, id, error = %e, "warm-up refused");
                backend_error(&e)
            }
        },
        "prepare" => not_allowed("POST"),
        "progress" if method == Method::GET || method == Method::HEAD => {
            let Some(p) = ws.progress(provider, id) else {
                return oci_error(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NameUnknown,
                    "no prefetch or warm-up of this workspace runs or ended lately",
                );
            };
            let wants_events = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("text/event-stream"));
            if method == Method::HEAD {
                return json(StatusCode::OK, p.json).map(Body::into_empty);
            }
            if wants_events {
                events(ws, provider.to_string(), id.to_string(), p)
            } else {
                json(StatusCode::OK, p.json)
            }
        }
        "progress" => not_allowed("GET, HEAD"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Server-sent events: the progress report every [`EVENT_INTERVAL`] until the job ended (that
/// report included), its report expired, or [`MAX_EVENTS`].
fn events(ws: Arc<dyn Workspaces>, provider: String, id: String, first: WorkspaceProgress) -> Response<Body> {
    let stream = futures::stream::unfold((Some(0u64), Some(first)), move |(state, first)| {
        let (ws, provider, id) = (ws.clone(), provider.clone(), id.clone());
        async move {
            let n = state?;
            let p = match first {
                Some(p) => p,
                None => {
                    tokio::time::sleep(EVENT_INTERVAL).await;
                    ws.progress(&provider, &id)?
                }
            };
            let mut event = Vec::with_capacity(p.json.len() + 8);
            event.extend_from_slice(b"data: ");
            event.extend_from_slice(&p.json);
            event.extend_from_slice(b"\n\n");
            let next = (!p.finished && n + 1 < MAX_EVENTS).then_some(n + 1);
            Some((Bytes::from(event), (next, None)))
        }
    });
    let mut resp = Response::new(Body::events(Box::pin(stream)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let len = body.len();
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(crate::headers::JSON));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// The OCI error envelope, as the registry port answers (the platform reads the same codes).
fn oci_error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    json(status, Bytes::from(ErrorEnvelope::single(code, message, serde_json::Value::Null).to_bytes()))
}

fn backend_error(e: &BackendError) -> Response<Body> {
    let (status, code) = match e.kind {
        ErrorKind::ManifestUnknown => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
        ErrorKind::NameUnknown => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
        ErrorKind::BlobUnknown => (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown),
        ErrorKind::NameInvalid => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
        ErrorKind::DigestInvalid => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
        ErrorKind::ManifestInvalid => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
        ErrorKind::Unauthorized | ErrorKind::Denied => (StatusCode::FORBIDDEN, ErrorCode::Denied),
        ErrorKind::RateLimited => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
        ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
        ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown),
    };
    let message = if e.kind == ErrorKind::Internal { "internal error" } else { e.message.as_str() };
    let body = ErrorEnvelope::single(code, message, e.detail.clone()).to_bytes();
    json(status, Bytes::from(body))
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn metrics(registry: &Registry) -> Response<Body> {
    let encoder = TextEncoder::new();
    let mut buf = Vec::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
        return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n");
    }
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from(buf.len()));
    if let Ok(v) = HeaderValue::from_str(encoder.format_type()) {
        h.insert(CONTENT_TYPE, v);
    }
    *resp.body_mut() = Body::full(buf);
    resp
}

/// A short plain-text answer (the admin and peer listeners' non-OCI responses).
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn readiness_and_liveness() {
        let registry = Registry::new();
        let readiness = Readiness::new();
        assert_eq!(admin_response(&get("/ready"), &registry, &readiness).status(), 503);
        assert_eq!(admin_response(&get("/live"), &registry, &readiness).status(), 200);
        readiness.clone().set_ready(true);
        assert_eq!(admin_response(&get("/ready"), &registry, &readiness).status(), 200);
        assert_eq!(admin_response(&get("/nope"), &registry, &readiness).status(), 404);
        let post = Request::post("/live").body(()).unwrap();
        assert_eq!(admin_response(&post, &registry, &readiness).status(), 405);
    }

    /// Answers from a fixed table: `known` can be prepared; its progress ends after `events`
    /// reads.
    struct Table {
        reads: std::sync::atomic::AtomicU64,
        events: u64,
    }

    impl Workspaces for Table {
        fn prepare<'a>(&'a self, provider: &'a str, id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
            Box::pin(async move {
                match (provider, id) {
                    ("fixed", "known") => Ok(()),
                    ("fixed", "storeless") => Err(BackendError::unavailable("warm-up needs a local store")),
                    _ => Err(BackendError::manifest_unknown(format!("no workspace {id}"))),
                }
            })
        }

        fn progress(&self, provider: &str, id: &str) -> Option<WorkspaceProgress> {
            if (provider, id) != ("fixed", "known") {
                return None;
            }
            let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
            let finished = n >= self.events;
            Some(WorkspaceProgress { json: Bytes::from(format!("{{\"n\":{n},\"done\":{finished}}}")), finished })
        }
    }

    async fn call(ws: &Arc<Table>, req: Request<()>) -> (StatusCode, http::HeaderMap, Bytes) {
        use http_body_util::BodyExt;
        let path = req.uri().path().to_string();
        let rest = path.strip_prefix(WORKSPACES_PREFIX).unwrap();
        let resp = workspace_response(&req, rest, ws.clone()).await;
        let (parts, body) = resp.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
    }

    fn table(events: u64) -> Arc<Table> {
        Arc::new(Table { reads: Default::default(), events })
    }

    #[test]
    fn workspace_paths_parse_and_odd_names_are_refused() {
        assert_eq!(parse_workspace_path("fixed/ws/prepare"), Some(("fixed", "ws", "prepare")));
        assert_eq!(parse_workspace_path("remote/a/b/progress"), Some(("remote", "a/b", "progress")));
        for bad in ["fixed/prepare", "fixed//prepare", "fixed/../prepare", "fixed/a b/progress", "/ws/prepare", "x"] {
            assert_eq!(parse_workspace_path(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn prepare_answers_202_with_the_progress_url_or_an_oci_error() {
        let ws = table(1);
        let req = Request::post("/v1/workspaces/fixed/known/prepare").header(HOST, "10.0.0.1:9500").body(()).unwrap();
        let (status, _, body) = call(&ws, req).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["workspace"], "fixed/known");
        assert_eq!(v["progress"], "http://10.0.0.1:9500/v1/workspaces/fixed/known/progress");

        let (status, h, body) = call(&ws, Request::post("/v1/workspaces/fixed/nope/prepare").body(()).unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(h[CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "no workspace nope");
        let (status, ..) = call(&ws, Request::post("/v1/workspaces/fixed/storeless/prepare").body(()).unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

        let (status, h, _) = call(&ws, Request::get("/v1/workspaces/fixed/known/prepare").body(()).unwrap()).await;
        assert_eq!((status, &h[ALLOW]), (StatusCode::METHOD_NOT_ALLOWED, &HeaderValue::from_static("POST")));
        let (status, _, body) = call(&ws, Request::post("/v1/workspaces/fixed/../prepare").body(()).unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("NAME_INVALID"));
    }

    #[tokio::test]
    async fn progress_is_json_or_events_until_finished() {
        let ws = table(3);
        let (status, h, body) = call(&ws, Request::get("/v1/workspaces/fixed/known/progress").body(()).unwrap()).await;
        assert_eq!((status, &h[CONTENT_TYPE]), (StatusCode::OK, &HeaderValue::from_static("application/json")));
        assert_eq!(&body[..], br#"{"n":1,"done":false}"#);
        let (status, _, body) = call(&ws, Request::get("/v1/workspaces/fixed/other/progress").body(()).unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&body).contains("NAME_UNKNOWN"));

        let req =
            Request::get("/v1/workspaces/fixed/known/progress").header(ACCEPT, "text/event-stream").body(()).unwrap();
        let (status, h, body) = call(&ws, req).await;
        assert_eq!((status, &h[CONTENT_TYPE]), (StatusCode::OK, &HeaderValue::from_static("text/event-stream")));
        // The stream read the report until it said finished (reads 2 and 3), then ended.
        assert_eq!(
            String::from_utf8_lossy(&body),
            "data: {\"n\":2,\"done\":false}\n\ndata: {\"n\":3,\"done\":true}\n\n"
        );
    }
}
