//! A scripted hostile registry on 127.0.0.1: it speaks enough of the distribution API for the
//! facade (`/v2/`, manifests by tag and digest with HEAD and GET, blobs with `Range`) and lets a
//! test program, per request path, what an attacker-controlled upstream answers: the right
//! bytes, a trickle of garbage, an error status with the headers of its choosing (auth
//! challenges, `Retry-After`), a redirect anywhere. Every request is recorded, `Authorization`
//! included, so tests can assert what the facade sent it (see
//! `docs/security-model.md`, which names the test that shows each property).
//!
//! Plain std threads, one per connection, every response `Connection: close`: the facade's
//! pooled client copes with that, and a trickling answer cannot hold up another request.
//! Every loop ends when the registry is dropped, the client goes away or the body is sent.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::image::sha256_digest;

/// What the registry answers on one path.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200 with these bytes (206 for a satisfiable single `Range`), `Content-Length`, and the
    /// extra headers (e.g. `Content-Type`, `Docker-Content-Digest`). HEAD gets the headers only.
    Serve {
        /// The body.
        bytes: Vec<u8>,
        /// Extra response headers.
        headers: Vec<(String, String)>,
    },
    /// 200 with `Content-Length: bytes.len()`, then `chunk` bytes every `every`: a slow or
    /// stalling origin (real bytes or garbage, whichever the test passes).
    Trickle {
        /// The body, sent slowly.
        bytes: Vec<u8>,
        /// Bytes per write.
        chunk: usize,
        /// Pause between writes.
        every: Duration,
    },
    /// This status with these headers and body (an OCI error envelope by default).
    Status {
        /// The status code.
        status: u16,
        /// Response headers (`WWW-Authenticate`, `Retry-After`, …).
        headers: Vec<(String, String)>,
        /// The body.
        body: Vec<u8>,
    },
    /// 307 with `Location: location` (any URL, on any host).
    Redirect {
        /// Where to.
        location: String,
    },
    /// 401 with `WWW-Authenticate: challenge` unless the request carries `Authorization`
    /// (whatever its value), then `then`.
    RequireAuth {
        /// The challenge text.
        challenge: String,
        /// What an authorized request gets.
        then: Box<Behaviour>,
    },
}

impl Behaviour {
    /// An error status with an OCI error body and the given headers.
    pub fn status(status: u16, headers: &[(&str, &str)]) -> Behaviour {
        let code = match status {
            401 => "UNAUTHORIZED",
            403 => "DENIED",
            404 => "BLOB_UNKNOWN",
            429 => "TOOMANYREQUESTS",
            _ => "UNAVAILABLE",
        };
        Behaviour::Status {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: format!(r#"{{"errors":[{{"code":"{code}","message":"scripted","detail":null}}]}}"#).into_bytes(),
        }
    }

    /// 401 with this `WWW-Authenticate` challenge, whatever the request carries.
    pub fn challenge(challenge: &str) -> Behaviour {
        Behaviour::status(401, &[("WWW-Authenticate", challenge)])
    }

    /// The bytes, as a blob.
    pub fn blob(bytes: impl Into<Vec<u8>>) -> Behaviour {
        Behaviour::Serve {
            bytes: bytes.into(),
            headers: vec![("Content-Type".into(), "application/octet-stream".into())],
        }
    }
}

/// One request the registry received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// Path and query as sent.
    pub path: String,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    routes: Mutex<HashMap<String, Behaviour>>,
    fallback: Mutex<Option<Behaviour>>,
    requests: Mutex<Vec<Recorded>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running hostile registry; stopped on drop (trickling answers end within one `every`).
pub struct HostileRegistry {
    /// Its address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Longest a connection may take to send its request head; the facade sends it at once.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head read; the facade's are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;

impl HostileRegistry {
    /// Starts on a free loopback port. `/v2/` answers 200 `{}`; unknown paths 404.
    pub fn start() -> anyhow::Result<HostileRegistry> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, st) = (s.clone(), st.clone());
                        conns.push(std::thread::spawn(move || handle(conn, &s, &st)));
                        conns.retain(|c| !c.is_finished());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Ok(HostileRegistry { addr, shared, stop, thread: Some(thread) })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Answers requests for exactly `path` (query ignored) with `b`.
    pub fn route(&self, path: &str, b: Behaviour) {
        lock(&self.shared.routes).insert(path.to_string(), b);
    }

    /// Answers every path without a route (including `/v2/`) with `b`.
    pub fn fallback(&self, b: Behaviour) {
        *lock(&self.shared.fallback) = Some(b);
    }

    /// Serves `manifest` (of `media_type`) as `repo:tag` and by its digest, HEAD and GET, with
    /// `Docker-Content-Digest`. Returns the digest.
    pub fn manifest(&self, repo: &str, tag: &str, media_type: &str, manifest: &[u8]) -> String {
        let digest = sha256_digest(manifest);
        let b = Behaviour::Serve {
            bytes: manifest.to_vec(),
            headers: vec![("Content-Type".into(), media_type.into()), ("Docker-Content-Digest".into(), digest.clone())],
        };
        self.route(&format!("/v2/{repo}/manifests/{tag}"), b.clone());
        self.route(&format!("/v2/{repo}/manifests/{digest}"), b);
        digest
    }

    /// Answers `GET/HEAD /v2/<repo>/blobs/<digest>` with `b`.
    pub fn blob(&self, repo: &str, digest: &str, b: Behaviour) {
        self.route(&format!("/v2/{repo}/blobs/{digest}"), b);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Requests whose path (query ignored) is `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path.split('?').next() == Some(path)).collect()
    }
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_head(conn: &TcpStream) -> Option<Recorded> {
    let mut r = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    let mut total = line.len();
    loop {
        line.clear();
        let n = r.read_line(&mut line).ok()?;
        total += n;
        if n == 0 || total > MAX_HEAD {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some(Recorded { method, path, headers })
}

fn handle(mut conn: TcpStream, shared: &Shared, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(HEAD_TIMEOUT));
    let _ = conn.set_write_timeout(Some(HEAD_TIMEOUT));
    let Some(req) = read_head(&conn) else { return };
    lock(&shared.requests).push(req.clone());
    let bare = req.path.split('?').next().unwrap_or("").to_string();
    let routed = lock(&shared.routes).get(&bare).cloned();
    let b = match routed.or_else(|| lock(&shared.fallback).clone()) {
        Some(b) => b,
        None if bare == "/v2/" || bare == "/v2" => Behaviour::Serve {
            bytes: b"{}".to_vec(),
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("Docker-Distribution-API-Version".into(), "registry/2.0".into()),
            ],
        },
        None => Behaviour::status(404, &[]),
    };
    answer(&mut conn, &req, &b, stop);
}

fn head(status: u16, headers: &[(String, String)], length: u64) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        _ => "Scripted",
    };
    let mut h = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Length: {length}\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// `bytes=N-` or `bytes=N-M` within `len`, as (first, last inclusive).
fn range(req: &Recorded, len: u64) -> Option<Option<(u64, u64)>> {
    let Some(v) = req.header("range") else { return Some(None) };
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let first: u64 = a.trim().parse().ok()?;
    let last = if b.trim().is_empty() { len.checked_sub(1)? } else { b.trim().parse::<u64>().ok()?.min(len - 1) };
    (first <= last && first < len).then_some(Some((first, last)))
}

fn answer(conn: &mut TcpStream, req: &Recorded, b: &Behaviour, stop: &AtomicBool) {
    let is_head = req.method == "HEAD";
    match b {
        Behaviour::Serve { bytes, headers } => {
            let len = bytes.len() as u64;
            let (status, body, mut h) = match range(req, len) {
                Some(None) => (200, &bytes[..], headers.clone()),
                Some(Some((first, last))) => {
                    let mut h = headers.clone();
                    h.push(("Content-Range".into(), format!("bytes {first}-{last}/{len}")));
                    (206, &bytes[first as usize..=last as usize], h)
                }
                None => {
                    let h = vec![("Content-Range".into(), format!("bytes */{len}"))];
                    let _ = conn.write_all(&head(416, &h, 0));
                    return;
                }
            };
            h.push(("Accept-Ranges".into(), "bytes".into()));
            let _ = conn.write_all(&head(status, &h, body.len() as u64));
            if !is_head {
                let _ = conn.write_all(body);
            }
        }
        Behaviour::Trickle { bytes, chunk, every } => {
            let _ = conn.write_all(&head(200, &[], bytes.len() as u64));
            if is_head {
                return;
            }
            for piece in bytes.chunks((*chunk).max(1)) {
                if stop.load(Ordering::Relaxed) || conn.write_all(piece).and_then(|_| conn.flush()).is_err() {
                    return;
                }
                std::thread::sleep(*every);
            }
        }
        Behaviour::Status { status, headers, body } => {
            let mut h = headers.clone();
            h.push(("Content-Type".into(), "application/json".into()));
            let _ = conn.write_all(&head(*status, &h, body.len() as u64));
            if !is_head {
                let _ = conn.write_all(body);
            }
        }
        Behaviour::Redirect { location } => {
            let _ = conn.write_all(&head(307, &[("Location".into(), location.clone())], 0));
        }
        Behaviour::RequireAuth { challenge, then } => {
            if req.header("authorization").is_some() {
                answer(conn, req, then, stop);
            } else {
                answer(conn, req, &Behaviour::challenge(challenge), stop);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: SocketAddr, method: &str, path: &str, extra: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_scripts_and_records_requests() {
        let reg = HostileRegistry::start().unwrap();
        let d = reg.manifest("a/b", "latest", "application/vnd.oci.image.manifest.v1+json", b"{\"x\":1}");
        reg.blob("a/b", "sha256:00", Behaviour::blob(b"0123456789".to_vec()));
        reg.blob("a/b", "sha256:01", Behaviour::status(429, &[("Retry-After", "7")]));
        reg.route("/r", Behaviour::Redirect { location: "http://127.0.0.1:1/x".into() });
        reg.route(
            "/auth",
            Behaviour::RequireAuth {
                challenge: "Basic realm=\"x\"".into(),
                then: Box::new(Behaviour::blob(b"ok".to_vec())),
            },
        );

        assert!(get(reg.addr, "GET", "/v2/", "").starts_with("HTTP/1.1 200"));
        let m = get(reg.addr, "HEAD", "/v2/a/b/manifests/latest", "");
        assert!(m.contains(&format!("Docker-Content-Digest: {d}")) && m.ends_with("\r\n\r\n"), "{m}");
        assert!(get(reg.addr, "GET", &format!("/v2/a/b/manifests/{d}"), "").ends_with("{\"x\":1}"));
        let r = get(reg.addr, "GET", "/v2/a/b/blobs/sha256:00", "Range: bytes=7-\r\n");
        assert!(
            r.starts_with("HTTP/1.1 206") && r.contains("Content-Range: bytes 7-9/10") && r.ends_with("789"),
            "{r}"
        );
        assert!(get(reg.addr, "GET", "/v2/a/b/blobs/sha256:00", "Range: bytes=10-\r\n").starts_with("HTTP/1.1 416"));
        let r = get(reg.addr, "GET", "/v2/a/b/blobs/sha256:01", "");
        assert!(r.starts_with("HTTP/1.1 429") && r.contains("Retry-After: 7"), "{r}");
        assert!(get(reg.addr, "GET", "/r", "").contains("Location: http://127.0.0.1:1/x"));
        assert!(get(reg.addr, "GET", "/auth", "").contains("WWW-Authenticate: Basic realm=\"x\""));
        assert!(get(reg.addr, "GET", "/auth", "Authorization: Basic eDp5\r\n").ends_with("ok"));
        assert!(get(reg.addr, "GET", "/nothing", "").starts_with("HTTP/1.1 404"));

        let seen = reg.requests_to("/auth");
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].header("Authorization"), Some("Basic eDp5"));
        assert_eq!(reg.requests().len(), 10);
    }

    #[test]
    fn trickles_and_stops_on_drop() {
        let reg = HostileRegistry::start().unwrap();
        reg.route("/slow", Behaviour::Trickle { bytes: vec![b'g'; 1000], chunk: 1, every: Duration::from_millis(50) });
        let mut s = TcpStream::connect(reg.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("Content-Length: 1000"));
        let started = std::time::Instant::now();
        drop(reg);
        // 1000 bytes at 20 B/s would take 50 s; the drop ends the trickle within one pause.
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.len() < 200, "{}", rest.len());
    }
}
