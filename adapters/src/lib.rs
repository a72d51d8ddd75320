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
//! Adding a source: a module here, a variant in [`SourceConfig`], one arm in
//! [`SourceConfig::build`].

use std::future::Future;
use std::pin::Pin;

use ferry_protocol::messages::Record;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub mod directory;
pub mod postgres;
pub mod tail;
mod units;

pub use units::{parse_duration, parse_size, Duration, Size};

/// Records seqs `first ..= last` were given when they became durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub first_seq: u64,
    pub last_seq: u64,
}

/// One atomic unit for the buffer: records plus the source position after them.
/// `records` may be empty to move the position alone.
#[derive(Debug)]
pub struct CommitRequest {
    pub stream: usize,
    pub records: Vec<Record>,
    pub position: Vec<u8>,
    /// Answered once durable: `Ok(None)` when `records` was empty.
    pub done: oneshot::Sender<Result<Option<Committed>, String>>,
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
    #[error("{0}")]
    Other(String),
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
}

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
            commits,
        }
    }

    /// Hands records and the position after them to the buffer and waits until both
    /// are durable. Waits (backpressure) while the buffer is full.
    pub async fn commit(
        &self,
        records: Vec<Record>,
        position: Vec<u8>,
    ) -> Result<Option<Committed>, SourceError> {
        let (done, rx) = oneshot::channel();
        let req = CommitRequest {
            stream: self.stream,
            records,
            position,
            done,
        };
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Err(SourceError::Shutdown),
            r = self.commits.send(req) => r.map_err(|_| SourceError::Shutdown)?,
        }
        // Once handed over, the commit completes even during shutdown: wait for it so
        // the in-memory position matches what is durable.
        match rx.await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(SourceError::Buffer(e)),
            Err(_) => Err(SourceError::Shutdown),
        }
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

pub type SourceFuture = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;

/// A running adapter.
pub trait Source: Send {
    /// Runs until shutdown (returning `Err(SourceError::Shutdown)` or `Ok(())`) or a
    /// fatal error. Transient trouble (a file briefly missing) is logged and retried
    /// inside the source, not returned.
    fn run(self: Box<Self>, ctx: SourceContext) -> SourceFuture;
}

/// The `source = { kind = ..., ... }` table of a `[[stream]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    Directory(directory::DirectoryConfig),
    Tail(tail::TailConfig),
    Postgres(postgres::PostgresConfig),
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Directory(_) => "directory",
            SourceConfig::Tail(_) => "tail",
            SourceConfig::Postgres(_) => "postgres",
        }
    }

    /// Checks what can be checked without running (paths, patterns). The message
    /// names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            SourceConfig::Directory(c) => c.validate(),
            SourceConfig::Tail(c) => c.validate(),
            SourceConfig::Postgres(c) => c.validate(),
        }
    }

    /// Checks what this host must provide (folders that must exist). Kept apart from
    /// [`Self::validate`] so a configuration can be checked on another machine.
    pub fn check_environment(&self) -> Result<(), String> {
        match self {
            SourceConfig::Directory(c) => c.check_environment(),
            SourceConfig::Tail(_) => Ok(()),
            SourceConfig::Postgres(c) => c.check_environment(),
        }
    }

    pub fn build(&self) -> Box<dyn Source> {
        match self {
            SourceConfig::Directory(c) => Box::new(directory::DirectorySource::new(c.clone())),
            SourceConfig::Tail(c) => Box::new(tail::TailSource::new(c.clone())),
            SourceConfig::Postgres(c) => Box::new(postgres::PostgresSource::new(c.clone())),
        }
    }

    /// A one-line, human-readable rendering of a stored position, for `status`.
    pub fn describe_position(&self, position: &[u8]) -> String {
        match self {
            SourceConfig::Directory(_) => directory::describe_position(position),
            SourceConfig::Tail(_) => tail::describe_position(position),
            SourceConfig::Postgres(_) => postgres::describe_position(position),
        }
    }
}

/// Milliseconds since the Unix epoch, for `Record::time_unix_ms`.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
