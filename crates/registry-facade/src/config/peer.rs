//! Cluster-wide single-flight (`facade.peer*`): the peer listener other nodes stream a blob
//! from while this node downloads it, the cluster secret they present, and the Redis lease
//! that says which node downloads (README, "Cluster cache").

use std::net::SocketAddr;
use std::time::Duration;

use super::file::FacadeSection;
use super::values::Checker;

/// Followers one node serves at once when `facade.peerMaxFollowers` is not set.
pub const DEFAULT_MAX_FOLLOWERS: usize = 4;

/// Life of a download lease without renewal when `facade.peerLeaseTTL` is not set: a holder
/// that dies is followed by new nodes this long at most.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// What the peer side is configured as; `None` in [`super::Config`] means off.
#[derive(Clone)]
pub struct PeerSettings {
    /// Where the peer listener binds (`facade.peerAddr`).
    pub listen: SocketAddr,
    /// `host:port` other nodes reach it at (`facade.peerAdvertiseAddr`, `$POD_IP` expanded);
    /// `None`: the listener's bound address.
    pub advertise: Option<String>,
    /// The cluster secret (`facade.peerSecretFile`'s content, trimmed).
    pub secret: String,
    /// `facade.peerMaxFollowers`.
    pub max_followers: usize,
    /// `facade.peerLeaseTTL`.
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for PeerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("PeerSettings")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("max_followers", &self.max_followers)
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

/// The peer side: on when `facade.peerAddr` and `facade.peerSecretFile` are both set (and
/// Redis, which holds the leases, is enabled).
pub(super) fn peer(f: &FacadeSection, redis_enabled: bool, c: &mut Checker<'_>) -> Option<PeerSettings> {
    let max_followers = match f.peer_max_followers {
        Some(0) => {
            c.problem("facade.peerMaxFollowers", "must be at least 1");
            DEFAULT_MAX_FOLLOWERS
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => DEFAULT_MAX_FOLLOWERS,
    };
    let lease_ttl = c.positive_duration("facade.peerLeaseTTL", &f.peer_lease_ttl).unwrap_or(DEFAULT_LEASE_TTL);
    if lease_ttl < Duration::from_secs(1) {
        c.problem("facade.peerLeaseTTL", "must be at least 1s (it is renewed every third of it)");
    }
    let advertise = f.peer_advertise_addr.as_deref().and_then(|a| advertise_addr(a, c));
    let listen = c.listen_addr("facade.peerAddr", f.peer_addr.as_deref().unwrap_or(""))?;
    let secret_file = c.file("facade.peerSecretFile", f.peer_secret_file.as_deref().unwrap_or(""))?;
    let secret = match std::fs::read_to_string(&secret_file) {
        Ok(s) if s.trim().len() >= 16 => s.trim().to_string(),
        Ok(_) => {
            c.problem(
                "facade.peerSecretFile",
                format_args!("{} holds fewer than 16 characters", secret_file.display()),
            );
            return None;
        }
        Err(e) => {
            c.problem("facade.peerSecretFile", format_args!("cannot read {}: {e}", secret_file.display()));
            return None;
        }
    };
    if !redis_enabled {
        c.problem("facade.peerAddr", "cluster-wide single-flight needs registry.redis (the download leases) enabled");
        return None;
    }
    if advertise.is_none() && listen.ip().is_unspecified() {
        c.problem(
            "facade.peerAdvertiseAddr",
            format_args!("must say how other nodes reach this one, facade.peerAddr {listen} binds every address"),
        );
        return None;
    }
    Some(PeerSettings { listen, advertise, secret, max_followers, lease_ttl })
}

/// `host:port` with `$POD_IP` (the DaemonSet's downward-API variable) expanded.
fn advertise_addr(raw: &str, c: &mut Checker<'_>) -> Option<String> {
    const VARS: [&str; 2] = ["${POD_IP}", "$POD_IP"];
    let mut addr = raw.trim().to_string();
    if VARS.iter().any(|v| addr.contains(v)) {
        let Some(ip) = c.env_var("POD_IP") else {
            c.problem("facade.peerAdvertiseAddr", format_args!("{raw:?} uses $POD_IP, which is not set"));
            return None;
        };
        for var in VARS {
            addr = addr.replace(var, &ip);
        }
    }
    let valid = addr.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && !h.contains('/') && !h.contains('@') && p.parse::<u16>().is_ok_and(|p| p > 0)
    });
    if !valid {
        c.problem("facade.peerAdvertiseAddr", format_args!("{addr:?} is not host:port"));
        return None;
    }
    Some(addr)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use super::super::{MapEnv, parse};
    use super::*;

    const REDIS: &str = r#""redis": {"enabled": true, "singleHostAddr": "redis:6379"}"#;

    fn parse_with(registry_extra: &str, facade: &str, pod_ip: Option<&str>) -> Result<super::super::Config, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
        std::fs::write(dir.path().join("secret"), "a-cluster-secret-of-32-characters\n").unwrap();
        std::fs::write(dir.path().join("short"), "short\n").unwrap();
        let env = MapEnv(pod_ip.map(|ip| BTreeMap::from([("POD_IP".to_string(), ip.to_string())])).unwrap_or_default());
        let text =
            format!(r#"{{"registry": {{"fixedSpecFN": "specs.json"{registry_extra}}}, "facade": {{{facade}}}}}"#);
        parse(&text, dir.path(), &env).map_err(|e| e.to_string())
    }

    #[test]
    fn on_with_an_address_a_secret_and_redis() {
        let c = parse_with(&format!(", {REDIS}"), r#""peerAddr": "10.0.0.5:7001", "peerSecretFile": "secret""#, None)
            .unwrap();
        let p = c.peer.unwrap();
        assert_eq!(p.listen.to_string(), "10.0.0.5:7001");
        assert_eq!((p.advertise.as_deref(), p.secret.as_str()), (None, "a-cluster-secret-of-32-characters"));
        assert_eq!((p.max_followers, p.lease_ttl), (DEFAULT_MAX_FOLLOWERS, DEFAULT_LEASE_TTL));
        assert!(!format!("{p:?}").contains("a-cluster-secret"), "the secret is printed");
        let c = parse_with(
            &format!(", {REDIS}"),
            r#""peerAddr": ":7001", "peerAdvertiseAddr": "$POD_IP:7001", "peerSecretFile": "secret",
               "peerMaxFollowers": 8, "peerLeaseTTL": "30s""#,
            Some("10.1.2.3"),
        )
        .unwrap();
        let p = c.peer.unwrap();
        assert_eq!((p.advertise.as_deref(), p.max_followers), (Some("10.1.2.3:7001"), 8));
        assert_eq!(p.lease_ttl, Duration::from_secs(30));
    }

    #[test]
    fn off_without_an_address_or_a_secret() {
        assert!(parse_with(&format!(", {REDIS}"), "", None).unwrap().peer.is_none());
        assert!(parse_with(&format!(", {REDIS}"), r#""peerAddr": "127.0.0.1:7001""#, None).unwrap().peer.is_none());
    }

    #[test]
    fn bad_values_are_named() {
        for (registry, facade, want) in [
            ("", r#""peerAddr": "127.0.0.1:7001", "peerSecretFile": "secret""#, "needs registry.redis"),
            (REDIS, r#""peerAddr": ":7001", "peerSecretFile": "secret""#, "facade.peerAdvertiseAddr: must say"),
            (REDIS, r#""peerAddr": "127.0.0.1:7001", "peerSecretFile": "short""#, "fewer than 16"),
            (REDIS, r#""peerAddr": "127.0.0.1:7001", "peerSecretFile": "missing""#, "facade.peerSecretFile"),
            (REDIS, r#""peerAddr": "nope", "peerSecretFile": "secret""#, "facade.peerAddr"),
            (REDIS, r#""peerMaxFollowers": 0"#, "facade.peerMaxFollowers: must be at least 1"),
            (REDIS, r#""peerLeaseTTL": "200ms""#, "facade.peerLeaseTTL: must be at least 1s"),
            (REDIS, r#""peerAdvertiseAddr": "$POD_IP:7001""#, "POD_IP, which is not set"),
            (REDIS, r#""peerAdvertiseAddr": "http://x/y""#, "is not host:port"),
        ] {
            let registry = if registry.is_empty() { String::new() } else { format!(", {registry}") };
            let err = parse_with(&registry, facade, None).unwrap_err();
            assert!(err.contains(want), "{facade}: {err}");
        }
    }
}
