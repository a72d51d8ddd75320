//! The writes of one apply, gathered per mirror table into runs and written with
//! a few statements per run instead of one per row.
//!
//! A table with a primary key gathers a [`Keyed`] run: the last image per key,
//! and the keys to delete. An upsert replaces the pending image of its key (an
//! image with unchanged values takes them from the image it replaces); a delete,
//! or the old key of a key change, drops the pending image and records the key.
//! Writing the run deletes the recorded keys first, then writes the images, so
//! each key ends as its last event left it: deleted and re-inserted keys are in
//! both, and the delete comes first. Keys are compared by their text, which is
//! the source's output of the stored value; the same row's key always has the
//! same text.
//!
//! Images are written without `INSERT ... ON CONFLICT`, whose speculative
//! insertion costs about four times a `COPY` per row. Keys the table has are
//! updated by one `UPDATE ... FROM unnest(...)`; new keys are `COPY`ed straight
//! into the table. Which is which, one query finds (by the table's own
//! equality), unless the table's last write found none of its keys (a
//! snapshot, a table only inserted into): then the images are tried as new,
//! inside a savepoint, and a key the table has makes the `COPY` fail, the
//! savepoint takes its rows back, and they go the long way. Nothing else writes
//! a mirror table (one stream owns it, and its appliers serialize on the
//! checkpoint row), so no key appears in between. Images with unchanged (TOAST)
//! values leave those columns as stored, one `INSERT ... ON CONFLICT DO UPDATE`
//! each.
//!
//! Such a try need not wait for the end of the apply: once a run holds enough
//! new images it is *streamed*. Its deletes are written, a `COPY` is opened
//! (after a savepoint), its images go in, and every further image of a new key
//! goes into the `COPY` as it arrives, so the server stores rows while the next
//! records are still being read. Anything else (an image of a key already in
//! the run, a delete, any event that needs a statement) ends the `COPY` first;
//! while it is open nothing else is sent. The images stay in the run, marked
//! written, so later events of their keys know the table has them; if the
//! server refused the `COPY`, the savepoint takes it back and they are written
//! the long way.
//!
//! A table without a primary key gathers a [`Keyless`] run: rows to insert, and
//! old rows to delete one each. A delete first cancels a pending insert with the
//! same values; otherwise it is for a row written before the run, so it runs
//! before the inserts.

mod keyed;
mod keyless;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_protocol::rows::{RowEvent, Value};
use tokio_postgres::Client;

use keyed::{Keyed, Status};
use keyless::Keyless;

use super::copy::{CopyError, CopyIn};
use super::schema::Table;
use super::statements::Statements;
use super::{classify, MirrorError};

/// Rows per statement: bounds the arrays a statement carries.
const CHUNK: usize = 10_000;
/// Rows the runs of one apply hold before they are written (each is written
/// as it stands; later rows start new runs).
const MAX_PENDING: usize = 50_000;
/// Fewest images worth trying as new keys (smaller runs go the long way: a
/// failed try costs more than it saves).
const OPTIMISTIC_ROWS: usize = 500;
/// Most such tries per apply: each is a subtransaction, and a transaction with
/// more than 64 of them makes every other session's snapshots slower
/// (PostgreSQL's per-backend subtransaction cache overflows).
const SAVEPOINTS: u32 = 32;

/// The pending runs of one apply, by mirror table name. Tables are independent
/// (the mirror has no foreign keys), so each table's run keeps its own order and
/// the runs of different tables are written in any order.
#[derive(Default)]
pub(super) struct Runs {
    runs: HashMap<String, Run>,
    /// Optimistic `COPY`s (savepoints) made so far in this apply.
    savepoints: u32,
    /// Rows added since the runs were last all written (an upper bound of what
    /// they hold in memory).
    pending: usize,
    /// The `COPY` a run's rows are streamed into as they come (see the module
    /// doc); while it is open nothing else is sent.
    stream: Option<CopyIn>,
    /// A run that just became large enough to stream.
    ready: Option<String>,
}

enum Run {
    Keyed(Keyed),
    Keyless(Keyless),
}

impl Runs {
    /// Writes the pending run of table `name`, if any.
    pub(super) async fn flush_table(
        &mut self,
        tx: &Client,
        stmts: &mut Statements,
        name: &str,
    ) -> Result<(), MirrorError> {
        self.end_stream(tx).await?;
        match self.runs.remove(name) {
            Some(run) => run.flush(tx, stmts, &mut self.savepoints).await,
            None => Ok(()),
        }
    }

    /// Drops the pending run of table `name` (it is being truncated).
    pub(super) fn forget(&mut self, name: &str) {
        self.runs.remove(name);
    }

    pub(super) async fn flush_all(
        &mut self,
        tx: &Client,
        stmts: &mut Statements,
    ) -> Result<(), MirrorError> {
        self.end_stream(tx).await?;
        self.pending = 0;
        for (_, run) in self.runs.drain() {
            run.flush(tx, stmts, &mut self.savepoints).await?;
        }
        Ok(())
    }

    /// The run of `table` for rows with `columns` (`None`: a delete, any columns
    /// do); a pending run of an older description of the table, or with other
    /// columns, is written first.
    async fn run_for(
        &mut self,
        tx: &Client,
        stmts: &mut Statements,
        table: &Arc<Table>,
        columns: Option<&[(String, Value)]>,
    ) -> Result<&mut Run, MirrorError> {
        let fits = match self.runs.get(&table.name) {
            None => None,
            Some(run) => {
                let (t, cols) = run.parts();
                Some(
                    Arc::ptr_eq(t, table)
                        && match (cols, columns) {
                            (Some(cols), Some(columns)) => same_columns(table, cols, columns),
                            _ => true,
                        },
                )
            }
        };
        if fits != Some(true) {
            if fits == Some(false) {
                self.flush_table(tx, stmts, &table.name).await?;
            }
            self.runs.insert(table.name.clone(), Run::new(table));
        }
        // Looked up again rather than through `entry`, which would take an owned
        // name (an allocation per row).
        let Some(run) = self.runs.get_mut(&table.name) else {
            return Err(MirrorError::Fatal(format!(
                "internal error: the pending rows of {} are gone",
                table.display
            )));
        };
        if let Some(columns) = columns {
            run.set_columns(columns)?;
        }
        Ok(run)
    }

    pub(super) async fn upsert(
        &mut self,
        tx: &Client,
        stmts: &mut Statements,
        table: &Arc<Table>,
        columns: Vec<(String, Value)>,
        old_key: Vec<(String, Value)>,
    ) -> Result<(), MirrorError> {
        self.pending += 1;
        let run = self.run_for(tx, stmts, table, Some(&columns)).await?;
        if run.upsert(columns, old_key)? {
            self.ready = Some(table.name.clone());
        }
        Ok(())
    }

    pub(super) async fn delete(
        &mut self,
        tx: &Client,
        stmts: &mut Statements,
        table: &Arc<Table>,
        old_key: Vec<(String, Value)>,
    ) -> Result<(), MirrorError> {
        self.pending += 1;
        self.run_for(tx, stmts, table, None).await?.delete(old_key)
    }

    /// Whether the runs hold enough rows to be written now rather than at the
    /// end of the apply: bounds the memory of a large apply (a snapshot).
    pub(super) fn full(&self) -> bool {
        self.pending >= MAX_PENDING
    }

    /// Adds a row event to `table`'s pending run when that needs no I/O (the
    /// run is there, for this description of the table, with these columns);
    /// otherwise hands the event back for [`Runs::upsert`] / [`Runs::delete`].
    /// Most rows of an apply take this way, without the async machinery.
    pub(super) fn add(
        &mut self,
        table: &Arc<Table>,
        event: RowEvent,
    ) -> Result<Option<RowEvent>, MirrorError> {
        let Runs {
            runs,
            stream,
            ready,
            pending,
            ..
        } = self;
        let Some(run) = runs.get_mut(&table.name) else {
            return Ok(Some(event));
        };
        let (t, cols) = run.parts();
        if !Arc::ptr_eq(t, table) {
            return Ok(Some(event));
        }
        let stream = stream.as_mut().filter(|s| s.table == table.name);
        // While the run streams, only full images of new keys go on into the
        // COPY; anything else ends it first (the slow way).
        let mut new_key = None;
        if let (Some(_), Run::Keyed(k)) = (&stream, &*run) {
            if let RowEvent::Upsert {
                columns, old_key, ..
            } = &event
            {
                let key = k.key_pos_values(columns);
                if old_key.is_empty()
                    && !columns.iter().any(|(_, v)| *v == Value::Unchanged)
                    && !k.by_key.contains_key(&key)
                {
                    new_key = Some(key);
                }
            }
            if new_key.is_none() {
                return Ok(Some(event));
            }
        }
        match event {
            RowEvent::Upsert {
                columns, old_key, ..
            } if cols.is_some_and(|cols| same_columns(table, cols, &columns)) => {
                match (run, stream, new_key) {
                    (Run::Keyed(k), Some(stream), Some(key)) => {
                        stream.row(table, columns.iter().map(|(_, v)| v))?;
                        k.put_written(key, columns.into_iter().map(|(_, v)| v).collect());
                    }
                    (run, _, _) => {
                        if run.upsert(columns, old_key)? {
                            *ready = Some(table.name.clone());
                        }
                    }
                }
            }
            RowEvent::Delete { old_key, .. } => run.delete(old_key)?,
            other => return Ok(Some(other)),
        }
        *pending += 1;
        Ok(None)
    }

    /// Whether [`Runs::pump`] has something to do.
    pub(super) fn wants_pump(&self) -> bool {
        self.ready.is_some() || self.stream.as_ref().is_some_and(CopyIn::ready)
    }

    /// Starts streaming a run that became large enough, and sends what the
    /// stream has encoded.
    pub(super) async fn pump(
        &mut self,
        tx: &Client,
        stmts: &mut Statements,
    ) -> Result<(), MirrorError> {
        if let Some(name) = self.ready.take() {
            self.start_stream(tx, stmts, &name).await?;
        }
        if let Some(stream) = &mut self.stream {
            if stream.ready() {
                let t = self.runs.get(&stream.table).map(|r| r.parts().0.clone());
                if let Err(e) = stream.send().await {
                    return Err(match t {
                        Some(t) => e.into_mirror(&t),
                        None => e.into_mirror_unnamed(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Streams the run of table `name` if it is worth it: a keyed table whose
    /// last write found none of its keys, a run of new full images only.
    async fn start_stream(
        &mut self,
        tx: &Client,
        stmts: &mut Statements,
        name: &str,
    ) -> Result<(), MirrorError> {
        if self.stream.is_some() || self.savepoints >= SAVEPOINTS {
            return Ok(());
        }
        let Some(Run::Keyed(k)) = self.runs.get_mut(name) else {
            return Ok(());
        };
        let Some(cols) = &k.cols else {
            return Ok(());
        };
        if !k.table.appending.load(Ordering::Relaxed) || k.no_stream {
            return Ok(());
        }
        let cols = cols.clone();
        // The run's deletes come before its images: written first, outside the
        // savepoint, so a refused stream does not take them back.
        k.write_deletes(tx, stmts).await?;
        self.savepoints += 1;
        let mut stream = CopyIn::open(tx, stmts, &k.table, &cols, true)
            .await
            .map_err(|e| e.into_mirror(&k.table))?;
        // Images with unchanged values stay for the end (one statement each).
        for (row, status) in k.rows.iter().zip(k.status.iter_mut()) {
            if let Some(row) = row
                .as_ref()
                .filter(|r| *status == Status::New && !r.contains(&Value::Unchanged))
            {
                stream.row(&k.table, row.iter())?;
                *status = Status::Streamed;
            }
        }
        k.unwritten = 0;
        self.stream = Some(stream);
        Ok(())
    }

    /// Ends the stream, if one is open. If the server refused a row because the
    /// table has its key, the savepoint takes the streamed rows back and they
    /// stay in their run, to be written the long way.
    pub(super) async fn end_stream(&mut self, tx: &Client) -> Result<(), MirrorError> {
        let Some(stream) = self.stream.take() else {
            return Ok(());
        };
        let Some(Run::Keyed(k)) = self.runs.get_mut(&stream.table) else {
            return stream
                .finish()
                .await
                .map_err(CopyError::into_mirror_unnamed);
        };
        match stream.finish().await {
            Ok(()) => {
                for status in &mut k.status {
                    if *status == Status::Streamed {
                        *status = Status::Written;
                    }
                }
                Ok(())
            }
            Err(e) if e.is_known_key() => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT ferry_copy")
                    .await
                    .map_err(|e| classify(&format!("applying rows of {}", k.table.display), &e))?;
                k.table.appending.store(false, Ordering::Relaxed);
                for status in &mut k.status {
                    if *status == Status::Streamed {
                        *status = Status::New;
                    }
                }
                k.no_stream = true;
                Ok(())
            }
            Err(e) => Err(e.into_mirror(&k.table)),
        }
    }
}

impl Run {
    fn new(table: &Arc<Table>) -> Run {
        if table.key.is_empty() {
            Run::Keyless(Keyless {
                table: table.clone(),
                cols: None,
                inserts: Vec::new(),
                deletes: Vec::new(),
            })
        } else {
            Run::Keyed(Keyed {
                table: table.clone(),
                cols: None,
                key_pos: Vec::new(),
                rows: Vec::new(),
                status: Vec::new(),
                by_key: HashMap::new(),
                deletes: Vec::new(),
                deleting: HashSet::new(),
                unwritten: 0,
                no_stream: false,
            })
        }
    }

    fn parts(&self) -> (&Arc<Table>, Option<&[usize]>) {
        match self {
            Run::Keyed(r) => (&r.table, r.cols.as_deref()),
            Run::Keyless(r) => (&r.table, r.cols.as_deref()),
        }
    }

    /// Adds an upsert whose columns are the run's; true when it made the run
    /// large enough to stream.
    fn upsert(
        &mut self,
        columns: Vec<(String, Value)>,
        old_key: Vec<(String, Value)>,
    ) -> Result<bool, MirrorError> {
        match self {
            Run::Keyed(run) => {
                let values: Vec<Value> = columns.into_iter().map(|(_, v)| v).collect();
                let key: Vec<Value> = run.key_pos.iter().map(|&p| values[p].clone()).collect();
                if key.contains(&Value::Unchanged) {
                    return Err(run
                        .table
                        .bad_data("an upsert whose key is marked unchanged"));
                }
                if !old_key.is_empty() {
                    let old = key_of(&run.table, &old_key, "the old key of an update")?;
                    if old != key {
                        run.delete(old);
                    }
                }
                run.put(key, values);
                // Another chance to stream every so many images.
                Ok(run.unwritten % OPTIMISTIC_ROWS == 0)
            }
            Run::Keyless(run) => {
                if !old_key.is_empty() {
                    let old = old_row(&run.table, old_key)?;
                    run.delete(old);
                }
                run.inserts
                    .push(columns.into_iter().map(|(_, v)| v).collect());
                Ok(false)
            }
        }
    }

    fn delete(&mut self, old_key: Vec<(String, Value)>) -> Result<(), MirrorError> {
        match self {
            Run::Keyed(run) => {
                let key = key_of(&run.table, &old_key, "a delete")?;
                run.delete(key);
            }
            Run::Keyless(run) => {
                let old = old_row(&run.table, old_key)?;
                run.delete(old);
            }
        }
        Ok(())
    }

    /// Fixes the run's columns at its first row (later rows were checked to match).
    fn set_columns(&mut self, columns: &[(String, Value)]) -> Result<(), MirrorError> {
        match self {
            Run::Keyed(r) if r.cols.is_none() => {
                let cols = map_columns(&r.table, columns)?;
                r.key_pos = r
                    .table
                    .key
                    .iter()
                    .map(|k| {
                        cols.iter().position(|c| c == k).ok_or_else(|| {
                            r.table.bad_data(&format!(
                                "an upsert without the key column {:?}",
                                r.table.columns[*k].name
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?;
                r.cols = Some(cols);
            }
            Run::Keyless(r) if r.cols.is_none() => r.cols = Some(map_columns(&r.table, columns)?),
            _ => {}
        }
        Ok(())
    }

    async fn flush(
        self,
        tx: &Client,
        stmts: &mut Statements,
        savepoints: &mut u32,
    ) -> Result<(), MirrorError> {
        match self {
            Run::Keyed(r) => r.flush(tx, stmts, savepoints).await,
            Run::Keyless(r) => r.flush(tx, stmts).await,
        }
    }
}

/// Whether an event's columns are, by name and order, the run's.
fn same_columns(t: &Table, cols: &[usize], columns: &[(String, Value)]) -> bool {
    cols.len() == columns.len()
        && cols
            .iter()
            .zip(columns)
            .all(|(&c, (name, _))| t.columns[c].name == *name)
}

/// The table column of each of a row's columns.
fn map_columns(t: &Table, columns: &[(String, Value)]) -> Result<Vec<usize>, MirrorError> {
    columns
        .iter()
        .map(|(name, _)| {
            t.index.get(name).copied().ok_or_else(|| {
                MirrorError::Fatal(format!(
                    "a row of {} has the column {name:?}, which the mirror table lacks (no shape announced it). Add the column by hand or resume the delivery from a record carrying the table's shape",
                    t.display
                ))
            })
        })
        .collect()
}

/// The primary-key values, in key order, from a row's identity columns.
fn key_of(t: &Table, old: &[(String, Value)], what: &str) -> Result<Vec<Value>, MirrorError> {
    t.key
        .iter()
        .map(|&k| {
            let name = &t.columns[k].name;
            match old.iter().find(|(n, _)| n == name) {
                Some((_, Value::Unchanged)) | None => Err(t.bad_data(&format!(
                    "{what} without the value of the key column {name:?}"
                ))),
                Some((_, v)) => Ok(v.clone()),
            }
        })
        .collect()
}

/// An old row of a keyless table, as (table column, value), unchanged values left
/// out (they cannot be compared).
fn old_row(t: &Table, old: Vec<(String, Value)>) -> Result<Vec<(usize, Value)>, MirrorError> {
    let mut out = Vec::with_capacity(old.len());
    for (name, v) in old {
        if v == Value::Unchanged {
            continue;
        }
        let Some(&c) = t.index.get(&name) else {
            return Err(MirrorError::Fatal(format!(
                "an old row of {} has the column {name:?}, which the mirror table lacks",
                t.display
            )));
        };
        out.push((c, v));
    }
    if out.is_empty() {
        return Err(t.bad_data(
            "a delete or update of a table without primary key that carries no old values to find the row by (set REPLICA IDENTITY FULL on the source table)",
        ));
    }
    Ok(out)
}
