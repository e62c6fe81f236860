//! Shared setup of the service tests: a server on a loopback port over a given structurer,
//! and a small taxonomy-agnostic client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;
use triage_infer::{Structurer, StructurerOptions};
use triage_llm::qwen2::{Config, LoadOptions, Qwen2};
use triage_llm::GgufFile;
use triage_registry::ModelStore;
use triage_serve::{AppState, Desk, ServeConfig, TrainContext};
use triage_taxonomy::Taxonomy;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn taxonomy() -> Taxonomy {
    Taxonomy::from_file(repo().join("configs/taxonomy/default.toml")).unwrap()
}

/// The 0.5B GGUF (its tokenizer and chat template; its weights for the real-model test).
pub fn gguf() -> (GgufFile, ModelStore) {
    let store = ModelStore::from_env();
    let spec = store.registry().get("0.5b").unwrap();
    let path = store
        .ensure(spec, None)
        .unwrap_or_else(|e| panic!("the 0.5B model is needed (`triage model pull 0.5b`): {e}"));
    (GgufFile::open(path).unwrap(), store)
}

fn options(store: &ModelStore) -> StructurerOptions {
    StructurerOptions {
        min_confidence: Some(0.5),
        prefix_cache_dir: Some(store.cache_dir().join("prefix")),
        model_sha256: Some(store.registry().get("0.5b").unwrap().sha256.clone()),
        ..StructurerOptions::default()
    }
}

/// A structurer over a tiny random Qwen2 with the real tokenizer: the service code path at a
/// fraction of the cost (its tickets are valid by construction, their content random).
pub fn tiny_structurer() -> Structurer {
    tiny_structurer_for(taxonomy())
}

/// [`tiny_structurer`] over another taxonomy.
pub fn tiny_structurer_for(taxonomy: Taxonomy) -> Structurer {
    let (gguf, _) = gguf();
    let vocab = Config::from_gguf(&gguf).unwrap().vocab_size;
    let cfg = Config {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        max_position: 4096,
    };
    let model = Arc::new(Qwen2::random(&cfg, 3, &candle_core::Device::Cpu).unwrap());
    let opts = StructurerOptions {
        min_confidence: Some(0.5),
        ..StructurerOptions::default()
    };
    Structurer::with_model(model, &gguf, taxonomy, opts).unwrap()
}

/// The real 0.5B structurer and a training context on it.
pub fn real_structurer(train: triage_train::trainer::TrainConfig) -> (Structurer, TrainContext) {
    let (gguf, store) = gguf();
    let model = Arc::new(Qwen2::load(&gguf, &candle_core::Device::Cpu, &LoadOptions::default()).unwrap());
    let s = Structurer::with_model(model, &gguf, taxonomy(), options(&store)).unwrap();
    let spec = store.registry().get("0.5b").unwrap();
    let ctx = TrainContext {
        base_model_name: "Qwen/Qwen2.5-Coder-0.5B-Instruct".into(),
        base_sha256: spec.sha256.clone(),
        base_file: gguf.path().file_name().unwrap().to_string_lossy().into_owned(),
        config: train,
        gguf,
    };
    (s, ctx)
}

/// A training context for the tiny structurer: the 0.5B GGUF for tokenizer and metadata, and a
/// one-step configuration small enough for CI.
pub fn tiny_train_context() -> TrainContext {
    let (gguf, _) = gguf();
    TrainContext {
        base_model_name: "tiny-random-qwen2".into(),
        base_sha256: "0".repeat(64),
        base_file: "tiny.gguf".into(),
        config: triage_train::trainer::TrainConfig {
            steps: 1,
            warmup_steps: 0,
            batch_size: 1,
            grad_accum: 1,
            eval_every: 0,
            accuracy_samples: 0,
            checkpoint_every: 0,
            max_tokens: 256,
            ..triage_train::trainer::TrainConfig::default()
        },
        gguf,
    }
}

/// A running server: its address, and a handle that shuts it down gracefully.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(config: ServeConfig, s: Structurer, train: Option<TrainContext>) -> Server {
        Self::start_desks(config, vec![Desk::new(s, None)], train).await
    }

    /// A server over `desks` (the first is the default taxonomy).
    pub async fn start_desks(config: ServeConfig, desks: Vec<Desk>, train: Option<TrainContext>) -> Server {
        let state = AppState::new(config, desks, train);
        let warm = state.clone();
        tokio::task::spawn_blocking(move || warm.warm_up().unwrap())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(triage_serve::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            state,
            stop: Some(tx),
            done,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()
        .unwrap()
}

/// The `train-data` query mapping the columns of [`csv`] to the default taxonomy's fields.
pub const MAP: &str = "map=text=body&map=category=cat&map=subcategory=sub&map=priority=prio&map=assignment_group=grp&map=request_type=kind";

/// A CSV of `n` valid rows (distinct texts, two classes) for the default taxonomy.
pub fn csv(n: usize) -> String {
    let mut s = String::from("body,cat,sub,prio,grp,kind\n");
    for i in 0..n {
        match i % 2 {
            0 => s.push_str(&format!(
                "\"VPN disconnects every {} minutes at home\",Network,VPN,High,Network Operations,Incident\n",
                i + 2
            )),
            _ => s.push_str(&format!(
                "\"Please install Visio on laptop LT-{i}\",Software,Installation / Update,Low,Desktop Support,Service Request\n"
            )),
        }
    }
    s
}

/// Sends a request; its status and JSON body (`null` when the body is not JSON).
pub async fn answer(r: reqwest::RequestBuilder) -> (reqwest::StatusCode, serde_json::Value) {
    let r = r.send().await.unwrap();
    let status = r.status();
    (
        status,
        r.json::<serde_json::Value>()
            .await
            .unwrap_or(serde_json::Value::Null),
    )
}
