//! Fetching the images a workspace is made of (base, IDE, supervisor, static image layers) with
//! caches that keep Docker Hub quotas and latency low: tags are re-resolved with HEAD (free on
//! Hub) only after a short TTL, served stale when upstream fails, and content is cached by digest
//! (immutable) with one fetch per digest however many compositions ask at once.
//!
//! With a cluster cache, Redis is a shared second level behind the in-process caches: a tag
//! another node resolved within the cluster tag TTL, and manifests and configs by digest
//! (checked against the digest before use), are not asked of upstream again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use facade_oci::{Digest, ImageRef, ParsedManifest, Platform, Reference, RepoName};

use crate::cluster::ClusterCache;
use crate::error::{Error, Result};
use crate::sync::lock;

/// A single-platform image as fetched from its registry.
#[derive(Debug)]
pub struct FetchedImage {
    /// Registry host as written.
    pub registry: String,
    /// Repository.
    pub repo: RepoName,
    /// The digest the reference resolved to (an index's digest for multi-platform images).
    pub resolved: Digest,
    /// The image manifest's bytes (the chosen platform's).
    pub manifest: Bytes,
    /// Its media type.
    pub manifest_media_type: String,
    /// The image config's bytes.
    pub config: Bytes,
}

/// Knobs of the fetcher.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// The platform picked from indexes.
    pub platform: Platform,
    /// How long a tag → digest resolution is trusted.
    pub tag_ttl: Duration,
    /// Bytes of manifests and configs kept by digest (`facade.imageCacheBytes`; a count of
    /// images alone let an upstream's big configs grow the cache to GiBs).
    pub max_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig { platform: Platform::host(), tag_ttl: Duration::from_secs(60), max_bytes: 64 << 20 }
    }
}

type DigestKey = (String, String, Digest);

/// Fetches images with caches.
pub struct ImageFetcher {
    client: facade_upstream::Client,
    config: FetchConfig,
    tags: Mutex<HashMap<String, (Digest, Instant)>>,
    by_digest: moka::future::Cache<DigestKey, Arc<FetchedImage>>,
    cluster: Option<Arc<ClusterCache>>,
}

impl ImageFetcher {
    /// A fetcher using `client`.
    pub fn new(client: facade_upstream::Client, config: FetchConfig) -> Self {
        let by_digest = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|k: &DigestKey, img: &Arc<FetchedImage>| {
                let bytes = k.0.len() + k.1.len() + img.manifest.len() + img.config.len() + 256;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .time_to_idle(Duration::from_secs(6 * 3600))
            .build();
        ImageFetcher { client, config, tags: Mutex::new(HashMap::new()), by_digest, cluster: None }
    }

    /// Shares tags, manifests and configs through `cluster` (its Redis part).
    pub fn with_cluster(mut self, cluster: Option<Arc<ClusterCache>>) -> Self {
        self.cluster = cluster.filter(|c| c.has_redis());
        self
    }

    /// The upstream client.
    pub fn client(&self) -> &facade_upstream::Client {
        &self.client
    }

    /// The image `r` names, for the configured platform.
    pub async fn fetch(&self, r: &ImageRef) -> Result<Arc<FetchedImage>> {
        let digest = match &r.digest {
            Some(d) => d.clone(),
            None => self.resolve_tag(r).await?,
        };
        let key = (r.registry.clone(), r.repository.as_str().to_string(), digest.clone());
        let image = r.clone();
        self.by_digest
            .try_get_with(key, async move { self.fetch_by_digest(&image, &digest).await.map(Arc::new) })
            .await
            .map_err(Error::Shared)
    }

    async fn resolve_tag(&self, r: &ImageRef) -> Result<Digest> {
        let key = r.to_string();
        let cached = lock(&self.tags).get(&key).cloned();
        if let Some((d, at)) = &cached
            && at.elapsed() < self.config.tag_ttl
        {
            return Ok(d.clone());
        }
        if let Some(cluster) = &self.cluster
            && let Some(d) = cluster.tag(&key).await
        {
            lock(&self.tags).insert(key, (d.clone(), Instant::now()));
            return Ok(d);
        }
        match self.client.resolve(&r.registry, &r.repository, &r.reference()).await {
            Ok(resolved) => {
                if let Some(cluster) = &self.cluster {
                    cluster.put_tag(&key, &resolved.digest);
                }
                lock(&self.tags).insert(key, (resolved.digest.clone(), Instant::now()));
                Ok(resolved.digest)
            }
            Err(e) if cached.is_some() && (e.is_retryable() || e.kind() == facade_upstream::ErrorKind::RateLimited) => {
                let (d, at) = cached.unwrap_or_else(|| unreachable!());
                tracing::warn!(image = %r, error = %e, stale_seconds = at.elapsed().as_secs(), "tag resolution failed; using the last known digest");
                Ok(d)
            }
            Err(e) => Err(Error::upstream(r, e)),
        }
    }

    /// A manifest or index by digest: from the cluster if it has it (verified there), else
    /// from upstream (verified by the client), then shared.
    async fn manifest_by_digest(&self, r: &ImageRef, digest: &Digest) -> Result<(String, Bytes)> {
        if let Some(cluster) = &self.cluster
            && let Some(found) = cluster.manifest(digest).await
        {
            return Ok(found);
        }
        let m = self
            .client
            .manifest(&r.registry, &r.repository, &Reference::Digest(digest.clone()))
            .await
            .map_err(|e| Error::upstream(r, e))?;
        if let Some(cluster) = &self.cluster {
            cluster.put_manifest(digest, &m.media_type, &m.bytes);
        }
        Ok((m.media_type, m.bytes))
    }

    /// An image config by digest, from the cluster or upstream, like manifests.
    async fn config_by_digest(&self, r: &ImageRef, digest: &Digest) -> Result<Bytes> {
        if let Some(cluster) = &self.cluster
            && let Some(found) = cluster.config(digest).await
        {
            return Ok(found);
        }
        let bytes =
            self.client.blob_bytes(&r.registry, &r.repository, digest).await.map_err(|e| Error::upstream(r, e))?;
        if let Some(cluster) = &self.cluster {
            cluster.put_config(digest, &bytes);
        }
        Ok(bytes)
    }

    async fn fetch_by_digest(&self, r: &ImageRef, digest: &Digest) -> Result<FetchedImage> {
        let (top_media_type, top_bytes) = self.manifest_by_digest(r, digest).await?;
        let parsed = ParsedManifest::parse(&top_bytes, Some(&top_media_type))
            .map_err(|e| Error::BadImage { image: r.to_string(), reason: e.to_string() })?;
        let (manifest, media_type, view) = match parsed {
            ParsedManifest::Image(view) => (top_bytes, view.media_type.clone(), view),
            ParsedManifest::Index(index) => {
                let entry = index.select(&self.config.platform).ok_or_else(|| Error::BadImage {
                    image: r.to_string(),
                    reason: format!("no manifest for platform {} in the index", self.config.platform),
                })?;
                let (child_media_type, child_bytes) = self.manifest_by_digest(r, &entry.digest).await?;
                match ParsedManifest::parse(&child_bytes, Some(&child_media_type)) {
                    Ok(ParsedManifest::Image(view)) => (child_bytes, view.media_type.clone(), view),
                    Ok(ParsedManifest::Index(_)) => {
                        return Err(Error::BadImage {
                            image: r.to_string(),
                            reason: "index entry is another index".into(),
                        });
                    }
                    Err(e) => return Err(Error::BadImage { image: r.to_string(), reason: e.to_string() }),
                }
            }
        };
        let config = self.config_by_digest(r, &view.config.digest).await?;
        Ok(FetchedImage {
            registry: r.registry.clone(),
            repo: r.repository.clone(),
            resolved: digest.clone(),
            manifest,
            manifest_media_type: media_type,
            config,
        })
    }
}
