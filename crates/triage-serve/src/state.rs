//! What the service holds: its limits, one engine per taxonomy (swapped atomically when an
//! adapter is activated), the admission queue, metrics and training jobs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use triage_infer::Structurer;
use triage_llm::GgufFile;
use triage_train::trainer::TrainConfig;

use crate::api::ApiError;
use crate::jobs::Jobs;
use crate::metrics::Metrics;

/// Limits and locations of the service.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Bearer token every endpoint but `/healthz` and `/readyz` requires (`None`: open).
    pub token: Option<String>,
    /// Largest JSON request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Largest `train-data` upload in bytes (413 beyond).
    pub max_upload_bytes: usize,
    /// Longest incident text in characters (422 beyond).
    pub max_input_chars: usize,
    /// Most incidents in one `/v1/tickets:batch` request (422 beyond).
    pub max_batch: usize,
    /// Requests decoded at once (each on its own blocking thread, sharing the model).
    pub workers: usize,
    /// Requests waiting for a worker beyond which new ones get 503 + `Retry-After`.
    pub queue: usize,
    /// Wall-clock budget of one request, queueing included (504 beyond).
    pub request_timeout: Duration,
    /// `Retry-After` seconds sent with 503.
    pub retry_after_s: u64,
    /// Uploaded datasets, training runs and trained adapters live here.
    pub data_dir: PathBuf,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            token: None,
            max_body_bytes: 256 * 1024,
            max_upload_bytes: 32 * 1024 * 1024,
            max_input_chars: 20_000,
            max_batch: 16,
            workers: 1,
            queue: 16,
            request_timeout: Duration::from_secs(120),
            retry_after_s: 5,
            data_dir: PathBuf::from("serve-data"),
        }
    }
}

/// A structurer and the adapter it carries.
pub struct Engine {
    /// Ticket structuring for one taxonomy.
    pub structurer: Arc<Structurer>,
    /// Name of the active adapter (`None`: the base model).
    pub adapter: Option<String>,
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
            })),
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
    ready: AtomicBool,
    /// Set on shutdown: a running training job checkpoints and stops.
    pub stop: Arc<AtomicBool>,
}

impl AppState {
    /// State over `desks` (the first is the default taxonomy). Training endpoints answer 503
    /// without a `train` context.
    pub fn new(config: ServeConfig, desks: Vec<Desk>, train: Option<TrainContext>) -> Arc<Self> {
        Arc::new(AppState {
            admission: Admission::new(config.workers, config.queue),
            config,
            desks,
            metrics: Metrics::default(),
            jobs: Jobs::default(),
            train,
            ready: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
        })
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
