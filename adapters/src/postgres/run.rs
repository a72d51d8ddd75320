//! One instance of the source: a session (connect, check, snapshot or stream)
//! from the last durable position. When it fails, the error says whether a new
//! instance may get past it (`Fail::Retry`: the server unreachable or
//! restarting) or the operator must act (`Fail::Fatal`); the agent's supervisor
//! (`crate::supervise`) restarts the first with backoff and stops on the second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ferry_protocol::messages::Record;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::conn::{self, Fail, Result, Target};
use super::position::{fmt_lsn, PgPosition, StreamPos};
use super::sql::{qualified, quote_ident, quote_literal, Sql, TableInfo};
use super::{snapshot, split_table, stream, PostgresConfig, SnapshotMode};
use crate::{Inflight, SourceContext, SourceError};

/// How long a slot held by another connection is waited for.
const SLOT_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// `retained` when not measured yet.
pub(super) const UNKNOWN: u64 = u64::MAX;

/// What outlives one instance of the source.
pub(crate) struct Lasting {
    /// Receive large transactions in progress (pgoutput v2 streaming); cleared
    /// for the rest of the process when a streamed one rolled back to a savepoint.
    pub in_progress: AtomicBool,
    /// WAL the slot retains, as last measured ([`UNKNOWN`] before).
    pub retained: AtomicU64,
}

impl From<Fail> for SourceError {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Retry(m) => SourceError::Other(m),
            Fail::Fatal(m) => SourceError::Fatal(m),
            Fail::Source(e) => e,
        }
    }
}

pub(crate) async fn run(
    cfg: PostgresConfig,
    ctx: SourceContext,
    lasting: Arc<Lasting>,
) -> std::result::Result<(), SourceError> {
    cfg.validate().map_err(SourceError::Fatal)?;
    let mut durable = match &ctx.resume {
        Some(b) => Some(PgPosition::decode(b).map_err(SourceError::Other)?),
        None => None,
    };
    let retained = Arc::new(AtomicU64::new(lasting.retained.load(Ordering::Relaxed)));
    let mut in_progress = lasting.in_progress.load(Ordering::Relaxed);
    let r = session(&cfg, &ctx, &mut durable, &retained, &mut in_progress).await;
    lasting.in_progress.store(in_progress, Ordering::Relaxed);
    lasting
        .retained
        .store(retained.load(Ordering::Relaxed), Ordering::Relaxed);
    match r {
        Ok(()) => Ok(()),
        Err(_) if ctx.shutdown.is_cancelled() => Err(SourceError::Shutdown),
        Err(f) => Err(f.into()),
    }
}

/// One connection's worth of work; shared with `snapshot` and `stream`.
pub(crate) struct Session<'a> {
    pub cfg: &'a PostgresConfig,
    pub ctx: &'a SourceContext,
    pub target: Target,
    pub sql: Sql,
    /// The configured tables, as the catalog describes them now.
    pub tables: Vec<TableInfo>,
    pub durable: &'a mut Option<PgPosition>,
    retained: Arc<AtomicU64>,
    /// Receive large transactions in progress (pgoutput v2 streaming); cleared
    /// for the rest of the process when a streamed one rolled back to a savepoint.
    pub in_progress: &'a mut bool,
}

impl Session<'_> {
    /// Commits records with the position after them; returns once durable.
    pub(crate) async fn commit(&mut self, records: Vec<Record>, pos: &PgPosition) -> Result<()> {
        self.ctx.commit(records, pos.encode()?).await?;
        *self.durable = Some(pos.clone());
        Ok(())
    }

    /// Hands records to the buffer without waiting: up to `inflight`'s depth
    /// commits are under way, and `durable` follows each as it completes, in order.
    pub(crate) async fn submit(
        &mut self,
        inflight: &mut Inflight<PgPosition>,
        records: impl Into<crate::Records>,
        pos: &PgPosition,
    ) -> Result<()> {
        let done = inflight
            .push(self.ctx, records, pos.encode()?, pos.clone())
            .await?;
        self.settled(done);
        Ok(())
    }

    /// Waits for every commit in flight.
    pub(crate) async fn drain(&mut self, inflight: &mut Inflight<PgPosition>) -> Result<()> {
        let done = inflight.drain().await?;
        self.settled(done);
        Ok(())
    }

    fn settled(&mut self, done: Vec<(Option<crate::Committed>, PgPosition)>) {
        if let Some((_, pos)) = done.into_iter().next_back() {
            *self.durable = Some(pos);
        }
    }

    /// WAL the slot retains, as last measured.
    pub(crate) fn retained(&self) -> Option<u64> {
        match self.retained.load(Ordering::Relaxed) {
            UNKNOWN => None,
            v => Some(v),
        }
    }
}

async fn session(
    cfg: &PostgresConfig,
    ctx: &SourceContext,
    durable: &mut Option<PgPosition>,
    retained: &Arc<AtomicU64>,
    in_progress: &mut bool,
) -> Result<()> {
    let target = conn::target(cfg).map_err(Fail::Fatal)?;
    let sql = Sql::connect(&target).await?;
    let version = sql.server_version().await?;
    if version < 140000 {
        return Err(Fail::Fatal(format!(
            "PostgreSQL {version} at {} is too old: Ferry needs 14 or later",
            target.desc
        )));
    }
    let db = sql.current_database().await?;
    let tables = check_tables(cfg, &sql, version, &db).await?;

    let slot = sql.slot_info(&cfg.slot).await?;
    if let Some(si) = &slot {
        if si.database.as_deref() != Some(db.as_str()) || si.plugin.as_deref() != Some("pgoutput") {
            return Err(Fail::Fatal(format!(
                "replication slot {:?} exists but belongs to database {:?} with plugin {:?}; Ferry needs a pgoutput slot of database {db:?}: choose another source.slot",
                cfg.slot, si.database, si.plugin
            )));
        }
        if si.wal_status.as_deref() == Some("lost") {
            return Err(Fail::Fatal(format!(
                "replication slot {:?} was invalidated (the server removed WAL it still needed, see max_slot_wal_keep_size): changes since the stored position are lost. To capture again from scratch, configure a new stream with a new slot",
                cfg.slot
            )));
        }
        if let Some(r) = si.retained {
            retained.store(r, Ordering::Relaxed);
        }
    }
    if let Some(p) = durable.as_ref() {
        if p.slot() != cfg.slot {
            return Err(Fail::Fatal(format!(
                "the stored position belongs to replication slot {:?} but source.slot is {:?}; changing the slot of a stream would lose or repeat changes. Put the old slot name back, or configure a new stream",
                p.slot(),
                cfg.slot
            )));
        }
    }
    let streaming = Arc::new(AtomicBool::new(false));
    let _monitor = Monitor(tokio::spawn(monitor(
        target.clone(),
        cfg.clone(),
        Arc::clone(retained),
        Arc::clone(&streaming),
    )));
    let mut s = Session {
        cfg,
        ctx,
        target,
        sql,
        tables,
        durable,
        retained: Arc::clone(retained),
        in_progress,
    };
    let gone = |what: &str| {
        Fail::Fatal(format!(
            "replication slot {:?} does not exist, but the stored position says {what} (was it dropped, or did the database fail over to a standby without it?). The changes since then cannot be captured; Ferry will not re-snapshot silently. To capture again from scratch, configure a new stream with a new slot",
            cfg.slot
        ))
    };
    match s.durable.clone() {
        None => {
            if slot.is_some() && cfg.snapshot == SnapshotMode::Initial {
                return Err(Fail::Fatal(format!(
                    "replication slot {:?} already exists but this stream has no stored position, so the initial snapshot cannot be taken consistently with it. If the slot is left over from an interrupted first start of this stream, drop it: SELECT pg_drop_replication_slot({}); otherwise choose another source.slot (or snapshot = \"never\" to stream from the slot as it is)",
                    cfg.slot,
                    quote_literal(&cfg.slot)
                )));
            }
            if slot.is_some() {
                wait_slot_free(&s).await?;
            }
            match cfg.snapshot {
                SnapshotMode::Initial => snapshot::initial(&mut s).await?,
                SnapshotMode::Never => {
                    let lsn = match &slot {
                        Some(si) => si.confirmed_flush.ok_or_else(|| {
                            Fail::Fatal(format!("slot {:?} has no confirmed position", cfg.slot))
                        })?,
                        None => snapshot::create_slot(&s.target, &cfg.slot, false)?.1,
                    };
                    let pos = PgPosition::Streaming(StreamPos {
                        slot: cfg.slot.clone(),
                        lsn,
                        partial: None,
                        schemas: Default::default(),
                        retained_wal: s.retained(),
                    });
                    s.commit(Vec::new(), &pos).await?;
                }
            }
        }
        Some(PgPosition::Snapshot(p)) => {
            if slot.is_none() {
                return Err(gone("the initial snapshot was under way"));
            }
            for t in cfg.tables.iter().filter(|t| !p.tables.contains(t)) {
                warn!(table = %t, "added to source.tables after the initial snapshot began: its existing rows are not copied, only its changes");
            }
            wait_slot_free(&s).await?;
            snapshot::resume(&mut s, p).await?;
        }
        Some(PgPosition::Streaming(p)) => {
            let Some(si) = &slot else {
                return Err(gone(&format!("streaming had reached {}", fmt_lsn(p.lsn))));
            };
            if let Some(c) = si.confirmed_flush {
                if c > p.lsn {
                    return Err(Fail::Fatal(format!(
                        "replication slot {:?} was advanced to {} by someone else, past this stream's durable position {}: the changes in between are lost to Ferry. Make sure no other consumer uses the slot; to capture again from scratch, configure a new stream with a new slot",
                        cfg.slot,
                        fmt_lsn(c),
                        fmt_lsn(p.lsn)
                    )));
                }
            }
            wait_slot_free(&s).await?;
        }
    }
    streaming.store(true, Ordering::Relaxed);
    stream::stream(&mut s).await
}

/// Every configured table exists and is in the publication.
async fn check_tables(
    cfg: &PostgresConfig,
    sql: &Sql,
    version: i32,
    db: &str,
) -> Result<Vec<TableInfo>> {
    let all: Vec<String> = cfg
        .tables
        .iter()
        .filter_map(|t| split_table(t).ok().map(|(s, n)| qualified(s, n)))
        .collect();
    let publ = sql.publication(&cfg.publication, version).await?.ok_or_else(|| {
        Fail::Fatal(format!(
            "publication {:?} does not exist in database {db:?}. Create it: CREATE PUBLICATION {} FOR TABLE {};",
            cfg.publication,
            quote_ident(&cfg.publication),
            all.join(", ")
        ))
    })?;
    let skipped = sql.unpublished_actions(&cfg.publication).await?;
    if !skipped.is_empty() {
        warn!(publication = %cfg.publication, left_out = ?skipped, "the publication does not publish every kind of change, so those are not captured. Fix: ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');", quote_ident(&cfg.publication));
    }
    let mut out = Vec::new();
    for t in &cfg.tables {
        let (schema, table) = split_table(t).map_err(Fail::Fatal)?;
        let pt = publ.get(t);
        let info = sql.table_info(schema, table, pt).await?.ok_or_else(|| {
            Fail::Fatal(format!(
                "table {t} (source.tables) does not exist in database {db:?}. Create it, or remove it from source.tables"
            ))
        })?;
        if pt.is_none() {
            return Err(Fail::Fatal(format!(
                "publication {:?} does not contain table {t}. Add it: ALTER PUBLICATION {} ADD TABLE {};",
                cfg.publication,
                quote_ident(&cfg.publication),
                qualified(schema, table)
            )));
        }
        if info.replident == 'n' || (info.replident == 'd' && !info.has_pk) {
            warn!(table = %t, "table has no replica identity (no primary key, or REPLICA IDENTITY NOTHING): PostgreSQL refuses UPDATE and DELETE on it while it is published. Fix: add a primary key, or ALTER TABLE {} REPLICA IDENTITY FULL;", qualified(schema, table));
        }
        out.push(info);
    }
    Ok(out)
}

/// Waits briefly for a slot held by another connection (Ferry's own previous
/// connection is released within moments), then fails naming the holder.
async fn wait_slot_free(s: &Session<'_>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + SLOT_BUSY_WAIT;
    loop {
        let Some(pid) = s
            .sql
            .slot_info(&s.cfg.slot)
            .await?
            .and_then(|i| i.active_pid)
        else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            let who = s.sql.backend(pid).await?;
            return Err(Fail::Fatal(format!(
                "replication slot {:?} is in use by another connection ({who}). A slot serves one consumer: stop the other consumer, or give this stream its own source.slot",
                s.cfg.slot
            )));
        }
        tokio::select! {
            _ = s.ctx.shutdown.cancelled() => return Err(Fail::Source(SourceError::Shutdown)),
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
        }
    }
}

/// Aborts the monitor task with the session.
struct Monitor(JoinHandle<()>);

impl Drop for Monitor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every `heartbeat_interval`: emit the heartbeat message (once streaming) and
/// measure the WAL the slot retains, warning above `max_retained_wal`.
async fn monitor(
    target: Target,
    cfg: PostgresConfig,
    retained: Arc<AtomicU64>,
    streaming: Arc<AtomicBool>,
) {
    let mut sql: Option<Sql> = None;
    let mut warned = false;
    loop {
        tokio::time::sleep(cfg.heartbeat_interval.0).await;
        if sql.is_none() {
            match Sql::connect(&target).await {
                Ok(s) => sql = Some(s),
                Err(e) => {
                    warn!(error = ?e, "heartbeat: cannot connect; will retry");
                    continue;
                }
            }
        }
        let Some(c) = sql.as_ref() else { continue };
        if streaming.load(Ordering::Relaxed) {
            if let Err(e) = c.heartbeat().await {
                warn!(error = ?e, "heartbeat failed");
                sql = None;
                continue;
            }
        }
        match c.slot_info(&cfg.slot).await {
            Ok(Some(info)) => {
                if let Some(r) = info.retained {
                    retained.store(r, Ordering::Relaxed);
                    if r > cfg.max_retained_wal.0 {
                        warn!(
                            retained_bytes = r,
                            max_retained_wal = cfg.max_retained_wal.0,
                            slot = %cfg.slot,
                            "the replication slot holds more WAL than max_retained_wal: the server's disk fills while Ferry lags or is stopped. Check that the stream is running and the exchange reachable; a slot no longer needed must be dropped"
                        );
                        warned = true;
                    } else if warned {
                        info!(
                            retained_bytes = r,
                            "the slot's retained WAL is below max_retained_wal again"
                        );
                        warned = false;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = ?e, "cannot measure the slot's retained WAL");
                sql = None;
            }
        }
    }
}
