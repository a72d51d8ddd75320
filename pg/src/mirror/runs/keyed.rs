//! The run of a table with a primary key: the last image per key and the keys
//! to delete (see `runs.rs`).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_protocol::rows::Value;
use futures_util::future::try_join_all;
use tokio_postgres::Client;

use super::super::copy::copy_rows;
use super::super::schema::Table;
use super::super::statements::{
    delete_sql, prepare, probe_sql, update_sql, upsert_one_sql, Statements,
};
use super::super::values::Param;
use super::super::{classify, MirrorError};
use super::{CHUNK, OPTIMISTIC_ROWS, SAVEPOINTS};

/// The pending writes of a table with a primary key.
pub(super) struct Keyed {
    pub(super) table: Arc<Table>,
    /// The table column of each value position of the images; `None` until the
    /// first upsert (a run may start with deletes).
    pub(super) cols: Option<Vec<usize>>,
    /// Value positions of the key columns, in key order.
    pub(super) key_pos: Vec<usize>,
    /// Images in arrival order; `None`: deleted later in the run.
    pub(super) rows: Vec<Option<Vec<Value>>>,
    /// Per image: whether it is in the table already.
    pub(super) status: Vec<Status>,
    pub(super) by_key: HashMap<Vec<Value>, usize>,
    pub(super) deletes: Vec<Vec<Value>>,
    pub(super) deleting: HashSet<Vec<Value>>,
    /// Images put since the run was last streamed.
    pub(super) unwritten: usize,
    /// Streaming this run met a key the table has: not again in this apply.
    pub(super) no_stream: bool,
}

/// Where an image of a keyed run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
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
    pub(super) fn written(self) -> bool {
        matches!(self, Status::Streamed | Status::Written)
    }
}

impl Keyed {
    pub(super) fn put(&mut self, key: Vec<Value>, mut values: Vec<Value>) {
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
    pub(super) fn key_pos_values(&self, columns: &[(String, Value)]) -> Vec<Value> {
        self.key_pos
            .iter()
            .filter_map(|&p| columns.get(p).map(|(_, v)| v.clone()))
            .collect()
    }

    /// Adds the image of a new key that the open stream has written.
    pub(super) fn put_written(&mut self, key: Vec<Value>, values: Vec<Value>) {
        self.by_key.insert(key, self.rows.len());
        self.rows.push(Some(values));
        self.status.push(Status::Streamed);
    }

    pub(super) fn delete(&mut self, key: Vec<Value>) {
        if let Some(i) = self.by_key.remove(&key) {
            self.rows[i] = None;
        }
        if self.deleting.insert(key.clone()) {
            self.deletes.push(key);
        }
    }

    /// Deletes the recorded keys now.
    pub(super) async fn write_deletes(
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

    pub(super) async fn flush(
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
            // Images of keys the run saw written are certain to be refused as new.
            let known = self.status.contains(&Status::Known);
            let images = Images {
                cols,
                key_pos: &self.key_pos,
                rows: full,
                maybe_new: !known,
            };
            write_images(tx, stmts, savepoints, t, images).await?;
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

/// Full images (no unchanged values) of a keyed run, to be written.
struct Images<'a> {
    cols: &'a [usize],
    key_pos: &'a [usize],
    rows: Vec<&'a Vec<Value>>,
    /// They may all be of new keys: worth trying as such.
    maybe_new: bool,
}

/// Writes full images of a keyed table: new keys by `COPY`, keys the table has
/// by `UPDATE`.
async fn write_images(
    tx: &Client,
    stmts: &mut Statements,
    savepoints: &mut u32,
    t: &Table,
    images: Images<'_>,
) -> Result<(), MirrorError> {
    let Images {
        cols,
        key_pos,
        rows: full,
        maybe_new,
    } = images;
    let fail = |e: tokio_postgres::Error| classify(&format!("applying rows of {}", t.display), &e);
    if maybe_new
        && t.appending.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::super::super::schema::test_table;
    use super::*;

    #[test]
    fn a_run_keeps_the_last_image_per_key_and_deletes_first() {
        let t = Arc::new(test_table(vec![0]));
        let mut run = match super::super::Run::new(&t) {
            super::super::Run::Keyed(k) => k,
            super::super::Run::Keyless(_) => panic!(),
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
}
