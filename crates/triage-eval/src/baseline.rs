//! TF-IDF features and a multinomial logistic regression per field: the classical baseline.

use std::collections::HashMap;

use triage_data::rng::Rng;

/// The feature strings of a text: word unigrams and bigrams, and character 4-grams inside
/// each word (with boundary marks), all lower-cased.
pub fn features(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut out = Vec::with_capacity(words.len() * 6);
    for (i, w) in words.iter().enumerate() {
        out.push(format!("w:{w}"));
        if let Some(next) = words.get(i + 1) {
            out.push(format!("b:{w} {next}"));
        }
        let chars: Vec<char> = format!("<{w}>").chars().collect();
        for g in chars.windows(4) {
            out.push(format!("c:{}", g.iter().collect::<String>()));
        }
    }
    out
}

/// A sparse, L2-normalised TF-IDF vector: `(feature index, weight)`.
pub type Sparse = Vec<(usize, f32)>;

/// A fitted TF-IDF vocabulary.
#[derive(Debug, Clone)]
pub struct Tfidf {
    vocab: HashMap<String, usize>,
    idf: Vec<f32>,
}

impl Tfidf {
    /// Fits on `texts`, keeping features seen in at least `min_df` texts.
    pub fn fit(texts: &[&str], min_df: usize) -> Self {
        let mut df: HashMap<String, usize> = HashMap::new();
        for t in texts {
            let mut f = features(t);
            f.sort_unstable();
            f.dedup();
            for x in f {
                *df.entry(x).or_default() += 1;
            }
        }
        let mut kept: Vec<(String, usize)> = df.into_iter().filter(|(_, d)| *d >= min_df.max(1)).collect();
        kept.sort(); // deterministic indices
        let n = texts.len() as f32;
        let idf = kept
            .iter()
            .map(|(_, d)| ((1.0 + n) / (1.0 + *d as f32)).ln() + 1.0)
            .collect();
        let vocab = kept.into_iter().enumerate().map(|(i, (f, _))| (f, i)).collect();
        Tfidf { vocab, idf }
    }

    /// Number of features.
    pub fn len(&self) -> usize {
        self.idf.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.idf.is_empty()
    }

    /// The vector of one text (sublinear term frequency, L2-normalised).
    pub fn transform(&self, text: &str) -> Sparse {
        let mut tf: HashMap<usize, f32> = HashMap::new();
        for f in features(text) {
            if let Some(&i) = self.vocab.get(&f) {
                *tf.entry(i).or_default() += 1.0;
            }
        }
        let mut v: Sparse = tf
            .into_iter()
            .map(|(i, c)| (i, (1.0 + c.ln()) * self.idf[i]))
            .collect();
        v.sort_unstable_by_key(|(i, _)| *i);
        let norm = v.iter().map(|(_, x)| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|(_, x)| *x /= norm);
        }
        v
    }
}

/// Multinomial logistic regression on sparse features, trained by seeded SGD.
#[derive(Debug, Clone)]
pub struct Logistic {
    /// Class names.
    pub classes: Vec<String>,
    w: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl Logistic {
    /// Fits on `(x, y)` (`y` indexes `classes`).
    pub fn fit(x: &[Sparse], y: &[usize], classes: Vec<String>, n_features: usize, seed: u64) -> Self {
        let k = classes.len();
        let mut m = Logistic {
            classes,
            w: vec![vec![0.0; n_features]; k],
            b: vec![0.0; k],
        };
        let mut order: Vec<usize> = (0..x.len()).collect();
        let mut rng = Rng::new(seed);
        let epochs = 25;
        for epoch in 0..epochs {
            rng.shuffle(&mut order);
            let lr = 0.5 / (1.0 + epoch as f32 * 0.3);
            for &i in &order {
                let p = m.proba(&x[i]);
                for (c, pc) in p.iter().enumerate() {
                    let g = pc - (c == y[i]) as u8 as f32;
                    if g.abs() < 1e-6 {
                        continue;
                    }
                    for &(f, v) in &x[i] {
                        let w = &mut m.w[c][f];
                        *w -= lr * (g * v + 1e-4 * *w);
                    }
                    m.b[c] -= lr * g * 0.1;
                }
            }
        }
        m
    }

    /// Class probabilities.
    pub fn proba(&self, x: &Sparse) -> Vec<f32> {
        let logits: Vec<f32> = (0..self.classes.len())
            .map(|c| self.b[c] + x.iter().map(|&(f, v)| self.w[c][f] * v).sum::<f32>())
            .collect();
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let z: f32 = e.iter().sum();
        e.into_iter().map(|v| v / z).collect()
    }

    /// The most likely class among `allowed` (all when `None`) and its renormalised probability.
    pub fn predict(&self, x: &Sparse, allowed: Option<&[&str]>) -> (String, f64) {
        let p = self.proba(x);
        let ok = |c: usize| allowed.is_none_or(|a| a.contains(&self.classes[c].as_str()));
        let total: f32 = (0..p.len()).filter(|&c| ok(c)).map(|c| p[c]).sum();
        let best = (0..p.len())
            .filter(|&c| ok(c))
            .max_by(|&a, &b| p[a].total_cmp(&p[b]));
        match best {
            Some(c) => (
                self.classes[c].clone(),
                (p[c] / total.max(f32::MIN_POSITIVE)) as f64,
            ),
            None => (self.classes[0].clone(), 0.0),
        }
    }
}

/// One TF-IDF vocabulary and one logistic regression per field.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// The features.
    pub tfidf: Tfidf,
    /// `(field, model)`.
    pub fields: Vec<(String, Logistic)>,
}

impl Baseline {
    /// Fits on texts and their labels: `labels[i]` holds example i's value of each field in
    /// `fields` (with the field's classes, in taxonomy order).
    pub fn fit(texts: &[&str], fields: &[(&str, Vec<&str>)], labels: &[Vec<&str>], seed: u64) -> Self {
        let tfidf = Tfidf::fit(texts, 2);
        let x: Vec<Sparse> = texts.iter().map(|t| tfidf.transform(t)).collect();
        let models = fields
            .iter()
            .enumerate()
            .map(|(j, (name, classes))| {
                let y: Vec<usize> = labels
                    .iter()
                    .map(|l| {
                        classes
                            .iter()
                            .position(|c| *c == l[j])
                            .expect("label is a class of its field")
                    })
                    .collect();
                let names = classes.iter().map(|c| c.to_string()).collect();
                (
                    name.to_string(),
                    Logistic::fit(&x, &y, names, tfidf.len(), seed ^ j as u64),
                )
            })
            .collect();
        Baseline {
            tfidf,
            fields: models,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_include_words_bigrams_and_char_grams() {
        let f = features("VPN down!");
        assert!(f.contains(&"w:vpn".to_string()) && f.contains(&"b:vpn down".to_string()));
        assert!(f.contains(&"c:<vpn".to_string()) && f.contains(&"c:own>".to_string()));
    }

    #[test]
    fn learns_a_separable_toy_problem_and_respects_allowed_classes() {
        let texts = [
            "vpn drops again",
            "vpn is down",
            "the vpn keeps disconnecting",
            "cannot connect vpn",
            "printer jammed",
            "printer out of toner",
            "the printer is offline",
            "printer prints blank pages",
        ];
        let labels: Vec<Vec<&str>> = (0..8)
            .map(|i| vec![if i < 4 { "Network" } else { "Hardware" }])
            .collect();
        let b = Baseline::fit(&texts, &[("category", vec!["Network", "Hardware"])], &labels, 1);
        let m = &b.fields[0].1;
        let (c, p) = m.predict(&b.tfidf.transform("my vpn is disconnecting"), None);
        assert_eq!(c, "Network");
        assert!(p > 0.5);
        assert_eq!(m.predict(&b.tfidf.transform("printer jam"), None).0, "Hardware");
        assert_eq!(
            m.predict(&b.tfidf.transform("vpn"), Some(&["Hardware"])).0,
            "Hardware"
        );
    }
}
