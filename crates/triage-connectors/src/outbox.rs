//! The local outbox: one JSON line per push event, so a re-run never creates a duplicate of a
//! ticket that was already created, and a create whose outcome is unknown (timeout, 5xx,
//! crash) is searched for before anything is posted again.
//!
//! States of an incident (vendor + external id; the latest line wins):
//! * `pending`: about to post. Left behind by a crash or Ctrl-C between posting and
//!   recording: the next push searches first.
//! * `unknown`: a create may have happened (timeout, 5xx) and searching did not find it yet.
//!   `triage push --reconcile` settles it; a later push searches first too.
//! * `created`: the vendor ticket is known. `reposted` marks one created after an unsettled
//!   attempt (a late-indexed first ticket would be a duplicate): `--reconcile` checks it.
//! * `absent`: `--reconcile` found no ticket: the create never happened; a later push posts.
//!
//! Appends take a shared lock on `<outbox>.lock` and [`Outbox::compact`] an exclusive one,
//! so compaction never loses a line written meanwhile.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ConnectorError;

/// Where an incident stands with a vendor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxState {
    /// About to post.
    Pending,
    /// A create may have happened; not found yet.
    Unknown,
    /// The ticket exists (`id`).
    Created,
    /// Reconciled: no ticket exists.
    Absent,
}

impl OutboxState {
    /// Whether `--reconcile` has something to settle.
    pub fn unsettled(self) -> bool {
        matches!(self, OutboxState::Pending | OutboxState::Unknown)
    }

    /// `pending`, `unknown`, `created` or `absent`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Unknown => "unknown",
            OutboxState::Created => "created",
            OutboxState::Absent => "absent",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Vendor (`jira`, `jsm`, `zoho`, `sdp`).
    pub vendor: String,
    /// The deterministic external id written into the vendor ticket.
    pub external_id: String,
    /// See the module documentation.
    pub state: OutboxState,
    /// Vendor ticket id, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Vendor ticket key or number, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Link to the ticket, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Created by a post made after an unsettled attempt: may have a duplicate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reposted: bool,
    /// Other tickets with the same external id, seen by a search.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<String>,
    /// Why the state is `unknown` (the last failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix time of the event.
    pub at: u64,
}

impl OutboxEntry {
    /// An event without ticket details.
    pub fn new(vendor: &str, external_id: &str, state: OutboxState) -> Self {
        OutboxEntry {
            vendor: vendor.to_owned(),
            external_id: external_id.to_owned(),
            state,
            id: None,
            key: None,
            url: None,
            reposted: false,
            duplicates: Vec::new(),
            reason: None,
            at: crate::types::now(),
        }
    }
}

/// What [`Outbox::compact`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Compacted {
    /// The outbox file.
    pub path: PathBuf,
    /// Readable lines before.
    pub before: usize,
    /// Lines after: one per incident and vendor.
    pub after: usize,
    /// Unreadable lines dropped (torn writes, hand edits).
    pub dropped_unreadable: usize,
}

/// One incident claimed by [`Outbox::claim`]; the claim ends when this is dropped.
#[derive(Debug)]
pub struct Claim {
    _file: File,
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
            message: format!("{e}; check the folder's permissions or pass --outbox FILE"),
        }
    }

    fn lock_file(&self) -> Result<File, ConnectorError> {
        self.sidecar("lock")
    }

    /// `<outbox>.<suffix>`, opened for locking (created, never truncated).
    fn sidecar(&self, suffix: &str) -> Result<File, ConnectorError> {
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(crate::store::sidecar(&self.path, suffix))
            .map_err(|e| self.err(e))
    }

    /// Claims one incident for one vendor until the returned guard is dropped: a second
    /// claim of it, from this process or another, waits. [`push`](crate::push) holds it from
    /// reading the outbox until the create is recorded, so two runs pushing the same incident
    /// at once never both post it. The lock lives on one of 64 sidecar files
    /// (`<outbox>.claim-NN`, by a hash of vendor and external id), so they do not pile up;
    /// two incidents that share one only wait for each other. The wait can be cancelled.
    pub async fn claim(&self, vendor: &str, external_id: &str) -> Result<Claim, ConnectorError> {
        // FNV-1a: the same stripe in every build and process.
        let hash = vendor
            .bytes()
            .chain([0])
            .chain(external_id.bytes())
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        let file = self.sidecar(&format!("claim-{:02}", hash % 64))?;
        let locked = crate::store::lock_when_free(file, &self.path)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Claim { _file: locked })
    }

    /// Appends one event as a single write (whole lines, even with concurrent writers).
    pub fn record(&self, entry: &OutboxEntry) -> Result<(), ConnectorError> {
        let lock = self.lock_file()?;
        lock.lock_shared().map_err(|e| self.err(e))?;
        let mut line = serde_json::to_string(entry).map_err(|e| self.err(e))?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.err(e))?;
        // A writer that died mid-line left a fragment without its newline: start on a fresh
        // line, or this event would be glued to the fragment and lost with it.
        if ends_mid_line(&mut f).map_err(|e| self.err(e))? {
            line.insert(0, '\n');
        }
        f.write_all(line.as_bytes()).map_err(|e| self.err(e))?;
        f.sync_data().map_err(|e| self.err(e))
    }

    /// Every readable event in file order, and the number of unreadable lines. Unreadable
    /// lines (a torn write, a hand edit) are skipped with a warning, never fatal.
    fn read_all(&self) -> Result<(Vec<OutboxEntry>, usize), ConnectorError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(self.err(e)),
        };
        let (mut entries, mut bad) = (Vec::new(), 0);
        for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
            let line = line.map_err(|e| self.err(e))?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<OutboxEntry>(&line) {
                Ok(e) => entries.push(e),
                Err(e) => {
                    bad += 1;
                    tracing::warn!(
                        "{}:{}: skipping unreadable outbox line: {e}",
                        self.path.display(),
                        i + 1
                    )
                }
            }
        }
        Ok((entries, bad))
    }

    /// The latest event for this vendor and external id.
    pub fn latest(&self, vendor: &str, external_id: &str) -> Result<Option<OutboxEntry>, ConnectorError> {
        Ok(self
            .read_all()?
            .0
            .into_iter()
            .rfind(|e| e.vendor == vendor && e.external_id == external_id))
    }

    /// The latest `created` event for this vendor and external id.
    pub fn find_created(
        &self,
        vendor: &str,
        external_id: &str,
    ) -> Result<Option<OutboxEntry>, ConnectorError> {
        Ok(self
            .latest(vendor, external_id)?
            .filter(|e| e.state == OutboxState::Created))
    }

    /// The latest event of every incident (optionally of one vendor), in order of first
    /// appearance.
    pub fn latest_all(&self, vendor: Option<&str>) -> Result<Vec<OutboxEntry>, ConnectorError> {
        Ok(latest_per_incident(self.read_all()?.0)
            .into_iter()
            .filter(|e| vendor.is_none_or(|v| e.vendor == v))
            .collect())
    }

    /// Rewrites the file with only the latest event per incident and vendor (atomically,
    /// under the exclusive lock); unreadable lines are dropped.
    pub fn compact(&self) -> Result<Compacted, ConnectorError> {
        let lock = self.lock_file()?;
        lock.lock().map_err(|e| self.err(e))?;
        let (entries, bad) = self.read_all()?;
        let before = entries.len();
        let kept = latest_per_incident(entries);
        let mut text = String::new();
        for e in &kept {
            text.push_str(&serde_json::to_string(e).map_err(|e| self.err(e))?);
            text.push('\n');
        }
        let tmp = crate::store::sidecar(&self.path, &format!("compact-{}", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            if let Ok(meta) = std::fs::metadata(&self.path) {
                f.set_permissions(meta.permissions())?;
            }
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.err(e));
        }
        Ok(Compacted {
            path: self.path.clone(),
            before,
            after: kept.len(),
            dropped_unreadable: bad,
        })
    }
}

/// The last event of each (vendor, external id), ordered by the first event of each.
fn latest_per_incident(entries: Vec<OutboxEntry>) -> Vec<OutboxEntry> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut last: HashMap<(String, String), OutboxEntry> = HashMap::new();
    for e in entries {
        let k = (e.vendor.clone(), e.external_id.clone());
        if !last.contains_key(&k) {
            order.push(k.clone());
        }
        last.insert(k, e);
    }
    order.into_iter().filter_map(|k| last.remove(&k)).collect()
}

/// Whether the file is non-empty and its last byte is not a newline.
fn ends_mid_line(f: &mut File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(name: &str) -> Outbox {
        let dir = std::env::temp_dir().join(format!("triage-outbox-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Outbox::new(dir.join("outbox.jsonl"))
    }

    /// Appends the start of an event, as a writer that died mid-write leaves it, then `end`.
    fn append_torn(ob: &Outbox, end: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(ob.path()).unwrap();
        f.write_all(b"{\"vendor\":\"jira\",\"exte").unwrap();
        f.write_all(end).unwrap();
    }

    #[test]
    fn compaction_keeps_the_latest_state_of_each_incident() {
        let ob = outbox("compact");
        for (ext, state) in [
            ("a", OutboxState::Pending),
            ("b", OutboxState::Pending),
            ("a", OutboxState::Created),
            ("b", OutboxState::Unknown),
            ("c", OutboxState::Pending),
            ("c", OutboxState::Created),
        ] {
            let mut e = OutboxEntry::new("jira", ext, state);
            if state == OutboxState::Created {
                e.id = Some(format!("id-{ext}"));
            }
            ob.record(&e).unwrap();
        }
        // The same external id at another vendor is another incident.
        ob.record(&OutboxEntry::new("zoho", "a", OutboxState::Pending))
            .unwrap();
        // A torn line (ended by a newline, as a later write leaves it).
        append_torn(&ob, b"\n");
        let before = ob.latest_all(None).unwrap();
        let c = ob.compact().unwrap();
        assert_eq!((c.before, c.after, c.dropped_unreadable), (7, 4, 1));
        let after = ob.latest_all(None).unwrap();
        assert_eq!(before, after, "compaction changes no incident's state");
        assert_eq!(std::fs::read_to_string(ob.path()).unwrap().lines().count(), 4);
        assert_eq!(
            ob.find_created("jira", "a").unwrap().unwrap().id.as_deref(),
            Some("id-a")
        );
        assert_eq!(
            ob.latest("jira", "b").unwrap().unwrap().state,
            OutboxState::Unknown
        );
        assert!(ob.find_created("zoho", "a").unwrap().is_none());
        // Compacting twice changes nothing.
        let again = ob.compact().unwrap();
        assert_eq!((again.before, again.after), (4, 4));
    }

    /// A crash mid-write leaves a fragment without its newline; the next event starts on a
    /// line of its own and is kept.
    #[test]
    fn an_event_after_a_torn_write_is_not_lost() {
        let ob = outbox("torn");
        ob.record(&OutboxEntry::new("jira", "a", OutboxState::Pending))
            .unwrap();
        append_torn(&ob, b"");
        let mut e = OutboxEntry::new("jira", "a", OutboxState::Created);
        e.id = Some("id-a".into());
        ob.record(&e).unwrap();
        assert_eq!(
            ob.find_created("jira", "a").unwrap().unwrap().id.as_deref(),
            Some("id-a")
        );
        assert_eq!(ob.compact().unwrap().dropped_unreadable, 1);
    }

    #[test]
    fn old_outbox_lines_still_read() {
        let ob = outbox("old");
        std::fs::create_dir_all(ob.path().parent().unwrap()).unwrap();
        std::fs::write(
            ob.path(),
            "{\"vendor\":\"jira\",\"external_id\":\"x\",\"state\":\"pending\",\"at\":1}\n{\"vendor\":\"jira\",\"external_id\":\"x\",\"state\":\"created\",\"id\":\"1\",\"key\":\"IT-1\",\"at\":2}\n",
        )
        .unwrap();
        assert_eq!(
            ob.find_created("jira", "x").unwrap().unwrap().key.as_deref(),
            Some("IT-1")
        );
    }
}
