//! `/visits/total` from what is known ([`Counter`]) and how the last round
//! went ([`Round`]): row classification and arithmetic, pure and
//! table-tested. No I/O, no metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::merge::{Counter, Entry, Key};
use crate::peers::wire::{PodView, Source, TotalView};

/// How one member fared in a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It answered for itself with this counter.
    Live {
        incarnation: String,
        latency: Duration,
    },
    Failed(String),
}

/// The result of one round.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Round {
    /// Current members (pod names, this pod included); `None` when
    /// standalone (no discovery configured).
    pub members: Option<Vec<String>>,
    pub discovery_error: Option<String>,
    /// By pod name.
    pub outcomes: BTreeMap<String, Outcome>,
    /// Relayed values not merged because the pod said less itself, by key.
    pub disputes: BTreeMap<Key, String>,
    /// Members that handed their final state over on their way out (a
    /// cached DNS answer still lists them): if they do not answer, their
    /// last count is known exactly and they do not make the total
    /// incomplete.
    pub departed: std::collections::BTreeSet<String>,
}

/// The view of the cluster from `me` (this pod's own entry, from its store).
pub fn view(counter: &Counter, round: &Round, me: &Entry, now: u64) -> TotalView {
    let my_key = me.key();
    let mut pods = vec![PodView {
        pod: me.pod.clone(),
        incarnation: me.incarnation.clone(),
        count: me.count,
        source: Source::Own,
        latency_ms: None,
        age_s: None,
        unconfirmed: false,
        error: None,
    }];
    let heard_of = |pod: &str| {
        counter
            .known()
            .any(|(k, v)| k.pod == pod && v.first_hand.is_some())
            || round
                .members
                .as_ref()
                .is_some_and(|m| m.iter().any(|p| p == pod))
    };
    let mut total = me.count;
    for (key, known) in counter.known().filter(|(k, _)| **k != my_key) {
        let is_member = round.members.as_ref().is_none_or(|m| m.contains(&key.pod));
        let (source, latency_ms, error) = match round.outcomes.get(&key.pod) {
            Some(Outcome::Live {
                incarnation,
                latency,
            }) if *incarnation == key.incarnation => (
                Source::Live,
                Some((latency.as_secs_f64() * 1e6).round() / 1e3),
                None,
            ),
            Some(Outcome::Live { incarnation, .. }) => (
                Source::Cached,
                None,
                Some(format!(
                    "an earlier volume; {} now runs incarnation {incarnation}",
                    key.pod
                )),
            ),
            Some(Outcome::Failed(error)) => (Source::Cached, None, Some(error.clone())),
            None if key.pod == me.pod => (
                Source::Cached,
                None,
                Some(format!(
                    "an earlier volume; this pod now runs incarnation {}",
                    me.incarnation
                )),
            ),
            None if !is_member => (
                Source::Cached,
                None,
                Some("not a current member".to_string()),
            ),
            None => (Source::Cached, None, None),
        };
        let error = match (round.disputes.get(key), error) {
            (Some(dispute), Some(error)) => Some(format!("{error}; {dispute}")),
            (Some(dispute), None) => Some(dispute.clone()),
            (None, error) => error,
        };
        // Sums cannot wrap: every merged state was checked against the
        // total, so this saturating add never saturates in practice.
        total = total.saturating_add(known.count);
        pods.push(PodView {
            age_s: (source == Source::Cached && known.seen_unix > 0)
                .then(|| now.saturating_sub(known.seen_unix)),
            pod: key.pod.clone(),
            incarnation: key.incarnation.clone(),
            count: known.count,
            source,
            latency_ms,
            unconfirmed: !heard_of(&key.pod),
            error,
        });
    }
    // A member that failed and was never heard from still gets a row, so
    // its error is reported (it adds nothing to the total).
    for (pod, outcome) in &round.outcomes {
        if let Outcome::Failed(error) = outcome
            && !pods.iter().any(|p| p.pod == *pod)
        {
            pods.push(PodView {
                pod: pod.clone(),
                incarnation: String::new(),
                count: 0,
                source: Source::Cached,
                latency_ms: None,
                age_s: None,
                unconfirmed: false,
                error: Some(error.clone()),
            });
        }
    }
    // This pod's own counter may also be known from others (at most its
    // own count, unless this volume was restored: then it forks).
    if let Some(known) = counter.get(&my_key) {
        total = total.saturating_add(known.count.saturating_sub(me.count));
    }
    let (members, complete) = match &round.members {
        None => (1, true),
        Some(members) => (
            members.len(),
            round.discovery_error.is_none()
                && round.disputes.is_empty()
                && members.contains(&me.pod)
                && members.iter().filter(|p| **p != me.pod).all(|p| {
                    matches!(round.outcomes.get(p), Some(Outcome::Live { .. }))
                        || round.departed.contains(p)
                }),
        ),
    };
    TotalView {
        total,
        complete,
        members,
        pods,
        retired: counter.retired().collect(),
        discovery_error: round.discovery_error.clone(),
        persist_error: None,
    }
}

/// A view built once (per round, or when what is known changed) for the
/// page, which shows it on every visit with this pod's own count patched in:
/// building a view costs a pass over every counter, patching two numbers.
#[derive(Debug)]
pub struct Snapshot {
    /// Row 0 is this pod's own counter, at its count when built.
    pub view: TotalView,
    /// The total without this pod's running counter.
    others: u64,
    /// What others know of this pod's running counter (it counts in the
    /// total only where it is above the pod's own count).
    own_elsewhere: u64,
}

impl Snapshot {
    /// `view` was built with this pod's count at `own`; `own_elsewhere` is
    /// what the counter knows of this pod's running key (0 if nothing).
    pub fn new(view: TotalView, own: u64, own_elsewhere: u64) -> Snapshot {
        Snapshot {
            others: view.total.saturating_sub(own.max(own_elsewhere)),
            own_elsewhere,
            view,
        }
    }

    /// The total with this pod's own count at `own` (the visit just
    /// counted), as [`view`] would compute it.
    pub fn total_with(&self, own: u64) -> u64 {
        self.others.saturating_add(own.max(self.own_elsewhere))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::wire::Retired;

    fn e(pod: &str, inc: &str, count: u64) -> Entry {
        Entry::test(pod, inc, count)
    }

    fn live(inc: &str) -> Outcome {
        Outcome::Live {
            incarnation: inc.into(),
            latency: Duration::from_micros(1500),
        }
    }

    fn members(pods: &[&str]) -> Option<Vec<String>> {
        Some(pods.iter().map(|p| p.to_string()).collect())
    }

    /// (pod, incarnation, source, error contains, unconfirmed)
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
        bool,
    );

    #[test]
    fn rows_total_and_completeness() {
        let me = e("t-0", "m", 5);
        let mut confirmed = Counter::default();
        let own = |pod: &str, inc: &str, n| crate::peers::wire::PeerState {
            pod: pod.into(),
            incarnation: inc.into(),
            entries: vec![e(pod, inc, n)],
            retired: vec![],
            announce: None,
            news: Vec::new(),
        };
        let none = BTreeMap::new();
        for (pod, inc, n) in [("t-1", "b", 7), ("t-2", "c", 3), ("t-1", "old", 2)] {
            confirmed
                .absorb(&own(pod, inc, n), &me.key(), 5, &none, 1)
                .unwrap();
        }
        confirmed.merge(&[e("t-9", "z", 100)]);
        confirmed.retire(Retired {
            pod: "t-8".into(),
            incarnation: "y".into(),
            count: 50,
        });
        let cases: Vec<(&str, Round, u64, bool, Vec<Row>)> = vec![
            (
                "everyone answered",
                Round {
                    members: members(&["t-0", "t-1", "t-2"]),
                    outcomes: [("t-1".into(), live("b")), ("t-2".into(), live("c"))].into(),
                    ..Round::default()
                },
                5 + 7 + 3 + 2 + 100,
                true,
                vec![
                    ("t-0", "m", "self", None, false),
                    ("t-1", "b", "live", None, false),
                    ("t-1", "old", "cached", Some("an earlier volume"), false),
                    ("t-2", "c", "live", None, false),
                    ("t-9", "z", "cached", Some("not a current member"), true),
                ],
            ),
            (
                "a member failed",
                Round {
                    members: members(&["t-0", "t-1", "t-2", "t-3"]),
                    outcomes: [
                        ("t-1".into(), live("b")),
                        ("t-2".into(), Outcome::Failed("connect timeout".into())),
                        ("t-3".into(), Outcome::Failed("refused".into())),
                    ]
                    .into(),
                    ..Round::default()
                },
                117,
                false,
                vec![
                    ("t-2", "c", "cached", Some("connect timeout"), false),
                    ("t-3", "", "cached", Some("refused"), false),
                ],
            ),
            (
                "a dispute keeps the view incomplete",
                Round {
                    members: members(&["t-0", "t-1", "t-2"]),
                    outcomes: [("t-1".into(), live("b")), ("t-2".into(), live("c"))].into(),
                    disputes: [(e("t-2", "c", 0).key(), "t-1 relayed 99".into())].into(),
                    ..Round::default()
                },
                117,
                false,
                vec![("t-2", "c", "live", Some("t-1 relayed 99"), false)],
            ),
            (
                "DNS trouble",
                Round {
                    members: members(&["t-0"]),
                    discovery_error: Some("SERVFAIL".into()),
                    ..Round::default()
                },
                117,
                false,
                vec![],
            ),
            (
                "standalone",
                Round::default(),
                117,
                true,
                vec![("t-9", "z", "cached", None, true)],
            ),
        ];
        for (name, round, total, complete, rows) in cases {
            let v = view(&confirmed, &round, &me, 10);
            assert_eq!((v.total, v.complete), (total, complete), "{name}: {v:?}");
            assert_eq!(v.retired.len(), 1, "{name}: retired listed apart");
            for (pod, inc, source, error, unconfirmed) in rows {
                let row = v
                    .pods
                    .iter()
                    .find(|r| r.pod == pod && r.incarnation == inc)
                    .unwrap_or_else(|| panic!("{name}: no row {pod}/{inc}: {v:?}"));
                assert_eq!(row.source.as_str(), source, "{name}: {row:?}");
                assert_eq!(row.unconfirmed, unconfirmed, "{name}: {row:?}");
                match error {
                    None => assert_eq!(row.error, None, "{name}"),
                    Some(text) => assert!(
                        row.error.as_deref().is_some_and(|e| e.contains(text)),
                        "{name}: {row:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn own_counter_known_higher_from_others_counts_once_at_the_max() {
        let me = e("t-0", "m", 5);
        let mut c = Counter::default();
        c.merge(&[e("t-0", "m", 3)]);
        assert_eq!(view(&c, &Round::default(), &me, 0).total, 5);
        c.merge(&[e("t-0", "m", 9)]);
        assert_eq!(view(&c, &Round::default(), &me, 0).total, 9);
    }

    /// The page patches its own count into a snapshot: the total must be
    /// the one a fresh view gives, whether others know this pod's counter
    /// below, at or above its own count.
    #[test]
    fn a_snapshot_patched_with_the_own_count_totals_like_a_fresh_view() {
        for known in [None, Some(3), Some(9)] {
            let mut c = Counter::default();
            c.merge(&[e("t-1", "b", 7), e("t-0", "old", 2)]);
            if let Some(n) = known {
                c.merge(&[e("t-0", "m", n)]);
            }
            let built = view(&c, &Round::default(), &e("t-0", "m", 5), 0);
            let snapshot = Snapshot::new(built, 5, known.unwrap_or(0));
            for own in 0..15 {
                let fresh = view(&c, &Round::default(), &e("t-0", "m", own), 0);
                assert_eq!(
                    snapshot.total_with(own),
                    fresh.total,
                    "known {known:?}, own {own}"
                );
            }
        }
    }
}
