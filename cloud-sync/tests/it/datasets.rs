//! Versioned datasets on real SQLite (and, gated on `EDGE_TEST_POSTGRES`,
//! PostgreSQL): deterministic snapshots (same id and bytes twice, and from
//! a second database holding the same rows), lineage against what was
//! stored, selection by streams / devices / time, refusals that write
//! nothing, corruption detected on read, the in-memory object_store
//! backend, the operator-only API and the CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::http::StatusCode;
use cloud_sync::dataset::http::DatasetList;
use cloud_sync::dataset::{
    DatasetError, DatasetStore, Datasets, Manifest, PredictionLineage, ReadingLineage, Selection,
    SeqSpan,
};
use cloud_sync::sync_protocol::{Prediction, Reading, UploadBatch};
use cloud_sync::{AppState, Settings, StorageSettings, Store, app};

use crate::backends::PgSchema;
use crate::util::{get, post, send};

const T0: i64 = 1_700_000_000_000;

fn reading(source: &str, stream: &str, seq: u64) -> Reading {
    let at = T0 + i64::try_from(seq).unwrap() * 1000;
    Reading {
        source: source.to_owned(),
        stream: stream.to_owned(),
        seq,
        device_ts_ms: (!seq.is_multiple_of(4)).then_some(at - 5),
        recv_ts_ms: at,
        clock_ok: !seq.is_multiple_of(5),
        values: BTreeMap::from([
            ("value".to_owned(), seq as f64 * 0.5),
            ("raw".to_owned(), -(seq as f64)),
        ]),
    }
}

fn prediction(model: &str, seq: u64) -> Prediction {
    Prediction {
        model: model.to_owned(),
        model_version: "1.0.0".to_owned(),
        model_sha256: "ab".repeat(32),
        seq,
        source: "m1".to_owned(),
        stream: "temperature".to_owned(),
        window_end_seq: seq + 3,
        window_end_ts_ms: seq.is_multiple_of(2).then_some(T0),
        score: seq as f64 / 100.0,
        threshold: 0.5,
        is_anomaly: seq.is_multiple_of(7),
        created_ms: T0 + i64::try_from(seq).unwrap() * 1000,
        // Some with a label, some with probabilities, some with both or neither.
        label: seq.is_multiple_of(3).then(|| "wear".to_owned()),
        probabilities: if seq.is_multiple_of(2) {
            vec![1.0 - seq as f64 / 8.0, seq as f64 / 8.0]
        } else {
            Vec::new()
        },
    }
}

/// dev-1: m1/temperature 1..=20 without 8 and 9, m1/humidity 1..=5,
/// m2/temperature 1..=3, iforest predictions 1..=6; dev-2: m1/temperature
/// 1..=4; dev-3: nothing.
async fn fill(store: &Store) -> Result<()> {
    for device in ["dev-1", "dev-2", "dev-3"] {
        store.add_device(device).await?;
    }
    let mut readings: Vec<Reading> = (1..=20)
        .filter(|s| ![8, 9].contains(s))
        .map(|s| reading("m1", "temperature", s))
        .collect();
    readings.extend((1..=5).map(|s| reading("m1", "humidity", s)));
    readings.extend((1..=3).map(|s| reading("m2", "temperature", s)));
    // Stored in two batches, out of order, so order comes from the snapshot.
    readings.reverse();
    let second = readings.split_off(10);
    for part in [readings, second] {
        store
            .store_batch(
                "dev-1",
                UploadBatch {
                    readings: part,
                    predictions: vec![],
                    dead_letters: vec![],
                },
            )
            .await?;
    }
    store
        .store_batch(
            "dev-1",
            UploadBatch {
                readings: vec![],
                predictions: (1..=6).map(|s| prediction("iforest", s)).collect(),
                dead_letters: vec![],
            },
        )
        .await?;
    store
        .store_batch(
            "dev-2",
            UploadBatch {
                readings: (1..=4).map(|s| reading("m1", "temperature", s)).collect(),
                predictions: vec![],
                dead_letters: vec![],
            },
        )
        .await?;
    Ok(())
}

fn selection(streams: &[&str], devices: &[&str], from_ms: i64, to_ms: i64) -> Selection {
    Selection {
        streams: streams.iter().map(|s| (*s).to_owned()).collect(),
        devices: devices.iter().map(|s| (*s).to_owned()).collect(),
        from_ms,
        to_ms,
    }
}

fn all_time(streams: &[&str], devices: &[&str]) -> Selection {
    selection(streams, devices, T0, T0 + 1_000_000)
}

/// A store and datasets on SQLite in a temp dir (datasets in `dir/datasets`).
struct Fixture {
    dir: tempfile::TempDir,
    settings: Settings,
    store: Store,
    datasets: Datasets,
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
        let store = Store::connect(&settings.storage).await?;
        let datasets = Datasets::open(&settings.datasets, &settings.storage).await?;
        fill(&store).await?;
        Ok(Fixture {
            dir,
            settings,
            store,
            datasets,
            _schema: schema,
        })
    }

    fn datasets_dir(&self) -> PathBuf {
        self.dir.path().join("datasets")
    }

    fn router(&self) -> Router {
        app(AppState::new(self.store.clone(), &self.settings).with_datasets(self.datasets.clone()))
    }
}

/// Every file under `dir` (relative path → bytes).
fn tree(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir)?.display().to_string();
                out.insert(rel, std::fs::read(&path)?);
            }
        }
    }
    Ok(out)
}

fn span(first: u64, last: u64) -> SeqSpan {
    SeqSpan { first, last }
}

fn reading_lineage(
    device: &str,
    source: &str,
    stream: &str,
    ranges: &[(u64, u64)],
) -> ReadingLineage {
    ReadingLineage {
        device: device.to_owned(),
        source: source.to_owned(),
        stream: stream.to_owned(),
        records: ranges.iter().map(|(a, b)| b - a + 1).sum(),
        ranges: ranges.iter().map(|(a, b)| span(*a, *b)).collect(),
    }
}

async fn snapshot_is_deterministic_with_exact_lineage(f: &Fixture) -> Result<()> {
    let sel = all_time(&["temperature"], &["dev-2", "dev-1"]);
    let first = f
        .datasets
        .snapshot(&f.store, sel.clone(), Some("t1".into()))
        .await?;
    assert!(first.created);
    let m = &first.manifest;
    assert_eq!(m.id.len(), 64);
    assert_eq!(m.name.as_deref(), Some("t1"));
    assert_eq!(m.content.selection.devices, ["dev-1", "dev-2"]);
    assert_eq!(
        m.content.lineage.readings,
        [
            reading_lineage("dev-1", "m1", "temperature", &[(1, 7), (10, 20)]),
            reading_lineage("dev-1", "m2", "temperature", &[(1, 3)]),
            reading_lineage("dev-2", "m1", "temperature", &[(1, 4)]),
        ]
    );
    assert_eq!(
        m.content.lineage.predictions,
        [PredictionLineage {
            device: "dev-1".into(),
            model: "iforest".into(),
            records: 6,
            ranges: vec![span(1, 6)],
        }]
    );
    assert_eq!(m.readings(), 18 + 3 + 4);
    assert_eq!(m.file("readings").context("readings")?.rows, 2 * 25);
    assert_eq!(m.predictions(), 6);

    // Same selection (other order, other name): same id, nothing written.
    let files = tree(&f.datasets_dir())?;
    let again = f
        .datasets
        .snapshot(
            &f.store,
            all_time(&["temperature", "temperature"], &["dev-1", "dev-2"]),
            Some("t2".into()),
        )
        .await?;
    assert!(!again.created);
    assert_eq!(again.manifest, first.manifest);
    assert_eq!(tree(&f.datasets_dir())?, files);
    assert_eq!(
        f.datasets.list().await?,
        std::slice::from_ref(&first.manifest)
    );
    assert_eq!(f.datasets.manifest(&m.id).await?, first.manifest);

    // Read back: exactly what was stored, in identity order.
    let snap = f.datasets.read(&m.id).await?;
    assert_eq!(snap.readings.len(), 25);
    let r = &snap.readings[0];
    assert_eq!(
        (r.device.as_str(), r.source.as_str(), r.seq),
        ("dev-1", "m1", 1)
    );
    let want = reading("m1", "temperature", 1);
    assert_eq!(
        (r.device_ts_ms, r.recv_ts_ms, r.clock_ok, &r.values),
        (
            want.device_ts_ms,
            want.recv_ts_ms,
            want.clock_ok,
            &want.values
        )
    );
    let r4 = &snap.readings[3];
    assert_eq!((r4.seq, r4.device_ts_ms), (4, None));
    assert_eq!(snap.predictions.len(), 6);
    assert_eq!(snap.predictions[5].prediction, prediction("iforest", 6));
    Ok(())
}

#[tokio::test]
async fn sqlite_snapshot_is_deterministic_with_exact_lineage() -> Result<()> {
    let f = Fixture::sqlite().await?;
    snapshot_is_deterministic_with_exact_lineage(&f).await?;

    // A second database holding the same rows gives the same id and bytes.
    let g = Fixture::sqlite().await?;
    let a = f
        .datasets
        .snapshot(
            &f.store,
            all_time(&["temperature"], &["dev-1", "dev-2"]),
            None,
        )
        .await?;
    let b = g
        .datasets
        .snapshot(
            &g.store,
            all_time(&["temperature"], &["dev-1", "dev-2"]),
            None,
        )
        .await?;
    assert!(b.created);
    assert_eq!(a.manifest.id, b.manifest.id);
    assert_eq!(a.manifest.content, b.manifest.content);
    let (fa, fb) = (tree(&f.datasets_dir())?, tree(&g.datasets_dir())?);
    let parquet = |t: &BTreeMap<String, Vec<u8>>| -> Vec<(String, Vec<u8>)> {
        t.iter()
            .filter(|(k, _)| k.starts_with("parquet"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(parquet(&fa), parquet(&fb));
    assert_eq!(parquet(&fa).len(), 2);
    assert!(
        fa.keys().all(|k| !k.contains("tmp") && !k.starts_with('.')),
        "{:?}",
        fa.keys()
    );
    Ok(())
}

#[tokio::test]
async fn postgres_snapshot_is_deterministic_with_exact_lineage() -> Result<()> {
    let Some(f) = Fixture::postgres("datasets_postgres").await? else {
        return Ok(());
    };
    snapshot_is_deterministic_with_exact_lineage(&f).await?;
    // The same rows on SQLite give the same dataset.
    let g = Fixture::sqlite().await?;
    let sel = all_time(&["temperature"], &["dev-1", "dev-2"]);
    let a = f.datasets.snapshot(&f.store, sel.clone(), None).await?;
    let b = g.datasets.snapshot(&g.store, sel, None).await?;
    assert_eq!(a.manifest.id, b.manifest.id);
    // The table survives a reopen (migrations applied once).
    let reopened = Datasets::open(&f.settings.datasets, &f.settings.storage).await?;
    assert_eq!(reopened.list().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn selection_by_stream_device_and_time() -> Result<()> {
    let f = Fixture::sqlite().await?;
    // SOURCE/NAME narrows to one source; devices narrows to dev-1; the
    // window [T0+5s, T0+12s) holds seqs 5..=11 of the readings and the
    // predictions created then (5 and 6).
    let sel = selection(
        &["m1/temperature", "humidity"],
        &["dev-1"],
        T0 + 5_000,
        T0 + 12_000,
    );
    let m = f.datasets.snapshot(&f.store, sel, None).await?.manifest;
    assert_eq!(
        m.content.lineage.readings,
        [
            reading_lineage("dev-1", "m1", "humidity", &[(5, 5)]),
            reading_lineage("dev-1", "m1", "temperature", &[(5, 7), (10, 11)]),
        ]
    );
    assert_eq!(m.content.lineage.predictions[0].ranges, [span(5, 6)]);
    let snap = f.datasets.read(&m.id).await?;
    assert!(
        snap.readings
            .iter()
            .all(|r| r.device == "dev-1" && r.source == "m1")
    );
    assert!(
        snap.readings
            .iter()
            .all(|r| (T0 + 5_000..T0 + 12_000).contains(&r.recv_ts_ms))
    );

    // Another selection is another dataset.
    let other = f
        .datasets
        .snapshot(&f.store, all_time(&["humidity"], &["dev-1"]), None)
        .await?;
    assert_ne!(other.manifest.id, m.id);
    assert_eq!(f.datasets.list().await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn refused_selections_write_nothing() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let cases = [
        // Empty window of a known stream.
        (
            selection(&["temperature"], &["dev-1"], T0 + 500_000, T0 + 600_000),
            "nothing to snapshot",
        ),
        // A device with no data at all.
        (all_time(&["temperature"], &["dev-3"]), "unknown stream"),
        (
            all_time(&["temperature"], &["dev-9"]),
            "unknown device \"dev-9\"",
        ),
        (
            all_time(&["pressure"], &["dev-1"]),
            "unknown stream \"pressure\"",
        ),
        (all_time(&["m3/temperature"], &["dev-1"]), "unknown stream"),
        (
            selection(&["temperature"], &["dev-1"], T0, T0),
            "invalid selection",
        ),
        (all_time(&[], &["dev-1"]), "invalid selection"),
    ];
    for (sel, message) in cases {
        let err = f
            .datasets
            .snapshot(&f.store, sel.clone(), None)
            .await
            .err()
            .with_context(|| format!("{sel:?} was accepted"))?;
        let text = format!("{:#}", anyhow::Error::from(err));
        assert!(text.contains(message), "{sel:?}: {text}");
    }
    let err = f
        .datasets
        .snapshot(
            &f.store,
            selection(&["temperature"], &["dev-1"], 0, 1),
            None,
        )
        .await;
    assert!(matches!(err, Err(DatasetError::Empty { .. })), "{err:?}");
    assert!(tree(&f.datasets_dir())?.is_empty());
    assert!(f.datasets.list().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn corruption_is_detected_on_read() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let m = f
        .datasets
        .snapshot(&f.store, all_time(&["temperature"], &["dev-1"]), None)
        .await?
        .manifest;
    let dir = f.datasets_dir();
    let readings = dir.join(&m.file("readings").context("readings")?.path);
    let original = std::fs::read(&readings)?;

    // One flipped byte in the middle of the Parquet file.
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&readings, &bad)?;
    let err = f.datasets.read(&m.id).await;
    let Err(DatasetError::Corrupt {
        object, problem, ..
    }) = &err
    else {
        panic!("expected corrupt, got {err:?}");
    };
    assert!(
        object.starts_with("parquet/") && problem.contains("sha256"),
        "{problem}"
    );

    // Truncated, and missing.
    std::fs::write(&readings, &original[..original.len() - 10])?;
    assert!(matches!(
        f.datasets.read(&m.id).await,
        Err(DatasetError::Corrupt { .. })
    ));
    std::fs::remove_file(&readings)?;
    let err = f.datasets.read(&m.id).await;
    assert!(
        matches!(&err, Err(DatasetError::Corrupt { problem, .. }) if problem.contains("missing")),
        "{err:?}"
    );
    std::fs::write(&readings, &original)?;
    f.datasets.read(&m.id).await?;

    // A manifest edited to claim other rows no longer hashes to its id.
    let manifest_file = dir.join(format!("manifests/{}.json", m.id));
    let text = std::fs::read_to_string(&manifest_file)?;
    let mut edited: Manifest = serde_json::from_str(&text)?;
    edited.content.lineage.readings[0].ranges[0].last += 1;
    std::fs::write(&manifest_file, serde_json::to_vec(&edited)?)?;
    let err = f.datasets.manifest(&m.id).await;
    assert!(
        matches!(&err, Err(DatasetError::Corrupt { problem, .. }) if problem.contains("hashes")),
        "{err:?}"
    );
    std::fs::write(&manifest_file, b"{ not json")?;
    assert!(matches!(
        f.datasets.read(&m.id).await,
        Err(DatasetError::Corrupt { .. })
    ));

    // Unknown and malformed ids.
    for id in ["0".repeat(64), "../etc/passwd".to_owned()] {
        assert!(matches!(
            f.datasets.read(&id).await,
            Err(DatasetError::UnknownDataset { .. })
        ));
    }
    Ok(())
}

#[tokio::test]
async fn in_memory_object_store_holds_the_same_dataset() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let local = f
        .datasets
        .snapshot(&f.store, all_time(&["temperature"], &["dev-1"]), None)
        .await?
        .manifest;
    // Same rows, same id, through object_store's in-memory backend (the
    // code path S3 takes, minus the network) on a second database.
    let dir = tempfile::tempdir()?;
    let settings = Settings::for_database(dir.path().join("mem.db"));
    let store = Store::connect(&settings.storage).await?;
    fill(&store).await?;
    let memory = Arc::new(object_store::memory::InMemory::new());
    let objects = DatasetStore::from_object_store(memory.clone(), "memory".into());
    let datasets = Datasets::with_store(objects.clone(), &settings.storage).await?;
    let m = datasets
        .snapshot(&store, all_time(&["temperature"], &["dev-1"]), None)
        .await?
        .manifest;
    assert_eq!(m.id, local.id);
    let (snap, disk) = (objects.read(&m.id).await?, f.datasets.read(&m.id).await?);
    assert_eq!(snap.manifest.content, disk.manifest.content);
    assert_eq!(
        (snap.readings, snap.predictions),
        (disk.readings, disk.predictions)
    );
    assert!(!dir.path().join("datasets").exists());
    Ok(())
}

async fn operator_token(store: &Store) -> Result<String> {
    Ok(store.add_operator("ops").await?)
}

#[tokio::test]
async fn api_is_operator_only() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let router = f.router();
    let ops = operator_token(&f.store).await?;
    let device = f.store.add_device("dev-api").await?;
    let body = serde_json::json!({
        "streams": ["temperature"], "devices": ["dev-1"],
        "from_ms": T0, "to_ms": T0 + 1_000_000, "name": "api"
    })
    .to_string();
    let snapshot = |token: Option<&str>, body: String| {
        post("/v1/datasets", token, "application/json", None, body)
    };

    let reply = send(&router, snapshot(Some(&device), body.clone())?).await?;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = send(&router, snapshot(None, body.clone())?).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    for path in [
        "/v1/datasets".to_owned(),
        format!("/v1/datasets/{}", "0".repeat(64)),
    ] {
        assert_eq!(
            send(&router, get(&path, Some(&device))?).await?.status,
            StatusCode::FORBIDDEN
        );
    }
    assert!(tree(&f.datasets_dir())?.is_empty());

    let reply = send(&router, snapshot(Some(&ops), body.clone())?).await?;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let created: Manifest = reply.json()?;
    let reply = send(&router, snapshot(Some(&ops), body)?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json::<Manifest>()?, created);

    let list: DatasetList = send(&router, get("/v1/datasets", Some(&ops))?)
        .await?
        .json()?;
    assert_eq!(list.datasets, std::slice::from_ref(&created));
    let path = format!("/v1/datasets/{}", created.id);
    let got: Manifest = send(&router, get(&path, Some(&ops))?).await?.json()?;
    assert_eq!(got, created);

    let cases = [
        (
            serde_json::json!({"streams": ["temperature"], "devices": ["dev-1"], "from_ms": 0, "to_ms": 1}),
            422,
            "empty_selection",
        ),
        (
            serde_json::json!({"streams": ["temperature"], "devices": ["nope"], "from_ms": 0, "to_ms": 1}),
            400,
            "unknown_device",
        ),
        (
            serde_json::json!({"streams": ["pressure"], "devices": ["dev-1"], "from_ms": 0, "to_ms": 1}),
            400,
            "unknown_stream",
        ),
        (
            serde_json::json!({"streams": [], "devices": ["dev-1"], "from_ms": 0, "to_ms": 1}),
            400,
            "invalid_selection",
        ),
        (
            serde_json::json!({"streams": ["t"], "devices": ["dev-1"], "from_ms": 0}),
            400,
            "malformed_json",
        ),
    ];
    for (body, status, code) in cases {
        let reply = send(&router, snapshot(Some(&ops), body.to_string())?).await?;
        assert_eq!(
            (reply.status.as_u16(), reply.error_code()?.as_str()),
            (status, code),
            "{body}"
        );
    }
    let reply = send(
        &router,
        get(&format!("/v1/datasets/{}", "0".repeat(64)), Some(&ops))?,
    )
    .await?;
    assert_eq!(
        (reply.status, reply.error_code()?.as_str()),
        (StatusCode::NOT_FOUND, "unknown_dataset")
    );
    assert_eq!(f.datasets.list().await?.len(), 1);

    // Without datasets the routes answer 503.
    let bare = app(AppState::new(f.store.clone(), &f.settings));
    let reply = send(&bare, get("/v1/datasets", Some(&ops))?).await?;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    Ok(())
}

#[tokio::test]
async fn cli_snapshots_lists_shows_and_verifies() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let config = f.dir.path().join("cloud-sync.toml");
    std::fs::write(
        &config,
        format!(
            "database_path = {:?}\n[datasets]\ndir = {:?}\n",
            f.dir.path().join("cloud.db").display().to_string(),
            f.datasets_dir().display().to_string()
        ),
    )?;
    let config = config.display().to_string();
    let bin = env!("CARGO_BIN_EXE_cloud-sync");
    let run = |args: &[&str]| Command::new(bin).args(args).env("NO_COLOR", "1").output();
    let (from, to) = (T0.to_string(), (T0 + 1_000_000).to_string());
    let args = [
        "dataset",
        "snapshot",
        "--streams",
        "temperature,humidity",
        "--devices",
        "dev-1,dev-2",
        "--from-ms",
        &from,
        "--to-ms",
        &to,
        "--name",
        "cli",
        "--config",
        &config,
    ];
    let out = run(&args)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout)?.trim().to_owned();
    let again = run(&args)?;
    assert_eq!(String::from_utf8(again.stdout)?.trim(), id);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already registered"));

    let out = run(&["dataset", "list", "--config", &config])?;
    assert!(String::from_utf8(out.stdout)?.contains(&format!("{id}\tcli\t")));
    let out = run(&["dataset", "show", &id, "--config", &config])?;
    let shown: Manifest = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown.id, id);
    let out = run(&["dataset", "verify", &id, "--config", &config])?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.contains("ok: 30 readings, 6 predictions"));

    // Empty range: refused with exit 1 and a clear message.
    let out = run(&[
        "dataset",
        "snapshot",
        "--streams",
        "temperature",
        "--devices",
        "dev-1",
        "--from-ms",
        "0",
        "--to-ms",
        "1",
        "--config",
        &config,
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to snapshot"));

    // Bad store config: exit 78 naming the key.
    std::fs::write(
        f.dir.path().join("bad.toml"),
        "[datasets]\nstore = \"s3\"\n",
    )?;
    let bad = f.dir.path().join("bad.toml").display().to_string();
    let out = run(&["dataset", "list", "--config", &bad])?;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("datasets.bucket"));
    Ok(())
}

#[tokio::test]
async fn a_stored_but_unregistered_dataset_is_registered_as_first_written() -> Result<()> {
    // As after a crash between the manifest and the database row: the
    // store holds the complete dataset, a fresh database does not list it.
    let f = Fixture::sqlite().await?;
    let sel = all_time(&["temperature"], &["dev-1"]);
    let first = f
        .datasets
        .snapshot(&f.store, sel.clone(), Some("first".into()))
        .await?
        .manifest;
    let files = tree(&f.datasets_dir())?;

    let dir = tempfile::tempdir()?;
    let mut settings = Settings::for_database(dir.path().join("other.db"));
    settings.datasets = f.settings.datasets.clone();
    let store = Store::connect(&settings.storage).await?;
    fill(&store).await?;
    let datasets = Datasets::open(&settings.datasets, &settings.storage).await?;
    assert!(datasets.list().await?.is_empty());
    let done = datasets
        .snapshot(&store, sel, Some("second".into()))
        .await?;
    assert!(done.created);
    assert_eq!(done.manifest, first);
    assert_eq!(datasets.list().await?, std::slice::from_ref(&first));
    assert_eq!(tree(&f.datasets_dir())?, files);
    Ok(())
}

#[tokio::test]
async fn a_failed_write_registers_nothing() -> Result<()> {
    // `manifests` is a plain file, so the manifest cannot be written: the
    // Parquet files are stored, the manifest is not, nothing is listed.
    let f = Fixture::sqlite().await?;
    let blocker = f.datasets_dir().join("manifests");
    std::fs::write(&blocker, b"not a directory")?;
    let sel = all_time(&["temperature"], &["dev-1"]);
    let err = f.datasets.snapshot(&f.store, sel.clone(), None).await;
    let Err(DatasetError::Object { action, object, .. }) = &err else {
        panic!("expected a store failure, got {err:?}");
    };
    // (LocalFileSystem already fails looking for an existing manifest.)
    assert!(["get", "put"].contains(action), "{action}");
    assert!(object.starts_with("manifests/"), "{object}");
    assert!(f.datasets.list().await?.is_empty());
    let stored = tree(&f.datasets_dir())?;
    assert!(
        stored
            .keys()
            .all(|k| k == "manifests" || k.starts_with("parquet/")),
        "{stored:?}"
    );

    std::fs::remove_file(&blocker)?;
    let done = f.datasets.snapshot(&f.store, sel, None).await?;
    assert!(done.created);
    f.datasets.read(&done.manifest.id).await?;
    Ok(())
}

/// An S3-compatible endpoint for [`s3_store_holds_the_same_dataset`]
/// (`http://HOST:PORT`, bucket `EDGE_TEST_S3_BUCKET` or `edge-datasets`,
/// which must exist; any credentials are sent).
const S3_ENV: &str = "EDGE_TEST_S3";

#[tokio::test]
async fn s3_store_holds_the_same_dataset() -> Result<()> {
    let Ok(endpoint) = std::env::var(S3_ENV) else {
        println!("s3_store_holds_the_same_dataset: skipped ({S3_ENV} is unset)");
        return Ok(());
    };
    let bucket = std::env::var("EDGE_TEST_S3_BUCKET").unwrap_or_else(|_| "edge-datasets".into());
    let f = Fixture::sqlite().await?;
    let sel = all_time(&["temperature", "humidity"], &["dev-1", "dev-2"]);
    let local = f
        .datasets
        .snapshot(&f.store, sel.clone(), None)
        .await?
        .manifest;

    let dir = tempfile::tempdir()?;
    let credentials = dir.path().join("s3.toml");
    std::fs::write(
        &credentials,
        "access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n",
    )?;
    let mut settings = Settings::for_database(dir.path().join("s3.db"));
    let prefix = format!("t{:016x}", rand::random::<u64>());
    settings.datasets =
        cloud_sync::config::DatasetSettings::S3(Box::new(cloud_sync::config::S3Settings {
            bucket,
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint),
            prefix,
            allow_http: true,
            credentials_file: Some(credentials),
        }));
    let store = Store::connect(&settings.storage).await?;
    fill(&store).await?;
    let datasets = Datasets::open(&settings.datasets, &settings.storage).await?;
    let done = datasets.snapshot(&store, sel.clone(), None).await?;
    assert!(done.created);
    assert_eq!(done.manifest.content, local.content);
    assert!(!datasets.snapshot(&store, sel, None).await?.created);
    let (remote, disk) = (
        datasets.read(&local.id).await?,
        f.datasets.read(&local.id).await?,
    );
    assert_eq!(
        (remote.readings, remote.predictions),
        (disk.readings, disk.predictions)
    );
    assert!(!dir.path().join("datasets").exists());
    Ok(())
}
