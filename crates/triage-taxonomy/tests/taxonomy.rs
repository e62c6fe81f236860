//! Taxonomy loading, schema generation and ticket validation.

use serde_json::{json, Value};
use triage_taxonomy::{ticket_schema, ticket_schema_pretty, Taxonomy, TaxonomyError, Validator};

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn names(t: &Taxonomy, field: &str) -> Vec<String> {
    t.field(field).unwrap().value_names().map(String::from).collect()
}

#[test]
fn default_taxonomy_has_exactly_the_specified_values() {
    let t = Taxonomy::builtin_default();
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        [
            "summary",
            "category",
            "subcategory",
            "priority",
            "assignment_group",
            "request_type"
        ]
    );
    assert_eq!(
        names(&t, "category"),
        [
            "Hardware",
            "Software",
            "Network",
            "Access",
            "Email",
            "Security",
            "Workplace"
        ]
    );
    let sub = t.field("subcategory").unwrap();
    let expect: &[(&str, &[&str])] = &[
        (
            "Hardware",
            &[
                "Laptop / Desktop",
                "Monitor / Peripherals",
                "Mobile Device",
                "Printer / Scanner",
                "Other",
            ],
        ),
        (
            "Software",
            &[
                "Installation / Update",
                "Application Error",
                "Performance",
                "License",
                "Other",
            ],
        ),
        ("Network", &["Connectivity", "VPN", "Wi-Fi", "Other"]),
        (
            "Access",
            &[
                "Password Reset",
                "Account Locked",
                "Permissions",
                "New Account",
                "Multi-Factor Authentication",
                "Other",
            ],
        ),
        (
            "Email",
            &[
                "Mailbox",
                "Calendar",
                "Shared Mailbox / Distribution List",
                "Chat / Video Meetings",
                "Other",
            ],
        ),
        (
            "Security",
            &[
                "Phishing",
                "Malware",
                "Data Exposure",
                "Policy Violation",
                "Physical Security",
                "Other",
            ],
        ),
        (
            "Workplace",
            &["Facilities", "Telephony", "Onboarding / Offboarding", "Other"],
        ),
    ];
    let dep = sub.dependency.as_ref().unwrap();
    assert_eq!(dep.parent, "category");
    assert_eq!(dep.allowed.len(), expect.len());
    for ((parent, kids), (want_parent, want_kids)) in dep.allowed.iter().zip(expect) {
        assert_eq!(parent, want_parent);
        assert_eq!(
            kids.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            *want_kids
        );
    }
    assert_eq!(names(&t, "priority"), ["Low", "Medium", "High", "Critical"]);
    assert_eq!(
        names(&t, "assignment_group"),
        [
            "Service Desk",
            "Desktop Support",
            "Hardware Support",
            "Network Operations",
            "End User Applications",
            "Email / Messaging",
            "Security / Access",
            "Facilities"
        ]
    );
    assert_eq!(names(&t, "request_type"), ["Incident", "Service Request"]);
    assert_eq!(t.summary.max_length, 160);
    // Every value carries a description for the prompt.
    for f in &t.fields {
        assert!(f.values.iter().all(|v| !v.description.is_empty()), "{}", f.name);
    }
    let critical = &t.field("priority").unwrap().values[3].description;
    assert!(
        critical.contains("same-day") && critical.contains("security incident"),
        "{critical}"
    );
}

#[test]
fn embedded_default_is_the_config_file() {
    let from_file = Taxonomy::from_file(repo("configs/taxonomy/default.toml")).unwrap();
    assert_eq!(
        from_file.content_hash(),
        Taxonomy::builtin_default().content_hash()
    );
}

#[test]
fn customer_support_taxonomy_has_its_own_field_set() {
    let t = Taxonomy::from_file(repo("configs/taxonomy/customer-support.toml")).unwrap();
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["summary", "category", "priority", "request_type"]
    );
    assert_eq!(names(&t, "priority"), ["low", "medium", "high"]);
    assert_eq!(t.field("category").unwrap().values.len(), 10);
    assert!(
        ticket_schema(&t).get("anyOf").is_none(),
        "no dependent field, no anyOf"
    );
    assert_ne!(t.content_hash(), Taxonomy::builtin_default().content_hash());
}

/// The committed schemas must equal what the taxonomy generates. To refresh after editing a
/// taxonomy: `triage schema > schemas/ticket.default.schema.json` (and likewise with
/// `--taxonomy configs/taxonomy/customer-support.toml`).
#[test]
fn committed_schemas_do_not_drift_from_their_taxonomies() {
    for (taxonomy, schema) in [
        (
            "configs/taxonomy/default.toml",
            "schemas/ticket.default.schema.json",
        ),
        (
            "configs/taxonomy/customer-support.toml",
            "schemas/ticket.customer-support.schema.json",
        ),
    ] {
        let t = Taxonomy::from_file(repo(taxonomy)).unwrap();
        let committed = std::fs::read_to_string(repo(schema)).unwrap();
        assert!(
            committed == ticket_schema_pretty(&t),
            "{schema} is out of date with {taxonomy}: regenerate it with `triage schema --taxonomy {taxonomy} > {schema}`"
        );
    }
}

#[test]
fn generated_schemas_are_valid_draft_2020_12() {
    for t in [
        Taxonomy::builtin_default(),
        Taxonomy::from_file(repo("configs/taxonomy/customer-support.toml")).unwrap(),
    ] {
        let schema = ticket_schema(&t);
        assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
        assert!(jsonschema::meta::is_valid(&schema), "{}", t.name);
        assert_eq!(schema["additionalProperties"], false);
        let props: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(props, required, "all keys required, in order");
        assert_eq!(schema["properties"]["summary"]["minLength"], 1);
        assert_eq!(schema["properties"]["summary"]["maxLength"], 160);
    }
}

fn good() -> Value {
    json!({
        "summary": "VPN drops every 10 minutes since the update; payroll deadline today",
        "category": "Network",
        "subcategory": "VPN",
        "priority": "Critical",
        "assignment_group": "Network Operations",
        "request_type": "Incident"
    })
}

fn messages(v: &Validator, value: &Value) -> Vec<String> {
    v.violations(value).iter().map(ToString::to_string).collect()
}

#[test]
fn validator_accepts_a_good_ticket_and_keeps_key_order() {
    let v = Validator::new(&Taxonomy::builtin_default());
    let ticket = v.parse(&good()).unwrap();
    assert_eq!(ticket.get("subcategory"), Some("VPN"));
    assert_eq!(ticket.to_json(), good());
    let text = serde_json::to_string(&ticket).unwrap();
    assert!(
        text.starts_with("{\"summary\":") && text.ends_with("\"request_type\":\"Incident\"}"),
        "{text}"
    );
}

#[test]
fn validator_explains_each_kind_of_violation_with_its_pointer() {
    let v = Validator::new(&Taxonomy::builtin_default());
    let mut t = good();
    t["category"] = json!("Hardware");
    assert_eq!(
        messages(&v, &t),
        [
            r#"/subcategory: "VPN" is not a subcategory of "Hardware"; under "Hardware" choose one of "Laptop / Desktop", "Monitor / Peripherals", "Mobile Device", "Printer / Scanner", "Other""#
        ]
    );

    let mut t = good();
    t["confidence"] = json!(0.9);
    let m = messages(&v, &t);
    assert_eq!(m.len(), 1);
    assert!(
        m[0].starts_with(r#"/confidence: unknown key "confidence""#),
        "{m:?}"
    );

    let mut t = good();
    t.as_object_mut().unwrap().remove("priority");
    assert_eq!(messages(&v, &t), [r#"/: missing required key "priority""#]);

    let mut t = good();
    t["summary"] = json!("x".repeat(161));
    assert_eq!(
        messages(&v, &t),
        ["/summary: is 161 characters long; at most 160 are allowed"]
    );

    let mut t = good();
    t["summary"] = json!("");
    assert_eq!(messages(&v, &t), ["/summary: must not be empty"]);

    let mut t = good();
    t["priority"] = json!("Urgent");
    assert_eq!(
        messages(&v, &t),
        [r#"/priority: "Urgent" is not one of "Low", "Medium", "High", "Critical""#]
    );

    let mut t = good();
    t["request_type"] = json!(1);
    assert!(messages(&v, &t)[0].starts_with("/request_type: must be a string"));

    assert_eq!(
        messages(&v, &json!([1])),
        ["/: a ticket must be a JSON object, got an array"]
    );
    let err = v.parse_str("{\"summary\": ").unwrap_err();
    assert!(err.to_string().contains("not valid JSON"), "{err}");

    // Several violations are all reported.
    let t = json!({"summary": "", "category": "Nope", "extra": true});
    assert!(v.violations(&t).len() >= 6, "{:?}", messages(&v, &t));
}

#[test]
fn summary_length_counts_characters_not_bytes() {
    let v = Validator::new(&Taxonomy::builtin_default());
    let mut t = good();
    t["summary"] = json!("é".repeat(160));
    assert!(v.parse(&t).is_ok());
    t["summary"] = json!("é".repeat(161));
    assert!(v.parse(&t).is_err());
}

/// The JSON Schema (authority) and the explaining checker must agree on every
/// category/subcategory pair and on a set of mutations of each.
#[test]
fn schema_and_explainer_agree() {
    for t in [
        Taxonomy::builtin_default(),
        Taxonomy::from_file(repo("configs/taxonomy/customer-support.toml")).unwrap(),
    ] {
        let v = Validator::new(&t);
        let mut base = json!({"summary": "s"});
        for f in &t.fields {
            base[&f.name] = json!(f.values[0].name);
        }
        let mut cases = vec![base.clone()];
        for f in &t.fields {
            for value in f.value_names() {
                let mut c = base.clone();
                c[&f.name] = json!(value);
                cases.push(c);
            }
            if let Some(dep) = &f.dependency {
                for (parent, _) in &dep.allowed {
                    for value in f.value_names() {
                        let mut c = base.clone();
                        c[&dep.parent] = json!(parent);
                        c[&f.name] = json!(value);
                        cases.push(c);
                    }
                }
            }
            for bad in [
                json!(null),
                json!(""),
                json!(f.values[0].name.to_lowercase() + "x"),
                json!(["a"]),
            ] {
                let mut c = base.clone();
                c[&f.name] = bad;
                cases.push(c);
            }
        }
        for s in [
            json!(""),
            json!("a".repeat(t.summary.max_length)),
            json!("a".repeat(t.summary.max_length + 1)),
            json!(7),
        ] {
            let mut c = base.clone();
            c["summary"] = s;
            cases.push(c);
        }
        let mut c = base.clone();
        c["x"] = json!(1);
        cases.push(c);
        let mut valid = 0;
        for c in &cases {
            let schema_ok = v.schema_accepts(c);
            let explained = v.violations(c);
            assert_eq!(
                schema_ok,
                explained.is_empty(),
                "{}: disagree on {c}: {explained:?}",
                t.name
            );
            valid += usize::from(schema_ok);
        }
        assert!(
            valid > 10 && valid < cases.len(),
            "{}: {valid} of {}",
            t.name,
            cases.len()
        );
    }
}

fn load_err(text: &str) -> String {
    match Taxonomy::from_toml_str(text, "org.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

const HEAD: &str = "format = 1\nname = \"org\"\ndescription = \"d\"\n";

#[test]
fn malformed_taxonomies_are_rejected_with_file_line_and_reason() {
    // duplicate value, on line 5
    let e = load_err(&format!(
        "{HEAD}[[fields]]\nname = \"priority\"\ndescription = \"p\"\nvalues = [\n  {{ name = \"Low\", description = \"a\" }},\n  {{ name = \"Low\", description = \"b\" }},\n]\n"
    ));
    assert_eq!(e, "org.toml:9: field `priority`: duplicate value \"Low\"");

    // empty enum
    let e = load_err(&format!(
        "{HEAD}[[fields]]\nname = \"priority\"\ndescription = \"p\"\nvalues = []\n"
    ));
    assert!(e.starts_with("org.toml:4: field `priority` has no values"), "{e}");

    // unknown key
    let e = load_err(&format!("{HEAD}colour = \"blue\"\n"));
    assert!(e.starts_with("org.toml:4:1: ") && e.contains("colour"), "{e}");

    // unknown key inside a value
    let e = load_err(&format!(
        "{HEAD}[[fields]]\nname = \"priority\"\ndescription = \"p\"\nvalues = [ {{ name = \"Low\", descripton = \"typo\" }} ]\n"
    ));
    assert!(e.starts_with("org.toml:7:") && e.contains("descripton"), "{e}");

    // missing description
    let e = load_err(&format!(
        "{HEAD}[[fields]]\nname = \"priority\"\ndescription = \"p\"\nvalues = [ {{ name = \"Low\" }} ]\n"
    ));
    assert!(e.starts_with("org.toml:7:") && e.contains("description"), "{e}");

    // syntax error
    let e = load_err(&format!("{HEAD}[[fields]\n"));
    assert!(e.starts_with("org.toml:4:"), "{e}");

    // no fields
    let e = load_err(HEAD);
    assert!(e.contains("no `[[fields]]`"), "{e}");

    // reserved and invalid field names, duplicate field
    let field = |n: &str| {
        format!("[[fields]]\nname = \"{n}\"\ndescription = \"d\"\nvalues = [ {{ name = \"A\", description = \"a\" }} ]\n")
    };
    assert!(load_err(&format!("{HEAD}{}", field("summary"))).contains("reserved"));
    assert!(load_err(&format!("{HEAD}{}", field("Assignment Group"))).contains("[a-z][a-z0-9_]*"));
    let e = load_err(&format!("{HEAD}{}{}", field("queue"), field("queue")));
    assert_eq!(e, "org.toml:9: duplicate field name `queue`");

    // value with surrounding spaces, multi-line description
    assert!(load_err(&format!("{HEAD}[[fields]]\nname = \"a\"\ndescription = \"d\"\nvalues = [ {{ name = \" A\", description = \"a\" }} ]\n")).contains("leading or trailing spaces"));
    assert!(load_err(&format!("{HEAD}[[fields]]\nname = \"a\"\ndescription = \"d\"\nvalues = [ {{ name = \"A\", description = \"a\\nb\" }} ]\n")).contains("single line"));

    // parent value without children; children without a declared child field
    let e = load_err(&format!(
        "{HEAD}[[fields]]\nname = \"category\"\ndescription = \"c\"\n[fields.child]\nname = \"subcategory\"\ndescription = \"s\"\n[[fields.values]]\nname = \"Hardware\"\ndescription = \"h\"\n"
    ));
    assert_eq!(e, "org.toml:11: category \"Hardware\" has no `children`: every category needs its list of subcategory values");
    let e = load_err(&format!(
        "{HEAD}[[fields]]\nname = \"category\"\ndescription = \"c\"\nvalues = [ {{ name = \"A\", description = \"a\", children = [] }} ]\n"
    ));
    assert!(e.contains("declares no `[fields.child]`"), "{e}");

    // duplicate child under one parent; empty children
    let e = load_err(&format!(
        "{HEAD}[[fields]]\nname = \"category\"\ndescription = \"c\"\n[fields.child]\nname = \"sub\"\ndescription = \"s\"\n[[fields.values]]\nname = \"H\"\ndescription = \"h\"\nchildren = [\n {{ name = \"X\", description = \"x\" }},\n {{ name = \"X\", description = \"y\" }},\n]\n"
    ));
    assert_eq!(
        e,
        "org.toml:15: field `sub (under category \"H\")`: duplicate value \"X\""
    );
    let e = load_err(&format!(
        "{HEAD}[[fields]]\nname = \"category\"\ndescription = \"c\"\n[fields.child]\nname = \"sub\"\ndescription = \"s\"\n[[fields.values]]\nname = \"H\"\ndescription = \"h\"\nchildren = []\n"
    ));
    assert!(
        e.starts_with("org.toml:13: field `sub (under category \"H\")` has no values"),
        "{e}"
    );

    // wrong format version
    assert!(
        load_err("format = 2\nname = \"x\"\ndescription = \"d\"\n").contains("unsupported taxonomy format 2")
    );
}

#[test]
fn unreadable_file_names_the_path() {
    let e = Taxonomy::from_file("/nonexistent/taxonomy.toml").unwrap_err();
    assert!(matches!(e, TaxonomyError::Io { .. }));
    assert!(
        e.to_string()
            .starts_with("/nonexistent/taxonomy.toml: cannot read"),
        "{e}"
    );
}

#[test]
fn content_hash_ignores_comments_but_not_values() {
    let base = std::fs::read_to_string(repo("configs/taxonomy/default.toml")).unwrap();
    let a = Taxonomy::from_toml_str(&base, "a").unwrap();
    let b = Taxonomy::from_toml_str(&format!("# a comment\n{base}"), "b").unwrap();
    let c = Taxonomy::from_toml_str(&base.replace("\"Critical\"", "\"Urgent\""), "c").unwrap();
    assert_eq!(a.content_hash(), b.content_hash());
    assert_ne!(a.content_hash(), c.content_hash());
    assert_eq!(a.content_hash().len(), 64);
}

/// Found by the property tests (`tests/fuzz.rs`): a name that is not a valid URI segment (a
/// space, non-ASCII letters) made the schema's `$id` invalid, and `Validator::new` panicked.
#[test]
fn any_taxonomy_name_gives_a_working_validator() {
    let base = std::fs::read_to_string(repo("configs/taxonomy/default.toml")).unwrap();
    let default_id = ticket_schema(&Taxonomy::from_toml_str(&base, "d").unwrap())["$id"].clone();
    assert_eq!(
        default_id, "urn:triage:ticket:default",
        "plain names are unchanged"
    );
    for name in [
        "IT desk – Zürich",
        "a/b?c#d%e",
        "\u{fffd}\u{fffd}",
        "<x> \"y\" {z}",
    ] {
        let text = base.replacen("name = \"default\"", &format!("name = {name:?}"), 1);
        let t = Taxonomy::from_toml_str(&text, "t.toml").unwrap();
        assert_eq!(t.name, name);
        let v = Validator::new(&t);
        let id = v.schema()["$id"].as_str().unwrap().to_owned();
        assert!(
            id.starts_with("urn:triage:ticket:") && id.is_ascii() && !id.contains(' '),
            "{id}"
        );
        v.parse(
            &json!({"summary": "VPN drops", "category": "Network", "subcategory": "VPN",
            "priority": "High", "assignment_group": "Network Operations", "request_type": "Incident"}),
        )
        .unwrap();
    }
    let t =
        Taxonomy::from_toml_str(&base.replacen("name = \"default\"", "name = \"my desk\"", 1), "t").unwrap();
    assert_eq!(ticket_schema(&t)["$id"], "urn:triage:ticket:my%20desk");
}
