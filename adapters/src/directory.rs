//! The `directory` source: an outbox folder whose complete files are shipped whole,
//! chunk by chunk, then moved to `sent_dir` or deleted once the exchange acknowledged
//! them.
//!
//! # Records
//!
//! Each chunk is one commit holding one record: `FileChunk { file_id, path, offset,
//! data, end }`, `path` being the file name relative to the folder and `file_id` 16
//! random hex digits for this transfer. The last chunk carries `end = FileEnd { size,
//! sha256 }` (the raw 32-byte digest of the whole file); a 0-byte file is a single
//! chunk with empty data and `end` set. A transfer that cannot finish (the file changed
//! or vanished) ends with a `FileAbort { file_id, path, reason }` record; the file is
//! then sent again, whole, under a new id once it is complete again.
//!
//! # What is taken
//!
//! Only regular files. An entry whose name matches but that is a symlink, a FIFO, a
//! socket, a device or a directory is refused: a symlink would let anyone who can
//! write the outbox ship any file the agent can read (its private key), a FIFO would
//! block the read. The scan judges entries without following links (lstat), and the
//! file is opened with `O_NOFOLLOW | O_NONBLOCK` and checked again on the open
//! descriptor (fstat), so an entry swapped between scan and open is refused too.
//! A refused entry is left where it is, never moved or deleted, and logged once
//! (again only if it goes away and comes back). The sent dir inside the outbox is
//! skipped silently.
//!
//! # Position
//!
//! The committed position is JSON:
//!
//! ```json
//! {
//!   "current": { "file_id": "1a2b3c4d5e6f7081", "name": "report.xml",
//!                "dev": 2049, "ino": 131, "size": 10485760,
//!                "mtime_ns": 1767225600123456789, "offset": 3145728, "seq": 4711 },
//!   "awaiting": [ { "file_id": "…", "name": "…", "dev": 2049, "ino": 130,
//!                   "size": 42, "mtime_ns": 1767225599000000000, "seq": 4707 } ]
//! }
//! ```
//!
//! `current` is the file being sent (`null` when idle): every byte below `offset` is
//! durable in the buffer as chunks of `file_id`, the last of them at `seq`.
//! `awaiting` lists files whose last chunk is durable but not yet acknowledged by
//! the exchange, each with the seq of that last chunk (the one carrying `FileEnd`).
//! Positions of versions that did not record seqs have no `seq` fields and are still
//! read (see invariant 4).
//!
//! # Seqs in the position
//!
//! `SourceContext::commit` tells the seqs of a commit only once it is durable, that
//! is after the position that goes with it was written. Writing a file's last seq
//! into the *next* position would leave, after a crash between the two, a listed file
//! whose seq is unknown, and guessing it from `head_at_start` is exactly what goes
//! wrong when a buffer's sync fails: the sled write holding the records and position
//! may be applied while the agent's head stays at the last synced seq, so a restarted
//! source reads a position naming a file whose `FileEnd` is above the head it was
//! given, and an acked watermark at that head would let the file go although its end
//! was never durable (nor shipped). So the source predicts the seqs instead: it is
//! its stream's only writer, seqs are dense per stream, and commits become durable
//! in submission order, so the k-th record it submits gets `head_at_start + k`. The
//! prediction goes into the position of the very commit it is about, and every
//! answer is checked against it: a mismatch fails the source (after putting the real
//! seq of a last chunk on record), whose restart counts again from the buffer's head.
//!
//! # Invariants
//!
//! 1. `current.offset` and `awaiting` only change in the same commit as the records
//!    that justify them, so a crash resumes at the next chunk: no chunk is sent twice
//!    under one id and none is skipped.
//! 2. A resumed transfer continues only if the file still has the recorded dev, ino,
//!    size and mtime, is still a regular file, and its last chunk (`current.seq`) is
//!    not above the buffer's head; its SHA-256 state is rebuilt by re-reading
//!    `[0, offset)`. Otherwise it is aborted (`FileAbort`) and restarted under a new
//!    id.
//! 3. Before every chunk and after reading the last one the file is stat'ed; any
//!    change of size, mtime or inode aborts the transfer: a torn file is never shipped
//!    as complete.
//! 4. A listed (`awaiting`) file is never taken again while listed. It leaves the
//!    outbox (moved or deleted) only once the exchange acknowledged the seq of its
//!    own last chunk, known exactly. An entry resumed with a seq above the buffer's
//!    head (`head_at_start`) never became durable: its transfer is aborted and the
//!    file sent again whole under a new id. An entry without a seq (written by an
//!    older version) is read only when the agent starts on that version's buffer,
//!    whose head and position come from one write, so its last chunk is at most
//!    `head_at_start`: that bound is used, and recorded, as its seq. An entry whose
//!    file is gone or is no longer the same file is dropped from the list without
//!    touching the file.
//! 5. A file's move or deletion is durable before the position without it is
//!    committed: after a rename into the sent dir both directories are fsync'd;
//!    across filesystems the copy is fsync'd and its directory too before the source
//!    is unlinked and the outbox fsync'd. A crash leaves the file in the outbox (sent
//!    again: a duplicate, never a loss) or in the sent dir.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::Instrument;

use crate::{Duration, KindConfig, Size, Source, SourceContext, SourceFuture, SourceKind};

mod fsops;
mod position;
mod runner;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;
pub(crate) mod watch;

/// Largest `chunk_size`: a chunk is one record and must fit a protocol batch with room
/// to spare.
pub const MAX_CHUNK_SIZE: u64 = 4 << 20;

/// `source = { kind = "directory", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// The outbox folder.
    pub path: PathBuf,
    /// Glob on the file name.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    #[serde(default)]
    pub after_send: AfterSend,
    /// Where sent files go with `after_send = "move"`; default `<path>/sent`.
    #[serde(default)]
    pub sent_dir: Option<PathBuf>,
    #[serde(default)]
    pub complete: Complete,
    /// With `complete = "quiet"`: how long size and mtime must stay unchanged.
    #[serde(default = "default_quiet_period")]
    pub quiet_period: Duration,
    /// With `complete = "marker"`: `X` is taken once `X<marker_suffix>` exists.
    #[serde(default = "default_marker_suffix")]
    pub marker_suffix: String,
    #[serde(default = "default_chunk_size")]
    pub chunk_size: Size,
    /// Full rescan period, besides filesystem events (which NFS/CIFS do not deliver).
    #[serde(default = "default_rescan_interval")]
    pub rescan_interval: Duration,
}

/// What happens to a file once the exchange acknowledged it.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AfterSend {
    #[default]
    Move,
    Delete,
}

/// How the source knows that a writer has finished a file.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Complete {
    /// Size and mtime unchanged for `quiet_period`.
    #[default]
    Quiet,
    /// Writers rename finished files into the folder; `.*`, `*.tmp`, `*.part` are
    /// still being written.
    Rename,
    /// A `X<marker_suffix>` file announces that `X` is complete.
    Marker,
}

fn default_pattern() -> String {
    "*".to_string()
}
fn default_quiet_period() -> Duration {
    Duration(std::time::Duration::from_secs(2))
}
fn default_marker_suffix() -> String {
    ".done".to_string()
}
fn default_chunk_size() -> Size {
    Size(1 << 20)
}
fn default_rescan_interval() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}

impl DirectoryConfig {
    /// A config with every optional key at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DirectoryConfig {
            path: path.into(),
            pattern: default_pattern(),
            after_send: AfterSend::default(),
            sent_dir: None,
            complete: Complete::default(),
            quiet_period: default_quiet_period(),
            marker_suffix: default_marker_suffix(),
            chunk_size: default_chunk_size(),
            rescan_interval: default_rescan_interval(),
        }
    }

    /// `sent_dir`, or its default `<path>/sent`.
    pub fn effective_sent_dir(&self) -> PathBuf {
        self.sent_dir
            .clone()
            .unwrap_or_else(|| self.path.join("sent"))
    }

    /// Checks this host: the outbox must exist. Separate from [`Self::validate`] so a
    /// configuration can be checked away from the server it is written for.
    pub fn check_environment(&self) -> Result<(), String> {
        if !self.path.is_dir() {
            return Err(format!(
                "source.path: {} does not exist or is not a directory",
                self.path.display()
            ));
        }
        let sent = self.effective_sent_dir();
        if self.after_send == AfterSend::Move && sent.exists() && !sent.is_dir() {
            return Err(format!(
                "source.sent_dir: {} exists and is not a directory",
                sent.display()
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        glob::Pattern::new(&self.pattern).map_err(|e| {
            format!(
                "source.pattern: {:?} is not a valid glob: {e} (e.g. \"*.xml\")",
                self.pattern
            )
        })?;
        if self.chunk_size.0 == 0 || self.chunk_size.0 > MAX_CHUNK_SIZE {
            return Err(format!(
                "source.chunk_size: must be between 1 B and 4 MiB, got {} bytes",
                self.chunk_size.0
            ));
        }
        if self.rescan_interval.0.is_zero() {
            return Err("source.rescan_interval: must be greater than zero".to_string());
        }
        if self.complete == Complete::Marker
            && (self.marker_suffix.is_empty() || self.marker_suffix.contains('/'))
        {
            return Err(format!(
                "source.marker_suffix: {:?} must be non-empty and contain no '/'",
                self.marker_suffix
            ));
        }
        if self.after_send == AfterSend::Move {
            let sent = self.effective_sent_dir();
            if same_path(&sent, &self.path) {
                return Err(format!(
                    "source.sent_dir: {} is the outbox itself; sent files would be taken again",
                    sent.display()
                ));
            }
        }
        Ok(())
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The running directory source; see the module doc.
pub struct DirectorySource {
    config: DirectoryConfig,
}

impl DirectorySource {
    pub fn new(config: DirectoryConfig) -> Self {
        Self { config }
    }
}

impl Source for DirectorySource {
    fn run(&self, ctx: SourceContext) -> SourceFuture {
        let span = tracing::info_span!("source", stream = %ctx.name, kind = "directory");
        Box::pin(runner::run(self.config.clone(), ctx).instrument(span))
    }
}

/// One line for `status`, e.g. `sending report.xml at 3145728/10485760 (file 1a2b…);
/// 2 files awaiting ack`.
pub fn describe_position(position: &[u8]) -> String {
    position::describe(position)
}

/// The `directory` kind (registered in `kind.rs`).
pub struct Directory;

impl SourceKind for Directory {
    fn name(&self) -> &'static str {
        "directory"
    }

    fn describe_position(&self, position: &[u8]) -> String {
        describe_position(position)
    }
}

impl KindConfig for DirectoryConfig {
    fn kind(&self) -> &'static dyn SourceKind {
        &Directory
    }

    fn validate(&self) -> Result<(), String> {
        DirectoryConfig::validate(self)
    }

    fn check_environment(&self) -> Result<(), String> {
        DirectoryConfig::check_environment(self)
    }

    fn build(&self) -> Box<dyn Source> {
        Box::new(DirectorySource::new(self.clone()))
    }
}
