//! `triage bench`: measurements on this machine, written into `docs/benchmarks.md` (one
//! section per benchmark) and a JSON twin per section — never a timed test.
//!
//! * [`infer`]: inference speed, three engines in the same run (the default);
//! * [`train`]: training steps, tokens/s and peak RSS;
//! * [`serve`]: the HTTP service under a bounded loopback load;
//! * [`common`]: what they share (incidents file, machine line, report sections).
//!
//! Dependencies run one way: this module dispatches to the benchmarks, which use only
//! [`common`].

pub mod common;
pub mod infer;
pub mod serve;
pub mod train;

use clap::Args;

use crate::Cli;

/// Options of `triage bench`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// `train` or `serve`: another benchmark instead of inference.
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    infer: infer::InferBenchArgs,
}

/// Benchmarks other than inference.
#[derive(clap::Subcommand)]
enum BenchWhat {
    /// Training speed and peak RSS: the configured path against the first release's, same run.
    Train(train::BenchTrainArgs),
    /// The HTTP service under a bounded loopback load, against one client.
    Serve(serve::BenchServeArgs),
}

/// Runs `triage bench [train|serve]`.
pub fn run(cli: &Cli, args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    match &args.what {
        Some(BenchWhat::Train(t)) => train::run(cli, t),
        Some(BenchWhat::Serve(t)) => serve::run(cli, t),
        None => infer::run(cli, &args.infer),
    }
}
