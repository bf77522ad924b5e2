//! Lanes of the blocking pool: each class of blocking work (blob file reads, spool writes, store
//! commits, housekeeping) runs under its own permit count, so no class can take every blocking
//! thread from the others. One pool served them all before, and a burst of cold fills (spool
//! writes) or a long eviction pass queued every warm read behind them.
//!
//! The lanes are process-wide, like the pool they divide: the binary sizes the runtime's
//! `max_blocking_threads` to cover [`LaneSizes::threads`] plus the work that has no lane here
//! (bcrypt, file polls, static layer hashing), so a task holding a lane permit always finds a
//! thread. [`configure`] sets the sizes and the wait metric; without it the defaults apply and
//! nothing is measured (unit tests, tools).

use std::sync::{Arc, RwLock};
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, Registry, exponential_buckets};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// A class of blocking work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Reads of blob files (stored blobs, fills in progress, static layers) for responses.
    Reads,
    /// Writes and hashing of downloaded bytes into spool files.
    SpoolWrites,
    /// Syncs and renames of verified spools into the store.
    Commits,
    /// Store eviction passes and other background upkeep.
    Housekeeping,
}

impl Lane {
    /// Every lane, in the order of [`LaneSizes`].
    pub const ALL: [Lane; 4] = [Lane::Reads, Lane::SpoolWrites, Lane::Commits, Lane::Housekeeping];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Reads => "reads",
            Lane::SpoolWrites => "spool_writes",
            Lane::Commits => "commits",
            Lane::Housekeeping => "housekeeping",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Blocking tasks each lane may run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneSizes {
    /// [`Lane::Reads`]: the warm path; 16 was the whole pool before and kept 16 concurrent
    /// pulls at full speed on the bench.
    pub reads: usize,
    /// [`Lane::SpoolWrites`]: one write at a time per fill, so this many fills write at once.
    pub spool_writes: usize,
    /// [`Lane::Commits`]: fsync-bound; a few suffice.
    pub commits: usize,
    /// [`Lane::Housekeeping`]: eviction passes.
    pub housekeeping: usize,
}

impl Default for LaneSizes {
    fn default() -> Self {
        LaneSizes { reads: 16, spool_writes: 8, commits: 4, housekeeping: 2 }
    }
}

impl LaneSizes {
    fn of(&self, lane: Lane) -> usize {
        match lane {
            Lane::Reads => self.reads,
            Lane::SpoolWrites => self.spool_writes,
            Lane::Commits => self.commits,
            Lane::Housekeeping => self.housekeeping,
        }
    }

    /// Blocking threads the lanes can occupy together.
    pub fn threads(&self) -> usize {
        Lane::ALL.iter().map(|l| self.of(*l).max(1)).sum()
    }
}

/// `registry_facade_blocking_wait_seconds{lane}`: how long blocking work waited for its lane.
#[derive(Clone, Debug)]
pub struct BlockingMetrics {
    wait: HistogramVec,
}

impl BlockingMetrics {
    /// Registers the series into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let wait = HistogramVec::new(
            HistogramOpts::new(
                "registry_facade_blocking_wait_seconds",
                "Time blocking work (blob reads, spool writes, commits, housekeeping) waited for a permit of its lane",
            )
            .buckets(exponential_buckets(0.000_1, 4.0, 10)?),
            &["lane"],
        )?;
        registry.register(Box::new(wait.clone()))?;
        for lane in Lane::ALL {
            wait.with_label_values(&[lane.label()]);
        }
        Ok(BlockingMetrics { wait })
    }
}

struct Lanes {
    permits: [Arc<Semaphore>; 4],
    metrics: Option<BlockingMetrics>,
}

impl Lanes {
    fn new(sizes: LaneSizes, metrics: Option<BlockingMetrics>) -> Lanes {
        let permits = Lane::ALL.map(|l| Arc::new(Semaphore::new(sizes.of(l).max(1))));
        Lanes { permits, metrics }
    }
}

static LANES: RwLock<Option<Arc<Lanes>>> = RwLock::new(None);

fn lanes() -> Arc<Lanes> {
    if let Some(l) = LANES.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return l.clone();
    }
    let mut slot = LANES.write().unwrap_or_else(|e| e.into_inner());
    slot.get_or_insert_with(|| Arc::new(Lanes::new(LaneSizes::default(), None))).clone()
}

/// Sets the lane sizes and where waits are recorded. Work already queued keeps the lanes it
/// was queued on.
pub fn configure(sizes: LaneSizes, metrics: Option<BlockingMetrics>) {
    *LANES.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Lanes::new(sizes, metrics)));
}

/// Runs `f` on the blocking pool under `lane`'s permits: like `tokio::task::spawn_blocking`,
/// and like it, dropping the handle does not stop the work. With a free permit the task goes
/// to the pool at once; else a small async task waits for one (the queue this lane's metric
/// measures), so the waiting never holds a blocking thread.
pub fn spawn<F, T>(lane: Lane, f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let lanes = lanes();
    let sem = lanes.permits[lane.index()].clone();
    let observe = move |secs: f64| {
        if let Some(m) = &lanes.metrics {
            m.wait.with_label_values(&[lane.label()]).observe(secs);
        }
    };
    if let Ok(permit) = sem.clone().try_acquire_owned() {
        observe(0.0);
        return tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        });
    }
    let asked = Instant::now();
    tokio::spawn(async move {
        // The semaphore is never closed, so acquiring only fails if it were; run anyway then.
        let permit = sem.acquire_owned().await.ok();
        observe(asked.elapsed().as_secs_f64());
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        });
        match task.await {
            Ok(v) => v,
            // Surfaces the work's panic (or the runtime's shutdown) through this task's handle,
            // as a plain `spawn_blocking` handle would.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("blocking task of lane {} did not run: {e}", lane.label()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// One process-wide setting: tests that configure lanes run one at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_lane_does_not_hold_up_another_lane() {
        let _serial = SERIAL.lock().await;
        let registry = Registry::new();
        let metrics = BlockingMetrics::register(&registry).unwrap();
        configure(LaneSizes { reads: 2, spool_writes: 1, commits: 1, housekeeping: 1 }, Some(metrics));
        // Fill the spool-write lane with work that waits for a release.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let running = Arc::new(AtomicUsize::new(0));
        let writers: Vec<_> = (0..3)
            .map(|_| {
                let (rx, running) = (release_rx.clone(), running.clone());
                spawn(Lane::SpoolWrites, move || {
                    running.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(30));
                })
            })
            .collect();
        test_support::wait::until_async("a spool write running", Duration::from_secs(10), || {
            let running = running.clone();
            async move { running.load(Ordering::SeqCst) == 1 }
        })
        .await;
        // Reads still run while the spool lane is full and has a queue.
        let read = tokio::time::timeout(Duration::from_secs(10), spawn(Lane::Reads, || 42)).await;
        assert_eq!(read.unwrap().unwrap(), 42);
        assert_eq!(running.load(Ordering::SeqCst), 1, "the spool lane ran past its one permit");
        for _ in 0..3 {
            release_tx.send(()).unwrap();
        }
        for w in writers {
            tokio::time::timeout(Duration::from_secs(30), w).await.unwrap().unwrap();
        }
        assert_eq!(running.load(Ordering::SeqCst), 3);
        let text = {
            let mut buf = String::new();
            let families = registry.gather();
            prometheus::TextEncoder::new().encode_utf8(&families, &mut buf).unwrap();
            buf
        };
        let waited = test_support::metrics::value(
            &text,
            "registry_facade_blocking_wait_seconds_count",
            &[("lane", "spool_writes")],
        );
        assert_eq!(waited, 3.0, "{text}");
        configure(LaneSizes::default(), None);
    }

    #[tokio::test]
    async fn a_panic_in_lane_work_reaches_the_handle() {
        let _serial = SERIAL.lock().await;
        configure(LaneSizes { reads: 1, spool_writes: 1, commits: 1, housekeeping: 1 }, None);
        let hold = spawn(Lane::Commits, || std::thread::sleep(Duration::from_millis(50)));
        let queued = spawn(Lane::Commits, || panic!("boom"));
        assert!(queued.await.unwrap_err().is_panic());
        hold.await.unwrap();
        assert!(spawn(Lane::Commits, || panic!("boom")).await.unwrap_err().is_panic());
        configure(LaneSizes::default(), None);
    }

    #[test]
    fn the_lanes_need_their_sum_of_threads() {
        assert_eq!(LaneSizes::default().threads(), 30);
    }
}
