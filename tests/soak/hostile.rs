//! The soak's hostile phase, running alongside the legitimate pulls: clients that open blob GETs
//! and never read, connections that never send a byte, and a workspace whose base image
//! (served by test-support's scripted hostile registry) names an endless layer that a client
//! reads 4 MiB of and then drops. It only produces load and counts what it saw; the verdict
//! stays with the legitimate pulls and the facade's RSS and fds (main.rs).
//!
//! The hostile clients connect from their own loopback address ([`HOSTILE_SOURCE`]): the
//! facade's per-client limits (README, `facade.maxRequestsPerClient`) key on the client
//! address, and on a node a hostile workload is never the address the node's containerd pulls
//! from. The facade still listens on 127.0.0.1 only.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_support::hostile_registry::{Behaviour, HostileRegistry};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Where the hostile clients connect from (any 127/8 address is loopback on Linux).
pub const HOSTILE_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The workspace whose base names the endless layer.
pub const ENDLESS_WS: &str = "ws-endless";
const ENDLESS_REPO: &str = "evil/endless";
/// What the endless layer's manifest claims: far more than any disk here holds.
const ENDLESS_CLAIM: u64 = 64 << 30;
/// How much of it a client reads before it drops the connection.
const ENDLESS_READ: u64 = 4 << 20;
/// The endless origin's pace per connection. A real hostile origin may send at line rate; this
/// one is held to a pace that cannot fill this machine's disk during a soak, however long the
/// facade keeps downloading.
const ENDLESS_RATE: u64 = 8 << 20;
/// And a total after which it answers 503: the disk of the machine running the soak is not
/// what is under test.
const ENDLESS_BUDGET: u64 = 3 << 30;

/// How many of each hostile client.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Clients that send a blob GET and never read the answer.
    pub non_reading: usize,
    /// Connections that send nothing.
    pub silent: usize,
}

/// What the hostile clients saw.
#[derive(Default)]
pub struct Counts {
    /// Non-reading GETs sent.
    pub non_reading_requests: AtomicU64,
    /// Non-reading clients that could not connect or send.
    pub non_reading_refused: AtomicU64,
    /// Non-reading connections open now.
    pub non_reading_open: AtomicU64,
    /// Most non-reading connections open at once.
    pub non_reading_peak: AtomicU64,
    /// Silent connections made.
    pub silent_connections: AtomicU64,
    /// Silent connections that could not connect.
    pub silent_refused: AtomicU64,
    /// Silent connections the facade closed before the client gave up on them.
    pub silent_closed_by_facade: AtomicU64,
    /// Silent connections open now.
    pub silent_open: AtomicU64,
    /// Most silent connections open at once.
    pub silent_peak: AtomicU64,
    /// Endless-layer GETs, and how each ended.
    pub endless: Mutex<BTreeMap<String, u64>>,
    /// Seconds until the facade had handed over 4 MiB of the endless layer, per successful GET.
    pub endless_secs: Mutex<Vec<f64>>,
    /// Seconds a silent connection lived before the facade closed it.
    pub silent_lifetimes: Mutex<Vec<f64>>,
}

fn bump(open: &AtomicU64, peak: &AtomicU64) {
    let now = open.fetch_add(1, Ordering::Relaxed) + 1;
    peak.fetch_max(now, Ordering::Relaxed);
}

fn note(map: &Mutex<BTreeMap<String, u64>>, what: &str) {
    if let Ok(mut m) = map.lock() {
        *m.entry(what.to_string()).or_default() += 1;
    }
}

/// The endless origin: answers every GET (ranged or not) with the claimed length and sends a
/// pattern at [`ENDLESS_RATE`] until the client goes. Plain std threads, one per connection.
pub struct EndlessOrigin {
    /// Its address.
    pub addr: SocketAddr,
    /// Bytes sent, all connections.
    pub sent: Arc<AtomicU64>,
    /// Connections accepted.
    pub connections: Arc<AtomicU64>,
    /// Connections sending now.
    pub open: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EndlessOrigin {
    fn start() -> anyhow::Result<EndlessOrigin> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (sent, connections, open) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, o, st) = (sent.clone(), connections.clone(), open.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        let (s, o, st) = (s.clone(), o.clone(), st.clone());
                        conns.push(std::thread::spawn(move || {
                            o.fetch_add(1, Ordering::Relaxed);
                            endless_answer(conn, &s, &st);
                            o.fetch_sub(1, Ordering::Relaxed);
                        }));
                        conns.retain(|h: &std::thread::JoinHandle<()>| !h.is_finished());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for h in conns {
                let _ = h.join();
            }
        });
        Ok(EndlessOrigin { addr, sent, connections, open, stop, thread: Some(thread) })
    }
}

impl Drop for EndlessOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn endless_answer(mut conn: TcpStream, sent: &AtomicU64, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 << 10 {
            return;
        }
    }
    if sent.load(Ordering::Relaxed) >= ENDLESS_BUDGET {
        let _ = conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let from = text
        .lines()
        .find_map(|l| l.strip_prefix("range:"))
        .and_then(|v| v.trim().strip_prefix("bytes="))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|f| *f < ENDLESS_CLAIM);
    let answer = match from {
        Some(f) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {f}-{}/{ENDLESS_CLAIM}\r\nConnection: close\r\n\r\n",
            ENDLESS_CLAIM - f,
            ENDLESS_CLAIM - 1
        ),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {ENDLESS_CLAIM}\r\nConnection: close\r\n\r\n"),
    };
    if conn.write_all(answer.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![0x5au8; 64 << 10];
    let started = Instant::now();
    let mut mine = 0u64;
    while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < ENDLESS_BUDGET {
        // Paced: never ahead of ENDLESS_RATE since this connection started.
        let due = Duration::from_secs_f64(mine as f64 / ENDLESS_RATE as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait.min(Duration::from_millis(100)));
            continue;
        }
        if conn.write_all(&chunk).is_err() {
            return;
        }
        mine += chunk.len() as u64;
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
}

/// The scripted hostile registry serving the endless workspace's base (its `/v2/`, manifest
/// and config; its blob route redirects to the endless origin, as registries that keep blobs in
/// object storage do), and the origin itself.
pub struct EndlessWorld {
    /// The registry.
    pub registry: HostileRegistry,
    /// The endless origin.
    pub origin: EndlessOrigin,
    /// The endless layer's digest (never the digest of anything sent).
    pub layer: String,
}

impl EndlessWorld {
    /// Starts both and scripts the image.
    pub fn start() -> anyhow::Result<EndlessWorld> {
        let registry = HostileRegistry::start()?;
        let origin = EndlessOrigin::start()?;
        let layer = test_support::image::sha256_digest(b"an endless layer never ends");
        let diff_id = test_support::image::sha256_digest(b"nor has a diff id");
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/usr/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))?;
        let config_digest = test_support::image::sha256_digest(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": ENDLESS_CLAIM}],
        }))?;
        registry.manifest(ENDLESS_REPO, "latest", "application/vnd.oci.image.manifest.v1+json", &manifest);
        registry.blob(ENDLESS_REPO, &config_digest, Behaviour::blob(config));
        registry.blob(
            ENDLESS_REPO,
            &layer,
            Behaviour::Redirect { location: format!("http://{}/storage/{}", origin.addr, layer.replace(':', "-")) },
        );
        Ok(EndlessWorld { registry, origin, layer })
    }

    /// The workspace spec naming the endless base.
    pub fn spec(&self) -> Value {
        json!({"baseRef": format!("{}/{ENDLESS_REPO}:latest", self.registry.host())})
    }

    /// Bytes the endless origin has sent so far.
    pub fn sent(&self) -> u64 {
        self.origin.sent.load(Ordering::Relaxed)
    }
}

/// Runs the hostile clients until `deadline` (or `stop`) on a runtime of their own; every
/// connection they opened is closed when it returns.
pub fn run(
    facade: SocketAddr,
    plan: Plan,
    blob_paths: &[String],
    endless_path: &str,
    deadline: Instant,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            note(&counts.endless, &format!("no runtime: {e}"));
            return;
        }
    };
    let deadline = tokio::time::Instant::from_std(deadline);
    rt.block_on(async {
        let mut futs: Vec<HostileFuture<'_>> = Vec::new();
        for i in 0..plan.non_reading {
            let path = blob_paths[i % blob_paths.len().max(1)].clone();
            futs.push(Box::pin(non_reading(facade, path, i as u64, deadline, stop, counts)));
        }
        for i in 0..plan.silent {
            futs.push(Box::pin(silent(facade, i as u64, deadline, stop, counts)));
        }
        futs.push(Box::pin(endless(facade, endless_path.to_string(), deadline, stop, counts)));
        join_all(futs).await;
    });
}

type HostileFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;

/// Awaits every future concurrently on this task (tokio has no `join_all`, and the hostile
/// clients borrow the counters, so they are not spawned).
async fn join_all(futs: Vec<HostileFuture<'_>>) {
    let mut set: Vec<Option<HostileFuture<'_>>> = futs.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in &mut set {
            if let Some(f) = slot {
                if f.as_mut().poll(cx).is_ready() {
                    *slot = None;
                } else {
                    pending = true;
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
}

async fn connect(facade: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(HOSTILE_SOURCE), 0))?;
    // The smallest receive buffer: a client that reads nothing should hold as much of the
    // facade's send side as it can, not soak it up in its own kernel buffer.
    let _ = socket.set_recv_buffer_size(4096);
    tokio::time::timeout(Duration::from_secs(5), socket.connect(facade))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Seconds in `lo..=hi`, spread by `i` (no RNG needed: each client gets its own hold time).
fn spread(i: u64, round: u64, lo: u64, hi: u64) -> Duration {
    let x = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 11;
    Duration::from_millis(lo * 1000 + x % ((hi - lo) * 1000 + 1))
}

async fn until(deadline: tokio::time::Instant, d: Duration, stop: &AtomicBool) {
    let end = (tokio::time::Instant::now() + d).min(deadline);
    while tokio::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(end.min(tokio::time::Instant::now() + Duration::from_millis(500))).await;
    }
}

/// Sends a blob GET, reads nothing, holds the connection 20–60 s, closes it, again.
async fn non_reading(
    facade: SocketAddr,
    path: String,
    i: u64,
    deadline: tokio::time::Instant,
    stop: &AtomicBool,
    c: &Counts,
) {
    // Staggered over the first 5 s, as clients arrive.
    until(deadline, Duration::from_millis(i * 5000 / 128), stop).await;
    let mut round = 0;
    while tokio::time::Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        round += 1;
        let conn = match connect(facade).await {
            Ok(mut s) => {
                let req = format!("GET {path} HTTP/1.1\r\nHost: {facade}\r\nAccept: */*\r\n\r\n");
                match s.write_all(req.as_bytes()).await {
                    Ok(()) => Some(s),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        let Some(conn) = conn else {
            c.non_reading_refused.fetch_add(1, Ordering::Relaxed);
            until(deadline, Duration::from_secs(1), stop).await;
            continue;
        };
        c.non_reading_requests.fetch_add(1, Ordering::Relaxed);
        bump(&c.non_reading_open, &c.non_reading_peak);
        until(deadline, spread(i, round, 20, 60), stop).await;
        drop(conn);
        c.non_reading_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects, sends nothing, waits 30–90 s for the facade to close it, closes it, again.
async fn silent(facade: SocketAddr, i: u64, deadline: tokio::time::Instant, stop: &AtomicBool, c: &Counts) {
    until(deadline, Duration::from_millis(i * 5000 / 128), stop).await;
    let mut round = 0;
    while tokio::time::Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        round += 1;
        let Ok(mut conn) = connect(facade).await else {
            c.silent_refused.fetch_add(1, Ordering::Relaxed);
            until(deadline, Duration::from_secs(1), stop).await;
            continue;
        };
        c.silent_connections.fetch_add(1, Ordering::Relaxed);
        bump(&c.silent_open, &c.silent_peak);
        let opened = tokio::time::Instant::now();
        let hold = (opened + spread(i, round, 30, 90)).min(deadline);
        let mut byte = [0u8; 1];
        let mut closed = false;
        while tokio::time::Instant::now() < hold && !stop.load(Ordering::Relaxed) {
            let slice = hold.min(tokio::time::Instant::now() + Duration::from_millis(500));
            match tokio::time::timeout_at(slice, conn.read(&mut byte)).await {
                Err(_) => {}
                // EOF, a reset, or an answer (a 408): the facade is done with it.
                Ok(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            c.silent_closed_by_facade.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut v) = c.silent_lifetimes.lock() {
                v.push(opened.elapsed().as_secs_f64());
            }
        }
        drop(conn);
        c.silent_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every 5–10 s: GET the endless layer, read 4 MiB of it, drop the connection.
async fn endless(facade: SocketAddr, path: String, deadline: tokio::time::Instant, stop: &AtomicBool, c: &Counts) {
    let mut round = 0;
    while tokio::time::Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        round += 1;
        let started = tokio::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(60), endless_once(facade, &path)).await;
        match outcome {
            Ok(Ok(())) => {
                note(&c.endless, "read 4 MiB, dropped");
                if let Ok(mut v) = c.endless_secs.lock() {
                    v.push(started.elapsed().as_secs_f64());
                }
            }
            Ok(Err(e)) => note(&c.endless, &e),
            Err(_) => note(&c.endless, "no 4 MiB within 60 s"),
        }
        until(deadline, spread(7, round, 5, 10), stop).await;
    }
}

async fn endless_once(facade: SocketAddr, path: &str) -> Result<(), String> {
    // The manifest first, as containerd asks for it.
    let manifest = format!("/v2/fixed/{ENDLESS_WS}/manifests/latest");
    let (status, _) = get_head(facade, &manifest, MANIFEST_ACCEPT).await?;
    if status != "200" {
        return Err(format!("manifest status {status}"));
    }
    let (status, (mut s, mut got)) = get_head(facade, path, "*/*").await?;
    if status != "200" {
        return Err(format!("status {status}"));
    }
    let mut buf = vec![0u8; 64 << 10];
    while got < ENDLESS_READ {
        let n = s.read(&mut buf).await.map_err(|e| format!("body: {}", e.kind()))?;
        if n == 0 {
            return Err(format!("body ended at {got}"));
        }
        got += n as u64;
    }
    Ok(())
}

const MANIFEST_ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Sends a GET and reads its response head: the status and the connection with how many body
/// bytes came with the head.
async fn get_head(
    facade: SocketAddr,
    path: &str,
    accept: &str,
) -> Result<(String, (tokio::net::TcpStream, u64)), String> {
    let mut s = connect(facade).await.map_err(|e| format!("connect: {}", e.kind()))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {facade}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("send: {}", e.kind()))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut head = Vec::new();
    let body_start = loop {
        let n = s.read(&mut buf).await.map_err(|e| format!("head: {}", e.kind()))?;
        if n == 0 {
            return Err("closed before the head".into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if head.len() > 64 << 10 {
            return Err("head too long".into());
        }
    };
    let status = String::from_utf8_lossy(&head[..body_start]).split(' ').nth(1).unwrap_or("?").to_string();
    Ok((status, (s, (head.len() - body_start) as u64)))
}
