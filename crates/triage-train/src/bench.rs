//! The training step benchmark: optimizer steps on the real base model and the real system
//! prompt prefix, at a fixed sequence length, timed and measured for peak memory. The CLI
//! (`triage bench train`) runs each configuration in its own process, so that every peak RSS
//! is that configuration's alone.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use triage_data::rng::Rng;
use triage_llm::lora::Lora;
use triage_llm::qwen2::{KvCache, Qwen2};

use crate::optim::{AdamW, AdamWConfig};
use crate::trainer::{step_loss, MicroBatch, TrainConfig};
use crate::TrainError;

/// One configuration to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepBenchSpec {
    /// Tokens per sequence after the system prompt.
    pub seq: usize,
    /// Answer tokens at the end of each sequence (the loss positions).
    pub answer: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// Per-layer recomputation and chunked head (else one whole graph).
    pub checkpointing: bool,
}

/// What one configuration measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepBenchResult {
    /// The configuration.
    pub spec: StepBenchSpec,
    /// Mean seconds per timed optimizer step.
    pub step_s: f64,
    /// Trained tokens (after the prefix) per second.
    pub tokens_per_s: f64,
    /// Loss of each step (it must fall: the benchmark trains on the same batch).
    pub losses: Vec<f64>,
}

/// Runs `spec` on `model` attending to `prefix` (the system prompt's KV cache): one warm-up
/// step, then `spec.steps` timed AdamW steps on one fixed pseudo-random batch.
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
    let cfg = model.config();
    let lora = Lora::new(cfg, config.lora(), config.seed, model.device())?;
    let mut opt = AdamW::new(
        lora.vars(),
        AdamWConfig {
            lr: 1e-3,
            ..config.optimizer.clone()
        },
    )?;
    let mb = batch(spec, cfg.vocab_size);
    let how = (spec.checkpointing, config.head_chunk);
    let vars = lora.vars();
    let mut losses = Vec::new();
    let mut timed = 0.0;
    for step in 0..=spec.steps {
        let t0 = Instant::now();
        let (loss, grads) = step_loss(model, prefix, &lora, &mb, mb.count as f64, Some(None), how)?;
        let grads = grads.expect("asked for gradients");
        let g: Vec<_> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .map_or_else(|| v.as_tensor().zeros_like().map_err(crate::candle), Ok)
            })
            .collect::<Result<_, _>>()?;
        opt.update(&g, 1e-3)?;
        if step > 0 {
            timed += t0.elapsed().as_secs_f64();
        }
        losses.push(loss);
    }
    let step_s = timed / spec.steps.max(1) as f64;
    Ok(StepBenchResult {
        spec: spec.clone(),
        step_s,
        tokens_per_s: (spec.seq * spec.batch) as f64 / step_s.max(1e-9),
        losses,
    })
}

/// A fixed batch of pseudo-random token ids (below 32,000: ordinary text tokens), the last
/// `answer` positions of each sequence being the targets.
fn batch(spec: &StepBenchSpec, vocab: usize) -> MicroBatch {
    let mut rng = Rng::new(spec.seq as u64);
    let (b, n) = (spec.batch, spec.seq);
    let tokens: Vec<u32> = (0..b * n).map(|_| rng.below(vocab.min(32_000)) as u32).collect();
    let from = n - spec.answer - 1;
    let m = n - from;
    let mut targets = vec![0u32; b * m];
    let mut mask = vec![0f32; b * m];
    for r in 0..b {
        for p in 0..m - 1 {
            targets[r * m + p] = tokens[r * n + from + p + 1];
            mask[r * m + p] = 1.0;
        }
    }
    MicroBatch {
        b,
        n,
        from,
        tokens,
        targets,
        mask,
        count: b * (m - 1),
        seen: b * n,
    }
}
