//! The training step: a LoRA adapter's loss and gradients, through the same layer code as
//! inference (with differentiable operations), starting at any layer.
//!
//! * **Any first layer.** A [`TrainInput`] is the input of layer `first_layer`: the token
//!   embeddings for 0, or the hidden states the frozen layers below computed once (they have
//!   no adapter, so their output never changes while the layers above train). Keys and values
//!   of the shared prefix (the system prompt) are the base model's, as at inference.
//! * **The loss where the decisions are.** A [`LossSpec`] lists supervised positions: a
//!   free-text token scored against the whole vocabulary, or an enum value's token scored
//!   *among the tokens the decoder chooses between* at that point — the same renormalisation
//!   the constrained decoder applies when it scores whole values, so the loss is the
//!   decoder's own negative log-probability of the right value. Positions the grammar forces
//!   carry no loss.
//! * **Memory.** The head runs `head_chunk` positions at a time, and the backward pass goes
//!   one layer at a time (a vector–Jacobian product per layer), so one layer's gradients are
//!   alive at once; [`Graph::Recompute`] also keeps only each layer's input from the forward
//!   pass and re-runs the layer with a graph when its turn comes. Both are tested equal to
//!   back-propagating one whole graph.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var, D};

use super::layer::{Extras, Past, Positions};
use super::ops::{Differentiable, Ops};
use super::{DenseWeights, KvCache, Qwen2};
use crate::lora::Lora;
use crate::LlmError;

/// The input of a training forward.
pub struct TrainInput<'a> {
    /// `[b, n, hidden]`: the input of layer `first_layer` ([`Qwen2::embed`] for layer 0, or
    /// [`Qwen2::run_layer`] through the frozen layers below).
    pub hidden: Tensor,
    /// The first layer run.
    pub first_layer: usize,
    /// Keys and values of the positions before the batch (the shared system prompt),
    /// computed by the base model; attended to, never trained.
    pub prefix: Option<&'a KvCache>,
}

/// One supervised position: the next-token distribution at position `pos` of sequence `row`
/// should put its mass on `target`.
#[derive(Debug, Clone, PartialEq)]
pub struct Supervised {
    /// Sequence in the batch.
    pub row: usize,
    /// Position whose output predicts `target`.
    pub pos: usize,
    /// The right next token.
    pub target: u32,
    /// Weight of this position in the loss.
    pub weight: f32,
    /// `None`: cross-entropy over the whole vocabulary. `Some(tokens)`: cross-entropy among
    /// `tokens` only (they include `target`).
    pub among: Option<Vec<u32>>,
}

/// The loss of a batch: `Σ weight · nll / denom` over the supervised positions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossSpec {
    /// Supervised positions.
    pub positions: Vec<Supervised>,
    /// Divisor (the trainer uses the micro-batch's summed weight times `grad_accum`, so each
    /// micro-batch of a step weighs the same).
    pub denom: f64,
}

/// How much of a step's gradient graph is alive at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graph {
    /// One graph over every layer and the head, back-propagated at once (the reference; the
    /// most memory: every intermediate tensor and every gradient until the end).
    Whole,
    /// Each layer's graph kept from the forward pass, back-propagated one layer at a time and
    /// freed after its turn (the gradients of one layer at a time).
    PerLayer,
    /// Only each layer's input kept; each layer re-run with a graph during the backward pass
    /// (activation checkpointing: the least memory, one more forward pass).
    Recompute,
}

/// How a training step runs.
#[derive(Debug, Clone)]
pub struct StepOptions {
    /// `(p, seed)`: dropout on the LoRA branch inputs, deterministic for a seed.
    pub dropout: Option<(f64, u64)>,
    /// What of the gradient graph is kept.
    pub graph: Graph,
    /// Full-vocabulary positions whose logits `[chunk, vocab]` exist at once.
    pub head_chunk: usize,
    /// Differentiable primitives instead of the CPU kernels (the reference implementation,
    /// and the first release's training path; slower).
    pub composed: bool,
}

/// Layer inputs shared by a training forward: positions and the prefix's keys and values
/// broadcast to the batch.
struct Ctx {
    at: Positions,
    past: Vec<Option<(Tensor, Tensor)>>,
    first: usize,
}

impl Qwen2 {
    /// Loss and adapter gradients of one micro-batch (see the module documentation).
    /// Returns the loss and a gradient store holding (at least) every adapter variable that
    /// received a gradient.
    pub fn loss_and_grads(
        &self,
        input: &TrainInput,
        spec: &LossSpec,
        lora: &Lora,
        dense: &DenseWeights,
        opts: &StepOptions,
    ) -> std::result::Result<(f64, GradStore), LlmError> {
        self.step(input, spec, lora, dense, opts).map_err(LlmError::from)
    }

    /// The loss of [`Qwen2::loss_and_grads`] without gradients (validation): no graph is
    /// recorded, no dropout, and the head runs chunk by chunk.
    pub fn loss_only(
        &self,
        input: &TrainInput,
        spec: &LossSpec,
        lora: Option<&Lora>,
        dense: &DenseWeights,
        opts: &StepOptions,
    ) -> std::result::Result<f64, LlmError> {
        let run = || -> Result<f64> {
            let ctx = self.train_ctx(input, lora)?;
            let ops = Differentiable {
                track: false,
                dropout: None,
                composed: opts.composed,
            };
            let x = self.run_layers(&input.hidden, &ctx, lora, dense, &ops)?;
            let mut total = 0.0;
            self.head_losses(&x, spec, dense, opts.head_chunk, &ops, &mut |l| {
                total += scalar(&l)?;
                Ok(())
            })?;
            Ok(total)
        };
        run().map_err(LlmError::from)
    }

    /// The whole-graph training forward: logits `[b, n, vocab]` of every position, with
    /// gradients tracked to the adapter's variables (`opts.checkpointing` and `head_chunk`
    /// do not apply). For tests and diagnostics; training uses [`Qwen2::loss_and_grads`].
    pub fn train_logits(
        &self,
        input: &TrainInput,
        lora: Option<&Lora>,
        dense: &DenseWeights,
        opts: &StepOptions,
    ) -> std::result::Result<Tensor, LlmError> {
        let run = || -> Result<Tensor> {
            let ctx = self.train_ctx(input, lora)?;
            let ops = Differentiable {
                track: true,
                dropout: opts.dropout,
                composed: opts.composed,
            };
            let x = self.run_layers(&input.hidden, &ctx, lora, dense, &ops)?;
            let x = ops.rms_norm(&x, &self.norm, self.cfg.rms_eps)?;
            ops.project(&self.lm_head, dense.head.as_ref(), &x, None)
        };
        run().map_err(LlmError::from)
    }

    fn step(
        &self,
        input: &TrainInput,
        spec: &LossSpec,
        lora: &Lora,
        dense: &DenseWeights,
        opts: &StepOptions,
    ) -> Result<(f64, GradStore)> {
        let ctx = self.train_ctx(input, Some(lora))?;
        let tracked = Differentiable {
            track: true,
            dropout: opts.dropout,
            composed: opts.composed,
        };
        if opts.graph == Graph::Whole {
            let x = self.run_layers(&input.hidden, &ctx, Some(lora), dense, &tracked)?;
            let mut losses = Vec::new();
            self.head_losses(&x, spec, dense, opts.head_chunk, &tracked, &mut |l| {
                losses.push(l);
                Ok(())
            })?;
            let total = match losses.len() {
                0 => return Ok((0.0, GradStore::default())),
                _ => Tensor::stack(&losses, 0)?.sum_all()?,
            };
            return Ok((scalar(&total)?, total.backward()?));
        }
        // The lowest adapted layer: no gradient is needed below it.
        let lowest = (ctx.first..self.layers.len())
            .find(|&li| !lora.layers[li].is_empty())
            .unwrap_or(self.layers.len());
        let untracked = Differentiable {
            track: false,
            dropout: opts.dropout,
            composed: opts.composed,
        };
        // Forward: layers below the lowest adapted one without a graph; from there on each
        // layer's input, and with `PerLayer` each layer's graph (its input a fresh variable).
        let mut inputs = Vec::with_capacity(self.layers.len() - ctx.first);
        let mut graphs: Vec<(Var, Tensor)> = Vec::new();
        let mut x = input.hidden.clone();
        for li in ctx.first..self.layers.len() {
            if li < lowest || opts.graph == Graph::Recompute {
                let y = self.train_layer(li, &x, &ctx, Some(lora), dense, &untracked)?;
                inputs.push(x);
                x = y;
            } else {
                let xin = Var::from_tensor(&x)?;
                let y = self.train_layer(li, xin.as_tensor(), &ctx, Some(lora), dense, &tracked)?;
                x = y.detach();
                graphs.push((xin, y));
            }
        }
        // Head, chunk by chunk: d(loss)/d(last hidden state).
        let h = Var::from_tensor(&x)?;
        let mut total = 0.0;
        let mut grad: Option<Tensor> = None;
        self.head_losses(h.as_tensor(), spec, dense, opts.head_chunk, &tracked, &mut |l| {
            total += scalar(&l)?;
            if let Some(d) = l.backward()?.remove(h.as_tensor()) {
                grad = Some(match grad.take() {
                    None => d,
                    Some(g) => (g + d)?,
                });
            }
            Ok(())
        })?;
        drop(x);
        let mut out = GradStore::default();
        let Some(mut grad) = grad else {
            return Ok((total, out));
        };
        // Backward, one layer at a time (re-run with a graph for `Recompute`), down to the
        // lowest adapted layer.
        for li in (lowest..self.layers.len()).rev() {
            let (xin, y) = match graphs.pop() {
                Some(g) => g,
                None => {
                    let xin = Var::from_tensor(&inputs[li - ctx.first])?;
                    let y = self.train_layer(li, xin.as_tensor(), &ctx, Some(lora), dense, &tracked)?;
                    (xin, y)
                }
            };
            let mut g = (y * &grad)?.sum_all()?.backward()?;
            for p in lora.layers[li].values() {
                for v in [&p.a, &p.b] {
                    if let Some(d) = g.remove(v.as_tensor()) {
                        out.insert(v.as_tensor(), d);
                    }
                }
            }
            if li > lowest {
                grad = match g.remove(xin.as_tensor()) {
                    Some(d) => d,
                    None => xin.as_tensor().zeros_like()?,
                };
            }
            inputs.truncate(li - ctx.first);
        }
        Ok((total, out))
    }

    /// Checks the input against the model and the adapter, and prepares what every layer
    /// shares.
    fn train_ctx(&self, input: &TrainInput, lora: Option<&Lora>) -> Result<Ctx> {
        let (b, n, hidden) = input.hidden.dims3()?;
        let first = input.first_layer;
        let past = input.prefix.map_or(0, |p| p.len);
        if n == 0
            || hidden != self.cfg.hidden_size
            || first > self.layers.len()
            || past + n > self.max_seq_len()
        {
            candle_core::bail!(
                "training input [{b}, {n}, {hidden}] from layer {first} after {past} prefix positions does not fit the model"
            );
        }
        if let Some(l) = lora {
            if let Some(li) = (0..first.min(l.layers.len())).find(|&li| !l.layers[li].is_empty()) {
                candle_core::bail!(
                    "the adapter has weights in layer {li}, below the first layer run ({first})"
                );
            }
        }
        let (hk, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let mut past_kv = Vec::with_capacity(self.layers.len() - first);
        for li in first..self.layers.len() {
            let kv = match input.prefix.and_then(|p| p.layers.get(li)) {
                Some(l) => l.view()?,
                None => None,
            };
            past_kv.push(match kv {
                None => None,
                Some((k, v)) => Some((
                    k.broadcast_as((b, hk, past, d))?,
                    v.broadcast_as((b, hk, past, d))?,
                )),
            });
        }
        Ok(Ctx {
            at: self.positions(past, n)?,
            past: past_kv,
            first,
        })
    }

    /// Layer `li` of a training forward.
    fn train_layer(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Ctx,
        lora: Option<&Lora>,
        dense: &DenseWeights,
        ops: &Differentiable,
    ) -> Result<Tensor> {
        let extras = Extras {
            layer: li,
            adapter: lora.map(|l| (&l.layers[li], l.scale())),
            dense: dense.layer(li),
        };
        let past = match &ctx.past[li - ctx.first] {
            Some((k, v)) => Past::Frozen(k.clone(), v.clone()),
            None => Past::None,
        };
        self.layers[li].forward(&self.cfg, x, &ctx.at, &mut [past], extras, ops)
    }

    /// Layers `ctx.first..` on `x`.
    fn run_layers(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        lora: Option<&Lora>,
        dense: &DenseWeights,
        ops: &Differentiable,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for li in ctx.first..self.layers.len() {
            x = self.train_layer(li, &x, ctx, lora, dense, ops)?;
        }
        Ok(x)
    }

    /// The loss of the supervised positions of `h` (the last layer's output `[b, n, hidden]`),
    /// handed to `each` in pieces (scalar tensors) whose sum is the loss: whole-vocabulary
    /// positions `chunk` at a time, then all enum positions together.
    fn head_losses(
        &self,
        h: &Tensor,
        spec: &LossSpec,
        dense: &DenseWeights,
        chunk: usize,
        ops: &Differentiable,
        each: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let (b, n, hidden) = h.dims3()?;
        let flat = h.reshape((b * n, hidden))?;
        let device = h.device();
        let denom = if spec.denom > 0.0 { spec.denom } else { 1.0 };
        for s in &spec.positions {
            if s.row >= b || s.pos >= n {
                candle_core::bail!(
                    "supervised position ({}, {}) outside the batch [{b}, {n}]",
                    s.row,
                    s.pos
                );
            }
        }
        let select = |items: &[&Supervised]| -> Result<Tensor> {
            let idx: Vec<u32> = items.iter().map(|s| (s.row * n + s.pos) as u32).collect();
            let sel = flat.index_select(&Tensor::new(idx, device)?, 0)?;
            ops.rms_norm(&sel, &self.norm, self.cfg.rms_eps)
        };
        let weighted_nll = |scores: &Tensor, picked: &Tensor, items: &[&Supervised]| -> Result<Tensor> {
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let lse = (scores.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
            let w: Vec<f32> = items.iter().map(|s| s.weight).collect();
            let w = Tensor::new(w, device)?;
            ((lse - picked)?.squeeze(1)? * w)?.sum_all()? / denom
        };

        // Whole-vocabulary positions.
        let full: Vec<&Supervised> = spec.positions.iter().filter(|s| s.among.is_none()).collect();
        for items in full.chunks(chunk.max(1)) {
            let logits = ops.project(&self.lm_head, dense.head.as_ref(), &select(items)?, None)?;
            let t: Vec<u32> = items.iter().map(|s| s.target).collect();
            let picked = logits.gather(&Tensor::new(t, device)?.unsqueeze(1)?, 1)?;
            each(weighted_nll(&logits, &picked, items)?)?;
        }

        // Enum positions: scores against the head rows of each position's own candidates.
        let choice: Vec<&Supervised> = spec.positions.iter().filter(|s| s.among.is_some()).collect();
        if choice.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<u32> = Vec::new();
        let mut ranges = Vec::with_capacity(choice.len());
        let mut picks: Vec<u32> = Vec::with_capacity(choice.len());
        for s in &choice {
            let among = s.among.as_deref().unwrap_or_default();
            let Some(at) = among.iter().position(|&t| t == s.target) else {
                candle_core::bail!(
                    "supervised token {} is not among its candidates {among:?}",
                    s.target
                );
            };
            picks.push((ids.len() + at) as u32);
            ranges.push(ids.len()..ids.len() + among.len());
            ids.extend_from_slice(among);
        }
        let rows = self.lm_head.embedding(&Tensor::new(ids.as_slice(), device)?)?; // [C, hidden]
        let scores = select(&choice)?.matmul(&rows.t()?)?; // [P, C]
        let mask: Vec<f32> = ranges
            .iter()
            .flat_map(|r| (0..ids.len()).map(move |j| if r.contains(&j) { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let scores = (scores + Tensor::from_vec(mask, (choice.len(), ids.len()), device)?)?;
        let picked = scores.gather(&Tensor::new(picks, device)?.unsqueeze(1)?, 1)?;
        each(weighted_nll(&scores, &picked, &choice)?)
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}
