//! `curl` as the client: the layer pulled with `curl -sS -o /dev/null -w …`, cold (a fresh facade
//! or distribution instance per pull) and warm (the same instance again), next to direct upstream
//! and the copy server. A cross-check of the bench's own client with a client nobody here wrote.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use test_support::proc::run;

/// The curl binary (Debian's `curl`, installed by `scripts/install-deps.sh`).
pub const CURL_BIN: &str = "curl";
/// Longest one curl pull may take.
const TIMEOUT: Duration = Duration::from_secs(300);

/// One curl pull, as curl measured it.
#[derive(Clone, Debug)]
pub struct CurlPull {
    /// `%{speed_download}`: body bytes per second over the whole transfer.
    pub speed: f64,
    /// `%{time_starttransfer}`: start → first response byte, seconds.
    pub ttfb: f64,
}

/// GETs `http://addr/path` with curl, body to `/dev/null`; the status must be 200 and the size
/// `want_bytes`.
pub fn pull(addr: SocketAddr, path: &str, want_bytes: u64) -> anyhow::Result<CurlPull> {
    let url = format!("http://{addr}{path}");
    let mut cmd = Command::new(CURL_BIN);
    cmd.args(["-sS", "-o", "/dev/null", "--max-time", "300", "-w"])
        .arg("%{http_code} %{size_download} %{speed_download} %{time_starttransfer}")
        .arg(&url);
    let out = run(cmd, TIMEOUT).with_context(|| format!("curl {url}"))?;
    parse(&out, want_bytes).with_context(|| format!("curl {url}"))
}

fn parse(out: &str, want_bytes: u64) -> anyhow::Result<CurlPull> {
    let f: Vec<&str> = out.split_whitespace().collect();
    let [code, size, speed, ttfb] = f[..] else { bail!("unexpected -w output {out:?}") };
    if code != "200" {
        bail!("status {code}");
    }
    let bytes: u64 = size.parse().context("size_download")?;
    if bytes != want_bytes {
        bail!("{bytes} bytes, the layer has {want_bytes}");
    }
    Ok(CurlPull { speed: speed.parse().context("speed_download")?, ttfb: ttfb.parse().context("time_starttransfer")? })
}

/// Whether curl can run here.
pub fn available() -> bool {
    test_support::proc::have(CURL_BIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_write_out() {
        let p = parse("200 1048576 524288000.000 0.001234", 1 << 20).unwrap();
        assert!((p.speed - 524_288_000.0).abs() < 1.0 && (p.ttfb - 0.001234).abs() < 1e-9);
        assert!(parse("404 10 1 0.1", 10).is_err());
        assert!(parse("200 10 1 0.1", 11).is_err());
        assert!(parse("garbage", 10).is_err());
    }
}
