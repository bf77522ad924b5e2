//! TLS for the registry listener: rustls with the ring provider, TLS 1.3 and 1.2, ALPN `h2` and
//! `http/1.1`, and a certificate that follows its files (see `reload.rs`): the first handshake
//! after a change presents the new certificate; connections already open keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, Result};
use crate::reload::{self, Load, PollFiles, ReloadCounters, Watched};

/// The PEM files of the registry listener's certificate (`registry.tls.crt`, `.key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The leaf certificate first, then any intermediates.
    pub cert: PathBuf,
    /// The private key of the leaf: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

struct CertFiles {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
}

impl Load for CertFiles {
    type Item = CertifiedKey;
    const KIND: &'static str = "tls";

    fn paths(&self) -> Vec<&Path> {
        vec![&self.files.cert, &self.files.key]
    }

    fn load(&self) -> Result<CertifiedKey> {
        let (cert_path, key_path) = (&self.files.cert, &self.files.key);
        let cert_pem = reload::read(cert_path)?;
        let key_pem = reload::read(key_path)?;
        let bad_cert = |reason: String| Error::Certificate { path: cert_path.clone(), reason };
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad_cert(format!("not valid PEM: {e}")))?;
        if chain.is_empty() {
            return Err(bad_cert("no CERTIFICATE block".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::PrivateKey {
            path: key_path.clone(),
            reason: match e {
                rustls::pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block".into(),
                e => format!("not valid PEM: {e}"),
            },
        })?;
        // Also parses the leaf and checks it carries the key's public half: a half-written
        // swap (new certificate, old key) fails here instead of in every handshake.
        CertifiedKey::from_der(chain, key, &self.provider).map_err(|source| Error::TlsKeyPair {
            cert: cert_path.clone(),
            key: key_path.clone(),
            source,
        })
    }
}

/// Hands every handshake the certificate as last loaded.
#[derive(Debug)]
struct Resolver(Arc<Watched<CertFiles>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // `None` (no certificate ever loaded) aborts the handshake: fail closed, never plain.
        self.0.current()
    }
}

/// The listener's TLS state: the acceptor and the reloading certificate behind it.
pub(crate) struct Tls {
    watched: Arc<Watched<CertFiles>>,
    acceptor: TlsAcceptor,
}

impl Tls {
    /// Loads the files now; `strict` makes a bad file an error instead of a refused handshake.
    pub(crate) fn open(files: &TlsFiles, counters: ReloadCounters, strict: bool) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loader = CertFiles { files: files.clone(), provider: Arc::clone(&provider) };
        let watched = Arc::new(Watched::open(loader, counters, strict)?);
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|source| Error::TlsConfig { source })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(Arc::clone(&watched))));
        // Over TLS, clients speak h2 only when ALPN selects it (Go's net/http, which containerd
        // uses, never sends the h2 preface otherwise); hyper's auto builder then sees it.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls { watched, acceptor: TlsAcceptor::from(Arc::new(config)) })
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    pub(crate) fn poller(&self) -> Arc<dyn PollFiles> {
        Arc::clone(&self.watched) as Arc<dyn PollFiles>
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("watched", &self.watched).finish_non_exhaustive()
    }
}
