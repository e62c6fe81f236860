//! Payload rules per vendor. The Jira and JSM bodies are checked against Atlassian's own
//! schemas from `../shared/fixtures/itsm/`: the Jira Cloud platform OpenAPI spec
//! (`IssueUpdateDetails`) and the ADF JSON Schema (draft-04) for `description`.

use std::path::PathBuf;

use serde_json::Value;
use triage_connectors::sdp::Sdp;
use triage_connectors::zoho::Zoho;
use triage_connectors::{
    adf, dry_run, jira, sdp, zoho, Connector, ConnectorError, PushInput, Region, Vendor,
};
use triage_taxonomy::{Taxonomy, Validator};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/itsm")
}

fn load(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the tests expect ../shared beside the checkout)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn mapping_path(vendor: Vendor) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../configs/connectors/{vendor}.toml"))
}

fn connector(vendor: Vendor) -> Box<dyn Connector> {
    triage_connectors::load(vendor, Some(&mapping_path(vendor))).unwrap()
}

fn mapping_text(vendor: Vendor) -> String {
    std::fs::read_to_string(mapping_path(vendor)).unwrap()
}

/// Inputs that stress the rules: every category, a 300-character summary, CRLF and blank
/// lines, quoted e-mail text, whitespace-only lines, an empty report, non-ASCII.
fn inputs() -> Vec<PushInput> {
    let taxonomy = Taxonomy::builtin_default();
    let v = Validator::new(&taxonomy);
    let mut out = Vec::new();
    let cat = taxonomy.field("category").unwrap();
    let sub = taxonomy.field("subcategory").unwrap();
    let texts = [
        "my VPN drops every 10 min since the update, payroll is due today!",
        "Hello,\r\n\r\nthe printer on floor 3 is jammed.\r\n   \r\nThanks\r\nAnna",
        "",
        "Any update?\n\nOn Monday Anna wrote:\n> Hi,\n>\n> Outlook crashes on start.\n\n\n\n",
        "Drucker im 3. OG druckt nicht – Fehler 0x80070005 ⚠️",
    ];
    for (i, c) in cat.value_names().enumerate() {
        let s = &sub.allowed_under(c).unwrap()[0].name;
        let summary = if i == 0 {
            "x".repeat(160)
        } else {
            format!("{c} problem")
        };
        let ticket = v
            .parse(&serde_json::json!({"summary": summary, "category": c, "subcategory": s, "priority": "High",
                "assignment_group": "Service Desk", "request_type": if i % 2 == 0 { "Incident" } else { "Service Request" }}))
            .unwrap();
        out.push(PushInput {
            ticket,
            text: texts[i % texts.len()].to_owned(),
            source_message_id: None,
            requester: (i == 3).then(|| "anna@example.com".to_owned()),
        });
    }
    out
}

fn jira_validator() -> jsonschema::Validator {
    let mut spec = load("jira-platform-openapi-v3.json");
    // Draft 7 ignores keywords beside a root `$ref`, so the spec itself becomes the schema
    // document that `#/components/schemas/...` references resolve in.
    spec["$ref"] = Value::String("#/components/schemas/IssueUpdateDetails".into());
    jsonschema::draft7::new(&spec).expect("the Jira OpenAPI components compile")
}

fn adf_validator() -> jsonschema::Validator {
    jsonschema::draft4::new(&load("adf-schema-v1-full.json")).expect("the ADF schema compiles")
}

fn assert_valid(v: &jsonschema::Validator, doc: &Value, what: &str) {
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} is invalid:\n{}\n{}",
        errors.join("\n"),
        serde_json::to_string_pretty(doc).unwrap()
    );
}

/// The JSON body of a `--dry-run` rendering.
fn dry_run_body(rendered: &str) -> Value {
    let (_, body) = rendered.split_once("\n\n").expect("headers, blank line, body");
    serde_json::from_str(body).expect("JSON body")
}

#[tokio::test]
async fn jira_dry_run_bodies_validate_against_the_openapi_spec_and_adf_schema() {
    let (issue, adf_v) = (jira_validator(), adf_validator());
    let c = connector(Vendor::Jira);
    for input in inputs() {
        let rendered = dry_run(&*c, &input).await.unwrap();
        assert!(rendered.starts_with("POST https://your-domain.atlassian.net/rest/api/3/issue HTTP/1.1\n"));
        assert!(rendered.contains("Authorization: <redacted>"));
        let body = dry_run_body(&rendered);
        assert_valid(&issue, &body, "IssueUpdateDetails");
        let fields = &body["fields"];
        assert_valid(&adf_v, &fields["description"], "description (ADF)");
        let summary = fields["summary"].as_str().unwrap();
        assert!(summary.chars().count() <= jira::SUMMARY_MAX && !summary.contains('\n'));
        for l in fields["labels"].as_array().unwrap() {
            assert!(
                !l.as_str().unwrap().contains(char::is_whitespace),
                "label with a space: {l}"
            );
        }
        assert!(fields["labels"][0].as_str().unwrap().starts_with("triage-"));
        assert_eq!(fields["project"]["key"], "IT");
    }
}

#[tokio::test]
async fn jsm_dry_run_bodies_carry_an_adf_description_and_the_required_keys() {
    let adf_v = adf_validator();
    let c = connector(Vendor::Jsm);
    for input in inputs() {
        let rendered = dry_run(&*c, &input).await.unwrap();
        assert!(rendered
            .starts_with("POST https://your-domain.atlassian.net/rest/servicedeskapi/request HTTP/1.1\n"));
        let body = dry_run_body(&rendered);
        assert!(
            body["serviceDeskId"].is_string() && body["requestTypeId"].is_string(),
            "{body}"
        );
        assert_eq!(body["isAdfRequest"], true);
        let values = &body["requestFieldValues"];
        assert_valid(&adf_v, &values["description"], "JSM description (ADF)");
        assert!(values["summary"].as_str().unwrap().chars().count() <= 255);
        assert_eq!(body.get("raiseOnBehalfOf").is_some(), input.requester.is_some());
        if let Some(who) = &input.requester {
            // A dry run sends nothing, so the accountId lookup is shown, not done.
            assert_eq!(
                body["raiseOnBehalfOf"],
                format!("<accountId of {who}, looked up when sent>")
            );
        }
    }
}

#[test]
fn the_validators_are_not_vacuous() {
    let adf_v = adf_validator();
    assert!(adf_v.is_valid(&adf::doc(adf::paragraphs("a\n\nb"))));
    // A text node with empty text, a doc without version, an unknown node type: all invalid.
    let empty_text = serde_json::json!({"version":1,"type":"doc","content":[{"type":"paragraph","content":[{"type":"text","text":""}]}]});
    assert!(!adf_v.is_valid(&empty_text));
    assert!(!adf_v.is_valid(&serde_json::json!({"type":"doc","content":[]})));
    assert!(!adf_v.is_valid(&serde_json::json!({"version":1,"type":"doc","content":[{"type":"blink"}]})));
    let issue = jira_validator();
    assert!(
        !issue.is_valid(&serde_json::json!({"fields": []})),
        "fields must be an object"
    );
    assert!(!issue.is_valid(
        &serde_json::json!({"update": {"labels": [{"add": 1, "bogus": true}]}, "properties": "x"})
    ));
}

#[tokio::test]
async fn zoho_payload_follows_the_desk_rules() {
    let c = connector(Vendor::Zoho);
    let z = Zoho::from_toml(&mapping_text(Vendor::Zoho), &mapping_path(Vendor::Zoho)).unwrap();
    for input in inputs() {
        let body = zoho::ticket_payload(&input, "triage-0123456789abcdef", &z.mapping);
        let subject = body["subject"].as_str().unwrap();
        assert!(!subject.is_empty() && subject.chars().count() <= zoho::SUBJECT_MAX);
        assert!(body["departmentId"].is_string(), "ids stay strings");
        let contact = &body["contact"];
        assert!(contact["email"].is_string() || contact["lastName"].is_string());
        assert_eq!(body["cf"]["cf_triage_id"], "triage-0123456789abcdef");
        assert_eq!(body["category"], input.ticket.get("category").unwrap());
        assert_eq!(body["subCategory"], input.ticket.get("subcategory").unwrap());
        let rendered = dry_run(&*c, &input).await.unwrap();
        assert!(rendered.contains("orgId: 60001234567") && rendered.contains("Authorization: <redacted>"));
    }
    // A numeric id in the mapping is refused with the file, line and advice, not rounded.
    let path = mapping_path(Vendor::Zoho);
    let text = mapping_text(Vendor::Zoho).replace(
        "department_id = \"1892000000006907\"",
        "department_id = 1892000000006907",
    );
    let err = triage_connectors::from_toml_str(Vendor::Zoho, &text, &path).unwrap_err();
    let line = text.lines().position(|l| l.starts_with("department_id")).unwrap() + 1;
    assert!(
        matches!(&err, ConnectorError::Mapping { line: Some(l), key: Some(k), .. } if *l == line && k == "department_id"),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("zoho.toml:{line}")), "{err}");
    // An id that is a string but not a number: named too.
    let text = mapping_text(Vendor::Zoho).replace("org_id = \"60001234567\"", "org_id = \"acme\"");
    let err = triage_connectors::from_toml_str(Vendor::Zoho, &text, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`org_id`") && err.contains("quoted string"), "{err}");
    let bad_region = mapping_text(Vendor::Zoho).replace("region = \"com\"", "region = \"mars\"");
    let err = triage_connectors::from_toml_str(Vendor::Zoho, &bad_region, &path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data centre") && err.contains("uk") && err.contains("ae"),
        "{err}"
    );
}

#[tokio::test]
async fn every_zoho_data_centre_reaches_its_own_desk_host() {
    std::env::remove_var("ZOHO_DESK_URL");
    for region in Region::ALL {
        let text = mapping_text(Vendor::Zoho)
            .replace("region = \"com\"", &format!("region = \"{}\"", region.code()));
        let c = triage_connectors::from_toml_str(Vendor::Zoho, &text, &mapping_path(Vendor::Zoho)).unwrap();
        let rendered = dry_run(&*c, &inputs()[0]).await.unwrap();
        let first = rendered.lines().next().unwrap();
        assert_eq!(
            first,
            format!("POST {}/api/v1/tickets HTTP/1.1", region.desk_url()),
            "{region}"
        );
    }
    let ca = mapping_text(Vendor::Zoho).replace("region = \"com\"", "region = \"ca\"");
    let z = Zoho::from_toml(&ca, &mapping_path(Vendor::Zoho)).unwrap();
    assert_eq!(z.mapping.oauth.accounts(), "https://accounts.zohocloud.ca");
    assert_eq!(z.mapping.base(), "https://desk.zohocloud.ca");
}

#[tokio::test]
async fn sdp_payload_is_form_encoded_input_data_with_only_known_keys() {
    let c = connector(Vendor::Sdp);
    let s = Sdp::from_toml(&mapping_text(Vendor::Sdp), &mapping_path(Vendor::Sdp)).unwrap();
    for input in inputs() {
        let body = sdp::request_payload(&input, "triage-0123456789abcdef", &s.mapping);
        let request = body["request"].as_object().unwrap();
        for key in request.keys() {
            assert!(
                sdp::REQUEST_KEYS.contains(&key.as_str()),
                "EXTRA_KEY_FOUND_IN_JSON risk: {key}"
            );
        }
        let subject = request["subject"].as_str().unwrap();
        assert!(subject.chars().count() <= sdp::SUBJECT_MAX && !subject.contains(['\n', '\r']));
        assert!(request["requester"]["email_id"].is_string());
        for lookup in ["category", "subcategory", "priority", "group", "request_type"] {
            assert!(
                request[lookup]["name"].is_string(),
                "{lookup} must be a {{\"name\": ...}} lookup"
            );
        }
        assert_eq!(request["udf_fields"]["udf_sline_1"], "triage-0123456789abcdef");
        assert!(
            !request["description"].as_str().unwrap().contains('<')
                || request["description"].as_str().unwrap().contains("<br>")
        );
        let rendered = dry_run(&*c, &input).await.unwrap();
        assert!(rendered.contains("Accept: application/vnd.manageengine.sdp.v3+json"));
        assert!(rendered.contains("Content-Type: application/x-www-form-urlencoded"));
        assert!(rendered.contains("authtoken: <redacted>"));
        let form = rendered.split_once("\n\n").unwrap().1.trim();
        assert!(form.starts_with("input_data=%7B%22request%22"), "{form}");
    }
    let text = "base_url = \"https://x\"\ndefault_requester_email = \"a@b\"\nexternal_id_field = \"triage_id\"\n[auth]\nkind = \"authtoken\"\n";
    let err =
        triage_connectors::from_toml_str(Vendor::Sdp, text, std::path::Path::new("sdp.toml")).unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Mapping { line: Some(3), .. }) && err.to_string().contains("udf_"),
        "{err:?}"
    );
}

#[test]
fn external_ids_are_deterministic_and_depend_on_text_and_message_id() {
    let a = inputs().remove(0);
    let mut b = a.clone();
    b.text = format!("  {}  ", a.text.replace(' ', "  "));
    assert_eq!(
        triage_connectors::external_id(&a),
        triage_connectors::external_id(&b),
        "whitespace does not matter"
    );
    let mut c = a.clone();
    c.source_message_id = Some("<abc@mail>".into());
    assert_ne!(
        triage_connectors::external_id(&a),
        triage_connectors::external_id(&c)
    );
    let mut d = a.clone();
    d.text.push('!');
    assert_ne!(
        triage_connectors::external_id(&a),
        triage_connectors::external_id(&d)
    );
}

/// A search answer without its hit list is an error, never "not found" (which would create a
/// duplicate ticket); an empty list, or Zoho's empty 204 body, is "not found".
#[test]
fn a_search_answer_without_its_list_is_an_error_not_a_miss() {
    for (vendor, list, other) in [
        (
            Vendor::Sdp,
            r#"{"requests":[]}"#,
            r#"{"response_status":{"status":"success"}}"#,
        ),
        (Vendor::Zoho, r#"{"data":[]}"#, r#"{"errorCode":"UNKNOWN"}"#),
        (Vendor::Jira, r#"{"issues":[]}"#, r#"{"total":0}"#),
    ] {
        let c = connector(vendor);
        assert_eq!(c.parse_search(list).unwrap().len(), 0, "{vendor}");
        let e = c.parse_search(other).unwrap_err().to_string();
        assert!(e.contains("search response"), "{vendor}: {e}");
    }
    assert!(connector(Vendor::Zoho).parse_search("").unwrap().is_empty());
}
