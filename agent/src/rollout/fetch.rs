//! Registry polling, resumable download, verification and install of one
//! model version (the checks are listed in [`super`]).
//!
//! Owns `downloads_dir` (`<sha256>.part` files, kept across restarts so a
//! download resumes where it stopped) and the `.incoming-*` directories it
//! renames into the packages directory.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_NONE_MATCH, IF_RANGE, RANGE};
use sha2::{Digest, Sha256};
use sync_protocol::registry::{
    Deployment, ModelVersion, RolloutEvent, RolloutReport, deployment_path, rollout_reports_path,
    signed_message,
};
use tokio::io::AsyncWriteExt;

use super::RolloutSettings;
use super::reports::ReportQueue;
use crate::config::Secret;
use crate::inference::package::parse_version;
use crate::inference::swap::{self, Candidate, RETIRED};
use crate::telemetry::Counters;

/// Largest deployment body read.
const MAX_DEPLOYMENT_BYTES: usize = 1 << 20;

/// Why one poll of one model did not complete; retried at the next poll.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request failed (connection, timeout, body).
    #[error("registry request failed")]
    Http(#[from] reqwest::Error),
    /// The registry answered with an unexpected status.
    #[error("registry answered {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
    /// The deployment body is not a [`Deployment`].
    #[error("malformed deployment body: {0}")]
    Body(String),
    /// A local file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The version was refused (reported to the registry).
    #[error("refused: {0}")]
    Refused(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FetchError {
    let what = what.into();
    move |source| FetchError::Io { what, source }
}

/// What a poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// 304: nothing changed since the last poll.
    Unchanged,
    /// 404: nothing deployed for this model and group.
    NothingDeployed,
    /// The directed version is already installed (or was rejected here).
    AlreadyInstalled(String),
    /// The directed version was downloaded, verified and installed.
    Installed(String),
}

/// Polls, downloads and installs; see [`super`].
pub struct Fetcher {
    client: reqwest::Client,
    base_url: String,
    token: Secret,
    settings: RolloutSettings,
    packages_dir: PathBuf,
    reports: ReportQueue,
    counters: Arc<Counters>,
    /// Model -> ETag of the last deployment fully handled.
    etags: HashMap<String, String>,
    /// Artifacts refused in this process (reported once).
    refused: HashSet<String>,
}

impl Fetcher {
    /// A fetcher for `settings.models`, installing into `packages_dir`.
    #[must_use]
    pub fn new(
        client: reqwest::Client,
        base_url: String,
        token: Secret,
        settings: RolloutSettings,
        packages_dir: PathBuf,
        reports: ReportQueue,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            settings,
            packages_dir,
            reports,
            counters,
            etags: HashMap::new(),
            refused: HashSet::new(),
        }
    }

    /// Polls every configured model once; failures are logged and counted.
    pub async fn poll_all(&mut self) {
        for name in self.settings.models.clone() {
            match self.poll(&name).await {
                Ok(Polled::Installed(v)) => {
                    tracing::info!(model = %name, version = %v, "model version installed from the registry");
                }
                Ok(other) => tracing::debug!(model = %name, polled = ?other, "registry polled"),
                Err(FetchError::Refused(reason)) => {
                    tracing::error!(model = %name, %reason, "model version from the registry refused");
                }
                Err(e) => {
                    Counters::add(&self.counters.rollout_poll_failures, 1);
                    tracing::warn!(model = %name, error = %chain(&e), "registry poll failed; retrying at the next poll");
                }
            }
        }
    }

    /// Polls one model and installs what the registry directs.
    ///
    /// # Errors
    /// [`FetchError::Refused`] when the version was refused (and reported),
    /// any other variant when the poll should simply be retried.
    pub async fn poll(&mut self, name: &str) -> Result<Polled, FetchError> {
        let mut url = reqwest::Url::parse(&format!("{}{}", self.base_url, deployment_path(name)))
            .map_err(|e| FetchError::Body(format!("bad registry URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("group", &self.settings.group);
        let mut request = self.client.get(url).bearer_auth(self.token.expose());
        if let Some(etag) = self.etags.get(name) {
            request = request.header(IF_NONE_MATCH, etag);
        }
        let response = request.send().await?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Polled::Unchanged);
        }
        if status == StatusCode::NOT_FOUND {
            self.etags.remove(name);
            return Ok(Polled::NothingDeployed);
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                status,
                body: error_body(response).await,
            });
        }
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(response, MAX_DEPLOYMENT_BYTES).await?;
        let deployment: Deployment =
            serde_json::from_slice(&body).map_err(|e| FetchError::Body(e.to_string()))?;
        let mut polled = self.handle(name, &deployment).await;
        if let Err(e) = self.handle_shadow(name, &deployment).await {
            if polled.is_ok() && !matches!(e, FetchError::Refused(_)) {
                polled = Err(e);
            } else {
                tracing::error!(model = %name, error = %chain(&e), "shadow candidate not installed");
            }
        }
        // Design: the ETag is kept only once the deployment was handled,
        // so an interrupted download is retried at the next poll instead
        // of being skipped by a 304.
        if matches!(&polled, Ok(_) | Err(FetchError::Refused(_)))
            && let Some(etag) = etag
        {
            self.etags.insert(name.to_owned(), etag);
        }
        polled
    }

    async fn handle(&mut self, name: &str, d: &Deployment) -> Result<Polled, FetchError> {
        let v = &d.active;
        if v.name != name {
            return self
                .refuse(
                    v,
                    format!("asked for model {name}, the registry answered {}", v.name),
                )
                .await;
        }
        let Some(version) = parse_version(&v.version) else {
            return self
                .refuse(
                    v,
                    format!("version {:?} is not MAJOR.MINOR.PATCH", v.version),
                )
                .await;
        };
        let model_dir = self.packages_dir.join(name);
        let target = model_dir.join(&v.version);
        let installed = swap::scan(&self.packages_dir);
        let installed: Vec<&Candidate> = installed.iter().filter(|c| c.name == name).collect();
        let downgrade_ok = d.downgrade || self.settings.allow_downgrade;
        if target.is_dir() {
            if d.downgrade {
                self.retire_newer(&installed, version, &target).await?;
            }
            return Ok(Polled::AlreadyInstalled(v.version.clone()));
        }
        if self.refused.contains(&v.sha256) {
            return Err(FetchError::Refused(format!(
                "{} {} was refused earlier in this run",
                v.name, v.version
            )));
        }
        if let Some(newest) = installed
            .iter()
            .filter(|c| c.selectable())
            .map(|c| c.version)
            .max()
            && newest > version
            && !downgrade_ok
        {
            let (a, b, c) = newest;
            return self
                .refuse(
                    v,
                    format!(
                        "downgrade from {a}.{b}.{c} to {} refused (the registry did not direct it)",
                        v.version
                    ),
                )
                .await;
        }
        self.fetch_and_install(v, &target).await?;
        if d.downgrade {
            self.retire_newer(&installed, version, &target).await?;
        }
        Counters::add(&self.counters.rollout_installs, 1);
        Ok(Polled::Installed(v.version.clone()))
    }

    /// Keeps `<shadow_dir>/<name>/` holding exactly the deployment's shadow
    /// candidate (same checks as an active version, except the downgrade
    /// rule), or nothing. The directory is this module's alone.
    async fn handle_shadow(&mut self, name: &str, d: &Deployment) -> Result<(), FetchError> {
        let dir = self.settings.shadow_dir.join(name);
        let wanted = d
            .shadow
            .as_ref()
            .filter(|v| v.name == name && parse_version(&v.version).is_some());
        let keep = wanted.map(|v| v.version.clone());
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if Some(e.file_name().to_string_lossy().into_owned()) != keep {
                    std::fs::remove_dir_all(e.path())
                        .map_err(io(format!("cannot remove {}", e.path().display())))?;
                }
            }
        }
        let Some(v) = wanted else {
            return Ok(());
        };
        let target = dir.join(&v.version);
        if target.is_dir() || self.refused.contains(&v.sha256) {
            return Ok(());
        }
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        self.fetch_and_install(v, &target).await?;
        tracing::info!(model = %name, version = %v.version, "shadow candidate installed");
        Ok(())
    }

    /// Checks 1 (size) to 5 of [`super`] and installs `v` at `target`.
    async fn fetch_and_install(
        &mut self,
        v: &ModelVersion,
        target: &Path,
    ) -> Result<(), FetchError> {
        if v.size_bytes > self.settings.max_artifact_bytes {
            return self
                .refuse(
                    v,
                    format!(
                        "artifact of {} bytes exceeds rollout.max_artifact_bytes = {}",
                        v.size_bytes, self.settings.max_artifact_bytes
                    ),
                )
                .await;
        }
        if let Err(reason) = verify_signature(&self.settings.trusted_keys, v) {
            return self.refuse(v, reason).await;
        }
        let file = self.download(v).await?;
        let bytes = tokio::fs::read(&file)
            .await
            .map_err(io(format!("cannot read {}", file.display())))?;
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != v.sha256.to_ascii_lowercase() {
            let _ = tokio::fs::remove_file(&file).await;
            return self
                .refuse(
                    v,
                    format!(
                        "downloaded artifact has sha256 {digest}, the signed one is {}",
                        v.sha256
                    ),
                )
                .await;
        }
        let (manifest, onnx) = match check_archive(&bytes, v) {
            Ok(parts) => parts,
            Err(reason) => {
                let _ = tokio::fs::remove_file(&file).await;
                return self.refuse(v, reason).await;
            }
        };
        let (manifest, onnx) = (manifest.to_vec(), onnx.to_vec());
        drop(bytes);
        let parent = target.parent().unwrap_or(target);
        let incoming = parent.join(format!(".incoming-{}", &v.sha256[..16.min(v.sha256.len())]));
        let dest = target.to_owned();
        tokio::task::spawn_blocking(move || install(&incoming, &dest, &manifest, &onnx))
            .await
            .map_err(|e| FetchError::Io {
                what: "install task failed".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(io(format!("cannot install {}", target.display())))?;
        let _ = tokio::fs::remove_file(&file).await;
        Ok(())
    }

    /// Marks every installed version newer than `version` `.retired`, so the
    /// watcher selects the directed one; clears a stale mark on `target`.
    async fn retire_newer(
        &self,
        installed: &[&Candidate],
        version: (u64, u64, u64),
        target: &Path,
    ) -> Result<(), FetchError> {
        for c in installed {
            if c.version > version && !swap::has_marker(&c.dir, RETIRED) {
                tracing::warn!(model = %c.name, dir = %c.dir.display(), "registry directed a downgrade; newer version retired");
                swap::write_marker(
                    &c.dir,
                    RETIRED,
                    &serde_json::json!({"at_ms": crate::now_ms()}).to_string(),
                )
                .map_err(io(format!("cannot retire {}", c.dir.display())))?;
            }
        }
        match std::fs::remove_file(target.join(RETIRED)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("cannot un-retire {}", target.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// Downloads the artifact into `<downloads_dir>/<sha256>.part`,
    /// resuming what an earlier attempt left, never past the announced size.
    async fn download(&self, v: &ModelVersion) -> Result<PathBuf, FetchError> {
        let sha = v.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FetchError::Refused(format!(
                "sha256 {:?} is not 64 hex digits",
                v.sha256
            )));
        }
        let path = self.settings.downloads_dir.join(format!("{sha}.part"));
        let mut have = tokio::fs::metadata(&path).await.map_or(0, |m| m.len());
        if have > v.size_bytes {
            have = 0;
        }
        if have == v.size_bytes && have > 0 {
            return Ok(path);
        }
        let url = if v.artifact_url.starts_with("http://") || v.artifact_url.starts_with("https://")
        {
            v.artifact_url.clone()
        } else {
            format!("{}{}", self.base_url, v.artifact_url)
        };
        let mut request = self.client.get(&url).bearer_auth(self.token.expose());
        if have > 0 {
            request = request
                .header(RANGE, format!("bytes={have}-"))
                .header(IF_RANGE, format!("\"{sha}\""));
        }
        let mut response = request.send().await?;
        let status = response.status();
        let append = match status {
            StatusCode::PARTIAL_CONTENT => {
                let start = response
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.strip_prefix("bytes "))
                    .and_then(|h| h.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if start != Some(have) {
                    return Err(FetchError::Body(format!(
                        "asked for bytes from {have}, got Content-Range starting at {start:?}"
                    )));
                }
                true
            }
            StatusCode::OK => false,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(FetchError::Body(
                    "range not satisfiable; restarting the download".into(),
                ));
            }
            _ => {
                return Err(FetchError::Status {
                    status,
                    body: error_body(response).await,
                });
            }
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .await
            .map_err(io(format!("cannot open {}", path.display())))?;
        let mut written = if append { have } else { 0 };
        let result: Result<(), FetchError> = async {
            while let Some(chunk) = response.chunk().await? {
                written += chunk.len() as u64;
                if written > v.size_bytes {
                    return Err(FetchError::Refused(format!(
                        "artifact is larger than the announced {} bytes",
                        v.size_bytes
                    )));
                }
                file.write_all(&chunk)
                    .await
                    .map_err(io(format!("cannot write {}", path.display())))?;
            }
            Ok(())
        }
        .await;
        // Keep what arrived (the next attempt resumes from it), unless the
        // server sent more than it announced.
        let _ = file.sync_all().await;
        drop(file);
        match result {
            Err(FetchError::Refused(reason)) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(FetchError::Refused(reason))
            }
            Err(e) => Err(e),
            Ok(()) if written == v.size_bytes => Ok(path),
            Ok(()) => Err(FetchError::Body(format!(
                "download ended at {written} of {} bytes; resuming at the next poll",
                v.size_bytes
            ))),
        }
    }

    async fn refuse<T>(&mut self, v: &ModelVersion, reason: String) -> Result<T, FetchError> {
        Counters::add(&self.counters.rollout_refusals, 1);
        self.refused.insert(v.sha256.clone());
        self.reports
            .push(RolloutReport {
                model: v.name.clone(),
                version: v.version.clone(),
                sha256: Some(v.sha256.clone()),
                event: RolloutEvent::Refused,
                reason: Some(reason.clone()),
                at_ms: crate::now_ms(),
                shadow: None,
            })
            .await;
        Err(FetchError::Refused(format!(
            "{} {}: {reason}",
            v.name, v.version
        )))
    }

    /// Delivers queued reports in order; stops at the first failure that
    /// may succeed later (the rest wait for the next poll).
    pub async fn deliver_reports(&self, queue: &ReportQueue) {
        let Ok(mut url) =
            reqwest::Url::parse(&format!("{}{}", self.base_url, rollout_reports_path()))
        else {
            tracing::error!(url = %self.base_url, "bad registry URL; rollout reports not delivered");
            return;
        };
        // The registry counts a report in the group the device asks for
        // (its own assignment wins), like the deployment.
        url.query_pairs_mut()
            .append_pair("group", &self.settings.group);
        let pending = tokio::task::spawn_blocking({
            let queue = queue.clone();
            move || queue.pending()
        })
        .await
        .unwrap_or_default();
        for (path, report) in pending {
            let sent = self
                .client
                .post(url.clone())
                .bearer_auth(self.token.expose())
                .json(&report)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    Counters::add(&self.counters.rollout_reports_sent, 1);
                    queue.done(&path);
                }
                Ok(r)
                    if matches!(
                        r.status(),
                        StatusCode::BAD_REQUEST
                            | StatusCode::NOT_FOUND
                            | StatusCode::UNPROCESSABLE_ENTITY
                            | StatusCode::PAYLOAD_TOO_LARGE
                    ) =>
                {
                    let why = format!("{}: {}", r.status(), error_body(r).await);
                    queue.set_aside(&path, &why);
                }
                Ok(r) => {
                    tracing::warn!(status = %r.status(), "rollout report not delivered; retrying at the next poll");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "rollout report not delivered; retrying at the next poll");
                    return;
                }
            }
        }
    }
}

/// Checks `v`'s signature: its key id names one of `trusted` and the
/// ed25519 signature over [`signed_message`] verifies strictly.
///
/// # Errors
/// Why the signature is not acceptable.
pub fn verify_signature(trusted: &[super::TrustedKey], v: &ModelVersion) -> Result<(), String> {
    let Some(key) = trusted.iter().find(|k| k.id == v.key_id) else {
        return Err(format!(
            "signed with key {:?}, which is not in rollout.trusted_keys",
            v.key_id
        ));
    };
    let bytes: [u8; 64] = hex::decode(&v.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "signature is not 128 hex digits".to_owned())?;
    let signature = ed25519_dalek::Signature::from_bytes(&bytes);
    key.key
        .verify_strict(&signed_message(&v.sha256), &signature)
        .map_err(|_| format!("signature does not verify with key {}", key.id))
}

/// Checks the artifact layout and that its manifest and ONNX file are the
/// announced ones; returns `(model.toml, model.onnx)`.
fn check_archive<'a>(bytes: &'a [u8], v: &ModelVersion) -> Result<(&'a [u8], &'a [u8]), String> {
    let (manifest, onnx) = sync_protocol::archive::read(bytes)
        .map_err(|e| format!("artifact is not a model archive: {e}"))?;
    let text = std::str::from_utf8(manifest).map_err(|_| "model.toml is not UTF-8".to_owned())?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("model.toml does not parse: {e}"))?;
    let field = |k: &str| table.get(k).and_then(toml::Value::as_str).unwrap_or("");
    if field("name") != v.name || field("version") != v.version {
        return Err(format!(
            "artifact holds {} {}, the registry announced {} {}",
            field("name"),
            field("version"),
            v.name,
            v.version
        ));
    }
    let onnx_sha = hex::encode(Sha256::digest(onnx));
    if onnx_sha != v.model_sha256.to_ascii_lowercase()
        || field("sha256").to_ascii_lowercase() != onnx_sha
    {
        return Err(format!(
            "model.onnx has sha256 {onnx_sha}; announced {}, manifest says {}",
            v.model_sha256,
            field("sha256")
        ));
    }
    Ok((manifest, onnx))
}

/// Writes the package into `incoming`, fsyncs it, and renames it to `dest`
/// (then fsyncs the parent): the watcher sees the whole package or nothing.
fn install(incoming: &Path, dest: &Path, manifest: &[u8], onnx: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if incoming.exists() {
        std::fs::remove_dir_all(incoming)?;
    }
    std::fs::create_dir_all(incoming)?;
    for (name, bytes) in [("model.toml", manifest), ("model.onnx", onnx)] {
        let mut f = std::fs::File::create(incoming.join(name))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::File::open(incoming)?.sync_all()?;
    std::fs::rename(incoming, dest)?;
    if let Some(parent) = dest.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Err(FetchError::Body(format!("body exceeds {cap} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn error_body(response: reqwest::Response) -> String {
    let mut text = response.text().await.unwrap_or_default();
    text.truncate(text.floor_char_boundary(512));
    text
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
    use crate::rollout::TrustedKey;
    use ed25519_dalek::Signer as _;

    fn version(sha: &str, key: &TrustedKey, signature: String) -> ModelVersion {
        ModelVersion {
            name: "m".into(),
            version: "1.0.0".into(),
            group: "default".into(),
            stage: sync_protocol::registry::Stage::Production,
            sha256: sha.into(),
            model_sha256: "00".repeat(32),
            size_bytes: 10,
            signature,
            key_id: key.id.clone(),
            created_ms: 0,
            stage_changed_ms: 0,
            training_run: None,
            dataset: None,
            artifact_url: String::new(),
        }
    }

    #[test]
    fn only_a_strict_signature_by_a_trusted_key_verifies() {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let key = TrustedKey::parse(&hex::encode(signing.verifying_key().as_bytes())).unwrap();
        let sha = "ab".repeat(32);
        let good = hex::encode(signing.sign(&signed_message(&sha)).to_bytes());
        assert_eq!(
            verify_signature(
                std::slice::from_ref(&key),
                &version(&sha, &key, good.clone())
            ),
            Ok(())
        );

        // The same signature for another artifact.
        let other = "cd".repeat(32);
        let err = verify_signature(
            std::slice::from_ref(&key),
            &version(&other, &key, good.clone()),
        )
        .unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        // A flipped bit.
        let mut bad = hex::decode(&good).unwrap();
        bad[5] ^= 1;
        let err = verify_signature(
            std::slice::from_ref(&key),
            &version(&sha, &key, hex::encode(bad)),
        )
        .unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        // Not hex, wrong length.
        for s in ["zz".repeat(64), "ab".repeat(10), String::new()] {
            let err =
                verify_signature(std::slice::from_ref(&key), &version(&sha, &key, s)).unwrap_err();
            assert!(err.contains("128 hex digits"), "{err}");
        }
        // A key id nobody trusts.
        let err = verify_signature(&[], &version(&sha, &key, good)).unwrap_err();
        assert!(err.contains("not in rollout.trusted_keys"), "{err}");
    }

    #[test]
    fn archives_must_hold_the_announced_model() {
        let onnx = b"not really onnx";
        let onnx_sha = hex::encode(Sha256::digest(onnx));
        let manifest = format!("name = \"m\"\nversion = \"1.0.0\"\nsha256 = \"{onnx_sha}\"\n");
        let archive = sync_protocol::archive::write(manifest.as_bytes(), onnx).unwrap();
        let key =
            TrustedKey::parse("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
                .unwrap();
        let mut v = version("", &key, String::new());
        v.model_sha256 = onnx_sha.clone();
        assert!(check_archive(&archive, &v).is_ok());

        v.version = "1.0.1".into();
        let err = check_archive(&archive, &v).unwrap_err();
        assert!(
            err.contains("artifact holds m 1.0.0, the registry announced m 1.0.1"),
            "{err}"
        );
        v.version = "1.0.0".into();
        v.model_sha256 = "00".repeat(32);
        assert!(
            check_archive(&archive, &v)
                .unwrap_err()
                .contains("model.onnx has sha256")
        );
        v.model_sha256 = onnx_sha;
        let err = check_archive(&archive[..archive.len() - 600], &v).unwrap_err();
        assert!(err.contains("not a model archive"), "{err}");
    }
}
