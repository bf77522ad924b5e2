//! A spec cache in front of a provider: fresh answers for a TTL, "no such workspace" for a
//! shorter one, and the last good spec while the provider fails.
//!
//! Why serve stale: a pull is many requests over seconds to minutes, and every manifest request
//! may need the spec again once composed images expire. A spec server restart must not fail the
//! pulls already under way, and a workspace's spec does not change while it runs. Only
//! `Unavailable` errors fall back; NOT_FOUND replaces the cached spec (the workspace is gone) and
//! a provider that answers with an invalid spec is reported, not papered over.
//!
//! No single-flight here: the image service composes each workspace once at a time, so
//! concurrent lookups of one id are already rare.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::metrics::{CacheResult, SpecMetrics};
use crate::model::{ContentLayer, ImageSpec};
use crate::provider::SpecProvider;

/// Knobs of the cache.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// How long a spec is served without asking the provider again.
    pub ttl: Duration,
    /// How long "no such workspace" is remembered (short: a workspace created a moment later
    /// must become pullable quickly).
    pub negative_ttl: Duration,
    /// How long after it was fetched a spec may still be served while the provider fails
    /// (zero: never serve stale).
    pub stale_for: Duration,
    /// Most workspace ids remembered.
    pub max_entries: u64,
    /// Most bytes the remembered specs may weigh together (`facade.specCacheBytes`): a spec
    /// carries its direct content layers, so a count of entries alone does not bound memory.
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl: Duration::from_secs(10),
            negative_ttl: Duration::from_secs(2),
            stale_for: Duration::from_secs(3600),
            max_entries: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

/// Bookkeeping of one entry (key, timestamps, map slot), and of each reference or layer.
const ENTRY_BYTES: usize = 256;

impl Entry {
    /// What the entry holds in memory, near enough for a byte bound.
    fn weight(&self, id: &str) -> u32 {
        let spec = match &self.answer {
            Answer::Spec(s) => {
                let refs = std::iter::once(&s.base_ref)
                    .chain(s.ide_ref.iter())
                    .chain(s.supervisor_ref.iter())
                    .chain(s.ide_layer_refs.iter())
                    .map(|r| {
                        ENTRY_BYTES
                            + r.registry.len()
                            + r.repository.as_str().len()
                            + r.tag.as_ref().map_or(0, String::len)
                    })
                    .sum::<usize>();
                let layers = s
                    .content_layers
                    .iter()
                    .map(|l| match l {
                        ContentLayer::Remote(r) => ENTRY_BYTES + r.url.len(),
                        ContentLayer::Direct { content } => ENTRY_BYTES + content.len(),
                    })
                    .sum::<usize>();
                refs + layers
            }
            Answer::NotFound(_) => 0,
        };
        u32::try_from(ENTRY_BYTES + id.len() + spec).unwrap_or(u32::MAX)
    }
}

#[derive(Clone)]
enum Answer {
    // Shared: moka hands out clones on every lookup.
    Spec(Arc<ImageSpec>),
    NotFound(Error),
}

#[derive(Clone)]
struct Entry {
    at: Instant,
    answer: Answer,
}

/// Caches the answers of `P`. The provider name labels metrics.
pub struct CachedSpecProvider<P> {
    name: String,
    inner: P,
    entries: moka::sync::Cache<String, Entry>,
    config: CacheConfig,
    metrics: Option<SpecMetrics>,
}

impl<P: SpecProvider> CachedSpecProvider<P> {
    /// Caches `inner`, called `name` in metrics.
    pub fn new(name: &str, inner: P, config: CacheConfig) -> Self {
        // Entries must outlive their freshness by the stale window; moka drops them after the
        // longest of the three and when over capacity (least recently used first).
        let keep = config.ttl.max(config.negative_ttl).max(config.stale_for).max(Duration::from_millis(1));
        // Both bounds at once: each entry weighs at least the budget's share of one entry, so
        // the cache holds at most `max_entries` entries and at most `max_bytes` bytes.
        let share = u32::try_from(config.max_bytes / config.max_entries.max(1)).unwrap_or(u32::MAX);
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(move |id: &String, e: &Entry| e.weight(id).max(share))
            .time_to_live(keep)
            .build();
        CachedSpecProvider { name: name.to_string(), inner, entries, config, metrics: None }
    }

    /// Records lookups into `metrics`.
    pub fn with_metrics(mut self, metrics: SpecMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The provider behind the cache.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    fn count(&self, r: CacheResult) {
        if let Some(m) = &self.metrics {
            m.cache(&self.name, r);
        }
    }

    async fn lookup(&self, id: &str) -> Result<ImageSpec> {
        let cached = self.entries.get(id);
        if let Some(e) = &cached {
            let age = e.at.elapsed();
            match &e.answer {
                Answer::Spec(s) if age < self.config.ttl => {
                    self.count(CacheResult::Hit);
                    return Ok(ImageSpec::clone(s));
                }
                Answer::NotFound(err) if age < self.config.negative_ttl => {
                    self.count(CacheResult::NegativeHit);
                    return Err(err.clone());
                }
                _ => {}
            }
        }
        let asked = Instant::now();
        match self.inner.get_spec(id).await {
            Ok(spec) => {
                self.count(CacheResult::Miss);
                self.entries.insert(id.to_string(), Entry { at: asked, answer: Answer::Spec(Arc::new(spec.clone())) });
                Ok(spec)
            }
            Err(e @ Error::NotFound { .. }) => {
                self.count(CacheResult::Miss);
                self.entries.insert(id.to_string(), Entry { at: asked, answer: Answer::NotFound(e.clone()) });
                Err(e)
            }
            Err(e) if e.is_retryable() => match cached {
                Some(Entry { at, answer: Answer::Spec(spec) }) if at.elapsed() < self.config.stale_for => {
                    self.count(CacheResult::Stale);
                    tracing::warn!(provider = %self.name, id, age_seconds = at.elapsed().as_secs(), error = %e, "spec provider failing; serving the last spec it gave");
                    Ok(ImageSpec::clone(&spec))
                }
                _ => {
                    self.count(CacheResult::Miss);
                    Err(e)
                }
            },
            Err(e) => {
                self.count(CacheResult::Miss);
                Err(e)
            }
        }
    }
}

impl<P: SpecProvider> SpecProvider for CachedSpecProvider<P> {
    fn get_spec<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ImageSpec>> {
        Box::pin(self.lookup(id))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use bytes::Bytes;

    /// Answers from a script, counting calls; an empty script is a test bug.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Result<ImageSpec>>>,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn then(self, r: Result<ImageSpec>) -> Self {
            self.answers.lock().unwrap().push_back(r);
            self
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl SpecProvider for Scripted {
        fn get_spec<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<ImageSpec>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let next = self.answers.lock().unwrap().pop_front().expect("unexpected provider call");
            Box::pin(async move { next })
        }
    }

    fn spec(base: &str) -> ImageSpec {
        ImageSpec::from_json_value("ws", serde_json::json!({ "baseRef": base })).unwrap()
    }
    fn not_found() -> Error {
        Error::NotFound { provider: "remote".into(), id: "ws".into() }
    }
    fn unavailable() -> Error {
        Error::Unavailable { provider: "remote".into(), reason: "down".into() }
    }
    fn config() -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_secs(10),
            negative_ttl: Duration::from_secs(2),
            stale_for: Duration::from_secs(60),
            max_entries: 100,
            max_bytes: 1 << 20,
        }
    }

    #[tokio::test]
    async fn big_specs_are_bounded_by_bytes_not_by_count() {
        let direct = |n: u8| {
            let mut s = spec("base:1");
            s.content_layers.push(ContentLayer::Direct { content: Bytes::from(vec![n; 300 << 10]) });
            s
        };
        let mut scripted = Scripted::default();
        for n in 0..8 {
            scripted = scripted.then(Ok(direct(n)));
        }
        let c = CachedSpecProvider::new("remote", scripted, config());
        for n in 0..8u8 {
            c.lookup(&format!("ws-{n}")).await.unwrap();
        }
        c.entries.run_pending_tasks();
        let weight = c.entries.weighted_size();
        assert!(weight <= 1 << 20, "8 specs of 300 KiB weigh {weight} bytes in a 1 MiB cache");
        assert!(c.entries.entry_count() >= 2, "nothing kept");
    }

    #[tokio::test(start_paused = true)]
    async fn serves_fresh_specs_without_asking_again() {
        let c =
            CachedSpecProvider::new("remote", Scripted::default().then(Ok(spec("a"))).then(Ok(spec("b"))), config());
        assert_eq!(c.get_spec("ws").await.unwrap(), spec("a"));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(c.get_spec("ws").await.unwrap(), spec("a"));
        assert_eq!(c.inner().calls(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.get_spec("ws").await.unwrap(), spec("b"), "expired specs are asked for again");
        assert_eq!(c.inner().calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn remembers_not_found_briefly() {
        let c =
            CachedSpecProvider::new("remote", Scripted::default().then(Err(not_found())).then(Ok(spec("a"))), config());
        assert!(matches!(c.get_spec("ws").await, Err(Error::NotFound { .. })));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(c.get_spec("ws").await, Err(Error::NotFound { .. })));
        assert_eq!(c.inner().calls(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.get_spec("ws").await.unwrap(), spec("a"), "a workspace created later becomes visible");
    }

    #[tokio::test(start_paused = true)]
    async fn serves_the_last_spec_while_the_provider_is_unavailable() {
        let c = CachedSpecProvider::new(
            "remote",
            Scripted::default()
                .then(Ok(spec("a")))
                .then(Err(unavailable()))
                .then(Err(unavailable()))
                .then(Ok(spec("b"))),
            config(),
        );
        let m = SpecMetrics::register(&prometheus::Registry::new()).unwrap();
        let c = c.with_metrics(m);
        c.get_spec("ws").await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(c.get_spec("ws").await.unwrap(), spec("a"));
        // Still stale (not refreshed by the failure): the provider is asked every time.
        assert_eq!(c.get_spec("ws").await.unwrap(), spec("a"));
        assert_eq!(c.get_spec("ws").await.unwrap(), spec("b"), "recovers once the provider answers");
        assert_eq!(c.inner().calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_specs_expire_and_unknown_ids_fail() {
        let c = CachedSpecProvider::new(
            "remote",
            Scripted::default().then(Ok(spec("a"))).then(Err(unavailable())).then(Err(unavailable())),
            config(),
        );
        c.get_spec("ws").await.unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(matches!(c.get_spec("ws").await, Err(Error::Unavailable { .. })), "too old to serve");
        assert!(matches!(c.get_spec("other").await, Err(Error::Unavailable { .. })), "never seen");
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_replaces_a_cached_spec_and_invalid_answers_are_not_hidden() {
        let c = CachedSpecProvider::new(
            "remote",
            Scripted::default()
                .then(Ok(spec("a")))
                .then(Err(Error::InvalidSpec { id: "ws".into(), reason: "bad".into() }))
                .then(Err(not_found()))
                .then(Err(unavailable())),
            config(),
        );
        c.get_spec("ws").await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(c.get_spec("ws").await, Err(Error::InvalidSpec { .. })));
        assert!(matches!(c.get_spec("ws").await, Err(Error::NotFound { .. })));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(
            matches!(c.get_spec("ws").await, Err(Error::Unavailable { .. })),
            "a deleted workspace is not served stale"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_ttl_always_asks_but_still_serves_stale() {
        let cfg = CacheConfig { ttl: Duration::ZERO, negative_ttl: Duration::ZERO, ..config() };
        let c =
            CachedSpecProvider::new("remote", Scripted::default().then(Ok(spec("a"))).then(Err(unavailable())), cfg);
        c.get_spec("ws").await.unwrap();
        assert_eq!(c.get_spec("ws").await.unwrap(), spec("a"));
        assert_eq!(c.inner().calls(), 2);
    }
}
