//! `triage`: turn free-text IT incidents into strict, schema-valid JSON tickets.
//!
//! A thin command-line layer over the library crates: `triage-taxonomy` (taxonomy, schema,
//! validation), `triage-registry` (model download and cache), `triage-llm` (GGUF,
//! tokenizer, chat template, Qwen2), `triage-infer` (prompts, grammar, decoding) and
//! `triage-data` (datasets), `triage-train` (QLoRA), `triage-eval` (reports),
//! `triage-connectors` (ITSM payloads and clients) and `triage-serve` (HTTP service). Results go to stdout, logs and progress to stderr.
//!
//! Exit status ([`exit`]): 0 success, 1 runtime error, 2 usage error (clap), 3 partial
//! failure of a batch, 130 interrupted. Built-in defaults and their overrides: [`settings`].

mod adapter_cmd;
mod alloc;
mod backend_cmd;
mod batch;
mod bench;
mod data_cmd;
mod eval_cmd;
mod help;
mod infer_cmd;
mod model_cmd;
mod prompt_cmd;
mod push_cmd;
mod serve_cmd;
mod settings;
mod taxonomy_cmd;
mod train_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{FromArgMatches, Parser, Subcommand};

/// Exit statuses of `triage`.
pub mod exit {
    /// A runtime error: a file that cannot be read, a model that fails, an invalid ticket
    /// (`validate`), a model not downloaded (`model path`).
    pub const RUNTIME: u8 = 1;
    /// A usage error: an unknown flag, a missing or malformed argument (reported by clap).
    pub const USAGE: u8 = 2;
    /// A partial failure: some rows of a batch failed, or `push --reconcile` left entries open.
    pub const PARTIAL: u8 = 3;
}

/// A usage error found after parsing (a flag value that contradicts the data), reported the
/// way clap reports its own, with exit status [`exit::USAGE`].
pub fn usage_error(message: impl std::fmt::Display) -> anyhow::Error {
    help::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .into()
}

/// Writes `text` and a newline to stdout. A reader that has gone (`triage infer … | head -c0`)
/// is an error, not a panic: commands that may push keep SIGPIPE ignored, and their result
/// (the ticket was pushed) is on stderr and in the outbox either way.
pub fn print_line(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("cannot write the result to stdout: {e}"))
}

/// Turn free-text IT incidents into strict, schema-valid JSON tickets.
#[derive(Parser)]
#[command(name = "triage", version, about, propagate_version = true)]
struct Cli {
    /// Taxonomy file (TOML). Default: the built-in `configs/taxonomy/default.toml`.
    #[arg(long, global = true, env = "TRIAGE_TAXONOMY", value_name = "FILE")]
    taxonomy: Option<PathBuf>,
    /// Model: a registry name or alias (`triage model list`) or a path to a .gguf file.
    #[arg(long, global = true, env = "TRIAGE_MODEL", value_name = "NAME|PATH")]
    model: Option<String>,
    /// Model registry file. Default: the built-in `configs/models.toml`.
    #[arg(long, global = true, env = "TRIAGE_REGISTRY", value_name = "FILE")]
    registry: Option<PathBuf>,
    /// Cache directory for models. Default: $XDG_CACHE_HOME/triage or ~/.cache/triage.
    #[arg(long, global = true, env = "TRIAGE_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Structure one incident (stdin) into a JSON ticket (stdout).
    Infer(infer_cmd::InferArgs),
    /// Measure inference speed (three engines, same run) and write docs/benchmarks.md.
    Bench(bench::BenchArgs),
    /// Print the ticket JSON Schema generated from the taxonomy.
    Schema,
    /// Print the exact system and user messages (and schema) inference gives the model for
    /// the incident on stdin, for running the same work on another engine.
    Prompt(prompt_cmd::PromptArgs),
    /// Validate a ticket (JSON from stdin or FILE); exit 1 and list every violation if invalid.
    Validate {
        /// Ticket file; `-` or absent reads stdin.
        file: Option<PathBuf>,
    },
    /// Check a taxonomy file and summarise it.
    Taxonomy {
        /// Taxonomy file to check (default: --taxonomy, else the built-in one).
        file: Option<PathBuf>,
        /// Print the whole checked taxonomy as JSON (fields, values, descriptions, hash).
        #[arg(long)]
        json: bool,
    },
    /// Download, locate, verify and inspect models.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Fine-tune a LoRA adapter (QLoRA on the frozen 4-bit base) on canonical examples.
    Train(train_cmd::TrainArgs),
    /// Inspect a trained adapter or merge it into the base model (GGUF).
    #[command(subcommand)]
    Adapter(adapter_cmd::AdapterCommand),
    /// Evaluate: TF-IDF baseline, zero-shot model and adapter side by side, with a report.
    Eval(eval_cmd::EvalArgs),
    /// Run the HTTP service: structure, classify, upload training data, train, activate.
    Serve(serve_cmd::ServeArgs),
    /// Create the ticket in Jira, Jira Service Management, Zoho Desk or ServiceDesk Plus.
    Push(push_cmd::PushArgs),
    /// Build datasets: import exports, generate synthetic tickets, split without leakage.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Show the user config file and where each default comes from (flag, environment,
    /// config file or built in).
    Config {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,triage=info,triage_registry=info",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The error and its causes on one line, each cause once: many error types already write
/// their source into their own message (`{path}: {source}`), which `{:#}` would repeat.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// Commands that only print: they end quietly, as Unix tools do, when stdout is a pipe whose
/// reader has gone (`triage completions bash | head`), instead of panicking. Commands that
/// talk to the network keep SIGPIPE ignored (a closed socket is an error there, not a signal).
fn restore_sigpipe(command: &Command) {
    let prints_only = matches!(
        command,
        Command::Schema
            | Command::Prompt(_)
            | Command::Validate { .. }
            | Command::Taxonomy { .. }
            | Command::Completions { .. }
            | Command::Config { .. }
            | Command::Data(_)
            | Command::Model(
                model_cmd::ModelCommand::List { .. }
                    | model_cmd::ModelCommand::Path { .. }
                    | model_cmd::ModelCommand::Info
                    | model_cmd::ModelCommand::Tokenize { .. }
            )
    );
    #[cfg(unix)]
    if prints_only {
        // SAFETY: called once at start-up, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}

fn main() -> ExitCode {
    alloc::tune();
    let cli = Cli::from_arg_matches(&help::command().get_matches()).unwrap_or_else(|e| e.exit());
    init_logging(cli.verbose);
    restore_sigpipe(&cli.command);
    let result = match &cli.command {
        Command::Infer(args) => infer_cmd::run(&cli, args),
        Command::Bench(args) => bench::run(&cli, args),
        Command::Schema => taxonomy_cmd::schema(&cli),
        Command::Prompt(args) => prompt_cmd::run(&cli, args),
        Command::Validate { file } => taxonomy_cmd::validate(&cli, file.as_deref()),
        Command::Taxonomy { file, json } => taxonomy_cmd::check(&cli, file.as_deref(), *json),
        Command::Model(cmd) => model_cmd::run(&cli, cmd),
        Command::Data(cmd) => data_cmd::run(&cli, cmd),
        Command::Push(args) => push_cmd::run(&cli, args),
        Command::Train(args) => train_cmd::run(&cli, args),
        Command::Eval(args) => eval_cmd::run(&cli, args),
        Command::Adapter(cmd) => adapter_cmd::run(&cli, cmd),
        Command::Serve(args) => serve_cmd::run(&cli, args),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut help::command(), "triage", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { json } => settings::show(*json),
    };
    match result {
        Ok(code) => code,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(usage) => {
                let _ = usage.print();
                ExitCode::from(exit::USAGE)
            }
            Err(e) => {
                eprintln!("error: {}", describe(&e));
                ExitCode::from(exit::RUNTIME)
            }
        },
    }
}
