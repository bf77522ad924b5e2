//! Streams a byte range out of a file that may still be growing (an in-flight fill) or is
//! complete (the local store, a static layer file).
//!
//! Reads use `pread` on a shared descriptor, so many readers of one file need no seeking and a
//! rename or unlink of the path (commit, cleanup) does not disturb them.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use tokio::sync::watch;

/// How far a fill has come.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// `written` bytes are on disk; more may follow.
    Running {
        /// Bytes written so far.
        written: u64,
    },
    /// All bytes are on disk and matched the digest.
    Verified,
    /// The fill failed; the content must not be completed to the client.
    Failed(Arc<str>),
}

/// Read size: large reads keep syscalls and task hops few (a 1 MiB copy loop is this machine's
/// practical limit, see bench/).
pub const CHUNK: usize = 1 << 20;

/// A stream of the bytes `[start, end_exclusive)` of `file`, whose full size is `size`.
/// With `progress`, it follows a fill: it never sends the blob's last byte before the fill is
/// verified, so a client never completes a download of wrong content, and it ends with an error
/// (an aborted response) if the fill fails.
pub fn file_range_stream(
    file: Arc<std::fs::File>,
    start: u64,
    end_exclusive: u64,
    size: u64,
    progress: Option<watch::Receiver<Progress>>,
    guard: Option<Box<dyn Send + Sync>>,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    let state = Reader { file, pos: start, end: end_exclusive, size, progress, ahead: None, _guard: guard };
    Box::pin(futures::stream::try_unfold(state, |mut st| async move {
        match st.next_chunk().await? {
            Some(buf) => Ok(Some((buf, st))),
            None => Ok(None),
        }
    }))
}

/// The state of one [`file_range_stream`].
struct Reader {
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
    size: u64,
    /// `None` once the content is known complete and verified (a stored file, or a fill
    /// that reported `Verified`: that is final, whatever the fill does afterwards).
    progress: Option<watch::Receiver<Progress>>,
    /// The next chunk, read ahead while the previous one is being sent, so disk reads and
    /// socket writes overlap.
    ahead: Option<(u64, tokio::task::JoinHandle<std::io::Result<Bytes>>)>,
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Reader {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let task = match self.ahead.take() {
            Some((at, task)) if at == self.pos => task,
            _ => {
                let readable = self.readable().await?;
                self.spawn_read(self.pos, readable)
            }
        };
        let buf = task.await.map_err(std::io::Error::other)??;
        self.pos += buf.len() as u64;
        if self.pos < self.end
            && let Some(readable) = self.readable_now()?
        {
            self.ahead = Some((self.pos, self.spawn_read(self.pos, readable)));
        }
        Ok(Some(buf))
    }

    /// How far may be read without waiting.
    fn readable_now(&mut self) -> std::io::Result<Option<u64>> {
        let Some(rx) = self.progress.as_mut() else { return Ok(Some(self.end)) };
        let p = rx.borrow_and_update().clone();
        match p {
            Progress::Verified => {
                self.progress = None;
                Ok(Some(self.end))
            }
            Progress::Failed(reason) => Err(std::io::Error::other(format!("blob fill failed: {reason}"))),
            Progress::Running { written } => {
                // Hold back the final byte until the digest is verified.
                let allowed = written.min(self.size.saturating_sub(1)).min(self.end);
                Ok((allowed > self.pos).then_some(allowed))
            }
        }
    }

    /// How far may be read, waiting for the fill if needed.
    async fn readable(&mut self) -> std::io::Result<u64> {
        loop {
            if let Some(r) = self.readable_now()? {
                return Ok(r);
            }
            let Some(rx) = self.progress.as_mut() else { return Ok(self.end) };
            if rx.changed().await.is_err() {
                // The fill task ended without a final state: treat as failure.
                return Err(std::io::Error::other("blob fill ended unexpectedly"));
            }
        }
    }

    fn spawn_read(&self, pos: u64, readable: u64) -> tokio::task::JoinHandle<std::io::Result<Bytes>> {
        let want = (readable - pos).min(CHUNK as u64) as usize;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || read_exact_at(&file, pos, want))
    }
}

fn read_exact_at(file: &std::fs::File, pos: u64, want: usize) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(want);
    let mut filled = 0;
    while filled < want {
        let n = file.read_at(&mut buf[filled..], pos + filled as u64)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob file shorter than expected"));
        }
        filled += n;
    }
    Ok(buf.freeze())
}

/// A stream of one in-memory slice.
pub fn bytes_range_stream(bytes: Bytes, start: u64, end_exclusive: u64) -> BoxStream<'static, std::io::Result<Bytes>> {
    let s = (start as usize).min(bytes.len());
    let e = (end_exclusive as usize).min(bytes.len()).max(s);
    Box::pin(futures::stream::once(async move { Ok(bytes.slice(s..e)) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{StreamExt, TryStreamExt};
    use std::io::Write;

    async fn collect(s: BoxStream<'static, std::io::Result<Bytes>>) -> std::io::Result<Vec<u8>> {
        s.try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
    }

    #[tokio::test]
    async fn follows_a_growing_file_and_holds_the_last_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = std::fs::File::create(&path).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let (tx, rx) = watch::channel(Progress::Running { written: 0 });
        let reader = tokio::spawn(collect(file_range_stream(file, 0, 6, 6, Some(rx), None)));
        w.write_all(b"abc").unwrap();
        tx.send(Progress::Running { written: 3 }).unwrap();
        w.write_all(b"def").unwrap();
        tx.send(Progress::Running { written: 6 }).unwrap();
        tokio::task::yield_now().await;
        assert!(!reader.is_finished(), "completed before verification");
        tx.send(Progress::Verified).unwrap();
        assert_eq!(&reader.await.unwrap().unwrap()[..], b"abcdef");
    }

    #[tokio::test]
    async fn verification_is_final_for_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = vec![7u8; 3 * CHUNK];
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let (tx, rx) = watch::channel(Progress::Verified);
        let mut s = file_range_stream(file, 0, data.len() as u64, data.len() as u64, Some(rx), None);
        let first = s.next().await.unwrap().unwrap();
        // A later failure (say, the store commit) must not break a read of verified content.
        // (The reader may already have dropped its receiver: verification is final.)
        let _ = tx.send(Progress::Failed("commit failed".into()));
        let mut got = first.len();
        while let Some(b) = s.next().await {
            got += b.unwrap().len();
        }
        assert_eq!(got, data.len());
    }

    #[tokio::test]
    async fn fails_when_the_fill_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abcdef").unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let (tx, rx) = watch::channel(Progress::Running { written: 6 });
        let reader = tokio::spawn(collect(file_range_stream(file, 2, 6, 6, Some(rx), None)));
        tx.send(Progress::Failed("digest mismatch".into())).unwrap();
        assert!(reader.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn reads_ranges_of_complete_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let got = collect(file_range_stream(file, 10, 2_500_000, data.len() as u64, None, None)).await.unwrap();
        assert_eq!(&got[..], &data[10..2_500_000]);
    }
}
