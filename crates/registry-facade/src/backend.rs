//! Connects the HTTP edge (facade-server's `Backend`) to composed images and the blob chain
//! (facade-blob), and maps blob-side error kinds to the edge's — the one place that decides
//! which route sees which OCI code.

use std::sync::Arc;

use facade_blob::{BlobChain, ErrorKind as K, Images, Prefetcher, Prepared, PreparedBlob};
use facade_server::{
    BackendError, BlobBody, BlobContent, BlobOpener, BlobRequest, ByteRange, ErrorKind, ManifestBody, ManifestRequest,
    OpenFuture, TagsRequest,
};

/// Images plus the blob chain.
pub struct Engine {
    /// Composed images.
    pub images: Images,
    /// Blob sources.
    pub chain: Arc<BlobChain>,
    /// Prefetch on manifest, warm-up and their progress.
    pub prefetch: Arc<Prefetcher>,
}

#[derive(Clone, Copy)]
enum Route {
    Manifest,
    Blob,
}

fn map_error(e: facade_blob::Error, route: Route) -> BackendError {
    let kind = match (e.kind(), route) {
        // Unknown provider or workspace: the readiness probe relies on MANIFEST_UNKNOWN on the
        // manifest route; on the blob route the blob is what is unknown.
        (K::ManifestUnknown, Route::Manifest) => ErrorKind::ManifestUnknown,
        (K::ManifestUnknown, Route::Blob) | (K::BlobUnknown, _) => ErrorKind::BlobUnknown,
        (K::Invalid, _) => ErrorKind::ManifestInvalid,
        (K::Denied, _) => ErrorKind::Denied,
        (K::RateLimited, _) => ErrorKind::RateLimited,
        (K::Unavailable, _) => ErrorKind::Unavailable,
        (K::Internal, _) => ErrorKind::Internal,
        // A request never waits on a cancelled fill (only a fill nobody reads is cancelled).
        (K::Cancelled, _) => ErrorKind::Unavailable,
    };
    let mut out = BackendError::new(kind, e.to_string()).with_detail(e.detail());
    if let Some(ra) = e.retry_after() {
        out = out.with_retry_after(ra);
    }
    out
}

impl facade_server::Backend for Engine {
    async fn manifest(&self, req: ManifestRequest) -> Result<ManifestBody, BackendError> {
        self.prefetch.touch(&req.provider, &req.id);
        let img = self
            .images
            .manifest(&req.provider, &req.id, &req.reference)
            .await
            .map_err(|e| map_error(e, Route::Manifest))?;
        // A GET means a pull is starting (a HEAD is often only a tag check): fill the layers
        // before the client asks for them.
        if !req.method_head {
            self.prefetch.manifest_served(&req.provider, &req.id, &img);
        }
        Ok(ManifestBody {
            bytes: img.manifest.clone(),
            media_type: img.media_type.clone(),
            digest: img.manifest_digest.clone(),
        })
    }

    async fn blob(&self, req: BlobRequest) -> Result<BlobBody, BackendError> {
        self.prefetch.touch(&req.provider, &req.id);
        let entry =
            self.images.blob(&req.provider, &req.id, &req.digest).await.map_err(|e| map_error(e, Route::Blob))?;
        let prepared = self.chain.prepare(&req.digest, &entry).await.map_err(|e| {
            // One workspace's manifest disagrees with a verified blob others rely on: only this
            // request fails, and operators learn which workspace claimed what.
            if let facade_blob::Error::ClaimMismatch { claimed, stored, .. } = &e {
                tracing::warn!(
                    provider = %req.provider, workspace = %req.id, digest = %req.digest, claimed, stored,
                    "a workspace's manifest claims another size for a stored blob; refusing that request only"
                );
            }
            map_error(e, Route::Blob)
        })?;
        let content = match prepared {
            Prepared::Redirect(url) => BlobContent::Redirect(url),
            Prepared::Content(blob) => BlobContent::Stream(Box::new(Opener { chain: self.chain.clone(), blob })),
        };
        Ok(BlobBody { size: entry.size, media_type: entry.media_type, content })
    }

    /// Asks the spec provider only (through its cache): listing tags must not compose the
    /// image or touch upstream.
    async fn workspace_exists(&self, req: TagsRequest) -> Result<(), BackendError> {
        let providers = self.images.providers();
        let provider =
            providers.get(&req.provider).map_err(|e| BackendError::new(ErrorKind::NameUnknown, e.to_string()))?;
        match provider.get_spec(&req.id).await {
            // An invalid spec still names a workspace; its manifest request says what is wrong.
            Ok(_) | Err(facade_spec::Error::InvalidSpec { .. }) => Ok(()),
            Err(e @ facade_spec::Error::NotFound { .. }) => {
                Err(BackendError::new(ErrorKind::NameUnknown, e.to_string()))
            }
            Err(e @ facade_spec::Error::Unavailable { .. }) => Err(BackendError::unavailable(e.to_string())),
            Err(e) => Err(BackendError::internal(e.to_string())),
        }
    }
}

struct Opener {
    chain: Arc<BlobChain>,
    blob: PreparedBlob,
}

impl BlobOpener for Opener {
    fn open(self: Box<Self>, range: ByteRange) -> OpenFuture {
        Box::pin(async move {
            self.chain
                .read(self.blob, range.start, range.end_inclusive + 1)
                .await
                .map_err(|e| map_error(e, Route::Blob))
        })
    }
}

/// The admin API's warm-up and progress: compose now (so an unknown workspace is a 404 before
/// anything is promised), then fill in the background.
impl facade_server::Workspaces for Engine {
    fn prepare<'a>(
        &'a self,
        provider: &'a str,
        id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let img = self.images.image(provider, id).await.map_err(|e| map_error(e, Route::Manifest))?;
            self.prefetch.warm_up(provider, id, &img).map_err(|e| map_error(e, Route::Manifest))
        })
    }

    fn progress(&self, provider: &str, id: &str) -> Option<facade_server::WorkspaceProgress> {
        let report = self.prefetch.progress(provider, id)?;
        let json = serde_json::to_vec(&report).ok()?;
        Some(facade_server::WorkspaceProgress { json: bytes::Bytes::from(json), finished: report.is_finished() })
    }
}
