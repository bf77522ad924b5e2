//! The configuration file (`registry-facade run <config.json>`): the reference facade's keys as
//! they are, plus a `facade` section of our own. Parsing takes text, and environment lookups are
//! injected, so both are testable; every problem found is reported, on one line.
//!
//! Each section resolves straight into the configuration type of the crate it sets up, starting
//! from that crate's `Default`: a key the file leaves out keeps the crate's value, which is the
//! one the README's table shows (a test here holds the two together).

mod cluster;
mod env;
mod file;
mod limits;
mod memory;
mod peer;
mod providers;
mod registry;
mod upstream;
mod values;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use facade_blob::{ClusterConfig, FetchConfig, ImagesConfig, PrefetchConfig, StaticLayerSpec, StoreConfig};

pub use env::{Env, LISTEN_HOST_ENV, MapEnv, ProcessEnv};
pub use file::{
    ClientTlsSection, FacadeSection, FileConfig, IpfsSection, RedisSection, RegistrySection, RemoteProviderEntry,
    StaticLayerEntry, TlsSection,
};
pub use limits::RequestLimits;
pub use memory::MemoryLimits;
pub use peer::PeerSettings;
pub use providers::{RemoteSpecProvider, RemoteSpecTls, SpecSettings};
pub use registry::ClientAuth;
pub use values::parse_size;

use values::Checker;

/// How long in-flight pulls may finish after SIGTERM when `facade.shutdownGrace` is not set:
/// the kubelet's default termination grace period.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

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
    /// The local store's bounds (`facade.storeMaxBytes`, `facade.storeTTL`).
    pub store_bounds: StoreConfig,
    /// The cluster cache (`registry.redis`, `registry.ipfs`, `facade.cluster*`); neither
    /// Redis nor IPFS set means none.
    pub cluster: ClusterConfig,
    /// Static layers, in order.
    pub static_layers: Vec<StaticLayerSpec>,
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
    /// The upstream client (`facade.plainHTTPHosts`, `facade.upstream*`).
    pub upstream: facade_upstream::Config,
    /// Networks upstream connections may never reach (`facade.upstreamDenyNetworks`).
    pub upstream_deny_networks: Vec<facade_upstream::ssrf::Cidr>,
    /// Image fetching (`facade.platform`, `facade.tagTTL`).
    pub fetch: FetchConfig,
    /// Composed-image reuse (`facade.composeTTL`).
    pub images: ImagesConfig,
    /// SIGTERM grace.
    pub shutdown_grace: Duration,
    /// Request limits of the registry listener (`facade.max*`, `facade.responseIdleTimeout`).
    pub limits: RequestLimits,
    /// `facade.legacyMetrics`: export the Go facade's metric names too.
    pub legacy_metrics: bool,
    /// Cluster-wide single-flight (`facade.peer*`); `None`: off.
    pub peer: Option<PeerSettings>,
    /// Prefetch on manifest and warm-up (`facade.prefetch*`).
    pub prefetch: PrefetchConfig,
    /// Process-wide memory ceilings (`facade.maxBufferedResponseBytes`).
    pub memory: MemoryLimits,
    /// Lanes of the blocking pool (`facade.blocking*Threads`); read at startup only.
    pub lanes: facade_blob::blocking::LaneSizes,
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

/// Every problem with a configuration, reported on one line.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// The file's JSON, or the one problem that stops reading it (named by its key path).
fn decode(text: &str) -> Result<FileConfig, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // serde_json appends " at line L column C"; keep it, it helps find the spot.
        let msg = e.into_inner().to_string();
        ConfigError(vec![if path == "." { msg } else { format!("{path}: {msg}") }])
    })
}

/// Most fills one prefetch may run at once: more only competes with the pulls themselves.
const MAX_PREFETCH_PARALLELISM: u64 = 64;

/// `facade.prefetchParallelism` and `facade.prefetchIdleTimeout`.
fn prefetch(f: &FacadeSection, c: &mut Checker<'_>) -> PrefetchConfig {
    let mut p = PrefetchConfig::default();
    match f.prefetch_parallelism {
        Some(n) if n > MAX_PREFETCH_PARALLELISM => {
            c.problem("facade.prefetchParallelism", format_args!("{n} is more than {MAX_PREFETCH_PARALLELISM}"))
        }
        Some(n) => p.parallelism = usize::try_from(n).unwrap_or(0),
        None => {}
    }
    if let Some(t) = c.positive_duration("facade.prefetchIdleTimeout", &f.prefetch_idle_timeout) {
        p.idle_timeout = t;
    }
    p
}

/// Parses and validates configuration text. `base_dir` resolves relative paths.
pub fn parse(text: &str, base_dir: &std::path::Path, env: &dyn Env) -> Result<Config, ConfigError> {
    let file = decode(text)?;
    let mut checker = Checker::new(base_dir, env);
    let c = &mut checker;
    let (r, f) = (&file.registry, &file.facade);
    let upstream = upstream::client(f, c);
    let cluster = cluster::cluster(&file, c);
    let limits = limits::request_limits(f, &limits::stall_timeouts(&upstream, &cluster), c);
    registry::require_a_spec_provider(r, c);
    let mut config = Config {
        listen: registry::listen(&file, c),
        tls: registry::tls(r, c),
        client_auth: registry::client_auth(&file, c),
        pprof_addr: Some(file.pprof_addr.trim().to_string()).filter(|a| !a.is_empty()),
        registry_tls_ca: r.tls.as_ref().map(|t| t.ca.trim().to_string()).filter(|ca| !ca.is_empty()),
        prefix: registry::prefix(r, c),
        store: registry::store(r, c),
        store_bounds: cluster::store_bounds(f, c),
        static_layers: registry::static_layers(r, c),
        fixed_spec_file: c.file("registry.fixedSpecFN", &r.fixed_spec_file),
        remote_spec_providers: providers::remote_providers(&r.remote_spec_provider, c),
        spec: providers::spec_settings(f, c),
        docker_auth: c.file("dockerAuth", &file.docker_auth),
        prometheus_addr: c.listen_addr("prometheusAddr", &file.prometheus_addr),
        readiness_addr: c.listen_addr("readinessProbeAddr", &file.readiness_probe_addr),
        fetch: upstream::fetch(f, c),
        images: upstream::images(f, c),
        shutdown_grace: c.duration("facade.shutdownGrace", &f.shutdown_grace).unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        legacy_metrics: f.legacy_metrics.unwrap_or(true),
        peer: peer::peer(f, cluster.redis.is_some(), c),
        prefetch: prefetch(f, c),
        upstream_deny_networks: upstream::deny_networks(f, c),
        upstream,
        cluster,
        limits,
        memory: memory::memory_limits(f, c),
        lanes: limits::blocking_lanes(f, c),
    };
    memory::cache_bytes(f, c, &mut config.fetch, &mut config.images, &mut config.spec.cache);
    let problems = checker.into_problems();
    if problems.is_empty() { Ok(config) } else { Err(ConfigError(problems)) }
}
