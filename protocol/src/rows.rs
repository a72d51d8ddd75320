//! A source-neutral view of database records, as a delivery consumes them.
//!
//! A source ships [`RowChange`]s, [`SchemaChange`]s and [`RowBlock`]s in its own
//! terms (PostgreSQL type oids, replica identities, COPY text). [`row_events`]
//! turns each [`Record`] into [`RowEvent`]s that say only what a consumer needs to
//! reproduce the table: a table's shape (columns, neutral types, key), upserts by
//! key, deletes, truncates. A delivery written against these events takes any
//! source that maps into them (a MySQL source would map its own type names into
//! [`NeutralType`] and its binlog rows into the same events) without a change.
//!
//! Values stay in the source's canonical text form ([`Value::Text`]: PostgreSQL's
//! type output, exact for numeric and with the zone for timestamptz), so nothing
//! is lost between the source and the consumer's own input functions.
//!
//! [`RowBlock`]: crate::messages::RowBlock

use crate::copy_text::block_rows;
use crate::messages::{column, record::Body, Column, Record, RowChange, RowOp, SchemaChange};

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
        match type_oid {
            16 => NeutralType::Bool,
            21 => NeutralType::Int16,
            23 => NeutralType::Int32,
            20 => NeutralType::Int64,
            700 => NeutralType::Float32,
            701 => NeutralType::Float64,
            1700 => {
                let (precision, scale) = numeric_modifiers(type_name);
                NeutralType::Decimal { precision, scale }
            }
            25 | 1043 | 1042 | 19 => NeutralType::Text,
            17 => NeutralType::Bytes,
            1082 => NeutralType::Date,
            1083 => NeutralType::Time,
            1114 => NeutralType::Timestamp,
            1184 => NeutralType::TimestampTz,
            1186 => NeutralType::Interval,
            2950 => NeutralType::Uuid,
            114 | 3802 => NeutralType::Json,
            _ => NeutralType::Other(type_name.to_string()),
        }
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
        Some(Body::RowChange(c)) => Ok(vec![change_event(c)?]),
        Some(Body::SchemaChange(s)) => Ok(vec![RowEvent::Shape(shape(s))]),
        Some(Body::RowBlock(b)) => {
            let rows = block_rows(b).map_err(|reason| RowsError::Block {
                table: format!("{}.{}", b.schema, b.table),
                reason,
            })?;
            rows.iter().map(change_event).collect()
        }
        Some(Body::Line(_) | Body::FileChunk(_) | Body::FileAbort(_)) | None => Ok(Vec::new()),
    }
}

/// A schema change as a shape. Under `REPLICA IDENTITY FULL` PostgreSQL flags
/// every column as identity, which is no key at all (columns may be NULL, rows
/// may repeat): such a table has no key here, and its updates and deletes carry
/// the whole old row to find it by.
fn shape(s: &SchemaChange) -> TableShape {
    let full = s.replica_identity == "full";
    TableShape {
        namespace: s.schema.clone(),
        table: s.table.clone(),
        columns: s
            .columns
            .iter()
            .map(|c| ColumnShape {
                name: c.name.clone(),
                ty: NeutralType::from_postgres(c.type_oid, &c.type_name),
                key: c.key && !full,
            })
            .collect(),
    }
}

fn change_event(c: &RowChange) -> Result<RowEvent, RowsError> {
    let values = |cols: &[Column]| -> Result<Vec<(String, Value)>, RowsError> {
        cols.iter()
            .map(|col| {
                let v = match &col.value {
                    Some(column::Value::Text(t)) => Value::Text(t.clone()),
                    Some(column::Value::Null(_)) => Value::Null,
                    Some(column::Value::UnchangedToast(_)) => Value::Unchanged,
                    Some(column::Value::Bytes(b)) => Value::Bytes(b.clone()),
                    None => {
                        return Err(RowsError::NoValue {
                            table: format!("{}.{}", c.schema, c.table),
                            column: col.name.clone(),
                        })
                    }
                };
                Ok((col.name.clone(), v))
            })
            .collect()
    };
    let namespace = c.schema.clone();
    let table = c.table.clone();
    let end_of_txn = c.last_in_txn;
    match RowOp::try_from(c.op) {
        Ok(RowOp::Insert | RowOp::Update) => Ok(RowEvent::Upsert {
            columns: values(&c.columns)?,
            old_key: values(&c.old_key)?,
            namespace,
            table,
            end_of_txn,
        }),
        Ok(RowOp::Delete) => Ok(RowEvent::Delete {
            old_key: values(&c.old_key)?,
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
            table: format!("{}.{}", c.schema, c.table),
            op: c.op,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{FileChunk, RowBlock, SchemaColumn};

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
}
