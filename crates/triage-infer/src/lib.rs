//! Grammar-constrained inference: incident text → schema-valid ticket. The taxonomy's JSON
//! Schema is injected into the prompt and compiled by `llguidance` into a token mask, so every
//! output parses and validates by construction.
//!
//! ```no_run
//! use triage_infer::{Structurer, StructurerOptions};
//! let gguf = triage_llm::GgufFile::open("model.gguf")?;
//! let s = Structurer::new(&gguf, triage_taxonomy::Taxonomy::builtin_default(), StructurerOptions::default())?;
//! let out = s.structure("my VPN drops every 10 min since the update")?;
//! println!("{}", serde_json::to_string(&out.ticket)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod engine;
pub mod grammar;
pub mod prompt;

pub use engine::{FieldConfidence, Meta, Structured, Structurer, StructurerOptions, Timings};
pub use grammar::render_ticket;
pub use prompt::{instructions, render_instruction, Instruction, PromptBuilder, PROMPT_VERSION};

/// Why an incident could not be structured.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// Nothing but whitespace was given.
    #[error("the incident text is empty: give the incident on stdin or with --input")]
    EmptyInput,
    /// Prompt plus answer do not fit the model's context budget.
    #[error("prompt of {tokens} tokens exceeds the budget of {budget}; lower --max-input-tokens")]
    TooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Budget.
        budget: usize,
    },
    /// Model loading or computation failed.
    #[error(transparent)]
    Model(#[from] triage_llm::LlmError),
    /// Prompt template failure.
    #[error("prompt template: {0}")]
    Prompt(String),
    /// The grammar could not be compiled or rejected the state.
    #[error("grammar: {0}")]
    Grammar(String),
    /// The token cap was reached before the ticket closed.
    #[error("no complete ticket after {tokens} tokens (partial output: {partial})")]
    Runaway {
        /// Tokens generated.
        tokens: usize,
        /// What was generated.
        partial: String,
    },
    /// The output failed validation. Constrained decoding makes this a bug: please report it.
    #[error("internal error: output failed validation ({reason}): {output}")]
    Invalid {
        /// The output.
        output: String,
        /// Violations.
        reason: String,
    },
}
