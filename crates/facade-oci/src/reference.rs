//! Repository names and manifest references, distribution-spec grammar.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result, clip};

/// A repository name that follows the distribution-spec grammar
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct RepoName(String);

/// Many clients refuse `host/name` beyond 255 characters; the reference facade panicked on
/// longer names, we answer `NAME_INVALID` instead.
pub const MAX_NAME_LEN: usize = 255;

impl RepoName {
    /// Validates a repository name.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidName { value: clip(s), reason };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(bad("longer than 255 characters"));
        }
        for component in s.split('/') {
            if !is_path_component(component) {
                return Err(bad("each path component must be [a-z0-9]+ joined by '.', '_', '__' or '-'"));
            }
        }
        Ok(RepoName(s.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: '.', '_', '__' or '-'+
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Whether `s` is a valid tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..].iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// What follows `/manifests/`: a tag or a digest, never both.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    /// A tag such as `latest`.
    Tag(String),
    /// A content digest.
    Digest(Digest),
}

impl Reference {
    /// Parses a manifest reference. Anything with a `:` is a digest (and must be a valid one);
    /// anything else must be a valid tag.
    pub fn parse(s: &str) -> Result<Self> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        if is_valid_tag(s) { Ok(Reference::Tag(s.to_string())) } else { Err(Error::InvalidTag { value: clip(s) }) }
    }

    /// The digest, if this reference is one.
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names_follow_the_grammar() {
        for ok in ["a", "remote/abc-123", "fixed/demo", "a.b/c__d/e---f", "library/ubuntu", "0/1"] {
            assert!(RepoName::parse(ok).is_ok(), "{ok} rejected");
        }
        for bad in ["", "A", "a/", "/a", "a//b", "a_", "a___b", "a..b", "-a", "a/../b", "a/./b", "a b", "a%2fb"] {
            assert!(RepoName::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
        assert!(RepoName::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert_eq!(Reference::parse("latest").unwrap(), Reference::Tag("latest".into()));
        assert!(matches!(Reference::parse(&format!("sha256:{}", "0".repeat(64))).unwrap(), Reference::Digest(_)));
        assert!(matches!(Reference::parse(".INVALID_MANIFEST_NAME"), Err(Error::InvalidTag { .. })));
        assert!(matches!(Reference::parse("sha256:totallywrong"), Err(Error::InvalidDigest { .. })));
        assert!(Reference::parse(&"t".repeat(129)).is_err());
        assert!(Reference::parse("_ok").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn name_parse_never_panics(s in "[a-z0-9._/-]{0,300}") {
            let _ = RepoName::parse(&s);
        }
        #[test]
        fn valid_names_have_no_dot_segments(s in "[a-z0-9._/-]{1,64}") {
            if RepoName::parse(&s).is_ok() {
                proptest::prop_assert!(s.split('/').all(|c| c != "." && c != ".."));
            }
        }
    }
}
