//! Accept loop with graceful drain, shared by the registry and the admin listener; TLS
//! termination for the registry listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::app::App;
use crate::backend::Backend;
use crate::body::Body;
use crate::limits::WriteIdle;
use crate::reload;

/// hyper refuses (panics on) a smaller HTTP/1 buffer.
const HYPER_MIN_BUF_SIZE: usize = 8192;

/// Serves `app` on `listener` until `shutdown` is cancelled: HTTP/1.1 (keep-alive) and h2c
/// (prior knowledge), or — with `tls` configured — HTTPS with ALPN `h2`/`http/1.1`. While it
/// runs, the configured certificate and htpasswd files are polled and re-read when they change.
///
/// Request heads are bounded by [`crate::ServerConfig::max_header_bytes`] and
/// `max_headers` (431), requests per client address by `max_requests_per_client` (429), and a
/// connection whose client stops reading is closed after `response_idle_timeout`.
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
        .header_read_timeout(config.http1_header_read_timeout)
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
    let conn = ConnLimits { write_idle: config.response_idle_timeout };
    let handler = move |req: Request<Incoming>, peer: SocketAddr| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(app.handle_from(req, peer.ip()).await) }
    };
    accept_loop(listener, builder, tls, conn, handler, shutdown, "registry").await
}

/// Per-connection limits applied below HTTP.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ConnLimits {
    /// Close the connection when a write makes no progress for this long.
    pub(crate) write_idle: Option<Duration>,
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
    let graceful = GracefulShutdown::new();
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
        // Small writes (headers, last chunks) must not wait for Nagle.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(listener = which, %peer, error = %e, "cannot set TCP_NODELAY");
        }
        // The handshake runs in the connection's task: a slow client must not hold up accept.
        // The watcher is taken now, so a shutdown during the handshake still reaches the
        // connection once it is served.
        let (builder, handler, watcher, tls) = (Arc::clone(&builder), handler.clone(), graceful.watcher(), tls.clone());
        connections.spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(&builder, stream, conn, handler, watcher, which, peer).await;
            };
            match tokio::time::timeout(tls.timeout, tls.acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(&builder, stream, conn, handler, watcher, which, peer).await,
                Ok(Err(e)) => tracing::debug!(listener = which, %peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(listener = which, %peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    tracing::info!(listener = which, connections = graceful.count(), "draining connections");
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn serve_connection<I, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    limits: ConnLimits,
    handler: H,
    watcher: Watcher,
    which: &'static str,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let io = WriteIdle::new(io, limits.write_idle, peer);
    let conn = builder.serve_connection(TokioIo::new(io), service_fn(move |req| handler(req, peer)));
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(listener = which, %peer, error = %e, "connection ended with an error");
    }
}
