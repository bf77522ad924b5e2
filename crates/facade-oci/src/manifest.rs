//! Read-only views of manifests, indexes and configs. Composition edits raw JSON (see
//! facade-compose); these views only read what routing and resolution need, and reject
//! documents that would make a wrong image.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::media_types as mt;
use crate::platform::Platform;

/// Most layers an image manifest may list. Real images stay far below (Docker refuses to
/// build past 127 layers, overlayfs stacks at most 500 lower directories); a document with
/// more is hostile or broken, and every layer costs the facade a descriptor, a diff_id and a
/// blob-index entry per composed image.
pub const MAX_LAYERS: usize = 1024;

/// Most entries an index may list. Multi-platform images carry tens at most (with their
/// attestation entries).
pub const MAX_INDEX_ENTRIES: usize = 1024;

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Alternative download locations.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Platform (index entries only).
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Clone, Debug)]
pub struct ManifestView {
    /// The manifest's media type (from the document, else from the transport).
    pub media_type: String,
    /// The config descriptor.
    pub config: Descriptor,
    /// The layers, in order.
    pub layers: Vec<Descriptor>,
}

/// An index or manifest list.
#[derive(Clone, Debug)]
pub struct IndexView {
    /// The index's media type.
    pub media_type: String,
    /// The entries.
    pub manifests: Vec<Descriptor>,
}

impl IndexView {
    /// The first entry whose platform serves `want`, skipping attestation entries. The image
    /// index spec says the first match wins; entry 0 is never taken blindly.
    ///
    /// An index whose only entry has no `platform` (the field is optional, and some single-image
    /// builders leave it out) resolves to that entry, as the reference facade did: there is no
    /// other image it could mean.
    pub fn select(&self, want: &Platform) -> Option<&Descriptor> {
        let mut images =
            self.manifests.iter().filter(|d| mt::is_image_manifest(&d.media_type) || d.media_type.is_empty());
        if let [only] = self.manifests.as_slice()
            && only.platform.is_none()
        {
            return images.next();
        }
        images.find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
    }
}

/// A parsed manifest document.
#[derive(Clone, Debug)]
pub enum ParsedManifest {
    /// A single image.
    Image(ManifestView),
    /// A multi-platform index.
    Index(IndexView),
}

#[derive(Deserialize)]
struct RawDoc {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

impl ParsedManifest {
    /// Parses manifest bytes. `content_type` is the transport's `Content-Type`, used when the
    /// document has no `mediaType` (allowed for OCI).
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self> {
        let bad = |reason: String| Error::InvalidDocument { what: "manifest", reason };
        let doc: RawDoc = serde_json::from_slice(bytes).map_err(|e| bad(format!("not a JSON manifest: {e}")))?;
        if doc.schema_version != Some(2) {
            return Err(bad(format!("schemaVersion {:?} is not supported (only 2)", doc.schema_version)));
        }
        let ct = content_type.map(|c| c.split(';').next().unwrap_or("").trim()).filter(|c| !c.is_empty());
        let media_type = match (&doc.media_type, ct) {
            (Some(m), _) => m.clone(),
            (None, Some(c)) if mt::is_index(c) || mt::is_image_manifest(c) => c.to_string(),
            (None, _) if doc.manifests.is_some() => mt::OCI_INDEX.to_string(),
            (None, _) => mt::OCI_MANIFEST.to_string(),
        };
        if mt::is_index(&media_type) {
            let manifests = doc.manifests.ok_or_else(|| bad("index without manifests".into()))?;
            if manifests.len() > MAX_INDEX_ENTRIES {
                return Err(bad(format!(
                    "index has {} entries, more than the {MAX_INDEX_ENTRIES} allowed",
                    manifests.len()
                )));
            }
            return Ok(ParsedManifest::Index(IndexView { media_type, manifests }));
        }
        if !mt::is_image_manifest(&media_type) {
            return Err(bad(format!("unsupported manifest media type {media_type:?}")));
        }
        let config = doc.config.ok_or_else(|| bad("manifest without config".into()))?;
        let layers = doc.layers.unwrap_or_default();
        if layers.len() > MAX_LAYERS {
            return Err(bad(format!("manifest has {} layers, more than the {MAX_LAYERS} allowed", layers.len())));
        }
        Ok(ParsedManifest::Image(ManifestView { media_type, config, layers }))
    }
}

/// The parts of an image config the facade reads.
#[derive(Clone, Debug, Default)]
pub struct ImageConfigView {
    /// `os`.
    pub os: String,
    /// `architecture`.
    pub architecture: String,
    /// `rootfs.diff_ids`.
    pub diff_ids: Vec<Digest>,
    /// `config.Env`.
    pub env: Vec<String>,
    /// `config.Labels`.
    pub labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    rootfs: Option<RawRootfs>,
    config: Option<RawRunConfig>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct RawRunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

impl ImageConfigView {
    /// Parses config bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let c: RawConfig = serde_json::from_slice(bytes)
            .map_err(|e| Error::InvalidDocument { what: "config", reason: e.to_string() })?;
        let run = c.config;
        Ok(ImageConfigView {
            os: c.os,
            architecture: c.architecture,
            diff_ids: c.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
            env: run.as_ref().and_then(|r| r.env.clone()).unwrap_or_default(),
            labels: run.and_then(|r| r.labels).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn parses_docker_and_oci_manifests() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{D}","size":3}},"layers":[{{"mediaType":"{}","digest":"{D}","size":7}}]}}"#,
            mt::DOCKER_MANIFEST,
            mt::DOCKER_CONFIG,
            mt::DOCKER_LAYER_GZIP
        );
        let ParsedManifest::Image(v) = ParsedManifest::parse(m.as_bytes(), None).unwrap() else { panic!() };
        assert_eq!(v.media_type, mt::DOCKER_MANIFEST);
        assert_eq!(v.layers[0].size, 7);

        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{}","digest":"{D}","size":3}},"layers":[]}}"#,
            mt::OCI_CONFIG
        );
        let ParsedManifest::Image(v) =
            ParsedManifest::parse(m.as_bytes(), Some("application/vnd.oci.image.manifest.v1+json")).unwrap()
        else {
            panic!()
        };
        assert_eq!(v.media_type, mt::OCI_MANIFEST);
    }

    #[test]
    fn selects_platform_skipping_attestations() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{idx}","manifests":[
            {{"mediaType":"{m}","digest":"{D}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}},
            {{"mediaType":"{m}","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":2,"platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"mediaType":"{m}","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":3,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            idx = mt::OCI_INDEX,
            m = mt::OCI_MANIFEST
        );
        let ParsedManifest::Index(i) = ParsedManifest::parse(idx.as_bytes(), None).unwrap() else { panic!() };
        assert_eq!(i.select(&Platform::parse("linux/amd64").unwrap()).unwrap().size, 3);
        assert_eq!(i.select(&Platform::parse("linux/arm64/v8").unwrap()).unwrap().size, 2);
        assert!(i.select(&Platform::parse("linux/s390x").unwrap()).is_none());
    }

    #[test]
    fn only_entry_without_platform_is_selected() {
        let m = mt::OCI_MANIFEST;
        let oci_index = mt::OCI_INDEX;
        let one = format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{m}","digest":"{D}","size":7}}]}}"#);
        let ParsedManifest::Index(i) = ParsedManifest::parse(one.as_bytes(), Some(oci_index)).unwrap() else {
            panic!()
        };
        assert_eq!(i.select(&Platform::parse("linux/amd64").unwrap()).unwrap().size, 7);
        assert_eq!(i.select(&Platform::parse("linux/arm64").unwrap()).unwrap().size, 7);
        // Two entries without platform: neither is picked (which one would be a guess).
        let two = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{m}","digest":"{D}","size":7}},{{"mediaType":"{m}","digest":"{D}","size":8}}]}}"#
        );
        let ParsedManifest::Index(i) = ParsedManifest::parse(two.as_bytes(), Some(oci_index)).unwrap() else {
            panic!()
        };
        assert!(i.select(&Platform::parse("linux/amd64").unwrap()).is_none());
        // The only entry being something other than an image manifest is not picked.
        let nested =
            format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{oci_index}","digest":"{D}","size":7}}]}}"#);
        let ParsedManifest::Index(i) = ParsedManifest::parse(nested.as_bytes(), Some(oci_index)).unwrap() else {
            panic!()
        };
        assert!(i.select(&Platform::parse("linux/amd64").unwrap()).is_none());
    }

    #[test]
    fn rejects_schema1_and_garbage() {
        assert!(ParsedManifest::parse(br#"{"schemaVersion":1}"#, None).is_err());
        assert!(ParsedManifest::parse(b"\xff", None).is_err());
        assert!(ParsedManifest::parse(br#"{"schemaVersion":2,"layers":[]}"#, None).is_err());
    }

    fn descriptors(n: usize, media_type: &str) -> String {
        let one = format!(
            r#"{{"mediaType":"{media_type}","digest":"{D}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}"#
        );
        vec![one; n].join(",")
    }

    #[test]
    fn layer_count_is_bounded() {
        let manifest = |n: usize| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{D}","size":3}},"layers":[{}]}}"#,
                mt::OCI_MANIFEST,
                mt::OCI_CONFIG,
                descriptors(n, mt::OCI_LAYER_GZIP)
            )
        };
        let ParsedManifest::Image(v) = ParsedManifest::parse(manifest(MAX_LAYERS).as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(v.layers.len(), MAX_LAYERS);
        let e = ParsedManifest::parse(manifest(MAX_LAYERS + 1).as_bytes(), None).unwrap_err().to_string();
        assert_eq!(e, "invalid manifest: manifest has 1025 layers, more than the 1024 allowed");
    }

    #[test]
    fn index_entries_are_bounded() {
        let index = |n: usize| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
                mt::OCI_INDEX,
                descriptors(n, mt::OCI_MANIFEST)
            )
        };
        let ParsedManifest::Index(i) = ParsedManifest::parse(index(MAX_INDEX_ENTRIES).as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(i.manifests.len(), MAX_INDEX_ENTRIES);
        let e = ParsedManifest::parse(index(MAX_INDEX_ENTRIES + 1).as_bytes(), None).unwrap_err().to_string();
        assert_eq!(e, "invalid manifest: index has 1025 entries, more than the 1024 allowed");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in proptest::collection::vec(0u8.., 0..200)) {
            let _ = ParsedManifest::parse(&s, None);
            let _ = ImageConfigView::parse(&s);
        }
    }
}
