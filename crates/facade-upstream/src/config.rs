//! The client's own configuration slice.

use std::time::Duration;

/// How the upstream client connects and what it bounds.
#[derive(Clone, Debug)]
pub struct Config {
    /// Extra hosts spoken to over plain HTTP (`host` matches every port, `host:port` one).
    /// Loopback hosts (`localhost`, `127.0.0.0/8`, `[::1]`) always are.
    pub plain_http_hosts: Vec<String>,
    /// TCP connect timeout. Kept short: a dial that hangs eats the whole retry budget.
    pub connect_timeout: Duration,
    /// Whole-request deadline for manifests, configs, HEADs and token fetches; for blob streams
    /// it bounds the time to response headers.
    pub metadata_timeout: Duration,
    /// Longest time a blob body may deliver no bytes before it fails with `Error::Stalled`.
    pub read_timeout: Duration,
    /// `User-Agent` sent upstream.
    pub user_agent: String,
    /// Bound on manifest, config and token bodies.
    pub max_metadata_bytes: u64,
    /// PEM certificates trusted for HTTPS in addition to the Mozilla roots (a private
    /// registry's CA). Applied to every host this client talks to.
    pub extra_ca_pem: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            plain_http_hosts: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            metadata_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(15),
            user_agent: concat!("registry-facade/", env!("CARGO_PKG_VERSION")).to_string(),
            max_metadata_bytes: 4 << 20,
            extra_ca_pem: None,
        }
    }
}
