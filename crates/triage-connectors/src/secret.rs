//! Credentials that cannot leak through `Debug`, `Display` or logs.

use std::fmt;

use crate::ConnectorError;

/// A credential. Its `Debug` and `Display` print `<redacted>`; the value is only reachable
/// through [`Secret::expose`], which the HTTP layer calls when it builds a header that is
/// then marked sensitive.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Reads a secret from an environment variable; an unset or empty variable is an error
    /// naming it.
    pub fn from_env(var: &str) -> Result<Self, ConnectorError> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_owned())),
            _ => Err(ConnectorError::MissingEnv(var.to_owned())),
        }
    }

    /// [`Secret::from_env`] for a request about to be sent; for a dry run (printed with the
    /// value redacted) a missing variable yields a placeholder instead of an error.
    pub fn for_request(var: &str, dry_run: bool) -> Result<Self, ConnectorError> {
        match Secret::from_env(var) {
            Err(_) if dry_run => Ok(Secret::new("dry-run")),
            other => other,
        }
    }

    /// The value, for building an authentication header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
