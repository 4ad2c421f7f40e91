//! What a pod knows of the others, on its own volume: `peers.state` (same
//! file format and guarantees as the visit counter), so the total survives
//! a full restart of the cluster.
//!
//! One writer: every write goes through [`PeersFile::write`], which holds
//! the file's lock from taking the snapshot to the rename, so two writes
//! never interleave on the temporary file, and a later write always holds
//! a snapshot at least as new as an earlier one.
//!
//! Durable before it is said (design.md §6): every change to what is known
//! takes a generation number ([`PeersFile::dirty`]); a write records the
//! generation its snapshot covers. Whoever must not answer before a change
//! is on disk (a hand-over's `204`, a complete total) waits for its
//! generation ([`PeersFile::synced_to`]); concurrent waiters share one
//! write, as visits share one `fdatasync`.

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use serde::{Deserialize, Serialize};

use crate::merge::{Counter, Key, Known};
use crate::peers::wire::Retired;
use crate::store::disk::{Disk, RealDisk};
use crate::store::file::{self, AtomicFile, FileError};

/// What this pod knows of the others, in its data directory.
pub use crate::store::PEERS_FILE;

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
    pub entries: Vec<StoredEntry>,
    /// Tombstones (`tally forget`); absent in files of older releases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<Retired>,
}

/// One counter as persisted.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredEntry {
    pub pod: String,
    pub incarnation: String,
    pub count: u64,
    #[serde(default)]
    pub seen_unix: u64,
    /// Highest count the pod reported itself; absent in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_hand: Option<u64>,
}

impl StoredPeers {
    fn of(counter: &Counter) -> StoredPeers {
        StoredPeers {
            entries: counter
                .known()
                .map(|(k, v)| StoredEntry {
                    pod: k.pod.clone(),
                    incarnation: k.incarnation.clone(),
                    count: v.count,
                    seen_unix: v.seen_unix,
                    first_hand: v.first_hand,
                })
                .collect(),
            retired: counter.retired().collect(),
        }
    }

    /// The counter these entries describe.
    pub fn counter(self) -> Counter {
        Counter::restore(
            self.entries.into_iter().map(|e| {
                (
                    Key {
                        pod: e.pod,
                        incarnation: e.incarnation,
                    },
                    Known {
                        count: e.count,
                        seen_unix: e.seen_unix,
                        first_hand: e.first_hand,
                    },
                )
            }),
            self.retired,
        )
    }
}

/// Reads `peers.state` from a data directory (empty if absent).
pub fn load_peers(data_dir: &Path) -> Result<StoredPeers, PeersError> {
    load_peers_on(&RealDisk, data_dir)
}

/// [`load_peers`] from `disk` (the power-cut model in tests).
pub fn load_peers_on(disk: &dyn Disk, data_dir: &Path) -> Result<StoredPeers, PeersError> {
    let path = data_dir.join(PEERS_FILE);
    match file::read_on(disk, &path)? {
        None => Ok(StoredPeers {
            entries: Vec::new(),
            retired: Vec::new(),
        }),
        Some(body) => serde_json::from_slice(&body).map_err(|e| PeersError::BadState {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The only writer of `peers.state`.
pub struct PeersFile {
    file: Mutex<AtomicFile>,
    /// Generation of the newest change to what is known.
    wanted: AtomicU64,
    /// Generation of the newest snapshot on disk.
    synced: watch::Sender<u64>,
    /// Why the last write failed, while writes fail.
    failing: Mutex<Option<String>>,
}

impl PeersFile {
    pub fn new(data_dir: &Path) -> PeersFile {
        PeersFile::on(Arc::new(RealDisk), data_dir)
    }

    /// `peers.state` in `data_dir` on `disk` (the power-cut model in tests).
    pub fn on(disk: Arc<dyn Disk>, data_dir: &Path) -> PeersFile {
        PeersFile {
            file: Mutex::new(AtomicFile::on(disk, data_dir.join(PEERS_FILE))),
            wanted: AtomicU64::new(0),
            synced: watch::Sender::new(0),
            failing: Mutex::new(None),
        }
    }

    /// Marks what is known as changed (after the change): returns the
    /// generation a write must cover for the change to be on disk.
    pub fn dirty(&self) -> u64 {
        self.wanted.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The generation that covers every change made so far.
    pub fn wanted(&self) -> u64 {
        self.wanted.load(Ordering::Acquire)
    }

    /// Whether every change made so far is on disk.
    pub fn clean(&self) -> bool {
        *self.synced.borrow() >= self.wanted()
    }

    /// Writes a snapshot of `counter` durably; blocking (call it from
    /// `spawn_blocking`). The snapshot is taken under the file's lock, and
    /// after reading the generation it covers, so it holds at least every
    /// change of that generation.
    pub fn write(&self, counter: &Mutex<Counter>) -> std::io::Result<()> {
        let file = self.file.lock().expect("poisoned");
        let generation = self.wanted();
        let stored = StoredPeers::of(&counter.lock().expect("poisoned"));
        let body = serde_json::to_vec(&stored).expect("serialises");
        match file.write(&body) {
            Ok(()) => {
                self.synced.send_if_modified(|synced| {
                    let newer = generation > *synced;
                    *synced = (*synced).max(generation);
                    newer
                });
                *self.failing.lock().expect("poisoned") = None;
                Ok(())
            }
            Err(error) => {
                *self.failing.lock().expect("poisoned") = Some(format!(
                    "cannot write {}: {error} (retried until it succeeds)",
                    file.path().display()
                ));
                Err(error)
            }
        }
    }

    /// Why what is known is not on disk, while writes fail.
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().expect("poisoned").clone()
    }

    /// Waits, at most `limit`, until a write covering `generation` is on
    /// disk. `Err` says why not.
    pub async fn synced_to(&self, generation: u64, limit: Duration) -> Result<(), String> {
        let mut synced = self.synced.subscribe();
        let waited = tokio::time::timeout(limit, synced.wait_for(|s| *s >= generation)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.failing().unwrap_or_else(|| {
                format!(
                    "{PEERS_FILE} was not written within {} ms",
                    limit.as_millis()
                )
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Entry;

    #[test]
    fn round_trips_and_reads_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut counter = Counter::from_entries([Entry {
            pod: "t-1".into(),
            incarnation: "b".into(),
            count: 4,
            seen_unix: 9,
        }]);
        counter.retire(Retired {
            pod: "t-2".into(),
            incarnation: "c".into(),
            count: 3,
        });
        let file = PeersFile::new(dir.path());
        file.write(&Mutex::new(counter.clone())).unwrap();
        assert_eq!(load_peers(dir.path()).unwrap().counter(), counter);
        // The format of the previous release: entries only.
        let old = br#"{"entries":[{"pod":"t-1","incarnation":"b","count":4,"seen_unix":9}]}"#;
        std::fs::write(dir.path().join(PEERS_FILE), file::encode(old)).unwrap();
        let loaded = load_peers(dir.path()).unwrap().counter();
        assert_eq!(loaded.total_checked(), Some(4));
    }

    /// A history of hand-overs on a volume that fills and frees up: each
    /// is answered `204` once its write succeeded (or, the planted bug,
    /// at once). Returns what a power cut at every boundary, with every
    /// kind of cut, loses of what was answered: nothing, when done right.
    fn hand_overs_lost_at_power_cuts(ack_before_sync: bool) -> (usize, Vec<String>) {
        use crate::store::powercut::{Cut, Fs, ModelDisk, Rng, replay};
        let dir = Path::new("/data");
        let initial = Fs::default();
        let disk = ModelDisk::new(initial.clone());
        let file = PeersFile::on(Arc::new(disk.clone()), dir);
        let counter = Mutex::new(Counter::default());
        let mut rng = Rng::new(7);
        // (op index once answered, pod, count)
        let mut acked: Vec<(usize, String, u64)> = Vec::new();
        let mut pending: Vec<(String, u64)> = Vec::new();
        for i in 0..40u64 {
            if rng.below(4) == 0 {
                disk.fill(rng.below(2) == 0);
            }
            let pod = format!("t-{}", i % 5);
            counter.lock().unwrap().merge(&[Entry {
                pod: pod.clone(),
                incarnation: "x".into(),
                count: i + 1,
                seen_unix: 0,
            }]);
            file.dirty();
            pending.push((pod, i + 1));
            let written = file.write(&counter).is_ok();
            if written || ack_before_sync {
                for (pod, count) in pending.drain(..) {
                    acked.push((disk.ops(), pod, count));
                }
            }
        }
        let log = disk.log();
        let (mut cuts, mut lost) = (0, Vec::new());
        for k in 0..=log.len() {
            let fs = replay(&initial, &log, k);
            for cut in Cut::ALL {
                cuts += 1;
                let after = ModelDisk::new(fs.cut(cut));
                let recovered = match load_peers_on(&after, dir) {
                    Ok(stored) => stored.counter(),
                    Err(e) => {
                        lost.push(format!("op {k} {cut:?}: unreadable: {e}"));
                        continue;
                    }
                };
                for (at, pod, count) in acked.iter().filter(|(at, ..)| *at <= k) {
                    let key = Key {
                        pod: pod.clone(),
                        incarnation: "x".into(),
                    };
                    let have = recovered.get(&key).map_or(0, |known| known.count);
                    if have < *count {
                        lost.push(format!(
                            "op {k} {cut:?}: {pod} answered 204 at op {at} with {count}, recovered {have}"
                        ));
                    }
                }
            }
        }
        (cuts, lost)
    }

    #[test]
    fn a_hand_over_answered_is_on_disk_at_every_power_cut_full_volume_or_not() {
        let (cuts, lost) = hand_overs_lost_at_power_cuts(false);
        assert!(cuts > 300, "explored only {cuts} cuts");
        assert!(
            lost.is_empty(),
            "{} of {cuts} cuts lost: {lost:#?}",
            lost.len()
        );
    }

    #[test]
    fn the_power_cut_check_catches_a_hand_over_answered_before_it_is_synced() {
        let (cuts, lost) = hand_overs_lost_at_power_cuts(true);
        assert!(!lost.is_empty(), "planted bug not caught in {cuts} cuts");
    }

    #[tokio::test]
    async fn waiters_see_their_generation_synced_and_a_failing_write_says_why() {
        use crate::store::powercut::{Fs, ModelDisk};
        let disk = ModelDisk::new(Fs::default());
        let file = PeersFile::on(Arc::new(disk.clone()), Path::new("/data"));
        let counter = Mutex::new(Counter::default());
        let limit = Duration::from_millis(50);
        assert!(file.clean());
        let generation = file.dirty();
        assert!(!file.clean());
        disk.fill(true);
        assert!(file.write(&counter).is_err());
        let why = file.synced_to(generation, limit).await.unwrap_err();
        assert!(
            why.contains("peers.state") && why.contains("retried"),
            "{why}"
        );
        disk.fill(false);
        file.write(&counter).unwrap();
        assert!(file.clean() && file.failing().is_none());
        file.synced_to(generation, limit).await.unwrap();
    }

    #[test]
    fn concurrent_writers_never_tear_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::sync::Arc::new(PeersFile::new(dir.path()));
        let counter = std::sync::Arc::new(Mutex::new(Counter::default()));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (file, counter) = (file.clone(), counter.clone());
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        counter.lock().unwrap().merge(&[Entry {
                            pod: format!("t-{w}"),
                            incarnation: "x".repeat(60),
                            count: i,
                            seen_unix: 0,
                        }]);
                        file.write(&counter).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let loaded = load_peers(dir.path()).unwrap().counter();
        assert_eq!(loaded, *counter.lock().unwrap(), "the last write holds all");
    }
}
