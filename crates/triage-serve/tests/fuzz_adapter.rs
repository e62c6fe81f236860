//! Property test of the adapter loader the service runs on activation
//! (`triage_train::adapter::load`: `adapter_config.json`, `adapter_model.safetensors`,
//! `triage.json`): damaged files never panic it, and every refusal names the file at fault. No
//! model is needed: the seed is a tiny adapter written here. Figures: `docs/fuzzing.md`.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use std::path::{Path, PathBuf};

use candle_core::Device;
use fuzz::{fail, mutated, names, run, Check, Verdict};
use proptest::prelude::*;
use serde_json::{json, Value};
use triage_llm::lora::{Lora, LoraConfig, Target};
use triage_llm::qwen2::Config;
use triage_taxonomy::Taxonomy;
use triage_train::adapter::{self, TriageMeta};

const FILES: [&str; 3] = ["adapter_config.json", "adapter_model.safetensors", "triage.json"];

/// A saved tiny adapter: its folder's three files.
fn seed(dir: &Path) -> [Vec<u8>; 3] {
    let config = LoraConfig {
        rank: 2,
        alpha: 4.,
        dropout: 0.,
        targets: vec![Target::Q, Target::V],
        layers: Some(vec![1]),
    };
    let lora = Lora::new(&Config::tiny(), config, 3, &Device::Cpu).unwrap();
    let meta = TriageMeta::new(
        &Taxonomy::builtin_default(),
        &"0".repeat(64),
        "tiny.gguf",
        json!({}),
    );
    adapter::save(dir, &lora, "tiny-random-qwen2", &meta).unwrap();
    FILES.map(|f| std::fs::read(dir.join(f)).unwrap())
}

/// Writes the adapter folder with file `k` replaced by `b`, then loads it.
fn check(dir: &Path, files: &[Vec<u8>; 3], k: usize, b: &[u8]) -> Check {
    for (i, f) in FILES.iter().enumerate() {
        std::fs::write(dir.join(f), if i == k { b } else { &files[i] }).unwrap();
    }
    match adapter::load(dir, &Config::tiny(), &Device::Cpu) {
        Ok(a) => {
            let n = a.lora.vars().len();
            let layers = (0..2).filter(|&i| a.lora.config.has_layer(i)).count();
            if n != layers * a.lora.config.targets.len() * 2 {
                return fail(format!("{n} tensors for {:?}", a.lora.config));
            }
            Ok(Verdict::Accepted)
        }
        Err(e) => {
            let shown: Vec<String> = FILES.iter().map(|f| dir.join(f).display().to_string()).collect();
            let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
            names(&e.to_string(), &shown)?;
            Ok(Verdict::Rejected)
        }
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("triage-serve-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn adapter_folders_with_a_damaged_file_never_panic_the_loader_and_name_the_file() {
    let d = dir("adapter");
    let files = seed(&d);
    assert!(matches!(check(&d, &files, 0, &files[0]), Ok(Verdict::Accepted)));
    let strategy = prop_oneof![
        mutated(files[0].clone()).prop_map(|b| (0usize, b)),
        mutated(files[1].clone()).prop_map(|b| (1usize, b)),
        mutated(files[2].clone()).prop_map(|b| (2usize, b)),
    ];
    let (_, accepted, rejected) = run("adapter/file-mutated", 1500, strategy, |(k, b)| {
        check(&d, &files, k, &b)
    });
    assert!(accepted > 0 && rejected > 0, "{accepted} / {rejected}");

    // adapter_config.json with values of every type in its fields.
    let base: Value = serde_json::from_slice(&files[0]).unwrap();
    let values = || {
        prop_oneof![
            Just(json!(null)),
            Just(json!(0)),
            Just(json!(2)),
            Just(json!(-1)),
            Just(json!(1.5)),
            Just(json!(1e300)),
            Just(json!(u64::MAX)),
            Just(json!("LORA")),
            Just(json!("q_proj")),
            Just(json!(true)),
            Just(json!([1])),
            Just(json!([0, 1, 7])),
            Just(json!(["q_proj", "v_proj"])),
            Just(json!(["q_proj", "v_proj", "nope"])),
            Just(json!({})),
        ]
    };
    let keys = [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "layers_to_transform",
        "use_dora",
        "use_rslora",
    ];
    let edits = proptest::collection::vec((proptest::sample::select(keys.to_vec()), values()), 1..4);
    run("adapter/config-values", 1500, edits, |edits| {
        let mut c = base.clone();
        for (k, v) in edits {
            c[k] = v;
        }
        check(&d, &files, 0, &serde_json::to_vec(&c).unwrap())
    });
    std::fs::remove_dir_all(d).unwrap();
}
