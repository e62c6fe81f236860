//! Hidden states of the frozen layers, computed once per example.
//!
//! When the adapter sits on the top layers only, the layers below have no trainable weight:
//! their output for an example is the same at every step and epoch. It is computed once, one
//! layer at a time for all examples (see [`Features::prepare`]), and kept on disk (one file
//! of `[n, hidden]` f32 per example, written atomically and named after a hash of everything
//! that determines it), so a resumed or repeated run reuses it and a training step starts at
//! the first adapted layer.

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

    /// The file of `item`'s hidden states at the input of layer `layer` (the features at
    /// `first_layer`; intermediate stages while they are being computed).
    fn path(&self, item: &Item, layer: usize) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.key.as_bytes());
        h.update((self.first_layer as u64).to_le_bytes());
        for t in &item.tokens {
            h.update(t.to_le_bytes());
        }
        let d = h.finalize();
        let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
        match layer == self.first_layer {
            true => self.dir.join(format!("{hex}.f32")),
            false => self.dir.join(format!("{hex}.l{layer}.f32")),
        }
    }

    fn bytes(&self, item: &Item) -> u64 {
        (item.tokens.len() * self.hidden * 4) as u64
    }

    fn complete(&self, item: &Item, layer: usize) -> bool {
        std::fs::metadata(self.path(item, layer)).is_ok_and(|m| m.len() == self.bytes(item))
    }

    /// Whether the item's features are present and complete.
    pub fn has(&self, item: &Item) -> bool {
        self.complete(item, self.first_layer)
    }

    /// The layer whose input the item's files hold (0: nothing yet).
    fn stage(&self, item: &Item) -> usize {
        (1..=self.first_layer)
            .rev()
            .find(|&l| self.complete(item, l))
            .unwrap_or(0)
    }

    /// Computes the missing features of `items`, **one layer at a time**: a dense f32 copy
    /// of the layer is made for its pass and dropped after it, every item goes through it,
    /// and each item's hidden states wait on disk for the next layer. The quantized kernels
    /// are never used, so candle never builds its repacked copy of the frozen weights (which
    /// would stay resident for the whole training run); memory stays at one layer's dense
    /// copy plus one example. `progress(done, total)` counts item-layers; returns
    /// [`TrainError::Interrupted`] (0 steps) when `stop` is set, keeping what is done.
    pub fn prepare(
        &self,
        model: &Qwen2,
        prefix: &KvCache,
        items: &[&Item],
        stop: &AtomicBool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| file_err(&self.dir, e))?;
        let mut stage: Vec<usize> = items.iter().map(|it| self.stage(it)).collect();
        let total = items.len() * self.first_layer;
        let mut done: usize = stage.iter().sum();
        let device = model.device();
        for layer in 0..self.first_layer {
            if stage.iter().all(|&s| s > layer) {
                continue;
            }
            // f32: one layer at a time, so the memory is small, and f32 products need no
            // conversion (~12 % faster than f16 on CPU).
            let dense = model.dense_weights(layer..layer + 1, false, candle_core::DType::F32)?;
            for (i, item) in items.iter().enumerate() {
                if stage[i] != layer {
                    continue;
                }
                if stop.load(Ordering::SeqCst) {
                    return Err(TrainError::Interrupted(0));
                }
                let x = match layer {
                    0 => {
                        let ids = Tensor::new(item.tokens.as_slice(), device).map_err(candle)?;
                        model.embed(&ids.unsqueeze(0).map_err(candle)?)?
                    }
                    l => self.read(item, l, device)?.unsqueeze(0).map_err(candle)?,
                };
                let y = model.run_layer(layer, &x, prefix, Some(&dense))?;
                self.write(item, layer + 1, &y)?;
                if layer > 0 {
                    let _ = std::fs::remove_file(self.path(item, layer));
                }
                stage[i] = layer + 1;
                done += 1;
                progress(done, total);
            }
        }
        Ok(())
    }

    fn write(&self, item: &Item, layer: usize, x: &Tensor) -> Result<(), TrainError> {
        let vals: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).map_err(candle)?;
        let mut bytes = Vec::with_capacity(vals.len() * 4);
        for v in vals {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let path = self.path(item, layer);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        // Flushed before the rename: a file is only ever checked by its length, so a power
        // loss must not leave one of the right length with content never written.
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| file_err(&path, e))
    }

    fn read(&self, item: &Item, layer: usize, device: &candle_core::Device) -> Result<Tensor, TrainError> {
        let path = self.path(item, layer);
        let bytes =
            std::fs::read(&path).map_err(|e| file_err(&path, format!("{e} (features missing: rerun)")))?;
        if bytes.len() as u64 != self.bytes(item) {
            return Err(file_err(
                &path,
                format!(
                    "{} bytes, expected {}: delete it to recompute",
                    bytes.len(),
                    self.bytes(item)
                ),
            ));
        }
        let vals: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Tensor::from_vec(vals, (item.tokens.len(), self.hidden), device).map_err(candle)
    }

    /// The item's features, `[n, hidden]`.
    pub fn load(&self, item: &Item, device: &candle_core::Device) -> Result<Tensor, TrainError> {
        self.read(item, self.first_layer, device)
    }
}
