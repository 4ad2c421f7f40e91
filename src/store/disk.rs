//! The narrow door between the store and the filesystem.
//!
//! Everything the store and [`AtomicFile`](super::file::AtomicFile) do to a
//! disk goes through [`Disk`] and [`DiskFile`]: read a whole file, create
//! one, write at an offset, `fdatasync`, rename, `fsync` a directory. In
//! production that is [`RealDisk`]; in tests the power-cut model
//! (`store::powercut`) implements the same traits, remembers what was
//! synced, and loses power between any two calls. Keeping the door this
//! narrow is what lets the model stand for the real thing: every operation
//! whose durability matters is one call the model can cut.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A filesystem as the store uses it.
pub trait Disk: Send + Sync + fmt::Debug {
    /// The whole contents of `path`, `None` when it does not exist (a
    /// symbolic link to nothing is an error, not an absent file: writing
    /// would replace the link).
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Creates `path` empty (truncating it if it exists) and opens it for
    /// writing. Neither the name nor the data is durable until synced.
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Opens an existing `path` for writing in place.
    fn open(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Renames `from` over `to`; durable once the directory is synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Whether the filesystem holding `dir` has no block left for an
    /// unprivileged writer (`statvfs`: `f_bavail == 0`). Tally calls a volume
    /// in that state full even where it could still write (its counter file
    /// is allocated in advance; root may use reserved blocks): design.md §6
    /// wants a full volume seen at once, not when a write finally fails.
    fn is_full(&self, dir: &Path) -> io::Result<bool>;
}

/// An open file of a [`Disk`].
pub trait DiskFile: Send {
    /// Writes all of `data` at `offset` (`pwrite`), not yet durable.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every write so far durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
}

/// The machine's filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealDisk;

impl Disk for RealDisk {
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::read_link(path) {
                Ok(target) => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "it is a symbolic link to {}, which does not exist (restore the file, or replace the link with it)",
                        target.display()
                    ),
                )),
                Err(_) => Ok(None),
            },
            Err(e) => Err(e),
        }
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(RealFile(
            OpenOptions::new().write(true).open(path)?,
        )))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn is_full(&self, dir: &Path) -> io::Result<bool> {
        Ok(rustix::fs::statvfs(dir)?.f_bavail == 0)
    }
}

struct RealFile(File);

impl DiskFile for RealFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_disk_creates_writes_in_place_renames_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let disk = RealDisk;
        assert!(disk.read(&a).unwrap().is_none());
        let mut file = disk.create(&a).unwrap();
        file.write_at(0, b"hello world").unwrap();
        file.sync_data().unwrap();
        disk.open(&a).unwrap().write_at(6, b"there").unwrap();
        disk.rename(&a, &b).unwrap();
        disk.sync_dir(parent_dir(&b)).unwrap();
        assert_eq!(disk.read(&b).unwrap().unwrap(), b"hello there");
        assert!(disk.read(&a).unwrap().is_none());
        assert!(disk.open(&a).is_err());
        assert!(!disk.is_full(dir.path()).unwrap());
        assert!(disk.is_full(&dir.path().join("missing")).is_err());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        let err = disk.read(&link).unwrap_err().to_string();
        assert!(
            err.contains("symbolic link") && err.contains("nowhere"),
            "{err}"
        );
    }
}
