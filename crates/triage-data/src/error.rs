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
    /// Invalid options (ratios, mappings, counts).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
