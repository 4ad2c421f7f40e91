//! The hot paths: the store's commit (one slot write and one fdatasync)
//! and group commit under 64 concurrent visits; the cluster merge.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tally::config::Durability;
use tally::merge::{Counter, Entry};
use tally::metrics::Metrics;
use tally::store::{Options, Store};

fn options() -> Options {
    Options {
        durability: Durability::GroupCommit,
        sync_interval: Duration::from_secs(1),
        commit_timeout: Duration::from_secs(5),
    }
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

criterion_group!(benches, one_commit, group_commit, merge);
criterion_main!(benches);
