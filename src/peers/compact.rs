//! The compact wire form of a peer state, for siblings; people keep JSON.
//!
//! A peer state as JSON spends most of its ~100 bytes per entry on field
//! names, the 32 hex digits of an incarnation id and a 10-digit timestamp.
//! Fetches that carry many entries (a new sibling's full state, deltas on a
//! busy cluster) pay that per entry, so a fetch asks for this form with
//! `Accept: application/x-tally-state` and a sibling that knows it answers
//! in it ([`Encoding`](super::wire::Encoding) decides, by `Content-Type`).
//! `curl` (which sends `Accept: */*`) and older pods get the same readable
//! JSON as before; hand-overs (`PUT`, rare) stay JSON so an older sibling
//! can read them during a rolling upgrade.
//!
//! Layout, version 1 (numbers are LEB128 varints, "name" is an index into
//! the name table, "inc" an incarnation, "addr" a socket address):
//!
//! ```text
//! "TALLY" 0x01                      magic and version
//! base                              the newest seen_unix in the entries
//! n, n × (shared, len, bytes)       pod names, each once (interned), front
//!                                   coded: `shared` leading bytes of the
//!                                   name before, then `len` bytes
//! name inc                          the sender
//! n, n × (name inc count seen)      entries; seen = base - seen_unix + 1,
//!                                   0 when seen_unix is 0 (unknown)
//! n, n × (name inc count)           retired
//! addr                              announce
//! n, n × (name at_ms addr flags)    news; flags bit 0: left
//! inc:  0 then 16 bytes (a 32-digit lowercase hex id, as tally makes
//!       them), or len + 1 then len bytes of text (any other id)
//! addr: 0 (none) | 4, 4 bytes, port | 6, 16 bytes, port (two bytes,
//!       big-endian; no flow label or scope: pod addresses have none, and
//!       JSON does not carry them either)
//! ```
//!
//! An entry of a tally-made incarnation takes about 26 bytes instead of
//! 107 (a 256-pod state: a quarter of its JSON).
//! Decoding is structural only: whatever it yields goes through the same
//! checks as JSON ([`check_peer_state`](super::wire::check_peer_state)).
//! Every length is checked against the bytes left before anything is
//! allocated, so a short body cannot ask for a large allocation. Pure
//! logic.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::merge::Entry;
use crate::peers::wire::{Notice, PeerState, Retired};

/// The media type of this form.
pub const CONTENT_TYPE: &str = "application/x-tally-state";
const MAGIC: &[u8] = b"TALLY\x01";

/// Why bytes are not a compact peer state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompactError {
    #[error("not a compact peer state (no \"TALLY\\x01\" header)")]
    Magic,
    #[error("compact peer state cut short at byte {0}")]
    Truncated(usize),
    #[error("compact peer state: number too long at byte {0}")]
    Varint(usize),
    #[error("compact peer state: the seen time at byte {0} is after the state's newest")]
    Seen(usize),
    #[error("compact peer state: name index {index} at byte {at}, but only {names} names")]
    NameIndex { index: u64, names: usize, at: usize },
    #[error("compact peer state: name at byte {at} shares {shared} bytes with a shorter one")]
    Prefix { at: usize, shared: u64 },
    #[error("compact peer state: text at byte {0} is not UTF-8")]
    Utf8(usize),
    #[error("compact peer state: address kind {kind} at byte {at} (expected 0, 4 or 6)")]
    AddrKind { kind: u8, at: usize },
    #[error("compact peer state: {0} bytes after the end")]
    Trailing(usize),
}

/// Encodes `state` (the sender's own; any state round-trips).
pub fn encode(state: &PeerState) -> Vec<u8> {
    let mut names = Names::default();
    for pod in std::iter::once(&state.pod)
        .chain(state.entries.iter().map(|e| &e.pod))
        .chain(state.retired.iter().map(|r| &r.pod))
        .chain(state.news.iter().map(|n| &n.pod))
    {
        names.intern(pod);
    }
    let base = state.entries.iter().map(|e| e.seen_unix).max().unwrap_or(0);
    let mut out = Vec::with_capacity(64 + 32 * state.entries.len() + names.bytes);
    out.extend_from_slice(MAGIC);
    varint(&mut out, base);
    varint(&mut out, names.order.len() as u64);
    let mut previous: &[u8] = b"";
    for name in &names.order {
        // Front coding: a StatefulSet's names differ only in the ordinal.
        let shared = previous
            .iter()
            .zip(name.as_bytes())
            .take_while(|(a, b)| a == b)
            .count();
        varint(&mut out, shared as u64);
        varint(&mut out, (name.len() - shared) as u64);
        out.extend_from_slice(&name.as_bytes()[shared..]);
        previous = name.as_bytes();
    }
    varint(&mut out, names.index[state.pod.as_str()]);
    incarnation(&mut out, &state.incarnation);
    varint(&mut out, state.entries.len() as u64);
    for e in &state.entries {
        varint(&mut out, names.index[e.pod.as_str()]);
        incarnation(&mut out, &e.incarnation);
        varint(&mut out, e.count);
        varint(
            &mut out,
            if e.seen_unix == 0 {
                0
            } else {
                base - e.seen_unix + 1
            },
        );
    }
    varint(&mut out, state.retired.len() as u64);
    for r in &state.retired {
        varint(&mut out, names.index[r.pod.as_str()]);
        incarnation(&mut out, &r.incarnation);
        varint(&mut out, r.count);
    }
    address(&mut out, state.announce);
    varint(&mut out, state.news.len() as u64);
    for n in &state.news {
        varint(&mut out, names.index[n.pod.as_str()]);
        varint(&mut out, n.at_ms);
        address(&mut out, n.addr);
        out.push(u8::from(n.left));
    }
    out
}

/// Decodes a compact peer state (structure only; see the module doc).
pub fn decode(bytes: &[u8]) -> Result<PeerState, CompactError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(MAGIC.len()).ok() != Some(MAGIC) {
        return Err(CompactError::Magic);
    }
    let base = r.varint()?;
    let mut previous = Vec::new();
    let names = r.list(|r| {
        let at = r.at;
        let shared = r.varint()?;
        let shared = usize::try_from(shared)
            .ok()
            .filter(|&n| n <= previous.len())
            .ok_or(CompactError::Prefix { at, shared })?;
        let n = r.len()?;
        previous.truncate(shared);
        previous.extend_from_slice(r.take(n)?);
        String::from_utf8(previous.clone()).map_err(|_| CompactError::Utf8(at))
    })?;
    let pod = r.name(&names)?;
    let incarnation = r.incarnation()?;
    let entries = r.list(|r| {
        let pod = r.name(&names)?;
        let incarnation = r.incarnation()?;
        let count = r.varint()?;
        let at = r.at;
        let seen = r.varint()?;
        let seen_unix = match seen {
            0 => 0,
            // `base - seen_unix + 1`: a seen above base + 1 was never encoded.
            seen => base.checked_sub(seen - 1).ok_or(CompactError::Seen(at))?,
        };
        Ok(Entry {
            pod,
            incarnation,
            count,
            seen_unix,
        })
    })?;
    let retired = r.list(|r| {
        Ok(Retired {
            pod: r.name(&names)?,
            incarnation: r.incarnation()?,
            count: r.varint()?,
        })
    })?;
    let announce = r.address()?;
    let news = r.list(|r| {
        Ok(Notice {
            pod: r.name(&names)?,
            at_ms: r.varint()?,
            addr: r.address()?,
            left: r.byte()? & 1 == 1,
        })
    })?;
    match bytes.len() - r.at {
        0 => Ok(PeerState {
            pod,
            incarnation,
            entries,
            retired,
            announce,
            news,
        }),
        left => Err(CompactError::Trailing(left)),
    }
}

/// Pod names in order of first use, each with its index.
#[derive(Default)]
struct Names<'a> {
    order: Vec<&'a str>,
    index: HashMap<&'a str, u64>,
    bytes: usize,
}

impl<'a> Names<'a> {
    fn intern(&mut self, name: &'a str) {
        if !self.index.contains_key(name) {
            self.index.insert(name, self.order.len() as u64);
            self.order.push(name);
            self.bytes += name.len() + 1;
        }
    }
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Tally's incarnation ids are 16 random bytes in lowercase hex.
fn incarnation(out: &mut Vec<u8>, id: &str) {
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    // Written straight into `out` (no buffer per entry), taken back if a
    // digit turns out not to be lowercase hex.
    let start = out.len();
    if id.len() == 32 {
        out.push(0);
        for pair in id.as_bytes().chunks(2) {
            let (Some(high), Some(low)) = (hex(pair[0]), hex(pair[1])) else {
                out.truncate(start);
                break;
            };
            out.push(high << 4 | low);
        }
        if out.len() > start {
            return;
        }
    }
    varint(out, id.len() as u64 + 1);
    out.extend_from_slice(id.as_bytes());
}

fn address(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        None => out.push(0),
        Some(SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
}

/// A cursor over the bytes; every read checks what is left.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], CompactError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(CompactError::Truncated(self.at))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, CompactError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, CompactError> {
        let start = self.at;
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(CompactError::Varint(start));
            }
            n |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(CompactError::Varint(start))
    }

    /// A length, which can never exceed the bytes left.
    fn len(&mut self) -> Result<usize, CompactError> {
        let at = self.at;
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len() - self.at)
            .ok_or(CompactError::Truncated(at))
    }

    /// A counted list; every item takes at least one byte, so the count
    /// is bounded by the bytes left before anything is allocated.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, CompactError>,
    ) -> Result<Vec<T>, CompactError> {
        let n = self.len()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    fn utf8(&mut self, n: usize) -> Result<String, CompactError> {
        let at = self.at;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CompactError::Utf8(at))
    }

    fn name(&mut self, names: &[String]) -> Result<String, CompactError> {
        let at = self.at;
        let index = self.varint()?;
        usize::try_from(index)
            .ok()
            .and_then(|i| names.get(i))
            .cloned()
            .ok_or(CompactError::NameIndex {
                index,
                names: names.len(),
                at,
            })
    }

    fn incarnation(&mut self) -> Result<String, CompactError> {
        match self.len()? {
            0 => Ok(self.take(16)?.iter().map(|b| format!("{b:02x}")).collect()),
            n => self.utf8(n - 1),
        }
    }

    fn address(&mut self) -> Result<Option<SocketAddr>, CompactError> {
        let at = self.at;
        let port = |r: &mut Self| -> Result<u16, CompactError> {
            Ok(u16::from_be_bytes(
                r.take(2)?.try_into().expect("two bytes"),
            ))
        };
        match self.byte()? {
            0 => Ok(None),
            4 => {
                let ip: [u8; 4] = self.take(4)?.try_into().expect("four bytes");
                let port = port(self)?;
                Ok(Some(SocketAddrV4::new(Ipv4Addr::from(ip), port).into()))
            }
            6 => {
                let ip: [u8; 16] = self.take(16)?.try_into().expect("sixteen bytes");
                let port = port(self)?;
                Ok(Some(
                    SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0).into(),
                ))
            }
            kind => Err(CompactError::AddrKind { kind, at }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9f0c3a6b1d2e4f5a8b7c6d5e4f3a2b1c";

    fn entry(pod: &str, incarnation: &str, count: u64, seen_unix: u64) -> Entry {
        Entry {
            pod: pod.into(),
            incarnation: incarnation.into(),
            count,
            seen_unix,
        }
    }

    fn full() -> PeerState {
        PeerState {
            pod: "tally-1".into(),
            incarnation: ID.into(),
            entries: vec![
                entry("tally-1", ID, 500, 1_700_000_100),
                entry("tally-2", "b2", u64::MAX, 0),
                entry("tally-2", &ID.to_uppercase(), 7, 1_700_000_000),
            ],
            retired: vec![Retired {
                pod: "tally-9".into(),
                incarnation: ID.into(),
                count: 3,
            }],
            announce: Some("10.244.1.3:8081".parse().unwrap()),
            news: vec![
                Notice {
                    pod: "tally-3".into(),
                    at_ms: 1_700_000_000_123,
                    addr: Some("[fd00::3]:8081".parse().unwrap()),
                    left: true,
                },
                Notice {
                    pod: "tally-2".into(),
                    at_ms: 5,
                    addr: None,
                    left: false,
                },
            ],
        }
    }

    #[test]
    fn every_field_round_trips() {
        let state = full();
        assert_eq!(decode(&encode(&state)), Ok(state));
        let bare = PeerState {
            entries: vec![],
            retired: vec![],
            announce: None,
            news: vec![],
            ..full()
        };
        assert_eq!(decode(&encode(&bare)), Ok(bare));
    }

    /// What the form is for: an entry of a tally-made incarnation in a
    /// quarter of its JSON bytes (measured: 25.6 vs 106.6 bytes).
    #[test]
    fn a_tally_entry_takes_a_quarter_of_its_json() {
        let state = |n: usize| PeerState {
            pod: "tally-0".into(),
            incarnation: ID.into(),
            entries: (0..n)
                .map(|i| entry(&format!("tally-{i}"), ID, 123_456 + i as u64, 1_700_000_000))
                .collect(),
            retired: vec![],
            announce: None,
            news: vec![],
        };
        let per_entry = |encode: &dyn Fn(&PeerState) -> usize| {
            (encode(&state(257)) - encode(&state(1))) as f64 / 256.0
        };
        let compact = per_entry(&|s| encode(s).len());
        let json = per_entry(&|s| serde_json::to_vec(s).unwrap().len());
        assert!(compact * 4.0 < json, "{compact} bytes vs {json} as JSON");
    }

    #[test]
    fn damage_is_refused_with_where_it_is() {
        let good = encode(&full());
        assert_eq!(decode(b"{\"pod\":1}"), Err(CompactError::Magic));
        for cut in MAGIC.len()..good.len() {
            let err = decode(&good[..cut]).unwrap_err();
            assert!(
                matches!(err, CompactError::Truncated(at) if at <= cut),
                "cut at {cut}: {err:?}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(CompactError::Trailing(1)));
        // The sender's name index (after magic, base and the name table).
        let mut r = Reader {
            bytes: &good,
            at: MAGIC.len(),
        };
        r.varint().unwrap();
        r.list(|r| {
            r.varint()?;
            let n = r.len()?;
            r.take(n).map(|_| ())
        })
        .unwrap();
        let sender = r.at;
        let mut bad = good.clone();
        bad[sender] = 9;
        assert_eq!(
            decode(&bad),
            Err(CompactError::NameIndex {
                index: 9,
                names: 4,
                at: sender
            })
        );
        let mut eleven = MAGIC.to_vec();
        eleven.extend([0xff; 10]);
        eleven.push(1);
        assert_eq!(decode(&eleven), Err(CompactError::Varint(MAGIC.len())));
    }

    /// A body of a few bytes cannot make the decoder allocate for the
    /// billions of items it claims.
    #[test]
    fn a_count_larger_than_the_bytes_left_is_refused_before_allocating() {
        let mut claim = MAGIC.to_vec();
        varint(&mut claim, 0);
        varint(&mut claim, u64::MAX >> 1);
        assert_eq!(
            decode(&claim),
            Err(CompactError::Truncated(MAGIC.len() + 1))
        );
    }
}
