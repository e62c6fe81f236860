//! The decoding grammar: the taxonomy's JSON Schema compiled by `llguidance` over the model's
//! own vocabulary.
//!
//! llguidance needs each token's bytes; they come from our GGUF tokenizer (byte-level BPE,
//! GPT-2 byte map), so no second tokenizer is loaded. The end-of-sequence token given to the
//! grammar is the chat template's end of turn (`<|im_end|>`), not the tokenizer's
//! `<|endoftext|>`: with the wrong one a finished grammar lets the model run on in whitespace.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use triage_llm::Tokenizer;

use crate::InferError;

/// JSON layout the grammar enforces: compact but readable, no free whitespace.
pub const ITEM_SEPARATOR: &str = ", ";
/// Between a key and its value.
pub const KEY_SEPARATOR: &str = ": ";

/// A ticket exactly as the grammar writes it (`{"summary": "...", "category": "..."}`: keys in
/// taxonomy order, the separators above, JSON string escapes): the training target.
pub fn render_ticket(ticket: &triage_taxonomy::Ticket) -> String {
    let mut out = String::from("{");
    let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
    out.push_str(&format!(
        "{}{KEY_SEPARATOR}{}",
        q(triage_taxonomy::SUMMARY_KEY),
        q(ticket.summary())
    ));
    for (k, v) in ticket.fields() {
        out.push_str(&format!("{ITEM_SEPARATOR}{}{KEY_SEPARATOR}{}", q(k), q(v)));
    }
    out.push('}');
    out
}

/// The model's vocabulary as llguidance sees it.
struct Env {
    tokenizer: Tokenizer,
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |s| self.tokenizer.encode_text(s).unwrap_or_default())
    }
}

/// GPT-2 byte-level BPE: each byte is shown as one printable char; this inverts that map.
fn byte_level_map() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::new();
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        if printable(b) {
            map.insert(b as char, b);
        } else {
            map.insert(char::from_u32(next).expect("valid char"), b);
            next += 1;
        }
    }
    map
}

/// Builds llguidance's token environment for `tokenizer` with `vocab_size` rows of logits.
pub fn token_env(
    tokenizer: &Tokenizer,
    vocab_size: usize,
    end_of_turn: TokenId,
) -> Result<TokEnv, InferError> {
    let map = byte_level_map();
    let specials: std::collections::HashSet<u32> = tokenizer
        .inner()
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    let mut words = vec![Vec::new(); vocab_size];
    for (id, word) in words.iter_mut().enumerate() {
        let id = id as u32;
        let Some(tok) = tokenizer.id_to_token(id) else {
            continue;
        };
        *word = if specials.contains(&id) {
            let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            b.extend_from_slice(tok.as_bytes());
            b
        } else {
            match tok
                .chars()
                .map(|c| map.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
            {
                Some(b) => b,
                None => continue, // not byte-level: never allowed by the grammar
            }
        };
    }
    let mut info = TokRxInfo::new(vocab_size as u32, end_of_turn);
    info.tok_end_of_turn = Some(end_of_turn);
    let trie = TokTrie::from(&info, &words);
    Ok(Arc::new(Env {
        tokenizer: tokenizer.clone(),
        trie,
    }))
}

/// The grammar for a ticket schema: the schema itself plus llguidance's layout options.
pub fn ticket_grammar(schema: &Value) -> TopLevelGrammar {
    let mut schema = schema.clone();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert(
            "x-guidance".into(),
            json!({
                "whitespace_flexible": false,
                "item_separator": ITEM_SEPARATOR,
                "key_separator": KEY_SEPARATOR,
            }),
        );
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// Compiles grammars for one vocabulary; cheap to clone per request.
pub struct Grammar {
    factory: ParserFactory,
    grammar: TopLevelGrammar,
}

impl Grammar {
    /// Compiles `schema` for the vocabulary of `env`, failing early if llguidance rejects it.
    pub fn new(env: &TokEnv, schema: &Value) -> Result<Self, InferError> {
        let mut factory = ParserFactory::new_simple(env).map_err(|e| InferError::Grammar(e.to_string()))?;
        factory.quiet();
        let grammar = ticket_grammar(schema);
        let g = Self { factory, grammar };
        let m = g.matcher();
        if let Some(e) = m.get_error() {
            return Err(InferError::Grammar(e));
        }
        Ok(g)
    }

    /// A fresh matcher at the start of a ticket.
    pub fn matcher(&self) -> Matcher {
        Matcher::new(self.factory.create_parser(self.grammar.clone()))
    }
}
