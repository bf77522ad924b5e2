//! The configuration file (`registry-facade run <config.json>`): the reference facade's keys as
//! they are, plus a `facade` section of our own. Parsing takes text, and environment lookups are
//! injected, so both are testable; every problem found is reported, on one line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use facade_oci::{ImageRef, Platform};
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
    /// [`Config::startup_notices`]); accepted because the reference's installer always writes it.
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
fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
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

/// `facade`: our own keys, each with a default.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FacadeSection {
    /// Address the registry binds (default all interfaces, like the reference).
    #[serde(rename = "listenHost", default)]
    pub listen_host: Option<String>,
    /// Platform picked from image indexes (default: this host's).
    #[serde(default)]
    pub platform: Option<String>,
    /// How long a composed image is reused (default 30s).
    #[serde(rename = "composeTTL", default)]
    pub compose_ttl: Option<String>,
    /// How long a tag → digest resolution is trusted (default 60s).
    #[serde(rename = "tagTTL", default)]
    pub tag_ttl: Option<String>,
    /// Extra upstream hosts spoken to over plain HTTP (loopback hosts always are).
    #[serde(rename = "plainHTTPHosts", default)]
    pub plain_http_hosts: Vec<String>,
    /// Upstream connect timeout (default 5s).
    #[serde(rename = "upstreamConnectTimeout", default)]
    pub upstream_connect_timeout: Option<String>,
    /// Upstream deadline for manifests, configs and tokens (default 20s).
    #[serde(rename = "upstreamMetadataTimeout", default)]
    pub upstream_metadata_timeout: Option<String>,
    /// Longest wait for upstream body bytes before resuming (default 15s).
    #[serde(rename = "upstreamReadTimeout", default)]
    pub upstream_read_timeout: Option<String>,
    /// PEM bundle of CA certificates trusted for upstream registries besides the system's.
    #[serde(rename = "upstreamCA", default)]
    pub upstream_ca: Option<String>,
    /// Most bytes the local store keeps before evicting least recently used blobs: a number of
    /// bytes or a size such as "512MiB" or "20GiB" (default "20GiB"; 0: unbounded).
    #[serde(rename = "storeMaxBytes", default)]
    pub store_max_bytes: Option<serde_json::Value>,
    /// Blobs of the local store unused for this long are evicted (default "168h"; "0s": never).
    #[serde(rename = "storeTTL", default)]
    pub store_ttl: Option<String>,
    /// How long a tag resolution is shared with other facades through Redis (default "5m").
    #[serde(rename = "clusterTagTTL", default)]
    pub cluster_tag_ttl: Option<String>,
    /// Deadline of one Redis command (default "500ms").
    #[serde(rename = "clusterRedisTimeout", default)]
    pub cluster_redis_timeout: Option<String>,
    /// Deadline for IPFS's first byte of a blob (default "3s").
    #[serde(rename = "clusterIPFSTimeout", default)]
    pub cluster_ipfs_timeout: Option<String>,
    /// bcrypt htpasswd file of the users allowed to pull when `registry.requireAuth` is on.
    #[serde(default)]
    pub htpasswd: Option<String>,
    /// Grace period for in-flight pulls on SIGTERM (default 30s).
    #[serde(rename = "shutdownGrace", default)]
    pub shutdown_grace: Option<String>,
    /// Longest one remote spec provider may take to answer, retries included (default 5s).
    #[serde(rename = "specTimeout", default)]
    pub spec_timeout: Option<String>,
    /// How long a remote spec is reused without asking again (default 10s).
    #[serde(rename = "specCacheTTL", default)]
    pub spec_cache_ttl: Option<String>,
    /// How long "no such workspace" from a remote provider is remembered (default 2s).
    #[serde(rename = "specNegativeTTL", default)]
    pub spec_negative_ttl: Option<String>,
    /// How long a remote spec may still be served while the providers fail (default 1h; 0s: never).
    #[serde(rename = "specStaleTTL", default)]
    pub spec_stale_ttl: Option<String>,
    /// Most workspace specs cached (default 10000).
    #[serde(rename = "specCacheSize", default)]
    pub spec_cache_size: Option<u64>,
    /// Name the remote spec providers' TLS certificates are verified against (default
    /// `ws-manager`, as the reference facade does whatever the address says).
    #[serde(rename = "specServerName", default)]
    pub spec_server_name: Option<String>,
    /// Largest request head (request line and headers) read from a client, a number of bytes or
    /// a size such as "64KiB" (default "64KiB"; at least "8KiB", at most "1MiB").
    #[serde(rename = "maxRequestHeaderBytes", default)]
    pub max_request_header_bytes: Option<serde_json::Value>,
    /// Longest request URL answered; longer gets 414 (default "8KiB").
    #[serde(rename = "maxURLBytes", default)]
    pub max_url_bytes: Option<serde_json::Value>,
    /// Requests in flight per client IP address (default 256; 0: unlimited).
    #[serde(rename = "maxRequestsPerClient", default)]
    pub max_requests_per_client: Option<u64>,
    /// A response making no progress for this long is cut (default "5m"; "0s": never).
    #[serde(rename = "responseIdleTimeout", default)]
    pub response_idle_timeout: Option<String>,
    /// Also export the Go facade's metric names (`gitpod_registry_facade_*`) next to ours, for
    /// dashboards and alerts written against it (default true; see docs/migration.md).
    #[serde(rename = "legacyMetrics", default)]
    pub legacy_metrics: Option<bool>,
}

/// The validated configuration the binary wires from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Registry listener.
    pub listen: SocketAddr,
    /// TLS certificate and key files of the registry listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// What `registry.requireAuth` asks of clients.
    pub client_auth: ClientAuth,
    /// `pprofAddr` as written (nothing serves it; see [`Config::startup_notices`]).
    pub pprof_addr: Option<String>,
    /// `registry.tls.ca` as written when not empty (not read; see [`Config::startup_notices`]).
    pub registry_tls_ca: Option<String>,
    /// URL prefix.
    pub prefix: String,
    /// Local store.
    pub store: Option<PathBuf>,
    /// The local store's size limit (`None`: unbounded).
    pub store_max_bytes: Option<u64>,
    /// The local store's idle TTL (`None`: blobs stay while there is room).
    pub store_ttl: Option<Duration>,
    /// The cluster cache (`registry.redis`, `registry.ipfs`, `facade.cluster*`).
    pub cluster: ClusterSettings,
    /// Static layers, in order.
    pub static_layers: Vec<facade_blob::StaticLayerSpec>,
    /// The `fixed` provider's file.
    pub fixed_spec_file: Option<PathBuf>,
    /// The `remote` provider's gRPC spec servers, in the order they are asked.
    pub remote_spec_providers: Vec<RemoteSpecProvider>,
    /// Calls to and caching of the `remote` provider.
    pub spec: SpecSettings,
    /// Upstream credentials file.
    pub docker_auth: Option<PathBuf>,
    /// Metrics listener.
    pub prometheus_addr: Option<SocketAddr>,
    /// Probe listener.
    pub readiness_addr: Option<SocketAddr>,
    /// Platform for indexes.
    pub platform: Platform,
    /// Composed-image reuse.
    pub compose_ttl: Duration,
    /// Tag trust.
    pub tag_ttl: Duration,
    /// Plain-HTTP upstream hosts.
    pub plain_http_hosts: Vec<String>,
    /// Upstream timeouts: connect, metadata, read.
    pub upstream_timeouts: (Duration, Duration, Duration),
    /// PEM of the extra upstream CAs (`facade.upstreamCA`), read and checked at load.
    pub upstream_ca_pem: Option<String>,
    /// SIGTERM grace.
    pub shutdown_grace: Duration,
    /// Request limits of the registry listener (`facade.max*`, `facade.responseIdleTimeout`).
    pub limits: RequestLimits,
    /// `facade.legacyMetrics`: export the Go facade's metric names too.
    pub legacy_metrics: bool,
}

/// `registry.requireAuth`, and `facade.htpasswd` with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// Anyone may pull.
    Off,
    /// The reference's meaning of `requireAuth` (no htpasswd file): a request must carry Basic
    /// credentials, whatever they are.
    CredentialsPresent,
    /// Basic credentials checked against this bcrypt htpasswd file.
    Htpasswd(PathBuf),
}

impl Config {
    /// One line for each reference key that is accepted without doing here what it does in the
    /// reference, or does less: logged once at startup, so an operator moving from the
    /// reference's installer sees what serves instead.
    pub fn startup_notices(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(addr) = &self.pprof_addr {
            notes.push(format!(
                "pprofAddr {addr:?}: the Go profiler has no counterpart here and nothing listens there; metrics are on prometheusAddr at /metrics and detail comes from the logs (RUST_LOG=debug or --log-level debug)"
            ));
        }
        if let Some(ca) = &self.registry_tls_ca {
            notes.push(format!(
                "registry.tls.ca {ca:?}: not read; as in the reference facade, the registry port does not ask clients for certificates"
            ));
        }
        if self.client_auth == ClientAuth::CredentialsPresent {
            notes.push(
                "registry.requireAuth without facade.htpasswd: as in the reference facade, every request must carry Basic credentials, which are not checked; set facade.htpasswd to check them".into(),
            );
        }
        notes
    }
}

/// The validated request limits of the registry listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// `maxRequestHeaderBytes`: request heads over it get 431.
    pub max_header_bytes: usize,
    /// `maxURLBytes`: URLs over it get 414 `NAME_INVALID`.
    pub max_url_bytes: usize,
    /// `maxRequestsPerClient`: more in flight from one address get 429 (0: unlimited).
    pub max_requests_per_client: usize,
    /// `responseIdleTimeout` (`None`: never).
    pub response_idle_timeout: Option<Duration>,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_header_bytes: 64 << 10,
            max_url_bytes: 8 << 10,
            max_requests_per_client: 256,
            response_idle_timeout: Some(Duration::from_secs(300)),
        }
    }
}

/// The request-limit keys. `stall_timeouts` are the blob sources' own "no bytes for this long"
/// deadlines (key, value): a response idle timeout must outlast them, or a client is cut while
/// the download behind it is still being resumed.
fn parse_limits(f: &FacadeSection, stall_timeouts: &[(&str, Duration)], errs: &mut Vec<String>) -> RequestLimits {
    const MIN_HEADER: u64 = 8 << 10;
    const MAX_HEADER: u64 = 1 << 20;
    const MIN_URL: u64 = 1 << 10;
    let d = RequestLimits::default();
    let mut size = |key: &str, v: &Option<serde_json::Value>, default: usize| -> Option<u64> {
        let n = match v {
            None => return Some(default as u64),
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().ok_or_else(|| format!("{n} is not a whole number of bytes"))
            }
            Some(serde_json::Value::String(s)) => parse_size(s).map_err(|e| format!("{s:?}: {e}")),
            Some(other) => Err(format!("{other} is neither a number nor a size such as \"64KiB\"")),
        };
        n.map_err(|e| errs.push(format!("facade.{key}: {e}"))).ok()
    };
    let header = size("maxRequestHeaderBytes", &f.max_request_header_bytes, d.max_header_bytes);
    let url = size("maxURLBytes", &f.max_url_bytes, d.max_url_bytes);
    if let Some(h) = header.filter(|h| !(MIN_HEADER..=MAX_HEADER).contains(h)) {
        errs.push(format!("facade.maxRequestHeaderBytes: {h} is outside 8KiB..1MiB"));
    }
    match (url, header) {
        (Some(u), _) if u < MIN_URL => errs.push(format!("facade.maxURLBytes: {u} is less than 1KiB")),
        (Some(u), Some(h)) if u > h => errs.push(format!(
            "facade.maxURLBytes: {u} is more than facade.maxRequestHeaderBytes ({h}), so long URLs would get a bare 431 instead of the OCI 414"
        )),
        _ => {}
    }
    let idle = match f.response_idle_timeout.as_deref().map(humantime::parse_duration) {
        None => d.response_idle_timeout,
        Some(Ok(t)) if t.is_zero() => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            errs.push(format!(
                "facade.responseIdleTimeout: {:?}: {e}",
                f.response_idle_timeout.as_deref().unwrap_or("")
            ));
            d.response_idle_timeout
        }
    };
    if let Some(t) = idle {
        for (key, stall) in stall_timeouts {
            if t <= *stall {
                errs.push(format!(
                    "facade.responseIdleTimeout: {} is not more than facade.{key} ({}), so clients would be cut while a stalled download is still being resumed",
                    humantime::format_duration(t),
                    humantime::format_duration(*stall)
                ));
            }
        }
    }
    let usize_of = |n: Option<u64>, default: usize| n.and_then(|n| usize::try_from(n).ok()).unwrap_or(default);
    RequestLimits {
        max_header_bytes: usize_of(header, d.max_header_bytes),
        max_url_bytes: usize_of(url, d.max_url_bytes),
        max_requests_per_client: usize_of(f.max_requests_per_client, d.max_requests_per_client),
        response_idle_timeout: idle,
    }
}

/// One validated `registry.remoteSpecProvider` entry.
#[derive(Debug, Clone)]
pub struct RemoteSpecProvider {
    /// gRPC target as configured (`dns:///host:port`, `host:port`).
    pub addr: String,
    /// TLS files; `None` is plaintext.
    pub tls: Option<RemoteSpecTls>,
}

/// TLS files of a spec provider.
#[derive(Debug, Clone)]
pub struct RemoteSpecTls {
    /// CA bundle the server's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate and key for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The `facade.spec*` keys.
#[derive(Debug, Clone)]
pub struct SpecSettings {
    /// Deadline per provider, retries included.
    pub timeout: Duration,
    /// Fresh spec reuse.
    pub cache_ttl: Duration,
    /// "No such workspace" reuse.
    pub negative_ttl: Duration,
    /// Serve-stale window.
    pub stale_ttl: Duration,
    /// Cached workspaces.
    pub cache_size: u64,
    /// TLS server name.
    pub server_name: String,
}

/// Checks that a configured path (key, value) names a readable file, recording problems.
type CheckFile<'a> = dyn Fn(&str, &str, &mut Vec<String>) -> Option<PathBuf> + 'a;

fn parse_remote_providers(
    entries: &[RemoteProviderEntry],
    check_file: &CheckFile<'_>,
    errs: &mut Vec<String>,
) -> Vec<RemoteSpecProvider> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let key = format!("registry.remoteSpecProvider[{i}]");
        let before = errs.len();
        if let Err(e) = facade_spec::grpc::target_uri(&e.addr, e.tls.is_some()) {
            let reason = match e {
                facade_spec::Error::Config(r) => r,
                other => other.to_string(),
            };
            errs.push(format!("{key}.addr: {reason}"));
        }
        let tls = e.tls.as_ref().and_then(|t| {
            if t.ca.is_empty() {
                errs.push(format!("{key}.tls.ca: required when tls is set (the CA of the spec server's certificate)"));
            }
            if t.crt.is_empty() != t.key.is_empty() {
                errs.push(format!("{key}.tls: crt and key go together (both for mutual TLS, neither for TLS)"));
            }
            let ca = check_file(&format!("{key}.tls.ca"), &t.ca, errs);
            let crt = check_file(&format!("{key}.tls.crt"), &t.crt, errs);
            let key_file = check_file(&format!("{key}.tls.key"), &t.key, errs);
            Some(RemoteSpecTls { ca: ca?, identity: crt.zip(key_file) })
        });
        if errs.len() == before {
            out.push(RemoteSpecProvider { addr: e.addr.trim().to_string(), tls });
        }
    }
    out
}

/// The validated cluster-cache settings.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Redis, when `registry.redis.enabled` (password from `REDIS_PASSWORD`).
    pub redis: Option<facade_blob::cluster::RedisConfig>,
    /// IPFS, when `registry.ipfs.enabled` (`$IPFS_HOST` expanded, multiaddr mapped to a URL).
    pub ipfs: Option<facade_blob::cluster::IpfsConfig>,
    /// How long tag resolutions are shared.
    pub tag_ttl: Duration,
}

/// Parses a size: a number of bytes, or a number with a unit (`B`, `KiB`, `MiB`, `GiB`,
/// `TiB`, or the decimal `KB`, `MB`, `GB`, `TB`), e.g. "512MiB", "20GiB", "1.5 GiB".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)")),
    };
    if num.is_empty() {
        return Err("no number".into());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| "too large".to_string());
    }
    let f: f64 = num.parse().map_err(|_| format!("{num:?} is not a number"))?;
    let bytes = f * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err("too large".into());
    }
    Ok(bytes as u64)
}

/// The store-bound and cluster keys: `registry.redis`, `registry.ipfs`, `facade.store*`,
/// `facade.cluster*`. Every problem goes to `errs`, named by its key.
fn parse_cluster(
    file: &FileConfig,
    env: &dyn Env,
    errs: &mut Vec<String>,
) -> (Option<u64>, Option<Duration>, ClusterSettings) {
    let f = &file.facade;
    let r = &file.registry;
    let mut dur = |key: &str, v: &Option<String>, default: Duration| -> Duration {
        match v.as_deref().map(humantime::parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                errs.push(format!("facade.{key}: {:?}: {e}", v.as_deref().unwrap_or_default()));
                default
            }
        }
    };
    let store_ttl = dur("storeTTL", &f.store_ttl, Duration::from_secs(168 * 3600));
    let tag_ttl = dur("clusterTagTTL", &f.cluster_tag_ttl, Duration::from_secs(300));
    let redis_timeout = dur("clusterRedisTimeout", &f.cluster_redis_timeout, Duration::from_millis(500));
    let ipfs_timeout = dur("clusterIPFSTimeout", &f.cluster_ipfs_timeout, Duration::from_secs(3));
    for (key, d) in
        [("clusterTagTTL", tag_ttl), ("clusterRedisTimeout", redis_timeout), ("clusterIPFSTimeout", ipfs_timeout)]
    {
        if d.is_zero() {
            errs.push(format!("facade.{key}: must be more than 0"));
        }
    }
    let store_max_bytes = match &f.store_max_bytes {
        None => Some(20u64 << 30),
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(n) => Some(n),
            None => {
                errs.push(format!("facade.storeMaxBytes: {n} is not a whole number of bytes"));
                None
            }
        },
        Some(serde_json::Value::String(s)) => match parse_size(s) {
            Ok(n) => Some(n),
            Err(e) => {
                errs.push(format!("facade.storeMaxBytes: {s:?}: {e}"));
                None
            }
        },
        Some(other) => {
            errs.push(format!("facade.storeMaxBytes: {other} is neither a number nor a size such as \"20GiB\""));
            None
        }
    };

    let redis = match &r.redis {
        Some(rs) if rs.enabled => {
            let addr = rs.single_host_addr.trim();
            let valid =
                addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !valid {
                errs.push(format!("registry.redis.singleHostAddr: {addr:?} is not host:port"));
            }
            let mut c = facade_blob::cluster::RedisConfig::new(addr);
            c.username = Some(rs.username.clone()).filter(|u| !u.is_empty());
            c.password = env.var("REDIS_PASSWORD").filter(|p| !p.is_empty());
            c.tls = rs.use_tls;
            c.insecure_skip_verify = rs.insecure_skip_verify;
            c.timeout = redis_timeout;
            Some(c)
        }
        _ => None,
    };
    let ipfs = match &r.ipfs {
        Some(is) if is.enabled => {
            let mut addr = is.ipfs_addr.clone();
            for var in ["${IPFS_HOST}", "$IPFS_HOST"] {
                if addr.contains(var) {
                    match env.var("IPFS_HOST").filter(|h| !h.is_empty()) {
                        Some(host) => addr = addr.replace(var, &host),
                        None => errs.push(format!(
                            "registry.ipfs.ipfsAddr: {:?} uses $IPFS_HOST, which is not set",
                            is.ipfs_addr
                        )),
                    }
                }
            }
            match facade_blob::cluster::api_url_from_multiaddr(&addr) {
                Ok(url) => {
                    let mut c = facade_blob::cluster::IpfsConfig::new(url);
                    c.first_byte_timeout = ipfs_timeout;
                    c.node_timeout = ipfs_timeout;
                    Some(c)
                }
                Err(e) => {
                    if !addr.contains("$IPFS_HOST") && !addr.contains("${IPFS_HOST}") {
                        errs.push(format!("registry.ipfs.ipfsAddr: {e}"));
                    }
                    None
                }
            }
        }
        _ => None,
    };
    if r.ipfs.as_ref().is_some_and(|i| i.enabled) && redis.is_none() {
        errs.push("registry.ipfs.enabled: IPFS needs registry.redis (the index of what IPFS holds) enabled too".into());
    }
    let store_max_bytes = store_max_bytes.filter(|&n| n > 0);
    let store_ttl = Some(store_ttl).filter(|d| !d.is_zero());
    (store_max_bytes, store_ttl, ClusterSettings { redis, ipfs, tag_ttl })
}

/// The registry's listen address when `facade.listenHost` is not set.
pub const LISTEN_HOST_ENV: &str = "REGISTRY_FACADE_LISTEN_HOST";

/// Looks up environment variables (injected so tests need not touch the process environment).
pub trait Env {
    /// The value of `name`.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Every problem with a configuration, reported on one line.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// Parses and validates configuration text. `base_dir` resolves relative paths.
pub fn parse(text: &str, base_dir: &std::path::Path, env: &dyn Env) -> Result<Config, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde_json appends " at line L column C"; keep it, it helps find the spot.
        ConfigError(vec![if path == "." { msg } else { format!("{path}: {msg}") }])
    })?;
    let mut errs = Vec::new();
    let r = &file.registry;

    let path_of = |s: &str| -> PathBuf {
        let p = PathBuf::from(s);
        if p.is_absolute() { p } else { base_dir.join(p) }
    };
    let check_file = |key: &str, s: &str, errs: &mut Vec<String>| -> Option<PathBuf> {
        if s.is_empty() {
            return None;
        }
        let p = path_of(s);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Some(p),
            Ok(_) => {
                errs.push(format!("{key}: {} is not a file", p.display()));
                None
            }
            Err(e) => {
                errs.push(format!("{key}: cannot read {}: {e}", p.display()));
                None
            }
        }
    };

    // A config file written by the reference's installer has no `facade` section, so the
    // environment can set the listen address where the file cannot be changed.
    let (listen_key, listen_host) = match (&file.facade.listen_host, env.var(LISTEN_HOST_ENV)) {
        (Some(h), _) => ("facade.listenHost", h.clone()),
        (None, Some(h)) if !h.is_empty() => (LISTEN_HOST_ENV, h),
        (None, _) => ("facade.listenHost", "0.0.0.0".to_string()),
    };
    let listen = match format!("{listen_host}:{}", r.port).parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => match format!("[{listen_host}]:{}", r.port).parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                errs.push(format!("{listen_key}: {listen_host:?} is not an IP address"));
                SocketAddr::from(([0, 0, 0, 0], r.port))
            }
        },
    };
    let prefix = r.prefix.trim_end_matches('/').to_string();
    if !prefix.is_empty() && (!prefix.starts_with('/') || prefix.contains("//") || prefix.contains(char::is_whitespace))
    {
        errs.push(format!("registry.prefix: {:?} must start with '/' and contain no spaces", r.prefix));
    }
    let tls = match &r.tls {
        Some(t) if !t.crt.is_empty() || !t.key.is_empty() => {
            if t.crt.is_empty() || t.key.is_empty() {
                errs.push("registry.tls: crt and key go together".into());
                None
            } else {
                match (
                    check_file("registry.tls.crt", &t.crt, &mut errs),
                    check_file("registry.tls.key", &t.key, &mut errs),
                ) {
                    (Some(crt), Some(key)) => Some((crt, key)),
                    _ => None,
                }
            }
        }
        _ => None,
    };
    let client_auth = match (&file.facade.htpasswd, r.require_auth) {
        (Some(p), true) if p.is_empty() => {
            errs.push("facade.htpasswd: empty; name the bcrypt htpasswd file, or leave the key out to only require that pulls carry credentials".into());
            ClientAuth::Off
        }
        (Some(p), true) => check_file("facade.htpasswd", p, &mut errs).map_or(ClientAuth::Off, ClientAuth::Htpasswd),
        (None, true) => ClientAuth::CredentialsPresent,
        (Some(_), false) => {
            errs.push("facade.htpasswd: set, but registry.requireAuth is false; refusing to guess whether pulls should be authenticated".into());
            ClientAuth::Off
        }
        (None, false) => ClientAuth::Off,
    };
    let pprof_addr = Some(file.pprof_addr.trim().to_string()).filter(|a| !a.is_empty());
    let registry_tls_ca = r.tls.as_ref().map(|t| t.ca.trim().to_string()).filter(|ca| !ca.is_empty());
    let remote_spec_providers = parse_remote_providers(&r.remote_spec_provider, &check_file, &mut errs);
    let (store_max_bytes, store_ttl, cluster) = parse_cluster(&file, env, &mut errs);

    let mut static_layers = Vec::new();
    for (i, l) in r.static_layer.iter().enumerate() {
        let key = format!("registry.staticLayer[{i}]");
        match l.kind.as_str() {
            "image" => match ImageRef::parse(&l.reference) {
                Ok(img) => static_layers.push(facade_blob::StaticLayerSpec::Image(img)),
                Err(e) => errs.push(format!("{key}.ref: {e}")),
            },
            "file" => {
                if let Some(p) = check_file(&format!("{key}.ref"), &l.reference, &mut errs) {
                    static_layers.push(facade_blob::StaticLayerSpec::File(p));
                } else if l.reference.is_empty() {
                    errs.push(format!("{key}.ref: empty"));
                }
            }
            other => errs.push(format!("{key}.type: {other:?} is neither \"image\" nor \"file\"")),
        }
    }
    let fixed_spec_file = check_file("registry.fixedSpecFN", &r.fixed_spec_file, &mut errs);
    let docker_auth = check_file("dockerAuth", &file.docker_auth, &mut errs);
    let store = (!r.store.is_empty()).then(|| path_of(&r.store));

    let addr = |key: &str, s: &str, errs: &mut Vec<String>| -> Option<SocketAddr> {
        if s.is_empty() {
            return None;
        }
        // Go-style ":8086" means all interfaces.
        let full = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_string() };
        match full.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(format!("{key}: {s:?} is not host:port with an IP host"));
                None
            }
        }
    };
    let prometheus_addr = addr("prometheusAddr", &file.prometheus_addr, &mut errs);
    let readiness_addr = addr("readinessProbeAddr", &file.readiness_probe_addr, &mut errs);

    let f = &file.facade;
    let platform = match &f.platform {
        None => Platform::host(),
        Some(s) => Platform::parse(s).unwrap_or_else(|| {
            errs.push(format!("facade.platform: {s:?} is not os/arch[/variant]"));
            Platform::host()
        }),
    };
    let mut dur = |key: &str, v: &Option<String>, default: Duration| -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    errs.push(format!("facade.{key}: {s:?}: {e}"));
                    default
                }
            },
        }
    };
    let compose_ttl = dur("composeTTL", &f.compose_ttl, Duration::from_secs(30));
    let tag_ttl = dur("tagTTL", &f.tag_ttl, Duration::from_secs(60));
    let connect = dur("upstreamConnectTimeout", &f.upstream_connect_timeout, Duration::from_secs(5));
    let metadata = dur("upstreamMetadataTimeout", &f.upstream_metadata_timeout, Duration::from_secs(20));
    let read = dur("upstreamReadTimeout", &f.upstream_read_timeout, Duration::from_secs(15));
    let shutdown_grace = dur("shutdownGrace", &f.shutdown_grace, Duration::from_secs(30));
    let spec_timeout = dur("specTimeout", &f.spec_timeout, Duration::from_secs(5));
    let spec_cache_ttl = dur("specCacheTTL", &f.spec_cache_ttl, Duration::from_secs(10));
    let spec_negative_ttl = dur("specNegativeTTL", &f.spec_negative_ttl, Duration::from_secs(2));
    let spec_stale_ttl = dur("specStaleTTL", &f.spec_stale_ttl, Duration::from_secs(3600));
    if spec_timeout.is_zero() {
        errs.push("facade.specTimeout: must be more than 0".into());
    }
    let ipfs_stall = cluster.ipfs.as_ref().map(|i| i.first_byte_timeout);
    let stalls: Vec<(&str, Duration)> = [("upstreamReadTimeout", Some(read)), ("clusterIPFSTimeout", ipfs_stall)]
        .into_iter()
        .filter_map(|(k, t)| t.map(|t| (k, t)))
        .collect();
    let limits = parse_limits(f, &stalls, &mut errs);
    let spec_server_name = f.spec_server_name.clone().unwrap_or_else(|| "ws-manager".into());
    if spec_server_name.is_empty() || spec_server_name.contains(|c: char| c.is_whitespace() || c == '/') {
        errs.push(format!("facade.specServerName: {spec_server_name:?} is not a host name"));
    }
    if fixed_spec_file.is_none() && r.fixed_spec_file.is_empty() && r.remote_spec_provider.is_empty() {
        errs.push(
            "registry: neither fixedSpecFN nor remoteSpecProvider is set, so no image could ever be served".into(),
        );
    }
    // Read here, so a missing file or one without a certificate stops the start with one line.
    let upstream_ca_pem = f.upstream_ca.as_deref().and_then(|s| {
        if s.is_empty() {
            errs.push("facade.upstreamCA: empty; name a PEM file of CA certificates, or leave the key out".into());
            return None;
        }
        let p = path_of(s);
        let text = std::fs::read_to_string(&p)
            .map_err(|e| errs.push(format!("facade.upstreamCA: cannot read {}: {e}", p.display())))
            .ok()?;
        match facade_upstream::parse_ca_bundle(&text) {
            Ok(_) => Some(text),
            Err(e) => {
                let reason = match e {
                    facade_upstream::Error::Config { reason } => reason,
                    e => e.to_string(),
                };
                errs.push(format!("facade.upstreamCA: {}: {reason}", p.display()));
                None
            }
        }
    });
    if !errs.is_empty() {
        return Err(ConfigError(errs));
    }
    Ok(Config {
        listen,
        tls,
        client_auth,
        pprof_addr,
        registry_tls_ca,
        prefix,
        store,
        store_max_bytes,
        store_ttl,
        cluster,
        static_layers,
        fixed_spec_file,
        remote_spec_providers,
        spec: SpecSettings {
            timeout: spec_timeout,
            cache_ttl: spec_cache_ttl,
            negative_ttl: spec_negative_ttl,
            stale_ttl: spec_stale_ttl,
            cache_size: f.spec_cache_size.unwrap_or(10_000),
            server_name: spec_server_name,
        },
        docker_auth,
        prometheus_addr,
        readiness_addr,
        platform,
        compose_ttl,
        tag_ttl,
        plain_http_hosts: f.plain_http_hosts.clone(),
        upstream_timeouts: (connect, metadata, read),
        upstream_ca_pem,
        shutdown_grace,
        limits,
        legacy_metrics: f.legacy_metrics.unwrap_or(true),
    })
}

/// Environment for tests.
#[derive(Default)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
        parse(s, dir.path(), &MapEnv::default())
    }

    #[test]
    fn legacy_metrics_default_on_and_can_be_turned_off() {
        let on = parse_str(r#"{"registry": {"port": 0, "fixedSpecFN": "specs.json"}}"#).unwrap();
        assert!(on.legacy_metrics);
        let off =
            parse_str(r#"{"registry": {"port": 0, "fixedSpecFN": "specs.json"}, "facade": {"legacyMetrics": false}}"#)
                .unwrap();
        assert!(!off.legacy_metrics);
        let bad =
            parse_str(r#"{"registry": {"port": 0, "fixedSpecFN": "specs.json"}, "facade": {"legacyMetrics": "no"}}"#)
                .unwrap_err();
        assert!(bad.to_string().contains("legacyMetrics"), "{bad}");
    }

    #[test]
    fn accepts_the_reference_shape() {
        let c = parse_str(
            r#"{"registry": {"port": 31750, "prefix": "", "store": "/tmp/x", "requireAuth": false,
                "staticLayer": [{"ref": "registry.example/supervisor:v1", "type": "image"}],
                "fixedSpecFN": "specs.json",
                "redis": {"enabled": false, "singleHostAddr": "redis:6379", "username": "", "useTLS": false},
                "ipfs": {"enabled": false, "ipfsAddr": "/ip4/127.0.0.1/tcp/5001"}},
               "dockerAuth": "", "prometheusAddr": "127.0.0.1:9500", "readinessProbeAddr": ":8086"}"#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 31750);
        assert_eq!(c.readiness_addr.unwrap().to_string(), "0.0.0.0:8086");
        assert_eq!(c.static_layers.len(), 1);
        assert_eq!(c.compose_ttl, Duration::from_secs(30));
    }

    /// The reference installer's rendering, as in the repository's notes on the reference
    /// (`gitpod-compat.md`), with its placeholders replaced by real files.
    const INSTALLER_RENDERING: &str = r#"{
  "registry": {
    "port": 31750,
    "prefix": "",
    "staticLayer": [
      {"ref": "<registry>/gitpod/supervisor:commit-…", "type": "image"},
      {"ref": "<registry>/gitpod/workspacekit:commit-…", "type": "image"},
      {"ref": "<registry>/gitpod/docker-up:commit-…", "type": "image"}
    ],
    "remoteSpecProvider": [{"addr": "dns:///ws-manager-mk2:8080",
                            "tls": {"ca": "<client-certs>/ca.crt",
                                    "crt": "<client-certs>/tls.crt",
                                    "key": "<client-certs>/tls.key"}}],
    "store": "<cache-dir>",
    "requireAuth": false,
    "tls": {"ca": "", "crt": "<certs>/tls.crt", "key": "<certs>/tls.key"},
    "redis": {"enabled": true, "singleHostAddr": "redis:6379"},
    "ipfs": {"enabled": true, "ipfsAddr": "/ip4/$IPFS_HOST/tcp/5001"}
  },
  "dockerAuth": "<pull-secret>/pull-secret.json",
  "pprofAddr": "127.0.0.1:6060",
  "prometheusAddr": "127.0.0.1:9500",
  "readinessProbeAddr": ":8086"
}"#;

    /// A directory with every file the installer's rendering names, and that rendering.
    fn installer_files() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["client-certs", "certs", "pull-secret"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        for f in
            ["client-certs/ca.crt", "client-certs/tls.crt", "client-certs/tls.key", "certs/tls.crt", "certs/tls.key"]
        {
            std::fs::write(d.join(f), "x").unwrap();
        }
        std::fs::write(d.join("pull-secret/pull-secret.json"), r#"{"auths": {}}"#).unwrap();
        let text = INSTALLER_RENDERING
            .replace("<registry>", "registry.example.com")
            .replace("commit-…", "commit-0123abcd")
            .replace("<client-certs>", &d.join("client-certs").display().to_string())
            .replace("<certs>", &d.join("certs").display().to_string())
            .replace("<pull-secret>", &d.join("pull-secret").display().to_string())
            .replace("<cache-dir>", &d.join("cache").display().to_string());
        (dir, text)
    }

    fn ipfs_host_env() -> MapEnv {
        MapEnv(BTreeMap::from([("IPFS_HOST".to_string(), "10.0.0.7".to_string())]))
    }

    #[test]
    fn starts_from_the_installer_rendering_unchanged() {
        let (dir, text) = installer_files();
        let c = parse(&text, dir.path(), &ipfs_host_env()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:31750".parse().unwrap());
        assert_eq!(c.tls, Some((dir.path().join("certs/tls.crt"), dir.path().join("certs/tls.key"))));
        assert_eq!(c.registry_tls_ca, None, "\"ca\": \"\" is no CA");
        assert_eq!(c.client_auth, ClientAuth::Off);
        assert_eq!(c.static_layers.len(), 3);
        let p = &c.remote_spec_providers;
        assert_eq!((p.len(), p[0].addr.as_str()), (1, "dns:///ws-manager-mk2:8080"));
        let tls = p[0].tls.as_ref().unwrap();
        assert_eq!(tls.ca, dir.path().join("client-certs/ca.crt"));
        assert!(tls.identity.is_some());
        assert_eq!(c.spec.server_name, "ws-manager");
        assert_eq!(c.store, Some(dir.path().join("cache")));
        let redis = c.cluster.redis.as_ref().unwrap();
        assert_eq!((redis.addr.as_str(), redis.tls, redis.insecure_skip_verify), ("redis:6379", false, false));
        assert_eq!(c.cluster.ipfs.as_ref().unwrap().api, "http://10.0.0.7:5001");
        assert_eq!(c.docker_auth, Some(dir.path().join("pull-secret/pull-secret.json")));
        assert_eq!(c.pprof_addr.as_deref(), Some("127.0.0.1:6060"));
        assert_eq!(c.prometheus_addr, Some("127.0.0.1:9500".parse().unwrap()));
        assert_eq!(c.readiness_addr, Some("0.0.0.0:8086".parse().unwrap()));
        let notices = c.startup_notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(
            notices[0].starts_with("pprofAddr \"127.0.0.1:6060\"") && notices[0].contains("/metrics"),
            "{notices:?}"
        );

        // Go's encoder writes a nil slice as null; an empty TLS section (no certificate
        // configured in the installer) is plain HTTP.
        let text = text
            .replace(r#""prefix": """#, r#""prefix": null"#)
            .replace(r#""tls": {"ca": "","#, r#""tls": {"ca": null,"#);
        let text = text.replacen(r#""staticLayer": ["#, r#""staticLayer": null, "unused": ["#, 1);
        let e = parse(&text, dir.path(), &ipfs_host_env()).unwrap_err().to_string();
        assert!(e.contains("registry.unused: unknown field `unused`"), "{e}");
    }

    #[test]
    fn accepts_every_reference_key_with_its_meaning() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["specs.json", "ca.pem", "crt.pem", "key.pem", "docker.json"] {
            std::fs::write(dir.path().join(f), "{}").unwrap();
        }
        let env = MapEnv(BTreeMap::from([("REDIS_PASSWORD".to_string(), "pw".to_string())]));
        let c = parse(
            r#"{"registry": {"port": 0, "prefix": "/mirror", "staticLayer": null,
                 "remoteSpecProvider": {"addr": "dns:///ws-manager:8080", "tls": {"ca": "ca.pem", "crt": "crt.pem", "key": "key.pem"}},
                 "fixedSpecFN": "specs.json", "store": "", "requireAuth": true,
                 "tls": {"ca": "ca.pem", "crt": "crt.pem", "key": "key.pem"},
                 "redis": {"enabled": true, "singleHostAddr": "redis.example:6380", "username": "facade",
                           "useTLS": true, "insecureSkipVerify": true},
                 "ipfs": {"enabled": true, "ipfsAddr": "/dns4/ipfs.example/tcp/5001"}},
               "dockerAuth": "docker.json", "pprofAddr": "localhost:6060", "prometheusAddr": "",
               "readinessProbeAddr": null}"#,
            dir.path(),
            &env,
        )
        .unwrap();
        assert_eq!(c.prefix, "/mirror");
        assert!(c.static_layers.is_empty());
        assert_eq!(c.remote_spec_providers.len(), 1, "one provider object, as older installers wrote it");
        assert!(c.fixed_spec_file.is_some());
        assert_eq!(c.client_auth, ClientAuth::CredentialsPresent);
        assert_eq!(c.registry_tls_ca.as_deref(), Some("ca.pem"));
        let redis = c.cluster.redis.as_ref().unwrap();
        assert_eq!(
            (redis.username.as_deref(), redis.password.as_deref(), redis.tls, redis.insecure_skip_verify),
            (Some("facade"), Some("pw"), true, true)
        );
        assert_eq!((c.prometheus_addr, c.readiness_addr), (None, None));
        let notices = c.startup_notices().join("\n");
        for needle in [
            "pprofAddr \"localhost:6060\"",
            "registry.tls.ca \"ca.pem\": not read",
            "registry.requireAuth without facade.htpasswd",
        ] {
            assert!(notices.contains(needle), "{needle} missing from:\n{notices}");
        }

        // With facade.htpasswd, requireAuth keeps checking the file.
        std::fs::write(dir.path().join("htpasswd"), "").unwrap();
        let c = parse(
            r#"{"registry": {"fixedSpecFN": "specs.json", "requireAuth": true}, "facade": {"htpasswd": "htpasswd"}}"#,
            dir.path(),
            &env,
        )
        .unwrap();
        assert_eq!(c.client_auth, ClientAuth::Htpasswd(dir.path().join("htpasswd")));
        assert!(c.startup_notices().is_empty());
    }

    #[test]
    fn typos_in_reference_keys_are_still_refused_by_name() {
        for (text, needle) in [
            (r#"{"registry": {"fixedSpecFN": "specs.json"}, "pprofAdr": "127.0.0.1:6060"}"#, "pprofAdr: unknown field"),
            (r#"{"registry": {"fixedSpecFN": "specs.json", "tls": {"cA": ""}}}"#, "registry.tls.cA: unknown field"),
            (
                r#"{"registry": {"fixedSpecFN": "specs.json", "redis": {"enabled": true, "singleHostAddr": "r:1", "insecureSkipverify": true}}}"#,
                "registry.redis.insecureSkipverify: unknown field",
            ),
            (
                r#"{"registry": {"remoteSpecProvider": {"addr": "h:1", "tsl": {}}}}"#,
                "registry.remoteSpecProvider.tsl: unknown field",
            ),
            (r#"{"registry": {"remoteSpecProvider": "h:1"}}"#, "registry.remoteSpecProvider: invalid type"),
            (r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"listenhost": "::1"}}"#, "facade.listenhost"),
        ] {
            let e = parse_str(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(!e.contains('\n'), "multi-line error: {e}");
        }
    }

    #[test]
    fn the_environment_sets_the_listen_host_the_file_does_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
        let env = |v: &str| MapEnv(BTreeMap::from([(LISTEN_HOST_ENV.to_string(), v.to_string())]));
        let text = r#"{"registry": {"port": 31750, "fixedSpecFN": "specs.json"}}"#;
        assert_eq!(parse(text, dir.path(), &env("127.0.0.1")).unwrap().listen, "127.0.0.1:31750".parse().unwrap());
        assert_eq!(parse(text, dir.path(), &env("::1")).unwrap().listen, "[::1]:31750".parse().unwrap());
        assert_eq!(parse(text, dir.path(), &env("")).unwrap().listen, "0.0.0.0:31750".parse().unwrap());
        let e = parse(text, dir.path(), &env("localhost")).unwrap_err().to_string();
        assert!(e.contains(&format!("{LISTEN_HOST_ENV}: \"localhost\" is not an IP address")), "{e}");
        let with_key =
            r#"{"registry": {"port": 31750, "fixedSpecFN": "specs.json"}, "facade": {"listenHost": "10.1.1.1"}}"#;
        assert_eq!(parse(with_key, dir.path(), &env("127.0.0.1")).unwrap().listen, "10.1.1.1:31750".parse().unwrap());
    }

    #[test]
    fn names_the_key_of_every_problem() {
        let cases = [
            (r#"{"registry": {"port": 70000}}"#, "registry.port"),
            (r#"{"registry": {"bogus": 1}}"#, "registry.bogus: unknown field `bogus`"),
            (
                r#"{"registry": {"fixedSpecFN": "specs.json", "staticLayer": [{"ref": "x", "type": "tarball"}]}}"#,
                "registry.staticLayer[0].type",
            ),
            (r#"{"registry": {"fixedSpecFN": "missing.json"}}"#, "registry.fixedSpecFN: cannot read"),
            (r#"{"registry": {"fixedSpecFN": "specs.json"}, "prometheusAddr": "nope"}"#, "prometheusAddr"),
            (r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"tagTTL": "soon"}}"#, "facade.tagTTL"),
            (r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"platform": "linux"}}"#, "facade.platform"),
            (r#"{"registry": {}}"#, "neither fixedSpecFN nor remoteSpecProvider"),
            (r#"["#, "EOF"),
        ];
        for (text, needle) in cases {
            let e = parse_str(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(!e.contains('\n'), "multi-line error: {e}");
        }
    }

    #[test]
    fn reports_all_problems_at_once() {
        let e = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json", "staticLayer": [{"ref": "UPPER", "type": "image"}]}, "prometheusAddr": "x", "facade": {"composeTTL": "y"}}"#)
            .unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        for (s, n) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("512MiB", 512 << 20),
            ("20GiB", 20 << 30),
            ("1.5 GiB", 3 << 29),
            ("2TiB", 2 << 40),
            ("10KB", 10_000),
            ("3GB", 3_000_000_000),
            (" 7 B ", 7),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for bad in ["", "GiB", "12XB", "-1MiB", "1.2.3MiB", "99999999999TiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cluster_and_store_keys_have_defaults_and_read_the_environment() {
        let c = parse_str(
            r#"{"registry": {"fixedSpecFN": "specs.json", "redis": {"enabled": false}, "ipfs": {"enabled": false}}}"#,
        )
        .unwrap();
        assert_eq!(c.store_max_bytes, Some(20 << 30));
        assert_eq!(c.store_ttl, Some(Duration::from_secs(168 * 3600)));
        assert_eq!(c.cluster.tag_ttl, Duration::from_secs(300));
        assert!(c.cluster.redis.is_none() && c.cluster.ipfs.is_none());

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
        let env = MapEnv(BTreeMap::from([
            ("REDIS_PASSWORD".to_string(), "s3cret".to_string()),
            ("IPFS_HOST".to_string(), "10.1.2.3".to_string()),
        ]));
        let c = parse(
            r#"{"registry": {"fixedSpecFN": "specs.json",
                "redis": {"enabled": true, "singleHostAddr": "redis:6379", "username": "facade", "useTLS": true},
                "ipfs": {"enabled": true, "ipfsAddr": "/ip4/$IPFS_HOST/tcp/5001"}},
               "facade": {"storeMaxBytes": "512MiB", "storeTTL": "0s", "clusterTagTTL": "30s",
                          "clusterRedisTimeout": "250ms", "clusterIPFSTimeout": "2s"}}"#,
            dir.path(),
            &env,
        )
        .unwrap();
        let redis = c.cluster.redis.unwrap();
        assert_eq!(redis.addr, "redis:6379");
        assert_eq!(
            (redis.username.as_deref(), redis.password.as_deref(), redis.tls),
            (Some("facade"), Some("s3cret"), true)
        );
        assert_eq!(redis.timeout, Duration::from_millis(250));
        let ipfs = c.cluster.ipfs.unwrap();
        assert_eq!((ipfs.api.as_str(), ipfs.first_byte_timeout), ("http://10.1.2.3:5001", Duration::from_secs(2)));
        assert_eq!(
            (c.store_max_bytes, c.store_ttl, c.cluster.tag_ttl),
            (Some(512 << 20), None, Duration::from_secs(30))
        );

        let c = parse(
            r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"storeMaxBytes": 1073741824}}"#,
            dir.path(),
            &env,
        )
        .unwrap();
        assert_eq!(c.store_max_bytes, Some(1 << 30));
        let c =
            parse(r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"storeMaxBytes": 0}}"#, dir.path(), &env)
                .unwrap();
        assert_eq!(c.store_max_bytes, None, "0 means unbounded");
    }

    #[test]
    fn names_every_cluster_problem_at_once() {
        let e = parse_str(
            r#"{"registry": {"fixedSpecFN": "specs.json",
                "redis": {"enabled": true, "singleHostAddr": "redis"},
                "ipfs": {"enabled": true, "ipfsAddr": "/ip4/$IPFS_HOST/tcp/5001"}},
               "facade": {"storeMaxBytes": "20 GB-ish", "storeTTL": "a week", "clusterTagTTL": "0s"}}"#,
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "registry.redis.singleHostAddr",
            "registry.ipfs.ipfsAddr: \"/ip4/$IPFS_HOST/tcp/5001\" uses $IPFS_HOST, which is not set",
            "facade.storeMaxBytes",
            "facade.storeTTL",
            "facade.clusterTagTTL: must be more than 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        assert!(!text.contains('\n'));
        let e = parse_str(
            r#"{"registry": {"fixedSpecFN": "specs.json", "ipfs": {"enabled": true, "ipfsAddr": "/ip4/1.2.3.4/udp/1"}},
               "facade": {"storeMaxBytes": true}}"#,
        )
        .unwrap_err()
        .to_string();
        for needle in
            ["registry.ipfs.ipfsAddr", "registry.ipfs.enabled: IPFS needs registry.redis", "facade.storeMaxBytes"]
        {
            assert!(e.contains(needle), "{needle} missing from: {e}");
        }
    }

    #[test]
    fn parses_remote_spec_providers() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "crt.pem", "key.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let c = parse(
            r#"{"registry": {"remoteSpecProvider": [
                  {"addr": "dns:///ws-manager:8080", "tls": {"ca": "ca.pem", "crt": "crt.pem", "key": "key.pem"}},
                  {"addr": "127.0.0.1:9000", "tls": {"ca": "ca.pem"}},
                  {"addr": "127.0.0.1:9001"}]},
               "facade": {"specTimeout": "750ms", "specCacheTTL": "0s", "specServerName": "spec.test", "specCacheSize": 5}}"#,
            dir.path(),
            &MapEnv::default(),
        )
        .unwrap();
        let p = &c.remote_spec_providers;
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].addr, "dns:///ws-manager:8080");
        let tls = p[0].tls.as_ref().unwrap();
        assert_eq!(tls.ca, dir.path().join("ca.pem"));
        assert_eq!(tls.identity, Some((dir.path().join("crt.pem"), dir.path().join("key.pem"))));
        assert!(p[1].tls.as_ref().unwrap().identity.is_none());
        assert!(p[2].tls.is_none());
        assert_eq!(c.spec.timeout, Duration::from_millis(750));
        assert_eq!(c.spec.cache_ttl, Duration::ZERO);
        assert_eq!(c.spec.negative_ttl, Duration::from_secs(2));
        assert_eq!(c.spec.stale_ttl, Duration::from_secs(3600));
        assert_eq!((c.spec.cache_size, c.spec.server_name.as_str()), (5, "spec.test"));
        assert!(c.fixed_spec_file.is_none());

        let c = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json"}}"#).unwrap();
        assert!(c.remote_spec_providers.is_empty());
        assert_eq!((c.spec.timeout, c.spec.server_name.as_str()), (Duration::from_secs(5), "ws-manager"));
    }

    #[test]
    fn names_every_remote_spec_provider_problem_at_once() {
        let e = parse_str(
            r#"{"registry": {"remoteSpecProvider": [
                  {"addr": "unix:///run/ws.sock"},
                  {"addr": ""},
                  {"addr": "h:1", "tls": {"crt": "specs.json"}},
                  {"addr": "h:1", "tls": {"ca": "missing.pem"}},
                  {"addr": "https://h:1"}]},
               "facade": {"specTimeout": "0s", "specNegativeTTL": "later", "specServerName": "a b"}}"#,
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "registry.remoteSpecProvider[0].addr",
            "registry.remoteSpecProvider[1].addr",
            "registry.remoteSpecProvider[2].tls.ca: required",
            "registry.remoteSpecProvider[2].tls: crt and key",
            "registry.remoteSpecProvider[3].tls.ca: cannot read",
            "registry.remoteSpecProvider[4].addr",
            "facade.specTimeout",
            "facade.specNegativeTTL",
            "facade.specServerName",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        assert!(!text.contains('\n'));
        let e = parse_str(r#"{"registry": {"remoteSpecProvider": [{"addr": "h:1", "bogus": 1}]}}"#).unwrap_err();
        assert!(e.to_string().contains("registry.remoteSpecProvider[0].bogus"), "{e}");
    }

    #[test]
    fn request_limits_have_defaults_and_parse() {
        let c = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json"}}"#).unwrap();
        assert_eq!(c.limits, RequestLimits::default());
        assert_eq!(c.limits.max_requests_per_client, 256);
        assert_eq!(c.limits.response_idle_timeout, Some(Duration::from_secs(300)));

        let c = parse_str(
            r#"{"registry": {"fixedSpecFN": "specs.json"},
               "facade": {"maxRequestHeaderBytes": "128KiB", "maxURLBytes": 4096, "maxRequestsPerClient": 0,
                          "responseIdleTimeout": "0s"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.limits,
            RequestLimits {
                max_header_bytes: 128 << 10,
                max_url_bytes: 4096,
                max_requests_per_client: 0,
                response_idle_timeout: None
            }
        );
    }

    #[test]
    fn names_every_request_limit_problem_at_once() {
        let e = parse_str(
            r#"{"registry": {"fixedSpecFN": "specs.json"},
               "facade": {"maxRequestHeaderBytes": "4KiB", "maxURLBytes": "lots", "maxRequestsPerClient": -1,
                          "responseIdleTimeout": "10s"}}"#,
        )
        .unwrap_err();
        // maxRequestsPerClient: -1 is a type error, reported alone by the JSON decoder.
        assert!(e.to_string().contains("facade.maxRequestsPerClient"), "{e}");

        let e = parse_str(
            r#"{"registry": {"fixedSpecFN": "specs.json"},
               "facade": {"maxRequestHeaderBytes": "4KiB", "maxURLBytes": "lots", "responseIdleTimeout": "10s"}}"#,
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "facade.maxRequestHeaderBytes: 4096 is outside 8KiB..1MiB",
            "facade.maxURLBytes: \"lots\"",
            "facade.responseIdleTimeout: 10s is not more than facade.upstreamReadTimeout (15s)",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        assert_eq!(e.0.len(), 3, "{text}");
        assert!(!text.contains('\n'));

        for (facade, needle) in [
            (r#"{"maxURLBytes": 100}"#, "facade.maxURLBytes: 100 is less than 1KiB"),
            (r#"{"maxURLBytes": "128KiB"}"#, "facade.maxURLBytes: 131072 is more than facade.maxRequestHeaderBytes"),
            (r#"{"maxRequestHeaderBytes": true}"#, "facade.maxRequestHeaderBytes: true is neither"),
            (r#"{"responseIdleTimeout": "soon"}"#, "facade.responseIdleTimeout: \"soon\""),
            (
                r#"{"responseIdleTimeout": "20s", "upstreamReadTimeout": "30s"}"#,
                "facade.responseIdleTimeout: 20s is not more than facade.upstreamReadTimeout (30s)",
            ),
        ] {
            let text = format!(r#"{{"registry": {{"fixedSpecFN": "specs.json"}}, "facade": {facade}}}"#);
            let e = parse_str(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{facade}: {e}");
        }
    }
}
