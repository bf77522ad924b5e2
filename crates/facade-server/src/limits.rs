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
//! - [`ConnActivity`] and [`Supervisor`]: the connection-level timers hyper does not give us.
//!   hyper-util's auto builder reads the first bytes (to tell HTTP/1 from HTTP/2) with no
//!   deadline, hyper's HTTP/1 head timer starts at once when a connection goes idle (so it would
//!   double as a short keep-alive timeout), HTTP/2 has no idle timeout, and with a flow-control
//!   window at zero hyper simply stops polling the response body, so no write is ever pending
//!   for [`WriteIdle`] to see. The supervisor watches what the connection's requests and bodies
//!   do instead: a request head must complete within the head timeout (from accept, and on
//!   HTTP/1 from the first byte after an idle spell, as Go's server does), a connection with no
//!   request open is closed after the idle timeout, and a response whose next bytes the client
//!   does not take for the response idle timeout gets its connection closed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::body::Body;
use crate::metrics::ConnClose;

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
    /// Told about every read that returns bytes (the head timer of an idle HTTP/1 connection
    /// starts with the first byte).
    activity: Option<Arc<ConnActivity>>,
}

impl<I> WriteIdle<I> {
    pub(crate) fn new(io: I, timeout: Option<Duration>, peer: SocketAddr) -> Self {
        WriteIdle { io, timeout, peer, sleep: None, armed: false, activity: None }
    }

    /// Reports reads to `activity`.
    pub(crate) fn with_activity(mut self, activity: Arc<ConnActivity>) -> Self {
        self.activity = Some(activity);
        self
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
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(activity)) = (&res, &self.activity)
            && buf.filled().len() > before
        {
            activity.bytes_read();
        }
        res
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

/// The connection-level deadlines the [`Supervisor`] enforces; `None` disables one.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ConnTimeouts {
    /// From accept (after TLS) to the first complete request head; on HTTP/1 also from the
    /// first byte of a later request to its complete head.
    pub(crate) head: Option<Duration>,
    /// With no request open: how long the connection may stay idle.
    pub(crate) idle: Option<Duration>,
    /// How long a response may wait for the client to take its next bytes.
    pub(crate) response: Option<Duration>,
}

/// "Not waiting" / "never" in the nanosecond fields below.
const NONE: u64 = 0;

/// What a connection's I/O, requests and response bodies report to its [`Supervisor`]. Times
/// are nanoseconds since `epoch`, plus one so that 0 can mean "none".
#[derive(Debug)]
pub(crate) struct ConnActivity {
    epoch: Instant,
    /// Requests whose response body has not ended (or been dropped) yet.
    open: AtomicUsize,
    /// Requests received so far.
    requests: AtomicU64,
    /// The connection speaks HTTP/2 (seen on its first request).
    h2: AtomicBool,
    /// When `open` last fell to zero.
    idle_since: AtomicU64,
    /// Set when the connection goes idle; the next read that returns bytes clears it and
    /// stamps `first_byte`.
    awaiting_byte: AtomicBool,
    first_byte: AtomicU64,
    /// Clocks of the responses handed to hyper (dead entries are pruned as new ones come).
    responses: Mutex<Vec<Weak<ResponseClock>>>,
    notify: Notify,
}

impl ConnActivity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ConnActivity {
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            idle_since: AtomicU64::new(NONE),
            awaiting_byte: AtomicBool::new(false),
            first_byte: AtomicU64::new(NONE),
            responses: Mutex::new(Vec::new()),
            notify: Notify::new(),
        })
    }

    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    fn at(&self, stamp: u64) -> Instant {
        self.epoch + Duration::from_nanos(stamp.saturating_sub(1))
    }

    fn bytes_read(&self) {
        if self.awaiting_byte.load(Ordering::Relaxed) && self.awaiting_byte.swap(false, Ordering::AcqRel) {
            self.first_byte.store(self.stamp(Instant::now()), Ordering::Release);
            self.notify.notify_one();
        }
    }

    /// A request head arrived; the guard keeps it open until its response body ends or drops.
    pub(crate) fn request_started(self: &Arc<Self>, h2: bool) -> RequestGuard {
        if h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.awaiting_byte.store(false, Ordering::Release);
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.open.fetch_add(1, Ordering::AcqRel);
        RequestGuard { activity: Arc::clone(self), clock: None }
    }

    fn request_ended(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.stamp(Instant::now()), Ordering::Release);
            self.first_byte.store(NONE, Ordering::Release);
            self.awaiting_byte.store(true, Ordering::Release);
            self.notify.notify_one();
        }
    }

    fn register(&self, clock: &Arc<ResponseClock>) {
        let mut responses = self.responses.lock().unwrap_or_else(PoisonError::into_inner);
        responses.retain(|w| w.strong_count() > 0);
        responses.push(Arc::downgrade(clock));
    }

    /// The earliest moment a response started waiting for the client, if one is waiting.
    fn oldest_wait(&self) -> Option<Instant> {
        let responses = self.responses.lock().unwrap_or_else(PoisonError::into_inner);
        responses
            .iter()
            .filter_map(Weak::upgrade)
            .map(|c| c.waiting_since.load(Ordering::Acquire))
            .filter(|s| *s != NONE)
            .min()
            .map(|s| self.at(s))
    }

    /// What to do at `now`: close (why, and whether gracefully), or look again at a deadline
    /// (`None`: only when something changes).
    fn verdict(&self, t: &ConnTimeouts, now: Instant) -> Verdict {
        if self.open.load(Ordering::Acquire) > 0 {
            let Some(limit) = t.response else {
                return Verdict::Wait(None);
            };
            return match self.oldest_wait() {
                Some(since) if now >= since + limit => Verdict::Close(ConnClose::ZeroWindow, false),
                Some(since) => Verdict::Wait(Some(since + limit)),
                // A response may start waiting at any moment without telling: look again soon.
                None => Verdict::Wait(Some(now + limit / 4)),
            };
        }
        let deadline = |from: Instant, limit: Option<Duration>, why: ConnClose, graceful: bool| match limit {
            Some(limit) if now >= from + limit => Verdict::Close(why, graceful),
            Some(limit) => Verdict::Wait(Some(from + limit)),
            None => Verdict::Wait(None),
        };
        if self.requests.load(Ordering::Acquire) == 0 {
            return deadline(self.epoch, t.head, ConnClose::HeadTimeout, false);
        }
        let first_byte = self.first_byte.load(Ordering::Acquire);
        if !self.h2.load(Ordering::Relaxed) && first_byte != NONE {
            return deadline(self.at(first_byte), t.head, ConnClose::HeadTimeout, false);
        }
        // HTTP/2 pings and window updates between requests do not keep a connection open.
        deadline(self.at(self.idle_since.load(Ordering::Acquire)), t.idle, ConnClose::Idle, true)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Close(ConnClose, bool),
    Wait(Option<Instant>),
}

/// Enforces [`ConnTimeouts`] on one connection.
#[derive(Debug)]
pub(crate) struct Supervisor {
    activity: Arc<ConnActivity>,
    timeouts: ConnTimeouts,
}

/// A hard close after a graceful one that did not finish: the client kept the idle connection
/// (or its half-closed socket) open after the server's GOAWAY or `Connection: close`.
const GRACEFUL_CLOSE_BOUND: Duration = Duration::from_secs(1);

impl Supervisor {
    pub(crate) fn new(activity: Arc<ConnActivity>, timeouts: ConnTimeouts) -> Self {
        Supervisor { activity, timeouts }
    }

    /// Resolves when the connection must close: why, and whether a graceful close is enough
    /// (an idle connection: finish what is being written, send GOAWAY). Once `draining` (a
    /// graceful close was asked for), an idle connection gets a short bound instead. Cancel
    /// safe.
    pub(crate) async fn next_close(&self, draining: Option<Instant>) -> (ConnClose, bool) {
        let mut timeouts = self.timeouts;
        if draining.is_some() {
            timeouts.idle = Some(timeouts.idle.map_or(GRACEFUL_CLOSE_BOUND, |i| i.min(GRACEFUL_CLOSE_BOUND)));
        }
        loop {
            let notified = self.activity.notify.notified();
            let mut verdict = self.activity.verdict(&timeouts, Instant::now());
            if let (Some(since), Verdict::Close(ConnClose::Idle, _)) = (draining, &verdict) {
                // Idle since before the drain began: the bound runs from the drain.
                let bound = since + timeouts.idle.unwrap_or(GRACEFUL_CLOSE_BOUND);
                if Instant::now() < bound {
                    verdict = Verdict::Wait(Some(bound));
                }
            }
            match verdict {
                Verdict::Close(why, graceful) => return (why, graceful && draining.is_none()),
                Verdict::Wait(Some(at)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = notified => {}
                    }
                }
                Verdict::Wait(None) => notified.await,
            }
        }
    }
}

/// Keeps a request counted as open on its connection until its response body ends or drops.
#[derive(Debug)]
pub(crate) struct RequestGuard {
    activity: Arc<ConnActivity>,
    clock: Option<Arc<ResponseClock>>,
}

impl RequestGuard {
    /// Wraps the response body so that the connection sees when the client stops taking its
    /// bytes.
    pub(crate) fn track(mut self, body: Body) -> TrackedBody {
        // The response goes to hyper now: until hyper asks for its first bytes, it waits for
        // the connection (an HTTP/2 window of zero means hyper never asks).
        let clock = Arc::new(ResponseClock { waiting_since: AtomicU64::new(self.activity.stamp(Instant::now())) });
        self.activity.register(&clock);
        self.clock = Some(clock);
        TrackedBody { body, guard: Some(self) }
    }

    fn set_waiting(&self, waiting: bool) {
        if let Some(clock) = &self.clock {
            let stamp = if waiting { self.activity.stamp(Instant::now()) } else { NONE };
            clock.waiting_since.store(stamp, Ordering::Release);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.activity.request_ended();
    }
}

/// When a response body started waiting for the connection to ask for more (it yielded a
/// frame, or was just handed over); [`NONE`] while it waits for its own source, whose
/// stalls the body's own idle timer covers.
#[derive(Debug)]
struct ResponseClock {
    waiting_since: AtomicU64,
}

/// A response body that reports to its connection's [`ConnActivity`]: waiting for the client
/// after each frame, not waiting while its source has nothing yet, done at its end.
#[derive(Debug)]
pub(crate) struct TrackedBody {
    body: Body,
    guard: Option<RequestGuard>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = crate::error::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.body).poll_frame(cx);
        match &res {
            Poll::Pending => {
                if let Some(g) = &this.guard {
                    g.set_waiting(false);
                }
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(g) = &this.guard {
                    g.set_waiting(true);
                }
            }
            // Ended or failed: the request is no longer open.
            Poll::Ready(None | Some(Err(_))) => this.guard = None,
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
