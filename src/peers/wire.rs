//! The peer protocol's types, in one place: what siblings send each other
//! (and its single decoder, [`decode_state`]), and what
//! `/visits/total` answers.
//!
//! The limits agree by construction: [`MAX_ENTRIES`] is derived from
//! [`MAX_PEER_BODY`] and the longest entry the names allow, so the largest
//! state a pod may hold always fits in the largest body a sibling accepts.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::media;
use crate::merge::{Entry, Key};
use crate::peers::compact;

/// Path of the peer route (`GET`: fetch a state; `PUT`: hand one over).
pub const PEER_PATH: &str = "/peer/state";
/// Path of the retire route (`POST`, used by `tally forget`).
pub const FORGET_PATH: &str = "/peer/forget";
/// Largest peer body read; a longer one is cut off and refused.
pub const MAX_PEER_BODY: usize = 1024 * 1024;
/// Longest pod name: a DNS label.
pub const MAX_POD_LEN: usize = 63;
/// Longest incarnation id.
pub const MAX_INCARNATION_LEN: usize = 64;
/// Bytes of the longest entry as serialised, with its separating comma:
/// `{"pod":"…","incarnation":"…","count":N,"seen_unix":N},` with both
/// names at their longest and both numbers at `u64::MAX` (20 digits).
pub const MAX_ENTRY_BYTES: usize = r#"{"pod":"","incarnation":"","count":,"seen_unix":},"#.len()
    + MAX_POD_LEN
    + MAX_INCARNATION_LEN
    + 2 * 20;
/// Room for the state's own fields around the lists
/// (`{"pod":…,"incarnation":…,"entries":[],"retired":[]}`).
const STATE_OVERHEAD: usize = 256;
/// Most entries (counters plus retirements) a state may hold: as many of
/// the longest as fit in [`MAX_PEER_BODY`].
pub const MAX_ENTRIES: usize = (MAX_PEER_BODY - STATE_OVERHEAD) / MAX_ENTRY_BYTES;

/// The peer route's answer: the sender's own entry plus everything it knows
/// of the others, and the entries retired cluster-wide. Built from local
/// state only; it never fans out further.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerState {
    pub pod: String,
    pub incarnation: String,
    pub entries: Vec<Entry>,
    /// Retired counters (`tally forget`): removed everywhere, for good.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<Retired>,
    /// Set when a starting pod announces itself (`PUT`): where its peer
    /// route answers, so siblings count it before DNS lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<std::net::SocketAddr>,
    /// The newest word the sender has of members coming and going
    /// (announces and hand-overs it received or learned), so a pod that
    /// missed an announce learns it from any sibling that did
    /// ([`announced`](crate::peers::announced)). Counted against
    /// [`MAX_ENTRIES`]: a notice is shorter than an entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub news: Vec<Notice>,
}

/// What a pod heard of a member at `at_ms` (unix milliseconds, the clock
/// of the pod that heard it first): it announced itself at `addr`, or
/// (`left`) it handed its final state over on its way out from `addr`
/// (when known).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Notice {
    pub pod: String,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<std::net::SocketAddr>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub left: bool,
}

impl PeerState {
    /// The key of the counter this state speaks for.
    pub fn sender(&self) -> Key {
        Key {
            pod: self.pod.clone(),
            incarnation: self.incarnation.clone(),
        }
    }

    /// The sender's own entry, first-hand (present once decoded).
    pub fn own(&self) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.pod == self.pod && e.incarnation == self.incarnation)
    }
}

/// A tombstone: this counter was retired by an operator with the count it
/// had then. A relay cannot undo it: a retired key is never merged again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(deny_unknown_fields)]
pub struct Retired {
    pub pod: String,
    pub incarnation: String,
    /// The count it had when retired (shown apart in `/visits/total`).
    pub count: u64,
}

impl Retired {
    pub fn key(&self) -> Key {
        Key {
            pod: self.pod.clone(),
            incarnation: self.incarnation.clone(),
        }
    }
}

/// Why a peer state was refused as a whole, before any of it was merged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("not a peer state: {0}")]
    Malformed(String),
    #[error("state from {sender} has {count} entries, more than the {MAX_ENTRIES} allowed")]
    TooMany { sender: String, count: usize },
    #[error(
        "{0:?} is not a pod name and incarnation (a DNS label of 1-{MAX_POD_LEN} and 1-{MAX_INCARNATION_LEN} letters, digits or '-')"
    )]
    BadName(String),
    #[error("{entry} appears twice in the state from {sender}")]
    Duplicate { sender: String, entry: String },
    #[error("the state from {0} must contain its own entry")]
    MissingSelf(String),
    #[error("the counts in the state from {0} cannot be summed in 64 bits: refused whole")]
    Overflow(String),
}

impl StateError {
    /// Label of `tally_peer_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            StateError::Malformed(_) => "malformed",
            StateError::TooMany { .. } => "too_many",
            StateError::BadName(_) => "bad_name",
            StateError::Duplicate { .. } => "duplicate",
            StateError::MissingSelf(_) => "missing_self",
            StateError::Overflow(_) => "overflow",
        }
    }
}

/// Pod names are DNS labels; incarnations are short ids. Anything else in a
/// sibling's state is refused before it reaches a page or a file.
pub fn valid_name(pod: &str, incarnation: &str) -> bool {
    let label = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    label(pod, MAX_POD_LEN) && label(incarnation, MAX_INCARNATION_LEN)
}

/// The two encodings of a peer state: readable JSON (the default, what
/// people and older pods read) and the [`compact`] form siblings ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Compact,
}

/// What a fetch says it accepts: the compact form first.
pub const ACCEPT_STATE: &str = "application/x-tally-state, application/json;q=0.5";

impl Encoding {
    /// The encoding of a body with this `Content-Type` (JSON unless it
    /// names the compact form: that is what older pods send).
    pub fn of_content_type(content_type: Option<&[u8]>) -> Encoding {
        match content_type.and_then(media::Range::parse) {
            Some(t) if t.is(compact::CONTENT_TYPE) => Encoding::Compact,
            _ => Encoding::Json,
        }
    }

    /// The encoding to answer a request with this `Accept` in: compact only
    /// when it is named and not refused (`q=0`); `*/*` gets JSON.
    pub fn accepted(accept: Option<&[u8]>) -> Encoding {
        if accept.is_some_and(|a| media::asks_for(a, compact::CONTENT_TYPE)) {
            Encoding::Compact
        } else {
            Encoding::Json
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Compact => compact::CONTENT_TYPE,
        }
    }

    pub fn encode(self, state: &PeerState) -> Vec<u8> {
        match self {
            Encoding::Json => serde_json::to_vec(state).expect("a peer state serialises"),
            Encoding::Compact => compact::encode(state),
        }
    }
}

/// `type/subtype` of a media range, without parameters and blanks.
/// The one decoder of a peer state from bytes (the `GET` answer or a
/// hand-over's body, and the fuzzers' entry point, `fuzz/`), in either
/// encoding: parses it and checks everything that needs no knowledge of
/// the cluster: names, duplicates, size, the sender's own entry, and that
/// its counts sum in `u64`. What it means against what this pod knows is
/// [`Counter`](crate::merge::Counter)'s business.
pub fn decode_state(encoding: Encoding, bytes: &[u8]) -> Result<PeerState, StateError> {
    let state: PeerState = match encoding {
        Encoding::Json => {
            serde_json::from_slice(bytes).map_err(|e| StateError::Malformed(e.to_string()))?
        }
        Encoding::Compact => {
            compact::decode(bytes).map_err(|e| StateError::Malformed(e.to_string()))?
        }
    };
    check_peer_state(&state)?;
    Ok(state)
}

/// The context-free checks of [`decode_state`].
pub fn check_peer_state(state: &PeerState) -> Result<(), StateError> {
    let sender = format!("{}/{}", state.pod, state.incarnation);
    if !valid_name(&state.pod, &state.incarnation) {
        return Err(StateError::BadName(sender));
    }
    let size = state.entries.len() + state.retired.len() + state.news.len();
    if size > MAX_ENTRIES {
        return Err(StateError::TooMany {
            sender,
            count: size,
        });
    }
    let mut seen = HashSet::new();
    let mut sum: u64 = 0;
    for e in &state.entries {
        if !valid_name(&e.pod, &e.incarnation) {
            return Err(StateError::BadName(format!("{}/{}", e.pod, e.incarnation)));
        }
        if !seen.insert((e.pod.as_str(), e.incarnation.as_str())) {
            return Err(StateError::Duplicate {
                sender,
                entry: format!("{}/{}", e.pod, e.incarnation),
            });
        }
        sum = sum
            .checked_add(e.count)
            .ok_or_else(|| StateError::Overflow(sender.clone()))?;
    }
    let mut retired = HashSet::new();
    for r in &state.retired {
        if !valid_name(&r.pod, &r.incarnation) {
            return Err(StateError::BadName(format!("{}/{}", r.pod, r.incarnation)));
        }
        if !retired.insert((r.pod.as_str(), r.incarnation.as_str())) {
            return Err(StateError::Duplicate {
                sender,
                entry: format!("{}/{} (retired)", r.pod, r.incarnation),
            });
        }
    }
    let mut heard = HashSet::new();
    for n in &state.news {
        if !valid_name(&n.pod, "news") {
            return Err(StateError::BadName(format!("{}/news", n.pod)));
        }
        if !heard.insert(n.pod.as_str()) {
            return Err(StateError::Duplicate {
                sender,
                entry: format!("{} (news)", n.pod),
            });
        }
    }
    if state.own().is_none() {
        return Err(StateError::MissingSelf(sender));
    }
    Ok(())
}

/// Where a row of `/visits/total` comes from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// This pod's own counter.
    #[serde(rename = "self")]
    Own,
    /// The pod answered during this fan-out.
    Live,
    /// Last known count: the pod did not answer now, is gone, or this is a
    /// replaced volume of it.
    Cached,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Own => "self",
            Source::Live => "live",
            Source::Cached => "cached",
        }
    }
}

/// One row of `/visits/total`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PodView {
    pub pod: String,
    pub incarnation: String,
    pub count: u64,
    pub source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_s: Option<u64>,
    /// No pod has answered for this counter itself, to this pod: it is
    /// known only from what others relayed (`tally forget` removes it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `/visits/total` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TotalView {
    pub total: u64,
    /// True only when every current member answered live and nothing it
    /// said was disputed.
    pub complete: bool,
    /// Current members (from DNS), this pod included.
    pub members: usize,
    pub pods: Vec<PodView>,
    /// Counters retired with `tally forget`: not in `total`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<Retired>,
    /// Why the member list may be stale or empty (DNS trouble).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery_error: Option<String>,
    /// Why the total is not complete although every member answered: what
    /// it counted is not yet on this pod's volume (`peers.state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_error: Option<String>,
}

/// Rows and views as the page and `check-cluster` tests need them.
#[cfg(test)]
impl PodView {
    pub(crate) fn test(pod: &str, count: u64, source: Source, error: Option<&str>) -> PodView {
        PodView {
            pod: pod.into(),
            incarnation: "inc".into(),
            count,
            source,
            latency_ms: None,
            age_s: None,
            unconfirmed: false,
            error: error.map(Into::into),
        }
    }
}

#[cfg(test)]
impl TotalView {
    pub(crate) fn test(complete: bool, pods: Vec<PodView>) -> TotalView {
        TotalView {
            total: pods.iter().map(|p| p.count).sum(),
            complete,
            members: pods.len(),
            pods,
            retired: vec![],
            discovery_error: None,
            persist_error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(pod: &str, inc: &str, count: u64) -> Entry {
        Entry::test(pod, inc, count)
    }

    fn state(entries: Vec<Entry>) -> PeerState {
        PeerState {
            pod: "t-1".into(),
            incarnation: "b".into(),
            entries,
            retired: Vec::new(),
            announce: None,
            news: Vec::new(),
        }
    }

    #[test]
    fn decoder_refuses_what_is_wrong_on_its_face() {
        let table: Vec<(Vec<Entry>, Option<&str>)> = vec![
            (vec![e("t-1", "b", 50), e("t-2", "c", 3)], None),
            (vec![e("t-1", "b", 60), e("t-1", "b", 61)], Some("twice")),
            (vec![e("t-2", "c", 60)], Some("own entry")),
            (
                vec![e("t-1", "b", 60), e("<script>", "c", 1)],
                Some("not a pod name"),
            ),
            (
                vec![e("t-1", "b", 60), e("t-2", &"x".repeat(65), 1)],
                Some("not a pod name"),
            ),
            (
                vec![e("t-1", "b", 11), e("t-2", "c", u64::MAX - 5)],
                Some("cannot be summed"),
            ),
            (vec![e("t-1", "b", u64::MAX)], None),
        ];
        for (entries, want) in table {
            let bytes = serde_json::to_vec(&state(entries)).unwrap();
            let got = decode_state(Encoding::Json, &bytes);
            match want {
                None => assert!(got.is_ok(), "{got:?}"),
                Some(text) => {
                    let msg = got.unwrap_err().to_string();
                    assert!(msg.contains(text), "{msg}");
                }
            }
        }
        for bad in [&b"not json"[..], b"{}", b"{\"pod\":1}"] {
            assert_eq!(
                decode_state(Encoding::Json, bad).unwrap_err().reason(),
                "malformed"
            );
        }
    }

    #[test]
    fn the_entry_limit_fits_the_body_limit_at_the_longest_names() {
        let entries: Vec<Entry> = (0..MAX_ENTRIES)
            .map(|i| Entry {
                pod: format!("{i:0>63}"),
                incarnation: format!("{i:x>64}"),
                count: u64::MAX / MAX_ENTRIES as u64,
                seen_unix: u64::MAX,
            })
            .collect();
        let mut longest = state(entries);
        longest.pod = longest.entries[0].pod.clone();
        longest.incarnation = longest.entries[0].incarnation.clone();
        let bytes = serde_json::to_vec(&longest).unwrap();
        assert!(
            bytes.len() <= MAX_PEER_BODY,
            "{} entries take {} bytes",
            MAX_ENTRIES,
            bytes.len()
        );
        decode_state(Encoding::Json, &bytes).unwrap();
        // The compact form of a state is never longer than its JSON.
        let compact = Encoding::Compact.encode(&longest);
        assert!(compact.len() < bytes.len());
        assert_eq!(
            decode_state(Encoding::Compact, &compact),
            Ok(longest.clone())
        );
        // One more is refused, however short.
        longest.entries.push(e("t-9", "z", 0));
        let bytes = serde_json::to_vec(&longest).unwrap();
        assert_eq!(
            decode_state(Encoding::Json, &bytes).unwrap_err().reason(),
            "too_many"
        );
    }

    /// News counts against the entry limit, so it must never be longer
    /// than the longest entry.
    #[test]
    fn compact_is_answered_only_to_who_names_it() {
        let accepted = |accept: &str| Encoding::accepted(Some(accept.as_bytes()));
        assert_eq!(accepted(ACCEPT_STATE), Encoding::Compact);
        assert_eq!(
            accepted("application/json, Application/X-Tally-State ; q=0.9"),
            Encoding::Compact
        );
        for json in [
            "*/*",
            "application/json",
            "application/x-tally-state;q=0",
            "application/x-tally-state; q=0.0",
            "application/x-tally-state;Q=0 ",
            "application/x-tally-states",
        ] {
            assert_eq!(accepted(json), Encoding::Json, "{json}");
        }
        assert_eq!(Encoding::accepted(None), Encoding::Json);
        let of = |ct: &str| Encoding::of_content_type(Some(ct.as_bytes()));
        assert_eq!(of("application/x-tally-state"), Encoding::Compact);
        assert_eq!(of("application/json; charset=utf-8"), Encoding::Json);
        assert_eq!(Encoding::of_content_type(None), Encoding::Json);
    }

    #[test]
    fn the_longest_notice_is_shorter_than_the_longest_entry() {
        let notice = Notice {
            pod: "p".repeat(MAX_POD_LEN),
            at_ms: u64::MAX,
            addr: Some(
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                    .parse()
                    .unwrap(),
            ),
            left: true,
        };
        let bytes = serde_json::to_vec(&notice).unwrap().len() + 1;
        assert!(bytes <= MAX_ENTRY_BYTES, "{bytes} > {MAX_ENTRY_BYTES}");
    }

    #[test]
    fn news_with_bad_names_duplicates_or_too_many_is_refused() {
        let notice = |pod: &str| Notice {
            pod: pod.into(),
            at_ms: 1,
            addr: None,
            left: false,
        };
        let mut s = state(vec![e("t-1", "b", 1)]);
        s.news = vec![notice("t-2"), notice("t-3")];
        decode_state(Encoding::Json, &serde_json::to_vec(&s).unwrap()).unwrap();
        s.news = vec![notice("t 2")];
        let bad = decode_state(Encoding::Json, &serde_json::to_vec(&s).unwrap()).unwrap_err();
        assert_eq!(bad.reason(), "bad_name");
        s.news = vec![notice("t-2"), notice("t-2")];
        let twice = decode_state(Encoding::Json, &serde_json::to_vec(&s).unwrap()).unwrap_err();
        assert_eq!(twice.reason(), "duplicate");
        s.news = (0..MAX_ENTRIES)
            .map(|i| notice(&format!("t-{i}")))
            .collect();
        let many = decode_state(Encoding::Json, &serde_json::to_vec(&s).unwrap()).unwrap_err();
        assert_eq!(many.reason(), "too_many");
    }
}
