//! Exact and near-duplicate detection for ticket texts.
//!
//! Texts are normalised (lower case, letters and digits only, single spaces), cut into
//! character 5-gram shingles, and compared by Jaccard similarity. Candidates are found with
//! MinHash locality-sensitive hashing: 128 hashes, of which bands of `r` are compared, with `r`
//! chosen from the threshold (see [`banding`]) so that a pair at the threshold becomes a
//! candidate with probability ≥ 0.99 — at 0.8, 16 bands of 4 (1 − (1 − 0.8⁴)¹⁶ ≈ 0.9998); at
//! 0.5, 42 bands of 3 (≈ 0.996). Every candidate is confirmed with the exact Jaccard
//! similarity, so there are no false positives; a lower threshold only costs more candidates.

use std::collections::HashMap;

use crate::rng::stable_hash;

const SHINGLE: usize = 5;
const HASHES: usize = 128;
/// `(rows, bands)` per band layout, most selective first; each uses at most [`HASHES`].
const BANDINGS: [(usize, usize); 4] = [(4, 16), (3, 42), (2, 64), (1, 128)];
/// The least probability with which a pair at the threshold must become a candidate.
const MIN_RECALL: f64 = 0.99;

/// The probability that two texts with Jaccard similarity `s` share at least one of `bands`
/// bands of `rows` MinHash values (and so are compared).
pub fn candidate_probability(s: f64, rows: usize, bands: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

/// The band layout `(rows, bands)` for near duplicates from `threshold`: the most selective
/// one (fewest dissimilar pairs compared) that still finds a pair at the threshold with
/// probability ≥ 0.99. 16 bands of 4 from about 0.71 up (the layout of every threshold before
/// there was a choice, so results at 0.8 are unchanged), 42 of 3 down to about 0.47, 64 of 2
/// down to about 0.26, then single hashes.
pub fn banding(threshold: f64) -> (usize, usize) {
    BANDINGS
        .into_iter()
        .find(|&(r, b)| candidate_probability(threshold, r, b) >= MIN_RECALL)
        .unwrap_or(BANDINGS[BANDINGS.len() - 1])
}

/// Lower case, letters and digits only, single spaces.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = true;
    for c in text.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
            space = false;
        } else if !space {
            out.push(' ');
            space = true;
        }
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

/// Sorted, distinct hashes of the character 5-grams of the normalised text.
pub fn shingles(text: &str) -> Vec<u64> {
    let chars: Vec<char> = normalize(text).chars().collect();
    let mut out: Vec<u64> = if chars.len() <= SHINGLE {
        vec![stable_hash(chars.iter().collect::<String>().as_bytes())]
    } else {
        chars
            .windows(SHINGLE)
            .map(|w| stable_hash(w.iter().collect::<String>().as_bytes()))
            .collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Jaccard similarity of two sorted, distinct hash lists.
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    inter as f64 / (a.len() + b.len() - inter) as f64
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The first `used` MinHash values of `shingles` (the rest stay `u64::MAX`): hash `i` does
/// not depend on how many are computed, so a layout that uses fewer gets the same values.
fn minhash(shingles: &[u64], used: usize) -> [u64; HASHES] {
    let mut sig = [u64::MAX; HASHES];
    for &s in shingles {
        for (i, slot) in sig.iter_mut().enumerate().take(used) {
            let h = mix(s ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if h < *slot {
                *slot = h;
            }
        }
    }
    sig
}

/// Why a text was considered a duplicate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Duplicate {
    /// Identical after normalisation, to the entry with this index.
    Exact(usize),
    /// Jaccard similarity ≥ the threshold with the entry with this index.
    Near(usize, f64),
}

/// An incremental index of texts that answers "is this a duplicate of one already added?".
pub struct NearDupIndex {
    threshold: f64,
    /// MinHash values per band ([`banding`]).
    rows: usize,
    exact: HashMap<String, usize>,
    bands: Vec<HashMap<u64, Vec<usize>>>,
    shingles: Vec<Vec<u64>>,
}

impl NearDupIndex {
    /// An empty index; `threshold` is the Jaccard similarity from which texts are near
    /// duplicates: 0.8 finds re-sent and lightly edited copies; 0.5 also reworded copies of
    /// one ticket (what a split must keep together).
    pub fn new(threshold: f64) -> Self {
        let (rows, bands) = banding(threshold);
        Self {
            threshold,
            rows,
            exact: HashMap::new(),
            bands: vec![HashMap::new(); bands],
            shingles: Vec::new(),
        }
    }

    /// Number of texts added.
    pub fn len(&self) -> usize {
        self.shingles.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.shingles.is_empty()
    }

    /// The earliest-added text this one duplicates, if any.
    pub fn find(&self, text: &str) -> Option<Duplicate> {
        if let Some(&i) = self.exact.get(&normalize(text)) {
            return Some(Duplicate::Exact(i));
        }
        let sh = shingles(text);
        let sig = minhash(&sh, self.used());
        // Each candidate once (a similar text shares many bands), the earliest first.
        let mut candidates: Vec<usize> = (self.bands.iter().enumerate())
            .flat_map(|(b, band)| band.get(&band_key(&sig, b, self.rows)).into_iter().flatten())
            .copied()
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        candidates.into_iter().find_map(|i| {
            let sim = jaccard(&sh, &self.shingles[i]);
            (sim >= self.threshold).then_some(Duplicate::Near(i, sim))
        })
    }

    /// How many MinHash values the band layout uses.
    fn used(&self) -> usize {
        self.rows * self.bands.len()
    }

    /// Adds a text (duplicate or not) and returns its index.
    pub fn insert(&mut self, text: &str) -> usize {
        let sh = shingles(text);
        let sig = minhash(&sh, self.used());
        self.insert_parts(normalize(text), sh, &sig)
    }

    /// Adds a text given its normalised form, shingles and signature. An exact copy of an
    /// earlier text is not added to the bands: every text that would meet it there meets the
    /// earlier copy, which `find` prefers anyway, so many copies of one text stay linear.
    fn insert_parts(&mut self, normalized: String, sh: Vec<u64>, sig: &[u64; HASHES]) -> usize {
        let idx = self.shingles.len();
        let mut copy = true;
        self.exact.entry(normalized).or_insert_with(|| {
            copy = false;
            idx
        });
        if !copy {
            for (b, band) in self.bands.iter_mut().enumerate() {
                band.entry(band_key(sig, b, self.rows)).or_default().push(idx);
            }
        }
        self.shingles.push(sh);
        idx
    }
}

fn band_key(sig: &[u64; HASHES], band: usize, rows: usize) -> u64 {
    sig[band * rows..(band + 1) * rows]
        .iter()
        .fold(0xCBF2_9CE4_8422_2325u64, |h, &x| mix(h ^ x))
}

/// Groups texts into clusters of (transitively) near-duplicate texts; returns a cluster id per
/// text, the index of the cluster's first text.
pub fn clusters(texts: &[&str], threshold: f64) -> Vec<usize> {
    let mut parent: Vec<usize> = (0..texts.len()).collect();
    let mut index = NearDupIndex::new(threshold);
    for (i, text) in texts.iter().enumerate() {
        let normalized = normalize(text);
        let sh = shingles(text);
        let sig = minhash(&sh, index.used());
        if let Some(&j) = index.exact.get(&normalized) {
            // An exact copy joins its original's cluster, which already holds every text the
            // copy would match.
            union(&mut parent, i, j);
        } else {
            for (b, band) in index.bands.iter().enumerate() {
                for &j in band.get(&band_key(&sig, b, index.rows)).into_iter().flatten() {
                    if root(&mut parent, i) != root(&mut parent, j)
                        && jaccard(&sh, &index.shingles[j]) >= threshold
                    {
                        union(&mut parent, i, j);
                    }
                }
            }
        }
        index.insert_parts(normalized, sh, &sig);
    }
    (0..texts.len()).map(|i| root(&mut parent, i)).collect()
}

/// [`clusters`], with texts that share a group label (`groups[i]` of text `i`: one synthetic
/// scenario, one e-mail thread) joined as well, whatever their wording; `groups` may be shorter
/// than `texts` (the rest have none). Without labels, the same clusters as [`clusters`].
pub fn clusters_with_groups(texts: &[&str], groups: &[Option<&str>], threshold: f64) -> Vec<usize> {
    let mut parent = clusters(texts, threshold);
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, g) in groups.iter().enumerate().take(texts.len()) {
        if let Some(g) = g {
            match first.get(g) {
                Some(&j) => union(&mut parent, i, j),
                None => {
                    first.insert(g, i);
                }
            }
        }
    }
    (0..texts.len()).map(|i| root(&mut parent, i)).collect()
}

/// The representative of `i`'s cluster (its smallest index), compressing the path.
fn root(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (root(parent, a), root(parent, b));
    if ra != rb {
        let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
        parent[hi] = lo;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_punctuation_and_space() {
        assert_eq!(normalize("  Hello,   WORLD!! Ça va?"), "hello world ça va");
    }

    #[test]
    fn finds_exact_and_near_duplicates_but_not_different_texts() {
        let mut idx = NearDupIndex::new(0.8);
        idx.insert("My VPN drops every 10 minutes since the update, please help.");
        idx.insert("The printer on floor 3 is jammed again.");
        assert_eq!(
            idx.find("my vpn drops every 10 minutes since the update please help"),
            Some(Duplicate::Exact(0))
        );
        match idx.find("My VPN drops every 10 minutes since the update, please help asap.") {
            Some(Duplicate::Near(0, s)) => assert!(s >= 0.8, "{s}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(idx.find("Outlook crashes when I open an attachment."), None);
    }

    #[test]
    fn clusters_are_transitive() {
        let texts = [
            "the vpn disconnects every ten minutes since the update",
            "the printer is out of toner",
            "the vpn disconnects every ten minutes since the update!!",
            "The VPN disconnects every ten minutes since the update, help",
        ];
        let c = clusters(&texts, 0.8);
        assert_eq!(c, vec![0, 1, 0, 0]);
    }

    #[test]
    fn exact_copies_join_their_original_and_leave_the_bands_alone() {
        let mut texts = vec!["the vpn disconnects every ten minutes since the update"; 3];
        texts.push("the printer is out of toner");
        texts.push("THE VPN disconnects every ten minutes since the update, help");
        texts.extend(["The printer is out of toner."; 2]);
        assert_eq!(clusters(&texts, 0.8), vec![0, 0, 0, 3, 0, 3, 3]);

        let mut idx = NearDupIndex::new(0.8);
        for t in &texts {
            idx.insert(t);
        }
        assert_eq!(idx.len(), texts.len());
        // Two distinct texts plus one near duplicate are in the bands; the four copies are not.
        let banded: usize = idx.bands[0].values().map(Vec::len).sum();
        assert_eq!(banded, 3);
        assert_eq!(idx.find(texts[4]), Some(Duplicate::Exact(4)));
        // A near duplicate of the copied text still finds the earliest one.
        match idx.find("the vpn disconnects every ten minutes since the update please") {
            Some(Duplicate::Near(0, s)) => assert!(s >= 0.8, "{s}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_threshold_finds_its_pairs_and_0_8_keeps_its_layout() {
        for i in 1..=20 {
            let t = i as f64 / 20.0;
            let (r, b) = banding(t);
            assert!(r * b <= HASHES, "{t}: {r} x {b}");
            assert!(candidate_probability(t, r, b) >= MIN_RECALL, "{t}: {r} x {b}");
        }
        assert_eq!(
            banding(0.8),
            (4, 16),
            "the layout of every earlier split and synth run"
        );
        assert_eq!(banding(0.5), (3, 42));
    }

    /// The signature and the 0.8 layout's first band key of a fixed text, as every triage
    /// before the threshold-dependent layout computed them: synth and the synthetic splits
    /// (0.8) must stay byte for byte what the shipped adapters were trained on.
    #[test]
    fn signatures_at_0_8_are_those_of_earlier_versions() {
        let sig = minhash(&shingles("My VPN drops every 10 minutes since the update"), 64);
        assert_eq!(
            (sig[0], sig[63], band_key(&sig, 0, 4)),
            (282637894424273003, 460605636778321561, 10450139424340920577)
        );
        assert!(sig[64..].iter().all(|&h| h == u64::MAX), "only the used hashes");
        assert_eq!(
            minhash(&shingles("x y z"), HASHES)[..64],
            minhash(&shingles("x y z"), 64)[..64]
        );
    }

    /// A reworded copy of one ticket (Jaccard ≈ 0.56): a split at 0.5 keeps the two together,
    /// synth's 0.8 does not call them duplicates.
    #[test]
    fn reworded_copies_are_near_duplicates_from_0_5() {
        let texts = [
            "Since this morning my laptop keeps dropping the Wi-Fi connection every few minutes, and applications take much longer to open than usual. I restarted it and checked the network settings, but nothing changed. Could you advise how to fix this?",
            "The printer on the third floor is out of toner and prints faint pages; please send a replacement cartridge.",
            "Since this morning my laptop keeps losing its Wi-Fi connection every few minutes, and programs take far longer to open than usual. I have restarted it and checked the network settings, but the problem persists. Could you advise how to fix it?",
        ];
        let sim = jaccard(&shingles(texts[0]), &shingles(texts[2]));
        assert!((0.5..0.8).contains(&sim), "{sim}");
        assert_eq!(clusters(&texts, 0.5), vec![0, 1, 0]);
        assert_eq!(clusters(&texts, 0.8), vec![0, 1, 2]);
        for (threshold, found) in [(0.5, true), (0.8, false)] {
            let mut idx = NearDupIndex::new(threshold);
            idx.insert(texts[0]);
            idx.insert(texts[1]);
            let near = matches!(idx.find(texts[2]), Some(Duplicate::Near(0, _)));
            assert_eq!(near, found, "at {threshold}");
        }
    }
}
