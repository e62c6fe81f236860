//! An evaluation stopped half-way (Ctrl-C) keeps what it decoded in its journal, and a rerun
//! with the journal decodes only the rest and gives the same predictions as one whole run.

use std::sync::atomic::{AtomicUsize, Ordering};

use triage_data::synth::{generate, Balance, Seeds, SynthOptions};
use triage_data::Example;
use triage_eval::journal::Journal;
use triage_eval::run::{journal_ids, run_llm, RunError, SystemRun};
use triage_infer::{InferError, Structured, TicketEngine};
use triage_taxonomy::{Taxonomy, Validator};

/// Refuses every incident after 20 ms (an error outcome is a prediction too, journaled like
/// any answer) and counts the calls; after its first `up` calls, it reports the backend
/// unreachable instead (an outage, which is not an answer).
struct Counting {
    taxonomy: Taxonomy,
    calls: AtomicUsize,
    up: usize,
}

impl TicketEngine for Counting {
    fn taxonomy(&self) -> &Taxonomy {
        &self.taxonomy
    }
    fn structure_until(&self, text: &str, _: Option<std::time::Instant>) -> Result<Structured, InferError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        match call < self.up {
            true => Err(InferError::Prompt(format!("{} characters", text.len()))),
            false => Err(InferError::Remote {
                url: "http://127.0.0.1:9/v1/chat/completions".into(),
                reason: "connection refused".into(),
                retryable: true,
            }),
        }
    }
}

fn examples(taxonomy: &Taxonomy) -> Vec<Example> {
    let validator = Validator::new(taxonomy);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let seeds = Seeds::load(&Seeds::default_dir(&root, taxonomy), taxonomy).unwrap();
    let opts = SynthOptions {
        n: 12,
        langs: vec!["en".into()],
        seed: 3,
        balance: Balance::Uniform,
        near_dup_threshold: 0.8,
        injections: 0.0,
    };
    generate(&seeds, &validator, &opts).unwrap().examples
}

/// A fresh temporary folder named after `test`, the journal path in it, and a counting engine.
fn setup(test: &str, taxonomy: &Taxonomy) -> (std::path::PathBuf, std::path::PathBuf, Counting) {
    let dir = std::env::temp_dir().join(format!("triage-eval-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("journal-zero-shot.jsonl");
    let engine = Counting {
        taxonomy: taxonomy.clone(),
        calls: AtomicUsize::new(0),
        up: usize::MAX,
    };
    (dir, path, engine)
}

#[test]
fn an_interrupted_run_resumes_from_its_journal() {
    let taxonomy = Taxonomy::builtin_default();
    let examples = examples(&taxonomy);
    let ids = journal_ids(&examples);
    let (dir, path, engine) = setup("resume", &taxonomy);

    // Stopped once 5 examples are done: the one already started still finishes and is kept.
    let (j, kept) = Journal::open(&path, "key", &ids, true).unwrap();
    assert!(kept.is_empty());
    let done = AtomicUsize::new(0);
    let stop = || done.load(Ordering::SeqCst) >= 5;
    let err = run_llm(
        "zero-shot",
        &engine,
        &examples,
        1,
        Some((j, kept)),
        &stop,
        &mut |i| done.store(i, Ordering::SeqCst),
    )
    .unwrap_err();
    let RunError::Interrupted {
        done: first,
        total: 12,
        ..
    } = err
    else {
        panic!("{err}")
    };
    assert!((5..12).contains(&first), "{first}");
    assert_eq!(engine.calls.load(Ordering::SeqCst), first);

    // Resumed: only the others are decoded.
    let (j, kept) = Journal::open(&path, "key", &ids, true).unwrap();
    assert_eq!(kept.len(), first);
    let resumed = run_llm(
        "zero-shot",
        &engine,
        &examples,
        2,
        Some((j, kept)),
        &|| false,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(engine.calls.load(Ordering::SeqCst), 12);

    // The same predictions as a whole run without a journal (latencies aside).
    let whole = run_llm("zero-shot", &engine, &examples, 2, None, &|| false, &mut |_| {}).unwrap();
    let strip = |r: &SystemRun| {
        r.predictions
            .iter()
            .map(|p| (p.id.clone(), p.gold.clone(), p.error.clone(), p.valid))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&resumed), strip(&whole));
    assert_eq!(resumed.predictions.len(), 12);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `examples` through `engine` with the journal at `path` (resumed) and returns the run.
fn journaled(engine: &Counting, examples: &[Example], path: &std::path::Path) -> SystemRun {
    let ids = journal_ids(examples);
    let resume = Journal::open(path, "key", &ids, true).unwrap();
    run_llm(
        "zero-shot",
        engine,
        examples,
        2,
        Some(resume),
        &|| false,
        &mut |_| {},
    )
    .unwrap()
}

#[test]
fn a_grown_or_relabelled_file_decodes_only_new_texts() {
    let taxonomy = Taxonomy::builtin_default();
    let mut examples = examples(&taxonomy);
    let (dir, path, engine) = setup("grown", &taxonomy);
    let calls = || engine.calls.load(Ordering::SeqCst);
    journaled(&engine, &examples, &path);
    assert_eq!(calls(), 12);

    // A label corrected and two examples appended: only the two are decoded, and the kept
    // record is scored against the corrected label.
    let other = (0..12)
        .find(|&j| examples[j].ticket.get("subcategory") != examples[3].ticket.get("subcategory"))
        .unwrap();
    examples[3].ticket = examples[other].ticket.clone();
    let after = examples[3].ticket.get("subcategory").unwrap().to_owned();
    for k in 0..2 {
        let mut e = examples[k].clone();
        e.id = format!("appended-{k}");
        e.text = format!("{} (appended {k})", e.text);
        examples.push(e);
    }
    let run = journaled(&engine, &examples, &path);
    assert_eq!(calls(), 14);
    assert_eq!(run.predictions.len(), 14);
    assert_eq!(run.predictions[3].gold_value("subcategory"), Some(after.as_str()));

    // A text edited in the middle: the examples from it on are decoded again.
    examples[7].text.push_str(" It started again this morning.");
    journaled(&engine, &examples, &path);
    assert_eq!(calls(), 14 + 7);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend outage is not the system's answer: the examples it failed still count as failed
/// in that run, but they are not journaled, so a resumed run decodes them again.
#[test]
fn examples_failed_by_an_outage_are_decoded_again_on_resume() {
    let taxonomy = Taxonomy::builtin_default();
    let examples = examples(&taxonomy);
    let ids = journal_ids(&examples);
    let (dir, path, mut down) = setup("outage", &taxonomy);
    down.up = 7;
    let run = run_llm(
        "zero-shot",
        &down,
        &examples,
        1,
        Some(Journal::open(&path, "key", &ids, true).unwrap()),
        &|| false,
        &mut |_| {},
    )
    .unwrap();
    let outage = |r: &SystemRun| {
        r.predictions
            .iter()
            .filter(|p| p.error.as_deref().is_some_and(|e| e.contains("refused")))
            .count()
    };
    assert_eq!(outage(&run), 5);
    let (j, kept) = Journal::open::<triage_eval::run::Prediction>(&path, "key", &ids, true).unwrap();
    assert_eq!(kept.len(), 7, "the outage's failures were journaled");
    // The backend is back.
    let mut up = down;
    up.up = usize::MAX;
    up.calls = AtomicUsize::new(0);
    let resumed = run_llm(
        "zero-shot",
        &up,
        &examples,
        1,
        Some((j, kept)),
        &|| false,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(up.calls.load(Ordering::SeqCst), 5);
    assert_eq!(outage(&resumed), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
