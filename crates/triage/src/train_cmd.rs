//! `triage train` (QLoRA adapters) and `triage adapter` (inspect).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use triage_data::read_examples_and_bytes;
use triage_infer::{Structurer, StructurerOptions};
use triage_llm::qwen2::{LoadOptions, Qwen2};
use triage_llm::GgufFile;
use triage_taxonomy::{Taxonomy, Validator};
use triage_train::adapter::{self, TriageMeta};
use triage_train::trainer::{device, Objective, Observer, StepReport, TrainConfig, Trainer};

use crate::Cli;

/// `triage train`.
#[derive(Args)]
pub struct TrainArgs {
    /// Training data (canonical JSONL, e.g. from `triage data split`).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Validation data (validation loss and per-field accuracy).
    #[arg(long, value_name = "FILE")]
    val: Option<PathBuf>,
    /// Training configuration (TOML; keys of `configs/train.toml`). Flags override it.
    /// Default: `train_config` in the user config file, else the built-in
    /// `configs/train.toml` (the same as `serve`'s training defaults; `triage config`).
    #[arg(long, value_name = "FILE", env = "TRIAGE_TRAIN_CONFIG")]
    config: Option<PathBuf>,
    /// Where the PEFT adapter is written.
    #[arg(long, value_name = "DIR", default_value = "adapters/default")]
    out: PathBuf,
    /// Run directory: checkpoints, metrics.jsonl, loss.svg (default: runs/<adapter name>).
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its checkpoint (same optimizer state and data order).
    #[arg(long)]
    resume: bool,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    rank: Option<usize>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Validation examples decoded for the per-field accuracy (0 = off).
    #[arg(long)]
    accuracy_samples: Option<usize>,
    #[command(flatten)]
    device: crate::backend_cmd::DeviceArgs,
    /// Print the estimated peak memory and exit.
    #[arg(long)]
    dry_run: bool,
    /// Recompute each adapted layer in the backward pass instead of keeping its graph (less
    /// memory, slower: for GPUs with ~4 GB; config key `checkpointing`).
    #[arg(long, overrides_with = "no_checkpointing")]
    checkpointing: bool,
    /// Keep the whole graph instead of recomputing each layer in the backward pass (faster,
    /// several times the memory; config key `checkpointing`).
    #[arg(long, overrides_with = "checkpointing")]
    no_checkpointing: bool,
    /// Put the adapter on the top K layers only (0 = all; config key `top_layers`): the
    /// layers below run once per example and their output is reused.
    #[arg(long, value_name = "K")]
    top_layers: Option<usize>,
    /// What the loss covers: `decisions` (enum choices as the decoder makes them, the summary
    /// down-weighted) or `tokens` (every answer token; config key `objective`).
    #[arg(long, value_parser = ["decisions", "tokens"])]
    objective: Option<String>,
    /// Memory the run may use: `auto` (the cgroup limit or MemAvailable), a size such as `6G`,
    /// or `off`. A run whose estimated peak (`--dry-run`) does not fit is refused before the
    /// model is loaded.
    #[arg(long, value_name = "auto|off|SIZE", default_value = "auto")]
    memory_limit: triage_train::admission::MemoryLimit,
}

/// Reads a training configuration (TOML), naming the file in errors.
pub fn read_config(p: &Path) -> anyhow::Result<TrainConfig> {
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: not a training configuration", p.display()))
}

fn load_config(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let (mut c, _) = crate::settings::Settings::load()?.train_config(args.config.as_deref())?;
    if args.checkpointing {
        c.checkpointing = true;
    }
    if args.no_checkpointing {
        c.checkpointing = false;
    }
    if let Some(v) = args.steps {
        c.steps = v;
    }
    if let Some(v) = args.lr {
        c.optimizer.lr = v;
    }
    if let Some(v) = args.batch_size {
        c.batch_size = v;
    }
    if let Some(v) = args.grad_accum {
        c.grad_accum = v;
    }
    if let Some(v) = args.rank {
        c.set_rank(v);
    }
    if let Some(v) = args.seed {
        c.seed = v;
    }
    if let Some(v) = args.accuracy_samples {
        c.accuracy_samples = v;
    }
    if let Some(v) = args.top_layers {
        c.top_layers = v;
    }
    if let Some(v) = &args.objective {
        c.objective = match v.as_str() {
            "tokens" => Objective::Tokens,
            _ => Objective::Decisions,
        };
    }
    c.check()?;
    Ok(c)
}

struct Bar(ProgressBar);

impl Observer for Bar {
    fn step(&mut self, r: &StepReport) {
        self.0.set_length(r.steps as u64);
        self.0.set_position(r.step as u64);
        self.0.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            r.loss, r.lr, r.tokens_per_s
        ));
    }
    fn message(&mut self, text: &str) {
        if self.0.is_hidden() {
            eprintln!("{text}");
        } else {
            self.0.println(text);
        }
    }
    fn features(&mut self, done: usize, total: usize) {
        self.0
            .set_message(format!("frozen layers: {done}/{total} example-layers"));
        if self.0.is_hidden() && (done == total || done.is_multiple_of(500)) {
            eprintln!("frozen layers: {done}/{total} example-layers");
        }
    }
}

/// Loads the model on `device` and builds the base structurer (no adapter). A `training`
/// process computes the system prompt's cache layer by layer (it must not keep candle's
/// repacked weight copies); an evaluation computes it as inference does.
pub fn base_structurer(
    cli: &Cli,
    taxonomy: Taxonomy,
    device_spec: &str,
    training: bool,
) -> anyhow::Result<(GgufFile, Structurer, PathBuf)> {
    let path = crate::model_cmd::model_path(cli)?;
    let gguf = GgufFile::open(&path)?;
    let dev = device(device_spec)?;
    let model = Arc::new(Qwen2::load(&gguf, &dev, &LoadOptions::default())?);
    let (prefix_cache_dir, model_sha256) = crate::model_cmd::prefix_cache(cli, &path);
    let opts = StructurerOptions {
        prefix_cache_dir,
        model_sha256,
        layerwise_prefill: training,
        ..StructurerOptions::default()
    };
    let s = Structurer::with_model(model, &gguf, taxonomy, opts)?;
    Ok((gguf, s, path))
}

/// The `--dry-run` estimate for `config` on the model in `gguf`, at typical lengths: the
/// system prompt (~2,100 tokens) and sequences of `max_tokens` (at most 256). `gpu`: training
/// on a GPU, where the CPU kernels (and their repacked weights) do not exist and every
/// operation is candle's composed one, which keeps more activations.
pub fn dry_run_estimate(
    gguf: &GgufFile,
    config: &TrainConfig,
    gpu: bool,
) -> anyhow::Result<triage_train::memory::MemoryEstimate> {
    let cfg = triage_llm::qwen2::Config::from_gguf(gguf)?;
    let first = config.first_layer(cfg.num_layers);
    let config = TrainConfig {
        composed_ops: config.composed_ops || gpu,
        ..config.clone()
    };
    let estimate = triage_train::admission::training_estimate(
        &cfg,
        Qwen2::load_bytes(gguf, &LoadOptions::default()),
        // The forward pass of the adapted layers runs on candle's fast CPU kernels where there
        // are some (and the head's too without a dense copy).
        match gpu {
            true => 0,
            false => Qwen2::repackable_bytes(gguf, first..cfg.num_layers, !config.dense_weights),
        },
        &config,
        2100,
    );
    Ok(match gpu {
        true => estimate.on_gpu(),
        false => estimate,
    })
}

/// The configuration a `--resume` continues with: the checkpoint's, with the command's
/// settings that do not change what is trained ([`TrainConfig::with_run_settings_of`]: e.g.
/// `--checkpointing` for less memory). The rest the flags and config file give now must be
/// the same (a resumed run cannot change its steps, learning rate or data order); the keys
/// that differ are named. A checkpoint older than that rule continues with its own, with a
/// warning.
fn resumed_config(run_dir: &Path, asked: TrainConfig) -> anyhow::Result<TrainConfig> {
    let (saved, current) = triage_train::trainer::saved_config(run_dir)?;
    let saved = saved.with_run_settings_of(&asked);
    let (a, s) = (serde_json::to_value(&asked)?, serde_json::to_value(&saved)?);
    let differ: Vec<String> = match (a.as_object(), s.as_object()) {
        (Some(a), Some(s)) => a
            .iter()
            .filter(|(k, v)| s.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k}: {} now, {} in the checkpoint",
                    v,
                    s.get(k).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    if !differ.is_empty() && !current {
        tracing::warn!(
            "{}'s checkpoint predates the configuration check: continuing with its own \
             configuration, which differs from this command's ({})",
            run_dir.display(),
            differ.join("; ")
        );
    } else if !differ.is_empty() {
        anyhow::bail!(
            "--resume continues {}'s run with the configuration it started with, and this one \
             differs ({}): give the same flags and config file, or start afresh with another --run-dir",
            run_dir.display(),
            differ.join("; ")
        );
    }
    Ok(saved)
}

/// Runs `triage train`.
pub fn run(cli: &Cli, args: &TrainArgs) -> anyhow::Result<ExitCode> {
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let validator = Validator::new(&taxonomy);
    let name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&name));
    // One `triage train` per folder, held until this command returns: taken here, before a
    // checkpoint is recovered or read, when the folder exists; else just before the run
    // creates it, so a refused run leaves no folder. --dry-run only reads.
    let lock = match !args.dry_run && run_dir.exists() {
        true => Some(triage_train::trainer::lock_run_dir(&run_dir)?),
        false => None,
    };
    if !args.dry_run {
        triage_train::trainer::recover_checkpoint(&run_dir)?;
    }
    let config = match args.resume {
        true => resumed_config(&run_dir, load_config(args)?)?,
        false => load_config(args)?,
    };
    let (train, train_file) = read_data(&args.data, "train", &validator)?;
    let (val, val_file) = match &args.val {
        Some(p) => read_data(p, "val", &validator).map(|(v, f)| (v, Some(f)))?,
        None => (Vec::new(), None),
    };
    let data: Vec<adapter::DataFile> = std::iter::once(train_file).chain(val_file).collect();
    // The estimated peak, before the model is loaded: printed by --dry-run, else compared
    // with what this process may use (memory admission).
    let gpu = args.device.spec != "cpu";
    let peak = dry_run_estimate(&GgufFile::open(crate::model_cmd::model_path(cli)?)?, &config, gpu)?;
    if args.dry_run {
        println!("{peak}");
        println!(
            "(batch {}, {} tokens after a ~2,100-token system prompt, adapter on {}, {}, {})",
            config.batch_size,
            config.max_tokens.min(256),
            match config.top_layers {
                0 => "every layer".to_string(),
                k => format!("the top {k} layers"),
            },
            match config.checkpointing {
                true => "per-layer recomputation",
                false => "whole graph kept",
            },
            match (config.dense_weights, gpu) {
                (true, false) => "dense f16 weight copies",
                (true, true) => "dense bf16 weight copies",
                (false, _) => "weights dequantized in the backward pass",
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    match gpu {
        // The estimate is of GPU memory, which the host's free memory says nothing about.
        true => tracing::info!(
            estimate_mib = peak.total >> 20,
            "GPU memory is not checked before loading"
        ),
        false => triage_train::admission::admit_training(&peak, &config, args.memory_limit)?,
    }
    // Refused now rather than after hours of training: an --out that is not an adapter
    // folder (it would be replaced), a fresh run over a run directory's checkpoint.
    triage_train::adapter::check_replaceable(&args.out)?;
    let fresh_over_a_checkpoint =
        || !args.resume && triage_train::trainer::checkpoint_state(&run_dir).exists();
    if fresh_over_a_checkpoint() {
        anyhow::bail!(
            "{} holds the checkpoint of an earlier run: continue it with --resume, or start afresh \
             with another --run-dir (or after deleting {})",
            run_dir.display(),
            triage_train::trainer::checkpoint_dir(&run_dir).display()
        );
    }
    let (gguf, base, model_path) = base_structurer(cli, taxonomy.clone(), &args.device.spec, true)?;
    eprintln!(
        "preparing {} training and {} validation examples (system prompt cached once)…",
        train.len(),
        val.len()
    );
    let _lock = match lock {
        Some(held) => held,
        None => {
            let held = triage_train::trainer::lock_run_dir(&run_dir)?;
            // A run that finished in this folder while the model loaded left its checkpoint.
            anyhow::ensure!(
                !fresh_over_a_checkpoint(),
                "{} holds the checkpoint of a run that finished meanwhile: continue it with \
                 --resume, or use another --run-dir",
                run_dir.display()
            );
            held
        }
    };
    let mut trainer = Trainer::new(&base, &gguf, config, &train, &val, &run_dir, args.resume)?;
    eprintln!(
        "training {} LoRA parameters (rank {}, {:?}) on {} examples, {} steps; run dir {}",
        trainer.lora.num_params(),
        trainer.config().rank,
        trainer.config().targets,
        trainer.train_items().len(),
        trainer.config().steps,
        run_dir.display()
    );
    crate::batch::install_ctrlc();
    let bar = ProgressBar::new(trainer.config().steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_position(trainer.state().step as u64);
    let mut observer = Bar(bar.clone());
    let summary = match trainer.run(&crate::batch::STOP, &mut observer) {
        Ok(s) => s,
        Err(triage_train::TrainError::Interrupted(_)) => {
            // The step of the checkpoint (a resumed run stopped in the features pass has one).
            let step = trainer.state().step;
            bar.abandon();
            // Not eprintln!: after a terminal hangup stderr may be gone, and the checkpoint
            // is written; a failed message must not turn exit 130 into a panic.
            use std::io::Write as _;
            let mut err = std::io::stderr();
            let _ = match triage_train::trainer::checkpoint_state(&run_dir).exists() {
                true => writeln!(
                    err,
                    "stopped at step {step}; checkpoint in {}; continue with --resume --run-dir {}",
                    run_dir.display(),
                    run_dir.display()
                ),
                // Stopped in the frozen layers' pass, before any checkpoint.
                false => writeln!(
                    err,
                    "stopped before the first step; the frozen layers' output computed so far is \
                     kept in {}: rerun the same command (without --resume) to continue",
                    run_dir.join("features").display()
                ),
            };
            crate::batch::STOP.store(false, Ordering::SeqCst);
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e.into()),
    };
    bar.finish_and_clear();
    let base_name = peft_base_name(cli, &model_path)?;
    let base_file = model_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sha = crate::model_cmd::model_sha256(cli, &model_path)?;
    let mut meta = TriageMeta::new(&taxonomy, &sha, &base_file, serde_json::to_value(&summary)?);
    meta.data = data;
    adapter::save(&args.out, &trainer.lora, &base_name, &meta)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!(
        "adapter written to {} (PEFT format); use it with `triage infer --adapter {}`",
        args.out.display(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The examples of data file `path`, and its record (`role`, sha256 of the bytes parsed) for
/// the adapter's `triage.json`.
fn read_data(
    path: &Path,
    role: &str,
    validator: &Validator,
) -> anyhow::Result<(Vec<triage_data::Example>, adapter::DataFile)> {
    let (examples, bytes) = read_examples_and_bytes(path, validator)?;
    let file = adapter::DataFile {
        role: role.into(),
        file: path.display().to_string(),
        sha256: triage_data::sha256_hex(&bytes),
        examples: examples.len(),
    };
    Ok((examples, file))
}

/// `base_model_name_or_path` for PEFT: the Hugging Face transformers repository of the
/// registry model (its GGUF repository without `-GGUF`), else the GGUF file stem.
pub fn peft_base_name(cli: &Cli, model_path: &Path) -> anyhow::Result<String> {
    let store = crate::model_cmd::store(cli)?;
    let registry = store.registry();
    let spec = match cli.model.as_deref() {
        Some(m) => registry.find(m),
        None => Some(registry.default_model()),
    };
    let from_hub = spec.and_then(|s| {
        s.sources.iter().find_map(|src| match src {
            triage_registry::Source::Hf { repo, .. } => Some(repo.trim_end_matches("-GGUF").to_owned()),
            _ => None,
        })
    });
    Ok(from_hub.unwrap_or_else(|| {
        model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }))
}

/// Loads an adapter for inference, refusing one trained for another taxonomy, base model or
/// prompt version.
pub fn load_adapter(
    cli: &Cli,
    dir: &Path,
    structurer: &Structurer,
    model_path: &Path,
) -> anyhow::Result<triage_llm::lora::Lora> {
    let sha = crate::model_cmd::model_sha256(cli, model_path)?;
    Ok(adapter::load_checked(
        dir,
        structurer.taxonomy(),
        &sha,
        structurer.model(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The adapter records each data file by the sha256 of the bytes parsed, under its role;
    /// an unreadable or malformed file is an error naming it.
    #[test]
    fn the_data_files_are_recorded_by_content() {
        let dir = std::env::temp_dir().join(format!("triage-data-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let validator = Validator::new(&triage_taxonomy::Taxonomy::builtin_default());
        let blank = dir.join("blank.jsonl");
        std::fs::write(&blank, b"\n\n").unwrap();
        let (examples, file) = read_data(&blank, "val", &validator).unwrap();
        assert!(examples.is_empty());
        assert_eq!(
            (file.role.as_str(), file.sha256.as_str(), file.examples),
            (
                "val",
                "75a11da44c802486bc6f65640aa48a730f0f684c5c07a42ba3cd1735eb3fb070",
                0
            )
        );
        assert_eq!(file.file, blank.display().to_string());
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, b"{not json\n").unwrap();
        for path in [bad, dir.join("gone.jsonl")] {
            let err = format!("{:#}", read_data(&path, "train", &validator).unwrap_err());
            assert!(err.contains(&*path.to_string_lossy()), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A resumed run keeps the checkpoint's configuration: the same flags are accepted, a
    /// changed one is refused by name (it used to be ignored silently, while the memory check
    /// went by it), a setting that only changes memory or speed is taken from the command. A
    /// checkpoint older than the check continues with its own configuration. A checkpoint
    /// left moved aside by an interrupted swap is put back first.
    #[test]
    fn a_resume_refuses_a_changed_configuration_and_recovers_a_moved_checkpoint() {
        let run_dir = std::env::temp_dir().join(format!("triage-resumed-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        let saved = TrainConfig {
            steps: 5,
            checkpointing: false,
            ..TrainConfig::default()
        };
        let write = |dir: &Path, fingerprint: Option<&str>| {
            std::fs::create_dir_all(dir).unwrap();
            let state = serde_json::json!({
                "config": saved,
                "state": triage_train::trainer::RunState::default(),
                "fingerprint": fingerprint,
            });
            std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
        };
        // What a kill between write_dir's two renames leaves: only the old checkpoint (here
        // beside an older copy an earlier kill left, which must not come back later).
        let older = run_dir.join(".checkpoint.old-17");
        write(&older, Some("0123"));
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(older.join("state.json"))
            .and_then(|f| f.set_modified(an_hour_ago))
            .unwrap();
        let aside = run_dir.join(".checkpoint.old-4242");
        write(&aside, Some("0123"));
        std::fs::write(aside.join("newest"), "").unwrap();
        assert!(triage_train::trainer::recover_checkpoint(&run_dir).unwrap());
        assert!(triage_train::trainer::checkpoint_dir(&run_dir)
            .join("newest")
            .exists());
        assert!(!aside.exists() && !older.exists());

        let same = resumed_config(&run_dir, saved.clone()).unwrap();
        assert_eq!(same.steps, 5);
        let lighter = TrainConfig {
            checkpointing: true,
            ..saved.clone()
        };
        assert!(resumed_config(&run_dir, lighter).unwrap().checkpointing);
        let longer = TrainConfig {
            steps: 10,
            ..saved.clone()
        };
        let err = resumed_config(&run_dir, longer.clone()).unwrap_err().to_string();
        assert!(err.contains("steps: 10 now, 5 in the checkpoint"), "{err}");
        // A checkpoint without a fingerprint predates the check: its configuration wins.
        write(&triage_train::trainer::checkpoint_dir(&run_dir), None);
        assert_eq!(resumed_config(&run_dir, longer).unwrap().steps, 5);
        std::fs::remove_dir_all(&run_dir).unwrap();
    }
}
