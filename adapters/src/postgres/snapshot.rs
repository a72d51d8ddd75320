//! The initial snapshot: create the slot with an exported snapshot and copy the
//! tables under it: one streamed `COPY (SELECT ... ORDER BY key) TO STDOUT` per
//! table, committed in pieces (`snapshot_chunk_rows` rows or 4 MiB, whichever
//! comes first), each piece's position the key of its last row. A crash mid-copy
//! resumes after that key under a fresh view (see the module doc of `postgres`).

use std::collections::BTreeMap;

use std::fmt::Write as _;

use ferry_protocol::messages::RowOp;
use ferry_protocol::record_buf::{ColumnRef, RecordBuf, RowHead, ValueRef};
use futures_util::StreamExt;
use pg_walstream::{PgReplicationConnection, ReplicationSlotOptions, SlotType};
use tracing::{info, warn};

use super::conn::{classify_repl, Fail, Result, Target};
use super::copy_text::{Fields, Lines};
use super::position::{fmt_lsn, parse_lsn, PgPosition, SnapshotPos, StreamPos};
use super::records::{bytea_hex, Rel};
use super::run::Session;
use super::sql::{qualified, quote_ident, quote_literal, TableInfo};
use super::stream::{MAX_RECORD_BYTES, MAX_TXN_BYTES};
use crate::{now_unix_ms, Inflight};

/// Creates the slot; returns its replication connection (which must stay open
/// while an exported snapshot is being imported), its consistent point and the
/// exported snapshot's name.
pub(crate) fn create_slot(
    target: &Target,
    slot: &str,
    export: bool,
) -> Result<(PgReplicationConnection, u64, Option<String>)> {
    let mut conn = PgReplicationConnection::connect(&target.repl)
        .map_err(|e| classify_repl(target, "cannot open a replication connection", e))?;
    let opts = ReplicationSlotOptions {
        snapshot: Some(if export { "export" } else { "nothing" }.to_string()),
        ..Default::default()
    };
    let r = conn
        .create_replication_slot_with_options(slot, SlotType::Logical, Some("pgoutput"), &opts)
        .map_err(|e| classify_repl(target, "cannot create the replication slot", e))?;
    let lsn = r
        .get_value(0, 1)
        .and_then(|v| parse_lsn(&v))
        .ok_or_else(|| {
            Fail::Fatal("CREATE_REPLICATION_SLOT returned no consistent point".into())
        })?;
    let name = r.get_value(0, 2).filter(|n| !n.is_empty());
    info!(slot, consistent_point = %fmt_lsn(lsn), "replication slot created");
    Ok((conn, lsn, name))
}

/// First start with `snapshot = "initial"`.
pub(crate) async fn initial(s: &mut Session<'_>) -> Result<()> {
    let (conn, lsn, name) = create_slot(&s.target, &s.cfg.slot, true)?;
    let Some(name) = name else {
        return Err(Fail::Fatal(
            "the server exported no snapshot for the new slot".into(),
        ));
    };
    let tables: Vec<String> = s.cfg.tables.clone();
    let first = SnapshotPos {
        slot: s.cfg.slot.clone(),
        consistent_lsn: lsn,
        view_lsn: lsn,
        rows_estimate: estimate(s, tables.first()),
        tables,
        table: 0,
        last_key: None,
        rows_done: 0,
        schemas: BTreeMap::new(),
        retained_wal: s.retained(),
    };
    // Durable before anything else can fail: from here on a restart finds the
    // slot it created and resumes (under a fresh view if this one is lost).
    s.commit(Vec::new(), &PgPosition::Snapshot(first.clone()))
        .await?;
    s.sql
        .execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&name)
        ))
        .await?;
    // Imported: the transaction keeps the snapshot; the exporting session may go.
    drop(conn);
    info!(consistent_point = %fmt_lsn(lsn), "initial snapshot started");
    copy(s, first).await
}

/// A snapshot interrupted by a crash: continue under a fresh view.
pub(crate) async fn resume(s: &mut Session<'_>, mut pos: SnapshotPos) -> Result<()> {
    s.sql
        .execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    let rows = s
        .sql
        .text_rows("SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END")
        .await?;
    pos.view_lsn = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| parse_lsn(&v))
        .unwrap_or(pos.consistent_lsn);
    if let Some(t) = pos.tables.get(pos.table) {
        warn!(
            table = %t,
            rows_done = pos.rows_done,
            view = %fmt_lsn(pos.view_lsn),
            consistent_point = %fmt_lsn(pos.consistent_lsn),
            "the initial snapshot was interrupted; copying the rest under a fresh view. Rows copied from now on may be followed by replays of their changes since the consistent point; applied by primary key they converge"
        );
    }
    copy(s, pos).await
}

fn estimate(s: &Session<'_>, table: Option<&String>) -> u64 {
    table
        .and_then(|t| {
            s.tables
                .iter()
                .find(|i| &format!("{}.{}", i.schema, i.table) == t)
        })
        .map_or(0, |i| i.reltuples.max(0.0) as u64)
}

/// Pieces of a table in flight to the buffer while the copy reads on.
const INFLIGHT: usize = 3;

/// Copies from `pos` to the end, then moves to streaming at the consistent point.
/// Commits are pipelined; whatever way the copy ends, those in flight are waited
/// for first, so the session's durable position is exact when it returns.
async fn copy(s: &mut Session<'_>, pos: SnapshotPos) -> Result<()> {
    let mut inflight = Inflight::new(INFLIGHT);
    let r = copy_pipelined(s, pos, &mut inflight).await;
    let drained = s.drain(&mut inflight).await;
    r.and(drained)
}

async fn copy_pipelined(
    s: &mut Session<'_>,
    mut pos: SnapshotPos,
    inflight: &mut Inflight<PgPosition>,
) -> Result<()> {
    let started = tokio::time::Instant::now();
    let mut copied: u64 = 0;
    while pos.table < pos.tables.len() {
        let name = pos.tables[pos.table].clone();
        let Some(info) = s
            .tables
            .iter()
            .find(|i| format!("{}.{}", i.schema, i.table) == name)
            .cloned()
        else {
            warn!(table = %name, "table is no longer in source.tables; not copied");
            next_table(s, &mut pos);
            s.drain(inflight).await?;
            s.commit(Vec::new(), &PgPosition::Snapshot(pos.clone()))
                .await?;
            continue;
        };
        let rel = Rel::from_table(&info);
        let mut pending = RecordBuf::new();
        let fp = rel.fingerprint();
        if pos.schemas.get(&name) != Some(&fp) {
            pending.push(&rel.schema_record(pos.view_lsn));
            pos.schemas.insert(name.clone(), fp);
        }
        let table = TableCopy {
            rel: &rel,
            name: &name,
            nkey: info.page_key.len().max(1),
            max_rows: s.cfg.snapshot_chunk_rows,
        };
        let stream = s
            .sql
            .copy_out(&copy_sql(&info, pos.last_key.as_deref()))
            .await?;
        let mut stream = std::pin::pin!(stream);
        let mut lines = Lines::default();
        let mut row = RowEncoder::new(&table, pos.view_lsn);
        // Rows in `pending`, and the key of the last of them once a piece is full.
        let mut piece_rows = 0usize;
        let mut cut: Option<Vec<String>> = None;
        loop {
            let chunk = tokio::select! {
                _ = s.ctx.shutdown.cancelled() => {
                    return Err(Fail::Source(crate::SourceError::Shutdown));
                }
                c = stream.next() => c,
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| s.sql.fail("the snapshot's COPY failed", &e))?;
            lines.feed(&chunk, |line| {
                row.push(&mut pending, line, pos.rows_done)?;
                pos.rows_done += 1;
                piece_rows += 1;
                if pending.len() >= MAX_TXN_BYTES || piece_rows >= table.max_rows {
                    cut = Some(row.key(line));
                }
                Ok::<(), Fail>(())
            })?;
            if let Some(key) = cut.take() {
                pos.last_key = Some(key);
                pos.retained_wal = s.retained();
                copied += piece_rows as u64;
                piece_rows = 0;
                // The next piece is about as large: allocate it whole once, not by
                // doubling (each doubling a copy and fresh pages).
                let size = pending.len() + pending.len() / 8;
                let piece = std::mem::replace(&mut pending, RecordBuf::with_capacity(size));
                s.submit(inflight, piece, &PgPosition::Snapshot(pos.clone()))
                    .await?;
                throttle(s, started, copied).await?;
            }
        }
        if lines.unfinished() > 0 {
            return Err(Fail::Fatal(format!(
                "the snapshot's COPY of {name} ended inside a row"
            )));
        }
        copied += piece_rows as u64;
        next_table(s, &mut pos);
        pos.retained_wal = s.retained();
        s.submit(inflight, pending.take(), &PgPosition::Snapshot(pos.clone()))
            .await?;
        info!(table = %name, "table copied");
    }
    s.drain(inflight).await?;
    s.sql.execute("COMMIT").await?;
    let streaming = PgPosition::Streaming(StreamPos {
        slot: pos.slot.clone(),
        lsn: pos.consistent_lsn,
        partial: None,
        schemas: pos.schemas.clone(),
        retained_wal: s.retained(),
    });
    s.commit(Vec::new(), &streaming).await?;
    info!(from = %fmt_lsn(pos.consistent_lsn), "initial snapshot complete");
    Ok(())
}

/// A table being copied.
struct TableCopy<'a> {
    rel: &'a Rel,
    name: &'a str,
    /// Leading key columns in each COPY row, before the published columns.
    nkey: usize,
    /// Rows per commit at most (`snapshot_chunk_rows`).
    max_rows: usize,
}

/// Encodes COPY rows as INSERT records; its buffers are reused from row to row.
struct RowEncoder<'a> {
    table: &'a TableCopy<'a>,
    view_lsn: u64,
    now: u64,
    fields: Fields,
    position: String,
    /// Decoded `bytea` values of the current row.
    hex: Vec<u8>,
}

impl<'a> RowEncoder<'a> {
    fn new(table: &'a TableCopy<'a>, view_lsn: u64) -> Self {
        RowEncoder {
            table,
            view_lsn,
            now: now_unix_ms(),
            fields: Fields::default(),
            position: String::with_capacity(64),
            hex: Vec::new(),
        }
    }

    /// Appends one COPY line (key columns, then every published column) to `buf`
    /// as the table's row number `index`.
    fn push(&mut self, buf: &mut RecordBuf, line: &[u8], index: u64) -> Result<()> {
        let t = self.table;
        let rel = t.rel;
        let line = self
            .fields
            .split(line, t.nkey + rel.cols.len())
            .map_err(|e| Fail::Fatal(format!("the snapshot's COPY of {}: {e}", t.name)))?;
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        self.position.clear();
        // Writing to a String cannot fail.
        let _ = write!(self.position, "snapshot {} #{index}", t.name);
        let head = RowHead {
            schema: &rel.schema,
            table: &rel.table,
            op: RowOp::Insert,
            xid: 0,
            commit_lsn: self.view_lsn,
            commit_time_unix_us: 0,
            change_index: index,
            last_in_txn: true,
            snapshot: true,
        };
        let fields = &self.fields;
        let value = |i: usize| fields.get(line, t.nkey + i);
        // bytea text output (`\x` + hex) travels as its bytes: decode those first,
        // into one scratch buffer, so the columns can borrow from it.
        let hex = &mut self.hex;
        hex.clear();
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (i, c) in rel.cols.iter().enumerate() {
            if let Some(b) = value(i).and_then(|v| bytea_hex(c, v)) {
                let at = hex.len();
                hex.resize(at + b.len() / 2, 0);
                if hex::decode_to_slice(b, &mut hex[at..]).is_ok() {
                    spans.push((i, at));
                } else {
                    hex.truncate(at);
                }
            }
        }
        let hex = &self.hex;
        let cols: Vec<ColumnRef<'_>> = rel
            .cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let value = match value(i) {
                    None => ValueRef::Null,
                    Some(v) => match spans.iter().find(|(j, _)| *j == i) {
                        Some(&(_, at)) => {
                            let len = (v.len() - 2) / 2;
                            ValueRef::Bytes(hex.get(at..at + len).unwrap_or_default())
                        }
                        None => ValueRef::Text(v),
                    },
                };
                ColumnRef {
                    name: &c.name,
                    type_name: &c.type_name,
                    type_oid: c.type_oid,
                    value,
                }
            })
            .collect();
        let before = buf.len();
        buf.push_row(self.now, &self.position, &head, &cols, &[]);
        let size = buf.len() - before;
        if size > MAX_RECORD_BYTES {
            return Err(Fail::Fatal(format!(
                "a row of {} (key {:?}) is {size} bytes; Ferry ships rows of up to {MAX_RECORD_BYTES} bytes",
                t.name,
                self.key(line.as_bytes())
            )));
        }
        Ok(())
    }

    /// The text of the paging key of `line`, the line last pushed.
    fn key(&self, line: &[u8]) -> Vec<String> {
        let line = std::str::from_utf8(line).unwrap_or_default();
        (0..self.table.nkey)
            .map(|i| self.fields.get(line, i).unwrap_or_default().to_string())
            .collect()
    }
}

fn next_table(s: &Session<'_>, pos: &mut SnapshotPos) {
    pos.table += 1;
    pos.last_key = None;
    pos.rows_done = 0;
    pos.rows_estimate = estimate(s, pos.tables.get(pos.table));
}

/// Keeps the copy under `snapshot_rows_per_second`.
async fn throttle(s: &Session<'_>, started: tokio::time::Instant, copied: u64) -> Result<()> {
    let Some(rps) = s.cfg.snapshot_rows_per_second else {
        return Ok(());
    };
    let due = started + std::time::Duration::from_secs_f64(copied as f64 / rps.max(1) as f64);
    tokio::select! {
        _ = s.ctx.shutdown.cancelled() => Err(Fail::Source(crate::SourceError::Shutdown)),
        _ = tokio::time::sleep_until(due) => Ok(()),
    }
}

/// The rest of a table in key order, from after `after`: key columns first, then
/// every published column.
fn copy_sql(t: &TableInfo, after: Option<&[String]>) -> String {
    let (keys, casts): (Vec<String>, Vec<String>) = if t.page_key.is_empty() {
        (vec!["ctid".to_string()], vec!["tid".to_string()])
    } else {
        t.page_key
            .iter()
            .map(|k| {
                let base = t
                    .cols
                    .iter()
                    .find(|c| &c.name == k)
                    .map_or("text".to_string(), |c| c.base_type.clone());
                (quote_ident(k), base)
            })
            .unzip()
    };
    let cols: Vec<String> = t.cols.iter().map(|c| quote_ident(&c.name)).collect();
    let mut conds = Vec::new();
    if let Some(f) = &t.row_filter {
        conds.push(format!("({f})"));
    }
    if let Some(after) = after {
        let lits: Vec<String> = after
            .iter()
            .zip(&casts)
            .map(|(v, c)| format!("{}::{c}", quote_literal(v)))
            .collect();
        conds.push(format!("({}) > ({})", keys.join(", "), lits.join(", ")));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let select: Vec<String> = keys.iter().cloned().chain(cols).collect();
    format!(
        "COPY (SELECT {} FROM {}{filter} ORDER BY {}) TO STDOUT",
        select.join(", "),
        qualified(&t.schema, &t.table),
        keys.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::sql::ColInfo;

    fn col(name: &str, base: &str) -> ColInfo {
        ColInfo {
            name: name.into(),
            type_oid: 23,
            typmod: -1,
            type_name: base.into(),
            base_type: base.into(),
            key: false,
        }
    }

    #[test]
    fn copies_page_by_key() {
        let mut t = TableInfo {
            schema: "public".into(),
            table: "Person".into(),
            replident: 'd',
            reltuples: 0.0,
            has_pk: true,
            cols: vec![col("a", "integer"), col("b", "text"), col("c", "text")],
            page_key: vec!["a".into(), "b".into()],
            row_filter: None,
        };
        assert_eq!(
            copy_sql(&t, None),
            r#"COPY (SELECT "a", "b", "a", "b", "c" FROM "public"."Person" ORDER BY "a", "b") TO STDOUT"#
        );
        assert_eq!(
            copy_sql(&t, Some(&["1".into(), "it's".into()])),
            r#"COPY (SELECT "a", "b", "a", "b", "c" FROM "public"."Person" WHERE ("a", "b") > ('1'::integer, 'it''s'::text) ORDER BY "a", "b") TO STDOUT"#
        );
        t.page_key.clear();
        t.row_filter = Some("a > 5".into());
        assert_eq!(
            copy_sql(&t, Some(&["(0,3)".into()])),
            r#"COPY (SELECT ctid, "a", "b", "c" FROM "public"."Person" WHERE (a > 5) AND (ctid) > ('(0,3)'::tid) ORDER BY ctid) TO STDOUT"#
        );
    }
}
