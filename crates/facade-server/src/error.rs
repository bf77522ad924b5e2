//! The crate's own error: its fallible operations (TLS and htpasswd files, metrics
//! registration) and a response body cut after its headers were sent. A request failure is not
//! one of these: it is answered, by the request edge in `edge.rs`.

use std::path::PathBuf;

/// Errors of this crate's own fallible operations (not request failures: those are answered).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A metric could not be created or registered (e.g. registered twice).
    #[error("cannot register metric {name}")]
    Metrics {
        /// The metric name.
        name: &'static str,
        /// What prometheus said.
        #[source]
        source: prometheus::Error,
    },
    /// A configured file (certificate, key, htpasswd) cannot be read.
    #[error("cannot read {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no usable PEM certificate.
    #[error("bad TLS certificate file {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file holds no usable PEM private key.
    #[error("bad TLS key file {path}: {reason}")]
    PrivateKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate and key parse but cannot serve together (unsupported key type, a leaf
    /// that is not X.509, or a key that is not the leaf's).
    #[error("TLS certificate {cert} cannot be used with key {key}")]
    TlsKeyPair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the protocol setup (a build without TLS 1.2 or 1.3 support).
    #[error("cannot set up TLS")]
    TlsConfig {
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// A line of the htpasswd file cannot be used; the whole file is refused.
    #[error("bad htpasswd file {path} line {line}: {reason}")]
    Htpasswd {
        /// The file.
        path: PathBuf,
        /// 1-based; 0 when the file as a whole is bad.
        line: usize,
        /// What is wrong; never contains a hash.
        reason: String,
    },
    /// A response body was cut after its headers were sent (see `Body`).
    #[error("response aborted at byte {offset}: {reason}")]
    ResponseAborted {
        /// Bounded reason, as in `registry_facade_response_aborted_total{reason}`.
        reason: &'static str,
        /// Blob offset of the first byte not sent.
        offset: u64,
        /// The backend stream's error, if it failed.
        #[source]
        source: Option<std::io::Error>,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
