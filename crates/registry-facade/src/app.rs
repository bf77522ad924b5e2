//! Wiring: configuration → components → bound listeners → serving until shutdown.
//!
//! Listeners are bound in [`App::build`] (port 0 allowed), so callers and tests know the
//! addresses before serving starts.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use facade_blob::{
    BlobChain, ChainMetrics, ClusterCache, ClusterMetrics, FillConfig, Fills, ImageFetcher, Images, LocalStore,
    PrefetchMetrics, Prefetcher, StaticLayer, StoreMetrics,
};
use facade_server::{AuthFile, Readiness, ServerConfig, ServerMetrics, TlsFiles};
use facade_spec::{
    CachedSpecProvider, ClientTls, FixedSpecProvider, GrpcEndpoint, GrpcSpecProvider, Providers, SpecMetrics,
};
use facade_upstream::DockerAuth;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backend::Engine;
use crate::config::{ClientAuth, Config};
use crate::reload::{ProviderFactory, Reloader};

/// A facade with its listeners bound.
pub struct App {
    registry_listener: TcpListener,
    /// The peer listener (cluster-wide single-flight), when configured.
    peer: Option<crate::peer::PeerNode>,
    admin_listeners: Vec<TcpListener>,
    app: Arc<facade_server::App<Engine>>,
    metrics: prometheus::Registry,
    readiness: Readiness,
    grace: std::time::Duration,
    store: Option<LocalStore>,
    reloader: Option<Reloader>,
    parts: Parts,
}

/// What a config reload swaps things in.
struct Parts {
    config: Config,
    engine: Arc<Engine>,
    upstream: facade_upstream::Client,
    providers: ProviderFactory,
}

impl App {
    /// Builds every component and binds the listeners.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        for notice in config.startup_notices() {
            tracing::info!("{notice}");
        }
        let metrics = prometheus::Registry::new();
        // Process-wide, like the memory and the blocking pool they divide (facade-blob).
        facade_blob::ResponseBuffers::configure(config.memory.max_buffered_response_bytes);
        let lanes = facade_blob::blocking::BlockingMetrics::register(&metrics).context("metrics")?;
        facade_blob::blocking::configure(config.lanes, Some(lanes));
        let upstream = upstream_client(&config, &metrics)?;
        let store = open_store(&config, &metrics)?;
        let static_layers = prepare_static_layers(&config, store.clone()).await?;
        let spec_metrics = SpecMetrics::register(&metrics).context("metrics")?;
        let provider_factory: ProviderFactory = Arc::new(move |c: &Config| build_providers(c, spec_metrics.clone()));
        let providers = provider_factory(&config)?;
        let engine = build_engine(&config, &metrics, upstream.clone(), store.clone(), providers, static_layers)?;
        let app = registry_app(&config, &metrics, engine.clone())?;
        let peer = crate::peer::PeerNode::build(&config, &metrics, &engine.chain)?;
        let (registry_listener, admin_listeners) = bind_listeners(&config)?;
        let peer_addr = peer.as_ref().and_then(crate::peer::PeerNode::addr);
        upstream.set_address_policy(address_policy(&config, &registry_listener, &admin_listeners, peer_addr));
        Ok(App {
            registry_listener,
            admin_listeners,
            app,
            metrics,
            readiness: Readiness::new(),
            grace: config.shutdown_grace,
            store,
            reloader: None,
            peer,
            parts: Parts { config, engine, upstream, providers: provider_factory },
        })
    }

    /// Reloads the configuration from `path` whenever it (or a file it names) changes.
    pub fn watch_config(&mut self, path: std::path::PathBuf, interval: std::time::Duration) {
        self.reloader = Some(Reloader {
            path,
            current: self.parts.config.clone(),
            engine: self.parts.engine.clone(),
            upstream: self.parts.upstream.clone(),
            providers: self.parts.providers.clone(),
            interval,
        });
    }

    /// The registry's bound address.
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The admin listeners' bound addresses (metrics first when both are set and differ).
    pub fn admin_addrs(&self) -> Vec<SocketAddr> {
        self.admin_listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Serves until `shutdown`, then drains in-flight requests for up to the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let addr = self.registry_addr();
        let serving = CancellationToken::new();
        if let Some(store) = &self.store {
            store.spawn_gc(serving.clone());
        }
        let mut tasks = tokio::task::JoinSet::new();
        for l in self.admin_listeners {
            let (reg, ready, stop) = (self.metrics.clone(), self.readiness.clone(), serving.clone());
            let workspaces: Arc<dyn facade_server::Workspaces> = self.parts.engine.clone();
            tasks.spawn(async move { facade_server::serve_admin_with(l, reg, ready, Some(workspaces), stop).await });
        }
        if let Some(r) = self.reloader {
            tasks.spawn({
                let stop = serving.clone();
                async move {
                    r.run(stop).await;
                    Ok(())
                }
            });
        }
        let tls = self.app.is_tls();
        if let Some(peer) = self.peer {
            tasks.spawn(peer.serve(serving.clone()));
        }
        let server = tokio::spawn(facade_server::serve(self.registry_listener, self.app, serving.clone()));
        tracing::info!(%addr, tls, "registry-facade serving");
        tasks.spawn({
            let (engine, ready, stop) = (self.parts.engine.clone(), self.readiness.clone(), serving.clone());
            let timeout = self.parts.config.spec.grpc.timeout;
            async move {
                readiness_loop(engine, ready, timeout, stop).await;
                Ok(())
            }
        });
        shutdown.cancelled().await;
        tracing::info!(grace_seconds = self.grace.as_secs(), "shutting down: draining in-flight pulls");
        self.readiness.set_ready(false);
        serving.cancel();
        match tokio::time::timeout(self.grace, server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "registry server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "registry server task failed"),
            Err(_) => tracing::warn!("grace period over; dropping the remaining connections"),
        }
        tasks.abort_all();
        Ok(())
    }
}

/// Readiness: serving, and every spec provider usable. A provider is usable when it answers a
/// probe for a workspace that does not exist (the same probe the node-labeler sends through
/// the registry): "not found" is an answer, a timeout or `UNAVAILABLE` is not. Liveness never
/// looks at this.
async fn readiness_loop(engine: Arc<Engine>, ready: Readiness, timeout: std::time::Duration, stop: CancellationToken) {
    const PROBE_ID: &str = "registry-facade-readiness-probe";
    let mut was: Option<bool> = None;
    loop {
        let providers = engine.images.providers();
        let mut usable = true;
        for name in providers.names() {
            let Ok(p) = providers.get(name) else { continue };
            let answer = tokio::time::timeout(timeout + std::time::Duration::from_secs(1), p.get_spec(PROBE_ID)).await;
            let ok = matches!(answer, Ok(Ok(_)) | Ok(Err(facade_spec::Error::NotFound { .. })));
            if !ok {
                usable = false;
                if was != Some(false) {
                    tracing::warn!(provider = name, "spec provider not usable; reporting not ready");
                }
            }
        }
        if was != Some(usable) && was.is_some() && usable {
            tracing::info!("spec providers usable again; reporting ready");
        }
        if stop.is_cancelled() {
            return;
        }
        ready.set_ready(usable);
        was = Some(usable);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(if usable { 10 } else { 2 })) => {}
        }
    }
}

/// The upstream client, with the credentials of `dockerAuth`.
fn upstream_client(config: &Config, metrics: &prometheus::Registry) -> anyhow::Result<facade_upstream::Client> {
    let auth = match &config.docker_auth {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("dockerAuth: cannot read {}", p.display()))?;
            DockerAuth::parse(&text).with_context(|| format!("dockerAuth: {}", p.display()))?
        }
        None => DockerAuth::empty(),
    };
    let upstream_metrics =
        facade_upstream::UpstreamMetrics::register_with(metrics, config.legacy_metrics).context("metrics")?;
    facade_upstream::Client::with_metrics(config.upstream.clone(), auth, Some(upstream_metrics))
        .context("upstream client")
}

/// The local content store, when `registry.store` names one.
fn open_store(config: &Config, metrics: &prometheus::Registry) -> anyhow::Result<Option<LocalStore>> {
    let Some(dir) = &config.store else { return Ok(None) };
    let store = LocalStore::open_with(dir, config.store_bounds.clone())
        .with_context(|| format!("registry.store: {}", dir.display()))?;
    store.set_metrics(StoreMetrics::register(metrics).context("metrics")?);
    Ok(Some(store))
}

/// Hashes the static file layers (into the store when there is one) and lists the image ones.
async fn prepare_static_layers(config: &Config, store: Option<LocalStore>) -> anyhow::Result<Vec<StaticLayer>> {
    let specs = config.static_layers.clone();
    tokio::task::spawn_blocking(move || facade_blob::static_layers::prepare(&specs, store.as_ref()))
        .await
        .context("static layers")?
        .context("registry.staticLayer")
}

/// The image service and the blob chain behind the registry: fetcher, composer, fills.
fn build_engine(
    config: &Config,
    metrics: &prometheus::Registry,
    upstream: facade_upstream::Client,
    store: Option<LocalStore>,
    providers: Providers,
    static_layers: Vec<StaticLayer>,
) -> anyhow::Result<Arc<Engine>> {
    let cluster_metrics = ClusterMetrics::register(metrics).context("metrics")?;
    let cluster = cluster_cache(config, &cluster_metrics)?;
    let fetcher = ImageFetcher::new(upstream.clone(), config.fetch.clone()).with_cluster(cluster.clone());
    let images = Images::new(config.images.clone(), providers, fetcher, static_layers).with_cluster(cluster.clone());
    let fills = Fills::with_cluster(FillConfig::default(), store.clone(), upstream, cluster, cluster_metrics.clone())
        .context("blob fills")?;
    // Without a store a fill lives only as long as its readers: prefetch on manifest is off
    // then (warm-up answers that it needs a store).
    let prefetch_metrics = PrefetchMetrics::register(metrics).context("metrics")?;
    let prefetch = Prefetcher::new(config.prefetch.clone(), store.clone(), fills.clone(), prefetch_metrics);
    let chain_metrics = ChainMetrics::register_with(metrics, config.legacy_metrics).context("metrics")?;
    let chain = Arc::new(BlobChain::with_metrics(store, fills, cluster_metrics).with_chain_metrics(chain_metrics));
    Ok(Arc::new(Engine { images, chain, prefetch }))
}

/// The registry's request handler: prefix, TLS, client auth and request limits.
fn registry_app(
    config: &Config,
    metrics: &prometheus::Registry,
    engine: Arc<Engine>,
) -> anyhow::Result<Arc<facade_server::App<Engine>>> {
    let server_metrics = ServerMetrics::register_with(metrics, config.legacy_metrics).context("metrics")?;
    let mut server_config = ServerConfig {
        prefix: config.prefix.clone(),
        tls: config.tls.as_ref().map(|(cert, key)| TlsFiles { cert: cert.clone(), key: key.clone() }),
        auth: match &config.client_auth {
            ClientAuth::Off => None,
            ClientAuth::CredentialsPresent => Some(AuthFile::credentials_present()),
            ClientAuth::Htpasswd(p) => Some(AuthFile { htpasswd: p.clone() }),
        },
        ..ServerConfig::default()
    };
    config.limits.apply_to(&mut server_config);
    let app = facade_server::App::try_new(server_config, engine, server_metrics)
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .context("registry.tls / facade.htpasswd")?;
    Ok(Arc::new(app))
}

/// The registry listener and the admin listeners (metrics, probes; one when both name the same
/// address).
/// Upstream connections may not reach this process's own listeners, nor the denied networks
/// (README, "Security model").
fn address_policy(
    config: &Config,
    registry: &TcpListener,
    admin: &[TcpListener],
    peer: Option<SocketAddr>,
) -> facade_upstream::ssrf::Policy {
    let own = std::iter::once(registry).chain(admin).filter_map(|l| l.local_addr().ok()).chain(peer).collect();
    facade_upstream::ssrf::Policy::new(own, config.upstream_deny_networks.clone())
}

fn bind_listeners(config: &Config) -> anyhow::Result<(TcpListener, Vec<TcpListener>)> {
    let registry =
        bind_shared(config.listen).with_context(|| format!("registry.port: cannot listen on {}", config.listen))?;
    let mut admin = Vec::new();
    let mut admin_addrs: Vec<SocketAddr> = Vec::new();
    for (key, addr) in [("prometheusAddr", config.prometheus_addr), ("readinessProbeAddr", config.readiness_addr)] {
        let Some(addr) = addr.filter(|a| !admin_addrs.contains(a)) else { continue };
        admin.push(bind_shared(addr).with_context(|| format!("{key}: cannot listen on {addr}"))?);
        admin_addrs.push(addr);
    }
    Ok((registry, admin))
}

/// Binds the registry port with SO_REUSEPORT, so a new facade process can take the port over
/// while the old one drains its pulls (zero-downtime restart): the kernel spreads new
/// connections over every open listener of the port, and the old one closes its own on SIGTERM.
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The spec providers of a configuration: `fixed` from its file, `remote` from the spec servers.
fn build_providers(config: &Config, spec_metrics: SpecMetrics) -> anyhow::Result<Providers> {
    let mut providers = Providers::new();
    if let Some(f) = &config.fixed_spec_file {
        let fixed = FixedSpecProvider::load(f).context("registry.fixedSpecFN")?;
        tracing::info!(file = %f.display(), workspaces = fixed.len(), "loaded fixed specs");
        providers.insert("fixed", Arc::new(fixed));
    }
    if !config.remote_spec_providers.is_empty() {
        providers.insert("remote", Arc::new(remote_provider(config, spec_metrics)?));
    }
    Ok(providers)
}

/// The `remote` provider: the configured spec servers in order, behind the spec cache. Reads
/// the TLS files now so a bad certificate stops the start, naming its key; connects lazily, so a
/// spec server that is down does not.
fn remote_provider(config: &Config, metrics: SpecMetrics) -> anyhow::Result<CachedSpecProvider<GrpcSpecProvider>> {
    let read = |key: String, p: &std::path::Path| -> anyhow::Result<Vec<u8>> {
        std::fs::read(p).with_context(|| format!("{key}: cannot read {}", p.display()))
    };
    let mut endpoints = Vec::new();
    for (i, p) in config.remote_spec_providers.iter().enumerate() {
        let key = format!("registry.remoteSpecProvider[{i}]");
        let tls = match &p.tls {
            None => None,
            Some(t) => Some(ClientTls {
                ca_pem: read(format!("{key}.tls.ca"), &t.ca)?,
                identity: match &t.identity {
                    Some((crt, k)) => Some((read(format!("{key}.tls.crt"), crt)?, read(format!("{key}.tls.key"), k)?)),
                    None => None,
                },
                server_name: Some(config.spec.server_name.clone()),
            }),
        };
        endpoints.push(GrpcEndpoint { addr: p.addr.clone(), tls });
    }
    let grpc = GrpcSpecProvider::new("remote", &endpoints, config.spec.grpc.clone())
        .context("registry.remoteSpecProvider")?
        .with_metrics(metrics.clone());
    tracing::info!(servers = endpoints.len(), timeout = ?config.spec.grpc.timeout, "remote spec provider configured");
    Ok(CachedSpecProvider::new("remote", grpc, config.spec.cache.clone()).with_metrics(metrics))
}

/// The cluster cache, when Redis or IPFS is enabled. Connects lazily: a dependency that is down
/// at start-up is an outage the chain falls back from, not a reason to refuse to start.
fn cluster_cache(config: &Config, metrics: &ClusterMetrics) -> anyhow::Result<Option<Arc<ClusterCache>>> {
    let c = &config.cluster;
    if c.redis.is_none() && c.ipfs.is_none() {
        return Ok(None);
    }
    let cluster = ClusterCache::new(c.clone(), metrics.clone()).context("registry.redis / registry.ipfs")?;
    tracing::info!(
        redis = c.redis.as_ref().map(|r| r.describe()),
        redis_tls = c.redis.as_ref().is_some_and(|r| r.tls),
        ipfs = c.ipfs.as_ref().map(|i| i.api.as_str()),
        "cluster cache configured"
    );
    Ok(Some(cluster))
}
