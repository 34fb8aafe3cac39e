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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageChange {
    /// Device group; [`DEFAULT_GROUP`] when absent.
    #[serde(default)]
    pub group: Option<String>,
}

/// Reply of the promote endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promotion {
    /// The version now in production.
    pub promoted: ModelVersion,
    /// The version it replaced (now archived), if any.
    pub archived: Option<String>,
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
    fn stages_round_trip() {
        for stage in [Stage::Staging, Stage::Production, Stage::Archived] {
            assert_eq!(Stage::parse(stage.as_str()), Some(stage));
        }
        assert_eq!(Stage::parse("Production"), None);
    }
}
