//! Ferry's sources. Every adapter implements [`Source`]: it watches something
//! local, turns what it sees into [`Record`]s with a source position, and hands them
//! to [`SourceContext::commit`], which returns only once the records **and** the
//! position are durable in the agent's buffer (DESIGN invariant 1). A source never
//! advances past what `commit` confirmed, so after a crash it resumes from
//! [`SourceContext::resume`] without loss and without replaying what is buffered.
//!
//! Architecture invariant: adapters know nothing of sled, QUIC or the exchange.
//! They see a bounded channel (`commit` waits while the buffer is full: that is the
//! backpressure of invariant 4) and a watermark of acknowledged seqs.
//!
//! Each kind of source is a folder here implementing the traits of [`kind`]
//! ([`SourceKind`], [`KindConfig`]) and registered by one line in `kind.rs`; the
//! agent runs every source through [`supervise`] (restart with [`Backoff`] after a
//! retryable error, stop with an alarm after a fatal one). A source's errors say
//! which they are: [`SourceError::is_fatal`].

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_protocol::messages::Record;
use ferry_protocol::record_buf::RecordBuf;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

mod backoff;
pub mod directory;
pub mod kind;
pub mod mysql;
pub mod postgres;
pub mod supervise;
pub mod tail;
mod units;

pub use backoff::Backoff;
pub use kind::{
    all_gauges, DoctorCheck, DoctorFuture, GaugeDef, Gauges, KindConfig, SourceConfig, SourceKind,
    KINDS,
};
pub use supervise::{supervise, Ended, Event};
pub use units::{human_bytes, parse_duration, parse_size, Duration, Size};

/// Records seqs `first ..= last` were given when they became durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The records of one commit: as values, or already encoded into a
/// [`RecordBuf`] (sources of many small records: no allocation per record).
#[derive(Debug)]
pub enum Records {
    List(Vec<Record>),
    Encoded(RecordBuf),
}

impl Records {
    pub fn is_empty(&self) -> bool {
        match self {
            Records::List(l) => l.is_empty(),
            Records::Encoded(b) => b.is_empty(),
        }
    }

    pub fn count(&self) -> usize {
        match self {
            Records::List(l) => l.len(),
            Records::Encoded(b) => b.count() as usize,
        }
    }

    /// The records as values (decoding what was encoded).
    pub fn into_list(self) -> Result<Vec<Record>, String> {
        match self {
            Records::List(l) => Ok(l),
            Records::Encoded(b) => {
                <ferry_protocol::messages::RecordList as prost::Message>::decode(b.as_bytes())
                    .map(|l| l.records)
                    .map_err(|e| format!("encoded records do not decode: {e}"))
            }
        }
    }
}

impl From<Vec<Record>> for Records {
    fn from(l: Vec<Record>) -> Records {
        Records::List(l)
    }
}

impl From<RecordBuf> for Records {
    fn from(b: RecordBuf) -> Records {
        Records::Encoded(b)
    }
}

/// One atomic unit for the buffer: records plus the source position after them.
/// `records` may be empty to move the position alone.
#[derive(Debug)]
pub struct CommitRequest {
    pub stream: usize,
    /// Which running instance of the source sent this (see [`SourceContext::epoch`]).
    /// When a commit of a stream fails, the buffer refuses every later request of
    /// that stream with the same or an older epoch: a source with several commits
    /// in flight must never see a later one become durable after an earlier one was
    /// lost, or its position would skip the lost records.
    pub epoch: u64,
    pub records: Records,
    pub position: Vec<u8>,
    /// Answered once durable: `Ok(None)` when `records` was empty.
    pub done: oneshot::Sender<Result<Option<Committed>, String>>,
    /// Held until the request is dropped by whoever handles it; see
    /// [`SourceContext::tracker`].
    pub ticket: Ticket,
}

/// Counts a source's commits not yet answered, and those that became durable.
#[derive(Debug, Default)]
struct Outstanding {
    n: std::sync::atomic::AtomicUsize,
    zero: tokio::sync::Notify,
    durable: AtomicU64,
}

/// One outstanding commit; dropping it (after the answer) counts it as settled.
#[derive(Debug)]
pub struct Ticket(std::sync::Arc<Outstanding>);

impl Ticket {
    /// A ticket tracked by nobody, for requests built outside a [`SourceContext`].
    pub fn untracked() -> Self {
        Ticket(std::sync::Arc::default())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// Tells when every commit a source submitted has been answered (durable or
/// refused). The agent waits for it before restarting a failed source: the new
/// instance reads its resume position from the buffer, which must already include
/// everything the old instance handed over, or it would read those records again.
#[derive(Debug, Clone)]
pub struct CommitTracker(std::sync::Arc<Outstanding>);

impl CommitTracker {
    pub async fn settled(&self) {
        loop {
            let notified = self.0.zero.notified();
            if self.0.n.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// How many of the source's commits became durable (the source made
    /// progress: [`supervise`] counts it as healthy).
    pub fn durable_commits(&self) -> u64 {
        self.0.durable.load(Ordering::Acquire)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's buffer failed: {0}")]
    Buffer(String),
    /// Anything else a new instance of the source may get past (a server
    /// restarting, a file briefly gone): the source is restarted with backoff.
    #[error("{0}")]
    Other(String),
    /// Starting the source again cannot help: the configuration or what the source
    /// reads must change first (a table that does not exist, a replication slot
    /// that was dropped). The message names the cause and the fix. The agent stops
    /// the stream with an alarm instead of restarting it.
    #[error("{0}")]
    Fatal(String),
    /// Shutdown was requested; not an error for the operator.
    #[error("shutting down")]
    Shutdown,
}

impl SourceError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        SourceError::Io {
            what: what.into(),
            source,
        }
    }

    /// Whether restarting the source cannot help (see [`SourceError::Fatal`]).
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::Fatal(_))
    }
}

/// Files the exchange received but whose bytes did not match their SHA-256: it
/// said so in the ack, and the agent recorded it durably before the ack moved
/// the watermark. A source that sends files must send such a file again whole,
/// never treat it as delivered.
pub trait RejectedFiles: Send + Sync {
    /// Whether the exchange rejected `file_id` of `stream`.
    fn is_rejected(&self, stream: &str, file_id: &str) -> bool;
    /// The source dealt with it (its position no longer lists the file).
    fn forget(&self, stream: &str, file_id: &str);
}

/// Source instances are numbered from one process-wide counter, so a restarted
/// source always has a higher epoch than the instance it replaces.
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

/// Everything a running source may touch.
pub struct SourceContext {
    /// Index of the stream in the agent's configuration.
    pub stream: usize,
    /// Stream name, for logs.
    pub name: String,
    /// The last durable position this source committed, if any.
    pub resume: Option<Vec<u8>>,
    /// Highest seq durable in the buffer when the source started.
    pub head_at_start: u64,
    /// Every seq `<=` this value has been acknowledged by the exchange.
    pub acked: watch::Receiver<u64>,
    pub shutdown: CancellationToken,
    /// Where a source may keep scratch files it does not need after a restart
    /// (PostgreSQL: transactions still in progress); `None`: the system's
    /// temporary directory.
    pub spool_dir: Option<std::path::PathBuf>,
    /// Passes through a named crash or error window (the agent's test builds arm
    /// them; see ARCHITECTURE.md): adapters know no failpoint machinery, the
    /// agent hands its hook in. A no-op unless set.
    pub failpoint: fn(&str) -> std::io::Result<()>,
    /// Files the exchange rejected (see [`RejectedFiles`]); `None`: none ever are.
    pub rejected_files: Option<std::sync::Arc<dyn RejectedFiles>>,
    epoch: u64,
    outstanding: std::sync::Arc<Outstanding>,
    commits: mpsc::Sender<CommitRequest>,
}

impl SourceContext {
    pub fn new(
        stream: usize,
        name: String,
        resume: Option<Vec<u8>>,
        head_at_start: u64,
        acked: watch::Receiver<u64>,
        shutdown: CancellationToken,
        commits: mpsc::Sender<CommitRequest>,
    ) -> Self {
        Self {
            stream,
            name,
            resume,
            head_at_start,
            acked,
            shutdown,
            spool_dir: None,
            failpoint: |_| Ok(()),
            rejected_files: None,
            epoch: NEXT_EPOCH.fetch_add(1, Ordering::Relaxed),
            outstanding: std::sync::Arc::default(),
            commits,
        }
    }

    /// Whether the exchange rejected this stream's file `file_id`.
    pub fn file_rejected(&self, file_id: &str) -> bool {
        self.rejected_files
            .as_ref()
            .is_some_and(|r| r.is_rejected(&self.name, file_id))
    }

    /// Forgets a rejection once the source's durable position no longer needs it.
    pub fn forget_rejected(&self, file_id: &str) {
        if let Some(r) = &self.rejected_files {
            r.forget(&self.name, file_id);
        }
    }

    /// Watches this source's commits in flight, also after the source ended.
    pub fn tracker(&self) -> CommitTracker {
        CommitTracker(std::sync::Arc::clone(&self.outstanding))
    }

    /// This instance's number; see [`CommitRequest::epoch`].
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Hands records and the position after them to the buffer and waits until both
    /// are durable. Waits (backpressure) while the buffer is full.
    pub async fn commit(
        &self,
        records: impl Into<Records>,
        position: Vec<u8>,
    ) -> Result<Option<Committed>, SourceError> {
        self.submit(records, position).await?.durable().await
    }

    /// Hands records and the position after them to the buffer without waiting for
    /// durability. Commits of one source become durable in the order they were
    /// submitted, and if one fails every later one fails too, so a source may keep
    /// several in flight (see [`Inflight`]) as long as it treats a position as
    /// durable only once its [`PendingCommit`] resolved. Waits (backpressure) while
    /// the buffer is full.
    pub async fn submit(
        &self,
        records: impl Into<Records>,
        position: Vec<u8>,
    ) -> Result<PendingCommit, SourceError> {
        let records = records.into();
        let (done, rx) = oneshot::channel();
        self.outstanding.n.fetch_add(1, Ordering::AcqRel);
        let req = CommitRequest {
            stream: self.stream,
            epoch: self.epoch,
            records,
            position,
            done,
            ticket: Ticket(std::sync::Arc::clone(&self.outstanding)),
        };
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Err(SourceError::Shutdown),
            r = self.commits.send(req) => r.map_err(|_| SourceError::Shutdown)?,
        }
        Ok(PendingCommit {
            rx,
            outstanding: std::sync::Arc::clone(&self.outstanding),
        })
    }

    /// Waits until the exchange acknowledged every seq `<= seq`.
    pub async fn wait_acked(&mut self, seq: u64) -> Result<(), SourceError> {
        let shutdown = self.shutdown.clone();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => Err(SourceError::Shutdown),
            r = self.acked.wait_for(|&a| a >= seq) => r.map(|_| ()).map_err(|_| SourceError::Shutdown),
        }
    }
}

/// A commit handed to the buffer whose durability is not known yet.
#[must_use = "a position is durable only once its commit resolved"]
pub struct PendingCommit {
    rx: oneshot::Receiver<Result<Option<Committed>, String>>,
    outstanding: std::sync::Arc<Outstanding>,
}

impl PendingCommit {
    /// Waits until the commit is durable. Once handed over, a commit completes even
    /// during shutdown: waiting for it keeps the in-memory position equal to what
    /// is durable.
    pub async fn durable(self) -> Result<Option<Committed>, SourceError> {
        match self.rx.await {
            Ok(Ok(c)) => {
                self.outstanding.durable.fetch_add(1, Ordering::AcqRel);
                Ok(c)
            }
            Ok(Err(e)) => Err(SourceError::Buffer(e)),
            Err(_) => Err(SourceError::Shutdown),
        }
    }
}

/// A bounded queue of a source's commits in flight, oldest first, each with what
/// the source needs to know once it is durable (`T`: a position, a file, `()`).
///
/// One commit at a time makes a source wait a whole fsync round trip per batch, so
/// one stream can never go faster than one batch per sync; a few in flight let the
/// committer fold consecutive batches of the same stream into one group commit
/// while the source reads on. Durability still arrives in order, so "durable up to
/// here" stays a prefix of what was read (DESIGN invariant 1).
pub struct Inflight<T> {
    queue: VecDeque<(PendingCommit, T)>,
    depth: usize,
}

impl<T> Inflight<T> {
    /// At most `depth` (at least 1) commits in flight.
    pub fn new(depth: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            depth: depth.max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Submits a commit; when more than `depth` are in flight, waits for the oldest
    /// ones. Returns the commits now known durable, oldest first.
    pub async fn push(
        &mut self,
        ctx: &SourceContext,
        records: impl Into<Records>,
        position: Vec<u8>,
        tag: T,
    ) -> Result<Vec<(Option<Committed>, T)>, SourceError> {
        let pending = ctx.submit(records, position).await?;
        self.queue.push_back((pending, tag));
        let mut done = Vec::new();
        while self.queue.len() > self.depth {
            done.push(self.pop().await?);
        }
        Ok(done)
    }

    /// Waits for every commit in flight; returns them oldest first. On an error the
    /// commits after the failed one are dropped unanswered: the buffer refuses them
    /// anyway (see [`CommitRequest::epoch`]).
    pub async fn drain(&mut self) -> Result<Vec<(Option<Committed>, T)>, SourceError> {
        let mut done = Vec::with_capacity(self.queue.len());
        while !self.queue.is_empty() {
            done.push(self.pop().await?);
        }
        Ok(done)
    }

    async fn pop(&mut self) -> Result<(Option<Committed>, T), SourceError> {
        match self.queue.pop_front() {
            Some((pending, tag)) => {
                let r = pending.durable().await;
                if r.is_err() {
                    self.queue.clear();
                }
                Ok((r?, tag))
            }
            None => Err(SourceError::Other("no commit in flight".into())),
        }
    }
}

pub type SourceFuture = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;

/// A source, built once from its configuration ([`KindConfig::build`]) and run
/// by [`supervise`] once per instance.
///
/// Contract: [`Self::run`] starts one instance, which resumes at
/// [`SourceContext::resume`] (the last durable position) and runs until shutdown
/// (returning `Err(SourceError::Shutdown)` or `Ok(())`) or an error. An error ends
/// the instance; it is either retryable (any variant but
/// [`SourceError::Fatal`]: the supervisor runs a new instance after a backoff, with
/// a fresh context) or fatal (the source is not run again until the agent
/// restarts). A source keeps no retry loop of its own; trouble it can wait out
/// without losing its place (a file briefly missing between two polls) it may
/// still wait out inside. State that must outlive an instance (PostgreSQL: whether
/// to receive transactions in progress) lives in the value behind `&self`.
pub trait Source: Send + Sync {
    fn run(&self, ctx: SourceContext) -> SourceFuture;
}

/// Milliseconds since the Unix epoch, for `Record::time_unix_ms`.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
