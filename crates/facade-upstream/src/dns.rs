//! Name resolution on threads of its own.
//!
//! `getaddrinfo` blocks. Run on tokio's blocking pool (hyper's default resolver does), a
//! registry whose name server answers slowly — the registry a workspace names is its
//! author's — would hold threads that blob file I/O and store commits need. Here it gets a
//! few threads and a short queue of its own: a slow name server can delay other lookups at
//! worst, and a full queue fails a lookup at once instead of piling up.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use tower_service::Service;

/// Lookups waiting for a thread before new ones are refused.
const QUEUE: usize = 64;

struct Job {
    host: String,
    port: u16,
    reply: tokio::sync::oneshot::Sender<io::Result<Vec<SocketAddr>>>,
}

/// Resolves names on `threads` threads of its own. Cheap to clone; the threads end when the
/// last clone is dropped.
#[derive(Clone)]
pub(crate) struct DnsPool {
    jobs: SyncSender<Job>,
}

impl DnsPool {
    pub(crate) fn new(threads: usize) -> DnsPool {
        let (jobs, queue) = sync_channel::<Job>(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new().name(format!("upstream-dns-{i}")).spawn(move || serve(&queue));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a name resolution thread");
            }
        }
        DnsPool { jobs }
    }

    /// The addresses of `host` (a name or an IP literal) with `port`.
    pub(crate) async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        match self.jobs.try_send(Job { host: host.to_string(), port, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "too many name lookups waiting"));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(io::Error::other("no name resolution thread is running"));
            }
        }
        answer.await.map_err(|_| io::Error::other("name resolution thread ended"))?
    }
}

fn serve(queue: &Mutex<Receiver<Job>>) {
    loop {
        let job = match queue.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let answer = (job.host.as_str(), job.port).to_socket_addrs().map(Iterator::collect);
        let _ = job.reply.send(answer);
    }
}

impl Service<Name> for DnsPool {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Readiness is decided per lookup: a full queue fails that lookup.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let pool = self.clone();
        // The connector sets the port on the addresses it gets back.
        Box::pin(async move { pool.lookup(name.as_str(), 0).await.map(Vec::into_iter) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_names_and_literals_off_the_runtime() {
        let pool = DnsPool::new(2);
        let addrs = pool.lookup("localhost", 80).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80), "{addrs:?}");
        let addrs = pool.lookup("127.0.0.7", 5).await.unwrap();
        assert_eq!(addrs, vec![SocketAddr::from(([127, 0, 0, 7], 5))]);
        assert!(pool.lookup("no-such-host.invalid", 1).await.is_err());
    }

    #[tokio::test]
    async fn a_full_queue_fails_at_once_instead_of_waiting() {
        // No thread takes jobs: the queue fills and the next lookup is refused.
        let (jobs, _queue) = sync_channel::<Job>(1);
        let pool = DnsPool { jobs };
        let first = pool.clone();
        let pending = tokio::spawn(async move { first.lookup("localhost", 1).await });
        tokio::task::yield_now().await;
        let err = tokio::time::timeout(std::time::Duration::from_secs(1), pool.lookup("localhost", 2))
            .await
            .expect("waited for a full queue")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        pending.abort();
    }
}
