//! An in-memory `Backend` (the component under test is the HTTP layer) and a loopback server
//! harness driven by a real hyper client.
#![allow(dead_code)]

pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use facade_oci::media_types::{DOCKER_MANIFEST, OCI_MANIFEST};
use facade_oci::{Digest, Reference};
use facade_server::{
    App, Backend, BackendError, BlobBody, BlobContent, BlobOpener, BlobRequest, ByteRange, ErrorKind, ManifestBody,
    ManifestRequest, OpenFuture, Readiness, ServerConfig, ServerMetrics,
};
use futures::StreamExt;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Every wait in these tests is bounded by this.
pub const BOUND: Duration = Duration::from_secs(10);

pub const OCI_BODY: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
pub const DOCKER_BODY: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#;

/// A blob's bytes and how opening it behaves.
#[derive(Clone)]
pub enum Blob {
    Bytes {
        data: Bytes,
        media_type: String,
    },
    Redirect {
        size: u64,
        url: String,
    },
    /// Yields `good` bytes of `data`, then an I/O error.
    FailsAfter {
        data: Bytes,
        good: usize,
    },
    /// Yields fewer bytes than the size claims, then ends.
    Short {
        data: Bytes,
        claimed: u64,
    },
    /// Yields `data` in `chunk`-byte pieces (large blobs: the 7-byte pieces of `Bytes` would
    /// make millions of frames).
    Chunked {
        data: Bytes,
        chunk: usize,
    },
    /// Yields the first chunk, then waits for a permit before the rest.
    Gated {
        data: Bytes,
        first: usize,
        gate: Arc<Semaphore>,
    },
}

#[derive(Default)]
pub struct MemBackend {
    /// (id, tag or digest text) → (bytes, media type).
    pub manifests: HashMap<(String, String), (Bytes, String)>,
    pub blobs: HashMap<(String, String), Blob>,
    pub opens: Arc<AtomicUsize>,
    pub manifest_requests: Mutex<Vec<ManifestRequest>>,
}

impl MemBackend {
    /// Workspace `ws1`: tag `latest` (OCI) and `docker` (Docker), both also by digest.
    pub fn standard() -> Self {
        let mut b = MemBackend::default();
        b.add_manifest("ws1", "latest", OCI_BODY, OCI_MANIFEST);
        b.add_manifest("ws1", "docker", DOCKER_BODY, DOCKER_MANIFEST);
        b
    }

    pub fn add_manifest(&mut self, id: &str, tag: &str, bytes: &'static [u8], media_type: &str) {
        self.add_manifest_bytes(id, tag, Bytes::from_static(bytes), media_type);
    }

    pub fn add_manifest_bytes(&mut self, id: &str, tag: &str, bytes: Bytes, media_type: &str) {
        let digest = Digest::sha256_of(&bytes).to_string();
        for key in [tag.to_string(), digest] {
            self.manifests.insert((id.to_string(), key), (bytes.clone(), media_type.to_string()));
        }
    }

    /// Adds a blob of `data` under its real digest and returns the digest.
    pub fn add_blob(&mut self, id: &str, data: impl Into<Bytes>, media_type: &str) -> Digest {
        let data = data.into();
        let digest = Digest::sha256_of(&data);
        self.blobs
            .insert((id.to_string(), digest.to_string()), Blob::Bytes { data, media_type: media_type.to_string() });
        digest
    }

    pub fn add_special(&mut self, id: &str, digest: &Digest, blob: Blob) {
        self.blobs.insert((id.to_string(), digest.to_string()), blob);
    }

    fn scripted_error(id: &str) -> Option<BackendError> {
        Some(match id {
            "ratelimited" => BackendError::new(ErrorKind::RateLimited, "upstream rate limit")
                .with_retry_after(Duration::from_secs(42))
                .with_detail(serde_json::json!({"host": "registry.example", "status": 429})),
            "denied" => BackendError::new(ErrorKind::Denied, "upstream denied our credentials"),
            "down" => BackendError::unavailable("upstream timed out"),
            "boom" => BackendError::internal("secret internal text: password=hunter2"),
            "invalid" => BackendError::new(ErrorKind::ManifestInvalid, "base image is schema 1"),
            "unauth" => BackendError::new(ErrorKind::Unauthorized, "authentication required"),
            "noname" => BackendError::new(ErrorKind::NameUnknown, "no such repository"),
            _ => return None,
        })
    }
}

impl Backend for MemBackend {
    async fn manifest(&self, req: ManifestRequest) -> Result<ManifestBody, BackendError> {
        self.manifest_requests.lock().unwrap().push(req.clone());
        if req.id == "slow" {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if let Some(e) = Self::scripted_error(&req.id) {
            return Err(e);
        }
        if req.provider != "remote" && req.provider != "fixed" {
            return Err(BackendError::manifest_unknown("unknown provider"));
        }
        // "liar" answers every digest with the `latest` bytes: the server must not serve them.
        let key = match (&req.reference, req.id.as_str()) {
            (Reference::Digest(_), "liar") => ("ws1".to_string(), "latest".to_string()),
            (Reference::Tag(_), "wrongdigest") => ("ws1".to_string(), "latest".to_string()),
            _ => (req.id.clone(), req.reference.to_string()),
        };
        let (bytes, media_type) =
            self.manifests.get(&key).cloned().ok_or_else(|| BackendError::manifest_unknown("no such manifest"))?;
        let digest =
            if req.id == "wrongdigest" { Digest::sha256_of(b"something else") } else { Digest::sha256_of(&bytes) };
        Ok(ManifestBody { bytes, media_type, digest })
    }

    async fn blob(&self, req: BlobRequest) -> Result<BlobBody, BackendError> {
        if let Some(e) = Self::scripted_error(&req.id) {
            return Err(e);
        }
        let blob = self
            .blobs
            .get(&(req.id.clone(), req.digest.to_string()))
            .cloned()
            .ok_or_else(|| BackendError::blob_unknown("blob not in this workspace's image"))?;
        let opens = Arc::clone(&self.opens);
        Ok(match blob {
            Blob::Redirect { size, url } => {
                BlobBody { size, media_type: String::new(), content: BlobContent::Redirect(url) }
            }
            Blob::Bytes { ref data, ref media_type } => BlobBody {
                size: data.len() as u64,
                media_type: media_type.clone(),
                content: BlobContent::Stream(Box::new(MemOpener { blob: blob.clone(), opens })),
            },
            Blob::FailsAfter { ref data, .. } | Blob::Gated { ref data, .. } | Blob::Chunked { ref data, .. } => {
                BlobBody {
                    size: data.len() as u64,
                    media_type: String::new(),
                    content: BlobContent::Stream(Box::new(MemOpener { blob: blob.clone(), opens })),
                }
            }
            Blob::Short { claimed, .. } => BlobBody {
                size: claimed,
                media_type: String::new(),
                content: BlobContent::Stream(Box::new(MemOpener { blob, opens })),
            },
        })
    }
}

struct MemOpener {
    blob: Blob,
    opens: Arc<AtomicUsize>,
}

fn chunked(data: Bytes) -> Vec<Result<Bytes, std::io::Error>> {
    (0..data.len()).step_by(7).map(|i| Ok(data.slice(i..(i + 7).min(data.len())))).collect()
}

impl BlobOpener for MemOpener {
    fn open(self: Box<Self>, range: ByteRange) -> OpenFuture {
        self.opens.fetch_add(1, Ordering::SeqCst);
        let (start, end) = (range.start as usize, range.end_inclusive as usize + 1);
        Box::pin(async move {
            Ok(match self.blob {
                Blob::Bytes { data, .. } => futures::stream::iter(chunked(data.slice(start..end))).boxed(),
                Blob::FailsAfter { data, good } => {
                    let mut items = chunked(data.slice(start..good.max(start)));
                    items.push(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "upstream reset")));
                    futures::stream::iter(items).boxed()
                }
                Blob::Short { data, .. } => futures::stream::iter(chunked(data)).boxed(),
                Blob::Chunked { data, chunk } => {
                    let data = data.slice(start..end);
                    let pieces: Vec<Result<Bytes, std::io::Error>> = (0..data.len())
                        .step_by(chunk.max(1))
                        .map(|i| Ok(data.slice(i..(i + chunk.max(1)).min(data.len()))))
                        .collect();
                    futures::stream::iter(pieces).boxed()
                }
                Blob::Gated { data, first, gate } => {
                    let head = data.slice(start..first);
                    let tail = data.slice(first..end);
                    let rest = futures::stream::once(async move {
                        let permit = gate.acquire().await.map_err(std::io::Error::other)?;
                        permit.forget();
                        Ok(tail)
                    });
                    futures::stream::iter([Ok(head)]).chain(rest).boxed()
                }
                Blob::Redirect { .. } => futures::stream::empty().boxed(),
            })
        })
    }
}

/// A facade-server on 127.0.0.1:0 plus its admin listener.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub backend: Arc<MemBackend>,
    pub registry: prometheus::Registry,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    pub admin_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(config: ServerConfig, backend: MemBackend) -> Self {
        Self::try_start(config, backend).await.unwrap()
    }

    /// Builds the app with [`App::try_new`]: a bad TLS or htpasswd file is an error.
    pub async fn try_start(config: ServerConfig, backend: MemBackend) -> Result<Self, facade_server::Error> {
        let registry = prometheus::Registry::new();
        let metrics = ServerMetrics::register(&registry).unwrap();
        let backend = Arc::new(backend);
        let app = App::try_new(config, Arc::clone(&backend), metrics)?;
        Ok(Self::serve(app, backend, registry).await)
    }

    /// Builds the app with the lenient [`App::new`].
    pub async fn start_lenient(config: ServerConfig, backend: MemBackend) -> Self {
        let registry = prometheus::Registry::new();
        let metrics = ServerMetrics::register(&registry).unwrap();
        let backend = Arc::new(backend);
        let app = App::new(config, Arc::clone(&backend), metrics);
        Self::serve(app, backend, registry).await
    }

    async fn serve(app: App<MemBackend>, backend: Arc<MemBackend>, registry: prometheus::Registry) -> Self {
        let app = Arc::new(app);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let readiness = Readiness::new();
        let task = tokio::spawn(facade_server::serve(listener, app, shutdown.clone()));
        let admin_task =
            tokio::spawn(facade_server::serve_admin(admin, registry.clone(), readiness.clone(), shutdown.clone()));
        TestServer { addr, admin_addr, backend, registry, readiness, shutdown, task, admin_task }
    }

    /// The value of one counter series, e.g. `("registry_facade_auth_failures_total",
    /// &[("reason", "missing")])`; 0 when absent.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        for family in self.registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let pairs = m.get_label();
                if labels.iter().all(|(k, v)| pairs.iter().any(|p| p.name() == *k && p.value() == *v)) {
                    return m.get_counter().get_value() as u64;
                }
            }
        }
        0
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
        self.admin_task.abort();
    }
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn http1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Bytes, String>,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    pub fn bytes(&self) -> &Bytes {
        self.body.as_ref().expect("complete body")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.bytes()).expect("JSON body")
    }

    pub fn code(&self) -> String {
        self.json()["errors"][0]["code"].as_str().unwrap_or("").to_string()
    }
}

pub async fn send(client: &HttpClient, method: Method, url: &str, headers: &[(&str, &str)]) -> Reply {
    try_send(client, method, url, headers).await.expect("response")
}

/// Like [`send`], but a failure before the response headers is returned, not a panic.
pub async fn try_send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(BOUND, client.request(req.body(Empty::new()).unwrap()))
        .await
        .expect("response headers within bound")
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(BOUND, body.collect())
        .await
        .expect("body within bound")
        .map(|c| c.to_bytes())
        .map_err(|e| format!("{e:?}"));
    Ok(Reply { status: parts.status, headers: parts.headers, body })
}

pub async fn get(client: &HttpClient, url: &str) -> Reply {
    send(client, Method::GET, url, &[]).await
}

/// An [`App`] over the standard in-memory backend, for tests that call `App::handle` directly.
pub fn in_process_app(config: ServerConfig) -> App<MemBackend> {
    let registry = prometheus::Registry::new();
    let metrics = ServerMetrics::register(&registry).unwrap();
    App::new(config, Arc::new(MemBackend::standard()), metrics)
}

/// One request through `App::handle`, without sockets: the response head and the whole body.
pub async fn call(app: &App<MemBackend>, method: Method, uri: &str) -> (http::Response<()>, Bytes) {
    let req = Request::builder().method(method).uri(uri).body(()).unwrap();
    let resp: http::Response<facade_server::Body> = app.handle(req).await;
    let (parts, body) = resp.into_parts();
    (http::Response::from_parts(parts, ()), body.collect().await.unwrap().to_bytes())
}
