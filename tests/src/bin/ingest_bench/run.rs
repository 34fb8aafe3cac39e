//! The benchmark sequence: for each QoS, a bare phase then an agent phase on
//! fresh topics, each bounded by the idle timeout and the phase bound; then
//! the report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Args;
use crate::agent::{AgentConfig, AgentProcess, BufferReader};
use crate::broker::{self, Broker};
use crate::procfs::{self, MachineCpu};
use crate::report::{self, AgentFigures, Kind, Pcts, Phase};
use crate::workload::{self, BareSubscriber, Workload};

/// Bound on the agent's start (config, model load, connect, subscribe).
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the agent's exit after SIGTERM (its own drain deadline is 5 s).
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest interval between buffer polls.
const MIN_POLL: Duration = Duration::from_millis(100);
/// Log lines of WARN or ERROR shown in the report.
const SHOWN_WARNINGS: usize = 5;

/// Runs every phase and prints the report on stdout.
///
/// # Errors
/// Bad arguments, a broker or agent that cannot be started, a connection
/// failure, or a wait that passed its bound.
pub async fn run(args: Args) -> Result<()> {
    if args.qos.is_empty() || args.qos.iter().any(|q| *q > 1) {
        bail!("--qos takes 0 and/or 1");
    }
    if args.messages == 0 || args.devices == 0 || args.publishers == 0 {
        bail!("--messages, --devices and --publishers must be positive");
    }
    if args.devices > 1000 {
        bail!("--devices is at most 1000 (topics are dev-000..dev-999)");
    }
    let hz = procfs::clock_ticks()?;
    let agent_bin = locate(&args.agent_bin, "--agent-bin")?;
    let model = locate(&args.model, "--model")?;
    let version = broker::mosquitto_version(&args.mosquitto_bin);
    let broker = match &args.broker {
        Some(addr) => Broker::existing(addr, args.broker_pid, &version)?,
        None => Broker::spawn_own(&args.mosquitto_bin, &version)?,
    };
    let run_id = format!(
        "{:x}{:x}",
        edge_agent::now_ms() % 0x100_0000,
        std::process::id() % 0x1000
    );
    let header = header(&args, &broker, &agent_bin, &model, hz, &run_id);
    for (k, v) in &header {
        eprintln!("{k}: {v}");
    }

    let mut phases = Vec::new();
    for &qos in &args.qos {
        let w = workload(&args, &run_id, qos, Kind::Bare);
        eprintln!("QoS {qos}: bare subscriber on {} ...", w.filter());
        let p = bare_phase(&args, &broker, &w, hz).await?;
        eprintln!("  {} of {} in {:.2} s", p.got, p.sent, p.span_s);
        phases.push(p);

        let w = workload(&args, &run_id, qos, Kind::Agent);
        eprintln!("QoS {qos}: edge-agent on {} ...", w.filter());
        let p = agent_phase(&args, &broker, &w, &agent_bin, &model, hz).await?;
        eprintln!("  {} of {} committed in {:.2} s", p.got, p.sent, p.span_s);
        phases.push(p);
    }
    print!("{}", report::render(&header, &phases));
    Ok(())
}

/// A relative path as given if it exists, else relative to the workspace.
fn locate(path: &Path, flag: &str) -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let found = [path.to_owned(), workspace.join(path)]
        .into_iter()
        .take(if path.is_absolute() { 1 } else { 2 })
        .find(|p| p.exists())
        .with_context(|| format!("{flag} {} not found", path.display()))?;
    found
        .canonicalize()
        .with_context(|| format!("{flag} {}", found.display()))
}

fn header(
    args: &Args,
    broker: &Broker,
    agent_bin: &Path,
    model: &Path,
    hz: u64,
    run_id: &str,
) -> Vec<(String, String)> {
    let cmd = |c: &str, a: &[&str]| {
        std::process::Command::new(c)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|_| "n/a".into())
    };
    let rate = if args.rate > 0.0 {
        format!("{} msg/s in total", args.rate)
    } else {
        "as fast as the broker accepts".into()
    };
    vec![
        (
            "command".into(),
            std::env::args().collect::<Vec<_>>().join(" "),
        ),
        ("date".into(), cmd("date", &[])),
        (
            "machine".into(),
            format!(
                "nproc {}, kernel {}, CLK_TCK {hz}, load avg {}",
                cmd("nproc", &[]),
                cmd("uname", &["-r"]),
                procfs::loadavg()
            ),
        ),
        ("broker".into(), broker.description.clone()),
        (
            "workload".into(),
            format!(
                "{} messages per phase, {} devices, topics bench-{run_id}-<phase>/dev-NNN/s, \
                 JSON {{ts,id,a,b,c}} ({} bytes), {} publisher client(s) (QoS 1 inflight {}), {rate}",
                args.messages,
                args.devices,
                workload::payload(999_999, edge_agent::now_ms()).len(),
                args.publishers,
                workload::PUBLISH_INFLIGHT
            ),
        ),
        (
            "agent".into(),
            format!(
                "{} (mqtt.max_unacked {}, sync disabled, default buffer settings)",
                agent_bin.display(),
                args.max_unacked
            ),
        ),
        (
            "model".into(),
            format!(
                "{} (its input stream is `temperature`, so it scores none of the bench \
                 stream `s`; it is loaded, and counts in the RSS)",
                model.display()
            ),
        ),
    ]
}

fn workload(args: &Args, run_id: &str, qos: u8, kind: Kind) -> Workload {
    let kind = match kind {
        Kind::Bare => "bare",
        Kind::Agent => "agent",
    };
    Workload {
        prefix: format!("bench-{run_id}-q{qos}-{kind}"),
        devices: args.devices,
        messages: args.messages,
        qos,
        publishers: args.publishers,
        rate: args.rate,
    }
}

/// Machine, broker and own CPU at one instant.
struct Snapshot {
    machine: MachineCpu,
    broker: Option<u64>,
    bench: u64,
    load: String,
}

impl Snapshot {
    fn take(broker_pid: Option<u32>) -> Self {
        Self {
            machine: MachineCpu::now(),
            broker: broker_pid.and_then(|p| procfs::process_ticks(p).ok()),
            bench: procfs::self_ticks().unwrap_or(0),
            load: procfs::loadavg(),
        }
    }

    /// Fills the resource fields of `p` from `self` to `later`.
    fn fill(&self, later: &Self, hz: u64, p: &mut Phase) {
        let secs = |t: u64| t as f64 / hz as f64;
        p.machine_busy_pct = self.machine.busy_pct(&later.machine);
        p.broker_cpu_s = match (self.broker, later.broker) {
            (Some(a), Some(b)) => Some(secs(b.saturating_sub(a))),
            _ => None,
        };
        p.bench_cpu_s = secs(later.bench.saturating_sub(self.bench));
        p.load = (self.load.clone(), later.load.clone());
    }
}

fn empty_phase(w: &Workload, kind: Kind) -> Phase {
    Phase {
        qos: w.qos,
        kind,
        sent: 0,
        got: 0,
        dead_letters: 0,
        span_s: 0.0,
        publish_s: 0.0,
        lat: None,
        timed_out: false,
        machine_busy_pct: None,
        broker_cpu_s: None,
        bench_cpu_s: 0.0,
        load: (String::new(), String::new()),
        agent: None,
    }
}

async fn bare_phase(args: &Args, broker: &Broker, w: &Workload, hz: u64) -> Result<Phase> {
    let idle = Duration::from_secs(args.idle_timeout_secs);
    let bound = Duration::from_secs(args.phase_timeout_secs);
    let before = Snapshot::take(broker.pid);
    let sub = BareSubscriber::start(&broker.host, broker.port, w, w.messages, idle, bound).await?;
    let published = workload::publish(&broker.host, broker.port, w, bound).await?;
    let mut received = tokio::task::spawn_blocking(move || sub.join())
        .await
        .context("bare subscriber join failed")??;
    let after = Snapshot::take(broker.pid);
    let mut p = empty_phase(w, Kind::Bare);
    p.sent = published.sent;
    p.publish_s = published.secs;
    p.got = received.count;
    p.span_s = received.span.as_secs_f64();
    p.lat = Pcts::of(&mut received.latencies_ms);
    p.timed_out = received.timed_out;
    before.fill(&after, hz, &mut p);
    Ok(p)
}

async fn agent_phase(
    args: &Args,
    broker: &Broker,
    w: &Workload,
    agent_bin: &Path,
    model: &Path,
    hz: u64,
) -> Result<Phase> {
    let idle = Duration::from_secs(args.idle_timeout_secs);
    let bound = Duration::from_secs(args.phase_timeout_secs);
    let dir = tempfile::Builder::new()
        .prefix("ingest-bench-agent-")
        .tempdir()
        .context("cannot create the agent's state dir")?;
    let config = crate::agent::write_config(
        agent_bin,
        &AgentConfig {
            state_dir: dir.path(),
            broker_url: broker.url(),
            client_id: format!("{}-edge-agent", w.prefix),
            filter: w.filter(),
            template: format!("{}/{{device}}/{{stream}}", w.prefix),
            qos: w.qos,
            max_unacked: args.max_unacked,
            model,
        },
    )?;
    let mut agent = AgentProcess::spawn(
        agent_bin,
        &config,
        &dir.path().join("agent.log"),
        &args.agent_log,
    )?;
    agent.wait_subscribed(AGENT_START_TIMEOUT).await?;
    let reader = BufferReader::open(&dir.path().join("buffer.db"))?;

    let rss_idle_kib = procfs::status_kib(agent.pid, "VmRSS")?;
    let cpu0 = procfs::process_ticks(agent.pid)?;
    let threads0 = procfs::thread_ticks(agent.pid);
    let before = Snapshot::take(broker.pid);
    let phase_deadline = Instant::now() + bound;
    let published = workload::publish(&broker.host, broker.port, w, bound).await?;

    // Poll the buffer until every message is stored, progress stops, or the
    // bound passes. A query's snapshot starts when it is sent, so the time
    // it was sent bounds the last commit it sees from above.
    let mut poll = MIN_POLL;
    let mut seen = 0u64;
    let mut last_progress = Instant::now();
    let mut last_progress_ms = edge_agent::now_ms();
    let mut timed_out = false;
    let stats = loop {
        let asked_ms = edge_agent::now_ms();
        let asked = Instant::now();
        let stats = reader.stats().await?;
        let took = asked.elapsed();
        let stored = stats.readings + stats.dead_letters;
        if stored > seen {
            seen = stored;
            last_progress = Instant::now();
            last_progress_ms = asked_ms;
        }
        if stored >= published.sent {
            break stats;
        }
        if last_progress.elapsed() > idle || Instant::now() > phase_deadline {
            timed_out = true;
            break stats;
        }
        if !agent.running() {
            bail!("agent exited during the workload:\n{}", agent.tail());
        }
        // Design: a count over a million rows is not free and this machine
        // has two cores; polling at most 20% of the time keeps the observer
        // from slowing the agent it observes.
        poll = MIN_POLL.max(took * 4);
        tokio::time::sleep(poll).await;
    };
    let cpu1 = procfs::process_ticks(agent.pid)?;
    let threads1 = procfs::thread_ticks(agent.pid);
    let hwm_kib = procfs::status_kib(agent.pid, "VmHWM")?;
    let rss_anon_file_kib = (
        procfs::status_kib(agent.pid, "RssAnon")?,
        procfs::status_kib(agent.pid, "RssFile")?,
    );
    let after = Snapshot::take(broker.pid);
    let exit = agent.terminate(AGENT_STOP_TIMEOUT).await;
    let mut lat = reader.latencies(bound).await?;
    reader.close().await;

    let secs = |t: u64| t as f64 / hz as f64;
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let warn_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    let state_dir = if args.keep_state {
        Some(dir.keep())
    } else {
        None
    };
    let mut p = empty_phase(w, Kind::Agent);
    p.sent = published.sent;
    p.publish_s = published.secs;
    p.got = stats.readings;
    p.dead_letters = stats.dead_letters;
    p.timed_out = timed_out;
    p.span_s = lat
        .first_recv_ms
        .map_or(0.0, |f| (last_progress_ms - f) as f64 / 1000.0);
    p.lat = Pcts::of(&mut lat.ms);
    before.fill(&after, hz, &mut p);
    p.agent = Some(AgentFigures {
        cpu_s: secs(cpu1.saturating_sub(cpu0)),
        hwm_kib,
        rss_idle_kib,
        rss_anon_file_kib,
        commits: commit_summary(&log),
        threads: procfs::thread_delta(&threads0, &threads1)
            .into_iter()
            .map(|t| (t.name, t.count, secs(t.ticks), t.wait_ns as f64 / 1e9))
            .collect(),
        model_loaded: agent.model_loaded,
        exit,
        poll_ms: u64::try_from(poll.as_millis()).unwrap_or(u64::MAX),
        recv_span_s: match (lat.first_recv_ms, lat.last_recv_ms) {
            (Some(f), Some(l)) => (l - f) as f64 / 1000.0,
            _ => 0.0,
        },
        without_ts: lat.without_ts,
        warnings: (
            warn_lines.len(),
            warn_lines
                .iter()
                .take(SHOWN_WARNINGS)
                .map(|l| (*l).to_owned())
                .collect(),
        ),
        state_dir,
    });
    Ok(p)
}

/// Group commits in the agent's debug log (`buffer group committed`
/// lines, present with `--agent-log info,edge_agent::buffer=debug`): count,
/// mean messages (commands) per commit, mean commit time in µs.
fn commit_summary(log: &str) -> Option<(u64, f64, f64)> {
    let field = |line: &str, key: &str| -> Option<f64> {
        let rest = line.split(key).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let (mut n, mut groups, mut us) = (0u64, 0.0, 0.0);
    for line in log.lines().filter(|l| l.contains("buffer group committed")) {
        if let (Some(g), Some(e)) = (field(line, " groups="), field(line, " elapsed_us=")) {
            n += 1;
            groups += g;
            us += e;
        }
    }
    (n > 0).then(|| (n, groups / n as f64, us / n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_commit_lines() {
        let log = "x DEBUG buffer group committed groups=10 evicted=0 rejected=0 elapsed_us=300\n\
                   x DEBUG buffer group committed groups=30 evicted=0 rejected=0 elapsed_us=100\n\
                   x INFO other";
        assert_eq!(commit_summary(log), Some((2, 20.0, 200.0)));
        assert_eq!(commit_summary("nothing"), None);
    }
}
