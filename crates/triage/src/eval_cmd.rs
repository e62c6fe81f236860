//! `triage eval`: baselines, zero-shot and adapter side by side on one labelled set.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use triage_data::read_examples;
use triage_eval::report;
use triage_eval::run::{run_baseline, run_llm, SystemRun};
use triage_infer::Structurer;
use triage_taxonomy::Validator;

use crate::Cli;

/// `triage eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Labelled examples to evaluate on (canonical JSONL, e.g. a test split).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Training examples for the TF-IDF baseline (same taxonomy); without it no baseline.
    #[arg(long, value_name = "FILE")]
    train: Option<PathBuf>,
    /// The adapter system: `--adapter DIR`, else the default adapter for this taxonomy and
    /// model (`--no-adapter`: none).
    #[command(flatten)]
    adapter: crate::adapter_cmd::AdapterArgs,
    /// With `--backend openai:URL` the server is the one system evaluated besides the
    /// baseline (named after `--backend-model`).
    #[command(flatten)]
    backend: crate::backend_cmd::BackendArgs,
    /// Skip the base model without adapter.
    #[arg(long)]
    no_zero_shot: bool,
    /// Evaluate only the first N examples.
    #[arg(long)]
    limit: Option<usize>,
    /// Report folder (report.json, report.md, report.html, confusion-*.svg).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    device: crate::backend_cmd::DeviceArgs,
    /// Examples decoded at once, sharing every forward pass (1: one at a time; the tickets
    /// are the same).
    #[arg(long, default_value_t = triage_infer::DEFAULT_BATCH_SIZE,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    batch_size: usize,
}

/// A progress bar over `len` examples, labelled `name` (also `adapter calibrate`'s).
pub(crate) fn bar(len: usize, name: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len}  ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_prefix(name.to_owned());
    b
}

/// Runs `triage eval`.
pub fn run(cli: &Cli, args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let validator = Validator::new(&taxonomy);
    let mut examples = read_examples(&args.data, &validator)?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    if examples.is_empty() {
        anyhow::bail!("{}: no examples to evaluate", args.data.display());
    }
    let mut runs: Vec<SystemRun> = Vec::new();
    if let Some(train) = &args.train {
        let train = read_examples(train, &validator)?;
        eprintln!("tfidf-baseline: fitting on {} examples", train.len());
        runs.push(run_baseline(&taxonomy, &train, &examples, 7));
    }
    let defaults = triage_infer::StructurerOptions::default();
    let remote = crate::backend_cmd::remote(
        &args.backend,
        taxonomy.clone(),
        || crate::backend_cmd::model_tokenizer(cli),
        defaults.max_new_tokens,
        defaults.max_input_tokens,
        None,
    )?;
    if let Some(remote) = remote {
        let label = format!("backend {}", args.backend.backend_model);
        let b = bar(examples.len(), "backend");
        runs.push(run_llm(&label, &remote, &examples, args.batch_size, &mut |i| {
            b.set_position(i as u64)
        }));
        b.finish_and_clear();
        return finish(&taxonomy, args, &examples, &runs);
    }
    let (gguf, base, model_path) =
        crate::train_cmd::base_structurer(cli, taxonomy.clone(), &args.device.spec, false)?;
    if !args.no_zero_shot {
        let b = bar(examples.len(), "zero-shot");
        runs.push(run_llm(
            "zero-shot",
            &base,
            &examples,
            args.batch_size,
            &mut |i| b.set_position(i as u64),
        ));
        b.finish_and_clear();
    }
    if let Some(r) = crate::adapter_cmd::resolve(cli, &args.adapter, &base, &model_path)? {
        let label = r.label();
        let tuned = r.apply(Structurer::with_model(
            base.model().clone(),
            &gguf,
            taxonomy.clone(),
            base.options().clone(),
        )?);
        let b = bar(examples.len(), "adapter");
        runs.push(run_llm(&label, &tuned, &examples, args.batch_size, &mut |i| {
            b.set_position(i as u64)
        }));
        b.finish_and_clear();
    }
    finish(&taxonomy, args, &examples, &runs)
}

/// Writes the report of `runs` and prints one line per system.
fn finish(
    taxonomy: &triage_taxonomy::Taxonomy,
    args: &EvalArgs,
    examples: &[triage_data::Example],
    runs: &[SystemRun],
) -> anyhow::Result<ExitCode> {
    let r = report::build(taxonomy, &args.data.display().to_string(), examples, runs);
    report::write(&args.out, &r, runs)?;
    for s in &r.systems {
        let fields: Vec<String> = s
            .fields
            .iter()
            .map(|f| format!("{} {:.1}%", f.field, 100.0 * f.accuracy))
            .collect();
        println!(
            "{:<15} {}  | valid {:.1}% | p50 {:.0} ms",
            s.name,
            fields.join(", "),
            100.0 * s.validity_rate,
            s.latency_p50_ms
        );
    }
    eprintln!("report written to {}/report.{{json,md,html}}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
