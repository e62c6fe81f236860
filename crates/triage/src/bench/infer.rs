//! `triage bench` (inference): speed on this machine, three engines in the same run over the
//! same incidents, written as Markdown (and JSON) — never a timed test.
//!
//! * (a) unconstrained greedy decoding of the same model and prompt, full prefill each time;
//! * (b) grammar-constrained, without fast-forward and without the prefix cache;
//! * (c) the full engine: fast-forward, prefix KV cache (warmed before timing), one ticket
//!   at a time;
//! * (d) the full engine in batch mode: B tickets in flight sharing every forward pass
//!   (`infer --input --batch-size B`), for each B of `--batch-sizes`.
//!
//! * (e) with `--vs-llama-server URL`: the same incidents sent to a llama-server (the same
//!   messages; the schema without its `anyOf` rules, which llama.cpp's grammar conversion
//!   mishandles; `cache_prompt`) by `--llama-clients` concurrent clients, every answer
//!   validated against the full rules (violations counted as invalid tickets); one request
//!   per slot first, so that every slot has the system prompt cached, as (c) and (d) do.
//!
//! Figures are reported as measured and as ratios against (a) and (c) from the same run; (d)
//! and (e) also count their tickets that differ from (c)'s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use triage_infer::{Meta, Structurer, StructurerOptions};

use super::common::{machine, peak_rss_mib, read_incidents, write_section};
use crate::Cli;

/// Options of the inference benchmark (`triage bench` without a subcommand).
#[derive(Args)]
pub struct InferBenchArgs {
    /// Models to measure (registry names or paths), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.5b,1.5b")]
    models: Vec<String>,
    /// Incidents for the full engine (c), from tests/fixtures/incidents.json.
    #[arg(long, default_value_t = 20)]
    n: usize,
    /// Incidents for the slow baselines (a) and (b) (each prefills the whole prompt).
    #[arg(long, default_value_t = 20)]
    baseline_n: usize,
    /// Incidents file (JSON array of {id, lang, text}).
    #[arg(long, default_value = "tests/fixtures/incidents.json")]
    incidents: PathBuf,
    /// Batch sizes for the batch-mode variant (d), comma-separated (none: `--batch-sizes ''`).
    #[arg(long, value_delimiter = ',', default_value = "4,8")]
    batch_sizes: Vec<usize>,
    /// Also measure a running llama-server (base URL, serving the same GGUF with
    /// `--parallel` slots) on the same incidents: variant (e).
    #[arg(long, value_name = "URL")]
    vs_llama_server: Option<String>,
    /// Concurrent clients sending to the llama-server (its `--parallel` slots).
    #[arg(long, default_value_t = 4)]
    llama_clients: usize,
    /// Markdown report to write (a JSON twin is written beside it).
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
}

#[derive(Serialize, Default)]
struct Variant {
    name: String,
    tickets: usize,
    valid: usize,
    prefill_tokens: usize,
    prefill_ms: f64,
    output_tokens: usize,
    sampled_tokens: usize,
    decode_ms: f64,
    mask_ms: f64,
    per_ticket_ms: Vec<f64>,
    /// Wall time of the whole variant (tickets one after another, or in flight together).
    wall_s: f64,
    /// Batch mode: tickets that differ from (c)'s.
    differ_from_c: Option<usize>,
}

impl Variant {
    fn add(&mut self, m: &Meta, valid: bool) {
        self.tickets += 1;
        self.valid += usize::from(valid);
        self.prefill_tokens += m.prompt_tokens - m.cached_prompt_tokens;
        self.prefill_ms += m.timings.prefill_ms;
        self.output_tokens += m.output_tokens;
        self.sampled_tokens += m.output_tokens - m.forced_tokens;
        self.decode_ms += m.timings.decode_ms;
        self.mask_ms += m.timings.mask_ms;
        self.per_ticket_ms.push(m.timings.total_ms);
    }
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.per_ticket_ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
    fn mean(&self) -> f64 {
        self.per_ticket_ms.iter().sum::<f64>() / self.per_ticket_ms.len().max(1) as f64
    }
}

#[derive(Serialize)]
struct ModelReport {
    model: String,
    load_s: f64,
    system_prompt_tokens: usize,
    system_prompt_prefill_s: f64,
    peak_rss_mib: f64,
    variants: Vec<Variant>,
}

/// Runs the inference benchmark and writes its section of the report.
pub fn run(cli: &Cli, args: &InferBenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let incidents = read_incidents(&args.incidents)?;
    if incidents.is_empty() || args.n == 0 {
        anyhow::bail!("need incidents and --n ≥ 1 (every variant times the first --n tickets)");
    }
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let store = crate::model_cmd::store(cli)?;
    let mut reports = Vec::new();
    for name in &args.models {
        let path = store.resolve(Some(name), None)?;
        eprintln!("== {name}: {}", path.display());
        let t = Instant::now();
        let (gguf, model) = crate::model_cmd::load_cpu(&path)?;
        let load_s = t.elapsed().as_secs_f64();
        let full = Structurer::with_model(
            model.clone(),
            &gguf,
            taxonomy.clone(),
            StructurerOptions::default(),
        )?;
        let plain = Structurer::with_model(
            model.clone(),
            &gguf,
            taxonomy.clone(),
            StructurerOptions {
                fast_forward: false,
                prefix_cache: false,
                ..StructurerOptions::default()
            },
        )?;
        let t = Instant::now();
        full.warm_up()?;
        let system_prompt_prefill_s = t.elapsed().as_secs_f64();
        let mut a = Variant {
            name: "(a) unconstrained greedy".into(),
            ..Variant::default()
        };
        let mut b = Variant {
            name: "(b) constrained, no fast-forward, no prefix cache".into(),
            ..Variant::default()
        };
        let mut c = Variant {
            name: "(c) full engine (fast-forward + prefix cache)".into(),
            ..Variant::default()
        };
        let validator = triage_taxonomy::Validator::new(&taxonomy);
        let mut c_tickets = Vec::new();
        for (i, text) in incidents.iter().enumerate().take(args.n.max(args.baseline_n)) {
            if i < args.baseline_n {
                let (out, m) = full.generate_unconstrained(text)?;
                let valid = validator.parse_str(out.trim()).is_ok();
                a.add(&m, valid);
                a.wall_s += m.timings.total_ms / 1000.0;
                let s = plain.structure(text)?;
                b.add(&s.meta, true);
                b.wall_s += s.meta.timings.total_ms / 1000.0;
            }
            if i < args.n {
                let s = full.structure(text)?;
                c.add(&s.meta, true);
                c.wall_s += s.meta.timings.total_ms / 1000.0;
                c_tickets.push(s.ticket);
            }
            eprintln!("  {}/{}", i + 1, args.n.max(args.baseline_n));
        }
        let mut variants = vec![a, b, c];
        let texts: Vec<&String> = incidents.iter().take(c_tickets.len()).collect();
        for &bs in args.batch_sizes.iter().filter(|&&b| b > 0) {
            let mut d = Variant {
                name: format!("(d) batch mode, {bs} in flight"),
                differ_from_c: Some(0),
                ..Variant::default()
            };
            let t = Instant::now();
            let mut failed = None;
            triage_infer::for_each_concurrently(
                texts.len(),
                bs,
                |i| full.structure(texts[i]),
                |i, r| match r {
                    Ok(s) => {
                        d.add(&s.meta, true);
                        if s.ticket != c_tickets[i] {
                            *d.differ_from_c.get_or_insert(0) += 1;
                        }
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                },
            );
            if let Some(e) = failed {
                return Err(e.into());
            }
            d.wall_s = t.elapsed().as_secs_f64();
            eprintln!("  batch {bs}: {:.1} s", d.wall_s);
            variants.push(d);
        }
        if let Some(url) = &args.vs_llama_server {
            let remote = llama_server(url, &gguf, &taxonomy)?;
            let n = args.llama_clients.max(1);
            let mut e = Variant {
                name: format!("(e) llama-server, {n} clients, schema without anyOf"),
                differ_from_c: Some(0),
                ..Variant::default()
            };
            // Warm: one request per slot caches the system prompt in every slot, as (c) and
            // (d) start with theirs cached.
            eprintln!("  llama-server: warming {n} slots");
            triage_infer::for_each_concurrently(
                n,
                n,
                |i| remote.structure(texts[i % texts.len()]),
                |_, _| true,
            );
            let t = Instant::now();
            triage_infer::for_each_concurrently(
                texts.len(),
                n,
                |i| remote.structure(texts[i]),
                |i, r| {
                    match r {
                        Ok(s) => {
                            e.add(&s.meta, true);
                            if s.ticket != c_tickets[i] {
                                *e.differ_from_c.get_or_insert(0) += 1;
                            }
                        }
                        Err(err) => {
                            eprintln!("  llama-server, incident {i}: {err}");
                            e.tickets += 1;
                            *e.differ_from_c.get_or_insert(0) += 1;
                        }
                    }
                    true
                },
            );
            e.wall_s = t.elapsed().as_secs_f64();
            eprintln!(
                "  llama-server: {:.1} s, {} of {} valid",
                e.wall_s, e.valid, e.tickets
            );
            variants.push(e);
        }
        reports.push(ModelReport {
            model: name.clone(),
            load_s,
            system_prompt_tokens: full.system_prompt_tokens(),
            system_prompt_prefill_s,
            peak_rss_mib: peak_rss_mib(),
            variants,
        });
    }
    // A comparison with llama-server is its own section, beside the inference one.
    let section = match args.vs_llama_server {
        Some(_) => "inference-vs-llama-server",
        None => "inference",
    };
    write_report(&args.out, section, &reports)?;
    eprintln!("wrote {}", args.out.display());
    Ok(std::process::ExitCode::SUCCESS)
}

/// A client for llama-server's OpenAI-compatible endpoint, given the same work as triage.
fn llama_server(
    url: &str,
    gguf: &triage_llm::GgufFile,
    taxonomy: &triage_taxonomy::Taxonomy,
) -> anyhow::Result<triage_infer::remote::RemoteStructurer> {
    let mut extra = serde_json::Map::new();
    extra.insert("cache_prompt".into(), serde_json::Value::Bool(true));
    let opts = triage_infer::remote::RemoteOptions {
        url: url.to_owned(),
        model: "gguf".into(),
        timeout: std::time::Duration::from_secs(600),
        drop_any_of: true,
        extra,
        ..triage_infer::remote::RemoteOptions::default()
    };
    Ok(triage_infer::remote::RemoteStructurer::new(
        opts,
        taxonomy.clone(),
        triage_llm::Tokenizer::from_gguf(gguf)?,
    )?)
}

/// `f()` when the variant measured `ms`, else a dash.
fn timed(ms: f64, f: impl Fn() -> String) -> String {
    match ms > 0.0 {
        true => f(),
        false => "–".into(),
    }
}

fn write_report(out: &Path, section: &str, reports: &[ModelReport]) -> anyhow::Result<()> {
    let command: Vec<String> = std::env::args().skip(1).collect();
    let mut md = format!(
        "## {}\n\nWritten by `triage {}` (see `crates/triage/src/bench/infer.rs`); {}. Incidents: `tests/fixtures/incidents.json`. Ratios are against (a) in the same run.\n\n",
        match section {
            "inference" => "Inference",
            _ => "Inference: triage and llama-server, same incidents (`docs/llama-server.sh`)",
        },
        command.join(" "),
        machine()
    );
    md.push_str("Variants: (a) unconstrained greedy decoding, same model and prompt, full prefill each ticket; (b) grammar-constrained, no fast-forward, no prefix cache; (c) full engine, prefix cache warm, one ticket at a time; (d) the full engine with B tickets in flight sharing every forward pass (`infer --input --batch-size B`). Tickets/s is tickets over the variant's wall time; in (d) a ticket's ms include its waits for the shared passes. \"differ from (c)\": tickets of (d) not identical to (c)'s. (e), where present: a llama-server serving the same GGUF, fed by N concurrent clients with the same messages, its schema without the `anyOf` rules (its grammar conversion mishandles them), `cache_prompt`, each slot warmed first; every answer is validated against the full rules, and one that breaks them counts as an invalid ticket.\n\n");
    for r in reports {
        md.push_str(&format!(
            "### {}\n\nload {:.1} s; system prompt {} tokens, prefilled once in {:.1} s; peak RSS {:.0} MiB.\n\n",
            r.model, r.load_s, r.system_prompt_tokens, r.system_prompt_prefill_s, r.peak_rss_mib
        ));
        md.push_str("| variant | tickets | valid tickets | differ from (c) | prefill tok/s | decode tok/s (output) | mask µs/sampled token | mask % of decode | ms/ticket p50 | p95 | mean | tickets/s | vs (a) | vs (c) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        let rate = |v: &Variant| v.tickets as f64 / v.wall_s.max(1e-9);
        let (base, one) = (rate(&r.variants[0]), rate(&r.variants[2]));
        for v in &r.variants {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.2}x | {:.2}x |\n",
                v.name,
                v.tickets,
                v.valid,
                v.differ_from_c.map_or("–".to_string(), |n| n.to_string()),
                // A remote engine reports no prefill, decode or mask time.
                timed(v.prefill_ms, || format!("{:.1}", v.prefill_tokens as f64 / (v.prefill_ms / 1000.0))),
                timed(v.decode_ms, || format!("{:.1}", v.output_tokens as f64 / (v.decode_ms / 1000.0))),
                timed(v.decode_ms, || format!("{:.0}", v.mask_ms * 1000.0 / v.sampled_tokens.max(1) as f64)),
                timed(v.decode_ms, || format!("{:.2}%", 100.0 * v.mask_ms / v.decode_ms)),
                v.pct(0.5),
                v.pct(0.95),
                v.mean(),
                rate(v),
                rate(v) / base,
                rate(v) / one,
            ));
        }
        md.push('\n');
    }
    write_section(out, section, &md, reports)
}
