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
mod kernels;
mod layer;
mod ops;
pub mod train;
pub mod weights;

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor, D};

pub use cache::KvCache;
pub use config::Config;
pub use train::{Graph, LossSpec, StepOptions, Supervised, TrainInput};
pub use weights::{DenseWeights, LoadOptions};

use crate::lora::Lora;
use crate::LlmError;
use layer::{Extras, Positions};
use ops::Fused;
use weights::Layer;

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
        let n = tokens.len();
        if n_logits == 0 || n_logits > n {
            return Err(LlmError::Candle(format!(
                "forward needs 1..=n tokens of logits (n={n}, n_logits={n_logits})"
            )));
        }
        let x = self.hidden_states(tokens, cache, 0..self.layers.len(), lora, None)?;
        let run = || -> candle_core::Result<Tensor> {
            let x = x.narrow(1, n - n_logits, n_logits)?;
            let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_eps as f32)?;
            self.lm_head.forward(&x)?.squeeze(0)
        };
        run().map_err(LlmError::from)
    }

    /// Runs `tokens` through `layers` only (with the fused inference kernels) and returns
    /// the hidden states after the last of them, `[1, n, hidden]`: the input of layer
    /// `layers.end`. `cache` must hold the positions before `tokens`. With all layers, the
    /// cache advances by `n` (as [`Qwen2::forward`]); with some, only those layers' keys
    /// and values grow, so pass a clone to drop afterwards. Training uses this for the
    /// frozen lower layers, whose output does not change while the layers above train; `dense`
    /// copies of layers are used instead of their quantized kernels.
    pub fn hidden_states(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        layers: Range<usize>,
        lora: Option<&Lora>,
        dense: Option<&DenseWeights>,
    ) -> Result<Tensor, LlmError> {
        let n = tokens.len();
        let past = cache.len;
        if n == 0 {
            return Err(LlmError::Candle("forward needs at least one token".into()));
        }
        if past + n > self.max_seq_len() {
            return Err(LlmError::Candle(format!(
                "sequence of {} tokens exceeds the model's budget {}",
                past + n,
                self.max_seq_len()
            )));
        }
        if layers.end > self.layers.len() || layers.start > layers.end {
            return Err(LlmError::Candle(format!(
                "layers {layers:?} out of range (the model has {})",
                self.layers.len()
            )));
        }
        let mut run = || -> candle_core::Result<Tensor> {
            if cache.layers.len() != self.layers.len() {
                cache.layers = vec![None; self.layers.len()];
            }
            let ids = Tensor::new(tokens, &self.device)?;
            let mut x = self.embed.embedding(&ids)?.unsqueeze(0)?; // [1, n, hidden]
            let at = self.positions(past, n)?;
            for li in layers.clone() {
                let kv = &mut cache.layers[li];
                let extras = Extras {
                    layer: li,
                    adapter: lora.map(|l| (&l.layers[li], l.scale())),
                    dense: dense.and_then(|d| d.layer(li)),
                };
                let past = kv.as_ref().map(|(k, v)| (k, v));
                let (y, new_kv) = self.layers[li].forward(&self.cfg, &x, &at, past, extras, &Fused)?;
                *kv = Some(new_kv);
                x = y;
            }
            Ok(x)
        };
        let x = run().map_err(LlmError::from)?;
        if layers == (0..self.layers.len()) {
            cache.len += n;
        }
        Ok(x)
    }

    /// Runs `x` `[b, n, hidden]` through layer `li` with the inference kernels (or `dense`
    /// copies), attending to and appending to `cache`'s keys and values of that layer.
    pub fn run_layer(
        &self,
        li: usize,
        x: &Tensor,
        cache: &mut KvCache,
        dense: Option<&DenseWeights>,
    ) -> Result<Tensor, LlmError> {
        let layer = self.layers.get(li).ok_or_else(|| {
            LlmError::Candle(format!(
                "layer {li} does not exist (the model has {})",
                self.layers.len()
            ))
        })?;
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let mut run = || -> candle_core::Result<Tensor> {
            let kv = &mut cache.layers[li];
            let past = match kv {
                Some((k, _)) => k.dim(2)?,
                None => 0,
            };
            let n = x.dim(1)?;
            if past + n > self.max_seq_len() {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the model's budget {}",
                    past + n,
                    self.max_seq_len()
                );
            }
            let extras = Extras {
                layer: li,
                adapter: None,
                dense: dense.and_then(|d| d.layer(li)),
            };
            let prev = kv.as_ref().map(|(k, v)| (k, v));
            let (y, new_kv) = layer.forward(&self.cfg, x, &self.positions(past, n)?, prev, extras, &Fused)?;
            *kv = Some(new_kv);
            Ok(y)
        };
        run().map_err(LlmError::from)
    }

    /// The KV cache of `tokens` (e.g. the system prompt), computed one layer at a time with a
    /// dense copy of each layer made for the pass and dropped after it: no repacked copy of
    /// the quantized weights stays behind (candle keeps one per weight its fast kernels have
    /// multiplied by many rows), so a training process stays small. Equal to
    /// [`Qwen2::forward`]'s cache up to rounding (the dequantized weights in f32 against the
    /// quantized kernels' 8-bit activations).
    pub fn prefill_layerwise(&self, tokens: &[u32]) -> Result<KvCache, LlmError> {
        let ids = Tensor::new(tokens, &self.device).map_err(LlmError::from)?;
        let mut x = self.embed(&ids.unsqueeze(0).map_err(LlmError::from)?)?;
        let mut cache = KvCache::default();
        for li in 0..self.layers.len() {
            let dense = self.dense_weights(li..li + 1, false, candle_core::DType::F32)?;
            x = self.run_layer(li, &x, &mut cache, Some(&dense))?;
        }
        cache.len = tokens.len();
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
