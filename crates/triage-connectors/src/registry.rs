//! Loading a connector by vendor: the one place that knows every vendor module.

use std::path::{Path, PathBuf};

use crate::connector::Connector;
use crate::jira::{Jira, Jsm};
use crate::sdp::Sdp;
use crate::types::Vendor;
use crate::zoho::Zoho;
use crate::ConnectorError;

/// The default mapping of a vendor: `configs/connectors/<vendor>.toml`.
pub fn default_mapping_path(vendor: Vendor) -> PathBuf {
    PathBuf::from(format!("configs/connectors/{vendor}.toml"))
}

/// Loads `path`, or [`default_mapping_path`] when `None`.
pub fn load(vendor: Vendor, path: Option<&Path>) -> Result<Box<dyn Connector>, ConnectorError> {
    let path = path
        .map(Path::to_owned)
        .unwrap_or_else(|| default_mapping_path(vendor));
    let text = std::fs::read_to_string(&path).map_err(|e| ConnectorError::Mapping {
        path: path.clone(),
        line: None,
        key: None,
        problem: format!("cannot read the mapping ({e})"),
        fix: "run from the repository root or pass --mapping FILE".into(),
    })?;
    from_toml_str(vendor, &text, &path)
}

/// Parses a mapping; `path` is named in errors (it need not exist).
pub fn from_toml_str(vendor: Vendor, text: &str, path: &Path) -> Result<Box<dyn Connector>, ConnectorError> {
    Ok(match vendor {
        Vendor::Jira => Box::new(Jira::from_toml(text, path)?),
        Vendor::Jsm => Box::new(Jsm::from_toml(text, path)?),
        Vendor::Zoho => Box::new(Zoho::from_toml(text, path)?),
        Vendor::Sdp => Box::new(Sdp::from_toml(text, path)?),
    })
}
