//! `UpstreamMetrics`: what upstream registries are asked and how they answer (the reference
//! counted none of its upstream HTTP errors, gitpod-io/gitpod#7886).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Counters and latencies of upstream requests. Labels are bounded: the request kind
/// (`manifest|blob|token|other`) and the status class (`2xx`…`5xx`, `error` for no answer).
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl UpstreamMetrics {
    /// Registers the metrics into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "registry_facade_upstream_requests_total",
                "Requests sent to upstream registries and token servers",
            ),
            &["kind", "status_class"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "registry_facade_upstream_request_duration_seconds",
                "Time from sending an upstream request to its response headers",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["kind"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(UpstreamMetrics { requests, duration })
    }

    pub(crate) fn observe(&self, path: &str, status: Option<u16>, seconds: f64) {
        let kind = kind_of(path);
        let class = match status {
            Some(s) if (200..300).contains(&s) => "2xx",
            Some(s) if (300..400).contains(&s) => "3xx",
            Some(s) if (400..500).contains(&s) => "4xx",
            Some(_) => "5xx",
            None => "error",
        };
        self.requests.with_label_values(&[kind, class]).inc();
        self.duration.with_label_values(&[kind]).observe(seconds);
    }
}

fn kind_of(path: &str) -> &'static str {
    if path.contains("/manifests/") {
        "manifest"
    } else if path.contains("/blobs/") {
        "blob"
    } else if path.starts_with("/v2") {
        "other"
    } else {
        // Token realms and CDN redirect targets.
        "token"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_class() {
        let r = Registry::new();
        let m = UpstreamMetrics::register(&r).unwrap();
        m.observe("/v2/a/manifests/latest", Some(200), 0.01);
        m.observe("/v2/a/blobs/sha256:x", Some(503), 0.01);
        m.observe("/token", None, 0.01);
        assert_eq!(m.requests.with_label_values(&["manifest", "2xx"]).get(), 1);
        assert_eq!(m.requests.with_label_values(&["blob", "5xx"]).get(), 1);
        assert_eq!(m.requests.with_label_values(&["token", "error"]).get(), 1);
    }
}
