//! CPU operations with their backward written out, for the training forward.
//!
//! Composed from candle primitives, a layer keeps every intermediate tensor in the gradient
//! graph, and candle's backward computes gradients for both operands of every product —
//! also for frozen weights and for the 2,000 keys and values of the frozen prompt prefix,
//! which are constants. Each operation here keeps only its inputs and output, recomputes
//! what its backward needs, and returns gradients for what is trained or on the path to it.
//! Each is tested against the composed form (`ops.rs` keeps that form for other devices).

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use super::ops::{dense_matmul, dropout_mask, lora_delta};

/// The most bytes of f32 weight a backward pass dequantizes at once on CPU.
pub(crate) const DEQUANT_CHUNK_BYTES: usize = 64 << 20;

/// A contiguous CPU storage as a tensor (a copy).
fn cpu_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous input");
    };
    Tensor::from_slice(&s.as_slice::<f32>()?[a..b], l.shape(), &Device::Cpu)
}

/// A tensor's values as CPU storage (a copy), with its shape.
fn cpu_storage(t: &Tensor) -> Result<(CpuStorage, Shape)> {
    Ok((
        CpuStorage::F32(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?),
        t.shape().clone(),
    ))
}

/// The f32 slice of a contiguous CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous input");
    };
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// Runs `f(row, out_row)` for every row of `out` (`rows × t`), rows split over candle's
/// thread pool.
fn par_rows(out: &mut [f32], t: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / t.max(1);
    let ptr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
        for r in range {
            // SAFETY: each row index is handed to exactly one worker, so the row slices are
            // disjoint, and `out` outlives the pool call.
            let row = unsafe { std::slice::from_raw_parts_mut((ptr as *mut f32).add(r * t), t) };
            f(r, row);
        }
    });
}

/// `x·Wᵀ`: the quantized kernel where candle has a fast one and there are enough rows to pay
/// for it (Q4_K, Q6_K: candle builds a repacked copy of the weight once, ~1.3x its size), else
/// the dense copy (its f16 is converted on the fly: ~20 % slower than the repacked kernel, 4x
/// faster than Q8_0's). The LM head's few rows take the dense copy and spare its repacking.
fn frozen_forward(w: &QMatMul, dense: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
    match (w, dense) {
        (QMatMul::QTensor(q), Some(d)) if !use_quantized(q, x) => dense_matmul(x, d),
        (QMatMul::QTensor(q), _) => x.apply_op1_no_bwd(q.as_ref()),
        (QMatMul::Tensor(d) | QMatMul::TensorF16(d), _) => dense_matmul(x, d),
    }
}

/// Whether `x·Wᵀ` should run on the quantized kernel rather than a dense copy (see
/// [`frozen_forward`]).
fn use_quantized(q: &QTensor, x: &Tensor) -> bool {
    let (Ok((n, k)), Ok(inp)) = (q.shape().dims2(), x.dim(candle_core::D::Minus1)) else {
        return false;
    };
    let rows = x.elem_count() / inp.max(1);
    matches!(
        q.dtype(),
        candle_core::quantized::GgmlDType::Q4K | candle_core::quantized::GgmlDType::Q6K
    ) && k % 256 == 0
        && n % 16 == 0
        && rows >= 64
}

/// `dx = dy·W` for rows `dy` `[rows, out]`: with the dense copy (an f16 one on
/// [`super::f16_weight`]'s kernel where the CPU has it), else with W dequantized for
/// the duration of the call (in bands of rows for a large weight: the LM head) and dropped.
fn frozen_grad(w: &QMatMul, dense: Option<&Tensor>, dy: &Tensor) -> Result<Tensor> {
    let d = match (w, dense) {
        (_, Some(d)) | (QMatMul::Tensor(d) | QMatMul::TensorF16(d), None) => d,
        (QMatMul::QTensor(q), None) => return dequantized_grad(q, dy),
    };
    match d.dtype() {
        DType::F32 => dy.matmul(d),
        dt => match super::f16_weight::rows_times_f16(dy, d)? {
            Some(dx) => Ok(dx),
            None => dy.to_dtype(dt)?.matmul(d)?.to_dtype(DType::F32),
        },
    }
}

fn dequantized_grad(w: &QTensor, g: &Tensor) -> Result<Tensor> {
    let (out, inp) = w.shape().dims2()?;
    let block = w.dtype().block_size();
    if !g.device().is_cpu() || out * inp * 4 <= DEQUANT_CHUNK_BYTES || inp % block != 0 {
        return g.matmul(&w.dequantize(g.device())?);
    }
    let band = (DEQUANT_CHUNK_BYTES / (inp * 4)).max(1);
    let data = w.data()?;
    let row_bytes = inp / block * w.dtype().type_size();
    let mut acc: Option<Tensor> = None;
    for s in (0..out).step_by(band) {
        let len = band.min(out - s);
        let bytes = std::borrow::Cow::Borrowed(&data[s * row_bytes..(s + len) * row_bytes]);
        let storage = QStorage::from_data(bytes, g.device(), w.dtype())?;
        let part = QTensor::new(storage, (len, inp))?.dequantize(g.device())?;
        let part = g.narrow(1, s, len)?.contiguous()?.matmul(&part)?;
        acc = Some(match acc {
            None => part,
            Some(a) => (a + part)?,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("empty weight".into()))
}

/// `x` `[.., in]` as rows `[rows, in]`.
fn rows(x: &Tensor) -> Result<Tensor> {
    let inp = x.dim(candle_core::D::Minus1)?;
    x.contiguous()?.reshape((x.elem_count() / inp.max(1), inp))
}

/// A frozen projection `y = x·Wᵀ` whose backward gives d(input) only (candle's matmul
/// backward would also compute the weight's gradient).
pub(crate) struct FrozenLinear {
    pub(crate) w: QMatMul,
    pub(crate) dense: Option<Tensor>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match &self.w {
            QMatMul::QTensor(q) if self.dense.is_none() => q.cpu_fwd(s, l),
            _ => cpu_storage(&frozen_forward(&self.w, self.dense.as_ref(), &cpu_tensor(s, l)?)?),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match (&self.dense, &self.w) {
            (Some(d), _) => dense_cuda_fwd(d, s, l),
            (None, QMatMul::QTensor(q)) => q.cuda_fwd(s, l),
            _ => candle_core::bail!("frozen-linear on CUDA needs a quantized weight or a dense copy"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = frozen_grad(&self.w, self.dense.as_ref(), &rows(grad)?)?;
        Ok(Some(dx.reshape(arg.shape())?))
    }
}

/// `x·dᵀ` on the GPU with the dense copy `d` `[out, in]` in its own dtype (f16 on tensor
/// cores), `x` converted to it and the result back to `x`'s dtype. The quantized kernel would
/// dequantize the whole weight to f32 on every call: ~0.9 GB at once for the 1.5B's head.
#[cfg(feature = "cuda")]
fn dense_cuda_fwd(
    d: &Tensor,
    s: &candle_core::CudaStorage,
    l: &Layout,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (ds, dl) = d.storage_and_layout();
    let candle_core::Storage::Cuda(dc) = &*ds else {
        candle_core::bail!("frozen-linear: the dense weight copy is not on the GPU");
    };
    let (out, inp) = dl.shape().dims2()?;
    let dims = l.dims();
    if dims.last() != Some(&inp) {
        candle_core::bail!(
            "frozen-linear: input {:?} against a weight of {inp} columns",
            l.shape()
        );
    }
    let rows = l.shape().elem_count() / inp;
    let x = s.to_dtype(l, d.dtype())?;
    let y = x.matmul(
        dc,
        (1, rows, out, inp),
        &Layout::contiguous((rows, inp)),
        &dl.transpose(0, 1)?,
    )?;
    let y = y.to_dtype(&Layout::contiguous((rows, out)), s.dtype())?;
    let mut shape = dims.to_vec();
    shape[dims.len() - 1] = out;
    Ok((y, Shape::from(shape)))
}

/// A frozen projection with its LoRA update, `y = x·Wᵀ + scale·(drop(x)·Aᵀ)·Bᵀ`, as one
/// operation over `(x, A, B)`. It keeps no intermediate: the backward regenerates the
/// dropout mask from its seed and recomputes the rank-r product, and returns d(x), d(A) and
/// d(B) — never the frozen weight's gradient.
pub(crate) struct LoraLinear {
    pub(crate) w: QMatMul,
    pub(crate) dense: Option<Tensor>,
    pub(crate) scale: f64,
    /// `(p, seed)` of the dropout on the LoRA branch's input.
    pub(crate) dropout: Option<(f64, u64)>,
}

impl LoraLinear {
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        match self.dropout {
            Some((p, seed)) if p > 0.0 => dropout_mask(x, p, seed),
            _ => Ok(x.clone()),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (cpu_tensor(s1, l1)?, cpu_tensor(s2, l2)?, cpu_tensor(s3, l3)?);
        let y = frozen_forward(&self.w, self.dense.as_ref(), &x)?;
        cpu_storage(&(y + lora_delta(&self.dropped(&x)?, &a, &b, self.scale)?)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let dy = rows(grad)?; // [rows, out]
        let x2 = rows(&x)?; // [rows, in]
        let xd = self.dropped(&x2)?;
        let du = (dy.matmul(&b)? * self.scale)?; // [rows, r]
        let da = du.t()?.matmul(&xd)?; // [r, in]
        let u = xd.matmul(&a.t()?)?; // [rows, r]
        let db = (dy.t()?.matmul(&u)? * self.scale)?; // [out, r]
        let dxd = du.matmul(&a)?; // [rows, in]
        let dx_lora = match self.dropout {
            // d(drop(x))/dx is the same mask: regenerated from the seed.
            Some((p, seed)) if p > 0.0 => dropout_mask(&dxd.ones_like()?, p, seed)?.mul(&dxd)?,
            _ => dxd,
        };
        let dx = (frozen_grad(&self.w, self.dense.as_ref(), &dy)? + dx_lora)?;
        Ok((Some(dx.reshape(x.shape())?), Some(da), Some(db)))
    }
}

/// RMSNorm `y = x·w / √(mean(x²) + eps)` over the last dimension; the weight is frozen, so
/// the backward gives d(x) only.
pub(crate) struct RmsNorm {
    pub(crate) eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |r, y| {
            let x = &x[r * h..(r + 1) * h];
            let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / h as f32 + self.eps).sqrt();
            for ((o, &v), &wv) in y.iter_mut().zip(x).zip(w) {
                *o = v * inv * wv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &grad.contiguous()?,
            &RmsNormGrad { eps: self.eps },
        )?;
        Ok((Some(dx), None))
    }
}

/// [`RmsNorm`]'s backward: with `g = dy·w` and `r = 1/√(mean(x²) + eps)`,
/// `dx = r·g − x·r³·mean(g·x)`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |r, dx| {
            let (x, dy) = (&x[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h]);
            let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / h as f32 + self.eps).sqrt();
            let gx: f32 = dy
                .iter()
                .zip(w)
                .zip(x)
                .map(|((g, wv), v)| g * wv * v)
                .sum::<f32>()
                / h as f32;
            let c = inv * inv * inv * gx;
            for (((o, &g), &wv), &v) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *o = inv * g * wv - v * c;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// NeoX rotary embedding of `x` `[b, h, n, d]` with `cos`/`sin` `[n, d/2]`. Its backward is
/// the rotation by the opposite angle (`inverse`).
pub(crate) struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let dims = l.dims();
        let (n, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let half = d / 2;
        let cos: Vec<f32> = self.cos.flatten_all()?.to_vec1()?;
        let sin: Vec<f32> = self.sin.flatten_all()?.to_vec1()?;
        if cos.len() != n * half || sin.len() != n * half {
            candle_core::bail!(
                "rope: tables for {} positions, input has {n}",
                cos.len() / half.max(1)
            );
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r, y| {
            let (x, i) = (&x[r * d..(r + 1) * d], r % n);
            for j in 0..half {
                let (c, s) = (cos[i * half + j], sign * sin[i * half + j]);
                let (x1, x2) = (x[j], x[j + half]);
                y[j] = x1 * c - x2 * s;
                y[j + half] = x2 * c + x1 * s;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// Causal softmax of attention scores in one pass: scale, mask, softmax. Query row `r` of
/// each head is new position `r % n`, which sees keys `..=past + r % n`; masked probabilities
/// are exactly 0. Replaces six full-size temporaries of the composed form.
pub(crate) struct MaskedSoftmax {
    scale: f32,
    past: usize,
    n: usize,
}

impl MaskedSoftmax {
    pub(crate) fn new(scale: f64, past: usize, n: usize) -> Self {
        MaskedSoftmax {
            scale: scale as f32,
            past,
            n: n.max(1),
        }
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let dims = l.dims();
        if dims.len() < 2 {
            candle_core::bail!("masked-softmax: scores must be [.., rows, keys]");
        }
        let (t, rows_per_head) = (dims[dims.len() - 1], dims[dims.len() - 2]);
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, t, |r, y| {
            let i = (r % rows_per_head) % self.n;
            let lim = (self.past + i + 1).min(t);
            let src = &x[r * t..r * t + lim];
            let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in y[..lim].iter_mut().zip(src) {
                *o = ((v - max) * self.scale).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            y[..lim].iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// The gradient of [`MaskedSoftmax`]'s input: `dx = scale · y · (dy − Σ dy·y)` per row, from
/// the probabilities `y` and their gradient `dy` (masked entries have `y = 0`, so `dx = 0`).
struct MaskedSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmaxGrad {
    fn name(&self) -> &'static str {
        "masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (slice(s1, l1)?, slice(s2, l2)?);
        let t = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        par_rows(&mut out, t, |r, dx| {
            let (y, dy) = (&y[r * t..(r + 1) * t], &dy[r * t..(r + 1) * t]);
            let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
            for ((o, &yv), &g) in dx.iter_mut().zip(y).zip(dy) {
                *o = self.scale * yv * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Causal grouped-query attention as one operation, for training against a long frozen
/// prefix. The composed form keeps the scores and the probabilities (`[rows, past + n]`
/// each) in the graph, and its matmul backward computes gradients for all keys and values,
/// the prefix's included. This operation keeps only its inputs and output; its backward
/// recomputes the probabilities, and returns d(q), and d(k), d(v) of the `n` new positions
/// (zero for the prefix, a constant).
pub(crate) struct CausalAttention {
    scale: f64,
    past: usize,
    n: usize,
}

impl CausalAttention {
    pub(crate) fn new(scale: f64, past: usize, n: usize) -> Self {
        CausalAttention {
            scale,
            past,
            n: n.max(1),
        }
    }

    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        q.matmul(&k.t()?)?
            .apply_op1_no_bwd(&MaskedSoftmax::new(self.scale, self.past, self.n))
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (cpu_tensor(s1, l1)?, cpu_tensor(s2, l2)?, cpu_tensor(s3, l3)?);
        cpu_storage(&self.probs(&q, &k)?.matmul(&v)?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, d_out) = (q.detach(), k.detach(), v.detach(), d_out.contiguous()?);
        let p = self.probs(&q, &k)?; // [b, hk, rows, t]
        let dp = d_out.matmul(&v.t()?)?.contiguous()?;
        let ds = p.apply_op2_no_bwd(
            &dp,
            &MaskedSoftmaxGrad {
                scale: self.scale as f32,
            },
        )?;
        let dq = ds.matmul(&k)?;
        let new = |x: &Tensor| x.narrow(3, self.past, self.n)?.t()?.contiguous();
        let dk_new = new(&ds)?.matmul(&q)?; // [b, hk, n, d]
        let dv_new = new(&p)?.matmul(&d_out)?;
        let with_prefix = |g: Tensor| -> Result<Tensor> {
            match self.past {
                0 => Ok(g),
                past => g.pad_with_zeros(2, past, 0),
            }
        };
        Ok((Some(dq), Some(with_prefix(dk_new)?), Some(with_prefix(dv_new)?)))
    }
}

/// Dot product in a fixed order (eight lanes, then the lanes summed in order): the same
/// result for a row whatever else is computed with it.
fn dot_fixed(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut s = 0f32;
    for l in lanes {
        s += l;
    }
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The LoRA update `B·A·x·scale` of every row of `x` `[.., in]` (f32, CPU), for `a` `[r, in]`
/// and `b` `[out, r]`, each row computed alone in a fixed order: batch-invariant, unlike a
/// matrix product whose blocking depends on the number of rows, so a ticket decoded in a
/// batch gets the logits it gets alone. Rank r is small, so this costs little.
pub(crate) fn lora_rows(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let inp = x.dim(candle_core::D::Minus1)?;
    let (r, a_in) = a.dims2()?;
    let (out, b_r) = b.dims2()?;
    if a_in != inp || b_r != r {
        candle_core::bail!("LoRA shapes: x [.., {inp}], A [{r}, {a_in}], B [{out}, {b_r}]");
    }
    let rows = x.elem_count() / inp.max(1);
    let xs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let av = a.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    // Bᵀ laid out [r, out], so each rank's column is a contiguous run.
    let bt = b
        .t()?
        .contiguous()?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let mut y = vec![0f32; rows * out];
    par_rows(&mut y, out, |row, dst| {
        let xr = &xs[row * inp..(row + 1) * inp];
        for j in 0..r {
            let h = dot_fixed(xr, &av[j * inp..(j + 1) * inp]) * scale as f32;
            for (d, w) in dst.iter_mut().zip(&bt[j * out..(j + 1) * out]) {
                *d += h * w;
            }
        }
    });
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("a matrix") = out;
    Tensor::from_vec(y, dims, x.device())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::quantized::GgmlDType;
    use candle_core::{Var, D};

    use super::*;
    use crate::qwen2::ops::tests::{fixed, max_rel_diff};
    use crate::qwen2::ops::{masked, Differentiable, Fused, Ops};

    /// A variable of fixed values (`seed`), mean 0.
    fn var(shape: &[usize], std: f32, seed: u64) -> Var {
        Var::from_tensor(&fixed(shape, 0.0, std, seed)).unwrap()
    }

    /// Gradients of `Σ y·probe` with respect to `vars`.
    fn grads(y: &Tensor, probe: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
        let g = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter()
            .map(|v| g.get(v.as_tensor()).unwrap().clone())
            .collect()
    }

    /// d(input) of a weight, through `FrozenLinear` (banded dequantization for one larger than
    /// [`DEQUANT_CHUNK_BYTES`], or a dense f16 copy), equals `dy·W` with W dequantized whole.
    #[test]
    fn frozen_linear_backward_equals_dy_times_w() {
        let dev = Device::Cpu;
        let (out, inp) = (20_000, 1024); // 78 MiB as f32: more than one band
        assert!(out * inp * 4 > DEQUANT_CHUNK_BYTES);
        let vals = crate::lora::uniform_vec(5, out * inp);
        let w = Tensor::from_vec(vals, (out, inp), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let dense_w = q.dequantize(&dev).unwrap();
        let dy = Tensor::from_vec(crate::lora::uniform_vec(6, 2 * out), (2, out), &dev).unwrap();
        let want = dy.matmul(&dense_w).unwrap();
        for (dense, tol) in [(None, 1e-4), (Some(dense_w.to_dtype(DType::F16).unwrap()), 5e-3)] {
            let x = Var::new(&[[0.5f32; 1024], [-0.25f32; 1024]], &dev).unwrap();
            let op = FrozenLinear {
                w: QMatMul::QTensor(q.clone()),
                dense,
            };
            let y = x.as_tensor().apply_op1(op).unwrap();
            let got = &grads(&y, &dy, &[&x])[0];
            let d = max_rel_diff(got, &want);
            assert!(d <= tol, "relative difference {d} > {tol}");
        }
    }

    /// The projection-with-LoRA operation equals the frozen projection plus the composed
    /// LoRA update (dropout on), forward and backward for x, A and B.
    #[test]
    fn lora_linear_equals_composed_projection() {
        let w = fixed((32, 64), 0.0, 0.1, 10);
        let w = QMatMul::QTensor(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()));
        let (x, a, b) = (
            var(&[2, 5, 64], 1.0, 11),
            var(&[4, 64], 0.1, 12),
            var(&[32, 4], 0.1, 13),
        );
        let probe = fixed((2, 5, 32), 0.0, 1.0, 14);
        let (scale, dropout) = (2.0, Some((0.3, 17u64)));
        let fused = x
            .as_tensor()
            .apply_op3(
                a.as_tensor(),
                b.as_tensor(),
                LoraLinear {
                    w: w.clone(),
                    dense: None,
                    scale,
                    dropout,
                },
            )
            .unwrap();
        let base = x.as_tensor().apply_op1(FrozenLinear { w, dense: None }).unwrap();
        let xd = dropout_mask(x.as_tensor(), 0.3, 17).unwrap();
        let composed = (base + lora_delta(&xd, a.as_tensor(), b.as_tensor(), scale).unwrap()).unwrap();
        assert!(max_rel_diff(&fused, &composed) < 1e-5);
        let (gf, gc) = (
            grads(&fused, &probe, &[&x, &a, &b]),
            grads(&composed, &probe, &[&x, &a, &b]),
        );
        for (name, (f, c)) in ["x", "A", "B"].iter().zip(gf.iter().zip(&gc)) {
            let d = max_rel_diff(f, c);
            assert!(d < 1e-4, "d{name} differs by {d}");
        }
    }

    /// RMSNorm and the rotary embedding: forward and d(input) equal the composed primitives.
    #[test]
    fn rms_norm_and_rope_backward_equal_composed_gradients() {
        let dev = Device::Cpu;
        let x = var(&[2, 3, 5, 16], 1.0, 20);
        let w = fixed(16, 1.0, 0.2, 21);
        let probe = fixed((2, 3, 5, 16), 0.0, 1.0, 22);
        let (cos, sin) = crate::qwen2::ops::rope_tables(&crate::qwen2::Config::tiny(), 5, &dev).unwrap();
        let xt = x.as_tensor();
        let norm_fused = xt.apply_op2(&w, RmsNorm { eps: 1e-6 }).unwrap();
        let norm_composed = {
            let r = (xt.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6)
                .unwrap()
                .sqrt()
                .unwrap()
                .recip()
                .unwrap();
            xt.broadcast_mul(&r).unwrap().broadcast_mul(&w).unwrap()
        };
        let rope = |inverse| Rope {
            cos: cos.clone(),
            sin: sin.clone(),
            inverse,
        };
        let rope_fused = xt.apply_op1(rope(false)).unwrap();
        let rope_composed = {
            let (x1, x2) = (xt.narrow(3, 0, 8).unwrap(), xt.narrow(3, 8, 8).unwrap());
            let (c, s) = (
                cos.unsqueeze(0).unwrap().unsqueeze(0).unwrap(),
                sin.unsqueeze(0).unwrap().unsqueeze(0).unwrap(),
            );
            let o1 = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
            let o2 = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
            Tensor::cat(&[&o1, &o2], 3).unwrap()
        };
        for (name, f, c) in [
            ("rms-norm", &norm_fused, &norm_composed),
            ("rope", &rope_fused, &rope_composed),
        ] {
            assert!(max_rel_diff(f, c) < 1e-5, "{name} forward");
            let d = max_rel_diff(&grads(f, &probe, &[&x])[0], &grads(c, &probe, &[&x])[0]);
            assert!(d < 1e-4, "{name}: d(input) differs by {d}");
        }
        // The inverse rotation undoes the rotation.
        let back = rope_fused.apply_op1_no_bwd(&rope(true)).unwrap();
        assert!(max_rel_diff(&back, xt) < 1e-5);
    }

    /// The causal attention operation equals the composed primitives, forward and backward
    /// (d(q), and d(k), d(v) of the new positions; the prefix's are zero), and masked
    /// positions get exactly zero probability.
    #[test]
    fn causal_attention_equals_composed_attention_forward_and_backward() {
        let (b, hk, group, n, past, d) = (2, 2, 3, 4, 5, 8);
        let q = var(&[b, hk, group * n, d], 1.0, 30);
        let k = var(&[b, hk, past + n, d], 1.0, 31);
        let v = var(&[b, hk, past + n, d], 1.0, 32);
        let probe = fixed((b, hk, group * n, d), 0.0, 1.0, 33);
        let scale = 0.35;
        let fused = Differentiable {
            track: true,
            dropout: None,
            composed: false,
        }
        .attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, past, n)
        .unwrap();
        let composed = {
            let m = masked(
                &q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap(),
                scale,
                past,
                n,
            )
            .unwrap();
            let mx = m.max_keepdim(D::Minus1).unwrap().detach();
            let e = m.broadcast_sub(&mx).unwrap().exp().unwrap();
            e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap())
                .unwrap()
                .matmul(v.as_tensor())
                .unwrap()
        };
        assert!(max_rel_diff(&fused, &composed) < 1e-5);
        let inference = Fused
            .attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, past, n)
            .unwrap();
        assert!(max_rel_diff(&inference, &composed) < 1e-5);
        let probs = q
            .as_tensor()
            .matmul(&k.as_tensor().t().unwrap())
            .unwrap()
            .apply_op1_no_bwd(&MaskedSoftmax::new(scale, past, n))
            .unwrap();
        // Row 0 of each group is new position 0: it sees keys 0..=past only.
        let row0: Vec<f32> = probs
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(row0[past + 1..].iter().all(|&p| p == 0.0), "{row0:?}");
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gc) = (grads(&fused), grads(&composed));
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, c) = (gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap());
            // The composed form also gives the prefix keys and values a gradient; the
            // operation leaves them at zero (they are constants in training).
            let c = match name {
                "q" => c.clone(),
                _ => c.narrow(2, past, n).unwrap().pad_with_zeros(2, past, 0).unwrap(),
            };
            let diff = max_rel_diff(a, &c);
            assert!(diff < 1e-4, "d{name} differs by {diff}");
        }
    }
}
