//! `triage`: turn free-text IT incidents into strict, schema-valid JSON tickets.
//!
//! A thin command-line layer over the library crates: `triage-taxonomy` (taxonomy, schema,
//! validation), `triage-registry` (model download and cache), `triage-llm` (GGUF,
//! tokenizer, chat template, Qwen2), `triage-infer` (prompts, grammar, decoding) and
//! `triage-data` (datasets), `triage-train` (QLoRA), `triage-eval` (reports),
//! `triage-connectors` (ITSM payloads and clients) and `triage-serve` (HTTP service). Results go to stdout, logs and progress to stderr.

mod adapter_cmd;
mod alloc;
mod batch;
mod bench;
mod bench_serve;
mod bench_train;
mod data_cmd;
mod eval_cmd;
mod infer_cmd;
mod model_cmd;
mod push_cmd;
mod serve_cmd;
mod taxonomy_cmd;
mod train_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Validate a ticket (JSON from stdin or FILE); exit 1 and list every violation if invalid.
    Validate {
        /// Ticket file; `-` or absent reads stdin.
        file: Option<PathBuf>,
    },
    /// Check a taxonomy file and summarise it.
    Taxonomy {
        /// Taxonomy file to check (default: --taxonomy, else the built-in one).
        file: Option<PathBuf>,
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

fn main() -> ExitCode {
    alloc::tune();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match &cli.command {
        Command::Infer(args) => infer_cmd::run(&cli, args),
        Command::Bench(args) => bench::run(&cli, args),
        Command::Schema => taxonomy_cmd::schema(&cli),
        Command::Validate { file } => taxonomy_cmd::validate(&cli, file.as_deref()),
        Command::Taxonomy { file } => taxonomy_cmd::check(&cli, file.as_deref()),
        Command::Model(cmd) => model_cmd::run(&cli, cmd),
        Command::Data(cmd) => data_cmd::run(&cli, cmd),
        Command::Push(args) => push_cmd::run(&cli, args),
        Command::Train(args) => train_cmd::run(&cli, args),
        Command::Eval(args) => eval_cmd::run(&cli, args),
        Command::Adapter(cmd) => adapter_cmd::run(&cli, cmd),
        Command::Serve(args) => serve_cmd::run(&cli, args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
