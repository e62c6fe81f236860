//! ITSM connectors: turn a triage [`Ticket`] into a ticket in Jira Cloud, Jira Service
//! Management, Zoho Desk or ManageEngine ServiceDesk Plus.
//!
//! Each vendor module implements one [`Connector`] trait with three layers:
//! * a **mapping** (`configs/connectors/<vendor>.toml`): project / service desk / department
//!   ids, request type and priority mappings, and where category, subcategory and assignment
//!   group go (components, labels, custom fields, `udf_fields`);
//! * a **payload builder**: a pure function `ticket + mapping → HTTP request`, unit tested
//!   against the vendor's rules (Jira's OpenAPI spec and ADF schema in the tests);
//! * the vendor's response parsing (created id/key/URL, search hits, error texts).
//!
//! Modules, leaves first: [`types`] (vendor, input, result, external id), `error`, `http`
//! (requests as data, the send loop), [`oauth`] (Zoho data centres, token cache), `session`,
//! `connector` (the trait), the vendors ([`jira`], [`zoho`], [`sdp`]), `registry` (load a
//! vendor by name: the only module that knows them all), `outbox` and `push` (the flow).
//!
//! [`push`] runs the same flow for every vendor: no vendor supports an idempotency key, so a
//! deterministic [`external_id`] derived from the incident text is written into the ticket
//! (Jira label, Zoho custom field, SDP UDF) and recorded in a local [`Outbox`]; after a
//! timeout, 5xx or 503 the vendor is **searched by that id over a bounded window before
//! anything is posted again**, and what stays unsettled is recorded for [`reconcile`].
//! `Retry-After` is honoured on 429/503; other 4xx are never retried and the vendor's error
//! text reaches the user verbatim. A [`Session`] (one per process) reuses Zoho OAuth tokens
//! until shortly before they expire. Secrets come from the environment only ([`Secret`]) and
//! never appear in logs, errors or dry-run output.
//!
//! [`Ticket`]: triage_taxonomy::Ticket

pub mod adf;
mod connector;
mod error;
mod http;
pub mod jira;
pub mod oauth;
mod outbox;
mod push;
mod registry;
pub mod sdp;
mod secret;
mod session;
mod store;
pub mod types;
pub mod zoho;

pub use connector::{Auth, BoxFuture, Connector, Lookup};
pub use error::ConnectorError;
pub use http::{Body, HttpRequest, RetryPolicy, MAX_BODY_BYTES, SECRET_FORM_KEYS};
pub use oauth::{Region, TokenCache};
pub use outbox::{Claim, Compacted, Outbox, OutboxEntry, OutboxState};
pub use push::{dry_run, push, reconcile, Reconciled, RECHECK_REPOSTED_SECS};
pub use registry::{default_mapping_path, from_toml_str, load};
pub use secret::Secret;
pub use session::Session;
pub use types::{external_id, PushInput, Pushed, Vendor};
