//! `triage serve`: the HTTP service (`triage-serve`) over one shared model instance.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use triage_infer::{Structurer, StructurerOptions};
use triage_llm::qwen2::{Config, LoadOptions, Qwen2};
use triage_llm::GgufFile;
use triage_serve::{limits, AppState, Desk, ServeConfig, TrainContext, TrainLimits};
use triage_train::admission::{self, parse_size, MemoryBudget, MemoryLimit};

use crate::Cli;

/// Options of `triage serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on. A non-loopback address requires --token.
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// Bearer token required on every endpoint but /healthz and /readyz.
    #[arg(long, env = "TRIAGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// More taxonomies to serve (chosen per request with `taxonomy`); --taxonomy is the default.
    #[arg(long = "also-taxonomy", value_name = "FILE")]
    also_taxonomy: Vec<PathBuf>,
    #[command(flatten)]
    adapter: crate::adapter_cmd::AdapterArgs,
    /// With `--backend openai:URL`, tickets are decoded by that server (per taxonomy, the
    /// same messages and schema); training jobs still run here.
    #[command(flatten)]
    backend: crate::backend_cmd::BackendArgs,
    #[command(flatten)]
    device: crate::backend_cmd::DeviceArgs,
    /// Requests decoded at once: they share every forward pass (continuous batching: a
    /// finished request's place goes to the first one waiting).
    #[arg(long, default_value_t = ServeConfig::default().workers)]
    workers: usize,
    /// Requests allowed to wait for a worker; more get 503 + Retry-After.
    #[arg(long, default_value_t = ServeConfig::default().queue)]
    queue: usize,
    /// Time budget of one request in seconds, queueing included (504 beyond); 1 to 86,400.
    #[arg(long, default_value_t = 120,
        value_parser = clap::value_parser!(u64).range(1..=triage_serve::limits::MAX_REQUEST_TIMEOUT_SECS))]
    timeout_secs: u64,
    /// Largest JSON body in bytes (413 beyond).
    #[arg(long, default_value_t = 256 * 1024)]
    max_body_bytes: usize,
    /// Largest train-data upload in bytes (413 beyond).
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    max_upload_bytes: usize,
    /// Most rows in one train-data upload (422 beyond).
    #[arg(long, default_value_t = ServeConfig::default().max_upload_rows)]
    max_upload_rows: usize,
    /// Longest incident text in characters (422 beyond).
    #[arg(long, default_value_t = 20_000)]
    max_input_chars: usize,
    /// Incident tokens kept per ticket; longer input is cut from the middle (16..=8192).
    #[arg(long, default_value_t = StructurerOptions::default().max_input_tokens)]
    max_input_tokens: usize,
    /// Tokens a ticket may generate (16..=2048; a ticket needs 40 to 80).
    #[arg(long, default_value_t = StructurerOptions::default().max_new_tokens)]
    max_new_tokens: usize,
    /// Most items in one /v1/tickets:batch request.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Highest LoRA rank a training job may use (422 beyond; at most 512).
    #[arg(long, default_value_t = TrainLimits::default().rank)]
    max_train_rank: usize,
    /// Most optimizer steps of a training job (422 beyond).
    #[arg(long, default_value_t = TrainLimits::default().steps)]
    max_train_steps: usize,
    /// Highest peak learning rate of a training job (422 beyond; at most 1).
    #[arg(long, default_value_t = TrainLimits::default().lr)]
    max_train_lr: f64,
    /// Most sequences per micro-batch of a training job (--train-config's batch_size).
    #[arg(long, default_value_t = TrainLimits::default().batch_size)]
    max_train_batch_size: usize,
    /// Most micro-batches per optimizer step of a training job (--train-config's grad_accum).
    #[arg(long, default_value_t = TrainLimits::default().grad_accum)]
    max_train_grad_accum: usize,
    /// Longest training example in tokens (--train-config's max_tokens).
    #[arg(long, default_value_t = TrainLimits::default().max_tokens)]
    max_train_tokens: usize,
    /// Total size of the datasets, runs and adapters under --data-dir (e.g. 10G). Past it,
    /// finished runs are deleted oldest first (never the active adapter); what still does not
    /// fit is refused with 507.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    disk_quota: u64,
    /// Memory the service may use: `auto` (the cgroup limit or MemAvailable), a size such as
    /// `8G` (in all, what it holds included), or `off`. The model, each taxonomy, each
    /// training job and adapter activation must fit, or are refused.
    #[arg(long, value_name = "auto|off|SIZE", default_value = "auto")]
    memory_limit: MemoryLimit,
    /// Memory kept free for serving when a training job is admitted, besides what each
    /// worker's request may take.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    memory_reserve: u64,
    /// Flag tickets with a field under this confidence for review (`meta.needs_review`).
    #[arg(long, default_value_t = 0.5)]
    min_confidence: f32,
    /// Where uploaded datasets, training runs and adapters are stored.
    #[arg(long, default_value = "serve-data")]
    data_dir: PathBuf,
    // Built-in default (item 6 of the deployment issue): see crate::settings.
    /// Training defaults for /api/v1/train (default: `train_config` in the user config file,
    /// else the built-in configs/train.toml).
    #[arg(long, value_name = "FILE", env = "TRIAGE_TRAIN_CONFIG")]
    train_config: Option<PathBuf>,
}

pub fn run(cli: &Cli, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    // A token read from a secret file often ends in a newline: it is trimmed, and one that
    // is only whitespace is no token.
    let token = args
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    if !triage_serve::is_loopback(&args.bind) && token.is_none() {
        bail!(
            "{} is not a loopback address: set --token (or TRIAGE_TOKEN) so the service is not open to the network",
            args.bind
        );
    }
    let config = ServeConfig {
        token,
        max_body_bytes: args.max_body_bytes,
        max_upload_bytes: args.max_upload_bytes,
        max_upload_rows: args.max_upload_rows,
        max_input_chars: args.max_input_chars,
        max_batch: args.max_batch,
        workers: args.workers,
        queue: args.queue,
        request_timeout: Duration::from_secs(args.timeout_secs),
        data_dir: args.data_dir.clone(),
        train_limits: TrainLimits {
            rank: args.max_train_rank,
            steps: args.max_train_steps,
            lr: args.max_train_lr,
            batch_size: args.max_train_batch_size,
            grad_accum: args.max_train_grad_accum,
            max_tokens: args.max_train_tokens,
        },
        disk_quota_bytes: args.disk_quota,
        memory_limit: args.memory_limit,
        memory_reserve_bytes: args.memory_reserve,
        ..ServeConfig::default()
    };
    config.check()?;
    let path = crate::model_cmd::model_path(cli)?;
    let (prefix_cache_dir, model_sha256) = crate::model_cmd::prefix_cache(cli, &path);
    let opts = StructurerOptions {
        min_confidence: Some(args.min_confidence),
        prefix_cache_dir,
        model_sha256,
        max_new_tokens: args.max_new_tokens,
        max_input_tokens: args.max_input_tokens,
        ..StructurerOptions::default()
    };
    limits::check_structurer_options(&opts)?;
    // Built-in default (item 6 of the deployment issue): see crate::settings.
    let (train_config, origin) =
        crate::settings::Settings::load()?.train_config(args.train_config.as_deref())?;
    train_config
        .check()
        .with_context(|| format!("training configuration {origin}"))?;
    config
        .train_limits
        .check(&train_config, |_| false)
        .with_context(|| format!("training configuration {origin}"))?;
    let mut taxonomies = vec![crate::taxonomy_cmd::load_taxonomy(cli)?];
    for f in &args.also_taxonomy {
        taxonomies.push(
            triage_taxonomy::Taxonomy::from_file(f)
                .with_context(|| format!("--also-taxonomy {}", f.display()))?,
        );
    }
    let gguf = GgufFile::open(&path)?;
    let shape = Config::from_gguf(&gguf)?;
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The model and its first taxonomy must fit before anything is loaded.
    admit(
        args.memory_limit,
        &format!("loading {file} and serving one taxonomy"),
        limits::model_bytes(Qwen2::load_bytes(&gguf, &LoadOptions::default()), &shape, PREFIX_TOKENS),
        "serve a smaller model (--model 0.5b), stop what else uses memory, or pass --memory-limit SIZE (or off) if this machine really has more",
    )?;
    let model = Arc::new(Qwen2::load(
        &gguf,
        &args.device.resolve()?,
        &LoadOptions::default(),
    )?);
    // Before the desks resolve their adapters: one whose replacement a kill cut short is put
    // back first (logged as it is; the state's start-up does it too, for library users, and
    // then finds none).
    triage_serve::recover_swaps(&config.data_dir);
    let mut desks = Vec::new();
    for (i, t) in taxonomies.into_iter().enumerate() {
        if i > 0 {
            admit(
                args.memory_limit,
                &format!("serving taxonomy {:?} besides the others", t.name),
                limits::desk_bytes(&shape, PREFIX_TOKENS),
                "serve fewer taxonomies (--also-taxonomy), or pass --memory-limit SIZE (or off) if this machine really has more",
            )?;
        }
        let mut s = Structurer::with_model(model.clone(), &gguf, t, opts.clone())?;
        // --adapter names the default taxonomy's adapter; every taxonomy otherwise gets its
        // shipped one (unless --no-adapter).
        let choice = match i {
            0 => args.adapter.clone(),
            _ => crate::adapter_cmd::AdapterArgs {
                adapter: None,
                ..args.adapter.clone()
            },
        };
        let mut adapter = None;
        if let Some(r) = crate::adapter_cmd::resolve(cli, &choice, &s, &path)? {
            adapter = Some(r.name.clone());
            s = r.apply(s);
        }
        let remote = crate::backend_cmd::remote(
            &args.backend,
            s.taxonomy().clone(),
            || Ok(s.tokenizer().clone()),
            opts.max_new_tokens,
            opts.max_input_tokens,
            opts.min_confidence,
        )?;
        desks.push(match remote {
            Some(r) => Desk::new(s, adapter).with_remote(r),
            None => Desk::new(s, adapter),
        });
    }
    let train = TrainContext {
        base_model_name: crate::train_cmd::peft_base_name(cli, &path)?,
        base_sha256: crate::model_cmd::model_sha256(cli, &path)?,
        base_file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config: train_config,
        gguf,
    };
    let state = AppState::new(config, desks, Some(train));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.bind)
            .await
            .with_context(|| format!("cannot listen on {}", args.bind))?;
        eprintln!(
            "triage serve: listening on http://{} (warming up: /readyz turns 200 when the system prompt is cached)",
            listener.local_addr()?
        );
        let warm = state.clone();
        tokio::task::spawn_blocking(move || match warm.warm_up() {
            Ok(()) => tracing::info!("ready"),
            Err(e) => tracing::error!("warm-up failed: {e}"),
        });
        triage_serve::serve(listener, state, shutdown_signal()).await?;
        eprintln!("triage serve: stopped");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// System-prompt length assumed before a taxonomy's prompt is built (the default taxonomy's
/// is 2,026 tokens).
const PREFIX_TOKENS: usize = 2100;

/// Refuses, before it is allocated, `need` bytes for `what` that do not fit in the memory
/// `limit` leaves (`--memory-limit`).
fn admit(limit: MemoryLimit, what: &str, need: u64, hint: &str) -> anyhow::Result<()> {
    if let Some(budget) = MemoryBudget::resolve(limit, "--memory-limit") {
        admission::admit(what, need, 0, &budget, hint)?;
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
