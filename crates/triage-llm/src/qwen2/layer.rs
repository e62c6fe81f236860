//! One decoder layer's forward pass, written once for inference and training:
//!
//! ```text
//! x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))      grouped-query attention
//! x += down(silu(gate(n2(x))) * up(n2(x)))                    SwiGLU MLP
//! ```
//!
//! with every projection `W·x (+ LoRA)` and every norm, rotary embedding and softmax taken
//! from an [`Ops`] implementation: fused kernels at inference, differentiable primitives in
//! training.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

use super::cache::LayerKv;
use super::ops::{LoraRef, Ops};
use super::weights::Layer;
use super::Config;
use crate::lora::{LoraPair, Target};

/// What every layer of one forward call shares: the rotary tables of the new positions and
/// how they split into sequences.
pub(crate) struct Positions {
    /// `[n, head_dim / 2]`: one row per new token, at that token's position in its sequence.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Number of new tokens of each sequence, in order (they sum to `n`). One sequence: the
    /// whole batch dimension shares it; several: the batch dimension is 1 and each sequence
    /// attends only to its own past and tokens.
    pub(crate) segments: Vec<usize>,
}

/// What one sequence's new tokens attend to before themselves, in one layer.
pub(crate) enum Past<'a> {
    /// Nothing: the sequence starts here.
    None,
    /// Fixed keys and values `[b, kv_heads, past, head_dim]` (a training prefix, or a cache
    /// that is only read): attended to, not extended.
    Frozen(Tensor, Tensor),
    /// The sequence's cache of this layer: the new keys and values are written into it
    /// (growing its buffers by at least the given number of positions when full).
    Cache(&'a mut LayerKv, usize),
}

/// What one layer adds to its frozen weights: its index (which names the adapter's pairs),
/// the adapter's pairs and scale, and the dense weight copies of a training run.
#[derive(Clone, Copy, Default)]
pub(crate) struct Extras<'a> {
    pub(crate) layer: usize,
    pub(crate) adapter: Option<(&'a BTreeMap<Target, LoraPair>, f64)>,
    pub(crate) dense: Option<&'a BTreeMap<Target, Tensor>>,
}

impl Layer {
    /// Runs layer `extras.layer` on `x` `[b, n, hidden]`: the new tokens of the sequences
    /// `at.segments`, each attending to its own `pasts` entry and to itself (causally).
    /// Returns the layer's output.
    pub(crate) fn forward<O: Ops>(
        &self,
        cfg: &Config,
        x: &Tensor,
        at: &Positions,
        pasts: &mut [Past],
        extras: Extras,
        ops: &O,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (hq, hk, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if pasts.len() != at.segments.len() || at.segments.iter().sum::<usize>() != n {
            candle_core::bail!(
                "{} pasts for segments {:?} of {n} tokens",
                pasts.len(),
                at.segments
            );
        }
        if pasts.len() > 1 && b != 1 {
            candle_core::bail!("several sequences share a forward only with a batch dimension of 1");
        }
        let proj = |t: Target, x: &Tensor| -> Result<Tensor> {
            let dense = extras.dense.and_then(|m| m.get(&t));
            let lora = extras.adapter.and_then(|(m, scale)| {
                m.get(&t).map(|pair| LoraRef {
                    pair,
                    scale,
                    layer: extras.layer,
                    target: t,
                })
            });
            ops.project(self.proj(t), dense, x, lora)
        };

        // Attention.
        let h = ops.rms_norm(x, &self.attn_norm, cfg.rms_eps)?;
        let heads = |t: Target, bias: &Tensor, count: usize| -> Result<Tensor> {
            proj(t, &h)?
                .broadcast_add(bias)?
                .reshape((b, n, count, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = ops.rope(&heads(Target::Q, &self.q_bias, hq)?, &at.cos, &at.sin)?;
        let k = ops.rope(&heads(Target::K, &self.k_bias, hk)?, &at.cos, &at.sin)?;
        let v = heads(Target::V, &self.v_bias, hk)?;
        let single = pasts.len() == 1;
        let mut ys = Vec::with_capacity(pasts.len());
        let mut start = 0;
        for (past, &len) in pasts.iter_mut().zip(&at.segments) {
            let part = |t: &Tensor| match single {
                true => Ok(t.clone()),
                false => t.narrow(2, start, len)?.contiguous(),
            };
            let (q, k, v) = (part(&q)?, part(&k)?, part(&v)?);
            start += len;
            let (k, v) = match past {
                Past::None => (k, v),
                // (A training prefix is broadcast over the batch: the result is laid out anew.)
                Past::Frozen(pk, pv) => (
                    Tensor::cat(&[&*pk, &k], 2)?.contiguous()?,
                    Tensor::cat(&[&*pv, &v], 2)?.contiguous()?,
                ),
                Past::Cache(kv, reserve) => kv.append(&k, &v, *reserve)?,
            };
            // Grouped-query attention: each kv head serves hq/hk query heads.
            let group = hq / hk;
            let t = k.dim(2)?;
            let q = q.reshape((b, hk, group * len, d))?;
            let y = ops
                .attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), t - len, len)? // [b, hk, group*len, d]
                .reshape((b, hq, len, d))?
                .transpose(1, 2)?
                .reshape((b, len, hq * d))?;
            ys.push(y);
        }
        let y = match single {
            true => ys.pop().expect("one segment"),
            false => Tensor::cat(&ys, 1)?,
        };
        let x = (x + proj(Target::O, &y)?)?;

        // MLP.
        let h = ops.rms_norm(&x, &self.ffn_norm, cfg.rms_eps)?;
        let gate = proj(Target::Gate, &h)?.silu()?;
        let up = proj(Target::Up, &h)?;
        &x + proj(Target::Down, &(gate * up)?)?
    }
}
