//! Phase results and the printed report: one row per phase, the resource
//! figures, and the targets with their ratios. Targets are printed as met or
//! missed, never asserted.

use std::fmt::Write as _;
use std::path::PathBuf;

/// Agent/bare rate target at QoS 0.
pub const TARGET_RATIO_QOS0: f64 = 0.8;
/// Agent/bare rate target at QoS 1.
pub const TARGET_RATIO_QOS1: f64 = 0.5;
/// Peak RSS target in bytes (20 MB, decimal; stricter than 20 MiB).
pub const TARGET_RSS_BYTES: u64 = 20_000_000;

/// Which subscriber a phase measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The bare rumqttc counter.
    Bare,
    /// The edge-agent process.
    Agent,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Agent => "agent",
        }
    }
}

/// Percentiles of a latency sample, nearest rank, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pcts {
    /// Median.
    pub p50: i64,
    /// 99th percentile.
    pub p99: i64,
    /// Largest.
    pub max: i64,
    /// Sample size.
    pub n: usize,
}

impl Pcts {
    /// Percentiles of `v` (sorted in place); `None` when empty.
    #[must_use]
    pub fn of(v: &mut [i64]) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = |p: usize| v[(v.len() * p).div_ceil(100).clamp(1, v.len()) - 1];
        Some(Self {
            p50: rank(50),
            p99: rank(99),
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
}

/// Figures only the agent phase has.
#[derive(Debug, Clone, Default)]
pub struct AgentFigures {
    /// utime + stime of the agent from "ingest subscribed" to the end of the phase.
    pub cpu_s: f64,
    /// VmHWM just before SIGTERM, KiB.
    pub hwm_kib: u64,
    /// VmRSS after "ingest subscribed", before the workload, KiB.
    pub rss_idle_kib: u64,
    /// `RssAnon` and `RssFile` (mapped files: mostly the binary's code)
    /// just before SIGTERM, KiB.
    pub rss_anon_file_kib: (u64, u64),
    /// From the agent's debug log, when enabled: group commits, messages
    /// (commands) per commit, and mean commit time in µs.
    pub commits: Option<(u64, f64, f64)>,
    /// Per thread name during the phase: name, thread count, CPU seconds,
    /// seconds runnable but waiting for a CPU.
    pub threads: Vec<(String, usize, f64, f64)>,
    /// Whether the model package was loaded.
    pub model_loaded: Option<bool>,
    /// How the agent exited after SIGTERM.
    pub exit: String,
    /// Last interval between buffer polls, ms (resolution of the end time).
    pub poll_ms: u64,
    /// First to last `recv_ts_ms` in the buffer, seconds.
    pub recv_span_s: f64,
    /// Readings without a device timestamp (latency not computed).
    pub without_ts: u64,
    /// WARN and ERROR lines of the agent's log (first few) and their count.
    pub warnings: (usize, Vec<String>),
    /// The kept state directory.
    pub state_dir: Option<PathBuf>,
}

/// One measured phase.
#[derive(Debug, Clone)]
pub struct Phase {
    /// QoS of publishes and subscription.
    pub qos: u8,
    /// Which subscriber.
    pub kind: Kind,
    /// Messages the broker accepted from the publishers.
    pub sent: u64,
    /// Received (bare) or committed readings (agent).
    pub got: u64,
    /// Dead letters (agent; should be 0).
    pub dead_letters: u64,
    /// Seconds the rate is computed over.
    pub span_s: f64,
    /// Seconds the publishers took.
    pub publish_s: f64,
    /// Publish-to-receive latency.
    pub lat: Option<Pcts>,
    /// Stopped on the idle timeout or the phase bound.
    pub timed_out: bool,
    /// Whole machine CPU busy during the phase, percent of all cores.
    pub machine_busy_pct: Option<f64>,
    /// Broker CPU seconds during the phase, when its pid is known.
    pub broker_cpu_s: Option<f64>,
    /// CPU seconds of the benchmark process (publishers, bare subscriber).
    pub bench_cpu_s: f64,
    /// Load averages before and after.
    pub load: (String, String),
    /// Agent-only figures.
    pub agent: Option<AgentFigures>,
}

impl Phase {
    /// Messages per second over the span.
    #[must_use]
    pub fn rate(&self) -> f64 {
        if self.span_s > 0.0 {
            self.got as f64 / self.span_s
        } else {
            0.0
        }
    }

    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.got + self.dead_letters)
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{x:.prec$}"))
}

fn mb(kib: u64) -> f64 {
    (kib * 1024) as f64 / 1e6
}

/// Renders the whole report.
#[must_use]
pub fn render(header: &[(String, String)], phases: &[Phase]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "== ingest-bench ==");
    for (k, v) in header {
        let _ = writeln!(s, "{k:<14} {v}");
    }

    let _ = writeln!(
        s,
        "\nthroughput and latency (latency = agent/subscriber receive time - payload ts)"
    );
    let _ = writeln!(
        s,
        "{:<4} {:<6} {:>9} {:>9} {:>7} {:>8} {:>11} {:>12} {:>7} {:>7} {:>7}",
        "QoS",
        "phase",
        "sent",
        "got",
        "lost",
        "span s",
        "rate msg/s",
        "publish msg/s",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    for p in phases {
        let (p50, p99, max) = p
            .lat
            .map_or(("n/a".into(), "n/a".into(), "n/a".into()), |l| {
                (l.p50.to_string(), l.p99.to_string(), l.max.to_string())
            });
        let publish_rate = if p.publish_s > 0.0 {
            p.sent as f64 / p.publish_s
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "{:<4} {:<6} {:>9} {:>9} {:>7} {:>8.2} {:>11.0} {:>12.0} {:>7} {:>7} {:>7}{}",
            p.qos,
            p.kind.name(),
            p.sent,
            p.got,
            p.lost(),
            p.span_s,
            p.rate(),
            publish_rate,
            p50,
            p99,
            max,
            if p.timed_out {
                "  (stopped: nothing new for --idle-timeout-secs)"
            } else {
                ""
            }
        );
    }

    let _ = writeln!(s, "\nresources during each phase");
    let _ = writeln!(
        s,
        "{:<4} {:<6} {:>12} {:>12} {:>11} {:>11} {:>14} {:>13} {:>13}  load avg before -> after",
        "QoS",
        "phase",
        "machine busy",
        "broker CPU s",
        "bench CPU s",
        "agent CPU s",
        "agent CPU s/M",
        "idle RSS MB",
        "agent HWM MB"
    );
    for p in phases {
        let (cpu, per_m, idle, hwm) =
            p.agent
                .as_ref()
                .map_or(("-".into(), "-".into(), "-".into(), "-".into()), |a| {
                    let per_m = if p.got > 0 {
                        format!("{:.2}", a.cpu_s / (p.got as f64 / 1e6))
                    } else {
                        "n/a".into()
                    };
                    (
                        format!("{:.2}", a.cpu_s),
                        per_m,
                        format!("{:.1}", mb(a.rss_idle_kib)),
                        format!("{:.1}", mb(a.hwm_kib)),
                    )
                });
        let _ = writeln!(
            s,
            "{:<4} {:<6} {:>11}% {:>12} {:>11.2} {:>11} {:>14} {:>13} {:>13}  {} -> {}",
            p.qos,
            p.kind.name(),
            opt(p.machine_busy_pct, 0),
            opt(p.broker_cpu_s, 2),
            p.bench_cpu_s,
            cpu,
            per_m,
            idle,
            hwm,
            p.load.0,
            p.load.1
        );
    }

    for p in phases {
        let Some(a) = &p.agent else { continue };
        let _ = writeln!(s, "\nagent, QoS {}:", p.qos);
        let _ = writeln!(
            s,
            "  model package loaded: {}; first->last receive {:.2} s; end-time resolution {} ms; \
             dead letters {}; readings without ts {}; exit after SIGTERM: {}",
            match a.model_loaded {
                Some(true) => "yes",
                Some(false) => "NO (see log)",
                None => "unknown",
            },
            a.recv_span_s,
            a.poll_ms,
            p.dead_letters,
            a.without_ts,
            a.exit
        );
        let _ = writeln!(
            s,
            "  memory: idle VmRSS {:.1} MB; at the end RssAnon {:.1} MB + RssFile {:.1} MB (file = mapped \
             binary pages); peak VmHWM {:.1} MB",
            mb(a.rss_idle_kib),
            mb(a.rss_anon_file_kib.0),
            mb(a.rss_anon_file_kib.1),
            mb(a.hwm_kib)
        );
        if let Some((n, per, us)) = a.commits {
            let _ = writeln!(
                s,
                "  group commits (agent debug log): {n}, {per:.0} messages each on average, {us:.0} µs each on average"
            );
        }
        if p.timed_out && p.got < p.sent {
            let _ = writeln!(
                s,
                "  INCOMPLETE: no new rows for --idle-timeout-secs with {} of {} messages stored \
                 (the broker dropped messages or the agent stalled; see docs/benchmarks.md)",
                p.got + p.dead_letters,
                p.sent
            );
        }
        let share = |x: f64| {
            if p.span_s > 0.0 {
                100.0 * x / p.span_s
            } else {
                0.0
            }
        };
        let threads: Vec<String> = a
            .threads
            .iter()
            .filter(|(_, _, cpu, _)| *cpu >= 0.01)
            .map(|(name, n, cpu, wait)| {
                format!(
                    "{name} x{n} {cpu:.2} s CPU ({:.0}% of span) + {wait:.2} s waiting for a CPU ({:.0}%)",
                    share(*cpu),
                    share(*wait)
                )
            })
            .collect();
        let _ = writeln!(s, "  by thread: {}", threads.join("; "));
        let _ = writeln!(s, "  log WARN/ERROR lines: {}", a.warnings.0);
        for l in &a.warnings.1 {
            let _ = writeln!(s, "    {l}");
        }
        if let Some(d) = &a.state_dir {
            let _ = writeln!(s, "  state kept in {}", d.display());
        }
    }

    let _ = writeln!(s, "\ntargets (printed, not asserted)");
    let rate_of = |qos: u8, kind: Kind| phases.iter().find(|p| p.qos == qos && p.kind == kind);
    for (qos, target) in [(0u8, TARGET_RATIO_QOS0), (1, TARGET_RATIO_QOS1)] {
        let (Some(b), Some(a)) = (rate_of(qos, Kind::Bare), rate_of(qos, Kind::Agent)) else {
            continue;
        };
        let ratio = if b.rate() > 0.0 {
            a.rate() / b.rate()
        } else {
            0.0
        };
        // Design: a ceiling that lost messages measured the broker's drop
        // policy, so no ratio against it is a verdict; an agent that lost
        // messages against a complete ceiling missed the target.
        let verdict = if b.lost() > 0 {
            format!(
                "NOT COMPARABLE: the bare subscriber missed {} (broker limits); the agent missed {}",
                b.lost(),
                a.lost()
            )
        } else if a.lost() > 0 {
            format!(
                "MISSED: the agent stored {} of {}",
                a.got + a.dead_letters,
                a.sent
            )
        } else {
            verdict(ratio >= target).to_owned()
        };
        let _ = writeln!(
            s,
            "  agent/bare rate, QoS {qos}: {:.0} / {:.0} = {ratio:.2}  target >= {target}  {verdict}",
            a.rate(),
            b.rate(),
        );
    }
    for p in phases.iter().filter(|p| p.kind == Kind::Agent) {
        let Some(a) = &p.agent else { continue };
        let _ = writeln!(
            s,
            "  agent peak RSS (VmHWM), QoS {}: {:.1} MB ({} KiB)  target < 20 MB  {}",
            p.qos,
            mb(a.hwm_kib),
            a.hwm_kib,
            verdict(a.hwm_kib * 1024 < TARGET_RSS_BYTES)
        );
    }
    for p in phases.iter().filter(|p| p.kind == Kind::Agent) {
        let Some(a) = &p.agent else { continue };
        if p.got > 0 {
            let _ = writeln!(
                s,
                "  agent CPU per million messages, QoS {}: {:.2} s  (no target)",
                p.qos,
                a.cpu_s / (p.got as f64 / 1e6)
            );
        }
    }
    s
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<i64> = (1..=100).rev().collect();
        let p = Pcts::of(&mut v);
        assert_eq!(
            p,
            Some(Pcts {
                p50: 50,
                p99: 99,
                max: 100,
                n: 100
            })
        );
        assert_eq!(Pcts::of(&mut []), None);
        assert_eq!(Pcts::of(&mut [7]).map(|p| p.p99), Some(7));
    }
}
