//! `triage push`: send a ticket to Jira, JSM, Zoho Desk or ServiceDesk Plus; settle the
//! outbox (`--reconcile`) or compact it (`--compact`). Also the [`Pusher`] that
//! `triage infer --push` (one incident or a batch) uses.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use triage_connectors::{Connector, Outbox, PushInput, Pushed, RetryPolicy, Session, Vendor};
use triage_taxonomy::{Ticket, Validator};

use crate::Cli;

/// Highest `--timeout-secs` and `--search-window-secs`, a day (each is added to the clock).
const MAX_WAIT_SECS: u64 = 86_400;

/// Options shared by `triage push` and `triage infer --push`.
#[derive(Args, Clone)]
pub struct PushOptions {
    /// Print the exact HTTP request (credentials redacted) instead of sending it.
    #[arg(long)]
    pub dry_run: bool,
    /// Mapping file (default: $TRIAGE_<VENDOR>_MAPPING, else `[connectors] <vendor>` in the
    /// user config file, else the built-in configs/connectors/<vendor>.toml).
    #[arg(long, value_name = "FILE")]
    pub mapping: Option<PathBuf>,
    /// Id of the source message (e-mail Message-ID); part of the external id.
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,
    /// Requester: e-mail address (Zoho contact, SDP requester; JSM looks up its accountId)
    /// or, for JSM, an Atlassian accountId.
    #[arg(long, value_name = "EMAIL|ACCOUNT_ID")]
    pub requester: Option<String>,
    /// Outbox file (default: $XDG_STATE_HOME/triage/outbox.jsonl).
    #[arg(long, value_name = "FILE")]
    pub outbox: Option<PathBuf>,
    /// Per-request timeout in seconds; 1 to 86,400.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_WAIT_SECS))]
    pub timeout_secs: u64,
    /// After a create with an unknown outcome (timeout, 5xx, 503), keep searching for the
    /// ticket this many seconds before posting again (search indexes lag behind writes); 0 to
    /// 86,400.
    #[arg(long, default_value_t = 60, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_SECS))]
    pub search_window_secs: u64,
    /// When that search finds nothing, stop and leave the outbox entry `unknown` (settle it
    /// later with `triage push --reconcile`) instead of posting again.
    #[arg(long)]
    pub no_repost: bool,
}

impl PushOptions {
    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            timeout: Duration::from_secs(self.timeout_secs),
            search_window: Duration::from_secs(self.search_window_secs),
            repost: !self.no_repost,
            ..RetryPolicy::default()
        }
    }

    fn outbox(&self) -> Outbox {
        Outbox::new(self.outbox.clone().unwrap_or_else(Outbox::default_path))
    }
}

/// `triage push [VENDOR]`.
#[derive(Args)]
pub struct PushArgs {
    /// jira, jsm, zoho or sdp (optional with --reconcile, which then covers every vendor in
    /// the outbox, and with --compact).
    #[arg(required_unless_present_any = ["reconcile", "compact"])]
    vendor: Option<Vendor>,
    /// File with the original incident text (put in the description, and the basis of the
    /// external id). Default: the `text` key of the input, if any.
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// Settle outbox entries that a push left `pending` or `unknown` by searching the vendor
    /// for their external id (never posts), and check tickets posted again after such an
    /// attempt for a duplicate. One JSON line per entry; exit 3 when something is left open
    /// or a duplicate was found.
    #[arg(long, conflicts_with_all = ["compact", "text_file", "dry_run"])]
    reconcile: bool,
    /// Rewrite the outbox keeping only the latest state of each incident.
    #[arg(long, conflicts_with_all = ["text_file", "dry_run"])]
    compact: bool,
    #[command(flatten)]
    options: PushOptions,
}

/// What one push produced.
pub enum Outcome {
    /// The vendor ticket.
    Pushed(Pushed),
    /// The request a `--dry-run` would send (credentials redacted).
    DryRun(String),
}

impl Outcome {
    /// `{"id", "key", "url", "external_id", "via"}` or `{"dry_run": "<request>"}`.
    pub fn to_json(&self) -> Value {
        match self {
            Outcome::Pushed(p) => serde_json::to_value(p).unwrap_or(Value::Null),
            Outcome::DryRun(r) => json!({ "dry_run": r }),
        }
    }
}

/// A configured connector with its session (HTTP client, retry policy, token and lookup
/// caches) and outbox: built once per command, used for every ticket.
pub struct Pusher {
    runtime: tokio::runtime::Runtime,
    connector: Box<dyn Connector>,
    session: Session,
    outbox: Outbox,
    dry_run: bool,
    requester: Option<String>,
    message_id: Option<String>,
}

impl Pusher {
    /// Loads the mapping and prepares the session; OAuth tokens and lookups are cached in
    /// `<cache dir>/connectors/` (files readable by the owner only).
    pub fn new(cli: &Cli, vendor: Vendor, o: &PushOptions) -> anyhow::Result<Self> {
        let connector = crate::settings::Settings::load()?.connector(vendor, o.mapping.as_deref())?;
        let client = Session::client_builder()
            .user_agent(concat!("triage/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        let session = Session::new(client, o.policy())
            .with_cache_dir(crate::model_cmd::cache_dir(cli).join("connectors"));
        let mut p = Pusher::from_parts(connector, session, o.outbox(), o.dry_run)?;
        p.requester = o.requester.clone();
        p.message_id = o.message_id.clone();
        Ok(p)
    }

    /// A pusher from ready parts.
    pub fn from_parts(
        connector: Box<dyn Connector>,
        session: Session,
        outbox: Outbox,
        dry_run: bool,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        Ok(Pusher {
            runtime,
            connector,
            session,
            outbox,
            dry_run,
            requester: None,
            message_id: None,
        })
    }

    /// The input for `ticket`: the requester of `--requester`, and as source message id
    /// `--message-id`, `id` (a batch row's), or both joined with `/`.
    pub fn input(&self, ticket: Ticket, text: String, id: Option<&str>) -> PushInput {
        let source_message_id = match (self.message_id.as_deref(), id) {
            (Some(m), Some(id)) => Some(format!("{m}/{id}")),
            (m, id) => m.or(id).map(str::to_owned),
        };
        PushInput {
            ticket,
            text,
            source_message_id,
            requester: self.requester.clone(),
        }
    }

    /// Pushes one ticket (or renders the dry run). With `interruptible`, Ctrl-C stops the
    /// wait (the outbox records the attempt; a re-run searches before posting).
    pub fn push(&self, input: &PushInput, interruptible: bool) -> anyhow::Result<Outcome> {
        let c = &*self.connector;
        if self.dry_run {
            let rendered = self.runtime.block_on(triage_connectors::dry_run(c, input))?;
            return Ok(Outcome::DryRun(rendered));
        }
        let push = triage_connectors::push(c, input, &self.outbox, &self.session);
        let pushed = self.runtime.block_on(async {
            if !interruptible {
                return push.await.map_err(anyhow::Error::from);
            }
            tokio::select! {
                r = push => r.map_err(anyhow::Error::from),
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!(
                    "interrupted; the outbox {} records the attempt and a re-run searches before posting",
                    self.outbox.path().display()
                )),
            }
        })?;
        Ok(Outcome::Pushed(pushed))
    }
}

/// Reads a ticket (or `{"ticket": ..., "text": ...}`) from stdin and pushes it; or
/// reconciles / compacts the outbox.
pub fn run(cli: &Cli, args: &PushArgs) -> anyhow::Result<ExitCode> {
    if args.compact {
        let c = args.options.outbox().compact()?;
        crate::print_line(&serde_json::to_string(&c)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.reconcile {
        return reconcile(cli, args);
    }
    let Some(vendor) = args.vendor else {
        bail!("name the ITSM: triage push jira|jsm|zoho|sdp");
    };
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
    let pusher = Pusher::new(cli, vendor, &args.options)?;
    match pusher.push(&pusher.input(ticket, text, None), true)? {
        Outcome::DryRun(r) => crate::print_line(r.to_string().trim_end_matches('\n'))?,
        Outcome::Pushed(p) => crate::print_line(&serde_json::to_string(&p)?)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `triage push --reconcile [VENDOR]`.
fn reconcile(cli: &Cli, args: &PushArgs) -> anyhow::Result<ExitCode> {
    let o = &args.options;
    let outbox = o.outbox();
    let vendors: Vec<Vendor> = match args.vendor {
        Some(v) => vec![v],
        None => {
            if o.mapping.is_some() {
                bail!(
                    "--mapping applies to one ITSM: name it, e.g. `triage push jira --reconcile --mapping F`"
                );
            }
            let open = outbox.latest_all(None)?;
            Vendor::ALL
                .into_iter()
                .filter(|v| open.iter().any(|e| e.vendor == v.as_str()))
                .collect()
        }
    };
    let (mut checked, mut open, mut duplicates) = (0usize, 0usize, 0usize);
    for vendor in vendors {
        let pusher = Pusher::new(cli, vendor, o)?;
        let results = pusher.runtime.block_on(triage_connectors::reconcile(
            &*pusher.connector,
            &outbox,
            &pusher.session,
        ))?;
        for r in results {
            checked += 1;
            open += usize::from(r.after.unsettled() || r.note.is_some());
            duplicates += usize::from(!r.duplicates.is_empty());
            crate::print_line(&serde_json::to_string(&r)?)?;
        }
    }
    eprintln!(
        "{checked} outbox entries checked: {open} still open, {duplicates} with duplicates (outbox {})",
        outbox.path().display()
    );
    Ok(if open == 0 && duplicates == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// The one document `triage infer --push` prints: the ticket and the push's result (or its
/// error).
pub fn combined(ticket: &Ticket, push: Result<&Outcome, &anyhow::Error>) -> Value {
    match push {
        Ok(o) => json!({ "ticket": ticket, "push": o.to_json() }),
        Err(e) => json!({ "ticket": ticket, "push_error": format!("{e:#}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use triage_taxonomy::Taxonomy;

    #[test]
    fn infer_push_prints_one_document_with_ticket_and_result() {
        let v = Validator::new(&Taxonomy::builtin_default());
        let ticket = v
            .parse_str(r#"{"summary":"VPN drops","category":"Network","subcategory":"VPN","priority":"High","assignment_group":"Network Operations","request_type":"Incident"}"#)
            .unwrap();
        let mut p = Pushed::new("10042".into(), Some("IT-42".into()), None);
        p.external_id = "triage-0123456789abcdef".into();
        let doc = combined(&ticket, Ok(&Outcome::Pushed(p)));
        let line = serde_json::to_string(&doc).unwrap();
        assert!(!line.contains('\n'));
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["ticket"]["category"], "Network");
        assert_eq!(back["push"]["key"], "IT-42");
        assert!(
            v.parse(&back["ticket"]).is_ok(),
            "the ticket stays a valid ticket"
        );
        let dry = combined(&ticket, Ok(&Outcome::DryRun("POST x HTTP/1.1\n".into())));
        assert_eq!(dry["push"]["dry_run"], "POST x HTTP/1.1\n");
        let err = anyhow::anyhow!("jira answered HTTP 400: bad");
        let failed = combined(&ticket, Err(&err));
        assert_eq!(failed["push_error"], "jira answered HTTP 400: bad");
        assert!(failed.get("push").is_none());
    }
}
