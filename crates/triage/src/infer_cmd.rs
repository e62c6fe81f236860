//! `triage infer`: one incident from stdin → one JSON ticket on stdout.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use triage_infer::{Structurer, StructurerOptions, TicketEngine};
use triage_llm::GgufFile;

use crate::Cli;

/// Options of `triage infer`.
#[derive(Args)]
pub struct InferArgs {
    #[command(flatten)]
    adapter: crate::adapter_cmd::AdapterArgs,
    #[command(flatten)]
    backend: crate::backend_cmd::BackendArgs,
    /// Also create the ticket in an ITSM (jira, jsm, zoho, sdp); see `triage push --help`.
    /// Prints one document, `{"ticket": ..., "push": ...}`; with --input every row is pushed
    /// (idempotently: a re-run pushes only the rows not pushed yet).
    #[arg(long, value_name = "VENDOR")]
    push: Option<triage_connectors::Vendor>,
    #[command(flatten)]
    push_options: crate::push_cmd::PushOptions,
    /// Print the per-field confidence, token counts and timings (JSON) on stderr.
    #[arg(long)]
    explain: bool,
    /// Mark the ticket for review when a field's confidence is below this (0..1).
    #[arg(long, value_name = "P")]
    min_confidence: Option<f32>,
    /// Sampling temperature; 0 = greedy and deterministic.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed for sampling (with --temperature).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Cap on generated tokens (16..=2048; a ticket needs 40 to 80).
    #[arg(long, default_value_t = 320, value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
        .range(triage_serve::limits::MIN_TOKENS as u64..=triage_serve::limits::MAX_NEW_TOKENS_CEILING as u64))]
    max_new_tokens: usize,
    /// Incident tokens kept (longer input is cut from the middle, with a warning).
    #[arg(long, default_value_t = 1536)]
    max_input_tokens: usize,
    /// Pretty-print the ticket (default: when stdout is a terminal).
    #[arg(long)]
    pretty: bool,
    /// Batch mode: incidents from a .jsonl, .csv or .txt file (needs --output).
    #[arg(long, value_name = "FILE", requires = "output")]
    input: Option<std::path::PathBuf>,
    /// Batch mode: JSONL results, one line per input row, in order; resumes if it exists.
    #[arg(long, value_name = "FILE", requires = "input")]
    output: Option<std::path::PathBuf>,
    #[command(flatten)]
    device: crate::backend_cmd::DeviceArgs,
    /// Batch mode: rows decoded at once, sharing every forward pass (1: one at a time).
    #[arg(long, default_value_t = triage_infer::DEFAULT_BATCH_SIZE,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    batch_size: usize,
}

pub fn run(cli: &Cli, args: &InferArgs) -> anyhow::Result<ExitCode> {
    // Built before the model loads, so a bad mapping fails at once.
    let pusher = args
        .push
        .map(|vendor| crate::push_cmd::Pusher::new(cli, vendor, &args.push_options))
        .transpose()?;
    if let (Some(input), Some(output)) = (&args.input, &args.output) {
        let structurer = load(cli, args)?;
        let validator = triage_taxonomy::Validator::new(structurer.taxonomy());
        let structurer = &*structurer;
        let push = pusher.as_ref().map(|pusher| crate::batch::BatchPush {
            pusher,
            validator: &validator,
        });
        let (rows, errors) = crate::batch::run(
            structurer,
            input,
            output,
            args.explain,
            push.as_ref(),
            args.batch_size,
        )?;
        eprintln!("{rows} rows in {}, {errors} with errors", output.display());
        return Ok(if errors == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(3)
        });
    }
    let text = read_incident()?;
    let structurer = load(cli, args)?;
    let out = structurer.structure(&text)?;
    for w in &out.meta.warnings {
        tracing::warn!("{w}");
    }
    if args.explain {
        eprintln!("{}", serde_json::to_string_pretty(&out.meta)?);
    }
    if out.meta.needs_review {
        tracing::warn!("needs review: a field's confidence is below --min-confidence");
    }
    // With --push, one document: {"ticket": ..., "push": ...} (or "push_error").
    let (doc, push_failed) = match &pusher {
        None => (serde_json::to_value(&out.ticket)?, None),
        Some(pusher) => {
            let result = pusher.push(&pusher.input(out.ticket.clone(), text, None), true);
            let doc = crate::push_cmd::combined(&out.ticket, result.as_ref());
            (doc, result.err())
        }
    };
    let json = if args.pretty || std::io::stdout().is_terminal() {
        serde_json::to_string_pretty(&doc)?
    } else {
        serde_json::to_string(&doc)?
    };
    let printed = crate::print_line(&json);
    if let Some(e) = push_failed {
        return Err(e.context("the ticket was structured (printed above) but not pushed"));
    }
    printed?;
    Ok(ExitCode::SUCCESS)
}

fn load(cli: &Cli, args: &InferArgs) -> anyhow::Result<Box<dyn TicketEngine>> {
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let remote = crate::backend_cmd::remote(
        &args.backend,
        taxonomy.clone(),
        || crate::backend_cmd::model_tokenizer(cli),
        args.max_new_tokens,
        args.max_input_tokens,
        args.min_confidence,
    )?;
    if let Some(r) = remote {
        if args.adapter.adapter.is_some() {
            anyhow::bail!("--adapter applies to the local backend; with --backend openai:URL name the served adapter with --backend-model");
        }
        tracing::info!(url = r.endpoint(), "tickets are decoded by the remote backend");
        return Ok(Box::new(r));
    }
    let path = crate::model_cmd::model_path(cli)?;
    let t = std::time::Instant::now();
    let gguf = GgufFile::open(&path)?;
    let (prefix_cache_dir, model_sha256) = crate::model_cmd::prefix_cache(cli, &path);
    let opts = StructurerOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        seed: args.seed,
        min_confidence: args.min_confidence,
        max_input_tokens: args.max_input_tokens,
        device: args.device.resolve()?,
        prefix_cache_dir,
        model_sha256,
        ..StructurerOptions::default()
    };
    let mut s = Structurer::new(&gguf, taxonomy, opts)?;
    if let Some(r) = crate::adapter_cmd::resolve(cli, &args.adapter, &s, &path)? {
        s = r.apply(s);
    }
    tracing::info!(model = %path.display(), secs = t.elapsed().as_secs_f32(), "model loaded");
    Ok(Box::new(s))
}

/// Bytes of stdin kept from each end of a huge input (the middle is dropped with a warning,
/// as `--max-input-tokens` later cuts the middle of what is left): memory stays bounded
/// whatever is piped in, and ~1,536 tokens need only a few KiB.
const STDIN_KEEP: usize = 256 * 1024;

/// Reads at most the first and last `keep` bytes of `r`, cut at UTF-8 character boundaries;
/// returns them joined by a line break and whether anything was dropped.
fn read_ends(mut r: impl Read, keep: usize) -> std::io::Result<(Vec<u8>, bool)> {
    let mut head = Vec::new();
    (&mut r).take(keep as u64).read_to_end(&mut head)?;
    let mut tail: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut dropped = false;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        tail.extend(&buf[..n]);
        if tail.len() > keep {
            tail.drain(..tail.len() - keep);
            dropped = true;
        }
    }
    if !dropped {
        head.extend(tail);
        return Ok((head, false));
    }
    // Cut at character boundaries: an incomplete character at the head's end, continuation
    // bytes at the tail's start.
    if let Err(e) = std::str::from_utf8(&head) {
        if e.error_len().is_none() {
            head.truncate(e.valid_up_to());
        }
    }
    let tail: Vec<u8> = tail.into_iter().skip_while(|b| b & 0xC0 == 0x80).collect();
    head.extend_from_slice(b"\n\n");
    head.extend(tail);
    Ok((head, true))
}

/// Reads one incident from stdin: invalid UTF-8 is replaced (with a warning), empty input is
/// an error that says how to give one, and of a huge input only the first and last 256 KiB
/// are kept (with a warning).
pub fn read_incident() -> anyhow::Result<String> {
    let (bytes, dropped) = read_ends(std::io::stdin().lock(), STDIN_KEEP).context("cannot read stdin")?;
    if dropped {
        tracing::warn!(
            "input over {} KiB: only its first and last {} KiB are read",
            2 * STDIN_KEEP / 1024,
            STDIN_KEEP / 1024
        );
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("input is not valid UTF-8; invalid bytes were replaced with U+FFFD");
            String::from_utf8_lossy(e.as_bytes()).into_owned()
        }
    };
    if text.trim().is_empty() {
        anyhow::bail!("the incident text is empty: pipe it on stdin, e.g. `triage infer < examples/vpn.txt`");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small input is read whole; of a huge one only both ends are kept, cut at character
    /// boundaries, so what is kept is valid UTF-8 when the input is.
    #[test]
    fn huge_input_keeps_both_ends_at_character_boundaries() {
        let (small, dropped) = read_ends("my vpn drops".as_bytes(), 16).unwrap();
        assert_eq!((small.as_slice(), dropped), ("my vpn drops".as_bytes(), false));
        let exact = "x".repeat(32);
        assert_eq!(
            read_ends(exact.as_bytes(), 16).unwrap(),
            (exact.clone().into_bytes(), false)
        );
        let text = format!("HEAD{}TAIL", "é".repeat(100_000));
        let (kept, dropped) = read_ends(text.as_bytes(), 7).unwrap();
        assert!(dropped);
        // 7 bytes: "HEAD" + one "é" (2 bytes) + half of the next, which is cut.
        assert_eq!(String::from_utf8(kept).unwrap(), "HEADé\n\néTAIL");
    }
}
