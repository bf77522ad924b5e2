//! Request metrics. Labels are bounded: route, method, status class, abort reason — never a
//! digest, workspace id, repository or URL (those go to logs).
//!
//! With the legacy names on (`facade.legacyMetrics`, the default), requests also feed the Go
//! facade's `gitpod_registry_facade_registry_{manifest_req_seconds,req_failed_total,
//! blob_req_total}` series, for dashboards and alerts written against it (docs/migration.md).

use http::{Method, StatusCode};
use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::auth::AuthFailure;
use crate::error::{Error, Result};
use crate::reload::ReloadCounters;
use crate::router::RouteLabel;

/// Why a response body ended before its `Content-Length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AbortReason {
    /// The backend stream yielded an error.
    SourceError,
    /// The backend stream ended early.
    SourceShort,
    /// The backend stream yielded more than the range.
    SourceOverlong,
    /// The client went away (or the connection was torn down) mid-body.
    ClientGone,
    /// The backend stream yielded nothing for the response idle timeout.
    SourceIdle,
}

impl AbortReason {
    const ALL: [AbortReason; 5] = [
        AbortReason::SourceError,
        AbortReason::SourceShort,
        AbortReason::SourceOverlong,
        AbortReason::ClientGone,
        AbortReason::SourceIdle,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AbortReason::SourceError => "source_error",
            AbortReason::SourceShort => "source_short",
            AbortReason::SourceOverlong => "source_overlong",
            AbortReason::ClientGone => "client_gone",
            AbortReason::SourceIdle => "source_idle",
        }
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limit {
    /// The client address already had `max_requests_per_client` requests in flight.
    ClientConcurrency,
    /// The request URL is longer than `max_url_bytes`.
    UrlLength,
    /// The client address failed too many credential checks lately
    /// (`auth_failures_per_second`), or too many checks were already waiting for the bcrypt
    /// lane.
    AuthFailures,
}

impl Limit {
    const ALL: [Limit; 3] = [Limit::ClientConcurrency, Limit::UrlLength, Limit::AuthFailures];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Limit::ClientConcurrency => "client_concurrency",
            Limit::UrlLength => "url_length",
            Limit::AuthFailures => "auth_failures",
        }
    }
}

/// Why a connection was refused at accept; the `reason` label of
/// `registry_facade_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnRefusal {
    /// The listener already had `max_connections` open.
    MaxConnections,
}

impl ConnRefusal {
    const ALL: [ConnRefusal; 1] = [ConnRefusal::MaxConnections];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConnRefusal::MaxConnections => "max_connections",
        }
    }
}

/// Why the server closed a connection on its own; the `reason` label of
/// `registry_facade_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnClose {
    /// No complete request head within `request_head_timeout` (nothing sent, half a head, an
    /// HTTP/2 preface without a request).
    HeadTimeout,
    /// No request open for `idle_connection_timeout`.
    Idle,
    /// A response waited `response_idle_timeout` for the client to take its next bytes (an
    /// HTTP/2 flow-control window left at zero, or an HTTP/1 client that stopped reading).
    ZeroWindow,
}

impl ConnClose {
    const ALL: [ConnClose; 3] = [ConnClose::HeadTimeout, ConnClose::Idle, ConnClose::ZeroWindow];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConnClose::HeadTimeout => "head_timeout",
            ConnClose::Idle => "idle",
            ConnClose::ZeroWindow => "zero_window",
        }
    }
}

/// The connection series of one listener's accept loop.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionMetrics {
    refused: IntCounterVec,
    closed: IntCounterVec,
    open: IntGauge,
}

impl ConnectionMetrics {
    pub(crate) fn refused(&self, reason: ConnRefusal) {
        self.refused.with_label_values(&[reason.as_str()]).inc();
    }

    pub(crate) fn closed(&self, reason: ConnClose) {
        self.closed.with_label_values(&[reason.as_str()]).inc();
    }

    /// Counts a connection as open until the guard drops.
    pub(crate) fn opened(&self) -> OpenConnectionGuard {
        self.open.inc();
        OpenConnectionGuard(self.open.clone())
    }
}

/// Decrements `registry_facade_open_connections` on drop.
#[derive(Debug)]
pub(crate) struct OpenConnectionGuard(IntGauge);

impl Drop for OpenConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Time-to-headers buckets, in seconds; containerd gives up after 30 s without headers.
const DURATION_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0];

const LEGACY_MANIFEST_SECONDS: &str = "gitpod_registry_facade_registry_manifest_req_seconds";
const LEGACY_FAILED: &str = "gitpod_registry_facade_registry_req_failed_total";
const LEGACY_BLOBS: &str = "gitpod_registry_facade_registry_blob_req_total";

/// The Go facade's request series, under their old names, kinds, buckets and labels.
#[derive(Clone, Debug)]
struct LegacyServerMetrics {
    /// Manifest requests, time to response headers (the Go facade timed its whole handler,
    /// which for a manifest is the same but for the last write).
    manifest_seconds: Histogram,
    /// `type` = `manifest|blob`: answered with a 5xx, or cut after the headers because the
    /// source failed (the Go facade registered this series but never counted into it).
    failed: IntCounterVec,
    /// Blob requests answered, whatever the outcome.
    blobs: IntCounter,
}

impl LegacyServerMetrics {
    fn register(registry: &Registry) -> Result<Self> {
        let manifest_seconds = registered(registry, LEGACY_MANIFEST_SECONDS, |name| {
            Histogram::with_opts(
                HistogramOpts::new(name, "time of manifest requests made to the downstream registry")
                    .buckets(vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0, 300.0, 600.0, 1800.0]),
            )
        })?;
        let failed = counter_vec(registry, LEGACY_FAILED, "number of requests that failed", &["type"])?;
        let blobs = registered(registry, LEGACY_BLOBS, |name| {
            IntCounter::new(name, "number of blob requests made to the downstream registry")
        })?;
        for t in ["manifest", "blob"] {
            failed.with_label_values(&[t]);
        }
        Ok(LegacyServerMetrics { manifest_seconds, failed, blobs })
    }

    /// The `req_failed_total` counter of a route, for the routes the Go facade had.
    fn failed_of(&self, route: RouteLabel) -> Option<IntCounter> {
        match route {
            RouteLabel::Manifest => Some(self.failed.with_label_values(&["manifest"])),
            RouteLabel::Blob => Some(self.failed.with_label_values(&["blob"])),
            _ => None,
        }
    }
}

/// The server's metrics, registered into a registry passed in by the binary.
#[derive(Clone, Debug)]
pub struct ServerMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    inflight: IntGaugeVec,
    aborted: IntCounterVec,
    response_bytes: IntCounterVec,
    auth_failures: IntCounterVec,
    file_reloads: IntCounterVec,
    limited: IntCounterVec,
    connections: ConnectionMetrics,
    legacy: Option<LegacyServerMetrics>,
}

/// The `file` label values of `registry_facade_file_reloads_total`.
const RELOADED_FILES: [&str; 2] = ["tls", "htpasswd"];

impl ServerMetrics {
    /// Creates the metrics, the Go facade's legacy request series included, and registers them
    /// in `registry`. Every route and abort reason is pre-created at zero so dashboards and
    /// alerts see the series before the first event.
    pub fn register(registry: &Registry) -> Result<Self> {
        Self::register_with(registry, true)
    }

    /// [`ServerMetrics::register`], with the legacy series only when `legacy` is set
    /// (`facade.legacyMetrics`).
    pub fn register_with(registry: &Registry, legacy: bool) -> Result<Self> {
        let route = &["route"][..];
        let metrics = ServerMetrics {
            requests: registered(registry, "registry_facade_http_requests_total", |name| {
                IntCounterVec::new(Opts::new(name, "HTTP requests answered"), &["route", "method", "status_class"])
            })?,
            duration: registered(registry, "registry_facade_http_request_duration_seconds", |name| {
                let opts = HistogramOpts::new(name, "Time from request to response headers");
                HistogramVec::new(opts.buckets(DURATION_BUCKETS.to_vec()), route)
            })?,
            inflight: registered(registry, "registry_facade_inflight_requests", |name| {
                IntGaugeVec::new(Opts::new(name, "Requests being answered, until their body is finished"), route)
            })?,
            aborted: counter_vec(
                registry,
                "registry_facade_response_aborted_total",
                "Responses whose body was cut after the headers were sent",
                &["reason"],
            )?,
            response_bytes: counter_vec(
                registry,
                "registry_facade_http_response_bytes_total",
                "Response body bytes sent",
                route,
            )?,
            auth_failures: counter_vec(
                registry,
                "registry_facade_auth_failures_total",
                "Requests refused by requireAuth",
                &["reason"],
            )?,
            file_reloads: counter_vec(
                registry,
                "registry_facade_file_reloads_total",
                "Re-reads of changed TLS or htpasswd files; on error the previous version stays",
                &["file", "outcome"],
            )?,
            limited: counter_vec(
                registry,
                "registry_facade_limited_requests_total",
                "Requests refused by a server limit",
                &["limit"],
            )?,
            connections: ConnectionMetrics {
                refused: counter_vec(
                    registry,
                    "registry_facade_connections_refused_total",
                    "Connections closed at accept because a listener limit was reached",
                    &["reason"],
                )?,
                closed: counter_vec(
                    registry,
                    "registry_facade_connections_closed_total",
                    "Connections the server closed on its own: no request head in time, idle, or a client that took no bytes",
                    &["reason"],
                )?,
                open: registered(registry, "registry_facade_open_connections", |name| {
                    IntGauge::new(name, "Connections open on the registry listener")
                })?,
            },
            legacy: if legacy { Some(LegacyServerMetrics::register(registry)?) } else { None },
        };
        metrics.precreate_series();
        Ok(metrics)
    }

    /// Every route, abort reason, auth failure, limit and reload outcome at zero, so that
    /// dashboards and alerts see the series before the first event.
    fn precreate_series(&self) {
        for route in RouteLabel::ALL {
            let r = route.as_str();
            self.duration.with_label_values(&[r]);
            self.inflight.with_label_values(&[r]);
            self.response_bytes.with_label_values(&[r]);
            for method in ["GET", "HEAD"] {
                self.requests.with_label_values(&[r, method, "2xx"]);
            }
        }
        for reason in AbortReason::ALL {
            self.aborted.with_label_values(&[reason.as_str()]);
        }
        for reason in AuthFailure::ALL {
            self.auth_failures.with_label_values(&[reason.as_str()]);
        }
        for limit in Limit::ALL {
            self.limited.with_label_values(&[limit.as_str()]);
        }
        for reason in ConnRefusal::ALL {
            self.connections.refused.with_label_values(&[reason.as_str()]);
        }
        for reason in ConnClose::ALL {
            self.connections.closed.with_label_values(&[reason.as_str()]);
        }
        for file in RELOADED_FILES {
            for outcome in ["ok", "error"] {
                self.file_reloads.with_label_values(&[file, outcome]);
            }
        }
    }

    pub(crate) fn limited(&self, limit: Limit) {
        self.limited.with_label_values(&[limit.as_str()]).inc();
    }

    /// The connection series, for the registry listener's accept loop.
    pub(crate) fn connections(&self) -> ConnectionMetrics {
        self.connections.clone()
    }

    pub(crate) fn auth_failed(&self, reason: AuthFailure) {
        self.auth_failures.with_label_values(&[reason.as_str()]).inc();
    }

    /// `file` is one of [`RELOADED_FILES`].
    pub(crate) fn reload_counters(&self, file: &'static str) -> ReloadCounters {
        ReloadCounters {
            ok: self.file_reloads.with_label_values(&[file, "ok"]),
            error: self.file_reloads.with_label_values(&[file, "error"]),
        }
    }

    pub(crate) fn observe_response(&self, route: RouteLabel, method: &Method, status: StatusCode, seconds: f64) {
        let r = route.as_str();
        self.requests.with_label_values(&[r, method_label(method), status_class(status)]).inc();
        self.duration.with_label_values(&[r]).observe(seconds);
        if let Some(l) = &self.legacy {
            match route {
                RouteLabel::Manifest => l.manifest_seconds.observe(seconds),
                RouteLabel::Blob => l.blobs.inc(),
                _ => {}
            }
            if status.is_server_error()
                && let Some(failed) = l.failed_of(route)
            {
                failed.inc();
            }
        }
    }

    /// Counts the request as in flight until the guard (moved into the response body) drops.
    pub(crate) fn inflight(&self, route: RouteLabel) -> InflightGuard {
        let gauge = self.inflight.with_label_values(&[route.as_str()]);
        gauge.inc();
        InflightGuard(gauge)
    }

    pub(crate) fn body_meter(&self, route: RouteLabel, inflight: InflightGuard) -> BodyMeter {
        BodyMeter {
            bytes: self.response_bytes.with_label_values(&[route.as_str()]),
            aborted: self.aborted.clone(),
            legacy_failed: self.legacy.as_ref().and_then(|l| l.failed_of(route)),
            _inflight: inflight,
        }
    }
}

/// Creates the metric `name` and registers it; the name is written once, so the one in the
/// error cannot differ from the one registered.
fn registered<M>(
    registry: &Registry,
    name: &'static str,
    create: impl FnOnce(&'static str) -> prometheus::Result<M>,
) -> Result<M>
where
    M: Collector + Clone + 'static,
{
    let metric_error = |source| Error::Metrics { name, source };
    let metric = create(name).map_err(metric_error)?;
    registry.register(Box::new(metric.clone())).map_err(metric_error)?;
    Ok(metric)
}

fn counter_vec(registry: &Registry, name: &'static str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    registered(registry, name, |name| IntCounterVec::new(Opts::new(name, help), labels))
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Decrements the in-flight gauge on drop, whether the response finished, failed or the
/// request future was cancelled.
#[derive(Debug)]
pub(crate) struct InflightGuard(IntGauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per-response counters carried by the body.
#[derive(Debug)]
pub(crate) struct BodyMeter {
    bytes: IntCounter,
    aborted: IntCounterVec,
    legacy_failed: Option<IntCounter>,
    _inflight: InflightGuard,
}

impl BodyMeter {
    pub(crate) fn sent(&self, n: usize) {
        self.bytes.inc_by(n as u64);
    }

    pub(crate) fn aborted(&self, reason: AbortReason) {
        self.aborted.with_label_values(&[reason.as_str()]).inc();
        // A client that went away is not a failure of ours.
        if reason != AbortReason::ClientGone
            && let Some(failed) = &self.legacy_failed
        {
            failed.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_series_up_front() {
        let registry = Registry::new();
        let _m = ServerMetrics::register(&registry).unwrap();
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        for name in [
            "registry_facade_http_requests_total",
            "registry_facade_http_request_duration_seconds",
            "registry_facade_inflight_requests",
            "registry_facade_response_aborted_total",
            "registry_facade_http_response_bytes_total",
            "registry_facade_auth_failures_total",
            "registry_facade_file_reloads_total",
            "registry_facade_limited_requests_total",
            "registry_facade_connections_refused_total",
            "registry_facade_connections_closed_total",
            "registry_facade_open_connections",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        assert!(ServerMetrics::register(&registry).is_err(), "double registration must fail");
    }

    #[test]
    fn feeds_the_legacy_series_and_can_leave_them_out() {
        let registry = Registry::new();
        let m = ServerMetrics::register(&registry).unwrap();
        m.observe_response(RouteLabel::Manifest, &Method::GET, StatusCode::OK, 0.2);
        m.observe_response(RouteLabel::Manifest, &Method::GET, StatusCode::SERVICE_UNAVAILABLE, 0.3);
        m.observe_response(RouteLabel::Manifest, &Method::GET, StatusCode::NOT_FOUND, 0.01);
        m.observe_response(RouteLabel::Blob, &Method::GET, StatusCode::OK, 0.01);
        m.observe_response(RouteLabel::Blob, &Method::HEAD, StatusCode::OK, 0.01);
        let meter = m.body_meter(RouteLabel::Blob, m.inflight(RouteLabel::Blob));
        meter.aborted(AbortReason::SourceError);
        meter.aborted(AbortReason::ClientGone);
        let l = m.legacy.as_ref().unwrap();
        assert_eq!(l.manifest_seconds.get_sample_count(), 3);
        assert_eq!(l.failed.with_label_values(&["manifest"]).get(), 1);
        assert_eq!(l.failed.with_label_values(&["blob"]).get(), 1);
        assert_eq!(l.blobs.get(), 2);
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        for want in [
            "gitpod_registry_facade_registry_manifest_req_seconds_bucket{le=\"1800\"} 3",
            "gitpod_registry_facade_registry_req_failed_total{type=\"blob\"} 1",
            "gitpod_registry_facade_registry_blob_req_total 2",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }

        let registry = Registry::new();
        let m = ServerMetrics::register_with(&registry, false).unwrap();
        m.observe_response(RouteLabel::Manifest, &Method::GET, StatusCode::OK, 0.2);
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        assert!(!text.contains("gitpod_"), "{text}");
    }

    #[test]
    fn status_classes_are_bounded() {
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::TEMPORARY_REDIRECT), "3xx");
        assert_eq!(status_class(StatusCode::RANGE_NOT_SATISFIABLE), "4xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
