//! [`Config`]: the model's shape, read from `qwen2.*` GGUF metadata.

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
        if hidden_size == 0 {
            return Err(bad("qwen2.embedding_length is 0".into()));
        }
        if num_heads == 0
            || num_kv_heads == 0
            || hidden_size % num_heads != 0
            || num_heads % num_kv_heads != 0
        {
            return Err(bad(format!(
                "inconsistent head counts {num_heads}/{num_kv_heads} for width {hidden_size}"
            )));
        }
        // The metadata sizes allocations: check them against the tensors actually present, so
        // a damaged or hostile header is an error here, not a panic or an abort later.
        let shape = |name: &str| {
            gguf.content()
                .tensor_infos
                .get(name)
                .map(|t| t.shape.dims().to_vec())
        };
        let embd =
            shape("token_embd.weight").ok_or_else(|| bad("missing tensor token_embd.weight".into()))?;
        let vocab_size = match embd[..] {
            [v, w] if v > 0 && w == hidden_size => v,
            _ => {
                return Err(bad(format!(
                    "token_embd.weight has shape {embd:?}, expected [vocabulary, {hidden_size}]"
                )))
            }
        };
        let num_layers = int("block_count")?;
        let present = (0..)
            .take_while(|i| shape(&format!("blk.{i}.attn_norm.weight")).is_some())
            .count();
        if num_layers == 0 || num_layers != present {
            return Err(bad(format!(
                "qwen2.block_count is {num_layers} but the file holds {present} layers"
            )));
        }
        let intermediate_size = int("feed_forward_length")?;
        if intermediate_size == 0 {
            return Err(bad("qwen2.feed_forward_length is 0".into()));
        }
        let up = shape("blk.0.ffn_up.weight");
        if up.as_deref() != Some(&[intermediate_size, hidden_size][..]) {
            return Err(bad(format!(
                "blk.0.ffn_up.weight has shape {up:?}, expected [{intermediate_size}, {hidden_size}] \
                 (qwen2.feed_forward_length, qwen2.embedding_length)"
            )));
        }
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            rope_theta: float("rope.freq_base", 1_000_000.0) as f32,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
            max_position: int("context_length").unwrap_or(32768),
        })
    }
}

impl Config {
    /// A tiny shape (2 layers, width 64, vocabulary 96) for tests of code paths that need a
    /// model but not a trained one; see [`crate::qwen2::Qwen2::random`].
    pub fn tiny() -> Self {
        Config {
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rope_theta: 10_000.0,
            rms_eps: 1e-6,
            max_position: 4096,
        }
    }
}
