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

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::http::{form_encode, url_encode, Body, HttpRequest};
use crate::push::{one_line, PushInput, Pushed};
use crate::zoho::ZohoOAuth;
use crate::ConnectorError;

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
    pub(crate) fn base(&self) -> String {
        std::env::var("SDP_BASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.base_url.clone())
            .trim_end_matches('/')
            .to_owned()
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if let SdpAuth::Oauth(o) = &self.auth {
            o.check()?;
        }
        for f in
            std::iter::once(&self.external_id_field).chain(self.fields.values().filter_map(|t| match t {
                SdpTarget::Udf { field } => Some(field),
                _ => None,
            }))
        {
            if !f.starts_with("udf_") {
                return Err(format!("UDF key {f:?} must start with udf_ (e.g. udf_sline_1)"));
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
    let classification: Vec<String> = t.fields().map(|(k, v)| format!("{k}: {v}")).collect();
    let mut description = format!("{}\n{}", t.summary(), classification.join(" · "));
    if !input.text.trim().is_empty() {
        description.push_str("\n\nReported text:\n");
        description.push_str(input.text.trim());
    }
    r.insert("description".into(), Value::String(html(&description)));
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
        return crate::push::raw_excerpt(body);
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
        crate::push::raw_excerpt(body)
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
}

impl Sdp {
    pub(crate) fn create(&self, input: &PushInput, ext_id: &str) -> HttpRequest {
        let mut r = HttpRequest::new("POST", format!("{}/api/v3/requests", self.mapping.base()));
        r.headers.push(("Accept".into(), ACCEPT.into()));
        let payload = request_payload(input, ext_id, &self.mapping);
        r.body = Body::Form(vec![("input_data".into(), payload.to_string())]);
        r
    }

    pub(crate) fn search(&self, ext_id: &str) -> HttpRequest {
        let input = json!({"list_info": {"row_count": 1, "search_criteria": [{
            "field": format!("udf_fields.{}", self.mapping.external_id_field),
            "condition": "is",
            "value": ext_id,
        }]}});
        let q = form_encode(&[("input_data".into(), input.to_string())]);
        let mut r = HttpRequest::new("GET", format!("{}/api/v3/requests?{q}", self.mapping.base()));
        r.headers.push(("Accept".into(), ACCEPT.into()));
        r
    }

    fn url(&self, id: &str) -> String {
        format!(
            "{}/WorkOrder.do?woMode=viewWO&woID={}",
            self.mapping.base(),
            url_encode(id)
        )
    }

    pub(crate) fn parse_created(&self, body: &str) -> Result<Pushed, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        let id = id_of(&v["request"]).ok_or("no `request.id` in the response")?;
        Ok(Pushed::new(id.clone(), None, Some(self.url(&id))))
    }

    pub(crate) fn parse_search(&self, body: &str) -> Result<Option<Pushed>, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        Ok(v["requests"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(id_of)
            .map(|id| Pushed::new(id.clone(), None, Some(self.url(&id)))))
    }

    pub(crate) fn auth_kind(&self) -> &SdpAuth {
        &self.mapping.auth
    }
}

fn id_of(v: &Value) -> Option<String> {
    match &v["id"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(crate) fn authtoken_header(
    token_env: &str,
    dry_run: bool,
) -> Result<(String, crate::Secret), ConnectorError> {
    let token = crate::Secret::for_request(token_env, dry_run)?;
    Ok(("authtoken".into(), token))
}
