//! The language-model side of triage: open a GGUF file defensively, read its metadata, build
//! its tokenizer from the GGUF itself, render prompts with its own chat template, and run the
//! Qwen2 transformer over the quantized weights (`qwen2`, shared by inference and training).

mod chat;
mod gguf;
pub mod lora;
pub mod qwen2;
mod tokenizer;

use std::path::PathBuf;

pub use chat::{ChatMessage, ChatTemplate, Role};
pub use gguf::{GgufFile, ModelInfo};
pub use tokenizer::Tokenizer;

/// Errors from loading or using a model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a usable GGUF model.
    #[error("{path}: {message}")]
    BadGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template failure.
    #[error("chat template: {0}")]
    Template(String),
    /// Tensor computation failure.
    #[error("model computation failed: {0}")]
    Candle(String),
    /// A LoRA adapter or setting that does not fit the model.
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
}

/// The one conversion of candle's errors: every crate's `?` on a candle call goes through it
/// (via `From<LlmError>` of its own error type where it has one).
impl From<candle_core::Error> for LlmError {
    fn from(e: candle_core::Error) -> Self {
        LlmError::Candle(e.to_string())
    }
}
