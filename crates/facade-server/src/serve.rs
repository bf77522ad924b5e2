//! Accept loop with graceful drain, shared by the registry and the admin listener; TLS
//! termination for the registry listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::app::App;
use crate::backend::Backend;
use crate::body::Body;
use crate::limits::{ConnActivity, ConnTimeouts, Supervisor, WriteIdle};
use crate::metrics::{ConnClose, ConnRefusal, ConnectionMetrics};
use crate::reload;

/// hyper refuses (panics on) a smaller HTTP/1 buffer.
const HYPER_MIN_BUF_SIZE: usize = 8192;

/// Serves `app` on `listener` until `shutdown` is cancelled: HTTP/1.1 (keep-alive) and h2c
/// (prior knowledge), or — with `tls` configured — HTTPS with ALPN `h2`/`http/1.1`. While it
/// runs, the configured certificate and htpasswd files are polled and re-read when they change.
///
/// Request heads are bounded by [`crate::ServerConfig::max_header_bytes`] and
/// `max_headers` (431), requests per client address by `max_requests_per_client` (429), and a
/// connection whose client stops reading (HTTP/2: leaves a stream's window at zero) is closed
/// after `response_idle_timeout`. A connection without a complete request head within
/// `request_head_timeout`, or with no request open for `idle_connection_timeout`, is closed;
/// past `max_connections` open ones, new connections are refused with a 503.
///
/// On `shutdown` it stops accepting, asks every connection to finish its in-flight requests
/// (idle keep-alive connections close at once) and returns when all have closed. It waits as
/// long as that takes: the caller bounds the wait (e.g. with a timeout around this future) and
/// drops it to abort the rest.
///
/// # Errors
///
/// Only when TLS is configured but could not be set up at all (an app from [`App::new`] whose
/// certificate setup failed): it then refuses to serve rather than speak plain HTTP.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    app: Arc<App<B>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tls =
        app.tls_acceptor()?.map(|acceptor| TlsTermination { acceptor, timeout: app.config().tls_handshake_timeout });
    let files = app.watched_files();
    // Dropping `serve` (the caller's drain deadline) stops the polling too.
    let _poller = (!files.is_empty()).then(|| {
        let interval = app.config().file_poll_interval;
        AbortOnDropHandle::new(tokio::spawn(reload::watch(files, interval, shutdown.clone())))
    });
    let config = app.config();
    let max_header_bytes = config.max_header_bytes.max(HYPER_MIN_BUF_SIZE);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        // The connection supervisor times request heads (hyper's own timer would start as soon
        // as a connection goes idle and cut keep-alive connections at the head timeout).
        .header_read_timeout(None)
        // The whole request head must fit in the read buffer: a bigger one gets 431 and the
        // connection is closed. (hyper-util's auto builder does not expose a separate head
        // limit; the buffer also caps how much response data is queued per write, which only
        // batches writes differently.)
        .max_buf_size(max_header_bytes)
        .max_headers(config.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    if let Some(interval) = config.idle_connection_timeout {
        // Pings find a peer that vanished without a FIN while its streams are open; one that
        // does not answer within the interval (at most 20 s) is gone.
        builder.http2().keep_alive_interval(interval).keep_alive_timeout(interval.min(H2_PING_TIMEOUT));
    }
    let conn = ConnLimits {
        write_idle: config.response_idle_timeout,
        timeouts: ConnTimeouts {
            head: config.request_head_timeout,
            idle: config.idle_connection_timeout,
            response: config.response_idle_timeout,
        },
        max_connections: (config.max_connections > 0).then_some(config.max_connections),
        metrics: Some(app.metrics().connections()),
    };
    let handler = move |req: Request<Incoming>, peer: SocketAddr| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(app.handle_from(req, peer.ip()).await) }
    };
    accept_loop(listener, builder, tls, conn, handler, shutdown, "registry").await
}

/// The longest an HTTP/2 keep-alive ping may go unanswered.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-connection limits applied below HTTP.
#[derive(Clone, Debug)]
pub(crate) struct ConnLimits {
    /// Close the connection when a write makes no progress for this long.
    pub(crate) write_idle: Option<Duration>,
    /// Head, idle and response-progress deadlines.
    pub(crate) timeouts: ConnTimeouts,
    /// Connections open at once on the listener; more are refused at accept.
    pub(crate) max_connections: Option<usize>,
    /// Where refusals and closes are counted.
    pub(crate) metrics: Option<ConnectionMetrics>,
}

impl Default for ConnLimits {
    /// The admin listener's: no cap, no write timer, but silent and idle connections still
    /// close (30 s without a request head, 60 s idle).
    fn default() -> Self {
        ConnLimits {
            write_idle: None,
            timeouts: ConnTimeouts {
                head: Some(Duration::from_secs(30)),
                idle: Some(Duration::from_secs(60)),
                response: None,
            },
            max_connections: None,
            metrics: None,
        }
    }
}

/// TLS termination of a listener.
#[derive(Clone)]
pub(crate) struct TlsTermination {
    acceptor: TlsAcceptor,
    timeout: Duration,
}

/// Runs until `shutdown`, then drains. `handler` is cloned per connection and gets each
/// request with the connection's peer address.
pub(crate) async fn accept_loop<H, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsTermination>,
    conn: ConnLimits,
    handler: H,
    shutdown: CancellationToken,
    which: &'static str,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let builder = Arc::new(builder);
    let refusal = Refusal::new(conn.max_connections, tls.is_some());
    // Connection tasks live in a set so that dropping this future (the caller's drain deadline
    // passed) aborts them instead of leaving them detached.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Usually EMFILE/ENFILE or a connection reset before accept: none of them is
                // fatal for the listener, but spinning on them would burn a core.
                tracing::warn!(listener = which, error = %e, "accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        // Finished connections were reaped above (`biased`), so the set holds the open ones.
        if let Some(max) = conn.max_connections
            && connections.len() >= max
        {
            if let Some(m) = &conn.metrics {
                m.refused(ConnRefusal::MaxConnections);
            }
            refusal.refuse(stream, peer, max, which);
            continue;
        }
        // Small writes (headers, last chunks) must not wait for Nagle.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(listener = which, %peer, error = %e, "cannot set TCP_NODELAY");
        }
        // The handshake runs in the connection's task: a slow client must not hold up accept.
        let (builder, handler, shutdown, tls, limits) =
            (Arc::clone(&builder), handler.clone(), shutdown.clone(), tls.clone(), conn.clone());
        let open = conn.metrics.as_ref().map(ConnectionMetrics::opened);
        connections.spawn(async move {
            let _open = open;
            let Some(tls) = tls else {
                return serve_connection(&builder, stream, limits, handler, shutdown, which, peer).await;
            };
            match tokio::time::timeout(tls.timeout, tls.acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(&builder, stream, limits, handler, shutdown, which, peer).await,
                Ok(Err(e)) => tracing::debug!(listener = which, %peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(listener = which, %peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    tracing::info!(listener = which, connections = connections.len(), "draining connections");
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// How a connection over the cap is turned away: plain HTTP gets a canned HTTP/1 503 with
/// `Retry-After` and an OCI error body, written without waiting (what does not fit in the
/// socket buffer at once is dropped); TLS is closed at once (a handshake costs more than the
/// answer is worth). Warns at most once per second.
struct Refusal {
    answer: Option<Bytes>,
    /// Refused sockets kept open briefly so the client reads the 503 instead of a reset.
    lingering: Arc<Semaphore>,
    last_warned: std::sync::Mutex<Option<Instant>>,
}

/// Refused sockets lingering at once; past that they are closed without waiting.
const MAX_LINGERING: usize = 64;
/// How long a refused socket is kept for the client to read the 503.
const LINGER: Duration = Duration::from_secs(1);

impl Refusal {
    fn new(max: Option<usize>, tls: bool) -> Self {
        let answer = match (max, tls) {
            (Some(max), false) => Some(refusal_response(max)),
            _ => None,
        };
        Refusal { answer, lingering: Arc::new(Semaphore::new(MAX_LINGERING)), last_warned: Default::default() }
    }

    fn refuse(&self, stream: TcpStream, peer: SocketAddr, max: usize, which: &'static str) {
        {
            let mut last = self.last_warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                *last = Some(Instant::now());
                tracing::warn!(listener = which, %peer, max_connections = max, "too many connections; refusing new ones");
            }
        }
        let Some(answer) = &self.answer else {
            return;
        };
        // Best effort: a fresh socket's send buffer takes these few hundred bytes at once.
        let _written = stream.try_write(answer);
        let Ok(permit) = Arc::clone(&self.lingering).try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            // Half-close, then read what the client sent until it closes: closing a socket
            // with unread bytes sends a reset, which may destroy the 503 before it is read.
            let _shut = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// `503 UNAVAILABLE` with `Retry-After: 1`, as the OCI error envelope.
fn refusal_response(max: usize) -> Bytes {
    let body = serde_json::json!({"errors": [{
        "code": "UNAVAILABLE",
        "message": "too many connections; retry shortly",
        "detail": {"maxConnections": max},
    }]})
    .to_string();
    Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Retry-After: 1\r\n{}: {}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        crate::headers::API_VERSION,
        crate::headers::API_VERSION_VALUE,
    ))
}

async fn serve_connection<I, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    limits: ConnLimits,
    handler: H,
    shutdown: CancellationToken,
    which: &'static str,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let activity = ConnActivity::new();
    let supervisor = Supervisor::new(Arc::clone(&activity), limits.timeouts);
    let io = WriteIdle::new(io, limits.write_idle, peer).with_activity(Arc::clone(&activity));
    let service = service_fn(move |req: Request<Incoming>| {
        let guard = activity.request_started(req.version() == Version::HTTP_2);
        let answer = handler(req, peer);
        async move { answer.await.map(|resp| resp.map(|body| guard.track(body))) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // Set once a graceful close began (shutdown, or an idle connection): hyper finishes what
    // is open and closes; the supervisor still bounds it.
    let mut draining: Option<Instant> = None;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(listener = which, %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if draining.is_none() => {
                conn.as_mut().graceful_shutdown();
                draining = Some(Instant::now());
            }
            (why, graceful) = supervisor.next_close(draining) => {
                let already_counted = draining.is_some() && why == ConnClose::Idle;
                if !already_counted && let Some(m) = &limits.metrics {
                    m.closed(why);
                }
                if graceful {
                    tracing::debug!(listener = which, %peer, reason = why.as_str(), "closing the connection");
                    conn.as_mut().graceful_shutdown();
                    draining = Some(Instant::now());
                    continue;
                }
                if why == ConnClose::ZeroWindow {
                    tracing::warn!(
                        listener = which,
                        %peer,
                        "client took no response bytes for the response idle timeout; closing the connection"
                    );
                } else {
                    tracing::debug!(listener = which, %peer, reason = why.as_str(), "closing the connection");
                }
                return;
            }
        }
    }
}
