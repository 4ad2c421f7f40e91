//! The data directory's lock: one serving process per volume.
//!
//! `tally.lock` in the data directory is `flock`ed (exclusive, non-blocking)
//! for the life of the process; the kernel drops the lock when the process
//! ends, however it ends, so a stale lock cannot outlive a crash. The
//! holder writes who it is into the file, so a second process can name it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "tally.lock";

/// Why the directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the data directory {dir} is in use by another tally process ({holder}); two processes \
         must never serve one volume: stop the other one, or give this one its own --data-dir"
    )]
    Held { dir: PathBuf, holder: String },
    #[error("cannot lock {path}: {source} (check the volume mount and its permissions)")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held while the process serves the directory.
#[derive(Debug)]
pub struct DirLock {
    /// Open for as long as the lock is held: closing it releases the lock.
    _file: File,
}

impl DirLock {
    /// Locks `dir` for this process, which serves it as `pod`.
    pub fn acquire(dir: &Path, pod: &str) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // The lock is held through a read-only descriptor (flock needs no
        // write access), so the volume can still be remounted read-only.
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let mut file = File::open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "it has not written its name yet".to_string(),
                    who => who.to_string(),
                };
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let me = format!(
            "pid {} (pod {pod}) since unix time {}\n",
            std::process::id(),
            super::unix_now()
        );
        std::fs::write(&path, me).map_err(io)?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "tally-0").unwrap();
        // A second open file description is what a second process has.
        let err = DirLock::acquire(dir.path(), "tally-1")
            .unwrap_err()
            .to_string();
        let me = format!("pid {} (pod tally-0)", std::process::id());
        assert!(err.contains(&me) && err.contains("in use"), "{err}");
        drop(first);
        DirLock::acquire(dir.path(), "tally-1").unwrap();
    }
}
