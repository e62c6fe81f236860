//! Hidden states of the frozen layers, computed once per example.
//!
//! When the adapter sits on the top layers only, the layers below have no trainable weight:
//! their output for an example is the same at every step and epoch. It is computed once, with
//! the fused inference kernels, and kept on disk (one file of `[n, hidden]` f32 per example,
//! written atomically and named after a hash of everything that determines it), so a resumed
//! or repeated run reuses it and a training step starts at the first adapted layer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use sha2::{Digest, Sha256};
use triage_llm::qwen2::{KvCache, Qwen2};

use crate::data::Item;
use crate::{candle, file_err, TrainError};

/// The frozen layers' output for a set of items, on disk.
pub struct Features {
    dir: PathBuf,
    key: String,
    first_layer: usize,
    hidden: usize,
}

impl Features {
    /// Features of layers `0..first_layer` in `dir`; `key` identifies the model and the
    /// prefix (files of another key are never read).
    pub fn new(dir: &Path, key: &str, first_layer: usize, hidden: usize) -> Self {
        Features {
            dir: dir.to_owned(),
            key: key.to_owned(),
            first_layer,
            hidden,
        }
    }

    /// The first layer the features feed.
    pub fn first_layer(&self) -> usize {
        self.first_layer
    }

    fn path(&self, item: &Item) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.key.as_bytes());
        h.update((self.first_layer as u64).to_le_bytes());
        for t in &item.tokens {
            h.update(t.to_le_bytes());
        }
        let d = h.finalize();
        let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.f32"))
    }

    fn bytes(&self, item: &Item) -> u64 {
        (item.tokens.len() * self.hidden * 4) as u64
    }

    /// Whether the item's file is present and complete.
    pub fn has(&self, item: &Item) -> bool {
        std::fs::metadata(self.path(item)).is_ok_and(|m| m.len() == self.bytes(item))
    }

    /// Computes the missing files for `items`, each as `model.hidden_states` of the item's
    /// tokens after `prefix` through the frozen layers (with temporary dense copies of those
    /// layers where their quantized kernel is slow). `progress(done, total)` after each item;
    /// returns [`TrainError::Interrupted`] (0 steps) when `stop` is set, keeping what is done.
    pub fn prepare(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        items: &[&Item],
        stop: &AtomicBool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| file_err(&self.dir, e))?;
        let total = items.len();
        let dense = match model.slow_quantized(0..self.first_layer) {
            true => Some(model.dense_weights(0..self.first_layer, false, candle_core::DType::F16)?),
            false => None,
        };
        for (i, item) in items.iter().enumerate() {
            if stop.load(Ordering::SeqCst) {
                return Err(TrainError::Interrupted(0));
            }
            if !self.has(item) {
                let x = model.hidden_states(
                    &item.tokens,
                    &mut prefix.clone(),
                    0..self.first_layer,
                    None,
                    dense.as_ref(),
                )?;
                let vals: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).map_err(candle)?;
                let mut bytes = Vec::with_capacity(vals.len() * 4);
                for v in vals {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                let path = self.path(item);
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                let write = || -> std::io::Result<()> {
                    let mut f = std::fs::File::create(&tmp)?;
                    f.write_all(&bytes)?;
                    f.sync_data()?;
                    std::fs::rename(&tmp, &path)
                };
                write().map_err(|e| file_err(&path, e))?;
            }
            progress(i + 1, total);
        }
        Ok(())
    }

    /// The item's features, `[n, hidden]`.
    pub fn load(&self, item: &Item, device: &candle_core::Device) -> Result<Tensor, TrainError> {
        let path = self.path(item);
        let bytes = std::fs::read(&path).map_err(|e| file_err(&path, format!("{e} (features missing: rerun)")))?;
        if bytes.len() as u64 != self.bytes(item) {
            return Err(file_err(
                &path,
                format!("{} bytes, expected {}: delete it to recompute", bytes.len(), self.bytes(item)),
            ));
        }
        let vals: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Tensor::from_vec(vals, (item.tokens.len(), self.hidden), device).map_err(candle)
    }
}
