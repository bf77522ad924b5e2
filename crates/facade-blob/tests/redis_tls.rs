//! The cluster cache's Redis client over TLS against a real `redis-server` that serves only
//! TLS, with a certificate of a private CA (issue #12): the CA from `redis.caFile` is trusted,
//! the system's roots (or another CA) are not, `insecureSkipVerify` skips the check, and a
//! client speaking the wrong protocol fails within its deadline instead of hanging.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use facade_blob::cluster::lease::{Claim, LeaseConfig, Leases};
use facade_blob::cluster::{BreakerConfig, ClusterCache, ClusterConfig, ClusterMetrics, RedisConfig, RedisKv};
use facade_oci::Digest;
use test_support::redis::Redis;
use test_support::tls_registry::PrivateCa;

/// The per-command deadline of the clients here: roomy for a loaded machine, and what a
/// failing call must finish within (plus scheduling slack).
const TIMEOUT: Duration = Duration::from_secs(2);
/// A failing call must end by then; more means it waited for something the timeout should
/// have cut.
const FAIL_BOUND: Duration = Duration::from_secs(8);

/// A private CA and a TLS-only Redis serving a certificate it issued for 127.0.0.1 and
/// localhost.
fn tls_redis() -> (PrivateCa, Redis) {
    let ca = PrivateCa::new("redis-tls test CA").unwrap();
    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]).unwrap();
    let redis = Redis::start_tls(&cert, &key, &ca.cert_pem()).unwrap();
    (ca, redis)
}

fn tls_config(addr: String, ca_pem: Option<String>, insecure: bool) -> RedisConfig {
    let mut c = RedisConfig::new(addr);
    c.tls = true;
    c.insecure_skip_verify = insecure;
    c.ca_pem = ca_pem.map(String::into_bytes);
    c.timeout = TIMEOUT;
    c
}

/// Runs `f` with a hard stop, so a hang fails the test instead of stalling it.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.unwrap_or_else(|_| panic!("{what}: no answer in 30 s"))
}

/// A `SET` + `GET` round trip through a fresh client of `config`.
async fn round_trip(config: &RedisConfig, value: &[u8]) -> facade_blob::Result<Option<Vec<u8>>> {
    let kv = RedisKv::connect(config)?;
    let key = kv.key(&["tls-test", &String::from_utf8_lossy(value)]);
    kv.set(&key, value, Duration::from_secs(60)).await?;
    kv.get(&key).await
}

/// The first command of a fresh client of `config` fails, within [`FAIL_BOUND`]. Its error.
async fn fails_in_time(config: &RedisConfig) -> String {
    let kv = RedisKv::connect(config).unwrap();
    let started = tokio::time::Instant::now();
    let result = bounded("a failing GET", kv.get(&kv.key(&["tls-test", "never"]))).await;
    let took = started.elapsed();
    let e = result.expect_err("the call must fail");
    assert!(took < FAIL_BOUND, "the failure took {took:?}: {e}");
    // The second call must fail too (no fallback to an unchecked connection after a refusal).
    assert!(bounded("a second failing GET", kv.ping()).await.is_err());
    e.to_string()
}

#[tokio::test]
async fn a_private_ca_is_trusted_for_an_ip_and_a_name() {
    let (ca, redis) = tls_redis();
    let c = tls_config(redis.host(), Some(ca.cert_pem()), false);
    assert_eq!(bounded("round trip", round_trip(&c, b"over tls")).await.unwrap(), Some(b"over tls".to_vec()));

    // Another client (its own connection) sees what the first wrote: it is in the server.
    let other = RedisKv::connect(&c).unwrap();
    let key = other.key(&["tls-test", "over tls"]);
    assert_eq!(bounded("second client", other.get(&key)).await.unwrap(), Some(b"over tls".to_vec()));

    // By name: the certificate's DNS name is checked, not only its IP address.
    let by_name = tls_config(format!("localhost:{}", redis.addr.port()), Some(ca.cert_pem()), false);
    assert_eq!(bounded("by name", round_trip(&by_name, b"by name")).await.unwrap(), Some(b"by name".to_vec()));

    // The cluster cache itself (what `redis.caFile` feeds) shares a tag over this Redis.
    let metrics = ClusterMetrics::unregistered();
    let config = ClusterConfig { redis: Some(c.clone()), tag_ttl: Duration::from_secs(60), ..ClusterConfig::default() };
    let cache = ClusterCache::new(config, metrics.clone()).unwrap();
    let d = Digest::sha256_of(b"manifest over tls");
    cache.put_tag("registry.test/app:tls", &d);
    test_support::wait::until_async("the tag to be shared over TLS", Duration::from_secs(10), || async {
        cache.tag("registry.test/app:tls").await == Some(d.clone())
    })
    .await;
    assert!(cache.is_redis_up());
    assert_eq!(metrics.dependency("redis").failures_value(), 0);
}

#[tokio::test]
async fn the_system_roots_or_another_ca_do_not_trust_a_private_certificate() {
    let (_ca, redis) = tls_redis();
    let system_roots = tls_config(redis.host(), None, false);
    let e = fails_in_time(&system_roots).await;
    assert!(e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"), "not a certificate error: {e}");

    let stranger = PrivateCa::new("another test CA").unwrap();
    let wrong_ca = tls_config(redis.host(), Some(stranger.cert_pem()), false);
    let e = fails_in_time(&wrong_ca).await;
    assert!(e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"), "not a certificate error: {e}");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_even_from_the_trusted_ca() {
    let ca = PrivateCa::new("redis-tls test CA").unwrap();
    let (cert, key) = ca.issue(&["redis.elsewhere.test"]).unwrap();
    let redis = Redis::start_tls(&cert, &key, &ca.cert_pem()).unwrap();
    let c = tls_config(redis.host(), Some(ca.cert_pem()), false);
    let e = fails_in_time(&c).await;
    assert!(e.to_lowercase().contains("certificate") || e.contains("NotValidForName"), "not a name error: {e}");
}

#[tokio::test]
async fn insecure_skip_verify_accepts_the_private_certificate() {
    let (_ca, redis) = tls_redis();
    let insecure = tls_config(redis.host(), None, true);
    assert_eq!(bounded("insecure", round_trip(&insecure, b"unchecked")).await.unwrap(), Some(b"unchecked".to_vec()));
    // A CA that did not issue the certificate is ignored when verification is off.
    let stranger = PrivateCa::new("another test CA").unwrap();
    let insecure_with_ca = tls_config(redis.host(), Some(stranger.cert_pem()), true);
    assert_eq!(
        bounded("insecure with CA", round_trip(&insecure_with_ca, b"still unchecked")).await.unwrap(),
        Some(b"still unchecked".to_vec())
    );
}

#[tokio::test]
async fn a_protocol_mismatch_fails_cleanly_both_ways() {
    let (_ca, tls) = tls_redis();
    let mut plain = RedisConfig::new(tls.host());
    plain.timeout = TIMEOUT;
    fails_in_time(&plain).await;

    let plain_redis = Redis::start().unwrap();
    let tls_to_plain = tls_config(plain_redis.host(), None, true);
    fails_in_time(&tls_to_plain).await;
    // That Redis is fine for plain clients.
    plain.addr = plain_redis.host();
    assert_eq!(bounded("plain", round_trip(&plain, b"plain")).await.unwrap(), Some(b"plain".to_vec()));
}

#[tokio::test]
async fn a_tls_handshake_nobody_answers_is_cut_by_the_timeout() {
    // Accepts connections and never says a word: the client's ClientHello goes unanswered.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            sockets.push(s);
        }
    });
    let c = tls_config(addr.to_string(), None, true);
    fails_in_time(&c).await;
    held.abort();
}

#[tokio::test]
async fn a_lease_is_claimed_over_tls_with_the_private_ca() {
    let (ca, redis) = tls_redis();
    let lease_config = |me: &str| LeaseConfig {
        redis: tls_config(redis.host(), Some(ca.cert_pem()), false),
        ttl: Duration::from_secs(30),
        me: me.into(),
        breaker: BreakerConfig::default(),
    };
    let a: Arc<Leases> = Leases::new(lease_config("http://127.0.0.1:1"), &ClusterMetrics::unregistered()).unwrap();
    let b = Leases::new(lease_config("http://127.0.0.1:2"), &ClusterMetrics::unregistered()).unwrap();
    let d = Digest::sha256_of(b"blob over tls");
    let Claim::Acquired(lease) = bounded("claim", a.claim(&d, "registry.test")).await else {
        panic!("the first claim over TLS must acquire the lease")
    };
    match bounded("second claim", b.claim(&d, "registry.test")).await {
        Claim::Held { holder, .. } => assert_eq!(holder, "http://127.0.0.1:1"),
        other => panic!("the second node must see the first one's lease, got {other:?}"),
    }
    assert!(bounded("release", lease.release()).await);
}
