//! Pass-through: a blob the local store does not keep (larger than `facade.maxBlobBytes`, no
//! room in the disk budget, or a full disk) streamed from its origin straight to one reader,
//! with nothing written to disk (README, "Configuration"; docs/blob-engine.md).
//!
//! It keeps the fill's promise never to hand out a wrong blob: every byte from the origin is
//! hashed, and the piece holding the blob's last byte goes out only after the digest of the
//! whole blob matched. So a read of the range `[start, end)` downloads from the first byte not
//! yet hashed (0 for a new read) and skips up to `start`; a range that stops short of the blob's
//! end is, as from a fill, served without waiting for the end. A broken body is resumed from the
//! offset reached, with the fill's backoff and budgets; the response's status waits for the
//! origin's first answer, so its 404, 401/403 or 429 reach the client as OCI errors.
//!
//! The reader's pace is the download's pace (the body is polled only when the client wants
//! more), and a reader that goes away drops the origin's body with it: nothing keeps going
//! for nobody.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use bytes::Bytes;
use facade_oci::{Digest, DigestHasher};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::blobs::fill::{Origin, UpstreamBlob};
use crate::error::{Error, Result};

/// Knobs of a pass-through (the fill's own, see `FillConfig`).
#[derive(Clone, Debug)]
pub(crate) struct PassConfig {
    pub(crate) idle_timeout: Duration,
    pub(crate) retry_min_delay: Duration,
    pub(crate) retry_max_delay: Duration,
    pub(crate) max_attempts_without_progress: usize,
    pub(crate) max_resumes: usize,
}

/// Where a pass-through starts hashing: the blob's first byte, or a point a fill reached with
/// the hash of everything before it.
#[derive(Clone)]
pub(crate) struct HashedPrefix {
    /// Bytes hashed.
    pub(crate) len: u64,
    /// Their hash state.
    pub(crate) hasher: DigestHasher,
}

/// One reader's pass-through.
pub(crate) struct PassThrough {
    origin: Arc<dyn Origin>,
    from: UpstreamBlob,
    digest: Digest,
    size: u64,
    /// Bytes of the blob hashed so far: the offset the next body starts at.
    hashed: u64,
    hasher: DigestHasher,
    /// The next byte the reader gets, and the end of its range.
    pos: u64,
    end: u64,
    body: Option<BoxStream<'static, facade_upstream::Result<Bytes>>>,
    config: PassConfig,
    resumes: usize,
}

type Body = BoxStream<'static, std::io::Result<Bytes>>;

impl PassThrough {
    /// Opens the origin (waiting for its answer, which decides the response's status) and
    /// returns the stream of `[start, end)` of the blob.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn open(
        origin: Arc<dyn Origin>,
        from: UpstreamBlob,
        digest: Digest,
        size: u64,
        start: u64,
        end: u64,
        prefix: Option<HashedPrefix>,
        config: PassConfig,
    ) -> Result<Body> {
        let prefix = match prefix {
            Some(p) if p.len <= start => p,
            _ => HashedPrefix {
                len: 0,
                hasher: digest.hasher().ok_or_else(|| Error::Spool {
                    reason: format!("cannot verify {digest} while streaming it through"),
                })?,
            },
        };
        let mut pass = PassThrough {
            origin,
            from,
            digest,
            size,
            hashed: prefix.len,
            hasher: prefix.hasher,
            pos: start,
            end: end.min(size),
            body: None,
            config,
            resumes: 0,
        };
        if pass.pos < pass.end {
            pass.open_body().await?;
        }
        Ok(Box::pin(futures::stream::try_unfold(pass, |mut p| async move {
            match p.next_piece().await.map_err(std::io::Error::other)? {
                Some(b) => Ok(Some((b, p))),
                None => Ok(None),
            }
        })))
    }

    fn context(&self) -> String {
        format!("{}/{}@{}", self.from.registry, self.from.repo, self.digest)
    }

    /// Opens a body at the offset hashed so far, retrying what is worth a retry with backoff.
    async fn open_body(&mut self) -> Result<()> {
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(self.config.retry_min_delay)
            .with_max_delay(self.config.retry_max_delay)
            .with_max_times(self.config.max_attempts_without_progress)
            .with_jitter()
            .build();
        loop {
            let err = match self.origin.open(&self.from, &self.digest, self.hashed).await {
                Ok(stream) => {
                    if let Some(total) = stream.total_size
                        && total != self.size
                    {
                        return Err(Error::SizeMismatch {
                            digest: self.digest.clone(),
                            expected: self.size,
                            actual: total,
                        });
                    }
                    self.body = Some(stream.body);
                    return Ok(());
                }
                Err(e) => {
                    // As the fill: a 429 before any byte is the client's to see, a ranged
                    // request answered oddly is worth another try, a 404/401/403 is final.
                    let rate_limited = e.kind() == facade_upstream::ErrorKind::RateLimited && self.hashed == 0;
                    let retry = !rate_limited
                        && (e.is_retryable() || (e.kind() == facade_upstream::ErrorKind::Protocol && self.hashed > 0));
                    let err = Error::upstream(self.context(), e);
                    if !retry {
                        return Err(err);
                    }
                    err
                }
            };
            let Some(delay) = backoff.next() else { return Err(err) };
            tokio::time::sleep(delay).await;
        }
    }

    /// The next piece of the reader's range; `None` at its end.
    async fn next_piece(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.pos >= self.end {
                return Ok(None);
            }
            let Some(body) = self.body.as_mut() else {
                self.open_body().await?;
                continue;
            };
            let broke = match tokio::time::timeout(self.config.idle_timeout, body.next()).await {
                Ok(Some(Ok(bytes))) => {
                    if let Some(piece) = self.take(bytes)? {
                        return Ok(Some(piece));
                    }
                    continue;
                }
                Ok(Some(Err(e))) if !e.is_retryable() => return Err(Error::upstream(self.context(), e)),
                Ok(Some(Err(e))) => e.to_string(),
                Ok(None) => format!("body ended at byte {}", self.hashed),
                Err(_) => format!("no byte for {:?} at offset {}", self.config.idle_timeout, self.hashed),
            };
            self.body = None;
            self.resumes += 1;
            if self.resumes > self.config.max_resumes {
                return Err(Error::Interrupted { digest: self.digest.clone(), offset: self.hashed });
            }
            tracing::debug!(digest = %self.digest, offset = self.hashed, reason = %broke, "pass-through body broke; resuming");
        }
    }

    /// Hashes a chunk of the body and cuts out the part the reader wants, if any. The chunk
    /// that completes the blob is checked against the digest before any of it goes out.
    fn take(&mut self, bytes: Bytes) -> Result<Option<Bytes>> {
        let at = self.hashed;
        let len = bytes.len() as u64;
        if at + len > self.size {
            return Err(Error::SizeMismatch { digest: self.digest.clone(), expected: self.size, actual: at + len });
        }
        self.hasher.update(&bytes);
        self.hashed += len;
        if self.hashed == self.size {
            let actual = self.hasher.clone().finish();
            if actual != self.digest {
                return Err(Error::DigestMismatch { expected: self.digest.clone(), actual, size: self.size });
            }
        }
        let (lo, hi) = (self.pos.max(at), self.end.min(self.hashed));
        if hi <= lo {
            return Ok(None);
        }
        self.pos = hi;
        Ok(Some(bytes.slice((lo - at) as usize..(hi - at) as usize)))
    }
}
