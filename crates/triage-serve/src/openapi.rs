//! The OpenAPI 3.1 document (`GET /openapi.json`), built from the served taxonomies: the
//! `Ticket` schema is the first taxonomy's generated JSON Schema.

use serde_json::{json, Value};

use crate::state::AppState;

/// Every route the service answers, `(method, path)`; the router and the document both use
/// it, and a test checks they agree.
pub const ROUTES: [(&str, &str); 11] = [
    ("post", "/v1/tickets"),
    ("post", "/v1/tickets:batch"),
    ("post", "/api/v1/classify"),
    ("post", "/api/v1/train-data"),
    ("post", "/api/v1/train"),
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
    let common = ["400", "401", "413", "422", "503", "504"];
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
            "requestBody": {"required": true, "content": {"text/csv": {"schema": {"type": "string"}}}},
            "responses": {"201": ok("Dataset id, row counts and the first rejects.", json!({"type": "object", "properties": {
                "id": {"type": "string"}, "rows": {"type": "integer"}, "imported": {"type": "integer"}, "rejected": {"type": "integer"},
                "rejects": {"type": "array"}, "labels": {"type": "object"}}}))}
        }), &["400", "401", "413", "422"])},
        "/api/v1/train": {"post": with(json!({
            "summary": "Start a training job on an uploaded dataset (one at a time).",
            "requestBody": json_body(json!({"type": "object", "required": ["dataset_id"], "additionalProperties": false, "properties": {
                "dataset_id": {"type": "string"}, "steps": {"type": "integer", "minimum": 1}, "lr": {"type": "number"},
                "rank": {"type": "integer", "minimum": 1}, "activate": {"type": "boolean", "default": false}, "taxonomy": tax}})),
            "responses": {"202": ok("Job started.", json!({"type": "object", "properties": {"job_id": {"type": "string"}, "status_url": {"type": "string"}}})),
                "404": {"$ref": "#/components/responses/E404"}, "409": {"$ref": "#/components/responses/E409"}}
        }), &["400", "401", "422", "503"])},
        "/api/v1/train/{id}": {"get": with(json!({
            "summary": "A training job's progress and metrics.",
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": {"200": ok("Job status.", json!({"type": "object", "properties": {
                "id": {"type": "string"}, "state": {"type": "string", "enum": ["running", "succeeded", "failed", "stopped"]},
                "step": {"type": "integer"}, "steps": {"type": "integer"}, "loss": {"type": ["number", "null"]},
                "summary": {}, "adapter": {"type": ["string", "null"]}, "active": {"type": "boolean"}, "error": {"type": ["string", "null"]}}})),
                "404": {"$ref": "#/components/responses/E404"}}
        }), &["401"])},
        "/api/v1/train/{id}/activate": {"post": with(json!({
            "summary": "Serve a finished job's adapter from now on (no restart).",
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": {"200": ok("Activated.", json!({"type": "object"})), "404": {"$ref": "#/components/responses/E404"},
                "409": {"$ref": "#/components/responses/E409"}}
        }), &["401", "422"])},
        "/healthz": {"get": {"summary": "Liveness (no authentication).", "responses": {"200": ok("Alive.", json!({"type": "object"}))}}},
        "/readyz": {"get": {"summary": "Readiness: model loaded and warmed up (no authentication).",
            "responses": {"200": ok("Ready.", json!({"type": "object"})), "503": {"$ref": "#/components/responses/E503"}}}},
        "/metrics": {"get": with(json!({"summary": "Prometheus metrics.",
            "responses": {"200": {"description": "Text exposition format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}), &["401"])},
        "/openapi.json": {"get": with(json!({"summary": "This document.", "responses": {"200": ok("OpenAPI 3.1.", json!({"type": "object"}))}}), &["401"])},
    });
    let mut responses = serde_json::Map::new();
    for (code, what) in [
        ("400", "Malformed JSON."),
        ("401", "Missing or wrong bearer token."),
        ("404", "Unknown job or dataset."),
        ("409", "A training job is running, or the job has no adapter yet."),
        ("413", "Request body over the limit."),
        ("422", "Valid JSON, unusable request (empty or over-long text, unknown field or taxonomy, bad batch size)."),
        ("503", "Overloaded or warming up; see Retry-After."),
        ("504", "The request's time budget ran out."),
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
                    "needs_review": {"type": "boolean"}, "timings": {"type": "object"}, "taxonomy": {"type": "string"},
                    "adapter": {"type": ["string", "null"]}, "warnings": {"type": "array", "items": {"type": "string"}}}},
                "ErrorDetail": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}}},
            },
            "responses": responses,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}
