//! LoRA adapters for [`crate::qwen2::Qwen2`]: per layer and targeted projection, a low-rank
//! update `ΔW·x = B·A·x·(alpha/r)` beside the frozen quantized weight. A starts small and
//! random (PEFT's Kaiming-uniform bound `1/√in`), B starts at zero, so a fresh adapter changes
//! nothing. Stored in the Hugging Face PEFT format: `adapter_model.safetensors` with tensors
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
//! `...lora_B.weight` (`[out, r]`), and `adapter_config.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::qwen2::Config;
use crate::LlmError;

/// A projection LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Target {
    /// All targets, in layer order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The PEFT / Hugging Face module name (`q_proj`, ...).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The projection's weight in a GGUF file, `blk.{layer}.<name>.weight`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    fn module(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    /// `(in, out)` features of the projection.
    pub fn dims(self, cfg: &Config) -> (usize, usize) {
        let kv = cfg.num_kv_heads * cfg.head_dim;
        match self {
            Target::Q | Target::O => (cfg.hidden_size, cfg.hidden_size),
            Target::K | Target::V => (cfg.hidden_size, kv),
            Target::Gate | Target::Up => (cfg.hidden_size, cfg.intermediate_size),
            Target::Down => (cfg.intermediate_size, cfg.hidden_size),
        }
    }
}

impl FromStr for Target {
    type Err = LoraError;
    fn from_str(s: &str) -> Result<Self, LoraError> {
        Target::ALL
            .into_iter()
            .find(|t| s == t.peft_name() || s == t.peft_name().trim_end_matches("_proj"))
            .ok_or_else(|| LoraError::UnknownTarget { name: s.to_owned() })
    }
}

/// A LoRA setting or adapter file that does not fit the model, naming the tensor or setting
/// and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoraError {
    /// A target name that is not a projection.
    #[error("unknown LoRA target {name:?}: use q, k, v, o, gate, up, down (or their PEFT names q_proj, …)")]
    UnknownTarget {
        /// The name given.
        name: String,
    },
    /// Rank 0 or no target.
    #[error("LoRA needs rank ≥ 1 and at least one target (got rank {rank} and {targets} targets): set `rank` and `targets`")]
    Empty {
        /// The rank given.
        rank: usize,
        /// How many targets were given.
        targets: usize,
    },
    /// `layers` given but empty.
    #[error("LoRA layers list is empty: list the layer numbers, or leave it out to adapt every layer")]
    NoLayers,
    /// A layer beyond the model's.
    #[error("LoRA layer {layer} does not exist (the model has {layers} layers): the adapter was made for a larger model, or `layers` is wrong")]
    NoSuchLayer {
        /// The layer asked for.
        layer: usize,
        /// The model's layer count.
        layers: usize,
    },
    /// An expected tensor is absent from the weights.
    #[error("missing tensor {key}: the weights do not match the adapter's configuration (targets, layers); was the adapter written for another model?")]
    MissingTensor {
        /// The PEFT tensor name.
        key: String,
    },
    /// A tensor of the wrong shape.
    #[error("{key} has shape {got:?}, expected {expected:?}: the adapter was trained for another model size or rank")]
    Shape {
        /// The PEFT tensor name.
        key: String,
        /// Its shape.
        got: Vec<usize>,
        /// The shape the model and rank need.
        expected: [usize; 2],
    },
    /// NaN or infinity in a tensor.
    #[error("{key} contains NaN or infinite values: the training diverged; use an earlier checkpoint or a lower learning rate")]
    NotFinite {
        /// The PEFT tensor name.
        key: String,
    },
    /// More tensors than the configuration describes.
    #[error("{got} tensors, expected {expected} for this configuration: the weights hold tensors the adapter's configuration does not describe")]
    TensorCount {
        /// Tensors in the file.
        got: usize,
        /// Tensors the configuration implies.
        expected: usize,
    },
}

/// Shape and scaling of an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the LoRA branch input during training.
    pub dropout: f64,
    /// Targeted projections.
    pub targets: Vec<Target>,
    /// Layers that carry the adapter (PEFT `layers_to_transform`); `None`: every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
}

impl LoraConfig {
    /// Whether layer `i` carries the adapter.
    pub fn has_layer(&self, i: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&i))
    }
}

/// The A and B matrices of one projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
}

/// An adapter: one [`LoraPair`] per layer and target, trainable (`Var`s).
#[derive(Debug, Clone)]
pub struct Lora {
    /// Its configuration.
    pub config: LoraConfig,
    /// `layers[i][target]`.
    pub layers: Vec<BTreeMap<Target, LoraPair>>,
}

/// Checks that the adapter's layers exist in a model of shape `cfg`.
fn check_layers(cfg: &Config, config: &LoraConfig) -> Result<(), LoraError> {
    match &config.layers {
        Some(l) if l.is_empty() => Err(LoraError::NoLayers),
        Some(l) => match l.iter().find(|&&i| i >= cfg.num_layers) {
            Some(&layer) => Err(LoraError::NoSuchLayer {
                layer,
                layers: cfg.num_layers,
            }),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

/// Counter-based uniform numbers in [-1, 1), so an initialisation depends only on the seed
/// (also what tests fill their tensors with, so every run checks the same numbers).
pub fn uniform_vec(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = seed
                .wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

impl Lora {
    /// A fresh adapter for a model of shape `cfg`: A ~ U(-1/√in, 1/√in), B = 0.
    pub fn new(cfg: &Config, config: LoraConfig, seed: u64, device: &Device) -> Result<Self, LlmError> {
        if config.rank == 0 || config.targets.is_empty() {
            return Err(LoraError::Empty {
                rank: config.rank,
                targets: config.targets.len(),
            }
            .into());
        }
        check_layers(cfg, &config)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut m = BTreeMap::new();
            if !config.has_layer(i) {
                layers.push(m);
                continue;
            }
            for (j, &t) in config.targets.iter().enumerate() {
                let (inp, out) = t.dims(cfg);
                let bound = 1.0 / (inp as f32).sqrt();
                let vals: Vec<f32> = uniform_vec(seed ^ ((i as u64) << 32 | j as u64), config.rank * inp)
                    .into_iter()
                    .map(|u| u * bound)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(vals, (config.rank, inp), device)?)?;
                let b = Var::zeros((out, config.rank), DType::F32, device)?;
                m.insert(t, LoraPair { a, b });
            }
            layers.push(m);
        }
        Ok(Lora { config, layers })
    }

    /// The lowest layer that carries the adapter (the number of layers if none does).
    pub fn first_layer(&self) -> usize {
        self.layers
            .iter()
            .position(|m| !m.is_empty())
            .unwrap_or(self.layers.len())
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.config.alpha / self.config.rank as f64
    }

    /// All trainable variables, in a fixed order (layer, target, A then B).
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|m| m.values().flat_map(|p| [p.a.clone(), p.b.clone()]))
            .collect()
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// The PEFT tensor name of layer `i`'s target `t`, matrix `ab` (`"A"` or `"B"`).
    pub fn peft_key(i: usize, t: Target, ab: &str) -> String {
        format!(
            "base_model.model.model.layers.{i}.{}.{}.lora_{ab}.weight",
            t.module(),
            t.peft_name()
        )
    }

    /// The tensors under their PEFT names (f32).
    pub fn peft_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, m) in self.layers.iter().enumerate() {
            for (&t, p) in m {
                out.insert(Self::peft_key(i, t, "A"), p.a.as_tensor().clone());
                out.insert(Self::peft_key(i, t, "B"), p.b.as_tensor().clone());
            }
        }
        out
    }

    /// Rebuilds an adapter from PEFT tensors, checking every expected name and shape.
    pub fn from_peft_tensors(
        cfg: &Config,
        config: LoraConfig,
        tensors: &std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, LlmError> {
        check_layers(cfg, &config)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut m = BTreeMap::new();
            if !config.has_layer(i) {
                layers.push(m);
                continue;
            }
            for &t in &config.targets {
                let (inp, out) = t.dims(cfg);
                let get = |ab: &str, shape: (usize, usize)| -> Result<Var, LlmError> {
                    let key = Self::peft_key(i, t, ab);
                    let v = tensors
                        .get(&key)
                        .ok_or_else(|| LoraError::MissingTensor { key: key.clone() })?;
                    if v.dims() != [shape.0, shape.1] {
                        return Err(LoraError::Shape {
                            key,
                            got: v.dims().to_vec(),
                            expected: [shape.0, shape.1],
                        }
                        .into());
                    }
                    let v = v.to_dtype(DType::F32).and_then(|v| v.to_device(device))?;
                    let vals: Vec<f32> = v.flatten_all().and_then(|f| f.to_vec1())?;
                    if vals.iter().any(|x| !x.is_finite()) {
                        return Err(LoraError::NotFinite { key }.into());
                    }
                    Ok(Var::from_tensor(&v)?)
                };
                let a = get("A", (config.rank, inp))?;
                let b = get("B", (out, config.rank))?;
                m.insert(t, LoraPair { a, b });
            }
            layers.push(m);
        }
        let adapted = (0..cfg.num_layers).filter(|&i| config.has_layer(i)).count();
        let expected = adapted * config.targets.len() * 2;
        if tensors.len() != expected {
            return Err(LoraError::TensorCount {
                got: tensors.len(),
                expected,
            }
            .into());
        }
        Ok(Lora { config, layers })
    }

    /// Writes `adapter_model.safetensors` (atomically) into `dir`.
    pub fn save_safetensors(&self, path: &Path) -> Result<(), LlmError> {
        let tensors: std::collections::HashMap<String, Tensor> = self.peft_tensors().into_iter().collect();
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| LlmError::Io {
            path: path.to_path_buf(),
            source: e,
        })
    }
}
