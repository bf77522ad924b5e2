//! A circuit breaker per cluster dependency (Redis, IPFS).
//!
//! The cluster cache is an optimisation: a dependency that is down, slow or answering garbage
//! must cost a pull at most one short timeout, not one per request. After a failure the breaker
//! opens and calls skip the dependency for a backoff that doubles up to a ceiling; once the
//! backoff has passed, the next call is the trial, and its success closes the breaker again.
//! One warn line per outage and one info line on recovery, so a dead Redis does not flood logs.

use std::sync::Mutex;

use crate::sync::lock;
use std::time::Duration;

use tokio::time::Instant;

use super::metrics::DependencyMetrics;

/// Backoff bounds of a breaker.
#[derive(Clone, Copy, Debug)]
pub struct BreakerConfig {
    /// Skip time after the first failure of an outage.
    pub min_backoff: Duration,
    /// Longest skip time.
    pub max_backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { min_backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(30) }
    }
}

#[derive(Debug, Default)]
struct State {
    /// When the current outage began (None: the dependency is up).
    down_since: Option<Instant>,
    /// Calls are skipped until then.
    open_until: Option<Instant>,
    /// The skip time the next failure sets.
    next_backoff: Duration,
    /// Failures in this outage.
    failures: u64,
}

/// The breaker of one dependency.
#[derive(Debug)]
pub struct Breaker {
    name: &'static str,
    config: BreakerConfig,
    state: Mutex<State>,
    metrics: DependencyMetrics,
}

impl Breaker {
    /// A closed breaker for the dependency `name` (a bounded label value: `redis`, `ipfs`).
    pub fn new(name: &'static str, config: BreakerConfig, metrics: DependencyMetrics) -> Self {
        metrics.set_up(true);
        Breaker {
            name,
            config,
            state: Mutex::new(State { next_backoff: config.min_backoff, ..State::default() }),
            metrics,
        }
    }

    /// The dependency's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether a call may go out now: false while the breaker is open.
    pub fn allow(&self) -> bool {
        let s = lock(&self.state);
        s.open_until.is_none_or(|until| Instant::now() >= until)
    }

    /// Whether the dependency is considered up (no failure since the last success).
    pub fn is_up(&self) -> bool {
        lock(&self.state).down_since.is_none()
    }

    /// Records a successful call: closes the breaker and logs the recovery once.
    pub fn success(&self) {
        let mut s = lock(&self.state);
        if let Some(since) = s.down_since.take() {
            tracing::info!(
                dependency = self.name,
                down_seconds = since.elapsed().as_secs_f64(),
                failures = s.failures,
                "cluster dependency is back; using the cluster cache again"
            );
            self.metrics.set_up(true);
        }
        s.open_until = None;
        s.next_backoff = self.config.min_backoff;
        s.failures = 0;
    }

    /// Records a failed call: opens the breaker for the current backoff (then doubles it) and
    /// logs the first failure of an outage.
    pub fn failure(&self, error: &dyn std::fmt::Display) {
        self.metrics.failed();
        let mut s = lock(&self.state);
        let now = Instant::now();
        if s.down_since.is_none() {
            tracing::warn!(
                dependency = self.name,
                %error,
                backoff_seconds = s.next_backoff.as_secs_f64(),
                "cluster dependency failed; skipping it (pulls fall back to the next source) until it answers again"
            );
            s.down_since = Some(now);
            self.metrics.set_up(false);
        } else {
            tracing::debug!(dependency = self.name, %error, "cluster dependency still failing");
        }
        s.failures += 1;
        s.open_until = Some(now + s.next_backoff);
        s.next_backoff = (s.next_backoff * 2).min(self.config.max_backoff);
    }

    /// Runs `call` with a deadline if the breaker allows it. `None`: skipped (open breaker),
    /// timed out or failed — the failure is recorded. Callers treat `None` as "no answer from
    /// the cache" and go on to the next source.
    pub async fn call<T, E, F>(&self, timeout: Duration, call: F) -> Option<T>
    where
        F: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        if !self.allow() {
            return None;
        }
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => {
                self.success();
                Some(v)
            }
            Ok(Err(e)) => {
                self.failure(&e);
                None
            }
            Err(_) => {
                self.failure(&format_args!("no answer within {timeout:?}"));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(
            "redis",
            BreakerConfig { min_backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(4) },
            DependencyMetrics::unregistered("redis"),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_a_failure_and_backs_off_doubling_to_the_ceiling() {
        let b = breaker();
        assert!(b.allow());
        b.failure(&"refused");
        assert!(!b.allow() && !b.is_up());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.allow(), "trial call after the first backoff");
        // The trial fails: 2 s, then 4 s, then capped at 4 s.
        for expected in [2, 4, 4] {
            b.failure(&"refused");
            tokio::time::advance(Duration::from_secs(expected) - Duration::from_millis(1)).await;
            assert!(!b.allow(), "open for {expected}s");
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(b.allow());
        }
        b.success();
        assert!(b.allow() && b.is_up());
        b.failure(&"refused");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.allow(), "a new outage starts from the first backoff again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_dependency_costs_one_timeout_then_is_skipped() {
        let b = breaker();
        let started = Instant::now();
        let slow = b.call(Duration::from_millis(500), async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, String>(1)
        });
        assert_eq!(slow.await, None);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        let skipped = b.call(Duration::from_millis(500), async { Ok::<_, String>(2) }).await;
        assert_eq!(skipped, None, "open breaker must skip the call");
        assert_eq!(started.elapsed(), Duration::from_millis(500), "a skipped call costs no time");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.call(Duration::from_millis(500), async { Ok::<_, String>(3) }).await, Some(3));
        assert!(b.is_up());
    }

    #[test]
    fn the_up_gauge_follows_the_state() {
        let m = DependencyMetrics::unregistered("ipfs");
        let b = Breaker::new("ipfs", BreakerConfig::default(), m.clone());
        assert_eq!(m.up_value(), 1);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            b.failure(&"boom");
            assert_eq!(m.up_value(), 0);
            assert_eq!(m.failures_value(), 1);
            b.success();
            assert_eq!(m.up_value(), 1);
        });
    }
}
