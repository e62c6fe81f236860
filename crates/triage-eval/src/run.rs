//! Running systems over a labelled set.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use triage_data::Example;
use triage_infer::{InferError, Structured, TicketEngine};
use triage_taxonomy::Taxonomy;

use crate::baseline::Baseline;
use crate::journal::{Journal, JournalError};

/// Why a run over the examples stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Its journal could not be written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Stopped on request (Ctrl-C); the journal keeps what was decoded.
    #[error("interrupted after {done} of {total} examples; they are kept in {journal}: rerun with --resume to continue")]
    Interrupted {
        /// Examples decoded, those resumed included.
        done: usize,
        /// Examples in the run.
        total: usize,
        /// The journal that keeps them.
        journal: String,
    },
}

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
    /// The confidence is `None` where the system gave none (an OpenAI-compatible server
    /// without log-probabilities): unknown, never counted as sure.
    pub predicted: Vec<(String, String, Option<f64>)>,
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

/// `(field, gold value)` of `e`, in taxonomy order.
pub(crate) fn gold(taxonomy: &Taxonomy, e: &Example) -> Vec<(String, String)> {
    taxonomy
        .fields
        .iter()
        .map(|f| (f.name.clone(), e.ticket.get(&f.name).unwrap_or("").to_owned()))
        .collect()
}

/// A journal with the records it already holds (see [`Journal::open`]).
pub type Resume<T = Prediction> = (Journal, Vec<T>);

/// An example's entry in a journal: its id and a fingerprint of its text. A record stands for
/// the text it was decoded from, so a journal opened with these ids keeps it when the data
/// file grows or its labels change, and not when the text changed.
pub fn journal_id(e: &Example) -> String {
    format!(
        "{}#{:016x}",
        e.id,
        triage_data::rng::stable_hash(e.text.as_bytes())
    )
}

/// [`journal_id`] of every example, in order: the ids to open their journal with.
pub fn journal_ids(examples: &[Example]) -> Vec<String> {
    examples.iter().map(journal_id).collect()
}

/// Decodes every example with `engine`, `concurrency` examples at a time (sharing forward
/// passes), turns each outcome into a record with `record` (given the example and its wall
/// time in milliseconds, waits for the shared passes included), and returns the records in
/// example order.
///
/// With `resume` (a journal opened with [`journal_ids`]), the journal's records stand for the
/// first examples and every new one is appended to it as it is made, up to the first failure
/// that says nothing of the system ([`transient`]: a server, deadline or model error): that
/// example still counts as failed in this run, but it and the ones after it are left out of
/// the journal, so `--resume` decodes them again instead of keeping an outage as wrong answers. `stop` is polled after
/// each example (Ctrl-C): once it says so, no new example starts, those already started are
/// still recorded, and the run is [`RunError::Interrupted`]. `progress` gets the number of
/// examples done, resumed ones included.
pub fn decode_journaled<T: Serialize>(
    engine: &dyn TicketEngine,
    examples: &[Example],
    concurrency: usize,
    resume: Option<Resume<T>>,
    stop: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize),
    mut record: impl FnMut(&Example, Result<Structured, InferError>, f64) -> T,
) -> Result<Vec<T>, RunError> {
    let (mut journal, mut records) = match resume {
        Some((j, kept)) => (Some(j), kept),
        None => (None, Vec::new()),
    };
    records.truncate(examples.len());
    let start = records.len();
    records.reserve(examples.len() - start);
    progress(start);
    let mut failure: Option<JournalError> = None;
    let mut transients = 0usize;
    let todo = &examples[start..];
    triage_infer::for_each_concurrently(
        todo.len(),
        concurrency,
        |i| {
            let t = Instant::now();
            let out = engine.structure(&todo[i].text);
            (out, t.elapsed().as_secs_f64() * 1000.0)
        },
        |i, (out, latency_ms)| {
            let e = &todo[i];
            if out.as_ref().err().is_some_and(transient) {
                transients += 1;
            }
            let r = record(e, out, latency_ms);
            if let Some(j) = journal.as_mut().filter(|_| transients == 0) {
                if let Err(err) = j.append(&journal_id(e), &r) {
                    failure.get_or_insert(err);
                }
            }
            records.push(r);
            progress(start + i + 1);
            failure.is_none() && !stop()
        },
    );
    if let Some(err) = failure {
        return Err(err.into());
    }
    if let (Some(j), true) = (&journal, transients > 0) {
        tracing::warn!(
            "{transients} examples failed with a server, deadline or model error; they and the \
             examples after the first are not kept in {}: they are decoded again when it is \
             reopened (eval --resume, or adapter calibrate started again)",
            j.path().display()
        );
    }
    if records.len() < examples.len() {
        return Err(RunError::Interrupted {
            done: records.len(),
            total: examples.len(),
            journal: journal.map_or_else(|| "no journal".to_owned(), |j| j.path().display().to_string()),
        });
    }
    Ok(records)
}

/// Whether a decoding error says nothing about the system's answer for the example: the
/// backend was unreachable, cut the answer off or answered 429 or 5xx, or the deadline passed.
/// Such an example is decoded again by a resumed run. Failures that would repeat on the same
/// input (a refused request, an answer that is not a ticket, a model error: an input over the
/// budget, a device out of memory on the longest input) are the system's answer.
pub fn transient(e: &InferError) -> bool {
    matches!(
        e,
        InferError::Remote { retryable: true, .. } | InferError::Deadline { .. }
    )
}

/// Runs the real inference path (constrained decoding) on every example, `concurrency`
/// examples at a time (sharing forward passes; the tickets are the same as one at a time).
/// Latency is each ticket's wall time, waits for the shared passes included. `resume`,
/// `stop` and `progress` are [`decode_journaled`]'s.
pub fn run_llm(
    name: &str,
    structurer: &dyn TicketEngine,
    examples: &[Example],
    concurrency: usize,
    resume: Option<Resume>,
    stop: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize),
) -> Result<SystemRun, RunError> {
    let taxonomy = structurer.taxonomy();
    // A kept record was decoded from the same text; its labels and language are the data's
    // as they are now (a relabelled file keeps its decoded tickets).
    let resume = resume.map(|(j, mut kept)| {
        for (p, e) in kept.iter_mut().zip(examples) {
            p.gold = gold(taxonomy, e);
            p.lang.clone_from(&e.lang);
        }
        (j, kept)
    });
    let predictions = decode_journaled(
        structurer,
        examples,
        concurrency,
        resume,
        stop,
        progress,
        |e, out, latency_ms| {
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
                                .map(|c| c.confidence as f64);
                            (f.name.clone(), v, c)
                        })
                        .collect();
                    (predicted, true, None)
                }
                Err(err) => (Vec::new(), false, Some(err.to_string())),
            };
            Prediction {
                id: e.id.clone(),
                lang: e.lang.clone(),
                gold: gold(taxonomy, e),
                predicted,
                valid,
                error,
                latency_ms,
            }
        },
    )?;
    Ok(SystemRun {
        name: name.to_owned(),
        predictions,
    })
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
            let mut predicted: Vec<(String, String, Option<f64>)> = Vec::new();
            for (f, (_, model)) in taxonomy.fields.iter().zip(&baseline.fields) {
                let allowed: Option<Vec<&str>> = f.dependency.as_ref().and_then(|d| {
                    let parent = predicted.iter().find(|(n, _, _)| *n == d.parent)?.1.clone();
                    f.allowed_under(&parent)
                        .map(|vs| vs.iter().map(|v| v.name.as_str()).collect())
                });
                let (v, p) = model.predict(&x, allowed.as_deref());
                predicted.push((f.name.clone(), v, Some(p)));
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
