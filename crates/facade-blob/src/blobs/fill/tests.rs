//! The fill driven by scripted origins and a scripted cluster, in process: join, resume, the
//! resume budget, the IPFS → origin hand-over, cancellation and deadlines (paused time).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use facade_oci::{Digest, RepoName};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use super::*;
use crate::blobs::read::file_range_stream;

fn data(n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>())
}

fn from() -> UpstreamBlob {
    UpstreamBlob { registry: "registry.test".into(), repo: RepoName::parse("team/base").unwrap() }
}

fn reset() -> facade_upstream::Error {
    facade_upstream::Error::Transport { host: "registry.test".into(), source: "connection reset".into() }
}

/// What the scripted origin does on one open.
#[derive(Clone)]
enum Step {
    /// Serves from the offset asked for, in chunks of `chunk`, breaking after `cut` bytes.
    Serve { chunk: usize, cut: Option<usize> },
    /// Fails the request.
    Fail(fn() -> facade_upstream::Error),
    /// Answers the headers, then never a byte.
    Hang,
    /// One byte every `every`, forever (and past the end: a source that never ends).
    Trickle(Duration),
    /// Announces another total size.
    Lie(u64),
    /// Serves other bytes of the right length.
    Garbage,
    /// Serves from the offset asked for, `chunk` bytes every `every`: slow but steady.
    Pace { chunk: usize, every: Duration },
}

struct Scripted {
    data: Bytes,
    steps: Vec<Step>,
    opens: std::sync::Mutex<Vec<u64>>,
    /// Set when a body the origin handed out was dropped before its end.
    dropped: Arc<AtomicBool>,
}

impl Scripted {
    fn new(data: Bytes, steps: Vec<Step>) -> Arc<Self> {
        Arc::new(Scripted { data, steps, opens: Default::default(), dropped: Default::default() })
    }

    fn opens(&self) -> Vec<u64> {
        self.opens.lock().unwrap().clone()
    }
}

/// Flags its body's drop.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Origin for Scripted {
    fn open<'a>(
        &'a self,
        _from: &'a UpstreamBlob,
        _digest: &'a Digest,
        offset: u64,
    ) -> BoxFuture<'a, facade_upstream::Result<facade_upstream::BlobStream>> {
        Box::pin(async move {
            let n = {
                let mut opens = self.opens.lock().unwrap();
                opens.push(offset);
                opens.len() - 1
            };
            let step = self.steps.get(n).or(self.steps.last()).cloned().unwrap();
            let total = self.data.len() as u64;
            let rest = self.data.slice(offset as usize..);
            let flag = DropFlag(self.dropped.clone());
            let body: BoxStream<'static, facade_upstream::Result<Bytes>> = match step {
                Step::Fail(e) => return Err(e()),
                Step::Lie(size) => {
                    return Ok(facade_upstream::BlobStream {
                        total_size: Some(size),
                        offset,
                        body: futures::stream::empty().boxed(),
                    });
                }
                Step::Serve { chunk, cut } => {
                    let end = cut.map_or(rest.len(), |c| c.min(rest.len()));
                    let chunks: Vec<_> =
                        (0..end).step_by(chunk).map(|i| Ok(rest.slice(i..(i + chunk).min(end)))).collect();
                    let broken = cut.is_some_and(|c| c < rest.len());
                    let tail = broken.then(reset).map(Err);
                    futures::stream::iter(chunks).chain(futures::stream::iter(tail)).boxed()
                }
                Step::Garbage => futures::stream::iter(vec![Ok(Bytes::from(vec![0u8; rest.len()]))]).boxed(),
                Step::Hang => futures::stream::pending().boxed(),
                Step::Pace { chunk, every } => {
                    let chunks: Vec<Bytes> =
                        (0..rest.len()).step_by(chunk).map(|i| rest.slice(i..(i + chunk).min(rest.len()))).collect();
                    futures::stream::iter(chunks)
                        .then(move |c| async move {
                            tokio::time::sleep(every).await;
                            Ok(c)
                        })
                        .boxed()
                }
                Step::Trickle(every) => futures::stream::unfold((), move |()| async move {
                    tokio::time::sleep(every).await;
                    Some((Ok(Bytes::from_static(b"x")), ()))
                })
                .boxed(),
            };
            let body = body.map(move |item| {
                let _keep = &flag;
                item
            });
            Ok(facade_upstream::BlobStream { total_size: Some(total), offset, body: body.boxed() })
        })
    }
}

fn config(dir: &std::path::Path) -> FillConfig {
    FillConfig {
        spool_dir: dir.join("spool"),
        retry_min_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(50),
        max_attempts_without_progress: 3,
        max_resumes: 8,
        max_cluster_resumes: 1,
        idle_timeout: Duration::from_secs(5),
        deadline: Duration::from_secs(600),
        min_rate: 1024,
        min_rate_window: Duration::from_secs(30),
    }
}

fn fills(dir: &std::path::Path, store: Option<LocalStore>, origin: Arc<dyn Origin>) -> Arc<Fills> {
    Fills::with_origin(config(dir), store, origin, None, ClusterMetrics::unregistered()).unwrap()
}

/// Reads the whole blob through a fill as a client would.
async fn read_all(fills: &Arc<Fills>, digest: &Digest, size: u64) -> std::io::Result<Vec<u8>> {
    let (fill, _) = fills.join(digest, size, "application/octet-stream", &from()).map_err(std::io::Error::other)?;
    let stream = file_range_stream(fill.file(), 0, size, size, Some(fill.following()), Some(Box::new(fill)));
    stream
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
}

async fn wait_for_empty_table(fills: &Fills) {
    for _ in 0..1000 {
        if fills.inflight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the fill never left the table");
}

#[tokio::test]
async fn concurrent_readers_share_one_download() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(3 << 20);
    let digest = Digest::sha256_of(&blob);
    let origin = Scripted::new(blob.clone(), vec![Step::Serve { chunk: 64 << 10, cut: None }]);
    let store = LocalStore::open(&dir.path().join("store")).unwrap();
    let f = fills(dir.path(), Some(store.clone()), origin.clone());
    let size = blob.len() as u64;
    let reads = futures::future::join_all((0..8).map(|_| read_all(&f, &digest, size))).await;
    for r in reads {
        assert_eq!(r.unwrap(), blob);
    }
    assert_eq!(origin.opens(), vec![0], "one download for eight readers");
    wait_for_empty_table(&f).await;
    assert!(store.contains(&digest));
}

#[tokio::test(start_paused = true)]
async fn a_broken_body_resumes_at_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(1 << 20);
    let digest = Digest::sha256_of(&blob);
    let cut = Step::Serve { chunk: 4096, cut: Some(300_000) };
    let origin = Scripted::new(blob.clone(), vec![cut.clone(), cut, Step::Serve { chunk: 4096, cut: None }]);
    let f = fills(dir.path(), None, origin.clone());
    assert_eq!(read_all(&f, &digest, blob.len() as u64).await.unwrap(), blob);
    assert_eq!(origin.opens(), vec![0, 300_000, 600_000]);
}

#[tokio::test(start_paused = true)]
async fn the_resume_budget_ends_a_flapping_download() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(1 << 20);
    let digest = Digest::sha256_of(&blob);
    // Progress every time (so backoff never runs out), but only 1000 bytes per connection.
    let origin = Scripted::new(blob.clone(), vec![Step::Serve { chunk: 1000, cut: Some(1000) }]);
    let f = fills(dir.path(), None, origin.clone());
    let err = read_all(&f, &digest, blob.len() as u64).await.unwrap_err();
    assert!(err.to_string().contains("fill failed"), "{err}");
    assert_eq!(origin.opens().len(), config(dir.path()).max_resumes + 1);
}

#[tokio::test(start_paused = true)]
async fn attempts_without_progress_give_up_and_a_404_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(10_000);
    let digest = Digest::sha256_of(&blob);
    let origin = Scripted::new(blob.clone(), vec![Step::Fail(reset)]);
    let f = fills(dir.path(), None, origin.clone());
    assert!(read_all(&f, &digest, blob.len() as u64).await.is_err());
    assert_eq!(origin.opens().len(), config(dir.path()).max_attempts_without_progress + 1);

    let not_found = || facade_upstream::Error::NotFound { host: "registry.test".into(), what: "blob".into() };
    let origin = Scripted::new(blob.clone(), vec![Step::Fail(not_found)]);
    let f = fills(dir.path(), None, origin.clone());
    assert!(read_all(&f, &digest, blob.len() as u64).await.is_err());
    assert_eq!(origin.opens().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_source_that_sends_nothing_is_resumed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(100_000);
    let digest = Digest::sha256_of(&blob);
    let origin = Scripted::new(blob.clone(), vec![Step::Hang, Step::Serve { chunk: 4096, cut: None }]);
    let f = fills(dir.path(), None, origin.clone());
    let started = tokio::time::Instant::now();
    assert_eq!(read_all(&f, &digest, blob.len() as u64).await.unwrap(), blob);
    assert_eq!(origin.opens(), vec![0, 0]);
    assert!(started.elapsed() >= config(dir.path()).idle_timeout);
}

#[tokio::test(start_paused = true)]
async fn a_source_that_never_ends_hits_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(1 << 30);
    let digest = Digest::sha256_of(&blob);
    let origin = Scripted::new(blob.clone(), vec![Step::Trickle(Duration::from_secs(1))]);
    let mut cfg = config(dir.path());
    cfg.deadline = Duration::from_secs(30);
    // A trickle that meets the minimum rate: only the deadline can end it.
    cfg.min_rate = 0;
    let f = Fills::with_origin(cfg, None, origin.clone(), None, ClusterMetrics::unregistered()).unwrap();
    let (fill, _) = f.join(&digest, blob.len() as u64, "x", &from()).unwrap();
    let mut progress = fill.progress();
    let failed = async {
        loop {
            if let Progress::Failed(reason) = progress.borrow_and_update().clone() {
                return reason;
            }
            progress.changed().await.unwrap();
        }
    };
    let reason = tokio::time::timeout(Duration::from_secs(120), failed).await.expect("no deadline");
    assert!(reason.contains("not done after"), "{reason}");
}

#[tokio::test]
async fn a_wrong_size_is_a_size_mismatch_and_wrong_bytes_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(50_000);
    let digest = Digest::sha256_of(&blob);
    let store = LocalStore::open(&dir.path().join("store")).unwrap();

    let origin = Scripted::new(blob.clone(), vec![Step::Lie(60_000)]);
    let f = fills(dir.path(), Some(store.clone()), origin);
    let (fill, _) = f.join(&digest, blob.len() as u64, "x", &from()).unwrap();
    let mut progress = fill.progress();
    let reason = loop {
        if let Progress::Failed(r) = progress.borrow_and_update().clone() {
            break r;
        }
        progress.changed().await.unwrap();
    };
    assert!(reason.contains("expected 50000 bytes, got 60000"), "{reason}");
    drop(fill);

    let origin = Scripted::new(blob.clone(), vec![Step::Garbage]);
    let f = fills(dir.path(), Some(store.clone()), origin);
    let err = read_all(&f, &digest, blob.len() as u64).await.unwrap_err();
    assert!(err.to_string().contains("hashed to"), "{err}");
    wait_for_empty_table(&f).await;
    assert!(!store.contains(&digest));
    assert_eq!(std::fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0, "a temp file was left");
}

#[tokio::test]
async fn without_a_store_a_fill_nobody_reads_stops_and_a_later_request_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(4 << 20);
    let digest = Digest::sha256_of(&blob);
    let size = blob.len() as u64;
    // The first body trickles, so the fill is still running when its reader leaves.
    let origin = Scripted::new(
        blob.clone(),
        vec![Step::Trickle(Duration::from_millis(5)), Step::Serve { chunk: 64 << 10, cut: None }],
    );
    let f = fills(dir.path(), None, origin.clone());
    let (fill, started) = f.join(&digest, size, "x", &from()).unwrap();
    assert!(started);
    let mut progress = fill.progress();
    progress.wait_for(|p| matches!(p, Progress::Running { written, .. } if *written > 0)).await.unwrap();
    drop((progress, fill));
    wait_for_empty_table(&f).await;
    for _ in 0..200 {
        if origin.dropped.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(origin.dropped.load(Ordering::SeqCst), "the download went on with nobody reading");
    // Whoever asks next gets a fill of its own and the whole blob.
    let (again, started) = f.join(&digest, size, "x", &from()).unwrap();
    assert!(started, "joined a fill that had been abandoned");
    drop(again);
    assert_eq!(read_all(&f, &digest, size).await.unwrap(), blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_racing_the_last_reader_leaving_always_complete() {
    // Readers leave and arrive at the same moment, many times: a request must never be handed
    // a fill that is about to stop for lack of readers.
    let dir = tempfile::tempdir().unwrap();
    let blob = data(256 << 10);
    let digest = Digest::sha256_of(&blob);
    let size = blob.len() as u64;
    let origin = Scripted::new(blob.clone(), vec![Step::Serve { chunk: 1024, cut: None }]);
    let f = fills(dir.path(), None, origin);
    for _ in 0..200 {
        let (first, _) = f.join(&digest, size, "x", &from()).unwrap();
        let leaving = tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(first);
        });
        let arriving = read_all(&f, &digest, size);
        let (left, got) = tokio::join!(leaving, arriving);
        left.unwrap();
        assert_eq!(got.unwrap(), blob);
    }
}

/// A cluster whose IPFS content breaks after `serve` bytes, every time.
struct FlakyCluster {
    data: Bytes,
    serve: usize,
    cats: AtomicUsize,
    forgotten: AtomicBool,
    published: AtomicUsize,
}

impl ClusterBlobs for FlakyCluster {
    fn lookup<'a>(&'a self, _digest: &'a Digest, size: u64) -> BoxFuture<'a, Option<IndexEntry>> {
        Box::pin(async move {
            Some(IndexEntry {
                cid: "bafy".into(),
                media_type: "x".into(),
                size,
                origins: vec![from().key()],
                pinner: None,
            })
        })
    }

    fn cat<'a>(
        &'a self,
        _cid: &'a str,
        offset: u64,
        _len: u64,
    ) -> BoxFuture<'a, Option<BoxStream<'static, Result<Bytes>>>> {
        Box::pin(async move {
            self.cats.fetch_add(1, Ordering::SeqCst);
            let start = offset as usize;
            let end = self.serve.max(start);
            let part = self.data.slice(start..end);
            let err = Error::Cluster { dependency: "ipfs", context: "cat".into(), reason: "reset".into() };
            Some(futures::stream::iter(vec![Ok(part), Err(err)]).boxed())
        })
    }

    fn failed(&self, _reason: &str) {}

    fn forget<'a>(&'a self, _digest: &'a Digest) -> BoxFuture<'a, ()> {
        self.forgotten.store(true, Ordering::SeqCst);
        Box::pin(async {})
    }

    fn publish(
        self: Arc<Self>,
        _d: Digest,
        _m: String,
        _o: UpstreamBlob,
        _f: Arc<std::fs::File>,
        _s: u64,
    ) -> BoxFuture<'static, BackfillOutcome> {
        self.published.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { BackfillOutcome::Ok })
    }
}

/// Fills over `origin` and a cluster whose IPFS content of `blob` breaks after `serve` bytes.
fn with_flaky_cluster(
    dir: &std::path::Path,
    blob: &Bytes,
    serve: usize,
    origin: Arc<Scripted>,
) -> (Arc<FlakyCluster>, Arc<Fills>) {
    let cluster = Arc::new(FlakyCluster {
        data: blob.clone(),
        serve,
        cats: AtomicUsize::new(0),
        forgotten: AtomicBool::new(false),
        published: AtomicUsize::new(0),
    });
    let cluster_dyn: Arc<dyn ClusterBlobs> = cluster.clone();
    let f = Fills::with_origin(config(dir), None, origin, Some(cluster_dyn), ClusterMetrics::unregistered()).unwrap();
    (cluster, f)
}

#[tokio::test(start_paused = true)]
async fn a_broken_ipfs_stream_hands_over_to_the_origin_at_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(1 << 20);
    let digest = Digest::sha256_of(&blob);
    let origin = Scripted::new(blob.clone(), vec![Step::Serve { chunk: 8192, cut: None }]);
    let (cluster, f) = with_flaky_cluster(dir.path(), &blob, 400_000, origin.clone());
    assert_eq!(read_all(&f, &digest, blob.len() as u64).await.unwrap(), blob);
    assert_eq!(origin.opens(), vec![400_000], "the origin was not asked from IPFS's offset");
    assert_eq!(cluster.cats.load(Ordering::SeqCst), 2, "one resume of the IPFS stream, then hand-over");
    assert!(!cluster.forgotten.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn a_fill_tells_whether_its_bytes_came_from_the_cluster() {
    // All of it from IPFS: the cluster's; IPFS broke at 400 000 bytes: the origin's.
    for (serve, cluster_only) in [(1 << 20, true), (400_000, false)] {
        let dir = tempfile::tempdir().unwrap();
        let blob = data(1 << 20);
        let digest = Digest::sha256_of(&blob);
        let origin = Scripted::new(blob.clone(), vec![Step::Serve { chunk: 8192, cut: None }]);
        let (_cluster, f) = with_flaky_cluster(dir.path(), &blob, serve, origin);
        let (fill, _) = f.join(&digest, blob.len() as u64, "x", &from()).unwrap();
        let mut progress = fill.progress();
        let end = progress.wait_for(|p| !matches!(p, Progress::Running { .. })).await.unwrap().clone();
        assert_eq!(end, Progress::Verified);
        assert_eq!(fill.came_from_cluster(), cluster_only, "IPFS served {serve} bytes");
    }
}

/// Two registries behind one client: each workspace's image names one of them.
struct TwoRegistries {
    honest: Arc<Scripted>,
    hostile: Arc<Scripted>,
}

impl Origin for TwoRegistries {
    fn open<'a>(
        &'a self,
        from: &'a UpstreamBlob,
        digest: &'a Digest,
        offset: u64,
    ) -> BoxFuture<'a, facade_upstream::Result<facade_upstream::BlobStream>> {
        if from.registry == "hostile.test" {
            self.hostile.open(from, digest, offset)
        } else {
            self.honest.open(from, digest, offset)
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_download_from_another_registry_is_never_joined() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(2 << 20);
    let digest = Digest::sha256_of(&blob);
    let size = blob.len() as u64;
    // The hostile registry claims the same digest and trickles garbage.
    let hostile = Scripted::new(blob.clone(), vec![Step::Trickle(Duration::from_secs(1))]);
    let honest = Scripted::new(blob.clone(), vec![Step::Serve { chunk: 64 << 10, cut: None }]);
    let origin = Arc::new(TwoRegistries { honest: honest.clone(), hostile: hostile.clone() });
    let store = LocalStore::open(&dir.path().join("store")).unwrap();
    let f = fills(dir.path(), Some(store.clone()), origin);
    let attacker = UpstreamBlob { registry: "hostile.test".into(), repo: RepoName::parse("x/y").unwrap() };
    let (held, started) = f.join(&digest, size, "x", &attacker).unwrap();
    assert!(started);
    held.answered().await.unwrap();

    let started = tokio::time::Instant::now();
    assert_eq!(read_all(&f, &digest, size).await.unwrap(), blob);
    assert!(started.elapsed() < Duration::from_secs(5), "the honest pull waited on the hostile download");
    assert_eq!(honest.opens(), vec![0]);
    assert_eq!(hostile.opens(), vec![0]);
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn a_trickle_below_the_minimum_rate_fails_the_fill() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(1 << 20);
    let digest = Digest::sha256_of(&blob);
    let origin = Scripted::new(blob.clone(), vec![Step::Trickle(Duration::from_secs(1))]);
    let f = fills(dir.path(), None, origin);
    let started = tokio::time::Instant::now();
    let err = read_all(&f, &digest, blob.len() as u64).await.unwrap_err();
    assert!(err.to_string().contains("below the minimum"), "{err}");
    let window = config(dir.path()).min_rate_window;
    assert!(started.elapsed() >= window && started.elapsed() < window * 3, "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn the_origins_refusal_is_known_before_any_byte_and_429_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(10_000);
    let digest = Digest::sha256_of(&blob);
    let size = blob.len() as u64;
    let not_found = || facade_upstream::Error::NotFound { host: "registry.test".into(), what: "blob".into() };
    let f = fills(dir.path(), None, Scripted::new(blob.clone(), vec![Step::Fail(not_found)]));
    let (fill, _) = f.join(&digest, size, "x", &from()).unwrap();
    let err = fill.answered().await.unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::ManifestUnknown, "{err}");

    let limited = || facade_upstream::Error::RateLimited {
        host: "registry.test".into(),
        retry_after: Some(Duration::from_secs(30)),
    };
    let origin = Scripted::new(blob.clone(), vec![Step::Fail(limited)]);
    let f = fills(dir.path(), None, origin.clone());
    let (fill, _) = f.join(&digest, size, "x", &from()).unwrap();
    let err = fill.answered().await.unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(origin.opens().len(), 1, "a 429 was retried instead of passed on");

    // Headers without a byte yet: answered.
    let f = fills(dir.path(), None, Scripted::new(blob.clone(), vec![Step::Hang]));
    let (fill, _) = f.join(&digest, size, "x", &from()).unwrap();
    tokio::time::timeout(Duration::from_secs(1), fill.answered()).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_cluster_entry_of_another_origin_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(100_000);
    let digest = Digest::sha256_of(&blob);
    let origin = Scripted::new(blob.clone(), vec![Step::Serve { chunk: 8192, cut: None }]);
    let (cluster, f) = with_flaky_cluster(dir.path(), &blob, blob.len(), origin.clone());
    // The index entry names `from()`; this request's image names another registry.
    let other = UpstreamBlob { registry: "elsewhere.test".into(), repo: RepoName::parse("team/base").unwrap() };
    let (fill, _) = f.join(&digest, blob.len() as u64, "x", &other).unwrap();
    let stream = file_range_stream(
        fill.file(),
        0,
        blob.len() as u64,
        blob.len() as u64,
        Some(fill.following()),
        Some(Box::new(fill)),
    );
    let got: Vec<u8> = stream
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap();
    assert_eq!(got, blob);
    assert_eq!(cluster.cats.load(Ordering::SeqCst), 0, "another origin's index entry was used");
    assert_eq!(origin.opens(), vec![0]);
}

/// A store with a disk budget of `max` bytes, blobs of at most `max_blob`, and metrics.
fn budget_store(dir: &std::path::Path, max: u64, max_blob: Option<u64>) -> (LocalStore, crate::store::StoreMetrics) {
    let config = crate::store::StoreConfig {
        max_bytes: Some(max),
        max_blob_bytes: max_blob,
        ..crate::store::StoreConfig::default()
    };
    let store = LocalStore::open_with(&dir.join("store"), config).unwrap();
    let metrics = crate::store::StoreMetrics::register(&prometheus::Registry::new()).unwrap();
    store.set_metrics(metrics.clone());
    (store, metrics)
}

async fn collect(stream: futures::stream::BoxStream<'static, std::io::Result<Bytes>>) -> std::io::Result<Vec<u8>> {
    stream
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
}

#[tokio::test(start_paused = true)]
async fn fills_reserve_their_size_in_the_disk_budget_and_what_does_not_fit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, metrics) = budget_store(dir.path(), 1 << 20, Some(700 << 10));
    let big = data(800 << 10);
    let big_digest = Digest::sha256_of(&big);
    let blob = data(600 << 10);
    let digest = Digest::sha256_of(&blob);
    let other = data(500 << 10);
    let other_digest = Digest::sha256_of(&other);
    let origin = Scripted::new(blob.clone(), vec![Step::Hang]);
    let f = fills(dir.path(), Some(store.clone()), origin.clone());

    // Larger than a blob may be: refused before anything touches the disk.
    match f.join(&big_digest, big.len() as u64, "x", &from()) {
        Err(Error::NoRoom { reason: PassReason::TooLarge, .. }) => {}
        other => panic!("expected too_large, got {:?}", other.map(|(_, started)| started)),
    }
    // The first fill reserves its declared size; a second that would take the spools past the
    // budget is refused while the first holds its room.
    let (held, _) = f.join(&digest, blob.len() as u64, "x", &from()).unwrap();
    assert_eq!(store.reserved_bytes(), blob.len() as u64);
    assert_eq!(metrics.reserved_value(), blob.len() as i64);
    match f.join(&other_digest, other.len() as u64, "x", &from()) {
        Err(Error::NoRoom { reason: PassReason::Budget, .. }) => {}
        other => panic!("expected budget, got {:?}", other.map(|(_, started)| started)),
    }
    // Its room comes back when it goes (here: its reader leaves and the grace runs out).
    drop(held);
    wait_for_empty_table(&f).await;
    for _ in 0..100 {
        if store.reserved_bytes() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.reserved_bytes(), 0);
    assert_eq!(metrics.reserved_value(), 0);
    assert!(f.join(&other_digest, other.len() as u64, "x", &from()).is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_unread_fill_stops_after_the_grace_unless_it_keeps_moving() {
    let dir = tempfile::tempdir().unwrap();
    let (store, metrics) = budget_store(dir.path(), 64 << 20, None);
    let grace = store.config().unread_grace;
    let blob = data(1 << 20);
    let digest = Digest::sha256_of(&blob);
    let size = blob.len() as u64;

    // A source that answers and then sends nothing: the fill stops within the grace (and one
    // check), long before the idle timeout would resume it.
    let origin = Scripted::new(blob.clone(), vec![Step::Hang]);
    let mut cfg = config(dir.path());
    cfg.idle_timeout = Duration::from_secs(60);
    let f = Fills::with_origin(cfg, Some(store.clone()), origin.clone(), None, ClusterMetrics::unregistered()).unwrap();
    let (fill, _) = f.join(&digest, size, "x", &from()).unwrap();
    fill.answered().await.unwrap();
    let left = tokio::time::Instant::now();
    drop(fill);
    wait_for_empty_table(&f).await;
    for _ in 0..500 {
        if origin.dropped.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(origin.dropped.load(Ordering::SeqCst), "the unread download went on");
    let stopped = left.elapsed();
    assert!(stopped >= grace && stopped <= grace + Duration::from_secs(2), "stopped after {stopped:?}");
    assert_eq!(origin.opens(), vec![0]);
    assert_eq!(metrics.abandoned_value(), 1);
    assert!(!store.contains(&digest));
    assert_eq!(store.reserved_bytes(), 0);

    // A source that keeps a steady 64 KiB/s (above the 1 KiB/s minimum): the fill goes on
    // unread, within its reservation, and the next pull finds the blob stored.
    let origin = Scripted::new(blob.clone(), vec![Step::Pace { chunk: 64 << 10, every: Duration::from_secs(1) }]);
    let f = fills(dir.path(), Some(store.clone()), origin.clone());
    let (fill, _) = f.join(&digest, size, "x", &from()).unwrap();
    fill.answered().await.unwrap();
    drop(fill);
    // 16 s at that pace.
    for _ in 0..60 {
        if f.inflight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(store.contains(&digest), "a moving download that fits the budget was stopped");
    assert_eq!(metrics.abandoned_value(), 1);
    assert_eq!(origin.opens(), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn a_join_within_the_grace_gets_the_same_fill() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _metrics) = budget_store(dir.path(), 64 << 20, None);
    let blob = data(64 << 10);
    let digest = Digest::sha256_of(&blob);
    let size = blob.len() as u64;
    let origin = Scripted::new(blob.clone(), vec![Step::Pace { chunk: 4096, every: Duration::from_secs(1) }]);
    let f = fills(dir.path(), Some(store.clone()), origin.clone());
    let (first, started) = f.join(&digest, size, "x", &from()).unwrap();
    assert!(started);
    drop(first);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (again, started) = f.join(&digest, size, "x", &from()).unwrap();
    assert!(!started, "a fill within its grace was not joined");
    let stream = file_range_stream(again.file(), 0, size, size, Some(again.following()), Some(Box::new(again)));
    assert_eq!(collect(stream).await.unwrap(), blob);
    assert_eq!(origin.opens(), vec![0]);
}

#[tokio::test(start_paused = true)]
async fn pass_through_streams_verified_bytes_and_ranges_without_touching_disk() {
    let dir = tempfile::tempdir().unwrap();
    let blob = data(3 << 20);
    let digest = Digest::sha256_of(&blob);
    let size = blob.len() as u64;
    let cut = Step::Serve { chunk: 64 << 10, cut: Some(1 << 20) };
    let origin = Scripted::new(blob.clone(), vec![cut, Step::Serve { chunk: 64 << 10, cut: None }]);
    let (store, _m) = budget_store(dir.path(), 1 << 20, None);
    let f = fills(dir.path(), Some(store.clone()), origin.clone());

    // Whole, across a broken body (resumed at its offset).
    let got = collect(f.pass_through(&digest, size, &from(), (0, size), None).await.unwrap()).await.unwrap();
    assert_eq!(got, blob);
    assert_eq!(origin.opens(), vec![0, 1 << 20]);
    // A range to the end: downloaded from 0 (to hash all of it), the start skipped.
    let got = collect(f.pass_through(&digest, size, &from(), (2_000_000, size), None).await.unwrap()).await;
    assert_eq!(got.unwrap(), &blob[2_000_000..]);
    // A range short of the end stops downloading at its end.
    let got = collect(f.pass_through(&digest, size, &from(), (10, 5000), None).await.unwrap()).await;
    assert_eq!(got.unwrap(), &blob[10..5000]);
    assert_eq!(std::fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0);
    assert!(!store.contains(&digest));

    // Wrong bytes: the blob's last byte never goes out.
    let f = fills(dir.path(), Some(store.clone()), Scripted::new(blob.clone(), vec![Step::Garbage]));
    let mut stream = f.pass_through(&digest, size, &from(), (0, size), None).await.unwrap();
    let mut got = 0u64;
    let err = loop {
        match stream.next().await {
            Some(Ok(b)) => got += b.len() as u64,
            Some(Err(e)) => break e,
            None => panic!("a wrong blob was completed"),
        }
    };
    assert!(got < size && err.to_string().contains("hashed to"), "{got} {err}");

    // The origin's refusal is the answer, before any stream.
    let not_found = || facade_upstream::Error::NotFound { host: "registry.test".into(), what: "blob".into() };
    let f = fills(dir.path(), Some(store), Scripted::new(blob.clone(), vec![Step::Fail(not_found)]));
    let err = f.pass_through(&digest, size, &from(), (0, size), None).await.err().unwrap();
    assert_eq!(err.kind(), crate::ErrorKind::ManifestUnknown, "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_reader_goes_on_from_the_origin_with_the_spools_hash_state() {
    // What a fill's readers do after a full disk (`chain.rs`): the spool's bytes and hash state
    // at the offset reached, then the origin from there; the whole blob is still verified.
    let dir = tempfile::tempdir().unwrap();
    let blob = data(2 << 20);
    let digest = Digest::sha256_of(&blob);
    let size = blob.len() as u64;
    let origin = Scripted::new(blob.clone(), vec![Step::Serve { chunk: 64 << 10, cut: None }]);
    let f = fills(dir.path(), None, origin.clone());
    let mut hasher = digest.hasher().unwrap();
    hasher.update(&blob[..700_000]);
    let prefix = HashedPrefix { len: 700_000, hasher };
    let fallback = Fallback { prefix: Some(prefix.clone()) };
    let got = collect(f.pass_through(&digest, size, &from(), (700_000, size), Some(&fallback)).await.unwrap()).await;
    assert_eq!(got.unwrap(), &blob[700_000..]);
    assert_eq!(origin.opens(), vec![700_000], "the origin was not asked from the spool's end");

    // A hash state of other bytes: the blob fails at its end.
    let mut wrong = digest.hasher().unwrap();
    wrong.update(&vec![0u8; 700_000]);
    let fallback = Fallback { prefix: Some(HashedPrefix { len: 700_000, hasher: wrong }) };
    let got = collect(f.pass_through(&digest, size, &from(), (700_000, size), Some(&fallback)).await.unwrap()).await;
    assert!(got.is_err());
}
