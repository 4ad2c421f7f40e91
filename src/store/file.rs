//! Checksummed files replaced atomically: `peers.state`, and `visits.state`
//! as releases before format v2 wrote it (read once, then migrated by
//! [`super::format`]).
//!
//! # On-disk format
//!
//! One header line followed by a JSON body:
//!
//! ```text
//! tally-state v1 crc32=1c291ca3 len=97\n
//! {"incarnation":"9f0c…","count":42,…}
//! ```
//!
//! `crc32` is the CRC-32 (IEEE) of the body as 8 lowercase hex digits and
//! `len` its length in bytes; the file ends exactly where the body does. A
//! file that is empty, truncated, longer than stated, or whose checksum or
//! JSON does not match is *corrupt*: reading it is an error that names the
//! file, and tally never overwrites it (a silent reset to 0 is the bug this
//! project exists to fix).
//!
//! # Atomic replacement
//!
//! A new version is written to `<name>.tmp`, `fdatasync`ed, renamed over
//! `<name>` and the directory `fsync`ed. A crash at any instant leaves either
//! the old or the new file whole; a left-over `.tmp` is ignored and
//! overwritten by the next write.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk::{Disk, RealDisk, parent_dir};

/// First bytes of every file in this format.
pub const MAGIC: &str = "tally-state v1";
/// Longest header we accept; a longer first line is not ours.
const MAX_HEADER: usize = 64;

/// A file that could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "{path} is corrupt: {reason}. Tally will not start on it and has not changed it; \
         restore it from a backup, or move it away to start this volume from zero"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Reads `path` from the machine's disk; `Ok(None)` when it does not exist.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    read_on(&RealDisk, path)
}

/// Reads `path` from `disk`; `Ok(None)` when it does not exist.
pub fn read_on(disk: &dyn Disk, path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    let bytes = match disk.read(path) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(source) => {
            return Err(FileError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    decode(&bytes)
        .map(Some)
        .map_err(|reason| FileError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })
}

/// Header plus body, as written to disk.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{MAGIC} crc32={:08x} len={}\n",
        crc32fast::hash(body),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The body of an encoded file, or why it is not one.
pub fn decode(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let newline = bytes
        .iter()
        .take(MAX_HEADER)
        .position(|&b| b == b'\n')
        .ok_or("no tally header line (not a tally state file, or cut short)")?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| "header is not text")?;
    let fields = header
        .strip_prefix(MAGIC)
        .ok_or_else(|| format!("header {header:?} does not start with {MAGIC:?}"))?;
    let mut crc = None;
    let mut len = None;
    for field in fields.split_whitespace() {
        match field.split_once('=') {
            Some(("crc32", v)) => crc = u32::from_str_radix(v, 16).ok(),
            Some(("len", v)) => len = v.parse::<usize>().ok(),
            _ => return Err(format!("unexpected header field {field:?}")),
        }
    }
    let (crc, len) = crc.zip(len).ok_or("header lacks crc32= or len=")?;
    let body = &bytes[newline + 1..];
    if body.len() != len {
        return Err(format!(
            "header says {len} bytes of data but {} follow (truncated or appended to)",
            body.len()
        ));
    }
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(format!(
            "checksum mismatch (header crc32={crc:08x}, data crc32={actual:08x})"
        ));
    }
    Ok(body.to_vec())
}

/// Replaces `path` with `bytes` atomically and durably: `<path>.tmp` is
/// created, written and `fdatasync`ed, renamed over `path`, and the
/// directory `fsync`ed. A crash at any instant leaves the old or the new
/// file whole.
pub fn replace(disk: &dyn Disk, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = disk.create(&tmp)?;
    file.write_at(0, bytes)?;
    file.sync_data()?;
    drop(file);
    disk.rename(&tmp, path)?;
    disk.sync_dir(parent_dir(path))
}

/// A checksummed file replaced atomically on every write (see the module
/// docs); `peers.state` is one.
#[derive(Debug, Clone)]
pub struct AtomicFile {
    /// The file itself.
    path: PathBuf,
    /// Where it lives: the machine's disk, or the power-cut model in tests.
    disk: Arc<dyn Disk>,
}

impl AtomicFile {
    /// Writes to `path` on the machine's disk; its directory must exist.
    pub fn new(path: PathBuf) -> AtomicFile {
        AtomicFile::on(Arc::new(RealDisk), path)
    }

    /// Writes to `path` on `disk`.
    pub fn on(disk: Arc<dyn Disk>, path: PathBuf) -> AtomicFile {
        AtomicFile { path, disk }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file with `body`, durably on return.
    pub fn write(&self, body: &[u8]) -> io::Result<()> {
        replace(&*self.disk, &self.path, &encode(body))
    }

    /// The body, `Ok(None)` when the file does not exist.
    pub fn read(&self) -> Result<Option<Vec<u8>>, FileError> {
        read_on(&*self.disk, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let body = br#"{"count":7}"#;
        assert_eq!(decode(&encode(body)).unwrap(), body);
    }

    #[test]
    fn every_damage_is_detected() {
        let good = encode(br#"{"incarnation":"ab","count":12345}"#);
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x04;
        let mut appended = good.clone();
        appended.extend_from_slice(b"\n");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated", good[..good.len() - 5].to_vec()),
            (
                "header only",
                good[..good.iter().position(|&b| b == b'\n').unwrap() + 1].to_vec(),
            ),
            ("flipped", flipped),
            ("appended", appended),
            ("garbage", b"hello world, not a counter at all".to_vec()),
            ("wrong magic", b"tally-state v9 crc32=0 len=0\n".to_vec()),
        ];
        for (name, bytes) in cases {
            assert!(decode(&bytes).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn write_replaces_and_read_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = AtomicFile::new(dir.path().join("x.state"));
        assert!(file.read().unwrap().is_none());
        file.write(b"{}").unwrap();
        file.write(b"{\"a\":1}").unwrap();
        assert_eq!(read(file.path()).unwrap().unwrap(), b"{\"a\":1}");
        std::fs::write(file.path(), b"junk").unwrap();
        let err = read(file.path()).unwrap_err().to_string();
        assert!(err.contains("x.state") && err.contains("corrupt"), "{err}");
    }
}
