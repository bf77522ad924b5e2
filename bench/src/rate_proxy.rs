//! A TCP proxy that limits every connection through it to a fixed rate towards the client (a
//! token bucket per connection), standing in for a registry on the other side of a WAN: on the
//! internet a single TCP stream to a registry rarely moves more than a few tens of MiB/s,
//! whatever the node's link, so the number of parallel connections a system opens decides how
//! fast it fills. Requests (client → server) pass unlimited; they are a few hundred bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Largest burst a connection may send above its rate: 64 KiB, a few TCP segments' worth, so
/// the rate holds on every time scale a pull can notice.
const BURST: f64 = 64.0 * 1024.0;
/// Read size per step.
const CHUNK: usize = 32 * 1024;

/// A running rate-limiting proxy; stops (and drops every connection) on drop.
pub struct RateProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RateProxy {
    /// Listens on a free loopback port and relays to `target`, each connection's downstream
    /// direction limited to `bytes_per_sec`.
    pub fn start(target: SocketAddr, bytes_per_sec: u64) -> anyhow::Result<RateProxy> {
        anyhow::ensure!(bytes_per_sec > 0, "a rate of 0 bytes per second moves nothing");
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        // Its own runtime and thread: the bench is synchronous, and a relay that shares a
        // runtime with nothing else keeps its pacing whatever the rest of the bench does.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let (b, c) = (bytes.clone(), connections.clone());
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else { return };
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let accepted = tokio::select! {
                        _ = &mut stop_rx => break,
                        a = listener.accept() => a,
                    };
                    let Ok((client, _)) = accepted else { continue };
                    c.fetch_add(1, Ordering::Relaxed);
                    let b = b.clone();
                    conns.spawn(relay(client, target, bytes_per_sec as f64, b));
                    while conns.try_join_next().is_some() {}
                }
                conns.abort_all();
            });
        });
        Ok(RateProxy { addr, bytes, connections, stop: Some(stop), thread: Some(thread) })
    }

    /// `127.0.0.1:PORT`, for image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Bytes relayed towards clients so far.
    pub fn bytes_to_client(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for RateProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn relay(client: TcpStream, target: SocketAddr, rate: f64, counted: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(target).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
        let _ = server_wr.shutdown().await;
    };
    let down = async move {
        let mut bucket = Bucket::new(rate);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match server_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let wait = bucket.take(n as f64);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if client_wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
            counted.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = client_wr.shutdown().await;
    };
    // Either side closing ends the relay once the other direction has drained too.
    tokio::join!(up, down);
}

/// A token bucket: `rate` tokens (bytes) per second, at most [`BURST`] saved up. Taking more
/// than there are drives the balance negative and returns how long to wait until it is paid.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        Bucket { rate, tokens: BURST, at: tokio::time::Instant::now() }
    }

    fn take(&mut self, n: f64) -> Duration {
        let now = tokio::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(BURST);
        self.at = now;
        self.tokens -= n;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::time::Instant;

    /// 6 MiB at 8 MiB/s takes about 0.75 s through the proxy; two connections at once each
    /// get their own 8 MiB/s.
    #[test]
    fn limits_each_connection_to_its_rate() {
        let payload = vec![7u8; 6 << 20];
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let p = payload.clone();
        let srv = std::thread::spawn(move || {
            let mut handles = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = server.accept().unwrap();
                let p = p.clone();
                handles.push(std::thread::spawn(move || {
                    let mut one = [0u8; 1];
                    c.read_exact(&mut one).unwrap();
                    c.write_all(&p).unwrap();
                }));
            }
            for h in handles {
                h.join().unwrap();
            }
        });
        let proxy = RateProxy::start(target, 8 << 20).unwrap();
        let started = Instant::now();
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let addr = proxy.addr;
                std::thread::spawn(move || {
                    let mut c = std::net::TcpStream::connect(addr).unwrap();
                    c.write_all(b"x").unwrap();
                    let mut got = Vec::new();
                    c.read_to_end(&mut got).unwrap();
                    got.len()
                })
            })
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap(), 6 << 20);
        }
        let took = started.elapsed().as_secs_f64();
        srv.join().unwrap();
        // 0.75 s each, in parallel: well under the 1.5 s one shared 8 MiB/s would need, and not
        // faster than the rate allows.
        assert!((0.65..1.3).contains(&took), "took {took:.2} s");
        assert_eq!(proxy.bytes_to_client(), 12 << 20);
        assert_eq!(proxy.connections(), 2);
    }
}
