//! A real HTTP forward proxy (Debian's `tinyproxy`) on 127.0.0.1, for tests of
//! `HTTPS_PROXY`/`HTTP_PROXY`: it tunnels `CONNECT` to any port and forwards absolute-form
//! requests, and its log tells which requests passed through it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::proc::{KillOnDrop, free_port, wait_for_tcp};

/// The binary the Debian package installs.
pub const TINYPROXY_BIN: &str = "/usr/bin/tinyproxy";

/// A running tinyproxy; stopped on drop.
pub struct Tinyproxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    // The process goes before its work dir.
    proc: KillOnDrop,
    /// Work dir (config, log).
    pub dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts a proxy that lets every loopback client through to any host and port.
    pub fn start() -> anyhow::Result<Tinyproxy> {
        if !Path::new(TINYPROXY_BIN).exists() {
            anyhow::bail!("{TINYPROXY_BIN} is missing: run scripts/install-deps.sh as root");
        }
        let dir = tempfile::Builder::new().prefix("tinyproxy-").tempdir()?;
        let mut last_err = None;
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            // No `ConnectPort` line: CONNECT is allowed to every port (registries on test ports).
            let cfg = format!(
                "Port {}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nLogFile \"{}\"\nLogLevel Connect\nDisableViaHeader Yes\n",
                addr.port(),
                dir.path().join("tinyproxy.log").display()
            );
            let cfg_path = dir.path().join("tinyproxy.conf");
            std::fs::write(&cfg_path, cfg)?;
            let mut cmd = Command::new(TINYPROXY_BIN);
            cmd.arg("-d").arg("-c").arg(&cfg_path);
            let mut proc = KillOnDrop::spawn("tinyproxy", cmd, &dir.path().join("stderr.log"))?;
            match wait_for_tcp(addr, Duration::from_secs(10)) {
                Ok(()) if proc.check_running().is_ok() => return Ok(Tinyproxy { addr, proc, dir }),
                Ok(()) => last_err = Some(anyhow::anyhow!("tinyproxy exited: {}", stderr_of(dir.path()))),
                Err(e) => last_err = Some(anyhow::anyhow!("{e}: {}", stderr_of(dir.path()))),
            }
            proc.kill();
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("tinyproxy did not start")))
    }

    /// `http://127.0.0.1:PORT`, the value for `HTTPS_PROXY`/`HTTP_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request lines the proxy received (`CONNECT host:port HTTP/1.1`,
    /// `GET http://host/path HTTP/1.1`), in order.
    pub fn requests(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.split_once("): ").filter(|_| l.contains(" Request (file descriptor")).map(|(_, r)| r))
            .map(str::to_string)
            .collect()
    }

    /// The targets (`host:port`) of the CONNECT requests received so far.
    pub fn connects(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter_map(|r| r.strip_prefix("CONNECT ").and_then(|t| t.split_whitespace().next()).map(str::to_string))
            .collect()
    }

    /// Stops the proxy now.
    pub fn stop(&mut self) {
        self.proc.kill();
    }
}

fn stderr_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}
