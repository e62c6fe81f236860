//! The one HTTP layer every connector uses: requests as plain data (so a dry run can print
//! exactly what would be sent), and a send loop that honours `Retry-After`, never retries a
//! 4xx, and reports timeouts and 5xx as *ambiguous* (the ticket may exist) so the caller can
//! search before posting again.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::{ConnectorError, Secret};

/// A request body. Its `Debug` form redacts the values of [`SECRET_FORM_KEYS`].
#[derive(Clone, PartialEq)]
pub enum Body {
    /// No body.
    Empty,
    /// `application/json`.
    Json(Value),
    /// `application/x-www-form-urlencoded`.
    Form(Vec<(String, String)>),
}

/// Form fields whose values are credentials (the OAuth refresh request's): never shown by
/// `{:?}`, so no log or error that formats a request can carry them.
pub const SECRET_FORM_KEYS: [&str; 4] = ["client_secret", "refresh_token", "code", "password"];

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Json(v) => f.debug_tuple("Json").field(v).finish(),
            Body::Form(pairs) => {
                let shown: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| match SECRET_FORM_KEYS.contains(&k.as_str()) {
                        true => (k.as_str(), "(redacted)"),
                        false => (k.as_str(), v.as_str()),
                    })
                    .collect();
                f.debug_tuple("Form").field(&shown).finish()
            }
        }
    }
}

/// An HTTP request as data.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// Absolute URL, query included.
    pub url: String,
    /// Non-secret headers.
    pub headers: Vec<(String, String)>,
    /// Secret headers (`Authorization`, `authtoken`): sent marked sensitive, never printed.
    pub secret_headers: Vec<(String, Secret)>,
    /// Body.
    pub body: Body,
}

impl HttpRequest {
    /// A request without headers or body.
    pub fn new(method: &'static str, url: impl Into<String>) -> Self {
        HttpRequest {
            method,
            url: url.into(),
            headers: Vec::new(),
            secret_headers: Vec::new(),
            body: Body::Empty,
        }
    }

    /// The body as it goes on the wire, and its content type.
    pub fn body_bytes(&self) -> Option<(&'static str, String)> {
        match &self.body {
            Body::Empty => None,
            Body::Json(v) => Some(("application/json", v.to_string())),
            Body::Form(pairs) => Some(("application/x-www-form-urlencoded", form_encode(pairs))),
        }
    }

    /// The request as HTTP/1.1 text, for `--dry-run`: exactly what is sent, except that secret
    /// header values are printed as `<redacted>`. The JSON body is pretty-printed; a form body
    /// is printed encoded, followed by its decoded JSON where a field holds JSON.
    pub fn render(&self) -> String {
        let mut out = format!("{} {} HTTP/1.1\n", self.method, self.url);
        for (k, v) in &self.headers {
            let _ = writeln!(out, "{k}: {v}");
        }
        for (k, _) in &self.secret_headers {
            let _ = writeln!(out, "{k}: <redacted>");
        }
        if let Some((ct, body)) = self.body_bytes() {
            let _ = writeln!(out, "Content-Type: {ct}\n");
            match &self.body {
                Body::Json(v) => {
                    out.push_str(&serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()))
                }
                _ => out.push_str(&body),
            }
            out.push('\n');
        }
        out
    }
}

/// `application/x-www-form-urlencoded` (WHATWG URL standard).
pub(crate) fn form_encode(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(b as char),
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Retry, timeout and search settings.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, first one included (429/503 waits and connection errors count);
    /// also the most times one incident is posted.
    pub max_attempts: u32,
    /// Per-request timeout; a timed-out create is ambiguous and triggers a search.
    pub timeout: Duration,
    /// Longest `Retry-After` honoured; a longer one gives up with the vendor's message.
    pub max_retry_after: Duration,
    /// First backoff when the vendor gives no `Retry-After` (doubles per attempt).
    pub backoff: Duration,
    /// How long to keep searching by external id after an ambiguous create before deciding
    /// that it did not happen. Vendor search indexes lag behind writes (Jira: "from a few
    /// seconds to minutes"), so one immediate search is not enough.
    pub search_window: Duration,
    /// First pause between two searches in that window (doubles, at most 8×).
    pub search_interval: Duration,
    /// Post again when the window passes without a hit (`true`, default: a slow index may
    /// then yield a duplicate, which `--reconcile` reports), or stop and leave the outbox
    /// entry `unknown` for `triage push --reconcile` (`false`: never a duplicate, but the
    /// ticket may be missing until reconciled).
    pub repost: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            timeout: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
            backoff: Duration::from_secs(1),
            search_window: Duration::from_secs(60),
            search_interval: Duration::from_secs(2),
            repost: true,
        }
    }
}

/// How a vendor reports errors and rate limits.
pub(crate) struct VendorRules<'a> {
    /// Vendor name for messages and logs.
    pub vendor: &'static str,
    /// The vendor's error body as one line, verbatim.
    pub error_text: &'a (dyn Fn(&str) -> String + Sync),
    /// Whether a 4xx/5xx body signals a rate limit (beyond HTTP 429).
    pub rate_limited: &'a (dyn Fn(&str) -> bool + Sync),
}

/// Whether a request may be sent twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Searches, lookups, token refreshes: a 503 is waited out and the request sent again
    /// (a timeout or another 5xx is still reported as ambiguous, for the caller to decide).
    Safe,
    /// A create: only refusals that guarantee nothing happened (429, the vendor's rate-limit
    /// code, a connection that never opened) are sent again; a timeout, a 503 or any other
    /// 5xx is reported as ambiguous so the caller searches before posting again.
    CreateOnce,
}

/// How one request ended.
#[derive(Debug)]
pub(crate) enum Sent {
    /// 2xx, with the body.
    Ok(String),
    /// Timed out or 5xx after the request left: the vendor may have acted on it.
    Ambiguous {
        /// What happened.
        reason: String,
        /// The vendor's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
}

/// Sends `req`, retrying 429 (after `Retry-After`), connection failures and, for
/// [`Retry::Safe`] requests, 503; returns the 2xx body, `Sent::Ambiguous` for a timeout or
/// other 5xx, or the vendor's error for a 4xx.
pub(crate) async fn send(
    client: &reqwest::Client,
    req: &HttpRequest,
    policy: &RetryPolicy,
    rules: &VendorRules<'_>,
    retry: Retry,
) -> Result<Sent, ConnectorError> {
    let vendor = rules.vendor;
    let error_text = rules.error_text;
    let method =
        reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|e| ConnectorError::InvalidHeader {
            name: "(method)".into(),
            message: e.to_string(),
        })?;
    let mut last = String::new();
    for attempt in 1..=policy.max_attempts.max(1) {
        let mut headers = HeaderMap::new();
        for (k, v) in &req.headers {
            headers.insert(
                header_name(k)?,
                HeaderValue::from_str(v).map_err(|e| bad_header(k, e))?,
            );
        }
        for (k, v) in &req.secret_headers {
            let mut value = HeaderValue::from_str(v.expose()).map_err(|e| bad_header(k, e))?;
            value.set_sensitive(true);
            headers.insert(header_name(k)?, value);
        }
        let mut builder = client
            .request(method.clone(), &req.url)
            .headers(headers)
            .timeout(policy.timeout);
        if let Some((ct, body)) = req.body_bytes() {
            builder = builder.header("Content-Type", ct).body(body);
        }
        tracing::debug!(vendor, method = req.method, url = %req.url, attempt, "sending");
        let backoff = policy.backoff.saturating_mul(2u32.saturating_pow(attempt - 1));
        let response = match builder.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                tracing::warn!(vendor, url = %req.url, "timed out after {:?}", policy.timeout);
                return Ok(Sent::Ambiguous {
                    reason: format!("timed out after {:?}", policy.timeout),
                    retry_after: None,
                });
            }
            Err(e) if e.is_connect() => {
                last = format!("cannot connect: {}", error_chain(&e));
                if attempt >= policy.max_attempts {
                    return Err(ConnectorError::Unreachable {
                        vendor,
                        url: req.url.clone(),
                        message: last,
                    });
                }
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(e) => {
                // The request may have reached the vendor (reset mid-response).
                return Ok(Sent::Ambiguous {
                    reason: error_chain(&e),
                    retry_after: None,
                });
            }
        };
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(none)")
                .to_owned();
            return Err(ConnectorError::Redirected {
                vendor,
                url: req.url.clone(),
                status,
                location,
            });
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match read_capped(response, MAX_BODY_BYTES).await {
            Ok((_, true)) if (200..300).contains(&status) => {
                // Whatever it says cannot be read whole: the outcome is unknown.
                return Ok(Sent::Ambiguous {
                    reason: format!("a {status} answer longer than {MAX_BODY_BYTES} bytes, cut there"),
                    retry_after: None,
                });
            }
            Ok((b, _)) => b,
            Err(e) if (200..300).contains(&status) => {
                return Ok(Sent::Ambiguous {
                    reason: error_chain(&e),
                    retry_after: None,
                })
            }
            Err(_) => String::new(),
        };
        let refused = status == 429 || (status >= 400 && (rules.rate_limited)(&body));
        let unavailable = status == 503 && !refused;
        match status {
            200..=299 => return Ok(Sent::Ok(body)),
            _ if unavailable && retry == Retry::CreateOnce => {
                // A 503 does not promise that nothing happened: search before sending again.
                return Ok(Sent::Ambiguous {
                    reason: format!("HTTP 503: {}", error_text(&body)),
                    retry_after,
                });
            }
            _ if refused || unavailable => {
                last = format!("HTTP {status}: {}", error_text(&body));
                let wait = retry_after.unwrap_or(backoff);
                if wait > policy.max_retry_after || attempt >= policy.max_attempts {
                    return Err(ConnectorError::GaveUp {
                        vendor,
                        attempts: attempt,
                        last: format!("{last} (Retry-After {wait:?})"),
                    });
                }
                tracing::info!(vendor, status, "rate limited; waiting {wait:?} as asked");
                tokio::time::sleep(wait).await;
            }
            500..=599 => {
                return Ok(Sent::Ambiguous {
                    reason: format!("HTTP {status}: {}", error_text(&body)),
                    retry_after,
                })
            }
            _ => {
                return Err(ConnectorError::Vendor {
                    vendor,
                    request: format!("{} {}", req.method, without_query(&req.url)),
                    status,
                    message: error_text(&body),
                })
            }
        }
    }
    Err(ConnectorError::GaveUp {
        vendor,
        attempts: policy.max_attempts,
        last,
    })
}

/// The most bytes of a vendor's answer that are read: ticket creates, searches by one
/// external id and error bodies are a few KiB; a server that sends more is cut off here
/// rather than filling memory (a cut JSON answer then fails to parse, which is reported).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// The response body as text (lossy UTF-8), at most `cap` bytes of it, and whether it was
/// longer (then cut).
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<(String, bool), reqwest::Error> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok((String::from_utf8_lossy(&bytes).into_owned(), true));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((String::from_utf8_lossy(&bytes).into_owned(), false))
}

/// `url` without its query string (search parameters make errors long).
fn without_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(u, _)| u)
}

fn header_name(k: &str) -> Result<HeaderName, ConnectorError> {
    HeaderName::from_bytes(k.as_bytes()).map_err(|e| bad_header(k, e))
}

fn bad_header(k: &str, e: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::InvalidHeader {
        name: k.to_owned(),
        message: e.to_string(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `Retry-After`: delta seconds or an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub(crate) fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: i64 = parts[1].parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == parts[2])? as i64 + 1;
    let year: i64 = parts[3].parse().ok().filter(|y| (1970..=9999).contains(y))?;
    if !(1..=31).contains(&day) {
        return None;
    }
    let hms: Vec<i64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 || hms.iter().any(|v| !(0..=60).contains(v)) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let at = days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2];
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(Duration::from_secs((at - now).max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_follows_the_url_standard() {
        let pairs = vec![("input_data".to_owned(), r#"{"a":"b c&d=é"}"#.to_owned())];
        assert_eq!(
            form_encode(&pairs),
            "input_data=%7B%22a%22%3A%22b+c%26d%3D%C3%A9%22%7D"
        );
    }

    /// The OAuth refresh request's credentials never appear in a request's `{:?}`.
    #[test]
    fn debug_of_a_form_body_redacts_credentials() {
        let mut r = HttpRequest::new("POST", "https://accounts.zoho.com/oauth/v2/token");
        r.body = Body::Form(vec![
            ("refresh_token".into(), "1000.refresh-s3cr3t".into()),
            ("client_id".into(), "1000.CLIENTID".into()),
            ("client_secret".into(), "client-s3cr3t".into()),
            ("grant_type".into(), "refresh_token".into()),
        ]);
        let shown = format!("{r:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(
            shown.contains("1000.CLIENTID") && shown.contains("(redacted)"),
            "{shown}"
        );
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let future = parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT").unwrap();
        assert!(future > Duration::from_secs(86_400 * 365 * 50));
        assert_eq!(parse_retry_after("soon"), None);
        // Hostile values are ignored, never an overflow.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 99999999999999999 08:49:37 GMT"),
            None
        );
        assert_eq!(parse_retry_after("Sun, 99999999999 Nov 2000 08:49:37 GMT"), None);
    }

    #[test]
    fn dry_run_rendering_redacts_secrets() {
        let mut r = HttpRequest::new("POST", "https://x.example/api");
        r.secret_headers
            .push(("Authorization".into(), Secret::new("Basic c2VjcmV0")));
        r.body = Body::Json(serde_json::json!({"a": 1}));
        let text = r.render();
        assert!(text.contains("Authorization: <redacted>"));
        assert!(!text.contains("c2VjcmV0"));
        assert!(text.contains("\"a\": 1"));
    }
}
