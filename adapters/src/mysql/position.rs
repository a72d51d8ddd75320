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
}

/// A transaction committed to the buffer in pieces: its first `done` changes
/// are durable. `end` is the `file:pos` its commit event ends at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Partial {
    pub end: String,
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
            let mut s = format!("binlog {}", p.at());
            if !p.gtid.is_empty() {
                s.push_str(&format!(", gtid {}", p.gtid));
            }
            if let Some(part) = &p.partial {
                s.push_str(&format!(
                    "; {} changes of the transaction ending at {} durable",
                    part.done, part.end
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
                end: "binlog.000042:9876".into(),
                done: 10000,
            }),
            schemas: BTreeMap::new(),
        };
        let b = p.encode().unwrap();
        assert_eq!(MyPosition::decode(&b).unwrap(), p);
        assert_eq!(
            describe(&b),
            "binlog binlog.000042:1234, gtid 0-1-13; 10000 changes of the transaction ending at binlog.000042:9876 durable"
        );
        assert_eq!(
            gauges(&b),
            vec![("mysql_binlog_file_number", 42), ("mysql_binlog_pos", 1234)]
        );
        assert!(describe(b"nope").contains("not valid"));
        assert!(gauges(b"nope").is_empty());
    }
}
