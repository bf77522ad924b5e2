//! [`App`]: one request in, one response out. Routing, the header deadline, the common
//! headers, HEAD body stripping and request metrics happen here, once for every route.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderValue, Method, Request, Response};

use crate::backend::Backend;
use crate::body::Body;
use crate::error::{self, Rejection, RequestContext};
use crate::handlers;
use crate::headers;
use crate::metrics::ServerMetrics;
use crate::router::{self, Route};

/// Knobs of the HTTP edge. `Default` gives production values.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Optional URL prefix before `/v2` (`registry.prefix`), e.g. `/registry`; `""` for none.
    /// Leading and trailing slashes are normalized.
    pub prefix: String,
    /// Budget from request to response headers; past it the request is answered 503
    /// `UNAVAILABLE` and the backend work is dropped. containerd ≥ 2.3 gives up after 30 s
    /// without headers (containerd/containerd#13164), so the default stays below that.
    /// `None` disables the deadline.
    pub response_header_timeout: Option<Duration>,
    /// `Retry-After` sent with 429 when the backend gives none.
    pub default_retry_after: Duration,
    /// HTTP/1 connections that do not finish sending request headers in time are closed.
    pub http1_header_read_timeout: Option<Duration>,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            prefix: String::new(),
            response_header_timeout: Some(Duration::from_secs(25)),
            default_retry_after: Duration::from_secs(10),
            http1_header_read_timeout: Some(Duration::from_secs(30)),
            h2_max_concurrent_streams: 256,
        }
    }
}

/// The request handler: stateless apart from the backend and the metrics.
pub struct App<B> {
    config: ServerConfig,
    prefix: String,
    backend: Arc<B>,
    metrics: ServerMetrics,
}

impl<B: Backend> App<B> {
    /// An app answering for `backend`.
    pub fn new(config: ServerConfig, backend: Arc<B>, metrics: ServerMetrics) -> Self {
        let prefix = router::normalize_prefix(&config.prefix);
        App { config, prefix, backend, metrics }
    }

    /// The configuration this app was built with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Answers one request. Never fails: every problem becomes an OCI error response. The
    /// request body is ignored (nothing is ever pushed). Dropping the returned future cancels
    /// the backend call.
    pub async fn handle<RB>(&self, req: Request<RB>) -> Response<Body> {
        let started = Instant::now();
        let (parts, _ignored_body) = req.into_parts();
        let route = router::parse(&self.prefix, parts.uri.path());
        let label = route.label();
        let inflight = self.metrics.inflight(label);
        let result = match self.config.response_header_timeout {
            Some(after) => tokio::time::timeout(after, self.dispatch(route, &parts))
                .await
                .unwrap_or(Err(Rejection::HeaderTimeout { after })),
            None => self.dispatch(route, &parts).await,
        };
        let mut resp = result.unwrap_or_else(|rejection| {
            error::respond(rejection, &context(route, &parts), self.config.default_retry_after)
        });
        resp.headers_mut().insert(headers::API_VERSION, HeaderValue::from_static(headers::API_VERSION_VALUE));
        self.metrics.observe_response(label, &parts.method, resp.status(), started.elapsed().as_secs_f64());
        let head = parts.method == Method::HEAD;
        let meter = self.metrics.body_meter(label, inflight);
        resp.map(|body| {
            // HEAD: same status and headers (Content-Length included) as GET, no body.
            let body = if head { body.into_empty() } else { body };
            body.with_meter(meter)
        })
    }

    async fn dispatch(&self, route: Route<'_>, parts: &Parts) -> Result<Response<Body>, Rejection> {
        let readable = parts.method == Method::GET || parts.method == Method::HEAD;
        match route {
            Route::NotFound => Err(Rejection::RouteNotFound),
            Route::Base if readable => Ok(handlers::base::respond()),
            Route::Manifest { .. } if parts.method == Method::PUT => Err(Rejection::ManifestPut),
            Route::Manifest { name, reference } if readable => {
                handlers::manifest::respond(&*self.backend, name, reference, parts).await
            }
            Route::Blob { name, digest } if readable => {
                handlers::blob::respond(&*self.backend, name, digest, parts).await
            }
            Route::Base | Route::Manifest { .. } | Route::Blob { .. } | Route::Upload => {
                Err(Rejection::MethodNotAllowed)
            }
        }
    }
}

fn context(route: Route<'_>, parts: &Parts) -> RequestContext {
    let (name, reference) = match route {
        Route::Manifest { name, reference } => (name, reference),
        Route::Blob { name, digest } => (name, digest),
        Route::Base | Route::Upload | Route::NotFound => (parts.uri.path(), ""),
    };
    RequestContext {
        route: route.label(),
        method: parts.method.clone(),
        name: handlers::clip(name),
        reference: handlers::clip(reference),
    }
}
