//! The ticket JSON Schema (Draft 2020-12) derived from a taxonomy.
//!
//! Shape: an object with `summary` first and then every enum field in taxonomy order, all
//! required, `additionalProperties: false`. Each dependent field (e.g. `subcategory`) adds one
//! `anyOf` branch per parent value: `{"properties": {"category": {"const": P}, "subcategory":
//! {"enum": [children of P]}}}`, so "subcategory belongs to category" is part of the schema
//! itself and a grammar compiled from it enforces the rule.

use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use crate::taxonomy::{Taxonomy, SUMMARY_KEY};

/// The JSON Schema dialect of generated schemas.
pub const SCHEMA_DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// The fixed, taxonomy-independent part of every ticket. Its schema comes from `schemars`;
/// the taxonomy then supplies the description and the length bound.
#[derive(JsonSchema)]
#[allow(dead_code)] // only its schema is used
struct FixedTicketPart {
    /// One line stating the problem or request.
    #[schemars(length(min = 1))]
    summary: String,
}

/// Generates the ticket JSON Schema for `taxonomy`. Deterministic: the same taxonomy always
/// gives byte-identical output (keys keep insertion order).
pub fn ticket_schema(taxonomy: &Taxonomy) -> Value {
    let fixed = schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<FixedTicketPart>();
    let mut summary = fixed
        .get("properties")
        .and_then(|p| p.get(SUMMARY_KEY))
        .cloned()
        .expect("schemars emits the summary property");
    if let Some(obj) = summary.as_object_mut() {
        obj.insert("description".into(), json!(taxonomy.summary.description));
        obj.insert("maxLength".into(), json!(taxonomy.summary.max_length));
    }

    let mut properties = Map::new();
    properties.insert(SUMMARY_KEY.into(), summary);
    for field in &taxonomy.fields {
        properties.insert(
            field.name.clone(),
            json!({
                "description": field.description,
                "type": "string",
                "enum": field.value_names().collect::<Vec<_>>(),
            }),
        );
    }

    let mut schema = Map::new();
    schema.insert("$schema".into(), json!(SCHEMA_DIALECT));
    schema.insert(
        "$id".into(),
        json!(format!("urn:triage:ticket:{}", uri_component(&taxonomy.name))),
    );
    schema.insert(
        "title".into(),
        json!(format!("Ticket ({} taxonomy)", taxonomy.name)),
    );
    schema.insert("description".into(), json!(taxonomy.description));
    schema.insert("type".into(), json!("object"));
    schema.insert("properties".into(), Value::Object(properties));
    schema.insert("required".into(), json!(taxonomy.keys().collect::<Vec<_>>()));
    schema.insert("additionalProperties".into(), json!(false));

    // One `anyOf` per dependent field; several of them are combined with `allOf`.
    let mut rules: Vec<Value> = taxonomy
        .fields
        .iter()
        .filter_map(|f| {
            let dep = f.dependency.as_ref()?;
            let branches: Vec<Value> = dep
                .allowed
                .iter()
                .map(|(parent_value, kids)| {
                    json!({
                        "properties": {
                            dep.parent.clone(): { "const": parent_value },
                            f.name.clone(): { "enum": kids.iter().map(|k| &k.name).collect::<Vec<_>>() },
                        }
                    })
                })
                .collect();
            Some(json!({ "anyOf": branches }))
        })
        .collect();
    match rules.len() {
        0 => {}
        1 => {
            let rule = rules.pop().expect("one rule");
            schema.insert("anyOf".into(), rule["anyOf"].clone());
        }
        _ => {
            schema.insert("allOf".into(), Value::Array(rules));
        }
    }
    Value::Object(schema)
}

/// `name` with every byte outside the URI's unreserved characters (`A-Z a-z 0-9 - . _ ~`)
/// percent-encoded, so any taxonomy name makes a valid `$id` (`my desk` → `my%20desk`);
/// names made of those characters only are unchanged.
fn uri_component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Pretty-printed schema text with a trailing newline, as committed under `schemas/`.
pub fn ticket_schema_pretty(taxonomy: &Taxonomy) -> String {
    let mut s = serde_json::to_string_pretty(&ticket_schema(taxonomy)).expect("schema serialises");
    s.push('\n');
    s
}
