//! A fault-injecting TCP proxy for failure tests: it sits between the facade and a real server
//! (registry, Redis, IPFS, spec server) on 127.0.0.1 and can cut, stall, corrupt, throttle or
//! refuse connections, while counting bytes and the HTTP request lines that pass through.
//!
//! Knobs apply to connections accepted after they are set; counters cover all connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What to do to new connections (server → client direction unless said otherwise).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Close the connection after this many bytes went to the client.
    pub cut_after: Option<u64>,
    /// Reset (RST) instead of a clean close when cutting.
    pub reset: bool,
    /// Stop forwarding after this many bytes (the connection stays open, silent).
    pub stall_after: Option<u64>,
    /// Flip one byte at this offset of the server → client stream.
    pub corrupt_at: Option<u64>,
    /// Wait this long before forwarding the first byte to the client.
    pub first_byte_delay: Option<Duration>,
    /// Forward at most this many bytes per second.
    pub throttle_bytes_per_sec: Option<u64>,
    /// Accept and close at once.
    pub refuse: bool,
    /// Apply the faults only to this many connections from now on (then pass through); `None`
    /// means every connection.
    pub connections: Option<u64>,
}

#[derive(Default)]
struct Shared {
    faults: Mutex<Faults>,
    faulted_connections: AtomicU64,
    to_client: AtomicU64,
    to_server: AtomicU64,
    connections: AtomicU64,
    requests: Mutex<Vec<String>>,
}

/// A running proxy; stopped on drop.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy to `target` on a free loopback port.
    pub fn start(target: SocketAddr) -> anyhow::Result<FaultProxy> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (stop, stop_rx) = watch::channel(false);
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(std_listener) else { return };
                let mut stop_rx = stop_rx;
                loop {
                    tokio::select! {
                        _ = stop_rx.changed() => break,
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            let sh = sh.clone();
                            let stop_rx = stop_rx.clone();
                            tokio::spawn(async move { handle(client, target, sh, stop_rx).await });
                        }
                    }
                }
            });
        });
        Ok(FaultProxy { addr, shared, stop, thread: Some(thread) })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Sets the faults for new connections.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.faulted_connections.store(0, Ordering::SeqCst);
        if let Ok(mut f) = self.shared.faults.lock() {
            *f = faults;
        }
    }

    /// Passes everything through again.
    pub fn clear_faults(&self) {
        self.set_faults(Faults::default());
    }

    /// Bytes sent to clients so far.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::SeqCst)
    }

    /// Bytes sent to the server so far.
    pub fn bytes_to_server(&self) -> u64 {
        self.shared.to_server.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// HTTP request lines (`GET /v2/… HTTP/1.1`) seen so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// How many request lines start with `method` and contain `needle`.
    pub fn count_requests(&self, method: &str, needle: &str) -> usize {
        self.requests().iter().filter(|r| r.starts_with(&format!("{method} ")) && r.contains(needle)).count()
    }

    /// Forgets counted requests and bytes.
    pub fn reset_counters(&self) {
        self.shared.to_client.store(0, Ordering::SeqCst);
        self.shared.to_server.store(0, Ordering::SeqCst);
        if let Ok(mut r) = self.shared.requests.lock() {
            r.clear();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(client: TcpStream, target: SocketAddr, sh: Arc<Shared>, stop: watch::Receiver<bool>) {
    sh.connections.fetch_add(1, Ordering::SeqCst);
    let faults = faults_for_new_connection(&sh);
    if faults.refuse {
        let _ = client.set_zero_linger();
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else { return };
    if faults.reset {
        // SO_LINGER 0 turns the close that ends a cut into a reset.
        let _ = client.set_zero_linger();
    }
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Either direction ending ends the connection; the other half is dropped with it.
    tokio::select! {
        _ = forward_up(cr, sw, sh.clone()) => {}
        _ = forward_down(sr, cw, faults, sh, stop) => {}
    }
}

/// The faults for a connection accepted now: the set ones, until `connections` of them are used.
fn faults_for_new_connection(sh: &Shared) -> Faults {
    let f = sh.faults.lock().map(|f| f.clone()).unwrap_or_default();
    let n = sh.faulted_connections.fetch_add(1, Ordering::SeqCst);
    if f.connections.is_some_and(|limit| n >= limit) { Faults::default() } else { f }
}

/// Client → server, unchanged, recording request lines.
async fn forward_up(mut cr: OwnedReadHalf, mut sw: OwnedWriteHalf, sh: Arc<Shared>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut line = Vec::new();
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        record_request_lines(&sh, &mut line, &buf[..n]);
        sh.to_server.fetch_add(n as u64, Ordering::SeqCst);
        if sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = sw.shutdown().await;
}

/// Where the server → client stream ends early.
#[derive(Clone, Copy, PartialEq)]
enum Limit {
    Cut,
    Stall,
}

/// How many of the `n` bytes read after `sent` may go on, and whether a cut or stall is reached.
fn clamp_to_limit(faults: &Faults, sent: u64, n: usize) -> (usize, Option<Limit>) {
    for (limit, what) in [(faults.cut_after, Limit::Cut), (faults.stall_after, Limit::Stall)] {
        if let Some(l) = limit
            && sent + n as u64 >= l
        {
            return ((l.saturating_sub(sent)) as usize, Some(what));
        }
    }
    (n, None)
}

/// Server → client with the faults applied.
async fn forward_down(
    mut sr: OwnedReadHalf,
    mut cw: OwnedWriteHalf,
    faults: Faults,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent: u64 = 0;
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if sent == 0
            && let Some(d) = faults.first_byte_delay
        {
            tokio::time::sleep(d).await;
        }
        if let Some(at) = faults.corrupt_at
            && at >= sent
            && at < sent + n as u64
        {
            buf[(at - sent) as usize] ^= 0xff;
        }
        let (n, limit_hit) = clamp_to_limit(&faults, sent, n);
        if n > 0 {
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sent += n as u64;
            sh.to_client.fetch_add(n as u64, Ordering::SeqCst);
            if let Some(rate) = faults.throttle_bytes_per_sec {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate.max(1) as f64)).await;
            }
        }
        match limit_hit {
            // Cut: dropping both halves closes the socket (FIN, or RST with `reset`).
            Some(Limit::Cut) => return,
            Some(Limit::Stall) => {
                // Stall: keep the connection open and silent until the proxy stops.
                let _ = stop.changed().await;
                return;
            }
            None => {}
        }
    }
    let _ = cw.shutdown().await;
}

fn record_request_lines(sh: &Shared, pending: &mut Vec<u8>, data: &[u8]) {
    pending.extend_from_slice(data);
    while let Some(pos) = pending.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&pending[..pos]).to_string();
        pending.drain(..pos + 2);
        let is_request = ["GET ", "HEAD ", "POST ", "PUT ", "PATCH ", "DELETE "].iter().any(|m| line.starts_with(m))
            && line.ends_with("HTTP/1.1");
        if is_request && let Ok(mut r) = sh.requests.lock() {
            r.push(line);
        }
    }
    // Bodies without line breaks must not grow this without bound.
    if pending.len() > 64 * 1024 {
        let keep = pending.split_off(pending.len() - 16);
        *pending = keep;
    }
}
