//! `ChainMetrics`: where blob bytes come from and how fast the first one goes out — the number
//! containerd's 30 s header and 60 s progress windows are about — plus single-flight joins,
//! upstream retries and digest mismatches. Labels are bounded: `source` is `store` (local
//! content store), `fill` (a single-flight download from the cluster cache or upstream) or
//! `memory` (synthesized config, direct content layers, static files without a store).
//!
//! With the legacy names on (`facade.legacyMetrics`, the default), the same observations also
//! feed the Go facade's `gitpod_registry_facade_registry_blob_req_{dl_total,bytes_total,
//! bytes_second}` series, so dashboards built on them keep working during a migration. Their
//! `blobSource` label maps our sources honestly (docs/migration.md): `store` → `blobstore`,
//! `fill` → `proxy` (a single-flight download, whether its bytes come from upstream or from
//! another node through IPFS), `memory` → `config` (the synthesized config, and direct
//! content layers, which the Go facade counted as `composite`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::Stream;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, exponential_buckets,
};

/// Where a response's bytes are read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The local content store.
    Store,
    /// A single-flight fill.
    Fill,
    /// Bytes in memory.
    Memory,
}

impl Source {
    const ALL: [Source; 3] = [Source::Store, Source::Fill, Source::Memory];

    fn label(self) -> &'static str {
        match self {
            Source::Store => "store",
            Source::Fill => "fill",
            Source::Memory => "memory",
        }
    }

    /// The Go facade's `blobSource` value for this source.
    fn legacy_label(self) -> &'static str {
        match self {
            Source::Store => "blobstore",
            Source::Fill => "proxy",
            Source::Memory => "config",
        }
    }
}

/// The Go facade's blob series (`gitpod_registry_facade_registry_blob_req_*`), kept under their
/// old names, kinds, buckets and labels for dashboards that query them.
#[derive(Clone, Debug)]
struct LegacyBlobMetrics {
    /// `blob_req_dl_total{blobSource,ok}`: blob bodies served, `ok="false"` when one failed or
    /// the client went away before its last byte.
    downloads: IntCounterVec,
    /// `blob_req_bytes_total{blobSource}`: counted as the bytes go out (the Go facade added a
    /// body's bytes when it was complete).
    bytes: IntCounterVec,
    /// `blob_req_bytes_second{blobSource}`: one observation per complete body.
    speed: HistogramVec,
}

const LEGACY_PREFIX: &str = "gitpod_registry_facade_registry_";

impl LegacyBlobMetrics {
    fn new() -> prometheus::Result<Self> {
        let m = LegacyBlobMetrics {
            downloads: IntCounterVec::new(
                Opts::new(format!("{LEGACY_PREFIX}blob_req_dl_total"), "number of blob download requests"),
                &["blobSource", "ok"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(format!("{LEGACY_PREFIX}blob_req_bytes_total"), "amount of blob bytes downloaded"),
                &["blobSource"],
            )?,
            speed: HistogramVec::new(
                HistogramOpts::new(
                    format!("{LEGACY_PREFIX}blob_req_bytes_second"),
                    "blob download speed in bytes per second",
                )
                .buckets(exponential_buckets(1024.0 * 1024.0, 2.0, 15)?),
                &["blobSource"],
            )?,
        };
        for s in Source::ALL {
            let l = s.legacy_label();
            m.bytes.with_label_values(&[l]);
            m.speed.with_label_values(&[l]);
            for ok in ["true", "false"] {
                m.downloads.with_label_values(&[l, ok]);
            }
        }
        Ok(m)
    }

    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.downloads.clone()))?;
        registry.register(Box::new(self.bytes.clone()))?;
        registry.register(Box::new(self.speed.clone()))
    }
}

/// Why a fill asked upstream again.
#[derive(Clone, Copy, Debug)]
pub enum RetryReason {
    /// The body broke (reset, stall, short) and is resumed at its offset.
    Body,
    /// The request itself failed (connect, 5xx, 429).
    Request,
}

/// The chain's metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ChainMetrics {
    first_byte: HistogramVec,
    bytes: IntCounterVec,
    outcomes: IntCounterVec,
    joins: IntCounter,
    fills: IntGauge,
    inflight_bytes: IntGauge,
    retries: IntCounterVec,
    mismatches: IntCounterVec,
    legacy: Option<LegacyBlobMetrics>,
}

impl ChainMetrics {
    /// Creates the metrics, the Go facade's legacy blob series included, and registers them
    /// into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Self::register_with(registry, true)
    }

    /// [`ChainMetrics::register`], with the legacy series only when `legacy` is set
    /// (`facade.legacyMetrics`).
    pub fn register_with(registry: &Registry, legacy: bool) -> prometheus::Result<Self> {
        let mut m = Self::unregistered_inner()?;
        if legacy {
            let l = LegacyBlobMetrics::new()?;
            l.register(registry)?;
            m.legacy = Some(l);
        }
        registry.register(Box::new(m.first_byte.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.outcomes.clone()))?;
        registry.register(Box::new(m.joins.clone()))?;
        registry.register(Box::new(m.fills.clone()))?;
        registry.register(Box::new(m.inflight_bytes.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.mismatches.clone()))?;
        Ok(m)
    }

    fn unregistered_inner() -> prometheus::Result<Self> {
        let m = ChainMetrics {
            first_byte: HistogramVec::new(
                HistogramOpts::new(
                    "registry_facade_blob_first_byte_seconds",
                    "Time from opening a blob source to its first byte being ready",
                )
                .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                &["source"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new("registry_facade_blob_bytes_total", "Blob bytes handed to responses, by source"),
                &["source"],
            )?,
            outcomes: IntCounterVec::new(
                Opts::new(
                    "registry_facade_blob_source_requests_total",
                    "Blob reads by source and how they ended (ok, error, cancelled)",
                ),
                &["source", "outcome"],
            )?,
            joins: IntCounter::new(
                "registry_facade_singleflight_joins_total",
                "Blob requests that joined a download already under way instead of starting one",
            )?,
            fills: IntGauge::new("registry_facade_inflight_fills", "Single-flight blob downloads under way")?,
            inflight_bytes: IntGauge::new(
                "registry_facade_inflight_blob_bytes",
                "Blob bytes still to be sent by the responses under way",
            )?,
            retries: IntCounterVec::new(
                Opts::new("registry_facade_upstream_retries_total", "Upstream blob requests repeated or resumed"),
                &["reason"],
            )?,
            mismatches: IntCounterVec::new(
                Opts::new(
                    "registry_facade_digest_mismatches_total",
                    "Downloads whose bytes did not match their digest (discarded, never cached)",
                ),
                &["source"],
            )?,
            legacy: None,
        };
        for s in ["store", "fill", "memory"] {
            m.bytes.with_label_values(&[s]);
            for o in ["ok", "error", "cancelled"] {
                m.outcomes.with_label_values(&[s, o]);
            }
        }
        for r in ["body", "request"] {
            m.retries.with_label_values(&[r]);
        }
        for s in ["upstream", "cluster"] {
            m.mismatches.with_label_values(&[s]);
        }
        Ok(m)
    }

    /// Metrics that go nowhere (components built without a registry).
    pub fn unregistered() -> Self {
        // Creating metrics with fixed valid names and labels cannot fail.
        #[allow(clippy::expect_used)]
        Self::unregistered_inner().expect("static metric definitions are valid")
    }

    pub(crate) fn joined(&self) {
        self.joins.inc();
    }

    pub(crate) fn fill_started(&self) {
        self.fills.inc();
    }

    pub(crate) fn fill_ended(&self) {
        self.fills.dec();
    }

    pub(crate) fn retry(&self, reason: RetryReason) {
        let r = match reason {
            RetryReason::Body => "body",
            RetryReason::Request => "request",
        };
        self.retries.with_label_values(&[r]).inc();
    }

    pub(crate) fn mismatch(&self, from_cluster: bool) {
        self.mismatches.with_label_values(&[if from_cluster { "cluster" } else { "upstream" }]).inc();
    }

    /// Wraps a response stream of `len` bytes so its first byte, bytes and outcome are counted.
    /// It is `ok` once all `len` bytes went out (the server stops polling then), `cancelled` when
    /// dropped before, `error` when it failed.
    pub fn meter<S>(&self, source: Source, len: u64, inner: S) -> Metered<S> {
        self.inflight_bytes.add(i64::try_from(len).unwrap_or(i64::MAX));
        Metered {
            inner,
            metrics: self.clone(),
            source,
            opened: Instant::now(),
            first: true,
            done: false,
            left: len,
            sent: 0,
        }
    }

    fn legacy_bytes(&self, source: Source, n: u64) {
        if let Some(l) = &self.legacy {
            l.bytes.with_label_values(&[source.legacy_label()]).inc_by(n);
        }
    }

    /// A body ended: `ok` after its last byte, else failed or cancelled.
    fn legacy_done(&self, source: Source, ok: bool, sent: u64, opened: Instant) {
        let Some(l) = &self.legacy else { return };
        let label = source.legacy_label();
        l.downloads.with_label_values(&[label, if ok { "true" } else { "false" }]).inc();
        if ok {
            // A body from memory can take no measurable time; a floor keeps the rate finite.
            let seconds = opened.elapsed().as_secs_f64().max(1e-6);
            l.speed.with_label_values(&[label]).observe(sent as f64 / seconds);
        }
    }
}

/// A counted blob stream; see [`ChainMetrics::meter`].
pub struct Metered<S> {
    inner: S,
    metrics: ChainMetrics,
    source: Source,
    opened: Instant,
    first: bool,
    done: bool,
    left: u64,
    sent: u64,
}

impl<S: Stream<Item = std::io::Result<Bytes>> + Unpin> Stream for Metered<S> {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        let label = self.source.label();
        match &polled {
            Poll::Ready(Some(Ok(b))) => {
                if self.first {
                    self.first = false;
                    self.metrics.first_byte.with_label_values(&[label]).observe(self.opened.elapsed().as_secs_f64());
                }
                self.metrics.bytes.with_label_values(&[label]).inc_by(b.len() as u64);
                self.metrics.legacy_bytes(self.source, b.len() as u64);
                self.sent += b.len() as u64;
                let sent = (b.len() as u64).min(self.left);
                self.metrics.inflight_bytes.sub(i64::try_from(sent).unwrap_or(i64::MAX));
                self.left -= sent;
                if self.left == 0 && !self.done {
                    self.done = true;
                    self.metrics.outcomes.with_label_values(&[label, "ok"]).inc();
                    self.metrics.legacy_done(self.source, true, self.sent, self.opened);
                }
            }
            Poll::Ready(Some(Err(_))) if !self.done => {
                self.done = true;
                self.metrics.outcomes.with_label_values(&[label, "error"]).inc();
                self.metrics.legacy_done(self.source, false, self.sent, self.opened);
            }
            Poll::Ready(None) if !self.done => {
                self.done = true;
                self.metrics.outcomes.with_label_values(&[label, "ok"]).inc();
                self.metrics.legacy_done(self.source, true, self.sent, self.opened);
            }
            _ => {}
        }
        polled
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        self.metrics.inflight_bytes.sub(i64::try_from(self.left).unwrap_or(i64::MAX));
        if !self.done {
            self.metrics.outcomes.with_label_values(&[self.source.label(), "cancelled"]).inc();
            self.metrics.legacy_done(self.source, false, self.sent, self.opened);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn counts_bytes_first_byte_and_outcomes() {
        let r = Registry::new();
        let m = ChainMetrics::register(&r).unwrap();
        let s = futures::stream::iter(vec![Ok(Bytes::from_static(b"abc")), Ok(Bytes::from_static(b"de"))]);
        let got: Vec<_> = m.meter(Source::Store, 5, s).collect().await;
        assert_eq!(got.len(), 2);
        assert_eq!(m.bytes.with_label_values(&["store"]).get(), 5);
        assert_eq!(m.outcomes.with_label_values(&["store", "ok"]).get(), 1);
        assert_eq!(m.first_byte.with_label_values(&["store"]).get_sample_count(), 1);
        assert_eq!(m.inflight_bytes.get(), 0);

        let s = futures::stream::iter(vec![Ok(Bytes::from_static(b"x")), Ok(Bytes::from_static(b"y"))]);
        let mut metered = m.meter(Source::Fill, 2, s);
        let _ = metered.next().await;
        assert_eq!(m.inflight_bytes.get(), 1);
        drop(metered);
        assert_eq!(m.inflight_bytes.get(), 0);
        assert_eq!(m.outcomes.with_label_values(&["fill", "cancelled"]).get(), 1);

        let s = futures::stream::iter(vec![Err(std::io::Error::other("boom"))]);
        let _: Vec<_> = m.meter(Source::Memory, 1, s).collect().await;
        assert_eq!(m.outcomes.with_label_values(&["memory", "error"]).get(), 1);
    }

    #[tokio::test]
    async fn feeds_the_legacy_series_under_their_go_names() {
        let r = Registry::new();
        let m = ChainMetrics::register(&r).unwrap();
        let s = futures::stream::iter(vec![Ok(Bytes::from_static(b"abc")), Ok(Bytes::from_static(b"de"))]);
        let _: Vec<_> = m.meter(Source::Store, 5, s).collect().await;
        let s = futures::stream::iter(vec![Ok(Bytes::from_static(b"x")), Ok(Bytes::from_static(b"y"))]);
        let mut cut = m.meter(Source::Fill, 2, s);
        let _ = cut.next().await;
        drop(cut);
        let s = futures::stream::iter(vec![Err(std::io::Error::other("boom"))]);
        let _: Vec<_> = m.meter(Source::Memory, 1, s).collect().await;

        let l = m.legacy.as_ref().unwrap();
        assert_eq!(l.downloads.with_label_values(&["blobstore", "true"]).get(), 1);
        assert_eq!(l.downloads.with_label_values(&["proxy", "false"]).get(), 1);
        assert_eq!(l.downloads.with_label_values(&["config", "false"]).get(), 1);
        assert_eq!(l.bytes.with_label_values(&["blobstore"]).get(), 5);
        assert_eq!(l.bytes.with_label_values(&["proxy"]).get(), 1);
        assert_eq!(l.speed.with_label_values(&["blobstore"]).get_sample_count(), 1);
        assert_eq!(l.speed.with_label_values(&["proxy"]).get_sample_count(), 0);

        let text = prometheus::TextEncoder::new().encode_to_string(&r.gather()).unwrap();
        for want in [
            r#"gitpod_registry_facade_registry_blob_req_dl_total{blobSource="blobstore",ok="true"} 1"#,
            r#"gitpod_registry_facade_registry_blob_req_bytes_total{blobSource="blobstore"} 5"#,
            r#"gitpod_registry_facade_registry_blob_req_bytes_second_bucket{blobSource="blobstore",le="1048576"}"#,
            r#"gitpod_registry_facade_registry_blob_req_bytes_second_bucket{blobSource="blobstore",le="17179869184"}"#,
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        // 1 MiB × 2^k for k = 0..15: the 16th bound is not there.
        assert!(!text.contains(r#"le="34359738368""#));
    }

    #[test]
    fn legacy_series_can_be_turned_off() {
        let r = Registry::new();
        let m = ChainMetrics::register_with(&r, false).unwrap();
        assert!(m.legacy.is_none());
        let text = prometheus::TextEncoder::new().encode_to_string(&r.gather()).unwrap();
        assert!(!text.contains("gitpod_"), "{text}");
        assert!(text.contains("registry_facade_blob_bytes_total"));
    }
}
