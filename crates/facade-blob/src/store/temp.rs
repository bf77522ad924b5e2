//! A blob being written into the store: hashed as it is written, and renamed into place only
//! after its size and digest check out.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use facade_oci::{Digest, DigestHasher};

use super::LocalStore;
use crate::error::{Error, Result};

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A blob being written. Dropped without [`TempBlob::commit`], its file is removed.
pub struct TempBlob {
    path: PathBuf,
    file: Option<std::fs::File>,
    hasher: Option<DigestHasher>,
    written: u64,
    verified: Option<Digest>,
}

impl TempBlob {
    /// Creates a temp file in `dir` for a blob of `digest` (named so operators can tell).
    pub fn create(dir: &Path, digest: &Digest) -> Result<TempBlob> {
        let hasher = digest
            .hasher()
            .ok_or_else(|| Error::io(format!("cannot verify {digest}"), std::io::ErrorKind::InvalidInput.into()))?;
        let name = format!(
            "{}-{}-{}",
            &digest.encoded()[..12.min(digest.encoded().len())],
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(TempBlob { path, file: Some(file), hasher: Some(hasher), written: 0, verified: None })
    }

    /// The temp file's path (readers of an in-flight fill open it themselves).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The bytes written so far and their hash state (`None` once the hash was finished): what
    /// readers of a fill that hit a full disk need to go on from the origin at this offset and
    /// still verify the whole blob.
    pub fn hashed_prefix(&self) -> Option<(u64, DigestHasher)> {
        self.hasher.clone().map(|h| (self.written, h))
    }

    /// Appends bytes.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| Error::io("temp blob already closed", std::io::ErrorKind::Other.into()))?;
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
        self.check(digest, size)?;
        let dest = store
            .path_of(digest)
            .ok_or_else(|| Error::io(format!("cannot store {digest}"), std::io::ErrorKind::InvalidInput.into()))?;
        if let Some(file) = self.file.take() {
            // Data must be on disk before the name says the blob is there: a crash between
            // rename and writeback would otherwise leave a short file under a digest name.
            file.sync_data().map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        }
        let replaced = std::fs::metadata(&dest).map(|m| m.len()).ok();
        std::fs::rename(&self.path, &dest).map_err(|e| Error::io(format!("renaming into {}", dest.display()), e))?;
        self.path = PathBuf::new();
        if let Some(old) = replaced {
            store.sub_total(old);
        }
        store.committed(size);
        Ok(())
    }

    /// The digest of everything written (consumes the hasher).
    fn finish_hash(&mut self) -> Digest {
        match self.hasher.take() {
            Some(h) => h.finish(),
            None => Digest::sha256_of(b""),
        }
    }

    /// Checks size and digest of everything written (once; later calls answer the same). A fill
    /// releases the last byte to its readers right after this, before the slower sync and
    /// rename of [`TempBlob::commit`].
    pub fn check(&mut self, digest: &Digest, size: u64) -> Result<()> {
        if self.written != size {
            return Err(Error::SizeMismatch { digest: digest.clone(), expected: size, actual: self.written });
        }
        if let Some(verified) = &self.verified {
            return if verified == digest {
                Ok(())
            } else {
                Err(Error::DigestMismatch { expected: digest.clone(), actual: verified.clone(), size: self.written })
            };
        }
        let actual = self.finish_hash();
        if actual != *digest {
            return Err(Error::DigestMismatch { expected: digest.clone(), actual, size: self.written });
        }
        self.verified = Some(actual);
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
