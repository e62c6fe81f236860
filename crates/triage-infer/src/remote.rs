//! [`RemoteStructurer`]: the same work sent to an OpenAI-compatible server (vLLM,
//! llama-server, a hosted API) for scale-out beyond one machine.
//!
//! Each incident gets the messages and the ticket JSON Schema that local inference uses
//! (`triage prompt --json` prints them), as `response_format: json_schema`, greedy, with
//! the adapter chosen by model name (vLLM `--lora-modules NAME=DIR`). The answer is validated
//! against the taxonomy like a local ticket; **an invalid answer is a per-ticket error,
//! never repaired**: whether a server's grammar support holds the whole schema (the
//! per-category `anyOf` of the subcategory) is exactly what this surfaces.
//!
//! Confidence: where the server returns `logprobs`, a field's confidence is the probability
//! of its value's tokens as sampled (their log-probabilities summed over the tokens that
//! spell the value). That is the full-vocabulary probability, not the local engine's
//! renormalisation among the allowed values, so it is lower or equal; without `logprobs`
//! the ticket has no confidences.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use triage_llm::Tokenizer;
use triage_taxonomy::{ticket_schema, Taxonomy, Validator};

use crate::engine::{FieldConfidence, Meta, Structured};
use crate::prompt::{clean_input, PromptBuilder};
use crate::InferError;

/// Where and how to reach the server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Base URL, e.g. `http://gpu-box:8000` or `http://gpu-box:8000/v1`.
    pub url: String,
    /// Model name to request (vLLM: the base model or a `--lora-modules` adapter name).
    pub model: String,
    /// Bearer token, if the server wants one.
    pub api_key: Option<String>,
    /// Cap on the answer's tokens.
    pub max_new_tokens: usize,
    /// Incident tokens kept (cut from the middle beyond), as locally.
    pub max_input_tokens: usize,
    /// Time allowed for one request.
    pub timeout: Duration,
    /// Fields whose confidence is below this mark the ticket `needs_review`.
    pub min_confidence: Option<f32>,
    /// Send the schema without its `anyOf` rules (llama.cpp's schema-to-grammar conversion
    /// mishandles the per-category `anyOf` of the subcategory and then writes incomplete
    /// tickets). The answers are still validated against the full rules, so what the server
    /// gets wrong is counted, not hidden.
    pub drop_any_of: bool,
    /// Engine-specific request fields merged into every body (e.g. llama-server's
    /// `{"cache_prompt": true}`).
    pub extra: serde_json::Map<String, Value>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            url: String::new(),
            model: "triage".into(),
            api_key: None,
            max_new_tokens: 320,
            max_input_tokens: 1536,
            timeout: Duration::from_secs(120),
            min_confidence: None,
            drop_any_of: false,
            extra: serde_json::Map::new(),
        }
    }
}

/// `schema` without any `anyOf` (at any depth).
fn without_any_of(schema: &Value) -> Value {
    match schema {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "anyOf")
                .map(|(k, v)| (k.clone(), without_any_of(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_any_of).collect()),
        v => v.clone(),
    }
}

/// Structures incidents on an OpenAI-compatible server. `Send + Sync`: share one.
pub struct RemoteStructurer {
    opts: RemoteOptions,
    endpoint: String,
    taxonomy: Taxonomy,
    schema: Value,
    prompt: PromptBuilder,
    validator: Validator,
    tokenizer: Tokenizer,
    agent: ureq::Agent,
}

impl RemoteStructurer {
    /// A client for `taxonomy`; `tokenizer` is the model's (from its GGUF header), used for
    /// the same input hygiene as local inference.
    pub fn new(opts: RemoteOptions, taxonomy: Taxonomy, tokenizer: Tokenizer) -> Result<Self, InferError> {
        let base = opts.url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(InferError::Remote {
                url: opts.url.clone(),
                reason: "the backend URL must start with http:// or https://".into(),
                retryable: false,
            });
        }
        let endpoint = match base.ends_with("/v1") {
            true => format!("{base}/chat/completions"),
            false => format!("{base}/v1/chat/completions"),
        };
        let schema = ticket_schema(&taxonomy);
        // The prompt shows the full schema, as local inference does.
        let prompt = PromptBuilder::new(&taxonomy, &schema)?;
        let schema = match opts.drop_any_of {
            true => without_any_of(&schema),
            false => schema,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            validator: Validator::new(&taxonomy),
            endpoint,
            schema,
            prompt,
            taxonomy,
            tokenizer,
            agent,
            opts,
        })
    }

    /// The taxonomy.
    pub fn taxonomy(&self) -> &Taxonomy {
        &self.taxonomy
    }

    /// The chat-completions URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The request body for one incident (also what a benchmark sends).
    pub fn request_body(&self, text: &str) -> Result<(Value, Vec<String>), InferError> {
        let (incident, warnings) = clean_input(&self.tokenizer, text, self.opts.max_input_tokens)?;
        let messages = self.prompt.messages(&incident)?;
        let mut body = json!({
            "model": self.opts.model,
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": self.opts.max_new_tokens,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "ticket", "schema": self.schema, "strict": true},
            },
            "logprobs": true,
            "top_logprobs": 1,
        });
        if let Value::Object(m) = &mut body {
            m.extend(self.opts.extra.clone());
        }
        Ok((body, warnings))
    }

    /// Structures one incident on the server.
    pub fn structure(&self, text: &str) -> Result<Structured, InferError> {
        self.structure_until(text, None)
    }

    /// [`RemoteStructurer::structure`] within `deadline` (the request's timeout is the
    /// shorter of the deadline and [`RemoteOptions::timeout`]).
    pub fn structure_until(&self, text: &str, deadline: Option<Instant>) -> Result<Structured, InferError> {
        let t0 = Instant::now();
        let timeout = match deadline {
            Some(d) if d <= t0 => return Err(InferError::Deadline { tokens: 0 }),
            Some(d) => (d - t0).min(self.opts.timeout),
            None => self.opts.timeout,
        };
        let (body, warnings) = self.request_body(text)?;
        let remote = |reason: String, retryable: bool| InferError::Remote {
            url: self.endpoint.clone(),
            reason,
            retryable,
        };
        let mut req = self
            .agent
            .post(&self.endpoint)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Content-Type", "application/json");
        if let Some(key) = &self.opts.api_key {
            req = req.header("Authorization", &format!("Bearer {key}"));
        }
        let mut resp = req
            .send(body.to_string())
            .map_err(|e| remote(format!("unreachable: {e}"), true))?;
        let status = resp.status().as_u16();
        let text_body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| remote(format!("reading the answer: {e}"), true))?;
        if status != 200 {
            let snippet: String = text_body.chars().take(300).collect();
            return Err(remote(
                format!("HTTP {status}: {snippet}"),
                status == 429 || status >= 500,
            ));
        }
        let answer: Value = serde_json::from_str(&text_body)
            .map_err(|e| remote(format!("the answer is not JSON: {e}"), false))?;
        let choice = &answer["choices"][0];
        let content = choice["message"]["content"]
            .as_str()
            .ok_or_else(|| remote("the answer has no choices[0].message.content".into(), false))?;
        let ticket = self
            .validator
            .parse_str(content.trim())
            .map_err(|v| InferError::RemoteInvalid {
                output: content.to_owned(),
                reason: v.to_string(),
            })?;
        let mut meta = Meta {
            warnings,
            ..Meta::default()
        };
        if let Some(tokens) = choice["logprobs"]["content"].as_array() {
            meta.confidence = self.confidences(content, tokens, &ticket);
            meta.output_tokens = tokens.len();
        }
        if let Some(u) = answer.get("usage") {
            meta.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            meta.output_tokens = u["completion_tokens"]
                .as_u64()
                .map_or(meta.output_tokens, |n| n as usize);
        }
        if let Some(min) = self.opts.min_confidence {
            meta.flag_for_review(&self.taxonomy, min);
        }
        meta.timings.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
        Ok(Structured { ticket, meta })
    }

    /// Per enum field, the probability of its value's tokens in `content`, from the server's
    /// per-token `logprobs` (`[{token, logprob}, ...]` spelling `content`).
    fn confidences(
        &self,
        content: &str,
        tokens: &[Value],
        ticket: &triage_taxonomy::Ticket,
    ) -> Vec<FieldConfidence> {
        // Byte span of each token in the content.
        let mut spans = Vec::with_capacity(tokens.len());
        let mut at = 0usize;
        for t in tokens {
            let s = t["token"].as_str().unwrap_or("");
            spans.push((at, at + s.len(), t["logprob"].as_f64().unwrap_or(f64::NAN)));
            at += s.len();
        }
        if at != content.len() {
            return Vec::new(); // the tokens do not spell the content: no confidences
        }
        let mut out = Vec::new();
        let mut from = 0usize;
        for f in &self.taxonomy.fields {
            let Some(value) = ticket.get(&f.name) else {
                continue;
            };
            // The value as it is written in the JSON, after its key.
            let key = serde_json::to_string(&f.name).unwrap_or_default();
            let lit = serde_json::to_string(value).unwrap_or_default();
            let Some(k) = content[from..].find(&key).map(|i| i + from) else {
                continue;
            };
            let Some(v) = content[k + key.len()..].find(&lit).map(|i| i + k + key.len()) else {
                continue;
            };
            from = v + lit.len();
            let (start, end) = (v + 1, v + lit.len() - 1); // inside the quotes
            let lp: f64 = spans
                .iter()
                .filter(|(a, b, _)| *a < end && *b > start)
                .map(|(_, _, lp)| *lp)
                .sum();
            if lp.is_finite() {
                let p = lp.exp() as f32;
                out.push(FieldConfidence {
                    field: f.name.clone(),
                    value: value.to_owned(),
                    confidence: p,
                    top: vec![(value.to_owned(), p)],
                    scores: Vec::new(), // the other values' scores are not returned
                });
            }
        }
        out
    }
}

impl crate::TicketEngine for RemoteStructurer {
    fn taxonomy(&self) -> &Taxonomy {
        RemoteStructurer::taxonomy(self)
    }
    fn structure_until(&self, text: &str, deadline: Option<Instant>) -> Result<Structured, InferError> {
        RemoteStructurer::structure_until(self, text, deadline)
    }
}
