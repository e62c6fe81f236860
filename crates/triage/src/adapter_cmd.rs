//! `triage adapter`: inspect a trained adapter, or fold it into the base model as a merged GGUF.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use triage_llm::GgufFile;
use triage_train::adapter;
use triage_train::merge::{merge_gguf, MergeOptions};

use crate::Cli;

/// `triage adapter …`
#[derive(Subcommand)]
pub enum AdapterCommand {
    /// List the adapters found in the adapter folders and say which one `infer`, `serve` and
    /// `eval` apply by default for the taxonomy and model in use.
    List,
    /// Print an adapter's PEFT configuration and what it was trained for.
    Show {
        /// Adapter directory (`adapters/<name>`).
        dir: PathBuf,
        /// Print one JSON document, `{"peft_config": …, "triage": …}`.
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
}

/// Where default adapters are looked for, in order: `$TRIAGE_ADAPTERS`, `./adapters`, the
/// user's data folder (`$XDG_DATA_HOME/triage/adapters`, else `~/.local/share/triage/adapters`),
/// and the `adapters/` folder of the source tree this binary was built from.
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
    dirs
}

/// The adapter `args` ask for, loaded and checked against the taxonomy, model and prompt
/// version of `structurer`: `--adapter DIR`, else the default one (see [`search_dirs`]), else
/// none. Returns its folder name with it.
pub fn resolve(
    cli: &Cli,
    args: &AdapterArgs,
    structurer: &triage_infer::Structurer,
    model_path: &std::path::Path,
) -> anyhow::Result<Option<(String, triage_llm::lora::Lora)>> {
    let name = |d: &std::path::Path| {
        d.file_name()
            .map_or_else(|| d.display().to_string(), |n| n.to_string_lossy().into_owned())
    };
    if args.no_adapter {
        return Ok(None);
    }
    if let Some(dir) = &args.adapter {
        let lora = crate::train_cmd::load_adapter(cli, dir, structurer, model_path)?;
        return Ok(Some((name(dir), lora)));
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
    Ok(Some((name(dir), lora)))
}

pub fn run(cli: &Cli, cmd: &AdapterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
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
            if *json {
                let peft: serde_json::Value = serde_json::from_str(&peft)
                    .with_context(|| format!("{}: not JSON", dir.join("adapter_config.json").display()))?;
                let doc = serde_json::json!({ "peft_config": peft, "triage": meta });
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{peft}");
            println!("{}", serde_json::to_string_pretty(&meta)?);
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
