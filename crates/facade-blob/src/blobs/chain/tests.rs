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
    let config = FillConfig { spool_dir: dir.join("spool"), ..FillConfig::default() };
    let fills =
        Fills::with_origin(config, Some(store.clone()), Arc::new(NoOrigin), None, ClusterMetrics::unregistered())
            .unwrap();
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

    let Prepared::Content(blob) = chain.prepare(&digest, &remote(bytes.len() as u64)).unwrap() else {
        panic!("a stored remote layer was redirected")
    };
    // Another process on the same store (a restart hand-over) evicts it right now.
    std::fs::remove_file(store.path_of(&digest).unwrap()).unwrap();
    let got = collect(chain.read(blob, 0, bytes.len() as u64).await.unwrap()).await;
    assert_eq!(got, bytes);

    // Not stored any more: the next request is redirected, never a 404.
    assert!(matches!(chain.prepare(&digest, &remote(bytes.len() as u64)).unwrap(), Prepared::Redirect(_)));
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

    assert!(matches!(chain.prepare(&digest, &lying), Err(Error::ClaimMismatch { .. })));
    assert!(store.contains(&digest), "a manifest's claim removed a verified blob");
    let got = collect(chain.open(&digest, &honest, 0, bytes.len() as u64).await.unwrap()).await;
    assert_eq!(got, bytes);
}
