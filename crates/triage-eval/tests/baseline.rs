//! The TF-IDF baseline on a leakage-free split of the synthetic data: well above the
//! majority class on held-out scenarios, and its metrics agree with a direct recount.

use std::path::Path;

use triage_data::split::{assign_splits, Ratios, SplitBy, SplitOptions};
use triage_data::synth::{generate, Balance, Seeds, SynthOptions};
use triage_data::Split;
use triage_eval::baseline::Baseline;
use triage_eval::metrics::field_report;
use triage_taxonomy::{Taxonomy, Validator};

#[test]
fn tfidf_baseline_beats_the_majority_class_on_unseen_scenarios() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let seeds = Seeds::load(&Seeds::default_dir(&root, &taxonomy), &taxonomy).unwrap();
    let opts = SynthOptions {
        n: 1500,
        langs: ["en", "es", "de", "fr", "pt"].map(String::from).to_vec(),
        seed: 21,
        balance: Balance::Uniform,
        near_dup_threshold: 0.8,
        injections: 0.0,
    };
    let mut examples = generate(&seeds, &validator, &opts).unwrap().examples;
    assign_splits(
        &mut examples,
        &SplitOptions {
            by: SplitBy::Template,
            ratios: Ratios([80, 0, 20]),
            seed: 1,
            near_dup_threshold: 0.8,
            stratify: Some("category".into()),
        },
    )
    .unwrap();
    let (train, test): (Vec<_>, Vec<_>) = examples.iter().partition(|e| e.split == Some(Split::Train));
    let field = taxonomy.field("category").unwrap();
    let classes: Vec<&str> = field.value_names().collect();
    let texts: Vec<&str> = train.iter().map(|e| e.text.as_str()).collect();
    let labels: Vec<Vec<&str>> = train
        .iter()
        .map(|e| vec![e.ticket.get("category").unwrap()])
        .collect();
    let b = Baseline::fit(&texts, &[("category", classes.clone())], &labels, 5);
    let model = &b.fields[0].1;
    let gold: Vec<&str> = test.iter().map(|e| e.ticket.get("category").unwrap()).collect();
    let pred: Vec<String> = test
        .iter()
        .map(|e| model.predict(&b.tfidf.transform(&e.text), None).0)
        .collect();
    let pred_ref: Vec<&str> = pred.iter().map(String::as_str).collect();
    let r = field_report("category", &classes, &gold, &pred_ref);
    let recount = gold.iter().zip(&pred_ref).filter(|(g, p)| g == p).count() as f64 / gold.len() as f64;
    assert!((r.accuracy - recount).abs() < 1e-12);
    let majority = classes
        .iter()
        .map(|c| gold.iter().filter(|g| *g == c).count())
        .max()
        .unwrap() as f64
        / gold.len() as f64;
    assert!(
        r.accuracy > majority + 0.2,
        "accuracy {:.3} vs majority {majority:.3}",
        r.accuracy
    );
    eprintln!(
        "category on unseen scenarios: accuracy {:.3}, macro-F1 {:.3} (majority {majority:.3})",
        r.accuracy, r.macro_f1
    );
}
