//! CPU time and memory figures from /proc (Linux only): per process, per
//! thread, and for the whole machine. Read-only; owns no state.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

/// Clock ticks per second for /proc CPU times (`getconf CLK_TCK`).
///
/// # Errors
/// When `getconf` cannot be run or prints something else than a number.
pub fn clock_ticks() -> Result<u64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("cannot run getconf CLK_TCK")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hz: u64 = text
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {text:?}"))?;
    if hz == 0 {
        bail!("getconf CLK_TCK printed 0");
    }
    Ok(hz)
}

/// `utime + stime` of a `/proc/.../stat` line, in clock ticks, and its `comm`.
fn parse_stat(line: &str) -> Option<(String, u64)> {
    // The command name is in parentheses and may itself contain spaces or ')'.
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU time (user + system) of process `pid` in clock ticks, all threads,
/// including threads that already exited.
///
/// # Errors
/// When the process is gone or the file has an unexpected format.
pub fn process_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let line = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_stat(&line)
        .map(|(_, t)| t)
        .with_context(|| format!("unexpected format of {path}"))
}

/// CPU time of this process in clock ticks.
///
/// # Errors
/// As [`process_ticks`].
pub fn self_ticks() -> Result<u64> {
    process_ticks(std::process::id())
}

/// One thread's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSample {
    /// Thread name (`comm`).
    pub name: String,
    /// CPU time (user + system), clock ticks.
    pub ticks: u64,
    /// Time spent runnable but waiting for a CPU, ns (`schedstat` field 2;
    /// 0 when the kernel does not provide it).
    pub wait_ns: u64,
}

/// Counters of each live thread of `pid`, by thread id. Threads that
/// cannot be read (exited meanwhile) are skipped.
#[must_use]
pub fn thread_ticks(pid: u32) -> BTreeMap<u32, ThreadSample> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Some((name, ticks)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        else {
            continue;
        };
        let wait_ns = std::fs::read_to_string(entry.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        out.insert(
            tid,
            ThreadSample {
                name,
                ticks,
                wait_ns,
            },
        );
    }
    out
}

/// What one thread name used between two [`thread_ticks`] snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadUse {
    /// Thread name.
    pub name: String,
    /// Threads with that name.
    pub count: usize,
    /// CPU ticks.
    pub ticks: u64,
    /// Runnable-but-waiting ns.
    pub wait_ns: u64,
}

/// Use per thread name between two snapshots (a thread absent from
/// `before` started in between and counts from 0), largest CPU first.
#[must_use]
pub fn thread_delta(
    before: &BTreeMap<u32, ThreadSample>,
    after: &BTreeMap<u32, ThreadSample>,
) -> Vec<ThreadUse> {
    let mut by_name: BTreeMap<&str, ThreadUse> = BTreeMap::new();
    for (tid, t) in after {
        let (ticks0, wait0) = before.get(tid).map_or((0, 0), |b| (b.ticks, b.wait_ns));
        let e = by_name.entry(&t.name).or_insert_with(|| ThreadUse {
            name: t.name.clone(),
            count: 0,
            ticks: 0,
            wait_ns: 0,
        });
        e.count += 1;
        e.ticks += t.ticks.saturating_sub(ticks0);
        e.wait_ns += t.wait_ns.saturating_sub(wait0);
    }
    let mut v: Vec<_> = by_name.into_values().collect();
    v.sort_by(|a, b| b.ticks.cmp(&a.ticks).then_with(|| a.name.cmp(&b.name)));
    v
}

/// A `Vm*:` line of /proc/PID/status in KiB (`VmHWM` is the peak RSS).
///
/// # Errors
/// When the process is gone or the line is missing.
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} line in {path}"))
}

/// Machine-wide CPU counters from the first line of /proc/stat, in ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    /// Reads /proc/stat (zeros when unreadable, so the figure prints as n/a).
    #[must_use]
    pub fn now() -> Self {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = text.lines().next().and_then(|l| l.strip_prefix("cpu ")) else {
            return Self::default();
        };
        let f: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest is in user).
        let total: u64 = f.iter().take(8).sum();
        let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
        Self {
            busy: total.saturating_sub(idle),
            total,
        }
    }

    /// Share of all cores busy between `self` and `later`, in percent.
    #[must_use]
    pub fn busy_pct(&self, later: &Self) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let busy = later.busy.checked_sub(self.busy)?;
        (total > 0).then(|| 100.0 * busy as f64 / total as f64)
    }
}

/// The 1-, 5- and 15-minute load averages from /proc/loadavg.
#[must_use]
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let line = "42 (tokio-runtime) w) S 1 2 3 4 5 6 7 8 9 10 110 220 0 0 20 0";
        assert_eq!(parse_stat(line), Some(("tokio-runtime) w".into(), 330)));
    }
}
