//! The data folder's disk quota and retention rule.
//!
//! Uploaded datasets (`datasets/`), training runs (`runs/<job>/`: checkpoints, frozen-layer
//! features, metrics) and adapters (`adapters/<job>/`) under
//! [`crate::ServeConfig::data_dir`] share one quota ([`crate::ServeConfig::disk_quota_bytes`]).
//! Before anything is written, [`make_room`] checks that it fits under the quota and on the
//! file system (with [`FS_MARGIN`] left free); if not, the retention rule deletes, oldest
//! first, the run directories of jobs that are not running, then adapters that no taxonomy
//! serves and no job is writing. Datasets and the active adapter are never deleted. When even
//! that would not make room, nothing is deleted and the answer is 507 with the figures
//! ([`QuotaError`]).
//!
//! Every file is written to a temporary name and renamed into place, and a write that fails
//! (a full disk included) removes what it wrote; [`sweep`] removes the temporaries a crashed or
//! failed writer left (at startup and after a failed job).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use triage_llm::qwen2::Config;
use triage_train::admission::fmt_bytes;
use triage_train::trainer::TrainConfig;

use crate::error::ApiError;
use crate::state::AppState;

/// Bytes always left free on the data folder's file system.
pub const FS_MARGIN: u64 = 64 << 20;

/// The subfolders the quota covers.
const AREAS: [&str; 3] = ["datasets", "runs", "adapters"];

/// Serialises everything that writes under the data folder's quota or deletes from it
/// (uploads, job admission, retention, adapter activation).
#[derive(Default)]
pub(crate) struct Disk(Mutex<()>);

/// Proof that the disk lock is held.
pub(crate) type DiskGuard<'a> = MutexGuard<'a, ()>;

impl Disk {
    /// Waits for the lock.
    pub(crate) fn lock(&self) -> DiskGuard<'_> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Something does not fit on disk, even after the retention rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct QuotaError {
    /// What was refused (`the upload`, `training job job-1-2`).
    pub what: String,
    /// Bytes it needs.
    pub need: u64,
    /// Bytes the data folder holds now (a running job's remaining reservation included).
    pub used: u64,
    /// The quota.
    pub quota: u64,
    /// Free bytes on the file system (less [`FS_MARGIN`]) when that is what binds.
    pub fs_free: Option<u64>,
    /// Bytes the retention rule could free.
    pub evictable: u64,
    /// The data folder.
    pub dir: PathBuf,
}

impl std::fmt::Display for QuotaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not enough disk space: {} needs {}, but the data folder {} holds {} of its {} quota",
            self.what,
            fmt_bytes(self.need),
            self.dir.display(),
            fmt_bytes(self.used),
            fmt_bytes(self.quota)
        )?;
        if let Some(free) = self.fs_free {
            write!(f, " and its file system has {} free", fmt_bytes(free))?;
        }
        write!(
            f,
            "; removing every finished run and unused adapter would free only {}. Nothing was \
             deleted or written: delete datasets you no longer need under {}, or start the server \
             with a higher --disk-quota",
            fmt_bytes(self.evictable),
            self.dir.join("datasets").display()
        )
    }
}

/// Data that does not fit on disk: 507 `insufficient_storage` with the figures in bytes.
impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> Self {
        tracing::warn!("refused: {e}");
        ApiError::new(
            axum::http::StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            e.to_string(),
        )
        .with("need_bytes", e.need)
        .with("used_bytes", e.used)
        .with("quota_bytes", e.quota)
    }
}

/// Bytes under `p` (files counted by length, links not followed).
pub(crate) fn tree_size(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(p)
        .map(|it| it.flatten().map(|e| tree_size(&e.path())).sum())
        .unwrap_or(0)
}

/// Bytes the quota counts under `data_dir`.
pub(crate) fn usage(data_dir: &Path) -> u64 {
    AREAS.iter().map(|a| tree_size(&data_dir.join(a))).sum()
}

/// Free bytes for an unprivileged writer on the file system holding `dir` (or its nearest
/// existing ancestor); `None` when unknown.
#[cfg(unix)]
pub(crate) fn fs_free(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir.ancestors().find(|p| p.exists())?;
    let existing = match existing.as_os_str().is_empty() {
        true => Path::new("."),
        false => existing,
    };
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs; the struct is
    // read only when the call reports success, which means it was filled in.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Free bytes: unknown off Unix.
#[cfg(not(unix))]
pub(crate) fn fs_free(_dir: &Path) -> Option<u64> {
    None
}

/// A directory the retention rule may delete.
#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    /// The job it belongs to (its directory name).
    job: String,
    bytes: u64,
    is_run: bool,
}

/// What the retention rule may delete, in the order it deletes: run directories of jobs not
/// running (oldest first), then adapters no taxonomy serves and no job writes (oldest first).
fn candidates(s: &AppState) -> Vec<Candidate> {
    let running = s.jobs.running_id();
    let active: Vec<String> = s
        .desks()
        .iter()
        .filter_map(|d| d.engine().adapter.clone())
        .collect();
    let mut out = Vec::new();
    for (area, is_run) in [("runs", true), ("adapters", false)] {
        let Ok(entries) = std::fs::read_dir(s.config.data_dir.join(area)) else {
            continue;
        };
        let mut found: Vec<(std::time::SystemTime, Candidate)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let meta = e.metadata().ok()?;
                let keep = name.starts_with('.')
                    || !meta.is_dir()
                    || running.as_deref() == Some(name.as_str())
                    || (!is_run && active.contains(&name));
                if keep {
                    return None;
                }
                let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                Some((
                    modified,
                    Candidate {
                        bytes: tree_size(&e.path()),
                        path: e.path(),
                        job: name,
                        is_run,
                    },
                ))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.job.cmp(&b.1.job)));
        out.extend(found.into_iter().map(|(_, c)| c));
    }
    out
}

/// Makes room for `need` more bytes under the quota and on the file system, deleting per the
/// retention rule only when that suffices; otherwise deletes nothing and refuses. The disk
/// lock must be held (`_guard`) from here until the bytes are written.
pub(crate) fn make_room(
    s: &AppState,
    _guard: &DiskGuard<'_>,
    need: u64,
    what: &str,
) -> Result<(), QuotaError> {
    let dir = &s.config.data_dir;
    let quota = s.config.disk_quota_bytes;
    let used = usage(dir) + s.jobs.pending_bytes(dir);
    let fs_free = fs_free(dir).map(|f| f.saturating_sub(FS_MARGIN));
    let over_quota = used.saturating_add(need).saturating_sub(quota);
    let over_fs = fs_free.map_or(0, |f| need.saturating_sub(f));
    let short = over_quota.max(over_fs);
    if short == 0 {
        return Ok(());
    }
    let cands = candidates(s);
    let evictable: u64 = cands.iter().map(|c| c.bytes).sum();
    if evictable < short {
        return Err(QuotaError {
            what: what.to_owned(),
            need,
            used,
            quota,
            fs_free: (over_fs > over_quota).then_some(fs_free.unwrap_or(0)),
            evictable,
            dir: dir.clone(),
        });
    }
    let mut freed = 0;
    for c in cands {
        if freed >= short {
            break;
        }
        match std::fs::remove_dir_all(&c.path) {
            Ok(()) => {
                freed += c.bytes;
                tracing::info!(
                    "disk quota: removed {} ({}) to make room for {what}",
                    c.path.display(),
                    fmt_bytes(c.bytes)
                );
                s.jobs.evicted(dir, &c.job, c.is_run);
            }
            Err(e) => tracing::warn!("disk quota: cannot remove {}: {e}", c.path.display()),
        }
    }
    match freed >= short {
        true => Ok(()),
        false => Err(QuotaError {
            what: what.to_owned(),
            need,
            used: used.saturating_sub(freed),
            quota,
            fs_free: None,
            evictable: 0,
            dir: dir.clone(),
        }),
    }
}

/// The process id in a temporary's name, `Some(None)` for a temporary without one, `None` for
/// a regular name. Temporaries are `.<name>.tmp-<pid>` and `.<name>.old-<pid>` (atomic files
/// and directories), `<name>.tmp<pid>` (frozen-layer features) and `<name>.tmp` (optimizer
/// state inside a temporary checkpoint).
fn temporary(name: &str) -> Option<Option<u32>> {
    if name.starts_with('.') {
        for mark in [".tmp-", ".old-"] {
            if let Some(i) = name.rfind(mark) {
                return Some(name[i + mark.len()..].parse().ok());
            }
        }
    }
    let ext = Path::new(name).extension()?.to_str()?;
    let digits = ext.strip_prefix("tmp")?;
    match digits {
        "" => Some(None),
        d => d.parse().ok().map(Some),
    }
}

/// Whether process `pid` is alive (another process may share the data folder).
fn alive(pid: u32) -> bool {
    pid != std::process::id() && Path::new("/proc").join(pid.to_string()).exists()
}

/// Puts back what a writer killed between the two renames of an atomic folder swap left,
/// which [`sweep`] would otherwise remove as a dead writer's temporaries: the old copy moved
/// aside and the complete new one beside it (`.X.old-<pid>` and `.X.tmp-<pid>`, no `X`), for
/// a run's checkpoint (`runs/<job>/checkpoint`) and an adapter (`adapters/<name>`). Only when
/// that writer is gone and no live one has a swap of `X` in flight; a lone old copy (a finished
/// swap whose folder was deleted since, as quota eviction does) is not brought back. Called at
/// start-up, before the first sweep. Returns the folders restored.
pub fn recover_swaps(data_dir: &Path) -> Vec<PathBuf> {
    let mut restored = Vec::new();
    let mut restore = |dir: PathBuf, r: Result<bool, triage_train::TrainError>| match r {
        Ok(true) => restored.push(dir),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot restore {}: {e}", dir.display()),
    };
    let runs = std::fs::read_dir(data_dir.join("runs"))
        .into_iter()
        .flatten()
        .flatten();
    for run in runs.map(|e| e.path()) {
        if cut_swaps(&run).iter().any(|n| n == "checkpoint") {
            let r = triage_train::trainer::recover_checkpoint(&run);
            restore(triage_train::trainer::checkpoint_dir(&run), r);
        }
    }
    let adapters = data_dir.join("adapters");
    for name in cut_swaps(&adapters) {
        let dir = adapters.join(&name);
        let r = triage_train::adapter::recover(&dir);
        restore(dir, r);
    }
    restored
}

/// The names `X` in `dir` of swaps cut between their two renames: no `X`, and `.X.old-<pid>`
/// beside `.X.tmp-<pid>` of one writer that is gone, with no swap of `X` by a live one.
fn cut_swaps(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut swaps: std::collections::HashMap<String, Vec<(&'static str, u32)>> = Default::default();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix('.') else {
            continue;
        };
        for kind in ["old", "tmp"] {
            if let Some((x, pid)) = rest.rsplit_once(&format!(".{kind}-")) {
                if let Ok(pid) = pid.parse() {
                    swaps.entry(x.to_owned()).or_default().push((kind, pid));
                }
            }
        }
    }
    swaps
        .into_iter()
        .filter(|(x, parts)| {
            !dir.join(x).exists()
                && parts.iter().all(|(_, pid)| !alive(*pid))
                && parts
                    .iter()
                    .any(|(k, pid)| *k == "old" && parts.contains(&("tmp", *pid)))
        })
        .map(|(x, _)| x)
        .collect()
}

/// Removes temporaries under the data folder that no live writer owns: those of dead
/// processes, and this process's own except those of the running job `skip_job` (uploads hold
/// the disk lock while they write, so none is in flight). Returns what was removed.
pub(crate) fn sweep(data_dir: &Path, _guard: &DiskGuard<'_>, skip_job: Option<&str>) -> Vec<PathBuf> {
    fn walk(dir: &Path, skip: &dyn Fn(&Path, &str) -> bool, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if skip(&path, &name) {
                continue;
            }
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            match temporary(&name) {
                Some(pid) if !pid.is_some_and(alive) => {
                    let r = match is_dir {
                        true => std::fs::remove_dir_all(&path),
                        false => std::fs::remove_file(&path),
                    };
                    match r {
                        Ok(()) => out.push(path),
                        Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
                    }
                }
                _ if is_dir => walk(&path, skip, out),
                _ => {}
            }
        }
    }
    let skip = |path: &Path, name: &str| match skip_job {
        None => false,
        Some(job) => {
            let in_runs = path.parent().is_some_and(|p| p.ends_with("runs"));
            let in_adapters = path.parent().is_some_and(|p| p.ends_with("adapters"));
            (in_runs && name == job)
                || (in_adapters && (name == job || name.starts_with(&format!(".{job}."))))
        }
    };
    let mut out = Vec::new();
    for a in AREAS {
        walk(&data_dir.join(a), &skip, &mut out);
    }
    for p in &out {
        tracing::info!("removed the leftover temporary {}", p.display());
    }
    out
}

/// What a training job may write: its adapter, checkpoints (adapter and two AdamW moments,
/// old and new side by side while one is written), the frozen layers' output for `rows`
/// examples of at most `max_tokens` tokens when the adapter sits on the top layers only, and
/// 1 MiB of metrics and plots.
pub(crate) fn job_disk_bytes(config: &TrainConfig, cfg: &Config, rows: usize) -> u64 {
    let lora = config.lora(cfg.num_layers);
    let adapted = (0..cfg.num_layers).filter(|&l| lora.has_layer(l)).count() as u64;
    let params: u64 = lora
        .targets
        .iter()
        .map(|t| {
            let (a, b) = t.dims(cfg);
            (lora.rank * (a + b)) as u64
        })
        .sum::<u64>()
        * adapted;
    let adapter = params * 4;
    let checkpoints = adapter * 3 * 2;
    let features = match config.first_layer(cfg.num_layers) {
        0 => 0,
        _ => (rows as u64 + 1) * (config.max_tokens * cfg.hidden_size * 4) as u64,
    };
    (adapter + checkpoints + features).saturating_add(1 << 20)
}

/// Whether an I/O failure means the disk (or the user's disk quota) is full.
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_recognised_by_name() {
        assert_eq!(temporary(".ds-0a.jsonl.tmp-1234"), Some(Some(1234)));
        assert_eq!(temporary(".job-1-2.tmp-77"), Some(Some(77)));
        assert_eq!(temporary(".checkpoint.old-9"), Some(Some(9)));
        assert_eq!(temporary("0badc0de.tmp4321"), Some(Some(4321)));
        assert_eq!(temporary("0badc0de.l3.tmp4321"), Some(Some(4321)));
        assert_eq!(temporary("optimizer.tmp"), Some(None));
        for keep in [
            "ds-0a.jsonl",
            "ds-0a.json",
            "0badc0de.f32",
            "0badc0de.l3.f32",
            "metrics.jsonl",
            "checkpoint",
            "job-1-2",
            "adapter_model.safetensors",
            "x.tmpl",
        ] {
            assert_eq!(temporary(keep), None, "{keep}");
        }
    }

    #[test]
    fn sweeping_removes_dead_writers_temporaries_only() {
        let d = std::env::temp_dir().join(format!("triage-disk-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let me = std::process::id();
        let dead = 999_999_999u32;
        let files = [
            format!("datasets/.ds-1.jsonl.tmp-{dead}"),
            format!("datasets/.ds-2.jsonl.tmp-{me}"),
            // pid 1 is alive: another process's write in flight.
            "datasets/.ds-3.jsonl.tmp-1".to_owned(),
            "datasets/ds-4.jsonl".to_owned(),
            format!("runs/job-1/features/ab.tmp{dead}"),
            "runs/job-1/features/ab.f32".to_owned(),
            format!("runs/job-1/.checkpoint.tmp-{dead}/optimizer.tmp"),
            format!("runs/job-2/features/cd.tmp{me}"),
            format!("adapters/.job-1.tmp-{dead}/adapter_config.json"),
            format!("adapters/.job-2.tmp-{me}/adapter_config.json"),
            "adapters/job-1/adapter_config.json".to_owned(),
        ];
        for f in &files {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let disk = Disk::default();
        // job-2 is running: its temporaries are writes in flight.
        let removed = sweep(&d, &disk.lock(), Some("job-2"));
        assert_eq!(removed.len(), 5, "{removed:?}");
        let exists = |f: &str| d.join(f).exists();
        assert!(!exists(&files[0]) && !exists(&files[1]) && !exists(&files[4]));
        assert!(!exists(&format!("runs/job-1/.checkpoint.tmp-{dead}")));
        assert!(!exists(&format!("adapters/.job-1.tmp-{dead}")));
        for keep in [2, 3, 5, 7, 9, 10] {
            assert!(exists(&files[keep]), "{} was removed", files[keep]);
        }
        // Once the job is over, its leftovers go too.
        let removed = sweep(&d, &disk.lock(), None);
        assert_eq!(removed.len(), 2, "{removed:?}");
        std::fs::remove_dir_all(d).unwrap();
    }

    /// A kill between a swap's two renames leaves the complete new copy and the old one aside,
    /// and nothing under the real name: start-up puts the new one back before the sweep, which
    /// would remove both. A live writer's swap is left alone.
    #[test]
    fn a_swap_cut_short_is_restored_before_the_sweep() {
        let d = std::env::temp_dir().join(format!("triage-disk-swap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let dead = 999_999_999u32;
        for (f, body) in [
            (format!("runs/job-3/.checkpoint.old-{dead}/state.json"), "old"),
            (format!("runs/job-3/.checkpoint.tmp-{dead}/state.json"), "new"),
            (
                format!("adapters/.job-3.old-{dead}/adapter_model.safetensors"),
                "old",
            ),
            (
                format!("adapters/.job-3.tmp-{dead}/adapter_model.safetensors"),
                "new",
            ),
            // A lone old copy: a finished swap whose folder was deleted since (evicted).
            (
                format!("adapters/.job-5.old-{dead}/adapter_model.safetensors"),
                "old",
            ),
            // pid 1 is alive: a swap in flight.
            ("runs/job-4/.checkpoint.old-1/state.json".to_owned(), "old"),
            ("runs/job-4/.checkpoint.tmp-1/state.json".to_owned(), "new"),
        ] {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let restored = recover_swaps(&d);
        assert_eq!(restored.len(), 2, "{restored:?}");
        let read = |f: &str| std::fs::read_to_string(d.join(f)).ok();
        assert_eq!(read("runs/job-3/checkpoint/state.json").as_deref(), Some("new"));
        assert_eq!(
            read("adapters/job-3/adapter_model.safetensors").as_deref(),
            Some("new")
        );
        assert!(!d.join("runs/job-4/checkpoint").exists() && !d.join("adapters/job-5").exists());
        // Left: the lone old copy, a dead writer's temporary, which the sweep removes.
        let removed = sweep(&d, &Disk::default().lock(), None);
        assert_eq!(removed, vec![d.join(format!("adapters/.job-5.old-{dead}"))]);
        assert_eq!(read("runs/job-3/checkpoint/state.json").as_deref(), Some("new"));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn sizes_add_up_over_the_three_areas_only() {
        let d = std::env::temp_dir().join(format!("triage-disk-size-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for (p, n) in [
            ("datasets/a.jsonl", 100),
            ("runs/job-1/features/x.f32", 1000),
            ("adapters/job-1/adapter_model.safetensors", 10),
            ("elsewhere/big", 100_000),
        ] {
            let f = d.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, vec![0u8; n]).unwrap();
        }
        assert_eq!(usage(&d), 1110);
        assert_eq!(tree_size(&d.join("nope")), 0);
        assert!(fs_free(&d.join("not/yet/created")).is_some_and(|f| f > 0) || cfg!(not(unix)));
        std::fs::remove_dir_all(d).unwrap();
    }
}
