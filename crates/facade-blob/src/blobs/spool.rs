//! The spool of one fill: bytes arrive from the network on a runtime worker and are written and
//! hashed on the blocking pool, in batches, while the next batch downloads.
//!
//! Writing and hashing a 256 MiB layer on a runtime worker stalled every other request served
//! by that worker (the cold path ran at 0.4x of the upstream's speed, bench/RESULTS.md). A
//! batch is handed to the blocking pool when it reaches [`BATCH`] bytes, or earlier when the
//! network has nothing more right now ([`Spool::flush`]), so a trickle still reaches readers.
//! At most one batch is being written at a time: the next waits for it, which keeps the file's
//! byte order and bounds the memory a fast upstream can pile up to two batches.
//!
//! The spool is the fill's one interface to the store: reserve ([`Spool::reserve`]), append,
//! verify ([`Spool::verify`]), then commit ([`Spool::commit`]) or drop (the temp file goes).

use std::path::Path;

use bytes::Bytes;
use facade_oci::Digest;

use crate::error::{Error, Result};
use crate::store::{LocalStore, Reservation, TempBlob, is_no_space};

/// Bytes collected before a write is handed to the blocking pool.
pub const BATCH: usize = 1 << 20;

/// A temp blob being written off the runtime's workers.
pub struct Spool {
    /// `None` while a batch is being written (the blocking task owns it then).
    temp: Option<TempBlob>,
    writing: Option<tokio::task::JoinHandle<(TempBlob, Result<()>)>>,
    pending: Vec<Bytes>,
    pending_len: usize,
    /// Bytes appended so far (on disk, being written, or pending).
    accepted: u64,
    /// Bytes on disk: readers may read this far.
    written: u64,
    /// A write that failed: every later call answers it.
    broken: Option<String>,
    /// The write failed because the disk is full (ENOSPC, EDQUOT).
    out_of_space: bool,
    /// The spool's room in the store's disk budget, released when the spool goes (after its
    /// commit has added the blob to the store's total, or with its file).
    _reservation: Option<Reservation>,
}

impl Spool {
    /// A spool for `digest`: in the store's temp directory when there is a store (so a commit
    /// is a rename), holding the store's `reservation` for it; else in `spool_dir`.
    pub fn reserve(
        store: Option<&LocalStore>,
        spool_dir: &Path,
        digest: &Digest,
        reservation: Option<Reservation>,
    ) -> Result<Spool> {
        let temp = match store {
            Some(s) => s.temp_blob(digest)?,
            None => TempBlob::create(spool_dir, digest)?,
        };
        let mut spool = Spool::new(temp);
        spool._reservation = reservation;
        Ok(spool)
    }

    /// Whether a write failed because the disk is full.
    pub fn out_of_space(&self) -> bool {
        self.out_of_space
    }

    /// The bytes on disk and their hash state, while the spool still has its file.
    pub fn hashed_prefix(&self) -> Option<(u64, facade_oci::DigestHasher)> {
        self.temp.as_ref().and_then(TempBlob::hashed_prefix)
    }

    fn new(temp: TempBlob) -> Spool {
        Spool {
            temp: Some(temp),
            writing: None,
            pending: Vec::new(),
            pending_len: 0,
            accepted: 0,
            written: 0,
            broken: None,
            out_of_space: false,
            _reservation: None,
        }
    }

    /// The temp file's path (readers open it once, before any rename).
    pub fn path(&self) -> Option<&Path> {
        self.temp.as_ref().map(TempBlob::path)
    }

    /// Bytes appended so far, written or not: the offset a resumed download starts at.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Bytes on disk: how far readers may read.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `bytes`; starts a write when a batch is full (waiting for the previous one).
    pub async fn append(&mut self, bytes: Bytes) -> Result<()> {
        self.check_broken()?;
        self.accepted += bytes.len() as u64;
        self.pending_len += bytes.len();
        self.pending.push(bytes);
        if self.pending_len >= BATCH {
            self.start_write().await?;
        }
        Ok(())
    }

    /// Writes everything appended and waits for it: afterwards `written() == accepted()`.
    pub async fn flush(&mut self) -> Result<u64> {
        if !self.pending.is_empty() {
            self.start_write().await?;
        }
        self.wait().await?;
        Ok(self.written)
    }

    /// Whether a write is under way.
    pub fn is_writing(&self) -> bool {
        self.writing.is_some()
    }

    /// Starts writing what is pending, if nothing is being written: the network went quiet for
    /// a moment, and readers of a trickle must see every byte that arrived without the fill
    /// waiting for the disk (it reads on while the write runs, see [`Spool::write_done`]).
    pub fn kick(&mut self) -> Result<()> {
        self.check_broken()?;
        if self.writing.is_none() && !self.pending.is_empty() {
            self.spawn_write()?;
        }
        Ok(())
    }

    /// Waits for the write under way (none: at once), then starts the next one if bytes wait,
    /// and answers the bytes on disk. Cancel-safe: dropped before the write ends, the write
    /// stays under way, so it can race the next network read in a `select!`.
    pub async fn write_done(&mut self) -> Result<u64> {
        if let Some(task) = self.writing.as_mut() {
            let joined = task.await;
            self.writing = None;
            self.finish_write(joined)?;
        }
        self.kick()?;
        Ok(self.written)
    }

    async fn start_write(&mut self) -> Result<()> {
        self.wait().await?;
        self.spawn_write()
    }

    /// Hands the pending batch to the blocking pool; nothing may be under way.
    fn spawn_write(&mut self) -> Result<()> {
        let Some(mut temp) = self.temp.take() else {
            return Err(Error::Spool { reason: "spool has no file".into() });
        };
        let batch = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        self.writing = Some(crate::blocking::spawn(crate::blocking::Lane::SpoolWrites, move || {
            let result = batch.iter().try_for_each(|b| temp.write_all(b));
            (temp, result)
        }));
        Ok(())
    }

    async fn wait(&mut self) -> Result<()> {
        let Some(task) = self.writing.take() else { return Ok(()) };
        let joined = task.await;
        self.finish_write(joined)
    }

    /// Takes the file back from a finished write task and records how it went.
    fn finish_write(
        &mut self,
        joined: std::result::Result<(TempBlob, Result<()>), tokio::task::JoinError>,
    ) -> Result<()> {
        match joined {
            Ok((temp, result)) => {
                self.written = temp.written();
                self.temp = Some(temp);
                if let Err(e) = result {
                    self.out_of_space = matches!(&e, Error::Io { source, .. } if is_no_space(source));
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => {
                // The temp file went with the task (its drop removed it).
                let reason = format!("spool write task failed: {e}");
                self.broken = Some(reason.clone());
                Err(Error::Spool { reason })
            }
        }
    }

    fn check_broken(&self) -> Result<()> {
        match &self.broken {
            Some(reason) => Err(Error::Spool { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// Flushes, then checks size and digest of everything written. Only after this may a
    /// reader get the blob's last byte.
    pub async fn verify(&mut self, digest: &Digest, size: u64) -> Result<()> {
        self.flush().await?;
        let temp = self.temp.as_mut().ok_or_else(|| Error::Spool { reason: "spool has no file".into() })?;
        temp.check(digest, size)
    }

    /// Syncs and renames the verified spool into `store` (blocking work, on the blocking pool).
    /// Without a store the spool is dropped (and its file removed) once every reader is done.
    pub async fn commit(mut self, store: Option<LocalStore>, digest: &Digest, size: u64) -> Result<()> {
        self.verify(digest, size).await?;
        let (Some(store), Some(temp)) = (store, self.temp.take()) else { return Ok(()) };
        let digest = digest.clone();
        crate::blocking::spawn(crate::blocking::Lane::Commits, move || temp.commit(&store, &digest, size))
            .await
            .map_err(|e| Error::Spool { reason: format!("commit task failed: {e}") })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_in_order_off_the_runtime_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * BATCH + 12345)).map(|i| (i % 251) as u8).collect();
        let digest = Digest::sha256_of(&data);
        let mut spool = Spool::reserve(None, dir.path(), &digest, None).unwrap();
        let path = spool.path().unwrap().to_path_buf();
        for chunk in data.chunks(16 * 1024 + 7) {
            spool.append(Bytes::copy_from_slice(chunk)).await.unwrap();
            assert!(spool.written() <= spool.accepted());
        }
        assert_eq!(spool.accepted(), data.len() as u64);
        assert_eq!(spool.flush().await.unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        spool.verify(&digest, data.len() as u64).await.unwrap();
    }

    #[tokio::test]
    async fn the_hashed_prefix_names_bytes_on_disk_and_their_hash() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(2 * BATCH + 777)).map(|i| (i % 253) as u8).collect();
        let digest = Digest::sha256_of(&data);
        let mut spool = Spool::reserve(None, dir.path(), &digest, None).unwrap();
        let path = spool.path().unwrap().to_path_buf();
        for chunk in data.chunks(100_003) {
            spool.append(Bytes::copy_from_slice(chunk)).await.unwrap();
            spool.flush().await.unwrap();
            let (len, hasher) = spool.hashed_prefix().unwrap();
            assert_eq!(len, spool.written());
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(hasher.finish(), Digest::sha256_of(&on_disk[..len as usize]));
        }
        spool.flush().await.unwrap();
        spool.verify(&digest, data.len() as u64).await.unwrap();
        // A second verification (the commit's) answers the same.
        spool.verify(&digest, data.len() as u64).await.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_size_is_a_size_mismatch_and_wrong_bytes_a_digest_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::sha256_of(b"hello");
        let mut spool = Spool::reserve(None, dir.path(), &digest, None).unwrap();
        spool.append(Bytes::from_static(b"hell")).await.unwrap();
        assert!(matches!(spool.verify(&digest, 5).await, Err(Error::SizeMismatch { expected: 5, actual: 4, .. })));

        let mut spool = Spool::reserve(None, dir.path(), &digest, None).unwrap();
        spool.append(Bytes::from_static(b"jello")).await.unwrap();
        match spool.verify(&digest, 5).await {
            Err(Error::DigestMismatch { expected, actual, .. }) => assert_ne!(expected, actual),
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn commits_into_the_store_and_dropping_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let digest = Digest::sha256_of(b"hello");
        let mut spool = Spool::reserve(Some(&store), dir.path(), &digest, None).unwrap();
        spool.append(Bytes::from_static(b"hello")).await.unwrap();
        spool.commit(Some(store.clone()), &digest, 5).await.unwrap();
        assert!(store.contains(&digest));

        let other = Digest::sha256_of(b"other");
        let mut spool = Spool::reserve(Some(&store), dir.path(), &other, None).unwrap();
        spool.append(Bytes::from_static(b"oth")).await.unwrap();
        spool.flush().await.unwrap();
        let path = spool.path().unwrap().to_path_buf();
        assert!(path.exists());
        drop(spool);
        assert!(!path.exists(), "an abandoned spool left its file");
    }
}
