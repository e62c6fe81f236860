//! Composing one example: channel, writer, slots, urgency, noise and the target summary.

use std::collections::BTreeMap;

use triage_taxonomy::{Field, Taxonomy};

use super::seeds::{Effect, Piece, Scenario, Seeds, Surface, Template, Urgency};
use crate::import::clip;
use crate::rng::Rng;

/// The field whose values (in taxonomy order, lowest first) urgency markers move.
pub(crate) const PRIORITY: &str = "priority";

/// Share of examples of an escalating scenario that carry an urgency marker.
const ESCALATION_RATE: f64 = 0.2;

/// A composed example before validation.
pub(crate) struct Draft {
    pub text: String,
    pub summary: String,
    /// The priority after urgency / "no rush" markers (`None`: the taxonomy has no priority).
    pub priority: Option<String>,
}

#[derive(Clone, Copy)]
enum Channel {
    Chat,
    Email,
    Reply,
    Phone,
    Manager,
}

fn priority_index(scenario: &Scenario, field: &Field) -> Option<usize> {
    let base = &scenario.labels.iter().find(|(k, _)| k == &field.name)?.1;
    field.value_names().position(|v| v == base)
}

/// The priority index an urgency marker of `effect` gives a scenario of priority `base`.
fn escalated(effect: Effect, base: usize, n: usize) -> usize {
    match effect {
        Effect::Critical => n - 1,
        Effect::High => base.max(n.saturating_sub(2)),
    }
}

/// Whether priority value `v` can come out of `scenario` (base, escalated by a marker of a
/// kind the scenario accepts, or relaxed).
pub(crate) fn priority_reachable(seeds: &Seeds, scenario: &Scenario, field: &Field, v: &str) -> bool {
    let n = field.values.len();
    let (Some(base), Some(idx)) = (
        priority_index(scenario, field),
        field.value_names().position(|x| x == v),
    ) else {
        return false;
    };
    let by_marker = seeds
        .surface
        .values()
        .flat_map(|s| &s.urgency)
        .any(|u| scenario.urgency.contains(&u.kind) && escalated(u.effect, base, n) == idx);
    idx == base || (scenario.escalate && by_marker) || (scenario.relax && idx == 0)
}

fn fill(template: &Template, seeds: &Seeds, lang: &str, chosen: &BTreeMap<usize, usize>) -> String {
    let mut out = String::new();
    for p in &template.pieces {
        match p {
            Piece::Lit(s) => out.push_str(s),
            Piece::Slot(s) => {
                let value = &seeds.slots[*s].values[chosen[s]];
                out.push_str(
                    value
                        .get(lang)
                        .or_else(|| value.get("en"))
                        .map_or("", String::as_str),
                );
            }
        }
    }
    out
}

fn pick_str<'a>(rng: &mut Rng, items: &'a [String]) -> &'a str {
    rng.pick(items).as_str()
}

/// Composes one example of `scenario` in `lang`.
pub(crate) fn compose(
    rng: &mut Rng,
    seeds: &Seeds,
    scenario: &Scenario,
    lang: &str,
    taxonomy: &Taxonomy,
) -> Draft {
    let surface = &seeds.surface[lang];
    // English surface for code-switching, if the seeds have it.
    let english = seeds.surface.get("en").filter(|_| lang != "en");
    let channel = match rng.below(100) {
        0..=21 => Channel::Chat,
        22..=56 => Channel::Email,
        57..=66 => Channel::Reply,
        67..=82 => Channel::Phone,
        _ => Channel::Manager,
    };
    let variant = match channel {
        Channel::Chat => 0,
        _ if rng.chance(0.1) => 0,
        _ => 1 + rng.below(2),
    };
    // The summary may only state what the text says. Per-variant summaries do by construction
    // (the loader checks their slots); a single summary prefers a variant that uses every slot
    // of it (short chat lines often name no product).
    let texts = &scenario.texts[lang];
    let covers = |t: &Template| scenario.summary[2].slots().all(|s| t.slots().any(|x| x == s));
    let variant = if scenario.summary_per_variant || covers(&texts[variant]) {
        variant
    } else {
        (0..3).find(|&v| covers(&texts[v])).unwrap_or(variant)
    };
    let template = &texts[variant];
    let summary_template = &scenario.summary[variant];
    let mut chosen: BTreeMap<usize, usize> = BTreeMap::new();
    for s in template.slots().chain(summary_template.slots()) {
        let n = seeds.slots[s].values.len();
        chosen.entry(s).or_insert_with(|| rng.below(n));
    }
    // The writer's name (signatures, phone notes): never the colleague the text talks about.
    let colleague = seeds.colleague_slot.map(|s| {
        let n = seeds.slots[s].values.len();
        let mut k = rng.below(n);
        if n > 1 && chosen.get(&s) == Some(&k) {
            k = (k + 1 + rng.below(n - 1)) % n;
        }
        seeds.slots[s].values[k].get(lang).cloned().unwrap_or_default()
    });
    let colleague = colleague.as_deref().unwrap_or("");
    let mut body = fill(template, seeds, lang, &chosen);

    // Urgency and priority.
    let pfield = taxonomy.field(PRIORITY);
    let mut priority = pfield.and_then(|f| priority_index(scenario, f).map(|i| (f, i)));
    let mut clause = None;
    if let Some((field, base)) = priority {
        let n = field.values.len();
        let source = match english {
            Some(en) if rng.chance(0.1) => en,
            _ => surface,
        };
        // Only markers of a kind that fits the situation ("the whole site is affected" needs
        // a scenario that can affect a site).
        let fitting: Vec<&Urgency> = source
            .urgency
            .iter()
            .filter(|u| scenario.urgency.contains(&u.kind))
            .collect();
        if scenario.escalate && !fitting.is_empty() && rng.chance(ESCALATION_RATE) {
            let marker = *rng.pick(&fitting);
            let idx = escalated(marker.effect, base, n);
            priority = Some((field, idx));
            let text = if rng.chance(0.15) {
                marker.text.to_uppercase()
            } else {
                marker.text.clone()
            };
            body = join_sentence(&body, &text);
            clause = Some(marker.summary.clone());
        } else if scenario.relax && rng.chance(0.35) {
            priority = Some((field, 0));
            body = join_sentence(&body, pick_str(rng, &surface.low_markers));
        }
    }

    // Channel and writer.
    let switch = |rng: &mut Rng| -> &Surface {
        match english {
            Some(en) if rng.chance(0.12) => en,
            _ => surface,
        }
    };
    let text = match channel {
        Channel::Chat => {
            let opener = pick_str(rng, &surface.chat_openers);
            let mut t = if opener.is_empty() {
                body
            } else {
                format!("{opener} {}", lower_first(&body))
            };
            if rng.chance(0.5) {
                t = t.trim_end_matches('.').to_owned();
            }
            t
        }
        Channel::Email => {
            let gs = switch(rng);
            let g = pick_str(rng, &gs.greetings).to_owned();
            let ss = switch(rng);
            let s = pick_str(rng, &ss.signoffs).to_owned();
            format!("{g}\n\n{body}\n\n{s}\n{colleague}")
        }
        Channel::Reply => {
            let follow = pick_str(rng, &surface.follow_ups);
            let header = pick_str(rng, &surface.quoted_reply).replace("{colleague}", colleague);
            let g = pick_str(rng, &surface.greetings);
            let quoted: Vec<String> = format!("{g}\n\n{body}")
                .lines()
                .map(|l| {
                    if l.is_empty() {
                        ">".to_owned()
                    } else {
                        format!("> {l}")
                    }
                })
                .collect();
            format!("{follow}\n\n{header}\n{}", quoted.join("\n"))
        }
        Channel::Phone => pick_str(rng, &surface.phone_notes)
            .replace("{colleague}", colleague)
            .replace("{text}", &body),
        Channel::Manager => {
            let t = pick_str(rng, &surface.manager_forwards)
                .replace("{colleague}", colleague)
                .replace("{text}", &body);
            if rng.chance(0.5) {
                let s = pick_str(rng, &surface.signoffs);
                format!("{t}\n\n{s}")
            } else {
                t
            }
        }
    };

    // Noise.
    let mut text = text;
    if rng.chance(0.25) {
        text = abbreviate(rng, &text, &surface.abbreviations);
    }
    if rng.chance(0.3) {
        let edits = 1 + rng.below(3);
        for _ in 0..edits {
            text = typo(rng, &text);
        }
    }
    if rng.chance(0.08) {
        text = text.to_lowercase();
    }

    // Summary: the variant's English summary with this example's slot values.
    let mut summary = upper_first(fill(summary_template, seeds, "en", &chosen).trim());
    if let Some(c) = clause {
        summary = format!("{summary}; {c}");
    }
    let max = taxonomy.summary.max_length;
    Draft {
        text,
        summary: clip(&summary, max),
        priority: priority.map(|(f, i)| f.values[i].name.clone()),
    }
}

fn join_sentence(body: &str, extra: &str) -> String {
    let body = body.trim_end();
    let sep = if body.ends_with(['.', '!', '?', ':']) {
        " "
    } else {
        ". "
    };
    format!("{body}{sep}{extra}")
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        // Keep acronyms ("VPN") as they are.
        Some(f) if c.clone().next().is_some_and(|n| n.is_lowercase()) => f.to_lowercase().chain(c).collect(),
        _ => s.to_owned(),
    }
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Replaces whole-word, case-insensitive occurrences of the abbreviation keys (70% of them).
fn abbreviate(rng: &mut Rng, text: &str, abbreviations: &BTreeMap<String, String>) -> String {
    let chars: Vec<char> = text.chars().collect();
    let lower: Vec<char> = chars
        .iter()
        .map(|c| c.to_lowercase().next().unwrap_or(*c))
        .collect();
    let keys: Vec<(Vec<char>, &str)> = abbreviations
        .iter()
        .map(|(k, v)| {
            (
                k.chars().map(|c| c.to_lowercase().next().unwrap_or(c)).collect(),
                v.as_str(),
            )
        })
        .collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    'outer: while i < chars.len() {
        let at_start = i == 0 || !chars[i - 1].is_alphanumeric();
        if at_start {
            for (k, v) in &keys {
                let end = i + k.len();
                if end <= chars.len()
                    && lower[i..end] == k[..]
                    && (end == chars.len() || !chars[end].is_alphanumeric())
                    && rng.chance(0.7)
                {
                    out.push_str(v);
                    i = end;
                    continue 'outer;
                }
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// One keyboard slip in a random word of four or more letters: swap, drop, double or a
/// neighbouring key.
fn typo(rng: &mut Rng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in chars.iter().enumerate() {
        match (c.is_alphabetic(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                if i - s >= 4 {
                    words.push((s, i));
                }
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        if chars.len() - s >= 4 {
            words.push((s, chars.len()));
        }
    }
    if words.is_empty() {
        return text.to_owned();
    }
    let (s, e) = *rng.pick(&words);
    let at = s + 1 + rng.below(e - s - 2);
    match rng.below(4) {
        0 => chars.swap(at, at + 1),
        1 => {
            chars.remove(at);
        }
        2 => chars.insert(at, chars[at]),
        _ => {
            const ROWS: [&str; 3] = ["qwertyuiop", "asdfghjkl", "zxcvbnm"];
            let c = chars[at];
            if let Some(row) = ROWS.iter().find(|r| r.contains(c)) {
                let row: Vec<char> = row.chars().collect();
                let p = row.iter().position(|&x| x == c).unwrap();
                let q = if p + 1 < row.len() && (p == 0 || rng.chance(0.5)) {
                    p + 1
                } else {
                    p - 1
                };
                chars[at] = row[q];
            } else {
                chars.swap(at, at + 1);
            }
        }
    }
    chars.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abbreviations_match_whole_words_only() {
        let mut abbr = BTreeMap::new();
        abbr.insert("please".to_owned(), "pls".to_owned());
        let mut hits = 0;
        for seed in 0..20 {
            let out = abbreviate(&mut Rng::new(seed), "Please fix, pleased, please.", &abbr);
            assert!(out.contains("pleased"), "{out}");
            hits += out.matches("pls").count();
        }
        assert!(hits > 10, "{hits}");
    }

    #[test]
    fn typos_change_one_long_word_and_keep_utf8() {
        for seed in 0..50 {
            let out = typo(&mut Rng::new(seed), "Drucker für Änderungen");
            assert_ne!(out, "Drucker für Änderungen");
            assert!(out.contains("für"), "{out}");
        }
        assert_eq!(typo(&mut Rng::new(1), "ok 123"), "ok 123");
    }

    #[test]
    fn sentences_join_and_first_letters_change_case() {
        assert_eq!(join_sentence("VPN down", "Help!"), "VPN down. Help!");
        assert_eq!(join_sentence("VPN down!", "Help!"), "VPN down! Help!");
        assert_eq!(lower_first("My VPN"), "my VPN");
        assert_eq!(lower_first("VPN down"), "VPN down");
        assert_eq!(upper_first("éclair"), "Éclair");
    }
}
