//! Zoho OAuth, shared by Zoho Desk and ServiceDesk Plus Cloud: data centres, the
//! refresh-token flow, and an access-token cache.
//!
//! Zoho lets one refresh token mint only about ten access tokens in ten minutes, then refuses
//! ("You have made too many requests continuously"); each access token lives an hour
//! (`expires_in`). So a token is refreshed once and reused until shortly before it expires:
//! in memory for a long-running process, and — when the [`TokenCache`] has a file — in a
//! private (`0600`) file for a CLI that runs once per push. A 401 from the vendor makes the
//! push flow refresh once (the rejected token is passed as `stale`).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::http::{self, Body, HttpRequest, Retry, RetryPolicy, Sent, VendorRules};
use crate::store::PrivateFile;
use crate::{ConnectorError, Secret};

/// A Zoho data centre. Each has its own accounts (OAuth) server and product hosts; Canada is
/// the exception to the `zoho.<tld>` pattern (`accounts.zohocloud.ca`, `desk.zohocloud.ca`,
/// per Zoho's "Multi DC support" page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    /// United States (`com`, alias `us`).
    Us,
    /// Europe (`eu`).
    Eu,
    /// India (`in`).
    In,
    /// Australia (`com.au`, alias `au`).
    Au,
    /// Japan (`jp`).
    Jp,
    /// Canada (`ca`): `zohocloud.ca`.
    Ca,
    /// Saudi Arabia (`sa`).
    Sa,
    /// United Kingdom (`uk`).
    Uk,
    /// United Arab Emirates (`ae`).
    Ae,
    /// China (`com.cn`, alias `cn`).
    Cn,
}

impl Region {
    /// Every data centre.
    pub const ALL: [Region; 10] = [
        Region::Us,
        Region::Eu,
        Region::In,
        Region::Au,
        Region::Jp,
        Region::Ca,
        Region::Sa,
        Region::Uk,
        Region::Ae,
        Region::Cn,
    ];

    /// The value written in a mapping (`com`, `eu`, `in`, `com.au`, `jp`, `ca`, `sa`, `uk`,
    /// `ae`, `com.cn`).
    pub fn code(self) -> &'static str {
        match self {
            Region::Us => "com",
            Region::Eu => "eu",
            Region::In => "in",
            Region::Au => "com.au",
            Region::Jp => "jp",
            Region::Ca => "ca",
            Region::Sa => "sa",
            Region::Uk => "uk",
            Region::Ae => "ae",
            Region::Cn => "com.cn",
        }
    }

    /// A mapping value: a [`Region::code`], or `us`, `au`, `cn`, `zohocloud.ca`.
    pub fn parse(s: &str) -> Option<Region> {
        let s = s.trim().trim_start_matches('.').to_ascii_lowercase();
        Region::ALL
            .into_iter()
            .find(|r| r.code() == s)
            .or(match s.as_str() {
                "us" => Some(Region::Us),
                "au" => Some(Region::Au),
                "cn" => Some(Region::Cn),
                "zohocloud.ca" => Some(Region::Ca),
                _ => None,
            })
    }

    /// The domain after the product name: `zoho.com`, …, `zohocloud.ca`.
    fn domain(self) -> String {
        match self {
            Region::Ca => "zohocloud.ca".to_owned(),
            r => format!("zoho.{}", r.code()),
        }
    }

    /// The accounts (OAuth) server, e.g. `https://accounts.zoho.eu`.
    pub fn accounts_url(self) -> String {
        format!("https://accounts.{}", self.domain())
    }

    /// The Zoho Desk host, e.g. `https://desk.zoho.eu`.
    pub fn desk_url(self) -> String {
        format!("https://desk.{}", self.domain())
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Region {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Region::parse(&s).ok_or_else(|| {
            let all: Vec<&str> = Region::ALL.iter().map(|r| r.code()).collect();
            serde::de::Error::custom(format!(
                "region {s:?} is not a Zoho data centre: use one of {}",
                all.join(", ")
            ))
        })
    }
}

/// How to obtain a Zoho access token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZohoOAuth {
    /// Data centre; picks the accounts server (see [`Region`]).
    #[serde(default = "default_region")]
    pub region: Region,
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

fn default_region() -> Region {
    Region::Us
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
    /// The accounts server in use.
    pub fn accounts(&self) -> String {
        self.accounts_url
            .clone()
            .unwrap_or_else(|| self.region.accounts_url())
            .trim_end_matches('/')
            .to_owned()
    }

    /// The refresh request (`POST /oauth/v2/token`, form-encoded) and the cache key of the
    /// token it yields (a hash of server, client id and refresh token: never the secret).
    fn refresh_request(&self) -> Result<(HttpRequest, String), ConnectorError> {
        let client_id = Secret::from_env(&self.client_id_env)?;
        let client_secret = Secret::from_env(&self.client_secret_env)?;
        let refresh = Secret::from_env(&self.refresh_token_env)?;
        let accounts = self.accounts();
        let mut h = Sha256::new();
        for part in [accounts.as_str(), client_id.expose(), refresh.expose()] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        let key: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        let mut r = HttpRequest::new("POST", format!("{accounts}/oauth/v2/token"));
        r.body = Body::Form(vec![
            ("refresh_token".into(), refresh.expose().to_owned()),
            ("client_id".into(), client_id.expose().to_owned()),
            ("client_secret".into(), client_secret.expose().to_owned()),
            ("grant_type".into(), "refresh_token".into()),
        ]);
        Ok((r, key))
    }

    /// A ready token from the environment, if configured.
    pub(crate) fn static_token(&self) -> Option<Result<Secret, ConnectorError>> {
        self.access_token_env.as_deref().map(Secret::from_env)
    }

    /// The access token and its lifetime from a refresh response (Zoho answers 200 with
    /// `{"error": ...}` for a bad refresh token or too many refreshes).
    fn parse_token(&self, body: &str) -> Result<(Secret, Duration), ConnectorError> {
        let server = self.accounts();
        let oauth_err = |message: String, fix: &str| ConnectorError::OAuth {
            server: server.clone(),
            message,
            fix: fix.to_owned(),
        };
        let v: Value = serde_json::from_str(body).map_err(|_| {
            oauth_err(
                format!(
                    "the token response is not JSON: {}",
                    crate::types::raw_excerpt(body)
                ),
                "check oauth.region / oauth.accounts_url in the mapping",
            )
        })?;
        if let Some(e) = v.get("error") {
            let described = v
                .get("error_description")
                .and_then(Value::as_str)
                .map(|d| format!("{e}: {d}"))
                .unwrap_or_else(|| e.to_string());
            let fix = if described.contains("too many requests") || described.contains("Access Denied") {
                "Zoho issues about ten access tokens per refresh token in ten minutes; triage reuses its token (see the token cache), so wait ten minutes and check that no other program refreshes with the same token"
            } else {
                "check ZOHO_CLIENT_ID, ZOHO_CLIENT_SECRET and ZOHO_REFRESH_TOKEN, and that the refresh token was issued by this data centre (oauth.region)"
            };
            return Err(oauth_err(described, fix));
        }
        let token = v["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                oauth_err(
                    "the token response has no access_token".into(),
                    "check oauth.accounts_url in the mapping",
                )
            })?;
        Ok((Secret::new(token), token_lifetime(&v)))
    }
}

/// The token's lifetime: `expires_in` in seconds (older Zoho answers gave milliseconds there
/// and seconds in `expires_in_sec`); an hour when absent.
fn token_lifetime(v: &Value) -> Duration {
    let secs = v["expires_in_sec"].as_u64().or_else(|| {
        v["expires_in"]
            .as_u64()
            .map(|n| if n > 86_400 { n / 1000 } else { n })
    });
    // Zoho's tokens live an hour; a longer claim is capped at a day so that a hostile or
    // garbled answer can neither overflow the refresh time nor pin a token for ever.
    Duration::from_secs(secs.unwrap_or(3600).min(MAX_TOKEN_LIFETIME_S))
}

/// The longest token lifetime believed (one day).
const MAX_TOKEN_LIFETIME_S: u64 = 86_400;

/// Reuse a token until this long before it expires (at most half its lifetime).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// When to refresh a token that lives `lifetime` from `now` (unix seconds).
fn refresh_after(now: u64, lifetime: Duration) -> u64 {
    let margin = REFRESH_MARGIN.min(lifetime / 2);
    now.saturating_add(lifetime.saturating_sub(margin).as_secs())
}

#[derive(Clone, Serialize, Deserialize)]
struct CachedToken {
    access_token: String,
    /// Unix seconds after which the token is refreshed.
    refresh_after: u64,
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CachedToken(<redacted>, refresh_after {})", self.refresh_after)
    }
}

/// Access tokens by (accounts server, client, refresh token), in memory and optionally in a
/// private file. One per process; concurrent pushes share one refresh.
#[derive(Debug)]
pub struct TokenCache {
    memory: tokio::sync::Mutex<HashMap<String, CachedToken>>,
    file: Option<PrivateFile>,
}

impl TokenCache {
    /// A cache in memory only (a long-running process such as `triage serve`).
    pub fn in_memory() -> Self {
        TokenCache {
            memory: tokio::sync::Mutex::new(HashMap::new()),
            file: None,
        }
    }

    /// A cache also kept in `path` (mode `0600`), for processes that run once per push.
    pub fn with_file(path: impl Into<PathBuf>) -> Self {
        TokenCache {
            memory: tokio::sync::Mutex::new(HashMap::new()),
            file: Some(PrivateFile::new(path.into())),
        }
    }

    /// The file, if any.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_ref().map(PrivateFile::path)
    }

    /// A valid access token: the cached one, or a fresh one from the refresh flow. With
    /// `stale` (a token the vendor just rejected with 401) a cached token equal to it is
    /// dropped and a new one fetched, once.
    pub(crate) async fn token(
        &self,
        oauth: &ZohoOAuth,
        client: &reqwest::Client,
        policy: &RetryPolicy,
        stale: Option<&Secret>,
    ) -> Result<Secret, ConnectorError> {
        if let Some(t) = oauth.static_token() {
            return t;
        }
        let (req, key) = oauth.refresh_request()?;
        // Held across the refresh: concurrent pushes wait for one refresh instead of each
        // spending one of Zoho's ten tokens.
        let mut memory = self.memory.lock().await;
        let now = crate::types::now();
        let usable =
            |t: &CachedToken| now < t.refresh_after && stale.is_none_or(|s| s.expose() != t.access_token);
        if let Some(t) = memory.get(&key).filter(|t| usable(t)) {
            return Ok(Secret::new(t.access_token.clone()));
        }
        // Another process may be refreshing the same token right now: wait for it, then read
        // what it wrote, so parallel CLI runs spend one refresh between them. Held until the
        // new token is written; without the lock (a folder that cannot be locked) a refresh
        // costs a token, not the push.
        let _refreshing = match &self.file {
            Some(file) => file
                .hold("refresh.lock")
                .await
                .map_err(|e| tracing::warn!("{e}"))
                .ok(),
            None => None,
        };
        if let Some(file) = &self.file {
            if let Some(t) = file.read::<CachedToken>().remove(&key).filter(|t| usable(t)) {
                let secret = Secret::new(t.access_token.clone());
                memory.insert(key, t);
                return Ok(secret);
            }
        }
        let rules = VendorRules {
            vendor: "zoho-accounts",
            error_text: &accounts_error_text,
            rate_limited: &|_| false,
        };
        tracing::info!(server = %oauth.accounts(), "refreshing the Zoho access token");
        let body = match http::send(client, &req, policy, &rules, Retry::Safe).await? {
            Sent::Ok(body) => body,
            Sent::Ambiguous { reason, .. } => {
                return Err(ConnectorError::GaveUp {
                    vendor: "zoho-accounts",
                    attempts: 1,
                    last: reason,
                })
            }
        };
        let (token, lifetime) = oauth.parse_token(&body)?;
        let entry = CachedToken {
            access_token: token.expose().to_owned(),
            refresh_after: refresh_after(now, lifetime),
        };
        if let Some(file) = &self.file {
            let stored = entry.clone();
            let key = key.clone();
            // A cache that cannot be written costs refreshes, not the push.
            if let Err(e) = file.update::<CachedToken>(move |m| {
                m.retain(|_, t| t.refresh_after > now);
                m.insert(key, stored);
            }) {
                tracing::warn!("{e}");
            }
        }
        memory.insert(key, entry);
        Ok(token)
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache::in_memory()
    }
}

/// The accounts server's error body (`{"error": ..., "error_description": ...}`) as one line.
fn accounts_error_text(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) if v.get("error").is_some() => {
            let desc = v["error_description"].as_str().unwrap_or_default();
            format!("{} {desc}", v["error"]).trim().to_owned()
        }
        _ => crate::types::raw_excerpt(body),
    }
}

/// `Authorization: Zoho-oauthtoken <token>`.
pub(crate) fn auth_header(token: &Secret) -> (String, Secret) {
    (
        "Authorization".into(),
        Secret::new(format!("Zoho-oauthtoken {}", token.expose())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_region_has_its_documented_accounts_and_desk_hosts() {
        let expected = [
            ("com", "https://accounts.zoho.com", "https://desk.zoho.com"),
            ("eu", "https://accounts.zoho.eu", "https://desk.zoho.eu"),
            ("in", "https://accounts.zoho.in", "https://desk.zoho.in"),
            (
                "com.au",
                "https://accounts.zoho.com.au",
                "https://desk.zoho.com.au",
            ),
            ("jp", "https://accounts.zoho.jp", "https://desk.zoho.jp"),
            ("ca", "https://accounts.zohocloud.ca", "https://desk.zohocloud.ca"),
            ("sa", "https://accounts.zoho.sa", "https://desk.zoho.sa"),
            ("uk", "https://accounts.zoho.uk", "https://desk.zoho.uk"),
            ("ae", "https://accounts.zoho.ae", "https://desk.zoho.ae"),
            (
                "com.cn",
                "https://accounts.zoho.com.cn",
                "https://desk.zoho.com.cn",
            ),
        ];
        assert_eq!(expected.len(), Region::ALL.len(), "a region without a test row");
        for (code, accounts, desk) in expected {
            let r = Region::parse(code).unwrap_or_else(|| panic!("{code}"));
            assert_eq!(r.code(), code);
            assert_eq!(r.accounts_url(), accounts, "{code}");
            assert_eq!(r.desk_url(), desk, "{code}");
        }
        for (alias, r) in [
            ("us", Region::Us),
            ("au", Region::Au),
            ("cn", Region::Cn),
            ("zohocloud.ca", Region::Ca),
            (".EU", Region::Eu),
        ] {
            assert_eq!(Region::parse(alias), Some(r), "{alias}");
        }
        assert_eq!(Region::parse("mars"), None);
    }

    #[test]
    fn token_lifetimes_and_refresh_times() {
        let v: Value = serde_json::json!({"access_token": "x", "expires_in": 3600});
        assert_eq!(token_lifetime(&v), Duration::from_secs(3600));
        let old: Value =
            serde_json::json!({"access_token": "x", "expires_in": 3_600_000, "expires_in_sec": 3600});
        assert_eq!(token_lifetime(&old), Duration::from_secs(3600));
        let ms_only: Value = serde_json::json!({"access_token": "x", "expires_in": 3_600_000});
        assert_eq!(token_lifetime(&ms_only), Duration::from_secs(3600));
        assert_eq!(token_lifetime(&serde_json::json!({})), Duration::from_secs(3600));
        // An hour's token is reused for 55 minutes; a 60 s token for 30 s.
        assert_eq!(refresh_after(1000, Duration::from_secs(3600)), 1000 + 3300);
        assert_eq!(refresh_after(1000, Duration::from_secs(60)), 1000 + 30);
        assert_eq!(refresh_after(1000, Duration::ZERO), 1000);
        let absurd: Value = serde_json::json!({"access_token": "x", "expires_in_sec": u64::MAX});
        assert_eq!(token_lifetime(&absurd), Duration::from_secs(86_400));
        assert_eq!(refresh_after(u64::MAX - 5, Duration::from_secs(3600)), u64::MAX);
    }

    #[test]
    fn refused_refreshes_say_what_to_do() {
        let o: ZohoOAuth = toml::from_str("region = \"eu\"").unwrap();
        let e = o
            .parse_token(r#"{"error":"Access Denied","error_description":"You have made too many requests continuously. Please try again after some time."}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("accounts.zoho.eu") && e.contains("ten access tokens"),
            "{e}"
        );
        let e = o
            .parse_token(r#"{"error":"invalid_code"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ZOHO_REFRESH_TOKEN"), "{e}");
        assert!(o.parse_token("<html>").is_err());
        let (t, life) = o
            .parse_token(r#"{"access_token":"1000.x","expires_in":3600}"#)
            .unwrap();
        assert_eq!((t.expose(), life), ("1000.x", Duration::from_secs(3600)));
    }
}
