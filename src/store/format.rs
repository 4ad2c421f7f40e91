//! `visits.state`, format v2: two checksummed, sequence-numbered slots in a
//! file allocated once, written alternately (as LMDB writes its two meta
//! pages).
//!
//! # Layout
//!
//! The file is exactly [`FILE_SIZE`] bytes: slot 0 at offset 0, slot 1 at
//! [`SLOT_SIZE`]. A slot (little-endian integers):
//!
//! ```text
//! offset  size  field
//!      0     8  magic "TALLYVS2"
//!      8     4  format version, 2
//!     12     4  body length B (at most SLOT_SIZE - 36)
//!     16     8  sequence number; slot = sequence mod 2
//!     24     8  count of visits
//!     32     B  body: JSON {"incarnation","pod","created_unix"}
//!   32+B     4  CRC-32 (IEEE) of bytes 0 .. 32+B
//! ```
//!
//! The rest of the slot is zeros. A commit writes the slot of the next
//! sequence number in place (one `pwrite`, one `fdatasync`: the file's size
//! and blocks never change, so no metadata is written) and never touches the
//! other slot, which holds the previous commit. Reading takes the valid slot
//! with the highest sequence number: a write torn by a power cut fails its
//! checksum and the other slot, synced before the torn write began, stands.
//! A file with no valid slot, or of the wrong size, is corrupt: a loud
//! error, never a reset to 0.
//!
//! # Older formats
//!
//! A v1 file (one header line and a JSON body, see [`super::file`]) is read
//! by [`decode`] too; [`Store::open`](super::Store::open) rewrites it as v2
//! in place on first start (atomically: the new file is written, synced and
//! renamed over the old one).

use serde::{Deserialize, Serialize};

use super::StoredState;
use super::file;

/// Bytes per slot: one page, so a slot never shares a page with the other.
pub const SLOT_SIZE: usize = 4096;
/// Bytes of a v2 file.
pub const FILE_SIZE: usize = 2 * SLOT_SIZE;
const MAGIC: &[u8; 8] = b"TALLYVS2";
const VERSION: u32 = 2;
/// Magic, version, body length, sequence number, count.
const HEADER: usize = 32;
const CRC: usize = 4;
/// Longest body a slot holds.
pub const MAX_BODY: usize = SLOT_SIZE - HEADER - CRC;

/// Why bytes are not a readable `visits.state`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the file is empty")]
    Empty,
    #[error("format v1: {0}")]
    V1(String),
    #[error("format v1: the JSON body is not a counter state: {0}")]
    V1Body(String),
    #[error(
        "the file is {0} bytes; format v2 files are exactly {FILE_SIZE} (truncated or appended to)"
    )]
    Size(usize),
    #[error("neither slot is valid (slot 0: {0}; slot 1: {1})")]
    NoValidSlot(String, String),
    #[error(
        "the two slots name different incarnations ({0} and {1}): this is not a file tally wrote"
    )]
    MixedIncarnations(String, String),
    #[error(
        "not a tally counter file (it starts with neither {:?} nor {:?})",
        file::MAGIC,
        "TALLYVS2"
    )]
    Unknown,
}

/// What a `visits.state` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A file written before format v2; to be migrated.
    V1(StoredState),
    /// A v2 file: the newest valid slot.
    V2 {
        state: StoredState,
        /// Its sequence number.
        seq: u64,
        /// Why the other slot is invalid, when it is (a torn last write).
        other_invalid: Option<String>,
    },
}

impl Decoded {
    pub fn state(&self) -> &StoredState {
        match self {
            Decoded::V1(state) | Decoded::V2 { state, .. } => state,
        }
    }
}

/// Decodes a whole `visits.state`, in any format tally ever wrote. This is
/// the one entry point for untrusted bytes (the fuzz target calls it).
pub fn decode(bytes: &[u8]) -> Result<Decoded, FormatError> {
    if bytes.is_empty() {
        Err(FormatError::Empty)
    } else if bytes.starts_with(file::MAGIC.as_bytes()) {
        let body = file::decode(bytes).map_err(FormatError::V1)?;
        serde_json::from_slice(&body)
            .map(Decoded::V1)
            .map_err(|e| FormatError::V1Body(e.to_string()))
    } else if bytes.starts_with(MAGIC) {
        decode_v2(bytes)
    } else {
        Err(FormatError::Unknown)
    }
}

fn decode_v2(bytes: &[u8]) -> Result<Decoded, FormatError> {
    if bytes.len() != FILE_SIZE {
        return Err(FormatError::Size(bytes.len()));
    }
    let slot = |i: usize| decode_slot(i, &bytes[i * SLOT_SIZE..(i + 1) * SLOT_SIZE]);
    let (newest, other_invalid) = match (slot(0), slot(1)) {
        (Ok(a), Ok(b)) => {
            if a.1.incarnation != b.1.incarnation {
                return Err(FormatError::MixedIncarnations(
                    a.1.incarnation,
                    b.1.incarnation,
                ));
            }
            (if a.0 > b.0 { a } else { b }, None)
        }
        (Ok(a), Err(why)) | (Err(why), Ok(a)) => (a, Some(why)),
        (Err(a), Err(b)) => return Err(FormatError::NoValidSlot(a, b)),
    };
    Ok(Decoded::V2 {
        seq: newest.0,
        state: newest.1,
        other_invalid,
    })
}

/// The fields that do not change between commits.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<'a> {
    incarnation: &'a str,
    pod: &'a str,
    created_unix: u64,
}

fn decode_slot(index: usize, slot: &[u8]) -> Result<(u64, StoredState), String> {
    let u32_at = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
    if &slot[..8] != MAGIC {
        return Err("no slot magic (never written, or torn)".into());
    }
    let version = u32_at(8);
    if version != VERSION {
        return Err(format!("slot format version {version}, expected {VERSION}"));
    }
    let len = u32_at(12) as usize;
    if len > MAX_BODY {
        return Err(format!("body length {len} exceeds {MAX_BODY}"));
    }
    let end = HEADER + len;
    let stored = u32_at(end);
    let actual = crc32fast::hash(&slot[..end]);
    if stored != actual {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x}): torn or damaged"
        ));
    }
    let seq = u64_at(16);
    if seq % 2 != index as u64 {
        return Err(format!(
            "sequence number {seq} does not belong in slot {index}"
        ));
    }
    let body: Body = serde_json::from_slice(&slot[HEADER..end])
        .map_err(|e| format!("body is not the expected JSON: {e}"))?;
    Ok((
        seq,
        StoredState {
            incarnation: body.incarnation.to_string(),
            count: u64_at(24),
            pod: body.pod.to_string(),
            created_unix: body.created_unix,
        },
    ))
}

/// Encodes commits of one state cheaply: the body is serialised once, each
/// commit patches the sequence number, the count and the checksum.
#[derive(Debug, Clone)]
pub struct SlotWriter {
    /// Header, body and checksum: what one commit writes.
    slot: Vec<u8>,
}

impl SlotWriter {
    /// Prepares slots for `state` (its `count` is given per commit).
    pub fn new(state: &StoredState) -> Result<SlotWriter, String> {
        let body = serde_json::to_vec(&Body {
            incarnation: &state.incarnation,
            pod: &state.pod,
            created_unix: state.created_unix,
        })
        .expect("the body serialises");
        if body.len() > MAX_BODY {
            return Err(format!(
                "pod name and incarnation take {} bytes, more than the {MAX_BODY} a slot holds",
                body.len()
            ));
        }
        let mut slot = Vec::with_capacity(HEADER + body.len() + CRC);
        slot.extend_from_slice(MAGIC);
        slot.extend_from_slice(&VERSION.to_le_bytes());
        slot.extend_from_slice(&(body.len() as u32).to_le_bytes());
        slot.extend_from_slice(&[0; 16]);
        slot.extend_from_slice(&body);
        slot.extend_from_slice(&[0; CRC]);
        Ok(SlotWriter { slot })
    }

    /// The bytes to write at [`offset`] for commit `seq` of `count`.
    pub fn encode(&mut self, seq: u64, count: u64) -> &[u8] {
        self.slot[16..24].copy_from_slice(&seq.to_le_bytes());
        self.slot[24..32].copy_from_slice(&count.to_le_bytes());
        let end = self.slot.len() - CRC;
        let crc = crc32fast::hash(&self.slot[..end]);
        self.slot[end..].copy_from_slice(&crc.to_le_bytes());
        &self.slot
    }

    /// A whole new file whose slots hold `count` as commits `seq - 1` and
    /// `seq` (both valid, so either may be overwritten next).
    pub fn image(&mut self, seq: u64, count: u64) -> Vec<u8> {
        let mut file = vec![0; FILE_SIZE];
        for seq in [seq - 1, seq] {
            let at = offset(seq) as usize;
            let slot = self.encode(seq, count);
            file[at..at + slot.len()].copy_from_slice(slot);
        }
        file
    }
}

/// Where commit `seq` is written.
pub fn offset(seq: u64) -> u64 {
    (seq % 2) * SLOT_SIZE as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(count: u64) -> StoredState {
        StoredState {
            incarnation: "9f0c2d1e8b7a6f5e4d3c2b1a09f8e7d6".into(),
            count,
            pod: "tally-0".into(),
            created_unix: 1_700_000_000,
        }
    }

    fn write(file: &mut [u8], writer: &mut SlotWriter, seq: u64, count: u64) {
        let at = offset(seq) as usize;
        let slot = writer.encode(seq, count);
        file[at..at + slot.len()].copy_from_slice(slot);
    }

    #[test]
    fn newest_valid_slot_wins_and_a_torn_one_falls_back() {
        let mut writer = SlotWriter::new(&state(0)).unwrap();
        let mut file = writer.image(1, 5);
        write(&mut file, &mut writer, 2, 9);
        let Decoded::V2 { state: s, seq, .. } = decode(&file).unwrap() else {
            panic!("not v2")
        };
        assert_eq!((s, seq), (state(9), 2));
        write(&mut file, &mut writer, 3, 12);
        // Tear commit 3 at every byte: commit 2 (count 9) must stand.
        let good = file.clone();
        let slot_len = writer.encode(3, 12).len();
        for cut in 0..slot_len {
            let mut torn = file.clone();
            let at = offset(3) as usize;
            torn[at + cut..at + slot_len].copy_from_slice(&vec![0; slot_len - cut]);
            let decoded = decode(&torn).unwrap();
            assert_eq!(decoded.state().count, 9, "torn at {cut}");
        }
        assert_eq!(decode(&good).unwrap().state().count, 12);
    }

    #[test]
    fn damage_is_an_error_never_a_zero() {
        let mut writer = SlotWriter::new(&state(0)).unwrap();
        let file = writer.image(1, 5);
        let mut both_flipped = file.clone();
        both_flipped[40] ^= 1;
        both_flipped[SLOT_SIZE + 40] ^= 1;
        let mut swapped = file.clone();
        swapped.copy_within(0..SLOT_SIZE, SLOT_SIZE);
        swapped[..SLOT_SIZE].fill(0);
        swapped[..8].copy_from_slice(MAGIC);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("short", file[..FILE_SIZE - 1].to_vec()),
            ("long", [file.clone(), vec![0]].concat()),
            ("both slots damaged", both_flipped),
            ("slot in the wrong place", swapped),
            ("zeros", vec![0; FILE_SIZE]),
            ("garbage", b"hello".to_vec()),
        ];
        for (name, bytes) in cases {
            assert!(decode(&bytes).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn v1_files_decode() {
        let v1 = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/store-v1/visits.state"),
        )
        .unwrap();
        let Decoded::V1(s) = decode(&v1).unwrap() else {
            panic!("not v1")
        };
        assert_eq!(
            (s.count, s.incarnation.as_str()),
            (7, "56b14a094c657ade2674aaed18fa1a7e")
        );
        let mut cut = v1.clone();
        cut.pop();
        assert!(matches!(decode(&cut), Err(FormatError::V1(_))));
    }

    #[test]
    fn oversized_identity_is_refused() {
        let mut s = state(0);
        s.pod = "x".repeat(MAX_BODY);
        assert!(SlotWriter::new(&s).is_err());
    }
}
