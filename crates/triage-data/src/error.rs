use std::path::PathBuf;

/// Everything that can go wrong while reading, importing, generating or splitting data. Each
/// variant names the file (and line where there is one) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line or record of an input file is malformed.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong and what to do.
        message: String,
    },
    /// The seed material of the synthetic generator is inconsistent.
    #[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Seeds {
        /// The seed file.
        path: PathBuf,
        /// 1-based line number, where known.
        line: Option<u64>,
        /// What is wrong and what to do.
        message: String,
    },
    /// A line of a canonical JSONL file is not an example.
    #[error("{path}:{line}: {source}")]
    Example {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with the line.
        source: ExampleError,
    },
    /// A `--labels` file is not a usable label map.
    #[error("{path}: {source}")]
    Labels {
        /// The label map file.
        path: PathBuf,
        /// What is wrong with it.
        source: LabelMapError,
    },
    /// Invalid options (ratios, mappings, counts).
    #[error("{0}")]
    Invalid(String),
}

/// An option value that cannot be parsed (`--by`, `--ratios`, `--balance`, a split name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?}: {expected}")]
pub struct ValueError {
    /// What the value is (`split key`, `ratios`, ...).
    pub what: &'static str,
    /// The text given.
    pub value: String,
    /// What is accepted.
    pub expected: &'static str,
}

/// Why one line of a canonical JSONL file is not an [`crate::Example`].
#[derive(Debug, thiserror::Error)]
pub enum ExampleError {
    /// Not JSON, or not the canonical shape (unknown or missing keys, wrong types).
    #[error("not a canonical example: {0} (a line is {{\"id\", \"text\", \"ticket\", \"lang\"?, \"source\"?, \"group\"?, \"split\"?}})")]
    NotCanonical(#[source] serde_json::Error),
    /// `text` is empty or blank.
    #[error("`text` is empty: give the incident text, or drop the line")]
    EmptyText,
    /// The ticket does not validate against the taxonomy.
    #[error("`ticket` does not validate against taxonomy {taxonomy:?}: {violations}; fix the labels, or pass the taxonomy the data was made for (--taxonomy)")]
    Ticket {
        /// The taxonomy's name.
        taxonomy: String,
        /// Every violation, with its JSON pointer.
        violations: triage_taxonomy::Violations,
    },
}

/// Why a label map (`--labels FILE`) was refused.
#[derive(Debug, thiserror::Error)]
pub enum LabelMapError {
    /// Not TOML of the form `[field] "export value" = "taxonomy value"`.
    #[error("not a label map: {0} (expected tables of renames, e.g. [priority] \"P1\" = \"Critical\")")]
    Toml(#[source] toml::de::Error),
    /// A table that is not a field of the taxonomy.
    #[error("[{field}]: not a field of taxonomy {taxonomy:?}; use one of its fields as the table name")]
    UnknownField {
        /// The table name.
        field: String,
        /// The taxonomy's name.
        taxonomy: String,
    },
    /// A rename to a value the field does not have.
    #[error("[{field}] {from:?} = {to:?}: {to:?} is not a value of {field} in taxonomy {taxonomy:?}; rename to one of its values")]
    UnknownValue {
        /// The field.
        field: String,
        /// The export value.
        from: String,
        /// The target value.
        to: String,
        /// The taxonomy's name.
        taxonomy: String,
    },
}

/// Why an imported row was rejected (the `reason` of its reject record).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RowError {
    /// Every text column is empty.
    #[error("text is empty (column {columns})")]
    EmptyText {
        /// The mapped text columns.
        columns: String,
    },
    /// The text is over `--max-text-chars`.
    #[error(
        "text has {chars} characters, more than the limit of {max}; shorten it or raise --max-text-chars"
    )]
    TooLong {
        /// Characters in the text.
        chars: usize,
        /// The limit.
        max: usize,
    },
    /// NUL bytes in the text.
    #[error("text contains NUL bytes (binary data?); remove them or fix the export")]
    Nul,
    /// A mapped label column is empty.
    #[error("{field} is missing (column {column:?} is empty)")]
    MissingLabel {
        /// The taxonomy field.
        field: String,
        /// The column mapped to it.
        column: String,
    },
    /// A label that is not a value of the taxonomy, even ignoring case.
    #[error("{field} {value:?} (column {column:?}) is not a value of taxonomy {taxonomy:?}; map it in a --labels file")]
    UnknownLabel {
        /// The taxonomy field.
        field: String,
        /// The value in the export.
        value: String,
        /// The column.
        column: String,
        /// The taxonomy's name.
        taxonomy: String,
    },
    /// The labels together break a rule of the schema (a subcategory under another category).
    #[error("labels do not validate: {0}")]
    Invalid(String),
    /// The id was already imported.
    #[error("duplicate id {0:?}")]
    DuplicateId(String),
    /// A CSV record the parser could not read.
    #[error("malformed CSV: {0}; check the quoting of this row")]
    MalformedCsv(String),
    /// A CSV row with more or fewer fields than the header.
    #[error("row has {got} fields but the header has {header}; check for an unquoted delimiter")]
    FieldCount {
        /// Fields in the row.
        got: usize,
        /// Fields in the header.
        header: usize,
    },
    /// Bytes that are not UTF-8.
    #[error("{0} is not valid UTF-8; export the file as UTF-8")]
    NotUtf8(&'static str),
    /// A JSONL line that is not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// JSON that is not an object.
    #[error("{0} is not a JSON object; each record must be an object of columns")]
    NotObject(&'static str),
}

/// A text template of the seed material with a broken `{slot}` reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `}` without its `{`.
    #[error("unmatched '}}' in {text:?}")]
    Unmatched {
        /// The template.
        text: String,
    },
    /// A `{` without its `}`.
    #[error("unclosed '{{' in {text:?}")]
    Unclosed {
        /// The template.
        text: String,
    },
    /// A slot that no slots table defines.
    #[error("unknown slot {{{name}}} in {text:?}; define it in slots.toml or the file's [slots]")]
    UnknownSlot {
        /// The slot name.
        name: String,
        /// The template.
        text: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
