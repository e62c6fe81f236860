//! What a request may ask for, and what the service's work needs in memory.
//!
//! * [`TrainLimits`]: bounds on a training job (the server's training configuration merged
//!   with the request's `rank`, `steps` and `lr`), stricter than the built-in ceilings of
//!   [`TrainConfig::check`]; a job outside them is a 422 naming the field, its bound, and the
//!   flag that moves the bound.
//! * [`check_structurer_options`]: `--max-new-tokens` and `--max-input-tokens` within their
//!   ceilings.
//! * Memory estimates for [admission](triage_train::admission): what a loaded model with its
//!   first taxonomy takes ([`model_bytes`]), what one more taxonomy or an activated adapter
//!   takes ([`desk_bytes`]), and what each worker's request may add while it runs
//!   ([`request_bytes`], kept free for serving when a training job is admitted).
//!
//! `docs/limits.md` lists every limit with its default.

use triage_infer::StructurerOptions;
use triage_llm::qwen2::Config;
use triage_train::admission::LimitError;
use triage_train::trainer::{self, TrainConfig};

/// Highest `--max-new-tokens` (a ticket needs 40 to 80 tokens).
pub const MAX_NEW_TOKENS_CEILING: usize = 2048;
/// Highest `--max-input-tokens`.
pub const MAX_INPUT_TOKENS_CEILING: usize = 8192;
/// Highest `--timeout-secs`, a day (a request's deadline is its start plus this).
pub const MAX_REQUEST_TIMEOUT_SECS: u64 = 86_400;
/// Lowest `--max-new-tokens` and `--max-input-tokens` (the engine keeps at least 16 input
/// tokens anyway).
pub const MIN_TOKENS: usize = 16;

/// Bounds on a training job run by the service.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainLimits {
    /// Highest LoRA rank (`--max-train-rank`).
    pub rank: usize,
    /// Most optimizer steps (`--max-train-steps`).
    pub steps: usize,
    /// Highest peak learning rate (`--max-train-lr`).
    pub lr: f64,
    /// Most sequences per micro-batch (`--max-train-batch-size`).
    pub batch_size: usize,
    /// Most micro-batches per optimizer step (`--max-train-grad-accum`).
    pub grad_accum: usize,
    /// Longest example after the system prompt, in tokens (`--max-train-tokens`).
    pub max_tokens: usize,
}

impl Default for TrainLimits {
    fn default() -> Self {
        TrainLimits {
            rank: 64,
            steps: 2000,
            lr: 1e-2,
            batch_size: 8,
            grad_accum: 64,
            max_tokens: 1024,
        }
    }
}

/// One bounded size of a training job: config key, request field (if a request may set it),
/// server flag, built-in ceiling, this server's limit, the job's value.
struct Bound<'a> {
    key: &'a str,
    request_field: Option<&'a str>,
    flag: &'a str,
    ceiling: usize,
    limit: usize,
    value: usize,
}

impl TrainLimits {
    fn bounds(&self, c: &TrainConfig) -> [Bound<'static>; 5] {
        [
            Bound {
                key: "rank",
                request_field: Some("rank"),
                flag: "--max-train-rank",
                ceiling: trainer::MAX_RANK,
                limit: self.rank,
                value: c.rank,
            },
            Bound {
                key: "steps",
                request_field: Some("steps"),
                flag: "--max-train-steps",
                ceiling: trainer::MAX_STEPS,
                limit: self.steps,
                value: c.steps,
            },
            Bound {
                key: "batch_size",
                request_field: None,
                flag: "--max-train-batch-size",
                ceiling: trainer::MAX_BATCH_SIZE,
                limit: self.batch_size,
                value: c.batch_size,
            },
            Bound {
                key: "grad_accum",
                request_field: None,
                flag: "--max-train-grad-accum",
                ceiling: trainer::MAX_GRAD_ACCUM,
                limit: self.grad_accum,
                value: c.grad_accum,
            },
            Bound {
                key: "max_tokens",
                request_field: None,
                flag: "--max-train-tokens",
                ceiling: trainer::MAX_TOKENS,
                limit: self.max_tokens,
                value: c.max_tokens,
            },
        ]
    }

    /// Checks a job's configuration: the server's training configuration with the request's
    /// overrides. `requested(field)` tells whether the request set `field` (`rank`, `steps`,
    /// `lr`): the message then names the request field, else the server's configuration.
    pub fn check(&self, c: &TrainConfig, requested: impl Fn(&str) -> bool) -> Result<(), LimitError> {
        for b in self.bounds(c) {
            let from_request = b.request_field.filter(|f| requested(f));
            LimitError::check_range(
                from_request.unwrap_or(b.key),
                b.value,
                1,
                b.limit,
                || match from_request {
                    Some(f) => format!(
                        "send a `{f}` in 1..={}, or start the server with a higher {} (at most {})",
                        b.limit, b.flag, b.ceiling
                    ),
                    None => format!(
                        "the server's training configuration (--train-config) sets `{}` = {}: lower it \
                     there, or raise {} (at most {})",
                        b.key, b.value, b.flag, b.ceiling
                    ),
                },
            )?;
        }
        let lr = c.optimizer.lr;
        if !(lr > 0.0 && lr <= self.lr) {
            let (field, hint) = match requested("lr") {
                true => (
                    "lr",
                    format!(
                        "send an `lr` in (0, {}] (typically 1e-4 to 1e-3), or start the server with a \
                         higher --max-train-lr (at most {})",
                        self.lr,
                        trainer::MAX_LR
                    ),
                ),
                false => (
                    "optimizer.lr",
                    format!(
                        "the server's training configuration (--train-config) sets it: lower it there, \
                         or raise --max-train-lr (at most {})",
                        trainer::MAX_LR
                    ),
                ),
            };
            return Err(LimitError::new(field, lr, format!("(0, {}]", self.lr), hint));
        }
        Ok(())
    }

    /// These limits against the built-in ceilings (at startup): a limit above its ceiling
    /// could never be reached, so it is an error naming the flag.
    pub fn check_ceilings(&self) -> Result<(), LimitError> {
        for b in self.bounds(&TrainConfig::default()) {
            LimitError::check_range(b.flag, b.limit, 1, b.ceiling, || {
                format!(
                    "start the server with {} in 1..={}; the ceiling is built in (`{}` of \
                     triage_train::trainer::TrainConfig::check)",
                    b.flag, b.ceiling, b.key
                )
            })?;
        }
        if !(self.lr > 0.0 && self.lr <= trainer::MAX_LR) {
            return Err(LimitError::new(
                "--max-train-lr",
                self.lr,
                format!("(0, {}]", trainer::MAX_LR),
                format!(
                    "start the server with --max-train-lr in (0, {}]; the ceiling is built in \
                     (triage_train::trainer::MAX_LR)",
                    trainer::MAX_LR
                ),
            ));
        }
        Ok(())
    }
}

/// `--max-new-tokens` and `--max-input-tokens` (the structurer's options) within
/// [`MIN_TOKENS`]`..=`[`MAX_NEW_TOKENS_CEILING`] and `..=`[`MAX_INPUT_TOKENS_CEILING`].
pub fn check_structurer_options(o: &StructurerOptions) -> Result<(), LimitError> {
    LimitError::check_range(
        "--max-new-tokens",
        o.max_new_tokens,
        MIN_TOKENS,
        MAX_NEW_TOKENS_CEILING,
        || {
            format!(
                "start the server with --max-new-tokens in {MIN_TOKENS}..={MAX_NEW_TOKENS_CEILING} (a \
                 ticket needs 40 to 80; the default is 320)"
            )
        },
    )?;
    LimitError::check_range(
        "--max-input-tokens",
        o.max_input_tokens,
        MIN_TOKENS,
        MAX_INPUT_TOKENS_CEILING,
        || {
            format!(
                "start the server with --max-input-tokens in {MIN_TOKENS}..={MAX_INPUT_TOKENS_CEILING} \
                 (longer input is cut from the middle; the default is 1536)"
            )
        },
    )
}

/// Tokenizer, chat template, compiled grammar and validator of one structurer, besides its
/// KV caches. Measured on the 0.5B's GGUF (vocabulary of 151,936 tokens): building the first
/// structurer grew resident memory by 120 MiB, a second one by 47 MiB; with a margin.
pub const STRUCTURER_BYTES: u64 = 160 << 20;

/// Per-process overhead of a serving process besides weights and structurers (runtime,
/// allocator slack, HTTP stack), rounded up.
pub const PROCESS_BYTES: u64 = 64 << 20;

/// Bytes of the KV cache for one token.
fn kv_per_token(cfg: &Config) -> u64 {
    (cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4) as u64
}

/// The transient of running `tokens` tokens through one layer at once (the attention scores
/// over the whole context, the MLP's activations, the norms and residuals): what computing a
/// system prompt's KV cache adds at its peak. For the 0.5B's 2,026-token prompt: 387 MiB
/// (measured: 400 MiB).
fn prefill_transient(cfg: &Config, tokens: usize) -> u64 {
    let t = tokens as u64;
    t * (cfg.num_heads as u64 * t + 3 * cfg.intermediate_size as u64 + 8 * cfg.hidden_size as u64) * 4
}

/// What one more taxonomy (or a structurer rebuilt to activate an adapter) takes at its
/// peak: its tokenizer and grammar, its system prompt's KV cache of `prefix_tokens`, and the
/// transient of computing that cache. For the 0.5B: 595 MiB (measured: 567 MiB peak over the
/// resident memory before).
pub fn desk_bytes(cfg: &Config, prefix_tokens: usize) -> u64 {
    STRUCTURER_BYTES + kv_per_token(cfg) * prefix_tokens as u64 + prefill_transient(cfg, prefix_tokens)
}

/// What loading a model whose weights take `load_bytes` (`Qwen2::load_bytes`) and serving its
/// first taxonomy take at the peak: the weights, the repacked copies candle's fast kernels
/// make of some of them on the first long forward pass (measured: a fifth of the weights for
/// the 0.5B), one structurer ([`desk_bytes`]) and the process's overhead. For the 0.5B (601
/// MiB of weights): 1,380 MiB (measured peak: 1,343 MiB).
pub fn model_bytes(load_bytes: u64, cfg: &Config, prefix_tokens: usize) -> u64 {
    load_bytes + load_bytes / 5 + desk_bytes(cfg, prefix_tokens) + PROCESS_BYTES
}

/// What one request may add while it decodes: its KV cache over the whole context (system
/// prompt, input, answer) and a few rows of logits.
pub fn request_bytes(cfg: &Config, prefix_tokens: usize, o: &StructurerOptions) -> u64 {
    let tokens = (prefix_tokens + o.max_input_tokens + o.max_new_tokens + 64) as u64;
    kv_per_token(cfg) * tokens + 4 * cfg.vocab_size as u64 * 4 + prefill_transient(cfg, 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen05() -> Config {
        Config {
            vocab_size: 151_936,
            hidden_size: 896,
            intermediate_size: 4864,
            num_layers: 24,
            num_heads: 14,
            num_kv_heads: 2,
            head_dim: 64,
            rope_theta: 1_000_000.0,
            rms_eps: 1e-6,
            max_position: 32768,
        }
    }

    #[test]
    fn a_job_outside_the_limits_names_the_field_its_bound_and_the_flag() {
        let l = TrainLimits::default();
        let mut c = TrainConfig::default();
        assert!(l.check(&c, |_| false).is_ok());
        c.set_rank(2_000_000);
        let e = l.check(&c, |f| f == "rank").unwrap_err();
        assert_eq!((e.field.as_str(), e.limit.as_str()), ("rank", "1..=64"));
        assert_eq!(
            e.to_string(),
            "rank = 2000000 is out of bounds (allowed: 1..=64); send a `rank` in 1..=64, or start \
             the server with a higher --max-train-rank (at most 512)"
        );
        c.set_rank(8);
        c.steps = 0;
        assert_eq!(l.check(&c, |_| true).unwrap_err().field, "steps");
        c.steps = 10;
        c.batch_size = 9;
        let e = l.check(&c, |_| true).unwrap_err();
        assert_eq!(e.field, "batch_size");
        assert!(
            e.hint.contains("--train-config") && e.hint.contains("--max-train-batch-size"),
            "{e}"
        );
        c.batch_size = 1;
        c.max_tokens = 4096;
        assert_eq!(l.check(&c, |_| false).unwrap_err().field, "max_tokens");
        c.max_tokens = 256;
        c.grad_accum = 65;
        assert_eq!(l.check(&c, |_| false).unwrap_err().field, "grad_accum");
        c.grad_accum = 1;
        for (lr, bad) in [
            (5.0, true),
            (-1.0, true),
            (0.0, true),
            (f64::NAN, true),
            (3e-4, false),
        ] {
            c.optimizer.lr = lr;
            match bad {
                true => {
                    let e = l.check(&c, |f| f == "lr").unwrap_err();
                    assert_eq!((e.field.as_str(), e.limit.as_str()), ("lr", "(0, 0.01]"), "{lr}");
                    assert_eq!(l.check(&c, |_| false).unwrap_err().field, "optimizer.lr");
                }
                false => assert!(l.check(&c, |_| true).is_ok()),
            }
        }
    }

    #[test]
    fn limits_above_the_built_in_ceilings_are_refused() {
        assert!(TrainLimits::default().check_ceilings().is_ok());
        let e = TrainLimits {
            rank: 5000,
            ..TrainLimits::default()
        }
        .check_ceilings()
        .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.limit.as_str()),
            ("--max-train-rank", "1..=512")
        );
        let e = TrainLimits {
            lr: 2.0,
            ..TrainLimits::default()
        }
        .check_ceilings()
        .unwrap_err();
        assert_eq!(e.field, "--max-train-lr");
        let mut o = StructurerOptions::default();
        assert!(check_structurer_options(&o).is_ok());
        o.max_new_tokens = 100_000;
        assert_eq!(
            check_structurer_options(&o).unwrap_err().field,
            "--max-new-tokens"
        );
        o.max_new_tokens = 320;
        o.max_input_tokens = 0;
        assert_eq!(
            check_structurer_options(&o).unwrap_err().field,
            "--max-input-tokens"
        );
    }

    #[test]
    fn serving_estimates_are_in_the_measured_range() {
        let cfg = qwen05();
        // Measured on the 0.5B (601 MiB of weights as loaded, 2,026-token system prompt, the
        // prompt's cache computed): peak resident memory 1,343 MiB with one taxonomy, and a
        // second taxonomy's peak 567 MiB over the resident memory before it.
        let model = model_bytes(601 << 20, &cfg, 2026);
        assert!((1343 << 20..1500 << 20).contains(&model), "{}", model >> 20);
        let desk = desk_bytes(&cfg, 2026);
        assert!((520 << 20..650 << 20).contains(&desk), "{}", desk >> 20);
        let req = request_bytes(&cfg, 2026, &StructurerOptions::default());
        assert!((80 << 20..200 << 20).contains(&req), "{req}");
    }
}
