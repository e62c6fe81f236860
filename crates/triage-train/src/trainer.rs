//! The training loop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};
use triage_data::Example;
use triage_infer::{Structurer, StructurerOptions};
use triage_llm::lora::{Lora, LoraConfig, Target};
use triage_llm::qwen2::{KvCache, Qwen2};
use triage_llm::GgufFile;

use crate::data::{batches, Encoder, Item};
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
    /// Per-layer activation recomputation (keeps one layer's graph alive instead of all;
    /// about 1.3× the compute). Off = one whole graph, faster when memory allows.
    pub checkpointing: bool,
    /// Answer positions whose logits are computed at once (bounds the `[b, chunk, vocab]`
    /// logits; only with `checkpointing`).
    pub head_chunk: usize,
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
        }
    }
}

impl TrainConfig {
    /// The adapter shape.
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
        }
    }

    /// Sets the LoRA rank, with alpha = 2 × rank (the scale alpha/rank stays 2).
    pub fn set_rank(&mut self, rank: usize) {
        self.rank = rank;
        self.alpha = 2.0 * rank as f64;
    }

    /// Checks ranges, naming the offending key.
    pub fn check(&self) -> Result<(), TrainError> {
        let bad = |k: &str, why: &str| Err(TrainError::Invalid(format!("train config: {k} {why}")));
        if self.rank == 0 {
            return bad("rank", "must be at least 1");
        }
        if self.targets.is_empty() {
            return bad("targets", "must name at least one projection");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", "must be in [0, 1)");
        }
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return bad("steps/batch_size/grad_accum", "must be at least 1");
        }
        if self.head_chunk == 0 {
            return bad("head_chunk", "must be at least 1");
        }
        if !(self.optimizer.lr > 0.0 && self.optimizer.lr.is_finite()) {
            return bad("optimizer.lr", "must be a positive number");
        }
        Ok(())
    }
}

/// One padded micro-batch: `tokens` `[b, n]`, and next-token `targets`/`mask` `[b, n - from]`
/// for the logit positions `from..n`.
pub(crate) struct MicroBatch {
    pub(crate) b: usize,
    pub(crate) n: usize,
    pub(crate) from: usize,
    pub(crate) tokens: Vec<u32>,
    pub(crate) targets: Vec<u32>,
    pub(crate) mask: Vec<f32>,
    pub(crate) count: usize,
    pub(crate) seen: usize,
}

/// Summed cross-entropy of the micro-batch's answer tokens divided by `denom`, with the
/// adapter's gradients when `grads` is `Some(dropout)` (`None` = validation: no graph).
/// `how` is `(checkpointing, head_chunk)`: per-layer recomputation and a chunked head, or
/// one whole graph.
pub(crate) fn step_loss(
    model: &Qwen2,
    prefix: &KvCache,
    lora: &Lora,
    mb: &MicroBatch,
    denom: f64,
    grads: Option<Option<(f64, u64)>>,
    (checkpointing, chunk): (bool, usize),
) -> Result<(f64, Option<GradStore>), TrainError> {
    let device = model.device();
    let m = mb.n - mb.from;
    let targets = Tensor::from_vec(mb.targets.clone(), (mb.b, m, 1), device).map_err(candle)?;
    let mask = Tensor::from_vec(mb.mask.clone(), (mb.b, m), device).map_err(candle)?;
    let tokens = Tensor::from_vec(mb.tokens.clone(), (mb.b, mb.n), device).map_err(candle)?;
    let ce = |logits: &Tensor, off: usize| -> candle_core::Result<Tensor> {
        let c = logits.dim(1)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
        let picked = logits.gather(&targets.narrow(1, off, c)?.contiguous()?, D::Minus1)?;
        let nll = (lse - picked)?.squeeze(D::Minus1)?;
        (nll * mask.narrow(1, off, c)?)?.sum_all()? / denom
    };
    let prefix = Some(prefix);
    match grads {
        None => Ok((
            model.loss_only(&tokens, prefix, Some(lora), mb.from, chunk, &ce)?,
            None,
        )),
        Some(dropout) if checkpointing => {
            let (l, g) = model.loss_and_grads(&tokens, prefix, lora, mb.from, dropout, chunk, &ce)?;
            Ok((l, Some(g)))
        }
        Some(dropout) => {
            let run = || -> candle_core::Result<(f64, GradStore)> {
                let logits = model
                    .forward_train(&tokens, prefix, Some(lora), mb.from, dropout)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let l = ce(&logits, 0)?;
                Ok((l.to_scalar::<f32>()? as f64, l.backward()?))
            };
            let (l, g) = run().map_err(candle)?;
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
    prefix: KvCache,
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
        let (config, state) = if resume {
            let state_path = run_dir.join("checkpoint").join("state.json");
            let text = std::fs::read_to_string(&state_path)
                .map_err(|e| file_err(&state_path, format!("{e}: no checkpoint to resume")))?;
            let saved: Checkpoint = serde_json::from_str(&text).map_err(|e| file_err(&state_path, e))?;
            (saved.config, saved.state)
        } else {
            (config, RunState::default())
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
        let lora = Lora::new(model.config(), config.lora(), config.seed, &device)?;
        let mut opt = AdamW::new(lora.vars(), config.optimizer.clone())?;
        if resume {
            let dir = run_dir.join("checkpoint");
            let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &device)
                .map_err(|e| file_err(&dir, e))?;
            let restored = Lora::from_peft_tensors(model.config(), config.lora(), &tensors, &device)
                .map_err(|m| file_err(&dir, m))?;
            for (v, r) in lora.vars().iter().zip(restored.vars()) {
                v.set(r.as_tensor()).map_err(candle)?;
            }
            opt.load(&dir.join("optimizer.safetensors"), state.step, &device)?;
        }
        let pad = base.tokenizer().token_to_id("<|endoftext|>").unwrap_or(0);
        let prefix = base.prefix_cache()?;
        std::fs::create_dir_all(run_dir).map_err(|e| file_err(run_dir, e))?;
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

    /// Pads the examples `idx` of `items` into one micro-batch with next-token targets.
    fn micro_batch(&self, items: &[Item], idx: &[usize]) -> MicroBatch {
        let n = idx.iter().map(|&i| items[i].tokens.len()).max().unwrap_or(0);
        let from = idx
            .iter()
            .map(|&i| items[i].start)
            .min()
            .unwrap_or(1)
            .saturating_sub(1);
        let b = idx.len();
        let mut tokens = vec![self.pad; b * n];
        let m = n - from; // logit positions; the last one predicts nothing (masked)
        let mut targets = vec![0u32; b * m];
        let mut mask = vec![0f32; b * m];
        let (mut count, mut seen) = (0, 0);
        for (r, &i) in idx.iter().enumerate() {
            let it = &items[i];
            tokens[r * n..r * n + it.tokens.len()].copy_from_slice(&it.tokens);
            seen += it.tokens.len();
            for p in from..n - 1 {
                let next = p + 1;
                if next >= it.start && next < it.tokens.len() {
                    targets[r * m + (p - from)] = it.tokens[next];
                    mask[r * m + (p - from)] = 1.0;
                    count += 1;
                }
            }
        }
        MicroBatch {
            b,
            n,
            from,
            tokens,
            targets,
            mask,
            count,
            seen,
        }
    }

    /// [`step_loss`] of a micro-batch with this run's model, prefix, adapter and settings.
    fn loss_grads(
        &self,
        mb: &MicroBatch,
        denom: f64,
        grads: Option<Option<(f64, u64)>>,
    ) -> Result<(f64, Option<GradStore>), TrainError> {
        let c = &self.config;
        let how = (c.checkpointing, c.head_chunk);
        step_loss(&self.model, &self.prefix, &self.lora, mb, denom, grads, how)
    }

    /// Mean validation loss (canonical prompt, no dropout).
    pub fn val_loss(&self) -> Result<Option<f64>, TrainError> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let (mut sum, mut count) = (0.0, 0usize);
        let idx: Vec<usize> = (0..self.val.len()).collect();
        for chunk in idx.chunks(self.config.batch_size) {
            let mb = self.micro_batch(&self.val, chunk);
            sum += self.loss_grads(&mb, 1.0, None)?.0;
            count += mb.count;
        }
        Ok(Some(sum / count.max(1) as f64))
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
        let fields: Vec<String> = self
            .base
            .taxonomy()
            .fields
            .iter()
            .map(|f| f.name.clone())
            .collect();
        let mut right = vec![0usize; fields.len()];
        for e in &self.val_examples[..k] {
            let out = s.structure(&e.text)?;
            for (j, f) in fields.iter().enumerate() {
                right[j] += (out.ticket.get(f) == e.ticket.get(f)) as usize;
            }
        }
        Ok(fields
            .into_iter()
            .zip(right)
            .map(|(f, r)| (f, r as f64 / k as f64))
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
        .map_err(TrainError::Invalid)
    }

    /// Writes `run_dir/checkpoint/` atomically.
    pub fn checkpoint(&self) -> Result<(), TrainError> {
        crate::adapter::write_dir(&self.run_dir.join("checkpoint"), |tmp| {
            self.lora
                .save_safetensors(&tmp.join("adapter_model.safetensors"))?;
            self.opt.save(&tmp.join("optimizer.safetensors"))?;
            let state = Checkpoint {
                config: self.config.clone(),
                state: self.state.clone(),
            };
            let p = tmp.join("state.json");
            std::fs::write(&p, serde_json::to_string_pretty(&state).expect("json"))
                .map_err(|e| file_err(&p, e))
        })
    }

    fn log(&self, record: serde_json::Value) -> Result<(), TrainError> {
        let path = self.run_dir.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| file_err(&path, e))?;
        writeln!(f, "{record}").map_err(|e| file_err(&path, e))
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
        let fresh = self.state.step == 0;
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
            let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
            let (mut loss_sum, mut tokens) = (0.0, 0usize);
            for micro in 0..c.grad_accum {
                if stop.load(Ordering::SeqCst) {
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
                let mb = self.micro_batch(&self.train, &idx);
                let denom = (mb.count.max(1) * c.grad_accum) as f64;
                let (loss, grads) = self.loss_grads(&mb, denom, Some(dropout))?;
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
            }
            let mut grads: Vec<Tensor> = acc
                .into_iter()
                .zip(&vars)
                .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like().map_err(candle), Ok))
                .collect::<Result<_, _>>()?;
            let grad_norm = clip_grad_norm(&mut grads, c.max_grad_norm)?;
            let lr = lr_at(c.optimizer.lr, self.state.step, c.warmup_steps, c.steps);
            if !grad_norm.is_finite() {
                return Err(TrainError::Invalid(format!(
                    "step {}: gradient norm is {grad_norm}; lower the learning rate",
                    self.state.step + 1
                )));
            }
            self.opt.update(&grads, lr)?;
            self.state.step += 1;
            let loss = loss_sum / c.grad_accum as f64;
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
        self.checkpoint()?;
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
}

/// The device for `spec` (`cpu`, `cuda`, `cuda:N`).
pub fn device(spec: &str) -> Result<Device, TrainError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let n = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse::<usize>)
                .map_err(|_| TrainError::Invalid(format!("bad device {s:?}: use cpu, cuda or cuda:N")))?;
            Device::new_cuda(n).map_err(|e| {
                TrainError::Invalid(format!(
                    "{s}: {e} (build with --features cuda on a machine with the CUDA toolkit)"
                ))
            })
        }
        other => Err(TrainError::Invalid(format!(
            "unknown device {other:?}: use cpu, cuda or cuda:N"
        ))),
    }
}
