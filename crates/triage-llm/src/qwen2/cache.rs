//! [`KvCache`]: keys and values of the tokens a sequence has seen, per layer.

use candle_core::{DType, Device, Tensor};

use super::Config;
use crate::LlmError;

/// Keys and values of the tokens seen so far, per layer. Cloning is cheap (tensors are
/// reference-counted), so a cached prompt prefix can be shared by many sequences.
#[derive(Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) len: usize,
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
        let len = Tensor::new(&[self.len as u32], &Device::Cpu).map_err(LlmError::from)?;
        map.insert("len".to_string(), len);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let io = |e: std::io::Error| LlmError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        candle_core::safetensors::save(&map, &tmp).map_err(LlmError::from)?;
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
