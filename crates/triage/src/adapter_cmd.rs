//! `triage adapter`: inspect a trained adapter, or fold it into the base model as a merged GGUF.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use triage_eval::journal::Journal;
use triage_eval::run::{Resume, RunError};
use triage_infer::calibration::{self, Calibration};
use triage_infer::FieldConfidence;
use triage_llm::GgufFile;
use triage_taxonomy::Taxonomy;
use triage_train::adapter;
use triage_train::merge::{merge_gguf, MergeOptions};

use crate::Cli;

/// `triage adapter …`
#[derive(Subcommand)]
pub enum AdapterCommand {
    /// List the adapters found in the adapter folders and say which one `infer`, `serve` and
    /// `eval` apply by default for the taxonomy and model in use.
    List,
    /// Print an adapter's PEFT configuration, what it was trained for, and its calibration:
    /// what it was fitted on, its validation figures, and whether it was fitted for these
    /// weights (else `infer`, `serve` and `eval` refuse it).
    Show {
        /// Adapter directory (`adapters/<name>`).
        dir: PathBuf,
        /// Print one JSON document, `{"peft_config": …, "triage": …, "calibration": … or null,
        /// "calibration_weights": "these", "other", "not recorded", "unknown" or null,
        /// "calibration_error": why it cannot be read or checked, or null}`.
        #[arg(long)]
        json: bool,
    },
    /// Fold the adapter into the base model (`--model`) and write a standalone GGUF for
    /// engines without LoRA support. The update then applies to every token, the system
    /// prompt included (`infer --adapter` applies it after the system prompt, as trained).
    Merge {
        /// Adapter directory (`adapters/<name>`).
        dir: PathBuf,
        /// Output GGUF file.
        #[arg(long)]
        out: PathBuf,
        /// Quantize merged projections to Q8_0 (larger file, closer to base + adapter) instead
        /// of their original type.
        #[arg(long)]
        q8_0: bool,
    },
    /// Fit the adapter's calibration on labelled held-out examples (a validation split, never
    /// the test split): per enum field a temperature and a bias per value, so that decisions
    /// lean as the labels do and a confidence of 0.9 is right about 90 % of the time. Written
    /// to `<dir>/calibration.json`, which `infer`, `serve` and `eval` then apply.
    Calibrate(CalibrateArgs),
}

/// `triage adapter calibrate DIR --data FILE …`
#[derive(Args)]
pub struct CalibrateArgs {
    /// Adapter directory (`adapters/<name>`).
    dir: PathBuf,
    /// Labelled examples (canonical JSONL of the adapter's taxonomy).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Use only the first N examples.
    #[arg(long)]
    limit: Option<usize>,
    /// Where to write the calibration (default: `<dir>/calibration.json`).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The decoded scores (JSONL, one decision per line): written after decoding, or,
    /// when the file exists, read instead of decoding (refitting without the model), provided
    /// `FILE.key` says it was decoded with this model, adapter and data. While
    /// decoding, every example is journaled in `FILE.partial`, so an interrupted run started
    /// again with the same arguments continues where it stopped (also with another `--limit`,
    /// until a run finishes and removes the journal).
    #[arg(long, value_name = "FILE")]
    scores: Option<PathBuf>,
    /// Examples decoded at once, sharing every forward pass.
    #[arg(long, default_value_t = triage_infer::DEFAULT_BATCH_SIZE,
    value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    batch_size: usize,
    /// Fit a temperature per field only, no value biases: every decision stays as the
    /// adapter makes it and only the confidences move (biases fitted on one set of
    /// scenarios can cost accuracy on others).
    #[arg(long)]
    temperature_only: bool,
}

/// Choosing the adapter of `infer`, `serve` and `eval`.
#[derive(Args, Clone, Default)]
pub struct AdapterArgs {
    /// LoRA adapter folder written by `triage train` (PEFT files + triage.json). Default: the
    /// shipped adapter trained for the taxonomy and model in use, if one is found
    /// (`triage adapter list` shows where it looks).
    #[arg(long, value_name = "DIR", conflicts_with = "no_adapter")]
    pub adapter: Option<PathBuf>,
    /// Use the base model alone, without the default adapter.
    #[arg(long)]
    pub no_adapter: bool,
    /// Apply the adapter without its `calibration.json` (the enum scores as the adapted
    /// model gives them).
    #[arg(long)]
    pub no_calibration: bool,
}

/// The adapter [`resolve`] chose, with its calibration.
pub struct Resolved {
    /// Its folder's name.
    pub name: String,
    /// Its folder.
    pub dir: PathBuf,
    /// The LoRA weights.
    pub lora: triage_llm::lora::Lora,
    /// `calibration.json` from its folder, unless absent or `--no-calibration`.
    pub calibration: Option<Calibration>,
    /// The SHA-256 of its files (weights, PEFT configuration, calibration when applied): what
    /// an evaluation journal of this adapter is keyed on.
    pub key: String,
}

impl Resolved {
    /// `s` with this adapter and its calibration applied.
    pub fn apply(self, s: triage_infer::Structurer) -> triage_infer::Structurer {
        let s = s.with_adapter(Arc::new(self.lora));
        match self.calibration {
            Some(c) => s.with_calibration(Arc::new(c)),
            None => s,
        }
    }

    /// The system's name in reports: `adapter <name>`, marked when calibrated.
    pub fn label(&self) -> String {
        match self.calibration {
            Some(_) => format!("adapter {} calibrated", self.name),
            None => format!("adapter {}", self.name),
        }
    }
}

impl Resolved {
    /// `lora`, loaded from adapter folder `dir`, with the folder's name and the calibration
    /// kept there, if it has one and `args` allow it.
    fn new(args: &AdapterArgs, dir: &Path, lora: triage_llm::lora::Lora) -> anyhow::Result<Self> {
        let name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        let path = dir.join(calibration::FILE_NAME);
        let calibration = if args.no_calibration || !path.exists() {
            None
        } else {
            let cal = Calibration::read(&path)?;
            check_fitted_for(&cal, &path, dir)?;
            tracing::info!(file = %path.display(), fields = cal.fields.len(), "calibrating the enum scores (--no-calibration: off)");
            Some(cal)
        };
        let mut files = vec![
            dir.join("adapter_model.safetensors"),
            dir.join("adapter_config.json"),
        ];
        if calibration.is_some() {
            files.push(path);
        }
        Ok(Resolved {
            name,
            dir: dir.to_path_buf(),
            lora,
            calibration,
            key: files_key(&files)?,
        })
    }
}

/// The SHA-256 of adapter folder `dir`'s weights (`adapter_model.safetensors`): what a
/// calibration records as the weights it was fitted for.
fn weights_sha256(dir: &Path) -> anyhow::Result<String> {
    let f = dir.join("adapter_model.safetensors");
    triage_registry::sha256_file(&f, &indicatif::ProgressBar::hidden())
        .with_context(|| format!("cannot read {}", f.display()))
}

/// An error when calibration `cal` (read from `path`) was fitted for other weights than the
/// adapter's in `dir` (weights replaced after calibrating, or a calibration copied from
/// another adapter). A file of an older triage, which does not record them, is applied.
fn check_fitted_for(cal: &Calibration, path: &Path, dir: &Path) -> anyhow::Result<()> {
    match fitted_for(cal, dir)? {
        FittedFor::These => Ok(()),
        FittedFor::NotRecorded => {
            tracing::debug!(file = %path.display(), "the calibration does not record its adapter's weights (older triage)");
            Ok(())
        }
        FittedFor::Other { fitted, actual } => anyhow::bail!(
            "{}: fitted for other adapter weights (sha256 {fitted}) than {}'s (sha256 {actual}), \
             so it would move this adapter's decisions at random; refit it with `triage adapter \
             calibrate {} --data <validation split>`, or run with --no-calibration",
            path.display(),
            dir.join("adapter_model.safetensors").display(),
            dir.display()
        ),
    }
}

/// Which weights a calibration was fitted for, against the adapter folder's.
enum FittedFor {
    /// The folder's weights.
    These,
    /// Other weights: `fitted` (recorded) is not `actual` (the folder's).
    Other { fitted: String, actual: String },
    /// The file does not record them (written by a triage older than the record).
    NotRecorded,
}

/// Whether calibration `cal` was fitted for the weights in adapter folder `dir` (hashes
/// compared without regard to case).
fn fitted_for(cal: &Calibration, dir: &Path) -> anyhow::Result<FittedFor> {
    let Some(fitted) = &cal.adapter_sha256 else {
        return Ok(FittedFor::NotRecorded);
    };
    let actual = weights_sha256(dir)?;
    Ok(if fitted.eq_ignore_ascii_case(&actual) {
        FittedFor::These
    } else {
        FittedFor::Other {
            fitted: fitted.clone(),
            actual,
        }
    })
}

/// Whether calibration `cal` was written before nested cross-validation: such a file records
/// no weights, holds the chosen-on figures in "after", leaves `*_chosen_on` at zero (see
/// `FitSummary`) and lists no fields left alone.
fn predates_nested(cal: &Calibration) -> bool {
    cal.adapter_sha256.is_none()
        && cal
            .summaries()
            .values()
            .any(|f| f.nll_chosen_on == 0.0 && f.nll_before > 0.0)
}

/// Calibration `cal`'s validation figures, one line per enum field (calibrated or left
/// alone), as `calibrate` prints them, with what "after" means (`older`: as in a file
/// written before nested cross-validation, [`predates_nested`]).
fn fit_table(cal: &Calibration, older: bool) -> String {
    let summaries = cal.summaries();
    let mut out = String::from(
        "field               decisions  accuracy before → after   NLL before → after   temperature  biases\n",
    );
    for (field, f) in &summaries {
        let (temperature, biases) = cal.fields.get(*field).map_or_else(
            || ("not calibrated".to_owned(), ""),
            |c| {
                (
                    format!("{:.2}", c.temperature),
                    if c.bias.is_empty() { "no" } else { "yes" },
                )
            },
        );
        out.push_str(&format!(
            "{field:<20}{:>9}   {:>6.1}% → {:>5.1}%       {:>6.3} → {:>6.3}      {temperature:<12} {biases}\n",
            f.decisions + f.unreachable,
            100.0 * f.accuracy_before,
            100.0 * f.accuracy_after,
            f.nll_before,
            f.nll_after
        ));
    }
    if summaries.is_empty() {
        out.push_str("(no enum field had decisions to fit on)\n");
        return out;
    }
    if older {
        out.push_str(
            "(written by an older triage: \"after\" is the out-of-fold figure the choice was made \
             on, not a nested estimate, and a dependent field's decisions under a wrong parent \
             value were left out; `triage adapter calibrate` refits it with today's figures)\n",
        );
        return out;
    }
    // Fields without folds had too few decisions or example groups: nothing was fitted there.
    let unfolded: Vec<&str> = summaries
        .iter()
        .filter(|(_, s)| s.folds == Some(0))
        .map(|(f, _)| *f)
        .collect();
    if unfolded.len() == summaries.len() {
        out.push_str(
            "(too few decisions or example groups to cross-validate: nothing was fitted, and \
             \"after\" is \"before\")\n",
        );
        return out;
    }
    // Fields whose nested estimate scored the identity in some folds (the other folds were
    // too few to choose on there).
    let partly: Vec<String> = summaries
        .iter()
        .filter(|(_, s)| s.unfolded_inner > 0)
        .map(|(f, s)| format!("{f} in {}", s.unfolded_inner))
        .collect();
    // Files written before the folds were recorded were fitted with the default number.
    let k = summaries
        .values()
        .filter_map(|s| s.folds)
        .max()
        .unwrap_or(calibration::FitOptions::default().folds);
    out.push_str(&format!(
        "(\"after\": out of fold, by nested {k}-fold cross-validation on these examples, each example \
         group in one fold: the choice of temperature, biases and penalty is made again without \
         each held-out fold, so it estimates the fitting procedure, and for a field not calibrated \
         it can differ from \"before\". Accuracy over every decision, one under a wrong parent \
         value counted wrong; NLL over the others{})\n",
        match unfolded.is_empty() {
            true => String::new(),
            false => format!(
                ". {}: too few decisions or example groups for folds, so nothing was fitted and \
                 \"after\" is \"before\"",
                unfolded.join(", ")
            ),
        } + &match partly.is_empty() {
            true => String::new(),
            false => format!(
                ". Folds whose others were too few to choose on, scored uncalibrated: {}",
                partly.join(", ")
            ),
        }
    ));
    out
}

/// The SHA-256 of `files`' contents, each named and length-prefixed.
fn files_key(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut parts = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        parts.push(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .into_bytes(),
        );
        parts.push(bytes);
    }
    Ok(crate::eval_cmd::journal_key(
        &parts.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    ))
}

/// Where default adapters are looked for, in order: `$TRIAGE_ADAPTERS`, `./adapters`, the
/// user's data folder (`$XDG_DATA_HOME/triage/adapters`, else `~/.local/share/triage/adapters`),
/// and the `adapters/` folder of the source tree this binary was built from; a folder that is
/// an earlier one under another name (run from the source tree) is listed once.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("TRIAGE_ADAPTERS") {
        dirs.extend(std::env::split_paths(&v));
    }
    dirs.push(PathBuf::from("adapters"));
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    if let Some(d) = data {
        dirs.push(d.join("triage").join("adapters"));
    }
    dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../adapters"));
    let mut seen = Vec::new();
    dirs.retain(|d| match d.canonicalize() {
        Ok(real) if seen.contains(&real) => false,
        Ok(real) => {
            seen.push(real);
            true
        }
        Err(_) => true, // not there (listed as not found) or unreadable
    });
    dirs
}

/// The adapter `args` ask for, loaded and checked against the taxonomy, model and prompt
/// version of `structurer`: `--adapter DIR`, else the default one (see [`search_dirs`]), else
/// none; with its folder's name and calibration.
pub fn resolve(
    cli: &Cli,
    args: &AdapterArgs,
    structurer: &triage_infer::Structurer,
    model_path: &Path,
) -> anyhow::Result<Option<Resolved>> {
    if args.no_adapter {
        return Ok(None);
    }
    if let Some(dir) = &args.adapter {
        let lora = crate::train_cmd::load_adapter(cli, dir, structurer, model_path)?;
        return Resolved::new(args, dir, lora).map(Some);
    }
    let file = model_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let found = adapter::find_compatible(&search_dirs(), structurer.taxonomy(), &file);
    let Some((dir, meta)) = found.first() else {
        tracing::info!(
            "no adapter for taxonomy {:?} and {file}: using the base model",
            structurer.taxonomy().name
        );
        return Ok(None);
    };
    let sha = crate::model_cmd::model_sha256(cli, model_path)?;
    adapter::check_base(meta, &sha, dir)?;
    let lora = adapter::load(dir, structurer.model().config(), structurer.model().device())?.lora;
    tracing::info!(
        adapter = %dir.display(),
        "applying the adapter trained for taxonomy {:?} on {file} (--no-adapter for the base model)",
        meta.taxonomy
    );
    Resolved::new(args, dir, lora).map(Some)
}

/// The file beside a `--scores` file with `suffix`: `key` holds its [`scores_keys`], `partial`
/// the journal of its decoding.
fn beside(scores: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}.{suffix}", scores.display()))
}

/// `triage adapter calibrate`: decodes `data` with the adapter (uncalibrated), fits, writes.
fn calibrate(cli: &Cli, args: &CalibrateArgs) -> anyhow::Result<ExitCode> {
    let CalibrateArgs {
        dir,
        data,
        out,
        scores,
        temperature_only,
        ..
    } = args;
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let labelled = crate::eval_cmd::LabelledData::read(&taxonomy, data)?;
    // The weights the scores come from, hashed before they are decoded or read: weights
    // replaced while a long decode runs must not be recorded as the ones fitted for.
    let weights = weights_sha256(dir)?;
    let (mut decisions, examples) = match scores.as_deref() {
        Some(f) if f.exists() => {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
            // `<scores>.key` ties the decisions to the model, adapter and data they were
            // decoded with: decisions of an earlier adapter must not calibrate this one.
            let recorded = std::fs::read_to_string(beside(f, "key")).ok();
            let model_path = crate::model_cmd::model_path(cli)?;
            match recorded.as_deref().map(str::trim) {
                Some(k)
                    if k == scores_keys(
                        cli,
                        dir,
                        &model_path,
                        &labelled.key,
                        first_n(&labelled, args.limit),
                    )?
                    .0 => {}
                Some(_) => anyhow::bail!(
                    "{}: decoded with another model, adapter, data file or --limit than {} and \
                     {}, or by an older triage; delete it (or give another --scores) to decode \
                     again",
                    f.display(),
                    dir.display(),
                    data.display()
                ),
                // Written by an older triage: nothing ties it to this adapter, and its
                // decisions lack the wrong-parent marks.
                None => anyhow::bail!(
                    "{}: no {} beside it (written by an older triage); delete it (or give another \
                     --scores) to decode again",
                    f.display(),
                    beside(f, "key").display()
                ),
            }
            let mut decisions = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let (id, d): (String, calibration::Decision) =
                    serde_json::from_str(line).with_context(|| {
                        format!(
                            "{}:{}: not a decoded decision; delete the file to decode again",
                            f.display(),
                            i + 1
                        )
                    })?;
                decisions.push((id, d));
            }
            let ids: std::collections::BTreeSet<&str> = decisions.iter().map(|(id, _)| id.as_str()).collect();
            eprintln!(
                "{}: {} decisions of {} examples (not decoding)",
                f.display(),
                decisions.len(),
                ids.len()
            );
            let n = ids.len();
            (decisions, n)
        }
        _ => decode_decisions(cli, args, &taxonomy, &labelled)?,
    };
    // The cross-validation keeps each example group (a synthetic scenario) in one
    // fold: the groups come from the data file, which the scores must have been decoded from.
    let groups: HashMap<&str, Option<&String>> = labelled
        .examples
        .iter()
        .map(|e| (e.id.as_str(), e.group.as_ref()))
        .collect();
    for (id, d) in &mut decisions {
        let Some(group) = groups.get(id.as_str()) else {
            anyhow::bail!(
                "{}: example {id:?} of the scores is not in {}; the scores were decoded from \
                 another file (pass that one as --data, or delete the scores to decode again)",
                scores.as_deref().unwrap_or(data).display(),
                data.display()
            );
        };
        d.group = group.cloned();
    }
    let decisions: Vec<calibration::Decision> = decisions.into_iter().map(|(_, d)| d).collect();
    let opts = calibration::FitOptions {
        biases: !temperature_only,
        ..calibration::FitOptions::default()
    };
    let (mut cal, summaries) = calibration::fit(&decisions, &opts);
    cal.fitted_on = format!("{} ({examples} examples)", data.display());
    anyhow::ensure!(
        weights_sha256(dir)? == weights,
        "{}: replaced while calibrating; run the calibration again for the new weights",
        dir.join("adapter_model.safetensors").display()
    );
    cal.adapter_sha256 = Some(weights);
    debug_assert_eq!(summaries.len(), cal.summaries().len());
    print!("{}", fit_table(&cal, false));
    let path = out.clone().unwrap_or_else(|| dir.join(calibration::FILE_NAME));
    triage_data::atomic_write(&path, &serde_json::to_vec_pretty(&cal)?)?;
    eprintln!(
        "wrote {} ({} of {} fields calibrated)",
        path.display(),
        cal.fields.len(),
        summaries.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The enum decisions of one decoded ticket (`decided`: its fields' confidences, with every
/// allowed value's score) against the labels (`gold`: a field's labelled value). A field that
/// depends on another in `taxonomy`, decided under another parent value than the labelled
/// one, is marked: it cannot be right, whatever its value's name (`Other` is under every
/// category), as `triage eval` scores it.
fn decisions_of<'a>(
    decided: &[FieldConfidence],
    gold: impl Fn(&str) -> Option<&'a str>,
    taxonomy: &Taxonomy,
) -> Vec<calibration::Decision> {
    let value = |field: &str| {
        decided
            .iter()
            .find(|c| c.field == field)
            .map(|c| c.value.as_str())
    };
    decided
        .iter()
        .map(|c| calibration::Decision {
            gold: gold(&c.field).unwrap_or_default().to_owned(),
            wrong_parent: taxonomy
                .field(&c.field)
                .and_then(|f| f.dependency.as_ref())
                .is_some_and(|d| value(&d.parent) != gold(&d.parent)),
            field: c.field.clone(),
            candidates: c.scores.clone(),
            group: None, // filled from the data by the caller, not journaled
        })
        .collect()
}

/// How many of the data's examples `--limit` takes (the first ones).
fn first_n(labelled: &crate::eval_cmd::LabelledData, limit: Option<usize>) -> usize {
    labelled.examples.len().min(limit.unwrap_or(usize::MAX))
}

/// What decoded decisions depend on: the base model, the adapter's weights, the data file and
/// how many of its examples (`n`, the first ones), and the record's format (v2: decisions
/// under a wrong parent value are marked). Returns the key of the `--scores` file (in
/// `<scores>.key`) and that of its `.partial` journal, the same without `n`: the journal's
/// records (one per example, in file order) do not depend on `--limit`, so another limit
/// keeps them. The model and adapter are hashed once for both.
fn scores_keys(
    cli: &Cli,
    dir: &Path,
    model_path: &Path,
    data_key: &[u8],
    n: usize,
) -> anyhow::Result<(String, String)> {
    let model = crate::model_cmd::model_sha256(cli, model_path)?;
    let adapter = files_key(&[
        dir.join("adapter_model.safetensors"),
        dir.join("adapter_config.json"),
    ])?;
    let inputs: [&[u8]; 3] = [model.as_bytes(), adapter.as_bytes(), data_key];
    let n = n.to_string();
    let key = |head: &[&[u8]]| crate::eval_cmd::journal_key(&[head, &inputs[..]].concat());
    Ok((
        key(&[&b"calibrate-v2"[..], n.as_bytes()]),
        key(&[&b"calibrate-partial-v2"[..]]),
    ))
}

/// Decodes `labelled` (read from `args.data`) with the adapter in `args.dir` (uncalibrated)
/// and returns every enum decision with its example's id and its label, and the number of
/// examples decoded; with `args.scores`, also writes them there.
fn decode_decisions(
    cli: &Cli,
    args: &CalibrateArgs,
    taxonomy: &Taxonomy,
    labelled: &crate::eval_cmd::LabelledData,
) -> anyhow::Result<(Vec<(String, calibration::Decision)>, usize)> {
    let CalibrateArgs {
        dir,
        data,
        limit,
        batch_size,
        ..
    } = args;
    let (scores, batch_size) = (args.scores.as_deref(), *batch_size);
    let examples = &labelled.examples[..first_n(labelled, *limit)];
    let data_key = &labelled.key;
    if examples.is_empty() {
        anyhow::bail!("{}: no examples to calibrate on", data.display());
    }
    let (_, base, model_path) = crate::train_cmd::base_structurer(cli, taxonomy.clone(), "cpu", false)?;
    let lora = crate::train_cmd::load_adapter(cli, dir, &base, &model_path)?;
    let s = base.with_adapter(Arc::new(lora));
    // One record per example: its decisions, or why it was not decoded.
    type Record = Result<Vec<calibration::Decision>, String>;
    // With --scores: its journal (`<scores>.partial`, keyed without `--limit`: its records
    // are per example, in file order, so an interrupted run restarted with another limit keeps
    // them) and the finished file's key.
    let journaled = scores
        .map(|f| {
            let (key, partial_key) = scores_keys(cli, dir, &model_path, data_key, examples.len())?;
            anyhow::Ok((beside(f, "partial"), key, partial_key))
        })
        .transpose()?;
    let resume: Option<Resume<Record>> = match &journaled {
        Some((partial, _, key)) => {
            let ids = triage_eval::run::journal_ids(examples);
            let (j, kept) = Journal::open(partial, key, &ids, true)?;
            if !kept.is_empty() {
                eprintln!(
                    "{}: resuming after {} decoded examples",
                    partial.display(),
                    kept.len()
                );
            }
            Some((j, kept))
        }
        None => None,
    };
    let bar = crate::eval_cmd::bar(examples.len(), "decoding");
    crate::batch::install_ctrlc();
    let mut transients = 0usize;
    let decoded = triage_eval::run::decode_journaled(
        &s,
        examples,
        batch_size,
        resume,
        &crate::batch::stop_requested,
        &mut |i| bar.set_position(i as u64),
        |e, out, _| -> Record {
            match out {
                Ok(t) => Ok(decisions_of(&t.meta.confidence, |f| e.ticket.get(f), taxonomy)),
                Err(err) => {
                    transients += triage_eval::run::transient(&err) as usize;
                    Err(err.to_string())
                }
            }
        },
    );
    bar.finish_and_clear();
    let records = match decoded {
        Ok(records) => records,
        Err(RunError::Interrupted { done, total, .. }) => anyhow::bail!(
            "interrupted after {done} of {total} examples{}",
            if scores.is_some() {
                "; rerun the same command to continue"
            } else {
                " (--scores FILE keeps them for a rerun)"
            }
        ),
        Err(e) => return Err(e.into()),
    };
    let mut decisions = Vec::new();
    let mut failed = 0usize;
    for (e, r) in examples.iter().zip(records) {
        match r {
            Ok(ds) => decisions.extend(ds.into_iter().map(|d| (e.id.clone(), d))),
            Err(err) => {
                failed += 1;
                tracing::warn!(id = %e.id, "not decoded: {err}");
            }
        }
    }
    if transients > 0 {
        // Fitting on the rest would calibrate on whatever the outage left; the journal
        // keeps what was decoded before it.
        anyhow::bail!(
            "{transients} examples failed with a server, deadline or model error (see the \
             warnings); rerun the same command{}",
            match scores.is_some() {
                true => " to decode them and continue",
                false => " (--scores FILE keeps what was decoded for a rerun)",
            }
        );
    }
    if failed > 0 {
        eprintln!("{failed} examples could not be decoded (see the warnings); fitting on the rest");
    }
    if let (Some(f), Some((partial, key, _))) = (scores, &journaled) {
        let mut lines = String::new();
        for (id, d) in &decisions {
            lines.push_str(&serde_json::to_string(&(id, d))?);
            lines.push('\n');
        }
        triage_data::atomic_write(f, lines.as_bytes())?;
        triage_data::atomic_write(&beside(f, "key"), format!("{key}\n").as_bytes())?;
        let _ = std::fs::remove_file(partial);
    }
    Ok((decisions, examples.len() - failed))
}

pub fn run(cli: &Cli, cmd: &AdapterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AdapterCommand::Calibrate(args) => calibrate(cli, args),
        AdapterCommand::List => {
            let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
            let model = crate::model_cmd::model_path(cli)?;
            let file = model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let default = adapter::find_compatible(&search_dirs(), &taxonomy, &file)
                .into_iter()
                .next();
            for root in search_dirs() {
                let Ok(entries) = std::fs::read_dir(&root) else {
                    println!("{} (not found)", root.display());
                    continue;
                };
                println!("{}", root.display());
                let mut dirs: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect();
                dirs.sort();
                for dir in dirs {
                    let Ok(meta) = adapter::read_meta(&dir) else {
                        continue;
                    };
                    let mark = match &default {
                        Some((d, _)) if d == &dir => "  [default]",
                        _ => "",
                    };
                    println!(
                        "  {}  taxonomy {}  base {}  prompt v{}{mark}",
                        dir.file_name().unwrap_or_default().to_string_lossy(),
                        meta.taxonomy,
                        meta.base_model_file,
                        meta.prompt_version
                    );
                }
            }
            match default {
                Some((d, _)) => eprintln!(
                    "default for taxonomy {:?} and {file}: {}",
                    taxonomy.name,
                    d.display()
                ),
                None => eprintln!(
                    "no adapter for taxonomy {:?} and {file}: the base model is used",
                    taxonomy.name
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        AdapterCommand::Show { dir, json } => {
            let meta = adapter::read_meta(dir)?;
            let peft = std::fs::read_to_string(dir.join("adapter_config.json"))
                .with_context(|| format!("cannot read {}", dir.join("adapter_config.json").display()))?;
            // A diagnostic: a calibration that cannot be used is reported, not fatal.
            let cal_path = dir.join(calibration::FILE_NAME);
            let calibration = cal_path.exists().then(|| {
                Calibration::read(&cal_path).map(|cal| {
                    let fitted = fitted_for(&cal, dir);
                    (cal, fitted)
                })
            });
            if *json {
                let peft: serde_json::Value = serde_json::from_str(&peft)
                    .with_context(|| format!("{}: not JSON", dir.join("adapter_config.json").display()))?;
                let null = serde_json::Value::Null;
                let (cal, weights, error) = match &calibration {
                    None => (null.clone(), null.clone(), null),
                    Some(Err(e)) => (null.clone(), null, serde_json::json!(e.to_string())),
                    Some(Ok((cal, fitted))) => (
                        serde_json::to_value(cal)?,
                        serde_json::json!(match fitted {
                            Ok(FittedFor::These) => "these",
                            Ok(FittedFor::Other { .. }) => "other",
                            Ok(FittedFor::NotRecorded) => "not recorded",
                            Err(_) => "unknown",
                        }),
                        fitted
                            .as_ref()
                            .err()
                            .map_or(null, |e| serde_json::json!(format!("{e:#}"))),
                    ),
                };
                let doc = serde_json::json!({
                    "peft_config": peft,
                    "triage": meta,
                    "calibration": cal,
                    "calibration_weights": weights,
                    "calibration_error": error,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{peft}");
            println!("{}", serde_json::to_string_pretty(&meta)?);
            println!();
            match &calibration {
                None => println!(
                    "no {}: the adapter's scores are used as they are (`triage adapter calibrate` fits one)",
                    cal_path.display()
                ),
                Some(Err(e)) => println!("{e}\n(infer, serve and eval refuse it)"),
                Some(Ok((cal, fitted))) => {
                    let weights = match fitted {
                        Ok(FittedFor::These) => "for these weights".to_owned(),
                        Ok(FittedFor::Other { fitted, .. }) => format!(
                            "for OTHER weights (sha256 {fitted}): infer, serve and eval refuse it; refit it"
                        ),
                        Ok(FittedFor::NotRecorded) => {
                            "weights not recorded (an older triage): applied as it is".to_owned()
                        }
                        Err(e) => format!("weights unknown ({e:#})"),
                    };
                    let older = predates_nested(cal);
                    let count = match older {
                        // Such files list only the fields they calibrate.
                        true => format!("calibrated fields: {}", cal.fields.len()),
                        false => format!(
                            "calibrated fields: {} of {}",
                            cal.fields.len(),
                            cal.summaries().len()
                        ),
                    };
                    println!(
                        "{}: fitted on {}, {weights}; {count}",
                        cal_path.display(),
                        cal.fitted_on
                    );
                    print!("{}", fit_table(cal, older));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AdapterCommand::Merge { dir, out, q8_0 } => {
            let base = crate::model_cmd::model_path(cli)?;
            let meta = adapter::read_meta(dir)?;
            let sha = crate::model_cmd::model_sha256(cli, &base)?;
            adapter::check_base(&meta, &sha, dir)?;
            let gguf = GgufFile::open(&base)?;
            let cfg = triage_llm::qwen2::Config::from_gguf(&gguf)?;
            let lora = adapter::load(dir, &cfg, &candle_core::Device::Cpu)?.lora;
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("merging [{bar:30}] {pos}/{len} tensors eta {eta}")
                    .expect("template")
                    .progress_chars("=> "),
            );
            let opts = MergeOptions {
                requantize: q8_0.then_some(candle_core::quantized::GgmlDType::Q8_0),
                adapter_name: dir
                    .file_name()
                    .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned()),
            };
            let summary = merge_gguf(&base, &lora, out, &opts, &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            eprintln!(
                "wrote {} ({:.0} MiB): {} projections merged, {} tensors copied; use it with --model {} --taxonomy <the adapter's taxonomy ({})>",
                out.display(),
                summary.bytes as f64 / (1024.0 * 1024.0),
                summary.merged,
                summary.copied,
                out.display(),
                meta.taxonomy
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_table_says_where_no_folds_were_made() {
        let summary = |folds, unfolded_inner| calibration::FitSummary {
            decisions: 100,
            nll_before: 1.0,
            nll_chosen_on: 0.9,
            folds,
            unfolded_inner,
            ..Default::default()
        };
        let mut cal = Calibration {
            adapter_sha256: Some("ab".repeat(32)),
            ..Default::default()
        };
        cal.left_alone.insert("few".into(), summary(Some(0), 0));
        cal.left_alone.insert("some".into(), summary(Some(5), 2));
        cal.left_alone.insert("all".into(), summary(Some(5), 0));
        let table = fit_table(&cal, predates_nested(&cal));
        assert!(table.contains("by nested 5-fold"), "{table}");
        assert!(table.contains("few: too few decisions"), "{table}");
        assert!(table.contains("scored uncalibrated: some in 2)"), "{table}");
        assert_eq!(
            table
                .lines()
                .filter(|l| l.trim_end().ends_with("not calibrated"))
                .count(),
            3
        );
        // Every field without folds: no claim of cross-validation at all.
        cal.left_alone.retain(|f, _| f == "few");
        let table = fit_table(&cal, false);
        assert!(
            !table.contains("nested")
                && table.contains("too few decisions or example groups to cross-validate"),
            "{table}"
        );
    }

    fn decided(field: &str, value: &str, allowed: &[&str]) -> FieldConfidence {
        FieldConfidence {
            field: field.into(),
            value: value.into(),
            confidence: 0.5,
            top: Vec::new(),
            scores: allowed.iter().map(|v| (v.to_string(), -1.0)).collect(),
        }
    }

    /// A subcategory decided under the labelled category is a usable decision; under another
    /// one it is marked, even when its allowed values include the labelled name (`Other`).
    #[test]
    fn a_dependent_decision_under_a_wrong_parent_is_marked() {
        let taxonomy = Taxonomy::builtin_default(); // subcategory depends on category
        let gold = |f: &str| match f {
            "category" => Some("Hardware"),
            "subcategory" => Some("Other"),
            _ => None,
        };
        let ticket = |category: &str| {
            [
                decided("category", category, &["Hardware", "Software"]),
                decided("subcategory", "Other", &["Other", "Laptop"]),
            ]
        };
        let marks = |t: &[FieldConfidence]| -> Vec<(String, String, bool)> {
            decisions_of(t, gold, &taxonomy)
                .into_iter()
                .map(|d| (d.field, d.gold, d.wrong_parent))
                .collect()
        };
        let expect = |wrong: bool| {
            vec![
                ("category".to_owned(), "Hardware".to_owned(), false),
                ("subcategory".to_owned(), "Other".to_owned(), wrong),
            ]
        };
        assert_eq!(marks(&ticket("Hardware")), expect(false));
        assert_eq!(marks(&ticket("Software")), expect(true));
    }

    /// A calibration is applied to the weights it was fitted for, refused (naming the file
    /// and the way out) for others, and applied when it predates the record.
    #[test]
    fn a_calibration_for_other_weights_is_refused() {
        let dir = std::env::temp_dir().join(format!("triage-cal-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), b"weights one").unwrap();
        let path = dir.join(calibration::FILE_NAME);
        let mut cal = Calibration {
            adapter_sha256: Some(weights_sha256(&dir).unwrap()),
            ..Calibration::default()
        };
        assert!(check_fitted_for(&cal, &path, &dir).is_ok());
        std::fs::write(dir.join("adapter_model.safetensors"), b"weights two").unwrap();
        let err = check_fitted_for(&cal, &path, &dir).unwrap_err().to_string();
        assert!(
            err.contains("other adapter weights")
                && err.contains(&format!("triage adapter calibrate {}", dir.display()))
                && err.contains("--no-calibration"),
            "{err}"
        );
        cal.adapter_sha256 = cal.adapter_sha256.map(|s| s.to_uppercase());
        assert!(
            check_fitted_for(&cal, &path, &dir).is_err(),
            "still other weights"
        );
        std::fs::write(dir.join("adapter_model.safetensors"), b"weights one").unwrap();
        assert!(
            check_fitted_for(&cal, &path, &dir).is_ok(),
            "hex case does not matter"
        );
        cal.adapter_sha256 = None;
        assert!(check_fitted_for(&cal, &path, &dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
