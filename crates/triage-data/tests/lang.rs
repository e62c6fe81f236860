//! Language detection measured on the shared five-language dataset: per-language precision
//! and recall of the stop-word heuristic that was used before (`lang::stopwords`) and of the
//! whatlang detector used now (`lang::detect`). The figures live in
//! `docs/language-detection.md`; this test recomputes them and fails when the file is stale
//! (`TRIAGE_UPDATE_DOCS=1` rewrites it).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use triage_data::lang::{self, LANGS};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const DATASET: &str = "../shared/datasets/customer-support-tickets/tickets-v3-5lang.csv";

/// `(gold language, text)` per row; the text is subject and body joined as `triage data
/// import` joins them.
fn rows() -> Vec<(String, String)> {
    let path = root().join(DATASET);
    let mut r = csv::Reader::from_path(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the shared dataset sits beside the repository)",
            path.display()
        )
    });
    let headers = r.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (subject, body, language) = (col("subject"), col("body"), col("language"));
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            let text = [rec.get(subject).unwrap_or(""), rec.get(body).unwrap_or("")]
                .iter()
                .filter(|s| !s.trim().is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("\n\n");
            (rec.get(language).unwrap().trim().to_lowercase(), text)
        })
        .collect()
}

struct Scores {
    /// Per language: (rows, predicted as it, right).
    per_lang: BTreeMap<&'static str, (usize, usize, usize)>,
    und: usize,
    right: usize,
}

fn score(rows: &[(String, String)], detect: fn(&str) -> Option<&'static str>) -> Scores {
    let mut per_lang: BTreeMap<&'static str, (usize, usize, usize)> =
        LANGS.iter().map(|l| (*l, (0, 0, 0))).collect();
    let (mut und, mut right) = (0, 0);
    for (gold, text) in rows {
        let guess = detect(text);
        if let Some(e) = per_lang.get_mut(gold.as_str()) {
            e.0 += 1;
        }
        match guess {
            None => und += 1,
            Some(g) => {
                let e = per_lang.get_mut(g).expect("one of LANGS");
                e.1 += 1;
                if g == gold {
                    e.2 += 1;
                    right += 1;
                }
            }
        }
    }
    Scores { per_lang, und, right }
}

fn ratio(a: usize, b: usize) -> String {
    match b {
        0 => "–".into(),
        _ => format!("{:.3}", a as f64 / b as f64),
    }
}

fn report(rows: &[(String, String)]) -> String {
    let before = score(rows, lang::stopwords::detect);
    let after = score(rows, lang::detect);
    let n = rows.len();
    let mut md = String::new();
    let _ = writeln!(md, "# Language detection\n");
    let _ = writeln!(
        md,
        "`triage data import` guesses each row's language when the export has no language column \
         (`crates/triage-data/src/lang.rs`). Measured on `{DATASET}` ({n} rows; gold: its `language` \
         column; text: subject and body, joined as the importer joins them).\n"
    );
    let _ = writeln!(
        md,
        "* **before**: the stop-word heuristic (`lang::stopwords::detect`: at least two stop words, no tie);"
    );
    let _ = writeln!(
        md,
        "* **after**: whatlang 0.18 restricted to en/de/fr/es/pt, `None` under {} words of letters or \
         confidence {} (`lang::detect`).\n",
        lang::MIN_WORDS,
        lang::MIN_CONFIDENCE
    );
    let _ = writeln!(
        md,
        "Recompute: `cargo nextest run -p triage-data language_detection` fails when this file is stale; \
         `TRIAGE_UPDATE_DOCS=1 cargo nextest run -p triage-data language_detection` rewrites it.\n"
    );
    let _ = writeln!(
        md,
        "| language | rows | before: precision | before: recall | after: precision | after: recall |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for l in LANGS {
        let (rows_b, pred_b, right_b) = before.per_lang[l];
        let (_, pred_a, right_a) = after.per_lang[l];
        let _ = writeln!(
            md,
            "| {l} | {rows_b} | {} | {} | {} | {} |",
            ratio(right_b, pred_b),
            ratio(right_b, rows_b),
            ratio(right_a, pred_a),
            ratio(right_a, rows_b)
        );
    }
    let _ = writeln!(
        md,
        "| all (accuracy) | {n} | | {} | | {} |",
        ratio(before.right, n),
        ratio(after.right, n)
    );
    let _ = writeln!(
        md,
        "| no answer (`und`) | | | {} rows | | {} rows |",
        before.und, after.und
    );
    let _ = writeln!(
        md,
        "\nPrecision: of the rows given that language, the share that is; recall: of the rows of that \
         language, the share given it (`und` counts as a miss)."
    );
    md
}

#[test]
fn language_detection_figures_in_docs_are_current_and_whatlang_is_not_worse() {
    let rows = rows();
    assert!(rows.len() > 1000, "{} rows", rows.len());
    let md = report(&rows);
    let doc = root().join("docs/language-detection.md");
    if std::env::var_os("TRIAGE_UPDATE_DOCS").is_some() {
        std::fs::write(&doc, &md).unwrap();
    }
    print!("{md}");
    let before = score(&rows, lang::stopwords::detect);
    let after = score(&rows, lang::detect);
    assert!(
        after.right > before.right,
        "whatlang {} vs stop words {}",
        after.right,
        before.right
    );
    for l in LANGS {
        let (rows_l, _, right) = after.per_lang[l];
        assert!(
            right as f64 >= 0.9 * rows_l as f64,
            "{l}: recall {right}/{rows_l}"
        );
    }
    let committed = std::fs::read_to_string(&doc).unwrap_or_default();
    assert!(
        committed == md,
        "{} is stale: rerun with TRIAGE_UPDATE_DOCS=1",
        doc.display()
    );
}
