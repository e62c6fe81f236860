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
//!
//! With `--push VENDOR` every structured row is also pushed, and its line gets `"push"`
//! (the vendor ticket) or `"push_error"` (counted as an error). The row's id is part of the
//! external id, so two identical texts in two rows are two tickets, and the outbox makes
//! pushing idempotent: on a re-run, rows already in the output without a `push` result
//! (pushed without success, or written by a run without `--push`) are pushed again from
//! their recorded ticket and their lines rewritten; rows already pushed are not sent again.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use triage_infer::TicketEngine;
use triage_taxonomy::{Ticket, Validator};

use crate::push_cmd::Pusher;

/// `--push` in batch mode: the pusher, and the validator that reads tickets back from an
/// earlier run's output.
pub struct BatchPush<'a> {
    /// Pushes each row.
    pub pusher: &'a Pusher,
    /// The taxonomy's validator.
    pub validator: &'a Validator,
}

impl BatchPush<'_> {
    /// Pushes a row's ticket; sets `push` or `push_error` on its output line. Returns
    /// whether it failed.
    fn push_row(&self, line: &mut Value, ticket: Ticket, text: &str, id: &str) -> bool {
        let input = self.pusher.input(ticket, text.to_owned(), Some(id));
        let obj = line.as_object_mut();
        let Some(obj) = obj else { return true };
        obj.remove("push_error");
        match self.pusher.push(&input, false) {
            Ok(outcome) => {
                obj.insert("push".into(), outcome.to_json());
                false
            }
            Err(e) => {
                obj.remove("push");
                obj.insert("push_error".into(), Value::String(format!("{e:#}")));
                true
            }
        }
    }
}

/// Whether an output line records a successful push (a dry run does not count).
fn pushed(line: &Value) -> bool {
    line.get("push").and_then(|p| p.get("id")).is_some()
}

/// One input row: its id (given or the 1-based row number) and text, or why it is unusable.
pub struct Row {
    /// 1-based row number in the input.
    pub row: usize,
    /// The row's id column, or the row number.
    pub id: String,
    /// The incident text, or the reason the row cannot be read.
    pub text: Result<String, RowError>,
}

/// Why an input row has no text to structure (its output line's `error`). `line` is the
/// 1-based line of the input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowError {
    /// A JSONL object without `text`, `subject` or `body`.
    NoTextField { line: usize },
    /// A JSONL line that is neither an object nor a string.
    NotObjectOrString { line: usize },
    /// A JSONL line that is not JSON (the parser's message).
    InvalidJson { line: usize, message: String },
    /// A CSV record the reader could not read (the reader's message).
    Csv { line: usize, message: String },
    /// A CSV row whose text columns are all empty.
    EmptyText { line: usize },
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowError::NoTextField { line } => write!(f, "line {line}: no `text` (or `subject`/`body`) field"),
            RowError::NotObjectOrString { line } => write!(f, "line {line}: expected an object or a string"),
            RowError::InvalidJson { line, message } => write!(f, "line {line}: invalid JSON: {message}"),
            RowError::Csv { line, message } => write!(f, "line {line}: {message}"),
            RowError::EmptyText { line } => write!(f, "line {line}: empty text"),
        }
    }
}

impl std::error::Error for RowError {}

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
    if matches!(content, std::borrow::Cow::Owned(_)) {
        tracing::warn!(
            "{}: not valid UTF-8; invalid bytes replaced with U+FFFD",
            path.display()
        );
    }
    // A byte-order mark (Windows editors) is not part of the first row.
    let content = content.strip_prefix('\u{feff}').unwrap_or(&content);
    let mut rows = Vec::new();
    match ext.as_str() {
        "jsonl" | "ndjson" => {
            for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let row = rows.len() + 1;
                let (id, text) = match serde_json::from_str::<Value>(line) {
                    Ok(Value::String(s)) => (row.to_string(), Ok(s)),
                    Ok(Value::Object(o)) => {
                        // A null or blank id is no id: the row number stands in, so that
                        // two rows without one are never pushed as one ticket.
                        let id = o
                            .get("id")
                            .filter(|v| !v.is_null())
                            .map(|v| v.as_str().map_or(v.to_string(), str::to_string))
                            .filter(|id| !id.trim().is_empty())
                            .unwrap_or(row.to_string());
                        let s = |k: &str| o.get(k).and_then(Value::as_str);
                        let text = s("text")
                            .map(str::to_string)
                            .or_else(|| join_subject_body(s("subject"), s("body")))
                            .ok_or(RowError::NoTextField { line: i + 1 });
                        (id, text)
                    }
                    Ok(_) => (row.to_string(), Err(RowError::NotObjectOrString { line: i + 1 })),
                    Err(e) => (
                        row.to_string(),
                        Err(RowError::InvalidJson {
                            line: i + 1,
                            message: e.to_string(),
                        }),
                    ),
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
                        text: Err(RowError::Csv {
                            line,
                            message: e.to_string(),
                        }),
                    }),
                    Ok(r) => {
                        let get = |c: Option<usize>| c.and_then(|c| r.get(c));
                        let text = get(c_text)
                            .filter(|t| !t.trim().is_empty())
                            .map(str::to_string)
                            .or_else(|| join_subject_body(get(c_subj), get(c_body)))
                            .ok_or(RowError::EmptyText { line });
                        let id = get(c_id)
                            .filter(|id| !id.trim().is_empty())
                            .map(str::to_string)
                            .unwrap_or(row.to_string());
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
/// the next row of a triage batch output is an error, so an unrelated file is never truncated,
/// and so is a row whose id is not the id of the same row of `rows` (the output of another
/// input, whose rows would otherwise be skipped as done).
fn resume_point(output: &Path, rows: &[Row]) -> anyhow::Result<(usize, usize)> {
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
        if let (Some(id), Some(r)) = (v.get("id").and_then(Value::as_str), rows.get(done)) {
            if id != r.id {
                bail!(
                    "{}: row {} is the ticket of id {id:?}, but row {} of the input has id {:?}: \
                     the output of another input? Choose another --output",
                    output.display(),
                    done + 1,
                    done + 1,
                    r.id
                );
            }
        }
        errors += usize::from(v.get("error").is_some() || v.get("push_error").is_some());
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

/// Whether Ctrl-C asked to stop (see [`STOP`]).
pub(crate) fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Makes Ctrl-C, SIGTERM (a service manager, `docker stop`) and a terminal hangup set
/// [`STOP`]. A SIGHUP that was ignored (`nohup`) stays ignored, so a run started with nohup
/// survives the logout.
pub(crate) fn install_ctrlc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let hup_ignored = sighup_ignored();
        let result = ctrlc::set_handler(|| {
            use std::io::Write as _;
            // Not eprintln!: after a hangup stderr may be a dead terminal, and a failed write
            // must not panic the handler.
            let mut err = std::io::stderr();
            if STOP.swap(true, Ordering::SeqCst) {
                let _ = writeln!(
                    err,
                    "\ninterrupted again: exiting now; rerun the same command to resume"
                );
                std::process::exit(130);
            }
            let _ = writeln!(
                err,
                "\ninterrupted: finishing the current row or step, then saving (Ctrl-C again to exit now)"
            );
        });
        if let Err(e) = result {
            tracing::warn!("cannot install the Ctrl-C handler: {e}");
        }
        if hup_ignored {
            ignore_sighup();
        }
    });
}

/// Whether SIGHUP is ignored in this process (`nohup`).
#[cfg(unix)]
fn sighup_ignored() -> bool {
    // SAFETY: with a null new action, sigaction only writes the current one into `old`,
    // a plain struct that zeroed memory initialises.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

#[cfg(unix)]
fn ignore_sighup() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no code.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn sighup_ignored() -> bool {
    false
}

#[cfg(not(unix))]
fn ignore_sighup() {}

/// Structures every row of `input` into `output`, skipping rows already there; with
/// `push`, pushes every structured row (see the module documentation).
pub fn run(
    structurer: &dyn TicketEngine,
    input: &Path,
    output: &Path,
    explain: bool,
    push: Option<&BatchPush>,
    batch_size: usize,
) -> anyhow::Result<(usize, usize)> {
    let structure = |text: &str| -> anyhow::Result<(Ticket, Value)> {
        let s = structurer.structure(text)?;
        let meta = if explain {
            serde_json::to_value(&s.meta)?
        } else {
            json!({"confidence": s.meta.confidence, "needs_review": s.meta.needs_review})
        };
        Ok((s.ticket, meta))
    };
    run_with(&structure, input, output, push, batch_size)
}

/// Pushes the rows already in `output` that have a ticket but no push result, rewriting
/// their lines (atomically); returns the number of error lines afterwards.
fn push_done_rows(output: &Path, rows: &[Row], push: &BatchPush) -> anyhow::Result<usize> {
    let content =
        std::fs::read_to_string(output).with_context(|| format!("cannot read {}", output.display()))?;
    let mut lines: Vec<Value> = Vec::new();
    let mut changed = 0usize;
    for l in content.lines() {
        let mut v: Value = serde_json::from_str(l)
            .with_context(|| format!("{}: not a batch output line", output.display()))?;
        let row = v["row"].as_u64().unwrap_or(0) as usize;
        let text = rows.get(row.wrapping_sub(1)).and_then(|r| r.text.as_ref().ok());
        if let (Some(text), Some(t), false) = (text, v.get("ticket"), pushed(&v)) {
            let ticket = push.validator.parse(t).map_err(|e| {
                anyhow::anyhow!(
                    "{}: row {row}: the recorded ticket is not valid: {e}",
                    output.display()
                )
            })?;
            let id = v["id"].as_str().unwrap_or_default().to_owned();
            push.push_row(&mut v, ticket, text, &id);
            changed += 1;
        }
        lines.push(v);
    }
    let errors = lines
        .iter()
        .filter(|v| v.get("error").is_some() || v.get("push_error").is_some())
        .count();
    if changed > 0 {
        tracing::info!(
            "pushed {changed} rows already in {} that had no push result",
            output.display()
        );
        let mut text = String::new();
        for v in &lines {
            text.push_str(&serde_json::to_string(v)?);
            text.push('\n');
        }
        let mut tmp = output.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, output).with_context(|| format!("cannot replace {}", output.display()))?;
    }
    Ok(errors)
}

/// The structuring step: a row's text → its ticket and meta, or the error (its message is
/// the row's `error`).
type Structure<'a> = dyn Fn(&str) -> anyhow::Result<(Ticket, Value)> + Sync + 'a;

/// [`run`] with the structuring step as a function, called for up to `batch_size` rows at
/// once (their forward passes are shared); lines are written in row order.
fn run_with(
    structure: &Structure,
    input: &Path,
    output: &Path,
    push: Option<&BatchPush>,
    batch_size: usize,
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
    let (done, mut errors) = resume_point(output, &rows)?;
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
        if let Some(push) = push {
            errors = push_done_rows(output, &rows, push)?;
        }
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
    let todo = &rows[done..];
    let mut written = done;
    let mut failed: Option<anyhow::Error> = None;
    triage_infer::for_each_concurrently(
        todo.len(),
        batch_size,
        |i| match &todo[i].text {
            Ok(text) => structure(text),
            Err(e) => Err(e.clone().into()),
        },
        |i, outcome| {
            // After a failed write nothing more is recorded, so nothing more is pushed.
            if failed.is_some() {
                return false;
            }
            let r = &todo[i];
            let line = match outcome {
                Ok((ticket, meta)) => {
                    let mut v = json!({"row": r.row, "id": r.id, "ticket": ticket, "meta": meta});
                    if let (Some(push), Ok(text)) = (push, r.text.as_deref()) {
                        errors += usize::from(push.push_row(&mut v, ticket, text, &r.id));
                    }
                    v
                }
                Err(e) => {
                    errors += 1;
                    json!({"row": r.row, "id": r.id, "error": e.to_string()})
                }
            };
            let write = serde_json::to_string(&line)
                .map_err(anyhow::Error::from)
                .and_then(|l| Ok(writeln!(out, "{l}").and_then(|_| out.flush())?));
            if let Err(e) = write {
                failed = Some(e.context(format!("cannot write {}", output.display())));
                return false;
            }
            written += 1;
            bar.inc(1);
            !STOP.load(Ordering::SeqCst)
        },
    );
    if let Some(e) = failed {
        return Err(e);
    }
    if written < rows.len() && STOP.load(Ordering::SeqCst) {
        out.sync_all()?;
        bar.abandon();
        bail!(
            "interrupted after {written} of {} rows; run the same command again to resume",
            rows.len()
        );
    }
    out.sync_all()?;
    bar.finish_and_clear();
    Ok((rows.len(), errors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use triage_connectors::{Outbox, RetryPolicy, Session, Vendor};
    use triage_taxonomy::Taxonomy;

    /// A loopback Jira: creates answer 201 with a new key (400 for a text containing
    /// "printer" while `fail` is set); searches find nothing. Returns its URL and the number
    /// of tickets created.
    fn fake_jira(fail: Arc<AtomicBool>) -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let created = Arc::new(AtomicUsize::new(0));
        let count = created.clone();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(mut sock) = sock else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, len) = loop {
                    let n = sock.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        break (buf.len(), 0);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0usize);
                        break (p + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let req = String::from_utf8_lossy(&buf).into_owned();
                let (status, body) = if req.starts_with("POST /rest/api/3/issue") {
                    if fail.load(Ordering::SeqCst) && req.contains("printer") {
                        (
                            400,
                            r#"{"errorMessages":["Field 'priority' is required."]}"#.to_owned(),
                        )
                    } else {
                        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                        (201, format!(r#"{{"id":"{}","key":"IT-{n}"}}"#, 10000 + n))
                    }
                } else {
                    (200, r#"{"issues":[],"isLast":true}"#.to_owned())
                };
                let _ = write!(
                    sock,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, created)
    }

    #[test]
    fn batch_push_pushes_every_row_once_and_retries_failed_pushes_on_rerun() {
        let dir = scratch().join("push");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.txt");
        std::fs::write(&input, "my vpn drops\nthe printer is jammed\nmy vpn drops\n").unwrap();
        let output = dir.join("out.jsonl");
        let fail = Arc::new(AtomicBool::new(true));
        let (url, created) = fake_jira(fail.clone());
        std::env::set_var("TRIAGE_BATCH_TEST_EMAIL", "me@example.com");
        std::env::set_var("TRIAGE_BATCH_TEST_TOKEN", "t0ken");
        let mapping = format!(
            "project_key = \"IT\"\n[site]\nbase_url = \"{url}\"\nemail_env = \"TRIAGE_BATCH_TEST_EMAIL\"\ntoken_env = \"TRIAGE_BATCH_TEST_TOKEN\"\n[issue_types]\n\"Incident\" = \"Incident\"\n\"Service Request\" = \"Service Request\"\n"
        );
        let policy = RetryPolicy {
            timeout: std::time::Duration::from_secs(5),
            search_window: std::time::Duration::ZERO,
            ..RetryPolicy::default()
        };
        let connector =
            triage_connectors::from_toml_str(Vendor::Jira, &mapping, Path::new("jira.toml")).unwrap();
        let pusher = Pusher::from_parts(
            connector,
            Session::new(Session::client_builder().build().unwrap(), policy),
            Outbox::new(dir.join("outbox.jsonl")),
            false,
        )
        .unwrap();
        let validator = Validator::new(&Taxonomy::builtin_default());
        let push = BatchPush {
            pusher: &pusher,
            validator: &validator,
        };
        let ticket = validator
            .parse_str(r#"{"summary":"x","category":"Network","subcategory":"VPN","priority":"High","assignment_group":"Network Operations","request_type":"Incident"}"#)
            .unwrap();
        let structure = |_: &str| -> anyhow::Result<(Ticket, Value)> { Ok((ticket.clone(), json!({}))) };
        let lines = || -> Vec<Value> {
            std::fs::read_to_string(&output)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };

        // First run: rows 1 and 3 (same text, other row) make two tickets; row 2 is refused.
        assert_eq!(
            run_with(&structure, &input, &output, Some(&push), 3).unwrap(),
            (3, 1)
        );
        assert_eq!(created.load(Ordering::SeqCst), 2);
        let l = lines();
        assert_eq!(l.len(), 3);
        assert!(pushed(&l[0]) && pushed(&l[2]) && l[0]["push"]["id"] != l[2]["push"]["id"]);
        assert!(l[1]["push_error"]
            .as_str()
            .unwrap()
            .contains("Field 'priority' is required."));

        // Re-run once the cause is fixed: only row 2 is pushed, its line rewritten in place.
        fail.store(false, Ordering::SeqCst);
        assert_eq!(
            run_with(&structure, &input, &output, Some(&push), 3).unwrap(),
            (3, 0)
        );
        assert_eq!(created.load(Ordering::SeqCst), 3);
        let l = lines();
        assert!(l.iter().all(pushed), "{l:?}");
        assert!(l[1].get("push_error").is_none());
        assert_eq!(
            l.iter().map(|v| v["row"].as_u64().unwrap()).collect::<Vec<_>>(),
            [1, 2, 3]
        );

        // Again: nothing left to push, nothing sent.
        assert_eq!(
            run_with(&structure, &input, &output, Some(&push), 3).unwrap(),
            (3, 0)
        );
        assert_eq!(created.load(Ordering::SeqCst), 3);
    }

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
    fn unreadable_rows_and_structuring_failures_become_error_lines_with_their_messages() {
        let dir = scratch();
        let input = dir.join("errors.jsonl");
        std::fs::write(
            &input,
            "{\"text\": \"VPN down\"}\n[1]\n{\"id\": \"x\"}\nnot json\n",
        )
        .unwrap();
        let output = dir.join("errors.out.jsonl");
        let _ = std::fs::remove_file(&output);
        let structure =
            |_: &str| -> anyhow::Result<(Ticket, Value)> { Err(triage_infer::InferError::EmptyInput.into()) };
        assert_eq!(run_with(&structure, &input, &output, None, 2).unwrap(), (4, 4));
        let errors: Vec<String> = std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["error"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let invalid = serde_json::from_str::<Value>("not json").unwrap_err();
        assert_eq!(
            errors,
            [
                triage_infer::InferError::EmptyInput.to_string(),
                "line 2: expected an object or a string".to_owned(),
                "line 3: no `text` (or `subject`/`body`) field".to_owned(),
                format!("line 4: invalid JSON: {invalid}"),
            ]
        );
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
        assert_eq!(
            rows[2].text.as_ref().unwrap_err().to_string(),
            "line 4: empty text"
        );
        // The csv crate is lenient: a quote left open at the end of the file closes there.
        assert_eq!(rows[3].text.as_deref().ok(), Some("unterminated"));
        assert!(rows.iter().enumerate().all(|(i, r)| r.row == i + 1));
        // Exports with CRLF line ends report the same lines.
        let crlf = rows_of("crlf.csv", "id,subject,body\r\nT-1,VPN,x\r\nT-2,,y\r\nT-3,,\r\n");
        assert_eq!(crlf[2].text, Err(RowError::EmptyText { line: 4 }));
    }

    /// A blank or null id is no id (the row number stands in), so two such rows are two
    /// tickets when pushed; a byte-order mark is not part of the first row.
    #[test]
    fn blank_ids_fall_back_to_row_numbers_and_a_bom_is_dropped() {
        let rows = rows_of(
            "b.csv",
            "\u{feff}id,text\n,Printer offline\n  ,Printer offline\nT-9,x\n",
        );
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["1", "2", "T-9"]);
        let rows = rows_of(
            "b.jsonl",
            "\u{feff}{\"id\": null, \"text\": \"a\"}\n{\"id\": \"\", \"text\": \"a\"}\n{\"id\": 0, \"text\": \"a\"}\n",
        );
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["1", "2", "0"]);
        assert!(rows.iter().all(|r| r.text.as_deref() == Ok("a")));
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
        assert_eq!(
            rows[1].text.as_ref().unwrap_err().to_string(),
            "line 2: expected an object or a string"
        );
        assert_eq!(
            rows[2].text.as_ref().unwrap_err().to_string(),
            "line 3: no `text` (or `subject`/`body`) field"
        );
        assert_eq!(rows[3].text.as_deref(), Ok("plain"));
    }

    #[test]
    fn resume_refuses_to_truncate_a_file_that_is_not_batch_output() {
        let dir = scratch();
        let p = dir.join("notes.txt");
        std::fs::write(&p, "important notes\nline two\n").unwrap();
        let e = resume_point(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("refusing to overwrite"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "important notes\nline two\n"
        );

        // A real output with a torn last fragment (cut inside a multi-byte character).
        let p = dir.join("out.jsonl");
        let mut bytes = b"{\"row\":1,\"id\":\"1\",\"error\":\"x\"}\n{\"row\":2,\"id\":\"\xd0".to_vec();
        std::fs::write(&p, &bytes).unwrap();
        let row = |id: &str| Row {
            row: 1,
            id: id.into(),
            text: Ok("t".into()),
        };
        // The output of another input (row 1's id differs) is refused, untouched.
        let e = resume_point(&p, &[row("a-7")]).unwrap_err().to_string();
        assert!(e.contains("\"a-7\"") && e.contains("another input"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
        assert_eq!(resume_point(&p, &[row("1")]).unwrap(), (1, 1));
        bytes.truncate(bytes.iter().position(|b| *b == b'\n').unwrap() + 1);
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }
}
