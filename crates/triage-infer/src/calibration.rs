//! Calibration of the enum decisions: per field, a temperature and a bias per value on the
//! renormalised log-probabilities the decoder scores the allowed values with,
//! `z_v = log p_v / T + b_v` (temperature scaling plus a prior correction). The temperature
//! makes a field's confidence mean what it says; the biases correct a model that leans
//! towards some values (a base model's "High" for everything, an adapter that rarely says
//! "Critical"). Both are fitted on held-out labelled examples (`triage adapter calibrate`,
//! a validation split, never the test split) by minimising the negative log-likelihood with
//! an L2 penalty on the biases chosen by k-fold cross-validation. Biases change decisions, so
//! they are kept only when, out of fold, they lower the NLL below what the temperature alone
//! reaches, without lowering the accuracy; otherwise the temperature alone is fitted (it never
//! changes a decision), and a field whose cross-validated NLL does not improve either way is
//! left as it is. The figures a fit reports as "after" come from nested cross-validation: the
//! whole choice is made again without each held-out fold, so picking the best of several
//! candidates on the same folds does not flatter them.
//!
//! A calibration belongs to one adapter (it corrects that adapter's scores) and is kept in
//! the adapter's folder as `calibration.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The calibration file's name inside an adapter folder.
pub const FILE_NAME: &str = "calibration.json";

/// Temperatures a calibration file may hold (a fit keeps them within 0.05..=20).
pub const TEMPERATURE_RANGE: std::ops::RangeInclusive<f32> = 0.01..=100.0;

/// The largest bias magnitude a calibration file may hold.
pub const MAX_BIAS: f32 = 1000.0;

/// Per-field calibrations, applied to the decoder's enum scores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// What it was fitted on (data file, examples), for the record.
    pub fitted_on: String,
    /// SHA-256 of the adapter weights (`adapter_model.safetensors`) whose scores it was fitted
    /// on: a calibration corrects one adapter's leanings, and applied to other weights it
    /// would move their decisions at random. Absent in files of an older triage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_sha256: Option<String>,
    /// By field name; a field not listed is left as the model scores it.
    pub fields: BTreeMap<String, FieldCalibration>,
    /// The fit figures of the fields the fit left alone (nothing beat the model's own
    /// scores, or too few decisions), for the record: with `fields`, every field fitted on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub left_alone: BTreeMap<String, FitSummary>,
}

/// One field's temperature and value biases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldCalibration {
    /// Divides the log-probabilities (> 1 softens overconfident scores).
    pub temperature: f32,
    /// Added to a value's scaled log-probability (values not listed: 0).
    pub bias: BTreeMap<String, f32>,
    /// How the fit went on the data it was fitted on.
    pub fit: FitSummary,
}

/// Cross-validated figures of one field's fit: NLL per usable decision, accuracy over every
/// decision (the unreachable ones count wrong).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitSummary {
    /// Decisions used (the gold value was among the allowed values).
    pub decisions: usize,
    /// Decisions whose gold value could not be chosen: the field was decided under a wrong
    /// parent value (a subcategory under the wrong category), or the label is not among its
    /// allowed values. Wrong before and after, and not fitted on.
    #[serde(default)]
    pub unreachable: usize,
    /// Negative log-likelihood of the gold value as the model scores it.
    pub nll_before: f64,
    /// The same, out of fold, of the whole fitting procedure (nested cross-validation: each
    /// held-out fold's choice of temperature, biases and penalty made on the other folds
    /// alone). An estimate for the procedure, not for the one fit kept: for a field left
    /// alone it can differ from `nll_before`, where some folds chose to calibrate.
    pub nll_after: f64,
    /// Accuracy as the model decides.
    pub accuracy_before: f64,
    /// Accuracy out of fold of the whole fit, as `nll_after`.
    pub accuracy_after: f64,
    /// The out-of-fold NLL of the fit chosen, as the choice saw it: the best of several
    /// candidates on the same folds, so optimistic; for the record (files written before
    /// nested cross-validation hold this figure in `nll_after`, and 0 here).
    #[serde(default)]
    pub nll_chosen_on: f64,
    /// The accuracy the choice saw, as `nll_chosen_on`.
    #[serde(default)]
    pub accuracy_chosen_on: f64,
    /// The L2 penalty on the biases chosen by cross-validation (none: no biases, the
    /// temperature alone or nothing).
    pub penalty: Option<f64>,
    /// The cross-validation folds the figures come from: 0 when there were too few decisions
    /// or example groups for folds (nothing fitted, "after" is "before"); none in files
    /// written before this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folds: Option<usize>,
    /// Of those folds, how many left too few decisions or example groups in the others for
    /// the choice to be cross-validated there: the nested estimate scored the identity in
    /// them, whatever the data (0, and absent, when every fold could choose).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unfolded_inner: usize,
}

/// For serde: leave a zero count out.
fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Why a calibration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a calibration.
    #[error("{path}: not a calibration file ({reason}); refit it with `triage adapter calibrate`")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl Calibration {
    /// Reads `path` (a `calibration.json`), checking that every temperature lies in
    /// [`TEMPERATURE_RANGE`] and every bias within ±[`MAX_BIAS`].
    pub fn read(path: &Path) -> Result<Self, CalibrationError> {
        let text = std::fs::read_to_string(path).map_err(|source| CalibrationError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let malformed = |reason: String| CalibrationError::Malformed {
            path: path.display().to_string(),
            reason,
        };
        let cal: Calibration = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        for (name, f) in &cal.fields {
            // Outside these bounds the scaled scores overflow f32 (inf/NaN confidences) or one
            // value wins every decision; no fit produces them.
            if !(TEMPERATURE_RANGE.contains(&f.temperature)) {
                return Err(malformed(format!(
                    "field `{name}`: temperature {} (must be in {}..={})",
                    f.temperature,
                    TEMPERATURE_RANGE.start(),
                    TEMPERATURE_RANGE.end()
                )));
            }
            if let Some((v, b)) = f
                .bias
                .iter()
                .find(|(_, b)| !(b.is_finite() && b.abs() <= MAX_BIAS))
            {
                return Err(malformed(format!(
                    "field `{name}`: bias of `{v}` is {b} (|bias| must be ≤ {MAX_BIAS})"
                )));
            }
        }
        Ok(cal)
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Every field's validation figures, calibrated or left alone, by field name.
    pub fn summaries(&self) -> BTreeMap<&str, &FitSummary> {
        let calibrated = self.fields.iter().map(|(f, c)| (f.as_str(), &c.fit));
        calibrated
            .chain(self.left_alone.iter().map(|(f, s)| (f.as_str(), s)))
            .collect()
    }

    /// Calibrates the log-probabilities `logp` of `values` (the allowed values of `field`
    /// at this point, in the same order) in place; a field without calibration is unchanged.
    pub fn apply(&self, field: &str, values: &[&str], logp: &mut [f32]) {
        let Some(f) = self.fields.get(field) else {
            return;
        };
        for (v, l) in values.iter().zip(logp.iter_mut()) {
            *l = *l / f.temperature + f.bias.get(*v).copied().unwrap_or(0.0);
        }
    }
}

/// One enum decision of the model with its label: the allowed values with their
/// (uncalibrated) log-probabilities, and the gold value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    /// The field.
    pub field: String,
    /// Allowed values and their renormalised log-probabilities.
    pub candidates: Vec<(String, f32)>,
    /// The labelled value.
    pub gold: String,
    /// The example's group (its synthetic scenario; an imported ticket has none): the
    /// cross-validation of [`fit`] keeps a group's decisions in one fold, so that what it
    /// measures out of fold is what a split by group measures. `None`: a group of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The field depends on another one whose decoded value was not the gold one: the
    /// candidates are another parent's values, so the gold value cannot be chosen here even
    /// where one of them bears its name (`Other` under every category).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wrong_parent: bool,
}

/// Settings of [`fit`].
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Folds of the cross-validation that picks the penalty and checks the gain.
    pub folds: usize,
    /// Candidate L2 penalties on the biases.
    pub penalties: Vec<f64>,
    /// Fields with fewer usable decisions are not calibrated.
    pub min_decisions: usize,
    /// Try value biases (they can change decisions; kept only where they pay out of fold).
    /// `false`: a temperature per field only, so every decision stays as the model made it
    /// and only its confidence moves.
    pub biases: bool,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            folds: 5,
            penalties: vec![0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
            min_decisions: 20,
            biases: true,
        }
    }
}

/// One usable decision in index form: candidate value ids, their log-probs and the gold
/// position.
type Row = (Vec<usize>, Vec<f64>, usize);

/// One field's data in index form.
struct FieldData {
    values: Vec<String>,
    rows: Vec<Row>,
    /// Per row, its group's number (groups numbered in order of first appearance).
    groups: Vec<usize>,
    /// The numbers of the named groups seen so far.
    named: BTreeMap<String, usize>,
    /// Groups numbered so far (named and anonymous).
    n_groups: usize,
    /// Decisions whose gold value could not be chosen (decided under a wrong parent value, or
    /// a label not among the allowed values): wrong before and after, no signal for the fit.
    unreachable: usize,
}

/// Parameters of one field: scale `a = 1/T` and a bias per value id.
#[derive(Clone)]
struct Params {
    a: f64,
    b: Vec<f64>,
}

impl Params {
    fn identity(n: usize) -> Self {
        Params {
            a: 1.0,
            b: vec![0.0; n],
        }
    }

    /// The calibrated logits of one row.
    fn logits(&self, ids: &[usize], logp: &[f64]) -> Vec<f64> {
        ids.iter()
            .zip(logp)
            .map(|(&v, &l)| self.a * l + self.b[v])
            .collect()
    }
}

fn log_softmax_at(z: &[f64], i: usize) -> f64 {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|x| (x - m).exp()).sum();
    z[i] - m - s.ln()
}

fn argmax(z: &[f64]) -> usize {
    (0..z.len()).fold(0, |best, i| if z[i] > z[best] { i } else { best })
}

/// Summed NLL of `p` over `rows`, and how many of them it decides right (counted, so that
/// "no fewer right" is an exact comparison).
fn score(p: &Params, rows: &[&Row]) -> (f64, usize) {
    let (mut nll, mut right) = (0.0, 0);
    for (ids, logp, g) in rows {
        let z = p.logits(ids, logp);
        nll -= log_softmax_at(&z, *g);
        right += usize::from(argmax(&z) == *g);
    }
    (nll, right)
}

/// Penalised mean NLL and its gradient.
fn objective(p: &Params, rows: &[&Row], penalty: f64) -> (f64, Params) {
    let n = rows.len().max(1) as f64;
    let mut grad = Params {
        a: 0.0,
        b: vec![0.0; p.b.len()],
    };
    let mut loss = 0.0;
    for (ids, logp, g) in rows {
        let z = p.logits(ids, logp);
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        loss -= z[*g] - m - s.ln();
        for (j, (&v, &l)) in ids.iter().zip(logp.iter()).enumerate() {
            let q = e[j] / s - f64::from(u8::from(j == *g));
            grad.a += q * l / n;
            grad.b[v] += q / n;
        }
    }
    loss /= n;
    for (gb, b) in grad.b.iter_mut().zip(&p.b) {
        loss += penalty * b * b;
        *gb += 2.0 * penalty * b;
    }
    (loss, grad)
}

/// Minimises the (convex) penalised NLL by projected gradient descent (`1/T` kept within
/// 0.05..=20) with backtracking; without `biases`, over the temperature alone.
fn minimise(rows: &[&Row], n_values: usize, penalty: f64, biases: bool) -> Params {
    let mut p = Params::identity(n_values);
    let objective = |p: &Params| {
        let (l, mut g) = objective(p, rows, penalty);
        if !biases {
            g.b.iter_mut().for_each(|b| *b = 0.0);
        }
        (l, g)
    };
    let (mut loss, mut grad) = objective(&p);
    let mut step = 1.0;
    for _ in 0..500 {
        // Converged when the projected gradient vanishes: a scale held at its bound and
        // pushing beyond it does not count.
        let held = (p.a <= 0.05 && grad.a > 0.0) || (p.a >= 20.0 && grad.a < 0.0);
        let grad_a = if held { 0.0 } else { grad.a };
        let norm2 = grad_a * grad_a + grad.b.iter().map(|g| g * g).sum::<f64>();
        if norm2 < 1e-12 {
            break;
        }
        loop {
            let cand = Params {
                a: (p.a - step * grad.a).clamp(0.05, 20.0),
                b: p.b.iter().zip(&grad.b).map(|(b, g)| b - step * g).collect(),
            };
            // The decrease the gradient promises for the step actually taken: where the
            // clamp holds the scale, only the biases move (a test on the unprojected step
            // would reject every step there and stall the biases).
            let promised = grad.a * (p.a - cand.a)
                + grad
                    .b
                    .iter()
                    .zip(p.b.iter().zip(&cand.b))
                    .map(|(g, (b, c))| g * (b - c))
                    .sum::<f64>();
            let (l, g) = objective(&cand);
            if l <= loss - 0.25 * promised || step < 1e-8 {
                (p, loss, grad) = (cand, l, g);
                step = (step * 2.0).min(64.0);
                break;
            }
            step *= 0.5;
        }
    }
    p
}

/// What a field's fit keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Choice {
    /// Nothing: the model's scores as they are.
    Identity,
    /// A temperature alone (never changes a decision).
    Temperature,
    /// A temperature and value biases with this L2 penalty.
    Biases(f64),
}

impl Choice {
    /// The parameters of this choice fitted on `rows`.
    fn fit(self, rows: &[&Row], n_values: usize) -> Params {
        match self {
            Choice::Identity => Params::identity(n_values),
            Choice::Temperature => minimise(rows, n_values, 0.0, false),
            Choice::Biases(penalty) => minimise(rows, n_values, penalty, true),
        }
    }
}

/// The fold of each row for k-fold cross-validation by group (`groups`: each row's group
/// number): the groups numbered in order of first appearance, the n-th to fold n mod k, so a
/// group is never on both sides and the folds depend on nothing but the data and its order.
/// `None` when the rows are too few (`min_decisions`) or have fewer than k groups.
fn folds(groups: &[usize], opts: &FitOptions) -> Option<(Vec<usize>, usize)> {
    let k = opts.folds.max(2);
    let mut rank = BTreeMap::new();
    let fold: Vec<usize> = groups
        .iter()
        .map(|&g| {
            let next = rank.len();
            *rank.entry(g).or_insert(next) % k
        })
        .collect();
    (groups.len() >= opts.min_decisions.max(k) && rank.len() >= k).then_some((fold, k))
}

/// `(train, held)` of fold `f`: the rows (and their indices) of the other folds, and of `f`.
fn split_fold<'a>(rows: &[&'a Row], fold: &[usize], f: usize) -> ((Vec<&'a Row>, Vec<usize>), Vec<&'a Row>) {
    let mut train = (Vec::new(), Vec::new());
    let mut held = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        match fold[i] == f {
            true => held.push(*r),
            false => {
                train.0.push(*r);
                train.1.push(i);
            }
        }
    }
    (train, held)
}

/// Out-of-fold (summed NLL, right) of `choice`, fitted on the other folds each time.
fn cross_validate(
    choice: Choice,
    rows: &[&Row],
    (fold, k): (&[usize], usize),
    n_values: usize,
) -> (f64, usize) {
    (0..k).fold((0.0, 0), |(nll, right), f| {
        let ((train, _), held) = split_fold(rows, fold, f);
        let (l, r) = score(&choice.fit(&train, n_values), &held);
        (nll + l, right + r)
    })
}

/// Chooses what to fit on `rows` (each with its group number in `groups`) by k-fold
/// cross-validation: biases (the penalty with the lowest out-of-fold NLL) only when, out of
/// fold, they beat both the temperature alone and the identity on NLL with no fewer decisions
/// right; else the temperature when it beats the identity on NLL; else nothing. Returns the
/// choice and its out-of-fold (summed NLL, right); too few rows or groups: the identity.
fn choose(rows: &[&Row], groups: &[usize], n_values: usize, opts: &FitOptions) -> (Choice, (f64, usize)) {
    let before = score(&Params::identity(n_values), rows);
    let Some((fold, k)) = folds(groups, opts) else {
        return (Choice::Identity, before);
    };
    let plan = (fold.as_slice(), k);
    let temperature = cross_validate(Choice::Temperature, rows, plan, n_values);
    let biased = opts
        .penalties
        .iter()
        .filter(|_| opts.biases)
        .map(|&pen| {
            (
                Choice::Biases(pen),
                cross_validate(Choice::Biases(pen), rows, plan, n_values),
            )
        })
        .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
        .filter(|(_, (nll, right))| *nll < before.0.min(temperature.0) && *right >= before.1);
    match biased {
        Some(chosen) => chosen,
        // A temperature keeps every decision: as many right as before.
        None if temperature.0 < before.0 => (Choice::Temperature, (temperature.0, before.1)),
        None => (Choice::Identity, before),
    }
}

/// Out-of-fold (summed NLL, right) of the whole procedure of [`choose`] (nested
/// cross-validation): for each outer fold, the choice is made by cross-validation on the other
/// folds alone and fitted there, then scored on the fold. Unlike the figures the choice was
/// made on, this is not biased upwards by picking the best of several fits. Also returns in
/// how many outer folds the other folds were too few to cross-validate, so that the choice
/// there was the identity whatever the data.
fn nested(
    rows: &[&Row],
    groups: &[usize],
    (fold, k): (&[usize], usize),
    n_values: usize,
    opts: &FitOptions,
) -> (f64, usize, usize) {
    // Each outer-train part holds (k-1)/k of the rows: the least that the whole set needs,
    // scaled the same way, so that a field just above the minimum is still fitted inside.
    let inner = FitOptions {
        min_decisions: (opts.min_decisions * (k - 1)).div_ceil(k),
        ..opts.clone()
    };
    (0..k).fold((0.0, 0, 0), |(nll, right, unfolded), f| {
        let ((train, idx), held) = split_fold(rows, fold, f);
        let train_groups: Vec<usize> = idx.iter().map(|&i| groups[i]).collect();
        let (choice, _) = choose(&train, &train_groups, n_values, &inner);
        let (l, r) = score(&choice.fit(&train, n_values), &held);
        let no_folds = folds(&train_groups, &inner).is_none();
        (nll + l, right + r, unfolded + no_folds as usize)
    })
}

/// Fits one calibration per field from labelled decisions (see the module docs). Fields with
/// fewer than `min_decisions` usable decisions, or whose cross-validated NLL does not improve,
/// are left out; every field's figures are returned, left out or not.
pub fn fit(decisions: &[Decision], opts: &FitOptions) -> (Calibration, BTreeMap<String, FitSummary>) {
    let mut by_field: BTreeMap<&str, FieldData> = BTreeMap::new();
    for d in decisions {
        if d.candidates.len() < 2 {
            continue; // forced: nothing was decided
        }
        let data = by_field.entry(d.field.as_str()).or_insert_with(|| FieldData {
            values: Vec::new(),
            rows: Vec::new(),
            groups: Vec::new(),
            named: BTreeMap::new(),
            n_groups: 0,
            unreachable: 0,
        });
        let gold = d.candidates.iter().position(|(v, _)| *v == d.gold);
        let Some(gold) = gold.filter(|_| !d.wrong_parent) else {
            data.unreachable += 1; // a wrong parent value: wrong whatever this field decides
            continue;
        };
        let ids = d
            .candidates
            .iter()
            .map(|(v, _)| match data.values.iter().position(|x| x == v) {
                Some(i) => i,
                None => {
                    data.values.push(v.clone());
                    data.values.len() - 1
                }
            })
            .collect();
        // Renormalised log-probabilities are ≤ 0; a floor keeps exp() finite.
        let logp = d
            .candidates
            .iter()
            .map(|(_, l)| f64::from(*l).max(-60.0))
            .collect();
        data.rows.push((ids, logp, gold));
        let next = data.n_groups;
        let group = match &d.group {
            Some(g) => *data.named.entry(g.clone()).or_insert(next),
            None => next,
        };
        data.n_groups = data.n_groups.max(group + 1);
        data.groups.push(group);
    }
    let mut cal = Calibration::default();
    let mut summaries = BTreeMap::new();
    for (field, data) in by_field {
        let all: Vec<&Row> = data.rows.iter().collect();
        let n_values = data.values.len();
        // NLL per usable decision; accuracy over every decision, the unreachable ones wrong.
        let (rows, total) = (
            all.len().max(1) as f64,
            (all.len() + data.unreachable).max(1) as f64,
        );
        let (nll, right) = score(&Params::identity(n_values), &all);
        let (choice, (nll_cv, right_cv)) = choose(&all, &data.groups, n_values, opts);
        let plan = folds(&data.groups, opts);
        let (nll_after, right_after, unfolded_inner) = match &plan {
            Some((fold, k)) => nested(&all, &data.groups, (fold, *k), n_values, opts),
            None => (nll, right, 0),
        };
        let summary = FitSummary {
            decisions: all.len(),
            unreachable: data.unreachable,
            nll_before: nll / rows,
            nll_after: nll_after / rows,
            accuracy_before: right as f64 / total,
            accuracy_after: right_after as f64 / total,
            nll_chosen_on: nll_cv / rows,
            accuracy_chosen_on: right_cv as f64 / total,
            penalty: match choice {
                Choice::Biases(penalty) => Some(penalty),
                _ => None,
            },
            folds: Some(plan.map_or(0, |(_, k)| k)),
            unfolded_inner,
        };
        if choice == Choice::Identity {
            cal.left_alone.insert(field.to_owned(), summary.clone());
        } else {
            let p = choice.fit(&all, n_values);
            cal.fields.insert(
                field.to_owned(),
                FieldCalibration {
                    temperature: (1.0 / p.a) as f32,
                    bias: match choice {
                        Choice::Biases(_) => data
                            .values
                            .iter()
                            .cloned()
                            .zip(p.b.iter().map(|&b| b as f32))
                            .collect(),
                        _ => BTreeMap::new(),
                    },
                    fit: summary.clone(),
                },
            );
        }
        summaries.insert(field.to_owned(), summary);
    }
    (cal, summaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests check the same numbers.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.next().max(1e-12), self.next());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    fn log_normalise(z: &[f64]) -> Vec<f32> {
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|x| (x - m).exp()).sum();
        z.iter().map(|x| (x - m - s.ln()) as f32).collect()
    }

    /// `n` decisions among `values`: true log-odds drawn with spread `spread`, the gold
    /// value sampled from them, and the model's scores `model(truth)` renormalised.
    fn decisions(
        n: usize,
        values: &[&str],
        spread: f64,
        rng: &mut Rng,
        model: impl Fn(&mut [f64]),
    ) -> Vec<Decision> {
        (0..n)
            .map(|_| {
                let mut z: Vec<f64> = values.iter().map(|_| spread * rng.normal()).collect();
                let truth = log_normalise(&z);
                let mut u = rng.next();
                let gold = (0..values.len())
                    .find(|&i| {
                        u -= f64::from(truth[i]).exp();
                        u <= 0.0
                    })
                    .unwrap_or(values.len() - 1);
                model(&mut z);
                Decision {
                    field: "f".into(),
                    candidates: values
                        .iter()
                        .map(|v| v.to_string())
                        .zip(log_normalise(&z))
                        .collect(),
                    gold: values[gold].into(),
                    group: None,
                    wrong_parent: false,
                }
            })
            .collect()
    }

    /// A model that is overconfident (its log-odds are twice the truth's) and leans away from
    /// "Critical" (1.5 too low): the truth is `p ∝ exp(logp / 2 + b)` with b(Critical) = +0.75.
    #[test]
    fn fit_recovers_the_temperature_and_the_bias() {
        let values = ["Low", "Medium", "High", "Critical"];
        let d = decisions(4000, &values, 1.5, &mut Rng(0x9e37_79b9_7f4a_7c15), |z| {
            z.iter_mut().for_each(|x| *x *= 2.0);
            z[3] -= 1.5;
        });
        let (cal, summary) = fit(&d, &FitOptions::default());
        let f = &cal.fields["f"];
        assert!(
            (f.temperature - 2.0).abs() < 0.25,
            "temperature {}",
            f.temperature
        );
        // Biases are identified up to a shared constant: compare Critical with the others.
        let others = (f.bias["Low"] + f.bias["Medium"] + f.bias["High"]) / 3.0;
        let rel = f.bias["Critical"] - others;
        assert!((rel - 0.75).abs() < 0.25, "Critical's relative bias {rel}");
        let s = &summary["f"];
        assert!(s.nll_after < s.nll_before - 0.05, "{s:?}");
        assert!(s.accuracy_after >= s.accuracy_before, "{s:?}");
    }

    #[test]
    fn temperature_only_keeps_every_decision_of_a_biased_model() {
        let d = decisions(
            4000,
            &["Low", "Medium", "High", "Critical"],
            1.5,
            &mut Rng(3),
            |z| {
                z.iter_mut().for_each(|x| *x *= 2.0);
                z[3] -= 1.5;
            },
        );
        let opts = FitOptions {
            biases: false,
            ..FitOptions::default()
        };
        let (cal, summary) = fit(&d, &opts);
        let f = &cal.fields["f"];
        assert!(f.bias.is_empty(), "{f:?}");
        assert!((f.temperature - 2.0).abs() < 0.4, "temperature {}", f.temperature);
        let s = &summary["f"];
        assert_eq!(s.accuracy_after, s.accuracy_before, "{s:?}");
        assert!(s.nll_after < s.nll_before && s.penalty.is_none(), "{s:?}");
    }

    #[test]
    fn a_calibrated_model_is_left_alone() {
        // Labels drawn from the model's own probabilities: nothing to correct out of fold.
        let d = decisions(300, &["a", "b", "c"], 1.0, &mut Rng(7), |_| {});
        let (cal, summary) = fit(&d, &FitOptions::default());
        if let Some(f) = cal.fields.get("f") {
            // Kept only for a real out-of-fold gain, and then close to the identity.
            assert!((f.temperature - 1.0).abs() < 0.3, "{f:?}");
            assert!(f.bias.values().all(|b| b.abs() < 0.3), "{f:?}");
        }
        assert_eq!(summary["f"].decisions, 300);
        assert_eq!(summary["f"].folds, Some(FitOptions::default().folds));
    }

    #[test]
    fn an_overconfident_unbiased_model_gets_its_temperature_and_keeps_its_decisions() {
        let d = decisions(1000, &["a", "b", "c", "d"], 1.0, &mut Rng(11), |z| {
            z.iter_mut().for_each(|x| *x *= 3.0)
        });
        let (cal, summary) = fit(&d, &FitOptions::default());
        let f = &cal.fields["f"];
        assert!((f.temperature - 3.0).abs() < 0.4, "{f:?}");
        assert!(f.bias.values().all(|b| b.abs() < 0.15), "{f:?}");
        let s = &summary["f"];
        assert!(
            s.nll_after < s.nll_before && s.accuracy_after >= s.accuracy_before,
            "{s:?}"
        );
    }

    #[test]
    fn forced_and_unreachable_decisions_are_skipped_and_small_fields_left_out() {
        let d = |cands: &[(&str, f32)], gold: &str| Decision {
            field: "g".into(),
            candidates: cands.iter().map(|(v, l)| (v.to_string(), *l)).collect(),
            gold: gold.into(),
            group: None,
            wrong_parent: false,
        };
        let under_wrong_parent = Decision {
            wrong_parent: true,
            ..d(&[("x", -0.1), ("Other", -2.4)], "Other")
        };
        let decisions = vec![
            d(&[("x", 0.0)], "x"),               // forced
            d(&[("x", -0.1), ("y", -2.4)], "z"), // gold not allowed here
            under_wrong_parent,                  // `Other`, but another parent's
            d(&[("x", -0.1), ("y", -2.4)], "x"), // usable
        ];
        let (cal, summary) = fit(&decisions, &FitOptions::default());
        assert!(cal.is_empty());
        let s = &summary["g"];
        assert_eq!((s.decisions, s.unreachable), (1, 2), "{s:?}");
        // The unreachable ones count wrong: one of three right, before and after.
        assert_eq!(
            (s.accuracy_before, s.accuracy_after),
            (1.0 / 3.0, 1.0 / 3.0),
            "{s:?}"
        );
    }

    /// Labels drawn from a calibrated model's own probabilities: no bias helps unseen
    /// examples, yet with seven penalties to pick from, the figures the choice is made on
    /// never show a loss and sometimes a gain. The nested figures do not inherit that: over
    /// many draws they average no better than before (a reported "after" equal to the chosen
    /// figure would gain on every draw it kept biases).
    #[test]
    fn nested_figures_are_not_flattered_by_the_choice() {
        let (mut chosen, mut after, mut kept) = (0.0, 0.0, 0);
        let (mut nll_chosen, mut nll_after) = (0.0, 0.0);
        for seed in 1..=12 {
            let d = decisions(
                120,
                &["a", "b", "c", "d", "e", "f"],
                1.5,
                &mut Rng(seed * 7919),
                |_| {},
            );
            let s = fit(&d, &FitOptions::default()).1["f"].clone();
            if s.penalty.is_some() {
                kept += 1;
                chosen += s.accuracy_chosen_on - s.accuracy_before;
                after += s.accuracy_after - s.accuracy_before;
                nll_chosen += s.nll_chosen_on;
                nll_after += s.nll_after;
            }
        }
        assert!(kept > 0, "no draw kept biases: the test shows nothing");
        assert!(
            after < chosen && nll_after > nll_chosen,
            "nested {after} / NLL {nll_after} vs chosen-on {chosen} / NLL {nll_chosen} over {kept} draws"
        );
    }

    /// A field just above the fewest decisions a fit needs (20): each nested fold fits on
    /// four fifths of them, and must still be allowed to (held to the full minimum, every
    /// fold would keep the identity and "after" would just repeat "before").
    #[test]
    fn a_field_just_above_the_minimum_is_fitted_inside_the_nested_folds() {
        let d = decisions(22, &["a", "b", "c", "d"], 1.0, &mut Rng(17), |z| {
            z.iter_mut().for_each(|x| *x *= 5.0)
        });
        let s = fit(&d, &FitOptions::default()).1["f"].clone();
        assert!(s.nll_after < s.nll_before, "{s:?}");
    }

    /// A model sure of a value that four labels in five contradict: the scale `1/T` wants to
    /// go below its bound (0.05), and the biases must still be fitted there (a step test on
    /// the unprojected gradient rejected every step once the scale was held).
    #[test]
    fn biases_are_fitted_with_the_scale_at_its_bound() {
        let rows: Vec<Row> = (0..200)
            .map(|i| (vec![0, 1], vec![-4.54e-5, -10.0], usize::from(i % 5 != 0)))
            .collect();
        let rows: Vec<&Row> = rows.iter().collect();
        let p = minimise(&rows, 2, 0.001, true);
        assert_eq!(p.a, 0.05);
        let (_, g) = objective(&p, &rows, 0.001);
        assert!(g.b.iter().all(|b| b.abs() < 1e-3), "bias gradient {:?}", g.b);
    }

    /// Twenty scenarios in ten pairs, each scenario with its own gold value; in a pair, the
    /// model hesitates between the two values. In the first scenario of a pair it ranks its
    /// partner's value first (wrong); in the second, its own value first by a wide margin. A
    /// bias on the first scenario's value, learnt from that scenario's own examples, fixes its
    /// held-out ones without costing the partner; it cannot be learnt without them, since no
    /// other scenario labels that value. Folds by position put a scenario on both sides and
    /// see a gain that a split by scenario never sees; folds by group see none.
    #[test]
    fn folds_by_group_keep_a_scenario_out_of_its_own_fit() {
        let values: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
        let mut rng = Rng(21);
        let mut d = Vec::new();
        for scenario in 0..20 {
            let partner = (scenario + 10) % 20;
            for _ in 0..8 {
                let mut z: Vec<f64> = values.iter().map(|_| -6.0 + 0.3 * rng.normal()).collect();
                let (own, other) = if scenario < 10 { (0.0, 1.0) } else { (2.0, 0.0) };
                z[scenario] = own + 0.3 * rng.normal();
                z[partner] = other + 0.3 * rng.normal();
                d.push(Decision {
                    field: "f".into(),
                    candidates: values.iter().cloned().zip(log_normalise(&z)).collect(),
                    gold: values[scenario].clone(),
                    group: Some(format!("s{scenario}")),
                    wrong_parent: false,
                });
            }
        }
        let by_group = fit(&d, &FitOptions::default()).1["f"].clone();
        for x in &mut d {
            x.group = None;
        }
        let by_position = fit(&d, &FitOptions::default()).1["f"].clone();
        assert!(
            by_position.penalty.is_some() && by_position.accuracy_after > by_position.accuracy_before + 0.2,
            "by position {by_position:?}"
        );
        assert!(
            by_group.accuracy_after < by_group.accuracy_before + 0.05,
            "by group {by_group:?}"
        );
    }

    #[test]
    fn as_many_groups_as_folds_leave_no_inner_folds() {
        // Five groups, five folds: each outer fold's other folds hold four groups, too few to
        // choose on, so the nested estimate scores the identity in all five.
        let (_, summary) = fit(&leaning_in_groups(5), &FitOptions::default());
        let s = &summary["f"];
        assert_eq!((s.folds, s.unfolded_inner), (Some(5), 5), "{s:?}");
        assert_eq!(s.accuracy_after, s.accuracy_before, "{s:?}");
        // With many groups every fold can choose.
        let d = decisions(300, &["a", "b", "c"], 1.0, &mut Rng(7), |_| {});
        assert_eq!(fit(&d, &FitOptions::default()).1["f"].unfolded_inner, 0);
    }

    /// 200 decisions of a model that leans away from "a", in `groups` example groups taken in
    /// turn.
    fn leaning_in_groups(groups: usize) -> Vec<Decision> {
        let mut d = decisions(200, &["a", "b"], 1.0, &mut Rng(5), |z| z[0] -= 1.0);
        for (i, x) in d.iter_mut().enumerate() {
            x.group = Some(format!("g{}", i % groups));
        }
        d
    }

    #[test]
    fn fewer_groups_than_folds_leave_the_field_alone() {
        let (cal, summary) = fit(&leaning_in_groups(3), &FitOptions::default());
        assert!(cal.is_empty(), "{cal:?}");
        assert_eq!(summary["f"].decisions, 200);
        // Its figures are kept for the record all the same, saying that no folds were made.
        assert_eq!(cal.left_alone["f"], summary["f"]);
        assert_eq!(summary["f"].folds, Some(0));
    }

    #[test]
    fn apply_scales_and_shifts_only_its_fields() {
        let mut cal = Calibration::default();
        cal.fields.insert(
            "priority".into(),
            FieldCalibration {
                temperature: 2.0,
                bias: [("Critical".to_string(), 1.0)].into_iter().collect(),
                fit: FitSummary::default(),
            },
        );
        let mut l = [-0.2f32, -3.0];
        cal.apply("priority", &["High", "Critical"], &mut l);
        assert_eq!(l, [-0.1, -0.5]);
        let mut other = [-0.2f32, -3.0];
        cal.apply("category", &["a", "b"], &mut other);
        assert_eq!(other, [-0.2, -3.0]);
    }

    #[test]
    fn files_round_trip_and_bad_ones_name_the_path_and_the_field() {
        let dir = std::env::temp_dir().join(format!("triage-cal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let mut rng = Rng(3);
        let d = decisions(400, &["a", "b"], 1.0, &mut rng, |z| z[0] -= 1.0);
        let (cal, _) = fit(&d, &FitOptions::default());
        std::fs::write(&path, serde_json::to_vec_pretty(&cal).unwrap()).unwrap();
        assert_eq!(Calibration::read(&path).unwrap(), cal);

        let bad = r#"{"fitted_on":"x","fields":{"priority":{"temperature":-1.0,"bias":{},"fit":{"decisions":1,"nll_before":0,"nll_after":0,"accuracy_before":0,"accuracy_after":0,"penalty":null}}}}"#;
        std::fs::write(&path, bad).unwrap();
        let e = Calibration::read(&path).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("priority"),
            "{e}"
        );
        for (t, b) in [("1e-45", "0.0"), ("1.0", "1e9")] {
            let extreme = bad
                .replace("-1.0", t)
                .replace("{},", &format!("{{\"High\":{b}}},"));
            std::fs::write(&path, extreme).unwrap();
            let e = Calibration::read(&path).unwrap_err().to_string();
            assert!(e.contains("priority") && e.contains("must be"), "{e}");
        }
        std::fs::write(&path, b"\x00\x01garbage").unwrap();
        let e = Calibration::read(&path).unwrap_err().to_string();
        assert!(e.contains("not a calibration file"), "{e}");
        let e = Calibration::read(&dir.join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
