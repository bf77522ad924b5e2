//! The Redis side of the cluster cache against a real `redis-server`: password auth, tag TTLs,
//! verification of what Redis hands back, and degradation when Redis refuses us.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use facade_blob::cluster::{ClusterCache, ClusterConfig, ClusterMetrics, RedisConfig};
use facade_oci::Digest;
use test_support::redis::Redis;

fn cache(redis: &Redis, password: Option<&str>, tag_ttl: Duration) -> (Arc<ClusterCache>, ClusterMetrics) {
    let mut rc = RedisConfig::new(redis.host());
    rc.password = password.map(str::to_string);
    let metrics = ClusterMetrics::unregistered();
    let config = ClusterConfig { redis: Some(rc), tag_ttl, ..ClusterConfig::default() };
    (ClusterCache::new(config, metrics.clone()).unwrap(), metrics)
}

async fn eventually<F: Future<Output = bool>>(what: &str, f: impl FnMut() -> F) {
    test_support::wait::until_async(what, Duration::from_secs(10), f).await;
}

#[tokio::test]
async fn tags_are_shared_with_a_password_and_move_after_their_ttl() {
    let redis = Redis::start_with(Some("s3cret pass")).unwrap();
    let (c, _) = cache(&redis, Some("s3cret pass"), Duration::from_secs(1));
    let d = Digest::sha256_of(b"manifest");
    c.put_tag("registry.test/app:1", &d);
    eventually("the tag to be shared", || async { c.tag("registry.test/app:1").await == Some(d.clone()) }).await;
    assert!(
        redis.keys("registry-facade:tag:*").unwrap().contains(&"registry-facade:tag:registry.test/app:1".to_string())
    );
    // Mutable tags must move: the shared resolution expires.
    eventually("the tag to expire", || async { c.tag("registry.test/app:1").await.is_none() }).await;
}

#[tokio::test]
async fn content_from_redis_is_used_only_if_it_matches_its_digest() {
    let redis = Redis::start().unwrap();
    let (c, _) = cache(&redis, None, Duration::from_secs(60));
    let bytes = Bytes::from_static(b"{\"schemaVersion\":2}");
    let d = Digest::sha256_of(&bytes);
    c.put_manifest(&d, "application/vnd.oci.image.manifest.v1+json", &bytes);
    c.put_config(&d, &bytes);
    eventually("the manifest to be shared", || async { c.manifest(&d).await.is_some() }).await;
    assert_eq!(
        c.manifest(&d).await.unwrap(),
        ("application/vnd.oci.image.manifest.v1+json".to_string(), bytes.clone())
    );
    eventually("the config to be shared", || async { c.config(&d).await == Some(bytes.clone()) }).await;

    // Tampered entries are ignored and removed; a garbage tag is not a digest.
    let mkey = format!("registry-facade:manifest:{d}");
    let ckey = format!("registry-facade:config:{d}");
    redis.command(&["SET", &mkey, "text/plain\nnot the manifest"]).unwrap();
    redis.command(&["SET", &ckey, "not the config"]).unwrap();
    redis.command(&["SET", "registry-facade:tag:r/a:1", "latest"]).unwrap();
    assert!(c.manifest(&d).await.is_none());
    assert!(c.config(&d).await.is_none());
    assert!(c.tag("r/a:1").await.is_none());
    let keys = redis.keys("registry-facade:*").unwrap();
    assert!(!keys.contains(&mkey) && !keys.contains(&ckey), "{keys:?}");
    assert!(c.is_redis_up(), "garbage is not an outage");
}

#[tokio::test]
async fn a_refusing_redis_is_an_outage_not_an_error() {
    let redis = Redis::start_with(Some("right")).unwrap();
    let (c, metrics) = cache(&redis, Some("wrong"), Duration::from_secs(60));
    let started = tokio::time::Instant::now();
    assert!(c.tag("r/a:1").await.is_none());
    assert!(!c.is_redis_up());
    assert_eq!(metrics.dependency("redis").up_value(), 0);
    assert!(metrics.dependency("redis").failures_value() >= 1);
    // The breaker is open now: further calls cost nothing.
    let skipped = tokio::time::Instant::now();
    for _ in 0..100 {
        assert!(c.tag("r/a:1").await.is_none());
    }
    assert!(skipped.elapsed() < Duration::from_millis(200), "open breaker still called Redis");
    assert!(started.elapsed() < Duration::from_secs(2));
}
