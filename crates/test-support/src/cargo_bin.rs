//! A workspace binary for tests of another package. Cargo sets `CARGO_BIN_EXE_<name>` only for
//! the binaries of the test's own package, so the e2e tests that must run the real
//! `registry-facade` executable have the cargo that runs them build it (a no-op when it is up
//! to date, as after `make test`'s workspace build), once per test process.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::proc::run_bytes;

/// How long the build may take: on a 2-core machine it may first wait for another build's lock.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// Builds `bin` of `package` (with `--locked`, in the profile this test was built with) and
/// returns the path of the executable.
pub fn cargo_bin(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    static BUILT: Mutex<BTreeMap<(String, String), PathBuf>> = Mutex::new(BTreeMap::new());
    let key = (package.to_string(), bin.to_string());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&key) {
        return Ok(p.clone());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--locked", "--message-format=json-render-diagnostics", "-p", package, "--bin", bin]);
    // A test executable lives in target/<profile>/deps.
    let release = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.file_name().map(|n| n == "release"))
        .unwrap_or(false);
    if release {
        cmd.arg("--release");
    }
    let out = run_bytes(cmd, BUILD_TIMEOUT)?;
    let path = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow::anyhow!("cargo built no executable {bin} of {package}"))?;
    built.insert(key, path.clone());
    Ok(path)
}
