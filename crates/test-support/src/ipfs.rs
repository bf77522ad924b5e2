//! A real IPFS node for tests: js-ipfs 0.66 (`npm install ipfs@0.66.1` at the repository root,
//! done by `scripts/install-deps.sh`), which speaks the Kubo RPC API.
//!
//! The repo is initialised with the `test` profile (no bootstrap peers, MDNS off) in a temp
//! dir, its Swarm addresses are emptied (the node talks to no one) and its API, Gateway and
//! gRPC listeners are put on free loopback ports. On Node 20 js-ipfs needs
//! `Promise.withResolvers`, so a small polyfill is written next to the repo and preloaded with
//! `node -r`. `kill` and `restart` keep the repo and ports: content added before a restart is
//! still there after it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::proc::{KillOnDrop, free_port, run, wait_for_tcp};

const POLYFILL: &str = r#"// Node 20 lacks Promise.withResolvers, which js-ipfs' dependencies call.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers() {
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
    return { promise, resolve, reject };
  };
}
"#;

/// A running js-ipfs daemon.
pub struct Ipfs {
    /// The RPC API's address.
    pub api: SocketAddr,
    /// Work dir: the repo, the polyfill and the log.
    pub dir: tempfile::TempDir,
    cli: PathBuf,
    proc: Option<KillOnDrop>,
}

/// The `jsipfs` entry point under the repository's `node_modules`, if installed.
pub fn jsipfs_cli() -> Option<PathBuf> {
    let mut dir = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
    while let Some(d) = dir {
        let cli = d.join("node_modules/ipfs/src/cli.js");
        if cli.is_file() {
            return Some(cli);
        }
        dir = d.parent();
    }
    None
}

impl Ipfs {
    /// Whether node and js-ipfs are installed.
    pub fn available() -> bool {
        crate::proc::have("node") && jsipfs_cli().is_some()
    }

    /// Initialises a repo and starts the daemon; returns when its API answers.
    pub fn start() -> anyhow::Result<Ipfs> {
        let cli = jsipfs_cli().ok_or_else(|| {
            anyhow::anyhow!("js-ipfs is not installed: run scripts/install-deps.sh (npm install ipfs@0.66.1)")
        })?;
        let dir = tempfile::Builder::new().prefix("ipfs-").tempdir()?;
        std::fs::write(dir.path().join("polyfill.cjs"), POLYFILL)?;
        let mut init = node(dir.path(), &cli);
        init.arg("init").arg("--profile").arg("test");
        run(init, Duration::from_secs(120))?;

        let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let config_path = dir.path().join("repo/config");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
        let addresses = &mut config["Addresses"];
        addresses["Swarm"] = serde_json::json!([]);
        addresses["API"] = format!("/ip4/127.0.0.1/tcp/{}", api.port()).into();
        addresses["Gateway"] = format!("/ip4/127.0.0.1/tcp/{}", free_port()).into();
        addresses["RPC"] = format!("/ip4/127.0.0.1/tcp/{}", free_port()).into();
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;

        let mut ipfs = Ipfs { api, dir, cli, proc: None };
        ipfs.launch()?;
        Ok(ipfs)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log = self.dir.path().join("daemon.log");
        let mut cmd = node(self.dir.path(), &self.cli);
        cmd.arg("daemon");
        let mut proc = KillOnDrop::spawn("jsipfs daemon", cmd, &log)?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            proc.check_running().map_err(|e| anyhow::anyhow!("{e}: {}", self.log()))?;
            if self.log().contains("Daemon is ready") && wait_for_tcp(self.api, Duration::from_millis(200)).is_ok() {
                self.proc = Some(proc);
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!("jsipfs daemon not ready after 90s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The API as the facade's `ipfsAddr` multiaddr.
    pub fn multiaddr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}", self.api.port())
    }

    /// Kills the daemon now (an outage).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the daemon again on the same repo and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        // A killed daemon leaves its repo lock behind; it is ours and nobody holds it now.
        let _ = std::fs::remove_file(self.dir.path().join("repo/repo.lock"));
        let _ = std::fs::remove_dir_all(self.dir.path().join("repo/repo.lock"));
        let _ = std::fs::remove_file(self.dir.path().join("daemon.log"));
        self.launch()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Calls the RPC API (`POST /api/v0/<path>`) and returns the status and body (assertions).
    pub fn rpc(&self, path_and_query: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&self.api, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "POST /api/v0/{path_and_query} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            self.api
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let split =
            raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no HTTP header end"))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut body = raw[split + 4..].to_vec();
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
        Ok((status, body))
    }

    /// The CIDs pinned recursively.
    pub fn pins(&self) -> anyhow::Result<Vec<String>> {
        let (status, body) = self.rpc("pin/ls?type=recursive")?;
        anyhow::ensure!(status == 200, "pin/ls answered {status}: {}", String::from_utf8_lossy(&body));
        let mut out = Vec::new();
        for line in String::from_utf8_lossy(&body).lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            if let Some(keys) = v["Keys"].as_object() {
                out.extend(keys.keys().cloned());
            } else if let Some(cid) = v["Cid"].as_str() {
                out.push(cid.to_string());
            }
        }
        Ok(out)
    }
}

fn node(dir: &Path, cli: &Path) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg("-r").arg(dir.join("polyfill.cjs")).arg(cli).env("IPFS_PATH", dir.join("repo"));
    cmd
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
    out
}
