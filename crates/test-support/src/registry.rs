//! A real CNCF distribution registry (`docker-registry`, Debian package) on 127.0.0.1, with
//! anonymous, htpasswd or token auth, and a tiny blocking push client (monolithic blob upload,
//! manifest PUT) that carries the credentials the registry wants.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use facade_oci::Digest;

use crate::proc::{KillOnDrop, free_port, wait_for_tcp};

/// The binary the Debian package installs.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How the registry authenticates clients.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// Anonymous pulls and pushes.
    #[default]
    None,
    /// HTTP Basic against a bcrypt htpasswd file holding one user.
    Htpasswd {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// Bearer tokens from a token server (see [`crate::token_server::TokenServer::auth`]).
    Token {
        /// The token endpoint URL.
        realm: String,
        /// The `service` (token audience).
        service: String,
        /// The trusted token issuer.
        issuer: String,
        /// PEM of the certificate tokens are signed under (the `rootcertbundle`).
        cert_pem: String,
        /// Credentials the token server accepts, used by the push helpers.
        user: String,
        /// Password for `user`.
        password: String,
    },
}

impl Auth {
    /// Htpasswd auth for one user.
    pub fn htpasswd(user: &str, password: &str) -> Auth {
        Auth::Htpasswd { user: user.to_string(), password: password.to_string() }
    }

    /// The user and password a client needs, if any.
    pub fn credentials(&self) -> Option<(String, String)> {
        match self {
            Auth::None => None,
            Auth::Htpasswd { user, password } | Auth::Token { user, password, .. } => {
                Some((user.clone(), password.clone()))
            }
        }
    }

    /// A docker `config.json` holding this auth's credentials for `host`.
    pub fn docker_config_json(&self, host: &str) -> String {
        match self.credentials() {
            None => r#"{"auths":{}}"#.to_string(),
            Some((u, p)) => {
                serde_json::json!({"auths": {host: {"auth": STANDARD.encode(format!("{u}:{p}"))}}}).to_string()
            }
        }
    }
}

/// A running registry with filesystem storage in a temp dir; stopped on drop.
pub struct Registry {
    /// Its address.
    pub addr: SocketAddr,
    // Fields drop in order: the process must be gone before its work dir is removed, or a
    // registry still writing recreates parts of it and the temp dir leaks.
    proc: KillOnDrop,
    /// Work dir (storage, config, log).
    pub dir: tempfile::TempDir,
    auth: Auth,
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> anyhow::Result<Registry> {
        Self::start_with(Auth::None, &[])
    }

    /// Starts a registry with `auth` and extra YAML lines appended to its config (for example a
    /// `proxy:` section for pull-through mode).
    pub fn start_with(auth: Auth, extra_yaml: &[&str]) -> anyhow::Result<Registry> {
        let dir = tempfile::Builder::new().prefix("registry-").tempdir()?;
        write_auth_files(dir.path(), &auth)?;
        let mut last_err = None;
        // The port is picked before the registry binds it; another process can win the race, so
        // try a few ports.
        for _ in 0..5 {
            let port = free_port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let cfg = config_yaml(dir.path(), addr, &auth, extra_yaml);
            let cfg_path = dir.path().join("config.yml");
            std::fs::write(&cfg_path, cfg)?;
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve").arg(&cfg_path);
            let mut proc = KillOnDrop::spawn("docker-registry", cmd, &dir.path().join("registry.log"))?;
            match wait_for_tcp(addr, Duration::from_secs(10)) {
                Ok(()) if proc.check_running().is_ok() => return Ok(Registry { addr, dir, auth, proc }),
                Ok(()) => last_err = Some(anyhow::anyhow!("registry exited: {}", log_of(dir.path()))),
                Err(e) => last_err = Some(anyhow::anyhow!("{e}: {}", log_of(dir.path()))),
            }
            proc.kill();
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        log_of(self.dir.path())
    }

    /// Stops the registry now.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// The storage root, for tests that corrupt or inspect stored blobs.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the filesystem driver keeps the bytes of blob `digest` (`…/blobs/sha256/ab/abcd…/data`).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.encoded();
        self.storage().join("docker/registry/v2/blobs").join(digest.algorithm()).join(&hex[..2]).join(hex).join("data")
    }

    /// How the registry authenticates.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Uploads a blob (POST then monolithic PUT) and returns its digest.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> anyhow::Result<Digest> {
        let digest = Digest::sha256_of(bytes);
        let authz = self.authorization(repo)?;
        let start = http(self.addr, "POST", &format!("/v2/{repo}/blobs/uploads/"), &authz, &[], &[])?;
        if start.status != 202 {
            anyhow::bail!("blob upload start for {repo}: {} {}", start.status, start.text());
        }
        let location = start.header("location").ok_or_else(|| anyhow::anyhow!("upload without Location"))?;
        let path = path_of(location);
        let sep = if path.contains('?') { '&' } else { '?' };
        let put_path = format!("{path}{sep}digest={}", digest.as_str().replace(':', "%3A"));
        let ct = [("Content-Type", "application/octet-stream".to_string())];
        let done = http(self.addr, "PUT", &put_path, &authz, &ct, bytes)?;
        if done.status != 201 {
            anyhow::bail!("blob upload of {digest} to {repo}: {} {}", done.status, done.text());
        }
        Ok(digest)
    }

    /// PUTs a manifest under `tag` (or a digest string) and returns the sha256 of its bytes.
    pub fn push_manifest(&self, repo: &str, tag: &str, media_type: &str, bytes: &[u8]) -> anyhow::Result<Digest> {
        let authz = self.authorization(repo)?;
        let ct = [("Content-Type", media_type.to_string())];
        let r = http(self.addr, "PUT", &format!("/v2/{repo}/manifests/{tag}"), &authz, &ct, bytes)?;
        if r.status != 201 {
            anyhow::bail!("manifest PUT {repo}:{tag}: {} {}", r.status, r.text());
        }
        Ok(Digest::sha256_of(bytes))
    }

    /// The Authorization header for pushing to `repo`: Basic for htpasswd, a pull+push token
    /// fetched from the realm for token auth.
    fn authorization(&self, repo: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
        let basic = |u: &str, p: &str| format!("Basic {}", STANDARD.encode(format!("{u}:{p}")));
        match &self.auth {
            Auth::None => Ok(vec![]),
            Auth::Htpasswd { user, password } => Ok(vec![("Authorization", basic(user, password))]),
            Auth::Token { realm, service, user, password, .. } => {
                let rest = realm.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("realm must be http://"))?;
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                let addr: SocketAddr = authority.parse()?;
                let scope =
                    format!("repository:{repo}:pull,push").replace(':', "%3A").replace('/', "%2F").replace(',', "%2C");
                let target = format!("/{path}?service={service}&scope={scope}");
                let r = http(addr, "GET", &target, &[("Authorization", basic(user, password))], &[], &[])?;
                if r.status != 200 {
                    anyhow::bail!("token for push: {} {}", r.status, r.text());
                }
                let v: serde_json::Value = serde_json::from_slice(&r.body)?;
                let token = v["token"].as_str().ok_or_else(|| anyhow::anyhow!("token response without token"))?;
                Ok(vec![("Authorization", format!("Bearer {token}"))])
            }
        }
    }
}

/// Writes the htpasswd file or the token root certificate the config refers to.
fn write_auth_files(dir: &Path, auth: &Auth) -> anyhow::Result<()> {
    match auth {
        Auth::None => {}
        Auth::Htpasswd { user, password } => {
            // Cost 4 (the minimum) keeps every authenticated request fast; distribution
            // re-checks the hash on each one.
            let hash = bcrypt::hash(password, 4)?;
            std::fs::write(dir.join("htpasswd"), format!("{user}:{hash}\n"))?;
        }
        Auth::Token { cert_pem, .. } => std::fs::write(dir.join("token-root.pem"), cert_pem)?,
    }
    Ok(())
}

/// The path and query of an absolute or relative URL.
fn path_of(location: &str) -> String {
    match location.strip_prefix("http://").or_else(|| location.strip_prefix("https://")) {
        Some(rest) => rest.find('/').map(|i| rest[i..].to_string()).unwrap_or_else(|| "/".into()),
        None => location.to_string(),
    }
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).chars().take(500).collect()
    }
}

/// One blocking HTTP/1.1 exchange with `Connection: close`; the answer is read to EOF.
fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    auth: &[(&str, String)],
    headers: &[(&str, String)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in auth.iter().chain(headers) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{method} {target}: no complete response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{method} {target}: bad status line"))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked =
        headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = crate::wire::dechunk(&body);
    }
    Ok(HttpResponse { status, headers, body })
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
}

fn config_yaml(dir: &Path, addr: SocketAddr, auth: &Auth, extra: &[&str]) -> String {
    let mut y = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
        dir.join("storage").display()
    );
    match auth {
        Auth::None => {}
        Auth::Htpasswd { .. } => {
            y.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        Auth::Token { realm, service, issuer, .. } => {
            y.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                dir.join("token-root.pem").display()
            ));
        }
    }
    for line in extra {
        y.push_str(line);
        y.push('\n');
    }
    y
}
