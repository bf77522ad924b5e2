//! Failures of image resolution and blob serving, with the classification the HTTP edge and the
//! chain decide on (never by matching strings).

use std::time::Duration;

use facade_oci::Digest;

/// What kind of failure, as the edge and the chain see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The workspace, its manifest or the provider does not exist.
    ManifestUnknown,
    /// The blob is not part of this workspace's image, or no source has it.
    BlobUnknown,
    /// Bad input from the caller (or a spec/config that cannot make an image).
    Invalid,
    /// Upstream refused our credentials.
    Denied,
    /// Upstream asks us to slow down.
    RateLimited,
    /// A dependency is down or too slow; retrying later may work.
    Unavailable,
    /// A bug or an unexpected local failure.
    Internal,
    /// The work stopped because nobody waits for it any more.
    Cancelled,
}

/// Why an image or blob could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the spec provider.
    #[error(transparent)]
    Spec(#[from] facade_spec::Error),
    /// From an upstream registry, while doing `context`.
    #[error("{context}: {source}")]
    Upstream {
        /// What was being fetched (image ref or digest).
        context: String,
        /// The upstream failure.
        #[source]
        source: facade_upstream::Error,
    },
    /// Composition rejected the inputs.
    #[error("composing {context}: {source}")]
    Compose {
        /// Which workspace.
        context: String,
        /// Why.
        #[source]
        source: facade_compose::Error,
    },
    /// A manifest digest this workspace never had.
    #[error("manifest {digest} is not a manifest of this workspace")]
    ManifestNotInImage {
        /// The digest asked for.
        digest: Digest,
    },
    /// A blob digest this workspace's image does not contain.
    #[error("blob {digest} is not part of this workspace's image")]
    BlobNotInImage {
        /// The digest asked for.
        digest: Digest,
    },
    /// An image reference resolved to something that cannot be a layer source.
    #[error("image {image}: {reason}")]
    BadImage {
        /// The image reference.
        image: String,
        /// What is wrong.
        reason: String,
    },
    /// Content did not hash to its digest; nothing was cached.
    #[error("content of {expected} hashed to {actual} ({size} bytes); discarded")]
    DigestMismatch {
        /// The digest promised.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
        /// Bytes received.
        size: u64,
    },
    /// Content had another size than its descriptor says; nothing was cached.
    #[error("{digest}: expected {expected} bytes, got {actual}; discarded")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The size promised.
        expected: u64,
        /// The size seen (bytes received, or announced by the origin).
        actual: u64,
    },
    /// A manifest claims a size for a blob the store holds verified with another size. The
    /// verified blob wins: only the claiming workspace's request fails, nothing is removed.
    #[error("blob {digest} is {stored} bytes, but this workspace's manifest says {claimed}")]
    ClaimMismatch {
        /// The blob.
        digest: Digest,
        /// What the workspace's manifest claims.
        claimed: u64,
        /// What the store holds, verified.
        stored: u64,
    },
    /// Writing a fill's spool failed.
    #[error("spool: {reason}")]
    Spool {
        /// Why.
        reason: String,
    },
    /// The local store has no room for a blob now: larger than one blob may be, over the disk
    /// budget, or the disk is full. A fill is not started (the blob is streamed through instead);
    /// a static layer that could not be written answers this until it can.
    #[error("no room in the local store for {digest}: {reason}")]
    NoRoom {
        /// The blob.
        digest: Digest,
        /// Which limit.
        reason: crate::store::PassReason,
    },
    /// A fill stopped because nobody reads it any more and nothing keeps it: not a failure.
    #[error("fill of {digest} cancelled: no readers left")]
    Cancelled {
        /// The blob.
        digest: Digest,
    },
    /// A source's body ended before the blob's last byte, without saying why.
    #[error("body of {digest} ended at byte {offset}")]
    Interrupted {
        /// The blob.
        digest: Digest,
        /// Bytes received in all.
        offset: u64,
    },
    /// A fill ran past its deadline or waited too long for a byte.
    #[error("fill of {digest}: {reason}")]
    FillTimeout {
        /// The blob.
        digest: Digest,
        /// Which limit.
        reason: String,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A failure shared by every caller that waited on the same single-flight work.
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
    /// A cluster-cache dependency (Redis, IPFS) failed. Never reaches a client: the chain falls
    /// through to the next source.
    #[error("{dependency} {context}: {reason}")]
    Cluster {
        /// `redis` or `ipfs`.
        dependency: &'static str,
        /// What was being done.
        context: String,
        /// Why it failed.
        reason: String,
    },
    /// A metric could not be registered (a name registered twice).
    #[error("registering metric {name}: {source}")]
    Metrics {
        /// The metric.
        name: &'static str,
        /// The failure.
        #[source]
        source: prometheus::Error,
    },
    /// A prefetch or warm-up could not be started (no store, too many workspaces at once).
    #[error("prefetch: {reason}")]
    Prefetch {
        /// Why.
        reason: String,
    },
    /// A static layer could not be prepared.
    #[error("static layer {layer}: {reason}")]
    StaticLayer {
        /// Which layer (ref or path).
        layer: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The classification.
    pub fn kind(&self) -> ErrorKind {
        use facade_upstream::ErrorKind as U;
        match self {
            Error::Spec(e) => match e {
                facade_spec::Error::UnknownProvider { .. } | facade_spec::Error::NotFound { .. } => {
                    ErrorKind::ManifestUnknown
                }
                facade_spec::Error::Unavailable { .. } => ErrorKind::Unavailable,
                facade_spec::Error::InvalidSpec { .. } | facade_spec::Error::Config(_) => ErrorKind::Internal,
            },
            Error::Upstream { source, .. } => match source.kind() {
                U::NotFound => ErrorKind::ManifestUnknown,
                U::Unauthorized | U::Denied => ErrorKind::Denied,
                U::RateLimited => ErrorKind::RateLimited,
                U::Unavailable => ErrorKind::Unavailable,
                U::Protocol | U::Invalid => ErrorKind::Unavailable,
            },
            Error::Compose { .. } | Error::BadImage { .. } => ErrorKind::Invalid,
            Error::ManifestNotInImage { .. } => ErrorKind::ManifestUnknown,
            Error::BlobNotInImage { .. } => ErrorKind::BlobUnknown,
            Error::DigestMismatch { .. }
            | Error::SizeMismatch { .. }
            | Error::FillTimeout { .. }
            | Error::Interrupted { .. } => ErrorKind::Unavailable,
            Error::ClaimMismatch { .. } => ErrorKind::Invalid,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
            Error::NoRoom { .. } => ErrorKind::Unavailable,
            Error::Cluster { .. } => ErrorKind::Unavailable,
            Error::Prefetch { .. } => ErrorKind::Unavailable,
            Error::Io { .. } | Error::Spool { .. } | Error::StaticLayer { .. } | Error::Metrics { .. } => {
                ErrorKind::Internal
            }
            Error::Shared(e) => e.kind(),
        }
    }

    /// Whether trying the same source again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Upstream { source, .. } => source.is_retryable(),
            Error::Spec(e) => e.is_retryable(),
            Error::DigestMismatch { .. }
            | Error::SizeMismatch { .. }
            | Error::FillTimeout { .. }
            | Error::Interrupted { .. } => true,
            Error::Shared(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// Retry-After from upstream, when it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Upstream { source, .. } => source.retry_after(),
            Error::Shared(e) => e.retry_after(),
            _ => None,
        }
    }

    /// Structured detail for error bodies: never credentials or raw internals.
    pub fn detail(&self) -> serde_json::Value {
        match self {
            Error::Upstream { context, source } => {
                let d = source.detail();
                let mut m = serde_json::Map::new();
                if let Some(host) = d.upstream {
                    m.insert("upstream".into(), host.into());
                }
                if let Some(status) = d.status {
                    m.insert("status".into(), status.into());
                }
                m.insert("image".into(), serde_json::Value::String(context.clone()));
                serde_json::Value::Object(m)
            }
            Error::BlobNotInImage { digest } | Error::ManifestNotInImage { digest } => {
                serde_json::json!({ "digest": digest.as_str() })
            }
            Error::ClaimMismatch { digest, claimed, stored } => {
                serde_json::json!({ "digest": digest.as_str(), "claimedSize": claimed, "size": stored })
            }
            Error::Shared(e) => e.detail(),
            _ => serde_json::Value::Null,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    pub(crate) fn upstream(context: impl std::fmt::Display, source: facade_upstream::Error) -> Self {
        Error::Upstream { context: context.to_string(), source }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
