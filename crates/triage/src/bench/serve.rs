//! `triage bench serve`: a bounded load test of the HTTP service on loopback with the real
//! model. For each client concurrency it starts the service (same limits), sends `--n`
//! incidents, and lets clients honour `Retry-After` on 503 as real clients do. Throughput and
//! latency go to the `serve` section of docs/benchmarks.md, as ratios against one client
//! (sequential requests) measured in the same run. Any answer other than 200 or the intended
//! 503 fails the benchmark.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde::Serialize;
use triage_infer::{Structurer, StructurerOptions};
use triage_serve::{AppState, Desk, ServeConfig};

use crate::Cli;

/// Options of `triage bench serve`.
#[derive(Args)]
pub struct BenchServeArgs {
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 40)]
    n: usize,
    /// Client concurrency levels, comma-separated (the first is the baseline).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    concurrency: Vec<usize>,
    /// Service workers (default: `triage serve`'s).
    #[arg(long, default_value_t = triage_serve::ServeConfig::default().workers)]
    workers: usize,
    /// Service queue (default: `triage serve`'s).
    #[arg(long, default_value_t = triage_serve::ServeConfig::default().queue)]
    queue: usize,
    /// Incidents file (JSON array of {text}).
    #[arg(long, default_value = "tests/fixtures/incidents.json")]
    incidents: PathBuf,
    /// Markdown report; its `serve` section is rewritten, JSON beside it.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
}

#[derive(Serialize)]
struct Level {
    concurrency: usize,
    requests: usize,
    tickets: usize,
    retried_503: usize,
    wall_s: f64,
    tickets_per_s: f64,
    p50_ms: f64,
    p95_ms: f64,
    max_ms: f64,
}

pub fn run(cli: &Cli, args: &BenchServeArgs) -> anyhow::Result<ExitCode> {
    let texts = super::common::read_incidents(&args.incidents)?;
    if texts.is_empty() || args.n == 0 || args.concurrency.is_empty() {
        bail!("need incidents, --n ≥ 1 and at least one concurrency level");
    }
    let path = crate::model_cmd::model_path(cli)?;
    let (gguf, model) = crate::model_cmd::load_cpu(&path)?;
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let (prefix_cache_dir, model_sha256) = crate::model_cmd::prefix_cache(cli, &path);
    let opts = StructurerOptions {
        prefix_cache_dir,
        model_sha256,
        ..StructurerOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let s = Structurer::with_model(model.clone(), &gguf, taxonomy.clone(), opts.clone())?;
        let config = ServeConfig {
            workers: args.workers,
            queue: args.queue,
            retry_after_s: 1,
            request_timeout: Duration::from_secs(600),
            data_dir: std::env::temp_dir().join("triage-bench-serve"),
            ..ServeConfig::default()
        };
        let state = AppState::new(config, vec![Desk::new(s, None)], None);
        state.warm_up()?;
        eprintln!(
            "== {} requests, {c} clients, {} workers, queue {}",
            args.n, args.workers, args.queue
        );
        let level = rt.block_on(load(state, &texts, args.n, c))?;
        eprintln!(
            "   {:.2} tickets/s, p50 {:.0} ms, p95 {:.0} ms, {} × 503 retried",
            level.tickets_per_s, level.p50_ms, level.p95_ms, level.retried_503
        );
        levels.push(level);
    }
    let command: Vec<String> = std::env::args().skip(1).collect();
    let base = levels[0].tickets_per_s;
    let mut md = format!(
        "## HTTP service under load\n\nWritten by `triage {}` (see `crates/triage/src/bench/serve.rs`); {}; model `{}`. \
         The service runs in-process on loopback with {} workers and a queue of {}; clients send incidents from \
         `{}` and, on 503, wait for `Retry-After` (1 s) and retry. Every request ended as a ticket (anything else \
         fails the benchmark). Ratios are against {} client(s) in the same run.\n\n\
         | clients | requests | 503s retried | tickets/s | p50 ms | p95 ms | max ms | throughput vs baseline |\n\
         |---|---|---|---|---|---|---|---|\n",
        command.join(" "),
        super::common::machine(),
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        args.workers,
        args.queue,
        args.incidents.display(),
        levels[0].concurrency,
    );
    for l in &levels {
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2}x |\n",
            l.concurrency,
            l.requests,
            l.retried_503,
            l.tickets_per_s,
            l.p50_ms,
            l.p95_ms,
            l.max_ms,
            l.tickets_per_s / base
        ));
    }
    super::common::write_section(&args.out, "serve", &md, &levels)?;
    eprintln!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Serves `state` on a loopback port and sends `n` requests from `clients` clients.
async fn load(state: Arc<AppState>, texts: &[String], n: usize, clients: usize) -> anyhow::Result<Level> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/tickets", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(triage_serve::serve(listener, state, async move {
        let _ = rx.await;
    }));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()?;
    let sem = Arc::new(tokio::sync::Semaphore::new(clients.max(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (http, url, sem) = (http.clone(), url.clone(), sem.clone());
        let text = texts[i % texts.len()].clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await?;
            let t = Instant::now();
            let mut busy = 0;
            loop {
                let r = http
                    .post(&url)
                    .json(&serde_json::json!({ "text": text }))
                    .send()
                    .await?;
                match r.status().as_u16() {
                    200 => return anyhow::Ok((t.elapsed().as_secs_f64() * 1000.0, busy)),
                    503 => {
                        busy += 1;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    s => bail!("request {i}: status {s}: {}", r.text().await.unwrap_or_default()),
                }
            }
        }));
    }
    let mut ms = Vec::new();
    let mut retried = 0;
    for t in tasks {
        let (m, b) = t.await??;
        ms.push(m);
        retried += b;
    }
    let wall = t0.elapsed().as_secs_f64();
    let _ = tx.send(());
    server.await??;
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    Ok(Level {
        concurrency: clients,
        requests: n,
        tickets: ms.len(),
        retried_503: retried,
        wall_s: wall,
        tickets_per_s: ms.len() as f64 / wall,
        p50_ms: pct(0.5),
        p95_ms: pct(0.95),
        max_ms: pct(1.0),
    })
}
