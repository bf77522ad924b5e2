//! Composition of a workspace image: the base image's manifest and config plus the layers of
//! added images and single layers, turned into new manifest and config bytes (contract §4,
//! OCI rules §2.1–2.3).
//!
//! This crate owns the composition rules: layer order, the skip-n label, the `GITPOD_ENV_*`
//! environment rules, raw-JSON editing of the config (unknown and Docker-only fields survive),
//! the manifest's media-type family and the `io.gitpod.workspace-image.*` annotations.
//!
//! It deliberately does no I/O and nothing async: the caller resolves references, picks the
//! platform out of indexes, fetches manifests and configs, and computes digests of local
//! layer files. The output is a pure function of the input bytes, so every replica produces
//! the same manifest digest for the same inputs.
#![warn(missing_docs)]

use std::collections::BTreeMap;

use facade_oci::Digest;
use facade_oci::media_types::Compression;

mod compose;
mod config;
mod env;
mod error;
mod manifest;
mod order;

pub use compose::compose;
pub use env::apply_env_rules;
pub use error::{Error, Result};
pub use order::{LayerSource, layer_sources};

/// The label by which an added image drops its own first N layers (typically its base image),
/// so that only what the image adds on top ends up in the workspace image.
pub const SKIP_N_LABEL: &str = "skip-n.registry-facade.gitpod.io";

/// Manifest annotation carrying the decimal byte total of the base image's layers; ws-daemon
/// reads it from containerd's content store.
pub const SIZE_ANNOTATION: &str = "io.gitpod.workspace-image.size";

/// Manifest annotation carrying the spec's `base_ref`.
pub const REF_ANNOTATION: &str = "io.gitpod.workspace-image.ref";

/// The base image, already resolved to a single platform.
#[derive(Clone, Copy, Debug)]
pub struct BaseInput<'a> {
    /// The spec's `base_ref` text, recorded in the [`REF_ANNOTATION`] annotation.
    pub base_ref: &'a str,
    /// The single-platform image manifest bytes (never an index).
    pub manifest: &'a [u8],
    /// The manifest's media type from the transport; the document's own `mediaType` wins.
    pub manifest_media_type: &'a str,
    /// The config bytes the manifest's config descriptor points at.
    pub config: &'a [u8],
}

/// Something appended to the base image.
#[derive(Clone, Debug)]
pub enum Addition<'a> {
    /// An image whose layers are appended (static image layer, `ide_ref`, `supervisor_ref`,
    /// `ide_layer_ref`). Its config's `GITPOD_ENV_*` variables edit the environment and its
    /// [`SKIP_N_LABEL`] label drops its first layers.
    Image {
        /// Names the addition in history entries (`registry-facade: <label>`) and errors.
        label: &'a str,
        /// The single-platform image manifest bytes (never an index).
        manifest: &'a [u8],
        /// The manifest's media type from the transport; the document's own `mediaType` wins.
        manifest_media_type: &'a str,
        /// The config bytes the manifest's config descriptor points at.
        config: &'a [u8],
    },
    /// A single layer (static `file` layer, content layer).
    Layer {
        /// Names the addition in history entries (`registry-facade: <label>`) and errors.
        label: &'a str,
        /// The layer's digests, size and compression.
        layer: LayerInput,
    },
}

impl Addition<'_> {
    /// The caller's label of this addition.
    pub fn label(&self) -> &str {
        match self {
            Addition::Image { label, .. } | Addition::Layer { label, .. } => label,
        }
    }
}

/// A single layer to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInput {
    /// Digest of the blob as served.
    pub digest: Digest,
    /// Digest of the uncompressed tar (equal to `digest` for an uncompressed layer).
    pub diff_id: Digest,
    /// Size of the blob as served, in bytes.
    pub size: u64,
    /// Compression of the blob; picks the layer media type.
    pub compression: Compression,
}

/// Where a layer of the composed manifest comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerOrigin {
    /// A layer of the base image.
    Base,
    /// A layer of the addition at this index of the `additions` slice.
    Addition(usize),
}

/// A layer of the composed manifest, for building the digest → blob source index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComposedLayer {
    /// The layer's digest.
    pub digest: Digest,
    /// The layer's size in bytes.
    pub size: u64,
    /// The media type the composed manifest gives the layer.
    pub media_type: String,
    /// Where the layer comes from.
    pub origin: LayerOrigin,
}

/// The composed image. The bytes are final: serve them exactly, under their digests.
#[derive(Clone, Debug)]
pub struct Composed {
    /// The manifest bytes.
    pub manifest: Vec<u8>,
    /// sha256 of [`Composed::manifest`].
    pub manifest_digest: Digest,
    /// The manifest's media type (also its `mediaType` field).
    pub manifest_media_type: &'static str,
    /// The config bytes.
    pub config: Vec<u8>,
    /// sha256 of [`Composed::config`].
    pub config_digest: Digest,
    /// The manifest's layers, in manifest order.
    pub layers: Vec<ComposedLayer>,
}

impl Composed {
    /// A copy of the manifest bytes in a cheaply clonable buffer, for serving.
    pub fn manifest_bytes(&self) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(&self.manifest)
    }

    /// A copy of the config bytes in a cheaply clonable buffer, for serving.
    pub fn config_bytes(&self) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(&self.config)
    }
}

/// The number of leading layers an added image drops, from its config labels: the
/// [`SKIP_N_LABEL`] value, 0 when the label is absent.
///
/// The value is read as the reference facade reads it (Go's `strconv.ParseUint(v, 10, 16)`): an
/// unsigned 16-bit decimal, ASCII digits only (no sign, no spaces), at most 65535; anything
/// else is [`Error::InvalidSkipN`], which fails the composition. A value at or above the
/// image's layer count means "no layers".
pub fn skip_n(labels: &BTreeMap<String, String>) -> Result<usize> {
    let Some(value) = labels.get(SKIP_N_LABEL) else {
        return Ok(0);
    };
    let invalid = || Error::InvalidSkipN { value: error::clip(value) };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    value.parse::<u16>().map(usize::from).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: Option<&str>) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("other".to_string(), "x".to_string());
        if let Some(v) = v {
            m.insert(SKIP_N_LABEL.to_string(), v.to_string());
        }
        m
    }

    #[test]
    fn skip_n_is_zero_when_absent() {
        assert_eq!(skip_n(&labels(None)), Ok(0));
        assert_eq!(skip_n(&BTreeMap::new()), Ok(0));
    }

    #[test]
    fn skip_n_reads_unsigned_16_bit_decimals() {
        assert_eq!(skip_n(&labels(Some("0"))), Ok(0));
        assert_eq!(skip_n(&labels(Some("1"))), Ok(1));
        assert_eq!(skip_n(&labels(Some("12"))), Ok(12));
        assert_eq!(skip_n(&labels(Some("007"))), Ok(7));
        assert_eq!(skip_n(&labels(Some("65535"))), Ok(65535));
        assert_eq!(skip_n(&labels(Some("0000065535"))), Ok(65535));
    }

    #[test]
    fn skip_n_rejects_everything_else() {
        for bad in
            ["abc", "-1", "", " 1", "1 ", "1.5", "+", "+3", "+-1", "0x10", "١", "65536", "99999999999999999999999"]
        {
            let err = skip_n(&labels(Some(bad))).unwrap_err();
            assert_eq!(err, Error::InvalidSkipN { value: bad.to_string() }, "{bad:?}");
            let text = err.to_string();
            assert!(text.contains(SKIP_N_LABEL) && text.contains(&format!("{bad:?}")), "{text}");
            assert!(!err.is_retryable());
        }
    }
}
