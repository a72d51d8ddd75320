//! A source-neutral view of database records, as a delivery consumes them.
//!
//! Database sources write [`Row`]s, [`Table`]s and [`Rows`] blocks (protocol
//! version 4): a source-neutral envelope with neutral value types, an opaque
//! source position and transaction id. Stores still hold the PostgreSQL-shaped
//! [`RowChange`]s, [`SchemaChange`]s and [`RowBlock`]s of version 3 agents.
//! [`row_events`] turns either into [`RowEvent`]s that say only what a consumer
//! needs to reproduce the table: a table's shape (columns, neutral types, key),
//! upserts by key, deletes, truncates. A delivery written against these events
//! takes every source that writes the envelope without a change.
//!
//! Values stay in the source's canonical text form ([`Value::Text`]: PostgreSQL's
//! type output, exact for numeric and with the zone for timestamptz), so nothing
//! is lost between the source and the consumer's own input functions.
//!
//! [`RowBlock`]: crate::messages::RowBlock
//! [`Rows`]: crate::messages::Rows

use crate::copy_text::{each_line, field_value};
use crate::messages::{
    column, field, record::Body, Column, Field, Record, Row, RowChange, RowOp, Rows, SchemaChange,
    SchemaColumn, Table, TableColumn, ValueType,
};

/// [`Row::source`] of PostgreSQL rows; their [`Row::position`] is [`lsn_position`].
pub const POSTGRES: &str = "postgres";

/// A PostgreSQL LSN as a [`Row::position`]: 8 bytes big-endian.
pub fn lsn_position(lsn: u64) -> Vec<u8> {
    lsn.to_be_bytes().to_vec()
}

/// The LSN a PostgreSQL [`Row::position`] holds.
pub fn position_lsn(position: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(position).ok().map(u64::from_be_bytes)
}

/// A column's type, in terms every consumer can map to its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NeutralType {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// Exact decimal; `None` where the source declares no limit.
    Decimal {
        precision: Option<u32>,
        scale: Option<u32>,
    },
    Text,
    Bytes,
    Date,
    /// Time of day without a zone.
    Time,
    /// Date and time without a zone.
    Timestamp,
    /// An instant (date and time with a zone).
    TimestampTz,
    Interval,
    Uuid,
    Json,
    /// Anything else, by the source's own type name (`integer[]`, `point`, an enum).
    Other(String),
}

impl NeutralType {
    /// The neutral type of a PostgreSQL column, by type oid; `type_name` is
    /// `format_type`'s spelling (`numeric(30,10)`), which carries numeric's
    /// precision and scale and names the types this does not know.
    pub fn from_postgres(type_oid: u32, type_name: &str) -> NeutralType {
        let (precision, scale) = match postgres_value_type(type_oid) {
            ValueType::Decimal => numeric_modifiers(type_name),
            _ => (None, None),
        };
        NeutralType::of_column(&TableColumn {
            value_type: postgres_value_type(type_oid) as i32,
            source_type: type_name.to_string(),
            precision,
            scale,
            ..Default::default()
        })
    }

    /// The type a [`TableColumn`] states.
    pub fn of_column(c: &TableColumn) -> NeutralType {
        match ValueType::try_from(c.value_type).unwrap_or(ValueType::Unspecified) {
            ValueType::Bool => NeutralType::Bool,
            ValueType::Int16 => NeutralType::Int16,
            ValueType::Int32 => NeutralType::Int32,
            ValueType::Int64 => NeutralType::Int64,
            ValueType::Float32 => NeutralType::Float32,
            ValueType::Float64 => NeutralType::Float64,
            ValueType::Decimal => NeutralType::Decimal {
                precision: c.precision,
                scale: c.scale,
            },
            ValueType::Text => NeutralType::Text,
            ValueType::Bytes => NeutralType::Bytes,
            ValueType::Date => NeutralType::Date,
            ValueType::Time => NeutralType::Time,
            ValueType::Timestamp => NeutralType::Timestamp,
            ValueType::TimestampTz => NeutralType::TimestampTz,
            ValueType::Interval => NeutralType::Interval,
            ValueType::Uuid => NeutralType::Uuid,
            ValueType::Json => NeutralType::Json,
            ValueType::Other | ValueType::Unspecified => NeutralType::Other(c.source_type.clone()),
        }
    }

    /// A column of this type as a [`TableColumn`], the source's spelling
    /// beside it.
    pub fn to_column(&self, name: &str, source_type: &str, key: bool) -> TableColumn {
        let (precision, scale) = match self {
            NeutralType::Decimal { precision, scale } => (*precision, *scale),
            _ => (None, None),
        };
        TableColumn {
            name: name.to_string(),
            source_type: source_type.to_string(),
            value_type: self.value_type() as i32,
            key,
            precision,
            scale,
        }
    }

    /// The wire's [`ValueType`] of this type.
    pub fn value_type(&self) -> ValueType {
        match self {
            NeutralType::Bool => ValueType::Bool,
            NeutralType::Int16 => ValueType::Int16,
            NeutralType::Int32 => ValueType::Int32,
            NeutralType::Int64 => ValueType::Int64,
            NeutralType::Float32 => ValueType::Float32,
            NeutralType::Float64 => ValueType::Float64,
            NeutralType::Decimal { .. } => ValueType::Decimal,
            NeutralType::Text => ValueType::Text,
            NeutralType::Bytes => ValueType::Bytes,
            NeutralType::Date => ValueType::Date,
            NeutralType::Time => ValueType::Time,
            NeutralType::Timestamp => ValueType::Timestamp,
            NeutralType::TimestampTz => ValueType::TimestampTz,
            NeutralType::Interval => ValueType::Interval,
            NeutralType::Uuid => ValueType::Uuid,
            NeutralType::Json => ValueType::Json,
            NeutralType::Other(_) => ValueType::Other,
        }
    }
}

/// The [`ValueType`] of a PostgreSQL type oid ([`ValueType::Other`] for the
/// types it does not name).
pub fn postgres_value_type(type_oid: u32) -> ValueType {
    match type_oid {
        16 => ValueType::Bool,
        21 => ValueType::Int16,
        23 => ValueType::Int32,
        20 => ValueType::Int64,
        700 => ValueType::Float32,
        701 => ValueType::Float64,
        1700 => ValueType::Decimal,
        25 | 1043 | 1042 | 19 => ValueType::Text,
        17 => ValueType::Bytes,
        1082 => ValueType::Date,
        1083 => ValueType::Time,
        1114 => ValueType::Timestamp,
        1184 => ValueType::TimestampTz,
        1186 => ValueType::Interval,
        2950 => ValueType::Uuid,
        114 | 3802 => ValueType::Json,
        _ => ValueType::Other,
    }
}

/// Precision and scale of `numeric(p,s)` / `numeric(p)`; `(None, None)` for a
/// bare `numeric` or anything unreadable (the unconstrained type holds every
/// value, so reading too little is safe).
fn numeric_modifiers(type_name: &str) -> (Option<u32>, Option<u32>) {
    let Some(args) = type_name
        .trim()
        .strip_prefix("numeric(")
        .and_then(|r| r.strip_suffix(')'))
    else {
        return (None, None);
    };
    let mut parts = args.split(',').map(|p| p.trim().parse::<u32>());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(p)), None, None) => (Some(p), None),
        (Some(Ok(p)), Some(Ok(s)), None) => (Some(p), Some(s)),
        _ => (None, None),
    }
}

/// One column of a table's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnShape {
    pub name: String,
    pub ty: NeutralType,
    /// Part of the key that identifies a row (normally the primary key).
    pub key: bool,
}

/// The columns of a source table, in table order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableShape {
    /// The PostgreSQL schema, or the MySQL database.
    pub namespace: String,
    pub table: String,
    pub columns: Vec<ColumnShape>,
}

/// One column value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// The source's canonical text form of the value.
    Text(String),
    Bytes(Vec<u8>),
    /// An out-of-line value the change did not touch and the source did not
    /// resend: the consumer keeps the value it has.
    Unchanged,
}

/// What a consumer does to its copy of the source's tables, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowEvent {
    /// The table's columns, before its first row and after every change of them.
    Shape(TableShape),
    /// Insert the row, or replace the row with the same key (inserts, updates and
    /// snapshot rows alike).
    Upsert {
        namespace: String,
        table: String,
        /// The new row, in table order.
        columns: Vec<(String, Value)>,
        /// The old row's identity when the source sent it: the old key when the
        /// update changed the key, or the whole old row of a table identified by
        /// all its columns (no key in its shape). Empty otherwise.
        old_key: Vec<(String, Value)>,
        /// The last change of its source transaction.
        end_of_txn: bool,
    },
    /// Remove the row with this key (for a table without key: one row with these
    /// values).
    Delete {
        namespace: String,
        table: String,
        old_key: Vec<(String, Value)>,
        end_of_txn: bool,
    },
    /// Remove every row of the table.
    Truncate {
        namespace: String,
        table: String,
        end_of_txn: bool,
    },
}

impl RowEvent {
    /// `(namespace, table)` the event is about.
    pub fn table(&self) -> (&str, &str) {
        match self {
            RowEvent::Shape(s) => (&s.namespace, &s.table),
            RowEvent::Upsert {
                namespace, table, ..
            }
            | RowEvent::Delete {
                namespace, table, ..
            }
            | RowEvent::Truncate {
                namespace, table, ..
            } => (namespace, table),
        }
    }
}

/// A record that cannot be read as row events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowsError {
    #[error("a row change of {table} has no known operation (op = {op})")]
    Op { table: String, op: i32 },
    #[error("column {column:?} of a row change of {table} carries no value")]
    NoValue { table: String, column: String },
    #[error("a row block of {table}: {reason}")]
    Block { table: String, reason: String },
}

/// The row events a record stands for: one per row change (inserts and updates
/// are both [`RowEvent::Upsert`]), a [`RowEvent::Shape`] per schema change, one
/// upsert per row of a row block; none for records that are not about rows (file
/// chunks, lines).
pub fn row_events(record: &Record) -> Result<Vec<RowEvent>, RowsError> {
    match &record.body {
        Some(Body::Row(r)) => Ok(vec![row_event(r)?]),
        Some(Body::Table(t)) => Ok(vec![RowEvent::Shape(table_shape(t))]),
        Some(Body::Rows(b)) => block_events(b),
        Some(old @ (Body::RowChange(_) | Body::SchemaChange(_) | Body::RowBlock(_))) => {
            row_events(&Record {
                body: envelope_of(old),
                ..Record::default()
            })
        }
        Some(Body::Line(_) | Body::FileChunk(_) | Body::FileAbort(_)) | None => Ok(Vec::new()),
    }
}

/// The upserts a block of snapshot rows stands for (the events of
/// [`rows_of`]'s rows, without building those first: a block holds thousands).
fn block_events(b: &Rows) -> Result<Vec<RowEvent>, RowsError> {
    let mut out = Vec::with_capacity(b.row_count as usize);
    each_line(&b.copy_text, b.columns.len(), b.row_count, |_, values| {
        let columns = b
            .columns
            .iter()
            .zip(values)
            .map(|(c, v)| {
                let v = match v {
                    None => Value::Null,
                    Some(v) => match field_value(c.value_type, v) {
                        field::Value::Bytes(b) => Value::Bytes(b),
                        _ => Value::Text(v.to_string()),
                    },
                };
                (c.name.clone(), v)
            })
            .collect();
        out.push(RowEvent::Upsert {
            namespace: b.schema.clone(),
            table: b.table.clone(),
            columns,
            old_key: Vec::new(),
            end_of_txn: true,
        });
    })
    .map_err(|reason| RowsError::Block {
        table: format!("{}.{}", b.schema, b.table),
        reason,
    })?;
    Ok(out)
}

/// The source-neutral twin of a version 3 row record's body: a [`RowChange`]
/// as a [`Row`], a [`SchemaChange`] as a [`Table`], a [`RowBlock`] as a
/// [`Rows`] block (PostgreSQL's: LSNs as [`lsn_position`], xids in decimal,
/// types mapped by oid); `None` for any other body. Readers of the store go by
/// the envelope alone.
pub fn envelope_of(body: &Body) -> Option<Body> {
    match body {
        Body::RowChange(c) => Some(Body::Row(row_of_change(c))),
        Body::SchemaChange(s) => Some(Body::Table(table_of_schema(s))),
        Body::RowBlock(b) => Some(Body::Rows(Rows {
            schema: b.schema.clone(),
            table: b.table.clone(),
            columns: b
                .columns
                .iter()
                .map(|c| postgres_column(c, false))
                .collect(),
            position: lsn_position(b.commit_lsn),
            first_index: b.first_index,
            row_count: b.row_count,
            copy_text: b.copy_text.clone(),
            source: POSTGRES.to_string(),
        })),
        _ => None,
    }
}

/// Under `REPLICA IDENTITY FULL` PostgreSQL flags every column as identity,
/// which is no key at all (columns may be NULL, rows may repeat): such a table
/// has no key column, and its updates and deletes carry the whole old row.
fn postgres_column(c: &SchemaColumn, full_identity: bool) -> TableColumn {
    NeutralType::from_postgres(c.type_oid, &c.type_name).to_column(
        &c.name,
        &c.type_name,
        c.key && !full_identity,
    )
}

fn table_of_schema(s: &SchemaChange) -> Table {
    let full = s.replica_identity == "full";
    Table {
        schema: s.schema.clone(),
        table: s.table.clone(),
        columns: s.columns.iter().map(|c| postgres_column(c, full)).collect(),
        identity: s.replica_identity.clone(),
        position: lsn_position(s.commit_lsn),
        source: POSTGRES.to_string(),
    }
}

fn row_of_change(c: &RowChange) -> Row {
    let fields = |cols: &[Column]| -> Vec<Field> {
        cols.iter()
            .map(|col| Field {
                name: col.name.clone(),
                value_type: postgres_value_type(col.type_oid) as i32,
                value: col.value.clone().map(|v| match v {
                    column::Value::Text(t) => field::Value::Text(t),
                    column::Value::Null(n) => field::Value::Null(n),
                    column::Value::UnchangedToast(u) => field::Value::Unchanged(u),
                    column::Value::Bytes(b) => field::Value::Bytes(b),
                }),
            })
            .collect()
    };
    let flags = [
        (c.truncate_cascade, "cascade"),
        (c.truncate_restart_identity, "restart_identity"),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .map(|(_, f)| f.to_string())
    .collect();
    Row {
        schema: c.schema.clone(),
        table: c.table.clone(),
        op: c.op,
        txn: if c.xid == 0 {
            String::new()
        } else {
            c.xid.to_string()
        },
        position: lsn_position(c.commit_lsn),
        commit_time_unix_us: c.commit_time_unix_us,
        change_index: c.change_index,
        last_in_txn: c.last_in_txn,
        snapshot: c.snapshot,
        columns: fields(&c.columns),
        old_key: fields(&c.old_key),
        flags,
        source: POSTGRES.to_string(),
    }
}

/// Whether a record is about database rows (a shape, a change, a block of
/// snapshot rows), in either protocol version's terms.
pub fn is_row_record(record: &Record) -> bool {
    matches!(
        &record.body,
        Some(
            Body::Row(_)
                | Body::Table(_)
                | Body::Rows(_)
                | Body::RowChange(_)
                | Body::SchemaChange(_)
                | Body::RowBlock(_)
        )
    )
}

/// False only for a row change that is not the last of its source transaction:
/// where a consumer may stop without splitting one.
pub fn ends_txn(record: &Record) -> bool {
    match &record.body {
        Some(Body::Row(c)) => c.last_in_txn,
        Some(Body::RowChange(c)) => c.last_in_txn,
        _ => true,
    }
}

/// A [`Table`] as a shape: its key flags are the row identity already.
fn table_shape(t: &Table) -> TableShape {
    TableShape {
        namespace: t.schema.clone(),
        table: t.table.clone(),
        columns: t
            .columns
            .iter()
            .map(|c| ColumnShape {
                name: c.name.clone(),
                ty: NeutralType::of_column(c),
                key: c.key,
            })
            .collect(),
    }
}

fn row_event(r: &Row) -> Result<RowEvent, RowsError> {
    let values = |cols: &[Field]| -> Result<Vec<(String, Value)>, RowsError> {
        cols.iter()
            .map(|col| {
                let v = match &col.value {
                    Some(field::Value::Text(t)) => Value::Text(t.clone()),
                    Some(field::Value::Null(_)) => Value::Null,
                    Some(field::Value::Unchanged(_)) => Value::Unchanged,
                    Some(field::Value::Bytes(b)) => Value::Bytes(b.clone()),
                    None => {
                        return Err(RowsError::NoValue {
                            table: format!("{}.{}", r.schema, r.table),
                            column: col.name.clone(),
                        })
                    }
                };
                Ok((col.name.clone(), v))
            })
            .collect()
    };
    let namespace = r.schema.clone();
    let table = r.table.clone();
    let end_of_txn = r.last_in_txn;
    match RowOp::try_from(r.op) {
        Ok(RowOp::Insert | RowOp::Update) => Ok(RowEvent::Upsert {
            columns: values(&r.columns)?,
            old_key: values(&r.old_key)?,
            namespace,
            table,
            end_of_txn,
        }),
        Ok(RowOp::Delete) => Ok(RowEvent::Delete {
            old_key: values(&r.old_key)?,
            namespace,
            table,
            end_of_txn,
        }),
        Ok(RowOp::Truncate) => Ok(RowEvent::Truncate {
            namespace,
            table,
            end_of_txn,
        }),
        Ok(RowOp::Unspecified) | Err(_) => Err(RowsError::Op {
            table: format!("{namespace}.{table}"),
            op: r.op,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{FileChunk, RowBlock};

    fn text(name: &str, v: &str) -> Column {
        Column {
            name: name.into(),
            type_name: "text".into(),
            type_oid: 25,
            value: Some(column::Value::Text(v.into())),
        }
    }

    fn record(body: Body) -> Record {
        Record {
            time_unix_ms: 1,
            position: String::new(),
            body: Some(body),
        }
    }

    fn change(op: RowOp, columns: Vec<Column>, old_key: Vec<Column>) -> Record {
        record(Body::RowChange(RowChange {
            schema: "public".into(),
            table: "person".into(),
            op: op as i32,
            last_in_txn: true,
            columns,
            old_key,
            ..Default::default()
        }))
    }

    #[test]
    fn postgres_types_map_by_oid() {
        let t = NeutralType::from_postgres;
        assert_eq!(t(16, "boolean"), NeutralType::Bool);
        assert_eq!(t(21, "smallint"), NeutralType::Int16);
        assert_eq!(t(23, "integer"), NeutralType::Int32);
        assert_eq!(t(20, "bigint"), NeutralType::Int64);
        assert_eq!(t(700, "real"), NeutralType::Float32);
        assert_eq!(t(701, "double precision"), NeutralType::Float64);
        for (oid, name) in [
            (25, "text"),
            (1043, "character varying(20)"),
            (1042, "character(84)"),
            (19, "name"),
        ] {
            assert_eq!(t(oid, name), NeutralType::Text, "{name}");
        }
        assert_eq!(t(17, "bytea"), NeutralType::Bytes);
        assert_eq!(t(1082, "date"), NeutralType::Date);
        assert_eq!(t(1083, "time without time zone"), NeutralType::Time);
        assert_eq!(
            t(1114, "timestamp(3) without time zone"),
            NeutralType::Timestamp
        );
        assert_eq!(
            t(1184, "timestamp with time zone"),
            NeutralType::TimestampTz
        );
        assert_eq!(t(1186, "interval"), NeutralType::Interval);
        assert_eq!(t(2950, "uuid"), NeutralType::Uuid);
        assert_eq!(t(114, "json"), NeutralType::Json);
        assert_eq!(t(3802, "jsonb"), NeutralType::Json);
        assert_eq!(t(1007, "integer[]"), NeutralType::Other("integer[]".into()));
        assert_eq!(t(600, "point"), NeutralType::Other("point".into()));
    }

    #[test]
    fn numeric_keeps_precision_and_scale() {
        let dec = |p, s| NeutralType::Decimal {
            precision: p,
            scale: s,
        };
        assert_eq!(
            NeutralType::from_postgres(1700, "numeric(30,10)"),
            dec(Some(30), Some(10))
        );
        assert_eq!(
            NeutralType::from_postgres(1700, "numeric(12)"),
            dec(Some(12), None)
        );
        assert_eq!(NeutralType::from_postgres(1700, "numeric"), dec(None, None));
        // PostgreSQL 15 allows a negative scale: read as unconstrained, which
        // holds every such value.
        assert_eq!(
            NeutralType::from_postgres(1700, "numeric(5,-2)"),
            dec(None, None)
        );
    }

    #[test]
    fn inserts_and_updates_are_upserts_with_values_kept_exactly() {
        let mut cols = vec![
            text("id", "7"),
            Column {
                name: "photo".into(),
                type_name: "bytea".into(),
                type_oid: 17,
                value: Some(column::Value::Bytes(vec![0, 255])),
            },
            Column {
                name: "note".into(),
                type_name: "text".into(),
                type_oid: 25,
                value: Some(column::Value::Null(true)),
            },
            Column {
                name: "cv".into(),
                type_name: "text".into(),
                type_oid: 25,
                value: Some(column::Value::UnchangedToast(true)),
            },
        ];
        let ev = row_events(&change(RowOp::Update, cols.clone(), vec![])).unwrap();
        assert_eq!(
            ev,
            vec![RowEvent::Upsert {
                namespace: "public".into(),
                table: "person".into(),
                columns: vec![
                    ("id".into(), Value::Text("7".into())),
                    ("photo".into(), Value::Bytes(vec![0, 255])),
                    ("note".into(), Value::Null),
                    ("cv".into(), Value::Unchanged),
                ],
                old_key: vec![],
                end_of_txn: true,
            }]
        );
        // A key change carries the old key.
        let ev = row_events(&change(RowOp::Insert, cols.clone(), vec![text("id", "6")])).unwrap();
        let RowEvent::Upsert { old_key, .. } = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(old_key, &vec![("id".to_string(), Value::Text("6".into()))]);
        // A column without a value is bad data, named.
        cols[2].value = None;
        let e = row_events(&change(RowOp::Insert, cols, vec![])).unwrap_err();
        assert!(e.to_string().contains("\"note\""), "{e}");
    }

    #[test]
    fn deletes_and_truncates() {
        let ev = row_events(&change(RowOp::Delete, vec![], vec![text("id", "7")])).unwrap();
        assert_eq!(
            ev,
            vec![RowEvent::Delete {
                namespace: "public".into(),
                table: "person".into(),
                old_key: vec![("id".into(), Value::Text("7".into()))],
                end_of_txn: true,
            }]
        );
        let ev = row_events(&change(RowOp::Truncate, vec![], vec![])).unwrap();
        assert_eq!(
            ev,
            vec![RowEvent::Truncate {
                namespace: "public".into(),
                table: "person".into(),
                end_of_txn: true,
            }]
        );
        assert_eq!(ev[0].table(), ("public", "person"));
        let e = row_events(&change(RowOp::Unspecified, vec![], vec![])).unwrap_err();
        assert!(matches!(e, RowsError::Op { op: 0, .. }), "{e}");
    }

    fn schema_columns() -> Vec<SchemaColumn> {
        vec![
            SchemaColumn {
                name: "id".into(),
                type_name: "integer".into(),
                type_oid: 23,
                key: true,
            },
            SchemaColumn {
                name: "amount".into(),
                type_name: "numeric(30,10)".into(),
                type_oid: 1700,
                key: false,
            },
            SchemaColumn {
                name: "photo".into(),
                type_name: "bytea".into(),
                type_oid: 17,
                key: false,
            },
        ]
    }

    #[test]
    fn schema_changes_are_shapes() {
        let sc = |identity: &str| {
            record(Body::SchemaChange(SchemaChange {
                schema: "public".into(),
                table: "acct".into(),
                columns: schema_columns(),
                replica_identity: identity.into(),
                commit_lsn: 1,
            }))
        };
        let ev = row_events(&sc("default")).unwrap();
        assert_eq!(
            ev,
            vec![RowEvent::Shape(TableShape {
                namespace: "public".into(),
                table: "acct".into(),
                columns: vec![
                    ColumnShape {
                        name: "id".into(),
                        ty: NeutralType::Int32,
                        key: true
                    },
                    ColumnShape {
                        name: "amount".into(),
                        ty: NeutralType::Decimal {
                            precision: Some(30),
                            scale: Some(10)
                        },
                        key: false
                    },
                    ColumnShape {
                        name: "photo".into(),
                        ty: NeutralType::Bytes,
                        key: false
                    },
                ],
            })]
        );
        // REPLICA IDENTITY FULL flags every column: no key.
        let RowEvent::Shape(full) = &row_events(&sc("full")).unwrap()[0] else {
            panic!()
        };
        assert!(full.columns.iter().all(|c| !c.key));
    }

    #[test]
    fn row_blocks_are_one_upsert_per_row() {
        let b = RowBlock {
            schema: "public".into(),
            table: "acct".into(),
            columns: schema_columns(),
            commit_lsn: 9,
            first_index: 0,
            row_count: 2,
            copy_text: "1\t12.5000000000\t\\\\x00ff\n2\t\\N\t\\N\n".into(),
        };
        let ev = row_events(&record(Body::RowBlock(b.clone()))).unwrap();
        let rows: Vec<_> = ev
            .iter()
            .map(|e| match e {
                RowEvent::Upsert {
                    columns,
                    old_key,
                    end_of_txn,
                    ..
                } => {
                    assert!(old_key.is_empty() && *end_of_txn);
                    columns.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                vec![
                    Value::Text("1".into()),
                    Value::Text("12.5000000000".into()),
                    Value::Bytes(vec![0, 255])
                ],
                vec![Value::Text("2".into()), Value::Null, Value::Null],
            ]
        );
        // A block that does not hold what it declares is an error naming the table.
        let mut bad = b;
        bad.row_count = 3;
        let e = row_events(&record(Body::RowBlock(bad))).unwrap_err();
        assert!(
            e.to_string().starts_with("a row block of public.acct"),
            "{e}"
        );
    }

    #[test]
    fn other_records_have_no_row_events() {
        assert!(row_events(&record(Body::Line(b"x".to_vec())))
            .unwrap()
            .is_empty());
        assert!(row_events(&record(Body::FileChunk(FileChunk::default())))
            .unwrap()
            .is_empty());
        assert!(row_events(&Record::default()).unwrap().is_empty());
    }

    /// The envelope read directly: a table's neutral shape (no key under a
    /// whole-row identity is the source's to say), a row with its neutral
    /// values, a block of snapshot rows with binary values as bytes.
    #[test]
    fn envelope_records_are_events() {
        let table = Table {
            schema: "hall".into(),
            table: "resident".into(),
            columns: vec![
                NeutralType::Int64.to_column("id", "bigint", true),
                NeutralType::Decimal {
                    precision: Some(12),
                    scale: Some(2),
                }
                .to_column("fee", "decimal(12,2)", false),
                NeutralType::Bytes.to_column("photo", "blob", false),
                NeutralType::Other("set('a','b')".into()).to_column("tags", "set('a','b')", false),
            ],
            identity: "key".into(),
            position: b"binlog.000001:4".to_vec(),
            source: "mysql".into(),
        };
        let ev = row_events(&record(Body::Table(table.clone()))).unwrap();
        let RowEvent::Shape(shape) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            shape
                .columns
                .iter()
                .map(|c| (c.ty.clone(), c.key))
                .collect::<Vec<_>>(),
            vec![
                (NeutralType::Int64, true),
                (
                    NeutralType::Decimal {
                        precision: Some(12),
                        scale: Some(2)
                    },
                    false
                ),
                (NeutralType::Bytes, false),
                (NeutralType::Other("set('a','b')".into()), false),
            ]
        );
        let row = Row {
            schema: "hall".into(),
            table: "resident".into(),
            op: RowOp::Delete as i32,
            txn: "0-1-42".into(),
            last_in_txn: false,
            old_key: vec![Field {
                name: "id".into(),
                value_type: ValueType::Int64 as i32,
                value: Some(field::Value::Text("7".into())),
            }],
            source: "mysql".into(),
            ..Default::default()
        };
        assert_eq!(
            row_events(&record(Body::Row(row))).unwrap(),
            vec![RowEvent::Delete {
                namespace: "hall".into(),
                table: "resident".into(),
                old_key: vec![("id".into(), Value::Text("7".into()))],
                end_of_txn: false,
            }]
        );
        let block = Rows {
            schema: "hall".into(),
            table: "resident".into(),
            columns: table.columns.clone(),
            position: b"binlog.000001:4".to_vec(),
            first_index: 0,
            row_count: 1,
            copy_text: "7\t1.50\t\\\\x00ff\ta,b\n".into(),
            source: "mysql".into(),
        };
        let ev = row_events(&record(Body::Rows(block))).unwrap();
        assert_eq!(
            ev,
            vec![RowEvent::Upsert {
                namespace: "hall".into(),
                table: "resident".into(),
                columns: vec![
                    ("id".into(), Value::Text("7".into())),
                    ("fee".into(), Value::Text("1.50".into())),
                    ("photo".into(), Value::Bytes(vec![0, 0xff])),
                    ("tags".into(), Value::Text("a,b".into())),
                ],
                old_key: vec![],
                end_of_txn: true,
            }]
        );
    }
}
