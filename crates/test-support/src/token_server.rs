//! A Docker-style token server for distribution's `auth: token` mode, on 127.0.0.1.
//!
//! `GET /token?service=…&scope=…` with Basic credentials answers
//! `{"token", "access_token", "expires_in"}`. The token is an ES256 JWT whose header carries the
//! signing certificate in `x5c`: distribution 2.8 (`registry/auth/token/token.go`) verifies the
//! `x5c` chain against its `rootcertbundle`, where [`Registry`](crate::registry::Registry)
//! puts the same self-signed certificate. Claims: `iss`, `sub`, `aud` = service,
//! `exp`/`nbf`/`iat`, `jti`, and `access` granting exactly the requested scopes.
//!
//! Every request is counted, so tests can prove a client caches its tokens.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::registry::Auth;

/// The `service` the registry is configured with and tokens are issued for (`aud`).
pub const SERVICE: &str = "test-registry";
/// The `issuer` of the tokens (`iss`).
pub const ISSUER: &str = "test-token-issuer";

struct State {
    user: String,
    password: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    cert_b64: String,
    requests: AtomicUsize,
    issued: AtomicUsize,
    refused: AtomicUsize,
    expires_in: AtomicU64,
    anonymous_pull: AtomicBool,
    scopes: Mutex<Vec<String>>,
    jti: AtomicU64,
}

/// A running token server; stopped on drop.
pub struct TokenServer {
    /// Its address.
    pub addr: SocketAddr,
    cert_pem: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Starts a token server that issues tokens to `user`/`password` (Basic auth) for any
    /// requested scope, valid for 300 s.
    pub fn start(user: &str, password: &str) -> anyhow::Result<TokenServer> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = rcgen::CertificateParams::new(vec!["token-issuer.test".to_string()])?;
        let cert = params.self_signed(&key_pair)?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key_pair.serialize_der(), &rng)
            .map_err(|e| anyhow::anyhow!("token signing key: {e}"))?;
        let state = Arc::new(State {
            user: user.to_string(),
            password: password.to_string(),
            key,
            rng,
            cert_b64: STANDARD.encode(cert.der()),
            requests: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            expires_in: AtomicU64::new(300),
            anonymous_pull: AtomicBool::new(false),
            scopes: Mutex::new(Vec::new()),
            jti: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new().name("token-server".into()).spawn(move || accept_loop(listener, state, stop))?
        };
        Ok(TokenServer { addr, cert_pem: cert.pem(), state, stop, thread: Some(thread) })
    }

    /// The realm URL to configure in the registry (`http://127.0.0.1:PORT/token`).
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// PEM of the self-signed certificate whose key signs the tokens (the registry's
    /// `rootcertbundle`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The registry auth mode that trusts this server.
    pub fn auth(&self) -> Auth {
        Auth::Token {
            realm: self.realm(),
            service: SERVICE.to_string(),
            issuer: ISSUER.to_string(),
            cert_pem: self.cert_pem.clone(),
            user: self.state.user.clone(),
            password: self.state.password.clone(),
        }
    }

    /// Requests received on `/token`, answered or refused.
    pub fn token_requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Tokens issued.
    pub fn tokens_issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Requests refused for missing or wrong credentials.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Every scope requested so far, in order.
    pub fn scopes(&self) -> Vec<String> {
        self.state.scopes.lock().unwrap().clone()
    }

    /// Sets `expires_in` (and the JWT's `exp`) of tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::SeqCst);
    }

    /// Whether requests without credentials get pull-only tokens (Docker Hub style).
    pub fn set_anonymous_pull(&self, on: bool) {
        self.state.anonymous_pull.store(on, Ordering::SeqCst);
    }

    /// Mints a token for `scopes` directly, without a request (not counted).
    pub fn mint(&self, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        jwt(&self.state, &self.state.user, &scopes, false)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let state = state.clone();
        let _ = std::thread::Builder::new().name("token-conn".into()).spawn(move || {
            let _ = serve_one(conn, &state);
        });
    }
}

/// Reads the request head (no body: GET only), bounded in size and time.
pub(crate) fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk)?;
        if n == 0 || buf.len() > 64 << 10 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "incomplete request head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(conn: &mut TcpStream, status: &str, extra: &str, body: &str) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    conn.write_all(msg.as_bytes())?;
    conn.flush()
}

fn serve_one(mut conn: TcpStream, state: &State) -> std::io::Result<()> {
    let head = read_head(&mut conn)?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/token" {
        return respond(&mut conn, "404 Not Found", "", r#"{"error":"not found"}"#);
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let authz = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_string());
    let creds = authz
        .as_deref()
        .and_then(|a| a.strip_prefix("Basic ").or_else(|| a.strip_prefix("basic ")))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())));
    let mut scopes = Vec::new();
    let mut service = String::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "scope" => scopes.push(percent_decode(v)),
            "service" => service = percent_decode(v),
            _ => {}
        }
    }
    state.scopes.lock().unwrap().extend(scopes.iter().cloned());
    let anonymous = match &creds {
        Some((u, p)) if *u == state.user && *p == state.password => false,
        None if state.anonymous_pull.load(Ordering::SeqCst) => true,
        _ => {
            state.refused.fetch_add(1, Ordering::SeqCst);
            return respond(
                &mut conn,
                "401 Unauthorized",
                "WWW-Authenticate: Basic realm=\"token\"\r\n",
                r#"{"details":"incorrect username or password"}"#,
            );
        }
    };
    if service != SERVICE {
        return respond(&mut conn, "400 Bad Request", "", r#"{"details":"unknown service"}"#);
    }
    let subject = if anonymous { "" } else { state.user.as_str() };
    let token = jwt(state, subject, &scopes, anonymous);
    state.issued.fetch_add(1, Ordering::SeqCst);
    let expires_in = state.expires_in.load(Ordering::SeqCst);
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": expires_in}).to_string();
    respond(&mut conn, "200 OK", "", &body)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `access` entries for scopes like `repository:a/b:pull,push`; anonymous callers get pull only.
fn access(scopes: &[String], pull_only: bool) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for scope in scopes.iter().flat_map(|s| s.split(' ')) {
        let Some((kind, rest)) = scope.split_once(':') else { continue };
        let Some((name, actions)) = rest.rsplit_once(':') else { continue };
        let actions: Vec<&str> = actions.split(',').filter(|a| !pull_only || *a == "pull").collect();
        out.push(serde_json::json!({"type": kind, "name": name, "actions": actions}));
    }
    out
}

fn jwt(state: &State, subject: &str, scopes: &[String], pull_only: bool) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [state.cert_b64]});
    let now = now();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": now + state.expires_in.load(Ordering::SeqCst),
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": format!("t{}", state.jti.fetch_add(1, Ordering::SeqCst)),
        "access": access(scopes, pull_only),
    });
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let sig = state.key.sign(&state.rng, signing_input.as_bytes()).expect("ES256 signing");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("repository%3Aa%2Fb%3Apull%2Cpush"), "repository:a/b:pull,push");
        assert_eq!(percent_decode("a+b%"), "a b%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn grants_requested_actions() {
        let a = access(&["repository:a/b:pull,push".into(), "bad".into()], false);
        assert_eq!(a, vec![serde_json::json!({"type": "repository", "name": "a/b", "actions": ["pull", "push"]})]);
        let a = access(&["repository:a:pull,push".into()], true);
        assert_eq!(a[0]["actions"], serde_json::json!(["pull"]));
    }
}
