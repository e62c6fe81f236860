//! ITSM connectors: turn a triage [`Ticket`] into a ticket in Jira Cloud, Jira Service
//! Management, Zoho Desk or ManageEngine ServiceDesk Plus.
//!
//! Each vendor module has three layers:
//! * a **mapping** (`configs/connectors/<vendor>.toml`): project / service desk / department
//!   ids, request type and priority mappings, and where category, subcategory and assignment
//!   group go (components, labels, custom fields, `udf_fields`);
//! * a **payload builder**: a pure function `ticket + mapping → HTTP request`, unit tested
//!   against the vendor's rules (Jira's OpenAPI spec and ADF schema in the tests);
//! * the vendor's response parsing (created id/key/URL, search hits, error texts).
//!
//! [`push`] runs the same safe flow for every vendor: no vendor supports an idempotency key,
//! so a deterministic [`external_id`] derived from the incident text is written into the
//! ticket (Jira label, Zoho custom field, SDP UDF) and recorded in a local [`Outbox`]; after a
//! timeout or 5xx the vendor is **searched by that id before anything is posted again**;
//! `Retry-After` is honoured on 429/503; other 4xx are never retried and the vendor's error
//! text reaches the user verbatim. Secrets come from the environment only ([`Secret`]) and
//! never appear in logs, errors or dry-run output.
//!
//! [`Ticket`]: triage_taxonomy::Ticket

pub mod adf;
mod error;
mod http;
pub mod jira;
mod outbox;
mod push;
pub mod sdp;
mod secret;
pub mod zoho;

pub use error::ConnectorError;
pub use http::{Body, HttpRequest, RetryPolicy};
pub use outbox::{Outbox, OutboxEntry};
pub use push::{external_id, push, Connector, PushInput, Pushed, Vendor};
pub use secret::Secret;
