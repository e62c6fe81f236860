//! `triage infer --input F --output out.jsonl`: many incidents, one output row per input row,
//! in order, resumable.
//!
//! Input: `.jsonl` (objects with `text`, or `subject` + `body`, and an optional `id`; or bare
//! JSON strings), `.csv` (header with `text` or `subject`/`body`, optional `id`), or `.txt`
//! (one incident per non-empty line). Every input row yields exactly one output line:
//! `{"row", "id", "ticket", "meta"}` or `{"row", "id", "error"}`; nothing is dropped.
//! Output is appended and flushed row by row. On restart, rows already in the output are
//! skipped (a torn last line from a kill is cut off first). Ctrl-C finishes the current row
//! and stops cleanly.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use triage_infer::Structurer;

/// One input row: its id (given or the 1-based row number) and text, or why it is unusable.
pub struct Row {
    /// 1-based row number in the input.
    pub row: usize,
    /// The row's id column, or the row number.
    pub id: String,
    /// The incident text, or the reason the row cannot be read.
    pub text: Result<String, String>,
}

fn join_subject_body(subject: Option<&str>, body: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = [subject, body]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// Reads every row of an input file (format from its extension).
pub fn read_rows(path: &Path) -> anyhow::Result<Vec<Row>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let content = String::from_utf8_lossy(&bytes);
    let mut rows = Vec::new();
    match ext.as_str() {
        "jsonl" | "ndjson" => {
            for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let row = rows.len() + 1;
                let (id, text) = match serde_json::from_str::<Value>(line) {
                    Ok(Value::String(s)) => (row.to_string(), Ok(s)),
                    Ok(Value::Object(o)) => {
                        let id = o
                            .get("id")
                            .map(|v| v.as_str().map_or(v.to_string(), str::to_string))
                            .unwrap_or(row.to_string());
                        let s = |k: &str| o.get(k).and_then(Value::as_str);
                        let text = s("text")
                            .map(str::to_string)
                            .or_else(|| join_subject_body(s("subject"), s("body")))
                            .ok_or_else(|| format!("line {}: no `text` (or `subject`/`body`) field", i + 1));
                        (id, text)
                    }
                    Ok(_) => (
                        row.to_string(),
                        Err(format!("line {}: expected an object or a string", i + 1)),
                    ),
                    Err(e) => (row.to_string(), Err(format!("line {}: invalid JSON: {e}", i + 1))),
                };
                rows.push(Row { row, id, text });
            }
        }
        "csv" => {
            let mut rdr = csv::ReaderBuilder::new()
                .flexible(true)
                .from_reader(content.as_bytes());
            let headers = rdr.headers().context("cannot read the CSV header")?.clone();
            let col = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
            let (c_text, c_subj, c_body, c_id) = (col("text"), col("subject"), col("body"), col("id"));
            if c_text.is_none() && c_subj.is_none() && c_body.is_none() {
                bail!(
                    "{}: the CSV needs a `text` column (or `subject`/`body`); found {:?}",
                    path.display(),
                    headers
                );
            }
            for (i, rec) in rdr.records().enumerate() {
                let row = i + 1;
                // The reader's own position: right even when quoted fields span lines.
                let line = rec.as_ref().ok().and_then(|r| r.position()).map_or(i + 2, |p| {
                    triage_data::import::line_at(content.as_bytes(), p.byte()) as usize
                });
                match rec {
                    Err(e) => rows.push(Row {
                        row,
                        id: row.to_string(),
                        text: Err(format!("line {line}: {e}")),
                    }),
                    Ok(r) => {
                        let get = |c: Option<usize>| c.and_then(|c| r.get(c));
                        let text = get(c_text)
                            .filter(|t| !t.trim().is_empty())
                            .map(str::to_string)
                            .or_else(|| join_subject_body(get(c_subj), get(c_body)))
                            .ok_or_else(|| format!("line {line}: empty text"));
                        let id = get(c_id).map(str::to_string).unwrap_or(row.to_string());
                        rows.push(Row { row, id, text });
                    }
                }
            }
        }
        "txt" | "" => {
            for line in content.lines().filter(|l| !l.trim().is_empty()) {
                let row = rows.len() + 1;
                rows.push(Row {
                    row,
                    id: row.to_string(),
                    text: Ok(line.to_string()),
                });
            }
        }
        other => bail!(
            "{}: unsupported input format `.{other}` (use .jsonl, .csv or .txt)",
            path.display()
        ),
    }
    Ok(rows)
}

/// Number of complete rows already in `output` and how many of them are errors. A final
/// fragment without a newline (a run killed mid-write) is cut off; any other line that is not
/// the next row of a triage batch output is an error, so an unrelated file is never truncated.
fn resume_point(output: &Path) -> anyhow::Result<(usize, usize)> {
    let Ok(mut f) = OpenOptions::new().read(true).write(true).open(output) else {
        return Ok((0, 0));
    };
    let (mut good_len, mut done, mut errors) = (0u64, 0usize, 0usize);
    let mut reader = BufReader::new(&mut f);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // end of file, or a torn final fragment
        }
        let row = serde_json::from_slice::<Value>(&line).ok().filter(|v| {
            v.get("row").and_then(Value::as_u64) == Some(done as u64 + 1)
                && (v.get("ticket").is_some() || v.get("error").is_some())
        });
        let Some(v) = row else {
            bail!(
                "{}: line {} is not row {} of a triage batch output; refusing to overwrite it \
                 (choose another --output)",
                output.display(),
                done + 1,
                done + 1
            );
        };
        errors += usize::from(v.get("error").is_some());
        done += 1;
        good_len += n as u64;
    }
    drop(reader);
    if f.metadata()?.len() != good_len {
        tracing::warn!("{}: cutting an incomplete last line", output.display());
        f.set_len(good_len)?;
    }
    f.seek(SeekFrom::End(0))?;
    Ok((done, errors))
}

/// Set by Ctrl-C: finish the current row, then stop. A second Ctrl-C exits at once.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

pub(crate) fn install_ctrlc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let result = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted again: exiting now; rerun the same command to resume");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupted: finishing the current row or step, then saving (Ctrl-C again to exit now)"
            );
        });
        if let Err(e) = result {
            tracing::warn!("cannot install the Ctrl-C handler: {e}");
        }
    });
}

/// Structures every row of `input` into `output`, skipping rows already there.
pub fn run(
    structurer: &Structurer,
    input: &Path,
    output: &Path,
    explain: bool,
) -> anyhow::Result<(usize, usize)> {
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            bail!(
                "--output {} is the input file; choose another output",
                output.display()
            );
        }
    }
    let rows = read_rows(input)?;
    let (done, mut errors) = resume_point(output)?;
    if done > rows.len() {
        bail!(
            "{} has {done} rows but {} has only {}: wrong output file?",
            output.display(),
            input.display(),
            rows.len()
        );
    }
    if done > 0 {
        tracing::info!(
            "resuming after {done} of {} rows already in {}",
            rows.len(),
            output.display()
        );
    }
    install_ctrlc();
    STOP.store(false, Ordering::SeqCst);
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .with_context(|| format!("cannot write {}", output.display()))?;
    let bar = ProgressBar::new(rows.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} rows, {per_sec}, eta {eta} {msg}")
            .expect("valid template"),
    );
    bar.set_position(done as u64);
    for r in rows.iter().skip(done) {
        if STOP.load(Ordering::SeqCst) {
            bar.abandon();
            bail!(
                "interrupted after {} of {} rows; run the same command again to resume",
                r.row - 1,
                rows.len()
            );
        }
        let line = match r
            .text
            .as_deref()
            .map_err(String::clone)
            .and_then(|t| structurer.structure(t).map_err(|e| e.to_string()))
        {
            Ok(s) => {
                let mut v = json!({"row": r.row, "id": r.id, "ticket": s.ticket});
                if explain {
                    v["meta"] = serde_json::to_value(&s.meta)?;
                } else {
                    v["meta"] = json!({"confidence": s.meta.confidence, "needs_review": s.meta.needs_review});
                }
                v
            }
            Err(e) => {
                errors += 1;
                json!({"row": r.row, "id": r.id, "error": e})
            }
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
        out.flush()?;
        bar.inc(1);
    }
    out.sync_all()?;
    bar.finish_and_clear();
    Ok((rows.len(), errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder for this test process's files.
    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("triage-batch-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rows_of(name: &str, content: &str) -> Vec<Row> {
        let dir = scratch();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        read_rows(&p).unwrap()
    }

    #[test]
    fn csv_rows_join_subject_and_body_and_report_bad_rows() {
        let rows = rows_of(
            "t.csv",
            "id,subject,body\nT-1,VPN,\"drops, every 10 min\"\nT-2,,only body\nT-3,,\n\"T-4\",\"unterminated\n",
        );
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].id, "T-1");
        assert_eq!(rows[0].text.as_deref(), Ok("VPN\n\ndrops, every 10 min"));
        assert_eq!(rows[1].text.as_deref(), Ok("only body"));
        assert_eq!(rows[2].text.as_ref().unwrap_err(), "line 4: empty text");
        // The csv crate is lenient: a quote left open at the end of the file closes there.
        assert_eq!(rows[3].text.as_deref().ok(), Some("unterminated"));
        assert!(rows.iter().enumerate().all(|(i, r)| r.row == i + 1));
        // Exports with CRLF line ends report the same lines.
        let crlf = rows_of("crlf.csv", "id,subject,body\r\nT-1,VPN,x\r\nT-2,,y\r\nT-3,,\r\n");
        assert_eq!(crlf[2].text.as_ref().unwrap_err(), "line 4: empty text");
    }

    #[test]
    fn csv_without_a_text_column_is_rejected() {
        let dir = scratch();
        let p = dir.join("bad.csv");
        std::fs::write(&p, "a,b\n1,2\n").unwrap();
        let e = read_rows(&p).err().unwrap().to_string();
        assert!(e.contains("needs a `text` column"), "{e}");
        let p = dir.join("x.xlsx");
        std::fs::write(&p, "").unwrap();
        assert!(read_rows(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("unsupported input format"));
    }

    #[test]
    fn txt_and_jsonl_rows() {
        let rows = rows_of("t.txt", "first incident\n\n  \nsecond incident\n");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].text.as_deref(), Ok("second incident"));
        let rows = rows_of(
            "t.jsonl",
            "{\"id\": 7, \"text\": \"a\"}\n[1]\n{\"x\": 1}\n\"plain\"\n",
        );
        assert_eq!(rows[0].id, "7");
        assert!(rows[1]
            .text
            .as_ref()
            .unwrap_err()
            .contains("expected an object or a string"));
        assert!(rows[2].text.as_ref().unwrap_err().contains("no `text`"));
        assert_eq!(rows[3].text.as_deref(), Ok("plain"));
    }

    #[test]
    fn resume_refuses_to_truncate_a_file_that_is_not_batch_output() {
        let dir = scratch();
        let p = dir.join("notes.txt");
        std::fs::write(&p, "important notes\nline two\n").unwrap();
        let e = resume_point(&p).unwrap_err().to_string();
        assert!(e.contains("refusing to overwrite"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "important notes\nline two\n"
        );

        // A real output with a torn last fragment (cut inside a multi-byte character).
        let p = dir.join("out.jsonl");
        let mut bytes = b"{\"row\":1,\"id\":\"1\",\"error\":\"x\"}\n{\"row\":2,\"id\":\"\xd0".to_vec();
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(resume_point(&p).unwrap(), (1, 1));
        bytes.truncate(bytes.iter().position(|b| *b == b'\n').unwrap() + 1);
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }
}
