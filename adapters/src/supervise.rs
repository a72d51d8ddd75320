//! Running a source and running it again after it failed: the one place that
//! decides whether and when.
//!
//! A source instance ends in one of three ways that matter here:
//!
//! * **shutdown** (or `Ok(())`): nothing to do;
//! * a **retryable** error ([`SourceError::is_fatal`] false: a server restarting,
//!   a file briefly gone, a refused commit): the next instance starts after a
//!   delay from [`Backoff`] (1 s, doubling to 30 s, full jitter), from the last
//!   durable position, so nothing is lost. The backoff starts over once an
//!   instance is healthy: it made a commit durable, or ran for [`HEALTHY_AFTER`];
//! * a **fatal** error ([`SourceError::Fatal`]: a table that does not exist, a
//!   replication slot that was dropped): starting again cannot help, so the source
//!   is not started again. The error is logged as an `ALARM` naming the cause and
//!   the fix and handed to the caller (the agent shows it in `status`, metrics and
//!   the heartbeat) until the agent is restarted after the fix.
//!
//! Before the next instance starts, every commit the last one handed over must be
//! answered ([`crate::CommitTracker::settled`]): the next instance reads its resume
//! position from the buffer, which must include them.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{Backoff, Source, SourceContext, SourceError};

/// The first delay after a failure is at most this long.
pub const RESTART_BASE: Duration = Duration::from_secs(1);
/// No delay between two instances is longer.
pub const RESTART_CAP: Duration = Duration::from_secs(30);
/// An instance that ran this long without failing counts as healthy even if it
/// had nothing to commit (an idle database).
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// How often a running instance after a failure is checked for health.
const HEALTH_POLL: Duration = Duration::from_millis(500);

/// What happened to the supervised source, for the caller's status display.
#[derive(Debug)]
pub enum Event<'a> {
    /// An instance failed with a retryable error; the next one starts in `retry_in`.
    Failed {
        error: &'a SourceError,
        retry_in: Duration,
    },
    /// An instance started after a failure is healthy: the failure is over.
    Recovered,
    /// A fatal error: the source is not started again.
    Stopped { error: &'a SourceError },
}

/// How the supervision ended.
#[derive(Debug)]
pub enum Ended {
    /// Shutdown was requested.
    Shutdown,
    /// The source ended by itself without an error.
    Finished,
    /// The source failed and will not be restarted; see [`Event::Stopped`].
    Fatal(SourceError),
}

impl Ended {
    /// As a source's result: `Ok(())`, `Err(SourceError::Shutdown)` or the fatal error.
    pub fn into_result(self) -> Result<(), SourceError> {
        match self {
            Ended::Finished => Ok(()),
            Ended::Shutdown => Err(SourceError::Shutdown),
            Ended::Fatal(e) => Err(e),
        }
    }
}

/// Runs `source` until shutdown, a clean end or a fatal error, starting a new
/// instance after each retryable error (see the module doc). `context` makes each
/// instance's [`SourceContext`] (its resume position read afresh); an error from it
/// counts like an instance's. `report` hears of failures and recoveries as they
/// happen; logging is done here.
pub async fn supervise<C, R>(
    source: &dyn Source,
    mut context: C,
    shutdown: &CancellationToken,
    mut report: R,
) -> Ended
where
    C: FnMut() -> Result<SourceContext, SourceError>,
    R: FnMut(Event<'_>),
{
    let mut backoff = Backoff::new(RESTART_BASE, RESTART_CAP);
    let mut failing = false;
    loop {
        let started = Instant::now();
        let (result, healthy) = match context() {
            Ok(ctx) => {
                let tracker = ctx.tracker();
                let run = source.run(ctx);
                let result = if failing {
                    watch_recovery(run, &tracker, started, &mut failing, &mut report).await
                } else {
                    run.await
                };
                // What this instance handed over must be written (or refused)
                // before the next one reads its resume position from the buffer.
                tracker.settled().await;
                let healthy = tracker.durable_commits() > 0 || started.elapsed() >= HEALTHY_AFTER;
                if healthy && failing {
                    // Healthy before it ended (too quickly for the watch to see);
                    // `failing` is set again below unless this was the end.
                    info!("source running again");
                    report(Event::Recovered);
                }
                (result, healthy)
            }
            Err(e) => (Err(e), false),
        };
        if healthy {
            backoff.reset();
        }
        let error = match result {
            Ok(()) | Err(SourceError::Shutdown) if shutdown.is_cancelled() => {
                return Ended::Shutdown
            }
            Ok(()) => {
                info!("source finished");
                return Ended::Finished;
            }
            Err(e) => e,
        };
        if error.is_fatal() {
            error!(
                error = %error,
                "ALARM: the source stopped and will not be restarted; fix what the error names, then reload the agent (systemctl reload ferry-agent), which starts stopped streams again"
            );
            report(Event::Stopped { error: &error });
            return Ended::Fatal(error);
        }
        let retry_in = backoff.next_delay();
        warn!(
            error = %error,
            retry_in = ?retry_in,
            attempt = backoff.attempts(),
            "source failed; restarting from its last durable position"
        );
        report(Event::Failed {
            error: &error,
            retry_in,
        });
        failing = true;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ended::Shutdown,
            _ = tokio::time::sleep(retry_in) => {}
        }
    }
}

/// Runs an instance started after a failure, telling `report` once it is healthy.
async fn watch_recovery<F, R>(
    run: F,
    tracker: &crate::CommitTracker,
    started: Instant,
    failing: &mut bool,
    report: &mut R,
) -> Result<(), SourceError>
where
    F: Future<Output = Result<(), SourceError>>,
    R: FnMut(Event<'_>),
{
    tokio::pin!(run);
    let mut poll = tokio::time::interval(HEALTH_POLL);
    loop {
        tokio::select! {
            biased;
            r = &mut run => return r,
            _ = poll.tick(), if *failing => {
                if tracker.durable_commits() > 0 || started.elapsed() >= HEALTHY_AFTER {
                    *failing = false;
                    info!("source running again");
                    report(Event::Recovered);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::sync::{mpsc, watch};

    use super::*;
    use crate::{CommitRequest, SourceFuture};

    /// Fails the way its script says, one entry per instance; commits a position
    /// first when the entry says so.
    struct Scripted {
        script: Mutex<Vec<(bool, Result<(), SourceError>)>>,
        runs: Arc<AtomicUsize>,
    }

    impl Scripted {
        fn new(script: Vec<(bool, Result<(), SourceError>)>) -> (Self, Arc<AtomicUsize>) {
            let runs = Arc::new(AtomicUsize::new(0));
            let mut script = script;
            script.reverse();
            (
                Scripted {
                    script: Mutex::new(script),
                    runs: Arc::clone(&runs),
                },
                runs,
            )
        }
    }

    impl Source for Scripted {
        fn run(&self, ctx: SourceContext) -> SourceFuture {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let next = self.script.lock().unwrap().pop();
            Box::pin(async move {
                match next {
                    Some((commit, result)) => {
                        if commit {
                            ctx.commit(Vec::new(), b"p".to_vec()).await?;
                        }
                        result
                    }
                    // Out of script: run until shutdown.
                    None => {
                        ctx.shutdown.cancelled().await;
                        Err(SourceError::Shutdown)
                    }
                }
            })
        }
    }

    /// A buffer that makes every commit durable at once.
    fn contexts(
        shutdown: &CancellationToken,
    ) -> impl FnMut() -> Result<SourceContext, SourceError> {
        let (tx, mut rx) = mpsc::channel::<CommitRequest>(4);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let _ = req.done.send(Ok(None));
            }
        });
        let (_acked_tx, acked) = watch::channel(0);
        let shutdown = shutdown.clone();
        move || {
            Ok(SourceContext::new(
                0,
                "s".into(),
                None,
                0,
                acked.clone(),
                shutdown.clone(),
                tx.clone(),
            ))
        }
    }

    fn retryable() -> Result<(), SourceError> {
        Err(SourceError::Other("the server is restarting".into()))
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        Failed(Duration),
        Recovered,
        Stopped(String),
    }

    fn recorder() -> (Arc<Mutex<Vec<Seen>>>, impl FnMut(Event<'_>)) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        (seen, move |e: Event<'_>| {
            s.lock().unwrap().push(match e {
                Event::Failed { retry_in, .. } => Seen::Failed(retry_in),
                Event::Recovered => Seen::Recovered,
                Event::Stopped { error } => Seen::Stopped(error.to_string()),
            })
        })
    }

    /// A fatal error stops the source for good: one run, no restart, however long
    /// one waits; the caller hears of it once.
    #[tokio::test(start_paused = true)]
    async fn a_fatal_error_is_not_restarted() {
        let shutdown = CancellationToken::new();
        let (source, runs) = Scripted::new(vec![(
            false,
            Err(SourceError::Fatal(
                "table public.nope does not exist. Create it".into(),
            )),
        )]);
        let (seen, report) = recorder();
        let ended = tokio::time::timeout(
            Duration::from_secs(3600),
            supervise(&source, contexts(&shutdown), &shutdown, report),
        )
        .await
        .unwrap();
        assert!(
            matches!(ended, Ended::Fatal(SourceError::Fatal(_))),
            "{ended:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(
            *seen.lock().unwrap(),
            [Seen::Stopped(
                "table public.nope does not exist. Create it".into()
            )]
        );
    }

    /// Retryable errors in a row wait ever longer (within the backoff's bounds);
    /// a healthy instance ends the failure and starts the backoff over.
    #[tokio::test(start_paused = true)]
    async fn retryable_errors_back_off_and_a_healthy_run_starts_over() {
        let shutdown = CancellationToken::new();
        let (source, runs) = Scripted::new(vec![
            (false, retryable()),
            (false, retryable()),
            (false, retryable()),
            (false, retryable()),
            // Commits, then fails: healthy, so the backoff starts over.
            (true, retryable()),
            (false, retryable()),
        ]);
        let (seen, report) = recorder();
        let stop = shutdown.clone();
        let task =
            tokio::spawn(async move { supervise(&source, contexts(&stop), &stop, report).await });
        // The seventh instance runs until shutdown.
        let deadline = Instant::now() + Duration::from_secs(600);
        while runs.load(Ordering::SeqCst) < 7 {
            assert!(Instant::now() < deadline, "only {runs:?} runs");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shutdown.cancel();
        assert!(matches!(task.await.unwrap(), Ended::Shutdown));
        let seen = seen.lock().unwrap();
        let delays: Vec<Duration> = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Failed(d) => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(delays.len(), 6, "{seen:?}");
        // Ceilings 1, 2, 4, 8 s; then after the healthy run 1 s again, twice
        // (the healthy run's own failure and the next).
        for (d, ceiling) in delays.iter().zip([1, 2, 4, 8, 1, 2]) {
            assert!(*d <= Duration::from_secs(ceiling), "{delays:?}");
        }
        assert!(seen.contains(&Seen::Recovered), "{seen:?}");
        assert!(!seen.iter().any(|s| matches!(s, Seen::Stopped(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_during_the_backoff_ends_at_once() {
        let shutdown = CancellationToken::new();
        let (source, runs) = Scripted::new(vec![(false, retryable())]);
        let stop = shutdown.clone();
        let task =
            tokio::spawn(async move { supervise(&source, contexts(&stop), &stop, |_| {}).await });
        while runs.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        shutdown.cancel();
        assert!(matches!(task.await.unwrap(), Ended::Shutdown));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_finishes_is_not_restarted() {
        let shutdown = CancellationToken::new();
        let (source, runs) = Scripted::new(vec![(true, Ok(()))]);
        let ended = supervise(&source, contexts(&shutdown), &shutdown, |_| {}).await;
        assert!(matches!(ended, Ended::Finished));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
