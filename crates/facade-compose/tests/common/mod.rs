//! Builders of small images for the behaviour and property tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use facade_oci::Digest;
use facade_oci::media_types as mt;
use serde_json::{Value, json};

/// A valid sha256 digest derived from `seed`.
pub fn digest(seed: &str) -> Digest {
    Digest::sha256_of(seed.as_bytes())
}

/// A layer descriptor.
pub fn layer(media_type: &str, seed: &str, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": digest(seed).to_string(), "size": size})
}

/// A config with `n` diff_ids derived from `seed`, the given env and labels.
pub fn config(seed: &str, n: usize, env: Option<&[&str]>, labels: Option<Value>) -> Value {
    let diff_ids: Vec<String> = (0..n).map(|i| digest(&format!("{seed}-diff-{i}")).to_string()).collect();
    let mut run = serde_json::Map::new();
    if let Some(env) = env {
        run.insert("Env".into(), json!(env));
    }
    if let Some(labels) = labels {
        run.insert("Labels".into(), labels);
    }
    json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": (0..n).map(|i| json!({"created_by": format!("step {i}")})).collect::<Vec<_>>(),
    })
}

/// Manifest and config bytes of an image; the manifest's config descriptor matches the config.
pub fn image(media_type: Option<&str>, layers: Vec<Value>, config: &Value) -> (Vec<u8>, Vec<u8>) {
    let config_bytes = serde_json::to_vec(config).unwrap();
    let family = media_type.and_then(mt::family_of).unwrap_or(mt::Family::Oci);
    let mut m = serde_json::Map::new();
    m.insert("schemaVersion".into(), json!(2));
    if let Some(media_type) = media_type {
        m.insert("mediaType".into(), json!(media_type));
    }
    m.insert(
        "config".into(),
        json!({
            "mediaType": mt::config_type(family),
            "digest": Digest::sha256_of(&config_bytes).to_string(),
            "size": config_bytes.len(),
        }),
    );
    m.insert("layers".into(), Value::Array(layers));
    (serde_json::to_vec(&Value::Object(m)).unwrap(), config_bytes)
}

/// An image of `n` layers of one media type, with a config built by [`config`].
pub fn simple_image(
    media_type: &str,
    layer_type: &str,
    seed: &str,
    n: usize,
    env: Option<&[&str]>,
    labels: Option<Value>,
) -> (Vec<u8>, Vec<u8>) {
    let layers = (0..n).map(|i| layer(layer_type, &format!("{seed}-{i}"), 100 + i as u64)).collect();
    image(Some(media_type), layers, &config(seed, n, env, labels))
}

/// Parses JSON bytes.
pub fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}
