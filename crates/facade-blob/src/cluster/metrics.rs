//! Cache and cluster metrics. Labels are bounded (cache, result, store, outcome, dependency):
//! never a digest, CID, workspace id or address — those go to logs.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::error::{Error, Result};

/// Which cache a lookup asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheName {
    /// The node-local store.
    Local,
    /// The cluster cache (Redis index over IPFS).
    Cluster,
}

/// What a cache lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupResult {
    /// The cache had it.
    Hit,
    /// The cache answered and did not have it.
    Miss,
    /// The cache did not answer (down, slow, garbage, or skipped by its breaker).
    Error,
}

/// Which store a back-fill wrote to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackfillStore {
    /// The node-local store.
    Local,
    /// IPFS plus the Redis index entry.
    Ipfs,
}

/// How a back-fill ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackfillOutcome {
    /// Stored.
    Ok,
    /// Tried and failed (nothing wrong was stored).
    Failed,
    /// Not needed or not possible (the blob came from there, or the dependency is down).
    Skipped,
}

/// Cache lookups, back-fills and the cluster dependencies' health.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    lookups: IntCounterVec,
    backfill: IntCounterVec,
    up: IntGaugeVec,
    failures: IntCounterVec,
    unpinned: IntCounterVec,
    pinned_bytes: IntGauge,
}

/// Why a pin was removed from IPFS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnpinReason {
    /// Its index entry is gone: expired (TTL), evicted by Redis, or removed.
    Unindexed,
    /// Its index entry now names another CID.
    Replaced,
    /// The pinned bytes were over `facade.clusterIPFSMaxBytes`; it was used least recently.
    Budget,
}

impl UnpinReason {
    fn label(self) -> &'static str {
        match self {
            UnpinReason::Unindexed => "unindexed",
            UnpinReason::Replaced => "replaced",
            UnpinReason::Budget => "budget",
        }
    }
}

/// The health metrics of one dependency, handed to its breaker.
#[derive(Clone, Debug)]
pub struct DependencyMetrics {
    up: IntGauge,
    failures: IntCounter,
}

fn metric_error(name: &'static str, source: prometheus::Error) -> Error {
    Error::Metrics { name, source }
}

impl ClusterMetrics {
    /// Creates the metrics and registers them in `registry`. Every label combination is created
    /// at zero, so dashboards see the series before the first event.
    pub fn register(registry: &Registry) -> Result<Self> {
        let m = Self::new()?;
        for (name, c) in [
            (
                "registry_facade_cache_lookups_total",
                Box::new(m.lookups.clone()) as Box<dyn prometheus::core::Collector>,
            ),
            ("registry_facade_backfill_total", Box::new(m.backfill.clone())),
            ("registry_facade_cluster_dependency_up", Box::new(m.up.clone())),
            ("registry_facade_cluster_dependency_failures_total", Box::new(m.failures.clone())),
            ("registry_facade_ipfs_unpinned_total", Box::new(m.unpinned.clone())),
            ("registry_facade_ipfs_pinned_bytes", Box::new(m.pinned_bytes.clone())),
        ] {
            registry.register(c).map_err(|e| metric_error(name, e))?;
        }
        Ok(m)
    }

    /// Metrics registered nowhere (tests, or a chain built without a registry).
    pub fn unregistered() -> Self {
        // Construction fails only for invalid metric names or label sets, and these are constants
        // covered by the tests: it cannot fail at run time.
        #[allow(clippy::expect_used)]
        Self::new().expect("constant metric definitions are valid")
    }

    fn new() -> Result<Self> {
        let lookups = IntCounterVec::new(
            Opts::new("registry_facade_cache_lookups_total", "Blob cache lookups by cache and result"),
            &["cache", "result"],
        )
        .map_err(|e| metric_error("registry_facade_cache_lookups_total", e))?;
        let backfill = IntCounterVec::new(
            Opts::new("registry_facade_backfill_total", "Back-fills of served blobs into faster stores"),
            &["store", "outcome"],
        )
        .map_err(|e| metric_error("registry_facade_backfill_total", e))?;
        let up = IntGaugeVec::new(
            Opts::new(
                "registry_facade_cluster_dependency_up",
                "1 while a cluster dependency answers, 0 during an outage",
            ),
            &["dependency"],
        )
        .map_err(|e| metric_error("registry_facade_cluster_dependency_up", e))?;
        let failures = IntCounterVec::new(
            Opts::new(
                "registry_facade_cluster_dependency_failures_total",
                "Failed or timed-out calls to a cluster dependency",
            ),
            &["dependency"],
        )
        .map_err(|e| metric_error("registry_facade_cluster_dependency_failures_total", e))?;
        let unpinned = IntCounterVec::new(
            Opts::new("registry_facade_ipfs_unpinned_total", "IPFS pins removed, by reason"),
            &["reason"],
        )
        .map_err(|e| metric_error("registry_facade_ipfs_unpinned_total", e))?;
        let pinned_bytes = IntGauge::new(
            "registry_facade_ipfs_pinned_bytes",
            "Bytes of the blobs pinned on this facade's IPFS node, as its last pin sweep counted them",
        )
        .map_err(|e| metric_error("registry_facade_ipfs_pinned_bytes", e))?;
        for reason in [UnpinReason::Unindexed, UnpinReason::Replaced, UnpinReason::Budget] {
            unpinned.with_label_values(&[reason.label()]);
        }
        for cache in ["local", "cluster"] {
            for result in ["hit", "miss", "error"] {
                lookups.with_label_values(&[cache, result]);
            }
        }
        for store in ["local", "ipfs"] {
            for outcome in ["ok", "failed", "skipped"] {
                backfill.with_label_values(&[store, outcome]);
            }
        }
        Ok(ClusterMetrics { lookups, backfill, up, failures, unpinned, pinned_bytes })
    }

    /// Counts one lookup.
    pub fn lookup(&self, cache: CacheName, result: LookupResult) {
        let cache = match cache {
            CacheName::Local => "local",
            CacheName::Cluster => "cluster",
        };
        let result = match result {
            LookupResult::Hit => "hit",
            LookupResult::Miss => "miss",
            LookupResult::Error => "error",
        };
        self.lookups.with_label_values(&[cache, result]).inc();
    }

    /// Counts one back-fill.
    pub fn backfill(&self, store: BackfillStore, outcome: BackfillOutcome) {
        let store = match store {
            BackfillStore::Local => "local",
            BackfillStore::Ipfs => "ipfs",
        };
        let outcome = match outcome {
            BackfillOutcome::Ok => "ok",
            BackfillOutcome::Failed => "failed",
            BackfillOutcome::Skipped => "skipped",
        };
        self.backfill.with_label_values(&[store, outcome]).inc();
    }

    /// Counts one removed pin.
    pub fn unpinned(&self, reason: UnpinReason) {
        self.unpinned.with_label_values(&[reason.label()]).inc();
    }

    /// Sets the pinned-bytes gauge.
    pub fn set_pinned_bytes(&self, bytes: u64) {
        self.pinned_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The current value of an unpin counter (for tests).
    pub fn unpinned_value(&self, reason: UnpinReason) -> u64 {
        self.unpinned.with_label_values(&[reason.label()]).get()
    }

    /// The pinned-bytes gauge's value (for tests).
    pub fn pinned_bytes_value(&self) -> i64 {
        self.pinned_bytes.get()
    }

    /// The health metrics of `dependency` (`redis` or `ipfs`).
    pub fn dependency(&self, dependency: &'static str) -> DependencyMetrics {
        DependencyMetrics {
            up: self.up.with_label_values(&[dependency]),
            failures: self.failures.with_label_values(&[dependency]),
        }
    }

    /// The current value of a lookup counter (for tests and the bench).
    pub fn lookups_value(&self, cache: &str, result: &str) -> u64 {
        self.lookups.with_label_values(&[cache, result]).get()
    }

    /// The current value of a back-fill counter (for tests and the bench).
    pub fn backfill_value(&self, store: &str, outcome: &str) -> u64 {
        self.backfill.with_label_values(&[store, outcome]).get()
    }
}

impl DependencyMetrics {
    /// Metrics of one dependency registered nowhere (tests).
    pub fn unregistered(dependency: &'static str) -> Self {
        ClusterMetrics::unregistered().dependency(dependency)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub(crate) fn failed(&self) {
        self.failures.inc();
    }

    /// The gauge's value.
    pub fn up_value(&self) -> i64 {
        self.up.get()
    }

    /// The failure counter's value.
    pub fn failures_value(&self) -> u64 {
        self.failures.get()
    }
}
