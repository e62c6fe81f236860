//! `triage serve`: the HTTP service (`triage-serve`) over one shared model instance.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use triage_infer::{Structurer, StructurerOptions};
use triage_serve::{AppState, Desk, ServeConfig, TrainContext};

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
    /// Requests decoded at once (they share the model; each uses a core).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Requests allowed to wait for a worker; more get 503 + Retry-After.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Time budget of one request in seconds, queueing included (504 beyond).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Largest JSON body in bytes (413 beyond).
    #[arg(long, default_value_t = 256 * 1024)]
    max_body_bytes: usize,
    /// Largest train-data upload in bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    max_upload_bytes: usize,
    /// Longest incident text in characters (422 beyond).
    #[arg(long, default_value_t = 20_000)]
    max_input_chars: usize,
    /// Most items in one /v1/tickets:batch request.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Flag tickets with a field under this confidence for review (`meta.needs_review`).
    #[arg(long, default_value_t = 0.5)]
    min_confidence: f32,
    /// Where uploaded datasets, training runs and adapters are stored.
    #[arg(long, default_value = "serve-data")]
    data_dir: PathBuf,
    /// Training defaults for /api/v1/train.
    #[arg(long, default_value = "configs/train.toml")]
    train_config: PathBuf,
}

pub fn run(cli: &Cli, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    if !triage_serve::is_loopback(&args.bind) && args.token.as_deref().is_none_or(str::is_empty) {
        bail!(
            "{} is not a loopback address: set --token (or TRIAGE_TOKEN) so the service is not open to the network",
            args.bind
        );
    }
    let path = crate::model_cmd::store(cli)?.resolve(cli.model.as_deref(), None)?;
    let (gguf, model) = crate::model_cmd::load_cpu(&path)?;
    let opts = StructurerOptions {
        min_confidence: Some(args.min_confidence),
        prefix_cache_dir: Some(crate::model_cmd::cache_dir(cli).join("prefix")),
        ..StructurerOptions::default()
    };
    let mut taxonomies = vec![crate::taxonomy_cmd::load_taxonomy(cli)?];
    for f in &args.also_taxonomy {
        taxonomies.push(
            triage_taxonomy::Taxonomy::from_file(f)
                .with_context(|| format!("--also-taxonomy {}", f.display()))?,
        );
    }
    let mut desks = Vec::new();
    for (i, t) in taxonomies.into_iter().enumerate() {
        let mut s = Structurer::with_model(model.clone(), &gguf, t, opts.clone())?;
        // --adapter names the default taxonomy's adapter; every taxonomy otherwise gets its
        // shipped one (unless --no-adapter).
        let choice = match i {
            0 => args.adapter.clone(),
            _ => crate::adapter_cmd::AdapterArgs {
                adapter: None,
                no_adapter: args.adapter.no_adapter,
            },
        };
        let mut adapter = None;
        if let Some((name, lora)) = crate::adapter_cmd::resolve(cli, &choice, &s, &path)? {
            s = s.with_adapter(Arc::new(lora));
            adapter = Some(name);
        }
        desks.push(Desk::new(s, adapter));
    }
    let train = TrainContext {
        base_model_name: crate::train_cmd::peft_base_name(cli, &path)?,
        base_sha256: crate::train_cmd::model_sha256(cli, &path)?,
        base_file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config: crate::train_cmd::read_config(&args.train_config)?,
        gguf,
    };
    let config = ServeConfig {
        token: args.token.clone().filter(|t| !t.is_empty()),
        max_body_bytes: args.max_body_bytes,
        max_upload_bytes: args.max_upload_bytes,
        max_input_chars: args.max_input_chars,
        max_batch: args.max_batch,
        workers: args.workers,
        queue: args.queue,
        request_timeout: Duration::from_secs(args.timeout_secs),
        data_dir: args.data_dir.clone(),
        ..ServeConfig::default()
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
