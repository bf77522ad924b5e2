//! Per-client concurrency and the "no progress" timers: what keeps one client (or one stuck
//! peer) from holding an unbounded share of the facade.
//!
//! - [`ClientLimiter`]: requests in flight per peer IP address, from the request until its
//!   response body ends. A node's containerd pulls a few layers per image at a time; hundreds
//!   at once from one address is a runaway client, and it must not starve the others.
//! - [`WriteIdle`]: a connection whose peer stops reading (its receive window stays full) is
//!   closed after the idle timeout. A blob stream may legitimately take an hour; what it may
//!   not do is make no progress at all for minutes.
//! - The source side of the same timeout (a blob source that yields nothing) lives in `Body`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests in flight per client IP address.
#[derive(Clone, Debug)]
pub(crate) struct ClientLimiter {
    max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One request's slot; released on drop (the response body ended, failed or was dropped).
#[derive(Debug)]
pub(crate) struct ClientPermit {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl ClientLimiter {
    /// At most `max` (at least 1) requests per address at a time.
    pub(crate) fn new(max: usize) -> Self {
        ClientLimiter { max: max.max(1), counts: Arc::default() }
    }

    /// A slot for `ip`, or `None` when it already has `max` requests in flight.
    pub(crate) fn try_acquire(&self, ip: IpAddr) -> Option<ClientPermit> {
        // `::ffff:10.0.0.1` on a dual-stack listener is the same client as `10.0.0.1`.
        let ip = ip.to_canonical();
        // The map only holds counters; a panic while it was held cannot leave it torn.
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientPermit { ip, counts: Arc::clone(&self.counts) })
    }

    /// The configured limit.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Requests in flight for `ip` (tests).
    #[cfg(test)]
    fn in_flight(&self, ip: IpAddr) -> usize {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner).get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Addresses come and go (pods, NAT): keep only those with requests in flight.
                counts.remove(&self.ip);
            }
        }
    }
}

/// An I/O stream whose writes fail with `TimedOut` once a write (or flush) has been pending for
/// `timeout` without any progress. Reads pass through untouched: an idle keep-alive
/// connection writes nothing, so it never trips this.
pub(crate) struct WriteIdle<I> {
    io: I,
    timeout: Option<Duration>,
    peer: SocketAddr,
    /// Allocated on the first pending write, then reset instead of reallocated.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether `sleep` runs for the current stretch of pending writes.
    armed: bool,
}

impl<I> WriteIdle<I> {
    pub(crate) fn new(io: I, timeout: Option<Duration>, peer: SocketAddr) -> Self {
        WriteIdle { io, timeout, peer, sleep: None, armed: false }
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if res.is_ready() {
            self.armed = false;
            return res;
        }
        let Some(timeout) = self.timeout else {
            return Poll::Pending;
        };
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if !self.armed {
            sleep.as_mut().reset(Instant::now() + timeout);
            self.armed = true;
        }
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                tracing::warn!(
                    peer = %self.peer,
                    timeout_seconds = timeout.as_secs_f64(),
                    "client read nothing for the idle timeout; closing the connection"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client made no progress reading the response",
                )))
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteIdle<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteIdle<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, res)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, res)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn counts_per_address_and_releases_on_drop() {
        let limiter = ClientLimiter::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = limiter.try_acquire(a).unwrap();
        let p2 = limiter.try_acquire(mapped).unwrap();
        assert!(limiter.try_acquire(a).is_none(), "an IPv4-mapped address is the same client");
        let p3 = limiter.try_acquire(b).unwrap();
        assert_eq!(limiter.in_flight(a), 2);
        drop(p1);
        assert_eq!(limiter.in_flight(a), 1);
        let p4 = limiter.try_acquire(a).unwrap();
        drop((p2, p3, p4));
        assert_eq!(limiter.in_flight(a), 0);
        assert!(limiter.counts.lock().unwrap().is_empty(), "idle addresses are forgotten");
    }

    #[tokio::test]
    async fn a_write_that_stays_pending_times_out() {
        // A duplex pipe whose reader never reads: writes block once its buffer is full.
        let (client, _server) = tokio::io::duplex(64);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut io = WriteIdle::new(client, Some(Duration::from_millis(50)), peer);
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), io.write_all(&[0u8; 4096])).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn progress_resets_the_timer() {
        use tokio::io::AsyncReadExt;
        let (client, mut server) = tokio::io::duplex(64);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut io = WriteIdle::new(client, Some(Duration::from_millis(200)), peer);
        // The reader drains 64 bytes every 20 ms: slow, but never idle for 200 ms.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 2048 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                total += server.read(&mut buf).await.unwrap();
            }
            total
        });
        tokio::time::timeout(Duration::from_secs(10), io.write_all(&[1u8; 2048])).await.unwrap().unwrap();
        assert_eq!(reader.await.unwrap(), 2048);
    }
}
