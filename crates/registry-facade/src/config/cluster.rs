//! The local store's bounds (`facade.store*`) and the cluster cache (`registry.redis`,
//! `registry.ipfs`, `facade.cluster*`), resolved into facade-blob's own `StoreConfig` and
//! `ClusterConfig`. The cluster defaults are facade-blob's; the store's are the binary's own.

use std::time::Duration;

use facade_blob::cluster::{IpfsConfig, RedisConfig, api_url_from_multiaddr};
use facade_blob::{ClusterConfig, StoreConfig};

use super::file::{FacadeSection, FileConfig, IpfsSection, RedisSection};
use super::values::Checker;
use facade_blob::cluster::RedisTopology;

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
    // A quarter of the budget by default: one blob can never keep the others (and the fills
    // of other pulls) out of the store; a larger one is streamed through (docs/blob-engine.md).
    s.max_blob_bytes = s.max_bytes.map(|m| m / 4);
    if f.max_blob_bytes.is_some()
        && let Some(n) = c.size("facade.maxBlobBytes", &f.max_blob_bytes, "4GiB")
    {
        s.max_blob_bytes = Some(n).filter(|&n| n > 0);
    }
    if let Some(t) = c.positive_duration("facade.unreadFillGrace", &f.unread_fill_grace) {
        s.unread_grace = t;
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
    if let Some(t) = c.positive_duration("facade.clusterIndexTTL", &f.cluster_index_ttl) {
        out.index_ttl = t;
    }
    out.pin_sweep_interval = ClusterConfig::sweep_interval_for(out.index_ttl);
    if let Some(n) = c.size("facade.clusterIPFSMaxBytes", &f.cluster_ipfs_max_bytes, "100GiB") {
        out.ipfs_max_bytes = Some(n).filter(|&n| n > 0);
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

fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// `host:port` addresses of `key`, at least one.
fn addresses(key: &str, list: &[String], c: &mut Checker<'_>) -> Vec<String> {
    if list.is_empty() {
        c.problem(key, "needs at least one host:port");
    }
    let list: Vec<String> = list.iter().map(|a| a.trim().to_string()).collect();
    for a in list.iter().filter(|a| !is_host_port(a)) {
        c.problem(key, format_args!("{a:?} is not host:port"));
    }
    list
}

/// Which Redis: `singleHostAddr` (the reference's), `clusterAddresses` or `sentinel`, exactly
/// one of them.
fn topology(s: &RedisSection, c: &mut Checker<'_>) -> RedisTopology {
    let single = !s.single_host_addr.trim().is_empty();
    let cluster = !s.cluster_addresses.is_empty();
    let set: Vec<&str> =
        [(single, "singleHostAddr"), (cluster, "clusterAddresses"), (s.sentinel.is_some(), "sentinel")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
    if set.len() > 1 {
        c.problem(
            "registry.redis",
            format_args!("set one of singleHostAddr, clusterAddresses and sentinel, not {}", set.join(" and ")),
        );
        return RedisTopology::Single;
    }
    if cluster {
        return RedisTopology::Cluster { seeds: addresses("registry.redis.clusterAddresses", &s.cluster_addresses, c) };
    }
    if let Some(sentinel) = &s.sentinel {
        let master_name = sentinel.master_name.trim().to_string();
        if master_name.is_empty() {
            c.problem("registry.redis.sentinel.masterName", "empty; name the master the sentinels monitor");
        }
        let sentinels = addresses("registry.redis.sentinel.addresses", &sentinel.addresses, c);
        return RedisTopology::Sentinel { master_name, sentinels };
    }
    let addr = s.single_host_addr.trim();
    if !is_host_port(addr) {
        c.problem("registry.redis.singleHostAddr", format_args!("{addr:?} is not host:port"));
    }
    RedisTopology::Single
}

/// `registry.redis.caFile`: a PEM bundle of CA certificates, only with `useTLS` and certificate
/// checks on (with `insecureSkipVerify` nothing would read it).
fn redis_ca(s: &RedisSection, c: &mut Checker<'_>) -> Option<Vec<u8>> {
    const KEY: &str = "registry.redis.caFile";
    if s.ca_file.is_empty() {
        return None;
    }
    if !s.use_tls || s.insecure_skip_verify {
        c.problem(KEY, "needs useTLS on and insecureSkipVerify off (it is the CA that checks the server)");
        return None;
    }
    let p = c.path(&s.ca_file);
    let text = std::fs::read_to_string(&p)
        .map_err(|e| c.problem(KEY, format_args!("cannot read {}: {e}", p.display())))
        .ok()?;
    match facade_upstream::parse_ca_bundle(&text) {
        Ok(_) => Some(text.into_bytes()),
        Err(e) => {
            c.problem(KEY, format_args!("{}: {e}", p.display()));
            None
        }
    }
}

/// `registry.redis`, the password from `REDIS_PASSWORD`.
fn redis(s: &RedisSection, timeout: Option<Duration>, c: &mut Checker<'_>) -> RedisConfig {
    let mut out = RedisConfig::new(s.single_host_addr.trim());
    out.topology = topology(s, c);
    out.ca_pem = redis_ca(s, c);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use facade_blob::cluster::RedisTopology;

    use super::super::{MapEnv, parse};

    fn parse_redis(redis: &str, facade: &str) -> Result<super::super::Config, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
        std::fs::write(dir.path().join("ca.pem"), CA).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
        let text = format!(
            r#"{{"registry": {{"fixedSpecFN": "specs.json", "redis": {redis},
               "ipfs": {{"enabled": true, "ipfsAddr": "/ip4/127.0.0.1/tcp/5001"}}}}, "facade": {facade}}}"#
        );
        parse(&text, dir.path(), &MapEnv::default()).map_err(|e| e.to_string())
    }

    /// A self-signed CA certificate (`openssl req -x509 -newkey ec`), as a private CA file.
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBejCCAR+gAwIBAgIUFs/fiQNjND0vQpeCrWFyD3MWY6swCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdGVzdC1jYTAeFw0yNjEyMDQxODUwMjlaFw0zNjEyMDExODUw
MjlaMBIxEDAOBgNVBAMMB3Rlc3QtY2EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AARqgnxdjuG0OF82W1Ka+fjvD93/NsEOoVOHfl0iQedWi5F0RNKIsnufyexn/6sp
hUVIW/NlOMAEsQI0ty3Zqpquo1MwUTAdBgNVHQ4EFgQUiPnfNYut5kFsKgVpRzCO
zD2v/NUwHwYDVR0jBBgwFoAUiPnfNYut5kFsKgVpRzCOzD2v/NUwDwYDVR0TAQH/
BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEA0c2+bjXpt1lpxknG/K5rkPWt8f0n
5dEJYl6AorNf+fcCIQDBpX0TaQXrG1dvBMrotgVzmmBx2rrOlzRo20Tx+UPF+g==
-----END CERTIFICATE-----
";

    #[test]
    fn cluster_and_sentinel_topologies_parse() {
        let c = parse_redis(
            r#"{"enabled": true, "clusterAddresses": ["10.0.0.1:7000", "10.0.0.2:7000"], "useTLS": true, "caFile": "ca.pem"}"#,
            "{}",
        );
        let c = c.unwrap();
        let r = c.cluster.redis.as_ref().unwrap();
        assert_eq!(r.topology, RedisTopology::Cluster { seeds: vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()] });
        assert_eq!((r.tls, r.ca_pem.as_deref()), (true, Some(CA.as_bytes())));
        let c = parse_redis(
            r#"{"enabled": true, "sentinel": {"masterName": "mymaster", "addresses": ["s1:26379", "s2:26379"]}}"#,
            r#"{"clusterIndexTTL": "10m", "clusterIPFSMaxBytes": "1GiB"}"#,
        )
        .unwrap();
        let r = c.cluster.redis.as_ref().unwrap();
        assert_eq!(
            r.topology,
            RedisTopology::Sentinel {
                master_name: "mymaster".into(),
                sentinels: vec!["s1:26379".into(), "s2:26379".into()]
            }
        );
        assert_eq!(c.cluster.index_ttl, Duration::from_secs(600));
        assert_eq!(c.cluster.ipfs_max_bytes, Some(1 << 30));
        assert_eq!(c.cluster.pin_sweep_interval, Duration::from_secs(60));
        // The reference's keys alone: a single Redis, as before.
        let c = parse_redis(r#"{"enabled": true, "singleHostAddr": "redis:6379"}"#, r#"{"clusterIndexTTL": "2s"}"#)
            .unwrap();
        assert_eq!(c.cluster.redis.as_ref().unwrap().topology, RedisTopology::Single);
        assert_eq!(c.cluster.pin_sweep_interval, Duration::from_secs(1));
        assert_eq!(c.cluster.ipfs_max_bytes, None);
    }

    #[test]
    fn bad_combinations_are_one_line_each() {
        for (redis, facade, needle) in [
            (
                r#"{"enabled": true, "singleHostAddr": "redis:6379", "clusterAddresses": ["a:1"]}"#,
                "{}",
                "registry.redis: set one of singleHostAddr, clusterAddresses and sentinel, not singleHostAddr and clusterAddresses",
            ),
            (
                r#"{"enabled": true, "clusterAddresses": ["a:1"], "sentinel": {"masterName": "m", "addresses": ["s:1"]}}"#,
                "{}",
                "not clusterAddresses and sentinel",
            ),
            (
                r#"{"enabled": true, "clusterAddresses": ["nope"]}"#,
                "{}",
                "registry.redis.clusterAddresses: \"nope\" is not host:port",
            ),
            (
                r#"{"enabled": true, "sentinel": {"addresses": ["s:1"]}}"#,
                "{}",
                "registry.redis.sentinel.masterName: empty",
            ),
            (
                r#"{"enabled": true, "sentinel": {"masterName": "m"}}"#,
                "{}",
                "registry.redis.sentinel.addresses: needs at least one",
            ),
            (r#"{"enabled": true, "sentinel": {"masterName": "m", "addresses": ["s:1"], "port": 1}}"#, "{}", "port"),
            (
                r#"{"enabled": true, "singleHostAddr": "r:1", "caFile": "ca.pem"}"#,
                "{}",
                "registry.redis.caFile: needs useTLS",
            ),
            (
                r#"{"enabled": true, "singleHostAddr": "r:1", "useTLS": true, "insecureSkipVerify": true, "caFile": "ca.pem"}"#,
                "{}",
                "registry.redis.caFile: needs useTLS on and insecureSkipVerify off",
            ),
            (
                r#"{"enabled": true, "singleHostAddr": "r:1", "useTLS": true, "caFile": "junk.pem"}"#,
                "{}",
                "registry.redis.caFile",
            ),
            (
                r#"{"enabled": true, "singleHostAddr": "r:1", "useTLS": true, "caFile": "gone.pem"}"#,
                "{}",
                "cannot read",
            ),
            (
                r#"{"enabled": true, "singleHostAddr": "r:1"}"#,
                r#"{"clusterIndexTTL": "0s"}"#,
                "facade.clusterIndexTTL: must be more than 0",
            ),
            (
                r#"{"enabled": true, "singleHostAddr": "r:1"}"#,
                r#"{"clusterIPFSMaxBytes": "lots"}"#,
                "facade.clusterIPFSMaxBytes",
            ),
        ] {
            let e = parse_redis(redis, facade).unwrap_err();
            assert!(e.contains(needle), "{redis} {facade}: {e}");
        }
    }
}
