//! The node-local content store: content-addressed files under `<root>/blobs/<alg>/<hex>`.
//!
//! Content enters only through [`TempBlob::commit`], which checks digest and size of what was
//! written and then renames the temp file into place, so a reader never sees a partial or wrong
//! blob, and a crash leaves at most a stray temp file (removed at the next start).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use facade_oci::{Digest, DigestHasher};

use crate::error::{Error, Result};

/// A content-addressed store on local disk.
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    /// Opens (creating) the store at `root` and removes temp files a previous run left behind.
    pub fn open(root: &Path) -> Result<Self> {
        for dir in [root.join("blobs/sha256"), root.join("blobs/sha512"), root.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let tmp = root.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(LocalStore { root: root.to_path_buf() })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives. Only verifiable digests have a place; their encoded part is validated
    /// hex, so no digest can name a path outside the store.
    pub fn path_of(&self, digest: &Digest) -> Option<PathBuf> {
        if !digest.is_verifiable() {
            return None;
        }
        Some(self.root.join("blobs").join(digest.algorithm()).join(digest.encoded()))
    }

    /// Opens a stored blob whose size is `size`. A file of another size is not the blob (the
    /// store was tampered with) and is removed.
    pub fn open_blob(&self, digest: &Digest, size: u64) -> Option<std::fs::File> {
        let path = self.path_of(digest)?;
        let file = std::fs::File::open(&path).ok()?;
        match file.metadata() {
            Ok(m) if m.len() == size => Some(file),
            Ok(m) => {
                tracing::warn!(%digest, expected = size, found = m.len(), "stored blob has the wrong size; removing it");
                let _ = std::fs::remove_file(&path);
                None
            }
            Err(_) => None,
        }
    }

    /// Whether the store holds `digest`.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path_of(digest).is_some_and(|p| p.is_file())
    }

    /// A new temp file to write a blob into.
    pub fn temp_blob(&self, digest: &Digest) -> Result<TempBlob> {
        TempBlob::create(&self.root.join("tmp"), digest)
    }

    /// Stores bytes already in memory (verified first).
    pub fn put_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut t = self.temp_blob(digest)?;
        t.write_all(bytes)?;
        t.commit(self, digest, bytes.len() as u64)
    }
}

/// A blob being written. Dropped without [`TempBlob::commit`], its file is removed.
pub struct TempBlob {
    path: PathBuf,
    file: Option<std::fs::File>,
    hasher: Option<DigestHasher>,
    written: u64,
}

impl TempBlob {
    /// Creates a temp file in `dir` for a blob of `digest` (named so operators can tell).
    pub fn create(dir: &Path, digest: &Digest) -> Result<TempBlob> {
        let hasher = digest.hasher().ok_or_else(|| Error::io(format!("cannot verify {digest}"), std::io::ErrorKind::InvalidInput.into()))?;
        let name = format!(
            "{}-{}-{}",
            &digest.encoded()[..12.min(digest.encoded().len())],
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(TempBlob { path, file: Some(file), hasher: Some(hasher), written: 0 })
    }

    /// The temp file's path (readers of an in-flight fill open it themselves).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends bytes.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let file = self.file.as_mut().ok_or_else(|| Error::io("temp blob already closed", std::io::ErrorKind::Other.into()))?;
        file.write_all(data).map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(data);
        }
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks size and digest of what was written and, only if both match, syncs and renames
    /// it into the store. On a mismatch the file is removed and nothing enters the store.
    pub fn commit(mut self, store: &LocalStore, digest: &Digest, size: u64) -> Result<()> {
        let actual = self.finish_hash();
        if self.written != size || actual != *digest {
            return Err(Error::DigestMismatch { expected: digest.clone(), actual, size: self.written });
        }
        let dest = store
            .path_of(digest)
            .ok_or_else(|| Error::io(format!("cannot store {digest}"), std::io::ErrorKind::InvalidInput.into()))?;
        if let Some(file) = self.file.take() {
            // Data must be on disk before the name says the blob is there: a crash between
            // rename and writeback would otherwise leave a short file under a digest name.
            file.sync_data().map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        }
        std::fs::rename(&self.path, &dest).map_err(|e| Error::io(format!("renaming into {}", dest.display()), e))?;
        self.path = PathBuf::new();
        Ok(())
    }

    /// The digest of everything written (consumes the hasher).
    fn finish_hash(&mut self) -> Digest {
        match self.hasher.take() {
            Some(h) => h.finish(),
            None => Digest::sha256_of(b""),
        }
    }

    /// Verifies what was written without storing it (for spools that are not kept).
    pub fn verify(mut self, digest: &Digest, size: u64) -> Result<()> {
        let actual = self.finish_hash();
        if self.written != size || actual != *digest {
            return Err(Error::DigestMismatch { expected: digest.clone(), actual, size: self.written });
        }
        Ok(())
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_verified_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        store.put_bytes(&d, b"hello").unwrap();
        assert!(store.contains(&d));
        assert!(store.open_blob(&d, 5).is_some());

        let wrong = Digest::sha256_of(b"other");
        let mut t = store.temp_blob(&wrong).unwrap();
        t.write_all(b"hello").unwrap();
        let tmp_path = t.path().to_path_buf();
        assert!(matches!(t.commit(&store, &wrong, 5), Err(Error::DigestMismatch { .. })));
        assert!(!store.contains(&wrong));
        assert!(!tmp_path.exists(), "temp file left behind");
    }

    #[test]
    fn short_content_is_rejected_and_dropped_temp_files_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        let mut t = store.temp_blob(&d).unwrap();
        t.write_all(b"hel").unwrap();
        assert!(t.commit(&store, &d, 5).is_err());
        let t = store.temp_blob(&d).unwrap();
        let p = t.path().to_path_buf();
        drop(t);
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn wrong_sized_files_are_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        store.put_bytes(&d, b"hello").unwrap();
        assert!(store.open_blob(&d, 6).is_none());
        assert!(!store.contains(&d));
    }

    #[test]
    fn unverifiable_digests_have_no_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        assert!(store.path_of(&Digest::parse("md5x:abc").unwrap()).is_none());
    }

    #[test]
    fn stale_temp_files_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        LocalStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/leftover"), b"x").unwrap();
        LocalStore::open(dir.path()).unwrap();
        assert!(!dir.path().join("tmp/leftover").exists());
    }
}
