//! Loading and checking a taxonomy file (TOML).
//!
//! The file format is documented in `configs/taxonomy/default.toml`. Parsing goes through
//! private "raw" structs that keep byte spans, so every error can name the file, the line and
//! what to fix; the public [`Taxonomy`] is only ever built from a file that passed every check.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

/// The default taxonomy shipped with triage (`configs/taxonomy/default.toml`), embedded so the
/// binary works from any directory.
pub const DEFAULT_TAXONOMY_TOML: &str = include_str!("../../../configs/taxonomy/default.toml");
/// File name reported in errors and metadata for the embedded default taxonomy.
pub const DEFAULT_TAXONOMY_SOURCE: &str = "configs/taxonomy/default.toml";
/// The only taxonomy file format version this build understands.
pub const FORMAT_VERSION: u32 = 1;
/// Longest summary any taxonomy may ask for (Jira allows 255; SDP 250).
pub const MAX_SUMMARY_LIMIT: usize = 250;
/// The reserved key of the free-text summary; no enum field may use it.
pub const SUMMARY_KEY: &str = "summary";

/// Why a taxonomy file was rejected. Every variant names the file; most name the line.
#[derive(Debug, thiserror::Error)]
pub enum TaxonomyError {
    /// The file could not be read.
    #[error("{path}: cannot read taxonomy file: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key, missing key or wrong type.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file (or `<builtin>` name).
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, from the TOML parser.
        message: String,
    },
    /// The file parsed but breaks a taxonomy rule (duplicate value, empty enum, ...).
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file (or `<builtin>` name).
        path: String,
        /// 1-based line of the offending entry.
        line: usize,
        /// What is wrong and how to fix it.
        message: String,
    },
}

// ------------------------------------------------------------------------------------------
// Raw file format
// ------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaxonomy {
    format: Spanned<u32>,
    name: Spanned<String>,
    description: Spanned<String>,
    summary: Option<Spanned<RawSummary>>,
    #[serde(default)]
    fields: Vec<Spanned<RawField>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSummary {
    description: Spanned<String>,
    max_length: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: Spanned<String>,
    description: Spanned<String>,
    child: Option<Spanned<RawChild>>,
    #[serde(default)]
    values: Vec<Spanned<RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChild {
    name: Spanned<String>,
    description: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValue {
    name: Spanned<String>,
    description: Spanned<String>,
    children: Option<Spanned<Vec<Spanned<RawValue>>>>,
}

// ------------------------------------------------------------------------------------------
// Checked model
// ------------------------------------------------------------------------------------------

/// One allowed value of an enum field, with the one-line description shown to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnumValue {
    /// The exact string that appears in tickets (spaces and slashes allowed).
    pub name: String,
    /// One line explaining when to pick this value.
    pub description: String,
}

/// For a dependent field (e.g. `subcategory`): which values are allowed under each value of
/// its parent field (e.g. `category`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dependency {
    /// Name of the parent field.
    pub parent: String,
    /// `(parent value, allowed child values)` in file order; every parent value appears once.
    pub allowed: Vec<(String, Vec<EnumValue>)>,
}

/// An enum field of the ticket (everything except `summary`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Field {
    /// JSON key in the ticket (`[a-z][a-z0-9_]*`).
    pub name: String,
    /// One line explaining the field.
    pub description: String,
    /// All values the field may take, unique, in file order. For a dependent field this is
    /// the union over all parents (a name such as `Other` appears once).
    pub values: Vec<EnumValue>,
    /// Set when the allowed values depend on another field's value.
    pub dependency: Option<Dependency>,
}

impl Field {
    /// The values' names, in order.
    pub fn value_names(&self) -> impl Iterator<Item = &str> {
        self.values.iter().map(|v| v.name.as_str())
    }

    /// Whether `value` is one of the field's values (ignoring any dependency).
    pub fn has_value(&self, value: &str) -> bool {
        self.values.iter().any(|v| v.name == value)
    }

    /// The values allowed when the parent field has `parent_value` (dependent fields only).
    pub fn allowed_under(&self, parent_value: &str) -> Option<&[EnumValue]> {
        let dep = self.dependency.as_ref()?;
        dep.allowed
            .iter()
            .find(|(p, _)| p == parent_value)
            .map(|(_, v)| v.as_slice())
    }
}

/// How the free-text summary is described and bounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummarySpec {
    /// One line explaining what a good summary is.
    pub description: String,
    /// Maximum length in Unicode scalar values (JSON Schema `maxLength` semantics).
    pub max_length: usize,
}

/// A checked taxonomy: the organisation's fields and values. Build it with
/// [`Taxonomy::from_file`], [`Taxonomy::from_toml_str`] or [`Taxonomy::builtin_default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Taxonomy {
    /// Short identifier (e.g. `default`).
    pub name: String,
    /// One line describing the organisation / desk; shown to the model.
    pub description: String,
    /// The summary field.
    pub summary: SummarySpec,
    /// Enum fields in ticket key order (a child directly follows its parent).
    pub fields: Vec<Field>,
    #[serde(skip)]
    source: String,
}

impl Taxonomy {
    /// The taxonomy embedded in the binary (`configs/taxonomy/default.toml`).
    pub fn builtin_default() -> Self {
        Self::from_toml_str(DEFAULT_TAXONOMY_TOML, DEFAULT_TAXONOMY_SOURCE)
            .expect("the embedded default taxonomy is checked by the test suite")
    }

    /// Reads and checks a taxonomy file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TaxonomyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TaxonomyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and checks taxonomy TOML; `source` names the file in errors.
    pub fn from_toml_str(text: &str, source: &str) -> Result<Self, TaxonomyError> {
        let raw: RawTaxonomy = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            TaxonomyError::Parse {
                path: source.to_string(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        Checker { text, source }.check(raw)
    }

    /// Where the taxonomy came from (file path, or the embedded default's name).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Looks up an enum field by its JSON key.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// All ticket keys in order: `summary` first, then the enum fields.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(SUMMARY_KEY).chain(self.fields.iter().map(|f| f.name.as_str()))
    }

    /// A stable hash of the taxonomy's content (names, descriptions, order; not comments or
    /// formatting). Adapters record it so inference can refuse a mismatched taxonomy.
    pub fn content_hash(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("taxonomy serialises");
        let digest = Sha256::digest(&canonical);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Taxonomy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "taxonomy `{}` ({})", self.name, self.source)
    }
}

/// 1-based (line, column) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

struct Checker<'a> {
    text: &'a str,
    source: &'a str,
}

impl Checker<'_> {
    fn err<T>(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> Result<T, TaxonomyError> {
        Err(TaxonomyError::Invalid {
            path: self.source.to_string(),
            line: line_col(self.text, span.start).0,
            message: message.into(),
        })
    }

    /// A one-line, non-empty, trimmed text.
    fn one_line(&self, s: &Spanned<String>, what: &str) -> Result<String, TaxonomyError> {
        let v = s.get_ref();
        if v.trim().is_empty() {
            return self.err(s.span(), format!("{what} is empty: write one line for it"));
        }
        if v.contains(['\n', '\r']) {
            return self.err(s.span(), format!("{what} must be a single line"));
        }
        Ok(v.trim().to_string())
    }

    /// A value name: non-empty, no surrounding whitespace, no control characters.
    fn value_name(&self, s: &Spanned<String>, field: &str) -> Result<String, TaxonomyError> {
        let v = s.get_ref();
        if v.is_empty() {
            return self.err(s.span(), format!("field `{field}`: a value has an empty name"));
        }
        if v.trim() != v {
            return self.err(
                s.span(),
                format!("field `{field}`: value {v:?} has leading or trailing spaces; remove them"),
            );
        }
        if v.chars().any(char::is_control) {
            return self.err(
                s.span(),
                format!("field `{field}`: value {v:?} contains a control character"),
            );
        }
        Ok(v.clone())
    }

    fn field_name(&self, s: &Spanned<String>, seen: &mut HashSet<String>) -> Result<String, TaxonomyError> {
        let v = s.get_ref();
        let valid = v.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && v.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return self.err(
                s.span(),
                format!("field name {v:?} must match [a-z][a-z0-9_]* (it becomes a JSON key)"),
            );
        }
        if v == SUMMARY_KEY {
            return self.err(
                s.span(),
                "field name `summary` is reserved for the free-text summary",
            );
        }
        if !seen.insert(v.clone()) {
            return self.err(s.span(), format!("duplicate field name `{v}`"));
        }
        Ok(v.clone())
    }

    fn values(
        &self,
        field: &str,
        list: &[Spanned<RawValue>],
        list_span: std::ops::Range<usize>,
        allow_children: bool,
    ) -> Result<Vec<EnumValue>, TaxonomyError> {
        if list.is_empty() {
            return self.err(
                list_span,
                format!("field `{field}` has no values: an enum needs at least one"),
            );
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(list.len());
        for v in list {
            let raw = v.get_ref();
            let name = self.value_name(&raw.name, field)?;
            if !seen.insert(name.clone()) {
                return self.err(
                    raw.name.span(),
                    format!("field `{field}`: duplicate value {name:?}"),
                );
            }
            if !allow_children {
                if let Some(c) = &raw.children {
                    return self.err(
                        c.span(),
                        format!("field `{field}`: value {name:?} has `children` but the field declares no `[fields.child]`"),
                    );
                }
            }
            let description = self.one_line(&raw.description, &format!("description of {field} {name:?}"))?;
            out.push(EnumValue { name, description });
        }
        Ok(out)
    }

    fn check(&self, raw: RawTaxonomy) -> Result<Taxonomy, TaxonomyError> {
        if *raw.format.get_ref() != FORMAT_VERSION {
            return self.err(
                raw.format.span(),
                format!(
                    "unsupported taxonomy format {}; this build reads format {FORMAT_VERSION}",
                    raw.format.get_ref()
                ),
            );
        }
        let name = self.one_line(&raw.name, "taxonomy `name`")?;
        let description = self.one_line(&raw.description, "taxonomy `description`")?;
        let summary = match &raw.summary {
            None => SummarySpec {
                description: "One line stating the problem or request.".into(),
                max_length: 160,
            },
            Some(s) => {
                let s = s.get_ref();
                let max_length = match &s.max_length {
                    None => 160,
                    Some(m) => {
                        let v = *m.get_ref();
                        if !(1..=MAX_SUMMARY_LIMIT as i64).contains(&v) {
                            return self.err(
                                m.span(),
                                format!("summary.max_length must be 1..={MAX_SUMMARY_LIMIT}, got {v}"),
                            );
                        }
                        v as usize
                    }
                };
                SummarySpec {
                    description: self.one_line(&s.description, "summary.description")?,
                    max_length,
                }
            }
        };
        if raw.fields.is_empty() {
            return self.err(
                0..0,
                "the taxonomy has no `[[fields]]`: add at least one enum field (e.g. category)",
            );
        }

        let mut names = HashSet::new();
        let mut fields = Vec::new();
        for f in &raw.fields {
            let span = f.span();
            let rf = f.get_ref();
            let fname = self.field_name(&rf.name, &mut names)?;
            let fdesc = self.one_line(&rf.description, &format!("description of field `{fname}`"))?;
            let values = self.values(&fname, &rf.values, span.clone(), rf.child.is_some())?;
            fields.push(Field {
                name: fname.clone(),
                description: fdesc,
                values,
                dependency: None,
            });
            let Some(child) = &rf.child else { continue };
            let child = child.get_ref();
            let cname = self.field_name(&child.name, &mut names)?;
            let cdesc = self.one_line(&child.description, &format!("description of field `{cname}`"))?;
            let mut union: Vec<EnumValue> = Vec::new();
            let mut allowed = Vec::new();
            for v in &rf.values {
                let v = v.get_ref();
                let parent_value = v.name.get_ref().clone();
                let Some(children) = &v.children else {
                    return self.err(
                        v.name.span(),
                        format!("{fname} {parent_value:?} has no `children`: every {fname} needs its list of {cname} values"),
                    );
                };
                let kids = self.values(
                    &format!("{cname} (under {fname} {parent_value:?})"),
                    children.get_ref(),
                    children.span(),
                    false,
                )?;
                for k in &kids {
                    if !union.iter().any(|u| u.name == k.name) {
                        union.push(k.clone());
                    }
                }
                allowed.push((parent_value, kids));
            }
            fields.push(Field {
                name: cname,
                description: cdesc,
                values: union,
                dependency: Some(Dependency {
                    parent: fname,
                    allowed,
                }),
            });
        }
        Ok(Taxonomy {
            name,
            description,
            summary,
            fields,
            source: self.source.to_string(),
        })
    }
}
