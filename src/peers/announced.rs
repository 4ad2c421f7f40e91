//! Members coming and going faster than DNS says (design.md §5).
//!
//! CoreDNS caches answers (kubeadm: `cache 30`), so a sibling's SRV answer
//! can lack a new pod for 30 s, or list one at an address it no longer
//! has. A starting pod therefore announces itself, and its siblings count
//! it as a member from then on. An announced member DNS does not list (it
//! died at once, or was never meant to be one) is forgotten after
//! [`ANNOUNCED_FOR`], so it cannot keep totals incomplete forever.
//!
//! The other way round, a pod leaving hands its final state over: it has
//! *departed*. While a cached answer still lists it, a departed pod that
//! does not answer does not make totals incomplete (its last count is
//! known exactly); one that answers, or announces itself again, is back.
//!
//! An announce reaches only the siblings the new pod could reach at the
//! addresses its own (cached) DNS answer gave; a sibling that was itself
//! replaced at a new address, or restarted since and forgot, never hears
//! it, and would call a total complete without the new pod. So what a pod
//! heard travels: every peer state carries the newest [`Notice`] per pod
//! (the newest wins, announce or departure), and a round fetches the
//! members it learns of that way too. A notice keeps the time it was first
//! heard, so passing it around never extends its life.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::discovery::Peer;
use crate::peers::wire::Notice;

/// How long an announce (or a departure) counts: twice CoreDNS's cache
/// time, plus the refresh, is when DNS must show the change.
pub const ANNOUNCED_FOR: Duration = Duration::from_secs(60);

/// What the SRV target column says for a member known by announce only.
pub const ANNOUNCED_TARGET: &str = "(announced, not yet in DNS)";

/// The newest notice per pod, heard first-hand or from siblings.
#[derive(Debug, Default)]
pub struct Announced {
    news: BTreeMap<String, Notice>,
}

impl Announced {
    /// `pod` says itself it answers at `addr`: newer than anything heard.
    pub fn record(&mut self, pod: &str, addr: SocketAddr, now_ms: u64) {
        self.first_hand(pod, Some(addr), false, now_ms);
    }

    /// `pod` handed its final state over on its way out from `addr` (when
    /// it said).
    pub fn depart(&mut self, pod: &str, addr: Option<SocketAddr>, now_ms: u64) {
        self.first_hand(pod, addr, true, now_ms);
    }

    fn first_hand(&mut self, pod: &str, addr: Option<SocketAddr>, left: bool, now_ms: u64) {
        // Newer than what was heard of it before, whoever's clock that was.
        let at_ms = self
            .news
            .get(pod)
            .map_or(now_ms, |old| now_ms.max(old.at_ms + 1));
        self.news.insert(
            pod.to_string(),
            Notice {
                pod: pod.to_string(),
                at_ms,
                addr,
                left,
            },
        );
    }

    /// Takes what a sibling heard: per pod, the newer notice wins. Notices
    /// about `me`, about names `accept` refuses, and expired ones are
    /// ignored. Returns the pods whose notice changed.
    pub fn learn(
        &mut self,
        notices: &[Notice],
        me: &str,
        accept: impl Fn(&str) -> bool,
        now_ms: u64,
    ) -> Vec<String> {
        let mut changed = Vec::new();
        for n in notices {
            if n.pod == me || !accept(&n.pod) || expired(n, now_ms) {
                continue;
            }
            if self.news.get(&n.pod).is_none_or(|old| n.at_ms > old.at_ms) {
                self.news.insert(n.pod.clone(), n.clone());
                changed.push(n.pod.clone());
            }
        }
        changed
    }

    /// What this pod passes on (expired notices are dropped here).
    pub fn news(&mut self, now_ms: u64) -> Vec<Notice> {
        self.news.retain(|_, n| !expired(n, now_ms));
        self.news.values().cloned().collect()
    }

    /// Whether the newest word of `pod`, listed at `at`, is that it left
    /// (handed its final state over) from there. Listed at another address
    /// it is a new pod of that name that may count visits: not departed.
    pub fn has_departed(&mut self, pod: &str, at: SocketAddr, now_ms: u64) -> bool {
        self.news.retain(|_, n| !expired(n, now_ms));
        self.news
            .get(pod)
            .is_some_and(|n| n.left && n.addr.is_none_or(|from| from == at))
    }

    /// Adds the announced members to `peers` (DNS's answer): those DNS
    /// lacks are added, those DNS lists at another address get the
    /// announced one (first-hand and newer than a cached answer) with DNS's
    /// kept as [`Peer::also`], tried when the announced one fails.
    pub fn add_to(&mut self, peers: &mut Vec<Peer>, now_ms: u64) {
        self.news.retain(|_, n| !expired(n, now_ms));
        for n in self.news.values().filter(|n| !n.left) {
            let Some(addr) = n.addr else { continue };
            match peers.iter_mut().find(|p| p.pod == n.pod) {
                Some(peer) => {
                    if peer.addr != addr {
                        peer.also = Some(peer.addr);
                        peer.addr = addr;
                    }
                }
                None => peers.push(Peer {
                    pod: n.pod.clone(),
                    target: ANNOUNCED_TARGET.to_string(),
                    addr,
                    also: None,
                }),
            }
        }
        peers.sort_by(|a, b| a.pod.cmp(&b.pod));
    }
}

fn expired(n: &Notice, now_ms: u64) -> bool {
    n.at_ms.saturating_add(ANNOUNCED_FOR.as_millis() as u64) <= now_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOR: u64 = ANNOUNCED_FOR.as_millis() as u64;

    fn peer(pod: &str, addr: &str) -> Peer {
        Peer {
            pod: pod.into(),
            target: format!("{pod}.tally-headless.default.svc.cluster.local."),
            addr: addr.parse().unwrap(),
            also: None,
        }
    }

    fn pods(peers: &[Peer]) -> Vec<(&str, String)> {
        peers
            .iter()
            .map(|p| (p.pod.as_str(), p.addr.to_string()))
            .collect()
    }

    fn any(_: &str) -> bool {
        true
    }

    #[test]
    fn an_announced_pod_is_a_member_while_dns_lacks_it() {
        let t0 = 1_000_000;
        let mut announced = Announced::default();
        announced.record("tally-2", "10.0.0.12:8081".parse().unwrap(), t0);
        // DNS still serves a cached answer without tally-2.
        let mut peers = vec![peer("tally-0", "10.0.0.10:8081")];
        announced.add_to(&mut peers, t0);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[1].pod, "tally-2");
        assert_eq!(peers[1].target, ANNOUNCED_TARGET);
        // DNS lists it at that address: nothing to add.
        let mut peers = vec![
            peer("tally-0", "10.0.0.10:8081"),
            peer("tally-2", "10.0.0.12:8081"),
        ];
        announced.add_to(&mut peers, t0 + 1000);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[1].target, peer("tally-2", "10.0.0.12:8081").target);
        assert_eq!(peers[1].also, None);
    }

    #[test]
    fn an_announce_goes_first_and_dns_address_stays_as_the_fallback() {
        let t0 = 1_000_000;
        let mut announced = Announced::default();
        announced.record("tally-2", "10.0.0.12:8081".parse().unwrap(), t0);
        // DNS lists tally-2 elsewhere: replaced since its announce (the new
        // announce lost), or DNS's answer is the older one. Which is true
        // is learnt by asking: the announce first, DNS's address if it fails.
        let mut peers = vec![
            peer("tally-0", "10.0.0.10:8081"),
            peer("tally-2", "10.0.0.17:8081"),
        ];
        announced.add_to(&mut peers, t0 + 1000);
        assert_eq!(pods(&peers)[1], ("tally-2", "10.0.0.12:8081".to_string()));
        assert_eq!(peers[1].also, Some("10.0.0.17:8081".parse().unwrap()));
        assert_eq!(peers[0].also, None);
    }

    #[test]
    fn a_departed_pod_is_known_gone_until_it_announces_again() {
        let t0 = 1_000_000;
        let at: SocketAddr = "10.0.0.13:8081".parse().unwrap();
        let mut announced = Announced::default();
        announced.depart("tally-3", Some(at), t0);
        assert!(announced.has_departed("tally-3", at, t0 + 1000));
        assert!(!announced.has_departed("tally-2", at, t0));
        // Within the same millisecond, the later word still wins.
        announced.record("tally-3", at, t0);
        assert!(!announced.has_departed("tally-3", at, t0));
        announced.depart("tally-3", Some(at), t0);
        assert!(announced.has_departed("tally-3", at, t0));
        assert!(!announced.has_departed("tally-3", at, t0 + 2 + FOR));
    }

    /// The 100-round chaos run: tally-0 handed over on its way out of an
    /// upgrade; its successor at a new address reached no sibling, and was
    /// later cut off. Listed at the new address, it is not the pod that
    /// left: a sibling that cannot reach it must not call totals complete.
    #[test]
    fn a_pod_listed_elsewhere_than_it_left_from_is_not_departed() {
        let t0 = 1_000_000;
        let old: SocketAddr = "10.0.0.10:8081".parse().unwrap();
        let new: SocketAddr = "10.0.0.20:8081".parse().unwrap();
        let mut announced = Announced::default();
        announced.depart("tally-0", Some(old), t0);
        assert!(announced.has_departed("tally-0", old, t0 + 1000));
        assert!(!announced.has_departed("tally-0", new, t0 + 1000));
        // Departed pods are never added as members, wherever they left.
        let mut members = vec![peer("tally-1", "10.0.0.11:8081")];
        announced.add_to(&mut members, t0 + 1000);
        assert_eq!(members.len(), 1);
    }

    #[test]
    fn an_announce_beats_a_cached_address_and_expires() {
        let t0 = 1_000_000;
        let mut announced = Announced::default();
        // tally-1 came back at a new address; DNS still has the old one.
        announced.record("tally-1", "10.0.0.21:8081".parse().unwrap(), t0);
        let mut peers = vec![peer("tally-1", "10.0.0.11:8081")];
        announced.add_to(&mut peers, t0 + 5000);
        assert_eq!(peers[0].addr, "10.0.0.21:8081".parse().unwrap());
        // After ANNOUNCED_FOR, DNS's word stands.
        let mut peers = vec![peer("tally-1", "10.0.0.11:8081")];
        announced.add_to(&mut peers, t0 + FOR);
        assert_eq!(peers[0].addr, "10.0.0.11:8081".parse().unwrap());
        assert!(announced.news(t0 + FOR).is_empty());
    }

    /// The chaos run's violation (seed 7, scale + kill, DNS cache 30 s):
    /// tally-2 was replaced at a new address while DNS still cached its
    /// old one, so the new tally-3's announce never reached it; tally-2's
    /// cached answer lacked tally-3 and it called totals complete without
    /// it. It must learn tally-3 from any sibling that heard the announce.
    #[test]
    fn a_pod_that_missed_an_announce_learns_it_from_a_sibling() {
        let t0 = 1_000_000;
        let mut tally_1 = Announced::default();
        tally_1.record("tally-3", "10.0.0.13:8081".parse().unwrap(), t0);
        let mut tally_2 = Announced::default();
        let dns = vec![
            peer("tally-0", "10.0.0.10:8081"),
            peer("tally-1", "10.0.0.11:8081"),
            peer("tally-2", "10.0.0.22:8081"),
        ];
        let mut members = dns.clone();
        tally_2.add_to(&mut members, t0 + 100);
        assert_eq!(members.len(), 3, "before: tally-3 is unknown to tally-2");
        let heard = tally_2.learn(&tally_1.news(t0 + 100), "tally-2", any, t0 + 100);
        assert_eq!(heard, ["tally-3"]);
        let mut members = dns.clone();
        tally_2.add_to(&mut members, t0 + 100);
        assert_eq!(pods(&members)[3], ("tally-3", "10.0.0.13:8081".to_string()));
        // Passing it on does not extend its life.
        let mut tally_0 = Announced::default();
        tally_0.learn(&tally_2.news(t0 + 200), "tally-0", any, t0 + FOR - 1);
        let mut members = dns.clone();
        tally_0.add_to(&mut members, t0 + FOR);
        assert_eq!(members.len(), 3);
    }

    #[test]
    fn the_newest_word_wins_whoever_passes_it_on() {
        let t0 = 1_000_000;
        let addr: SocketAddr = "10.0.0.13:8081".parse().unwrap();
        let mut heard_announce = Announced::default();
        heard_announce.record("tally-3", addr, t0);
        let mut heard_departure = Announced::default();
        heard_departure.depart("tally-3", Some(addr), t0 + 5000);
        // The old announce does not bring a departed pod back.
        let old = heard_announce.news(t0 + 6000);
        assert!(
            heard_departure
                .learn(&old, "tally-0", any, t0 + 6000)
                .is_empty()
        );
        assert!(heard_departure.has_departed("tally-3", addr, t0 + 6000));
        // The departure replaces the announce where it arrives.
        let newer = heard_departure.news(t0 + 6000);
        heard_announce.learn(&newer, "tally-1", any, t0 + 6000);
        assert!(heard_announce.has_departed("tally-3", addr, t0 + 6000));
        let mut members = vec![peer("tally-0", "10.0.0.10:8081")];
        heard_announce.add_to(&mut members, t0 + 6000);
        assert_eq!(members.len(), 1);
    }

    #[test]
    fn notices_about_itself_or_foreign_names_are_not_taken() {
        let t0 = 1_000_000;
        let mut source = Announced::default();
        source.record("tally-0", "10.0.0.10:8081".parse().unwrap(), t0);
        source.record("web-0", "10.0.0.99:8081".parse().unwrap(), t0);
        let mut me = Announced::default();
        let ours = |pod: &str| pod.starts_with("tally-");
        assert!(me.learn(&source.news(t0), "tally-0", ours, t0).is_empty());
        assert!(me.news(t0).is_empty());
    }
}
