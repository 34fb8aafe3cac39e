//! Drift monitoring in the cloud (`docs/drift.md`): devices' drift
//! summaries stored once per `(device, model, window_start_ms)`, the fleet
//! view of a model, and fleet alerts.
//!
//! Owns the `[drift]` settings, summary validation, aggregation and the
//! fleet-alert rule; the tables belong to [`db`], the routes to [`http`].
//! A fleet alert is the retraining hook: it is stored (at most one
//! per model and fleet window), logged at WARN, listed at `GET /v1/alerts`
//! and by `cloud-sync drift alerts`. Retraining itself is not done here:
//! with `[retrain] on_fleet_alert`, the drift route hands a raised alert to
//! [`crate::retrain::alert`].

pub mod db;
pub mod http;
pub mod openapi;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sync_protocol::drift::{DriftSummary, FleetAlert, FleetDrift, FleetFeature};

use crate::config::StorageSettings;
use db::{Db, DbError, NewSummary};

/// Longest model name, version, stream or field accepted, in bytes.
const MAX_NAME_BYTES: usize = 128;
/// Most features, stale sensors or reasons in one summary.
const MAX_ITEMS: usize = 1024;

/// Why a drift operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// The summary is not acceptable (422).
    #[error("invalid drift summary: {0}")]
    Invalid(&'static str),
    /// The database failed.
    #[error("drift storage failed")]
    Db(#[from] DbError),
    /// A summary could not be encoded.
    #[error("cannot encode drift summary")]
    Encode(#[source] serde_json::Error),
}

/// Result alias for this module.
pub type Result<T, E = DriftError> = std::result::Result<T, E>;

/// `[drift]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    /// Fleet window: device windows starting in the same fleet window are
    /// judged together.
    #[serde(default = "default_fleet_window_secs")]
    pub fleet_window_secs: u64,
    /// A fleet alert is raised when more than this percentage of a model's
    /// reporting devices alert within one fleet window.
    #[serde(default = "default_fleet_alert_percent")]
    pub fleet_alert_percent: u64,
    /// Fewest reporting devices for a fleet alert.
    #[serde(default = "default_min_devices")]
    pub min_devices: u64,
}

fn default_fleet_window_secs() -> u64 {
    86_400
}
fn default_fleet_alert_percent() -> u64 {
    50
}
fn default_min_devices() -> u64 {
    1
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            fleet_window_secs: default_fleet_window_secs(),
            fleet_alert_percent: default_fleet_alert_percent(),
            min_devices: default_min_devices(),
        }
    }
}

/// Validated `[drift]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftSettings {
    /// Fleet window, ms (>= 1000).
    pub fleet_window_ms: i64,
    /// Percentage of reporting devices that must be exceeded (0..=99).
    pub fleet_alert_percent: u64,
    /// Fewest reporting devices (>= 1).
    pub min_devices: u64,
}

impl Default for DriftSettings {
    fn default() -> Self {
        Self {
            fleet_window_ms: 86_400_000,
            fleet_alert_percent: 50,
            min_devices: 1,
        }
    }
}

impl DriftConfig {
    /// Checks the values; reports problems through `problem`.
    pub fn validate(&self, mut problem: impl FnMut(&'static str, String)) -> DriftSettings {
        if self.fleet_window_secs == 0 || self.fleet_window_secs > 30 * 86_400 {
            problem(
                "drift.fleet_window_secs",
                format!(
                    "must be between 1 and 2592000, got {}",
                    self.fleet_window_secs
                ),
            );
        }
        if self.fleet_alert_percent > 99 {
            problem(
                "drift.fleet_alert_percent",
                format!(
                    "must be between 0 and 99 (more than this share alerts), got {}",
                    self.fleet_alert_percent
                ),
            );
        }
        if self.min_devices == 0 {
            problem("drift.min_devices", "must be at least 1".to_owned());
        }
        DriftSettings {
            fleet_window_ms: i64::try_from(self.fleet_window_secs.clamp(1, 30 * 86_400))
                .unwrap_or(86_400)
                * 1000,
            fleet_alert_percent: self.fleet_alert_percent.min(99),
            min_devices: self.min_devices.max(1),
        }
    }
}

/// Handle to drift storage and aggregation; cheap to clone.
#[derive(Debug, Clone)]
pub struct Drift {
    db: Db,
    settings: DriftSettings,
}

/// Who and what a fleet alert concerns (what drift-triggered retraining
/// snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertScope {
    /// Devices that reported the model in the alert's fleet window or the
    /// one before (those the alert was judged on), sorted.
    pub devices: Vec<String>,
    /// `(stream, field)` of the features their summaries judged, sorted.
    pub features: Vec<(String, String)>,
}

/// What storing a summary did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// False for a replay of a stored window.
    pub stored: bool,
    /// The fleet alert this summary raised, if any.
    pub raised: Option<FleetAlert>,
}

impl Drift {
    /// Opens the drift tables on `storage` (applying drift migrations).
    ///
    /// # Errors
    /// [`DriftError::Db`] when the database cannot be opened or migrated.
    pub async fn open(storage: &StorageSettings, settings: DriftSettings) -> Result<Drift> {
        Ok(Drift {
            db: Db::open(storage).await?,
            settings,
        })
    }

    /// The fleet window holding `window_start_ms`.
    #[must_use]
    pub fn fleet_window(&self, window_start_ms: i64) -> i64 {
        window_start_ms.div_euclid(self.settings.fleet_window_ms) * self.settings.fleet_window_ms
    }

    /// Stores `summary` from `device` once, then judges its model's fleet
    /// window: a fleet alert is raised (stored once, logged at WARN) when
    /// at least `min_devices` devices reported the model in this fleet
    /// window or the one before, and more than `fleet_alert_percent` % of
    /// them sent an alerting summary in this one.
    ///
    /// # Errors
    /// [`DriftError::Invalid`] for an unacceptable summary; storage failures.
    pub async fn store(&self, device: &str, summary: &DriftSummary) -> Result<Stored> {
        validate(summary)?;
        let stored = self
            .db
            .insert(NewSummary {
                device: device.to_owned(),
                model: summary.model.clone(),
                window_start_ms: summary.window_start_ms,
                window_end_ms: summary.window_end_ms,
                version: summary.version.clone(),
                alert: summary.alert,
                body: serde_json::to_string(summary).map_err(DriftError::Encode)?,
                received_ms: now_ms(),
            })
            .await?;
        if summary.alert {
            tracing::info!(device, model = %summary.model, reasons = %summary.reasons.join("; "), "device drift alert");
        }
        let raised = if stored {
            self.judge(&summary.model, summary.window_start_ms).await?
        } else {
            None
        };
        Ok(Stored { stored, raised })
    }

    async fn judge(&self, model: &str, window_start_ms: i64) -> Result<Option<FleetAlert>> {
        let w = self.settings.fleet_window_ms;
        let start = self.fleet_window(window_start_ms);
        let rows = self
            .db
            .summaries(model, start.saturating_sub(w), start.saturating_add(w))
            .await?;
        let reporting: BTreeSet<&str> = rows.iter().map(|r| r.device.as_str()).collect();
        let alerting: BTreeSet<&str> = rows
            .iter()
            .filter(|r| r.alert && r.window_start_ms >= start)
            .map(|r| r.device.as_str())
            .collect();
        let (n, k) = (reporting.len() as u64, alerting.len() as u64);
        if n < self.settings.min_devices || k * 100 <= self.settings.fleet_alert_percent * n {
            return Ok(None);
        }
        let alert = FleetAlert {
            model: model.to_owned(),
            window_start_ms: start,
            devices_reporting: n,
            devices_alerting: k,
            raised_ms: now_ms(),
        };
        if !self.db.insert_alert(alert.clone()).await? {
            return Ok(None);
        }
        tracing::warn!(
            model,
            window_start_ms = start,
            devices_reporting = n,
            devices_alerting = k,
            percent = self.settings.fleet_alert_percent,
            "fleet drift alert: retraining candidate"
        );
        Ok(Some(alert))
    }

    /// The devices and features `alert` was judged on: the summaries of its
    /// model in its fleet window and the one before, as [`Drift::store`]
    /// judged them.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn alert_scope(&self, alert: &FleetAlert) -> Result<AlertScope> {
        let w = self.settings.fleet_window_ms;
        let start = alert.window_start_ms;
        let rows = self
            .db
            .summaries(
                &alert.model,
                start.saturating_sub(w),
                start.saturating_add(w),
            )
            .await?;
        let devices: BTreeSet<String> = rows.iter().map(|r| r.device.clone()).collect();
        let mut features = BTreeSet::new();
        for r in &rows {
            if let Ok(s) = serde_json::from_str::<DriftSummary>(&r.body) {
                features.extend(s.features.into_iter().map(|f| (f.stream, f.field)));
            }
        }
        Ok(AlertScope {
            devices: devices.into_iter().collect(),
            features: features.into_iter().collect(),
        })
    }

    /// The fleet view of `model` over summaries whose window starts at or
    /// after `since_ms`: devices reporting and alerting, and per feature the
    /// means of PSI and mean shift over the summaries that judged it.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn fleet(&self, model: &str, since_ms: i64) -> Result<FleetDrift> {
        let rows = self.db.summaries(model, since_ms, i64::MAX).await?;
        let mut reporting = BTreeSet::new();
        let mut alerting = BTreeSet::new();
        // (stream, field) -> (psi sum, psi n, shift sum, shift n), first-seen order kept by index.
        let mut order: Vec<(String, String)> = Vec::new();
        let mut sums: BTreeMap<(String, String), (f64, u64, f64, u64)> = BTreeMap::new();
        for r in &rows {
            reporting.insert(r.device.clone());
            if r.alert {
                alerting.insert(r.device.clone());
            }
            let Ok(s) = serde_json::from_str::<DriftSummary>(&r.body) else {
                continue;
            };
            for f in s.features {
                let key = (f.stream, f.field);
                let e = sums.entry(key.clone()).or_insert_with(|| {
                    order.push(key);
                    (0.0, 0, 0.0, 0)
                });
                if let Some(p) = f.psi {
                    e.0 += p;
                    e.1 += 1;
                }
                if let Some(m) = f.mean_shift {
                    e.2 += m;
                    e.3 += 1;
                }
            }
        }
        let features = order
            .into_iter()
            .filter_map(|key| {
                let (ps, pn, ms, mn) = sums.get(&key).copied()?;
                Some(FleetFeature {
                    stream: key.0,
                    field: key.1,
                    mean_psi: (pn > 0).then(|| ps / pn as f64),
                    mean_shift: (mn > 0).then(|| ms / mn as f64),
                    summaries: pn.max(mn),
                })
            })
            .collect();
        Ok(FleetDrift {
            model: model.to_owned(),
            since_ms,
            summaries: rows.len() as u64,
            devices_reporting: reporting.len() as u64,
            devices_alerting: alerting.len() as u64,
            features,
        })
    }

    /// Fleet alerts of windows starting at or after `since_ms`.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn alerts(&self, since_ms: i64) -> Result<Vec<FleetAlert>> {
        Ok(self.db.alerts(since_ms).await?)
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_BYTES && !s.chars().any(char::is_control)
}

fn validate(s: &DriftSummary) -> Result<()> {
    if !name_ok(&s.model) {
        return Err(DriftError::Invalid(
            "model must be 1-128 bytes without control characters",
        ));
    }
    if !name_ok(&s.version) {
        return Err(DriftError::Invalid(
            "version must be 1-128 bytes without control characters",
        ));
    }
    if s.window_end_ms <= s.window_start_ms {
        return Err(DriftError::Invalid(
            "window_end_ms must be after window_start_ms",
        ));
    }
    if s.features.len() > MAX_ITEMS || s.stale.len() > MAX_ITEMS || s.reasons.len() > MAX_ITEMS {
        return Err(DriftError::Invalid(
            "at most 1024 features, stale sensors and reasons",
        ));
    }
    if s.features
        .iter()
        .any(|f| !name_ok(&f.stream) || !name_ok(&f.field))
    {
        return Err(DriftError::Invalid(
            "feature stream and field must be 1-128 bytes",
        ));
    }
    let finite = |v: Option<f64>| v.is_none_or(f64::is_finite);
    if !s
        .features
        .iter()
        .all(|f| finite(f.psi) && finite(f.mean_shift) && finite(f.mean) && finite(f.std))
    {
        return Err(DriftError::Invalid("statistics must be finite"));
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A plain-text table of fleet alerts (for `cloud-sync drift alerts`).
#[must_use]
pub fn alerts_table(alerts: &[FleetAlert]) -> String {
    let mut out = String::from("MODEL\tWINDOW_START_MS\tALERTING\tREPORTING\tRAISED_MS\n");
    for a in alerts {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            a.model, a.window_start_ms, a.devices_alerting, a.devices_reporting, a.raised_ms
        ));
    }
    out
}
