//! Bounded claims, and the `volume-full` fault that fills one.
//!
//! A claim is a directory under the state directory, on the host's disk:
//! filling it would fill the machine. When the cluster is started with a
//! volume limit, each claim is a tmpfs of that size instead (mounted on the
//! claim directory in the daemon's mount namespace, the host's, so every
//! container that bind-mounts the claim sees the same filesystem), and
//! [`fill`] writes a filler file until the filesystem says it is full.

use std::fs::{self, File};
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// The filler's name in a claim (heal deletes it).
pub const FILLER: &str = ".tsim-volume-full";

/// Mounts a tmpfs of `mb` MiB on `dir` (a new, empty claim directory).
pub fn bound(dir: &Path, mb: u32) -> Result<()> {
    mount(
        Some("tsim-claim"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("size={mb}m,mode=0755").as_str()),
    )
    .with_context(|| format!("mounting a {mb} MiB tmpfs on claim {}", dir.display()))
}

/// Unmounts every bounded claim under `pvc` (the state directory's claims);
/// what it did, for the teardown report. Plain directories are left alone.
pub fn unbound_all(pvc: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(pvc) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| umount2(&e.path(), MntFlags::MNT_DETACH).is_ok())
        .map(|e| format!("unmounted claim {}", e.path().display()))
        .collect()
}

/// Fills the claim at `dir` to its last byte with a filler file; returns
/// the filler's path. Refuses a claim that is not a bounded one (it would
/// fill the host's disk).
pub fn fill(dir: &Path) -> Result<PathBuf> {
    let stat = nix::sys::statfs::statfs(dir)
        .with_context(|| format!("reading the filesystem of claim {}", dir.display()))?;
    if stat.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        bail!(
            "claim {} is not a bounded volume: start the cluster with a volume limit \
             (`tally-sim up --volume-limit-mb N`, ClusterOptions::volume_limit_mb) \
             so filling it cannot fill the host's disk",
            dir.display()
        );
    }
    let path = dir.join(FILLER);
    let mut file = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    // Big writes, then single bytes for the last partial page.
    for chunk in [vec![0u8; 1 << 16], vec![0u8; 1]] {
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("filling {}", path.display()));
                }
            }
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_never_filled() {
        let dir = tempfile::tempdir().unwrap();
        let e = fill(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("--volume-limit-mb"), "{e:#}");
        assert!(!dir.path().join(FILLER).exists());
    }

    #[test]
    fn a_bounded_claim_fills_to_the_last_byte_and_empties_at_heal() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("this test mounts a tmpfs: run it as root");
        }
        let pvc = tempfile::tempdir().unwrap();
        let claim = pvc.path().join("data-tally-0");
        fs::create_dir(&claim).unwrap();
        bound(&claim, 1).unwrap();
        fs::write(claim.join("counter"), b"kept").unwrap();
        let filler = fill(&claim).unwrap();
        assert!(fs::write(claim.join("more"), b"x").is_err(), "not full");
        fs::remove_file(&filler).unwrap();
        fs::write(claim.join("more"), b"x").unwrap();
        assert_eq!(fs::read(claim.join("counter")).unwrap(), b"kept");
        assert_eq!(unbound_all(pvc.path()).len(), 1);
        assert!(!claim.join("counter").exists(), "unmounted");
    }
}
