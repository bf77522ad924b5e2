//! Why a composition was refused.
//!
//! Every variant means the inputs cannot make a correct image: the base or an added image is
//! malformed, or a label carries a value that is not allowed. Composing the same inputs again
//! gives the same error, so none is worth retrying, and no other blob source can repair it.

use crate::types::SKIP_N_LABEL;

/// Why [`compose`](crate::compose) or [`skip_n`](crate::skip_n) rejected its input.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The base image's manifest or config cannot be composed on (not an image manifest, no
    /// `rootfs`, layers and diff_ids disagree, config bytes do not match the descriptor, …).
    #[error("invalid base image: {reason}")]
    InvalidBase {
        /// What is wrong with it.
        reason: String,
    },
    /// An added image or layer cannot be appended.
    #[error("invalid addition {label:?}: {reason}")]
    InvalidAddition {
        /// The caller's label of the addition (as in [`Addition`](crate::Addition)).
        label: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The skip-n label's value is not an unsigned decimal of at most 65535.
    /// [`compose`](crate::compose) reports it as [`Error::InvalidAddition`] naming the image.
    #[error("label {SKIP_N_LABEL} has value {value:?}, which is not an unsigned decimal integer up to 65535")]
    InvalidSkipN {
        /// The offending value (clipped).
        value: String,
    },
}

impl Error {
    /// Always `false`: every error is a property of the inputs, so retrying the same inputs
    /// fails the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// Always `true`: the error describes invalid input, never an internal or transient fault.
    pub fn is_invalid_input(&self) -> bool {
        true
    }

    pub(crate) fn base(reason: impl Into<String>) -> Self {
        Error::InvalidBase { reason: reason.into() }
    }

    pub(crate) fn addition(label: &str, reason: impl Into<String>) -> Self {
        Error::InvalidAddition { label: clip(label), reason: reason.into() }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Truncates untrusted text before it goes into an error message.
pub(crate) fn clip(s: &str) -> String {
    facade_oci::clip_untrusted(s, 200)
}
