//! Built-in defaults and where to override them, so that an installed binary
//! (`cargo install --path crates/triage`) works from any folder.
//!
//! Like the taxonomy (`configs/taxonomy/default.toml`) and the prompts, the files that the
//! commands used to read from the current folder are built into the binary:
//!
//! | setting | built in | flag | env var | user config key |
//! |---|---|---|---|---|
//! | training configuration of `train` and `serve` | `configs/train.toml` | `train --config`, `serve --train-config` | `TRIAGE_TRAIN_CONFIG` | `train_config` |
//! | ITSM mapping of `push` | `configs/connectors/<vendor>.toml` | `--mapping` | `TRIAGE_<VENDOR>_MAPPING` | `[connectors] <vendor>` |
//! | seed material of `data synth` | `data/synth/default/` | `--seeds` | `TRIAGE_SYNTH_SEEDS` | `synth_seeds` |
//!
//! The first one given wins, in that order: flag, environment variable, user config file,
//! built-in default. The user config file is `$TRIAGE_CONFIG`, else
//! `$XDG_CONFIG_HOME/triage/config.toml`, else `~/.config/triage/config.toml`; relative paths
//! in it are relative to the file's folder. `triage config` prints what is in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use triage_connectors::{Connector, Vendor};
use triage_data::synth::Seeds;
use triage_taxonomy::Taxonomy;
use triage_train::trainer::TrainConfig;

/// `configs/train.toml` as it was when the binary was built.
pub const BUILTIN_TRAIN_TOML: &str = include_str!("../../../configs/train.toml");

/// `configs/connectors/<vendor>.toml` as they were when the binary was built.
const BUILTIN_MAPPINGS: [(Vendor, &str); 4] = [
    (
        Vendor::Jira,
        include_str!("../../../configs/connectors/jira.toml"),
    ),
    (Vendor::Jsm, include_str!("../../../configs/connectors/jsm.toml")),
    (
        Vendor::Zoho,
        include_str!("../../../configs/connectors/zoho.toml"),
    ),
    (Vendor::Sdp, include_str!("../../../configs/connectors/sdp.toml")),
];

/// The environment variable naming the user config file.
pub const CONFIG_ENV: &str = "TRIAGE_CONFIG";

/// The user config file (`config.toml`). Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Training configuration of `triage train` and `triage serve` (TOML, keys of
    /// `configs/train.toml`).
    pub train_config: Option<PathBuf>,
    /// Folder holding one seed folder per taxonomy name (`<synth_seeds>/<taxonomy>/`).
    pub synth_seeds: Option<PathBuf>,
    /// ITSM mapping per vendor (`jira`, `jsm`, `zoho`, `sdp`).
    #[serde(default)]
    pub connectors: BTreeMap<String, PathBuf>,
}

/// Where a setting's value comes from (printed by `triage config` and in errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag, or its environment variable (clap merges them).
    Given(PathBuf),
    /// An environment variable read here.
    Env(String, PathBuf),
    /// The user config file, key and value.
    File(PathBuf, &'static str, PathBuf),
    /// Built into the binary (the repository file it was built from).
    BuiltIn(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Given(p) => write!(f, "{}", p.display()),
            Origin::Env(var, p) => write!(f, "{} (from ${var})", p.display()),
            Origin::File(file, key, p) => write!(f, "{} (`{key}` in {})", p.display(), file.display()),
            Origin::BuiltIn(src) => write!(f, "built-in {src}"),
        }
    }
}

/// The user config file in force: its path and content (empty when there is none).
#[derive(Debug, Default)]
pub struct Settings {
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// Its content.
    pub config: UserConfig,
}

/// The user config file's path: `$TRIAGE_CONFIG`, else `$XDG_CONFIG_HOME/triage/config.toml`,
/// else `$HOME/.config/triage/config.toml`.
pub fn user_config_path() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var(CONFIG_ENV) {
        return Some(p);
    }
    let base = var("XDG_CONFIG_HOME").or_else(|| var("HOME").map(|h| h.join(".config")))?;
    Some(base.join("triage").join("config.toml"))
}

impl Settings {
    /// Reads the user config file. A missing default file is no error; a missing
    /// `$TRIAGE_CONFIG`, an unreadable file, unknown keys or bad values are.
    pub fn load() -> anyhow::Result<Self> {
        let Some(path) = user_config_path() else {
            return Ok(Settings::default());
        };
        let explicit = std::env::var_os(CONFIG_ENV).is_some_and(|v| !v.is_empty());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Settings::default());
            }
            Err(e) => bail!(
                "cannot read the user config file {} (${CONFIG_ENV}): {e}",
                path.display()
            ),
        };
        Self::parse(&text, &path)
    }

    /// Parses a user config file's `text`; `path` is named in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let mut config: UserConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            anyhow::anyhow!(
                "{}{line}: {} (keys: train_config, synth_seeds, [connectors] jira/jsm/zoho/sdp)",
                path.display(),
                e.message()
            )
        })?;
        for vendor in config.connectors.keys() {
            if vendor.parse::<Vendor>().is_err() {
                bail!(
                    "{}: [connectors] {vendor:?}: not an ITSM; use jira, jsm, zoho or sdp",
                    path.display()
                );
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        config.train_config.as_mut().map(anchor);
        config.synth_seeds.as_mut().map(anchor);
        config.connectors.values_mut().for_each(anchor);
        Ok(Settings {
            file: Some(path.to_owned()),
            config,
        })
    }

    fn origin_in_file(&self, key: &'static str, value: &Option<PathBuf>) -> Option<Origin> {
        let file = self.file.clone()?;
        value.clone().map(|v| Origin::File(file, key, v))
    }

    /// Where the training configuration of `train` and `serve` comes from (`given`:
    /// `train --config`, `serve --train-config` or `TRIAGE_TRAIN_CONFIG`).
    pub fn train_config_origin(&self, given: Option<&Path>) -> Origin {
        given
            .map(|p| Origin::Given(p.to_owned()))
            .or_else(|| self.origin_in_file("train_config", &self.config.train_config))
            .unwrap_or(Origin::BuiltIn("configs/train.toml"))
    }

    /// The training configuration of `train` and `serve`, and where it comes from.
    pub fn train_config(&self, given: Option<&Path>) -> anyhow::Result<(TrainConfig, Origin)> {
        let origin = self.train_config_origin(given);
        let config = match &origin {
            Origin::Given(p) | Origin::Env(_, p) | Origin::File(_, _, p) => crate::train_cmd::read_config(p)
                .with_context(|| format!("training configuration {origin}"))?,
            Origin::BuiltIn(_) => {
                toml::from_str(BUILTIN_TRAIN_TOML).context("the built-in configs/train.toml")?
            }
        };
        Ok((config, origin))
    }

    /// Where the mapping of `vendor` comes from (`given`: `--mapping`).
    pub fn mapping_origin(&self, vendor: Vendor, given: Option<&Path>) -> Origin {
        let env = format!("TRIAGE_{}_MAPPING", vendor.as_str().to_uppercase());
        given
            .map(|p| Origin::Given(p.to_owned()))
            .or_else(|| {
                std::env::var_os(&env)
                    .filter(|v| !v.is_empty())
                    .map(|v| Origin::Env(env.clone(), PathBuf::from(v)))
            })
            .or_else(|| {
                let file = self.file.clone()?;
                let p = self.config.connectors.get(vendor.as_str())?.clone();
                Some(Origin::File(file, "connectors", p))
            })
            .unwrap_or(Origin::BuiltIn(builtin_mapping_name(vendor)))
    }

    /// The connector of `vendor` with its mapping (`given`: `--mapping`).
    pub fn connector(&self, vendor: Vendor, given: Option<&Path>) -> anyhow::Result<Box<dyn Connector>> {
        Ok(match self.mapping_origin(vendor, given) {
            Origin::Given(p) | Origin::Env(_, p) | Origin::File(_, _, p) => {
                triage_connectors::load(vendor, Some(&p))?
            }
            Origin::BuiltIn(name) => {
                let text = BUILTIN_MAPPINGS
                    .iter()
                    .find(|(v, _)| *v == vendor)
                    .map(|(_, t)| *t)
                    .expect("every vendor has a built-in mapping");
                triage_connectors::from_toml_str(vendor, text, Path::new(&format!("{name} (built in)")))?
            }
        })
    }

    /// Where the seed material of `taxonomy` comes from (`given`: `--seeds` or
    /// `TRIAGE_SYNTH_SEEDS`); `None` when nothing provides it.
    pub fn seeds_origin(&self, taxonomy: &Taxonomy, given: Option<&Path>) -> Option<Origin> {
        if let Some(p) = given {
            return Some(Origin::Given(p.to_owned()));
        }
        if let (Some(file), Some(root)) = (&self.file, &self.config.synth_seeds) {
            let dir = root.join(&taxonomy.name);
            if dir.exists() {
                return Some(Origin::File(file.clone(), "synth_seeds", dir));
            }
        }
        triage_data::synth::SeedFiles::builtin(&taxonomy.name).map(|_| Origin::BuiltIn("data/synth/default"))
    }

    /// The seed material of `taxonomy`, checked, and where it comes from.
    pub fn seeds(&self, taxonomy: &Taxonomy, given: Option<&Path>) -> anyhow::Result<(Seeds, Origin)> {
        let Some(origin) = self.seeds_origin(taxonomy, given) else {
            bail!(
                "no seed material for taxonomy {:?}: pass --seeds DIR (or set TRIAGE_SYNTH_SEEDS, or `synth_seeds` in {}); only the default taxonomy's is built in (data/synth/FORMAT.md describes the files)",
                taxonomy.name,
                user_config_path().map_or("the user config file".into(), |p| p.display().to_string())
            );
        };
        let seeds = match &origin {
            Origin::Given(p) | Origin::Env(_, p) | Origin::File(_, _, p) => Seeds::load(p, taxonomy),
            Origin::BuiltIn(_) => Seeds::builtin(taxonomy).expect("checked above"),
        }
        .with_context(|| {
            format!(
                "loading the seed material for taxonomy {:?} ({origin})",
                taxonomy.name
            )
        })?;
        Ok((seeds, origin))
    }
}

fn builtin_mapping_name(vendor: Vendor) -> &'static str {
    match vendor {
        Vendor::Jira => "configs/connectors/jira.toml",
        Vendor::Jsm => "configs/connectors/jsm.toml",
        Vendor::Zoho => "configs/connectors/zoho.toml",
        Vendor::Sdp => "configs/connectors/sdp.toml",
    }
}

/// `triage config`: the user config file and where each setting comes from.
pub fn show(json: bool) -> anyhow::Result<std::process::ExitCode> {
    let settings = Settings::load()?;
    let taxonomy = Taxonomy::builtin_default();
    let train = settings.train_config_origin(
        std::env::var_os("TRIAGE_TRAIN_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .as_deref(),
    );
    let seeds = settings.seeds_origin(
        &taxonomy,
        std::env::var_os("TRIAGE_SYNTH_SEEDS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .as_deref(),
    );
    let mappings: Vec<(Vendor, Origin)> = Vendor::ALL
        .into_iter()
        .map(|v| (v, settings.mapping_origin(v, None)))
        .collect();
    let file = user_config_path();
    let file_state = match (&file, &settings.file) {
        (Some(_), Some(_)) => "read",
        (Some(_), None) => "absent",
        (None, _) => "no location ($HOME unset)",
    };
    if json {
        let v = serde_json::json!({
            "config_file": file.as_ref().map(|p| p.display().to_string()),
            "config_file_state": file_state,
            "train_config": train.to_string(),
            "synth_seeds": seeds.as_ref().map(|o| o.to_string()),
            "connectors": mappings.iter().map(|(v, o)| (v.as_str().to_owned(), serde_json::Value::String(o.to_string()))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "config file        {} ({file_state})",
            file.as_ref().map_or("-".into(), |p| p.display().to_string())
        );
        println!("train_config       {train}");
        println!(
            "synth_seeds        {}",
            seeds.map_or("none for the default taxonomy".into(), |o| o.to_string())
        );
        for (v, o) in &mappings {
            println!("connectors.{:<7} {o}", v.as_str());
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_defaults_parse() {
        let settings = Settings::default();
        let (config, origin) = settings.train_config(None).unwrap();
        config.check().unwrap();
        assert_eq!(origin, Origin::BuiltIn("configs/train.toml"));
        for v in Vendor::ALL {
            if std::env::var_os(format!("TRIAGE_{}_MAPPING", v.as_str().to_uppercase())).is_none() {
                settings.connector(v, None).unwrap();
            }
        }
        let (seeds, _) = settings.seeds(&Taxonomy::builtin_default(), None).unwrap();
        assert!(seeds.scenario_count() > 100);
    }

    #[test]
    fn the_built_in_training_configuration_is_the_repository_file() {
        let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/train.toml"))
            .unwrap();
        assert_eq!(BUILTIN_TRAIN_TOML, file);
    }

    #[test]
    fn user_config_file_paths_are_relative_to_it_and_unknown_keys_are_errors() {
        let s = Settings::parse(
            "train_config = \"t.toml\"\n[connectors]\njira = \"/etc/j.toml\"\n",
            Path::new("/home/u/.config/triage/config.toml"),
        )
        .unwrap();
        assert_eq!(
            s.train_config_origin(None),
            Origin::File(
                PathBuf::from("/home/u/.config/triage/config.toml"),
                "train_config",
                PathBuf::from("/home/u/.config/triage/t.toml")
            )
        );
        assert_eq!(
            s.train_config_origin(Some(Path::new("x.toml"))),
            Origin::Given(PathBuf::from("x.toml")),
            "a flag wins over the file"
        );
        let err = Settings::parse("\ntrain_confg = 1\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.toml:2: ") && err.contains("train_confg"),
            "{err}"
        );
        let err = Settings::parse("[connectors]\nservicenow = \"x\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("servicenow") && err.contains("jira"), "{err}");
    }
}
