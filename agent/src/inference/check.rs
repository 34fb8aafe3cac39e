//! Fitness checks of a model package: `edge-agent model check DIR`, and the
//! same check run in a child process for packages that arrive while the
//! agent runs.
//!
//! Owns the check report (shapes, golden pairs, per-run latency) and the
//! child-process verifier: the agent's own binary runs `model check --json`
//! under `prlimit` (address-space and CPU limits) with a wall-clock timeout,
//! so a model that crashes, hangs or exhausts memory in tract kills the
//! child, never the agent. Only a package the child accepted is loaded
//! in-process.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::package::Package;
use super::runtime::{Runner, Shapes};

/// Timed runs per plan when measuring latency.
pub const LATENCY_RUNS: usize = 50;

/// Per-run latency of one plan, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Rows per run.
    pub rows: usize,
    /// Timed runs.
    pub runs: usize,
    /// Median run.
    pub median_us: u64,
    /// Slowest run.
    pub max_us: u64,
}

/// What `model check` found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The package directory.
    pub dir: PathBuf,
    /// Fit to go live.
    pub ok: bool,
    /// Model name, once the manifest parsed.
    pub name: Option<String>,
    /// Model version.
    pub version: Option<String>,
    /// sha256 of the ONNX file (verified).
    pub sha256: Option<String>,
    /// Input tensor name.
    pub input_tensor: Option<String>,
    /// Output tensor name and kind.
    pub output: Option<String>,
    /// Shapes, once tract loaded the graph.
    pub shapes: Option<Shapes>,
    /// Golden pairs reproduced.
    pub golden: usize,
    /// Latency of the batch-1 plan and, when there is one, the batched plan.
    pub latency: Vec<Latency>,
    /// Why it is not fit, with its causes.
    pub error: Option<String>,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn time_runs(runner: &Runner, rows: &[Vec<f32>], runs: usize) -> Option<Latency> {
    let mut us = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        runner.run(rows).ok()?;
        us.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    us.sort_unstable();
    Some(Latency {
        rows: rows.len(),
        runs,
        median_us: us.get(runs / 2).copied().unwrap_or(0),
        max_us: us.last().copied().unwrap_or(0),
    })
}

/// Checks a package in this process: manifest and sha256, tract load with
/// the manifest's input shape, every golden pair (alone and batched), then
/// `runs` timed runs per plan.
#[must_use]
pub fn check_package(dir: &Path, runs: usize) -> CheckReport {
    let mut report = CheckReport {
        dir: dir.to_owned(),
        ok: false,
        name: None,
        version: None,
        sha256: None,
        input_tensor: None,
        output: None,
        shapes: None,
        golden: 0,
        latency: Vec::new(),
        error: None,
    };
    let package = match Package::read(dir) {
        Ok(p) => p,
        Err(e) => {
            report.error = Some(chain(&e));
            return report;
        }
    };
    let m = &package.manifest;
    report.name = Some(m.name.clone());
    report.version = Some(m.version.clone());
    report.sha256 = Some(m.sha256.to_ascii_lowercase());
    report.input_tensor = Some(m.input.tensor.clone());
    report.output = Some(format!("{} ({})", m.output.tensor, m.output.kind));
    let runner = match Runner::build(&package) {
        Ok(r) => r,
        Err(e) => {
            report.error = Some(format!("tract refused the model: {}", chain(&e)));
            return report;
        }
    };
    report.shapes = Some(runner.shapes.clone());
    if let Err(e) = runner.check_golden(&package) {
        report.error = Some(chain(&e));
        return report;
    }
    report.golden = m.golden.len();
    let first = m
        .golden
        .first()
        .map(|g| g.input.clone())
        .unwrap_or_default();
    report
        .latency
        .extend(time_runs(&runner, std::slice::from_ref(&first), runs));
    if runner.batch_size() > 1 {
        let full = vec![first; runner.batch_size()];
        report.latency.extend(time_runs(&runner, &full, runs));
    }
    report.ok = true;
    report
}

/// The human-readable form of a report, as `model check` prints it.
#[must_use]
pub fn render(r: &CheckReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: {} {}",
        r.dir.display(),
        r.name.as_deref().unwrap_or("?"),
        r.version.as_deref().unwrap_or("?")
    );
    if let Some(h) = &r.sha256 {
        let _ = writeln!(s, "  sha256   {h} (matches model.onnx)");
    }
    if let Some(sh) = &r.shapes {
        let _ = writeln!(
            s,
            "  input    {:?}: graph declares {}, runs as {:?}{}",
            r.input_tensor.as_deref().unwrap_or("?"),
            sh.declared_input,
            sh.input,
            if sh.batch_size > 1 {
                let batched: Vec<usize> = std::iter::once(sh.batch_size)
                    .chain(sh.input.iter().skip(1).copied())
                    .collect();
                format!(" and {batched:?} (partial batches padded)")
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "  output   {}: {:?} per batch-1 run",
            r.output.as_deref().unwrap_or("?"),
            sh.output
        );
    }
    if r.golden > 0 {
        let _ = writeln!(s, "  golden   {} pair(s) reproduced", r.golden);
    }
    for l in &r.latency {
        let _ = writeln!(
            s,
            "  latency  batch {}: median {} us, max {} us over {} runs ({} us per window)",
            l.rows,
            l.median_us,
            l.max_us,
            l.runs,
            l.median_us / u64::try_from(l.rows.max(1)).unwrap_or(1)
        );
    }
    match &r.error {
        None if r.ok => s.push_str("fit to go live\n"),
        None => s.push_str("NOT fit to go live\n"),
        Some(e) => {
            let _ = writeln!(s, "NOT fit to go live: {e}");
        }
    }
    s
}

/// How packages are verified in a child process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySettings {
    /// The `edge-agent` binary that runs `model check --json`.
    pub checker: PathBuf,
    /// Wall-clock limit; the child is killed after it.
    pub timeout: Duration,
    /// Address-space limit of the child (`prlimit --as`).
    pub max_memory_bytes: u64,
    /// The `prlimit` binary; `None` runs the child without resource limits.
    pub prlimit: Option<PathBuf>,
}

impl VerifySettings {
    /// This process's own binary, the system `prlimit` when installed.
    #[must_use]
    pub fn for_current_exe(timeout: Duration, max_memory_bytes: u64) -> Self {
        Self {
            checker: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("edge-agent")),
            timeout,
            max_memory_bytes,
            prlimit: find_prlimit(),
        }
    }
}

/// The util-linux `prlimit` binary, if installed in a standard place.
#[must_use]
pub fn find_prlimit() -> Option<PathBuf> {
    ["/usr/bin/prlimit", "/bin/prlimit", "/usr/local/bin/prlimit"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Why a child-process verification refused a package.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The checker could not be started.
    #[error("cannot start the verifier {path}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The checker ran past the timeout and was killed.
    #[error("verification did not finish within {0:?}; the verifier was killed")]
    Timeout(Duration),
    /// The checker died without a verdict (crash, signal, memory limit).
    #[error("the verifier crashed ({status}) without a verdict: {stderr}")]
    Crashed {
        /// Exit status.
        status: String,
        /// End of its stderr.
        stderr: String,
    },
    /// The checker ran and found the package unfit.
    #[error("{0}")]
    Unfit(String),
}

/// Runs `checker model check --json DIR` in a child process under the
/// configured limits and returns its report when the package is fit. The
/// child is killed when `cancel` fires (agent shutdown).
///
/// Blocking: call it from a blocking thread.
///
/// # Errors
/// [`VerifyError`]: the package is unfit, or the child crashed or timed out.
pub fn verify_in_child(
    dir: &Path,
    s: &VerifySettings,
    cancel: &CancellationToken,
) -> Result<CheckReport, VerifyError> {
    let mut cmd = match &s.prlimit {
        Some(prlimit) => {
            let mut c = Command::new(prlimit);
            c.arg(format!("--as={}", s.max_memory_bytes))
                .arg(format!("--cpu={}", s.timeout.as_secs().max(1) + 1))
                .arg("--")
                .arg(&s.checker);
            c
        }
        None => Command::new(&s.checker),
    };
    cmd.args(["model", "check", "--json"])
        .arg(dir)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| VerifyError::Spawn {
        path: s.checker.clone(),
        source,
    })?;
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let deadline = Instant::now() + s.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline || cancel.is_cancelled() => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => {
                let _ = child.kill();
                break child.wait().ok();
            }
        }
    };
    let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    let Some(status) = status else {
        return Err(VerifyError::Timeout(s.timeout));
    };
    let report: Option<CheckReport> = serde_json::from_slice(&stdout).ok();
    match report {
        Some(r) if r.ok && status.success() => Ok(r),
        Some(r) => Err(VerifyError::Unfit(
            r.error.unwrap_or_else(|| "not fit to go live".into()),
        )),
        None => {
            let text = String::from_utf8_lossy(&stderr);
            let tail: String = text
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(VerifyError::Crashed {
                status: status.to_string(),
                stderr: tail.trim().to_owned(),
            })
        }
    }
}

fn reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // Design: bounded, so a runaway child cannot fill the agent's memory.
        let _ = r.by_ref().take(1 << 20).read_to_end(&mut buf);
        let _ = std::io::copy(&mut r, &mut std::io::sink());
        buf
    })
}

/// `edge-agent model check DIR [--json]`: prints the report and returns
/// whether the package is fit to go live.
#[must_use]
pub fn cli(dir: &Path, json: bool) -> (String, bool) {
    let report = check_package(dir, LATENCY_RUNS);
    let text = if json {
        serde_json::to_string(&report).unwrap_or_else(|_| "{}".into())
    } else {
        render(&report)
    };
    (text, report.ok)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp")
    }

    #[test]
    fn shipped_package_is_fit_and_reports_shapes() {
        let r = check_package(&shipped(), 5);
        assert!(r.ok, "{r:?}");
        let sh = r.shapes.clone().unwrap();
        assert_eq!(sh.input, vec![1, 12]);
        assert_eq!(sh.output, vec![1, 1]);
        assert_eq!(sh.declared_input, "[?, 12]");
        assert_eq!(r.golden, 3);
        assert_eq!(r.latency.len(), 1);
        let text = render(&r);
        assert!(text.ends_with("fit to go live\n"), "{text}");
        let back: CheckReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_rank_3_package_reports_its_real_shapes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/motor-lstm");
        let r = check_package(&dir, 3);
        assert!(r.ok, "{r:?}");
        let sh = r.shapes.clone().unwrap();
        assert_eq!(sh.input, vec![1, 32, 3]);
        assert_eq!(sh.batch_size, 4);
        assert_eq!(
            r.latency.iter().map(|l| l.rows).collect::<Vec<_>>(),
            vec![1, 4]
        );
        let text = render(&r);
        assert!(
            text.contains("graph declares [?, 32, 3], runs as [1, 32, 3] and [4, 32, 3]"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_package_is_not_fit_and_says_why() {
        let r = check_package(Path::new("/nonexistent/package"), 1);
        assert!(!r.ok);
        assert!(r.error.unwrap().contains("model.toml"));
    }
}
