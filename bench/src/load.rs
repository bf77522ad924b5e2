//! A `wrk -t2 -c16`-shaped load generator for manifest HEAD requests: two event-loop threads
//! driving 16 keep-alive connections, each sending the next request as soon as the previous
//! answer's head is in.
//!
//! It exists because Debian's wrk 4.1.0 cannot do HEAD: its parser waits for the body that the
//! `Content-Length` of a HEAD answer announces but never comes, so every request times out (0
//! requests/s). wrk still measures GET in the same run, as a cross-check of this client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer may take at most this long; a stuck server counts as errors, not as a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a load run counted.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Answers per second over the run.
    pub rps: f64,
    /// Answers in all.
    pub requests: u64,
    /// Answers whose status was not 2xx.
    pub non_2xx: u64,
    /// Connection failures, timeouts and malformed answers (each costs a reconnect).
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    non_2xx: AtomicU64,
    errors: AtomicU64,
}

/// Sends `HEAD path` with `accept` over `connections` keep-alive connections on `threads`
/// threads for `duration`.
pub fn head_rps(
    addr: SocketAddr,
    path: &str,
    accept: &str,
    connections: usize,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("load generator runtime")?;
    let request: Arc<[u8]> =
        format!("HEAD {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nUser-Agent: bench\r\n\r\n")
            .into_bytes()
            .into();
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + duration);
    rt.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(connection(addr, request.clone(), deadline, counters.clone())))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let requests = counters.requests.load(Ordering::SeqCst);
    Ok(LoadResult {
        rps: requests as f64 / elapsed.max(1e-9),
        requests,
        non_2xx: counters.non_2xx.load(Ordering::SeqCst),
        errors: counters.errors.load(Ordering::SeqCst),
    })
}

async fn connection(addr: SocketAddr, request: Arc<[u8]>, deadline: tokio::time::Instant, counters: Arc<Counters>) {
    let mut buf = vec![0u8; 16 * 1024];
    while tokio::time::Instant::now() < deadline {
        let Ok(Ok(mut conn)) = tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(addr)).await else {
            counters.errors.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = conn.set_nodelay(true);
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(ANSWER_TIMEOUT, exchange(&mut conn, &request, &mut buf)).await {
                Ok(Ok(Answer { status, close })) => {
                    counters.requests.fetch_add(1, Ordering::SeqCst);
                    if !(200..300).contains(&status) {
                        counters.non_2xx.fetch_add(1, Ordering::SeqCst);
                    }
                    if close {
                        break;
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    counters.errors.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
        }
    }
}

struct Answer {
    status: u16,
    close: bool,
}

/// One HEAD exchange: the answer is its head alone.
async fn exchange(conn: &mut TcpStream, request: &[u8], buf: &mut [u8]) -> std::io::Result<Answer> {
    conn.write_all(request).await?;
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            return Err(std::io::Error::other("answer head too long"));
        }
        let n = conn.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        if buf[..filled].ends_with(b"\r\n\r\n") {
            break;
        }
        if buf[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
            // Bytes after the head of a HEAD answer: the connection's framing is lost.
            return Err(std::io::Error::other("bytes after a HEAD answer's head"));
        }
    }
    let head = String::from_utf8_lossy(&buf[..filled]);
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let close = head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close"))
    });
    Ok(Answer { status, close })
}
