//! Wiring of cluster-wide single-flight (`facade.peer*`, README "Cluster cache"): the download
//! leases in Redis, the peer side of the fills, and the peer listener other nodes stream from.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use facade_blob::cluster::lease::{LeaseConfig, Leases};
use facade_blob::{BlobChain, Fills, PeerConfig, PeerMetrics, PeerServe, Peers};
use facade_server::{PeerAnswer, PeerBlobs, PeerRequest, PeerServerConfig};
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// A peer connection whose reader stops reading is closed after this long.
const WRITE_IDLE: Duration = Duration::from_secs(60);

/// The peer listener, bound, with what it serves from.
pub struct PeerNode {
    listener: TcpListener,
    blobs: Arc<dyn PeerBlobs>,
    config: PeerServerConfig,
}

impl PeerNode {
    /// Binds the peer listener and turns the peer side of `chain`'s fills on, when
    /// `facade.peerAddr` and `facade.peerSecretFile` are set.
    pub fn build(config: &Config, metrics: &prometheus::Registry, chain: &BlobChain) -> anyhow::Result<Option<Self>> {
        let Some(settings) = &config.peer else { return Ok(None) };
        // The leases live in the cluster cache's Redis, whichever topology it is.
        let Some(redis) = config.cluster.redis.clone() else { return Ok(None) };
        let listener =
            bind(settings.listen).with_context(|| format!("facade.peerAddr: cannot listen on {}", settings.listen))?;
        let bound = listener.local_addr().context("facade.peerAddr")?;
        let me = format!("http://{}", settings.advertise.clone().unwrap_or_else(|| bound.to_string()));
        let lease_config =
            LeaseConfig { redis, ttl: settings.lease_ttl, me: me.clone(), breaker: config.cluster.breaker };
        let fills = chain.fills().clone();
        // Lease failures count into the cluster cache's Redis failures.
        let leases = Leases::new(lease_config, fills.cluster_metrics()).context("download leases")?;
        let mut peer_config = PeerConfig::new(me.clone(), settings.secret.clone());
        peer_config.max_followers = settings.max_followers;
        let peer_metrics = PeerMetrics::register(metrics).context("metrics")?;
        fills.set_peers(Peers::new(peer_config, leases, peer_metrics));
        tracing::info!(listen = %bound, advertised = %me, max_followers = settings.max_followers, lease_ttl = ?settings.lease_ttl, "cluster-wide single-flight on");
        Ok(Some(PeerNode {
            listener,
            blobs: Arc::new(FillsPeers(fills)),
            config: PeerServerConfig { secret: settings.secret.clone(), write_idle: WRITE_IDLE },
        }))
    }

    /// The listener's bound address.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves peers until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        facade_server::serve_peers(self.listener, self.blobs, self.config, shutdown).await
    }
}

fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// The blob engine's fills as the peer listener's source.
struct FillsPeers(Arc<Fills>);

impl PeerBlobs for FillsPeers {
    fn open(&self, req: PeerRequest) -> BoxFuture<'_, PeerAnswer> {
        Box::pin(async move {
            match self.0.serve_peer(&req.digest, &req.origin, req.size, req.offset).await {
                PeerServe::Found { size, stream } => PeerAnswer::Found { size, stream },
                PeerServe::NotFound => PeerAnswer::NotFound,
                PeerServe::Busy => PeerAnswer::Busy,
            }
        })
    }
}
