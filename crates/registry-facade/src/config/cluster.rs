//! The local store's bounds (`facade.store*`) and the cluster cache (`registry.redis`,
//! `registry.ipfs`, `facade.cluster*`), resolved into facade-blob's own `StoreConfig` and
//! `ClusterConfig`. The cluster defaults are facade-blob's; the store's are the binary's own.

use std::time::Duration;

use facade_blob::cluster::{IpfsConfig, RedisConfig, api_url_from_multiaddr};
use facade_blob::{ClusterConfig, StoreConfig};

use super::file::{FacadeSection, FileConfig, IpfsSection, RedisSection};
use super::values::Checker;

/// The store's bounds when the file sets none. facade-blob's store is unbounded by default;
/// a facade on a node shares the disk with workspaces, so it keeps at most 20 GiB and drops
/// what nobody read for a week.
pub(super) fn default_store_bounds() -> StoreConfig {
    StoreConfig { max_bytes: Some(20 << 30), ttl: Some(Duration::from_secs(7 * 24 * 3600)), ..StoreConfig::default() }
}

/// `facade.storeMaxBytes` (0: unbounded) and `facade.storeTTL` ("0s": never) over the defaults.
pub(super) fn store_bounds(f: &FacadeSection, c: &mut Checker<'_>) -> StoreConfig {
    let mut s = default_store_bounds();
    if let Some(n) = c.size("facade.storeMaxBytes", &f.store_max_bytes, "20GiB") {
        s.max_bytes = Some(n).filter(|&n| n > 0);
    }
    if let Some(t) = c.duration("facade.storeTTL", &f.store_ttl) {
        s.ttl = Some(t).filter(|t| !t.is_zero());
    }
    s
}

/// The cluster cache: Redis and IPFS when enabled, over facade-blob's defaults.
pub(super) fn cluster(file: &FileConfig, c: &mut Checker<'_>) -> ClusterConfig {
    let (f, r) = (&file.facade, &file.registry);
    let mut out = ClusterConfig::default();
    if let Some(t) = c.positive_duration("facade.clusterTagTTL", &f.cluster_tag_ttl) {
        out.tag_ttl = t;
    }
    let redis_timeout = c.positive_duration("facade.clusterRedisTimeout", &f.cluster_redis_timeout);
    let ipfs_timeout = c.positive_duration("facade.clusterIPFSTimeout", &f.cluster_ipfs_timeout);
    out.redis = r.redis.as_ref().filter(|s| s.enabled).map(|s| redis(s, redis_timeout, c));
    let ipfs_enabled = r.ipfs.as_ref().filter(|s| s.enabled);
    out.ipfs = ipfs_enabled.and_then(|s| ipfs(s, ipfs_timeout, c));
    if ipfs_enabled.is_some() && out.redis.is_none() {
        c.problem("registry.ipfs.enabled", "IPFS needs registry.redis (the index of what IPFS holds) enabled too");
    }
    out
}

/// `registry.redis`, the password from `REDIS_PASSWORD`.
fn redis(s: &RedisSection, timeout: Option<Duration>, c: &mut Checker<'_>) -> RedisConfig {
    let addr = s.single_host_addr.trim();
    let valid = addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid {
        c.problem("registry.redis.singleHostAddr", format_args!("{addr:?} is not host:port"));
    }
    let mut out = RedisConfig::new(addr);
    out.username = Some(s.username.clone()).filter(|u| !u.is_empty());
    out.password = c.env_var("REDIS_PASSWORD");
    out.tls = s.use_tls;
    out.insecure_skip_verify = s.insecure_skip_verify;
    if let Some(t) = timeout {
        out.timeout = t;
    }
    out
}

/// `registry.ipfs`: `$IPFS_HOST` expanded (as the reference's DaemonSet sets it), the multiaddr
/// mapped to the RPC API's URL.
fn ipfs(s: &IpfsSection, timeout: Option<Duration>, c: &mut Checker<'_>) -> Option<IpfsConfig> {
    const VARS: [&str; 2] = ["${IPFS_HOST}", "$IPFS_HOST"];
    let mut addr = s.ipfs_addr.clone();
    if VARS.iter().any(|v| addr.contains(v)) {
        let Some(host) = c.env_var("IPFS_HOST") else {
            c.problem("registry.ipfs.ipfsAddr", format_args!("{:?} uses $IPFS_HOST, which is not set", s.ipfs_addr));
            return None;
        };
        for var in VARS {
            addr = addr.replace(var, &host);
        }
    }
    let url = api_url_from_multiaddr(&addr).map_err(|e| c.problem("registry.ipfs.ipfsAddr", e)).ok()?;
    let mut out = IpfsConfig::new(url);
    if let Some(t) = timeout {
        out.first_byte_timeout = t;
        out.node_timeout = t;
    }
    Some(out)
}
