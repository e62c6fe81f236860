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

use super::ops::{LoraRef, Ops};
use super::weights::Layer;
use super::Config;
use crate::lora::{LoraPair, Target};

/// What every layer of one forward call shares: the rotary tables of the new positions.
pub(crate) struct Positions {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
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
    /// Runs layer `extras.layer` on `x` `[b, n, hidden]` attending to `past` keys and values
    /// `[b, kv_heads, past, head_dim]` (the cache, or a frozen prefix) and to itself. Returns
    /// the layer's output and the keys and values of past and new positions together.
    pub(crate) fn forward<O: Ops>(
        &self,
        cfg: &Config,
        x: &Tensor,
        at: &Positions,
        past: Option<(&Tensor, &Tensor)>,
        extras: Extras,
        ops: &O,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, n, _) = x.dims3()?;
        let (hq, hk, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
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
        let (k, v) = match past {
            None => (k, v),
            // (A training prefix is broadcast over the batch: the result must be laid out anew.)
            Some((pk, pv)) => (
                Tensor::cat(&[pk, &k], 2)?.contiguous()?,
                Tensor::cat(&[pv, &v], 2)?.contiguous()?,
            ),
        };
        // Grouped-query attention: each kv head serves hq/hk query heads.
        let group = hq / hk;
        let t = k.dim(2)?;
        let q = q.reshape((b, hk, group * n, d))?;
        let y = ops
            .attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), t - n, n)? // [b, hk, group*n, d]
            .reshape((b, hq, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, hq * d))?;
        let x = (x + proj(Target::O, &y)?)?;

        // MLP.
        let h = ops.rms_norm(&x, &self.ffn_norm, cfg.rms_eps)?;
        let gate = proj(Target::Gate, &h)?.silu()?;
        let up = proj(Target::Up, &h)?;
        let x = (&x + proj(Target::Down, &(gate * up)?)?)?;
        Ok((x, (k, v)))
    }
}
