//! A tiny random Qwen2-architecture model (quantized Q8_0 projections, the real tokenizer and
//! chat template of the 0.5B GGUF, the same code path as the real models) overfits eight
//! examples with the default training path (adapter on the top layer, the layer below
//! computed once, the loss on the decisions): the loss falls at least 5x, and constrained
//! inference with the trained adapter
//! reproduces the taught labels, which the base model did not produce. The adapter also
//! round-trips through the PEFT directory format, checked by an independent Python reader.

mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::{examples, gguf, tiny, TAXONOMY};
use triage_infer::{Structurer, StructurerOptions};
use triage_llm::lora::Target;
use triage_llm::qwen2::Qwen2;
use triage_taxonomy::{Taxonomy, Validator};
use triage_train::adapter::{self, TriageMeta, ADAPTER_SCOPE};
use triage_train::optim::AdamWConfig;
use triage_train::trainer::{Objective, Observer, StepReport, TrainConfig, Trainer};

struct Quiet(Vec<f64>);
impl Observer for Quiet {
    fn step(&mut self, r: &StepReport) {
        self.0.push(r.loss);
    }
    fn message(&mut self, _: &str) {}
}

fn labels(s: &Structurer, text: &str) -> Vec<String> {
    let t = s.structure(text).unwrap().ticket;
    t.fields().map(|(_, v)| v.to_owned()).collect()
}

#[test]
fn a_tiny_model_overfits_eight_examples_and_inference_reproduces_the_labels() {
    let gguf = gguf();
    let vocab = triage_llm::qwen2::Config::from_gguf(&gguf).unwrap().vocab_size;
    let cfg = tiny(vocab);
    let model = Arc::new(Qwen2::random(&cfg, 11, &common::device()).unwrap());
    let taxonomy = Taxonomy::from_toml_str(TAXONOMY, "overfit-test").unwrap();
    let validator = Validator::new(&taxonomy);
    let opts = StructurerOptions {
        prefix_cache_dir: None,
        ..StructurerOptions::default()
    };
    let base = Structurer::with_model(model.clone(), &gguf, taxonomy.clone(), opts).unwrap();
    let data = examples(&validator);
    let taught: Vec<Vec<String>> = data
        .iter()
        .map(|e| e.ticket.fields().map(|(_, v)| v.to_owned()).collect())
        .collect();
    let before: Vec<Vec<String>> = data.iter().map(|e| labels(&base, &e.text)).collect();
    let already = before.iter().zip(&taught).filter(|(a, b)| a == b).count();
    assert!(
        already <= 2,
        "the random base model already produces {already} of the taught label sets: {before:?}"
    );

    let run_dir = std::env::temp_dir().join(format!("triage-overfit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let config = TrainConfig {
        rank: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        optimizer: AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
        steps: 90,
        warmup_steps: 5,
        batch_size: 4,
        grad_accum: 2,
        max_grad_norm: 1.0,
        seed: 5,
        eval_every: 0,
        accuracy_every: 0,
        accuracy_samples: 0,
        checkpoint_every: 0,
        max_tokens: 256,
        vary_instructions: false,
        // The default path: the adapter on the top layer only (layer 0's output computed once),
        // the loss on the decisions, dense weight copies, per-layer recomputation, chunked head.
        checkpointing: true,
        head_chunk: 8,
        top_layers: 1,
        objective: Objective::Decisions,
        // Full weight on the summary: at inference the decisions follow the summary the model
        // writes itself, and a random model must learn to write the taught one.
        summary_weight: 1.0,
        dense_weights: true,
        composed_ops: false,
    };
    let mut trainer = Trainer::new(&base, &gguf, config, &data, &data, &run_dir, false).unwrap();
    let mut obs = Quiet(Vec::new());
    let summary = trainer.run(&AtomicBool::new(false), &mut obs).unwrap();
    let first = obs.0[..3].iter().sum::<f64>() / 3.0;
    let last = obs.0[obs.0.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        first / last >= 5.0,
        "loss fell only {first:.3} -> {last:.3}: {:?}",
        obs.0
    );
    assert!(
        summary.val_loss_after.unwrap() < summary.val_loss_before.unwrap() / 5.0,
        "{summary:?}"
    );

    // Save and reload in the PEFT layout, then infer with the reloaded adapter.
    let dir = run_dir.join("adapter");
    let meta = TriageMeta {
        format: 1,
        taxonomy: taxonomy.name.clone(),
        taxonomy_hash: taxonomy.content_hash(),
        base_model_sha256: "0".repeat(64),
        base_model_file: "tiny-random".into(),
        prompt_version: triage_infer::PROMPT_VERSION,
        scope: ADAPTER_SCOPE.into(),
        metrics: serde_json::to_value(&summary).unwrap(),
        data: Vec::new(),
    };
    adapter::save(&dir, &trainer.lora, "tiny-random", &meta).unwrap();
    let loaded = adapter::load(&dir, &cfg, &common::device()).unwrap();
    adapter::check_compatible(&loaded.meta, &taxonomy, None, &dir).unwrap();
    assert_eq!(
        common::max_abs_diff(&trainer.lora, &loaded.lora),
        0.0,
        "the reloaded adapter differs from the trained one"
    );
    let tuned = Structurer::with_model(model, &gguf, taxonomy.clone(), base.options().clone())
        .unwrap()
        .with_adapter(Arc::new(loaded.lora));
    let after: Vec<Vec<String>> = data.iter().map(|e| labels(&tuned, &e.text)).collect();
    let learned = after.iter().zip(&taught).filter(|(a, b)| a == b).count();
    assert_eq!(learned, 8, "taught {taught:?}\ngot {after:?}");

    // An adapter for another taxonomy is refused with a clear message.
    let other = Taxonomy::builtin_default();
    let err = adapter::check_compatible(&loaded.meta, &other, None, &dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("taxonomy"), "{err}");

    // Independent reader: Python with only the standard library parses the safetensors header.
    // From the source tree it was built in, else from the working directory (a test binary
    // built on another machine and run from the repository root there: docs/gpu.sh).
    let script = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/check_peft.py"),
        PathBuf::from("tests/fixtures/check_peft.py"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("tests/fixtures/check_peft.py not found");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("python3 is needed for this test");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("ok: 14 tensors"), "{report}");
    std::fs::remove_dir_all(&run_dir).unwrap();
}
