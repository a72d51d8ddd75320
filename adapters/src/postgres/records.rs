//! Turning relations, rows and snapshot rows into Ferry records.

use ferry_protocol::messages::{
    column, record, Column, Record, RowChange, RowOp, SchemaChange, SchemaColumn,
};
use pg_walstream::{ColumnValue, RowData};
use sha2::{Digest, Sha256};

use super::position::fmt_lsn;
use super::sql::{replident_name, ColInfo, TableInfo};
use crate::now_unix_ms;

/// `bytea`.
use ferry_protocol::copy_text::text_value;

/// A captured table's shape, from a Relation message or the catalog.
#[derive(Debug, Clone)]
pub(crate) struct Rel {
    pub schema: String,
    pub table: String,
    pub cols: Vec<ColInfo>,
    /// `default`, `nothing`, `full`, `index`.
    pub replica_identity: &'static str,
}

impl Rel {
    pub(crate) fn from_table(t: &TableInfo) -> Rel {
        Rel {
            schema: t.schema.clone(),
            table: t.table.clone(),
            cols: t.cols.clone(),
            replica_identity: replident_name(t.replident),
        }
    }

    /// `schema.table`.
    pub(crate) fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Short digest of what a [`SchemaChange`] states, to tell whether the shape
    /// changed since the last one shipped.
    pub(crate) fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.replica_identity.as_bytes());
        for c in &self.cols {
            h.update(b"\n");
            h.update(c.name.as_bytes());
            h.update(format!("\0{}\0{}\0{}", c.type_oid, c.typmod, c.key).as_bytes());
        }
        hex::encode(&h.finalize()[..8])
    }

    pub(crate) fn schema_columns(&self) -> Vec<SchemaColumn> {
        self.cols
            .iter()
            .map(|c| SchemaColumn {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                type_oid: c.type_oid,
                key: c.key,
            })
            .collect()
    }

    pub(crate) fn schema_record(&self, lsn: u64) -> Record {
        Record {
            time_unix_ms: now_unix_ms(),
            position: format!("lsn={} schema {}", fmt_lsn(lsn), self.name()),
            body: Some(record::Body::SchemaChange(SchemaChange {
                schema: self.schema.clone(),
                table: self.table.clone(),
                columns: self.schema_columns(),
                replica_identity: self.replica_identity.to_string(),
                commit_lsn: lsn,
            })),
        }
    }
}

fn column(c: &ColInfo, value: column::Value) -> Column {
    Column {
        name: c.name.clone(),
        type_name: c.type_name.clone(),
        type_oid: c.type_oid,
        value: Some(value),
    }
}

fn decoded(c: &ColInfo, v: Option<&ColumnValue>) -> column::Value {
    match v {
        None => column::Value::UnchangedToast(true),
        Some(ColumnValue::Null) => column::Value::Null(true),
        Some(ColumnValue::Text(b)) => text_value(c.type_oid, &String::from_utf8_lossy(b)),
        Some(ColumnValue::Binary(b)) => column::Value::Bytes(b.to_vec()),
    }
}

/// A new row: every published column in order; one the server left out is an
/// unchanged TOAST value.
pub(crate) fn row_columns(rel: &Rel, row: &RowData) -> Vec<Column> {
    rel.cols
        .iter()
        .map(|c| column(c, decoded(c, row.get(&c.name))))
        .collect()
}

/// The old row's identity columns (`key_columns` as pgoutput flagged them).
pub(crate) fn old_columns(
    rel: &Rel,
    row: &RowData,
    key_columns: &[std::sync::Arc<str>],
) -> Vec<Column> {
    rel.cols
        .iter()
        .filter(|c| key_columns.iter().any(|k| k.as_ref() == c.name))
        .map(|c| column(c, decoded(c, row.get(&c.name))))
        .collect()
}

/// Where a change sits, for [`row_record`].
pub(crate) struct Stamp {
    pub xid: u32,
    pub commit_lsn: u64,
    pub commit_time_unix_us: i64,
    pub change_index: u32,
    pub snapshot: bool,
}

pub(crate) fn row_record(
    rel: &Rel,
    op: RowOp,
    stamp: &Stamp,
    columns: Vec<Column>,
    old_key: Vec<Column>,
) -> Record {
    let position = if stamp.snapshot {
        format!("snapshot {} #{}", rel.name(), stamp.change_index)
    } else if stamp.commit_lsn == 0 {
        // Not stamped yet: the transaction's own commit gives the position.
        String::new()
    } else {
        format!("lsn={} n={}", fmt_lsn(stamp.commit_lsn), stamp.change_index)
    };
    Record {
        time_unix_ms: now_unix_ms(),
        position,
        body: Some(record::Body::RowChange(RowChange {
            schema: rel.schema.clone(),
            table: rel.table.clone(),
            op: op as i32,
            xid: stamp.xid,
            commit_lsn: stamp.commit_lsn,
            commit_time_unix_us: stamp.commit_time_unix_us,
            change_index: stamp.change_index,
            last_in_txn: stamp.snapshot,
            snapshot: stamp.snapshot,
            columns,
            old_key,
            truncate_cascade: false,
            truncate_restart_identity: false,
        })),
    }
}

/// Approximate encoded size, for chunking commits.
pub(crate) fn size_of(r: &Record) -> usize {
    prost::Message::encoded_len(r)
}
