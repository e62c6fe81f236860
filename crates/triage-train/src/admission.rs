//! Admission control: bounds on user-controlled sizes, and whether the memory a job is about
//! to allocate is there.
//!
//! * [`LimitError`]: a size or rate outside its bounds, naming the field, the bound and how to
//!   change it ([`crate::trainer::TrainConfig::check`] and the HTTP service's limits).
//! * [`MemoryBudget`]: what this process may still allocate: `MemAvailable` from
//!   `/proc/meminfo`, or the headroom under the tightest cgroup limit on the process (v2
//!   `memory.max`/`memory.high` minus `memory.current`, v1 `memory.limit_in_bytes` minus
//!   `memory.usage_in_bytes`, usage counted without the reclaimable inactive file cache, over
//!   the process's cgroup and each ancestor), whichever is smaller. [`Probe`] reads those
//!   files under any root, so tests give it sample trees.
//! * [`admit`]: an estimate against a budget, minus what must stay free (a server's requests);
//!   [`MemoryError`] carries the figures. [`admit_training`] is `triage train`'s check, on the
//!   `--dry-run` estimate, before the model is loaded.
//!
//! The estimates themselves are [`crate::memory::estimate`]'s; [`training_estimate`] builds
//! its inputs as `triage train --dry-run` does, for a server whose model is already loaded.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use triage_llm::qwen2::Config;

use crate::memory::{estimate, MemoryEstimate, MemoryInputs};
use crate::trainer::{Objective, TrainConfig};

/// A user-controlled size or rate outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value} is out of bounds (allowed: {limit}); {hint}")]
pub struct LimitError {
    /// The field as the user wrote it (`rank`, `optimizer.lr`, `--max-new-tokens`, `rows`).
    pub field: String,
    /// The value given.
    pub value: String,
    /// The allowed range, e.g. `1..=64`.
    pub limit: String,
    /// What to do: the value to send, and the flag or key that moves the bound.
    pub hint: String,
}

impl LimitError {
    /// `field = value` outside `limit`; `hint` says what to do.
    pub fn new(
        field: &str,
        value: impl fmt::Display,
        limit: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        LimitError {
            field: field.to_owned(),
            value: value.to_string(),
            limit: limit.into(),
            hint: hint.into(),
        }
    }

    /// `Ok` when `min <= value <= max`, else the error with the range `min..=max`.
    pub fn check_range(
        field: &str,
        value: usize,
        min: usize,
        max: usize,
        hint: impl FnOnce() -> String,
    ) -> Result<(), LimitError> {
        match (min..=max).contains(&value) {
            true => Ok(()),
            false => Err(LimitError::new(field, value, format!("{min}..={max}"), hint())),
        }
    }
}

/// How much memory a process may use: detected, given, or not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryLimit {
    /// The cgroup limit or `MemAvailable`, whichever is tighter (see the module docs).
    #[default]
    Auto,
    /// No check (the estimate is known to be wrong for this setup).
    Off,
    /// The process may use this many bytes in all, what it holds already included (a limit
    /// of its own, like a cgroup's), whatever the machine says.
    Bytes(u64),
}

impl FromStr for MemoryLimit {
    type Err = SizeError;

    /// `auto`, `off`, or a size such as `6G`, `512MiB`, `1.5GB` (see [`parse_size`]).
    fn from_str(s: &str) -> Result<Self, SizeError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(MemoryLimit::Auto),
            "off" | "none" => Ok(MemoryLimit::Off),
            other => parse_size(other).map(MemoryLimit::Bytes),
        }
    }
}

impl fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryLimit::Auto => f.write_str("auto"),
            MemoryLimit::Off => f.write_str("off"),
            MemoryLimit::Bytes(b) => f.write_str(&fmt_bytes(*b)),
        }
    }
}

/// A text that is not a byte size (`--memory-limit`, `--disk-quota`, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a size: use e.g. 512M, 6G or 1.5GiB (powers of 1024), or a number of bytes")]
pub struct SizeError {
    /// The text given.
    pub input: String,
}

/// Parses a byte size: a number with an optional suffix `B`, `K`, `M`, `G`, `T` (also `KB`,
/// `KiB`, … — every suffix is a power of 1024), e.g. `6G`, `512MiB`, `1.5gb`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || SizeError { input: s.to_owned() };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = n * (1u64 << shift) as f64;
    match bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64 {
        true => Ok(bytes as u64),
        false => Err(bad()),
    }
}

/// `1536 MiB` → `"1.5 GiB"`: one decimal, binary units.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{b} B"),
        _ => format!("{v:.1} {}", UNITS[u]),
    }
}

/// What the process may still allocate, and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes.
    pub available: u64,
    /// E.g. `MemAvailable in /proc/meminfo` or `cgroup v2 /sys/fs/cgroup/memory.max (limit
    /// 8.0 GiB, 6.2 GiB in use)`.
    pub source: String,
}

impl MemoryBudget {
    /// The budget on this machine ([`Probe`] at `/`); `None` when nothing can be read (not
    /// Linux).
    pub fn detect() -> Option<MemoryBudget> {
        Probe::new("/").budget()
    }

    /// The budget `limit` sets: detected, the given size less what the process holds already
    /// (its source names `flag`), or `None` for [`MemoryLimit::Off`] and when detection finds
    /// nothing.
    pub fn resolve(limit: MemoryLimit, flag: &str) -> Option<MemoryBudget> {
        match limit {
            MemoryLimit::Off => None,
            MemoryLimit::Bytes(b) => {
                let rss = Probe::new("/").resident().unwrap_or(0);
                Some(MemoryBudget {
                    available: b.saturating_sub(rss),
                    source: format!("{flag} {} less {} resident", fmt_bytes(b), fmt_bytes(rss)),
                })
            }
            MemoryLimit::Auto => {
                let b = MemoryBudget::detect();
                if b.is_none() {
                    tracing::warn!(
                        "cannot tell how much memory is available (no /proc/meminfo): not checking"
                    );
                }
                b
            }
        }
    }
}

/// A job refused because its estimated memory does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct MemoryError {
    /// What was refused, e.g. `training (rank 8, batch 1, 256 tokens)`.
    pub what: String,
    /// Its estimated peak, bytes.
    pub need: u64,
    /// What the process may allocate, bytes.
    pub available: u64,
    /// Kept free for other work (a server's requests), bytes.
    pub reserve: u64,
    /// Where `available` comes from.
    pub origin: String,
    /// What to do.
    pub hint: String,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not enough memory: {} needs an estimated {}, but ",
            self.what,
            fmt_bytes(self.need)
        )?;
        match self.reserve {
            0 => write!(f, "{} is available ({})", fmt_bytes(self.available), self.origin)?,
            r => write!(
                f,
                "{} is free for it ({} available, {}; {} kept for serving)",
                fmt_bytes(self.available.saturating_sub(r)),
                fmt_bytes(self.available),
                self.origin,
                fmt_bytes(r)
            )?,
        }
        write!(f, "; {}", self.hint)
    }
}

/// `Ok` when `need` fits in `budget` with `reserve` left over; otherwise the figures.
pub fn admit(
    what: &str,
    need: u64,
    reserve: u64,
    budget: &MemoryBudget,
    hint: &str,
) -> Result<(), MemoryError> {
    match need.saturating_add(reserve) <= budget.available {
        true => Ok(()),
        false => Err(MemoryError {
            what: what.to_owned(),
            need,
            available: budget.available,
            reserve,
            origin: budget.source.clone(),
            hint: hint.to_owned(),
        }),
    }
}

/// `triage train`'s check: the whole `--dry-run` estimate (weights included: nothing is
/// loaded yet) against the budget `limit` sets (`--memory-limit`).
pub fn admit_training(
    est: &MemoryEstimate,
    config: &TrainConfig,
    limit: MemoryLimit,
) -> Result<(), MemoryError> {
    let Some(budget) = MemoryBudget::resolve(limit, "--memory-limit") else {
        return Ok(());
    };
    admit(
        &training_what(config),
        est.total,
        0,
        &budget,
        "lower --rank, --batch-size or `max_tokens`, set `top_layers` or `checkpointing = true` \
         (`triage train --dry-run` lists the parts), or pass --memory-limit SIZE (or off) if \
         this machine really has more",
    )
}

/// `training (rank R, batch B, T tokens, adapter on …)` for messages.
pub fn training_what(c: &TrainConfig) -> String {
    format!(
        "training (rank {}, batch {}, {} tokens, {})",
        c.rank,
        c.batch_size,
        c.max_tokens,
        match c.top_layers {
            0 => "every layer".to_owned(),
            k => format!("top {k} layers"),
        }
    )
}

/// The `--dry-run` estimate for `config` on a model of shape `cfg` whose weights take
/// `weight_bytes` (0 for a process that holds them already) and whose adapted layers hold
/// `repackable_bytes` in types candle repacks (`Qwen2::repackable_bytes`), with the real
/// system-prompt length `prefix_len`: the inputs `triage train --dry-run` uses (sequences of
/// `max_tokens`, at most 256), for a server whose model is loaded.
pub fn training_estimate(
    cfg: &Config,
    weight_bytes: u64,
    repackable_bytes: u64,
    config: &TrainConfig,
    prefix_len: usize,
) -> MemoryEstimate {
    estimate(&MemoryInputs {
        weight_bytes,
        repackable_bytes,
        lora: config.lora(cfg.num_layers),
        cfg: cfg.clone(),
        batch: config.batch_size,
        seq_len: config.max_tokens.min(256),
        prefix_len,
        logit_positions: match config.objective {
            Objective::Tokens => 96,
            Objective::Decisions => 40,
        },
        checkpointing: config.checkpointing,
        head_chunk: config.head_chunk,
        dense_weights: config.dense_weights,
        composed_ops: config.composed_ops,
    })
}

/// Reads memory figures from `/proc` and the cgroup file systems under a root (`/` on a real
/// machine, a sample tree in tests).
#[derive(Debug, Clone)]
pub struct Probe {
    root: PathBuf,
}

/// A cgroup file system mount: version, the cgroup path at its root, and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// 1 or 2.
    pub version: u8,
    /// The cgroup the mount's root shows (`/` unless a container mounted a subtree).
    pub root: String,
    /// Mount point, e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/memory`.
    pub mount_point: String,
}

impl Probe {
    /// A probe of the files under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Probe { root: root.into() }
    }

    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn read(&self, p: &Path) -> Option<String> {
        std::fs::read_to_string(p).ok()
    }

    /// The process's resident memory (`VmRSS` in `/proc/self/status`).
    pub fn resident(&self) -> Option<u64> {
        self.read(&self.path("/proc/self/status"))
            .and_then(|t| status_rss(&t))
    }

    /// The tighter of `MemAvailable` and every cgroup's headroom; `None` when neither can be
    /// read.
    pub fn budget(&self) -> Option<MemoryBudget> {
        let mut best = self
            .read(&self.path("/proc/meminfo"))
            .and_then(|t| meminfo_available(&t))
            .map(|available| MemoryBudget {
                available,
                source: "MemAvailable in /proc/meminfo".into(),
            });
        for b in self.cgroup_budgets() {
            if best.as_ref().is_none_or(|x| b.available < x.available) {
                best = Some(b);
            }
        }
        best
    }

    /// The headroom under each memory limit on this process's cgroups (and their ancestors).
    pub fn cgroup_budgets(&self) -> Vec<MemoryBudget> {
        let (Some(cgroup), Some(mountinfo)) = (
            self.read(&self.path("/proc/self/cgroup")),
            self.read(&self.path("/proc/self/mountinfo")),
        ) else {
            return Vec::new();
        };
        let mounts = cgroup_mounts(&mountinfo);
        let mut out = Vec::new();
        for (version, path) in process_cgroups(&cgroup) {
            for m in mounts.iter().filter(|m| m.version == version) {
                let mount = self.path(&m.mount_point);
                // Inside a container without a cgroup namespace the process's path includes
                // the mount's root; with one it is relative to it already.
                let rel = match m.root.as_str() {
                    "/" => path.as_str(),
                    r => path.strip_prefix(r).unwrap_or(path.as_str()),
                };
                let mut dir = mount.join(rel.trim_start_matches('/'));
                if !dir.is_dir() {
                    dir = mount.clone();
                }
                loop {
                    if let Some(b) = self.cgroup_dir_budget(version, &dir, &m.mount_point, &mount) {
                        out.push(b);
                    }
                    if dir == mount || !dir.pop() || !dir.starts_with(&mount) {
                        break;
                    }
                }
            }
        }
        out
    }

    /// The headroom under one cgroup directory's limit, `None` without a limit.
    fn cgroup_dir_budget(
        &self,
        version: u8,
        dir: &Path,
        mount_point: &str,
        mount: &Path,
    ) -> Option<MemoryBudget> {
        let read = |f: &str| self.read(&dir.join(f));
        let (limit, usage, inactive, file) = match version {
            2 => {
                let max = read("memory.max").and_then(|t| limit_value(&t));
                let high = read("memory.high").and_then(|t| limit_value(&t));
                let limit = match (max, high) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }?;
                let file = if high.is_some_and(|h| h == limit) {
                    "memory.high"
                } else {
                    "memory.max"
                };
                let usage = read("memory.current").and_then(|t| t.trim().parse::<u64>().ok())?;
                let inactive = read("memory.stat").and_then(|t| stat_value(&t, "inactive_file"));
                (limit, usage, inactive, file)
            }
            _ => {
                let limit = read("memory.limit_in_bytes").and_then(|t| limit_value(&t))?;
                let usage = read("memory.usage_in_bytes").and_then(|t| t.trim().parse::<u64>().ok())?;
                let inactive = read("memory.stat").and_then(|t| {
                    stat_value(&t, "total_inactive_file").or_else(|| stat_value(&t, "inactive_file"))
                });
                (limit, usage, inactive, "memory.limit_in_bytes")
            }
        };
        let used = usage.saturating_sub(inactive.unwrap_or(0));
        let shown = Path::new(mount_point).join(dir.strip_prefix(mount).unwrap_or(Path::new("")));
        Some(MemoryBudget {
            available: limit.saturating_sub(used),
            source: format!(
                "cgroup v{version} {} (limit {}, {} in use)",
                shown.join(file).display(),
                fmt_bytes(limit),
                fmt_bytes(used)
            ),
        })
    }
}

/// `MemAvailable` in bytes from `/proc/meminfo` text.
pub fn meminfo_available(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let mut it = rest.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        match it.next() {
            Some("kB") | None => n.checked_mul(1024),
            Some(_) => None,
        }
    })
}

/// `VmRSS` in bytes from `/proc/<pid>/status` text.
pub fn status_rss(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.strip_prefix("VmRSS:")?.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        n.checked_mul(1024)
    })
}

/// A cgroup limit file's value: bytes, or `None` for `max` and v1's "no limit" (≥ 2^60).
pub fn limit_value(text: &str) -> Option<u64> {
    let t = text.trim();
    match t {
        "max" | "" => None,
        _ => t.parse::<u64>().ok().filter(|&v| v < (1u64 << 60)),
    }
}

/// The value of `key` in a `memory.stat` file.
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then_some(())?;
        it.next()?.parse().ok()
    })
}

/// The process's memory cgroups from `/proc/self/cgroup`: `(2, path)` for the unified
/// hierarchy, `(1, path)` for the v1 hierarchy with the `memory` controller.
pub fn process_cgroups(text: &str) -> Vec<(u8, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (id, controllers, path) = (it.next()?, it.next()?, it.next()?);
            match (id, controllers) {
                ("0", "") => Some((2, path.to_owned())),
                (_, c) if c.split(',').any(|x| x == "memory") => Some((1, path.to_owned())),
                _ => None,
            }
        })
        .collect()
}

/// The cgroup mounts in `/proc/self/mountinfo` text: every `cgroup2` mount, and `cgroup` (v1)
/// mounts with the `memory` controller.
pub fn cgroup_mounts(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split_whitespace().collect();
            let post: Vec<&str> = post.split_whitespace().collect();
            let (root, mount_point) = (*pre.get(3)?, *pre.get(4)?);
            let version = match *post.first()? {
                "cgroup2" => 2,
                "cgroup" if post.get(2)?.split(',').any(|o| o == "memory") => 1,
                _ => return None,
            };
            Some(CgroupMount {
                version,
                root: unescape_mount(root),
                mount_point: unescape_mount(mount_point),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // A byte value: `\000` to `\377` (above, e.g. `\400`, it is not an escape).
        let byte = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::try_from(d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'))).ok());
        match (b[i], byte) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24683584 kB\nMemFree:        20024812 kB\nMemAvailable:   22117068 kB\nBuffers:            6016 kB\n";

    /// A v1 host like the reference machine: every controller its own mount, no limit on the
    /// process's memory cgroup.
    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "9:name=systemd:/\n4:memory:/process_api/e95c\n1:cpu:/\n0::/\n";

    const MOUNTINFO_V2: &str = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn tree(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("triage-admission-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (p, text) in files {
            let f = root.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, text).unwrap();
        }
        root
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("6G"), Ok(6 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5gb"), Ok(3 << 29));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size(" 64 k "), Ok(64 << 10));
        for bad in ["", "G", "-1G", "1X", "1..2G", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!("auto".parse(), Ok(MemoryLimit::Auto));
        assert_eq!("OFF".parse(), Ok(MemoryLimit::Off));
        assert_eq!("2G".parse(), Ok(MemoryLimit::Bytes(2 << 30)));
        assert_eq!(fmt_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(fmt_bytes(100), "100 B");
        assert_eq!(MemoryLimit::Bytes(512 << 20).to_string(), "512.0 MiB");
    }

    #[test]
    fn meminfo_and_cgroup_files_parse() {
        assert_eq!(meminfo_available(MEMINFO), Some(22_117_068 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        assert_eq!(
            status_rss("Name:\ttriage\nVmHWM:\t  90000 kB\nVmRSS:\t   85276 kB\n"),
            Some(85_276 * 1024)
        );
        assert_eq!(status_rss("Name:\ttriage\n"), None);
        assert_eq!(limit_value("max\n"), None);
        assert_eq!(limit_value("9223372036854771712\n"), None);
        assert_eq!(limit_value("8589934592\n"), Some(8 << 30));
        assert_eq!(limit_value("garbage"), None);
        let stat = "cache 7938048\nrss 77422592\ninactive_file 4354048\ntotal_inactive_file 5000\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(4_354_048));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(5000));
        assert_eq!(stat_value(stat, "active_file"), None);
        assert_eq!(
            process_cgroups(CGROUP_V1),
            vec![(1, "/process_api/e95c".to_owned()), (2, "/".to_owned())]
        );
        assert_eq!(
            cgroup_mounts(MOUNTINFO_V1),
            vec![
                CgroupMount {
                    version: 1,
                    root: "/".into(),
                    mount_point: "/sys/fs/cgroup/memory".into()
                },
                CgroupMount {
                    version: 2,
                    root: "/".into(),
                    mount_point: "/sys/fs/cgroup/unified".into()
                },
            ]
        );
        assert_eq!(unescape_mount(r"/a\040b\134c"), r"/a b\c");
        // Not byte values: kept as written (no overflow), as is a short or non-octal escape.
        assert_eq!(unescape_mount(r"/a\400b\777\09\04"), r"/a\400b\777\09\04");
    }

    #[test]
    fn without_a_cgroup_limit_mem_available_is_the_budget() {
        let root = tree(
            "v1-none",
            &[
                ("/proc/meminfo", MEMINFO),
                ("/proc/self/cgroup", CGROUP_V1),
                ("/proc/self/mountinfo", MOUNTINFO_V1),
                (
                    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
                ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "4503588864\n"),
                (
                    "/sys/fs/cgroup/memory/process_api/e95c/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
                (
                    "/sys/fs/cgroup/memory/process_api/e95c/memory.usage_in_bytes",
                    "85360640\n",
                ),
            ],
        );
        let b = Probe::new(&root).budget().unwrap();
        assert_eq!(b.available, 22_117_068 * 1024);
        assert_eq!(b.source, "MemAvailable in /proc/meminfo");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_cgroup_v1_limit_on_an_ancestor_binds_less_the_inactive_file_cache() {
        let root = tree(
            "v1-limit",
            &[
                ("/proc/meminfo", MEMINFO),
                ("/proc/self/cgroup", CGROUP_V1),
                ("/proc/self/mountinfo", MOUNTINFO_V1),
                (
                    "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
                    "4294967296\n",
                ),
                (
                    "/sys/fs/cgroup/memory/process_api/memory.usage_in_bytes",
                    "1073741824\n",
                ),
                (
                    "/sys/fs/cgroup/memory/process_api/memory.stat",
                    "cache 300000000\ntotal_inactive_file 268435456\n",
                ),
                (
                    "/sys/fs/cgroup/memory/process_api/e95c/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
                (
                    "/sys/fs/cgroup/memory/process_api/e95c/memory.usage_in_bytes",
                    "85360640\n",
                ),
            ],
        );
        let b = Probe::new(&root).budget().unwrap();
        // 4 GiB limit, 1 GiB charged of which 256 MiB is reclaimable file cache.
        assert_eq!(b.available, (4 << 30) - (1 << 30) + (256 << 20));
        assert!(
            b.source
                .contains("cgroup v1 /sys/fs/cgroup/memory/process_api/memory.limit_in_bytes"),
            "{}",
            b.source
        );
        assert!(b.source.contains("limit 4.0 GiB"), "{}", b.source);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_cgroup_v2_limit_binds_and_the_tighter_of_max_and_high_counts() {
        let files = |max: &'static str, high: &'static str| {
            vec![
                ("/proc/meminfo", MEMINFO),
                ("/proc/self/cgroup", "0::/system.slice/triage.service\n"),
                ("/proc/self/mountinfo", MOUNTINFO_V2),
                ("/sys/fs/cgroup/system.slice/triage.service/memory.max", max),
                ("/sys/fs/cgroup/system.slice/triage.service/memory.high", high),
                (
                    "/sys/fs/cgroup/system.slice/triage.service/memory.current",
                    "2147483648\n",
                ),
                (
                    "/sys/fs/cgroup/system.slice/triage.service/memory.stat",
                    "anon 1879048192\nfile 268435456\ninactive_file 134217728\n",
                ),
                ("/sys/fs/cgroup/system.slice/memory.max", "max\n"),
                ("/sys/fs/cgroup/system.slice/memory.current", "9000000000\n"),
            ]
        };
        let root = tree("v2", &files("6442450944\n", "max\n"));
        let b = Probe::new(&root).budget().unwrap();
        assert_eq!(b.available, (6 << 30) - (2 << 30) + (128 << 20));
        assert!(
            b.source.starts_with(
                "cgroup v2 /sys/fs/cgroup/system.slice/triage.service/memory.max (limit 6.0 GiB"
            ),
            "{}",
            b.source
        );
        std::fs::remove_dir_all(&root).unwrap();
        let root = tree("v2-high", &files("6442450944\n", "4294967296\n"));
        let b = Probe::new(&root).budget().unwrap();
        assert_eq!(b.available, (4 << 30) - (2 << 30) + (128 << 20));
        assert!(b.source.contains("memory.high"), "{}", b.source);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_container_without_a_cgroup_namespace_reads_its_mount_root() {
        // The mount shows the container's own cgroup at its root; /proc/self/cgroup the full
        // host path.
        let root = tree(
            "docker",
            &[
                ("/proc/meminfo", MEMINFO),
                ("/proc/self/cgroup", "0::/docker/abc123\n"),
                (
                    "/proc/self/mountinfo",
                    "26 30 0:24 /docker/abc123 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n",
                ),
                ("/sys/fs/cgroup/memory.max", "1073741824\n"),
                ("/sys/fs/cgroup/memory.current", "536870912\n"),
            ],
        );
        let b = Probe::new(&root).budget().unwrap();
        assert_eq!(b.available, 512 << 20);
        assert!(b.source.contains("/sys/fs/cgroup/memory.max"), "{}", b.source);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn nothing_readable_is_no_budget_and_this_machine_has_one() {
        assert_eq!(Probe::new("/nonexistent-triage-root").budget(), None);
        if cfg!(target_os = "linux") {
            let b = MemoryBudget::detect().expect("Linux has /proc/meminfo");
            assert!(b.available > 0, "{b:?}");
            let rss = Probe::new("/").resident().expect("Linux has /proc/self/status");
            let given = MemoryBudget::resolve(MemoryLimit::Bytes(rss + (1 << 30)), "--memory-limit").unwrap();
            assert!(
                given.available <= 1 << 30 && given.available > 512 << 20,
                "{given:?}"
            );
        }
        assert_eq!(MemoryBudget::resolve(MemoryLimit::Off, "--memory-limit"), None);
    }

    #[test]
    fn admission_refuses_with_the_figures() {
        let budget = MemoryBudget {
            available: 8 << 30,
            source: "MemAvailable in /proc/meminfo".into(),
        };
        assert!(admit("x", 6 << 30, 1 << 30, &budget, "h").is_ok());
        let e = admit("training (rank 8)", 6 << 30, 3 << 30, &budget, "lower the rank").unwrap_err();
        assert_eq!(
            e.to_string(),
            "not enough memory: training (rank 8) needs an estimated 6.0 GiB, but 5.0 GiB is free \
             for it (8.0 GiB available, MemAvailable in /proc/meminfo; 3.0 GiB kept for serving); \
             lower the rank"
        );
        assert!(admit("x", u64::MAX, 1, &budget, "h").is_err());
        // Off: nothing to compare with.
        let est = training_estimate(&Config::tiny(), 1 << 20, 0, &TrainConfig::default(), 100);
        assert!(admit_training(&est, &TrainConfig::default(), MemoryLimit::Off).is_ok());
        let e = admit_training(&est, &TrainConfig::default(), MemoryLimit::Bytes(1 << 20)).unwrap_err();
        assert_eq!(e.need, est.total);
        assert!(e.to_string().contains("--memory-limit 1.0 MiB less"), "{e}");
        assert!(e.to_string().contains("rank 8"), "{e}");
    }

    #[test]
    fn the_training_configuration_check_names_each_bound() {
        assert!(TrainConfig::default().check().is_ok());
        let limit = |f: &dyn Fn(&mut TrainConfig)| {
            let mut c = TrainConfig::default();
            f(&mut c);
            match c.check() {
                Err(crate::TrainError::Limit(e)) => e,
                other => panic!("{other:?}"),
            }
        };
        let e = limit(&|c| c.set_rank(2_000_000));
        assert_eq!((e.field.as_str(), e.limit.as_str()), ("rank", "1..=512"));
        let text = crate::TrainError::Limit(e).to_string();
        assert!(
            text.starts_with("train config: rank = 2000000 is out of bounds (allowed: 1..=512); pass --rank"),
            "{text}"
        );
        assert_eq!(limit(&|c| c.set_rank(0)).field, "rank");
        assert_eq!(limit(&|c| c.steps = 0).field, "steps");
        assert_eq!(limit(&|c| c.steps = 2_000_000).field, "steps");
        assert_eq!(limit(&|c| c.batch_size = 1000).field, "batch_size");
        assert_eq!(limit(&|c| c.grad_accum = 5000).field, "grad_accum");
        assert_eq!(limit(&|c| c.max_tokens = 10_000).field, "max_tokens");
        assert_eq!(limit(&|c| c.head_chunk = 0).field, "head_chunk");
        for lr in [0.0, -1e-3, 5.0, f64::NAN, f64::INFINITY] {
            let e = limit(&|c| c.optimizer.lr = lr);
            assert_eq!(
                (e.field.as_str(), e.limit.as_str()),
                ("optimizer.lr", "a number in (0, 1]"),
                "{lr}"
            );
        }
    }

    #[test]
    fn the_estimate_grows_with_the_rank() {
        let c = TrainConfig::default();
        let mut big = c.clone();
        big.set_rank(512);
        let a = training_estimate(&Config::tiny(), 0, 0, &c, 100);
        let b = training_estimate(&Config::tiny(), 0, 0, &big, 100);
        assert!(b.lora_and_optimizer > 32 * a.lora_and_optimizer, "{a:?} {b:?}");
    }
}
