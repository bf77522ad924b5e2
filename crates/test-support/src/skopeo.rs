//! Pulling with a real client: `skopeo` (Debian 1.9.3) over plain HTTP, and a reader for the
//! OCI layouts it writes that checks every blob against its digest.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use facade_oci::media_types::{self as mt, Compression};
use facade_oci::{IndexView, Platform};
use serde_json::Value;

use crate::image::{REF_NAME_ANNOTATION, SKOPEO_TIMEOUT, sha256_digest};
use crate::proc::run_bytes;

fn skopeo() -> Command {
    let mut cmd = Command::new("skopeo");
    // Machines without /etc/containers/policy.json would refuse every copy.
    cmd.arg("--insecure-policy");
    cmd
}

/// `skopeo copy docker://<src> oci:<dest_dir>:<tag>` over plain HTTP (`src` is
/// `127.0.0.1:P/remote/ID:latest`), as a real client pulls: skopeo verifies every blob's digest
/// and size, and narrows an index to the host platform (skipping `unknown/unknown` entries).
///
/// skopeo 1.9.3 rewrites on the way into a layout (checked by this crate's tests):
/// - **uncompressed layers are gzip-compressed** (an OCI layout destination asks for
///   compressed layers), so their digests and media types in the layout differ from what was
///   served; gzip and zstd layers are stored byte for byte;
/// - a Docker schema 2 image is converted to OCI, and its config is **re-serialized** through
///   the OCI config type: Docker-only keys (`Healthcheck`, `docker_version`, `container_config`,
///   …) are dropped, so check configs with `inspect_config_raw`, not from the layout.
///
/// A pure OCI image with only compressed layers arrives byte for byte. For the served bytes in
/// every case, use `copy_to_oci_preserving_digests`.
pub fn copy_to_oci(src: &str, dest_dir: &Path, tag: &str) -> anyhow::Result<()> {
    copy(src, dest_dir, tag, false)
}

/// `copy_to_oci` with `--preserve-digests`: the layout gets exactly the served manifest, config
/// and layers, Docker schema 2 manifests included (skopeo then stores the Docker manifest in
/// the OCI layout unconverted; `read_oci_layout` reads both families).
pub fn copy_to_oci_preserving_digests(src: &str, dest_dir: &Path, tag: &str) -> anyhow::Result<()> {
    copy(src, dest_dir, tag, true)
}

fn copy(src: &str, dest_dir: &Path, tag: &str, preserve_digests: bool) -> anyhow::Result<()> {
    let mut cmd = skopeo();
    cmd.args(["copy", "--src-tls-verify=false"]);
    if preserve_digests {
        cmd.arg("--preserve-digests");
    }
    cmd.arg(format!("docker://{src}"));
    cmd.arg(format!("oci:{}:{tag}", dest_dir.display()));
    run_bytes(cmd, SKOPEO_TIMEOUT).map(|_| ())
}

/// The manifest (or index) bytes the registry serves for `image` (`host:port/repo:tag`),
/// exactly: `skopeo inspect --raw` writes them without a trailing newline.
pub fn inspect_raw(image: &str) -> anyhow::Result<Vec<u8>> {
    let mut cmd = skopeo();
    cmd.args(["inspect", "--tls-verify=false", "--raw"]);
    cmd.arg(format!("docker://{image}"));
    run_bytes(cmd, SKOPEO_TIMEOUT)
}

/// The config blob of `image` exactly as served (`skopeo inspect --config --raw`); for an
/// index, the host platform's. Without `--raw`, skopeo prints an OCI-typed re-serialization
/// that drops Docker-only keys (`Healthcheck`, `container_config`, …).
pub fn inspect_config_raw(image: &str) -> anyhow::Result<Vec<u8>> {
    let mut cmd = skopeo();
    cmd.args(["inspect", "--tls-verify=false", "--config", "--raw"]);
    cmd.arg(format!("docker://{image}"));
    run_bytes(cmd, SKOPEO_TIMEOUT)
}

/// `inspect_config_raw`, parsed.
pub fn inspect_config(image: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&inspect_config_raw(image)?)?)
}

/// An image read back from an OCI layout.
#[derive(Clone, Debug)]
pub struct PulledImage {
    /// The image manifest, parsed.
    pub manifest: Value,
    /// The image manifest bytes.
    pub manifest_bytes: Vec<u8>,
    /// The config, parsed.
    pub config: Value,
    /// Per layer, in manifest order: regular files, path (relative, no leading `/`) → contents.
    pub layer_files: Vec<BTreeMap<String, Vec<u8>>>,
}

impl PulledImage {
    /// The files of all layers applied in order, with `.wh.<name>` whiteouts removing `<name>`
    /// (and everything below it) from lower layers and `.wh..wh..opq` emptying a directory.
    pub fn rootfs(&self) -> BTreeMap<String, Vec<u8>> {
        apply_layers(&self.layer_files)
    }
}

/// Applies layers of regular files in order, honouring OCI whiteouts.
pub fn apply_layers(layers: &[BTreeMap<String, Vec<u8>>]) -> BTreeMap<String, Vec<u8>> {
    let mut fs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for layer in layers {
        for path in layer.keys() {
            let (dir, name) = path.rsplit_once('/').map_or(("", path.as_str()), |(d, n)| (d, n));
            let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
            if name == ".wh..wh..opq" {
                fs.retain(|p, _| !p.starts_with(&prefix));
            } else if let Some(gone) = name.strip_prefix(".wh.") {
                let gone = format!("{prefix}{gone}");
                let below = format!("{gone}/");
                fs.retain(|p, _| *p != gone && !p.starts_with(&below));
            }
        }
        for (path, data) in layer {
            if !path.rsplit('/').next().unwrap_or("").starts_with(".wh.") {
                fs.insert(path.clone(), data.clone());
            }
        }
    }
    fs
}

/// Reads the image tagged `tag` from the OCI layout at `dir`. Every blob read (index, manifest,
/// config, layers) must hash to the digest in its file name and have the descriptor's size.
/// If the tag names an index, the host platform's manifest is read.
pub fn read_oci_layout(dir: &Path, tag: &str) -> anyhow::Result<PulledImage> {
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| m.iter().find(|e| e["annotations"][REF_NAME_ANNOTATION].as_str() == Some(tag)))
        .ok_or_else(|| anyhow::anyhow!("no manifest tagged {tag:?} in {}", dir.display()))?;
    let mut desc = entry.clone();
    let mut manifest_bytes = read_blob(dir, &desc)?;
    if mt::is_index(desc["mediaType"].as_str().unwrap_or("")) {
        let view = IndexView {
            media_type: mt::OCI_INDEX.into(),
            manifests: serde_json::from_value(serde_json::from_slice::<Value>(&manifest_bytes)?["manifests"].clone())?,
        };
        let chosen = view
            .select(&Platform::host())
            .ok_or_else(|| anyhow::anyhow!("index {tag:?} has no entry for this platform"))?;
        desc = serde_json::json!({ "digest": chosen.digest.as_str(), "size": chosen.size });
        manifest_bytes = read_blob(dir, &desc)?;
    }
    let manifest: Value = serde_json::from_slice(&manifest_bytes)?;
    let config: Value = serde_json::from_slice(&read_blob(dir, &manifest["config"])?)?;
    let mut layer_files = Vec::new();
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let bytes = read_blob(dir, layer)?;
        layer_files.push(layer_files_of(&bytes, layer["mediaType"].as_str().unwrap_or(""))?);
    }
    Ok(PulledImage { manifest, manifest_bytes, config, layer_files })
}

fn read_blob(dir: &Path, desc: &Value) -> anyhow::Result<Vec<u8>> {
    let digest = desc["digest"].as_str().ok_or_else(|| anyhow::anyhow!("descriptor without digest: {desc}"))?;
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| anyhow::anyhow!("not a sha256 digest: {digest}"))?;
    let path = dir.join("blobs").join("sha256").join(hex);
    let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let actual = sha256_digest(&bytes);
    anyhow::ensure!(actual == digest, "blob {} hashes to {actual}", path.display());
    if let Some(size) = desc["size"].as_u64() {
        anyhow::ensure!(size == bytes.len() as u64, "blob {digest} has {} bytes, descriptor says {size}", bytes.len());
    }
    Ok(bytes)
}

/// The regular files of a layer blob, decompressed as `media_type` says (OCI or Docker types).
pub fn layer_files_of(blob: &[u8], media_type: &str) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let tar = match mt::layer_compression(media_type) {
        Some(Compression::None) => blob.to_vec(),
        Some(Compression::Gzip) => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(blob).read_to_end(&mut out)?;
            out
        }
        Some(Compression::Zstd) => zstd::decode_all(blob)?,
        None => anyhow::bail!("not a layer media type: {media_type:?}"),
    };
    tar_files(&tar)
}

/// The regular files of an uncompressed tar, path (no leading `/` or `./`) → contents.
pub fn tar_files(tar: &[u8]) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut ar = tar::Archive::new(tar);
    for entry in ar.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path()?.to_string_lossy().trim_start_matches("./").trim_start_matches('/').to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        files.insert(path, data);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(files: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        files.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect()
    }

    #[test]
    fn whiteouts_remove_lower_files() {
        let lower = layer(&[("a/x", "1"), ("a/y", "2"), ("b/z", "3"), ("c", "4")]);
        let upper = layer(&[("a/.wh..wh..opq", ""), ("a/n", "5"), (".wh.b", ""), (".wh.c", "")]);
        let fs = apply_layers(&[lower, upper]);
        assert_eq!(fs, layer(&[("a/n", "5")]));
    }

    #[test]
    fn reads_layers_by_media_type() {
        use crate::image::{FileEntry, LayerCompression, build_layer};
        for c in [LayerCompression::None, LayerCompression::Gzip, LayerCompression::Zstd] {
            let l = build_layer(&[FileEntry::file("d/f", "hi")], c);
            assert_eq!(layer_files_of(&l.bytes, &l.media_type).unwrap(), layer(&[("d/f", "hi")]));
        }
        let l = build_layer(&[FileEntry::file("f", "x")], LayerCompression::Gzip);
        assert_eq!(layer_files_of(&l.bytes, mt::DOCKER_LAYER_GZIP).unwrap(), layer(&[("f", "x")]));
        assert!(layer_files_of(&l.bytes, "application/json").is_err());
    }
}
