//! The `remote` spec provider: `registry.remoteSpecProvider` and the `facade.spec*` keys,
//! resolved into facade-spec's own `GrpcConfig` and `CacheConfig` (whose `Default`s are the
//! defaults).

use std::path::PathBuf;

use facade_spec::{CacheConfig, GrpcConfig};

use super::file::{FacadeSection, RemoteProviderEntry};
use super::values::Checker;

/// The TLS server name expected from spec servers: the reference facade checks this name
/// whatever address it dials.
const DEFAULT_SPEC_SERVER_NAME: &str = "ws-manager";

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

/// Calls to and caching of the `remote` provider.
#[derive(Debug, Clone)]
pub struct SpecSettings {
    /// Calls to one spec server (`specTimeout`).
    pub grpc: GrpcConfig,
    /// The spec cache (`specCacheTTL`, `specNegativeTTL`, `specStaleTTL`, `specCacheSize`).
    pub cache: CacheConfig,
    /// TLS server name (`specServerName`).
    pub server_name: String,
}

impl Default for SpecSettings {
    fn default() -> Self {
        SpecSettings {
            grpc: GrpcConfig::default(),
            cache: CacheConfig::default(),
            server_name: DEFAULT_SPEC_SERVER_NAME.to_string(),
        }
    }
}

/// The `facade.spec*` keys over the defaults.
pub(super) fn spec_settings(f: &FacadeSection, c: &mut Checker<'_>) -> SpecSettings {
    let mut s = SpecSettings::default();
    if let Some(t) = c.positive_duration("facade.specTimeout", &f.spec_timeout) {
        s.grpc.timeout = t;
    }
    if let Some(t) = c.duration("facade.specCacheTTL", &f.spec_cache_ttl) {
        s.cache.ttl = t;
    }
    if let Some(t) = c.duration("facade.specNegativeTTL", &f.spec_negative_ttl) {
        s.cache.negative_ttl = t;
    }
    if let Some(t) = c.duration("facade.specStaleTTL", &f.spec_stale_ttl) {
        s.cache.stale_for = t;
    }
    if let Some(n) = f.spec_cache_size {
        s.cache.max_entries = n;
    }
    if let Some(name) = &f.spec_server_name {
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/') {
            c.problem("facade.specServerName", format_args!("{name:?} is not a host name"));
        }
        s.server_name = name.clone();
    }
    s
}

/// `registry.remoteSpecProvider`, in the order the servers are asked. An entry with a problem
/// is left out (the problem refuses the file anyway).
pub(super) fn remote_providers(entries: &[RemoteProviderEntry], c: &mut Checker<'_>) -> Vec<RemoteSpecProvider> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let key = format!("registry.remoteSpecProvider[{i}]");
        let before = c.problem_count();
        if let Err(e) = facade_spec::grpc::target_uri(&e.addr, e.tls.is_some()) {
            match e {
                facade_spec::Error::Config(reason) => c.problem(format_args!("{key}.addr"), reason),
                other => c.problem(format_args!("{key}.addr"), other),
            }
        }
        let tls = e.tls.as_ref().and_then(|t| {
            if t.ca.is_empty() {
                c.problem(
                    format_args!("{key}.tls.ca"),
                    "required when tls is set (the CA of the spec server's certificate)",
                );
            }
            if t.crt.is_empty() != t.key.is_empty() {
                c.problem(format_args!("{key}.tls"), "crt and key go together (both for mutual TLS, neither for TLS)");
            }
            let ca = c.file(&format!("{key}.tls.ca"), &t.ca);
            let crt = c.file(&format!("{key}.tls.crt"), &t.crt);
            let key_file = c.file(&format!("{key}.tls.key"), &t.key);
            Some(RemoteSpecTls { ca: ca?, identity: crt.zip(key_file) })
        });
        if c.problem_count() == before {
            out.push(RemoteSpecProvider { addr: e.addr.trim().to_string(), tls });
        }
    }
    out
}
