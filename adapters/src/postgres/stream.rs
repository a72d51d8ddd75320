//! Streaming from the slot: assemble each transaction's changes, commit them to
//! the buffer (in pieces when large), and confirm the slot only up to what is
//! durable.
//!
//! With `stream_in_progress` (pgoutput protocol v2 streaming), the server sends a
//! transaction larger than its `logical_decoding_work_mem` while it is still in
//! progress, in blocks interleaved with other transactions, instead of spilling it
//! to its own disk. Those blocks go to a local spool (`spool.rs`); at the stream
//! commit the spooled changes take the path of any other transaction, in commit
//! order, so the buffer and the exchange still only ever see committed whole
//! transactions. A stream abort drops the spool. pg_walstream does not say which
//! subtransaction a streamed change belongs to, so when a streamed transaction
//! rolls back to a savepoint the source reconnects without in-progress streaming
//! (the server then sends that transaction whole at its commit) and stays so
//! until the agent restarts; so it does when the spool cannot be written (the
//! agent's disk full, say).

use std::collections::HashMap;

use ferry_protocol::messages::{record, Record, RowOp};
use pg_walstream::{
    EventType, LogicalReplicationStream, ReplicaIdentity, ReplicationError,
    ReplicationStreamConfig, RetryConfig, StreamingMode,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::conn::{classify_repl, Fail, Result};
use super::position::{fmt_lsn, Partial, PgPosition, StreamPos};
use super::records::{old_columns, row_columns, row_record, size_of, txn_id, Rel, Stamp};
use super::run::Session;
use super::spool::Spool;
use super::sql::ColInfo;
use ferry_protocol::rows::lsn_position;

/// A transaction goes to the buffer in one commit up to this many changes...
pub(crate) const MAX_TXN_ROWS: usize = 10_000;
/// ... and this many bytes of records; a larger one is split.
pub(crate) const MAX_TXN_BYTES: usize = 4 << 20;
/// Largest record the wire can carry with room to spare (a batch is ≤ 8 MiB).
pub(crate) const MAX_RECORD_BYTES: usize = 7 << 20;

pub(crate) const HEARTBEAT_PREFIX: &str = "ferry-heartbeat";

/// The transaction being received.
struct Txn {
    xid: u32,
    commit_lsn: u64,
    time_us: i64,
    /// Captured changes seen so far (skipped ones included).
    count: u32,
    /// Changes already durable from before a restart.
    skip: u32,
    pending: Vec<Record>,
    pending_rows: usize,
    pending_bytes: usize,
    /// Relation of the last change, whose shape is known to precede it.
    checked: Option<u32>,
}

struct Streamer<'s, 'a> {
    s: &'s mut Session<'a>,
    /// The durable position.
    pos: StreamPos,
    /// Fingerprints including what is pending.
    schemas: std::collections::BTreeMap<String, String>,
    rels: HashMap<u32, Rel>,
    /// `Rel::fingerprint` of each of `rels`.
    fps: HashMap<u32, String>,
    types: HashMap<(u32, i32), String>,
    txn: Option<Txn>,
    /// A transaction committed to the buffer in pieces before a restart.
    resume_partial: Option<Partial>,
    /// Transactions in progress (v2 streaming), by top-level xid.
    spools: HashMap<u32, Spool>,
    /// The transaction of the stream block being received.
    streaming_xid: Option<u32>,
}

pub(crate) async fn stream(s: &mut Session<'_>) -> Result<()> {
    let Some(PgPosition::Streaming(pos)) = s.durable.clone() else {
        return Err(Fail::Fatal(
            "internal: streaming without a streaming position".into(),
        ));
    };
    let in_progress = *s.in_progress;
    let config = ReplicationStreamConfig::builder(s.cfg.slot.clone(), s.cfg.publication.clone())
        .with_protocol_version(if in_progress { 2 } else { 1 })
        .with_streaming_mode(if in_progress {
            StreamingMode::On
        } else {
            StreamingMode::Off
        })
        .with_messages(true)
        .with_binary(false)
        .with_feedback_interval(std::time::Duration::from_secs(1))
        .with_connection_timeout(std::time::Duration::from_secs(30))
        .with_retry_config(RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        });
    let mut repl = LogicalReplicationStream::new(&s.target.repl, config)
        .await
        .map_err(|e| classify_repl(&s.target, "cannot open the replication connection", e))?;
    repl.start(Some(pos.lsn))
        .await
        .map_err(|e| classify_repl(&s.target, "cannot start replication", e))?;
    // pg_walstream creates a missing slot on start: one dropped since the session
    // checked would start at the server's current position. Its confirmed LSN
    // would then be past ours.
    if let Some(c) = s
        .sql
        .slot_info(&s.cfg.slot)
        .await?
        .and_then(|i| i.confirmed_flush)
    {
        if c > pos.lsn {
            return Err(Fail::Fatal(format!(
                "replication slot {:?} starts at {}, past this stream's durable position {}: it was dropped and recreated, or advanced by someone else. The changes in between are lost to Ferry; to capture again from scratch, configure a new stream with a new slot",
                s.cfg.slot,
                fmt_lsn(c),
                fmt_lsn(pos.lsn)
            )));
        }
    }
    info!(from = %fmt_lsn(pos.lsn), in_progress, "streaming changes");
    let mut st = Streamer {
        schemas: pos.schemas.clone(),
        resume_partial: pos.partial,
        pos,
        s,
        rels: HashMap::new(),
        fps: HashMap::new(),
        types: HashMap::new(),
        txn: None,
        spools: HashMap::new(),
        streaming_xid: None,
    };
    let ticks = IdleTicks::start(&st.s.ctx.shutdown);
    loop {
        let confirm = match repl.next_event(&ticks.token()).await {
            Ok(ev) => st.event(ev.event_type).await?,
            Err(ReplicationError::Cancelled(_)) if !st.s.ctx.shutdown.is_cancelled() => {
                ticks.renew();
                st.idle(repl.current_lsn()).await?
            }
            Err(e) => return Err(classify_repl(&st.s.target, "replication stream failed", e)),
        };
        if let Some(lsn) = confirm {
            (st.s.ctx.failpoint)("postgres-after-commit-before-confirm")
                .map_err(|e| Fail::Retry(format!("confirming the slot position: {e}")))?;
            // Durable in the buffer: reported as flushed, which is what moves a
            // logical slot (applied stays unset, as pg_recvlogical leaves it).
            repl.shared_lsn_feedback.update_flushed_lsn(lsn);
            repl.send_feedback()
                .await
                .map_err(|e| classify_repl(&st.s.target, "cannot confirm the slot position", e))?;
        }
    }
}

/// How often an idle stream makes the server's sent position durable.
const IDLE_CONFIRM: std::time::Duration = std::time::Duration::from_secs(1);

/// Wakes the streaming loop out of `next_event` every [`IDLE_CONFIRM`] by
/// cancelling the token it waits on (a child of the source's shutdown token).
///
/// Why: a walsender sends keepalives carrying its sent position, which moves past
/// our last commit whenever other WAL follows it (other tables, other databases,
/// checkpoints). pg_walstream answers them itself with our durable position, so
/// without a tick the slot's client never reports that later position as flushed,
/// and a fast shutdown of the server, which waits until each logical client has
/// flushed the last sent position, waits for Ferry forever.
///
/// Cancelling through the token is safe with pg_walstream 0.9's inline driver,
/// the one it uses on a multi-thread runtime: the token is checked only between
/// frames and while waiting for the socket, and a frame read before the
/// cancellation is returned, not dropped. Its threaded driver (current-thread
/// runtimes) drops the batches queued for the reader on cancellation, so there no
/// ticks are sent and idle positions are confirmed only by heartbeats.
struct IdleTicks {
    current: std::sync::Arc<std::sync::Mutex<CancellationToken>>,
    parent: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl IdleTicks {
    fn start(shutdown: &CancellationToken) -> IdleTicks {
        let current = std::sync::Arc::new(std::sync::Mutex::new(shutdown.child_token()));
        let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        let task = multi_thread.then(|| {
            let current = current.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(IDLE_CONFIRM);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every.tick().await;
                loop {
                    every.tick().await;
                    if let Ok(t) = current.lock() {
                        t.cancel();
                    }
                }
            })
        });
        IdleTicks {
            current,
            parent: shutdown.clone(),
            task,
        }
    }

    fn token(&self) -> CancellationToken {
        match self.current.lock() {
            Ok(t) => t.clone(),
            Err(_) => self.parent.clone(),
        }
    }

    /// After a tick: the next wait gets a fresh token.
    fn renew(&self) {
        if let Ok(mut t) = self.current.lock() {
            *t = self.parent.child_token();
        }
    }
}

impl Drop for IdleTicks {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Streamer<'_, '_> {
    /// A tick between events. Outside a transaction, every transaction committed
    /// before `received` (the last keepalive's sent position: the server queues a
    /// keepalive behind all it has sent) has been received and committed, so
    /// `received` becomes the durable position and is confirmed.
    async fn idle(&mut self, received: u64) -> Result<Option<u64>> {
        if self.txn.is_some() || self.resume_partial.is_some() || received <= self.pos.lsn {
            return Ok(None);
        }
        let pos = self.next_pos(received, None);
        self.commit(Vec::new(), pos).await?;
        Ok(Some(received))
    }

    /// Handles one event; `Some(lsn)`: `lsn` is durable now, confirm it.
    async fn event(&mut self, ev: EventType) -> Result<Option<u64>> {
        match ev {
            EventType::Begin {
                transaction_id,
                final_lsn,
                commit_timestamp,
            } => {
                self.begin(
                    transaction_id,
                    final_lsn.0,
                    commit_timestamp.timestamp_micros(),
                );
                Ok(None)
            }
            EventType::StreamStart {
                transaction_id,
                first_segment,
            } => {
                if first_segment {
                    let dir = self
                        .s
                        .ctx
                        .spool_dir
                        .clone()
                        .unwrap_or_else(std::env::temp_dir);
                    let spool = match Spool::create(&dir) {
                        Ok(s) => s,
                        Err(e) => {
                            return Err(self.stop_in_progress(format!(
                            "cannot create a spool file for a transaction in progress in {}: {e}",
                            dir.display()
                        )))
                        }
                    };
                    info!(
                        xid = transaction_id,
                        "receiving a transaction in progress (spooled until it commits)"
                    );
                    self.spools.insert(transaction_id, spool);
                } else if !self.spools.contains_key(&transaction_id) {
                    return Err(self.stop_in_progress(format!(
                        "a block of transaction {transaction_id} in progress arrived without its first block"
                    )));
                }
                self.streaming_xid = Some(transaction_id);
                Ok(None)
            }
            EventType::StreamStop => {
                self.streaming_xid = None;
                Ok(None)
            }
            EventType::StreamAbort {
                transaction_id,
                subtransaction_xid,
                ..
            } => {
                if subtransaction_xid == transaction_id {
                    // Rolled back: never shipped; the file goes with the spool.
                    self.spools.remove(&transaction_id);
                    return Ok(None);
                }
                if self.spools.remove(&transaction_id).is_some() {
                    return Err(self.stop_in_progress(format!(
                        "transaction {transaction_id}, received while in progress, rolled back subtransaction {subtransaction_xid}"
                    )));
                }
                Ok(None)
            }
            EventType::StreamCommit {
                transaction_id,
                commit_lsn,
                end_lsn,
                commit_timestamp,
            } => {
                self.streaming_xid = None;
                let Some(spool) = self.spools.remove(&transaction_id) else {
                    return Ok(None);
                };
                self.begin(
                    transaction_id,
                    commit_lsn.0,
                    commit_timestamp.timestamp_micros(),
                );
                let spooled = spool.records;
                let mut replay = spool.replay().map_err(|e| {
                    Fail::Fatal(format!("cannot read back a spooled transaction: {e}"))
                })?;
                while let Some(rec) = replay.next_record().map_err(|e| {
                    Fail::Fatal(format!("cannot read back a spooled transaction: {e}"))
                })? {
                    if let Some(record::Body::Table(c)) = &rec.body {
                        let name = format!("{}.{}", c.schema, c.table);
                        if self.schemas.get(&name) == Some(&rec.position) {
                            continue;
                        }
                        self.schemas.insert(name, rec.position.clone());
                    }
                    self.txn_push(rec).await?;
                }
                info!(commit_lsn = %fmt_lsn(commit_lsn.0), records = spooled, "transaction received in progress committed");
                self.commit_txn(end_lsn.0).await
            }
            EventType::Relation {
                relation_id,
                namespace,
                relation_name,
                replica_identity,
                columns,
            } => {
                let name = format!("{namespace}.{relation_name}");
                if !self.s.cfg.tables.contains(&name) {
                    self.rels.remove(&relation_id);
                    return Ok(None);
                }
                let ri = match replica_identity {
                    ReplicaIdentity::Default => "default",
                    ReplicaIdentity::Nothing => "nothing",
                    ReplicaIdentity::Full => "full",
                    ReplicaIdentity::Index => "index",
                };
                let mut cols = Vec::with_capacity(columns.len());
                for c in columns {
                    let type_name = self.type_name(c.type_id, c.type_modifier).await?;
                    cols.push(ColInfo {
                        name: c.name.to_string(),
                        type_oid: c.type_id,
                        typmod: c.type_modifier,
                        base_type: type_name.clone(),
                        type_name,
                        key: c.is_key,
                    });
                }
                let rel = Rel {
                    schema: namespace.to_string(),
                    table: relation_name.to_string(),
                    cols,
                    replica_identity: ri,
                };
                if ri == "nothing" {
                    warn!(table = %name, "table has REPLICA IDENTITY NOTHING: PostgreSQL refuses UPDATE and DELETE on it while it is published. Fix: add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL");
                }
                let fp = rel.fingerprint();
                self.fps.insert(relation_id, fp.clone());
                if let Some(t) = self.txn.as_mut() {
                    t.checked = None;
                }
                for sp in self.spools.values_mut() {
                    sp.checked = None;
                }
                if let Some(xid) = self.streaming_xid {
                    // Whether it is news is known only in commit order, at the
                    // stream commit: spooled with its fingerprint as position.
                    let mut rec = rel.schema_record(0);
                    rec.position = fp.clone();
                    self.spool(xid, &rec)?;
                    if let Some(sp) = self.spools.get_mut(&xid) {
                        sp.schemas.insert(name, fp.clone());
                    }
                } else if self.schemas.get(&name) != Some(&fp) {
                    let lsn = self.txn.as_ref().map_or(self.pos.lsn, |t| t.commit_lsn);
                    let rec = rel.schema_record(lsn);
                    self.schemas.insert(name, fp);
                    if self.txn.is_some() {
                        self.txn_push(rec).await?;
                    } else {
                        let pos = self.next_pos(self.pos.lsn, self.pos.partial);
                        self.commit(vec![rec], pos).await?;
                    }
                }
                self.rels.insert(relation_id, rel);
                Ok(None)
            }
            EventType::Insert {
                relation_oid, data, ..
            } => {
                let Some(rel) = self.rels.get(&relation_oid) else {
                    return Ok(None);
                };
                let cols = row_columns(rel, &data);
                self.change(
                    relation_oid,
                    RowOp::Insert,
                    cols,
                    Vec::new(),
                    (false, false),
                )
                .await
            }
            EventType::Update {
                relation_oid,
                old_data,
                new_data,
                key_columns,
                ..
            } => {
                let Some(rel) = self.rels.get(&relation_oid) else {
                    return Ok(None);
                };
                let cols = row_columns(rel, &new_data);
                let old = old_data
                    .map(|o| old_columns(rel, &o, &key_columns))
                    .unwrap_or_default();
                self.change(relation_oid, RowOp::Update, cols, old, (false, false))
                    .await
            }
            EventType::Delete {
                relation_oid,
                old_data,
                key_columns,
                ..
            } => {
                let Some(rel) = self.rels.get(&relation_oid) else {
                    return Ok(None);
                };
                let old = old_columns(rel, &old_data, &key_columns);
                self.change(relation_oid, RowOp::Delete, Vec::new(), old, (false, false))
                    .await
            }
            EventType::Truncate {
                tables,
                cascade,
                restart_identity,
            } => {
                for t in tables {
                    let oid = self
                        .rels
                        .iter()
                        .find(|(_, r)| r.name() == t.as_ref())
                        .map(|(oid, _)| *oid);
                    if let Some(oid) = oid {
                        let flags = (cascade, restart_identity);
                        self.change(oid, RowOp::Truncate, Vec::new(), Vec::new(), flags)
                            .await?;
                    }
                }
                Ok(None)
            }
            EventType::Commit { end_lsn, .. } => self.commit_txn(end_lsn.0).await,
            EventType::Message {
                flags,
                message_lsn,
                prefix,
                ..
            } if flags & 1 == 0 && self.txn.is_none() && prefix.as_ref() == HEARTBEAT_PREFIX => {
                // Every transaction committed before a non-transactional message
                // has been received: the slot may move up to it.
                let lsn = message_lsn.0;
                if lsn > self.pos.lsn && self.resume_partial.is_none() {
                    let pos = self.next_pos(lsn, None);
                    self.commit(Vec::new(), pos).await?;
                    return Ok(Some(lsn));
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    async fn type_name(&mut self, oid: u32, typmod: i32) -> Result<String> {
        if let Some(n) = self.types.get(&(oid, typmod)) {
            return Ok(n.clone());
        }
        let n = self.s.sql.type_name(oid, typmod).await?;
        self.types.insert((oid, typmod), n.clone());
        Ok(n)
    }

    fn partial_missing(&mut self, p: Partial) {
        error!(
            commit_lsn = %fmt_lsn(p.commit_lsn),
            done = p.done,
            "a transaction partly buffered before the restart was not replayed by the slot; its remaining changes are missing (was the slot advanced by another consumer?)"
        );
        self.resume_partial = None;
    }

    /// A position with the current fingerprints and retained-WAL figure.
    fn next_pos(&self, lsn: u64, partial: Option<Partial>) -> StreamPos {
        StreamPos {
            slot: self.pos.slot.clone(),
            lsn,
            partial,
            schemas: self.schemas.clone(),
            retained_wal: self.s.retained(),
        }
    }

    async fn commit(&mut self, records: Vec<Record>, pos: StreamPos) -> Result<()> {
        let next = PgPosition::Streaming(pos);
        self.s.commit(records, &next).await?;
        if let PgPosition::Streaming(p) = next {
            self.pos = p;
        }
        Ok(())
    }

    /// A transaction begins (or a spooled one is replayed at its commit).
    fn begin(&mut self, xid: u32, commit_lsn: u64, time_us: i64) {
        let mut skip = 0;
        if let Some(p) = self.resume_partial {
            if p.commit_lsn == commit_lsn {
                skip = p.done;
                self.resume_partial = None;
                info!(commit_lsn = %fmt_lsn(commit_lsn), skip, "resuming a large transaction after its durable part");
            } else if commit_lsn > p.commit_lsn {
                self.partial_missing(p);
            }
        }
        self.txn = Some(Txn {
            xid,
            commit_lsn,
            time_us,
            count: 0,
            skip,
            pending: Vec::new(),
            pending_rows: 0,
            pending_bytes: 0,
            checked: None,
        });
    }

    /// Turns in-progress streaming off for the rest of the process and asks for
    /// a reconnect, from the durable position.
    fn stop_in_progress(&mut self, why: String) -> Fail {
        *self.s.in_progress = false;
        self.spools.clear();
        self.streaming_xid = None;
        warn!(reason = %why, "reconnecting without in-progress streaming: large transactions are received whole at their commit until the agent restarts");
        Fail::Retry(format!("{why}; reconnecting without in-progress streaming"))
    }

    fn spool(&mut self, xid: u32, rec: &Record) -> Result<()> {
        let Some(spool) = self.spools.get_mut(&xid) else {
            warn!(
                xid,
                "a change of an unknown transaction in progress; ignored"
            );
            return Ok(());
        };
        match spool.push(rec) {
            Ok(()) => Ok(()),
            // Out of local disk, say: the server keeps the transaction instead
            // and sends it whole at its commit.
            Err(e) => {
                Err(self
                    .stop_in_progress(format!("cannot spool transaction {xid} in progress: {e}")))
            }
        }
    }

    async fn change(
        &mut self,
        rel_oid: u32,
        op: RowOp,
        columns: Vec<ferry_protocol::messages::Field>,
        old_key: Vec<ferry_protocol::messages::Field>,
        truncate: (bool, bool),
    ) -> Result<Option<u64>> {
        let Some(rel) = self.rels.get(&rel_oid) else {
            return Ok(None);
        };
        // Stamped for real when it joins its transaction (`txn_push`).
        let stamp = Stamp {
            xid: 0,
            commit_lsn: 0,
            commit_time_unix_us: 0,
            change_index: 0,
            snapshot: false,
        };
        let mut rec = row_record(rel, op, &stamp, columns, old_key);
        if let Some(record::Body::Row(c)) = rec.body.as_mut() {
            let (cascade, restart_identity) = truncate;
            if cascade {
                c.flags.push("cascade".to_string());
            }
            if restart_identity {
                c.flags.push("restart_identity".to_string());
            }
        }
        // pg_walstream reports a Relation message only when the shape is new to
        // it, which may have been in another transaction: each transaction makes
        // sure, in commit order, that its table's shape went before its rows.
        // `checked`: the table of the last change, whose shape was seen to.
        let checked = match self.streaming_xid {
            Some(xid) => self.spools.get_mut(&xid).map(|sp| &mut sp.checked),
            None => self.txn.as_mut().map(|t| &mut t.checked),
        };
        let fresh = checked.is_some_and(|c| c.replace(rel_oid) != Some(rel_oid));
        let name = rel.name();
        let fp = self.fps.get(&rel_oid).cloned().unwrap_or_default();
        if let Some(xid) = self.streaming_xid {
            too_large(&rec, size_of(&rec), "in progress")?;
            let spooled = self.spools.get(&xid).and_then(|sp| sp.schemas.get(&name));
            if fresh && spooled != Some(&fp) {
                let mut schema = rel.schema_record(0);
                schema.position = fp.clone();
                self.spool(xid, &schema)?;
                if let Some(sp) = self.spools.get_mut(&xid) {
                    sp.schemas.insert(name, fp);
                }
            }
            return self.spool(xid, &rec).map(|()| None);
        }
        if fresh && self.schemas.get(&name) != Some(&fp) {
            let schema = rel.schema_record(0);
            self.schemas.insert(name, fp);
            self.txn_push(schema).await?;
        }
        self.txn_push(rec).await
    }

    /// Adds a record to the open transaction: row changes are numbered (and
    /// skipped when durable from before a restart) and stamped with the
    /// transaction; what is pending goes to the buffer first when it is full.
    async fn txn_push(&mut self, mut rec: Record) -> Result<Option<u64>> {
        let Some(t) = self.txn.as_mut() else {
            warn!("a change arrived outside a transaction; ignored");
            return Ok(None);
        };
        let (xid, commit_lsn, time_us) = (t.xid, t.commit_lsn, t.time_us);
        match rec.body.as_mut() {
            Some(record::Body::Table(c)) => {
                c.position = lsn_position(commit_lsn);
                rec.position = format!(
                    "lsn={} schema {}.{}",
                    fmt_lsn(commit_lsn),
                    c.schema,
                    c.table
                );
                t.pending_bytes += size_of(&rec);
                t.pending.push(rec);
                return Ok(None);
            }
            Some(record::Body::Row(_)) => {}
            _ => return Ok(None),
        }
        let idx = t.count;
        t.count += 1;
        if idx < t.skip {
            return Ok(None);
        }
        if t.pending_rows >= MAX_TXN_ROWS || t.pending_bytes >= MAX_TXN_BYTES {
            // The transaction continues: what is pending goes to the buffer now.
            let records = std::mem::take(&mut t.pending);
            t.pending_rows = 0;
            t.pending_bytes = 0;
            let partial = Partial {
                commit_lsn,
                done: idx,
            };
            let pos = self.next_pos(self.pos.lsn, Some(partial));
            self.commit(records, pos).await?;
        }
        let Some(t) = self.txn.as_mut() else {
            return Ok(None);
        };
        if let Some(record::Body::Row(c)) = rec.body.as_mut() {
            c.txn = txn_id(xid);
            c.position = lsn_position(commit_lsn);
            c.commit_time_unix_us = time_us;
            c.change_index = idx;
        }
        rec.position = format!("lsn={} n={idx}", fmt_lsn(commit_lsn));
        let size = size_of(&rec);
        too_large(&rec, size, &fmt_lsn(commit_lsn))?;
        t.pending_bytes += size;
        t.pending.push(rec);
        t.pending_rows += 1;
        Ok(None)
    }

    async fn commit_txn(&mut self, end_lsn: u64) -> Result<Option<u64>> {
        let Some(mut t) = self.txn.take() else {
            return Ok(None);
        };
        if let Some(p) = self.resume_partial {
            if end_lsn > p.commit_lsn {
                self.partial_missing(p);
            }
        }
        if t.count == 0 && t.pending.is_empty() {
            // Nothing of ours in it: the slot moves past it with the next commit
            // or heartbeat.
            return Ok(None);
        }
        if let Some(record::Body::Row(c)) =
            t.pending
                .iter_mut()
                .rev()
                .find_map(|r| match r.body.as_mut() {
                    Some(b @ record::Body::Row(_)) => Some(b),
                    _ => None,
                })
        {
            c.last_in_txn = true;
        }
        let pos = self.next_pos(end_lsn, None);
        self.commit(t.pending, pos).await?;
        Ok(Some(end_lsn))
    }
}

/// Refuses a row record over [`MAX_RECORD_BYTES`], naming its table and
/// transaction.
fn too_large(rec: &Record, size: usize, txn: &str) -> Result<()> {
    if size <= MAX_RECORD_BYTES {
        return Ok(());
    }
    let table = match &rec.body {
        Some(record::Body::Row(c)) => format!("{}.{}", c.schema, c.table),
        _ => "a table".to_string(),
    };
    Err(Fail::Fatal(format!(
        "a row of {table} in transaction {txn} is {size} bytes; Ferry ships rows of up to {MAX_RECORD_BYTES} bytes. The change cannot be captured"
    )))
}
