//! The directory source's committed position (format in the parent module doc).

use serde::{Deserialize, Serialize};

use crate::SourceError;

/// Identity of one file as taken: a later stat must match all of it for the file to
/// count as the same, unchanged file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileEntry {
    pub file_id: String,
    pub name: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

/// The file being sent: bytes `[0, offset)` are durable as chunks of `file_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InProgress {
    #[serde(flatten)]
    pub file: FileEntry,
    pub offset: u64,
    /// Seq of the chunk that ends at `offset`, predicted when it was committed (see
    /// the parent module doc). `None` at offset 0 and in positions written before
    /// seqs were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// A file whose last chunk is durable, waiting for the exchange's ack of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sent {
    #[serde(flatten)]
    pub file: FileEntry,
    /// Seq of its last chunk (the one carrying `FileEnd`). Always written now;
    /// `None` only in positions written before seqs were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Position {
    #[serde(default)]
    pub current: Option<InProgress>,
    #[serde(default)]
    pub awaiting: Vec<Sent>,
}

impl Position {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Position, String> {
        serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "the stored directory position ({} bytes) is not valid: {e}",
                bytes.len()
            )
        })
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, SourceError> {
        serde_json::to_vec(self)
            .map_err(|e| SourceError::Other(format!("cannot encode the directory position: {e}")))
    }
}

pub(crate) fn describe(bytes: &[u8]) -> String {
    let Ok(p) = Position::decode(bytes) else {
        return format!("unreadable position ({} bytes)", bytes.len());
    };
    let n = p.awaiting.len();
    let waiting = match n {
        0 => "0 awaiting ack".to_string(),
        1 => "1 file awaiting ack".to_string(),
        _ => format!("{n} files awaiting ack"),
    };
    match p.current {
        Some(c) => format!(
            "sending {} at {}/{} (file {}); {waiting}",
            c.file.name, c.offset, c.file.size, c.file.file_id
        ),
        None => format!("idle; {waiting}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> FileEntry {
        FileEntry {
            file_id: "1a2b3c4d5e6f7081".into(),
            name: name.into(),
            dev: 2049,
            ino: 131,
            size: 10_485_760,
            mtime_ns: 1_767_225_600_123_456_789,
        }
    }

    fn sent(name: &str, seq: u64) -> Sent {
        Sent {
            file: entry(name),
            seq: Some(seq),
        }
    }

    #[test]
    fn round_trip_and_describe() {
        let p = Position {
            current: Some(InProgress {
                file: entry("report.xml"),
                offset: 3_145_728,
                seq: Some(41),
            }),
            awaiting: vec![sent("a", 7), sent("b", 9)],
        };
        let bytes = p.encode().unwrap();
        assert_eq!(Position::decode(&bytes), Ok(p));
        assert_eq!(
            describe(&bytes),
            "sending report.xml at 3145728/10485760 (file 1a2b3c4d5e6f7081); 2 files awaiting ack"
        );
        assert_eq!(
            describe(&Position::default().encode().unwrap()),
            "idle; 0 awaiting ack"
        );
        assert_eq!(describe(b"\xffnot json"), "unreadable position (9 bytes)");
    }

    #[test]
    fn offsets_beyond_4_gib_survive() {
        let mut e = entry("big.bin");
        e.size = 6 << 30;
        let p = Position {
            current: Some(InProgress {
                file: e,
                offset: (5 << 30) + 17,
                seq: Some(1 << 40),
            }),
            awaiting: vec![],
        };
        let back = Position::decode(&p.encode().unwrap()).map(|p| p.current.map(|c| c.offset));
        assert_eq!(back, Ok(Some((5 << 30) + 17)));
    }

    /// Positions stored by versions that did not record seqs still load; their seqs
    /// are simply unknown.
    #[test]
    fn positions_without_seqs_still_load() {
        let old = br#"{"current":{"file_id":"1a2b3c4d5e6f7081","name":"report.xml","dev":2049,"ino":131,"size":10485760,"mtime_ns":1767225600123456789,"offset":3145728},"awaiting":[{"file_id":"1a2b3c4d5e6f7081","name":"a","dev":2049,"ino":131,"size":10485760,"mtime_ns":1767225600123456789}]}"#;
        let p = Position::decode(old).unwrap();
        assert_eq!(
            p.current.as_ref().map(|c| (c.offset, c.seq)),
            Some((3_145_728, None))
        );
        assert_eq!(
            p.awaiting,
            vec![Sent {
                file: entry("a"),
                seq: None
            }]
        );
        // And what is written now has the seqs where an old version finds its fields.
        let now = Position {
            current: None,
            awaiting: vec![sent("a", 7)],
        };
        let v: serde_json::Value = serde_json::from_slice(&now.encode().unwrap()).unwrap();
        assert_eq!(v["awaiting"][0]["name"], "a");
        assert_eq!(v["awaiting"][0]["seq"], 7);
    }
}
