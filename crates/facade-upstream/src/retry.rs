//! Retries of the small requests an image is composed from (tag resolution, manifests,
//! configs, and the token requests they need): exponential backoff with jitter, the same
//! `backon` policy shape the blob fill resumes downloads with, inside a time budget.
//!
//! One reset or cut body while an image is composed would otherwise become a 503, and the
//! kubelet backs off for 10 s or more before it pulls again. Only what [`Error::is_retryable`]
//! allows is retried (connect errors, resets, short bodies, 429, 502, 503, 504); a 400, 401,
//! 403, 404, a digest mismatch or a refused TLS handshake ends the request at once.

use std::future::Future;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::metrics::{UpstreamMetrics, retry_reason};

/// First delay; each next one doubles, plus up to as much again of jitter.
const MIN_DELAY: Duration = Duration::from_millis(200);
/// Longest delay before jitter.
const MAX_DELAY: Duration = Duration::from_secs(2);
/// Retries at most, whatever the budget (the reference facade takes about 5 steps).
const MAX_RETRIES: usize = 6;

fn backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_max_times(MAX_RETRIES)
        .with_jitter()
        .build()
}

/// How long to wait before trying again after `e`, or `None` to give up: not retryable, out
/// of steps, or the wait would end past `budget` (counted from the first try, so the tries
/// themselves use it up too). A `Retry-After` is honoured as a lower bound when it fits; one
/// that does not fit ends the retries, and the caller passes the 429 and its `Retry-After` on.
fn next_delay(
    e: &Error,
    steps: &mut impl Iterator<Item = Duration>,
    spent: Duration,
    budget: Duration,
) -> Option<Duration> {
    if !e.is_retryable() {
        return None;
    }
    let step = steps.next()?;
    let delay = e.retry_after().map_or(step, |wait| wait.max(step));
    (spent + delay <= budget).then_some(delay)
}

/// What a retried request is, for the metric and the log.
pub(crate) struct Retry<'a> {
    pub(crate) kind: &'static str,
    pub(crate) budget: Duration,
    pub(crate) metrics: Option<&'a UpstreamMetrics>,
}

/// Runs `attempt` until it succeeds, fails for good, or the budget is spent; returns the last
/// error then. Each attempt starts from scratch (a new request, a new token if the old one
/// was not cached), so a half-read body is never reused.
pub(crate) async fn retrying<T, F, Fut>(r: Retry<'_>, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let started = Instant::now();
    let mut steps = backoff();
    let mut tries = 1u32;
    loop {
        let e = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let Some(delay) = next_delay(&e, &mut steps, started.elapsed(), r.budget) else {
            if tries > 1 {
                tracing::debug!(kind = r.kind, tries, error = %e, "upstream request still failing; giving up");
            }
            return Err(e);
        };
        let reason = retry_reason(&e);
        if let Some(m) = r.metrics {
            m.retry(r.kind, reason);
        }
        let host = e.detail().upstream.unwrap_or_default();
        tracing::debug!(kind = r.kind, %host, reason, tries, delay_ms = delay.as_millis() as u64, error = %e, "upstream request failed; retrying");
        tokio::time::sleep(delay).await;
        tries += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn reset() -> Error {
        Error::Transport { host: "h".into(), source: "connection reset".into() }
    }

    #[test]
    fn classifies_what_is_retried() {
        let budget = Duration::from_secs(7);
        let retried = |e: Error| next_delay(&e, &mut backoff(), Duration::ZERO, budget).is_some();
        let status = |status| Error::Status { host: "h".into(), status, retry_after: None };
        assert!(retried(reset()));
        assert!(retried(Error::Connect { host: "h".into(), source: "refused".into() }));
        assert!(retried(Error::ShortBody { host: "h".into(), received: 1, expected: 2 }));
        assert!(retried(status(502)) && retried(status(503)) && retried(status(504)));
        assert!(retried(Error::RateLimited { host: "h".into(), retry_after: None }));
        assert!(!retried(status(500)) && !retried(status(400)));
        assert!(!retried(Error::NotFound { host: "h".into(), what: "m".into() }));
        assert!(!retried(Error::Denied { host: "h".into() }));
        assert!(!retried(Error::Unauthorized { host: "h".into(), status: 401, reason: "r" }));
        assert!(!retried(Error::Tls { host: "h".into(), source: "unknown issuer".into() }));
        let d = facade_oci::Digest::sha256_of(b"x");
        assert!(!retried(Error::DigestMismatch { host: "h".into(), expected: d.clone(), actual: d }));
    }

    #[test]
    fn retry_after_is_a_floor_and_must_fit_the_budget() {
        let budget = Duration::from_secs(7);
        let limited = |s| Error::RateLimited { host: "h".into(), retry_after: Some(Duration::from_secs(s)) };
        assert_eq!(next_delay(&limited(3), &mut backoff(), Duration::ZERO, budget), Some(Duration::from_secs(3)));
        assert_eq!(next_delay(&limited(3), &mut backoff(), Duration::from_secs(5), budget), None);
        assert_eq!(next_delay(&limited(30), &mut backoff(), Duration::ZERO, budget), None);
        let zero = next_delay(&limited(0), &mut backoff(), Duration::ZERO, budget).unwrap();
        assert!(zero >= MIN_DELAY, "{zero:?}");
        assert_eq!(next_delay(&reset(), &mut backoff(), Duration::ZERO, Duration::ZERO), None, "budget 0: no retry");
    }

    #[test]
    fn steps_grow_and_stop() {
        let delays: Vec<Duration> = backoff().collect();
        assert_eq!(delays.len(), MAX_RETRIES);
        assert!(delays[0] >= MIN_DELAY && delays[0] <= 2 * MIN_DELAY, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= 2 * MAX_DELAY), "{delays:?}");
        let total: Duration = delays.iter().sum();
        assert!(total > Duration::from_secs(3), "enough patience for a restart: {delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_within_the_budget_then_returns_the_last_error() {
        let tries = AtomicUsize::new(0);
        let started = Instant::now();
        let budget = Duration::from_secs(7);
        let r: Result<()> = retrying(Retry { kind: "manifest", budget, metrics: None }, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err(reset()) }
        })
        .await;
        assert!(matches!(r, Err(Error::Transport { .. })));
        let n = tries.load(Ordering::SeqCst);
        assert!((3..=MAX_RETRIES + 1).contains(&n), "{n} tries");
        assert!(started.elapsed() <= budget, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_success_wins_and_a_404_is_final() {
        let metrics = UpstreamMetrics::register(&prometheus::Registry::new()).unwrap();
        let tries = AtomicUsize::new(0);
        let budget = Duration::from_secs(7);
        let r = retrying(Retry { kind: "config", budget, metrics: Some(&metrics) }, || {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move { if n < 2 { Err(reset()) } else { Ok(n) } }
        })
        .await;
        assert_eq!(r.unwrap(), 2);
        assert_eq!(metrics.retries("config", "reset"), 2);

        let tries = AtomicUsize::new(0);
        let r: Result<()> = retrying(Retry { kind: "tag", budget, metrics: Some(&metrics) }, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err(Error::NotFound { host: "h".into(), what: "m".into() }) }
        })
        .await;
        assert!(matches!(r, Err(Error::NotFound { .. })));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }
}
