//! Drift and data-quality summaries: what a device sends about each model's
//! inputs and scores once per tumbling window, and what the cloud answers
//! when asked for a model's fleet view (`docs/drift.md`).
//!
//! Owns the shape of those bodies only; the statistics are computed by the
//! agent (`edge-agent`'s `drift` module) and aggregated by `cloud-sync`.
//! Identity contract: a summary is identified by
//! `(device, model, window_start_ms)`; re-posting one (after a lost answer)
//! replaces nothing and counts once.

use serde::{Deserialize, Serialize};

use crate::API_VERSION;

/// Path a device posts its [`DriftSummary`] bodies to.
#[must_use]
pub fn drift_path(device: &str) -> String {
    format!("/{API_VERSION}/devices/{device}/drift")
}

/// Path of a model's fleet drift view ([`FleetDrift`]; `?since_ms=`).
#[must_use]
pub fn model_drift_path(model: &str) -> String {
    format!("/{API_VERSION}/models/{model}/drift")
}

/// Path of the fleet alert list ([`FleetAlert`]s).
#[must_use]
pub fn alerts_path() -> String {
    format!("/{API_VERSION}/alerts")
}

/// One model's inputs and scores on one device over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftSummary {
    /// Model name.
    pub model: String,
    /// Model version whose baseline the window was compared with.
    pub version: String,
    /// Window start, device clock, Unix ms (inclusive).
    pub window_start_ms: i64,
    /// Window end, device clock, Unix ms (exclusive).
    pub window_end_ms: i64,
    /// One entry per input feature, in the package's feature order.
    pub features: Vec<FeatureDrift>,
    /// The model's scores in the window.
    pub scores: ScoreStats,
    /// `source/stream` sensors silent longer than the configured time while
    /// others of the model reported.
    #[serde(default)]
    pub stale: Vec<String>,
    /// Windows not scored because a value was missing or non-finite.
    #[serde(default)]
    pub nan_skipped: u64,
    /// Feature windows restarted by a device-time gap.
    #[serde(default)]
    pub gap_resets: u64,
    /// A threshold was crossed (see `reasons`).
    pub alert: bool,
    /// Why, one short sentence each (`"temperature.value psi 5.1 >= 3"`).
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// One feature in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDrift {
    /// Stream of the feature.
    pub stream: String,
    /// Field of the feature.
    pub field: String,
    /// Finite values seen in the window.
    pub count: u64,
    /// Values missing or non-finite in the window's readings.
    #[serde(default)]
    pub missing: u64,
    /// Window mean (`None` without values).
    pub mean: Option<f64>,
    /// Window population standard deviation.
    pub std: Option<f64>,
    /// Window minimum.
    pub min: Option<f64>,
    /// Window maximum.
    pub max: Option<f64>,
    /// Values the judgement below covers (the window and the ones before it
    /// within the horizon).
    pub horizon_count: u64,
    /// Population stability index over the horizon against the baseline's
    /// bins; `None` before enough values were seen.
    pub psi: Option<f64>,
    /// (horizon mean - baseline mean) / baseline std; `None` as for `psi`.
    pub mean_shift: Option<f64>,
}

/// The model's scores in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreStats {
    /// Windows scored.
    pub count: u64,
    /// Share of scores over the baseline's `score_p99` (`None` when the
    /// package states none or nothing was scored).
    pub over_p99_share: Option<f64>,
    /// Share of scores flagged anomalous.
    pub anomaly_share: Option<f64>,
    /// Approximate median score (reservoir sample).
    pub median: Option<f64>,
    /// The baseline's `score_p50`, for comparison.
    pub baseline_p50: Option<f64>,
}

/// Answer of the device endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftAck {
    /// False when this window was already stored (a replay).
    pub stored: bool,
}

/// A model's drift across the fleet since a time (`GET` [`model_drift_path`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetDrift {
    /// Model name.
    pub model: String,
    /// Windows starting at or after this time are included (Unix ms).
    pub since_ms: i64,
    /// Summaries included.
    pub summaries: u64,
    /// Distinct devices that reported.
    pub devices_reporting: u64,
    /// Distinct devices with at least one alerting summary.
    pub devices_alerting: u64,
    /// Per feature, means over the summaries that judged it.
    pub features: Vec<FleetFeature>,
}

/// One feature across the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetFeature {
    /// Stream.
    pub stream: String,
    /// Field.
    pub field: String,
    /// Mean PSI (`None` when no summary judged it).
    pub mean_psi: Option<f64>,
    /// Mean of the mean shifts.
    pub mean_shift: Option<f64>,
    /// Summaries that judged it.
    pub summaries: u64,
}

/// Raised when more than the configured share of a model's reporting
/// devices alert within one window. This is the hook retraining uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetAlert {
    /// Model name.
    pub model: String,
    /// The fleet window start (Unix ms, a multiple of the cloud's window).
    pub window_start_ms: i64,
    /// Devices that reported in that window.
    pub devices_reporting: u64,
    /// Devices that alerted in that window.
    pub devices_alerting: u64,
    /// When the cloud raised it (Unix ms).
    pub raised_ms: i64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_summary_round_trips_and_old_fields_default() {
        let s = DriftSummary {
            model: "m".into(),
            version: "1.0.0".into(),
            window_start_ms: 0,
            window_end_ms: 60_000,
            features: vec![FeatureDrift {
                stream: "t".into(),
                field: "value".into(),
                count: 3,
                missing: 0,
                mean: Some(1.0),
                std: Some(0.0),
                min: Some(1.0),
                max: Some(1.0),
                horizon_count: 3,
                psi: None,
                mean_shift: None,
            }],
            scores: ScoreStats::default(),
            stale: vec![],
            nan_skipped: 0,
            gap_resets: 0,
            alert: false,
            reasons: vec![],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<DriftSummary>(&json).unwrap(), s);
        let v: serde_json::Value = serde_json::json!({
            "model": "m", "version": "1", "window_start_ms": 1, "window_end_ms": 2,
            "features": [], "scores": {"count": 0, "over_p99_share": null,
            "anomaly_share": null, "median": null, "baseline_p50": null}, "alert": false
        });
        let parsed: DriftSummary = serde_json::from_value(v).unwrap();
        assert!(parsed.stale.is_empty() && parsed.reasons.is_empty());
        assert_eq!(drift_path("d1"), "/v1/devices/d1/drift");
        assert_eq!(model_drift_path("m"), "/v1/models/m/drift");
    }
}
