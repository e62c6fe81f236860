//! `triage bench train`: training speed and peak memory on this machine, for each model and
//! sequence length: the configured training path (`configs/train.toml`: adapter on the top
//! layers with their input computed once, loss on the decisions, dense weight copies, tuned
//! allocator) against the path of the first release, measured in the same run (adapter on
//! every layer, plain token loss, weights dequantized in every backward pass, per-layer
//! recomputation, glibc's default allocator settings). Each configuration runs in its own
//! child process (this binary, `--one`), so each peak RSS belongs to that configuration alone.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use triage_train::bench::{step_bench, StepBenchResult, StepBenchSpec};
use triage_train::trainer::{Objective, TrainConfig};

use crate::Cli;

/// Options of `triage bench train`.
#[derive(Args)]
pub struct BenchTrainArgs {
    /// Models (registry names or paths), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.5b,1.5b")]
    models: Vec<String>,
    /// Sequence lengths after the system prompt, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    seq: Vec<usize>,
    /// Answer (loss) tokens at the end of each sequence.
    #[arg(long, default_value_t = 96)]
    answer: usize,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed optimizer steps per configuration (after one warm-up step).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Training configuration (rank, targets, head chunk).
    #[arg(long, default_value = "configs/train.toml")]
    config: PathBuf,
    /// Markdown report; its `train` section is rewritten, JSON beside it.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Internal: run one configuration (`--model`, the first length) and print its JSON.
    #[arg(long, hide = true)]
    one: bool,
    /// Internal, with `--one`: the first release's training path instead of the configured one.
    #[arg(long, hide = true)]
    baseline: bool,
}

/// The training path of the first release (the baseline): adapter on every layer, token
/// loss, no dense copies, per-layer recomputation, composed differentiable primitives; rank,
/// targets and head chunk from `config`.
fn baseline_config(config: &TrainConfig) -> TrainConfig {
    TrainConfig {
        top_layers: 0,
        objective: Objective::Tokens,
        dense_weights: false,
        checkpointing: true,
        composed_ops: true,
        ..config.clone()
    }
}

/// One configuration's line of the report.
#[derive(Serialize, Deserialize)]
struct Row {
    model: String,
    baseline: bool,
    result: StepBenchResult,
    peak_rss_mib: f64,
    estimate_mib: f64,
    prefix_tokens: usize,
}

pub fn run(cli: &Cli, args: &BenchTrainArgs) -> anyhow::Result<ExitCode> {
    let config: TrainConfig = crate::train_cmd::read_config(&args.config)?;
    if args.one {
        let row = one(cli, args, &config)?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().context("cannot locate the triage binary")?;
    let mut rows: Vec<Row> = Vec::new();
    for model in &args.models {
        for &seq in &args.seq {
            for baseline in [true, false] {
                let label = if baseline {
                    "first release's path"
                } else {
                    "configured path"
                };
                eprintln!("== {model}, {seq} tokens, {label}");
                let mut cmd = Command::new(&exe);
                cmd.args(["--model", model, "bench", "train", "--one"])
                    .args(["--seq", &seq.to_string(), "--answer", &args.answer.to_string()])
                    .args([
                        "--batch",
                        &args.batch.to_string(),
                        "--steps",
                        &args.steps.to_string(),
                    ])
                    .arg("--config")
                    .arg(&args.config)
                    .stderr(Stdio::inherit())
                    .stdout(Stdio::piped());
                if baseline {
                    // The first release ran with glibc's default allocator settings.
                    cmd.arg("--baseline").env(crate::alloc::DEFAULT_ENV, "1");
                }
                for (env, v) in [
                    ("TRIAGE_TAXONOMY", &cli.taxonomy),
                    ("TRIAGE_REGISTRY", &cli.registry),
                    ("TRIAGE_CACHE_DIR", &cli.cache_dir),
                ] {
                    if let Some(v) = v {
                        cmd.env(env, v);
                    }
                }
                let out = cmd.output().context("cannot start the benchmark child")?;
                if !out.status.success() {
                    bail!(
                        "benchmark child for {model}, {seq} tokens, {label} failed ({})",
                        out.status
                    );
                }
                let row: Row =
                    serde_json::from_slice(&out.stdout).context("benchmark child printed no result")?;
                rows.push(row);
            }
        }
    }
    let md = markdown(args, &rows);
    super::common::write_section(&args.out, "train", &md, &rows)?;
    eprintln!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Measures one configuration in this process.
fn one(cli: &Cli, args: &BenchTrainArgs, config: &TrainConfig) -> anyhow::Result<Row> {
    let (Some(model), Some(&seq)) = (cli.model.as_ref(), args.seq.first()) else {
        bail!("--one needs --model and a length");
    };
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let (_gguf, base, path) = crate::train_cmd::base_structurer(cli, taxonomy, "cpu", true)?;
    let prefix = base.prefix_cache()?;
    let spec = StepBenchSpec {
        seq,
        answer: args.answer,
        batch: args.batch,
        steps: args.steps,
    };
    let config = match args.baseline {
        true => baseline_config(config),
        false => config.clone(),
    };
    let result = step_bench(base.model(), &prefix, &config, &spec)?;
    let gguf = triage_llm::GgufFile::open(&path)?;
    let est = crate::train_cmd::dry_run_estimate(
        &gguf,
        &TrainConfig {
            batch_size: args.batch,
            max_tokens: seq,
            ..config.clone()
        },
        false,
    )?;
    Ok(Row {
        model: model.clone(),
        baseline: args.baseline,
        result,
        peak_rss_mib: super::common::peak_rss_mib(),
        estimate_mib: est.total as f64 / (1024.0 * 1024.0),
        prefix_tokens: base.prefix_tokens().len(),
    })
}

fn markdown(args: &BenchTrainArgs, rows: &[Row]) -> String {
    let command: Vec<String> = std::env::args().skip(1).collect();
    let mut md = format!(
        "## Training (QLoRA)\n\nWritten by `triage {}` (see `crates/triage/src/bench/train.rs`); {}. \
         Each configuration runs in its own process: one warm-up step, then {} timed AdamW steps on one \
         fixed batch of {} sequence(s) of pseudo-random text whose last {} tokens are the answer (a real \
         answer's mix: a third free text, half forced by the grammar, a sixth enum choices), attending to \
         the real system prompt (its KV cache computed once, not timed). Tokens/s counts the tokens after \
         the system prompt. *Steps* is the steady state (every epoch after the first); *first epoch* adds \
         the one-off forward pass of the frozen layers for each example. Peak RSS is the process's VmHWM \
         (model, prompt cache, dense copies and all); the estimate is `triage train --dry-run`'s. \
         Baseline: the first release's path (adapter on every layer, token loss, weights dequantized in \
         every backward pass, per-layer recomputation, glibc's default allocator), measured in the same \
         run; ratios are against it.\n\n",
        command.join(" "),
        super::common::machine(),
        args.steps,
        args.batch,
        args.answer,
    );
    md.push_str(
        "| model | tokens | path | adapted layers | s/step | tok/s (steps) | tok/s (first epoch) | peak RSS MiB | estimate MiB | estimate error | loss first → last | tok/s ratio (steps) | tok/s ratio (first epoch) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for pair in rows.chunks(2) {
        let base = &pair[0];
        for r in pair {
            let res = &r.result;
            md.push_str(&format!(
                "| {} | {} | {} | {}–{} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:+.0}% | {:.3} → {:.3} | {:.2}x | {:.2}x |\n",
                r.model,
                res.spec.seq,
                if r.baseline { "first release (baseline)" } else { "configured" },
                res.first_layer,
                res.num_layers - 1,
                res.step_s,
                res.tokens_per_s,
                res.epoch_tokens_per_s,
                r.peak_rss_mib,
                r.estimate_mib,
                100.0 * (r.estimate_mib / r.peak_rss_mib - 1.0),
                res.losses.first().copied().unwrap_or(f64::NAN),
                res.losses.last().copied().unwrap_or(f64::NAN),
                res.tokens_per_s / base.result.tokens_per_s,
                res.epoch_tokens_per_s / base.result.epoch_tokens_per_s,
            ));
        }
    }
    md
}
