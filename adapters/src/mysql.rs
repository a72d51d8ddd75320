//! The `mysql` source: captures row changes of chosen tables of a MariaDB (or
//! MySQL) server by reading its binary log in ROW format as a replica would
//! (`COM_BINLOG_DUMP` through `mysql_async`'s binlog stream). Verified against
//! MariaDB 10.11; MySQL 8 shares the code path but has not been run here. Both
//! connections take TLS as PostgreSQL's do: `?sslmode=require|verify-ca|verify-full`
//! with `&sslrootcert=FILE` on the DSN (rustls; no client certificate).
//!
//! # Records
//!
//! The source-neutral envelope of protocol version 4 (`source = "mysql"`):
//!
//! * [`Row`](ferry_protocol::messages::Row) per inserted, updated or deleted row
//!   of a captured table, `schema` = the database. `columns` is the after image
//!   (a column the server left out of a partial image is `Unchanged`); `old_key`
//!   is the before image's primary-key columns for a delete and for an update
//!   that changed the key, or the whole before image (updates and deletes) when
//!   the table has no primary key. Values are text in MySQL's own rendering:
//!   integers and exact decimals as digits (`DECIMAL(30,10)` with all ten
//!   places), `DATE` `YYYY-MM-DD`, `DATETIME(n)` `YYYY-MM-DD HH:MM:SS[.f…]` with
//!   the column's `n` fraction digits, `TIME(n)` `[-]HH:MM:SS[.f…]`, `TIMESTAMP`
//!   as the instant in UTC with its zone (`2026-01-02 03:04:05+00`), `ENUM` and
//!   `SET` by their member names, `BIT` as an unsigned number, `JSON` as JSON
//!   text. Character columns are decoded by their character set: `utf8`/`utf8mb4`
//!   and `ascii` as UTF-8, `gbk`/`gb2312`/`gb18030` with the GB18030 decoder,
//!   `latin1` as windows-1252 (MySQL's latin1), `ucs2`/`utf16`/`utf16le`/`utf32`,
//!   `big5`, `sjis`, `euckr` and the other character sets `encoding_rs` knows by
//!   name; a column in any other character set stops the stream (fatal, naming
//!   the column) rather than ship garbled text. A value whose bytes are not
//!   text in its column's character set is never replaced or dropped: it
//!   travels as those bytes, and the row's `flags` hold `raw:COLUMN` (a
//!   warning in the log names table, column and position). `BINARY`, `VARBINARY` and `BLOB`
//!   travel as bytes. `TIME(1)` and `TIME(2)` binlog values are read by the
//!   source itself (`rows.rs`): `mysql_common` 0.37 reads negative ones wrongly.
//!
//!   The changes of one transaction are contiguous, share `txn` (MariaDB's GTID
//!   `domain-server-seq`, MySQL's `uuid:gno`, empty without GTIDs),
//!   `position` (the UTF-8 bytes of `file:pos`, the binlog position where the
//!   transaction's first event begins: its GTID event, or `BEGIN`) and
//!   `commit_time_unix_us` (MySQL's commit timestamp from its GTID event; on
//!   MariaDB the time of its GTID event, which the server writes when the
//!   transaction commits, in whole seconds), are numbered by `change_index`,
//!   and the last one has `last_in_txn`. Only committed transactions are in a
//!   binary log, so a transaction is shipped while it is read: `position` and
//!   the commit time are what its first event states, not its commit event.
//! * [`Table`](ferry_protocol::messages::Table) before the first row of each
//!   table and whenever its shape (names, types, character sets, key flags)
//!   changes, right before the first row with the new shape. `key` marks the
//!   primary-key columns; `identity` is `primary key`, or `full` for a table
//!   without one.
//!
//! * [`Rows`](ferry_protocol::messages::Rows) blocks of initial-snapshot rows
//!   (`snapshot = "initial"`): up to `snapshot_chunk_rows` rows (or 4 MiB) of
//!   one table per record, in COPY text, each standing for a `Row` with
//!   `snapshot = true`, `op = INSERT`, `position` the snapshot's binlog
//!   position and `change_index` its row number in the table's copy; values
//!   exactly as a streamed row of the same content has them (the query reads
//!   through the binary protocol with `character_set_results = NULL` and
//!   `time_zone = '+00:00'`, and the same decoder renders both). A snapshot row
//!   with a raw value (above) travels as a `Row` of its own.
//!
//! Column names, types, keys and character sets come from `information_schema`
//! (`COLUMNS`, `KEY_COLUMN_USAGE`, and on MariaDB `CHECK_CONSTRAINTS` for its
//! `JSON` alias) on a second, ordinary connection, read at the first table map
//! of a table and again after any DDL statement or whenever a table map's column
//! count or types differ from the cached shape. The catalogue describes the
//! table as it is *now*: rows still in the binlog from before a later `ALTER
//! TABLE` (the agent was down during a migration) are labelled instead from the
//! table map's own metadata, which the server writes with
//! `binlog_row_metadata = FULL` (names, signedness, character sets, primary
//! key, ENUM/SET members; types are then spelled without lengths, e.g.
//! `varchar`, and MariaDB's `JSON` alias reads as text). Without that setting
//! such rows stop the stream with a fatal error naming the table and the
//! setting, rather than mislabel values.
//!
//! # Position
//!
//! JSON:
//!
//! ```json
//! {"file":"binlog.000002","pos":1234,"gtid":"0-1-13",
//!  "partial":{"begin":"binlog.000002:1234","done":10000},
//!  "schemas":{"shop.orders":"9f86d081884c7d65"}}
//! ```
//!
//! `file`/`pos` is the binlog position right after the last transaction whose
//! changes are all durable (or that touched no captured table). `gtid` is the
//! MariaDB GTID state at that point, one `domain-server-seq` per replication
//! domain, comma-separated (with one domain: the last transaction's GTID); empty
//! on MySQL and on a MariaDB without GTIDs. `partial` names a transaction too big
//! for one commit (more than 10,000 changes or 4 MiB), the first one after
//! `file`/`pos`, by the position of its first event (`begin`, as its changes
//! carry it): its first `done` changes are durable. `schemas` holds a
//! fingerprint of the shape last shipped per table.
//!
//! While an initial snapshot runs the position also holds
//! `"snapshot":{"tables":[...],"table":0,"last_key":[{"text":"42"}],"rows_done":
//! 42,"rows_estimate":1000}`, and `file`/`pos`/`gtid` are the binlog position
//! the snapshot is consistent with.
//!
//! # Initial snapshot
//!
//! With `snapshot = "initial"` and no stored position, one connection starts
//! `START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY` (repeatable read)
//! and reads the binlog position it is consistent with: MariaDB states it
//! without any lock (`binlog_snapshot_file`/`binlog_snapshot_position`, and the
//! GTID state there); MySQL holds `FLUSH TABLES WITH READ LOCK` only while it
//! reads `SHOW MASTER STATUS` and starts the transaction (the user then needs
//! `RELOAD`; not run here). That position is committed at once with the
//! snapshot's state, then each table is read in primary-key order by one
//! streamed query and committed in pieces whose position records the last key.
//! Then the stream starts at the snapshot's position: every change after it
//! arrives once, nothing before it does.
//!
//! A crash mid-copy loses the transaction, so the rest of the table (after the
//! last durable key) is copied under a fresh consistent snapshot, and the stream
//! still starts at the first snapshot's position. Rows copied after the crash
//! may already hold changes that the stream then replays: applied by primary
//! key (insert/update = upsert, delete = remove) they converge, as for
//! PostgreSQL. A table without a primary key cannot be resumed by key: it is
//! copied again from its first row (row numbers from 0 again), so its rows
//! copied before the crash arrive twice. A table added to `tables` after the
//! snapshot began is streamed only.
//!
//! # Invariants
//!
//! 1. Records and the position after them are committed together
//!    ([`crate::SourceContext`]'s atomic commit); nothing is acknowledged to the
//!    server, which keeps its binlogs by its own `expire_logs_days`.
//! 2. A new instance resumes from the stored position: on MariaDB from the GTID
//!    state (`SET @slave_connect_state`) when there is one, else from
//!    `file`/`pos`; the server sends the transactions after it, and of a
//!    `partial` transaction the first `done` changes are skipped: nothing is
//!    duplicated or lost. With no stored position the source starts at the
//!    server's current position (`SHOW MASTER STATUS`, on newer MySQL `SHOW
//!    BINARY LOG STATUS`, with the GTID state of that exact point from
//!    `BINLOG_GTID_POS`) and commits it at once, so a restart before the first
//!    change does not skip what came in between (with `snapshot = "initial"`,
//!    at the snapshot's position, above).
//! 3. A stored position the server no longer has (binlogs purged, a GTID not in
//!    its binlogs) is refused with a fatal error: what was between is gone.
//! 4. Memory does not grow with a transaction: the binary log holds a
//!    transaction only once it committed, so its changes are committed to the
//!    buffer in pieces as they are read, each with a `partial` position, and
//!    only the last change read waits (to learn whether it is the last). The
//!    commit event commits the last piece with the position after it. A new
//!    instance checks that the first transaction it reads is the one `partial`
//!    names (else the binlog is not the one the position came from: fatal) and
//!    skips its first `done` changes. XA transactions (`XA PREPARE`, then
//!    a separate `XA COMMIT`) are not supported: one that touches a captured
//!    table stops the stream (fatal) rather than lose or misplace its changes.
//!
//! Transactions that touch no captured table move the stored position without
//! records, at most once a second while the stream is otherwise idle.
//!
//! # MariaDB specifics
//!
//! The session announces `@mariadb_slave_capability=4`, so MariaDB sends its own
//! GTID (0xA2), GTID_LIST (0xA3) and binlog checkpoint events rather than rewrite
//! them as queries for an old replica; `mysql_common` does not decode them, this
//! module does (`gtid.rs`). The first, fake rotate event comes before the format
//! description, so with checksums on its file name still carries the 4 checksum
//! bytes; they are cut off.

use std::path::PathBuf;

use serde::Deserialize;
use tracing::Instrument;

use crate::{
    DoctorFuture, GaugeDef, Gauges, KindConfig, Source, SourceContext, SourceFuture, SourceKind,
};

mod conn;
mod doctor;
mod gtid;
mod image;
mod position;
mod rows;
#[doc(hidden)]
pub use rows::agree_with_mysql_common;
mod schema;
mod snapshot;
mod stream;
mod table_map;
mod values;

/// `source = { kind = "mysql", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://USER@HOST:PORT/DATABASE[?sslmode=...&sslrootcert=FILE]`; the
    /// password is better given by `password_file` or `password_env`.
    pub dsn: String,
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// The replica server id this source registers with; unique among the
    /// server's replicas and different from the server's own `server_id`.
    pub server_id: u32,
    /// Tables to capture, `database.table`.
    pub tables: Vec<String>,
    /// Required, so a later default cannot change what a configuration means.
    pub snapshot: SnapshotMode,
    /// Rate limit of the initial snapshot, rows per second.
    pub snapshot_rows_per_second: Option<u64>,
    /// Rows per commit of the initial snapshot (also cut at 4 MiB).
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: usize,
}

/// As for PostgreSQL: pieces of a few megabytes.
fn default_snapshot_chunk_rows() -> usize {
    50_000
}

/// Most rows per snapshot piece a configuration may ask for.
const MAX_SNAPSHOT_CHUNK_ROWS: usize = 1_000_000;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Copy the tables' current rows first, consistently with the binlog
    /// position the stream then starts at.
    Initial,
    /// Only changes from the moment the stream first starts.
    Never,
}

impl MysqlConfig {
    /// A config capturing `tables` from `dsn` as replica `server_id`, no snapshot.
    pub fn new(dsn: impl Into<String>, tables: &[&str], server_id: u32) -> Self {
        MysqlConfig {
            dsn: dsn.into(),
            password_file: None,
            password_env: None,
            server_id,
            tables: tables.iter().map(|t| t.to_string()).collect(),
            snapshot: SnapshotMode::Never,
            snapshot_rows_per_second: None,
            snapshot_chunk_rows: default_snapshot_chunk_rows(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        conn::Dsn::parse(&self.dsn)?;
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(
                "source.password_file and source.password_env: give one of them, not both".into(),
            );
        }
        if matches!(&self.password_env, Some(v) if v.trim().is_empty()) {
            return Err("source.password_env: must name an environment variable".into());
        }
        if self.server_id == 0 {
            return Err("source.server_id: must be between 1 and 4294967295 (0 cannot register as a replica)".into());
        }
        if self.tables.is_empty() {
            return Err("source.tables: list at least one table, e.g. [\"shop.orders\"]".into());
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tables {
            split_table(t).map_err(|e| format!("source.tables: {e}"))?;
            if !seen.insert(t) {
                return Err(format!("source.tables: {t:?} is listed twice"));
            }
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
                    .into(),
            );
        }
        Ok(())
    }

    /// The password file or variable must be there on this host.
    pub fn check_environment(&self) -> Result<(), String> {
        conn::read_password(self)?;
        let dsn = conn::Dsn::parse(&self.dsn)?;
        if let Some(root) = &dsn.tls.root {
            std::fs::read(root)
                .map_err(|e| format!("source.dsn: sslrootcert {}: {e}", root.display()))?;
        }
        Ok(())
    }
}

/// Splits `database.table`.
pub(crate) fn split_table(t: &str) -> Result<(&str, &str), String> {
    match t.split_once('.') {
        Some((s, n)) if !s.is_empty() && !n.is_empty() && !n.contains('.') => Ok((s, n)),
        _ => Err(format!(
            "{t:?} is not database.table (write e.g. \"shop.orders\")"
        )),
    }
}

/// The running MySQL source; see the module doc.
pub struct MysqlSource {
    config: MysqlConfig,
}

impl MysqlSource {
    pub fn new(config: MysqlConfig) -> Self {
        Self { config }
    }
}

impl Source for MysqlSource {
    fn run(&self, ctx: SourceContext) -> SourceFuture {
        let span = tracing::info_span!("source", stream = %ctx.name, kind = "mysql", server_id = self.config.server_id);
        Box::pin(stream::run(self.config.clone(), ctx).instrument(span))
    }
}

/// The `mysql` kind (registered in `kind.rs`).
pub struct Mysql;

const GAUGES: &[GaugeDef] = &[
    (
        "mysql_binlog_file_number",
        "Number of the binlog file (its name's numeric suffix) up to whose durable position every change is in the buffer",
    ),
    (
        "mysql_binlog_pos",
        "Byte offset in that binlog file up to which every change is durable in the buffer",
    ),
    (
        "mysql_snapshot_rows_done",
        "Rows of the table being copied by the initial snapshot that are durable",
    ),
    (
        "mysql_snapshot_rows_estimate",
        "Estimated rows of the table being copied by the initial snapshot",
    ),
];

impl SourceKind for Mysql {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn describe_position(&self, position: &[u8]) -> String {
        position::describe(position)
    }

    fn gauges(&self) -> &'static [GaugeDef] {
        GAUGES
    }

    fn position_gauges(&self, position: &[u8]) -> Gauges {
        position::gauges(position)
    }
}

impl KindConfig for MysqlConfig {
    fn kind(&self) -> &'static dyn SourceKind {
        &Mysql
    }

    fn validate(&self) -> Result<(), String> {
        MysqlConfig::validate(self)
    }

    fn check_environment(&self) -> Result<(), String> {
        MysqlConfig::check_environment(self)
    }

    /// Connection, binlog settings, privileges, each table: see `doctor.rs`.
    fn doctor(&self) -> DoctorFuture<'_> {
        Box::pin(doctor::doctor(self))
    }

    fn build(&self) -> Box<dyn Source> {
        Box::new(MysqlSource::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(toml_text: &str) -> Result<MysqlConfig, String> {
        let c: MysqlConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn a_full_configuration_validates() {
        let c = parse(
            r#"dsn = "mysql://ferry@db1:3306/shop"
               password_env = "FERRY_DB_PW"
               server_id = 4242
               tables = ["shop.orders", "shop.customers"]
               snapshot = "never""#,
        )
        .unwrap();
        assert_eq!(c.server_id, 4242);
    }

    /// The commented example in `packaging/agent.toml` is a valid configuration.
    #[test]
    fn the_packaged_example_validates() {
        let text = include_str!("../../packaging/agent.toml");
        let line = text
            .lines()
            .find(|l| l.starts_with("#source = { kind = \"mysql\""))
            .expect("a commented mysql example");
        #[derive(serde::Deserialize)]
        struct Stream {
            source: crate::SourceConfig,
        }
        let s: Stream = toml::from_str(&line[1..]).unwrap();
        assert_eq!(s.source.kind(), "mysql");
        s.source.validate().unwrap();
    }

    #[test]
    fn what_is_not_supported_is_refused_naming_the_key() {
        let base = r#"dsn = "mysql://ferry@db1:3306/shop"
                      server_id = 7
                      tables = ["shop.orders"]"#;
        parse(&format!("{base}\nsnapshot = \"initial\"")).unwrap();
        let e = parse(&format!(
            "{base}\nsnapshot = \"initial\"\nsnapshot_chunk_rows = 0"
        ))
        .unwrap_err();
        assert!(e.contains("source.snapshot_chunk_rows"), "{e}");
        let e = parse(base).unwrap_err();
        assert!(e.contains("snapshot"), "{e}");
        let e = parse(
            &base
                .replace("7", "0")
                .replace("]", "]\nsnapshot = \"never\""),
        )
        .unwrap_err();
        assert!(e.contains("source.server_id"), "{e}");
        let e = parse(&format!(
            "{}\nsnapshot = \"never\"",
            base.replace("shop.orders", "orders")
        ))
        .unwrap_err();
        assert!(e.contains("source.tables"), "{e}");
        let e = parse(&format!(
            "{}\nsnapshot = \"never\"",
            base.replace("mysql://", "postgres://")
        ))
        .unwrap_err();
        assert!(e.contains("source.dsn"), "{e}");
    }
}
