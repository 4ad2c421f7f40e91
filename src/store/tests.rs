//! The store's tests: the real committer over the machine's disk, and over
//! the power-cut model (crash safety, the durability modes, v1 migration,
//! a hung disk).

use super::powercut::{Cut, Fs, ModelDisk, Rng, replay};
use super::*;

const DIR: &str = "/data";
const FIXTURE_INCARNATION: &str = "56b14a094c657ade2674aaed18fa1a7e";

fn options(durability: Durability) -> Options {
    Options {
        durability,
        sync_interval: Duration::from_secs(3600),
        commit_timeout: Duration::from_secs(60),
    }
}

fn open_as(dir: &Path, pod: &str) -> Result<Store, StoreError> {
    Store::open(
        dir,
        pod,
        options(Durability::GroupCommit),
        Arc::new(Metrics::new()),
    )
}

fn open(dir: &Path) -> Store {
    open_as(dir, "tally-0").unwrap()
}

fn open_model(disk: &ModelDisk, options: Options) -> Store {
    Store::open_on(
        Arc::new(disk.clone()),
        Path::new(DIR),
        "tally-0",
        options,
        Arc::new(Metrics::new()),
        None,
    )
    .unwrap()
}

/// The v1 file written by the release before format v2 (7 visits; made by
/// running that release's `tally serve` and visiting `/` seven times).
fn v1_fixture() -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1/visits.state"),
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
    assert_eq!(
        std::fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .len(),
        format::FILE_SIZE as u64
    );
    drop(store);
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
async fn a_second_store_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let err = open_as(dir.path(), "tally-1").unwrap_err();
    assert!(matches!(err, StoreError::Lock(_)), "{err}");
    assert!(err.to_string().contains("(pod tally-0)"), "{err}");
    drop(first);
}

#[tokio::test]
async fn corrupt_state_is_an_error_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    for bytes in [
        &b""[..],
        b"tally-state v1 crc32=0 len=3\nabc",
        &[7; format::FILE_SIZE],
    ] {
        std::fs::write(&path, bytes).unwrap();
        let err = open_as(dir.path(), "tally-0").unwrap_err();
        assert!(err.to_string().contains(STATE_FILE), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }
}

#[tokio::test]
async fn visits_after_close_fail() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.visit().await.unwrap();
    store.close().await;
    assert!(matches!(store.visit().await, Err(StoreError::Closed)));
}

/// A volume written by the release before format v2, migrated in place on
/// the real disk: same count, same incarnation, then counting on.
#[tokio::test]
async fn v1_volume_is_migrated_in_place_with_count_and_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, v1_fixture()).unwrap();
    let store = open(dir.path());
    assert_eq!(
        (store.count(), store.incarnation()),
        (7, FIXTURE_INCARNATION)
    );
    let on_disk = std::fs::read(&path).unwrap();
    assert!(matches!(format::decode(&on_disk), Ok(Decoded::V2 { .. })));
    assert_eq!(store.visit().await.unwrap(), 8);
    store.close().await;
    drop(store);
    let state = inspect(dir.path()).unwrap().unwrap();
    assert_eq!(
        (state.count, state.incarnation.as_str()),
        (8, FIXTURE_INCARNATION)
    );
}

/// What a workload did, by position in the model's operation log.
#[derive(Default)]
struct History {
    /// Ops done when each visit was sent (read before sending).
    sent: Vec<usize>,
    /// Ops done when each acknowledgement was seen (read after it).
    acked: Vec<usize>,
    incarnation: String,
}

/// `visitors` clients making `each` visits at once, over `disk`.
fn workload(disk: &ModelDisk, durability: Durability, visitors: usize, each: usize) -> History {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = open_model(disk, options(durability));
        let history = Arc::new(Mutex::new(History {
            incarnation: store.incarnation().to_string(),
            ..History::default()
        }));
        let clients = (0..visitors).map(|_| {
            let (store, disk, history) = (store.clone(), disk.clone(), history.clone());
            tokio::spawn(async move {
                for _ in 0..each {
                    history.lock().unwrap().sent.push(disk.ops());
                    store.visit().await.unwrap();
                    history.lock().unwrap().acked.push(disk.ops());
                }
            })
        });
        for client in futures::future::join_all(clients).await {
            client.unwrap();
        }
        store.close().await;
        Arc::try_unwrap(history).ok().unwrap().into_inner().unwrap()
    })
}

/// Cuts the power at each of `points` (every [`Cut`]) and checks what the
/// store would recover. Returns (cuts explored, violations).
fn explore(
    initial: &Fs,
    disk: &ModelDisk,
    history: &History,
    floor: u64,
    points: impl IntoIterator<Item = usize>,
) -> (usize, Vec<String>) {
    let log = disk.log();
    let path = Path::new(DIR).join(STATE_FILE);
    let (mut explored, mut violations) = (0, Vec::new());
    for k in points {
        let fs = replay(initial, &log, k);
        let acked = floor + history.acked.iter().filter(|&&at| at <= k).count() as u64;
        let sent = floor + history.sent.iter().filter(|&&at| at <= k).count() as u64;
        for cut in Cut::ALL {
            explored += 1;
            let after = ModelDisk::new(fs.cut(cut));
            match load(&after, &path) {
                Err(e) => violations.push(format!("op {k} {cut:?}: unreadable: {e}")),
                Ok(found) => {
                    let (count, incarnation) = found
                        .map(|d| (d.state().count, Some(d.state().incarnation.clone())))
                        .unwrap_or((0, None));
                    if count < acked || count > sent {
                        violations.push(format!(
                            "op {k} {cut:?}: recovered {count}, acknowledged {acked}, sent {sent}"
                        ));
                    }
                    if acked > 0 && incarnation.as_deref() != Some(&history.incarnation) {
                        violations.push(format!("op {k} {cut:?}: incarnation {incarnation:?}"));
                    }
                }
            }
        }
    }
    (explored, violations)
}

#[test]
fn group_commit_loses_nothing_at_any_power_cut() {
    // Short history: every boundary.
    let disk = ModelDisk::new(Fs::default());
    let history = workload(&disk, Durability::GroupCommit, 3, 15);
    let ops = disk.ops();
    let (short, violations) = explore(&Fs::default(), &disk, &history, 0, 0..=ops);
    assert!(violations.is_empty(), "{violations:#?}");
    // Long history: random boundaries.
    let disk = ModelDisk::new(Fs::default());
    let history = workload(&disk, Durability::GroupCommit, 32, 60);
    let ops = disk.ops();
    let mut rng = Rng::new(0x7a11_c0de);
    let points: Vec<usize> = (0..400).map(|_| rng.below(ops + 1)).collect();
    let (long, violations) = explore(&Fs::default(), &disk, &history, 0, points);
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(history.acked.len(), 32 * 60);
    println!(
        "group-commit: {short} power cuts at every boundary of a {} op history, \
         {long} at random boundaries of a {ops} op history ({} visits): 0 acknowledged visits lost",
        short / Cut::ALL.len() - 1,
        32 * 60,
    );
}

/// The check can fail: modes that acknowledge before syncing lose
/// acknowledged visits in the model.
#[test]
fn none_and_periodic_lose_acknowledged_visits() {
    for durability in [Durability::None, Durability::Periodic] {
        let disk = ModelDisk::new(Fs::default());
        // `periodic` with its hour-long interval: never due in this run.
        let history = workload(&disk, durability, 4, 8);
        let (explored, violations) = explore(&Fs::default(), &disk, &history, 0, 0..=disk.ops());
        assert!(
            violations.iter().any(|v| v.contains("recovered")),
            "{durability:?} lost nothing in {explored} cuts"
        );
        println!(
            "{}: {} of {explored} power cuts lost acknowledged visits, e.g. {}",
            durability.as_str(),
            violations.len(),
            violations.last().unwrap()
        );
        if durability == Durability::None {
            assert_eq!(disk.syncs(), 1, "only the initialisation synced");
        }
    }
}

/// A v1 volume migrated with the power cut at every point of the
/// migration and of the visits after it.
#[test]
fn v1_migration_survives_a_power_cut_at_every_point() {
    let path = Path::new(DIR).join(STATE_FILE);
    let initial = Fs::with_files(&[(&path, &v1_fixture())]);
    let disk = ModelDisk::new(initial.clone());
    let history = workload(&disk, Durability::GroupCommit, 3, 4);
    assert_eq!(history.incarnation, FIXTURE_INCARNATION);
    let (explored, violations) = explore(&initial, &disk, &history, 7, 0..=disk.ops());
    assert!(violations.is_empty(), "{violations:#?}");
    println!("v1 migration: {explored} power cuts, count and incarnation kept at every one");
}

#[test]
fn a_failed_sync_is_rewritten_before_it_counts_as_clean() {
    let disk = ModelDisk::new(Fs::default());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut opts = options(Durability::Periodic);
        opts.sync_interval = Duration::from_millis(5);
        let store = open_model(&disk, opts);
        disk.fail_syncs(true);
        for n in 1..=3 {
            assert_eq!(store.visit().await.unwrap(), n);
        }
        // The periodic sync fails: unhealthy, still dirty.
        wait_for(|| store.health().is_err()).await;
        disk.fail_syncs(false);
        let synced = disk.syncs();
        wait_for(|| disk.syncs() > synced && store.health().is_ok()).await;
        // Now a power cut must keep all three acknowledged visits.
        let fs = replay(&Fs::default(), &disk.log(), disk.ops());
        let after = ModelDisk::new(fs.cut(Cut::DropUnsynced));
        let found = load(&after, &Path::new(DIR).join(STATE_FILE)).unwrap();
        assert_eq!(found.unwrap().state().count, 3);
    });
}

#[tokio::test]
async fn periodic_syncs_on_time_under_constant_load() {
    let disk = ModelDisk::new(Fs::default());
    let mut opts = options(Durability::Periodic);
    opts.sync_interval = Duration::from_millis(20);
    let store = open_model(&disk, opts);
    let initial = disk.syncs();
    let busy = Arc::new(AtomicBool::new(true));
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let (store, busy) = (store.clone(), busy.clone());
            tokio::spawn(async move {
                while busy.load(Ordering::Relaxed) {
                    store.visit().await.unwrap();
                }
            })
        })
        .collect();
    wait_for(|| disk.syncs() >= initial + 3).await;
    busy.store(false, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
}

use std::sync::atomic::AtomicBool;

/// Polls `condition` until it holds (10 s deadline).
async fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A hung disk: readiness fails, visits get `Stalled`, and visits whose
/// callers gave up are never counted, even once the disk comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_disk_fails_readiness_and_timed_out_visits_never_count() {
    let disk = ModelDisk::new(Fs::default());
    let mut opts = options(Durability::GroupCommit);
    opts.commit_timeout = Duration::from_millis(200);
    let metrics = Arc::new(Metrics::new());
    let store = Store::open_on(
        Arc::new(disk.clone()),
        Path::new(DIR),
        "tally-0",
        opts,
        metrics.clone(),
        None,
    )
    .unwrap();
    assert_eq!(store.visit().await.unwrap(), 1);
    disk.stall();
    let stuck: Vec<_> = (0..5)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.visit().await })
        })
        .collect();
    for visit in stuck {
        let err = visit.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Stalled(_)), "{err}");
    }
    wait_for(|| store.health().is_err()).await;
    assert!(store.health().unwrap_err().contains("stuck"));
    // New visits are refused at once while the commit is stuck.
    assert!(matches!(store.visit().await, Err(StoreError::Stalled(_))));
    store.update_gauges();
    assert_eq!(metrics.store_healthy.get(), 0);
    assert!(metrics.store_oldest_pending_seconds.get() >= 0.2);
    assert!(metrics.store_queue_depth.get() >= 1);
    disk.resume();
    wait_for(|| store.health().is_ok()).await;
    assert_eq!(store.count(), 1);
    assert_eq!(store.visit().await.unwrap(), 2);
    store.close().await;
    let found = load(&disk, &Path::new(DIR).join(STATE_FILE)).unwrap();
    assert_eq!(found.unwrap().state().count, 2);
    store.update_gauges();
    assert_eq!(metrics.store_healthy.get(), 1);
    assert_eq!(metrics.store_queue_depth.get(), 0);
}

/// A full volume (design.md §6): visits are refused with the cause and the
/// remedy, readiness fails, the gauge says why, acknowledged visits stay;
/// once space is freed the store counts again on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_refuses_visits_until_space_is_freed() {
    let disk = ModelDisk::new(Fs::default());
    let metrics = Arc::new(Metrics::new());
    let store = Store::open_on(
        Arc::new(disk.clone()),
        Path::new(DIR),
        "tally-0",
        options(Durability::GroupCommit),
        metrics.clone(),
        None,
    )
    .unwrap();
    assert_eq!(store.visit().await.unwrap(), 1);
    disk.fill(true);
    let refused = store.visit().await.unwrap_err().to_string();
    assert!(
        refused.contains("is full") && refused.contains("free space"),
        "{refused}"
    );
    assert!(store.health().unwrap_err().contains("is full"));
    assert_eq!(metrics.store_volume_full.get(), 1);
    assert_eq!(store.count(), 1);
    // The retry (every second) finds it still full.
    let failures = metrics.commit_failures.get();
    wait_for(|| metrics.commit_failures.get() > failures).await;
    assert!(store.health().is_err());
    disk.fill(false);
    wait_for(|| store.health().is_ok()).await;
    assert_eq!(metrics.store_volume_full.get(), 0);
    assert_eq!(store.visit().await.unwrap(), 2);
    store.close().await;
    let found = load(&disk, &Path::new(DIR).join(STATE_FILE)).unwrap();
    assert_eq!(found.unwrap().state().count, 2);
}

/// Readiness fails when the volume fills up even if no visit comes to
/// find out: the idle committer looks every second.
#[tokio::test]
async fn an_idle_store_notices_a_full_volume_on_its_own() {
    let disk = ModelDisk::new(Fs::default());
    let store = open_model(&disk, options(Durability::GroupCommit));
    assert!(store.health().is_ok());
    disk.fill(true);
    wait_for(|| store.health().is_err()).await;
    assert!(store.health().unwrap_err().contains("is full"));
    disk.fill(false);
    wait_for(|| store.health().is_ok()).await;
}

/// Another writer's `ENOSPC` (`peers.state`) makes the store look: a full
/// volume stops the counting before a visit finds out.
#[tokio::test]
async fn check_space_after_another_writer_ran_out_marks_a_full_volume() {
    let disk = ModelDisk::new(Fs::default());
    let store = open_model(&disk, options(Durability::GroupCommit));
    store.check_space();
    store.visit().await.unwrap();
    assert!(store.health().is_ok(), "space left: nothing to report");
    disk.fill(true);
    store.check_space();
    wait_for(|| store.health().is_err()).await;
    assert!(store.health().unwrap_err().contains("is full"));
}

/// A directory that served a counter and lost `visits.state` is refused,
/// naming the file and the remedy; a crash during a volume's very first
/// start (lock taken, nothing served) is not mistaken for one.
#[tokio::test]
async fn a_lost_counter_is_refused_never_started_again_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    // First start cut short: the lock file exists, no counter was served.
    drop(lock::DirLock::acquire(dir.path(), "tally-0").unwrap());
    let store = open(dir.path());
    assert_eq!(store.visit().await.unwrap(), 1);
    store.close().await;
    drop(store);
    std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
    let err = open_as(dir.path(), "tally-0").unwrap_err();
    assert!(matches!(err, StoreError::Lost { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("visits.state is missing")
            && message.contains("tally.lock says incarnation")
            && message.contains("tally new-incarnation"),
        "{message}"
    );
    assert!(!dir.path().join(STATE_FILE).exists(), "nothing was written");
    // peers.state alone is evidence too.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join(PEERS_FILE), b"x").unwrap();
    let err = open_as(other.path(), "tally-0").unwrap_err().to_string();
    assert!(err.contains("peers.state is there"), "{err}");
    // The operator's explicit way on: a new incarnation, counted from 0.
    let forked = start_new_incarnation(dir.path(), "tally-0").unwrap();
    let store = open(dir.path());
    assert_eq!(store.incarnation(), forked.incarnation);
    assert_eq!(store.visit().await.unwrap(), 1);
    store.close().await;
    drop(store);
    let err = start_new_incarnation(dir.path(), "tally-0").unwrap_err();
    assert!(matches!(err, StoreError::Exists { count: 1, .. }), "{err}");
}

/// A `visits.state` that links to nothing is refused and left as it is.
#[tokio::test]
async fn a_dangling_symlink_is_refused_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join(STATE_FILE);
    std::os::unix::fs::symlink(dir.path().join("elsewhere/visits.state"), &link).unwrap();
    let err = open_as(dir.path(), "tally-0").unwrap_err();
    assert!(matches!(err, StoreError::Dangling { .. }), "{err}");
    assert!(err.to_string().contains("elsewhere"), "{err}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// Readiness fails within a second of the counter file becoming
/// unwritable, before any visit finds out, and recovers on its own.
#[tokio::test]
async fn an_idle_store_notices_an_unwritable_volume_on_its_own() {
    let disk = ModelDisk::new(Fs::default());
    let store = open_model(&disk, options(Durability::GroupCommit));
    assert!(store.health().is_ok());
    disk.set_read_only(true);
    wait_for(|| store.health().is_err()).await;
    assert!(store.health().unwrap_err().contains("cannot write"));
    disk.set_read_only(false);
    wait_for(|| store.health().is_ok()).await;
    assert_eq!(store.visit().await.unwrap(), 1);
}

/// A counter at the largest count, or at the last commit sequence number,
/// is not ready: it can take no visit.
#[tokio::test]
async fn a_count_that_cannot_grow_is_not_ready() {
    for (seq, count) in [(7, u64::MAX), (u64::MAX, 5)] {
        let state = StoredState {
            incarnation: FIXTURE_INCARNATION.into(),
            count,
            pod: "tally-0".into(),
            created_unix: 1,
        };
        let image = format::SlotWriter::new(&state).unwrap().image(seq, count);
        let path = Path::new(DIR).join(STATE_FILE);
        let disk = ModelDisk::new(Fs::with_files(&[(&path, &image)]));
        let store = open_model(&disk, options(Durability::GroupCommit));
        let reason = store.health().unwrap_err();
        assert!(reason.contains("new-incarnation"), "{reason}");
        assert!(store.visit().await.is_err(), "seq {seq} count {count}");
        assert_eq!(store.count(), count, "nothing wrapped");
    }
}
