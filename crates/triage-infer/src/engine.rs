//! The [`Structurer`]: incident text in, typed [`Ticket`] plus [`Meta`] out.
//!
//! Per ticket: render the prompt (system turn with the schema, user turn with the incident),
//! reuse the system turn's KV cache (computed once per process), prefill the rest, then decode
//! under the grammar:
//! * tokens the grammar forces (keys, quotes, separators) are appended in one batched forward
//!   pass (fast-forward) instead of one decode step each;
//! * at each enum value the allowed values are scored as whole sequences — a trie walk over
//!   their tokens that runs the model only where two values share a prefix — giving the
//!   value with the highest probability and that field's confidence (probability mass over the
//!   allowed values, renormalised);
//! * the free-text summary is decoded token by token under the grammar's mask.
//!
//! Decoding stops when the grammar accepts (the closing brace), so the end-of-turn trap
//! (a finished grammar that keeps emitting whitespace) cannot occur.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{Device, Tensor};
use llguidance::Matcher;
use serde::Serialize;
use triage_llm::lora::Lora;
use triage_llm::qwen2::{KvCache, LoadOptions, Qwen2};
use triage_llm::{ChatMessage, ChatTemplate, GgufFile, Role, Tokenizer};
use triage_taxonomy::{ticket_schema, Taxonomy, Ticket, Validator};

use crate::grammar::Grammar;
use crate::prompt::PromptBuilder;
use crate::values::{enum_candidates, value_state, ValueState};
use crate::InferError;

/// Decoding settings.
#[derive(Debug, Clone)]
pub struct StructurerOptions {
    /// Hard cap on generated tokens (a ticket needs ~40–80).
    pub max_new_tokens: usize,
    /// 0 = greedy (deterministic); otherwise softmax temperature for sampling.
    pub temperature: f32,
    /// Seed for sampling.
    pub seed: u64,
    /// Fields whose confidence is below this mark the ticket `needs_review`.
    pub min_confidence: Option<f32>,
    /// Append grammar-forced tokens in one forward pass.
    pub fast_forward: bool,
    /// Reuse the system prompt's KV cache across tickets.
    pub prefix_cache: bool,
    /// Incident tokens kept; longer input is cut from the middle.
    pub max_input_tokens: usize,
    /// Re-quantize Q5_0 weights to Q8_0 at load (faster CPU kernels).
    pub requantize_q5_0: bool,
    /// Folder where the system prompt's KV cache is kept between runs (keyed by model file
    /// and exact prompt tokens), so a one-shot `triage infer` does not prefill it every time.
    pub prefix_cache_dir: Option<std::path::PathBuf>,
    /// Compute the system prompt's KV cache one layer at a time with dense weight copies
    /// ([`Qwen2::prefill_layerwise`]): for a training process, which must not keep candle's
    /// repacked copies of the quantized weights.
    pub layerwise_prefill: bool,
}

impl Default for StructurerOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 320,
            temperature: 0.0,
            seed: 0,
            min_confidence: None,
            fast_forward: true,
            prefix_cache: true,
            max_input_tokens: 1536,
            requantize_q5_0: true,
            prefix_cache_dir: None,
            layerwise_prefill: false,
        }
    }
}

/// Confidence of one enum field.
#[derive(Debug, Clone, Serialize)]
pub struct FieldConfidence {
    /// Field name.
    pub field: String,
    /// Chosen value.
    pub value: String,
    /// Probability of the chosen value among the allowed ones.
    pub confidence: f32,
    /// The best alternatives with their probabilities (at most 3, chosen value included).
    pub top: Vec<(String, f32)>,
}

/// Timings of one ticket, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Prompt prefill (the part not served from the prefix cache).
    pub prefill_ms: f64,
    /// Everything after prefill.
    pub decode_ms: f64,
    /// Of `decode_ms`: grammar mask computation.
    pub mask_ms: f64,
    /// Wall time of the call.
    pub total_ms: f64,
}

/// Facts about one structuring call; never part of the ticket itself.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Meta {
    /// Per enum field, in ticket order.
    pub confidence: Vec<FieldConfidence>,
    /// Whether any field's confidence is under `min_confidence`.
    pub needs_review: bool,
    /// Prompt tokens in total.
    pub prompt_tokens: usize,
    /// Of those, served from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Tokens of the JSON answer.
    pub output_tokens: usize,
    /// Of those, appended by fast-forward or enum scoring rather than sampled one by one.
    pub forced_tokens: usize,
    /// Model forward passes after prefill.
    pub forward_passes: usize,
    /// Timings.
    pub timings: Timings,
    /// Input hygiene notes (lossy UTF-8, truncation).
    pub warnings: Vec<String>,
}

/// A structured incident.
#[derive(Debug, Clone)]
pub struct Structured {
    /// The validated ticket.
    pub ticket: Ticket,
    /// Confidence, token counts and timings.
    pub meta: Meta,
}

/// Turns incident text into tickets for one model and taxonomy. Build once; `Send + Sync`:
/// concurrent calls share the weights and the prefix cache, each with its own KV cache.
pub struct Structurer {
    model: Arc<Qwen2>,
    tokenizer: Tokenizer,
    chat: ChatTemplate,
    prompt: PromptBuilder,
    pub(crate) taxonomy: Taxonomy,
    validator: Validator,
    pub(crate) grammar: Grammar,
    pub(crate) env: toktrie::TokEnv,
    pub(crate) end_of_turn: u32,
    prefix: Vec<u32>,
    prefix_cache: Mutex<Option<KvCache>>,
    prefix_file: Option<std::path::PathBuf>,
    /// LoRA adapter applied to everything after the shared system prompt (whose KV cache is
    /// the base model's: that is how the adapter was trained).
    adapter: Option<Arc<Lora>>,
    opts: StructurerOptions,
}

impl Structurer {
    /// Loads the model from `gguf` and compiles the grammar for `taxonomy`.
    pub fn new(gguf: &GgufFile, taxonomy: Taxonomy, opts: StructurerOptions) -> Result<Self, InferError> {
        let load = LoadOptions {
            requantize_q5_0: opts.requantize_q5_0,
            ..LoadOptions::default()
        };
        let model = Arc::new(Qwen2::load(gguf, &Device::Cpu, &load)?);
        Self::with_model(model, gguf, taxonomy, opts)
    }

    /// Builds a structurer around already loaded weights (several taxonomies, one model).
    pub fn with_model(
        model: Arc<Qwen2>,
        gguf: &GgufFile,
        taxonomy: Taxonomy,
        opts: StructurerOptions,
    ) -> Result<Self, InferError> {
        let tokenizer = Tokenizer::from_gguf(gguf)?;
        let chat = ChatTemplate::from_gguf(gguf)?;
        let schema = ticket_schema(&taxonomy);
        let prompt = PromptBuilder::new(&taxonomy, &schema)?;
        let end_of_turn = tokenizer
            .token_to_id("<|im_end|>")
            .or_else(|| tokenizer.eos_ids().first().copied())
            .ok_or_else(|| InferError::Grammar("the tokenizer has no end-of-turn token".into()))?;
        let env = crate::grammar::token_env(&tokenizer, model.config().vocab_size, end_of_turn)?;
        let grammar = Grammar::new(&env, &schema)?;
        let system = [ChatMessage::new(Role::System, prompt.system())];
        let prefix = tokenizer.encode_prompt(&chat.render(&system, false)?)?;
        let prefix_file = opts
            .prefix_cache_dir
            .as_ref()
            .map(|dir| dir.join(prefix_cache_name(gguf, &prefix, &opts)));
        Ok(Self {
            prefix_file,
            validator: Validator::new(&taxonomy),
            model,
            tokenizer,
            chat,
            prompt,
            taxonomy,
            grammar,
            env,
            prefix,
            prefix_cache: Mutex::new(None),
            end_of_turn,
            adapter: None,
            opts,
        })
    }

    /// The taxonomy.
    pub fn taxonomy(&self) -> &Taxonomy {
        &self.taxonomy
    }

    /// The options.
    pub fn options(&self) -> &StructurerOptions {
        &self.opts
    }

    /// The shared weights.
    pub fn model(&self) -> &Arc<Qwen2> {
        &self.model
    }

    /// Number of tokens of the cached system prompt.
    pub fn system_prompt_tokens(&self) -> usize {
        self.prefix.len()
    }

    /// Computes the system prompt's KV cache now (otherwise the first call does it).
    pub fn warm_up(&self) -> Result<(), InferError> {
        self.prefix_kv().map(|_| ())
    }

    fn prefix_kv(&self) -> Result<KvCache, InferError> {
        let mut slot = self.prefix_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        if let Some(file) = &self.prefix_file {
            if let Some(c) = KvCache::load(file, self.model.config(), self.prefix.len(), self.model.device())
            {
                tracing::debug!(file = %file.display(), "system prompt KV cache loaded");
                *slot = Some(c.clone());
                return Ok(c);
            }
        }
        tracing::info!(
            tokens = self.prefix.len(),
            "prefilling the system prompt (cached afterwards)"
        );
        let cache = match self.opts.layerwise_prefill {
            true => self.model.prefill_layerwise(&self.prefix)?,
            false => {
                let mut cache = KvCache::default();
                self.model.forward(&self.prefix, &mut cache, 1)?;
                cache
            }
        };
        if let Some(file) = &self.prefix_file {
            if let Err(e) = cache.save(file) {
                tracing::warn!("could not keep the system prompt cache: {e}");
            }
        }
        *slot = Some(cache.clone());
        Ok(cache)
    }

    /// Structures one incident. Empty input is an error; over-long input is cut from the
    /// middle with a warning in [`Meta::warnings`].
    pub fn structure(&self, text: &str) -> Result<Structured, InferError> {
        self.structure_until(text, None)
    }

    /// [`Structurer::structure`] that gives up with [`InferError::Deadline`] once `deadline`
    /// passes (checked between decoding steps), so a server can bound each request's work.
    pub fn structure_until(&self, text: &str, deadline: Option<Instant>) -> Result<Structured, InferError> {
        let t0 = Instant::now();
        let mut meta = Meta::default();
        let tokens = self.prompt_tokens(text, &mut meta)?;
        let (mut cache, start) = if self.opts.prefix_cache && tokens.starts_with(&self.prefix) {
            (self.prefix_kv()?, self.prefix.len())
        } else {
            (KvCache::default(), 0)
        };
        meta.cached_prompt_tokens = start;
        let t_prefill = Instant::now();
        let logits = self
            .model
            .forward_with(&tokens[start..], &mut cache, 1, self.adapter.as_deref())?;
        meta.timings.prefill_ms = ms(t_prefill);

        let t_decode = Instant::now();
        let mut dec = Decoder {
            s: self,
            matcher: self.grammar.matcher(),
            cache,
            logits: to_vec(&logits)?,
            out: Vec::new(),
            meta: &mut meta,
            rng: self.opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            deadline,
        };
        dec.run()?;
        let out = std::mem::take(&mut dec.out);
        meta.timings.decode_ms = ms(t_decode);
        meta.output_tokens = out.len();
        let json = self.tokenizer.decode(&out)?;
        let ticket = self.validator.parse_str(&json).map_err(|v| InferError::Invalid {
            output: json.clone(),
            reason: v.to_string(),
        })?;
        if let Some(min) = self.opts.min_confidence {
            meta.needs_review = meta.confidence.iter().any(|c| c.confidence < min);
        }
        meta.timings.total_ms = ms(t0);
        Ok(Structured { ticket, meta })
    }

    /// Baseline for benchmarks: the same prompt, full prefill (no prefix cache), greedy
    /// decoding without grammar until an end-of-turn token or `max_new_tokens`. Returns the raw
    /// text (not necessarily a valid ticket) and its token counts and timings.
    pub fn generate_unconstrained(&self, text: &str) -> Result<(String, Meta), InferError> {
        let t0 = Instant::now();
        let mut meta = Meta::default();
        let tokens = self.prompt_tokens(text, &mut meta)?;
        let mut cache = KvCache::default();
        let t_prefill = Instant::now();
        let mut logits = to_vec(&self.model.forward_with(
            &tokens,
            &mut cache,
            1,
            self.adapter.as_deref(),
        )?)?;
        meta.timings.prefill_ms = ms(t_prefill);
        let t_decode = Instant::now();
        let mut out = Vec::new();
        while out.len() < self.opts.max_new_tokens {
            let tok = argmax(&logits) as u32;
            if self.tokenizer.eos_ids().contains(&tok) {
                break;
            }
            out.push(tok);
            logits = to_vec(
                &self
                    .model
                    .forward_with(&[tok], &mut cache, 1, self.adapter.as_deref())?,
            )?;
            meta.forward_passes += 1;
        }
        meta.timings.decode_ms = ms(t_decode);
        meta.output_tokens = out.len();
        meta.timings.total_ms = ms(t0);
        Ok((self.tokenizer.decode(&out)?, meta))
    }

    /// Applies a LoRA adapter (trained with `triage train`) to every later call.
    pub fn with_adapter(mut self, adapter: Arc<Lora>) -> Self {
        self.adapter = Some(adapter);
        self
    }

    /// The adapter in use, if any.
    pub fn adapter(&self) -> Option<&Arc<Lora>> {
        self.adapter.as_ref()
    }

    /// The system prompt's tokens (the shared prefix whose KV cache is reused).
    pub fn prefix_tokens(&self) -> &[u32] {
        &self.prefix
    }

    /// The base model's KV cache of the system prompt (computed once, then shared).
    pub fn prefix_cache(&self) -> Result<KvCache, InferError> {
        self.prefix_kv()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat
    }

    /// The prompt builder.
    pub fn prompt(&self) -> &PromptBuilder {
        &self.prompt
    }

    /// Input hygiene shared with training: trims, neutralises special tokens and cuts
    /// over-long input from the middle (warnings describe what was done).
    pub fn clean_input(&self, text: &str) -> Result<(String, Vec<String>), InferError> {
        let mut warnings = Vec::new();
        let t = self.prepare_input(text, &mut warnings)?;
        Ok((t, warnings))
    }

    /// The full prompt's tokens for one incident (input hygiene included), checked against
    /// the context budget.
    fn prompt_tokens(&self, text: &str, meta: &mut Meta) -> Result<Vec<u32>, InferError> {
        let text = self.prepare_input(text, &mut meta.warnings)?;
        let rendered = self.chat.render(&self.prompt.messages(&text)?, true)?;
        let tokens = self.tokenizer.encode_prompt(&rendered)?;
        meta.prompt_tokens = tokens.len();
        let budget = self.model.max_seq_len().saturating_sub(self.opts.max_new_tokens);
        if tokens.len() > budget {
            return Err(InferError::TooLong {
                tokens: tokens.len(),
                budget,
            });
        }
        Ok(tokens)
    }

    fn prepare_input(&self, text: &str, warnings: &mut Vec<String>) -> Result<String, InferError> {
        let (text, w) = crate::prompt::clean_input(&self.tokenizer, text, self.opts.max_input_tokens)?;
        warnings.extend(w);
        Ok(text)
    }
}

/// File name of a persisted prefix cache: a hash of everything that determines its contents.
fn prefix_cache_name(gguf: &GgufFile, prefix: &[u32], opts: &StructurerOptions) -> String {
    use std::hash::{Hash, Hasher};
    // FNV-1a over a canonical description; collisions only cost a recomputation (shapes and
    // length are checked at load) and the model identity includes size and mtime.
    let meta = std::fs::metadata(gguf.path()).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .map(|t| format!("{t:?}"));
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    (
        gguf.path(),
        gguf.file_len(),
        mtime,
        prefix,
        opts.requantize_q5_0,
        opts.layerwise_prefill,
        env!("CARGO_PKG_VERSION"),
    )
        .hash(&mut h);
    format!("prefix-{:016x}.safetensors", h.finish())
}

struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn to_vec(logits: &Tensor) -> Result<Vec<f32>, InferError> {
    logits
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| InferError::Model(e.into()))
}

/// The state of one decoding run.
struct Decoder<'a> {
    s: &'a Structurer,
    matcher: Matcher,
    cache: KvCache,
    /// Logits for the next position.
    logits: Vec<f32>,
    out: Vec<u32>,
    meta: &'a mut Meta,
    rng: u64,
    deadline: Option<Instant>,
}

impl Decoder<'_> {
    fn run(&mut self) -> Result<(), InferError> {
        let fields = &self.s.taxonomy.fields;
        let mut next_field = 0;
        loop {
            self.check_matcher()?;
            if self.finished() {
                // Fields after the last decision were forced whole (one possible value).
                while next_field < fields.len() {
                    match self.value_state(&fields[next_field].name) {
                        Some(ValueState::Forced(value)) => self.push_forced(&fields[next_field].name, value),
                        _ => {
                            return Err(InferError::Grammar(format!(
                                "no value decoded for `{}`",
                                fields[next_field].name
                            )))
                        }
                    }
                    next_field += 1;
                }
                return Ok(());
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(InferError::Deadline {
                    tokens: self.out.len(),
                });
            }
            if self.out.len() >= self.s.opts.max_new_tokens {
                return Err(InferError::Runaway {
                    tokens: self.out.len(),
                    partial: self.s.tokenizer.decode(&self.out).unwrap_or_default(),
                });
            }
            if self.s.opts.fast_forward {
                let ff = self.matcher.compute_ff_tokens();
                if !ff.is_empty() {
                    self.commit(&ff)?;
                    continue;
                }
            }
            if next_field < fields.len() {
                match self.value_state(&fields[next_field].name) {
                    None => {}
                    Some(ValueState::Open { opening, pending }) => {
                        self.decide_enum(next_field, &opening, &pending)?;
                        next_field += 1;
                        continue;
                    }
                    Some(ValueState::Forced(value)) => {
                        self.push_forced(&fields[next_field].name, value);
                        next_field += 1;
                        continue;
                    }
                }
            }
            let t = Instant::now();
            let mask = self
                .matcher
                .compute_mask()
                .map_err(|e| InferError::Grammar(e.to_string()))?;
            self.meta.timings.mask_ms += ms(t);
            let tok = self.pick(&mask)?;
            if self.s.tokenizer.eos_ids().contains(&tok) {
                return Ok(());
            }
            self.matcher
                .consume_token(tok)
                .map_err(|e| InferError::Grammar(e.to_string()))?;
            self.out.push(tok);
            if !self.finished() {
                self.forward(&[tok])?;
            }
        }
    }

    fn check_matcher(&self) -> Result<(), InferError> {
        match self.matcher.get_error() {
            Some(e) => Err(InferError::Grammar(e)),
            None => Ok(()),
        }
    }

    /// Appends tokens the grammar accepts: to the matcher, the output and the KV cache.
    fn commit(&mut self, toks: &[u32]) -> Result<(), InferError> {
        self.matcher
            .consume_tokens(toks)
            .map_err(|e| InferError::Grammar(e.to_string()))?;
        self.out.extend_from_slice(toks);
        self.meta.forced_tokens += toks.len();
        if self.finished() {
            return Ok(()); // the closing brace: no logits are needed after it
        }
        if self.s.opts.fast_forward {
            self.forward(toks)
        } else {
            toks.iter().try_for_each(|t| self.forward(&[*t]))
        }
    }

    fn forward(&mut self, toks: &[u32]) -> Result<(), InferError> {
        let logits = self
            .s
            .model
            .forward_with(toks, &mut self.cache, 1, self.s.adapter.as_deref())?;
        self.meta.forward_passes += 1;
        self.logits = to_vec(&logits)?;
        Ok(())
    }

    /// Records a value the grammar forced (only one was possible, e.g. a single child).
    fn push_forced(&mut self, field: &str, value: String) {
        self.meta.confidence.push(FieldConfidence {
            field: field.to_string(),
            value: value.clone(),
            confidence: 1.0,
            top: vec![(value, 1.0)],
        });
    }

    /// Whether the grammar is complete (the ticket's closing brace was emitted).
    fn finished(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false) || self.matcher.is_stopped()
    }

    fn value_state(&mut self, field: &str) -> Option<ValueState> {
        value_state(&self.s.env, &self.out, &mut self.matcher, field)
    }

    /// Chooses the value of enum field `idx` by scoring each allowed value as a whole.
    fn decide_enum(&mut self, idx: usize, opening: &[u8], pending: &[u8]) -> Result<(), InferError> {
        let field = &self.s.taxonomy.fields[idx];
        let parent = field.dependency.as_ref().and_then(|dep| {
            self.meta
                .confidence
                .iter()
                .find(|c| c.field == dep.parent)
                .map(|c| c.value.as_str())
        });
        let cands = enum_candidates(&self.s.env, &mut self.matcher, field, parent, opening, pending);
        if cands.is_empty() {
            return Err(InferError::Grammar(format!(
                "no allowed value of `{}` fits the grammar here",
                field.name
            )));
        }
        let mut logp = vec![0f32; cands.len()];
        let idxs: Vec<usize> = (0..cands.len()).collect();
        let seqs: Vec<&[u32]> = cands.iter().map(|(_, t)| t.as_slice()).collect();
        let logits = std::mem::take(&mut self.logits);
        self.score(&seqs, &idxs, 0, &logits, &self.cache.clone(), &mut logp)?;
        self.logits = logits;
        let probs = softmax(&logp, 1.0);
        let chosen = if self.s.opts.temperature > 0.0 {
            let p = softmax(&logp, self.s.opts.temperature);
            sample(&p, &mut self.rng)
        } else {
            argmax(&probs)
        };
        let mut order: Vec<usize> = (0..cands.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        self.meta.confidence.push(FieldConfidence {
            field: field.name.clone(),
            value: cands[chosen].0.to_string(),
            confidence: probs[chosen],
            top: order
                .iter()
                .take(3)
                .map(|&i| (cands[i].0.to_string(), probs[i]))
                .collect(),
        });
        let toks = cands[chosen].1.clone();
        self.commit(&toks)
    }

    /// Adds to `logp[i]` the renormalised log-probability of each candidate's tokens from
    /// `depth` on, running the model only where candidates share a token.
    fn score(
        &mut self,
        seqs: &[&[u32]],
        idxs: &[usize],
        depth: usize,
        logits: &[f32],
        cache: &KvCache,
        logp: &mut [f32],
    ) -> Result<(), InferError> {
        let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
        for &i in idxs {
            let Some(&t) = seqs[i].get(depth) else { continue };
            match groups.iter_mut().find(|(g, _)| *g == t) {
                Some((_, m)) => m.push(i),
                None => groups.push((t, vec![i])),
            }
        }
        if groups.len() > 1 {
            let max = groups
                .iter()
                .map(|(t, _)| logits[*t as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            let z = groups
                .iter()
                .map(|(t, _)| (logits[*t as usize] - max).exp())
                .sum::<f32>()
                .ln()
                + max;
            for (t, members) in &groups {
                for &i in members {
                    logp[i] += logits[*t as usize] - z;
                }
            }
        }
        for (t, members) in groups {
            if members.len() > 1 {
                let mut c = cache.clone();
                let next = self
                    .s
                    .model
                    .forward_with(&[t], &mut c, 1, self.s.adapter.as_deref())?;
                self.meta.forward_passes += 1;
                self.score(seqs, &members, depth + 1, &to_vec(&next)?, &c, logp)?;
            }
        }
        Ok(())
    }

    /// Picks the next token among those the mask allows.
    fn pick(&mut self, mask: &toktrie::SimpleVob) -> Result<u32, InferError> {
        let allowed = mask.to_list();
        if allowed.is_empty() {
            return Err(InferError::Grammar("the grammar allows no token here".into()));
        }
        let l: Vec<f32> = allowed
            .iter()
            .map(|&t| self.logits.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY))
            .collect();
        let i = if self.s.opts.temperature > 0.0 {
            sample(&softmax(&l, self.s.opts.temperature), &mut self.rng)
        } else {
            argmax(&l)
        };
        Ok(allowed[i])
    }
}

fn softmax(x: &[f32], temperature: f32) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| ((v - max) / temperature).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// Samples an index from probabilities with a xorshift generator.
fn sample(p: &[f32], state: &mut u64) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let u = (*state >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0f64;
    for (i, v) in p.iter().enumerate() {
        acc += f64::from(*v);
        if u < acc {
            return i;
        }
    }
    // Rounding left u above the total: the last index with any probability.
    p.iter().rposition(|v| *v > 0.0).unwrap_or(0)
}
