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

use candle_core::Device;
use llguidance::Matcher;
use serde::Serialize;
use triage_llm::lora::Lora;
use triage_llm::qwen2::{KvCache, LoadOptions, Qwen2};
use triage_llm::{ChatMessage, ChatTemplate, GgufFile, Role, Tokenizer};
use triage_taxonomy::{ticket_schema, Taxonomy, Ticket, Validator};

use crate::batcher::{to_vec, Batcher, Job, Member, Work};
use crate::calibration::Calibration;
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
    /// Folder where the system prompt's KV cache is kept between runs, in f16 (keyed by
    /// the model's SHA-256 and the exact prompt tokens), so a one-shot `triage infer` does
    /// not prefill it every time. Used only when `model_sha256` is known.
    pub prefix_cache_dir: Option<std::path::PathBuf>,
    /// SHA-256 of the GGUF file (lower-case hex), the model's identity in the prefix cache's
    /// key (`triage_registry::model_sha256` finds it).
    pub model_sha256: Option<String>,
    /// Where the weights and every pass live ([`Structurer::new`]; `with_model` takes the
    /// model's own device). `Device::Cpu` by default; `cuda` with the `cuda` feature.
    pub device: Device,
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
            model_sha256: None,
            device: Device::Cpu,
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
    /// Every allowed value with the model's renormalised log-probability, before any
    /// calibration: what `triage adapter calibrate` fits on. Not serialised.
    #[serde(skip)]
    pub scores: Vec<(String, f32)>,
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
    /// Whether any field's confidence is under `min_confidence` or unknown.
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
    /// Of all this ticket's passes (prefill included), those shared with other tickets
    /// decoded at the same time.
    pub shared_passes: usize,
    /// Timings.
    pub timings: Timings,
    /// Input hygiene notes (lossy UTF-8, truncation).
    pub warnings: Vec<String>,
}

impl Meta {
    /// Sets [`Meta::needs_review`] under `--min-confidence min`: some enum field of `taxonomy`
    /// has a confidence under `min`, or none that is a number (a remote backend may give no
    /// log-probabilities for it): an unknown confidence is reviewed, not waved through.
    pub fn flag_for_review(&mut self, taxonomy: &triage_taxonomy::Taxonomy, min: f32) {
        let confidence = |field: &str| {
            self.confidence
                .iter()
                .find(|c| c.field == field)
                .map(|c| c.confidence)
        };
        self.needs_review = taxonomy.fields.iter().any(|f| match confidence(&f.name) {
            Some(c) => c.is_nan() || c < min,
            None => true,
        });
    }
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
    prefix_cache: Mutex<Option<Arc<KvCache>>>,
    /// Merges the forward passes of tickets decoded at the same time.
    batcher: Batcher,
    prefix_file: Option<std::path::PathBuf>,
    /// LoRA adapter applied to everything after the shared system prompt (whose KV cache is
    /// the base model's: that is how the adapter was trained).
    adapter: Option<Arc<Lora>>,
    /// Per-field temperature and value biases applied to the enum scores (fitted for the
    /// adapter in use).
    calibration: Option<Arc<Calibration>>,
    opts: StructurerOptions,
}

impl Structurer {
    /// Loads the model from `gguf` and compiles the grammar for `taxonomy`.
    pub fn new(gguf: &GgufFile, taxonomy: Taxonomy, opts: StructurerOptions) -> Result<Self, InferError> {
        let load = LoadOptions {
            requantize_q5_0: opts.requantize_q5_0,
            ..LoadOptions::default()
        };
        let model = Arc::new(Qwen2::load(gguf, &opts.device, &load)?);
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
        let vocab_size = model.config().vocab_size;
        if end_of_turn as usize >= vocab_size {
            // A tokenizer longer than the embedding table: a GGUF put together from two models.
            return Err(triage_llm::LlmError::BadGguf {
                path: gguf.path().to_path_buf(),
                message: format!(
                    "its end-of-turn token id {end_of_turn} is past the model's {vocab_size} \
                     embedding rows: the tokenizer and the weights come from different models; \
                     pull the model again (`triage model pull`)"
                ),
            }
            .into());
        }
        let env = crate::grammar::token_env(&tokenizer, vocab_size, end_of_turn)?;
        let grammar = Grammar::new(&env, &schema)?;
        let system = [ChatMessage::new(Role::System, prompt.system())];
        let prefix = tokenizer.encode_prompt(&chat.render(&system, false)?)?;
        let prefix_file = match (&opts.prefix_cache_dir, &opts.model_sha256) {
            (Some(dir), Some(sha)) => Some(dir.join(prefix_cache_name(sha, &prefix, &opts))),
            _ => None,
        };
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
            batcher: Batcher::default(),
            end_of_turn,
            adapter: None,
            calibration: None,
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

    fn prefix_kv(&self) -> Result<Arc<KvCache>, InferError> {
        let mut slot = self.prefix_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        if let Some(file) = &self.prefix_file {
            if let Some(c) = KvCache::load(file, self.model.config(), self.prefix.len(), self.model.device())
            {
                tracing::debug!(file = %file.display(), "system prompt KV cache loaded");
                let c = Arc::new(c);
                *slot = Some(c.clone());
                return Ok(c);
            }
        }
        tracing::info!(
            tokens = self.prefix.len(),
            "prefilling the system prompt (cached afterwards)"
        );
        let mut cache = match self.opts.layerwise_prefill {
            true => self.model.prefill_layerwise(&self.prefix)?,
            false => {
                let mut cache = KvCache::default();
                self.model.forward(&self.prefix, &mut cache, 1)?;
                cache
            }
        };
        if let Some(file) = &self.prefix_file {
            // Decode with what the next process will read back (f16), not the f32 original.
            cache = cache.rounded_to_f16()?;
            if let Err(e) = cache.save(file) {
                tracing::warn!("could not keep the system prompt cache: {e}");
            }
        }
        let cache = Arc::new(cache);
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
        let cached = self.opts.prefix_cache && tokens.starts_with(&self.prefix);
        let start = if cached { self.prefix.len() } else { 0 };
        // Room for the rest of the prompt and a typical answer; the buffers grow if needed.
        let reserve = tokens.len() - start + 128;
        let mut cache = match cached {
            true => self.prefix_kv()?.fork(reserve)?,
            false => KvCache::default(),
        };
        cache.set_reserve(reserve);
        meta.cached_prompt_tokens = start;
        // In flight from here: the batcher waits for this ticket's passes (not while it was
        // tokenising or computing the shared prefix).
        let member = self.batcher.join();
        let mut dec = Decoder {
            s: self,
            member: &member,
            matcher: self.grammar.matcher(),
            cache,
            pending: tokens[start..].to_vec(),
            logits: Vec::new(),
            out: Vec::new(),
            meta: &mut meta,
            rng: self.opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            deadline,
        };
        let t_prefill = Instant::now();
        dec.flush()?;
        dec.meta.forward_passes = 0;
        dec.meta.timings.prefill_ms = ms(t_prefill);

        let t_decode = Instant::now();
        dec.run()?;
        let out = std::mem::take(&mut dec.out);
        drop(member);
        meta.timings.decode_ms = ms(t_decode);
        meta.output_tokens = out.len();
        let json = self.tokenizer.decode(&out)?;
        let ticket = self.validator.parse_str(&json).map_err(|v| InferError::Invalid {
            output: json.clone(),
            reason: v.to_string(),
        })?;
        if let Some(min) = self.opts.min_confidence {
            meta.flag_for_review(self.validator.taxonomy(), min);
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

    /// Calibrates every later call's enum decisions (and their confidences) with `cal`;
    /// [`FieldConfidence::scores`] keeps the uncalibrated scores.
    pub fn with_calibration(mut self, cal: Arc<Calibration>) -> Self {
        self.calibration = (!cal.is_empty()).then_some(cal);
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
    pub fn prefix_cache(&self) -> Result<Arc<KvCache>, InferError> {
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

/// File name of a persisted prefix cache: a hash of everything that determines its contents
/// (the model by its SHA-256, the exact prompt tokens, how it is computed). A collision only
/// costs a recomputation: shapes and length are checked at load.
fn prefix_cache_name(model_sha256: &str, prefix: &[u32], opts: &StructurerOptions) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    (
        model_sha256,
        prefix,
        opts.requantize_q5_0,
        opts.layerwise_prefill,
        env!("CARGO_PKG_VERSION"),
    )
        .hash(&mut h);
    let short = model_sha256.get(..16).unwrap_or(model_sha256);
    format!("prefix-{short}-{:016x}.f16.safetensors", h.finish())
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

/// The state of one decoding run.
struct Decoder<'a> {
    s: &'a Structurer,
    member: &'a Member<'a>,
    matcher: Matcher,
    cache: KvCache,
    /// Tokens of the prompt or the answer not yet run through the model: appended in one
    /// pass when logits are next needed (a sampled token together with the grammar-forced
    /// tokens after it).
    pending: Vec<u32>,
    /// Logits for the next position (valid when nothing is pending).
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
            self.flush()?;
            let tok = self.pick(&mask)?;
            if self.s.tokenizer.eos_ids().contains(&tok) {
                return Ok(());
            }
            self.matcher
                .consume_token(tok)
                .map_err(|e| InferError::Grammar(e.to_string()))?;
            self.out.push(tok);
            self.pending.push(tok);
        }
    }

    fn check_matcher(&self) -> Result<(), InferError> {
        match self.matcher.get_error() {
            Some(e) => Err(InferError::Grammar(e)),
            None => Ok(()),
        }
    }

    /// Appends tokens the grammar accepts: to the matcher and the output, and (when logits
    /// are next needed) the KV cache. Without fast-forward, one pass per token.
    fn commit(&mut self, toks: &[u32]) -> Result<(), InferError> {
        self.matcher
            .consume_tokens(toks)
            .map_err(|e| InferError::Grammar(e.to_string()))?;
        self.out.extend_from_slice(toks);
        self.meta.forced_tokens += toks.len();
        for t in toks {
            self.pending.push(*t);
            if !self.s.opts.fast_forward && !self.finished() {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Runs one job through the batcher: this ticket's part of the next forward pass.
    fn job(&mut self, work: Work) -> Result<Vec<Vec<f32>>, InferError> {
        let job = Job {
            cache: std::mem::take(&mut self.cache),
            work,
        };
        let done = self.member.run(&self.s.model, self.s.adapter.as_deref(), job)?;
        self.cache = done.cache;
        self.meta.forward_passes += 1;
        self.meta.shared_passes += usize::from(done.batch > 1);
        Ok(done.logits)
    }

    /// Runs the pending tokens, so `logits` is the next position's.
    fn flush(&mut self) -> Result<(), InferError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let toks = std::mem::take(&mut self.pending);
        let mut rows = self.job(Work::Extend(toks))?;
        self.logits = rows.pop().unwrap_or_default();
        Ok(())
    }

    /// Records a value the grammar forced (only one was possible, e.g. a single child).
    fn push_forced(&mut self, field: &str, value: String) {
        self.meta.confidence.push(FieldConfidence {
            field: field.to_string(),
            value: value.clone(),
            confidence: 1.0,
            top: vec![(value.clone(), 1.0)],
            scores: vec![(value, 0.0)],
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
        self.flush()?;
        let seqs: Vec<&[u32]> = cands.iter().map(|(_, t)| t.as_slice()).collect();
        let raw = self.score(&seqs)?;
        let mut logp = raw.clone();
        if let Some(cal) = &self.s.calibration {
            let names: Vec<&str> = cands.iter().map(|(v, _)| *v).collect();
            cal.apply(&field.name, &names, &mut logp);
        }
        let probs = softmax(&logp, 1.0);
        if !probs.iter().all(|p| p.is_finite()) {
            return Err(InferError::NonFinite {
                field: field.name.clone(),
                scores: format!("{logp:?}"),
            });
        }
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
            scores: cands.iter().map(|(v, _)| v.to_string()).zip(raw).collect(),
        });
        let toks = cands[chosen].1.clone();
        self.commit(&toks)
    }

    /// The renormalised log-probability of each candidate token sequence after the current
    /// position: a walk down their trie, level by level, where each node with two or more
    /// children divides its probability among them by their logits. The model runs only at
    /// nodes that candidates share, and all of one level's nodes in one pass (each scored
    /// after the cache and dropped).
    fn score(&mut self, seqs: &[&[u32]]) -> Result<Vec<f32>, InferError> {
        let mut logp = vec![0f32; seqs.len()];
        // (path from the current position, candidates through it, logits after it)
        let mut level = vec![(
            Vec::new(),
            (0..seqs.len()).collect::<Vec<_>>(),
            self.logits.clone(),
        )];
        loop {
            let mut next: Vec<(Vec<u32>, Vec<usize>)> = Vec::new();
            for (path, members, logits) in &level {
                let depth = path.len();
                let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
                for &i in members {
                    let Some(&t) = seqs[i].get(depth) else { continue };
                    match groups.iter_mut().find(|(g, _)| *g == t) {
                        Some((_, m)) => m.push(i),
                        None => groups.push((t, vec![i])),
                    }
                }
                let logit = |t: u32| logits.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY);
                if groups.len() > 1 {
                    let max = groups
                        .iter()
                        .map(|(t, _)| logit(*t))
                        .fold(f32::NEG_INFINITY, f32::max);
                    let z = groups
                        .iter()
                        .map(|(t, _)| (logit(*t) - max).exp())
                        .sum::<f32>()
                        .ln()
                        + max;
                    for (t, m) in &groups {
                        for &i in m {
                            logp[i] += logit(*t) - z;
                        }
                    }
                }
                for (t, m) in groups {
                    if m.len() > 1 {
                        let mut p = path.clone();
                        p.push(t);
                        next.push((p, m));
                    }
                }
            }
            if next.is_empty() {
                return Ok(logp);
            }
            let rows = self.job(Work::Peek(next.iter().map(|(p, _)| p.clone()).collect()))?;
            if rows.len() != next.len() {
                return Err(InferError::Grammar("a scoring pass lost a branch".into()));
            }
            level = next.into_iter().zip(rows).map(|((p, m), l)| (p, m, l)).collect();
        }
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
