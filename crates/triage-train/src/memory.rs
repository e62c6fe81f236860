//! The `triage train --dry-run` peak-memory estimate: the weights and copies a training
//! process holds, plus the activations and gradients of its largest moment, plus the process's
//! fixed overhead (tokenizer, grammar, allocator). The per-token terms were calibrated against
//! `triage bench train` (`docs/benchmarks.md` prints the estimate beside each measured peak);
//! it is an estimate: allocator fragmentation varies with the lengths a run sees.

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
    /// Bytes of the adapted layers' projections stored in a type with a fast repacked CPU
    /// kernel (Q4_K, Q6_K): the forward pass runs on it, and candle keeps a repacked copy.
    pub repackable_bytes: u64,
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
    /// The composed differentiable primitives instead of the CPU training kernels.
    pub composed_ops: bool,
}

/// The estimate, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    /// Base weights as loaded.
    pub weights: u64,
    /// Candle's repacked copies of the adapted layers' fast-kernel weights.
    pub repacked: u64,
    /// Dense f16 copies of the adapted layers' projections and the LM head.
    pub dense_copies: u64,
    /// Base-model KV cache of the prefix.
    pub prefix_kv: u64,
    /// LoRA parameters, gradients, accumulated gradients and two AdamW moments.
    pub lora_and_optimizer: u64,
    /// Activations kept for the backward pass, and one layer's gradients.
    pub activations: u64,
    /// Logits of one head chunk, their softmax and gradient.
    pub logits: u64,
    /// Largest weight dequantized at once during the backward pass (without dense copies).
    pub dequant_transient: u64,
    /// Tokenizer, grammar, code and allocator slack (measured); on a GPU, what the CUDA
    /// context, libraries and memory pool add (measured, see [`MemoryEstimate::on_gpu`]).
    pub runtime: u64,
    /// Sum.
    pub total: u64,
    /// An estimate of GPU memory ([`MemoryEstimate::on_gpu`]).
    pub gpu: bool,
}

/// Fixed overhead of a training process besides its tensors: the tokenizer and its 151,936
/// entries, the compiled grammar, code, thread stacks and allocator slack. Measured with
/// `triage bench train` on the reference machine (resident memory after loading, minus the
/// weights and the prompt cache).
const RUNTIME_BYTES: u64 = 330 << 20;

/// What a GPU training process holds beyond the tensors counted here: the CUDA context,
/// cuBLAS/cuBLASLt handles and workspaces, loaded kernels and the stream-ordered memory pool.
/// Measured on an H200 (CUDA 13.0 driver; docs/gpu.md) as the peak of `triage train --device
/// cuda` minus the estimate's tensors, 2,354 MiB (configs/train.toml) and 2,258 MiB
/// (the same with `--checkpointing`) on the 1.5B: fitted on those two runs, not checked on others.
const GPU_RUNTIME_BYTES: u64 = 2300 << 20;

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
    let heads = c.num_heads as u64;
    let adapted = (0..c.num_layers).filter(|&l| i.lora.has_layer(l)).count() as u64;
    let first = (0..c.num_layers)
        .find(|&l| i.lora.has_layer(l))
        .unwrap_or(c.num_layers) as u64;
    // Layers whose forward runs with a graph: from the first adapted one to the top.
    let graphed = c.num_layers as u64 - first;
    let tokens = (i.batch * i.seq_len) as u64;
    let context = (i.prefix_len + i.seq_len) as u64;
    let prefix_kv = c.num_layers as u64 * 2 * kv * i.prefix_len as u64 * f;
    let per_layer_params = 2 * h * h + 2 * kv * h + 3 * h * inter;
    let dense_copies = match i.dense_weights {
        true => (adapted * per_layer_params + v * h) * 2,
        false => 0,
    };
    // Candle's repacked tiles take ~1.33x a Q4_K weight (1.5x for Q6_K).
    let repacked = i.repackable_bytes * 4 / 3;
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
    // One layer's graph per token (f32 values): with the training kernels, each operation
    // keeps its inputs and output only (norms, projections, rotations, attention output,
    // residuals: ~11 hidden widths, ~8 kv widths, 4 MLP widths); composed primitives also keep
    // the attention scores and probabilities over the whole context, the LoRA branches' full
    // outputs and the norms' intermediates.
    let per_token = match i.composed_ops {
        false => 11 * h + 8 * kv + 4 * inter,
        true => 20 * h + 8 * kv + 9 * inter + 4 * heads * context,
    };
    // This layer's copy of the prefix keys and values, broadcast to the batch.
    let prefix_copy = 2 * kv * context * i.batch as u64 * f;
    let layer_graph = tokens * per_token * f + prefix_copy;
    // The backward pass of one layer: its gradients (about its graph again) and, with the
    // attention kernel, the recomputed probabilities and their gradient.
    let layer_backward = layer_graph + 2 * heads * tokens * context * f;
    let activations = match i.checkpointing {
        // Each graphed layer's input, plus one layer's graph and its backward.
        true => graphed * tokens * h * f + layer_graph + layer_backward,
        // Every adapted layer's graph, plus one layer's backward.
        false => graphed * layer_graph + layer_backward,
    };
    let head_positions = i.logit_positions.min(i.head_chunk.max(1)) as u64;
    let logits = head_positions * v * (f * 3 + if i.dense_weights { 2 } else { 0 });
    // Without dense copies the backward dequantizes the head in bands and a layer's largest
    // projection whole.
    let dequant_transient = match i.dense_weights {
        true => 0,
        false => (64u64 << 20).min(v * h * f).max(inter * h * f),
    };
    let runtime = RUNTIME_BYTES;
    let total = i.weight_bytes
        + repacked
        + dense_copies
        + prefix_kv
        + lora_and_optimizer
        + activations
        + logits
        + dequant_transient
        + runtime;
    MemoryEstimate {
        weights: i.weight_bytes,
        repacked,
        dense_copies,
        prefix_kv,
        lora_and_optimizer,
        activations,
        logits,
        dequant_transient,
        runtime,
        total,
        gpu: false,
    }
}

impl MemoryEstimate {
    /// The estimate of a process training on a GPU: its tensors, and the measured overhead of
    /// CUDA in place of the CPU process's tokenizer and allocator slack (those are host memory).
    pub fn on_gpu(self) -> Self {
        MemoryEstimate {
            total: self.total - self.runtime + GPU_RUNTIME_BYTES,
            runtime: GPU_RUNTIME_BYTES,
            gpu: true,
            ..self
        }
    }
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        match self.gpu {
            true => writeln!(f, "estimated peak GPU memory:")?,
            false => writeln!(f, "estimated peak memory:")?,
        }
        for (name, v) in [
            ("base weights (as loaded)", self.weights),
            ("repacked copies (fast CPU kernels)", self.repacked),
            ("dense copies (adapted layers, head)", self.dense_copies),
            ("system-prompt KV cache", self.prefix_kv),
            ("LoRA params + grads + AdamW", self.lora_and_optimizer),
            ("activations and one layer's gradients", self.activations),
            ("answer logits", self.logits),
            ("largest weight dequantized in backward", self.dequant_transient),
            (
                match self.gpu {
                    true => "CUDA context, libraries, pool (measured)",
                    false => "tokenizer, grammar, allocator",
                },
                self.runtime,
            ),
        ] {
            writeln!(f, "  {name:<42} {:>9.1} MiB", mb(v))?;
        }
        write!(f, "  {:<42} {:>9.1} MiB", "total", mb(self.total))
    }
}
