//! The initial snapshot: create the slot with an exported snapshot and copy the
//! tables under it, in key order and in chunks, each chunk one commit. A crash
//! mid-copy resumes under a fresh view (see the module doc of `postgres`).

use std::collections::BTreeMap;

use std::fmt::Write as _;

use ferry_protocol::messages::RowOp;
use ferry_protocol::record_buf::{ColumnRef, RecordBuf, RowHead, ValueRef};
use pg_walstream::{PgReplicationConnection, ReplicationSlotOptions, SlotType};
use tokio_postgres::SimpleQueryRow;
use tracing::{info, warn};

use super::conn::{classify_repl, Fail, Result, Target};
use super::position::{fmt_lsn, parse_lsn, PgPosition, SnapshotPos, StreamPos};
use super::records::{bytea_hex, Rel};
use super::run::Session;
use super::sql::{qualified, quote_ident, quote_literal, TableInfo};
use super::stream::{MAX_RECORD_BYTES, MAX_TXN_BYTES};
use crate::{now_unix_ms, Inflight};

/// Rough memory a snapshot chunk may take (rows are fetched a chunk at a time).
const CHUNK_MEMORY: usize = 32 << 20;

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

/// Chunks of a table in flight to the buffer while the next one is fetched.
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
        let rel = std::sync::Arc::new(Rel::from_table(&info));
        let mut pending = RecordBuf::new();
        let fp = rel.fingerprint();
        if pos.schemas.get(&name) != Some(&fp) {
            pending.push(&rel.schema_record(pos.view_lsn));
            pos.schemas.insert(name.clone(), fp);
        }
        let nkey = info.page_key.len().max(1);
        let mut limit = s.cfg.snapshot_chunk_rows;
        let mut rows = s
            .sql
            .rows(&chunk_sql(&info, pos.last_key.as_deref(), limit))
            .await?;
        loop {
            let last_chunk = rows.len() < limit;
            let total = rows.len();
            if let Some(row) = rows.last() {
                pos.last_key = Some(row_key(row, nkey));
            }
            // The server runs the next chunk's query while this one is encoded.
            let job = EncodeJob {
                rel: rel.clone(),
                table: name.clone(),
                view_lsn: pos.view_lsn,
                first_index: pos.rows_done,
                nkey,
                last_chunk,
                pending: std::mem::take(&mut pending),
            };
            let encoding = tokio::task::spawn_blocking(move || job.run(rows));
            let next = async {
                if last_chunk {
                    Ok(Vec::new())
                } else {
                    s.sql
                        .rows(&chunk_sql(&info, pos.last_key.as_deref(), limit))
                        .await
                }
            };
            let (encoded, next) = tokio::join!(encoding, next);
            let encoded =
                encoded.map_err(|e| Fail::Fatal(format!("snapshot encoding failed: {e}")))??;
            rows = next?;
            let chunk_bytes: usize = encoded.pieces.iter().map(|p| p.0.len()).sum();
            for (buf, done, key) in encoded.pieces {
                pos.rows_done = done;
                // The chunk's last piece carries the chunk's position, set above.
                let last_key = std::mem::replace(&mut pos.last_key, key);
                pos.retained_wal = s.retained();
                s.submit(inflight, buf, &PgPosition::Snapshot(pos.clone()))
                    .await?;
                pos.last_key = last_key;
            }
            pos.rows_done = encoded.rows_done;
            pending = encoded.rest;
            copied += total as u64;
            // Wide rows: keep a chunk's result (held in memory whole) near 32 MiB.
            if let Some(per_row) = chunk_bytes.checked_div(total) {
                limit = (CHUNK_MEMORY / per_row.max(1)).clamp(1, s.cfg.snapshot_chunk_rows);
            }
            if last_chunk {
                next_table(s, &mut pos);
            }
            if !pending.is_empty() || last_chunk {
                pos.retained_wal = s.retained();
                s.submit(inflight, pending.take(), &PgPosition::Snapshot(pos.clone()))
                    .await?;
            }
            throttle(s, started, copied).await?;
            if last_chunk {
                info!(table = %name, "table copied");
                break;
            }
        }
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

/// One chunk of rows to encode, off the async threads.
struct EncodeJob {
    rel: std::sync::Arc<Rel>,
    table: String,
    view_lsn: u64,
    /// Number of the chunk's first row within its table.
    first_index: u64,
    nkey: usize,
    last_chunk: bool,
    /// Records not yet submitted (a table's schema record).
    pending: RecordBuf,
}

struct Encoded {
    /// Full pieces to submit in order: records, rows done after them, the key of
    /// their last row.
    pieces: Vec<(RecordBuf, u64, Option<Vec<String>>)>,
    /// What is left after the last full piece, and the rows done after it.
    rest: RecordBuf,
    rows_done: u64,
}

impl EncodeJob {
    fn run(self, rows: Vec<SimpleQueryRow>) -> Result<Encoded> {
        let rel = &self.rel;
        let head = RowHead {
            schema: &rel.schema,
            table: &rel.table,
            op: RowOp::Insert,
            xid: 0,
            commit_lsn: self.view_lsn,
            commit_time_unix_us: 0,
            change_index: 0,
            last_in_txn: true,
            snapshot: true,
        };
        let mut pending = self.pending;
        let mut pieces = Vec::new();
        let mut position = String::with_capacity(64);
        let mut hex = Vec::new();
        let mut done = self.first_index;
        let now = now_unix_ms();
        let total = rows.len();
        for (i, row) in rows.iter().enumerate() {
            let before = pending.len();
            let index = u32::try_from(done).unwrap_or(u32::MAX);
            position.clear();
            // Writing to a String cannot fail.
            let _ = write!(position, "snapshot {} #{index}", self.table);
            let head = RowHead {
                change_index: index,
                ..head
            };
            push_row(
                &mut pending,
                &mut hex,
                now,
                &position,
                &head,
                rel,
                row,
                self.nkey,
            );
            let size = pending.len() - before;
            if size > MAX_RECORD_BYTES {
                return Err(Fail::Fatal(format!(
                    "a row of {} (key {:?}) is {size} bytes; Ferry ships rows of up to {MAX_RECORD_BYTES} bytes",
                    self.table,
                    row_key(row, self.nkey)
                )));
            }
            done += 1;
            let end_of_rows = i + 1 == total;
            if pending.len() >= MAX_TXN_BYTES && !(end_of_rows && self.last_chunk) {
                pieces.push((pending.take(), done, Some(row_key(row, self.nkey))));
            }
        }
        Ok(Encoded {
            pieces,
            rest: pending,
            rows_done: done,
        })
    }
}

/// The text of a row's paging key (its first `nkey` columns).
fn row_key(row: &SimpleQueryRow, nkey: usize) -> Vec<String> {
    (0..nkey.min(row.len()))
        .map(|i| row.get(i).unwrap_or_default().to_string())
        .collect()
}

/// One snapshot row (key columns first, then every published column, as text)
/// encoded as an INSERT record; `hex` is scratch space for `bytea` values.
#[allow(clippy::too_many_arguments)]
fn push_row(
    buf: &mut RecordBuf,
    hex: &mut Vec<u8>,
    now: u64,
    position: &str,
    head: &RowHead<'_>,
    rel: &Rel,
    row: &SimpleQueryRow,
    nkey: usize,
) {
    // bytea text output (`\x` + hex) travels as its bytes: decode those first,
    // into one scratch buffer, so the columns can borrow from it.
    hex.clear();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (i, c) in rel.cols.iter().enumerate() {
        if let Some(b) = row.get(nkey + i).and_then(|t| bytea_hex(c, t)) {
            let at = hex.len();
            hex.resize(at + b.len() / 2, 0);
            if hex::decode_to_slice(b, &mut hex[at..]).is_ok() {
                spans.push((i, at));
            } else {
                hex.truncate(at);
            }
        }
    }
    let cols: Vec<ColumnRef<'_>> = rel
        .cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let value = match row.get(nkey + i) {
                None => ValueRef::Null,
                Some(t) => match spans.iter().find(|(j, _)| *j == i) {
                    Some(&(_, at)) => {
                        let len = (t.len() - 2) / 2;
                        ValueRef::Bytes(hex.get(at..at + len).unwrap_or_default())
                    }
                    None => ValueRef::Text(t),
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
    buf.push_row(now, position, head, &cols, &[]);
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

/// The next chunk: key columns first (as text), then every published column.
fn chunk_sql(t: &TableInfo, after: Option<&[String]>, limit: usize) -> String {
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
        "SELECT {} FROM {}{filter} ORDER BY {} LIMIT {limit}",
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
    fn chunk_queries_page_by_key() {
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
            chunk_sql(&t, None, 10),
            r#"SELECT "a", "b", "a", "b", "c" FROM "public"."Person" ORDER BY "a", "b" LIMIT 10"#
        );
        assert_eq!(
            chunk_sql(&t, Some(&["1".into(), "it's".into()]), 10),
            r#"SELECT "a", "b", "a", "b", "c" FROM "public"."Person" WHERE ("a", "b") > ('1'::integer, 'it''s'::text) ORDER BY "a", "b" LIMIT 10"#
        );
        t.page_key.clear();
        t.row_filter = Some("a > 5".into());
        assert_eq!(
            chunk_sql(&t, Some(&["(0,3)".into()]), 5),
            r#"SELECT ctid, "a", "b", "c" FROM "public"."Person" WHERE (a > 5) AND (ctid) > ('(0,3)'::tid) ORDER BY ctid LIMIT 5"#
        );
    }
}
