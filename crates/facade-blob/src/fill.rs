//! Single-flight fills: one upstream download per digest, spooled to a temp file that every
//! concurrent reader follows, verified before it is committed to the local store.
//!
//! This is the fix for the reference facade's N downloads for N pods starting with the same IDE
//! layer: the first request starts a fill, later ones join it and read what is already on disk,
//! then follow the rest. A broken upstream body is resumed from the byte offset with a Range
//! request (only a 206 starting at that offset is accepted), with exponential backoff and jitter
//! inside a budget well below containerd's 30 s header / 60 s progress windows.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use facade_oci::{Digest, RepoName};
use futures::StreamExt;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::read::Progress;
use crate::store::{LocalStore, TempBlob};

/// Knobs of fills.
#[derive(Clone, Debug)]
pub struct FillConfig {
    /// Where fills spool when there is no local store.
    pub spool_dir: PathBuf,
    /// First retry delay.
    pub retry_min_delay: Duration,
    /// Longest retry delay.
    pub retry_max_delay: Duration,
    /// Attempts without progress before the fill gives up.
    pub max_attempts_without_progress: usize,
    /// Resumes in all (bounds O(n²) re-reads from a flapping upstream).
    pub max_resumes: usize,
}

impl Default for FillConfig {
    fn default() -> Self {
        FillConfig {
            spool_dir: std::env::temp_dir().join(format!("registry-facade-spool-{}", std::process::id())),
            retry_min_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(2),
            max_attempts_without_progress: 5,
            max_resumes: 64,
        }
    }
}

/// Where a fill downloads from.
#[derive(Clone, Debug)]
pub struct UpstreamBlob {
    /// Registry host as written in the image ref.
    pub registry: String,
    /// Repository.
    pub repo: RepoName,
}

/// One in-flight download, shared by its readers.
pub struct Fill {
    /// The digest being filled.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
}

impl Fill {
    /// The file readers read from (open before any rename, so commit does not disturb them).
    pub fn file(&self) -> Arc<std::fs::File> {
        self.file.clone()
    }

    /// A progress receiver for a new reader.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

}

/// The table of in-flight fills.
pub struct Fills {
    config: FillConfig,
    store: Option<LocalStore>,
    upstream: facade_upstream::Client,
    inflight: Mutex<HashMap<Digest, Weak<Fill>>>,
}

impl Fills {
    /// A table that commits to `store` (if any) and downloads with `upstream`.
    pub fn new(config: FillConfig, store: Option<LocalStore>, upstream: facade_upstream::Client) -> Result<Arc<Self>> {
        if store.is_none() {
            std::fs::create_dir_all(&config.spool_dir)
                .map_err(|e| Error::io(format!("creating spool dir {}", config.spool_dir.display()), e))?;
        }
        Ok(Arc::new(Fills { config, store, upstream, inflight: Mutex::new(HashMap::new()) }))
    }

    /// Number of fills in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.lock().map(|m| m.values().filter(|w| w.strong_count() > 0).count()).unwrap_or(0)
    }

    /// Joins the fill of `digest`, starting it if none runs. Returns the fill and whether this
    /// call started it.
    pub fn join(self: &Arc<Self>, digest: &Digest, size: u64, from: &UpstreamBlob) -> Result<(Arc<Fill>, bool)> {
        let mut map = self.inflight.lock().map_err(|_| Error::io("fill table poisoned", std::io::ErrorKind::Other.into()))?;
        if let Some(existing) = map.get(digest).and_then(Weak::upgrade)
            && !matches!(*existing.progress.borrow(), Progress::Failed(_)) {
                return Ok((existing, false));
            }
        let temp = match &self.store {
            Some(store) => store.temp_blob(digest)?,
            None => TempBlob::create(&self.config.spool_dir, digest)?,
        };
        let file = std::fs::File::open(temp.path())
            .map_err(|e| Error::io(format!("opening {}", temp.path().display()), e))?;
        let (tx, rx) = watch::channel(Progress::Running { written: 0 });
        let fill = Arc::new(Fill { digest: digest.clone(), size, file: Arc::new(file), progress: rx });
        map.insert(digest.clone(), Arc::downgrade(&fill));
        drop(map);
        let this = self.clone();
        let task_fill = fill.clone();
        let from = from.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = this.run(&task_fill, temp, &from, &tx).await;
            match &result {
                Ok(()) => {
                    let secs = started.elapsed().as_secs_f64();
                    tracing::info!(
                        digest = %task_fill.digest, registry = %from.registry, repo = %from.repo,
                        size = task_fill.size, seconds = secs,
                        mib_per_second = (task_fill.size as f64 / 1048576.0) / secs.max(1e-9),
                        "downloaded blob from upstream"
                    );
                    let _ = tx.send(Progress::Verified);
                }
                Err(e) => {
                    tracing::warn!(digest = %task_fill.digest, registry = %from.registry, repo = %from.repo, error = %e, "blob fill failed");
                    let _ = tx.send(Progress::Failed(e.to_string().into()));
                }
            }
            if let Ok(mut map) = this.inflight.lock()
                && map.get(&task_fill.digest).is_some_and(|w| w.as_ptr() == Arc::as_ptr(&task_fill)) {
                    map.remove(&task_fill.digest);
                }
        });
        Ok((fill, true))
    }

    async fn run(&self, fill: &Arc<Fill>, mut temp: TempBlob, from: &UpstreamBlob, tx: &watch::Sender<Progress>) -> Result<()> {
        let digest = &fill.digest;
        let mut backoff = self.backoff();
        let mut resumes = 0usize;
        let mut last_err: Option<Error> = None;
        loop {
            let offset = temp.written();
            if offset == fill.size {
                break;
            }
            if resumes > self.config.max_resumes {
                return Err(last_err.unwrap_or_else(|| Error::io("too many resumes", std::io::ErrorKind::Other.into())));
            }
            let progressed_from = offset;
            match self.upstream.blob_stream(&from.registry, &from.repo, digest, offset).await {
                Ok(mut stream) => {
                    if let Some(total) = stream.total_size
                        && total != fill.size {
                            return Err(Error::DigestMismatch { expected: digest.clone(), actual: digest.clone(), size: total });
                        }
                    while let Some(chunk) = stream.body.next().await {
                        match chunk {
                            Ok(bytes) => {
                                if temp.written() + bytes.len() as u64 > fill.size {
                                    return Err(Error::DigestMismatch {
                                        expected: digest.clone(),
                                        actual: digest.clone(),
                                        size: temp.written() + bytes.len() as u64,
                                    });
                                }
                                temp.write_all(&bytes)?;
                                let _ = tx.send(Progress::Running { written: temp.written() });
                                // Readers hold the fill (as the guard of their stream); the task holds one reference.
                                if self.store.is_none() && Arc::strong_count(fill) <= 1 {
                                    // Nobody reads and nothing caches: stop downloading.
                                    return Err(Error::io("fill cancelled: no readers left", std::io::ErrorKind::Interrupted.into()));
                                }
                            }
                            Err(e) => {
                                let retry = e.is_retryable();
                                let err = Error::upstream(format!("{}/{}@{digest}", from.registry, from.repo), e);
                                if !retry {
                                    return Err(err);
                                }
                                tracing::debug!(%digest, offset = temp.written(), error = %err, "upstream body broke; resuming");
                                last_err = Some(err);
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    let retry = e.is_retryable() || matches!(e.kind(), facade_upstream::ErrorKind::Protocol) && offset > 0;
                    let err = Error::upstream(format!("{}/{}@{digest}", from.registry, from.repo), e);
                    if !retry {
                        return Err(err);
                    }
                    last_err = Some(err);
                }
            }
            if temp.written() == fill.size {
                break;
            }
            resumes += 1;
            if temp.written() > progressed_from {
                backoff = self.backoff();
            }
            match backoff.next() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    return Err(last_err.unwrap_or_else(|| Error::io("retries exhausted", std::io::ErrorKind::Other.into())));
                }
            }
        }
        let size = fill.size;
        let digest = digest.clone();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || match store {
            Some(store) => temp.commit(&store, &digest, size),
            None => temp.verify(&digest, size),
        })
        .await
        .map_err(|e| Error::io("commit task", std::io::Error::other(e)))?
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.config.retry_min_delay)
            .with_max_delay(self.config.retry_max_delay)
            .with_max_times(self.config.max_attempts_without_progress)
            .with_jitter()
            .build()
    }
}
