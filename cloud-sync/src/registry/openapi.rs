//! The registry's part of the OpenAPI document (`/openapi.json`): its four
//! operations and the `ModelVersion`, `Promotion` and `StageChange` schemas.
//! [`extend`] adds them to the document [`crate::openapi::document`] builds.

use serde_json::{Value, json};
use sync_protocol::registry::DEFAULT_GROUP;

fn reference(kind: &str, name: &str) -> Value {
    json!({ "$ref": format!("#/components/{kind}/{name}") })
}

fn errors(extra: &[(&str, Value)]) -> serde_json::Map<String, Value> {
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
        error_body("registry_unavailable: the server runs without a registry."),
    );
    for (status, value) in extra {
        map.insert((*status).into(), value.clone());
    }
    map
}

fn error_body(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": reference("schemas", "ErrorBody") } }
    })
}

fn json_body(schema: &str, description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": reference("schemas", schema) } }
    })
}

fn path_param(name: &str, description: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description,
            "schema": { "type": "string" } })
}

fn stage_operation(summary: &str, description: &str, reply: &str) -> Value {
    json!({
        "summary": summary,
        "description": description,
        "security": [{ "bearerAuth": [] }],
        "requestBody": {
            "required": false,
            "content": { "application/json": { "schema": reference("schemas", "StageChange") } }
        },
        "responses": Value::Object(errors(&[
            ("200", json_body(reply, "Done.")),
            ("404", error_body("unknown_version: no such version in that group (the message lists the groups it is registered in).")),
        ]))
    })
}

fn paths() -> serde_json::Map<String, Value> {
    let model = path_param("model", "Model name.");
    let version = path_param("version", "MAJOR.MINOR.PATCH.");
    let mut map = serde_json::Map::new();
    map.insert("/v1/models/{model}/production".into(), json!({
        "parameters": [model],
        "get": {
            "summary": "The production version of a model for a device group",
            "description": "Any device or operator credential. Send the last ETag in If-None-Match: an unchanged answer is a bodiless 304.",
            "security": [{ "bearerAuth": [] }, { "mutualTLS": [] }],
            "parameters": [
                { "name": "group", "in": "query", "required": false,
                  "description": format!("Device group (default {DEFAULT_GROUP:?})."),
                  "schema": { "type": "string" } },
                { "name": "If-None-Match", "in": "header", "required": false,
                  "schema": { "type": "string" } }
            ],
            "responses": Value::Object(errors(&[
                ("200", json!({
                    "description": "The production version; ETag header set.",
                    "headers": { "ETag": { "schema": { "type": "string" } } },
                    "content": { "application/json": { "schema": reference("schemas", "ModelVersion") } }
                })),
                ("304", json!({ "description": "Unchanged since the ETag sent." })),
                ("404", error_body("no_production_version for that model and group.")),
            ]))
        }
    }));
    map.insert("/v1/artifacts/{sha256}".into(), json!({
        "parameters": [path_param("sha256", "sha256 of the artifact, 64 lowercase hex digits.")],
        "get": {
            "summary": "Download an artifact (resumable)",
            "description": "Any device or operator credential. One `Range: bytes=` range is honoured (206 with Content-Range); several ranges or an invalid one get the whole artifact. If-Range with the ETag and If-None-Match are supported.",
            "security": [{ "bearerAuth": [] }, { "mutualTLS": [] }],
            "parameters": [
                { "name": "Range", "in": "header", "required": false, "schema": { "type": "string" } }
            ],
            "responses": Value::Object(errors(&[
                ("200", json!({ "description": "The whole artifact.",
                    "content": { "application/x-tar": { "schema": { "type": "string", "contentMediaType": "application/x-tar" } } } })),
                ("206", json!({ "description": "The requested range.",
                    "content": { "application/x-tar": { "schema": { "type": "string" } } } })),
                ("304", json!({ "description": "If-None-Match matched." })),
                ("404", error_body("unknown_artifact.")),
                ("416", error_body("range_not_satisfiable; Content-Range: bytes */LENGTH.")),
            ]))
        }
    }));
    map.insert("/v1/models/{model}/versions/{version}/promote".into(), json!({
        "parameters": [model.clone(), version.clone()],
        "post": stage_operation(
            "Promote a version to production for a group",
            "Operators only. Archives the group's previous production version in the same transaction.",
            "Promotion"),
    }));
    map.insert(
        "/v1/models/{model}/versions/{version}/archive".into(),
        json!({
            "parameters": [model, version],
            "post": stage_operation("Archive a version", "Operators only.", "ModelVersion"),
        }),
    );
    map
}

fn string(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

fn schemas() -> serde_json::Map<String, Value> {
    let int = |description: &str| json!({ "type": "integer", "format": "int64", "description": description });
    let model_version = json!({
        "type": "object",
        "description": "A registered model version in one device group.",
        "properties": {
            "name": string("Model name."),
            "version": string("MAJOR.MINOR.PATCH."),
            "group": string("Device group."),
            "stage": { "enum": ["staging", "production", "archived"] },
            "sha256": string("sha256 of the artifact (lowercase hex)."),
            "model_sha256": string("sha256 of model.onnx."),
            "size_bytes": { "type": "integer", "minimum": 0, "format": "uint64" },
            "signature": string("ed25519 signature (hex) of \"edge-model-artifact-v1:\" + sha256."),
            "key_id": string("Signing key id: 16 hex digits of sha256(public key)."),
            "created_ms": int("Registered (Unix ms)."),
            "stage_changed_ms": int("Last stage change (Unix ms)."),
            "training_run": { "type": ["string", "null"] },
            "dataset": { "type": ["string", "null"] },
            "artifact_url": string("Path of the artifact download.")
        },
        "required": ["name", "version", "group", "stage", "sha256", "model_sha256", "size_bytes",
                     "signature", "key_id", "created_ms", "stage_changed_ms", "training_run",
                     "dataset", "artifact_url"],
        "additionalProperties": false
    });
    let mut map = serde_json::Map::new();
    map.insert("ModelVersion".into(), model_version);
    map.insert("Promotion".into(), json!({
        "type": "object",
        "properties": {
            "promoted": reference("schemas", "ModelVersion"),
            "archived": { "type": ["string", "null"], "description": "Version it replaced, now archived." }
        },
        "required": ["promoted", "archived"],
        "additionalProperties": false
    }));
    map.insert(
        "StageChange".into(),
        json!({
            "type": "object",
            "properties": { "group": { "type": ["string", "null"] } },
            "additionalProperties": false
        }),
    );
    map
}

/// Adds the registry's paths and schemas to an OpenAPI document.
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
