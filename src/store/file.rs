//! Checksummed files replaced atomically.
//!
//! # On-disk format
//!
//! Every file tally writes is one header line followed by a JSON body:
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

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &str = "tally-state v1";
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

/// Reads `path`; `Ok(None)` when it does not exist.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
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

/// A file replaced atomically on every write (see the module docs).
#[derive(Debug)]
pub struct AtomicFile {
    /// The file itself.
    path: PathBuf,
    /// Where the next version is written before the rename.
    tmp: PathBuf,
    /// The directory, kept open so every commit does not reopen it to fsync.
    dir: File,
}

impl AtomicFile {
    /// Prepares writes to `path`, whose directory must exist.
    pub fn new(path: PathBuf) -> io::Result<AtomicFile> {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = File::open(parent)?;
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        Ok(AtomicFile {
            path,
            tmp: tmp.into(),
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file with `body`; with `sync`, durable on return.
    pub fn write(&self, body: &[u8], sync: bool) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.tmp)?;
        file.write_all(&encode(body))?;
        if sync {
            file.sync_data()?;
        }
        drop(file);
        std::fs::rename(&self.tmp, &self.path)?;
        if sync {
            self.dir.sync_all()?;
        }
        Ok(())
    }

    /// Makes the last unsynced [`write`](Self::write) durable.
    pub fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_data()?;
        self.dir.sync_all()
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
        let file = AtomicFile::new(dir.path().join("x.state")).unwrap();
        assert!(read(file.path()).unwrap().is_none());
        file.write(b"{}", true).unwrap();
        file.write(b"{\"a\":1}", false).unwrap();
        file.sync().unwrap();
        assert_eq!(read(file.path()).unwrap().unwrap(), b"{\"a\":1}");
        std::fs::write(file.path(), b"junk").unwrap();
        let err = read(file.path()).unwrap_err().to_string();
        assert!(err.contains("x.state") && err.contains("corrupt"), "{err}");
    }
}
