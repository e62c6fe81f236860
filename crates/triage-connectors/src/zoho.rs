//! Zoho Desk (`POST /api/v1/tickets`); authentication is the Zoho OAuth flow of
//! [`crate::oauth`], shared with ServiceDesk Plus Cloud.
//!
//! Vendor rules applied here: headers `Authorization: Zoho-oauthtoken <token>` and `orgId`;
//! `subject` (≤ 255 characters) and `departmentId` are required, plus `contactId` or
//! `contact{lastName|email}`; `category`, `subCategory`, `priority`, `classification` are
//! top-level, custom fields go in `cf`; ids are 18–19 digit numbers, kept as strings (a JSON
//! number would lose digits in JavaScript clients). The external id is a custom field, found
//! again with `GET /api/v1/tickets/search?customField1=<cf>:<id>` (204 when nothing matches).
//! The host follows the OAuth data centre ([`crate::Region::desk_url`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::connector::{line_of, parse_mapping, Auth, Connector};
use crate::http::{Body, HttpRequest};
use crate::oauth::ZohoOAuth;
use crate::types::{one_line, plain_description, raw_excerpt, PushInput, Pushed, Vendor};
use crate::ConnectorError;

/// Zoho Desk's subject limit.
pub const SUBJECT_MAX: usize = 255;

/// A default contact for tickets without a known requester.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZohoContact {
    /// E-mail.
    pub email: String,
    /// Last name (Zoho requires one of lastName / email; both are sent).
    pub last_name: String,
}

/// Mapping of a Zoho Desk department (`configs/connectors/zoho.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZohoMapping {
    /// OAuth settings.
    pub oauth: ZohoOAuth,
    /// Override of the data centre's desk host (the env var `ZOHO_DESK_URL` overrides both).
    #[serde(default)]
    pub desk_url: Option<String>,
    /// Organisation id (string: 18–19 digits).
    pub org_id: String,
    /// Department id (string).
    pub department_id: String,
    /// Contact used when the push names no requester.
    pub contact: ZohoContact,
    /// Taxonomy field → Zoho `category` (default `category`).
    #[serde(default = "default_category")]
    pub category_from: Option<String>,
    /// Taxonomy field → Zoho `subCategory` (default `subcategory`).
    #[serde(default = "default_subcategory")]
    pub subcategory_from: Option<String>,
    /// Taxonomy `priority` value → Zoho priority.
    #[serde(default)]
    pub priorities: BTreeMap<String, String>,
    /// Taxonomy `request_type` value → Zoho `classification`.
    #[serde(default)]
    pub classifications: BTreeMap<String, String>,
    /// Taxonomy field → custom field API name (`cf_assignment_group`).
    #[serde(default)]
    pub custom_fields: BTreeMap<String, String>,
    /// Custom field holding the external id.
    #[serde(default = "default_external_cf")]
    pub external_id_field: String,
}

fn default_category() -> Option<String> {
    Some("category".into())
}
fn default_subcategory() -> Option<String> {
    Some("subcategory".into())
}
fn default_external_cf() -> String {
    "cf_triage_id".into()
}

impl ZohoMapping {
    /// The desk host: `ZOHO_DESK_URL`, else `desk_url`, else the data centre's.
    pub fn base(&self) -> String {
        std::env::var("ZOHO_DESK_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.desk_url.clone())
            .unwrap_or_else(|| self.oauth.region.desk_url())
            .trim_end_matches('/')
            .to_owned()
    }

    fn check(&self, text: &str, path: &Path) -> Result<(), ConnectorError> {
        for (name, id) in [("org_id", &self.org_id), ("department_id", &self.department_id)] {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ConnectorError::Mapping {
                    path: path.to_owned(),
                    line: line_of(text, name),
                    key: Some(name.to_owned()),
                    problem: format!("{id:?} is not a numeric id"),
                    fix: "write the id from Zoho Desk (Setup → Developer Space → API) as a quoted string"
                        .into(),
                });
            }
        }
        Ok(())
    }
}

/// The `POST /api/v1/tickets` body.
pub fn ticket_payload(input: &PushInput, ext_id: &str, m: &ZohoMapping) -> Value {
    let t = &input.ticket;
    let mut body = Map::new();
    body.insert(
        "subject".into(),
        Value::String(one_line(t.summary(), SUBJECT_MAX)),
    );
    body.insert("departmentId".into(), Value::String(m.department_id.clone()));
    let contact = match &input.requester {
        Some(email) => json!({ "email": email, "lastName": email.split('@').next().unwrap_or(email) }),
        None => json!({ "email": m.contact.email, "lastName": m.contact.last_name }),
    };
    body.insert("contact".into(), contact);
    body.insert("description".into(), Value::String(plain_description(input)));
    if let Some(v) = m.category_from.as_deref().and_then(|f| t.get(f)) {
        body.insert("category".into(), Value::String(v.to_owned()));
    }
    if let Some(v) = m.subcategory_from.as_deref().and_then(|f| t.get(f)) {
        body.insert("subCategory".into(), Value::String(v.to_owned()));
    }
    if let Some(p) = t.get("priority").and_then(|p| m.priorities.get(p)) {
        body.insert("priority".into(), Value::String(p.clone()));
    }
    if let Some(c) = t.get("request_type").and_then(|r| m.classifications.get(r)) {
        body.insert("classification".into(), Value::String(c.clone()));
    }
    let mut cf = Map::new();
    cf.insert(m.external_id_field.clone(), Value::String(ext_id.to_owned()));
    for (field, api) in &m.custom_fields {
        if let Some(v) = t.get(field) {
            cf.insert(api.clone(), Value::String(v.to_owned()));
        }
    }
    body.insert("cf".into(), Value::Object(cf));
    Value::Object(body)
}

/// Zoho's error body (`errorCode`, `message`, `errors[]`) as one line, verbatim.
pub fn error_text(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return raw_excerpt(body);
    };
    let mut parts = Vec::new();
    if let Some(c) = v["errorCode"].as_str() {
        parts.push(c.to_owned());
    }
    if let Some(m) = v["message"].as_str() {
        parts.push(m.to_owned());
    }
    for e in v["errors"].as_array().into_iter().flatten() {
        let field = e["fieldName"].as_str().unwrap_or("?");
        let kind = e["errorType"].as_str().unwrap_or("");
        let msg = e["errorMessage"].as_str().unwrap_or("");
        parts.push(format!("{field} {kind} {msg}").trim().to_owned());
    }
    if parts.is_empty() {
        raw_excerpt(body)
    } else {
        parts.join(": ")
    }
}

/// The Zoho Desk connector.
#[derive(Debug, Clone)]
pub struct Zoho {
    /// Its mapping.
    pub mapping: ZohoMapping,
    /// The mapping file.
    pub path: PathBuf,
}

fn bad(m: impl Into<String>) -> ConnectorError {
    ConnectorError::bad_response("zoho", m)
}

impl Zoho {
    /// Parses and checks a mapping (`path` is named in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConnectorError> {
        let mapping: ZohoMapping = parse_mapping(text, path)?;
        mapping.check(text, path)?;
        Ok(Zoho {
            mapping,
            path: path.to_owned(),
        })
    }

    fn headers(&self, r: &mut HttpRequest) {
        r.headers.push(("orgId".into(), self.mapping.org_id.clone()));
        r.headers.push(("Accept".into(), "application/json".into()));
    }
}

impl Connector for Zoho {
    fn vendor(&self) -> Vendor {
        Vendor::Zoho
    }

    fn mapping_path(&self) -> &Path {
        &self.path
    }

    fn auth(&self, _dry_run: bool) -> Result<Auth<'_>, ConnectorError> {
        Ok(Auth::ZohoOAuth(&self.mapping.oauth))
    }

    fn create_request(&self, input: &PushInput, ext_id: &str) -> Result<HttpRequest, ConnectorError> {
        let mut r = HttpRequest::new("POST", format!("{}/api/v1/tickets", self.mapping.base()));
        self.headers(&mut r);
        r.body = Body::Json(ticket_payload(input, ext_id, &self.mapping));
        Ok(r)
    }

    fn search_request(&self, ext_id: &str) -> HttpRequest {
        let q = crate::http::url_encode(&format!("{}:{ext_id}", self.mapping.external_id_field));
        let mut r = HttpRequest::new(
            "GET",
            format!(
                "{}/api/v1/tickets/search?customField1={q}&limit=10",
                self.mapping.base()
            ),
        );
        self.headers(&mut r);
        r
    }

    fn parse_created(&self, body: &str) -> Result<Pushed, ConnectorError> {
        let v: Value =
            serde_json::from_str(body).map_err(|e| bad(format!("not JSON: {e}: {}", raw_excerpt(body))))?;
        ticket_ref(&v).ok_or_else(|| bad("no `id` in the response"))
    }

    fn parse_search(&self, body: &str) -> Result<Vec<Pushed>, ConnectorError> {
        if body.trim().is_empty() {
            return Ok(Vec::new()); // 204 No Content: nothing found
        }
        let v: Value =
            serde_json::from_str(body).map_err(|e| bad(format!("not JSON: {e}: {}", raw_excerpt(body))))?;
        // A body without a `data` list is not "nothing found" (that is 204): treating it so
        // would create a duplicate.
        let data = v["data"].as_array().ok_or_else(|| {
            bad(format!(
                "no `data` list in the search response: {}",
                raw_excerpt(body)
            ))
        })?;
        Ok(data.iter().filter_map(ticket_ref).collect())
    }

    fn error_text(&self, body: &str) -> String {
        error_text(body)
    }
}

fn ticket_ref(v: &Value) -> Option<Pushed> {
    let id = match &v["id"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Some(Pushed::new(
        id,
        v["ticketNumber"].as_str().map(str::to_owned),
        v["webUrl"].as_str().map(str::to_owned),
    ))
}
