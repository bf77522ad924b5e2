//! The systems under test, each started fresh when a measurement needs a cold cache: the facade
//! (the release binary, a separate process so its memory can be read from `/proc`) and the CNCF
//! distribution registry in pull-through mode. Both reach the upstream through their own counting
//! proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::json;
use test_support::proc::{KillOnDrop, free_port, wait_for_tcp};
use test_support::registry::{Auth, Registry};

/// The workspace id whose image is the upstream image as is.
pub const WORKSPACE: &str = "ws";

/// A facade process with an empty store of its own; killed and its files removed on drop.
pub struct FacadeProc {
    /// Registry listener.
    pub addr: SocketAddr,
    /// Admin listener (metrics, probes, the warm-up API), when asked for.
    pub admin: Option<SocketAddr>,
    proc: KillOnDrop,
    dir: tempfile::TempDir,
}

/// An environment variable with a JSON object of `facade.*` keys every facade the bench starts
/// gets, for trying a setting (`BENCH_FACADE_CONFIG='{"prefetchParallelism": 8}'`); the results
/// name it in their command line.
pub const FACADE_CONFIG_ENV: &str = "BENCH_FACADE_CONFIG";

fn facade_config_override() -> anyhow::Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let Ok(text) = std::env::var(FACADE_CONFIG_ENV) else { return Ok(None) };
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(m)) => Ok(Some(m)),
        _ => anyhow::bail!("{FACADE_CONFIG_ENV} must be a JSON object of facade.* keys, not {text:?}"),
    }
}

impl FacadeProc {
    /// Starts `bin` serving workspace [`WORKSPACE`] = `base_ref`, with a fresh store.
    pub fn start(bin: &Path, base_ref: &str) -> anyhow::Result<FacadeProc> {
        Self::start_with(bin, base_ref, serde_json::Map::new())
    }

    /// As [`FacadeProc::start`], with `registry_extra` added to the config's `registry` object
    /// (the cluster cache: `redis`, `ipfs`).
    pub fn start_with(
        bin: &Path,
        base_ref: &str,
        registry_extra: serde_json::Map<String, serde_json::Value>,
    ) -> anyhow::Result<FacadeProc> {
        Self::start_spec(bin, &json!({"baseRef": base_ref}), registry_extra, false)
    }

    /// Starts `bin` serving workspace [`WORKSPACE`] with this spec (`baseRef`, `ideRef`, …), a
    /// fresh store, `registry_extra` added to the `registry` object and, with `admin`, an admin
    /// listener on a free port (`prometheusAddr`, where the warm-up API lives).
    pub fn start_spec(
        bin: &Path,
        spec: &serde_json::Value,
        registry_extra: serde_json::Map<String, serde_json::Value>,
        admin: bool,
    ) -> anyhow::Result<FacadeProc> {
        let dir = tempfile::Builder::new().prefix("bench-facade-").tempdir()?;
        std::fs::write(dir.path().join("specs.json"), json!({ WORKSPACE: spec }).to_string())?;
        let mut last_err = None;
        // The port is picked before the facade binds it; another process can win the race.
        for _ in 0..5 {
            let port = free_port();
            let admin_addr: Option<SocketAddr> = admin.then(|| ([127, 0, 0, 1], free_port()).into());
            let mut registry = json!({"port": port, "store": "store", "fixedSpecFN": "specs.json"});
            if let Some(r) = registry.as_object_mut() {
                r.extend(registry_extra.clone());
            }
            let mut cfg = json!({"registry": registry, "facade": {"listenHost": "127.0.0.1"}});
            if let (Some(extra), Some(facade)) = (facade_config_override()?, cfg["facade"].as_object_mut()) {
                facade.extend(extra);
            }
            if let Some(a) = admin_addr {
                cfg["prometheusAddr"] = json!(a.to_string());
            }
            let cfg_path = dir.path().join("config.json");
            std::fs::write(&cfg_path, cfg.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.arg("run").arg(&cfg_path);
            let mut proc = KillOnDrop::spawn("registry-facade", cmd, &dir.path().join("facade.log"))?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            match wait_for_tcp(addr, Duration::from_secs(20)) {
                Ok(()) if proc.check_running().is_ok() => {
                    if let Some(a) = admin_addr
                        && let Err(e) = wait_for_tcp(a, Duration::from_secs(10))
                    {
                        last_err = Some(anyhow::anyhow!("admin listener {a}: {e}"));
                        proc.kill();
                        continue;
                    }
                    return Ok(FacadeProc { addr, admin: admin_addr, proc, dir });
                }
                Ok(()) => {
                    last_err = Some(anyhow::anyhow!("facade exited: {}", log_tail(&dir.path().join("facade.log"))))
                }
                Err(e) => last_err = Some(anyhow::anyhow!("{e}: {}", log_tail(&dir.path().join("facade.log")))),
            }
            proc.kill();
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("facade did not start")))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.path().join("facade.log"))
    }
}

/// A distribution registry in pull-through mode against `upstream` (`host:port`), with empty
/// storage.
pub fn start_distribution_proxy(upstream: &str) -> anyhow::Result<(Registry, u32)> {
    let remote = format!("  remoteurl: http://{upstream}");
    let reg = Registry::start_with(Auth::None, &["proxy:", &remote]).context("starting the distribution proxy")?;
    let pid = registry_pid(&reg)?;
    Ok((reg, pid))
}

/// The pid of a `Registry`'s process: test-support keeps the child private, so find the process
/// whose command line names this registry's config file.
pub fn registry_pid(reg: &Registry) -> anyhow::Result<u32> {
    let needle = reg.dir.path().join("config.yml");
    let needle = needle.to_string_lossy();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.iter().any(|a| a == needle.as_ref()) {
            return Ok(pid);
        }
    }
    bail!("no process runs the registry configured in {needle}")
}

/// Time the threads of `pid` alive now have spent on a CPU, in nanoseconds (the scheduler's own
/// account in `schedstat`, exact, unlike the tick-sampled `utime`/`stime`).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .map(|t| schedstat_ns(&std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default()))
        .sum()
}

/// The first field of a `schedstat` line: nanoseconds on a CPU.
pub fn schedstat_ns(text: &str) -> u64 {
    text.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// `VmHWM` (peak resident set) of `pid`, in bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM:").map(|k| k * 1024)
}

/// `VmRSS` of `pid`, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:").map(|k| k * 1024)
}

fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// Samples `VmRSS` of a process every few milliseconds until stopped; returns the largest seen.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !flag.load(Ordering::SeqCst) {
                max = max.max(rss(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        });
        RssSampler { stop, thread: Some(thread) }
    }

    /// Stops and returns the largest `VmRSS` sampled, in bytes.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    text.get(start..).unwrap_or("").to_string()
}

/// The default facade binary: the release build next to this workspace.
pub fn default_facade_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/registry-facade")
}
