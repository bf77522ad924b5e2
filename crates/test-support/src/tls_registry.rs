//! A private certificate authority and a CNCF distribution registry serving HTTPS with a
//! certificate it issued. The TLS registry shares the storage of a plain [`Registry`], so tests
//! push with the plain one's helpers and pull over TLS.
//!
//! [`Registry`]: crate::registry::Registry

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::proc::{KillOnDrop, free_port, wait_for_tcp};
use crate::registry::REGISTRY_BIN;

/// A CA that exists only for one test.
pub struct PrivateCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl PrivateCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<PrivateCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(PrivateCa { issuer })
    }

    /// The CA certificate (what a client must trust).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses), as (certificate PEM, key
    /// PEM).
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("server"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A registry serving HTTPS on 127.0.0.1 from an existing storage root; stopped on drop.
pub struct TlsRegistry {
    /// Its address.
    pub addr: SocketAddr,
    // The process goes before its work dir.
    proc: KillOnDrop,
    /// Work dir (certificate, config, log).
    pub dir: tempfile::TempDir,
}

impl TlsRegistry {
    /// Serves `storage` (a plain registry's [`storage`](crate::registry::Registry::storage))
    /// over TLS with this certificate and key.
    pub fn start(storage: &Path, cert_pem: &str, key_pem: &str) -> anyhow::Result<TlsRegistry> {
        let dir = tempfile::Builder::new().prefix("tls-registry-").tempdir()?;
        let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert, cert_pem)?;
        std::fs::write(&key, key_pem)?;
        let mut last_err = None;
        // The port is picked before the registry binds it; another process can win the race.
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let cfg = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  tls:\n    certificate: {}\n    key: {}\n",
                storage.display(),
                cert.display(),
                key.display()
            );
            let cfg_path = dir.path().join("config.yml");
            std::fs::write(&cfg_path, cfg)?;
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve").arg(&cfg_path);
            let mut proc = KillOnDrop::spawn("docker-registry (TLS)", cmd, &dir.path().join("registry.log"))?;
            match wait_for_tcp(addr, Duration::from_secs(10)) {
                Ok(()) if proc.check_running().is_ok() => return Ok(TlsRegistry { addr, proc, dir }),
                Ok(()) => last_err = Some(anyhow::anyhow!("TLS registry exited: {}", log_of(dir.path()))),
                Err(e) => last_err = Some(anyhow::anyhow!("{e}: {}", log_of(dir.path()))),
            }
            proc.kill();
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("TLS registry did not start")))
    }

    /// The port it serves on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The registry's log so far (TLS handshake errors land here).
    pub fn log(&self) -> String {
        log_of(self.dir.path())
    }

    /// Stops the registry now.
    pub fn stop(&mut self) {
        self.proc.kill();
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
}
