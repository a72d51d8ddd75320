//! What operators read out of the store: `records` (JSON lines) and `export`
//! (received files written out). Both work on an open store ([`Backend`]), whether the
//! command opened it itself or asked the running exchange over its admin socket.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine;
use ferry_protocol::copy_text::block_rows;
use ferry_protocol::messages::record::Body;
use ferry_protocol::messages::{column, Column, Record, RowChange, RowOp, SchemaChange};
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
    let with = |mut line: Value, k: &str, v: Value| {
        if let Some(obj) = line.as_object_mut() {
            obj.insert(k.to_string(), v);
        }
        line
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
        Some(Body::RowChange(c)) => Some(("row", row_json(c))),
        Some(Body::SchemaChange(c)) => Some(("schema", schema_json(c))),
        Some(Body::RowBlock(b)) => {
            // One line per row, each as the row change it stands for; `item`
            // numbers the rows of the record.
            return match block_rows(b) {
                Ok(rows) => rows
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let line = head(&format!(
                            "snapshot {}.{} #{}",
                            b.schema, b.table, c.change_index
                        ));
                        with(with(line, "item", json!(i)), "row", row_json(c))
                    })
                    .collect(),
                // Checked on arrival; a store damaged since says so here.
                Err(e) => vec![with(head(&record.position), "error", json!(e))],
            };
        }
        // Intermediate chunks and aborted transfers are not records of their own.
        _ => None,
    };
    body.map(|(k, v)| with(head(&record.position), k, v))
        .into_iter()
        .collect()
}

/// A PostgreSQL LSN as PostgreSQL prints it (`0/1A2B3C8`).
fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

/// A column value as PostgreSQL's text output renders it; NULL is `null`, an
/// unchanged TOAST value `{"unchanged_toast": true}`, bytea `"\\x<hex>"`.
fn value_json(v: Option<&column::Value>) -> Value {
    match v {
        Some(column::Value::Text(t)) => json!(t),
        Some(column::Value::Bytes(b)) => json!(format!("\\x{}", hex::encode(b))),
        Some(column::Value::UnchangedToast(_)) => json!({"unchanged_toast": true}),
        Some(column::Value::Null(_)) | None => Value::Null,
    }
}

fn columns_json(cols: &[Column]) -> Value {
    let mut m = serde_json::Map::new();
    for c in cols {
        m.insert(c.name.clone(), value_json(c.value.as_ref()));
    }
    Value::Object(m)
}

/// `"row": {...}`: one captured row change.
fn row_json(c: &RowChange) -> Value {
    let op = match RowOp::try_from(c.op).unwrap_or(RowOp::Unspecified) {
        RowOp::Insert => "insert",
        RowOp::Update => "update",
        RowOp::Delete => "delete",
        RowOp::Truncate => "truncate",
        RowOp::Unspecified => "unspecified",
    };
    let mut v = json!({
        "schema": c.schema,
        "table": c.table,
        "op": op,
        "xid": c.xid,
        "commit_lsn": lsn(c.commit_lsn),
        "change": c.change_index,
        "last_in_txn": c.last_in_txn,
    });
    if let Some(obj) = v.as_object_mut() {
        if c.commit_time_unix_us > 0 {
            let t = std::time::UNIX_EPOCH
                + std::time::Duration::from_micros(c.commit_time_unix_us as u64);
            obj.insert(
                "commit_time".into(),
                json!(humantime::format_rfc3339_micros(t).to_string()),
            );
        }
        if c.snapshot {
            obj.insert("snapshot".into(), json!(true));
        }
        if !c.columns.is_empty() || matches!(op, "insert" | "update") {
            obj.insert("columns".into(), columns_json(&c.columns));
        }
        if !c.old_key.is_empty() {
            obj.insert("old_key".into(), columns_json(&c.old_key));
        }
        if c.truncate_cascade {
            obj.insert("cascade".into(), json!(true));
        }
        if c.truncate_restart_identity {
            obj.insert("restart_identity".into(), json!(true));
        }
    }
    v
}

/// `"schema": {...}`: the column set of a captured table.
fn schema_json(c: &SchemaChange) -> Value {
    let cols: Vec<Value> = c
        .columns
        .iter()
        .map(|col| json!({"name": col.name, "type": col.type_name, "key": col.key}))
        .collect();
    json!({
        "schema": c.schema,
        "table": c.table,
        "columns": cols,
        "replica_identity": c.replica_identity,
        "commit_lsn": lsn(c.commit_lsn),
    })
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

    fn col(name: &str, v: column::Value) -> Column {
        Column {
            name: name.into(),
            type_name: "text".into(),
            type_oid: 25,
            value: Some(v),
        }
    }

    #[test]
    fn row_changes_render_as_postgres_text() {
        let c = RowChange {
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
        let v = row_json(&c);
        assert_eq!(
            v,
            json!({
                "schema": "public", "table": "person", "op": "update", "xid": 750,
                "commit_lsn": "1/1A2B3C8", "change": 3, "last_in_txn": true,
                "commit_time": "2023-11-14T22:13:20.123456Z",
                "columns": {"id": "1", "city": "沈阳市", "note": null,
                            "photo": {"unchanged_toast": true}, "raw": "\\xdead"},
                "old_key": {"id": "0"},
            })
        );
        let s = SchemaChange {
            schema: "public".into(),
            table: "person".into(),
            columns: vec![ferry_protocol::messages::SchemaColumn {
                name: "id".into(),
                type_name: "integer".into(),
                type_oid: 23,
                key: true,
            }],
            replica_identity: "default".into(),
            commit_lsn: 0x10,
        };
        assert_eq!(
            schema_json(&s),
            json!({"schema": "public", "table": "person", "replica_identity": "default",
                   "commit_lsn": "0/10", "columns": [{"name": "id", "type": "integer", "key": true}]})
        );
    }
}
