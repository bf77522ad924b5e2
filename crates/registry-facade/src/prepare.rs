//! `registry-facade prepare <admin-addr> <provider>/<id>`: asks a facade's admin listener to
//! warm a workspace image up, then follows its progress until it is done, printing one line per
//! layer as it ends and a summary. Plain HTTP/1.1 over one short connection per request: the
//! admin listener is node-local and speaks nothing else.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// How often progress is read.
const POLL: Duration = Duration::from_millis(500);

/// Deadline of one request to the admin listener.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Warms `workspace` (`provider/id`) up through the admin listener at `addr` and waits at
/// most `timeout` for it to finish. Ok(true) when every layer is available.
pub fn run(addr: &str, workspace: &str, timeout: Duration, out: &mut dyn Write) -> anyhow::Result<bool> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let (provider, id) = workspace
        .split_once('/')
        .filter(|(p, i)| !p.is_empty() && !i.is_empty())
        .context("expected <provider>/<id>")?;
    let base = format!("/v1/workspaces/{provider}/{id}");
    let (status, body) = request(addr, "POST", &format!("{base}/prepare"))?;
    if status != 202 {
        bail!("{workspace}: warm-up refused ({status}): {}", error_text(&body));
    }
    let started = Instant::now();
    let mut reported = std::collections::HashSet::new();
    loop {
        let (status, body) = request(addr, "GET", &format!("{base}/progress"))?;
        if status != 200 {
            bail!("{workspace}: progress unavailable ({status}): {}", error_text(&body));
        }
        let p: Value = serde_json::from_slice(&body).context("progress is not JSON")?;
        for layer in p["layers"].as_array().into_iter().flatten() {
            let state = layer["state"].as_str().unwrap_or("");
            let digest = layer["digest"].as_str().unwrap_or("");
            if matches!(state, "done" | "failed") && reported.insert(digest.to_string()) {
                let error = layer["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default();
                writeln!(
                    out,
                    "{digest} {} {} {state}{error}",
                    mib(layer["size"].as_u64().unwrap_or(0)),
                    layer["source"].as_str().unwrap_or("")
                )?;
            }
        }
        let state = p["state"].as_str().unwrap_or("running");
        if state != "running" {
            writeln!(
                out,
                "{workspace}: {state}: {}/{} layers, {} of {} in {:.1}s",
                p["layersDone"].as_u64().unwrap_or(0),
                p["layersTotal"].as_u64().unwrap_or(0),
                mib(p["bytesDone"].as_u64().unwrap_or(0)),
                mib(p["bytesTotal"].as_u64().unwrap_or(0)),
                started.elapsed().as_secs_f64(),
            )?;
            return Ok(state == "done");
        }
        if started.elapsed() > timeout {
            bail!("{workspace}: not done after {}", humantime::format_duration(timeout));
        }
        std::thread::sleep(POLL);
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// The message of an OCI error envelope, or the body as text.
fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            let e = &v["errors"][0];
            Some(format!("{} {}", e["code"].as_str()?, e["message"].as_str().unwrap_or("")))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// One request with `Connection: close`; the status and the whole body.
fn request(addr: &str, method: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).with_context(|| format!("reading the answer of {addr}"))?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("answer without a header end")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = raw[split + 4..].to_vec();
    Ok((status, if chunked { dechunk(&body) } else { body }))
}

/// The payload of a chunked body (the admin listener sends JSON with a length; this is for
/// proxies in between).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 || b.len() < size {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
    out
}
