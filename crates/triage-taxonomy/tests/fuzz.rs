//! Property tests: the taxonomy TOML parser and the ticket validator never panic, and every
//! rejection is an error that says where (file and line, or the JSON pointer) and what.
//! Figures and how to run more cases: `docs/fuzzing.md`.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use fuzz::{bytes, fail, mutated, mutated_any, names, run, Check, Verdict};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use triage_taxonomy::{Taxonomy, TaxonomyError, Validator, DEFAULT_TAXONOMY_TOML};

const SOURCE: &str = "fuzz.toml";

fn customer_support() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/taxonomy/customer-support.toml"
    ))
    .unwrap()
}

/// A small taxonomy with every construct: summary table, a field with children, a plain one.
const SMALL: &str = r#"format = 1
name = "small"
description = "A small desk."

[summary]
description = "One line."
max_length = 40

[[fields]]
name = "category"
description = "Area."
[fields.child]
name = "subcategory"
description = "Detail."
[[fields.values]]
name = "Network"
description = "Network things."
children = [
  { name = "VPN", description = "Tunnels." },
  { name = "Other", description = "Anything else." },
]
[[fields.values]]
name = "Hardware"
description = "Devices."
children = [{ name = "Other", description = "Anything else." }]

[[fields]]
name = "priority"
description = "Urgency."
values = [
  { name = "High", description = "Now." },
  { name = "Low", description = "Later." },
]
"#;

/// A ticket that must be valid for `t`: the first value of every field (children under the
/// parent's first value).
fn valid_ticket(t: &Taxonomy) -> Value {
    let mut m = Map::new();
    m.insert("summary".into(), json!("x"));
    for f in &t.fields {
        let v = match &f.dependency {
            None => f.values[0].name.clone(),
            Some(dep) => {
                let parent = m[&dep.parent].as_str().unwrap().to_owned();
                f.allowed_under(&parent).unwrap()[0].name.clone()
            }
        };
        m.insert(f.name.clone(), json!(v));
    }
    Value::Object(m)
}

/// Parses `text`; an accepted taxonomy must give a working validator that accepts its own
/// first-values ticket; a rejection must name the file and a line inside it.
fn check_taxonomy(text: &str) -> Check {
    match Taxonomy::from_toml_str(text, SOURCE) {
        Ok(t) => {
            let v = Validator::new(&t);
            let ticket = valid_ticket(&t);
            v.parse(&ticket)
                .or_else(|e| fail(format!("accepted taxonomy rejects its own ticket {ticket}: {e}")))?;
            if !v.schema_accepts(&ticket) {
                return fail(format!("the schema rejects {ticket}"));
            }
            Ok(Verdict::Accepted)
        }
        Err(e) => {
            let msg = e.to_string();
            names(&msg, &[&format!("{SOURCE}:")])?;
            let lines = text.split('\n').count();
            let line = match &e {
                TaxonomyError::Parse { line, message, .. } => {
                    names(message, &[])?;
                    *line
                }
                TaxonomyError::Invalid { line, message, .. } => {
                    names(message, &[])?;
                    *line
                }
                TaxonomyError::Io { .. } => return fail(format!("I/O error from a string: {msg}")),
            };
            if line == 0 || line > lines {
                return fail(format!("line {line} is outside the {lines}-line input: {msg}"));
            }
            Ok(Verdict::Rejected)
        }
    }
}

fn lossy(b: Vec<u8>) -> String {
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn taxonomy_toml_mutations_never_panic_and_errors_name_file_and_line() {
    let seeds = vec![
        DEFAULT_TAXONOMY_TOML.as_bytes().to_vec(),
        customer_support().into_bytes(),
        SMALL.as_bytes().to_vec(),
    ];
    let (_, accepted, rejected) = run("taxonomy/mutated", 20_000, mutated_any(seeds), |b| {
        check_taxonomy(&lossy(b))
    });
    // The mutations must reach both outcomes, or they test nothing past the first check.
    assert!(accepted > 0 && rejected > 0, "{accepted} / {rejected}");
}

#[test]
fn taxonomy_toml_small_mutations_never_panic() {
    run(
        "taxonomy/small-mutated",
        50_000,
        mutated(SMALL.as_bytes().to_vec()),
        |b| check_taxonomy(&lossy(b)),
    );
}

#[test]
fn taxonomy_arbitrary_strings_and_bytes_never_panic() {
    run("taxonomy/strings", 20_000, any::<String>(), |s| {
        check_taxonomy(&s)
    });
    run("taxonomy/bytes", 20_000, bytes(512), |b| {
        check_taxonomy(&lossy(b))
    });
}

// ------------------------------------------------------------------------------------------
// Ticket validation
// ------------------------------------------------------------------------------------------

/// Validates `text`; every violation must be explained with a JSON pointer, and the verdict
/// must agree with the JSON Schema's.
fn check_ticket(v: &Validator, text: &str) -> Check {
    let value: Option<Value> = serde_json::from_str(text).ok();
    match v.parse_str(text) {
        Ok(t) => {
            let Some(value) = value else {
                return fail("accepted text that is not JSON");
            };
            if !v.schema_accepts(&value) {
                return fail(format!("accepted {text:?} that the schema rejects"));
            }
            if t.to_json() != value {
                return fail(format!("{} is not the input {value}", t.to_json()));
            }
            Ok(Verdict::Accepted)
        }
        Err(e) => {
            if e.0.is_empty() {
                return fail("rejected with no violation");
            }
            for viol in &e.0 {
                names(&viol.message, &[])?;
                if !(viol.pointer.is_empty() || viol.pointer.starts_with('/')) {
                    return fail(format!("bad pointer {:?}", viol.pointer));
                }
            }
            match &value {
                None => names(&e.to_string(), &["not valid JSON (line "])?,
                Some(value) if v.schema_accepts(value) => {
                    return fail(format!("rejected {value} that the schema accepts: {e}"))
                }
                Some(_) => {}
            }
            Ok(Verdict::Rejected)
        }
    }
}

/// A value-level edit of a valid ticket: what a model or a client gets wrong.
#[derive(Debug, Clone)]
enum Edit {
    Remove(prop::sample::Index),
    /// Set a key to a value taken from the pool (another field's value, a wrong type, ...).
    Set(prop::sample::Index, prop::sample::Index),
    Add(String, prop::sample::Index),
    LongSummary(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    use prop::sample::Index;
    prop_oneof![
        any::<Index>().prop_map(Edit::Remove),
        (any::<Index>(), any::<Index>()).prop_map(|(k, v)| Edit::Set(k, v)),
        ("[a-z_/~]{0,12}", any::<Index>()).prop_map(|(k, v)| Edit::Add(k, v)),
        (150usize..300).prop_map(Edit::LongSummary),
    ]
}

fn pool(t: &Taxonomy) -> Vec<Value> {
    let mut p: Vec<Value> = t
        .fields
        .iter()
        .flat_map(|f| f.values.iter().map(|v| json!(v.name)))
        .collect();
    p.extend([
        json!(null),
        json!(true),
        json!(1),
        json!(-1.5),
        json!(""),
        json!(" "),
        json!("vpn"),
        json!(["VPN"]),
        json!({"name": "VPN"}),
        json!("\u{0}"),
        json!("é".repeat(200)),
    ]);
    p
}

#[test]
fn ticket_validation_of_edited_tickets_agrees_with_the_schema_and_explains_every_rejection() {
    let taxonomy = Taxonomy::builtin_default();
    let v = Validator::new(&taxonomy);
    let base = valid_ticket(&taxonomy);
    let keys: Vec<String> = taxonomy.keys().map(str::to_owned).collect();
    let pool = pool(&taxonomy);
    let strategy = proptest::collection::vec(edit(), 0..4);
    run("ticket/edited-values", 60_000, strategy, |edits| {
        let mut m = base.as_object().unwrap().clone();
        for e in &edits {
            match e {
                Edit::Remove(k) => {
                    m.remove(k.get(&keys));
                }
                Edit::Set(k, val) => {
                    m.insert(k.get(&keys).clone(), val.get(&pool).clone());
                }
                Edit::Add(k, val) => {
                    m.insert(k.clone(), val.get(&pool).clone());
                }
                Edit::LongSummary(n) => {
                    m.insert("summary".into(), json!("s".repeat(*n)));
                }
            }
        }
        check_ticket(&v, &Value::Object(m).to_string())
    });
}

#[test]
fn ticket_validation_of_mutated_text_never_panics() {
    let taxonomy = Taxonomy::builtin_default();
    let v = Validator::new(&taxonomy);
    let seeds = vec![
        serde_json::to_vec(&valid_ticket(&taxonomy)).unwrap(),
        serde_json::to_vec_pretty(&json!({"summary": "Printer jams", "category": "Hardware",
            "subcategory": "Printer / Scanner", "priority": "Low", "assignment_group": "Desktop Support",
            "request_type": "Incident"}))
        .unwrap(),
    ];
    run("ticket/mutated-text", 60_000, mutated_any(seeds), |b| {
        check_ticket(&v, &lossy(b))
    });
    run("ticket/strings", 20_000, any::<String>(), |s| {
        check_ticket(&v, &s)
    });
}
