//! Small private JSON files (OAuth access tokens, account lookups) that outlive one CLI run.
//!
//! The folder is created `0700` and every file is written `0600` (owner only) through a
//! temporary file and an atomic rename, under an exclusive lock on a `.lock` sidecar so two
//! processes never lose each other's entries. A file that cannot be read, does not parse, or
//! is readable by group or others is ignored with a warning (it is overwritten with `0600`
//! on the next write), never fatal: the cache only saves requests.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ConnectorError;

/// A private JSON map file: `{"<key>": <value>, ...}`.
#[derive(Debug, Clone)]
pub(crate) struct PrivateFile {
    path: PathBuf,
}

impl PrivateFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        PrivateFile { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> ConnectorError {
        ConnectorError::Cache {
            path: self.path.clone(),
            message: format!(
                "{what}: {e}; check the permissions of the folder or pass another cache directory"
            ),
        }
    }

    /// The entries, or an empty map when the file is missing, unreadable or too open.
    pub(crate) fn read<V: DeserializeOwned>(&self) -> BTreeMap<String, V> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
            Err(e) => {
                tracing::warn!(
                    "{}: cannot read the cache ({e}); ignoring it",
                    self.path.display()
                );
                return BTreeMap::new();
            }
        };
        if !owner_only(&self.path) {
            tracing::warn!(
                "{}: readable by group or others; ignoring it (it is rewritten with mode 0600)",
                self.path.display()
            );
            return BTreeMap::new();
        }
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("{}: not a cache file ({e}); ignoring it", self.path.display());
            BTreeMap::new()
        })
    }

    /// The `<file>.<name>` sidecar, opened for locking (created `0600` in a private folder).
    fn lock_file(&self, name: &str) -> Result<File, ConnectorError> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        create_private_dir(dir).map_err(|e| self.err("cannot create the folder", e))?;
        private_options()
            .write(true)
            .truncate(false)
            .open(sidecar(&self.path, name))
            .map_err(|e| self.err("cannot open the lock file", e))
    }

    /// Waits for, then holds until the returned file is dropped, an exclusive lock on the
    /// `<file>.<name>` sidecar (another one than [`PrivateFile::update`]'s, which may be taken
    /// while this is held): for work that several processes should do once, such as a token
    /// refresh. The wait can be cancelled ([`lock_when_free`]).
    pub(crate) async fn hold(&self, name: &str) -> Result<File, ConnectorError> {
        let file = self.lock_file(name)?;
        lock_when_free(file, &self.path)
            .await
            .map_err(|e| self.err("cannot lock", e))
    }

    /// Reads the map, lets `f` change it, and writes it back, all under the file's lock.
    pub(crate) fn update<V: DeserializeOwned + Serialize>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, V>),
    ) -> Result<(), ConnectorError> {
        let lock = self.lock_file("lock")?;
        lock.lock().map_err(|e| self.err("cannot lock", e))?;
        let mut map = self.read::<V>();
        f(&mut map);
        let tmp = sidecar(&self.path, &format!("tmp-{}", std::process::id()));
        let result = (|| -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut file = private_options().write(true).create_new(true).open(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(&map).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        drop(lock);
        result.map_err(|e| self.err("cannot write", e))
    }
}

/// Takes an exclusive lock on `file` once no other process or handle holds it, polling every
/// 50 ms with an async sleep: the wait can be cancelled (Ctrl-C drops the future), which a
/// blocking `lock()` on a blocking-pool thread could not be. Says once, at info level, that it
/// is waiting and for what.
pub(crate) async fn lock_when_free(file: File, what: &Path) -> std::io::Result<File> {
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !said {
                    tracing::info!("waiting for another process to release {}", what.display());
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// `<file>.<suffix>` beside `path`.
pub(crate) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// Create options with mode `0600` on Unix.
fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

/// `create_dir_all`, with the last folder `0700` when this call creates it.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Whether only the owner may read the file (always true off Unix).
fn owner_only(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        File::open(path)
            .and_then(|f| f.metadata())
            .map(|m| m.permissions().mode() & 0o077 == 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("triage-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn files_are_private_and_updates_keep_other_entries() {
        let dir = scratch("private");
        let f = PrivateFile::new(dir.join("sub/cache.json"));
        f.update::<String>(|m| {
            m.insert("a".into(), "1".into());
        })
        .unwrap();
        f.update::<String>(|m| {
            m.insert("b".into(), "2".into());
        })
        .unwrap();
        let m = f.read::<String>();
        assert_eq!(m.len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(f.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
            let dmode = std::fs::metadata(dir.join("sub")).unwrap().permissions().mode();
            assert_eq!(dmode & 0o777, 0o700, "{dmode:o}");
            // A file others can read is not trusted.
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(f.read::<String>().is_empty());
        }
        // Garbage is ignored, not fatal.
        std::fs::write(f.path(), "not json").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(f.read::<String>().is_empty());
    }
}
