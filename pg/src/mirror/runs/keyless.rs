//! The run of a table without a primary key: rows to insert, and old rows to
//! delete one each (see `runs.rs`).

use std::sync::Arc;

use ferry_protocol::rows::Value;
use futures_util::future::try_join_all;
use tokio_postgres::Client;

use super::super::copy::copy_rows;
use super::super::schema::Table;
use super::super::statements::{delete_one_sql, prepare, Statements};
use super::super::values::Param;
use super::super::{classify, MirrorError};

/// The pending writes of a table without a primary key.
pub(super) struct Keyless {
    pub(super) table: Arc<Table>,
    pub(super) cols: Option<Vec<usize>>,
    pub(super) inserts: Vec<Vec<Value>>,
    /// Old rows to delete one each: (table column, value), unchanged values left out.
    pub(super) deletes: Vec<Vec<(usize, Value)>>,
}

impl Keyless {
    pub(super) fn delete(&mut self, old: Vec<(usize, Value)>) {
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

    pub(super) async fn flush(
        self,
        tx: &Client,
        stmts: &mut Statements,
    ) -> Result<(), MirrorError> {
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

#[cfg(test)]
mod tests {
    use super::super::super::schema::test_table;
    use super::*;

    #[test]
    fn a_keyless_delete_cancels_a_pending_insert() {
        let t = Arc::new(test_table(vec![]));
        let mut run = match super::super::Run::new(&t) {
            super::super::Run::Keyless(k) => k,
            super::super::Run::Keyed(_) => panic!(),
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
