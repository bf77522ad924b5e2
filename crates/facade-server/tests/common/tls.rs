//! A test CA made at run time, leaf certificates for `localhost`/`127.0.0.1`, and a rustls
//! client that trusts only that CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use facade_server::TlsFiles;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::BOUND;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A leaf certificate and its key, PEM, plus the DER a handshake presents.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { issuer: Issuer::new(params, key), pem }
    }

    /// A server certificate for `localhost` and `127.0.0.1`; `cn` tells leaves apart in failures.
    pub fn leaf(&self, cn: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

/// Writes `leaf` as `dir/tls.crt` and `dir/tls.key` (plain overwrites, certificate first, as a
/// careless operator would) and returns the paths.
pub fn write_leaf(dir: &Path, leaf: &Leaf) -> TlsFiles {
    let files = TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key") };
    std::fs::write(&files.cert, &leaf.cert_pem).unwrap();
    std::fs::write(&files.key, &leaf.key_pem).unwrap();
    files
}

/// A client config trusting only `ca`; built fresh per handshake, so no session is resumed and
/// every handshake sees the server's current certificate.
pub fn client_config(ca: &Ca, alpn: &[&[u8]], versions: &[&'static SupportedProtocolVersion]) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

pub async fn connect(addr: SocketAddr, config: ClientConfig) -> Result<TlsStream<TcpStream>, String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))
    };
    tokio::time::timeout(BOUND, attempt).await.map_err(|_| "handshake did not finish in time".to_string())?
}

/// A TLS 1.3 or 1.2 handshake offering `h2` and `http/1.1`.
pub async fn handshake(addr: SocketAddr, ca: &Ca) -> Result<TlsStream<TcpStream>, String> {
    connect(addr, client_config(ca, &[b"h2", b"http/1.1"], rustls::DEFAULT_VERSIONS)).await
}

/// The leaf certificate the server presented.
pub fn presented(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Handshakes until the server presents `want` (true) or the bound passes (false).
pub async fn wait_for_leaf(addr: SocketAddr, ca: &Ca, want: &Leaf) -> bool {
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        if let Ok(s) = handshake(addr, ca).await
            && presented(&s) == want.der
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

pub struct TlsReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TlsReply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    pub fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        v["errors"][0]["code"].as_str().unwrap_or("").to_string()
    }
}

/// An HTTP connection over TLS: HTTP/2 when ALPN chose it, else HTTP/1.1.
pub enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    pub async fn new(stream: TlsStream<TcpStream>) -> Self {
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Conn::H1(send)
        }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> TlsReply {
        let mut req = Request::get(format!("https://localhost{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let exchange = async {
            let resp = match self {
                Conn::H1(send) => {
                    send.ready().await.unwrap();
                    send.send_request(req).await.unwrap()
                }
                Conn::H2(send) => {
                    send.ready().await.unwrap();
                    send.send_request(req).await.unwrap()
                }
            };
            let (parts, body) = resp.into_parts();
            TlsReply { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
        };
        tokio::time::timeout(BOUND, exchange).await.expect("TLS request within bound")
    }
}

/// One GET on a fresh connection.
pub async fn get(stream: TlsStream<TcpStream>, path: &str, headers: &[(&str, &str)]) -> TlsReply {
    Conn::new(stream).await.get(path, headers).await
}
