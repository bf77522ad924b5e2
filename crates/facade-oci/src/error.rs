//! Parse and validation failures of OCI values. Every one is the caller's (or upstream's) bad
//! input: none is worth retrying.

/// Why an OCI value was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A digest string is not `algorithm:encoded` or its encoding is wrong for the algorithm.
    #[error("invalid digest {value:?}: {reason}")]
    InvalidDigest {
        /// The offending text (truncated to 200 characters).
        value: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A repository name breaks the distribution-spec grammar.
    #[error("invalid repository name {value:?}: {reason}")]
    InvalidName {
        /// The offending text (truncated).
        value: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A tag breaks the distribution-spec grammar.
    #[error("invalid tag {value:?}")]
    InvalidTag {
        /// The offending text (truncated).
        value: String,
    },
    /// An image reference such as `host/repo:tag@sha256:…` cannot be parsed.
    #[error("invalid image reference {value:?}: {reason}")]
    InvalidImageRef {
        /// The offending text (truncated).
        value: String,
        /// What rule it breaks.
        reason: String,
    },
    /// A manifest, index or config document is not what its media type promises.
    #[error("invalid {what}: {reason}")]
    InvalidDocument {
        /// Which document ("manifest", "index", "config").
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Truncates untrusted text (names, references, labels) to at most `max` bytes at a character
/// boundary, marked with `…`, before it goes into an error message or a log line: a request
/// name can be kilobytes, and an error body or log line must not be.
pub fn clip_untrusted(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s.get(..end).unwrap_or_default())
}

pub(crate) fn clip(s: &str) -> String {
    clip_untrusted(s, 200)
}
