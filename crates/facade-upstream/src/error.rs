//! What can go wrong talking to an upstream registry, classified so callers decide retry and
//! fall-through from [`Error::kind`] and [`Error::is_retryable`], never from strings.
//!
//! No variant carries a URL (redirect targets hold signed query strings), a header value or a
//! credential: only the host, the status and our own words.

use std::time::Duration;

use facade_oci::Digest;

/// A boxed foreign error kept as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An upstream failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client configuration is unusable (bad CA bundle, TLS setup).
    #[error("invalid upstream client configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// A docker `config.json` cannot be read.
    #[error("invalid docker config.json: {reason}")]
    DockerConfig {
        /// What is wrong (never a credential).
        reason: String,
    },
    /// A registry host that cannot be put in a URL.
    #[error("invalid registry host {host:?}")]
    InvalidHost {
        /// The host as given (clipped).
        host: String,
    },
    /// TCP or TLS connection setup failed.
    #[error("{host}: cannot connect")]
    Connect {
        /// Upstream host.
        host: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The TLS handshake refused the peer: a certificate no configured CA vouches for, a
    /// name mismatch, no common protocol. Not retried: the next handshake would end the same.
    #[error("{host}: TLS handshake failed")]
    Tls {
        /// Upstream host.
        host: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The connection failed after it was set up (reset, protocol error, broken body).
    #[error("{host}: transport error")]
    Transport {
        /// Upstream host.
        host: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// No answer within the deadline (whole request for metadata, headers for blobs).
    #[error("{host}: no answer within {timeout:?}")]
    Timeout {
        /// Upstream host.
        host: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// A blob body delivered no bytes for `timeout`.
    #[error("{host}: blob body stalled for {timeout:?} at byte {offset}")]
    Stalled {
        /// Upstream host.
        host: String,
        /// Blob offset reached when the stall was detected.
        offset: u64,
        /// The read timeout.
        timeout: Duration,
    },
    /// The body ended before `Content-Length` bytes arrived.
    #[error("{host}: body ended after {received} of {expected} bytes")]
    ShortBody {
        /// Upstream host.
        host: String,
        /// Bytes received in this response.
        received: u64,
        /// Bytes promised by `Content-Length`.
        expected: u64,
    },
    /// Upstream answered 404.
    #[error("{host}: {what} not found")]
    NotFound {
        /// Upstream host.
        host: String,
        /// What was asked for (`manifest <ref> in <repo>`, `blob <digest>`).
        what: String,
    },
    /// Upstream wants credentials we do not have, or refused the ones we sent.
    #[error("{host}: unauthorized ({reason})")]
    Unauthorized {
        /// Upstream host (registry or token realm).
        host: String,
        /// HTTP status that said so.
        status: u16,
        /// Why, in our words.
        reason: &'static str,
    },
    /// Upstream answered 403.
    #[error("{host}: access denied")]
    Denied {
        /// Upstream host.
        host: String,
    },
    /// Upstream answered 429.
    #[error("{host}: too many requests")]
    RateLimited {
        /// Upstream host.
        host: String,
        /// `Retry-After`, when given in seconds.
        retry_after: Option<Duration>,
    },
    /// The address policy refused an upstream address or redirect (link-local, metadata, the
    /// facade's own listeners, denied ranges, a public origin redirecting inward).
    #[error("{host}: {reason}")]
    Refused {
        /// Upstream host (of the first request).
        host: String,
        /// Which rule.
        reason: String,
    },
    /// Any other unexpected status.
    #[error("{host}: unexpected status {status}")]
    Status {
        /// Upstream host.
        host: String,
        /// The status.
        status: u16,
        /// `Retry-After` on 503, when given in seconds.
        retry_after: Option<Duration>,
    },
    /// Upstream broke the protocol: garbage JSON, unknown media type, missing headers.
    #[error("{host}: protocol error: {reason}")]
    Protocol {
        /// Upstream host.
        host: String,
        /// What was wrong.
        reason: String,
    },
    /// Content does not hash to its digest.
    #[error("{host}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Upstream host.
        host: String,
        /// The digest asked for or announced.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// A metadata body is larger than `Config::max_metadata_bytes`.
    #[error("{host}: body larger than {limit} bytes")]
    TooLarge {
        /// Upstream host.
        host: String,
        /// The bound.
        limit: u64,
    },
    /// More than the allowed number of redirects.
    #[error("{host}: too many redirects")]
    TooManyRedirects {
        /// Upstream host of the first request.
        host: String,
    },
    /// A ranged request was answered with the whole blob (200); the caller may skip `offset`
    /// bytes of a fresh stream or give up.
    #[error("{host}: asked for bytes from {offset} but got the whole blob")]
    RangeIgnored {
        /// Upstream host.
        host: String,
        /// The offset asked for.
        offset: u64,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The class of an error, for the blob chain and the server's error edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Upstream does not have it: fall through, never retry.
    NotFound,
    /// Missing or refused credentials.
    Unauthorized,
    /// Credentials accepted but access refused.
    Denied,
    /// Upstream throttles us; see [`Error::retry_after`].
    RateLimited,
    /// Transient: connection, timeout, stall, 5xx.
    Unavailable,
    /// Upstream answered something that breaks the protocol or the content's digest.
    Protocol,
    /// Our own input or configuration is wrong.
    Invalid,
}

/// Upstream host and status of an error, for the `detail` of an OCI error body.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ErrorDetail {
    /// The upstream host involved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The HTTP status upstream answered, if it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config { .. } | Error::DockerConfig { .. } | Error::InvalidHost { .. } => ErrorKind::Invalid,
            Error::Connect { .. }
            | Error::Transport { .. }
            | Error::Timeout { .. }
            | Error::Stalled { .. }
            | Error::ShortBody { .. } => ErrorKind::Unavailable,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Unauthorized { .. } => ErrorKind::Unauthorized,
            Error::Denied { .. } | Error::Refused { .. } => ErrorKind::Denied,
            Error::RateLimited { .. } => ErrorKind::RateLimited,
            Error::Status { status, .. } if *status >= 500 => ErrorKind::Unavailable,
            Error::Status { .. }
            | Error::Protocol { .. }
            | Error::DigestMismatch { .. }
            | Error::TooLarge { .. }
            | Error::TooManyRedirects { .. }
            | Error::RangeIgnored { .. }
            | Error::Tls { .. } => ErrorKind::Protocol,
        }
    }

    /// Whether trying the same request again may succeed: transport failures, timeouts,
    /// stalls, short bodies, 429, 502, 503 and 504. Never a 404, a 400, a 401 or 403, a bad
    /// media type, a digest mismatch or a refused TLS handshake.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Transport { .. }
            | Error::Timeout { .. }
            | Error::Stalled { .. }
            | Error::ShortBody { .. }
            | Error::RateLimited { .. } => true,
            Error::Status { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }

    /// How long upstream asked us to wait (429 and 503 with `Retry-After` in seconds).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } | Error::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The upstream host and the status it answered, for error bodies.
    pub fn detail(&self) -> ErrorDetail {
        let (host, status) = match self {
            Error::Config { .. } | Error::DockerConfig { .. } => (None, None),
            Error::InvalidHost { host } => (Some(host), None),
            Error::Connect { host, .. }
            | Error::Tls { host, .. }
            | Error::Transport { host, .. }
            | Error::Timeout { host, .. }
            | Error::Stalled { host, .. }
            | Error::ShortBody { host, .. }
            | Error::Protocol { host, .. }
            | Error::DigestMismatch { host, .. }
            | Error::TooLarge { host, .. }
            | Error::TooManyRedirects { host }
            | Error::RangeIgnored { host, .. }
            | Error::Refused { host, .. } => (Some(host), None),
            Error::NotFound { host, .. } => (Some(host), Some(404)),
            Error::Unauthorized { host, status, .. } => (Some(host), Some(*status)),
            Error::Denied { host } => (Some(host), Some(403)),
            Error::RateLimited { host, .. } => (Some(host), Some(429)),
            Error::Status { host, status, .. } => (Some(host), Some(*status)),
        };
        ErrorDetail { upstream: host.cloned(), status }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses() {
        let st = |status| Error::Status { host: "h".into(), status, retry_after: None };
        assert!(st(502).is_retryable() && st(503).is_retryable() && st(504).is_retryable());
        assert!(!st(500).is_retryable());
        assert_eq!(st(500).kind(), ErrorKind::Unavailable);
        assert_eq!(st(400).kind(), ErrorKind::Protocol);
        assert!(!st(400).is_retryable());
        let nf = Error::NotFound { host: "h".into(), what: "blob".into() };
        assert_eq!(nf.kind(), ErrorKind::NotFound);
        assert!(!nf.is_retryable());
        assert_eq!(nf.detail(), ErrorDetail { upstream: Some("h".into()), status: Some(404) });
        let rl = Error::RateLimited { host: "h".into(), retry_after: Some(Duration::from_secs(7)) };
        assert!(rl.is_retryable());
        assert_eq!(rl.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(serde_json::to_string(&rl.detail()).unwrap(), r#"{"upstream":"h","status":429}"#);
    }
}
