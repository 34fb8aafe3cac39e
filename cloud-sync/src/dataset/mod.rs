//! Versioned datasets: snapshots of readings and predictions frozen into
//! Parquet files with a manifest, in a content-addressed store, behind the
//! `cloud-sync dataset` CLI and `/v1/datasets` (`docs/datasets.md`).
//!
//! Modules:
//! - `manifest`: the manifest, the selection, lineage and the content hash;
//! - `files`: the Parquet schemas, the deterministic writer and the reader;
//! - `db`: the `datasets` table on SQLite or PostgreSQL;
//! - `http`: the API handlers; `openapi`: their part of `/openapi.json`.
//!
//! This module owns the dataset store: objects `parquet/<sha256>.parquet`
//! (each named by the sha256 of its bytes) and `manifests/<id>.json`, in a
//! local directory or an S3-compatible bucket, always through
//! [`object_store`]. It reads readings and predictions only through
//! [`Store`]'s public reads.
//!
//! Invariants:
//! - Deterministic: the same selection over the same stored rows gives the
//!   same files, byte for byte, and the same id (rows in identity order,
//!   fixed writer properties; `created_ms` and `name` are outside the hash).
//! - Immutable: an id names one content forever; snapshotting identical
//!   content again writes nothing and returns the registered dataset.
//! - Nothing half registered: a refused snapshot (bad selection, unknown
//!   device or stream, nothing selected) writes nothing. Otherwise every
//!   object is put atomically (object_store: a local staging file renamed
//!   and fsynced; one S3 PUT), the Parquet files first, the manifest last,
//!   and the database row only after the manifest: a listed dataset is
//!   always complete, and a crash leaves at most unreferenced files.
//! - Reading verifies before parsing: the manifest must hash to its id and
//!   every file to the sha256 the manifest names.

pub mod db;
pub mod files;
pub mod http;
pub mod manifest;
pub mod openapi;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use serde::Deserialize;
use sync_protocol::{MAX_PAGE_LIMIT, Prediction, ReadQuery, Reading};

pub use db::Db;
pub use files::{DatasetPrediction, DatasetReading, FileError};
pub use manifest::{
    Column, FORMAT_VERSION, Lineage, Manifest, ManifestContent, PredictionLineage, ReadingLineage,
    Selection, SeqSpan, TableFile,
};

use crate::config::{DatasetSettings, S3Settings, StorageSettings};
use crate::registry::artifacts::is_sha256_hex;
use crate::store::{Store, StoreError, is_valid_device_id};

/// Longest accepted dataset name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Result alias for this module.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

/// Why a dataset operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The selection is not acceptable; nothing was written.
    #[error("invalid selection: {reason}")]
    InvalidSelection {
        /// What is wrong.
        reason: String,
    },
    /// A selected device is not registered; nothing was written.
    #[error("unknown device {device:?}")]
    UnknownDevice {
        /// The device id.
        device: String,
    },
    /// No selected device has a selected stream; nothing was written.
    #[error("unknown stream {stream:?}: the selected devices have {}", list(known))]
    UnknownStream {
        /// The stream as given.
        stream: String,
        /// The `source/stream` keys the selected devices have.
        known: Vec<String>,
    },
    /// Nothing matches the selection; nothing was written.
    #[error(
        "nothing to snapshot: no reading or prediction of devices {} on streams {} in [{from_ms}, {to_ms})",
        list(devices),
        list(streams)
    )]
    Empty {
        /// Devices selected.
        devices: Vec<String>,
        /// Streams selected.
        streams: Vec<String>,
        /// Window start.
        from_ms: i64,
        /// Window end.
        to_ms: i64,
    },
    /// No dataset with this id.
    #[error("unknown dataset {id:?}")]
    UnknownDataset {
        /// The id asked for.
        id: String,
    },
    /// A stored object does not match its hash, or does not parse.
    #[error("dataset {id} is corrupt: {object} {problem}")]
    Corrupt {
        /// Dataset id.
        id: String,
        /// Object path in the store.
        object: String,
        /// What is wrong.
        problem: String,
    },
    /// A Parquet file could not be written, or read after its hash matched.
    #[error("dataset file {object}")]
    File {
        /// Object path (or table name while writing).
        object: String,
        /// Why.
        #[source]
        source: FileError,
    },
    /// The dataset store could not be opened or used.
    #[error("dataset store {store}: cannot {action} {object}")]
    Object {
        /// The store (directory or bucket; never credentials).
        store: String,
        /// `put`, `get` or `open`.
        action: &'static str,
        /// Object path.
        object: String,
        /// Why (boxed: the object_store error is large).
        #[source]
        source: Box<object_store::Error>,
    },
    /// The S3 credentials file could not be read.
    #[error("cannot read datasets.credentials_file {}: {reason}", path.display())]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why (never the file's content).
        reason: String,
    },
    /// The local dataset directory could not be created.
    #[error("cannot create datasets.dir {}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading the selected rows failed.
    #[error("cannot read the selected rows")]
    Store(#[source] StoreError),
    /// The dataset table failed.
    #[error("dataset database failure")]
    Db(#[from] db::DbError),
    /// A manifest could not be encoded.
    #[error("cannot encode manifest")]
    Encode(#[source] serde_json::Error),
    /// A blocking task failed.
    #[error("dataset task failed")]
    Task(#[source] tokio::task::JoinError),
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// A snapshot read back and verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Its manifest.
    pub manifest: Manifest,
    /// Readings, in `(device, source, stream, seq)` order.
    pub readings: Vec<DatasetReading>,
    /// Predictions, in `(device, model, seq)` order.
    pub predictions: Vec<DatasetPrediction>,
}

/// What [`Datasets::snapshot`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshotted {
    /// The dataset's manifest (the registered one when it existed).
    pub manifest: Manifest,
    /// False when identical content was already registered (nothing written).
    pub created: bool,
}

/// The content-addressed dataset objects (no database): enough to read a
/// snapshot back.
#[derive(Debug, Clone)]
pub struct DatasetStore {
    objects: Arc<dyn ObjectStore>,
    description: String,
}

/// `datasets.credentials_file`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct S3Credentials {
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    session_token: Option<String>,
}

impl DatasetStore {
    /// Opens the store `settings` name: a local directory (created if
    /// missing, writes fsynced) or an S3-compatible bucket.
    ///
    /// # Errors
    /// [`DatasetError::Dir`], [`DatasetError::Credentials`] or
    /// [`DatasetError::Object`].
    pub fn open(settings: &DatasetSettings) -> Result<DatasetStore> {
        match settings {
            DatasetSettings::Local { dir } => {
                std::fs::create_dir_all(dir).map_err(|source| DatasetError::Dir {
                    dir: dir.clone(),
                    source,
                })?;
                let description = format!("local {}", dir.display());
                let local = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|source| DatasetError::Object {
                        store: description.clone(),
                        action: "open",
                        object: String::new(),
                        source: Box::new(source),
                    })?
                    .with_fsync(true);
                Ok(DatasetStore::from_object_store(
                    Arc::new(local),
                    description,
                ))
            }
            DatasetSettings::S3(s3) => open_s3(s3),
        }
    }

    /// A store over any [`ObjectStore`] (tests use the in-memory one);
    /// `description` names it in errors and logs.
    #[must_use]
    pub fn from_object_store(objects: Arc<dyn ObjectStore>, description: String) -> DatasetStore {
        DatasetStore {
            objects,
            description,
        }
    }

    fn object_error(
        &self,
        action: &'static str,
        object: &str,
    ) -> impl FnOnce(object_store::Error) -> DatasetError {
        let store = self.description.clone();
        let object = object.to_owned();
        move |source| DatasetError::Object {
            store,
            action,
            object,
            source: Box::new(source),
        }
    }

    async fn put(&self, object: &str, bytes: Bytes) -> Result<()> {
        self.objects
            .put(&ObjectPath::from(object), PutPayload::from_bytes(bytes))
            .await
            .map_err(self.object_error("put", object))?;
        Ok(())
    }

    async fn get(&self, object: &str) -> Result<Option<Bytes>> {
        let got = match self.objects.get(&ObjectPath::from(object)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(err) => return Err(self.object_error("get", object)(err)),
        };
        Ok(Some(
            got.bytes()
                .await
                .map_err(self.object_error("get", object))?,
        ))
    }

    /// Whether `object` exists and its bytes hash to `sha256` (a damaged
    /// copy is rewritten, never reused).
    async fn holds(&self, object: &str, sha256: &str) -> Result<bool> {
        Ok(self
            .get(object)
            .await?
            .is_some_and(|bytes| manifest::sha256_hex(&bytes) == sha256))
    }

    /// The manifest of dataset `id`, verified against its id.
    ///
    /// # Errors
    /// [`DatasetError::UnknownDataset`] (also for a malformed id),
    /// [`DatasetError::Corrupt`], or [`DatasetError::Object`].
    pub async fn manifest(&self, id: &str) -> Result<Manifest> {
        if !is_sha256_hex(id) {
            return Err(DatasetError::UnknownDataset { id: id.to_owned() });
        }
        let object = manifest_path(id);
        let Some(bytes) = self.get(&object).await? else {
            return Err(DatasetError::UnknownDataset { id: id.to_owned() });
        };
        let corrupt = |problem: String| DatasetError::Corrupt {
            id: id.to_owned(),
            object: object.clone(),
            problem,
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|err| corrupt(format!("does not parse: {err}")))?;
        let content = manifest::content_bytes(&manifest.content).map_err(DatasetError::Encode)?;
        let hash = manifest::sha256_hex(&content);
        if manifest.id != id || hash != id {
            return Err(corrupt(format!("hashes to {hash}, not to its id")));
        }
        Ok(manifest)
    }

    /// Reads dataset `id` back: its manifest and every row, after checking
    /// the manifest hashes to `id` and each file to its recorded sha256.
    ///
    /// # Errors
    /// [`DatasetError::UnknownDataset`], [`DatasetError::Corrupt`] (a file
    /// missing, changed or unreadable), or [`DatasetError::Object`].
    pub async fn read(&self, id: &str) -> Result<Snapshot> {
        let manifest = self.manifest(id).await?;
        let mut readings = Vec::new();
        let mut predictions = Vec::new();
        for file in &manifest.content.files {
            let bytes = self.verified_file(id, file).await?;
            let object = file.path.clone();
            let parse_err = |source: FileError| DatasetError::Corrupt {
                id: id.to_owned(),
                object: object.clone(),
                problem: format!("is not a valid {} file: {source}", file.table),
            };
            match file.table.as_str() {
                "readings" => {
                    readings = blocking(move || files::read_readings(bytes))
                        .await?
                        .map_err(parse_err)?;
                }
                "predictions" => {
                    predictions = blocking(move || files::read_predictions(bytes))
                        .await?
                        .map_err(parse_err)?;
                }
                other => {
                    return Err(DatasetError::Corrupt {
                        id: id.to_owned(),
                        object: manifest_path(id),
                        problem: format!("names an unknown table {other:?}"),
                    });
                }
            }
        }
        Ok(Snapshot {
            manifest,
            readings,
            predictions,
        })
    }

    /// The bytes of `file`, checked against its sha256 and size.
    async fn verified_file(&self, id: &str, file: &TableFile) -> Result<Bytes> {
        let corrupt = |problem: String| DatasetError::Corrupt {
            id: id.to_owned(),
            object: file.path.clone(),
            problem,
        };
        if !is_sha256_hex(&file.sha256) || file.path != parquet_path(&file.sha256) {
            return Err(corrupt("is not a content-addressed path".to_owned()));
        }
        let Some(bytes) = self.get(&file.path).await? else {
            return Err(corrupt("is missing".to_owned()));
        };
        let hash = manifest::sha256_hex(&bytes);
        if hash != file.sha256 {
            return Err(corrupt(format!(
                "has sha256 {hash}, the manifest records {}",
                file.sha256
            )));
        }
        Ok(bytes)
    }
}

fn open_s3(s3: &S3Settings) -> Result<DatasetStore> {
    // Design: reqwest runs on rustls without a bundled provider; install
    // ring (the crate's TLS provider) unless the process chose one already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let description = format!(
        "s3 {}{}{}",
        s3.endpoint
            .as_deref()
            .map(|e| format!("{e}/"))
            .unwrap_or_default(),
        s3.bucket,
        if s3.prefix.is_empty() {
            String::new()
        } else {
            format!("/{}", s3.prefix)
        }
    );
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_allow_http(s3.allow_http);
    if let Some(region) = &s3.region {
        builder = builder.with_region(region);
    }
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(path) = &s3.credentials_file {
        let credentials_err = |reason: String| DatasetError::Credentials {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|err| credentials_err(err.to_string()))?;
        // Design: the TOML error is not repeated, since it may quote the secret.
        let credentials: S3Credentials = toml::from_str(&text).map_err(|_| {
            credentials_err(
                "expected access_key_id, secret_access_key and optional session_token".to_owned(),
            )
        })?;
        builder = builder
            .with_access_key_id(credentials.access_key_id)
            .with_secret_access_key(credentials.secret_access_key);
        if let Some(token) = credentials.session_token {
            builder = builder.with_token(token);
        }
    }
    let store = builder.build().map_err(|source| DatasetError::Object {
        store: description.clone(),
        action: "open",
        object: String::new(),
        source: Box::new(source),
    })?;
    let objects: Arc<dyn ObjectStore> = if s3.prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(
            store,
            s3.prefix.as_str(),
        ))
    };
    Ok(DatasetStore::from_object_store(objects, description))
}

/// Object path of a Parquet file.
#[must_use]
pub fn parquet_path(sha256: &str) -> String {
    format!("parquet/{sha256}.parquet")
}

/// Object path of a manifest.
#[must_use]
pub fn manifest_path(id: &str) -> String {
    format!("manifests/{id}.json")
}

/// Handle to the datasets: the store and the `datasets` table.
#[derive(Debug, Clone)]
pub struct Datasets {
    objects: DatasetStore,
    db: Db,
}

impl Datasets {
    /// Opens the dataset store and the `datasets` table (migrating it).
    ///
    /// # Errors
    /// As [`DatasetStore::open`]; [`DatasetError::Db`].
    pub async fn open(settings: &DatasetSettings, storage: &StorageSettings) -> Result<Datasets> {
        let objects = DatasetStore::open(settings)?;
        Datasets::with_store(objects, storage).await
    }

    /// Datasets kept in `objects`, registered in the database of `storage`.
    ///
    /// # Errors
    /// [`DatasetError::Db`].
    pub async fn with_store(objects: DatasetStore, storage: &StorageSettings) -> Result<Datasets> {
        let db = Db::open(storage).await?;
        Ok(Datasets { objects, db })
    }

    /// The object store (to read snapshots).
    #[must_use]
    pub fn store(&self) -> &DatasetStore {
        &self.objects
    }

    /// Freezes what `selection` matches in `store` into a dataset.
    ///
    /// # Errors
    /// Refusals, with nothing written: [`DatasetError::InvalidSelection`],
    /// [`DatasetError::UnknownDevice`], [`DatasetError::UnknownStream`],
    /// [`DatasetError::Empty`]. Failures: [`DatasetError::Store`],
    /// [`DatasetError::File`], [`DatasetError::Object`], [`DatasetError::Db`].
    pub async fn snapshot(
        &self,
        store: &Store,
        selection: Selection,
        name: Option<String>,
    ) -> Result<Snapshotted> {
        let selection = check_selection(selection, name.as_deref())?;
        let (readings, predictions) = collect(store, &selection).await?;
        if readings.is_empty() && predictions.is_empty() {
            return Err(DatasetError::Empty {
                devices: selection.devices,
                streams: selection.streams,
                from_ms: selection.from_ms,
                to_ms: selection.to_ms,
            });
        }
        let built = blocking(move || build(selection, &readings, &predictions)).await??;
        let manifest = Manifest {
            id: built.id.clone(),
            name,
            created_ms: now_ms(),
            content: built.content,
        };
        if let Some(existing) = self.db.get(&manifest.id).await? {
            return Ok(Snapshotted {
                manifest: existing,
                created: false,
            });
        }
        for (file, bytes) in manifest.content.files.iter().zip(built.files) {
            if !self.objects.holds(&file.path, &file.sha256).await? {
                self.objects.put(&file.path, bytes).await?;
            }
        }
        let manifest = match self.objects.manifest(&manifest.id).await {
            // Design: a manifest without its row (a crash between the two)
            // is kept as first written (its created_ms and name) and
            // registered now.
            Ok(stored) => stored,
            // Absent, or damaged: (re)written, after the files it names.
            Err(DatasetError::UnknownDataset { .. } | DatasetError::Corrupt { .. }) => {
                let json = serde_json::to_vec_pretty(&manifest).map_err(DatasetError::Encode)?;
                self.objects
                    .put(&manifest_path(&manifest.id), Bytes::from(json))
                    .await?;
                manifest
            }
            Err(err) => return Err(err),
        };
        match self.db.insert(&manifest).await? {
            db::Inserted::New => {
                tracing::info!(
                    id = %manifest.id,
                    readings = manifest.readings(),
                    predictions = manifest.predictions(),
                    bytes = manifest.bytes(),
                    store = %self.objects.description,
                    "dataset snapshot stored"
                );
                Ok(Snapshotted {
                    manifest,
                    created: true,
                })
            }
            db::Inserted::Existing(existing) => Ok(Snapshotted {
                manifest: *existing,
                created: false,
            }),
        }
    }

    /// Every registered dataset, oldest first.
    ///
    /// # Errors
    /// [`DatasetError::Db`].
    pub async fn list(&self) -> Result<Vec<Manifest>> {
        Ok(self.db.list().await?)
    }

    /// The manifest of a registered dataset, as registered, after checking
    /// the stored manifest hashes to `id` and holds the same content.
    ///
    /// # Errors
    /// [`DatasetError::UnknownDataset`], [`DatasetError::Corrupt`], or a
    /// storage failure.
    pub async fn manifest(&self, id: &str) -> Result<Manifest> {
        let registered = self.registered(id).await?;
        let stored = self.objects.manifest(id).await?;
        if stored.content != registered.content {
            return Err(DatasetError::Corrupt {
                id: id.to_owned(),
                object: manifest_path(id),
                problem: "differs from the registered manifest".to_owned(),
            });
        }
        Ok(registered)
    }

    /// The registered manifest of `id` (from the database only).
    async fn registered(&self, id: &str) -> Result<Manifest> {
        if !is_sha256_hex(id) {
            return Err(DatasetError::UnknownDataset { id: id.to_owned() });
        }
        self.db
            .get(id)
            .await?
            .ok_or_else(|| DatasetError::UnknownDataset { id: id.to_owned() })
    }

    /// Reads a registered dataset back, verifying every hash (see
    /// [`DatasetStore::read`]).
    ///
    /// # Errors
    /// As [`DatasetStore::read`]; [`DatasetError::UnknownDataset`] when it
    /// is not registered.
    pub async fn read(&self, id: &str) -> Result<Snapshot> {
        let registered = self.registered(id).await?;
        let mut snapshot = self.objects.read(id).await?;
        if snapshot.manifest.content != registered.content {
            return Err(DatasetError::Corrupt {
                id: id.to_owned(),
                object: manifest_path(id),
                problem: "differs from the registered manifest".to_owned(),
            });
        }
        snapshot.manifest = registered;
        Ok(snapshot)
    }
}

fn invalid(reason: impl Into<String>) -> DatasetError {
    DatasetError::InvalidSelection {
        reason: reason.into(),
    }
}

/// Checks and normalizes a selection and name.
fn check_selection(selection: Selection, name: Option<&str>) -> Result<Selection> {
    let selection = selection.normalized();
    if selection.devices.is_empty() {
        return Err(invalid("name at least one device"));
    }
    if selection.streams.is_empty() {
        return Err(invalid("name at least one stream"));
    }
    if selection.from_ms >= selection.to_ms {
        return Err(invalid(format!(
            "from_ms {} must be before to_ms {}",
            selection.from_ms, selection.to_ms
        )));
    }
    if let Some(bad) = selection.devices.iter().find(|d| !is_valid_device_id(d)) {
        return Err(invalid(format!("{bad:?} is not a device id")));
    }
    for stream in &selection.streams {
        let (source, name) = split_stream(stream);
        if name.is_empty() || source.is_some_and(str::is_empty) {
            return Err(invalid(format!(
                "{stream:?} is not a stream: use NAME or SOURCE/NAME"
            )));
        }
    }
    if let Some(name) = name
        && (name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control))
    {
        return Err(invalid(format!(
            "name {name:?}: use 1 to {MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    Ok(selection)
}

/// `SOURCE/NAME` → `(Some(SOURCE), NAME)`; `NAME` → `(None, NAME)`.
fn split_stream(stream: &str) -> (Option<&str>, &str) {
    match stream.split_once('/') {
        Some((source, name)) => (Some(source), name),
        None => (None, stream),
    }
}

fn matches(selector: &str, key: &str) -> bool {
    match split_stream(selector) {
        (Some(_), _) => key == selector,
        (None, name) => key.split_once('/').is_some_and(|(_, s)| s == name),
    }
}

type ReadingKey = (String, String, String, u64);
type PredictionKey = (String, String, u64);

/// Every reading and prediction `selection` matches, in identity order.
async fn collect(
    store: &Store,
    selection: &Selection,
) -> Result<(Vec<DatasetReading>, Vec<DatasetPrediction>)> {
    let mut known = BTreeSet::new();
    for device in &selection.devices {
        let summary = store.summary(device).await.map_err(|err| match err {
            StoreError::UnknownDevice { id } => DatasetError::UnknownDevice { device: id },
            other => DatasetError::Store(other),
        })?;
        known.extend(summary.readings.into_iter().map(|s| s.key));
    }
    for stream in &selection.streams {
        if !known.iter().any(|key| matches(stream, key)) {
            return Err(DatasetError::UnknownStream {
                stream: stream.clone(),
                known: known.into_iter().collect(),
            });
        }
    }
    let mut readings: BTreeMap<ReadingKey, Reading> = BTreeMap::new();
    let mut predictions: BTreeMap<PredictionKey, Prediction> = BTreeMap::new();
    for device in &selection.devices {
        for stream in &selection.streams {
            let (source, name) = split_stream(stream);
            let mut query = ReadQuery {
                from_ms: Some(selection.from_ms),
                to_ms: Some(selection.to_ms),
                source: source.map(str::to_owned),
                stream: Some(name.to_owned()),
                model: None,
                limit: Some(MAX_PAGE_LIMIT),
                cursor: None,
            };
            loop {
                let page = store
                    .readings(device, &query)
                    .await
                    .map_err(DatasetError::Store)?;
                for stored in page.readings {
                    let r = stored.reading;
                    readings.insert(
                        (device.clone(), r.source.clone(), r.stream.clone(), r.seq),
                        r,
                    );
                }
                query.cursor = page.next_cursor;
                if query.cursor.is_none() {
                    break;
                }
            }
            query.cursor = None;
            loop {
                let page = store
                    .predictions(device, &query)
                    .await
                    .map_err(DatasetError::Store)?;
                for stored in page.predictions {
                    let p = stored.prediction;
                    predictions.insert((device.clone(), p.model.clone(), p.seq), p);
                }
                query.cursor = page.next_cursor;
                if query.cursor.is_none() {
                    break;
                }
            }
        }
    }
    let readings = readings
        .into_iter()
        .map(|((device, ..), r)| DatasetReading {
            device,
            source: r.source,
            stream: r.stream,
            seq: r.seq,
            device_ts_ms: r.device_ts_ms,
            recv_ts_ms: r.recv_ts_ms,
            clock_ok: r.clock_ok,
            values: r.values,
        })
        .collect();
    let predictions = predictions
        .into_iter()
        .map(|((device, ..), prediction)| DatasetPrediction { device, prediction })
        .collect();
    Ok((readings, predictions))
}

/// The files, content and id of a snapshot.
struct Built {
    id: String,
    content: ManifestContent,
    files: Vec<Bytes>,
}

fn build(
    selection: Selection,
    readings: &[DatasetReading],
    predictions: &[DatasetPrediction],
) -> Result<Built> {
    let file_err = |table: &str| {
        let object = table.to_owned();
        move |source| DatasetError::File { object, source }
    };
    let (readings_bytes, readings_rows) =
        files::write_readings(readings).map_err(file_err("readings"))?;
    let (predictions_bytes, predictions_rows) =
        files::write_predictions(predictions).map_err(file_err("predictions"))?;
    let table = |table: &str, bytes: &[u8], rows: u64, records: usize, columns| {
        let sha256 = manifest::sha256_hex(bytes);
        TableFile {
            table: table.to_owned(),
            path: parquet_path(&sha256),
            sha256,
            bytes: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            rows,
            records: u64::try_from(records).unwrap_or(u64::MAX),
            columns,
        }
    };
    let content = ManifestContent {
        format: FORMAT_VERSION,
        selection,
        files: vec![
            table(
                "readings",
                &readings_bytes,
                readings_rows,
                readings.len(),
                files::readings_columns(),
            ),
            table(
                "predictions",
                &predictions_bytes,
                predictions_rows,
                predictions.len(),
                files::predictions_columns(),
            ),
        ],
        lineage: lineage(readings, predictions),
    };
    let id =
        manifest::sha256_hex(&manifest::content_bytes(&content).map_err(DatasetError::Encode)?);
    Ok(Built {
        id,
        content,
        files: vec![Bytes::from(readings_bytes), Bytes::from(predictions_bytes)],
    })
}

/// Sequence ranges per `(device, source, stream)` and `(device, model)`;
/// the inputs are in identity order, so each group's seqs ascend.
fn lineage(readings: &[DatasetReading], predictions: &[DatasetPrediction]) -> Lineage {
    let mut by_stream: BTreeMap<(&str, &str, &str), Vec<u64>> = BTreeMap::new();
    for r in readings {
        by_stream
            .entry((&r.device, &r.source, &r.stream))
            .or_default()
            .push(r.seq);
    }
    let mut by_model: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
    for p in predictions {
        by_model
            .entry((&p.device, &p.prediction.model))
            .or_default()
            .push(p.prediction.seq);
    }
    Lineage {
        readings: by_stream
            .into_iter()
            .map(|((device, source, stream), seqs)| ReadingLineage {
                device: device.to_owned(),
                source: source.to_owned(),
                stream: stream.to_owned(),
                records: u64::try_from(seqs.len()).unwrap_or(u64::MAX),
                ranges: manifest::spans(seqs),
            })
            .collect(),
        predictions: by_model
            .into_iter()
            .map(|((device, model), seqs)| PredictionLineage {
                device: device.to_owned(),
                model: model.to_owned(),
                records: u64::try_from(seqs.len()).unwrap_or(u64::MAX),
                ranges: manifest::spans(seqs),
            })
            .collect(),
    }
}

async fn blocking<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(DatasetError::Task)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn s3(credentials_file: Option<PathBuf>) -> DatasetSettings {
        DatasetSettings::S3(Box::new(S3Settings {
            bucket: "bucket".into(),
            region: Some("eu-west-1".into()),
            endpoint: Some("http://127.0.0.1:9".into()),
            prefix: "ds".into(),
            allow_http: true,
            credentials_file,
        }))
    }

    #[test]
    fn s3_credentials_are_read_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "access_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"s3cret-key\"\n",
        )
        .unwrap();
        let store = DatasetStore::open(&s3(Some(good))).unwrap();
        let shown = format!("{store:?} {}", store.description);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(store.description, "s3 http://127.0.0.1:9/bucket/ds");

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "secret_access_key = \"s3cret-key\"\nextra = 1\n").unwrap();
        let err = DatasetStore::open(&s3(Some(bad))).unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(err));
        assert!(text.contains("datasets.credentials_file"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");

        let missing = DatasetStore::open(&s3(Some(dir.path().join("none.toml"))));
        assert!(matches!(missing, Err(DatasetError::Credentials { .. })));
    }

    #[test]
    fn stream_selectors() {
        assert!(matches("temperature", "m1/temperature"));
        assert!(matches("m1/temperature", "m1/temperature"));
        assert!(!matches("m2/temperature", "m1/temperature"));
        assert!(!matches("temp", "m1/temperature"));
    }

    #[test]
    fn selections_are_checked_and_normalized() {
        let sel = |streams: &[&str], devices: &[&str], from_ms, to_ms| Selection {
            streams: streams.iter().map(|s| (*s).to_owned()).collect(),
            devices: devices.iter().map(|s| (*s).to_owned()).collect(),
            from_ms,
            to_ms,
        };
        let ok = check_selection(sel(&["b", "a", "b"], &["d2", "d1"], 0, 10), None);
        assert!(matches!(ok, Ok(s) if s == sel(&["a", "b"], &["d1", "d2"], 0, 10)));
        for bad in [
            sel(&[], &["d"], 0, 1),
            sel(&["s"], &[], 0, 1),
            sel(&["s"], &["d"], 5, 5),
            sel(&["s"], &["../x"], 0, 1),
            sel(&["/s"], &["d"], 0, 1),
            sel(&["m1/"], &["d"], 0, 1),
        ] {
            assert!(
                matches!(
                    check_selection(bad.clone(), None),
                    Err(DatasetError::InvalidSelection { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(check_selection(sel(&["s"], &["d"], 0, 1), Some("")).is_err());
    }
}
