//! The hot paths: the store's commit itself (one slot `pwrite` and one
//! `fdatasync` of the file allocated in advance, target ≤ 100 µs on this
//! disk), a visit through the committer, group commit under 64 concurrent
//! visits; the cluster merge.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tally::config::Durability;
use tally::merge::{Counter, Entry};
use tally::metrics::Metrics;
use tally::store::disk::{Disk, RealDisk};
use tally::store::format::{self, SlotWriter};
use tally::store::{Options, STATE_FILE, Store, StoredState, file};

fn options() -> Options {
    Options {
        durability: Durability::GroupCommit,
        sync_interval: Duration::from_secs(1),
        commit_timeout: Duration::from_secs(5),
    }
}

/// One commit as the committer makes it, without the hand-off: open the
/// counter file, `pwrite` the next slot, `fdatasync` (the file is in
/// `TMPDIR`: run it on the disk you mean to measure).
fn slot_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let state = StoredState {
        incarnation: "0".repeat(32),
        count: 0,
        pod: "tally-0".into(),
        created_unix: 0,
    };
    let mut writer = SlotWriter::new(&state).unwrap();
    file::replace(&RealDisk, &path, &writer.image(1, 0)).unwrap();
    let mut seq = 1;
    c.bench_function("commit/slot_pwrite_fdatasync", |b| {
        b.iter(|| {
            seq += 1;
            let mut file = RealDisk.open(&path).unwrap();
            file.write_at(format::offset(seq), writer.encode(seq, seq))
                .unwrap();
            file.sync_data().unwrap();
        })
    });
}

/// One visit alone: one slot write and one fdatasync, plus the hand-off to
/// the committer thread and back.
fn one_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = runtime
        .block_on(async { Store::open(dir.path(), "tally-0", options(), Arc::new(Metrics::new())) })
        .unwrap();
    c.bench_function("commit/one_visit_fdatasync", |b| {
        b.to_async(&runtime).iter(|| store.visit())
    });
}

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = runtime
        .block_on(async { Store::open(dir.path(), "tally-0", options(), Arc::new(Metrics::new())) })
        .unwrap();
    let mut group = c.benchmark_group("group_commit");
    for concurrency in [1usize, 64] {
        group.bench_with_input(
            BenchmarkId::new("visits", concurrency),
            &concurrency,
            |b, &n| {
                b.to_async(&runtime).iter(|| {
                    let store = store.clone();
                    async move {
                        let visits = (0..n).map(|_| {
                            let store = store.clone();
                            tokio::spawn(async move { store.visit().await.unwrap() })
                        });
                        futures::future::join_all(visits).await
                    }
                })
            },
        );
    }
    group.finish();
}

fn merge(c: &mut Criterion) {
    let entries: Vec<Entry> = (0..32)
        .map(|i| Entry {
            pod: format!("tally-{i}"),
            incarnation: format!("{i:032x}"),
            count: 1000 + i,
            seen_unix: 0,
        })
        .collect();
    let base = Counter::from_entries(entries.clone());
    c.bench_function("merge_32_pods", |b| {
        b.iter(|| {
            let mut counter = base.clone();
            counter.merge(&entries);
            counter.total_checked()
        })
    });
}

criterion_group!(benches, slot_commit, one_commit, group_commit, merge);
criterion_main!(benches);
