//! Running systems over a labelled set.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use triage_data::Example;
use triage_infer::{InferError, Structured, TicketEngine};
use triage_taxonomy::Taxonomy;

use crate::baseline::Baseline;

/// One example's outcome under one system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Example id.
    pub id: String,
    /// Example language.
    pub lang: String,
    /// `(field, gold value)` in taxonomy order.
    pub gold: Vec<(String, String)>,
    /// `(field, predicted value, confidence)`; empty when the system failed on the example.
    pub predicted: Vec<(String, String, f64)>,
    /// Whether the output validated against the taxonomy's schema.
    pub valid: bool,
    /// Why the system failed, if it did.
    pub error: Option<String>,
    /// Wall time for this example, in milliseconds.
    pub latency_ms: f64,
}

impl Prediction {
    /// The predicted value of `field`, if any.
    pub fn value(&self, field: &str) -> Option<&str> {
        self.predicted
            .iter()
            .find(|(f, _, _)| f == field)
            .map(|(_, v, _)| v.as_str())
    }

    /// The gold value of `field`.
    pub fn gold_value(&self, field: &str) -> Option<&str> {
        self.gold
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v.as_str())
    }
}

/// All predictions of one system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemRun {
    /// Name shown in reports (`tfidf-baseline`, `zero-shot`, `adapter`).
    pub name: String,
    /// In example order.
    pub predictions: Vec<Prediction>,
}

fn gold(taxonomy: &Taxonomy, e: &Example) -> Vec<(String, String)> {
    taxonomy
        .fields
        .iter()
        .map(|f| (f.name.clone(), e.ticket.get(&f.name).unwrap_or("").to_owned()))
        .collect()
}

/// Decodes every example with `engine`, `concurrency` examples at a time (sharing forward
/// passes), and hands each outcome to `done` in example order, with its wall time in
/// milliseconds (waits for the shared passes included).
pub fn decode_each(
    engine: &dyn TicketEngine,
    examples: &[Example],
    concurrency: usize,
    mut done: impl FnMut(usize, Result<Structured, InferError>, f64),
) {
    triage_infer::for_each_concurrently(
        examples.len(),
        concurrency,
        |i| {
            let t = Instant::now();
            let out = engine.structure(&examples[i].text);
            (out, t.elapsed().as_secs_f64() * 1000.0)
        },
        |i, (out, latency_ms)| {
            done(i, out, latency_ms);
            true
        },
    );
}

/// Runs the real inference path (constrained decoding) on every example, `concurrency`
/// examples at a time (sharing forward passes; the tickets are the same as one at a time).
/// Latency is each ticket's wall time, waits for the shared passes included.
pub fn run_llm(
    name: &str,
    structurer: &dyn TicketEngine,
    examples: &[Example],
    concurrency: usize,
    progress: &mut dyn FnMut(usize),
) -> SystemRun {
    let taxonomy = structurer.taxonomy();
    let mut predictions = Vec::with_capacity(examples.len());
    decode_each(structurer, examples, concurrency, |i, out, latency_ms| {
        let e = &examples[i];
        let (predicted, valid, error) = match out {
            Ok(s) => {
                let predicted = taxonomy
                    .fields
                    .iter()
                    .map(|f| {
                        let v = s.ticket.get(&f.name).unwrap_or("").to_owned();
                        let c = s
                            .meta
                            .confidence
                            .iter()
                            .find(|c| c.field == f.name)
                            .map_or(1.0, |c| c.confidence as f64);
                        (f.name.clone(), v, c)
                    })
                    .collect();
                (predicted, true, None)
            }
            Err(err) => (Vec::new(), false, Some(err.to_string())),
        };
        predictions.push(Prediction {
            id: e.id.clone(),
            lang: e.lang.clone(),
            gold: gold(taxonomy, e),
            predicted,
            valid,
            error,
            latency_ms,
        });
        progress(i + 1);
    });
    SystemRun {
        name: name.to_owned(),
        predictions,
    }
}

/// Fits the TF-IDF baseline on `train` and predicts `test`. A dependent field (subcategory)
/// is predicted among the values allowed under the predicted parent, so its tickets stay
/// valid; `valid` is still checked against the schema.
pub fn run_baseline(taxonomy: &Taxonomy, train: &[Example], test: &[Example], seed: u64) -> SystemRun {
    let validator = triage_taxonomy::Validator::new(taxonomy);
    let fields: Vec<(&str, Vec<&str>)> = taxonomy
        .fields
        .iter()
        .map(|f| (f.name.as_str(), f.value_names().collect()))
        .collect();
    let texts: Vec<&str> = train.iter().map(|e| e.text.as_str()).collect();
    let labels: Vec<Vec<&str>> = train
        .iter()
        .map(|e| {
            taxonomy
                .fields
                .iter()
                .map(|f| e.ticket.get(&f.name).unwrap_or(""))
                .collect()
        })
        .collect();
    let baseline = Baseline::fit(&texts, &fields, &labels, seed);
    let predictions = test
        .iter()
        .map(|e| {
            let t = Instant::now();
            let x = baseline.tfidf.transform(&e.text);
            let mut predicted: Vec<(String, String, f64)> = Vec::new();
            for (f, (_, model)) in taxonomy.fields.iter().zip(&baseline.fields) {
                let allowed: Option<Vec<&str>> = f.dependency.as_ref().and_then(|d| {
                    let parent = predicted.iter().find(|(n, _, _)| *n == d.parent)?.1.clone();
                    f.allowed_under(&parent)
                        .map(|vs| vs.iter().map(|v| v.name.as_str()).collect())
                });
                let (v, p) = model.predict(&x, allowed.as_deref());
                predicted.push((f.name.clone(), v, p));
            }
            let mut ticket = serde_json::Map::new();
            ticket.insert(
                "summary".into(),
                serde_json::Value::String(e.ticket.summary().to_owned()),
            );
            for (f, v, _) in &predicted {
                ticket.insert(f.clone(), serde_json::Value::String(v.clone()));
            }
            let valid = validator.schema_accepts(&serde_json::Value::Object(ticket));
            Prediction {
                id: e.id.clone(),
                lang: e.lang.clone(),
                gold: gold(taxonomy, e),
                predicted,
                valid,
                error: None,
                latency_ms: t.elapsed().as_secs_f64() * 1000.0,
            }
        })
        .collect();
    SystemRun {
        name: "tfidf-baseline".into(),
        predictions,
    }
}
