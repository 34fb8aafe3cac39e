//! The drift part of the OpenAPI document (`/openapi.json`): its three
//! operations and the `DriftSummary`, `DriftAck`, `FleetDrift` and
//! `FleetAlert` schemas. [`extend`] adds them to the document
//! [`crate::openapi::document`] builds.

use serde_json::{Value, json};

fn reference(kind: &str, name: &str) -> Value {
    json!({ "$ref": format!("#/components/{kind}/{name}") })
}

fn json_body(schema: Value, description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
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
        json_body(
            reference("schemas", "ErrorBody"),
            "drift_unavailable: the server runs without drift storage.",
        ),
    );
    for (status, value) in extra {
        map.insert((*status).into(), value.clone());
    }
    Value::Object(map)
}

fn since() -> Value {
    json!({ "name": "since_ms", "in": "query", "required": false,
            "description": "Only windows starting at or after this time (Unix ms; default 0).",
            "schema": { "type": "integer", "format": "int64" } })
}

fn paths() -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("/v1/devices/{device}/drift".into(), json!({
        "parameters": [{ "name": "device", "in": "path", "required": true,
                         "description": "The device's id; must be the authenticated device.",
                         "schema": { "type": "string" } }],
        "post": {
            "summary": "Store one drift summary (idempotent per device, model and window start)",
            "description": "Device credentials only; another device's path is 403. A re-posted window is acknowledged with stored = false and changes nothing. Storing may raise a fleet alert (see docs/drift.md).",
            "security": [{ "bearerAuth": [] }, { "mutualTLS": [] }],
            "requestBody": { "required": true,
                "content": { "application/json": { "schema": reference("schemas", "DriftSummary") } } },
            "responses": responses(&[
                ("200", json_body(reference("schemas", "DriftAck"), "Stored, or already stored.")),
                ("413", reference("responses", "PayloadTooLarge")),
                ("415", reference("responses", "UnsupportedMediaType")),
                ("422", json_body(reference("schemas", "ErrorBody"), "invalid_summary: names, window or statistics out of range.")),
            ])
        }
    }));
    map.insert("/v1/models/{model}/drift".into(), json!({
        "parameters": [{ "name": "model", "in": "path", "required": true,
                         "description": "Model name.", "schema": { "type": "string" } }],
        "get": {
            "summary": "A model's drift across the fleet",
            "description": "Operators only. Devices reporting and alerting, and per feature the mean PSI and mean shift of the summaries that judged it.",
            "security": [{ "bearerAuth": [] }],
            "parameters": [since()],
            "responses": responses(&[
                ("200", json_body(reference("schemas", "FleetDrift"), "The fleet view.")),
            ])
        }
    }));
    map.insert("/v1/alerts".into(), json!({
        "get": {
            "summary": "Fleet drift alerts (the retraining hook)",
            "description": "Operators only. Oldest fleet window first.",
            "security": [{ "bearerAuth": [] }],
            "parameters": [since()],
            "responses": responses(&[
                ("200", json_body(json!({ "type": "array", "items": reference("schemas", "FleetAlert") }), "The alerts.")),
            ])
        }
    }));
    map
}

fn schemas() -> serde_json::Map<String, Value> {
    let int = |d: &str| json!({ "type": "integer", "format": "int64", "description": d });
    let count =
        |d: &str| json!({ "type": "integer", "minimum": 0, "format": "uint64", "description": d });
    let num = |d: &str| json!({ "type": ["number", "null"], "description": d });
    let s = |d: &str| json!({ "type": "string", "description": d });
    let strings =
        |d: &str| json!({ "type": "array", "items": { "type": "string" }, "description": d });
    let mut map = serde_json::Map::new();
    map.insert("FeatureDrift".into(), json!({
        "type": "object",
        "properties": {
            "stream": s("Stream."), "field": s("Field."),
            "count": count("Finite values in the window."),
            "missing": count("Missing or non-finite values in the window."),
            "mean": num("Window mean."), "std": num("Window population std."),
            "min": num("Window minimum."), "max": num("Window maximum."),
            "horizon_count": count("Values the judgement covers."),
            "psi": num("PSI over the horizon (8 bins at mean + k*std, k = -3..3)."),
            "mean_shift": num("(horizon mean - baseline mean) / baseline std.")
        },
        "required": ["stream", "field", "count", "mean", "std", "min", "max", "horizon_count", "psi", "mean_shift"],
        "additionalProperties": false
    }));
    map.insert(
        "ScoreStats".into(),
        json!({
            "type": "object",
            "properties": {
                "count": count("Windows scored."),
                "over_p99_share": num("Share of scores over the baseline score_p99."),
                "anomaly_share": num("Share of scores flagged anomalous."),
                "median": num("Approximate median score."),
                "baseline_p50": num("The baseline's score_p50.")
            },
            "required": ["count", "over_p99_share", "anomaly_share", "median", "baseline_p50"],
            "additionalProperties": false
        }),
    );
    map.insert("DriftSummary".into(), json!({
        "type": "object",
        "description": "One model's inputs and scores on one device over one window.",
        "properties": {
            "model": s("Model name."), "version": s("Model version."),
            "window_start_ms": int("Window start, device clock (Unix ms)."),
            "window_end_ms": int("Window end, device clock (Unix ms)."),
            "features": { "type": "array", "items": reference("schemas", "FeatureDrift") },
            "scores": reference("schemas", "ScoreStats"),
            "stale": strings("source/stream sensors silent while others report."),
            "nan_skipped": count("Windows not scored for a missing value."),
            "gap_resets": count("Windows restarted by a gap."),
            "alert": { "type": "boolean" },
            "reasons": strings("Why it alerted.")
        },
        "required": ["model", "version", "window_start_ms", "window_end_ms", "features", "scores", "alert"],
        "additionalProperties": false
    }));
    map.insert(
        "DriftAck".into(),
        json!({
            "type": "object",
            "properties": { "stored": { "type": "boolean", "description": "False for a replay." } },
            "required": ["stored"],
            "additionalProperties": false
        }),
    );
    map.insert(
        "FleetFeature".into(),
        json!({
            "type": "object",
            "properties": {
                "stream": s("Stream."), "field": s("Field."),
                "mean_psi": num("Mean PSI."), "mean_shift": num("Mean of the mean shifts."),
                "summaries": count("Summaries that judged it.")
            },
            "required": ["stream", "field", "mean_psi", "mean_shift", "summaries"],
            "additionalProperties": false
        }),
    );
    map.insert("FleetDrift".into(), json!({
        "type": "object",
        "properties": {
            "model": s("Model name."),
            "since_ms": int("Lower bound of window starts."),
            "summaries": count("Summaries included."),
            "devices_reporting": count("Devices that reported."),
            "devices_alerting": count("Devices with an alerting summary."),
            "features": { "type": "array", "items": reference("schemas", "FleetFeature") }
        },
        "required": ["model", "since_ms", "summaries", "devices_reporting", "devices_alerting", "features"],
        "additionalProperties": false
    }));
    map.insert("FleetAlert".into(), json!({
        "type": "object",
        "properties": {
            "model": s("Model name."),
            "window_start_ms": int("Fleet window start (Unix ms)."),
            "devices_reporting": count("Devices reporting the model."),
            "devices_alerting": count("Devices alerting in the window."),
            "raised_ms": int("When it was raised (Unix ms).")
        },
        "required": ["model", "window_start_ms", "devices_reporting", "devices_alerting", "raised_ms"],
        "additionalProperties": false
    }));
    map
}

/// Adds the drift paths and schemas to an OpenAPI document.
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
