//! Static layers from the configuration (`registry.staticLayer`): images whose layers every
//! workspace gets, and local tar files.
//!
//! Image layers are only references here; they are fetched lazily, with retries, when an image is
//! composed, so an unreachable upstream never stops the facade from starting (the reference
//! crash-looped on that). File layers are hashed once when the configuration is loaded and their
//! bytes are kept where the facade owns them (the local store, or memory when there is no store),
//! so a file edited later can never make the facade serve bytes that differ from the digest.

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use facade_oci::media_types::Compression;
use facade_oci::{Digest, DigestHasher, ImageRef};

use crate::error::{Error, Result};
use crate::store::LocalStore;

/// A static layer as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StaticLayerSpec {
    /// All layers of an image.
    Image(ImageRef),
    /// One local `.tar`, `.tar.gz` or `.tar.zst` file.
    File(PathBuf),
}

/// A static layer ready for composition.
#[derive(Clone, Debug)]
pub enum StaticLayer {
    /// All layers of an image (fetched at composition time).
    Image(ImageRef),
    /// A hashed local file.
    File(PreparedFile),
}

/// A local layer file, hashed.
#[derive(Clone, Debug)]
pub struct PreparedFile {
    /// Where it came from (for labels and logs).
    pub path: PathBuf,
    /// Digest of the file.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// File size.
    pub size: u64,
    /// Compression detected from the content (not the file name).
    pub compression: Compression,
    /// The bytes when there is no local store to keep them in.
    pub memory: Option<Bytes>,
}

/// Prepares every configured layer (blocking: hashes files).
pub fn prepare(specs: &[StaticLayerSpec], store: Option<&LocalStore>) -> Result<Vec<StaticLayer>> {
    specs
        .iter()
        .map(|s| match s {
            StaticLayerSpec::Image(r) => Ok(StaticLayer::Image(r.clone())),
            StaticLayerSpec::File(p) => prepare_file(p, store).map(StaticLayer::File),
        })
        .collect()
}

/// Hashes a layer file and keeps its bytes in the store (or memory).
pub fn prepare_file(path: &Path, store: Option<&LocalStore>) -> Result<PreparedFile> {
    let err = |reason: String| Error::StaticLayer { layer: path.display().to_string(), reason };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let compression = detect_compression(&bytes).ok_or_else(|| err("not a tar, tar+gzip or tar+zstd file".into()))?;
    let digest = Digest::sha256_of(&bytes);
    let mut hasher = DigestHasher::sha256();
    let mut buf = vec![0u8; 1 << 16];
    let mut reader: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(&bytes[..]),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&bytes[..])),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(&bytes[..]).map_err(|e| err(format!("zstd: {e}")))?)
        }
    };
    loop {
        let n = reader.read(&mut buf).map_err(|e| err(format!("cannot decompress: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    drop(reader);
    let diff_id = if compression == Compression::None { digest.clone() } else { hasher.finish() };
    let size = bytes.len() as u64;
    let memory = match store {
        Some(s) => {
            // The store is the layer's only source: pinned first, so that no process sharing
            // the store evicts it between the write and the pin.
            let written = s.pin(&digest).and_then(|()| s.put_bytes(&digest, &bytes));
            if let Err(e) = written {
                // A full (or failing) disk must not stop the facade from starting, or it
                // crash-loops while the node needs it: the layer answers 503 until the store's
                // background task has written it.
                tracing::error!(
                    layer = %path.display(), %digest, error = %e,
                    "cannot write a static layer into the local store; it is unavailable until it can be written (retried in the background)"
                );
                if matches!(&e, Error::Io { source, .. } if crate::store::is_no_space(source)) {
                    s.no_space();
                }
                s.add_pending_static(path.to_path_buf(), digest.clone());
            }
            None
        }
        None => Some(Bytes::from(bytes)),
    };
    Ok(PreparedFile { path: path.to_path_buf(), digest, diff_id, size, compression, memory })
}

/// Compression by magic bytes; `None` for content that is none of tar, gzip or zstd.
pub fn detect_compression(b: &[u8]) -> Option<Compression> {
    if b.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if b.len() >= 512 && (b.get(257..262) == Some(b"ustar") || b.iter().take(1024).all(|&c| c == 0)) {
        Some(Compression::None)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_bytes() -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..5].copy_from_slice(b"a.txt");
        h[257..263].copy_from_slice(b"ustar\0");
        let mut v = h;
        v.extend(vec![0u8; 1024]);
        v
    }

    #[test]
    fn hashes_gzip_files_and_keeps_them_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let path = dir.path().join("l.tar.gz");
        std::fs::write(&path, &gz).unwrap();
        let store = LocalStore::open(&dir.path().join("store")).unwrap();
        let f = prepare_file(&path, Some(&store)).unwrap();
        assert_eq!(f.compression, Compression::Gzip);
        assert_eq!(f.digest, Digest::sha256_of(&gz));
        assert_eq!(f.diff_id, Digest::sha256_of(&tar));
        assert!(store.contains(&f.digest));
        assert!(f.memory.is_none());

        let path = dir.path().join("l.tar");
        std::fs::write(&path, &tar).unwrap();
        let f = prepare_file(&path, None).unwrap();
        assert_eq!((f.compression, &f.digest), (Compression::None, &f.diff_id));
        assert_eq!(f.memory.unwrap().len(), tar.len());
    }

    #[test]
    fn rejects_files_that_are_not_layers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"hello").unwrap();
        assert!(prepare_file(&path, None).unwrap_err().to_string().contains("not a tar"));
        assert!(prepare_file(&dir.path().join("missing"), None).is_err());
    }
}
