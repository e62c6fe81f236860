//! What lives as long as the process that pushes: the HTTP client, the retry policy, the
//! OAuth token cache and lookup caches (JSM e-mail → accountId).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::http::RetryPolicy;
use crate::oauth::TokenCache;
use crate::store::PrivateFile;
use crate::ConnectorError;

/// One per process (a CLI run, a server): build it once and pass it to every
/// [`push`](crate::push) so tokens and lookups are reused.
#[derive(Debug)]
pub struct Session {
    pub(crate) client: reqwest::Client,
    pub(crate) policy: RetryPolicy,
    pub(crate) tokens: TokenCache,
    pub(crate) lookups: LookupCache,
}

impl Session {
    /// The HTTP client a session should be given: it never follows redirects, because
    /// reqwest drops `Authorization` on a redirect to another host but not a custom
    /// credential header such as SDP's `authtoken`. A redirect is reported instead
    /// ([`ConnectorError::Redirected`]).
    pub fn client_builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
    }

    /// A session whose caches live in memory only (right for a long-running process). Build
    /// `client` from [`Session::client_builder`].
    pub fn new(client: reqwest::Client, policy: RetryPolicy) -> Self {
        Session {
            client,
            policy,
            tokens: TokenCache::in_memory(),
            lookups: LookupCache::default(),
        }
    }

    /// Also keeps the caches in `dir` (created `0700`; files `0600`): `oauth-tokens.json`
    /// and `lookups.json`. For a CLI that runs once per push, so the eleventh push in ten
    /// minutes does not mint an eleventh Zoho token.
    pub fn with_cache_dir(mut self, dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        self.tokens = TokenCache::with_file(dir.join("oauth-tokens.json"));
        self.lookups = LookupCache::with_file(dir.join("lookups.json"));
        self
    }

    /// The retry policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The HTTP client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The token cache.
    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }
}

/// Name → value lookups that rarely change (an e-mail address's Atlassian accountId), in
/// memory and optionally in a private file.
#[derive(Debug, Default)]
pub(crate) struct LookupCache {
    memory: Mutex<HashMap<String, String>>,
    file: Option<PrivateFile>,
}

impl LookupCache {
    fn with_file(path: PathBuf) -> Self {
        LookupCache {
            memory: Mutex::new(HashMap::new()),
            file: Some(PrivateFile::new(path)),
        }
    }

    /// The cached value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = memory.get(key) {
            return Some(v.clone());
        }
        let v = self.file.as_ref()?.read::<String>().remove(key)?;
        memory.insert(key.to_owned(), v.clone());
        Some(v)
    }

    /// Remembers `key` → `value`; a file that cannot be written is only a warning.
    pub(crate) fn put(&self, key: &str, value: &str) {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), value.to_owned());
        if let Some(file) = &self.file {
            let r: Result<(), ConnectorError> = file.update::<String>(|m| {
                m.insert(key.to_owned(), value.to_owned());
            });
            if let Err(e) = r {
                tracing::warn!("{e}");
            }
        }
    }
}
