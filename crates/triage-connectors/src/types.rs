//! The vendor-independent types every module shares: which ITSM, what to push, what a push
//! resulted in, and the deterministic external id. A leaf module: it imports no vendor.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use triage_taxonomy::Ticket;

use crate::ConnectorError;

/// A supported ITSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Every vendor.
    pub const ALL: [Vendor; 4] = [Vendor::Jira, Vendor::Jsm, Vendor::Zoho, Vendor::Sdp];

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
    type Err = ConnectorError;
    fn from_str(s: &str) -> Result<Self, ConnectorError> {
        match s {
            "jira" => Ok(Vendor::Jira),
            "jsm" => Ok(Vendor::Jsm),
            "zoho" => Ok(Vendor::Zoho),
            "sdp" | "servicedeskplus" | "manageengine" => Ok(Vendor::Sdp),
            other => Err(ConnectorError::UnknownVendor {
                name: other.to_owned(),
            }),
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
    /// Id of the source message (e-mail Message-ID, chat id, batch row id), if any: part of
    /// the external id, so two identical texts from different messages make two tickets.
    pub source_message_id: Option<String>,
    /// Requester: an e-mail address (Zoho contact, SDP requester; JSM looks it up and sends
    /// the accountId) or, for JSM, an Atlassian accountId.
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
    /// Other vendor tickets carrying the same external id (duplicates), oldest first, when a
    /// search saw them. Empty in the normal case.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<String>,
}

impl Pushed {
    /// A ticket reference as a vendor response names it (`via` is set by the push flow).
    pub fn new(id: String, key: Option<String>, url: Option<String>) -> Self {
        Pushed {
            id,
            key,
            url,
            external_id: String::new(),
            via: "created",
            duplicates: Vec::new(),
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
        let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
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

/// Unix time in seconds.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The classification and the report as plain text (Zoho and SDP descriptions).
pub(crate) fn plain_description(input: &PushInput) -> String {
    let t = &input.ticket;
    let classification: Vec<String> = t.fields().map(|(k, v)| format!("{k}: {v}")).collect();
    let mut description = format!("{}\n{}", t.summary(), classification.join(" · "));
    if !input.text.trim().is_empty() {
        description.push_str("\n\nReported text:\n");
        description.push_str(input.text.trim());
    }
    description
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_never_panics_and_respects_the_limit() {
        assert_eq!(one_line("a\n b", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
        assert_eq!(one_line("abcdef", 0), "…");
    }

    #[test]
    fn vendor_names_round_trip_and_unknown_names_are_typed_errors() {
        for v in Vendor::ALL {
            assert_eq!(v.as_str().parse::<Vendor>().unwrap(), v);
        }
        let e = "servicenow".parse::<Vendor>().unwrap_err();
        assert!(matches!(e, ConnectorError::UnknownVendor { .. }));
        assert!(e.to_string().contains("use jira, jsm, zoho or sdp"));
    }
}
