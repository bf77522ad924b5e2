//! The inputs of one composition and what comes back out of it: the spec's parts in
//! layer-source order (the rule lives in `facade_compose::layer_sources`), held with their
//! fetched images as `facade_compose` additions, and, from the composed layers, the digest →
//! source index that blob requests look up.

use std::collections::HashMap;
use std::sync::Arc;

use facade_compose::{Addition, Composed, LayerInput, LayerOrigin, LayerSource};
use facade_oci::media_types::{self as mt, Compression};
use facade_oci::{Digest, ImageRef};
use facade_spec::{ContentLayer, ImageSpec};

use super::fetch::FetchedImage;
use super::static_layers::StaticLayer;
use super::{BlobEntry, BlobOrigin};
use crate::blobs::fill::UpstreamBlob;
use crate::error::{Error, Result};

/// One addition of the spec or the configuration, in layer-source order.
pub(super) type Part<'a> = LayerSource<&'a StaticLayer, &'a ImageRef, &'a ContentLayer>;

/// The additions of `spec` after `statics`, in the order their layers are appended.
pub(super) fn parts<'a>(statics: &'a [StaticLayer], spec: &'a ImageSpec) -> Vec<Part<'a>> {
    facade_compose::layer_sources(
        statics,
        spec.ide_ref.as_ref(),
        spec.supervisor_ref.as_ref(),
        &spec.ide_layer_refs,
        &spec.content_layers,
    )
}

/// The image a part names, if it is one: fetched before composing.
pub(super) fn image_ref<'a>(part: &Part<'a>) -> Option<&'a ImageRef> {
    match part {
        LayerSource::Static(StaticLayer::Image(r)) => Some(r),
        LayerSource::Ide(r) | LayerSource::Supervisor(r) | LayerSource::IdeLayer(r) => Some(r),
        LayerSource::Static(StaticLayer::File(_)) | LayerSource::Content(_) => None,
    }
}

/// A part with what composing it needs, kept alive while the additions borrow it.
pub(super) enum Held {
    /// An image: its layers are appended.
    Image { label: String, image: Arc<FetchedImage> },
    /// A single layer and where its bytes are.
    Layer { label: String, input: LayerInput, origin: BlobOrigin },
}

/// Pairs each part with its fetched image (`fetched` in the order of the image parts).
pub(super) fn hold(parts: &[Part<'_>], fetched: Vec<Arc<FetchedImage>>) -> Result<Vec<Held>> {
    let mut fetched = fetched.into_iter();
    parts
        .iter()
        .map(|part| match image_ref(part) {
            Some(r) => {
                let image = fetched
                    .next()
                    .ok_or_else(|| Error::BadImage { image: r.to_string(), reason: "not fetched".into() })?;
                let label = match part {
                    LayerSource::Static(_) => format!("static layer {r}"),
                    other => other.role().to_string(),
                };
                Ok(Held::Image { label, image })
            }
            None => hold_layer(part),
        })
        .collect()
}

fn hold_layer(part: &Part<'_>) -> Result<Held> {
    Ok(match part {
        LayerSource::Static(StaticLayer::File(f)) => Held::Layer {
            label: format!("static layer {}", f.path.display()),
            origin: match &f.memory {
                Some(b) => BlobOrigin::Bytes(b.clone()),
                None => BlobOrigin::Stored,
            },
            input: LayerInput {
                digest: f.digest.clone(),
                diff_id: f.diff_id.clone(),
                size: f.size,
                compression: f.compression,
            },
        },
        LayerSource::Content(ContentLayer::Remote(r)) => Held::Layer {
            label: "content layer".into(),
            input: LayerInput {
                digest: r.digest.clone(),
                diff_id: r.diff_id.clone(),
                size: r.size,
                compression: r.compression,
            },
            origin: BlobOrigin::Remote { url: r.url.clone() },
        },
        LayerSource::Content(ContentLayer::Direct { content }) => {
            let digest = Digest::sha256_of(content);
            Held::Layer {
                label: "content layer".into(),
                input: LayerInput {
                    digest: digest.clone(),
                    diff_id: digest,
                    size: content.len() as u64,
                    compression: Compression::None,
                },
                origin: BlobOrigin::Bytes(content.clone()),
            }
        }
        LayerSource::Static(StaticLayer::Image(_))
        | LayerSource::Ide(_)
        | LayerSource::Supervisor(_)
        | LayerSource::IdeLayer(_) => {
            return Err(Error::BadImage { image: part.role().into(), reason: "an image is not a single layer".into() });
        }
    })
}

/// The additions `facade_compose::compose` takes, borrowing from `held`.
pub(super) fn additions(held: &[Held]) -> Vec<Addition<'_>> {
    held.iter()
        .map(|h| match h {
            Held::Image { label, image } => Addition::Image {
                label,
                manifest: &image.manifest,
                manifest_media_type: &image.manifest_media_type,
                config: &image.config,
            },
            Held::Layer { label, input, .. } => Addition::Layer { label, layer: input.clone() },
        })
        .collect()
}

/// Every blob of the composed image and where its bytes are: the synthesized config from
/// memory, base layers from the base image's registry, added layers from their addition.
pub(super) fn blob_index(
    composed: &Composed,
    base: &FetchedImage,
    held: &[Held],
) -> Result<HashMap<Digest, BlobEntry>> {
    let mut blobs = HashMap::with_capacity(composed.layers.len() + 1);
    let config_type = mt::family_of(composed.manifest_media_type).map(mt::config_type).unwrap_or(mt::OCI_CONFIG);
    blobs.insert(
        composed.config_digest.clone(),
        BlobEntry {
            size: composed.config.len() as u64,
            media_type: config_type.to_string(),
            origin: BlobOrigin::Bytes(composed.config_bytes()),
        },
    );
    for layer in &composed.layers {
        let origin = match layer.origin {
            LayerOrigin::Base => upstream(base),
            LayerOrigin::Addition(i) => match held.get(i) {
                Some(Held::Image { image, .. }) => upstream(image),
                Some(Held::Layer { origin, .. }) => origin.clone(),
                None => {
                    return Err(Error::BadImage {
                        image: base.registry.clone(),
                        reason: format!("composition named unknown addition {i}"),
                    });
                }
            },
        };
        blobs.entry(layer.digest.clone()).or_insert(BlobEntry {
            size: layer.size,
            media_type: layer.media_type.clone(),
            origin,
        });
    }
    Ok(blobs)
}

fn upstream(image: &FetchedImage) -> BlobOrigin {
    BlobOrigin::Upstream(UpstreamBlob { registry: image.registry.clone(), repo: image.repo.clone() })
}
