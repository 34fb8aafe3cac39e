//! The registry's part of the OpenAPI document (`/openapi.json`): its
//! operations (production, deployment, artifacts, promote, archive, rollout
//! view, rollout reports) and their schemas. [`extend`] adds them to the
//! document [`crate::openapi::document`] builds.

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
            "parameters": [model.clone(), version],
            "post": stage_operation("Archive a version", "Operators only. Refused (409 rollout_in_progress) while an active rollout involves the version.", "ModelVersion"),
        }),
    );
    let group_query = json!({ "name": "group", "in": "query", "required": false,
        "description": format!("Device group (default {DEFAULT_GROUP:?}); a device's server-side assignment takes precedence."),
        "schema": { "type": "string" } });
    map.insert("/v1/models/{model}/deployment".into(), json!({
        "parameters": [model.clone()],
        "get": {
            "summary": "What this device should run for a model",
            "description": "Any device or operator credential. The group is the device's server-side assignment, else `group`, else \"default\". During an active staged rollout, devices whose canary bucket (FNV-1a 64 of device, model and version separated by NUL bytes, modulo 100) is below the rollout's percent get the new version, the others the production version; after a halt or a rollback every device gets the previous version with `downgrade: true`. Operators get the device-less view (a device outside every partial canary). ETag over the body; If-None-Match gets a bodiless 304.",
            "security": [{ "bearerAuth": [] }, { "mutualTLS": [] }],
            "parameters": [
                group_query.clone(),
                { "name": "If-None-Match", "in": "header", "required": false,
                  "schema": { "type": "string" } }
            ],
            "responses": Value::Object(errors(&[
                ("200", json!({
                    "description": "The deployment; ETag header set.",
                    "headers": { "ETag": { "schema": { "type": "string" } } },
                    "content": { "application/json": { "schema": reference("schemas", "Deployment") } }
                })),
                ("304", json!({ "description": "Unchanged since the ETag sent." })),
                ("404", error_body("no_production_version for that model and the device's group.")),
            ]))
        }
    }));
    map.insert("/v1/models/{model}/rollouts".into(), json!({
        "parameters": [model],
        "get": {
            "summary": "Rollout state of a model in a group",
            "description": "Operators only. The latest rollout (current or last), devices per reported event on its version, the shadow target and recent rollback and refusal reasons.",
            "security": [{ "bearerAuth": [] }],
            "parameters": [group_query.clone()],
            "responses": Value::Object(errors(&[
                ("200", json_body("RolloutOverview", "The rollout view.")),
            ]))
        }
    }));
    map.insert("/v1/rollout/reports".into(), json!({
        "post": {
            "summary": "Report what a device did with a version",
            "description": "Devices only (operators get 403). Idempotent per (device, model, version, event): a repeated report updates its reason, time and shadow summary and is never counted twice. The report counts towards the rollout of that version in the device's group (its assignment, else `group`, else the only group the version is registered in, else \"default\"); the rollout halts once more than its halt_share of the reporting devices rolled the version back (a device reporting both adopted and rolled_back counts as rolled back).",
            "security": [{ "bearerAuth": [] }, { "mutualTLS": [] }],
            "parameters": [group_query],
            "requestBody": {
                "required": true,
                "content": { "application/json": { "schema": reference("schemas", "RolloutReport") } }
            },
            "responses": Value::Object(errors(&[
                ("200", json_body("RolloutReportAck", "Stored.")),
                ("404", error_body("unknown_version: the model version is registered in no group.")),
                ("413", reference("responses", "PayloadTooLarge")),
                ("415", reference("responses", "UnsupportedMediaType")),
            ]))
        }
    }));
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
            "archived": { "type": ["string", "null"], "description": "Version it replaced, now archived." },
            "rollout": { "oneOf": [reference("schemas", "RolloutStatus"), { "type": "null" }],
                "description": "The staged rollout this promotion started, if any." }
        },
        "required": ["promoted", "archived"],
        "additionalProperties": false
    }));
    map.insert(
        "StageChange".into(),
        json!({
            "type": "object",
            "properties": {
                "group": { "type": ["string", "null"] },
                "percent": { "type": ["integer", "null"], "minimum": 1, "maximum": 100,
                    "description": "Promote only: share of the group's devices (default 100); below 100 with a production version in place, starts a staged rollout." },
                "halt_share": { "type": ["number", "null"], "minimum": 0, "maximum": 1,
                    "description": "Promote only: halt once more than this share of reporting devices rolled back (default 0.5)." }
            },
            "additionalProperties": false
        }),
    );
    map.insert("RolloutStatus".into(), json!({
        "type": "object",
        "description": "A staged rollout of one version within one (model, group).",
        "properties": {
            "name": string("Model name."),
            "group": string("Device group."),
            "version": string("Version rolled out."),
            "previous": { "type": ["string", "null"], "description": "Production version the other devices keep." },
            "percent": { "type": "integer", "minimum": 0, "maximum": 100 },
            "state": { "enum": ["active", "halted", "complete"] },
            "halt_share": { "type": "number", "minimum": 0, "maximum": 1 },
            "adopted": { "type": "integer", "minimum": 0 },
            "rolled_back": { "type": "integer", "minimum": 0 }
        },
        "required": ["name", "group", "version", "previous", "percent", "state", "halt_share",
                     "adopted", "rolled_back"],
        "additionalProperties": false
    }));
    map.insert("Deployment".into(), json!({
        "type": "object",
        "description": "What one device should run for one model.",
        "properties": {
            "group": string("The group resolved for the device."),
            "active": reference("schemas", "ModelVersion"),
            "shadow": { "oneOf": [reference("schemas", "ModelVersion"), { "type": "null" }] },
            "downgrade": { "type": "boolean", "description": "The device is directed to an older version (halted rollout or rollback)." },
            "rollout": { "oneOf": [reference("schemas", "RolloutStatus"), { "type": "null" }] }
        },
        "required": ["group", "active"],
        "additionalProperties": false
    }));
    map.insert("ShadowSummary".into(), json!({
        "type": "object",
        "properties": {
            "windows": { "type": "integer", "minimum": 0 },
            "mean_abs_diff": { "type": "number" },
            "max_abs_diff": { "type": "number" },
            "agreement": { "type": "number", "minimum": 0, "maximum": 1 },
            "candidate_errors": { "type": "integer", "minimum": 0 }
        },
        "required": ["windows", "mean_abs_diff", "max_abs_diff", "agreement", "candidate_errors"],
        "additionalProperties": false
    }));
    map.insert(
        "RolloutReport".into(),
        json!({
            "type": "object",
            "properties": {
                "model": string("Model name."),
                "version": string("Version the event is about."),
                "sha256": { "type": ["string", "null"] },
                "event": { "enum": ["adopted", "rolled_back", "refused", "shadow"] },
                "reason": { "type": ["string", "null"], "description": "At most 4096 bytes." },
                "at_ms": int("When it happened on the device (Unix ms)."),
                "shadow": { "oneOf": [reference("schemas", "ShadowSummary"), { "type": "null" }] }
            },
            "required": ["model", "version", "sha256", "event", "reason", "at_ms", "shadow"],
            "additionalProperties": false
        }),
    );
    map.insert(
        "RolloutReportAck".into(),
        json!({
            "type": "object",
            "properties": {
                "rollout": { "oneOf": [reference("schemas", "RolloutStatus"), { "type": "null" }] }
            },
            "required": ["rollout"],
            "additionalProperties": false
        }),
    );
    map.insert("RolloutOverview".into(), json!({
        "type": "object",
        "properties": {
            "name": string("Model name."),
            "group": string("Device group."),
            "production": { "type": ["string", "null"] },
            "rollout": { "oneOf": [reference("schemas", "RolloutStatus"), { "type": "null" }] },
            "events": { "type": "object", "description": "Devices per reported event.",
                "additionalProperties": { "type": "integer", "minimum": 0 } },
            "shadow": { "oneOf": [{
                "type": "object",
                "properties": { "version": { "type": "string" }, "percent": { "type": "integer", "minimum": 1, "maximum": 100 } },
                "required": ["version", "percent"], "additionalProperties": false
            }, { "type": "null" }] },
            "recent_reasons": { "type": "array", "items": {
                "type": "object",
                "properties": {
                    "device": { "type": "string" }, "version": { "type": "string" },
                    "event": { "enum": ["adopted", "rolled_back", "refused", "shadow"] },
                    "reason": { "type": "string" }, "at_ms": { "type": "integer" }
                },
                "required": ["device", "version", "event", "reason", "at_ms"],
                "additionalProperties": false
            } }
        },
        "required": ["name", "group", "production", "rollout", "events", "shadow", "recent_reasons"],
        "additionalProperties": false
    }));
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
