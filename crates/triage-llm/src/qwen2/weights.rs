//! The weights: one decoder [`Layer`]'s tensors, loading them from a GGUF file, random
//! weights for tests, and the dense copies the training backward multiplies by.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::ops::rope_tables;
use super::{Config, Qwen2};
use crate::lora::Target;
use crate::{GgufFile, LlmError};

/// How to load the weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Re-quantize Q5_0 tensors to Q8_0 (faster CPU kernels, ~1.6x their memory).
    pub requantize_q5_0: bool,
    /// Longest sequence (prompt + output) the rotary tables are built for.
    pub max_seq_len: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            requantize_q5_0: true,
            max_seq_len: 8192,
        }
    }
}

/// One decoder layer's weights. Projections stay quantized; norms and biases are f32.
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    pub(crate) q: QMatMul,
    pub(crate) q_bias: Tensor,
    pub(crate) k: QMatMul,
    pub(crate) k_bias: Tensor,
    pub(crate) v: QMatMul,
    pub(crate) v_bias: Tensor,
    pub(crate) o: QMatMul,
    pub(crate) ffn_norm: Tensor,
    pub(crate) gate: QMatMul,
    pub(crate) up: QMatMul,
    pub(crate) down: QMatMul,
}

impl Layer {
    /// The projection `t` (the weights LoRA can target).
    pub(crate) fn proj(&self, t: Target) -> &QMatMul {
        match t {
            Target::Q => &self.q,
            Target::K => &self.k,
            Target::V => &self.v,
            Target::O => &self.o,
            Target::Gate => &self.gate,
            Target::Up => &self.up,
            Target::Down => &self.down,
        }
    }
}

/// Dense (dequantized) copies of frozen weights, for training: the backward pass multiplies
/// by each frozen weight (`dx = dy·W`), and quantized kernels only compute `x·Wᵀ`. Without a
/// copy, a weight is dequantized at every backward call (slow, but no extra memory). Copies
/// also serve the forward pass where the quantized kernel has no fast CPU path (e.g. Q8_0
/// without AVX-512 VNNI). Built by [`Qwen2::dense_weights`]; owned by the trainer, so the
/// inference model stays immutable and small.
pub struct DenseWeights {
    pub(crate) layers: Vec<Option<BTreeMap<Target, Tensor>>>,
    pub(crate) head: Option<Tensor>,
}

impl DenseWeights {
    /// No copies: every backward call dequantizes.
    pub fn none(num_layers: usize) -> Self {
        DenseWeights {
            layers: vec![None; num_layers],
            head: None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let t = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
        self.layers
            .iter()
            .flatten()
            .flat_map(|m| m.values())
            .map(t)
            .sum::<usize>()
            + self.head.as_ref().map_or(0, t)
    }

    pub(crate) fn layer(&self, li: usize) -> Option<&BTreeMap<Target, Tensor>> {
        self.layers.get(li).and_then(Option::as_ref)
    }
}

impl Qwen2 {
    /// Loads the weights of a `qwen2` GGUF onto `device`.
    pub fn load(gguf: &GgufFile, device: &Device, opts: &LoadOptions) -> Result<Self, LlmError> {
        let cfg = Config::from_gguf(gguf)?;
        let file = File::open(gguf.path()).map_err(|e| LlmError::Io {
            path: gguf.path().to_path_buf(),
            source: e,
        })?;
        let mut reader = BufReader::new(file);
        let content = gguf.content();
        let mut read = |name: &str| -> Result<QTensor, LlmError> {
            content
                .tensor(&mut reader, name, device)
                .map_err(|e| LlmError::BadGguf {
                    path: gguf.path().to_path_buf(),
                    message: format!("tensor `{name}`: {e}"),
                })
        };
        let requant = opts.requantize_q5_0;
        let matmul = |t: QTensor| to_matmul(t, requant, device);
        let dense = |t: QTensor| t.dequantize(device).map_err(LlmError::from);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut get = |s: &str| read(&format!("blk.{i}.{s}"));
            layers.push(Layer {
                attn_norm: dense(get("attn_norm.weight")?)?,
                q: matmul(get("attn_q.weight")?)?,
                q_bias: dense(get("attn_q.bias")?)?,
                k: matmul(get("attn_k.weight")?)?,
                k_bias: dense(get("attn_k.bias")?)?,
                v: matmul(get("attn_v.weight")?)?,
                v_bias: dense(get("attn_v.bias")?)?,
                o: matmul(get("attn_output.weight")?)?,
                ffn_norm: dense(get("ffn_norm.weight")?)?,
                gate: matmul(get("ffn_gate.weight")?)?,
                up: matmul(get("ffn_up.weight")?)?,
                down: matmul(get("ffn_down.weight")?)?,
            });
        }
        let norm = dense(read("output_norm.weight")?)?;
        let embed = Arc::new(read("token_embd.weight")?);
        // Tied embeddings when the GGUF has no separate head: one tensor serves both.
        let lm_head = match content.tensor_infos.contains_key("output.weight") {
            true => QMatMul::from_qtensor(read("output.weight")?),
            false => QMatMul::from_arc(embed.clone()),
        }
        .map_err(LlmError::from)?;
        let (cos, sin) = rope_tables(&cfg, opts.max_seq_len, device).map_err(LlmError::from)?;
        Ok(Self {
            cfg,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// A model with random weights (Q8_0 projections) of shape `cfg`, for tests and
    /// benchmarks of code paths that do not need a trained model. Widths must be multiples of
    /// 32 (the Q8_0 block).
    pub fn random(cfg: &Config, seed: u64, device: &Device) -> Result<Self, LlmError> {
        Self::random_with_dtype(cfg, seed, device, GgmlDType::Q8_0)
    }

    /// [`Qwen2::random`] with projections stored as `dtype`; `F32` gives exact arithmetic
    /// (for finite-difference gradient checks: quantized kernels round activations to 8 bits).
    pub fn random_with_dtype(
        cfg: &Config,
        seed: u64,
        device: &Device,
        dtype: GgmlDType,
    ) -> Result<Self, LlmError> {
        let mut n = 0u64;
        let mut rand = |shape: (usize, usize), scale: f32| -> candle_core::Result<Tensor> {
            n += 1;
            let vals =
                crate::lora::uniform_vec(seed.wrapping_mul(1_000_003).wrapping_add(n), shape.0 * shape.1);
            Tensor::from_vec(vals, shape, device)? * scale as f64
        };
        let (h, i, kv) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let quant = |t: Tensor| -> candle_core::Result<QMatMul> {
            QMatMul::from_arc(Arc::new(QTensor::quantize(&t, dtype)?))
        };
        let mut build = || -> candle_core::Result<Self> {
            let mut layers = Vec::with_capacity(cfg.num_layers);
            let ones = Tensor::ones(h, DType::F32, device)?;
            for _ in 0..cfg.num_layers {
                let sh = 1.0 / (h as f32).sqrt();
                layers.push(Layer {
                    attn_norm: ones.clone(),
                    q: quant(rand((h, h), sh)?)?,
                    q_bias: rand((1, h), 0.1)?.squeeze(0)?,
                    k: quant(rand((kv, h), sh)?)?,
                    k_bias: rand((1, kv), 0.1)?.squeeze(0)?,
                    v: quant(rand((kv, h), sh)?)?,
                    v_bias: rand((1, kv), 0.1)?.squeeze(0)?,
                    o: quant(rand((h, h), sh)?)?,
                    ffn_norm: ones.clone(),
                    gate: quant(rand((i, h), sh)?)?,
                    up: quant(rand((i, h), sh)?)?,
                    down: quant(rand((h, i), 1.0 / (i as f32).sqrt())?)?,
                });
            }
            let embed = Arc::new(QTensor::quantize(
                &rand((cfg.vocab_size, h), 1.0)?,
                GgmlDType::Q8_0,
            )?);
            // Unit-scale rows: with RMS-normalised inputs the logits can reach the peaks a
            // trained head has (a 1/√h scale would cap them near 5 and the loss near ln V − 5).
            let lm_head = quant(rand((cfg.vocab_size, h), 1.0)?)?;
            let (cos, sin) = rope_tables(cfg, 4096, device)?;
            Ok(Self {
                cfg: cfg.clone(),
                device: device.clone(),
                embed,
                layers,
                norm: ones,
                lm_head,
                cos,
                sin,
            })
        };
        build().map_err(LlmError::from)
    }

    /// Bytes [`Qwen2::load`] would hold for `gguf` with `opts`, from the file's tensor table
    /// alone (nothing is read): for memory checks before loading.
    pub fn load_bytes(gguf: &GgufFile, opts: &LoadOptions) -> u64 {
        let content = gguf.content();
        let size = |name: &str| -> u64 {
            let Some(info) = content.tensor_infos.get(name) else {
                return 0;
            };
            let dt = match info.ggml_dtype {
                GgmlDType::Q5_0 if opts.requantize_q5_0 && !name.ends_with("norm.weight") => GgmlDType::Q8_0,
                d => d,
            };
            let elems = info.shape.elem_count() as u64;
            // Norms and biases are dequantized to f32 at load.
            if name.ends_with("norm.weight") || name.ends_with(".bias") {
                return elems * 4;
            }
            elems / dt.block_size() as u64 * dt.type_size() as u64
        };
        content.tensor_infos.keys().map(|n| size(n)).sum()
    }

    /// Bytes in `gguf` of the projections of `layers` (and, with `head`, of the LM head) stored
    /// in a type for which candle's fast CPU kernel builds a repacked copy when it multiplies
    /// many rows (Q4_K and Q6_K with widths of whole 256-blocks): what a training forward over
    /// those layers adds to the memory (about 4/3 of these bytes).
    pub fn repackable_bytes(gguf: &GgufFile, layers: Range<usize>, head: bool) -> u64 {
        let content = gguf.content();
        let size = |name: &str| -> u64 {
            let Some(info) = content.tensor_infos.get(name) else {
                return 0;
            };
            let dims = info.shape.dims();
            let fast = matches!(info.ggml_dtype, GgmlDType::Q4K | GgmlDType::Q6K)
                && dims.len() == 2
                && dims[1] % 256 == 0
                && dims[0] % 16 == 0;
            match fast {
                true => {
                    info.shape.elem_count() as u64 / info.ggml_dtype.block_size() as u64
                        * info.ggml_dtype.type_size() as u64
                }
                false => 0,
            }
        };
        let mut total: u64 = layers
            .flat_map(|li| Target::ALL.map(move |t| format!("blk.{li}.{}.weight", t.gguf_name())))
            .map(|n| size(&n))
            .sum();
        if head {
            total += match content.tensor_infos.contains_key("output.weight") {
                true => size("output.weight"),
                false => size("token_embd.weight"),
            };
        }
        total
    }

    /// Bytes of the weights as loaded (quantized projections, embeddings, head, norms).
    pub fn weight_bytes(&self) -> u64 {
        let dense = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let q = |w: &QMatMul| match w {
            QMatMul::QTensor(t) => t.storage_size_in_bytes() as u64,
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => dense(t),
        };
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                Target::ALL.iter().map(|&t| q(l.proj(t))).sum::<u64>()
                    + [&l.attn_norm, &l.q_bias, &l.k_bias, &l.v_bias, &l.ffn_norm]
                        .into_iter()
                        .map(dense)
                        .sum::<u64>()
            })
            .sum();
        let head = match &self.lm_head {
            QMatMul::QTensor(t) if Arc::ptr_eq(t, &self.embed) => 0, // tied: counted once
            w => q(w),
        };
        layers + self.embed.storage_size_in_bytes() as u64 + head + dense(&self.norm)
    }

    /// The type of the dense copies a training run makes on this model's device: f16 on the
    /// CPU, whose kernels keep the activations in f32; bf16 on a GPU, where the activations are
    /// cast to the copy's type for the tensor cores and f16's range overflowed (docs/gpu.md).
    pub fn training_dense_dtype(&self) -> DType {
        match self.device.is_cpu() {
            true => DType::F16,
            false => DType::BF16,
        }
    }

    /// Dense copies (as `dtype`, e.g. F16 to halve their memory) of the projections of
    /// `layers` and, with `head`, of the LM head: what a training run over those layers
    /// multiplies by in its backward pass. See [`DenseWeights`].
    pub fn dense_weights(
        &self,
        layers: Range<usize>,
        head: bool,
        dtype: DType,
    ) -> Result<DenseWeights, LlmError> {
        let mut out = DenseWeights::none(self.layers.len());
        // Dequantized a band of rows at a time, so that a large weight (the head: 151,936
        // rows) never exists whole in f32 when the copy is f16.
        let dense = |w: &QMatMul| -> candle_core::Result<Tensor> {
            let q = match w {
                QMatMul::QTensor(q) => q,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => return t.to_dtype(dtype),
            };
            let (rows, cols) = q.shape().dims2()?;
            let block = q.dtype().block_size();
            let band = (super::kernels::DEQUANT_CHUNK_BYTES / (cols * 4)).max(1);
            if rows <= band || cols % block != 0 || !self.device.is_cpu() {
                return q.dequantize(&self.device)?.to_dtype(dtype);
            }
            let data = q.data()?;
            let row_bytes = cols / block * q.dtype().type_size();
            let mut parts = Vec::with_capacity(rows.div_ceil(band));
            for s in (0..rows).step_by(band) {
                let len = band.min(rows - s);
                let bytes = std::borrow::Cow::Borrowed(&data[s * row_bytes..(s + len) * row_bytes]);
                let storage = candle_core::quantized::QStorage::from_data(bytes, &self.device, q.dtype())?;
                parts.push(
                    QTensor::new(storage, (len, cols))?
                        .dequantize(&self.device)?
                        .to_dtype(dtype)?,
                );
            }
            Tensor::cat(&parts, 0)
        };
        for li in layers {
            let layer = self.layers.get(li).ok_or_else(|| {
                LlmError::Candle(format!(
                    "layer {li} does not exist (the model has {})",
                    self.layers.len()
                ))
            })?;
            let mut m = BTreeMap::new();
            for t in Target::ALL {
                m.insert(t, dense(layer.proj(t)).map_err(LlmError::from)?);
            }
            out.layers[li] = Some(m);
        }
        if head {
            out.head = Some(dense(&self.lm_head).map_err(LlmError::from)?);
        }
        Ok(out)
    }
}

/// A projection weight as a quantized matmul, Q5_0 re-quantized to Q8_0 if asked.
fn to_matmul(t: QTensor, requantize_q5_0: bool, device: &Device) -> Result<QMatMul, LlmError> {
    let t = if requantize_q5_0 && t.dtype() == GgmlDType::Q5_0 {
        QTensor::quantize(&t.dequantize(device).map_err(LlmError::from)?, GgmlDType::Q8_0)
            .map_err(LlmError::from)?
    } else {
        t
    };
    QMatMul::from_qtensor(t).map_err(LlmError::from)
}
