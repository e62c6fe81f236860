//! Opening a GGUF file defensively and reading its metadata.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::LlmError;

/// An opened, bounds-checked GGUF file: header and metadata in memory, tensor data on disk.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file_len: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Reads the header of `path` and checks that every tensor's data lies inside the file,
    /// so a truncated download is reported here, by name, rather than at first use.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LlmError> {
        let path = path.as_ref().to_path_buf();
        let bad = |message: String| LlmError::BadGguf {
            path: path.clone(),
            message,
        };
        let file = File::open(&path).map_err(|e| LlmError::Io {
            path: path.clone(),
            source: e,
        })?;
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::new(file);
        // candle bounds-checks lengths in the header; the guard turns any remaining panic on
        // hostile input (e.g. `general.alignment = 0`) into an error instead of a crash.
        let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)))
            .map_err(|_| bad("malformed GGUF header (the reader panicked)".into()))?
            .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        let mut needed = content.tensor_data_offset;
        for (name, info) in &content.tensor_infos {
            // Checked: a damaged header can declare dimensions whose product overflows.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor `{name}`: shape {:?} overflows",
                        info.shape.dims()
                    ))
                })?;
            let block = info.ggml_dtype.block_size() as u64;
            if block == 0 || !elems.is_multiple_of(block) {
                return Err(bad(format!(
                    "tensor `{name}`: {elems} elements is not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                )));
            }
            let end = (elems / block)
                .checked_mul(info.ggml_dtype.type_size() as u64)
                .and_then(|bytes| {
                    content
                        .tensor_data_offset
                        .checked_add(info.offset)?
                        .checked_add(bytes)
                })
                .ok_or_else(|| bad(format!("tensor `{name}`: offset or size overflows")))?;
            needed = needed.max(end);
        }
        if needed > file_len {
            return Err(bad(format!(
                "file is truncated: it is {file_len} bytes but its tensors need {needed} bytes; \
                 delete it and download it again (`triage model pull`)"
            )));
        }
        Ok(Self {
            path,
            content,
            file_len,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header (metadata and tensor infos), for model loaders.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// A string metadata value.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// An integer metadata value (any integer width).
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        match self.content.metadata.get(key)? {
            Value::U8(v) => Some(*v as u64),
            Value::U16(v) => Some(*v as u64),
            Value::U32(v) => Some(*v as u64),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// `general.architecture` (e.g. `qwen2`).
    pub fn architecture(&self) -> Option<&str> {
        self.meta_str("general.architecture")
    }

    /// A summary for `triage model info`.
    pub fn info(&self) -> ModelInfo {
        let arch = self.architecture().unwrap_or("unknown").to_string();
        let key = |k: &str| self.meta_u64(&format!("{arch}.{k}"));
        let mut tensor_types = BTreeMap::new();
        let mut params = 0u64;
        for info in self.content.tensor_infos.values() {
            *tensor_types
                .entry(format!("{:?}", info.ggml_dtype))
                .or_insert(0usize) += 1;
            params += info.shape.elem_count() as u64;
        }
        ModelInfo {
            path: self.path.clone(),
            file_len: self.file_len,
            name: self.meta_str("general.name").unwrap_or("").to_string(),
            architecture: arch.clone(),
            parameters: params,
            block_count: key("block_count"),
            embedding_length: key("embedding_length"),
            context_length: key("context_length"),
            head_count: key("attention.head_count"),
            head_count_kv: key("attention.head_count_kv"),
            vocab_size: self
                .content
                .metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len()),
            has_chat_template: self.meta_str("tokenizer.chat_template").is_some(),
            has_output_weight: self.content.tensor_infos.contains_key("output.weight"),
            tensor_types,
        }
    }
}

/// Facts about a GGUF model, as printed by `triage model info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// File path.
    pub path: PathBuf,
    /// File size in bytes.
    pub file_len: u64,
    /// `general.name`.
    pub name: String,
    /// `general.architecture`.
    pub architecture: String,
    /// Total number of weights.
    pub parameters: u64,
    /// Transformer layers.
    pub block_count: Option<u64>,
    /// Hidden size.
    pub embedding_length: Option<u64>,
    /// Trained context length.
    pub context_length: Option<u64>,
    /// Attention heads.
    pub head_count: Option<u64>,
    /// Key/value heads.
    pub head_count_kv: Option<u64>,
    /// Tokenizer vocabulary size.
    pub vocab_size: Option<usize>,
    /// Whether `tokenizer.chat_template` is present.
    pub has_chat_template: bool,
    /// Whether the LM head is stored separately (not tied to the embeddings).
    pub has_output_weight: bool,
    /// Tensor count per quantisation type.
    pub tensor_types: BTreeMap<String, usize>,
}
