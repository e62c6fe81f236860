//! Reports: `report.json` (machine-readable, with every per-example output), `report.md` and
//! `report.html` (side-by-side systems), and one confusion-matrix SVG per system and field.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use triage_data::Example;
use triage_taxonomy::Taxonomy;

use crate::metrics::{
    calibration_error, coverage_curve, field_report, mcnemar_exact, reliability, Bucket, FieldReport,
};
use crate::run::{Prediction, SystemRun};

/// Accuracy per field for one language.
#[derive(Debug, Clone, Serialize)]
pub struct LangRow {
    /// Language code.
    pub lang: String,
    /// Examples.
    pub n: usize,
    /// `(field, accuracy)`.
    pub accuracy: Vec<(String, f64)>,
}

/// An example the system got most wrong.
#[derive(Debug, Clone, Serialize)]
pub struct WorstError {
    /// Example id.
    pub id: String,
    /// The incident text (first 400 characters).
    pub text: String,
    /// `(field, gold, predicted, confidence)` of the wrong fields (`None`: failed, or no
    /// confidence given).
    pub wrong: Vec<(String, String, String, Option<f64>)>,
}

/// One system against the report's first system on the same examples, for one field or for
/// whole tickets: the examples where exactly one of the two is right.
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    /// The field, or `all fields` (every field right and the output valid).
    pub field: String,
    /// Examples this system got right and the first system wrong.
    pub wins: usize,
    /// Examples this system got wrong and the first system right.
    pub losses: usize,
    /// Two-sided exact McNemar p-value of that split ([`mcnemar_exact`]): how often two equally
    /// good systems would split at least this unevenly.
    pub p_value: f64,
}

/// Everything measured for one system.
#[derive(Debug, Clone, Serialize)]
pub struct SystemReport {
    /// System name.
    pub name: String,
    /// Share of outputs valid against the schema (failures count as invalid).
    pub validity_rate: f64,
    /// Examples the system failed on (error instead of a ticket).
    pub failed: usize,
    /// Share of examples with every field right.
    pub exact_match: f64,
    /// Median latency per example (ms).
    pub latency_p50_ms: f64,
    /// 95th percentile latency (ms).
    pub latency_p95_ms: f64,
    /// Per-field metrics.
    pub fields: Vec<FieldReport>,
    /// Per-language accuracy.
    pub by_lang: Vec<LangRow>,
    /// All field decisions with a confidence, by confidence: five buckets of 0.2.
    pub reliability: Vec<Bucket>,
    /// The expected calibration error over those buckets (`None` without confidences).
    pub calibration_error: Option<f64>,
    /// `(threshold, coverage, exact-match accuracy of the covered)`: sending examples whose
    /// lowest field confidence is under the threshold to human review.
    pub coverage: Vec<(f64, f64, f64)>,
    /// The worst errors.
    pub worst: Vec<WorstError>,
    /// Against the report's first system (in `triage eval`'s order, the TF-IDF baseline when
    /// it has `--train`, else zero-shot), per field and for all fields right; empty for the
    /// first system itself.
    pub vs_first: Vec<Paired>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Dataset file or name.
    pub dataset: String,
    /// sha256 (hex) of the dataset file's bytes, when the caller read it from a file: tells a
    /// report made on an earlier version of a regenerated split from a current one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset_sha256: Option<String>,
    /// Taxonomy name.
    pub taxonomy: String,
    /// Examples evaluated.
    pub examples: usize,
    /// One entry per system, in run order.
    pub systems: Vec<SystemReport>,
    /// Leak checks against the training files: the baseline's (`--train`) and the adapter's
    /// (as its `triage.json` records it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leak_checks: Vec<TrainOverlap>,
}

/// How many evaluated examples have a copy, re-sent or reworded, in a training file: figures on
/// those favour whatever memorises its training data (a TF-IDF baseline most of all).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainOverlap {
    /// Whose training file: `the baseline's`, `adapter <name>'s`.
    pub of: String,
    /// The training file, as given or recorded (empty when none is recorded).
    pub train: String,
    /// Its examples.
    pub train_examples: usize,
    /// The Jaccard similarity of character 5-grams from which a text counts as a copy.
    pub threshold: f64,
    /// Evaluated examples with an exact or near duplicate among the training texts; `None`
    /// when the file could not be checked.
    pub near_duplicates: Option<usize>,
    /// Why the file could not be checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unchecked: Option<String>,
}

impl TrainOverlap {
    /// Checks every example of `examples` against the texts of `train` (read from file
    /// `train_name`, `of` whom) at Jaccard `threshold`.
    pub fn check(
        of: &str,
        train_name: &str,
        train: &[Example],
        examples: &[Example],
        threshold: f64,
    ) -> Self {
        let mut index = triage_data::dedup::NearDupIndex::new(threshold);
        for e in train {
            index.insert(&e.text);
        }
        Self {
            of: of.to_owned(),
            train: train_name.to_owned(),
            train_examples: train.len(),
            threshold,
            near_duplicates: Some(examples.iter().filter(|e| index.find(&e.text).is_some()).count()),
            unchecked: None,
        }
    }

    /// A check that could not be made, and why (`train_name` empty when none is recorded).
    pub fn unchecked(of: &str, train_name: &str, reason: &str) -> Self {
        Self {
            of: of.to_owned(),
            train: train_name.to_owned(),
            train_examples: 0,
            threshold: triage_data::split::SPLIT_NEAR_DUP,
            near_duplicates: None,
            unchecked: Some(reason.to_owned()),
        }
    }

    /// One sentence for the reports.
    pub fn sentence(&self, examples: usize) -> String {
        let file = if self.train.is_empty() {
            String::new()
        } else {
            format!(" `{}`", self.train)
        };
        let Some(k) = self.near_duplicates else {
            let why = self.unchecked.as_deref().unwrap_or("unknown");
            return format!(
                "Leak check, {} training file{file}: not checked ({why}).",
                self.of
            );
        };
        let (verdict, warning) = if k == 0 {
            ("none of".to_owned(), "")
        } else {
            (
                format!("**{k} of**"),
                ": figures on them favour systems that memorise their training data (`triage data \
                 split` keeps such texts on one side)",
            )
        };
        format!(
            "Leak check, {} training file{file} ({} examples): {verdict} the {examples} \
             examples here have a copy there (character 5-gram Jaccard ≥ {}){warning}.",
            self.of, self.train_examples, self.threshold
        )
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Whether a class belongs in the per-class tables: it was the gold or the prediction of
/// some example (not the `(failed)` placeholder of examples without output).
fn listed(c: &crate::metrics::ClassScore) -> bool {
    (c.support > 0 || c.predicted > 0) && c.class != "(failed)"
}

/// A confidence in a table: two decimals, or `–` where there is none.
fn conf_cell(c: Option<f64>) -> String {
    c.map_or_else(|| "–".to_owned(), |c| format!("{c:.2}"))
}

/// `name` as part of a file name in the report folder: ASCII letters, digits, `.` and `-`;
/// anything else (a `/` of `org/model`) becomes `-`.
pub fn file_slug(name: &str) -> String {
    name.chars()
        .map(|c| match c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            true => c,
            false => '-',
        })
        .collect()
}

/// Separates a parent value from a dependent value in [`qualified`] names.
const UNDER: &str = " › ";

/// A dependent field's value names that occur under more than one parent value (`Other`
/// under every category): `(field, parent field, names)`.
type Repeated<'a> = (&'a str, &'a str, std::collections::HashSet<&'a str>);

/// The [`Repeated`] names of every dependent field that has some.
fn repeated_names(taxonomy: &Taxonomy) -> Vec<Repeated<'_>> {
    taxonomy
        .fields
        .iter()
        .filter_map(|f| {
            let dep = f.dependency.as_ref()?;
            let mut count = std::collections::HashMap::<&str, usize>::new();
            for v in dep.allowed.iter().flat_map(|(_, vs)| vs) {
                *count.entry(v.name.as_str()).or_default() += 1;
            }
            let names: std::collections::HashSet<&str> = count
                .into_iter()
                .filter(|(_, n)| *n > 1)
                .map(|(v, _)| v)
                .collect();
            (!names.is_empty()).then_some((f.name.as_str(), dep.parent.as_str(), names))
        })
        .collect()
}

/// Value `v` as scored: qualified by its parent value (`Hardware › Other`) when its name is one
/// of the repeated `names` and the parent is known, else as it is.
fn scored_name(names: &std::collections::HashSet<&str>, parent: Option<&str>, v: &str) -> String {
    match parent {
        Some(p) if names.contains(v) => format!("{p}{UNDER}{v}"),
        _ => v.to_owned(),
    }
}

/// The field's classes as scored: its values, with a name that repeats under several parents
/// qualified by each parent (`Hardware › Other`, `Software › Other`).
fn scored_classes(repeated: &[Repeated], field: &triage_taxonomy::Field) -> Vec<String> {
    let (Some((_, _, names)), Some(dep)) = (
        repeated.iter().find(|(f, _, _)| *f == field.name),
        &field.dependency,
    ) else {
        return field.value_names().map(str::to_owned).collect();
    };
    let mut out: Vec<String> = Vec::new();
    for (parent, vs) in &dep.allowed {
        for v in vs {
            let c = scored_name(names, Some(parent), &v.name);
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// `runs` with every repeated dependent value qualified by its parent value, gold and
/// predicted alike: a ticket filed under Hardware › Other is not right when the gold is
/// Software › Other, though both say `Other`.
fn qualified(repeated: &[Repeated], runs: &[SystemRun]) -> Vec<SystemRun> {
    let mut runs = runs.to_vec();
    for p in runs.iter_mut().flat_map(|r| r.predictions.iter_mut()) {
        for (field, parent, names) in repeated {
            let gold_parent = p.gold_value(parent).map(str::to_owned);
            let parent_now = p.value(parent).map(str::to_owned);
            for (_, v) in p.gold.iter_mut().filter(|(f, _)| f == field) {
                *v = scored_name(names, gold_parent.as_deref(), v);
            }
            for (_, v, _) in p.predicted.iter_mut().filter(|(f, _, _)| f == field) {
                *v = scored_name(names, parent_now.as_deref(), v);
            }
        }
    }
    runs
}

fn is_right(p: &Prediction, field: &str) -> bool {
    p.value(field).is_some() && p.value(field) == p.gold_value(field)
}

/// Whether the output is valid with every field in `fields` right.
fn all_right(p: &Prediction, fields: &[&str]) -> bool {
    p.valid && fields.iter().all(|f| is_right(p, f))
}

/// `preds` against `reference` on the examples both have (matched by id), per field in
/// `fields` order, then for all fields right.
fn paired(fields: &[&str], reference: &[Prediction], preds: &[Prediction]) -> Vec<Paired> {
    let by_id: std::collections::HashMap<&str, &Prediction> =
        reference.iter().map(|p| (p.id.as_str(), p)).collect();
    let pairs: Vec<(&Prediction, &Prediction)> = preds
        .iter()
        .filter_map(|p| by_id.get(p.id.as_str()).map(|r| (p, *r)))
        .collect();
    let tally = |field: &str, right: &dyn Fn(&Prediction) -> bool| {
        let (mut wins, mut losses) = (0, 0);
        for (p, r) in &pairs {
            match (right(p), right(r)) {
                (true, false) => wins += 1,
                (false, true) => losses += 1,
                _ => {}
            }
        }
        Paired {
            field: field.to_owned(),
            wins,
            losses,
            p_value: mcnemar_exact(wins, losses),
        }
    };
    let mut out: Vec<Paired> = fields.iter().map(|f| tally(f, &|p| is_right(p, f))).collect();
    out.push(tally("all fields", &|p| all_right(p, fields)));
    out
}

/// A paired cell: `wins / losses (p …)`.
fn paired_cell(x: &Paired) -> String {
    let p = match x.p_value < 0.001 {
        true => "p < 0.001".to_owned(),
        // Three significant digits: 0.0496 must not print as 0.050.
        false => {
            let decimals = (2.0 - x.p_value.log10().floor()).max(0.0) as usize;
            format!("p {:.*}", decimals, x.p_value)
        }
    };
    format!("{} / {} ({p})", x.wins, x.losses)
}

/// Computes the report of `runs` over `examples` (same order).
pub fn build(taxonomy: &Taxonomy, dataset: &str, examples: &[Example], runs: &[SystemRun]) -> Report {
    let repeated = repeated_names(taxonomy);
    let runs = &qualified(&repeated, runs);
    let fields: Vec<&str> = taxonomy.fields.iter().map(|f| f.name.as_str()).collect();
    let systems = runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let preds = &run.predictions;
            let n = preds.len().max(1) as f64;
            let field_reports: Vec<FieldReport> = taxonomy
                .fields
                .iter()
                .map(|f| {
                    let classes = scored_classes(&repeated, f);
                    let classes: Vec<&str> = classes.iter().map(String::as_str).collect();
                    let gold: Vec<&str> = preds
                        .iter()
                        .map(|p| p.gold_value(&f.name).unwrap_or(""))
                        .collect();
                    let pred: Vec<&str> = preds
                        .iter()
                        .map(|p| p.value(&f.name).unwrap_or("(failed)"))
                        .collect();
                    field_report(&f.name, &classes, &gold, &pred)
                })
                .collect();
            let mut langs: Vec<String> = preds.iter().map(|p| p.lang.clone()).collect();
            langs.sort();
            langs.dedup();
            let by_lang = langs
                .into_iter()
                .map(|lang| {
                    let sub: Vec<&Prediction> = preds.iter().filter(|p| p.lang == lang).collect();
                    let accuracy = fields
                        .iter()
                        .map(|f| {
                            (
                                f.to_string(),
                                sub.iter().filter(|p| is_right(p, f)).count() as f64
                                    / sub.len().max(1) as f64,
                            )
                        })
                        .collect();
                    LangRow {
                        lang,
                        n: sub.len(),
                        accuracy,
                    }
                })
                .collect();
            let (mut conf, mut ok) = (Vec::new(), Vec::new());
            // A decision without a confidence (a backend without log-probabilities) has no
            // place on the reliability diagram.
            for p in preds {
                for (f, _, c) in &p.predicted {
                    if let Some(c) = c {
                        conf.push(*c);
                        ok.push(is_right(p, f));
                    }
                }
            }
            // A failed example, or a field without a confidence, counts 0, so no threshold
            // hands it over as sure.
            let min_conf: Vec<f64> = preds
                .iter()
                .map(|p| match p.valid && !p.predicted.is_empty() {
                    true => p
                        .predicted
                        .iter()
                        .map(|(_, _, c)| c.unwrap_or(0.0))
                        .fold(f64::INFINITY, f64::min)
                        .clamp(0.0, 1.0),
                    false => 0.0,
                })
                .collect();
            let all_right: Vec<bool> = preds.iter().map(|p| all_right(p, &fields)).collect();
            let mut lat: Vec<f64> = preds.iter().map(|p| p.latency_ms).collect();
            lat.sort_by(f64::total_cmp);
            let mut worst: Vec<(usize, f64, &Prediction)> = preds
                .iter()
                .map(|p| {
                    let wrong = fields.iter().filter(|f| !is_right(p, f)).count();
                    let conf = p
                        .predicted
                        .iter()
                        .filter(|(f, _, _)| !is_right(p, f))
                        .filter_map(|x| x.2)
                        .fold(0.0, f64::max);
                    (wrong, conf, p)
                })
                .filter(|(w, _, _)| *w > 0)
                .collect();
            worst.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)));
            let worst = worst
                .into_iter()
                .take(10)
                .map(|(_, _, p)| WorstError {
                    id: p.id.clone(),
                    text: examples
                        .iter()
                        .find(|e| e.id == p.id)
                        .map(|e| e.text.chars().take(400).collect())
                        .unwrap_or_default(),
                    wrong: fields
                        .iter()
                        .filter(|f| !is_right(p, f))
                        .map(|f| {
                            let c = p.predicted.iter().find(|x| x.0 == *f).and_then(|x| x.2);
                            (
                                f.to_string(),
                                p.gold_value(f).unwrap_or("").to_owned(),
                                p.value(f).unwrap_or("(failed)").to_owned(),
                                c,
                            )
                        })
                        .collect(),
                })
                .collect();
            let buckets = reliability(&conf, &ok, 5);
            SystemReport {
                name: run.name.clone(),
                validity_rate: preds.iter().filter(|p| p.valid).count() as f64 / n,
                failed: preds.iter().filter(|p| p.error.is_some()).count(),
                exact_match: all_right.iter().filter(|r| **r).count() as f64 / n,
                latency_p50_ms: percentile(&lat, 0.5),
                latency_p95_ms: percentile(&lat, 0.95),
                fields: field_reports,
                by_lang,
                calibration_error: calibration_error(&buckets),
                reliability: buckets,
                coverage: coverage_curve(&min_conf, &all_right, &[0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95]),
                worst,
                vs_first: match i {
                    0 => Vec::new(),
                    _ => paired(&fields, &runs[0].predictions, preds),
                },
            }
        })
        .collect();
    Report {
        dataset: dataset.to_owned(),
        dataset_sha256: None,
        taxonomy: taxonomy.name.clone(),
        examples: examples.len(),
        systems,
        leak_checks: Vec::new(),
    }
}

/// A confusion matrix as an SVG heat map (rows: gold, columns: predicted).
pub fn confusion_svg(title: &str, r: &FieldReport) -> String {
    let k = r.labels.len();
    let cell = if k > 12 { 18.0 } else { 34.0 };
    let left = 200.0;
    let top = 200.0;
    let (w, h) = (left + cell * k as f64 + 20.0, top + cell * k as f64 + 20.0);
    let max = r.confusion.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        svg,
        r#"<text x="10" y="20" font-size="14">{}</text><text x="10" y="38">rows: gold, columns: predicted</text>"#,
        esc(title)
    );
    for (i, label) in r.labels.iter().enumerate() {
        let y = top + cell * i as f64 + cell * 0.65;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{y}" text-anchor="end">{}</text>"#,
            left - 6.0,
            esc(label)
        );
        let x = left + cell * i as f64 + cell * 0.6;
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{}" transform="rotate(-60 {x} {})">{}</text>"#,
            top - 6.0,
            top - 6.0,
            esc(label)
        );
    }
    for (i, row) in r.confusion.iter().enumerate() {
        for (j, &c) in row.iter().enumerate() {
            let shade = (255.0 - 200.0 * (c as f64 / max)) as u8;
            let fill = if i == j {
                format!("rgb({shade},{},{shade})", 255)
            } else {
                format!("rgb(255,{shade},{shade})")
            };
            let (x, y) = (left + cell * j as f64, top + cell * i as f64);
            let _ = write!(
                svg,
                r##"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#ddd"/>"##
            );
            if c > 0 {
                let _ = write!(
                    svg,
                    r#"<text x="{}" y="{}" text-anchor="middle">{c}</text>"#,
                    x + cell / 2.0,
                    y + cell * 0.65
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut md = format!(
        "# Evaluation: {} ({} examples, taxonomy `{}`)\n\n",
        r.dataset, r.examples, r.taxonomy
    );
    for o in &r.leak_checks {
        let _ = write!(md, "{}\n\n", o.sentence(r.examples));
    }
    md.push_str("## Per field: accuracy / macro-F1\n\n| field |");
    for s in &r.systems {
        let _ = write!(md, " {} |", s.name);
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(r.systems.len()));
    md.push('\n');
    if let Some(first) = r.systems.first() {
        for (i, f) in first.fields.iter().enumerate() {
            let _ = write!(md, "| {} |", f.field);
            for s in &r.systems {
                let x = &s.fields[i];
                let _ = write!(md, " {} / {:.3} |", pct(x.accuracy), x.macro_f1);
            }
            md.push('\n');
        }
    }
    md.push_str("\n| | ");
    md.push_str(
        &r.systems
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    md.push_str(" |\n|---|");
    md.push_str(&"---|".repeat(r.systems.len()));
    md.push('\n');
    for (name, f) in [
        (
            "all fields right",
            (|s: &SystemReport| pct(s.exact_match)) as fn(&SystemReport) -> String,
        ),
        ("schema-valid outputs", |s| pct(s.validity_rate)),
        ("failed", |s| s.failed.to_string()),
        ("latency p50", |s| format!("{:.0} ms", s.latency_p50_ms)),
        ("latency p95", |s| format!("{:.0} ms", s.latency_p95_ms)),
    ] {
        let _ = write!(md, "| {name} |");
        for s in &r.systems {
            let _ = write!(md, " {} |", f(s));
        }
        md.push('\n');
    }
    if let [first, others @ ..] = r.systems.as_slice() {
        if let Some(rows) = others.first().map(|s| s.vs_first.len()) {
            let _ = write!(
                md,
                "\n### Paired with {0}\n\nEach cell: the examples this system got right and {0} wrong / the \
                 reverse, and the two-sided exact McNemar p-value (how often two equally good systems \
                 would split that unevenly; a small p means the difference is unlikely to be chance).\n\n| field |",
                first.name
            );
            for s in others {
                let _ = write!(md, " {} |", s.name);
            }
            md.push_str("\n|---|");
            md.push_str(&"---|".repeat(others.len()));
            md.push('\n');
            for j in 0..rows {
                let _ = write!(md, "| {} |", others[0].vs_first[j].field);
                for s in others {
                    let _ = write!(
                        md,
                        " {} |",
                        s.vs_first.get(j).map(paired_cell).unwrap_or_default()
                    );
                }
                md.push('\n');
            }
        }
    }
    for s in &r.systems {
        let _ = write!(md, "\n## {}\n\n### By language\n\n| lang | n |", s.name);
        for f in &s.fields {
            let _ = write!(md, " {} |", f.field);
        }
        md.push_str("\n|---|---|");
        md.push_str(&"---|".repeat(s.fields.len()));
        md.push('\n');
        for l in &s.by_lang {
            let _ = write!(md, "| {} | {} |", l.lang, l.n);
            for (_, a) in &l.accuracy {
                let _ = write!(md, " {} |", pct(*a));
            }
            md.push('\n');
        }
        md.push_str("\n### Reliability (all field decisions)\n\n| confidence | decisions | mean confidence | accuracy |\n|---|---|---|---|\n");
        for b in &s.reliability {
            let [mean, acc] = bucket_cells(b);
            let _ = writeln!(
                md,
                "| {:.1}–{:.1} | {} | {mean} | {acc} |",
                b.lower, b.upper, b.decisions
            );
        }
        if let Some(line) = calibration_line(s.calibration_error) {
            let _ = writeln!(md, "\n{line}");
        }
        md.push_str("\n### Review threshold (`--min-confidence`): coverage vs accuracy\n\n| threshold | auto-handled | all fields right among them |\n|---|---|---|\n");
        for (t, c, a) in &s.coverage {
            let _ = writeln!(md, "| {t:.2} | {} | {} |", pct(*c), pct(*a));
        }
        md.push_str("\n### Per class (precision / recall / support)\n\n");
        for f in &s.fields {
            let _ = write!(md, "- **{}**: ", f.field);
            let parts: Vec<String> = f
                .classes
                .iter()
                .filter(|c| listed(c))
                .map(|c| format!("{} {:.2}/{:.2}/{}", c.class, c.precision, c.recall, c.support))
                .collect();
            md.push_str(&parts.join(", "));
            md.push('\n');
        }
        md.push_str("\n### Worst errors\n\n");
        for w in &s.worst {
            let wrong: Vec<String> = w
                .wrong
                .iter()
                .map(|(f, g, p, c)| format!("{f}: {g} → {p} ({})", conf_cell(*c)))
                .collect();
            let _ = writeln!(
                md,
                "- `{}` — {}\n  > {}",
                w.id,
                wrong.join("; "),
                w.text.replace('\n', " ")
            );
        }
    }
    md
}

/// A bucket's mean confidence and accuracy as table cells (`–` for an empty bucket).
fn bucket_cells(b: &Bucket) -> [String; 2] {
    match b.decisions {
        0 => ["–".into(), "–".into()],
        _ => [format!("{:.2}", b.mean_confidence), pct(b.accuracy)],
    }
}

/// The sentence under a reliability table: the expected calibration error, and what it means.
fn calibration_line(error: Option<f64>) -> Option<String> {
    error.map(|e| {
        format!(
            "Expected calibration error over these buckets: {:.1} points (the decision-weighted \
             mean gap between a bucket's mean confidence and its accuracy; 0 is calibrated).",
            100.0 * e
        )
    })
}

/// A reliability diagram as an SVG: accuracy per confidence bucket (bars, labelled with the
/// number of decisions), each bucket's mean confidence and accuracy as a dot, against the
/// diagonal of perfect calibration.
pub fn reliability_svg(title: &str, buckets: &[Bucket]) -> String {
    let (left, top, w, h) = (50.0, 40.0, 300.0, 300.0);
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">{}</text>"#,
        left + w + 20.0,
        top + h + 50.0,
        esc(title)
    );
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/><line x1="{left}" y1="{}" x2="{}" y2="{top}" stroke="#999" stroke-dasharray="4 3"/>"##,
        top + h,
        left + w
    );
    for t in [0.0, 0.5, 1.0] {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{t:.1}</text><text x="{}" y="{}" text-anchor="end">{t:.1}</text>"#,
            left + w * t,
            top + h + 16.0,
            left - 6.0,
            top + h - h * t + 4.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">confidence</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">accuracy</text>"#,
        left + w / 2.0,
        top + h + 36.0,
        top + h / 2.0,
        top + h / 2.0
    );
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" fill="#555">bars: accuracy; dots: at the mean confidence</text>"##,
        left + 6.0,
        top + 14.0
    );
    for b in buckets.iter().filter(|b| b.decisions > 0) {
        let (x, bw) = (left + w * b.lower, w * (b.upper - b.lower));
        let bh = h * b.accuracy.clamp(0.0, 1.0);
        let _ = write!(
            svg,
            r##"<rect x="{}" y="{}" width="{}" height="{bh}" fill="#4a7ebb" fill-opacity="0.8" stroke="white"/><text x="{}" y="{}" text-anchor="middle">{}</text><circle cx="{}" cy="{}" r="3.5" fill="#d9822b" stroke="white"/>"##,
            x + 1.0,
            top + h - bh,
            (bw - 2.0).max(1.0),
            x + bw / 2.0,
            (top + h - bh - 4.0).max(top + 12.0),
            b.decisions,
            left + w * b.mean_confidence.clamp(0.0, 1.0),
            top + h - bh
        );
    }
    svg.push_str("</svg>");
    svg
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Appends an HTML table: `head` cells, then `rows` (cells already escaped).
fn table(html: &mut String, class: &str, head: &[String], rows: &[Vec<String>]) {
    let _ = write!(html, "<table class=\"{class}\"><thead><tr>");
    for h in head {
        let _ = write!(html, "<th>{h}</th>");
    }
    html.push_str("</tr></thead><tbody>");
    for r in rows {
        html.push_str("<tr>");
        for c in r {
            let _ = write!(html, "<td>{c}</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>\n");
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
th:first-child,td:first-child{text-align:left}thead th{background:#f0f3f7}tbody tr:nth-child(even){background:#fafafa}\
h2{border-bottom:2px solid #4a7ebb;padding-bottom:.2em;margin-top:2em}figure{display:inline-block;margin:.5em;vertical-align:top}\
figcaption{font-size:.85em;color:#555;text-align:center}span.text{display:block;text-align:left;max-width:40em;font-size:.9em}";

/// The HTML report: the Markdown report's tables as real tables, with each system's
/// reliability diagram and confusion matrices inline (SVG), so the one file is the whole page.
pub fn html(r: &Report) -> String {
    let mut h = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>triage evaluation: {}</title><style>{STYLE}</style></head><body>\n<h1>Evaluation: {} ({} examples, taxonomy <code>{}</code>)</h1>\n",
        esc(&r.dataset),
        esc(&r.dataset),
        r.examples,
        esc(&r.taxonomy)
    );
    for o in &r.leak_checks {
        let plain = o.sentence(r.examples).replace("**", "").replace('`', "");
        let _ = writeln!(h, "<p>{}</p>", esc(&plain));
    }
    let names: Vec<String> = r.systems.iter().map(|s| esc(&s.name)).collect();
    h.push_str("<h2 id=\"fields\">Per field: accuracy / macro-F1</h2>\n");
    let mut head = vec!["field".to_owned()];
    head.extend(names.iter().cloned());
    let rows: Vec<Vec<String>> = r
        .systems
        .first()
        .map(|first| {
            (0..first.fields.len())
                .map(|i| {
                    let mut row = vec![esc(&first.fields[i].field)];
                    row.extend(r.systems.iter().map(|s| {
                        let x = &s.fields[i];
                        format!("{} / {:.3}", pct(x.accuracy), x.macro_f1)
                    }));
                    row
                })
                .collect()
        })
        .unwrap_or_default();
    table(&mut h, "fields", &head, &rows);
    let mut head = vec![String::new()];
    head.extend(names.iter().cloned());
    type Cell = fn(&SystemReport) -> String;
    let overall: [(&str, Cell); 5] = [
        ("all fields right", |s| pct(s.exact_match)),
        ("schema-valid outputs", |s| pct(s.validity_rate)),
        ("failed", |s| s.failed.to_string()),
        ("latency p50", |s| format!("{:.0} ms", s.latency_p50_ms)),
        ("latency p95", |s| format!("{:.0} ms", s.latency_p95_ms)),
    ];
    let rows: Vec<Vec<String>> = overall
        .iter()
        .map(|(name, f)| {
            let mut row = vec![name.to_string()];
            row.extend(r.systems.iter().map(f));
            row
        })
        .collect();
    table(&mut h, "overall", &head, &rows);
    if let [first, others @ ..] = r.systems.as_slice() {
        if let Some(n) = others.first().map(|s| s.vs_first.len()) {
            let _ = write!(
                h,
                "<h3 id=\"paired\">Paired with {0}</h3>\n<p>Each cell: the examples this system got right and {0} wrong / the reverse, and the two-sided exact McNemar p-value (a small p means the difference is unlikely to be chance).</p>\n",
                esc(&first.name)
            );
            let mut head = vec!["field".to_owned()];
            head.extend(others.iter().map(|s| esc(&s.name)));
            let rows: Vec<Vec<String>> = (0..n)
                .map(|j| {
                    let mut row = vec![esc(&others[0].vs_first[j].field)];
                    row.extend(
                        others
                            .iter()
                            .map(|s| esc(&s.vs_first.get(j).map(paired_cell).unwrap_or_default())),
                    );
                    row
                })
                .collect();
            table(&mut h, "paired", &head, &rows);
        }
    }
    for s in &r.systems {
        let _ = write!(h, "<h2 id=\"{0}\">{0}</h2>\n<h3>By language</h3>\n", esc(&s.name));
        let mut head = vec!["lang".to_owned(), "n".to_owned()];
        head.extend(s.fields.iter().map(|f| esc(&f.field)));
        let rows: Vec<Vec<String>> = s
            .by_lang
            .iter()
            .map(|l| {
                let mut row = vec![esc(&l.lang), l.n.to_string()];
                row.extend(l.accuracy.iter().map(|(_, a)| pct(*a)));
                row
            })
            .collect();
        table(&mut h, "by-lang", &head, &rows);
        h.push_str("<h3>Reliability (all field decisions)</h3>\n");
        let rows: Vec<Vec<String>> = s
            .reliability
            .iter()
            .map(|b| {
                let [mean, acc] = bucket_cells(b);
                vec![
                    format!("{:.1}–{:.1}", b.lower, b.upper),
                    b.decisions.to_string(),
                    mean,
                    acc,
                ]
            })
            .collect();
        table(
            &mut h,
            "reliability",
            &[
                "confidence".into(),
                "decisions".into(),
                "mean confidence".into(),
                "accuracy".into(),
            ],
            &rows,
        );
        if let Some(line) = calibration_line(s.calibration_error) {
            let _ = writeln!(h, "<p>{}</p>", esc(&line));
        }
        let _ = writeln!(
            h,
            "<figure class=\"reliability\">{}<figcaption>reliability diagram: accuracy per confidence bucket (bars), at the bucket's mean confidence (dots); the dashed line is perfect calibration</figcaption></figure>",
            reliability_svg(&format!("{} — reliability", s.name), &s.reliability)
        );
        h.push_str("<h3>Review threshold (<code>--min-confidence</code>): coverage vs accuracy</h3>\n");
        let rows: Vec<Vec<String>> = s
            .coverage
            .iter()
            .map(|(t, c, a)| vec![format!("{t:.2}"), pct(*c), pct(*a)])
            .collect();
        table(
            &mut h,
            "coverage",
            &[
                "threshold".into(),
                "auto-handled".into(),
                "all fields right among them".into(),
            ],
            &rows,
        );
        h.push_str("<h3>Per class</h3>\n");
        for f in &s.fields {
            let _ = writeln!(h, "<h4>{}</h4>", esc(&f.field));
            let rows: Vec<Vec<String>> = f
                .classes
                .iter()
                .filter(|c| listed(c))
                .map(|c| {
                    vec![
                        esc(&c.class),
                        format!("{:.2}", c.precision),
                        format!("{:.2}", c.recall),
                        format!("{:.2}", c.f1),
                        c.support.to_string(),
                    ]
                })
                .collect();
            table(
                &mut h,
                "classes",
                &[
                    "class".into(),
                    "precision".into(),
                    "recall".into(),
                    "F1".into(),
                    "support".into(),
                ],
                &rows,
            );
        }
        h.push_str("<h3>Confusion matrices</h3>\n");
        for f in &s.fields {
            let _ = writeln!(
                h,
                "<figure class=\"confusion\">{}<figcaption>confusion-{}-{}.svg</figcaption></figure>",
                confusion_svg(&format!("{} — {}", s.name, f.field), f),
                esc(&file_slug(&s.name)),
                esc(&f.field)
            );
        }
        h.push_str("<h3>Worst errors</h3>\n");
        let rows: Vec<Vec<String>> = s
            .worst
            .iter()
            .map(|w| {
                let wrong: Vec<String> = w
                    .wrong
                    .iter()
                    .map(|(f, g, p, c)| format!("{}: {} → {} ({})", esc(f), esc(g), esc(p), conf_cell(*c)))
                    .collect();
                vec![
                    format!("<code>{}</code>", esc(&w.id)),
                    wrong.join("<br>"),
                    format!("<span class=\"text\">{}</span>", esc(&w.text)),
                ]
            })
            .collect();
        table(
            &mut h,
            "worst",
            &["id".into(), "wrong fields".into(), "text".into()],
            &rows,
        );
    }
    h.push_str("</body></html>\n");
    h
}

/// Writes `report.json`, `report.md`, `report.html` (a self-contained page: tables, and the
/// reliability diagrams and confusion matrices inline), `confusion-<system>-<field>.svg` and
/// `reliability-<system>.svg`.
pub fn write(dir: &Path, report: &Report, runs: &[SystemRun]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, bytes: &[u8]| {
        triage_data::atomic_write(&dir.join(name), bytes).map_err(|e| std::io::Error::other(e.to_string()))
    };
    let json = serde_json::json!({ "report": report, "runs": runs });
    write(
        "report.json",
        serde_json::to_string_pretty(&json).expect("json").as_bytes(),
    )?;
    write("report.md", markdown(report).as_bytes())?;
    for s in &report.systems {
        for f in &s.fields {
            let name = format!("confusion-{}-{}.svg", file_slug(&s.name), f.field);
            write(
                &name,
                confusion_svg(&format!("{} — {}", s.name, f.field), f).as_bytes(),
            )?;
        }
        write(
            &format!("reliability-{}.svg", file_slug(&s.name)),
            reliability_svg(&format!("{} — reliability", s.name), &s.reliability).as_bytes(),
        )?;
    }
    write("report.html", html(report).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::gold;
    use triage_taxonomy::Validator;

    /// Four examples of one VPN ticket (ids e0..e3).
    fn four_examples(taxonomy: &Taxonomy) -> Vec<Example> {
        with_texts(taxonomy, &["vpn down"; 4])
    }

    /// Examples of `texts` with one VPN ticket's labels (ids e0, e1, …).
    fn with_texts(taxonomy: &Taxonomy, texts: &[&str]) -> Vec<Example> {
        let validator = Validator::new(taxonomy);
        let ticket = r#"{"summary":"VPN down","category":"Network","subcategory":"VPN","priority":"High","assignment_group":"Network Operations","request_type":"Incident"}"#;
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let line = serde_json::json!({"id": format!("e{i}"), "text": t, "lang": "en", "source": "t", "ticket": serde_json::from_str::<serde_json::Value>(ticket).unwrap()});
                Example::from_json_line(&line.to_string(), &validator).unwrap()
            })
            .collect()
    }

    /// The leak check counts evaluated examples with a re-sent or reworded copy in the
    /// training file, and the reports say so (in bold, with what it means) or say none.
    #[test]
    fn the_leak_check_counts_copies_of_training_texts() {
        let taxonomy = Taxonomy::builtin_default();
        let train = with_texts(
            &taxonomy,
            &[
                "Since this morning my laptop keeps dropping the Wi-Fi connection every few minutes, and applications take much longer to open than usual. I restarted it and checked the network settings, but nothing changed. Could you advise how to fix this?",
                "The printer on the third floor is out of toner and prints faint pages.",
            ],
        );
        let test = with_texts(
            &taxonomy,
            &[
                "Since this morning my laptop keeps losing its Wi-Fi connection every few minutes, and programs take far longer to open than usual. I have restarted it and checked the network settings, but the problem persists. Could you advise how to fix it?",
                "Outlook crashes whenever I open a PDF attachment.",
                "the printer on the third floor is out of toner and prints faint pages",
            ],
        );
        let o = TrainOverlap::check("the baseline's", "train.jsonl", &train, &test, 0.5);
        assert_eq!(o.near_duplicates, Some(2), "{o:?}");
        let strict = TrainOverlap::check("the baseline's", "train.jsonl", &train, &test, 0.8);
        assert_eq!(strict.near_duplicates, Some(1));
        let mut r = build(&taxonomy, "test.jsonl", &test, &[]);
        r.leak_checks = vec![
            o,
            TrainOverlap::unchecked("adapter a's", "", "its triage.json records no training file"),
        ];
        let md = markdown(&r);
        assert!(
            md.contains("Leak check, the baseline's training file `train.jsonl` (2 examples): **2 of** the 3 examples here")
                && md.contains("memorise"),
            "{md}"
        );
        assert!(
            md.contains("Leak check, adapter a's training file: not checked (its triage.json records no training file)."),
            "{md}"
        );
        assert!(html(&r)
            .contains("Leak check, the baseline's training file train.jsonl (2 examples): 2 of the 3"));
        let clean = TrainOverlap::check("the baseline's", "train.jsonl", &train, &test[1..2], 0.5);
        assert_eq!(
            clean.sentence(1),
            "Leak check, the baseline's training file `train.jsonl` (2 examples): none of the 1 examples here have a copy there (character 5-gram Jaccard ≥ 0.5)."
        );
    }

    /// `Other` is a subcategory of every category: filed under another category it is wrong,
    /// and the classes name their category. A decision without a confidence is left off the
    /// reliability diagram and never handled automatically. A class that was only ever
    /// predicted is listed. A p-value prints with three significant digits.
    #[test]
    fn repeated_subcategories_are_scored_under_their_category() {
        let taxonomy = Taxonomy::builtin_default();
        let validator = Validator::new(&taxonomy);
        let examples: Vec<Example> = (0..2)
            .map(|i| {
                let line = format!(
                    r#"{{"id":"e{i}","text":"odd noise","lang":"en","source":"t","ticket":{{"summary":"s","category":"Hardware","subcategory":"Other","priority":"Low","assignment_group":"Hardware Support","request_type":"Incident"}}}}"#
                );
                Example::from_json_line(&line, &validator).unwrap()
            })
            .collect();
        let predictions = examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                answer(&taxonomy, e, |f, v| match (f, i) {
                    ("category", 0) => ("Software".to_owned(), Some(0.7)),
                    ("priority", 0) => (v.to_owned(), None),
                    _ => (v.to_owned(), Some(0.9)),
                })
            })
            .collect();
        let runs = [SystemRun {
            name: "org/model".into(),
            predictions,
        }];
        let r = build(&taxonomy, "t", &examples, &runs);
        let sub = r.systems[0]
            .fields
            .iter()
            .find(|f| f.field == "subcategory")
            .unwrap();
        assert_eq!(sub.accuracy, 0.5, "Software's Other was scored as Hardware's");
        assert!(
            sub.labels.iter().any(|l| l == "Hardware › Other"),
            "{:?}",
            sub.labels
        );
        let md = markdown(&r);
        assert!(
            md.contains("Software › Other 0.00/0.00/0"),
            "a predicted-only class is missing"
        );
        // 2 examples x 5 fields, one without a confidence: the wrong category at 0.7, the
        // subcategory under it at 0.9 (wrong), seven right at 0.9. ECE: (1 × 0.7 + 8 × |0.9 −
        // 7/8|) / 9 = 0.1.
        let decisions: usize = r.systems[0].reliability.iter().map(|b| b.decisions).sum();
        assert_eq!(decisions, 9);
        assert!(
            md.contains("| confidence | decisions | mean confidence | accuracy |")
                && md.contains("| 0.6–0.8 | 1 | 0.70 | 0.0% |")
                && md.contains("| 0.8–1.0 | 8 | 0.90 | 87.5% |")
                && md.contains("| 0.0–0.2 | 0 | – | – |")
                && md.contains("Expected calibration error over these buckets: 10.0 points"),
            "{md}"
        );
        let at = |t: f64| r.systems[0].coverage.iter().find(|c| c.0 == t).unwrap().1;
        assert_eq!(
            at(0.5),
            0.5,
            "an example with an unknown confidence was auto-handled"
        );
        let cell = |p_value| {
            paired_cell(&Paired {
                field: "f".into(),
                wins: 1,
                losses: 2,
                p_value,
            })
        };
        assert_eq!(cell(0.0496), "1 / 2 (p 0.0496)");
        assert_eq!(cell(0.33), "1 / 2 (p 0.330)");
        assert_eq!(cell(1.0), "1 / 2 (p 1.00)");
        assert_eq!(file_slug("org/model"), "org-model");
    }

    /// A valid output for `e` whose value and confidence of each field `pick(field, gold
    /// value)` gives.
    fn answer(
        taxonomy: &Taxonomy,
        e: &Example,
        pick: impl Fn(&str, &str) -> (String, Option<f64>),
    ) -> Prediction {
        let gold = gold(taxonomy, e);
        let predicted = gold
            .iter()
            .map(|(f, v)| {
                let (p, c) = pick(f, v);
                (f.clone(), p, c)
            })
            .collect();
        Prediction {
            id: e.id.clone(),
            lang: "en".into(),
            gold,
            predicted,
            valid: true,
            error: None,
            latency_ms: 1.0,
        }
    }

    /// A failed example has no confidence: the review-threshold table never counts it as
    /// handled automatically, however sure the other examples are.
    #[test]
    fn failed_examples_are_never_auto_handled() {
        let taxonomy = Taxonomy::builtin_default();
        let examples = four_examples(&taxonomy);
        let predictions = examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let gold = gold(&taxonomy, e);
                let failed = i == 0;
                Prediction {
                    id: e.id.clone(),
                    lang: "en".into(),
                    predicted: match failed {
                        true => Vec::new(),
                        false => gold
                            .iter()
                            .map(|(f, v)| (f.clone(), v.clone(), Some(0.99)))
                            .collect(),
                    },
                    gold,
                    valid: !failed,
                    error: failed.then(|| "timeout".into()),
                    latency_ms: 1.0,
                }
            })
            .collect();
        let runs = [SystemRun {
            name: "s".into(),
            predictions,
        }];
        let r = build(&taxonomy, "t", &examples, &runs);
        let at = |t: f64| *r.systems[0].coverage.iter().find(|c| c.0 == t).unwrap();
        assert_eq!(at(0.9), (0.9, 0.75, 1.0));
        assert_eq!(at(0.0), (0.0, 1.0, 0.75));
    }

    /// Every system after the first is compared with it on the same examples: the split of
    /// the examples exactly one of them got right, per field and for whole tickets, with the
    /// McNemar p-value, in report.json's data and in report.md and report.html.
    #[test]
    fn systems_are_paired_with_the_first() {
        let taxonomy = Taxonomy::builtin_default();
        let examples = four_examples(&taxonomy);
        // Which examples each system gets the category right on; every other field is right.
        let run = |name: &str, right: [bool; 4]| SystemRun {
            name: name.into(),
            predictions: examples
                .iter()
                .zip(right)
                .map(|(e, ok)| {
                    answer(&taxonomy, e, |f, v| match (f, ok) {
                        ("category", false) => ("Hardware".to_owned(), Some(0.6)),
                        _ => (v.to_owned(), Some(0.9)),
                    })
                })
                .collect(),
        };
        let runs = [
            run("ref", [true, true, false, false]),
            run("new", [false, true, true, true]),
        ];
        let r = build(&taxonomy, "t", &examples, &runs);
        assert!(r.systems[0].vs_first.is_empty());
        let vs = &r.systems[1].vs_first;
        assert_eq!(vs.len(), taxonomy.fields.len() + 1);
        let get = |f: &str| vs.iter().find(|p| p.field == f).unwrap();
        // e2 and e3 right only in "new", e0 only in "ref"; 3 discordant examples split 2/1.
        let c = get("category");
        assert_eq!((c.wins, c.losses), (2, 1));
        assert!((c.p_value - 1.0).abs() < 1e-12);
        let all = get("all fields");
        assert_eq!((all.wins, all.losses), (2, 1));
        let same = get("priority");
        assert_eq!((same.wins, same.losses, same.p_value), (0, 0, 1.0));
        let md = markdown(&r);
        assert!(md.contains("### Paired with ref"), "{md}");
        assert!(md.contains("| category | 2 / 1 (p 1.00) |"), "{md}");
        // The paired table belongs to the overview, before the first per-system section.
        assert!(md.find("### Paired").unwrap() < md.find("\n## ref").unwrap());
        assert!(html(&r).contains("2 / 1 (p 1.00)"));
        // A p-value under 0.001 is written as such, escaped in the HTML.
        let r = build(
            &taxonomy,
            "t",
            &examples,
            &[run("ref", [true; 4]), run("new", [false; 4])],
        );
        let far = Paired {
            wins: 0,
            losses: 20,
            p_value: mcnemar_exact(0, 20),
            ..r.systems[1].vs_first[0].clone()
        };
        assert_eq!(paired_cell(&far), "0 / 20 (p < 0.001)");
        let mut r = r;
        r.systems[1].vs_first[0] = far;
        let page = html(&r);
        assert!(
            page.contains("0 / 20 (p &lt; 0.001)") && !page.contains("p < 0.001"),
            "{page}"
        );
    }
}
