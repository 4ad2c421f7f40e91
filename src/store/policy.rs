//! When each durability mode syncs: one small policy per mode, asked after
//! every batch, so a sync that is due happens even when visits never stop
//! arriving (a timeout on an idle queue alone would starve it).

use std::time::{Duration, Instant};

use crate::config::Durability;

/// The sync policy of a [`Durability`] mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Every commit is synced before its visits are answered.
    GroupCommit,
    /// Commits are written, and synced once `due` passes.
    Periodic {
        every: Duration,
        /// Set when the first unsynced commit is written; `None` while clean.
        due: Option<Instant>,
    },
    /// Commits are written and never synced by tally.
    None,
}

impl Policy {
    pub fn new(durability: Durability, every: Duration) -> Policy {
        match durability {
            Durability::GroupCommit => Policy::GroupCommit,
            Durability::Periodic => Policy::Periodic { every, due: None },
            Durability::None => Policy::None,
        }
    }

    /// Whether each commit syncs before its visits are answered.
    pub fn syncs_each_commit(&self) -> bool {
        matches!(self, Policy::GroupCommit)
    }

    /// A commit was written at `now` without a sync.
    pub fn written(&mut self, now: Instant) {
        if let Policy::Periodic { every, due } = self {
            due.get_or_insert(now + *every);
        }
    }

    /// When the next sync is due (`None`: nothing to sync).
    pub fn next_deadline(&self) -> Option<Instant> {
        match self {
            Policy::Periodic { due, .. } => *due,
            Policy::GroupCommit | Policy::None => None,
        }
    }

    /// Whether a sync is due at `now`.
    pub fn sync_due(&self, now: Instant) -> bool {
        self.next_deadline().is_some_and(|due| due <= now)
    }

    /// Everything written is durable.
    pub fn synced(&mut self) {
        if let Policy::Periodic { due, .. } = self {
            *due = None;
        }
    }

    /// A sync failed at `now`: still dirty (a failed sync is never taken
    /// for a clean one), tried again at `retry`.
    pub fn sync_failed(&mut self, retry: Instant) {
        if let Policy::Periodic { due, .. } = self {
            *due = Some(retry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_is_due_one_interval_after_the_first_unsynced_write() {
        let t0 = Instant::now();
        let every = Duration::from_millis(100);
        let mut p = Policy::new(Durability::Periodic, every);
        assert_eq!(p.next_deadline(), None);
        p.written(t0);
        // Later writes (constant load) do not push the deadline back.
        p.written(t0 + Duration::from_millis(60));
        p.written(t0 + Duration::from_millis(99));
        assert_eq!(p.next_deadline(), Some(t0 + every));
        assert!(!p.sync_due(t0 + Duration::from_millis(99)));
        assert!(p.sync_due(t0 + every));
        p.sync_failed(t0 + Duration::from_secs(1));
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(1)));
        p.synced();
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn group_commit_and_none_have_no_deadline() {
        let now = Instant::now();
        for (durability, each) in [(Durability::GroupCommit, true), (Durability::None, false)] {
            let mut p = Policy::new(durability, Duration::from_millis(1));
            p.written(now);
            assert_eq!(p.next_deadline(), None);
            assert_eq!(p.syncs_each_commit(), each);
        }
    }
}
