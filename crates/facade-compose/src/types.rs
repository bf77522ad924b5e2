//! The crate's shared vocabulary: the label and annotation names, the inputs of a composition
//! and its result, and the internal form of an added layer. It depends on no other module of
//! the crate, so every other module can use it without an import cycle.

use facade_oci::Digest;
use facade_oci::media_types::Compression;
use serde_json::{Map, Value};

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

/// One layer an addition contributes, before it is labelled into the target family.
pub(crate) struct AddedLayer<'a> {
    pub(crate) origin: usize,
    pub(crate) label: &'a str,
    /// The descriptor to emit; its `mediaType` is replaced once the family is known.
    pub(crate) descriptor: Map<String, Value>,
    /// The media type the layer had in its image; `None` for a single-layer addition.
    pub(crate) source_media_type: Option<String>,
    pub(crate) compression: Compression,
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    pub(crate) diff_id: Digest,
}
