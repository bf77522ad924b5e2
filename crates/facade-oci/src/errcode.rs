//! The distribution-spec error codes and the `{"errors":[…]}` envelope.

use serde::Serialize;

/// Error codes a response may carry. Spec codes only, plus the de-facto `UNKNOWN` (500) and
/// `UNAVAILABLE` (503) of the docker/distribution set, which the spec leaves undefined for 5xx.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Provided digest did not match uploaded content, or is malformed.
    DigestInvalid,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known to registry.
    NameUnknown,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// The operation is unsupported.
    Unsupported,
    /// Too many requests.
    TooManyRequests,
    /// Requested range not satisfiable (carried with 416; not a spec code, never in a body).
    RangeInvalid,
    /// Unknown error (500).
    Unknown,
    /// Service unavailable (503).
    Unavailable,
}

impl ErrorCode {
    /// The code string of the envelope.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unknown => "UNKNOWN",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }
}

/// `{"errors":[{"code","message","detail"}]}`.
#[derive(Serialize, Debug)]
pub struct ErrorEnvelope {
    /// The errors.
    pub errors: Vec<ErrorEntry>,
}

/// One error of the envelope.
#[derive(Serialize, Debug)]
pub struct ErrorEntry {
    /// The code string.
    pub code: &'static str,
    /// A human message (clients show it in pod events).
    pub message: String,
    /// Structured detail.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl ErrorEnvelope {
    /// A one-error envelope.
    pub fn single(code: ErrorCode, message: impl Into<String>, detail: serde_json::Value) -> Self {
        ErrorEnvelope { errors: vec![ErrorEntry { code: code.as_str(), message: message.into(), detail }] }
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing this struct of strings and a JSON value cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{\"errors\":[]}".to_vec())
    }
}
