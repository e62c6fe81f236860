//! The canonical example: one incident text and the ticket it should become.

use std::fmt;
use std::io::{BufRead, Write};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use triage_taxonomy::{Ticket, Validator};

use crate::{DataError, ExampleError, ValueError};

/// Which part of a dataset an example belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Used to fit adapters or baselines.
    Train,
    /// Used to choose checkpoints and thresholds.
    Val,
    /// Held out for the final report.
    Test,
}

impl Split {
    /// All splits in file order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// `train`, `val` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "train" => Ok(Split::Train),
            "val" | "valid" | "validation" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(ValueError {
                what: "unknown split",
                value: other.to_owned(),
                expected: "expected train, val or test",
            }),
        }
    }
}

/// One labelled example. Its `ticket` is valid for the taxonomy it was read with: there is no
/// way to build an `Example` with labels outside the taxonomy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    /// Unique id within the dataset (`synth-7-00042`, `tickets-v3-5lang:17`).
    pub id: String,
    /// The incident as the user wrote it.
    pub text: String,
    /// The target ticket.
    pub ticket: Ticket,
    /// ISO 639-1 language code of `text` (`und` when unknown).
    pub lang: String,
    /// Where the example comes from (`synth`, a file stem, ...).
    pub source: String,
    /// Examples that share a group (a synthetic scenario, a near-duplicate cluster) must stay
    /// in one split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The split the example was assigned to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExample {
    id: String,
    text: String,
    ticket: Value,
    #[serde(default = "und")]
    lang: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    split: Option<Split>,
}

fn und() -> String {
    "und".to_owned()
}

impl Example {
    /// Parses one JSONL line; the ticket is validated against `validator`'s taxonomy.
    pub fn from_json_line(line: &str, validator: &Validator) -> Result<Self, ExampleError> {
        let raw: RawExample = serde_json::from_str(line).map_err(ExampleError::NotCanonical)?;
        if raw.text.trim().is_empty() {
            return Err(ExampleError::EmptyText);
        }
        let ticket = validator
            .parse(&raw.ticket)
            .map_err(|violations| ExampleError::Ticket {
                taxonomy: validator.taxonomy().name.clone(),
                violations,
            })?;
        Ok(Example {
            id: raw.id,
            text: raw.text,
            ticket,
            lang: raw.lang,
            source: raw.source,
            group: raw.group,
            split: raw.split,
        })
    }

    /// The example as one JSON line (no trailing newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("examples serialise")
    }

    /// The group used for leakage-free splits: the explicit group, else the id.
    pub fn group_or_id(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.id)
    }
}

/// Reads a canonical JSONL file. Blank lines are skipped; any other bad line is an error that
/// names the file and line. Duplicate ids are an error too.
pub fn read_examples(path: &Path, validator: &Validator) -> Result<Vec<Example>, DataError> {
    read_examples_and_bytes(path, validator).map(|(examples, _)| examples)
}

/// [`read_examples`], with the bytes parsed: what to hash or key on is what was read, not a
/// second read of a file that may have changed in between.
pub fn read_examples_and_bytes(
    path: &Path,
    validator: &Validator,
) -> Result<(Vec<Example>, Vec<u8>), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    Ok((parse_examples(&bytes, path, validator)?, bytes))
}

/// The SHA-256 of `bytes`, in lowercase hex: how data files are identified in reports and
/// adapters.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// [`read_examples`] on the contents of a file already read; `path` names it in errors.
/// A UTF-8 byte-order mark (Windows editors write one) is skipped.
pub fn parse_examples(bytes: &[u8], path: &Path, validator: &Validator) -> Result<Vec<Example>, DataError> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (i, line) in bytes.lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.map_err(|e| DataError::Parse {
            path: path.into(),
            line: line_no,
            message: format!("cannot read line: {e}"),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let example = Example::from_json_line(&line, validator).map_err(|source| DataError::Example {
            path: path.into(),
            line: line_no,
            source,
        })?;
        if !ids.insert(example.id.clone()) {
            return Err(DataError::Parse {
                path: path.into(),
                line: line_no,
                message: format!("duplicate id {:?}; ids must be unique within a file", example.id),
            });
        }
        out.push(example);
    }
    Ok(out)
}

/// Writes examples as JSONL, atomically: readers see the old file or the complete new one.
pub fn write_examples(path: &Path, examples: &[Example]) -> Result<(), DataError> {
    let mut buf = Vec::with_capacity(examples.len() * 512);
    for e in examples {
        buf.extend_from_slice(e.to_json_line().as_bytes());
        buf.push(b'\n');
    }
    atomic_write(path, &buf)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
/// Parent directories are created.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| DataError::Invalid(format!("{}: not a file path", path.display())))?;
    // Unique per process and call, so two threads writing the same path never share a
    // temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself survives a power loss once the folder is synced (Unix; elsewhere
        // a folder cannot be opened for that, and the rename is all there is).
        #[cfg(unix)]
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(DataError::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use triage_taxonomy::Taxonomy;

    fn validator() -> Validator {
        Validator::new(&Taxonomy::builtin_default())
    }

    const LINE: &str = r#"{"id":"a","text":"vpn down","ticket":{"summary":"VPN down","category":"Network","subcategory":"VPN","priority":"High","assignment_group":"Network Operations","request_type":"Incident"},"lang":"en","source":"t"}"#;

    #[test]
    fn round_trips_a_line() {
        let v = validator();
        let e = Example::from_json_line(LINE, &v).unwrap();
        assert_eq!(e.ticket.get("subcategory"), Some("VPN"));
        assert_eq!(e.to_json_line(), LINE);
    }

    #[test]
    fn rejects_labels_outside_the_taxonomy_with_the_line() {
        let v = validator();
        let dir = std::env::temp_dir().join(format!("triage-data-ex-{}", std::process::id()));
        let path = dir.join("bad.jsonl");
        let bad = LINE.replace("\"VPN\"", "\"Printer / Scanner\"");
        atomic_write(&path, format!("{LINE}\n\n{bad}\n").as_bytes()).unwrap();
        let err = read_examples(&path, &v).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:3:"), "{err}");
        assert!(err.contains("subcategory"), "{err}");
        let dup = format!("{LINE}\n{LINE}\n");
        atomic_write(&path, dup.as_bytes()).unwrap();
        let err = read_examples(&path, &v).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("duplicate id"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Threads writing one path at once each get their own temporary file: every write
    /// succeeds, the file ends up as one of them whole, and no temporary file is left.
    #[test]
    fn concurrent_atomic_writes_of_one_path_never_mix() {
        let dir = std::env::temp_dir().join(format!("triage-data-atomic-{}", std::process::id()));
        let path = dir.join("out.jsonl");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    let body = vec![b'a' + t; 64 << 10];
                    for _ in 0..25 {
                        atomic_write(path, &body).unwrap();
                    }
                });
            }
        });
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written.len(), 64 << 10);
        assert!(written.iter().all(|&b| b == written[0]), "two writes mixed");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("out.jsonl")]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A file saved by an editor that writes a byte-order mark reads like one without.
    #[test]
    fn a_byte_order_mark_is_skipped() {
        let v = validator();
        let with_bom = format!("\u{feff}{LINE}\n");
        let read = parse_examples(with_bom.as_bytes(), Path::new("bom.jsonl"), &v).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].id, "a");
    }

    #[test]
    fn rejects_unknown_keys_and_empty_text() {
        let v = validator();
        assert!(
            Example::from_json_line(&LINE.replace("\"source\"", "\"sauce\""), &v)
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        assert!(Example::from_json_line(&LINE.replace("vpn down", " "), &v)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }
}
