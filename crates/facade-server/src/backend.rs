//! The contract between the HTTP edge and whatever knows the images: [`Backend`].

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use facade_oci::{Digest, Reference};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// The bytes of one blob response, in order. An `Err` after the headers went out aborts the
/// response (the client sees a short body and resumes with a Range request).
pub type BlobStream = BoxStream<'static, std::result::Result<Bytes, std::io::Error>>;

/// What [`BlobOpener::open`] returns.
pub type OpenFuture = BoxFuture<'static, std::result::Result<BlobStream, BackendError>>;

/// What the server needs from the rest of the facade.
///
/// Both calls are made before any response header is sent, so every failure they return still
/// becomes a proper status and OCI error body. A request that is cancelled (client gone,
/// header deadline) drops the returned future.
pub trait Backend: Send + Sync + 'static {
    /// The composed manifest for `req`. For a digest reference the bytes must hash to it (the
    /// server checks and answers 404 otherwise). `req.accept` lists the media types the client
    /// takes; the backend may use it to pick a family, the server refuses to serve any other.
    fn manifest(
        &self,
        req: ManifestRequest,
    ) -> impl Future<Output = std::result::Result<ManifestBody, BackendError>> + Send;

    /// Metadata of a blob of this workspace's composed image. Must not open content: HEAD never
    /// downloads, and GET opens through [`BlobContent::Stream`] only once the range is known.
    fn blob(&self, req: BlobRequest) -> impl Future<Output = std::result::Result<BlobBody, BackendError>> + Send;

    /// Whether workspace `req` exists, for `GET /v2/<provider>/<id>/tags/list` (which always
    /// lists the one tag a client can pull). `Ok` means it does; [`ErrorKind::NameUnknown`]
    /// (or [`ErrorKind::ManifestUnknown`]) that it does not. The default asks for the
    /// manifest of `latest`, which composes the image; backends that can ask the spec provider
    /// alone should.
    fn workspace_exists(&self, req: TagsRequest) -> impl Future<Output = std::result::Result<(), BackendError>> + Send {
        async move {
            let reference = Reference::parse(LATEST).map_err(|e| BackendError::internal(e.to_string()))?;
            self.manifest(ManifestRequest {
                provider: req.provider,
                id: req.id,
                reference,
                accept: Vec::new(),
                method_head: true,
            })
            .await
            .map(|_| ())
        }
    }
}

/// The one tag every workspace image has: any tag names the current composition, and this is
/// the one clients are told to pull.
pub const LATEST: &str = "latest";

/// A tags list GET or HEAD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagsRequest {
    /// First name segment (`remote`, `fixed`).
    pub provider: String,
    /// The workspace id.
    pub id: String,
}

/// A manifest GET or HEAD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRequest {
    /// First name segment (`remote`, `fixed`).
    pub provider: String,
    /// The rest of the name: the workspace id.
    pub id: String,
    /// Tag or digest from the URL.
    pub reference: Reference,
    /// Media types from all `Accept` headers, parameters stripped, `q=0` entries dropped.
    /// Empty means "any".
    pub accept: Vec<String>,
    /// Whether this is a HEAD (the bytes are still needed for length and digest).
    pub method_head: bool,
}

/// A manifest as it goes on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestBody {
    /// The exact bytes served.
    pub bytes: Bytes,
    /// Sent as `Content-Type`, exactly.
    pub media_type: String,
    /// Digest of `bytes`; sent as `Docker-Content-Digest`.
    pub digest: Digest,
}

/// A blob GET or HEAD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRequest {
    /// First name segment.
    pub provider: String,
    /// The workspace id; the blob must belong to this workspace's composed image.
    pub id: String,
    /// The requested digest.
    pub digest: Digest,
}

/// Blob metadata plus a way to get at the content.
#[derive(Debug)]
pub struct BlobBody {
    /// Total size in bytes; sent as `Content-Length` before the first byte.
    pub size: u64,
    /// Sent as `Content-Type`; empty means `application/octet-stream`.
    pub media_type: String,
    /// Where the bytes come from.
    pub content: BlobContent,
}

/// How a blob's bytes reach the client.
pub enum BlobContent {
    /// 307 redirect to a URL that needs no credentials from us (remote content layers).
    Redirect(String),
    /// Opened only for GET, with the exact byte range to send.
    Stream(Box<dyn BlobOpener>),
}

impl fmt::Debug for BlobContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobContent::Redirect(url) => f.debug_tuple("Redirect").field(url).finish(),
            BlobContent::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// Opens a blob's content for one range. Called at most once per response, never for HEAD,
/// never for a zero-length blob, and only after the range was checked against the size.
pub trait BlobOpener: Send + Sync {
    /// A stream of exactly `range.len()` bytes starting at `range.start`. Fewer or more bytes
    /// abort the response.
    fn open(self: Box<Self>, range: ByteRange) -> OpenFuture;
}

/// An inclusive byte range, always within `0..size` of its blob (so never empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteRange {
    /// First byte offset.
    pub start: u64,
    /// Last byte offset, inclusive.
    pub end_inclusive: u64,
}

impl ByteRange {
    /// The whole of a non-empty blob of `size` bytes.
    pub fn full(size: u64) -> Option<Self> {
        size.checked_sub(1).map(|end_inclusive| ByteRange { start: 0, end_inclusive })
    }

    /// Number of bytes covered.
    pub fn len(&self) -> u64 {
        self.end_inclusive - self.start + 1
    }

    /// Always false: a range covers at least one byte (an empty blob has no range).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Why the backend could not answer. `kind` alone decides the status (see `edge.rs`); the
/// `message` goes to the client except for [`ErrorKind::Internal`], whose text is only logged.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BackendError {
    /// The classification that picks status and OCI code.
    pub kind: ErrorKind,
    /// Human text (shown in pod events by clients).
    pub message: String,
    /// Structured detail for the envelope (upstream host and status, …); `Null` for none.
    pub detail: serde_json::Value,
    /// For rate limiting and unavailability: how long the client should wait.
    pub retry_after: Option<Duration>,
}

impl BackendError {
    /// An error of `kind` without detail.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        BackendError { kind, message: message.into(), detail: serde_json::Value::Null, retry_after: None }
    }

    /// Adds envelope detail.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    /// Adds a `Retry-After` hint.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// `MANIFEST_UNKNOWN`.
    pub fn manifest_unknown(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ManifestUnknown, message)
    }

    /// `BLOB_UNKNOWN`.
    pub fn blob_unknown(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BlobUnknown, message)
    }

    /// `UNAVAILABLE`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// A 500 whose message is logged, never sent.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

/// Classification of a [`BackendError`]; the HTTP status follows from it alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 404 `MANIFEST_UNKNOWN`: unknown provider, workspace, tag or digest.
    ManifestUnknown,
    /// 404 `BLOB_UNKNOWN`: not part of this workspace's image, or no source has it.
    BlobUnknown,
    /// 404 `NAME_UNKNOWN`.
    NameUnknown,
    /// 400 `NAME_INVALID`.
    NameInvalid,
    /// 400 `DIGEST_INVALID`.
    DigestInvalid,
    /// 400 `MANIFEST_INVALID`: e.g. the base image cannot be composed.
    ManifestInvalid,
    /// 401 `UNAUTHORIZED`.
    Unauthorized,
    /// 403 `DENIED`: upstream refused our credentials.
    Denied,
    /// 429 `TOOMANYREQUESTS`, with `Retry-After`.
    RateLimited,
    /// 503 `UNAVAILABLE`: upstream down or timing out.
    Unavailable,
    /// 500 `UNKNOWN`, generic message.
    Internal,
}
