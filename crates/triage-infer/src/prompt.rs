//! The inference prompt: a system message rendered from the taxonomy (task, the ticket JSON
//! Schema verbatim, every value's description) and a user message holding the incident,
//! delimited as data. Templates live in `prompts/` and are embedded at build time.

use minijinja::Environment;
use triage_llm::{ChatMessage, Role};
use triage_taxonomy::Taxonomy;

use crate::InferError;

/// Bumped whenever the prompt templates change meaning; recorded in adapters so inference can
/// refuse an adapter trained on another prompt.
pub const PROMPT_VERSION: u32 = 1;

const SYSTEM_TEMPLATE: &str = include_str!("../../../prompts/system.j2");
const USER_TEMPLATE: &str = include_str!("../../../prompts/user.j2");

/// Renders the system and user messages for one taxonomy.
pub struct PromptBuilder {
    env: Environment<'static>,
    system: String,
}

impl PromptBuilder {
    /// Renders the (fixed) system prompt for `taxonomy` with its `schema`.
    pub fn new(taxonomy: &Taxonomy, schema: &serde_json::Value) -> Result<Self, InferError> {
        let mut env = Environment::new();
        env.add_template("system", SYSTEM_TEMPLATE)
            .map_err(template_err)?;
        env.add_template("user", USER_TEMPLATE).map_err(template_err)?;
        let schema_text = serde_json::to_string(schema).expect("schema serialises");
        let system = env
            .get_template("system")
            .and_then(|t| {
                t.render(minijinja::context! {
                    taxonomy => minijinja::Value::from(minijinja::value::Serde(taxonomy)),
                    schema => schema_text,
                })
            })
            .map_err(template_err)?;
        Ok(Self { env, system })
    }

    /// The system prompt.
    pub fn system(&self) -> &str {
        &self.system
    }

    /// The chat messages for one incident. `text` must already be neutralised
    /// ([`triage_llm::Tokenizer::neutralize_specials`]).
    pub fn messages(&self, text: &str) -> Result<Vec<ChatMessage>, InferError> {
        let user = self
            .env
            .get_template("user")
            .and_then(|t| t.render(minijinja::context! { text => text }))
            .map_err(template_err)?;
        Ok(vec![
            ChatMessage::new(Role::System, self.system.clone()),
            ChatMessage::new(Role::User, user),
        ])
    }
}

fn template_err(e: minijinja::Error) -> InferError {
    InferError::Prompt(format!("{e:#}"))
}
