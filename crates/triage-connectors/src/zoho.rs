//! Zoho Desk (`POST /api/v1/tickets`) and the Zoho OAuth refresh-token flow that Zoho Desk and
//! ServiceDesk Plus Cloud share.
//!
//! Vendor rules applied here: headers `Authorization: Zoho-oauthtoken <token>` and `orgId`;
//! `subject` (≤ 255 characters) and `departmentId` are required, plus `contactId` or
//! `contact{lastName|email}`; `category`, `subCategory`, `priority`, `classification` are
//! top-level, custom fields go in `cf`; ids are 18–19 digit numbers, kept as strings (a JSON
//! number would lose digits in JavaScript clients). The external id is a custom field, found
//! again with `GET /api/v1/tickets/search?customField1=<cf>:<id>` (204 when nothing matches).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::http::{Body, HttpRequest};
use crate::push::{one_line, PushInput, Pushed};
use crate::{ConnectorError, Secret};

/// Zoho Desk's subject limit.
pub const SUBJECT_MAX: usize = 255;

/// A Zoho data centre: `com`, `eu`, `in`, `com.au`, `jp`, `ca`, `sa` or `com.cn`.
pub const REGIONS: [&str; 8] = ["com", "eu", "in", "com.au", "jp", "ca", "sa", "com.cn"];

/// How to obtain a Zoho access token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZohoOAuth {
    /// Data centre (see [`REGIONS`]); picks `accounts.zoho.<region>`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Override of the accounts server (tests, proxies).
    #[serde(default)]
    pub accounts_url: Option<String>,
    /// Env var with a ready access token (skips the refresh flow).
    #[serde(default)]
    pub access_token_env: Option<String>,
    /// Env var with the OAuth client id.
    #[serde(default = "default_client_id_env")]
    pub client_id_env: String,
    /// Env var with the OAuth client secret.
    #[serde(default = "default_client_secret_env")]
    pub client_secret_env: String,
    /// Env var with the long-lived refresh token.
    #[serde(default = "default_refresh_env")]
    pub refresh_token_env: String,
}

fn default_region() -> String {
    "com".into()
}
fn default_client_id_env() -> String {
    "ZOHO_CLIENT_ID".into()
}
fn default_client_secret_env() -> String {
    "ZOHO_CLIENT_SECRET".into()
}
fn default_refresh_env() -> String {
    "ZOHO_REFRESH_TOKEN".into()
}

impl ZohoOAuth {
    pub(crate) fn check(&self) -> Result<(), String> {
        if !REGIONS.contains(&self.region.as_str()) {
            return Err(format!(
                "region {:?} is not a Zoho data centre ({})",
                self.region,
                REGIONS.join(", ")
            ));
        }
        Ok(())
    }

    fn accounts(&self) -> String {
        self.accounts_url
            .clone()
            .unwrap_or_else(|| format!("https://accounts.zoho.{}", self.region))
            .trim_end_matches('/')
            .to_owned()
    }

    /// The refresh request (`POST /oauth/v2/token`, form-encoded).
    pub(crate) fn refresh_request(&self) -> Result<HttpRequest, ConnectorError> {
        let client_id = Secret::from_env(&self.client_id_env)?;
        let client_secret = Secret::from_env(&self.client_secret_env)?;
        let refresh = Secret::from_env(&self.refresh_token_env)?;
        let mut r = HttpRequest::new("POST", format!("{}/oauth/v2/token", self.accounts()));
        r.body = Body::Form(vec![
            ("refresh_token".into(), refresh.expose().to_owned()),
            ("client_id".into(), client_id.expose().to_owned()),
            ("client_secret".into(), client_secret.expose().to_owned()),
            ("grant_type".into(), "refresh_token".into()),
        ]);
        Ok(r)
    }

    /// A ready token from the environment, if configured.
    pub(crate) fn static_token(&self) -> Option<Result<Secret, ConnectorError>> {
        self.access_token_env.as_deref().map(Secret::from_env)
    }

    /// Reads the access token from a refresh response (Zoho answers 200 with `{"error": ...}`
    /// for a bad refresh token).
    pub(crate) fn parse_token(body: &str) -> Result<Secret, String> {
        let v: Value = serde_json::from_str(body).map_err(|_| "token response is not JSON".to_owned())?;
        if let Some(e) = v.get("error") {
            return Err(format!("Zoho OAuth refused the refresh token: {e}"));
        }
        v["access_token"]
            .as_str()
            .map(Secret::new)
            .ok_or_else(|| "token response has no access_token".to_owned())
    }
}

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
    /// Override of `https://desk.zoho.<region>` (the env var `ZOHO_DESK_URL` overrides both).
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
    pub(crate) fn base(&self) -> String {
        std::env::var("ZOHO_DESK_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.desk_url.clone())
            .unwrap_or_else(|| format!("https://desk.zoho.{}", self.oauth.region))
            .trim_end_matches('/')
            .to_owned()
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        self.oauth.check()?;
        for (name, id) in [("org_id", &self.org_id), ("department_id", &self.department_id)] {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{name} {id:?} must be the numeric id, written as a string"
                ));
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
    let classification: Vec<String> = t.fields().map(|(k, v)| format!("{k}: {v}")).collect();
    let mut description = format!("{}\n{}", t.summary(), classification.join(" · "));
    if !input.text.trim().is_empty() {
        description.push_str("\n\nReported text:\n");
        description.push_str(input.text.trim());
    }
    body.insert("description".into(), Value::String(description));
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
        return crate::push::raw_excerpt(body);
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
        crate::push::raw_excerpt(body)
    } else {
        parts.join(": ")
    }
}

/// The Zoho Desk connector.
#[derive(Debug, Clone)]
pub struct Zoho {
    /// Its mapping.
    pub mapping: ZohoMapping,
}

impl Zoho {
    fn headers(&self, r: &mut HttpRequest) {
        r.headers.push(("orgId".into(), self.mapping.org_id.clone()));
        r.headers.push(("Accept".into(), "application/json".into()));
    }

    pub(crate) fn create(&self, input: &PushInput, ext_id: &str) -> HttpRequest {
        let mut r = HttpRequest::new("POST", format!("{}/api/v1/tickets", self.mapping.base()));
        self.headers(&mut r);
        r.body = Body::Json(ticket_payload(input, ext_id, &self.mapping));
        r
    }

    pub(crate) fn search(&self, ext_id: &str) -> HttpRequest {
        let q = crate::http::url_encode(&format!("{}:{ext_id}", self.mapping.external_id_field));
        let mut r = HttpRequest::new(
            "GET",
            format!(
                "{}/api/v1/tickets/search?customField1={q}&limit=1",
                self.mapping.base()
            ),
        );
        self.headers(&mut r);
        r
    }

    pub(crate) fn parse_created(body: &str) -> Result<Pushed, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        ticket_ref(&v).ok_or_else(|| "no `id` in the response".to_owned())
    }

    pub(crate) fn parse_search(body: &str) -> Result<Option<Pushed>, String> {
        if body.trim().is_empty() {
            return Ok(None); // 204 No Content: nothing found
        }
        let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        Ok(v["data"].as_array().and_then(|d| d.first()).and_then(ticket_ref))
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

/// `Authorization: Zoho-oauthtoken <token>`.
pub(crate) fn auth_header(token: &Secret) -> (String, Secret) {
    (
        "Authorization".into(),
        Secret::new(format!("Zoho-oauthtoken {}", token.expose())),
    )
}
