//! Building the manifest from the base manifest's raw JSON.

use facade_oci::media_types::{self as mt, Family};
use facade_oci::{Digest, ManifestView};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::types::{AddedLayer, ComposedLayer, LayerOrigin, REF_ANNOTATION, SIZE_ANNOTATION};

/// What the manifest is built for.
pub(crate) struct Target<'a> {
    pub(crate) family: Family,
    pub(crate) base_ref: &'a str,
    pub(crate) config_digest: &'a Digest,
    pub(crate) config_size: u64,
}

pub(crate) struct Built {
    pub(crate) manifest: Map<String, Value>,
    pub(crate) layers: Vec<ComposedLayer>,
}

/// The media type a layer of `media_type` gets in `family`, or `None` for an unknown type (or
/// zstd in Docker, which has no such type).
///
/// A type already in the family is kept as is, and non-distributable layers stay
/// non-distributable where the family can say so (Docker "foreign" ↔ OCI nondistributable
/// gzip), so that clients keep fetching them from their `urls`.
pub(crate) fn relabel(media_type: &str, family: Family) -> Option<&'static str> {
    match (family, media_type) {
        (Family::Docker, mt::DOCKER_LAYER_FOREIGN | mt::OCI_LAYER_NONDIST_GZIP) => Some(mt::DOCKER_LAYER_FOREIGN),
        (Family::Oci, mt::DOCKER_LAYER_FOREIGN | mt::OCI_LAYER_NONDIST_GZIP) => Some(mt::OCI_LAYER_NONDIST_GZIP),
        (Family::Oci, mt::OCI_LAYER_NONDIST_TAR) => Some(mt::OCI_LAYER_NONDIST_TAR),
        _ => mt::layer_type(family, mt::layer_compression(media_type)?),
    }
}

/// Sets `mediaType`, in place when present, else as the first key (where both specs' examples
/// put it).
fn set_media_type(map: &mut Map<String, Value>, media_type: &str) {
    let value = Value::String(media_type.to_string());
    if let Some(slot) = map.get_mut("mediaType") {
        *slot = value;
    } else {
        map.shift_insert(0, "mediaType".to_string(), value);
    }
}

pub(crate) fn build(
    mut manifest: Map<String, Value>,
    base: &ManifestView,
    target: &Target<'_>,
    added: Vec<AddedLayer<'_>>,
) -> Result<Built> {
    set_header(&mut manifest, target.family);
    set_config_descriptor(&mut manifest, target)?;
    let base_size = base
        .layers
        .iter()
        .try_fold(0u64, |sum, l| sum.checked_add(l.size))
        .ok_or_else(|| Error::base("layer sizes overflow"))?;
    let layers = set_layers(&mut manifest, base, target.family, added)?;
    set_annotations(&mut manifest, base_size, target.base_ref)?;
    Ok(Built { manifest, layers })
}

/// `schemaVersion` and `mediaType`, and none of the base's claims about itself.
fn set_header(manifest: &mut Map<String, Value>, family: Family) {
    // A copied `subject` would make the composed image claim to be a referrer of another
    // manifest; `artifactType` describes the base, not us.
    manifest.shift_remove("subject");
    manifest.shift_remove("artifactType");
    manifest.insert("schemaVersion".to_string(), Value::from(2));
    // Docker schema 2 requires `mediaType` (gitpod-io/gitpod#3397); OCI allows it, so it is
    // always emitted, right after `schemaVersion` when the base had none.
    let media_type = Value::String(mt::manifest_type(family).to_string());
    if let Some(slot) = manifest.get_mut("mediaType") {
        *slot = media_type;
    } else {
        let at = manifest.keys().position(|k| k == "schemaVersion").map_or(0, |i| i + 1);
        manifest.shift_insert(at, "mediaType".to_string(), media_type);
    }
}

/// Points the config descriptor at the composed config.
fn set_config_descriptor(manifest: &mut Map<String, Value>, target: &Target<'_>) -> Result<()> {
    let Some(Value::Object(config)) = manifest.get_mut("config") else {
        return Err(Error::base("manifest config is not a descriptor"));
    };
    set_media_type(config, mt::config_type(target.family));
    config.insert("digest".to_string(), Value::String(target.config_digest.to_string()));
    config.insert("size".to_string(), Value::from(target.config_size));
    // Inline `data` would be the base config's bytes (bazel-contrib/rules_oci#756), and `urls`
    // would point at a blob that is not ours.
    config.shift_remove("data");
    config.shift_remove("urls");
    Ok(())
}

/// The base's layer descriptors (re-labelled only on a family change) followed by the added
/// ones, in the manifest and in the returned list alike.
fn set_layers(
    manifest: &mut Map<String, Value>,
    base: &ManifestView,
    family: Family,
    added: Vec<AddedLayer<'_>>,
) -> Result<Vec<ComposedLayer>> {
    let base_family = mt::family_of(&base.media_type);
    let layers_json = manifest.entry("layers").or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(layers_json) = layers_json else {
        return Err(Error::base("manifest layers are not a list"));
    };
    let mut layers = Vec::with_capacity(base.layers.len() + added.len());
    for (desc, raw) in base.layers.iter().zip(layers_json.iter_mut()) {
        let mut media_type = desc.media_type.clone();
        // Base layers are copied verbatim; only a family change (Docker → OCI for zstd)
        // re-labels them, and a type with no equivalent stays as it was.
        if base_family != Some(family)
            && let (Some(new), Value::Object(raw)) = (relabel(&desc.media_type, family), raw)
        {
            set_media_type(raw, new);
            media_type = new.to_string();
        }
        layers.push(ComposedLayer {
            digest: desc.digest.clone(),
            size: desc.size,
            media_type,
            origin: LayerOrigin::Base,
        });
    }
    for layer in added {
        let (descriptor, composed) = added_descriptor(layer, family)?;
        layers_json.push(Value::Object(descriptor));
        layers.push(composed);
    }
    Ok(layers)
}

fn added_descriptor(layer: AddedLayer<'_>, family: Family) -> Result<(Map<String, Value>, ComposedLayer)> {
    let media_type = match &layer.source_media_type {
        Some(source) => relabel(source, family),
        None => mt::layer_type(family, layer.compression),
    }
    .ok_or_else(|| {
        Error::addition(layer.label, format!("layer {} has no media type in the target family", layer.digest))
    })?;
    let mut descriptor = layer.descriptor;
    set_media_type(&mut descriptor, media_type);
    // Docker schema 2 descriptors have no annotations.
    if family == Family::Docker {
        descriptor.shift_remove("annotations");
    }
    let composed = ComposedLayer {
        digest: layer.digest,
        size: layer.size,
        media_type: media_type.to_string(),
        origin: LayerOrigin::Addition(layer.origin),
    };
    Ok((descriptor, composed))
}

/// ws-daemon reads these from containerd's content store on every manifest the facade serves,
/// Docker schema 2 included: the reference writes them into both families (Docker schema 2 has
/// no `annotations` field, but clients decode manifests leniently and containerd keeps the
/// bytes as served).
fn set_annotations(manifest: &mut Map<String, Value>, base_size: u64, base_ref: &str) -> Result<()> {
    let annotations = manifest.entry("annotations").or_insert(Value::Null);
    if annotations.is_null() {
        *annotations = Value::Object(Map::new());
    }
    let Value::Object(annotations) = annotations else {
        return Err(Error::base("manifest annotations are not an object"));
    };
    annotations.insert(SIZE_ANNOTATION.to_string(), Value::String(base_size.to_string()));
    annotations.insert(REF_ANNOTATION.to_string(), Value::String(base_ref.to_string()));
    Ok(())
}
