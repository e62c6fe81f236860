//! The training step benchmark: optimizer steps on the real base model and the real system
//! prompt prefix, at a fixed sequence length, timed and measured for peak memory. The CLI
//! (`triage bench train`) runs each configuration in its own process, so that every peak RSS
//! is that configuration's alone.
//!
//! The batch is pseudo-random ordinary text tokens whose last `answer` tokens are the
//! answer, with the mix of token roles of a real ticket answer: a third free text (the
//! summary), half forced by the grammar, a sixth enum choices among six candidates. With the
//! `tokens` objective every answer token is a full-vocabulary position, as before.

use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use triage_data::rng::Rng;
use triage_infer::TokenRole;
use triage_llm::lora::Lora;
use triage_llm::qwen2::{DenseWeights, KvCache, Qwen2};

use crate::data::Item;
use crate::features::Features;
use crate::optim::{AdamW, AdamWConfig};
use crate::trainer::{micro_batch, step_loss, StepCtx, TrainConfig};
use crate::{candle, TrainError};

/// One configuration to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepBenchSpec {
    /// Tokens per sequence after the system prompt.
    pub seq: usize,
    /// Answer tokens at the end of each sequence.
    pub answer: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
}

/// What one configuration measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepBenchResult {
    /// The configuration.
    pub spec: StepBenchSpec,
    /// The first adapted layer (0: every layer trains, no frozen-layer features).
    pub first_layer: usize,
    /// Layers of the model.
    pub num_layers: usize,
    /// Mean seconds per timed optimizer step.
    pub step_s: f64,
    /// Trained tokens (after the prefix) per second of steps: every epoch after the first,
    /// when the frozen layers' output is already on disk.
    pub tokens_per_s: f64,
    /// Seconds to compute the frozen layers' output of one sequence (once per example; timed
    /// over 16 sequences).
    pub features_s_per_seq: f64,
    /// Tokens per second over a first epoch, features included.
    pub epoch_tokens_per_s: f64,
    /// Loss of each step (it must fall: the benchmark trains on the same batch).
    pub losses: Vec<f64>,
    /// Bytes of dense weight copies held for the backward pass.
    pub dense_bytes: usize,
}

/// Runs `spec` on `model` attending to `prefix` (the system prompt's KV cache) with the
/// training path of `config` (adapted layers, objective, dense copies, recomputation): the
/// frozen layers' output computed once (timed separately), one warm-up step, then
/// `spec.steps` timed AdamW steps on one fixed pseudo-random batch.
pub fn step_bench(
    model: &Qwen2,
    prefix: &KvCache,
    config: &TrainConfig,
    spec: &StepBenchSpec,
) -> Result<StepBenchResult, TrainError> {
    if spec.seq < 2 || spec.answer == 0 || spec.answer >= spec.seq || spec.batch == 0 {
        return Err(TrainError::Invalid(format!(
            "bench: need 0 < answer < seq and batch ≥ 1 (got seq {}, answer {}, batch {})",
            spec.seq, spec.answer, spec.batch
        )));
    }
    // Memory after each stage (`-vv`), to see where a peak comes from.
    let rss = |what: &str| {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let st = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let get = |k: &str| {
                st.lines()
                    .find(|l| l.starts_with(k))
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            };
            tracing::debug!("bench memory after {what}: {}, {}", get("VmRSS:"), get("VmHWM:"));
        }
    };
    rss("start");
    let cfg = model.config();
    let first = config.first_layer(cfg.num_layers);
    let lora = Lora::new(cfg, config.lora(cfg.num_layers), config.seed, model.device())?;
    let dense = match config.dense_weights {
        true => model.dense_weights(first..cfg.num_layers, true, model.training_dense_dtype())?,
        false => DenseWeights::none(cfg.num_layers),
    };
    rss("dense copies");
    let mut opt = AdamW::new(
        lora.vars(),
        AdamWConfig {
            lr: 1e-3,
            ..config.optimizer.clone()
        },
    )?;
    // Features are timed over more sequences than a batch, as a run computes them for all its
    // examples: each frozen layer's dense copy is made once per pass, not once per example.
    let timed_items = items(spec, FEATURE_SEQS.max(spec.batch), cfg.vocab_size);
    let batch_items = &timed_items[..spec.batch];
    let idx: Vec<usize> = (0..batch_items.len()).collect();
    let mb = micro_batch(batch_items, &idx, 0, config.objective, config.summary_weight);

    // The input of the first adapted layer: embeddings, or the frozen layers' output
    // computed as a training run computes it (layer by layer, through files on disk).
    let t0 = Instant::now();
    let hidden = if first == 0 {
        let t = Tensor::from_vec(mb.tokens.clone(), (mb.b, mb.n), model.device()).map_err(candle)?;
        model.embed(&t)?
    } else {
        let dir = std::env::temp_dir().join(format!("triage-bench-features-{}", std::process::id()));
        let features = Features::new(&dir, "bench", first, cfg.hidden_size);
        let refs: Vec<&Item> = timed_items.iter().collect();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let done = features.prepare(model, prefix, &refs, &stop, &mut |_, _| {});
        let rows = done.and_then(|()| {
            batch_items
                .iter()
                .map(|it| features.load(it, model.device()))
                .collect::<Result<Vec<_>, _>>()
        });
        let _ = std::fs::remove_dir_all(&dir);
        Tensor::stack(&rows?, 0).map_err(candle)?
    };
    let features_s_per_seq = match first {
        0 => 0.0,
        _ => t0.elapsed().as_secs_f64() / timed_items.len() as f64,
    };
    rss("features");

    let ctx = StepCtx {
        model,
        prefix,
        lora: &lora,
        dense: &dense,
        checkpointing: config.checkpointing,
        head_chunk: config.head_chunk,
        composed: config.composed_ops,
    };
    let vars = lora.vars();
    let mut losses = Vec::new();
    let mut timed = 0.0;
    for step in 0..=spec.steps {
        let t0 = Instant::now();
        let (loss, grads) = step_loss(&ctx, hidden.clone(), first, &mb, mb.weight.max(1e-9), Some(None))?;
        let grads = grads.expect("asked for gradients");
        let g: Vec<_> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .map_or_else(|| v.as_tensor().zeros_like().map_err(candle), Ok)
            })
            .collect::<Result<_, _>>()?;
        opt.update(&g, 1e-3)?;
        if step > 0 {
            timed += t0.elapsed().as_secs_f64();
        }
        losses.push(loss);
        rss("step");
    }
    let step_s = timed / spec.steps.max(1) as f64;
    let tokens = (spec.seq * spec.batch) as f64;
    Ok(StepBenchResult {
        spec: spec.clone(),
        first_layer: first,
        num_layers: cfg.num_layers,
        step_s,
        tokens_per_s: tokens / step_s.max(1e-9),
        features_s_per_seq,
        epoch_tokens_per_s: tokens / (step_s + features_s_per_seq * spec.batch as f64).max(1e-9),
        losses,
        dense_bytes: dense.bytes(),
    })
}

/// Sequences whose frozen-layer features are computed for the features timing.
const FEATURE_SEQS: usize = 16;

/// `count` pseudo-random sequences of ordinary text tokens (below 32,000) of `spec.seq` tokens,
/// the last `spec.answer` of each being the answer with a real answer's mix of roles.
fn items(spec: &StepBenchSpec, count: usize, vocab: usize) -> Vec<Item> {
    let mut rng = Rng::new(spec.seq as u64);
    let vocab = vocab.min(32_000);
    (0..count)
        .map(|r| {
            let tokens: Vec<u32> = (0..spec.seq).map(|_| rng.below(vocab) as u32).collect();
            let start = spec.seq - spec.answer;
            let roles = (start..spec.seq)
                .map(|j| match (j - start) % 6 {
                    0 | 1 => TokenRole::Free,
                    5 => {
                        let mut candidates: Vec<u32> = (0..5).map(|_| rng.below(vocab) as u32).collect();
                        candidates.retain(|&c| c != tokens[j]);
                        candidates.push(tokens[j]);
                        TokenRole::Choice {
                            field: "bench".into(),
                            candidates,
                        }
                    }
                    _ => TokenRole::Forced,
                })
                .collect();
            Item {
                id: format!("bench-{r}"),
                tokens,
                start,
                roles,
            }
        })
        .collect()
}
