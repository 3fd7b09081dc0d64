//! When to reconcile. Every trigger means the same thing (sync the current revision once); they
//! are debounced, collapse while a run is in progress, and failures retry with capped backoff.
//! Tested with tokio's paused clock.

use rand::Rng;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The repository moved or a tenant file changed on disk.
    Watch,
    /// `POST /sync`.
    Webhook,
}

/// Why a run started: what the run history records as its trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The interval passed.
    Interval,
    /// A failed run's backoff passed.
    Retry,
    Trigger(Trigger),
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub interval: Duration,
    /// Up to this much is added to each interval, so replicas do not fetch in step.
    pub jitter: Duration,
    /// Quiet time after the last trigger before a run starts.
    pub debounce: Duration,
    /// A burst of triggers still runs after at most this long.
    pub max_debounce: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Timing {
    pub fn new(interval: Duration, debounce: Duration) -> Self {
        Timing {
            interval,
            jitter: interval / 10,
            debounce,
            max_debounce: debounce * 10,
            backoff_base: Duration::from_secs(1),
            backoff_max: interval.min(Duration::from_secs(300)).max(Duration::from_secs(1)),
        }
    }

    /// Delay before retry number `failures` (1-based): base, 2*base, 4*base ... capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
        self.backoff_base.saturating_mul(factor).min(self.backoff_max)
    }

    fn next_tick(&self, from: Instant) -> Instant {
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            rand::thread_rng().gen_range(Duration::ZERO..=self.jitter)
        };
        from + self.interval + jitter
    }
}

/// Why a run failed, and whether retrying soon can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub message: String,
    /// An outage (retried with backoff), not a refusal (which waits for the next commit, trigger
    /// or interval).
    pub transient: bool,
}

impl Failed {
    pub fn transient(message: String) -> Failed {
        Failed { message, transient: true }
    }
}

/// Runs `reconcile` once at start, then on every interval, trigger and retry, one run at a time,
/// until `shutdown` turns true. A run in progress is finished before returning.
pub async fn reconcile_loop<F, Fut>(timing: Timing, mut triggers: mpsc::Receiver<Trigger>, mut shutdown: watch::Receiver<bool>, mut reconcile: F)
where
    F: FnMut(Cause) -> Fut,
    Fut: Future<Output = Result<(), Failed>>,
{
    let mut failures = 0u32;
    let mut next_tick = Instant::now();
    let mut retry_at: Option<Instant> = None;
    let mut triggered: Option<Trigger> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let mut cause = Cause::Interval;
        if triggered.is_none() {
            let wake = retry_at.map_or(next_tick, |r| r.min(next_tick));
            tokio::select! {
                _ = shutdown.changed() => return,
                t = triggers.recv() => match t {
                    Some(t) => triggered = Some(t),
                    None => return,
                },
                _ = sleep_until(wake) => if retry_at.is_some_and(|r| r <= Instant::now()) {
                    cause = Cause::Retry;
                },
            }
        }
        if let Some(t) = triggered.take() {
            cause = Cause::Trigger(t);
            // Debounce: wait for quiet, but not forever.
            let deadline = Instant::now() + timing.max_debounce;
            loop {
                let quiet = (Instant::now() + timing.debounce).min(deadline);
                tokio::select! {
                    _ = shutdown.changed() => return,
                    t = triggers.recv() => if t.is_none() { return },
                    _ = sleep_until(quiet) => break,
                }
            }
        }
        match reconcile(cause).await {
            Ok(()) => {
                failures = 0;
                retry_at = None;
            }
            Err(e) if e.transient => {
                failures += 1;
                let delay = timing.backoff(failures);
                tracing::warn!(error = %e.message, failures, retry_in_ms = delay.as_millis() as u64, "sync failed; will retry");
                retry_at = Some(Instant::now() + delay);
            }
            Err(e) => {
                // The same refusal at every retry: wait for a commit, a trigger or the interval.
                failures = 0;
                retry_at = None;
                tracing::warn!(error = %e.message, "sync refused; it runs again on the next commit, trigger or interval");
            }
        }
        next_tick = timing.next_tick(Instant::now());
        // Triggers that came during the run collapse into one follow-up run.
        while let Ok(t) = triggers.try_recv() {
            triggered = Some(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn timing() -> Timing {
        Timing {
            interval: Duration::from_secs(60),
            jitter: Duration::ZERO,
            debounce: Duration::from_millis(500),
            max_debounce: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
        }
    }

    type Runs = Arc<Mutex<Vec<Instant>>>;

    /// Starts the loop with a reconcile that records when it ran, takes `work` and fails while
    /// `fail` says so.
    fn start(timing: Timing, work: Duration, fail: Arc<Mutex<u32>>) -> (mpsc::Sender<Trigger>, watch::Sender<bool>, Runs, tokio::task::JoinHandle<()>) {
        start_failing(timing, work, fail, true)
    }

    /// As [`start`], the failures being outages (`transient`) or refusals.
    fn start_failing(
        timing: Timing,
        work: Duration,
        fail: Arc<Mutex<u32>>,
        transient: bool,
    ) -> (mpsc::Sender<Trigger>, watch::Sender<bool>, Runs, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let runs: Runs = Arc::default();
        let r = runs.clone();
        let handle = tokio::spawn(reconcile_loop(timing, rx, stop_rx, move |_| {
            let r = r.clone();
            let fail = fail.clone();
            async move {
                r.lock().unwrap().push(Instant::now());
                tokio::time::sleep(work).await;
                let mut f = fail.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    Err(Failed {
                        message: "database down".into(),
                        transient,
                    })
                } else {
                    Ok(())
                }
            }
        }));
        (tx, stop_tx, runs, handle)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_triggers_is_one_run_after_the_quiet_period() {
        let t0 = Instant::now();
        let (tx, stop, runs, handle) = start(timing(), Duration::ZERO, Arc::default());
        settle().await;
        assert_eq!(runs.lock().unwrap().len(), 1, "the start-up run");
        for _ in 0..5 {
            tx.send(Trigger::Watch).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let last_trigger = Instant::now() - Duration::from_millis(100);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = runs.lock().unwrap().clone();
        assert_eq!(r.len(), 2, "{:?}", r.iter().map(|i| *i - t0).collect::<Vec<_>>());
        assert_eq!(r[1] - last_trigger, Duration::from_millis(500));
        stop.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_during_a_run_collapse_into_one_follow_up() {
        let (tx, stop, runs, handle) = start(timing(), Duration::from_secs(3), Arc::default());
        settle().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        for _ in 0..4 {
            tx.send(Trigger::Webhook).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let r = runs.lock().unwrap().clone();
        assert_eq!(r.len(), 2, "start-up run plus exactly one follow-up");
        assert_eq!(r[1] - r[0], Duration::from_millis(3500), "after the first run and the debounce");
        stop.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn failures_retry_with_capped_exponential_backoff() {
        let fail = Arc::new(Mutex::new(5));
        let (_tx, stop, runs, handle) = start(timing(), Duration::ZERO, fail);
        tokio::time::sleep(Duration::from_secs(40)).await;
        let r = runs.lock().unwrap().clone();
        let gaps: Vec<u64> = r.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        // 5 failures: retries after 1, 2, 4, 8 (cap), 8; then success and back to the interval.
        assert_eq!(gaps, [1, 2, 4, 8, 8], "{gaps:?}");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(runs.lock().unwrap().len(), 7, "the interval run after recovery");
        stop.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_not_retried_on_a_backoff_but_on_the_next_trigger() {
        let fail = Arc::new(Mutex::new(3));
        let (tx, stop, runs, handle) = start_failing(timing(), Duration::ZERO, fail, false);
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert_eq!(runs.lock().unwrap().len(), 1, "no retry within the interval");
        tx.send(Trigger::Watch).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.lock().unwrap().len(), 2, "a new commit runs at once");
        stop.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_interval_runs_without_triggers_and_shutdown_waits_for_the_run() {
        let (_tx, stop, runs, handle) = start(timing(), Duration::from_secs(2), Arc::default());
        tokio::time::sleep(Duration::from_secs(125)).await;
        assert_eq!(runs.lock().unwrap().len(), 3, "at 0, 62 and 124 s");
        stop.send(true).unwrap();
        let stopped = Instant::now();
        handle.await.unwrap();
        assert!(
            Instant::now() - stopped <= Duration::from_secs(2),
            "the run in progress finished, no new one started"
        );
        assert_eq!(runs.lock().unwrap().len(), 3);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let t = timing();
        let secs: Vec<u64> = (1..=6).map(|n| t.backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 8, 8]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_run_says_what_started_it() {
        let (tx, rx) = mpsc::channel(8);
        let (stop_tx, stop_rx) = watch::channel(false);
        let causes: Arc<Mutex<Vec<Cause>>> = Arc::default();
        let seen = causes.clone();
        let handle = tokio::spawn(reconcile_loop(timing(), rx, stop_rx, move |cause| {
            let mut seen = seen.lock().unwrap();
            seen.push(cause);
            // The second run fails, so the third is its retry.
            let result = match seen.len() {
                2 => Err(Failed::transient("database down".into())),
                _ => Ok(()),
            };
            async move { result }
        }));
        settle().await;
        tx.send(Trigger::Webhook).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        stop_tx.send(true).unwrap();
        handle.await.unwrap();
        let causes = causes.lock().unwrap().clone();
        assert_eq!(
            causes[..4],
            [Cause::Interval, Cause::Trigger(Trigger::Webhook), Cause::Retry, Cause::Interval],
            "{causes:?}"
        );
    }
}
