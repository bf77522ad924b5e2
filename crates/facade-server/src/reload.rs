//! Files that are re-read when they change, without a restart: the TLS certificate and key, the
//! htpasswd file.
//!
//! Changes are found by polling each file's (size, mtime, ctime, device, inode) through its
//! path, not by inotify: Kubernetes updates a mounted Secret or ConfigMap by re-pointing the
//! `..data` symlink at a new directory, and a watch on the old file never fires for that. A
//! `stat` through the path follows the symlinks and sees the new inode.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// How to turn a set of files into a value.
pub(crate) trait Load: Send + Sync + 'static {
    type Item: Send + Sync + 'static;
    /// Names the file set in logs and in the `file` label of the reload metric.
    const KIND: &'static str;
    fn paths(&self) -> Vec<&Path>;
    /// Reads and validates the files. Blocking I/O.
    fn load(&self) -> Result<Self::Item>;
}

/// Counters of one file set's reloads.
#[derive(Clone, Debug)]
pub(crate) struct ReloadCounters {
    pub(crate) ok: IntCounter,
    pub(crate) error: IntCounter,
}

/// A loaded value that follows its files.
pub(crate) struct Watched<L: Load> {
    loader: L,
    /// `None` only when the first load failed and the caller chose to start anyway (fail
    /// closed): the value appears as soon as the files are fixed.
    current: RwLock<Option<Arc<L::Item>>>,
    /// The stamps of the last load attempt. A failed attempt is remembered too, so a broken
    /// file is retried (and warned about) once per change, not once per poll.
    seen: Mutex<Vec<Option<FileStamp>>>,
    counters: ReloadCounters,
}

impl<L: Load> fmt::Debug for Watched<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched").field("kind", &L::KIND).field("paths", &self.loader.paths()).finish_non_exhaustive()
    }
}

impl<L: Load> Watched<L> {
    /// Loads the files now. `strict`: a failure is returned; otherwise it is logged and the
    /// value stays absent until a later poll loads it.
    pub(crate) fn open(loader: L, counters: ReloadCounters, strict: bool) -> Result<Self> {
        // Stamps before content: a change between the two is then seen by the next poll.
        let seen = stamps(&loader.paths());
        let current = match loader.load() {
            Ok(item) => Some(Arc::new(item)),
            Err(e) if strict => return Err(e),
            Err(e) => {
                tracing::error!(file = L::KIND, error = %e, "cannot load; refusing clients until the file is fixed");
                None
            }
        };
        Ok(Watched { loader, current: RwLock::new(current), seen: Mutex::new(seen), counters })
    }

    /// The value as last loaded successfully.
    pub(crate) fn current(&self) -> Option<Arc<L::Item>> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Type-erased [`Watched::poll`], so one task can poll every file set.
pub(crate) trait PollFiles: Send + Sync {
    /// Re-reads the files if any stamp changed since the last attempt. Blocking I/O.
    fn poll(&self);
}

impl<L: Load> PollFiles for Watched<L> {
    fn poll(&self) {
        let paths = self.loader.paths();
        let now = stamps(&paths);
        // Held across the load so that two pollers (two listeners) never load the same change
        // twice.
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if *seen == now {
            return;
        }
        *seen = now;
        match self.loader.load() {
            Ok(item) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(item));
                self.counters.ok.inc();
                tracing::info!(file = L::KIND, paths = ?paths, "reloaded");
            }
            Err(e) => {
                self.counters.error.inc();
                tracing::warn!(file = L::KIND, error = %e, "reload failed; keeping the previous version");
            }
        }
    }
}

/// Polls every `interval` until `shutdown`. The file I/O runs off the async workers: a stalled
/// network mount must not stall request handling.
pub(crate) async fn watch(targets: Vec<Arc<dyn PollFiles>>, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let targets = targets.clone();
        let polled = tokio::task::spawn_blocking(move || {
            for t in &targets {
                t.poll();
            }
        });
        if let Err(e) = polled.await {
            tracing::warn!(error = %e, "file poll failed");
        }
    }
}

/// What identifies a version of a file without reading it. ctime is in it because a copy that
/// preserves mtime (`cp -p`, some secret syncers) still changes ctime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    dev: u64,
    ino: u64,
}

fn stamps(paths: &[&Path]) -> Vec<Option<FileStamp>> {
    paths.iter().map(|p| file_stamp(p)).collect()
}

/// What identifies one version of the file at `path` (`None`: it cannot be read now): the one
/// file poller of the workspace (these TLS and htpasswd files, and the binary's config reload).
#[cfg(unix)]
pub fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: after a `..data` swap it describes the new file.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        len: m.len(),
        modified: m.modified().ok(),
        changed: (m.ctime(), m.ctime_nsec()),
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// What identifies one version of the file at `path` (`None`: it cannot be read now).
#[cfg(not(unix))]
pub fn file_stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp { len: m.len(), modified: m.modified().ok(), changed: (0, 0), dev: 0, ino: 0 })
}

/// Reads a whole (small) file, naming it in the error.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| crate::error::Error::ReadFile { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::error::Error;

    struct Text(PathBuf);

    impl Load for Text {
        type Item = String;
        const KIND: &'static str = "test";
        fn paths(&self) -> Vec<&Path> {
            vec![&self.0]
        }
        fn load(&self) -> Result<String> {
            let text = String::from_utf8(read(&self.0)?).unwrap();
            if text.starts_with("bad") {
                return Err(Error::ReadFile { path: self.0.clone(), source: std::io::Error::other("bad") });
            }
            Ok(text)
        }
    }

    fn counters() -> ReloadCounters {
        ReloadCounters { ok: IntCounter::new("ok", "ok").unwrap(), error: IntCounter::new("error", "error").unwrap() }
    }

    #[test]
    fn keeps_the_last_good_version_and_retries_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let c = counters();
        let w = Watched::open(Text(path.clone()), c.clone(), true).unwrap();
        assert_eq!(w.current().as_deref().map(String::as_str), Some("one"));
        w.poll();
        assert_eq!(c.ok.get() + c.error.get(), 0, "unchanged files are not re-read");

        std::fs::write(&path, "bad and longer").unwrap();
        w.poll();
        w.poll();
        assert_eq!(c.error.get(), 1);
        assert_eq!(w.current().as_deref().map(String::as_str), Some("one"));

        std::fs::write(&path, "two").unwrap();
        w.poll();
        assert_eq!(c.ok.get(), 1);
        assert_eq!(w.current().as_deref().map(String::as_str), Some("two"));
    }

    #[test]
    fn strict_open_fails_and_lenient_open_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing");
        assert!(matches!(Watched::open(Text(path.clone()), counters(), true), Err(Error::ReadFile { .. })));
        let w = Watched::open(Text(path.clone()), counters(), false).unwrap();
        assert!(w.current().is_none());
        std::fs::write(&path, "late").unwrap();
        w.poll();
        assert_eq!(w.current().as_deref().map(String::as_str), Some("late"));
    }
}
