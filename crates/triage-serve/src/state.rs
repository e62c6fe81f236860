//! What the service holds: its limits, one engine per taxonomy (swapped atomically when an
//! adapter is activated), the admission queue, metrics, training jobs and the disk lock.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use triage_infer::Structurer;
use triage_llm::GgufFile;
use triage_train::admission::{self, MemoryBudget, MemoryLimit};
use triage_train::trainer::TrainConfig;

use crate::disk::Disk;
use crate::error::ApiError;
use crate::jobs::Jobs;
use crate::limits::{self, TrainLimits};
use crate::metrics::Metrics;

/// Limits and locations of the service (`docs/limits.md` lists them with their defaults and
/// flags).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Bearer token every endpoint but `/healthz` and `/readyz` requires (`None`: open).
    pub token: Option<String>,
    /// Largest JSON request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Largest `train-data` upload in bytes (413 beyond).
    pub max_upload_bytes: usize,
    /// Most rows in one `train-data` upload (422 beyond).
    pub max_upload_rows: usize,
    /// Longest incident text in characters (422 beyond).
    pub max_input_chars: usize,
    /// Most incidents in one `/v1/tickets:batch` request (422 beyond).
    pub max_batch: usize,
    /// Requests decoded at once (each on its own blocking thread; their forward passes are
    /// merged into one, see `triage_infer`'s batcher). Waiting requests are served first
    /// come, first served.
    pub workers: usize,
    /// Requests waiting for a worker beyond which new ones get 503 + `Retry-After`.
    pub queue: usize,
    /// Wall-clock budget of one request, queueing included (504 beyond).
    pub request_timeout: Duration,
    /// `Retry-After` seconds sent with 503.
    pub retry_after_s: u64,
    /// Uploaded datasets, training runs and trained adapters live here.
    pub data_dir: PathBuf,
    /// Bounds on training jobs (422 beyond).
    pub train_limits: TrainLimits,
    /// Total bytes of datasets, runs and adapters under `data_dir`; past it the retention rule
    /// deletes finished runs, and what still does not fit is refused with 507.
    pub disk_quota_bytes: u64,
    /// Memory the service may use: detected (cgroup limit or `MemAvailable`), a given size, or
    /// not checked. Training jobs and adapter activations that do not fit are refused (507).
    pub memory_limit: MemoryLimit,
    /// Memory kept free for serving when a job is admitted, besides each worker's request.
    pub memory_reserve_bytes: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            token: None,
            max_body_bytes: 256 * 1024,
            max_upload_bytes: 32 * 1024 * 1024,
            max_input_chars: 20_000,
            max_batch: 16,
            workers: triage_infer::DEFAULT_BATCH_SIZE,
            queue: 16,
            request_timeout: Duration::from_secs(120),
            retry_after_s: 5,
            data_dir: PathBuf::from("serve-data"),
            max_upload_rows: 50_000,
            train_limits: TrainLimits::default(),
            disk_quota_bytes: 10 << 30,
            memory_limit: MemoryLimit::Auto,
            memory_reserve_bytes: 512 << 20,
        }
    }
}

impl ServeConfig {
    /// Every limit within its ceiling (at startup). The errors name the flag.
    pub fn check(&self) -> Result<(), admission::LimitError> {
        use admission::LimitError;
        let flags = [
            ("--max-body-bytes", self.max_body_bytes, 1024, 64 << 20),
            ("--max-upload-bytes", self.max_upload_bytes, 1024, 4 << 30),
            ("--max-upload-rows", self.max_upload_rows, 1, 10_000_000),
            ("--max-input-chars", self.max_input_chars, 1, 1_000_000),
            ("--max-batch", self.max_batch, 1, 256),
            ("--workers", self.workers, 1, 256),
            ("--queue", self.queue, 0, 100_000),
        ];
        for (flag, v, min, max) in flags {
            LimitError::check_range(flag, v, min, max, || {
                format!("start the server with {flag} in {min}..={max}")
            })?;
        }
        self.train_limits.check_ceilings()
    }
}

/// A structurer and the adapter it carries.
pub struct Engine {
    /// Ticket structuring for one taxonomy.
    pub structurer: Arc<Structurer>,
    /// Name of the active adapter (`None`: the base model).
    pub adapter: Option<String>,
    /// With `--backend openai:URL`: tickets are decoded there instead (training jobs still
    /// run on the local model).
    pub remote: Option<Arc<triage_infer::remote::RemoteStructurer>>,
}

impl Engine {
    /// What structures tickets: the remote backend if there is one, else the local engine.
    pub fn tickets(&self) -> &dyn triage_infer::TicketEngine {
        match &self.remote {
            Some(r) => r.as_ref(),
            None => self.structurer.as_ref(),
        }
    }
}

/// One taxonomy served.
pub struct Desk {
    name: String,
    engine: RwLock<Arc<Engine>>,
}

impl Desk {
    /// A desk serving `structurer`'s taxonomy.
    pub fn new(structurer: Structurer, adapter: Option<String>) -> Self {
        Desk {
            name: structurer.taxonomy().name.clone(),
            engine: RwLock::new(Arc::new(Engine {
                structurer: Arc::new(structurer),
                adapter,
                remote: None,
            })),
        }
    }

    /// This desk with its tickets decoded by an OpenAI-compatible server.
    pub fn with_remote(self, remote: triage_infer::remote::RemoteStructurer) -> Self {
        let e = self.engine();
        let engine = Engine {
            structurer: e.structurer.clone(),
            adapter: e.adapter.clone(),
            remote: Some(Arc::new(remote)),
        };
        Desk {
            name: self.name,
            engine: RwLock::new(Arc::new(engine)),
        }
    }

    /// The taxonomy name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current engine (requests keep the one they started with).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the engine: requests in flight finish on the old one.
    pub fn swap(&self, engine: Engine) {
        *self.engine.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(engine);
    }
}

/// What training jobs build on: the base GGUF and how adapters record it.
pub struct TrainContext {
    /// The base model file (tokenizer and weights metadata).
    pub gguf: GgufFile,
    /// PEFT `base_model_name_or_path`.
    pub base_model_name: String,
    /// SHA-256 of the base GGUF.
    pub base_sha256: String,
    /// File name of the base GGUF.
    pub base_file: String,
    /// Defaults of every job (a request may override steps, learning rate and rank).
    pub config: TrainConfig,
}

/// The shared state of the service.
pub struct AppState {
    /// Limits and locations.
    pub config: ServeConfig,
    desks: Vec<Desk>,
    pub(crate) admission: Admission,
    pub(crate) metrics: Metrics,
    pub(crate) jobs: Jobs,
    pub(crate) train: Option<TrainContext>,
    pub(crate) disk: Disk,
    ready: AtomicBool,
    /// Set on shutdown: a running training job checkpoints and stops.
    pub stop: Arc<AtomicBool>,
}

impl AppState {
    /// State over `desks` (the first is the default taxonomy). Training endpoints answer 503
    /// without a `train` context. Temporaries left in the data folder by a crashed process are
    /// removed, and the training jobs of earlier processes are listed from their records
    /// (`runs/<job>.json`): one that was running when its process went down is `interrupted`,
    /// with its last checkpoint.
    pub fn new(mut config: ServeConfig, desks: Vec<Desk>, train: Option<TrainContext>) -> Arc<Self> {
        // Job records name their adapter folder: an absolute path stays true when the service
        // is restarted from another working directory.
        if let Ok(dir) = std::path::absolute(&config.data_dir) {
            config.data_dir = dir;
        }
        let state = Arc::new(AppState {
            admission: Admission::new(config.workers, config.queue),
            config,
            desks,
            metrics: Metrics::default(),
            jobs: Jobs::default(),
            train,
            disk: Disk::default(),
            ready: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
        });
        // Before the sweep, which would delete a cut swap's copies (each restore is logged).
        crate::disk::recover_swaps(&state.config.data_dir);
        crate::disk::sweep(&state.config.data_dir, &state.disk.lock(), None);
        let served: Vec<String> = state
            .desks
            .iter()
            .filter_map(|d| d.engine().adapter.clone())
            .collect();
        let n = state.jobs.load(&state.config.data_dir, &served);
        if n > 0 {
            tracing::info!(
                "{n} training job(s) of earlier runs listed from {}",
                state.config.data_dir.join("runs").display()
            );
        }
        state
    }

    /// Every training job's status (this process's and those of earlier runs), in id order.
    pub fn training_jobs(&self) -> Vec<crate::JobStatus> {
        self.jobs.list()
    }

    /// Memory kept free for serving while other work is admitted: the configured reserve plus
    /// what each worker's request may add ([`limits::request_bytes`]).
    pub fn serving_reserve(&self) -> u64 {
        let per_request = self
            .desks
            .iter()
            .map(|d| {
                let s = &d.engine().structurer;
                limits::request_bytes(s.model().config(), s.system_prompt_tokens(), s.options())
            })
            .max()
            .unwrap_or(0);
        self.config.memory_reserve_bytes + self.config.workers.max(1) as u64 * per_request
    }

    /// Refuses (507, with the figures) work estimated at `need` bytes that does not fit in the
    /// memory available minus [`AppState::serving_reserve`].
    pub(crate) fn admit_memory(&self, what: &str, need: u64, hint: &str) -> Result<(), ApiError> {
        let Some(budget) = MemoryBudget::resolve(self.config.memory_limit, "--memory-limit") else {
            return Ok(());
        };
        admission::admit(what, need, self.serving_reserve(), &budget, hint).map_err(ApiError::from)
    }

    /// Computes every desk's system-prompt cache, then reports ready (`/readyz`).
    pub fn warm_up(&self) -> Result<(), triage_infer::InferError> {
        for d in &self.desks {
            d.engine().structurer.warm_up()?;
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the model is loaded and warmed up.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The served taxonomies.
    pub fn desks(&self) -> &[Desk] {
        &self.desks
    }

    /// The desk for `taxonomy` (default: the first).
    pub(crate) fn desk(&self, taxonomy: Option<&str>) -> Result<&Desk, ApiError> {
        match taxonomy {
            None => self
                .desks
                .first()
                .ok_or_else(|| ApiError::internal("routing", "the server has no taxonomy")),
            Some(name) => self.desks.iter().find(|d| d.name == name).ok_or_else(|| {
                let names: Vec<&str> = self.desks.iter().map(|d| d.name.as_str()).collect();
                ApiError::unprocessable(
                    "unknown_taxonomy",
                    format!("taxonomy {name:?} is not served; served: {}", names.join(", ")),
                )
            }),
        }
    }
}

/// Bounded concurrency with a bounded queue: `workers` permits; at most `queue` requests wait
/// for one, later ones are refused at once.
pub(crate) struct Admission {
    sem: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    queue: usize,
}

/// Decrements the waiting count however the wait ends (a dropped request included).
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    fn new(workers: usize, queue: usize) -> Self {
        Admission {
            sem: Arc::new(Semaphore::new(workers.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            queue,
        }
    }

    /// Requests waiting for a worker.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Workers busy.
    pub(crate) fn busy(&self, workers: usize) -> usize {
        workers.max(1) - self.sem.available_permits()
    }

    /// Up to `n` more worker permits that are free right now, without waiting: a batch request
    /// decodes its items on the workers nobody is using. Queued requests are never overtaken:
    /// a released permit goes to a waiting request first, so none is free while one waits.
    pub(crate) fn idle(&self, n: usize) -> Vec<OwnedSemaphorePermit> {
        (0..n)
            .map_while(|_| self.sem.clone().try_acquire_owned().ok())
            .collect()
    }

    /// A worker permit, waiting in the queue until `deadline`; `Busy` when the queue is full.
    pub(crate) async fn enter(
        &self,
        deadline: tokio::time::Instant,
        retry_after_s: u64,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::busy(retry_after_s));
        }
        let _waiting = Waiting(self.waiting.clone());
        match tokio::time::timeout_at(deadline, self.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(ApiError::busy(retry_after_s)),
            Err(_) => Err(ApiError::timeout("waiting for a worker")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_data_dir_is_made_absolute_so_job_records_name_absolute_adapter_paths() {
        let rel = PathBuf::from(format!("triage-state-test-{}", std::process::id()));
        let state = AppState::new(
            ServeConfig {
                data_dir: rel.clone(),
                ..ServeConfig::default()
            },
            Vec::new(),
            None,
        );
        assert!(state.config.data_dir.is_absolute(), "{:?}", state.config.data_dir);
        assert_eq!(state.config.data_dir, std::env::current_dir().unwrap().join(&rel));
        assert!(!rel.exists(), "nothing is created before it is needed");
    }
}
