//! A consumer that applies captured records by primary key, as a downstream
//! database would, plus the checks the tests make on the record stream.

use std::collections::{BTreeMap, HashMap, HashSet};

use ferry_protocol::messages::{
    field, record, Field as Column, Record, Row as RowChange, RowOp, Table as SchemaChange,
};
use tokio_postgres::Client;

pub type Row = BTreeMap<String, Option<String>>;

/// A value as PostgreSQL's text output renders it; `None` for NULL.
pub fn text(c: &Column) -> Option<String> {
    match c.value.as_ref() {
        Some(field::Value::Text(t)) => Some(t.clone()),
        Some(field::Value::Bytes(b)) => Some(format!("\\x{}", hex::encode(b))),
        _ => None,
    }
}

/// The commit LSN a PostgreSQL row's position holds.
pub fn lsn(c: &RowChange) -> u64 {
    ferry_protocol::rows::position_lsn(&c.position).expect("a PostgreSQL position")
}

/// Every row change, the rows of snapshot blocks each as the change it stands for.
pub fn rows(records: &[Record]) -> Vec<RowChange> {
    records.iter().flat_map(record_rows).collect()
}

pub fn record_rows(r: &Record) -> Vec<RowChange> {
    match &r.body {
        Some(record::Body::Row(c)) => vec![c.clone()],
        Some(record::Body::Rows(b)) => {
            ferry_protocol::copy_text::rows_of(b).expect("a well-formed row block")
        }
        _ => Vec::new(),
    }
}

pub fn schemas(records: &[Record]) -> Vec<SchemaChange> {
    records
        .iter()
        .filter_map(|r| match &r.body {
            Some(record::Body::Table(c)) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

#[derive(Default, Debug)]
pub struct Model {
    /// `schema.table` → key values → row.
    pub tables: BTreeMap<String, BTreeMap<Vec<String>, Row>>,
    keys: HashMap<String, Vec<String>>,
}

impl Model {
    pub fn apply_all(records: &[Record]) -> Model {
        let mut m = Model::default();
        for r in records {
            m.apply(r);
        }
        m
    }

    pub fn apply(&mut self, r: &Record) {
        match &r.body {
            Some(record::Body::Table(s)) => {
                let name = format!("{}.{}", s.schema, s.table);
                let keys = s
                    .columns
                    .iter()
                    .filter(|c| c.key)
                    .map(|c| c.name.clone())
                    .collect();
                self.keys.insert(name, keys);
            }
            _ => {
                for c in record_rows(r) {
                    self.apply_row(&c);
                }
            }
        }
    }

    fn key_of(&self, table: &str, cols: &[Column]) -> Vec<String> {
        let keys = self
            .keys
            .get(table)
            .expect("a SchemaChange precedes the rows");
        keys.iter()
            .map(|k| {
                let c = cols
                    .iter()
                    .find(|c| &c.name == k)
                    .expect("key column present");
                text(c).expect("key is not null")
            })
            .collect()
    }

    fn apply_row(&mut self, c: &RowChange) {
        let name = format!("{}.{}", c.schema, c.table);
        match RowOp::try_from(c.op).unwrap() {
            RowOp::Insert | RowOp::Update => {
                let key = self.key_of(&name, &c.columns);
                if !c.old_key.is_empty() {
                    let old = self.key_of(&name, &c.old_key);
                    if old != key {
                        self.tables.entry(name.clone()).or_default().remove(&old);
                    }
                }
                let t = self.tables.entry(name).or_default();
                let row = t.entry(key).or_default();
                for col in &c.columns {
                    if !matches!(col.value, Some(field::Value::Unchanged(_))) {
                        row.insert(col.name.clone(), text(col));
                    }
                }
            }
            RowOp::Delete => {
                let key = self.key_of(&name, &c.old_key);
                self.tables.entry(name).or_default().remove(&key);
            }
            RowOp::Truncate => {
                self.tables.entry(name).or_default().clear();
            }
            RowOp::Unspecified => panic!("unspecified op"),
        }
    }

    pub fn table(&self, name: &str) -> BTreeMap<Vec<String>, Row> {
        self.tables.get(name).cloned().unwrap_or_default()
    }
}

/// `SELECT *` of a table, keyed like the model (`key` columns in order).
pub async fn table_state(client: &Client, table: &str, key: &[&str]) -> BTreeMap<Vec<String>, Row> {
    let mut out = BTreeMap::new();
    for r in ferry_tests::pg::text_rows(client, &format!("SELECT * FROM {table}")).await {
        let row: Row = r.into_iter().collect();
        let k = key.iter().map(|k| row[*k].clone().unwrap()).collect();
        out.insert(k, row);
    }
    out
}

/// Asserts that the model equals the table, with a readable first difference.
pub fn assert_same(model: &BTreeMap<Vec<String>, Row>, db: &BTreeMap<Vec<String>, Row>) {
    if model == db {
        return;
    }
    for (k, v) in db {
        match model.get(k) {
            None => panic!(
                "row {k:?} missing from the capture (db has {v:?}); {} vs {} rows",
                model.len(),
                db.len()
            ),
            Some(m) if m != v => panic!("row {k:?} differs: captured {m:?}, db {v:?}"),
            _ => {}
        }
    }
    for k in model.keys() {
        assert!(db.contains_key(k), "row {k:?} captured but not in the db");
    }
}

/// No streamed change appears twice, and the changes of each transaction are
/// numbered 0.. in order with `last_in_txn` on the last.
pub fn assert_streamed_once(records: &[Record]) {
    let mut seen = HashSet::new();
    let mut by_txn: BTreeMap<u64, Vec<(u32, bool)>> = BTreeMap::new();
    for c in rows(records).iter().filter(|c| !c.snapshot) {
        assert!(
            seen.insert((lsn(c), c.change_index)),
            "streamed change {}#{} appears twice",
            lsn(c),
            c.change_index
        );
        by_txn
            .entry(lsn(c))
            .or_default()
            .push((c.change_index, c.last_in_txn));
    }
    for (lsn, changes) in by_txn {
        let idx: Vec<u32> = changes.iter().map(|c| c.0).collect();
        let want: Vec<u32> = (0..changes.len() as u32).collect();
        assert_eq!(
            idx, want,
            "transaction {lsn:X}: changes out of order or missing"
        );
        let lasts: Vec<bool> = changes.iter().map(|c| c.1).collect();
        let mut want_last = vec![false; changes.len()];
        if let Some(l) = want_last.last_mut() {
            *l = true;
        }
        assert_eq!(
            lasts, want_last,
            "transaction {lsn:X}: last_in_txn misplaced"
        );
    }
}

/// No snapshot row of a table appears twice for the same key.
pub fn assert_snapshot_rows_once(records: &[Record], table: &str, key: &str) {
    let mut seen = HashSet::new();
    for c in rows(records)
        .iter()
        .filter(|c| c.snapshot && format!("{}.{}", c.schema, c.table) == table)
    {
        let k = c
            .columns
            .iter()
            .find(|col| col.name == key)
            .and_then(text)
            .unwrap();
        assert!(
            seen.insert(k.clone()),
            "snapshot row {table} {k} appears twice"
        );
    }
}
