//! Members that announced themselves before DNS lists them (design.md §5).
//!
//! CoreDNS caches answers (kubeadm: `cache 30`), so a sibling's SRV answer
//! can lack a new pod for 30 s. A starting pod therefore announces itself,
//! and its siblings count it as a member from then on. DNS confirms it later
//! (same pod at the same address); an announced member DNS never confirms
//! (it died at once, or was never meant to be one) is forgotten after
//! [`ANNOUNCED_FOR`], so it cannot keep totals incomplete forever.
//!
//! The other way round, a pod leaving hands its final state over: it has
//! *departed*. While a cached answer still lists it, a departed pod that
//! does not answer does not make totals incomplete (its last count is
//! known exactly); one that answers, or announces itself again, is back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::discovery::Peer;

/// How long an announced member counts without DNS confirming it: twice
/// CoreDNS's cache time, plus the refresh, is when DNS must show it.
pub const ANNOUNCED_FOR: Duration = Duration::from_secs(60);

/// What the SRV target column says for a member known by announce only.
pub const ANNOUNCED_TARGET: &str = "(announced, not yet in DNS)";

/// Announced members not yet confirmed by DNS.
#[derive(Debug, Default)]
pub struct Announced {
    /// Pod name → where it answers and until when it counts unconfirmed.
    members: BTreeMap<String, (SocketAddr, Instant)>,
    /// Pods that handed their final state over, until when that is trusted.
    departed: BTreeMap<String, Instant>,
}

impl Announced {
    /// `pod` says it answers at `addr` (a newer announce replaces an older).
    pub fn record(&mut self, pod: &str, addr: SocketAddr, now: Instant) {
        self.departed.remove(pod);
        self.members
            .insert(pod.to_string(), (addr, now + ANNOUNCED_FOR));
    }

    /// `pod` handed its final state over on its way out.
    pub fn depart(&mut self, pod: &str, now: Instant) {
        self.members.remove(pod);
        self.departed.insert(pod.to_string(), now + ANNOUNCED_FOR);
    }

    /// Whether `pod` left (handed its final state over) and has not
    /// announced itself since.
    pub fn has_departed(&mut self, pod: &str, now: Instant) -> bool {
        self.departed.retain(|_, until| *until > now);
        self.departed.contains_key(pod)
    }

    /// Adds the announced members to `peers` (DNS's answer): those DNS
    /// lacks are added, those DNS lists at another address get the
    /// announced one (first-hand and newer than a cached answer). Members
    /// DNS confirms, and expired ones, are forgotten.
    pub fn add_to(&mut self, peers: &mut Vec<Peer>, now: Instant) {
        self.members.retain(|pod, (addr, until)| {
            let confirmed = peers.iter().any(|p| p.pod == *pod && p.addr == *addr);
            !confirmed && *until > now
        });
        for (pod, (addr, _)) in &self.members {
            match peers.iter_mut().find(|p| p.pod == *pod) {
                Some(peer) => peer.addr = *addr,
                None => peers.push(Peer {
                    pod: pod.clone(),
                    target: ANNOUNCED_TARGET.to_string(),
                    addr: *addr,
                }),
            }
        }
        peers.sort_by(|a, b| a.pod.cmp(&b.pod));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(pod: &str, addr: &str) -> Peer {
        Peer {
            pod: pod.into(),
            target: format!("{pod}.tally-headless.default.svc.cluster.local."),
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn an_announced_pod_is_a_member_until_dns_confirms_it() {
        let t0 = Instant::now();
        let mut announced = Announced::default();
        announced.record("tally-2", "10.0.0.12:8081".parse().unwrap(), t0);
        // DNS still serves a cached answer without tally-2.
        let mut peers = vec![peer("tally-0", "10.0.0.10:8081")];
        announced.add_to(&mut peers, t0);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[1].pod, "tally-2");
        assert_eq!(peers[1].target, ANNOUNCED_TARGET);
        // DNS lists it at that address: confirmed, nothing left to add.
        let mut peers = vec![
            peer("tally-0", "10.0.0.10:8081"),
            peer("tally-2", "10.0.0.12:8081"),
        ];
        announced.add_to(&mut peers, t0 + Duration::from_secs(1));
        assert!(announced.members.is_empty());
        assert_eq!(peers[1].target, peer("tally-2", "10.0.0.12:8081").target);
    }

    #[test]
    fn a_departed_pod_is_known_gone_until_it_announces_again() {
        let t0 = Instant::now();
        let mut announced = Announced::default();
        announced.depart("tally-3", t0);
        assert!(announced.has_departed("tally-3", t0 + Duration::from_secs(1)));
        assert!(!announced.has_departed("tally-2", t0));
        announced.record("tally-3", "10.0.0.13:8081".parse().unwrap(), t0);
        assert!(!announced.has_departed("tally-3", t0));
        announced.depart("tally-3", t0);
        assert!(!announced.has_departed("tally-3", t0 + ANNOUNCED_FOR));
    }

    #[test]
    fn an_announce_beats_a_cached_address_and_unconfirmed_ones_expire() {
        let t0 = Instant::now();
        let mut announced = Announced::default();
        // tally-1 came back at a new address; DNS still has the old one.
        announced.record("tally-1", "10.0.0.21:8081".parse().unwrap(), t0);
        let mut peers = vec![peer("tally-1", "10.0.0.11:8081")];
        announced.add_to(&mut peers, t0 + Duration::from_secs(5));
        assert_eq!(peers[0].addr, "10.0.0.21:8081".parse().unwrap());
        // Never confirmed: after ANNOUNCED_FOR, DNS's word stands.
        let mut peers = vec![peer("tally-1", "10.0.0.11:8081")];
        announced.add_to(&mut peers, t0 + ANNOUNCED_FOR);
        assert_eq!(peers[0].addr, "10.0.0.11:8081".parse().unwrap());
        assert!(announced.members.is_empty());
    }
}
