//! The `remote` provider: one or more gRPC spec servers speaking
//! `/registryfacade.SpecProvider/GetImageSpec`, asked in order until one has the workspace.
//!
//! Connections are lazy: building the provider never touches the network, so the facade starts
//! (and serves `fixed` images) while every spec server is down, and a server that comes back is
//! reconnected to on the next call. Every call has a deadline, retries included, so a provider
//! that blackholes never holds a pull longer than that.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Uri};

use crate::error::{Error, Result, error_chain};
use crate::metrics::{Outcome, SpecMetrics};
use crate::model::ImageSpec;
use crate::proto::GetImageSpecRequest;
use crate::proto::spec_provider_client::SpecProviderClient;
use crate::provider::SpecProvider;

/// Direct content layers travel inside the spec; gRPC's 4 MiB default would turn a workspace
/// with a few MiB of direct content into a failed pull.
const MAX_SPEC_BYTES: usize = 64 << 20;

/// How close to our deadline a DEADLINE_EXCEEDED must come to be our own timeout rather than
/// the server's.
const SLACK: Duration = Duration::from_millis(50);

/// How calls to one spec server are made.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    /// Longest one spec server may take to answer, retries and backoff included. Also the
    /// connect timeout.
    pub timeout: Duration,
    /// Attempts per spec server while it answers UNAVAILABLE (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles per retry, with jitter.
    pub backoff_initial: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            timeout: Duration::from_secs(5),
            max_attempts: 4,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// One spec server.
#[derive(Clone, Debug)]
pub struct GrpcEndpoint {
    /// gRPC target: `dns:///host:port`, `host:port`, or an `http(s)://` URL.
    pub addr: String,
    /// TLS towards it; `None` speaks plaintext HTTP/2.
    pub tls: Option<ClientTls>,
}

/// Client TLS: the CA that signs the server's certificate, optionally our own certificate for
/// mutual TLS, and the name the server's certificate must carry.
#[derive(Clone)]
pub struct ClientTls {
    /// PEM CA bundle.
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and key presented to the server.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name verified against the server certificate instead of the address's host (the
    /// reference facade always uses `ws-manager`).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// The URI tonic connects to for a configured address. gRPC name-resolver prefixes (`dns:`,
/// `passthrough:`) are accepted as the reference's config uses them; the host is resolved by the
/// system resolver on every (re)connect. Schemes other than http(s) are refused.
pub fn target_uri(addr: &str, tls: bool) -> Result<Uri> {
    let bad = |why: &str| Error::Config(format!("spec provider address {addr:?}: {why}"));
    let a = addr.trim();
    if a.is_empty() {
        return Err(bad("empty"));
    }
    let host_port = if let Some(rest) = a.strip_prefix("dns:").or_else(|| a.strip_prefix("passthrough:")) {
        // `dns:///host:port`, `dns://resolver/host:port` (the resolver is ignored) or `dns:host:port`.
        match rest.strip_prefix("//") {
            Some(r) => r.split_once('/').map(|(_, hp)| hp).ok_or_else(|| bad("expected dns:///host:port"))?,
            None => rest,
        }
    } else if a.starts_with("http://") || a.starts_with("https://") {
        if a.starts_with("https://") != tls {
            return Err(bad(if tls {
                "TLS is configured, use https:// or no scheme"
            } else {
                "https:// needs tls settings"
            }));
        }
        a.strip_prefix("http://").or_else(|| a.strip_prefix("https://")).unwrap_or(a)
    } else if let Some((scheme, _)) = a.split_once("://").or_else(|| a.split_once(":/")) {
        return Err(bad(&format!("scheme {scheme:?} is not supported (use host:port)")));
    } else {
        a
    };
    let host_port = host_port.trim_end_matches('/');
    if host_port.is_empty() || host_port.contains(['/', '?', '#', '@']) {
        return Err(bad("expected host:port"));
    }
    let scheme = if tls { "https" } else { "http" };
    let uri: Uri = format!("{scheme}://{host_port}").parse().map_err(|e| bad(&format!("{e}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(uri)
}

struct Backend {
    addr: String,
    client: SpecProviderClient<Channel>,
}

/// The `remote` provider over gRPC spec servers, tried in order; the first spec wins.
///
/// Errors: `NotFound` only when every server said NOT_FOUND; otherwise the first other failure
/// (a down server may be the one that has the workspace, so its failure must not become a 404).
pub struct GrpcSpecProvider {
    name: String,
    backends: Vec<Backend>,
    config: GrpcConfig,
    metrics: Option<SpecMetrics>,
}

impl GrpcSpecProvider {
    /// A provider named `name` (the URL segment, for errors and metrics) over `endpoints`.
    /// Certificates are checked here; nothing connects until the first call. Must be called
    /// within a tokio runtime (channels spawn their connection workers).
    pub fn new(name: &str, endpoints: &[GrpcEndpoint], config: GrpcConfig) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::Config(format!("spec provider {name:?} has no endpoints")));
        }
        let backends = endpoints.iter().map(|e| connect_lazy(e, &config)).collect::<Result<Vec<_>>>()?;
        Ok(GrpcSpecProvider { name: name.to_string(), backends, config, metrics: None })
    }

    /// Records calls into `metrics`.
    pub fn with_metrics(mut self, metrics: SpecMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    async fn call(&self, b: &Backend, id: &str) -> Result<ImageSpec> {
        let started = Instant::now();
        let (outcome, result) = self.call_with_retries(b, id, started + self.config.timeout).await;
        if let Some(m) = &self.metrics {
            m.observe(&self.name, outcome, started.elapsed());
        }
        match &result {
            Ok(_) => tracing::debug!(provider = %self.name, endpoint = %b.addr, id, "got spec"),
            Err(Error::NotFound { .. }) => {
                tracing::debug!(provider = %self.name, endpoint = %b.addr, id, "no such workspace")
            }
            Err(e) => {
                tracing::warn!(provider = %self.name, endpoint = %b.addr, id, outcome = outcome.as_str(), error = %e, "spec provider call failed")
            }
        }
        result
    }

    async fn call_with_retries(&self, b: &Backend, id: &str, deadline: Instant) -> (Outcome, Result<ImageSpec>) {
        let timeout_error = || Error::Unavailable {
            provider: self.name.clone(),
            reason: format!("{}: no answer within {:?}", b.addr, self.config.timeout),
        };
        let mut backoff = self.config.backoff_initial;
        let mut attempt = 1;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return (Outcome::Timeout, Err(timeout_error()));
            }
            let mut request = tonic::Request::new(GetImageSpecRequest { id: id.to_string() });
            // Tells the server our deadline (grpc-timeout); the local timeout below also covers
            // connecting and a server that ignores it.
            request.set_timeout(remaining);
            let mut client = b.client.clone();
            let status = match tokio::time::timeout(remaining, client.get_image_spec(request)).await {
                // tonic enforces the grpc-timeout it sends, too (as CANCELLED "Timeout expired");
                // whichever fires first, the deadline is ours.
                Ok(Err(s))
                    if matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
                        && Instant::now() + SLACK >= deadline =>
                {
                    return (Outcome::Timeout, Err(timeout_error()));
                }
                Err(_) => return (Outcome::Timeout, Err(timeout_error())),
                Ok(Ok(response)) => {
                    let result = match response.into_inner().spec {
                        Some(spec) => ImageSpec::from_proto(id, spec),
                        None => Err(Error::InvalidSpec {
                            id: id.to_string(),
                            reason: "the response carries no spec".into(),
                        }),
                    };
                    let outcome = result.as_ref().map_or_else(Outcome::of_error, |_| Outcome::Ok);
                    return (outcome, result);
                }
                Ok(Err(status)) => status,
            };
            let sleep = jitter(backoff);
            let retry = status.code() == tonic::Code::Unavailable
                && attempt < self.config.max_attempts
                && Instant::now() + sleep < deadline;
            if !retry {
                let e = Error::from_status(&self.name, &b.addr, id, &status);
                return (Outcome::of_error(&e), Err(e));
            }
            tracing::debug!(provider = %self.name, endpoint = %b.addr, id, attempt, error = %status.message(), "spec provider unavailable, retrying");
            if let Some(m) = &self.metrics {
                m.retried(&self.name);
            }
            tokio::time::sleep(sleep).await;
            backoff = (backoff * 2).min(self.config.backoff_max);
            attempt += 1;
        }
    }
}

/// Between half and all of `d`, so replicas that lost the provider together do not retry in step.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

fn connect_lazy(e: &GrpcEndpoint, config: &GrpcConfig) -> Result<Backend> {
    let uri = target_uri(&e.addr, e.tls.is_some())?;
    let mut endpoint = tonic::transport::Endpoint::from(uri)
        .connect_timeout(config.timeout)
        .tcp_nodelay(true)
        // Finds a spec server that vanished without closing the connection (node lost, network
        // partition) before the next call has to wait its whole deadline on it.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(tls) = &e.tls {
        let what = |part: &str| format!("spec provider {:?}: TLS {part}", e.addr);
        check_certificates(&what("CA"), &tls.ca_pem)?;
        if let Some((cert, key)) = &tls.identity {
            check_certificates(&what("client certificate"), cert)?;
            check_key(&what("client key"), key)?;
        }
        let mut t = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &tls.server_name {
            t = t.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(t)
            .map_err(|err| Error::Config(format!("spec provider {:?}: TLS settings: {}", e.addr, error_chain(&err))))?;
    }
    let client = SpecProviderClient::new(endpoint.connect_lazy()).max_decoding_message_size(MAX_SPEC_BYTES);
    Ok(Backend { addr: e.addr.clone(), client })
}

/// rustls skips what is not PEM, so a wrong file would otherwise pass as "no certificates" and
/// only fail at the first handshake, with a less helpful message.
pub(crate) fn check_certificates(what: &str, pem: &[u8]) -> Result<()> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(format!("{what}: no PEM certificate found")));
    }
    Ok(())
}

pub(crate) fn check_key(what: &str, pem: &[u8]) -> Result<()> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject as _;
    PrivateKeyDer::from_pem_slice(pem)
        .map(drop)
        .map_err(|e| Error::Config(format!("{what}: no usable PEM private key: {e}")))
}

impl SpecProvider for GrpcSpecProvider {
    fn get_spec<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ImageSpec>> {
        Box::pin(async move {
            let mut failure = None;
            let mut not_found = None;
            for b in &self.backends {
                match self.call(b, id).await {
                    Ok(spec) => return Ok(spec),
                    Err(e @ Error::NotFound { .. }) => {
                        not_found.get_or_insert(e);
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
            Err(failure
                .or(not_found)
                .unwrap_or_else(|| Error::NotFound { provider: self.name.clone(), id: id.to_string() }))
        })
    }
}

#[cfg(test)]
mod tests;
