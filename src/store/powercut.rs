//! The power-cut model: a [`Disk`] that remembers what was synced, and
//! what a power cut at any point would have left.
//!
//! Every operation is appended to a log and applied to a model filesystem
//! that keeps, per file, what a process sees (`current`) and what survives a
//! power cut (`durable`), and likewise for directory entries. `fdatasync`
//! makes a file's data durable, a directory `fsync` its entries. To cut the
//! power after the first `k` operations, a test replays them ([`replay`])
//! and asks what survives ([`Fs::cut`]) under one of three [`Cut`]s:
//! unsynced data dropped; dropped but the last write torn (a prefix of it
//! reached the platter); or everything written back except the last write,
//! torn. A failed `fdatasync` behaves as Linux does: the dirty data stays
//! visible but is marked clean, so only a rewrite makes it durable.
//!
//! The model also stalls: [`ModelDisk::stall`] blocks every `fdatasync`
//! until [`ModelDisk::resume`], a hung disk for the store's tests.
//!
//! Any file layer built on [`Disk`] runs over it: the store's committer and
//! [`AtomicFile`](super::file::AtomicFile) (`peers.state`).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::disk::{Disk, DiskFile, parent_dir};

/// One operation on the model, as logged.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Create(PathBuf),
    Write {
        inode: usize,
        offset: u64,
        data: Vec<u8>,
    },
    Sync(usize),
    /// A sync that failed: the file's dirty data is marked clean, unsynced.
    FailedSync(usize),
    Rename(PathBuf, PathBuf),
    SyncDir(PathBuf),
}

/// What survives a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Only what was synced.
    DropUnsynced,
    /// What was synced, plus the first half of the last unsynced write.
    TearLast,
    /// Everything written (as if written back just before the cut), except
    /// the last unsynced write, of which only the first half.
    WriteBackTearLast,
}

impl Cut {
    pub(crate) const ALL: [Cut; 3] = [Cut::DropUnsynced, Cut::TearLast, Cut::WriteBackTearLast];
}

#[derive(Debug, Clone, Default)]
struct Inode {
    /// What a process reads.
    current: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// Writes not yet synced, with their place in the log.
    unsynced: Vec<(usize, u64, Vec<u8>)>,
}

fn write_into(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset as usize..end].copy_from_slice(data);
}

/// The model filesystem.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fs {
    /// Directory entries a process sees.
    names: BTreeMap<PathBuf, usize>,
    /// Directory entries that survive a power cut.
    durable_names: BTreeMap<PathBuf, usize>,
    inodes: Vec<Inode>,
    /// Operations applied so far.
    applied: usize,
}

impl Fs {
    /// A filesystem holding `files`, all durable.
    pub(crate) fn with_files(files: &[(&Path, &[u8])]) -> Fs {
        let mut fs = Fs::default();
        for (path, bytes) in files {
            fs.names.insert(path.to_path_buf(), fs.inodes.len());
            fs.inodes.push(Inode {
                current: bytes.to_vec(),
                durable: bytes.to_vec(),
                unsynced: Vec::new(),
            });
        }
        fs.durable_names = fs.names.clone();
        fs
    }

    fn apply(&mut self, op: &Op) {
        let at = self.applied;
        self.applied += 1;
        match op {
            Op::Create(path) => {
                self.names.insert(path.clone(), self.inodes.len());
                self.inodes.push(Inode::default());
            }
            Op::Write {
                inode,
                offset,
                data,
            } => {
                let inode = &mut self.inodes[*inode];
                write_into(&mut inode.current, *offset, data);
                inode.unsynced.push((at, *offset, data.clone()));
            }
            Op::Sync(inode) => {
                // Only what is still dirty reaches the disk (not what a
                // failed sync marked clean).
                let inode = &mut self.inodes[*inode];
                for (_, offset, data) in inode.unsynced.drain(..) {
                    write_into(&mut inode.durable, offset, &data);
                }
            }
            Op::FailedSync(inode) => self.inodes[*inode].unsynced.clear(),
            Op::Rename(from, to) => {
                let inode = self.names.remove(from).expect("renamed file exists");
                self.names.insert(to.clone(), inode);
            }
            Op::SyncDir(dir) => {
                let in_dir = |p: &PathBuf| parent_dir(p) == dir;
                self.durable_names.retain(|p, _| !in_dir(p));
                for (path, inode) in &self.names {
                    if in_dir(path) {
                        self.durable_names.insert(path.clone(), *inode);
                    }
                }
            }
        }
    }

    /// What is left after a power cut now.
    pub(crate) fn cut(&self, cut: Cut) -> Fs {
        let last = self
            .inodes
            .iter()
            .flat_map(|i| i.unsynced.iter().map(|w| w.0))
            .max();
        let mut after = Fs {
            names: match cut {
                Cut::WriteBackTearLast => self.names.clone(),
                Cut::DropUnsynced | Cut::TearLast => self.durable_names.clone(),
            },
            durable_names: BTreeMap::new(),
            inodes: Vec::new(),
            applied: 0,
        };
        for inode in &self.inodes {
            let mut bytes = inode.durable.clone();
            for (at, offset, data) in &inode.unsynced {
                let torn = Some(*at) == last && cut != Cut::DropUnsynced;
                if torn {
                    write_into(&mut bytes, *offset, &data[..data.len() / 2]);
                } else if cut == Cut::WriteBackTearLast {
                    write_into(&mut bytes, *offset, data);
                }
            }
            after.inodes.push(Inode {
                current: bytes.clone(),
                durable: bytes,
                unsynced: Vec::new(),
            });
        }
        after.durable_names = after.names.clone();
        after
    }
}

/// `initial` after the first `k` operations of `log`.
pub(crate) fn replay(initial: &Fs, log: &[Op], k: usize) -> Fs {
    let mut fs = initial.clone();
    for op in &log[..k] {
        fs.apply(op);
    }
    fs
}

#[derive(Debug, Default)]
struct Gate {
    stalled: Mutex<bool>,
    resumed: Condvar,
}

#[derive(Debug)]
struct Inner {
    fs: Mutex<(Fs, Vec<Op>)>,
    gate: Gate,
    fail_syncs: AtomicBool,
    full: AtomicBool,
    read_only: AtomicBool,
    syncs: AtomicUsize,
}

/// The model as a [`Disk`]; clones share one filesystem and log.
#[derive(Debug, Clone)]
pub(crate) struct ModelDisk(Arc<Inner>);

impl ModelDisk {
    pub(crate) fn new(fs: Fs) -> ModelDisk {
        ModelDisk(Arc::new(Inner {
            fs: Mutex::new((fs, Vec::new())),
            gate: Gate::default(),
            fail_syncs: AtomicBool::new(false),
            full: AtomicBool::new(false),
            read_only: AtomicBool::new(false),
            syncs: AtomicUsize::new(0),
        }))
    }

    /// Operations so far: a power cut "at `ops()`" loses nothing done yet.
    pub(crate) fn ops(&self) -> usize {
        self.0.fs.lock().unwrap().1.len()
    }

    /// The log so far.
    pub(crate) fn log(&self) -> Vec<Op> {
        self.0.fs.lock().unwrap().1.clone()
    }

    /// Successful `fdatasync`s so far.
    pub(crate) fn syncs(&self) -> usize {
        self.0.syncs.load(Ordering::SeqCst)
    }

    /// Every `fdatasync` from now on blocks until [`resume`](Self::resume).
    pub(crate) fn stall(&self) {
        *self.0.gate.stalled.lock().unwrap() = true;
    }

    pub(crate) fn resume(&self) {
        *self.0.gate.stalled.lock().unwrap() = false;
        self.0.gate.resumed.notify_all();
    }

    /// Makes every `fdatasync` fail (EIO) while `fail`.
    pub(crate) fn fail_syncs(&self, fail: bool) {
        self.0.fail_syncs.store(fail, Ordering::SeqCst);
    }

    /// Makes the volume full while `full`: it reports no free block, and
    /// a write that would grow a file fails with `ENOSPC` (writes into
    /// space a file already has still succeed, as on a real filesystem).
    pub(crate) fn fill(&self, full: bool) {
        self.0.full.store(full, Ordering::SeqCst);
    }

    /// Makes opening or creating a file for writing fail (`EROFS`) while
    /// `read_only`: a volume remounted read-only.
    pub(crate) fn set_read_only(&self, read_only: bool) {
        self.0.read_only.store(read_only, Ordering::SeqCst);
    }

    fn writable(&self) -> io::Result<()> {
        if self.0.read_only.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem));
        }
        Ok(())
    }

    fn run<T>(&self, op: Op, answer: impl FnOnce(&Fs) -> T) -> T {
        let mut guard = self.0.fs.lock().unwrap();
        let (fs, log) = &mut *guard;
        fs.apply(&op);
        log.push(op);
        answer(fs)
    }

    fn inode_of(&self, path: &Path) -> io::Result<usize> {
        let guard = self.0.fs.lock().unwrap();
        guard
            .0
            .names
            .get(path)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display())))
    }
}

impl Disk for ModelDisk {
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let guard = self.0.fs.lock().unwrap();
        let fs = &guard.0;
        Ok(fs.names.get(path).map(|&i| fs.inodes[i].current.clone()))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        self.writable()?;
        let inode = self.run(Op::Create(path.to_path_buf()), |fs| fs.inodes.len() - 1);
        Ok(Box::new(ModelFile {
            disk: self.clone(),
            inode,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        self.writable()?;
        Ok(Box::new(ModelFile {
            disk: self.clone(),
            inode: self.inode_of(path)?,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inode_of(from)?;
        self.run(Op::Rename(from.to_path_buf(), to.to_path_buf()), |_| ());
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.run(Op::SyncDir(dir.to_path_buf()), |_| ());
        Ok(())
    }

    fn is_full(&self, _dir: &Path) -> io::Result<bool> {
        Ok(self.0.full.load(Ordering::SeqCst))
    }
}

struct ModelFile {
    disk: ModelDisk,
    inode: usize,
}

impl DiskFile for ModelFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let inner = &self.disk.0;
        if inner.full.load(Ordering::SeqCst) {
            let len = inner.fs.lock().unwrap().0.inodes[self.inode].current.len();
            if offset as usize + data.len() > len {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
        }
        let op = Op::Write {
            inode: self.inode,
            offset,
            data: data.to_vec(),
        };
        self.disk.run(op, |_| ());
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let gate = &self.disk.0.gate;
        let mut stalled = gate.stalled.lock().unwrap();
        while *stalled {
            stalled = gate.resumed.wait(stalled).unwrap();
        }
        drop(stalled);
        if self.disk.0.fail_syncs.load(Ordering::SeqCst) {
            self.disk.run(Op::FailedSync(self.inode), |_| ());
            return Err(io::Error::other("injected EIO"));
        }
        self.disk.run(Op::Sync(self.inode), |_| ());
        self.disk.0.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A small deterministic generator for picking cut points of long runs
/// (xorshift64*; fixed seeds keep the tests reproducible).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::{AtomicFile, read_on};

    fn one_file(bytes: &[u8]) -> (ModelDisk, PathBuf) {
        let path = PathBuf::from("/data/f");
        (ModelDisk::new(Fs::with_files(&[(&path, bytes)])), path)
    }

    #[test]
    fn unsynced_writes_are_lost_synced_ones_stay_and_the_last_can_tear() {
        let (disk, path) = one_file(b"aaaa");
        let mut file = disk.open(&path).unwrap();
        file.write_at(0, b"bbbb").unwrap();
        file.sync_data().unwrap();
        file.write_at(0, b"cccc").unwrap();
        let now = replay(
            &Fs::with_files(&[(&path, b"aaaa")]),
            &disk.log(),
            disk.ops(),
        );
        let survives = |cut| ModelDisk::new(now.cut(cut)).read(&path).unwrap().unwrap();
        assert_eq!(survives(Cut::DropUnsynced), b"bbbb");
        assert_eq!(survives(Cut::TearLast), b"ccbb");
        assert_eq!(survives(Cut::WriteBackTearLast), b"ccbb");
        assert_eq!(disk.read(&path).unwrap().unwrap(), b"cccc");
    }

    #[test]
    fn a_failed_sync_leaves_data_unsynced_even_after_a_later_good_sync() {
        // Linux marks the pages clean after a failed fsync: a bare re-sync
        // "succeeds" and the data is still not durable. Only a rewrite is.
        let (disk, path) = one_file(b"aaaa");
        let initial = Fs::with_files(&[(&path, b"aaaa")]);
        let mut file = disk.open(&path).unwrap();
        file.write_at(0, b"bbbb").unwrap();
        disk.fail_syncs(true);
        assert!(file.sync_data().is_err());
        disk.fail_syncs(false);
        file.sync_data().unwrap();
        let cut = replay(&initial, &disk.log(), disk.ops()).cut(Cut::DropUnsynced);
        assert_eq!(ModelDisk::new(cut).read(&path).unwrap().unwrap(), b"aaaa");
        file.write_at(0, b"bbbb").unwrap();
        file.sync_data().unwrap();
        let cut = replay(&initial, &disk.log(), disk.ops()).cut(Cut::DropUnsynced);
        assert_eq!(ModelDisk::new(cut).read(&path).unwrap().unwrap(), b"bbbb");
    }

    #[test]
    fn a_new_name_needs_the_directory_synced() {
        let disk = ModelDisk::new(Fs::default());
        let path = PathBuf::from("/data/new");
        let mut file = disk.create(&path).unwrap();
        file.write_at(0, b"x").unwrap();
        file.sync_data().unwrap();
        let before_dir_sync = replay(&Fs::default(), &disk.log(), disk.ops());
        assert!(
            ModelDisk::new(before_dir_sync.cut(Cut::DropUnsynced))
                .read(&path)
                .unwrap()
                .is_none()
        );
        disk.sync_dir(Path::new("/data")).unwrap();
        let after = replay(&Fs::default(), &disk.log(), disk.ops());
        assert_eq!(
            ModelDisk::new(after.cut(Cut::DropUnsynced))
                .read(&path)
                .unwrap()
                .unwrap(),
            b"x"
        );
    }

    /// `peers.state`'s file layer: at every cut, the file is a version at
    /// least as new as the last acknowledged write and never corrupt.
    #[test]
    fn atomic_file_survives_a_power_cut_at_every_point() {
        let disk = ModelDisk::new(Fs::default());
        let path = PathBuf::from("/data/peers.state");
        let file = AtomicFile::on(Arc::new(disk.clone()), path.clone());
        // (ops done when version i was acknowledged, i)
        let mut acked = Vec::new();
        let versions: Vec<Vec<u8>> = (0..6)
            .map(|i| format!("{{\"entries\":{}}}", "x".repeat(i * 40)).into_bytes())
            .collect();
        for (i, body) in versions.iter().enumerate() {
            file.write(body).unwrap();
            acked.push((disk.ops(), i));
        }
        let log = disk.log();
        let mut explored = 0;
        for k in 0..=log.len() {
            let fs = replay(&Fs::default(), &log, k);
            let must_have = acked.iter().filter(|(at, _)| *at <= k).map(|a| a.1).max();
            for cut in Cut::ALL {
                explored += 1;
                let after = ModelDisk::new(fs.cut(cut));
                let body = read_on(&after, &path)
                    .unwrap_or_else(|e| panic!("cut at op {k} ({cut:?}): {e}"));
                match (body, must_have) {
                    (None, None) => {}
                    (None, Some(v)) => panic!("cut at op {k} ({cut:?}) lost version {v}"),
                    (Some(body), _) => {
                        let v = versions.iter().position(|b| *b == body).unwrap();
                        assert!(
                            must_have.is_none_or(|m| v >= m),
                            "cut at {k}: old version {v}"
                        );
                    }
                }
            }
        }
        println!("peers.state file layer: {explored} power cuts explored, none lost a write");
        assert!(explored > 50);
    }

    #[test]
    fn atomic_file_check_catches_a_missing_directory_sync() {
        // Planted bug: the same sequence without the directory fsync. The
        // check above must see the new name vanish.
        let disk = ModelDisk::new(Fs::default());
        let path = PathBuf::from("/data/peers.state");
        let tmp = PathBuf::from("/data/peers.state.tmp");
        let mut f = disk.create(&tmp).unwrap();
        f.write_at(0, &crate::store::file::encode(b"{}")).unwrap();
        f.sync_data().unwrap();
        disk.rename(&tmp, &path).unwrap();
        let fs = replay(&Fs::default(), &disk.log(), disk.ops());
        let after = ModelDisk::new(fs.cut(Cut::DropUnsynced));
        assert!(read_on(&after, &path).unwrap().is_none());
    }
}
