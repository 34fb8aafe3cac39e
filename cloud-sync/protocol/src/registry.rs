//! Wire types and paths of the model registry (`docs/model-registry.md`).
//!
//! An agent asks for the production version of a model for its device
//! group, gets a [`ModelVersion`] (with the artifact's sha256 and ed25519
//! signature), downloads the artifact (resumable with `Range`), checks its
//! sha256, then verifies the signature over [`signed_message`] with a public
//! key from its own configuration.

use serde::{Deserialize, Serialize};

use crate::API_VERSION;

/// Prefix of the message signed for an artifact; see [`signed_message`].
pub const SIGNATURE_CONTEXT: &str = "edge-model-artifact-v1:";

/// Device group used when none is given.
pub const DEFAULT_GROUP: &str = "default";

/// Media type of an artifact: a deterministic ustar archive holding
/// `model.toml` then `model.onnx`.
pub const ARTIFACT_MEDIA_TYPE: &str = "application/x-tar";

/// Path of the production-version endpoint of one model (query `group`).
#[must_use]
pub fn production_path(model: &str) -> String {
    format!("/{API_VERSION}/models/{model}/production")
}

/// Path of an artifact, by the lowercase hex sha256 of its bytes.
#[must_use]
pub fn artifact_path(sha256: &str) -> String {
    format!("/{API_VERSION}/artifacts/{sha256}")
}

/// Path of the operator endpoint promoting a version to production.
#[must_use]
pub fn promote_path(model: &str, version: &str) -> String {
    format!("/{API_VERSION}/models/{model}/versions/{version}/promote")
}

/// Path of the operator endpoint archiving a version.
#[must_use]
pub fn archive_path(model: &str, version: &str) -> String {
    format!("/{API_VERSION}/models/{model}/versions/{version}/archive")
}

/// The exact bytes signed for an artifact: the ASCII of
/// [`SIGNATURE_CONTEXT`] followed by the artifact's sha256 as 64 lowercase
/// hex digits.
#[must_use]
pub fn signed_message(artifact_sha256: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + 64);
    message.extend_from_slice(SIGNATURE_CONTEXT.as_bytes());
    message.extend_from_slice(artifact_sha256.to_ascii_lowercase().as_bytes());
    message
}

/// Lifecycle stage of a model version within its device group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Registered, not served to agents.
    Staging,
    /// Served to the agents of its group; at most one per (model, group).
    Production,
    /// Retired; may be promoted again (rollback).
    Archived,
}

impl Stage {
    /// The stage as stored and shown: `staging`, `production` or `archived`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Staging => "staging",
            Stage::Production => "production",
            Stage::Archived => "archived",
        }
    }

    /// Parses [`Stage::as_str`]'s output.
    #[must_use]
    pub fn parse(text: &str) -> Option<Stage> {
        match text {
            "staging" => Some(Stage::Staging),
            "production" => Some(Stage::Production),
            "archived" => Some(Stage::Archived),
            _ => None,
        }
    }
}

/// One registered model version in one device group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelVersion {
    /// Model name (from `model.toml`).
    pub name: String,
    /// `MAJOR.MINOR.PATCH` (from `model.toml`).
    pub version: String,
    /// Device group the version is registered for.
    pub group: String,
    /// Current stage.
    pub stage: Stage,
    /// sha256 of the artifact (lowercase hex): what to download and verify.
    pub sha256: String,
    /// sha256 of `model.onnx` inside the artifact (as in `model.toml`).
    pub model_sha256: String,
    /// Artifact size in bytes.
    pub size_bytes: u64,
    /// ed25519 signature of [`signed_message`]`(sha256)`, 128 hex digits.
    pub signature: String,
    /// Id of the signing key: the first 16 hex digits of the sha256 of its
    /// 32-byte public key.
    pub key_id: String,
    /// When the version was registered (Unix ms).
    pub created_ms: i64,
    /// When the stage last changed (Unix ms).
    pub stage_changed_ms: i64,
    /// Training run that produced it, when known.
    pub training_run: Option<String>,
    /// Dataset it was trained on, when known.
    pub dataset: Option<String>,
    /// Where to download the artifact ([`artifact_path`]).
    pub artifact_url: String,
}

/// Body of the promote and archive endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageChange {
    /// Device group; [`DEFAULT_GROUP`] when absent.
    #[serde(default)]
    pub group: Option<String>,
    /// Promote only: share of the group's devices (`1..=100`) that get the
    /// version, by [`canary_bucket`]; below 100 with a production version in
    /// place, a staged rollout starts. Absent: 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Promote only: the staged rollout halts once more than this share
    /// (`0.0..=1.0`) of the reporting devices rolled the version back.
    /// Absent: 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_share: Option<f64>,
}

impl Eq for StageChange {}

/// Reply of the promote endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promotion {
    /// The version promoted: in production, or the candidate of the staged
    /// rollout in `rollout`.
    pub promoted: ModelVersion,
    /// The version it replaced (now archived), if any.
    pub archived: Option<String>,
    /// The staged rollout this promotion started (`percent` below 100), if
    /// any; the version then stays in its stage until the rollout completes.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
}

/// Path of the deployment endpoint of one model (query `group`): what one
/// device should serve, and whether to shadow a candidate.
#[must_use]
pub fn deployment_path(model: &str) -> String {
    format!("/{API_VERSION}/models/{model}/deployment")
}

/// Path where a device reports what it did with a deployment (`POST` a
/// [`RolloutReport`]).
#[must_use]
pub fn rollout_reports_path() -> String {
    format!("/{API_VERSION}/rollout/reports")
}

/// The canary bucket of a device for one rollout, in `0..100`: a device is
/// in a rollout at `percent` when its bucket is below `percent`. FNV-1a 64
/// over `device`, `model` and `version` separated by NUL bytes, modulo 100;
/// stable across releases (both sides compute it), so raising the
/// percentage only ever adds devices.
#[must_use]
pub fn canary_bucket(device: &str, model: &str, version: &str) -> u8 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in [device, model, version].iter().enumerate() {
        if i > 0 {
            // A NUL separator byte: xor with 0 is the identity.
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        for b in part.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    u8::try_from(hash % 100).unwrap_or(0)
}

/// What one device should run for one model: the body of
/// [`deployment_path`] (with an `ETag` over the body; `If-None-Match` gets a
/// 304 while nothing changed for this device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// The group the registry resolved for this device: its server-side
    /// assignment when it has one, else the `group` query, else
    /// [`DEFAULT_GROUP`].
    pub group: String,
    /// The version this device should serve.
    pub active: ModelVersion,
    /// A candidate to run in shadow mode beside `active`: scored on the same
    /// windows, compared and reported, never published or stored as a
    /// prediction.
    #[serde(default)]
    pub shadow: Option<ModelVersion>,
    /// True when the registry directs this device to an older version than
    /// the newest it may have (a halted rollout, or an operator rollback).
    /// Agents refuse downgrades otherwise.
    #[serde(default)]
    pub downgrade: bool,
    /// The rollout in progress for this model and group, if any.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
}

/// State of a staged rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Devices whose [`canary_bucket`] is below `percent` get the new version.
    Active,
    /// Too many devices rolled back: every device gets the previous version.
    Halted,
    /// Reached 100 %: the new version is production for the whole group.
    Complete,
}

/// A staged (canary) rollout of one version within one (model, group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutStatus {
    /// Model name.
    pub name: String,
    /// Device group.
    pub group: String,
    /// The version being rolled out.
    pub version: String,
    /// The production version the other devices keep, if any.
    pub previous: Option<String>,
    /// Share of the group's devices targeted, `0..=100`.
    pub percent: u8,
    /// Current state.
    pub state: RolloutState,
    /// The rollout halts once more than this share (`0.0..=1.0`) of the
    /// devices that reported on the version rolled it back.
    pub halt_share: f64,
    /// Devices that reported adopting the version.
    pub adopted: u64,
    /// Devices that reported rolling it back.
    pub rolled_back: u64,
}

impl Eq for RolloutStatus {}

/// What a device did with a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutEvent {
    /// Verified, swapped in, and passed its trial window.
    Adopted,
    /// Swapped in, then broke its health targets during the trial window;
    /// the previous version serves again.
    RolledBack,
    /// Never swapped in: download, sha256, signature, size, downgrade or
    /// package checks failed.
    Refused,
    /// Ran in shadow mode; see [`RolloutReport::shadow`].
    Shadow,
}

impl RolloutEvent {
    /// The event as stored: `adopted`, `rolled_back`, `refused`, `shadow`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutEvent::Adopted => "adopted",
            RolloutEvent::RolledBack => "rolled_back",
            RolloutEvent::Refused => "refused",
            RolloutEvent::Shadow => "shadow",
        }
    }

    /// Parses [`RolloutEvent::as_str`]'s output.
    #[must_use]
    pub fn parse(text: &str) -> Option<RolloutEvent> {
        match text {
            "adopted" => Some(RolloutEvent::Adopted),
            "rolled_back" => Some(RolloutEvent::RolledBack),
            "refused" => Some(RolloutEvent::Refused),
            "shadow" => Some(RolloutEvent::Shadow),
            _ => None,
        }
    }
}

/// How a shadow candidate compared with the active model on the same
/// windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSummary {
    /// Windows scored by both.
    pub windows: u64,
    /// Mean of `|candidate score - active score|`.
    pub mean_abs_diff: f64,
    /// Largest `|candidate score - active score|`.
    pub max_abs_diff: f64,
    /// Share of windows where both agree on "anomaly or not" (`0.0..=1.0`).
    pub agreement: f64,
    /// Windows the candidate failed to score (errors or non-finite output).
    pub candidate_errors: u64,
}

/// Body of [`rollout_reports_path`]. The device is the authenticated one.
/// A report is idempotent per (device, model, version, event): repeating it
/// updates its reason, time and shadow summary, never its count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutReport {
    /// Model name.
    pub model: String,
    /// Version the event is about.
    pub version: String,
    /// sha256 of its artifact, when known (not for a refused deployment body).
    pub sha256: Option<String>,
    /// What happened.
    pub event: RolloutEvent,
    /// Why (for `rolled_back` and `refused`), human readable.
    pub reason: Option<String>,
    /// When it happened on the device (Unix ms).
    pub at_ms: i64,
    /// Shadow comparison, for `shadow`.
    pub shadow: Option<ShadowSummary>,
}

/// Reply to a [`RolloutReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutReportAck {
    /// The rollout of this version, when there is one (possibly just halted
    /// by this report).
    pub rollout: Option<RolloutStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_message_is_context_and_hex() {
        let sha = "AB".repeat(32);
        let message = signed_message(&sha);
        assert_eq!(
            message,
            format!("edge-model-artifact-v1:{}", "ab".repeat(32)).into_bytes()
        );
    }

    #[test]
    fn canary_buckets_are_stable_and_spread() {
        assert_eq!(
            canary_bucket("dev-1", "m", "1.0.0"),
            canary_bucket("dev-1", "m", "1.0.0")
        );
        let mut counts = [0u32; 10];
        for i in 0..10_000 {
            let b = canary_bucket(&format!("dev-{i}"), "m", "1.0.0");
            assert!(b < 100);
            counts[usize::from(b / 10)] += 1;
        }
        // Each decile holds about 1000 of 10 000 devices.
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_ne!(
            (0..50)
                .map(|i| canary_bucket(&format!("d{i}"), "m", "1.0.0"))
                .collect::<Vec<_>>(),
            (0..50)
                .map(|i| canary_bucket(&format!("d{i}"), "m", "1.0.1"))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn rollout_events_round_trip() {
        for e in [
            RolloutEvent::Adopted,
            RolloutEvent::RolledBack,
            RolloutEvent::Refused,
            RolloutEvent::Shadow,
        ] {
            assert_eq!(RolloutEvent::parse(e.as_str()), Some(e));
        }
    }

    #[test]
    fn stages_round_trip() {
        for stage in [Stage::Staging, Stage::Production, Stage::Archived] {
            assert_eq!(Stage::parse(stage.as_str()), Some(stage));
        }
        assert_eq!(Stage::parse("Production"), None);
    }
}
