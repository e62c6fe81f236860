//! [`KvCache`]: keys and values of the tokens a sequence has seen, per layer.
//!
//! Each layer's keys and values live in a buffer allocated once with room to grow
//! (`[1, kv_heads, capacity, head_dim]`); a forward pass writes its new positions in place
//! and attends to a view of the filled part, so a decoding step copies only its own keys and
//! values, not the whole cache. A full buffer is replaced by one twice as large.
//!
//! A cache belongs to one sequence: [`KvCache::fork`] copies one (a shared prompt prefix
//! handed to each ticket), [`KvCache::truncate`] rolls one back (a scored branch dropped).

use candle_core::{DType, Device, Tensor};

use super::Config;
use crate::LlmError;

/// Smallest buffer allocated, in positions.
const MIN_CAPACITY: usize = 64;

/// One layer's keys and values: buffers and how many positions are filled.
#[derive(Default)]
pub(crate) struct LayerKv {
    buf: Option<(Tensor, Tensor)>,
    len: usize,
}

impl LayerKv {
    /// Positions filled.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Keys and values of the filled positions, `[1, kv_heads, len, head_dim]` each (views
    /// into the buffers); `None` when empty.
    pub(crate) fn view(&self) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        match &self.buf {
            Some((k, v)) if self.len > 0 => Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))),
            _ => Ok(None),
        }
    }

    /// Writes `k`, `v` `[1, kv_heads, n, head_dim]` after the filled positions (growing the
    /// buffers when full, by at least `reserve` more positions) and returns the views of all
    /// filled positions, new ones included.
    pub(crate) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        reserve: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, hk, n, d) = k.dims4()?;
        if b != 1 {
            candle_core::bail!("a KV cache holds one sequence; got a batch of {b}");
        }
        let need = self.len + n;
        let cap = self.buf.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        if need > cap {
            let cap = (2 * cap).max(need + reserve).max(MIN_CAPACITY);
            let grow = |old: Option<&Tensor>| -> candle_core::Result<Tensor> {
                let t = Tensor::zeros((1, hk, cap, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    if self.len > 0 {
                        t.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(t)
            };
            let kb = grow(self.buf.as_ref().map(|(k, _)| k))?;
            let vb = grow(self.buf.as_ref().map(|(_, v)| v))?;
            self.buf = Some((kb, vb));
        }
        let (kb, vb) = self.buf.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }

    /// A copy of the filled positions with room for `reserve` more.
    fn fork(&self, reserve: usize) -> candle_core::Result<Self> {
        let mut out = LayerKv::default();
        if let Some((k, v)) = self.view()? {
            out.append(&k, &v, reserve)?;
        }
        Ok(out)
    }
}

/// Keys and values of the tokens seen so far, per layer, for one sequence.
#[derive(Default)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) len: usize,
    /// Positions to make room for beyond what a growing write needs (avoids regrowing while
    /// decoding).
    pub(crate) reserve: usize,
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

    /// Makes buffers that grow hold `positions` more than the write that grows them needs
    /// (the expected rest of a sequence), so decoding does not regrow them.
    pub fn set_reserve(&mut self, positions: usize) {
        self.reserve = positions;
    }

    /// A copy of this cache that another sequence can extend, with buffers that hold
    /// `reserve` more positions before they grow.
    pub fn fork(&self, reserve: usize) -> Result<Self, LlmError> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.fork(reserve))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: self.len,
            reserve,
        })
    }

    /// Forgets every position from `len` on (a branch that was scored and dropped); the
    /// buffers are kept for the next writes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }

    /// This cache with every key and value rounded to f16 precision: what [`KvCache::load`]
    /// gives back from a saved cache, so a process that computes the prefix decodes exactly
    /// as one that reads it from disk.
    pub fn rounded_to_f16(&self) -> Result<Self, LlmError> {
        let mut out = Self {
            layers: Vec::with_capacity(self.layers.len()),
            len: self.len,
            reserve: self.reserve,
        };
        for l in &self.layers {
            let mut r = LayerKv::default();
            if let Some((k, v)) = l.view()? {
                let round = |t: &Tensor| t.to_dtype(DType::F16)?.to_dtype(DType::F32);
                r.append(&round(&k)?, &round(&v)?, 0)?;
            }
            out.layers.push(r);
        }
        Ok(out)
    }

    /// Writes the cache to a safetensors file in f16 (half the bytes; the keys and values are
    /// read back into f32), atomically (temporary file, then rename).
    pub fn save(&self, path: &std::path::Path) -> Result<(), LlmError> {
        let mut map = std::collections::HashMap::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let Some((k, v)) = l.view()? {
                map.insert(format!("k.{i}"), k.to_dtype(DType::F16)?);
                map.insert(format!("v.{i}"), v.to_dtype(DType::F16)?);
            }
        }
        let len = Tensor::new(&[self.len as u32], &Device::Cpu)?;
        map.insert("len".to_string(), len);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let io = |e: std::io::Error| LlmError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        candle_core::safetensors::save(&map, &tmp)?;
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
            let k = map.get(&format!("k.{i}"))?;
            let v = map.get(&format!("v.{i}"))?;
            if k.dims() != want || v.dims() != want || k.dtype() != DType::F16 || v.dtype() != DType::F16 {
                return None;
            }
            let mut l = LayerKv::default();
            l.append(&k.to_dtype(DType::F32).ok()?, &v.to_dtype(DType::F32).ok()?, 0)
                .ok()?;
            layers.push(l);
        }
        Some(Self {
            layers,
            len,
            reserve: 0,
        })
    }
}
