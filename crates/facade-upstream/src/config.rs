//! The client's own configuration slice.

use std::net::IpAddr;
use std::time::Duration;

use crate::proxy::ProxyConfig;

/// Longest time one manifest, config, tag or token request keeps retrying by default. The
/// node's containerd gives up on response headers after 30 s; retrying for about as long as the
/// reference facade does (5-6.5 s) leaves the rest of that window to the request that finally
/// works.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(7);

/// How the upstream client connects and what it bounds.
#[derive(Clone, Debug)]
pub struct Config {
    /// Extra hosts spoken to over plain HTTP (`host` matches every port, `host:port` one).
    /// Loopback hosts (`localhost`, `127.0.0.0/8`, `[::1]`) always are.
    pub plain_http_hosts: Vec<String>,
    /// TCP connect timeout. Kept short: a dial that hangs eats the whole retry budget.
    pub connect_timeout: Duration,
    /// Whole-request deadline for manifests, configs, HEADs and token fetches, retries
    /// included; for blob streams it bounds the time to response headers.
    pub metadata_timeout: Duration,
    /// Longest time a blob body may deliver no bytes before it fails with `Error::Stalled`.
    pub read_timeout: Duration,
    /// How long a manifest, config or tag request (and the token requests it needs) may keep
    /// retrying transient failures: a retry is only started when the time spent plus its delay
    /// fits. `Duration::ZERO` turns retries off. Blob streams are not retried here (the caller
    /// resumes them at their offset).
    pub retry_budget: Duration,
    /// `User-Agent` sent upstream.
    pub user_agent: String,
    /// Bound on manifest, config and token bodies.
    pub max_metadata_bytes: u64,
    /// PEM certificates trusted for HTTPS in addition to the system's CA bundle (a private
    /// registry's CA). Applied to every host this client talks to.
    pub extra_ca_pem: Option<String>,
    /// Forward proxies. The default reads `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (either
    /// case) from the process environment, as Go's clients and containerd do.
    pub proxy: ProxyConfig,
    /// Host names answered without DNS, like curl's `--resolve`: the connection (direct, or
    /// the CONNECT through a proxy) goes to the address while TLS still checks the name. Not
    /// read from the facade's config file; tests use it to reach a TLS registry on loopback
    /// under a name that is not a loopback name.
    pub resolve: Vec<(String, IpAddr)>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            plain_http_hosts: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            metadata_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(15),
            retry_budget: DEFAULT_RETRY_BUDGET,
            user_agent: concat!("registry-facade/", env!("CARGO_PKG_VERSION")).to_string(),
            max_metadata_bytes: 4 << 20,
            extra_ca_pem: None,
            proxy: ProxyConfig::from_env(),
            resolve: Vec::new(),
        }
    }
}
