//! The model registry: push / promote / archive on SQLite and (gated on
//! `EDGE_TEST_POSTGRES`) PostgreSQL with the shipped NAB package, refused
//! packages leaving nothing behind, the rank-3 (`input.layout`) fixture
//! packages, signatures and key rotation, and the
//! HTTP API on a real port-0 server (ETag 304, resumable Range downloads,
//! operator-only promotion), plus the CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use cloud_sync::config::{Config, ConfigError, RegistrySettings};
use cloud_sync::registry::archive;
use cloud_sync::registry::keys::{self, Signer};
use cloud_sync::registry::{PushOptions, Registry, RegistryError, ValidationError};
use cloud_sync::sync_protocol::ErrorBody;
use cloud_sync::sync_protocol::registry::{
    ModelVersion, Promotion, Stage, artifact_path, production_path, promote_path,
};
use cloud_sync::{Settings, StorageSettings, start};
use ed25519_dalek::VerifyingKey;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::backends::PgSchema;

pub(crate) const NAME: &str = "nab-machine-temp";

fn shipped_package() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp")
}

/// A copy of the shipped package in `dir/name`, with `version` set.
pub(crate) fn package(dir: &Path, name: &str, version: &str) -> Result<PathBuf> {
    let target = dir.join(name);
    std::fs::create_dir_all(&target)?;
    std::fs::copy(
        shipped_package().join("model.onnx"),
        target.join("model.onnx"),
    )?;
    let manifest = std::fs::read_to_string(shipped_package().join("model.toml"))?;
    let manifest = manifest.replacen(
        "version = \"1.0.0\"",
        &format!("version = \"{version}\""),
        1,
    );
    std::fs::write(target.join("model.toml"), manifest)?;
    Ok(target)
}

fn edit_manifest(dir: &Path, from: &str, to: &str) -> Result<()> {
    let path = dir.join("model.toml");
    let text = std::fs::read_to_string(&path)?;
    if !text.contains(from) {
        bail!("{from:?} not in manifest");
    }
    std::fs::write(path, text.replacen(from, to, 1))?;
    Ok(())
}

fn manifest_sha(dir: &Path) -> Result<String> {
    let text = std::fs::read_to_string(dir.join("model.toml"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("sha256 = "))
        .context("no sha256 line")?;
    Ok(line
        .trim_start_matches("sha256 = ")
        .trim_matches('"')
        .to_owned())
}

fn artifact_names(settings: &RegistrySettings) -> Result<Vec<String>> {
    let mut names = Vec::new();
    if settings.artifact_dir.exists() {
        for entry in std::fs::read_dir(&settings.artifact_dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// A registry with a signing key in a temp dir, on SQLite or PostgreSQL.
struct Fixture {
    dir: tempfile::TempDir,
    settings: Settings,
    registry: Registry,
    signer: Signer,
    _schema: Option<PgSchema>,
}

impl Fixture {
    async fn sqlite() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let settings = Settings::for_database(dir.path().join("cloud.db"));
        Fixture::open(dir, settings, None).await
    }

    async fn postgres(test: &str) -> Result<Option<Fixture>> {
        let Some(schema) = PgSchema::create(test).await? else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let mut settings = Settings::for_database(dir.path().join("unused.db"));
        settings.storage = StorageSettings::Postgres(Box::new(schema.settings()));
        Ok(Some(Fixture::open(dir, settings, Some(schema)).await?))
    }

    async fn open(
        dir: tempfile::TempDir,
        settings: Settings,
        schema: Option<PgSchema>,
    ) -> Result<Fixture> {
        keys::generate(&settings.registry)?;
        let signer = Signer::load(&settings.registry)?;
        let registry = Registry::open(&settings.registry, &settings.storage).await?;
        Ok(Fixture {
            dir,
            settings,
            registry,
            signer,
            _schema: schema,
        })
    }

    async fn push(&self, package: &Path, group: &str) -> Result<ModelVersion, RegistryError> {
        let options = PushOptions {
            group: group.to_owned(),
            training_run: Some("run-7".to_owned()),
            dataset: None,
        };
        Ok(self
            .registry
            .push(package, &self.signer, options)
            .await?
            .version)
    }
}

/// Push, re-push, conflicting push, promote, rollback and archive, checked
/// on the given backend.
async fn lifecycle(f: &Fixture) -> Result<()> {
    let v1_dir = package(f.dir.path(), "v1", "1.0.0")?;
    let v1 = f.push(&v1_dir, "default").await?;
    assert_eq!((v1.name.as_str(), v1.version.as_str()), (NAME, "1.0.0"));
    assert_eq!(v1.stage, Stage::Staging);
    assert_eq!(v1.training_run.as_deref(), Some("run-7"));
    assert_eq!(v1.key_id, f.signer.key_id());
    assert_eq!(v1.artifact_url, artifact_path(&v1.sha256));

    // The artifact is content-addressed, complete, and holds the package.
    let stored = std::fs::read(f.settings.registry.artifact_dir.join(&v1.sha256))?;
    assert_eq!(hex::encode(Sha256::digest(&stored)), v1.sha256);
    assert_eq!(v1.size_bytes, stored.len() as u64);
    let (manifest, onnx) = archive::read(&stored)?;
    assert_eq!(manifest, std::fs::read(v1_dir.join("model.toml"))?);
    assert_eq!(onnx, std::fs::read(v1_dir.join("model.onnx"))?);
    assert_eq!(v1.model_sha256, hex::encode(Sha256::digest(onnx)));
    assert!(keys::verify(
        &f.signer.public_key(),
        &v1.sha256,
        &v1.signature
    ));

    // Identical content again: a no-op, the same row.
    let again = f
        .registry
        .push(&v1_dir, &f.signer, PushOptions::default())
        .await?;
    assert!(!again.created);
    assert_eq!(again.version.sha256, v1.sha256);

    // The same version with other content is refused, and leaves no artifact.
    let before = artifact_names(&f.settings.registry)?;
    let changed = package(f.dir.path(), "v1-changed", "1.0.0")?;
    edit_manifest(&changed, "description = \"", "description = \"changed: ")?;
    let err = f.push(&changed, "default").await.unwrap_err();
    assert!(matches!(err, RegistryError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("bump the version"), "{err}");
    assert_eq!(artifact_names(&f.settings.registry)?, before);

    // Promotion of unknown versions or groups: a clear error, nothing changed.
    let err = f
        .registry
        .promote(NAME, "9.9.9", "default")
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::UnknownVersion { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "unknown version nab-machine-temp 9.9.9 in group \"default\" (no such version in any group)"
    );
    let err = f
        .registry
        .promote(NAME, "1.0.0", "line-2")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("(registered for groups: default)"),
        "{err}"
    );
    assert!(f.registry.production(NAME, "default").await?.is_none());

    let promotion = f.registry.promote(NAME, "1.0.0", "default").await?;
    assert_eq!(promotion.promoted.stage, Stage::Production);
    assert_eq!(promotion.archived, None);
    let production = f
        .registry
        .production(NAME, "default")
        .await?
        .context("none")?;
    assert_eq!(production.version, "1.0.0");

    // 1.1.0 replaces it atomically; 1.0.0 is archived.
    let v2_dir = package(f.dir.path(), "v2", "1.1.0")?;
    let v2 = f.push(&v2_dir, "default").await?;
    assert_ne!(v2.sha256, v1.sha256);
    let promotion = f.registry.promote(NAME, "1.1.0", "default").await?;
    assert_eq!(promotion.archived.as_deref(), Some("1.0.0"));
    let stages: Vec<(String, Stage)> = f
        .registry
        .list(Some(NAME))
        .await?
        .into_iter()
        .map(|v| (v.version, v.stage))
        .collect();
    assert_eq!(
        stages,
        [
            ("1.0.0".to_owned(), Stage::Archived),
            ("1.1.0".to_owned(), Stage::Production)
        ]
    );

    // Rollback: the archived version may be promoted again.
    let promotion = f.registry.promote(NAME, "1.0.0", "default").await?;
    assert_eq!(promotion.archived.as_deref(), Some("1.1.0"));
    // Promoting the production version again changes nothing.
    assert_eq!(
        f.registry.promote(NAME, "1.0.0", "default").await?.archived,
        None
    );

    // Another group is independent.
    f.push(&v2_dir, "line-2").await?;
    f.registry.promote(NAME, "1.1.0", "line-2").await?;
    assert_eq!(
        f.registry
            .production(NAME, "default")
            .await?
            .context("none")?
            .version,
        "1.0.0"
    );
    assert_eq!(
        f.registry
            .production(NAME, "line-2")
            .await?
            .context("none")?
            .version,
        "1.1.0"
    );

    let archived = f.registry.archive(NAME, "1.0.0", "default").await?;
    assert_eq!(archived.stage, Stage::Archived);
    assert!(f.registry.production(NAME, "default").await?.is_none());
    let err = f.registry.production(NAME, "bad group!").await.unwrap_err();
    assert!(matches!(err, RegistryError::InvalidGroup { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn lifecycle_on_sqlite() -> Result<()> {
    lifecycle(&Fixture::sqlite().await?).await
}

#[tokio::test]
async fn lifecycle_on_postgres() -> Result<()> {
    match Fixture::postgres("lifecycle_on_postgres").await? {
        Some(f) => lifecycle(&f).await,
        None => Ok(()),
    }
}

/// Every refused package: a clear message, no row, no artifact.
async fn refusals(f: &Fixture) -> Result<()> {
    let root = f.dir.path().join("bad");
    let expect =
        async |dir: &Path, check: &dyn Fn(&ValidationError) -> bool, text: &str| -> Result<()> {
            let err = f.push(dir, "default").await.unwrap_err();
            let RegistryError::Invalid(cause) = &err else {
                bail!("{}: expected a validation error, got {err}", dir.display());
            };
            assert!(check(cause), "{}: {cause}", dir.display());
            let message = format!("{:#}", anyhow::Error::from(err));
            assert!(message.contains(text), "{}: {message}", dir.display());
            assert!(
                f.registry.list(None).await?.is_empty(),
                "{}: row left",
                dir.display()
            );
            assert_eq!(
                artifact_names(&f.settings.registry)?,
                Vec::<String>::new(),
                "{}: artifact left",
                dir.display()
            );
            Ok(())
        };

    let mismatch = package(&root, "mismatch", "1.0.0")?;
    let sha = manifest_sha(&mismatch)?;
    edit_manifest(&mismatch, &sha, &"0".repeat(64))?;
    expect(
        &mismatch,
        &|e: &ValidationError| matches!(e, ValidationError::HashMismatch { .. }),
        "sha256 mismatch for model.onnx",
    )
    .await?;

    // Truncated ONNX with a manifest hash that matches it: tract refuses it.
    let truncated = package(&root, "truncated", "1.0.0")?;
    let onnx = std::fs::read(truncated.join("model.onnx"))?;
    let short = &onnx[..onnx.len() / 2];
    std::fs::write(truncated.join("model.onnx"), short)?;
    edit_manifest(&truncated, &sha, &hex::encode(Sha256::digest(short)))?;
    expect(
        &truncated,
        &|e: &ValidationError| matches!(e, ValidationError::Load { .. }),
        "model.onnx does not load",
    )
    .await?;

    // Truncated ONNX under the original hash: refused before tract sees it.
    let cut = package(&root, "cut", "1.0.0")?;
    std::fs::write(cut.join("model.onnx"), short)?;
    expect(
        &cut,
        &|e: &ValidationError| matches!(e, ValidationError::HashMismatch { .. }),
        "sha256 mismatch",
    )
    .await?;

    let golden = package(&root, "golden", "1.0.0")?;
    edit_manifest(&golden, "score = 9.495649", "score = 10.5")?;
    expect(
        &golden,
        &|e: &ValidationError| matches!(e, ValidationError::Golden { index: 0, .. }),
        "golden pair 0 failed",
    )
    .await?;

    let wrong_tensor = package(&root, "tensor", "1.0.0")?;
    edit_manifest(&wrong_tensor, "tensor = \"score\"", "tensor = \"nope\"")?;
    expect(
        &wrong_tensor,
        &|e: &ValidationError| matches!(e, ValidationError::Load { .. }),
        "no output named \"nope\"",
    )
    .await?;

    let version = package(&root, "version", "1.0")?;
    expect(
        &version,
        &|e: &ValidationError| matches!(e, ValidationError::Invalid { key: "version", .. }),
        "key `version`",
    )
    .await?;

    let unparsable = package(&root, "toml", "1.0.0")?;
    edit_manifest(&unparsable, "[input]", "[input")?;
    expect(
        &unparsable,
        &|e: &ValidationError| matches!(e, ValidationError::Manifest { .. }),
        "invalid manifest",
    )
    .await?;

    let missing = root.join("missing");
    std::fs::create_dir_all(&missing)?;
    expect(
        &missing,
        &|e: &ValidationError| matches!(e, ValidationError::Read { .. }),
        "model.toml",
    )
    .await?;
    Ok(())
}

/// The rank-3 fixture packages (`input.layout` channels_first and
/// channels_last) are accepted by `push` and stored byte for byte; the same
/// CNN with its layout flipped is refused naming the key.
#[tokio::test]
async fn rank_3_packages_push_with_their_layout() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    for name in ["wave-cnn", "motor-lstm"] {
        let dir = models.join(name);
        let version = f.push(&dir, "default").await?;
        assert_eq!(version.name, name);
        let stored = std::fs::read(f.settings.registry.artifact_dir.join(&version.sha256))?;
        let (manifest, onnx) = archive::read(&stored)?;
        assert_eq!(manifest, std::fs::read(dir.join("model.toml"))?);
        assert_eq!(onnx, std::fs::read(dir.join("model.onnx"))?);
    }

    let flipped = f.dir.path().join("flipped");
    std::fs::create_dir_all(&flipped)?;
    for file in ["model.toml", "model.onnx"] {
        std::fs::copy(models.join("wave-cnn").join(file), flipped.join(file))?;
    }
    edit_manifest(&flipped, "version = \"1.0.0\"", "version = \"1.0.1\"")?;
    edit_manifest(
        &flipped,
        "layout = \"channels_first\"",
        "layout = \"channels_last\"",
    )?;
    let err = f.push(&flipped, "default").await.unwrap_err();
    let message = format!("{:#}", anyhow::Error::from(err));
    assert!(
        message.contains("input.layout = \"channels_last\" feeds [batch, 64, 1]"),
        "{message}"
    );
    assert_eq!(f.registry.list(None).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn refused_packages_leave_nothing_on_sqlite() -> Result<()> {
    refusals(&Fixture::sqlite().await?).await
}

#[tokio::test]
async fn refused_packages_leave_nothing_on_postgres() -> Result<()> {
    match Fixture::postgres("refused_packages_leave_nothing_on_postgres").await? {
        Some(f) => refusals(&f).await,
        None => Ok(()),
    }
}

#[tokio::test]
async fn signatures_verify_with_listed_keys_across_rotation() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let v1 = f
        .push(&package(f.dir.path(), "v1", "1.0.0")?, "default")
        .await?;

    let other = VerifyingKey::from(&ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
    let first_key = f.signer.public_key();
    assert!(keys::verify(&first_key, &v1.sha256, &v1.signature));
    assert!(
        !keys::verify(&other, &v1.sha256, &v1.signature),
        "another key"
    );
    let mut forged = v1.signature.clone().into_bytes();
    forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
    assert!(!keys::verify(
        &first_key,
        &v1.sha256,
        &String::from_utf8(forged)?
    ));
    assert!(
        !keys::verify(&first_key, &"00".repeat(32), &v1.signature),
        "other artifact"
    );

    keys::rotate(&f.settings.registry)?;
    let signer = Signer::load(&f.settings.registry)?;
    assert_ne!(signer.key_id(), f.signer.key_id());
    let v2 = f
        .registry
        .push(
            &package(f.dir.path(), "v2", "1.1.0")?,
            &signer,
            PushOptions::default(),
        )
        .await?
        .version;
    assert_eq!(v2.key_id, signer.key_id());

    // Agents holding every listed key verify both, each with its own key.
    let listed = keys::public_keys(&f.settings.registry)?;
    assert_eq!(listed.len(), 2);
    for version in [&v1, &v2] {
        let (_, key) = listed
            .iter()
            .find(|(entry, _)| entry.id == version.key_id)
            .context("signing key not listed")?;
        assert!(keys::verify(key, &version.sha256, &version.signature));
    }
    assert!(!keys::verify(
        &signer.public_key(),
        &v1.sha256,
        &v1.signature
    ));
    let snippet = keys::agent_config_snippet(&listed);
    assert!(
        snippet.contains(&listed[0].0.public_key) && snippet.contains("(retired)"),
        "{snippet}"
    );
    Ok(())
}

#[test]
fn registry_config_is_validated_with_key_names() -> Result<()> {
    let config = Config::from_toml_str("[registry]\nartifact_dir = \"a\"\n")?;
    let settings = config.validate()?;
    assert_eq!(settings.registry.artifact_dir, PathBuf::from("a"));
    assert_eq!(
        settings.registry.signing_key_file,
        PathBuf::from("registry-signing-key.pem")
    );

    match Config::from_toml_str("[registry]\nartifact_directory = \"a\"\n") {
        Err(ConfigError::Parse { key, .. }) => {
            assert_eq!(key.as_deref(), Some("artifact_directory"));
        }
        other => bail!("expected a parse error, got {other:?}"),
    }
    let config = Config::from_toml_str(
        "[registry]\nartifact_dir = \"\"\nsigning_key_file = \"k\"\npublic_keys_file = \"k\"\n",
    )?;
    let Err(ConfigError::Invalid { problems }) = config.validate() else {
        bail!("expected invalid config");
    };
    let keys: Vec<_> = problems.iter().map(|p| p.key).collect();
    assert_eq!(keys, ["registry.artifact_dir", "registry.public_keys_file"]);
    Ok(())
}

/// A reply from [`http`].
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn code(&self) -> Result<String> {
        Ok(serde_json::from_slice::<ErrorBody>(&self.body)
            .with_context(|| format!("body {:?}", String::from_utf8_lossy(&self.body)))?
            .code)
    }
}

/// One HTTP/1.1 exchange on a fresh connection; bodies with Content-Length only.
pub(crate) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split])?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .context("no status")?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = raw[split + 4..].to_vec();
    let reply = Reply {
        status,
        headers,
        body,
    };
    if reply.header("transfer-encoding").is_some() {
        bail!("chunked reply; the registry always sends Content-Length");
    }
    if let Some(length) = reply.header("content-length") {
        assert_eq!(length.parse::<usize>()?, reply.body.len(), "content-length");
    }
    Ok(reply)
}

#[tokio::test]
async fn http_api_etag_range_resume_and_operator_promotion() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = Settings::for_database(dir.path().join("cloud.db"));
    keys::generate(&settings.registry)?;
    let signer = Signer::load(&settings.registry)?;
    let shutdown = CancellationToken::new();
    let server = start(settings.clone(), shutdown.clone()).await?;
    let addr = server.addr;
    let device = format!("Bearer {}", server.store().add_device("dev-1").await?);
    let operator = format!("Bearer {}", server.store().add_operator("ops").await?);
    let as_device = [("authorization", device.as_str())];
    let as_operator = [
        ("authorization", operator.as_str()),
        ("content-type", "application/json"),
    ];

    // The CLI side (another handle on the same database) registers 1.0.0.
    let registry = Registry::open(&settings.registry, &settings.storage).await?;
    let pushed = registry
        .push(
            &package(dir.path(), "v1", "1.0.0")?,
            &signer,
            PushOptions::default(),
        )
        .await?
        .version;
    let production = format!("{}?group=default", production_path(NAME));

    let reply = http(addr, "GET", &production, &[], b"").await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (401, "missing_token")
    );
    let reply = http(addr, "GET", &production, &as_device, b"").await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (404, "no_production_version")
    );

    // Promotion: operators only; unknown versions are a clear 404.
    let promote = promote_path(NAME, "1.0.0");
    let body = br#"{"group":"default"}"#;
    let reply = http(addr, "POST", &promote, &as_device, body).await?;
    assert_eq!((reply.status, reply.code()?.as_str()), (403, "forbidden"));
    let reply = http(
        addr,
        "POST",
        &promote_path(NAME, "2.0.0"),
        &as_operator,
        body,
    )
    .await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (404, "unknown_version")
    );
    let message = serde_json::from_slice::<ErrorBody>(&reply.body)?.message;
    assert!(
        message.contains("unknown version nab-machine-temp 2.0.0"),
        "{message}"
    );
    let reply = http(addr, "POST", &promote, &as_operator, b"{\"grup\":1}").await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (400, "malformed_json")
    );
    let reply = http(addr, "POST", &promote, &as_operator, body).await?;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let promotion: Promotion = serde_json::from_slice(&reply.body)?;
    assert_eq!(promotion.promoted.sha256, pushed.sha256);

    // The production version, then 304 while it is unchanged.
    let reply = http(addr, "GET", &production, &as_device, b"").await?;
    assert_eq!(reply.status, 200);
    let version: ModelVersion = serde_json::from_slice(&reply.body)?;
    assert_eq!(
        (version.version.as_str(), version.stage),
        ("1.0.0", Stage::Production)
    );
    assert!(keys::verify(
        &signer.public_key(),
        &version.sha256,
        &version.signature
    ));
    let etag = reply.header("etag").context("no etag")?.to_owned();
    let cached = [
        ("authorization", device.as_str()),
        ("if-none-match", etag.as_str()),
    ];
    let reply = http(addr, "GET", &production, &cached, b"").await?;
    assert_eq!(reply.status, 304);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("etag"), Some(etag.as_str()));
    // Without `group`, the default group is meant.
    let reply = http(addr, "GET", &production_path(NAME), &cached, b"").await?;
    assert_eq!(reply.status, 304);
    let reply = http(addr, "GET", &format!("{production}&x=1"), &as_device, b"").await?;
    assert_eq!((reply.status, reply.code()?.as_str()), (400, "bad_query"));

    // Download in 1000-byte pieces as an agent resuming after each cut link.
    let url = version.artifact_url.clone();
    let mut downloaded = Vec::new();
    loop {
        let range = format!("bytes={}-{}", downloaded.len(), downloaded.len() + 999);
        let headers = [
            ("authorization", device.as_str()),
            ("range", range.as_str()),
            ("if-range", etag_of(&version.sha256).leak()),
        ];
        let reply = http(addr, "GET", &url, &headers, b"").await?;
        if reply.status == 416 {
            assert_eq!(
                reply.header("content-range"),
                Some(format!("bytes */{}", version.size_bytes).as_str())
            );
            break;
        }
        assert_eq!(reply.status, 206);
        let end = downloaded.len() + reply.body.len() - 1;
        assert_eq!(
            reply.header("content-range"),
            Some(format!("bytes {}-{end}/{}", downloaded.len(), version.size_bytes).as_str())
        );
        downloaded.extend_from_slice(&reply.body);
    }
    assert_eq!(downloaded.len() as u64, version.size_bytes);
    assert_eq!(hex::encode(Sha256::digest(&downloaded)), version.sha256);
    assert!(archive::read(&downloaded).is_ok());

    let reply = http(addr, "GET", &url, &as_device, b"").await?;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, downloaded);
    assert_eq!(reply.header("accept-ranges"), Some("bytes"));
    let suffix = [("authorization", device.as_str()), ("range", "bytes=-100")];
    let reply = http(addr, "GET", &url, &suffix, b"").await?;
    assert_eq!(
        (reply.status, reply.body.as_slice()),
        (206, &downloaded[downloaded.len() - 100..])
    );
    let reply = http(
        addr,
        "GET",
        &artifact_path(&"0".repeat(64)),
        &as_device,
        b"",
    )
    .await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (404, "unknown_artifact")
    );
    let reply = http(addr, "GET", "/v1/artifacts/..%2Fcloud.db", &as_device, b"").await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (404, "unknown_artifact")
    );
    let reply = http(addr, "GET", &url, &[], b"").await?;
    assert_eq!(reply.status, 401);

    // A promotion changes the ETag: the cached copy is no longer current.
    registry
        .push(
            &package(dir.path(), "v2", "1.1.0")?,
            &signer,
            PushOptions::default(),
        )
        .await?;
    let reply = http(
        addr,
        "POST",
        &promote_path(NAME, "1.1.0"),
        &as_operator,
        b"",
    )
    .await?;
    assert_eq!(reply.status, 200);
    let promotion: Promotion = serde_json::from_slice(&reply.body)?;
    assert_eq!(promotion.archived.as_deref(), Some("1.0.0"));
    let reply = http(addr, "GET", &production, &cached, b"").await?;
    assert_eq!(reply.status, 200);
    assert_ne!(reply.header("etag"), Some(etag.as_str()));
    let version: ModelVersion = serde_json::from_slice(&reply.body)?;
    assert_eq!(version.version, "1.1.0");

    shutdown.cancel();
    server.join().await?;
    Ok(())
}

fn etag_of(sha256: &str) -> String {
    format!("\"{sha256}\"")
}

#[test]
fn cli_keys_push_list_promote() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cloud-sync.toml");
    std::fs::write(
        &config,
        format!(
            "database_path = {:?}\n[registry]\nartifact_dir = {:?}\nsigning_key_file = {:?}\npublic_keys_file = {:?}\n",
            dir.path().join("cloud.db"),
            dir.path().join("artifacts"),
            dir.path().join("key.pem"),
            dir.path().join("keys.toml"),
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    let run = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_cloud-sync"))
            .args(args)
            .args(["--config", &config])
            .output()?)
    };
    let text = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let pkg = package(dir.path(), "pkg", "1.0.0")?
        .to_string_lossy()
        .into_owned();

    let out = run(&["models", "push", &pkg])?;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cloud-sync keys generate"),
        "{}",
        text(&out)
    );
    let out = run(&["keys", "generate"])?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["keys", "generate"])?;
    assert!(!out.status.success());
    assert!(text(&out).contains("keys rotate"), "{}", text(&out));

    let out = run(&[
        "models",
        "push",
        &pkg,
        "--group",
        "line-1",
        "--dataset",
        "nab-2024",
    ])?;
    assert!(out.status.success(), "{}", text(&out));
    let sha = String::from_utf8(out.stdout.clone())?.trim().to_owned();
    assert_eq!(sha.len(), 64);
    let out = run(&["models", "promote", NAME, "1.0.1", "--group", "line-1"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("unknown version nab-machine-temp 1.0.1 in group \"line-1\""),
        "{}",
        text(&out)
    );
    let out = run(&["models", "promote", NAME, "1.0.0", "--group", "line-1"])?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["models", "list"])?;
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8(out.stdout)?;
    let row = listing.lines().nth(1).context("no row")?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[..5],
        [NAME, "1.0.0", "line-1", "production", &sha[..16]],
        "{listing}"
    );
    assert!(row.ends_with("nab-2024"), "{listing}");

    let out = run(&["keys", "rotate"])?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["keys", "show-public"])?;
    assert_eq!(
        String::from_utf8(out.stdout)?.matches("# key id").count(),
        2
    );
    Ok(())
}
