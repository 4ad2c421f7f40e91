//! The nemeses the runner mixes, and the seeded choice of a round's faults.
//! What each does to the cluster lives in the simulator
//! ([`crate::sim::nemesis`], [`crate::sim::Cluster`]); this module only
//! decides which, on whom.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};

use crate::sim::nemesis::Fault;

/// Every nemesis the runner knows, by its history name.
pub const ALL: &[&str] = &[
    "isolate",
    "partition",
    "loss",
    "slow",
    "kill",
    "pause",
    "dns-down",
    "dns-servfail",
    "volume-full",
    "scale",
    "upgrade",
    "delete-pod",
];

/// Kinds that replace pods (new network namespaces, without the network
/// faults' rules): at most one per round, never with a network fault, or
/// the fault would silently stop applying to the new pod.
const REPLACING: &[&str] = &["scale", "upgrade", "delete-pod"];

/// Kinds made of rules in the pods' network namespaces.
pub const NETWORK: &[&str] = &["isolate", "partition", "loss", "slow", "dns-down"];

/// Kinds that end when the heal begins: the network faults, DNS answering
/// again, the filler deleted. (A process or StatefulSet change ends once
/// every pod is Ready again.)
pub const ENDS_AT_HEAL: &[&str] = &[
    "isolate",
    "partition",
    "loss",
    "slow",
    "dns-down",
    "dns-servfail",
    "volume-full",
];

/// Checks a `--nemesis a,b` list.
pub fn parse_list(list: &str) -> Result<Vec<String>, String> {
    let kinds: Vec<String> = list.split(',').map(|k| k.trim().to_string()).collect();
    for k in &kinds {
        if !ALL.contains(&k.as_str()) {
            return Err(format!(
                "unknown nemesis {k:?} in --nemesis; known: {}",
                ALL.join(",")
            ));
        }
    }
    Ok(kinds)
}

/// One planned fault: its history name, the pods it hits, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// History name (one of [`ALL`]).
    pub kind: String,
    /// Pods hit (for `scale`, the new replica count as the only entry).
    pub target: Vec<String>,
    /// The simulator fault, for the kinds the `nemesis` command does.
    pub fault: Option<Fault>,
}

/// Chooses a round's faults: one or two distinct kinds from `enabled`, at
/// most one that replaces pods and then no network fault, on random pods of
/// `pods`.
pub fn plan(
    rng: &mut impl Rng,
    enabled: &[String],
    pods: &[String],
    replicas: u32,
) -> Vec<Planned> {
    let mut kinds: Vec<&String> = enabled.iter().collect();
    kinds.shuffle(rng);
    let n = if kinds.len() > 1 && rng.random_bool(0.4) {
        2
    } else {
        1
    };
    let mut out = Vec::new();
    let (mut replacing, mut network) = (false, false);
    for kind in kinds {
        if out.len() == n {
            break;
        }
        let (r, w) = (
            REPLACING.contains(&kind.as_str()),
            NETWORK.contains(&kind.as_str()),
        );
        if (r && (replacing || network)) || (w && replacing) {
            continue;
        }
        replacing |= r;
        network |= w;
        let Some(pod) = pods.choose(rng).cloned() else {
            break;
        };
        let one = |fault: Fault| Planned {
            kind: kind.clone(),
            target: vec![pod.clone()],
            fault: Some(fault),
        };
        out.push(match kind.as_str() {
            "isolate" => one(Fault::Isolate { pod: pod.clone() }),
            "partition" => {
                let mut shuffled = pods.to_vec();
                shuffled.shuffle(rng);
                let cut = rng.random_range(1..shuffled.len().max(2));
                let (a, b) = shuffled.split_at(cut.min(shuffled.len()));
                // The target is the minority side (the one cut off).
                let minority = if a.len() <= b.len() { a } else { b };
                Planned {
                    kind: kind.clone(),
                    target: minority.to_vec(),
                    fault: Some(Fault::Partition {
                        groups: vec![a.to_vec(), b.to_vec()],
                    }),
                }
            }
            "loss" => one(Fault::Loss {
                pod: pod.clone(),
                percent: rng.random_range(10..=40),
            }),
            "slow" => one(Fault::Slow { pod: pod.clone() }),
            "kill" => one(Fault::Kill { pod: pod.clone() }),
            "pause" => one(Fault::Pause { pod: pod.clone() }),
            "dns-down" => Planned {
                kind: kind.clone(),
                target: pods.to_vec(),
                fault: Some(Fault::DnsDown {
                    pods: pods.to_vec(),
                }),
            },
            // The one DNS server fails for every pod.
            "dns-servfail" => Planned {
                kind: kind.clone(),
                target: pods.to_vec(),
                fault: Some(Fault::DnsServfail),
            },
            "volume-full" => one(Fault::VolumeFull { pod: pod.clone() }),
            "scale" => {
                let to = if replicas > 1 && rng.random_bool(0.5) {
                    replicas - 1
                } else {
                    replicas + 1
                };
                Planned {
                    kind: kind.clone(),
                    target: vec![to.to_string()],
                    fault: None,
                }
            }
            _ => Planned {
                kind: kind.clone(),
                target: if kind == "upgrade" {
                    pods.to_vec()
                } else {
                    vec![pod]
                },
                fault: None,
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn pods() -> Vec<String> {
        (0..3).map(|i| format!("tally-{i}")).collect()
    }

    #[test]
    fn the_same_seed_plans_the_same_rounds() {
        let all: Vec<String> = ALL.iter().map(|s| s.to_string()).collect();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| plan(&mut rng, &all, &pods(), 3))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn rounds_mix_every_kind_and_never_replace_pods_under_a_network_fault() {
        let all: Vec<String> = ALL.iter().map(|s| s.to_string()).collect();
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            let round = plan(&mut rng, &all, &pods(), 3);
            assert!((1..=2).contains(&round.len()));
            let count = |kinds: &[&str]| {
                round
                    .iter()
                    .filter(|p| kinds.contains(&p.kind.as_str()))
                    .count()
            };
            assert!(count(REPLACING) <= 1);
            assert!(count(REPLACING) == 0 || count(NETWORK) == 0, "{round:?}");
            for p in round {
                if let Some(Fault::Partition { groups }) = &p.fault {
                    assert!(groups.iter().all(|g| !g.is_empty()), "{groups:?}");
                }
                seen.insert(p.kind);
            }
        }
        assert_eq!(seen.len(), ALL.len());
    }

    #[test]
    fn unknown_nemeses_are_refused_by_name() {
        assert_eq!(parse_list("kill,pause").unwrap(), ["kill", "pause"]);
        assert!(parse_list("kill,flood").unwrap_err().contains("\"flood\""));
    }
}
