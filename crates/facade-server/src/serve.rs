//! Accept loop with graceful drain, shared by the registry and the admin listener.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::backend::Backend;
use crate::body::Body;

/// Serves `app` on `listener` over HTTP/1.1 (keep-alive) and h2c (prior knowledge) until
/// `shutdown` is cancelled. Then it stops accepting, asks every connection to finish its
/// in-flight requests (idle keep-alive connections close at once) and returns when all have
/// closed. It waits as long as that takes: the caller bounds the wait (e.g. with a timeout
/// around this future) and drops it to abort the rest.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    app: Arc<App<B>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(app.config().http1_header_read_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(app.config().h2_max_concurrent_streams);
    let handler = move |req: Request<Incoming>| {
        let app = Arc::clone(&app);
        async move { Ok::<_, Infallible>(app.handle(req).await) }
    };
    accept_loop(listener, builder, handler, shutdown, "registry").await
}

/// Runs until `shutdown`, then drains. `handler` is cloned per connection.
pub(crate) async fn accept_loop<H, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    handler: H,
    shutdown: CancellationToken,
    which: &'static str,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
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
        let conn = builder.serve_connection(TokioIo::new(stream), service_fn(handler.clone()));
        let conn = graceful.watch(conn.into_owned());
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(listener = which, %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(listener = which, connections = graceful.count(), "draining connections");
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
    Ok(())
}
