//! Platforms and their matching, image-index spec rules.

use serde::{Deserialize, Serialize};

/// An `os`/`architecture`/`variant` triple as found in index entries and configs.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// CPU architecture (`amd64`).
    #[serde(default)]
    pub architecture: String,
    /// Optional variant (`v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut it = s.split('/');
        let os = it.next().filter(|s| !s.is_empty())?;
        let arch = it.next().filter(|s| !s.is_empty())?;
        let variant = it.next().filter(|s| !s.is_empty()).map(str::to_string);
        if it.next().is_some() {
            return None;
        }
        Some(Platform { os: os.to_string(), architecture: arch.to_string(), variant })
    }

    /// The platform this binary runs on, in Go's naming (what image indexes use).
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        let variant = match architecture {
            "arm64" => Some("v8".to_string()),
            "arm" => Some("v7".to_string()),
            _ => None,
        };
        Platform { os: std::env::consts::OS.to_string(), architecture: architecture.to_string(), variant }
    }

    /// Whether an index entry with platform `candidate` serves this (wanted) platform.
    /// `unknown/unknown` entries (attestations) never match; arm64 with no variant equals
    /// arm64/v8, and a missing variant on either side of other architectures matches any.
    pub fn matches(&self, candidate: &Platform) -> bool {
        if candidate.os == "unknown" || candidate.architecture == "unknown" {
            return false;
        }
        if candidate.os != self.os || candidate.architecture != self.architecture {
            return false;
        }
        let norm = |v: &Option<String>| -> Option<String> {
            match (self.architecture.as_str(), v.as_deref()) {
                ("arm64", None) => Some("v8".to_string()),
                (_, v) => v.map(str::to_string),
            }
        };
        match (norm(&self.variant), norm(&candidate.variant)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn matching_rules() {
        assert!(p("linux/amd64").matches(&p("linux/amd64")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert!(!p("linux/amd64").matches(&p("unknown/unknown")));
        assert!(p("linux/arm64/v8").matches(&p("linux/arm64")));
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(!p("linux/arm/v7").matches(&p("linux/arm/v6")));
        assert!(p("linux/arm").matches(&p("linux/arm/v6")));
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("linux/amd64/v2/x").is_none());
    }
}
