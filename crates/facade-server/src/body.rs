//! The response body: empty, a buffer, or a blob stream of a known length.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::backend::BlobStream;
use crate::error::Error;
use crate::limits::ClientPermit;
use crate::metrics::{AbortReason, BodyMeter};

/// Body of every response this crate produces.
///
/// A stream body knows its exact length up front (it goes out as `Content-Length`). If the
/// backend stream fails, ends early or overruns, the body yields an error frame: hyper then
/// resets the HTTP/2 stream or closes the HTTP/1 connection, so the client sees a short body
/// and never a "complete" response with wrong bytes. A stream that yields nothing for the
/// idle timeout is aborted the same way.
#[derive(Debug, Default)]
pub struct Body {
    inner: Inner,
    meter: Option<BodyMeter>,
    /// The client's concurrency slot, held until the body ends or is dropped.
    permit: Option<ClientPermit>,
}

#[derive(Default)]
enum Inner {
    #[default]
    Empty,
    Full(Option<Bytes>),
    Stream(Box<StreamState>),
    /// An open-ended stream of small messages (the admin API's server-sent events), sent
    /// chunked until it ends.
    Events(futures::stream::BoxStream<'static, Bytes>),
}

struct StreamState {
    stream: BlobStream,
    remaining: u64,
    sent: u64,
    /// Offset of the first byte within the blob, for logs.
    start: u64,
    /// The blob digest, for logs only.
    digest: String,
    finished: bool,
    idle: Option<IdleTimer>,
}

/// Fires when the source stays pending for `timeout` while the connection wants bytes.
struct IdleTimer {
    timeout: Duration,
    /// Allocated on the first pending poll, then reset instead of reallocated.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl IdleTimer {
    fn progress(&mut self) {
        self.armed = false;
    }

    /// Whether the source has now been pending for the whole timeout.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timeout = self.timeout;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if !self.armed {
            sleep.as_mut().reset(Instant::now() + timeout);
            self.armed = true;
        }
        sleep.as_mut().poll(cx).is_ready()
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Inner::Empty => f.write_str("Empty"),
            Inner::Full(b) => write!(f, "Full({} bytes)", b.as_ref().map_or(0, Bytes::len)),
            Inner::Stream(s) => write!(f, "Stream({} remaining)", s.remaining),
            Inner::Events(_) => f.write_str("Events"),
        }
    }
}

impl Body {
    /// No bytes.
    pub fn empty() -> Self {
        Body::default()
    }

    /// A buffered body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Body { inner: Inner::Full((!bytes.is_empty()).then_some(bytes)), meter: None, permit: None }
    }

    /// Messages of unknown total length, each sent as soon as it is yielded.
    pub(crate) fn events(stream: futures::stream::BoxStream<'static, Bytes>) -> Self {
        Body { inner: Inner::Events(stream), meter: None, permit: None }
    }

    /// A blob stream that must yield exactly `len` bytes (`start` and `digest` are for logs).
    pub(crate) fn stream(stream: BlobStream, len: u64, start: u64, digest: String) -> Self {
        Body {
            inner: Inner::Stream(Box::new(StreamState {
                stream,
                remaining: len,
                sent: 0,
                start,
                digest,
                finished: len == 0,
                idle: None,
            })),
            meter: None,
            permit: None,
        }
    }

    /// Aborts a stream that yields nothing for `timeout` (`None`: waits forever). The
    /// connection's own write timer covers a client that stops reading; this covers a source
    /// that stops producing.
    pub(crate) fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        if let (Inner::Stream(s), Some(timeout)) = (&mut self.inner, timeout) {
            s.idle = Some(IdleTimer { timeout, sleep: None, armed: false });
        }
        self
    }

    /// Holds the client's concurrency slot until this body is finished or dropped.
    pub(crate) fn with_permit(mut self, permit: Option<ClientPermit>) -> Self {
        self.permit = permit;
        self
    }

    pub(crate) fn with_meter(mut self, meter: BodyMeter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Swaps the content for nothing, keeping the meter (HEAD: same headers, no body).
    pub(crate) fn into_empty(mut self) -> Self {
        // Unopened content is not an abort: reset it before this value drops.
        self.inner = Inner::Empty;
        Body { inner: Inner::Empty, meter: self.meter.take(), permit: self.permit.take() }
    }

    fn abort(&mut self, reason: AbortReason, source: Option<std::io::Error>) -> Error {
        let (offset, digest) = match &mut self.inner {
            Inner::Stream(s) => {
                s.finished = true;
                (s.start + s.sent, s.digest.clone())
            }
            _ => (0, String::new()),
        };
        if let Some(meter) = &self.meter {
            meter.aborted(reason);
        }
        tracing::warn!(
            reason = reason.as_str(),
            digest = %digest,
            offset,
            error = source.as_ref().map(|e| e.to_string()),
            "response body aborted after headers were sent"
        );
        Error::ResponseAborted { reason: reason.as_str(), offset, source }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let state = match &mut this.inner {
            Inner::Empty => return Poll::Ready(None),
            Inner::Full(bytes) => {
                let Some(bytes) = bytes.take() else {
                    return Poll::Ready(None);
                };
                if let Some(meter) = &this.meter {
                    meter.sent(bytes.len());
                }
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            Inner::Events(events) => return events.poll_next_unpin(cx).map(|e| e.map(|b| Ok(Frame::data(b)))),
            Inner::Stream(state) => state,
        };
        loop {
            if state.finished {
                return Poll::Ready(None);
            }
            match state.stream.poll_next_unpin(cx) {
                Poll::Pending => {
                    if state.idle.as_mut().is_some_and(|idle| idle.expired(cx)) {
                        return Poll::Ready(Some(Err(this.abort(AbortReason::SourceIdle, None))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(chunk))) if chunk.is_empty() => continue,
                Poll::Ready(Some(Ok(chunk))) => {
                    if let Some(idle) = &mut state.idle {
                        idle.progress();
                    }
                    let n = chunk.len() as u64;
                    if n > state.remaining {
                        return Poll::Ready(Some(Err(this.abort(AbortReason::SourceOverlong, None))));
                    }
                    state.remaining -= n;
                    state.sent += n;
                    if state.remaining == 0 {
                        state.finished = true;
                        // Release the source (connection, file) as soon as its part is done.
                        state.stream = futures::stream::empty().boxed();
                        state.idle = None;
                    }
                    if let Some(meter) = &this.meter {
                        meter.sent(chunk.len());
                    }
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(this.abort(AbortReason::SourceError, Some(e)))));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Some(Err(this.abort(AbortReason::SourceShort, None))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Stream(s) => s.finished,
            Inner::Events(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream(s) if s.finished => SizeHint::with_exact(0),
            Inner::Stream(s) => SizeHint::with_exact(s.remaining),
            Inner::Events(_) => SizeHint::default(),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Inner::Stream(s) = &self.inner
            && !s.finished
        {
            if let Some(meter) = &self.meter {
                meter.aborted(AbortReason::ClientGone);
            }
            tracing::debug!(
                digest = %s.digest,
                offset = s.start + s.sent,
                remaining = s.remaining,
                "response body dropped before it was finished"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn chunks(items: Vec<std::io::Result<&'static [u8]>>) -> BlobStream {
        futures::stream::iter(items.into_iter().map(|r| r.map(Bytes::from_static))).boxed()
    }

    #[tokio::test]
    async fn exact_stream_completes() {
        let body = Body::stream(chunks(vec![Ok(b"ab"), Ok(b""), Ok(b"cd")]), 4, 0, "d".into());
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(4));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abcd");
    }

    #[tokio::test]
    async fn short_overlong_and_failing_streams_abort() {
        let short = Body::stream(chunks(vec![Ok(b"ab")]), 4, 0, "d".into());
        assert!(matches!(short.collect().await, Err(Error::ResponseAborted { reason: "source_short", offset: 2, .. })));
        let long = Body::stream(chunks(vec![Ok(b"abcdef")]), 4, 10, "d".into());
        assert!(matches!(
            long.collect().await,
            Err(Error::ResponseAborted { reason: "source_overlong", offset: 10, .. })
        ));
        let failing = Body::stream(chunks(vec![Ok(b"abc"), Err(std::io::Error::other("reset"))]), 4, 100, "d".into());
        assert!(matches!(
            failing.collect().await,
            Err(Error::ResponseAborted { reason: "source_error", offset: 103, .. })
        ));
    }

    #[tokio::test]
    async fn a_stream_that_yields_nothing_is_aborted_after_the_idle_timeout() {
        let stalled = futures::stream::iter([Ok(Bytes::from_static(b"ab"))]).chain(futures::stream::pending()).boxed();
        let body = Body::stream(stalled, 4, 0, "d".into()).with_idle_timeout(Some(Duration::from_millis(50)));
        let outcome = tokio::time::timeout(Duration::from_secs(10), body.collect()).await.unwrap();
        assert!(matches!(outcome, Err(Error::ResponseAborted { reason: "source_idle", offset: 2, .. })));
    }

    #[tokio::test]
    async fn full_and_empty_bodies() {
        assert!(http_body::Body::is_end_stream(&Body::full(Bytes::new())));
        assert!(http_body::Body::is_end_stream(&Body::empty()));
        let bytes = Body::full("{}").collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"{}");
    }
}
