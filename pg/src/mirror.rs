//! The PostgreSQL mirror: applies [`RowEvent`]s into tables of a PostgreSQL
//! database, so each source table has a mirror that converges to its state,
//! exactly once per `(agent, stream, seq)`.
//!
//! # Layout in the target database
//!
//! ```text
//! SCHEMA.TABLE                    one mirror table per source table, named as the
//!                                 source table (the source namespace is dropped);
//!                                 primary key = the source's key columns
//! BOOKKEEPING.checkpoints         (delivery, agent, stream) → seq, applied_at
//! BOOKKEEPING.tables              (delivery, schema, table_name) → agent, stream,
//!                                 source_namespace: who owns a mirror table
//! ```
//!
//! `BOOKKEEPING` (default `ferry`) is never the target schema, so a source table
//! named `checkpoints` cannot collide with Ferry's own.
//!
//! # Exactly once
//!
//! [`Mirror::apply`] runs one transaction per call: it locks the stream's
//! checkpoint row (`SELECT ... FOR UPDATE`), skips the records at or below it,
//! applies the rest and moves the checkpoint to the last seq given, then commits.
//! The rows and the checkpoint become visible together or not at all: a crash,
//! a lost connection or a killed backend leaves the previous checkpoint and none
//! of the rows, and a retry of the same (or an overlapping) range applies each
//! record once. Two appliers of one stream serialize on the checkpoint row.
//!
//! # Ownership
//!
//! The first `(agent, stream)` that delivers into a mirror table owns it (a row of
//! `BOOKKEEPING.tables`, written in the same transaction as its first rows).
//! Another stream, another delivery, or another source namespace of the same
//! stream mirroring into the same table is refused with an error naming both:
//! their rows would overwrite each other's.
//!
//! # Shapes
//!
//! A [`RowEvent::Shape`] creates the mirror table, adds new columns, and widens a
//! column whose type grew without loss (`integer` → `bigint`, `numeric(10,2)` →
//! `numeric(12,2)`, anything → `text`). Any other type change stops the delivery
//! with a [`MirrorError::Fatal`] naming table and column. Columns the source
//! dropped stay in the mirror (new rows leave them NULL). Rows for a table no
//! shape came for in this mirror's life (a delivery resumed mid-stream) are
//! applied to the table as the catalog describes it.
//!
//! # Batching
//!
//! Rows are not sent one statement each. Within one apply the events of each
//! table gather into a run (`runs.rs`): for a table with a primary key, the last
//! image per key and the keys to delete; for a table without one, the rows to
//! insert and the rows to delete. A run is written when its table's shape
//! changes, the table is truncated, a row with another column set arrives, the
//! runs hold 50,000 rows, or the apply ends: one `DELETE ... USING unnest(...)`
//! for the deleted keys, then the images, `COPY`ed straight into the table when
//! their keys are new and updated by one `UPDATE ... FROM unnest(...)` when the
//! table has them. A long run of new keys (a snapshot) is streamed into its
//! `COPY` while later records are still being read. Values travel as text (bytea
//! as bytes) and go through the server's own input functions, so numeric,
//! timestamptz and the rest keep their exact values. The mirror stores about
//! 70% of the rows per second of a plain `COPY` into the same server
//! (`examples/mirror_bench.rs`).

mod copy;
mod runs;
mod schema;
mod statements;
mod values;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_protocol::messages::Record;
use ferry_protocol::rows::{row_events, RowEvent};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};
use tracing::Instrument;

use crate::sql::{quote_ident, quote_literal};
use runs::Runs;
use schema::{Claim, Owner, Table};

/// The bookkeeping schema unless configured otherwise.
pub const DEFAULT_BOOKKEEPING: &str = "ferry";

/// Serializes the creation of the bookkeeping tables by concurrent mirrors.
const SETUP_LOCK: i64 = 0x4665_7272_7931;

/// Where a delivery mirrors to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorConfig {
    /// The delivery's name: checkpoints and table ownership are per delivery.
    pub delivery: String,
    /// The schema the mirror tables live in.
    pub schema: String,
    /// The schema of Ferry's own tables (`checkpoints`, `tables`); never `schema`.
    pub bookkeeping: String,
}

impl MirrorConfig {
    /// A configuration with the default bookkeeping schema.
    pub fn new(delivery: impl Into<String>, schema: impl Into<String>) -> Self {
        MirrorConfig {
            delivery: delivery.into(),
            schema: schema.into(),
            bookkeeping: DEFAULT_BOOKKEEPING.to_string(),
        }
    }

    fn check(&self) -> Result<(), MirrorError> {
        let bad = |m: String| Err(MirrorError::Fatal(format!("mirror configuration: {m}")));
        for (key, v) in [
            ("delivery", &self.delivery),
            ("schema", &self.schema),
            ("bookkeeping", &self.bookkeeping),
        ] {
            if v.trim().is_empty() || v.contains('\0') {
                return bad(format!("{key} must be a non-empty name, got {v:?}"));
            }
        }
        if self.schema == self.bookkeeping {
            return bad(format!(
                "the mirror schema and the bookkeeping schema are both {:?}; Ferry's checkpoints must not live among the mirrored tables: choose another bookkeeping schema",
                self.schema
            ));
        }
        Ok(())
    }
}

/// Why a mirror call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// Worth retrying after a pause: the connection was lost, the server is down
    /// or restarting, a serialization failure or deadlock. Nothing was applied.
    #[error("{0}")]
    Retry(String),
    /// Needs the operator; the message names the table (and column) and what to
    /// fix: an incompatible schema change, a table owned by another stream, data
    /// the target refuses. Nothing was applied.
    #[error("{0}")]
    Fatal(String),
}

/// What one [`Mirror::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Records applied (above the checkpoint).
    pub records: usize,
    /// Records skipped because the checkpoint was already at or past them.
    pub skipped: usize,
    /// The stream's checkpoint after the call.
    pub checkpoint: u64,
    /// The last applied row change was not the last of its source transaction:
    /// the mirror shows part of a transaction until the next apply.
    pub mid_transaction: bool,
}

/// A connection that applies row events into mirror tables; see the module doc.
pub struct Mirror {
    config: tokio_postgres::Config,
    tls: Option<Arc<rustls::ClientConfig>>,
    client: Client,
    task: JoinHandle<()>,
    /// An apply began a transaction it has not ended (its future was dropped
    /// half-way): the next call rolls it back first.
    open: AtomicBool,
    state: State,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        // Closing the socket rolls back whatever transaction was open.
        self.task.abort();
    }
}

/// What the mirror knows beside its connection. Everything here is a cache of
/// committed state and is dropped whenever an apply fails, so a rolled-back
/// `CREATE TABLE` or ownership claim is never remembered.
struct State {
    cfg: MirrorConfig,
    /// `"bookkeeping"."checkpoints"` and `"bookkeeping"."tables"`.
    checkpoints: String,
    owners: String,
    /// Mirror tables by name, as the catalog describes them, with their owner.
    tables: HashMap<String, (Claim, Arc<Table>)>,
    /// Prepared statements by SQL text.
    statements: HashMap<String, Statement>,
}

impl Mirror {
    /// Connects (given a ready `tokio_postgres::Config` and optional TLS, see
    /// [`crate::dsn::prepare`]), and creates the target schema and the bookkeeping
    /// schema and tables if missing.
    pub async fn connect(
        config: tokio_postgres::Config,
        tls: Option<Arc<rustls::ClientConfig>>,
        cfg: MirrorConfig,
    ) -> Result<Mirror, MirrorError> {
        cfg.check()?;
        let (client, task) = crate::connect(&config, tls.as_ref())
            .await
            .map_err(|e| classify(&describe("cannot connect to PostgreSQL", &config), &e))?;
        let state = State {
            checkpoints: format!("{}.checkpoints", quote_ident(&cfg.bookkeeping)),
            owners: format!("{}.tables", quote_ident(&cfg.bookkeeping)),
            cfg,
            tables: HashMap::new(),
            statements: HashMap::new(),
        };
        let mut m = Mirror {
            config,
            tls,
            client,
            task,
            open: AtomicBool::new(false),
            state,
        };
        m.setup().await?;
        Ok(m)
    }

    async fn setup(&mut self) -> Result<(), MirrorError> {
        let fail = |e: tokio_postgres::Error| classify("setting up the mirror's schemas", &e);
        let tx = self.client.transaction().await.map_err(fail)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SETUP_LOCK])
            .await
            .map_err(fail)?;
        let cfg = &self.state.cfg;
        for schema in [&cfg.bookkeeping, &cfg.schema] {
            // Created only when missing: CREATE SCHEMA IF NOT EXISTS would need
            // the CREATE privilege on the database even when the schema exists.
            let exists = tx
                .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[schema])
                .await
                .map_err(fail)?
                .is_some();
            if !exists {
                tx.batch_execute(&format!("CREATE SCHEMA {}", quote_ident(schema)))
                    .await
                    .map_err(|e| classify(&format!("creating schema {schema:?}"), &e))?;
            }
        }
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                delivery text NOT NULL, agent text NOT NULL, stream text NOT NULL,
                seq bigint NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (delivery, agent, stream));
             CREATE TABLE IF NOT EXISTS {} (
                delivery text NOT NULL, schema text NOT NULL, table_name text NOT NULL,
                agent text NOT NULL, stream text NOT NULL, source_namespace text NOT NULL,
                claimed_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (delivery, schema, table_name));",
            self.state.checkpoints, self.state.owners
        ))
        .await
        .map_err(|e| classify("creating the bookkeeping tables", &e))?;
        tx.commit().await.map_err(fail)
    }

    /// Last seq applied for `(agent, stream)` by this delivery; 0 if none.
    pub async fn checkpoint(&self, agent: &str, stream: &str) -> Result<u64, MirrorError> {
        self.end_abandoned().await?;
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT seq FROM {} WHERE delivery = $1 AND agent = $2 AND stream = $3",
                    self.state.checkpoints
                ),
                &[&self.state.cfg.delivery, &agent, &stream],
            )
            .await
            .map_err(|e| classify("reading the checkpoint", &e))?;
        Ok(row.map_or(0, |r| non_negative(r.get(0))))
    }

    /// Every checkpoint of this delivery: `(agent, stream, seq, applied_at)` with
    /// `applied_at` in Unix milliseconds.
    pub async fn checkpoints(&self) -> Result<Vec<(String, String, u64, u64)>, MirrorError> {
        self.end_abandoned().await?;
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT agent, stream, seq,
                            (extract(epoch FROM applied_at) * 1000)::bigint
                     FROM {} WHERE delivery = $1 ORDER BY agent, stream",
                    self.state.checkpoints
                ),
                &[&self.state.cfg.delivery],
            )
            .await
            .map_err(|e| classify("reading the checkpoints", &e))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    non_negative(r.get(2)),
                    non_negative(r.get(3)),
                )
            })
            .collect())
    }

    /// Applies `records` (`(seq, record)`, ascending seq) of one `(agent, stream)`
    /// in ONE transaction that also moves the checkpoint to the last seq given.
    /// Records at or below the stored checkpoint are skipped, so a retry after a
    /// crash never applies anything twice. Records that are not about rows (file
    /// chunks, lines) only move the checkpoint.
    ///
    /// After an error nothing of the call is applied. A lost connection is opened
    /// again by the next call.
    pub async fn apply(
        &mut self,
        agent: &str,
        stream: &str,
        records: &[(u64, Record)],
    ) -> Result<Applied, MirrorError> {
        if let Some(w) = records.windows(2).find(|w| w[1].0 <= w[0].0) {
            return Err(MirrorError::Fatal(format!(
                "records of {agent}/{stream} handed to the mirror out of order: seq {} after {}",
                w[1].0, w[0].0
            )));
        }
        let Some(&(last, _)) = records.last() else {
            return Ok(Applied {
                checkpoint: self.checkpoint(agent, stream).await?,
                ..Applied::default()
            });
        };
        if i64::try_from(last).is_err() {
            return Err(MirrorError::Fatal(format!(
                "seq {last} of {agent}/{stream} does not fit the checkpoint (bigint)"
            )));
        }
        if self.client.is_closed() {
            self.reconnect().await?;
        }
        self.end_abandoned().await?;
        let span =
            tracing::info_span!("mirror", delivery = %self.state.cfg.delivery, agent, stream);
        let owner = Owner {
            agent: agent.to_string(),
            stream: stream.to_string(),
        };
        self.open.store(true, Ordering::SeqCst);
        let result = self
            .state
            .apply(&self.client, &owner, records)
            .instrument(span)
            .await;
        if result.is_err() {
            self.state.tables.clear();
            self.state.statements.clear();
            // A lost connection took the transaction with it; otherwise it ends here.
            if self.client.is_closed() || self.client.batch_execute("ROLLBACK").await.is_ok() {
                self.open.store(false, Ordering::SeqCst);
            }
        } else {
            self.open.store(false, Ordering::SeqCst);
        }
        result
    }

    /// Rolls back the transaction of an apply whose future was dropped half-way.
    async fn end_abandoned(&self) -> Result<(), MirrorError> {
        if self.open.swap(false, Ordering::SeqCst) {
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|e| classify("rolling back an abandoned apply", &e))?;
        }
        Ok(())
    }

    async fn reconnect(&mut self) -> Result<(), MirrorError> {
        let (client, task) = crate::connect(&self.config, self.tls.as_ref())
            .await
            .map_err(|e| classify(&describe("cannot connect to PostgreSQL", &self.config), &e))?;
        self.task.abort();
        self.client = client;
        self.task = task;
        self.open.store(false, Ordering::SeqCst);
        self.state.tables.clear();
        self.state.statements.clear();
        Ok(())
    }
}

impl State {
    /// One apply's transaction, begun and ended here (the caller rolls back
    /// after an error). Statements are pipelined where the protocol allows: the
    /// begin, the checkpoint's creation and its lock go in one round trip, the
    /// checkpoint's move and the commit in another.
    async fn apply(
        &mut self,
        tx: &Client,
        owner: &Owner,
        records: &[(u64, Record)],
    ) -> Result<Applied, MirrorError> {
        let (delivery, agent, stream) = (
            quote_literal(&self.cfg.delivery),
            quote_literal(&owner.agent),
            quote_literal(&owner.stream),
        );
        let this = format!("delivery = {delivery} AND agent = {agent} AND stream = {stream}");
        // The row is created on first use, then locked: a concurrent applier of
        // the same stream waits here until this transaction ends.
        let begin = format!(
            "BEGIN;
             INSERT INTO {cp} (delivery, agent, stream, seq) VALUES ({delivery}, {agent}, {stream}, 0)
             ON CONFLICT DO NOTHING;
             SELECT seq FROM {cp} WHERE {this} FOR UPDATE",
            cp = self.checkpoints
        );
        let stored = tx
            .simple_query(&begin)
            .await
            .map_err(|e| classify("reading the checkpoint", &e))?
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse::<u64>().ok()),
                _ => None,
            })
            .ok_or_else(|| MirrorError::Fatal("the checkpoint row cannot be read".into()))?;

        let start = records.partition_point(|(seq, _)| *seq <= stored);
        let mut applied = Applied {
            records: records.len() - start,
            skipped: start,
            checkpoint: stored,
            mid_transaction: false,
        };
        let Some(&(last, _)) = records.last().filter(|_| start < records.len()) else {
            // Everything was applied before; the transaction changed nothing.
            tx.batch_execute("ROLLBACK")
                .await
                .map_err(|e| classify("ending the transaction", &e))?;
            return Ok(applied);
        };
        let mut runs = Runs::default();
        for (seq, record) in &records[start..] {
            let events = row_events(record).map_err(|e| {
                MirrorError::Fatal(format!(
                    "record {seq} of {}/{}: {e}",
                    owner.agent, owner.stream
                ))
            })?;
            for event in events {
                match &event {
                    RowEvent::Shape(_) => {}
                    RowEvent::Upsert { end_of_txn, .. }
                    | RowEvent::Delete { end_of_txn, .. }
                    | RowEvent::Truncate { end_of_txn, .. } => {
                        applied.mid_transaction = !end_of_txn;
                    }
                }
                if let Some(event) = self.add_row(&mut runs, owner, event)? {
                    // The slow way may send statements: an open COPY ends first.
                    runs.end_stream(tx).await?;
                    self.event(tx, &mut runs, owner, event).await?;
                }
                if runs.wants_pump() {
                    runs.pump(tx, &mut self.statements).await?;
                }
            }
            if runs.full() {
                runs.flush_all(tx, &mut self.statements).await?;
            }
        }
        runs.flush_all(tx, &mut self.statements).await?;
        tx.batch_execute(&format!(
            "UPDATE {} SET seq = {last}, applied_at = now() WHERE {this}; COMMIT",
            self.checkpoints
        ))
        .await
        .map_err(|e| classify("committing the applied rows", &e))?;
        applied.checkpoint = last;
        tracing::debug!(
            records = applied.records,
            skipped = applied.skipped,
            checkpoint = last,
            "applied"
        );
        Ok(applied)
    }

    /// The way of most rows: into the pending run of a table already known,
    /// without I/O. Hands back what needs [`State::event`].
    fn add_row(
        &self,
        runs: &mut Runs,
        owner: &Owner,
        event: RowEvent,
    ) -> Result<Option<RowEvent>, MirrorError> {
        let (namespace, name) = match &event {
            RowEvent::Upsert {
                namespace, table, ..
            }
            | RowEvent::Delete {
                namespace, table, ..
            } => (namespace, table),
            RowEvent::Shape(_) | RowEvent::Truncate { .. } => return Ok(Some(event)),
        };
        match self.tables.get(name) {
            Some((held, t)) if held.owner == *owner && held.namespace == *namespace => {
                runs.add(t, event)
            }
            _ => Ok(Some(event)),
        }
    }

    async fn event(
        &mut self,
        tx: &Client,
        runs: &mut Runs,
        owner: &Owner,
        event: RowEvent,
    ) -> Result<(), MirrorError> {
        match event {
            RowEvent::Shape(shape) => {
                runs.flush_table(tx, &mut self.statements, &shape.table)
                    .await?;
                self.shape(tx, owner, &shape).await?;
            }
            RowEvent::Truncate {
                namespace, table, ..
            } => {
                // Whatever was pending for the table is gone with its rows.
                runs.forget(&table);
                if let Some(t) = self.table(tx, owner, &namespace, &table, false).await? {
                    tx.batch_execute(&format!("TRUNCATE {}", t.qualified))
                        .await
                        .map_err(|e| classify(&format!("truncating {}", t.display), &e))?;
                }
            }
            RowEvent::Upsert {
                namespace,
                table,
                columns,
                old_key,
                ..
            } => {
                let Some(t) = self.table(tx, owner, &namespace, &table, true).await? else {
                    return Ok(());
                };
                runs.upsert(tx, &mut self.statements, &t, columns, old_key)
                    .await?;
            }
            RowEvent::Delete {
                namespace,
                table,
                old_key,
                ..
            } => {
                let Some(t) = self.table(tx, owner, &namespace, &table, true).await? else {
                    return Ok(());
                };
                runs.delete(tx, &mut self.statements, &t, old_key).await?;
            }
        }
        Ok(())
    }
}

/// A bigint of the bookkeeping (a seq written from a `u64`, a timestamp after 1970).
fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `what (user@host:port/dbname)`, for connection messages.
fn describe(what: &str, c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let user = c.get_user().unwrap_or("?");
    let db = c.get_dbname().unwrap_or(user);
    format!("{what} ({user}@{host}:{port}/{db})")
}

/// What a tokio-postgres error means for the mirror: the connection or the
/// server's state (retry) or the statement itself (the operator must look).
pub(crate) fn classify(what: &str, e: &tokio_postgres::Error) -> MirrorError {
    let Some(db) = e.as_db_error() else {
        let detail = std::error::Error::source(e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        if crate::tls::refused_certificate(e) {
            return MirrorError::Fatal(format!(
                "{what}: the server's TLS certificate was refused{detail}. Check sslrootcert (the CA that signed the server's certificate) and, for sslmode=verify-full, that the certificate names the host"
            ));
        }
        if e.to_string().contains("password missing") {
            return MirrorError::Fatal(format!(
                "{what}: the server asks for a password but none is configured"
            ));
        }
        return MirrorError::Retry(format!("{what}: {e}{detail}"));
    };
    let code = db.code();
    let mut msg = format!("{what}: {}", db.message());
    if let Some(d) = db.detail() {
        msg.push_str(&format!(" ({d})"));
    }
    if let Some(h) = db.hint() {
        msg.push_str(&format!(". Hint: {h}"));
    }
    let class = code.code().get(..2).unwrap_or("");
    // 08 connection, 40 serialization failure / deadlock, 53 out of resources
    // (disk full, too many connections), 57 operator intervention (shutdown,
    // pg_terminate_backend, statement timeout), 58 I/O error on the server.
    if matches!(class, "08" | "40" | "53" | "57" | "58") || *code == SqlState::LOCK_NOT_AVAILABLE {
        return MirrorError::Retry(msg);
    }
    MirrorError::Fatal(format!("{msg} [SQLSTATE {}]", code.code()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_bookkeeping_inside_the_mirror_schema() {
        let mut c = MirrorConfig::new("d1", "mirror");
        assert_eq!(c.bookkeeping, "ferry");
        c.check().unwrap();
        c.bookkeeping = "mirror".into();
        let MirrorError::Fatal(m) = c.check().unwrap_err() else {
            panic!()
        };
        assert!(m.contains("\"mirror\"") && m.contains("bookkeeping"), "{m}");
        c.bookkeeping = "ferry".into();
        c.delivery = " ".into();
        assert!(c.check().is_err());
    }

    #[test]
    fn connection_messages_name_the_server() {
        let c: tokio_postgres::Config = "host=db port=5433 user=u dbname=x".parse().unwrap();
        assert_eq!(
            describe("cannot connect", &c),
            "cannot connect (u@db:5433/x)"
        );
    }
}
