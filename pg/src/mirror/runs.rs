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
//! insertion costs about four times a `COPY` per row. When the table's last
//! write found none of its keys (a snapshot, a table only inserted into), a run
//! of many images is first `COPY`ed straight into the table inside a savepoint;
//! a key the table has makes that `COPY` fail, the savepoint takes its rows
//! back, and the run goes the long way: one query finds which keys the table has
//! (by the table's own equality), one `UPDATE ... FROM unnest(...)` writes those,
//! and a `COPY` the rest. Nothing else writes a mirror table (one stream owns it,
//! and its appliers serialize on the checkpoint row), so no key appears in
//! between. Images with unchanged (TOAST) values leave those columns as stored,
//! one `INSERT ... ON CONFLICT DO UPDATE` each.
//!
//! A table without a primary key gathers a [`Keyless`] run: rows to insert, and
//! old rows to delete one each. A delete first cancels a pending insert with the
//! same values; otherwise it is for a row written before the run, so it runs
//! before the inserts.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_protocol::rows::{RowEvent, Value};
use futures_util::future::try_join_all;
use tokio_postgres::Client;

use super::copy::{copy_rows, CopyError, CopyIn};
use super::schema::Table;
use super::statements::{
    delete_one_sql, delete_sql, prepare, probe_sql, update_sql, upsert_one_sql, Statements,
};
use super::values::Param;
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

struct Keyed {
    table: Arc<Table>,
    /// The table column of each value position of the images; `None` until the
    /// first upsert (a run may start with deletes).
    cols: Option<Vec<usize>>,
    /// Value positions of the key columns, in key order.
    key_pos: Vec<usize>,
    /// Images in arrival order; `None`: deleted later in the run.
    rows: Vec<Option<Vec<Value>>>,
    /// Per image: whether it is in the table already.
    status: Vec<Status>,
    by_key: HashMap<Vec<Value>, usize>,
    deletes: Vec<Vec<Value>>,
    deleting: HashSet<Vec<Value>>,
    /// Images put since the run was last streamed.
    unwritten: usize,
    /// Streaming this run met a key the table has: not again in this apply.
    no_stream: bool,
}

/// Where an image of a keyed run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// To be written; its key was not seen in the table (by this run).
    New,
    /// In the open stream's `COPY`: written if the stream is taken.
    Streamed,
    /// In the table (a stream was taken).
    Written,
    /// To be written; the table has its key (an image written earlier was
    /// replaced), so it is not streamed.
    Known,
}

impl Status {
    fn written(self) -> bool {
        matches!(self, Status::Streamed | Status::Written)
    }
}

struct Keyless {
    table: Arc<Table>,
    cols: Option<Vec<usize>>,
    inserts: Vec<Vec<Value>>,
    /// Old rows to delete one each: (table column, value), unchanged values left out.
    deletes: Vec<Vec<(usize, Value)>>,
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
        if let (Some(_), Run::Keyed(k)) = (&stream, &*run) {
            let streamable = match &event {
                RowEvent::Upsert {
                    columns, old_key, ..
                } => {
                    old_key.is_empty()
                        && !columns.iter().any(|(_, v)| *v == Value::Unchanged)
                        && !k.by_key.contains_key(&k.key_pos_values(columns))
                }
                _ => false,
            };
            if !streamable {
                return Ok(Some(event));
            }
        }
        match event {
            RowEvent::Upsert {
                columns, old_key, ..
            } if cols.is_some_and(|cols| same_columns(table, cols, &columns)) => {
                match (run, stream) {
                    (Run::Keyed(k), Some(stream)) => {
                        stream.row(table, columns.iter().map(|(_, v)| v))?;
                        k.put_written(columns.into_iter().map(|(_, v)| v).collect());
                    }
                    (run, _) => {
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
        eprintln!("DEBUGSTREAM start {}", k.rows.len());
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
                eprintln!("DEBUGSTREAM stream-fallback {}", k.rows.len());
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

impl Keyed {
    fn put(&mut self, key: Vec<Value>, mut values: Vec<Value>) {
        self.unwritten += 1;
        match self.by_key.entry(key) {
            Entry::Occupied(e) => {
                let i = *e.get();
                if let Some(status) = self.status.get_mut(i) {
                    *status = match status {
                        Status::New => Status::New,
                        _ => Status::Known,
                    };
                }
                if let Some(Some(prev)) = self.rows.get_mut(i) {
                    // Unchanged values keep what the image they replace had.
                    for (v, p) in values.iter_mut().zip(prev.iter_mut()) {
                        if *v == Value::Unchanged {
                            std::mem::swap(v, p);
                        }
                    }
                }
                self.rows[i] = Some(values);
            }
            Entry::Vacant(e) => {
                e.insert(self.rows.len());
                self.rows.push(Some(values));
                self.status.push(Status::New);
            }
        }
    }

    /// The key values of a row given by columns in the run's order.
    fn key_pos_values(&self, columns: &[(String, Value)]) -> Vec<Value> {
        self.key_pos
            .iter()
            .filter_map(|&p| columns.get(p).map(|(_, v)| v.clone()))
            .collect()
    }

    /// Adds the image of a new key that the open stream has written.
    fn put_written(&mut self, values: Vec<Value>) {
        let key: Vec<Value> = self.key_pos.iter().map(|&p| values[p].clone()).collect();
        self.by_key.insert(key, self.rows.len());
        self.rows.push(Some(values));
        self.status.push(Status::Streamed);
    }

    fn delete(&mut self, key: Vec<Value>) {
        if let Some(i) = self.by_key.remove(&key) {
            self.rows[i] = None;
        }
        if self.deleting.insert(key.clone()) {
            self.deletes.push(key);
        }
    }

    /// Deletes the recorded keys now.
    async fn write_deletes(
        &mut self,
        tx: &Client,
        stmts: &mut Statements,
    ) -> Result<(), MirrorError> {
        let t = &self.table;
        let fail =
            |e: tokio_postgres::Error| classify(&format!("applying rows of {}", t.display), &e);
        if !self.deletes.is_empty() {
            let (sql, types) = delete_sql(t);
            let stmt = prepare(tx, stmts, sql, &types).await?;
            for chunk in self.deletes.chunks(CHUNK) {
                let params = t
                    .key
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| Param::column(t, c, chunk.iter().map(|k| &k[i])))
                    .collect::<Result<Vec<_>, _>>()?;
                tx.execute(&stmt, &Param::refs(&params))
                    .await
                    .map_err(fail)?;
            }
        }
        self.deletes.clear();
        self.deleting.clear();
        Ok(())
    }

    async fn flush(
        mut self,
        tx: &Client,
        stmts: &mut Statements,
        savepoints: &mut u32,
    ) -> Result<(), MirrorError> {
        self.write_deletes(tx, stmts).await?;
        let t = &self.table;
        let fail =
            |e: tokio_postgres::Error| classify(&format!("applying rows of {}", t.display), &e);
        let Some(cols) = &self.cols else {
            return Ok(());
        };
        let (full, partial): (Vec<&Vec<Value>>, Vec<&Vec<Value>>) = self
            .rows
            .iter()
            .zip(&self.status)
            .filter_map(|(r, status)| r.as_ref().filter(|_| !status.written()))
            .partition(|r| !r.contains(&Value::Unchanged));
        if !full.is_empty() {
            write_images(tx, stmts, savepoints, t, cols, &self.key_pos, full).await?;
        }
        // Images with unchanged values leave those columns out of the update:
        // one statement each (rare: only TOASTed values the change did not touch).
        let mut each = Vec::with_capacity(partial.len());
        for row in partial {
            let unchanged: Vec<bool> = row.iter().map(|v| *v == Value::Unchanged).collect();
            let (sql, types) = upsert_one_sql(t, cols, &unchanged);
            let stmt = prepare(tx, stmts, sql, &types).await?;
            let params = cols
                .iter()
                .zip(row)
                .map(|(&c, v)| Param::scalar(t, c, v))
                .collect::<Result<Vec<_>, _>>()?;
            each.push((stmt, params));
        }
        try_join_all(each.iter().map(|(stmt, params)| {
            let refs = Param::refs(params);
            async move { tx.execute(stmt, &refs).await }
        }))
        .await
        .map_err(fail)?;
        Ok(())
    }
}

impl Keyless {
    fn delete(&mut self, old: Vec<(usize, Value)>) {
        if let Some(cols) = &self.cols {
            let matches = |row: &Vec<Value>| {
                old.iter().all(|(c, v)| {
                    cols.iter()
                        .position(|x| x == c)
                        .is_some_and(|p| row[p] == *v)
                })
            };
            if let Some(i) = self.inserts.iter().rposition(matches) {
                self.inserts.swap_remove(i);
                return;
            }
        }
        self.deletes.push(old);
    }

    async fn flush(self, tx: &Client, stmts: &mut Statements) -> Result<(), MirrorError> {
        let t = &self.table;
        let fail =
            |e: tokio_postgres::Error| classify(&format!("applying rows of {}", t.display), &e);
        let mut each = Vec::with_capacity(self.deletes.len());
        for old in &self.deletes {
            let cols: Vec<usize> = old.iter().map(|(c, _)| *c).collect();
            let (sql, types) = delete_one_sql(t, &cols);
            let stmt = prepare(tx, stmts, sql, &types).await?;
            let params = old
                .iter()
                .map(|(c, v)| Param::scalar(t, *c, v))
                .collect::<Result<Vec<_>, _>>()?;
            each.push((stmt, params));
        }
        try_join_all(each.iter().map(|(stmt, params)| {
            let refs = Param::refs(params);
            async move { tx.execute(stmt, &refs).await }
        }))
        .await
        .map_err(fail)?;
        match &self.cols {
            Some(cols) => copy_rows(tx, stmts, t, cols, self.inserts.iter(), false)
                .await
                .map_err(|e| e.into_mirror(t)),
            None => Ok(()),
        }
    }
}

/// Writes full images (no unchanged values) of a keyed table: new keys by
/// `COPY`, keys the table has by `UPDATE`.
async fn write_images(
    tx: &Client,
    stmts: &mut Statements,
    savepoints: &mut u32,
    t: &Table,
    cols: &[usize],
    key_pos: &[usize],
    full: Vec<&Vec<Value>>,
) -> Result<(), MirrorError> {
    let fail = |e: tokio_postgres::Error| classify(&format!("applying rows of {}", t.display), &e);
    if t.appending.load(Ordering::Relaxed)
        && full.len() >= OPTIMISTIC_ROWS
        && *savepoints < SAVEPOINTS
    {
        *savepoints += 1;
        // The last write found none of its keys (a snapshot, a table only
        // inserted into): try the keys as new, COPY straight in. A key the table
        // has makes the COPY fail; the savepoint takes its rows back, and they
        // go the long way.
        match copy_rows(tx, stmts, t, cols, full.iter().copied(), true).await {
            // Not released: the commit releases it, without a round trip of its own.
            Ok(()) => return Ok(()),
            Err(e) if e.is_known_key() => {
                eprintln!("DEBUGSTREAM optimistic-fallback {}", full.len());
                tx.batch_execute("ROLLBACK TO SAVEPOINT ferry_copy")
                    .await
                    .map_err(fail)?;
            }
            Err(e) => return Err(e.into_mirror(t)),
        }
    }
    // Which keys the table has already.
    let mut exists = vec![false; full.len()];
    let (sql, types) = probe_sql(t);
    let stmt = prepare(tx, stmts, sql, &types).await?;
    for (n, chunk) in full.chunks(CHUNK).enumerate() {
        let params = key_pos
            .iter()
            .zip(&t.key)
            .map(|(&p, &c)| Param::column(t, c, chunk.iter().map(|r| &r[p])))
            .collect::<Result<Vec<_>, _>>()?;
        for row in tx.query(&stmt, &Param::refs(&params)).await.map_err(fail)? {
            let ord: i64 = row.get(0);
            if let Some(e) = usize::try_from(ord - 1)
                .ok()
                .and_then(|i| exists.get_mut(n * CHUNK + i))
            {
                *e = true;
            }
        }
    }
    let mut present = Vec::new();
    let mut new = Vec::new();
    for (row, e) in full.into_iter().zip(exists) {
        if e {
            present.push(row);
        } else {
            new.push(row);
        }
    }
    if let (false, Some((sql, types))) = (present.is_empty(), update_sql(t, cols)) {
        let stmt = prepare(tx, stmts, sql, &types).await?;
        for chunk in present.chunks(CHUNK) {
            let params = cols
                .iter()
                .enumerate()
                .map(|(i, &c)| Param::column(t, c, chunk.iter().map(|r| &r[i])))
                .collect::<Result<Vec<_>, _>>()?;
            tx.execute(&stmt, &Param::refs(&params))
                .await
                .map_err(fail)?;
        }
    }
    t.appending.store(present.is_empty(), Ordering::Relaxed);
    copy_rows(tx, stmts, t, cols, new.into_iter(), false)
        .await
        .map_err(|e| e.into_mirror(t))
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

#[cfg(test)]
mod tests {
    use super::super::schema::test_table;
    use super::*;

    #[test]
    fn a_run_keeps_the_last_image_per_key_and_deletes_first() {
        let t = Arc::new(test_table(vec![0]));
        let mut run = match Run::new(&t) {
            Run::Keyed(k) => k,
            Run::Keyless(_) => panic!(),
        };
        let row = |id: &str, note: Value| vec![Value::Text(id.into()), note, Value::Null];
        let key = |id: &str| vec![Value::Text(id.into())];
        run.put(key("1"), row("1", Value::Text("a".into())));
        run.put(key("2"), row("2", Value::Text("b".into())));
        // An unchanged value keeps the pending image's.
        run.put(key("1"), row("1", Value::Unchanged));
        run.delete(key("2"));
        run.put(key("3"), row("3", Value::Text("c".into())));
        run.delete(key("3"));
        run.put(key("3"), row("3", Value::Text("d".into())));
        let rows: Vec<_> = run.rows.iter().flatten().cloned().collect();
        assert_eq!(
            rows,
            vec![
                row("1", Value::Text("a".into())),
                row("3", Value::Text("d".into()))
            ]
        );
        assert_eq!(run.deletes, vec![key("2"), key("3")]);
    }

    #[test]
    fn a_keyless_delete_cancels_a_pending_insert() {
        let t = Arc::new(test_table(vec![]));
        let mut run = match Run::new(&t) {
            Run::Keyless(k) => k,
            Run::Keyed(_) => panic!(),
        };
        run.cols = Some(vec![0, 1]);
        run.inserts = vec![
            vec![Value::Text("1".into()), Value::Null],
            vec![Value::Text("1".into()), Value::Text("x".into())],
        ];
        run.delete(vec![(0, Value::Text("1".into())), (1, Value::Null)]);
        assert_eq!(
            run.inserts,
            vec![vec![Value::Text("1".into()), Value::Text("x".into())]]
        );
        assert!(run.deletes.is_empty());
        run.delete(vec![(0, Value::Text("2".into()))]);
        assert_eq!(run.deletes.len(), 1);
    }
}
