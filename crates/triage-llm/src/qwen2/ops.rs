//! The operations a decoder layer is written in, in two implementations behind one trait:
//!
//! * [`Fused`] (inference): candle's fused kernels — RMSNorm, rotary embedding, quantized
//!   matmul — and a one-pass causal softmax; none records a gradient;
//! * [`Differentiable`] (training): the same mathematics with gradients. On CPU each
//!   operation is one kernel with its backward written out (`kernels.rs`: frozen projection
//!   with its LoRA update, RMSNorm, rotary embedding, causal attention); on other devices it
//!   is composed from differentiable primitives. Several fused candle kernels have no
//!   backward and would cut the gradient silently (`QMatMul`, `candle_nn::ops::{rms_norm,
//!   softmax_last_dim}`, `rotary_emb::rope`), which is why training cannot reuse them.
//!
//! The LoRA update `B·A·x·(alpha/r)` is [`lora_delta`], used by both.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::kernels::{CausalAttention, FrozenLinear, LoraLinear, MaskedSoftmax, Rope};
use super::Config;
use crate::lora::{LoraPair, Target};

/// The operations of one forward pass (see the module documentation).
pub(crate) trait Ops {
    /// RMSNorm of the last dimension, scaled by `w`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor>;
    /// NeoX rotary embedding; `x` is `[b, h, n, d]`, `cos`/`sin` are `[n, d/2]`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor>;
    /// Causal grouped-query attention `softmax(q·kᵀ·scale + mask)·v` for `q`
    /// `[b, kv_heads, group · n, head_dim]` (query row `g · n + i` is new position `i`, which
    /// sees keys `..=past + i`) and `k`, `v` `[b, kv_heads, past + n, head_dim]`.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        past: usize,
        n: usize,
    ) -> Result<Tensor>;
    /// `x·Wᵀ` for the frozen weight `w` (with its dense copy if the caller has one), plus the
    /// LoRA update when `lora` is given.
    fn project(
        &self,
        w: &QMatMul,
        dense: Option<&Tensor>,
        x: &Tensor,
        lora: Option<LoraRef>,
    ) -> Result<Tensor>;
}

/// The LoRA pair of one projection, its scale, and where it sits (layer and target: the
/// dropout mask's seed depends on both).
#[derive(Clone, Copy)]
pub(crate) struct LoraRef<'a> {
    pub(crate) pair: &'a LoraPair,
    pub(crate) scale: f64,
    pub(crate) layer: usize,
    pub(crate) target: Target,
}

/// `x·Wᵀ` with the quantized kernels, computing each row the same way whatever the number of
/// rows (batch invariance): candle multiplies one row by Q6_K weights with its GEMV kernel
/// and several rows with its tiled kernel, which round differently, so a lone row is padded
/// to two. A ticket decoded in a batch then gets exactly the logits it gets alone (its other
/// kernels, Q4_K tiles and Q8_0 dot products, already treat each row alike).
pub(crate) fn qmatmul(w: &QMatMul, x: &Tensor) -> Result<Tensor> {
    let q6k = matches!(w, QMatMul::QTensor(t) if t.dtype() == candle_core::quantized::GgmlDType::Q6K);
    let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
    if !(q6k && rows == 1) {
        return w.forward(x);
    }
    let dims = x.dims().to_vec();
    let row = x.reshape((1, dims[dims.len() - 1]))?;
    let y = w
        .forward(&Tensor::cat(&[&row, &row.zeros_like()?], 0)?)?
        .narrow(0, 0, 1)?;
    let mut out = dims;
    *out.last_mut().expect("a matrix") = y.dim(1)?;
    y.reshape(out)
}

/// `B·A·x·scale`: the one LoRA update, for `a` `[r, in]` and `b` `[out, r]` (the scale is
/// applied to the rank-r product, the smallest tensor).
pub(crate) fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    (x.broadcast_matmul(&a.t()?)? * scale)?.broadcast_matmul(&b.t()?)
}

/// Inference: fused kernels, adapters detached from any gradient graph.
pub(crate) struct Fused;

impl Ops for Fused {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, w, eps as f32)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(x, cos, sin)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        past: usize,
        n: usize,
    ) -> Result<Tensor> {
        let scores = q.matmul(&k.t()?)?;
        let probs = match scores.device().is_cpu() {
            true => scores.apply_op1_no_bwd(&MaskedSoftmax::new(scale, past, n))?,
            false => candle_nn::ops::softmax_last_dim(&masked(&scores, scale, past, n)?)?,
        };
        probs.matmul(v)
    }

    /// The quantized kernel, or the dense copy when the caller made one (see
    /// [`Qwen2::prefill_layerwise`](super::Qwen2::prefill_layerwise)).
    fn project(
        &self,
        w: &QMatMul,
        dense: Option<&Tensor>,
        x: &Tensor,
        lora: Option<LoraRef>,
    ) -> Result<Tensor> {
        let y = match dense {
            Some(d) => dense_matmul(x, d)?,
            None => qmatmul(w, x)?,
        };
        match lora {
            None => Ok(y),
            // On CPU, row by row in a fixed order: the same update whatever the batch.
            Some(l) if x.device().is_cpu() => {
                y + super::kernels::lora_rows(x, l.pair.a.as_tensor(), l.pair.b.as_tensor(), l.scale)?
            }
            Some(l) => {
                y + lora_delta(
                    x,
                    &l.pair.a.as_tensor().detach(),
                    &l.pair.b.as_tensor().detach(),
                    l.scale,
                )?
            }
        }
    }
}

/// Training: operations with gradients. `track` false detaches the adapter (the forward pass
/// of per-layer recomputation, which records no graph); `dropout` is `(p, seed)` on the LoRA
/// branch input, a deterministic mask per seed, layer and projection; `composed` uses the
/// differentiable primitives on CPU too (the reference the kernels are tested against, and
/// the first release's training path).
pub(crate) struct Differentiable {
    pub(crate) track: bool,
    pub(crate) dropout: Option<(f64, u64)>,
    pub(crate) composed: bool,
}

impl Differentiable {
    /// Whether to run the CPU kernel for a tensor on this device.
    fn kernel(&self, x: &Tensor) -> bool {
        !self.composed && x.device().is_cpu()
    }
}

impl Ops for Differentiable {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        if self.kernel(x) {
            return x
                .contiguous()?
                .apply_op2(w, super::kernels::RmsNorm { eps: eps as f32 });
        }
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(w)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.kernel(x) {
            return x.contiguous()?.apply_op1(Rope {
                cos: cos.clone(),
                sin: sin.clone(),
                inverse: false,
            });
        }
        let half = x.dim(3)? / 2;
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        let (c, s) = (cos.unsqueeze(0)?.unsqueeze(0)?, sin.unsqueeze(0)?.unsqueeze(0)?);
        let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
        let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
        Tensor::cat(&[&o1, &o2], 3)
    }

    /// The max is a constant: softmax does not depend on it.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        past: usize,
        n: usize,
    ) -> Result<Tensor> {
        if self.kernel(q) {
            return q.contiguous()?.apply_op3(
                &k.contiguous()?,
                &v.contiguous()?,
                CausalAttention::new(scale, past, n),
            );
        }
        let x = masked(&q.matmul(&k.t()?)?, scale, past, n)?;
        let m = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&m)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(v)
    }

    fn project(
        &self,
        w: &QMatMul,
        dense: Option<&Tensor>,
        x: &Tensor,
        lora: Option<LoraRef>,
    ) -> Result<Tensor> {
        let (a, b) = match (lora, self.track) {
            (None, _) => (None, None),
            (Some(l), true) => (
                Some(l.pair.a.as_tensor().clone()),
                Some(l.pair.b.as_tensor().clone()),
            ),
            (Some(l), false) => (
                Some(l.pair.a.as_tensor().detach()),
                Some(l.pair.b.as_tensor().detach()),
            ),
        };
        let scale = lora.map_or(0.0, |l| l.scale);
        let dropout = match (self.dropout, lora) {
            (Some((p, seed)), Some(l)) => Some((p, seed ^ ((l.layer as u64) << 8 | l.target as u64))),
            _ => None,
        };
        let x = x.contiguous()?;
        match (a, b) {
            (Some(a), Some(b)) if self.kernel(&x) => x.apply_op3(
                &a,
                &b,
                LoraLinear {
                    w: w.clone(),
                    dense: dense.cloned(),
                    scale,
                    dropout,
                },
            ),
            (a, b) => {
                let y = x.apply_op1(FrozenLinear {
                    w: w.clone(),
                    dense: dense.cloned(),
                })?;
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let xd = match dropout {
                            Some((p, seed)) if p > 0.0 => dropout_mask(&x, p, seed)?,
                            _ => x,
                        };
                        y + lora_delta(&xd, &a, &b, scale)?
                    }
                    _ => Ok(y),
                }
            }
        }
    }
}

/// `scores · scale` with the causal mask added (the composed form of [`MaskedSoftmax`]).
pub(crate) fn masked(scores: &Tensor, scale: f64, past: usize, n: usize) -> Result<Tensor> {
    let x = (scores * scale)?;
    let Some(mask) = causal_mask(n, past, scores.device())? else {
        return Ok(x);
    };
    let (b, hk, rows, t) = x.dims4()?;
    x.reshape((b, hk, rows / n, n, t))?
        .broadcast_add(&mask)?
        .reshape((b, hk, rows, t))
}

/// `x·dᵀ` for a dense weight `d` `[out, in]` (f32, or f16 computed in f16).
pub(crate) fn dense_matmul(x: &Tensor, d: &Tensor) -> Result<Tensor> {
    match d.dtype() {
        DType::F32 => x.broadcast_matmul(&d.t()?),
        dt => x.to_dtype(dt)?.broadcast_matmul(&d.t()?)?.to_dtype(x.dtype()),
    }
}

/// Inverted dropout: `x` times a mask drawn from a counter-based generator (same seed, same
/// mask).
pub(crate) fn dropout_mask(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let keep = 1.0 - p;
    let vals: Vec<f32> = crate::lora::uniform_vec(seed, x.elem_count())
        .into_iter()
        .map(|u| {
            if (u as f64 + 1.0) / 2.0 < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    x * Tensor::from_vec(vals, x.shape(), x.device())?
}

/// `[n, past + n]` additive mask: new token i sees the cache and new tokens 0..=i.
pub(crate) fn causal_mask(n: usize, past: usize, device: &Device) -> Result<Option<Tensor>> {
    if n == 1 {
        return Ok(None);
    }
    let t = past + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (n, t), device)?))
}

/// Cos/sin tables `[max_seq_len, head_dim / 2]` for NeoX-style rotary embeddings.
pub(crate) fn rope_tables(cfg: &Config, max_seq_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, max_seq_len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_seq_len, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tensor of `shape` with values of mean `mean` and standard deviation `std`, fixed by
    /// `seed` (uniformly spread): each run checks the same numbers, unlike `Tensor::randn`.
    pub(crate) fn fixed(shape: impl Into<candle_core::Shape>, mean: f32, std: f32, seed: u64) -> Tensor {
        let shape = shape.into();
        let vals = crate::lora::uniform_vec(seed, shape.elem_count())
            .into_iter()
            .map(|u| mean + std * 3f32.sqrt() * u)
            .collect::<Vec<_>>();
        Tensor::from_vec(vals, shape, &Device::Cpu).unwrap()
    }

    /// max |got − want| / max |want|: the tests' measure of agreement between two paths.
    pub(crate) fn max_rel_diff(got: &Tensor, want: &Tensor) -> f32 {
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        diff / scale
    }

    /// Both implementations compute the same norm and rotation.
    #[test]
    fn differentiable_ops_equal_fused_kernels() {
        let dev = Device::Cpu;
        let x = fixed((1, 4, 6, 16), 0.0, 1.0, 1);
        let w = fixed(16, 1.0, 0.1, 2);
        let (cos, sin) = rope_tables(&Config::tiny(), 6, &dev).unwrap();
        let d = Differentiable {
            track: false,
            dropout: None,
            composed: false,
        };
        let pairs = [
            (
                Fused.rms_norm(&x, &w, 1e-6).unwrap(),
                d.rms_norm(&x, &w, 1e-6).unwrap(),
            ),
            (
                Fused.rope(&x, &cos, &sin).unwrap(),
                d.rope(&x, &cos, &sin).unwrap(),
            ),
        ];
        for (i, (a, b)) in pairs.iter().enumerate() {
            assert!(max_rel_diff(b, a) < 1e-5, "op {i}");
        }
    }
}
