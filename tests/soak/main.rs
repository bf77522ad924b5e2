//! `make soak`: the release facade under sustained pulls and injected faults, for a bounded
//! time (`SOAK_SECONDS`, default 180).
//!
//! Everything runs on 127.0.0.1: an upstream CNCF distribution registry behind a fault proxy, a
//! real Redis, the IPFS node when it starts, an in-process gRPC spec server (restartable), and
//! the facade as its own process (the release binary) with the `remote` and `fixed` providers
//! and a bounded store. Parallel pullers loop over a mix of workspaces (small images and
//! 32–64 MiB layers, most sharing one IDE image): manifest by tag, then the config and every
//! layer by digest, each streamed through sha256. A fault thread cuts, refuses or stalls
//! upstream connections for a while, restarts Redis, restarts the spec server (and IPFS).
//!
//! A blob GET may be retried up to 3 times with a short backoff, as containerd does; retries
//! are counted apart from failures. It passes when no pull failed, no complete body had wrong
//! bytes, the facade never exited, and its open fds and RSS did not grow past the stated
//! bounds. The report goes to stdout and to `--out` (bench/SOAK.md).
//!
//! Alongside the pulls runs a hostile phase (`hostile.rs`, `--hostile N`, 0 = off): N clients
//! that open blob GETs and never read, N connections that never send, and a client that reads
//! 4 MiB of an endless layer and drops it, again and again. It adds no pass condition of its
//! own: the same bounds must hold with it running, and the report shows RSS, fds and the disk
//! the facade's store and spools take over time.

mod hostile;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use e2e::noise;
use facade_spec::FixedSpecProvider;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use test_support::fault_proxy::{FaultProxy, Faults};
use test_support::image::{
    BuiltImage, BuiltLayer, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image,
};
use test_support::ipfs::Ipfs;
use test_support::proc::{KillOnDrop, free_port, wait_for_tcp};
use test_support::redis::Redis;
use test_support::registry::Registry;

/// Retries of one failed GET (so at most 4 attempts), as containerd does for layer fetches.
const MAX_RETRIES: u32 = 3;
/// First retry delay; doubled per retry.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// Open fds may differ from the post-warm-up sample by this much at the end (pooled upstream,
/// Redis and IPFS connections come and go).
const FD_GROWTH_BOUND: u64 = 20;
/// RSS may grow by this much from the post-warm-up sample (allocator arenas per thread,
/// caches filled during the run); a leak of buffers or blobs is far larger over minutes.
const RSS_GROWTH_BOUND_KIB: u64 = 96 << 10;
/// The facade's local store bound: below the sum of all blobs, so the run also evicts.
const STORE_MAX: &str = "160MiB";

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

struct Args {
    facade: PathBuf,
    seconds: u64,
    pullers: usize,
    seed: u64,
    out: PathBuf,
    ipfs: bool,
    hostile: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = Args {
        facade: root.join("target/release/registry-facade"),
        seconds: std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(180),
        pullers: 8,
        seed: 0x5eed_f00d,
        out: root.join("bench/SOAK.md"),
        ipfs: true,
        hostile: 120,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--facade" => args.facade = PathBuf::from(value()?),
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--pullers" => args.pullers = value()?.parse().context("--pullers")?,
            "--seed" => args.seed = value()?.parse().context("--seed")?,
            "--out" => args.out = PathBuf::from(value()?),
            "--no-ipfs" => args.ipfs = false,
            "--hostile" => args.hostile = value()?.parse().context("--hostile")?,
            "-h" | "--help" => {
                println!(
                    "soak [--facade BIN] [--seconds N (SOAK_SECONDS, 180)] [--pullers N (8)] [--seed N] [--out FILE] [--no-ipfs] [--hostile N (120; 0 = no hostile phase)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.pullers == 0 || args.seconds == 0 {
        bail!("--pullers and --seconds must be more than 0");
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// xorshift64*: seeded, reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A workspace the pullers ask for, and what its composed image must contain.
struct Workspace {
    id: &'static str,
    /// Layer digests of the composed manifest, in order (base, then IDE); the churn workspace
    /// has one list per version pushed so far, any of which is a correct answer.
    layers: Mutex<Vec<Vec<String>>>,
}

impl Workspace {
    fn accepts(&self, got: &[&str]) -> bool {
        self.layers
            .lock()
            .is_ok_and(|versions| versions.iter().any(|v| v.iter().map(String::as_str).eq(got.iter().copied())))
    }
}

/// The churn workspace's base: re-pushed under the same tag during the run with a fresh layer,
/// so the facade keeps downloading new content from upstream while faults are injected (the
/// other images are in its store or IPFS after the warm-up).
const CHURN_ID: &str = "ws-churn";
const CHURN_REPO: &str = "soak/churn:latest";
const CHURN_LAYER_MIB: usize = 12;

fn churn_image(version: u64) -> BuiltImage {
    image(
        vec![small_layer("churn", 4, 77), big_layer(&format!("churn-{version}"), CHURN_LAYER_MIB, 1000 + version)],
        &["PATH=/usr/bin"],
    )
}

/// Pushes version `version` of the churn base, recording its layers as acceptable first (a
/// puller may see the new tag before the push returns).
fn push_churn(reg: &Registry, ws: &Workspace, version: u64) -> anyhow::Result<u64> {
    let img = churn_image(version);
    let bytes = img.layers.iter().map(|l| l.size).sum();
    if let Ok(mut versions) = ws.layers.lock() {
        versions.push(img.layers.iter().map(|l| l.digest.clone()).collect());
    }
    push_image(reg, CHURN_REPO, &img, PushFormat::Oci).map(|_| bytes)
}

fn small_layer(name: &str, kib: usize, seed: u64) -> BuiltLayer {
    let text: String = (0..kib * 16).map(|i| format!("{name} line {i:060}\n")).collect();
    let mut files = vec![FileEntry::file(format!("{name}/notes.txt"), text)];
    files.push(FileEntry::exec(format!("{name}/bin/run"), format!("#!/bin/sh\necho {name} {seed}\n")));
    build_layer(&files, LayerCompression::Gzip)
}

fn big_layer(name: &str, mib: usize, seed: u64) -> BuiltLayer {
    // Incompressible bytes in a plain tar: building stays fast and every byte is verified.
    build_layer(&[FileEntry::file(format!("{name}/blob.bin"), noise(mib << 20, seed))], LayerCompression::None)
}

fn image(layers: Vec<BuiltLayer>, env: &[&str]) -> BuiltImage {
    let mut b = ImageBuilder::new().env(env.iter().copied());
    for l in layers {
        b = b.layer(l);
    }
    b.build()
}

/// Builds and pushes the images, returning the workspaces and the spec file (base and IDE refs
/// name the upstream through the fault proxy).
fn build_world(reg: &Registry, upstream: &str) -> anyhow::Result<(Vec<Workspace>, u64, Value)> {
    let ide = image(
        vec![big_layer("ide", 40, 11), small_layer("ide-bin", 64, 12)],
        &["PATH=/ide/bin:/usr/bin:/bin", "GITPOD_ENV_SET_EDITOR=/ide/bin/run"],
    );
    let bases: Vec<(&str, BuiltImage, PushFormat)> = vec![
        (
            "small",
            image(vec![small_layer("a", 8, 1), small_layer("b", 200, 2), small_layer("c", 32, 3)], &["PATH=/usr/bin"]),
            PushFormat::Oci,
        ),
        (
            "docker",
            image(vec![small_layer("d", 16, 4), small_layer("e", 96, 5)], &["PATH=/usr/bin"]),
            PushFormat::DockerV2S2,
        ),
        ("b32", image(vec![small_layer("f", 16, 6), big_layer("g", 32, 7)], &["PATH=/usr/bin"]), PushFormat::Oci),
        ("b48", image(vec![big_layer("h", 48, 8), small_layer("i", 16, 9)], &["PATH=/usr/bin"]), PushFormat::Oci),
        ("b64", image(vec![big_layer("j", 64, 10)], &["PATH=/usr/bin"]), PushFormat::Oci),
    ];
    push_image(reg, "soak/ide:1", &ide, PushFormat::Oci).context("pushing the IDE image")?;
    let ide_layers: Vec<String> = ide.layers.iter().map(|l| l.digest.clone()).collect();
    let ide_bytes: u64 = ide.layers.iter().map(|l| l.size).sum();
    let mut base_of = BTreeMap::new();
    for (name, img, format) in &bases {
        push_image(reg, &format!("soak/{name}:1"), img, *format).with_context(|| format!("pushing base {name}"))?;
        // skopeo keeps gzip layers' digests when converting to Docker schema 2.
        let layers: Vec<String> = img.layers.iter().map(|l| l.digest.clone()).collect();
        base_of.insert(*name, (layers, img.layers.iter().map(|l| l.size).sum::<u64>()));
    }
    let plan: [(&'static str, &str, bool); 6] = [
        ("ws-small", "small", true),
        ("ws-docker", "docker", true),
        ("ws-32", "b32", true),
        ("ws-48", "b48", true),
        ("ws-64", "b64", false),
        ("ws-bare", "small", false),
    ];
    let mut specs = serde_json::Map::new();
    let mut workspaces = Vec::new();
    for (id, base, with_ide) in plan {
        let (base_layers, _) = &base_of[base];
        let mut spec = json!({"baseRef": format!("{upstream}/soak/{base}:1")});
        let mut layers = base_layers.clone();
        if with_ide {
            spec["ideRef"] = json!(format!("{upstream}/soak/ide:1"));
            layers.extend(ide_layers.iter().cloned());
        }
        specs.insert(id.to_string(), spec);
        workspaces.push(Workspace { id, layers: Mutex::new(vec![layers]) });
    }
    let churn = Workspace { id: CHURN_ID, layers: Mutex::new(Vec::new()) };
    let churn_bytes = push_churn(reg, &churn, 0).context("pushing the churn image")?;
    specs.insert(CHURN_ID.to_string(), json!({"baseRef": format!("{upstream}/{CHURN_REPO}")}));
    workspaces.push(churn);
    let unique_bytes = churn_bytes + ide_bytes + base_of.values().map(|(_, b)| b).sum::<u64>();
    Ok((workspaces, unique_bytes, Value::Object(specs)))
}

/// facade-spec's gRPC server over the specs, on its own runtime and thread; `stop` drops the
/// runtime (open connections die, as with a killed process), `launch` starts it again on the
/// same port.
struct SpecServer {
    port: u16,
    specs: FixedSpecProvider,
    running: Option<(tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl SpecServer {
    fn start(specs: &Value) -> anyhow::Result<SpecServer> {
        let specs = FixedSpecProvider::parse(&specs.to_string()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut s = SpecServer { port: 0, specs, running: None };
        s.launch()?;
        Ok(s)
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_launch() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn try_launch(&mut self) -> anyhow::Result<()> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (specs, port) = (self.specs.clone(), self.port);
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                // tokio sets SO_REUSEADDR: the old port is free again at once after a stop.
                let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = addr_tx.send(listener.local_addr().map_err(|e| e.to_string()));
                let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
                let shutdown = async move {
                    let _ = stop_rx.await;
                    let _ = stopping_tx.send(());
                };
                let server = tokio::spawn(facade_spec::server::serve(listener, specs, None, shutdown));
                let _ = stopping.await;
                // Calls in flight get a moment; then the runtime goes and takes every open
                // connection with it.
                let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
            });
        });
        match addr_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(addr)) => {
                self.port = addr.port();
                self.running = Some((stop, thread));
                Ok(())
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                bail!("spec server cannot listen on port {port}: {e}")
            }
            Err(_) => bail!("spec server did not start"),
        }
    }

    fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

impl Drop for SpecServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP relay in front of the fault proxy that can drop every connection through it at once.
/// The proxy's knobs only reach connections opened after they are set, and the facade keeps
/// its upstream connections pooled: without this, an "outage" would never touch a transfer
/// already under way.
struct Relay {
    addr: SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    live: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let live = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = live.clone();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                loop {
                    let accepted = tokio::select! {
                        _ = &mut stop_rx => break,
                        a = listener.accept() => a,
                    };
                    let Ok((mut client, _)) = accepted else { continue };
                    let (mut cut_rx, counter) = (cut_rx.clone(), counter.clone());
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                        counter.fetch_add(1, Ordering::SeqCst);
                        cut_rx.mark_unchanged();
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut_rx.changed() => {}
                        }
                        counter.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        });
        Ok(Relay { addr, cut, live, stop: Some(stop), thread: Some(thread) })
    }

    /// Drops every open connection now; returns how many there were.
    fn cut_all(&self) -> u64 {
        let n = self.live.load(Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
        n
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The facade process.
struct Facade {
    addr: SocketAddr,
    metrics: SocketAddr,
    proc: KillOnDrop,
    log: PathBuf,
}

impl Facade {
    fn start(bin: &Path, dir: &Path, registry_section: &Value) -> anyhow::Result<Facade> {
        if !bin.is_file() {
            bail!("{} is not built (make build)", bin.display());
        }
        let log = dir.join("facade.log");
        let mut last_err = None;
        // The ports are picked before the facade binds them; another process can win the race.
        for _ in 0..5 {
            let (port, metrics_port) = (free_port(), free_port());
            let mut registry = registry_section.clone();
            registry["port"] = json!(port);
            let cfg = json!({
                "registry": registry,
                "prometheusAddr": format!("127.0.0.1:{metrics_port}"),
                "facade": {
                    "listenHost": "127.0.0.1",
                    "storeMaxBytes": STORE_MAX,
                    // Short TTLs: tags, specs and compositions are looked at again many times
                    // during the run, faults included.
                    "composeTTL": "5s",
                    "tagTTL": "10s",
                    "clusterTagTTL": "10s",
                    "specCacheTTL": "2s",
                    "upstreamReadTimeout": "5s",
                },
            });
            let cfg_path = dir.join("config.json");
            std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
            let mut cmd = Command::new(bin);
            cmd.arg("run").arg(&cfg_path).env("RUST_LOG", "info");
            let mut proc = KillOnDrop::spawn("registry-facade", cmd, &log)?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            match wait_for_tcp(addr, Duration::from_secs(30)) {
                Ok(()) if proc.check_running().is_ok() => {
                    return Ok(Facade { addr, metrics: ([127, 0, 0, 1], metrics_port).into(), proc, log });
                }
                Ok(()) => last_err = Some(anyhow::anyhow!("facade exited: {}", tail(&log, 20))),
                Err(e) => last_err = Some(anyhow::anyhow!("{e}: {}", tail(&log, 20))),
            }
            proc.kill();
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("facade did not start")))
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// RSS (KiB) and open fds of a process.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rss_kib: u64,
    fds: u64,
}

fn sample(pid: u32) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Sample { rss_kib, fds })
}

/// Status, headers (lowercase names) and body of a response read whole.
type FullResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// One GET with the whole body in memory (manifests, metrics). Connection: close.
fn get_full(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<FullResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut hdrs = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hdrs.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = hdrs.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    match len {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok((status, hdrs, body))
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Counters shared by the pullers.
#[derive(Default)]
struct Stats {
    pulls: u64,
    failures: u64,
    manifest_retries: u64,
    blob_retries: u64,
    /// Complete bodies whose bytes did not match their digest: never acceptable, retried or not.
    corrupt: u64,
    bytes: u64,
    durations: Vec<Duration>,
    by_workspace: BTreeMap<&'static str, u64>,
    failure_samples: Vec<String>,
    retry_reasons: BTreeMap<String, u64>,
}

/// Why one GET attempt failed.
enum Attempt {
    Retry(String),
    Corrupt(String),
}

fn retry_reason(e: &str) -> String {
    // Bounded labels for the report: the kind of failure, not its details.
    e.split(':').next().unwrap_or(e).to_string()
}

/// Pulls one workspace like containerd: manifest by tag, then config and layers by digest.
fn pull(addr: SocketAddr, provider: &str, ws: &Workspace, stats: &Mutex<Stats>) -> Result<u64, String> {
    let name = format!("{provider}/{}", ws.id);
    let manifest = with_retries(stats, true, || {
        let (status, headers, body) =
            get_full(addr, &format!("/v2/{name}/manifests/latest"), &[("Accept", MANIFEST_ACCEPT)])
                .map_err(|e| Attempt::Retry(format!("manifest io: {e}")))?;
        if status != 200 {
            return Err(Attempt::Retry(format!("manifest status {status}: {}", String::from_utf8_lossy(&body))));
        }
        let digest = headers.iter().find(|(k, _)| k == "docker-content-digest").map(|(_, v)| v.clone());
        if digest.as_deref() != Some(sha256_hex(&body).as_str()) {
            return Err(Attempt::Corrupt(format!(
                "manifest of {name}: Docker-Content-Digest {digest:?} is not the body's"
            )));
        }
        Ok(body)
    })?;
    let m: Value = serde_json::from_slice(&manifest).map_err(|e| format!("manifest of {name} is not JSON: {e}"))?;
    let descriptor = |d: &Value| -> Result<(String, u64), String> {
        match (d["digest"].as_str(), d["size"].as_u64()) {
            (Some(digest), Some(size)) => Ok((digest.to_string(), size)),
            _ => Err(format!("manifest of {name} has a bad descriptor: {d}")),
        }
    };
    let mut blobs = vec![descriptor(&m["config"])?];
    let layers = m["layers"].as_array().ok_or_else(|| format!("manifest of {name} has no layers"))?;
    for l in layers {
        blobs.push(descriptor(l)?);
    }
    let got: Vec<&str> = blobs[1..].iter().map(|(d, _)| d.as_str()).collect();
    if !ws.accepts(&got) {
        return Err(format!("composed layers of {name} are {got:?}, expected one of {:?}", ws.layers.lock().ok()));
    }
    let mut bytes = manifest.len() as u64;
    for (digest, size) in blobs {
        let path = format!("/v2/{name}/blobs/{digest}");
        with_retries(stats, false, || {
            let got = e2e::stream::get(&addr.to_string(), &path, &[], None)
                .map_err(|e| Attempt::Retry(format!("blob io: {e}")))?;
            if got.status != 200 {
                return Err(Attempt::Retry(format!("blob status {}", got.status)));
            }
            if got.truncated || got.received != size || got.content_length != Some(size) {
                return Err(Attempt::Retry(format!(
                    "blob short: {} of {size} bytes (Content-Length {:?})",
                    got.received, got.content_length
                )));
            }
            if got.digest != digest {
                return Err(Attempt::Corrupt(format!(
                    "blob {digest} of {name}: complete body hashes to {}",
                    got.digest
                )));
            }
            Ok(())
        })?;
        bytes += size;
    }
    Ok(bytes)
}

fn with_retries<T>(
    stats: &Mutex<Stats>,
    manifest: bool,
    mut attempt: impl FnMut() -> Result<T, Attempt>,
) -> Result<T, String> {
    let mut tries = 0;
    loop {
        let reason = match attempt() {
            Ok(v) => return Ok(v),
            Err(Attempt::Corrupt(e)) => {
                if let Ok(mut s) = stats.lock() {
                    s.corrupt += 1;
                }
                e
            }
            Err(Attempt::Retry(e)) => e,
        };
        if tries == MAX_RETRIES {
            return Err(reason);
        }
        if let Ok(mut s) = stats.lock() {
            if manifest {
                s.manifest_retries += 1;
            } else {
                s.blob_retries += 1;
            }
            *s.retry_reasons.entry(retry_reason(&reason)).or_default() += 1;
        }
        std::thread::sleep(RETRY_BACKOFF * 2u32.pow(tries));
        tries += 1;
    }
}

fn puller(
    addr: SocketAddr,
    workspaces: &[Workspace],
    seed: u64,
    deadline: Instant,
    stats: &Mutex<Stats>,
    stop: &AtomicBool,
) {
    let mut rng = Rng::new(seed);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let ws = &workspaces[rng.range(0, workspaces.len() as u64 - 1) as usize];
        let provider = if rng.chance(50) { "remote" } else { "fixed" };
        let started = Instant::now();
        let outcome = pull(addr, provider, ws, stats);
        let took = started.elapsed();
        let Ok(mut s) = stats.lock() else { return };
        s.pulls += 1;
        *s.by_workspace.entry(ws.id).or_default() += 1;
        match outcome {
            Ok(bytes) => {
                s.bytes += bytes;
                s.durations.push(took);
            }
            Err(e) => {
                s.failures += 1;
                eprintln!("soak: pull {provider}/{} failed: {e}", ws.id);
                if s.failure_samples.len() < 10 {
                    s.failure_samples.push(format!("{provider}/{}: {e}", ws.id));
                }
            }
        }
    }
}

/// The parts faults are injected into.
struct Targets {
    relay: Relay,
    proxy: FaultProxy,
    redis: Redis,
    spec: SpecServer,
    ipfs: Option<Ipfs>,
}

/// Re-pushes the churn base with a fresh layer every 8–12 s; returns how many versions it
/// pushed and the push errors (the pusher talks to the registry directly, past the faults).
fn churn_loop(reg: &Registry, workspaces: &[Workspace], seed: u64, deadline: Instant) -> (u64, Vec<String>) {
    let Some(ws) = workspaces.iter().find(|w| w.id == CHURN_ID) else { return (0, vec!["no churn workspace".into()]) };
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    let (mut pushed, mut errors) = (0, Vec::new());
    loop {
        nap(Duration::from_millis(rng.range(8000, 12000)), deadline);
        if Instant::now() >= deadline {
            return (pushed, errors);
        }
        match push_churn(reg, ws, pushed + 1) {
            Ok(_) => pushed += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
}

/// Sleeps up to `d`, waking early when the run is over.
fn nap(d: Duration, deadline: Instant) {
    let until = (Instant::now() + d).min(deadline);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())));
    }
}

fn fault_loop(
    cut_total: &mut u64,
    t: &mut Targets,
    seed: u64,
    deadline: Instant,
    log: &Mutex<Vec<(Duration, String)>>,
    started: Instant,
) -> BTreeMap<&'static str, u64> {
    let mut rng = Rng::new(seed);
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let note = |what: String| {
        if let Ok(mut l) = log.lock() {
            l.push((started.elapsed(), what));
        }
    };
    loop {
        nap(Duration::from_millis(rng.range(3000, 8000)), deadline);
        if Instant::now() >= deadline {
            break;
        }
        let roll = rng.range(0, 99);
        let kind: &'static str = match roll {
            0..=24 => "upstream_cut",
            25..=39 => "upstream_refuse",
            40..=54 => "upstream_stall",
            55..=74 => "redis_restart",
            75..=89 => "spec_server_restart",
            _ if t.ipfs.is_some() => "ipfs_restart",
            _ => "upstream_cut",
        };
        *counts.entry(kind).or_default() += 1;
        if kind.starts_with("upstream_") {
            let cut = t.relay.cut_all();
            note(format!("{kind}: cut {cut} open upstream connections"));
            *cut_total += cut;
        }
        match kind {
            "upstream_cut" => {
                let faults = Faults {
                    cut_after: Some(rng.range(64 << 10, 16 << 20)),
                    reset: rng.chance(50),
                    connections: Some(rng.range(1, 4)),
                    ..Faults::default()
                };
                let hold = Duration::from_millis(rng.range(2000, 6000));
                note(format!(
                    "upstream_cut: the next {} connections cut after {} bytes ({}), for {hold:.1?}",
                    faults.connections.unwrap_or(0),
                    faults.cut_after.unwrap_or(0),
                    if faults.reset { "RST" } else { "FIN" }
                ));
                t.proxy.set_faults(faults);
                nap(hold, deadline);
                t.proxy.clear_faults();
            }
            "upstream_refuse" => {
                let hold = Duration::from_millis(rng.range(1000, 4000));
                note(format!("upstream_refuse: new connections closed at once, for {hold:.1?}"));
                t.proxy.set_faults(Faults { refuse: true, ..Faults::default() });
                nap(hold, deadline);
                t.proxy.clear_faults();
            }
            "upstream_stall" => {
                let faults = Faults {
                    stall_after: Some(rng.range(0, 8 << 20)),
                    connections: Some(rng.range(1, 2)),
                    ..Faults::default()
                };
                let hold = Duration::from_millis(rng.range(2000, 6000));
                note(format!(
                    "upstream_stall: the next {} connections go silent after {} bytes, for {hold:.1?}",
                    faults.connections.unwrap_or(0),
                    faults.stall_after.unwrap_or(0)
                ));
                t.proxy.set_faults(faults);
                nap(hold, deadline);
                t.proxy.clear_faults();
            }
            "redis_restart" => {
                note("redis_restart".into());
                if let Err(e) = t.redis.restart() {
                    note(format!("redis restart failed: {e:#}"));
                }
            }
            "spec_server_restart" => {
                let down = Duration::from_millis(rng.range(500, 3000));
                note(format!("spec_server_restart: down for {down:.1?}"));
                t.spec.stop();
                nap(down, deadline + Duration::from_secs(5));
                if let Err(e) = t.spec.launch() {
                    note(format!("spec server restart failed: {e:#}"));
                }
            }
            "ipfs_restart" => {
                note("ipfs_restart".into());
                if let Some(ipfs) = &mut t.ipfs
                    && let Err(e) = ipfs.restart()
                {
                    note(format!("ipfs restart failed: {e:#}"));
                }
            }
            _ => {}
        }
    }
    t.proxy.clear_faults();
    counts
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn metrics_of_interest(addr: SocketAddr) -> Vec<String> {
    let Ok((200, _, body)) = get_full(addr, "/metrics", &[]) else { return vec!["(metrics not available)".into()] };
    let text = String::from_utf8_lossy(&body).to_string();
    let wanted = [
        "registry_facade_upstream_retries_total",
        "registry_facade_digest_mismatches_total",
        "registry_facade_response_aborted_total",
        "registry_facade_singleflight_joins_total",
        "registry_facade_store_evictions_total",
        "registry_facade_cluster_dependency_failures_total",
        "registry_facade_spec_cache_lookups_total",
        "registry_facade_spec_retries_total",
        "registry_facade_backfill_total",
        "registry_facade_limited_requests_total",
        "registry_facade_http_requests_total",
    ];
    test_support::metrics::samples(&text)
        .into_iter()
        .filter(|s| s.value != 0.0 && wanted.iter().any(|w| s.name.starts_with(w)))
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            if labels.is_empty() {
                format!("{} {}", s.name, s.value)
            } else {
                format!("{}{{{}}} {}", s.name, labels.join(","), s.value)
            }
        })
        .collect()
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn run(args: &Args) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new().prefix("soak-").tempdir()?;
    eprintln!("soak: starting the upstream registry and building images");
    let reg = Registry::start().context("docker-registry")?;
    let proxy = FaultProxy::start(reg.addr)?;
    let relay = Relay::start(proxy.addr)?;
    let (workspaces, unique_bytes, mut specs) = build_world(&reg, &relay.addr.to_string())?;
    let endless = if args.hostile > 0 {
        Some(hostile::EndlessWorld::start().context("the hostile registry and endless origin")?)
    } else {
        None
    };
    if let Some(e) = &endless {
        specs[hostile::ENDLESS_WS] = e.spec();
    }
    std::fs::write(dir.path().join("specs.json"), specs.to_string())?;

    let redis = Redis::start().context("redis-server")?;
    let ipfs = if args.ipfs && Ipfs::available() {
        eprintln!("soak: starting IPFS");
        match Ipfs::start() {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!("soak: IPFS did not start, going on without it: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let spec = SpecServer::start(&specs)?;
    let mut registry = json!({
        "store": dir.path().join("store").to_string_lossy(),
        "fixedSpecFN": dir.path().join("specs.json").to_string_lossy(),
        "remoteSpecProvider": [{"addr": format!("dns:///{}", spec.addr())}],
        "redis": {"enabled": true, "singleHostAddr": redis.host()},
    });
    if let Some(i) = &ipfs {
        registry["ipfs"] = json!({"enabled": true, "ipfsAddr": i.multiaddr()});
    }
    let mut facade = Facade::start(&args.facade, dir.path(), &registry)?;
    let pid = facade.pid();
    let at_launch = sample(pid)?;
    eprintln!("soak: facade pid {pid} on {}; warming up", facade.addr);

    // Warm-up: every workspace through both providers once, before any fault, so the first
    // composition of each image never races an injected outage.
    let stats = Mutex::new(Stats::default());
    for ws in &workspaces {
        for provider in ["remote", "fixed"] {
            pull(facade.addr, provider, ws, &stats)
                .map_err(|e| anyhow::anyhow!("warm-up {provider}/{}: {e}", ws.id))?;
        }
    }
    let warm_pulls = workspaces.len() * 2;
    // Counters start after the warm-up.
    *stats.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Stats::default();
    let start = sample(pid)?;
    eprintln!(
        "soak: warm-up done ({} pulls); running {} pullers for {} s with faults",
        warm_pulls, args.pullers, args.seconds
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let stop = AtomicBool::new(false);
    let fault_log = Mutex::new(Vec::new());
    let mut cut_total = 0u64;
    let mut churn_versions = (0u64, Vec::new());
    let mut targets = Targets { relay, proxy, redis, spec, ipfs };
    let mut max = start;
    let mut facade_exit = None;
    // What the hostile clients GET: every layer of the legitimate images (the non-readers), and
    // the endless layer.
    let blob_paths: Vec<String> = workspaces
        .iter()
        .filter(|w| w.id != CHURN_ID)
        .flat_map(|w| {
            let layers = w.layers.lock().ok().and_then(|v| v.first().cloned()).unwrap_or_default();
            layers.into_iter().map(move |d| format!("/v2/fixed/{}/blobs/{d}", w.id))
        })
        .collect();
    let endless_path =
        endless.as_ref().map(|e| format!("/v2/fixed/{}/blobs/{}", hostile::ENDLESS_WS, e.layer)).unwrap_or_default();
    let plan = hostile::Plan { non_reading: args.hostile, silent: args.hostile };
    let counts = hostile::Counts::default();
    let disk = DiskProbe::new(dir.path().join("store"), pid);
    let mut timeline = vec![disk.point(Duration::ZERO, start, &counts, endless.as_ref())];
    let faults = std::thread::scope(|s| {
        let pullers: Vec<_> = (0..args.pullers)
            .map(|i| {
                let (ws, stats, stop) = (&workspaces, &stats, &stop);
                let addr = facade.addr;
                s.spawn(move || puller(addr, ws, args.seed.wrapping_add(i as u64 + 1), deadline, stats, stop))
            })
            .collect();
        let churn = s.spawn(|| churn_loop(&reg, &workspaces, args.seed, deadline));
        let addr = facade.addr;
        let hostile_clients = endless.is_some().then(|| {
            let (paths, endless_path, stop, counts) = (&blob_paths, &endless_path, &stop, &counts);
            s.spawn(move || hostile::run(addr, plan, paths, endless_path, deadline, stop, counts))
        });
        let mut next_point = Instant::now() + TIMELINE_EVERY;
        let faults = s.spawn(|| fault_loop(&mut cut_total, &mut targets, args.seed, deadline, &fault_log, started));
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            if let Ok(now) = sample(pid) {
                max.rss_kib = max.rss_kib.max(now.rss_kib);
                max.fds = max.fds.max(now.fds);
                if Instant::now() >= next_point {
                    timeline.push(disk.point(started.elapsed(), now, &counts, endless.as_ref()));
                    next_point += TIMELINE_EVERY;
                }
            }
            if let Err(e) = facade.proc.check_running() {
                facade_exit = Some(format!("{e:#}"));
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
        for p in pullers {
            let _ = p.join();
        }
        if let Some(h) = hostile_clients {
            let _ = h.join();
        }
        churn_versions = churn.join().unwrap_or((0, vec!["churn thread panicked".into()]));
        faults.join().unwrap_or_default()
    });
    let ran_for = started.elapsed();
    // Let in-flight transfers and pooled connections settle before the end sample.
    std::thread::sleep(Duration::from_secs(3));
    let end = if facade_exit.is_none() { sample(pid).ok() } else { None };
    if let Some(e) = end {
        max.rss_kib = max.rss_kib.max(e.rss_kib);
        max.fds = max.fds.max(e.fds);
        timeline.push(disk.point(started.elapsed(), e, &counts, endless.as_ref()));
    }
    let metrics = metrics_of_interest(facade.metrics);
    let upstream = (targets.proxy.connections(), targets.proxy.bytes_to_client());
    let ipfs_used = targets.ipfs.is_some();
    drop(targets);

    let s = stats.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut sorted = s.durations.clone();
    sorted.sort();
    let (p50, p99) = (percentile(&sorted, 0.50), percentile(&sorted, 0.99));
    let end_s = end.unwrap_or_default();
    let fd_ok = end.is_some_and(|e| e.fds <= start.fds + FD_GROWTH_BOUND);
    let rss_ok = end.is_some_and(|e| e.rss_kib <= start.rss_kib + RSS_GROWTH_BOUND_KIB);
    let passed = s.failures == 0 && s.corrupt == 0 && facade_exit.is_none() && fd_ok && rss_ok && s.pulls > 0;

    let command = std::iter::once("soak".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let mut r = String::new();
    r.push_str("# Soak run\n\n");
    r.push_str(&format!(
        "`make soak SOAK_SECONDS={}` (`{command}`), {}, on {} CPUs.\n\n",
        args.seconds,
        now_utc(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    r.push_str(&format!(
        "The release facade (own process) with the `remote` (gRPC spec server, in-process) and `fixed` providers, \
         Redis{}, a store bounded at {STORE_MAX}; upstream: docker-registry behind a fault proxy. {} pullers, \
         seed {}, {} workspaces ({} MiB of blobs at the start, 32–64 MiB layers, one IDE image shared by four, one base re-pushed during the run). \
         A failed GET is retried up to {MAX_RETRIES} times ({RETRY_BACKOFF:?} backoff, doubling).\n\n",
        if ipfs_used { " and IPFS" } else { " (IPFS not running)" },
        args.pullers,
        args.seed,
        workspaces.len(),
        unique_bytes >> 20
    ));
    r.push_str(&format!("Result: **{}**\n\n", if passed { "PASS" } else { "FAIL" }));
    r.push_str("| measure | value |\n|---|---|\n");
    r.push_str(&format!("| duration | {:.0} s (plus {warm_pulls} warm-up pulls) |\n", ran_for.as_secs_f64()));
    r.push_str(&format!("| pulls done | {} ({:.1} GiB verified) |\n", s.pulls, s.bytes as f64 / (1u64 << 30) as f64));
    r.push_str(&format!("| failed pulls | {} |\n", s.failures));
    r.push_str(&format!("| complete bodies with wrong bytes | {} |\n", s.corrupt));
    r.push_str(&format!("| retried GETs | {} blob, {} manifest |\n", s.blob_retries, s.manifest_retries));
    r.push_str(&format!("| pull time p50 / p99 | {:.2} s / {:.2} s |\n", p50.as_secs_f64(), p99.as_secs_f64()));
    r.push_str(&format!(
        "| facade RSS start / end / max | {} / {} / {} (at launch {}; bound: end ≤ start + {}) |\n",
        mib(start.rss_kib),
        mib(end_s.rss_kib),
        mib(max.rss_kib),
        mib(at_launch.rss_kib),
        mib(RSS_GROWTH_BOUND_KIB)
    ));
    r.push_str(&format!(
        "| facade open fds start / end / max | {} / {} / {} (at launch {}; bound: end ≤ start + {FD_GROWTH_BOUND}) |\n",
        start.fds, end_s.fds, max.fds, at_launch.fds
    ));
    r.push_str(&format!(
        "| upstream (through the proxy) | {} connections, {:.1} GiB |\n",
        upstream.0,
        upstream.1 as f64 / (1u64 << 30) as f64
    ));
    if let Some(e) = &facade_exit {
        r.push_str(&format!("| facade exited | {e} |\n"));
    }
    r.push_str("\nFaults injected (every upstream fault first drops the open upstream connections):\n\n| kind | count |\n|---|---|\n");
    for (k, n) in &faults {
        r.push_str(&format!("| {k} | {n} |\n"));
    }
    r.push_str(&format!("\nUpstream connections dropped mid-use by those faults: {cut_total}.\n"));
    r.push_str(&format!(
        "\nThe `{CHURN_ID}` base was re-pushed {} times under the same tag (a fresh {CHURN_LAYER_MIB} MiB layer each), \
         so new content kept coming from upstream during the faults.\n",
        churn_versions.0
    ));
    for e in &churn_versions.1 {
        r.push_str(&format!("- churn push failed: {e}\n"));
    }
    r.push_str("\nPulls by workspace: ");
    r.push_str(&s.by_workspace.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "));
    r.push_str(".\n");
    if !s.retry_reasons.is_empty() {
        r.push_str("\nRetry reasons: ");
        r.push_str(&s.retry_reasons.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", "));
        r.push_str(".\n");
    }
    if !s.failure_samples.is_empty() {
        r.push_str("\nFailures (first 10):\n\n");
        for f in &s.failure_samples {
            r.push_str(&format!("- {f}\n"));
        }
    }
    if let Some(e) = &endless {
        r.push_str(&hostile_report(args.hostile, &counts, e, &timeline));
    }
    r.push_str("\nFacade metrics at the end (non-zero series):\n\n```\n");
    for m in &metrics {
        r.push_str(m);
        r.push('\n');
    }
    r.push_str("```\n\nFault timeline (seconds into the run):\n\n```\n");
    for (at, what) in fault_log.into_inner().unwrap_or_default() {
        r.push_str(&format!("{:7.1}  {what}\n", at.as_secs_f64()));
    }
    r.push_str("```\n");
    print!("{r}");
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &r).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("soak: report written to {}", args.out.display());
    if !passed {
        eprintln!("soak: FAILED; facade log tail:\n{}", tail(&facade.log, 40));
    }
    facade.proc.kill();
    Ok(passed)
}

/// How often the timeline of RSS, fds and disk is sampled.
const TIMELINE_EVERY: Duration = Duration::from_secs(10);

/// One point of the timeline.
struct Point {
    at: Duration,
    sample: Sample,
    /// Disk the store dir and the facade's own spool dir take (allocated blocks).
    disk: u64,
    /// Allocated bytes of the distinct files the facade holds open (spools of abandoned fills
    /// included, even once unlinked).
    open_files: u64,
    /// How much the free space of the store's filesystem shrank since the start (anything else
    /// writing to it counts too).
    avail_drop: Option<i64>,
    hostile_open: u64,
    endless_sent: u64,
}

/// Reads the facade's disk footprint.
struct DiskProbe {
    store: PathBuf,
    spool: PathBuf,
    pid: u32,
    avail0: Option<u64>,
}

impl DiskProbe {
    fn new(store: PathBuf, pid: u32) -> DiskProbe {
        let avail0 = avail(&store);
        // Where the facade spools blobs it cannot reserve store space for (its temp dir).
        let spool = std::env::temp_dir().join(format!("registry-facade-spool-{pid}"));
        DiskProbe { store, spool, pid, avail0 }
    }

    fn point(&self, at: Duration, sample: Sample, c: &hostile::Counts, e: Option<&hostile::EndlessWorld>) -> Point {
        let avail_drop = match (self.avail0, avail(&self.store)) {
            (Some(a), Some(b)) => Some(a as i64 - b as i64),
            _ => None,
        };
        Point {
            at,
            sample,
            disk: du(&self.store) + du(&self.spool),
            open_files: open_file_bytes(self.pid),
            avail_drop,
            hostile_open: c.non_reading_open.load(Ordering::Relaxed) + c.silent_open.load(Ordering::Relaxed),
            endless_sent: e.map_or(0, hostile::EndlessWorld::sent),
        }
    }
}

/// Allocated bytes of the files under `root` (symlinks not followed); 0 if it is missing.
fn du(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// The allocated bytes of the distinct regular files behind `/proc/<pid>/fd` (a file open
/// twice counts once; an unlinked spool still counts, which `du` of a directory cannot see).
fn open_file_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    let mut seen = std::collections::BTreeMap::new();
    for m in fds.flatten().filter_map(|fd| std::fs::metadata(fd.path()).ok()).filter(|m| m.is_file()) {
        seen.insert((m.dev(), m.ino()), m.blocks() * 512);
    }
    seen.values().sum()
}

/// Free bytes of the filesystem holding `path` (`df`), if it answers.
fn avail(path: &Path) -> Option<u64> {
    let dir = if path.exists() { path } else { path.parent()? };
    let out = Command::new("df").args(["-B1", "--output=avail"]).arg(dir).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().nth(1)?.trim().parse().ok()
}

fn hostile_report(n: usize, c: &hostile::Counts, e: &hostile::EndlessWorld, timeline: &[Point]) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let median = |v: &Mutex<Vec<f64>>| {
        let mut v = v.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).map_or("–".to_string(), |m| format!("{m:.1} s"))
    };
    let endless = c.endless.lock().map(|m| m.clone()).unwrap_or_default();
    let endless_ok = endless.get("read 4 MiB, dropped").copied().unwrap_or(0);
    let mut r = String::new();
    r.push_str(&format!(
        "\nHostile phase, alongside the pulls, from {} (its own client address):\n\n| hostile client | what happened |\n|---|---|\n",
        hostile::HOSTILE_SOURCE
    ));
    r.push_str(&format!(
        "| {n} non-reading clients (a blob GET, nothing read, held 20–60 s, again) | {} GETs sent, at most {} open at once, {} could not connect or send |\n",
        get(&c.non_reading_requests),
        get(&c.non_reading_peak),
        get(&c.non_reading_refused)
    ));
    r.push_str(&format!(
        "| {n} silent connections (nothing sent, held 30–90 s, again) | {} made, at most {} open at once, {} closed by the facade first (median after {}), {} could not connect |\n",
        get(&c.silent_connections),
        get(&c.silent_peak),
        get(&c.silent_closed_by_facade),
        median(&c.silent_lifetimes),
        get(&c.silent_refused)
    ));
    let outcomes: Vec<String> = endless.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
    r.push_str(&format!(
        "| endless layer (manifest claims 64 GiB; read 4 MiB, drop, every 5–10 s) | {}; median time to 4 MiB {}; the origin sent {} over {} connections ({} still sending at the end) for {} read by clients |\n",
        if outcomes.is_empty() { "no attempt".to_string() } else { outcomes.join(", ") },
        median(&c.endless_secs),
        mib(e.sent()),
        get(&e.origin.connections),
        get(&e.origin.open),
        mib(endless_ok * (4 << 20))
    ));
    let max_disk = timeline.iter().map(|p| p.disk).max().unwrap_or(0);
    let max_open = timeline.iter().map(|p| p.open_files).max().unwrap_or(0);
    r.push_str(&format!(
        "\nDisk: store and spool dirs at most {}, files held open at most {}. Timeline (every {} s; disk = allocated blocks of the store and spool dirs; open files = allocated bytes of the distinct files the facade holds open, unlinked spools included; free-space drop = the filesystem's, anything else writing there included):\n\n",
        mib(max_disk),
        mib(max_open),
        TIMELINE_EVERY.as_secs()
    ));
    r.push_str("| t | RSS | fds | disk | open files | free-space drop | hostile conns open | endless origin sent |\n|---|---|---|---|---|---|---|---|\n");
    for p in timeline {
        r.push_str(&format!(
            "| {:.0} s | {} | {} | {} | {} | {} | {} | {} |\n",
            p.at.as_secs_f64(),
            mib(p.sample.rss_kib * 1024),
            p.sample.fds,
            mib(p.disk),
            mib(p.open_files),
            p.avail_drop.map_or("–".to_string(), |d| if d < 0 {
                format!("-{}", mib(d.unsigned_abs()))
            } else {
                mib(d as u64)
            }),
            p.hostile_open,
            mib(p.endless_sent)
        ));
    }
    r
}
