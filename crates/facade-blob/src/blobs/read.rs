//! Streams a byte range out of a file that may still be growing (an in-flight fill) or is
//! complete (the local store, a static layer file).
//!
//! Reads use `pread` on a shared descriptor, so many readers of one file need no seeking and a
//! rename or unlink of the path (commit, cleanup) does not disturb them.
//!
//! Memory: every chunk a stream hands out carries what it holds of the process-wide budget of
//! buffered response bytes (`facade.maxBufferedResponseBytes`, README) and gives it back when
//! the server drops the chunk after writing it, so backpressure, not buffering, answers a
//! client that stops reading. A chunk backed by the budget may be big (1 MiB, the throughput
//! size) and a stream grows to it only as its client takes bytes: a chunk is at most as large
//! as what the client already consumed, rounded up to a power of two. Without budget to spare a
//! stream still moves, with one [`SMALL`] chunk of its own at a time. So the bytes buffered are
//! at most the budget plus [`SMALL`] per open stream; before this, each client that read
//! nothing pinned a 1 MiB chunk in the server's write buffer and a 1 MiB read-ahead.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::blobs::tail::Tail;
use crate::blocking::{self, Lane};

/// How far a fill has come.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// `written` bytes are on disk, `accepted` have arrived (the newest of them are in the
    /// fill's [`Tail`]); more may follow.
    Running {
        /// Bytes written so far.
        written: u64,
        /// Bytes arrived so far (at least `written`).
        accepted: u64,
    },
    /// All bytes are on disk and matched the digest.
    Verified,
    /// The fill failed; the content must not be completed to the client.
    Failed(Arc<str>),
}

/// Largest read: large reads keep syscalls and task hops few (a 1 MiB copy loop is this
/// machine's practical limit, see bench/).
pub const CHUNK: usize = 1 << 20;

/// A stream's own chunk, outside the budget: what a client that reads nothing can pin.
pub const SMALL: usize = 64 << 10;

/// The process-wide budget of response bytes held in memory (read, not yet written to a socket).
#[derive(Debug)]
pub struct ResponseBuffers {
    budget: Arc<Semaphore>,
    max_bytes: usize,
}

static BUFFERS: RwLock<Option<Arc<ResponseBuffers>>> = RwLock::new(None);

impl ResponseBuffers {
    /// The default budget, `facade.maxBufferedResponseBytes`'s default.
    pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

    /// Sets the budget of the streams opened from now on (the binary, at startup and reload).
    /// Streams under way keep the budget they were opened with.
    pub fn configure(max_bytes: u64) {
        let buffers = ResponseBuffers::new(usize::try_from(max_bytes).unwrap_or(usize::MAX));
        *BUFFERS.write().unwrap_or_else(|e| e.into_inner()) = Some(buffers);
    }

    fn new(max_bytes: usize) -> Arc<ResponseBuffers> {
        let max_bytes = max_bytes.min(Semaphore::MAX_PERMITS);
        Arc::new(ResponseBuffers { budget: Arc::new(Semaphore::new(max_bytes)), max_bytes })
    }

    /// The budget in use.
    pub fn current() -> Arc<ResponseBuffers> {
        if let Some(b) = BUFFERS.read().unwrap_or_else(|e| e.into_inner()).as_ref()
            && b.max_bytes > 0
        {
            return b.clone();
        }
        let mut slot = BUFFERS.write().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| ResponseBuffers::new(Self::DEFAULT_MAX_BYTES as usize)).clone()
    }

    /// Bytes of the budget held by chunks now.
    pub fn held(&self) -> usize {
        self.max_bytes - self.budget.available_permits()
    }

    /// The budget's size.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn try_take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(bytes).ok()?;
        // Only `NoPermits` can happen: the budget is never closed.
        self.budget.clone().try_acquire_many_owned(n).ok()
    }
}

/// Bytes on their way to a client and the permit that pays for them: a buffer read from a
/// file, or a slice of a fill's [`Tail`] (which pins the fill's receive buffer). The permit goes
/// back when the last `Bytes` pointing into it is dropped, after the server wrote it.
struct Chunk<B: AsRef<[u8]>> {
    buf: B,
    _permit: OwnedSemaphorePermit,
    /// The stream's count of bytes its client has taken.
    consumed: Arc<AtomicU64>,
}

impl<B: AsRef<[u8]>> AsRef<[u8]> for Chunk<B> {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref()
    }
}

impl<B: AsRef<[u8]>> Drop for Chunk<B> {
    fn drop(&mut self) {
        self.consumed.fetch_add(self.buf.as_ref().len() as u64, Ordering::Relaxed);
    }
}

/// What a reader of an in-flight fill follows: how far the fill has come, and the fill's
/// newest bytes in memory (`tail.rs`).
pub struct Following {
    /// The fill's progress.
    pub progress: watch::Receiver<Progress>,
    /// The fill's tail, if it keeps one.
    pub tail: Option<Arc<Tail>>,
}

impl From<watch::Receiver<Progress>> for Following {
    fn from(progress: watch::Receiver<Progress>) -> Following {
        Following { progress, tail: None }
    }
}

/// A stream of the bytes `[start, end_exclusive)` of `file`, whose full size is `size`.
/// Following a fill, it never sends the blob's last byte before the fill is verified, so a
/// client never completes a download of wrong content, and it ends with an error (an aborted
/// response) if the fill fails; bytes the fill's tail holds come from memory.
pub fn file_range_stream(
    file: Arc<std::fs::File>,
    start: u64,
    end_exclusive: u64,
    size: u64,
    following: Option<Following>,
    guard: Option<Box<dyn Send + Sync>>,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    range_stream_in(ResponseBuffers::current(), file, (start, end_exclusive, size), following, guard)
}

fn range_stream_in(
    buffers: Arc<ResponseBuffers>,
    file: Arc<std::fs::File>,
    (start, end_exclusive, size): (u64, u64, u64),
    following: Option<Following>,
    guard: Option<Box<dyn Send + Sync>>,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    let (progress, tail) = match following {
        Some(f) => (Some(f.progress), f.tail),
        None => (None, None),
    };
    let state = Reader {
        file,
        pos: start,
        end: end_exclusive,
        size,
        progress,
        tail,
        ahead: None,
        buffers,
        own: Arc::new(Semaphore::new(SMALL)),
        consumed: Arc::new(AtomicU64::new(0)),
        from_memory: 0,
        _guard: guard,
    };
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
    /// The fill's newest bytes, while it runs.
    tail: Option<Arc<Tail>>,
    /// The next chunk, read ahead while the previous one is being sent, so disk reads and
    /// socket writes overlap.
    ahead: Option<(u64, tokio::task::JoinHandle<std::io::Result<Bytes>>)>,
    buffers: Arc<ResponseBuffers>,
    /// The stream's own [`SMALL`] chunk, for when the budget has nothing to spare.
    own: Arc<Semaphore>,
    consumed: Arc<AtomicU64>,
    /// Bytes this stream took from the fill's tail (for its closing debug line).
    from_memory: u64,
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        if self.from_memory > 0 {
            tracing::debug!(
                from_memory = self.from_memory,
                at = self.pos,
                end = self.end,
                "a reader of a fill ended; bytes it took from the fill's memory tail"
            );
        }
    }
}

impl Reader {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let task = match self.ahead.take() {
            Some((at, task)) if at == self.pos => task,
            _ => {
                let readable = match self.readable().await? {
                    Next::Memory(bytes) => {
                        self.pos += bytes.len() as u64;
                        self.from_memory += bytes.len() as u64;
                        return Ok(Some(bytes));
                    }
                    Next::File(readable) => readable,
                };
                let (want, permit) = self.buffer_for(readable - self.pos).await?;
                self.spawn_read(self.pos, want, permit)
            }
        };
        let buf = task.await.map_err(std::io::Error::other)??;
        self.pos += buf.len() as u64;
        // Read ahead only for a client that takes full chunks, and only with budget to spare:
        // the next chunk is read while the server writes this one.
        if self.pos < self.end
            && self.grant() == CHUNK
            && let Some(readable) = self.readable_now()?
        {
            let want = (readable - self.pos).min(CHUNK as u64) as usize;
            if let Some(permit) = self.buffers.try_take(want) {
                self.ahead = Some((self.pos, self.spawn_read(self.pos, want, permit)));
            }
        }
        Ok(Some(buf))
    }

    /// The largest chunk this stream may take from the budget: what its client has consumed,
    /// rounded up to a power of two, between [`SMALL`] and [`CHUNK`].
    fn grant(&self) -> usize {
        let consumed = usize::try_from(self.consumed.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        consumed.max(SMALL).checked_next_power_of_two().unwrap_or(CHUNK).min(CHUNK)
    }

    /// Size and permit of the next read of at most `avail` bytes: from the budget when it has
    /// the stream's grant to spare, else a small chunk: the stream's own, or one from the
    /// budget while that one is out (a consumer that holds a chunk while it asks for the next
    /// must not wait for itself), or, with neither, the first of the two to come back (the
    /// backpressure on a client that reads nothing).
    async fn buffer_for(&self, avail: u64) -> std::io::Result<(usize, OwnedSemaphorePermit)> {
        let want = avail.min(self.grant() as u64) as usize;
        if want > SMALL
            && let Some(permit) = self.buffers.try_take(want)
        {
            return Ok((want, permit));
        }
        let want = want.min(SMALL);
        // `want` ≤ SMALL fits in u32.
        let n = want as u32;
        if let Ok(permit) = self.own.clone().try_acquire_many_owned(n) {
            return Ok((want, permit));
        }
        if let Some(permit) = self.buffers.try_take(want) {
            return Ok((want, permit));
        }
        let permit = tokio::select! {
            p = self.own.clone().acquire_many_owned(n) => p,
            p = self.buffers.budget.clone().acquire_many_owned(n) => p,
        };
        // Neither semaphore is ever closed.
        Ok((want, permit.map_err(|_| std::io::Error::other("response buffer closed"))?))
    }

    /// How far may be read from the file without waiting.
    fn readable_now(&mut self) -> std::io::Result<Option<u64>> {
        Ok(match self.next_now(false)? {
            Some(Next::File(readable)) => Some(readable),
            _ => None,
        })
    }

    /// Where the next bytes come from without waiting: the fill's tail (if `use_tail`, for a
    /// client that takes full chunks, with budget to spare), else the file as far as it is
    /// written.
    fn next_now(&mut self, use_tail: bool) -> std::io::Result<Option<Next>> {
        let Some(rx) = self.progress.as_mut() else { return Ok(Some(Next::File(self.end))) };
        let p = rx.borrow_and_update().clone();
        match p {
            Progress::Verified => {
                self.progress = None;
                self.tail = None;
                Ok(Some(Next::File(self.end)))
            }
            Progress::Failed(reason) => Err(std::io::Error::other(format!("blob fill failed: {reason}"))),
            Progress::Running { written, .. } => {
                // Hold back the final byte until the digest is verified.
                let allowed = self.size.saturating_sub(1).min(self.end);
                if use_tail && let Some(bytes) = self.take_from_tail(allowed) {
                    return Ok(Some(Next::Memory(bytes)));
                }
                let on_disk = written.min(allowed);
                Ok((on_disk > self.pos).then_some(Next::File(on_disk)))
            }
        }
    }

    /// The tail's bytes at the reader's position, below `limit`. Only for a client that has
    /// shown it reads (its grant is a full chunk): a slice pins the fill's receive buffer, which
    /// a client that reads nothing must not do (the memory ceiling, README).
    fn take_from_tail(&self, limit: u64) -> Option<Bytes> {
        let tail = self.tail.as_ref()?;
        if self.grant() < CHUNK {
            return None;
        }
        let bytes = tail.get(self.pos, limit, CHUNK)?;
        let permit = self.buffers.try_take(bytes.len())?;
        Some(Bytes::from_owner(Chunk { buf: bytes, _permit: permit, consumed: self.consumed.clone() }))
    }

    /// Where the next bytes come from, waiting for the fill if needed.
    async fn readable(&mut self) -> std::io::Result<Next> {
        loop {
            if let Some(next) = self.next_now(true)? {
                return Ok(next);
            }
            let Some(rx) = self.progress.as_mut() else { return Ok(Next::File(self.end)) };
            if rx.changed().await.is_err() {
                // The fill task ended without a final state: treat as failure.
                return Err(std::io::Error::other("blob fill ended unexpectedly"));
            }
        }
    }

    fn spawn_read(
        &self,
        pos: u64,
        want: usize,
        permit: OwnedSemaphorePermit,
    ) -> tokio::task::JoinHandle<std::io::Result<Bytes>> {
        let file = self.file.clone();
        let consumed = self.consumed.clone();
        blocking::spawn(Lane::Reads, move || {
            let buf = read_exact_at(&file, pos, want)?;
            Ok(Bytes::from_owner(Chunk { buf, _permit: permit, consumed }))
        })
    }
}

/// Where a reader's next bytes come from.
enum Next {
    /// These bytes, from the fill's tail.
    Memory(Bytes),
    /// The file, up to this offset.
    File(u64),
}

fn read_exact_at(file: &std::fs::File, pos: u64, want: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; want];
    let mut filled = 0;
    while filled < want {
        let n = file.read_at(&mut buf[filled..], pos + filled as u64)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob file shorter than expected"));
        }
        filled += n;
    }
    Ok(buf)
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
    use std::time::Duration;

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
        let (tx, rx) = watch::channel(Progress::Running { written: 0, accepted: 0 });
        let reader = tokio::spawn(collect(file_range_stream(file, 0, 6, 6, Some(rx.into()), None)));
        w.write_all(b"abc").unwrap();
        tx.send(Progress::Running { written: 3, accepted: 3 }).unwrap();
        w.write_all(b"def").unwrap();
        tx.send(Progress::Running { written: 6, accepted: 6 }).unwrap();
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
        let mut s = file_range_stream(file, 0, data.len() as u64, data.len() as u64, Some(rx.into()), None);
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
        let (tx, rx) = watch::channel(Progress::Running { written: 6, accepted: 6 });
        let reader = tokio::spawn(collect(file_range_stream(file, 2, 6, 6, Some(rx.into()), None)));
        tx.send(Progress::Failed("digest mismatch".into())).unwrap();
        assert!(reader.await.unwrap().is_err());
    }

    fn noise_file(len: usize) -> (tempfile::TempDir, Arc<std::fs::File>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        (dir, file, data)
    }

    #[tokio::test]
    async fn a_client_that_stops_taking_chunks_holds_no_more_than_the_budget() {
        let (_dir, file, data) = noise_file(8 << 20);
        let len = data.len() as u64;
        let buffers = ResponseBuffers::new(2 << 20);
        let mut s = range_stream_in(buffers.clone(), file, (0, len, len), None, None);
        // The server's write buffer of a client that reads nothing: chunks pile up, unwritten.
        let mut held = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_millis(300), s.next()).await {
                Ok(Some(chunk)) => held.push(chunk.unwrap()),
                Ok(None) => panic!("the whole blob was buffered"),
                Err(_) => break,
            }
        }
        let held_bytes: usize = held.iter().map(Bytes::len).sum();
        assert!(held_bytes <= buffers.max_bytes() + SMALL, "{held_bytes} bytes buffered");
        assert!(held.iter().all(|c| c.len() <= SMALL), "a client that took nothing got a big chunk");
        // Written at last: the stream goes on to the end with the right bytes.
        let mut got: Vec<u8> = held.iter().flat_map(|c| c.iter().copied()).collect();
        drop(held);
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), s.next()).await.unwrap() {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert!(got == data, "wrong bytes");
        assert_eq!(buffers.held(), 0, "budget not given back");
    }

    #[tokio::test]
    async fn a_client_that_reads_grows_to_full_chunks_while_the_budget_allows() {
        let (_dir, file, data) = noise_file(6 << 20);
        let len = data.len() as u64;
        let buffers = ResponseBuffers::new(4 << 20);
        let sizes = |stream: BoxStream<'static, std::io::Result<Bytes>>| async move {
            stream.map(|c| c.unwrap().len()).collect::<Vec<_>>().await
        };
        let got = sizes(range_stream_in(buffers.clone(), file.clone(), (0, len, len), None, None)).await;
        assert_eq!(got.iter().sum::<usize>(), data.len());
        assert_eq!(got[0], SMALL, "a new client starts small");
        assert!(got.iter().filter(|n| **n == CHUNK).count() >= 4, "never grew: {got:?}");
        // With the budget held elsewhere, a reader still gets everything, in small chunks.
        let hog = buffers.try_take(4 << 20).unwrap();
        let got = sizes(range_stream_in(buffers.clone(), file, (0, len, len), None, None)).await;
        assert_eq!(got.iter().sum::<usize>(), data.len());
        assert!(got.iter().all(|n| *n <= SMALL));
        drop(hog);
        assert_eq!(buffers.held(), 0);
    }

    /// A fill whose first `on_disk` bytes are written and whose tail holds all of `data`.
    fn fill_ahead_of_its_disk(
        data: &[u8],
        on_disk: usize,
    ) -> (tempfile::TempDir, std::fs::File, Arc<std::fs::File>, Arc<Tail>, watch::Sender<Progress>, Following) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = std::fs::File::create(&path).unwrap();
        w.write_all(&data[..on_disk]).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let tail = Arc::new(Tail::new(data.len() as u64));
        for (i, c) in data.chunks(100_000).enumerate() {
            tail.push(i as u64 * 100_000, Bytes::copy_from_slice(c));
        }
        let len = data.len() as u64;
        let (tx, rx) = watch::channel(Progress::Running { written: on_disk as u64, accepted: len });
        (dir, w, file, tail.clone(), tx, Following { progress: rx, tail: Some(tail) })
    }

    #[tokio::test]
    async fn a_reader_that_keeps_pace_gets_bytes_before_the_disk_has_them() {
        let data: Vec<u8> = (0..(4usize << 20)).map(|i| (i * 13 + i / 999) as u8).collect();
        let len = data.len() as u64;
        let (_d, mut w, file, _tail, tx, following) = fill_ahead_of_its_disk(&data, 1 << 20);
        let buffers = ResponseBuffers::new(8 << 20);
        let mut s = range_stream_in(buffers.clone(), file, (0, len, len), Some(following), None);
        let mut got = Vec::new();
        // Everything but the last byte arrives although only 1 MiB is on disk.
        while got.len() < data.len() - 1 {
            let chunk = tokio::time::timeout(Duration::from_secs(10), s.next()).await;
            got.extend_from_slice(&chunk.expect("stalled while the tail had the bytes").unwrap().unwrap());
        }
        assert_eq!(got.len(), data.len() - 1, "the last byte went out before verification");
        assert!(tokio::time::timeout(Duration::from_millis(100), s.next()).await.is_err());
        w.write_all(&data[1 << 20..]).unwrap();
        tx.send(Progress::Verified).unwrap();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), s.next()).await.unwrap() {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert!(got == data, "wrong bytes");
        assert_eq!(buffers.held(), 0, "budget not given back");
    }

    #[tokio::test]
    async fn a_client_that_has_not_read_gets_nothing_from_the_tail() {
        let data = vec![5u8; 2 << 20];
        let len = data.len() as u64;
        let (_d, _w, file, _tail, _tx, following) = fill_ahead_of_its_disk(&data, 0);
        let mut s = range_stream_in(ResponseBuffers::new(8 << 20), file, (0, len, len), Some(following), None);
        // It waits for the disk: a slice of the tail would pin the fill's receive buffer.
        assert!(tokio::time::timeout(Duration::from_millis(200), s.next()).await.is_err());
    }

    #[tokio::test]
    async fn a_failed_fill_ends_a_tail_reader_with_an_error() {
        let data = vec![9u8; 3 << 20];
        let len = data.len() as u64;
        let (_d, _w, file, _tail, tx, following) = fill_ahead_of_its_disk(&data, 1 << 20);
        let mut s = range_stream_in(ResponseBuffers::new(8 << 20), file, (0, len, len), Some(following), None);
        let mut got = 0;
        while got < (2 << 20) {
            got += s.next().await.unwrap().unwrap().len();
        }
        tx.send(Progress::Failed("digest mismatch".into())).unwrap();
        let mut ended_with_error = false;
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), s.next()).await.unwrap() {
            if chunk.is_err() {
                ended_with_error = true;
                break;
            }
        }
        assert!(ended_with_error, "a failed fill's reader ended as if complete");
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
