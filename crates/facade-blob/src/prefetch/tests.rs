//! Prefetch and warm-up over an origin served from memory, in process: every layer filled and
//! counted, no second job for a running one, idleness stopping a prefetch but not a warm-up,
//! per-layer failures, and the bounded table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use facade_oci::RepoName;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use super::*;
use crate::blobs::fill::{FillConfig, Origin};
use crate::cluster::ClusterMetrics;
use crate::store::StoreConfig;

/// How the origin answers for a blob.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Serve,
    /// The first 1 KiB, then nothing (the body stays open).
    Hang,
    NotFound,
}

struct Memory {
    blobs: HashMap<Digest, Bytes>,
    mode: Mode,
    opens: AtomicUsize,
}

impl Origin for Memory {
    fn open<'a>(
        &'a self,
        _from: &'a UpstreamBlob,
        digest: &'a Digest,
        offset: u64,
    ) -> BoxFuture<'a, facade_upstream::Result<facade_upstream::BlobStream>> {
        Box::pin(async move {
            self.opens.fetch_add(1, Ordering::SeqCst);
            let data = self.blobs.get(digest).cloned().unwrap_or_default();
            let rest = data.slice(offset as usize..);
            let body: BoxStream<'static, facade_upstream::Result<Bytes>> = match self.mode {
                Mode::NotFound => {
                    return Err(facade_upstream::Error::NotFound { host: "registry.test".into(), what: "blob".into() });
                }
                Mode::Serve => futures::stream::iter([Ok(rest)]).boxed(),
                Mode::Hang => futures::stream::iter([Ok(rest.slice(..1024))]).chain(futures::stream::pending()).boxed(),
            };
            Ok(facade_upstream::BlobStream { total_size: Some(data.len() as u64), offset, body })
        })
    }
}

fn from() -> UpstreamBlob {
    UpstreamBlob { registry: "registry.test".into(), repo: RepoName::parse("team/base").unwrap() }
}

fn noise(n: usize, seed: u8) -> Bytes {
    Bytes::from((0..n).map(|i| (i * 7 % 251) as u8 ^ seed).collect::<Vec<u8>>())
}

struct World {
    _dir: tempfile::TempDir,
    store: LocalStore,
    origin: Arc<Memory>,
    prefetcher: Arc<Prefetcher>,
    image: Arc<ComposedImage>,
    /// Upstream layers (digest, size), then the in-memory one.
    layers: Vec<(Digest, u64)>,
}

/// An image of two upstream layers (64 KiB and 96 KiB) and one direct content layer.
fn world(mode: Mode, config: PrefetchConfig) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_with(&dir.path().join("store"), StoreConfig::default()).unwrap();
    let (a, b, c) = (noise(64 << 10, 1), noise(96 << 10, 2), noise(3000, 3));
    let digests = [&a, &b, &c].map(|d| Digest::sha256_of(d));
    let origin = Arc::new(Memory {
        blobs: HashMap::from([(digests[0].clone(), a.clone()), (digests[1].clone(), b.clone())]),
        mode,
        opens: AtomicUsize::new(0),
    });
    let fill_config = FillConfig { spool_dir: dir.path().join("spool"), ..FillConfig::default() };
    let fills =
        Fills::with_origin(fill_config, Some(store.clone()), origin.clone(), None, ClusterMetrics::unregistered())
            .unwrap();
    let media = "application/vnd.oci.image.layer.v1.tar";
    let layer = |d: &Digest, n: usize| serde_json::json!({"mediaType": media, "digest": d.as_str(), "size": n});
    let config_digest = Digest::sha256_of(b"{}");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.as_str(), "size": 2},
        "layers": [layer(&digests[0], a.len()), layer(&digests[1], b.len()), layer(&digests[2], c.len())],
    });
    let manifest = Bytes::from(manifest.to_string());
    let entry = |size: usize, origin| BlobEntry { size: size as u64, media_type: media.into(), origin };
    let image = Arc::new(ComposedImage {
        manifest_digest: Digest::sha256_of(&manifest),
        manifest,
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        blobs: HashMap::from([
            (config_digest, entry(2, BlobOrigin::Bytes(Bytes::from_static(b"{}")))),
            (digests[0].clone(), entry(a.len(), BlobOrigin::Upstream(from()))),
            (digests[1].clone(), entry(b.len(), BlobOrigin::Upstream(from()))),
            (digests[2].clone(), entry(c.len(), BlobOrigin::Bytes(c.clone()))),
        ]),
    });
    let prefetcher = Prefetcher::new(config, Some(store.clone()), fills, PrefetchMetrics::unregistered());
    let layers = vec![
        (digests[0].clone(), a.len() as u64),
        (digests[1].clone(), b.len() as u64),
        (digests[2].clone(), c.len() as u64),
    ];
    World { _dir: dir, store, origin, prefetcher, image, layers }
}

fn quick() -> PrefetchConfig {
    PrefetchConfig { idle_timeout: Duration::from_millis(300), ..PrefetchConfig::default() }
}

/// The report once the job ended (at most 10 s).
async fn finished(p: &Prefetcher, id: &str) -> ProgressReport {
    for _ in 0..400 {
        if let Some(r) = p.progress("fixed", id).filter(ProgressReport::is_finished) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the job of {id} did not end: {:?}", p.progress("fixed", id));
}

#[tokio::test]
async fn a_warm_up_fills_every_upstream_layer_into_the_store_and_counts_its_bytes() {
    let w = world(Mode::Serve, quick());
    w.prefetcher.warm_up("fixed", "ws", &w.image).unwrap();
    let r = finished(&w.prefetcher, "ws").await;
    assert_eq!((r.state, r.kind), ("done", "warmup"));
    let total: u64 = w.layers.iter().map(|(_, s)| s).sum();
    assert_eq!((r.bytes_done, r.bytes_total, r.layers_done, r.layers_total), (total, total, 3, 3));
    let sources: Vec<_> = r.layers.iter().map(|l| (l.digest.clone(), l.source, l.state)).collect();
    assert_eq!(
        sources,
        vec![
            (w.layers[0].0.to_string(), LayerSource::Upstream, LayerState::Done),
            (w.layers[1].0.to_string(), LayerSource::Upstream, LayerState::Done),
            (w.layers[2].0.to_string(), LayerSource::Memory, LayerState::Done),
        ]
    );
    for (d, size) in &w.layers[..2] {
        for _ in 0..200 {
            if w.store.open_blob(d, *size).unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(w.store.open_blob(d, *size).unwrap().is_some(), "{d} not stored");
    }
    assert_eq!(w.prefetcher.metrics.warmups.with_label_values(&["done"]).get(), 1);
    assert_eq!(w.prefetcher.metrics.bytes.with_label_values(&["warmup"]).get(), w.layers[0].1 + w.layers[1].1);

    // Again: the store has both, vouched for by the download itself; nothing is fetched.
    let opens = w.origin.opens.load(Ordering::SeqCst);
    w.prefetcher.warm_up("fixed", "ws", &w.image).unwrap();
    let again = finished(&w.prefetcher, "ws").await;
    assert_eq!(again.state, "done");
    assert!(again.layers[..2].iter().all(|l| l.source == LayerSource::Store), "{again:?}");
    assert_eq!(w.origin.opens.load(Ordering::SeqCst), opens);
}

#[tokio::test]
async fn a_running_prefetch_is_not_started_twice_and_requests_keep_it_going() {
    let w = world(Mode::Hang, quick());
    assert!(w.prefetcher.prefetches_on_manifest());
    w.prefetcher.manifest_served("fixed", "ws", &w.image);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.prefetcher.manifest_served("fixed", "ws", &w.image);
        w.prefetcher.touch("fixed", "ws");
    }
    // 800 ms of requests, more than twice the idle timeout: still running, one open per layer.
    let r = w.prefetcher.progress("fixed", "ws").unwrap();
    assert_eq!(r.state, "running", "{r:?}");
    assert_eq!(w.origin.opens.load(Ordering::SeqCst), 2);
    assert_eq!(r.layers[0].bytes_done, 1024, "{r:?}");
    assert_eq!(r.layers[0].state, LayerState::Running);
}

#[tokio::test]
async fn an_idle_prefetch_stops_but_a_warm_up_goes_on() {
    let w = world(Mode::Hang, quick());
    w.prefetcher.manifest_served("fixed", "ws", &w.image);
    let r = finished(&w.prefetcher, "ws").await;
    assert_eq!((r.state, r.kind), ("stopped", "prefetch"));
    let stopped = &r.layers[0];
    assert_eq!(stopped.state, LayerState::Failed);
    assert!(stopped.error.as_deref().unwrap().contains("went away"), "{r:?}");
    assert_eq!(r.layers[2].state, LayerState::Done, "the in-memory layer stays done");
    assert_eq!(w.prefetcher.metrics.prefetches.with_label_values(&["stopped"]).get(), 1);

    // A warm-up of the same workspace starts afresh and is not stopped by idleness.
    w.prefetcher.warm_up("fixed", "ws", &w.image).unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = w.prefetcher.progress("fixed", "ws").unwrap();
    assert_eq!((r.state, r.kind), ("running", "warmup"), "{r:?}");
}

#[tokio::test]
async fn a_warm_up_takes_over_a_running_prefetch() {
    let w = world(Mode::Hang, quick());
    w.prefetcher.manifest_served("fixed", "ws", &w.image);
    w.prefetcher.warm_up("fixed", "ws", &w.image).unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let r = w.prefetcher.progress("fixed", "ws").unwrap();
    assert_eq!((r.state, r.kind), ("running", "warmup"), "{r:?}");
    // The same job: a replaced prefetch would have ended (as stopped).
    let ended: u64 =
        Outcome::ALL.iter().map(|o| w.prefetcher.metrics.prefetches.with_label_values(&[o.label()]).get()).sum();
    assert_eq!(ended, 0, "the prefetch was replaced, not taken over");
    assert_eq!(w.origin.opens.load(Ordering::SeqCst), 2, "the warm-up started fills of its own");
}

#[tokio::test]
async fn a_layer_the_origin_does_not_have_fails_with_its_error() {
    let w = world(Mode::NotFound, quick());
    w.prefetcher.warm_up("fixed", "ws", &w.image).unwrap();
    let r = finished(&w.prefetcher, "ws").await;
    assert_eq!(r.state, "failed");
    assert_eq!(r.layers[0].state, LayerState::Failed);
    assert!(r.layers[0].error.as_deref().unwrap().contains("registry.test"), "{r:?}");
    assert_eq!((r.layers_done, r.bytes_done), (1, w.layers[2].1));
    assert_eq!(w.prefetcher.metrics.warmups.with_label_values(&["failed"]).get(), 1);
}

#[tokio::test]
async fn the_table_is_bounded_and_finished_reports_make_room() {
    let config = PrefetchConfig { max_workspaces: 1, ..quick() };
    let w = world(Mode::Hang, config);
    w.prefetcher.warm_up("fixed", "one", &w.image).unwrap();
    let full = w.prefetcher.warm_up("fixed", "two", &w.image).unwrap_err();
    assert_eq!(full.kind(), crate::error::ErrorKind::Unavailable, "{full}");
    assert!(w.prefetcher.progress("fixed", "two").is_none());

    let w = world(Mode::Serve, PrefetchConfig { max_workspaces: 1, ..quick() });
    w.prefetcher.warm_up("fixed", "one", &w.image).unwrap();
    finished(&w.prefetcher, "one").await;
    w.prefetcher.warm_up("fixed", "two", &w.image).unwrap();
    assert!(w.prefetcher.progress("fixed", "one").is_none(), "the finished report was not dropped");
    assert!(w.prefetcher.progress("fixed", "two").is_some());
}

#[tokio::test]
async fn nothing_is_prefetched_without_a_store_or_with_parallelism_zero() {
    let w = world(Mode::Serve, PrefetchConfig { parallelism: 0, ..quick() });
    assert!(!w.prefetcher.prefetches_on_manifest());
    w.prefetcher.manifest_served("fixed", "ws", &w.image);
    assert!(w.prefetcher.progress("fixed", "ws").is_none());
    // A warm-up still runs, at the default parallelism.
    w.prefetcher.warm_up("fixed", "ws", &w.image).unwrap();
    assert_eq!(finished(&w.prefetcher, "ws").await.state, "done");

    let dir = tempfile::tempdir().unwrap();
    let fill_config = FillConfig { spool_dir: dir.path().join("spool"), ..FillConfig::default() };
    let fills = Fills::with_origin(fill_config, None, w.origin.clone(), None, ClusterMetrics::unregistered()).unwrap();
    let storeless = Prefetcher::new(quick(), None, fills, PrefetchMetrics::unregistered());
    assert!(!storeless.prefetches_on_manifest());
    storeless.manifest_served("fixed", "ws", &w.image);
    assert!(storeless.progress("fixed", "ws").is_none());
    assert!(storeless.warm_up("fixed", "ws", &w.image).unwrap_err().to_string().contains("needs a local store"));
}
