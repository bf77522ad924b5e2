//! One module per route: `/v2/`, manifests, blobs, tags. Each returns a response or a
//! [`Rejection`]; statuses for failures are decided in `edge.rs` only.

pub(crate) mod base;
pub(crate) mod blob;
pub(crate) mod manifest;
pub(crate) mod tags;

use facade_oci::{Digest, RepoName};
use http::HeaderValue;

use crate::edge::Rejection;

/// Validates the repository name and splits it into (provider, workspace id).
pub(crate) fn split_name(name: &str) -> Result<(String, String), Rejection> {
    let name = RepoName::parse(name).map_err(|e| Rejection::NameInvalid { reason: e.to_string() })?;
    match name.as_str().split_once('/') {
        Some((provider, id)) => Ok((provider.to_string(), id.to_string())),
        None => Err(Rejection::NoWorkspace),
    }
}

/// `"<digest>"`: an entity tag is a quoted string (RFC 9110 §8.8.3).
pub(crate) fn etag(digest: &Digest) -> HeaderValue {
    header_value(&format!("\"{digest}\""))
}

/// A validated digest is `[a-z0-9+._-]:[a-zA-Z0-9=_-]`, always a valid header value.
pub(crate) fn digest_value(digest: &Digest) -> HeaderValue {
    header_value(digest.as_str())
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Truncates untrusted path text for logs (names can be kilobytes).
pub(crate) fn clip(s: &str) -> String {
    facade_oci::clip_untrusted(s, 256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_provider_and_id() {
        assert_eq!(split_name("remote/abc").unwrap(), ("remote".into(), "abc".into()));
        assert_eq!(split_name("fixed/a/b").unwrap(), ("fixed".into(), "a/b".into()));
        assert!(matches!(split_name("remote"), Err(Rejection::NoWorkspace)));
        assert!(matches!(split_name("Remote/x"), Err(Rejection::NameInvalid { .. })));
        assert!(matches!(split_name(&"a/".repeat(200)), Err(Rejection::NameInvalid { .. })));
    }

    #[test]
    fn clips_on_char_boundaries() {
        let s = "é".repeat(300);
        assert!(clip(&s).len() <= 256 + '…'.len_utf8());
        assert_eq!(clip("short"), "short");
    }
}
