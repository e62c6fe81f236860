//! `triage eval`: baselines, zero-shot and adapter side by side on one labelled set.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use triage_data::{parse_examples, read_examples};
use triage_eval::journal::Journal;
use triage_eval::report;
use triage_eval::run::{run_baseline, run_llm, Resume, SystemRun};
use triage_infer::{Structurer, PROMPT_VERSION};
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
    /// Report folder (report.json, report.md, report.html, confusion-*.svg). Every decoded
    /// example is also journaled there as it is made (`journal-<system>.jsonl`).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Continue an interrupted evaluation into the same `--out`: each system keeps the
    /// examples its journal holds, when the journal was written for the same model, adapter,
    /// calibration and taxonomy (otherwise that system starts over), up to the first example
    /// whose id or text differs. So a data file that grew at its end, or whose labels were
    /// corrected, decodes only what is new. Kept examples are scored against the labels as
    /// they are now; their latencies are the ones measured when they were decoded.
    #[arg(long)]
    resume: bool,
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

/// A journal key: the SHA-256 (hex) of `parts`, each length-prefixed.
pub(crate) fn journal_key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// [`journal_key`] of `parts` and, from prompt version 2 on, the prompt version: a record
/// decoded under another system prompt is not reused. Journals of version 1 predate the rule
/// and keep their keys.
pub(crate) fn prompt_key(parts: &[&[u8]], prompt_version: u32) -> String {
    if prompt_version <= 1 {
        return journal_key(parts);
    }
    let version = format!("prompt-v{prompt_version}");
    let mut parts = parts.to_vec();
    parts.push(version.as_bytes());
    journal_key(&parts)
}

/// A labelled data file, read once: its examples, what the journals of a run over it are keyed
/// on besides the system itself, and the file's SHA-256.
pub(crate) struct LabelledData {
    /// The examples, in file order.
    pub examples: Vec<triage_data::Example>,
    /// The journal key part of records that depend on the labels (calibration's decisions):
    /// the taxonomy and the whole file (and the prompt version, [`prompt_key`]).
    pub key: Vec<u8>,
    /// The journal key part of decoded tickets (`eval`): the taxonomy (and the prompt
    /// version, [`prompt_key`]) only. Each entry is keyed by its text
    /// ([`triage_eval::run::journal_id`]), and its labels are read from the file, so a grown
    /// or relabelled file keeps what was decoded.
    pub tickets_key: Vec<u8>,
    /// The SHA-256 (hex) of the file's bytes (`report.json`'s `dataset_sha256`).
    pub sha256: String,
}

impl LabelledData {
    /// Reads and validates `path` against `taxonomy`.
    pub(crate) fn read(taxonomy: &triage_taxonomy::Taxonomy, path: &std::path::Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let examples = parse_examples(&bytes, path, &Validator::new(taxonomy))?;
        let taxonomy = serde_json::to_vec(taxonomy)?;
        Ok(Self {
            examples,
            key: prompt_key(&[&taxonomy, &bytes], PROMPT_VERSION).into_bytes(),
            tickets_key: prompt_key(&[&taxonomy], PROMPT_VERSION).into_bytes(),
            sha256: triage_data::sha256_hex(&bytes),
        })
    }
}

/// The journal of system `name` in the report folder, opened for `examples` under `key`
/// (see [`EvalArgs::resume`]).
fn journal(
    args: &EvalArgs,
    name: &str,
    key: &str,
    examples: &[triage_data::Example],
) -> anyhow::Result<Resume> {
    let slug = triage_eval::report::file_slug(name);
    let path = args.out.join(format!("journal-{slug}.jsonl"));
    let ids = triage_eval::run::journal_ids(examples);
    let (j, kept) = Journal::open(&path, key, &ids, args.resume)?;
    if !kept.is_empty() {
        eprintln!(
            "{name}: resuming after {} of {} examples ({})",
            kept.len(),
            examples.len(),
            path.display()
        );
    }
    Ok((j, kept))
}

/// Runs `triage eval`.
pub fn run(cli: &Cli, args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let LabelledData {
        mut examples,
        tickets_key: common,
        sha256,
        ..
    } = LabelledData::read(&taxonomy, &args.data)?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    if examples.is_empty() {
        anyhow::bail!("{}: no examples to evaluate", args.data.display());
    }
    let mut runs: Vec<SystemRun> = Vec::new();
    let mut leaks = Vec::new();
    if let Some(path) = &args.train {
        let train = read_examples(path, &Validator::new(&taxonomy))?;
        leaks.push(report::TrainOverlap::check(
            "the baseline's",
            &path.display().to_string(),
            &train,
            &examples,
            triage_data::split::SPLIT_NEAR_DUP,
        ));
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
        // A server's model can change behind the same URL: its journal is keyed on the
        // request, and `--resume` trusts the server to be the one it was. (Not on the timeout:
        // a timed-out example is never journaled, so a longer one decodes just those again.)
        let key = journal_key(&[
            b"backend",
            label.as_bytes(),
            format!("{:?}", args.backend.backend).as_bytes(),
            &common,
        ]);
        let resume = journal(args, &label, &key, &examples)?;
        runs.push(decode(&label, &remote, &examples, args.batch_size, resume)?);
        return finish(&taxonomy, args, &sha256, &examples, &runs, leaks);
    }
    let (gguf, base, model_path) =
        crate::train_cmd::base_structurer(cli, taxonomy.clone(), &args.device.spec, false)?;
    let model_sha = crate::model_cmd::model_sha256(cli, &model_path)?;
    // CPU and GPU arithmetic differ in rounding, so their tickets can: a run resumed on the
    // other kind of device starts that system over.
    let device: &[u8] = match args.device.spec.as_str() {
        "cpu" => b"cpu",
        _ => b"cuda",
    };
    if !args.no_zero_shot {
        let key = journal_key(&[b"zero-shot", model_sha.as_bytes(), device, &common]);
        let resume = journal(args, "zero-shot", &key, &examples)?;
        runs.push(decode("zero-shot", &base, &examples, args.batch_size, resume)?);
    }
    if let Some(r) = crate::adapter_cmd::resolve(cli, &args.adapter, &base, &model_path)? {
        leaks.push(adapter_leak_check(&r, &taxonomy, &examples));
        let label = r.label();
        let key = journal_key(&[
            label.as_bytes(),
            model_sha.as_bytes(),
            device,
            r.key.as_bytes(),
            &common,
        ]);
        let tuned = r.apply(Structurer::with_model(
            base.model().clone(),
            &gguf,
            taxonomy.clone(),
            base.options().clone(),
        )?);
        let resume = journal(args, &label, &key, &examples)?;
        runs.push(decode(&label, &tuned, &examples, args.batch_size, resume)?);
    }
    finish(&taxonomy, args, &sha256, &examples, &runs, leaks)
}

/// The leak check against the training file adapter `r`'s `triage.json` records (a path as
/// given to `triage train`, so relative to where it ran), when it is here with the recorded
/// bytes; else the reason it cannot be made.
fn adapter_leak_check(
    r: &crate::adapter_cmd::Resolved,
    taxonomy: &triage_taxonomy::Taxonomy,
    examples: &[triage_data::Example],
) -> report::TrainOverlap {
    let of = format!("adapter {}'s", r.name);
    let unchecked = |file: &str, why: &str| report::TrainOverlap::unchecked(&of, file, why);
    let meta = match triage_train::adapter::read_meta(&r.dir) {
        Ok(m) => m,
        Err(e) => return unchecked("", &format!("{e}")),
    };
    let Some(f) = meta.data.iter().find(|d| d.role == "train") else {
        let why = if meta.data.is_empty() {
            "its triage.json records no training file: an adapter of an older triage"
        } else {
            "trained on a split of one uploaded dataset"
        };
        return unchecked("", why);
    };
    let path = std::path::Path::new(&f.file);
    match triage_data::read_examples_and_bytes(path, &Validator::new(taxonomy)) {
        Err(_) if !path.exists() => unchecked(&f.file, "the file is not here"),
        Err(e) => unchecked(&f.file, &format!("cannot read it: {e}")),
        Ok((_, bytes)) if !triage_data::sha256_hex(&bytes).eq_ignore_ascii_case(&f.sha256) => {
            unchecked(&f.file, "its bytes are not the ones the adapter was trained on")
        }
        Ok((train, _)) => {
            report::TrainOverlap::check(&of, &f.file, &train, examples, triage_data::split::SPLIT_NEAR_DUP)
        }
    }
}

/// [`run_llm`] with a progress bar, journaled, stopped by Ctrl-C.
fn decode(
    name: &str,
    engine: &dyn triage_infer::TicketEngine,
    examples: &[triage_data::Example],
    batch_size: usize,
    resume: Resume,
) -> anyhow::Result<SystemRun> {
    crate::batch::install_ctrlc();
    let b = bar(examples.len(), name.split(' ').next().unwrap_or(name));
    let run = run_llm(
        name,
        engine,
        examples,
        batch_size,
        Some(resume),
        &crate::batch::stop_requested,
        &mut |i| b.set_position(i as u64),
    );
    b.finish_and_clear();
    Ok(run?)
}

/// Writes the report of `runs` over the data file with SHA-256 `sha256` and prints one line
/// per system.
fn finish(
    taxonomy: &triage_taxonomy::Taxonomy,
    args: &EvalArgs,
    sha256: &str,
    examples: &[triage_data::Example],
    runs: &[SystemRun],
    leak_checks: Vec<report::TrainOverlap>,
) -> anyhow::Result<ExitCode> {
    let mut r = report::build(taxonomy, &args.data.display().to_string(), examples, runs);
    r.dataset_sha256 = Some(sha256.to_owned());
    for o in &leak_checks {
        eprintln!("{}", o.sentence(examples.len()).replace("**", ""));
    }
    r.leak_checks = leak_checks;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_are_keyed_on_the_prompt_version_from_version_2_on() {
        let parts: [&[u8]; 2] = [b"taxonomy", b"data"];
        // Version 1 journals (every one written so far) keep their keys.
        assert_eq!(prompt_key(&parts, 1), journal_key(&parts));
        assert_ne!(prompt_key(&parts, 2), prompt_key(&parts, 1));
        assert_ne!(prompt_key(&parts, 2), prompt_key(&parts, 3));
        assert_eq!(prompt_key(&parts, 2), prompt_key(&parts, 2));
    }
}
