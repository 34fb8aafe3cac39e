//! Staged rollouts, shadow targets and device groups as pure rules: which
//! version one device is served ([`deployment`]), when reports halt a
//! rollout ([`should_halt`]), and the stored rows these rules read.
//!
//! Owns no I/O: [`super::db`] loads a [`DeploymentView`] in one read and
//! applies [`should_halt`] inside the report transaction; this module only
//! decides. Invariants:
//! - a device is in a rollout at `percent` iff its
//!   [`canary_bucket`]`(device, model, version) < percent`, so widening a
//!   rollout only ever adds devices;
//! - a device-less (operator) view is the view of a device outside every
//!   canary below 100 %;
//! - a halted rollout whose previous version is in production serves that
//!   version to every device with `downgrade: true`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sync_protocol::registry::{
    Deployment, ModelVersion, RolloutEvent, RolloutState, RolloutStatus, canary_bucket,
};

/// Default share of rolled-back reports above which a rollout halts.
pub const DEFAULT_HALT_SHARE: f64 = 0.5;

/// Default share of a group's devices a promotion targets.
pub const FULL_PERCENT: u8 = 100;

/// One row of `rollouts`.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    /// Row id (increasing: the latest rollout of a (model, group) is the
    /// one with the largest id).
    pub id: i64,
    /// Model name.
    pub name: String,
    /// Device group.
    pub device_group: String,
    /// Version rolled out.
    pub version: String,
    /// Production version when the rollout started, if any.
    pub previous: Option<String>,
    /// Share of devices targeted.
    pub percent: u8,
    /// Largest `percent` the rollout had: devices with a bucket in
    /// `percent..peak_percent` were served the version and must go back.
    pub peak_percent: u8,
    /// Halting threshold.
    pub halt_share: f64,
    /// State.
    pub state: RolloutState,
    /// Devices that reported adopting `version` during this rollout (and
    /// did not also report rolling it back).
    pub adopted: u64,
    /// Devices that reported rolling `version` back during this rollout.
    pub rolled_back: u64,
    /// Start (Unix ms).
    pub started_ms: i64,
    /// Last change (Unix ms).
    pub updated_ms: i64,
}

impl RolloutRow {
    /// The wire form.
    #[must_use]
    pub fn status(&self) -> RolloutStatus {
        RolloutStatus {
            name: self.name.clone(),
            group: self.device_group.clone(),
            version: self.version.clone(),
            previous: self.previous.clone(),
            percent: self.percent,
            state: self.state,
            halt_share: self.halt_share,
            adopted: self.adopted,
            rolled_back: self.rolled_back,
        }
    }
}

/// The stored text of a rollout state.
#[must_use]
pub fn state_str(state: RolloutState) -> &'static str {
    match state {
        RolloutState::Active => "active",
        RolloutState::Halted => "halted",
        RolloutState::Complete => "complete",
    }
}

/// Parses [`state_str`]'s output.
#[must_use]
pub fn parse_state(text: &str) -> Option<RolloutState> {
    match text {
        "active" => Some(RolloutState::Active),
        "halted" => Some(RolloutState::Halted),
        "complete" => Some(RolloutState::Complete),
        _ => None,
    }
}

/// A shadow target of one (model, group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowTarget {
    /// Version run in shadow mode.
    pub version: String,
    /// Share of the group's devices running it, by
    /// [`canary_bucket`]`(device, model, version)`.
    pub percent: u8,
}

/// Everything [`deployment`] needs about one (model, group), read at once.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentView {
    /// The resolved group.
    pub group: String,
    /// Its production version.
    pub production: Option<ModelVersion>,
    /// Its latest rollout.
    pub rollout: Option<RolloutRow>,
    /// The version of `rollout`, when the rollout is active.
    pub candidate: Option<ModelVersion>,
    /// Its shadow target and that version.
    pub shadow: Option<(ShadowTarget, ModelVersion)>,
}

/// Whether `device` (`None`: a device outside every partial canary) is in
/// a canary of `version` at `percent`.
#[must_use]
pub fn targeted(device: Option<&str>, model: &str, version: &str, percent: u8) -> bool {
    percent >= FULL_PERCENT
        || device.is_some_and(|device| canary_bucket(device, model, version) < percent)
}

/// What `device` should run for `model`, or `None` when nothing is
/// deployable (no production version).
///
/// - An active rollout serves its candidate to targeted devices, the
///   production version to the others; those that were targeted before the
///   rollout was narrowed get it with `downgrade: true`.
/// - A halted rollout whose previous version is in production serves it to
///   every device with `downgrade: true`.
/// - The shadow target is attached for targeted devices unless it is the
///   version they serve.
#[must_use]
pub fn deployment(view: DeploymentView, device: Option<&str>, model: &str) -> Option<Deployment> {
    let production = view.production?;
    let mut active = production;
    let mut downgrade = false;
    let mut rollout = None;
    if let Some(row) = view.rollout {
        match row.state {
            RolloutState::Active => {
                if targeted(device, model, &row.version, row.percent) {
                    if let Some(candidate) = view.candidate {
                        active = candidate;
                    }
                } else {
                    // Narrowed: devices that were in the canary go back.
                    downgrade = targeted(device, model, &row.version, row.peak_percent);
                }
                rollout = Some(row.status());
            }
            RolloutState::Halted if row.previous.as_deref() == Some(active.version.as_str()) => {
                downgrade = true;
                rollout = Some(row.status());
            }
            RolloutState::Halted | RolloutState::Complete => {}
        }
    }
    let shadow = view.shadow.and_then(|(target, version)| {
        (version.version != active.version
            && targeted(device, model, &target.version, target.percent))
        .then_some(version)
    });
    Some(Deployment {
        group: view.group,
        active,
        shadow,
        downgrade,
        rollout,
    })
}

/// Whether a rollout with these counts halts: more than `halt_share` of the
/// devices that reported on it rolled it back.
#[must_use]
#[allow(clippy::cast_precision_loss)] // Device counts are far below 2^52.
pub fn should_halt(adopted: u64, rolled_back: u64, halt_share: f64) -> bool {
    let total = adopted.saturating_add(rolled_back);
    total > 0 && (rolled_back as f64) / (total as f64) > halt_share
}

/// One device's report with a reason, for the operator view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportReason {
    /// Device.
    pub device: String,
    /// Version reported on.
    pub version: String,
    /// Event.
    pub event: RolloutEvent,
    /// Reason given.
    pub reason: String,
    /// When it happened on the device (Unix ms).
    pub at_ms: i64,
}

/// Operator view of one (model, group): `GET /v1/models/{model}/rollouts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutOverview {
    /// Model name.
    pub name: String,
    /// Device group.
    pub group: String,
    /// The current production version.
    pub production: Option<String>,
    /// The latest rollout (current or last).
    pub rollout: Option<RolloutStatus>,
    /// Devices per reported event (`adopted`, `rolled_back`, `refused`,
    /// `shadow`) on the latest rollout's version in this group.
    pub events: BTreeMap<String, u64>,
    /// The shadow target, if any.
    pub shadow: Option<ShadowTarget>,
    /// The most recent `rolled_back` and `refused` reports with a reason on
    /// that version, newest first (at most [`RECENT_REASONS`]).
    pub recent_reasons: Vec<ReportReason>,
}

/// How many reasons [`RolloutOverview::recent_reasons`] holds at most.
pub const RECENT_REASONS: usize = 10;

/// Plain text of an overview (for `cloud-sync models status`).
#[must_use]
pub fn overview_text(overview: &RolloutOverview) -> String {
    let mut out = format!(
        "model {} group {:?}: production {}\n",
        overview.name,
        overview.group,
        overview.production.as_deref().unwrap_or("none")
    );
    match &overview.rollout {
        None => out.push_str("rollout: none\n"),
        Some(r) => {
            out.push_str(&format!(
                "rollout: {} -> {} {} at {}% (halts above {:.0}% rolled back)\n",
                r.previous.as_deref().unwrap_or("none"),
                r.version,
                state_str(r.state),
                r.percent,
                r.halt_share * 100.0
            ));
            out.push_str(&format!(
                "counted: {} adopted, {} rolled back\n",
                r.adopted, r.rolled_back
            ));
        }
    }
    let events: Vec<String> = overview
        .events
        .iter()
        .map(|(event, n)| format!("{event} {n}"))
        .collect();
    out.push_str(&format!(
        "devices per event: {}\n",
        if events.is_empty() {
            "none".to_owned()
        } else {
            events.join(", ")
        }
    ));
    if let Some(shadow) = &overview.shadow {
        out.push_str(&format!(
            "shadow: {} on {}% of devices\n",
            shadow.version, shadow.percent
        ));
    }
    for r in &overview.recent_reasons {
        out.push_str(&format!(
            "{} {} {} at {}: {}\n",
            r.device,
            r.event.as_str(),
            r.version,
            r.at_ms,
            r.reason
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use sync_protocol::registry::Stage;

    use super::*;

    fn version(v: &str) -> ModelVersion {
        ModelVersion {
            name: "m".into(),
            version: v.into(),
            group: "default".into(),
            stage: Stage::Production,
            sha256: v.repeat(3),
            model_sha256: String::new(),
            size_bytes: 1,
            signature: String::new(),
            key_id: String::new(),
            created_ms: 0,
            stage_changed_ms: 0,
            training_run: None,
            dataset: None,
            artifact_url: String::new(),
        }
    }

    fn rollout(state: RolloutState, percent: u8) -> RolloutRow {
        RolloutRow {
            id: 1,
            name: "m".into(),
            device_group: "default".into(),
            version: "2.0.0".into(),
            previous: Some("1.0.0".into()),
            percent,
            peak_percent: percent,
            halt_share: 0.5,
            state,
            adopted: 0,
            rolled_back: 0,
            started_ms: 0,
            updated_ms: 0,
        }
    }

    fn view(rollout: Option<RolloutRow>) -> DeploymentView {
        DeploymentView {
            group: "default".into(),
            production: Some(version("1.0.0")),
            candidate: rollout.as_ref().map(|_| version("2.0.0")),
            rollout,
            shadow: None,
        }
    }

    #[test]
    fn halting_needs_more_than_the_share() {
        assert!(!should_halt(0, 0, 0.5));
        assert!(!should_halt(1, 1, 0.5));
        assert!(should_halt(1, 2, 0.5));
        assert!(should_halt(0, 1, 0.0));
        assert!(!should_halt(0, 1, 1.0));
        assert!(!should_halt(7, 3, 0.3));
        assert!(should_halt(6, 3, 0.3));
    }

    #[test]
    fn active_rollouts_split_by_bucket() {
        let mut inside = 0;
        for i in 0..500 {
            let device = format!("d{i}");
            let d = deployment(
                view(Some(rollout(RolloutState::Active, 30))),
                Some(&device),
                "m",
            )
            .unwrap();
            let expected = canary_bucket(&device, "m", "2.0.0") < 30;
            assert_eq!(d.active.version == "2.0.0", expected, "{device}");
            assert!(!d.downgrade);
            assert_eq!(d.rollout.unwrap().state, RolloutState::Active);
            inside += usize::from(expected);
        }
        assert!((100..200).contains(&inside), "{inside}");
        let d = deployment(view(Some(rollout(RolloutState::Active, 99))), None, "m").unwrap();
        assert_eq!(
            d.active.version, "1.0.0",
            "device-less is outside partial canaries"
        );
    }

    #[test]
    fn narrowed_rollouts_downgrade_the_devices_they_dropped() {
        let mut row = rollout(RolloutState::Active, 10);
        row.peak_percent = 40;
        for i in 0..300 {
            let device = format!("d{i}");
            let d = deployment(view(Some(row.clone())), Some(&device), "m").unwrap();
            let bucket = canary_bucket(&device, "m", "2.0.0");
            assert_eq!(d.active.version == "2.0.0", bucket < 10, "{device}");
            assert_eq!(d.downgrade, (10..40).contains(&bucket), "{device}");
        }
        assert!(!deployment(view(Some(row)), None, "m").unwrap().downgrade);
    }

    #[test]
    fn halted_rollouts_downgrade_everyone_while_previous_is_production() {
        let d = deployment(
            view(Some(rollout(RolloutState::Halted, 30))),
            Some("d1"),
            "m",
        )
        .unwrap();
        assert_eq!((d.active.version.as_str(), d.downgrade), ("1.0.0", true));
        let mut other = view(Some(rollout(RolloutState::Halted, 30)));
        other.production = Some(version("3.0.0"));
        let d = deployment(other, Some("d1"), "m").unwrap();
        assert_eq!((d.active.version.as_str(), d.downgrade), ("3.0.0", false));
        assert!(d.rollout.is_none());
        let d = deployment(view(Some(rollout(RolloutState::Complete, 100))), None, "m").unwrap();
        assert_eq!((d.active.version.as_str(), d.downgrade), ("1.0.0", false));
        let mut none = view(None);
        none.production = None;
        assert!(deployment(none, Some("d1"), "m").is_none());
    }

    #[test]
    fn shadows_target_by_bucket_and_never_the_active_version() {
        let mut v = view(None);
        v.shadow = Some((
            ShadowTarget {
                version: "2.0.0".into(),
                percent: 100,
            },
            version("2.0.0"),
        ));
        let d = deployment(v.clone(), None, "m").unwrap();
        assert_eq!(d.shadow.unwrap().version, "2.0.0");
        v.shadow = Some((
            ShadowTarget {
                version: "1.0.0".into(),
                percent: 100,
            },
            version("1.0.0"),
        ));
        assert!(
            deployment(v.clone(), Some("d"), "m")
                .unwrap()
                .shadow
                .is_none()
        );
        v.shadow = Some((
            ShadowTarget {
                version: "2.0.0".into(),
                percent: 50,
            },
            version("2.0.0"),
        ));
        for i in 0..50 {
            let device = format!("d{i}");
            let d = deployment(v.clone(), Some(&device), "m").unwrap();
            assert_eq!(
                d.shadow.is_some(),
                canary_bucket(&device, "m", "2.0.0") < 50
            );
        }
        assert!(deployment(v, None, "m").unwrap().shadow.is_none());
    }

    #[test]
    fn states_round_trip() {
        for s in [
            RolloutState::Active,
            RolloutState::Halted,
            RolloutState::Complete,
        ] {
            assert_eq!(parse_state(state_str(s)), Some(s));
        }
        assert_eq!(parse_state("Active"), None);
    }
}
