//! `triage push`: send a ticket to Jira, JSM, Zoho Desk or ServiceDesk Plus.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;
use triage_connectors::{Connector, Outbox, PushInput, RetryPolicy, Vendor};
use triage_taxonomy::{Ticket, Validator};

use crate::Cli;

/// Options shared by `triage push` and `triage infer --push`.
#[derive(Args, Clone)]
pub struct PushOptions {
    /// Print the exact HTTP request (credentials redacted) instead of sending it.
    #[arg(long)]
    pub dry_run: bool,
    /// Mapping file (default: configs/connectors/<vendor>.toml).
    #[arg(long, value_name = "FILE")]
    pub mapping: Option<PathBuf>,
    /// Id of the source message (e-mail Message-ID); part of the external id.
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,
    /// Requester e-mail (JSM raiseOnBehalfOf, Zoho contact, SDP requester).
    #[arg(long, value_name = "EMAIL")]
    pub requester: Option<String>,
    /// Outbox file (default: $XDG_STATE_HOME/triage/outbox.jsonl).
    #[arg(long, value_name = "FILE")]
    pub outbox: Option<PathBuf>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

/// `triage push VENDOR`.
#[derive(Args)]
pub struct PushArgs {
    /// jira, jsm, zoho or sdp.
    vendor: Vendor,
    /// File with the original incident text (put in the description, and the basis of the
    /// external id). Default: the `text` key of the input, if any.
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    #[command(flatten)]
    options: PushOptions,
}

/// Reads a ticket (or `{"ticket": ..., "text": ...}`) from stdin and pushes it.
pub fn run(cli: &Cli, args: &PushArgs) -> anyhow::Result<ExitCode> {
    let taxonomy = crate::taxonomy_cmd::load_taxonomy(cli)?;
    let validator = Validator::new(&taxonomy);
    let mut raw = String::new();
    std::io::stdin()
        .read_to_string(&mut raw)
        .context("cannot read the ticket from stdin (UTF-8 JSON expected)")?;
    if raw.trim().is_empty() {
        bail!("no ticket on stdin: pipe one in, e.g. `triage infer < examples/vpn.txt | triage push jira --dry-run`");
    }
    let value: Value = serde_json::from_str(&raw).context("stdin is not JSON")?;
    let (ticket_value, text) = match value.get("ticket") {
        Some(t) => (
            t.clone(),
            value.get("text").and_then(Value::as_str).unwrap_or("").to_owned(),
        ),
        None => (value.clone(), String::new()),
    };
    let text = match &args.text_file {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => text,
    };
    let ticket = validator.parse(&ticket_value).map_err(|v| {
        anyhow::anyhow!(
            "the ticket does not validate against taxonomy {:?}: {v}",
            taxonomy.name
        )
    })?;
    push_ticket(args.vendor, ticket, text, &args.options)
}

/// Pushes one ticket (or prints the dry run); prints the result as JSON on stdout.
pub fn push_ticket(
    vendor: Vendor,
    ticket: Ticket,
    text: String,
    o: &PushOptions,
) -> anyhow::Result<ExitCode> {
    let connector = Connector::load(vendor, o.mapping.as_deref())?;
    let input = PushInput {
        ticket,
        text,
        source_message_id: o.message_id.clone(),
        requester: o.requester.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if o.dry_run {
        print!("{}", runtime.block_on(connector.dry_run(&input))?);
        return Ok(ExitCode::SUCCESS);
    }
    let policy = RetryPolicy {
        timeout: Duration::from_secs(o.timeout_secs.max(1)),
        ..RetryPolicy::default()
    };
    let outbox = Outbox::new(o.outbox.clone().unwrap_or_else(Outbox::default_path));
    let client = reqwest::Client::builder()
        .user_agent(concat!("triage/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the HTTP client")?;
    let pushed = runtime.block_on(async {
        tokio::select! {
            r = triage_connectors::push(&connector, &input, &outbox, &client, &policy) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!(
                "interrupted; the outbox {} records the attempt and a re-run searches before posting", outbox.path().display()
            )),
        }
    })?;
    println!("{}", serde_json::to_string(&pushed)?);
    Ok(ExitCode::SUCCESS)
}
