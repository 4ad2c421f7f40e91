//! What a pod knows of the others, on its own volume: `peers.state` (same
//! file format and guarantees as the visit counter), so the total survives
//! a full restart of the cluster.
//!
//! One writer: every write goes through [`PeersFile::write`], which holds
//! the file's lock from taking the snapshot to the rename, so two writes
//! never interleave on the temporary file, and a later write always holds
//! a snapshot at least as new as an earlier one.

use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::merge::{Counter, Key, Known};
use crate::peers::wire::Retired;
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
    let path = data_dir.join(PEERS_FILE);
    match file::read(&path)? {
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
}

impl PeersFile {
    pub fn new(data_dir: &Path) -> PeersFile {
        PeersFile {
            file: Mutex::new(AtomicFile::new(data_dir.join(PEERS_FILE))),
        }
    }

    /// Writes a snapshot of `counter` durably; blocking (call it from
    /// `spawn_blocking`). The snapshot is taken under the file's lock.
    pub fn write(&self, counter: &Mutex<Counter>) -> std::io::Result<()> {
        let file = self.file.lock().expect("poisoned");
        let stored = StoredPeers::of(&counter.lock().expect("poisoned"));
        let body = serde_json::to_vec(&stored).expect("serialises");
        file.write(&body)
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
