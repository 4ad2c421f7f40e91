//! The cluster counter: a grow-only counter (G-Counter) keyed by
//! `(pod, incarnation)`.
//!
//! Each pod is the only writer of its own entry and its count only grows, so
//! merging two states takes the max per key and the total is the sum. Hence
//! the total never goes down (a pod that is gone keeps its last count), the
//! same pod reported by two siblings is one entry, and a replaced volume is a
//! new entry beside the old one. Pure logic: no I/O here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most entries a state may hold; bounds memory and the peer payload.
pub const MAX_ENTRIES: usize = 10_000;

/// Identifies one counter: a pod on one volume.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub pod: String,
    pub incarnation: String,
}

/// One counter on the wire and on disk.
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
    pub fn key(&self) -> Key {
        Key {
            pod: self.pod.clone(),
            incarnation: self.incarnation.clone(),
        }
    }
}

/// What we know of one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub count: u64,
    pub seen_unix: u64,
}

/// Why a sibling's state was refused as a whole.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error(
        "{pod} ({incarnation}) reported {reported} visits but had already reported {known}: counts never go down"
    )]
    Regression {
        pod: String,
        incarnation: String,
        known: u64,
        reported: u64,
    },
    #[error("{pod} reported {reported} visits for this pod's own counter, which holds {actual}")]
    ForgedSelf {
        pod: String,
        reported: u64,
        actual: u64,
    },
    #[error("{0} appears twice in one state")]
    Duplicate(String),
    #[error("state has {0} entries, more than the {MAX_ENTRIES} allowed")]
    TooMany(usize),
    #[error("a sibling's state must contain its own entry {0}")]
    MissingSelf(String),
    #[error(
        "{0:?} is not a pod name and incarnation (a DNS label and 1-64 letters, digits or '-')"
    )]
    BadName(String),
}

/// Pod names are DNS labels; incarnations are short ids. Anything else in a
/// sibling's state is refused before it reaches a page or a file.
fn valid_key(e: &Entry) -> bool {
    let label = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    label(&e.pod, 63) && label(&e.incarnation, 64)
}

/// The merged state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counter {
    entries: BTreeMap<Key, Known>,
}

impl Counter {
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Counter {
        let mut counter = Counter::default();
        for e in entries {
            counter.observe(&e.key(), e.count, e.seen_unix);
        }
        counter
    }

    /// Merges one count by max; returns whether anything changed.
    pub fn observe(&mut self, key: &Key, count: u64, seen_unix: u64) -> bool {
        match self.entries.get_mut(key) {
            Some(known) => {
                let before = *known;
                known.count = known.count.max(count);
                known.seen_unix = known.seen_unix.max(seen_unix);
                *known != before
            }
            None => {
                self.entries.insert(key.clone(), Known { count, seen_unix });
                true
            }
        }
    }

    /// Checks a sibling's state before any of it is merged: its own entry
    /// must be there and must not go down (a regression means a forged or
    /// broken peer), and it must not claim more for `me` than `me` counted.
    /// Second-hand entries lower than ours are just stale, not an error.
    pub fn check(&self, from: &Key, entries: &[Entry], me: &Entry) -> Result<(), MergeError> {
        if entries.len() > MAX_ENTRIES {
            return Err(MergeError::TooMany(entries.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for e in entries {
            if !valid_key(e) {
                return Err(MergeError::BadName(format!("{}/{}", e.pod, e.incarnation)));
            }
            if !seen.insert(e.key()) {
                return Err(MergeError::Duplicate(format!(
                    "{}/{}",
                    e.pod, e.incarnation
                )));
            }
            if e.pod == me.pod && e.incarnation == me.incarnation && e.count > me.count {
                return Err(MergeError::ForgedSelf {
                    pod: from.pod.clone(),
                    reported: e.count,
                    actual: me.count,
                });
            }
        }
        let own = entries
            .iter()
            .find(|e| e.key() == *from)
            .ok_or_else(|| MergeError::MissingSelf(format!("{}/{}", from.pod, from.incarnation)))?;
        if let Some(known) = self.entries.get(from)
            && own.count < known.count
        {
            return Err(MergeError::Regression {
                pod: from.pod.clone(),
                incarnation: from.incarnation.clone(),
                known: known.count,
                reported: own.count,
            });
        }
        let new_keys = entries
            .iter()
            .filter(|e| !self.entries.contains_key(&e.key()))
            .count();
        if self.entries.len() + new_keys > MAX_ENTRIES {
            return Err(MergeError::TooMany(self.entries.len() + new_keys));
        }
        Ok(())
    }

    /// Checks a sibling's state ([`check`](Self::check)), marks its own entry
    /// as confirmed `now`, and merges it; returns whether anything changed.
    pub fn absorb(
        &mut self,
        from: &Key,
        entries: &[Entry],
        me: &Entry,
        now: u64,
    ) -> Result<bool, MergeError> {
        self.check(from, entries, me)?;
        let mut changed = false;
        for e in entries {
            let seen = if e.key() == *from { now } else { e.seen_unix };
            changed |= self.observe(&e.key(), e.count, seen);
        }
        Ok(changed)
    }

    /// Merges every entry by max; returns whether anything changed.
    pub fn merge(&mut self, entries: &[Entry]) -> bool {
        let mut changed = false;
        for e in entries {
            changed |= self.observe(&e.key(), e.count, e.seen_unix);
        }
        changed
    }

    pub fn get(&self, key: &Key) -> Option<Known> {
        self.entries.get(key).copied()
    }

    /// Sum of all entries: the cluster total.
    pub fn total(&self) -> u64 {
        self.entries.values().map(|k| k.count).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(pod: &str, inc: &str, count: u64) -> Entry {
        Entry {
            pod: pod.into(),
            incarnation: inc.into(),
            count,
            seen_unix: 0,
        }
    }

    #[test]
    fn merge_is_max_per_key_and_total_is_sum() {
        let mut a = Counter::from_entries([e("t-0", "x", 5), e("t-1", "y", 3)]);
        a.merge(&[e("t-1", "y", 7), e("t-2", "z", 2)]);
        a.merge(&[e("t-1", "y", 4)]);
        assert_eq!(a.get(&e("t-1", "y", 0).key()).unwrap().count, 7);
        assert_eq!(a.total(), 5 + 7 + 2);
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
        assert_eq!(results[0].total(), 6 + 9 + 2 + 3);
    }

    #[test]
    fn same_pod_from_two_siblings_is_one_entry() {
        let mut c = Counter::default();
        c.merge(&[e("t-2", "z", 10)]);
        c.merge(&[e("t-2", "z", 10)]);
        assert_eq!((c.len(), c.total()), (1, 10));
    }

    #[test]
    fn replaced_volume_keeps_old_visits() {
        let mut c = Counter::from_entries([e("t-1", "old", 40)]);
        c.merge(&[e("t-1", "new", 2)]);
        assert_eq!(c.total(), 42);
    }

    #[test]
    fn check_refuses_regression_forgery_duplicates_and_missing_self() {
        let me = e("t-0", "m", 10);
        let known = Counter::from_entries([e("t-1", "b", 50), e("t-2", "c", 9)]);
        let from = e("t-1", "b", 0).key();
        let table: Vec<(Vec<Entry>, Option<&str>)> = vec![
            (vec![e("t-1", "b", 50), e("t-2", "c", 3)], None),
            (vec![e("t-1", "b", 49)], Some("never go down")),
            (
                vec![e("t-1", "b", 60), e("t-0", "m", 11)],
                Some("own counter"),
            ),
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
        ];
        for (entries, want) in table {
            let got = known.check(&from, &entries, &me);
            match want {
                None => assert_eq!(got, Ok(())),
                Some(text) => {
                    let msg = got.unwrap_err().to_string();
                    assert!(msg.contains(text), "{msg}");
                }
            }
        }
    }

    #[test]
    fn absorb_stamps_only_the_senders_own_entry() {
        let me = e("t-0", "m", 0);
        let mut c = Counter::default();
        let from = e("t-1", "b", 0).key();
        let changed = c
            .absorb(&from, &[e("t-1", "b", 4), e("t-2", "c", 3)], &me, 99)
            .unwrap();
        assert!(changed);
        assert_eq!(
            c.get(&from).unwrap(),
            Known {
                count: 4,
                seen_unix: 99
            }
        );
        assert_eq!(c.get(&e("t-2", "c", 0).key()).unwrap().seen_unix, 0);
        assert!(c.absorb(&from, &[e("t-1", "b", 3)], &me, 100).is_err());
        assert_eq!(
            c.get(&from).unwrap().count,
            4,
            "a refused state changes nothing"
        );
    }

    #[test]
    fn check_bounds_entry_count() {
        let me = e("t-0", "m", 0);
        let many: Vec<Entry> = (0..=MAX_ENTRIES)
            .map(|i| e(&format!("p-{i}"), "i", 1))
            .collect();
        let from = many[0].key();
        assert!(matches!(
            Counter::default().check(&from, &many, &me),
            Err(MergeError::TooMany(_))
        ));
    }
}
