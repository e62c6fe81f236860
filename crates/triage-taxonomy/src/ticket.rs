//! The typed [`Ticket`] and the [`Validator`] that is the only way to build one from JSON.
//!
//! Validation runs two checkers over the same JSON:
//! * the compiled JSON Schema (`jsonschema` crate), which is the authority, and
//! * a taxonomy-aware checker that explains each violation in service-desk words, with its
//!   JSON pointer (`/subcategory: "VPN" is not a subcategory of "Hardware"`).
//!
//! The test suite checks that both always agree on valid/invalid; should they ever disagree
//! at run time, the schema wins and its own messages are reported.

use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::schema::ticket_schema;
use crate::taxonomy::{Taxonomy, SUMMARY_KEY};

/// A ticket that is valid for the taxonomy it was parsed with. Keys keep taxonomy order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    summary: String,
    fields: Vec<(String, String)>,
}

impl Ticket {
    /// The one-line summary.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// The value of an enum field, e.g. `ticket.get("category")`.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == field)
            .map(|(_, v)| v.as_str())
    }

    /// Enum fields and their values, in taxonomy order.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The ticket as a JSON object (`summary` first).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("ticket serialises")
    }
}

impl Serialize for Ticket {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.fields.len() + 1))?;
        map.serialize_entry(SUMMARY_KEY, &self.summary)?;
        for (k, v) in &self.fields {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One reason a JSON document is not a valid ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer of the offending value (`""` for the document itself).
    pub pointer: String,
    /// What is wrong, in plain words.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = if self.pointer.is_empty() {
            "/"
        } else {
            &self.pointer
        };
        write!(f, "{p}: {}", self.message)
    }
}

/// All violations of one document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ticket: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Violations(pub Vec<Violation>);

/// Validates JSON against a taxonomy's ticket schema and builds typed [`Ticket`]s.
/// Build once per taxonomy; `Send + Sync`.
pub struct Validator {
    taxonomy: Taxonomy,
    schema: Value,
    compiled: jsonschema::Validator,
}

impl Validator {
    /// Generates and compiles the taxonomy's schema.
    pub fn new(taxonomy: &Taxonomy) -> Self {
        let schema = ticket_schema(taxonomy);
        let compiled = jsonschema::draft202012::new(&schema)
            .expect("generated schemas are valid Draft 2020-12 (tested)");
        Self {
            taxonomy: taxonomy.clone(),
            schema,
            compiled,
        }
    }

    /// The taxonomy this validator checks against.
    pub fn taxonomy(&self) -> &Taxonomy {
        &self.taxonomy
    }

    /// The generated JSON Schema.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Whether the JSON Schema accepts `value` (the authoritative verdict).
    pub fn schema_accepts(&self, value: &Value) -> bool {
        self.compiled.is_valid(value)
    }

    /// Every violation of `value`, explained; empty when valid.
    pub fn violations(&self, value: &Value) -> Vec<Violation> {
        let explained = self.explain(value);
        let schema_ok = self.compiled.is_valid(value);
        match (schema_ok, explained.is_empty()) {
            (true, _) => explained, // empty unless the checkers disagree (tested not to)
            (false, false) => explained,
            (false, true) => self
                .compiled
                .iter_errors(value)
                .map(|e| Violation {
                    pointer: e.instance_path().as_str().to_string(),
                    message: e.to_string(),
                })
                .collect(),
        }
    }

    /// Parses a JSON value into a typed ticket, or returns every violation.
    pub fn parse(&self, value: &Value) -> Result<Ticket, Violations> {
        let v = self.violations(value);
        if !v.is_empty() || !self.compiled.is_valid(value) {
            return Err(Violations(v));
        }
        let obj = value.as_object().expect("validated as an object");
        let text = |k: &str| obj[k].as_str().expect("validated as a string").to_string();
        Ok(Ticket {
            summary: text(SUMMARY_KEY),
            fields: self
                .taxonomy
                .fields
                .iter()
                .map(|f| (f.name.clone(), text(&f.name)))
                .collect(),
        })
    }

    /// Parses JSON text into a typed ticket.
    pub fn parse_str(&self, text: &str) -> Result<Ticket, Violations> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            Violations(vec![Violation {
                pointer: String::new(),
                message: format!("not valid JSON (line {}, column {}): {e}", e.line(), e.column()),
            }])
        })?;
        self.parse(&value)
    }

    fn explain(&self, value: &Value) -> Vec<Violation> {
        let mut out = Vec::new();
        let mut push = |pointer: String, message: String| out.push(Violation { pointer, message });
        let Some(obj) = value.as_object() else {
            push(
                String::new(),
                format!("a ticket must be a JSON object, got {}", kind(value)),
            );
            return out;
        };
        let keys: Vec<&str> = self.taxonomy.keys().collect();
        for k in obj.keys() {
            if !keys.contains(&k.as_str()) {
                push(
                    pointer(k),
                    format!(
                        "unknown key {k:?}; a ticket has exactly these keys: {}",
                        quoted(keys.iter().copied())
                    ),
                );
            }
        }
        for k in &keys {
            if !obj.contains_key(*k) {
                push(String::new(), format!("missing required key {k:?}"));
            }
        }
        self.explain_summary(obj, &mut push);
        for field in &self.taxonomy.fields {
            let Some(v) = obj.get(&field.name) else { continue };
            let Some(s) = v.as_str() else {
                push(
                    pointer(&field.name),
                    format!(
                        "must be a string, one of {}, got {}",
                        quoted(field.value_names()),
                        kind(v)
                    ),
                );
                continue;
            };
            if !field.has_value(s) {
                push(
                    pointer(&field.name),
                    format!("{s:?} is not one of {}", quoted(field.value_names())),
                );
                continue;
            }
            let Some(dep) = &field.dependency else { continue };
            let Some(parent_value) = obj.get(&dep.parent).and_then(Value::as_str) else {
                continue;
            };
            if let Some(allowed) = field.allowed_under(parent_value) {
                if !allowed.iter().any(|a| a.name == s) {
                    push(
                        pointer(&field.name),
                        format!(
                            "{s:?} is not a {} of {parent_value:?}; under {parent_value:?} choose one of {}",
                            field.name,
                            quoted(allowed.iter().map(|a| a.name.as_str()))
                        ),
                    );
                }
            }
        }
        out
    }

    fn explain_summary(&self, obj: &Map<String, Value>, push: &mut impl FnMut(String, String)) {
        let Some(v) = obj.get(SUMMARY_KEY) else { return };
        let p = pointer(SUMMARY_KEY);
        match v.as_str() {
            None => push(p, format!("must be a string, got {}", kind(v))),
            Some("") => push(p, "must not be empty".into()),
            Some(s) => {
                let n = s.chars().count();
                let max = self.taxonomy.summary.max_length;
                if n > max {
                    push(p, format!("is {n} characters long; at most {max} are allowed"));
                }
            }
        }
    }
}

fn pointer(key: &str) -> String {
    format!("/{}", key.replace('~', "~0").replace('/', "~1"))
}

fn quoted<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
