//! Adapters on disk, in the Hugging Face PEFT layout:
//!
//! ```text
//! adapters/<name>/adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, ...
//! adapters/<name>/adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight ...
//! adapters/<name>/triage.json                taxonomy hash, base model sha256, prompt version, metrics
//! ```
//!
//! The directory is written under a temporary name and renamed into place, so a reader sees
//! the old adapter or the complete new one.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use triage_llm::lora::{Lora, LoraConfig, Target};
use triage_llm::qwen2::Config;

use crate::{file_err, TrainError};

/// Where the adapter applies: the tokens after the shared system prompt.
pub const ADAPTER_SCOPE: &str = "after-system-prompt";

/// `triage.json`: what the adapter was trained for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriageMeta {
    /// Format of this file.
    pub format: u32,
    /// Taxonomy name.
    pub taxonomy: String,
    /// [`triage_taxonomy::Taxonomy::content_hash`] of the taxonomy.
    pub taxonomy_hash: String,
    /// SHA-256 of the base GGUF.
    pub base_model_sha256: String,
    /// File name of the base GGUF.
    pub base_model_file: String,
    /// [`triage_infer::PROMPT_VERSION`] at training time.
    pub prompt_version: u32,
    /// [`ADAPTER_SCOPE`].
    pub scope: String,
    /// Training summary (steps, losses, accuracies).
    #[serde(default)]
    pub metrics: Value,
    /// The data files it was trained and validated on, by content (set by `triage train` and
    /// `triage serve`'s training jobs; absent in adapters of an older triage), so a report can
    /// check that a baseline was fitted on the same training file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<DataFile>,
}

/// One data file an adapter was trained or validated on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// `train`, `val`, or `dataset` (one file split into both, as `triage serve`'s training
    /// jobs split an upload).
    pub role: String,
    /// Its path as given to `triage train` (relative to where it ran), or the service's path
    /// of an uploaded dataset.
    pub file: String,
    /// SHA-256 of its bytes.
    pub sha256: String,
    /// How many examples it held.
    pub examples: usize,
}

impl TriageMeta {
    /// The metadata of an adapter trained now, with this build's prompt version and scope.
    pub fn new(
        taxonomy: &triage_taxonomy::Taxonomy,
        base_sha256: &str,
        base_file: &str,
        metrics: Value,
    ) -> Self {
        TriageMeta {
            format: 1,
            taxonomy: taxonomy.name.clone(),
            taxonomy_hash: taxonomy.content_hash(),
            base_model_sha256: base_sha256.to_owned(),
            base_model_file: base_file.to_owned(),
            prompt_version: triage_infer::PROMPT_VERSION,
            scope: ADAPTER_SCOPE.into(),
            metrics,
            data: Vec::new(),
        }
    }
}

/// A loaded adapter and its metadata.
pub struct LoadedAdapter {
    /// The weights.
    pub lora: Lora,
    /// `triage.json`.
    pub meta: TriageMeta,
    /// `adapter_config.json` as read.
    pub peft_config: Value,
}

/// The PEFT `adapter_config.json` for `config`.
pub fn peft_config(config: &LoraConfig, base_model: &str) -> Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "revision": null,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": config.layers,
        "layers_pattern": config.layers.as_ref().map(|_| "layers"),
    })
}

/// Writes the adapter directory atomically. An existing `dir` is replaced only when it is an
/// adapter folder (or empty): `--out adapters` instead of `--out adapters/x` must not delete
/// every adapter in it.
pub fn save(dir: &Path, lora: &Lora, base_model: &str, meta: &TriageMeta) -> Result<(), TrainError> {
    check_replaceable(dir)?;
    write_dir(dir, |tmp| {
        let write_json = |file: &str, v: &Value| -> Result<(), TrainError> {
            let p = tmp.join(file);
            std::fs::write(&p, serde_json::to_string_pretty(v).expect("json") + "\n")
                .map_err(|e| file_err(&p, e))
        };
        write_json("adapter_config.json", &peft_config(&lora.config, base_model))?;
        write_json(
            "triage.json",
            &serde_json::to_value(meta).expect("meta serialises"),
        )?;
        lora.save_safetensors(&tmp.join("adapter_model.safetensors"))?;
        Ok(())
    })
}

/// An error unless `dir` is absent, an empty folder or an adapter folder (it holds
/// `adapter_config.json` or `triage.json`): where [`save`] may write. Commands check it
/// before training, not only when the adapter is saved.
pub fn check_replaceable(dir: &Path) -> Result<(), TrainError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return match dir.exists() {
            true => Err(TrainError::Invalid(format!(
                "{}: exists and is not a folder; choose another adapter path",
                dir.display()
            ))),
            false => Ok(()),
        };
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let adapter = names
        .iter()
        .any(|n| n == "adapter_config.json" || n == "triage.json");
    match adapter || names.is_empty() {
        true => Ok(()),
        false => Err(TrainError::Invalid(format!(
            "{}: exists and is not an adapter folder (no adapter_config.json or triage.json), \
             so it is not replaced; give a new or adapter folder, e.g. {}",
            dir.display(),
            dir.join("my-adapter").display()
        ))),
    }
}

/// Flushes every file directly in `dir`, then `dir` itself, to disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type()?.is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    // Directories cannot be opened for syncing on every platform; the files are what matter.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a directory atomically: `fill` writes into a fresh temporary directory beside
/// `dir`, which is flushed to disk and then replaces `dir` (the old one is moved aside and
/// removed, or moved back if the swap fails), so a reader sees the old directory or the
/// complete new one, also after a crash.
pub(crate) fn write_dir(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(parent).map_err(|e| file_err(parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| TrainError::Invalid(format!("{}: not a directory name", dir.display())))?
        .to_string_lossy();
    let pid = std::process::id().to_string();
    let tmp = parent.join(swap_sibling(&name, "tmp", &pid));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    if let Err(e) = fill(&tmp).and_then(|()| sync_dir(&tmp).map_err(|e| file_err(&tmp, e))) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(swap_sibling(&name, "old", &pid));
    let _ = std::fs::remove_dir_all(&old);
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| file_err(dir, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(file_err(dir, e));
    }
    if let Ok(p) = std::fs::File::open(parent) {
        let _ = p.sync_all();
    }
    // Renamed out of `recover_dir`'s sight before its removal, so a kill in the middle of
    // the removal never leaves a half-deleted copy it could restore.
    let trash = parent.join(swap_sibling(&name, "trash", &pid));
    if had_old && std::fs::rename(&old, &trash).is_ok() {
        let _ = std::fs::remove_dir_all(&trash);
    }
    // Copies an earlier kill left aside are stale now: `recover_dir` must never bring one
    // back after `dir` is deleted on purpose.
    remove_stale(parent, &name);
    Ok(())
}

/// The folder `dir` sits in (`.` for a bare name).
fn parent_of(dir: &Path) -> &Path {
    dir.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The name of the sibling of folder `name` that [`write_dir`] uses in process `id`: `tmp`
/// (the new copy being written), `old` (the replaced one, moved aside) or `trash` (it, being
/// removed). With an empty `id`, the prefix every such sibling's name starts with.
fn swap_sibling(name: &str, kind: &str, id: &str) -> String {
    format!(".{name}.{kind}-{id}")
}

/// Removes what interrupted swaps of `parent/<name>` left: moved-aside old copies,
/// unfinished new ones and half-removed trash.
fn remove_stale(parent: &Path, name: &str) {
    let prefixes = ["old", "tmp", "trash"].map(|kind| swap_sibling(name, kind, ""));
    for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if prefixes.iter().any(|p| file.starts_with(p.as_str())) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Restores adapter folder `dir` when a kill between the two renames of its replacement
/// ([`save`]) left it only moved aside (see [`recover_dir`]); returns whether it was.
pub fn recover(dir: &Path) -> Result<bool, TrainError> {
    recover_dir(dir, "adapter_model.safetensors")
}

/// Puts back a directory that [`write_dir`] moved aside and did not replace: a kill between
/// its two renames leaves no `dir`, only the old one as `.<name>.old-<pid>` and the new one,
/// complete (it is synced before the swap), as `.<name>.tmp-<pid>`. The new one is restored
/// when it holds `required`, else the old one; a candidate without `required` (a removal
/// cut short) is never restored. Returns whether one was.
pub(crate) fn recover_dir(dir: &Path, required: &str) -> Result<bool, TrainError> {
    if dir.exists() {
        return Ok(false);
    }
    let Some(name) = dir.file_name().map(|n| n.to_string_lossy()) else {
        return Ok(false);
    };
    let parent = parent_of(dir);
    let old_prefix = swap_sibling(&name, "old", "");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(false);
    };
    let usable = |p: &Path| p.join(required).is_file();
    let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&old_prefix) else {
            continue;
        };
        let newer = parent.join(swap_sibling(&name, "tmp", pid));
        let pick = if usable(&newer) { newer } else { e.path() };
        if usable(&pick) {
            let time = std::fs::metadata(pick.join(required)).and_then(|m| m.modified());
            candidates.push((time.unwrap_or(std::time::UNIX_EPOCH), pick));
        }
    }
    match candidates.into_iter().max() {
        Some((_, from)) => {
            std::fs::rename(&from, dir).map_err(|e| file_err(&from, e))?;
            // The other copies are older: none may come back if `dir` is deleted later.
            remove_stale(parent, &name);
            tracing::warn!(
                "{} was missing (interrupted swap): restored from {}",
                dir.display(),
                from.display()
            );
            Ok(true)
        }
        None => Ok(false),
    }
}

fn read_json(path: &Path) -> Result<Value, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, format!("not valid JSON: {e}")))
}

/// Reads only `triage.json` (to check compatibility before loading any tensor).
pub fn read_meta(dir: &Path) -> Result<TriageMeta, TrainError> {
    let meta_path = dir.join("triage.json");
    serde_json::from_value(read_json(&meta_path)?).map_err(|e| file_err(&meta_path, e))
}

/// Reads an adapter directory for a model of shape `cfg`, checking names, shapes and values.
pub fn load(dir: &Path, cfg: &Config, device: &Device) -> Result<LoadedAdapter, TrainError> {
    let config_path = dir.join("adapter_config.json");
    let peft = read_json(&config_path)?;
    let bad = |m: String| file_err(&config_path, m);
    if peft["peft_type"] != "LORA" {
        return Err(bad(format!(
            "peft_type is {}, only LORA is supported",
            peft["peft_type"]
        )));
    }
    let rank = peft["r"]
        .as_u64()
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
    // The update is scaled by alpha / r in f32: an absurd ratio would turn every logit into
    // inf or NaN and every decision into the first allowed value, silently.
    let alpha = peft["lora_alpha"]
        .as_f64()
        .filter(|a| a.is_finite() && (a / rank as f64).abs() <= 1e4)
        .ok_or_else(|| bad("`lora_alpha` must be a number with |lora_alpha / r| ≤ 10000".into()))?;
    let targets: Vec<Target> = peft["target_modules"]
        .as_array()
        .ok_or_else(|| bad("`target_modules` must be a list".into()))?
        .iter()
        .map(|t| {
            t.as_str()
                .unwrap_or("")
                .parse::<Target>()
                .map_err(|e| bad(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    if peft["use_dora"] == true || peft["use_rslora"] == true {
        return Err(bad("DoRA / rsLoRA adapters are not supported".into()));
    }
    let layers = match &peft["layers_to_transform"] {
        Value::Null => None,
        Value::Number(n) => Some(vec![n
            .as_u64()
            .ok_or_else(|| bad("`layers_to_transform` must be layer numbers".into()))?
            as usize]),
        Value::Array(a) => Some(
            a.iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| bad("`layers_to_transform` must be a list of layer numbers".into()))?,
        ),
        other => {
            return Err(bad(format!(
                "`layers_to_transform` must be a list of layer numbers, not {other}"
            )))
        }
    };
    let config = LoraConfig {
        rank,
        alpha,
        dropout: peft["lora_dropout"].as_f64().unwrap_or(0.0),
        targets,
        layers,
    };
    let weights = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, device)
        .map_err(|e| file_err(&weights, format!("not a readable safetensors file: {e}")))?;
    let lora = Lora::from_peft_tensors(cfg, config, &tensors, device).map_err(|m| file_err(&weights, m))?;
    let meta_path = dir.join("triage.json");
    let meta: TriageMeta =
        serde_json::from_value(read_json(&meta_path)?).map_err(|e| file_err(&meta_path, e))?;
    if meta.scope != ADAPTER_SCOPE {
        return Err(file_err(
            &meta_path,
            format!(
                "scope {:?} is not supported (expected {ADAPTER_SCOPE:?})",
                meta.scope
            ),
        ));
    }
    Ok(LoadedAdapter {
        lora,
        meta,
        peft_config: peft,
    })
}

/// Checks that an adapter was trained on the base model whose GGUF has `base_sha256`.
pub fn check_base(meta: &TriageMeta, base_sha256: &str, dir: &Path) -> Result<(), TrainError> {
    if meta.base_model_sha256.is_empty() || meta.base_model_sha256 == base_sha256 {
        return Ok(());
    }
    Err(TrainError::Invalid(format!(
        "adapter {} was trained on base model {} (sha256 {}), not on the model in use (sha256 {}); pass --model {}",
        dir.display(),
        meta.base_model_file,
        short(&meta.base_model_sha256),
        short(base_sha256),
        meta.base_model_file.trim_end_matches(".gguf")
    )))
}

/// The first 12 characters of a hash for messages (characters, not bytes: the file's text is
/// not trusted to be hex).
fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

/// Loads the adapter in `dir` for inference on `model`, refusing one trained for another
/// taxonomy, base model (`base_sha256`) or prompt version.
pub fn load_checked(
    dir: &Path,
    taxonomy: &triage_taxonomy::Taxonomy,
    base_sha256: &str,
    model: &triage_llm::qwen2::Qwen2,
) -> Result<Lora, TrainError> {
    let meta = read_meta(dir)?;
    check_compatible(&meta, taxonomy, Some(base_sha256), dir)?;
    Ok(load(dir, model.config(), model.device())?.lora)
}

/// Checks that an adapter was trained for this taxonomy, base model and prompt version.
pub fn check_compatible(
    meta: &TriageMeta,
    taxonomy: &triage_taxonomy::Taxonomy,
    base_sha256: Option<&str>,
    dir: &Path,
) -> Result<(), TrainError> {
    let d = dir.display();
    if meta.taxonomy_hash != taxonomy.content_hash() {
        return Err(TrainError::Invalid(format!(
            "adapter {d} was trained for taxonomy {:?} (hash {}), not the taxonomy in use ({:?}, hash {}); pass the same --taxonomy or retrain",
            meta.taxonomy,
            short(&meta.taxonomy_hash),
            taxonomy.name,
            short(&taxonomy.content_hash())
        )));
    }
    if let Some(sha) = base_sha256 {
        check_base(meta, sha, dir)?;
    }
    if meta.prompt_version != triage_infer::PROMPT_VERSION {
        return Err(TrainError::Invalid(format!(
            "adapter {d} was trained with prompt version {}, this build uses {}; retrain it",
            meta.prompt_version,
            triage_infer::PROMPT_VERSION
        )));
    }
    Ok(())
}

/// The adapters in the immediate subfolders of `roots` that were trained for `taxonomy`, this
/// build's prompt version and a base model file named `base_file` (the base model's sha256 is
/// checked when one is loaded), sorted by folder name; unreadable and hidden folders are skipped.
pub fn find_compatible(
    roots: &[PathBuf],
    taxonomy: &triage_taxonomy::Taxonomy,
    base_file: &str,
) -> Vec<(PathBuf, TriageMeta)> {
    let hash = taxonomy.content_hash();
    let mut out: Vec<(PathBuf, TriageMeta)> = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        // Hidden folders are skipped: `.NAME.tmp-PID` is an adapter being written (or left
        // half-written by a crash), `.NAME.old-PID` one being replaced.
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for dir in dirs {
            let Ok(meta) = read_meta(&dir) else {
                continue;
            };
            if meta.taxonomy_hash == hash
                && meta.prompt_version == triage_infer::PROMPT_VERSION
                && meta.base_model_file == base_file
                && meta.scope == ADAPTER_SCOPE
                && !out
                    .iter()
                    .any(|(d, _)| d.file_name() == dir.file_name() && same_file(d, &dir))
            {
                out.push((dir, meta));
            }
        }
    }
    out
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hashes in a `triage.json` are not trusted to be hex: a mismatch with non-ASCII
    /// hashes is a message, not a panic at a byte that splits a character.
    #[test]
    fn mismatches_with_non_ascii_hashes_are_errors_not_panics() {
        let taxonomy = triage_taxonomy::Taxonomy::builtin_default();
        let mut meta = TriageMeta::new(&taxonomy, "x€€€€€€€", "m.gguf", Value::Null);
        let dir = Path::new("adapters/x");
        let e = check_base(&meta, "0123456789abcdef", dir)
            .unwrap_err()
            .to_string();
        // Byte 12 falls inside the fourth "€".
        assert!(
            e.contains("x€€€€€€€") && e.contains("sha256 0123456789ab)"),
            "{e}"
        );
        meta.taxonomy_hash = "x€€€€€€€".into();
        let e = check_compatible(&meta, &taxonomy, None, dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x€€€€€€€") && e.contains("adapters/x"), "{e}");
    }

    /// `--out adapters` (the folder of every adapter) is refused, not replaced; an adapter
    /// folder is replaced atomically, a failed write leaves it and no temporary folder
    /// behind, and adapter discovery skips hidden (temporary) folders.
    #[test]
    fn only_adapter_folders_are_replaced_and_failed_writes_leave_no_trace() {
        let root = std::env::temp_dir().join(format!("triage-adapter-replace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let many = root.join("adapters");
        std::fs::create_dir_all(many.join("a")).unwrap();
        std::fs::write(many.join("a/triage.json"), "{}").unwrap();
        let e = check_replaceable(&many).unwrap_err().to_string();
        assert!(
            e.contains("not an adapter folder") && e.contains("adapters"),
            "{e}"
        );
        assert!(many.join("a/triage.json").exists());
        let file = root.join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(check_replaceable(&file).is_err());
        assert!(check_replaceable(&root.join("new")).is_ok());
        let one = many.join("a");
        assert!(check_replaceable(&one).is_ok());
        write_dir(&one, |tmp| {
            std::fs::write(tmp.join("triage.json"), "new").map_err(|e| file_err(tmp, e))
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(one.join("triage.json")).unwrap(), "new");
        let e = write_dir(&one, |tmp| {
            std::fs::write(tmp.join("triage.json"), "half").unwrap();
            Err(TrainError::Invalid("disk full".into()))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(one.join("triage.json")).unwrap(), "new");
        let left: Vec<_> = std::fs::read_dir(&many)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("a")]);
        // A half-written adapter from a crash is not a candidate.
        let taxonomy = triage_taxonomy::Taxonomy::builtin_default();
        let meta = TriageMeta::new(&taxonomy, "s", "m.gguf", Value::Null);
        let hidden = many.join(".b.tmp-1");
        std::fs::create_dir_all(&hidden).unwrap();
        std::fs::write(hidden.join("triage.json"), serde_json::to_string(&meta).unwrap()).unwrap();
        assert!(read_meta(&hidden).is_ok());
        assert!(find_compatible(std::slice::from_ref(&many), &taxonomy, "m.gguf").is_empty());
        std::fs::rename(&hidden, many.join("b")).unwrap();
        assert_eq!(
            find_compatible(std::slice::from_ref(&many), &taxonomy, "m.gguf").len(),
            1
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
