//! Loading and checking the generator's seed material (`data/synth/<taxonomy>/`); see
//! `data/synth/FORMAT.md` for the file formats.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use triage_taxonomy::Taxonomy;

use crate::{DataError, TemplateError};

/// A text with `{slot}` references, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Template {
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    Lit(String),
    Slot(usize),
}

impl Template {
    /// Slot indices referenced, in order of appearance.
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Slot(s) => Some(*s),
            Piece::Lit(_) => None,
        })
    }
}

/// One slot: values, each with one string per language (language-neutral values repeat).
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub name: String,
    /// `values[i]` maps language code -> string.
    pub values: Vec<BTreeMap<String, String>>,
}

/// How an urgency marker changes the priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Effect {
    Critical,
    High,
}

/// What an urgency marker says about the situation. A scenario lists the kinds that fit it
/// (`urgency = [...]`), so "the whole site is affected" is never added to a broken mouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UrgencyKind {
    /// A same-day or next-day business deadline of the writer.
    Deadline,
    /// The writer cannot work at all.
    Blocked,
    /// Many people, a site or customers are affected.
    Scope,
    /// An executive is waiting.
    Vip,
}

impl UrgencyKind {
    /// The kinds a scenario accepts when it does not list its own: anything that can happen
    /// to one person ("scope" must be chosen explicitly).
    pub(crate) const DEFAULT: [UrgencyKind; 3] =
        [UrgencyKind::Deadline, UrgencyKind::Blocked, UrgencyKind::Vip];
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Urgency {
    pub effect: Effect,
    pub kind: UrgencyKind,
    pub text: String,
    pub summary: String,
}

/// Per-language surface material.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Surface {
    pub greetings: Vec<String>,
    pub signoffs: Vec<String>,
    pub chat_openers: Vec<String>,
    pub phone_notes: Vec<String>,
    pub manager_forwards: Vec<String>,
    pub quoted_reply: Vec<String>,
    pub follow_ups: Vec<String>,
    pub low_markers: Vec<String>,
    #[serde(default)]
    pub abbreviations: BTreeMap<String, String>,
    pub urgency: Vec<Urgency>,
    /// Prompt-injection lines (`triage data synth --injections`): an instruction to the model
    /// inside the report, naming a field (`{field}`) and a wrong value (`{value}`). The labels
    /// never follow it.
    #[serde(default)]
    pub injections: Vec<String>,
}

/// One scenario, checked against the taxonomy.
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    pub id: String,
    /// `(field, value)` in taxonomy order, every field present.
    pub labels: Vec<(String, String)>,
    pub escalate: bool,
    /// Urgency kinds that fit this scenario (empty when `escalate` is false).
    pub urgency: Vec<UrgencyKind>,
    pub relax: bool,
    pub weight: u32,
    /// The English summary of each text variant (chat, normal, detailed); the same one three
    /// times when the scenario gives a single summary.
    pub summary: [Template; 3],
    /// Whether the summaries are per variant, each checked to use only its variant's slots.
    pub summary_per_variant: bool,
    /// language -> three texts (chat, normal, detailed).
    pub texts: BTreeMap<String, [Template; 3]>,
}

/// The seed material of one taxonomy, checked.
#[derive(Debug, Clone)]
pub struct Seeds {
    pub(crate) dir: PathBuf,
    pub(crate) slots: Vec<Slot>,
    pub(crate) surface: BTreeMap<String, Surface>,
    pub(crate) scenarios: Vec<Scenario>,
    pub(crate) colleague_slot: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSlotValue {
    Plain(String),
    PerLang(BTreeMap<String, String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlotsFile {
    #[serde(default)]
    slots: BTreeMap<String, Vec<RawSlotValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenarioFile {
    #[serde(default)]
    slots: BTreeMap<String, Vec<RawSlotValue>>,
    #[serde(default)]
    scenario: Vec<RawScenario>,
}

#[derive(Deserialize)]
struct RawScenario {
    id: String,
    /// One summary, or three: one per text variant.
    summary: toml::Value,
    #[serde(default)]
    escalate: Option<bool>,
    #[serde(default)]
    urgency: Option<Vec<UrgencyKind>>,
    #[serde(default)]
    relax: Option<bool>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

fn seeds_err(path: &Path, text: &str, needle: &str, message: String) -> DataError {
    let line = text
        .find(needle)
        .map(|at| text[..at].bytes().filter(|&b| b == b'\n').count() as u64 + 1);
    DataError::Seeds {
        path: path.into(),
        line,
        message,
    }
}

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, DataError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| {
            text[..s.start.min(text.len())]
                .bytes()
                .filter(|&b| b == b'\n')
                .count() as u64
                + 1
        });
        DataError::Seeds {
            path: path.into(),
            line,
            message: e.message().to_owned(),
        }
    })
}

/// The text of one taxonomy's seed files, wherever they come from: a folder
/// ([`SeedFiles::read`]) or the copy built into the binary ([`SeedFiles::builtin`]). Paths
/// name the files in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    /// The seed folder (`data/synth/<taxonomy>` for the built-in copy).
    pub dir: PathBuf,
    /// `surface.toml`.
    pub surface: String,
    /// `slots.toml`, if present.
    pub slots: Option<String>,
    /// `scenarios/*.toml` with their paths, in file-name order.
    pub scenarios: Vec<(PathBuf, String)>,
}

/// The seed material of the default taxonomy, built in (`data/synth/default/`), so that
/// `triage data synth` works from any folder. A test checks it against the folder.
const BUILTIN_DEFAULT_SCENARIOS: [(&str, &str); 10] = [
    (
        "access-2.toml",
        include_str!("../../../../data/synth/default/scenarios/access-2.toml"),
    ),
    (
        "access.toml",
        include_str!("../../../../data/synth/default/scenarios/access.toml"),
    ),
    (
        "email.toml",
        include_str!("../../../../data/synth/default/scenarios/email.toml"),
    ),
    (
        "hardware.toml",
        include_str!("../../../../data/synth/default/scenarios/hardware.toml"),
    ),
    (
        "network.toml",
        include_str!("../../../../data/synth/default/scenarios/network.toml"),
    ),
    (
        "security-2.toml",
        include_str!("../../../../data/synth/default/scenarios/security-2.toml"),
    ),
    (
        "security.toml",
        include_str!("../../../../data/synth/default/scenarios/security.toml"),
    ),
    (
        "software-2.toml",
        include_str!("../../../../data/synth/default/scenarios/software-2.toml"),
    ),
    (
        "software.toml",
        include_str!("../../../../data/synth/default/scenarios/software.toml"),
    ),
    (
        "workplace.toml",
        include_str!("../../../../data/synth/default/scenarios/workplace.toml"),
    ),
];

impl SeedFiles {
    /// Reads `dir/surface.toml`, `dir/slots.toml` (optional) and `dir/scenarios/*.toml`.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let surface = read(&dir.join("surface.toml"))?;
        let slots_path = dir.join("slots.toml");
        let slots = match slots_path.exists() {
            true => Some(read(&slots_path)?),
            false => None,
        };
        let scen_dir = dir.join("scenarios");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&scen_dir)
            .map_err(|e| DataError::io(&scen_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let scenarios = files
            .into_iter()
            .map(|p| read(&p).map(|t| (p, t)))
            .collect::<Result<_, _>>()?;
        Ok(SeedFiles {
            dir: dir.to_owned(),
            surface,
            slots,
            scenarios,
        })
    }

    /// The built-in seed files of the taxonomy named `taxonomy` (only `default` has them).
    pub fn builtin(taxonomy: &str) -> Option<Self> {
        if taxonomy != "default" {
            return None;
        }
        let dir = PathBuf::from("data/synth/default");
        let mut scenarios: Vec<(PathBuf, String)> = BUILTIN_DEFAULT_SCENARIOS
            .iter()
            .map(|(name, text)| (dir.join("scenarios").join(name), (*text).to_owned()))
            .collect();
        scenarios.sort();
        Some(SeedFiles {
            surface: include_str!("../../../../data/synth/default/surface.toml").to_owned(),
            slots: Some(include_str!("../../../../data/synth/default/slots.toml").to_owned()),
            scenarios,
            dir,
        })
    }
}

impl Seeds {
    /// The conventional seed folder of a taxonomy: `<root>/data/synth/<taxonomy name>`.
    pub fn default_dir(root: &Path, taxonomy: &Taxonomy) -> PathBuf {
        root.join("data").join("synth").join(&taxonomy.name)
    }

    /// Number of scenarios.
    pub fn scenario_count(&self) -> usize {
        self.scenarios.len()
    }

    /// The languages every scenario is written in.
    pub fn langs(&self) -> Vec<String> {
        self.surface.keys().cloned().collect()
    }

    /// The folder the seeds were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads `dir/slots.toml`, `dir/surface.toml` and `dir/scenarios/*.toml` (in file-name
    /// order) and checks them against `taxonomy`.
    pub fn load(dir: &Path, taxonomy: &Taxonomy) -> Result<Self, DataError> {
        Self::from_files(SeedFiles::read(dir)?, taxonomy)
    }

    /// The seed material built into the binary for `taxonomy` (by its name; only `default`
    /// ships one), checked against it; `None` when there is none.
    pub fn builtin(taxonomy: &Taxonomy) -> Option<Result<Self, DataError>> {
        SeedFiles::builtin(&taxonomy.name).map(|files| Self::from_files(files, taxonomy))
    }

    /// Checks seed files (read from a folder or built in) against `taxonomy`.
    pub fn from_files(files: SeedFiles, taxonomy: &Taxonomy) -> Result<Self, DataError> {
        let SeedFiles {
            dir,
            surface: surface_text,
            slots: slots_text,
            scenarios: scenario_files,
        } = files;
        let dir = dir.as_path();
        // Surface first: it defines the languages.
        let surface_path = dir.join("surface.toml");
        let surface: BTreeMap<String, Surface> = parse_toml(&surface_path, &surface_text)?;
        if surface.is_empty() {
            return Err(seeds_err(
                &surface_path,
                "",
                "",
                "no languages: add a [en] table".into(),
            ));
        }
        let langs: Vec<String> = surface.keys().cloned().collect();
        for (lang, s) in &surface {
            let lists: [(&str, &Vec<String>); 8] = [
                ("greetings", &s.greetings),
                ("signoffs", &s.signoffs),
                ("chat_openers", &s.chat_openers),
                ("phone_notes", &s.phone_notes),
                ("manager_forwards", &s.manager_forwards),
                ("quoted_reply", &s.quoted_reply),
                ("follow_ups", &s.follow_ups),
                ("low_markers", &s.low_markers),
            ];
            for (name, list) in lists {
                if list.is_empty() {
                    return Err(seeds_err(
                        &surface_path,
                        &surface_text,
                        &format!("[{lang}]"),
                        format!("[{lang}] {name} is empty"),
                    ));
                }
            }
            for (name, list, needs_text) in [
                ("phone_notes", &s.phone_notes, true),
                ("manager_forwards", &s.manager_forwards, true),
                ("quoted_reply", &s.quoted_reply, false),
            ] {
                for t in list {
                    if needs_text && !t.contains("{text}") {
                        return Err(seeds_err(
                            &surface_path,
                            &surface_text,
                            t,
                            format!("[{lang}] {name}: {t:?} lacks {{text}}"),
                        ));
                    }
                    if uses_other_placeholders(t, &["{text}", "{colleague}"]) {
                        return Err(seeds_err(
                            &surface_path,
                            &surface_text,
                            t,
                            format!("[{lang}] {name}: {t:?} may only use {{text}} and {{colleague}}"),
                        ));
                    }
                }
            }
            for t in &s.injections {
                if !t.contains("{value}") || uses_other_placeholders(t, &["{field}", "{value}"]) {
                    return Err(seeds_err(
                        &surface_path,
                        &surface_text,
                        t,
                        format!("[{lang}] injections: {t:?} must use {{value}} and may use {{field}}, nothing else"),
                    ));
                }
            }
            if s.urgency.is_empty() {
                return Err(seeds_err(
                    &surface_path,
                    &surface_text,
                    &format!("[{lang}]"),
                    format!("[{lang}] has no [[{lang}.urgency]] markers"),
                ));
            }
        }

        // Slots: slots.toml, then every scenario file's [slots].
        let mut slots: Vec<Slot> = Vec::new();
        let slots_path = dir.join("slots.toml");
        if let Some(text) = &slots_text {
            let raw: RawSlotsFile = parse_toml(&slots_path, text)?;
            add_slots(&mut slots, raw.slots, &langs, &slots_path, text)?;
        }
        if scenario_files.is_empty() {
            return Err(DataError::Seeds {
                path: dir.join("scenarios"),
                line: None,
                message: "no scenario files (*.toml)".into(),
            });
        }
        let mut raw_files = Vec::new();
        for (path, text) in scenario_files {
            let raw: RawScenarioFile = parse_toml(&path, &text)?;
            let RawScenarioFile {
                slots: file_slots,
                scenario,
            } = raw;
            add_slots(&mut slots, file_slots, &langs, &path, &text)?;
            raw_files.push((path, text, scenario));
        }

        let mut scenarios = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for (path, text, raw_scenarios) in raw_files {
            for raw in raw_scenarios {
                let needle = format!("\"{}\"", raw.id);
                let err = |message: String| {
                    seeds_err(&path, &text, &needle, format!("scenario {:?}: {message}", raw.id))
                };
                if !ids.insert(raw.id.clone()) {
                    return Err(err(
                        "duplicate id; ids must be unique across all scenario files".into()
                    ));
                }
                let mut labels = Vec::new();
                let mut texts = BTreeMap::new();
                for (key, value) in &raw.rest {
                    if let Some(field) = taxonomy.field(key) {
                        let v = value
                            .as_str()
                            .ok_or_else(|| err(format!("{key} must be a string")))?;
                        if !field.has_value(v) {
                            return Err(err(format!("{key} = {v:?} is not a value of the taxonomy")));
                        }
                        labels.push((key.clone(), v.to_owned()));
                    } else if langs.contains(key) {
                        let list = value
                            .as_array()
                            .ok_or_else(|| err(format!("{key} must be a list of three texts")))?;
                        let arr = three_templates(list, &slots).map_err(|e| {
                            err(e.unwrap_or_else(|| {
                                format!(
                                    "{key} must have exactly three non-empty texts (chat, normal, detailed), has {}",
                                    list.len()
                                )
                            }))
                        })?;
                        texts.insert(key.clone(), arr);
                    } else {
                        return Err(err(format!(
                            "unknown key {key:?}: expected a taxonomy field, a language of surface.toml ({}), or id/summary/escalate/urgency/relax/weight",
                            langs.join(", ")
                        )));
                    }
                }
                for f in &taxonomy.fields {
                    if !labels.iter().any(|(k, _)| k == &f.name) {
                        return Err(err(format!("missing label {}", f.name)));
                    }
                }
                labels.sort_by_key(|(k, _)| taxonomy.fields.iter().position(|f| &f.name == k));
                for f in &taxonomy.fields {
                    if let Some(dep) = &f.dependency {
                        let parent = &labels.iter().find(|(k, _)| k == &dep.parent).expect("checked").1;
                        let child = &labels.iter().find(|(k, _)| k == &f.name).expect("checked").1;
                        if !f
                            .allowed_under(parent)
                            .is_some_and(|vs| vs.iter().any(|v| &v.name == child))
                        {
                            return Err(err(format!(
                                "{} {child:?} is not allowed under {} {parent:?}",
                                f.name, dep.parent
                            )));
                        }
                    }
                }
                for lang in &langs {
                    if !texts.contains_key(lang) {
                        return Err(err(format!("no texts for language {lang}")));
                    }
                }
                let (summary, summary_per_variant) = match &raw.summary {
                    toml::Value::String(one) => {
                        let t = parse_template(one, &slots).map_err(|e| err(e.to_string()))?;
                        ([t.clone(), t.clone(), t], false)
                    }
                    toml::Value::Array(list) => {
                        let arr = three_templates(list, &slots).map_err(|e| {
                            err(e.unwrap_or_else(|| {
                                format!(
                                    "summary must be one string or three non-empty strings (chat, normal, detailed), has {} entries",
                                    list.len()
                                )
                            }))
                        })?;
                        // A variant's summary may only state what its text says: every slot it
                        // fills must be one its text fills, in every language.
                        for (i, summary) in arr.iter().enumerate() {
                            for s in summary.slots() {
                                if let Some((lang, _)) =
                                    texts.iter().find(|(_, t)| !t[i].slots().any(|x| x == s))
                                {
                                    return Err(err(format!(
                                        "summary [{i}] uses {{{}}}, which the {lang} text [{i}] does not; a variant's summary may only state what its text says",
                                        slots[s].name
                                    )));
                                }
                            }
                        }
                        (arr, true)
                    }
                    _ => return Err(err("summary must be a string or a list of three strings".into())),
                };
                let weight = raw.weight.unwrap_or(2);
                if !(1..=5).contains(&weight) {
                    return Err(err(format!("weight {weight} is outside 1..=5")));
                }
                let is_request = labels
                    .iter()
                    .any(|(k, v)| k == "request_type" && v.to_lowercase().contains("request"));
                let escalate = raw.escalate.unwrap_or(true);
                let urgency = match (escalate, &raw.urgency) {
                    (false, _) => Vec::new(),
                    (true, Some(kinds)) => kinds.clone(),
                    (true, None) => UrgencyKind::DEFAULT.to_vec(),
                };
                scenarios.push(Scenario {
                    id: raw.id.clone(),
                    labels,
                    escalate: escalate && !urgency.is_empty(),
                    urgency,
                    relax: raw.relax.unwrap_or(is_request),
                    weight,
                    summary,
                    summary_per_variant,
                    texts,
                });
            }
        }
        let colleague_slot = slots.iter().position(|s| s.name == "colleague");
        Ok(Seeds {
            dir: dir.to_owned(),
            slots,
            surface,
            scenarios,
            colleague_slot,
        })
    }
}

/// Three templates (chat, normal, detailed) from a TOML list: `Err(None)` when the list does
/// not hold exactly three non-empty strings, `Err(Some(message))` for a template that does not
/// parse.
fn three_templates(list: &[toml::Value], slots: &[Slot]) -> Result<[Template; 3], Option<String>> {
    let strs: Vec<&str> = list.iter().filter_map(|v| v.as_str()).collect();
    if strs.len() != 3 || list.len() != 3 || strs.iter().any(|s| s.trim().is_empty()) {
        return Err(None);
    }
    let parsed: Vec<Template> = strs
        .iter()
        .map(|s| parse_template(s, slots).map_err(|e| Some(e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok(parsed.try_into().expect("three templates"))
}

fn add_slots(
    slots: &mut Vec<Slot>,
    raw: BTreeMap<String, Vec<RawSlotValue>>,
    langs: &[String],
    path: &Path,
    text: &str,
) -> Result<(), DataError> {
    for (name, values) in raw {
        let err = |m: String| seeds_err(path, text, &format!("{name} ="), format!("slot {name}: {m}"));
        if slots.iter().any(|s| s.name == name) {
            return Err(err(
                "defined twice; slot names are global across seed files".into()
            ));
        }
        if values.is_empty() {
            return Err(err("has no values".into()));
        }
        let mut out = Vec::new();
        for v in values {
            match v {
                RawSlotValue::Plain(s) => out.push(langs.iter().map(|l| (l.clone(), s.clone())).collect()),
                RawSlotValue::PerLang(m) => {
                    for l in langs {
                        if !m.contains_key(l) {
                            return Err(err(format!("a value lacks language {l}: {m:?}")));
                        }
                    }
                    out.push(m);
                }
            }
        }
        slots.push(Slot { name, values: out });
    }
    Ok(())
}

pub(crate) fn parse_template(text: &str, slots: &[Slot]) -> Result<Template, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(TemplateError::Unmatched {
                text: text.to_owned(),
            });
        }
        let close = rest[open..].find('}').ok_or_else(|| TemplateError::Unclosed {
            text: text.to_owned(),
        })? + open;
        let name = &rest[open + 1..close];
        let idx = slots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| TemplateError::UnknownSlot {
                name: name.to_owned(),
                text: text.to_owned(),
            })?;
        if open > 0 {
            pieces.push(Piece::Lit(rest[..open].to_owned()));
        }
        pieces.push(Piece::Slot(idx));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest.to_owned()));
    }
    Ok(Template { pieces })
}

/// Whether template `t` has a brace left once the `allowed` placeholders are taken out: a
/// placeholder the generator would not fill, or a stray brace.
fn uses_other_placeholders(t: &str, allowed: &[&str]) -> bool {
    let stripped = allowed.iter().fold(t.to_owned(), |t, p| t.replace(p, ""));
    stripped.contains('{') || stripped.contains('}')
}
