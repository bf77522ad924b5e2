//! Cluster-wide single-flight: short leases in Redis that name the node downloading a blob, so
//! the other nodes stream it from that node's fill instead of from upstream (README, "Cluster
//! cache": one upstream download per cluster).
//!
//! Keys (under the Redis namespace):
//! - `lease:{<digest>:<origin>}` → the holder's peer URL, `SET NX PX ttl`; renewed while the
//!   holder's fill runs and deleted when it ends, compare-and-delete, so a holder whose lease
//!   lapsed and was taken over never deletes the new holder's;
//! - `lease-sources:{<digest>:<origin>}` → a sorted set of followers that hold a prefix and serve
//!   others (score: when they registered), so a hundred nodes spread over the holder and its
//!   followers instead of all reading from one.
//!
//! The origin (registry host + repository) is part of the key because fills are shared only
//! between images that name the same origin (docs/security-model.md).
//!
//! Nothing here can fail a pull: every call goes through a breaker with a short deadline, and no
//! answer means "no lease", so the fill downloads from upstream as it did before leases existed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use facade_oci::Digest;
use tokio_util::task::AbortOnDropHandle;

use super::breaker::{Breaker, BreakerConfig};
use super::metrics::{ClusterMetrics, DependencyMetrics};
use super::redis::{RedisConfig, RedisKv};
use crate::error::{Error, Result};

/// Sources returned with a held lease: enough to find one with capacity, few enough for one
/// small answer.
const MAX_SOURCES: isize = 16;

/// Takes the lease if nobody holds it, or if it still names `ARGV[4]`, a peer the caller saw
/// fail (its process died, its body broke, it stalled): the first follower to ask takes over,
/// the others find it as the new holder. The failed peer also leaves the sources. Otherwise
/// answers the holder and the registered sources.
const CLAIM: &str = r"
if ARGV[4] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[4])
end
local holder = redis.call('GET', KEYS[1])
if (not holder) or (ARGV[4] ~= '' and holder == ARGV[4]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
local sources = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[3]))
return {0, holder, sources}
";

/// Extends the lease only while this node still holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes the lease only while this node still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Knobs of the leases.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Where Redis is (the cluster cache's Redis: same topology, TLS, credentials, namespace).
    pub redis: RedisConfig,
    /// How long a lease lives without renewal: a holder that died stops being followed by new
    /// nodes this long after its last renewal at most.
    pub ttl: Duration,
    /// This node's peer URL (`http://host:port`), the value of its leases.
    pub me: String,
    /// Backoff of the breaker.
    pub breaker: BreakerConfig,
}

/// What a claim found.
#[derive(Debug)]
pub enum Claim {
    /// This node holds the lease now; it is renewed until the [`Lease`] is dropped.
    Acquired(Lease),
    /// Another node holds it: `holder` first, then the followers registered as sources (oldest
    /// first; this node left out).
    Held {
        /// The holder's peer URL.
        holder: String,
        /// Followers serving the blob to others.
        sources: Vec<String>,
    },
    /// No answer from Redis (down, breaker open, garbage), or a lease naming this node itself
    /// (a previous process of this node): fill from upstream without a lease.
    Unavailable,
}

/// The leases of one node.
pub struct Leases {
    kv: RedisKv,
    /// The leases' own breaker: a lease call must not wait for the cache's trial call, and a
    /// lease failure must not make the cache skip Redis (each is tried on its own schedule).
    breaker: Breaker,
    /// Where the failures are counted: `registry_facade_cluster_dependency_failures_total`
    /// of `redis`, beside the cache's (the `up` gauge stays the cache breaker's).
    failures: DependencyMetrics,
    /// Deadline of one call, a reconnect included.
    timeout: Duration,
    ttl: Duration,
    me: String,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").field("me", &self.me).field("ttl", &self.ttl).finish()
    }
}

fn err(context: impl Into<String>, reason: impl std::fmt::Display) -> Error {
    Error::Cluster { dependency: "redis", context: context.into(), reason: reason.to_string() }
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn millis(d: Duration) -> String {
    d.as_millis().clamp(1, u64::MAX as u128).to_string()
}

impl Leases {
    /// Leases in the Redis of `config` (single, Cluster or Sentinel, as the cluster cache),
    /// counting Redis failures into `metrics`. Connects lazily (needs a tokio runtime, not a
    /// running Redis).
    pub fn new(config: LeaseConfig, metrics: &ClusterMetrics) -> Result<Arc<Self>> {
        Ok(Arc::new(Leases {
            kv: RedisKv::connect(&config.redis)?,
            breaker: Breaker::new("redis", config.breaker, DependencyMetrics::unregistered("redis")),
            failures: metrics.dependency("redis"),
            timeout: config.redis.timeout * 2,
            ttl: config.ttl,
            me: config.me,
        }))
    }

    /// This node's peer URL.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Runs `call` through the breaker with the leases' deadline, counting a failure or a
    /// timeout. `None`: no answer.
    async fn call<T>(&self, what: &str, call: impl Future<Output = Result<T>>) -> Option<T> {
        let counted = async {
            let result = match tokio::time::timeout(self.timeout, call).await {
                Ok(r) => r,
                Err(_) => Err(err(what, format_args!("no answer within {:?}", self.timeout))),
            };
            if result.is_err() {
                self.failures.failed();
            }
            result
        };
        // The deadline that counts is inside; the breaker's is only a backstop.
        self.breaker.call(self.timeout * 2, counted).await
    }

    /// The lease key and the sources key of (`digest`, `origin`).
    fn keys(&self, digest: &Digest, origin: &str) -> (String, String) {
        // One hash tag for both: the claim script touches the two keys, which Redis Cluster
        // allows only within one slot.
        let tag = format!("{{{digest}:{origin}}}");
        (self.kv.key(&["lease", &tag]), self.kv.key(&["lease-sources", &tag]))
    }

    /// Takes the lease of `digest` from `origin`, or finds who holds it.
    pub async fn claim(self: &Arc<Self>, digest: &Digest, origin: &str) -> Claim {
        self.claim_replacing(digest, origin, "").await
    }

    /// Claims again after the peer at `failed` (the holder, or a source) could not deliver:
    /// takes the lease over if it still names `failed` (or lapsed), and drops `failed` from
    /// the sources. Of the followers of a dead holder exactly one gets [`Claim::Acquired`].
    pub async fn take_over(self: &Arc<Self>, digest: &Digest, origin: &str, failed: &str) -> Claim {
        self.claim_replacing(digest, origin, failed).await
    }

    async fn claim_replacing(self: &Arc<Self>, digest: &Digest, origin: &str, failed: &str) -> Claim {
        let (key, sources_key) = self.keys(digest, origin);
        let (ttl, max) = (millis(self.ttl), (MAX_SOURCES - 1).to_string());
        let (keys, args) = ([key.as_str(), &sources_key], [self.me.as_str(), &ttl, &max, failed]);
        let call = self.kv.eval::<redis::Value>(CLAIM, &keys, &args);
        let Some(answer) = self.call("EVAL claim", call).await else { return Claim::Unavailable };
        match parse_claim(answer) {
            Some(None) => Claim::Acquired(self.lease(key)),
            Some(Some((holder, _))) if holder == self.me => Claim::Unavailable,
            Some(Some((holder, sources))) => {
                let sources = sources.into_iter().filter(|s| *s != self.me && *s != holder).collect();
                Claim::Held { holder, sources }
            }
            None => {
                tracing::warn!(%digest, "unexpected answer to a lease claim from Redis; going without a lease");
                Claim::Unavailable
            }
        }
    }

    /// A held lease: renewed in the background every third of its life until dropped.
    fn lease(self: &Arc<Self>, key: String) -> Lease {
        let leases = self.clone();
        let k = key.clone();
        let renew = tokio::spawn(async move {
            let mut tick = tokio::time::interval(leases.ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if !leases.renew(&k).await {
                    tracing::debug!(key = %k, "lease lost; no longer renewing it");
                    return;
                }
            }
        });
        Lease { leases: self.clone(), key, _renew: AbortOnDropHandle::new(renew) }
    }

    /// Extends `key`'s life if this node still holds it. False when it does not (or Redis did
    /// not answer: the next tick tries again only if the lease was still ours).
    async fn renew(&self, key: &str) -> bool {
        let ttl = millis(self.ttl);
        let (keys, args) = ([key], [self.me.as_str(), &ttl]);
        // No answer is not a loss: Redis may be back before the lease lapses.
        self.call("EVAL renew", self.kv.eval::<i64>(RENEW, &keys, &args)).await.is_none_or(|n| n == 1)
    }

    /// Deletes `key` if this node still holds it.
    async fn release(&self, key: &str) -> bool {
        let (keys, args) = ([key], [self.me.as_str()]);
        self.call("EVAL release", self.kv.eval::<i64>(RELEASE, &keys, &args)).await == Some(1)
    }

    /// Registers this node as a source of (`digest`, `origin`): it follows a fill and has a
    /// prefix others can read. The set lives a few lease lives after its last registration.
    pub async fn register_source(&self, digest: &Digest, origin: &str) {
        let (_, sources_key) = self.keys(digest, origin);
        let call = self.kv.zadd(&sources_key, None, now_millis(), &self.me, self.ttl * 4);
        let _ = self.call("ZADD", call).await;
    }

    /// Takes this node out of the sources of (`digest`, `origin`) (it could not serve them).
    pub async fn unregister_source(&self, digest: &Digest, origin: &str) {
        let (_, sources_key) = self.keys(digest, origin);
        let _ = self.call("ZREM", self.kv.zrem(&sources_key, &self.me)).await;
    }
}

/// `None`: garbage; `Some(None)`: acquired; `Some(Some((holder, sources)))`: held.
fn parse_claim(v: redis::Value) -> Option<Option<(String, Vec<String>)>> {
    use redis::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let Value::Array(items) = v else { return None };
    match items.as_slice() {
        [Value::Int(1)] => Some(None),
        [Value::Int(0), holder, Value::Array(sources)] => {
            let holder = text(holder)?;
            Some(Some((holder, sources.iter().filter_map(text).collect())))
        }
        _ => None,
    }
}

/// A lease this node holds: renewed while it lives, released (if still ours) when dropped.
pub struct Lease {
    leases: Arc<Leases>,
    key: String,
    _renew: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

impl Lease {
    /// Releases the lease now (compare-and-delete); whether it was still this node's.
    pub async fn release(mut self) -> bool {
        let key = std::mem::take(&mut self.key);
        self.leases.release(&key).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A lease dropped without `release` (a fill that ended by error or cancel): released in
        // the background; if that fails too, it lapses after its TTL.
        let (leases, key) = (self.leases.clone(), std::mem::take(&mut self.key));
        if key.is_empty() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                leases.release(&key).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use test_support::redis::Redis;

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap()
    }

    fn leases(redis: &Redis, me: &str, ttl: Duration) -> Arc<Leases> {
        let config = LeaseConfig {
            redis: RedisConfig::new(redis.host()),
            ttl,
            me: me.into(),
            breaker: BreakerConfig::default(),
        };
        Leases::new(config, &ClusterMetrics::unregistered()).unwrap()
    }

    /// The value of a bulk-string or integer reply (`""` for nil).
    fn reply(redis: &Redis, args: &[&str]) -> String {
        let raw = redis.command(args).unwrap();
        let mut lines = raw.split("\r\n");
        let first = lines.next().unwrap();
        match first.as_bytes()[0] {
            b'$' if first == "$-1" => String::new(),
            b'$' => lines.next().unwrap().to_string(),
            b':' => first[1..].to_string(),
            _ => panic!("unexpected reply {raw:?}"),
        }
    }

    fn lease_key() -> String {
        format!("registry-facade:lease:{{{}:reg.example/team/app}}", digest())
    }

    #[tokio::test]
    async fn one_node_acquires_the_others_follow_and_release_frees_it() {
        let redis = Redis::start().unwrap();
        let a = leases(&redis, "http://a:1", Duration::from_secs(15));
        let b = leases(&redis, "http://b:1", Duration::from_secs(15));
        let Claim::Acquired(lease) = a.claim(&digest(), "reg.example/team/app").await else {
            panic!("a did not acquire")
        };
        assert_eq!(reply(&redis, &["GET", &lease_key()]), "http://a:1");
        match b.claim(&digest(), "reg.example/team/app").await {
            Claim::Held { holder, sources } => {
                assert_eq!(holder, "http://a:1");
                assert!(sources.is_empty());
            }
            other => panic!("b: {other:?}"),
        }
        // Another origin of the same digest is another lease.
        assert!(matches!(b.claim(&digest(), "other.example/app").await, Claim::Acquired(_)));
        // A follower with a prefix is offered to the next ones (never to itself).
        b.register_source(&digest(), "reg.example/team/app").await;
        let c = leases(&redis, "http://c:1", Duration::from_secs(15));
        match c.claim(&digest(), "reg.example/team/app").await {
            Claim::Held { sources, .. } => assert_eq!(sources, vec!["http://b:1".to_string()]),
            other => panic!("c: {other:?}"),
        }
        match b.claim(&digest(), "reg.example/team/app").await {
            Claim::Held { sources, .. } => assert!(sources.is_empty(), "{sources:?}"),
            other => panic!("b again: {other:?}"),
        }
        b.unregister_source(&digest(), "reg.example/team/app").await;
        match c.claim(&digest(), "reg.example/team/app").await {
            Claim::Held { sources, .. } => assert!(sources.is_empty(), "{sources:?}"),
            other => panic!("c again: {other:?}"),
        }
        assert!(lease.release().await);
        assert_eq!(reply(&redis, &["EXISTS", &lease_key()]), "0");
        assert!(matches!(b.claim(&digest(), "reg.example/team/app").await, Claim::Acquired(_)));
    }

    #[tokio::test]
    async fn a_held_lease_is_renewed_and_a_lapsed_one_is_never_deleted_by_its_old_holder() {
        let redis = Redis::start().unwrap();
        let ttl = Duration::from_millis(900);
        let a = leases(&redis, "http://a:1", ttl);
        let b = leases(&redis, "http://b:1", ttl);
        let Claim::Acquired(lease) = a.claim(&digest(), "reg.example/team/app").await else { panic!() };
        // Three lives later it is still a's: the renewal kept it.
        tokio::time::sleep(ttl * 3).await;
        assert!(matches!(b.claim(&digest(), "reg.example/team/app").await, Claim::Held { .. }));
        let pttl: i64 = reply(&redis, &["PTTL", &lease_key()]).parse().unwrap();
        assert!(pttl > 0 && pttl <= 900, "{pttl}");
        // The holder stops renewing (its fill hangs, its process is gone): the lease lapses and
        // b takes it; a's late release must not delete b's lease.
        lease._renew.abort();
        tokio::time::sleep(ttl * 2).await;
        let Claim::Acquired(b_lease) = b.claim(&digest(), "reg.example/team/app").await else { panic!("not lapsed") };
        assert!(!lease.release().await, "a deleted b's lease");
        assert_eq!(reply(&redis, &["GET", &lease_key()]), "http://b:1");
        // Dropping a lease releases it in the background.
        drop(b_lease);
        test_support::wait::until_async("the dropped lease to be released", Duration::from_secs(5), || async {
            reply(&redis, &["EXISTS", &lease_key()]) == "0"
        })
        .await;
    }

    #[tokio::test]
    async fn redis_down_means_no_lease_quickly_and_is_counted() {
        let mut redis = Redis::start().unwrap();
        let metrics = ClusterMetrics::unregistered();
        let config = LeaseConfig {
            redis: RedisConfig::new(redis.host()),
            ttl: Duration::from_secs(15),
            me: "http://a:1".into(),
            breaker: BreakerConfig::default(),
        };
        let a = Leases::new(config, &metrics).unwrap();
        let redis_metrics = metrics.dependency("redis");
        // The `up` gauge is the cluster cache breaker's: the leases leave it alone.
        assert_eq!(redis_metrics.up_value(), 0);
        redis.kill();
        let started = std::time::Instant::now();
        assert!(matches!(a.claim(&digest(), "reg.example/team/app").await, Claim::Unavailable));
        // The breaker is open now: the next claim does not even wait for a timeout.
        assert!(matches!(a.claim(&digest(), "reg.example/team/app").await, Claim::Unavailable));
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        // One call went out and failed; the skipped one is no failure.
        assert_eq!(redis_metrics.failures_value(), 1);
    }

    #[tokio::test]
    async fn one_follower_of_a_failed_holder_takes_over_the_others_follow_it() {
        let redis = Redis::start().unwrap();
        let ttl = Duration::from_secs(15);
        let [a, b, c, d] = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"].map(|me| leases(&redis, me, ttl));
        let origin = "reg.example/team/app";
        let Claim::Acquired(a_lease) = a.claim(&digest(), origin).await else { panic!("a did not acquire") };
        for f in [&b, &c, &d] {
            assert!(matches!(f.claim(&digest(), origin).await, Claim::Held { .. }));
            f.register_source(&digest(), origin).await;
        }
        // a's body broke at every follower: the first to ask takes over while a's lease still
        // has most of its life; the next ones find b.
        let Claim::Acquired(b_lease) = b.take_over(&digest(), origin, "http://a:1").await else {
            panic!("b did not take over")
        };
        assert_eq!(reply(&redis, &["GET", &lease_key()]), "http://b:1");
        let pttl: i64 = reply(&redis, &["PTTL", &lease_key()]).parse().unwrap();
        assert!(pttl > 14_000, "the new lease has a full life: {pttl}");
        match c.take_over(&digest(), origin, "http://a:1").await {
            Claim::Held { holder, sources } => {
                assert_eq!(holder, "http://b:1");
                assert_eq!(sources, vec!["http://d:1".to_string()]);
            }
            other => panic!("c: {other:?}"),
        }
        // A failed source leaves the sources, and the holder stays.
        match c.take_over(&digest(), origin, "http://d:1").await {
            Claim::Held { holder, sources } => assert_eq!((holder.as_str(), sources.len()), ("http://b:1", 0)),
            other => panic!("c again: {other:?}"),
        }
        assert_eq!(reply(&redis, &["GET", &lease_key()]), "http://b:1");
        // The old holder's late release and renewal leave the new holder's lease alone.
        assert!(!a.renew(&lease_key()).await);
        assert!(!a_lease.release().await);
        assert_eq!(reply(&redis, &["GET", &lease_key()]), "http://b:1");
        // The new holder renews and releases like any holder.
        assert!(b.renew(&lease_key()).await);
        assert!(b_lease.release().await);
        assert_eq!(reply(&redis, &["EXISTS", &lease_key()]), "0");
        // A claim naming a failed peer that holds nothing is an ordinary claim.
        assert!(matches!(d.take_over(&digest(), origin, "http://zz:1").await, Claim::Acquired(_)));
    }

    /// Two nodes' claims in the Redis `config` points at: one acquires, the other follows it;
    /// when the holder fails, the follower takes over. What the keys look like is `keys`'s.
    async fn claims_over(config: RedisConfig) {
        let make = |me: &str| {
            let config = LeaseConfig {
                redis: config.clone(),
                ttl: Duration::from_secs(15),
                me: me.into(),
                breaker: BreakerConfig::default(),
            };
            Leases::new(config, &ClusterMetrics::unregistered()).unwrap()
        };
        let (a, b) = (make("http://a:1"), make("http://b:1"));
        let origin = "reg.example/team/app";
        // The first call may wait for the slot map or the sentinels; a breaker opened by a
        // node that was not ready yet closes again after its first backoff.
        let mut first = None;
        for _ in 0..20 {
            match a.claim(&digest(), origin).await {
                Claim::Unavailable => tokio::time::sleep(Duration::from_millis(500)).await,
                claim => {
                    first = Some(claim);
                    break;
                }
            }
        }
        let Some(Claim::Acquired(a_lease)) = first else { panic!("a did not acquire: {first:?}") };
        b.register_source(&digest(), origin).await;
        match b.claim(&digest(), origin).await {
            Claim::Held { holder, sources } => assert_eq!((holder.as_str(), sources.len()), ("http://a:1", 0)),
            other => panic!("b: {other:?}"),
        }
        let Claim::Acquired(b_lease) = b.take_over(&digest(), origin, "http://a:1").await else {
            panic!("b did not take over")
        };
        assert!(!a_lease.release().await, "a deleted b's lease");
        match a.claim(&digest(), origin).await {
            Claim::Held { holder, .. } => assert_eq!(holder, "http://b:1"),
            other => panic!("a again: {other:?}"),
        }
        assert!(b_lease.release().await);
        assert!(matches!(a.claim(&digest(), origin).await, Claim::Acquired(_)));
    }

    #[tokio::test]
    async fn leases_work_on_a_redis_cluster() {
        let cluster = test_support::redis_ha::RedisCluster::start(3).unwrap();
        claims_over(RedisConfig::cluster(cluster.seeds())).await;
        // The lease and its sources share a slot (one hash tag), on one of the masters.
        let keys = cluster.keys("registry-facade:lease*").unwrap();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(cluster.nodes_holding("registry-facade:lease*"), 1);
        assert_eq!(bulk(&cluster.command(&["GET", &lease_key()]).unwrap()), "http://a:1");
    }

    #[tokio::test]
    async fn leases_work_through_sentinel() {
        let sentinel = test_support::redis_ha::RedisSentinel::start(3).unwrap();
        let config = RedisConfig::sentinel(test_support::redis_ha::MASTER_NAME, sentinel.sentinel_addrs());
        claims_over(config).await;
        assert_eq!(bulk(&sentinel.command(&["GET", &lease_key()]).unwrap()), "http://a:1");
    }

    /// The value of a raw bulk-string reply.
    fn bulk(raw: &str) -> String {
        test_support::redis_ha::bulk_strings(raw).into_iter().next().unwrap_or_default()
    }

    #[tokio::test]
    async fn a_lease_naming_this_node_is_not_followed() {
        let redis = Redis::start().unwrap();
        let a = leases(&redis, "http://a:1", Duration::from_secs(15));
        redis.command(&["SET", &lease_key(), "http://a:1", "PX", "15000"]).unwrap();
        assert!(matches!(a.claim(&digest(), "reg.example/team/app").await, Claim::Unavailable));
    }
}
