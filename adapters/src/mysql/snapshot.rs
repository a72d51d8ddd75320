//! The initial snapshot (`snapshot = "initial"`): the captured tables' rows as
//! of one binlog position, read in primary-key order inside one consistent
//! snapshot transaction and committed in pieces, each with how far it got; then
//! the stream starts at that position (see the module doc of `mysql.rs`).

use std::time::Duration;

use ferry_protocol::copy_text::{check_block, push_bytes, push_text};
use ferry_protocol::messages::{field, record, Field, Record, Row, RowOp, Rows, TableColumn};
use ferry_protocol::record_buf::{RecordBuf, ValueRef};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value};
use tracing::{info, warn};

use super::conn::{self, classify};
use super::image::{is_raw, raw_flags, Rendered};
use super::position::{KeyValue, MyPosition, SnapshotState};
use super::schema::{self, Kind, Shape, MYSQL};
use super::stream::current_position;
use super::{split_table, values, MysqlConfig};
use crate::{now_unix_ms, Inflight, SourceContext, SourceError};

/// Pieces in flight to the buffer while the copy reads on.
const INFLIGHT: usize = 3;
/// A piece is cut at this much row text...
const PIECE_BYTES: usize = 4 << 20;
/// ...and no row may be larger than this (a record must fit in a batch).
const MAX_ROW_BYTES: usize = 7 << 20;

/// Runs the initial snapshot from `resume` (a stored position that still has
/// one under way) or from the start; returns the position the stream starts
/// at, committed.
pub(crate) async fn run(
    cfg: &MysqlConfig,
    ctx: &SourceContext,
    opts: &mysql_async::Opts,
    dsn: &conn::Dsn,
    mariadb: bool,
    resume: Option<MyPosition>,
) -> Result<MyPosition, SourceError> {
    let mut c = conn::connect(opts, dsn).await?;
    for s in [
        // TIMESTAMP values in UTC, rendered with `+00` as the binlog's are.
        "SET SESSION time_zone = '+00:00'",
        // Character data as stored, decoded by each column's character set as
        // the binlog's is (no conversion, no replacement by the server).
        "SET SESSION character_set_results = NULL",
        "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    ] {
        c.query_drop(s)
            .await
            .map_err(|e| classify("preparing the snapshot connection", e))?;
    }
    let pos = match resume {
        Some(p) => {
            start_transaction(&mut c).await?;
            if let Some(s) = &p.snapshot {
                warn!(
                    table = s.tables.get(s.table).map(String::as_str).unwrap_or(""),
                    rows_done = s.rows_done,
                    from = %p.at(),
                    "the initial snapshot was interrupted; copying the rest under a fresh view. Rows copied \
                     from now on may be followed by replays of their changes since the snapshot's position; \
                     applied by primary key they converge"
                );
            }
            p
        }
        None => {
            let mut p = consistent_point(&mut c, mariadb).await?;
            p.snapshot = Some(SnapshotState {
                tables: cfg.tables.clone(),
                table: 0,
                last_key: None,
                rows_done: 0,
                rows_estimate: 0,
            });
            // Durable before the copy: a restart resumes this snapshot, and the
            // stream starts at this point whatever happens.
            ctx.commit(Vec::<Record>::new(), p.encode()?).await?;
            info!(at = %p.at(), gtid = %p.gtid, "initial snapshot started");
            p
        }
    };
    let mut inflight = Inflight::new(INFLIGHT);
    let copied = copy(cfg, ctx, &mut c, pos, &mut inflight).await;
    let drained = inflight.drain().await;
    let mut pos = copied?;
    drained?;
    c.query_drop("COMMIT")
        .await
        .map_err(|e| classify("ending the snapshot transaction", e))?;
    pos.snapshot = None;
    ctx.commit(Vec::<Record>::new(), pos.encode()?).await?;
    info!(from = %pos.at(), "initial snapshot complete");
    Ok(pos)
}

async fn start_transaction(c: &mut Conn) -> Result<(), SourceError> {
    c.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .await
        .map_err(|e| classify("starting the snapshot transaction", e))
}

/// Starts the snapshot transaction and returns the binlog position it is
/// consistent with. MariaDB states it without a lock
/// (`binlog_snapshot_file`/`_position`); MySQL holds `FLUSH TABLES WITH READ
/// LOCK` just long enough to read the position and start the transaction.
async fn consistent_point(c: &mut Conn, mariadb: bool) -> Result<MyPosition, SourceError> {
    if !mariadb {
        c.query_drop("FLUSH TABLES WITH READ LOCK")
            .await
            .map_err(|e| {
                classify(
                    "FLUSH TABLES WITH READ LOCK (needs the RELOAD privilege)",
                    e,
                )
            })?;
        let p = current_position(c, false).await;
        let started = start_transaction(c).await;
        let unlocked = c
            .query_drop("UNLOCK TABLES")
            .await
            .map_err(|e| classify("UNLOCK TABLES", e));
        let p = p?;
        started?;
        unlocked?;
        return Ok(p);
    }
    start_transaction(c).await?;
    let rows: Vec<(String, String)> = c
        .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
        .await
        .map_err(|e| classify("SHOW STATUS LIKE 'binlog_snapshot_%'", e))?;
    let get = |n: &str| {
        rows.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let (Some(file), Some(pos)) = (
        get("binlog_snapshot_file").filter(|f| !f.is_empty()),
        get("binlog_snapshot_position").and_then(|p| p.parse().ok()),
    ) else {
        return Err(SourceError::Fatal(
            "the server states no binlog position for the snapshot (binlog_snapshot_file is empty): \
             its binary log is off; start it with log_bin"
                .into(),
        ));
    };
    let gtid = super::stream::gtid_at(c, &file, pos).await?;
    Ok(MyPosition {
        file,
        pos,
        gtid,
        ..MyPosition::default()
    })
}

/// Copies from where `pos` says to the last table; returns the position with
/// the snapshot done (not yet committed).
async fn copy(
    cfg: &MysqlConfig,
    ctx: &SourceContext,
    c: &mut Conn,
    mut pos: MyPosition,
    inflight: &mut Inflight<()>,
) -> Result<MyPosition, SourceError> {
    let at = pos.at();
    let started = tokio::time::Instant::now();
    let mut copied: u64 = 0;
    // One registration for the whole copy, not one per row.
    let mut cancelled = std::pin::pin!(ctx.shutdown.cancelled());
    while let Some(state) = pos.snapshot.as_mut() {
        let Some(name) = state.tables.get(state.table).cloned() else {
            break;
        };
        if !cfg.tables.contains(&name) {
            warn!(table = %name, "table is no longer in source.tables; not copied");
            next_table(state);
            submit(ctx, inflight, RecordBuf::new(), &pos).await?;
            continue;
        }
        let (db, table) = split_table(&name).map_err(SourceError::Fatal)?;
        let shape = schema::load(c, db, table).await?.ok_or_else(|| {
            SourceError::Fatal(format!(
                "{name} (source.tables) does not exist on the server; create it or remove it from source.tables"
            ))
        })?;
        if state.last_key.is_some() && shape.pk.is_empty() {
            warn!(table = %name, rows_done = state.rows_done,
                "the table has no primary key, so an interrupted copy cannot resume after its last row: \
                 it is copied again from its first row (its rows numbered from 0 again)");
            state.last_key = None;
            state.rows_done = 0;
        }
        if state.rows_done == 0 {
            state.rows_estimate = estimate(c, db, table).await;
        }
        let mut pending = RecordBuf::new();
        let fp = shape.fingerprint();
        if pos.schemas.get(&name) != Some(&fp) {
            pending.push(&shape.table_record(&at));
            pos.schemas.insert(name.clone(), fp);
        }
        let Some(state) = pos.snapshot.as_mut() else {
            break;
        };
        let (sql, params) = select(&shape, state.last_key.as_deref())?;
        let mut block = Block::new(&shape, &at, state.rows_done);
        let what = format!("the snapshot's query of {name}");
        let mut result = c
            .exec_iter(sql, params)
            .await
            .map_err(|e| classify(&what, e))?;
        loop {
            let row = tokio::select! {
                biased;
                _ = &mut cancelled => return Err(SourceError::Shutdown),
                r = result.next() => r.map_err(|e| classify(&what, e))?,
            };
            let Some(row) = row else { break };
            block.push(row.unwrap(), &mut pending)?;
            let state = pos.snapshot.as_mut().ok_or(SourceError::Shutdown)?;
            // Rows since the last piece was cut, raw rows included.
            let in_piece = block.index - state.rows_done;
            if in_piece >= cfg.snapshot_chunk_rows as u64
                || pending.len() + block.text.len() >= PIECE_BYTES
            {
                block.finish(&mut pending)?;
                copied += block.index - state.rows_done;
                state.rows_done = block.index;
                state.last_key = block.last_key();
                let piece = std::mem::replace(&mut pending, RecordBuf::with_capacity(PIECE_BYTES));
                submit(ctx, inflight, piece, &pos).await?;
                throttle(cfg, ctx, started, copied).await?;
            }
        }
        drop(result);
        block.finish(&mut pending)?;
        let state = pos.snapshot.as_mut().ok_or(SourceError::Shutdown)?;
        copied += block.index - state.rows_done;
        next_table(state);
        submit(ctx, inflight, pending, &pos).await?;
        info!(table = %name, rows = block.index, "table copied");
    }
    Ok(pos)
}

async fn submit(
    ctx: &SourceContext,
    inflight: &mut Inflight<()>,
    piece: RecordBuf,
    pos: &MyPosition,
) -> Result<(), SourceError> {
    inflight.push(ctx, piece, pos.encode()?, ()).await?;
    Ok(())
}

fn next_table(s: &mut SnapshotState) {
    s.table += 1;
    s.last_key = None;
    s.rows_done = 0;
    s.rows_estimate = 0;
}

/// The server's estimate of a table's rows (0 when it has none).
async fn estimate(c: &mut Conn, db: &str, table: &str) -> u64 {
    c.exec_first::<Option<u64>, _, _>(
        "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
        (db, table),
    )
    .await
    .ok()
    .flatten()
    .flatten()
    .unwrap_or(0)
}

/// Keeps the copy under `snapshot_rows_per_second`.
async fn throttle(
    cfg: &MysqlConfig,
    ctx: &SourceContext,
    started: tokio::time::Instant,
    copied: u64,
) -> Result<(), SourceError> {
    let Some(rps) = cfg.snapshot_rows_per_second else {
        return Ok(());
    };
    let due = started + Duration::from_secs_f64(copied as f64 / rps.max(1) as f64);
    tokio::select! {
        _ = ctx.shutdown.cancelled() => Err(SourceError::Shutdown),
        _ = tokio::time::sleep_until(due) => Ok(()),
    }
}

fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A column as the query selects it: `ENUM` and `SET` as their member number
/// and bit set (`values::from_query`).
fn selected(c: &schema::Col) -> String {
    match c.kind {
        Kind::Enum(_) | Kind::Set(_) => format!("{}+0", quote(&c.name)),
        _ => quote(&c.name),
    }
}

/// The rest of a table in primary-key order, after `after`; a table without a
/// primary key in the server's order, whole.
fn select(
    shape: &Shape,
    after: Option<&[KeyValue]>,
) -> Result<(String, mysql_async::Params), SourceError> {
    let cols: Vec<String> = shape.cols.iter().map(selected).collect();
    let mut sql = format!(
        "SELECT {} FROM {}.{}",
        cols.join(", "),
        quote(&shape.database),
        quote(&shape.table)
    );
    if shape.pk.is_empty() {
        return Ok((sql, mysql_async::Params::Empty));
    }
    let keys: Vec<String> = shape.pk.iter().map(|&i| selected(&shape.cols[i])).collect();
    let mut params = Vec::new();
    if let Some(after) = after {
        if after.len() != keys.len() {
            return Err(SourceError::Fatal(format!(
                "the stored snapshot position has a key of {} values, but {} has {} primary-key columns now",
                after.len(),
                shape.name(),
                keys.len()
            )));
        }
        for k in after {
            params.push(match k {
                KeyValue::Text(t) => Value::Bytes(t.clone().into_bytes()),
                KeyValue::Bytes(h) => Value::Bytes(hex::decode(h).map_err(|e| {
                    SourceError::Fatal(format!("the stored snapshot position's key: {e}"))
                })?),
            });
        }
        let marks = vec!["?"; keys.len()].join(", ");
        sql.push_str(&format!(" WHERE ({}) > ({marks})", keys.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY {}", keys.join(", ")));
    let params = if params.is_empty() {
        mysql_async::Params::Empty
    } else {
        mysql_async::Params::Positional(params)
    };
    Ok((sql, params))
}

/// A row's paging key as the next query's parameters: numbers, dates and
/// times as text, `ENUM`/`SET` as the numbers the query selects, character
/// data decoded to UTF-8 (the server converts it back to the column's
/// character set), bytes as bytes.
fn key_of(shape: &Shape, pk: &[Value]) -> Vec<KeyValue> {
    shape
        .pk
        .iter()
        .zip(pk)
        .map(|(&i, v)| {
            let c = &shape.cols[i];
            match v {
                Value::Bytes(b) => match &c.kind {
                    Kind::Text(_) => {
                        match values::decode(c, BinlogValue::Value(Value::Bytes(b.clone()))) {
                            Ok(field::Value::Text(t)) => KeyValue::Text(t),
                            _ => KeyValue::Bytes(hex::encode(b)),
                        }
                    }
                    Kind::Binary | Kind::OtherBytes | Kind::Bit => KeyValue::Bytes(hex::encode(b)),
                    // DECIMAL and the like: ASCII digits.
                    _ => KeyValue::Text(String::from_utf8_lossy(b).into_owned()),
                },
                Value::Int(n) => KeyValue::Text(n.to_string()),
                Value::UInt(n) => KeyValue::Text(n.to_string()),
                Value::Float(f) => KeyValue::Text(f.to_string()),
                Value::Double(f) => KeyValue::Text(f.to_string()),
                Value::Date(y, mo, d, h, mi, s, us) => KeyValue::Text(format!(
                    "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"
                )),
                Value::Time(neg, days, h, mi, s, us) => KeyValue::Text(format!(
                    "{}{}:{mi:02}:{s:02}.{us:06}",
                    if *neg { "-" } else { "" },
                    days * 24 + u32::from(*h)
                )),
                // A primary key is never NULL.
                Value::NULL => KeyValue::Text(String::new()),
            }
        })
        .collect()
}

/// Rows of one table gathered into [`Rows`] blocks of COPY text; a row with a
/// raw value (character data not text in its character set) goes as a
/// [`Row`] of its own, flagged, since a block's text column holds only text.
struct Block<'a> {
    shape: &'a Shape,
    at: &'a str,
    columns: Vec<TableColumn>,
    text: String,
    /// The table-copy row number of the block's first row.
    first: u64,
    rows: u32,
    /// The table-copy row number of the next row.
    index: u64,
    /// The primary-key values of the last row read (its paging key is
    /// rendered only when a piece ends, by `last_key`).
    last_pk: Vec<Value>,
    /// The row being read, rendered.
    row: Rendered,
}

impl<'a> Block<'a> {
    fn new(shape: &'a Shape, at: &'a str, index: u64) -> Self {
        Block {
            shape,
            at,
            columns: shape.table_columns(),
            text: String::new(),
            first: index,
            rows: 0,
            index,
            last_pk: Vec::new(),
            row: Rendered::default(),
        }
    }

    /// The paging key of the last row read; `None` for a table without a
    /// primary key or before the first row.
    fn last_key(&self) -> Option<Vec<KeyValue>> {
        (!self.last_pk.is_empty()).then(|| key_of(self.shape, &self.last_pk))
    }

    fn push(&mut self, values: Vec<Value>, pending: &mut RecordBuf) -> Result<(), SourceError> {
        // The table's name only where something is said about it (not per row).
        let shape = self.shape;
        let name = || shape.name();
        if values.len() != self.shape.cols.len() {
            return Err(SourceError::Other(format!(
                "the snapshot's query of {} returned {} columns, the table has {}",
                name(),
                values.len(),
                self.shape.cols.len()
            )));
        }
        if !self.shape.pk.is_empty() {
            self.last_pk.clear();
            self.last_pk.extend(
                self.shape
                    .pk
                    .iter()
                    .map(|&i| values.get(i).cloned().unwrap_or(Value::NULL)),
            );
        }
        let image = shape
            .cols
            .iter()
            .zip(values)
            .map(|(c, v)| Some(BinlogValue::Value(values::from_query(c, v)).into()));
        self.row.render(shape, image).map_err(|e| {
            SourceError::Fatal(format!("{}, snapshot row {}: {e}", name(), self.index))
        })?;
        let n = shape.cols.len();
        let raw = (0..n).any(|i| self.row.get(i).is_some_and(|v| is_raw(&shape.cols[i], v)));
        if raw {
            let fields: Vec<Field> = shape
                .cols
                .iter()
                .enumerate()
                .map(|(i, c)| Field {
                    name: c.name.clone(),
                    value_type: Shape::neutral(c).value_type() as i32,
                    value: self.row.get(i).map(ValueRef::to_value),
                })
                .collect();
            let flags = raw_flags(self.shape, &fields);
            let name = name();
            warn!(table = %name, row = self.index, columns = ?flags,
                "values that are not text in their column's character set: shipped as their bytes, marked in the row's flags");
            self.finish(pending)?;
            let row = Record {
                time_unix_ms: now_unix_ms(),
                position: format!("snapshot {name} #{}", self.index),
                body: Some(record::Body::Row(Row {
                    schema: self.shape.database.clone(),
                    table: self.shape.table.clone(),
                    op: RowOp::Insert as i32,
                    position: self.at.as_bytes().to_vec(),
                    change_index: u32::try_from(self.index).unwrap_or(u32::MAX),
                    last_in_txn: true,
                    snapshot: true,
                    columns: fields,
                    flags,
                    source: MYSQL.to_string(),
                    ..Default::default()
                })),
            };
            pending.push(&row);
            self.index += 1;
            self.first = self.index;
            return Ok(());
        }
        let start = self.text.len();
        for i in 0..n {
            if i > 0 {
                self.text.push('\t');
            }
            match self.row.get(i) {
                Some(ValueRef::Text(t)) => push_text(&mut self.text, Some(t)),
                Some(ValueRef::Bytes(b)) => push_bytes(&mut self.text, b),
                _ => push_text(&mut self.text, None),
            }
        }
        self.text.push('\n');
        let size = self.text.len() - start;
        if size > MAX_ROW_BYTES {
            return Err(SourceError::Fatal(format!(
                "row {} of {} is {size} bytes; Ferry ships rows of up to {MAX_ROW_BYTES} bytes",
                self.index,
                name()
            )));
        }
        if self.rows > 0 && self.text.len() > MAX_ROW_BYTES {
            // A large row: what the block held goes first, in a block of its own.
            let row = self.text.split_off(start);
            self.finish(pending)?;
            self.text = row;
            self.first = self.index;
        }
        if self.rows == 0 {
            self.first = self.index;
        }
        self.rows += 1;
        self.index += 1;
        Ok(())
    }

    /// Appends the block's rows, if any, to `pending` as one [`Rows`] record.
    fn finish(&mut self, pending: &mut RecordBuf) -> Result<(), SourceError> {
        if self.rows == 0 {
            return Ok(());
        }
        let name = self.shape.name();
        // Written as text (`CopySink for String`): UTF-8 without a check.
        let text = std::mem::take(&mut self.text);
        check_block(&text, self.columns.len(), u64::from(self.rows))
            .map_err(|e| SourceError::Other(format!("the snapshot's rows of {name}: {e}")))?;
        let last = self.first + u64::from(self.rows) - 1;
        let record = Record {
            time_unix_ms: now_unix_ms(),
            position: format!("snapshot {name} #{}-{last}", self.first),
            body: Some(record::Body::Rows(Rows {
                schema: self.shape.database.clone(),
                table: self.shape.table.clone(),
                columns: std::mem::take(&mut self.columns),
                position: self.at.as_bytes().to_vec(),
                first_index: self.first,
                row_count: self.rows,
                copy_text: text,
                source: MYSQL.to_string(),
            })),
        };
        pending.push(&record);
        if let Some(record::Body::Rows(b)) = record.body {
            self.columns = b.columns;
            self.text = b.copy_text;
            self.text.clear();
        }
        self.rows = 0;
        self.first = self.index;
        Ok(())
    }
}
