//! The `triage train --dry-run` peak-memory estimate: the tensors a training step holds at
//! its peak, plus the process's fixed overhead (tokenizer, grammar, allocator), whose size was
//! measured with `triage bench train` (`docs/benchmarks.md` prints both side by side). It is
//! an estimate: allocator fragmentation varies with the sequence lengths a run sees.

use serde::Serialize;
use triage_llm::lora::LoraConfig;
use triage_llm::qwen2::Config;

/// Inputs of the estimate.
#[derive(Debug, Clone)]
pub struct MemoryInputs {
    /// Model shape.
    pub cfg: Config,
    /// Bytes of the weights as loaded (quantized, after any re-quantization).
    pub weight_bytes: u64,
    /// Adapter shape (its `layers` are the adapted ones).
    pub lora: LoraConfig,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence after the system-prompt prefix.
    pub seq_len: usize,
    /// Tokens of the shared prefix (attended to, not trained).
    pub prefix_len: usize,
    /// Positions scored against the whole vocabulary.
    pub logit_positions: usize,
    /// Per-layer recomputation: only layer inputs are kept, plus one layer's graph.
    pub checkpointing: bool,
    /// Whole-vocabulary positions per LM-head chunk.
    pub head_chunk: usize,
    /// Dense f16 copies of the adapted layers and the head.
    pub dense_weights: bool,
}

/// The estimate, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    /// Base weights as loaded.
    pub weights: u64,
    /// Dense f16 copies of the adapted layers' projections and the LM head.
    pub dense_copies: u64,
    /// Base-model KV cache of the prefix.
    pub prefix_kv: u64,
    /// LoRA parameters, gradients, accumulated gradients and two AdamW moments.
    pub lora_and_optimizer: u64,
    /// Activations kept for the backward pass.
    pub activations: u64,
    /// Logits of one head chunk, their softmax and gradient.
    pub logits: u64,
    /// Largest weight dequantized at once during the backward pass (without dense copies).
    pub dequant_transient: u64,
    /// Tokenizer, grammar, code and allocator slack (measured, see the module docs).
    pub runtime: u64,
    /// Sum.
    pub total: u64,
}

/// Fixed overhead of a training process besides its tensors, measured with `triage bench
/// train` on the reference machine (peak RSS minus the tensors counted here).
const RUNTIME_BYTES: u64 = 400 << 20;

/// Computes the estimate.
pub fn estimate(i: &MemoryInputs) -> MemoryEstimate {
    let c = &i.cfg;
    let f = 4u64; // f32
    let (h, inter, kv, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        (c.num_kv_heads * c.head_dim) as u64,
        c.vocab_size as u64,
    );
    let adapted = (0..c.num_layers).filter(|&l| i.lora.has_layer(l)).count() as u64;
    let tokens = (i.batch * i.seq_len) as u64;
    let total_len = (i.prefix_len + i.seq_len) as u64;
    let prefix_kv = c.num_layers as u64 * 2 * kv * i.prefix_len as u64 * f;
    let per_layer_params = 2 * h * h + 2 * kv * h + 3 * h * inter;
    let dense_copies = match i.dense_weights {
        true => (adapted * per_layer_params + v * h) * 2,
        false => 0,
    };
    let lora_params: u64 = i
        .lora
        .targets
        .iter()
        .map(|t| {
            let (a, b) = t.dims(c);
            (i.lora.rank * (a + b)) as u64
        })
        .sum::<u64>()
        * adapted;
    let lora_and_optimizer = lora_params * f * 5;
    // Per token and layer: norms and residuals (~14 h), q/k/v and their rotations (~6 kv),
    // the MLP (~7 intermediate), f16 copies of matmul inputs with dense weights, and the
    // attention scores, mask, exponentials and probabilities over the whole context
    // (~4 heads × context), plus this layer's copy of the prefix keys and values.
    let f16_inputs = if i.dense_weights { (3 * h + inter) / 2 } else { 0 };
    let per_token_layer = 14 * h + 6 * kv + 7 * inter + f16_inputs + 4 * c.num_heads as u64 * total_len;
    let prefix_copy = 2 * kv * total_len * i.batch as u64 * f;
    let (activations, head_positions) = match i.checkpointing {
        // Every adapted layer's graph at once.
        false => (
            adapted * (tokens * per_token_layer * f + prefix_copy),
            i.logit_positions,
        ),
        // Adapted layers' inputs, plus one layer's graph and its gradients during the
        // recomputation.
        true => (
            adapted * tokens * h * f + 2 * (tokens * per_token_layer * f + prefix_copy),
            i.logit_positions.min(i.head_chunk.max(1)),
        ),
    };
    let logits = (head_positions as u64 * v) * (f * 3 + if i.dense_weights { 2 } else { 0 });
    // Without dense copies the backward dequantizes the head in bands and a layer's largest
    // projection whole.
    let dequant_transient = match i.dense_weights {
        true => 0,
        false => (64u64 << 20).min(v * h * f).max(inter * h * f),
    };
    let runtime = RUNTIME_BYTES;
    let total = i.weight_bytes
        + dense_copies
        + prefix_kv
        + lora_and_optimizer
        + activations
        + logits
        + dequant_transient
        + runtime;
    MemoryEstimate {
        weights: i.weight_bytes,
        dense_copies,
        prefix_kv,
        lora_and_optimizer,
        activations,
        logits,
        dequant_transient,
        runtime,
        total,
    }
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(f, "estimated peak memory:")?;
        for (name, v) in [
            ("base weights (as loaded)", self.weights),
            ("dense f16 copies (adapted layers, head)", self.dense_copies),
            ("system-prompt KV cache", self.prefix_kv),
            ("LoRA params + grads + AdamW", self.lora_and_optimizer),
            ("activations for backward", self.activations),
            ("answer logits", self.logits),
            ("largest weight dequantized in backward", self.dequant_transient),
            ("tokenizer, grammar, allocator", self.runtime),
        ] {
            writeln!(f, "  {name:<42} {:>9.1} MiB", mb(v))?;
        }
        write!(f, "  {:<42} {:>9.1} MiB", "total", mb(self.total))
    }
}
