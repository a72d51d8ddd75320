//! A stand-in for the agent's buffer: dense seqs, the last position, and crashes
//! (cancel the source; what was not answered is not durable) followed by restarts
//! from the last durable position. Sources run under `ferry_adapters::supervise`,
//! as in the agent: a retryable error starts a new instance after a backoff, and
//! only shutdown, a crash or a fatal error ends the run.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_adapters::postgres::{PostgresConfig, PostgresSource};
use ferry_adapters::{supervise, CommitRequest, Source, SourceContext, SourceError};
use ferry_protocol::messages::Record;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Durable {
    records: Vec<Record>,
    position: Option<Vec<u8>>,
    commits: u64,
    /// Answer this many more commits carrying records, then crash.
    crash_after: Option<u64>,
    /// `SourceContext::spool_dir` of the sources started.
    spool_dir: Option<std::path::PathBuf>,
}

#[derive(Clone, Default)]
pub struct Store {
    durable: Arc<Mutex<Durable>>,
}

pub struct Running {
    shutdown: CancellationToken,
    source: JoinHandle<Result<(), SourceError>>,
    committer: JoinHandle<()>,
}

impl Store {
    pub fn new() -> Self {
        Store::default()
    }

    /// Where sources started from now on spool transactions in progress.
    pub fn spool_in(&self, dir: std::path::PathBuf) {
        self.durable.lock().unwrap().spool_dir = Some(dir);
    }

    /// Runs a postgres source with the stored position as its resume point.
    pub fn start(&self, cfg: &PostgresConfig) -> Running {
        self.start_source(Box::new(PostgresSource::new(cfg.clone())))
    }

    pub fn start_source(&self, source: Box<dyn Source>) -> Running {
        let (tx, mut rx) = mpsc::channel::<CommitRequest>(4);
        let shutdown = CancellationToken::new();
        let (_acked_tx, acked) = watch::channel(0);
        // Each instance resumes from what is durable now.
        let context = {
            let durable = Arc::clone(&self.durable);
            let shutdown = shutdown.clone();
            move || {
                let d = durable.lock().unwrap();
                let mut ctx = SourceContext::new(
                    0,
                    "test".into(),
                    d.position.clone(),
                    d.records.len() as u64,
                    acked.clone(),
                    shutdown.clone(),
                    tx.clone(),
                );
                ctx.spool_dir = d.spool_dir.clone();
                Ok(ctx)
            }
        };
        let durable = Arc::clone(&self.durable);
        let stop = shutdown.clone();
        let committer = tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.recv() => match r { Some(r) => r, None => return },
                };
                let mut d = durable.lock().unwrap();
                if !req.records.is_empty() {
                    if d.crash_after == Some(0) {
                        // Crash before this commit was durable.
                        d.crash_after = None;
                        stop.cancel();
                        return;
                    }
                    if let Some(n) = d.crash_after.as_mut() {
                        *n -= 1;
                    }
                }
                let first = d.records.len() as u64 + 1;
                let records = req.records.into_list().unwrap();
                // What the agent's buffer could not take, the test refuses too.
                let raw = prost::Message::encoded_len(&ferry_protocol::messages::RecordList {
                    records: records.clone(),
                });
                assert!(
                    raw <= ferry_protocol::batch::MAX_RAW_BATCH,
                    "a commit of {raw} bytes, over the batch limit"
                );
                let n = records.len() as u64;
                d.records.extend(records);
                d.position = Some(req.position);
                d.commits += 1;
                drop(d);
                let answer = (n > 0).then_some(ferry_adapters::Committed {
                    first_seq: first,
                    last_seq: first + n - 1,
                });
                let _ = req.done.send(Ok(answer));
            }
        });
        let stop = shutdown.clone();
        let source = tokio::spawn(async move {
            supervise(&*source, context, &stop, |e| {
                // Shown with --nocapture: why a source was restarted.
                if let ferry_adapters::Event::Failed { error, .. } = e {
                    eprintln!("source failed (restarting): {error}");
                }
            })
            .await
            .into_result()
        });
        Running {
            shutdown,
            source,
            committer,
        }
    }

    pub fn records(&self) -> Vec<Record> {
        self.durable.lock().unwrap().records.clone()
    }

    /// Whether a stored record (newest first) satisfies `f`, without copying.
    pub fn any_record(&self, f: impl Fn(&Record) -> bool) -> bool {
        self.durable.lock().unwrap().records.iter().rev().any(f)
    }

    pub fn count(&self) -> usize {
        self.durable.lock().unwrap().records.len()
    }

    pub fn commits(&self) -> u64 {
        self.durable.lock().unwrap().commits
    }

    pub fn position(&self) -> Option<serde_json::Value> {
        let d = self.durable.lock().unwrap();
        d.position
            .as_ref()
            .map(|p| serde_json::from_slice(p).unwrap())
    }

    pub fn raw_position(&self) -> Option<Vec<u8>> {
        self.durable.lock().unwrap().position.clone()
    }

    /// `phase` of the stored position.
    pub fn phase(&self) -> Option<String> {
        self.position()
            .and_then(|p| p["phase"].as_str().map(str::to_string))
    }

    /// The slot LSN the stored position stands for: the streaming `lsn`, or the
    /// snapshot's consistent point (the slot may not move past it yet).
    pub fn durable_lsn(&self) -> Option<u64> {
        let p = self.position()?;
        let s = p["lsn"].as_str().or(p["consistent_lsn"].as_str())?;
        ferry_tests::pg::parse_lsn(s)
    }

    /// The next `n` commits with records are durable; the one after crashes.
    pub fn crash_after(&self, n: u64) {
        self.durable.lock().unwrap().crash_after = Some(n);
    }
}

impl Running {
    /// Polls `cond` until it holds; fails after `secs` or if the source ended.
    pub async fn wait_for(&mut self, what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if cond() {
                return;
            }
            if self.source.is_finished() {
                let r = (&mut self.source).await;
                panic!("source ended while waiting for {what}: {r:?}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Like [`Self::wait_for`] for an async condition.
    pub async fn wait_until<F, Fut>(&mut self, what: &str, secs: u64, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if cond().await {
                return;
            }
            if self.source.is_finished() {
                let r = (&mut self.source).await;
                panic!("source ended while waiting for {what}: {r:?}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The source ended on its own (a crash the committer staged, or an error).
    pub fn is_finished(&self) -> bool {
        self.source.is_finished()
    }

    /// Waits for the source to end on its own and returns how.
    pub async fn ended(self, secs: u64) -> Result<(), SourceError> {
        let r = tokio::time::timeout(Duration::from_secs(secs), self.source)
            .await
            .expect("the source did not end")
            .unwrap();
        self.shutdown.cancel();
        self.committer.await.unwrap();
        r
    }

    /// Cancels the source (a shutdown or crash) and returns how it ended.
    pub async fn stop(self) -> Result<(), SourceError> {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(30), self.source)
            .await
            .expect("the source did not stop")
            .unwrap();
        self.committer.await.unwrap();
        r
    }
}
