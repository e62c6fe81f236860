//! The inference prompt: a system message rendered from the taxonomy (task, the ticket JSON
//! Schema verbatim, every value's description) and a user message holding the incident,
//! delimited as data. Templates live in `prompts/` and are embedded at build time.

use minijinja::Environment;
use triage_llm::{ChatMessage, Role, Tokenizer};
use triage_taxonomy::Taxonomy;

use crate::InferError;

/// Bumped whenever the prompt templates change meaning; recorded in adapters so inference can
/// refuse an adapter trained on another prompt.
pub const PROMPT_VERSION: u32 = 1;

const SYSTEM_TEMPLATE: &str = include_str!("../../../prompts/system.j2");
const USER_TEMPLATE: &str = include_str!("../../../prompts/user.j2");
const INSTRUCTIONS_TOML: &str = include_str!("../../../prompts/instructions.toml");

/// One training instruction variant (`prompts/instructions.toml`): the header line of the
/// user turn, as a minijinja template over `taxonomy` (name) and `fields` (field names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instruction {
    /// Unique id (`en-canonical`, `de-fields`, ...).
    pub id: String,
    /// Language of the wording.
    pub lang: String,
    /// The template.
    pub text: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InstructionFile {
    instruction: Vec<Instruction>,
}

/// The instruction variants shipped in `prompts/instructions.toml`; the first is the canonical
/// inference header.
pub fn instructions() -> Vec<Instruction> {
    toml_instructions(INSTRUCTIONS_TOML).expect("prompts/instructions.toml is checked by the test suite")
}

fn toml_instructions(text: &str) -> Result<Vec<Instruction>, String> {
    let file: InstructionFile = toml::from_str(text).map_err(|e| e.to_string())?;
    Ok(file.instruction)
}

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
        self.messages_with(text, None)
    }

    /// Like [`PromptBuilder::messages`], with the user turn's header replaced by a rendered
    /// training instruction variant (see [`PromptBuilder::render_instruction`]).
    pub fn messages_with(
        &self,
        text: &str,
        instruction: Option<&str>,
    ) -> Result<Vec<ChatMessage>, InferError> {
        let user = self
            .env
            .get_template("user")
            .and_then(|t| t.render(minijinja::context! { text => text, instruction => instruction }))
            .map_err(template_err)?;
        Ok(vec![
            ChatMessage::new(Role::System, self.system.clone()),
            ChatMessage::new(Role::User, user),
        ])
    }
}

/// Input hygiene, the same for inference, training and `triage prompt`: trims, neutralises
/// special-token strings, and cuts input over `max_input_tokens` (at least 16) from the
/// middle. Returns the text for the user turn and warnings describing what was done.
pub fn clean_input(
    tokenizer: &Tokenizer,
    text: &str,
    max_input_tokens: usize,
) -> Result<(String, Vec<String>), InferError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(InferError::EmptyInput);
    }
    let text = tokenizer.neutralize_specials(text);
    let ids = tokenizer.encode_text(&text)?;
    let max = max_input_tokens.max(16);
    if ids.len() <= max {
        return Ok((text, Vec::new()));
    }
    let keep = max / 2;
    let head = tokenizer.decode(&ids[..keep])?;
    let tail = tokenizer.decode(&ids[ids.len() - keep..])?;
    let cut = ids.len() - 2 * keep;
    let warning = format!(
        "input is {} tokens; kept the first and last {keep}, cut {cut} from the middle",
        ids.len()
    );
    Ok((
        format!("{head}\n[... {cut} tokens omitted ...]\n{tail}"),
        vec![warning],
    ))
}

/// Renders an instruction variant for a taxonomy; `fields` is the field order to mention
/// (training shuffles it so that no wording ties the model to one order).
pub fn render_instruction(
    instruction: &Instruction,
    taxonomy: &str,
    fields: &[&str],
) -> Result<String, InferError> {
    let env = Environment::new();
    env.render_str(&instruction.text, minijinja::context! { taxonomy => taxonomy.to_owned(), fields => fields.iter().map(|f| f.to_string()).collect::<Vec<_>>() })
        .map_err(|e| InferError::Prompt(format!("instruction {:?}: {e:#}", instruction.id)))
}

fn template_err(e: minijinja::Error) -> InferError {
    InferError::Prompt(format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_variants_cover_five_languages_and_render() {
        let all = instructions();
        assert!(all.len() >= 12, "{} variants", all.len());
        let mut ids = std::collections::HashSet::new();
        for i in &all {
            assert!(ids.insert(i.id.clone()), "duplicate id {}", i.id);
            let fields = ["priority", "category", "request_type"];
            let text = render_instruction(i, "default", &fields).unwrap();
            assert!(
                !text.contains("{{") && !text.trim().is_empty(),
                "{}: {text}",
                i.id
            );
            if i.text.contains("fields") {
                assert!(
                    text.contains("priority, category, request_type"),
                    "{}: {text}",
                    i.id
                );
            }
        }
        for lang in ["en", "de", "fr", "es", "pt"] {
            assert!(all.iter().filter(|i| i.lang == lang).count() >= 2, "{lang}");
        }
    }

    #[test]
    fn the_first_variant_is_the_canonical_inference_prompt() {
        let taxonomy = Taxonomy::builtin_default();
        let schema = triage_taxonomy::ticket_schema(&taxonomy);
        let p = PromptBuilder::new(&taxonomy, &schema).unwrap();
        let canonical = render_instruction(&instructions()[0], "default", &[]).unwrap();
        let a = p.messages("VPN down").unwrap();
        let b = p.messages_with("VPN down", Some(&canonical)).unwrap();
        assert_eq!(a, b);
        let c = p.messages_with("VPN down", Some("Classify:")).unwrap();
        assert!(
            c[1].content
                .starts_with("Classify:\n<<<INCIDENT\nVPN down\nINCIDENT>>>"),
            "{:?}",
            c[1].content
        );
    }
}
