//! Label and language counts of a set of examples, printed after every import, generation and
//! split so that nothing changes unnoticed.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use triage_taxonomy::Taxonomy;

use crate::Example;

/// Counts per field value (in taxonomy order, zeros included) and per language.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    /// Number of examples.
    pub total: usize,
    /// `(field, [(value, count)])` for every enum field of the taxonomy.
    pub fields: Vec<(String, Vec<(String, usize)>)>,
    /// Examples per language code.
    pub langs: BTreeMap<String, usize>,
}

impl Counts {
    /// Counts `examples` against `taxonomy`.
    pub fn of<'a>(taxonomy: &Taxonomy, examples: impl IntoIterator<Item = &'a Example>) -> Self {
        let mut fields: Vec<(String, Vec<(String, usize)>)> = taxonomy
            .fields
            .iter()
            .map(|f| {
                (
                    f.name.clone(),
                    f.value_names().map(|v| (v.to_owned(), 0)).collect(),
                )
            })
            .collect();
        let mut langs = BTreeMap::new();
        let mut total = 0;
        for e in examples {
            total += 1;
            *langs.entry(e.lang.clone()).or_insert(0) += 1;
            for (name, values) in &mut fields {
                if let Some(v) = e.ticket.get(name) {
                    if let Some(slot) = values.iter_mut().find(|(n, _)| n == v) {
                        slot.1 += 1;
                    }
                }
            }
        }
        Counts { total, fields, langs }
    }

    /// The count of one field value.
    pub fn get(&self, field: &str, value: &str) -> usize {
        self.fields
            .iter()
            .find(|(f, _)| f == field)
            .and_then(|(_, vs)| vs.iter().find(|(v, _)| v == value))
            .map_or(0, |(_, c)| *c)
    }

    /// The smallest count of any value of any field.
    pub fn min_value_count(&self) -> usize {
        self.fields
            .iter()
            .flat_map(|(_, vs)| vs.iter().map(|(_, c)| *c))
            .min()
            .unwrap_or(0)
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} examples", self.total)?;
        let langs: Vec<String> = self.langs.iter().map(|(l, c)| format!("{l} {c}")).collect();
        writeln!(f, "  languages: {}", langs.join(", "))?;
        for (name, values) in &self.fields {
            let vs: Vec<String> = values.iter().map(|(v, c)| format!("{v} {c}")).collect();
            writeln!(f, "  {name}: {}", vs.join(", "))?;
        }
        Ok(())
    }
}
