//! Round scheduling for `/visits/total`: a single-flight with a read
//! barrier.
//!
//! A request may only use a round that *starts after it arrived*: a round
//! already in flight may have fetched a sibling before that sibling
//! acknowledged a visit the request must count (design.md §4, "what
//! `complete: true` promises"). So at most one round runs and at most one
//! waits: a request arriving while a round runs joins the waiting one
//! (creating it if needed), which starts the moment the running one ends.
//! However many requests arrive, a busy pod runs rounds back to back and
//! never more than one at a time, so peer load does not grow with client
//! load.
//!
//! The scheduling is generic over what a round produces, so it is tested
//! here with paused time and no sockets.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::Shared;
use tokio::sync::oneshot;

/// Why a request got no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoundError {
    #[error("the round ended without a result (it panicked)")]
    Lost,
}

type Outcome<T> = Shared<oneshot::Receiver<T>>;
type Run<T> = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = T> + Send>> + Send + Sync>;

/// How a request got its round (for the coalescing metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Nothing was running: the request started a round at once.
    Started,
    /// A round was running: the request queued the next one.
    Queued,
    /// The next round was already queued by another request: shared it.
    Shared,
}

/// Single-flight rounds with a read barrier; cheap to clone.
pub struct Rounds<T> {
    run: Run<T>,
    state: Arc<Mutex<State<T>>>,
}

impl<T> Clone for Rounds<T> {
    fn clone(&self) -> Self {
        Rounds {
            run: self.run.clone(),
            state: self.state.clone(),
        }
    }
}

struct State<T> {
    /// The round in flight, if any.
    running: Option<Outcome<T>>,
    /// The round that starts when the running one ends, with the sender
    /// its driver completes.
    queued: Option<(oneshot::Sender<T>, Outcome<T>)>,
}

/// What the read barrier decides for a request arriving now.
enum Choice {
    StartNow,
    Queue,
    JoinQueued,
}

impl<T> State<T> {
    /// The read barrier, in one place: a request never joins the running
    /// round, only one that has not started yet.
    fn choose(&self) -> Choice {
        match (&self.running, &self.queued) {
            (None, _) => Choice::StartNow,
            (Some(_), None) => Choice::Queue,
            (Some(_), Some(_)) => Choice::JoinQueued,
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Rounds<T> {
    /// Rounds that each run `run()` to completion.
    pub fn new<F, Fut>(run: F) -> Rounds<T>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        Rounds {
            run: Arc::new(move || Box::pin(run())),
            state: Arc::new(Mutex::new(State {
                running: None,
                queued: None,
            })),
        }
    }

    /// The result of a round that starts no earlier than this call.
    pub async fn join(&self) -> Result<T, RoundError> {
        self.enter().0.await.map_err(|_| RoundError::Lost)
    }

    /// Like [`join`](Self::join), also saying how the round was joined.
    pub fn enter(&self) -> (Outcome<T>, Joined) {
        let mut state = self.state.lock().expect("poisoned");
        // Planted bug for the chaos checker's test (a test-only cargo
        // feature): join the round in flight, as before the read barrier.
        #[cfg(feature = "planted-bug-stale-read")]
        if let Some(running) = &state.running {
            return (running.clone(), Joined::Shared);
        }
        match state.choose() {
            Choice::StartNow => {
                let (tx, rx) = oneshot::channel();
                let rx = rx.shared();
                state.running = Some(rx.clone());
                // A task, not just a future: rounds finish even if every
                // request waiting on them goes away.
                tokio::spawn(self.clone().drive(tx));
                (rx, Joined::Started)
            }
            Choice::Queue => {
                let (tx, rx) = oneshot::channel();
                let rx = rx.shared();
                state.queued = Some((tx, rx.clone()));
                (rx, Joined::Queued)
            }
            Choice::JoinQueued => {
                let (_, rx) = state.queued.as_ref().expect("queued round");
                (rx.clone(), Joined::Shared)
            }
        }
    }

    /// Runs rounds back to back while requests queue them.
    async fn drive(self, mut tx: oneshot::Sender<T>) {
        // If a round panics, its waiters (and the queued ones) get
        // `RoundError::Lost` and the next request starts afresh.
        let mut reset = ResetOnDrop {
            state: self.state.clone(),
            armed: true,
        };
        loop {
            let result = (self.run)().await;
            let _ = tx.send(result);
            let mut state = self.state.lock().expect("poisoned");
            match state.queued.take() {
                Some((next, rx)) => {
                    state.running = Some(rx);
                    tx = next;
                }
                None => {
                    state.running = None;
                    break;
                }
            }
        }
        reset.armed = false;
    }
}

/// Clears the schedule when a driver dies mid-round (disarmed when it
/// ends normally: by then another driver may own the schedule).
struct ResetOnDrop<T> {
    state: Arc<Mutex<State<T>>>,
    armed: bool,
}

impl<T> Drop for ResetOnDrop<T> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(mut state) = self.state.lock() {
            state.running = None;
            state.queued = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::time::Instant;

    /// Rounds that take 100 ms and report their number and start time.
    fn numbered() -> (Rounds<(u64, Instant)>, Arc<AtomicU64>) {
        let started = Arc::new(AtomicU64::new(0));
        let count = started.clone();
        let rounds = Rounds::new(move || {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let at = Instant::now();
                tokio::time::sleep(Duration::from_millis(100)).await;
                (n, at)
            }
        });
        (rounds, started)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pod_starts_a_round_at_once() {
        let (rounds, started) = numbered();
        let arrived = Instant::now();
        let (n, at) = rounds.join().await.unwrap();
        assert_eq!((n, at), (1, arrived));
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_never_rides_a_round_that_started_before_it_arrived() {
        let (rounds, _) = numbered();
        let first = tokio::spawn({
            let rounds = rounds.clone();
            async move { rounds.join().await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let arrived = Instant::now();
        let (n, at) = rounds.join().await.unwrap();
        assert_eq!(n, 2, "the running round started before this request");
        assert!(at >= arrived);
        assert_eq!(
            at,
            arrived + Duration::from_millis(70),
            "starts when round 1 ends"
        );
        assert_eq!(first.await.unwrap().0, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_concurrent_requests_cause_two_rounds() {
        let (rounds, started) = numbered();
        let mut tasks = Vec::new();
        let mut how = Vec::new();
        for i in 0..1000 {
            let rounds = rounds.clone();
            if i == 1 {
                // Everyone after the first arrives while round 1 runs.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let arrived = Instant::now();
            let (outcome, joined) = rounds.enter();
            how.push(joined);
            tasks.push(tokio::spawn(async move {
                let (_, at) = outcome.await.unwrap();
                assert!(at >= arrived);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert_eq!(how[0], Joined::Started);
        assert_eq!(how[1], Joined::Queued);
        assert!(how[2..].iter().all(|j| *j == Joined::Shared));
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_requests_runs_rounds_back_to_back() {
        let (rounds, started) = numbered();
        let mut tasks = Vec::new();
        // One request every 10 ms for one second: 100 requests.
        for _ in 0..100 {
            let rounds = rounds.clone();
            let arrived = Instant::now();
            tasks.push(tokio::spawn(async move {
                let (_, at) = rounds.join().await.unwrap();
                assert!(at >= arrived);
                at
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut starts = Vec::new();
        for task in tasks {
            starts.push(task.await.unwrap());
        }
        starts.dedup();
        // Never two at once: each round starts when the previous one ends.
        for pair in starts.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(100));
        }
        assert_eq!(started.load(Ordering::SeqCst), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_finishes_when_its_requests_go_away() {
        let (rounds, started) = numbered();
        let abandoned = tokio::spawn({
            let rounds = rounds.clone();
            async move { rounds.join().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        abandoned.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(started.load(Ordering::SeqCst), 1);
        // Idle again: the next request starts round 2 at once.
        let arrived = Instant::now();
        assert_eq!(rounds.join().await.unwrap(), (2, arrived));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_round_fails_its_requests_and_the_next_starts_afresh() {
        let calls = Arc::new(AtomicU64::new(0));
        let count = calls.clone();
        let rounds = Rounds::new(move || {
            let n = count.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(n > 0, "first round fails");
                n
            }
        });
        let first = tokio::spawn({
            let rounds = rounds.clone();
            async move { rounds.join().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let queued = rounds.join().await;
        assert_eq!(first.await.unwrap(), Err(RoundError::Lost));
        assert_eq!(queued, Err(RoundError::Lost));
        assert_eq!(rounds.join().await, Ok(1));
    }
}
