//! One pooled hyper client for every upstream host, plus the small pieces every request needs:
//! status classification, bounded body reads, redirect following.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, CONTENT_LENGTH, HOST, LOCATION, PROXY_AUTHORIZATION, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::{HttpConnector, HttpInfo};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use url::Url;

use crate::config::Config;
use crate::dns::DnsPool;
use crate::error::{BoxError, Error, Result};
use crate::proxy::{Connector, Proxies, Route};
use crate::ssrf::{RefusedPeer, SharedPolicy};

/// Blob redirects go to CDNs and object storage; more hops than this is a loop.
pub(crate) const MAX_REDIRECTS: usize = 5;

/// Idle pooled connections are closed after this; registries close theirs at 60-120 s.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// How much of an error or redirect body we read so the connection can go back to the pool.
const DRAIN_LIMIT: usize = 64 << 10;
const DRAIN_TIME: Duration = Duration::from_secs(1);

type HttpClient = HyperClient<HttpsConnector<Connector>, Empty<Bytes>>;

pub(crate) struct Transport {
    http: HttpClient,
    proxies: Arc<Proxies>,
    /// Which addresses upstream connections and redirects may reach (`ssrf.rs`).
    pub(crate) policy: SharedPolicy,
    dns: DnsPool,
    user_agent: HeaderValue,
    pub(crate) metrics: Option<crate::metrics::UpstreamMetrics>,
}

/// The certificates of a PEM bundle; a bundle without any is an error.
pub fn parse_ca_bundle(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config { reason: format!("CA bundle: {e}") })?;
    if certs.is_empty() {
        return Err(Error::Config { reason: "CA bundle holds no PEM certificate".into() });
    }
    Ok(certs)
}

/// The roots every upstream is checked against: the system's CA bundle (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` are honoured, as Go does) plus the configured CA. Mozilla's roots stand in
/// only when the system has no bundle at all (a scratch image without `ca-certificates`).
fn root_store(config: &Config) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    for e in &system.errors {
        tracing::warn!(error = %e, "cannot read part of the system CA bundle");
    }
    let (added, ignored) = roots.add_parsable_certificates(system.certs);
    if added == 0 {
        tracing::warn!(ignored, "no usable system CA certificates; trusting the compiled-in Mozilla roots");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(pem) = &config.extra_ca_pem {
        for cert in parse_ca_bundle(pem)? {
            roots.add(cert).map_err(|e| Error::Config { reason: format!("extra CA certificate: {e}") })?;
        }
    }
    Ok(roots)
}

fn tls_config(config: &Config) -> Result<rustls::ClientConfig> {
    let roots = root_store(config)?;
    // ring, explicitly: the workspace builds no aws-lc.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config { reason: format!("TLS setup: {e}") })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Name resolution threads per client (dns.rs).
const DNS_THREADS: usize = 4;

impl Transport {
    pub(crate) fn new(config: &Config) -> Result<Transport> {
        // Names are resolved on threads of their own, never on the blocking pool (dns.rs).
        let dns = DnsPool::new(DNS_THREADS);
        let mut http = HttpConnector::new_with_resolver(dns.clone());
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let proxies = Arc::new(Proxies::new(&config.proxy)?);
        let policy = SharedPolicy::default();
        let http = Connector::new(http, proxies.clone(), &config.resolve, policy.clone());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(config)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(https);
        let user_agent = HeaderValue::from_str(&config.user_agent)
            .map_err(|_| Error::Config { reason: "user_agent is not a valid header value".into() })?;
        Ok(Transport { http, proxies, policy, dns, user_agent, metrics: None })
    }

    /// One request, no redirects, no auth logic. `host` labels errors.
    pub(crate) async fn exchange(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        host: &str,
    ) -> Result<Response<Incoming>> {
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|_| Error::Protocol { host: host.to_string(), reason: "unusable URL".into() })?;
        // A forward proxy sees the request itself, so its credentials ride on it (a CONNECT
        // tunnel carries them in the CONNECT instead).
        let proxy_auth = match self.proxies.route(&uri) {
            Route::Forward(p) => p.basic_auth().cloned(),
            _ => None,
        };
        let mut req = Request::builder().method(method.clone()).uri(uri);
        if let Some(h) = req.headers_mut() {
            h.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
            h.insert(USER_AGENT, self.user_agent.clone());
            h.remove(HOST);
            h.remove(PROXY_AUTHORIZATION);
            if let Some(a) = proxy_auth {
                h.insert(PROXY_AUTHORIZATION, a);
            }
        }
        let req = req
            .body(Empty::new())
            .map_err(|_| Error::Protocol { host: host.to_string(), reason: "cannot build request".into() })?;
        tracing::trace!(host, method = %method, path = url.path(), "upstream request");
        let started = std::time::Instant::now();
        let answer = self.http.request(req).await;
        if let Some(m) = &self.metrics {
            m.observe(url.path(), answer.as_ref().ok().map(|r| r.status().as_u16()), started.elapsed().as_secs_f64());
        }
        answer.map_err(|e| {
            let connect = e.is_connect();
            let tls = is_tls_failure(&e);
            if let Some(refusal) = refused_peer(&e) {
                return Error::Refused { host: host.to_string(), reason: refusal.to_string() };
            }
            let source: BoxError = Box::new(e);
            if tls {
                Error::Tls { host: host.to_string(), source }
            } else if connect {
                Error::Connect { host: host.to_string(), source }
            } else {
                Error::Transport { host: host.to_string(), source }
            }
        })
    }

    /// Follows 301/302/303/307/308 up to [`MAX_REDIRECTS`] hops. `authz` is sent only to
    /// `auth_origin`: a CDN or object store must never see our registry credentials, and a
    /// signed URL would be refused with them.
    pub(crate) async fn follow(
        &self,
        mut resp: Response<Incoming>,
        mut url: Url,
        req: Redirectable<'_>,
    ) -> Result<Response<Incoming>> {
        let Redirectable { method, headers, authz, auth_origin, host } = req;
        for _ in 0..MAX_REDIRECTS {
            if !is_redirect(resp.status()) {
                return Ok(resp);
            }
            let location = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
                Error::Protocol { host: host.to_string(), reason: format!("{} without Location", resp.status()) }
            })?;
            let next = url.join(location).ok().filter(|u| matches!(u.scheme(), "http" | "https")).ok_or_else(|| {
                Error::Protocol { host: host.to_string(), reason: "unusable redirect Location".into() }
            })?;
            let resp_peer = resp.extensions().get::<HttpInfo>().map(|i| i.remote_addr().ip());
            drain(resp.into_body()).await;
            let mut hop_headers = headers.clone();
            hop_headers.remove(AUTHORIZATION);
            if let Some(a) = authz
                && next.origin() == *auth_origin
            {
                hop_headers.insert(AUTHORIZATION, a.clone());
            }
            let next_host = authority(&next);
            self.check_redirect(&resp_peer, &next, host).await?;
            tracing::debug!(host, to = %next_host, "following upstream redirect");
            resp = self.exchange(method, &next, &hop_headers, &next_host).await?;
            url = next;
        }
        if is_redirect(resp.status()) {
            return Err(Error::TooManyRedirects { host: host.to_string() });
        }
        Ok(resp)
    }
}

impl Transport {
    /// Refuses a redirect hop the address policy does not allow: every address the target
    /// resolves to is checked (a redirect from a public origin may not lead into loopback or
    /// private ranges; link-local, metadata, the facade's own listeners and denied ranges never).
    /// The connector checks the address it really connects to again.
    async fn check_redirect(&self, from: &Option<std::net::IpAddr>, next: &Url, host: &str) -> Result<()> {
        let (Some(from), Some(target)) = (from, next.host_str()) else { return Ok(()) };
        let port = next.port_or_known_default().unwrap_or(443);
        let target = target.trim_start_matches('[').trim_end_matches(']');
        let addrs = match self.dns.lookup(target, port).await {
            Ok(a) => a,
            // Unresolvable: the connection attempt reports it.
            Err(_) => return Ok(()),
        };
        let policy = self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for addr in addrs {
            if let Err(refusal) = policy.check_redirect(*from, addr) {
                tracing::warn!(host, to = %addr, %refusal, "refused an upstream redirect");
                return Err(Error::Refused { host: host.to_string(), reason: refusal.to_string() });
            }
        }
        Ok(())
    }
}

/// The policy's refusal inside a client error, if that is what it is.
fn refused_peer(err: &(dyn std::error::Error + 'static)) -> Option<crate::ssrf::Refusal> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<RefusedPeer>() {
            return Some(r.0);
        }
        cur = e.source();
    }
    None
}

/// What a request that may be redirected needs on every hop.
pub(crate) struct Redirectable<'a> {
    pub(crate) method: &'a Method,
    /// Headers without `Authorization`.
    pub(crate) headers: &'a HeaderMap,
    pub(crate) authz: Option<&'a HeaderValue>,
    pub(crate) auth_origin: &'a url::Origin,
    /// Label for errors.
    pub(crate) host: &'a str,
}

pub(crate) fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// `host[:port]` of a URL, for error labels (never the path or query: signed URLs carry
/// credentials there).
pub(crate) fn authority(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

/// `Retry-After` in seconds; the HTTP-date form is not honoured (clock skew makes it guesswork).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The error for a non-success status. `what` names the missing thing for 404s.
pub(crate) fn status_error(
    host: &str,
    status: StatusCode,
    headers: &HeaderMap,
    what: impl FnOnce() -> String,
) -> Error {
    let host = host.to_string();
    match status.as_u16() {
        401 => Error::Unauthorized { host, status: 401, reason: "credentials missing or refused" },
        403 => Error::Denied { host },
        404 => Error::NotFound { host, what: what() },
        429 => Error::RateLimited { host, retry_after: retry_after(headers) },
        s => Error::Status { host, status: s, retry_after: if s == 503 { retry_after(headers) } else { None } },
    }
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Whether the TLS layer refused the peer (untrusted or wrong-name certificate, no common
/// protocol, an alert): trying again gets the same answer. rustls errors reach us inside an
/// `io::Error`, whose `source()` skips the error it wraps, so both paths are walked.
pub(crate) fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && (inner.downcast_ref::<rustls::Error>().is_some() || is_tls_failure(inner))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Whether a body error means the peer closed before the promised length.
pub(crate) fn is_eof(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::UnexpectedEof
        {
            return true;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && h.is_incomplete_message()
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Reads a whole body of at most `limit` bytes.
pub(crate) async fn read_bounded(resp: Response<Incoming>, limit: u64, host: &str) -> Result<Bytes> {
    let expected = content_length(resp.headers());
    if expected.is_some_and(|n| n > limit) {
        return Err(Error::TooLarge { host: host.to_string(), limit });
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::with_capacity(expected.unwrap_or(0).min(limit) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if is_eof(&e) {
                Error::ShortBody { host: host.to_string(), received: buf.len() as u64, expected: expected.unwrap_or(0) }
            } else {
                Error::Transport { host: host.to_string(), source: Box::new(e) }
            }
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() as u64 + data.len() as u64 > limit {
                return Err(Error::TooLarge { host: host.to_string(), limit });
            }
            buf.extend_from_slice(&data);
        }
    }
    if let Some(n) = expected
        && (buf.len() as u64) < n
    {
        return Err(Error::ShortBody { host: host.to_string(), received: buf.len() as u64, expected: n });
    }
    Ok(buf.freeze())
}

/// Reads and drops a small body so its connection can be reused; gives up quietly.
pub(crate) async fn drain(mut body: Incoming) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut n = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            n += frame.data_ref().map_or(0, |d| d.len());
            if n > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_retry_after_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn rejects_bad_ca_bundles() {
        let cfg = Config { extra_ca_pem: Some("not pem".into()), ..Config::default() };
        assert!(matches!(Transport::new(&cfg), Err(Error::Config { .. })));
        let cfg = Config {
            extra_ca_pem: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
            ..Config::default()
        };
        assert!(matches!(Transport::new(&cfg), Err(Error::Config { .. })));
    }
}
