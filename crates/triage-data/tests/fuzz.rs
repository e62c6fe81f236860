//! Property tests: the CSV / TSV / JSON / JSONL importers and the canonical JSONL reader never
//! panic; every row ends up imported or rejected with its line and a reason, and a file-level
//! error names the file (and the line where there is one). Figures and how to run more cases:
//! `docs/fuzzing.md`.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use std::path::{Path, PathBuf};

use fuzz::{bytes, fail, mutated_any, names, run, Check, Verdict};
use triage_data::import::{import_file, ColumnMapping, ImportOptions, LabelMap};
use triage_data::{read_examples, DataError, Example};
use triage_taxonomy::{Taxonomy, Validator};

const MAP: [&str; 8] = [
    "text=body",
    "subject=subject",
    "id=id",
    "category=cat",
    "subcategory=sub",
    "priority=prio",
    "assignment_group=grp",
    "request_type=kind",
];

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("triage-data-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn options(t: &Taxonomy) -> ImportOptions {
    let specs: Vec<String> = MAP.iter().map(|s| s.to_string()).collect();
    ImportOptions {
        mapping: ColumnMapping::parse(&specs, t).unwrap(),
        labels: LabelMap::from_toml_str("[priority]\n\"P1\" = \"Critical\"\n", t).unwrap(),
        source: "fuzz".into(),
        max_text_chars: 2000,
        max_rows: None,
    }
}

const CSV: &str = "id,subject,body,cat,sub,prio,grp,kind\n\
1,VPN down,\"My VPN drops every 10 minutes.\nPayroll is due today!\",Network,VPN,High,Network Operations,Incident\n\
2,,\"Please install Visio, thanks\",Software,Installation / Update,low,Desktop Support,Service Request\n\
3,Printer,The printer on floor 2 jams,Hardware,Printer / Scanner,P1,Hardware Support,Incident\n\
4,x,\"Hello,\\n\\nmy mailbox is full.\\nThanks\",Email,Mailbox,Medium,Email / Messaging,Incident\n";

fn jsonl() -> String {
    let rows = [
        r#"{"id":"1","subject":"VPN down","body":"My VPN drops every 10 minutes","cat":"Network","sub":"VPN","prio":"High","grp":"Network Operations","kind":"Incident"}"#,
        r#"{"id":2,"body":"Please install Visio","cat":"Software","sub":"Installation / Update","prio":"Low","grp":"Desktop Support","kind":"Service Request","extra":[1,{"a":null}]}"#,
        r#"{"id":"3","body":"Printer jams","cat":"Hardware","sub":"Printer / Scanner","prio":"P1","grp":"Hardware Support","kind":"Incident"}"#,
    ];
    rows.join("\n") + "\n"
}

fn json_array() -> String {
    format!("[{}]", jsonl().trim_end().replace('\n', ",\n"))
}

/// Lines of `b` (a last line without a newline counts).
fn line_count(b: &[u8]) -> u64 {
    b.iter().filter(|&&c| c == b'\n').count() as u64 + 1
}

/// Imports `b` as `file`; checks the report's accounting and the reject lines, or that the
/// error names the file.
fn check_import(path: &Path, b: &[u8], v: &Validator, o: &ImportOptions) -> Check {
    std::fs::write(path, b).unwrap();
    let shown = path.display().to_string();
    match import_file(path, v, o) {
        Ok(r) => {
            if r.examples.len() + r.rejects.len() != r.rows {
                return fail(format!(
                    "{} examples + {} rejects != {} rows",
                    r.examples.len(),
                    r.rejects.len(),
                    r.rows
                ));
            }
            let max_line = line_count(b).max(r.rows as u64);
            for x in &r.rejects {
                names(&x.reason, &[])?;
                if x.line == 0 || x.line > max_line {
                    return fail(format!("reject line {} outside 1..={max_line}: {x:?}", x.line));
                }
            }
            for e in &r.examples {
                if e.text.trim().is_empty() || e.id.is_empty() || e.text.contains('\0') {
                    return fail(format!("bad example {e:?}"));
                }
                if e.text.chars().count() > o.max_text_chars {
                    return fail(format!("text over the limit: {e:?}"));
                }
                // What was imported reads back as a canonical example.
                Example::from_json_line(&e.to_json_line(), v).or_else(|err| fail(format!("{e:?}: {err}")))?;
            }
            Ok(if r.examples.is_empty() {
                Verdict::Rejected
            } else {
                Verdict::Accepted
            })
        }
        Err(e) => {
            names(&e.to_string(), &[&shown])?;
            if let DataError::Parse { line, .. } = e {
                if line == 0 || line > line_count(b) {
                    return fail(format!("error line {line} outside the file"));
                }
            }
            Ok(Verdict::Rejected)
        }
    }
}

fn setup(name: &str) -> (Validator, ImportOptions, PathBuf) {
    let t = Taxonomy::builtin_default();
    let o = options(&t);
    (Validator::new(&t), o, dir(name))
}

#[test]
fn csv_import_of_mutated_exports_never_panics_and_accounts_for_every_row() {
    let (v, o, d) = setup("csv");
    let crlf = CSV.replace('\n', "\r\n");
    let bom = format!("\u{feff}{CSV}");
    let seeds = vec![CSV.as_bytes().to_vec(), crlf.into_bytes(), bom.into_bytes()];
    let path = d.join("t.csv");
    let (_, accepted, rejected) = run("import/csv-mutated", 5_000, mutated_any(seeds), |b| {
        check_import(&path, &b, &v, &o)
    });
    assert!(accepted > 0 && rejected > 0, "{accepted} / {rejected}");
    let tsv = d.join("t.tsv");
    let seed = CSV.replace(',', "\t").into_bytes();
    run("import/tsv-mutated", 1_000, mutated_any(vec![seed]), |b| {
        check_import(&tsv, &b, &v, &o)
    });
    run("import/csv-bytes", 2_000, bytes(400), |b| {
        check_import(&path, &b, &v, &o)
    });
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn jsonl_and_json_import_of_mutated_exports_never_panics_and_accounts_for_every_row() {
    let (v, o, d) = setup("jsonl");
    let path = d.join("t.jsonl");
    let seeds = vec![jsonl().into_bytes()];
    let (_, accepted, rejected) = run("import/jsonl-mutated", 5_000, mutated_any(seeds), |b| {
        check_import(&path, &b, &v, &o)
    });
    assert!(accepted > 0 && rejected > 0, "{accepted} / {rejected}");
    let array = d.join("t.json");
    run(
        "import/json-array-mutated",
        2_000,
        mutated_any(vec![json_array().into_bytes()]),
        |b| check_import(&array, &b, &v, &o),
    );
    run("import/jsonl-bytes", 2_000, bytes(400), |b| {
        check_import(&path, &b, &v, &o)
    });
    std::fs::remove_dir_all(d).unwrap();
}

/// Reads `b` as a canonical JSONL file: an error names the file and a line inside it.
fn check_read(path: &Path, b: &[u8], v: &Validator) -> Check {
    std::fs::write(path, b).unwrap();
    match read_examples(path, v) {
        Ok(examples) => {
            for e in &examples {
                if e.text.trim().is_empty() {
                    return fail(format!("empty text accepted: {e:?}"));
                }
            }
            Ok(Verdict::Accepted)
        }
        Err(e) => {
            let msg = e.to_string();
            names(&msg, &[&format!("{}:", path.display())])?;
            let line = match e {
                DataError::Example { line, .. } | DataError::Parse { line, .. } => line,
                other => return fail(format!("unexpected error kind: {other:?}")),
            };
            if line == 0 || line > line_count(b) {
                return fail(format!("line {line} outside the file: {msg}"));
            }
            Ok(Verdict::Rejected)
        }
    }
}

#[test]
fn canonical_jsonl_reader_of_mutated_files_never_panics_and_names_file_and_line() {
    let t = Taxonomy::builtin_default();
    let v = Validator::new(&t);
    let d = dir("examples");
    let path = d.join("examples.jsonl");
    let line = r#"{"id":"a","text":"vpn down","ticket":{"summary":"VPN down","category":"Network","subcategory":"VPN","priority":"High","assignment_group":"Network Operations","request_type":"Incident"},"lang":"en","source":"t","group":"g1","split":"train"}"#;
    let other = line
        .replace("\"a\"", "\"b\"")
        .replace("\"VPN\"", "\"Wi-Fi\"")
        .replace("\"train\"", "\"test\"");
    let seed = format!("{line}\n\n{other}\n").into_bytes();
    let (_, accepted, rejected) = run("examples/jsonl-mutated", 6_000, mutated_any(vec![seed]), |b| {
        check_read(&path, &b, &v)
    });
    assert!(accepted > 0 && rejected > 0, "{accepted} / {rejected}");
    run("examples/bytes", 2_000, bytes(300), |b| check_read(&path, &b, &v));
    std::fs::remove_dir_all(d).unwrap();
}
