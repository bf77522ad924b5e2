//! The measuring client: HTTP/1.1 over a plain `TcpStream`, one request per connection
//! (`Connection: close`), the body read into one reused 1 MiB buffer and thrown away, so the
//! client costs as little as the copy server does and every system is measured the same way.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

const BUF: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A stalled server fails the run instead of hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// One timed blob GET.
#[derive(Clone, Debug)]
pub struct Pull {
    /// Body bytes received.
    pub bytes: u64,
    /// Request written → first body byte.
    pub ttfb: Duration,
    /// Request written → last body byte.
    pub total: Duration,
    /// How long the last byte came after all the others (the facade holds it back until the
    /// digest checks out).
    pub last_byte_wait: Duration,
    /// `sha256:…` of the body, when asked for.
    pub digest: Option<String>,
}

impl Pull {
    /// Bytes per second over the whole exchange.
    pub fn throughput(&self) -> f64 {
        self.bytes as f64 / self.total.as_secs_f64().max(1e-9)
    }
}

/// GETs `path` from `addr`, expects `200` with a `Content-Length`, and reads the body to its
/// end. With `hash`, the body is hashed as it arrives (slower: only for verification runs).
pub fn pull(addr: SocketAddr, path: &str, hash: bool) -> anyhow::Result<Pull> {
    let mut conn = connect(addr)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    let mut buf = vec![0u8; BUF];
    let started = Instant::now();
    conn.write_all(req.as_bytes()).with_context(|| format!("GET {addr}{path}: writing the request"))?;
    let (head, filled) = read_head(&mut conn, &mut buf).with_context(|| format!("GET {addr}{path}"))?;
    if head.status != 200 {
        let body = String::from_utf8_lossy(&buf[head.len..filled]).chars().take(300).collect::<String>();
        bail!("GET {addr}{path}: status {} {body}", head.status);
    }
    if head.chunked {
        bail!("GET {addr}{path}: chunked blob bodies are not expected from any system here");
    }
    let Some(length) = head.content_length else { bail!("GET {addr}{path}: no Content-Length") };
    let mut hasher = hash.then(Sha256::new);
    let mut bytes = (filled - head.len) as u64;
    let mut first = (bytes > 0).then(Instant::now);
    if let Some(h) = hasher.as_mut() {
        h.update(&buf[head.len..filled]);
    }
    let mut last = Instant::now();
    let mut all_but_one = (bytes + 1 >= length).then_some(last);
    while bytes < length {
        let n = conn.read(&mut buf).with_context(|| format!("GET {addr}{path}: reading the body at {bytes}"))?;
        if n == 0 {
            break;
        }
        last = Instant::now();
        first.get_or_insert(last);
        if bytes + 1 < length && bytes + n as u64 + 1 >= length {
            // This read brought all bytes but the last (and maybe the last too: then no wait).
            all_but_one = Some(last);
        }
        bytes += n as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
    }
    if bytes != length {
        bail!("GET {addr}{path}: body ended at {bytes} of {length} bytes");
    }
    Ok(Pull {
        bytes,
        ttfb: first.unwrap_or(last) - started,
        total: last - started,
        last_byte_wait: last - all_but_one.unwrap_or(last),
        digest: hasher.map(|h| format!("sha256:{}", hex::encode(h.finalize()))),
    })
}

/// A small request's answer.
#[derive(Debug)]
pub struct Small {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (empty for HEAD).
    pub body: Vec<u8>,
}

impl Small {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One small request (manifests, checks) with the manifest `Accept` header; the body is read
/// whole.
pub fn small(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<Small> {
    let accept = format!("Accept: {}\r\n", facade_oci::media_types::MANIFEST_ACCEPT);
    exchange(addr, method, path, &accept)
}

/// A call to the facade's admin API (the warm-up and progress routes): JSON accepted, an empty
/// body sent (`Content-Length: 0`, which a POST without one needs), the answer read whole.
pub fn admin(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<Small> {
    exchange(addr, method, path, "Accept: application/json\r\nContent-Length: 0\r\n")
}

fn exchange(addr: SocketAddr, method: &str, path: &str, headers: &str) -> anyhow::Result<Small> {
    let mut conn = connect(addr)?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).with_context(|| format!("{method} {addr}{path}"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let (head, filled) = read_head(&mut conn, &mut buf).with_context(|| format!("{method} {addr}{path}"))?;
    let mut body = buf[head.len..filled].to_vec();
    if method != "HEAD" {
        let want = head.content_length.unwrap_or(u64::MAX);
        // Manifests are small; the bound keeps a misbehaving server from filling memory.
        while (body.len() as u64) < want && body.len() < 16 << 20 {
            let n = conn.read(&mut buf).with_context(|| format!("{method} {addr}{path}: body"))?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        if head.chunked {
            body = test_support::wire::dechunk(&body);
        }
    } else {
        body.clear();
    }
    Ok(Small { status: head.status, headers: head.headers, body })
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.set_write_timeout(Some(READ_TIMEOUT))?;
    conn.set_nodelay(true)?;
    Ok(conn)
}

struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    headers: Vec<(String, String)>,
    /// Length of the head including the blank line.
    len: usize,
}

/// Reads until the end of the response head; returns it and how much of `buf` is filled (the
/// rest after `len` is the start of the body).
fn read_head(conn: &mut TcpStream, buf: &mut [u8]) -> anyhow::Result<(Head, usize)> {
    let mut filled = 0;
    let end = loop {
        if filled == buf.len() {
            bail!("response head longer than {} bytes", buf.len());
        }
        let n = conn.read(&mut buf[filled..]).context("reading the response head")?;
        if n == 0 {
            bail!("connection closed before the response head ended ({filled} bytes)");
        }
        let from = filled.saturating_sub(3);
        filled += n;
        if let Some(p) = buf[from..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break from + p + 4;
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let status =
        lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).context("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let content_length = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok());
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    Ok((Head { status, content_length, chunked, headers, len: end }, filled))
}
