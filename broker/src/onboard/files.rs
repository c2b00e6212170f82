//! The file handling of onboarding: a lock so that two commands never edit the registry at once,
//! whole-file replacement (write a temporary file, sync, rename), private directories, and
//! undoing what a failed command had already created.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn file_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// An exclusive lock on `<registry>.lock` (the operating system's file lock), held while a
/// command edits the registry. The system releases it when the command exits, however it exits
/// — a `kill -9` leaves no stale lock behind. The file itself stays (removing it while another
/// command waits to open it would let two commands lock two different files).
pub(super) struct Lock {
    _file: std::fs::File,
}

impl Lock {
    pub(super) fn take(registry: &Path) -> Result<Lock> {
        let mut name = registry.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| file_err(&path, e))?;
        match file.try_lock() {
            Ok(()) => {
                // For whoever looks: which process holds it.
                let _ = file.set_len(0);
                let _ = writeln!(file, "{}", std::process::id());
                Ok(Lock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Onboard(format!(
                "{} is locked: another onboarding command is running; try again when it is done",
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(file_err(&path, e)),
        }
    }
}

/// Replaces `path` with `bytes` at once: a temporary file beside it, synced, renamed over it.
/// `mode` applies to a new file; an existing file keeps its mode.
pub(super) fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Onboard(format!("{} is not a file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(mode);
            opts.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts.open(&tmp).map_err(|e| file_err(&tmp, e))?;
        f.write_all(bytes).map_err(|e| file_err(&tmp, e))?;
        f.sync_all().map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))?;
        // The rename is durable only once the directory is.
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes `dir`'s entries (a rename, a new file) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| file_err(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates `dir` (and its parents) if needed; a directory it creates is private (0700).
pub(super) fn private_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| file_err(dir, e))
}

/// Fails if `path` exists (a secret is never overwritten).
pub(super) fn must_not_exist(path: &Path, hint: &str) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(Error::Onboard(format!(
            "{} already exists: {hint}",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_err(path, e)),
    }
}

/// Moves `from` to `to`, refusing to replace an existing `to`.
pub(super) fn rename_new(from: &Path, to: &Path) -> Result<()> {
    std::fs::hard_link(from, to).map_err(|e| file_err(to, e))?;
    std::fs::remove_file(from).map_err(|e| file_err(from, e))
}

/// Files a command created, removed again unless the command [`commit`](Undo::commit)s.
#[derive(Default)]
pub(super) struct Undo {
    created: Vec<PathBuf>,
}

impl Undo {
    pub(super) fn created(&mut self, path: PathBuf) {
        self.created.push(path);
    }

    pub(super) fn commit(mut self) {
        self.created.clear();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        for path in self.created.iter().rev() {
            let _ = std::fs::remove_file(path);
        }
    }
}
