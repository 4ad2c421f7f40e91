//! The cluster view: fan out to the siblings, merge what they know, answer
//! `/visits/total`.
//!
//! A *round* looks the members up in DNS, fetches every sibling's state at
//! once (each within the per-peer timeout, all within the overall deadline;
//! never this pod itself), checks and merges what came back into the
//! [`Counter`] under the trust rules of [`merge`](crate::merge), and records
//! who answered. Concurrent `/visits/total` requests share rounds, but only
//! rounds that start after they arrived ([`rounds`]): peer load does not
//! grow with client load, and a `complete` total holds every visit
//! acknowledged before the request.
//!
//! - [`wire`]: the peer protocol's types and its decoder;
//! - [`client`]: the HTTP client siblings use;
//! - [`view`]: the pure `/visits/total` view of a round;
//! - [`persist`]: `peers.state`, with one writer;
//! - [`delta`]: what changed since a sibling's last fetch (cursors).
//!
//! Fetches carry the cursor of the sibling's last answer merged, so a quiet
//! sibling answers with its own entry only. The background refresh is not
//! a round: it gossips with [`GOSSIP_FANOUT`] siblings at random
//! (knowledge travels), while `/visits/total` still asks every member.

pub mod announced;
pub mod client;
pub mod compact;
pub mod delta;
pub mod persist;
pub mod rounds;
pub mod view;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::discovery::{Discovery, Peer};
use crate::merge::{Counter, Entry, Key, MergeError};
use crate::metrics::{ErrorKind, Metrics};
use crate::store::{Store, unix_now};
use announced::Announced;
use client::{FetchError, PeerClient};
use delta::{Cursor, Journal};
use persist::PeersFile;
pub use persist::{PEERS_FILE, PeersError, load_peers};
use rounds::{Joined, Rounds};
use view::{Outcome, Round, Snapshot};
use wire::{MAX_ENTRIES, PeerState, Retired, TotalView};

/// Fan-out limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub peer_timeout: Duration,
    pub deadline: Duration,
}

/// Why `tally forget` was refused.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("{0} is this pod's running counter: it cannot be retired while it counts")]
    Running(Key),
    #[error("{0} is not a counter this pod knows (see /visits/total)")]
    Unknown(Key),
}

/// What a hand-over or `tally forget` changed, or why it was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    State(#[from] wire::StateError),
    #[error(transparent)]
    Merge(#[from] MergeError),
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
    /// The view the page shows, built once per round or change of
    /// `counter` (`None` until asked for again).
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    /// Wakes the persister when `counter` changed.
    changed: Notify,
    /// The only writer of `peers.state`.
    file: PeersFile,
    /// The 80 % entry-limit warning was logged (until it drops below).
    crowded: AtomicBool,
    /// Siblings that announced themselves before DNS lists them.
    announced: Mutex<Announced>,
    /// Where this pod's peer route listens, once bound: to announce it, and
    /// to recognise itself in DNS by address when the SRV target does not
    /// name it.
    addr: OnceLock<SocketAddr>,
    /// What this pod has answered siblings, so they can ask for changes only.
    journal: Mutex<Journal>,
    /// Per sibling (by the pod name DNS gives), the cursor of its last
    /// answer this pod merged whole.
    cursors: Mutex<HashMap<String, String>>,
}

/// A sibling's answer to a fetch: its state and the cursor for the next
/// fetch (or why it failed), and how long it took.
type Fetched = (
    Peer,
    Result<(PeerState, Option<String>), FetchError>,
    Duration,
);

/// What merging a batch of answers did.
#[derive(Default)]
struct Merged {
    outcomes: BTreeMap<String, Outcome>,
    disputes: BTreeMap<Key, String>,
    /// SRV targets that are addresses, by the pod name they answered with.
    answered_as: BTreeMap<String, String>,
    changed: bool,
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
        let counter = load_peers(data_dir)?.counter();
        let inner = Arc::new(Inner {
            pod: pod.to_string(),
            store,
            metrics,
            discovery,
            client,
            limits,
            counter: Mutex::new(counter),
            last: Mutex::new(Arc::new(Round::default())),
            snapshot: Mutex::new(None),
            changed: Notify::new(),
            file: PeersFile::new(data_dir),
            crowded: AtomicBool::new(false),
            announced: Mutex::new(Announced::default()),
            addr: OnceLock::new(),
            journal: Mutex::new(Journal::new(getrandom::u64().unwrap_or_default())),
            cursors: Mutex::new(HashMap::new()),
        });
        let rounds = Rounds::new({
            let inner = inner.clone();
            move || {
                let inner = inner.clone();
                async move {
                    let round = Arc::new(inner.run_round().await);
                    *inner.last.lock().expect("poisoned") = round.clone();
                    inner.stale();
                    round
                }
            }
        });
        let cluster = Cluster { inner, rounds };
        cluster.inner.changed(false);
        cluster
            .inner
            .metrics
            .total
            .set(cluster.snapshot().view.total as i64);
        Ok(cluster)
    }

    /// Starts the persister and, when `refresh` is set, the periodic gossip
    /// (each period, [`GOSSIP_FANOUT`] siblings at random: knowledge travels,
    /// so every pod hears of every change within a few periods while a
    /// pod's background peer traffic does not grow with the cluster).
    /// `/visits/total` still asks every member. Both stop with
    /// [`Background::stop`].
    pub fn spawn_background(&self, refresh: Option<Duration>) -> Background {
        let persister = tokio::spawn(self.clone().persist_forever());
        let refresher = refresh
            .filter(|_| self.inner.discovery.is_some())
            .map(|every| {
                let cluster = self.clone();
                tokio::spawn(async move {
                    loop {
                        cluster.inner.gossip().await;
                        tokio::time::sleep(every).await;
                    }
                })
            });
        Background {
            tasks: std::iter::once(persister).chain(refresher).collect(),
        }
    }

    /// `/visits/total`: joins the round in flight or starts one. Complete
    /// only once what it counted is on this pod's volume: a total answered
    /// complete survives `kill -9` and a restart (design.md §6).
    pub async fn total(&self) -> TotalView {
        let round = self.round().await;
        let mut view = self.view(&round);
        if view.complete
            && let Err(reason) = self.durable().await
        {
            view.complete = false;
            view.persist_error = Some(reason);
        }
        view
    }

    /// Waits, at most the fan-out deadline, until everything this pod
    /// knows so far is in `peers.state` on its volume; `Err` says why not.
    pub async fn durable(&self) -> Result<(), String> {
        let file = &self.inner.file;
        file.synced_to(file.wanted(), self.inner.limits.deadline)
            .await
    }

    /// `Err(reason)` while what this pod knows is not on its volume because
    /// writing `peers.state` fails (readiness).
    pub fn health(&self) -> Result<(), String> {
        let file = &self.inner.file;
        match file.failing() {
            Some(reason) if !file.clean() => Err(reason),
            _ => Ok(()),
        }
    }

    /// The last known view, without any network I/O (for the page), built
    /// once per round or change of what is known; the page patches this
    /// pod's own count in ([`Snapshot::total_with`]). Never `complete` in
    /// a cluster: its round started before the request did, so it may miss
    /// visits acknowledged since (design.md §4).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let mut cached = self.inner.snapshot.lock().expect("poisoned");
        if let Some(snapshot) = &*cached {
            return snapshot.clone();
        }
        let round = self.inner.last.lock().expect("poisoned").clone();
        let me = self.inner.my_entry();
        let counter = self.inner.counter.lock().expect("poisoned");
        let mut view = view::view(&counter, &round, &me, unix_now());
        let own_elsewhere = counter.get(&me.key()).map_or(0, |known| known.count);
        drop(counter);
        view.complete &= self.inner.discovery.is_none();
        let snapshot = Arc::new(Snapshot::new(view, me.count, own_elsewhere));
        *cached = Some(snapshot.clone());
        snapshot
    }

    /// What the peer route answers: this pod's entry, all it knows, and
    /// the retired counters.
    pub fn peer_state(&self) -> PeerState {
        self.inner.state()
    }

    /// The peer route's answer to a sibling that sent `since` and the
    /// digest of what it knows, `have` ([`delta`]): this pod's entry plus
    /// what changed after that cursor (nothing when the digests match), or
    /// everything for a cursor this process did not issue; and the next
    /// cursor.
    pub fn peer_delta(&self, since: &str, have: Option<u64>) -> (PeerState, Cursor) {
        // One answer at a time: the journal's versions follow the states
        // in the order they are taken.
        let mut journal = self.inner.journal.lock().expect("poisoned");
        let answer = journal.answer(self.peer_state(), Some(since), have);
        (answer.state, answer.cursor)
    }

    /// Writes `peers.state` now; the final write at shutdown. Returns
    /// whether it was written.
    pub async fn persist(&self) -> bool {
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || inner.file.write(&inner.counter)).await;
        let pending = &self.inner.metrics.persist_pending;
        let error = match result {
            Ok(Ok(())) => {
                if pending.set(0) != 0 {
                    tracing::info!(file = PEERS_FILE, "the peer view is on disk again");
                }
                return true;
            }
            Ok(Err(error)) => {
                if error.kind() == std::io::ErrorKind::StorageFull {
                    // The volume the counter shares: the store checks its
                    // free space and stops counting if it is full.
                    self.inner.store.check_space();
                }
                error.to_string()
            }
            Err(error) => format!("the writer panicked: {error}"),
        };
        self.inner.metrics.persist_failures.inc();
        pending.set(1);
        tracing::error!(file = PEERS_FILE, %error, "cannot persist the peer view; retrying, not ready meanwhile");
        false
    }

    /// Merges a state a sibling handed over (`PUT` on the peer route): on
    /// its way out, spreading a retirement, or announcing itself when
    /// starting (then it is a member from now on). Current members answer
    /// for themselves, so what it relays about them is not taken.
    pub fn receive(&self, bytes: &[u8]) -> Result<(), ReceiveError> {
        let state = wire::decode_state(wire::Encoding::Json, bytes)
            .inspect_err(|e| self.inner.refused(e.reason()))?;
        let members: BTreeMap<String, Option<(String, u64)>> = self
            .inner
            .last
            .lock()
            .expect("poisoned")
            .members
            .iter()
            .flatten()
            .map(|pod| (pod.clone(), None))
            .collect();
        let me = self.inner.my_entry();
        // First-hand only from a pod known to be a member (or announcing
        // itself): anyone with the token could claim any name.
        let member = state.announce.is_some() || members.contains_key(&state.pod);
        let absorbed = self
            .inner
            .counter
            .lock()
            .expect("poisoned")
            .absorb_from(&state, &me.key(), me.count, &members, unix_now(), member)
            .inspect_err(|e| self.inner.refused(e.reason()))?;
        for dispute in &absorbed.disputes {
            self.inner.refused(dispute.reason());
            tracing::warn!(counter = %dispute.key, %dispute, "relayed count ignored");
        }
        self.inner.changed(absorbed.changed);
        let now_ms = unix_now_ms();
        let mut announced = self.inner.announced.lock().expect("poisoned");
        announced.learn(
            &state.news,
            &me.pod,
            |pod| self.inner.names_a_pod(pod),
            now_ms,
        );
        match state.announce {
            _ if state.pod == me.pod => {}
            Some(addr) => {
                tracing::info!(pod = %state.pod, %addr, "sibling announced itself");
                announced.record(&state.pod, addr, now_ms);
            }
            // Only a pod on its way out hands its state over unannounced,
            // saying from where in its news.
            None => {
                let from = state
                    .news
                    .iter()
                    .find(|n| n.pod == state.pod && n.left)
                    .and_then(|n| n.addr);
                announced.depart(&state.pod, from, now_ms);
            }
        }
        Ok(())
    }

    /// At start, before any visit is served: tells the siblings DNS lists
    /// that this pod is a member answering at `addr` (its bound peer
    /// address), so they count it at once even while DNS still serves a
    /// cached answer without it. Returns once a sibling took it, DNS lists
    /// this pod, or there is none to tell (DNS answered with no other
    /// member). Until then
    /// nobody would count this pod's visits (DNS failing at its start, or
    /// every address DNS gave stale) and complete totals elsewhere would
    /// miss them, so the caller serves none: it announces again every
    /// [`ANNOUNCE_RETRY`] (each try bounded by the deadline). Once one
    /// sibling has it, the news travels ([`announced`]).
    pub async fn join(&self, addr: SocketAddr) {
        let _ = self.inner.addr.set(addr);
        let started = Instant::now();
        loop {
            let told = self
                .tell_siblings("announce", |sibling| PeerState {
                    announce: Some(reachable_at(addr, sibling)),
                    ..self.peer_state()
                })
                .await;
            // DNS listing this pod at its address is as good: siblings see
            // it within their resolver's cache time, and fail (incomplete)
            // if they cannot reach it. So is an answer with nobody else.
            if told.took > 0 || told.listed || (told.siblings == 0 && !told.dns_failed) {
                tracing::info!(%addr, siblings = told.took, "announced to the siblings");
                return;
            }
            if told.dns_failed && started.elapsed() >= JOIN_DNS_GRACE {
                // A pod must not stay out of service for as long as DNS
                // fails (design.md §5: a failing lookup is reported, not
                // fatal). Once DNS answers again the siblings resolve
                // this pod themselves.
                tracing::warn!(
                    %addr,
                    waited_s = started.elapsed().as_secs(),
                    "DNS still failing: serving visits although no sibling took the announce; a sibling whose cached DNS answer lacks this pod may call its total complete without it until that answer expires"
                );
                return;
            }
            tracing::warn!(
                %addr,
                siblings = told.siblings,
                dns_failed = told.dns_failed,
                "no sibling took the announce: serving no visit until one does (nobody would count them)"
            );
            tokio::time::sleep(ANNOUNCE_RETRY).await;
        }
    }

    /// `tally forget`: retires a counter cluster-wide. The tombstone is
    /// persisted here, handed to every sibling at once, and travels in
    /// every state from now on, so no relay can bring the counter back.
    pub async fn forget(&self, key: Key) -> Result<Retired, ForgetError> {
        let me = self.inner.my_entry();
        if key == me.key() {
            return Err(ForgetError::Running(key));
        }
        let retired = {
            let mut counter = self.inner.counter.lock().expect("poisoned");
            let count = match counter.get(&key) {
                Some(known) => known.count,
                None if counter.is_retired(&key) => 0,
                None => return Err(ForgetError::Unknown(key)),
            };
            let retired = Retired {
                pod: key.pod.clone(),
                incarnation: key.incarnation.clone(),
                count,
            };
            counter.retire(retired.clone());
            counter
                .retired()
                .find(|r| r.key() == key)
                .unwrap_or(retired)
        };
        tracing::warn!(counter = %key, count = retired.count, "counter retired by an operator (tally forget)");
        self.persist().await;
        self.inner.changed(false);
        let state = self.peer_state();
        let told = self.tell_siblings("retirement", |_| state.clone()).await;
        tracing::info!(counter = %key, siblings = told.took, "retirement handed to the siblings");
        Ok(retired)
    }

    /// On the way out: hands this pod's final state to every sibling, so a
    /// pod that is scaled away or replaced leaves its last count behind even
    /// if nobody fetched it since its last visits. Bounded by the deadline.
    pub async fn goodbye(&self) {
        let state = self.peer_state();
        let addr = self.inner.addr.get().copied();
        let handed = self
            .tell_siblings("hand-over", |sibling| {
                // Where it leaves from: a pod of this name listed elsewhere
                // later is a new one, not this departed one.
                let mut state = state.clone();
                state.news.retain(|n| n.pod != state.pod);
                state.news.push(wire::Notice {
                    pod: state.pod.clone(),
                    at_ms: unix_now_ms(),
                    addr: addr.map(|a| reachable_at(a, sibling)),
                    left: true,
                });
                state
            })
            .await;
        tracing::info!(
            count = self.inner.store.count(),
            siblings = handed.took,
            "final count handed over"
        );
    }

    /// `PUT`s a state to every sibling DNS lists or news named (never to
    /// itself), within the deadline.
    async fn tell_siblings(&self, what: &str, state: impl Fn(SocketAddr) -> PeerState) -> Told {
        let Some(discovery) = &self.inner.discovery else {
            return Told::default();
        };
        let deadline = self.inner.limits.deadline;
        let started = Instant::now();
        let Ok(members) = tokio::time::timeout(deadline, discovery.members()).await else {
            tracing::warn!(what, "no DNS answer in time to tell the siblings");
            return Told {
                dns_failed: true,
                ..Told::default()
            };
        };
        let peers = self.inner.with_news(&members.peers);
        let pushes = self
            .inner
            .siblings(&peers, started + deadline)
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
        Told {
            took: results.iter().filter(|(_, r)| r.is_ok()).count(),
            siblings: results.len(),
            dns_failed: members.failed,
            listed: !members.failed && members.peers.iter().any(|p| self.inner.is_my_address(p)),
        }
    }

    /// Writes `peers.state` after every change; a failed write is retried
    /// with backoff until it succeeds (a full volume frees up, a remount
    /// comes back), not left for the next change.
    async fn persist_forever(self) {
        let mut backoff = PERSIST_RETRY_MIN;
        loop {
            if self.inner.file.clean() {
                self.inner.changed.notified().await;
            }
            if self.persist().await {
                backoff = PERSIST_RETRY_MIN;
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PERSIST_RETRY_MAX);
            }
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
        let view = view::view(
            &self.inner.counter.lock().expect("poisoned"),
            round,
            &me,
            unix_now(),
        );
        self.inner.metrics.total.set(view.total as i64);
        view
    }
}

impl Inner {
    /// What the peer route answers (see [`Cluster::peer_state`]).
    fn state(&self) -> PeerState {
        // The news first: a departure is recorded after its final state was
        // absorbed, so a state passing on a departure holds that count.
        let news = self.announced.lock().expect("poisoned").news(unix_now_ms());
        let me = self.my_entry();
        let key = me.key();
        let counter = self.counter.lock().expect("poisoned");
        let mut entries: Vec<Entry> = counter.entries().filter(|e| e.key() != key).collect();
        entries.push(me.clone());
        PeerState {
            pod: me.pod,
            incarnation: me.incarnation,
            entries,
            retired: counter.retired().collect(),
            announce: None,
            news,
        }
    }

    /// After the counter may have changed: the entry gauge, the 80 %
    /// warning, and (when `persist`) a wake-up for the persister.
    fn changed(&self, persist: bool) {
        self.stale();
        let len = self.counter.lock().expect("poisoned").len();
        self.metrics.entries.set(len as i64);
        let crowded = len * 5 >= MAX_ENTRIES * 4;
        if crowded && !self.crowded.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                entries = len,
                limit = MAX_ENTRIES,
                "the cluster state holds over 80 % of the counters a peer body can carry; retire gone ones with `tally forget POD/INCARNATION`"
            );
        } else if !crowded {
            self.crowded.store(false, Ordering::Relaxed);
        }
        if persist {
            self.file.dirty();
            self.changed.notify_one();
        }
    }

    /// The page's snapshot no longer shows what is known.
    fn stale(&self) {
        *self.snapshot.lock().expect("poisoned") = None;
    }

    fn refused(&self, reason: &'static str) {
        self.metrics.refusal(reason);
    }

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
        let (dns, discovery_error) = self.resolve(discovery, deadline).await;
        let mut peers = self.with_news(&dns);
        let mut results = self.fetch(&peers, deadline).await;
        // What the siblings heard may name members this pod never heard
        // of, or a new address for one it could not reach: fetch those too,
        // in this round, or a total could be complete without them.
        for _ in 0..MAX_NEWS_PHASES {
            if !self.learn_news(&results) {
                break;
            }
            let now = self.with_news(&dns);
            let again: Vec<Peer> = now
                .iter()
                .filter(|p| {
                    !results.iter().any(|(q, result, _)| {
                        q.pod == p.pod && (q.addr == p.addr || result.is_ok())
                    })
                })
                .cloned()
                .collect();
            if again.is_empty() {
                break;
            }
            tracing::debug!(members = ?again.iter().map(|p| &p.pod).collect::<Vec<_>>(), "members learned from siblings");
            results.retain(|(q, _, _)| !again.iter().any(|p| p.pod == q.pod));
            results.extend(self.fetch(&again, deadline).await);
            peers = now;
        }
        // A member that answered at its fallback address is there.
        for peer in &mut peers {
            if let Some((answered, _, _)) = results
                .iter()
                .find(|(q, result, _)| q.pod == peer.pod && result.is_ok())
            {
                peer.addr = answered.addr;
            }
        }
        let merged = self.absorb_all(results);
        for peer in &mut peers {
            if let Some(pod) = merged.answered_as.get(&peer.pod) {
                peer.pod.clone_from(pod);
            }
        }
        let mut round = Round {
            members: Some(peers.iter().map(|p| p.pod.clone()).collect()),
            discovery_error,
            outcomes: merged.outcomes,
            disputes: merged.disputes,
            ..Round::default()
        };
        {
            let now_ms = unix_now_ms();
            let mut announced = self.announced.lock().expect("poisoned");
            round.departed = peers
                .iter()
                .filter(|p| announced.has_departed(&p.pod, p.addr, now_ms))
                .map(|p| p.pod.clone())
                .collect();
        }
        self.changed(merged.changed);
        let metrics = &self.metrics;
        metrics
            .fanout_duration
            .observe(started.elapsed().as_secs_f64());
        metrics.members.set(peers.len() as i64);
        if round.discovery_error.is_some() {
            metrics.discovery_failures.inc();
        }
        round
    }

    /// Background refresh: asks [`GOSSIP_FANOUT`] siblings picked at random
    /// for what changed and merges it (news included) under the same trust
    /// rules as a round. Not a round: `/visits/total` never rides on it
    /// (its read barrier needs every member's own answer).
    async fn gossip(&self) {
        let Some(discovery) = &self.discovery else {
            return;
        };
        let started = Instant::now();
        let deadline = started + self.limits.deadline;
        let (dns, discovery_error) = match discovery.recent(GOSSIP_DNS_REUSE) {
            Some(dns) => (dns, None),
            None => self.resolve(discovery, deadline).await,
        };
        let mut peers = self.with_news(&dns);
        self.metrics.members.set(peers.len() as i64);
        if discovery_error.is_some() {
            self.metrics.discovery_failures.inc();
        }
        peers.retain(|p| !self.is_me(p));
        let picked = pick(&mut peers, GOSSIP_FANOUT, || {
            getrandom::u64().unwrap_or_default()
        });
        let results = self.fetch(picked, deadline).await;
        self.learn_news(&results);
        let merged = self.absorb_all(results);
        self.changed(merged.changed);
        self.metrics
            .fanout_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// DNS's answer within the deadline, or why there is none.
    async fn resolve(
        &self,
        discovery: &Discovery,
        deadline: Instant,
    ) -> (Vec<Peer>, Option<String>) {
        match tokio::time::timeout_at(deadline.into(), discovery.members()).await {
            Ok(members) => (members.peers, members.error),
            Err(_) => (
                Vec::new(),
                Some(format!(
                    "DNS lookup of {} took longer than the {} ms deadline",
                    discovery.member().srv_name(),
                    self.limits.deadline.as_millis()
                )),
            ),
        }
    }

    /// Takes in what the answering siblings heard of members; whether any
    /// of it was news.
    fn learn_news(&self, results: &[Fetched]) -> bool {
        let mut heard = false;
        let mut announced = self.announced.lock().expect("poisoned");
        for (_, result, _) in results {
            if let Ok((state, _)) = result {
                heard |= !announced
                    .learn(
                        &state.news,
                        &self.pod,
                        |pod| self.names_a_pod(pod),
                        unix_now_ms(),
                    )
                    .is_empty();
            }
        }
        heard
    }

    /// DNS's answer with what was heard of members since (announces,
    /// first-hand or passed on), this pod under its own name.
    fn with_news(&self, dns: &[Peer]) -> Vec<Peer> {
        let mut peers = dns.to_vec();
        self.announced
            .lock()
            .expect("poisoned")
            .add_to(&mut peers, unix_now_ms());
        for peer in &mut peers {
            if self.is_me(peer) {
                peer.pod.clone_from(&self.pod);
            }
        }
        peers
    }

    /// Fetches from every sibling among `peers` what changed since its
    /// cursor, at once, each within its limit.
    async fn fetch(&self, peers: &[Peer], deadline: Instant) -> Vec<Fetched> {
        let have = {
            let state = self.state();
            delta::digest(&state.entries, &state.retired, &state.news)
        };
        let fetches = self.siblings(peers, deadline).map(|(peer, limit)| {
            let peer = peer.clone();
            let since = self
                .cursors
                .lock()
                .expect("poisoned")
                .get(&peer.pod)
                .cloned()
                .unwrap_or_default();
            async move {
                let t0 = Instant::now();
                let mut peer = peer;
                let mut result = self.fetch_at(&peer, peer.addr, limit, &since, have).await;
                if let (Err(_), Some(also)) = (&result, peer.also) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let limit = self.limits.peer_timeout.min(left);
                    let second = self.fetch_at(&peer, also, limit, &since, have).await;
                    if second.is_ok() {
                        tracing::debug!(pod = %peer.pod, announced = %peer.addr, %also,
                            "not at its announced address; answered where DNS lists it");
                        peer.addr = also;
                        result = second;
                    }
                }
                (peer, result, t0.elapsed())
            }
        });
        futures::future::join_all(fetches).await
    }

    /// One fetch from `peer` at `addr`. SRV targets that are addresses are
    /// members by the pod name they answer with; a pod name must answer as
    /// itself (so asking another address can only add a member's own word).
    async fn fetch_at(
        &self,
        peer: &Peer,
        addr: SocketAddr,
        limit: Duration,
        since: &str,
        have: u64,
    ) -> Result<(PeerState, Option<String>), FetchError> {
        self.metrics.peer_fetches.inc();
        let (state, cursor) = self.client.fetch_since(addr, limit, since, have).await?;
        if state.pod == peer.pod || !self.names_a_pod(&peer.pod) {
            Ok((state, cursor))
        } else {
            Err(FetchError::Invalid(format!(
                "{} at {addr} answered as {:?}",
                peer.pod, state.pod
            )))
        }
    }

    /// Checks and merges a batch of answers under the trust rules, first
    /// hand first. Keeps a sibling's cursor only when its answer was merged
    /// whole; a refused or disputed answer drops it, so the next fetch asks
    /// for the full state (a delta never builds on a base this pod did not
    /// take in full).
    fn absorb_all(&self, results: Vec<Fetched>) -> Merged {
        let mut merged = Merged {
            answered_as: results
                .iter()
                .filter_map(|(peer, result, _)| {
                    let (state, _) = result.as_ref().ok()?;
                    (state.pod != peer.pod).then(|| (peer.pod.clone(), state.pod.clone()))
                })
                .collect(),
            ..Merged::default()
        };
        // First what every pod says for itself: the authority on its own
        // counter, against which relays are judged.
        let answered: BTreeMap<String, Option<(String, u64)>> = results
            .iter()
            .filter_map(|(_, result, _)| result.as_ref().ok())
            .filter_map(|(s, _)| {
                Some((s.pod.clone(), Some((s.incarnation.clone(), s.own()?.count))))
            })
            .collect();
        let me = self.my_entry();
        let mut counter = self.counter.lock().expect("poisoned");
        let mut cursors = self.cursors.lock().expect("poisoned");
        for (peer, result, latency) in results {
            let absorbed = result.and_then(|(state, cursor)| {
                counter
                    .absorb(&state, &me.key(), me.count, &answered, unix_now())
                    .map(|absorbed| (state.incarnation, cursor, absorbed))
                    .map_err(|e| {
                        self.refused(e.reason());
                        FetchError::Invalid(e.to_string())
                    })
            });
            let outcome = match absorbed {
                Ok((incarnation, cursor, absorbed)) => {
                    merged.changed |= absorbed.changed;
                    match cursor.filter(|_| absorbed.disputes.is_empty()) {
                        Some(cursor) => cursors.insert(peer.pod.clone(), cursor),
                        None => cursors.remove(&peer.pod),
                    };
                    for dispute in absorbed.disputes {
                        self.refused(dispute.reason());
                        merged
                            .disputes
                            .insert(dispute.key.clone(), dispute.to_string());
                    }
                    Outcome::Live {
                        incarnation,
                        latency,
                    }
                }
                Err(error) => {
                    if matches!(error, FetchError::Refused(_) | FetchError::Invalid(_)) {
                        cursors.remove(&peer.pod);
                    }
                    if let FetchError::Refused(e) = &error {
                        self.refused(e.reason());
                    }
                    self.metrics
                        .peer_errors
                        .get_or_create(&ErrorKind { kind: error.kind() })
                        .inc();
                    tracing::debug!(peer = %peer.pod, addr = %peer.addr, %error, "peer fetch failed");
                    Outcome::Failed(error.to_string())
                }
            };
            let pod = merged.answered_as.get(&peer.pod).unwrap_or(&peer.pod);
            merged.outcomes.insert(pod.clone(), outcome);
        }
        merged
    }

    /// This pod, by name or, when the SRV target names an address, by its
    /// peer address (a pod never calls itself).
    fn is_me(&self, peer: &Peer) -> bool {
        peer.pod == self.pod || self.is_my_address(peer)
    }

    /// Whether `peer`'s address is this pod's peer route.
    fn is_my_address(&self, peer: &Peer) -> bool {
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

/// How often a starting pod announces itself again while no sibling took
/// it.
pub const ANNOUNCE_RETRY: Duration = Duration::from_secs(1);

/// How long a starting pod waits for DNS to answer before it serves
/// visits unheard. Longer than the chaos suite's DNS outages and below the
/// harnesses' and kubelets' start-up patience; a longer outage at a pod's
/// start is the one case where exactness yields to availability (README).
pub const JOIN_DNS_GRACE: Duration = Duration::from_secs(10);

/// Rounds of fetching members learned from siblings' news, after the
/// first: each can only add what the previous one heard.
const MAX_NEWS_PHASES: usize = 3;

/// First wait before retrying a failed write of `peers.state`, doubled up
/// to [`PERSIST_RETRY_MAX`]: soon enough that a freed volume is used at
/// once, slow enough that a full one is not hammered.
const PERSIST_RETRY_MIN: Duration = Duration::from_millis(100);
const PERSIST_RETRY_MAX: Duration = Duration::from_secs(2);

/// Unix time in milliseconds: when a notice was heard.
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// The members other than `pod`, each with its time limit.
fn siblings<'a>(
    pod: &'a str,
    limits: Limits,
    members: &'a [Peer],
    deadline: Instant,
) -> impl Iterator<Item = (&'a Peer, Duration)> + 'a {
    members.iter().filter(move |p| p.pod != pod).map(move |p| {
        let left = deadline.saturating_duration_since(Instant::now());
        (p, limits.peer_timeout.min(left))
    })
}

/// At start-up, before counting: the highest count the siblings know for
/// this pod's own counter `me`, with who said it. Above what the disk holds,
/// the volume was restored from a backup (or lost writes), and the pod must
/// start a new incarnation rather than count again over visits the cluster
/// already has. Bounded by the deadline; `None` if nobody knows more.
pub async fn what_siblings_know(
    discovery: &Discovery,
    client: &PeerClient,
    limits: Limits,
    me: &Entry,
) -> Option<(u64, String)> {
    let deadline = Instant::now() + limits.deadline;
    let members = tokio::time::timeout_at(deadline.into(), discovery.members())
        .await
        .ok()?;
    let fetches = siblings(&me.pod, limits, &members.peers, deadline)
        .map(|(peer, limit)| client.fetch(peer.addr, limit));
    futures::future::join_all(fetches)
        .await
        .into_iter()
        .flatten()
        .filter_map(|state| {
            let known = state.entries.iter().find(|e| e.key() == me.key())?;
            (known.count > me.count).then(|| (known.count, state.pod.clone()))
        })
        .max()
}

/// How telling the siblings went.
#[derive(Debug, Default, Clone, Copy)]
struct Told {
    /// Siblings that took the state.
    took: usize,
    /// Siblings it was sent to.
    siblings: usize,
    /// DNS failed (no answer in time, or an error beside the last known
    /// members).
    dns_failed: bool,
    /// DNS answered and lists this pod at its own address (a cached answer
    /// with its name at a former address does not count: siblings reach
    /// nobody there, and may take the pod for departed).
    listed: bool,
}

/// Siblings each background refresh asks (see [`Cluster::spawn_background`]).
pub const GOSSIP_FANOUT: usize = 3;

/// How old a DNS answer the gossip uses before it asks DNS again (as long
/// as CoreDNS's own `cache 30`); `/visits/total` always asks DNS.
pub const GOSSIP_DNS_REUSE: Duration = Duration::from_secs(30);

/// Moves `k` items picked at random (by `random`) to the front of `items`
/// and returns them (all of them when there are at most `k`).
fn pick<T>(items: &mut [T], k: usize, mut random: impl FnMut() -> u64) -> &[T] {
    let k = k.min(items.len());
    for i in 0..k {
        let j = i + (random() % (items.len() - i) as u64) as usize;
        items.swap(i, j);
    }
    &items[..k]
}

/// Background tasks of a [`Cluster`]; aborted on drop.
pub struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    /// Stops the tasks and waits until they are gone, so the caller's
    /// final persist is the last write.
    pub async fn stop(mut self) {
        for task in std::mem::take(&mut self.tasks) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn pick_takes_k_distinct_items_and_all_when_fewer() {
        let mut calls = 0u64;
        let mut items: Vec<u32> = (0..10).collect();
        let picked = pick(&mut items, 3, || {
            calls += 1;
            calls * 7
        })
        .to_vec();
        let mut distinct = picked.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{picked:?}");
        let mut all = items.clone();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>(), "nothing lost");
        let mut few = vec![1, 2];
        assert_eq!(pick(&mut few, 3, || 5).len(), 2);
        assert!(pick(&mut Vec::<u32>::new(), 3, || 0).is_empty());
    }
}
