//! The retrainer's part of the OpenAPI document (`/openapi.json`): runs,
//! jobs and the retrain request. [`extend`] adds them to the document
//! [`crate::openapi::document`] builds.

use serde_json::{Value, json};

fn reference(kind: &str, name: &str) -> Value {
    json!({ "$ref": format!("#/components/{kind}/{name}") })
}

fn json_body(schema: Value, description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn errors(extra: &[(&str, &str)]) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    for (status, name) in [
        ("400", "BadRequest"),
        ("401", "Unauthorized"),
        ("403", "Forbidden"),
        ("408", "Timeout"),
        ("500", "ServerError"),
    ] {
        map.insert(status.into(), reference("responses", name));
    }
    map.insert(
        "503".into(),
        json_body(
            reference("schemas", "ErrorBody"),
            "retrain_unavailable: the server runs without a retrainer.",
        ),
    );
    for (status, description) in extra {
        map.insert(
            (*status).into(),
            json_body(reference("schemas", "ErrorBody"), description),
        );
    }
    map
}

fn with(mut responses: serde_json::Map<String, Value>, status: &str, body: Value) -> Value {
    responses.insert(status.into(), body);
    Value::Object(responses)
}

fn id_param(description: &str) -> Value {
    json!({ "name": "id", "in": "path", "required": true, "description": description,
            "schema": { "type": "string" } })
}

fn paths() -> serde_json::Map<String, Value> {
    let security = json!([{ "bearerAuth": [] }]);
    let mut map = serde_json::Map::new();
    map.insert("/v1/runs".into(), json!({
        "get": {
            "summary": "List training runs (operators)",
            "description": "Newest first. See docs/retraining.md.",
            "security": security,
            "parameters": [
                { "name": "model", "in": "query", "required": false, "schema": { "type": "string" } },
                { "name": "limit", "in": "query", "required": false,
                  "schema": { "type": "integer", "minimum": 0, "maximum": 1000 } }
            ],
            "responses": with(errors(&[]), "200", json_body(
                json!({ "type": "array", "items": reference("schemas", "TrainingRun") }), "The runs.")),
        }
    }));
    map.insert(
        "/v1/runs/{id}".into(),
        json!({
            "parameters": [id_param("Run id.")],
            "get": {
                "summary": "Read one training run (operators)",
                "security": security,
                "responses": with(errors(&[("404", "unknown_run")]), "200",
                    json_body(reference("schemas", "TrainingRun"), "The run.")),
            }
        }),
    );
    map.insert(
        "/v1/retrain".into(),
        json!({
            "post": {
                "summary": "Enqueue a retrain job (operators)",
                "description": "The worker runs queued jobs one at a time; poll GET /v1/jobs/{id}.",
                "security": security,
                "requestBody": { "required": true, "content": { "application/json": {
                    "schema": reference("schemas", "RetrainJobSpec") } } },
                "responses": with(errors(&[]), "202",
                    json_body(reference("schemas", "RetrainJob"), "Queued.")),
            }
        }),
    );
    map.insert(
        "/v1/jobs/{id}".into(),
        json!({
            "parameters": [id_param("Job id.")],
            "get": {
                "summary": "Read a retrain job's status (operators)",
                "security": security,
                "responses": with(errors(&[("404", "unknown_job")]), "200",
                    json_body(reference("schemas", "RetrainJob"), "The job.")),
            }
        }),
    );
    map
}

fn nullable(kind: &str) -> Value {
    json!({ "type": [kind, "null"] })
}

fn schemas() -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("RetrainJobSpec".into(), json!({
        "type": "object",
        "required": ["model"],
        "additionalProperties": false,
        "properties": {
            "model": { "type": "string" },
            "csv": nullable("string"),
            "dataset": { "type": ["string", "null"],
                         "description": "Dataset snapshot id (POST /v1/datasets); trains on its readings of the train config's stream/field (default temperature/value)." },
            "train": { "type": ["object", "null"],
                       "description": "edge_retrain TrainConfig keys without name (window, hop, train_fraction, ridge, threshold_quantile, version, label, ...)." },
            "group": { "type": "string" },
            "register": { "type": "boolean" }
        }
    }));
    map.insert(
        "RetrainJob".into(),
        json!({
            "type": "object",
            "required": ["id", "spec", "status", "created_ms"],
            "properties": {
                "id": { "type": "string" },
                "spec": reference("schemas", "RetrainJobSpec"),
                "status": { "enum": ["queued", "running", "succeeded", "failed"] },
                "run_id": nullable("string"),
                "error": nullable("string"),
                "created_ms": { "type": "integer" },
                "started_ms": nullable("integer"),
                "finished_ms": nullable("integer")
            }
        }),
    );
    map.insert(
        "TrainingRun".into(),
        json!({
            "type": "object",
            "required": ["id", "model", "family", "status", "progress", "params", "metrics",
                         "code_version", "started_ms", "registered"],
            "properties": {
                "id": { "type": "string" },
                "model": { "type": "string" },
                "family": { "type": "string" },
                "status": { "enum": ["running", "succeeded", "failed"] },
                "progress": { "type": "string" },
                "params": { "type": "object" },
                "metrics": { "type": "object" },
                "dataset": nullable("string"),
                "code_version": { "type": "string" },
                "started_ms": { "type": "integer" },
                "finished_ms": nullable("integer"),
                "duration_ms": nullable("integer"),
                "package_dir": nullable("string"),
                "version": nullable("string"),
                "sha256": nullable("string"),
                "registered": { "type": "boolean" },
                "error": nullable("string"),
                "job_id": nullable("string")
            }
        }),
    );
    map
}

/// Adds the retrainer's operations and schemas to `document`.
pub fn extend(document: &mut Value) {
    if let Some(target) = document.get_mut("paths").and_then(Value::as_object_mut) {
        target.extend(paths());
    }
    if let Some(target) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        target.extend(schemas());
    }
}
