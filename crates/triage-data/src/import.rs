//! Importing real ticket exports (CSV, JSON array, JSONL) into canonical examples.
//!
//! A [`ColumnMapping`] says which column holds the text (and optionally subject, summary, id,
//! language) and which column feeds each taxonomy field. A [`LabelMap`] renames export values
//! to taxonomy values. Every input row ends up either as an [`Example`] or as a [`Reject`]
//! carrying its line number, the reason and the raw row: nothing is dropped silently.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};
use triage_taxonomy::{Taxonomy, Validator};

use crate::{lang, DataError, Example, LabelMapError, RowError};

/// Which input columns feed which parts of an example.
#[derive(Debug, Clone, Default)]
pub struct ColumnMapping {
    /// Columns joined (blank line between) into the text, after the subject.
    pub text: Vec<String>,
    /// Optional subject column: put first in the text, and used as the summary when there is
    /// no summary column.
    pub subject: Option<String>,
    /// Optional column holding a ready summary.
    pub summary: Option<String>,
    /// Optional id column (default: `<source>:<line>`).
    pub id: Option<String>,
    /// Optional language column (default: guessed from the text, see [`crate::lang`]).
    pub lang: Option<String>,
    /// `(taxonomy field, column)` for every enum field of the taxonomy.
    pub fields: Vec<(String, String)>,
}

impl ColumnMapping {
    /// Parses `key=column` specs (`text=body`, `category=queue`, ...). Keys are `text`
    /// (repeatable), `subject`, `summary`, `id`, `lang` and the taxonomy's field names; every
    /// field of the taxonomy must be mapped.
    pub fn parse(specs: &[String], taxonomy: &Taxonomy) -> Result<Self, DataError> {
        let mut m = ColumnMapping::default();
        for spec in specs {
            let (key, col) = spec.split_once('=').ok_or_else(|| {
                DataError::Invalid(format!("--map {spec:?}: expected KEY=COLUMN, e.g. text=body"))
            })?;
            let (key, col) = (key.trim(), col.trim().to_owned());
            if col.is_empty() {
                return Err(DataError::Invalid(format!("--map {spec:?}: empty column name")));
            }
            match key {
                "text" => m.text.push(col),
                "subject" => m.subject = Some(col),
                "summary" => m.summary = Some(col),
                "id" => m.id = Some(col),
                "lang" => m.lang = Some(col),
                field if taxonomy.field(field).is_some() => {
                    if m.fields.iter().any(|(f, _)| f == field) {
                        return Err(DataError::Invalid(format!("--map {field}=...: given twice")));
                    }
                    m.fields.push((field.to_owned(), col));
                }
                other => {
                    let keys: Vec<&str> = taxonomy.fields.iter().map(|f| f.name.as_str()).collect();
                    return Err(DataError::Invalid(format!(
                        "--map {other}=...: unknown key; use text, subject, summary, id, lang or a field of taxonomy {:?} ({})",
                        taxonomy.name,
                        keys.join(", ")
                    )));
                }
            }
        }
        if m.text.is_empty() {
            return Err(DataError::Invalid("no text column: add --map text=COLUMN".into()));
        }
        let missing: Vec<&str> = taxonomy
            .fields
            .iter()
            .map(|f| f.name.as_str())
            .filter(|f| !m.fields.iter().any(|(g, _)| g == f))
            .collect();
        if !missing.is_empty() {
            return Err(DataError::Invalid(format!(
                "taxonomy {:?} field(s) {} have no column: add --map FIELD=COLUMN for each",
                taxonomy.name,
                missing.join(", ")
            )));
        }
        // Keep taxonomy order.
        m.fields
            .sort_by_key(|(f, _)| taxonomy.fields.iter().position(|g| &g.name == f));
        Ok(m)
    }

    fn columns(&self) -> impl Iterator<Item = &str> {
        self.text
            .iter()
            .chain(&self.subject)
            .chain(&self.summary)
            .chain(&self.id)
            .chain(&self.lang)
            .chain(self.fields.iter().map(|(_, c)| c))
            .map(String::as_str)
    }
}

/// Renames export label values to taxonomy values, per field. File format (TOML):
///
/// ```toml
/// [priority]
/// "P1" = "Critical"
/// "P2" = "High"
/// ```
#[derive(Debug, Clone, Default)]
pub struct LabelMap {
    map: BTreeMap<String, BTreeMap<String, String>>,
}

impl LabelMap {
    /// Reads and checks a label map: fields and target values must exist in the taxonomy.
    pub fn from_file(path: &Path, taxonomy: &Taxonomy) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        Self::from_toml_str(&text, taxonomy).map_err(|source| DataError::Labels {
            path: path.into(),
            source,
        })
    }

    /// Parses a label map from TOML text.
    pub fn from_toml_str(text: &str, taxonomy: &Taxonomy) -> Result<Self, LabelMapError> {
        let map: BTreeMap<String, BTreeMap<String, String>> =
            toml::from_str(text).map_err(LabelMapError::Toml)?;
        for (field, values) in &map {
            let f = taxonomy.field(field).ok_or_else(|| LabelMapError::UnknownField {
                field: field.clone(),
                taxonomy: taxonomy.name.clone(),
            })?;
            for (from, to) in values {
                if !f.has_value(to) {
                    return Err(LabelMapError::UnknownValue {
                        field: field.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        taxonomy: taxonomy.name.clone(),
                    });
                }
            }
        }
        Ok(LabelMap { map })
    }

    fn apply<'a>(&'a self, field: &str, value: &'a str) -> &'a str {
        self.map
            .get(field)
            .and_then(|m| m.get(value))
            .map_or(value, String::as_str)
    }
}

/// Import options.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Column mapping.
    pub mapping: ColumnMapping,
    /// Label renames.
    pub labels: LabelMap,
    /// Value of `source` in the examples, and prefix of generated ids.
    pub source: String,
    /// Texts longer than this (in characters) are rejected.
    pub max_text_chars: usize,
    /// Stop reading after `max_rows + 1` rows (`None`: read all): an input far over a row
    /// limit then costs memory for the limit, not for the input. The report's `rows` is
    /// `max_rows + 1` when there were more.
    pub max_rows: Option<usize>,
}

/// A row that was not imported.
#[derive(Debug, Clone, Serialize)]
pub struct Reject {
    /// 1-based line of the row's start in the input file (record number for JSON arrays).
    pub line: u64,
    /// Why it was not imported, and what to do.
    pub reason: String,
    /// The raw row, so nothing is lost.
    pub row: BTreeMap<String, String>,
}

/// The outcome of an import.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Rows read (imported + rejected).
    pub rows: usize,
    /// Imported examples, in input order.
    pub examples: Vec<Example>,
    /// Rejected rows, in input order.
    pub rejects: Vec<Reject>,
}

type Row = Vec<(String, String)>;

/// Imports a CSV (`.csv`, `.tsv`), JSON array (`.json`) or JSONL (`.jsonl`, `.ndjson`) file.
pub fn import_file(
    path: &Path,
    validator: &Validator,
    options: &ImportOptions,
) -> Result<ImportReport, DataError> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let cap = options.max_rows.map_or(usize::MAX, |m| m.saturating_add(1));
    let records = match ext.as_str() {
        "csv" => read_csv(path, b',', cap)?,
        "tsv" => read_csv(path, b'\t', cap)?,
        "json" => read_json_array(path, cap)?,
        "jsonl" | "ndjson" => read_jsonl(path, cap)?,
        _ => {
            return Err(DataError::Invalid(format!(
                "{}: unknown format; use a .csv, .tsv, .json or .jsonl file",
                path.display()
            )))
        }
    };
    // A mapped column that no readable record has is a typo or a wrong file, in every format;
    // one that only some records have is fine (JSON exports often leave out empty keys).
    let present: HashSet<&str> = records
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flat_map(|row| row.iter().map(|(k, _)| k.as_str()))
        .collect();
    if !present.is_empty() {
        let missing: Vec<&str> = options
            .mapping
            .columns()
            .filter(|c| !present.contains(c))
            .collect();
        if !missing.is_empty() {
            let mut have: Vec<&str> = present.into_iter().collect();
            have.sort_unstable();
            return Err(DataError::Invalid(format!(
                "{}: column(s) {} not found; the file has: {}",
                path.display(),
                missing.join(", "),
                have.join(", ")
            )));
        }
    }
    let mut report = ImportReport {
        rows: records.len(),
        examples: Vec::new(),
        rejects: Vec::new(),
    };
    let mut ids = HashSet::new();
    for (line, record) in records {
        let row = match record {
            Ok(row) => row,
            Err((reason, row)) => {
                report.rejects.push(Reject {
                    line,
                    reason: reason.to_string(),
                    row: row.into_iter().collect(),
                });
                continue;
            }
        };
        match row_to_example(&row, line, validator, options) {
            Ok(example) if !ids.insert(example.id.clone()) => report.rejects.push(Reject {
                line,
                reason: RowError::DuplicateId(example.id).to_string(),
                row: row.into_iter().collect(),
            }),
            Ok(example) => report.examples.push(example),
            Err(reason) => report.rejects.push(Reject {
                line,
                reason: reason.to_string(),
                row: row.into_iter().collect(),
            }),
        }
    }
    Ok(report)
}

fn cell<'a>(row: &'a Row, column: &str) -> Option<&'a str> {
    row.iter()
        .find(|(k, _)| k == column)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// A cell with escaped line breaks and no real one (some exports store `\n` as the two
/// characters backslash and n, e.g. a release of the shared customer-support dataset) gets
/// real line breaks; any other text is returned as it is.
fn unescape_line_breaks(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\n') || text.matches("\\n").count() < 2 {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(text.replace("\\r\\n", "\n").replace("\\n", "\n"))
}

fn row_to_example(
    row: &Row,
    line: u64,
    validator: &Validator,
    o: &ImportOptions,
) -> Result<Example, RowError> {
    let taxonomy = validator.taxonomy();
    let m = &o.mapping;
    let subject = m.subject.as_deref().and_then(|c| cell(row, c));
    let mut parts: Vec<&str> = subject.into_iter().collect();
    parts.extend(m.text.iter().filter_map(|c| cell(row, c)));
    if parts.len() == subject.iter().count() {
        return Err(RowError::EmptyText {
            columns: m.text.join(", "),
        });
    }
    let text = parts
        .iter()
        .map(|p| unescape_line_breaks(p))
        .collect::<Vec<_>>()
        .join("\n\n");
    let chars = text.chars().count();
    if chars > o.max_text_chars {
        return Err(RowError::TooLong {
            chars,
            max: o.max_text_chars,
        });
    }
    if text.contains('\u{0}') {
        return Err(RowError::Nul);
    }
    let summary_source = m
        .summary
        .as_deref()
        .and_then(|c| cell(row, c))
        .or(subject)
        .map(str::to_owned)
        .unwrap_or_else(|| first_sentence(&text));
    let summary = clip(&summary_source, taxonomy.summary.max_length);
    let mut ticket = Map::new();
    ticket.insert("summary".into(), Value::String(summary));
    for (field, column) in &m.fields {
        let raw = cell(row, column).ok_or_else(|| RowError::MissingLabel {
            field: field.clone(),
            column: column.clone(),
        })?;
        let mapped = o.labels.apply(field, raw);
        let f = taxonomy
            .field(field)
            .expect("mapping checked against the taxonomy");
        let value = if f.has_value(mapped) {
            mapped.to_owned()
        } else {
            let folded: Vec<&str> = f
                .value_names()
                .filter(|v| v.to_lowercase() == mapped.to_lowercase())
                .collect();
            match folded.as_slice() {
                [one] => (*one).to_owned(),
                _ => {
                    return Err(RowError::UnknownLabel {
                        field: field.clone(),
                        value: raw.to_owned(),
                        column: column.clone(),
                        taxonomy: taxonomy.name.clone(),
                    })
                }
            }
        };
        ticket.insert(field.clone(), Value::String(value));
    }
    let ticket = validator
        .parse(&Value::Object(ticket))
        .map_err(|v| RowError::Invalid(v.to_string()))?;
    let lang = m
        .lang
        .as_deref()
        .and_then(|c| cell(row, c))
        .and_then(lang::normalize)
        .or_else(|| lang::detect(&text).map(str::to_owned))
        .unwrap_or_else(|| "und".into());
    let id =
        m.id.as_deref()
            .and_then(|c| cell(row, c))
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}:{line}", o.source));
    Ok(Example {
        id,
        text,
        ticket,
        lang,
        source: o.source.clone(),
        group: None,
        split: None,
    })
}

/// The first sentence of the text, skipping a greeting line ("Dear support team,").
/// A text of one line is never taken for its own greeting ("Outlook keeps crashing!").
fn first_sentence(text: &str) -> String {
    let mut lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if let [first, _, ..] = lines.as_slice() {
        let words = first.split_whitespace().count();
        if words <= 6 && (first.ends_with(',') || first.ends_with(':') || first.ends_with('!')) {
            lines.remove(0);
        }
    }
    let joined = lines.join(" ");
    let end = joined
        .char_indices()
        .find(|&(i, c)| matches!(c, '.' | '?' | '!') && joined[i + 1..].starts_with(' '))
        .map_or(joined.len(), |(i, _)| i + 1);
    joined[..end].to_owned()
}

/// One line (whitespace collapsed), at most `max` characters, cut at a word boundary.
pub fn clip(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let cut: String = one_line.chars().take(max).collect();
    match cut.rfind(' ') {
        Some(i) if i > max / 2 => cut[..i].trim_end_matches([',', ';', ':', '-']).to_owned(),
        _ => cut,
    }
}

type Record = (u64, Result<Row, (RowError, Row)>);

/// The 1-based line on which a record starting at byte `offset` begins. (The `csv` crate's
/// own line counter is one short for files with CRLF line ends, which most exports have.)
pub fn line_at(bytes: &[u8], offset: u64) -> u64 {
    Lines::default().at(bytes, offset)
}

/// [`line_at`] for a reader's records: counts the newlines since the previous call instead of
/// from the start, so numbering a file's records in order is linear (an offset before the
/// previous one counts again from the start).
#[derive(Default)]
struct Lines {
    pos: usize,
    newlines: u64,
}

impl Lines {
    fn at(&mut self, bytes: &[u8], offset: u64) -> u64 {
        let mut at = (offset as usize).min(bytes.len());
        while at < bytes.len() && (bytes[at] == b'\r' || bytes[at] == b'\n') {
            at += 1;
        }
        if at < self.pos {
            *self = Lines::default();
        }
        self.newlines += bytes[self.pos..at].iter().filter(|&&b| b == b'\n').count() as u64;
        self.pos = at;
        self.newlines + 1
    }
}

/// Where a record's raw bytes break CSV quoting in a way the `csv` crate reads leniently: a
/// quoted field whose closing quote is followed by more text, or one never closed. Both
/// usually mean a stray quote that made the parser run on through the following rows,
/// reading them as part of this one; `None` when the quoting is sound. Only a field that
/// starts with a quote is quoted (a quote inside an unquoted field, `5" screen`, is text).
fn quoting_fault(raw: &[u8], delimiter: u8) -> Option<&'static str> {
    let (mut field_start, mut quoted, mut i) = (true, false, 0);
    while i < raw.len() {
        let b = raw[i];
        if quoted {
            if b == b'"' {
                if raw.get(i + 1) == Some(&b'"') {
                    i += 2;
                    continue;
                }
                quoted = false;
                match raw.get(i + 1) {
                    None => {}
                    Some(&n) if n == delimiter || n == b'\r' || n == b'\n' => {}
                    Some(_) => return Some("a quoted field goes on after its closing quote"),
                }
            }
        } else if field_start && b == b'"' {
            quoted = true;
        }
        field_start = !quoted && (b == delimiter || b == b'\r' || b == b'\n');
        i += 1;
    }
    quoted.then_some("a quoted field is never closed")
}

fn read_csv(path: &Path, delimiter: u8, cap: usize) -> Result<Vec<Record>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_reader(bytes.as_slice());
    let headers: Vec<String> = reader
        .byte_headers()
        .map_err(|e| csv_err(path, e))?
        .iter()
        .map(|h| {
            String::from_utf8_lossy(h)
                .trim_start_matches('\u{feff}')
                .trim()
                .to_owned()
        })
        .collect();
    // A name twice would map to its first column only, and a reject's raw row (keyed by
    // name) would keep one of the two values.
    for (j, h) in headers.iter().enumerate().filter(|(_, h)| !h.is_empty()) {
        if let Some(i) = headers[..j].iter().position(|x| x == h) {
            return Err(DataError::Parse {
                path: path.into(),
                line: 1,
                message: format!(
                    "column {h:?} appears twice in the header (columns {} and {}): rename one",
                    i + 1,
                    j + 1
                ),
            });
        }
    }
    let mut out = Vec::new();
    let mut record = csv::ByteRecord::new();
    let mut lines = Lines::default();
    while out.len() < cap {
        let line = lines.at(&bytes, reader.position().byte());
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                out.push((line, Err((RowError::MalformedCsv(e.to_string()), Vec::new()))));
                continue;
            }
        }
        let start = record.position().map_or(0, |p| p.byte() as usize);
        let line = record.position().map_or(line, |p| lines.at(&bytes, p.byte()));
        let raw = &bytes[start.min(bytes.len())..(reader.position().byte() as usize).min(bytes.len())];
        let lossy: Row = headers
            .iter()
            .cloned()
            .zip(record.iter().map(|v| String::from_utf8_lossy(v).into_owned()))
            .collect();
        // The row with any fields past the header's, named by position, for a reject.
        let whole = |mut row: Row| {
            for (i, extra) in record.iter().enumerate().skip(headers.len()) {
                row.push((format!("#{}", i + 1), String::from_utf8_lossy(extra).into_owned()));
            }
            row
        };
        if let Some(fault) = quoting_fault(raw, delimiter) {
            // Kept whole in the rejects (the rows it swallowed included), never imported.
            // `raw` may start with the previous record's line end (csv ends a CRLF record at
            // its `\r`) and blank lines, which `line` already skips.
            let body = &raw[raw.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count()..];
            let last = line + body.trim_ascii_end().iter().filter(|&&b| b == b'\n').count() as u64;
            let row = whole(lossy);
            out.push((
                line,
                Err((
                    RowError::MalformedCsv(format!(
                        "{fault} (a stray quote?), so lines {line}-{last} were read as one record"
                    )),
                    row,
                )),
            ));
        } else if record.len() != headers.len() {
            let row = whole(lossy);
            out.push((
                line,
                Err((
                    RowError::FieldCount {
                        got: record.len(),
                        header: headers.len(),
                    },
                    row,
                )),
            ));
        } else if record.iter().any(|v| std::str::from_utf8(v).is_err()) {
            out.push((line, Err((RowError::NotUtf8("row"), lossy))));
        } else {
            out.push((line, Ok(lossy)));
        }
    }
    Ok(out)
}

fn csv_err(path: &Path, e: csv::Error) -> DataError {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => DataError::io(path, io),
        other => DataError::Parse {
            path: path.into(),
            line: 1,
            message: format!("cannot read the CSV header: {other:?}"),
        },
    }
}

fn object_to_row(obj: &Map<String, Value>) -> Row {
    obj.iter()
        .map(|(k, v)| {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (k.clone(), s)
        })
        .collect()
}

fn read_jsonl(path: &Path, cap: usize) -> Result<Vec<Record>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    // A byte-order mark (Windows tools) is not part of the first record.
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if out.len() >= cap {
            break;
        }
        let line_no = i as u64 + 1;
        let text = String::from_utf8_lossy(line);
        if text.trim().is_empty() {
            continue;
        }
        let record = match std::str::from_utf8(line) {
            Err(_) => Err((RowError::NotUtf8("line"), vec![("raw".into(), text.into_owned())])),
            Ok(s) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(obj)) => Ok(object_to_row(&obj)),
                Ok(_) => Err((RowError::NotObject("line"), vec![("raw".into(), s.to_owned())])),
                Err(e) => Err((
                    RowError::InvalidJson(e.to_string()),
                    vec![("raw".into(), s.to_owned())],
                )),
            },
        };
        out.push((line_no, record));
    }
    Ok(out)
}

/// The first `cap` elements of a JSON array; the rest are checked for syntax and skipped
/// without being built.
struct CappedArray(usize);

impl<'de> serde::de::DeserializeSeed<'de> for CappedArray {
    type Value = Vec<Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for CappedArray {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of objects (use .jsonl for one object per line)")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while items.len() < self.0 {
            match seq.next_element::<Value>()? {
                Some(v) => items.push(v),
                None => return Ok(items),
            }
        }
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(items)
    }
}

fn read_json_array(path: &Path, cap: usize) -> Result<Vec<Record>, DataError> {
    use serde::de::DeserializeSeed;
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let parse_err = |e: serde_json::Error| DataError::Parse {
        path: path.into(),
        line: e.line() as u64,
        message: match e.classify() {
            serde_json::error::Category::Data => {
                "expected a JSON array of objects (use .jsonl for one object per line)".into()
            }
            _ => format!("invalid JSON: {e}"),
        },
    };
    let mut de = serde_json::Deserializer::from_str(text.strip_prefix('\u{feff}').unwrap_or(&text));
    let items = CappedArray(cap).deserialize(&mut de).map_err(parse_err)?;
    de.end().map_err(parse_err)?;
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let n = i as u64 + 1;
            match item {
                Value::Object(obj) => (n, Ok(object_to_row(obj))),
                other => (
                    n,
                    Err((
                        RowError::NotObject("record"),
                        vec![("raw".into(), other.to_string())],
                    )),
                ),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs_taxonomy() -> Taxonomy {
        Taxonomy::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/taxonomy/customer-support.toml"
        ))
        .unwrap()
    }

    #[test]
    fn escaped_line_breaks_become_real_ones_only_where_a_text_has_none() {
        assert_eq!(
            unescape_line_breaks("Hello,\\n\\nthe VPN is down.\\nThanks"),
            "Hello,\n\nthe VPN is down.\nThanks"
        );
        assert_eq!(unescape_line_breaks("Windows\\r\\nLinux\\n"), "Windows\nLinux\n");
        // A real line break: the backslashes are content (a pasted path or regex).
        assert_eq!(
            unescape_line_breaks("C:\\new\\n\nsecond line \\n"),
            "C:\\new\\n\nsecond line \\n"
        );
        // A single escape is not a pattern.
        assert_eq!(
            unescape_line_breaks("use \\n in the format"),
            "use \\n in the format"
        );
    }

    fn options(taxonomy: &Taxonomy) -> ImportOptions {
        let specs: Vec<String> = [
            "text=body",
            "subject=subject",
            "category=queue",
            "priority=priority",
            "request_type=type",
            "lang=language",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        ImportOptions {
            mapping: ColumnMapping::parse(&specs, taxonomy).unwrap(),
            labels: LabelMap::from_toml_str("[priority]\n\"critical\" = \"high\"\n", taxonomy).unwrap(),
            source: "t".into(),
            max_text_chars: 1000,
            max_rows: None,
        }
    }

    /// With `max_rows`, reading stops one row past the limit in every format (an upload of
    /// millions of rows is refused without building them); a JSON array's skipped tail is
    /// still checked for syntax.
    #[test]
    fn max_rows_stops_reading_one_row_past_the_limit() {
        let t = cs_taxonomy();
        let dir = std::env::temp_dir().join(format!("triage-import-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let capped = |name: &str, body: String, max: Option<usize>| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            let o = ImportOptions {
                max_rows: max,
                ..options(&t)
            };
            import_file(&p, &Validator::new(&t), &o)
        };
        let row = r#"{"body":"x","subject":"s","queue":"IT Support","priority":"low","type":"Incident","language":"en"}"#;
        let csv = format!(
            "body,subject,queue,priority,type,language\n{}",
            "x,s,IT Support,low,Incident,en\n".repeat(50)
        );
        let jsonl = format!("{row}\n").repeat(50);
        let json = format!("[{}]", [row; 50].join(","));
        for (name, body) in [("a.csv", csv), ("a.jsonl", jsonl), ("a.json", json)] {
            assert_eq!(capped(name, body.clone(), Some(2)).unwrap().rows, 3, "{name}");
            assert_eq!(capped(name, body.clone(), Some(50)).unwrap().rows, 50, "{name}");
            assert_eq!(capped(name, body, None).unwrap().rows, 50, "{name}");
        }
        // A byte-order mark does not make the first record invalid.
        let bom = capped("d.jsonl", format!("\u{feff}{row}\n"), None).unwrap();
        assert_eq!(bom.rows, 1);
        assert!(
            bom.rejects.iter().all(|r| !r.reason.contains("JSON")),
            "{:?}",
            bom.rejects
        );
        let bom = capped("d.json", format!("\u{feff}[{row}]"), None).unwrap();
        assert_eq!(bom.rows, 1);
        assert!(
            bom.rejects.iter().all(|r| !r.reason.contains("JSON")),
            "{:?}",
            bom.rejects
        );
        let broken = format!("[{},{{]", [row; 5].join(","));
        assert!(capped("b.json", broken, Some(2)).is_err());
        let e = capped("c.json", "{\"a\": 1}".into(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a JSON array"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The header of the customer-support exports the tests write.
    const CS_HEADER: &[u8] = b"subject,body,type,queue,priority,language\n";

    /// A fresh scratch folder for one test.
    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("triage-import-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn imports_good_rows_and_reports_every_bad_one_with_its_line() {
        let taxonomy = cs_taxonomy();
        let validator = Validator::new(&taxonomy);
        let dir = scratch("rows");
        let path = dir.join("t.csv");
        let mut csv = CS_HEADER.to_vec();
        csv.extend_from_slice(
            b"VPN down,\"Our VPN is down.\nPlease help.\",Incident,IT Support,critical,en\n",
        ); // 2-3
        csv.extend_from_slice(b",Dear team,\n,Request,Billing and Payments,LOW,de\n"); // 4, 5: wrong field counts
        csv.extend_from_slice(b"x,y,Incident,Moon Base,high,en\n"); // 6: unknown queue
        csv.extend_from_slice(b"x,,Incident,IT Support,high,en\n"); // 7: no body
        csv.extend_from_slice(b"x,\xff\xfe,Incident,IT Support,high,en\n"); // 8: not UTF-8
        csv.extend_from_slice(b"Invoice,\"Hello,\n\nI was charged twice. Refund please.\",Request,Billing and Payments,LOW,fr\n"); // 9-11
        std::fs::write(&path, &csv).unwrap();
        // The same file with CRLF line ends must report the same lines.
        let crlf: Vec<u8> = String::from_utf8_lossy(&csv).replace('\n', "\r\n").into_bytes();
        std::fs::write(dir.join("crlf.csv"), crlf).unwrap();
        let crlf_report = import_file(&dir.join("crlf.csv"), &validator, &options(&taxonomy)).unwrap();
        let crlf_lines: Vec<u64> = crlf_report.rejects.iter().map(|r| r.line).collect();
        assert_eq!(crlf_lines, vec![4, 5, 6, 7], "{:#?}", crlf_report.rejects);
        assert_eq!(crlf_report.examples[0].id, "t:2");
        let report = import_file(&path, &validator, &options(&taxonomy)).unwrap();
        assert_eq!(report.rows, 7);
        assert_eq!(report.examples.len() + report.rejects.len(), report.rows);
        let first = &report.examples[0];
        assert_eq!(first.text, "VPN down\n\nOur VPN is down.\nPlease help.");
        assert_eq!(first.ticket.summary(), "VPN down");
        assert_eq!(first.ticket.get("priority"), Some("high"), "label map applied");
        assert_eq!(first.id, "t:2");
        let last = &report.examples[1];
        assert_eq!(last.ticket.get("priority"), Some("low"), "case folded");
        assert_eq!(last.lang, "fr");
        let lines: Vec<u64> = report.rejects.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![4, 5, 6, 7, 8], "{:#?}", report.rejects);
        assert!(
            report.rejects[0].reason.contains("fields"),
            "{:?}",
            report.rejects[0]
        );
        assert!(
            report.rejects[1].reason.contains("fields"),
            "{:?}",
            report.rejects[1]
        );
        assert!(report.rejects[2].reason.contains("Moon Base"));
        assert!(report.rejects[3].reason.contains("text is empty"));
        assert!(report.rejects[4].reason.contains("UTF-8"));
        assert_eq!(report.rejects[2].row["queue"], "Moon Base", "raw row kept");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A stray quote makes the `csv` crate read the following rows into one record, which
    /// could still have the header's field count: such a record is rejected whole, naming the
    /// lines it spans, and nothing in it is imported; sound quoting (escaped `""`, a quote
    /// inside an unquoted field) is untouched.
    #[test]
    fn a_stray_quote_is_a_reject_naming_the_lines_it_swallowed() {
        let taxonomy = cs_taxonomy();
        let validator = Validator::new(&taxonomy);
        let dir = scratch("quote");
        let path = dir.join("q.csv");
        let mut csv = CS_HEADER.to_vec();
        csv.extend_from_slice(b"VPN,\"VPN down,Incident,IT Support,high,en\n"); // 2: opens a quote
        csv.extend_from_slice(b"Printer,\"Printer jammed\",Incident,IT Support,low,en\n"); // 3: swallowed
        csv.extend_from_slice(b"Screen,My 5\" screen says \"\"no signal\"\",Incident,IT Support,low,en\n"); // 4
        csv.extend_from_slice(b"Mail,\"Says \"\"quota\"\" full\",Incident,IT Support,low,en\n"); // 5

        // With CRLF line ends the reject names the same lines.
        std::fs::write(&path, String::from_utf8_lossy(&csv).replace('\n', "\r\n")).unwrap();
        let report = import_file(&path, &validator, &options(&taxonomy)).unwrap();
        assert!(
            report.rejects[0].reason.contains("lines 2-3"),
            "{:?}",
            report.rejects
        );
        std::fs::write(&path, &csv).unwrap();
        let report = import_file(&path, &validator, &options(&taxonomy)).unwrap();
        assert_eq!(report.rejects.len(), 1, "{:#?}", report.rejects);
        let r = &report.rejects[0];
        assert_eq!(r.line, 2);
        assert!(
            r.reason.contains("lines 2-3") && r.reason.contains("stray quote"),
            "{}",
            r.reason
        );
        assert!(
            r.row.values().any(|v| v.contains("Printer")),
            "the swallowed row is kept: {:?}",
            r.row
        );
        let subjects: Vec<&str> = report.examples.iter().map(|e| e.ticket.summary()).collect();
        assert_eq!(subjects, vec!["Screen", "Mail"], "{:#?}", report.examples);
        assert_eq!(report.examples[1].text, "Mail\n\nSays \"quota\" full");
        // A quote left open in the last row swallows the rest of the file: rejected as well.
        let open = [CS_HEADER, b"A,\"open,Incident,IT Support,low,en\n"].concat();
        std::fs::write(&path, open).unwrap();
        let report = import_file(&path, &validator, &options(&taxonomy)).unwrap();
        assert!(report.examples.is_empty());
        assert!(
            report.rejects[0].reason.contains("never closed"),
            "{:?}",
            report.rejects
        );
        assert_eq!(quoting_fault(b"a,\"b\"\"c\",d\r\n", b','), None);
        assert_eq!(quoting_fault(b"a;\"b\";c\n", b';'), None);
        assert!(quoting_fault(b"a;\"b\",c\n", b';').is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A column name twice in a CSV header is refused up front, naming both columns.
    #[test]
    fn a_repeated_header_name_is_an_error() {
        let taxonomy = cs_taxonomy();
        let validator = Validator::new(&taxonomy);
        let dir = scratch("header");
        let path = dir.join("h.csv");
        std::fs::write(
            &path,
            "subject,body,type,queue,priority,body\nA,b,Incident,IT Support,low,c\n",
        )
        .unwrap();
        let err = import_file(&path, &validator, &options(&taxonomy))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"body\" appears twice") && err.contains("columns 2 and 6"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// JSON and JSONL records may leave out a mapped key (exports drop empty ones): the import
    /// goes on as long as some record has it; a mapped column that no record has (a typo) is
    /// an error naming what the file has, in every format.
    #[test]
    fn a_mapped_column_must_appear_in_some_record_not_in_the_first() {
        let taxonomy = cs_taxonomy();
        let validator = Validator::new(&taxonomy);
        let dir = scratch("columns");
        let full = r#"{"body":"VPN down","subject":"VPN","queue":"IT Support","priority":"low","type":"Incident","language":"en"}"#;
        let lean = r#"{"body":"Printer jammed","queue":"IT Support","priority":"low","type":"Incident","language":"en"}"#;
        for (name, body) in [
            ("a.json", format!("[{lean},{full}]")),
            ("a.jsonl", format!("{lean}\n{full}\n")),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, &body).unwrap();
            let report = import_file(&p, &validator, &options(&taxonomy)).unwrap();
            assert_eq!(report.examples.len(), 2, "{name}: {:?}", report.rejects);
            let typo = ImportOptions {
                mapping: ColumnMapping::parse(
                    &[
                        "text=bdy".into(),
                        "category=queue".into(),
                        "priority=priority".into(),
                        "request_type=type".into(),
                    ],
                    &taxonomy,
                )
                .unwrap(),
                ..options(&taxonomy)
            };
            let err = import_file(&p, &validator, &typo).unwrap_err().to_string();
            assert!(
                err.contains("bdy") && err.contains("not found") && err.contains("body"),
                "{name}: {err}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn mapping_errors_say_what_to_add() {
        let taxonomy = cs_taxonomy();
        let err = ColumnMapping::parse(&["text=body".into()], &taxonomy)
            .unwrap_err()
            .to_string();
        assert!(err.contains("category") && err.contains("--map"), "{err}");
        let err = ColumnMapping::parse(&["colour=x".into()], &taxonomy)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key"), "{err}");
        let err = LabelMap::from_toml_str("[priority]\nP1 = \"urgent\"\n", &taxonomy)
            .unwrap_err()
            .to_string();
        assert!(err.contains("urgent"), "{err}");
    }

    #[test]
    fn summaries_skip_greetings_and_are_clipped() {
        assert_eq!(
            first_sentence("Dear support,\nMy invoice is wrong. Please fix."),
            "My invoice is wrong."
        );
        assert_eq!(clip("a very long line of words", 12), "a very long");
        assert_eq!(clip("one\nline", 20), "one line");
        // A one-line text is its own summary, even when it reads like a greeting line.
        assert_eq!(
            first_sentence("Outlook keeps crashing!"),
            "Outlook keeps crashing!"
        );
        assert_eq!(first_sentence("Hi team,"), "Hi team,");
    }

    /// Record numbering counts each newline once (linear in the file), and agrees with
    /// [`line_at`] at every offset, CRLF included; a smaller offset falls back to it.
    #[test]
    fn incremental_line_numbers_match_line_at() {
        let bytes = b"id,text\r\n1,\"two\r\nlines\"\r\n\r\n2,b\n3,c";
        let mut lines = Lines::default();
        for offset in 0..=bytes.len() as u64 + 2 {
            assert_eq!(lines.at(bytes, offset), line_at(bytes, offset), "offset {offset}");
        }
        assert_eq!(lines.at(bytes, 0), 1);
    }
}
