//! Taxonomy as data: load an organisation's ticket taxonomy from TOML, derive the ticket JSON
//! Schema from it, and validate tickets against it.
//!
//! ```
//! use triage_taxonomy::{Taxonomy, Validator};
//! let taxonomy = Taxonomy::builtin_default();
//! let validator = Validator::new(&taxonomy);
//! let ticket = validator.parse_str(r#"{"summary":"VPN drops every 10 minutes",
//!   "category":"Network","subcategory":"VPN","priority":"High",
//!   "assignment_group":"Network Operations","request_type":"Incident"}"#).unwrap();
//! assert_eq!(ticket.get("subcategory"), Some("VPN"));
//! ```

mod schema;
mod taxonomy;
mod ticket;

pub use schema::{ticket_schema, ticket_schema_pretty, SCHEMA_DIALECT};
pub use taxonomy::{
    Dependency, EnumValue, Field, SummarySpec, Taxonomy, TaxonomyError, DEFAULT_TAXONOMY_SOURCE,
    DEFAULT_TAXONOMY_TOML, FORMAT_VERSION, SUMMARY_KEY,
};
pub use ticket::{Ticket, Validator, Violation, Violations};
