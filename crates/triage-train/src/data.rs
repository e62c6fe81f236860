//! Examples → token sequences for training, with the inference prompt.

use triage_data::rng::Rng;
use triage_data::Example;
use triage_infer::{instructions, render_instruction, Instruction, Structurer, TokenRole};
use triage_llm::ChatMessage;

use crate::TrainError;

/// One encoded example: the tokens after the shared system-prompt prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Example id.
    pub id: String,
    /// Tokens after the prefix: the rest of the prompt, the assistant's JSON, `<|im_end|>`.
    pub tokens: Vec<u32>,
    /// Index in `tokens` of the first assistant token (the loss covers `start..`).
    pub start: usize,
    /// How the decoder produces each answer token (`tokens[start..]`).
    pub roles: Vec<TokenRole>,
}

impl Item {
    /// Number of tokens the loss is computed on.
    pub fn target_len(&self) -> usize {
        self.tokens.len() - self.start
    }
}

/// Encodes examples. Instruction variant per example: the canonical one when
/// `vary_instructions` is off, else a seeded choice over `prompts/instructions.toml` with the
/// field order shuffled.
pub struct Encoder<'a> {
    structurer: &'a Structurer,
    variants: Vec<Instruction>,
}

impl<'a> Encoder<'a> {
    /// An encoder using `structurer`'s tokenizer, chat template and prompts.
    pub fn new(structurer: &'a Structurer) -> Result<Self, TrainError> {
        Ok(Encoder {
            structurer,
            variants: instructions(),
        })
    }

    /// Encodes one example; `variant_seed` picks the instruction (None: canonical). Errors
    /// name the example.
    pub fn encode(&self, e: &Example, variant_seed: Option<u64>) -> Result<Item, TrainError> {
        self.encode_inner(e, variant_seed).map_err(|err| match err {
            TrainError::Invalid(m) if m.starts_with("example ") => TrainError::Invalid(m),
            other => TrainError::Invalid(format!("example {}: {other}", e.id)),
        })
    }

    fn encode_inner(&self, e: &Example, variant_seed: Option<u64>) -> Result<Item, TrainError> {
        let s = self.structurer;
        let (text, _) = s.clean_input(&e.text)?;
        let instruction = match variant_seed {
            None => None,
            Some(seed) => {
                let mut rng = Rng::new(seed);
                let v = rng.pick(&self.variants);
                let mut fields: Vec<&str> = s.taxonomy().fields.iter().map(|f| f.name.as_str()).collect();
                rng.shuffle(&mut fields);
                Some(render_instruction(v, &s.taxonomy().name, &fields)?)
            }
        };
        let messages: Vec<ChatMessage> = s.prompt().messages_with(&text, instruction.as_deref())?;
        let prompt = s.chat_template().render(&messages, true)?;
        let mut tokens = s.tokenizer().encode_prompt(&prompt)?;
        let prefix = s.prefix_tokens();
        if !tokens.starts_with(prefix) {
            return Err(TrainError::Invalid(format!(
                "example {}: the prompt does not start with the system-prompt tokens",
                e.id
            )));
        }
        tokens.drain(..prefix.len());
        let start = tokens.len();
        // The answer as constrained decoding produces it (ends with <|im_end|>).
        let answer = s.answer_tokens(&e.ticket)?;
        tokens.extend(answer.iter().map(|t| t.id));
        Ok(Item {
            id: e.id.clone(),
            tokens,
            start,
            roles: answer.into_iter().map(|t| t.role).collect(),
        })
    }

    /// Encodes all examples; the instruction of example `i` is drawn from `seed` and `i`.
    /// Examples longer than `max_tokens` after the prefix are skipped and returned by id.
    pub fn encode_all(
        &self,
        examples: &[Example],
        seed: Option<u64>,
        max_tokens: usize,
    ) -> Result<(Vec<Item>, Vec<String>), TrainError> {
        let mut items = Vec::with_capacity(examples.len());
        let mut skipped = Vec::new();
        for (i, e) in examples.iter().enumerate() {
            let item = self.encode(
                e,
                seed.map(|s| s ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            )?;
            if item.tokens.len() > max_tokens {
                skipped.push(e.id.clone());
            } else {
                items.push(item);
            }
        }
        Ok((items, skipped))
    }
}

/// Batches of item indices: sorted by length so a batch pads little, then the batch order
/// is shuffled with `seed` (one permutation per epoch).
pub fn batches(items: &[Item], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    // Shuffle first so equal lengths are mixed, then a stable sort by length.
    Rng::new(seed).shuffle(&mut order);
    order.sort_by_key(|&i| items[i].tokens.len());
    let mut out: Vec<Vec<usize>> = order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect();
    Rng::new(seed ^ 0xB47C).shuffle(&mut out);
    out
}
