//! The crate's one error type. Every variant names what failed (file and line, field, vendor,
//! URL) and, where the user can act, what to do; vendor messages are carried verbatim and
//! secrets never are.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Connector failures. Vendor messages are carried verbatim; secrets never are.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A mapping file is missing, malformed or inconsistent with the ticket or the taxonomy.
    #[error("{}: {problem}; {fix}", location(.path, *.line, .key.as_deref()))]
    Mapping {
        /// The mapping file (`(inline mapping)` for a string parsed without a file).
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The key or table concerned (`department_id`, `issue_types`), when known.
        key: Option<String>,
        /// What is wrong.
        problem: String,
        /// What to do about it.
        fix: String,
    },
    /// An ITSM name that is not one of `jira`, `jsm`, `zoho`, `sdp`.
    #[error("unknown ITSM {name:?}: use jira, jsm, zoho or sdp")]
    UnknownVendor {
        /// The name given.
        name: String,
    },
    /// A required environment variable (credential or setting) is not set.
    #[error(
        "environment variable {0} is not set: export it (credentials are read from the environment only)"
    )]
    MissingEnv(String),
    /// A header value (usually a credential from the environment) cannot go into HTTP.
    #[error("header {name} cannot be sent: {message}; check the environment variable it comes from (no newlines or control characters)")]
    InvalidHeader {
        /// Header name.
        name: String,
        /// Why.
        message: String,
    },
    /// The vendor refused the request (4xx other than 429); never retried.
    #[error("{vendor} answered HTTP {status} to {request}: {message}{}", status_hint(*.status))]
    Vendor {
        /// Vendor name.
        vendor: &'static str,
        /// The request it answered, `POST https://x.atlassian.net/rest/api/3/issue` (no query).
        request: String,
        /// HTTP status.
        status: u16,
        /// The vendor's own error text(s), verbatim.
        message: String,
    },
    /// The vendor answered with a redirect, which is never followed: a credential header
    /// such as SDP's `authtoken` would go along to the other host.
    #[error("{vendor}: {url} answered HTTP {status}, redirecting to {location}; redirects are not followed, so credentials never go to another host: set the mapping's base_url (for zoho-accounts, its region) to the address it redirects to")]
    Redirected {
        /// Vendor name.
        vendor: &'static str,
        /// The request URL.
        url: String,
        /// HTTP status (3xx).
        status: u16,
        /// The `Location` header ("(none)" when missing).
        location: String,
    },
    /// The vendor kept answering 429/503 (or 5xx) beyond the retry budget.
    #[error("{vendor}: gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Vendor name.
        vendor: &'static str,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The vendor could not be reached at all (DNS, connection refused, TLS).
    #[error("{vendor} is unreachable at {url}: {message}")]
    Unreachable {
        /// Vendor name.
        vendor: &'static str,
        /// The URL tried.
        url: String,
        /// Transport error.
        message: String,
    },
    /// The vendor answered 2xx with a body we cannot interpret.
    #[error("{vendor}: unexpected response: {message}")]
    BadResponse {
        /// Vendor name.
        vendor: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The OAuth server refused to issue an access token.
    #[error("OAuth token from {server}: {message}; {fix}")]
    OAuth {
        /// The accounts server.
        server: String,
        /// Zoho's answer, verbatim.
        message: String,
        /// What to do.
        fix: String,
    },
    /// The requester cannot be used as given (JSM `raiseOnBehalfOf` needs an accountId).
    #[error("{vendor}: requester {requester:?}: {problem}; {fix}")]
    Requester {
        /// Vendor name.
        vendor: &'static str,
        /// The requester as given (an e-mail address or account id; not a secret).
        requester: String,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
    /// A create may or may not have reached the vendor and the search did not settle it.
    #[error("{vendor}: the outcome of creating {external_id} is unknown ({last}); it is recorded as `unknown` in the outbox {}: run `triage push --reconcile` later to settle it (searches again, never posts)", .outbox.display())]
    Unsettled {
        /// Vendor name.
        vendor: &'static str,
        /// The external id of the incident.
        external_id: String,
        /// The outbox file.
        outbox: PathBuf,
        /// The last failure.
        last: String,
    },
    /// The local outbox could not be read or written.
    #[error("outbox {}: {message}", .path.display())]
    Outbox {
        /// The outbox file.
        path: PathBuf,
        /// What went wrong and what to do.
        message: String,
    },
    /// A private cache file (OAuth tokens, account lookups) could not be written.
    #[error("cache {}: {message}", .path.display())]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// `file:line: `key``, leaving out what is unknown.
fn location(path: &Path, line: Option<usize>, key: Option<&str>) -> String {
    let mut s = path.display().to_string();
    if let Some(l) = line {
        let _ = write!(s, ":{l}");
    }
    if let Some(k) = key {
        let _ = write!(s, ": `{k}`");
    }
    s
}

/// What to check after a refusal with this status (empty when the vendor's text says it).
fn status_hint(status: u16) -> &'static str {
    match status {
        401 => " (check the credentials in the environment: they are missing, wrong or expired)",
        403 => " (the account may not do this here: check its permissions in the project, desk or portal)",
        404 => " (check base_url and the mapping's ids: project, service desk, department, request type)",
        _ => "",
    }
}

impl ConnectorError {
    /// A [`ConnectorError::Mapping`] without a line.
    pub(crate) fn mapping(
        path: &Path,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        ConnectorError::Mapping {
            path: path.to_owned(),
            line: None,
            key: Some(key.into()),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// A [`ConnectorError::BadResponse`].
    pub(crate) fn bad_response(vendor: &'static str, message: impl Into<String>) -> Self {
        ConnectorError::BadResponse {
            vendor,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_errors_name_file_line_key_and_fix() {
        let e = ConnectorError::Mapping {
            path: PathBuf::from("configs/connectors/zoho.toml"),
            line: Some(7),
            key: Some("department_id".into()),
            problem: "must be the numeric id".into(),
            fix: "write it as a string".into(),
        };
        assert_eq!(
            e.to_string(),
            "configs/connectors/zoho.toml:7: `department_id`: must be the numeric id; write it as a string"
        );
    }
}
