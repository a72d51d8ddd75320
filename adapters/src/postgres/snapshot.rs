//! The initial snapshot: create the slot with an exported snapshot and copy the
//! tables under it: one streamed `COPY (SELECT ... ORDER BY key) TO STDOUT` per
//! table, committed in pieces (`snapshot_chunk_rows` rows or 4 MiB, whichever
//! comes first), each piece's position the key of its last row. A crash mid-copy
//! resumes after that key under a fresh view (see the module doc of `postgres`).

use std::collections::BTreeMap;

use ferry_protocol::copy_text::{check_block, Fields, Lines};
use ferry_protocol::messages::{record, Record, Rows, TableColumn};
use ferry_protocol::record_buf::RecordBuf;
use ferry_protocol::rows::{lsn_position, POSTGRES};
use futures_util::StreamExt;
use pg_walstream::{PgReplicationConnection, ReplicationSlotOptions, SlotType};
use prost::Message as _;
use tracing::{info, warn};

use super::conn::{classify_repl, Fail, Result, Target};
use super::position::{fmt_lsn, parse_lsn, PgPosition, SnapshotPos, StreamPos};
use super::records::Rel;
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
    // Waited on only while the server has nothing ready (one registration for
    // the whole copy, none per COPY message), and checked between pieces.
    let shutdown = s.ctx.shutdown.clone();
    let cancelled = shutdown.cancelled();
    let mut cancelled = std::pin::pin!(cancelled);
    let stop = || Err(Fail::Source(crate::SourceError::Shutdown));
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
        let (sql, key_at) = copy_sql(&info, pos.last_key.as_deref());
        let stream = s.sql.copy_out(&sql).await?;
        let mut stream = std::pin::pin!(stream);
        let mut lines = Lines::default();
        let mut block = BlockEncoder::new(&rel, &name, key_at, pos.view_lsn);
        let max_rows = s.cfg.snapshot_chunk_rows;
        // Pieces completed by the lines of one COPY message: (piece, key of its
        // last row, rows done at its end).
        let mut ready: Vec<(RecordBuf, Vec<String>, u64)> = Vec::new();
        let mut rows_done = pos.rows_done;
        loop {
            let chunk = tokio::select! {
                biased;
                c = stream.next() => c,
                _ = &mut cancelled => return stop(),
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| s.sql.fail("the snapshot's COPY failed", &e))?;
            lines.feed(&chunk, |line| {
                let row = block.row_of(line)?;
                if block.would_overflow(line.len() - row) {
                    // A large row: what the block holds goes first.
                    let key = block.last_key()?;
                    ready.push((block.finish(&mut pending)?, key, rows_done));
                }
                block.push(line, row, rows_done);
                rows_done += 1;
                if block.bytes() >= MAX_TXN_BYTES || block.rows() >= max_rows {
                    let key = block.last_key()?;
                    ready.push((block.finish(&mut pending)?, key, rows_done));
                }
                Ok::<(), Fail>(())
            })?;
            for (piece, key, done) in ready.drain(..) {
                if shutdown.is_cancelled() {
                    return stop();
                }
                copied += done - pos.rows_done;
                pos.last_key = Some(key);
                pos.rows_done = done;
                pos.retained_wal = s.retained();
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
        let piece = block.finish(&mut pending)?;
        copied += rows_done - pos.rows_done;
        pos.rows_done = rows_done;
        next_table(s, &mut pos);
        pos.retained_wal = s.retained();
        s.submit(inflight, piece, &PgPosition::Snapshot(pos.clone()))
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

/// Gathers a table's COPY rows into [`Rows`] records, as the server wrote
/// them (less any leading key fields): appending a row is a copy of its bytes.
/// Its buffers are reused from block to block.
struct BlockEncoder<'a> {
    rel: &'a Rel,
    name: &'a str,
    key_at: KeyAt,
    view_lsn: u64,
    columns: Vec<TableColumn>,
    /// Largest text a block may hold: a record, with its columns, must fit in
    /// [`MAX_RECORD_BYTES`].
    max_text: usize,
    text: Vec<u8>,
    rows: usize,
    first: u64,
    /// Where the last row pushed starts in `text`.
    last: usize,
    /// With [`KeyAt::Lead`]: the leading key fields of the last row pushed.
    lead: Vec<u8>,
    fields: Fields,
}

impl<'a> BlockEncoder<'a> {
    fn new(rel: &'a Rel, name: &'a str, key_at: KeyAt, view_lsn: u64) -> Self {
        let columns = rel.table_columns();
        let head: usize = columns.iter().map(|c| c.encoded_len() + 8).sum();
        BlockEncoder {
            rel,
            name,
            key_at,
            view_lsn,
            columns,
            max_text: MAX_RECORD_BYTES.saturating_sub(head + 4096),
            text: Vec::new(),
            rows: 0,
            first: 0,
            last: 0,
            lead: Vec::new(),
            fields: Fields::default(),
        }
    }

    fn rows(&self) -> usize {
        self.rows
    }

    fn bytes(&self) -> usize {
        self.text.len()
    }

    /// Where the published columns of `line` start, after any leading key fields.
    fn row_of(&self, line: &[u8]) -> Result<usize> {
        let mut at = 0;
        if let KeyAt::Lead(n) = self.key_at {
            for _ in 0..n {
                match memchr::memchr(b'\t', &line[at..]) {
                    Some(i) => at += i + 1,
                    None => {
                        return Err(Fail::Fatal(format!(
                            "the snapshot's COPY of {}: a row without its key and columns",
                            self.name
                        )))
                    }
                }
            }
        }
        let size = line.len() - at;
        if size > self.max_text {
            return Err(Fail::Fatal(format!(
                "a row of {} is {size} bytes; Ferry ships rows of up to {} bytes",
                self.name, self.max_text
            )));
        }
        Ok(at)
    }

    /// Whether a row of `size` bytes would not fit in the block.
    fn would_overflow(&self, size: usize) -> bool {
        self.rows > 0 && self.text.len() + size + 1 > self.max_text
    }

    /// Appends the row of `line` (starting at `at`), the table's row `index`.
    fn push(&mut self, line: &[u8], at: usize, index: u64) {
        if self.rows == 0 {
            self.first = index;
        }
        self.last = self.text.len();
        self.text.extend_from_slice(&line[at..]);
        self.text.push(b'\n');
        self.rows += 1;
        if at > 0 {
            self.lead.clear();
            self.lead.extend_from_slice(&line[..at - 1]);
        }
    }

    /// The text of the paging key of the last row pushed.
    fn last_key(&mut self) -> Result<Vec<String>> {
        let fail = |e| Fail::Fatal(format!("the snapshot's COPY of {}: key: {e}", self.name));
        match &self.key_at {
            KeyAt::Lead(n) => {
                let text = self.fields.split(&self.lead, *n).map_err(fail)?;
                Ok((0..*n)
                    .map(|i| self.fields.get(text, i).unwrap_or_default().to_string())
                    .collect())
            }
            KeyAt::Columns(idx) => {
                let end = self.text.len().saturating_sub(1);
                let row = self.text.get(self.last..end).unwrap_or_default();
                let text = self.fields.split(row, self.columns.len()).map_err(fail)?;
                Ok(idx
                    .iter()
                    .map(|&i| self.fields.get(text, i).unwrap_or_default().to_string())
                    .collect())
            }
        }
    }

    /// Appends the block (if it holds rows) to `pending`, and returns `pending`
    /// as the piece to commit.
    fn finish(&mut self, pending: &mut RecordBuf) -> Result<RecordBuf> {
        if self.rows > 0 {
            let text = String::from_utf8(std::mem::take(&mut self.text)).map_err(|e| {
                Fail::Fatal(format!(
                    "the snapshot's COPY of {} sent text that is not UTF-8: {e}",
                    self.name
                ))
            })?;
            let rows = u32::try_from(self.rows).unwrap_or(u32::MAX);
            check_block(&text, self.columns.len(), u64::from(rows))
                .map_err(|e| Fail::Fatal(format!("the snapshot's COPY of {}: {e}", self.name)))?;
            let last = self.first + u64::from(rows) - 1;
            let record = Record {
                time_unix_ms: now_unix_ms(),
                position: format!("snapshot {} #{}-{last}", self.name, self.first),
                body: Some(record::Body::Rows(Rows {
                    schema: self.rel.schema.clone(),
                    table: self.rel.table.clone(),
                    columns: std::mem::take(&mut self.columns),
                    position: lsn_position(self.view_lsn),
                    first_index: self.first,
                    row_count: rows,
                    copy_text: text,
                    source: POSTGRES.to_string(),
                })),
            };
            pending.push(&record);
            if let Some(record::Body::Rows(b)) = record.body {
                self.columns = b.columns;
                self.text = b.copy_text.into_bytes();
                self.text.clear();
            }
            self.rows = 0;
        }
        // The next piece is about as large: allocate it whole once, not by
        // doubling (each doubling a copy and fresh pages).
        let size = pending.len() + pending.len() / 8;
        Ok(std::mem::replace(pending, RecordBuf::with_capacity(size)))
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

/// Where a COPY row's paging key is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyAt {
    /// These published columns (the primary key or replica-identity index).
    Columns(Vec<usize>),
    /// This many leading fields, before the published columns (`ctid`, or a key
    /// the publication does not publish); they are not shipped.
    Lead(usize),
}

/// The rest of a table in key order, from after `after`, and where each row's
/// key is in it.
fn copy_sql(t: &TableInfo, after: Option<&[String]>) -> (String, KeyAt) {
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
    let published: Option<Vec<usize>> = if t.page_key.is_empty() {
        None
    } else {
        t.page_key
            .iter()
            .map(|k| t.cols.iter().position(|c| &c.name == k))
            .collect()
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
    let (select, at): (Vec<String>, KeyAt) = match published {
        Some(idx) => (cols, KeyAt::Columns(idx)),
        None => (
            keys.iter().cloned().chain(cols).collect(),
            KeyAt::Lead(keys.len()),
        ),
    };
    let sql = format!(
        "COPY (SELECT {} FROM {}{filter} ORDER BY {}) TO STDOUT",
        select.join(", "),
        qualified(&t.schema, &t.table),
        keys.join(", ")
    );
    (sql, at)
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
            page_key: vec!["b".into(), "a".into()],
            row_filter: None,
        };
        assert_eq!(
            copy_sql(&t, None),
            (
                r#"COPY (SELECT "a", "b", "c" FROM "public"."Person" ORDER BY "b", "a") TO STDOUT"#
                    .to_string(),
                KeyAt::Columns(vec![1, 0])
            )
        );
        assert_eq!(
            copy_sql(&t, Some(&["it's".into(), "1".into()])).0,
            r#"COPY (SELECT "a", "b", "c" FROM "public"."Person" WHERE ("b", "a") > ('it''s'::text, '1'::integer) ORDER BY "b", "a") TO STDOUT"#
        );
        // A key the publication does not publish is read ahead of the columns.
        t.page_key = vec!["k".into()];
        assert_eq!(
            copy_sql(&t, None),
            (
                r#"COPY (SELECT "k", "a", "b", "c" FROM "public"."Person" ORDER BY "k") TO STDOUT"#
                    .to_string(),
                KeyAt::Lead(1)
            )
        );
        t.page_key.clear();
        t.row_filter = Some("a > 5".into());
        assert_eq!(
            copy_sql(&t, Some(&["(0,3)".into()])),
            (
                r#"COPY (SELECT ctid, "a", "b", "c" FROM "public"."Person" WHERE (a > 5) AND (ctid) > ('(0,3)'::tid) ORDER BY ctid) TO STDOUT"#
                    .to_string(),
                KeyAt::Lead(1)
            )
        );
    }
}
