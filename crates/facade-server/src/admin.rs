//! The admin listener: `/metrics`, `/ready`, `/live`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let state = Arc::new((registry, readiness));
    let handler = move |req: Request<Incoming>, _peer: std::net::SocketAddr| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(admin_response(&req, &state.0, &state.1)) }
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

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
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
}
