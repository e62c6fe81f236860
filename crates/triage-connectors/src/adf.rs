//! Atlassian Document Format (ADF): the rich-text format of Jira Cloud v3 `description`.
//!
//! Rules that matter (from `adf-schema-v1-full.json`): the root is
//! `{"version": 1, "type": "doc", "content": [...]}`, paragraphs hold inline nodes, and a
//! text node's `text` may not be empty. Plain text is converted paragraph by paragraph (blank
//! lines separate paragraphs, single newlines become `hardBreak`s); empty input gives a doc
//! with one empty paragraph, which is valid.

use serde_json::{json, Value};

/// A paragraph of plain text with hard breaks at newlines; `None` when it has no text.
pub fn paragraph(text: &str) -> Option<Value> {
    let mut content = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            continue;
        }
        if !content.is_empty() {
            content.push(json!({"type": "hardBreak"}));
        }
        content.push(json!({"type": "text", "text": line}));
    }
    (!content.is_empty()).then(|| json!({"type": "paragraph", "content": content}))
}

/// A level-`level` heading (1–6) with `text` (non-empty).
pub fn heading(level: u8, text: &str) -> Value {
    json!({"type": "heading", "attrs": {"level": level.clamp(1, 6)}, "content": [{"type": "text", "text": text}]})
}

/// Paragraphs for plain text; blank lines separate paragraphs.
pub fn paragraphs(text: &str) -> Vec<Value> {
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    normalized.split("\n\n").filter_map(paragraph).collect()
}

/// A complete ADF document from blocks; an empty list becomes one empty paragraph.
pub fn doc(mut content: Vec<Value>) -> Value {
    if content.is_empty() {
        content.push(json!({"type": "paragraph", "content": []}));
    }
    json!({"version": 1, "type": "doc", "content": content})
}
