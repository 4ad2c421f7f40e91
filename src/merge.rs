//! The cluster counter: a grow-only counter (G-Counter) keyed by
//! `(pod, incarnation)`, with the trust rules of design.md §4.
//!
//! Each pod is the only writer of its own entry and its count only grows, so
//! merging two states takes the max per key and the total is the sum. Hence
//! the total never goes down (a pod that is gone keeps its last count), the
//! same pod reported by two siblings is one entry, and a replaced volume is a
//! new entry beside the old one.
//!
//! What a sibling says is not taken on faith:
//! - sums are checked: a state that would make the total overflow `u64` is
//!   refused whole, naming its sender;
//! - a pod is the authority on its own entry: a value relayed about a pod
//!   that answered for itself is not merged above what it said (it is
//!   reported as a [`Dispute`]); a pod whose own report is lower than what
//!   is known is not refused (it was restored from a backup, and forks);
//! - retired keys (`tally forget`) are tombstones: never merged again.
//!
//! Pure logic: no I/O here.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::peers::wire::{MAX_ENTRIES, PeerState, Retired};

/// Identifies one counter: a pod on one volume.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub pod: String,
    pub incarnation: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pod, self.incarnation)
    }
}

/// One counter on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub pod: String,
    pub incarnation: String,
    pub count: u64,
    /// When this count was last confirmed first-hand by anyone, seconds since
    /// the epoch (0 if unknown). Only informs `age_s`; never the merge.
    #[serde(default)]
    pub seen_unix: u64,
}

impl Entry {
    /// An entry never confirmed first-hand: what unit tests build states from.
    #[cfg(test)]
    pub(crate) fn test(pod: &str, incarnation: &str, count: u64) -> Entry {
        Entry {
            pod: pod.into(),
            incarnation: incarnation.into(),
            count,
            seen_unix: 0,
        }
    }

    pub fn key(&self) -> Key {
        Key {
            pod: self.pod.clone(),
            incarnation: self.incarnation.clone(),
        }
    }
}

/// What we know of one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub count: u64,
    pub seen_unix: u64,
    /// Highest count the pod itself reported to this pod; `None` while the
    /// counter is known only from relays (shown as unconfirmed).
    pub first_hand: Option<u64>,
}

/// Why a sibling's state was refused as a whole.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error(
        "the state from {0} would take the cluster total past 2^64: refused whole (a forged or broken sibling)"
    )]
    Overflow(String),
    #[error(
        "the state from {sender} would take this pod past {MAX_ENTRIES} counters ({count}); retire gone ones with `tally forget`"
    )]
    TooMany { sender: String, count: usize },
}

impl MergeError {
    /// Label of `tally_peer_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            MergeError::Overflow(_) => "overflow",
            MergeError::TooMany { .. } => "too_many",
        }
    }
}

/// A value about a counter that disagrees with what its pod says itself:
/// the higher value is not taken from a relay, and the lower one does not
/// lower what is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispute {
    pub key: Key,
    /// Who said the higher value.
    pub relayed_by: String,
    pub relayed: u64,
    /// What the pod itself reported.
    pub first_hand: u64,
}

impl Dispute {
    /// Label of `tally_peer_refusals_total`.
    pub fn reason(&self) -> &'static str {
        if self.relayed_by == self.key.to_string() {
            "below_known"
        } else {
            "above_first_hand"
        }
    }
}

impl std::fmt::Display for Dispute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reason() == "below_known" {
            write!(
                f,
                "reported {} for itself, below the {} known: a volume restored from a backup? (it starts a new incarnation when it restarts)",
                self.first_hand, self.relayed
            )
        } else {
            write!(
                f,
                "{} relayed {} for this counter, above the {} it reports itself: ignored",
                self.relayed_by, self.relayed, self.first_hand
            )
        }
    }
}

/// What absorbing one state did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Absorbed {
    /// Anything changed (persist).
    pub changed: bool,
    /// Relayed values ignored because the pod said less itself.
    pub disputes: Vec<Dispute>,
}

/// The merged state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counter {
    entries: BTreeMap<Key, Known>,
    /// Tombstones: retired key → count when retired.
    retired: BTreeMap<Key, u64>,
}

impl Counter {
    /// Rebuilds a counter from what was persisted.
    pub fn restore(
        entries: impl IntoIterator<Item = (Key, Known)>,
        retired: impl IntoIterator<Item = Retired>,
    ) -> Counter {
        let retired: BTreeMap<Key, u64> = retired.into_iter().map(|r| (r.key(), r.count)).collect();
        Counter {
            entries: entries
                .into_iter()
                .filter(|(k, _)| !retired.contains_key(k))
                .collect(),
            retired,
        }
    }

    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Counter {
        let mut counter = Counter::default();
        for e in entries {
            counter.observe(&e.key(), e.count, e.seen_unix, false);
        }
        counter
    }

    /// Merges one count by max; returns whether anything changed. A
    /// retired key stays retired.
    fn observe(&mut self, key: &Key, count: u64, seen_unix: u64, first_hand: bool) -> bool {
        if self.retired.contains_key(key) {
            return false;
        }
        let fresh = Known {
            count,
            seen_unix,
            first_hand: first_hand.then_some(count),
        };
        match self.entries.get_mut(key) {
            Some(known) => {
                let before = *known;
                known.count = known.count.max(count);
                known.seen_unix = known.seen_unix.max(seen_unix);
                known.first_hand = known.first_hand.max(fresh.first_hand);
                *known != before
            }
            None => {
                self.entries.insert(key.clone(), fresh);
                true
            }
        }
    }

    /// Merges a sibling's state. `me` is this pod's own counter (never
    /// taken from others: a higher relayed value for it is a dispute). `answered` holds what pods said for
    /// themselves (this round's live answers, or for a hand-over the current
    /// members with `None`: they answer for themselves); relays about them
    /// above that are not merged. The sender's own entry is first-hand and
    /// stamped `now`. Refused whole only when the sums cannot be done or
    /// the entry limit would be passed: never for a value.
    pub fn absorb(
        &mut self,
        state: &PeerState,
        me: &Key,
        my_count: u64,
        answered: &BTreeMap<String, Option<(String, u64)>>,
        now: u64,
    ) -> Result<Absorbed, MergeError> {
        self.absorb_from(state, me, my_count, answered, now, true)
    }

    /// [`absorb`](Self::absorb), where `member` says whether the sender is
    /// known to be a member: a state handed over by a pod nobody listed is
    /// merged, but its own entry is not taken as first-hand (it is shown
    /// unconfirmed until someone hears that pod itself).
    pub fn absorb_from(
        &mut self,
        state: &PeerState,
        me: &Key,
        my_count: u64,
        answered: &BTreeMap<String, Option<(String, u64)>>,
        now: u64,
        member: bool,
    ) -> Result<Absorbed, MergeError> {
        let sender = state.sender();
        let mut retired = self.retired.clone();
        for r in &state.retired {
            retired.entry(r.key()).or_insert(r.count);
        }
        // What merging would give, checked before anything is changed.
        let mut total = self.total_checked();
        let mut added = BTreeSet::new();
        let mut plan = Vec::new();
        let mut out = Absorbed::default();
        let mut tombstones = Vec::new();
        for e in &state.entries {
            let key = e.key();
            if key == *me {
                // This pod is the authority on its own counter, retired or
                // not, so what relays say of it never changes anything here
                // (in whichever order states arrive). A volume restored from
                // a backup learns it before counting: see
                // `peers::what_siblings_know`.
                if e.count > my_count {
                    out.disputes.push(Dispute {
                        key,
                        relayed_by: sender.to_string(),
                        relayed: e.count,
                        first_hand: my_count,
                    });
                }
                continue;
            }
            if retired.contains_key(&key) {
                // Never counted again, but what it had reached still raises
                // the tombstone, whichever of the two arrived first.
                tombstones.push(Retired {
                    pod: e.pod.clone(),
                    incarnation: e.incarnation.clone(),
                    count: e.count,
                });
                continue;
            }
            let first_hand = key == sender && member;
            if !first_hand && let Some(said) = answered.get(&e.pod) {
                match said {
                    Some((incarnation, count)) if *incarnation == e.incarnation => {
                        if e.count > *count {
                            out.disputes.push(Dispute {
                                key,
                                relayed_by: sender.to_string(),
                                relayed: e.count,
                                first_hand: *count,
                            });
                            continue;
                        }
                    }
                    // A current member's other incarnations: its old
                    // volumes, which only relays can tell about.
                    Some(_) => {}
                    None => continue,
                }
            }
            let known = self.entries.get(&key).map_or(0, |k| k.count);
            if first_hand && e.count < known {
                out.disputes.push(Dispute {
                    key: key.clone(),
                    relayed_by: sender.to_string(),
                    relayed: known,
                    first_hand: e.count,
                });
            }
            if !self.entries.contains_key(&key) {
                added.insert(key.clone());
            }
            if e.count > known {
                total = total.and_then(|t| t.checked_add(e.count - known));
            }
            plan.push((key, e.count, first_hand));
        }
        if total.is_none() {
            return Err(MergeError::Overflow(sender.to_string()));
        }
        let size = self.entries.len() + added.len() + retired.len();
        if size > MAX_ENTRIES {
            return Err(MergeError::TooMany {
                sender: sender.to_string(),
                count: size,
            });
        }
        for r in state.retired.iter().cloned().chain(tombstones) {
            out.changed |= self.retire(r);
        }
        for (key, count, first_hand) in plan {
            let seen = if first_hand {
                now
            } else {
                state
                    .entries
                    .iter()
                    .find(|e| e.key() == key)
                    .map_or(0, |e| e.seen_unix)
            };
            out.changed |= self.observe(&key, count, seen, first_hand);
        }
        Ok(out)
    }

    /// Retires a counter for good (or learns a higher count it had when
    /// retired); returns whether this was news.
    pub fn retire(&mut self, retired: Retired) -> bool {
        let key = retired.key();
        let count = self
            .entries
            .remove(&key)
            .map_or(retired.count, |k| k.count.max(retired.count));
        // Tombstones merge by max like counts, so the order in which two
        // relays arrive cannot change what the cluster ends up showing.
        match self.retired.get_mut(&key) {
            Some(known) if *known >= count => false,
            Some(known) => {
                *known = count;
                true
            }
            None => {
                self.retired.insert(key, count);
                true
            }
        }
    }

    /// Merges every entry by max as relayed (not first-hand); returns
    /// whether anything changed. For benchmarks and tests.
    pub fn merge(&mut self, entries: &[Entry]) -> bool {
        let mut changed = false;
        for e in entries {
            changed |= self.observe(&e.key(), e.count, e.seen_unix, false);
        }
        changed
    }

    /// Records this pod's own count (first-hand by definition).
    pub fn observe_own(&mut self, me: &Entry) -> bool {
        self.observe(&me.key(), me.count, me.seen_unix, true)
    }

    pub fn get(&self, key: &Key) -> Option<Known> {
        self.entries.get(key).copied()
    }

    pub fn is_retired(&self, key: &Key) -> bool {
        self.retired.contains_key(key)
    }

    /// Sum of all entries, `None` if it does not fit (never, for states
    /// merged through [`absorb`](Self::absorb)).
    pub fn total_checked(&self) -> Option<u64> {
        self.entries
            .values()
            .try_fold(0u64, |sum, k| sum.checked_add(k.count))
    }

    /// Counters plus tombstones: what the entry limit bounds.
    pub fn len(&self) -> usize {
        self.entries.len() + self.retired.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, ordered by pod then incarnation.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.entries.iter().map(|(k, v)| Entry {
            pod: k.pod.clone(),
            incarnation: k.incarnation.clone(),
            count: v.count,
            seen_unix: v.seen_unix,
        })
    }

    /// Every entry with what is known of it.
    pub fn known(&self) -> impl Iterator<Item = (&Key, &Known)> + '_ {
        self.entries.iter()
    }

    /// Every tombstone, ordered.
    pub fn retired(&self) -> impl Iterator<Item = Retired> + '_ {
        self.retired.iter().map(|(k, count)| Retired {
            pod: k.pod.clone(),
            incarnation: k.incarnation.clone(),
            count: *count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(pod: &str, inc: &str, count: u64) -> Entry {
        Entry::test(pod, inc, count)
    }

    fn k(pod: &str, inc: &str) -> Key {
        e(pod, inc, 0).key()
    }

    fn state(pod: &str, inc: &str, entries: Vec<Entry>) -> PeerState {
        PeerState {
            pod: pod.into(),
            incarnation: inc.into(),
            entries,
            retired: Vec::new(),
            announce: None,
            news: Vec::new(),
        }
    }

    fn none() -> BTreeMap<String, Option<(String, u64)>> {
        BTreeMap::new()
    }

    #[test]
    fn merge_is_max_per_key_and_total_is_sum() {
        let mut a = Counter::from_entries([e("t-0", "x", 5), e("t-1", "y", 3)]);
        a.merge(&[e("t-1", "y", 7), e("t-2", "z", 2)]);
        a.merge(&[e("t-1", "y", 4)]);
        assert_eq!(a.get(&k("t-1", "y")).unwrap().count, 7);
        assert_eq!(a.total_checked(), Some(5 + 7 + 2));
    }

    #[test]
    fn merge_is_commutative_associative_idempotent() {
        let xs = [
            vec![e("t-0", "a", 1), e("t-1", "b", 9)],
            vec![e("t-1", "b", 4), e("t-2", "c", 2)],
            vec![e("t-0", "a", 6), e("t-0", "old", 3)],
        ];
        let orders = [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]];
        let results: Vec<Counter> = orders
            .iter()
            .map(|order: &[usize; 3]| {
                let mut c = Counter::default();
                for &i in order {
                    c.merge(&xs[i]);
                    c.merge(&xs[i]);
                }
                c
            })
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(results[0].total_checked(), Some(6 + 9 + 2 + 3));
    }

    #[test]
    fn same_pod_from_two_siblings_is_one_entry_and_replaced_volume_keeps_old_visits() {
        let mut c = Counter::default();
        c.merge(&[e("t-2", "z", 10)]);
        c.merge(&[e("t-2", "z", 10)]);
        assert_eq!((c.len(), c.total_checked()), (1, Some(10)));
        c.merge(&[e("t-2", "new", 2)]);
        assert_eq!(c.total_checked(), Some(12));
    }

    #[test]
    fn absorb_applies_the_trust_rules() {
        let me = k("t-0", "m");
        struct Case {
            name: &'static str,
            entries: Vec<Entry>,
            answered: Vec<(&'static str, Option<(&'static str, u64)>)>,
            total: Option<u64>,
            disputes: usize,
            error: Option<&'static str>,
        }
        let cases = vec![
            Case {
                name: "honest state merges by max",
                entries: vec![e("t-1", "b", 50), e("t-2", "c", 3)],
                answered: vec![],
                total: Some(10 + 50 + 9),
                disputes: 0,
                error: None,
            },
            Case {
                name: "a lower own report is not refused (restored sibling)",
                entries: vec![e("t-1", "b", 20)],
                answered: vec![],
                total: Some(10 + 40 + 9),
                disputes: 1,
                error: None,
            },
            Case {
                name: "a relay above what the pod said itself is not merged",
                entries: vec![e("t-1", "b", 41), e("t-2", "c", 1_000_000)],
                answered: vec![("t-2", Some(("c", 12)))],
                total: Some(10 + 41 + 9),
                disputes: 1,
                error: None,
            },
            Case {
                name: "a hand-over does not speak for current members",
                entries: vec![e("t-1", "b", 41), e("t-2", "c", 1_000_000)],
                answered: vec![("t-2", None)],
                total: Some(10 + 41 + 9),
                disputes: 0,
                error: None,
            },
            Case {
                name: "a member's old volume is still learnt from relays",
                entries: vec![e("t-1", "b", 41), e("t-2", "old", 5)],
                answered: vec![("t-2", Some(("c", 12)))],
                total: Some(10 + 41 + 9 + 5),
                disputes: 0,
                error: None,
            },
            Case {
                name: "this pod is the authority on its own counter",
                entries: vec![e("t-1", "b", 41), e("t-0", "m", 30)],
                answered: vec![],
                total: Some(10 + 41 + 9),
                disputes: 1,
                error: None,
            },
            Case {
                name: "a sum past 2^64 is refused whole, naming the sender",
                entries: vec![e("t-1", "b", 41), e("t-9", "z", u64::MAX - 50)],
                answered: vec![],
                total: Some(10 + 40 + 9),
                disputes: 0,
                error: Some("t-1/b would take the cluster total past 2^64"),
            },
        ];
        for case in cases {
            let mut c =
                Counter::from_entries([e("t-0", "m", 10), e("t-1", "b", 40), e("t-2", "c", 9)]);
            let answered = case
                .answered
                .iter()
                .map(|(pod, said)| (pod.to_string(), said.map(|(i, n)| (i.to_string(), n))))
                .collect();
            let got = c.absorb(&state("t-1", "b", case.entries), &me, 10, &answered, 7);
            match (case.error, got) {
                (None, Ok(absorbed)) => {
                    assert_eq!(absorbed.disputes.len(), case.disputes, "{}", case.name);
                }
                (Some(want), Err(error)) => {
                    assert!(error.to_string().contains(want), "{}: {error}", case.name)
                }
                (_, got) => panic!("{}: {got:?}", case.name),
            }
            assert_eq!(c.total_checked(), case.total, "{}", case.name);
        }
    }

    #[test]
    fn absorb_stamps_and_confirms_only_the_senders_own_entry() {
        let me = k("t-0", "m");
        let mut c = Counter::default();
        let s = state("t-1", "b", vec![e("t-1", "b", 4), e("t-2", "c", 3)]);
        assert!(c.absorb(&s, &me, 0, &none(), 99).unwrap().changed);
        let own = c.get(&k("t-1", "b")).unwrap();
        assert_eq!((own.seen_unix, own.first_hand), (99, Some(4)));
        let relayed = c.get(&k("t-2", "c")).unwrap();
        assert_eq!((relayed.seen_unix, relayed.first_hand), (0, None));
    }

    #[test]
    fn a_tombstone_cannot_be_undone_by_a_relay() {
        let me = k("t-0", "m");
        let mut c = Counter::from_entries([e("t-2", "c", 9), e("t-1", "b", 1)]);
        assert!(c.retire(Retired {
            pod: "t-2".into(),
            incarnation: "c".into(),
            count: 0
        }));
        assert_eq!(c.retired().next().unwrap().count, 9, "keeps the count");
        let s = state("t-1", "b", vec![e("t-1", "b", 2), e("t-2", "c", 10)]);
        c.absorb(&s, &me, 0, &none(), 1).unwrap();
        assert_eq!(c.total_checked(), Some(2));
        assert!(c.is_retired(&k("t-2", "c")));
        // And tombstones spread.
        let mut other = Counter::from_entries([e("t-2", "c", 9)]);
        let mut with = state("t-0", "m", vec![e("t-0", "m", 0)]);
        with.retired = c.retired().collect();
        assert!(
            other
                .absorb(&with, &k("t-1", "b"), 0, &none(), 1)
                .unwrap()
                .changed
        );
        assert_eq!(other.total_checked(), Some(0));
    }

    #[test]
    fn absorb_bounds_entry_count() {
        let me = k("t-0", "m");
        let mut c = Counter::from_entries((0..MAX_ENTRIES).map(|i| e(&format!("p-{i}"), "i", 1)));
        let s = state("t-1", "b", vec![e("t-1", "b", 1)]);
        let error = c.absorb(&s, &me, 0, &none(), 1).unwrap_err();
        assert_eq!(error.reason(), "too_many");
        assert_eq!(c.len(), MAX_ENTRIES, "a refused state changes nothing");
    }
}
