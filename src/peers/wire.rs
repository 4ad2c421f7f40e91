//! What siblings send each other, and what `/visits/total` answers.

use serde::{Deserialize, Serialize};

use crate::merge::Entry;

/// Path of the peer route.
pub const PEER_PATH: &str = "/peer/state";
/// Largest peer answer read; a longer one is cut off and refused.
pub const MAX_PEER_BODY: usize = 1024 * 1024;

/// The peer route's answer: the sender's own entry plus everything it knows
/// of the others. Built from local state only; it never fans out further.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerState {
    pub pod: String,
    pub incarnation: String,
    pub entries: Vec<Entry>,
    /// Set when a starting pod announces itself (`PUT`): where its peer
    /// route answers, so siblings count it before DNS lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<std::net::SocketAddr>,
}

/// Decodes a peer state from the bytes a sibling sent (the `GET` answer or a
/// hand-over's body). The one decoder for peer bytes, so both paths refuse
/// the same things; the merge checks ([`Counter::check`]) come after it.
///
/// [`Counter::check`]: crate::merge::Counter::check
pub fn decode_state(bytes: &[u8]) -> Result<PeerState, serde_json::Error> {
    serde_json::from_slice(bytes)
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `/visits/total` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TotalView {
    pub total: u64,
    /// True only when every current member answered live.
    pub complete: bool,
    /// Current members (from DNS), this pod included.
    pub members: usize,
    pub pods: Vec<PodView>,
    /// Why the member list may be stale or empty (DNS trouble).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery_error: Option<String>,
}
