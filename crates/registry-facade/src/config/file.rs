//! The serde shape of the configuration file: the reference facade's keys as its installer
//! writes them, and our own `facade` section. Nothing here has a default value of its own:
//! an absent `facade` key is `None`, and the crates' `Default`s apply (README.md, table of the
//! `facade` keys).

use serde::Deserialize;

/// The whole file.
///
/// The reference's keys take `null` as their default, as Go's decoder does: its encoder writes a
/// nil slice or pointer as `null` (see [`null_as_default`]).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The registry section (reference keys).
    #[serde(default, deserialize_with = "null_as_default")]
    pub registry: RegistrySection,
    /// Path of a docker `config.json` with upstream credentials.
    #[serde(rename = "dockerAuth", default, deserialize_with = "null_as_default")]
    pub docker_auth: String,
    /// The reference's Go profiler address. Nothing here serves it (see
    /// [`super::Config::startup_notices`]); accepted because the reference's installer always writes it.
    #[serde(rename = "pprofAddr", default, deserialize_with = "null_as_default")]
    pub pprof_addr: String,
    /// Where `/metrics` listens.
    #[serde(rename = "prometheusAddr", default, deserialize_with = "null_as_default")]
    pub prometheus_addr: String,
    /// Where `/ready` and `/live` listen.
    #[serde(rename = "readinessProbeAddr", default, deserialize_with = "null_as_default")]
    pub readiness_probe_addr: String,
    /// Keys of our own.
    #[serde(default)]
    pub facade: FacadeSection,
}

/// `registry`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// Port the registry listens on (0: any free port).
    #[serde(default, deserialize_with = "null_as_default")]
    pub port: u16,
    /// URL prefix before `/v2`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub prefix: String,
    /// TLS certificate and key.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// Local content store directory ("" = none).
    #[serde(default, deserialize_with = "null_as_default")]
    pub store: String,
    /// Whether clients must authenticate.
    #[serde(rename = "requireAuth", default, deserialize_with = "null_as_default")]
    pub require_auth: bool,
    /// Static layers.
    #[serde(rename = "staticLayer", default, deserialize_with = "null_as_default")]
    pub static_layer: Vec<StaticLayerEntry>,
    /// gRPC spec providers: a list, or one object as the reference's installer wrote it before
    /// it could name several.
    #[serde(rename = "remoteSpecProvider", default, deserialize_with = "one_or_many")]
    pub remote_spec_provider: Vec<RemoteProviderEntry>,
    /// The `fixed` provider's file.
    #[serde(rename = "fixedSpecFN", default, deserialize_with = "null_as_default")]
    pub fixed_spec_file: String,
    /// Redis index.
    #[serde(default)]
    pub redis: Option<RedisSection>,
    /// IPFS content.
    #[serde(default)]
    pub ipfs: Option<IpfsSection>,
}

/// `registry.tls`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The reference's `Authority`. Its registry listener never reads it (no client certificates
    /// are asked for), and its installer writes `""`; accepted with that meaning.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ca: String,
    /// Certificate file.
    #[serde(default, deserialize_with = "null_as_default")]
    pub crt: String,
    /// Key file.
    #[serde(default, deserialize_with = "null_as_default")]
    pub key: String,
}

/// One `registry.staticLayer` entry.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct StaticLayerEntry {
    /// Image reference or file path.
    #[serde(rename = "ref")]
    pub reference: String,
    /// `image` or `file`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// One `registry.remoteSpecProvider` entry.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RemoteProviderEntry {
    /// gRPC target (`dns:///host:port`, `host:port`).
    #[serde(deserialize_with = "null_as_default")]
    pub addr: String,
    /// mTLS files.
    #[serde(default)]
    pub tls: Option<ClientTlsSection>,
}

/// Client TLS files.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSection {
    /// CA bundle.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ca: String,
    /// Client certificate.
    #[serde(default, deserialize_with = "null_as_default")]
    pub crt: String,
    /// Client key.
    #[serde(default, deserialize_with = "null_as_default")]
    pub key: String,
}

/// `registry.redis`.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// Whether to use it.
    #[serde(default, deserialize_with = "null_as_default")]
    pub enabled: bool,
    /// `host:port`.
    #[serde(rename = "singleHostAddr", default, deserialize_with = "null_as_default")]
    pub single_host_addr: String,
    /// ACL user name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub username: String,
    /// TLS to Redis.
    #[serde(rename = "useTLS", default, deserialize_with = "null_as_default")]
    pub use_tls: bool,
    /// With `useTLS`: accept any server certificate (the reference's Go `InsecureSkipVerify`,
    /// for managed Redis services whose certificates carry no usable name).
    #[serde(rename = "insecureSkipVerify", default, deserialize_with = "null_as_default")]
    pub insecure_skip_verify: bool,
    /// `host:port` of Redis Cluster nodes (instead of `singleHostAddr`).
    #[serde(rename = "clusterAddresses", default, deserialize_with = "null_as_default")]
    pub cluster_addresses: Vec<String>,
    /// A master found through Redis Sentinel (instead of `singleHostAddr`).
    #[serde(default)]
    pub sentinel: Option<SentinelSection>,
    /// With `useTLS`: PEM file of a private CA to trust instead of the system's.
    #[serde(rename = "caFile", default, deserialize_with = "null_as_default")]
    pub ca_file: String,
}

/// `registry.redis.sentinel`.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct SentinelSection {
    /// The monitored master's name.
    #[serde(rename = "masterName", default, deserialize_with = "null_as_default")]
    pub master_name: String,
    /// `host:port` of the sentinels.
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
}

/// `registry.ipfs`.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct IpfsSection {
    /// Whether to use it.
    #[serde(default, deserialize_with = "null_as_default")]
    pub enabled: bool,
    /// Multiaddr of the node's RPC API.
    #[serde(rename = "ipfsAddr", default, deserialize_with = "null_as_default")]
    pub ipfs_addr: String,
}

/// `null` as the type's default. Go's decoder leaves a field alone on `null`, and Go's encoder
/// writes a nil slice or pointer as `null`, so the reference's tools can write
/// `"staticLayer": null`.
pub(super) fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

/// `registry.remoteSpecProvider`: a list of providers, one provider object (the reference's
/// installer wrote a single `RSProvider` before the list), or `null`. A visitor rather than an
/// untagged enum, so an unknown key inside is still reported with its full path.
fn one_or_many<'de, D>(de: D) -> Result<Vec<RemoteProviderEntry>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct OneOrMany;
    impl<'de> serde::de::Visitor<'de> for OneOrMany {
        type Value = Vec<RemoteProviderEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of {\"addr\", \"tls\"} objects, or one such object")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(e) = seq.next_element()? {
                out.push(e);
            }
            Ok(out)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let one = RemoteProviderEntry::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
            Ok(vec![one])
        }
    }
    de.deserialize_any(OneOrMany)
}

/// `facade`: our own keys, each optional; the defaults are the README's table, and live in the
/// crate each key configures.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FacadeSection {
    /// Address the registry binds.
    #[serde(rename = "listenHost", default)]
    pub listen_host: Option<String>,
    /// Platform picked from image indexes (default: this host's).
    #[serde(default)]
    pub platform: Option<String>,
    /// How long a composed image is reused.
    #[serde(rename = "composeTTL", default)]
    pub compose_ttl: Option<String>,
    /// How long a tag → digest resolution is trusted.
    #[serde(rename = "tagTTL", default)]
    pub tag_ttl: Option<String>,
    /// Extra upstream hosts spoken to over plain HTTP (loopback hosts always are).
    #[serde(rename = "plainHTTPHosts", default)]
    pub plain_http_hosts: Vec<String>,
    /// Upstream connect timeout.
    #[serde(rename = "upstreamConnectTimeout", default)]
    pub upstream_connect_timeout: Option<String>,
    /// Upstream deadline for manifests, configs and tokens.
    #[serde(rename = "upstreamMetadataTimeout", default)]
    pub upstream_metadata_timeout: Option<String>,
    /// Longest wait for upstream body bytes before resuming.
    #[serde(rename = "upstreamReadTimeout", default)]
    pub upstream_read_timeout: Option<String>,
    /// PEM bundle of CA certificates trusted for upstream registries besides the system's.
    #[serde(rename = "upstreamCA", default)]
    pub upstream_ca: Option<String>,
    /// CIDRs upstream connections and redirects may never reach, besides link-local, metadata
    /// and the facade's own listeners (always refused).
    #[serde(rename = "upstreamDenyNetworks", default)]
    pub upstream_deny_networks: Vec<String>,
    /// Most bytes the local store keeps before evicting least recently used blobs: a number of
    /// bytes or a size such as "512MiB" or "20GiB" (0: unbounded).
    #[serde(rename = "storeMaxBytes", default)]
    pub store_max_bytes: Option<serde_json::Value>,
    /// Blobs of the local store unused for this long are evicted ("0s": never).
    #[serde(rename = "storeTTL", default)]
    pub store_ttl: Option<String>,
    /// The largest blob the local store keeps (larger ones are streamed through): a size, 0
    /// for "as large as storeMaxBytes"; default a quarter of storeMaxBytes.
    #[serde(rename = "maxBlobBytes", default)]
    pub max_blob_bytes: Option<serde_json::Value>,
    /// How long a download nobody reads any more goes on before it must show it keeps moving.
    #[serde(rename = "unreadFillGrace", default)]
    pub unread_fill_grace: Option<String>,
    /// How long a tag resolution is shared with other facades through Redis.
    #[serde(rename = "clusterTagTTL", default)]
    pub cluster_tag_ttl: Option<String>,
    /// Deadline of one Redis command.
    #[serde(rename = "clusterRedisTimeout", default)]
    pub cluster_redis_timeout: Option<String>,
    /// Deadline for IPFS's first byte of a blob.
    #[serde(rename = "clusterIPFSTimeout", default)]
    pub cluster_ipfs_timeout: Option<String>,
    /// Life of a blob's cluster index entry since its last use; its IPFS pin goes with it.
    #[serde(rename = "clusterIndexTTL", default)]
    pub cluster_index_ttl: Option<String>,
    /// Most bytes kept pinned on one IPFS node (0: no byte bound).
    #[serde(rename = "clusterIPFSMaxBytes", default)]
    pub cluster_ipfs_max_bytes: Option<serde_json::Value>,
    /// bcrypt htpasswd file of the users allowed to pull when `registry.requireAuth` is on.
    #[serde(default)]
    pub htpasswd: Option<String>,
    /// Grace period for in-flight pulls on SIGTERM.
    #[serde(rename = "shutdownGrace", default)]
    pub shutdown_grace: Option<String>,
    /// Longest one remote spec provider may take to answer, retries included.
    #[serde(rename = "specTimeout", default)]
    pub spec_timeout: Option<String>,
    /// How long a remote spec is reused without asking again.
    #[serde(rename = "specCacheTTL", default)]
    pub spec_cache_ttl: Option<String>,
    /// How long "no such workspace" from a remote provider is remembered.
    #[serde(rename = "specNegativeTTL", default)]
    pub spec_negative_ttl: Option<String>,
    /// How long a remote spec may still be served while the providers fail (0s: never).
    #[serde(rename = "specStaleTTL", default)]
    pub spec_stale_ttl: Option<String>,
    /// Most workspace specs cached.
    #[serde(rename = "specCacheSize", default)]
    pub spec_cache_size: Option<u64>,
    /// Name the remote spec providers' TLS certificates are verified against (as the reference
    /// facade does, whatever the address says).
    #[serde(rename = "specServerName", default)]
    pub spec_server_name: Option<String>,
    /// Largest request head (request line and headers) read from a client, a number of bytes or
    /// a size such as "64KiB" (at least "8KiB", at most "1MiB").
    #[serde(rename = "maxRequestHeaderBytes", default)]
    pub max_request_header_bytes: Option<serde_json::Value>,
    /// Longest request URL answered; longer gets 414.
    #[serde(rename = "maxURLBytes", default)]
    pub max_url_bytes: Option<serde_json::Value>,
    /// Requests in flight per client IP address (0: unlimited).
    #[serde(rename = "maxRequestsPerClient", default)]
    pub max_requests_per_client: Option<u64>,
    /// A response making no progress for this long is cut ("0s": never).
    #[serde(rename = "responseIdleTimeout", default)]
    pub response_idle_timeout: Option<String>,
    /// A connection without a complete request head this long is closed ("0s": never).
    #[serde(rename = "requestHeadTimeout", default)]
    pub request_head_timeout: Option<String>,
    /// A connection with no request open this long is closed ("0s": never).
    #[serde(rename = "idleConnectionTimeout", default)]
    pub idle_connection_timeout: Option<String>,
    /// Open connections on the registry port; more get 503 (0: unlimited).
    #[serde(rename = "maxConnections", default)]
    pub max_connections: Option<u64>,
    /// Failed credential checks per second per client address (0: unlimited).
    #[serde(rename = "authFailuresPerSecond", default)]
    pub auth_failures_per_second: Option<u64>,
    /// Blocking threads bcrypt may take at once.
    #[serde(rename = "authCheckThreads", default)]
    pub auth_check_threads: Option<u64>,
    /// Blocking threads blob file reads may take at once.
    #[serde(rename = "blockingReadThreads", default)]
    pub blocking_read_threads: Option<u64>,
    /// Blocking threads spool writes (and their hashing) may take at once.
    #[serde(rename = "blockingSpoolWriteThreads", default)]
    pub blocking_spool_write_threads: Option<u64>,
    /// Blocking threads store commits (fsync, rename) may take at once.
    #[serde(rename = "blockingCommitThreads", default)]
    pub blocking_commit_threads: Option<u64>,
    /// Blocking threads store housekeeping (eviction) may take at once.
    #[serde(rename = "blockingHousekeepingThreads", default)]
    pub blocking_housekeeping_threads: Option<u64>,
    /// Bytes of blob responses held in memory at once, read but not yet written to clients
    /// (a size); beyond it streams go on in small chunks.
    #[serde(rename = "maxBufferedResponseBytes", default)]
    pub max_buffered_response_bytes: Option<serde_json::Value>,
    /// Bytes of composed images (and, as much again, of fetched manifests and configs) kept in
    /// memory (a size).
    #[serde(rename = "imageCacheBytes", default)]
    pub image_cache_bytes: Option<serde_json::Value>,
    /// Bytes of specs kept in memory (a size).
    #[serde(rename = "specCacheBytes", default)]
    pub spec_cache_bytes: Option<serde_json::Value>,
    /// Also export the Go facade's metric names (`gitpod_registry_facade_*`) next to ours, for
    /// dashboards and alerts written against it (see docs/migration.md).
    #[serde(rename = "legacyMetrics", default)]
    pub legacy_metrics: Option<bool>,
    /// Where the peer listener binds (cluster-wide single-flight; off when absent).
    #[serde(rename = "peerAddr", default)]
    pub peer_addr: Option<String>,
    /// `host:port` other nodes reach the peer listener at (`$POD_IP` expanded).
    #[serde(rename = "peerAdvertiseAddr", default)]
    pub peer_advertise_addr: Option<String>,
    /// File holding the cluster secret nodes present to each other's peer listeners.
    #[serde(rename = "peerSecretFile", default)]
    pub peer_secret_file: Option<String>,
    /// Most other nodes one node serves a blob to at once.
    #[serde(rename = "peerMaxFollowers", default)]
    pub peer_max_followers: Option<u64>,
    /// Life of a download lease without renewal.
    #[serde(rename = "peerLeaseTTL", default)]
    pub peer_lease_ttl: Option<String>,
    /// Layer fills one prefetch on manifest (or warm-up) runs at once (0: no prefetch on
    /// manifest).
    #[serde(rename = "prefetchParallelism", default)]
    pub prefetch_parallelism: Option<u64>,
    /// A prefetch stops when no request of its workspace image came for this long.
    #[serde(rename = "prefetchIdleTimeout", default)]
    pub prefetch_idle_timeout: Option<String>,
}
