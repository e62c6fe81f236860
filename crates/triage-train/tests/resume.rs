//! `--resume` continues exactly: four steps in one go give the same adapter, bit for bit, as
//! two steps, an interruption (checkpoint), and two resumed steps — same optimizer moments,
//! same data order, same dropout masks.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{examples, gguf, tiny, TAXONOMY};
use triage_infer::{Structurer, StructurerOptions};
use triage_llm::lora::Target;
use triage_llm::qwen2::Qwen2;
use triage_taxonomy::{Taxonomy, Validator};
use triage_train::optim::AdamWConfig;
use triage_train::trainer::{Objective, Observer, StepReport, TrainConfig, Trainer};
use triage_train::TrainError;

/// Stops the run after `at` steps by raising the flag, as Ctrl-C does.
struct StopAt<'a>(usize, &'a AtomicBool);
impl Observer for StopAt<'_> {
    fn step(&mut self, r: &StepReport) {
        if r.step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
    fn message(&mut self, _: &str) {}
}

#[test]
fn an_interrupted_run_resumes_to_the_same_adapter() {
    let gguf = gguf();
    let vocab = triage_llm::qwen2::Config::from_gguf(&gguf).unwrap().vocab_size;
    let model = Arc::new(Qwen2::random(&tiny(vocab), 3, &common::device()).unwrap());
    let taxonomy = Taxonomy::from_toml_str(TAXONOMY, "resume-test").unwrap();
    let data = examples(&Validator::new(&taxonomy));
    let opts = StructurerOptions {
        prefix_cache_dir: None,
        ..StructurerOptions::default()
    };
    let base = Structurer::with_model(model, &gguf, taxonomy, opts).unwrap();
    let config = TrainConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: vec![Target::Q, Target::V, Target::Down],
        optimizer: AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
        steps: 4,
        warmup_steps: 1,
        batch_size: 3,
        grad_accum: 2,
        max_grad_norm: 1.0,
        seed: 9,
        eval_every: 0,
        accuracy_every: 0,
        accuracy_samples: 0,
        checkpoint_every: 0,
        max_tokens: 256,
        vary_instructions: true,
        checkpointing: false, // the whole-graph path (overfit.rs covers recomputation)
        head_chunk: 32,
        // Layer 0's output computed once and kept in each run directory: the resumed run
        // reads it back from disk.
        top_layers: 1,
        objective: Objective::Decisions,
        summary_weight: 0.3,
        dense_weights: false,
        composed_ops: false,
    };
    let root = std::env::temp_dir().join(format!("triage-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);

    let never = AtomicBool::new(false);
    let mut straight =
        Trainer::new(&base, &gguf, config.clone(), &data, &[], &root.join("a"), false).unwrap();
    straight.run(&never, &mut StopAt(usize::MAX, &never)).unwrap();

    let stop = AtomicBool::new(false);
    let mut first = Trainer::new(&base, &gguf, config.clone(), &data, &[], &root.join("b"), false).unwrap();
    match first.run(&stop, &mut StopAt(2, &stop)) {
        Err(TrainError::Interrupted(2)) => {}
        other => panic!(
            "expected an interruption at step 2, got {:?}",
            other.map(|s| s.steps)
        ),
    }
    // A process killed after logging step 3 but before checkpointing it, mid-way through a
    // line: the resumed run drops both, so its log reads as the uninterrupted run's.
    let log_b = root.join("b").join("metrics.jsonl");
    let mut torn = std::fs::read_to_string(&log_b).unwrap();
    torn.push_str("{\"step\":3,\"steps\":4,\"loss\":9.9}\n{\"step\":4,\"lo");
    std::fs::write(&log_b, torn).unwrap();
    // The resumed run reads its configuration from the checkpoint (a different one passed
    // here is ignored).
    let other_config = TrainConfig { seed: 1234, ..config };
    let mut resumed = Trainer::new(&base, &gguf, other_config, &data, &[], &root.join("b"), true).unwrap();
    assert_eq!(resumed.state().step, 2);
    let again = AtomicBool::new(false);
    let summary = resumed.run(&again, &mut StopAt(usize::MAX, &again)).unwrap();
    assert_eq!(summary.steps, 4);

    assert_eq!(
        common::max_abs_diff(&straight.lora, &resumed.lora),
        0.0,
        "resumed adapter differs from the uninterrupted one"
    );
    assert_eq!(straight.state().train_loss, resumed.state().train_loss);
    let steps = |run: &str| -> Vec<(u64, Vec<String>)> {
        std::fs::read_to_string(root.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("whole JSON lines");
                let keys = v.as_object().unwrap().keys().cloned().collect();
                (v["step"].as_u64().unwrap(), keys)
            })
            .collect()
    };
    assert_eq!(steps("a"), steps("b"), "the resumed log repeats or misses steps");
    std::fs::remove_dir_all(&root).unwrap();
}
