//! The client registry-facade uses to talk to upstream OCI registries.
//!
//! Owns: one pooled HTTP/1.1 + HTTP/2 client (rustls with ring, the system's CA bundle plus an
//! optional CA bundle) shared by every host, through `HTTPS_PROXY`/`HTTP_PROXY` unless
//! `NO_PROXY` says otherwise; plain HTTP for loopback and configured hosts; Docker Hub
//! host and `library/` mapping; Bearer and Basic auth with credentials from a docker
//! `config.json`, a bounded token cache per (registry host, realm, service, scope) and the
//! scheme remembered per (host, repository) so warm requests skip the 401 round trip;
//! HEAD-by-tag resolution; manifest and config fetches that are bounded and digest-checked;
//! retries of those (and of the token requests they need) with backoff inside a budget; ranged
//! blob streams with redirects, `Accept-Encoding: identity` and stall detection; the
//! classification of every failure ([`Error::kind`], [`Error::is_retryable`],
//! [`Error::retry_after`]); and the address policy against request forgery ([`ssrf`]).
//!
//! Deliberately not here: resuming blob bodies (the blob fill does, at its offset), caching of
//! manifests or tag resolutions, digest verification of blob streams (the caller hashes while
//! it streams), and choosing a platform from an index.
//!
//! No error, log line or `Debug` output carries a credential, a token or a full URL.

mod auth;
mod blob;
pub mod challenge;
mod client;
mod config;
mod dns;
mod docker_auth;
mod error;
pub mod host;
mod metrics;
mod proxy;
mod retry;
pub mod ssrf;
mod transport;

pub use blob::BlobStream;
pub use client::{Client, DOCKER_CONTENT_DIGEST, FetchedManifest, Resolved};
pub use config::{Config, DEFAULT_RETRY_BUDGET};
pub use docker_auth::DockerAuth;
pub use error::{BoxError, Error, ErrorDetail, ErrorKind, Result};
pub use metrics::UpstreamMetrics;
pub use proxy::ProxyConfig;
pub use transport::parse_ca_bundle;
