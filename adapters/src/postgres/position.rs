//! The postgres source's committed position (format in the parent module doc).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{human_bytes, SourceError};

/// Formats an LSN as PostgreSQL does: `0/1A2B3C8`.
pub(crate) fn fmt_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

/// Parses `0/1A2B3C8`.
pub(crate) fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

mod lsn_text {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&fmt_lsn(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        parse_lsn(&s).ok_or_else(|| serde::de::Error::custom(format!("invalid LSN {s:?}")))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub(crate) enum PgPosition {
    Snapshot(SnapshotPos),
    Streaming(StreamPos),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotPos {
    pub slot: String,
    /// Where the slot was created; streaming starts here once the copy is done.
    #[serde(with = "lsn_text")]
    pub consistent_lsn: u64,
    /// The WAL position of the view the copy currently runs under (`consistent_lsn`
    /// unless the copy was resumed after a crash under a fresh view).
    #[serde(with = "lsn_text")]
    pub view_lsn: u64,
    /// Tables in copy order, fixed when the snapshot began.
    pub tables: Vec<String>,
    /// Index in `tables` of the table being copied (`tables.len()` = all done).
    pub table: usize,
    /// Text of the key of the last row copied from `table`; `None`: none yet.
    pub last_key: Option<Vec<String>>,
    pub rows_done: u64,
    pub rows_estimate: u64,
    #[serde(default)]
    pub schemas: BTreeMap<String, String>,
    #[serde(default)]
    pub retained_wal: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StreamPos {
    pub slot: String,
    /// Every change of transactions committed before this LSN is durable.
    #[serde(with = "lsn_text")]
    pub lsn: u64,
    pub partial: Option<Partial>,
    #[serde(default)]
    pub schemas: BTreeMap<String, String>,
    #[serde(default)]
    pub retained_wal: Option<u64>,
}

/// A transaction committed to the buffer in pieces: its first `done` changes are
/// durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Partial {
    #[serde(with = "lsn_text")]
    pub commit_lsn: u64,
    pub done: u32,
}

impl PgPosition {
    pub(crate) fn decode(bytes: &[u8]) -> Result<PgPosition, String> {
        serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "the stored postgres position ({} bytes) is not valid: {e}",
                bytes.len()
            )
        })
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, SourceError> {
        serde_json::to_vec(self)
            .map_err(|e| SourceError::Other(format!("cannot encode the postgres position: {e}")))
    }

    pub(crate) fn slot(&self) -> &str {
        match self {
            PgPosition::Snapshot(s) => &s.slot,
            PgPosition::Streaming(s) => &s.slot,
        }
    }
}

pub(crate) fn gauges(bytes: &[u8]) -> crate::Gauges {
    let Ok(p) = PgPosition::decode(bytes) else {
        return Vec::new();
    };
    let mut g = Vec::new();
    let retained = match &p {
        PgPosition::Snapshot(s) => {
            g.push(("postgres_snapshot_rows_done", s.rows_done));
            g.push(("postgres_snapshot_rows_estimate", s.rows_estimate));
            s.retained_wal
        }
        PgPosition::Streaming(s) => {
            g.push(("postgres_durable_lsn", s.lsn));
            s.retained_wal
        }
    };
    if let Some(r) = retained {
        g.push((ferry_protocol::messages::RETAINED_WAL_GAUGE, r));
    }
    g
}

pub(crate) fn describe(bytes: &[u8]) -> String {
    let p = match PgPosition::decode(bytes) {
        Ok(p) => p,
        Err(_) => return format!("unreadable position ({} bytes)", bytes.len()),
    };
    let (mut s, retained) = match &p {
        PgPosition::Snapshot(s) => {
            let table = s.tables.get(s.table).map_or("(done)", String::as_str);
            let est = if s.rows_estimate > 0 {
                format!("/~{}", s.rows_estimate)
            } else {
                String::new()
            };
            (
                format!(
                    "snapshot {table} ({}/{}): {}{est} rows; streaming from {} after it",
                    (s.table + 1).min(s.tables.len()),
                    s.tables.len(),
                    s.rows_done,
                    fmt_lsn(s.consistent_lsn)
                ),
                s.retained_wal,
            )
        }
        PgPosition::Streaming(s) => {
            let mut d = format!("streaming from {}", fmt_lsn(s.lsn));
            if let Some(p) = s.partial {
                d.push_str(&format!(
                    " (transaction {} in progress: {} changes buffered)",
                    fmt_lsn(p.commit_lsn),
                    p.done
                ));
            }
            (d, s.retained_wal)
        }
    };
    if let Some(r) = retained {
        s.push_str(&format!("; slot retains {} of WAL", human_bytes(r)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trip() {
        assert_eq!(fmt_lsn(0x1_01A2_B3C8), "1/1A2B3C8");
        assert_eq!(parse_lsn("1/1A2B3C8"), Some(0x1_01A2_B3C8));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("zz"), None);
        assert_eq!(parse_lsn("1/"), None);
    }

    #[test]
    fn positions_round_trip_and_describe() {
        let snap = PgPosition::Snapshot(SnapshotPos {
            slot: "s".into(),
            consistent_lsn: 0x1A2B3C8,
            view_lsn: 0x1A2B3C8,
            tables: vec!["public.person".into(), "public.household".into()],
            table: 0,
            last_key: Some(vec!["12000".into()]),
            rows_done: 12000,
            rows_estimate: 50000,
            schemas: BTreeMap::new(),
            retained_wal: Some(3 << 20),
        });
        let b = snap.encode().unwrap();
        assert_eq!(PgPosition::decode(&b).unwrap(), snap);
        assert_eq!(
            describe(&b),
            "snapshot public.person (1/2): 12000/~50000 rows; streaming from 0/1A2B3C8 after it; slot retains 3.0 MiB of WAL"
        );
        let st = PgPosition::Streaming(StreamPos {
            slot: "s".into(),
            lsn: 0x1A2B3C8,
            partial: Some(Partial {
                commit_lsn: 0x1A2C000,
                done: 20000,
            }),
            schemas: BTreeMap::new(),
            retained_wal: None,
        });
        let b = st.encode().unwrap();
        assert!(String::from_utf8_lossy(&b).contains(r#""lsn":"0/1A2B3C8""#));
        assert_eq!(PgPosition::decode(&b).unwrap(), st);
        assert_eq!(
            describe(&b),
            "streaming from 0/1A2B3C8 (transaction 0/1A2C000 in progress: 20000 changes buffered)"
        );
        assert_eq!(describe(b"{}"), "unreadable position (2 bytes)");
    }
}
