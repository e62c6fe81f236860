//! `report.html` is a real page: its tables are HTML tables, the reliability diagram and the
//! confusion matrices are inline SVG, and headless Chromium renders it (DOM dumped and
//! checked, screenshot taken and compared with a blank page). The Chromium part is skipped,
//! with a message, where no Chromium is installed (`apt-get install chromium`; CI installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use triage_data::split::{assign_splits, Ratios, SplitBy, SplitOptions};
use triage_data::synth::{generate, Balance, Seeds, SynthOptions};
use triage_data::Split;
use triage_eval::report;
use triage_eval::run::run_baseline;
use triage_taxonomy::{Taxonomy, Validator};

/// A report of the TF-IDF baseline on a small synthetic split, written to `dir`.
fn write_report(dir: &Path) -> report::Report {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let seeds = Seeds::builtin(&taxonomy).unwrap().unwrap();
    let opts = SynthOptions {
        n: 400,
        langs: ["en", "es", "de", "fr", "pt"].map(String::from).to_vec(),
        seed: 5,
        balance: Balance::Uniform,
        near_dup_threshold: 0.8,
        injections: 0.0,
    };
    let mut examples = generate(&seeds, &validator, &opts).unwrap().examples;
    assign_splits(
        &mut examples,
        &SplitOptions {
            by: SplitBy::Template,
            ratios: Ratios([75, 0, 25]),
            seed: 1,
            near_dup_threshold: 0.8,
            stratify: Some("category".into()),
        },
    )
    .unwrap();
    let (train, test): (Vec<_>, Vec<_>) = examples.into_iter().partition(|e| e.split == Some(Split::Train));
    let mut base = run_baseline(&taxonomy, &train, &test, 3);
    // A second system with a <markup> name and confidences all over the range.
    let mut other = base.clone();
    other.name = "x<b>&\"y\"".into();
    for (i, p) in other.predictions.iter_mut().enumerate() {
        for (_, _, c) in p.predicted.iter_mut() {
            *c = Some((i % 10) as f64 / 10.0 + 0.05);
        }
    }
    base.name = "tfidf-baseline".into();
    let runs = vec![base, other];
    let r = report::build(&taxonomy, "synthetic <test>", &test, &runs);
    report::write(dir, &r, &runs).unwrap();
    r
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("triage-eval-html-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn report_html_is_a_page_of_tables_with_inline_figures() {
    let dir = temp("static");
    let r = write_report(&dir);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(!html.contains("<pre>"), "not escaped Markdown any more");
    let systems = r.systems.len();
    let fields = r.systems[0].fields.len();
    // 3 overview tables (fields, overall, paired with the first system); per system:
    // by-language, reliability, coverage, one per field, worst.
    assert_eq!(html.matches("<table").count(), 3 + systems * (4 + fields));
    assert!(html.contains("<table class=\"paired\">"));
    assert_eq!(html.matches("<svg").count(), systems * (1 + fields));
    assert_eq!(html.matches("<figure class=\"reliability\">").count(), systems);
    assert!(html.contains("<th>tfidf-baseline</th>") && html.contains("x&lt;b&gt;&amp;&quot;y&quot;"));
    assert!(!html.contains("x<b>"), "names are escaped");
    // The reliability table's mean confidence, the calibration error under it, and each
    // non-empty bucket's dot on the diagram.
    assert_eq!(html.matches("<th>mean confidence</th>").count(), systems);
    assert_eq!(
        html.matches("Expected calibration error over these buckets")
            .count(),
        systems
    );
    let dots: usize = r
        .systems
        .iter()
        .map(|s| s.reliability.iter().filter(|b| b.decisions > 0).count())
        .sum();
    assert!(dots > 0);
    assert_eq!(html.matches("<circle").count(), dots);
    assert!(dir.join("reliability-tfidf-baseline.svg").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Chromium (Debian's `chromium`), if installed.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("which").arg(name).output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

fn headless(chromium: &Path, profile: &Path) -> Command {
    let mut c = Command::new(chromium);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1280,2400",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// Takes a screenshot of `page` and returns the PNG's bytes.
fn screenshot(chromium: &Path, profile: &Path, page: &Path, png: &Path) -> Vec<u8> {
    let out = headless(chromium, profile)
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(png).unwrap()
}

#[test]
fn report_html_renders_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        eprintln!(
            "SKIPPED: no chromium on this machine (apt-get install chromium, or set CHROMIUM=/path); .ci/run installs it"
        );
        return;
    };
    let dir = temp("chromium");
    let r = write_report(&dir);
    let profile = dir.join("profile");
    let page = dir.join("report.html");
    let out = headless(&chromium, &profile)
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dom = String::from_utf8_lossy(&out.stdout);
    // The DOM as Chromium built it: every table with its body rows, every inline SVG.
    let systems = r.systems.len();
    let fields = r.systems[0].fields.len();
    assert_eq!(dom.matches("<table").count(), 3 + systems * (4 + fields), "{dom}");
    assert_eq!(dom.matches("<tbody>").count(), dom.matches("<table").count());
    assert!(dom.matches("<tr>").count() > 40);
    assert_eq!(dom.matches("<svg").count(), systems * (1 + fields));
    assert!(dom.contains("<h1>Evaluation: synthetic &lt;test&gt;"), "{dom}");
    // The screenshot is a PNG, and not a blank page: an empty page of the same size
    // compresses to a fraction of it.
    let png = screenshot(&chromium, &profile, &page, &dir.join("report.png"));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let blank_page = dir.join("blank.html");
    std::fs::write(&blank_page, "<!doctype html><html><body></body></html>").unwrap();
    let blank = screenshot(&chromium, &profile, &blank_page, &dir.join("blank.png"));
    assert!(
        png.len() > 5 * blank.len(),
        "report screenshot {} bytes, blank page {} bytes",
        png.len(),
        blank.len()
    );
    if let Some(keep) = std::env::var_os("TRIAGE_KEEP_SCREENSHOT") {
        std::fs::copy(dir.join("report.png"), keep).unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
}
