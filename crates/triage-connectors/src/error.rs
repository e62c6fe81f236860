use std::path::PathBuf;

/// Connector failures. Vendor messages are carried verbatim; secrets never are.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A mapping file is missing, malformed or inconsistent with the taxonomy.
    #[error("{path}: {message}")]
    Mapping {
        /// The mapping file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// A required environment variable (credential or setting) is not set.
    #[error("environment variable {0} is not set (credentials are read from the environment only)")]
    MissingEnv(String),
    /// The vendor refused the request (4xx other than 429); never retried.
    #[error("{vendor} answered HTTP {status}: {message}")]
    Vendor {
        /// Vendor name.
        vendor: &'static str,
        /// HTTP status.
        status: u16,
        /// The vendor's own error text(s), verbatim.
        message: String,
    },
    /// The vendor kept answering 429/503 (or 5xx) beyond the retry budget.
    #[error("{vendor}: gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Vendor name.
        vendor: &'static str,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The vendor could not be reached at all (DNS, connection refused, TLS).
    #[error("{vendor} is unreachable at {url}: {message}")]
    Unreachable {
        /// Vendor name.
        vendor: &'static str,
        /// The URL tried.
        url: String,
        /// Transport error.
        message: String,
    },
    /// The vendor answered 2xx with a body we cannot interpret.
    #[error("{vendor}: unexpected response: {message}")]
    BadResponse {
        /// Vendor name.
        vendor: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The local outbox could not be read or written.
    #[error("outbox {path}: {message}")]
    Outbox {
        /// The outbox file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}
