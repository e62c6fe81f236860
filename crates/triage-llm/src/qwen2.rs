//! Qwen2 decoder-only transformer over quantized GGUF weights, with a KV cache.
//!
//! One file, readable top to bottom: [`Config`] from GGUF metadata, the weights
//! ([`Qwen2`]/`Layer`), and [`Qwen2::forward`]. Weights stay in their GGUF quantization
//! (Q4_K, Q6_K, Q8_0 ...); the token embedding is looked up row by row from its quantized
//! form, never dequantized whole. Q5_0 tensors (most of the 0.5B file) are re-quantized to Q8_0
//! at load when [`LoadOptions::requantize_q5_0`] is set: candle's Q5_0 CPU kernel has no SIMD
//! path and is far slower.
//!
//! Architecture (per layer): x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))));
//! x += down(silu(gate(n2(x))) * up(n2(x))), with RMSNorm, grouped-query attention (q, k, v
//! projections with bias), NeoX-style rotary embeddings, and a separate LM head.
//!
//! Training ([`Qwen2::forward_train`]) runs the same architecture with every operation in a
//! differentiable form, because several fused candle kernels silently cut the gradient
//! (`QMatMul`, `candle_nn::ops::{rms_norm, softmax_last_dim}`, `rotary_emb::rope`): the frozen
//! quantized projections go through [`QLinear`], whose backward returns only d(input) by
//! dequantizing the weight for the duration of the call (no dequantized copy is kept: that is
//! what keeps QLoRA small). Both paths take an optional [`Lora`] adapter, applied to the tokens
//! they process; the gradient-check and logits-agreement tests keep the two paths equal.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor, Var, D};

use crate::lora::{Lora, Target};
use crate::{GgufFile, LlmError};

/// Model hyper-parameters, read from `qwen2.*` GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Rows of the embedding / LM head.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Trained context length.
    pub max_position: usize,
}

impl Config {
    /// Reads the configuration of a `qwen2` GGUF.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, LlmError> {
        let bad = |m: String| LlmError::BadGguf {
            path: gguf.path().to_path_buf(),
            message: m,
        };
        let arch = gguf.architecture().unwrap_or("");
        if arch != "qwen2" {
            return Err(bad(format!(
                "architecture `{arch}` is not supported (need qwen2)"
            )));
        }
        let int = |k: &str| {
            gguf.meta_u64(&format!("qwen2.{k}"))
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("missing metadata qwen2.{k}")))
        };
        let float = |k: &str, default: f64| {
            gguf.content()
                .metadata
                .get(&format!("qwen2.{k}"))
                .and_then(|v| v.to_f32().ok())
                .map_or(default, f64::from)
        };
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv")?;
        if num_heads == 0
            || num_kv_heads == 0
            || hidden_size % num_heads != 0
            || num_heads % num_kv_heads != 0
        {
            return Err(bad(format!(
                "inconsistent head counts {num_heads}/{num_kv_heads} for width {hidden_size}"
            )));
        }
        let vocab_size = gguf
            .content()
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| bad("missing tensor token_embd.weight".into()))?;
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            rope_theta: float("rope.freq_base", 1_000_000.0) as f32,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
            max_position: int("context_length").unwrap_or(32768),
        })
    }
}

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

struct Layer {
    attn_norm: Tensor,
    q: QMatMul,
    q_bias: Tensor,
    k: QMatMul,
    k_bias: Tensor,
    v: QMatMul,
    v_bias: Tensor,
    o: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// The model weights. Immutable after load and `Send + Sync`: share one instance between
/// threads; each sequence keeps its own [`KvCache`].
pub struct Qwen2 {
    cfg: Config,
    device: Device,
    embed: QTensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
}

/// Keys and values of the tokens seen so far, per layer. Cloning is cheap (tensors are
/// reference-counted), so a cached prompt prefix can be shared by many sequences.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the cache to a safetensors file, atomically (temporary file, then rename).
    pub fn save(&self, path: &std::path::Path) -> Result<(), LlmError> {
        let mut map = std::collections::HashMap::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let Some((k, v)) = l {
                map.insert(format!("k.{i}"), k.clone());
                map.insert(format!("v.{i}"), v.clone());
            }
        }
        let len = Tensor::new(&[self.len as u32], &Device::Cpu).map_err(err)?;
        map.insert("len".to_string(), len);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let io = |e: std::io::Error| LlmError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        candle_core::safetensors::save(&map, &tmp).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a cache written by [`KvCache::save`]; `None` if the file is missing, unreadable
    /// or not for a model of `cfg`'s shape with `len` positions (then recompute it).
    pub fn load(path: &std::path::Path, cfg: &Config, len: usize, device: &Device) -> Option<Self> {
        let map = candle_core::safetensors::load(path, device).ok()?;
        let stored = map.get("len")?.to_vec1::<u32>().ok()?;
        if stored != [len as u32] {
            return None;
        }
        let want = [1, cfg.num_kv_heads, len, cfg.head_dim];
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let k = map.get(&format!("k.{i}"))?.clone();
            let v = map.get(&format!("v.{i}"))?.clone();
            if k.dims() != want || v.dims() != want || k.dtype() != DType::F32 || v.dtype() != DType::F32 {
                return None;
            }
            layers.push(Some((k, v)));
        }
        Some(Self { layers, len })
    }
}

fn err(e: candle_core::Error) -> LlmError {
    LlmError::Candle(e.to_string())
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
        let dense = |t: QTensor| t.dequantize(device).map_err(err);
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
        let embed = read("token_embd.weight")?;
        // Tied embeddings when the GGUF has no separate head.
        let head_name = match content.tensor_infos.contains_key("output.weight") {
            true => "output.weight",
            false => "token_embd.weight",
        };
        let lm_head = QMatMul::from_qtensor(read(head_name)?).map_err(err)?;
        let (cos, sin) = rope_tables(&cfg, opts.max_seq_len, device).map_err(err)?;
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

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest sequence the rotary tables cover.
    pub fn max_seq_len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
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
        let q8 = |t: Tensor| -> candle_core::Result<QMatMul> {
            Ok(QMatMul::QTensor(Arc::new(QTensor::quantize(&t, dtype)?)))
        };
        let mut build = || -> candle_core::Result<Self> {
            let mut layers = Vec::with_capacity(cfg.num_layers);
            let ones = Tensor::ones(h, DType::F32, device)?;
            for _ in 0..cfg.num_layers {
                let sh = 1.0 / (h as f32).sqrt();
                layers.push(Layer {
                    attn_norm: ones.clone(),
                    q: q8(rand((h, h), sh)?)?,
                    q_bias: rand((1, h), 0.1)?.squeeze(0)?,
                    k: q8(rand((kv, h), sh)?)?,
                    k_bias: rand((1, kv), 0.1)?.squeeze(0)?,
                    v: q8(rand((kv, h), sh)?)?,
                    v_bias: rand((1, kv), 0.1)?.squeeze(0)?,
                    o: q8(rand((h, h), sh)?)?,
                    ffn_norm: ones.clone(),
                    gate: q8(rand((i, h), sh)?)?,
                    up: q8(rand((i, h), sh)?)?,
                    down: q8(rand((h, i), 1.0 / (i as f32).sqrt())?)?,
                });
            }
            let embed = QTensor::quantize(&rand((cfg.vocab_size, h), 1.0)?, GgmlDType::Q8_0)?;
            // Unit-scale rows: with RMS-normalised inputs the logits can reach the peaks a
            // trained head has (a 1/√h scale would cap them near 5 and the loss near ln V − 5).
            let lm_head = q8(rand((cfg.vocab_size, h), 1.0)?)?;
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
        build().map_err(err)
    }

    /// Runs `tokens` (appended after what `cache` holds) and returns the logits of the last
    /// `n_logits` positions, shape `[n_logits, vocab]`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, n_logits: usize) -> Result<Tensor, LlmError> {
        self.forward_with(tokens, cache, n_logits, None)
    }

    /// [`Qwen2::forward`] with a LoRA adapter applied to these tokens (not to what `cache`
    /// already holds). No gradient is recorded.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        n_logits: usize,
        lora: Option<&Lora>,
    ) -> Result<Tensor, LlmError> {
        self.forward_inner(tokens, cache, n_logits, lora).map_err(err)
    }

    /// The differentiable forward used for training: `tokens` `[b, n]` (u32), attending to a
    /// frozen `prefix` (e.g. the shared system prompt, computed without the adapter) and
    /// returning logits `[b, n - logits_from, vocab]` of positions `logits_from..n`. Gradients
    /// flow to the adapter's variables through the frozen quantized weights. `dropout` is
    /// `(p, seed)` for the LoRA branch inputs (deterministic for a seed).
    pub fn forward_train(
        &self,
        tokens: &Tensor,
        prefix: Option<&KvCache>,
        lora: Option<&Lora>,
        logits_from: usize,
        dropout: Option<(f64, u64)>,
    ) -> Result<Tensor, LlmError> {
        self.forward_train_inner(tokens, prefix, lora, logits_from, dropout)
            .map_err(err)
    }

    fn forward_train_inner(
        &self,
        tokens: &Tensor,
        prefix: Option<&KvCache>,
        lora: Option<&Lora>,
        logits_from: usize,
        dropout: Option<(f64, u64)>,
    ) -> candle_core::Result<Tensor> {
        let (b, n) = tokens.dims2()?;
        let ctx = self.train_ctx(b, n, prefix, logits_from)?;
        let mut x = self.embed_tokens(tokens)?;
        for li in 0..self.layers.len() {
            x = self.train_layer(li, &x, &ctx, lora, dropout, true)?;
        }
        let x = x.narrow(1, logits_from, n - logits_from)?;
        self.train_head(&x)
    }

    /// Loss and adapter gradients of one micro-batch with **per-layer recomputation**
    /// (activation checkpointing) and a **chunked LM head**: the forward pass keeps only each
    /// layer's input `[b, n, hidden]`; the backward pass re-runs one layer at a time with
    /// gradient tracking and back-propagates through it alone, so at most one layer's graph
    /// (and one chunk of `head_chunk` positions of logits) is alive at once. Same arguments as
    /// [`Qwen2::forward_train`]; `loss(logits, offset)` maps the logits `[b, c, vocab]` of
    /// positions `logits_from + offset ..` to a scalar, and the total loss is the sum over
    /// chunks. Returns the loss and the gradients of every adapter variable (equal to
    /// back-propagating the whole graph; tested).
    #[allow(clippy::too_many_arguments)] // the forward_train arguments plus the head's two
    pub fn loss_and_grads(
        &self,
        tokens: &Tensor,
        prefix: Option<&KvCache>,
        lora: &Lora,
        logits_from: usize,
        dropout: Option<(f64, u64)>,
        head_chunk: usize,
        loss: &dyn Fn(&Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> Result<(f64, GradStore), LlmError> {
        self.loss_and_grads_inner(
            tokens,
            prefix,
            Some(lora),
            logits_from,
            dropout,
            head_chunk,
            loss,
            true,
        )
        .map_err(err)
    }

    /// The loss of [`Qwen2::loss_and_grads`] without gradients (validation): no graph is
    /// recorded and the head runs chunk by chunk.
    pub fn loss_only(
        &self,
        tokens: &Tensor,
        prefix: Option<&KvCache>,
        lora: Option<&Lora>,
        logits_from: usize,
        head_chunk: usize,
        loss: &dyn Fn(&Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> Result<f64, LlmError> {
        self.loss_and_grads_inner(tokens, prefix, lora, logits_from, None, head_chunk, loss, false)
            .map(|r| r.0)
            .map_err(err)
    }

    #[allow(clippy::too_many_arguments)]
    fn loss_and_grads_inner(
        &self,
        tokens: &Tensor,
        prefix: Option<&KvCache>,
        lora: Option<&Lora>,
        logits_from: usize,
        dropout: Option<(f64, u64)>,
        head_chunk: usize,
        loss: &dyn Fn(&Tensor, usize) -> candle_core::Result<Tensor>,
        want_grads: bool,
    ) -> candle_core::Result<(f64, GradStore)> {
        let (b, n) = tokens.dims2()?;
        let ctx = self.train_ctx(b, n, prefix, logits_from)?;
        // Forward without a graph: keep each layer's input only.
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = self.embed_tokens(tokens)?;
        for li in 0..self.layers.len() {
            let y = self.train_layer(li, &x, &ctx, lora, dropout, false)?;
            inputs.push(x);
            x = y;
        }
        // Head, chunk by chunk: d(loss)/d(last hidden state) for the answer positions.
        let m = n - logits_from;
        let chunk = head_chunk.max(1);
        let mut total = 0.0;
        let mut pieces = Vec::new();
        if logits_from > 0 {
            pieces.push(Tensor::zeros(
                (b, logits_from, self.cfg.hidden_size),
                DType::F32,
                &self.device,
            )?);
        }
        for off in (0..m).step_by(chunk) {
            let len = chunk.min(m - off);
            let x = x.narrow(1, logits_from + off, len)?;
            if !want_grads {
                let l = loss(&self.train_head(&x)?, off)?;
                total += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                continue;
            }
            let h = Var::from_tensor(&x)?;
            let l = loss(&self.train_head(h.as_tensor())?, off)?;
            total += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut g = l.backward()?;
            match g.remove(h.as_tensor()) {
                Some(d) => pieces.push(d),
                None => pieces.push(h.as_tensor().zeros_like()?),
            }
        }
        let mut out = GradStore::default();
        if !want_grads {
            return Ok((total, out));
        }
        let mut grad = Tensor::cat(&pieces, 1)?;
        drop((pieces, x));
        // Backward, one recomputed layer at a time.
        for li in (0..self.layers.len()).rev() {
            let xin = Var::from_tensor(&inputs[li])?;
            let y = self.train_layer(li, xin.as_tensor(), &ctx, lora, dropout, true)?;
            let mut g = (y * &grad)?.sum_all()?.backward()?;
            for p in lora.into_iter().flat_map(|l| l.layers[li].values()) {
                for v in [&p.a, &p.b] {
                    if let Some(d) = g.remove(v.as_tensor()) {
                        out.insert(v.as_tensor(), d);
                    }
                }
            }
            grad = match g.remove(xin.as_tensor()) {
                Some(d) => d,
                None => xin.as_tensor().zeros_like()?,
            };
            inputs.truncate(li);
        }
        Ok((total, out))
    }

    /// Shapes, rotary slices and mask shared by every layer of a training forward.
    fn train_ctx<'a>(
        &self,
        b: usize,
        n: usize,
        prefix: Option<&'a KvCache>,
        logits_from: usize,
    ) -> candle_core::Result<TrainCtx<'a>> {
        let past = prefix.map_or(0, |p| p.len);
        if n == 0 || logits_from >= n || past + n > self.max_seq_len() {
            candle_core::bail!(
                "forward_train: bad lengths (n={n}, logits_from={logits_from}, prefix={past})"
            );
        }
        Ok(TrainCtx {
            b,
            n,
            past,
            prefix,
            cos: self.cos.narrow(0, past, n)?,
            sin: self.sin.narrow(0, past, n)?,
            mask: causal_mask(n, past, &self.device)?,
        })
    }

    /// Token embeddings `[b, n, hidden]` of `tokens` `[b, n]` (frozen: no gradient).
    fn embed_tokens(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n) = tokens.dims2()?;
        self.embed
            .embedding(&tokens.flatten_all()?)?
            .reshape((b, n, self.cfg.hidden_size))
    }

    /// Final norm and LM head of the training path.
    fn train_head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = rms_norm_diff(x, &self.norm, self.cfg.rms_eps)?;
        x.apply_op1(QLinear::new(&self.lm_head)?)
    }

    /// One decoder layer of the training path. With `track` false the adapter's variables are
    /// detached, so no graph is recorded (the checkpointed forward).
    fn train_layer(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &TrainCtx,
        lora: Option<&Lora>,
        dropout: Option<(f64, u64)>,
        track: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, n, layer) = (ctx.b, ctx.n, &self.layers[li]);
        let scale = lora.map_or(0.0, |l| l.scale());
        let lp = |t: Target| {
            lora.and_then(|l| l.layers[li].get(&t)).map(|p| match track {
                true => (p.a.as_tensor().clone(), p.b.as_tensor().clone()),
                false => (p.a.as_tensor().detach(), p.b.as_tensor().detach()),
            })
        };
        let drop_seed = |t: Target| dropout.map(|(p, s)| (p, s ^ ((li as u64) << 8 | t as u64)));
        let proj = |w: &QMatMul, x: &Tensor, t: Target| -> candle_core::Result<Tensor> {
            let y = x.apply_op1(QLinear::new(w)?)?;
            match lp(t) {
                None => Ok(y),
                Some((a, bm)) => {
                    let xin = match drop_seed(t) {
                        Some((p, s)) if p > 0.0 => dropout_mask(x, p, s)?,
                        _ => x.clone(),
                    };
                    y + (xin.broadcast_matmul(&a.t()?)?.broadcast_matmul(&bm.t()?)? * scale)?
                }
            }
        };
        let eps = self.cfg.rms_eps;
        let h = rms_norm_diff(x, &layer.attn_norm, eps)?;
        let (hq, hk, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let q = proj(&layer.q, &h, Target::Q)?.broadcast_add(&layer.q_bias)?;
        let k = proj(&layer.k, &h, Target::K)?.broadcast_add(&layer.k_bias)?;
        let v = proj(&layer.v, &h, Target::V)?.broadcast_add(&layer.v_bias)?;
        let q = q.reshape((b, n, hq, d))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, n, hk, d))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, n, hk, d))?.transpose(1, 2)?.contiguous()?;
        let q = rope_diff(&q, &ctx.cos, &ctx.sin)?;
        let k = rope_diff(&k, &ctx.cos, &ctx.sin)?;
        let (k, v) = match ctx.prefix.and_then(|p| p.layers.get(li).cloned().flatten()) {
            None => (k, v),
            Some((pk, pv)) => {
                let pk = pk.broadcast_as((b, hk, ctx.past, d))?;
                let pv = pv.broadcast_as((b, hk, ctx.past, d))?;
                (
                    Tensor::cat(&[&pk, &k], 2)?.contiguous()?,
                    Tensor::cat(&[&pv, &v], 2)?.contiguous()?,
                )
            }
        };
        let group = hq / hk;
        let t = k.dim(2)?;
        let q = q.reshape((b, hk, group * n, d))?;
        let att = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let att = match &ctx.mask {
            None => att,
            Some(m) => att
                .reshape((b, hk, group, n, t))?
                .broadcast_add(m)?
                .reshape((b, hk, group * n, t))?,
        };
        let att = softmax_diff(&att)?;
        let y = att
            .matmul(&v)?
            .reshape((b, hq, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, hq * d))?;
        let x = (x + proj(&layer.o, &y, Target::O)?)?;
        let h = rms_norm_diff(&x, &layer.ffn_norm, eps)?;
        let gate = proj(&layer.gate, &h, Target::Gate)?.silu()?;
        let up = proj(&layer.up, &h, Target::Up)?;
        x + proj(&layer.down, &(gate * up)?, Target::Down)?
    }

    fn forward_inner(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        n_logits: usize,
        lora: Option<&Lora>,
    ) -> candle_core::Result<Tensor> {
        let n = tokens.len();
        let past = cache.len;
        if n == 0 || n_logits == 0 || n_logits > n {
            candle_core::bail!("forward needs 1..=n tokens of logits (n={n}, n_logits={n_logits})");
        }
        if past + n > self.max_seq_len() {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's budget {}",
                past + n,
                self.max_seq_len()
            );
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.embedding(&ids)?.unsqueeze(0)?; // [1, n, hidden]
        let cos = self.cos.narrow(0, past, n)?;
        let sin = self.sin.narrow(0, past, n)?;
        let mask = causal_mask(n, past, &self.device)?;
        for (li, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let adapter = lora.map(|l| (&l.layers[li], l.scale()));
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.rms_eps as f32)?;
            let h = self.attention(layer, &h, (&cos, &sin), mask.as_ref(), kv, adapter)?;
            x = (x + h)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.cfg.rms_eps as f32)?;
            let gate = apply(&layer.gate, &h, adapter, Target::Gate)?.silu()?;
            let up = apply(&layer.up, &h, adapter, Target::Up)?;
            x = (x + apply(&layer.down, &(gate * up)?, adapter, Target::Down)?)?;
        }
        cache.len += n;
        let x = x.narrow(1, n - n_logits, n_logits)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_eps as f32)?;
        self.lm_head.forward(&x)?.squeeze(0)
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        kv: &mut Option<(Tensor, Tensor)>,
        adapter: Option<Adapter>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (h, hk, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let q = apply(&l.q, x, adapter, Target::Q)?.broadcast_add(&l.q_bias)?;
        let k = apply(&l.k, x, adapter, Target::K)?.broadcast_add(&l.k_bias)?;
        let v = apply(&l.v, x, adapter, Target::V)?.broadcast_add(&l.v_bias)?;
        let q = q.reshape((b, n, h, d))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, n, hk, d))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, n, hk, d))?.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        *kv = Some((k.clone(), v.clone()));
        // Grouped-query attention: each kv head serves h/hk query heads.
        let group = h / hk;
        let t = k.dim(2)?;
        let q = q.reshape((b, hk, group * n, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?; // [b, hk, group*n, t]
        let att = match mask {
            None => att,
            Some(m) => att
                .reshape((b, hk, group, n, t))?
                .broadcast_add(m)?
                .reshape((b, hk, group * n, t))?,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // [b, hk, group*n, d]
        let y = y.reshape((b, h, n, d))?.transpose(1, 2)?.reshape((b, n, h * d))?;
        apply(&l.o, &y, adapter, Target::O)
    }
}

/// What every layer of one training forward shares.
struct TrainCtx<'a> {
    b: usize,
    n: usize,
    past: usize,
    prefix: Option<&'a KvCache>,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

/// One layer's adapter pairs and the LoRA scale.
type Adapter<'a> = (&'a std::collections::BTreeMap<Target, crate::lora::LoraPair>, f64);

/// `w·x`, plus the LoRA update `B·A·x·scale` when the adapter targets this projection
/// (inference: detached from any gradient graph).
fn apply(w: &QMatMul, x: &Tensor, adapter: Option<Adapter>, t: Target) -> candle_core::Result<Tensor> {
    let y = w.forward(x)?;
    match adapter.and_then(|(m, s)| m.get(&t).map(|p| (p, s))) {
        None => Ok(y),
        Some((p, s)) => {
            let a = p.a.as_tensor().detach();
            let b = p.b.as_tensor().detach();
            y + (x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * s)?
        }
    }
}

/// A frozen quantized projection `y = x·Wᵀ` whose backward gives d(input) only:
/// `dx = dy·W`, with W dequantized for the duration of the call and then dropped.
pub struct QLinear {
    w: Arc<QTensor>,
}

impl QLinear {
    /// Wraps a quantized projection (a dense `QMatMul` is not supported).
    pub fn new(w: &QMatMul) -> candle_core::Result<Self> {
        match w {
            QMatMul::QTensor(t) => Ok(QLinear { w: t.clone() }),
            _ => candle_core::bail!("QLinear needs a quantized weight"),
        }
    }
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "qlinear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.w.cpu_fwd(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.w.cuda_fwd(storage, layout)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (out, inp) = self.w.shape().dims2()?;
        let dims = grad_res.dims().to_vec();
        let rows = grad_res.elem_count() / out;
        let g = grad_res.contiguous()?.reshape((rows, out))?;
        let block = self.w.dtype().block_size();
        let dx = if !arg.device().is_cpu() || out * inp * 4 <= DEQUANT_CHUNK_BYTES || inp % block != 0 {
            g.matmul(&self.w.dequantize(arg.device())?)? // [out, in]
        } else {
            // A large weight (the LM head): dequantize a band of rows at a time.
            let band = (DEQUANT_CHUNK_BYTES / (inp * 4)).max(1);
            let data = self.w.data()?;
            let row_bytes = inp / block * self.w.dtype().type_size();
            let mut acc: Option<Tensor> = None;
            for s in (0..out).step_by(band) {
                let len = band.min(out - s);
                let bytes = std::borrow::Cow::Borrowed(&data[s * row_bytes..(s + len) * row_bytes]);
                let storage = QStorage::from_data(bytes, arg.device(), self.w.dtype())?;
                let w = QTensor::new(storage, (len, inp))?.dequantize(arg.device())?;
                let part = g.narrow(1, s, len)?.contiguous()?.matmul(&w)?;
                acc = Some(match acc {
                    None => part,
                    Some(a) => (a + part)?,
                });
            }
            acc.expect("out > 0")
        };
        let mut in_dims = dims;
        *in_dims.last_mut().expect("rank ≥ 2") = inp;
        Ok(Some(dx.reshape(in_dims)?))
    }
}

/// The most bytes of f32 weight [`QLinear`]'s backward dequantizes at once on CPU.
const DEQUANT_CHUNK_BYTES: usize = 64 << 20;

/// RMSNorm from differentiable primitives.
fn rms_norm_diff(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

/// Softmax over the last dimension from differentiable primitives (the max is a constant:
/// softmax does not depend on it).
fn softmax_diff(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// NeoX rotary embedding from differentiable primitives; `x` is `[b, h, n, d]`, `cos`/`sin`
/// are `[n, d/2]`.
fn rope_diff(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(3)? / 2;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let (c, s) = (cos.unsqueeze(0)?.unsqueeze(0)?, sin.unsqueeze(0)?.unsqueeze(0)?);
    let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Tensor::cat(&[&o1, &o2], 3)
}

/// Inverted dropout with a mask drawn from a counter-based generator (same seed, same mask).
fn dropout_mask(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
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

/// A projection weight as a quantized matmul, Q5_0 re-quantized to Q8_0 if asked.
fn to_matmul(t: QTensor, requantize_q5_0: bool, device: &Device) -> Result<QMatMul, LlmError> {
    let t = if requantize_q5_0 && t.dtype() == GgmlDType::Q5_0 {
        QTensor::quantize(&t.dequantize(device).map_err(err)?, GgmlDType::Q8_0).map_err(err)?
    } else {
        t
    };
    QMatMul::from_qtensor(t).map_err(err)
}

/// `[n, past + n]` additive mask: new token i sees the cache and new tokens 0..=i.
fn causal_mask(n: usize, past: usize, device: &Device) -> candle_core::Result<Option<Tensor>> {
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
fn rope_tables(cfg: &Config, max_seq_len: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
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

/// Index of the largest value of a 1-D f32 tensor.
pub fn argmax(logits: &Tensor) -> Result<u32, LlmError> {
    logits
        .argmax(D::Minus1)
        .and_then(|t| t.to_scalar::<u32>())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The banded backward of a weight larger than [`DEQUANT_CHUNK_BYTES`] equals `dy·W` with
    /// the whole weight dequantized.
    #[test]
    fn banded_qlinear_backward_equals_whole_dequantization() {
        let dev = Device::Cpu;
        let (out, inp) = (20_000, 1024); // 78 MiB as f32: more than one band
        assert!(out * inp * 4 > DEQUANT_CHUNK_BYTES);
        let vals = crate::lora::uniform_vec(5, out * inp);
        let w = Tensor::from_vec(vals, (out, inp), &dev).unwrap();
        let q = QMatMul::QTensor(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()));
        let x = Var::new(&[[0.5f32; 1024], [-0.25f32; 1024]], &dev).unwrap();
        let y = x.as_tensor().apply_op1(QLinear::new(&q).unwrap()).unwrap();
        let dy = Tensor::from_vec(crate::lora::uniform_vec(6, 2 * out), (2, out), &dev).unwrap();
        let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let got = g.get(x.as_tensor()).unwrap();
        let dense = match &q {
            QMatMul::QTensor(t) => t.dequantize(&dev).unwrap(),
            _ => unreachable!(),
        };
        let want = dy.matmul(&dense).unwrap();
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-4 * scale, "diff {diff} scale {scale}");
    }
}
