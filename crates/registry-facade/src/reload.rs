//! Configuration reload while serving. The config file and the files it names (specs, docker
//! credentials, static layer tars) are polled, because Kubernetes updates mounted ConfigMaps and
//! Secrets by swapping a `..data` symlink, which watching the file path alone misses; a change
//! of (resolved path, mtime, size, inode) of any of them triggers a reload.
//!
//! A new configuration that does not parse or validate is rejected with one log line and the
//! running one stays. What can change live: static layers (images composed before stay pullable
//! by digest), spec providers and the fixed specs, upstream credentials. Listen addresses, the
//! store and the URL prefix need a restart, and a change to them is logged as such.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use facade_spec::Providers;
use tokio_util::sync::CancellationToken;

use crate::backend::Engine;
use crate::config::{self, Config, ProcessEnv};

/// Builds the spec providers of a configuration (the same function start-up uses).
pub type ProviderFactory = Arc<dyn Fn(&Config) -> anyhow::Result<Providers> + Send + Sync>;

/// What a reload acts on.
pub struct Reloader {
    /// The config file as given on the command line.
    pub path: PathBuf,
    /// The configuration running now.
    pub current: Config,
    /// Composed images and the blob chain.
    pub engine: Arc<Engine>,
    /// The upstream client (credentials are swapped in place).
    pub upstream: facade_upstream::Client,
    /// Makes providers from a configuration.
    pub providers: ProviderFactory,
    /// How often files are looked at.
    pub interval: Duration,
}

/// The versions of the watched files, through the server's file poller (it follows
/// Kubernetes' `..data` symlink swaps).
#[derive(PartialEq, Eq, Debug, Clone)]
struct Stamp(Vec<(PathBuf, Option<facade_server::FileStamp>)>);

fn stamp_of(paths: &[PathBuf]) -> Stamp {
    Stamp(paths.iter().map(|p| (p.clone(), facade_server::file_stamp(p))).collect())
}

fn watched(path: &Path, c: &Config) -> Vec<PathBuf> {
    let mut v = vec![path.to_path_buf()];
    v.extend(c.fixed_spec_file.iter().cloned());
    v.extend(c.docker_auth.iter().cloned());
    for l in &c.static_layers {
        if let facade_blob::StaticLayerSpec::File(p) = l {
            v.push(p.clone());
        }
    }
    // Spec server CA and client certificate (renewed by cert-manager): a change rebuilds the
    // remote provider with the new files.
    for p in &c.remote_spec_providers {
        if let Some(t) = &p.tls {
            v.push(t.ca.clone());
            if let Some((crt, key)) = &t.identity {
                v.push(crt.clone());
                v.push(key.clone());
            }
        }
    }
    v
}

impl Reloader {
    /// Polls until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut last = stamp_of(&watched(&self.path, &self.current));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            let now = stamp_of(&watched(&self.path, &self.current));
            if now == last {
                continue;
            }
            match self.reload().await {
                Ok(summary) => tracing::info!(config = %self.path.display(), %summary, "configuration reloaded"),
                Err(e) => {
                    tracing::warn!(config = %self.path.display(), error = %format!("{e:#}"), "configuration reload rejected; keeping the running configuration")
                }
            }
            // The new config may name other files.
            last = stamp_of(&watched(&self.path, &self.current));
        }
    }

    /// Reads, validates and applies the file now.
    pub async fn reload(&mut self) -> anyhow::Result<String> {
        let text = tokio::fs::read_to_string(&self.path).await?;
        let base = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let new = config::parse(&text, &base, &ProcessEnv).map_err(|e| anyhow::anyhow!("{e}"))?;
        let old = &self.current;
        let mut restart_needed = Vec::new();
        if new.listen != old.listen {
            restart_needed.push("registry.port/facade.listenHost");
        }
        if new.store != old.store {
            restart_needed.push("registry.store");
        }
        if new.prefix != old.prefix {
            restart_needed.push("registry.prefix");
        }
        if new.prometheus_addr != old.prometheus_addr || new.readiness_addr != old.readiness_addr {
            restart_needed.push("prometheusAddr/readinessProbeAddr");
        }
        // The files behind these are re-read by the server when they change; which files, and
        // the other knobs below, are fixed at start.
        let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        for (key, changed) in [
            ("registry.tls", differs(&new.tls, &old.tls)),
            ("registry.requireAuth/facade.htpasswd", differs(&new.client_auth, &old.client_auth)),
            ("registry.redis/registry.ipfs/facade.cluster*", differs(&new.cluster, &old.cluster)),
            ("facade.storeMaxBytes/storeTTL", differs(&new.store_bounds, &old.store_bounds)),
            ("facade.platform/tagTTL", differs(&new.fetch, &old.fetch)),
            ("facade.composeTTL", differs(&new.images, &old.images)),
            ("facade.plainHTTPHosts/upstream*Timeout/upstreamCA", differs(&new.upstream, &old.upstream)),
            ("facade.shutdownGrace", new.shutdown_grace != old.shutdown_grace),
            ("facade.maxRequest*/maxURLBytes/responseIdleTimeout", differs(&new.limits, &old.limits)),
            ("facade.legacyMetrics", new.legacy_metrics != old.legacy_metrics),
            ("facade.prefetch*", differs(&new.prefetch, &old.prefetch)),
            ("facade.blocking*Threads", new.lanes != old.lanes),
        ] {
            if changed {
                restart_needed.push(key);
            }
        }
        // Build everything first, then swap: a failure leaves the running state untouched.
        let auth = match &new.docker_auth {
            Some(p) => Some(facade_upstream::DockerAuth::parse(&tokio::fs::read_to_string(p).await?)?),
            None => Some(facade_upstream::DockerAuth::empty()),
        };
        let providers = (self.providers)(&new)?;
        let store = self.engine.chain.store().cloned();
        let specs = new.static_layers.clone();
        let layers =
            tokio::task::spawn_blocking(move || facade_blob::static_layers::prepare(&specs, store.as_ref())).await??;
        if let Some(a) = auth {
            self.upstream.set_auth(a);
        }
        let n_layers = layers.len();
        self.engine.images.set_static_layers(layers);
        self.engine.images.set_providers(providers);
        self.current = new;
        let mut summary = format!("{n_layers} static layers, providers and credentials swapped");
        if !restart_needed.is_empty() {
            tracing::warn!(keys = %restart_needed.join(", "), "changed keys take effect after a restart");
            summary.push_str(&format!("; restart needed for {}", restart_needed.join(", ")));
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_follow_symlink_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("config.json"), "{}").unwrap();
        std::fs::write(b.join("config.json"), "{}").unwrap();
        // The ConfigMap layout: config.json -> ..data/config.json, ..data -> a
        std::os::unix::fs::symlink("a", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/config.json", dir.path().join("config.json")).unwrap();
        let watched = [dir.path().join("config.json")];
        let before = stamp_of(&watched);
        assert_eq!(before, stamp_of(&watched));
        std::os::unix::fs::symlink("b", dir.path().join("..data.tmp")).unwrap();
        std::fs::rename(dir.path().join("..data.tmp"), dir.path().join("..data")).unwrap();
        assert_ne!(before, stamp_of(&watched), "a swap to same-sized content must be seen");
    }
}
