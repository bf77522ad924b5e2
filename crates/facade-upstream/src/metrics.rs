//! `UpstreamMetrics`: what upstream registries are asked and how they answer (the reference
//! counted none of its upstream HTTP errors, gitpod-io/gitpod#7886).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

/// Counters and latencies of upstream requests. Labels are bounded: the request kind
/// (`manifest|blob|token|other`), the status class (`2xx`…`5xx`, `error` for no answer), and
/// for retries the operation (`tag|manifest|config`) and the reason (see [`retry_reason`]).
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    legacy: Option<LegacyDownstreamMetrics>,
}

impl UpstreamMetrics {
    /// Registers the metrics, the Go facade's legacy `gitpod_registry_facade_downstream_*`
    /// series included, into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Self::register_with(registry, true)
    }

    /// [`UpstreamMetrics::register`], with the legacy series only when `legacy` is set
    /// (`facade.legacyMetrics`).
    pub fn register_with(registry: &Registry, legacy: bool) -> prometheus::Result<Self> {
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
        // Blob downloads count their resumes in `registry_facade_upstream_retries_total`
        // (facade-blob); these are the retried requests of image resolution and composition.
        let retries = IntCounterVec::new(
            Opts::new(
                "registry_facade_upstream_request_retries_total",
                "Manifest, config and tag requests to upstream retried after a transient failure",
            ),
            &["kind", "reason"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        let legacy = if legacy { Some(LegacyDownstreamMetrics::register(registry)?) } else { None };
        Ok(UpstreamMetrics { requests, duration, retries, legacy })
    }

    pub(crate) fn retry(&self, kind: &'static str, reason: &'static str) {
        self.retries.with_label_values(&[kind, reason]).inc();
    }

    /// Retries counted so far for (`kind`, `reason`).
    pub fn retries(&self, kind: &str, reason: &str) -> u64 {
        self.retries.with_label_values(&[kind, reason]).get()
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
        if let Some(l) = &self.legacy {
            l.observe(kind, status, seconds);
        }
    }
}

/// The `reason` label of a retry: `connect`, `tls`, `reset` (the connection broke), `body` (it
/// ended early), `timeout`, `stall`, `status` (502/503/504), `rate_limited` (429) or `other`.
pub(crate) fn retry_reason(e: &crate::Error) -> &'static str {
    use crate::Error as E;
    match e {
        E::Connect { .. } => "connect",
        E::Tls { .. } => "tls",
        E::Transport { .. } => "reset",
        E::ShortBody { .. } => "body",
        E::Timeout { .. } => "timeout",
        E::Stalled { .. } => "stall",
        E::Status { .. } => "status",
        E::RateLimited { .. } => "rate_limited",
        _ => "other",
    }
}

const LEGACY_PREFIX: &str = "gitpod_registry_facade_downstream_";

/// The Go facade's upstream series, under their old names, kinds, buckets and labels, for
/// dashboards written against it (docs/migration.md). The Go facade fed them from its HTTP
/// round-tripper: one observation per request, failures being requests that got no answer.
#[derive(Clone, Debug)]
struct LegacyDownstreamMetrics {
    /// `manifest_req_seconds`: manifest requests, time to response headers.
    manifest_seconds: Histogram,
    /// `req_failed_total{type=manifest|blob}`: requests that got no answer (connect, TLS,
    /// reset, timeout); an HTTP error status is an answer, as in the Go facade.
    failed: IntCounterVec,
    /// `blob_req_total`: blob requests sent (resumes included).
    blobs: IntCounter,
    /// `blob_req_dl_total{blobSource="proxy",ok}`: blob requests by whether they were answered
    /// 2xx (the Go facade registered this series upstream but never counted into it).
    downloads: IntCounterVec,
    /// `blob_req_bytes_total{blobSource}`: registered for dashboards only; upstream body bytes
    /// are counted by the blob chain, and the Go facade never counted into it either.
    _bytes: IntCounterVec,
}

impl LegacyDownstreamMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let manifest_seconds = Histogram::with_opts(
            HistogramOpts::new(
                format!("{LEGACY_PREFIX}manifest_req_seconds"),
                "time of manifest requests made to the downstream registry",
            )
            .buckets(vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0, 300.0, 600.0, 1800.0]),
        )?;
        let failed = IntCounterVec::new(
            Opts::new(format!("{LEGACY_PREFIX}req_failed_total"), "number of requests that failed"),
            &["type"],
        )?;
        let blobs = IntCounter::new(
            format!("{LEGACY_PREFIX}blob_req_total"),
            "number of blob requests made to the downstream registry",
        )?;
        let downloads = IntCounterVec::new(
            Opts::new(format!("{LEGACY_PREFIX}blob_req_dl_total"), "number of blob download requests"),
            &["blobSource", "ok"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(format!("{LEGACY_PREFIX}blob_req_bytes_total"), "amount of blob bytes downloaded"),
            &["blobSource"],
        )?;
        registry.register(Box::new(manifest_seconds.clone()))?;
        registry.register(Box::new(failed.clone()))?;
        registry.register(Box::new(blobs.clone()))?;
        registry.register(Box::new(downloads.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        for t in ["manifest", "blob"] {
            failed.with_label_values(&[t]);
        }
        for ok in ["true", "false"] {
            downloads.with_label_values(&["proxy", ok]);
        }
        bytes.with_label_values(&["proxy"]);
        Ok(LegacyDownstreamMetrics { manifest_seconds, failed, blobs, downloads, _bytes: bytes })
    }

    fn observe(&self, kind: &str, status: Option<u16>, seconds: f64) {
        match kind {
            "manifest" => self.manifest_seconds.observe(seconds),
            "blob" => {
                self.blobs.inc();
                let ok = status.is_some_and(|s| (200..300).contains(&s));
                self.downloads.with_label_values(&["proxy", if ok { "true" } else { "false" }]).inc();
            }
            _ => return,
        }
        if status.is_none() {
            self.failed.with_label_values(&[kind]).inc();
        }
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

    #[test]
    fn feeds_the_legacy_downstream_series_and_can_leave_them_out() {
        let r = Registry::new();
        let m = UpstreamMetrics::register(&r).unwrap();
        m.observe("/v2/a/manifests/latest", Some(200), 0.2);
        m.observe("/v2/a/manifests/latest", None, 0.2);
        m.observe("/v2/a/blobs/sha256:x", Some(206), 0.01);
        m.observe("/v2/a/blobs/sha256:x", Some(503), 0.01);
        m.observe("/v2/a/blobs/sha256:x", None, 0.01);
        m.observe("/token", None, 0.01);
        let l = m.legacy.as_ref().unwrap();
        assert_eq!(l.manifest_seconds.get_sample_count(), 2);
        assert_eq!(l.failed.with_label_values(&["manifest"]).get(), 1);
        assert_eq!(l.failed.with_label_values(&["blob"]).get(), 1);
        assert_eq!(l.blobs.get(), 3);
        assert_eq!(l.downloads.with_label_values(&["proxy", "true"]).get(), 1);
        assert_eq!(l.downloads.with_label_values(&["proxy", "false"]).get(), 2);
        let text = prometheus::TextEncoder::new().encode_to_string(&r.gather()).unwrap();
        for want in [
            "gitpod_registry_facade_downstream_manifest_req_seconds_bucket{le=\"0.5\"} 2",
            "gitpod_registry_facade_downstream_blob_req_total 3",
            "gitpod_registry_facade_downstream_blob_req_bytes_total{blobSource=\"proxy\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        // The registry-side speed histogram has no downstream twin.
        assert!(!text.contains("downstream_blob_req_bytes_second"));

        let r = Registry::new();
        let m = UpstreamMetrics::register_with(&r, false).unwrap();
        m.observe("/v2/a/manifests/latest", Some(200), 0.2);
        let text = prometheus::TextEncoder::new().encode_to_string(&r.gather()).unwrap();
        assert!(!text.contains("gitpod_"), "{text}");
    }
}
