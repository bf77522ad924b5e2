//! The cluster cache: Redis as the index, IPFS as the content, shared by the facades of every
//! node, so a blob one node fetched is not fetched from upstream again by another.
//!
//! What Redis holds (every key under the namespace, every entry with a TTL):
//! - `tag:<registry>/<repo>:<tag>` → digest, for the cluster tag TTL only: mutable tags must
//!   move (the reference froze them forever);
//! - `manifest:<digest>` → media type and bytes of an upstream manifest or index, and
//!   `config:<digest>` → an upstream image config; both verified against the digest on read;
//! - `composed:<provider>/<id>:<digest>` → a composed image record of that workspace, and
//!   `composed-list:<provider>/<id>` → its recent manifest digests (see `images`);
//! - `blob:<digest>` → `{cid, mediaType, size, origins, pinner}`, the IPFS index;
//! - `ipfs-pins:<peer ID>` and `ipfs-sweep:<peer ID>`: the pins made on one IPFS node and the
//!   lease of its sweep (see `pins`: pins follow the index).
//!
//! Nothing here can fail a pull. Every call has a short deadline and goes through the
//! dependency's [`Breaker`]; a failure, timeout or garbage answer is `None` ("the cache has
//! nothing"), counted and logged once per outage, and the caller goes on to the next source.
//! Content from the cluster is never trusted: blobs are hashed while they stream (see `fill`),
//! manifests and configs before they are used.

pub mod breaker;
pub mod ipfs;
pub mod lease;
pub mod metrics;
pub mod pins;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use facade_oci::Digest;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub use breaker::{Breaker, BreakerConfig};
pub use ipfs::{IpfsConfig, IpfsStore, api_url_from_multiaddr};
pub use metrics::{
    BackfillOutcome, BackfillStore, CacheName, ClusterMetrics, DependencyMetrics, LookupResult, UnpinReason,
};
pub use pins::SweepReport;
pub use redis::{RedisConfig, RedisKv, RedisTopology};

use crate::error::Result;

/// How often a dependency in an outage is checked for recovery (each check still waits for the
/// breaker's backoff).
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Knobs of the cluster cache.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Redis, if configured.
    pub redis: Option<RedisConfig>,
    /// IPFS, if configured. Blobs are shared only when both are.
    pub ipfs: Option<IpfsConfig>,
    /// How long a tag → digest resolution is shared.
    pub tag_ttl: Duration,
    /// Life of a blob index entry (extended on every hit).
    pub index_ttl: Duration,
    /// Life of manifests and configs by digest, and of composed image records.
    pub content_ttl: Duration,
    /// Largest manifest, config or record kept in Redis.
    pub max_value_bytes: usize,
    /// Backoff of both breakers.
    pub breaker: BreakerConfig,
    /// Most bytes of blobs kept pinned on one IPFS node (None: bounded by `index_ttl` only).
    pub ipfs_max_bytes: Option<u64>,
    /// How often a facade sweeps its IPFS node's pins (see `pins`).
    pub pin_sweep_interval: Duration,
}

impl ClusterConfig {
    /// The sweep interval for an index TTL: a quarter of it, between 1 s and 1 min, so an
    /// expired entry's pin goes within about a minute and short test TTLs are seen quickly.
    pub fn sweep_interval_for(index_ttl: Duration) -> Duration {
        (index_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            ipfs: None,
            tag_ttl: Duration::from_secs(300),
            index_ttl: Duration::from_secs(7 * 24 * 3600),
            content_ttl: Duration::from_secs(24 * 3600),
            max_value_bytes: 4 << 20,
            breaker: BreakerConfig::default(),
            ipfs_max_bytes: None,
            pin_sweep_interval: Duration::from_secs(60),
        }
    }
}

/// Where the cluster has a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The IPFS CID of the blob's bytes.
    pub cid: String,
    /// Its media type, as the manifest that first named it said.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// The origins (`registry/repository`) the blob was downloaded from. A node serves an
    /// entry only to requests whose image names one of them: a digest is no secret, and
    /// naming it on a registry of one's own must not fetch another tenant's layer out of
    /// the cluster (docs/security-model.md). Entries without origins are not used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
    /// The peer ID of the IPFS node whose pin keeps the content (its record is scored by the
    /// entry's hits); absent in entries written before pins were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinner: Option<String>,
}

struct RedisSide {
    kv: RedisKv,
    breaker: Breaker,
    timeout: Duration,
}

struct IpfsSide {
    store: IpfsStore,
    breaker: Breaker,
    /// The node's peer ID once asked (see `pins`).
    peer: std::sync::Mutex<Option<String>>,
}

/// The cluster cache of one facade.
pub struct ClusterCache {
    redis: Option<RedisSide>,
    ipfs: Option<IpfsSide>,
    config: ClusterConfig,
    metrics: ClusterMetrics,
    /// The pins this process made (see `pins`).
    local_pins: std::sync::Mutex<pins::LocalPins>,
    /// This process, as the holder of sweep leases.
    me: String,
}

impl std::fmt::Debug for ClusterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCache")
            .field("redis", &self.redis.as_ref().map(|r| r.breaker.is_up()))
            .field("ipfs", &self.ipfs.as_ref().map(|i| i.store.api().to_string()))
            .finish()
    }
}

impl ClusterCache {
    /// A cluster cache over the configured dependencies. Connects lazily: a dependency that is
    /// down at start-up is an outage like any other, not a reason not to start. Needs a tokio
    /// runtime.
    pub fn new(config: ClusterConfig, metrics: ClusterMetrics) -> Result<Arc<Self>> {
        let redis = match &config.redis {
            Some(rc) => Some(RedisSide {
                kv: RedisKv::connect(rc)?,
                breaker: Breaker::new("redis", config.breaker, metrics.dependency("redis")),
                // The client's own deadline is per connect and per response; this one bounds a
                // whole call including a reconnect.
                timeout: rc.timeout * 2,
            }),
            None => None,
        };
        let ipfs = match &config.ipfs {
            Some(ic) => Some(IpfsSide {
                store: IpfsStore::new(ic.clone())?,
                breaker: Breaker::new("ipfs", config.breaker, metrics.dependency("ipfs")),
                peer: std::sync::Mutex::new(None),
            }),
            None => None,
        };
        let me = format!("{}-{}", std::process::id(), pins::now_millis());
        let local_pins = std::sync::Mutex::new(pins::LocalPins::default());
        let cache = Arc::new(ClusterCache { redis, ipfs, config, metrics, local_pins, me });
        cache.spawn_sweeper();
        let weak = Arc::downgrade(&cache);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                cache.probe().await;
            }
        });
        Ok(cache)
    }

    /// During an outage, tries the dependency once its backoff has passed, so recovery is
    /// noticed without waiting for a pull to be the trial (the first pull after an outage then
    /// uses the cache already).
    async fn probe(&self) {
        if let Some(r) = &self.redis
            && !r.breaker.is_up()
            && r.breaker.allow()
        {
            r.breaker.call(r.timeout, r.kv.ping()).await;
        }
        if let Some(i) = &self.ipfs
            && !i.breaker.is_up()
            && i.breaker.allow()
        {
            let timeout =
                self.config.ipfs.as_ref().map(|c| c.first_byte_timeout * 2).unwrap_or(Duration::from_secs(10));
            i.breaker.call(timeout, i.store.ping()).await;
        }
    }

    /// The metrics this cache counts into.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// Whether blobs can be shared (Redis and IPFS are both configured).
    pub fn shares_blobs(&self) -> bool {
        self.redis.is_some() && self.ipfs.is_some()
    }

    /// Whether Redis is configured.
    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Whether IPFS answered its last call (true when not configured).
    pub fn is_ipfs_up(&self) -> bool {
        self.ipfs.as_ref().is_none_or(|i| i.breaker.is_up())
    }

    /// Whether Redis answered its last call (true when not configured).
    pub fn is_redis_up(&self) -> bool {
        self.redis.as_ref().is_none_or(|r| r.breaker.is_up())
    }

    async fn redis_get(&self, key: &[&str], refresh: Option<Duration>) -> Option<Option<Vec<u8>>> {
        let r = self.redis.as_ref()?;
        let key = r.kv.key(key);
        match refresh {
            Some(ttl) => r.breaker.call(r.timeout, r.kv.get_refresh(&key, ttl)).await,
            None => r.breaker.call(r.timeout, r.kv.get(&key)).await,
        }
    }

    async fn redis_set(&self, key: &[&str], value: &[u8], ttl: Duration) -> bool {
        let Some(r) = self.redis.as_ref() else { return false };
        if value.len() > self.config.max_value_bytes {
            return false;
        }
        let key = r.kv.key(key);
        r.breaker.call(r.timeout, r.kv.set(&key, value, ttl)).await.is_some()
    }

    async fn redis_del(&self, key: &[&str]) {
        if let Some(r) = self.redis.as_ref() {
            let key = r.kv.key(key);
            let _ = r.breaker.call(r.timeout, r.kv.del(&key)).await;
        }
    }

    /// Runs a write in the background: writes never add latency to a pull.
    fn spawn_write(self: &Arc<Self>, work: impl FnOnce(Arc<Self>) -> futures::future::BoxFuture<'static, ()>) {
        if self.redis.is_none() {
            return;
        }
        tokio::spawn(work(self.clone()));
    }

    // ---- tags ----

    /// The digest another facade resolved `image` (`registry/repo:tag`) to, within the tag TTL.
    pub async fn tag(&self, image: &str) -> Option<Digest> {
        let raw = self.redis_get(&["tag", image], None).await??;
        let digest = std::str::from_utf8(&raw).ok().and_then(|s| Digest::parse(s).ok());
        if digest.is_none() {
            tracing::warn!(image, "ignoring a tag entry in Redis that is not a digest");
        }
        digest
    }

    /// Shares a tag resolution for the tag TTL (in the background).
    pub fn put_tag(self: &Arc<Self>, image: &str, digest: &Digest) {
        let (image, digest) = (image.to_string(), digest.to_string());
        self.spawn_write(move |c| {
            Box::pin(async move {
                c.redis_set(&["tag", &image], digest.as_bytes(), c.config.tag_ttl).await;
            })
        });
    }

    // ---- manifests and configs by digest ----

    /// An upstream manifest (or index) by digest: `(media type, bytes)`, only if the bytes hash
    /// to `digest`.
    pub async fn manifest(&self, digest: &Digest) -> Option<(String, Bytes)> {
        let raw = self.redis_get(&["manifest", digest.as_str()], None).await??;
        let split = raw.iter().position(|&b| b == b'\n')?;
        let media_type = std::str::from_utf8(&raw[..split]).ok()?.to_string();
        let bytes = Bytes::copy_from_slice(&raw[split + 1..]);
        if !digest.matches(&bytes) {
            tracing::warn!(%digest, "manifest in Redis does not match its digest; ignoring it");
            self.redis_del(&["manifest", digest.as_str()]).await;
            return None;
        }
        Some((media_type, bytes))
    }

    /// Shares an upstream manifest by digest (in the background; the caller verified it).
    pub fn put_manifest(self: &Arc<Self>, digest: &Digest, media_type: &str, bytes: &Bytes) {
        if media_type.contains('\n') {
            return;
        }
        let mut value = Vec::with_capacity(media_type.len() + 1 + bytes.len());
        value.extend_from_slice(media_type.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(bytes);
        let digest = digest.to_string();
        self.spawn_write(move |c| {
            Box::pin(async move {
                c.redis_set(&["manifest", &digest], &value, c.config.content_ttl).await;
            })
        });
    }

    /// An upstream image config by digest, only if it hashes to `digest`.
    pub async fn config(&self, digest: &Digest) -> Option<Bytes> {
        let raw = self.redis_get(&["config", digest.as_str()], None).await??;
        if !digest.matches(&raw) {
            tracing::warn!(%digest, "config in Redis does not match its digest; ignoring it");
            self.redis_del(&["config", digest.as_str()]).await;
            return None;
        }
        Some(Bytes::from(raw))
    }

    /// Shares an upstream image config by digest (in the background; the caller verified it).
    pub fn put_config(self: &Arc<Self>, digest: &Digest, bytes: &Bytes) {
        let (digest, bytes) = (digest.to_string(), bytes.clone());
        self.spawn_write(move |c| {
            Box::pin(async move {
                c.redis_set(&["config", &digest], &bytes, c.config.content_ttl).await;
            })
        });
    }

    // ---- composed images (records are built and checked by `images`) ----

    /// A composed image record of workspace `ws` (`provider/id`) with manifest `digest`.
    pub async fn composed(&self, ws: &str, digest: &Digest) -> Option<Vec<u8>> {
        self.redis_get(&["composed", &format!("{ws}:{digest}")], None).await?
    }

    /// The manifest digests recently composed for workspace `ws`, newest first.
    pub async fn composed_list(&self, ws: &str) -> Vec<Digest> {
        let Some(r) = self.redis.as_ref() else { return Vec::new() };
        let key = r.kv.key(&["composed-list", ws]);
        r.breaker
            .call(r.timeout, r.kv.list(&key))
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|v| std::str::from_utf8(v).ok().and_then(|s| Digest::parse(s).ok()))
            .collect()
    }

    /// Shares a composed image record (in the background), remembering the last `keep`
    /// digests of the workspace.
    pub fn put_composed(self: &Arc<Self>, ws: &str, digest: &Digest, record: Vec<u8>, keep: usize) {
        let (ws, digest) = (ws.to_string(), digest.to_string());
        self.spawn_write(move |c| {
            Box::pin(async move {
                let ttl = c.config.content_ttl;
                if !c.redis_set(&["composed", &format!("{ws}:{digest}")], &record, ttl).await {
                    return;
                }
                if let Some(r) = c.redis.as_ref() {
                    let key = r.kv.key(&["composed-list", &ws]);
                    let _ = r.breaker.call(r.timeout, r.kv.push_bounded(&key, digest.as_bytes(), keep, ttl)).await;
                }
            })
        });
    }

    // ---- blobs ----

    /// Where the cluster has blob `digest` of `size` bytes. Counts the lookup. An entry of
    /// another size is ignored but kept: `size` is one workspace's manifest's claim, and a
    /// claim must never remove what the whole cluster relies on (only content that fails
    /// verification does, in the fill). An entry that does not parse is garbage: removed.
    pub async fn lookup_blob(&self, digest: &Digest, size: u64) -> Option<IndexEntry> {
        if !self.shares_blobs() {
            return None;
        }
        let ipfs_ok = self.ipfs.as_ref().is_some_and(|i| i.breaker.allow());
        if !ipfs_ok {
            // No point asking the index for content we cannot fetch now.
            self.metrics.lookup(CacheName::Cluster, LookupResult::Error);
            return None;
        }
        let raw = match self.redis_get(&["blob", digest.as_str()], Some(self.config.index_ttl)).await {
            None => {
                self.metrics.lookup(CacheName::Cluster, LookupResult::Error);
                return None;
            }
            Some(None) => {
                self.metrics.lookup(CacheName::Cluster, LookupResult::Miss);
                return None;
            }
            Some(Some(raw)) => raw,
        };
        match serde_json::from_slice::<IndexEntry>(&raw) {
            Ok(e) if e.size == size => {
                self.metrics.lookup(CacheName::Cluster, LookupResult::Hit);
                self.touch_pin(digest.as_str(), &e);
                Some(e)
            }
            Ok(e) => {
                tracing::warn!(%digest, size, indexed_size = e.size, "a manifest claims another size than the cluster index holds; not using the index for it");
                self.metrics.lookup(CacheName::Cluster, LookupResult::Error);
                None
            }
            Err(err) => {
                tracing::warn!(%digest, error = %err, "index entry is not JSON; removing it");
                self.forget_blob(digest).await;
                self.metrics.lookup(CacheName::Cluster, LookupResult::Error);
                None
            }
        }
    }

    /// Removes the index entry of `digest` (its content did not verify).
    pub async fn forget_blob(&self, digest: &Digest) {
        self.redis_del(&["blob", digest.as_str()]).await;
    }

    /// Opens `[offset, offset + length)` of `cid` on IPFS. `None` when IPFS is down, skipped by
    /// its breaker, or does not answer in time (recorded in the breaker).
    pub async fn cat(&self, cid: &str, offset: u64, length: u64) -> Option<BoxStream<'static, Result<Bytes>>> {
        let i = self.ipfs.as_ref()?;
        // The client has its own first-byte deadline; the breaker's is a backstop.
        let deadline = self.config.ipfs.as_ref().map(|c| c.first_byte_timeout * 2).unwrap_or(Duration::from_secs(10));
        i.breaker.call(deadline, i.store.cat(cid, offset, length)).await
    }

    /// Records an IPFS failure seen outside [`ClusterCache::cat`] (a body that broke and could
    /// not be resumed).
    pub fn ipfs_failed(&self, error: &dyn std::fmt::Display) {
        if let Some(i) = &self.ipfs {
            i.breaker.failure(error);
        }
    }

    /// Adds a verified blob to IPFS from `file` (a local copy: never a second upstream
    /// download) and writes its index entry. Counts the back-fill.
    pub async fn publish_blob(
        &self,
        digest: &Digest,
        media_type: &str,
        origin: &str,
        file: Arc<std::fs::File>,
        size: u64,
    ) -> BackfillOutcome {
        let outcome = self.add_and_index(digest, media_type, origin, file, size).await;
        self.metrics.backfill(BackfillStore::Ipfs, outcome);
        outcome
    }

    async fn add_and_index(
        &self,
        digest: &Digest,
        media_type: &str,
        origin: &str,
        file: Arc<std::fs::File>,
        size: u64,
    ) -> BackfillOutcome {
        let (Some(i), Some(r)) = (self.ipfs.as_ref(), self.redis.as_ref()) else { return BackfillOutcome::Skipped };
        if !i.breaker.allow() || !r.breaker.allow() {
            return BackfillOutcome::Skipped;
        }
        let add_timeout = self.config.ipfs.as_ref().map(|c| c.add_timeout).unwrap_or(Duration::from_secs(600));
        let Some(added) = i.breaker.call(add_timeout, i.store.add(file, size)).await else {
            return BackfillOutcome::Failed;
        };
        // The node's identity names the pin's record; without it the pin could not be swept,
        // so the blob is not indexed (the next fill publishes it again).
        let Some(peer) = self.ipfs_peer().await else { return BackfillOutcome::Failed };
        let entry = IndexEntry {
            cid: added.cid.clone(),
            media_type: media_type.to_string(),
            size,
            origins: vec![origin.to_string()],
            pinner: Some(peer.clone()),
        };
        let Ok(value) = serde_json::to_vec(&entry) else { return BackfillOutcome::Failed };
        let indexed = self.redis_set(&["blob", digest.as_str()], &value, self.config.index_ttl).await;
        // Recorded whether or not the entry was written: the pin exists either way, and a pin
        // without an entry is what the sweep removes.
        let member = pins::PinMember { digest: digest.to_string(), cid: added.cid.clone(), size };
        self.record_pin(&peer, member).await;
        if indexed {
            tracing::debug!(%digest, cid = %added.cid, size, "added blob to IPFS and the index");
            BackfillOutcome::Ok
        } else {
            BackfillOutcome::Failed
        }
    }
}
