//! QLoRA fine-tuning: LoRA adapters trained on the frozen, still-quantized GGUF base.
//!
//! * [`data`]: canonical examples → token sequences rendered with the **same prompt code as
//!   inference** (system prompt with the injected schema, chat template from the GGUF), the
//!   user turn's header varied over `prompts/instructions.toml`, the loss only on the
//!   assistant's JSON tokens (written exactly as the decoding grammar writes tickets).
//! * [`optim`]: AdamW with linear warmup and cosine decay, gradient clipping; its state is
//!   saved with checkpoints so `--resume` continues exactly.
//! * [`trainer`]: the loop — length-bucketed batches, gradient accumulation, validation loss,
//!   constrained-decoding accuracy per field with the real inference path, metrics JSONL, an
//!   SVG loss curve, atomic checkpoints every N steps and on Ctrl-C, resume.
//! * [`adapter`]: the Hugging Face PEFT directory (`adapter_config.json`,
//!   `adapter_model.safetensors`) plus `triage.json` (taxonomy hash, base model sha256, prompt
//!   version, metrics) so inference refuses a mismatched adapter.
//! * [`merge`]: an adapter folded into the base weights, written as a standalone GGUF.
//! * [`memory`]: the `--dry-run` peak-memory estimate; [`bench`]: the training step benchmark.
//! * [`admission`]: bounds on user-controlled sizes ([`admission::LimitError`]) and the memory
//!   check before a job allocates (the estimate against the cgroup limit or `MemAvailable`).
//!
//! The adapter applies to the tokens after the shared system prompt: the prompt's KV cache is
//! the base model's, computed once (see `docs/adr/0003-qlora-training.md`).

pub mod adapter;
pub mod admission;
pub mod bench;
pub mod data;
pub mod features;
pub mod memory;
pub mod merge;
pub mod optim;
mod plot;
pub mod trainer;

/// Training failures.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong and what to do.
        message: String,
    },
    /// Invalid configuration or data.
    #[error("{0}")]
    Invalid(String),
    /// A size or rate outside its bounds (field, bound, what to do).
    #[error("train config: {0}")]
    Limit(admission::LimitError),
    /// Model or tensor failure.
    #[error(transparent)]
    Llm(#[from] triage_llm::LlmError),
    /// Inference failure during evaluation.
    #[error(transparent)]
    Infer(#[from] triage_infer::InferError),
    /// Data failure.
    #[error(transparent)]
    Data(#[from] triage_data::DataError),
    /// Stopped by the user (checkpoint written).
    #[error("interrupted at step {0}; resume with --resume")]
    Interrupted(usize),
}

/// Candle's errors through the one conversion ([`triage_llm::LlmError`]'s `From`), for
/// `.map_err(candle)` at the call sites.
pub(crate) fn candle(e: candle_core::Error) -> TrainError {
    TrainError::Llm(e.into())
}

pub(crate) fn file_err(path: &std::path::Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::File {
        path: path.to_owned(),
        message: e.to_string(),
    }
}
