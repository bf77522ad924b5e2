//! Media types of the OCI image spec and Docker's schema 2.

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI non-distributable gzip layer (deprecated but still met).
pub const OCI_LAYER_NONDIST_GZIP: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
/// OCI non-distributable uncompressed layer.
pub const OCI_LAYER_NONDIST_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker uncompressed layer (understood by containerd).
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker foreign layer.
pub const DOCKER_LAYER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
/// Docker schema 1 (signed) manifest: not supported as a base.
pub const DOCKER_MANIFEST_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Generic bytes.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Every manifest type the facade asks upstream for, in preference order. A narrow list makes
/// some registries answer 404 (ghcr.io), and Docker Hub needs the OCI types in it.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// The two media-type families a manifest can belong to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Family {
    /// OCI image spec types.
    Oci,
    /// Docker schema 2 types.
    Docker,
}

/// Compression of a layer, as its media type says.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd (no Docker type exists).
    Zstd,
}

/// The compression a layer media type announces, or `None` for an unknown type.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        OCI_LAYER_TAR | OCI_LAYER_NONDIST_TAR | DOCKER_LAYER_TAR => Some(Compression::None),
        OCI_LAYER_GZIP | OCI_LAYER_NONDIST_GZIP | DOCKER_LAYER_GZIP | DOCKER_LAYER_FOREIGN => Some(Compression::Gzip),
        OCI_LAYER_ZSTD => Some(Compression::Zstd),
        _ => None,
    }
}

/// The layer media type of `family` for `compression`; `None` when the family has none (zstd
/// in Docker).
pub fn layer_type(family: Family, compression: Compression) -> Option<&'static str> {
    match (family, compression) {
        (Family::Oci, Compression::None) => Some(OCI_LAYER_TAR),
        (Family::Oci, Compression::Gzip) => Some(OCI_LAYER_GZIP),
        (Family::Oci, Compression::Zstd) => Some(OCI_LAYER_ZSTD),
        (Family::Docker, Compression::None) => Some(DOCKER_LAYER_TAR),
        (Family::Docker, Compression::Gzip) => Some(DOCKER_LAYER_GZIP),
        (Family::Docker, Compression::Zstd) => None,
    }
}

/// The family of a manifest, index or config media type.
pub fn family_of(media_type: &str) -> Option<Family> {
    match media_type {
        OCI_MANIFEST | OCI_INDEX | OCI_CONFIG => Some(Family::Oci),
        DOCKER_MANIFEST | DOCKER_MANIFEST_LIST | DOCKER_CONFIG => Some(Family::Docker),
        _ => None,
    }
}

/// The image-manifest type of a family.
pub fn manifest_type(family: Family) -> &'static str {
    match family {
        Family::Oci => OCI_MANIFEST,
        Family::Docker => DOCKER_MANIFEST,
    }
}

/// The config type of a family.
pub fn config_type(family: Family) -> &'static str {
    match family {
        Family::Oci => OCI_CONFIG,
        Family::Docker => DOCKER_CONFIG,
    }
}

/// Whether `media_type` is an index or manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Whether `media_type` is a single-image manifest.
pub fn is_image_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}
