//! Turning relations, rows and snapshot rows into Ferry records.

use ferry_protocol::messages::{field, record, Field, Record, Row, RowOp, Table, TableColumn};
use ferry_protocol::rows::{lsn_position, postgres_value_type, NeutralType, POSTGRES};
use pg_walstream::{ColumnValue, RowData};
use sha2::{Digest, Sha256};

use super::position::fmt_lsn;
use super::sql::{replident_name, ColInfo, TableInfo};
use crate::now_unix_ms;

use ferry_protocol::copy_text::field_value;

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

    /// Short digest of what a [`Table`] states, to tell whether the shape
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

    /// The columns in neutral terms. Under `REPLICA IDENTITY FULL` pgoutput
    /// flags every column as identity, which is no key at all (columns may be
    /// NULL, rows may repeat): such a table has no key column, and its updates
    /// and deletes carry the whole old row to find it by.
    pub(crate) fn table_columns(&self) -> Vec<TableColumn> {
        let full = self.replica_identity == "full";
        self.cols
            .iter()
            .map(|c| {
                NeutralType::from_postgres(c.type_oid, &c.type_name).to_column(
                    &c.name,
                    &c.type_name,
                    c.key && !full,
                )
            })
            .collect()
    }

    pub(crate) fn schema_record(&self, lsn: u64) -> Record {
        Record {
            time_unix_ms: now_unix_ms(),
            position: format!("lsn={} schema {}", fmt_lsn(lsn), self.name()),
            body: Some(record::Body::Table(Table {
                schema: self.schema.clone(),
                table: self.table.clone(),
                columns: self.table_columns(),
                identity: self.replica_identity.to_string(),
                position: lsn_position(lsn),
                source: POSTGRES.to_string(),
            })),
        }
    }
}

fn column(c: &ColInfo, value: field::Value) -> Field {
    Field {
        name: c.name.clone(),
        value_type: postgres_value_type(c.type_oid) as i32,
        value: Some(value),
    }
}

fn decoded(c: &ColInfo, v: Option<&ColumnValue>) -> field::Value {
    match v {
        None => field::Value::Unchanged(true),
        Some(ColumnValue::Null) => field::Value::Null(true),
        Some(ColumnValue::Text(b)) => field_value(
            postgres_value_type(c.type_oid) as i32,
            &String::from_utf8_lossy(b),
        ),
        Some(ColumnValue::Binary(b)) => field::Value::Bytes(b.to_vec()),
    }
}

/// A new row: every published column in order; one the server left out is an
/// unchanged TOAST value.
pub(crate) fn row_columns(rel: &Rel, row: &RowData) -> Vec<Field> {
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
) -> Vec<Field> {
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
    columns: Vec<Field>,
    old_key: Vec<Field>,
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
        body: Some(record::Body::Row(Row {
            schema: rel.schema.clone(),
            table: rel.table.clone(),
            op: op as i32,
            txn: txn_id(stamp.xid),
            position: lsn_position(stamp.commit_lsn),
            commit_time_unix_us: stamp.commit_time_unix_us,
            change_index: stamp.change_index,
            last_in_txn: stamp.snapshot,
            snapshot: stamp.snapshot,
            columns,
            old_key,
            flags: Vec::new(),
            source: POSTGRES.to_string(),
        })),
    }
}

/// A [`Row::txn`]: the xid in decimal; empty for none (snapshot rows).
pub(crate) fn txn_id(xid: u32) -> String {
    if xid == 0 {
        String::new()
    } else {
        xid.to_string()
    }
}

/// Approximate encoded size, for chunking commits.
pub(crate) fn size_of(r: &Record) -> usize {
    prost::Message::encoded_len(r)
}
