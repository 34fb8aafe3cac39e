//! The datasets' part of the OpenAPI document (`/openapi.json`): snapshot,
//! list and manifest operations and their schemas. [`extend`] adds them to
//! the document [`crate::openapi::document`] builds.

use serde_json::{Value, json};

fn reference(kind: &str, name: &str) -> Value {
    json!({ "$ref": format!("#/components/{kind}/{name}") })
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

fn responses(extra: &[(&str, Value)]) -> Value {
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
        error_body("datasets_unavailable: the server runs without a dataset store."),
    );
    for (status, value) in extra {
        map.insert((*status).into(), value.clone());
    }
    Value::Object(map)
}

fn paths() -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("/v1/datasets".into(), json!({
        "post": {
            "summary": "Snapshot readings and predictions into a versioned dataset",
            "description": "Operators only. Freezes the readings of the devices and streams selected, received in [from_ms, to_ms), and the predictions of those devices on those streams created in that window, into Parquet files and a manifest (docs/datasets.md). The id is a content hash: the same selection over the same data returns the same id (200) without writing anything.",
            "security": [{ "bearerAuth": [] }],
            "requestBody": {
                "required": true,
                "content": { "application/json": { "schema": reference("schemas", "SnapshotRequest") } }
            },
            "responses": responses(&[
                ("201", json_body("DatasetManifest", "Snapshot stored.")),
                ("200", json_body("DatasetManifest", "Identical content was already registered; nothing written.")),
                ("413", reference("responses", "PayloadTooLarge")),
                ("415", reference("responses", "UnsupportedMediaType")),
                ("422", error_body("empty_selection: nothing matches the selection; nothing written.")),
            ])
        },
        "get": {
            "summary": "Every registered dataset, oldest first",
            "description": "Operators only.",
            "security": [{ "bearerAuth": [] }],
            "responses": responses(&[("200", json_body("DatasetList", "The datasets."))])
        }
    }));
    map.insert("/v1/datasets/{id}".into(), json!({
        "parameters": [{ "name": "id", "in": "path", "required": true,
            "description": "Dataset id (sha256, 64 hex digits).", "schema": { "type": "string" } }],
        "get": {
            "summary": "The manifest of a dataset",
            "description": "Operators only. The manifest is checked against its id before it is returned.",
            "security": [{ "bearerAuth": [] }],
            "responses": responses(&[
                ("200", json_body("DatasetManifest", "The manifest.")),
                ("404", error_body("unknown_dataset: no dataset with this id.")),
            ])
        }
    }));
    map
}

fn strings() -> Value {
    json!({ "type": "array", "items": { "type": "string" } })
}

fn int() -> Value {
    json!({ "type": "integer", "format": "int64" })
}

fn count() -> Value {
    json!({ "type": "integer", "minimum": 0, "format": "uint64" })
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({ "type": "object", "properties": properties, "required": required,
            "additionalProperties": false })
}

fn spans() -> Value {
    json!({ "type": "array", "items": object(
        json!({ "first": count(), "last": count() }), &["first", "last"]) })
}

fn schemas() -> serde_json::Map<String, Value> {
    let selection = json!({ "streams": strings(), "devices": strings(),
        "from_ms": int(), "to_ms": int() });
    let mut request = selection.clone();
    if let Some(map) = request.as_object_mut() {
        map.insert("name".into(), json!({ "type": ["string", "null"] }));
    }
    let column = object(
        json!({ "name": { "type": "string" }, "type": { "type": "string" },
                "nullable": { "type": "boolean" } }),
        &["name", "type", "nullable"],
    );
    let file = object(
        json!({ "table": { "type": "string", "enum": ["readings", "predictions"] },
                "path": { "type": "string" }, "sha256": { "type": "string" },
                "bytes": count(), "rows": count(), "records": count(),
                "columns": { "type": "array", "items": column } }),
        &[
            "table", "path", "sha256", "bytes", "rows", "records", "columns",
        ],
    );
    let reading_lineage = object(
        json!({ "device": { "type": "string" }, "source": { "type": "string" },
                "stream": { "type": "string" }, "records": count(), "ranges": spans() }),
        &["device", "source", "stream", "records", "ranges"],
    );
    let prediction_lineage = object(
        json!({ "device": { "type": "string" }, "model": { "type": "string" },
                "records": count(), "ranges": spans() }),
        &["device", "model", "records", "ranges"],
    );
    let content = object(
        json!({
            "format": { "type": "integer", "minimum": 1, "maximum": super::FORMAT_VERSION },
            "selection": object(selection, &["streams", "devices", "from_ms", "to_ms"]),
            "files": { "type": "array", "items": file },
            "lineage": object(json!({
                "readings": { "type": "array", "items": reading_lineage },
                "predictions": { "type": "array", "items": prediction_lineage }
            }), &["readings", "predictions"])
        }),
        &["format", "selection", "files", "lineage"],
    );
    let mut map = serde_json::Map::new();
    map.insert(
        "SnapshotRequest".into(),
        object(request, &["streams", "devices", "from_ms", "to_ms"]),
    );
    map.insert(
        "DatasetManifest".into(),
        object(
            json!({ "id": { "type": "string", "description": "sha256 of the content (hex)." },
                    "name": { "type": ["string", "null"] }, "created_ms": int(),
                    "content": content }),
            &["id", "name", "created_ms", "content"],
        ),
    );
    map.insert(
        "DatasetList".into(),
        object(
            json!({ "datasets": { "type": "array", "items": reference("schemas", "DatasetManifest") } }),
            &["datasets"],
        ),
    );
    map
}

/// Adds the dataset operations and schemas to `document`.
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
