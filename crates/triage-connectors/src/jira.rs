//! Jira Cloud (`POST /rest/api/3/issue`, body `IssueUpdateDetails`) and Jira Service
//! Management (`POST /rest/servicedeskapi/request`).
//!
//! Vendor rules applied here: `description` is an Atlassian Document Format doc (see
//! [`crate::adf`]); `summary` is one line of at most 255 characters; issue type and priority
//! go by id or name; labels may not contain spaces; authentication is HTTP Basic
//! `email:api_token`; errors are an `ErrorCollection` (`errorMessages[]`, `errors{field:msg}`).
//! The external id is a label (`triage-<hash>`), found again with the JQL search
//! `GET /rest/api/3/search/jql`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use triage_taxonomy::Ticket;

use crate::http::{url_encode, Body, HttpRequest};
use crate::push::{one_line, PushInput, Pushed};
use crate::{adf, ConnectorError, Secret};

/// Jira's summary limit.
pub const SUMMARY_MAX: usize = 255;

/// An issue type, priority or other lookup: by id or by name. In TOML a plain string is a
/// name; `{ id = "10001" }` is an id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IdOrName {
    /// `{"name": ...}`.
    Name(String),
    /// `{"id": ...}`.
    Id {
        /// The id, as a string.
        id: String,
    },
}

impl IdOrName {
    fn to_json(&self) -> Value {
        match self {
            IdOrName::Name(n) => json!({ "name": n }),
            IdOrName::Id { id } => json!({ "id": id }),
        }
    }
}

/// Where a taxonomy field goes in a Jira issue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "to", rename_all = "snake_case", deny_unknown_fields)]
pub enum JiraTarget {
    /// `components: [{"name": value}]` (the component must exist in the project).
    Components,
    /// A label `<prefix><value>` with spaces replaced by `_`.
    Labels {
        /// Prefix, e.g. `"subcategory:"`.
        #[serde(default)]
        prefix: String,
    },
    /// A text custom field: `"customfield_10050": "value"`.
    CustomText {
        /// Field id.
        field: String,
    },
    /// A select-list custom field: `"customfield_10050": {"value": "value"}`.
    CustomOption {
        /// Field id.
        field: String,
    },
}

/// Credentials and site, shared by Jira and JSM mappings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JiraSite {
    /// `https://your-domain.atlassian.net` (the env var `JIRA_BASE_URL` overrides it).
    pub base_url: String,
    /// Env var holding the account e-mail.
    #[serde(default = "default_email_env")]
    pub email_env: String,
    /// Env var holding the API token.
    #[serde(default = "default_token_env")]
    pub token_env: String,
}

fn default_email_env() -> String {
    "JIRA_EMAIL".into()
}
fn default_token_env() -> String {
    "JIRA_API_TOKEN".into()
}

impl JiraSite {
    pub(crate) fn base(&self) -> String {
        std::env::var("JIRA_BASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.base_url.clone())
            .trim_end_matches('/')
            .to_owned()
    }

    /// `Authorization: Basic base64(email:token)`; in a dry run missing variables are allowed
    /// (the header is printed redacted anyway).
    pub(crate) fn auth(&self, dry_run: bool) -> Result<Vec<(String, Secret)>, ConnectorError> {
        let email = Secret::for_request(&self.email_env, dry_run)?;
        let token = Secret::for_request(&self.token_env, dry_run)?;
        let basic = base64(format!("{}:{}", email.expose(), token.expose()).as_bytes());
        Ok(vec![(
            "Authorization".into(),
            Secret::new(format!("Basic {basic}")),
        )])
    }

    fn search(&self, jql: &str) -> HttpRequest {
        let url = format!(
            "{}/rest/api/3/search/jql?jql={}&fields=summary&maxResults=1",
            self.base(),
            url_encode(jql)
        );
        let mut r = HttpRequest::new("GET", url);
        r.headers.push(("Accept".into(), "application/json".into()));
        r
    }
}

/// Mapping of a Jira Cloud project (`configs/connectors/jira.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JiraMapping {
    /// Site and credentials.
    pub site: JiraSite,
    /// Project key (`IT`) the issues are created in.
    pub project_key: String,
    /// Taxonomy field whose value picks the issue type (default `request_type`).
    #[serde(default = "default_request_type_field")]
    pub issue_type_from: String,
    /// Value of that field → issue type.
    pub issue_types: BTreeMap<String, IdOrName>,
    /// Taxonomy `priority` value → Jira priority; unmapped values leave the project default.
    #[serde(default)]
    pub priorities: BTreeMap<String, IdOrName>,
    /// Taxonomy field → where it goes.
    #[serde(default)]
    pub fields: BTreeMap<String, JiraTarget>,
    /// Labels added to every issue.
    #[serde(default)]
    pub extra_labels: Vec<String>,
}

fn default_request_type_field() -> String {
    "request_type".into()
}

/// Mapping of a Jira Service Management desk (`configs/connectors/jsm.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsmMapping {
    /// Site and credentials.
    pub site: JiraSite,
    /// Service desk id (a number, written as a string).
    pub service_desk_id: String,
    /// Taxonomy field whose value picks the request type (default `request_type`).
    #[serde(default = "default_request_type_field")]
    pub request_type_from: String,
    /// Value of that field → JSM request type id.
    pub request_type_ids: BTreeMap<String, String>,
    /// Taxonomy `priority` value → priority (`requestFieldValues.priority`), if the request
    /// types expose the field.
    #[serde(default)]
    pub priorities: BTreeMap<String, IdOrName>,
    /// Taxonomy field → where it goes in `requestFieldValues`.
    #[serde(default)]
    pub fields: BTreeMap<String, JiraTarget>,
    /// Account id or e-mail to raise the request on behalf of (`raiseOnBehalfOf`).
    #[serde(default)]
    pub raise_on_behalf_of: Option<String>,
}

fn labels_for(
    mapping_fields: &BTreeMap<String, JiraTarget>,
    ticket: &Ticket,
    ext_id: &str,
    extra: &[String],
) -> Vec<Value> {
    let mut labels = vec![Value::String(ext_id.to_owned())];
    for l in extra {
        labels.push(Value::String(label(l)));
    }
    for (field, target) in mapping_fields {
        if let (JiraTarget::Labels { prefix }, Some(v)) = (target, ticket.get(field)) {
            labels.push(Value::String(label(&format!("{prefix}{v}"))));
        }
    }
    labels
}

fn apply_fields(
    fields: &mut Map<String, Value>,
    mapping_fields: &BTreeMap<String, JiraTarget>,
    ticket: &Ticket,
) {
    for (field, target) in mapping_fields {
        let Some(v) = ticket.get(field) else { continue };
        match target {
            JiraTarget::Components => {
                let list = fields.entry("components").or_insert_with(|| json!([]));
                list.as_array_mut()
                    .expect("components is a list")
                    .push(json!({ "name": v }));
            }
            JiraTarget::Labels { .. } => {}
            JiraTarget::CustomText { field } => {
                fields.insert(field.clone(), Value::String(v.to_owned()));
            }
            JiraTarget::CustomOption { field } => {
                fields.insert(field.clone(), json!({ "value": v }));
            }
        }
    }
}

/// A Jira label: no whitespace (Jira splits labels on spaces), at most 255 characters.
pub fn label(s: &str) -> String {
    let l: String = s
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .take(255)
        .collect();
    l
}

/// The ADF description: the triage classification, then the user's report.
pub fn description(input: &PushInput, ext_id: &str) -> Value {
    let mut blocks = Vec::new();
    let classification: Vec<String> = input.ticket.fields().map(|(k, v)| format!("{k}: {v}")).collect();
    if let Some(p) = adf::paragraph(&format!(
        "{}\n{}",
        input.ticket.summary(),
        classification.join(" · ")
    )) {
        blocks.push(p);
    }
    if !input.text.trim().is_empty() {
        blocks.push(adf::heading(3, "Reported text"));
        blocks.extend(adf::paragraphs(&input.text));
    }
    if let Some(p) = adf::paragraph(&format!("Created by triage, external id {ext_id}.")) {
        blocks.push(p);
    }
    adf::doc(blocks)
}

/// The `POST /rest/api/3/issue` body (`IssueUpdateDetails`).
pub fn issue_payload(input: &PushInput, ext_id: &str, m: &JiraMapping) -> Result<Value, String> {
    let t = &input.ticket;
    let kind = t
        .get(&m.issue_type_from)
        .ok_or_else(|| format!("ticket has no field {:?} (issue_type_from)", m.issue_type_from))?;
    let issue_type = m.issue_types.get(kind).ok_or_else(|| {
        format!(
            "no issue type mapped for {} {kind:?}: add it under [issue_types]",
            m.issue_type_from
        )
    })?;
    let mut fields = Map::new();
    fields.insert("project".into(), json!({ "key": m.project_key }));
    fields.insert("issuetype".into(), issue_type.to_json());
    fields.insert(
        "summary".into(),
        Value::String(one_line(t.summary(), SUMMARY_MAX)),
    );
    fields.insert("description".into(), description(input, ext_id));
    if let Some(p) = t.get("priority").and_then(|p| m.priorities.get(p)) {
        fields.insert("priority".into(), p.to_json());
    }
    fields.insert(
        "labels".into(),
        Value::Array(labels_for(&m.fields, t, ext_id, &m.extra_labels)),
    );
    apply_fields(&mut fields, &m.fields, t);
    Ok(json!({ "fields": fields }))
}

/// The `POST /rest/servicedeskapi/request` body.
pub fn request_payload(input: &PushInput, ext_id: &str, m: &JsmMapping) -> Result<Value, String> {
    let t = &input.ticket;
    let kind = t.get(&m.request_type_from).ok_or_else(|| {
        format!(
            "ticket has no field {:?} (request_type_from)",
            m.request_type_from
        )
    })?;
    let request_type_id = m.request_type_ids.get(kind).ok_or_else(|| {
        format!(
            "no request type id mapped for {} {kind:?}: add it under [request_type_ids]",
            m.request_type_from
        )
    })?;
    let mut values = Map::new();
    values.insert(
        "summary".into(),
        Value::String(one_line(t.summary(), SUMMARY_MAX)),
    );
    values.insert("description".into(), description(input, ext_id));
    values.insert(
        "labels".into(),
        Value::Array(labels_for(&m.fields, t, ext_id, &[])),
    );
    if let Some(p) = t.get("priority").and_then(|p| m.priorities.get(p)) {
        values.insert("priority".into(), p.to_json());
    }
    apply_fields(&mut values, &m.fields, t);
    let mut body = json!({
        "serviceDeskId": m.service_desk_id,
        "requestTypeId": request_type_id,
        "isAdfRequest": true,
        "requestFieldValues": values,
    });
    let on_behalf = input.requester.as_ref().or(m.raise_on_behalf_of.as_ref());
    if let Some(who) = on_behalf {
        body["raiseOnBehalfOf"] = Value::String(who.clone());
    }
    Ok(body)
}

/// Jira's `ErrorCollection` (and JSM's `errorMessage`) as one readable line, verbatim.
pub fn error_text(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return crate::push::raw_excerpt(body);
    };
    let mut parts: Vec<String> = Vec::new();
    if let Some(msgs) = v.get("errorMessages").and_then(Value::as_array) {
        parts.extend(msgs.iter().filter_map(|m| m.as_str().map(str::to_owned)));
    }
    if let Some(errs) = v.get("errors").and_then(Value::as_object) {
        parts.extend(
            errs.iter()
                .map(|(k, m)| format!("{k}: {}", m.as_str().unwrap_or(&m.to_string()))),
        );
    }
    if let Some(m) = v.get("errorMessage").and_then(Value::as_str) {
        parts.push(m.to_owned());
    }
    if parts.is_empty() {
        crate::push::raw_excerpt(body)
    } else {
        parts.join("; ")
    }
}

/// The Jira Cloud connector.
#[derive(Debug, Clone)]
pub struct Jira {
    /// Its mapping.
    pub mapping: JiraMapping,
}

impl Jira {
    pub(crate) fn create(&self, input: &PushInput, ext_id: &str) -> Result<HttpRequest, String> {
        let mut r = HttpRequest::new("POST", format!("{}/rest/api/3/issue", self.mapping.site.base()));
        r.headers.push(("Accept".into(), "application/json".into()));
        r.body = Body::Json(issue_payload(input, ext_id, &self.mapping)?);
        Ok(r)
    }

    pub(crate) fn search(&self, ext_id: &str) -> HttpRequest {
        self.mapping.site.search(&format!("labels = \"{ext_id}\""))
    }

    pub(crate) fn parse_created(&self, body: &str) -> Result<Pushed, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        let key = v["key"].as_str().ok_or("no `key` in the response")?.to_owned();
        Ok(Pushed::new(
            v["id"].as_str().unwrap_or(&key).to_owned(),
            Some(key.clone()),
            Some(format!("{}/browse/{key}", self.mapping.site.base())),
        ))
    }

    pub(crate) fn parse_search(&self, body: &str) -> Result<Option<Pushed>, String> {
        parse_jql(body, &self.mapping.site.base())
    }
}

fn parse_jql(body: &str, base: &str) -> Result<Option<Pushed>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let issues = v["issues"]
        .as_array()
        .ok_or("no `issues` in the search response")?;
    Ok(issues.first().map(|i| {
        let key = i["key"].as_str().unwrap_or_default().to_owned();
        Pushed::new(
            i["id"].as_str().unwrap_or(&key).to_owned(),
            Some(key.clone()),
            Some(format!("{base}/browse/{key}")),
        )
    }))
}

/// The Jira Service Management connector.
#[derive(Debug, Clone)]
pub struct Jsm {
    /// Its mapping.
    pub mapping: JsmMapping,
}

impl Jsm {
    pub(crate) fn create(&self, input: &PushInput, ext_id: &str) -> Result<HttpRequest, String> {
        let mut r = HttpRequest::new(
            "POST",
            format!("{}/rest/servicedeskapi/request", self.mapping.site.base()),
        );
        r.headers.push(("Accept".into(), "application/json".into()));
        r.body = Body::Json(request_payload(input, ext_id, &self.mapping)?);
        Ok(r)
    }

    pub(crate) fn search(&self, ext_id: &str) -> HttpRequest {
        self.mapping.site.search(&format!("labels = \"{ext_id}\""))
    }

    pub(crate) fn parse_created(&self, body: &str) -> Result<Pushed, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        let key = v["issueKey"]
            .as_str()
            .ok_or("no `issueKey` in the response")?
            .to_owned();
        let url = v["_links"]["web"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}/browse/{key}", self.mapping.site.base()));
        Ok(Pushed::new(
            v["issueId"].as_str().unwrap_or(&key).to_owned(),
            Some(key),
            Some(url),
        ))
    }

    pub(crate) fn parse_search(&self, body: &str) -> Result<Option<Pushed>, String> {
        parse_jql(body, &self.mapping.site.base())
    }
}

/// Standard base64 with padding (for HTTP Basic).
fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn errors_are_reported_verbatim() {
        let body = r#"{"errorMessages":["Project IT does not exist"],"errors":{"priority":"Priority name 'Urgent' is not valid"}}"#;
        assert_eq!(
            error_text(body),
            "Project IT does not exist; priority: Priority name 'Urgent' is not valid"
        );
        assert_eq!(
            error_text(r#"{"errorMessage":"Request type 99 not found"}"#),
            "Request type 99 not found"
        );
        assert_eq!(error_text("<html>Bad gateway</html>"), "<html>Bad gateway</html>");
    }

    #[test]
    fn labels_have_no_spaces() {
        assert_eq!(
            label("subcategory:Laptop / Desktop"),
            "subcategory:Laptop_/_Desktop"
        );
    }
}
