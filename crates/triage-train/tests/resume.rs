//! `--resume` continues exactly: four steps in one go give the same adapter, bit for bit, as
//! two steps, an interruption (checkpoint), and two resumed steps — same optimizer moments,
//! same data order, same dropout masks. Also when the stop comes between the micro-batches of
//! a step, before the first step, or after the last; a resume over other data is refused.

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

/// Raises the flag after micro-batch `.1` of step `.0`: Ctrl-C in the middle of a step.
struct StopInStep<'a>(usize, usize, &'a AtomicBool);
impl Observer for StopInStep<'_> {
    fn step(&mut self, _: &StepReport) {}
    fn message(&mut self, _: &str) {}
    fn micro_batch(&mut self, step: usize, micro: usize) {
        if (step, micro) == (self.0, self.1) {
            self.2.store(true, Ordering::SeqCst);
        }
    }
}

fn config() -> TrainConfig {
    TrainConfig {
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
    }
}

/// The random tiny model (`layers` layers) as a base structurer, with the taught examples.
fn setup(layers: usize) -> (triage_llm::GgufFile, Structurer, Vec<triage_data::Example>) {
    let gguf = gguf();
    let vocab = triage_llm::qwen2::Config::from_gguf(&gguf).unwrap().vocab_size;
    let cfg = triage_llm::qwen2::Config {
        num_layers: layers,
        ..tiny(vocab)
    };
    let model = Arc::new(Qwen2::random(&cfg, 3, &common::device()).unwrap());
    let taxonomy = Taxonomy::from_toml_str(TAXONOMY, "resume-test").unwrap();
    let data = examples(&Validator::new(&taxonomy));
    let opts = StructurerOptions {
        prefix_cache_dir: None,
        ..StructurerOptions::default()
    };
    let base = Structurer::with_model(model, &gguf, taxonomy, opts).unwrap();
    (gguf, base, data)
}

fn temp_root(name: &str) -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!("triage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    root
}

/// `metrics.jsonl`'s records as (step, keys).
fn log_records(dir: &std::path::Path) -> Vec<(u64, Vec<String>)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("whole JSON lines");
            let keys = v.as_object().unwrap().keys().cloned().collect();
            (v["step"].as_u64().unwrap(), keys)
        })
        .collect()
}

#[test]
fn a_stop_between_micro_batches_resumes_to_the_same_adapter() {
    let (gguf, base, data) = setup(2);
    // Validation data: the run evaluates before training, so a stop in the first step
    // checkpoints step 0 with that evaluation done.
    let val = &data[..2];
    let root = temp_root("resume-micro");
    let never = AtomicBool::new(false);
    let mut straight = Trainer::new(&base, &gguf, config(), &data, val, &root.join("a"), false).unwrap();
    straight.run(&never, &mut StopAt(usize::MAX, &never)).unwrap();
    // Stopped after the first micro-batch of step 1 (nothing done yet), then after the
    // first micro-batch of step 3: the partial steps' batches must be trained on resume.
    let dir = root.join("b");
    for (step, done) in [(1, 0), (3, 2)] {
        let stop = AtomicBool::new(false);
        let mut t = Trainer::new(&base, &gguf, config(), &data, val, &dir, done > 0).unwrap();
        match t.run(&stop, &mut StopInStep(step, 0, &stop)) {
            Err(TrainError::Interrupted(s)) => assert_eq!(s, done),
            other => panic!("expected an interruption, got {:?}", other.map(|s| s.steps)),
        }
    }
    let mut resumed = Trainer::new(&base, &gguf, config(), &data, val, &dir, true).unwrap();
    let again = AtomicBool::new(false);
    resumed.run(&again, &mut StopAt(usize::MAX, &again)).unwrap();
    assert_eq!(
        common::max_abs_diff(&straight.lora, &resumed.lora),
        0.0,
        "an adapter resumed from a stop inside a step differs from the uninterrupted one"
    );
    // The evaluation before training is recorded once, as in the uninterrupted run.
    assert_eq!(straight.state(), resumed.state());
    assert_eq!(log_records(&root.join("a")), log_records(&dir));

    // Resuming the finished run repeats nothing: same summary, same state, same log.
    let log_before = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut done = Trainer::new(&base, &gguf, config(), &data, val, &dir, true).unwrap();
    let summary = done.run(&again, &mut StopAt(usize::MAX, &again)).unwrap();
    assert_eq!(summary.steps, 4);
    assert_eq!(
        summary.val_loss_after,
        straight.state().val_loss.last().map(|v| v.1)
    );
    assert_eq!(done.state(), straight.state());
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
        log_before
    );

    // Other training data under the same checkpoint is refused, naming the checkpoint.
    match Trainer::new(&base, &gguf, config(), &data[1..], val, &dir, true) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("state.json") && msg.contains("other training"),
                "{msg}"
            );
        }
        Ok(_) => panic!("a resume over other training data was accepted"),
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn examples_with_the_same_tokens_share_their_frozen_features() {
    // Three layers, the adapter on the top one: the features pass runs two layers, each
    // reading the previous layer's files, which a duplicate must not find deleted.
    let (gguf, base, data) = setup(3);
    let twice: Vec<_> = data.iter().chain(&data[..2]).cloned().collect();
    let root = temp_root("features-dup");
    let config = TrainConfig {
        vary_instructions: false,
        steps: 1,
        ..config()
    };
    let mut t = Trainer::new(&base, &gguf, config, &twice, &data[..1], &root, false).unwrap();
    let never = AtomicBool::new(false);
    let summary = t.run(&never, &mut StopAt(usize::MAX, &never)).unwrap();
    assert_eq!(summary.steps, 1);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn an_interrupted_run_resumes_to_the_same_adapter() {
    let (gguf, base, data) = setup(2);
    let config = config();
    let root = temp_root("resume");

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
    assert_eq!(
        log_records(&root.join("a")),
        log_records(&root.join("b")),
        "the resumed log repeats or misses steps"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// One run per folder: a second lock on it is refused, naming the folder, until the first is
/// released (as when its process ends).
#[test]
fn a_run_folder_holds_one_run_at_a_time() {
    let dir = temp_root("lock").join("run");
    let first = triage_train::trainer::lock_run_dir(&dir).unwrap();
    let e = triage_train::trainer::lock_run_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains("another run is using this run folder") && e.contains(&dir.display().to_string()),
        "{e}"
    );
    drop(first);
    drop(triage_train::trainer::lock_run_dir(&dir).expect("released with its holder"));
}
