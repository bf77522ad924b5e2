//! A real CNCF distribution registry (`docker-registry`, Debian package) on 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::proc::{KillOnDrop, free_port, wait_for_tcp};

/// The binary the Debian package installs.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How the registry authenticates clients.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// Anonymous pulls and pushes.
    #[default]
    None,
}

/// A running registry with filesystem storage in a temp dir; stopped on drop.
pub struct Registry {
    /// Its address.
    pub addr: SocketAddr,
    /// Work dir (storage, config, log).
    pub dir: tempfile::TempDir,
    proc: KillOnDrop,
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> anyhow::Result<Registry> {
        Self::start_with(Auth::None, &[])
    }

    /// Starts a registry with `auth` and extra YAML lines appended to its config (for example a
    /// `proxy:` section for pull-through mode).
    pub fn start_with(auth: Auth, extra_yaml: &[&str]) -> anyhow::Result<Registry> {
        let dir = tempfile::Builder::new().prefix("registry-").tempdir()?;
        let mut last_err = None;
        // The port is picked before the registry binds it; another process can win the race, so
        // try a few ports.
        for _ in 0..5 {
            let port = free_port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let cfg = config_yaml(dir.path(), addr, &auth, extra_yaml);
            let cfg_path = dir.path().join("config.yml");
            std::fs::write(&cfg_path, cfg)?;
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve").arg(&cfg_path);
            let mut proc = KillOnDrop::spawn("docker-registry", cmd, &dir.path().join("registry.log"))?;
            match wait_for_tcp(addr, Duration::from_secs(10)) {
                Ok(()) if proc.check_running().is_ok() => return Ok(Registry { addr, dir, proc }),
                Ok(()) => last_err = Some(anyhow::anyhow!("registry exited: {}", log_of(dir.path()))),
                Err(e) => last_err = Some(anyhow::anyhow!("{e}: {}", log_of(dir.path()))),
            }
            proc.kill();
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        log_of(self.dir.path())
    }

    /// Stops the registry now.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// The storage root, for tests that corrupt or inspect stored blobs.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
}

fn config_yaml(dir: &Path, addr: SocketAddr, auth: &Auth, extra: &[&str]) -> String {
    let mut y = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
        dir.join("storage").display()
    );
    match auth {
        Auth::None => {}
    }
    for line in extra {
        y.push_str(line);
        y.push('\n');
    }
    y
}
