//! Properties of the shipped seed material, the generator, the splits and the importer on the
//! shared public dataset.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use triage_data::import::{self, ColumnMapping, ImportOptions, LabelMap};
use triage_data::split::{assign_splits, assign_splits_keeping, Ratios, SplitBy, SplitOptions};
use triage_data::stats::Counts;
use triage_data::synth::{generate, unreachable_values, Balance, Seeds, SynthOptions};
use triage_data::{Example, Split};
use triage_taxonomy::{Taxonomy, Validator};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn options(n: usize, seed: u64) -> SynthOptions {
    SynthOptions {
        n,
        langs: ["en", "es", "de", "fr", "pt"].map(String::from).to_vec(),
        seed,
        balance: Balance::Uniform,
        near_dup_threshold: 0.8,
        injections: 0.0,
    }
}

/// An English example `id` with `text` (no quotes or backslashes in it), labelled as a VPN
/// incident, in scenario `group` if given.
fn vpn_ticket(validator: &Validator, id: &str, text: &str, group: Option<&str>) -> Example {
    let g = group.map(|g| format!(r#","group":"{g}""#)).unwrap_or_default();
    let l = format!(
        r#"{{"id":"{id}","text":"{text}","ticket":{{"summary":"s","category":"Network","subcategory":"VPN","priority":"High","assignment_group":"Network Operations","request_type":"Incident"}},"lang":"en","source":"t"{g}}}"#
    );
    Example::from_json_line(&l, validator).unwrap()
}

/// `examples` split `--by hash` (34/33/33, near duplicates from 0.8, no stratification).
fn hash_split(examples: &[Example], seed: u64) -> Vec<Example> {
    let mut ex = examples.to_vec();
    let opts = SplitOptions {
        by: SplitBy::Hash,
        ratios: Ratios([34, 33, 33]),
        seed,
        near_dup_threshold: 0.8,
        stratify: None,
    };
    assign_splits(&mut ex, &opts).unwrap();
    ex
}

/// The splits the examples whose id starts with `prefix` landed in.
fn splits_of(examples: &[Example], prefix: char) -> BTreeSet<Option<Split>> {
    examples
        .iter()
        .filter(|e| e.id.starts_with(prefix))
        .map(|e| e.split)
        .collect()
}

fn jsonl(examples: &[Example]) -> String {
    examples.iter().map(|e| e.to_json_line() + "\n").collect()
}

#[test]
fn synth_2000_seed_7_is_deterministic_covers_every_value_in_every_language_and_validates() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let seeds = Seeds::load(&Seeds::default_dir(&root(), &taxonomy), &taxonomy).unwrap();
    assert_eq!(unreachable_values(&seeds, &validator), vec![]);
    let a = generate(&seeds, &validator, &options(2000, 7)).unwrap();
    let b = generate(&seeds, &validator, &options(2000, 7)).unwrap();
    let (ja, jb) = (jsonl(&a.examples), jsonl(&b.examples));
    assert_eq!(ja, jb, "same seed, same bytes");
    let c = generate(&seeds, &validator, &options(50, 8)).unwrap();
    assert_ne!(
        jsonl(&c.examples),
        jsonl(&a.examples[..50]),
        "another seed, other data"
    );

    assert_eq!(a.examples.len(), 2000);
    // Every row validates: re-read each line through the canonical reader.
    for line in ja.lines() {
        Example::from_json_line(line, &validator).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    // Every enum value at least 10 times, and in each of the five languages.
    let counts = Counts::of(&taxonomy, &a.examples);
    for (field, values) in &counts.fields {
        for (value, n) in values {
            assert!(*n >= 10, "{field}={value:?} only {n} times\n{counts}");
            for lang in ["en", "es", "de", "fr", "pt"] {
                assert!(
                    a.examples
                        .iter()
                        .any(|e| e.lang == lang && e.ticket.get(field) == Some(value)),
                    "{field}={value:?} never in {lang}"
                );
            }
        }
    }
    for lang in ["en", "es", "de", "fr", "pt"] {
        // Balanced by construction (each class cycles through the languages): 400 ± 1 %.
        assert!((396..=404).contains(&counts.langs[lang]), "{counts}");
    }
    // No two texts are the same after normalisation; summaries are specific, not one title
    // per scenario.
    let normalized: HashSet<String> = a
        .examples
        .iter()
        .map(|e| triage_data::dedup::normalize(&e.text))
        .collect();
    assert_eq!(normalized.len(), 2000);
    let mut summaries: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in &a.examples {
        assert!(e.ticket.summary().chars().count() <= taxonomy.summary.max_length);
        summaries
            .entry(e.group.as_deref().unwrap())
            .or_default()
            .insert(e.ticket.summary());
    }
    let varied = summaries.values().filter(|s| s.len() > 1).count();
    assert!(
        varied * 2 > summaries.len(),
        "{varied} of {} scenarios have more than one summary",
        summaries.len()
    );
    // Surface variety: e-mails, chats, quoted replies all occur.
    assert!(
        a.examples.iter().any(|e| e.text.contains("\n> ")),
        "no quoted replies"
    );
    assert!(
        a.examples.iter().filter(|e| !e.text.contains('\n')).count() > 200,
        "few one-liners"
    );
}

/// `injections`: the same examples with a line that names a wrong value added to about the
/// asked share of texts, labels untouched; 0 is byte-identical to the option's absence.
#[test]
fn synth_injections_add_a_wrong_value_instruction_and_never_change_labels() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let seeds = Seeds::load(&Seeds::default_dir(&root(), &taxonomy), &taxonomy).unwrap();
    let clean = generate(&seeds, &validator, &options(400, 7)).unwrap().examples;
    let with = |share: f64| {
        let o = SynthOptions {
            injections: share,
            ..options(400, 7)
        };
        generate(&seeds, &validator, &o).unwrap().examples
    };
    let injected = with(0.25);
    assert_eq!(injected, with(0.25), "deterministic");
    assert_eq!(jsonl(&with(0.0)), jsonl(&clean));
    let mut changed = 0;
    for (c, e) in clean.iter().zip(&injected) {
        assert_eq!(
            (&c.id, &c.group, &c.lang, &c.ticket),
            (&e.id, &e.group, &e.lang, &e.ticket)
        );
        if c.text == e.text {
            continue;
        }
        changed += 1;
        // The report is intact, before or after the added paragraph.
        let line = e
            .text
            .strip_prefix(&format!("{}\n\n", c.text))
            .or_else(|| e.text.strip_suffix(&format!("\n\n{}", c.text)))
            .unwrap_or_else(|| panic!("{}: report not kept whole: {:?}", e.id, e.text));
        // It names a value of an enum field that is not the example's own.
        let wrong = taxonomy
            .fields
            .iter()
            .filter(|f| f.dependency.is_none())
            .any(|f| {
                f.value_names()
                    .any(|v| line.contains(v) && e.ticket.get(&f.name) != Some(v))
            });
        assert!(wrong, "{}: {line:?} names no wrong value", e.id);
    }
    assert!((60..=140).contains(&changed), "{changed} of 400 injected at 0.25");
    for bad in [-0.1, 1.5, f64::NAN] {
        let o = SynthOptions {
            injections: bad,
            ..options(10, 7)
        };
        assert!(generate(&seeds, &validator, &o).is_err(), "{bad}");
    }
}

#[test]
fn split_by_template_never_puts_a_scenario_in_two_splits() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let seeds = Seeds::load(&Seeds::default_dir(&root(), &taxonomy), &taxonomy).unwrap();
    let mut examples = generate(&seeds, &validator, &options(1500, 11)).unwrap().examples;
    let opts = SplitOptions {
        by: SplitBy::Template,
        ratios: "80,10,10".parse::<Ratios>().unwrap(),
        seed: 3,
        near_dup_threshold: 0.8,
        stratify: Some("category".into()),
    };
    let summary = assign_splits(&mut examples, &opts).unwrap();
    let mut where_: BTreeMap<&str, BTreeSet<Split>> = BTreeMap::new();
    for e in &examples {
        where_
            .entry(e.group.as_deref().unwrap())
            .or_default()
            .insert(e.split.unwrap());
    }
    let straddling: Vec<_> = where_.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(straddling.is_empty(), "{straddling:?}");
    // Roughly the asked shares, and every category present in train and test.
    let n = examples.len() as f64;
    let share = |s: usize| summary.per_split[s].0 as f64 / n;
    assert!((0.72..0.88).contains(&share(0)), "{summary:?}");
    assert!((0.05..0.15).contains(&share(2)), "{summary:?}");
    for cat in taxonomy.field("category").unwrap().value_names() {
        for split in [Split::Train, Split::Test] {
            assert!(
                examples
                    .iter()
                    .any(|e| e.split == Some(split) && e.ticket.get("category") == Some(cat)),
                "{cat} missing from {split}"
            );
        }
    }
    // Deterministic.
    let mut again = examples.clone();
    again.iter_mut().for_each(|e| e.split = None);
    assign_splits(&mut again, &opts).unwrap();
    assert_eq!(again, examples);
    // Ratios built directly (the CLI parser refuses these): all-zero shares are an error.
    let zero = SplitOptions {
        ratios: Ratios([0, 0, 0]),
        ..opts
    };
    let err = assign_splits(&mut again, &zero).unwrap_err().to_string();
    assert!(err.contains("0,0,0"), "{err}");
}

#[test]
fn split_by_hash_keeps_near_duplicates_together() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let line = |id: &str, text: &str| vpn_ticket(&validator, id, text, None);
    let mut examples: Vec<Example> = (0..40)
        .map(|i| {
            line(
                &format!("u{i}"),
                &format!(
                    "ticket number {i} about a completely different topic {}",
                    "x".repeat(i)
                ),
            )
        })
        .collect();
    examples.push(line(
        "d1",
        "My VPN drops every ten minutes since the update, please help me",
    ));
    examples.push(line(
        "d2",
        "my vpn drops every ten minutes since the update please help me!!",
    ));
    examples.push(line(
        "d3",
        "My VPN drops every ten minutes since the update, please help me asap",
    ));
    for seed in 0..10 {
        assert_eq!(
            splits_of(&hash_split(&examples, seed), 'd').len(),
            1,
            "seed {seed}: near duplicates split apart"
        );
    }
}

/// The summary names the largest group (which goes to one split whole): here six copies of
/// one text among four different ones.
#[test]
fn split_summary_names_the_largest_group() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let line = |id: &str, text: &str| vpn_ticket(&validator, id, text, None);
    let mut examples: Vec<Example> = (0..6)
        .map(|i| line(&format!("c{i}"), "Printer on floor 3 is out of toner again"))
        .collect();
    for (i, t) in [
        "VPN keeps dropping since this morning",
        "Outlook crashes when I open an attachment",
        "New starter needs a laptop on Monday",
        "Password expired and the reset link fails",
    ]
    .iter()
    .enumerate()
    {
        examples.push(line(&format!("u{i}"), t));
    }
    let opts = SplitOptions {
        by: SplitBy::Hash,
        ratios: Ratios([34, 33, 33]),
        seed: 0,
        near_dup_threshold: 0.5,
        stratify: None,
    };
    let summary = assign_splits(&mut examples, &opts).unwrap();
    assert_eq!(summary.largest_group, 6, "{summary:?}");
    assert_eq!(summary.largest_group_key, "dup:c0", "{summary:?}");
    let groups: usize = summary.per_split.iter().map(|(_, g)| g).sum();
    assert_eq!(groups, 5, "{summary:?}");
}

/// `--by hash` also keeps examples that share a `group` together (one scenario or thread in
/// different words), as the README says `group` does; examples without one are unaffected.
#[test]
fn split_by_hash_keeps_a_group_together_whatever_its_wording() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let mut examples: Vec<Example> = (0..40)
        .map(|i| {
            let text = format!(
                "ticket number {i} about a completely different topic {}",
                "x".repeat(i)
            );
            vpn_ticket(&validator, &format!("u{i}"), &text, None)
        })
        .collect();
    let wordings = [
        "VPN keeps dropping since this morning",
        "Cannot stay connected to the remote network, it cuts out",
        "Tunnel to the office disconnects every few minutes",
    ];
    for (i, t) in wordings.iter().enumerate() {
        examples.push(vpn_ticket(&validator, &format!("g{i}"), t, Some("net-vpn-drops")));
    }
    let mut apart = 0;
    for seed in 0..10 {
        assert_eq!(
            splits_of(&hash_split(&examples, seed), 'g').len(),
            1,
            "seed {seed}: one group in two splits"
        );
        // Without the group the three wordings are not near duplicates: they would scatter.
        let mut loose = examples.clone();
        for e in loose.iter_mut() {
            e.group = None;
        }
        apart += (splits_of(&hash_split(&loose, seed), 'g').len() > 1) as usize;
    }
    assert!(
        apart > 0,
        "the test's wordings never split apart without their group"
    );
}

/// `--keep`: a larger synthetic set split while keeping a smaller one's split. Without it the
/// scenarios move between splits (the balancing sees other group sizes); with it, no kept
/// scenario or text changes sides.
#[test]
fn split_keeping_an_earlier_split_never_moves_a_scenario_or_text() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let seeds = Seeds::load(&Seeds::default_dir(&root(), &taxonomy), &taxonomy).unwrap();
    let opts = SplitOptions {
        by: SplitBy::Template,
        ratios: "80,10,10".parse::<Ratios>().unwrap(),
        seed: 7,
        near_dup_threshold: 0.8,
        stratify: Some("category".into()),
    };
    let mut kept = generate(&seeds, &validator, &options(600, 7)).unwrap().examples;
    assign_splits(&mut kept, &opts).unwrap();
    let kept_group: BTreeMap<&str, Split> = kept
        .iter()
        .map(|e| (e.group.as_deref().unwrap(), e.split.unwrap()))
        .collect();
    let kept_text: BTreeMap<&str, Split> = kept.iter().map(|e| (e.text.as_str(), e.split.unwrap())).collect();
    let larger = generate(&seeds, &validator, &options(1500, 7)).unwrap().examples;
    let moved = |ex: &[Example]| {
        ex.iter()
            .filter(|e| {
                kept_group
                    .get(e.group.as_deref().unwrap())
                    .is_some_and(|s| Some(*s) != e.split)
            })
            .count()
    };
    let mut plain = larger.clone();
    assign_splits(&mut plain, &opts).unwrap();
    assert!(
        moved(&plain) > 0,
        "the plain split moved no kept scenario: this test shows nothing"
    );
    let mut keeping = larger.clone();
    let summary = assign_splits_keeping(&mut keeping, &kept, &opts).unwrap();
    assert_eq!(moved(&keeping), 0);
    assert_eq!(summary.moved_from_kept_scenario, 0, "{summary:?}");
    for e in &keeping {
        if let Some(s) = kept_text.get(e.text.as_str()) {
            assert_eq!(e.split, Some(*s), "{}: a kept text changed sides", e.id);
        }
    }
    let new_groups = keeping
        .iter()
        .filter(|e| !kept_group.contains_key(e.group.as_deref().unwrap()))
        .count();
    assert!(new_groups > 0, "no new scenario: the free groups went untested");
    let n = keeping.len() as f64;
    assert!(
        (0.7..0.9).contains(&(summary.per_split[0].0 as f64 / n)),
        "{summary:?}"
    );

    // --by hash: a new near duplicate of a kept test ticket goes to test, whatever the seed;
    // and a group that touches both kept train and kept test goes to test.
    let line = |id: &str, text: &str, group: Option<&str>| vpn_ticket(&validator, id, text, group);
    let mut held = line(
        "k1",
        "My VPN drops every ten minutes since the update, please help me",
        Some("vpn"),
    );
    held.split = Some(Split::Test);
    let mut trained = line(
        "k2",
        "The printer on floor three prints black stripes on every page",
        Some("printer"),
    );
    trained.split = Some(Split::Train);
    let kept = vec![held, trained];
    for by in [SplitBy::Hash, SplitBy::Template] {
        for seed in 0..5 {
            let mut ex: Vec<Example> = (0..30)
                .map(|i| {
                    line(
                        &format!("u{i}"),
                        &format!("unrelated ticket {i} {}", "y".repeat(i)),
                        Some(&format!("g{i}")),
                    )
                })
                .collect();
            ex.push(line(
                "n1",
                "my vpn drops every ten minutes since the update please help me!!",
                Some("other"),
            ));
            // The printer scenario (kept in train) with a text near the kept test ticket.
            ex.push(line(
                "n2",
                "My VPN drops every ten minutes since the update, please help me now",
                Some("printer"),
            ));
            ex.push(line(
                "n3",
                "The printer on floor three prints black stripes on every page!",
                Some("printer"),
            ));
            let o = SplitOptions {
                by,
                seed,
                stratify: None,
                ..opts.clone()
            };
            let summary = assign_splits_keeping(&mut ex, &kept, &o).unwrap();
            let split_of = |id: &str| ex.iter().find(|e| e.id == id).unwrap().split;
            assert_eq!(split_of("n1"), Some(Split::Test), "{by:?} seed {seed}");
            assert_eq!(split_of("n2"), Some(Split::Test), "{by:?} seed {seed}");
            if by == SplitBy::Template {
                // n3 is in the printer scenario, which now touches a held-out text.
                assert_eq!(split_of("n3"), Some(Split::Test), "{by:?} seed {seed}");
                // n2 and n3: a scenario kept in train, now in test; the summary says so.
                assert_eq!(summary.moved_from_kept_scenario, 2, "{summary:?}");
            } else {
                assert_eq!(summary.moved_from_kept_scenario, 0, "no scenarios by hash");
            }
        }
    }
    // A kept example without a split is an error, not a silent pass.
    let mut unsplit = kept.clone();
    unsplit[0].split = None;
    let mut ex = vec![line(
        "n1",
        "my vpn drops every ten minutes since the update please help me!!",
        None,
    )];
    let o = SplitOptions {
        by: SplitBy::Hash,
        ..opts.clone()
    };
    let err = assign_splits_keeping(&mut ex, &unsplit, &o)
        .unwrap_err()
        .to_string();
    assert!(err.contains("k1") && err.contains("no split"), "{err}");
}

#[test]
fn imports_every_complete_row_of_the_shared_customer_support_dataset() {
    let csv_path = root().join("../shared/datasets/customer-support-tickets/tickets-v3-5lang.csv");
    if !csv_path.exists() {
        panic!(
            "{} is missing: the tests expect ../shared beside the checkout",
            csv_path.display()
        );
    }
    let taxonomy = Taxonomy::from_file(root().join("configs/taxonomy/customer-support.toml")).unwrap();
    let validator = Validator::new(&taxonomy);
    let specs: Vec<String> = [
        "text=body",
        "subject=subject",
        "category=queue",
        "priority=priority",
        "request_type=type",
        "lang=language",
    ]
    .map(String::from)
    .to_vec();
    let report = import::import_file(
        &csv_path,
        &validator,
        &ImportOptions {
            mapping: ColumnMapping::parse(&specs, &taxonomy).unwrap(),
            labels: LabelMap::default(),
            source: "v3".into(),
            max_text_chars: 20_000,
            max_rows: None,
        },
    )
    .unwrap();
    // Independent count of complete rows with the csv crate: body present and every label a
    // value of the taxonomy.
    let mut reader = csv::Reader::from_path(&csv_path).unwrap();
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let mut complete = 0;
    let mut total = 0;
    for rec in reader.records() {
        let rec = rec.unwrap();
        total += 1;
        let ok = !rec[col("body")].trim().is_empty()
            && taxonomy
                .field("category")
                .unwrap()
                .has_value(rec[col("queue")].trim())
            && taxonomy
                .field("priority")
                .unwrap()
                .has_value(rec[col("priority")].trim())
            && taxonomy
                .field("request_type")
                .unwrap()
                .has_value(rec[col("type")].trim());
        complete += ok as usize;
    }
    assert_eq!(report.rows, total);
    assert_eq!(report.examples.len(), complete);
    assert_eq!(report.examples.len() + report.rejects.len(), total);
    let counts = Counts::of(&taxonomy, &report.examples);
    assert_eq!(
        counts.langs.keys().cloned().collect::<Vec<_>>(),
        ["de", "en", "es", "fr", "pt"]
    );
    assert!(counts.min_value_count() > 0, "{counts}");
    // Line numbers point at the record: the first data row is on line 2.
    assert_eq!(report.examples[0].id, "v3:2");
}

/// The seed material built into the binary (`Seeds::builtin`, what `triage data synth` uses
/// outside the source tree) is the shipped folder, file for file, and generates the same bytes.
#[test]
fn builtin_seed_files_are_the_shipped_folder() {
    use triage_data::synth::SeedFiles;
    let taxonomy = Taxonomy::builtin_default();
    let dir = Seeds::default_dir(&root(), &taxonomy);
    let folder = SeedFiles::read(&dir).unwrap();
    let builtin = SeedFiles::builtin("default").expect("the default taxonomy ships seeds");
    assert_eq!(
        builtin.surface, folder.surface,
        "surface.toml: rebuild after editing"
    );
    assert_eq!(builtin.slots, folder.slots, "slots.toml");
    let names = |f: &SeedFiles| -> Vec<String> {
        f.scenarios
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&builtin),
        names(&folder),
        "a scenario file was added or removed: list it in BUILTIN_DEFAULT_SCENARIOS (crates/triage-data/src/synth/seeds.rs)"
    );
    for ((name, a), (_, b)) in builtin.scenarios.iter().zip(&folder.scenarios) {
        assert!(a == b, "{} differs from the built-in copy", name.display());
    }
    assert!(SeedFiles::builtin("customer-support").is_none());
    let validator = Validator::new(&taxonomy);
    let from_dir = Seeds::load(&dir, &taxonomy).unwrap();
    let built_in = Seeds::builtin(&taxonomy).unwrap().unwrap();
    let a = generate(&from_dir, &validator, &options(60, 3)).unwrap();
    let b = generate(&built_in, &validator, &options(60, 3)).unwrap();
    assert_eq!(jsonl(&a.examples), jsonl(&b.examples));
}

/// Seed folders whose scenario files define no scenario are an error naming the folder, not a
/// division by zero in the generator.
#[test]
fn seeds_without_scenarios_are_an_error() {
    let taxonomy = Taxonomy::builtin_default();
    let from = Seeds::default_dir(&root(), &taxonomy);
    let dir = std::env::temp_dir().join(format!("triage-empty-seeds-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("scenarios")).unwrap();
    for f in ["surface.toml", "slots.toml"] {
        std::fs::copy(from.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("scenarios/a.toml"), "# nothing yet\n").unwrap();
    let validator = Validator::new(&taxonomy);
    let e = Seeds::load(&dir, &taxonomy)
        .and_then(|s| generate(&s, &validator, &options(10, 1)).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("scenarios") && e.contains("no [[scenario]]"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scenario may give one summary per text variant; each example then carries the summary of
/// the variant its text uses, and a variant's summary that fills a slot its text does not fill
/// is an error naming the scenario, the variant and the language.
#[test]
fn per_variant_summaries_follow_the_text_and_may_not_state_more() {
    let taxonomy = Taxonomy::builtin_default();
    let from = Seeds::default_dir(&root(), &taxonomy);
    let dir = std::env::temp_dir().join(format!("triage-variant-seeds-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("scenarios")).unwrap();
    for f in ["surface.toml", "slots.toml"] {
        std::fs::copy(from.join(f), dir.join(f)).unwrap();
    }
    // Markers zq0..zq2 (too short for typos, no abbreviation) tell the variant from the text.
    let texts = |lang: &str| {
        format!(
            "{lang} = [\"printer zq0 jammed\", \"The printer zq1 is jammed {{since}}.\", \"The printer zq2 on my floor is jammed {{since}}; I opened tray 2 and pulled out a torn sheet, still jammed.\"]\n"
        )
    };
    let scenario = |summary: &str| {
        let mut s = format!(
            "[[scenario]]\nid = \"printer-jam\"\ncategory = \"Hardware\"\nsubcategory = \"Printer / Scanner\"\nassignment_group = \"Hardware Support\"\nrequest_type = \"Incident\"\npriority = \"Medium\"\nsummary = {summary}\n"
        );
        for lang in ["en", "de", "fr", "es", "pt"] {
            s += &texts(lang);
        }
        s
    };
    let good = r#"["Printer S0 jammed", "Printer S1 jammed {since}", "Printer S2 jammed {since}; torn sheet removed from tray 2, still jammed"]"#;
    std::fs::write(dir.join("scenarios/a.toml"), scenario(good)).unwrap();
    let validator = Validator::new(&taxonomy);
    let seeds = Seeds::load(&dir, &taxonomy).unwrap();
    let report = generate(&seeds, &validator, &options(12, 5)).unwrap();
    let mut seen = BTreeSet::new();
    for e in &report.examples {
        let text = e.text.to_lowercase();
        let v = (0..3)
            .find(|i| text.contains(&format!("zq{i}")))
            .unwrap_or_else(|| panic!("no variant marker in {:?}", e.text));
        assert!(
            e.ticket.summary().starts_with(&format!("Printer S{v} jammed")),
            "variant {v}: {:?} for {:?}",
            e.ticket.summary(),
            e.text
        );
        seen.insert(v);
    }
    assert!(seen.len() >= 2, "variants seen: {seen:?}");

    // Summary [0] names {since}, which the chat line [0] never says.
    let bad = r#"["Printer jammed {since}", "Printer jammed {since}", "Printer jammed {since}"]"#;
    std::fs::write(dir.join("scenarios/a.toml"), scenario(bad)).unwrap();
    let e = Seeds::load(&dir, &taxonomy).unwrap_err().to_string();
    assert!(
        e.contains("a.toml") && e.contains("printer-jam") && e.contains("summary [0] uses {since}"),
        "{e}"
    );
    std::fs::write(dir.join("scenarios/a.toml"), scenario(r#"["only", "two"]"#)).unwrap();
    let e = Seeds::load(&dir, &taxonomy).unwrap_err().to_string();
    assert!(e.contains("three non-empty strings"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
