//! Spec provider failures, classified so the HTTP edge can answer and callers can decide whether
//! to retry.

/// Why a spec could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The provider name in the URL is not configured.
    #[error("no spec provider named {provider:?}")]
    UnknownProvider {
        /// The name asked for.
        provider: String,
    },
    /// The provider does not know this workspace id (gRPC NOT_FOUND, missing key in the file).
    #[error("spec provider {provider:?} has no workspace {id:?}")]
    NotFound {
        /// Provider name.
        provider: String,
        /// Workspace id.
        id: String,
    },
    /// The provider answered with a spec that cannot describe an image.
    #[error("spec for workspace {id:?} is invalid: {reason}")]
    InvalidSpec {
        /// Workspace id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The provider cannot be reached or did not answer in time; worth retrying.
    #[error("spec provider {provider:?} unavailable: {reason}")]
    Unavailable {
        /// Provider name.
        provider: String,
        /// Transport or status detail (no credentials).
        reason: String,
    },
    /// The spec file or provider configuration is unusable.
    #[error("spec provider configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether asking again (later) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
