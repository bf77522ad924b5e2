//! Images built from local bytes: deterministic layer tars, OCI configs and manifests, OCI image
//! layouts on disk, and pushes of those layouts to a real registry with `skopeo`.
//!
//! Everything here is byte-deterministic (fixed mtimes, owners and key order), so a test that
//! builds the same image twice gets the same digests.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use facade_oci::Platform;
use facade_oci::media_types as mt;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

use crate::registry::Registry;

/// The annotation an OCI layout's `index.json` names tags with.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// How long one `skopeo copy` may take. Test images are small; a hang means a broken peer.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A regular file in a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Path inside the rootfs; a leading `/` or `./` is dropped.
    pub path: String,
    /// The file's bytes.
    pub contents: Vec<u8>,
    /// Permission bits (`0o644`).
    pub mode: u32,
}

impl FileEntry {
    /// A regular file with mode 0644.
    pub fn file(path: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        FileEntry { path: path.into(), contents: contents.into(), mode: 0o644 }
    }

    /// An executable file with mode 0755.
    pub fn exec(path: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        FileEntry { path: path.into(), contents: contents.into(), mode: 0o755 }
    }
}

/// How a layer's tar is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd (OCI only; Docker schema 2 has no media type for it).
    Zstd,
}

/// A layer blob and what a manifest and config say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltLayer {
    /// The blob as stored in a registry.
    pub bytes: Vec<u8>,
    /// `sha256:` of `bytes`.
    pub digest: String,
    /// `sha256:` of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// The OCI layer media type matching the compression.
    pub media_type: String,
    /// `bytes.len()`.
    pub size: u64,
}

impl BuiltLayer {
    /// The layer's manifest descriptor.
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// Builds a layer from `files`, in the order given. Parent directories are emitted (mode 0755)
/// right before the first entry below them, because some unpackers (and whiteout handling)
/// expect a directory entry before its children. mtime, uid and gid are 0; paths are UTF-8.
pub fn build_layer(files: &[FileEntry], compression: LayerCompression) -> BuiltLayer {
    let tar = build_tar(files);
    let diff_id = sha256_digest(&tar);
    let (bytes, media_type) = match compression {
        LayerCompression::None => (tar, mt::OCI_LAYER_TAR),
        LayerCompression::Gzip => (gzip(&tar), mt::OCI_LAYER_GZIP),
        LayerCompression::Zstd => (zstd_compress(&tar), mt::OCI_LAYER_ZSTD),
    };
    BuiltLayer {
        digest: sha256_digest(&bytes),
        size: bytes.len() as u64,
        bytes,
        diff_id,
        media_type: media_type.to_string(),
    }
}

/// The uncompressed tar `build_layer` compresses.
pub fn build_tar(files: &[FileEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = BTreeSet::new();
    for f in files {
        let path = normalize(&f.path);
        let parts: Vec<&str> = path.split('/').collect();
        for i in 1..parts.len() {
            let dir = parts[..i].join("/");
            if dirs.insert(dir.clone()) {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, format!("{dir}/"), std::io::empty())
                    .expect("writing a tar into memory cannot fail");
            }
        }
        let mut h = header(tar::EntryType::Regular, f.mode, f.contents.len() as u64);
        b.append_data(&mut h, &path, f.contents.as_slice()).expect("writing a tar into memory cannot fail");
    }
    b.into_inner().expect("writing a tar into memory cannot fail")
}

fn normalize(path: &str) -> String {
    path.trim_start_matches("./").trim_start_matches('/').to_string()
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    // GNU headers so that long paths get a long-name entry instead of failing.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// gzip with the header mtime left at 0, so the output only depends on the input.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("compressing into memory cannot fail");
    enc.finish().expect("compressing into memory cannot fail")
}

/// zstd at the default level.
pub fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("compressing into memory cannot fail")
}

/// An OCI image: config, layers and manifest bytes.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// The manifest bytes (OCI image manifest).
    pub manifest: Vec<u8>,
    /// `sha256:` of `manifest`.
    pub manifest_digest: String,
    /// The config bytes.
    pub config: Vec<u8>,
    /// `sha256:` of `config`.
    pub config_digest: String,
    /// The layers, in manifest order.
    pub layers: Vec<BuiltLayer>,
}

impl BuiltImage {
    /// The manifest's descriptor, as an index entry without platform.
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": mt::OCI_MANIFEST, "digest": self.manifest_digest, "size": self.manifest.len() })
    }

    /// The config parsed.
    pub fn config_json(&self) -> Value {
        serde_json::from_slice(&self.config).expect("the builder wrote this JSON")
    }

    /// Every blob of the image (manifest, config, layers) as (digest, bytes).
    pub fn blobs(&self) -> Vec<(&str, &[u8])> {
        let mut v = vec![(self.manifest_digest.as_str(), self.manifest.as_slice())];
        v.push((self.config_digest.as_str(), self.config.as_slice()));
        v.extend(self.layers.iter().map(|l| (l.digest.as_str(), l.bytes.as_slice())));
        v
    }
}

enum HistoryItem {
    Layer,
    Empty(String),
}

/// Builds an OCI image manifest and config around layers. Defaults: `linux/amd64` (fixed, not
/// the host, so digests are the same on every machine), `created` = `2024-01-01T00:00:00Z`, one
/// history entry per layer (`created_by: "test layer N"`, N from 0).
pub struct ImageBuilder {
    platform: Platform,
    layers: Vec<BuiltLayer>,
    history: Vec<HistoryItem>,
    env: Vec<String>,
    labels: BTreeMap<String, String>,
    run_extra: Vec<(String, Value)>,
    top_extra: Vec<(String, Value)>,
    annotations: BTreeMap<String, String>,
    created: String,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    /// An image with no layers.
    pub fn new() -> Self {
        ImageBuilder {
            platform: Platform { os: "linux".into(), architecture: "amd64".into(), variant: None },
            layers: Vec::new(),
            history: Vec::new(),
            env: Vec::new(),
            labels: BTreeMap::new(),
            run_extra: Vec::new(),
            top_extra: Vec::new(),
            annotations: BTreeMap::new(),
            created: "2024-01-01T00:00:00Z".into(),
        }
    }

    /// The config's `os`, `architecture` and `variant`.
    pub fn platform(mut self, os: &str, architecture: &str, variant: Option<&str>) -> Self {
        self.platform =
            Platform { os: os.into(), architecture: architecture.into(), variant: variant.map(str::to_string) };
        self
    }

    /// Appends a layer (and its history entry).
    pub fn layer(mut self, layer: BuiltLayer) -> Self {
        self.layers.push(layer);
        self.history.push(HistoryItem::Layer);
        self
    }

    /// Appends a history entry with `empty_layer: true` (as `ENV` or `LABEL` steps leave), at
    /// this position among the layers' entries.
    pub fn empty_history(mut self, created_by: &str) -> Self {
        self.history.push(HistoryItem::Empty(created_by.into()));
        self
    }

    /// Appends `K=V` entries to `config.Env`.
    pub fn env<I, S>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.env.extend(vars.into_iter().map(Into::into));
        self
    }

    /// Sets `config.Labels[key]`.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets a top-level config key (`container_config`, `docker_version`, …), written after
    /// the standard keys; a standard key given here replaces the builder's value.
    pub fn config_extra(mut self, key: &str, value: Value) -> Self {
        self.top_extra.push((key.into(), value));
        self
    }

    /// Sets a key inside the config's `config` object (`Healthcheck`, `Cmd`, `OnBuild`, …),
    /// written after `Env` and `Labels`.
    pub fn run_config_extra(mut self, key: &str, value: Value) -> Self {
        self.run_extra.push((key.into(), value));
        self
    }

    /// Sets a manifest annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// The config's `created` and every history entry's `created`.
    pub fn created(mut self, created: &str) -> Self {
        self.created = created.into();
        self
    }

    /// The config bytes this builder makes.
    pub fn config_bytes(&self) -> Vec<u8> {
        let mut run = Map::new();
        if !self.env.is_empty() {
            run.insert("Env".into(), json!(self.env));
        }
        if !self.labels.is_empty() {
            run.insert("Labels".into(), json!(self.labels));
        }
        for (k, v) in &self.run_extra {
            run.insert(k.clone(), v.clone());
        }
        let mut n = 0;
        let history: Vec<Value> = self
            .history
            .iter()
            .map(|h| match h {
                HistoryItem::Layer => {
                    n += 1;
                    json!({ "created": self.created, "created_by": format!("test layer {}", n - 1) })
                }
                HistoryItem::Empty(by) => json!({ "created": self.created, "created_by": by, "empty_layer": true }),
            })
            .collect();
        let mut cfg = Map::new();
        cfg.insert("created".into(), json!(self.created));
        cfg.insert("architecture".into(), json!(self.platform.architecture));
        if let Some(v) = &self.platform.variant {
            cfg.insert("variant".into(), json!(v));
        }
        cfg.insert("os".into(), json!(self.platform.os));
        cfg.insert("config".into(), Value::Object(run));
        let diff_ids: Vec<&str> = self.layers.iter().map(|l| l.diff_id.as_str()).collect();
        cfg.insert("rootfs".into(), json!({ "type": "layers", "diff_ids": diff_ids }));
        cfg.insert("history".into(), Value::Array(history));
        for (k, v) in &self.top_extra {
            cfg.insert(k.clone(), v.clone());
        }
        serde_json::to_vec(&Value::Object(cfg)).expect("a JSON value always serializes")
    }

    /// The OCI image manifest, config and layers.
    pub fn build(&self) -> BuiltImage {
        let config = self.config_bytes();
        let config_digest = sha256_digest(&config);
        let mut m = Map::new();
        m.insert("schemaVersion".into(), json!(2));
        m.insert("mediaType".into(), json!(mt::OCI_MANIFEST));
        m.insert(
            "config".into(),
            json!({ "mediaType": mt::OCI_CONFIG, "digest": config_digest, "size": config.len() }),
        );
        m.insert("layers".into(), Value::Array(self.layers.iter().map(BuiltLayer::descriptor).collect()));
        if !self.annotations.is_empty() {
            m.insert("annotations".into(), json!(self.annotations));
        }
        let manifest = serde_json::to_vec(&Value::Object(m)).expect("a JSON value always serializes");
        BuiltImage {
            manifest_digest: sha256_digest(&manifest),
            manifest,
            config,
            config_digest,
            layers: self.layers.clone(),
        }
    }
}

fn write_blob(dir: &Path, digest: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| anyhow::anyhow!("not a sha256 digest: {digest}"))?;
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(blobs.join(hex), bytes)?;
    Ok(())
}

/// Adds `entry` to the layout's `index.json` under `tag`, replacing an entry with that tag, so
/// one layout can hold several tags.
fn add_to_index(dir: &Path, tag: &str, mut entry: Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index_path = dir.join("index.json");
    let mut index: Value = match std::fs::read(&index_path) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            json!({ "schemaVersion": 2, "mediaType": mt::OCI_INDEX, "manifests": [] })
        }
        Err(e) => return Err(e.into()),
    };
    entry["annotations"] = json!({ REF_NAME_ANNOTATION: tag });
    let manifests = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| anyhow::anyhow!("{} has no manifests array", index_path.display()))?;
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION].as_str() != Some(tag));
    manifests.push(entry);
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    Ok(())
}

/// Writes `image` into the OCI image layout at `dir` (created if missing) under `tag`.
pub fn write_layout(dir: &Path, tag: &str, image: &BuiltImage) -> anyhow::Result<()> {
    for (digest, bytes) in image.blobs() {
        write_blob(dir, digest, bytes)?;
    }
    add_to_index(dir, tag, image.descriptor())
}

/// Media type of an in-toto attestation layer, as buildx writes them.
pub const IN_TOTO_LAYER: &str = "application/vnd.in-toto+json";

/// Builds the attestation manifest buildx attaches to `subject`: an OCI manifest whose config is
/// an `unknown/unknown` image config and whose one layer is an in-toto statement.
pub fn attestation_manifest(subject: &BuiltImage) -> BuiltImage {
    let statement = serde_json::to_vec(&json!({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://slsa.dev/provenance/v0.2",
        "subject": [{ "name": "test", "digest": { "sha256": subject.manifest_digest.trim_start_matches("sha256:") } }],
        "predicate": { "builder": { "id": "test-support" } },
    }))
    .expect("a JSON value always serializes");
    let layer = BuiltLayer {
        digest: sha256_digest(&statement),
        diff_id: sha256_digest(&statement),
        size: statement.len() as u64,
        media_type: IN_TOTO_LAYER.into(),
        bytes: statement,
    };
    let config = serde_json::to_vec(&json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [layer.diff_id] },
    }))
    .expect("a JSON value always serializes");
    let config_digest = sha256_digest(&config);
    let mut layer_desc = layer.descriptor();
    layer_desc["annotations"] = json!({ "in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2" });
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_MANIFEST,
        "config": { "mediaType": mt::OCI_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [layer_desc],
    }))
    .expect("a JSON value always serializes");
    BuiltImage { manifest_digest: sha256_digest(&manifest), manifest, config, config_digest, layers: vec![layer] }
}

/// Builds the OCI index `write_index_layout` writes, plus the attestation manifest if asked
/// for. Returns (index bytes, attestation).
pub fn build_index(images: &[(Platform, &BuiltImage)], with_attestation: bool) -> (Vec<u8>, Option<BuiltImage>) {
    let mut entries = Vec::new();
    let attestation = match (with_attestation, images.first()) {
        (true, Some((_, first))) => Some(attestation_manifest(first)),
        _ => None,
    };
    // Buildx lists attestations after the images; putting one first makes a client that takes
    // entry 0 blindly pick a manifest with no runnable layers.
    if let (Some(att), Some((_, first))) = (&attestation, images.first()) {
        let mut e = att.descriptor();
        e["platform"] = json!({ "architecture": "unknown", "os": "unknown" });
        e["annotations"] = json!({
            "vnd.docker.reference.digest": first.manifest_digest,
            "vnd.docker.reference.type": "attestation-manifest",
        });
        entries.push(e);
    }
    for (p, img) in images {
        let mut e = img.descriptor();
        e["platform"] = serde_json::to_value(p).expect("a Platform always serializes");
        entries.push(e);
    }
    let index = serde_json::to_vec(&json!({ "schemaVersion": 2, "mediaType": mt::OCI_INDEX, "manifests": entries }))
        .expect("a JSON value always serializes");
    (index, attestation)
}

/// Writes a multi-platform OCI index of `images` into the layout at `dir` under `tag` and
/// returns the index digest. With `with_attestation`, an `unknown/unknown` attestation manifest
/// for the first image comes **first** in the index.
pub fn write_index_layout(
    dir: &Path,
    tag: &str,
    images: &[(Platform, &BuiltImage)],
    with_attestation: bool,
) -> anyhow::Result<String> {
    let (index, attestation) = build_index(images, with_attestation);
    for img in images.iter().map(|(_, i)| *i).chain(attestation.as_ref()) {
        for (digest, bytes) in img.blobs() {
            write_blob(dir, digest, bytes)?;
        }
    }
    let digest = sha256_digest(&index);
    write_blob(dir, &digest, &index)?;
    add_to_index(dir, tag, json!({ "mediaType": mt::OCI_INDEX, "digest": digest, "size": index.len() }))?;
    Ok(digest)
}

/// The manifest format a push writes to the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushFormat {
    /// Keep the OCI manifest; `push_image` also keeps every digest (`--preserve-digests`).
    Oci,
    /// Let skopeo convert to Docker schema 2 (`--format v2s2`).
    DockerV2S2,
}

/// `skopeo copy` of `oci:<layout_dir>:<tag>` to `docker://<registry_host>/<repo_and_tag>` over
/// plain HTTP; with `all`, an index and every manifest in it (`--all`), else only the host
/// platform's manifest.
///
/// What skopeo 1.9.3 changes on the way (checked by this crate's tests):
/// - `Oci`, `preserve_digests` off: **uncompressed layers are gzip-compressed** (a registry
///   destination asks for compressed layers), so they get `tar+gzip` descriptors with new
///   digests and the manifest digest changes; gzip and zstd layers and the config are uploaded
///   byte for byte. If any child of an index changed, the index is re-serialized too (new key
///   order, new digest).
/// - `Oci`, `preserve_digests` on (`--preserve-digests`): nothing changes; the registry stores
///   the layout's manifests and blobs byte for byte.
/// - `DockerV2S2` (`--format v2s2`): manifest, config and layer media types become Docker ones
///   and the manifest is re-serialized (descriptor keys in `mediaType, size, digest` order);
///   the config bytes are kept; gzip layers keep their digest; uncompressed layers are
///   gzip-compressed (new digest). An index becomes a Docker manifest list. It fails for zstd
///   layers ("zstd compression is not supported for docker images") and for an index with an
///   attestation manifest ("Unknown media type during manifest conversion:
///   application/vnd.in-toto+json").
pub fn push_with(
    layout_dir: &Path,
    tag: &str,
    registry_host: &str,
    repo_and_tag: &str,
    format: PushFormat,
    all: bool,
    preserve_digests: bool,
) -> anyhow::Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--insecure-policy", "--dest-tls-verify=false"]);
    if format == PushFormat::DockerV2S2 {
        cmd.args(["--format", "v2s2"]);
    }
    if all {
        cmd.arg("--all");
    }
    if preserve_digests {
        cmd.arg("--preserve-digests");
    }
    cmd.arg(format!("oci:{}:{tag}", layout_dir.display()));
    cmd.arg(format!("docker://{registry_host}/{repo_and_tag}"));
    crate::proc::run_bytes(cmd, SKOPEO_TIMEOUT).map(|_| ())
}

/// `push_with` without `--preserve-digests` (see there for what skopeo changes).
pub fn push(
    layout_dir: &Path,
    tag: &str,
    registry_host: &str,
    repo_and_tag: &str,
    format: PushFormat,
    all: bool,
) -> anyhow::Result<()> {
    push_with(layout_dir, tag, registry_host, repo_and_tag, format, all, false)
}

/// Pushes `image` to `reg` as `<repo_and_tag>` through a temp OCI layout and returns the
/// manifest digest as stored upstream (read back with `skopeo inspect --raw`). With
/// `PushFormat::Oci` the push uses `--preserve-digests`, so that digest is
/// `image.manifest_digest` and every layer is stored as built; with `DockerV2S2` it is the
/// converted manifest's digest (see `push_with`).
pub fn push_image(
    reg: &Registry,
    repo_and_tag: &str,
    image: &BuiltImage,
    format: PushFormat,
) -> anyhow::Result<String> {
    let dir = tempfile::Builder::new().prefix("oci-layout-").tempdir()?;
    write_layout(dir.path(), "push", image)?;
    push_with(dir.path(), "push", &reg.host(), repo_and_tag, format, false, format == PushFormat::Oci)?;
    let raw = crate::skopeo::inspect_raw(&format!("{}/{repo_and_tag}", reg.host()))?;
    Ok(sha256_digest(&raw))
}

/// Pushes a multi-platform index (see `write_index_layout`) with `--all` and returns its digest
/// as stored upstream. With `PushFormat::Oci` the push uses `--preserve-digests`, so that is the
/// built index's digest and every child is stored as built.
pub fn push_index(
    reg: &Registry,
    repo_and_tag: &str,
    images: &[(Platform, &BuiltImage)],
    with_attestation: bool,
    format: PushFormat,
) -> anyhow::Result<String> {
    let dir = tempfile::Builder::new().prefix("oci-layout-").tempdir()?;
    write_index_layout(dir.path(), "push", images, with_attestation)?;
    push_with(dir.path(), "push", &reg.host(), repo_and_tag, format, true, format == PushFormat::Oci)?;
    let raw = crate::skopeo::inspect_raw(&format!("{}/{repo_and_tag}", reg.host()))?;
    Ok(sha256_digest(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_deterministic_and_emit_parent_dirs() {
        let files = [FileEntry::file("a/b/c.txt", "x"), FileEntry::exec("/a/run.sh", "#!/bin/sh\n")];
        let l1 = build_layer(&files, LayerCompression::Gzip);
        let l2 = build_layer(&files, LayerCompression::Gzip);
        assert_eq!(l1, l2);
        assert_eq!(l1.media_type, mt::OCI_LAYER_GZIP);
        let tar = build_tar(&files);
        assert_eq!(l1.diff_id, sha256_digest(&tar));
        let mut ar = tar::Archive::new(tar.as_slice());
        let entries: Vec<(String, u32, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().mode().unwrap(),
                    e.header().mtime().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["a/", "a/b/", "a/b/c.txt", "a/run.sh"]);
        assert_eq!(entries[3].1, 0o755);
        assert!(entries.iter().all(|e| e.2 == 0));
    }

    #[test]
    fn compression_media_types_and_diff_ids() {
        let files = [FileEntry::file("f", vec![7u8; 10_000])];
        let none = build_layer(&files, LayerCompression::None);
        let zstd = build_layer(&files, LayerCompression::Zstd);
        assert_eq!(none.media_type, mt::OCI_LAYER_TAR);
        assert_eq!(none.digest, none.diff_id);
        assert_eq!(zstd.media_type, mt::OCI_LAYER_ZSTD);
        assert_eq!(zstd.diff_id, none.diff_id);
        assert_eq!(zstd::decode_all(zstd.bytes.as_slice()).unwrap(), none.bytes);
    }

    #[test]
    fn config_keeps_history_in_step_and_extras() {
        let l = build_layer(&[FileEntry::file("f", "1")], LayerCompression::None);
        let img = ImageBuilder::new()
            .layer(l.clone())
            .empty_history("ENV A=1")
            .layer(l)
            .env(["A=1"])
            .label("k", "v")
            .run_config_extra("Healthcheck", json!({ "Test": ["NONE"] }))
            .config_extra("docker_version", json!("24.0.0"))
            .build();
        let cfg = img.config_json();
        assert_eq!(cfg["config"]["Env"], json!(["A=1"]));
        assert_eq!(cfg["config"]["Labels"]["k"], "v");
        assert_eq!(cfg["config"]["Healthcheck"]["Test"][0], "NONE");
        assert_eq!(cfg["docker_version"], "24.0.0");
        assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
        let by: Vec<&str> =
            cfg["history"].as_array().unwrap().iter().map(|h| h["created_by"].as_str().unwrap()).collect();
        assert_eq!(by, ["test layer 0", "ENV A=1", "test layer 1"]);
        let m: Value = serde_json::from_slice(&img.manifest).unwrap();
        assert_eq!(m["config"]["digest"], img.config_digest.as_str());
        assert_eq!(m["layers"].as_array().unwrap().len(), 2);
        assert_eq!(img.manifest_digest, sha256_digest(&img.manifest));
    }

    #[test]
    fn index_puts_attestation_first() {
        let a = ImageBuilder::new().build();
        let b = ImageBuilder::new().platform("linux", "arm64", Some("v8")).build();
        let plats = [(Platform::parse("linux/amd64").unwrap(), &a), (Platform::parse("linux/arm64/v8").unwrap(), &b)];
        let (index, att) = build_index(&plats, true);
        let v: Value = serde_json::from_slice(&index).unwrap();
        let m = v["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0]["platform"]["os"], "unknown");
        assert_eq!(m[0]["digest"], att.unwrap().manifest_digest.as_str());
        assert_eq!(m[0]["annotations"]["vnd.docker.reference.digest"], a.manifest_digest.as_str());
        assert_eq!(m[2]["platform"]["variant"], "v8");
    }
}
