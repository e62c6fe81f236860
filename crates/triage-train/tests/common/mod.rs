//! Shared setup of the training tests: a tiny random Qwen2-architecture model with the real
//! tokenizer and chat template of the 0.5B GGUF, a small taxonomy and eight examples.

#![allow(dead_code)]

use triage_data::Example;
use triage_llm::lora::Lora;
use triage_llm::qwen2::Config;
use triage_llm::GgufFile;
use triage_registry::ModelStore;
use triage_taxonomy::Validator;

/// The device the training tests run on: the CPU, or the GPU with `TRIAGE_TEST_DEVICE=cuda`
/// (or `cuda:N`; build with `--features cuda`, see docs/gpu.sh).
pub fn device() -> candle_core::Device {
    let spec = std::env::var("TRIAGE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    triage_train::trainer::device(&spec).unwrap_or_else(|e| panic!("TRIAGE_TEST_DEVICE: {e}"))
}

/// The GGUF whose tokenizer and chat template the tests use: the 0.5B from the model store, or
/// any Qwen2.5 GGUF named by `TRIAGE_TEST_GGUF` (docs/gpu.sh: a machine that cannot download).
pub fn gguf() -> GgufFile {
    if let Ok(path) = std::env::var("TRIAGE_TEST_GGUF") {
        return GgufFile::open(&path).unwrap_or_else(|e| panic!("TRIAGE_TEST_GGUF={path}: {e}"));
    }
    let store = ModelStore::from_env();
    let spec = store.registry().get("0.5b").unwrap();
    let path = store
        .ensure(spec, None)
        .unwrap_or_else(|e| panic!("the 0.5B model's tokenizer is needed (`triage model pull 0.5b`): {e}"));
    GgufFile::open(path).unwrap()
}

pub fn tiny(vocab: usize) -> Config {
    Config {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        max_position: 4096,
    }
}

/// A small taxonomy keeps the system prompt short, so the test runs in CI time; the code path
/// is the same as for the default taxonomy.
pub const TAXONOMY: &str = r#"
format = 1
name = "overfit-test"
description = "Test desk."
[summary]
description = "One line."
max_length = 40
[[fields]]
name = "category"
description = "Area."
values = [
  { name = "Network", description = "Network." },
  { name = "Hardware", description = "Devices." },
  { name = "Access", description = "Accounts." },
  { name = "Email", description = "Mail." },
]
[[fields]]
name = "priority"
description = "Urgency."
values = [
  { name = "Low", description = "Can wait." },
  { name = "High", description = "Urgent." },
]
"#;

pub const TAUGHT: [(&str, &str, &str); 8] = [
    ("my vpn drops every ten minutes", "Network", "High"),
    ("the office wifi is a bit slow", "Network", "Low"),
    ("printer on floor three jams", "Hardware", "Low"),
    ("laptop will not boot at all", "Hardware", "High"),
    ("please reset my password", "Access", "High"),
    ("add me to the marketing group", "Access", "Low"),
    ("outlook mailbox is full", "Email", "High"),
    ("change my email signature", "Email", "Low"),
];

pub fn examples(v: &Validator) -> Vec<Example> {
    TAUGHT
        .iter()
        .enumerate()
        .map(|(i, (text, c, p))| {
            let line = serde_json::json!({
                "id": format!("t{i}"), "text": text, "lang": "en", "source": "test",
                "ticket": {"summary": "x", "category": c, "priority": p},
            });
            Example::from_json_line(&line.to_string(), v).unwrap()
        })
        .collect()
}

/// The largest absolute difference between two adapters' matrices.
pub fn max_abs_diff(a: &Lora, b: &Lora) -> f32 {
    a.vars()
        .iter()
        .zip(b.vars())
        .map(|(x, y)| {
            (x.as_tensor() - y.as_tensor())
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("same shapes")
        })
        .fold(0.0, f32::max)
}
