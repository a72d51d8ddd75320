//! The mysql source's committed position (format in the parent module doc).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::SourceError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MyPosition {
    /// Binlog file and offset right after the last transaction durable whole.
    pub file: String,
    pub pos: u64,
    /// MariaDB GTID state at `file:pos`; empty on MySQL or without GTIDs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gtid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<Partial>,
    #[serde(default)]
    pub schemas: BTreeMap<String, String>,
    /// The initial snapshot, while it runs: `file`/`pos`/`gtid` are then the
    /// point it is consistent with, where the stream starts once it is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotState>,
}

/// How far the initial snapshot is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotState {
    /// The tables to copy, in order (`source.tables` when it began).
    pub tables: Vec<String>,
    /// Index of the table being copied; `tables.len()` when all are.
    pub table: usize,
    /// The primary key of the last row of that table that is durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key: Option<Vec<KeyValue>>,
    /// Rows of that table that are durable.
    pub rows_done: u64,
    /// The server's estimate of that table's rows.
    #[serde(default)]
    pub rows_estimate: u64,
}

/// One value of a paging key, as a query parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum KeyValue {
    Text(String),
    /// Bytes, in hex.
    Bytes(String),
}

/// A transaction committed to the buffer in pieces: its first `done` changes
/// are durable. `begin` is the `file:pos` of its first event (the position
/// its changes carry); the transaction is the first one after `file`/`pos`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Partial {
    pub begin: String,
    pub done: u32,
}

impl MyPosition {
    pub(crate) fn decode(bytes: &[u8]) -> Result<MyPosition, String> {
        serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "the stored mysql position ({} bytes) is not valid: {e}",
                bytes.len()
            )
        })
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, SourceError> {
        serde_json::to_vec(self)
            .map_err(|e| SourceError::Other(format!("cannot encode the mysql position: {e}")))
    }

    /// `file:pos`.
    pub(crate) fn at(&self) -> String {
        format!("{}:{}", self.file, self.pos)
    }
}

/// One line for `status`.
pub(crate) fn describe(position: &[u8]) -> String {
    match MyPosition::decode(position) {
        Err(e) => e,
        Ok(p) => {
            if let Some(snap) = &p.snapshot {
                let mut s = format!(
                    "initial snapshot: table {} of {}",
                    (snap.table + 1).min(snap.tables.len()),
                    snap.tables.len()
                );
                if let Some(t) = snap.tables.get(snap.table) {
                    s.push_str(&format!(
                        " ({t}), {} of about {} rows copied",
                        snap.rows_done, snap.rows_estimate
                    ));
                }
                s.push_str(&format!("; then the binlog from {}", p.at()));
                return s;
            }
            let mut s = format!("binlog {}", p.at());
            if !p.gtid.is_empty() {
                s.push_str(&format!(", gtid {}", p.gtid));
            }
            if let Some(part) = &p.partial {
                s.push_str(&format!(
                    "; {} changes of the transaction beginning at {} durable",
                    part.done, part.begin
                ));
            }
            s
        }
    }
}

/// The numeric suffix of a binlog file name (`binlog.000042` → 42).
fn file_number(file: &str) -> Option<u64> {
    file.rsplit_once('.')?.1.parse().ok()
}

pub(crate) fn gauges(position: &[u8]) -> crate::Gauges {
    let Ok(p) = MyPosition::decode(position) else {
        return Vec::new();
    };
    let mut g = Vec::new();
    if let Some(n) = file_number(&p.file) {
        g.push(("mysql_binlog_file_number", n));
    }
    g.push(("mysql_binlog_pos", p.pos));
    if let Some(snap) = &p.snapshot {
        g.push(("mysql_snapshot_rows_done", snap.rows_done));
        g.push(("mysql_snapshot_rows_estimate", snap.rows_estimate));
    }
    g
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn positions_round_trip_and_read_well() {
        let p = MyPosition {
            file: "binlog.000042".into(),
            pos: 1234,
            gtid: "0-1-13".into(),
            partial: Some(Partial {
                begin: "binlog.000042:1234".into(),
                done: 10000,
            }),
            schemas: BTreeMap::new(),
            snapshot: None,
        };
        let b = p.encode().unwrap();
        assert_eq!(MyPosition::decode(&b).unwrap(), p);
        assert_eq!(
            describe(&b),
            "binlog binlog.000042:1234, gtid 0-1-13; 10000 changes of the transaction beginning at binlog.000042:1234 durable"
        );
        assert_eq!(
            gauges(&b),
            vec![("mysql_binlog_file_number", 42), ("mysql_binlog_pos", 1234)]
        );
        let snap = MyPosition {
            partial: None,
            snapshot: Some(SnapshotState {
                tables: vec!["shop.a".into(), "shop.b".into()],
                table: 1,
                last_key: Some(vec![KeyValue::Text("7".into())]),
                rows_done: 500,
                rows_estimate: 1000,
            }),
            ..p
        };
        let b = snap.encode().unwrap();
        assert_eq!(MyPosition::decode(&b).unwrap(), snap);
        assert_eq!(
            describe(&b),
            "initial snapshot: table 2 of 2 (shop.b), 500 of about 1000 rows copied; then the binlog from binlog.000042:1234"
        );
        assert_eq!(
            gauges(&b)[2..],
            [
                ("mysql_snapshot_rows_done", 500),
                ("mysql_snapshot_rows_estimate", 1000)
            ]
        );
        assert!(describe(b"nope").contains("not valid"));
        assert!(gauges(b"nope").is_empty());
    }
}
