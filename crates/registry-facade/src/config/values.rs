//! Checking one key's raw value: durations, sizes, files, addresses. Every problem is recorded
//! as one line that starts with the key, and checking goes on, so that a file's problems are all
//! reported at once (README.md, "A file with an unknown key ... is refused at startup with one
//! line naming every offending key").

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::env::Env;

/// The problems found so far, the directory relative paths are resolved against, and the
/// environment.
pub(super) struct Checker<'a> {
    base_dir: &'a Path,
    env: &'a dyn Env,
    problems: Vec<String>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(base_dir: &'a Path, env: &'a dyn Env) -> Self {
        Checker { base_dir, env, problems: Vec::new() }
    }

    /// Records that `key` has a problem.
    pub(super) fn problem(&mut self, key: impl Display, what: impl Display) {
        self.problems.push(format!("{key}: {what}"));
    }

    /// How many problems were recorded so far.
    pub(super) fn problem_count(&self) -> usize {
        self.problems.len()
    }

    /// Every problem recorded, in the order found.
    pub(super) fn into_problems(self) -> Vec<String> {
        self.problems
    }

    /// An environment variable; empty counts as unset.
    pub(super) fn env_var(&self, name: &str) -> Option<String> {
        self.env.var(name).filter(|v| !v.is_empty())
    }

    /// `s` as a path, relative ones resolved against the config file's directory.
    pub(super) fn path(&self, s: &str) -> PathBuf {
        let p = PathBuf::from(s);
        if p.is_absolute() { p } else { self.base_dir.join(p) }
    }

    /// The file `s` names (`None` when `s` is empty, or when it is no readable file).
    pub(super) fn file(&mut self, key: &str, s: &str) -> Option<PathBuf> {
        if s.is_empty() {
            return None;
        }
        let p = self.path(s);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Some(p),
            Ok(_) => {
                self.problem(key, format_args!("{} is not a file", p.display()));
                None
            }
            Err(e) => {
                self.problem(key, format_args!("cannot read {}: {e}", p.display()));
                None
            }
        }
    }

    /// A duration such as "30s" or "1h 30m" (`None`: absent or invalid).
    pub(super) fn duration(&mut self, key: &str, v: &Option<String>) -> Option<Duration> {
        let s = v.as_deref()?;
        humantime::parse_duration(s).map_err(|e| self.problem(key, format_args!("{s:?}: {e}"))).ok()
    }

    /// A duration that must not be zero.
    pub(super) fn positive_duration(&mut self, key: &str, v: &Option<String>) -> Option<Duration> {
        let d = self.duration(key, v)?;
        if d.is_zero() {
            self.problem(key, "must be more than 0");
            return None;
        }
        Some(d)
    }

    /// A size: a number of bytes or a string such as "512MiB" (`example` shows one in the
    /// message). `None`: absent or invalid.
    pub(super) fn size(&mut self, key: &str, v: &Option<serde_json::Value>, example: &str) -> Option<u64> {
        let n = match v.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| format!("{n} is not a whole number of bytes")),
            serde_json::Value::String(s) => parse_size(s).map_err(|e| format!("{s:?}: {e}")),
            other => Err(format!("{other} is neither a number nor a size such as {example:?}")),
        };
        n.map_err(|e| self.problem(key, e)).ok()
    }

    /// A listen address `host:port` with an IP host; Go's ":8086" means all interfaces.
    /// `None`: empty (nothing listens) or invalid.
    pub(super) fn listen_addr(&mut self, key: &str, s: &str) -> Option<SocketAddr> {
        if s.is_empty() {
            return None;
        }
        let full = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_string() };
        full.parse().map_err(|_| self.problem(key, format_args!("{s:?} is not host:port with an IP host"))).ok()
    }
}

/// Parses a size: a number of bytes, or a number with a unit (`B`, `KiB`, `MiB`, `GiB`,
/// `TiB`, or the decimal `KB`, `MB`, `GB`, `TB`), e.g. "512MiB", "20GiB", "1.5 GiB".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)")),
    };
    if num.is_empty() {
        return Err("no number".into());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| "too large".to_string());
    }
    let f: f64 = num.parse().map_err(|_| format!("{num:?} is not a number"))?;
    let bytes = f * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err("too large".into());
    }
    Ok(bytes as u64)
}
