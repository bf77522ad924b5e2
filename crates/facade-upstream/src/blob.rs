//! Blob bodies as streams of chunks, with stall detection and length checks.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::{Error, Result};
use crate::transport::is_eof;

/// An open blob body.
pub struct BlobStream {
    /// Size of the whole blob when upstream said it: `Content-Length` of a 200, the total of a
    /// 206's `Content-Range`.
    pub total_size: Option<u64>,
    /// Blob offset of the first byte `body` yields.
    pub offset: u64,
    /// The bytes. Ends with `Error::Stalled` when no byte came for `read_timeout`,
    /// `Error::ShortBody` when the body ended before its `Content-Length`, `Error::Transport`
    /// on a reset. Not digest-checked: the caller hashes while streaming. Dropping it closes
    /// the upstream connection.
    pub body: BoxStream<'static, Result<Bytes>>,
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("total_size", &self.total_size)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

struct BodyState {
    body: Incoming,
    host: String,
    offset: u64,
    received: u64,
    expected: Option<u64>,
    read_timeout: Duration,
    done: bool,
}

impl BodyState {
    fn fail(&mut self, e: Error) -> Option<(Result<Bytes>, ())> {
        self.done = true;
        Some((Err(e), ()))
    }

    async fn next(&mut self) -> Option<(Result<Bytes>, ())> {
        if self.done {
            return None;
        }
        loop {
            let frame = match tokio::time::timeout(self.read_timeout, self.body.frame()).await {
                Err(_) => {
                    let e = Error::Stalled {
                        host: self.host.clone(),
                        offset: self.offset + self.received,
                        timeout: self.read_timeout,
                    };
                    return self.fail(e);
                }
                Ok(f) => f,
            };
            match frame {
                None => {
                    self.done = true;
                    return match self.expected {
                        Some(n) if self.received < n => {
                            let e = Error::ShortBody { host: self.host.clone(), received: self.received, expected: n };
                            self.fail(e)
                        }
                        _ => None,
                    };
                }
                Some(Err(e)) => {
                    let err = match self.expected {
                        Some(n) if self.received < n && is_eof(&e) => {
                            Error::ShortBody { host: self.host.clone(), received: self.received, expected: n }
                        }
                        _ => Error::Transport { host: self.host.clone(), source: Box::new(e) },
                    };
                    return self.fail(err);
                }
                Some(Ok(frame)) => {
                    // Trailers and empty frames carry no content.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        self.received += data.len() as u64;
                        return Some((Ok(data), ()));
                    }
                }
            }
        }
    }
}

/// Wraps a response body. `expected` is the response's `Content-Length`.
pub(crate) fn body_stream(
    body: Incoming,
    host: String,
    offset: u64,
    expected: Option<u64>,
    read_timeout: Duration,
) -> BoxStream<'static, Result<Bytes>> {
    let state = BodyState { body, host, offset, received: 0, expected, read_timeout, done: false };
    futures::stream::unfold(state, |mut st| async move {
        let (item, ()) = st.next().await?;
        Some((item, st))
    })
    .boxed()
}

/// Parses `Content-Range: bytes first-last/total` into (first, last, total); total is `None`
/// for `*`.
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.trim().split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some((first, last, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, 199, Some(200))));
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 5-10/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range(""), None);
    }
}
