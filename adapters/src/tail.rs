//! The `tail` source: follows one growing text file, through rotations, and ships
//! each line as one record.
//!
//! # Records
//!
//! A line, without its `\n` and without a trailing `\r`, transcoded to UTF-8 (`gbk`,
//! `gb18030`; in `utf-8` mode invalid bytes pass through untouched), is one record
//! `Line(bytes)` whose position reads `ino=<ino> off=<offset of the line's first
//! byte>`. A line longer than `max_line` bytes is shipped as several pieces (never
//! dropped), cut on a character boundary where the encoding allows. A last line
//! without `\n` waits for its newline, except in a file that was rotated away and is
//! fully drained: there it is shipped as it is.
//!
//! # Position
//!
//! The committed position is JSON:
//!
//! ```json
//! { "dev": 2049, "ino": 1315, "fp": "9f86d08…(64 hex)", "fp_len": 256, "offset": 81920,
//!   "name": "app.log.1", "mtime_ns": 1765000000123456789 }
//! ```
//!
//! `dev`/`ino` identify the file being read, `offset` is the byte after the last
//! newline already durable, and `fp` is the hex SHA-256 of the file's first `fp_len`
//! bytes (`fp_len = min(size, 256)`, grown as the file grows). `name` (relative to
//! the folder of `path`, as when the source opened the file) and `mtime_ns` (the
//! file's modification time when those bytes were read) only serve when the file
//! is gone at the next start: the alarm names it, and the rotated copies at least
//! that new are read. Positions without them (older agents) still resume.
//!
//! # Rotated copies
//!
//! `rotated` is a glob of the rotated copies' names beside the file (default: the
//! file's name, `.` or `-`, a digit, anything: `app.log.1`, `app.log-20261206`,
//! `app.log.2.gz`). They are ordered by modification time, ties broken by the
//! rotation order their names tell (`tail/chain.rs`). The *chain* after a file is
//! the copies newer than it, then the file at `path`. Known limit: a copy written
//! again after newer copies exist (a writer that never reopened the path) sorts
//! as the newest; within one run it is not read again, after a restart it can be.
//!
//! # Invariants
//!
//! 1. Lines and the offset after them are committed together, so a restart continues
//!    at the first line not yet durable: no line is lost or sent twice.
//! 2. An offset is only ever applied to the file it was measured in: same dev and ino
//!    *and* same fingerprint. A reused inode, a copy-truncated file (shorter than the
//!    offset, or whose first bytes changed) or a rewritten file starts again at 0.
//! 3. Rotation by rename: once the path names another file, the old one is read to
//!    its end (a last partial line included), then every plain copy of its chain,
//!    oldest first, each from 0 to its end, then the file at the path. Moving to the
//!    next file commits its position at 0, so a restart follows the same chain: the
//!    stored file is found at the path or among the rotated copies (by dev, ino and
//!    fingerprint), drained, and its chain follows. However often the file rotated
//!    while the agent was down or the source lagged, no copy is skipped, and a file
//!    read whole in this run is not read again.
//! 4. Lines the source cannot ship are never skipped silently: if the stored file is
//!    gone, or a compressed copy (`.gz`, `.xz`, `.bz2`, `.zst`, or compressed data
//!    under another name) sits in the chain, the source logs an `ALARM` naming the
//!    files, commits the position of the next readable file, and ends with that
//!    (retryable) error, which the agent shows in `status` and metrics until the
//!    next instance, started after the backoff, goes on from there. A compressed
//!    copy of a file already read whole (logrotate's `compress` right after the
//!    rotation: the copy keeps the original's modification time) is no loss and
//!    raises nothing.
//! 5. Filesystem events only hasten the next look; a poll every `poll_interval` is
//!    what guarantees progress (inotify is blind on NFS/CIFS).

use std::path::PathBuf;

use serde::Deserialize;
use tracing::Instrument;

use crate::{Duration, KindConfig, Size, Source, SourceContext, SourceFuture, SourceKind};

mod chain;
mod file;
mod follow;
mod lines;
mod position;
#[cfg(test)]
mod tests;
mod walk;

/// Largest `max_line`: a line grows up to 1.5× when transcoded from GBK and must still
/// fit one protocol batch next to others.
pub const MAX_LINE_LIMIT: u64 = 2 << 20;
/// Largest `max_batch_bytes`, for the same reason.
pub const MAX_BATCH_BYTES_LIMIT: u64 = 4 << 20;
/// Largest `max_batch_lines`.
pub const MAX_BATCH_LINES_LIMIT: usize = 100_000;

/// `source = { kind = "tail", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TailConfig {
    /// The file to follow (its directory is searched for rotated copies).
    pub path: PathBuf,
    #[serde(default)]
    pub encoding: Encoding,
    /// Where to begin when there is no stored position.
    #[serde(default)]
    pub start_at: StartAt,
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// Longer lines are shipped in pieces of this many bytes (counted before
    /// transcoding, `\r` included).
    #[serde(default = "default_max_line")]
    pub max_line: Size,
    #[serde(default = "default_max_batch_lines")]
    pub max_batch_lines: usize,
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: Size,
    /// Glob of the rotated copies' names, relative to the file's folder (a folder
    /// part without wildcards is allowed: logrotate's `olddir`, same file system).
    /// `None`: the file's name, `.` or `-`, a digit, anything (`app.log.1`,
    /// `app.log.2.gz`, `app.log-20261206`).
    #[serde(default)]
    pub rotated: Option<String>,
}

/// The file's character encoding; records are always UTF-8.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum Encoding {
    #[default]
    #[serde(rename = "utf-8", alias = "utf8")]
    Utf8,
    #[serde(rename = "gbk")]
    Gbk,
    #[serde(rename = "gb18030")]
    Gb18030,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    /// Ship the whole file.
    #[default]
    Beginning,
    /// Skip what the file holds when the source first starts (a file that appears
    /// later is read from its start).
    End,
}

fn default_poll_interval() -> Duration {
    Duration(std::time::Duration::from_millis(250))
}
fn default_max_line() -> Size {
    Size(1 << 20)
}
fn default_max_batch_lines() -> usize {
    4000
}
fn default_max_batch_bytes() -> Size {
    Size(1 << 20)
}

impl TailConfig {
    /// A config with every optional key at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TailConfig {
            path: path.into(),
            encoding: Encoding::default(),
            start_at: StartAt::default(),
            poll_interval: default_poll_interval(),
            max_line: default_max_line(),
            max_batch_lines: default_max_batch_lines(),
            max_batch_bytes: default_max_batch_bytes(),
            rotated: None,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let p = self.path.display();
        if self.path.file_name().is_none() {
            return Err(format!("source.path: {p} does not name a file"));
        }
        if self.path.is_dir() {
            return Err(format!(
                "source.path: {p} is a directory; tail follows one file"
            ));
        }
        if self.poll_interval.0.is_zero() {
            return Err("source.poll_interval: must be greater than zero".to_string());
        }
        if !(4..=MAX_LINE_LIMIT).contains(&self.max_line.0) {
            return Err(format!(
                "source.max_line: must be between 4 B and 2 MiB, got {} bytes",
                self.max_line.0
            ));
        }
        if !(1..=MAX_BATCH_LINES_LIMIT).contains(&self.max_batch_lines) {
            return Err(format!(
                "source.max_batch_lines: must be between 1 and {MAX_BATCH_LINES_LIMIT}, got {}",
                self.max_batch_lines
            ));
        }
        if !(1..=MAX_BATCH_BYTES_LIMIT).contains(&self.max_batch_bytes.0) {
            return Err(format!(
                "source.max_batch_bytes: must be between 1 B and 4 MiB, got {} bytes",
                self.max_batch_bytes.0
            ));
        }
        chain::Siblings::new(&self.path, self.rotated.as_deref())?;
        Ok(())
    }
}

/// The running tail source; see the module doc.
pub struct TailSource {
    config: TailConfig,
}

impl TailSource {
    pub fn new(config: TailConfig) -> Self {
        Self { config }
    }
}

impl Source for TailSource {
    fn run(&self, ctx: SourceContext) -> SourceFuture {
        let span = tracing::info_span!("source", stream = %ctx.name, kind = "tail", path = %self.config.path.display());
        Box::pin(follow::run(self.config.clone(), ctx).instrument(span))
    }
}

/// One line for `status`: `ino=<ino> off=<offset>`.
pub fn describe_position(position: &[u8]) -> String {
    position::describe(position)
}

/// The `tail` kind (registered in `kind.rs`).
pub struct Tail;

impl SourceKind for Tail {
    fn name(&self) -> &'static str {
        "tail"
    }

    fn describe_position(&self, position: &[u8]) -> String {
        describe_position(position)
    }
}

impl KindConfig for TailConfig {
    fn kind(&self) -> &'static dyn SourceKind {
        &Tail
    }

    fn validate(&self) -> Result<(), String> {
        TailConfig::validate(self)
    }

    fn build(&self) -> Box<dyn Source> {
        Box::new(TailSource::new(self.clone()))
    }
}
