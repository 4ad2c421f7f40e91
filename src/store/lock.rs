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

/// What the holder line says once the store in the directory was opened:
/// the directory has held a counter (see [`DirLock::previous_served`]).
const SERVING: &str = " serving incarnation ";

/// Held while the process serves the directory.
#[derive(Debug)]
pub struct DirLock {
    /// Open for as long as the lock is held: closing it releases the lock.
    _file: File,
    /// The lock file, rewritten by [`serving`](Self::serving).
    path: PathBuf,
    /// This holder's line.
    me: String,
    /// What the previous holder had written, read under the lock.
    previous: String,
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
        let mut previous = String::new();
        // Unreadable text is no evidence of anything: the line is ours.
        let _ = file.read_to_string(&mut previous);
        let me = format!(
            "pid {} (pod {pod}) since unix time {}",
            std::process::id(),
            super::unix_now()
        );
        std::fs::write(&path, format!("{me}\n")).map_err(io)?;
        Ok(DirLock {
            _file: file,
            path,
            me,
            previous,
        })
    }

    /// Records in the lock file that this directory's counter, of
    /// `incarnation`, is open: a later start that finds no `visits.state`
    /// beside such a line knows the directory had one (design.md §6).
    /// Written only once the counter file exists, so a crash during a
    /// volume's very first start (lock taken, counter not yet written)
    /// leaves no such line and the next start initialises it as new.
    pub fn serving(&self, incarnation: &str) -> Result<(), LockError> {
        std::fs::write(&self.path, format!("{}{SERVING}{incarnation}\n", self.me)).map_err(
            |source| LockError::Io {
                path: self.path.clone(),
                source,
            },
        )
    }

    /// The incarnation an earlier process served here, if it said so.
    pub fn previous_served(&self) -> Option<&str> {
        let (_, incarnation) = self.previous.split_once(SERVING)?;
        Some(incarnation.trim())
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

    #[test]
    fn the_next_holder_learns_which_incarnation_was_served() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "tally-0").unwrap();
        assert_eq!(first.previous_served(), None);
        drop(first);
        // Taken but never served (a crash during the first start).
        assert_eq!(
            DirLock::acquire(dir.path(), "tally-0")
                .unwrap()
                .previous_served(),
            None
        );
        let second = DirLock::acquire(dir.path(), "tally-0").unwrap();
        second.serving("ab12").unwrap();
        drop(second);
        let third = DirLock::acquire(dir.path(), "tally-0").unwrap();
        assert_eq!(third.previous_served(), Some("ab12"));
    }
}
