//! [`App`]: one request in, one response out. Authentication, routing, the request limits
//! (URL length, requests per client), the header deadline, the common headers, HEAD body
//! stripping and request metrics happen here, once for every route.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response};
use tokio_rustls::TlsAcceptor;

use crate::auth::{AuthFailure, AuthFile, AuthLane, Authenticator};
use crate::backend::{Backend, BackendError, ErrorKind};
use crate::body::Body;
use crate::edge::{self, Rejection, RequestContext};
use crate::error::Result;
use crate::handlers;
use crate::headers;
use crate::limits::{ClientLimiter, ClientPermit};
use crate::metrics::{Limit, ServerMetrics};
use crate::reload::PollFiles;
use crate::router::{self, Route};
use crate::tls::{Tls, TlsFiles};

/// `Retry-After` of a client refused for failed credential checks: a token of its budget
/// comes back within a second at any rate of at least 1/s.
const AUTH_THROTTLE_RETRY_AFTER: Duration = Duration::from_secs(1);

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
    /// A connection that does not complete a request head this long after it was accepted
    /// (after the TLS handshake) is closed: one that sends nothing, half a head, or only the
    /// HTTP/2 preface. On HTTP/1 the same limit runs from the first byte of each later request.
    /// `None` waits forever.
    pub request_head_timeout: Option<Duration>,
    /// A connection with no request open this long is closed (HTTP/2 with a GOAWAY; pings do
    /// not count as activity). Also the HTTP/2 keep-alive ping interval. `None` keeps idle
    /// connections forever.
    pub idle_connection_timeout: Option<Duration>,
    /// Connections open at once on the listener; more are answered 503 `UNAVAILABLE` with
    /// `Retry-After: 1` (HTTP/1 over plain TCP) or closed at once (TLS). `0` is unlimited.
    pub max_connections: usize,
    /// Failed credential checks (`requireAuth` with an htpasswd file) per second allowed per
    /// client address, with bursts of twice as many; past it the address gets 429
    /// `TOOMANYREQUESTS` before any bcrypt work. `0` is unlimited.
    pub auth_failures_per_second: u32,
    /// Blocking threads bcrypt may occupy at once (at least 1); checks beyond wait, and past a
    /// short queue are answered 429.
    pub auth_check_threads: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// Serve HTTPS with this certificate (`registry.tls`); `None` serves plain HTTP.
    pub tls: Option<TlsFiles>,
    /// A TLS handshake that takes longer is dropped, so half-open clients cannot hold sockets.
    pub tls_handshake_timeout: Duration,
    /// Require Basic credentials from this htpasswd file (`registry.requireAuth`) on every
    /// route of the registry listener, `/v2/` included; `None` lets everyone pull.
    pub auth: Option<AuthFile>,
    /// How long a successful credential check is remembered (bcrypt is slow on purpose).
    pub auth_cache_ttl: Duration,
    /// How often the TLS and htpasswd files are checked for changes while [`crate::serve`]
    /// runs.
    pub file_poll_interval: Duration,
    /// Largest request head (request line and headers) read from a client: HTTP/1 answers a
    /// bigger one with 431 and closes the connection (hyper's `max_buf_size`, which cannot go
    /// below 8 KiB); HTTP/2 advertises it as `SETTINGS_MAX_HEADER_LIST_SIZE` and answers 431.
    pub max_header_bytes: usize,
    /// Most header fields in one HTTP/1 request; more is answered 431.
    pub max_headers: usize,
    /// Longest request URL (path and query) answered; longer is 414 `NAME_INVALID`. Keep it
    /// below `max_header_bytes`, or the head limit answers first (431, no OCI body).
    pub max_url_bytes: usize,
    /// Requests in flight per client IP address, from the request until its response body
    /// ends; more is answered 429 `TOOMANYREQUESTS` with `Retry-After: 1`. `0` is unlimited.
    /// Only requests that come through [`crate::serve`] (or [`App::handle_from`]) count.
    pub max_requests_per_client: usize,
    /// A response that makes no progress for this long is cut: a connection whose client reads
    /// nothing is closed, and a blob body whose source yields nothing is aborted. Long but
    /// moving blob streams are never cut. `None` waits forever.
    pub response_idle_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            prefix: String::new(),
            response_header_timeout: Some(Duration::from_secs(25)),
            default_retry_after: Duration::from_secs(10),
            request_head_timeout: Some(Duration::from_secs(30)),
            idle_connection_timeout: Some(Duration::from_secs(60)),
            max_connections: 4096,
            auth_failures_per_second: 10,
            auth_check_threads: 2,
            h2_max_concurrent_streams: 256,
            tls: None,
            tls_handshake_timeout: Duration::from_secs(10),
            auth: None,
            auth_cache_ttl: Duration::from_secs(300),
            file_poll_interval: Duration::from_secs(1),
            max_header_bytes: 64 << 10,
            max_headers: 100,
            max_url_bytes: 8 << 10,
            max_requests_per_client: 256,
            response_idle_timeout: Some(Duration::from_secs(300)),
        }
    }
}

/// The request handler: stateless apart from the backend, the metrics and the files it follows
/// (certificate, htpasswd).
pub struct App<B> {
    config: ServerConfig,
    prefix: String,
    backend: Arc<B>,
    metrics: ServerMetrics,
    tls: Option<Tls>,
    auth: Option<Authenticator>,
    clients: Option<ClientLimiter>,
}

impl<B: Backend> App<B> {
    /// An app answering for `backend`, loading the TLS and htpasswd files of `config` now.
    ///
    /// # Errors
    ///
    /// A configured file that cannot be read or used ([`crate::Error::ReadFile`],
    /// `Certificate`, `PrivateKey`, `TlsKeyPair`, `Htpasswd`): the message names the file
    /// (and line), so a binary can refuse to start with it.
    pub fn try_new(config: ServerConfig, backend: Arc<B>, metrics: ServerMetrics) -> Result<Self> {
        Self::build(config, backend, metrics, true)
    }

    /// Like [`App::try_new`], but never fails: a TLS or htpasswd file that cannot be loaded is
    /// logged and the app fails closed until the file is fixed (TLS handshakes are refused;
    /// with auth, every request gets 401). Prefer `try_new` wherever files are configured.
    pub fn new(config: ServerConfig, backend: Arc<B>, metrics: ServerMetrics) -> Self {
        match Self::build(config.clone(), Arc::clone(&backend), metrics.clone(), false) {
            Ok(app) => app,
            // Lenient `build` fails only if rustls lacks TLS 1.2/1.3 (not in this build). The
            // configured-but-absent state fails closed: `serve` refuses to start rather than
            // serve plain HTTP, and `handle` refuses every request.
            Err(e) => {
                tracing::error!(error = %e, "cannot set up TLS or auth; refusing all clients");
                let prefix = router::normalize_prefix(&config.prefix);
                let clients = limiter(&config);
                App { config, prefix, backend, metrics, tls: None, auth: None, clients }
            }
        }
    }

    fn build(config: ServerConfig, backend: Arc<B>, metrics: ServerMetrics, strict: bool) -> Result<Self> {
        let prefix = router::normalize_prefix(&config.prefix);
        let tls = match &config.tls {
            Some(files) => Some(Tls::open(files, metrics.reload_counters("tls"), strict)?),
            None => None,
        };
        let auth = match &config.auth {
            Some(file) => {
                let lane = AuthLane {
                    remember_for: config.auth_cache_ttl,
                    threads: config.auth_check_threads,
                    failures_per_second: config.auth_failures_per_second,
                };
                Some(Authenticator::open(file, lane, metrics.reload_counters("htpasswd"), strict)?)
            }
            None => None,
        };
        let clients = limiter(&config);
        Ok(App { config, prefix, backend, metrics, tls, auth, clients })
    }

    /// The configuration this app was built with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The metrics this app counts into.
    pub(crate) fn metrics(&self) -> &ServerMetrics {
        &self.metrics
    }

    /// Whether [`crate::serve`] speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.config.tls.is_some()
    }

    /// `Err` when TLS is configured but could not be set up at all.
    pub(crate) fn tls_acceptor(&self) -> std::io::Result<Option<TlsAcceptor>> {
        match (&self.config.tls, &self.tls) {
            (None, _) => Ok(None),
            (Some(_), Some(tls)) => Ok(Some(tls.acceptor())),
            (Some(_), None) => Err(std::io::Error::other("TLS is configured but could not be set up")),
        }
    }

    /// The files to poll for changes while serving.
    pub(crate) fn watched_files(&self) -> Vec<Arc<dyn PollFiles>> {
        let tls = self.tls.as_ref().map(Tls::poller);
        let auth = self.auth.as_ref().map(Authenticator::poller);
        tls.into_iter().chain(auth).collect()
    }

    /// Answers one request. Never fails: every problem becomes an OCI error response. The
    /// request body is ignored (nothing is ever pushed). Dropping the returned future cancels
    /// the backend call. The per-client limit does not apply (there is no client address);
    /// [`crate::serve`] calls [`App::handle_from`].
    pub async fn handle<RB>(&self, req: Request<RB>) -> Response<Body> {
        self.answer(req, None).await
    }

    /// [`App::handle`] for a request from `peer`, counted against
    /// [`ServerConfig::max_requests_per_client`] until its response body ends.
    pub async fn handle_from<RB>(&self, req: Request<RB>, peer: IpAddr) -> Response<Body> {
        self.answer(req, Some(peer)).await
    }

    async fn answer<RB>(&self, req: Request<RB>, peer: Option<IpAddr>) -> Response<Body> {
        let started = Instant::now();
        let (parts, _ignored_body) = req.into_parts();
        let route = router::parse(&self.prefix, parts.uri.path());
        let label = route.label();
        let inflight = self.metrics.inflight(label);
        let mut permit = None;
        let result = match self.admit(&parts, peer) {
            Err(rejection) => Err(rejection),
            Ok(p) => {
                permit = p;
                match self.config.response_header_timeout {
                    Some(after) => tokio::time::timeout(after, self.dispatch(route, &parts, peer))
                        .await
                        .unwrap_or(Err(Rejection::HeaderTimeout { after })),
                    None => self.dispatch(route, &parts, peer).await,
                }
            }
        };
        let mut resp = result.unwrap_or_else(|rejection| {
            edge::respond(rejection, &context(route, &parts), self.config.default_retry_after)
        });
        resp.headers_mut().insert(headers::API_VERSION, HeaderValue::from_static(headers::API_VERSION_VALUE));
        self.metrics.observe_response(label, &parts.method, resp.status(), started.elapsed().as_secs_f64());
        // One line per request at debug (failures were logged once, at the error edge).
        tracing::debug!(
            route = ?label,
            method = %parts.method,
            path = %handlers::clip(parts.uri.path()),
            status = resp.status().as_u16(),
            peer = ?peer,
            seconds_to_headers = started.elapsed().as_secs_f64(),
            "request answered"
        );
        let head = parts.method == Method::HEAD;
        let meter = self.metrics.body_meter(label, inflight);
        let idle = self.config.response_idle_timeout;
        resp.map(|body| {
            // HEAD: same status and headers (Content-Length included) as GET, no body.
            let body = if head { body.into_empty() } else { body };
            body.with_meter(meter).with_idle_timeout(idle).with_permit(permit)
        })
    }

    /// The limits checked before any work: URL length, then the client's concurrency slot.
    fn admit(&self, parts: &Parts, peer: Option<IpAddr>) -> std::result::Result<Option<ClientPermit>, Rejection> {
        let len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if len > self.config.max_url_bytes {
            self.metrics.limited(Limit::UrlLength);
            return Err(Rejection::UrlTooLong { len, max: self.config.max_url_bytes });
        }
        let (Some(clients), Some(ip)) = (&self.clients, peer) else {
            return Ok(None);
        };
        match clients.try_acquire(ip) {
            Some(permit) => Ok(Some(permit)),
            None => {
                self.metrics.limited(Limit::ClientConcurrency);
                Err(Rejection::ClientBusy { limit: clients.max() })
            }
        }
    }

    /// With `requireAuth`, every route needs credentials, `/v2/` too: Docker clients learn
    /// that a registry wants credentials only from a 401 on that first probe.
    /// A client address over its failed-check budget (or a full bcrypt queue) gets 429 with
    /// `Retry-After` before any bcrypt work.
    async fn authorize(&self, parts: &Parts, peer: Option<IpAddr>) -> std::result::Result<(), Rejection> {
        let verdict = match (&self.config.auth, &self.auth) {
            (None, _) => return Ok(()),
            (Some(_), Some(auth)) => auth.check(parts.headers.get(AUTHORIZATION), peer).await,
            (Some(_), None) => Err(AuthFailure::Unavailable),
        };
        verdict.map_err(|reason| {
            self.metrics.auth_failed(reason);
            if reason == AuthFailure::Throttled {
                self.metrics.limited(Limit::AuthFailures);
                let e = BackendError::new(ErrorKind::RateLimited, "too many failed credential checks; retry later")
                    .with_retry_after(AUTH_THROTTLE_RETRY_AFTER);
                return Rejection::Backend(e);
            }
            Rejection::Unauthorized { reason }
        })
    }

    async fn dispatch(
        &self,
        route: Route<'_>,
        parts: &Parts,
        peer: Option<IpAddr>,
    ) -> std::result::Result<Response<Body>, Rejection> {
        self.authorize(parts, peer).await?;
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
            Route::Tags { name } if readable => handlers::tags::respond(&*self.backend, name, parts).await,
            Route::Base | Route::Manifest { .. } | Route::Blob { .. } | Route::Tags { .. } | Route::Upload => {
                Err(Rejection::MethodNotAllowed)
            }
        }
    }
}

fn limiter(config: &ServerConfig) -> Option<ClientLimiter> {
    (config.max_requests_per_client > 0).then(|| ClientLimiter::new(config.max_requests_per_client))
}

fn context(route: Route<'_>, parts: &Parts) -> RequestContext {
    let (name, reference) = match route {
        Route::Manifest { name, reference } => (name, reference),
        Route::Blob { name, digest } => (name, digest),
        Route::Tags { name } => (name, ""),
        Route::Base | Route::Upload | Route::NotFound => (parts.uri.path(), ""),
    };
    RequestContext {
        route: route.label(),
        method: parts.method.clone(),
        name: handlers::clip(name),
        reference: handlers::clip(reference),
    }
}
