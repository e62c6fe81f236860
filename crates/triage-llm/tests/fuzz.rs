//! Property tests: the GGUF header reader and the LoRA weights loader never panic on damaged
//! files, and their errors name the file (GGUF) or the tensor or setting (LoRA). No model is
//! needed: the seeds are a tiny GGUF and a tiny adapter written here. Figures and how to run
//! more cases: `docs/fuzzing.md`.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use fuzz::{bytes, fail, mutated, names, run, Check, Verdict};
use proptest::prelude::*;
use triage_llm::lora::{Lora, LoraConfig, Target};
use triage_llm::qwen2::Config;
use triage_llm::{GgufFile, LlmError};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("triage-llm-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small but complete GGUF: qwen2 metadata of every value type the loaders read, a string
/// array, an alignment, and a Q8_0 and an F32 tensor.
fn tiny_gguf() -> Vec<u8> {
    gguf_with(&[], &[])
}

/// An F32 tensor of zeros of shape `dims`, as a GGUF tensor.
fn zeros(dims: &[usize]) -> QTensor {
    let t = Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

/// [`tiny_gguf`] with the metadata values of `set` in place of its own and the `tensors` added.
fn gguf_with(set: &[(&str, Value)], tensors: &[(&str, QTensor)]) -> Vec<u8> {
    let dev = Device::Cpu;
    let embd = Tensor::arange(0f32, 128., &dev)
        .unwrap()
        .reshape((4, 32))
        .unwrap();
    let norm = Tensor::ones(32, candle_core::DType::F32, &dev).unwrap();
    let embd = QTensor::quantize(&embd, GgmlDType::Q8_0).unwrap();
    let norm = QTensor::quantize(&norm, GgmlDType::F32).unwrap();
    let tokens = Value::Array(
        ["<|im_start|>", "a", "b", "<|im_end|>"]
            .map(|s| Value::String(s.into()))
            .to_vec(),
    );
    let md = [
        ("general.architecture", Value::String("qwen2".into())),
        ("general.name", Value::String("tiny".into())),
        ("general.alignment", Value::U32(32)),
        ("qwen2.block_count", Value::U32(1)),
        ("qwen2.embedding_length", Value::U32(32)),
        ("qwen2.feed_forward_length", Value::U64(64)),
        ("qwen2.attention.head_count", Value::I32(4)),
        ("qwen2.attention.head_count_kv", Value::U16(2)),
        ("qwen2.context_length", Value::U32(128)),
        ("qwen2.rope.freq_base", Value::F32(10000.)),
        ("qwen2.attention.layer_norm_rms_epsilon", Value::F64(1e-6)),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", Value::String("{{ messages }}".into())),
    ];
    let md_refs: Vec<(&str, &Value)> = md
        .iter()
        .map(|(k, v)| (*k, set.iter().find(|(s, _)| s == k).map_or(v, |(_, v)| v)))
        .collect();
    let mut all = vec![("token_embd.weight", &embd), ("output_norm.weight", &norm)];
    all.extend(tensors.iter().map(|(n, t)| (*n, t)));
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md_refs, &all).unwrap();
    out.into_inner()
}

/// Opens `b` as a GGUF file; an opened file must answer its metadata queries; an error must
/// name the file. `guarded` counts the inputs the reader's panic guard turned into errors.
fn check_gguf(path: &Path, b: &[u8], guarded: &std::cell::Cell<u32>) -> Check {
    std::fs::write(path, b).unwrap();
    match GgufFile::open(path) {
        Ok(g) => {
            let info = g.info();
            let _ = (g.architecture(), g.meta_u64("qwen2.block_count"), info.parameters);
            if g.file_len() != b.len() as u64 {
                return fail(format!("file_len {} for {} bytes", g.file_len(), b.len()));
            }
            // The next step of every loader: a model configuration or an error naming the file.
            if let Err(e) = Config::from_gguf(&g) {
                names(&e.to_string(), &[&path.display().to_string()])?;
            }
            Ok(Verdict::Accepted)
        }
        Err(e) => {
            let msg = e.to_string();
            names(&msg, &[&path.display().to_string()])?;
            if !matches!(e, LlmError::BadGguf { .. } | LlmError::Io { .. }) {
                return fail(format!("unexpected error kind: {e:?}"));
            }
            if msg.contains("the reader panicked") {
                guarded.set(guarded.get() + 1);
            }
            Ok(Verdict::Rejected)
        }
    }
}

/// The configuration's sizes are checked against the tensors present: the tiny GGUF claims
/// one layer and holds none, and a huge `block_count` is refused before any allocation.
#[test]
fn config_sizes_are_checked_against_the_tensors() {
    let path = dir("config").join("m.gguf");
    std::fs::write(&path, tiny_gguf()).unwrap();
    let e = Config::from_gguf(&GgufFile::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("qwen2.block_count is 1 but the file holds 0 layers") && e.contains("m.gguf"),
        "{e}"
    );
}

/// Sizes of 0 that agree with the tensors present (an MLP of width 0) are refused by name,
/// not left to divide by zero in the weight loaders.
#[test]
fn zero_sizes_are_refused() {
    let path = dir("zero").join("m.gguf");
    let layer = [
        ("blk.0.attn_norm.weight", zeros(&[32])),
        ("blk.0.ffn_up.weight", zeros(&[0, 32])),
    ];
    let refused = |set: &[(&str, Value)]| {
        std::fs::write(&path, gguf_with(set, &layer)).unwrap();
        Config::from_gguf(&GgufFile::open(&path).unwrap())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = refused(&[("qwen2.feed_forward_length", Value::U64(0))]);
    assert!(
        e.contains("qwen2.feed_forward_length is 0") && e.contains("m.gguf"),
        "{e}"
    );
    let e = refused(&[("qwen2.embedding_length", Value::U32(0))]);
    assert!(e.contains("qwen2.embedding_length is 0"), "{e}");
}

#[test]
fn gguf_header_mutations_never_panic_and_errors_name_the_file() {
    let d = dir("gguf");
    let path = d.join("m.gguf");
    let seed = tiny_gguf();
    let guarded = std::cell::Cell::new(0);
    assert!(matches!(
        check_gguf(&path, &seed, &guarded),
        Ok(Verdict::Accepted)
    ));
    // Mutations of the header (the first 1 KiB, where every length and count is) matter most;
    // the tensor data behind it is opaque to the reader.
    let header = seed.len().min(1024);
    let strategy = mutated(seed[..header].to_vec()).prop_map({
        let tail = seed[header..].to_vec();
        move |mut h| {
            h.extend_from_slice(&tail);
            h
        }
    });
    let (_, accepted, rejected) = run("gguf/header-mutated", 3000, strategy, |b| {
        check_gguf(&path, &b, &guarded)
    });
    assert!(accepted > 0 && rejected > 0, "{accepted} / {rejected}");
    run("gguf/whole-file-mutated", 1000, mutated(seed.clone()), |b| {
        check_gguf(&path, &b, &guarded)
    });
    let magic = |mut b: Vec<u8>| {
        let mut h = b"GGUF\x03\x00\x00\x00".to_vec();
        h.append(&mut b);
        h
    };
    run("gguf/magic+bytes", 1000, bytes(256).prop_map(magic), |b| {
        check_gguf(&path, &b, &guarded)
    });
    run("gguf/bytes", 300, bytes(256), |b| check_gguf(&path, &b, &guarded));
    eprintln!(
        "fuzz gguf: {} inputs stopped by the reader's panic guard",
        guarded.get()
    );
    std::fs::remove_dir_all(d).unwrap();
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 4.,
        dropout: 0.,
        targets: vec![Target::Q, Target::V, Target::Down],
        layers: Some(vec![1]),
    }
}

/// The weights file of a fresh adapter.
fn tiny_adapter() -> Vec<u8> {
    let d = dir("adapter-seed");
    let p = d.join("adapter_model.safetensors");
    let lora = Lora::new(&Config::tiny(), lora_config(), 7, &Device::Cpu).unwrap();
    // Non-zero B so a flipped byte can make a NaN.
    for v in lora.vars() {
        v.set(&(v.as_tensor().ones_like().unwrap() * 0.5).unwrap())
            .unwrap();
    }
    lora.save_safetensors(&p).unwrap();
    let b = std::fs::read(&p).unwrap();
    std::fs::remove_dir_all(d).unwrap();
    b
}

/// Loads adapter weights `b` with `config`: an accepted adapter has the configured shape; a
/// rejection names a tensor, the setting or the tensor count.
fn check_lora(b: &[u8], config: LoraConfig) -> Check {
    let cfg = Config::tiny();
    let tensors: HashMap<String, Tensor> = match candle_core::safetensors::load_buffer(b, &Device::Cpu) {
        Ok(t) => t,
        Err(e) => {
            names(&e.to_string(), &[])?;
            return Ok(Verdict::Rejected);
        }
    };
    match Lora::from_peft_tensors(&cfg, config.clone(), &tensors, &Device::Cpu) {
        Ok(l) => {
            let adapted = (0..cfg.num_layers).filter(|&i| config.has_layer(i)).count();
            if l.vars().len() != adapted * config.targets.len() * 2 {
                return fail(format!("{} vars for {config:?}", l.vars().len()));
            }
            Ok(Verdict::Accepted)
        }
        Err(e) => {
            let msg = e.to_string();
            names(
                &msg,
                &[
                    "base_model.model.model.layers.",
                    "tensors",
                    "LoRA layer",
                    "layers list",
                ],
            )?;
            Ok(Verdict::Rejected)
        }
    }
}

#[test]
fn lora_weights_mutations_never_panic_and_errors_name_the_tensor() {
    let seed = tiny_adapter();
    assert!(matches!(check_lora(&seed, lora_config()), Ok(Verdict::Accepted)));
    let (_, accepted, rejected) = run("lora/weights-mutated", 100_000, mutated(seed.clone()), |b| {
        check_lora(&b, lora_config())
    });
    assert!(accepted > 0 && rejected > 0, "{accepted} / {rejected}");
    // The valid weights under a configuration that may not match them (a tenth: the one
    // they were written with).
    let random = (
        0usize..5,
        proptest::sample::subsequence(Target::ALL.to_vec(), 0..=7),
        proptest::option::of(proptest::collection::vec(0usize..4, 0..4)),
    )
        .prop_map(|(rank, targets, layers)| LoraConfig {
            rank,
            alpha: 8.,
            dropout: 0.,
            targets,
            layers,
        });
    let configs = prop_oneof![1 => Just(lora_config()), 9 => random];
    run("lora/configs", 30_000, configs, |c| check_lora(&seed, c));
}
