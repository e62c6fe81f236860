//! The vendor-independent push flow: external id, outbox, create, search-before-retry.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha256};
use triage_taxonomy::Ticket;

use crate::http::{self, HttpRequest, RetryPolicy, Sent, VendorRules};
use crate::jira::{Jira, JiraMapping, Jsm, JsmMapping};
use crate::outbox::{now, Outbox, OutboxEntry};
use crate::sdp::{Sdp, SdpAuth, SdpMapping};
use crate::zoho::{self, Zoho, ZohoMapping, ZohoOAuth};
use crate::{ConnectorError, Secret};

/// A supported ITSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// Jira Cloud platform (`/rest/api/3/issue`).
    Jira,
    /// Jira Service Management (`/rest/servicedeskapi/request`).
    Jsm,
    /// Zoho Desk.
    Zoho,
    /// ManageEngine ServiceDesk Plus v3.
    Sdp,
}

impl Vendor {
    /// `jira`, `jsm`, `zoho` or `sdp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Vendor::Jira => "jira",
            Vendor::Jsm => "jsm",
            Vendor::Zoho => "zoho",
            Vendor::Sdp => "sdp",
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Vendor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "jira" => Ok(Vendor::Jira),
            "jsm" => Ok(Vendor::Jsm),
            "zoho" => Ok(Vendor::Zoho),
            "sdp" | "servicedeskplus" | "manageengine" => Ok(Vendor::Sdp),
            other => Err(format!("unknown ITSM {other:?}: use jira, jsm, zoho or sdp")),
        }
    }
}

/// What to push.
#[derive(Debug, Clone)]
pub struct PushInput {
    /// The validated ticket.
    pub ticket: Ticket,
    /// The user's original report (put in the description; may be empty).
    pub text: String,
    /// Id of the source message (e-mail Message-ID, chat id), if any: part of the external id,
    /// so two identical texts from different messages make two tickets.
    pub source_message_id: Option<String>,
    /// Requester e-mail / account (JSM `raiseOnBehalfOf`, Zoho contact, SDP requester).
    pub requester: Option<String>,
}

/// The vendor ticket a push resulted in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pushed {
    /// Vendor id.
    pub id: String,
    /// Human key or number (`IT-42`, `101`), where the vendor has one.
    pub key: Option<String>,
    /// Link to the ticket.
    pub url: Option<String>,
    /// The external id written into the ticket.
    pub external_id: String,
    /// `created` (this call created it), `outbox` (an earlier run had) or `search` (found by
    /// external id after an ambiguous failure: not created twice).
    pub via: &'static str,
}

impl Pushed {
    pub(crate) fn new(id: String, key: Option<String>, url: Option<String>) -> Self {
        Pushed {
            id,
            key,
            url,
            external_id: String::new(),
            via: "created",
        }
    }
}

/// The deterministic external id of an incident: `triage-` and 16 hex digits of the SHA-256
/// of the source message id (when given) and the whitespace-normalised text (or, without
/// text, the summary).
pub fn external_id(input: &PushInput) -> String {
    let body = if input.text.trim().is_empty() {
        input.ticket.summary().to_owned()
    } else {
        input.text.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let mut h = Sha256::new();
    h.update(input.source_message_id.as_deref().unwrap_or("").as_bytes());
    h.update([0u8]);
    h.update(body.as_bytes());
    let hex: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("triage-{hex}")
}

/// One line (newlines and runs of whitespace collapsed), at most `max` characters.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        line
    } else {
        let mut cut: String = line.chars().take(max - 1).collect();
        cut.push('…');
        cut
    }
}

/// A non-JSON error body, shortened for a message.
pub(crate) fn raw_excerpt(body: &str) -> String {
    let t = body.trim();
    if t.is_empty() {
        return "(empty response body)".into();
    }
    let mut s: String = t.chars().take(2000).collect();
    if t.chars().count() > 2000 {
        s.push('…');
    }
    s
}

/// A configured connector.
#[derive(Debug, Clone)]
pub enum Connector {
    /// Jira Cloud.
    Jira(Jira),
    /// Jira Service Management.
    Jsm(Jsm),
    /// Zoho Desk.
    Zoho(Zoho),
    /// ServiceDesk Plus.
    Sdp(Sdp),
}

impl Connector {
    /// Loads `path`, or `configs/connectors/<vendor>.toml` when `None`.
    pub fn load(vendor: Vendor, path: Option<&Path>) -> Result<Self, ConnectorError> {
        let path: PathBuf = path
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from(format!("configs/connectors/{vendor}.toml")));
        let text = std::fs::read_to_string(&path).map_err(|e| ConnectorError::Mapping {
            path: path.clone(),
            message: format!("cannot read the mapping ({e}); pass --mapping FILE"),
        })?;
        Self::from_toml_str(vendor, &text).map_err(|message| ConnectorError::Mapping { path, message })
    }

    /// Parses a mapping.
    pub fn from_toml_str(vendor: Vendor, text: &str) -> Result<Self, String> {
        fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
            toml::from_str(text).map_err(|e| {
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                    .map(|l| format!("line {l}: "))
                    .unwrap_or_default();
                format!("{line}{}", e.message())
            })
        }
        Ok(match vendor {
            Vendor::Jira => Connector::Jira(Jira {
                mapping: parse::<JiraMapping>(text)?,
            }),
            Vendor::Jsm => Connector::Jsm(Jsm {
                mapping: parse::<JsmMapping>(text)?,
            }),
            Vendor::Zoho => {
                let mapping: ZohoMapping = parse(text)?;
                mapping.check()?;
                Connector::Zoho(Zoho { mapping })
            }
            Vendor::Sdp => {
                let mapping: SdpMapping = parse(text)?;
                mapping.check()?;
                Connector::Sdp(Sdp { mapping })
            }
        })
    }

    /// Which vendor.
    pub fn vendor(&self) -> Vendor {
        match self {
            Connector::Jira(_) => Vendor::Jira,
            Connector::Jsm(_) => Vendor::Jsm,
            Connector::Zoho(_) => Vendor::Zoho,
            Connector::Sdp(_) => Vendor::Sdp,
        }
    }

    fn rules(&self) -> VendorRules {
        match self {
            Connector::Jira(_) | Connector::Jsm(_) => VendorRules {
                error_text: crate::jira::error_text,
                rate_limited: |_| false,
            },
            Connector::Zoho(_) => VendorRules {
                error_text: crate::zoho::error_text,
                rate_limited: |_| false,
            },
            Connector::Sdp(_) => VendorRules {
                error_text: crate::sdp::error_text,
                rate_limited: crate::sdp::is_rate_limited,
            },
        }
    }

    /// The create request without credentials (what `--dry-run` prints, auth redacted).
    pub fn create_request(&self, input: &PushInput) -> Result<HttpRequest, ConnectorError> {
        let ext = external_id(input);
        let mapping_err = |message: String| ConnectorError::Mapping {
            path: PathBuf::from(format!("configs/connectors/{}.toml", self.vendor())),
            message,
        };
        match self {
            Connector::Jira(j) => j.create(input, &ext).map_err(mapping_err),
            Connector::Jsm(j) => j.create(input, &ext).map_err(mapping_err),
            Connector::Zoho(z) => Ok(z.create(input, &ext)),
            Connector::Sdp(s) => Ok(s.create(input, &ext)),
        }
    }

    fn search_request(&self, ext: &str) -> HttpRequest {
        match self {
            Connector::Jira(j) => j.search(ext),
            Connector::Jsm(j) => j.search(ext),
            Connector::Zoho(z) => z.search(ext),
            Connector::Sdp(s) => s.search(ext),
        }
    }

    fn parse_created(&self, body: &str) -> Result<Pushed, String> {
        match self {
            Connector::Jira(j) => j.parse_created(body),
            Connector::Jsm(j) => j.parse_created(body),
            Connector::Zoho(_) => Zoho::parse_created(body),
            Connector::Sdp(s) => s.parse_created(body),
        }
    }

    fn parse_search(&self, body: &str) -> Result<Option<Pushed>, String> {
        match self {
            Connector::Jira(j) => j.parse_search(body),
            Connector::Jsm(j) => j.parse_search(body),
            Connector::Zoho(_) => Zoho::parse_search(body),
            Connector::Sdp(s) => s.parse_search(body),
        }
    }

    /// Authentication headers. In a dry run nothing is fetched and missing variables are
    /// allowed (the values are printed redacted).
    pub async fn auth_headers(
        &self,
        client: &reqwest::Client,
        policy: &RetryPolicy,
        dry_run: bool,
    ) -> Result<Vec<(String, Secret)>, ConnectorError> {
        match self {
            Connector::Jira(j) => j.mapping.site.auth(dry_run),
            Connector::Jsm(j) => j.mapping.site.auth(dry_run),
            Connector::Zoho(z) => Ok(vec![zoho_token(&z.mapping.oauth, client, policy, dry_run).await?]),
            Connector::Sdp(s) => match s.auth_kind() {
                SdpAuth::Authtoken { token_env } => {
                    Ok(vec![crate::sdp::authtoken_header(token_env, dry_run)?])
                }
                SdpAuth::Oauth(o) => Ok(vec![zoho_token(o, client, policy, dry_run).await?]),
            },
        }
    }

    /// The complete create request as `--dry-run` prints it (secrets redacted).
    pub async fn dry_run(&self, input: &PushInput) -> Result<String, ConnectorError> {
        let client = reqwest::Client::new();
        let mut req = self.create_request(input)?;
        req.secret_headers = self.auth_headers(&client, &RetryPolicy::default(), true).await?;
        Ok(req.render())
    }
}

async fn zoho_token(
    oauth: &ZohoOAuth,
    client: &reqwest::Client,
    policy: &RetryPolicy,
    dry_run: bool,
) -> Result<(String, Secret), ConnectorError> {
    if dry_run {
        return Ok(zoho::auth_header(&Secret::new("dry-run")));
    }
    if let Some(token) = oauth.static_token() {
        return Ok(zoho::auth_header(&token?));
    }
    let req = oauth.refresh_request()?;
    let rules = VendorRules {
        error_text: zoho::error_text,
        rate_limited: |_| false,
    };
    match http::send(client, &req, policy, "zoho-accounts", &rules).await? {
        Sent::Ok(body) => {
            let token = ZohoOAuth::parse_token(&body).map_err(|message| ConnectorError::BadResponse {
                vendor: "zoho-accounts",
                message,
            })?;
            Ok(zoho::auth_header(&token))
        }
        Sent::Ambiguous(m) => Err(ConnectorError::GaveUp {
            vendor: "zoho-accounts",
            attempts: 1,
            last: m,
        }),
    }
}

/// Creates the ticket unless it already exists: checks the outbox, posts, and after a timeout
/// or 5xx searches by external id before posting again. Returns what was created or found.
pub async fn push(
    connector: &Connector,
    input: &PushInput,
    outbox: &Outbox,
    client: &reqwest::Client,
    policy: &RetryPolicy,
) -> Result<Pushed, ConnectorError> {
    let vendor = connector.vendor().as_str();
    let ext = external_id(input);
    if let Some(e) = outbox.find_created(vendor, &ext)? {
        tracing::info!(vendor, external_id = %ext, "already created earlier (outbox): {}", e.id.as_deref().unwrap_or("?"));
        return Ok(Pushed {
            id: e.id.unwrap_or_default(),
            key: e.key,
            url: e.url,
            external_id: ext,
            via: "outbox",
        });
    }
    let mut req = connector.create_request(input)?;
    req.secret_headers = connector.auth_headers(client, policy, false).await?;
    let mut search = connector.search_request(&ext);
    search.secret_headers = req.secret_headers.clone();
    let rules = connector.rules();
    let record = |p: &Pushed| {
        outbox.record(&OutboxEntry {
            vendor: vendor.to_owned(),
            external_id: ext.clone(),
            state: "created".into(),
            id: Some(p.id.clone()),
            key: p.key.clone(),
            url: p.url.clone(),
            at: now(),
        })
    };
    outbox.record(&OutboxEntry {
        vendor: vendor.to_owned(),
        external_id: ext.clone(),
        state: "pending".into(),
        id: None,
        key: None,
        url: None,
        at: now(),
    })?;
    let bad = |message: String| ConnectorError::BadResponse { vendor, message };
    let mut last = String::new();
    for attempt in 1..=policy.max_attempts {
        if attempt > 1 {
            // The previous create may have gone through: look before posting again.
            match http::send(client, &search, policy, vendor, &rules).await? {
                Sent::Ok(body) => {
                    if let Some(mut found) = connector.parse_search(&body).map_err(bad)? {
                        tracing::info!(vendor, external_id = %ext, "found the ticket of the ambiguous attempt; not creating it again");
                        found.external_id = ext.clone();
                        found.via = "search";
                        record(&found)?;
                        return Ok(found);
                    }
                }
                Sent::Ambiguous(m) => {
                    last = format!("search failed: {m}");
                    tokio::time::sleep(policy.backoff * 2u32.pow(attempt - 1)).await;
                    continue;
                }
            }
        }
        match http::send(client, &req, policy, vendor, &rules).await? {
            Sent::Ok(body) => {
                let mut created = connector.parse_created(&body).map_err(bad)?;
                created.external_id = ext.clone();
                record(&created)?;
                tracing::info!(vendor, external_id = %ext, id = %created.id, "created");
                return Ok(created);
            }
            Sent::Ambiguous(m) => {
                tracing::warn!(vendor, external_id = %ext, "create outcome unknown ({m}); will search before retrying");
                last = m;
            }
        }
    }
    Err(ConnectorError::GaveUp {
        vendor,
        attempts: policy.max_attempts,
        last,
    })
}
