//! Jira Cloud (`POST /rest/api/3/issue`, body `IssueUpdateDetails`) and Jira Service
//! Management (`POST /rest/servicedeskapi/request`).
//!
//! Vendor rules applied here: `description` is an Atlassian Document Format doc (see
//! [`crate::adf`]); `summary` is one line of at most 255 characters; issue type and priority
//! go by id or name; labels may not contain spaces; authentication is HTTP Basic
//! `email:api_token`; errors are an `ErrorCollection` (`errorMessages[]`, `errors{field:msg}`).
//! The external id is a label (`triage-<hash>`), found again with the JQL search
//! `GET /rest/api/3/search/jql` (not read-after-write consistent: see [`crate::push`]).
//! JSM's `raiseOnBehalfOf` takes an Atlassian accountId: an e-mail address is looked up with
//! `GET /rest/api/3/user/search` (cached in the session) or refused with advice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};
use triage_taxonomy::Ticket;

use crate::connector::{parse_mapping, Auth, BoxFuture, Connector, Lookup};
use crate::http::{self, url_encode, Body, HttpRequest, Retry, Sent, VendorRules};
use crate::types::{one_line, raw_excerpt, PushInput, Pushed, Vendor};
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
            "{}/rest/api/3/search/jql?jql={}&fields=summary,created&maxResults=10",
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
    /// Account id or e-mail to raise the request on behalf of (`raiseOnBehalfOf`) when the
    /// push names no requester.
    #[serde(default)]
    pub raise_on_behalf_of: Option<String>,
    /// Look an e-mail requester up (`GET /rest/api/3/user/search`, needs the *Browse users
    /// and groups* permission) and send its accountId (default); `false` refuses e-mail
    /// addresses and requires accountIds.
    #[serde(default = "yes")]
    pub requester_lookup: bool,
}

fn yes() -> bool {
    true
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
                if let Some(list) = list.as_array_mut() {
                    list.push(json!({ "name": v }));
                }
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

/// The `POST /rest/api/3/issue` body (`IssueUpdateDetails`); `path` is the mapping file,
/// named in errors.
pub fn issue_payload(
    input: &PushInput,
    ext_id: &str,
    m: &JiraMapping,
    path: &Path,
) -> Result<Value, ConnectorError> {
    let t = &input.ticket;
    let kind = t.get(&m.issue_type_from).ok_or_else(|| {
        ConnectorError::mapping(
            path,
            "issue_type_from",
            format!("the ticket has no field {:?}", m.issue_type_from),
            "name a field of the taxonomy (default request_type)",
        )
    })?;
    let issue_type = m.issue_types.get(kind).ok_or_else(|| {
        ConnectorError::mapping(
            path,
            "issue_types",
            format!("no issue type for {} {kind:?}", m.issue_type_from),
            format!("add `\"{kind}\" = \"<issue type>\"` under [issue_types]"),
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

/// The `POST /rest/servicedeskapi/request` body; `path` is the mapping file, named in
/// errors. `raiseOnBehalfOf` is the input's requester (or the mapping's), as given: the push
/// flow has already turned an e-mail address into an accountId ([`Jsm::resolve`]).
pub fn request_payload(
    input: &PushInput,
    ext_id: &str,
    m: &JsmMapping,
    path: &Path,
) -> Result<Value, ConnectorError> {
    let t = &input.ticket;
    let kind = t.get(&m.request_type_from).ok_or_else(|| {
        ConnectorError::mapping(
            path,
            "request_type_from",
            format!("the ticket has no field {:?}", m.request_type_from),
            "name a field of the taxonomy (default request_type)",
        )
    })?;
    let request_type_id = m.request_type_ids.get(kind).ok_or_else(|| {
        ConnectorError::mapping(
            path,
            "request_type_ids",
            format!("no request type id for {} {kind:?}", m.request_type_from),
            format!("add `\"{kind}\" = \"<id>\"` under [request_type_ids] (ids: GET /rest/servicedeskapi/servicedesk/{{id}}/requesttype)"),
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
        return raw_excerpt(body);
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
        raw_excerpt(body)
    } else {
        parts.join("; ")
    }
}

/// The Jira Cloud connector.
#[derive(Debug, Clone)]
pub struct Jira {
    /// Its mapping.
    pub mapping: JiraMapping,
    /// The mapping file.
    pub path: PathBuf,
}

impl Jira {
    /// Parses a mapping (`path` is named in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConnectorError> {
        Ok(Jira {
            mapping: parse_mapping(text, path)?,
            path: path.to_owned(),
        })
    }
}

fn bad(vendor: Vendor) -> impl Fn(String) -> ConnectorError {
    move |m| ConnectorError::bad_response(vendor.as_str(), m)
}

fn json_of(vendor: Vendor, body: &str) -> Result<Value, ConnectorError> {
    serde_json::from_str(body).map_err(|e| bad(vendor)(format!("not JSON: {e}: {}", raw_excerpt(body))))
}

impl Connector for Jira {
    fn vendor(&self) -> Vendor {
        Vendor::Jira
    }

    fn mapping_path(&self) -> &Path {
        &self.path
    }

    fn auth(&self, dry_run: bool) -> Result<Auth<'_>, ConnectorError> {
        self.mapping.site.auth(dry_run).map(Auth::Headers)
    }

    fn create_request(&self, input: &PushInput, ext_id: &str) -> Result<HttpRequest, ConnectorError> {
        let mut r = HttpRequest::new("POST", format!("{}/rest/api/3/issue", self.mapping.site.base()));
        r.headers.push(("Accept".into(), "application/json".into()));
        r.body = Body::Json(issue_payload(input, ext_id, &self.mapping, &self.path)?);
        Ok(r)
    }

    fn search_request(&self, ext_id: &str) -> HttpRequest {
        self.mapping.site.search(&label_jql(ext_id))
    }

    fn parse_created(&self, body: &str) -> Result<Pushed, ConnectorError> {
        let v = json_of(Vendor::Jira, body)?;
        let key = v["key"]
            .as_str()
            .ok_or_else(|| bad(Vendor::Jira)("no `key` in the response".into()))?
            .to_owned();
        Ok(Pushed::new(
            v["id"].as_str().unwrap_or(&key).to_owned(),
            Some(key.clone()),
            Some(format!("{}/browse/{key}", self.mapping.site.base())),
        ))
    }

    fn parse_search(&self, body: &str) -> Result<Vec<Pushed>, ConnectorError> {
        parse_jql(Vendor::Jira, body, &self.mapping.site.base())
    }

    fn error_text(&self, body: &str) -> String {
        error_text(body)
    }
}

/// `labels = "<ext>" ORDER BY created ASC`: the oldest ticket first.
fn label_jql(ext_id: &str) -> String {
    format!("labels = \"{ext_id}\" ORDER BY created ASC")
}

fn parse_jql(vendor: Vendor, body: &str, base: &str) -> Result<Vec<Pushed>, ConnectorError> {
    let v = json_of(vendor, body)?;
    let issues = v["issues"]
        .as_array()
        .ok_or_else(|| bad(vendor)("no `issues` in the search response".into()))?;
    Ok(issues
        .iter()
        .filter_map(|i| {
            let key = i["key"].as_str()?.to_owned();
            Some(Pushed::new(
                i["id"].as_str().unwrap_or(&key).to_owned(),
                Some(key.clone()),
                Some(format!("{base}/browse/{key}")),
            ))
        })
        .collect())
}

/// The Jira Service Management connector.
#[derive(Debug, Clone)]
pub struct Jsm {
    /// Its mapping.
    pub mapping: JsmMapping,
    /// The mapping file.
    pub path: PathBuf,
}

/// Whether `s` has the shape of an Atlassian accountId (`5b10ac8d82e05b22cc7d4ef5`,
/// `557058:f58131cb-…`, `qm:…`): 1–128 of letters, digits, `:`, `-`, `_`.
pub fn is_account_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'_'))
}

impl Jsm {
    /// Parses a mapping (`path` is named in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConnectorError> {
        Ok(Jsm {
            mapping: parse_mapping(text, path)?,
            path: path.to_owned(),
        })
    }

    fn requester_err(&self, who: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConnectorError {
        ConnectorError::Requester {
            vendor: "jsm",
            requester: who.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// The accountId for `raiseOnBehalfOf`: `who` itself when it is one, else the account
    /// whose e-mail address it is (cached in the session).
    async fn account_id(&self, who: &str, lookup: Lookup<'_>) -> Result<String, ConnectorError> {
        if !who.contains('@') {
            if is_account_id(who) {
                return Ok(who.to_owned());
            }
            return Err(self.requester_err(
                who,
                "is neither an e-mail address nor an Atlassian accountId",
                "pass the requester's e-mail address or accountId (e.g. 5b10ac8d82e05b22cc7d4ef5)",
            ));
        }
        if !self.mapping.requester_lookup {
            return Err(self.requester_err(
                who,
                "raiseOnBehalfOf takes an Atlassian accountId, not an e-mail address",
                format!(
                    "pass the accountId (Jira: People → profile URL), or set requester_lookup = true in {} to look e-mail addresses up",
                    self.path.display()
                ),
            ));
        }
        let Lookup::Live { session, auth } = lookup else {
            return Ok(format!("<accountId of {who}, looked up when sent>"));
        };
        let base = self.mapping.site.base();
        let cache_key = format!("jira-account {base} {}", who.to_lowercase());
        if let Some(id) = session.lookups.get(&cache_key) {
            return Ok(id);
        }
        let mut req = HttpRequest::new(
            "GET",
            format!(
                "{base}/rest/api/3/user/search?query={}&maxResults=10",
                url_encode(who)
            ),
        );
        req.headers.push(("Accept".into(), "application/json".into()));
        req.secret_headers = auth.to_vec();
        let rules = VendorRules {
            vendor: "jsm",
            error_text: &error_text,
            rate_limited: &|_| false,
        };
        let body = match http::send(&session.client, &req, &session.policy, &rules, Retry::Safe).await? {
            Sent::Ok(body) => body,
            Sent::Ambiguous { reason, .. } => {
                return Err(self.requester_err(
                    who,
                    format!("the user search failed: {reason}"),
                    "retry later, or pass the accountId instead of the e-mail address",
                ))
            }
        };
        let id = pick_account(who, &body)?;
        session.lookups.put(&cache_key, &id);
        tracing::info!(requester = who, account_id = %id, "raiseOnBehalfOf resolved");
        Ok(id)
    }
}

/// The one active, non-app account of a user search answer whose e-mail is `email` (or
/// hidden by its owner's privacy settings); otherwise a [`ConnectorError::Requester`] saying
/// what is wrong and what to do.
fn pick_account(email: &str, body: &str) -> Result<String, ConnectorError> {
    let refuse = |problem: String, fix: &str| ConnectorError::Requester {
        vendor: "jsm",
        requester: email.to_owned(),
        problem,
        fix: fix.to_owned(),
    };
    let users: Vec<Value> = serde_json::from_str(body).map_err(|e| {
        refuse(
            format!("the user search answered something else than a list: {e}"),
            "pass the accountId instead",
        )
    })?;
    let candidates: Vec<&str> = users
        .iter()
        .filter(|u| u["accountType"].as_str() != Some("app") && u["active"].as_bool() != Some(false))
        .filter(|u| {
            u["emailAddress"]
                .as_str()
                .is_none_or(|e| e.eq_ignore_ascii_case(email))
        })
        .filter_map(|u| u["accountId"].as_str().filter(|id| is_account_id(id)))
        .collect();
    match candidates.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Err(refuse(
            "no active Jira user or customer has this e-mail address (or the API user lacks the Browse users and groups permission, which makes the search return nothing)".into(),
            "add the customer to the service desk, grant the permission, or pass the accountId",
        )),
        many => Err(refuse(
            format!(
                "{} accounts match (their e-mail addresses are hidden): {}",
                many.len(),
                many.join(", ")
            ),
            "pass the accountId of the right one",
        )),
    }
}

impl Connector for Jsm {
    fn vendor(&self) -> Vendor {
        Vendor::Jsm
    }

    fn mapping_path(&self) -> &Path {
        &self.path
    }

    fn auth(&self, dry_run: bool) -> Result<Auth<'_>, ConnectorError> {
        self.mapping.site.auth(dry_run).map(Auth::Headers)
    }

    fn resolve<'a>(
        &'a self,
        input: &'a PushInput,
        lookup: Lookup<'a>,
    ) -> BoxFuture<'a, Result<PushInput, ConnectorError>> {
        Box::pin(async move {
            let who = input
                .requester
                .as_deref()
                .or(self.mapping.raise_on_behalf_of.as_deref())
                .map(str::trim)
                .filter(|w| !w.is_empty());
            let mut out = input.clone();
            if let Some(who) = who {
                out.requester = Some(self.account_id(who, lookup).await?);
            }
            Ok(out)
        })
    }

    fn create_request(&self, input: &PushInput, ext_id: &str) -> Result<HttpRequest, ConnectorError> {
        let mut r = HttpRequest::new(
            "POST",
            format!("{}/rest/servicedeskapi/request", self.mapping.site.base()),
        );
        r.headers.push(("Accept".into(), "application/json".into()));
        r.body = Body::Json(request_payload(input, ext_id, &self.mapping, &self.path)?);
        Ok(r)
    }

    fn search_request(&self, ext_id: &str) -> HttpRequest {
        self.mapping.site.search(&label_jql(ext_id))
    }

    fn parse_created(&self, body: &str) -> Result<Pushed, ConnectorError> {
        let v = json_of(Vendor::Jsm, body)?;
        let key = v["issueKey"]
            .as_str()
            .ok_or_else(|| bad(Vendor::Jsm)("no `issueKey` in the response".into()))?
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

    fn parse_search(&self, body: &str) -> Result<Vec<Pushed>, ConnectorError> {
        parse_jql(Vendor::Jsm, body, &self.mapping.site.base())
    }

    fn error_text(&self, body: &str) -> String {
        error_text(body)
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
    fn account_ids_are_told_from_e_mail_addresses_and_picked_exactly() {
        assert!(is_account_id("5b10ac8d82e05b22cc7d4ef5"));
        assert!(is_account_id("557058:f58131cb-b67d-43c7-b30d-6b58d40bd077"));
        assert!(is_account_id("qm:a1b2c3d4-e5f6:0a1b2c3d"));
        assert!(!is_account_id("Anna Smith"));
        assert!(!is_account_id(""));
        let body = r#"[{"accountId":"app-1","accountType":"app"},
            {"accountId":"5b10aaaa","accountType":"atlassian","emailAddress":"anna@example.com.au"},
            {"accountId":"5b10bbbb","accountType":"customer","emailAddress":"Anna@Example.com"}]"#;
        assert_eq!(pick_account("anna@example.com", body).unwrap(), "5b10bbbb");
        assert!(pick_account("anna@example.com", "[]")
            .unwrap_err()
            .to_string()
            .contains("no active"));
        let hidden = r#"[{"accountId":"5b10aaaa"},{"accountId":"5b10bbbb"}]"#;
        assert!(pick_account("anna@example.com", hidden)
            .unwrap_err()
            .to_string()
            .contains("2 accounts"));
        assert!(pick_account("anna@example.com", "{").is_err());
    }

    #[test]
    fn labels_have_no_spaces() {
        assert_eq!(
            label("subcategory:Laptop / Desktop"),
            "subcategory:Laptop_/_Desktop"
        );
    }
}
