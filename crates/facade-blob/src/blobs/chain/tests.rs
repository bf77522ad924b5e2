//! The chain's decisions that happen before a byte is read.

use std::sync::Arc;

use bytes::Bytes;
use facade_oci::Digest;
use futures::TryStreamExt;

use super::*;
use crate::blobs::fill::{FillConfig, Fills, Origin, UpstreamBlob};
use crate::cluster::ClusterMetrics;

/// An origin that must never be asked: these tests serve from the store.
struct NoOrigin;
impl Origin for NoOrigin {
    fn open<'a>(
        &'a self,
        _from: &'a UpstreamBlob,
        _digest: &'a Digest,
        _offset: u64,
    ) -> futures::future::BoxFuture<'a, facade_upstream::Result<facade_upstream::BlobStream>> {
        panic!("the origin was asked for a stored blob")
    }
}

fn chain(store: &LocalStore, dir: &std::path::Path) -> BlobChain {
    chain_over(store, dir, Arc::new(NoOrigin))
}

/// A chain over `store` whose fills download from `origin`.
fn chain_over(store: &LocalStore, dir: &std::path::Path, origin: Arc<dyn Origin>) -> BlobChain {
    let config = FillConfig { spool_dir: dir.join("spool"), ..FillConfig::default() };
    let fills = Fills::with_origin(config, Some(store.clone()), origin, None, ClusterMetrics::unregistered()).unwrap();
    BlobChain::new(Some(store.clone()), fills)
}

fn remote(size: u64) -> BlobEntry {
    BlobEntry {
        size,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        origin: BlobOrigin::Remote { url: "https://content.example/layer.tar.gz".into() },
    }
}

async fn collect(s: BlobStream) -> Vec<u8> {
    s.try_fold(Vec::new(), |mut acc, b| async move {
        acc.extend_from_slice(&b);
        Ok(acc)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_stored_blob_prepared_for_reading_survives_eviction_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store")).unwrap();
    let bytes = Bytes::from_static(b"content layer bytes");
    let digest = Digest::sha256_of(&bytes);
    store.put_bytes(&digest, &bytes).unwrap();
    let chain = chain(&store, dir.path());

    let Prepared::Content(blob) = chain.prepare(&digest, &remote(bytes.len() as u64)).await.unwrap() else {
        panic!("a stored remote layer was redirected")
    };
    // Another process on the same store (a restart hand-over) evicts it right now.
    std::fs::remove_file(store.path_of(&digest).unwrap()).unwrap();
    let got = collect(chain.read(blob, 0, bytes.len() as u64).await.unwrap()).await;
    assert_eq!(got, bytes);

    // Not stored any more: the next request is redirected, never a 404.
    assert!(matches!(chain.prepare(&digest, &remote(bytes.len() as u64)).await.unwrap(), Prepared::Redirect(_)));
}

#[tokio::test]
async fn a_wrong_size_claim_fails_only_the_claiming_request() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store")).unwrap();
    let bytes = Bytes::from_static(b"static layer");
    let digest = Digest::sha256_of(&bytes);
    store.put_bytes(&digest, &bytes).unwrap();
    let chain = chain(&store, dir.path());
    let honest = BlobEntry { size: bytes.len() as u64, media_type: "x".into(), origin: BlobOrigin::Stored };
    let lying = BlobEntry { size: 1 << 30, ..honest.clone() };

    assert!(matches!(chain.prepare(&digest, &lying).await, Err(Error::ClaimMismatch { .. })));
    assert!(store.contains(&digest), "a manifest's claim removed a verified blob");
    let got = collect(chain.open(&digest, &honest, 0, bytes.len() as u64).await.unwrap()).await;
    assert_eq!(got, bytes);
}

/// An origin that serves `bytes` from any offset and counts its opens.
struct Serving {
    bytes: Bytes,
    opens: std::sync::atomic::AtomicUsize,
}

impl Origin for Serving {
    fn open<'a>(
        &'a self,
        _from: &'a UpstreamBlob,
        _digest: &'a Digest,
        offset: u64,
    ) -> futures::future::BoxFuture<'a, facade_upstream::Result<facade_upstream::BlobStream>> {
        self.opens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let rest = self.bytes.slice(offset as usize..);
        let total = Some(self.bytes.len() as u64);
        Box::pin(async move {
            let body = futures::stream::iter(vec![Ok(rest)]);
            Ok(facade_upstream::BlobStream { total_size: total, offset, body: Box::pin(body) })
        })
    }
}

fn upstream_entry(registry: &str, size: u64) -> BlobEntry {
    BlobEntry {
        size,
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        origin: BlobOrigin::Upstream(UpstreamBlob {
            registry: registry.into(),
            repo: facade_oci::RepoName::parse("some/repo").unwrap(),
        }),
    }
}

#[tokio::test]
async fn a_stored_layer_is_served_only_to_origins_that_show_they_hold_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store")).unwrap();
    let secret: Bytes = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>().into();
    let digest = Digest::sha256_of(&secret);
    store.put_bytes(&digest, &secret).unwrap();
    let size = secret.len() as u64;

    // A registry that really has the layer: one probe, then served from the store.
    let honest = Arc::new(Serving { bytes: secret.clone(), opens: Default::default() });
    let chain = chain_over(&store, dir.path(), honest.clone());
    for _ in 0..3 {
        let Prepared::Content(blob) = chain.prepare(&digest, &upstream_entry("honest.test", size)).await.unwrap()
        else {
            panic!("redirected")
        };
        assert!(blob.stored.is_some(), "an origin holding the layer was not served the stored copy");
        assert_eq!(collect(chain.read(blob, 0, size).await.unwrap()).await, secret);
    }
    assert_eq!(honest.opens.load(std::sync::atomic::Ordering::SeqCst), 1, "probed more than once");

    // A registry that only knows the digest: never served the stored copy.
    let hostile = Arc::new(Serving { bytes: Bytes::from(vec![0u8; secret.len()]), opens: Default::default() });
    let chain = chain_over(&store, dir.path(), hostile.clone());
    let Prepared::Content(blob) = chain.prepare(&digest, &upstream_entry("hostile.test", size)).await.unwrap() else {
        panic!("redirected")
    };
    assert!(blob.stored.is_none(), "the node's copy was handed to an origin that does not hold it");
    let stream = chain.read(blob, 0, size).await.unwrap();
    let got = stream
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await;
    assert!(got.is_err(), "the hostile origin's bytes completed a read");
    assert!(store.contains(&digest), "the stored layer was disturbed");
}

#[tokio::test]
async fn a_blob_larger_than_the_store_keeps_is_streamed_through_and_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::store::StoreConfig {
        max_bytes: Some(1 << 20),
        max_blob_bytes: Some(64 << 10),
        ..crate::store::StoreConfig::default()
    };
    let store = LocalStore::open_with(&dir.path().join("store"), config).unwrap();
    let metrics = crate::store::StoreMetrics::register(&prometheus::Registry::new()).unwrap();
    store.set_metrics(metrics.clone());
    let bytes: Bytes = (0..200_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>().into();
    let digest = Digest::sha256_of(&bytes);
    let origin = Arc::new(Serving { bytes: bytes.clone(), opens: Default::default() });
    let chain = chain_over(&store, dir.path(), origin.clone());
    let entry = upstream_entry("registry.test", bytes.len() as u64);

    let size = bytes.len() as u64;
    assert_eq!(collect(chain.open(&digest, &entry, 0, size).await.unwrap()).await, bytes);
    assert_eq!(collect(chain.open(&digest, &entry, 150_000, size).await.unwrap()).await, &bytes[150_000..]);
    assert_eq!(origin.opens.load(std::sync::atomic::Ordering::SeqCst), 2, "one origin body per read");
    assert!(!store.contains(&digest));
    assert_eq!(std::fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0);
    assert_eq!(metrics.passthrough_value(crate::store::PassReason::TooLarge), 2);
}

#[tokio::test]
async fn a_static_layer_not_yet_written_answers_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store")).unwrap();
    let bytes = Bytes::from_static(b"static layer that did not fit");
    let digest = Digest::sha256_of(&bytes);
    let file = dir.path().join("layer.tar");
    std::fs::write(&file, &bytes).unwrap();
    store.add_pending_static(file, digest.clone());
    let chain = chain(&store, dir.path());
    let entry = BlobEntry { size: bytes.len() as u64, media_type: "x".into(), origin: BlobOrigin::Stored };
    let err = chain.open(&digest, &entry, 0, bytes.len() as u64).await.err().unwrap();
    assert_eq!(err.kind(), crate::ErrorKind::Unavailable, "{err}");
    // The store's background pass writes it; then it is served.
    store.retry_pending_static();
    assert!(!store.is_pending_static(&digest));
    assert_eq!(collect(chain.open(&digest, &entry, 0, bytes.len() as u64).await.unwrap()).await, bytes);
}
