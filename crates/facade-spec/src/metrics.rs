//! Spec provider metrics, registered into a registry the binary passes in.
//!
//! Label values are bounded: `provider` is a configured provider name (`remote`), `outcome` one
//! of [`Outcome`], `result` one of [`CacheResult`]. Workspace ids and addresses go to logs only.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::error::Error;

/// How one call to a spec provider ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A valid spec.
    Ok,
    /// No such workspace.
    NotFound,
    /// The provider failed or could not be reached; may pass.
    Unavailable,
    /// No answer within the deadline.
    Timeout,
    /// The provider answered with a spec that cannot describe an image.
    Invalid,
    /// The provider refused us (credentials, unimplemented service).
    Refused,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Unavailable => "unavailable",
            Outcome::Timeout => "timeout",
            Outcome::Invalid => "invalid",
            Outcome::Refused => "refused",
        }
    }

    /// The outcome an error stands for (a timeout is reported by the caller that saw it).
    pub fn of_error(e: &Error) -> Outcome {
        match e {
            Error::NotFound { .. } | Error::UnknownProvider { .. } => Outcome::NotFound,
            Error::InvalidSpec { .. } => Outcome::Invalid,
            Error::Unavailable { .. } => Outcome::Unavailable,
            Error::Config(_) => Outcome::Refused,
        }
    }
}

/// How the spec cache answered a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// A fresh spec.
    Hit,
    /// A fresh "no such workspace".
    NegativeHit,
    /// Nothing fresh: the provider was asked.
    Miss,
    /// The provider failed and an earlier spec was served.
    Stale,
}

impl CacheResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::NegativeHit => "negative_hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
        }
    }
}

/// Spec provider latency, outcomes, retries and cache results. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SpecMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    cache: IntCounterVec,
}

impl SpecMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<SpecMetrics> {
        let requests = IntCounterVec::new(
            Opts::new("registry_facade_spec_requests_total", "Calls to spec providers, by provider and outcome"),
            &["provider", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "registry_facade_spec_request_duration_seconds",
                "Time one call to a spec provider took, retries included",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["provider"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new("registry_facade_spec_retries_total", "Spec provider calls retried after UNAVAILABLE"),
            &["provider"],
        )?;
        let cache = IntCounterVec::new(
            Opts::new("registry_facade_spec_cache_lookups_total", "Spec cache lookups, by result"),
            &["provider", "result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(cache.clone()))?;
        Ok(SpecMetrics { requests, duration, retries, cache })
    }

    /// Records one finished provider call.
    pub fn observe(&self, provider: &str, outcome: Outcome, took: Duration) {
        self.requests.with_label_values(&[provider, outcome.as_str()]).inc();
        self.duration.with_label_values(&[provider]).observe(took.as_secs_f64());
    }

    /// Records one retry.
    pub fn retried(&self, provider: &str) {
        self.retries.with_label_values(&[provider]).inc();
    }

    /// Records one cache lookup.
    pub fn cache(&self, provider: &str, result: CacheResult) {
        self.cache.with_label_values(&[provider, result.as_str()]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_bounded_series() {
        let reg = Registry::new();
        let m = SpecMetrics::register(&reg).unwrap();
        m.observe("remote", Outcome::NotFound, Duration::from_millis(3));
        m.retried("remote");
        m.cache("remote", CacheResult::Stale);
        let names: Vec<String> = reg.gather().iter().map(|f| f.name().to_string()).collect();
        for n in [
            "registry_facade_spec_requests_total",
            "registry_facade_spec_request_duration_seconds",
            "registry_facade_spec_retries_total",
            "registry_facade_spec_cache_lookups_total",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        assert!(SpecMetrics::register(&reg).is_err(), "double registration must fail, not duplicate");
    }
}
