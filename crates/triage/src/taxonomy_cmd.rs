//! `triage schema`, `triage validate`, `triage taxonomy`.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use triage_taxonomy::{ticket_schema_pretty, Taxonomy, Validator};

use crate::Cli;

/// The taxonomy selected by `--taxonomy` (or the built-in default).
pub fn load_taxonomy(cli: &Cli) -> anyhow::Result<Taxonomy> {
    Ok(match &cli.taxonomy {
        Some(path) => Taxonomy::from_file(path)?,
        None => Taxonomy::builtin_default(),
    })
}

pub fn schema(cli: &Cli) -> anyhow::Result<ExitCode> {
    print!("{}", ticket_schema_pretty(&load_taxonomy(cli)?));
    Ok(ExitCode::SUCCESS)
}

pub fn validate(cli: &Cli, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let taxonomy = load_taxonomy(cli)?;
    let bytes = match file {
        Some(p) if p != Path::new("-") => {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read stdin")?;
            buf
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    if text.trim().is_empty() {
        anyhow::bail!("no ticket given: pipe a JSON ticket to stdin or pass a file");
    }
    let validator = Validator::new(&taxonomy);
    match validator.parse_str(&text) {
        Ok(_) => {
            eprintln!("valid ticket for {taxonomy}");
            Ok(ExitCode::SUCCESS)
        }
        Err(violations) => {
            for v in &violations.0 {
                println!("{v}");
            }
            eprintln!(
                "invalid ticket for {taxonomy}: {} violation(s)",
                violations.0.len()
            );
            Ok(ExitCode::from(1))
        }
    }
}

pub fn check(cli: &Cli, file: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    let taxonomy = match file {
        Some(p) => Taxonomy::from_file(p)?,
        None => load_taxonomy(cli)?,
    };
    if json {
        let mut v = serde_json::to_value(&taxonomy)?;
        v["hash"] = taxonomy.content_hash().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{taxonomy}: ok");
    println!("  hash    {}", taxonomy.content_hash());
    println!("  summary string, 1..={} characters", taxonomy.summary.max_length);
    for f in &taxonomy.fields {
        match &f.dependency {
            None => println!("  {:<16} {} values", f.name, f.values.len()),
            Some(d) => println!(
                "  {:<16} {} values, depends on `{}` ({} groups)",
                f.name,
                f.values.len(),
                d.parent,
                d.allowed.len()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
