//! Editing the base config as raw JSON.
//!
//! Only `rootfs`, `history` and `config.Env` change. Going through a typed struct would drop
//! the Docker-only keys (`Healthcheck`, `OnBuild`, `container_config`, …) that the reference
//! facade loses (podman-container-tools/skopeo#2575).

use serde_json::{Map, Value};

use crate::env::apply_env_rules;
use crate::error::{Error, Result};
use crate::types::AddedLayer;

pub(crate) fn edit(
    config: &mut Map<String, Value>,
    base_env: &[String],
    added_envs: &[&[String]],
    layers: &[AddedLayer<'_>],
    base_layer_count: usize,
) -> Result<()> {
    edit_rootfs(config, layers)?;
    edit_history(config, layers, base_layer_count)?;
    edit_env(config, base_env, added_envs)
}

fn edit_rootfs(config: &mut Map<String, Value>, layers: &[AddedLayer<'_>]) -> Result<()> {
    let Some(Value::Object(rootfs)) = config.get_mut("rootfs") else {
        return Err(Error::base("config has no rootfs object"));
    };
    rootfs.insert("type".to_string(), Value::String("layers".to_string()));
    let ids = rootfs.entry("diff_ids").or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(ids) = ids else {
        return Err(Error::base("config rootfs.diff_ids is not a list"));
    };
    // Runtimes pair diff_ids with manifest layers by position, so they go in manifest order.
    ids.extend(layers.iter().map(|l| Value::String(l.diff_id.to_string())));
    Ok(())
}

/// One non-empty history entry per added layer: buildah, Docker and Artifactory reject images
/// whose non-empty history count differs from the layer count (podman-container-tools/buildah#4025).
fn edit_history(config: &mut Map<String, Value>, layers: &[AddedLayer<'_>], base_layer_count: usize) -> Result<()> {
    if layers.is_empty() {
        return Ok(());
    }
    // The base's own timestamp keeps the output deterministic; "now" would change the digest
    // on every composition.
    let created = config.get("created").filter(|v| v.is_string()).cloned();
    let entries = layers.iter().map(|l| {
        let mut entry = Map::new();
        if let Some(created) = &created {
            entry.insert("created".to_string(), created.clone());
        }
        entry.insert("created_by".to_string(), Value::String(format!("registry-facade: {}", l.label)));
        Value::Object(entry)
    });
    match config.get_mut("history") {
        Some(Value::Array(history)) => history.extend(entries),
        Some(Value::Null) | None => {
            // Tools check the history only when there is one. Starting one with just our
            // entries on a base that has layers would make it disagree with the layer count
            // and turn a valid image into a rejected one, so the base's choice stands.
            if base_layer_count == 0 {
                config.insert("history".to_string(), Value::Array(entries.collect()));
            }
        }
        Some(_) => return Err(Error::base("config history is not a list")),
    }
    Ok(())
}

fn edit_env(config: &mut Map<String, Value>, base_env: &[String], added_envs: &[&[String]]) -> Result<()> {
    let had_env = config.get("config").and_then(|c| c.get("Env")).is_some_and(|e| !e.is_null());
    let env = apply_env_rules(base_env, added_envs);
    if env.as_slice() == base_env && (had_env || env.is_empty()) {
        return Ok(());
    }
    let run = config.entry("config").or_insert(Value::Null);
    if run.is_null() {
        *run = Value::Object(Map::new());
    }
    let Value::Object(run) = run else {
        return Err(Error::base("config.config is not an object"));
    };
    run.insert("Env".to_string(), Value::Array(env.into_iter().map(Value::String).collect()));
    Ok(())
}
