//! How busy the machine was with work that is not the bench's: everything here shares two cores
//! or so, and a compile running beside the bench skews the numbers (the facade's pipeline of
//! threads suffers more from a busy scheduler than the one-thread copy server). The bench waits,
//! a bounded time, for a quiet machine, and reports how much CPU other processes took during the
//! run.

use std::time::{Duration, Instant};

/// CPU ticks (USER_HZ) from `/proc/stat`: busy and total, all CPUs.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineTicks {
    busy: u64,
    total: u64,
}

/// The machine's ticks now.
pub fn machine() -> MachineTicks {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    parse_stat(&text)
}

fn parse_stat(text: &str) -> MachineTicks {
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return MachineTicks::default() };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    MachineTicks { busy, total: busy + at(3) + at(4) }
}

/// CPU ticks of this process plus its reaped children (the systems under test, once stopped).
pub fn own_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    parse_self_stat(&text)
}

fn parse_self_stat(text: &str) -> u64 {
    // The command name may contain spaces and parentheses: the fields start after the last ')'.
    let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt, majflt,
    // cmajflt, then utime, stime, cutime, cstime.
    fields.get(11..15).map(|f| f.iter().filter_map(|x| x.parse::<u64>().ok()).sum()).unwrap_or(0)
}

/// Busy share (0..1) of all CPUs between two readings.
pub fn busy_share(a: MachineTicks, b: MachineTicks) -> f64 {
    let total = b.total.saturating_sub(a.total);
    if total == 0 { 0.0 } else { b.busy.saturating_sub(a.busy) as f64 / total as f64 }
}

/// Waits up to `limit` for a 2 s window in which the machine is at most `max_busy` busy.
/// Returns the busy share of the last window and how long it waited.
pub fn wait_for_quiet(limit: Duration, max_busy: f64) -> (f64, Duration) {
    let started = Instant::now();
    loop {
        let a = machine();
        std::thread::sleep(Duration::from_secs(2));
        let share = busy_share(a, machine());
        if share <= max_busy || started.elapsed() >= limit {
            return (share, started.elapsed());
        }
        tracing::info!(
            busy_percent = format!("{:.0}", share * 100.0),
            "the machine is busy; waiting for it to calm down"
        );
    }
}

/// Where the CPU time of a run went.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// All CPUs' time over the run, seconds.
    pub available: f64,
    /// Busy time, seconds.
    pub busy: f64,
    /// Of which the bench and its children (systems under test, registries, wrk, skopeo).
    pub ours: f64,
}

impl Usage {
    /// Busy time of other processes, seconds.
    pub fn others(&self) -> f64 {
        (self.busy - self.ours).max(0.0)
    }
}

/// Usage between two pairs of readings; ticks are USER_HZ, 100 on Linux.
pub fn usage(start: (MachineTicks, u64), end: (MachineTicks, u64)) -> Usage {
    const HZ: f64 = 100.0;
    Usage {
        available: end.0.total.saturating_sub(start.0.total) as f64 / HZ,
        busy: end.0.busy.saturating_sub(start.0.busy) as f64 / HZ,
        ours: end.1.saturating_sub(start.1) as f64 / HZ,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_stat_lines() {
        let m = parse_stat("cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n");
        assert_eq!((m.busy, m.total), (161, 1181));
        let own = parse_self_stat("42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 20 10 20 0 1 0");
        assert_eq!(own, 40);
        assert_eq!(parse_self_stat("garbage"), 0);
    }
}
