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
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The registry section (reference keys).
    #[serde(default)]
    pub registry: RegistrySection,
    /// Path of a docker `config.json` with upstream credentials.
    #[serde(rename = "dockerAuth", default)]
    pub docker_auth: String,
    /// Where `/metrics` listens.
    #[serde(rename = "prometheusAddr", default)]
    pub prometheus_addr: String,
    /// Where `/ready` and `/live` listen.
    #[serde(rename = "readinessProbeAddr", default)]
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
    #[serde(default)]
    pub port: u16,
    /// URL prefix before `/v2`.
    #[serde(default)]
    pub prefix: String,
    /// TLS certificate and key.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// Local content store directory ("" = none).
    #[serde(default)]
    pub store: String,
    /// Whether clients must authenticate.
    #[serde(rename = "requireAuth", default)]
    pub require_auth: bool,
    /// Static layers.
    #[serde(rename = "staticLayer", default)]
    pub static_layer: Vec<StaticLayerEntry>,
    /// gRPC spec providers.
    #[serde(rename = "remoteSpecProvider", default)]
    pub remote_spec_provider: Vec<RemoteProviderEntry>,
    /// The `fixed` provider's file.
    #[serde(rename = "fixedSpecFN", default)]
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
    /// Certificate file.
    #[serde(default)]
    pub crt: String,
    /// Key file.
    #[serde(default)]
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
    #[serde(default)]
    pub ca: String,
    /// Client certificate.
    #[serde(default)]
    pub crt: String,
    /// Client key.
    #[serde(default)]
    pub key: String,
}

/// `registry.redis`.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// Whether to use it.
    #[serde(default)]
    pub enabled: bool,
    /// `host:port`.
    #[serde(rename = "singleHostAddr", default)]
    pub single_host_addr: String,
    /// ACL user name.
    #[serde(default)]
    pub username: String,
    /// TLS to Redis.
    #[serde(rename = "useTLS", default)]
    pub use_tls: bool,
}

/// `registry.ipfs`.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct IpfsSection {
    /// Whether to use it.
    #[serde(default)]
    pub enabled: bool,
    /// Multiaddr of the node's RPC API.
    #[serde(rename = "ipfsAddr", default)]
    pub ipfs_addr: String,
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
    /// Grace period for in-flight pulls on SIGTERM (default 30s).
    #[serde(rename = "shutdownGrace", default)]
    pub shutdown_grace: Option<String>,
}

/// The validated configuration the binary wires from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Registry listener.
    pub listen: SocketAddr,
    /// URL prefix.
    pub prefix: String,
    /// Local store.
    pub store: Option<PathBuf>,
    /// Static layers, in order.
    pub static_layers: Vec<facade_blob::StaticLayerSpec>,
    /// The `fixed` provider's file.
    pub fixed_spec_file: Option<PathBuf>,
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
    /// SIGTERM grace.
    pub shutdown_grace: Duration,
}

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
pub fn parse(text: &str, base_dir: &std::path::Path, _env: &dyn Env) -> Result<Config, ConfigError> {
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

    let listen_host = file.facade.listen_host.clone().unwrap_or_else(|| "0.0.0.0".into());
    let listen = match format!("{listen_host}:{}", r.port).parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => match format!("[{listen_host}]:{}", r.port).parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                errs.push(format!("facade.listenHost: {listen_host:?} is not an IP address"));
                SocketAddr::from(([0, 0, 0, 0], r.port))
            }
        },
    };
    let prefix = r.prefix.trim_end_matches('/').to_string();
    if !prefix.is_empty() && (!prefix.starts_with('/') || prefix.contains("//") || prefix.contains(char::is_whitespace)) {
        errs.push(format!("registry.prefix: {:?} must start with '/' and contain no spaces", r.prefix));
    }
    if let Some(tls) = &r.tls
        && (!tls.crt.is_empty() || !tls.key.is_empty()) {
            errs.push("registry.tls: serving TLS is not built yet in this version (see README); terminate TLS in front of the facade or leave registry.tls empty".into());
        }
    if r.require_auth {
        errs.push("registry.requireAuth: client authentication is not built yet in this version (see README); refusing to start open".into());
    }
    if !r.remote_spec_provider.is_empty() {
        errs.push("registry.remoteSpecProvider: the gRPC spec provider is not built yet in this version (see README)".into());
    }
    if r.redis.as_ref().is_some_and(|x| x.enabled) {
        tracing::warn!("registry.redis.enabled: the cluster cache is not built yet in this version; pulls go to the local store and upstream");
    }
    if r.ipfs.as_ref().is_some_and(|x| x.enabled) {
        tracing::warn!("registry.ipfs.enabled: the cluster cache is not built yet in this version; pulls go to the local store and upstream");
    }

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
    if fixed_spec_file.is_none() && r.fixed_spec_file.is_empty() && r.remote_spec_provider.is_empty() {
        errs.push("registry: neither fixedSpecFN nor remoteSpecProvider is set, so no image could ever be served".into());
    }
    if !errs.is_empty() {
        return Err(ConfigError(errs));
    }
    Ok(Config {
        listen,
        prefix,
        store,
        static_layers,
        fixed_spec_file,
        docker_auth,
        prometheus_addr,
        readiness_addr,
        platform,
        compose_ttl,
        tag_ttl,
        plain_http_hosts: f.plain_http_hosts.clone(),
        upstream_timeouts: (connect, metadata, read),
        shutdown_grace,
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

    #[test]
    fn names_the_key_of_every_problem() {
        let cases = [
            (r#"{"registry": {"port": 70000}}"#, "registry.port"),
            (r#"{"registry": {"bogus": 1}}"#, "registry.bogus: unknown field `bogus`"),
            (r#"{"registry": {"fixedSpecFN": "specs.json", "staticLayer": [{"ref": "x", "type": "tarball"}]}}"#, "registry.staticLayer[0].type"),
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
}
