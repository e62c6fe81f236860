//! `triage prompt`: the exact system and user messages and the ticket JSON Schema that
//! inference gives the model for an incident, so that any engine (llama-server, vLLM, an API)
//! can be given the same work and compared fairly.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;
use triage_infer::prompt::{clean_input, PromptBuilder, PROMPT_VERSION};
use triage_infer::StructurerOptions;
use triage_llm::{GgufFile, Tokenizer};
use triage_taxonomy::ticket_schema;

use crate::Cli;

/// Options of `triage prompt`.
#[derive(Args)]
pub struct PromptArgs {
    /// Print one JSON object: `system`, `user`, `schema` (and `messages` in the OpenAI chat
    /// format, `prompt_version`, `warnings`).
    #[arg(long)]
    json: bool,
    /// Incident tokens kept, as `infer` (longer input is cut from the middle, with a warning).
    #[arg(long, default_value_t = StructurerOptions::default().max_input_tokens)]
    max_input_tokens: usize,
}

/// Runs `triage prompt < incident.txt`.
pub fn run(cli: &Cli, args: &PromptArgs) -> anyhow::Result<ExitCode> {
    let text = crate::infer_cmd::read_incident()?;
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    // The tokenizer (from the GGUF's metadata; the weights are not loaded) neutralises
    // special-token strings and measures the input, exactly as inference does.
    let path = crate::model_cmd::model_path(cli)?;
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&path)?)?;
    let schema = ticket_schema(&taxonomy);
    let prompt = PromptBuilder::new(&taxonomy, &schema)?;
    let (incident, warnings) = clean_input(&tokenizer, &text, args.max_input_tokens)?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let messages = prompt.messages(&incident)?;
    let (system, user) = (&messages[0].content, &messages[1].content);
    if args.json {
        let doc = json!({
            "system": system,
            "user": user,
            "schema": schema,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "prompt_version": PROMPT_VERSION,
            "warnings": warnings,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("=== system ===\n{system}\n=== user ===\n{user}");
    }
    Ok(ExitCode::SUCCESS)
}
