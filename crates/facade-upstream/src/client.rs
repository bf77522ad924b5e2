//! The upstream registry client.

use std::future::Future;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use facade_oci::media_types::{self as mt, MANIFEST_ACCEPT};
use facade_oci::{Digest, ParsedManifest, Reference, RepoName};
use http::header::{
    ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_RANGE, CONTENT_TYPE, RANGE, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;
use url::Url;

use crate::auth::{AuthState, Plan, Sent, basic_header, bearer_header, token_key};
use crate::blob::{BlobStream, body_stream, parse_content_range};
use crate::challenge::{self, Challenge};
use crate::config::Config;
use crate::docker_auth::DockerAuth;
use crate::error::{Error, Result};
use crate::host::{api_host, api_repo, scheme_for};
use crate::retry::{Retry, retrying};
use crate::transport::{Redirectable, Transport, content_length, drain, read_bounded, status_error};

/// `Docker-Content-Digest`.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// What a manifest reference points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The manifest's digest.
    pub digest: Digest,
    /// Its media type (manifest or index).
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A fetched manifest or index with its original bytes.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// The exact bytes upstream sent.
    pub bytes: Bytes,
    /// The media type (the document's `mediaType`, else `Content-Type`).
    pub media_type: String,
    /// The digest of `bytes` (the requested one when fetched by digest, else sha256).
    pub digest: Digest,
}

/// The upstream client. Cheap to clone; build one per process so connections and tokens are
/// shared by every pull.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    config: Config,
    auth: RwLock<Arc<AuthState>>,
}

/// Where a request goes.
struct Target {
    host: String,
    repo: String,
    scheme: &'static str,
}

impl Target {
    fn url(&self, path: &str) -> Result<Url> {
        Url::parse(&format!("{}://{}{}", self.scheme, self.host, path))
            .map_err(|_| Error::InvalidHost { host: self.host.clone() })
    }
}

fn media_type_of(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let ct = ct.split(';').next().unwrap_or("").trim();
    (!ct.is_empty()).then(|| ct.to_ascii_lowercase())
}

fn header_digest(headers: &HeaderMap) -> Option<std::result::Result<Digest, ()>> {
    let v = headers.get(DOCKER_CONTENT_DIGEST)?;
    Some(v.to_str().ok().and_then(|s| Digest::parse(s.trim()).ok()).ok_or(()))
}

fn manifest_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
    h
}

fn blob_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    // A transfer-compressed body would break byte counts, offsets and digests (quay/quay#1310).
    h.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    h
}

/// The digest of `bytes` in `want`'s algorithm.
fn hash_as(want: &Digest, bytes: &[u8], host: &str) -> Result<Digest> {
    let mut h = want.hasher().ok_or_else(|| Error::Protocol {
        host: host.to_string(),
        reason: format!("cannot verify digest algorithm {}", want.algorithm()),
    })?;
    h.update(bytes);
    Ok(h.finish())
}

fn verify(want: &Digest, bytes: &[u8], host: &str) -> Result<()> {
    let actual = hash_as(want, bytes, host)?;
    if actual != *want {
        return Err(Error::DigestMismatch { host: host.to_string(), expected: want.clone(), actual });
    }
    Ok(())
}

fn reject_encoded(resp: &Response<Incoming>, host: &str) -> Result<()> {
    match resp.headers().get(CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None => Ok(()),
        Some(e) if e.trim().eq_ignore_ascii_case("identity") => Ok(()),
        Some(_) => Err(Error::Protocol {
            host: host.to_string(),
            reason: "content-encoded body despite Accept-Encoding: identity".into(),
        }),
    }
}

impl Client {
    /// Builds the client: one connection pool for all hosts, HTTP/2 where TLS offers it.
    pub fn new(config: Config, auth: DockerAuth) -> Result<Client> {
        Self::with_metrics(config, auth, None)
    }

    /// [`Client::new`] that also counts every upstream request in `metrics`.
    pub fn with_metrics(
        config: Config,
        auth: DockerAuth,
        metrics: Option<crate::metrics::UpstreamMetrics>,
    ) -> Result<Client> {
        let mut transport = Transport::new(&config)?;
        transport.metrics = metrics;
        Ok(Client { inner: Arc::new(Inner { transport, config, auth: RwLock::new(Arc::new(AuthState::new(auth))) }) })
    }

    /// Replaces the credentials. Cached tokens and learned auth schemes are dropped with the
    /// old ones; requests already running finish with what they started with.
    pub fn set_auth(&self, auth: DockerAuth) {
        let fresh = Arc::new(AuthState::new(auth));
        *self.inner.auth.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    /// Sets which addresses upstream connections and redirects may reach (the binary calls
    /// this once its listeners are bound: their addresses are part of the policy).
    pub fn set_address_policy(&self, policy: crate::ssrf::Policy) {
        *self.inner.transport.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    fn auth(&self) -> Arc<AuthState> {
        self.inner.auth.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn target(&self, registry: &str, repo: &RepoName) -> Result<Target> {
        let host = api_host(registry)?;
        let scheme = scheme_for(&host, &self.inner.config.plain_http_hosts);
        let repo = api_repo(&host, repo.as_str());
        Ok(Target { host, repo, scheme })
    }

    async fn deadline<T>(&self, t: &Target, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let timeout = self.inner.config.metadata_timeout;
        tokio::time::timeout(timeout, fut).await.map_err(|_| Error::Timeout { host: t.host.clone(), timeout })?
    }

    /// `attempt` retried within the retry budget, all of it within `metadata_timeout`.
    async fn retried<T, F, Fut>(&self, t: &Target, kind: &'static str, attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let r = Retry { kind, budget: self.inner.config.retry_budget, metrics: self.inner.transport.metrics.as_ref() };
        self.deadline(t, retrying(r, attempt)).await
    }

    /// The Authorization header to send before any challenge, from what this (host, repo)
    /// asked for last time.
    async fn preauth(&self, state: &AuthState, t: &Target) -> Result<(Option<HeaderValue>, Sent)> {
        match state.plan(&t.host, &t.repo) {
            None => Ok((None, Sent::Nothing)),
            Some(Plan::Basic) => Ok(match basic_header(&state.creds, &t.host) {
                Some(h) => (Some(h), Sent::Basic),
                None => (None, Sent::Nothing),
            }),
            Some(Plan::Bearer(key)) => {
                let (value, fresh) = state.token(&self.inner.transport, &t.host, &key, None).await?;
                let h = bearer_header(&value);
                Ok((h, Sent::Token { key, value, fresh }))
            }
        }
    }

    /// Answers a 401: a cached token that was refused is replaced once; fresh credentials that
    /// were refused end the request.
    async fn answer_401(
        &self,
        state: &AuthState,
        t: &Target,
        sent: Sent,
        challenges: &[Challenge],
    ) -> Result<(Option<HeaderValue>, Sent)> {
        let refused = |reason| Error::Unauthorized { host: t.host.clone(), status: 401, reason };
        match &sent {
            Sent::Basic => return Err(refused("registry refused the credentials")),
            Sent::Token { key, value, fresh: true } => {
                state.forget(key, value).await;
                return Err(refused("registry refused a fresh token"));
            }
            _ => {}
        }
        let bearer = challenges.iter().filter(|c| c.scheme == "bearer").find_map(|c| token_key(c, &t.repo));
        if let Some(key) = bearer {
            let not = match sent {
                Sent::Token { key: old, value, .. } => {
                    state.forget(&old, &value).await;
                    Some(value)
                }
                _ => None,
            };
            let (value, fresh) = state.token(&self.inner.transport, &t.host, &key, not.as_deref()).await?;
            state.remember(&t.host, &t.repo, Plan::Bearer(key.clone()));
            let h = bearer_header(&value);
            return Ok((h, Sent::Token { key, value, fresh }));
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let h = basic_header(&state.creds, &t.host)
                .ok_or_else(|| refused("registry wants credentials and none are configured"))?;
            state.remember(&t.host, &t.repo, Plan::Basic);
            return Ok((Some(h), Sent::Basic));
        }
        Err(refused("no supported authentication challenge"))
    }

    /// Sends a request to the registry, answering auth challenges, and follows redirects.
    async fn send(&self, t: &Target, method: Method, path: &str, headers: HeaderMap) -> Result<Response<Incoming>> {
        let transport = &self.inner.transport;
        let state = self.auth();
        let url = t.url(path)?;
        let origin = url.origin();
        let (mut authz, mut sent) = self.preauth(&state, t).await?;
        // Nothing sent → challenge → cached token refused → fresh token: at most three sends.
        for _ in 0..3 {
            let mut h = headers.clone();
            if let Some(a) = &authz {
                h.insert(AUTHORIZATION, a.clone());
            }
            let resp = transport.exchange(&method, &url, &h, &t.host).await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                let hop = Redirectable {
                    method: &method,
                    headers: &headers,
                    authz: authz.as_ref(),
                    auth_origin: &origin,
                    host: &t.host,
                };
                return transport.follow(resp, url, hop).await;
            }
            let text: Vec<String> = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            let challenges = challenge::parse(&text.join(", "));
            drain(resp.into_body()).await;
            (authz, sent) = self.answer_401(&state, t, sent, &challenges).await?;
        }
        Err(Error::Unauthorized { host: t.host.clone(), status: 401, reason: "authentication did not settle" })
    }

    /// Resolves a reference to a descriptor with HEAD (Docker Hub does not count HEAD as a
    /// pull). Falls back to GET when HEAD gives no usable `Docker-Content-Digest`, media type
    /// or length. For a digest reference a different announced digest is a mismatch.
    /// Transient failures are retried within `retry_budget`.
    pub async fn resolve(&self, registry: &str, repo: &RepoName, reference: &Reference) -> Result<Resolved> {
        let t = self.target(registry, repo)?;
        self.retried(&t, "tag", || self.resolve_once(&t, reference)).await
    }

    async fn resolve_once(&self, t: &Target, reference: &Reference) -> Result<Resolved> {
        let path = format!("/v2/{}/manifests/{reference}", t.repo);
        let resp = self.send(t, Method::HEAD, &path, manifest_headers()).await?;
        let h = resp.headers();
        if !resp.status().is_success() {
            return Err(status_error(&t.host, resp.status(), h, || format!("manifest {reference} in {}", t.repo)));
        }
        let digest = header_digest(h).and_then(|d| d.ok());
        let media_type = media_type_of(h).filter(|m| mt::is_index(m) || mt::is_image_manifest(m));
        if let (Some(digest), Some(media_type), Some(size)) = (digest, media_type, content_length(h)) {
            if let Reference::Digest(want) = reference
                && *want != digest
            {
                return Err(Error::DigestMismatch { host: t.host.clone(), expected: want.clone(), actual: digest });
            }
            return Ok(Resolved { digest, media_type, size });
        }
        drop(resp);
        tracing::debug!(host = %t.host, repo = %t.repo, %reference, "HEAD gave no digest, media type or length; resolving with GET");
        let m = self.fetch_manifest(t, reference).await?;
        Ok(Resolved { size: m.bytes.len() as u64, digest: m.digest, media_type: m.media_type })
    }

    /// GETs a manifest or index with the full Accept set. Fetched by digest, the bytes must
    /// hash to it; fetched by tag, the sha256 of the bytes is the digest and must agree with
    /// `Docker-Content-Digest` when upstream sends one. Transient failures are retried within
    /// `retry_budget`; a digest mismatch is not.
    pub async fn manifest(&self, registry: &str, repo: &RepoName, reference: &Reference) -> Result<FetchedManifest> {
        let t = self.target(registry, repo)?;
        self.retried(&t, "manifest", || self.fetch_manifest(&t, reference)).await
    }

    async fn fetch_manifest(&self, t: &Target, reference: &Reference) -> Result<FetchedManifest> {
        let path = format!("/v2/{}/manifests/{reference}", t.repo);
        let resp = self.send(t, Method::GET, &path, manifest_headers()).await?;
        if !resp.status().is_success() {
            return Err(status_error(&t.host, resp.status(), resp.headers(), || {
                format!("manifest {reference} in {}", t.repo)
            }));
        }
        let headers = resp.headers().clone();
        let bytes = read_bounded(resp, self.inner.config.max_metadata_bytes, &t.host).await?;
        let content_type = media_type_of(&headers);
        let parsed = ParsedManifest::parse(&bytes, content_type.as_deref())
            .map_err(|e| Error::Protocol { host: t.host.clone(), reason: e.to_string() })?;
        let media_type = match parsed {
            ParsedManifest::Image(m) => m.media_type,
            ParsedManifest::Index(i) => i.media_type,
        };
        let digest = match reference {
            Reference::Digest(want) => {
                verify(want, &bytes, &t.host)?;
                want.clone()
            }
            Reference::Tag(_) => {
                let computed = Digest::sha256_of(&bytes);
                match header_digest(&headers) {
                    None => {}
                    Some(Err(())) => {
                        return Err(Error::Protocol {
                            host: t.host.clone(),
                            reason: "invalid Docker-Content-Digest".into(),
                        });
                    }
                    // A sha512 announcement is checked in its own algorithm; we still name the
                    // manifest by sha256 like everything we serve.
                    Some(Ok(announced)) if announced.is_verifiable() => verify(&announced, &bytes, &t.host)?,
                    Some(Ok(_)) => {}
                }
                computed
            }
        };
        Ok(FetchedManifest { bytes, media_type, digest })
    }

    /// GETs a small blob (an image config) whole, bounded by `max_metadata_bytes`, and checks
    /// it against `digest`. Transient failures are retried within `retry_budget`; a digest
    /// mismatch is not.
    pub async fn blob_bytes(&self, registry: &str, repo: &RepoName, digest: &Digest) -> Result<Bytes> {
        let t = self.target(registry, repo)?;
        self.retried(&t, "config", || self.blob_bytes_once(&t, digest)).await
    }

    async fn blob_bytes_once(&self, t: &Target, digest: &Digest) -> Result<Bytes> {
        let path = format!("/v2/{}/blobs/{digest}", t.repo);
        let resp = self.send(t, Method::GET, &path, blob_headers()).await?;
        if !resp.status().is_success() {
            return Err(status_error(&t.host, resp.status(), resp.headers(), || {
                format!("blob {digest} in {}", t.repo)
            }));
        }
        reject_encoded(&resp, &t.host)?;
        let bytes = read_bounded(resp, self.inner.config.max_metadata_bytes, &t.host).await?;
        verify(digest, &bytes, &t.host)?;
        Ok(bytes)
    }

    /// Opens a blob body, from byte `offset` when it is not 0 (`Range: bytes=offset-`).
    /// Redirects are followed (at most 5 hops, `Authorization` only to the registry's own
    /// origin). With `offset > 0` only a 206 starting at `offset` is accepted; a 200 is
    /// `Error::RangeIgnored` so the caller can choose to skip or give up. Headers must arrive
    /// within `metadata_timeout`; the body then fails when it stalls for `read_timeout`. The
    /// digest is not checked here.
    pub async fn blob_stream(
        &self,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobStream> {
        let t = self.target(registry, repo)?;
        let resp = self
            .deadline(&t, async {
                let path = format!("/v2/{}/blobs/{digest}", t.repo);
                let mut headers = blob_headers();
                if offset > 0 {
                    let range = HeaderValue::from_str(&format!("bytes={offset}-"))
                        .map_err(|_| Error::Protocol { host: t.host.clone(), reason: "range".into() })?;
                    headers.insert(RANGE, range);
                }
                self.send(&t, Method::GET, &path, headers).await
            })
            .await?;
        let status = resp.status();
        let h = resp.headers();
        let length = content_length(h);
        let total_size = match status {
            StatusCode::OK if offset > 0 => return Err(Error::RangeIgnored { host: t.host.clone(), offset }),
            StatusCode::OK => length,
            StatusCode::PARTIAL_CONTENT => {
                let cr = h.get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(parse_content_range);
                match cr {
                    Some((first, _, total)) if first == offset => total,
                    Some(_) => {
                        return Err(Error::Protocol {
                            host: t.host.clone(),
                            reason: format!("206 does not start at byte {offset}"),
                        });
                    }
                    None => {
                        return Err(Error::Protocol {
                            host: t.host.clone(),
                            reason: "206 without a valid Content-Range".into(),
                        });
                    }
                }
            }
            s if s.is_success() => {
                return Err(Error::Protocol {
                    host: t.host.clone(),
                    reason: format!("unexpected status {s} for a blob"),
                });
            }
            s => return Err(status_error(&t.host, s, h, || format!("blob {digest} in {}", t.repo))),
        };
        reject_encoded(&resp, &t.host)?;
        let body = body_stream(resp.into_body(), t.host.clone(), offset, length, self.inner.config.read_timeout);
        Ok(BlobStream { total_size, offset, body })
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("config", &self.inner.config).finish_non_exhaustive()
    }
}
