//! Classification metrics for one field.

use serde::Serialize;

/// Precision, recall, F1 and support of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    /// Class (field value).
    pub class: String,
    /// Of the predictions of this class, the share that was right (0 when never predicted).
    pub precision: f64,
    /// Of the examples of this class, the share predicted as it.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Examples of this class.
    pub support: usize,
    /// Predictions of this class.
    pub predicted: usize,
}

/// Metrics of one field over a set of examples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldReport {
    /// Field name.
    pub field: String,
    /// Share of exact matches.
    pub accuracy: f64,
    /// Unweighted mean F1 over the classes present in gold or predictions; a predicted label
    /// that is neither one of `classes` nor ever gold (the `(failed)` of a failed example) is
    /// left out: the failure already costs its gold class's recall.
    pub macro_f1: f64,
    /// Per-class scores, in `classes` order.
    pub classes: Vec<ClassScore>,
    /// `confusion[gold][predicted]` counts, indices into `labels`.
    pub confusion: Vec<Vec<usize>>,
    /// Row/column labels of the confusion matrix.
    pub labels: Vec<String>,
}

/// Computes the metrics of one field. `classes` fixes the label order (e.g. taxonomy order);
/// labels outside it are appended in order of appearance.
pub fn field_report(field: &str, classes: &[&str], gold: &[&str], predicted: &[&str]) -> FieldReport {
    assert_eq!(gold.len(), predicted.len(), "gold and predictions must align");
    let mut labels: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
    for l in gold.iter().chain(predicted) {
        if !labels.iter().any(|x| x == l) {
            labels.push(l.to_string());
        }
    }
    let idx = |l: &str| labels.iter().position(|x| x == l).expect("label collected");
    let k = labels.len();
    let mut confusion = vec![vec![0usize; k]; k];
    for (g, p) in gold.iter().zip(predicted) {
        confusion[idx(g)][idx(p)] += 1;
    }
    let n = gold.len();
    let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
    let mut scores = Vec::with_capacity(k);
    let mut f1_sum = 0.0;
    let mut present = 0;
    for i in 0..k {
        let tp = confusion[i][i] as f64;
        let support: usize = confusion[i].iter().sum();
        let predicted_i: usize = (0..k).map(|r| confusion[r][i]).sum();
        let precision = if predicted_i > 0 {
            tp / predicted_i as f64
        } else {
            0.0
        };
        let recall = if support > 0 { tp / support as f64 } else { 0.0 };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        if support > 0 || (predicted_i > 0 && i < classes.len()) {
            f1_sum += f1;
            present += 1;
        }
        scores.push(ClassScore {
            predicted: predicted_i,
            class: labels[i].clone(),
            precision,
            recall,
            f1,
            support,
        });
    }
    FieldReport {
        field: field.to_owned(),
        accuracy: if n > 0 { correct as f64 / n as f64 } else { 0.0 },
        macro_f1: if present > 0 { f1_sum / present as f64 } else { 0.0 },
        classes: scores,
        confusion,
        labels,
    }
}

/// One confidence bucket of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bucket {
    /// The bucket's lower bound (included).
    pub lower: f64,
    /// Its upper bound (excluded, except 1.0 in the last bucket).
    pub upper: f64,
    /// Decisions whose confidence falls in the bucket.
    pub decisions: usize,
    /// The share of them that is right (0 when there are none).
    pub accuracy: f64,
    /// Their mean confidence (0 when there are none): for a calibrated model, about the
    /// accuracy ("does 0.9 mean 90 % right?").
    pub mean_confidence: f64,
}

/// Accuracy and mean confidence per confidence bucket, for `buckets` equal-width buckets over
/// [0, 1]; a confidence outside [0, 1] counts as its nearest bound, and one that is not a
/// number (none of triage's engines gives one) is left out rather than spoiling its bucket.
pub fn reliability(confidence: &[f64], correct: &[bool], buckets: usize) -> Vec<Bucket> {
    let b = buckets.max(1);
    let mut n = vec![0usize; b];
    let mut ok = vec![0usize; b];
    let mut sum = vec![0f64; b];
    for (c, r) in confidence.iter().zip(correct).filter(|(c, _)| !c.is_nan()) {
        let c = c.clamp(0.0, 1.0);
        let i = ((c * b as f64) as usize).min(b - 1);
        n[i] += 1;
        ok[i] += *r as usize;
        sum[i] += c;
    }
    let share = |x: f64, n: usize| if n > 0 { x / n as f64 } else { 0.0 };
    (0..b)
        .map(|i| Bucket {
            lower: i as f64 / b as f64,
            upper: (i + 1) as f64 / b as f64,
            decisions: n[i],
            accuracy: share(ok[i] as f64, n[i]),
            mean_confidence: share(sum[i], n[i]),
        })
        .collect()
}

/// The expected calibration error over `buckets`: the mean, weighted by decisions, of each
/// bucket's gap between mean confidence and accuracy (0 is perfectly calibrated, at the
/// buckets' resolution); `None` without decisions.
pub fn calibration_error(buckets: &[Bucket]) -> Option<f64> {
    let total: usize = buckets.iter().map(|b| b.decisions).sum();
    (total > 0).then(|| {
        buckets
            .iter()
            .map(|b| b.decisions as f64 * (b.mean_confidence - b.accuracy).abs())
            .sum::<f64>()
            / total as f64
    })
}

/// For each threshold: the share of examples kept (confidence ≥ threshold, the rest goes to
/// human review) and the accuracy on them: `(threshold, coverage, accuracy)`.
pub fn coverage_curve(confidence: &[f64], correct: &[bool], thresholds: &[f64]) -> Vec<(f64, f64, f64)> {
    let n = confidence.len().max(1) as f64;
    thresholds
        .iter()
        .map(|&t| {
            let kept: Vec<bool> = confidence
                .iter()
                .zip(correct)
                .filter(|(c, _)| **c >= t)
                .map(|(_, r)| *r)
                .collect();
            let acc = if kept.is_empty() {
                0.0
            } else {
                kept.iter().filter(|r| **r).count() as f64 / kept.len() as f64
            };
            (t, kept.len() as f64 / n, acc)
        })
        .collect()
}

/// Two-sided exact McNemar test of two systems A and B on the same examples: `wins` examples
/// only A got right, `losses` only B (symmetric: swapping them gives the same p-value). Under
/// "equally good", each of the `wins + losses`
/// discordant examples goes either way with probability 1/2; the p-value is the probability of
/// a split at least as uneven (1 when there is no discordant example).
pub fn mcnemar_exact(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    let k = wins.min(losses);
    // P(X <= k) for X ~ Binomial(n, 1/2), summed in log space: C(n, i) / 2^n overflows f64
    // for large n long before the sum is small.
    let mut log_pmf = -(n as f64) * std::f64::consts::LN_2;
    let mut tail = 0.0;
    for i in 0..=k {
        tail += log_pmf.exp();
        log_pmf += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_example() {
        // gold:  a a a b b c ; pred: a a b b c c
        let r = field_report(
            "f",
            &["a", "b", "c"],
            &["a", "a", "a", "b", "b", "c"],
            &["a", "a", "b", "b", "c", "c"],
        );
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
        let a = &r.classes[0];
        assert_eq!((a.precision, a.support), (1.0, 3));
        assert!((a.recall - 2.0 / 3.0).abs() < 1e-12);
        let c = &r.classes[2];
        assert!((c.precision - 0.5).abs() < 1e-12 && c.recall == 1.0);
        // F1: a 0.8, b 0.5, c 2/3.
        assert!(
            (r.macro_f1 - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12,
            "{}",
            r.macro_f1
        );
        assert_eq!(r.confusion, vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]);
        // Unknown predictions are appended as labels.
        let r = field_report("f", &["a"], &["a"], &["z"]);
        assert_eq!(r.labels, vec!["a", "z"]);
        assert_eq!(r.accuracy, 0.0);
        // The `(failed)` of a failed example costs its gold class's recall, and is not a
        // class of its own in macro-F1: a 1.0, b 0.0.
        let r = field_report("f", &["a", "b"], &["a", "b"], &["a", "(failed)"]);
        assert_eq!(r.macro_f1, 0.5);
    }

    #[test]
    fn reliability_and_coverage() {
        let conf = [0.95, 0.9, 0.55, 0.2];
        let ok = [true, true, false, false];
        let rel = reliability(&conf, &ok, 2);
        assert_eq!(rel[0].decisions, 1);
        assert_eq!(rel[1].decisions, 3);
        assert!((rel[1].accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((rel[0].mean_confidence - 0.2).abs() < 1e-12);
        assert!((rel[1].mean_confidence - 0.8).abs() < 1e-12);
        // (1 × |0.2 − 0| + 3 × |0.8 − 2/3|) / 4 = 0.15
        let ece = calibration_error(&rel).unwrap();
        assert!((ece - 0.15).abs() < 1e-12, "{ece}");
        // Underconfidence counts as much as overconfidence: (|0.3 − 1| + |0.9 − 1|) / 2.
        let under = reliability(&[0.3, 0.9], &[true, true], 2);
        assert!((calibration_error(&under).unwrap() - 0.4).abs() < 1e-12);
        // A bucket's lower bound is in it, its upper bound in the next; 1.0 in the last.
        let edges = reliability(&[0.0, 0.5, 1.0], &[false, true, true], 2);
        assert_eq!((edges[0].decisions, edges[1].decisions), (1, 2));
        // Out of [0, 1] counts as the bound; not a number is left out.
        let odd = reliability(&[1.2, -0.1, f64::NAN], &[true, false, true], 2);
        assert_eq!((odd[0].decisions, odd[1].decisions), (1, 1));
        assert_eq!((odd[0].mean_confidence, odd[1].mean_confidence), (0.0, 1.0));
        assert_eq!(calibration_error(&odd), Some(0.0));
        // Right as often as confident: no error; no decisions: no figure.
        let even = reliability(&[0.5, 0.5, 1.0], &[true, false, true], 2);
        assert_eq!(calibration_error(&even), Some(0.0));
        assert_eq!(calibration_error(&reliability(&[], &[], 5)), None);
        let cov = coverage_curve(&conf, &ok, &[0.0, 0.8]);
        assert_eq!(cov[0], (0.0, 1.0, 0.5));
        assert_eq!(cov[1], (0.8, 0.5, 1.0));
    }

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // No discordant example, or an even split: no evidence either way.
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        // 0 vs 5: 2 * (1/2)^5.
        assert!((mcnemar_exact(0, 5) - 0.0625).abs() < 1e-12);
        // 1 vs 9, either order: 2 * (1 + 10) / 1024.
        let p = 2.0 * 11.0 / 1024.0;
        assert!((mcnemar_exact(1, 9) - p).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - p).abs() < 1e-12);
        // Large counts stay finite and in range: 480 vs 520 is chance (p ~ 0.22); 400 vs 600 is not.
        let p = mcnemar_exact(480, 520);
        assert!(p > 0.2 && p < 0.25, "{p}");
        assert!(mcnemar_exact(400, 600) < 1e-9);
    }
}
