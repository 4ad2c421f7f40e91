//! This pod's durable visit counter.
//!
//! One committer thread owns the count. A visit sends a request to it and
//! waits; the committer takes every request queued at that moment as one
//! batch, writes the new count into the next slot of `visits.state` (format
//! in [`format`]) and, in `group-commit` mode, `fdatasync`s it: one sync for
//! the whole batch. Only then does it answer each request with its own
//! visit number. Each durability mode is a small [`Policy`] the committer
//! asks after every batch, so `periodic` syncs on time under constant load.
//!
//! Failures: a failed write or sync answers the batch with an error, leaves
//! the count where it was, marks the store unhealthy and retries every
//! second (a fresh slot write and a sync: after a failed `fdatasync` the
//! kernel may have dropped the dirty pages, so a bare re-sync proves
//! nothing) until it succeeds, so readiness recovers on its own. A full
//! volume (design.md §6) is one such failure, seen before every commit
//! (`statvfs`, one syscall per batch), every second while idle, on `ENOSPC`
//! from a write or sync, and when `peers.state` could not be written for
//! lack of space ([`Store::check_space`]): `GET /` answers 503 until space
//! is freed. A commit
//! stuck longer than `commit_timeout` (a hung disk) fails readiness and
//! new visits get 503 at once; a visit whose caller stopped waiting is never
//! counted: dropped before its commit starts, or taken back out by a
//! compensating commit if it gave up while its commit ran.
//!
//! The committer talks to the disk only through [`Disk`], so the tests run
//! this same committer over the power-cut model (`powercut`).

pub mod disk;
pub mod file;
pub mod format;
pub mod lock;
pub mod policy;
#[cfg(test)]
pub(crate) mod powercut;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::Durability;
use crate::metrics::Metrics;
use disk::{Disk, RealDisk};
use format::{Decoded, FormatError, SlotWriter};
use lock::{DirLock, LockError};
use policy::Policy;

/// Name of the counter file inside the data directory.
pub const STATE_FILE: &str = "visits.state";
/// What a pod knows of the others, beside the counter (written by
/// `peers::persist`; named here because the store owns the directory and
/// refuses one that lost its counter but kept this).
pub const PEERS_FILE: &str = "peers.state";
/// How often an unhealthy store retries.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Errors opening or using the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{path} is corrupt: {source}. Tally will not start on it and has not changed it; \
         restore it from a backup, or move it away to start this volume from zero"
    )]
    Corrupt { path: PathBuf, source: FormatError },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(
        "cannot create or open the data directory {path}: {source} (check the volume mount and its permissions)"
    )]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot initialise {path}: {source}")]
    Init {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is missing, but {dir} has served a counter before ({evidence}): tally will not \
         silently start it again from 0. Restore {path} from a backup; or, to count on this \
         volume as a new incarnation on purpose (the old incarnation's visits stay in the \
         siblings' totals), run `tally new-incarnation --data-dir {dir}` and start again"
    )]
    Lost {
        path: PathBuf,
        dir: PathBuf,
        evidence: String,
    },
    #[error(
        "{path} is a symbolic link to {target}, which does not exist: tally neither follows \
         nor replaces it. Restore the file it points to, or replace the link with the file"
    )]
    Dangling { path: PathBuf, target: PathBuf },
    #[error(
        "{path} already holds a counter (incarnation {incarnation}, count {count}): move it away first if this volume really must start a new incarnation"
    )]
    Exists {
        path: PathBuf,
        incarnation: String,
        count: u64,
    },
    #[error("cannot store this pod's identity in {path}: {reason}")]
    Identity { path: PathBuf, reason: String },
    #[error("visit not recorded: {0}")]
    Unavailable(String),
    #[error("visit not recorded: {0}")]
    Stalled(String),
    #[error("the store is shutting down")]
    Closed,
}

/// What `visits.state` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredState {
    /// Random id minted when this data directory was first initialised: a
    /// new volume is a new incarnation, the same volume remounted is not.
    pub incarnation: String,
    /// Visits counted on this volume.
    pub count: u64,
    /// The pod that last wrote the file (for humans; `tally visits`).
    pub pod: String,
    /// When the data directory was initialised, seconds since the epoch.
    pub created_unix: u64,
}

/// How the store commits.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub durability: Durability,
    /// Sync period of [`Durability::Periodic`].
    pub sync_interval: Duration,
    /// Longest a visit waits for its commit; a commit running longer fails
    /// readiness.
    pub commit_timeout: Duration,
}

/// A read-only look at a data directory, for `tally visits`.
pub fn inspect(data_dir: &Path) -> Result<Option<StoredState>, StoreError> {
    let path = data_dir.join(STATE_FILE);
    Ok(load(&RealDisk, &path)?.map(|decoded| decoded.state().clone()))
}

fn load(disk: &dyn Disk, path: &Path) -> Result<Option<Decoded>, StoreError> {
    let bytes = disk.read(path).map_err(|source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    bytes
        .map(|bytes| {
            format::decode(&bytes).map_err(|source| StoreError::Corrupt {
                path: path.to_path_buf(),
                source,
            })
        })
        .transpose()
}

/// A visit waiting for its commit.
struct Waiter {
    reply: oneshot::Sender<Result<u64, String>>,
    /// When it was queued (`tally_store_oldest_pending_seconds`).
    queued: Instant,
}

enum Request {
    Visit(Waiter),
    /// Another writer on the volume ran out of space: is it full?
    CheckSpace,
    Close(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Shared {
    /// Fixed for the life of the data directory.
    incarnation: String,
    /// The acknowledged count: only ever raised after a successful commit.
    count: AtomicU64,
    /// Why the last write failed, while it keeps failing.
    unhealthy: Mutex<Option<String>>,
    /// Set when the file's commit sequence number is the last one: no
    /// commit can follow (only a forged or damaged file gets there).
    exhausted: Option<String>,
    /// Origin of the two clocks below.
    epoch: Instant,
    /// When the commit in progress began (µs after `epoch`, plus one); 0
    /// when none runs.
    commit_started: AtomicU64,
    /// When the oldest visit in the commit in progress was queued (same
    /// encoding).
    oldest_pending: AtomicU64,
    /// A commit running longer than this is stuck.
    commit_timeout: Duration,
    /// The counter file, for messages.
    path: PathBuf,
    /// Its directory: the volume whose free space is checked.
    dir: PathBuf,
    metrics: Arc<Metrics>,
    /// The data directory's lock, released when the last handle goes.
    _lock: Option<DirLock>,
}

impl Shared {
    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }

    /// How long ago `stamp` was, `None` for 0.
    fn age(&self, stamp: u64) -> Option<Duration> {
        (stamp != 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_micros(stamp - 1))
        })
    }

    /// `Some(reason)` while a commit has run past `commit_timeout`.
    fn stuck(&self) -> Option<String> {
        let running = self.age(self.commit_started.load(Ordering::Acquire))?;
        (running > self.commit_timeout).then(|| {
            format!(
                "a commit to {} has been stuck for {} ms (hung disk?)",
                self.path.display(),
                running.as_millis()
            )
        })
    }
}

/// Handle to the counter; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

impl Store {
    /// Locks `data_dir`, opens (or initialises, or migrates) the counter in
    /// it and starts the committer thread.
    pub fn open(
        data_dir: &Path,
        pod: &str,
        options: Options,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let lock = DirLock::acquire(data_dir, pod)?;
        let path = data_dir.join(STATE_FILE);
        refuse_dangling(&path)?;
        if !path.exists() {
            refuse_lost(data_dir, &lock)?;
        }
        Store::open_on(
            Arc::new(RealDisk),
            data_dir,
            pod,
            options,
            metrics,
            Some(lock),
        )
    }

    /// [`open`](Self::open) on any [`Disk`] (the power-cut model in tests).
    fn open_on(
        disk: Arc<dyn Disk>,
        data_dir: &Path,
        pod: &str,
        options: Options,
        metrics: Arc<Metrics>,
        lock: Option<DirLock>,
    ) -> Result<Store, StoreError> {
        let path = data_dir.join(STATE_FILE);
        let found = load(&*disk, &path)?;
        let mut state = match &found {
            Some(decoded) => decoded.state().clone(),
            None => StoredState {
                incarnation: new_incarnation(),
                count: 0,
                pod: pod.to_string(),
                created_unix: unix_now(),
            },
        };
        state.pod = pod.to_string();
        let mut writer = SlotWriter::new(&state).map_err(|reason| StoreError::Identity {
            path: path.clone(),
            reason,
        })?;
        let seq = match found {
            Some(Decoded::V2 {
                seq, other_invalid, ..
            }) => {
                if let Some(why) = other_invalid {
                    tracing::warn!(file = %path.display(), %why, count = state.count,
                        "one slot is invalid (a write torn by a crash?); the other holds the last commit");
                }
                seq
            }
            old => {
                // A new file, or a v1 file rewritten as v2: either way one
                // atomic replacement, so a crash leaves the old file or the
                // new one.
                file::replace(&*disk, &path, &writer.image(1, state.count)).map_err(|source| {
                    StoreError::Init {
                        path: path.clone(),
                        source,
                    }
                })?;
                if old.is_some() {
                    tracing::info!(file = %path.display(), count = state.count, incarnation = %state.incarnation,
                        "migrated the counter file from format v1 to v2 in place");
                } else {
                    tracing::info!(data_dir = %data_dir.display(), incarnation = %state.incarnation,
                        "initialised a new data directory");
                }
                1
            }
        };
        if let Some(lock) = &lock {
            lock.serving(&state.incarnation)?;
        }
        metrics.visits.inc_by(state.count);
        metrics.store_healthy.set(1);
        let shared = Arc::new(Shared {
            incarnation: state.incarnation.clone(),
            count: AtomicU64::new(state.count),
            unhealthy: Mutex::new(None),
            exhausted: (seq == u64::MAX).then(|| last_seq(&path)),
            epoch: Instant::now(),
            commit_started: AtomicU64::new(0),
            oldest_pending: AtomicU64::new(0),
            commit_timeout: options.commit_timeout,
            path: path.clone(),
            dir: data_dir.to_path_buf(),
            metrics: metrics.clone(),
            _lock: lock,
        });
        let (requests, queue) = mpsc::channel();
        let committer = Committer {
            disk,
            writer,
            seq,
            count: state.count,
            published: state.count,
            policy: Policy::new(options.durability, options.sync_interval),
            retry_at: None,
            space_check_at: Instant::now() + RETRY_EVERY,
            shared: shared.clone(),
            metrics,
        };
        std::thread::Builder::new()
            .name("tally-committer".into())
            .spawn(move || committer.run(queue))
            .map_err(|source| StoreError::Init { path, source })?;
        Ok(Store { shared, requests })
    }

    /// Counts one visit; returns its number once it is stored. Gives up
    /// (and the visit is then never counted) after `commit_timeout`.
    pub async fn visit(&self) -> Result<u64, StoreError> {
        if let Some(reason) = self.shared.stuck() {
            return Err(StoreError::Stalled(reason));
        }
        let (reply, answer) = oneshot::channel();
        let depth = &self.shared.metrics.store_queue_depth;
        depth.inc();
        let waiter = Waiter {
            reply,
            queued: Instant::now(),
        };
        if self.requests.send(Request::Visit(waiter)).is_err() {
            depth.dec();
            return Err(StoreError::Closed);
        }
        match tokio::time::timeout(self.shared.commit_timeout, answer).await {
            Ok(Ok(result)) => {
                let n = result.map_err(StoreError::Unavailable)?;
                // The committer answers its waiters before it publishes the
                // batch; publishing our own number here means no read (this
                // pod's /visits/local, a sibling's fetch) that starts after
                // this visit is acknowledged can miss it. Numbers go only to
                // visits that stay counted, so this never shows one that is
                // later withdrawn.
                self.shared.count.fetch_max(n, Ordering::AcqRel);
                Ok(n)
            }
            Ok(Err(_)) => Err(StoreError::Closed),
            // Dropping `answer` withdraws the visit (see `Committer::commit_batch`).
            Err(_) => Err(StoreError::Stalled(format!(
                "no commit within {} ms (hung disk?)",
                self.shared.commit_timeout.as_millis()
            ))),
        }
    }

    /// Asks the committer whether the volume is full, after another writer
    /// on it (`peers.state`) failed with `ENOSPC`: if it is, the store turns
    /// unhealthy (503, readiness failing) until space is freed, as when its
    /// own commit finds the volume full.
    pub fn check_space(&self) {
        let _ = self.requests.send(Request::CheckSpace);
    }

    /// The incarnation id of this data directory.
    pub fn incarnation(&self) -> &str {
        &self.shared.incarnation
    }

    /// The acknowledged count.
    pub fn count(&self) -> u64 {
        self.shared.count.load(Ordering::Acquire)
    }

    /// `Err(reason)` while writes fail, a commit is stuck, or the count
    /// cannot grow.
    pub fn health(&self) -> Result<(), String> {
        if let Some(reason) = self.shared.stuck() {
            return Err(reason);
        }
        if let Some(reason) = &self.shared.exhausted {
            return Err(reason.clone());
        }
        if self.count() == u64::MAX {
            return Err(format!(
                "{} holds the largest count there is ({}): no visit can be counted on it; \
                 restore it from a backup, or start a new incarnation (`tally new-incarnation`)",
                self.shared.path.display(),
                u64::MAX
            ));
        }
        match &*self.shared.unhealthy.lock().expect("poisoned") {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    /// Brings the gauges that depend on the clock up to date (before a
    /// scrape): `tally_store_oldest_pending_seconds`, `tally_store_healthy`.
    pub fn update_gauges(&self) {
        let shared = &self.shared;
        let oldest = shared.age(shared.oldest_pending.load(Ordering::Acquire));
        let metrics = &shared.metrics;
        metrics
            .store_oldest_pending_seconds
            .set(oldest.unwrap_or_default().as_secs_f64());
        metrics.store_healthy.set(i64::from(self.health().is_ok()));
    }

    /// Commits what is queued, syncs (`periodic`), and stops the committer.
    /// Visits sent afterwards fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.requests.send(Request::Close(done)).is_ok() {
            let _ = finished.await;
        }
    }
}

/// Starts a new incarnation on this data directory (count 0), for a volume
/// restored from a backup: the siblings know a higher count for the old
/// incarnation, so counting on under it would hide the next visits behind
/// that count. Call it before [`Store::open`]; it takes the directory's
/// lock while it writes. Returns the new state.
pub fn fork(data_dir: &Path, pod: &str) -> Result<StoredState, StoreError> {
    let _lock = DirLock::acquire(data_dir, pod)?;
    let path = data_dir.join(STATE_FILE);
    let state = StoredState {
        incarnation: new_incarnation(),
        count: 0,
        pod: pod.to_string(),
        created_unix: unix_now(),
    };
    let mut writer = SlotWriter::new(&state).map_err(|reason| StoreError::Identity {
        path: path.clone(),
        reason,
    })?;
    file::replace(&RealDisk, &path, &writer.image(1, 0))
        .map_err(|source| StoreError::Init { path, source })?;
    Ok(state)
}

/// `tally new-incarnation`: starts a new incarnation (count 0) on a data
/// directory that lost its `visits.state` ([`StoreError::Lost`]), as the
/// operator's explicit choice. Refuses a directory whose counter is there.
pub fn start_new_incarnation(data_dir: &Path, pod: &str) -> Result<StoredState, StoreError> {
    let path = data_dir.join(STATE_FILE);
    refuse_dangling(&path)?;
    if let Some(found) = inspect(data_dir)? {
        return Err(StoreError::Exists {
            path,
            incarnation: found.incarnation,
            count: found.count,
        });
    }
    fork(data_dir, pod)
}

/// A `visits.state` that is a link to nothing is an error, not an absent
/// file: initialising would replace the link and hide where the counter
/// went.
fn refuse_dangling(path: &Path) -> Result<(), StoreError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() && !path.exists() {
        return Err(StoreError::Dangling {
            path: path.to_path_buf(),
            target: std::fs::read_link(path).unwrap_or_default(),
        });
    }
    Ok(())
}

/// A directory without `visits.state` that shows an earlier life (the
/// peer view, or a lock line saying a counter was served) lost its counter:
/// starting it from 0 would lower the count siblings and clients saw.
fn refuse_lost(data_dir: &Path, lock: &DirLock) -> Result<(), StoreError> {
    let mut evidence: Vec<String> = [PEERS_FILE, "peers.state.tmp"]
        .into_iter()
        .filter(|name| std::fs::symlink_metadata(data_dir.join(name)).is_ok())
        .map(|name| format!("{name} is there"))
        .collect();
    if let Some(incarnation) = lock.previous_served() {
        evidence.push(format!(
            "{} says incarnation {incarnation} was served",
            lock::LOCK_FILE
        ));
    }
    if evidence.is_empty() {
        return Ok(());
    }
    Err(StoreError::Lost {
        path: data_dir.join(STATE_FILE),
        dir: data_dir.to_path_buf(),
        evidence: evidence.join(", "),
    })
}

fn new_incarnation() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a file whose commit sequence number is the last cannot commit.
fn last_seq(path: &Path) -> String {
    format!(
        "{} holds the last commit sequence number and cannot take another commit: \
         restore it from a backup, or start a new incarnation (`tally new-incarnation`)",
        path.display()
    )
}

/// Why a commit did not happen.
enum Failure {
    /// No free block on the data volume (`statvfs`, or `ENOSPC`).
    Full,
    Io(std::io::Error),
}

struct Committer {
    /// Where `visits.state` is. The file is opened for each commit, not
    /// held open: an open-for-write file would keep the volume from being
    /// remounted read-only.
    disk: Arc<dyn Disk>,
    writer: SlotWriter,
    /// The last commit written successfully.
    seq: u64,
    /// The count tally stands behind: every acknowledged visit is in it.
    count: u64,
    /// The count last published to `Shared::count` and the visits metric.
    published: u64,
    policy: Policy,
    /// While unhealthy: when to try again.
    retry_at: Option<Instant>,
    /// When to look at the volume's free space next, while idle.
    space_check_at: Instant,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

impl Committer {
    fn run(mut self, queue: mpsc::Receiver<Request>) {
        let mut batch = Vec::new();
        loop {
            let deadline = [self.policy.next_deadline(), self.retry_at]
                .into_iter()
                .flatten()
                .fold(self.space_check_at, Instant::min);
            let first = queue.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            let mut close = None;
            match first {
                Ok(first) => {
                    for request in std::iter::once(first).chain(queue.try_iter()) {
                        match request {
                            Request::Visit(waiter) => batch.push(waiter),
                            Request::CheckSpace => self.check_space(Instant::now()),
                            Request::Close(done) => {
                                close = Some(done);
                                break;
                            }
                        }
                    }
                    self.commit_batch(&mut batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // After every batch, not only when the queue is idle: under
            // constant load the queue never is.
            let now = Instant::now();
            if self.retry_at.is_some_and(|at| at <= now) || self.policy.sync_due(now) {
                // The outcome is recorded in `unhealthy`; nobody waits on it.
                let _ = self.commit(self.count, !matches!(self.policy, Policy::None));
            }
            if self.space_check_at <= now {
                self.check_space(now);
            }
            if let Some(done) = close {
                if self.policy.next_deadline().is_some() {
                    let _ = self.commit(self.count, true);
                }
                // Let go of `shared` (which holds the directory's lock)
                // before saying so: once the last handle is dropped too,
                // the directory can be opened again.
                drop(self);
                let _ = done.send(());
                return;
            }
        }
    }

    /// Commits the visits of `batch` (emptying it) and answers them.
    fn commit_batch(&mut self, batch: &mut Vec<Waiter>) {
        let taken = batch.len();
        // A visit whose caller already gave up is never counted.
        batch.retain(|waiter| !waiter.reply.is_closed());
        if let Some(oldest) = batch.iter().map(|w| w.queued).min() {
            let stamp = self.shared.stamp(oldest);
            self.shared.oldest_pending.store(stamp, Ordering::Release);
            let before = self.count;
            let sync = self.policy.syncs_each_commit();
            let committed = match before.checked_add(batch.len() as u64) {
                Some(count) => self.commit(count, sync),
                None => Err(format!(
                    "{} cannot count past {}",
                    self.shared.path.display(),
                    u64::MAX
                )),
            };
            match committed {
                Ok(()) => {
                    let mut delivered = 0;
                    for waiter in batch.drain(..) {
                        if waiter.reply.send(Ok(before + delivered + 1)).is_ok() {
                            delivered += 1;
                        }
                    }
                    if before + delivered < self.count {
                        // Callers gave up while the commit ran (a slow
                        // disk): take their visits back out, durably.
                        tracing::warn!(
                            withdrawn = self.count - before - delivered,
                            "visits whose requests timed out during a slow commit are not counted"
                        );
                        let _ = self.commit(before + delivered, sync);
                        // Even if that failed: the retry writes this count.
                        self.count = before + delivered;
                    }
                    self.publish();
                }
                Err(reason) => {
                    for waiter in batch.drain(..) {
                        let _ = waiter.reply.send(Err(reason.clone()));
                    }
                }
            }
            self.shared.oldest_pending.store(0, Ordering::Release);
        }
        batch.clear();
        self.metrics.store_queue_depth.dec_by(taken as i64);
    }

    fn publish(&mut self) {
        if self.count > self.published {
            self.metrics.visits.inc_by(self.count - self.published);
        }
        self.published = self.count;
        self.shared.count.store(self.count, Ordering::Release);
    }

    /// Writes `count` as the next commit, synced when `sync`; on success it
    /// becomes the count tally stands behind.
    fn commit(&mut self, count: u64, sync: bool) -> Result<(), String> {
        // A file whose slots carry the last sequence number (only a forged
        // or damaged one can) must not wrap to 0: the older slot would win on
        // the next start and the count would go back.
        let Some(seq) = self.seq.checked_add(1) else {
            return Err(last_seq(&self.shared.path));
        };
        if self.full() {
            return Err(self.failed(Failure::Full, sync, Instant::now()));
        }
        let started = Instant::now();
        let stamp = self.shared.stamp(started);
        self.shared.commit_started.store(stamp, Ordering::Release);
        let result = self.disk.open(&self.shared.path).and_then(|mut file| {
            file.write_at(format::offset(seq), self.writer.encode(seq, count))?;
            if sync {
                self.metrics.store_fdatasyncs.inc();
                file.sync_data()?;
            }
            Ok(())
        });
        self.shared.commit_started.store(0, Ordering::Release);
        let now = Instant::now();
        self.metrics
            .commit_duration
            .observe(now.duration_since(started).as_secs_f64());
        let error = match result {
            Ok(()) => {
                self.metrics
                    .commit_batch
                    .observe(count.saturating_sub(self.count) as f64);
                // The other slot keeps commit `seq - 1` until this one is
                // known written: only now may the next commit overwrite it.
                self.seq = seq;
                self.count = count;
                self.retry_at = None;
                if sync {
                    self.policy.synced();
                } else {
                    self.policy.written(now);
                }
                self.metrics.store_volume_full.set(0);
                if self
                    .shared
                    .unhealthy
                    .lock()
                    .expect("poisoned")
                    .take()
                    .is_some()
                {
                    tracing::info!(file = %self.shared.path.display(), "store writable again");
                }
                return Ok(());
            }
            Err(error) => error,
        };
        let failure = match error.kind() {
            std::io::ErrorKind::StorageFull => Failure::Full,
            _ => Failure::Io(error),
        };
        Err(self.failed(failure, sync, now))
    }

    /// Turns the store unhealthy if the volume is full, so readiness fails
    /// within a second of it filling up even when no visit comes (a retry
    /// under way checks it already); schedules the next check.
    /// Also opens the counter file for writing, so a volume remounted
    /// read-only or a file made unwritable fails readiness before a visit
    /// finds out (design.md §6).
    fn check_space(&mut self, now: Instant) {
        self.space_check_at = now + RETRY_EVERY;
        if self.retry_at.is_some() {
            return;
        }
        if self.full() {
            self.failed(Failure::Full, false, now);
        } else if let Err(error) = self.disk.open(&self.shared.path) {
            self.failed(Failure::Io(error), false, now);
        }
    }

    /// Whether the data volume has no free block left. A volume whose
    /// space cannot be read is not called full: the write that follows
    /// reports what is wrong with it.
    fn full(&self) -> bool {
        self.disk.is_full(&self.shared.dir).unwrap_or(false)
    }

    /// Records a failed commit: unhealthy until a commit succeeds, retried
    /// every second. Returns why, for the visits and `/readyz`.
    fn failed(&mut self, failure: Failure, sync: bool, now: Instant) -> String {
        self.metrics.commit_failures.inc();
        let full = matches!(failure, Failure::Full);
        let reason = match failure {
            Failure::Full => format!(
                "the volume holding {} is full: free space on it or grow the volume; \
                 visits are counted again within a second of space being freed",
                self.shared.dir.display()
            ),
            Failure::Io(error) => format!("cannot write {}: {error}", self.shared.path.display()),
        };
        self.metrics.store_volume_full.set(i64::from(full));
        let retry = now + RETRY_EVERY;
        self.retry_at = Some(retry);
        if sync {
            // Still dirty: a failed sync is never taken for a clean one.
            self.policy.sync_failed(retry);
        }
        let mut unhealthy = self.shared.unhealthy.lock().expect("poisoned");
        if unhealthy.as_deref() != Some(reason.as_str()) {
            if full {
                tracing::error!(%reason, "data volume full; answering 503 until space is freed");
            } else {
                tracing::error!(%reason, "store write failed; answering 503 until it succeeds");
            }
        }
        *unhealthy = Some(reason.clone());
        reason
    }
}

#[cfg(test)]
mod tests;
