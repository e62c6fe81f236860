//! The local outbox: one JSON line per push event, so a re-run never creates a duplicate of a
//! ticket that was already created, and a crash between "sent" and "recorded" is recovered by
//! the search-before-retry path.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ConnectorError;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Vendor (`jira`, `jsm`, `zoho`, `sdp`).
    pub vendor: String,
    /// The deterministic external id written into the vendor ticket.
    pub external_id: String,
    /// `pending` (about to post) or `created`.
    pub state: String,
    /// Vendor ticket id, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Vendor ticket key or number, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Link to the ticket, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Unix time of the event.
    pub at: u64,
}

/// An append-only JSONL outbox file.
#[derive(Debug, Clone)]
pub struct Outbox {
    path: PathBuf,
}

impl Outbox {
    /// The outbox at `path` (created on first write).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Outbox { path: path.into() }
    }

    /// The default location: `$XDG_STATE_HOME/triage/outbox.jsonl`, else
    /// `~/.local/state/triage/outbox.jsonl`.
    pub fn default_path() -> PathBuf {
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("triage").join("outbox.jsonl")
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> ConnectorError {
        ConnectorError::Outbox {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Appends one event as a single write (whole lines, even with concurrent writers).
    pub fn record(&self, entry: &OutboxEntry) -> Result<(), ConnectorError> {
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        }
        let mut line = serde_json::to_string(entry).expect("entries serialise");
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.err(e))?;
        f.write_all(line.as_bytes()).map_err(|e| self.err(e))?;
        f.sync_data().map_err(|e| self.err(e))
    }

    /// The latest `created` event for this vendor and external id. Unreadable lines (a torn
    /// write, a hand edit) are skipped with a warning, never fatal.
    pub fn find_created(
        &self,
        vendor: &str,
        external_id: &str,
    ) -> Result<Option<OutboxEntry>, ConnectorError> {
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let mut found = None;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let Ok(line) = line else { continue };
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<OutboxEntry>(&line) {
                Ok(e) if e.vendor == vendor && e.external_id == external_id && e.state == "created" => {
                    found = Some(e)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    "{}:{}: skipping unreadable outbox line: {e}",
                    self.path.display(),
                    i + 1
                ),
            }
        }
        Ok(found)
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
