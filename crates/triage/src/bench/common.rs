//! What the benchmarks share: the incidents file, the machine line of report headers, peak
//! RSS and the sectioned Markdown report (`docs/benchmarks.md`).

use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

/// The `text` of each incident in a JSON array file (`tests/fixtures/incidents.json`).
pub fn read_incidents(path: &Path) -> anyhow::Result<Vec<String>> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))?;
    Ok(v.as_array()
        .context("incidents file must be a JSON array")?
        .iter()
        .filter_map(|i| i["text"].as_str().map(str::to_string))
        .collect())
}

/// This process's peak resident set (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// "N cores, CPU model; build profile P", for report headers.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "machine: {} cores, {cpu}; build profile `{}` (dependencies at opt-level 3 in both)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if cfg!(debug_assertions) { "dev" } else { "release" }
    )
}

/// Replaces the section `key` of the Markdown report `out` (between `<!-- begin key -->` and
/// `<!-- end key -->`; appended when absent), so each benchmark rewrites only its own part,
/// and writes `data` as `<out stem>-<key>.json` beside it. Both writes are atomic.
pub fn write_section<T: Serialize + ?Sized>(out: &Path, key: &str, md: &str, data: &T) -> anyhow::Result<()> {
    let (begin, end) = (format!("<!-- begin {key} -->"), format!("<!-- end {key} -->"));
    let old = match std::fs::read_to_string(out) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n\n".to_string(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", out.display())),
    };
    let block = format!("{begin}\n{}\n{end}", md.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &old[..a], &old[b + end.len()..]),
        _ => format!("{}\n\n{block}\n", old.trim_end()),
    };
    triage_data::atomic_write(out, new.as_bytes())?;
    let stem = out
        .file_stem()
        .map_or("benchmarks".into(), |s| s.to_string_lossy().into_owned());
    let json = out.with_file_name(format!("{stem}-{key}.json"));
    triage_data::atomic_write(&json, serde_json::to_string_pretty(data)?.as_bytes())?;
    Ok(())
}
