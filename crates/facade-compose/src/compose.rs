//! Reading and checking the inputs, and the order in which the pieces are put together.

use facade_oci::media_types::{self as mt, Compression, Family};
use facade_oci::{Digest, ImageConfigView, ManifestView, ParsedManifest};
use serde_json::{Map, Value};

use crate::error::{Error, Result, clip};
use crate::skip_n::skip_n;
use crate::types::{AddedLayer, Addition, BaseInput, Composed, LayerInput};
use crate::{config, manifest};

/// The base image, parsed and checked.
pub(crate) struct BaseImage {
    pub(crate) manifest: Map<String, Value>,
    pub(crate) view: ManifestView,
    pub(crate) family: Family,
    pub(crate) config: Map<String, Value>,
    pub(crate) env: Vec<String>,
}

/// Composes the workspace image from `base` and `additions` (README, "Composition").
///
/// Layers come out as the base's layers followed by each addition's layers in slice order;
/// the caller orders the additions (static layers, `ide_ref`, `supervisor_ref`,
/// `ide_layer_ref`s, content layers). [`Addition::Image`] contributes its layers minus the
/// first N of its [`SKIP_N_LABEL`](crate::SKIP_N_LABEL) label, and its `GITPOD_ENV_*`
/// variables edit the environment ([`apply_env_rules`](crate::apply_env_rules)).
///
/// The config is the base's raw JSON with only `rootfs`, `history` and `config.Env` changed;
/// every other key keeps its value and position. The manifest keeps the base's media-type
/// family unless an added layer is zstd, which Docker cannot express: then the whole manifest
/// becomes OCI. Every manifest, Docker schema 2 included, gets the
/// `io.gitpod.workspace-image.*` annotations (as the reference writes them).
///
/// Byte-determinism: the result depends on nothing but the arguments (no clock, no
/// randomness, no hash-map order), so equal inputs give equal bytes and digests everywhere.
///
/// Every error means invalid input and is not worth retrying (see [`Error`]).
pub fn compose(base: &BaseInput<'_>, additions: &[Addition<'_>]) -> Result<Composed> {
    let base_image = parse_base(base)?;

    let mut layers: Vec<AddedLayer<'_>> = Vec::new();
    let mut envs: Vec<Vec<String>> = Vec::new();
    for (origin, addition) in additions.iter().enumerate() {
        match addition {
            Addition::Image { label, manifest, manifest_media_type, config } => {
                let image = parse_image(origin, label, manifest, manifest_media_type, config)?;
                layers.extend(image.layers);
                envs.push(image.env);
            }
            Addition::Layer { label, layer } => layers.push(single_layer(origin, label, layer)?),
        }
    }

    // Docker schema 2 has no zstd layer type and one manifest must not mix families (README,
    // "Composition"), so a single zstd layer turns the whole image into OCI.
    let family =
        if layers.iter().any(|l| l.compression == Compression::Zstd) { Family::Oci } else { base_image.family };

    let BaseImage { manifest: base_manifest, view, config: mut config_json, env, .. } = base_image;
    let env_refs: Vec<&[String]> = envs.iter().map(Vec::as_slice).collect();
    config::edit(&mut config_json, &env, &env_refs, &layers, view.layers.len())?;
    let config_bytes = to_bytes(config_json)?;
    let config_digest = Digest::sha256_of(&config_bytes);

    let out = manifest::build(
        base_manifest,
        &view,
        &manifest::Target {
            family,
            base_ref: base.base_ref,
            config_digest: &config_digest,
            config_size: config_bytes.len() as u64,
        },
        layers,
    )?;
    let manifest_bytes = to_bytes(out.manifest)?;
    Ok(Composed {
        manifest_digest: Digest::sha256_of(&manifest_bytes),
        manifest: manifest_bytes,
        manifest_media_type: mt::manifest_type(family),
        config: config_bytes,
        config_digest,
        layers: out.layers,
    })
}

fn to_bytes(map: Map<String, Value>) -> Result<Vec<u8>> {
    // A `Value` always has string keys, so this cannot fail; the error path only avoids a
    // panic in library code.
    serde_json::to_vec(&Value::Object(map)).map_err(|e| Error::base(format!("cannot serialize: {e}")))
}

fn parse_json_object(bytes: &[u8]) -> std::result::Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("not a JSON object".to_string()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// Parses an image manifest that must not be an index, returning its view and raw JSON.
fn parse_image_manifest(
    bytes: &[u8],
    media_type: &str,
) -> std::result::Result<(ManifestView, Map<String, Value>), String> {
    let view = match ParsedManifest::parse(bytes, Some(media_type)) {
        Ok(ParsedManifest::Image(view)) => view,
        Ok(ParsedManifest::Index(index)) => {
            return Err(format!(
                "manifest is an index ({}); the platform must be picked before composing",
                clip(&index.media_type)
            ));
        }
        Err(e) => return Err(format!("manifest: {e}")),
    };
    let raw = parse_json_object(bytes).map_err(|e| format!("manifest: {e}"))?;
    let raw_layers = raw.get("layers").and_then(Value::as_array).map_or(0, Vec::len);
    if raw_layers != view.layers.len() {
        return Err("manifest layers are not a list of descriptors".to_string());
    }
    Ok((view, raw))
}

/// Checks that `config` is the blob the manifest's config descriptor names. Composing on a
/// config of another image would produce an image whose layers and diff_ids disagree.
fn check_config_digest(view: &ManifestView, config: &[u8]) -> std::result::Result<(), String> {
    let want = &view.config.digest;
    if want.is_verifiable() && !want.matches(config) {
        return Err(format!(
            "config bytes hash to {}, but the manifest's config descriptor says {want}",
            Digest::sha256_of(config)
        ));
    }
    Ok(())
}

/// Runtimes pair layers with diff_ids by position; an image that disagrees cannot be unpacked,
/// and appending to it would only hide where the fault is.
fn check_diff_id_count(view: &ManifestView, config: &ImageConfigView) -> std::result::Result<(), String> {
    if config.diff_ids.len() != view.layers.len() {
        return Err(format!(
            "manifest has {} layers but config rootfs has {} diff_ids",
            view.layers.len(),
            config.diff_ids.len()
        ));
    }
    Ok(())
}

fn parse_base(base: &BaseInput<'_>) -> Result<BaseImage> {
    let (view, manifest) = parse_image_manifest(base.manifest, base.manifest_media_type).map_err(Error::base)?;
    let family = mt::family_of(&view.media_type)
        .ok_or_else(|| Error::base(format!("manifest media type {:?} has no family", clip(&view.media_type))))?;
    check_config_digest(&view, base.config).map_err(Error::base)?;
    let config = parse_json_object(base.config).map_err(|e| Error::base(format!("config: {e}")))?;
    let config_view = ImageConfigView::parse(base.config).map_err(|e| Error::base(format!("config: {e}")))?;
    if !config.get("rootfs").is_some_and(Value::is_object) {
        return Err(Error::base("config has no rootfs object"));
    }
    check_diff_id_count(&view, &config_view).map_err(Error::base)?;
    Ok(BaseImage { manifest, view, family, config, env: config_view.env })
}

struct AddedImage<'a> {
    layers: Vec<AddedLayer<'a>>,
    env: Vec<String>,
}

fn parse_image<'a>(
    origin: usize,
    label: &'a str,
    manifest: &[u8],
    media_type: &str,
    config: &[u8],
) -> Result<AddedImage<'a>> {
    let bad = |reason: String| Error::addition(label, reason);
    let (view, raw) = parse_image_manifest(manifest, media_type).map_err(bad)?;
    check_config_digest(&view, config).map_err(bad)?;
    let config_view = ImageConfigView::parse(config).map_err(|e| bad(format!("config: {e}")))?;
    check_diff_id_count(&view, &config_view).map_err(bad)?;
    let skip = skip_n(&config_view.labels).map_err(|e| bad(e.to_string()))?;

    let raw_layers = raw.get("layers").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    let mut layers = Vec::new();
    for ((desc, raw_desc), diff_id) in view.layers.iter().zip(raw_layers).zip(config_view.diff_ids).skip(skip) {
        let compression = mt::layer_compression(&desc.media_type)
            .ok_or_else(|| bad(format!("layer {} has unknown media type {:?}", desc.digest, clip(&desc.media_type))))?;
        let descriptor =
            raw_desc.as_object().cloned().ok_or_else(|| bad(format!("layer {} is not a JSON object", desc.digest)))?;
        layers.push(AddedLayer {
            origin,
            label,
            descriptor,
            source_media_type: Some(desc.media_type.clone()),
            compression,
            digest: desc.digest.clone(),
            size: desc.size,
            diff_id,
        });
    }
    Ok(AddedImage { layers, env: config_view.env })
}

fn single_layer<'a>(origin: usize, label: &'a str, layer: &LayerInput) -> Result<AddedLayer<'a>> {
    // The diff_id of an uncompressed layer is its digest; a different one means the caller
    // mixed up the compression, and containerd would fail to verify the unpacked layer.
    if layer.compression == Compression::None && layer.diff_id != layer.digest {
        return Err(Error::addition(
            label,
            format!("uncompressed layer {} has a different diff_id {}", layer.digest, layer.diff_id),
        ));
    }
    let mut descriptor = Map::new();
    descriptor.insert("mediaType".to_string(), Value::Null);
    descriptor.insert("digest".to_string(), Value::String(layer.digest.to_string()));
    descriptor.insert("size".to_string(), Value::from(layer.size));
    Ok(AddedLayer {
        origin,
        label,
        descriptor,
        source_media_type: None,
        compression: layer.compression,
        digest: layer.digest.clone(),
        size: layer.size,
        diff_id: layer.diff_id.clone(),
    })
}
