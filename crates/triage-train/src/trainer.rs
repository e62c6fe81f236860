//! The training loop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use triage_data::Example;
use triage_infer::{Structurer, StructurerOptions, TokenRole};
use triage_llm::lora::{Lora, LoraConfig, Target};
use triage_llm::qwen2::{DenseWeights, Graph, KvCache, LossSpec, Qwen2, StepOptions, Supervised, TrainInput};
use triage_llm::GgufFile;

use crate::data::{batches, Encoder, Item};
use crate::features::Features;
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use crate::{candle, file_err, TrainError};

/// Everything that defines a run (saved in checkpoints; a resumed run uses the saved one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub alpha: f64,
    /// LoRA dropout.
    pub dropout: f64,
    /// Targeted projections.
    pub targets: Vec<Target>,
    /// AdamW.
    pub optimizer: AdamWConfig,
    /// Optimizer steps.
    pub steps: usize,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Global gradient-norm clip (0 = off).
    pub max_grad_norm: f64,
    /// Seed of initialisation, data order, instruction choice and dropout.
    pub seed: u64,
    /// Validation loss every N optimizer steps (0 = only at the end).
    pub eval_every: usize,
    /// Constrained-decoding accuracy every M steps (0 = only before and after).
    pub accuracy_every: usize,
    /// Validation examples used for the accuracy.
    pub accuracy_samples: usize,
    /// Checkpoint every N steps (0 = only on Ctrl-C and at the end).
    pub checkpoint_every: usize,
    /// Longest example in tokens after the system prompt (longer ones are skipped).
    pub max_tokens: usize,
    /// Rotate the user-turn instruction over `prompts/instructions.toml`.
    pub vary_instructions: bool,
    /// Per-layer activation recomputation: keep only each adapted layer's input from the
    /// forward pass and re-run the layer in the backward pass (least memory, ~1.4x the
    /// compute). Off: each layer's graph is kept, and freed as soon as the backward pass has
    /// gone through it.
    pub checkpointing: bool,
    /// Answer positions whose logits are computed at once (bounds the `[chunk, vocab]`
    /// logits).
    pub head_chunk: usize,
    /// Layers that carry the adapter, counted from the top (0 = all). The layers below have
    /// nothing to train: their output for each example is computed once and reused at every
    /// step and epoch, so a step only runs the top layers.
    pub top_layers: usize,
    /// What the loss covers.
    pub objective: Objective,
    /// Weight of one summary token against one enum decision (objective `decisions`).
    pub summary_weight: f64,
    /// Keep dense f16 copies of the adapted layers' weights and of the LM head for the
    /// backward pass (much faster than dequantizing at every step; costs 2 bytes per weight).
    pub dense_weights: bool,
    /// Run the differentiable primitives instead of the CPU training kernels: the reference
    /// implementation the kernels are tested against (slower, more memory).
    pub composed_ops: bool,
}

/// What the training loss is computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Where the decoder decides: each enum value's tokens scored among the tokens the
    /// decoder chooses between there (its own renormalised probability of the right value),
    /// plus the free-text summary at `summary_weight` per token. Tokens the grammar forces
    /// carry no loss.
    Decisions,
    /// Cross-entropy on every answer token over the whole vocabulary, forced tokens included
    /// (the plain language-model loss).
    Tokens,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: Target::ALL.to_vec(),
            optimizer: AdamWConfig::default(),
            steps: 100,
            warmup_steps: 10,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            seed: 7,
            eval_every: 25,
            accuracy_every: 0,
            accuracy_samples: 20,
            checkpoint_every: 25,
            max_tokens: 512,
            vary_instructions: true,
            checkpointing: true,
            head_chunk: 32,
            top_layers: 0,
            objective: Objective::Tokens,
            summary_weight: 0.2,
            dense_weights: false,
            composed_ops: false,
        }
    }
}

impl TrainConfig {
    /// `self` with `other`'s settings that change how a run goes, not what it trains: the
    /// evaluation, accuracy and checkpoint intervals, the accuracy samples, per-layer
    /// recomputation, the head's chunk and composed operations (memory and speed; the
    /// arithmetic is the same up to rounding). A resumed run takes these from its command.
    pub fn with_run_settings_of(&self, other: &TrainConfig) -> TrainConfig {
        TrainConfig {
            eval_every: other.eval_every,
            accuracy_every: other.accuracy_every,
            accuracy_samples: other.accuracy_samples,
            checkpoint_every: other.checkpoint_every,
            checkpointing: other.checkpointing,
            head_chunk: other.head_chunk,
            composed_ops: other.composed_ops,
            ..self.clone()
        }
    }

    /// The first layer that carries the adapter in a model of `num_layers` layers.
    pub fn first_layer(&self, num_layers: usize) -> usize {
        match self.top_layers {
            0 => 0,
            k => num_layers.saturating_sub(k),
        }
    }

    /// The adapter shape for a model of `num_layers` layers.
    pub fn lora(&self, num_layers: usize) -> LoraConfig {
        let first = self.first_layer(num_layers);
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
            layers: (first > 0).then(|| (first..num_layers).collect()),
        }
    }

    /// Sets the LoRA rank, with alpha = 2 × rank (the scale alpha/rank stays 2).
    pub fn set_rank(&mut self, rank: usize) {
        self.rank = rank;
        self.alpha = 2.0 * rank as f64;
    }

    /// Checks ranges, naming the offending key. Sizes and rates a user sets (`rank`, `steps`,
    /// `optimizer.lr`, `batch_size`, `grad_accum`, `max_tokens`, `head_chunk`) must lie within
    /// the built-in bounds [`MAX_RANK`], [`MAX_STEPS`], [`MAX_LR`], [`MAX_BATCH_SIZE`],
    /// [`MAX_GRAD_ACCUM`], [`MAX_TOKENS`] and [`MAX_HEAD_CHUNK`]; a value outside is a
    /// [`TrainError::Limit`] naming the key, the bound and what to do. These are ceilings
    /// against absurd values: whether a run fits the machine is
    /// [`crate::admission`]'s memory check, and a server has stricter limits of its own.
    pub fn check(&self) -> Result<(), TrainError> {
        let bad = |k: &str, why: &str| Err(TrainError::Invalid(format!("train config: {k} {why}")));
        let size =
            |key: &str, flag: &str, value: usize, max: usize, ceiling: &str| -> Result<(), TrainError> {
                let how = match flag {
                    "" => format!("set `{key}`"),
                    f => format!("pass {f} (or set `{key}`)"),
                };
                crate::admission::LimitError::check_range(key, value, 1, max, || {
                    format!(
                        "{how} in the training configuration to 1..={max}; the ceiling is built in \
                     (triage_train::trainer::{ceiling})"
                    )
                })
                .map_err(TrainError::Limit)
            };
        size("rank", "--rank", self.rank, MAX_RANK, "MAX_RANK")?;
        size("steps", "--steps", self.steps, MAX_STEPS, "MAX_STEPS")?;
        size(
            "batch_size",
            "--batch-size",
            self.batch_size,
            MAX_BATCH_SIZE,
            "MAX_BATCH_SIZE",
        )?;
        size(
            "grad_accum",
            "--grad-accum",
            self.grad_accum,
            MAX_GRAD_ACCUM,
            "MAX_GRAD_ACCUM",
        )?;
        size("max_tokens", "", self.max_tokens, MAX_TOKENS, "MAX_TOKENS")?;
        size(
            "head_chunk",
            "",
            self.head_chunk,
            MAX_HEAD_CHUNK,
            "MAX_HEAD_CHUNK",
        )?;
        let lr = self.optimizer.lr;
        if !(lr > 0.0 && lr <= MAX_LR) {
            return Err(TrainError::Limit(crate::admission::LimitError::new(
                "optimizer.lr",
                lr,
                format!("a number in (0, {MAX_LR}]"),
                format!(
                    "pass --lr (or set `lr` under [optimizer] in the training configuration) in \
                     (0, {MAX_LR}], typically 1e-4 to 1e-3; the ceiling is built in \
                     (triage_train::trainer::MAX_LR)"
                ),
            )));
        }
        if self.targets.is_empty() {
            return bad("targets", "must name at least one projection");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", "must be in [0, 1)");
        }
        if !(self.summary_weight >= 0.0 && self.summary_weight.is_finite()) {
            return bad("summary_weight", "must be a number ≥ 0");
        }
        Ok(())
    }
}

/// Largest LoRA rank [`TrainConfig::check`] accepts: ranks past a few hundred approach the
/// width of the projections themselves (896 to 1,536 in the supported models) and cost memory
/// linearly.
pub const MAX_RANK: usize = 512;
/// Most optimizer steps [`TrainConfig::check`] accepts.
pub const MAX_STEPS: usize = 1_000_000;
/// Highest peak learning rate [`TrainConfig::check`] accepts (LoRA diverges well below it).
pub const MAX_LR: f64 = 1.0;
/// Most sequences per micro-batch [`TrainConfig::check`] accepts.
pub const MAX_BATCH_SIZE: usize = 256;
/// Most micro-batches per optimizer step [`TrainConfig::check`] accepts.
pub const MAX_GRAD_ACCUM: usize = 4096;
/// Longest example after the system prompt, in tokens, [`TrainConfig::check`] accepts.
pub const MAX_TOKENS: usize = 8192;
/// Most whole-vocabulary logit positions at once [`TrainConfig::check`] accepts.
pub const MAX_HEAD_CHUNK: usize = 4096;

/// One padded micro-batch: `tokens` `[b, n]` and the supervised positions.
pub(crate) struct MicroBatch {
    pub(crate) b: usize,
    pub(crate) n: usize,
    pub(crate) tokens: Vec<u32>,
    /// Supervised positions (`denom` is set per use).
    pub(crate) spec: LossSpec,
    /// Sum of the positions' weights.
    pub(crate) weight: f64,
    /// Tokens of the sequences (without padding).
    pub(crate) seen: usize,
}

/// Pads the items `idx` into one micro-batch with `pad` and lists its supervised positions
/// under `objective`: the output at position `j - 1` predicts answer token `j`.
pub(crate) fn micro_batch(
    items: &[Item],
    idx: &[usize],
    pad: u32,
    objective: Objective,
    summary_weight: f64,
) -> MicroBatch {
    let n = idx.iter().map(|&i| items[i].tokens.len()).max().unwrap_or(0);
    let b = idx.len();
    let mut tokens = vec![pad; b * n];
    let mut positions = Vec::new();
    let mut seen = 0;
    for (row, &i) in idx.iter().enumerate() {
        let it = &items[i];
        tokens[row * n..row * n + it.tokens.len()].copy_from_slice(&it.tokens);
        seen += it.tokens.len();
        for (j, role) in (it.start..it.tokens.len()).zip(&it.roles) {
            let (weight, among) = match (objective, role) {
                (Objective::Tokens, _) => (1.0, None),
                (Objective::Decisions, TokenRole::Forced) => continue,
                (Objective::Decisions, TokenRole::Free) => (summary_weight as f32, None),
                (Objective::Decisions, TokenRole::Choice { candidates, .. }) if candidates.len() > 1 => {
                    (1.0, Some(candidates.clone()))
                }
                (Objective::Decisions, TokenRole::Choice { .. }) => continue,
            };
            if j == 0 || weight == 0.0 {
                continue;
            }
            positions.push(Supervised {
                row,
                pos: j - 1,
                target: it.tokens[j],
                weight,
                among,
            });
        }
    }
    let weight = positions.iter().map(|p| p.weight as f64).sum();
    MicroBatch {
        b,
        n,
        tokens,
        spec: LossSpec {
            positions,
            denom: 1.0,
        },
        weight,
        seen,
    }
}

/// What a step needs besides the batch: the model, the frozen prefix, the adapter, the dense
/// weight copies and the step options.
pub(crate) struct StepCtx<'a> {
    pub(crate) model: &'a Qwen2,
    pub(crate) prefix: &'a KvCache,
    pub(crate) lora: &'a Lora,
    pub(crate) dense: &'a DenseWeights,
    pub(crate) checkpointing: bool,
    pub(crate) head_chunk: usize,
    pub(crate) composed: bool,
}

/// The micro-batch's loss (`Σ weight · nll / denom`) with the adapter's gradients when
/// `grads` is `Some(dropout)` (`None` = validation: no graph). `hidden` is the input of layer
/// `first` (`[b, n, hidden]`).
pub(crate) fn step_loss(
    ctx: &StepCtx,
    hidden: Tensor,
    first: usize,
    mb: &MicroBatch,
    denom: f64,
    grads: Option<Option<(f64, u64)>>,
) -> Result<(f64, Option<GradStore>), TrainError> {
    let spec = LossSpec {
        positions: mb.spec.positions.clone(),
        denom,
    };
    let input = TrainInput {
        hidden,
        first_layer: first,
        prefix: Some(ctx.prefix),
    };
    let opts = StepOptions {
        dropout: grads.flatten(),
        graph: match ctx.checkpointing {
            true => Graph::Recompute,
            false => Graph::PerLayer,
        },
        head_chunk: ctx.head_chunk,
        composed: ctx.composed,
    };
    match grads {
        None => Ok((
            ctx.model
                .loss_only(&input, &spec, Some(ctx.lora), ctx.dense, &opts)?,
            None,
        )),
        Some(_) => {
            let (l, g) = ctx
                .model
                .loss_and_grads(&input, &spec, ctx.lora, ctx.dense, &opts)?;
            Ok((l, Some(g)))
        }
    }
}

/// Where the run stands (saved with each checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// Index of the next batch within the epoch.
    pub batch: usize,
    /// (step, train loss) per optimizer step.
    pub train_loss: Vec<(usize, f64)>,
    /// (step, validation loss).
    pub val_loss: Vec<(usize, f64)>,
    /// (step, accuracy per field).
    pub accuracy: Vec<(usize, Vec<(String, f64)>)>,
    /// The final evaluation is done and recorded (a resumed finished run does not repeat it).
    #[serde(default)]
    pub finished: bool,
}

/// One optimizer step, for progress display.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Step number (1-based).
    pub step: usize,
    /// Of.
    pub steps: usize,
    /// Mean loss of the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed (prompt suffix + answer) in this step.
    pub tokens: usize,
    /// Tokens per second in this step.
    pub tokens_per_s: f64,
}

/// Receives progress; the CLI draws a progress bar from it.
pub trait Observer {
    /// After each optimizer step.
    fn step(&mut self, report: &StepReport);
    /// A one-line message (evaluation results, checkpoints).
    fn message(&mut self, text: &str);
    /// While the frozen layers' output is computed: `done` of `total` (example, layer) passes.
    fn features(&mut self, _done: usize, _total: usize) {}
    /// After micro-batch `micro` (0-based) of the step that will be number `step`.
    fn micro_batch(&mut self, _step: usize, _micro: usize) {}
}

/// What a finished run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Steps run in total.
    pub steps: usize,
    /// Validation loss before training and at the end.
    pub val_loss_before: Option<f64>,
    /// At the end.
    pub val_loss_after: Option<f64>,
    /// Per-field accuracy before training.
    pub accuracy_before: Vec<(String, f64)>,
    /// After.
    pub accuracy_after: Vec<(String, f64)>,
    /// Mean train loss of the first and last steps.
    pub first_loss: f64,
    /// Last.
    pub last_loss: f64,
}

/// A training run over encoded examples.
pub struct Trainer<'a> {
    base: &'a Structurer,
    gguf: &'a GgufFile,
    model: Arc<Qwen2>,
    prefix: std::sync::Arc<KvCache>,
    config: TrainConfig,
    train: Vec<Item>,
    val: Vec<Item>,
    val_examples: Vec<Example>,
    /// The adapter being trained.
    pub lora: Lora,
    opt: AdamW,
    state: RunState,
    run_dir: PathBuf,
    pad: u32,
    /// The first adapted layer; the layers below run once per example (`features`).
    first: usize,
    features: Option<Features>,
    dense: DenseWeights,
    /// What the run trains on (see [`fingerprint`]), saved with each checkpoint.
    fingerprint: String,
}

impl<'a> Trainer<'a> {
    /// Prepares a run: encodes the data, initialises (or, with a checkpoint in `run_dir`,
    /// restores) the adapter and optimizer.
    pub fn new(
        base: &'a Structurer,
        gguf: &'a GgufFile,
        config: TrainConfig,
        train: &[Example],
        val: &[Example],
        run_dir: &Path,
        resume: bool,
    ) -> Result<Self, TrainError> {
        let model = base.model().clone();
        let device = model.device().clone();
        let (config, state, saved_fingerprint) = if resume {
            let saved = read_checkpoint(run_dir)?;
            let mut state = saved.state;
            // Before `finished` was saved, a checkpoint at the last step was the final one.
            if saved.fingerprint.is_none() && state.step >= saved.config.steps {
                state.finished = true;
            }
            (
                saved.config.with_run_settings_of(&config),
                state,
                saved.fingerprint,
            )
        } else {
            (config, RunState::default(), None)
        };
        config.check()?;
        let encoder = Encoder::new(base)?;
        let seed = config.vary_instructions.then_some(config.seed);
        let (train_items, skipped) = encoder.encode_all(train, seed, config.max_tokens)?;
        if !skipped.is_empty() {
            tracing::warn!(
                "{} training examples longer than {} tokens skipped (e.g. {})",
                skipped.len(),
                config.max_tokens,
                skipped[0]
            );
        }
        if train_items.is_empty() {
            return Err(TrainError::Invalid(
                "no training examples left to train on".into(),
            ));
        }
        // Validation always uses the canonical prompt, as inference does.
        let (val_items, _) = encoder.encode_all(val, None, config.max_tokens)?;
        let fingerprint = fingerprint(gguf, base, &train_items, &val_items);
        if let Some(saved) = saved_fingerprint.filter(|f| *f != fingerprint) {
            return Err(file_err(
                &checkpoint_state(run_dir),
                format!(
                    "the checkpoint was written for other training or validation data, taxonomy, \
                     prompt or model (fingerprint {saved}, now {fingerprint}): resume with the \
                     same files, or start afresh with another --run-dir"
                ),
            ));
        }
        let num_layers = model.config().num_layers;
        if config.top_layers > num_layers {
            return Err(TrainError::Invalid(format!(
                "train config: top_layers {} exceeds the model's {num_layers} layers; use 1..={num_layers}, or 0 for all",
                config.top_layers
            )));
        }
        let lora_config = config.lora(num_layers);
        let lora = Lora::new(model.config(), lora_config.clone(), config.seed, &device)?;
        let mut opt = AdamW::new(lora.vars(), config.optimizer.clone())?;
        if resume {
            let dir = checkpoint_dir(run_dir);
            let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &device)
                .map_err(|e| file_err(&dir, e))?;
            let restored = Lora::from_peft_tensors(model.config(), lora_config, &tensors, &device)
                .map_err(|m| file_err(&dir, m))?;
            for (v, r) in lora.vars().iter().zip(restored.vars()) {
                v.set(r.as_tensor()).map_err(candle)?;
            }
            opt.load(&dir.join("optimizer.safetensors"), state.step, &device)?;
        }
        let pad = base.tokenizer().token_to_id("<|endoftext|>").unwrap_or(0);
        let prefix = base.prefix_cache()?;
        std::fs::create_dir_all(run_dir).map_err(|e| file_err(run_dir, e))?;
        let first = config.first_layer(num_layers);
        let features = (first > 0).then(|| {
            // Everything the frozen layers' output depends on besides the tokens: the model
            // (its sha256 when known, else path and size), how it was loaded, and the system
            // prompt's exact tokens (a reworded taxonomy description of the same length is
            // another prefix).
            use sha2::Digest;
            let mut prefix = sha2::Sha256::new();
            for t in base.prefix_tokens() {
                prefix.update(t.to_le_bytes());
            }
            let prefix: String = prefix.finalize()[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let key = format!(
                "{}|{}|{}|{:?}|{}|{prefix}",
                gguf.path().display(),
                gguf.file_len(),
                base.options().model_sha256.as_deref().unwrap_or("-"),
                base.options().requantize_q5_0,
                base.prefix_tokens().len()
            );
            Features::new(&run_dir.join("features"), &key, first, model.config().hidden_size)
        });
        let dense = match config.dense_weights {
            true => model.dense_weights(first..num_layers, true, model.training_dense_dtype())?,
            false => DenseWeights::none(num_layers),
        };
        Ok(Trainer {
            base,
            gguf,
            model,
            prefix,
            config,
            train: train_items,
            val: val_items,
            val_examples: val.to_vec(),
            lora,
            opt,
            state,
            run_dir: run_dir.to_owned(),
            pad,
            first,
            features,
            dense,
            fingerprint,
        })
    }

    /// The run's configuration (the saved one when resuming).
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The run state.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// Training items after encoding.
    pub fn train_items(&self) -> &[Item] {
        &self.train
    }

    /// The micro-batch of items `idx` and the input of the first adapted layer for it.
    fn batch(&self, items: &[Item], idx: &[usize]) -> Result<(MicroBatch, Tensor), TrainError> {
        let c = &self.config;
        let mb = micro_batch(items, idx, self.pad, c.objective, c.summary_weight);
        let device = self.model.device();
        let hidden = match &self.features {
            None => {
                let t = Tensor::from_vec(mb.tokens.clone(), (mb.b, mb.n), device).map_err(candle)?;
                self.model.embed(&t)?
            }
            Some(f) => {
                let rows = idx
                    .iter()
                    .map(|&i| {
                        let x = f.load(&items[i], device)?;
                        let pad = mb.n - items[i].tokens.len();
                        match pad {
                            0 => Ok(x),
                            p => x.pad_with_zeros(0, 0, p).map_err(candle),
                        }
                    })
                    .collect::<Result<Vec<_>, TrainError>>()?;
                Tensor::stack(&rows, 0).map_err(candle)?
            }
        };
        Ok((mb, hidden))
    }

    /// [`step_loss`] of a micro-batch with this run's model, prefix, adapter and settings.
    fn loss_grads(
        &self,
        items: &[Item],
        idx: &[usize],
        denom: impl Fn(&MicroBatch) -> f64,
        grads: Option<Option<(f64, u64)>>,
    ) -> Result<(f64, Option<GradStore>, MicroBatch), TrainError> {
        let (mb, hidden) = self.batch(items, idx)?;
        let ctx = StepCtx {
            model: &self.model,
            prefix: &self.prefix,
            lora: &self.lora,
            dense: &self.dense,
            checkpointing: self.config.checkpointing,
            head_chunk: self.config.head_chunk,
            composed: self.config.composed_ops,
        };
        let (l, g) = step_loss(&ctx, hidden, self.first, &mb, denom(&mb), grads)?;
        Ok((l, g, mb))
    }

    /// Computes the frozen layers' output for every training and validation example that
    /// does not have it yet (nothing to do when the adapter covers every layer).
    pub fn prepare_features(&self, stop: &AtomicBool, observer: &mut dyn Observer) -> Result<(), TrainError> {
        let Some(f) = &self.features else {
            return Ok(());
        };
        // Examples with the same tokens share their feature files: each is computed once.
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<&Item> = self
            .train
            .iter()
            .chain(&self.val)
            .filter(|i| !f.has(i) && seen.insert(i.tokens.as_slice()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        observer.message(&format!(
            "computing the output of the {} frozen layers for {} examples (once; kept in {})",
            f.first_layer(),
            missing.len(),
            self.run_dir.join("features").display()
        ));
        f.prepare(&self.model, &self.prefix, &missing, stop, &mut |d, t| {
            observer.features(d, t)
        })
    }

    /// Mean validation loss per unit of weight (canonical prompt, no dropout).
    pub fn val_loss(&self) -> Result<Option<f64>, TrainError> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let (mut sum, mut weight) = (0.0, 0.0);
        let idx: Vec<usize> = (0..self.val.len()).collect();
        for chunk in idx.chunks(self.config.batch_size) {
            let (l, _, mb) = self.loss_grads(&self.val, chunk, |_| 1.0, None)?;
            sum += l;
            weight += mb.weight;
        }
        let loss = sum / weight.max(1e-9);
        // Not a number cannot be written to (and read back from) a checkpoint, and says the
        // adapter has diverged.
        if !loss.is_finite() {
            return Err(TrainError::Invalid(format!(
                "after step {}: validation loss is {loss}; lower the learning rate",
                self.state.step
            )));
        }
        Ok(Some(loss))
    }

    /// Per-field accuracy of constrained decoding (the real inference path) with the current
    /// adapter on the first `accuracy_samples` validation examples.
    pub fn accuracy(&self, with_adapter: bool) -> Result<Vec<(String, f64)>, TrainError> {
        let k = self.config.accuracy_samples.min(self.val_examples.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let opts: StructurerOptions = self.base.options().clone();
        let mut s =
            Structurer::with_model(self.model.clone(), self.gguf, self.base.taxonomy().clone(), opts)?;
        if with_adapter {
            s = s.with_adapter(Arc::new(self.snapshot()?));
        }
        let fields = &self.base.taxonomy().fields;
        let mut right = vec![0usize; fields.len()];
        for e in &self.val_examples[..k] {
            let out = s.structure(&e.text)?;
            let same = |name: &str| out.ticket.get(name) == e.ticket.get(name);
            for (j, f) in fields.iter().enumerate() {
                // As `triage eval` scores it: a dependent value (an `Other` subcategory) is
                // right only under the right parent.
                let parent = f.dependency.as_ref().is_none_or(|d| same(&d.parent));
                right[j] += (same(&f.name) && parent) as usize;
            }
        }
        Ok(fields
            .iter()
            .zip(right)
            .map(|(f, r)| (f.name.clone(), r as f64 / k as f64))
            .collect())
    }

    /// A detached copy of the adapter (for inference while training continues).
    pub fn snapshot(&self) -> Result<Lora, TrainError> {
        let tensors: std::collections::HashMap<String, Tensor> = self
            .lora
            .peft_tensors()
            .into_iter()
            .map(|(k, v)| (k, v.copy().expect("copy")))
            .collect();
        Lora::from_peft_tensors(
            self.model.config(),
            self.lora.config.clone(),
            &tensors,
            self.model.device(),
        )
        .map_err(TrainError::Llm)
    }

    /// Writes `run_dir/checkpoint/` atomically, after flushing `metrics.jsonl` to disk (so the
    /// log holds every record the checkpoint covers, also after a power loss).
    pub fn checkpoint(&self) -> Result<(), TrainError> {
        let log = self.metrics_path();
        match std::fs::OpenOptions::new().append(true).open(&log) {
            Ok(f) => f.sync_all().map_err(|e| file_err(&log, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(&log, e)),
        }
        crate::adapter::write_dir(&checkpoint_dir(&self.run_dir), |tmp| {
            self.lora
                .save_safetensors(&tmp.join("adapter_model.safetensors"))?;
            self.opt.save(&tmp.join("optimizer.safetensors"))?;
            let state = Checkpoint {
                config: self.config.clone(),
                state: self.state.clone(),
                fingerprint: Some(self.fingerprint.clone()),
            };
            let p = tmp.join(STATE_FILE);
            let json = serde_json::to_string_pretty(&state).expect("json");
            // What `--resume` could not read must not replace the last good checkpoint (JSON
            // has no NaN: a non-finite figure would be written as null).
            serde_json::from_str::<Checkpoint>(&json).map_err(|e| {
                TrainError::Invalid(format!(
                    "step {}: the run state would not read back ({e}); the previous checkpoint is kept",
                    self.state.step
                ))
            })?;
            std::fs::write(&p, json).map_err(|e| file_err(&p, e))
        })
    }

    /// `run_dir/metrics.jsonl`: one record per step and evaluation.
    fn metrics_path(&self) -> PathBuf {
        self.run_dir.join("metrics.jsonl")
    }

    fn log(&self, record: serde_json::Value) -> Result<(), TrainError> {
        let path = self.metrics_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| file_err(&path, e))?;
        writeln!(f, "{record}").map_err(|e| file_err(&path, e))
    }

    /// On resume: drops the records `metrics.jsonl` holds past the checkpoint (steps that ran
    /// after it and are about to run again, and evaluations at its own step that it does not
    /// hold, such as a final one interrupted after its validation loss was logged) and a torn
    /// last line, so the log reads as the uninterrupted run's.
    fn truncate_log(&self) -> Result<(), TrainError> {
        let path = self.metrics_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(file_err(&path, e)),
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| covered_by(&v, &self.state))
            })
            .flat_map(|l| [l, "\n"])
            .collect();
        if kept.len() != text.len() {
            triage_data::atomic_write(&path, kept.as_bytes()).map_err(TrainError::Data)?;
        }
        Ok(())
    }

    fn plot(&self) -> Result<(), TrainError> {
        let train: Vec<(f64, f64)> = self
            .state
            .train_loss
            .iter()
            .map(|&(s, l)| (s as f64, l))
            .collect();
        let val: Vec<(f64, f64)> = self.state.val_loss.iter().map(|&(s, l)| (s as f64, l)).collect();
        let svg = crate::plot::loss_svg(&[
            ("train loss", "#1f77b4", train),
            ("validation loss", "#d62728", val),
        ]);
        let path = self.run_dir.join("loss.svg");
        triage_data::atomic_write(&path, svg.as_bytes()).map_err(TrainError::Data)
    }

    /// Runs to `config.steps`, checkpointing as configured and when `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool, observer: &mut dyn Observer) -> Result<Summary, TrainError> {
        let c = self.config.clone();
        self.prepare_features(stop, observer)?;
        // Not `step == 0`: a stop during the first step checkpoints step 0 with the
        // evaluations before training already done.
        let fresh = self.state == RunState::default();
        match fresh {
            // A fresh run's log starts empty (not after an earlier run's records).
            true => match std::fs::remove_file(self.metrics_path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(file_err(&self.metrics_path(), e))
                }
                _ => {}
            },
            // The curve of a resumed run is redrawn from the records kept: one drawn after the
            // checkpoint (before a kill) shows steps that will run again.
            false => {
                self.truncate_log()?;
                self.plot()?;
            }
        }
        let val_before = if fresh {
            self.val_loss()?
        } else {
            self.state.val_loss.first().map(|v| v.1)
        };
        if fresh {
            if let Some(v) = val_before {
                self.state.val_loss.push((0, v));
                self.log(serde_json::json!({"step": 0, "val_loss": v}))?;
                observer.message(&format!("validation loss before training: {v:.4}"));
            }
        }
        let accuracy_before = if fresh && c.accuracy_samples > 0 {
            let a = self.accuracy(false)?;
            self.state.accuracy.push((0, a.clone()));
            self.log(serde_json::json!({"step": 0, "accuracy": a}))?;
            observer.message(&format!("accuracy before training: {}", fmt_acc(&a)));
            a
        } else {
            self.state
                .accuracy
                .first()
                .map(|a| a.1.clone())
                .unwrap_or_default()
        };
        let vars = self.lora.vars();
        // The batch order of an epoch (computed once per epoch, from the seed and epoch number,
        // so a resumed run continues with the same order).
        let epoch_order = |epoch: usize| {
            batches(
                &self.train,
                c.batch_size,
                c.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9),
            )
        };
        let mut order = (self.state.epoch, epoch_order(self.state.epoch));
        while self.state.step < c.steps {
            let t0 = Instant::now();
            // A stop between micro-batches drops the step's partial gradients, so the
            // checkpoint must point at the step's first batch, not past the ones it drops.
            let at_step_start = (self.state.epoch, self.state.batch);
            let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
            let (mut loss_sum, mut tokens) = (0.0, 0usize);
            for micro in 0..c.grad_accum {
                if stop.load(Ordering::SeqCst) {
                    (self.state.epoch, self.state.batch) = at_step_start;
                    self.checkpoint()?;
                    self.plot()?;
                    return Err(TrainError::Interrupted(self.state.step));
                }
                if self.state.batch >= order.1.len() {
                    self.state.epoch += 1;
                    self.state.batch = 0;
                }
                if order.0 != self.state.epoch {
                    order = (self.state.epoch, epoch_order(self.state.epoch));
                }
                let idx = order.1[self.state.batch].clone();
                self.state.batch += 1;
                let dropout = (c.dropout > 0.0).then_some((
                    c.dropout,
                    c.seed ^ ((self.state.step as u64) << 16 | micro as u64),
                ));
                let denom = |mb: &MicroBatch| mb.weight.max(1e-9) * c.grad_accum as f64;
                let (loss, grads, mb) = self.loss_grads(&self.train, &idx, denom, Some(dropout))?;
                let grads = grads.expect("asked for gradients");
                loss_sum += loss * c.grad_accum as f64;
                tokens += mb.seen;
                for (slot, v) in acc.iter_mut().zip(&vars) {
                    if let Some(g) = grads.get(v) {
                        *slot = Some(match slot.take() {
                            None => g.clone(),
                            Some(a) => (a + g).map_err(candle)?,
                        });
                    }
                }
                observer.micro_batch(self.state.step + 1, micro);
            }
            let mut grads: Vec<Tensor> = acc
                .into_iter()
                .zip(&vars)
                .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like().map_err(candle), Ok))
                .collect::<Result<_, _>>()?;
            let grad_norm = clip_grad_norm(&mut grads, c.max_grad_norm)?;
            let lr = lr_at(c.optimizer.lr, self.state.step, c.warmup_steps, c.steps);
            let loss = loss_sum / c.grad_accum as f64;
            if !grad_norm.is_finite() || !loss.is_finite() {
                return Err(TrainError::Invalid(format!(
                    "step {}: gradient norm is {grad_norm}, loss {loss}; lower the learning rate",
                    self.state.step + 1
                )));
            }
            self.opt.update(&grads, lr)?;
            self.state.step += 1;
            self.state.train_loss.push((self.state.step, loss));
            let secs = t0.elapsed().as_secs_f64();
            let report = StepReport {
                step: self.state.step,
                steps: c.steps,
                loss,
                lr,
                grad_norm,
                tokens,
                tokens_per_s: tokens as f64 / secs.max(1e-9),
            };
            self.log(serde_json::to_value(&report).expect("json"))?;
            observer.step(&report);
            let s = self.state.step;
            if c.eval_every > 0 && s.is_multiple_of(c.eval_every) && s < c.steps {
                if let Some(v) = self.val_loss()? {
                    self.state.val_loss.push((s, v));
                    self.log(serde_json::json!({"step": s, "val_loss": v}))?;
                    observer.message(&format!("step {s}: validation loss {v:.4}"));
                }
                self.plot()?;
            }
            if c.accuracy_every > 0 && s.is_multiple_of(c.accuracy_every) && s < c.steps {
                let a = self.accuracy(true)?;
                self.log(serde_json::json!({"step": s, "accuracy": a}))?;
                observer.message(&format!("step {s}: accuracy {}", fmt_acc(&a)));
                self.state.accuracy.push((s, a));
            }
            if c.checkpoint_every > 0 && s.is_multiple_of(c.checkpoint_every) && s < c.steps {
                self.checkpoint()?;
                observer.message(&format!("step {s}: checkpoint written"));
            }
        }
        let (val_after, accuracy_after) = match self.state.finished {
            // A resumed finished run: its final evaluation is in the checkpoint.
            true => (
                self.state
                    .val_loss
                    .last()
                    .filter(|v| v.0 == self.state.step)
                    .map(|v| v.1),
                self.state
                    .accuracy
                    .last()
                    .filter(|a| a.0 == self.state.step)
                    .map(|a| a.1.clone())
                    .unwrap_or_default(),
            ),
            false => {
                // The steps are safe before the (long, uninterruptible) final evaluation.
                self.checkpoint()?;
                let val_after = self.val_loss()?;
                if let Some(v) = val_after {
                    self.state.val_loss.push((self.state.step, v));
                    self.log(serde_json::json!({"step": self.state.step, "val_loss": v}))?;
                    observer.message(&format!("validation loss after training: {v:.4}"));
                }
                let accuracy_after = if c.accuracy_samples > 0 {
                    let a = self.accuracy(true)?;
                    self.log(serde_json::json!({"step": self.state.step, "accuracy": a}))?;
                    observer.message(&format!("accuracy after training: {}", fmt_acc(&a)));
                    self.state.accuracy.push((self.state.step, a.clone()));
                    a
                } else {
                    Vec::new()
                };
                self.state.finished = true;
                self.checkpoint()?;
                (val_after, accuracy_after)
            }
        };
        self.plot()?;
        Ok(Summary {
            steps: self.state.step,
            val_loss_before: val_before,
            val_loss_after: val_after,
            accuracy_before,
            accuracy_after,
            first_loss: self.state.train_loss.first().map_or(f64::NAN, |x| x.1),
            last_loss: self.state.train_loss.last().map_or(f64::NAN, |x| x.1),
        })
    }
}

/// The file of the run state in a checkpoint folder (`{"config", "state": {"step", …}}`).
const STATE_FILE: &str = "state.json";

/// `run_dir/checkpoint/`: what [`Trainer::checkpoint`] writes and `--resume` reads.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// The run state of `run_dir`'s checkpoint; it exists once a checkpoint was written.
pub fn checkpoint_state(run_dir: &Path) -> PathBuf {
    checkpoint_dir(run_dir).join(STATE_FILE)
}

/// An exclusive hold on a run folder while it lives (see [`lock_run_dir`]).
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

/// Takes `run_dir`'s lock (`run_dir/.lock`; the folder is created): two runs in one folder
/// would interleave their `metrics.jsonl` and remove each other's checkpoint swaps. Released
/// when the [`RunLock`] is dropped or the process ends, however it ends. Where the file cannot
/// be locked (a file system without locks), a warning and no lock.
pub fn lock_run_dir(run_dir: &Path) -> Result<RunLock, TrainError> {
    std::fs::create_dir_all(run_dir).map_err(|e| file_err(run_dir, e))?;
    let path = run_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| file_err(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(RunLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(TrainError::Invalid(format!(
            "{}: another run is using this run folder; wait for it to finish, stop it, or give \
             another --run-dir",
            run_dir.display()
        ))),
        // No file locks here (a network file system without a lock service): the lock only
        // guards against a mistake, so the run goes on, warned.
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(
                "{}: cannot lock ({e}), so nothing stops a second run in this folder",
                path.display()
            );
            Ok(RunLock { _file: file })
        }
    }
}

/// Restores `run_dir`'s checkpoint if a kill in the middle of replacing it left only the
/// previous one, moved aside (see `write_dir`); call before looking for a checkpoint.
pub fn recover_checkpoint(run_dir: &Path) -> Result<bool, TrainError> {
    crate::adapter::recover_dir(&checkpoint_dir(run_dir), STATE_FILE)
}

/// `category 0.40, priority 0.55, ...`.
pub fn fmt_acc(a: &[(String, f64)]) -> String {
    a.iter()
        .map(|(f, v)| format!("{f} {v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    config: TrainConfig,
    state: RunState,
    /// [`fingerprint`] of the run (absent in checkpoints written before it existed).
    #[serde(default)]
    fingerprint: Option<String>,
}

fn read_checkpoint(run_dir: &Path) -> Result<Checkpoint, TrainError> {
    let state_path = checkpoint_state(run_dir);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| file_err(&state_path, format!("{e}: no checkpoint to resume")))?;
    serde_json::from_str(&text).map_err(|e| file_err(&state_path, e))
}

/// The configuration `run_dir`'s checkpoint was trained with (what `--resume` continues with,
/// see [`TrainConfig::with_run_settings_of`]), and whether the checkpoint is of this version's
/// format (it has a data fingerprint; an older one's configuration may lack keys added since,
/// read as their defaults).
pub fn saved_config(run_dir: &Path) -> Result<(TrainConfig, bool), TrainError> {
    let c = read_checkpoint(run_dir)?;
    Ok((c.config, c.fingerprint.is_some()))
}

/// Whether the `metrics.jsonl` record `v` belongs to the run up to `state`'s checkpoint: a
/// record of an earlier step, the checkpoint step's own step record, or an evaluation at that
/// step which the checkpoint holds.
fn covered_by(v: &serde_json::Value, state: &RunState) -> bool {
    let Some(step) = v["step"].as_u64().map(|s| s as usize) else {
        return false;
    };
    match step.cmp(&state.step) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal if v.get("val_loss").is_some() => {
            state.val_loss.iter().any(|x| x.0 == step)
        }
        std::cmp::Ordering::Equal if v.get("accuracy").is_some() => {
            state.accuracy.iter().any(|x| x.0 == step)
        }
        std::cmp::Ordering::Equal => true,
    }
}

/// A hash of what a run trains and validates on: the model file (its sha256 when known, and
/// size), the system prompt's tokens and every encoded training and validation example
/// (tokens and where its answer starts). A resume over other data, another taxonomy or
/// prompt, or another model would silently continue another run's data order; it is refused.
fn fingerprint(gguf: &GgufFile, base: &Structurer, train: &[Item], val: &[Item]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(base.options().model_sha256.as_deref().unwrap_or("-").as_bytes());
    h.update(gguf.file_len().to_le_bytes());
    for t in base.prefix_tokens() {
        h.update(t.to_le_bytes());
    }
    for (tag, items) in [(b"train", train), (b"val\0\0", val)] {
        h.update(tag);
        h.update((items.len() as u64).to_le_bytes());
        for it in items {
            h.update((it.tokens.len() as u64).to_le_bytes());
            h.update((it.start as u64).to_le_bytes());
            for t in &it.tokens {
                h.update(t.to_le_bytes());
            }
        }
    }
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Set to `1`, quantized matrix products on CUDA skip candle's MMQ/MMVQ kernels for its older
/// dequantize-then-multiply path: an A/B switch for `docs/gpu.sh` (the NaN of `docs/gpu.md`).
pub const FORCE_DMMV_ENV: &str = "TRIAGE_CUDA_FORCE_DMMV";

/// The device for `spec` (`cpu`, `cuda`, `cuda:N`).
pub fn device(spec: &str) -> Result<Device, TrainError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            #[cfg(feature = "cuda")]
            if std::env::var_os(FORCE_DMMV_ENV).is_some_and(|v| v == "1") {
                tracing::warn!("{FORCE_DMMV_ENV}=1: quantized CUDA products dequantize, then multiply");
                candle_core::quantized::cuda::set_force_dmmv(true);
            }
            let n = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse::<usize>)
                .map_err(|_| TrainError::Invalid(format!("bad device {s:?}: use cpu, cuda or cuda:N")))?;
            Device::new_cuda(n).map_err(|e| {
                let hint = if cfg!(feature = "cuda") {
                    "is an NVIDIA GPU visible (`nvidia-smi`), with its driver loaded?"
                } else {
                    "this build has no CUDA: build with `--features cuda` (docs/gpu.sh)"
                };
                TrainError::Invalid(format!("{s}: {e} ({hint})"))
            })
        }
        other => Err(TrainError::Invalid(format!(
            "unknown device {other:?}: use cpu, cuda or cuda:N"
        ))),
    }
}
