//! The synthetic multilingual ticket generator.
//!
//! Driven by the taxonomy and its seed material ([`Seeds`]): every example is one scenario
//! (a concrete situation with the labels it implies, written in each language) told by a
//! particular writer (the affected user, their manager, a technician taking a call) over a
//! particular channel (an e-mail with greeting and signature, a reply above a quoted message,
//! a chat one-liner, a phone note), with slot values (products, error codes, sites, times),
//! optional urgency or "no rush" markers that move the priority, and noise (typos,
//! abbreviations, casing, code-switching into English). The target summary is written for the
//! example: the English summary of the scenario's text variant the example uses (a scenario may
//! give one per variant, so a short chat line is not summarised with details only the detailed
//! text states), with the same slot values and the urgency clause.
//!
//! Output is deterministic for a given seed, seed material and option set. Exact and near
//! duplicates (see [`crate::dedup`]) are regenerated, not kept.

mod compose;
mod seeds;

use std::collections::BTreeMap;
use std::str::FromStr;

use serde_json::{Map, Value};
use triage_taxonomy::Validator;

pub use seeds::{SeedFiles, Seeds};

use crate::dedup::{Duplicate, NearDupIndex};
use crate::rng::Rng;
use crate::{DataError, Example, ValueError};

/// How classes are balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Every leaf class (category × subcategory, or the first field) equally often, and every
    /// language equally often within each class.
    Uniform,
    /// Scenarios drawn by their `weight` (how common they are at a real desk).
    Natural,
}

impl FromStr for Balance {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "uniform" => Ok(Balance::Uniform),
            "natural" => Ok(Balance::Natural),
            other => Err(ValueError {
                what: "unknown balance",
                value: other.to_owned(),
                expected: "use uniform or natural",
            }),
        }
    }
}

/// Generator options.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Number of examples.
    pub n: usize,
    /// Languages to write in (a subset of the seed languages).
    pub langs: Vec<String>,
    /// Seed.
    pub seed: u64,
    /// Class balance.
    pub balance: Balance,
    /// Jaccard similarity from which two texts are near duplicates.
    pub near_dup_threshold: f64,
    /// Share of examples (0 to 1) given a prompt-injection line: an instruction to the model,
    /// from the language's `injections` in `surface.toml`, that names a wrong value of one
    /// field. The labels stay the scenario's: the text of a report is data, never
    /// instructions. 0 leaves every example exactly as without it.
    pub injections: f64,
}

/// The generated examples and what was discarded on the way.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// The examples, ids `synth-<seed>-<index>`, `group` = scenario id.
    pub examples: Vec<Example>,
    /// Candidates discarded as exact duplicates of an earlier example.
    pub exact_duplicates: usize,
    /// Candidates discarded as near duplicates of an earlier example.
    pub near_duplicates: usize,
}

const MAX_ATTEMPTS: u64 = 200;

/// The random stream of example `i`'s injection decision (`[i, INJECTION_STREAM]`; attempts
/// use `[i, 0..MAX_ATTEMPTS]`).
const INJECTION_STREAM: u64 = u64::MAX;

/// `text` with an injection line before or after it: an instruction naming a value of one of
/// `fields` (the enum fields an injection may name) that differs from the ticket's.
fn inject(
    rng: &mut Rng,
    seeds: &Seeds,
    lang: &str,
    fields: &[&triage_taxonomy::Field],
    ticket: &triage_taxonomy::Ticket,
    text: &str,
) -> String {
    let line = rng.pick(&seeds.surface[lang].injections).clone();
    let Some(field) = (!fields.is_empty()).then(|| *rng.pick(fields)) else {
        return text.to_owned();
    };
    let gold = ticket.get(&field.name);
    let wrong: Vec<&str> = field.value_names().filter(|v| Some(*v) != gold).collect();
    let value = rng.pick(&wrong);
    let line = line
        .replace("{field}", &field.name.replace('_', " "))
        .replace("{value}", value);
    match rng.chance(0.5) {
        true => format!("{line}\n\n{text}"),
        false => format!("{text}\n\n{line}"),
    }
}

/// Enum values that no scenario can produce (`(field, value)`), taking urgency and "no rush"
/// markers into account for `priority`.
pub fn unreachable_values(seeds: &Seeds, validator: &Validator) -> Vec<(String, String)> {
    let taxonomy = validator.taxonomy();
    let mut out = Vec::new();
    for f in &taxonomy.fields {
        for v in f.value_names() {
            let reachable = seeds.scenarios.iter().any(|s| {
                let base = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == &f.name)
                    .map(|(_, x)| x.as_str());
                base == Some(v)
                    || (f.name == compose::PRIORITY && compose::priority_reachable(seeds, s, f, v))
            });
            if !reachable {
                out.push((f.name.clone(), v.to_owned()));
            }
        }
    }
    out
}

/// Generates `options.n` examples.
pub fn generate(
    seeds: &Seeds,
    validator: &Validator,
    options: &SynthOptions,
) -> Result<SynthReport, DataError> {
    let taxonomy = validator.taxonomy();
    for l in &options.langs {
        if !seeds.surface.contains_key(l) {
            return Err(DataError::Invalid(format!(
                "language {l:?} has no seed material in {}; available: {}",
                seeds.dir.display(),
                seeds.langs().join(", ")
            )));
        }
    }
    if options.langs.is_empty() {
        return Err(DataError::Invalid("no languages given".into()));
    }
    if !(0.0..=1.0).contains(&options.injections) {
        return Err(DataError::Invalid(format!(
            "injections {}: a share between 0 and 1",
            options.injections
        )));
    }
    if options.injections > 0.0 {
        if let Some(l) = options
            .langs
            .iter()
            .find(|l| seeds.surface[*l].injections.is_empty())
        {
            return Err(DataError::Invalid(format!(
                "--injections: language {l:?} has no `injections` lines in {}",
                seeds.dir.join("surface.toml").display()
            )));
        }
    }
    if seeds.scenarios.is_empty() {
        return Err(DataError::Seeds {
            path: seeds.dir.join("scenarios"),
            line: None,
            message: "the scenario files define no [[scenario]]".into(),
        });
    }
    // Leaf classes: the first field and its child, if any.
    let class_fields: Vec<&str> = {
        let first = &taxonomy.fields[0];
        let child = taxonomy
            .fields
            .iter()
            .find(|f| f.dependency.as_ref().is_some_and(|d| d.parent == first.name));
        std::iter::once(first.name.as_str())
            .chain(child.map(|c| c.name.as_str()))
            .collect()
    };
    let mut classes: BTreeMap<Vec<&str>, Vec<usize>> = BTreeMap::new();
    for (i, s) in seeds.scenarios.iter().enumerate() {
        let key: Vec<&str> = class_fields
            .iter()
            .map(|f| {
                s.labels
                    .iter()
                    .find(|(k, _)| k == f)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or("")
            })
            .collect();
        classes.entry(key).or_default().push(i);
    }
    let classes: Vec<Vec<usize>> = classes.into_values().collect();
    let weights: Vec<u32> = seeds.scenarios.iter().map(|s| s.weight).collect();

    // The fields an injection may name: enum fields with a choice, child fields left out.
    let injectable: Vec<_> = taxonomy
        .fields
        .iter()
        .filter(|f| f.dependency.is_none() && f.value_names().count() > 1)
        .collect();
    let mut index = NearDupIndex::new(options.near_dup_threshold);
    let mut report = SynthReport {
        examples: Vec::with_capacity(options.n),
        exact_duplicates: 0,
        near_duplicates: 0,
    };
    let mut order_rng = Rng::derive(options.seed, &[u64::MAX]);
    let mut round_order: Vec<usize> = Vec::new();
    for i in 0..options.n {
        // The class and language of example i are fixed up front (balance), the rest varies
        // per attempt.
        let (class, lang_idx) = match options.balance {
            Balance::Uniform => {
                let pos = i % classes.len();
                if pos == 0 {
                    round_order = (0..classes.len()).collect();
                    order_rng.shuffle(&mut round_order);
                }
                let round = i / classes.len();
                let class = round_order[pos];
                (Some(class), (round + class) % options.langs.len())
            }
            Balance::Natural => (None, i % options.langs.len()),
        };
        let lang = &options.langs[lang_idx];
        let mut accepted = None;
        for attempt in 0..MAX_ATTEMPTS {
            let mut rng = Rng::derive(options.seed, &[i as u64, attempt]);
            let scenario_idx = match class {
                Some(c) => *rng.pick(&classes[c]),
                None => rng.weighted(&weights),
            };
            let scenario = &seeds.scenarios[scenario_idx];
            let draft = compose::compose(&mut rng, seeds, scenario, lang, taxonomy);
            match index.find(&draft.text) {
                Some(Duplicate::Exact(_)) => report.exact_duplicates += 1,
                Some(Duplicate::Near(..)) => report.near_duplicates += 1,
                None => {
                    accepted = Some((scenario, draft));
                    break;
                }
            }
        }
        let Some((scenario, draft)) = accepted else {
            return Err(DataError::Invalid(format!(
                "could not generate example {i} without duplicating an earlier one after {MAX_ATTEMPTS} attempts: \
                 the seed material in {} is too small for {} examples; add scenarios or lower --n",
                seeds.dir.display(),
                options.n
            )));
        };
        index.insert(&draft.text);
        let mut ticket = Map::new();
        ticket.insert("summary".into(), Value::String(draft.summary.clone()));
        for (k, v) in &scenario.labels {
            let v = if k == compose::PRIORITY {
                draft.priority.clone().unwrap_or_else(|| v.clone())
            } else {
                v.clone()
            };
            ticket.insert(k.clone(), Value::String(v));
        }
        let ticket = validator
            .parse(&Value::Object(ticket))
            .map_err(|v| DataError::Seeds {
                path: seeds.dir.clone(),
                line: None,
                message: format!("scenario {:?} produced an invalid ticket: {v}", scenario.id),
            })?;
        // Its own random stream: with injections at 0 nothing else changes.
        let mut inject_rng = Rng::derive(options.seed, &[i as u64, INJECTION_STREAM]);
        let text = match inject_rng.chance(options.injections) {
            true => inject(&mut inject_rng, seeds, lang, &injectable, &ticket, &draft.text),
            false => draft.text,
        };
        report.examples.push(Example {
            id: format!("synth-{}-{i:05}", options.seed),
            text,
            ticket,
            lang: lang.clone(),
            source: "synth".into(),
            group: Some(scenario.id.clone()),
            split: None,
        });
    }
    Ok(report)
}
