//! What operators read out of the store: `records` (JSON lines) and `export`
//! (received files written out). Both work on an open store ([`Backend`]), whether the
//! command opened it itself or asked the running exchange over its admin socket.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine;
use ferry_protocol::copy_text::rows_of;
use ferry_protocol::messages::record::Body;
use ferry_protocol::messages::{field, Field, Record, Row, RowOp, Table};
use ferry_protocol::rows::{envelope_of, position_lsn, POSTGRES};
use serde_json::{json, Value};

use crate::store::{Backend, FileRecord};

fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Writes a stream's records from `from` on as JSON lines (see [`record_lines`]).
pub fn write_records(
    store: &dyn Backend,
    agent: &str,
    stream: &str,
    from: u64,
    out: &mut dyn Write,
) -> Result<u64> {
    let mut n = 0u64;
    let mut failure = None;
    store.records(agent, stream, from, &mut |r, stored_ms| {
        let file = |id: &str| store.file(agent, stream, id).ok().flatten();
        for line in record_lines(r.seq, &r.record, stored_ms, &file) {
            if let Err(e) = writeln!(out, "{line}") {
                failure = Some(e);
                return false;
            }
            n += 1;
        }
        true
    })?;
    if let Some(e) = failure {
        // A closed pipe (`| head`) is how a reader says it has seen enough.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    Ok(n)
}

/// One stored record as JSON lines: a line of a tailed file is one record (its
/// text, or base64 when it is not UTF-8); a file is one record (path, size,
/// sha256, status), at the seq of its last chunk; a row change or a table's
/// schema is one record; a block of snapshot rows is one line per row, each with
/// the block's `seq` and its `item` within it. Intermediate file chunks and
/// aborted transfers give none. `file` looks up a file's status.
pub fn record_lines(
    seq: u64,
    record: &Record,
    stored_ms: u64,
    file: &dyn Fn(&str) -> Option<FileRecord>,
) -> Vec<Value> {
    let head = |position: &str| {
        json!({
            "seq": seq,
            "time": rfc3339(record.time_unix_ms),
            "stored": rfc3339(stored_ms),
            "position": position,
        })
    };
    let body: Option<(&str, Value)> = match &record.body {
        Some(Body::Line(bytes)) => Some(match std::str::from_utf8(bytes) {
            Ok(s) => ("text", json!(s)),
            Err(_) => (
                "base64",
                json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
        }),
        Some(Body::FileChunk(c)) if c.end.is_some() => {
            let rec = file(&c.file_id);
            let end = c.end.clone().unwrap_or_default();
            Some((
                "file",
                json!({
                    "path": c.path,
                    "size": end.size,
                    "sha256": hex::encode(&end.sha256),
                    "file_id": c.file_id,
                    "status": rec.map_or("unknown".to_string(), |r| r.status),
                }),
            ))
        }
        // Rows of version 3 agents print as their source-neutral twins.
        Some(old @ (Body::RowChange(_) | Body::SchemaChange(_) | Body::RowBlock(_))) => {
            let twin = Record {
                body: envelope_of(old),
                ..record.clone()
            };
            return record_lines(seq, &twin, stored_ms, file);
        }
        Some(Body::Row(r)) => Some(("row", envelope_json(r))),
        Some(Body::Table(t)) => Some(("schema", table_json(t))),
        // One line per row, each as the row change it stands for; `item`
        // numbers the rows of the record.
        Some(Body::Rows(b)) => {
            let rows = rows_of(b).map(|rows| {
                rows.iter()
                    .map(|r| (r.change_index, envelope_json(r)))
                    .collect()
            });
            return snapshot_lines(&head, &record.position, &b.schema, &b.table, rows);
        }
        // Intermediate chunks and aborted transfers are not records of their own.
        _ => None,
    };
    body.map(|(k, v)| with(head(&record.position), k, v))
        .into_iter()
        .collect()
}

/// The lines of a block of snapshot rows: each row's line, or one line with the
/// error of a block that does not read (checked on arrival; a store damaged
/// since says so here).
fn snapshot_lines(
    head: &dyn Fn(&str) -> Value,
    position: &str,
    schema: &str,
    table: &str,
    rows: Result<Vec<(u32, Value)>, String>,
) -> Vec<Value> {
    match rows {
        Ok(rows) => rows
            .into_iter()
            .enumerate()
            .map(|(i, (index, row))| {
                let position = format!("snapshot {schema}.{table} #{index}");
                with(with(head(&position), "item", json!(i)), "row", row)
            })
            .collect(),
        Err(e) => vec![with(head(position), "error", json!(e))],
    }
}

fn with(mut line: Value, k: &str, v: Value) -> Value {
    if let Some(obj) = line.as_object_mut() {
        obj.insert(k.to_string(), v);
    }
    line
}

/// A PostgreSQL LSN as PostgreSQL prints it (`0/1A2B3C8`).
fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

/// A column value as the source's text output renders it; NULL is `null`,
/// binary `"\\x<hex>"`, an unchanged value of a PostgreSQL row (TOAST)
/// `{"unchanged_toast": true}`, of any other source `{"unchanged": true}`.
fn field_json(v: Option<&field::Value>, source: &str) -> Value {
    match v {
        Some(field::Value::Text(t)) => json!(t),
        Some(field::Value::Bytes(b)) => json!(format!("\\x{}", hex::encode(b))),
        Some(field::Value::Unchanged(_)) if source == POSTGRES => json!({"unchanged_toast": true}),
        Some(field::Value::Unchanged(_)) => json!({"unchanged": true}),
        Some(field::Value::Null(_)) | None => Value::Null,
    }
}

fn fields_json(cols: &[Field], source: &str) -> Value {
    let mut m = serde_json::Map::new();
    for c in cols {
        m.insert(c.name.clone(), field_json(c.value.as_ref(), source));
    }
    Value::Object(m)
}

/// Where a source position and transaction id go in a line: a PostgreSQL
/// row's as `xid` and `commit_lsn` (as version 3 rows print), any other
/// source's as `source`, `txn` and `source_position` (its text, or hex).
fn position_json(
    obj: &mut serde_json::Map<String, Value>,
    source: &str,
    txn: Option<&str>,
    position: &[u8],
) {
    match position_lsn(position).filter(|_| source == POSTGRES) {
        Some(lsn_value) => {
            if let Some(txn) = txn {
                obj.insert("xid".into(), json!(txn.parse::<u64>().unwrap_or(0)));
            }
            obj.insert("commit_lsn".into(), json!(lsn(lsn_value)));
        }
        None => {
            obj.insert("source".into(), json!(source));
            if let Some(txn) = txn {
                obj.insert("txn".into(), json!(txn));
            }
            let text = match std::str::from_utf8(position) {
                Ok(t) if !t.chars().any(char::is_control) => t.to_string(),
                _ => hex::encode(position),
            };
            obj.insert("source_position".into(), json!(text));
        }
    }
}

/// `"row": {...}`: one captured row change.
fn envelope_json(r: &Row) -> Value {
    let op = op_name(r.op);
    let mut obj = serde_json::Map::new();
    obj.insert("schema".into(), json!(r.schema));
    obj.insert("table".into(), json!(r.table));
    obj.insert("op".into(), json!(op));
    position_json(&mut obj, &r.source, Some(&r.txn), &r.position);
    obj.insert("change".into(), json!(r.change_index));
    obj.insert("last_in_txn".into(), json!(r.last_in_txn));
    if r.commit_time_unix_us > 0 {
        obj.insert(
            "commit_time".into(),
            json!(commit_time(r.commit_time_unix_us)),
        );
    }
    if r.snapshot {
        obj.insert("snapshot".into(), json!(true));
    }
    if !r.columns.is_empty() || matches!(op, "insert" | "update") {
        obj.insert("columns".into(), fields_json(&r.columns, &r.source));
    }
    if !r.old_key.is_empty() {
        obj.insert("old_key".into(), fields_json(&r.old_key, &r.source));
    }
    for flag in &r.flags {
        match flag.as_str() {
            "cascade" | "restart_identity" if r.source == POSTGRES => {
                obj.insert(flag.clone(), json!(true));
            }
            _ => {}
        }
    }
    if r.source != POSTGRES && !r.flags.is_empty() {
        obj.insert("flags".into(), json!(r.flags));
    }
    Value::Object(obj)
}

/// `"schema": {...}`: the column set of a captured table (`replica_identity`:
/// how the source identifies rows).
fn table_json(t: &Table) -> Value {
    let cols: Vec<Value> = t
        .columns
        .iter()
        .map(|col| json!({"name": col.name, "type": col.source_type, "key": col.key}))
        .collect();
    let mut obj = serde_json::Map::new();
    obj.insert("schema".into(), json!(t.schema));
    obj.insert("table".into(), json!(t.table));
    obj.insert("columns".into(), json!(cols));
    obj.insert("replica_identity".into(), json!(t.identity));
    position_json(&mut obj, &t.source, None, &t.position);
    Value::Object(obj)
}

/// What the dashboard shows of a stored record: its seq, times, source
/// position, kind and size, and for database records the table and operation;
/// never the line, the values or the file bytes.
pub fn metadata(r: &crate::store::StoredRecord, stored_ms: u64) -> Value {
    let rec = &r.record;
    let (kind, table, op) = match &rec.body {
        Some(Body::Line(_)) => ("line", None, None),
        Some(Body::FileChunk(c)) => ("file_chunk", Some(c.path.clone()), None),
        Some(Body::FileAbort(_)) => ("file_abort", None, None),
        Some(Body::RowChange(c)) => (
            "row",
            Some(format!("{}.{}", c.schema, c.table)),
            Some(op_name(c.op)),
        ),
        Some(Body::Row(c)) => (
            "row",
            Some(format!("{}.{}", c.schema, c.table)),
            Some(op_name(c.op)),
        ),
        Some(Body::SchemaChange(c)) => ("schema", Some(format!("{}.{}", c.schema, c.table)), None),
        Some(Body::Table(c)) => ("schema", Some(format!("{}.{}", c.schema, c.table)), None),
        Some(Body::RowBlock(c)) => ("rows", Some(format!("{}.{}", c.schema, c.table)), None),
        Some(Body::Rows(c)) => ("rows", Some(format!("{}.{}", c.schema, c.table)), None),
        None => ("empty", None, None),
    };
    json!({
        "seq": r.seq,
        "time": rfc3339(rec.time_unix_ms),
        "stored": rfc3339(stored_ms),
        "position": rec.position,
        "kind": kind,
        "bytes": prost::Message::encoded_len(rec),
        "table": table,
        "op": op,
    })
}

fn op_name(op: i32) -> &'static str {
    match RowOp::try_from(op).unwrap_or(RowOp::Unspecified) {
        RowOp::Insert => "insert",
        RowOp::Update => "update",
        RowOp::Delete => "delete",
        RowOp::Truncate => "truncate",
        RowOp::Unspecified => "unspecified",
    }
}

fn commit_time(us: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// A received path made safe to join under the export directory.
pub fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Writes every complete file of a stream under `to`, keeping relative paths.
/// A file received twice under one path (re-sent after a change) keeps the last.
pub fn export(
    store: &dyn Backend,
    agent: &str,
    stream: &str,
    to: &Path,
    out: &mut dyn Write,
) -> Result<u64> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut n = 0;
    for f in store.files(agent, stream)? {
        if f.status != "complete" {
            continue;
        }
        let Some(rel) = safe_relative(&f.path) else {
            writeln!(
                out,
                "{}",
                json!({"skipped": f.path, "reason": "unsafe path"})
            )?;
            continue;
        };
        let dest = to.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut src = store.open_file(agent, stream, &f.file_id)?;
        let mut file =
            std::fs::File::create(&dest).with_context(|| format!("creating {}", dest.display()))?;
        std::io::copy(&mut src, &mut file).with_context(|| {
            format!(
                "copying file {} of {agent}/{stream} to {}",
                f.file_id,
                dest.display()
            )
        })?;
        writeln!(
            out,
            "{}",
            json!({"exported": dest, "size": f.size, "sha256": f.sha256})
        )?;
        n += 1;
    }
    if n == 0 && store.files(agent, stream)?.is_empty() && store.next_expected(agent, stream)? == 1
    {
        bail!("the store holds nothing for agent {agent:?} stream {stream:?}");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::messages::{
        column, Column, RowBlock, RowChange, Rows, SchemaChange, SchemaColumn, ValueType,
    };
    use ferry_protocol::rows::{lsn_position, NeutralType};

    fn col(name: &str, v: column::Value) -> Column {
        Column {
            name: name.into(),
            type_name: "text".into(),
            type_oid: 25,
            value: Some(v),
        }
    }

    fn fld(name: &str, v: field::Value) -> Field {
        Field {
            name: name.into(),
            value_type: ValueType::Text as i32,
            value: Some(v),
        }
    }

    fn lines(body: Body) -> Vec<Value> {
        let r = Record {
            time_unix_ms: 1,
            position: "p".into(),
            body: Some(body),
        };
        record_lines(9, &r, 2, &|_| None)
    }

    const ROW: &str = r#"{
        "schema": "public", "table": "person", "op": "update", "xid": 750,
        "commit_lsn": "1/1A2B3C8", "change": 3, "last_in_txn": true,
        "commit_time": "2023-11-14T22:13:20.123456Z",
        "columns": {"id": "1", "city": "沈阳市", "note": null,
                    "photo": {"unchanged_toast": true}, "raw": "\\xdead"},
        "old_key": {"id": "0"}
    }"#;

    /// A PostgreSQL row prints the same whether a version 3 agent stored it
    /// (`RowChange`) or a version 4 one (`Row`).
    #[test]
    fn row_changes_render_as_postgres_text_in_both_versions() {
        let want: Value = serde_json::from_str(ROW).unwrap();
        let old = RowChange {
            schema: "public".into(),
            table: "person".into(),
            op: RowOp::Update as i32,
            xid: 750,
            commit_lsn: (1 << 32) | 0x1A2B3C8,
            commit_time_unix_us: 1_700_000_000_123_456,
            change_index: 3,
            last_in_txn: true,
            columns: vec![
                col("id", column::Value::Text("1".into())),
                col("city", column::Value::Text("沈阳市".into())),
                col("note", column::Value::Null(true)),
                col("photo", column::Value::UnchangedToast(true)),
                col("raw", column::Value::Bytes(vec![0xde, 0xad])),
            ],
            old_key: vec![col("id", column::Value::Text("0".into()))],
            ..Default::default()
        };
        assert_eq!(lines(Body::RowChange(old))[0]["row"], want);
        let new = Row {
            schema: "public".into(),
            table: "person".into(),
            op: RowOp::Update as i32,
            txn: "750".into(),
            position: lsn_position((1 << 32) | 0x1A2B3C8),
            commit_time_unix_us: 1_700_000_000_123_456,
            change_index: 3,
            last_in_txn: true,
            columns: vec![
                fld("id", field::Value::Text("1".into())),
                fld("city", field::Value::Text("沈阳市".into())),
                fld("note", field::Value::Null(true)),
                fld("photo", field::Value::Unchanged(true)),
                fld("raw", field::Value::Bytes(vec![0xde, 0xad])),
            ],
            old_key: vec![fld("id", field::Value::Text("0".into()))],
            source: POSTGRES.into(),
            ..Default::default()
        };
        assert_eq!(lines(Body::Row(new.clone()))[0]["row"], want);
        let truncate = Row {
            op: RowOp::Truncate as i32,
            columns: vec![],
            old_key: vec![],
            flags: vec!["cascade".into(), "restart_identity".into()],
            ..new
        };
        let row = &lines(Body::Row(truncate))[0]["row"];
        assert_eq!(
            (&row["cascade"], &row["restart_identity"]),
            (&json!(true), &json!(true))
        );
        assert!(
            row.get("columns").is_none() && row.get("flags").is_none(),
            "{row}"
        );
    }

    #[test]
    fn schemas_render_in_both_versions() {
        let want = json!({"schema": "public", "table": "person", "replica_identity": "default",
            "commit_lsn": "0/10", "columns": [{"name": "id", "type": "integer", "key": true}]});
        let old = SchemaChange {
            schema: "public".into(),
            table: "person".into(),
            columns: vec![SchemaColumn {
                name: "id".into(),
                type_name: "integer".into(),
                type_oid: 23,
                key: true,
            }],
            replica_identity: "default".into(),
            commit_lsn: 0x10,
        };
        assert_eq!(lines(Body::SchemaChange(old))[0]["schema"], want);
        let new = Table {
            schema: "public".into(),
            table: "person".into(),
            columns: vec![NeutralType::Int32.to_column("id", "integer", true)],
            identity: "default".into(),
            position: lsn_position(0x10),
            source: POSTGRES.into(),
        };
        assert_eq!(lines(Body::Table(new))[0]["schema"], want);
    }

    /// A block of snapshot rows is a line per row, in both versions.
    #[test]
    fn snapshot_blocks_render_a_line_per_row_in_both_versions() {
        let text = "\\\\x00ff\n\\N\n";
        let old = lines(Body::RowBlock(RowBlock {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![SchemaColumn {
                name: "b".into(),
                type_name: "bytea".into(),
                type_oid: 17,
                key: true,
            }],
            commit_lsn: 0x10,
            first_index: 7,
            row_count: 2,
            copy_text: text.into(),
        }));
        assert_eq!(old.len(), 2);
        assert_eq!(
            (
                &old[0]["row"]["columns"]["b"],
                &old[1]["row"]["columns"]["b"]
            ),
            (&json!("\\x00ff"), &Value::Null)
        );
        assert_eq!(
            (
                &old[1]["position"],
                &old[1]["item"],
                &old[1]["row"]["snapshot"]
            ),
            (&json!("snapshot public.t #8"), &json!(1), &json!(true))
        );
        let new = lines(Body::Rows(Rows {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![NeutralType::Bytes.to_column("b", "bytea", true)],
            position: lsn_position(0x10),
            first_index: 7,
            row_count: 2,
            copy_text: text.into(),
            source: POSTGRES.into(),
        }));
        assert_eq!(new, old);
    }

    /// Another source's rows say which source they come from, with its own
    /// transaction id and position.
    #[test]
    fn envelope_rows_of_other_sources_name_their_position() {
        let r = Row {
            schema: "hall".into(),
            table: "resident".into(),
            op: RowOp::Insert as i32,
            txn: "0-1-42".into(),
            position: b"mysql-bin.000003:4711".to_vec(),
            last_in_txn: true,
            columns: vec![fld("name", field::Value::Text("张三".into()))],
            source: "mysql".into(),
            ..Default::default()
        };
        assert_eq!(
            envelope_json(&r),
            json!({
                "schema": "hall", "table": "resident", "op": "insert", "source": "mysql",
                "txn": "0-1-42", "source_position": "mysql-bin.000003:4711", "change": 0,
                "last_in_txn": true, "columns": {"name": "张三"},
            })
        );
    }
}
