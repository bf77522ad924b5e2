//! The newest bytes of a fill, kept in memory so that readers who keep pace with the download
//! get them as they arrive, without waiting for the spool to write and hash them and without
//! reading them back from the file.
//!
//! Before this, every byte of a cold pull went network → spool write and hash → `pread` →
//! socket: the reader saw a batch only after the disk stage finished it, and copied it once
//! more out of the page cache. The cold single-stream pull ran at 0.61× the distribution
//! proxy's speed (bench/RESULTS.md, 2026-12-05 08:25). Now the disk stage runs beside the
//! readers instead of in front of them. The blob's last byte still waits for the digest
//! (read.rs), so a client never completes a download of wrong content.
//!
//! The tail holds the same `Bytes` the spool writes (no copy), at most [`Tail::max_bytes`] of
//! them; a reader that falls further behind reads the file, as before.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

/// Bytes a fill keeps in memory for its readers: two spool batches, about what the spool
/// holds anyway while it writes.
pub const TAIL_BYTES: u64 = 2 * crate::blobs::spool::BATCH as u64;

/// The newest bytes of one fill.
#[derive(Debug)]
pub struct Tail {
    inner: Mutex<Inner>,
    max_bytes: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Chunks in blob order with their offsets; contiguous, the last one ends at `end`.
    chunks: VecDeque<(u64, Bytes)>,
    /// Offset just past the newest byte appended.
    end: u64,
    /// Bytes held.
    held: u64,
    /// No more bytes come (the fill ended): the tail holds nothing from now on.
    closed: bool,
}

impl Tail {
    /// An empty tail keeping at most `max_bytes` (at least the newest chunk is always kept).
    pub fn new(max_bytes: u64) -> Tail {
        Tail { inner: Mutex::new(Inner::default()), max_bytes }
    }

    /// The most it keeps.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends the bytes at offset `at`. A gap (bytes that never reached the tail) empties it
    /// first, so it never serves bytes from a wrong offset.
    pub fn push(&self, at: u64, bytes: Bytes) {
        let mut t = self.lock();
        if t.closed || bytes.is_empty() {
            return;
        }
        if at != t.end {
            t.chunks.clear();
            t.held = 0;
        }
        t.end = at + bytes.len() as u64;
        t.held += bytes.len() as u64;
        t.chunks.push_back((at, bytes));
        while t.held > self.max_bytes && t.chunks.len() > 1 {
            if let Some((_, old)) = t.chunks.pop_front() {
                t.held -= old.len() as u64;
            }
        }
    }

    /// Up to `max` bytes starting at `pos` and ending before `limit`, from one chunk (a slice
    /// of it, no copy); `None` when the tail does not hold `pos`.
    pub fn get(&self, pos: u64, limit: u64, max: usize) -> Option<Bytes> {
        if pos >= limit || max == 0 {
            return None;
        }
        let t = self.lock();
        let i = t.chunks.partition_point(|(at, b)| at + b.len() as u64 <= pos);
        let (at, chunk) = t.chunks.get(i)?;
        if *at > pos {
            return None;
        }
        let from = (pos - at) as usize;
        let to = (chunk.len() as u64).min(limit - at).min((from + max) as u64) as usize;
        Some(chunk.slice(from..to))
    }

    /// The fill ended: drops what the tail holds (readers read the verified file now).
    pub fn close(&self) {
        let mut t = self.lock();
        t.closed = true;
        t.chunks.clear();
        t.held = 0;
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.lock().held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 7) as u8).collect()
    }

    #[test]
    fn keeps_the_newest_bytes_within_its_size() {
        let all = data(100);
        let tail = Tail::new(25);
        for (i, c) in all.chunks(10).enumerate() {
            tail.push(i as u64 * 10, Bytes::copy_from_slice(c));
        }
        assert_eq!(tail.held(), 20);
        assert_eq!(tail.get(79, 100, 100), None, "kept more than its size");
        assert_eq!(&tail.get(80, 100, 100).unwrap()[..], &all[80..90]);
        assert_eq!(&tail.get(85, 100, 3).unwrap()[..], &all[85..88]);
        assert_eq!(&tail.get(95, 99, 100).unwrap()[..], &all[95..99], "went past the limit");
        assert_eq!(tail.get(100, 200, 100), None, "answered past its end");
        tail.close();
        assert_eq!(tail.get(95, 100, 10), None);
        tail.push(100, Bytes::from_static(b"x"));
        assert_eq!(tail.held(), 0, "a closed tail took bytes");
    }

    #[test]
    fn a_gap_empties_it_rather_than_misplacing_bytes() {
        let tail = Tail::new(100);
        tail.push(0, Bytes::from_static(b"abcd"));
        tail.push(10, Bytes::from_static(b"klmn"));
        assert_eq!(tail.get(2, 100, 10), None);
        assert_eq!(&tail.get(11, 100, 10).unwrap()[..], b"lmn");
    }

    #[test]
    fn keeps_one_chunk_larger_than_its_size() {
        let tail = Tail::new(4);
        tail.push(0, Bytes::from_static(b"0123456789"));
        assert_eq!(&tail.get(3, 10, 100).unwrap()[..], b"3456789");
    }

    proptest! {
        /// Whatever the chunking, a read answers exactly the source's bytes at its offset, or
        /// nothing; the newest byte is always there.
        #[test]
        fn answers_the_bytes_at_their_offset(
            sizes in proptest::collection::vec(1usize..50, 1..40),
            max_bytes in 1u64..300,
            probes in proptest::collection::vec((0u64..2000, 0u64..2000, 1usize..80), 1..30),
        ) {
            let total: usize = sizes.iter().sum();
            let all = data(total);
            let tail = Tail::new(max_bytes);
            let mut at = 0;
            for n in &sizes {
                tail.push(at as u64, Bytes::copy_from_slice(&all[at..at + n]));
                at += n;
            }
            prop_assert!(tail.held() <= max_bytes.max(*sizes.last().unwrap() as u64));
            prop_assert!(tail.get(total as u64 - 1, total as u64, 1).is_some());
            for (pos, limit, max) in probes {
                if let Some(b) = tail.get(pos, limit, max) {
                    prop_assert!(!b.is_empty() && b.len() <= max);
                    let (s, e) = (pos as usize, pos as usize + b.len());
                    prop_assert!(e as u64 <= limit && e <= total);
                    prop_assert_eq!(&b[..], &all[s..e]);
                }
            }
        }
    }
}
