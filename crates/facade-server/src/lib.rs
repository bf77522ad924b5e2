//! The HTTP edge of registry-facade: the pull side of the OCI distribution API.
//!
//! Owns the hyper server (HTTP/1.1 and h2c, or HTTPS with a certificate that is re-read when
//! its files change), `requireAuth` (Basic credentials against a bcrypt htpasswd file, also
//! re-read on change), path parsing, the `/v2/`, manifest and blob handlers (HEAD semantics,
//! Range/206/416, redirects), the **single** error → OCI response edge (`edge.rs`), request
//! metrics, the request limits (head size, URL length, requests per client address, response
//! idle timeout) and the admin listener (`/metrics`, `/ready`, `/live`; never authenticated).
//!
//! It deliberately does not compose images, talk to spec providers or fetch blobs: every
//! request that needs content goes through the [`Backend`] trait, which another crate implements
//! and the binary wires in. The backend decides *what* exists; this crate decides *how* it is
//! put on the wire and which status a failure becomes.

mod admin;
mod app;
mod auth;
mod backend;
mod body;
mod edge;
mod error;
mod handlers;
pub mod headers;
mod limits;
mod metrics;
mod peer;
mod range;
mod reload;
mod router;
mod serve;
mod tls;

pub use admin::{Readiness, WorkspaceProgress, Workspaces, serve_admin, serve_admin_with};
pub use app::{App, ServerConfig};
pub use auth::AuthFile;
pub use backend::{
    Backend, BackendError, BlobBody, BlobContent, BlobOpener, BlobRequest, BlobStream, ByteRange, ErrorKind, LATEST,
    ManifestBody, ManifestRequest, OpenFuture, TagsRequest,
};
pub use body::Body;
pub use error::{Error, Result};
pub use metrics::ServerMetrics;
pub use peer::{PeerAnswer, PeerBlobs, PeerRequest, PeerServerConfig, serve_peers};
pub use range::{RangeOutcome, parse_range};
pub use reload::{FileStamp, file_stamp};
pub use serve::serve;
pub use tls::TlsFiles;
