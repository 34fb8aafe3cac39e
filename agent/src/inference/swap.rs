//! Safe hot swap: watches the packages directory and hands verified models
//! to the inference stage.
//!
//! Layout: `<packages_dir>/<name>/<version>/{model.toml,model.onnx}`. For
//! each name the agent serves the highest version present that has not been
//! refused; removing a version directory therefore rolls back to the next
//! one. Names and versions starting with `.` are ignored, so a downloader
//! writes `<name>/.incoming-*` and renames it to `<version>` (atomic on one
//! file system): the watcher never sees half a package.
//!
//! A candidate is verified in a child process first ([`super::check`]:
//! sha256, tract load, input shape against the manifest, golden pairs,
//! under memory and time limits), then loaded in-process, and only then
//! sent to the stage, which swaps it in between two batches. Any failure
//! keeps the current model serving, is logged at ERROR and counted in
//! [`super::InferenceMetrics::swap_failures`]; the refused directory is not
//! retried until its `model.toml` changes. Nothing here deletes files.
//!
//! Trials ([`super::trial`]): with trials on, a version without an
//! `.accepted` marker is sent on trial, and its `.trial` marker counts how
//! often that happened. The stage's verdict comes back as a
//! [`TrialOutcome`]: adopted writes `.accepted`; rolled back writes
//! `.rejected` (with the reason), which removes the version from selection
//! for good, so a restart never serves it again. A version still on trial
//! after [`MAX_TRIAL_STARTS`] starts (the agent kept stopping during its
//! trial, for instance crashing) is rejected too: no crash loop. A
//! `.retired` marker (written by the rollout when the registry directs a
//! downgrade) also removes a version from selection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::check::{VerifySettings, verify_in_child};
use super::package::parse_version;
use super::shadow::{ShadowReport, ShadowUpdate};
use super::trial::TrialOutcome;
use super::{InferenceMetrics, LoadedModel};
use crate::rollout::reports::ReportQueue;
use crate::telemetry::Counters;
use sync_protocol::registry::{RolloutEvent, RolloutReport};

/// Marker of a version that passed its trial.
pub const ACCEPTED: &str = ".accepted";
/// Marker of a version refused for good (trial failure, or too many
/// starts on trial); holds the reason.
pub const REJECTED: &str = ".rejected";
/// Marker of a version withdrawn by the registry (a directed downgrade).
pub const RETIRED: &str = ".retired";
/// Marker counting how often a version was sent on trial.
pub const TRIAL: &str = ".trial";
/// Starts on trial after which a version still not adopted is rejected.
pub const MAX_TRIAL_STARTS: u32 = 3;

/// Whether `dir` carries `marker`.
#[must_use]
pub fn has_marker(dir: &Path, marker: &str) -> bool {
    dir.join(marker).is_file()
}

/// Writes `marker` in `dir` with `text` (temp file, fsync, rename).
///
/// # Errors
/// The I/O error.
pub fn write_marker(dir: &Path, marker: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{marker}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(marker))?;
    std::fs::File::open(dir)?.sync_all()
}

fn trial_starts(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join(TRIAL))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// A version directory found in the packages directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Model name (directory name).
    pub name: String,
    /// Parsed version (directory name).
    pub version: (u64, u64, u64),
    /// The version directory.
    pub dir: PathBuf,
}

impl Candidate {
    /// Whether the version may be selected: not rejected, not retired.
    #[must_use]
    pub fn selectable(&self) -> bool {
        !has_marker(&self.dir, REJECTED) && !has_marker(&self.dir, RETIRED)
    }
}

/// Lists `<dir>/<name>/<version>/` entries; unreadable or oddly named
/// entries are skipped (a missing directory is empty).
#[must_use]
pub fn scan(dir: &Path) -> Vec<Candidate> {
    let mut out = Vec::new();
    let Ok(names) = std::fs::read_dir(dir) else {
        return out;
    };
    for n in names.flatten() {
        let name = n.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !n.path().is_dir() {
            continue;
        }
        let Ok(versions) = std::fs::read_dir(n.path()) else {
            continue;
        };
        for v in versions.flatten() {
            let vname = v.file_name().to_string_lossy().into_owned();
            if vname.starts_with('.') || !v.path().is_dir() {
                continue;
            }
            if let Some(version) = parse_version(&vname) {
                out.push(Candidate {
                    name: name.clone(),
                    version,
                    dir: v.path(),
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    out
}

fn fingerprint(dir: &Path) -> String {
    std::fs::read(dir.join("model.toml"))
        .map_or_else(|_| String::new(), |b| hex::encode(Sha256::digest(&b)))
}

/// Why a candidate was refused.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The child-process verification refused it.
    #[error("verification failed")]
    Verify(#[from] super::check::VerifyError),
    /// The in-process load failed after the child accepted it.
    #[error("in-process load failed")]
    Load(#[from] super::InferenceError),
    /// The manifest's name or version differs from the directory's.
    #[error("manifest says {manifest}, the directory is {dir}")]
    Misplaced {
        /// `name/version` from the manifest.
        manifest: String,
        /// `name/version` from the path.
        dir: String,
    },
    /// The package changed between verification and load.
    #[error("model.onnx changed between verification and load")]
    Changed,
    /// The verifier thread failed.
    #[error("verifier task failed")]
    Join,
}

/// The package watcher.
pub struct Watcher {
    packages_dir: PathBuf,
    interval: Duration,
    verify: VerifySettings,
    /// name -> directory being served.
    serving: HashMap<String, PathBuf>,
    /// directory -> fingerprint of the refused `model.toml`.
    refused: HashMap<PathBuf, String>,
    tx: mpsc::Sender<LoadedModel>,
    metrics: Arc<InferenceMetrics>,
    /// Trial outcomes from the stage; `Some` turns trials on.
    outcomes: Option<mpsc::Receiver<TrialOutcome>>,
    /// Whether versions not yet adopted go on trial.
    trials: bool,
    reports: Option<ReportQueue>,
    /// Shadow candidates: `<dir>/<name>/<version>/`, and where to send them.
    shadow: Option<(PathBuf, mpsc::Sender<ShadowUpdate>)>,
    /// name -> shadow directory being run.
    shadowing: HashMap<String, PathBuf>,
    shadow_reports: Option<mpsc::Receiver<ShadowReport>>,
}

impl Watcher {
    /// A watcher; `serving` are the models the stage starts with.
    #[must_use]
    pub fn new(
        packages_dir: PathBuf,
        interval: Duration,
        verify: VerifySettings,
        serving: &[LoadedModel],
        tx: mpsc::Sender<LoadedModel>,
        metrics: Arc<InferenceMetrics>,
    ) -> Self {
        Self {
            packages_dir,
            interval,
            verify,
            serving: serving
                .iter()
                .map(|m| (m.name.clone(), m.dir.clone()))
                .collect(),
            refused: HashMap::new(),
            tx,
            metrics,
            outcomes: None,
            trials: false,
            reports: None,
            shadow: None,
            shadowing: HashMap::new(),
            shadow_reports: None,
        }
    }

    /// Runs the highest version under `dir/<name>/` as `<name>`'s shadow
    /// candidate (verified like any version; sent on `updates`), stops it
    /// when the directory empties, and queues the stage's comparisons from
    /// `reports` as `shadow` rollout reports.
    #[must_use]
    pub fn with_shadows(
        mut self,
        dir: PathBuf,
        updates: mpsc::Sender<ShadowUpdate>,
        reports: mpsc::Receiver<ShadowReport>,
    ) -> Self {
        self.shadow = Some((dir, updates));
        self.shadow_reports = Some(reports);
        self
    }

    async fn poll_shadows(&mut self, shutdown: &CancellationToken) {
        let Some((dir, updates)) = self.shadow.clone() else {
            return;
        };
        let mut wanted: HashMap<String, Candidate> = HashMap::new();
        for c in scan(&dir) {
            wanted.insert(c.name.clone(), c);
        }
        let gone: Vec<String> = self
            .shadowing
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.shadowing.remove(&name);
            let _ = updates.send(ShadowUpdate { name, model: None }).await;
        }
        let mut names: Vec<String> = wanted.keys().cloned().collect();
        names.sort_unstable();
        for name in names {
            let c = &wanted[&name];
            if shutdown.is_cancelled() {
                return;
            }
            if self.shadowing.get(&name) == Some(&c.dir)
                || self
                    .refused
                    .get(&c.dir)
                    .is_some_and(|f| *f == fingerprint(&c.dir))
            {
                continue;
            }
            match self.verify_and_load(c, shutdown).await {
                Ok(model) => {
                    self.shadowing.insert(name.clone(), c.dir.clone());
                    let _ = updates
                        .send(ShadowUpdate {
                            name,
                            model: Some(model),
                        })
                        .await;
                }
                Err(e) => {
                    Counters::add(&self.metrics.swap_failures, 1);
                    self.refused.insert(c.dir.clone(), fingerprint(&c.dir));
                    tracing::error!(model = %c.name, dir = %c.dir.display(), error = %chain(&e), "shadow candidate refused");
                    self.report(
                        &c.name,
                        &version_of(c),
                        RolloutEvent::Refused,
                        Some(format!(
                            "shadow candidate failed its package checks: {}",
                            chain(&e)
                        )),
                    )
                    .await;
                }
            }
        }
    }

    /// Turns trials on: versions not yet adopted are sent on trial, and the
    /// stage's verdicts arrive on `outcomes` (see the module docs).
    #[must_use]
    pub fn with_trials(mut self, outcomes: mpsc::Receiver<TrialOutcome>) -> Self {
        self.outcomes = Some(outcomes);
        self.trials = true;
        self
    }

    /// Queues a rollout report for the registry for every refusal, adoption
    /// and rollback.
    #[must_use]
    pub fn with_reports(mut self, reports: ReportQueue) -> Self {
        self.reports = Some(reports);
        self
    }

    async fn report(&self, name: &str, version: &str, event: RolloutEvent, reason: Option<String>) {
        if let Some(q) = &self.reports {
            q.push(RolloutReport {
                model: name.to_owned(),
                version: version.to_owned(),
                sha256: None,
                event,
                reason,
                at_ms: crate::now_ms(),
                shadow: None,
            })
            .await;
        }
    }

    /// Records a trial outcome: markers on disk, the version now served,
    /// and a report.
    pub async fn record(&mut self, outcome: TrialOutcome) {
        let (marker, text, event) = match &outcome.failure {
            None => (
                ACCEPTED,
                format!("{{\"at_ms\":{}}}\n", crate::now_ms()),
                RolloutEvent::Adopted,
            ),
            Some(reason) => (
                REJECTED,
                serde_json::json!({"at_ms": crate::now_ms(), "reason": reason}).to_string(),
                RolloutEvent::RolledBack,
            ),
        };
        let dir = outcome.dir.clone();
        let written = tokio::task::spawn_blocking(move || {
            write_marker(&dir, marker, &text)?;
            match std::fs::remove_file(dir.join(TRIAL)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(dir = %outcome.dir.display(), marker, "cannot record the trial outcome on disk");
        }
        if outcome.failure.is_some() {
            match &outcome.restored {
                Some((_, dir)) => {
                    self.serving.insert(outcome.name.clone(), dir.clone());
                }
                None => {
                    self.serving.remove(&outcome.name);
                }
            }
        }
        self.report(
            &outcome.name,
            &outcome.version,
            event,
            outcome.failure.clone(),
        )
        .await;
    }

    /// Scans now and then every interval until `shutdown`, recording trial
    /// outcomes as they arrive.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut outcomes = self.outcomes.take();
        let mut shadow_reports = self.shadow_reports.take();
        loop {
            self.poll(&shutdown).await;
            self.poll_shadows(&shutdown).await;
            let sleep = tokio::time::sleep(self.interval);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = &mut sleep => break,
                    o = recv_outcome(outcomes.as_mut()) => match o {
                        Some(o) => self.record(o).await,
                        None => outcomes = None,
                    },
                    r = recv_outcome(shadow_reports.as_mut()) => match r {
                        Some((name, version, summary)) => {
                            if let Some(q) = &self.reports {
                                q.push(RolloutReport {
                                    model: name,
                                    version,
                                    sha256: None,
                                    event: RolloutEvent::Shadow,
                                    reason: None,
                                    at_ms: crate::now_ms(),
                                    shadow: Some(summary),
                                })
                                .await;
                            }
                        }
                        None => shadow_reports = None,
                    },
                }
            }
        }
    }

    /// One scan: verifies and sends every model whose target version changed.
    pub async fn poll(&mut self, shutdown: &CancellationToken) {
        let candidates = scan(&self.packages_dir);
        let mut targets: HashMap<&str, &Candidate> = HashMap::new();
        for c in &candidates {
            if !c.selectable() {
                continue;
            }
            if self
                .refused
                .get(&c.dir)
                .is_some_and(|f| *f == fingerprint(&c.dir))
            {
                continue;
            }
            targets.insert(c.name.as_str(), c);
        }
        let mut names: Vec<&str> = targets.keys().copied().collect();
        names.sort_unstable();
        for name in names {
            if shutdown.is_cancelled() {
                return;
            }
            let c = targets[name];
            if self.serving.get(name) == Some(&c.dir) {
                continue;
            }
            let on_trial = self.trials && !has_marker(&c.dir, ACCEPTED);
            if on_trial && trial_starts(&c.dir) >= MAX_TRIAL_STARTS {
                let reason = format!(
                    "still on trial after {MAX_TRIAL_STARTS} starts (the agent kept stopping during its trial)"
                );
                tracing::error!(model = %c.name, dir = %c.dir.display(), %reason, "model version rejected");
                if let Err(e) = write_marker(
                    &c.dir,
                    REJECTED,
                    &serde_json::json!({"at_ms": crate::now_ms(), "reason": reason}).to_string(),
                ) {
                    tracing::error!(dir = %c.dir.display(), error = %e, "cannot write the rejection marker");
                    self.refused.insert(c.dir.clone(), fingerprint(&c.dir));
                }
                Counters::add(&self.metrics.rollbacks, 1);
                let version = version_of(c);
                self.report(&c.name, &version, RolloutEvent::RolledBack, Some(reason))
                    .await;
                continue;
            }
            match self.verify_and_load(c, shutdown).await {
                Ok(mut model) => {
                    if on_trial {
                        let starts = trial_starts(&c.dir) + 1;
                        if let Err(e) = write_marker(&c.dir, TRIAL, &format!("{starts}\n")) {
                            tracing::error!(dir = %c.dir.display(), error = %e, "cannot count the trial start; not swapping");
                            continue;
                        }
                        model.on_trial = true;
                    }
                    self.serving.insert(c.name.clone(), c.dir.clone());
                    if self.tx.send(model).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    Counters::add(&self.metrics.swap_failures, 1);
                    self.report(
                        &c.name,
                        &version_of(c),
                        RolloutEvent::Refused,
                        Some(format!("package checks failed: {}", chain(&e))),
                    )
                    .await;
                    self.refused.insert(c.dir.clone(), fingerprint(&c.dir));
                    tracing::error!(
                        model = %c.name,
                        dir = %c.dir.display(),
                        serving = %self.serving.get(name).map_or_else(|| "nothing".to_owned(), |d| d.display().to_string()),
                        error = %chain(&e),
                        "model package refused; the current model keeps serving"
                    );
                }
            }
        }
    }

    async fn verify_and_load(
        &self,
        c: &Candidate,
        shutdown: &CancellationToken,
    ) -> Result<LoadedModel, SwapError> {
        let dir = c.dir.clone();
        let verify = self.verify.clone();
        let cancel = shutdown.clone();
        let report = tokio::task::spawn_blocking(move || verify_in_child(&dir, &verify, &cancel))
            .await
            .map_err(|_| SwapError::Join)??;
        let dir_id = format!(
            "{}/{}",
            c.name,
            c.dir
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned())
        );
        let manifest_id = format!(
            "{}/{}",
            report.name.as_deref().unwrap_or("?"),
            report.version.as_deref().unwrap_or("?")
        );
        if dir_id != manifest_id {
            return Err(SwapError::Misplaced {
                manifest: manifest_id,
                dir: dir_id,
            });
        }
        let dir = c.dir.clone();
        let model = tokio::task::spawn_blocking(move || LoadedModel::load(&dir))
            .await
            .map_err(|_| SwapError::Join)??;
        if Some(&model.sha256.to_ascii_lowercase()) != report.sha256.as_ref() {
            return Err(SwapError::Changed);
        }
        tracing::info!(model = %model.name, version = %model.version, dir = %c.dir.display(), "model package verified");
        Ok(model)
    }
}

fn version_of(c: &Candidate) -> String {
    let (a, b, p) = c.version;
    format!("{a}.{b}.{p}")
}

async fn recv_outcome<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scan_lists_versions_and_skips_dot_entries() {
        let d = tempfile::tempdir().unwrap();
        for p in [
            "m/1.0.0",
            "m/1.10.0",
            "m/1.2.0",
            "m/.incoming-1",
            "m/latest",
            ".tmp/1.0.0",
            "n/0.1.0",
        ] {
            std::fs::create_dir_all(d.path().join(p)).unwrap();
        }
        let got: Vec<(String, (u64, u64, u64))> = scan(d.path())
            .into_iter()
            .map(|c| (c.name, c.version))
            .collect();
        assert_eq!(
            got,
            vec![
                ("m".into(), (1, 0, 0)),
                ("m".into(), (1, 2, 0)),
                ("m".into(), (1, 10, 0)),
                ("n".into(), (0, 1, 0)),
            ]
        );
        assert!(scan(&d.path().join("absent")).is_empty());
    }
}
