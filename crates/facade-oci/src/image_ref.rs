//! Image references as written in specs and configs (`host[:port]/path[:tag][@digest]`),
//! with Docker Hub's implicit names.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result, clip};
use crate::reference::{Reference, RepoName, is_valid_tag};

/// The registry that unqualified names refer to.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's registry API answers on.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A fully qualified image reference.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ImageRef {
    /// Registry host with optional port, as written (`docker.io` for unqualified names).
    pub registry: String,
    /// Repository path (`library/ubuntu`).
    pub repository: RepoName,
    /// Tag, if one was given.
    pub tag: Option<String>,
    /// Digest, if one was given; it wins over the tag when fetching.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// Parses a reference. A name without a registry host means Docker Hub, and a single-segment
    /// Hub name gets the `library/` prefix. Without tag or digest the tag is `latest`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidImageRef { value: clip(s), reason: reason.to_string() };
        if s.is_empty() || s.len() > 512 {
            return Err(bad("empty or longer than 512 characters"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains white space"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).map_err(|e| bad(&e.to_string()))?)),
            None => (s, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !is_valid_tag(t) {
                    return Err(bad("invalid tag"));
                }
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry.is_empty()
            || !registry.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(bad("invalid registry host"));
        }
        let path = if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path };
        let repository = RepoName::parse(&path).map_err(|e| bad(&e.to_string()))?;
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(ImageRef { registry, repository, tag, digest })
    }

    /// The host to send registry API calls to (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB || self.registry == "index.docker.io" { DOCKER_HUB_API } else { &self.registry }
    }

    /// What to fetch: the digest when pinned, else the tag.
    pub fn reference(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Reference::Digest(d.clone()),
            (None, Some(t)) => Reference::Tag(t.clone()),
            (None, None) => Reference::Tag("latest".to_string()),
        }
    }

    /// The same image pinned to `digest` (tag dropped).
    pub fn with_digest(&self, digest: Digest) -> ImageRef {
        ImageRef { digest: Some(digest), tag: None, ..self.clone() }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let r = ImageRef::parse("ubuntu").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/ubuntu", Some("latest"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");

        let r = ImageRef::parse("127.0.0.1:5000/demo/base:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "demo/base", Some("v1"))
        );

        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost/x:t@{d}")).unwrap();
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.reference(), Reference::Digest(Digest::parse(&d).unwrap()));
        assert_eq!(r.to_string(), format!("localhost/x:t@{d}"));

        let r = ImageRef::parse("gitpod/workspace-full").unwrap();
        assert_eq!(r.repository.as_str(), "gitpod/workspace-full");
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "UPPER/case", "host:5000/a:b:c", "a@sha256:x", "a b", "a:", "x/../y"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad} accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,100}") {
            let _ = ImageRef::parse(&s);
        }
    }
}
