//! `make bench`: registry-facade side by side with the CNCF distribution registry in pull-through
//! mode, the upstream registry itself and a minimal copy server (this machine's practical limit),
//! all on this machine at once. It measures cold and warm single-stream throughput and time to
//! first byte of one large layer, N concurrent cold pulls (upstream bytes, wall time, peak RSS)
//! and warm manifest HEAD requests per second, prints a table of ratios against the streaming
//! targets (`bench/README.md`) and writes it to `bench/RESULTS.md`.
//!
//! It is a measurement, not a test: it fails only when something is broken (a wrong byte, a
//! system that does not start), never because a target is missed.

mod client;
mod copy_server;
mod cpu;
mod curl;
mod first_pull;
mod herd;
mod load;
mod rate_proxy;
mod report;
mod systems;
mod wrk;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use test_support::fault_proxy::FaultProxy;
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image};
use test_support::ipfs::Ipfs;
use test_support::redis::Redis;
use test_support::registry::Registry;

use crate::copy_server::CopyServer;
use crate::report::{Concurrent, NodePull, Params, Results, Series, SystemResult, TwoNodes};
use crate::systems::{FacadeProc, RssSampler, WORKSPACE};

const MIB: u64 = 1 << 20;

#[derive(Parser)]
#[command(name = "bench", about = "registry-facade side by side with distribution, direct upstream and a copy server")]
struct Cli {
    /// The facade binary (a release build).
    #[arg(long)]
    facade: Option<PathBuf>,
    /// Layer size in MiB (default 256; 32 with --quick).
    #[arg(long)]
    layer_mib: Option<u64>,
    /// Smoke test: small layer, fewer repetitions, short wrk runs.
    #[arg(long)]
    quick: bool,
    /// Longest wait, in seconds, for a quiet machine before starting (0: do not wait).
    #[arg(long, default_value_t = 90)]
    max_quiet_wait: u64,
    /// Where to write the results.
    #[arg(long, default_value_os_t = Path::new(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md"))]
    out: PathBuf,
    /// Run only these sections (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
}

/// The parts of the run `--only` can pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// Single-stream, concurrent and manifest measurements against the targets, and two nodes.
    Streams,
    /// The layer pulled with curl.
    Curl,
    /// containerd's first pull of a ten-layer workspace image, loopback and remote.
    FirstPull,
    /// N facades sharing one Redis vs N distribution caches, all asking for one new layer at once.
    Herd,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let params = Params {
        layer_mib: cli.layer_mib.unwrap_or(if cli.quick { 32 } else { 256 }),
        cold_reps: if cli.quick { 1 } else { 3 },
        warm_reps: if cli.quick { 3 } else { 7 },
        wrk_secs: if cli.quick { 2 } else { 5 },
        concurrency: 16,
        quick: cli.quick,
    };
    ensure!(params.layer_mib >= 1, "--layer-mib must be at least 1");
    let facade_bin = cli.facade.clone().unwrap_or_else(systems::default_facade_bin);
    let facade_bin = facade_bin
        .canonicalize()
        .with_context(|| format!("facade binary {} (build it: make build)", facade_bin.display()))?;
    for bin in [test_support::registry::REGISTRY_BIN, wrk::WRK_BIN] {
        ensure!(Path::new(bin).exists(), "{bin} is missing (scripts/install-deps.sh installs it)");
    }

    let quiet = if cli.max_quiet_wait > 0 {
        // 15 % of the machine is background noise (an editor, a language server), not a compile.
        Some(cpu::wait_for_quiet(Duration::from_secs(cli.max_quiet_wait), 0.15))
    } else {
        None
    };
    let load_before = report::load_average();
    tracing::info!(load_average = %load_before, "starting");
    let start = (cpu::machine(), cpu::own_ticks());
    let sections = if cli.only.is_empty() {
        vec![Section::Streams, Section::Curl, Section::FirstPull, Section::Herd]
    } else {
        cli.only.clone()
    };
    let results = measure(&params, &facade_bin, &sections)?;
    // Every child is stopped and reaped by now, so its CPU time is in our children's ticks.
    let usage = cpu::usage(start, (cpu::machine(), cpu::own_ticks()));

    if results.streams_ran {
        let (table, verdict) = report::table(&results, &params);
        println!("\n{table}\nTargets met: {} of {}", verdict.met, verdict.total);
    }
    println!("{}", report::extra_sections(&results));
    let others = report::other_load(quiet, &usage);
    println!("{others}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let ctx = report::Context {
        date: report::utc_date(now),
        machine: report::machine(),
        command: command_line(),
        versions: versions(),
        load: (load_before, report::load_average()),
        other_load: others,
    };
    std::fs::write(&cli.out, report::results_md(&results, &params, &ctx))
        .with_context(|| format!("writing {}", cli.out.display()))?;
    tracing::info!(file = %cli.out.display(), "results written");
    Ok(())
}

/// Every measurement; the world and every system are gone when it returns.
fn measure(params: &Params, facade_bin: &Path, sections: &[Section]) -> anyhow::Result<Results> {
    let world = World::build(params)?;
    let mut results = Results { layer_size: world.layer_size, layer_digest: world.layer.clone(), ..Results::default() };
    if sections.contains(&Section::Streams) {
        single_streams(&world, params, facade_bin, &mut results)?;
        results.facade.concurrent = concurrent(&world, params, Kind::Facade(facade_bin), &mut results.verified)?;
        results.dist.concurrent = concurrent(&world, params, Kind::Distribution, &mut results.verified)?;
        for s in [&mut results.facade, &mut results.dist] {
            s.peak_rss_whole_run = s.peak_rss_whole_run.max(s.concurrent.peak_rss_after_warm);
        }
        results.streams_ran = true;
    }
    if sections.contains(&Section::Curl) {
        results.curl = Some(curl_rows(&world, params, facade_bin));
    }
    if sections.contains(&Section::FirstPull) {
        results.first_pull = Some(first_pull::run(&world.upstream, facade_bin, &first_pull::Params::new(params.quick)));
    }
    if sections.contains(&Section::Herd) {
        let p = herd::Params::new(params.quick);
        results.herd = Some(herd::run(&world.upstream, facade_bin, &p, &mut results.verified)?);
    }
    if sections.contains(&Section::Streams) {
        // Last: js-ipfs keeps a CPU busy while it adds, which must not weigh on the rows above.
        results.two_nodes = Some(two_nodes(&world, facade_bin, &mut results.verified)?);
    }
    Ok(results)
}

/// The layer pulled with curl: cold pulls alternate between a fresh facade and a fresh
/// distribution proxy, warm pulls go round-robin over every system. A pull that fails is the
/// row's result (`Err`), not a broken bench.
fn curl_rows(world: &World, p: &Params, facade_bin: &Path) -> Result<report::CurlResults, String> {
    if !curl::available() {
        return Err("curl is not installed (scripts/install-deps.sh)".into());
    }
    let run = || -> anyhow::Result<report::CurlResults> {
        let mut c = report::CurlResults::default();
        let kinds = [Kind::Facade(facade_bin), Kind::Distribution];
        let mut live: [Option<Instance>; 2] = [None, None];
        for i in 0..p.cold_reps {
            for (k, kind) in kinds.iter().enumerate() {
                tracing::info!("curl: {} cold {}/{}", kind.name(), i + 1, p.cold_reps);
                drop(live[k].take());
                let inst = kind.start_primed_direct(world)?;
                let pull = curl::pull(inst.addr(), &kind.blob_path(&world.layer), world.layer_size)
                    .with_context(|| format!("log: {}", inst.log_tail()))?;
                if k == 0 {
                    c.facade_cold.push(pull)
                } else {
                    c.dist_cold.push(pull)
                }
                live[k] = Some(inst);
            }
        }
        let [Some(f), Some(d)] = &live else { bail!("no cold run") };
        let direct_path = format!("/v2/big/blobs/{}", world.layer);
        let (f_blob, d_blob) = (kinds[0].blob_path(&world.layer), kinds[1].blob_path(&world.layer));
        tracing::info!("curl: {} warm rounds", p.warm_reps);
        for _ in 0..p.warm_reps {
            c.copy.push(curl::pull(world.copy.addr, "/layer", world.layer_size)?);
            c.direct.push(curl::pull(world.upstream.addr, &direct_path, world.layer_size)?);
            c.facade_warm.push(curl::pull(f.addr(), &f_blob, world.layer_size)?);
            c.dist_warm.push(curl::pull(d.addr(), &d_blob, world.layer_size)?);
        }
        Ok(c)
    };
    run().map_err(|e| format!("{e:#}"))
}

/// The upstream with the layer, the two counting proxies, the copy server and a work dir.
struct World {
    upstream: Registry,
    facade_proxy: FaultProxy,
    dist_proxy: FaultProxy,
    copy: CopyServer,
    layer: String,
    layer_size: u64,
    wrk_script: PathBuf,
    _work: tempfile::TempDir,
}

impl World {
    fn build(p: &Params) -> anyhow::Result<World> {
        let work = tempfile::Builder::new().prefix("bench-").tempdir()?;
        let upstream = Registry::start().context("starting the upstream registry")?;
        tracing::info!(mib = p.layer_mib, "building and pushing the layer");
        let (layer, layer_size) = {
            let built = build_layer(&[FileEntry::file("big.bin", noise(p.layer_mib * MIB, 7))], LayerCompression::None);
            std::fs::write(work.path().join("layer.bin"), &built.bytes)?;
            let out = (built.digest.clone(), built.size);
            let image = ImageBuilder::new().layer(built).build();
            // OCI keeps the layer byte for byte (no recompression on push).
            push_image(&upstream, "big:1", &image, PushFormat::Oci).context("pushing big:1")?;
            out
        };
        let facade_proxy = FaultProxy::start(upstream.addr)?;
        let dist_proxy = FaultProxy::start(upstream.addr)?;
        let copy = CopyServer::start(work.path().join("layer.bin"))?;
        let wrk_script = wrk::write_script(work.path())?;
        Ok(World { upstream, facade_proxy, dist_proxy, copy, layer, layer_size, wrk_script, _work: work })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // As for the proxies: stop the registry before its directory goes.
        self.upstream.stop();
    }
}

/// Deterministic incompressible bytes (xorshift64).
pub(crate) fn noise(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len as usize + 8);
    while (v.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

/// Checks a verification pull's bytes; a wrong byte makes the whole bench fail.
fn verify(world: &World, what: &str, pull: &client::Pull, verified: &mut Vec<String>) -> anyhow::Result<()> {
    let got = pull.digest.as_deref().unwrap_or("(not hashed)");
    ensure!(got == world.layer, "{what}: served {got}, the layer is {}", world.layer);
    verified.push(what.to_string());
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind<'a> {
    Facade(&'a Path),
    Distribution,
}

/// One running instance of a system under test.
enum Instance {
    Facade(FacadeProc),
    Distribution(Registry, u32),
}

impl Drop for Instance {
    fn drop(&mut self) {
        // test-support's Registry removes its directory before it kills the process; a proxy
        // still writing a blob to its storage then recreates parts of it and they leak. Stop it
        // first.
        if let Instance::Distribution(reg, _) = self {
            reg.stop();
        }
    }
}

impl Instance {
    fn addr(&self) -> SocketAddr {
        match self {
            Instance::Facade(f) => f.addr,
            Instance::Distribution(r, _) => r.addr,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Instance::Facade(f) => f.pid(),
            Instance::Distribution(_, pid) => *pid,
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Instance::Facade(f) => f.log_tail(),
            Instance::Distribution(r, _) => {
                let log = r.log();
                log.get(log.len().saturating_sub(2000)..).unwrap_or("").to_string()
            }
        }
    }
}

impl Kind<'_> {
    fn name(self) -> &'static str {
        match self {
            Kind::Facade(_) => "facade",
            Kind::Distribution => "distribution proxy",
        }
    }

    fn proxy(self, world: &World) -> &FaultProxy {
        match self {
            Kind::Facade(_) => &world.facade_proxy,
            Kind::Distribution => &world.dist_proxy,
        }
    }

    fn start(self, world: &World) -> anyhow::Result<Instance> {
        self.start_on(self.proxy(world).host())
    }

    /// Starts an instance whose upstream is `upstream` (`host:port`).
    fn start_on(self, upstream: String) -> anyhow::Result<Instance> {
        Ok(match self {
            Kind::Facade(bin) => Instance::Facade(FacadeProc::start(bin, &format!("{upstream}/big:1"))?),
            Kind::Distribution => {
                let (reg, pid) = systems::start_distribution_proxy(&upstream)?;
                Instance::Distribution(reg, pid)
            }
        })
    }

    fn manifest_path(self) -> String {
        match self {
            Kind::Facade(_) => format!("/v2/fixed/{WORKSPACE}/manifests/latest"),
            Kind::Distribution => "/v2/big/manifests/1".into(),
        }
    }

    fn blob_path(self, digest: &str) -> String {
        match self {
            Kind::Facade(_) => format!("/v2/fixed/{WORKSPACE}/blobs/{digest}"),
            Kind::Distribution => format!("/v2/big/blobs/{digest}"),
        }
    }

    /// Starts a fresh instance and fetches the manifest, as a client does before the blobs.
    fn start_primed(self, world: &World) -> anyhow::Result<Instance> {
        self.prime(world, self.start(world)?)
    }

    /// As [`Kind::start_primed`], with the upstream reached directly, not through the
    /// system's counting proxy (whose copy loop caps a cold pull at its own speed).
    fn start_primed_direct(self, world: &World) -> anyhow::Result<Instance> {
        self.prime(world, self.start_on(world.upstream.addr.to_string())?)
    }

    fn prime(self, world: &World, inst: Instance) -> anyhow::Result<Instance> {
        let m = client::small(inst.addr(), "GET", &self.manifest_path())?;
        let manifest: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or_default();
        if m.status != 200 || manifest["layers"][0]["digest"] != world.layer.as_str() {
            bail!(
                "{}: manifest GET answered {} {}; log: {}",
                self.name(),
                m.status,
                String::from_utf8_lossy(&m.body),
                inst.log_tail()
            );
        }
        Ok(inst)
    }
}

/// Single-stream pulls of every system, interleaved so that whatever else the machine does
/// meanwhile weighs on all columns alike: cold pulls alternate between the facade and the
/// distribution proxy (each on a fresh instance); warm pulls go round-robin over the copy server,
/// direct upstream, upstream via a counting proxy and the last facade and distribution instances.
/// Then manifest requests per second, one system after the other.
fn single_streams(world: &World, p: &Params, facade_bin: &Path, results: &mut Results) -> anyhow::Result<()> {
    let direct_path = format!("/v2/big/blobs/{}", world.layer);
    for (name, addr) in [
        ("copy server", world.copy.addr),
        ("direct upstream", world.upstream.addr),
        ("upstream via a counting proxy", world.facade_proxy.addr),
    ] {
        let path = if name == "copy server" { "/layer" } else { direct_path.as_str() };
        verify(world, name, &client::pull(addr, path, true)?, &mut results.verified)?;
    }

    let kinds = [Kind::Facade(facade_bin), Kind::Distribution];
    let mut live: [Option<Instance>; 2] = [None, None];
    let (mut facade, mut dist) = (SystemResult::default(), SystemResult::default());
    for i in 0..=p.cold_reps {
        for (k, (kind, r)) in kinds.iter().zip([&mut facade, &mut dist]).enumerate() {
            // One instance per system at a time: the previous one's memory and disk go first.
            drop(live[k].take());
            live[k] = Some(cold_pull(world, p, *kind, i, r, &mut results.verified)?);
        }
    }
    let [Some(f_inst), Some(d_inst)] = live else { bail!("no cold run") };
    let f_blob = Kind::Facade(facade_bin).blob_path(&world.layer);
    let d_blob = Kind::Distribution.blob_path(&world.layer);
    verify(world, "facade warm (first)", &client::pull(f_inst.addr(), &f_blob, true)?, &mut results.verified)?;
    verify(
        world,
        "distribution proxy warm (first)",
        &client::pull(d_inst.addr(), &d_blob, true)?,
        &mut results.verified,
    )?;
    tracing::info!(
        "warm pulls: {} rounds over the copy server, direct upstream, via proxy, facade, distribution",
        p.warm_reps
    );
    // Server CPU time per pull, from /proc: it does not depend on what else the machine runs the
    // way wall-clock throughput does. The copy server counts its own threads' time.
    let upstream_pid = systems::registry_pid(&world.upstream)?;
    world.copy.wait_idle(Duration::from_secs(2));
    let copy_ns = world.copy.cpu_ns();
    for _ in 0..p.warm_reps {
        let rounds: [(SocketAddr, &str, &mut Series, Option<u32>); 5] = [
            (world.copy.addr, "/layer", &mut results.copy, None),
            (world.upstream.addr, &direct_path, &mut results.direct, Some(upstream_pid)),
            (world.facade_proxy.addr, &direct_path, &mut results.direct_via_proxy, None),
            (f_inst.addr(), &f_blob, &mut facade.warm, Some(f_inst.pid())),
            (d_inst.addr(), &d_blob, &mut dist.warm, Some(d_inst.pid())),
        ];
        for (addr, path, series, pid) in rounds {
            let before = pid.map(systems::cpu_ns);
            series.push(&client::pull(addr, path, false)?);
            if let (Some(pid), Some(before)) = (pid, before) {
                series.add_cpu_ns(systems::cpu_ns(pid).saturating_sub(before));
            }
        }
    }
    world.copy.wait_idle(Duration::from_secs(2));
    results.copy.add_cpu_ns(world.copy.cpu_ns().saturating_sub(copy_ns));
    verify(world, "facade warm (last)", &client::pull(f_inst.addr(), &f_blob, true)?, &mut results.verified)?;
    verify(
        world,
        "distribution proxy warm (last)",
        &client::pull(d_inst.addr(), &d_blob, true)?,
        &mut results.verified,
    )?;

    let (head, get) = manifest_rps(world.upstream.addr, "/v2/big/manifests/1", world, p)?;
    (results.direct_head, results.direct_get) = (Some(head), Some(get));
    for (kind, inst, r) in [(kinds[0], &f_inst, &mut facade), (kinds[1], &d_inst, &mut dist)] {
        let (head, get) = manifest_rps(inst.addr(), &kind.manifest_path(), world, p)?;
        (r.head, r.get) = (Some(head), Some(get));
        r.peak_rss_whole_run = r.peak_rss_whole_run.max(systems::peak_rss(inst.pid())?);
    }
    (results.facade, results.dist) = (facade, dist);
    Ok(())
}

/// Cold pull number `i` (0: the hashed verification pull) on a fresh instance, which is returned
/// for the next steps.
fn cold_pull(
    world: &World,
    p: &Params,
    kind: Kind<'_>,
    i: usize,
    r: &mut SystemResult,
    verified: &mut Vec<String>,
) -> anyhow::Result<Instance> {
    let name = kind.name();
    tracing::info!("{name}: cold pull {}/{}", i + 1, p.cold_reps + 1);
    let inst = kind.start_primed(world)?;
    let cpu_before = systems::cpu_ns(inst.pid());
    let pull = client::pull(inst.addr(), &kind.blob_path(&world.layer), i == 0)
        .with_context(|| format!("{name} cold pull; log: {}", inst.log_tail()))?;
    if i == 0 {
        verify(world, &format!("{name} cold"), &pull, verified)?;
    } else {
        r.cold.push(&pull);
        r.cold.add_cpu_ns(systems::cpu_ns(inst.pid()).saturating_sub(cpu_before));
    }
    r.peak_rss_whole_run = r.peak_rss_whole_run.max(systems::peak_rss(inst.pid())?);
    Ok(inst)
}

/// HEAD once (must be 200 with a digest), then HEAD under load, then GET under wrk.
fn manifest_rps(
    addr: SocketAddr,
    path: &str,
    world: &World,
    p: &Params,
) -> anyhow::Result<(load::LoadResult, wrk::WrkResult)> {
    let url = format!("http://{addr}{path}");
    let head = client::small(addr, "HEAD", path)?;
    ensure!(head.status == 200, "HEAD {url}: status {}", head.status);
    ensure!(head.header("docker-content-digest").is_some(), "HEAD {url}: no Docker-Content-Digest");
    let secs = Duration::from_secs(u64::from(p.wrk_secs));
    tracing::info!("HEAD {url} for {} s, 16 connections", p.wrk_secs);
    let accept = facade_oci::media_types::MANIFEST_ACCEPT;
    let head = load::head_rps(addr, path, accept, 16, 2, secs)?;
    tracing::info!("wrk GET {url} for {} s", p.wrk_secs);
    let get = wrk::get_rps(&url, &world.wrk_script, p.wrk_secs)?;
    Ok((head, get))
}

/// N clients released together on one cold blob of a fresh instance, then again warm. A failed
/// pull is a finding about that system, not a broken bench: it is counted and reported.
fn concurrent(world: &World, p: &Params, kind: Kind<'_>, verified: &mut Vec<String>) -> anyhow::Result<Concurrent> {
    let name = kind.name();
    tracing::info!("{name}: {} concurrent cold pulls", p.concurrency);
    // Counted from before the manifest GET: the facade's prefetch starts the layer's download
    // on that GET, and its blob GET belongs to this pull (the manifest and config add a few KiB).
    let started = kind.start(world)?;
    let proxy = kind.proxy(world);
    proxy.reset_counters();
    let inst = kind.prime(world, started)?;
    let blob = kind.blob_path(&world.layer);
    let sampler = RssSampler::start(inst.pid());
    let cold = pull_together(inst.addr(), &blob, p.concurrency)?;
    let sampled_rss = sampler.finish();
    let peak_rss = systems::peak_rss(inst.pid())?;
    let upstream_bytes = proxy.bytes_to_client();
    let upstream_gets = proxy.count_requests("GET", &format!("/blobs/{}", world.layer));
    cold.check(world, &format!("{name} concurrent cold"), &inst, verified)?;

    tracing::info!("{name}: {} concurrent warm pulls", p.concurrency);
    let warm = pull_together(inst.addr(), &blob, p.concurrency)?;
    warm.check(world, &format!("{name} concurrent warm"), &inst, verified)?;
    let peak_rss_after_warm = systems::peak_rss(inst.pid())?;
    Ok(Concurrent {
        wall: cold.wall,
        bytes: cold.bytes(),
        failures: cold.failures,
        upstream_bytes,
        upstream_gets,
        peak_rss,
        sampled_rss,
        warm_wall: warm.wall,
        warm_bytes: warm.bytes(),
        warm_failures: warm.failures,
        peak_rss_after_warm,
    })
}

/// Longest wait for node A to publish the layer to the cluster cache (js-ipfs adds a 256 MiB
/// blob in tens of seconds).
const PUBLISH_WAIT: Duration = Duration::from_secs(180);

/// The cluster cache across nodes: two facades ("nodes", each with its own empty store) sharing a real Redis and a real
/// IPFS node, and one counting proxy to the upstream. Node A pulls the layer cold; once it has
/// published the blob to the cluster cache, node B pulls it cold. Redis or IPFS that cannot start
/// or a pull that fails is a result for the row (`Err`), not a broken bench; a wrong byte is.
fn two_nodes(world: &World, bin: &Path, verified: &mut Vec<String>) -> anyhow::Result<Result<TwoNodes, String>> {
    tracing::info!("two nodes: starting Redis and js-ipfs");
    if !Redis::available() {
        return Ok(Err("redis-server is not installed".into()));
    }
    let redis = match Redis::start() {
        Ok(r) => r,
        Err(e) => return Ok(Err(format!("Redis did not start: {e:#}"))),
    };
    if !Ipfs::available() {
        return Ok(Err("js-ipfs is not installed (scripts/install-deps.sh)".into()));
    }
    let ipfs = match Ipfs::start() {
        Ok(i) => i,
        Err(e) => return Ok(Err(format!("the IPFS node did not start: {e:#}"))),
    };
    let proxy = FaultProxy::start(world.upstream.addr)?;
    let (row, pulls) = match two_node_pulls(world, bin, &redis, &ipfs, &proxy) {
        Ok(out) => out,
        Err(e) => return Ok(Err(format!("{e:#}"))),
    };
    for (node, pull) in ["A", "B"].iter().zip(&pulls) {
        verify(world, &format!("two nodes: node {node} cold (the timed pull)"), pull, verified)?;
    }
    Ok(Ok(row))
}

fn two_node_pulls(
    world: &World,
    bin: &Path,
    redis: &Redis,
    ipfs: &Ipfs,
    proxy: &FaultProxy,
) -> anyhow::Result<(TwoNodes, [client::Pull; 2])> {
    let mut cluster = serde_json::Map::new();
    cluster.insert("redis".into(), serde_json::json!({"enabled": true, "singleHostAddr": redis.host()}));
    cluster.insert("ipfs".into(), serde_json::json!({"enabled": true, "ipfsAddr": ipfs.multiaddr()}));
    let base_ref = format!("{}/big:1", proxy.host());
    let kind = Kind::Facade(bin);
    let blob = kind.blob_path(&world.layer);

    let cold = |node: &str| -> anyhow::Result<(FacadeProc, client::Pull, NodePull)> {
        tracing::info!("two nodes: node {node} cold pull");
        proxy.reset_counters();
        let f = FacadeProc::start_with(bin, &base_ref, cluster.clone())?;
        let m = client::small(f.addr, "GET", &kind.manifest_path())?;
        let manifest: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or_default();
        if m.status != 200 || manifest["layers"][0]["digest"] != world.layer.as_str() {
            bail!(
                "node {node}: manifest GET answered {} {}; log: {}",
                m.status,
                String::from_utf8_lossy(&m.body),
                f.log_tail()
            );
        }
        // Hashed while timed: this one pull is all there is of each node's cold path (a second
        // pull would be warm), and it is the pull whose bytes must be right.
        let pull = client::pull(f.addr, &blob, true)
            .with_context(|| format!("node {node} cold pull; log: {}", f.log_tail()))?;
        let np = NodePull {
            total: pull.total,
            bytes: pull.bytes,
            upstream_bytes: proxy.bytes_to_client(),
            upstream_gets: proxy.count_requests("GET", &format!("/blobs/{}", world.layer)),
            upstream_requests: proxy.requests().len(),
        };
        Ok((f, pull, np))
    };

    let (a, a_pull, a_row) = cold("A")?;
    let key = format!("registry-facade:blob:{}", world.layer);
    let started = Instant::now();
    loop {
        if redis.keys(&key).unwrap_or_default().contains(&key) {
            break;
        }
        if started.elapsed() >= PUBLISH_WAIT {
            bail!(
                "node A did not publish the layer to the cluster cache within {} s; log: {}",
                PUBLISH_WAIT.as_secs(),
                a.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let publish_wait = started.elapsed();
    tracing::info!(secs = publish_wait.as_secs_f64(), "two nodes: node A published the layer");
    let (_b, b_pull, b_row) = cold("B")?;
    drop(a);
    Ok((TwoNodes { a: a_row, b: b_row, publish_wait }, [a_pull, b_pull]))
}

/// What N pulls released together got.
struct Together {
    wall: Duration,
    /// The hashed pull (client 0), if it succeeded.
    hashed: Option<client::Pull>,
    ok: Vec<client::Pull>,
    failures: Vec<String>,
}

impl Together {
    fn bytes(&self) -> u64 {
        self.ok.iter().map(|p| p.bytes).sum()
    }

    fn check(&self, world: &World, what: &str, inst: &Instance, verified: &mut Vec<String>) -> anyhow::Result<()> {
        if !self.failures.is_empty() {
            tracing::warn!(
                "{what}: {} of {} pulls failed, first: {}; log: {}",
                self.failures.len(),
                self.failures.len() + self.ok.len(),
                self.failures[0],
                inst.log_tail()
            );
        }
        match &self.hashed {
            Some(pull) => {
                verify(world, &format!("{what} (client 1 of {})", self.failures.len() + self.ok.len()), pull, verified)
            }
            None => Ok(()),
        }
    }
}

/// `n` pulls released at once (client 0's hashed); wall time until the last is done.
fn pull_together(addr: SocketAddr, path: &str, n: usize) -> anyhow::Result<Together> {
    let barrier = Barrier::new(n + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    client::pull(addr, path, i == 0)
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let mut t = Together { wall: Duration::ZERO, hashed: None, ok: Vec::new(), failures: Vec::new() };
        for (i, h) in handles.into_iter().enumerate() {
            match h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))? {
                Ok(pull) if i == 0 => {
                    t.hashed = Some(pull.clone());
                    t.ok.push(pull);
                }
                Ok(pull) => t.ok.push(pull),
                Err(e) => t.failures.push(format!("{e:#}")),
            }
        }
        t.wall = started.elapsed();
        Ok(t)
    })
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    let mut argv = format!("`{}`", args.join(" "));
    if let Ok(extra) = std::env::var(systems::FACADE_CONFIG_ENV) {
        argv = format!("`{}='{extra}'` {argv}", systems::FACADE_CONFIG_ENV);
    }
    // make exports MAKELEVEL to the commands it runs.
    if std::env::var_os("MAKELEVEL").is_some() { format!("`make bench` (ran {argv})") } else { argv }
}

fn versions() -> String {
    let out = |bin: &str, arg: &str| {
        std::process::Command::new(bin)
            .arg(arg)
            .output()
            .map(|o| {
                let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|e| format!("{bin}: {e}"))
    };
    format!(
        "{}; {}; {}; {}",
        out(test_support::registry::REGISTRY_BIN, "--version"),
        out(wrk::WRK_BIN, "-v"),
        // curl's first line goes on to list every library it links.
        out(curl::CURL_BIN, "--version").split_whitespace().take(2).collect::<Vec<_>>().join(" "),
        out("containerd", "--version")
    )
}
