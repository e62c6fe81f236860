//! ManageEngine ServiceDesk Plus v3 (`POST /api/v3/requests`), on-premises and Cloud.
//!
//! Vendor rules applied here: the body is `application/x-www-form-urlencoded` with one field,
//! `input_data=<JSON {"request": {...}}>`; header `Accept: application/vnd.manageengine.sdp.v3+json`;
//! on-premises authentication is an `authtoken` header, Cloud uses
//! `Authorization: Zoho-oauthtoken`; lookups are objects `{"name": ...}`; `subject` is at most
//! 250 characters without newlines; the requester is `{"email_id": ...}`; unknown keys are
//! rejected by the server (`EXTRA_KEY_FOUND_IN_JSON`), so only [`REQUEST_KEYS`] are ever sent;
//! errors come as `response_status.messages[]` with codes (4001 …, 4015 = rate limit, 4022 =
//! bad key). The external id goes in a `udf_fields` single-line field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::connector::{line_of, parse_mapping, Auth, Connector};
use crate::http::{form_encode, url_encode, Body, HttpRequest};
use crate::oauth::ZohoOAuth;
use crate::types::{one_line, plain_description, raw_excerpt, PushInput, Pushed, Vendor};
use crate::{ConnectorError, Secret};

/// ServiceDesk Plus's subject limit.
pub const SUBJECT_MAX: usize = 250;

/// The `request` keys this connector may send (all documented v3 request attributes).
pub const REQUEST_KEYS: [&str; 12] = [
    "subject",
    "description",
    "requester",
    "category",
    "subcategory",
    "item",
    "priority",
    "urgency",
    "impact",
    "group",
    "request_type",
    "udf_fields",
];

/// SDP's v3 media type.
pub const ACCEPT: &str = "application/vnd.manageengine.sdp.v3+json";

/// How to authenticate.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SdpAuth {
    /// On-premises technician key in the `authtoken` header.
    Authtoken {
        /// Env var holding the key.
        #[serde(default = "default_authtoken_env")]
        token_env: String,
    },
    /// ServiceDesk Plus Cloud: Zoho OAuth.
    Oauth(ZohoOAuth),
}

fn default_authtoken_env() -> String {
    "SDP_AUTHTOKEN".into()
}

/// Where a taxonomy field goes in an SDP request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "to", rename_all = "snake_case", deny_unknown_fields)]
pub enum SdpTarget {
    /// `category: {"name": value}`.
    Category,
    /// `subcategory: {"name": value}`.
    Subcategory,
    /// `item: {"name": value}`.
    Item,
    /// `group: {"name": value}` (technician group).
    Group,
    /// `udf_fields.<field>: value`.
    Udf {
        /// UDF key (`udf_sline_2`).
        field: String,
    },
}

/// Mapping of a ServiceDesk Plus instance (`configs/connectors/sdp.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdpMapping {
    /// `https://sdp.example.com` or `https://sdpondemand.manageengine.com/app/itdesk`
    /// (the env var `SDP_BASE_URL` overrides it).
    pub base_url: String,
    /// Authentication.
    pub auth: SdpAuth,
    /// Requester used when the push names none.
    pub default_requester_email: String,
    /// Taxonomy `priority` value → SDP priority name.
    #[serde(default)]
    pub priorities: BTreeMap<String, String>,
    /// Taxonomy `request_type` value → SDP request type name.
    #[serde(default)]
    pub request_types: BTreeMap<String, String>,
    /// Taxonomy field → where it goes.
    #[serde(default)]
    pub fields: BTreeMap<String, SdpTarget>,
    /// UDF holding the external id.
    #[serde(default = "default_udf")]
    pub external_id_field: String,
}

fn default_udf() -> String {
    "udf_sline_1".into()
}

impl SdpMapping {
    /// The instance: `SDP_BASE_URL`, else `base_url`.
    pub fn base(&self) -> String {
        std::env::var("SDP_BASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.base_url.clone())
            .trim_end_matches('/')
            .to_owned()
    }

    fn check(&self, text: &str, path: &Path) -> Result<(), ConnectorError> {
        let udfs = self.fields.values().filter_map(|t| match t {
            SdpTarget::Udf { field } => Some(field),
            _ => None,
        });
        for f in std::iter::once(&self.external_id_field).chain(udfs) {
            if !f.starts_with("udf_") {
                let line = text
                    .lines()
                    .position(|l| l.contains(&format!("\"{f}\"")))
                    .map(|i| i + 1)
                    .or_else(|| line_of(text, "external_id_field"));
                return Err(ConnectorError::Mapping {
                    path: path.to_owned(),
                    line,
                    key: Some(if *f == self.external_id_field { "external_id_field".into() } else { "field".into() }),
                    problem: format!("UDF key {f:?} does not start with udf_"),
                    fix: "use the UDF's API key, e.g. udf_sline_1 (Admin → Customization → Request → Additional Fields)".into(),
                });
            }
        }
        Ok(())
    }
}

/// SDP's description is HTML: escape the text and keep line breaks.
fn html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("<br>"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The `{"request": {...}}` object sent as `input_data`.
pub fn request_payload(input: &PushInput, ext_id: &str, m: &SdpMapping) -> Value {
    let t = &input.ticket;
    let mut r = Map::new();
    r.insert(
        "subject".into(),
        Value::String(one_line(t.summary(), SUBJECT_MAX)),
    );
    r.insert(
        "description".into(),
        Value::String(html(&plain_description(input))),
    );
    let requester = input
        .requester
        .clone()
        .unwrap_or_else(|| m.default_requester_email.clone());
    r.insert("requester".into(), json!({ "email_id": requester }));
    if let Some(p) = t.get("priority").and_then(|p| m.priorities.get(p)) {
        r.insert("priority".into(), json!({ "name": p }));
    }
    if let Some(k) = t.get("request_type").and_then(|x| m.request_types.get(x)) {
        r.insert("request_type".into(), json!({ "name": k }));
    }
    let mut udf = Map::new();
    udf.insert(m.external_id_field.clone(), Value::String(ext_id.to_owned()));
    for (field, target) in &m.fields {
        let Some(v) = t.get(field) else { continue };
        let key = match target {
            SdpTarget::Category => "category",
            SdpTarget::Subcategory => "subcategory",
            SdpTarget::Item => "item",
            SdpTarget::Group => "group",
            SdpTarget::Udf { field } => {
                udf.insert(field.clone(), Value::String(v.to_owned()));
                continue;
            }
        };
        r.insert(key.into(), json!({ "name": v }));
    }
    r.insert("udf_fields".into(), Value::Object(udf));
    json!({ "request": r })
}

/// `response_status.messages[]` as one line, verbatim, with the codes.
pub fn error_text(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return raw_excerpt(body);
    };
    let statuses: Vec<&Value> = match &v["response_status"] {
        Value::Array(a) => a.iter().collect(),
        Value::Null => vec![],
        other => vec![other],
    };
    let mut parts = Vec::new();
    for s in statuses {
        for m in s["messages"].as_array().into_iter().flatten() {
            let code = m["status_code"]
                .as_i64()
                .map(|c| c.to_string())
                .unwrap_or_default();
            let field = m["field"].as_str().map(|f| format!(" {f}")).unwrap_or_default();
            let msg = m["message"].as_str().unwrap_or(m["type"].as_str().unwrap_or(""));
            parts.push(format!("{code}{field}: {msg}").trim().to_owned());
        }
    }
    if parts.is_empty() {
        raw_excerpt(body)
    } else {
        parts.join("; ")
    }
}

/// Whether SDP signalled its rate limit (code 4015), whatever the HTTP status.
pub fn is_rate_limited(body: &str) -> bool {
    serde_json::from_str::<Value>(body).is_ok_and(|v| {
        let statuses: Vec<Value> = match &v["response_status"] {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        statuses.iter().any(|s| {
            s["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["status_code"].as_i64() == Some(4015))
        })
    })
}

/// The ServiceDesk Plus connector.
#[derive(Debug, Clone)]
pub struct Sdp {
    /// Its mapping.
    pub mapping: SdpMapping,
    /// The mapping file.
    pub path: PathBuf,
}

fn bad(m: impl Into<String>) -> ConnectorError {
    ConnectorError::bad_response("sdp", m)
}

impl Sdp {
    /// Parses and checks a mapping (`path` is named in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConnectorError> {
        let mapping: SdpMapping = parse_mapping(text, path)?;
        mapping.check(text, path)?;
        Ok(Sdp {
            mapping,
            path: path.to_owned(),
        })
    }

    fn url(&self, id: &str) -> String {
        format!(
            "{}/WorkOrder.do?woMode=viewWO&woID={}",
            self.mapping.base(),
            url_encode(id)
        )
    }

    fn json(body: &str) -> Result<Value, ConnectorError> {
        serde_json::from_str(body).map_err(|e| bad(format!("not JSON: {e}: {}", raw_excerpt(body))))
    }
}

impl Connector for Sdp {
    fn vendor(&self) -> Vendor {
        Vendor::Sdp
    }

    fn mapping_path(&self) -> &Path {
        &self.path
    }

    fn auth(&self, dry_run: bool) -> Result<Auth<'_>, ConnectorError> {
        match &self.mapping.auth {
            SdpAuth::Authtoken { token_env } => Ok(Auth::Headers(vec![(
                "authtoken".into(),
                Secret::for_request(token_env, dry_run)?,
            )])),
            SdpAuth::Oauth(o) => Ok(Auth::ZohoOAuth(o)),
        }
    }

    fn create_request(&self, input: &PushInput, ext_id: &str) -> Result<HttpRequest, ConnectorError> {
        let mut r = HttpRequest::new("POST", format!("{}/api/v3/requests", self.mapping.base()));
        r.headers.push(("Accept".into(), ACCEPT.into()));
        let payload = request_payload(input, ext_id, &self.mapping);
        r.body = Body::Form(vec![("input_data".into(), payload.to_string())]);
        Ok(r)
    }

    fn search_request(&self, ext_id: &str) -> HttpRequest {
        let input = json!({"list_info": {
            "row_count": 10,
            "sort_field": "created_time",
            "sort_order": "asc",
            "search_criteria": [{
                "field": format!("udf_fields.{}", self.mapping.external_id_field),
                "condition": "is",
                "value": ext_id,
            }],
        }});
        let q = form_encode(&[("input_data".into(), input.to_string())]);
        let mut r = HttpRequest::new("GET", format!("{}/api/v3/requests?{q}", self.mapping.base()));
        r.headers.push(("Accept".into(), ACCEPT.into()));
        r
    }

    fn parse_created(&self, body: &str) -> Result<Pushed, ConnectorError> {
        let v = Self::json(body)?;
        // SDP can answer a refused create with HTTP 200 and `"status": "failed"`: nothing
        // was created, and its own messages say why.
        if v["response_status"]["status"].as_str() == Some("failed") {
            return Err(ConnectorError::Vendor {
                vendor: Vendor::Sdp.as_str(),
                request: "the create (POST /api/v3/requests)".into(),
                status: 200,
                message: error_text(body),
            });
        }
        let id = id_of(&v["request"]).ok_or_else(|| bad("no `request.id` in the response"))?;
        Ok(Pushed::new(id.clone(), None, Some(self.url(&id))))
    }

    fn parse_search(&self, body: &str) -> Result<Vec<Pushed>, ConnectorError> {
        let v = Self::json(body)?;
        // No `requests` list is not "nothing found": treating it so would create a duplicate.
        let requests = v["requests"]
            .as_array()
            .ok_or_else(|| bad("no `requests` list in the search response"))?;
        Ok(requests
            .iter()
            .filter_map(id_of)
            .map(|id| Pushed::new(id.clone(), None, Some(self.url(&id))))
            .collect())
    }

    fn error_text(&self, body: &str) -> String {
        error_text(body)
    }

    fn rate_limited(&self, body: &str) -> bool {
        is_rate_limited(body)
    }
}

fn id_of(v: &Value) -> Option<String> {
    match &v["id"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
