//! The practical limit of this machine: the smallest HTTP server that can serve a blob, a thread
//! per connection copying the file to the socket with 1 MiB reads and `write_all`. It beats nginx
//! with sendfile to a userspace reader on loopback here, so it is the bar for warm throughput.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const BUF: usize = 1 << 20;

/// A running copy server; stopped on drop.
pub struct CopyServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cpu_ns: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    finished: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CopyServer {
    /// Serves `file` (for any path) on a free loopback port.
    pub fn start(file: PathBuf) -> anyhow::Result<CopyServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let cpu = cpu_ns.clone();
        let (accepted, finished) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (acc, fin) = (accepted.clone(), finished.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                acc.fetch_add(1, Ordering::SeqCst);
                let file = file.clone();
                let cpu = cpu.clone();
                let fin = fin.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn, &file) {
                        tracing::debug!(error = %e, "copy server connection");
                    }
                    // A thread per connection: its CPU time is the cost of this one response.
                    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
                    cpu.fetch_add(crate::systems::schedstat_ns(&stat), Ordering::SeqCst);
                    fin.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok(CopyServer { addr, stop, cpu_ns, accepted, finished, thread: Some(thread) })
    }

    /// CPU time its finished connections took, in nanoseconds. A connection's thread adds
    /// its time after the client has the last byte: [`CopyServer::wait_idle`] first.
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Ordering::SeqCst)
    }

    /// Waits (at most `limit`) until every accepted connection's thread has finished.
    pub fn wait_idle(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.finished.load(Ordering::SeqCst) < self.accepted.load(Ordering::SeqCst)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for CopyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the loop sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request, then close: enough for a client that sends `Connection: close`.
fn serve(mut conn: TcpStream, path: &std::path::Path) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut byte)?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&byte[..n]);
    }
    let is_head = head.starts_with(b"HEAD ");
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(answer.as_bytes())?;
    if is_head {
        return Ok(());
    }
    let mut buf = vec![0u8; BUF];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}
