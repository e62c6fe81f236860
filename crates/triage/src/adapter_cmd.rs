//! `triage adapter`: inspect a trained adapter, or fold it into the base model as a merged GGUF.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use triage_llm::GgufFile;
use triage_train::adapter;
use triage_train::merge::{merge_gguf, MergeOptions};

use crate::Cli;

/// `triage adapter …`
#[derive(Subcommand)]
pub enum AdapterCommand {
    /// Print an adapter's PEFT configuration and what it was trained for.
    Show {
        /// Adapter directory (`adapters/<name>`).
        dir: PathBuf,
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

pub fn run(cli: &Cli, cmd: &AdapterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AdapterCommand::Show { dir } => {
            let meta = adapter::read_meta(dir)?;
            let peft = std::fs::read_to_string(dir.join("adapter_config.json"))
                .with_context(|| format!("cannot read {}", dir.join("adapter_config.json").display()))?;
            println!("{peft}");
            println!("{}", serde_json::to_string_pretty(&meta)?);
            Ok(ExitCode::SUCCESS)
        }
        AdapterCommand::Merge { dir, out, q8_0 } => {
            let base = crate::model_cmd::store(cli)?.resolve(cli.model.as_deref(), None)?;
            let meta = adapter::read_meta(dir)?;
            let sha = crate::train_cmd::model_sha256(cli, &base)?;
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
