//! `--backend`: where `infer` and `eval` decode tickets — this process (`local`, the
//! default) or an OpenAI-compatible server (`openai:URL`: vLLM, llama-server) for scale-out;
//! `--device`: where a local model runs.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use triage_infer::remote::{RemoteOptions, RemoteStructurer};
use triage_llm::{GgufFile, Tokenizer};
use triage_taxonomy::Taxonomy;

use crate::Cli;

/// `--device`, shared by every command that runs the model in this process.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// Where the model runs: cpu, cuda or cuda:N (a build with `--features cuda`).
    #[arg(long = "device", default_value = "cpu", value_name = "DEVICE")]
    pub spec: String,
}

impl DeviceArgs {
    /// The candle device named by `--device`.
    pub fn resolve(&self) -> anyhow::Result<candle_core::Device> {
        Ok(triage_train::trainer::device(&self.spec)?)
    }
}

/// Choosing the backend.
#[derive(Args, Clone)]
pub struct BackendArgs {
    /// Where tickets are decoded: `local` (this process) or `openai:URL`, an OpenAI-compatible
    /// server given the same messages and schema (README, "Remote backend"). Its answers are
    /// validated; an invalid one is an error for that ticket, never repaired.
    #[arg(long, value_name = "BACKEND", default_value = "local", value_parser = parse_backend)]
    pub backend: Backend,
    /// With `openai:URL`: the model name to request (vLLM: the base model, or an adapter's
    /// name from `--lora-modules NAME=DIR`).
    #[arg(long, value_name = "NAME", default_value = "triage")]
    pub backend_model: String,
    /// With `openai:URL`: seconds allowed per request.
    #[arg(long, value_name = "S", default_value_t = 120)]
    pub backend_timeout: u64,
    /// With `openai:URL`: bearer token.
    #[arg(
        long,
        env = "TRIAGE_BACKEND_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub backend_api_key: Option<String>,
}

/// Where tickets are decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Backend {
    /// This process.
    Local,
    /// An OpenAI-compatible server at this base URL.
    OpenAi(String),
}

/// `local` or `openai:http(s)://…` (a usage error otherwise).
fn parse_backend(s: &str) -> Result<Backend, String> {
    match s.strip_prefix("openai:") {
        _ if s == "local" => Ok(Backend::Local),
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
            Ok(Backend::OpenAi(url.to_owned()))
        }
        _ => Err(
            "expected `local` or `openai:URL` with an http(s) URL, e.g. openai:http://gpu-box:8000/v1".into(),
        ),
    }
}

/// The model's tokenizer, read from its GGUF header (the weights are not loaded).
pub fn model_tokenizer(cli: &Cli) -> anyhow::Result<Tokenizer> {
    let path = crate::model_cmd::model_path(cli)?;
    Tokenizer::from_gguf(&GgufFile::open(&path)?)
        .with_context(|| format!("the tokenizer of {}", path.display()))
}

/// The remote structurer when `--backend openai:URL` is given, else `None` (local).
/// `tokenizer` (the model's) is asked for only then; it gives the same input hygiene as
/// local inference.
pub fn remote(
    args: &BackendArgs,
    taxonomy: Taxonomy,
    tokenizer: impl FnOnce() -> anyhow::Result<Tokenizer>,
    max_new_tokens: usize,
    max_input_tokens: usize,
    min_confidence: Option<f32>,
) -> anyhow::Result<Option<RemoteStructurer>> {
    let Backend::OpenAi(url) = &args.backend else {
        return Ok(None);
    };
    let opts = RemoteOptions {
        url: url.clone(),
        model: args.backend_model.clone(),
        api_key: args.backend_api_key.clone(),
        max_new_tokens,
        max_input_tokens,
        timeout: Duration::from_secs(args.backend_timeout.max(1)),
        min_confidence,
        ..RemoteOptions::default()
    };
    Ok(Some(RemoteStructurer::new(opts, taxonomy, tokenizer()?)?))
}
