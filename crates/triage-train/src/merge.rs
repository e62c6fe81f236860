//! `triage adapter merge`: folds a LoRA adapter into the base weights and writes a standalone
//! GGUF, for engines without LoRA support.
//!
//! Each targeted projection becomes `W' = W + (alpha/r)·B·A`: `W` is dequantized, the update
//! added in f32, and the sum quantized again — to the tensor's own type by default (same file
//! size; a second rounding, so the merged model is close to, not equal to, base + adapter), or
//! to Q8_0 with [`MergeOptions::requantize`] (larger, closer). Every other tensor and all
//! metadata are copied unchanged, plus `triage.merged_adapter`. The file is written under a
//! temporary name and renamed into place.
//!
//! A merged model applies the update to every token, the system prompt included; `triage infer
//! --adapter` applies it after the system prompt, as trained (see
//! `docs/adr/0003-qlora-training.md`). The merge test measures both differences.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use triage_llm::lora::Lora;

use crate::{candle, file_err, TrainError};

/// How to merge.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Quantize merged projections to this type instead of their original one.
    pub requantize: Option<GgmlDType>,
    /// Recorded as `triage.merged_adapter` (e.g. the adapter directory name).
    pub adapter_name: String,
}

/// What was merged.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// Projections changed.
    pub merged: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes written.
    pub bytes: u64,
}

/// Writes `base` with `lora` folded in to `out`. `progress(done, total)` is called per tensor.
pub fn merge_gguf(
    base: &Path,
    lora: &Lora,
    out: &Path,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<MergeSummary, TrainError> {
    let device = Device::Cpu;
    // Opened through GgufFile: its header reader is guarded against hostile headers and
    // every tensor is checked to lie inside the file.
    let gguf = triage_llm::GgufFile::open(base)?;
    let content = gguf.content();
    let mut reader = BufReader::new(File::open(base).map_err(|e| file_err(base, e))?);
    let layers = lora.layers.len();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let scale = lora.scale();
    let mut tensors = Vec::with_capacity(names.len());
    let (mut merged, mut copied) = (0, 0);
    for (done, name) in names.iter().enumerate() {
        let t = content
            .tensor(&mut reader, name, &device)
            .map_err(|e| file_err(base, format!("tensor `{name}`: {e}")))?;
        let pair = (0..layers).find_map(|li| {
            lora.layers[li]
                .iter()
                .find(|(target, _)| **name == format!("blk.{li}.{}.weight", target.gguf_name()))
                .map(|(_, p)| p)
        });
        let t = match pair {
            None => {
                copied += 1;
                t
            }
            Some(p) => {
                merged += 1;
                let fold = || -> candle_core::Result<QTensor> {
                    let w = t.dequantize(&device)?;
                    let delta = (p.b.as_tensor().matmul(p.a.as_tensor())? * scale)?;
                    if delta.dims() != w.dims() {
                        candle_core::bail!("adapter shape {:?} vs weight {:?}", delta.dims(), w.dims());
                    }
                    let sum: Tensor = (w + delta.to_device(&device)?)?;
                    QTensor::quantize(&sum, opts.requantize.unwrap_or(t.dtype()))
                };
                fold().map_err(|e| TrainError::Invalid(format!("{name}: cannot merge: {e}")))?
            }
        };
        tensors.push(((*name).clone(), t));
        progress(done + 1, names.len());
    }
    if merged != lora.layers.iter().map(|m| m.len()).sum::<usize>() {
        return Err(TrainError::Invalid(format!(
            "{}: only {merged} of the adapter's projections exist in this GGUF; is it the adapter's base model?",
            base.display()
        )));
    }
    let mut metadata: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    metadata.retain(|(k, _)| k != "triage.merged_adapter");
    metadata.push((
        "triage.merged_adapter".into(),
        Value::String(opts.adapter_name.clone()),
    ));
    let tmp = out.with_extension("gguf.tmp");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    let write = || -> Result<(), TrainError> {
        let mut w = BufWriter::new(File::create(&tmp).map_err(|e| file_err(&tmp, e))?);
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &md, &ts).map_err(candle)?;
        let f = w.into_inner().map_err(|e| file_err(&tmp, e.error()))?;
        f.sync_all().map_err(|e| file_err(&tmp, e))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| file_err(out, e))?;
    let bytes = std::fs::metadata(out).map_err(|e| file_err(out, e))?.len();
    Ok(MergeSummary {
        merged,
        copied,
        bytes,
    })
}
