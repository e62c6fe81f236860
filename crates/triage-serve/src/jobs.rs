//! Training data uploads and background training jobs (`/api/v1/train-data`,
//! `/api/v1/train`), one job at a time, with activation of the trained adapter without a
//! restart.
//!
//! Layout under [`crate::ServeConfig::data_dir`]:
//! `datasets/<id>.jsonl` (+ `<id>.rejects.jsonl`, `<id>.json` summary), `runs/<job>/`
//! (metrics, checkpoints) and `adapters/<job>/` (PEFT adapter).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use triage_data::import::{import_file, ColumnMapping, ImportOptions, LabelMap};
use triage_data::{read_examples, write_examples, Example};
use triage_infer::Structurer;
use triage_taxonomy::Validator;
use triage_train::adapter::{self, TriageMeta};
use triage_train::trainer::{fmt_acc, Observer, StepReport, Trainer};

use crate::api::{parse_json, ApiError};
use crate::state::{AppState, Engine};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
}

/// `GET /api/v1/train/{id}`.
#[derive(Debug, Clone, Serialize)]
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
    /// Why it failed.
    pub error: Option<String>,
}

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<String, Arc<Mutex<JobStatus>>>,
    running: Option<String>,
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

/// `(key, value)` pairs of a query string, in order (repeated keys kept), decoded as
/// `application/x-www-form-urlencoded`.
fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn datasets_dir(s: &AppState) -> PathBuf {
    s.config.data_dir.join("datasets")
}

fn io_error(what: &str, path: &Path, e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(what, format!("{}: {e}", path.display()))
}

/// `POST /api/v1/train-data?map=KEY=COLUMN&...[&format=csv|tsv|jsonl][&taxonomy=NAME]`: the
/// body (a CSV export by default) is imported with the same code as `triage data import`;
/// the dataset is stored atomically under an id derived from its content and taxonomy, so a
/// repeated upload returns the same id. Rejected rows are listed (first 20) and kept in
/// `<id>.rejects.jsonl`.
pub async fn train_data(
    State(s): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let pairs = query_pairs(q.as_deref());
    let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let desk = s.desk(get("taxonomy").as_deref())?;
    let taxonomy = desk.engine().structurer.taxonomy().clone();
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
    let mapping = ColumnMapping::parse(&specs, &taxonomy)
        .map_err(|e| ApiError::unprocessable("bad_mapping", e.to_string()))?;
    let format = get("format").unwrap_or_else(|| "csv".into());
    if !["csv", "tsv", "jsonl", "json"].contains(&format.as_str()) {
        return Err(ApiError::unprocessable(
            "bad_format",
            "format must be csv, tsv, json or jsonl",
        ));
    }
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
        std::fs::create_dir_all(&dir).map_err(|e| io_error("storing the upload", &dir, e))?;
        let upload = dir.join(format!("{id}.upload.{format}"));
        triage_data::atomic_write(&upload, &body).map_err(|e| io_error("storing the upload", &upload, e))?;
        let validator = Validator::new(&taxonomy);
        let opts = ImportOptions {
            mapping,
            labels: LabelMap::default(),
            source: id.clone(),
            max_text_chars: state.config.max_input_chars,
        };
        let r = import_file(&upload, &validator, &opts)
            .map_err(|e| ApiError::unprocessable("unreadable_upload", e.to_string()))?;
        let _ = std::fs::remove_file(&upload);
        let data = dir.join(format!("{id}.jsonl"));
        write_examples(&data, &r.examples).map_err(|e| io_error("storing the dataset", &data, e))?;
        let rejects = dir.join(format!("{id}.rejects.jsonl"));
        let lines: String = r
            .rejects
            .iter()
            .map(|x| serde_json::to_string(x).unwrap_or_default() + "\n")
            .collect();
        triage_data::atomic_write(&rejects, lines.as_bytes())
            .map_err(|e| io_error("storing the rejects", &rejects, e))?;
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
        let meta = dir.join(format!("{id}.json"));
        triage_data::atomic_write(
            &meta,
            serde_json::to_string_pretty(&summary)
                .unwrap_or_default()
                .as_bytes(),
        )
        .map_err(|e| io_error("storing the dataset summary", &meta, e))?;
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

/// `POST /api/v1/train`: starts a background job (one at a time: 409 while one runs) and
/// answers 202 with its id.
pub async fn train_start(
    State(s): State<Arc<AppState>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: TrainRequest = parse_json(&body)?;
    let Some(ctx) = s.train.as_ref() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "training_disabled",
            "this server was started without training support",
        ));
    };
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
    let mut config = ctx.config.clone();
    if let Some(v) = req.steps {
        config.steps = v;
    }
    if let Some(v) = req.lr {
        config.optimizer.lr = v;
    }
    if let Some(v) = req.rank {
        config.set_rank(v);
    }
    config
        .check()
        .map_err(|e| ApiError::unprocessable("bad_train_config", e.to_string()))?;
    let job = {
        let mut j = s.jobs.lock();
        if let Some(r) = &j.running {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "training_busy",
                format!("job {r} is running; one job runs at a time"),
            ));
        }
        j.seq += 1;
        let id = format!("job-{}-{}", std::process::id(), j.seq);
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
        }));
        j.jobs.insert(id.clone(), st.clone());
        j.running = Some(id.clone());
        (id, st)
    };
    let (id, st) = job;
    let state = s.clone();
    let activate = req.activate;
    let taxonomy_name = req.taxonomy.clone();
    let job_id = id.clone();
    std::thread::Builder::new()
        .name(format!("train-{id}"))
        .spawn(move || {
            let result = run_job(
                &state,
                &job_id,
                &data,
                config,
                taxonomy_name.as_deref(),
                &st,
                activate,
            );
            let mut g = status(&st);
            match result {
                Ok(()) => g.state = JobState::Succeeded,
                Err(e) if state.stop.load(Ordering::SeqCst) => {
                    g.state = JobState::Stopped;
                    g.error = Some(e);
                }
                Err(e) => {
                    tracing::error!("training job {job_id}: {e}");
                    g.state = JobState::Failed;
                    g.error = Some(e);
                }
            }
            drop(g);
            state.jobs.lock().running = None;
        })
        .map_err(|e| ApiError::internal("starting the training thread", e))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"job_id": id, "status_url": format!("/api/v1/train/{id}")})),
    ))
}

struct JobObserver<'a>(&'a Mutex<JobStatus>);

impl Observer for JobObserver<'_> {
    fn step(&mut self, r: &StepReport) {
        let mut g = status(self.0);
        g.step = r.step;
        g.steps = r.steps;
        g.loss = Some(r.loss);
        g.tokens_per_s = Some(r.tokens_per_s);
    }

    fn message(&mut self, text: &str) {
        status(self.0).log.push(text.to_owned());
    }
}

/// Trains, saves the adapter, and activates it if asked.
fn run_job(
    s: &AppState,
    id: &str,
    data: &Path,
    config: triage_train::trainer::TrainConfig,
    taxonomy: Option<&str>,
    st: &Mutex<JobStatus>,
    activate: bool,
) -> Result<(), String> {
    let ctx = s.train.as_ref().ok_or("training disabled")?;
    let desk = s.desk(taxonomy).map_err(|e| e.message)?;
    let engine = desk.engine();
    let base = &engine.structurer;
    let validator = Validator::new(base.taxonomy());
    let examples = read_examples(data, &validator).map_err(|e| e.to_string())?;
    // A tenth of the examples (by id hash) for validation, when there are enough.
    let (val, train): (Vec<Example>, Vec<Example>) = examples
        .into_iter()
        .partition(|e| triage_data::rng::stable_hash(e.id.as_bytes()).is_multiple_of(10));
    let (train, val) = if train.is_empty() || val.is_empty() {
        (train.into_iter().chain(val).collect::<Vec<_>>(), Vec::new())
    } else {
        (train, val)
    };
    if train.is_empty() {
        return Err("the dataset has no examples".into());
    }
    let run_dir = s.config.data_dir.join("runs").join(id);
    let mut trainer =
        Trainer::new(base, &ctx.gguf, config, &train, &val, &run_dir, false).map_err(|e| e.to_string())?;
    let summary = trainer
        .run(&s.stop, &mut JobObserver(st))
        .map_err(|e| e.to_string())?;
    status(st).log.push(format!(
        "accuracy before {} after {}",
        fmt_acc(&summary.accuracy_before),
        fmt_acc(&summary.accuracy_after)
    ));
    let dir = s.config.data_dir.join("adapters").join(id);
    let metrics = serde_json::to_value(&summary).unwrap_or_default();
    let meta = TriageMeta::new(base.taxonomy(), &ctx.base_sha256, &ctx.base_file, metrics.clone());
    adapter::save(&dir, &trainer.lora, &ctx.base_model_name, &meta).map_err(|e| e.to_string())?;
    {
        let mut g = status(st);
        g.summary = Some(metrics);
        g.adapter = Some(dir.display().to_string());
    }
    if activate {
        activate_adapter(s, desk.name(), &dir, id)?;
        status(st).active = true;
    }
    Ok(())
}

/// Loads the adapter in `dir` (checked against the taxonomy and base model) and swaps it into
/// the desk `taxonomy`: requests already running finish on the previous engine.
fn activate_adapter(s: &AppState, taxonomy: &str, dir: &Path, name: &str) -> Result<(), String> {
    let ctx = s
        .train
        .as_ref()
        .ok_or("activation needs the base model (training support)")?;
    let desk = s.desk(Some(taxonomy)).map_err(|e| e.message)?;
    let current = desk.engine();
    let base = &current.structurer;
    let lora = adapter::load_checked(dir, base.taxonomy(), &ctx.base_sha256, base.model())
        .map_err(|e| e.to_string())?;
    let s2 = Structurer::with_model(
        base.model().clone(),
        &ctx.gguf,
        base.taxonomy().clone(),
        base.options().clone(),
    )
    .map_err(|e| e.to_string())?
    .with_adapter(Arc::new(lora));
    s2.warm_up().map_err(|e| e.to_string())?;
    desk.swap(Engine {
        structurer: Arc::new(s2),
        adapter: Some(name.to_owned()),
    });
    tracing::info!("adapter {name} now serves taxonomy {taxonomy}");
    Ok(())
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
    let state = s.clone();
    let name = id.clone();
    tokio::task::spawn_blocking(move || activate_adapter(&state, &taxonomy, &dir, &name))
        .await
        .map_err(|e| ApiError::internal("activation", e))?
        .map_err(|e| ApiError::unprocessable("activation_failed", e))?;
    status(&job).active = true;
    Ok(Json(serde_json::json!({"job_id": id, "active": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
