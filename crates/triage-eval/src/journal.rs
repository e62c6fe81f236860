//! Journals of decoded examples, so that a long evaluation or calibration that is interrupted
//! (Ctrl-C, a machine that goes away) continues where it stopped instead of decoding every
//! example again.
//!
//! A journal is a JSON-lines file: a header `{"journal":1,"key":KEY}`, where the key is the
//! caller's fingerprint of everything that decides the records (model, adapter, calibration,
//! taxonomy, data), then one `[id, record]` line per example, in example order, each written
//! whole as soon as its example is done. [`Journal::open`] with `resume` keeps the records
//! whose ids are the examples' first ids under the same key; a torn last line (the process
//! died while writing it) is cut off. Without `resume`, or under another key, the journal
//! starts over.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;

/// A journal that cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[error("journal {}: {source} (check that the folder is writable and the disk not full)", path.display())]
pub struct JournalError {
    /// The journal file.
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub source: std::io::Error,
}

#[derive(Serialize, Deserialize)]
struct Header {
    journal: u32,
    key: String,
}

/// An open journal: records are appended with [`Journal::append`].
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Option<File>,
}

impl Journal {
    /// Opens the journal at `path` for a run fingerprinted `key` over examples `ids`, and
    /// returns it with the records already there (with `resume`: those of the same key whose
    /// ids match `ids` from the start). Nothing is truncated when every example is already
    /// recorded, so a run over fewer examples (`--limit`) never loses the rest.
    pub fn open<T: DeserializeOwned>(
        path: &Path,
        key: &str,
        ids: &[impl AsRef<str>],
        resume: bool,
    ) -> Result<(Journal, Vec<T>), JournalError> {
        let err = |source| JournalError {
            path: path.to_owned(),
            source,
        };
        let (kept, good_len) = if resume {
            match std::fs::read(path) {
                Ok(bytes) => read_records(&bytes, key, ids),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
                Err(e) => return Err(err(e)),
            }
        } else {
            (Vec::new(), 0)
        };
        if kept.len() == ids.len() && !ids.is_empty() {
            // Nothing left to append: leave the file as it is.
            return Ok((
                Journal {
                    path: path.to_owned(),
                    file: None,
                },
                kept,
            ));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let file = if good_len > 0 {
            let mut f = OpenOptions::new().write(true).open(path).map_err(err)?;
            let len = f.metadata().map_err(err)?.len();
            if len != good_len {
                tracing::warn!(
                    "{}: keeping {} records, cutting {} bytes after them (a torn line or records of other examples)",
                    path.display(),
                    kept.len(),
                    len - good_len
                );
                f.set_len(good_len).map_err(err)?;
            }
            f.seek(SeekFrom::End(0)).map_err(err)?;
            f
        } else {
            if resume && path.exists() {
                tracing::warn!(
                    "{}: written by another run (model, adapter, taxonomy or data changed): starting over",
                    path.display()
                );
            }
            let mut f = File::create(path).map_err(err)?;
            let header = Header {
                journal: VERSION,
                key: key.to_owned(),
            };
            let mut line = serde_json::to_vec(&header).expect("header serializes");
            line.push(b'\n');
            f.write_all(&line).map_err(err)?;
            f
        };
        Ok((
            Journal {
                path: path.to_owned(),
                file: Some(file),
            },
            kept,
        ))
    }

    /// Appends the record of example `id`, as one whole line.
    pub fn append<T: Serialize>(&mut self, id: &str, record: &T) -> Result<(), JournalError> {
        let path = &self.path;
        let file = self.file.as_mut().ok_or_else(|| JournalError {
            path: path.clone(),
            source: std::io::Error::other("every example is already recorded; nothing may be appended"),
        })?;
        let mut line = serde_json::to_vec(&(id, record)).map_err(|e| JournalError {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        file.write_all(&line).map_err(|source| JournalError {
            path: path.clone(),
            source,
        })
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The records of `bytes` under `key` that match `ids` from the start, and the length of the
/// prefix of `bytes` that holds them (0: start over).
fn read_records<T: DeserializeOwned>(bytes: &[u8], key: &str, ids: &[impl AsRef<str>]) -> (Vec<T>, u64) {
    let mut lines = bytes.split_inclusive(|&b| b == b'\n');
    let Some(first) = lines.next().filter(|l| l.ends_with(b"\n")) else {
        return (Vec::new(), 0);
    };
    match serde_json::from_slice::<Header>(first) {
        Ok(h) if h.journal == VERSION && h.key == key => {}
        _ => return (Vec::new(), 0),
    }
    let mut good_len = first.len() as u64;
    let mut kept = Vec::new();
    for line in lines {
        if kept.len() == ids.len() || !line.ends_with(b"\n") {
            break;
        }
        match serde_json::from_slice::<(String, T)>(line) {
            Ok((id, record)) if id == ids[kept.len()].as_ref() => kept.push(record),
            _ => break,
        }
        good_len += line.len() as u64;
    }
    (kept, good_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("triage-journal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("j.jsonl")
    }

    fn write_three(path: &Path) {
        let (mut j, kept) = Journal::open::<u32>(path, "k1", &["a", "b", "c", "d"], true).unwrap();
        assert!(kept.is_empty());
        for (id, r) in [("a", 1u32), ("b", 2), ("c", 3)] {
            j.append(id, &r).unwrap();
        }
    }

    #[test]
    fn resumes_after_the_records_of_the_same_key() {
        let path = tmp("resume");
        write_three(&path);
        let (mut j, kept) = Journal::open::<u32>(&path, "k1", &["a", "b", "c", "d"], true).unwrap();
        assert_eq!(kept, vec![1, 2, 3]);
        j.append("d", &4u32).unwrap();
        let (_, kept) = Journal::open::<u32>(&path, "k1", &["a", "b", "c", "d"], true).unwrap();
        assert_eq!(kept, vec![1, 2, 3, 4]);
    }

    #[test]
    fn another_key_or_no_resume_starts_over() {
        let path = tmp("key");
        write_three(&path);
        let (_, kept) = Journal::open::<u32>(&path, "k2", &["a", "b", "c", "d"], true).unwrap();
        assert!(kept.is_empty());
        // The file now belongs to k2: k1's records are gone.
        let (_, kept) = Journal::open::<u32>(&path, "k1", &["a", "b", "c", "d"], true).unwrap();
        assert!(kept.is_empty());
        write_three(&path);
        let (_, kept) = Journal::open::<u32>(&path, "k1", &["a", "b", "c", "d"], false).unwrap();
        assert!(kept.is_empty());
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_next_record_starts_its_own_line() {
        let path = tmp("torn");
        write_three(&path);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"[\"d\",4").unwrap();
        drop(f);
        let (mut j, kept) = Journal::open::<u32>(&path, "k1", &["a", "b", "c", "d"], true).unwrap();
        assert_eq!(kept, vec![1, 2, 3]);
        j.append("d", &5u32).unwrap();
        let (_, kept) = Journal::open::<u32>(&path, "k1", &["a", "b", "c", "d"], true).unwrap();
        assert_eq!(kept, vec![1, 2, 3, 5]);
    }

    #[test]
    fn records_of_other_examples_are_not_reused() {
        let path = tmp("ids");
        write_three(&path);
        let (mut j, kept) = Journal::open::<u32>(&path, "k1", &["a", "x", "c", "d"], true).unwrap();
        assert_eq!(kept, vec![1]);
        j.append("x", &9u32).unwrap();
        let (_, kept) = Journal::open::<u32>(&path, "k1", &["a", "x", "c", "d"], true).unwrap();
        assert_eq!(kept, vec![1, 9]);
    }

    #[test]
    fn fewer_examples_keep_the_whole_journal() {
        let path = tmp("limit");
        write_three(&path);
        let before = std::fs::read(&path).unwrap();
        let (mut j, kept) = Journal::open::<u32>(&path, "k1", &["a", "b"], true).unwrap();
        assert_eq!(kept, vec![1, 2]);
        assert!(j.append("c", &3u32).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn garbage_is_not_a_journal() {
        let path = tmp("garbage");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"\x00\xff not json\n[\"a\",1]\n").unwrap();
        let (_, kept) = Journal::open::<u32>(&path, "k1", &["a"], true).unwrap();
        assert!(kept.is_empty());
    }
}
