//! Golden tests: real-looking Docker schema 2 and OCI inputs under `tests/fixtures/<case>/`,
//! composed and compared byte for byte with `expected-manifest.json`, `expected-config.json`
//! and `expected-layers.txt` of the same directory.
//!
//! The expected files are rewritten only when `UPDATE_GOLDEN=1` is set; review them by eye
//! (e.g. with `jq .`) before accepting them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use facade_compose::{Addition, BaseInput, Composed, LayerInput, LayerOrigin, compose};
use facade_oci::Digest;
use facade_oci::media_types::Compression;
use serde::Deserialize;

const CASES: &[&str] = &["docker-base", "oci-base", "docker-zstd"];

#[derive(Deserialize)]
struct Case {
    base: BaseSpec,
    additions: Vec<AdditionSpec>,
}

#[derive(Deserialize)]
struct BaseSpec {
    #[serde(rename = "ref")]
    base_ref: String,
    manifest: String,
    media_type: String,
    config: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum AdditionSpec {
    Image { label: String, manifest: String, media_type: String, config: String },
    Layer { label: String, digest: String, diff_id: String, size: u64, compression: String },
}

struct Loaded {
    label: String,
    kind: LoadedKind,
}

enum LoadedKind {
    Image { manifest: Vec<u8>, media_type: String, config: Vec<u8> },
    Layer(LayerInput),
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    let path = dir.join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn compression(s: &str) -> Compression {
    match s {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "zstd" => Compression::Zstd,
        other => panic!("unknown compression {other:?}"),
    }
}

fn compose_case(dir: &Path) -> Composed {
    let case: Case = serde_json::from_slice(&read(dir, "case.json")).expect("case.json");
    let base_manifest = read(dir, &case.base.manifest);
    let base_config = read(dir, &case.base.config);
    let loaded: Vec<Loaded> = case
        .additions
        .into_iter()
        .map(|a| match a {
            AdditionSpec::Image { label, manifest, media_type, config } => Loaded {
                label,
                kind: LoadedKind::Image { manifest: read(dir, &manifest), media_type, config: read(dir, &config) },
            },
            AdditionSpec::Layer { label, digest, diff_id, size, compression: c } => Loaded {
                label,
                kind: LoadedKind::Layer(LayerInput {
                    digest: Digest::parse(&digest).unwrap(),
                    diff_id: Digest::parse(&diff_id).unwrap(),
                    size,
                    compression: compression(&c),
                }),
            },
        })
        .collect();
    let additions: Vec<Addition<'_>> = loaded
        .iter()
        .map(|l| match &l.kind {
            LoadedKind::Image { manifest, media_type, config } => {
                Addition::Image { label: &l.label, manifest, manifest_media_type: media_type, config }
            }
            LoadedKind::Layer(layer) => Addition::Layer { label: &l.label, layer: layer.clone() },
        })
        .collect();
    let base = BaseInput {
        base_ref: &case.base.base_ref,
        manifest: &base_manifest,
        manifest_media_type: &case.base.media_type,
        config: &base_config,
    };
    let first = compose(&base, &additions).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let again = compose(&base, &additions).unwrap();
    assert_eq!(first.manifest, again.manifest, "composition is not deterministic");
    assert_eq!(first.config, again.config, "composition is not deterministic");
    first
}

fn layers_text(c: &Composed) -> String {
    c.layers
        .iter()
        .map(|l| {
            let origin = match l.origin {
                LayerOrigin::Base => "base".to_string(),
                LayerOrigin::Addition(i) => format!("addition[{i}]"),
            };
            format!("{origin} {} {} {}\n", l.media_type, l.size, l.digest)
        })
        .collect()
}

fn pretty(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned())
}

/// Compares `actual` with the expected file, or rewrites it under `UPDATE_GOLDEN=1`. Returns a
/// description of the mismatch.
fn check(dir: &Path, name: &str, actual: &[u8]) -> Option<String> {
    let path = dir.join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        fs::write(&path, actual).unwrap();
        return None;
    }
    match fs::read(&path) {
        Ok(expected) if expected == actual => None,
        Ok(expected) => Some(format!(
            "{} differs (rerun with UPDATE_GOLDEN=1 to accept, after review)\n--- expected\n{}\n+++ actual\n{}\n",
            path.display(),
            pretty(&expected),
            pretty(actual)
        )),
        Err(e) => Some(format!("{}: {e} (create it with UPDATE_GOLDEN=1, then review it)", path.display())),
    }
}

fn run_case(name: &str) {
    let dir = fixtures().join(name);
    let composed = compose_case(&dir);

    // Invariants that hold for every case, so a wrongly accepted golden file still fails.
    let manifest: serde_json::Value = serde_json::from_slice(&composed.manifest).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&composed.config).unwrap();
    assert_eq!(manifest["mediaType"], composed.manifest_media_type);
    assert_eq!(manifest["config"]["digest"], composed.config_digest.as_str());
    assert_eq!(manifest["config"]["size"], composed.config.len());
    assert_eq!(composed.manifest_digest, Digest::sha256_of(&composed.manifest));
    assert_eq!(composed.config_digest, Digest::sha256_of(&composed.config));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), composed.layers.len());
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), layers.len());

    let failures: Vec<String> = [
        check(&dir, "expected-manifest.json", &composed.manifest),
        check(&dir, "expected-config.json", &composed.config),
        check(&dir, "expected-layers.txt", layers_text(&composed).as_bytes()),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn docker_base_with_images_skip_n_env_and_content_layer() {
    run_case("docker-base");
}

#[test]
fn oci_base_keeps_annotations_drops_subject_and_relabels_docker_layers() {
    run_case("oci-base");
}

#[test]
fn zstd_layer_turns_docker_base_into_oci() {
    run_case("docker-zstd");
}

#[test]
fn every_fixture_case_is_tested() {
    let mut found: Vec<String> = fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut known: Vec<String> = CASES.iter().map(|s| s.to_string()).collect();
    known.sort();
    assert_eq!(found, known);
}
