//! The hot paths: the store's commit (one atomic, synced file replacement)
//! and group commit under 64 concurrent visits; the cluster merge.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tally::config::Durability;
use tally::merge::{Counter, Entry};
use tally::metrics::Metrics;
use tally::store::Store;
use tally::store::file::AtomicFile;

fn atomic_write(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let file = AtomicFile::new(dir.path().join("bench.state")).unwrap();
    let body = br#"{"incarnation":"9f0c2d1e8b7a6f5e4d3c2b1a09f8e7d6","count":123456789,"pod":"tally-0","created_unix":1700000000}"#;
    let mut group = c.benchmark_group("commit");
    group.bench_function("atomic_write_fdatasync", |b| {
        b.iter(|| file.write(body, true).unwrap())
    });
    group.bench_function("atomic_write_no_sync", |b| {
        b.iter(|| file.write(body, false).unwrap())
    });
    group.finish();
}

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = runtime
        .block_on(async {
            Store::open(
                dir.path(),
                "tally-0",
                Durability::GroupCommit,
                Duration::from_secs(1),
                Arc::new(Metrics::new()),
            )
        })
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
            counter.total()
        })
    });
}

criterion_group!(benches, atomic_write, group_commit, merge);
criterion_main!(benches);
