//! Training and evaluation data for triage: one canonical example format and everything that
//! produces it.
//!
//! * [`Example`]: `{id, text, ticket, lang, source, group?, split?}`, one JSON object per line;
//!   its `ticket` is a [`triage_taxonomy::Ticket`], so an example can only exist if its labels
//!   validate against the taxonomy's schema. [`read_examples`] / [`write_examples`] are the one
//!   reader and writer used by training, evaluation and batch inference.
//! * [`import`]: CSV / JSON / JSONL exports with a column mapping and a label mapping; every
//!   row is either imported or rejected with its line number and reason.
//! * [`synth`]: the synthetic multilingual generator, driven by the taxonomy and the seed
//!   material in `data/synth/<taxonomy>/`.
//! * [`split`]: train/validation/test splits that never put one scenario (or one cluster of
//!   near-duplicates) in two splits, stratified by the first field.
//! * [`dedup`]: exact and near-duplicate (MinHash) detection.

pub mod dedup;
mod error;
mod example;
pub mod import;
pub mod lang;
pub mod rng;
pub mod split;
pub mod stats;
pub mod synth;

pub use error::{DataError, ExampleError, LabelMapError, RowError, TemplateError, ValueError};
pub use example::{
    atomic_write, parse_examples, read_examples, read_examples_and_bytes, sha256_hex, write_examples,
    Example, Split,
};
