//! `triage bench train`: training-step speed and peak memory on this machine, for each model
//! and sequence length, with per-layer recomputation (the default) against the whole-graph
//! baseline measured in the same run. Each configuration runs in its own child process (this
//! binary, `--one`), so each peak RSS belongs to that configuration alone.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use triage_train::bench::{step_bench, StepBenchResult, StepBenchSpec};
use triage_train::memory::{estimate, MemoryInputs};
use triage_train::trainer::TrainConfig;

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
    /// Internal, with `--one`: the whole-graph baseline instead of recomputation.
    #[arg(long, hide = true)]
    whole_graph: bool,
}

/// One configuration's line of the report.
#[derive(Serialize, Deserialize)]
struct Row {
    model: String,
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
            for whole in [true, false] {
                let label = if whole { "whole graph" } else { "recomputation" };
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
                if whole {
                    cmd.arg("--whole-graph");
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
    crate::bench::write_section(&args.out, "train", &md, &rows)?;
    eprintln!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Measures one configuration in this process.
fn one(cli: &Cli, args: &BenchTrainArgs, config: &TrainConfig) -> anyhow::Result<Row> {
    let (Some(model), Some(&seq)) = (cli.model.as_ref(), args.seq.first()) else {
        bail!("--one needs --model and a length");
    };
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let (_gguf, base, path) = crate::train_cmd::base_structurer(cli, taxonomy, "cpu")?;
    let prefix = base.prefix_cache()?;
    let spec = StepBenchSpec {
        seq,
        answer: args.answer,
        batch: args.batch,
        steps: args.steps,
        checkpointing: !args.whole_graph,
    };
    let result = step_bench(base.model(), &prefix, config, &spec)?;
    let est = estimate(&MemoryInputs {
        cfg: base.model().config().clone(),
        weight_bytes: std::fs::metadata(&path)?.len(),
        lora: config.lora(),
        batch: args.batch,
        seq_len: seq,
        prefix_len: base.prefix_tokens().len(),
        logit_positions: args.answer + 1,
        checkpointing: spec.checkpointing,
        head_chunk: config.head_chunk,
    });
    Ok(Row {
        model: model.clone(),
        result,
        peak_rss_mib: crate::bench::peak_rss_mib(),
        estimate_mib: est.total as f64 / (1024.0 * 1024.0),
        prefix_tokens: base.prefix_tokens().len(),
    })
}

fn markdown(args: &BenchTrainArgs, rows: &[Row]) -> String {
    let command: Vec<String> = std::env::args().skip(1).collect();
    let mut md = format!(
        "## Training (QLoRA step)\n\nWritten by `triage {}` (see `crates/triage/src/bench_train.rs`); {}. \
         Each configuration runs in its own process: one warm-up step, then {} timed AdamW steps on one \
         fixed batch of {} sequence(s), the last {} tokens of each being the loss positions, attending to \
         the real system prompt (its KV cache computed once, not timed). Tokens/s counts the tokens after \
         the system prompt. Peak RSS is the process's VmHWM (model, prompt cache and all). Ratios are \
         recomputation against the whole-graph baseline of the same model and length, measured in the \
         same run. The estimate is `triage train --dry-run`'s.\n\n",
        command.join(" "),
        crate::bench::machine(),
        args.steps,
        args.batch,
        args.answer,
    );
    md.push_str(
        "| model | tokens | graph | s/step | train tok/s | peak RSS MiB | estimate MiB | loss first → last | tok/s ratio | RSS ratio |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for pair in rows.chunks(2) {
        let base = &pair[0];
        for r in pair {
            let (res, losses) = (&r.result, &r.result.losses);
            md.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.3} → {:.3} | {:.2}x | {:.2}x |\n",
                r.model,
                res.spec.seq,
                if res.spec.checkpointing {
                    "recomputation"
                } else {
                    "whole (baseline)"
                },
                res.step_s,
                res.tokens_per_s,
                r.peak_rss_mib,
                r.estimate_mib,
                losses.first().copied().unwrap_or(f64::NAN),
                losses.last().copied().unwrap_or(f64::NAN),
                res.tokens_per_s / base.result.tokens_per_s,
                r.peak_rss_mib / base.peak_rss_mib,
            ));
        }
    }
    md
}
