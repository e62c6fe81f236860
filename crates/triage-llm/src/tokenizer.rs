//! The tokenizer, built from the GGUF's own metadata (vocabulary, merges, pre-tokenizer,
//! special tokens): no `tokenizer.json` download.

use candle_core::quantized::tokenizer::TokenizerFromGguf;

use crate::{GgufFile, LlmError};

/// A byte-level BPE tokenizer plus the model's special token ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    specials: Vec<String>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// Tokens that end an assistant turn for Qwen-family chat models, whatever the GGUF declares
/// as `eos`: `<|im_end|>` closes the turn, `<|endoftext|>` ends the document.
const END_OF_TURN_TOKENS: &[&str] = &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"];

impl Tokenizer {
    /// Builds the tokenizer from a GGUF's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, LlmError> {
        let inner = tokenizers::Tokenizer::from_gguf(gguf.content()).map_err(|e| LlmError::BadGguf {
            path: gguf.path().to_path_buf(),
            message: format!("cannot build the tokenizer from its metadata: {e}"),
        })?;
        let specials: Vec<String> = inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        let mut eos_ids: Vec<u32> = Vec::new();
        // An id past u32 (a corrupt header) is no token: the chat end-of-turn tokens remain.
        if let Some(id) = gguf
            .meta_u64("tokenizer.ggml.eos_token_id")
            .and_then(|id| u32::try_from(id).ok())
        {
            eos_ids.push(id);
        }
        for t in END_OF_TURN_TOKENS {
            if let Some(id) = inner.token_to_id(t) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(Self {
            inner,
            specials,
            eos_ids,
        })
    }

    /// Encodes a rendered prompt: special-token strings such as `<|im_start|>` become their
    /// single special ids. Only ever pass text produced by the chat template here, with any
    /// untrusted content passed through [`Tokenizer::neutralize_specials`] first.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes plain text; special-token strings in it are encoded as ordinary text, never
    /// as control tokens.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        self.encode_prompt(&self.neutralize_specials(text))
    }

    /// Makes untrusted text safe to place inside a prompt: every special-token string (e.g.
    /// `<|im_end|>`) gets a zero-width space after its first character, so it can no longer
    /// close the user turn or open a system turn, while reading the same to the model.
    pub fn neutralize_specials(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.specials {
            if out.contains(s.as_str()) {
                let mut chars = s.chars();
                let first = chars.next().map(String::from).unwrap_or_default();
                out = out.replace(s.as_str(), &format!("{first}\u{200B}{}", chars.as_str()));
            }
        }
        out
    }

    /// Decodes ids to text (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String, LlmError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))
    }

    /// The text of one token id (raw byte-level form decoded to UTF-8 where possible).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string, e.g. `<|im_end|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end generation: the GGUF's `eos` plus the chat end-of-turn tokens.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer (for grammar engines that need the vocabulary).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
