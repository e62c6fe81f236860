//! The `triage train --dry-run` peak-memory estimate. Approximate by construction: it counts
//! the tensors the training graph keeps for the backward pass (f32), not allocator overhead
//! (the benchmark measures both; see `docs/benchmarks.md`).
//! The training benchmark prints it beside the measured peak RSS.

use serde::Serialize;
use triage_llm::lora::LoraConfig;
use triage_llm::qwen2::Config;

/// Inputs of the estimate.
#[derive(Debug, Clone)]
pub struct MemoryInputs {
    /// Model shape.
    pub cfg: Config,
    /// Bytes of the quantized weights (as in the GGUF).
    pub weight_bytes: u64,
    /// Adapter shape.
    pub lora: LoraConfig,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence after the system-prompt prefix.
    pub seq_len: usize,
    /// Tokens of the shared prefix (attended to, not trained).
    pub prefix_len: usize,
    /// Positions whose logits are computed (the answer span).
    pub logit_positions: usize,
    /// Per-layer recomputation: only layer inputs are kept, plus one layer's graph.
    pub checkpointing: bool,
    /// Positions per LM-head chunk (with checkpointing).
    pub head_chunk: usize,
}

/// The estimate, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    /// Quantized base weights.
    pub weights: u64,
    /// Base-model KV cache of the prefix.
    pub prefix_kv: u64,
    /// LoRA parameters, gradients, accumulated gradients and two AdamW moments.
    pub lora_and_optimizer: u64,
    /// Activations kept for the backward pass.
    pub activations: u64,
    /// Logits of the answer span, their softmax and gradient.
    pub logits: u64,
    /// Largest weight dequantized at once during the backward pass.
    pub dequant_transient: u64,
    /// Sum.
    pub total: u64,
}

/// Computes the estimate.
pub fn estimate(i: &MemoryInputs) -> MemoryEstimate {
    let c = &i.cfg;
    let f = 4u64; // f32
    let (h, inter, kv) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        (c.num_kv_heads * c.head_dim) as u64,
    );
    let tokens = (i.batch * i.seq_len) as u64;
    let total_len = (i.prefix_len + i.seq_len) as u64;
    let prefix_kv = c.num_layers as u64 * 2 * kv * i.prefix_len as u64 * f;
    let lora_params: u64 = i
        .lora
        .targets
        .iter()
        .map(|t| {
            let (a, b) = t.dims(c);
            (i.lora.rank * (a + b)) as u64
        })
        .sum::<u64>()
        * c.num_layers as u64;
    let lora_and_optimizer = lora_params * f * 5;
    // Per token and layer: norms and residuals (~14 h), q/k/v and their rotations (~6 kv),
    // the MLP (~7 intermediate), and attention scores, mask, exponentials and probabilities
    // over the whole context (~4 heads × context).
    let per_token_layer = 14 * h + 6 * kv + 7 * inter + 4 * c.num_heads as u64 * total_len;
    let layers = c.num_layers as u64;
    let (activations, head_positions) = match i.checkpointing {
        // Every layer's graph at once.
        false => (tokens * layers * per_token_layer * f, i.logit_positions),
        // Layer inputs, plus one layer's graph and its gradients during the recomputation.
        true => (
            tokens * layers * h * f + 2 * tokens * per_token_layer * f,
            i.logit_positions.min(i.head_chunk.max(1)),
        ),
    };
    let logits = (i.batch * head_positions * c.vocab_size) as u64 * f * 3;
    // The backward of a large weight (the LM head) dequantizes bands of rows on CPU.
    let band = (64u64 << 20).min(c.vocab_size as u64 * h * f);
    let dequant_transient = band.max(inter * h * f);
    let total = i.weight_bytes + prefix_kv + lora_and_optimizer + activations + logits + dequant_transient;
    MemoryEstimate {
        weights: i.weight_bytes,
        prefix_kv,
        lora_and_optimizer,
        activations,
        logits,
        dequant_transient,
        total,
    }
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(f, "estimated peak memory (approximate):")?;
        for (name, v) in [
            ("base weights (quantized)", self.weights),
            ("system-prompt KV cache", self.prefix_kv),
            ("LoRA params + grads + AdamW", self.lora_and_optimizer),
            ("activations for backward", self.activations),
            ("answer logits", self.logits),
            ("largest weight dequantized in backward", self.dequant_transient),
        ] {
            writeln!(f, "  {name:<40} {:>9.1} MiB", mb(v))?;
        }
        write!(f, "  {:<40} {:>9.1} MiB", "total", mb(self.total))
    }
}
