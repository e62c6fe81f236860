//! The OpenAPI 3.1 document (`GET /openapi.json`), built from the served taxonomies: the
//! `Ticket` schema is the first taxonomy's generated JSON Schema.

use serde_json::{json, Value};

use crate::state::AppState;

/// Every route the service answers, `(method, path)`; the router and the document both use
/// it, and a test checks they agree.
pub const ROUTES: [(&str, &str); 12] = [
    ("post", "/v1/tickets"),
    ("post", "/v1/tickets:batch"),
    ("post", "/api/v1/classify"),
    ("post", "/api/v1/train-data"),
    ("post", "/api/v1/train"),
    ("get", "/api/v1/train"),
    ("get", "/api/v1/train/{id}"),
    ("post", "/api/v1/train/{id}/activate"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

fn error_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        m.insert(
            (*c).into(),
            json!({"$ref": format!("#/components/responses/E{c}")}),
        );
    }
    Value::Object(m)
}

fn json_body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// The document for `state`.
pub fn document(state: &AppState) -> Value {
    let ticket_schema = state.desks().first().map_or(json!({"type": "object"}), |d| {
        triage_taxonomy::Validator::new(d.engine().structurer.taxonomy())
            .schema()
            .clone()
    });
    let taxonomies: Vec<&str> = state.desks().iter().map(|d| d.name()).collect();
    let tax = json!({"type": "string", "enum": taxonomies, "description": "Taxonomy (default: the first)."});
    let meta = json!({"$ref": "#/components/schemas/TicketMeta"});
    let common = ["400", "401", "403", "413", "422", "503", "504"];
    let limits = &state.config.train_limits;
    let with = |mut op: Value, errs: &[&str]| {
        let mut r = error_responses(errs);
        if let (Some(dst), Some(src)) = (op["responses"].as_object_mut(), r.as_object_mut()) {
            dst.append(src);
        }
        if state.config.token.is_some() {
            op["security"] = json!([{"bearer": []}]);
        }
        op
    };
    let paths = json!({
        "/v1/tickets": {"post": with(json!({
            "summary": "Structure one incident into a ticket.",
            "requestBody": json_body(json!({"type": "object", "required": ["text"], "additionalProperties": false,
                "properties": {"text": {"type": "string", "maxLength": state.config.max_input_chars}, "taxonomy": tax}})),
            "responses": {"200": ok("The ticket and facts about it.", json!({"type": "object",
                "properties": {"ticket": {"$ref": "#/components/schemas/Ticket"}, "meta": meta}}))}
        }), &common)},
        "/v1/tickets:batch": {"post": with(json!({
            "summary": "Structure several incidents; each item succeeds or fails on its own.",
            "requestBody": json_body(json!({"type": "object", "required": ["items"], "additionalProperties": false,
                "properties": {"taxonomy": tax, "items": {"type": "array", "minItems": 1, "maxItems": state.config.max_batch,
                    "items": {"type": "object", "required": ["text"], "properties": {"id": {"type": "string"}, "text": {"type": "string"}}}}}})),
            "responses": {"200": ok("One result per item, in order.", json!({"type": "object", "properties": {"results": {"type": "array",
                "items": {"type": "object", "properties": {"id": {"type": ["string", "null"]}, "ticket": {"$ref": "#/components/schemas/Ticket"},
                    "meta": meta, "error": {"$ref": "#/components/schemas/ErrorDetail"}}}}}}))}
        }), &common)},
        "/api/v1/classify": {"post": with(json!({
            "summary": "Open Ticket AI compatible classification: the category and its probability, plus the ticket.",
            "requestBody": json_body(json!({"type": "object", "required": ["ticket_data"], "properties": {"ticket_data": {"type": "string"}}})),
            "responses": {"200": ok("Predicted label.", json!({"type": "object", "properties": {
                "predicted_label": {"type": "string"}, "confidence": {"type": "number"},
                "ticket": {"$ref": "#/components/schemas/Ticket"}, "meta": meta}}))}
        }), &common)},
        "/api/v1/train-data": {"post": with(json!({
            "summary": "Upload labelled tickets (CSV by default) and store them as a dataset.",
            "parameters": [
                {"name": "map", "in": "query", "required": true, "description": "KEY=COLUMN, repeated: text (repeatable), subject, summary, id, lang and every taxonomy field.", "schema": {"type": "string"}},
                {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["csv", "tsv", "json", "jsonl"], "default": "csv"}},
                {"name": "taxonomy", "in": "query", "schema": tax}],
            "requestBody": {"required": true, "content": {"text/csv": {"schema": {"type": "string", "maxLength": state.config.max_upload_bytes}}}},
            "responses": {"201": ok("Dataset id, row counts and the first rejects.", json!({"type": "object", "properties": {
                "id": {"type": "string"}, "rows": {"type": "integer"}, "imported": {"type": "integer"}, "rejected": {"type": "integer"},
                "rejects": {"type": "array"}, "labels": {"type": "object"}}}))}
        }), &["400", "401", "403", "413", "422", "507"])},
        "/api/v1/train": {"get": with(json!({
            "summary": "Every training job, those of earlier runs of the service included (job statuses are kept in the data folder).",
            "responses": {"200": ok("The jobs, in id order.", json!({"type": "object", "properties": {
                "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobStatus"}}}}))}
        }), &["401", "403"]),
        "post": with(json!({
            "summary": "Start a training job on an uploaded dataset (one at a time).",
            "requestBody": json_body(json!({"type": "object", "required": ["dataset_id"], "additionalProperties": false, "properties": {
                "dataset_id": {"type": "string"},
                "steps": {"type": "integer", "minimum": 1, "maximum": limits.steps},
                "lr": {"type": "number", "exclusiveMinimum": 0, "maximum": limits.lr},
                "rank": {"type": "integer", "minimum": 1, "maximum": limits.rank},
                "activate": {"type": "boolean", "default": false}, "taxonomy": tax}})),
            "responses": {"202": ok("Job started.", json!({"type": "object", "properties": {"job_id": {"type": "string"}, "status_url": {"type": "string"}}})),
                "404": {"$ref": "#/components/responses/E404"}, "409": {"$ref": "#/components/responses/E409"}}
        }), &["400", "401", "403", "422", "503", "507"])},
        "/api/v1/train/{id}": {"get": with(json!({
            "summary": "A training job's progress and metrics.",
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": {"200": ok("Job status.", json!({"$ref": "#/components/schemas/JobStatus"})),
                "404": {"$ref": "#/components/responses/E404"}}
        }), &["401", "403"])},
        "/api/v1/train/{id}/activate": {"post": with(json!({
            "summary": "Serve a finished job's adapter from now on (no restart).",
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": {"200": ok("Activated.", json!({"type": "object"})), "404": {"$ref": "#/components/responses/E404"},
                "409": {"$ref": "#/components/responses/E409"}}
        }), &["401", "403", "422", "507"])},
        "/healthz": {"get": {"summary": "Liveness (no authentication).", "responses": {"200": ok("Alive.", json!({"type": "object"}))}}},
        "/readyz": {"get": {"summary": "Readiness: model loaded and warmed up (no authentication).",
            "responses": {"200": ok("Ready.", json!({"type": "object"})), "503": {"$ref": "#/components/responses/E503"}}}},
        "/metrics": {"get": with(json!({"summary": "Prometheus metrics.",
            "responses": {"200": {"description": "Text exposition format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}), &["401", "403"])},
        "/openapi.json": {"get": with(json!({"summary": "This document.", "responses": {"200": ok("OpenAPI 3.1.", json!({"type": "object"}))}}), &["401", "403"])},
    });
    let mut responses = serde_json::Map::new();
    for (code, what) in [
        ("400", "Malformed JSON."),
        ("401", "Missing or wrong bearer token."),
        ("403", "Sent by a web page of another origin (`cross_origin`), or, without a token, under a Host that is not a loopback name (`host_not_allowed`)."),
        ("404", "Unknown endpoint, job or dataset."),
        ("405", "A known endpoint with another method (`method_not_allowed`); see the Allow header."),
        ("409", "A training job is running, or the job has no adapter yet."),
        ("413", "Request body over the limit."),
        ("422", "Valid JSON, unusable request (empty or over-long text, unknown field or taxonomy, bad batch size, a size over its limit: `limit_exceeded` with `field` and `limit`)."),
        ("503", "Overloaded or warming up; see Retry-After."),
        ("504", "The request's time budget ran out."),
        ("507", "Does not fit: `insufficient_memory` (a job's estimated memory) or `insufficient_storage` (the data folder's disk quota), with the figures."),
    ] {
        responses.insert(
            format!("E{code}"),
            json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "triage", "version": env!("CARGO_PKG_VERSION"),
            "description": "Free-text IT incidents to schema-valid tickets, with a local LLM and grammar-constrained decoding."},
        "paths": paths,
        "components": {
            "schemas": {
                "Ticket": ticket_schema,
                "TicketMeta": {"type": "object", "properties": {
                    "confidence": {"type": "object", "additionalProperties": {"type": "number"}},
                    "needs_review": {"type": "boolean"}, "timings": {"type": "object"}, "shared_passes": {"type": "integer", "minimum": 0}, "taxonomy": {"type": "string"},
                    "adapter": {"type": ["string", "null"]}, "warnings": {"type": "array", "items": {"type": "string"}}}},
                "JobStatus": {"type": "object", "properties": {
                    "id": {"type": "string"},
                    "state": {"type": "string", "enum": ["running", "succeeded", "failed", "stopped", "interrupted"],
                        "description": "`stopped`: checkpointed and stopped by a shutdown of this process. `interrupted`: found running or stopping when the service started again (a restart, a crash); `checkpoint` and `checkpoint_step` say what was saved. A job is not resumed by the service: start a new one."},
                    "dataset": {"type": "string"}, "taxonomy": {"type": "string"},
                    "step": {"type": "integer"}, "steps": {"type": "integer"}, "loss": {"type": ["number", "null"]},
                    "tokens_per_s": {"type": ["number", "null"]}, "log": {"type": "array", "items": {"type": "string"}},
                    "summary": {}, "adapter": {"type": ["string", "null"]}, "active": {"type": "boolean"}, "error": {"type": ["string", "null"]},
                    "checkpoint": {"type": ["string", "null"], "description": "The last checkpoint of an interrupted job (its run folder's `checkpoint/`)."},
                    "checkpoint_step": {"type": ["integer", "null"], "description": "The optimizer step that checkpoint holds."}}},
                "ErrorDetail": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                    "field": {"type": "string"}, "limit": {}}},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}}},
            },
            "responses": responses,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_document_lists_exactly_the_routes_and_every_job_state() {
        let dir = std::env::temp_dir().join(format!("triage-openapi-{}", std::process::id()));
        let state = AppState::new(
            crate::ServeConfig {
                data_dir: dir.clone(),
                ..crate::ServeConfig::default()
            },
            Vec::new(),
            None,
        );
        let doc = document(&state);
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(p, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| (m.clone(), p.clone()))
            })
            .collect();
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, routed);
        let states: Vec<&str> = doc["components"]["schemas"]["JobStatus"]["properties"]["state"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        use crate::JobState::*;
        for s in [Running, Succeeded, Failed, Stopped, Interrupted] {
            let name = serde_json::to_value(s).unwrap();
            assert!(
                states.contains(&name.as_str().unwrap()),
                "{name} is not documented"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
