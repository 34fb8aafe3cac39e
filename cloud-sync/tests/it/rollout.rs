//! Staged rollouts, shadow targets, rollout reports and device groups on
//! real port-0 servers: the canary split follows `canary_bucket`, widening
//! only adds devices, ETag / 304 per device, idempotent reports, halting
//! exactly when the rolled-back share passes the threshold, halted and
//! rolled-back deployments carrying `downgrade: true`, server-side group
//! assignments overriding the query, and who may call what. The core
//! scenario also runs (gated on `EDGE_TEST_POSTGRES`) on two instances
//! sharing one PostgreSQL database, with reports racing across them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use cloud_sync::registry::keys::{self, Signer};
use cloud_sync::registry::rollout::RolloutOverview;
use cloud_sync::registry::{PushOptions, Registry, RegistryError};
use cloud_sync::sync_protocol::registry::{
    Deployment, ModelVersion, Promotion, RolloutEvent, RolloutReport, RolloutReportAck,
    RolloutState, ShadowSummary, canary_bucket, deployment_path, production_path, promote_path,
    rollout_reports_path,
};
use cloud_sync::{Server, Settings, StorageSettings, start};
use tokio_util::sync::CancellationToken;

use crate::backends::PgSchema;
use crate::registry::{NAME, Reply, http, package};

const V1: &str = "1.0.0";
const V2: &str = "1.1.0";
const V3: &str = "1.2.0";
const MAX_BODY: usize = 64 * 1024;

/// Servers on one database, a registry handle (the CLI side), 1.0.0 in
/// production and 1.1.0 / 1.2.0 staged, devices with tokens, an operator.
struct Fleet {
    dir: tempfile::TempDir,
    servers: Vec<Server>,
    shutdown: CancellationToken,
    registry: Registry,
    signer: Signer,
    devices: Vec<(String, String)>,
    operator: String,
    _schema: Option<PgSchema>,
}

impl Fleet {
    async fn new(
        storage: Option<StorageSettings>,
        schema: Option<PgSchema>,
        instances: usize,
        devices: usize,
    ) -> Result<Fleet> {
        let dir = tempfile::tempdir()?;
        let mut settings = Settings::for_database(dir.path().join("cloud.db"));
        settings.registry.artifact_dir = dir.path().join("artifacts");
        settings.registry.signing_key_file = dir.path().join("key.pem");
        settings.registry.public_keys_file = dir.path().join("keys.toml");
        settings.max_body_bytes = MAX_BODY;
        if let Some(storage) = storage {
            settings.storage = storage;
        }
        keys::generate(&settings.registry)?;
        let signer = Signer::load(&settings.registry)?;
        let shutdown = CancellationToken::new();
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(start(settings.clone(), shutdown.clone()).await?);
        }
        let registry = Registry::open(&settings.registry, &settings.storage).await?;
        let store = servers[0].store();
        let mut tokens = Vec::new();
        for i in 0..devices {
            let id = format!("dev-{i:03}");
            tokens.push((id.clone(), store.add_device(&id).await?));
        }
        let operator = store.add_operator("ops").await?;
        let fleet = Fleet {
            dir,
            servers,
            shutdown,
            registry,
            signer,
            devices: tokens,
            operator,
            _schema: schema,
        };
        for version in [V1, V2, V3] {
            fleet.push(version, "default").await?;
        }
        fleet.registry.promote(NAME, V1, "default").await?;
        Ok(fleet)
    }

    async fn push(&self, version: &str, group: &str) -> Result<ModelVersion> {
        let dir = package(self.dir.path(), &format!("{version}-{group}"), version)?;
        let options = PushOptions {
            group: group.to_owned(),
            ..PushOptions::default()
        };
        Ok(self
            .registry
            .push(&dir, &self.signer, options)
            .await?
            .version)
    }

    /// The server for the `i`-th request (alternating across instances).
    fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i % self.servers.len()].addr
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        for server in self.servers {
            server.join().await?;
        }
        Ok(())
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn get_as(addr: SocketAddr, path: &str, token: &str, etag: Option<&str>) -> Result<Reply> {
    let auth = bearer(token);
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(etag) = etag {
        headers.push(("if-none-match", etag));
    }
    http(addr, "GET", path, &headers, b"").await
}

async fn post_as(addr: SocketAddr, path: &str, token: &str, body: &[u8]) -> Result<Reply> {
    let auth = bearer(token);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    http(addr, "POST", path, &headers, body).await
}

fn json<T: serde::de::DeserializeOwned>(reply: &Reply) -> Result<T> {
    ensure!(
        reply.status == 200,
        "status {}: {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    Ok(serde_json::from_slice(&reply.body)?)
}

async fn deployment(addr: SocketAddr, token: &str, query: &str) -> Result<(Deployment, String)> {
    let reply = get_as(
        addr,
        &format!("{}{query}", deployment_path(NAME)),
        token,
        None,
    )
    .await?;
    let etag = reply.header("etag").context("no etag")?.to_owned();
    Ok((json(&reply)?, etag))
}

fn report(version: &str, event: RolloutEvent, reason: Option<&str>, at_ms: i64) -> RolloutReport {
    RolloutReport {
        model: NAME.to_owned(),
        version: version.to_owned(),
        sha256: None,
        event,
        reason: reason.map(str::to_owned),
        at_ms,
        shadow: None,
    }
}

async fn send_report(addr: SocketAddr, token: &str, report: &RolloutReport) -> Result<Reply> {
    post_as(
        addr,
        &rollout_reports_path(),
        token,
        &serde_json::to_vec(report)?,
    )
    .await
}

/// The devices in a canary of `version` at `percent`, by the wire rule.
fn canary(fleet: &Fleet, version: &str, percent: u8) -> BTreeSet<String> {
    fleet
        .devices
        .iter()
        .filter(|(id, _)| canary_bucket(id, NAME, version) < percent)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Every device's deployment: its active version, checked against the
/// bucket rule; returns the devices served `version`.
async fn served(fleet: &Fleet, version: &str, percent: u8) -> Result<BTreeSet<String>> {
    let mut got = BTreeSet::new();
    for (i, (id, token)) in fleet.devices.iter().enumerate() {
        let (d, _) = deployment(fleet.addr(i), token, "").await?;
        let expected = if canary_bucket(id, NAME, version) < percent {
            version
        } else {
            V1
        };
        ensure!(
            d.active.version == expected,
            "{id}: got {} expected {expected}",
            d.active.version
        );
        ensure!(!d.downgrade, "{id}: downgrade during an active rollout");
        let rollout = d.rollout.context("no rollout in the deployment")?;
        ensure!(rollout.state == RolloutState::Active && rollout.percent == percent);
        if d.active.version == version {
            got.insert(id.clone());
        }
    }
    Ok(got)
}

/// Staged promotion over HTTP, split, 304s, widening, refusals while
/// active, sequential reports halting at the exact report, halted
/// deployments, and the operator view.
async fn core_scenario(fleet: &Fleet) -> Result<()> {
    let ops = fleet.operator.clone();
    let addr = fleet.addr(0);

    // Promotion to 10 % with a 30 % halt share.
    let body = br#"{"group":"default","percent":10,"halt_share":0.3}"#;
    let promotion: Promotion = json(&post_as(addr, &promote_path(NAME, V2), &ops, body).await?)?;
    let rollout = promotion.rollout.context("no rollout started")?;
    assert_eq!(
        (rollout.state, rollout.percent, rollout.previous.as_deref()),
        (RolloutState::Active, 10, Some(V1))
    );
    assert_eq!(promotion.archived, None);
    // 1.0.0 stays production until the rollout completes.
    assert_eq!(
        fleet
            .registry
            .production(NAME, "default")
            .await?
            .context("no production")?
            .version,
        V1
    );

    // The split follows canary_bucket exactly.
    let at10 = served(fleet, V2, 10).await?;
    assert_eq!(at10, canary(fleet, V2, 10));
    assert!(
        !at10.is_empty() && at10.len() < fleet.devices.len() / 4,
        "{}",
        at10.len()
    );

    // ETag per device: each device's own tag gets a 304, another device's
    // (serving the other version) does not.
    let inside = fleet
        .devices
        .iter()
        .find(|(id, _)| at10.contains(id))
        .context("no canary device")?;
    let outside = fleet
        .devices
        .iter()
        .find(|(id, _)| !at10.contains(id))
        .context("no other device")?;
    let path = deployment_path(NAME);
    let (_, inside_tag) = deployment(addr, &inside.1, "").await?;
    let (_, outside_tag) = deployment(addr, &outside.1, "").await?;
    assert_ne!(inside_tag, outside_tag);
    for (token, tag) in [(&inside.1, &inside_tag), (&outside.1, &outside_tag)] {
        let reply = get_as(fleet.addr(1), &path, token, Some(tag)).await?;
        assert_eq!(reply.status, 304);
        assert!(reply.body.is_empty());
    }
    let reply = get_as(addr, &path, &outside.1, Some(&inside_tag)).await?;
    assert_eq!(reply.status, 200);

    // Operators get the device-less view: the production version.
    let (view, _) = deployment(addr, &ops, "?group=default").await?;
    assert_eq!(view.active.version, V1);

    // One rollout per (model, group): other promotions and archiving the
    // versions involved are refused, over HTTP and through the registry.
    let reply = post_as(addr, &promote_path(NAME, V3), &ops, b"").await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (409, "rollout_in_progress")
    );
    let err = fleet
        .registry
        .promote_staged(NAME, V3, "default", 50, 0.5)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::RolloutInProgress { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("models rollback"), "{err}");
    let err = fleet
        .registry
        .archive(NAME, V1, "default")
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::RolloutInProgress { .. }),
        "{err}"
    );
    let reply = post_as(addr, &promote_path(NAME, V2), &ops, br#"{"percent":0}"#).await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (400, "invalid_rollout")
    );

    // Widening only adds devices.
    let (status, _) = fleet.registry.rollout(NAME, "default", 30).await?;
    assert_eq!((status.state, status.percent), (RolloutState::Active, 30));
    let at30 = served(fleet, V2, 30).await?;
    assert!(at30.is_superset(&at10) && at30.len() > at10.len());
    let (_, tag) = deployment(addr, &inside.1, "").await?;
    assert_ne!(tag, inside_tag, "the rollout in the body changed");

    // Reports from the canary: 20 adopt, then rollbacks one by one; the
    // rollout halts at the first report that takes the rolled-back share
    // above 30 %, not before. Some rollbacks come from devices that had
    // adopted (they count as rolled back only), and reports are repeated
    // (they never count twice).
    let canary_devices: Vec<&(String, String)> = fleet
        .devices
        .iter()
        .filter(|(id, _)| at30.contains(id))
        .collect();
    ensure!(
        canary_devices.len() >= 40,
        "canary of {}",
        canary_devices.len()
    );
    let mut adopted = BTreeSet::new();
    let mut rolled_back = BTreeSet::new();
    for (i, (id, token)) in canary_devices.iter().take(20).enumerate() {
        let ack: RolloutReportAck = json(
            &send_report(
                fleet.addr(i),
                token,
                &report(V2, RolloutEvent::Adopted, None, 1),
            )
            .await?,
        )?;
        adopted.insert(id.clone());
        let r = ack.rollout.context("no rollout in the ack")?;
        assert_eq!((r.adopted, r.rolled_back), (adopted.len() as u64, 0));
    }
    // A repeated report with another time and reason changes no count.
    let (_, token) = canary_devices[0];
    let ack: RolloutReportAck = json(
        &send_report(
            addr,
            token,
            &report(V2, RolloutEvent::Adopted, Some("again"), 2),
        )
        .await?,
    )?;
    assert_eq!(ack.rollout.context("no rollout")?.adopted, 20);

    let rollers: Vec<&(String, String)> = canary_devices[..6]
        .iter()
        .chain(canary_devices[20..].iter())
        .copied()
        .collect();
    let mut halted_at = None;
    for (i, (id, token)) in rollers.iter().enumerate() {
        let reason = format!("p99 latency over budget on {id}");
        let reply = send_report(
            fleet.addr(i),
            token,
            &report(V2, RolloutEvent::RolledBack, Some(&reason), 10 + i as i64),
        )
        .await?;
        let ack: RolloutReportAck = json(&reply)?;
        rolled_back.insert(id.clone());
        let counted_adopted = adopted.difference(&rolled_back).count() as u64;
        let counted_rolled = rolled_back.len() as u64;
        let r = ack.rollout.context("no rollout in the ack")?;
        assert_eq!(
            (r.adopted, r.rolled_back),
            (counted_adopted, counted_rolled)
        );
        let over = counted_rolled * 10 > (counted_adopted + counted_rolled) * 3;
        if halted_at.is_none() {
            if over {
                assert_eq!(r.state, RolloutState::Halted, "report {i} should halt");
                halted_at = Some(i);
            } else {
                assert_eq!(r.state, RolloutState::Active, "report {i} halted too early");
            }
        } else {
            assert_eq!(r.state, RolloutState::Halted);
        }
        // Repeating the report counts nothing more.
        let again: RolloutReportAck = json(
            &send_report(
                fleet.addr(i + 1),
                token,
                &report(V2, RolloutEvent::RolledBack, Some(&reason), 10 + i as i64),
            )
            .await?,
        )?;
        assert_eq!(
            again.rollout.context("no rollout")?.rolled_back,
            counted_rolled
        );
        if halted_at.is_some_and(|at| i >= at + 2) {
            break;
        }
    }
    let halted_at = halted_at.context("never halted")?;
    // 20 adopted, of which the first 6 then rolled back: 14 vs 6 is
    // exactly 30 % (no halt), 14 vs 7 (the 7th rollback) is above.
    assert_eq!(halted_at, 6);
    assert_eq!(
        fleet
            .registry
            .transitions(NAME, "default", RolloutState::Halted)
            .await?,
        1,
        "the halt is recorded exactly once"
    );

    // Halted: every device, in the canary or not, gets 1.0.0 with
    // downgrade, and sees the halted rollout.
    for (i, (id, token)) in fleet.devices.iter().enumerate() {
        let (d, _) = deployment(fleet.addr(i), token, "").await?;
        ensure!(
            d.active.version == V1 && d.downgrade,
            "{id}: {} downgrade={}",
            d.active.version,
            d.downgrade
        );
        ensure!(d.rollout.as_ref().map(|r| r.state) == Some(RolloutState::Halted));
    }

    // The operator view: state, counts, events, reasons.
    let reply = get_as(
        addr,
        &format!("/v1/models/{NAME}/rollouts?group=default"),
        &ops,
        None,
    )
    .await?;
    let overview: RolloutOverview = json(&reply)?;
    let r = overview.rollout.context("no rollout")?;
    assert_eq!(r.state, RolloutState::Halted);
    assert_eq!(overview.production.as_deref(), Some(V1));
    assert_eq!(
        overview.events,
        BTreeMap::from([
            ("adopted".to_owned(), adopted.len() as u64),
            ("rolled_back".to_owned(), rolled_back.len() as u64),
        ])
    );
    assert!(!overview.recent_reasons.is_empty());
    assert!(
        overview
            .recent_reasons
            .iter()
            .all(|r| r.reason.starts_with("p99 latency") && r.event == RolloutEvent::RolledBack)
    );
    Ok(())
}

#[tokio::test]
async fn staged_rollout_on_sqlite() -> Result<()> {
    let fleet = Fleet::new(None, None, 1, 200).await?;
    core_scenario(&fleet).await?;
    after_halt(&fleet).await?;
    fleet.stop().await
}

/// After the halt: rollback is a no-op, a new full promotion clears the
/// downgrade, an operator rollback restores 1.0.0 with downgrade, and a
/// completed rollout makes the version production for everyone.
async fn after_halt(fleet: &Fleet) -> Result<()> {
    let addr = fleet.addr(0);
    let done = fleet.registry.rollback(NAME, "default").await?;
    assert!(!done.changed);

    // A new staged rollout of 1.2.0, widened to 100: complete.
    let promotion = fleet
        .registry
        .promote_staged(NAME, V3, "default", 20, 0.5)
        .await?;
    assert!(promotion.rollout.is_some());
    // Widened to 40 then narrowed back to 20: the devices dropped go back
    // to 1.0.0 with downgrade, the others are unaffected.
    fleet.registry.rollout(NAME, "default", 40).await?;
    fleet.registry.rollout(NAME, "default", 20).await?;
    let mut dropped = 0;
    for (i, (id, token)) in fleet.devices.iter().enumerate() {
        let (d, _) = deployment(fleet.addr(i), token, "").await?;
        let bucket = canary_bucket(id, NAME, V3);
        let expected = if bucket < 20 { V3 } else { V1 };
        ensure!(d.active.version == expected, "{id}: {}", d.active.version);
        ensure!(
            d.downgrade == (20..40).contains(&bucket),
            "{id}: bucket {bucket}, downgrade {}",
            d.downgrade
        );
        dropped += usize::from(d.downgrade);
    }
    assert!(dropped > 0);
    let (status, archived) = fleet.registry.rollout(NAME, "default", 100).await?;
    assert_eq!(status.state, RolloutState::Complete);
    assert_eq!(archived.as_deref(), Some(V1));
    let (_, token) = &fleet.devices[0];
    let (d, _) = deployment(addr, token, "").await?;
    assert_eq!((d.active.version.as_str(), d.downgrade), (V3, false));
    assert!(d.rollout.is_none());
    let err = fleet
        .registry
        .rollout(NAME, "default", 50)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::NoActiveRollout { .. }),
        "{err}"
    );

    // Rollback without an active rollout: 1.0.0 again, with downgrade.
    let done = fleet.registry.rollback(NAME, "default").await?;
    assert!(done.restored && done.changed);
    assert_eq!(done.rollout.previous.as_deref(), Some(V1));
    for (i, (_, token)) in fleet.devices.iter().enumerate().take(20) {
        let (d, _) = deployment(fleet.addr(i), token, "").await?;
        assert_eq!((d.active.version.as_str(), d.downgrade), (V1, true));
    }
    // The production endpoint agrees.
    let reply = get_as(addr, &production_path(NAME), token, None).await?;
    assert_eq!(json::<ModelVersion>(&reply)?.version, V1);
    Ok(())
}

#[tokio::test]
async fn reports_authorization_and_bad_bodies() -> Result<()> {
    let fleet = Fleet::new(None, None, 1, 2).await?;
    let addr = fleet.addr(0);
    let (_, device) = &fleet.devices[0];
    let ops = &fleet.operator;
    let good = serde_json::to_vec(&report(V1, RolloutEvent::Adopted, None, 1))?;
    let path = rollout_reports_path();

    // Operators may not report; devices may not read the rollout view.
    let reply = post_as(addr, &path, ops, &good).await?;
    assert_eq!((reply.status, reply.code()?.as_str()), (403, "forbidden"));
    let reply = http(addr, "POST", &path, &[], &good).await?;
    assert_eq!(reply.status, 401);
    let rollouts = format!("/v1/models/{NAME}/rollouts");
    let reply = get_as(addr, &rollouts, device, None).await?;
    assert_eq!((reply.status, reply.code()?.as_str()), (403, "forbidden"));
    let reply = get_as(addr, &rollouts, ops, None).await?;
    assert_eq!(reply.status, 200);
    // Devices may not promote or start rollouts.
    let reply = post_as(addr, &promote_path(NAME, V2), device, br#"{"percent":10}"#).await?;
    assert_eq!((reply.status, reply.code()?.as_str()), (403, "forbidden"));

    // Malformed or invalid bodies are 400s with the usual error body.
    let mut unknown_field = serde_json::to_value(report(V1, RolloutEvent::Adopted, None, 1))?;
    unknown_field["extra"] = 1.into();
    let mut bad_event = serde_json::to_value(report(V1, RolloutEvent::Adopted, None, 1))?;
    bad_event["event"] = "exploded".into();
    for (body, code) in [
        (b"{".to_vec(), "malformed_json"),
        (b"[]".to_vec(), "malformed_json"),
        (serde_json::to_vec(&unknown_field)?, "malformed_json"),
        (serde_json::to_vec(&bad_event)?, "malformed_json"),
        (
            serde_json::to_vec(&report("1.0", RolloutEvent::Adopted, None, 1))?,
            "invalid_report",
        ),
        (
            serde_json::to_vec(&RolloutReport {
                sha256: Some("xyz".into()),
                ..report(V1, RolloutEvent::Adopted, None, 1)
            })?,
            "invalid_report",
        ),
        (
            serde_json::to_vec(&report(
                V1,
                RolloutEvent::RolledBack,
                Some(&"x".repeat(5000)),
                1,
            ))?,
            "invalid_report",
        ),
    ] {
        let reply = post_as(addr, &path, device, &body).await?;
        assert_eq!(
            (reply.status, reply.code()?.as_str()),
            (400, code),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    // Unknown model version: 404; oversized body: 413.
    let reply = send_report(
        addr,
        device,
        &report("9.9.9", RolloutEvent::Adopted, None, 1),
    )
    .await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (404, "unknown_version")
    );
    let huge = vec![b' '; MAX_BODY + 1];
    let reply = post_as(addr, &path, device, &huge).await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (413, "payload_too_large")
    );
    let reply = get_as(
        addr,
        &format!("{}?group=bad%20group", deployment_path(NAME)),
        device,
        None,
    )
    .await?;
    assert_eq!((reply.status, reply.code()?.as_str()), (400, "bad_query"));
    let reply = get_as(addr, &deployment_path("no-such-model"), device, None).await?;
    assert_eq!(
        (reply.status, reply.code()?.as_str()),
        (404, "no_production_version")
    );

    // A report with no rollout of its version is stored, acked without one;
    // a shadow report keeps its summary.
    let ack: RolloutReportAck =
        json(&send_report(addr, device, &report(V1, RolloutEvent::Adopted, None, 1)).await?)?;
    assert_eq!(
        ack.rollout
            .context("the promotion of 1.0.0 is a complete rollout")?
            .state,
        RolloutState::Complete
    );
    let shadow = RolloutReport {
        shadow: Some(ShadowSummary {
            windows: 10,
            mean_abs_diff: 0.1,
            max_abs_diff: 0.5,
            agreement: 0.9,
            candidate_errors: 0,
        }),
        ..report(V2, RolloutEvent::Shadow, None, 3)
    };
    let ack: RolloutReportAck = json(&send_report(addr, device, &shadow).await?)?;
    assert!(ack.rollout.is_none());
    fleet.stop().await
}

#[tokio::test]
async fn device_groups_override_the_query_and_shadows_follow_buckets() -> Result<()> {
    let fleet = Fleet::new(None, None, 1, 40).await?;
    let addr = fleet.addr(0);
    fleet.push(V2, "line-2").await?;
    fleet.registry.promote(NAME, V2, "line-2").await?;
    let (id, token) = &fleet.devices[0];

    let (d, _) = deployment(addr, token, "?group=line-2").await?;
    assert_eq!(
        (d.group.as_str(), d.active.version.as_str()),
        ("line-2", V2)
    );
    let (d, _) = deployment(addr, token, "").await?;
    assert_eq!(
        (d.group.as_str(), d.active.version.as_str()),
        ("default", V1)
    );

    // The assignment wins over the query, on both endpoints.
    assert_eq!(
        fleet.registry.set_device_group(id, Some("default")).await?,
        None
    );
    let (d, _) = deployment(addr, token, "?group=line-2").await?;
    assert_eq!(
        (d.group.as_str(), d.active.version.as_str()),
        ("default", V1)
    );
    let reply = get_as(
        addr,
        &format!("{}?group=line-2", production_path(NAME)),
        token,
        None,
    )
    .await?;
    assert_eq!(json::<ModelVersion>(&reply)?.version, V1);
    // Another device is unaffected; operators get the group they name.
    let (d, _) = deployment(addr, &fleet.devices[1].1, "?group=line-2").await?;
    assert_eq!(d.active.version, V2);
    let (d, _) = deployment(addr, &fleet.operator, "?group=line-2").await?;
    assert_eq!(d.active.version, V2);
    // Cleared: the query applies again.
    assert_eq!(
        fleet.registry.set_device_group(id, None).await?.as_deref(),
        Some("default")
    );
    let (d, _) = deployment(addr, token, "?group=line-2").await?;
    assert_eq!(d.active.version, V2);
    assert!(matches!(
        fleet.registry.set_device_group(id, Some("bad group")).await,
        Err(RegistryError::InvalidGroup { .. })
    ));

    // A report without a group counts in the device's assignment, else in
    // the only group its version is registered in.
    let only_line_2 = "2.0.0";
    fleet.push(only_line_2, "line-2").await?;
    fleet
        .registry
        .promote_staged(NAME, only_line_2, "line-2", 50, 0.5)
        .await?;
    let r = report(only_line_2, RolloutEvent::Adopted, None, 1);
    let ack: RolloutReportAck = json(&send_report(addr, &fleet.devices[2].1, &r).await?)?;
    let status = ack.rollout.context("not counted in line-2")?;
    assert_eq!((status.group.as_str(), status.adopted), ("line-2", 1));
    fleet.registry.set_device_group(id, Some("default")).await?;
    let ack: RolloutReportAck = json(&send_report(addr, token, &r).await?)?;
    assert!(ack.rollout.is_none(), "counted outside the assigned group");
    fleet.registry.set_device_group(id, None).await?;

    // Shadow at 50 %: exactly the devices whose bucket for the shadow
    // version is below 50 get it; cleared, nobody does.
    fleet
        .registry
        .set_shadow(NAME, "default", Some((V3, 50)))
        .await?;
    let mut shadowed = 0;
    for (id, token) in &fleet.devices {
        let (d, _) = deployment(addr, token, "").await?;
        let expected = canary_bucket(id, NAME, V3) < 50;
        assert_eq!(
            d.shadow.as_ref().map(|v| v.version.as_str()) == Some(V3),
            expected,
            "{id}"
        );
        assert_eq!(d.active.version, V1);
        shadowed += usize::from(expected);
    }
    assert!(shadowed > 0 && shadowed < fleet.devices.len());
    fleet
        .registry
        .set_shadow(NAME, "default", Some((V3, 100)))
        .await?;
    let (d, tag) = deployment(addr, token, "").await?;
    assert_eq!(d.shadow.context("no shadow")?.version, V3);
    fleet.registry.set_shadow(NAME, "default", None).await?;
    let reply = get_as(addr, &deployment_path(NAME), token, Some(&tag)).await?;
    assert_eq!(reply.status, 200, "clearing the shadow changes the ETag");
    assert!(json::<Deployment>(&reply)?.shadow.is_none());
    assert!(matches!(
        fleet
            .registry
            .set_shadow(NAME, "default", Some(("7.7.7", 10)))
            .await,
        Err(RegistryError::UnknownVersion { .. })
    ));
    fleet.stop().await
}

#[tokio::test]
async fn concurrent_reports_halt_once_on_sqlite() -> Result<()> {
    let fleet = Fleet::new(None, None, 1, 120).await?;
    race(&fleet).await?;
    fleet.stop().await
}

/// A rollout of 1.2.0 at 50 %; 10 devices adopt, then every other canary
/// device reports `rolled_back` at once, spread over the instances: the
/// rollout halts, and exactly once.
async fn race(fleet: &Fleet) -> Result<()> {
    let before = fleet
        .registry
        .transitions(NAME, "default", RolloutState::Halted)
        .await?;
    fleet
        .registry
        .promote_staged(NAME, V3, "default", 50, 0.5)
        .await?;
    let members: Vec<(String, String)> = fleet
        .devices
        .iter()
        .filter(|(id, _)| canary_bucket(id, NAME, V3) < 50)
        .cloned()
        .collect();
    ensure!(members.len() >= 30, "canary of {}", members.len());
    for (i, (_, token)) in members.iter().take(10).enumerate() {
        let reply = send_report(
            fleet.addr(i),
            token,
            &report(V3, RolloutEvent::Adopted, None, 1),
        )
        .await?;
        ensure!(reply.status == 200);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (_, token)) in members.iter().enumerate().skip(10) {
        let addr = fleet.addr(i);
        let token = token.clone();
        tasks.spawn(async move {
            let r = report(V3, RolloutEvent::RolledBack, Some("watchdog"), 2);
            let reply = send_report(addr, &token, &r).await?;
            json::<RolloutReportAck>(&reply)
        });
    }
    let mut halted_acks = 0;
    while let Some(ack) = tasks.join_next().await {
        let ack = ack??;
        if ack.rollout.context("no rollout")?.state == RolloutState::Halted {
            halted_acks += 1;
        }
    }
    assert!(halted_acks > 0);
    let rolled = members.len() as u64 - 10;
    let overview = fleet.registry.overview(NAME, "default").await?;
    let r = overview.rollout.context("no rollout")?;
    assert_eq!(
        (r.state, r.adopted, r.rolled_back),
        (RolloutState::Halted, 10, rolled)
    );
    assert_eq!(
        fleet
            .registry
            .transitions(NAME, "default", RolloutState::Halted)
            .await?,
        before + 1,
        "halted exactly once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn staged_rollout_on_two_postgres_instances() -> Result<()> {
    let Some(schema) = PgSchema::create("staged_rollout_on_two_postgres_instances").await? else {
        println!("skipped");
        return Ok(());
    };
    let storage = StorageSettings::Postgres(Box::new(schema.settings()));
    let fleet = Fleet::new(Some(storage), Some(schema), 2, 200).await?;
    core_scenario(&fleet).await?;
    race(&fleet).await?;
    after_halt(&fleet).await?;
    // Both instances serve the same deployment to a device.
    let (_, token) = &fleet.devices[3];
    let (a, tag_a) = deployment(fleet.addr(0), token, "").await?;
    let (b, tag_b) = deployment(fleet.addr(1), token, "").await?;
    assert_eq!((a, tag_a), (b, tag_b));
    fleet.stop().await
}

#[test]
fn cli_set_group_promote_rollout_status_rollback() -> Result<()> {
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
    let run = |args: &[&str]| -> Result<(bool, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_cloud-sync"))
            .args(args)
            .args(["--config", &config])
            .output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    };
    let ok = |args: &[&str]| -> Result<String> {
        let (success, text) = run(args)?;
        ensure!(success, "{args:?}: {text}");
        Ok(text)
    };
    ok(&["keys", "generate"])?;
    for version in [V1, V2] {
        let pkg = package(dir.path(), version, version)?;
        ok(&["models", "push", &pkg.to_string_lossy()])?;
    }
    ok(&["devices", "add", "dev-1"])?;

    let (success, text) = run(&["devices", "set-group", "ghost", "line-1"])?;
    assert!(
        !success && text.contains("unknown or revoked device"),
        "{text}"
    );
    let text = ok(&["devices", "set-group", "dev-1", "line-1"])?;
    assert!(text.contains("assigned to group \"line-1\""), "{text}");
    let text = ok(&["devices", "set-group", "dev-1", "--clear"])?;
    assert!(text.contains("was \"line-1\""), "{text}");

    ok(&["models", "promote", NAME, V1])?;
    let text = ok(&[
        "models",
        "promote",
        NAME,
        V2,
        "--percent",
        "10",
        "--halt-share",
        "0.2",
    ])?;
    assert!(text.contains("staged rollout"), "{text}");
    let (success, text) = run(&["models", "promote", NAME, V2])?;
    assert!(!success && text.contains("in progress at 10%"), "{text}");
    let (success, _) = run(&["models", "promote", NAME, V2, "--percent", "101"])?;
    assert!(!success);
    let text = ok(&["models", "rollout", NAME, "--percent", "40"])?;
    assert!(text.contains("now at 40%"), "{text}");
    let text = ok(&["models", "status", NAME])?;
    assert!(
        text.contains("1.0.0 -> 1.1.0 active at 40%") && text.contains("production 1.0.0"),
        "{text}"
    );
    let text = ok(&["models", "shadow", NAME, V2, "--percent", "5"])?;
    assert!(text.contains("shadow on 5%"), "{text}");
    ok(&["models", "shadow", NAME, "--clear"])?;
    let text = ok(&["models", "rollback", NAME])?;
    assert!(text.contains("halted"), "{text}");
    let text = ok(&["models", "status", NAME])?;
    assert!(text.contains("halted at 40%"), "{text}");
    let text = ok(&["models", "promote", NAME, V2])?;
    assert!(text.contains("is production"), "{text}");
    let text = ok(&["models", "rollback", NAME])?;
    assert!(text.contains("production again"), "{text}");
    Ok(())
}

/// A database at registry schema version 1 (before device groups and
/// rollouts) with a production version keeps serving it after the upgrade,
/// and the new features work on it.
#[tokio::test]
async fn schema_1_databases_are_migrated() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = Settings::for_database(dir.path().join("cloud.db"));
    keys::generate(&settings.registry)?;
    let signer = Signer::load(&settings.registry)?;
    // Register two versions with the current code, then turn the database
    // back into a schema-1 one: drop what migration 2 added.
    {
        let registry = Registry::open(&settings.registry, &settings.storage).await?;
        for version in [V1, V2] {
            registry
                .push(
                    &package(dir.path(), version, version)?,
                    &signer,
                    PushOptions::default(),
                )
                .await?;
        }
    }
    let db = rusqlite::Connection::open(dir.path().join("cloud.db"))?;
    db.execute_batch(
        "DROP TABLE shadows; DROP TABLE rollout_reports; DROP TABLE rollout_history;
         DROP TABLE rollouts; DROP TABLE device_groups;
         DELETE FROM registry_migrations WHERE version = 2;
         UPDATE model_versions SET stage = 'production' WHERE version = '1.0.0';",
    )?;
    drop(db);

    let registry = Registry::open(&settings.registry, &settings.storage).await?;
    let d = registry
        .deployment(NAME, Some("dev-1"), None)
        .await?
        .context("nothing deployable")?;
    assert_eq!((d.active.version.as_str(), d.downgrade), (V1, false));
    let promotion = registry
        .promote_staged(NAME, V2, "default", 100, 0.5)
        .await?;
    assert_eq!(promotion.archived.as_deref(), Some(V1));
    let done = registry.rollback(NAME, "default").await?;
    assert!(done.restored);
    let db = rusqlite::Connection::open(dir.path().join("cloud.db"))?;
    let version: i64 = db.query_row("SELECT MAX(version) FROM registry_migrations", [], |r| {
        r.get(0)
    })?;
    assert_eq!(version, 2);
    Ok(())
}
