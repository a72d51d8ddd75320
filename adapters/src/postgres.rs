//! The `postgres` source: captures row changes of chosen tables through PostgreSQL
//! logical replication (a replication slot with the built-in `pgoutput` plugin and
//! a publication), after an optional consistent initial snapshot.
//!
//! # Records
//!
//! The source-neutral envelope of protocol version 4 (`source = "postgres"`):
//!
//! * [`Row`](ferry_protocol::messages::Row) per inserted, updated or deleted row
//!   (and per truncated table, with flags `cascade`/`restart_identity`), values as
//!   PostgreSQL's text output renders them (the walsender's and the snapshot
//!   connection's session settings are the server's defaults for the role, so both
//!   render alike), each with its neutral type. `bytea` travels as bytes; an
//!   unchanged out-of-line (TOAST) value the server did not resend is marked
//!   `Unchanged`. The changes of one transaction are contiguous, share `txn` (the
//!   xid in decimal) and `position` (the commit LSN, 8 bytes big-endian), are
//!   numbered by `change_index`, and the last one has `last_in_txn`. Rolled-back
//!   transactions are never seen (pgoutput protocol v1 sends a transaction only
//!   once it committed).
//! * [`Table`](ferry_protocol::messages::Table) before the first row of each table
//!   and whenever its columns (names, types, key flags, replica identity) change,
//!   right before the first row with the new shape. Key columns are the replica
//!   identity's; under `REPLICA IDENTITY FULL` no column is a key.
//! * Initial-snapshot rows travel in [`Rows`](ferry_protocol::messages::Rows)
//!   blocks: up to `snapshot_chunk_rows` rows (or 4 MiB) of one table per record,
//!   in the COPY text format the server wrote them in. Each row stands for the
//!   `Row` with `snapshot = true`, `op = INSERT` and its values
//!   (`ferry_protocol::copy_text::rows_of`); `ferry-exchange records` prints it as
//!   one.
//!
//! # Position
//!
//! JSON, one of:
//!
//! ```json
//! {"phase":"snapshot","slot":"s","consistent_lsn":"0/1A2B3C8","view_lsn":"0/1A2B3C8",
//!  "tables":["public.person","public.household"],"table":0,"last_key":["12000"],
//!  "rows_done":12000,"rows_estimate":50000,"schemas":{"public.person":"9f86d081884c7d65"},
//!  "retained_wal":1048576}
//! {"phase":"streaming","slot":"s","lsn":"0/1A2B3C8",
//!  "partial":{"commit_lsn":"0/1A2C000","done":20000},"schemas":{...},"retained_wal":1048576}
//! ```
//!
//! `lsn` is the slot LSN up to which every change is durable in the buffer; the
//! slot's `confirmed_flush_lsn` is advanced to it only after the commit that made it
//! durable returned (and never beyond). `partial` names a transaction too big for
//! one commit (more than 10,000 rows or 4 MiB): its first `done` changes are
//! durable. `schemas` holds a fingerprint of the column set last shipped per table.
//!
//! # Invariants
//!
//! 1. Records and the position after them are committed together; the slot is
//!    confirmed only up to a durable position (DESIGN invariant 1).
//! 2. After a crash the slot replays from its confirmed LSN; the source starts at
//!    the stored `lsn`, the server skips transactions committed before it, and of a
//!    `partial` transaction the first `done` changes are skipped: nothing is
//!    duplicated or lost (DESIGN invariant 3).
//! 3. A stored streaming position whose slot is gone (dropped, or a failover to a
//!    standby that lacks it) is refused with an error: the WAL between the stored
//!    LSN and now is gone, and a silent re-snapshot would hide that.
//!
//! # Initial snapshot and its crash semantics
//!
//! With `snapshot = "initial"` and no stored position, the slot is created with an
//! exported snapshot at LSN `L0` (and a first position committed at once, so any
//! later failure resumes as below); every table is copied under that snapshot in key
//! order (primary key, else replica-identity index, else `ctid`) by one streamed
//! `COPY (SELECT ... ORDER BY key) TO STDOUT` per table, committed in pieces of
//! `snapshot_chunk_rows` rows or 4 MiB, each piece one commit whose position
//! records the table and last key. Then streaming starts at `L0`: the copy and the
//! stream meet exactly, nothing missing, nothing twice.
//!
//! The exported snapshot dies with its session, so a crash mid-copy cannot resume
//! under it. The slot, though, was created at `L0` and still retains the WAL from
//! there, so the source keeps it: it copies the rest (from the last key on) under a
//! fresh view `S1` (position field `view_lsn`) and then streams from `L0`. Rows
//! copied before the crash are at their `L0` state and every later change follows
//! in the stream: exact. Rows copied after it are at their `S1` state, and the
//! stream also replays their changes committed between `L0` and `S1`, so such a row
//! may briefly show an older state before the replay catches up to where the copy
//! already was. A consumer that applies by primary key (insert/update = upsert,
//! delete = remove) converges to the table's state; a consumer reading the history
//! must know that rows of a resumed snapshot are "at least as new as" `L0`. Tables
//! without a primary key or replica-identity index are paged by `ctid`, which a
//! fresh view does not keep stable: after a resumed snapshot such a table may have
//! rows twice. Streamed changes themselves are never duplicated.
//!
//! A table added to `tables` after the snapshot began is streamed only: its
//! existing rows are not copied. With `snapshot = "never"` only changes after the
//! slot's creation are captured (an existing slot is used from its confirmed LSN).
//!
//! A heartbeat (`pg_logical_emit_message`, every `heartbeat_interval`) lets an idle
//! database's slot advance; the WAL the slot retains is measured at the same time,
//! warned about above `max_retained_wal`, and shown in the position.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use serde::Deserialize;
use tracing::Instrument;

use crate::{
    DoctorFuture, Duration, GaugeDef, Gauges, KindConfig, Size, Source, SourceContext,
    SourceFuture, SourceKind,
};

mod conn;
mod doctor;
mod position;
mod records;
mod run;
mod snapshot;
mod spool;
mod sql;
mod stream;
#[cfg(test)]
mod tests;

pub use crate::DoctorCheck;
pub use doctor::doctor;

/// Most rows per snapshot chunk a configuration may ask for.
pub const MAX_SNAPSHOT_CHUNK_ROWS: usize = 100_000;

/// `source = { kind = "postgres", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style connection string (`host=... port=... user=... dbname=...`) or
    /// URI; the password is better given by `password_file` or `password_env`.
    pub dsn: String,
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Tables to capture, `schema.table`, as PostgreSQL stores the names.
    pub tables: Vec<String>,
    /// Replication slot name; created by the source when missing.
    pub slot: String,
    /// Publication that contains the tables (created by the DBA).
    pub publication: String,
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Warn when the slot holds more WAL than this on the server.
    #[serde(default = "default_max_retained_wal")]
    pub max_retained_wal: Size,
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval: Duration,
    /// Rate limit of the initial copy.
    pub snapshot_rows_per_second: Option<u64>,
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: usize,
    /// Receive large transactions while they are still in progress (pgoutput
    /// protocol v2 streaming), spooled to local files until they commit, so the
    /// server does not spill them to its own disk.
    #[serde(default = "default_true")]
    pub stream_in_progress: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Copy the tables' current rows first, then stream.
    #[default]
    Initial,
    /// Only stream changes from the moment the slot is created.
    Never,
}

fn default_max_retained_wal() -> Size {
    Size(1 << 30)
}
fn default_heartbeat_interval() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}
/// Rows per snapshot piece: with the 4 MiB cap, pieces of a few megabytes, so a
/// table of small rows is not committed (and synced on both ends) every few
/// hundred kilobytes.
fn default_snapshot_chunk_rows() -> usize {
    50_000
}

impl PostgresConfig {
    /// A config with every optional key at its default.
    pub fn new(
        dsn: impl Into<String>,
        tables: &[&str],
        slot: impl Into<String>,
        publication: impl Into<String>,
    ) -> Self {
        PostgresConfig {
            dsn: dsn.into(),
            password_file: None,
            password_env: None,
            tables: tables.iter().map(|t| t.to_string()).collect(),
            slot: slot.into(),
            publication: publication.into(),
            snapshot: SnapshotMode::default(),
            max_retained_wal: default_max_retained_wal(),
            heartbeat_interval: default_heartbeat_interval(),
            snapshot_rows_per_second: None,
            snapshot_chunk_rows: default_snapshot_chunk_rows(),
            stream_in_progress: true,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        conn::check_dsn(&self.dsn)?;
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(
                "source.password_file and source.password_env: give one of them, not both"
                    .to_string(),
            );
        }
        if matches!(&self.password_env, Some(v) if v.trim().is_empty()) {
            return Err("source.password_env: must name an environment variable".to_string());
        }
        if self.tables.is_empty() {
            return Err("source.tables: list at least one table, e.g. [\"public.person\"]".into());
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tables {
            split_table(t).map_err(|e| format!("source.tables: {e}"))?;
            if !seen.insert(t) {
                return Err(format!("source.tables: {t:?} is listed twice"));
            }
        }
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return Err(format!(
                "source.slot: {:?} is not a valid replication slot name (1 to 63 characters of a-z, 0-9 and _)",
                self.slot
            ));
        }
        if self.publication.trim().is_empty() || self.publication.contains('"') {
            return Err(format!(
                "source.publication: {:?} is not a valid publication name",
                self.publication
            ));
        }
        if self.heartbeat_interval.0 < std::time::Duration::from_secs(1) {
            return Err("source.heartbeat_interval: must be at least 1s".to_string());
        }
        if !(1..=MAX_SNAPSHOT_CHUNK_ROWS).contains(&self.snapshot_chunk_rows) {
            return Err(format!(
                "source.snapshot_chunk_rows: must be between 1 and {MAX_SNAPSHOT_CHUNK_ROWS}, got {}",
                self.snapshot_chunk_rows
            ));
        }
        if self.snapshot_rows_per_second == Some(0) {
            return Err(
                "source.snapshot_rows_per_second: must be at least 1 (leave it out for no limit)"
                    .to_string(),
            );
        }
        Ok(())
    }

    /// The password file or variable must be there on this host.
    pub fn check_environment(&self) -> Result<(), String> {
        conn::read_password(self)?;
        conn::check_tls_files(&self.dsn)
    }
}

/// Splits `schema.table`.
pub(crate) fn split_table(t: &str) -> Result<(&str, &str), String> {
    match t.split_once('.') {
        Some((s, n)) if !s.is_empty() && !n.is_empty() && !n.contains('.') => Ok((s, n)),
        _ => Err(format!(
            "{t:?} is not schema.table (write e.g. \"public.person\")"
        )),
    }
}

/// The running PostgreSQL source; see the module doc.
pub struct PostgresSource {
    config: PostgresConfig,
    /// What outlives one instance (one session with the server).
    state: Arc<run::Lasting>,
}

impl PostgresSource {
    pub fn new(config: PostgresConfig) -> Self {
        let state = Arc::new(run::Lasting {
            in_progress: AtomicBool::new(config.stream_in_progress),
            retained: AtomicU64::new(run::UNKNOWN),
        });
        Self { config, state }
    }
}

impl Source for PostgresSource {
    fn run(&self, ctx: SourceContext) -> SourceFuture {
        let span = tracing::info_span!("source", stream = %ctx.name, kind = "postgres", slot = %self.config.slot);
        Box::pin(run::run(self.config.clone(), ctx, Arc::clone(&self.state)).instrument(span))
    }
}

/// The `postgres` kind (registered in `kind.rs`).
pub struct Postgres;

/// The gauges a postgres position holds.
const GAUGES: &[GaugeDef] = &[
    (
        // The exchange alarms on it by this name.
        ferry_protocol::messages::RETAINED_WAL_GAUGE,
        "WAL the stream's replication slot keeps on the database server, bytes",
    ),
    (
        "postgres_durable_lsn",
        "WAL position up to which every change is durable in the buffer (and confirmed to the slot)",
    ),
    (
        "postgres_snapshot_rows_done",
        "Rows of the table being copied by the initial snapshot that are durable",
    ),
    (
        "postgres_snapshot_rows_estimate",
        "Estimated rows of the table being copied by the initial snapshot",
    ),
];

impl SourceKind for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn describe_position(&self, position: &[u8]) -> String {
        describe_position(position)
    }

    fn gauges(&self) -> &'static [GaugeDef] {
        GAUGES
    }

    fn position_gauges(&self, position: &[u8]) -> Gauges {
        position_gauges(position)
    }
}

impl KindConfig for PostgresConfig {
    fn kind(&self) -> &'static dyn SourceKind {
        &Postgres
    }

    fn validate(&self) -> Result<(), String> {
        PostgresConfig::validate(self)
    }

    fn check_environment(&self) -> Result<(), String> {
        PostgresConfig::check_environment(self)
    }

    /// wal_level, slots and WAL senders, the role's privileges, the publication,
    /// each table's replica identity: see [`doctor`].
    fn doctor(&self) -> DoctorFuture<'_> {
        Box::pin(doctor::doctor(self))
    }

    fn build(&self) -> Box<dyn Source> {
        Box::new(PostgresSource::new(self.clone()))
    }
}

/// One line for `status`, e.g. `snapshot public.person (1/2): 12000/50000 rows;
/// streaming from 0/1A2B3C8 after it` or `streaming from 0/1A2B3C8; slot retains
/// 12 MiB of WAL`.
pub fn describe_position(position: &[u8]) -> String {
    position::describe(position)
}

/// The figures of a stored position, for metrics (see [`Postgres`]'s gauges).
pub fn position_gauges(position: &[u8]) -> crate::Gauges {
    position::gauges(position)
}
