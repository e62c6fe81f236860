//! Rendering chat prompts with the model's own Jinja chat template (from the GGUF), using
//! `minijinja` configured like Hugging Face `transformers` (trim_blocks, lstrip_blocks).

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use crate::{GgufFile, LlmError};

/// Who speaks in a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions.
    System,
    /// The user's turn.
    User,
    /// The model's turn.
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Speaker.
    pub role: Role,
    /// Text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles a Jinja chat template source.
    pub fn new(source: &str) -> Result<Self, LlmError> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        // HF templates call `raise_exception(msg)` to reject bad conversations.
        env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| LlmError::Template(format!("cannot compile the chat template: {e:#}")))?;
        Ok(Self { env })
    }

    /// The template stored in the GGUF (`tokenizer.chat_template`).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, LlmError> {
        let src = gguf
            .meta_str("tokenizer.chat_template")
            .ok_or_else(|| LlmError::BadGguf {
                path: gguf.path().to_path_buf(),
                message: "no `tokenizer.chat_template` in the metadata: this is not a chat model".into(),
            })?;
        Self::new(src).map_err(|e| match e {
            LlmError::Template(message) => LlmError::BadGguf {
                path: gguf.path().to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, LlmError> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).expect("added in new()");
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => "",
            eos_token => "",
        })
        .map_err(|e| LlmError::Template(format!("cannot render the chat template: {e:#}")))
    }
}
