//! Training data uploads and background training jobs (`/api/v1/train-data`,
//! `/api/v1/train`), one job at a time, with activation of the trained adapter without a
//! restart.
//!
//! Layout under [`crate::ServeConfig::data_dir`]:
//! `datasets/<id>.jsonl` (+ `<id>.rejects.jsonl`, `<id>.json` summary), `runs/<job>/`
//! (metrics, checkpoints), `runs/<job>.json` (the job's status) and `adapters/<job>/` (PEFT
//! adapter).
//!
//! Restarts: each job's status is written (atomically) to `runs/<job>.json` when it starts,
//! on its messages (checkpoints, evaluations), at most every [`SAVE_EVERY`] on its steps, and
//! when it ends; the file sits beside the run folder, so the retention rule, which deletes run
//! folders, keeps it. At startup the service lists every job found there; one that was running
//! (or stopping) when the service went down is shown as [`JobState::Interrupted`] with its
//! last checkpoint (`runs/<job>/checkpoint/`, the step from its `state.json`).
//!
//! Admission: an upload is bounded in bytes (413) and rows (422) and must fit the disk quota
//! (507, see [`crate::disk`]); a job is bounded by [`crate::limits::TrainLimits`] and the
//! built-in ceilings (422), and is started only when its estimated memory fits next to serving
//! and its estimated disk use fits the quota (507). Refusals happen before anything is
//! allocated or written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use triage_data::import::{import_file, ColumnMapping, ImportOptions, LabelMap};
use triage_data::{read_examples_and_bytes, DataError, Example};
use triage_infer::Structurer;
use triage_llm::qwen2::Qwen2;
use triage_taxonomy::{Taxonomy, Validator};
use triage_train::adapter::{self, TriageMeta};
use triage_train::admission::{training_estimate, training_what, LimitError};
use triage_train::trainer::{fmt_acc, Observer, StepReport, TrainConfig, Trainer};
use triage_train::TrainError;

use crate::api::{body, json_body, parse_json};
use crate::disk;
use crate::error::ApiError;
use crate::state::{AppState, Engine};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Training.
    Running,
    /// The adapter is written.
    Succeeded,
    /// Stopped by an error (see `error`).
    Failed,
    /// Stopped by shutdown; its checkpoint is in the run directory.
    Stopped,
    /// Was running (or stopping) when the service went down; seen at the next start-up.
    /// `checkpoint` and `checkpoint_step` tell what was saved.
    Interrupted,
}

/// `GET /api/v1/train/{id}`, and the job's record `runs/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// State.
    pub state: JobState,
    /// Dataset trained on.
    pub dataset: String,
    /// Taxonomy.
    pub taxonomy: String,
    /// Optimizer steps done.
    pub step: usize,
    /// Of.
    pub steps: usize,
    /// Last step's training loss.
    pub loss: Option<f64>,
    /// Training tokens per second of the last step.
    pub tokens_per_s: Option<f64>,
    /// Progress notes (validation loss, accuracy).
    pub log: Vec<String>,
    /// Training summary once done.
    pub summary: Option<Value>,
    /// Adapter directory once done.
    pub adapter: Option<String>,
    /// Whether the adapter serves requests now.
    pub active: bool,
    /// Why it failed, or how it was interrupted.
    pub error: Option<String>,
    /// The last checkpoint of an interrupted job (`runs/<id>/checkpoint`), if one was written.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// The optimizer step that checkpoint holds.
    #[serde(default)]
    pub checkpoint_step: Option<usize>,
}

/// Longest time between two writes of a running job's record on its steps.
pub const SAVE_EVERY: Duration = Duration::from_secs(2);

/// Where job `id`'s status is kept: `runs/<id>.json`, beside its run folder.
fn record_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("runs").join(format!("{id}.json"))
}

/// Writes `st` to its record, atomically (a temporary file renamed into place). A failure is
/// logged: the job goes on, only its record is older.
fn save(data_dir: &Path, st: &JobStatus) {
    let path = record_path(data_dir, &st.id);
    let bytes = serde_json::to_vec_pretty(st).expect("job status serialises");
    if let Err(e) = triage_data::atomic_write(&path, &bytes) {
        tracing::warn!("cannot save the status of training job {}: {e}", st.id);
    }
}

/// The step saved in `run_dir/checkpoint/state.json` (`{"config", "state": {"step"}}`, as
/// [`Trainer::checkpoint`] writes it), with the checkpoint folder; `None` without a readable one.
fn last_checkpoint(run_dir: &Path) -> Option<(PathBuf, usize)> {
    let text = std::fs::read(triage_train::trainer::checkpoint_state(run_dir)).ok()?;
    let v: Value = serde_json::from_slice(&text).ok()?;
    let step = v.get("state")?.get("step")?.as_u64()?;
    Some((
        triage_train::trainer::checkpoint_dir(run_dir),
        usize::try_from(step).ok()?,
    ))
}

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<String, Arc<Mutex<JobStatus>>>,
    /// The job holding the single slot (being admitted, or running).
    running: Option<String>,
    /// Disk bytes reserved for the running job (its estimate).
    reserved: u64,
    seq: usize,
}

/// The jobs of this process.
#[derive(Default)]
pub struct Jobs(Mutex<Inner>);

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a job is running.
    pub fn running(&self) -> bool {
        self.lock().running.is_some()
    }

    /// The running job's id.
    pub(crate) fn running_id(&self) -> Option<String> {
        self.lock().running.clone()
    }

    /// Disk bytes the running job has reserved but not written yet.
    pub(crate) fn pending_bytes(&self, data_dir: &Path) -> u64 {
        let (id, reserved) = {
            let g = self.lock();
            (g.running.clone(), g.reserved)
        };
        let Some(id) = id else { return 0 };
        let written = disk::tree_size(&data_dir.join("runs").join(&id))
            + disk::tree_size(&data_dir.join("adapters").join(&id));
        reserved.saturating_sub(written)
    }

    /// Notes in job `job`'s status that the retention rule deleted its run directory or its
    /// adapter.
    pub(crate) fn evicted(&self, data_dir: &Path, job: &str, run_dir: bool) {
        let Some(st) = self.lock().jobs.get(job).cloned() else {
            return;
        };
        let mut g = status(&st);
        match run_dir {
            true => g
                .log
                .push("run directory deleted by the retention rule (disk quota)".into()),
            false => {
                g.adapter = None;
                g.log
                    .push("adapter deleted by the retention rule (disk quota)".into());
            }
        }
        save(data_dir, &g);
    }

    /// Frees the job slot.
    fn release(&self) {
        let mut g = self.lock();
        g.running = None;
        g.reserved = 0;
    }

    /// Reads the job records under `data_dir/runs/` (at start-up). A job that was running or
    /// stopping is marked [`JobState::Interrupted`] with its last checkpoint, and its record
    /// rewritten; `active` is set for the jobs whose adapter a desk serves (`served`). A record
    /// that cannot be read is logged and skipped. Returns the number of jobs listed.
    pub(crate) fn load(&self, data_dir: &Path, served: &[String]) -> usize {
        let runs = data_dir.join("runs");
        let Ok(entries) = std::fs::read_dir(&runs) else {
            return 0;
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if id.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = e.path();
            let st = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<JobStatus>(&b).map_err(|e| e.to_string()));
            match st {
                Ok(st) if st.id == id => found.push(st),
                Ok(st) => tracing::warn!(
                    "{}: the record of job {:?} has the wrong name; skipped",
                    path.display(),
                    st.id
                ),
                Err(e) => tracing::warn!("{}: not a training job record ({e}); skipped", path.display()),
            }
        }
        let n = found.len();
        let mut g = self.lock();
        for mut st in found {
            if matches!(st.state, JobState::Running | JobState::Stopped) {
                let run_dir = runs.join(&st.id);
                interrupt(&mut st, &run_dir);
                save(data_dir, &st);
            }
            st.active = served.contains(&st.id);
            if st.adapter.as_deref().is_some_and(|a| !Path::new(a).is_dir()) {
                st.adapter = None;
            }
            g.jobs.insert(st.id.clone(), Arc::new(Mutex::new(st)));
        }
        n
    }

    /// Records that job `id`'s adapter now serves `taxonomy`: it is active, and the job whose
    /// adapter served it before is not any more (records saved under `data_dir`).
    pub(crate) fn set_active(&self, id: &str, taxonomy: &str, data_dir: &Path) {
        let jobs: Vec<Arc<Mutex<JobStatus>>> = self.lock().jobs.values().cloned().collect();
        for j in jobs {
            let mut g = status(&j);
            let active = g.id == id;
            if g.taxonomy == taxonomy && g.active != active {
                g.active = active;
                save(data_dir, &g);
            }
        }
    }

    /// Every job's status, in id order.
    pub(crate) fn list(&self) -> Vec<JobStatus> {
        let jobs: Vec<Arc<Mutex<JobStatus>>> = self.lock().jobs.values().cloned().collect();
        jobs.iter().map(|j| status(j).clone()).collect()
    }

    fn get(&self, id: &str) -> Result<Arc<Mutex<JobStatus>>, ApiError> {
        self.lock()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no training job {id:?}")))
    }
}

fn status(job: &Mutex<JobStatus>) -> std::sync::MutexGuard<'_, JobStatus> {
    job.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a job found running (or stopping) at start-up as interrupted, with the last
/// checkpoint in its run folder `run_dir`.
fn interrupt(st: &mut JobStatus, run_dir: &Path) {
    let was = match st.state {
        JobState::Stopped => "stopping",
        _ => "running",
    };
    st.state = JobState::Interrupted;
    st.active = false;
    let note = match last_checkpoint(run_dir) {
        Some((dir, step)) => {
            let note = format!(
                "interrupted: the service stopped while the job was {was} (at step {} of {}); its \
                 last checkpoint, at step {step}, is in {}; start a new job to train again",
                st.step,
                st.steps,
                dir.display()
            );
            st.checkpoint = Some(dir.display().to_string());
            st.checkpoint_step = Some(step);
            note
        }
        None => {
            st.checkpoint = None;
            st.checkpoint_step = None;
            format!(
                "interrupted: the service stopped while the job was {was} (at step {} of {}), \
                 before any checkpoint was written; start a new job to train again",
                st.step, st.steps
            )
        }
    };
    st.log.push(note.clone());
    st.error = Some(note);
}

/// `(key, value)` pairs of a query string, in order (repeated keys kept), decoded as
/// `application/x-www-form-urlencoded`.
pub(crate) fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn datasets_dir(s: &AppState) -> PathBuf {
    s.config.data_dir.join("datasets")
}

/// `<id>.json` in `dir`: the summary `train-data` answered for dataset `id`.
fn summary_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// The summary `train-data` answered for dataset `id` ([`summary_path`]), if readable.
fn dataset_summary(dir: &Path, id: &str) -> Option<Value> {
    std::fs::read(summary_path(dir, id))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn io_error(what: &str, path: &Path, e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(what, format!("{}: {e}", path.display()))
}

/// A failed write: 507 when the disk (or the user's disk quota) is full, else 500.
fn write_error(what: &str, e: &DataError) -> ApiError {
    match e {
        DataError::Io { path, source } if disk::is_disk_full(source) => {
            tracing::error!("{what}: {}: {source}", path.display());
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                format!(
                    "the disk filled up while {what}; nothing was kept: free space on the data \
                     folder's file system, or lower --disk-quota below what it can hold"
                ),
            )
        }
        other => ApiError::internal(what, other),
    }
}

/// Writes `files` in order, each atomically; when one fails, removes those already written so
/// no partial dataset remains.
fn write_all(files: &[(PathBuf, Vec<u8>)]) -> Result<(), ApiError> {
    for (i, (path, bytes)) in files.iter().enumerate() {
        if let Err(e) = triage_data::atomic_write(path, bytes) {
            for (p, _) in &files[..i] {
                let _ = std::fs::remove_file(p);
            }
            return Err(write_error("storing the dataset", &e));
        }
    }
    Ok(())
}

/// The first value of `key` in a query.
fn query_get(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// What the query of a `train-data` upload asks for.
pub(crate) struct UploadQuery {
    /// The `map` values, in order.
    pub(crate) specs: Vec<String>,
    /// The column mapping they make, checked against the taxonomy.
    pub(crate) mapping: ColumnMapping,
    /// `csv` (default), `tsv`, `json` or `jsonl`.
    pub(crate) format: String,
}

/// Reads the upload query `pairs` for `taxonomy`: 422 `missing_mapping`, `bad_mapping`
/// (naming the spec or the field without a column) or `bad_format`.
pub(crate) fn upload_query(pairs: &[(String, String)], taxonomy: &Taxonomy) -> Result<UploadQuery, ApiError> {
    let specs: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "map")
        .map(|(_, v)| v.clone())
        .collect();
    if specs.is_empty() {
        return Err(ApiError::unprocessable(
            "missing_mapping",
            "give the column mapping as query parameters, e.g. ?map=text=body&map=category=queue (one per taxonomy field)",
        ));
    }
    let mapping = ColumnMapping::parse(&specs, taxonomy)
        .map_err(|e| ApiError::unprocessable("bad_mapping", e.to_string()))?;
    let format = query_get(pairs, "format").unwrap_or_else(|| "csv".into());
    if !["csv", "tsv", "jsonl", "json"].contains(&format.as_str()) {
        return Err(ApiError::unprocessable(
            "bad_format",
            "format must be csv, tsv, json or jsonl",
        ));
    }
    Ok(UploadQuery {
        specs,
        mapping,
        format,
    })
}

/// `POST /api/v1/train-data?map=KEY=COLUMN&...[&format=csv|tsv|jsonl][&taxonomy=NAME]`: the
/// body (a CSV export by default) is imported with the same code as `triage data import`;
/// the dataset is stored atomically under an id derived from its content and taxonomy, so a
/// repeated upload returns the same id. Rejected rows are listed (first 20) and kept in
/// `<id>.rejects.jsonl`. Bounded by `--max-upload-bytes` (413), `--max-upload-rows` (422) and
/// the disk quota (507); a refused or failed upload leaves no file behind.
pub async fn train_data(
    State(s): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body(b, s.config.max_upload_bytes, "--max-upload-bytes")?;
    let pairs = query_pairs(q.as_deref());
    let desk = s.desk(query_get(&pairs, "taxonomy").as_deref())?;
    let taxonomy = desk.engine().structurer.taxonomy().clone();
    let UploadQuery {
        specs,
        mapping,
        format,
    } = upload_query(&pairs, &taxonomy)?;
    if body.is_empty() {
        return Err(ApiError::unprocessable("empty_upload", "the upload is empty"));
    }
    let mut h = Sha256::new();
    h.update(taxonomy.content_hash().as_bytes());
    for spec in &specs {
        h.update(spec.as_bytes());
        h.update([0]);
    }
    h.update(&body);
    let digest = h.finalize();
    let id = format!(
        "ds-{}",
        digest
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let dir = datasets_dir(&s);
    let state = s.clone();
    let report = tokio::task::spawn_blocking(move || -> Result<Value, ApiError> {
        let guard = state.disk.lock();
        let data = dir.join(format!("{id}.jsonl"));
        let meta = summary_path(&dir, &id);
        // The same upload again: the stored dataset answers.
        if data.is_file() {
            if let Some(v) = dataset_summary(&dir, &id) {
                return Ok(v);
            }
        }
        disk::make_room(&state, &guard, body.len() as u64, "the upload")?;
        std::fs::create_dir_all(&dir).map_err(|e| io_error("storing the upload", &dir, e))?;
        let upload = dir.join(format!("{id}.upload.{format}"));
        triage_data::atomic_write(&upload, &body).map_err(|e| write_error("storing the upload", &e))?;
        let validator = Validator::new(&taxonomy);
        let opts = ImportOptions {
            mapping,
            labels: LabelMap::default(),
            source: id.clone(),
            max_text_chars: state.config.max_input_chars,
            // Rows past the limit are not read: an upload of millions of tiny rows is
            // refused below without building them.
            max_rows: Some(state.config.max_upload_rows),
        };
        let imported = import_file(&upload, &validator, &opts);
        let _ = std::fs::remove_file(&upload);
        let r = imported.map_err(|e| ApiError::unprocessable("unreadable_upload", e.to_string()))?;
        let max_rows = state.config.max_upload_rows;
        if r.rows > max_rows {
            return Err(LimitError::new(
                "rows",
                format!("more than {max_rows}"),
                format!("1..={max_rows}"),
                format!(
                    "split the file into uploads of at most {max_rows} rows, or start the server \
                     with a higher --max-upload-rows"
                ),
            )
            .into());
        }
        let mut dataset = Vec::with_capacity(r.examples.len() * 512);
        for e in &r.examples {
            dataset.extend_from_slice(e.to_json_line().as_bytes());
            dataset.push(b'\n');
        }
        let rejects: String = r
            .rejects
            .iter()
            .map(|x| serde_json::to_string(x).unwrap_or_default() + "\n")
            .collect();
        let mut labels: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for e in &r.examples {
            for f in &taxonomy.fields {
                if let Some(v) = e.ticket.get(&f.name) {
                    *labels
                        .entry(f.name.clone())
                        .or_default()
                        .entry(v.to_owned())
                        .or_default() += 1;
                }
            }
        }
        let summary = serde_json::json!({
            "id": id,
            "taxonomy": taxonomy.name,
            "rows": r.rows,
            "imported": r.examples.len(),
            "rejected": r.rejects.len(),
            "rejects": r.rejects.iter().take(20).collect::<Vec<_>>(),
            "labels": labels,
        });
        let summary_bytes = serde_json::to_string_pretty(&summary)
            .unwrap_or_default()
            .into_bytes();
        // The dataset file last: a dataset exists only once all three are complete.
        let files = [
            (dir.join(format!("{id}.rejects.jsonl")), rejects.into_bytes()),
            (meta, summary_bytes),
            (data, dataset),
        ];
        let need = files.iter().map(|(_, b)| b.len() as u64).sum();
        disk::make_room(&state, &guard, need, "the imported dataset")?;
        write_all(&files)?;
        Ok(summary)
    })
    .await
    .map_err(|e| ApiError::internal("the import worker", e))??;
    Ok((StatusCode::CREATED, Json(report)))
}

/// `POST /api/v1/train` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRequest {
    /// Dataset id from `train-data`.
    pub dataset_id: String,
    /// Optimizer steps (default: the server's training configuration).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Peak learning rate.
    #[serde(default)]
    pub lr: Option<f64>,
    /// LoRA rank.
    #[serde(default)]
    pub rank: Option<usize>,
    /// Serve the adapter as soon as it is written.
    #[serde(default)]
    pub activate: bool,
    /// Taxonomy (default: the first one served); must be the dataset's.
    #[serde(default)]
    pub taxonomy: Option<String>,
}

/// How to make a job that does not fit in memory fit.
const MEMORY_HINT: &str = "send a lower `rank`; the server's training configuration \
(--train-config) sets batch_size, max_tokens, top_layers and checkpointing (checkpointing = true \
and fewer top_layers take less memory); or raise --memory-limit if this machine really has more";

/// A built-in bound (422 `limit_exceeded`) or another invalid setting (422 `bad_train_config`).
fn train_config_error(e: TrainError) -> ApiError {
    match e {
        TrainError::Limit(l) => l.into(),
        other => ApiError::unprocessable("bad_train_config", other.to_string()),
    }
}

/// The server's training configuration `base` with the request's overrides, within the
/// server's `limits` (422 `limit_exceeded` naming the request's field) and the built-in bounds
/// (422).
pub(crate) fn job_config(
    base: &TrainConfig,
    req: &TrainRequest,
    limits: &crate::TrainLimits,
) -> Result<TrainConfig, ApiError> {
    let mut config = base.clone();
    if let Some(v) = req.steps {
        config.steps = v;
    }
    if let Some(v) = req.lr {
        config.optimizer.lr = v;
    }
    if let Some(v) = req.rank {
        config.set_rank(v);
    }
    let requested = |f: &str| match f {
        "rank" => req.rank.is_some(),
        "steps" => req.steps.is_some(),
        "lr" => req.lr.is_some(),
        _ => false,
    };
    limits.check(&config, requested)?;
    config.check().map_err(train_config_error)?;
    Ok(config)
}

/// `POST /api/v1/train`: starts a background job (one at a time: 409 while one runs) and
/// answers 202 with its id. Refused at once, before anything is allocated: a size outside the
/// server's limits (422 `limit_exceeded`, naming the field, its bound and the flag), a job
/// whose estimated memory does not fit next to serving (507 `insufficient_memory`) or whose
/// estimated disk use does not fit the quota after the retention rule (507
/// `insufficient_storage`).
pub async fn train_start(
    State(s): State<Arc<AppState>>,
    b: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: TrainRequest = parse_json(&json_body(&s, b)?)?;
    let Some(ctx) = s.train.as_ref() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "training_disabled",
            "this server was started without training support",
        ));
    };
    let config = job_config(&ctx.config, &req, &s.config.train_limits)?;
    let desk = s.desk(req.taxonomy.as_deref())?;
    let taxonomy = desk.engine().structurer.taxonomy().clone();
    if !req.dataset_id.starts_with("ds-") || !req.dataset_id[3..].chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::unprocessable(
            "bad_dataset_id",
            "dataset ids look like ds-0123456789ab",
        ));
    }
    let data = datasets_dir(&s).join(format!("{}.jsonl", req.dataset_id));
    if !data.exists() {
        return Err(ApiError::not_found(format!(
            "no dataset {:?}; upload one to /api/v1/train-data",
            req.dataset_id
        )));
    }
    // Refused now, not after admission (which may evict old runs) and a job that fails: a
    // dataset of another taxonomy (whose values might happen to fit this one) or with no
    // imported row.
    if let Some(summary) = dataset_summary(&datasets_dir(&s), &req.dataset_id) {
        if let Some(of) = summary["taxonomy"].as_str().filter(|t| *t != taxonomy.name) {
            return Err(ApiError::unprocessable(
                "dataset_taxonomy_mismatch",
                format!(
                    "dataset {} was imported for taxonomy {of:?}, not {:?}; train with \
                     \"taxonomy\": {of:?}, or upload it again with ?taxonomy={}",
                    req.dataset_id, taxonomy.name, taxonomy.name
                ),
            ));
        }
        if summary["imported"].as_u64() == Some(0) {
            return Err(ApiError::unprocessable(
                "empty_dataset",
                format!(
                    "dataset {} has no imported row ({} rejected: see its rejects); fix the \
                     upload's columns or labels and upload it again",
                    req.dataset_id, summary["rejected"]
                ),
            ));
        }
    }
    // Claim the single job slot, then admit; the slot is released if admission refuses or the
    // request is dropped meanwhile (the claim's guard), and handed to the job once it starts.
    let id = {
        let mut j = s.jobs.lock();
        if let Some(r) = &j.running {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "training_busy",
                format!("job {r} is running; one job runs at a time"),
            ));
        }
        // Ids of earlier processes are listed too, and a restarted container often gets the
        // same process id: skip any id in use or with files.
        let id = loop {
            j.seq += 1;
            let id = format!("job-{}-{}", std::process::id(), j.seq);
            let dir = &s.config.data_dir;
            let taken = j.jobs.contains_key(&id)
                || record_path(dir, &id).exists()
                || dir.join("runs").join(&id).exists()
                || dir.join("adapters").join(&id).exists();
            if !taken {
                break id;
            }
        };
        j.running = Some(id.clone());
        j.reserved = 0;
        id
    };
    let claim = Claim(&s.jobs);
    let admitted = {
        let (state, config, data, id) = (s.clone(), config.clone(), data.clone(), id.clone());
        let structurer = desk.engine().structurer.clone();
        tokio::task::spawn_blocking(move || admit_job(&state, &id, &config, &structurer, &data))
            .await
            .map_err(|e| ApiError::internal("job admission", e))
            .and_then(|r| r)
    };
    let reserved = admitted?;
    let st = Arc::new(Mutex::new(JobStatus {
        id: id.clone(),
        state: JobState::Running,
        dataset: req.dataset_id.clone(),
        taxonomy: taxonomy.name.clone(),
        step: 0,
        steps: config.steps,
        loss: None,
        tokens_per_s: None,
        log: Vec::new(),
        summary: None,
        adapter: None,
        active: false,
        error: None,
        checkpoint: None,
        checkpoint_step: None,
    }));
    {
        let mut j = s.jobs.lock();
        j.jobs.insert(id.clone(), st.clone());
        j.reserved = reserved;
    }
    save(&s.config.data_dir, &status(&st));
    let state = s.clone();
    let activate = req.activate;
    let taxonomy_name = req.taxonomy.clone();
    let job_id = id.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("train-{id}"))
        .spawn(move || {
            // Frees the slot however the thread ends (a panic included), after the rest.
            let _release = Release(state.clone());
            // A panic in the job is a failed job, recorded as such, not one shown as running
            // until the next restart.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_job(
                    &state,
                    &job_id,
                    &data,
                    config,
                    taxonomy_name.as_deref(),
                    &st,
                    activate,
                )
            }));
            let mut g = status(&st);
            match result {
                Ok(Ok(())) => g.state = JobState::Succeeded,
                Ok(Err(e)) if state.stop.load(Ordering::SeqCst) => {
                    g.state = JobState::Stopped;
                    g.error = Some(e.to_string());
                }
                Ok(Err(e)) => {
                    tracing::error!("training job {job_id}: {e}");
                    g.state = JobState::Failed;
                    g.error = Some(e.to_string());
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|m| m.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown cause".into());
                    tracing::error!("training job {job_id} panicked: {what}");
                    g.state = JobState::Failed;
                    g.error = Some(format!(
                        "internal error (a panic: {what}); the service keeps running"
                    ));
                }
            }
            let failed = g.state != JobState::Succeeded;
            save(&state.config.data_dir, &g);
            drop(g);
            if failed {
                // What a failed write (a full disk) left behind.
                disk::sweep(&state.config.data_dir, &state.disk.lock(), None);
            }
        });
    if let Err(e) = spawned {
        s.jobs.lock().jobs.remove(&id);
        let _ = std::fs::remove_file(record_path(&s.config.data_dir, &id));
        return Err(ApiError::internal("starting the training thread", e));
    }
    // The job's thread releases the slot when it ends.
    std::mem::forget(claim);
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"job_id": id, "status_url": format!("/api/v1/train/{id}")})),
    ))
}

/// Admits job `id`: its estimated peak memory (the `--dry-run` estimate, less the weights the
/// service already holds) against what is available minus what serving keeps, then its
/// estimated disk use against the quota (finished runs deleted by the retention rule if that
/// makes room). Returns the disk bytes to reserve.
fn admit_job(
    s: &AppState,
    id: &str,
    config: &TrainConfig,
    base: &Structurer,
    data: &Path,
) -> Result<u64, ApiError> {
    let cfg = base.model().config();
    let gguf = &s
        .train
        .as_ref()
        .ok_or_else(|| ApiError::internal("job admission", "no training context"))?
        .gguf;
    // The weights are loaded already; the repacked copies of the adapted layers may not be.
    let repackable = Qwen2::repackable_bytes(
        gguf,
        config.first_layer(cfg.num_layers)..cfg.num_layers,
        !config.dense_weights,
    );
    let est = training_estimate(cfg, 0, repackable, config, base.system_prompt_tokens());
    s.admit_memory(&training_what(config), est.total, MEMORY_HINT)?;
    let rows = std::fs::read(data)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .map_err(|e| io_error("reading the dataset", data, e))?;
    let need = disk::job_disk_bytes(config, cfg, rows);
    let guard = s.disk.lock();
    disk::make_room(s, &guard, need, &format!("training job {id}"))?;
    Ok(need)
}

/// The job slot claimed by a request being admitted: released on drop (a refusal, an error,
/// or the request dropped while it waits), unless forgotten once the job's thread owns it.
struct Claim<'a>(&'a Jobs);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The job slot held by a job's thread: released when the thread ends, however it ends.
struct Release(Arc<AppState>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.jobs.release();
    }
}

/// Copies the trainer's progress into the job's status and saves its record: on every
/// message (checkpoints, evaluations) and at most every [`SAVE_EVERY`] on steps.
struct JobObserver<'a> {
    st: &'a Mutex<JobStatus>,
    data_dir: &'a Path,
    saved: Instant,
}

impl Observer for JobObserver<'_> {
    fn step(&mut self, r: &StepReport) {
        let mut g = status(self.st);
        g.step = r.step;
        g.steps = r.steps;
        g.loss = Some(r.loss);
        g.tokens_per_s = Some(r.tokens_per_s);
        if self.saved.elapsed() >= SAVE_EVERY {
            save(self.data_dir, &g);
            self.saved = Instant::now();
        }
    }

    fn message(&mut self, text: &str) {
        let mut g = status(self.st);
        g.log.push(text.to_owned());
        save(self.data_dir, &g);
        self.saved = Instant::now();
    }
}

/// Why a training job stopped. Its message is the job's `error`.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// The server has no training context.
    #[error("training disabled")]
    Disabled,
    /// The dataset holds no example.
    #[error("the dataset has no examples")]
    NoExamples,
    /// A refusal of the service (unknown taxonomy, failed activation): its message.
    #[error("{}", .0.message)]
    Api(ApiError),
    /// The dataset could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Training or saving the adapter failed, or it was interrupted.
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// An upload split into training and validation examples: a tenth for validation, split as
/// `triage data split --by hash` does, so re-sent and reworded copies of one ticket (and
/// examples sharing a `group`) stay on one side and the validation loss is not that of texts
/// seen in training. Too few examples for both sides: all train, no validation.
fn validation_split(mut examples: Vec<Example>) -> Result<(Vec<Example>, Vec<Example>), DataError> {
    let options = triage_data::split::SplitOptions {
        by: triage_data::split::SplitBy::Hash,
        ratios: triage_data::split::Ratios([90, 10, 0]),
        seed: 7,
        near_dup_threshold: triage_data::split::SPLIT_NEAR_DUP,
        stratify: None,
    };
    triage_data::split::assign_splits(&mut examples, &options)?;
    let (val, train): (Vec<Example>, Vec<Example>) = examples
        .into_iter()
        .partition(|e| e.split == Some(triage_data::Split::Val));
    Ok(if train.is_empty() || val.is_empty() {
        (train.into_iter().chain(val).collect(), Vec::new())
    } else {
        (train, val)
    })
}

/// Examples of an upload held out for the validation loss, at most.
const VAL_EXAMPLES: usize = 64;

/// Trains, saves the adapter, and activates it if asked.
fn run_job(
    s: &AppState,
    id: &str,
    data: &Path,
    config: triage_train::trainer::TrainConfig,
    taxonomy: Option<&str>,
    st: &Mutex<JobStatus>,
    activate: bool,
) -> Result<(), JobError> {
    let ctx = s.train.as_ref().ok_or(JobError::Disabled)?;
    let desk = s.desk(taxonomy).map_err(JobError::Api)?;
    let engine = desk.engine();
    let base = &engine.structurer;
    let validator = Validator::new(base.taxonomy());
    let (examples, bytes) = read_examples_and_bytes(data, &validator)?;
    // What the adapter records it was trained on (split below into training and validation).
    let dataset = adapter::DataFile {
        role: "dataset".into(),
        file: data.display().to_string(),
        sha256: triage_data::sha256_hex(&bytes),
        examples: examples.len(),
    };
    let (train, mut val) = validation_split(examples)?;
    // Validation loss runs before training and every `eval_every` steps, without stopping
    // in between: 64 examples (as configs/train.toml advises) keep it, and a shutdown
    // waiting on it, short whatever the upload's size.
    val.truncate(VAL_EXAMPLES);
    if train.is_empty() {
        return Err(JobError::NoExamples);
    }
    let run_dir = s.config.data_dir.join("runs").join(id);
    let mut trainer = Trainer::new(base, &ctx.gguf, config, &train, &val, &run_dir, false)?;
    let mut observer = JobObserver {
        st,
        data_dir: &s.config.data_dir,
        saved: Instant::now(),
    };
    let summary = trainer.run(&s.stop, &mut observer)?;
    status(st).log.push(format!(
        "accuracy before {} after {}",
        fmt_acc(&summary.accuracy_before),
        fmt_acc(&summary.accuracy_after)
    ));
    let dir = s.config.data_dir.join("adapters").join(id);
    let metrics = serde_json::to_value(&summary).unwrap_or_default();
    let mut meta = TriageMeta::new(base.taxonomy(), &ctx.base_sha256, &ctx.base_file, metrics.clone());
    meta.data = vec![dataset];
    adapter::save(&dir, &trainer.lora, &ctx.base_model_name, &meta)?;
    {
        let mut g = status(st);
        g.summary = Some(metrics);
        g.adapter = Some(dir.display().to_string());
    }
    if activate {
        activate_adapter(s, desk.name(), &dir, id).map_err(JobError::Api)?;
        s.jobs.set_active(id, desk.name(), &s.config.data_dir);
    }
    Ok(())
}

/// Loads the adapter in `dir` (checked against the taxonomy and base model) and swaps it into
/// the desk `taxonomy`: requests already running finish on the previous engine. The new
/// structurer (tokenizer, grammar, system-prompt cache) is admitted against the memory
/// available first (507), and the disk lock is held so the retention rule cannot delete the
/// adapter while it loads.
fn activate_adapter(s: &AppState, taxonomy: &str, dir: &Path, name: &str) -> Result<(), ApiError> {
    let failed = |e: String| ApiError::unprocessable("activation_failed", e);
    let ctx = s
        .train
        .as_ref()
        .ok_or_else(|| failed("activation needs the base model (training support)".into()))?;
    let desk = s.desk(Some(taxonomy))?;
    let current = desk.engine();
    let base = &current.structurer;
    s.admit_memory(
        &format!("activating adapter {name}"),
        crate::limits::desk_bytes(base.model().config(), base.system_prompt_tokens()),
        "wait for the requests in flight to finish, or raise --memory-limit if this machine really has more",
    )?;
    let _guard = s.disk.lock();
    let lora = adapter::load_checked(dir, base.taxonomy(), &ctx.base_sha256, base.model())
        .map_err(|e| failed(e.to_string()))?;
    let s2 = Structurer::with_model(
        base.model().clone(),
        &ctx.gguf,
        base.taxonomy().clone(),
        base.options().clone(),
    )
    .map_err(|e| failed(e.to_string()))?
    .with_adapter(Arc::new(lora));
    s2.warm_up().map_err(|e| failed(e.to_string()))?;
    desk.swap(Engine {
        structurer: Arc::new(s2),
        adapter: Some(name.to_owned()),
        remote: current.remote.clone(),
    });
    tracing::info!("adapter {name} now serves taxonomy {taxonomy}");
    Ok(())
}

/// `GET /api/v1/train`: every job, this process's and those of earlier runs (`interrupted`
/// when the service went down while they ran), in id order.
pub async fn train_list(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(serde_json::json!({ "jobs": s.jobs.list() }))
}

/// `GET /api/v1/train/{id}`: the job's progress and metrics.
pub async fn train_status(
    State(s): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let job = s.jobs.get(&id)?;
    let st = status(&job).clone();
    Ok(Json(st))
}

/// `POST /api/v1/train/{id}/activate`: serves a finished job's adapter from now on.
pub async fn train_activate(
    State(s): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let job = s.jobs.get(&id)?;
    let (dir, taxonomy) = {
        let g = status(&job);
        match (&g.state, &g.adapter) {
            (JobState::Succeeded, Some(d)) => (PathBuf::from(d), g.taxonomy.clone()),
            _ => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "not_finished",
                    format!("job {id} has no adapter yet (state {:?})", g.state),
                ))
            }
        }
    };
    let served = taxonomy.clone();
    let state = s.clone();
    let name = id.clone();
    tokio::task::spawn_blocking(move || activate_adapter(&state, &taxonomy, &dir, &name))
        .await
        .map_err(|e| ApiError::internal("activation", e))??;
    s.jobs.set_active(&id, &served, &s.config.data_dir);
    Ok(Json(serde_json::json!({"job_id": id, "active": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenth of an upload for validation, with each reworded copy of a ticket on the same
    /// side as its original (a split by id hash, as before, would part some of them); too few
    /// examples for both sides train on all.
    #[test]
    fn the_validation_split_keeps_reworded_copies_with_their_original() {
        let validator = Validator::new(&triage_taxonomy::Taxonomy::builtin_default());
        let example = |id: &str, text: &str| {
            let line = serde_json::json!({"id": id, "text": text, "lang": "en", "source": "t", "ticket": {"summary": "s", "category": "Network", "subcategory": "VPN", "priority": "High", "assignment_group": "Network Operations", "request_type": "Incident"}});
            Example::from_json_line(&line.to_string(), &validator).unwrap()
        };
        // 40 tickets that share no 5-gram to speak of, the first 12 with a copy whose last
        // quarter is reworded (Jaccard about 0.6: a near duplicate at 0.5, not at 0.8).
        let words = |i: u64, from: u64, n: u64| -> String {
            (from..from + n)
                .map(|k| format!("{:x}", (i * 1_000 + k) * 2_654_435_761 % 4_294_967_291))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut examples = Vec::new();
        for i in 0..40u64 {
            examples.push(example(&format!("t{i}"), &words(i, 0, 12)));
            if i < 12 {
                let copy = format!("{} {}", words(i, 0, 9), words(i, 100, 3));
                examples.push(example(&format!("c{i}"), &copy));
            }
        }
        let pairs: Vec<(String, String)> = (0..12).map(|i| (format!("t{i}"), format!("c{i}"))).collect();
        let by_id = |id: &str| triage_data::rng::stable_hash(id.as_bytes()).is_multiple_of(10);
        assert!(
            pairs.iter().any(|(a, b)| by_id(a) != by_id(b)),
            "an id-hash split keeps every pair together: this test shows nothing"
        );
        let (train, val) = validation_split(examples).unwrap();
        assert_eq!(train.len() + val.len(), 52);
        assert!((3..=9).contains(&val.len()), "{} for validation", val.len());
        let in_train = |id: &str| train.iter().any(|e| e.id == id);
        for (a, b) in &pairs {
            assert_eq!(in_train(a), in_train(b), "{a} and its copy {b} on two sides");
        }
        let (train, val) = validation_split(vec![example("only", "vpn down")]).unwrap();
        assert_eq!((train.len(), val.len()), (1, 0));
    }

    #[test]
    fn query_pairs_keep_repeated_keys_and_decode() {
        let p = query_pairs(Some(
            "map=text%3Dbody&map=category=queue&format=csv&x+y=a%20b&bad=%zz",
        ));
        assert_eq!(
            p,
            vec![
                ("map".into(), "text=body".into()),
                ("map".into(), "category=queue".into()),
                ("format".into(), "csv".into()),
                ("x y".into(), "a b".into()),
                ("bad".into(), "%zz".into()),
            ]
        );
        assert!(query_pairs(None).is_empty());
        assert_eq!(query_pairs(Some("a=%")), vec![("a".into(), "%".into())]);
        assert_eq!(query_pairs(Some("a=%4")), vec![("a".into(), "%4".into())]);
    }

    fn job(id: &str, state: JobState, step: usize) -> JobStatus {
        JobStatus {
            id: id.into(),
            state,
            dataset: "ds-0123456789ab".into(),
            taxonomy: "default".into(),
            step,
            steps: 100,
            loss: Some(1.5),
            tokens_per_s: None,
            log: vec!["validation loss before training: 2.0".into()],
            summary: None,
            adapter: None,
            active: false,
            error: None,
            checkpoint: None,
            checkpoint_step: None,
        }
    }

    #[test]
    fn jobs_running_when_the_process_died_are_listed_as_interrupted_with_their_checkpoint() {
        let d = std::env::temp_dir().join(format!("triage-jobs-restart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        // What a killed process left: the records of a running job with a checkpoint at step
        // 20, a running job without one, a finished job whose adapter serves, a stopped job;
        // a torn temporary and a file that is not a record.
        save(&d, &job("job-7-1", JobState::Running, 23));
        let ckpt = d.join("runs/job-7-1/checkpoint");
        std::fs::create_dir_all(&ckpt).unwrap();
        std::fs::write(
            ckpt.join("state.json"),
            r#"{"config": {"steps": 100}, "state": {"step": 20, "epoch": 0, "batch": 20}}"#,
        )
        .unwrap();
        save(&d, &job("job-7-2", JobState::Running, 3));
        let adapter = d.join("adapters/job-7-3");
        std::fs::create_dir_all(&adapter).unwrap();
        save(
            &d,
            &JobStatus {
                adapter: Some(adapter.display().to_string()),
                ..job("job-7-3", JobState::Succeeded, 100)
            },
        );
        save(&d, &job("job-7-4", JobState::Stopped, 50));
        std::fs::write(d.join("runs/.job-7-5.json.tmp-1"), b"{").unwrap();
        std::fs::write(d.join("runs/notes.json"), b"not a record").unwrap();

        // A new process.
        let jobs = Jobs::default();
        assert_eq!(jobs.load(&d, &["job-7-3".to_owned()]), 4);
        let list = jobs.list();
        let ids: Vec<&str> = list.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["job-7-1", "job-7-2", "job-7-3", "job-7-4"]);
        let (a, b, c, e) = (&list[0], &list[1], &list[2], &list[3]);
        assert_eq!(a.state, JobState::Interrupted);
        assert_eq!(a.checkpoint_step, Some(20));
        assert_eq!(a.checkpoint.as_deref(), Some(ckpt.display().to_string().as_str()));
        assert_eq!(a.step, 23, "the last step reported is kept");
        let msg = a.error.as_deref().unwrap();
        assert!(msg.contains("step 20") && msg.contains("checkpoint"), "{msg}");
        assert_eq!(a.log.last().map(String::as_str), Some(msg));
        assert_eq!((b.state, b.checkpoint_step), (JobState::Interrupted, None));
        assert!(
            b.error.as_deref().unwrap().contains("before any checkpoint"),
            "{b:?}"
        );
        assert_eq!(c.state, JobState::Succeeded);
        assert!(c.active, "its adapter serves a taxonomy");
        assert!(c.error.is_none() && c.adapter.is_some());
        assert_eq!(e.state, JobState::Interrupted);
        // The records say so now, and another start reads the same.
        let again = Jobs::default();
        assert_eq!(again.load(&d, &[]), 4);
        let first = &again.list()[0];
        assert_eq!(
            (first.state, first.checkpoint_step),
            (JobState::Interrupted, Some(20))
        );
        assert_eq!(first.log.len(), 2, "the note is not added twice: {:?}", first.log);
        assert!(!again.list()[2].active);
        std::fs::remove_dir_all(d).unwrap();
    }

    /// Activating a job's adapter for a taxonomy makes the job that served it before
    /// inactive (in memory and in its record); other taxonomies' jobs keep their flag.
    #[test]
    fn activating_a_job_deactivates_the_one_it_replaces() {
        let d = std::env::temp_dir().join(format!("triage-set-active-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("runs")).unwrap();
        let jobs = Jobs::default();
        for (id, taxonomy, active) in [
            ("job-1-1", "default", true),
            ("job-1-2", "default", false),
            ("job-1-3", "cs", true),
        ] {
            let st = JobStatus {
                taxonomy: taxonomy.into(),
                active,
                ..job(id, JobState::Succeeded, 100)
            };
            jobs.lock().jobs.insert(id.into(), Arc::new(Mutex::new(st)));
        }
        jobs.set_active("job-1-2", "default", &d);
        let active: Vec<(String, bool)> = jobs.list().into_iter().map(|j| (j.id, j.active)).collect();
        assert_eq!(
            active,
            [
                ("job-1-1".into(), false),
                ("job-1-2".into(), true),
                ("job-1-3".into(), true)
            ]
        );
        let record = |id: &str| -> JobStatus {
            serde_json::from_slice(&std::fs::read(record_path(&d, id)).unwrap()).unwrap()
        };
        assert!(!record("job-1-1").active && record("job-1-2").active);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_failed_dataset_write_leaves_no_file() {
        let d = std::env::temp_dir().join(format!("triage-write-all-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        // The third file's parent is a file: its write fails after two succeeded.
        std::fs::write(d.join("blocker"), b"").unwrap();
        let files = [
            (d.join("a.rejects.jsonl"), b"r".to_vec()),
            (d.join("a.json"), b"{}".to_vec()),
            (d.join("blocker").join("a.jsonl"), b"x".to_vec()),
        ];
        let e = write_all(&files).unwrap_err();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["blocker".to_owned()]);
        // A full disk is a 507.
        let full = DataError::Io {
            path: d.join("a.jsonl"),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        let e = write_error("storing the dataset", &full);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::INSUFFICIENT_STORAGE, "disk_full")
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
