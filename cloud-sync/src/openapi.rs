//! The OpenAPI 3.1 document of the API, served at `GET /openapi.json`.
//!
//! Hand-written (no derive machinery in the protocol crate, so the agent
//! pays nothing for it). Invariant, checked by the integration tests: the
//! document lists exactly the routes [`crate::api::routes`] serves, and its
//! schemas accept the bodies the server really sends and receives (they
//! follow the `sync_protocol` types field by field, unknown fields refused).

use serde_json::{Value, json};
use sync_protocol::codec::{
    MEDIA_TYPE as COMPACT_MEDIA_TYPE, MEDIA_TYPE_V1 as COMPACT_V1_MEDIA_TYPE,
    MEDIA_TYPE_V2 as COMPACT_V2_MEDIA_TYPE,
};
use sync_protocol::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};

/// `$ref` to a component schema.
fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// `$ref` to a component response.
fn response(name: &str) -> Value {
    json!({ "$ref": format!("#/components/responses/{name}") })
}

fn json_body(name: &str, description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": schema(name) } }
    })
}

/// An object schema: every property required unless listed in `optional`,
/// nothing else allowed.
fn object(description: &str, properties: Value, optional: &[&str]) -> Value {
    let required: Vec<&String> = properties
        .as_object()
        .map(|props| {
            props
                .keys()
                .filter(|key| !optional.contains(&key.as_str()))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "type": "object",
        "description": description,
        "properties": properties,
        "required": required,
        "additionalProperties": false
    })
}

fn u64_() -> Value {
    json!({ "type": "integer", "minimum": 0, "format": "uint64" })
}

fn seq() -> Value {
    json!({ "type": "integer", "minimum": 1, "maximum": i64::MAX, "format": "int64" })
}

fn i64_(description: &str) -> Value {
    json!({ "type": "integer", "format": "int64", "description": description })
}

fn nullable_i64(description: &str) -> Value {
    json!({ "type": ["integer", "null"], "format": "int64", "description": description })
}

fn string(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

fn name(description: &str) -> Value {
    json!({ "type": "string", "minLength": 1, "description": description })
}

fn array(items: Value) -> Value {
    json!({ "type": "array", "items": items })
}

fn nullable(name_: &str) -> Value {
    json!({ "oneOf": [schema(name_), { "type": "null" }] })
}

fn cursor_page(list: &str, item: &str, order: &str) -> Value {
    object(
        &format!("One page of stored {list}, ordered by {order}."),
        json!({
            "device": string("Device id."),
            list: array(schema(item)),
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Opaque cursor for the next page; null on the last page."
            }
        }),
        &[],
    )
}

fn schemas() -> Value {
    json!({
        "Reading": object("One sensor reading as stored by the agent.", json!({
            "source": name("Sensor device the reading came from."),
            "stream": name("Stream name within the sensor."),
            "seq": seq(),
            "device_ts_ms": nullable_i64("Timestamp in the payload (Unix ms), if any."),
            "recv_ts_ms": i64_("When the agent received it (Unix ms)."),
            "clock_ok": { "type": "boolean" },
            "values": {
                "type": "object",
                "additionalProperties": { "type": "number" },
                "description": "Named finite numbers."
            }
        }), &[]),
        "Prediction": object("One model output for one feature window.", json!({
            "model": name("Model package name."),
            "model_version": string("Model package version (semver)."),
            "model_sha256": string("sha256 of the ONNX file."),
            "seq": seq(),
            "source": name("Sensor the window was built from."),
            "stream": name("Stream the window was built from."),
            "window_end_seq": { "type": "integer", "minimum": 0, "maximum": i64::MAX },
            "window_end_ts_ms": nullable_i64("Device timestamp of the window's last reading."),
            "score": { "type": "number" },
            "threshold": { "type": "number" },
            "is_anomaly": { "type": "boolean" },
            "created_ms": i64_("When the agent made it (Unix ms)."),
            "label": string("Class label of a classifier; absent for anomaly scores."),
            "probabilities": {
                "type": "array",
                "items": { "type": "number" },
                "description": "Per-class probabilities in the package's label order; absent when none."
            }
        }), &["label", "probabilities"]),
        "DeadLetterRecord": object("A message the agent could not turn into readings.", json!({
            "seq": seq(),
            "topic": string("MQTT topic."),
            "reason": string("oversized, unmatched_topic, malformed, wrong_type, non_finite or empty."),
            "detail": string("Decoder detail."),
            "payload_b64": string("The payload's first bytes, base64."),
            "payload_len": { "type": "integer", "minimum": 0, "maximum": i64::MAX },
            "recv_ts_ms": i64_("When the agent received it (Unix ms).")
        }), &[]),
        "UploadBatch": object("Body of a batch upload (JSON form).", json!({
            "readings": array(schema("Reading")),
            "predictions": array(schema("Prediction")),
            "dead_letters": array(schema("DeadLetterRecord"))
        }), &["dead_letters"]),
        "CompactBatch": {
            "type": "string",
            "format": "binary",
            "contentMediaType": COMPACT_MEDIA_TYPE,
            "description": "An UploadBatch in the compact binary layout (sync_protocol::codec, version 3)."
        },
        "CompactBatchV2": {
            "type": "string",
            "format": "binary",
            "contentMediaType": COMPACT_V2_MEDIA_TYPE,
            "description": "An UploadBatch in the compact binary layout version 2 (sync_protocol::codec; no prediction labels), still accepted from older agents."
        },
        "CompactBatchV1": {
            "type": "string",
            "format": "binary",
            "contentMediaType": COMPACT_V1_MEDIA_TYPE,
            "description": "An UploadBatch in the compact binary layout version 1 (sync_protocol::codec), still accepted from older agents."
        },
        "SeqRange": object("Inclusive range of sequence numbers.", json!({
            "key": string("source/stream, model name, or dead_letters."),
            "first": u64_(),
            "last": u64_()
        }), &[]),
        "UploadAck": object("Everything in the batch is durably stored.", json!({
            "readings_inserted": u64_(),
            "readings_duplicate": u64_(),
            "predictions_inserted": u64_(),
            "predictions_duplicate": u64_(),
            "readings": array(schema("SeqRange")),
            "predictions": array(schema("SeqRange")),
            "dead_letters_inserted": u64_(),
            "dead_letters_duplicate": u64_(),
            "dead_letters": array(schema("SeqRange"))
        }), &[]),
        "ActiveModel": object("A model the agent serves.", json!({
            "name": string("Package name."),
            "version": string("Package version."),
            "sha256": string("sha256 of its ONNX file.")
        }), &[]),
        "Backlog": object("What the agent holds that the cloud does not have yet.", json!({
            "readings": u64_(),
            "predictions": u64_(),
            "dead_letters": u64_(),
            "bytes": u64_(),
            "quota_bytes": u64_(),
            "oldest_unsynced_age_ms": { "type": ["integer", "null"], "minimum": 0 }
        }), &[]),
        "Heartbeat": object("The agent's state, sent periodically.", json!({
            "agent_version": string("edge-agent version."),
            "sent_ms": i64_("Agent clock when sent (Unix ms)."),
            "started_ms": i64_("Agent clock at process start (Unix ms)."),
            "models": array(schema("ActiveModel")),
            "backlog": schema("Backlog"),
            "clock_offset_ms": nullable_i64("Agent clock minus cloud clock."),
            "clock_suspect_readings": u64_(),
            "counters": { "type": "object", "additionalProperties": u64_() }
        }), &[]),
        "HeartbeatAck": object("Response to a heartbeat.", json!({
            "server_ms": i64_("Cloud clock when stored (Unix ms).")
        }), &[]),
        "StreamSummary": object("Totals for one stream or model.", json!({
            "key": string("source/stream or model name."),
            "rows": u64_(),
            "min_seq": u64_(),
            "max_seq": u64_()
        }), &[]),
        "DeviceSummary": object("Totals stored for one device.", json!({
            "device": string("Device id."),
            "readings": array(schema("StreamSummary")),
            "predictions": array(schema("StreamSummary")),
            "anomalies": u64_()
        }), &[]),
        "StoredReading": object("A reading as stored.", json!({
            "stored_ms": i64_("Cloud clock when stored."),
            "reading": schema("Reading")
        }), &[]),
        "StoredPrediction": object("A prediction as stored.", json!({
            "stored_ms": i64_("Cloud clock when stored."),
            "prediction": schema("Prediction")
        }), &[]),
        "StoredDeadLetter": object("A dead letter as stored.", json!({
            "stored_ms": i64_("Cloud clock when stored."),
            "dead_letter": schema("DeadLetterRecord")
        }), &[]),
        "StoredHeartbeat": object("A heartbeat as stored.", json!({
            "received_ms": i64_("Cloud clock when received."),
            "heartbeat": schema("Heartbeat")
        }), &[]),
        "ReadingsPage": cursor_page("readings", "StoredReading", "recv_ts_ms, source, stream, seq"),
        "PredictionsPage": cursor_page("predictions", "StoredPrediction", "created_ms, model, seq"),
        "DeadLettersPage": cursor_page("dead_letters", "StoredDeadLetter", "recv_ts_ms, seq"),
        "HeartbeatsPage": cursor_page("heartbeats", "StoredHeartbeat", "received_ms, then arrival"),
        "FleetDevice": object("One device of the fleet.", json!({
            "device": string("Device id."),
            "revoked": { "type": "boolean" },
            "created_ms": i64_("When registered."),
            "last_seen_ms": nullable_i64("Last batch row or heartbeat stored."),
            "last_heartbeat_ms": nullable_i64("When the last heartbeat arrived."),
            "agent_version": { "type": ["string", "null"] },
            "backlog": nullable("Backlog"),
            "models": array(schema("ActiveModel")),
            "readings": u64_(),
            "predictions": u64_(),
            "dead_letters": u64_(),
            "heartbeats": u64_()
        }), &[]),
        "FleetSummary": object("One page of the registered devices, in id order (byte order).", json!({
            "server_ms": i64_("Cloud clock when taken."),
            "devices": array(schema("FleetDevice")),
            "next_cursor": { "type": ["string", "null"], "description": "Cursor of the next page; null on the last page." }
        }), &[]),
        "ErrorBody": object("Body of every error response.", json!({
            "code": string("Stable machine-readable code."),
            "message": string("Human-readable explanation.")
        }), &[])
    })
}

fn error(description: &str) -> Value {
    json_body("ErrorBody", description)
}

fn responses() -> Value {
    json!({
        "BadRequest": error("malformed_json, malformed_batch, bad_compression, invalid_batch, bad_body, bad_path or bad_query."),
        "Unauthorized": {
            "description": "missing_token, malformed_token, invalid_token or invalid_certificate (unknown and revoked credentials look the same).",
            "headers": { "WWW-Authenticate": { "schema": { "type": "string" } } },
            "content": { "application/json": { "schema": schema("ErrorBody") } }
        },
        "Forbidden": error("forbidden: another device's path, an operator on an upload route, or a device on an operator route."),
        "NotFound": error("not_found (no such route) or unknown_device (operators reading an unregistered device)."),
        "MethodNotAllowed": error("method_not_allowed."),
        "Timeout": error("timeout: not completed within request_timeout_secs."),
        "PayloadTooLarge": error("payload_too_large: raw or decompressed body over max_body_bytes."),
        "UnsupportedMediaType": {
            "description": "unsupported_encoding (Content-Encoding other than zstd/identity) or unsupported_media_type (Content-Type not accepted here).",
            "headers": {
                "Accept-Encoding": { "schema": { "type": "string" } },
                "Accept-Post": { "schema": { "type": "string" } }
            },
            "content": { "application/json": { "schema": schema("ErrorBody") } }
        },
        "ServerError": error("storage_error or internal_error (details are logged, not sent)."),
        "NotReady": error("not_ready: the store does not answer.")
    })
}

fn common_errors(extra: &[(&str, &str)]) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    for (status, name) in [
        ("400", "BadRequest"),
        ("401", "Unauthorized"),
        ("403", "Forbidden"),
        ("404", "NotFound"),
        ("405", "MethodNotAllowed"),
        ("408", "Timeout"),
        ("500", "ServerError"),
    ]
    .iter()
    .chain(extra)
    {
        map.insert((*status).to_owned(), response(name));
    }
    map
}

fn device_parameter() -> Value {
    json!({
        "name": "device",
        "in": "path",
        "required": true,
        "description": "Device id: 1-128 characters from [A-Za-z0-9._-].",
        "schema": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$" }
    })
}

fn content_encoding_parameter() -> Value {
    json!({
        "name": "Content-Encoding",
        "in": "header",
        "required": false,
        "description": "zstd (decompressed at most up to max_body_bytes) or identity.",
        "schema": { "type": "string", "enum": ["zstd", "identity"] }
    })
}

/// `limit` and `cursor`, the parameters of every paged read.
fn page_parameters() -> Vec<Value> {
    vec![
        json!({ "name": "limit", "in": "query", "required": false,
            "description": format!("Rows per page (default {DEFAULT_PAGE_LIMIT})."),
            "schema": { "type": "integer", "minimum": 1, "maximum": MAX_PAGE_LIMIT } }),
        json!({ "name": "cursor", "in": "query", "required": false,
            "description": "next_cursor of the previous page.",
            "schema": { "type": "string" } }),
    ]
}

fn query_parameters(filters: &[&str]) -> Vec<Value> {
    let mut params = vec![
        json!({ "name": "from_ms", "in": "query", "required": false,
                "description": "Only rows at or after this time (Unix ms).",
                "schema": { "type": "integer", "format": "int64" } }),
        json!({ "name": "to_ms", "in": "query", "required": false,
                "description": "Only rows before this time (Unix ms, exclusive).",
                "schema": { "type": "integer", "format": "int64" } }),
    ];
    for filter in filters {
        params.push(json!({ "name": filter, "in": "query", "required": false,
                "description": format!("Only rows with this {filter}."),
                "schema": { "type": "string" } }));
    }
    params.extend(page_parameters());
    params
}

/// Device credentials: a device's bearer token or client certificate, or
/// an operator's token (reads only).
fn device_security() -> Value {
    json!([{ "bearerAuth": [] }, { "mutualTLS": [] }])
}

fn read_operation(summary: &str, page: &str, filters: &[&str]) -> Value {
    json!({
        "summary": summary,
        "description": "Readable by the device itself or by any operator. Keyset-paginated: follow next_cursor; rows inserted meanwhile never make a page repeat or skip an older row.",
        "security": device_security(),
        "parameters": query_parameters(filters),
        "responses": Value::Object({
            let mut map = common_errors(&[]);
            map.insert("200".into(), json_body(page, "One page."));
            map
        })
    })
}

fn paths() -> Value {
    let device = "/v1/devices/{device}";
    let mut upload_errors =
        common_errors(&[("413", "PayloadTooLarge"), ("415", "UnsupportedMediaType")]);
    upload_errors.insert(
        "200".into(),
        json_body("UploadAck", "Stored (inserted now or already present)."),
    );
    let mut heartbeat_errors =
        common_errors(&[("413", "PayloadTooLarge"), ("415", "UnsupportedMediaType")]);
    heartbeat_errors.insert(
        "200".into(),
        json_body("HeartbeatAck", "Stored as a new sample."),
    );
    let mut summary_responses = common_errors(&[]);
    summary_responses.insert("200".into(), json_body("DeviceSummary", "Totals."));
    let mut fleet_responses = common_errors(&[]);
    fleet_responses.insert("200".into(), json_body("FleetSummary", "Every device."));
    json!({
        format!("{device}/batches"): {
            "parameters": [device_parameter()],
            "post": {
                "summary": "Upload a batch of readings, predictions and dead letters",
                "description": "Stored exactly once per (device, source, stream, seq), (device, model, seq) and (device, seq); replays count as duplicates. Device credentials only; operators get 403.",
                "security": device_security(),
                "parameters": [content_encoding_parameter()],
                "requestBody": {
                    "required": true,
                    "content": {
                        "application/json": { "schema": schema("UploadBatch") },
                        COMPACT_MEDIA_TYPE: { "schema": schema("CompactBatch") },
                        COMPACT_V2_MEDIA_TYPE: { "schema": schema("CompactBatchV2") },
                        COMPACT_V1_MEDIA_TYPE: { "schema": schema("CompactBatchV1") }
                    }
                },
                "responses": upload_errors
            }
        },
        format!("{device}/heartbeats"): {
            "parameters": [device_parameter()],
            "post": {
                "summary": "Send a heartbeat",
                "description": "Stored as a time series sample. Device credentials only.",
                "security": device_security(),
                "parameters": [content_encoding_parameter()],
                "requestBody": {
                    "required": true,
                    "content": { "application/json": { "schema": schema("Heartbeat") } }
                },
                "responses": heartbeat_errors
            },
            "get": read_operation("List heartbeats", "HeartbeatsPage", &[])
        },
        format!("{device}/summary"): {
            "parameters": [device_parameter()],
            "get": {
                "summary": "Per-stream and per-model totals",
                "security": device_security(),
                "responses": summary_responses
            }
        },
        format!("{device}/readings"): {
            "parameters": [device_parameter()],
            "get": read_operation("List readings", "ReadingsPage", &["source", "stream"])
        },
        format!("{device}/predictions"): {
            "parameters": [device_parameter()],
            "get": read_operation("List predictions", "PredictionsPage", &["source", "stream", "model"])
        },
        format!("{device}/dead-letters"): {
            "parameters": [device_parameter()],
            "get": read_operation("List dead letters", "DeadLettersPage", &[])
        },
        "/v1/fleet": {
            "get": {
                "summary": "Fleet summary",
                "description": "Operators only (devices get 403). Keyset-paginated on the device id: follow next_cursor.",
                "security": [{ "bearerAuth": [] }],
                "parameters": page_parameters(),
                "responses": fleet_responses
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": { "200": { "description": "OpenAPI 3.1 document.",
                    "content": { "application/json": { "schema": { "type": "object" } } } } }
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "security": [],
                "responses": { "200": { "description": "ok",
                    "content": { "text/plain": { "schema": { "type": "string", "const": "ok" } } } } }
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the store answers",
                "security": [],
                "responses": {
                    "200": { "description": "ready",
                        "content": { "text/plain": { "schema": { "type": "string", "const": "ready" } } } },
                    "503": response("NotReady")
                }
            }
        }
    })
}

/// The OpenAPI 3.1 document.
#[must_use]
pub fn document() -> Value {
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "cloud-sync",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Cloud endpoint for edge agents: authenticated, exactly-once ingest of readings, predictions and dead letters; heartbeats; paged reads. See docs/sync-protocol.md."
        },
        "servers": [{ "url": "/" }],
        "security": device_security(),
        "paths": paths(),
        "components": {
            "schemas": schemas(),
            "responses": responses(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A device token (`cloud-sync devices add`) or an operator token (`cloud-sync operators add`): 64 hex characters."
                },
                "mutualTLS": {
                    "type": "mutualTLS",
                    "description": "With tls_client_ca_file set: a client certificate signed by that CA whose subject CN is the device id."
                }
            }
        }
    });
    crate::registry::openapi::extend(&mut document);
    crate::drift::openapi::extend(&mut document);
    crate::retrain::openapi::extend(&mut document);
    crate::dataset::openapi::extend(&mut document);
    document
}
