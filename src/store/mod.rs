//! This pod's durable visit counter.
//!
//! One committer thread owns the count. A visit sends a request to it and
//! waits; the committer takes every request queued at that moment as one
//! batch, writes the new count with [`AtomicFile`] (one `fdatasync` for the
//! whole batch: group commit), and only then answers each request with its
//! own visit number. A failed write (full disk, read-only volume) answers the
//! batch with an error, leaves the durable count where it was, marks the
//! store unhealthy and retries every second until a write succeeds again, so
//! readiness recovers on its own once space is back.
//!
//! The state file is `visits.state` in the data directory (format in
//! [`file`]); its body is [`StoredState`] as JSON.

pub mod file;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::Durability;
use crate::metrics::Metrics;
use file::{AtomicFile, FileError};

/// Name of the counter file inside the data directory.
pub const STATE_FILE: &str = "visits.state";
/// How often an unhealthy store retries its last write.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Errors opening or using the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path} holds no valid counter state: {reason}")]
    BadState { path: PathBuf, reason: String },
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
    #[error("visit not recorded: {0}")]
    Unavailable(String),
    #[error("the store is shutting down")]
    Closed,
}

/// The body of `visits.state`.
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

/// A read-only look at a data directory, for `tally visits`.
pub fn inspect(data_dir: &Path) -> Result<Option<StoredState>, StoreError> {
    let path = data_dir.join(STATE_FILE);
    file::read(&path)?
        .map(|body| parse_state(&path, &body))
        .transpose()
}

fn parse_state(path: &Path, body: &[u8]) -> Result<StoredState, StoreError> {
    serde_json::from_slice(body).map_err(|e| StoreError::BadState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

enum Request {
    Visit(oneshot::Sender<Result<u64, String>>),
    Close(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Shared {
    /// Fixed for the life of the data directory.
    incarnation: String,
    /// The durable count: only ever set after a successful commit.
    count: AtomicU64,
    /// Why the last write failed, while it keeps failing.
    unhealthy: Mutex<Option<String>>,
}

/// Handle to the counter; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

impl Store {
    /// Opens (or initialises) the counter in `data_dir` and starts the
    /// committer thread.
    pub fn open(
        data_dir: &Path,
        pod: &str,
        durability: Durability,
        sync_interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(STATE_FILE);
        let file = AtomicFile::new(path.clone()).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let state = match file::read(&path)? {
            Some(body) => parse_state(&path, &body)?,
            None => {
                let state = StoredState {
                    incarnation: new_incarnation(),
                    count: 0,
                    pod: pod.to_string(),
                    created_unix: unix_now(),
                };
                write_state(&file, &state, true)
                    .map_err(|source| StoreError::Init { path, source })?;
                tracing::info!(data_dir = %data_dir.display(), incarnation = %state.incarnation, "initialised a new data directory");
                state
            }
        };
        metrics.visits.inc_by(state.count);
        let shared = Arc::new(Shared {
            incarnation: state.incarnation.clone(),
            count: AtomicU64::new(state.count),
            unhealthy: Mutex::new(None),
        });
        let (requests, queue) = mpsc::channel();
        let committer = Committer {
            file,
            state: StoredState {
                pod: pod.to_string(),
                ..state
            },
            shared: shared.clone(),
            metrics,
            sync: durability == Durability::GroupCommit,
            periodic: (durability == Durability::Periodic).then_some(sync_interval),
        };
        std::thread::Builder::new()
            .name("tally-committer".into())
            .spawn(move || committer.run(queue))
            .map_err(|source| StoreError::Init {
                path: data_dir.to_path_buf(),
                source,
            })?;
        Ok(Store { shared, requests })
    }

    /// Counts one visit; returns its number once it is stored.
    pub async fn visit(&self) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Visit(reply))
            .map_err(|_| StoreError::Closed)?;
        answer
            .await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Unavailable)
    }

    /// The incarnation id of this data directory.
    pub fn incarnation(&self) -> &str {
        &self.shared.incarnation
    }

    /// The durable count.
    pub fn count(&self) -> u64 {
        self.shared.count.load(Ordering::Acquire)
    }

    /// `Err(reason)` while writes fail.
    pub fn health(&self) -> Result<(), String> {
        match &*self.shared.unhealthy.lock().expect("poisoned") {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    /// Commits what is queued, syncs, and stops the committer. Visits sent
    /// afterwards fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.requests.send(Request::Close(done)).is_ok() {
            let _ = finished.await;
        }
    }
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

fn write_state(file: &AtomicFile, state: &StoredState, sync: bool) -> std::io::Result<()> {
    let body = serde_json::to_vec(state).expect("state serialises");
    file.write(&body, sync)
}

struct Committer {
    file: AtomicFile,
    /// What is on disk (or about to be): `count` is the durable count.
    state: StoredState,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    /// fdatasync every commit (group commit).
    sync: bool,
    /// Sync every this often instead (periodic durability).
    periodic: Option<Duration>,
}

impl Committer {
    fn run(mut self, queue: mpsc::Receiver<Request>) {
        let mut batch = Vec::new();
        let mut last_sync = Instant::now();
        let mut dirty = false;
        loop {
            let wait = match (self.is_unhealthy(), self.periodic) {
                (true, _) => RETRY_EVERY,
                (false, Some(every)) if dirty => every.saturating_sub(last_sync.elapsed()),
                _ => Duration::from_secs(3600),
            };
            let first = match queue.recv_timeout(wait) {
                Ok(request) => request,
                Err(RecvTimeoutError::Timeout) => {
                    if self.is_unhealthy() {
                        // The outcome is recorded in `unhealthy`; nobody waits on it.
                        let _ = self.commit(self.state.count);
                    } else if dirty {
                        self.sync_now();
                        dirty = false;
                        last_sync = Instant::now();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut close = None;
            for request in std::iter::once(first).chain(queue.try_iter()) {
                match request {
                    Request::Visit(reply) => batch.push(reply),
                    Request::Close(done) => {
                        close = Some(done);
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                let before = self.state.count;
                let result = self.commit(before + batch.len() as u64);
                dirty |= result.is_ok() && self.periodic.is_some();
                for (i, reply) in batch.drain(..).enumerate() {
                    let _ = reply.send(result.clone().map(|()| before + i as u64 + 1));
                }
            }
            if let Some(done) = close {
                if dirty {
                    self.sync_now();
                }
                let _ = done.send(());
                break;
            }
        }
    }

    fn is_unhealthy(&self) -> bool {
        self.shared.unhealthy.lock().expect("poisoned").is_some()
    }

    /// Writes `count`; on success it becomes the durable count.
    fn commit(&mut self, count: u64) -> Result<(), String> {
        let started = Instant::now();
        let previous = self.state.count;
        self.state.count = count;
        let result = write_state(&self.file, &self.state, self.sync);
        self.metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        let mut unhealthy = self.shared.unhealthy.lock().expect("poisoned");
        match result {
            Ok(()) => {
                self.metrics.commit_batch.observe((count - previous) as f64);
                self.metrics.visits.inc_by(count - previous);
                self.shared.count.store(count, Ordering::Release);
                if unhealthy.take().is_some() {
                    tracing::info!(file = %self.file.path().display(), "store writable again");
                }
                Ok(())
            }
            Err(error) => {
                self.state.count = previous;
                self.metrics.commit_failures.inc();
                let reason = format!("cannot write {}: {error}", self.file.path().display());
                if unhealthy.as_deref() != Some(reason.as_str()) {
                    tracing::error!(%reason, "store write failed; answering 503 until it succeeds");
                }
                *unhealthy = Some(reason.clone());
                Err(reason)
            }
        }
    }

    fn sync_now(&mut self) {
        if let Err(error) = self.file.sync() {
            tracing::error!(file = %self.file.path().display(), %error, "periodic sync failed");
            *self.shared.unhealthy.lock().expect("poisoned") = Some(format!(
                "cannot sync {}: {error}",
                self.file.path().display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        Store::open(
            dir,
            "tally-0",
            Durability::GroupCommit,
            Duration::from_secs(1),
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn concurrent_visits_get_distinct_numbers_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let incarnation = store.incarnation().to_string();
        let visits = (0..500).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.visit().await.unwrap() })
        });
        let mut numbers: Vec<u64> = futures::future::join_all(visits)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        numbers.sort();
        assert_eq!(numbers, (1..=500).collect::<Vec<_>>());
        store.close().await;
        let on_disk = inspect(dir.path()).unwrap().unwrap();
        assert_eq!(
            (on_disk.count, on_disk.incarnation),
            (500, incarnation.clone())
        );
        let reopened = open(dir.path());
        assert_eq!(reopened.count(), 500);
        assert_eq!(reopened.incarnation(), incarnation);
    }

    #[tokio::test]
    async fn new_directory_is_new_incarnation() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        assert_ne!(open(a.path()).incarnation(), open(b.path()).incarnation());
    }

    #[tokio::test]
    async fn corrupt_state_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        std::fs::write(&path, b"").unwrap();
        let err = Store::open(
            dir.path(),
            "tally-0",
            Durability::GroupCommit,
            Duration::from_secs(1),
            Arc::new(Metrics::new()),
        )
        .unwrap_err();
        assert!(err.to_string().contains(STATE_FILE), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[tokio::test]
    async fn visits_after_close_fail() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.visit().await.unwrap();
        store.close().await;
        assert!(matches!(store.visit().await, Err(StoreError::Closed)));
    }
}
