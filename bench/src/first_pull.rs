//! The first pull of a workspace image as a node does it: a real containerd (`ctr images pull`,
//! fetch and unpack with the `native` snapshotter) pulling a cold image of ten layers through the
//! facade, the distribution pull-through cache and the upstream directly, on loopback as is and
//! with the upstream "remote" (every connection to it limited to a WAN-like rate, see
//! `rate_proxy.rs`). Every cold pull starts from nothing: a fresh containerd (root, content store
//! and snapshots in a new temp dir), a fresh facade store, fresh distribution storage. Then warm
//! pulls (a fresh containerd against the same facade or cache) and, when the facade has its
//! warm-up API, a pull after `POST /v1/workspaces/<provider>/<id>/prepare` has finished.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use test_support::containerd::{Containerd, SNAPSHOTTER, chain_id};
use test_support::image::{BuiltImage, BuiltLayer, FileEntry, ImageBuilder, LayerCompression, build_layer};
use test_support::proc::run_bytes;
use test_support::registry::Registry;

use crate::client;
use crate::rate_proxy::RateProxy;
use crate::report::{FirstPull, Prepared, SettingResult, SystemRuns};
use crate::systems::{self, FacadeProc, WORKSPACE};

const MIB: u64 = 1 << 20;
/// The repository the three images live in: `base` (the workspace's base image), `ide` (its IDE
/// image) and `ws` (both stacked, the same layers the facade composes, for the systems that
/// cannot compose).
const REPO: &str = "fp/img";
/// The kubelet's containerd fetches at most this many layers of one image at once (the CRI
/// plugin's `max_concurrent_downloads` default); `ctr` alone would fetch all of them.
const CONCURRENT_DOWNLOADS: &str = "3";
/// Longest one `ctr images pull` may take (270 MiB at a remote-like rate, with room).
const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a warm-up may take before the row gives up on it.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);

/// What the first-pull section pulls and how often.
#[derive(Clone, Debug)]
pub struct Params {
    /// Base image layers.
    pub base_layers: usize,
    /// Size of each base layer, MiB.
    pub base_layer_mib: u64,
    /// Sizes of the IDE image's layers, MiB.
    pub ide_layer_mib: Vec<u64>,
    /// Cold pulls per system and setting.
    pub cold_reps: usize,
    /// Warm pulls per caching system and setting.
    pub warm_reps: usize,
    /// The per-connection rate of the "remote" setting, bytes per second.
    pub remote_rate: u64,
}

impl Params {
    /// The image (eight 32 MiB base layers, an IDE of two), or a small one for `--quick`.
    pub fn new(quick: bool) -> Params {
        Params {
            base_layers: 8,
            base_layer_mib: if quick { 4 } else { 32 },
            ide_layer_mib: if quick { vec![3, 1] } else { vec![12, 2] },
            cold_reps: if quick { 1 } else { 3 },
            warm_reps: if quick { 1 } else { 2 },
            remote_rate: 24 * MIB,
        }
    }
}

/// The images, pushed to the upstream.
struct Images {
    /// Every layer, base first, in the order the composed image has them.
    layers: Vec<BuiltLayer>,
    /// The chain ID containerd must end up with (the top snapshot of all ten layers).
    chain_id: String,
    bytes: u64,
}

fn build_and_push(upstream: &Registry, p: &Params) -> anyhow::Result<Images> {
    let mut layers = Vec::new();
    for i in 0..p.base_layers {
        let data = crate::noise(p.base_layer_mib * MIB, 100 + i as u64);
        layers.push(build_layer(&[FileEntry::file(format!("base/layer-{i}.bin"), data)], LayerCompression::None));
    }
    for (i, mib) in p.ide_layer_mib.iter().enumerate() {
        let data = crate::noise(mib * MIB, 200 + i as u64);
        layers.push(build_layer(&[FileEntry::file(format!("ide/part-{i}.bin"), data)], LayerCompression::None));
    }
    let image = |ls: &[BuiltLayer]| -> BuiltImage {
        let mut b = ImageBuilder::new().env(["PATH=/usr/local/bin:/usr/bin:/bin"]);
        for l in ls {
            b = b.layer(l.clone());
        }
        b.build()
    };
    let (base, ide, ws) = (image(&layers[..p.base_layers]), image(&layers[p.base_layers..]), image(&layers));
    for l in &layers {
        upstream.push_blob(REPO, &l.bytes).context("pushing a layer")?;
    }
    for (tag, img) in [("base", &base), ("ide", &ide), ("ws", &ws)] {
        upstream.push_blob(REPO, &img.config).context("pushing a config")?;
        upstream
            .push_manifest(REPO, tag, facade_oci::media_types::OCI_MANIFEST, &img.manifest)
            .with_context(|| format!("pushing {REPO}:{tag}"))?;
    }
    let diff_ids: Vec<facade_oci::Digest> =
        layers.iter().map(|l| l.diff_id.parse()).collect::<Result<_, _>>().context("diff ids")?;
    let chain_id = chain_id(&diff_ids).context("no layers")?;
    let bytes = layers.iter().map(|l| l.size).sum();
    Ok(Images { layers, chain_id, bytes })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Facade,
    Distribution,
    Direct,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Facade => "facade",
            System::Distribution => "distribution",
            System::Direct => "direct",
        }
    }
}

/// A system's running instance (none for direct), what containerd pulls from it, and the
/// facade's admin listener.
struct Serving {
    facade: Option<FacadeProc>,
    dist: Option<(Registry, u32)>,
    image: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        // As in main.rs: stop the distribution registry before its directory goes.
        if let Some((reg, _)) = self.dist.as_mut() {
            reg.stop();
        }
    }
}

impl Serving {
    fn start(system: System, upstream: &str, bin: &Path, admin: bool) -> anyhow::Result<Serving> {
        Ok(match system {
            System::Facade => {
                let spec =
                    json!({"baseRef": format!("{upstream}/{REPO}:base"), "ideRef": format!("{upstream}/{REPO}:ide")});
                let f = FacadeProc::start_spec(bin, &spec, serde_json::Map::new(), admin)?;
                let image = format!("{}/fixed/{WORKSPACE}:latest", f.addr);
                Serving { facade: Some(f), dist: None, image }
            }
            System::Distribution => {
                let (reg, pid) = systems::start_distribution_proxy(upstream)?;
                let image = format!("{}/{REPO}:ws", reg.addr);
                Serving { facade: None, dist: Some((reg, pid)), image }
            }
            System::Direct => Serving { facade: None, dist: None, image: format!("{upstream}/{REPO}:ws") },
        })
    }

    fn log_tail(&self) -> String {
        match (&self.facade, &self.dist) {
            (Some(f), _) => f.log_tail(),
            (_, Some((r, _))) => {
                let log = r.log();
                log.get(log.len().saturating_sub(1500)..).unwrap_or("").to_string()
            }
            _ => String::new(),
        }
    }
}

/// One timed `ctr images pull` into a fresh containerd; checks the chain ID of what it unpacked.
fn ctr_pull(image: &str, want_chain: &str) -> anyhow::Result<Duration> {
    let ctrd = Containerd::start().context("starting containerd")?;
    let mut cmd = ctrd.ctr();
    cmd.args(["images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER]);
    cmd.args(["--max-concurrent-downloads", CONCURRENT_DOWNLOADS, "--print-chainid", image]);
    let started = Instant::now();
    let out = run_bytes(cmd, PULL_TIMEOUT);
    let took = started.elapsed();
    let out = out.map_err(|e| {
        let log = ctrd.log();
        anyhow::anyhow!(
            "ctr pull {image}: {e:#}; containerd log: {}",
            log.get(log.len().saturating_sub(1500)..).unwrap_or("")
        )
    })?;
    let out = String::from_utf8_lossy(&out);
    let got = out.lines().find_map(|l| l.trim().strip_prefix("image chain ID: ")).map(str::trim);
    if got != Some(want_chain) {
        bail!("ctr pull {image}: chain ID {got:?}, the image's is {want_chain}");
    }
    Ok(took)
}

/// The whole section. Errors that make it meaningless (no containerd, no root, a push that
/// fails) come back as `Err` for the report; a system whose pull fails is a finding, counted in
/// its row.
pub fn run(upstream: &Registry, bin: &Path, p: &Params) -> Result<FirstPull, String> {
    if !Containerd::available() {
        return Err("containerd and ctr must be installed and the bench run as root".into());
    }
    tracing::info!("first pull: building and pushing the workspace image");
    let images = build_and_push(upstream, p).map_err(|e| format!("{e:#}"))?;
    let mut out = FirstPull {
        layers: images.layers.len(),
        image_bytes: images.bytes,
        settings: Vec::new(),
        cold_reps: p.cold_reps,
        warm_reps: p.warm_reps,
    };
    for remote in [false, true] {
        let proxy = if remote {
            Some(RateProxy::start(upstream.addr, p.remote_rate).map_err(|e| format!("rate proxy: {e:#}"))?)
        } else {
            None
        };
        let host = proxy.as_ref().map_or_else(|| upstream.host(), RateProxy::host);
        let name = if remote {
            format!("remote ({} MiB/s per upstream connection)", p.remote_rate / MIB)
        } else {
            "loopback".to_string()
        };
        out.settings.push(setting(&name, &host, proxy.as_ref(), bin, p, &images));
    }
    Ok(out)
}

fn setting(
    name: &str,
    host: &str,
    proxy: Option<&RateProxy>,
    bin: &Path,
    p: &Params,
    images: &Images,
) -> SettingResult {
    let mut r = SettingResult { name: name.to_string(), ..SettingResult::default() };
    let systems = [System::Facade, System::Distribution, System::Direct];
    let mut last: [Option<Serving>; 2] = [None, None];
    for rep in 0..p.cold_reps {
        // Interleaved, so whatever else the machine does weighs on every system alike.
        for system in systems {
            tracing::info!("first pull, {name}: {} cold {}/{}", system.name(), rep + 1, p.cold_reps);
            let runs = runs_of(&mut r, system);
            let before = proxy.map_or((0, 0), |p| (p.bytes_to_client(), p.connections()));
            let serving = match Serving::start(system, host, bin, false) {
                Ok(s) => s,
                Err(e) => {
                    runs.failures.push(format!("start: {e:#}"));
                    continue;
                }
            };
            match ctr_pull(&serving.image, &images.chain_id) {
                Ok(t) => {
                    runs.cold.push(t.as_secs_f64());
                    runs.upstream = proxy.map(|p| (p.bytes_to_client() - before.0, p.connections() - before.1));
                }
                Err(e) => runs.failures.push(format!("{e:#}; server log: {}", serving.log_tail())),
            }
            match system {
                System::Facade => last[0] = Some(serving),
                System::Distribution => last[1] = Some(serving),
                System::Direct => {}
            }
        }
    }
    // Warm: the last instance of each caching system again, each pull into a fresh containerd.
    for (i, system) in [System::Facade, System::Distribution].into_iter().enumerate() {
        let Some(serving) = &last[i] else { continue };
        for rep in 0..p.warm_reps {
            tracing::info!("first pull, {name}: {} warm {}/{}", system.name(), rep + 1, p.warm_reps);
            let runs = runs_of(&mut r, system);
            match ctr_pull(&serving.image, &images.chain_id) {
                Ok(t) => runs.warm.push(t.as_secs_f64()),
                Err(e) => runs.failures.push(format!("warm: {e:#}; server log: {}", serving.log_tail())),
            }
        }
    }
    drop(last);
    r.prepared = Some(prepare_then_pull(name, host, bin, images));
    r
}

fn runs_of(r: &mut SettingResult, system: System) -> &mut SystemRuns {
    match system {
        System::Facade => &mut r.facade,
        System::Distribution => &mut r.dist,
        System::Direct => &mut r.direct,
    }
}

/// A fresh facade, warmed up through its admin API until its progress says done, then one
/// timed pull into a fresh containerd. `Err` carries what the row shows instead: "n/a (no
/// warm-up API)" when the facade answers the warm-up route with 404 for a workspace it serves.
fn prepare_then_pull(name: &str, host: &str, bin: &Path, images: &Images) -> Result<Prepared, String> {
    tracing::info!("first pull, {name}: facade warm-up, then a pull");
    let serving = Serving::start(System::Facade, host, bin, true).map_err(|e| format!("start: {e:#}"))?;
    let Some(f) = &serving.facade else { return Err("no facade".into()) };
    let Some(admin) = f.admin else { return Err("no admin listener".into()) };
    let started = Instant::now();
    let prepare_path = format!("/v1/workspaces/fixed/{WORKSPACE}/prepare");
    let answer = client::admin(admin, "POST", &prepare_path).map_err(|e| format!("POST {prepare_path}: {e:#}"))?;
    match answer.status {
        200..=299 => {}
        // The workspace is served (the cold rows pulled it), so a 404 here is the route missing,
        // as on a facade without the warm-up API: the row says so instead of failing.
        404 | 405 => return Err("n/a (no warm-up API)".into()),
        s => return Err(format!("POST {prepare_path}: {s} {}", String::from_utf8_lossy(&answer.body))),
    }
    let progress_path = format!("/v1/workspaces/fixed/{WORKSPACE}/progress");
    let (polls, last) = wait_prepared(admin, &progress_path).map_err(|e| format!("{e:#}; log: {}", f.log_tail()))?;
    let prepare = started.elapsed();
    let pull = ctr_pull(&serving.image, &images.chain_id).map_err(|e| format!("pull after prepare: {e:#}"))?;
    Ok(Prepared { prepare: prepare.as_secs_f64(), pull: pull.as_secs_f64(), polls, bytes_done: last })
}

/// Polls progress every 100 ms until it reports done; returns the number of polls and the bytes
/// done it reported last.
fn wait_prepared(admin: SocketAddr, path: &str) -> anyhow::Result<(usize, u64)> {
    let deadline = Instant::now() + PREPARE_TIMEOUT;
    let mut polls = 0;
    loop {
        polls += 1;
        let r = client::admin(admin, "GET", path)?;
        if r.status != 200 {
            bail!("GET {path}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        }
        let v: Value = serde_json::from_slice(&r.body).with_context(|| format!("GET {path}: not JSON"))?;
        match progress_state(&v) {
            Progress::Done(bytes) => return Ok((polls, bytes)),
            Progress::Failed(why) => bail!("warm-up failed: {why}"),
            Progress::Running => {}
        }
        if Instant::now() >= deadline {
            bail!("warm-up not done after {PREPARE_TIMEOUT:?}; last progress: {v}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, PartialEq)]
enum Progress {
    Done(u64),
    Failed(String),
    Running,
}

/// Reads a progress document: done when its state says so (or, without a state, when its
/// totals have every byte); failed when its state or a layer's says so.
fn progress_state(v: &Value) -> Progress {
    let field = |o: &Value, names: &[&str]| names.iter().find_map(|n| o.get(*n).cloned());
    // The totals as an object of their own, or at the top of the document.
    let totals = field(v, &["totals", "total"]).unwrap_or_else(|| v.clone());
    let done = field(&totals, &["bytesDone", "bytes_done"]).and_then(|x| x.as_u64());
    let total = field(&totals, &["bytesTotal", "bytes_total"]).and_then(|x| x.as_u64());
    let state = field(v, &["state", "status"]).and_then(|s| s.as_str().map(str::to_ascii_lowercase));
    if let Some(s) = state.as_deref()
        && matches!(s, "failed" | "error" | "stopped")
    {
        return Progress::Failed(
            field(v, &["error", "lastError", "last_error"]).map_or(v.to_string(), |e| e.to_string()),
        );
    }
    let layers = field(v, &["layers"]).and_then(|l| l.as_array().cloned()).unwrap_or_default();
    if let Some(l) = layers.iter().find(|l| {
        field(l, &["state"]).and_then(|s| s.as_str().map(str::to_ascii_lowercase)).as_deref() == Some("failed")
    }) {
        return Progress::Failed(l.to_string());
    }
    // A state, when there is one, decides: bytes may all be there before the last layer is
    // verified and stored. Without one, every byte there is done.
    let finished = match state.as_deref() {
        Some(s) => matches!(s, "done" | "complete" | "completed" | "ready"),
        None => matches!((done, total), (Some(d), Some(t)) if t > 0 && d >= t),
    };
    if finished { Progress::Done(done.unwrap_or(0)) } else { Progress::Running }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_progress_documents() {
        let running = json!({"totals": {"bytesDone": 5, "bytesTotal": 10}, "layers": [{"state": "running"}]});
        assert_eq!(progress_state(&running), Progress::Running);
        let done = json!({"totals": {"bytesDone": 10, "bytesTotal": 10}, "layers": [{"state": "done"}]});
        assert_eq!(progress_state(&done), Progress::Done(10));
        assert_eq!(progress_state(&json!({"state": "done", "totals": {"bytes_done": 3}})), Progress::Done(3));
        let top = json!({"state": "running", "bytesDone": 4, "bytesTotal": 8, "layers": [{"state": "running"}]});
        assert_eq!(progress_state(&top), Progress::Running);
        let top = json!({"state": "done", "bytesDone": 8, "bytesTotal": 8, "layers": [{"state": "done"}]});
        assert_eq!(progress_state(&top), Progress::Done(8));
        assert!(matches!(progress_state(&json!({"state": "stopped", "bytesDone": 1})), Progress::Failed(_)));
        assert!(matches!(progress_state(&json!({"state": "failed", "error": "x"})), Progress::Failed(_)));
        let layer_failed = json!({"totals": {"bytesDone": 1, "bytesTotal": 10}, "layers": [{"state": "failed"}]});
        assert!(matches!(progress_state(&layer_failed), Progress::Failed(_)));
        // Nothing known yet (0 of 0) is not done.
        assert_eq!(progress_state(&json!({"totals": {"bytesDone": 0, "bytesTotal": 0}})), Progress::Running);
    }
}
