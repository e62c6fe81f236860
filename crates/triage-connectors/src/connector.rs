//! The one interface every vendor implements, and the mapping-file parser they share.
//!
//! A [`Connector`] is pure data plus parsing: it builds requests (create, search), reads
//! responses, and says how it authenticates; the push flow ([`crate::push`]) does the I/O.
//! Vendors depend on this module, never the other way round.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use serde::de::DeserializeOwned;

use crate::http::HttpRequest;
use crate::oauth::ZohoOAuth;
use crate::session::Session;
use crate::types::{PushInput, Pushed, Vendor};
use crate::{ConnectorError, Secret};

/// A boxed `Send` future (what async trait methods return, so `dyn Connector` works).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a connector authenticates.
#[derive(Debug)]
pub enum Auth<'a> {
    /// Ready headers (HTTP Basic, an `authtoken`), built from the environment.
    Headers(Vec<(String, Secret)>),
    /// The Zoho OAuth refresh flow (Zoho Desk, ServiceDesk Plus Cloud): the token comes from
    /// the session's [`TokenCache`](crate::TokenCache).
    ZohoOAuth(&'a ZohoOAuth),
}

/// Where [`Connector::resolve`] may look things up.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    /// A dry run: nothing is sent; unresolved values are shown as placeholders.
    DryRun,
    /// A real push: the session and the authentication headers to use.
    Live {
        /// The session (client, policy, lookup cache).
        session: &'a Session,
        /// Authentication headers.
        auth: &'a [(String, Secret)],
    },
}

/// One ITSM: request builders and response parsers for a configured mapping.
pub trait Connector: std::fmt::Debug + Send + Sync {
    /// Which vendor.
    fn vendor(&self) -> Vendor;

    /// The mapping file it was loaded from (named in mapping errors).
    fn mapping_path(&self) -> &Path;

    /// How to authenticate. In a dry run missing variables are allowed (the values are
    /// printed redacted anyway).
    fn auth(&self, dry_run: bool) -> Result<Auth<'_>, ConnectorError>;

    /// Turns the input into what the vendor needs before the create request is built (JSM:
    /// the requester's e-mail → accountId). The default changes nothing.
    fn resolve<'a>(
        &'a self,
        input: &'a PushInput,
        _lookup: Lookup<'a>,
    ) -> BoxFuture<'a, Result<PushInput, ConnectorError>> {
        Box::pin(async move { Ok(input.clone()) })
    }

    /// The create request, without credentials.
    fn create_request(&self, input: &PushInput, ext_id: &str) -> Result<HttpRequest, ConnectorError>;

    /// The search for tickets carrying `ext_id`, oldest first where the vendor can sort.
    fn search_request(&self, ext_id: &str) -> HttpRequest;

    /// The ticket a 2xx create response names.
    fn parse_created(&self, body: &str) -> Result<Pushed, ConnectorError>;

    /// The tickets a 2xx search response lists (empty when none).
    fn parse_search(&self, body: &str) -> Result<Vec<Pushed>, ConnectorError>;

    /// The vendor's error body as one line, verbatim.
    fn error_text(&self, body: &str) -> String;

    /// Whether an error body signals a rate limit whatever the HTTP status (SDP's 4015).
    fn rate_limited(&self, _body: &str) -> bool {
        false
    }
}

/// Parses a mapping, naming the file, line and key of any problem.
pub(crate) fn parse_mapping<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConnectorError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim().to_owned();
        // `missing field `x`` / `unknown field `x``: the key is in the message; otherwise
        // the key on the reported line.
        let named = message.starts_with("missing field") || message.starts_with("unknown field");
        let key = named
            .then(|| message.split('`').nth(1).map(str::to_owned))
            .flatten()
            .or_else(|| {
                line.and_then(|l| text.lines().nth(l - 1))
                    .and_then(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
                    .filter(|k| !k.is_empty())
            });
        ConnectorError::Mapping {
            path: path.to_owned(),
            line,
            key,
            problem: message,
            fix: "fix the mapping (see the comments in configs/connectors/)".into(),
        }
    })
}

/// The line of `text` where `key = ...` is set, for errors found after parsing.
pub(crate) fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.split_once('=')
                .is_some_and(|(k, _)| k.trim().trim_matches('"') == key)
        })
        .map(|i| i + 1)
}
