//! Constrained inference on the real Qwen2.5-Coder 0.5B (fetched through the registry on first
//! use; CI pulls it first): every output must validate against the taxonomy's schema, by
//! construction, on varied and hostile input.

use std::path::{Path, PathBuf};

use serde_json::Value;
use triage_infer::{InferError, Structurer, StructurerOptions};
use triage_llm::GgufFile;
use triage_registry::ModelStore;
use triage_taxonomy::{Taxonomy, Validator};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn structurer(taxonomy: Taxonomy, opts: StructurerOptions) -> Structurer {
    let store = ModelStore::from_env();
    let spec = store.registry().get("0.5b").unwrap();
    let path = store
        .ensure(spec, None)
        .unwrap_or_else(|e| panic!("the 0.5B test model is needed (`triage model pull 0.5b`): {e}"));
    let gguf = GgufFile::open(path).unwrap();
    // Share the system prompt's KV cache between the test processes (nextest runs each test
    // in its own process): the first one to need it computes it.
    let opts = StructurerOptions {
        prefix_cache_dir: Some(store.cache_dir().join("prefix")),
        model_sha256: Some(spec.sha256.clone()),
        ..opts
    };
    Structurer::new(&gguf, taxonomy, opts).unwrap()
}

fn incidents() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/incidents.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["lang"].as_str().unwrap().to_string(),
                i["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A ~20 kB log dump with the real problem at the start and the end.
fn huge_input() -> String {
    let mut s = String::from("Outlook crashes on start since this morning. Log attached:\n");
    let mut i = 0;
    while s.len() < 20_000 {
        s.push_str(&format!(
            "2026-11-22T08:{:02}:{:02}Z ERROR outlook.exe faulting module mso20win32client.dll 0x{:08x}\n",
            i / 60 % 60,
            i % 60,
            i * 7919
        ));
        i += 1;
    }
    s.push_str("Please call me back, I cannot read e-mail at all.\n");
    s
}

#[test]
fn every_output_validates_on_varied_and_hostile_incidents() {
    let taxonomy = Taxonomy::builtin_default();
    let validator = Validator::new(&taxonomy);
    let s = structurer(taxonomy.clone(), StructurerOptions::default());
    let mut cases = incidents();
    cases.push(("huge-20kB".into(), "en".into(), huge_input()));
    assert!(cases.len() >= 20);
    let langs: std::collections::BTreeSet<_> = cases.iter().map(|c| c.1.clone()).collect();
    assert_eq!(langs.len(), 5, "five languages: {langs:?}");
    let enum_fields = taxonomy.fields.len();
    for (id, _, text) in &cases {
        let out = s.structure(text).unwrap_or_else(|e| panic!("{id}: {e}"));
        let json = out.ticket.to_json();
        // Independent check of the typed result against the JSON Schema.
        assert!(validator.schema_accepts(&json), "{id}: {json}");
        assert!(validator.violations(&json).is_empty(), "{id}");
        let m = &out.meta;
        assert_eq!(
            m.confidence.len(),
            enum_fields,
            "{id}: one confidence per enum field"
        );
        for c in &m.confidence {
            assert!((0.0..=1.0).contains(&c.confidence), "{id}: {c:?}");
            assert_eq!(out.ticket.get(&c.field), Some(c.value.as_str()), "{id}");
            assert!(
                c.top[0].1 >= c.confidence - 1e-6,
                "{id}: chosen value is the most probable (greedy)"
            );
            assert!(c.top.iter().map(|t| t.1).sum::<f32>() <= 1.0 + 1e-4, "{id}");
        }
        assert!(
            m.cached_prompt_tokens > 1000,
            "{id}: the system prompt comes from the prefix cache"
        );
        assert!(m.forced_tokens > 0 && m.output_tokens <= 320, "{id}: {m:?}");
        eprintln!(
            "{id}: {} ({:.0} ms)",
            serde_json::to_string(&out.ticket).unwrap(),
            m.timings.total_ms
        );
    }
}

/// Tickets decoded together (their forward passes shared, ragged lengths, one text twice)
/// are exactly the tickets decoded one at a time, confidences included: every row of a
/// product is computed the same way whatever the batch (`qwen2::ops::qmatmul`).
#[test]
fn batched_decoding_gives_the_tickets_of_one_at_a_time() {
    let s = structurer(Taxonomy::builtin_default(), StructurerOptions::default());
    let mut texts: Vec<String> = incidents().into_iter().map(|c| c.2).step_by(2).take(7).collect();
    texts.push(texts[0].clone());
    let alone: Vec<_> = texts.iter().map(|t| s.structure(t).unwrap()).collect();
    let mut together = Vec::new();
    triage_infer::for_each_concurrently(
        texts.len(),
        4,
        |i| s.structure(&texts[i]).unwrap(),
        |_, out| {
            together.push(out);
            true
        },
    );
    let shared: usize = together.iter().map(|o| o.meta.shared_passes).sum();
    assert!(shared > 0, "no forward pass was shared");
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.ticket, b.ticket, "text {i}");
        assert_eq!(a.meta.output_tokens, b.meta.output_tokens, "text {i}");
        let conf = |o: &triage_infer::Structured| -> Vec<(String, f32)> {
            o.meta
                .confidence
                .iter()
                .map(|c| (c.value.clone(), c.confidence))
                .collect()
        };
        assert_eq!(conf(a), conf(b), "text {i}");
    }
    assert_eq!(together[0].ticket, together[7].ticket);
}

#[test]
fn huge_input_is_cut_from_the_middle_with_a_warning_and_injection_changes_nothing() {
    let s = structurer(Taxonomy::builtin_default(), StructurerOptions::default());
    let out = s.structure(&huge_input()).unwrap();
    assert_eq!(out.meta.warnings.len(), 1, "{:?}", out.meta.warnings);
    assert!(out.meta.warnings[0].contains("cut"), "{:?}", out.meta.warnings);
    assert!(out.meta.prompt_tokens < s.system_prompt_tokens() + 1700);

    // The injected special tokens and instructions cannot break the format or the values.
    let inj = &incidents().into_iter().find(|c| c.0 == "en-injection").unwrap().2;
    let out = s.structure(inj).unwrap();
    let json = out.ticket.to_json();
    assert!(json.get("hacked").is_none());
    assert_ne!(json["category"], "Banana");
    assert!(["Low", "Medium", "High", "Critical"].contains(&json["priority"].as_str().unwrap()));
}

#[test]
fn empty_input_is_an_error_and_greedy_is_deterministic() {
    let s = structurer(Taxonomy::builtin_default(), StructurerOptions::default());
    assert!(matches!(s.structure("  \n\t "), Err(InferError::EmptyInput)));
    let a = s
        .structure("The projector in room 4.01 does not turn on.")
        .unwrap();
    let b = s
        .structure("The projector in room 4.01 does not turn on.")
        .unwrap();
    assert_eq!(a.ticket, b.ticket);
}

#[test]
fn a_non_default_taxonomy_gets_its_own_fields() {
    let taxonomy = Taxonomy::from_file(root().join("configs/taxonomy/customer-support.toml")).unwrap();
    let validator = Validator::new(&taxonomy);
    let opts = StructurerOptions {
        min_confidence: Some(0.99),
        ..StructurerOptions::default()
    };
    let s = structurer(taxonomy, opts);
    for text in [
        "I was charged twice for my subscription this month, please refund the duplicate payment.",
        "Unser Dashboard ist seit 9 Uhr nicht erreichbar, alle Kunden sind betroffen!",
        "¿Cuál es el precio del plan Enterprise para 50 usuarios?",
        "Je voudrais retourner le casque reçu hier, il est défectueux.",
        "O sistema de folha de pagamento não calcula as horas extras corretamente.",
    ] {
        let out = s.structure(text).unwrap();
        let json = out.ticket.to_json();
        assert!(validator.schema_accepts(&json), "{json}");
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["summary", "category", "priority", "request_type"]);
        assert!(["low", "medium", "high"].contains(&json["priority"].as_str().unwrap()));
        // With a 0.99 threshold, review is flagged exactly when some field is below it.
        let below = out.meta.confidence.iter().any(|c| c.confidence < 0.99);
        assert_eq!(out.meta.needs_review, below);
    }
}

/// Regression: values whose common prefix ends inside a multi-byte character ("Сеть" and
/// "Почта" share only the byte 0xD0), a parent with a single child and a one-value field (the
/// grammar forces the whole value) must all decode, with a confidence entry per field.
#[test]
fn non_ascii_values_and_forced_single_values() {
    let toml = r#"
format = 1
name = "ru-desk"
description = "Небольшая служба поддержки."

[[fields]]
name = "category"
description = "Область."

[fields.child]
name = "subcategory"
description = "Подробнее."

[[fields.values]]
name = "Сеть"
description = "Сеть, VPN, Wi-Fi."
children = [ { name = "VPN", description = "VPN не подключается." } ]

[[fields.values]]
name = "Почта"
description = "Электронная почта и календарь."
children = [
  { name = "Ящик", description = "Почтовый ящик." },
  { name = "Календарь", description = "Календарь и встречи." },
]

[[fields]]
name = "priority"
description = "Срочность."
values = [ { name = "Обычный", description = "Обычная срочность." } ]
"#;
    let taxonomy = Taxonomy::from_toml_str(toml, "ru-desk.toml").unwrap();
    let validator = Validator::new(&taxonomy);
    let s = structurer(taxonomy, StructurerOptions::default());
    for text in ["VPN не подключается с утра", "Не открывается календарь в Outlook"]
    {
        let out = s.structure(text).unwrap();
        assert!(
            validator.schema_accepts(&out.ticket.to_json()),
            "{:?}",
            out.ticket
        );
        let fields: Vec<&str> = out.meta.confidence.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            ["category", "subcategory", "priority"],
            "{:?}",
            out.meta.confidence
        );
        let prio = &out.meta.confidence[2];
        assert_eq!((prio.value.as_str(), prio.confidence), ("Обычный", 1.0));
        if out.ticket.get("category") == Some("Сеть") {
            assert_eq!(out.meta.confidence[1].confidence, 1.0, "single child is forced");
        }
    }
}

/// A calibration moves the decision its bias favours, rescales the confidences by its
/// temperature, and leaves the raw scores (what calibration is fitted on) as they were.
#[test]
fn a_calibration_moves_decisions_and_keeps_the_raw_scores() {
    use std::sync::Arc;
    use triage_infer::calibration::{Calibration, FieldCalibration, FitSummary};

    let text = "Outlook keeps asking for my password since this morning.";
    let s = structurer(Taxonomy::builtin_default(), StructurerOptions::default());
    let plain = s.structure(text).unwrap();
    let field = |out: &triage_infer::Structured| {
        out.meta
            .confidence
            .iter()
            .find(|c| c.field == "priority")
            .cloned()
            .unwrap()
    };
    let p = field(&plain);
    assert_eq!(p.scores.len(), 4, "{:?}", p.scores);
    let total: f32 = p.scores.iter().map(|(_, l)| l.exp()).sum();
    assert!(
        (total - 1.0).abs() < 1e-3,
        "scores are renormalised log-probabilities: {total}"
    );
    // The least likely value, pushed over the top by its bias.
    let (least, _) = p
        .scores
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .cloned()
        .unwrap();
    let cal = |temperature: f32, bias: &[(&str, f32)]| {
        let mut c = Calibration::default();
        c.fields.insert(
            "priority".into(),
            FieldCalibration {
                temperature,
                bias: bias.iter().map(|(v, b)| (v.to_string(), *b)).collect(),
                fit: FitSummary::default(),
            },
        );
        Arc::new(c)
    };
    let s = s.with_calibration(cal(1.0, &[(&least, 40.0)]));
    let moved = s.structure(text).unwrap();
    assert_eq!(moved.ticket.get("priority"), Some(least.as_str()));
    assert!(field(&moved).confidence > 0.99);
    for ((v, a), (w, b)) in p.scores.iter().zip(&field(&moved).scores) {
        assert_eq!(v, w);
        assert!((a - b).abs() < 1e-3, "{v}: raw score {a} became {b}");
    }
    // A temperature keeps the decision and softens the confidence.
    let s = s.with_calibration(cal(3.0, &[]));
    let soft = s.structure(text).unwrap();
    assert_eq!(soft.ticket.get("priority"), plain.ticket.get("priority"));
    assert!(
        field(&soft).confidence < p.confidence || p.confidence < 0.3,
        "{} vs {}",
        field(&soft).confidence,
        p.confidence
    );
    let validator = Validator::new(&Taxonomy::builtin_default());
    let json = moved.ticket.to_json();
    assert!(
        validator.schema_accepts(&json) && validator.violations(&json).is_empty(),
        "{json}"
    );
}

/// Weights whose embedding table is shorter than the tokenizer's vocabulary (a GGUF put
/// together from two models) are refused with an error naming the file, before the grammar
/// engine would index past the table.
#[test]
fn weights_shorter_than_the_tokenizer_are_refused() {
    let store = ModelStore::from_env();
    let spec = store.registry().get("0.5b").unwrap();
    let gguf = GgufFile::open(store.ensure(spec, None).unwrap()).unwrap();
    let cfg = triage_llm::qwen2::Config {
        vocab_size: 1000,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 16,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        max_position: 512,
    };
    let model = triage_llm::qwen2::Qwen2::random(&cfg, 1, &candle_core::Device::Cpu).unwrap();
    let taxonomy = Taxonomy::builtin_default();
    let err = Structurer::with_model(model.into(), &gguf, taxonomy, StructurerOptions::default())
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, InferError::Model(_)), "{msg}");
    assert!(
        msg.contains(&gguf.path().display().to_string()) && msg.contains("1000"),
        "{msg}"
    );
    assert!(
        msg.contains("past the model's 1000 embedding rows: the tokenizer"),
        "{msg}"
    );
}
