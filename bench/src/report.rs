//! Turns measurements into the table of ratios and `RESULTS.md`. Every ratio and every
//! "target met" is computed here from the numbers measured in this run.

use std::fmt::Write as _;
use std::time::Duration;

use crate::client::Pull;
use crate::curl::CurlPull;
use crate::load::LoadResult;
use crate::wrk::WrkResult;

const MIB: f64 = 1048576.0;

/// Timed pulls of one system in one state (cold or warm).
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Bytes per second of each pull.
    pub throughput: Vec<f64>,
    /// Seconds to the first body byte of each pull.
    pub ttfb: Vec<f64>,
    /// Seconds between the last-but-one and the last body byte of each pull.
    pub last_byte_wait: Vec<f64>,
    /// Body bytes of all pulls.
    pub bytes: u64,
    /// Server CPU time over all pulls, nanoseconds (0: not measured).
    pub cpu_ns: u64,
}

impl Series {
    /// Adds one pull.
    pub fn push(&mut self, p: &Pull) {
        self.throughput.push(p.throughput());
        self.ttfb.push(p.ttfb.as_secs_f64());
        self.last_byte_wait.push(p.last_byte_wait.as_secs_f64());
        self.bytes += p.bytes;
    }

    /// Adds server CPU time.
    pub fn add_cpu_ns(&mut self, ns: u64) {
        self.cpu_ns += ns;
    }

    /// Server CPU milliseconds per GiB served, if measured.
    pub fn cpu_ms_per_gib(&self) -> Option<f64> {
        (self.cpu_ns > 0 && self.bytes > 0).then(|| self.cpu_ns as f64 / 1e6 / (self.bytes as f64 / (MIB * 1024.0)))
    }

    /// Median throughput.
    pub fn median_throughput(&self) -> f64 {
        median(&self.throughput)
    }

    /// Best throughput.
    pub fn best_throughput(&self) -> f64 {
        self.throughput.iter().copied().fold(0.0, f64::max)
    }

    /// Median time to first byte, seconds.
    pub fn median_ttfb(&self) -> f64 {
        median(&self.ttfb)
    }
}

/// The median (mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// N clients pulling the same cold layer at once, then again warm.
#[derive(Clone, Debug, Default)]
pub struct Concurrent {
    /// Start (all clients released together) → last client done.
    pub wall: Duration,
    /// Body bytes the successful pulls received.
    pub bytes: u64,
    /// The pulls that failed, with why.
    pub failures: Vec<String>,
    /// Bytes the upstream sent to this system meanwhile (its counting proxy).
    pub upstream_bytes: u64,
    /// Upstream `GET …/blobs/<layer>` requests meanwhile.
    pub upstream_gets: usize,
    /// `VmHWM` of the (fresh) process right after the cold pulls.
    pub peak_rss: u64,
    /// Largest `VmRSS` sampled every 5 ms during the cold pulls.
    pub sampled_rss: u64,
    /// The same N pulls again, now warm.
    pub warm_wall: Duration,
    /// Body bytes the successful warm pulls received.
    pub warm_bytes: u64,
    /// The warm pulls that failed.
    pub warm_failures: Vec<String>,
    /// `VmHWM` after the warm pulls too.
    pub peak_rss_after_warm: u64,
}

/// Everything one system yielded.
#[derive(Clone, Debug, Default)]
pub struct SystemResult {
    /// Cold pulls, each from a fresh instance.
    pub cold: Series,
    /// Warm pulls from the last instance.
    pub warm: Series,
    /// Manifest HEAD by tag under load.
    pub head: Option<LoadResult>,
    /// Manifest GET by tag under wrk.
    pub get: Option<WrkResult>,
    /// The concurrent run.
    pub concurrent: Concurrent,
    /// Largest `VmHWM` of all instances of this system.
    pub peak_rss_whole_run: u64,
}

/// One node's cold pull in the two-node run.
#[derive(Clone, Debug, Default)]
pub struct NodePull {
    /// Blob GET: request written → last body byte.
    pub total: Duration,
    /// Body bytes.
    pub bytes: u64,
    /// Bytes the upstream sent from the node's start to the end of its pull (manifest included).
    pub upstream_bytes: u64,
    /// Upstream `GET …/blobs/<layer>` requests meanwhile.
    pub upstream_gets: usize,
    /// Upstream requests of any kind meanwhile.
    pub upstream_requests: usize,
}

impl NodePull {
    /// Bytes per second of the blob GET.
    pub fn throughput(&self) -> f64 {
        self.bytes as f64 / self.total.as_secs_f64().max(1e-9)
    }
}

/// The cluster cache across nodes: a second node's cold pull against the first's, through the cluster cache.
#[derive(Clone, Debug, Default)]
pub struct TwoNodes {
    /// Node A: empty store, empty cluster cache.
    pub a: NodePull,
    /// Node B: empty store, the layer in the cluster cache.
    pub b: NodePull,
    /// Node A's pull done → the layer's index entry in Redis.
    pub publish_wait: Duration,
}

/// The run's parameters.
#[derive(Clone, Debug)]
pub struct Params {
    /// Layer payload size, MiB.
    pub layer_mib: u64,
    /// Timed cold pulls per system (each on a fresh instance), plus one hashed verification pull.
    pub cold_reps: usize,
    /// Timed warm pulls per system, plus a hashed one before and after.
    pub warm_reps: usize,
    /// Seconds of each wrk run.
    pub wrk_secs: u32,
    /// Clients in the concurrent run.
    pub concurrency: usize,
    /// `--quick`.
    pub quick: bool,
}

/// One system's `ctr` pulls in one setting of the first-pull section.
#[derive(Clone, Debug, Default)]
pub struct SystemRuns {
    /// Cold pulls (fresh containerd, fresh system), seconds.
    pub cold: Vec<f64>,
    /// Warm pulls (fresh containerd, the system's cache filled), seconds.
    pub warm: Vec<f64>,
    /// Pulls that failed, with why.
    pub failures: Vec<String>,
    /// Bytes the upstream sent during the last cold pull, and the connections it took (remote
    /// setting only: its proxy counts).
    pub upstream: Option<(u64, u64)>,
}

/// The facade warmed up through its admin API, then pulled.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// `POST …/prepare` → progress says done, seconds.
    pub prepare: f64,
    /// The `ctr` pull after it, seconds.
    pub pull: f64,
    /// Progress requests made.
    pub polls: usize,
    /// Bytes done in the last progress answer.
    pub bytes_done: u64,
}

/// One setting (loopback, remote) of the first-pull section.
#[derive(Clone, Debug, Default)]
pub struct SettingResult {
    /// Its name as the table shows it.
    pub name: String,
    /// The facade.
    pub facade: SystemRuns,
    /// The distribution pull-through cache.
    pub dist: SystemRuns,
    /// The upstream itself.
    pub direct: SystemRuns,
    /// The after-prepare row (`Err`: why it has no figures).
    pub prepared: Option<Result<Prepared, String>>,
}

/// containerd's first pull of a ten-layer workspace image.
#[derive(Clone, Debug, Default)]
pub struct FirstPull {
    /// Layers in the image.
    pub layers: usize,
    /// Their bytes.
    pub image_bytes: u64,
    /// Loopback, then remote.
    pub settings: Vec<SettingResult>,
    /// Cold pulls per system and setting.
    pub cold_reps: usize,
    /// Warm pulls per caching system and setting.
    pub warm_reps: usize,
}

/// curl pulls of the layer.
#[derive(Clone, Debug, Default)]
pub struct CurlResults {
    /// Facade, each on a fresh instance.
    pub facade_cold: Vec<CurlPull>,
    /// Distribution proxy, each on a fresh instance.
    pub dist_cold: Vec<CurlPull>,
    /// Facade, the last instance again.
    pub facade_warm: Vec<CurlPull>,
    /// Distribution proxy, the last instance again.
    pub dist_warm: Vec<CurlPull>,
    /// The upstream itself.
    pub direct: Vec<CurlPull>,
    /// The copy server.
    pub copy: Vec<CurlPull>,
}

/// All measurements.
#[derive(Clone, Debug, Default)]
pub struct Results {
    /// Whether the streaming section (the targets) ran; `--only` may leave it out.
    pub streams_ran: bool,
    /// The curl rows (`Err`: why they did not run; `None`: not asked for).
    pub curl: Option<Result<CurlResults, String>>,
    /// containerd's first pull (`Err`: why it did not run; `None`: not asked for).
    pub first_pull: Option<Result<FirstPull, String>>,
    /// The layer blob's size in bytes.
    pub layer_size: u64,
    /// The layer digest.
    pub layer_digest: String,
    /// The copy server (warm by nature).
    pub copy: Series,
    /// The upstream registry itself.
    pub direct: Series,
    /// The upstream registry through a counting proxy (the path every cold pull takes).
    pub direct_via_proxy: Series,
    /// Manifest HEAD by tag on the upstream, under load.
    pub direct_head: Option<LoadResult>,
    /// Manifest GET by tag on the upstream, under wrk.
    pub direct_get: Option<WrkResult>,
    /// The facade.
    pub facade: SystemResult,
    /// The distribution pull-through cache.
    pub dist: SystemResult,
    /// Verification pulls whose sha256 matched.
    pub verified: Vec<String>,
    /// The two-node run (`Err`: why it did not run or failed; `None`: not measured).
    pub two_nodes: Option<Result<TwoNodes, String>>,
    /// The herd (`Err`: why it did not run; `None`: not asked for).
    pub herd: Option<Result<crate::herd::Herd, String>>,
}

/// One line of the table.
struct Row {
    what: String,
    facade: String,
    dist: String,
    direct: String,
    copy: String,
    ratio: String,
    target: String,
    met: String,
}

/// Whether every target was met, and how many there are.
pub struct Verdict {
    /// Targets met.
    pub met: usize,
    /// Targets in all.
    pub total: usize,
}

fn gbps(bytes_per_sec: f64) -> String {
    format!("{:.2} GB/s", bytes_per_sec / 1e9)
}

fn ms(secs: f64) -> String {
    format!("{:.1} ms", secs * 1e3)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

fn head_rps(l: &Option<LoadResult>) -> String {
    let Some(l) = l else { return "–".into() };
    let mut s = format!("{:.0} req/s", l.rps);
    if l.non_2xx > 0 {
        let _ = write!(s, " ({} non-2xx!)", l.non_2xx);
    }
    if l.errors > 0 {
        let _ = write!(s, " ({} errors!)", l.errors);
    }
    s
}

fn wrk_rps(w: &Option<WrkResult>) -> String {
    let Some(w) = w else { return "–".into() };
    let mut s = format!("{:.0} req/s", w.rps);
    if w.non_2xx > 0 {
        let _ = write!(s, " ({} non-2xx!)", w.non_2xx);
    }
    if let Some(e) = &w.socket_errors {
        let _ = write!(s, " (socket errors: {e})");
    }
    s
}

/// The first line of an error, short enough for a table cell.
fn short(e: &str) -> String {
    let line = e.lines().next().unwrap_or("").replace('|', "/");
    if line.chars().count() > 120 { format!("{}…", line.chars().take(120).collect::<String>()) } else { line }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::INFINITY }
}

fn rows(r: &Results, p: &Params) -> (Vec<Row>, Verdict) {
    let (f, d) = (&r.facade, &r.dist);
    let mut verdict = Verdict { met: 0, total: 0 };
    let mut check = |ok: bool| {
        verdict.total += 1;
        verdict.met += usize::from(ok);
        yes_no(ok)
    };
    let dash = || "–".to_string();
    let mut rows = Vec::new();

    let fw = f.warm.median_throughput();
    let (vs_copy, vs_dist) = (ratio(fw, r.copy.median_throughput()), ratio(fw, d.warm.median_throughput()));
    let met = format!("{} / {}", check(vs_copy >= 0.9), check(vs_dist >= 2.0));
    rows.push(Row {
        what: format!("Warm single-stream throughput, median of {} (best)", p.warm_reps),
        facade: format!("{} ({})", gbps(fw), gbps(f.warm.best_throughput())),
        dist: format!("{} ({})", gbps(d.warm.median_throughput()), gbps(d.warm.best_throughput())),
        direct: format!("{} ({})", gbps(r.direct.median_throughput()), gbps(r.direct.best_throughput())),
        copy: format!("{} ({})", gbps(r.copy.median_throughput()), gbps(r.copy.best_throughput())),
        ratio: format!("{vs_copy:.2}× copy / {vs_dist:.2}× dist"),
        target: "≥ 0.9× copy / ≥ 2× dist".into(),
        met,
    });

    let cpu = |x: &Series| x.cpu_ms_per_gib().map_or("–".to_string(), |v| format!("{v:.0}"));
    let cpu_ratio = |a: &Series, b: &Series| match (a.cpu_ms_per_gib(), b.cpu_ms_per_gib()) {
        (Some(a), Some(b)) => format!("{:.2}×", a / b),
        _ => "–".into(),
    };
    rows.push(Row {
        what: "Server CPU time per GiB served, ms: warm / cold".into(),
        facade: format!("{} / {}", cpu(&f.warm), cpu(&f.cold)),
        dist: format!("{} / {}", cpu(&d.warm), cpu(&d.cold)),
        direct: cpu(&r.direct),
        copy: cpu(&r.copy),
        ratio: format!(
            "warm: facade / copy = {}, facade / dist = {}; cold: facade / dist = {}",
            cpu_ratio(&f.warm, &r.copy),
            cpu_ratio(&f.warm, &d.warm),
            cpu_ratio(&f.cold, &d.cold)
        ),
        target: dash(),
        met: dash(),
    });

    let fc = f.cold.median_throughput();
    rows.push(Row {
        what: format!("Cold single-stream throughput, median of {}", p.cold_reps),
        facade: gbps(fc),
        dist: gbps(d.cold.median_throughput()),
        direct: format!(
            "{} (via a counting proxy: {})",
            gbps(r.direct.median_throughput()),
            gbps(r.direct_via_proxy.median_throughput())
        ),
        copy: dash(),
        ratio: format!(
            "{:.2}× dist / {:.2}× direct via proxy",
            ratio(fc, d.cold.median_throughput()),
            ratio(fc, r.direct_via_proxy.median_throughput())
        ),
        target: dash(),
        met: dash(),
    });

    rows.push(Row {
        what: format!("Cold wait for the last byte after all others, median of {}", p.cold_reps),
        facade: ms(median(&f.cold.last_byte_wait)),
        dist: ms(median(&d.cold.last_byte_wait)),
        direct: dash(),
        copy: dash(),
        ratio: "the facade holds the last byte back until the digest checks out".into(),
        target: dash(),
        met: dash(),
    });

    let delta = f.cold.median_ttfb() - r.direct.median_ttfb();
    rows.push(Row {
        what: format!("Cold time to first byte, median of {}", p.cold_reps),
        facade: ms(f.cold.median_ttfb()),
        dist: ms(d.cold.median_ttfb()),
        direct: ms(r.direct.median_ttfb()),
        copy: ms(r.copy.median_ttfb()),
        ratio: format!("facade − direct = {:+.1} ms", delta * 1e3),
        target: "≤ +20 ms".into(),
        met: check(delta <= 0.020).into(),
    });

    rows.push(Row {
        what: format!("Warm time to first byte, median of {}", p.warm_reps),
        facade: ms(f.warm.median_ttfb()),
        dist: ms(d.warm.median_ttfb()),
        direct: ms(r.direct.median_ttfb()),
        copy: ms(r.copy.median_ttfb()),
        ratio: format!("facade − copy = {:+.1} ms", (f.warm.median_ttfb() - r.copy.median_ttfb()) * 1e3),
        target: dash(),
        met: dash(),
    });

    let (fcon, dcon) = (&f.concurrent, &d.concurrent);
    let layer = r.layer_size as f64;
    let up_ratio = fcon.upstream_bytes as f64 / layer;
    let gets = |n: usize| if n == 1 { "1 GET".to_string() } else { format!("{n} GETs") };
    rows.push(Row {
        what: format!("{} concurrent cold pulls: upstream bytes (blob GETs)", p.concurrency),
        facade: format!("{} = {:.3}× ({})", mib(fcon.upstream_bytes), up_ratio, gets(fcon.upstream_gets)),
        dist: format!(
            "{} = {:.3}× ({})",
            mib(dcon.upstream_bytes),
            dcon.upstream_bytes as f64 / layer,
            gets(dcon.upstream_gets)
        ),
        direct: dash(),
        copy: dash(),
        ratio: format!("{up_ratio:.3}× layer"),
        // Response heads come on top of the layer bytes; 1 % covers them and no second copy.
        target: "1× layer (< 1.01×)".into(),
        met: check(fcon.failures.is_empty() && fcon.upstream_bytes >= r.layer_size && up_ratio < 1.01).into(),
    });

    let wall = |wall: Duration, bytes: u64, failures: &[String]| {
        let mut s = format!("{:.2} s ({})", wall.as_secs_f64(), gbps(bytes as f64 / wall.as_secs_f64().max(1e-9)));
        if let Some(first) = failures.first() {
            let _ = write!(s, "; **{} of {} failed**: {}", failures.len(), p.concurrency, short(first));
        }
        s
    };
    rows.push(Row {
        what: format!("{} concurrent cold pulls: wall time (aggregate)", p.concurrency),
        facade: wall(fcon.wall, fcon.bytes, &fcon.failures),
        dist: wall(dcon.wall, dcon.bytes, &dcon.failures),
        direct: dash(),
        copy: dash(),
        ratio: format!("dist / facade = {:.2}×", ratio(dcon.wall.as_secs_f64(), fcon.wall.as_secs_f64())),
        target: dash(),
        met: dash(),
    });
    rows.push(Row {
        what: format!("{} concurrent warm pulls: wall time (aggregate)", p.concurrency),
        facade: wall(fcon.warm_wall, fcon.warm_bytes, &fcon.warm_failures),
        dist: wall(dcon.warm_wall, dcon.warm_bytes, &dcon.warm_failures),
        direct: dash(),
        copy: dash(),
        ratio: format!("dist / facade = {:.2}×", ratio(dcon.warm_wall.as_secs_f64(), fcon.warm_wall.as_secs_f64())),
        target: dash(),
        met: dash(),
    });

    rows.push(Row {
        what: format!("Peak RSS serving {} concurrent cold pulls (VmHWM; sampled VmRSS max)", p.concurrency),
        facade: format!("{} ({})", mib(fcon.peak_rss), mib(fcon.sampled_rss)),
        dist: format!("{} ({})", mib(dcon.peak_rss), mib(dcon.sampled_rss)),
        direct: dash(),
        copy: dash(),
        ratio: format!("{:.2}× of 64 MiB", fcon.peak_rss as f64 / (64.0 * MIB)),
        target: "< 64 MiB".into(),
        met: check(fcon.failures.is_empty() && (fcon.peak_rss as f64) < 64.0 * MIB).into(),
    });
    rows.push(Row {
        what: "Peak RSS over the whole run (max VmHWM of all instances)".into(),
        facade: mib(f.peak_rss_whole_run),
        dist: mib(d.peak_rss_whole_run),
        direct: dash(),
        copy: dash(),
        ratio: format!("{:.2}× of 64 MiB", f.peak_rss_whole_run as f64 / (64.0 * MIB)),
        target: dash(),
        met: dash(),
    });

    let (frps, drps) = (f.head.as_ref().map_or(0.0, |l| l.rps), d.head.as_ref().map_or(0.0, |l| l.rps));
    let clean = [&f.head, &d.head]
        .iter()
        .all(|l| l.as_ref().is_some_and(|l| l.requests > 0 && l.non_2xx == 0 && l.errors == 0));
    let vs = ratio(frps, drps);
    rows.push(Row {
        what: format!("Warm manifest HEAD by tag, 16 connections, {} s", p.wrk_secs),
        facade: head_rps(&f.head),
        dist: head_rps(&d.head),
        direct: head_rps(&r.direct_head),
        copy: dash(),
        ratio: format!("{vs:.1}× dist"),
        target: "≥ 10× dist".into(),
        met: check(clean && drps > 0.0 && vs >= 10.0).into(),
    });
    let (fget, dget) = (f.get.as_ref().map_or(0.0, |w| w.rps), d.get.as_ref().map_or(0.0, |w| w.rps));
    rows.push(Row {
        what: format!("Warm manifest GET by tag, `wrk -t2 -c16`, {} s (cross-check)", p.wrk_secs),
        facade: wrk_rps(&f.get),
        dist: wrk_rps(&d.get),
        direct: wrk_rps(&r.direct_get),
        copy: dash(),
        ratio: format!("{:.1}× dist", ratio(fget, dget)),
        target: dash(),
        met: dash(),
    });
    rows.push(two_nodes_row(&r.two_nodes));
    (rows, verdict)
}

/// Not one of the streaming targets (throughput, first byte, concurrent pulls, RSS, manifest
/// rate), so it does not count in the verdict.
fn two_nodes_row(t: &Option<Result<TwoNodes, String>>) -> Row {
    let dash = || "–".to_string();
    let mut row = Row {
        what: "Two nodes: second node pull vs first (Redis + IPFS), one cold blob GET each".into(),
        facade: dash(),
        dist: dash(),
        direct: dash(),
        copy: dash(),
        ratio: dash(),
        target: "B upstream bytes = 0 (cluster cache; not a streaming target)".into(),
        met: dash(),
    };
    match t {
        None => row.facade = "not measured".into(),
        Some(Err(e)) => row.facade = format!("**did not run**: {}", short(e)),
        Some(Ok(t)) => {
            let node = |n: &NodePull| {
                format!(
                    "{:.2} s ({}), upstream {} ({} blob GET{}, {} requests)",
                    n.total.as_secs_f64(),
                    gbps(n.throughput()),
                    mib(n.upstream_bytes),
                    n.upstream_gets,
                    if n.upstream_gets == 1 { "" } else { "s" },
                    n.upstream_requests
                )
            };
            row.facade = format!(
                "node A: {}; published to the cluster cache {:.1} s later; node B: {}",
                node(&t.a),
                t.publish_wait.as_secs_f64(),
                node(&t.b)
            );
            row.ratio = format!("B / A time = {:.2}×", ratio(t.b.total.as_secs_f64(), t.a.total.as_secs_f64()));
            row.met = yes_no(t.b.upstream_bytes == 0).into();
        }
    }
    row
}

/// The table, in markdown, and the verdict.
pub fn table(r: &Results, p: &Params) -> (String, Verdict) {
    let (rows, verdict) = rows(r, p);
    let mut t = String::new();
    t.push_str(
        "| Measurement | Facade | Distribution proxy | Direct upstream | Copy server | Ratio(s) | Target | Met |\n",
    );
    t.push_str("|---|---|---|---|---|---|---|---|\n");
    for row in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.what, row.facade, row.dist, row.direct, row.copy, row.ratio, row.target, row.met
        );
    }
    (t, verdict)
}

/// "4.12 s (4.01, 4.12, 4.30)": the median of `v` and every sample; "–" for none.
fn secs_median(v: &[f64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let all: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
    if v.len() == 1 { format!("{:.2} s", v[0]) } else { format!("{:.2} s ({})", median(v), all.join(", ")) }
}

fn time_ratio(a: &[f64], b: &[f64]) -> String {
    if a.is_empty() || b.is_empty() { "–".into() } else { format!("{:.2}×", ratio(median(a), median(b))) }
}

fn with_failures(cell: String, runs: &SystemRuns) -> String {
    match runs.failures.first() {
        None => cell,
        Some(f) => format!("{cell}; **{} failed**: {}", runs.failures.len(), short(f)),
    }
}

/// The first-pull section's table: wall time of `ctr images pull` (fetch and unpack) per
/// system, and the facade's time over the others' (below 1 is faster).
pub fn first_pull_table(fp: &Option<Result<FirstPull, String>>) -> String {
    let fp = match fp {
        None => return String::new(),
        Some(Err(e)) => return format!("First pull with containerd: **did not run**: {}\n", short(e)),
        Some(Ok(fp)) => fp,
    };
    let mut t = format!(
        "containerd `ctr images pull` (fetch + unpack, native snapshotter) of a cold workspace image of {} layers, {}; wall time, median (every run):\n\n",
        fp.layers,
        mib(fp.image_bytes)
    );
    t.push_str(
        "| Setting: pull | Facade | Distribution proxy | Direct upstream | Facade / direct | Facade / distribution |\n",
    );
    t.push_str("|---|---|---|---|---|---|\n");
    let up = |r: &SystemRuns| {
        r.upstream.map_or(String::new(), |(b, c)| format!("; upstream {} over {c} connections", mib(b)))
    };
    for s in &fp.settings {
        let (f, d, x) = (&s.facade, &s.dist, &s.direct);
        let _ = writeln!(
            t,
            "| {}: cold, {} per system | {} | {} | {} | {} | {} |",
            s.name,
            fp.cold_reps,
            with_failures(format!("{}{}", secs_median(&f.cold), up(f)), f),
            with_failures(format!("{}{}", secs_median(&d.cold), up(d)), d),
            with_failures(format!("{}{}", secs_median(&x.cold), up(x)), x),
            time_ratio(&f.cold, &x.cold),
            time_ratio(&f.cold, &d.cold),
        );
        let _ = writeln!(
            t,
            "| {}: warm (cache filled, fresh containerd), {} per system | {} | {} | – | {} | {} |",
            s.name,
            fp.warm_reps,
            secs_median(&f.warm),
            secs_median(&d.warm),
            time_ratio(&f.warm, &x.cold),
            time_ratio(&f.warm, &d.warm),
        );
        let prepared = match &s.prepared {
            None => "not measured".to_string(),
            Some(Err(e)) => short(e),
            Some(Ok(p)) => format!(
                "warm-up {:.2} s (progress done at {}, {} polls), then pull {:.2} s; warm pull {}: after prepare / warm = {}",
                p.prepare,
                mib(p.bytes_done),
                p.polls,
                p.pull,
                secs_median(&f.warm),
                time_ratio(&[p.pull], &f.warm)
            ),
        };
        let _ = writeln!(
            t,
            "| {}: after prepare (`POST …/prepare`, progress done, then pull) | {prepared} | – | – | – | – |",
            s.name
        );
    }
    t
}

fn speed_median(v: &[CurlPull]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let speeds: Vec<f64> = v.iter().map(|p| p.speed).collect();
    let ttfb: Vec<f64> = v.iter().map(|p| p.ttfb).collect();
    format!("{} (first byte {})", gbps(median(&speeds)), ms(median(&ttfb)))
}

fn speed_ratio(a: &[CurlPull], b: &[CurlPull]) -> f64 {
    let m = |v: &[CurlPull]| median(&v.iter().map(|p| p.speed).collect::<Vec<_>>());
    ratio(m(a), m(b))
}

/// The curl rows: `%{speed_download}` and `%{time_starttransfer}` medians.
pub fn curl_table(c: &Option<Result<CurlResults, String>>, layer_size: u64) -> String {
    let c = match c {
        None => return String::new(),
        Some(Err(e)) => return format!("curl rows: **did not run**: {}\n", short(e)),
        Some(Ok(c)) => c,
    };
    let mut t = format!(
        "`curl -sS -o /dev/null` of the {} layer, `%{{speed_download}}` median (`%{{time_starttransfer}}` median); direct upstream and the copy server have no cold state, their row is the same pulls:\n\n",
        mib(layer_size)
    );
    t.push_str(
        "| curl | Facade | Distribution proxy | Direct upstream | Copy server | Ratios |\n|---|---|---|---|---|---|\n",
    );
    let _ = writeln!(
        t,
        "| cold (a fresh instance per pull), {} per system | {} | {} | {} | {} | facade / dist = {:.2}×, facade / direct = {:.2}× |",
        c.facade_cold.len(),
        speed_median(&c.facade_cold),
        speed_median(&c.dist_cold),
        speed_median(&c.direct),
        speed_median(&c.copy),
        speed_ratio(&c.facade_cold, &c.dist_cold),
        speed_ratio(&c.facade_cold, &c.direct),
    );
    let _ = writeln!(
        t,
        "| warm (the same instance again), {} per system | {} | {} | {} | {} | facade / dist = {:.2}×, facade / copy = {:.2}× |",
        c.facade_warm.len(),
        speed_median(&c.facade_warm),
        speed_median(&c.dist_warm),
        speed_median(&c.direct),
        speed_median(&c.copy),
        speed_ratio(&c.facade_warm, &c.dist_warm),
        speed_ratio(&c.facade_warm, &c.copy),
    );
    t
}

/// How much else the machine did: the quiet check before the start, and the CPU time other
/// processes took during the run.
pub fn other_load(quiet: Option<(f64, Duration)>, usage: &crate::cpu::Usage) -> String {
    let mut s = match quiet {
        Some((share, waited)) => format!(
            "{:.0} % busy in the 2 s before the start (waited {:.0} s for ≤ 15 %); ",
            share * 100.0,
            waited.as_secs_f64()
        ),
        None => String::new(),
    };
    let share = if usage.available > 0.0 { usage.others() / usage.available } else { 0.0 };
    let _ = write!(
        s,
        "during the run other processes took {:.0} CPU-s of {:.0} available ({:.0} %), the bench and the systems it ran {:.0} CPU-s",
        usage.others(),
        usage.available,
        share * 100.0,
        usage.ours
    );
    if share > 0.10 {
        s.push_str(" — **the machine was shared: expect every ratio to be noisier than on a quiet machine**");
    }
    s
}

/// The first three fields of `/proc/loadavg`.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The machine, as `RESULTS.md` describes it.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs (nproc), {model}, {:.1} GiB memory, Linux {}", mem_kib as f64 / MIB, kernel.trim())
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time.
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86400) as i64;
    let rem = unix_secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// What `RESULTS.md` says besides the table.
pub struct Context {
    /// When the run finished.
    pub date: String,
    /// [`machine`].
    pub machine: String,
    /// How the bench was invoked.
    pub command: String,
    /// Versions of the other parts.
    pub versions: String,
    /// `/proc/loadavg` before and after the run.
    pub load: (String, String),
    /// [`other_load`].
    pub other_load: String,
}

/// The whole `RESULTS.md`.
pub fn results_md(r: &Results, p: &Params, ctx: &Context) -> String {
    let (table, verdict) = table(r, p);
    let mut s = String::new();
    s.push_str("# registry-facade benchmark results\n\n");
    s.push_str("Written by the bench (`bench/`), not by hand; `make bench` regenerates it.\n\n");
    let _ = writeln!(s, "- Date: {}", ctx.date);
    let _ = writeln!(s, "- Machine: {}", ctx.machine);
    let _ = writeln!(s, "- Command: {}", ctx.command);
    let _ = writeln!(
        s,
        "- Parameters: layer {} MiB of noise, one uncompressed layer (blob {} bytes, `{}`); timed pulls per system: cold {} (each on a fresh instance), warm {}; plus 1 cold and 2 warm verification pulls per system; load runs of {} s per system; {} concurrent clients{}",
        p.layer_mib,
        r.layer_size,
        r.layer_digest,
        p.cold_reps,
        p.warm_reps,
        p.wrk_secs,
        p.concurrency,
        if p.quick { "; **--quick** (smoke test, not the reference numbers)" } else { "" }
    );
    let _ = writeln!(s, "- Other parts: {}", ctx.versions);
    let _ = writeln!(s, "- Load average (1, 5, 15 min) before / after: {} / {}", ctx.load.0, ctx.load.1);
    let _ = writeln!(s, "- Other load: {}", ctx.other_load);
    if r.streams_ran {
        let _ = writeln!(s, "\nTargets met: **{} of {}**.\n", verdict.met, verdict.total);
        s.push_str(&table);
    } else {
        s.push_str("\nThe streaming section (the targets) was not run (`--only`).\n");
    }
    s.push_str(&extra_sections(r));
    if !r.verified.is_empty() {
        s.push_str("\nSHA-256 verified (untimed pulls): ");
        s.push_str(&r.verified.join("; "));
        s.push_str(".\n");
    }
    s.push_str("\n## Method\n\n");
    s.push_str(METHOD);
    s.push_str(METHOD_EXTRA);
    if r.herd.is_some() {
        s.push_str(METHOD_HERD);
    }
    if r.streams_ran {
        s.push_str("\n## Raw samples\n\nIn the order taken; throughput in GB/s, time to first byte in ms.\n\n");
        s.push_str(&raw_samples(r));
    }
    s
}

/// The curl rows and the first-pull table, each under its own heading, when they ran.
pub fn extra_sections(r: &Results) -> String {
    let mut s = String::new();
    let curl = curl_table(&r.curl, r.layer_size);
    if !curl.is_empty() {
        s.push_str("\n## curl as the client\n\n");
        s.push_str(&curl);
    }
    let fp = first_pull_table(&r.first_pull);
    if !fp.is_empty() {
        s.push_str("\n## First pull with containerd\n\n");
        s.push_str(&fp);
    }
    if let Some(h) = &r.herd {
        s.push_str("\n## Herd\n\n");
        s.push_str(&herd_table(h));
    }
    s
}

/// The herd: each system's upstream bytes and times next to `docs/scale.md`'s model.
pub fn herd_table(h: &Result<crate::herd::Herd, String>) -> String {
    let h = match h {
        Err(e) => return format!("Herd: **did not run**: {}\n", short(e)),
        Ok(h) => h,
    };
    let layer = h.layer_size as f64;
    let (s_over_b, depth) = (h.model_download(), h.model_depth());
    let mut t = format!(
        "Herd: N={} nodes, one new {} layer, upstream {:.0} MiB/s per connection; every node's client released at once on the blob, time = release → that node's last body byte (SHA-256 checked):\n\n",
        h.nodes,
        mib(h.layer_size),
        h.rate as f64 / MIB
    );
    t.push_str("| System | Upstream bytes | Upstream layer GETs (new connections) | First node | Last node | Every node, s | Model (`docs/scale.md`) |\n");
    t.push_str("|---|---|---|---|---|---|---|\n");
    let row = |name: &str, r: &Result<crate::herd::SystemHerd, String>, model: String| -> String {
        let x = match r {
            Err(e) => return format!("| {name} | **did not run**: {} | – | – | – | – | {model} |", short(e)),
            Ok(x) => x,
        };
        let mut nodes: Vec<String> = x.per_node.iter().map(|v| format!("{v:.2}")).collect();
        if let Some(first) = x.failures.first() {
            nodes.push(format!("**{} failed**: {}", x.failures.len(), short(first)));
        }
        format!(
            "| {name} | {} = {:.2}× layer | {} ({}) | {:.2} s | {:.2} s | {} | {model} |",
            mib(x.upstream_bytes),
            x.upstream_bytes as f64 / layer,
            x.blob_gets,
            x.upstream_connections,
            x.first.as_secs_f64(),
            x.last.as_secs_f64(),
            nodes.join(", ")
        )
    };
    // The one-client pull is S / b_u as this machine realizes it (start-up, pacing, hashing,
    // load): the lag is what the cluster adds on top of that.
    let realized = h.direct.as_ref().map_or(s_over_b, |d| d.last.as_secs_f64());
    let lag = match &h.facade {
        Ok(f) if depth > 0 => {
            let beyond = f.last.as_secs_f64() - realized;
            if beyond > 0.0 {
                format!(
                    "; measured − one client = {:+.0} ms, lag ≈ {:.0} ms per level",
                    beyond * 1e3,
                    beyond / f64::from(depth) * 1e3
                )
            } else {
                format!("; measured − one client = {:+.0} ms (lag below the noise)", beyond * 1e3)
            }
        }
        _ => String::new(),
    };
    let _ = writeln!(
        t,
        "{}",
        row(
            "One client alone, straight from the upstream",
            &h.direct,
            format!("S / b_u = {s_over_b:.2} s (this row: S / b_u as realized here)")
        )
    );
    let _ = writeln!(
        t,
        "{}",
        row(
            &format!("Facade cluster ({} facades, one Redis)", h.nodes),
            &h.facade,
            format!(
                "egress S = 1.00×; t_last ≈ S / b_u + d × lag = {s_over_b:.2} s + {depth} × lag (F = {}, d = ⌈log_F N⌉){lag}",
                crate::herd::MAX_FOLLOWERS
            )
        )
    );
    let _ = writeln!(
        t,
        "{}",
        row(
            &format!("Distribution ×{}", h.nodes),
            &h.dist,
            format!("egress N × S = {}.00×; t_last ≈ S / b_u = {s_over_b:.2} s (one connection per node)", h.nodes)
        )
    );
    if let (Ok(f), Ok(d)) = (&h.facade, &h.dist) {
        let _ = writeln!(
            t,
            "| Distribution / facade | {:.2}× | {:.2}× | {:.2}× | {:.2}× | – | – |",
            ratio(d.upstream_bytes as f64, f.upstream_bytes as f64),
            ratio(d.blob_gets as f64, f.blob_gets as f64),
            ratio(d.first.as_secs_f64(), f.first.as_secs_f64()),
            ratio(d.last.as_secs_f64(), f.last.as_secs_f64()),
        );
    }
    if let Ok(f) = &h.facade
        && let Some(c) = &f.cluster
    {
        let _ = writeln!(
            t,
            "\nFacade cluster counters (summed over the nodes' `/metrics`): leases acquired {:.0}, followed {:.0}, Redis unavailable {:.0}; peer fetches ok {:.0}, busy (503; the follower tried the next candidate or claimed again) {:.0}, refused/failed/stalled/slow {:.0}; peer bytes served {}; nodes that logged \"no peer could serve the blob; downloading from upstream\": {}.",
            c.acquired,
            c.followed,
            c.unavailable,
            c.peer_ok,
            c.peer_busy,
            c.peer_other,
            mib(c.peer_served_bytes as u64),
            c.alone
        );
        if c.alone > 0 && c.peer_busy as usize >= c.alone {
            let _ = writeln!(
                t,
                "\n**{} of {} followers downloaded from upstream without a lease**: every candidate they were given (the holder, then the sources registered when they claimed) answered busy (`peerMaxFollowers` = {}), and a follower registers as a source only once its first byte is in, so in a herd released at once there is none to ask yet. Upstream downloads = 1 holder + {} = {}.",
                c.alone,
                h.nodes - 1,
                crate::herd::MAX_FOLLOWERS,
                c.alone,
                1 + c.alone
            );
        }
    }
    t
}

const METHOD_EXTRA: &str = "\
- curl rows: Debian's curl, `curl -sS -o /dev/null -w '%{http_code} %{size_download} %{speed_download} \
%{time_starttransfer}'` of the layer (status 200 and the full size checked); cold pulls alternate \
between a fresh facade and a fresh distribution proxy (the manifest fetched first), each reaching \
the upstream directly, not through a counting proxy (whose copy loop would cap every cold pull at \
its own speed), warm pulls go round-robin over the copy server, direct upstream and the last \
facade and distribution instances.
- First pull with containerd: one upstream repository holds `base` (eight layers of noise), \
`ide` (two) and `ws` (the same ten layers in one image, for the systems that cannot compose). The \
facade serves workspace `ws` with `baseRef` = base and `ideRef` = ide, the same ten layers; the \
distribution proxy and direct upstream serve `ws`. Each timed pull is `ctr images pull \
--plain-http --snapshotter native --max-concurrent-downloads 3 --print-chainid` into a containerd \
started for that pull alone (its own root, content store and snapshots), so it fetches and unpacks \
every layer; the chain ID it prints must be the image's. Cold: a fresh facade (empty store) or \
distribution proxy (empty storage) per pull; the systems take turns. Warm: the last cold instance \
again, into a fresh containerd. \"Remote\": every system reaches the upstream through the bench's \
rate-limiting TCP proxy (`src/rate_proxy.rs`, a token bucket per connection, 64 KiB burst), so \
parallel connections add up and one connection cannot go faster than the rate; the upstream bytes \
shown are what that proxy relayed during the last cold pull. After prepare: a fresh facade with \
its admin listener, `POST /v1/workspaces/fixed/ws/prepare`, `GET …/progress` every 100 ms until \
its state is done (or, in a document without a state, its totals have every byte), then one timed pull into a fresh containerd; \
a 404 on the warm-up route gives \"n/a (no warm-up API)\".
";

const METHOD_HERD: &str = "\
- Herd (`src/herd.rs`): a new image `herd:1` (one uncompressed layer of noise) in the upstream; each \
system reaches it through a fresh rate-limiting proxy (the first-pull section's \"remote\", 24 MiB/s per \
connection) behind a proxy that counts request lines, so its upstream bytes, layer GETs and new \
connections are its own (a facade reuses the keep-alive connection its manifest GET opened, so it \
can show fewer new connections than GETs). Facade cluster: N release-binary facade processes, each \
with its own empty store, registry, admin and peer listener on free loopback ports, one real \
`redis-server` (`registry.redis`) holding the download leases, a shared `facade.peerSecretFile`, \
`peerMaxFollowers` 4 (the default), `prefetchParallelism` 0 (so the blob GETs, not the manifest GET, \
start the downloads); `registry.ipfs` is off, leases need only Redis. Distribution: N \
`docker-registry` pull-through caches, each with its own storage (2.8 fetches a cold blob twice, \
once for the client and once for its storage, hence 2 GETs per node). Every node gets the manifest \
first; then N client threads, one per node, wait on one barrier and GET the layer blob, each \
hashing what it receives (a wrong byte fails the bench). First / last node = release (the first \
thread past the barrier) → that node's last body byte. \"One client alone\" is one hashed GET \
straight through a fresh remote: S / b_u as this machine realizes it. The model column is \
`docs/scale.md`'s, with b_u the proxy's rate (loopback peer bandwidth is far above b_u / F); the lag \
is the last node's time beyond the one-client pull, spread over the d levels. The cluster counters \
are the nodes' `/metrics` after the herd, plus the nodes whose log says they went to upstream \
because no candidate could serve.
";

fn raw_samples(r: &Results) -> String {
    let mut s = String::from("| Series | Throughput | Time to first byte |\n|---|---|---|\n");
    let series = [
        ("Copy server", &r.copy),
        ("Direct upstream", &r.direct),
        ("Upstream via a counting proxy", &r.direct_via_proxy),
        ("Facade, cold", &r.facade.cold),
        ("Facade, warm", &r.facade.warm),
        ("Distribution proxy, cold", &r.dist.cold),
        ("Distribution proxy, warm", &r.dist.warm),
    ];
    for (name, x) in series {
        let thr: Vec<String> = x.throughput.iter().map(|v| format!("{:.2}", v / 1e9)).collect();
        let ttfb: Vec<String> = x.ttfb.iter().map(|v| format!("{:.1}", v * 1e3)).collect();
        let _ = writeln!(s, "| {name} | {} | {} |", thr.join(", "), ttfb.join(", "));
    }
    s
}

const METHOD: &str = "\
- One upstream: a CNCF distribution registry (`docker-registry`) holding `big:1`, an OCI image whose \
only layer is an uncompressed tar of incompressible noise (so the blob is byte for byte what is \
served). The facade and the distribution pull-through cache each reach it through their own \
counting TCP proxy (test-support's `FaultProxy`, no faults set), so each system's upstream bytes \
and requests are counted separately. \"Direct upstream\" is the upstream registry itself, no proxy; \
the cold row also gives it read through a counting proxy, the ceiling of every cold pull here.
- Facade: the release binary (`registry-facade run`), a separate process with a local store, \
serving workspace `ws` whose spec is the upstream image as is; blobs are read from \
`/v2/fixed/ws/blobs/<digest>`. Distribution proxy: `docker-registry` with `proxy.remoteurl` and its \
own filesystem storage; blobs are read from `/v2/big/blobs/<digest>`. Copy server: a thread per \
connection that copies the layer file to the socket with 1 MiB reads and `write_all`, the \
practical limit of this machine.
- Client: HTTP/1.1 over a plain TCP socket, one request per connection (`Connection: close`), the \
body read into one reused 1 MiB buffer and discarded. Time to first byte = request written → first \
body byte; throughput = body bytes / (last body byte − request written). Timed pulls do not hash; \
separate untimed pulls (the first cold one of each system, a warm one before and after the timed \
warm pulls, one per baseline, one of each concurrent run) check the SHA-256 of every byte.
- Cold: every timed cold pull starts a fresh instance (the facade with an empty store directory, the \
distribution proxy with empty storage), fetches the manifest (as a client does before its \
blobs), then times the blob GET. Warm: the same instance again after a full cold pull was served \
and cached. Direct upstream and the copy server have no cache: their pulls read from the page \
cache, like every warm pull here.
- Server CPU time per GiB: the scheduler's exact on-CPU time (`/proc/<pid>/task/*/schedstat`) of \
the serving process's threads around each timed pull (cold: filling its cache included), and for the copy server its connection \
threads' own. Softirq work of loopback TCP may land on any thread, so take it as approximate. Unlike throughput it hardly depends on what else the machine runs, so it shows the cost of \
each system's data path even on a shared machine.
- Interleaving: cold pulls alternate between the facade and the distribution proxy, and warm \
pulls go round-robin over all five (copy server, direct upstream, upstream via a counting proxy, \
facade, distribution proxy), so load from anything else on the machine weighs on every column alike.
- Concurrent: a fresh instance, the counting proxy reset, the manifest fetched (the facade's \
prefetch starts the layer's download on it), then N clients released together on one blob; \
wall time runs until the last finishes. Upstream bytes and blob GETs are what that system's \
counting proxy saw from the reset on (manifest and config included). Peak RSS is `VmHWM` from \
`/proc/<pid>/status` read right after (the high-water mark cannot be reset, hence the fresh \
process), with `VmRSS` sampled every 5 ms for comparison; then the N pulls run again warm.
- Manifest requests per second: `HEAD` with the OCI + Docker manifest `Accept` header on \
`/v2/fixed/ws/manifests/latest` (facade) and `/v2/big/manifests/1` (distribution proxy, direct \
upstream), after one checked request (200 with `Docker-Content-Digest`). Debian's wrk 4.1.0 cannot \
send HEAD (it waits for the body the answer's `Content-Length` announces, so every request times \
out), so the HEAD numbers come from the bench's own wrk-shaped client: 2 event-loop threads, 16 \
keep-alive connections, the next request sent as soon as an answer's head is in. `wrk -t2 -c16` \
then measures GET on the same URLs as a cross-check of that client. A run with non-2xx answers or \
errors does not meet its target.
- Two nodes (the cluster cache), run last: a real `redis-server` and a real IPFS node, then two facade \
processes (node A, node B), each with its own empty store, both with `registry.redis` and \
`registry.ipfs` enabled against them, reaching the upstream through one fresh counting proxy. \
Node A starts, fetches the manifest and pulls the layer (timed); upstream bytes, blob GETs and \
requests are what the proxy saw from A's start to the end of its pull. Then the bench waits (at \
most 180 s) until the layer's index entry is in Redis (A has added the blob to IPFS), resets the \
proxy counters, starts node B and does the same. Each node's one cold pull is hashed while it is \
timed (it is the only cold pull a node has), so both times include the client's SHA-256. The IPFS \
node is js-ipfs 0.66 (what `scripts/install-deps.sh` installs), much slower than Kubo, so node \
B's time measures js-ipfs as much as the facade. \"Met\" here is node B having taken no byte from \
upstream; it is not one of the streaming targets counted above.
- Everything runs on this one machine at once (client, systems, upstream, proxies) on 127.0.0.1, so \
the numbers are comparable with each other, not with other machines.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_735_689_599), "2024-12-31 23:59 UTC");
    }
}
