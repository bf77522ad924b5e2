//! Workspace images: spec → fetched inputs → composed manifest and config, with the digest →
//! source index built once at composition, so blob requests never re-resolve the base image or
//! rebuild the config (the reference did both on every blob request).
//!
//! A composed image is kept per (provider, id) for a short TTL, so the HEAD-by-tag and
//! GET-by-digest of one pull, and the pulls of many pods of one workspace, compose once. Every
//! composed version handed out stays servable by its digest for a while (bounded), so a pull that
//! started before a spec or tag changed still completes with the bytes it was promised.
//!
//! With Redis, each composed image is also shared as a record under its workspace and manifest
//! digest: a facade that restarted (or another replica) asked for a manifest digest or blob of
//! a composition it does not hold in memory serves it from the record — only for the same
//! workspace (a workspace never reads another's content), only if the manifest hashes to the
//! digest asked for, and with every in-record byte blob checked against its digest.

pub mod fetch;
mod inputs;
pub mod static_layers;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use facade_compose::BaseInput;
use facade_oci::{Digest, ImageRef, Reference, RepoName};
use facade_spec::Providers;
use serde::{Deserialize, Serialize};

use crate::blobs::fill::UpstreamBlob;
use crate::cluster::ClusterCache;
use crate::error::{Error, Result};
use crate::images::fetch::ImageFetcher;
use crate::images::static_layers::StaticLayer;
use crate::sync::{lock, read, write};

/// Where one blob of a composed image comes from.
#[derive(Clone, Debug)]
pub enum BlobOrigin {
    /// A layer of an upstream image.
    Upstream(UpstreamBlob),
    /// Bytes the facade holds (the synthesized config, direct content layers, static files
    /// without a store).
    Bytes(Bytes),
    /// A static file layer kept in the local store.
    Stored,
    /// A remote content layer: clients are redirected to its URL.
    Remote {
        /// The URL.
        url: String,
    },
}

/// A blob of a composed image.
#[derive(Clone, Debug)]
pub struct BlobEntry {
    /// Size in bytes.
    pub size: u64,
    /// Media type as in the manifest.
    pub media_type: String,
    /// Where the bytes are.
    pub origin: BlobOrigin,
}

/// One composed workspace image.
#[derive(Debug)]
pub struct ComposedImage {
    /// Manifest bytes (served as is).
    pub manifest: Bytes,
    /// sha256 of `manifest`.
    pub manifest_digest: Digest,
    /// Manifest media type.
    pub media_type: String,
    /// Every blob of the image: config and layers.
    pub blobs: HashMap<Digest, BlobEntry>,
}

/// Knobs of the image service.
#[derive(Clone, Debug)]
pub struct ImagesConfig {
    /// How long a composed image is reused before the spec and tags are looked at again.
    pub compose_ttl: Duration,
    /// Earlier versions of one workspace's image kept servable by digest.
    pub versions_per_workspace: usize,
    /// Bytes the composed images kept in memory may weigh together (manifests, configs and
    /// other in-memory blobs, and their blob index), `facade.imageCacheBytes`: a count of
    /// entries alone let a few big images (a spec's direct content layers) grow it to GiBs.
    pub max_bytes: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig { compose_ttl: Duration::from_secs(30), versions_per_workspace: 4, max_bytes: 64 << 20 }
    }
}

/// Bookkeeping of one blob index entry (key, entry, map slot), counted in an image's weight.
const INDEX_ENTRY_BYTES: usize = 256;

impl ComposedImage {
    /// What this image holds in memory, near enough for a cache's byte bound.
    pub fn weight(&self) -> usize {
        let blobs: usize = self
            .blobs
            .values()
            .map(|e| {
                let held = match &e.origin {
                    BlobOrigin::Bytes(b) => b.len(),
                    BlobOrigin::Upstream(u) => u.registry.len() + u.repo.as_str().len(),
                    BlobOrigin::Remote { url } => url.len(),
                    BlobOrigin::Stored => 0,
                };
                INDEX_ENTRY_BYTES + e.media_type.len() + held
            })
            .sum();
        self.manifest.len() + self.media_type.len() + blobs
    }
}

/// A moka weight: saturates instead of wrapping.
fn moka_weight(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

type WsKey = (String, String);

/// Composes and remembers workspace images.
pub struct Images {
    providers: RwLock<Providers>,
    fetcher: ImageFetcher,
    static_layers: RwLock<Arc<Vec<StaticLayer>>>,
    current: moka::future::Cache<WsKey, Arc<ComposedImage>>,
    versions: moka::sync::Cache<WsKey, Arc<Mutex<VecDeque<Arc<ComposedImage>>>>>,
    config: ImagesConfig,
    cluster: Option<Arc<ClusterCache>>,
}

/// Largest in-memory blob (config, direct content layer) a shared record carries.
const MAX_RECORD_INLINE_BYTES: usize = 1 << 20;

/// A composed image as shared through Redis.
#[derive(Serialize, Deserialize)]
struct Record {
    #[serde(rename = "mediaType")]
    media_type: String,
    /// Base64 of the manifest bytes.
    manifest: String,
    blobs: Vec<RecordBlob>,
}

#[derive(Serialize, Deserialize)]
struct RecordBlob {
    digest: String,
    size: u64,
    #[serde(rename = "mediaType")]
    media_type: String,
    origin: RecordOrigin,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum RecordOrigin {
    Upstream {
        registry: String,
        repo: String,
    },
    /// Base64 of the bytes.
    Bytes(String),
    Stored,
    Remote(String),
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Record {
    fn of(img: &ComposedImage) -> Option<Record> {
        let mut inline = 0usize;
        let mut blobs = Vec::with_capacity(img.blobs.len());
        for (digest, e) in &img.blobs {
            let origin = match &e.origin {
                BlobOrigin::Upstream(u) => {
                    RecordOrigin::Upstream { registry: u.registry.clone(), repo: u.repo.as_str().to_string() }
                }
                BlobOrigin::Bytes(b) => {
                    inline += b.len();
                    if inline > MAX_RECORD_INLINE_BYTES {
                        return None;
                    }
                    RecordOrigin::Bytes(b64().encode(b))
                }
                BlobOrigin::Stored => RecordOrigin::Stored,
                BlobOrigin::Remote { url } => RecordOrigin::Remote(url.clone()),
            };
            blobs.push(RecordBlob {
                digest: digest.to_string(),
                size: e.size,
                media_type: e.media_type.clone(),
                origin,
            });
        }
        blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
        Some(Record { media_type: img.media_type.clone(), manifest: b64().encode(&img.manifest), blobs })
    }

    /// The image, if the record is whole and true: the manifest hashes to `digest` and every
    /// inline blob to its own digest.
    fn into_image(self, digest: &Digest) -> std::result::Result<ComposedImage, String> {
        let manifest = Bytes::from(b64().decode(&self.manifest).map_err(|e| format!("manifest: {e}"))?);
        if !digest.matches(&manifest) {
            return Err("manifest does not match its digest".into());
        }
        let mut blobs = HashMap::with_capacity(self.blobs.len());
        for b in self.blobs {
            let d = Digest::parse(&b.digest).map_err(|e| format!("blob digest: {e}"))?;
            let origin = match b.origin {
                RecordOrigin::Upstream { registry, repo } => BlobOrigin::Upstream(UpstreamBlob {
                    registry,
                    repo: RepoName::parse(&repo).map_err(|e| format!("repo: {e}"))?,
                }),
                RecordOrigin::Bytes(s) => {
                    let bytes = Bytes::from(b64().decode(&s).map_err(|e| format!("blob {d}: {e}"))?);
                    if !d.matches(&bytes) || bytes.len() as u64 != b.size {
                        return Err(format!("inline blob {d} does not match its digest"));
                    }
                    BlobOrigin::Bytes(bytes)
                }
                RecordOrigin::Stored => BlobOrigin::Stored,
                RecordOrigin::Remote(url) => BlobOrigin::Remote { url },
            };
            blobs.insert(d, BlobEntry { size: b.size, media_type: b.media_type, origin });
        }
        Ok(ComposedImage { manifest, manifest_digest: digest.clone(), media_type: self.media_type, blobs })
    }
}

impl Images {
    /// An image service.
    pub fn new(
        config: ImagesConfig,
        providers: Providers,
        fetcher: ImageFetcher,
        static_layers: Vec<StaticLayer>,
    ) -> Self {
        // Bounded by bytes, not entries. The current images get a quarter of the budget: they
        // are also among the versions, which get the rest, so both together stay within it.
        let current_bytes = config.max_bytes / 4;
        let versions_bytes = config.max_bytes - current_bytes;
        let current = moka::future::Cache::builder()
            .max_capacity(current_bytes)
            .weigher(|_: &WsKey, img: &Arc<ComposedImage>| moka_weight(img.weight()))
            .time_to_live(config.compose_ttl)
            .build();
        let versions = moka::sync::Cache::builder()
            .max_capacity(versions_bytes)
            .weigher(|_: &WsKey, list: &Arc<Mutex<VecDeque<Arc<ComposedImage>>>>| {
                moka_weight(lock(list).iter().map(|v| v.weight()).sum::<usize>().max(INDEX_ENTRY_BYTES))
            })
            .time_to_idle(Duration::from_secs(3600))
            .build();
        Images {
            providers: RwLock::new(providers),
            fetcher,
            static_layers: RwLock::new(Arc::new(static_layers)),
            current,
            versions,
            config,
            cluster: None,
        }
    }

    /// Shares composed images through `cluster` (its Redis part).
    pub fn with_cluster(mut self, cluster: Option<Arc<ClusterCache>>) -> Self {
        self.cluster = cluster.filter(|c| c.has_redis());
        self
    }

    /// Swaps the static layers (config reload). Images composed before stay servable by digest.
    pub fn set_static_layers(&self, layers: Vec<StaticLayer>) {
        *write(&self.static_layers) = Arc::new(layers);
        self.current.invalidate_all();
    }

    /// The providers in use now.
    pub fn providers(&self) -> Providers {
        read(&self.providers).clone()
    }

    /// Swaps the providers (config reload).
    pub fn set_providers(&self, providers: Providers) {
        *write(&self.providers) = providers;
        self.current.invalidate_all();
    }

    /// The image fetcher (shares the upstream client).
    pub fn fetcher(&self) -> &ImageFetcher {
        &self.fetcher
    }

    /// The current image of a workspace, composing it if needed (one composition per workspace
    /// at a time, however many requests ask).
    pub async fn image(&self, provider: &str, id: &str) -> Result<Arc<ComposedImage>> {
        let key = (provider.to_string(), id.to_string());
        self.current
            .try_get_with(key.clone(), async {
                let img = Arc::new(self.compose(provider, id).await?);
                self.remember(&key, &img);
                self.share(provider, id, &img);
                Ok::<_, Error>(img)
            })
            .await
            .map_err(Error::Shared)
    }

    fn remember(&self, key: &WsKey, img: &Arc<ComposedImage>) {
        let list = self.versions.get_with(key.clone(), || Arc::new(Mutex::new(VecDeque::new())));
        {
            let mut l = lock(&list);
            if l.iter().any(|v| v.manifest_digest == img.manifest_digest) {
                return;
            }
            l.push_front(img.clone());
            l.truncate(self.config.versions_per_workspace.max(1));
        }
        // moka weighs an entry when it is inserted: insert the grown list again.
        self.versions.insert(key.clone(), list);
    }

    fn share(&self, provider: &str, id: &str, img: &ComposedImage) {
        let Some(cluster) = &self.cluster else { return };
        match Record::of(img).and_then(|r| serde_json::to_vec(&r).ok()) {
            Some(bytes) => cluster.put_composed(
                &format!("{provider}/{id}"),
                &img.manifest_digest,
                bytes,
                self.config.versions_per_workspace.max(1),
            ),
            None => tracing::debug!(provider, id, "composed image too large to share"),
        }
    }

    /// A composition of this workspace that another facade (or this one before a restart)
    /// handed out: with `digest` when given, else the first recent one holding `blob`.
    async fn recall(
        &self,
        provider: &str,
        id: &str,
        digest: Option<&Digest>,
        blob: Option<&Digest>,
    ) -> Option<Arc<ComposedImage>> {
        let cluster = self.cluster.as_ref()?;
        let ws = format!("{provider}/{id}");
        let candidates = match digest {
            Some(d) => vec![d.clone()],
            None => {
                let mut l = cluster.composed_list(&ws).await;
                l.truncate(self.config.versions_per_workspace.max(1));
                l
            }
        };
        for d in candidates {
            if self.find_version(provider, id, |v| v.manifest_digest == d).is_some() {
                continue;
            }
            let Some(raw) = cluster.composed(&ws, &d).await else { continue };
            let img = match serde_json::from_slice::<Record>(&raw)
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_image(&d))
            {
                Ok(img) => Arc::new(img),
                Err(reason) => {
                    tracing::warn!(provider, id, digest = %d, %reason, "ignoring a composed image record from Redis");
                    continue;
                }
            };
            if blob.is_some_and(|b| !img.blobs.contains_key(b)) {
                continue;
            }
            tracing::info!(provider, id, digest = %d, "serving a composition shared through Redis");
            self.remember(&(provider.to_string(), id.to_string()), &img);
            return Some(img);
        }
        None
    }

    fn find_version(
        &self,
        provider: &str,
        id: &str,
        pred: impl Fn(&ComposedImage) -> bool,
    ) -> Option<Arc<ComposedImage>> {
        let list = self.versions.get(&(provider.to_string(), id.to_string()))?;
        let l = lock(&list);
        l.iter().find(|v| pred(v)).cloned()
    }

    /// The manifest for `reference`: any tag means the current image; a digest must be one this
    /// workspace's image had, and is served with exactly those bytes.
    pub async fn manifest(&self, provider: &str, id: &str, reference: &Reference) -> Result<Arc<ComposedImage>> {
        match reference {
            Reference::Tag(_) => self.image(provider, id).await,
            Reference::Digest(d) => {
                if let Some(v) = self.find_version(provider, id, |v| v.manifest_digest == *d) {
                    return Ok(v);
                }
                let img = match self.image(provider, id).await {
                    Ok(img) if img.manifest_digest == *d => return Ok(img),
                    Ok(_) => None,
                    Err(e) if e.is_retryable() => Some(e),
                    Err(e) => return Err(e),
                };
                match (self.recall(provider, id, Some(d), None).await, img) {
                    (Some(v), _) => Ok(v),
                    (None, Some(e)) => Err(e),
                    (None, None) => Err(Error::ManifestNotInImage { digest: d.clone() }),
                }
            }
        }
    }

    /// A blob of this workspace's image (current, or a version handed out before). A digest
    /// the workspace's image does not contain is unknown, whatever other images hold it.
    pub async fn blob(&self, provider: &str, id: &str, digest: &Digest) -> Result<BlobEntry> {
        match self.image(provider, id).await {
            Ok(img) => {
                if let Some(e) = img.blobs.get(digest) {
                    return Ok(e.clone());
                }
                if let Some(e) = self
                    .find_version(provider, id, |v| v.blobs.contains_key(digest))
                    .and_then(|v| v.blobs.get(digest).cloned())
                {
                    return Ok(e);
                }
                self.recall(provider, id, None, Some(digest))
                    .await
                    .and_then(|v| v.blobs.get(digest).cloned())
                    .ok_or_else(|| Error::BlobNotInImage { digest: digest.clone() })
            }
            Err(e) => {
                // A provider or upstream blip must not break a pull already under way: the
                // versions handed out are still good.
                if e.is_retryable() {
                    let known = match self.find_version(provider, id, |v| v.blobs.contains_key(digest)) {
                        Some(v) => Some(v),
                        None => self.recall(provider, id, None, Some(digest)).await,
                    };
                    if let Some(v) = known {
                        tracing::warn!(provider, id, error = %e, "serving a blob of an earlier composition while the image cannot be composed");
                        return v
                            .blobs
                            .get(digest)
                            .cloned()
                            .ok_or_else(|| Error::BlobNotInImage { digest: digest.clone() });
                    }
                }
                Err(e)
            }
        }
    }

    async fn compose(&self, provider_name: &str, id: &str) -> Result<ComposedImage> {
        let provider = read(&self.providers).get(provider_name)?.clone();
        let spec = provider.get_spec(id).await?;
        let statics = read(&self.static_layers).clone();
        let parts = inputs::parts(&statics, &spec);
        let refs: Vec<&ImageRef> = parts.iter().filter_map(inputs::image_ref).collect();
        let (base, fetched) = futures::future::join(
            self.fetcher.fetch(&spec.base_ref),
            futures::future::join_all(refs.iter().map(|r| self.fetcher.fetch(r))),
        )
        .await;
        let base = base?;
        let held = inputs::hold(&parts, fetched.into_iter().collect::<Result<Vec<_>>>()?)?;
        let base_ref = spec.base_ref.to_string();
        let base_input = BaseInput {
            base_ref: &base_ref,
            manifest: &base.manifest,
            manifest_media_type: &base.manifest_media_type,
            config: &base.config,
        };
        let composed = facade_compose::compose(&base_input, &inputs::additions(&held))
            .map_err(|source| Error::Compose { context: format!("{provider_name}/{id}"), source })?;
        let blobs = inputs::blob_index(&composed, &base, &held)?;
        tracing::debug!(provider = provider_name, id, digest = %composed.manifest_digest, layers = blobs.len() - 1, "composed workspace image");
        Ok(ComposedImage {
            manifest: composed.manifest_bytes(),
            manifest_digest: composed.manifest_digest,
            media_type: composed.manifest_media_type.to_string(),
            blobs,
        })
    }
}
