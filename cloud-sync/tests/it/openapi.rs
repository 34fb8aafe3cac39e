//! `/openapi.json` against the real router: every route served is
//! documented and every documented operation is served, and the document's
//! schemas accept real request and response bodies (checked with a small
//! JSON Schema validator for the keywords the document uses).

use std::collections::BTreeSet;

use anyhow::{Context as _, Result, bail};
use axum::http::{Method, Request, StatusCode};
use cloud_sync::api::routes;
use cloud_sync::sync_protocol::{
    FLEET_PATH, OPENAPI_PATH, UploadBatch, batch_path, dead_letters_path, heartbeat_path,
    predictions_path, readings_path, summary_path,
};
use serde_json::Value;

use crate::util::{Env, dead_letter, get, heartbeat, post, sample_batch, send};

const MIB: usize = 1024 * 1024;
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

async fn document(env: &Env) -> Result<Value> {
    let reply = send(&env.router(), get(OPENAPI_PATH, None)?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()
}

fn operations(doc: &Value) -> Result<BTreeSet<(String, String)>> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().context("no paths")? {
        for method in METHODS {
            if item.get(method).is_some() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    Ok(ops)
}

#[tokio::test]
async fn documents_exactly_the_routes_served() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let doc = document(&env).await?;
    assert_eq!(doc["openapi"], "3.1.0");
    let documented = operations(&doc)?;
    let served: BTreeSet<(String, String)> = routes()
        .into_iter()
        .map(|(method, path)| (method.to_string(), path))
        .collect();
    assert_eq!(documented, served);

    // Against the real router: each documented operation is routed (no
    // 404/405), and every other method on a documented path is 405.
    let router = env.router();
    for (path, item) in doc["paths"].as_object().context("no paths")? {
        let concrete = path.replace("{device}", "dev-1");
        for method in METHODS {
            let request = Request::builder()
                .method(Method::from_bytes(method.to_uppercase().as_bytes())?)
                .uri(&concrete)
                .body(axum::body::Body::empty())?;
            let reply = send(&router, request).await?;
            if item.get(method).is_some() {
                assert!(
                    reply.status != StatusCode::NOT_FOUND
                        && reply.status != StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}: {}",
                    reply.status
                );
            } else {
                assert_eq!(
                    reply.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but not documented"
                );
            }
        }
    }
    // Every operation answers with a documented status; the security
    // schemes named exist.
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .context("no security schemes")?;
    assert!(schemes.contains_key("bearerAuth") && schemes.contains_key("mutualTLS"));
    Ok(())
}

/// The JSON schema of `path`'s `method` response with `status`.
pub(crate) fn response_schema(doc: &Value, method: &str, path: &str, status: u16) -> Result<Value> {
    let mut response = doc["paths"][path][method]["responses"][status.to_string()].clone();
    if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
        response = resolve(doc, reference)?;
    }
    let schema = response["content"]["application/json"]["schema"].clone();
    if schema.is_null() {
        bail!("{method} {path} documents no JSON body for {status}");
    }
    Ok(schema)
}

pub(crate) fn request_schema(doc: &Value, method: &str, path: &str, media: &str) -> Result<Value> {
    let schema = doc["paths"][path][method]["requestBody"]["content"][media]["schema"].clone();
    if schema.is_null() {
        bail!("{method} {path} documents no {media} request body");
    }
    Ok(schema)
}

fn resolve(doc: &Value, reference: &str) -> Result<Value> {
    let pointer = reference.strip_prefix('#').context("external $ref")?;
    doc.pointer(pointer)
        .cloned()
        .with_context(|| format!("dangling $ref {reference}"))
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => false,
    }
}

/// Validates `value` against `schema` (keywords: $ref, oneOf, const, enum,
/// type, minimum, maximum, minLength, properties, required,
/// additionalProperties, items).
pub(crate) fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<()> {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        return validate(doc, &resolve(doc, reference)?, value, at);
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = options
            .iter()
            .filter(|option| validate(doc, option, value, at).is_ok())
            .count();
        if matching != 1 {
            bail!("{at}: {matching} oneOf alternatives match {value}");
        }
    }
    if let Some(expected) = schema.get("const")
        && expected != value
    {
        bail!("{at}: {value} is not {expected}");
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        bail!("{at}: {value} not in enum");
    }
    if let Some(types) = schema.get("type") {
        let ok = match types {
            Value::String(name) => type_matches(name, value),
            Value::Array(names) => names
                .iter()
                .filter_map(Value::as_str)
                .any(|name| type_matches(name, value)),
            _ => bail!("{at}: bad type keyword"),
        };
        if !ok {
            bail!("{at}: {value} is not of type {types}");
        }
    }
    if let Some(number) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && number < min
        {
            bail!("{at}: {value} < minimum {min}");
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && number > max
        {
            bail!("{at}: {value} > maximum {max}");
        }
    }
    if let (Some(text), Some(min)) = (
        value.as_str(),
        schema.get("minLength").and_then(Value::as_u64),
    ) && (text.chars().count() as u64) < min
    {
        bail!("{at}: string shorter than {min}");
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(required) {
                bail!("{at}: missing required {required}");
            }
        }
        for (key, item) in object {
            let at = format!("{at}.{key}");
            match properties.and_then(|p| p.get(key)) {
                Some(property) => validate(doc, property, item, &at)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => bail!("{at}: not allowed"),
                    Some(extra) if extra.is_object() => validate(doc, extra, item, &at)?,
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn schemas_accept_real_bodies_and_reject_broken_ones() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let doc = document(&env).await?;
    let token = env.store.add_device("dev-1").await?;
    let operator = env.store.add_operator("ops").await?;
    let router = env.router();
    let template = |path: String| path.replace("dev-1", "{device}");

    // Requests.
    let mut batch: UploadBatch = sample_batch(1..=3, 1..=2);
    batch.dead_letters = vec![dead_letter(1)];
    batch.readings[1].device_ts_ms = None;
    let batch_json = serde_json::to_value(&batch)?;
    let batch_schema = request_schema(
        &doc,
        "post",
        &template(batch_path("dev-1")),
        "application/json",
    )?;
    validate(&doc, &batch_schema, &batch_json, "batch")?;
    let beat = serde_json::to_value(heartbeat(5, 1))?;
    let beat_schema = request_schema(
        &doc,
        "post",
        &template(heartbeat_path("dev-1")),
        "application/json",
    )?;
    validate(&doc, &beat_schema, &beat, "heartbeat")?;
    request_schema(
        &doc,
        "post",
        &template(batch_path("dev-1")),
        cloud_sync::sync_protocol::codec::MEDIA_TYPE,
    )?;

    // Responses, as the server sends them.
    let mut checks: Vec<(&str, String, Option<&str>, u16)> = Vec::new();
    let reply = send(
        &router,
        post(
            &batch_path("dev-1"),
            Some(&token),
            "application/json",
            None,
            serde_json::to_vec(&batch)?,
        )?,
    )
    .await?;
    validate(
        &doc,
        &response_schema(&doc, "post", &template(batch_path("dev-1")), 200)?,
        &reply.json()?,
        "ack",
    )?;
    let reply = send(
        &router,
        post(
            &heartbeat_path("dev-1"),
            Some(&token),
            "application/json",
            None,
            serde_json::to_vec(&beat)?,
        )?,
    )
    .await?;
    validate(
        &doc,
        &response_schema(&doc, "post", &template(heartbeat_path("dev-1")), 200)?,
        &reply.json()?,
        "heartbeat ack",
    )?;
    for path in [
        summary_path("dev-1"),
        readings_path("dev-1"),
        format!("{}?limit=1", predictions_path("dev-1")),
        dead_letters_path("dev-1"),
        heartbeat_path("dev-1"),
    ] {
        checks.push(("get", path, Some(token.as_str()), 200));
    }
    checks.push(("get", FLEET_PATH.to_owned(), Some(operator.as_str()), 200));
    checks.push(("get", FLEET_PATH.to_owned(), Some(token.as_str()), 403));
    checks.push(("get", readings_path("dev-1"), None, 401));
    checks.push((
        "get",
        format!("{}?limit=0", readings_path("dev-1")),
        Some(token.as_str()),
        400,
    ));
    checks.push(("get", readings_path("ghost"), Some(operator.as_str()), 404));
    for (method, path, auth, status) in checks {
        let reply = send(&router, get(&path, auth)?).await?;
        assert_eq!(reply.status.as_u16(), status, "{path}");
        let route = template(path.split('?').next().unwrap_or_default().to_owned())
            .replace("ghost", "{device}");
        let schema = response_schema(&doc, method, &route, status)?;
        validate(&doc, &schema, &reply.json()?, &path)?;
    }
    let reply = send(
        &router,
        post(&batch_path("dev-1"), Some(&token), "text/plain", None, "x")?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    validate(
        &doc,
        &response_schema(&doc, "post", &template(batch_path("dev-1")), 415)?,
        &reply.json()?,
        "415",
    )?;

    // The validator does reject what the schemas forbid.
    let ack_schema = response_schema(&doc, "post", &template(batch_path("dev-1")), 200)?;
    let reply = send(
        &router,
        post(
            &batch_path("dev-1"),
            Some(&token),
            "application/json",
            None,
            serde_json::to_vec(&batch)?,
        )?,
    )
    .await?;
    let good: Value = reply.json()?;
    let mut missing = good.clone();
    missing
        .as_object_mut()
        .context("object")?
        .remove("dead_letters_inserted");
    let mut extra = good.clone();
    extra["surprise"] = Value::from(1);
    let mut negative = good.clone();
    negative["readings_inserted"] = Value::from(-1);
    let mut wrong = batch_json.clone();
    wrong["readings"][0]["values"]["value"] = Value::from("hot");
    for (name, bad, schema) in [
        ("missing", &missing, &ack_schema),
        ("extra", &extra, &ack_schema),
        ("negative", &negative, &ack_schema),
        ("wrong type", &wrong, &batch_schema),
    ] {
        assert!(
            validate(&doc, schema, bad, name).is_err(),
            "{name} accepted"
        );
    }
    Ok(())
}

#[test]
fn rollout_schemas_accept_wire_bodies_and_reject_broken_ones() -> Result<()> {
    use cloud_sync::sync_protocol::registry::{
        Deployment, ModelVersion, Promotion, RolloutEvent, RolloutReport, RolloutReportAck,
        RolloutState, RolloutStatus, ShadowSummary, Stage, StageChange,
    };

    let doc = cloud_sync::openapi::document();
    let schema = |name: &str| serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
    let version = ModelVersion {
        name: "m".into(),
        version: "1.0.0".into(),
        group: "default".into(),
        stage: Stage::Production,
        sha256: "ab".repeat(32),
        model_sha256: "cd".repeat(32),
        size_bytes: 10,
        signature: "00".repeat(64),
        key_id: "0123456789abcdef".into(),
        created_ms: 1,
        stage_changed_ms: 2,
        training_run: None,
        dataset: Some("d".into()),
        artifact_url: "/v1/artifacts/x".into(),
    };
    let status = RolloutStatus {
        name: "m".into(),
        group: "default".into(),
        version: "1.1.0".into(),
        previous: Some("1.0.0".into()),
        percent: 10,
        state: RolloutState::Halted,
        halt_share: 0.5,
        adopted: 3,
        rolled_back: 4,
    };
    let deployment = Deployment {
        group: "default".into(),
        active: version.clone(),
        shadow: Some(version.clone()),
        downgrade: true,
        rollout: Some(status.clone()),
    };
    let report = RolloutReport {
        model: "m".into(),
        version: "1.1.0".into(),
        sha256: None,
        event: RolloutEvent::Shadow,
        reason: Some("r".into()),
        at_ms: 5,
        shadow: Some(ShadowSummary {
            windows: 3,
            mean_abs_diff: 0.1,
            max_abs_diff: 0.2,
            agreement: 1.0,
            candidate_errors: 0,
        }),
    };
    let good = [
        ("Deployment", serde_json::to_value(&deployment)?),
        (
            "Deployment",
            serde_json::to_value(Deployment {
                shadow: None,
                rollout: None,
                ..deployment.clone()
            })?,
        ),
        ("RolloutReport", serde_json::to_value(&report)?),
        (
            "RolloutReportAck",
            serde_json::to_value(RolloutReportAck {
                rollout: Some(status.clone()),
            })?,
        ),
        (
            "Promotion",
            serde_json::to_value(Promotion {
                promoted: version.clone(),
                archived: None,
                rollout: Some(status),
            })?,
        ),
        (
            "StageChange",
            serde_json::to_value(StageChange {
                group: None,
                percent: Some(10),
                halt_share: Some(0.2),
            })?,
        ),
    ];
    for (name, value) in &good {
        validate(&doc, &schema(name), value, name)?;
    }
    let mut bad_event = serde_json::to_value(&report)?;
    bad_event["event"] = Value::from("exploded");
    let mut bad_percent = serde_json::to_value(&deployment)?;
    bad_percent["rollout"]["percent"] = Value::from(101);
    let mut extra = serde_json::to_value(&deployment)?;
    extra["surprise"] = Value::from(true);
    for (name, value) in [
        ("RolloutReport", bad_event),
        ("Deployment", bad_percent),
        ("Deployment", extra),
    ] {
        assert!(
            validate(&doc, &schema(name), &value, name).is_err(),
            "{value}"
        );
    }
    Ok(())
}

#[test]
fn dataset_schemas_accept_wire_bodies_and_reject_broken_ones() -> Result<()> {
    use cloud_sync::dataset::http::{DatasetList, SnapshotRequest};
    use cloud_sync::dataset::{
        Column, Lineage, Manifest, ManifestContent, PredictionLineage, ReadingLineage, Selection,
        SeqSpan, TableFile,
    };

    let doc = cloud_sync::openapi::document();
    let schema = |name: &str| serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
    let selection = Selection {
        streams: vec!["temperature".into()],
        devices: vec!["dev-1".into()],
        from_ms: 0,
        to_ms: 10,
    };
    let file = TableFile {
        table: "readings".into(),
        path: format!("parquet/{}.parquet", "ab".repeat(32)),
        sha256: "ab".repeat(32),
        bytes: 100,
        rows: 4,
        records: 2,
        columns: vec![Column {
            name: "device".into(),
            kind: "string".into(),
            nullable: false,
        }],
    };
    let manifest = Manifest {
        id: "cd".repeat(32),
        name: None,
        created_ms: 5,
        content: ManifestContent {
            format: cloud_sync::dataset::FORMAT_VERSION,
            selection: selection.clone(),
            files: vec![file],
            lineage: Lineage {
                readings: vec![ReadingLineage {
                    device: "dev-1".into(),
                    source: "m1".into(),
                    stream: "temperature".into(),
                    records: 2,
                    ranges: vec![SeqSpan { first: 1, last: 2 }],
                }],
                predictions: vec![PredictionLineage {
                    device: "dev-1".into(),
                    model: "m".into(),
                    records: 1,
                    ranges: vec![SeqSpan { first: 3, last: 3 }],
                }],
            },
        },
    };
    let request = SnapshotRequest {
        streams: selection.streams,
        devices: selection.devices,
        from_ms: 0,
        to_ms: 10,
        name: Some("n".into()),
    };
    let list = DatasetList {
        datasets: vec![manifest.clone()],
    };
    let bodies = [
        ("DatasetManifest", serde_json::to_value(&manifest)?),
        ("SnapshotRequest", serde_json::to_value(&request)?),
        ("DatasetList", serde_json::to_value(&list)?),
    ];
    for (name, body) in &bodies {
        validate(&doc, &schema(name), body, name)?;
        let mut broken = body.clone();
        broken["unexpected"] = serde_json::json!(1);
        assert!(
            validate(&doc, &schema(name), &broken, name).is_err(),
            "{name}"
        );
    }
    let mut broken = serde_json::to_value(&manifest)?;
    broken["content"]["lineage"]["readings"][0]["ranges"][0]["first"] = serde_json::json!("1");
    assert!(validate(&doc, &schema("DatasetManifest"), &broken, "manifest").is_err());
    Ok(())
}
