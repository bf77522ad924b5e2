//! Content digests (`algorithm:encoded`), image-spec descriptor rules.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{Error, Result, clip};

/// A validated content digest. `sha256` and `sha512` are checked for exact length and lowercase
/// hex, as the image spec requires; other algorithms must follow the grammar and are kept as is
/// but cannot be verified (see [`Digest::is_verifiable`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    text: String,
    split: usize,
}

impl Digest {
    /// Parses and validates a digest string.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidDigest { value: clip(s), reason };
        if s.len() > 256 {
            return Err(bad("longer than 256 characters"));
        }
        let (alg, enc) = s.split_once(':').ok_or_else(|| bad("missing ':'"))?;
        if alg.is_empty() || enc.is_empty() {
            return Err(bad("empty algorithm or encoded part"));
        }
        // algorithm-component ([+._-] algorithm-component)*, components are [a-z0-9]+
        let mut prev_sep = true;
        for c in alg.chars() {
            match c {
                'a'..='z' | '0'..='9' => prev_sep = false,
                '+' | '.' | '_' | '-' if !prev_sep => prev_sep = true,
                _ => return Err(bad("algorithm must be [a-z0-9] components joined by [+._-]")),
            }
        }
        if prev_sep {
            return Err(bad("algorithm ends with a separator"));
        }
        if !enc.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '=' | '_' | '-')) {
            return Err(bad("encoded part must be [a-zA-Z0-9=_-]+"));
        }
        let want = match alg {
            "sha256" => Some(64),
            "sha512" => Some(128),
            _ => None,
        };
        if let Some(n) = want
            && (enc.len() != n || !enc.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
        {
            return Err(bad(if alg == "sha256" {
                "sha256 needs 64 lowercase hex digits"
            } else {
                "sha512 needs 128 lowercase hex digits"
            }));
        }
        Ok(Digest { text: s.to_string(), split: alg.len() })
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        let hex = hex::encode(Sha256::digest(data));
        Digest { text: format!("sha256:{hex}"), split: 6 }
    }

    /// The algorithm part (`sha256`).
    pub fn algorithm(&self) -> &str {
        &self.text[..self.split]
    }

    /// The encoded part (hex for sha256/sha512).
    pub fn encoded(&self) -> &str {
        &self.text[self.split + 1..]
    }

    /// The full `algorithm:encoded` text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this crate can compute the algorithm (sha256, sha512).
    pub fn is_verifiable(&self) -> bool {
        matches!(self.algorithm(), "sha256" | "sha512")
    }

    /// A hasher of this digest's algorithm, or `None` when it cannot be verified.
    pub fn hasher(&self) -> Option<DigestHasher> {
        match self.algorithm() {
            "sha256" => Some(DigestHasher::Sha256(Sha256::new())),
            "sha512" => Some(DigestHasher::Sha512(Box::new(Sha512::new()))),
            _ => None,
        }
    }

    /// Whether `data` hashes to this digest. Unverifiable algorithms never match.
    pub fn matches(&self, data: &[u8]) -> bool {
        match self.hasher() {
            Some(mut h) => {
                h.update(data);
                h.finish() == *self
            }
            None => false,
        }
    }
}

/// An incremental hasher producing a [`Digest`].
#[derive(Clone)]
pub enum DigestHasher {
    /// sha256
    Sha256(Sha256),
    /// sha512
    Sha512(Box<Sha512>),
}

impl DigestHasher {
    /// A new sha256 hasher.
    pub fn sha256() -> Self {
        DigestHasher::Sha256(Sha256::new())
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(data),
            DigestHasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            DigestHasher::Sha256(h) => Digest { text: format!("sha256:{}", hex::encode(h.finalize())), split: 6 },
            DigestHasher::Sha512(h) => Digest { text: format!("sha512:{}", hex::encode(h.finalize())), split: 6 },
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.text)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn accepts_sha256_and_sha512() {
        let d = Digest::parse(&format!("sha256:{HEX}")).unwrap();
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.encoded(), HEX);
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(128))).is_ok());
        assert!(Digest::parse("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8").is_ok());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:totallywrong",
            &format!("sha256:{}", HEX.to_uppercase()),
            &format!("sha256:{}", &HEX[1..]),
            &format!("SHA256:{HEX}"),
            "sha256+:abc",
            "sha256:../../etc/passwd",
            "sha256:ab/cd",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sha256_of_empty_matches_known_value() {
        assert_eq!(Digest::sha256_of(b"").encoded(), HEX);
        assert!(Digest::sha256_of(b"x").matches(b"x"));
        assert!(!Digest::sha256_of(b"x").matches(b"y"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = Digest::parse(&s);
        }

        #[test]
        fn roundtrips_computed_digests(data in proptest::collection::vec(0u8.., 0..64)) {
            let d = Digest::sha256_of(&data);
            proptest::prop_assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
        }
    }
}
