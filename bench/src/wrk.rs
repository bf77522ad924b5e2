//! Manifest GET-by-tag requests per second with `wrk -t2 -c16`: the cross-check of the HEAD
//! numbers of [`crate::load`] (wrk 4.1.0 cannot send HEAD, see there).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

/// The `wrk` binary (scripts/install-deps.sh installs it).
pub const WRK_BIN: &str = "/usr/bin/wrk";

/// What one `wrk` run reported.
#[derive(Clone, Debug)]
pub struct WrkResult {
    /// `Requests/sec:`.
    pub rps: f64,
    /// `Non-2xx or 3xx responses:` (0 when absent).
    pub non_2xx: u64,
    /// The `Socket errors:` line, if any.
    pub socket_errors: Option<String>,
}

/// Writes the Lua script that makes `wrk` send the manifest `Accept` header.
pub fn write_script(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("manifest.lua");
    let script = format!("wrk.headers[\"Accept\"] = \"{}\"\n", facade_oci::media_types::MANIFEST_ACCEPT);
    std::fs::write(&path, script)?;
    Ok(path)
}

/// Runs `wrk -t2 -c16 -d<secs>s -s <script> <url>`.
pub fn get_rps(url: &str, script: &Path, secs: u32) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new(WRK_BIN);
    cmd.args(["-t2", "-c16", &format!("-d{secs}s"), "--timeout", "5s", "-s"]).arg(script).arg(url);
    let out = test_support::proc::run(cmd, Duration::from_secs(u64::from(secs) + 30))?;
    parse(&out).with_context(|| format!("wrk output for {url}:\n{out}"))
}

fn parse(out: &str) -> anyhow::Result<WrkResult> {
    let value = |key: &str| out.lines().find_map(|l| l.trim().strip_prefix(key)).map(str::trim);
    let rps = value("Requests/sec:").context("no Requests/sec line")?.parse().context("Requests/sec")?;
    let non_2xx = value("Non-2xx or 3xx responses:").map(|v| v.parse().unwrap_or(u64::MAX)).unwrap_or(0);
    let socket_errors = value("Socket errors:").map(str::to_string);
    Ok(WrkResult { rps, non_2xx, socket_errors })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_wrk_summaries() {
        let out = "Running 5s test @ http://127.0.0.1:1/v2/\n  2 threads and 16 connections\n  \
                   Socket errors: connect 0, read 3, write 0, timeout 0\n  Non-2xx or 3xx responses: 12\n\
                   Requests/sec:  41234.56\nTransfer/sec:      7.31MB\n";
        let r = parse(out).unwrap();
        assert_eq!(r.rps, 41234.56);
        assert_eq!(r.non_2xx, 12);
        assert_eq!(r.socket_errors.as_deref(), Some("connect 0, read 3, write 0, timeout 0"));
        assert!(parse("garbage").is_err());
    }
}
