//! Qwen2 decoder-only transformer over quantized GGUF weights, shared by inference and
//! training.
//!
//! * [`config`]: [`Config`], the shape, from GGUF metadata;
//! * [`weights`]: loading ([`Qwen2::load`]), random weights for tests, dense copies for the
//!   training backward ([`DenseWeights`]);
//! * [`cache`]: [`KvCache`], keys and values per sequence;
//! * `ops`: the operations a layer is written in — fused kernels for inference,
//!   differentiable primitives for training — behind one trait;
//! * `layer`: **the** decoder layer forward, written once over those operations;
//! * `kernels`: the training forward's CPU operations with their backward written out, and
//!   `f16_weight`: the backward's product with an f16 dense weight copy;
//! * [`train`]: the training step (loss over chosen positions, per-layer recomputation,
//!   gradients of a LoRA adapter), starting at any layer.
//!
//! Weights stay in their GGUF quantization (Q4_K, Q6_K, Q8_0 ...); the token embedding is
//! looked up row by row from its quantized form, never dequantized whole. Q5_0 tensors (most
//! of the 0.5B file) are re-quantized to Q8_0 at load when [`LoadOptions::requantize_q5_0`]
//! is set: candle's Q5_0 CPU kernel has no SIMD path and is far slower.
//!
//! Architecture: RMSNorm, grouped-query attention (q, k, v projections with bias), NeoX-style
//! rotary embeddings, SwiGLU MLP, a separate or tied LM head.

pub mod cache;
pub mod config;
mod f16_weight;
mod kernels;
mod layer;
mod ops;
pub mod train;
pub mod weights;

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Tensor, D};

pub use cache::KvCache;
pub use config::Config;
pub use train::{Graph, LossSpec, StepOptions, Supervised, TrainInput};
pub use weights::{DenseWeights, LoadOptions};

use crate::lora::Lora;
use crate::LlmError;
use cache::LayerKv;
use layer::{Extras, Past, Positions};
use ops::Fused;
use weights::Layer;

/// One sequence of a batched forward ([`Qwen2::forward_batch`]).
pub struct BatchItem<'a> {
    /// New tokens, after the positions the cache holds.
    pub tokens: &'a [u32],
    /// The sequence's cache, and whether the tokens extend it.
    pub seq: Seq<'a>,
    /// Logits are returned for the last this many tokens.
    pub n_logits: usize,
}

/// How a batched item uses its cache.
pub enum Seq<'a> {
    /// The new tokens are appended to the cache.
    Extend(&'a mut KvCache),
    /// The new tokens are scored after the cache's positions and dropped: several items can
    /// read one cache (the alternatives of a value, each scored in the same pass).
    Peek(&'a KvCache),
}

impl Seq<'_> {
    fn cache(&self) -> &KvCache {
        match self {
            Seq::Extend(c) => c,
            Seq::Peek(c) => c,
        }
    }
}

/// The model weights. Immutable after load and `Send + Sync`: share one instance between
/// threads; each sequence keeps its own [`KvCache`].
pub struct Qwen2 {
    cfg: Config,
    device: Device,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
}

impl Qwen2 {
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
        let mut items = [BatchItem {
            tokens,
            seq: Seq::Extend(cache),
            n_logits,
        }];
        let mut out = self.forward_batch(&mut items, lora)?;
        Ok(out.pop().expect("one item, one result"))
    }

    /// One forward pass over several sequences: every matrix product runs once over all
    /// their new tokens (the weights are read once per pass, not once per sequence), and each
    /// sequence attends only to its own cache and tokens. Returns each item's logits,
    /// `[n_logits, vocab]`, in order: on CPU bit for bit those of running the items one by
    /// one (every row of a product is computed alike: `ops::qmatmul`, `kernels::lora_rows`).
    pub fn forward_batch(
        &self,
        items: &mut [BatchItem],
        lora: Option<&Lora>,
    ) -> Result<Vec<Tensor>, LlmError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let nl = self.layers.len();
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        for (i, it) in items.iter_mut().enumerate() {
            let n = it.tokens.len();
            if n == 0 || it.n_logits == 0 || it.n_logits > n {
                return Err(LlmError::Candle(format!(
                    "item {i}: a forward needs tokens and 1..=n of logits (n={n}, n_logits={})",
                    it.n_logits
                )));
            }
            let cache = it.seq.cache();
            let past = cache.len;
            if past + n > self.max_seq_len() {
                return Err(LlmError::Candle(format!(
                    "item {i}: sequence of {} tokens exceeds the model's budget {}",
                    past + n,
                    self.max_seq_len()
                )));
            }
            if cache.layers.iter().any(|l| l.len() != past) {
                return Err(LlmError::Candle(format!(
                    "item {i}: the cache holds {past} positions in some layers only"
                )));
            }
            if let Seq::Extend(c) = &mut it.seq {
                if c.layers.len() != nl {
                    c.layers = (0..nl).map(|_| LayerKv::default()).collect();
                }
            }
            ids.extend_from_slice(it.tokens);
            pos.extend((past..past + n).map(|p| p as u32));
        }
        let mut run = || -> candle_core::Result<Vec<Tensor>> {
            let total = ids.len();
            let mut x = self
                .embed
                .embedding(&Tensor::new(ids.as_slice(), &self.device)?)?
                .unsqueeze(0)?;
            let at = match items.len() {
                1 => self.positions(pos[0] as usize, total)?,
                _ => {
                    let p = Tensor::new(pos.as_slice(), &self.device)?;
                    Positions {
                        cos: self.cos.index_select(&p, 0)?,
                        sin: self.sin.index_select(&p, 0)?,
                        segments: items.iter().map(|it| it.tokens.len()).collect(),
                    }
                }
            };
            for li in 0..nl {
                let mut pasts = items
                    .iter_mut()
                    .map(|it| match &mut it.seq {
                        Seq::Extend(c) => Ok(Past::Cache(&mut c.layers[li], c.reserve)),
                        Seq::Peek(c) => Ok(match c.layers.get(li).map(|l| l.view()).transpose()?.flatten() {
                            Some((k, v)) => Past::Frozen(k, v),
                            None => Past::None,
                        }),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let extras = Extras {
                    layer: li,
                    adapter: lora.map(|l| (&l.layers[li], l.scale())),
                    dense: None,
                };
                x = self.layers[li].forward(&self.cfg, &x, &at, &mut pasts, extras, &Fused)?;
            }
            // The head, once over every wanted row.
            let mut rows = Vec::new();
            let mut start = 0;
            for it in items.iter() {
                let n = it.tokens.len();
                rows.extend((start + n - it.n_logits..start + n).map(|r| r as u32));
                start += n;
            }
            let x = match rows.len() == total {
                true => x,
                false => x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 1)?,
            };
            let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_eps as f32)?;
            let logits = ops::qmatmul(&self.lm_head, &x)?.squeeze(0)?;
            let mut out = Vec::with_capacity(items.len());
            let mut r = 0;
            for it in items.iter() {
                out.push(logits.narrow(0, r, it.n_logits)?);
                r += it.n_logits;
            }
            Ok(out)
        };
        let out = run().map_err(LlmError::from)?;
        for it in items.iter_mut() {
            if let Seq::Extend(c) = &mut it.seq {
                c.len += it.tokens.len();
            }
        }
        Ok(out)
    }

    /// Runs `x` `[b, n, hidden]` through layer `li` with the inference kernels (or `dense`
    /// copies), after the positions `prefix` holds (attended to, not extended): the frozen
    /// lower layers of a training run, computed once per example.
    pub fn run_layer(
        &self,
        li: usize,
        x: &Tensor,
        prefix: &KvCache,
        dense: Option<&DenseWeights>,
    ) -> Result<Tensor, LlmError> {
        let layer = self.layers.get(li).ok_or_else(|| {
            LlmError::Candle(format!(
                "layer {li} does not exist (the model has {})",
                self.layers.len()
            ))
        })?;
        let run = || -> candle_core::Result<Tensor> {
            let (b, n, _) = x.dims3()?;
            let kv = prefix.layers.get(li).map(|l| l.view()).transpose()?.flatten();
            let past = kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
            if past + n > self.max_seq_len() {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the model's budget {}",
                    past + n,
                    self.max_seq_len()
                );
            }
            let past = match kv {
                None => Past::None,
                Some((k, v)) => {
                    let (_, hk, t, d) = k.dims4()?;
                    Past::Frozen(k.broadcast_as((b, hk, t, d))?, v.broadcast_as((b, hk, t, d))?)
                }
            };
            let extras = Extras {
                layer: li,
                adapter: None,
                dense: dense.and_then(|d| d.layer(li)),
            };
            layer.forward(
                &self.cfg,
                x,
                &self.positions(prefix.len, n)?,
                &mut [past],
                extras,
                &Fused,
            )
        };
        run().map_err(LlmError::from)
    }

    /// The hidden states of `tokens` after the first `layers` layers, `[1, n, hidden]` (the
    /// input of layer `layers`), run after the positions `prefix` holds (not extended).
    pub fn hidden_states(&self, tokens: &[u32], prefix: &KvCache, layers: usize) -> Result<Tensor, LlmError> {
        let ids = Tensor::new(tokens, &self.device).and_then(|t| t.unsqueeze(0))?;
        let mut x = self.embed(&ids)?;
        for li in 0..layers {
            x = self.run_layer(li, &x, prefix, None)?;
        }
        Ok(x)
    }

    /// The KV cache of `tokens` (e.g. the system prompt), computed one layer at a time with a
    /// dense copy of each layer made for the pass and dropped after it: no repacked copy of
    /// the quantized weights stays behind (candle keeps one per weight its fast kernels have
    /// multiplied by many rows), so a training process stays small. Equal to
    /// [`Qwen2::forward`]'s cache up to rounding (the dequantized weights in f32 against the
    /// quantized kernels' 8-bit activations).
    pub fn prefill_layerwise(&self, tokens: &[u32]) -> Result<KvCache, LlmError> {
        let n = tokens.len();
        if n == 0 || n > self.max_seq_len() {
            return Err(LlmError::Candle(format!(
                "a prefill needs 1..={} tokens; got {n}",
                self.max_seq_len()
            )));
        }
        let ids = Tensor::new(tokens, &self.device).map_err(LlmError::from)?;
        let mut x = self.embed(&ids.unsqueeze(0).map_err(LlmError::from)?)?;
        let mut cache = KvCache {
            layers: (0..self.layers.len()).map(|_| LayerKv::default()).collect(),
            ..KvCache::default()
        };
        let at = self.positions(0, n).map_err(LlmError::from)?;
        for li in 0..self.layers.len() {
            let dense = self.dense_weights(li..li + 1, false, candle_core::DType::F32)?;
            let extras = Extras {
                layer: li,
                adapter: None,
                dense: dense.layer(li),
            };
            let mut past = [Past::Cache(&mut cache.layers[li], 0)];
            x = self.layers[li]
                .forward(&self.cfg, &x, &at, &mut past, extras, &Fused)
                .map_err(LlmError::from)?;
        }
        cache.len = n;
        Ok(cache)
    }

    /// Token embeddings `[b, n, hidden]` of `tokens` `[b, n]` (u32): the input of layer 0.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor, LlmError> {
        let run = || -> candle_core::Result<Tensor> {
            let (b, n) = tokens.dims2()?;
            self.embed
                .embedding(&tokens.flatten_all()?)?
                .reshape((b, n, self.cfg.hidden_size))
        };
        run().map_err(LlmError::from)
    }

    /// Rotary tables for `n` new positions after `past`.
    fn positions(&self, past: usize, n: usize) -> candle_core::Result<Positions> {
        Ok(Positions {
            cos: self.cos.narrow(0, past, n)?,
            sin: self.sin.narrow(0, past, n)?,
            segments: vec![n],
        })
    }
}

/// Index of the largest value of a 1-D f32 tensor.
pub fn argmax(logits: &Tensor) -> Result<u32, LlmError> {
    logits
        .argmax(D::Minus1)
        .and_then(|t| t.to_scalar::<u32>())
        .map_err(LlmError::from)
}
