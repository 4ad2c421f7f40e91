//! The cluster view: fan out to the siblings, merge what they know, answer
//! `/visits/total`.
//!
//! A *round* looks the members up in DNS, fetches every sibling's state at
//! once (each within the per-peer timeout, all within the overall deadline;
//! never this pod itself), checks and merges what came back into the
//! [`Counter`], and records who answered. Concurrent `/visits/total` requests
//! share rounds, but only rounds that start after they arrived ([`rounds`]):
//! peer load does not grow with client load, and a `complete` total holds
//! every visit acknowledged before the request. What this pod knows of the others is persisted
//! in `peers.state` on its own volume (same format and guarantees as the
//! visit counter), so the total survives a full restart of the cluster.

pub mod announced;
pub mod client;
pub mod rounds;
pub mod wire;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::discovery::{Discovery, Peer};
use crate::merge::{Counter, Entry, Key, MergeError};
use crate::metrics::{ErrorKind, Metrics};
use crate::store::file::{self, AtomicFile, FileError};
use crate::store::{Store, unix_now};
use announced::Announced;
use client::{FetchError, PeerClient};
use rounds::{Joined, Rounds};
use wire::{PeerState, PodView, Source, TotalView};

/// What this pod knows of the others, in its data directory.
pub const PEERS_FILE: &str = "peers.state";

/// Errors loading the persisted view.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path} holds no valid peer state: {reason}")]
    BadState { path: String, reason: String },
}

/// Body of `peers.state`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPeers {
    pub entries: Vec<Entry>,
}

/// Reads `peers.state` from a data directory (empty if absent).
pub fn load_peers(data_dir: &Path) -> Result<Vec<Entry>, PeersError> {
    let path = data_dir.join(PEERS_FILE);
    match file::read(&path)? {
        None => Ok(Vec::new()),
        Some(body) => serde_json::from_slice::<StoredPeers>(&body)
            .map(|s| s.entries)
            .map_err(|e| PeersError::BadState {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
    }
}

/// Fan-out limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub peer_timeout: Duration,
    pub deadline: Duration,
}

/// How one member fared in a round.
#[derive(Debug, Clone)]
enum Outcome {
    Live {
        incarnation: String,
        latency: Duration,
    },
    Failed(String),
}

/// The result of one round.
#[derive(Debug, Default)]
struct Round {
    members: Vec<Peer>,
    discovery_error: Option<String>,
    outcomes: BTreeMap<String, Outcome>,
}

/// The cluster view of one pod; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
    /// The rounds `/visits/total` joins (one running, one queued).
    rounds: Rounds<Arc<Round>>,
}

struct Inner {
    pod: String,
    store: Store,
    metrics: Arc<Metrics>,
    /// `None` when standalone.
    discovery: Option<Discovery>,
    client: PeerClient,
    limits: Limits,
    /// Everything known of other counters (and of this pod's old volumes).
    counter: Mutex<Counter>,
    /// The last finished round.
    last: Mutex<Arc<Round>>,
    /// Wakes the persister when `counter` changed.
    changed: Notify,
    peers_file: AtomicFile,
    /// Siblings that announced themselves before DNS lists them.
    announced: Mutex<Announced>,
    /// Where this pod's peer route listens, once bound: to announce it, and
    /// to recognise itself in DNS by address when the SRV target does not
    /// name it.
    addr: OnceLock<SocketAddr>,
}

impl Cluster {
    /// Loads `peers.state` and prepares the fan-out. Call
    /// [`spawn_background`](Self::spawn_background) to persist and refresh.
    pub fn new(
        data_dir: &Path,
        pod: &str,
        store: Store,
        discovery: Option<Discovery>,
        client: PeerClient,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, PeersError> {
        let counter = Counter::from_entries(load_peers(data_dir)?);
        let path = data_dir.join(PEERS_FILE);
        let peers_file = AtomicFile::new(path);
        let inner = Arc::new(Inner {
            pod: pod.to_string(),
            store,
            metrics,
            discovery,
            client,
            limits,
            counter: Mutex::new(counter),
            last: Mutex::new(Arc::new(Round::default())),
            changed: Notify::new(),
            peers_file,
            announced: Mutex::new(Announced::default()),
            addr: OnceLock::new(),
        });
        let rounds = Rounds::new({
            let inner = inner.clone();
            move || {
                let inner = inner.clone();
                async move {
                    let round = Arc::new(inner.run_round().await);
                    *inner.last.lock().expect("poisoned") = round.clone();
                    round
                }
            }
        });
        let cluster = Cluster { inner, rounds };
        cluster
            .inner
            .metrics
            .total
            .set(cluster.cached_total().total as i64);
        Ok(cluster)
    }

    /// Starts the persister and, when `refresh` is set, the periodic round.
    /// Both stop when the returned handle is dropped or aborted.
    pub fn spawn_background(&self, refresh: Option<Duration>) -> Background {
        let persister = tokio::spawn(self.clone().persist_forever());
        let refresher = refresh
            .filter(|_| self.inner.discovery.is_some())
            .map(|every| {
                let cluster = self.clone();
                tokio::spawn(async move {
                    loop {
                        cluster.round().await;
                        tokio::time::sleep(every).await;
                    }
                })
            });
        Background {
            tasks: std::iter::once(persister).chain(refresher).collect(),
        }
    }

    /// `/visits/total`: joins the round in flight or starts one.
    pub async fn total(&self) -> TotalView {
        let round = self.round().await;
        self.view(&round)
    }

    /// The last known view, without any network I/O (for the page). Never
    /// `complete` in a cluster: its round started before the request did,
    /// so it may miss visits acknowledged since (design.md §4).
    pub fn cached_total(&self) -> TotalView {
        let round = self.inner.last.lock().expect("poisoned").clone();
        let mut view = self.view(&round);
        view.complete &= self.inner.discovery.is_none();
        view
    }

    /// What the peer route answers: this pod's entry and all it knows.
    pub fn peer_state(&self) -> PeerState {
        let me = self.inner.my_entry();
        let key = me.key();
        let counter = self.inner.counter.lock().expect("poisoned");
        let mut entries: Vec<Entry> = counter.entries().filter(|e| e.key() != key).collect();
        entries.push(me.clone());
        PeerState {
            pod: me.pod,
            incarnation: me.incarnation,
            entries,
            announce: None,
        }
    }

    /// Writes `peers.state` now (at shutdown).
    pub async fn persist(&self) {
        let entries: Vec<Entry> = self
            .inner
            .counter
            .lock()
            .expect("poisoned")
            .entries()
            .collect();
        let inner = self.inner.clone();
        let body = serde_json::to_vec(&StoredPeers { entries }).expect("serialises");
        let result = tokio::task::spawn_blocking(move || inner.peers_file.write(&body)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(file = PEERS_FILE, %error, "cannot persist the peer view")
            }
            Err(error) => tracing::error!(%error, "peer persister panicked"),
        }
    }

    /// Merges a state a sibling handed over on its way out, or announced
    /// itself with when starting (`PUT` on the peer route), with the same
    /// checks as a fetched one; an announcing sibling is a member from now.
    pub fn receive(&self, state: PeerState) -> Result<(), MergeError> {
        let me = self.inner.my_entry();
        let changed = self.inner.counter.lock().expect("poisoned").absorb(
            &sender(&state),
            &state.entries,
            &me,
            unix_now(),
        )?;
        if changed {
            self.inner.changed.notify_one();
        }
        if let Some(addr) = state.announce
            && state.pod != me.pod
        {
            tracing::info!(pod = %state.pod, %addr, "sibling announced itself");
            self.inner
                .announced
                .lock()
                .expect("poisoned")
                .record(&state.pod, addr, Instant::now());
        }
        Ok(())
    }

    /// At start, before any visit is served: tells the siblings DNS lists
    /// that this pod is a member answering at `addr` (its bound peer
    /// address), so they count it at once even while DNS still serves a
    /// cached answer without it. Bounded by the deadline.
    pub async fn announce(&self, addr: SocketAddr) {
        let _ = self.inner.addr.set(addr);
        let told = self
            .tell_siblings("announce", |sibling| PeerState {
                announce: Some(reachable_at(addr, sibling)),
                ..self.peer_state()
            })
            .await;
        tracing::info!(%addr, siblings = told, "announced to the siblings");
    }

    /// On the way out: hands this pod's final state to every sibling, so a
    /// pod that is scaled away or replaced leaves its last count behind even
    /// if nobody fetched it since its last visits. Bounded by the deadline.
    pub async fn goodbye(&self) {
        let state = self.peer_state();
        let handed = self.tell_siblings("hand-over", |_| state.clone()).await;
        tracing::info!(
            count = self.inner.store.count(),
            siblings = handed,
            "final count handed over"
        );
    }

    /// `PUT`s a state to every sibling DNS lists (never to itself), within
    /// the deadline; how many took it.
    async fn tell_siblings(&self, what: &str, state: impl Fn(SocketAddr) -> PeerState) -> usize {
        let Some(discovery) = &self.inner.discovery else {
            return 0;
        };
        let deadline = self.inner.limits.deadline;
        let started = Instant::now();
        let Ok(members) = tokio::time::timeout(deadline, discovery.members()).await else {
            tracing::warn!(what, "no DNS answer in time to tell the siblings");
            return 0;
        };
        let pushes =
            self.inner
                .siblings(&members.peers, started + deadline)
                .map(|(peer, limit)| {
                    let body = serde_json::to_vec(&state(peer.addr)).expect("serialises");
                    let push = self.inner.client.push(peer.addr, body.into(), limit);
                    async move { (peer, push.await) }
                });
        let results = futures::future::join_all(pushes).await;
        for (peer, result) in &results {
            if let Err(error) = result {
                tracing::warn!(what, peer = %peer.pod, %error, "could not tell a sibling");
            }
        }
        results.iter().filter(|(_, r)| r.is_ok()).count()
    }

    async fn persist_forever(self) {
        loop {
            self.inner.changed.notified().await;
            self.persist().await;
        }
    }

    /// A round that starts no earlier than now (the read barrier).
    async fn round(&self) -> Arc<Round> {
        let (outcome, joined) = self.rounds.enter();
        if joined == Joined::Shared {
            self.inner.metrics.coalesced.inc();
        }
        // A round that panicked answers like one that reached nobody.
        outcome.await.unwrap_or_default()
    }

    fn view(&self, round: &Round) -> TotalView {
        let me = self.inner.my_entry();
        let my_key = me.key();
        let now = unix_now();
        let counter = self.inner.counter.lock().expect("poisoned");
        let mut pods = vec![PodView {
            pod: me.pod.clone(),
            incarnation: me.incarnation.clone(),
            count: me.count,
            source: Source::Own,
            latency_ms: None,
            age_s: None,
            error: None,
        }];
        for entry in counter.entries().filter(|e| e.key() != my_key) {
            let is_member = round.members.iter().any(|p| p.pod == entry.pod);
            let (source, latency_ms, error) = match round.outcomes.get(&entry.pod) {
                Some(Outcome::Live {
                    incarnation,
                    latency,
                }) if *incarnation == entry.incarnation => (
                    Source::Live,
                    Some((latency.as_secs_f64() * 1e6).round() / 1e3),
                    None,
                ),
                Some(Outcome::Live { incarnation, .. }) => (
                    Source::Cached,
                    None,
                    Some(format!(
                        "an earlier volume; {} now runs incarnation {incarnation}",
                        entry.pod
                    )),
                ),
                Some(Outcome::Failed(error)) => (Source::Cached, None, Some(error.clone())),
                None if entry.pod == me.pod => (
                    Source::Cached,
                    None,
                    Some(format!(
                        "an earlier volume; this pod now runs incarnation {}",
                        me.incarnation
                    )),
                ),
                None if self.inner.discovery.is_some() && !is_member => (
                    Source::Cached,
                    None,
                    Some("not a current member".to_string()),
                ),
                None => (Source::Cached, None, None),
            };
            pods.push(PodView {
                age_s: (source == Source::Cached && entry.seen_unix > 0)
                    .then(|| now.saturating_sub(entry.seen_unix)),
                pod: entry.pod,
                incarnation: entry.incarnation,
                count: entry.count,
                source,
                latency_ms,
                error,
            });
        }
        // A member that failed and was never heard from still gets a row,
        // so its error is reported (it adds nothing to the total).
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
                    error: Some(error.clone()),
                });
            }
        }
        let own_known = counter.get(&my_key).map_or(0, |k| k.count);
        let total = counter.total() - own_known + me.count.max(own_known);
        drop(counter);
        let (members, complete) =
            match &self.inner.discovery {
                None => (1, true),
                Some(_) => (
                    round.members.len(),
                    round.discovery_error.is_none()
                        && round.members.iter().any(|p| p.pod == me.pod)
                        && round.members.iter().filter(|p| p.pod != me.pod).all(|p| {
                            matches!(round.outcomes.get(&p.pod), Some(Outcome::Live { .. }))
                        }),
                ),
            };
        self.inner.metrics.total.set(total as i64);
        TotalView {
            total,
            complete,
            members,
            pods,
            discovery_error: round.discovery_error.clone(),
        }
    }
}

impl Inner {
    fn my_entry(&self) -> Entry {
        Entry {
            pod: self.pod.clone(),
            incarnation: self.store.incarnation().to_string(),
            count: self.store.count(),
            seen_unix: unix_now(),
        }
    }

    /// The members other than this pod (a pod never calls itself), each
    /// with its time limit: the per-peer timeout, cut to what is left of
    /// the deadline.
    fn siblings<'a>(
        &'a self,
        members: &'a [Peer],
        deadline: Instant,
    ) -> impl Iterator<Item = (&'a Peer, Duration)> + 'a {
        members.iter().filter(|p| !self.is_me(p)).map(move |p| {
            let left = deadline.saturating_duration_since(Instant::now());
            (p, self.limits.peer_timeout.min(left))
        })
    }

    async fn run_round(&self) -> Round {
        let Some(discovery) = &self.discovery else {
            return Round::default();
        };
        let started = Instant::now();
        let deadline = started + self.limits.deadline;
        let members = match tokio::time::timeout_at(deadline.into(), discovery.members()).await {
            Ok(members) => members,
            Err(_) => crate::discovery::Members {
                peers: Vec::new(),
                error: Some(format!(
                    "DNS lookup of {} took longer than the {} ms deadline",
                    discovery.member().srv_name(),
                    self.limits.deadline.as_millis()
                )),
            },
        };
        // DNS's answer, plus the siblings that announced themselves since;
        // this pod under its own name even when the SRV target is an address.
        let mut peers = members.peers;
        self.announced
            .lock()
            .expect("poisoned")
            .add_to(&mut peers, Instant::now());
        for peer in &mut peers {
            if self.is_me(peer) {
                peer.pod.clone_from(&self.pod);
            }
        }
        let fetches = self.siblings(&peers, deadline).map(|(peer, limit)| {
            let client = self.client.clone();
            let metrics = self.metrics.clone();
            async move {
                metrics.peer_fetches.inc();
                let t0 = Instant::now();
                let result = client.fetch(peer.addr, limit).await;
                (peer, result, t0.elapsed())
            }
        });
        let results = futures::future::join_all(fetches).await;
        let me = self.my_entry();
        let mut outcomes = BTreeMap::new();
        let mut changed = false;
        // SRV targets that are addresses, by the pod name they answered with.
        let mut answered_as = BTreeMap::new();
        {
            let mut counter = self.counter.lock().expect("poisoned");
            for (peer, result, latency) in results {
                let mut pod = peer.pod.clone();
                let merged = result.and_then(|state| {
                    if state.pod != peer.pod {
                        if self.names_a_pod(&peer.pod) {
                            return Err(FetchError::Invalid(format!(
                                "{} at {} answered as {:?}",
                                peer.pod, peer.addr, state.pod
                            )));
                        }
                        answered_as.insert(peer.pod.clone(), state.pod.clone());
                        pod.clone_from(&state.pod);
                    }
                    counter
                        .absorb(&sender(&state), &state.entries, &me, unix_now())
                        .map(|grew| (state.incarnation, grew))
                        .map_err(|e| FetchError::Invalid(e.to_string()))
                });
                let outcome = match merged {
                    Ok((incarnation, grew)) => {
                        changed |= grew;
                        Outcome::Live {
                            incarnation,
                            latency,
                        }
                    }
                    Err(error) => {
                        self.metrics
                            .peer_errors
                            .get_or_create(&ErrorKind { kind: error.kind() })
                            .inc();
                        tracing::debug!(peer = %peer.pod, addr = %peer.addr, %error, "peer fetch failed");
                        Outcome::Failed(error.to_string())
                    }
                };
                outcomes.insert(pod, outcome);
            }
        }
        if changed {
            self.changed.notify_one();
        }
        let metrics = &self.metrics;
        metrics
            .fanout_duration
            .observe(started.elapsed().as_secs_f64());
        for peer in &mut peers {
            if let Some(pod) = answered_as.remove(&peer.pod) {
                peer.pod = pod;
            }
        }
        metrics.members.set(peers.len() as i64);
        Round {
            members: peers,
            discovery_error: members.error,
            outcomes,
        }
    }
}

impl Inner {
    /// This pod, by name or, when the SRV target names an address, by its
    /// peer address (a pod never calls itself).
    fn is_me(&self, peer: &Peer) -> bool {
        if peer.pod == self.pod {
            return true;
        }
        let Some(mine) = self.addr.get() else {
            return false;
        };
        peer.addr.port() == mine.port()
            && (peer.addr.ip() == mine.ip()
                || mine.ip().is_unspecified()
                    && source_ip_towards(peer.addr) == Some(peer.addr.ip()))
    }

    /// Whether an SRV target's first label is a pod name of this
    /// StatefulSet (`<statefulset>-<ordinal>`), or something else, such as
    /// the `a-b-c-d` name CoreDNS gives endpoints of a headless Service the
    /// StatefulSet's `serviceName` does not name.
    fn names_a_pod(&self, label: &str) -> bool {
        let Some(discovery) = &self.discovery else {
            return true;
        };
        crate::identity::split_ordinal(label)
            .is_some_and(|(set, _)| set == discovery.member().statefulset)
    }
}

/// The local address this host would send from to reach `to`: one of its
/// own addresses. A UDP "connect" only picks the route; nothing is sent.
fn source_ip_towards(to: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(to).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// Where `sibling` can reach a peer route bound at `bound`: the bound
/// address, or, when bound to all addresses (`0.0.0.0`), the address this
/// pod sends from towards that sibling (the pod's IP in Kubernetes).
fn reachable_at(bound: SocketAddr, sibling: SocketAddr) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    source_ip_towards(sibling).map_or(bound, |ip| SocketAddr::new(ip, bound.port()))
}

/// The key of the counter a state speaks for.
fn sender(state: &PeerState) -> Key {
    Key {
        pod: state.pod.clone(),
        incarnation: state.incarnation.clone(),
    }
}

/// Background tasks of a [`Cluster`]; aborted on drop.
pub struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
