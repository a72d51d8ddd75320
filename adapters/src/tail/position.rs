//! The tail source's committed position (format in the parent module doc).

use serde::{Deserialize, Serialize};

use crate::SourceError;

/// Longest prefix a fingerprint covers.
pub(crate) const FP_MAX: u64 = 256;

/// SHA-256 of a file's first `len` bytes: tells a file from another that reuses its
/// inode, and a file from its copy-truncated self.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub len: u64,
    pub hash: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TailPosition {
    pub dev: u64,
    pub ino: u64,
    /// Hex SHA-256 of the first `fp_len` bytes.
    pub fp: String,
    pub fp_len: u64,
    pub offset: u64,
    /// The file's name (relative to the folder of `path`) when the source opened
    /// it: names the file in the alarm if it is gone at the next start. Absent from
    /// positions written before rotated chains were followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The file's modification time (ns since the epoch) when its bytes up to
    /// `offset` were read. If the file is gone at the next start, the rotated
    /// copies at least this new are the ones still to read. Absent as `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<u64>,
}

impl TailPosition {
    pub(crate) fn new(
        dev: u64,
        ino: u64,
        fp: &Fingerprint,
        offset: u64,
        name: &str,
        mtime_ns: u64,
    ) -> Self {
        TailPosition {
            dev,
            ino,
            fp: hex::encode(fp.hash),
            fp_len: fp.len,
            offset,
            name: Some(name.to_string()),
            mtime_ns: Some(mtime_ns),
        }
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<(TailPosition, Fingerprint), String> {
        let bad = |e: String| {
            format!(
                "the stored tail position ({} bytes) is not valid: {e}",
                bytes.len()
            )
        };
        let p: TailPosition = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&p.fp, &mut hash).map_err(|e| bad(format!("fp: {e}")))?;
        if p.fp_len > FP_MAX {
            return Err(bad(format!("fp_len {} exceeds {FP_MAX}", p.fp_len)));
        }
        let fp = Fingerprint {
            len: p.fp_len,
            hash,
        };
        Ok((p, fp))
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, SourceError> {
        serde_json::to_vec(self)
            .map_err(|e| SourceError::Other(format!("cannot encode the tail position: {e}")))
    }
}

pub(crate) fn describe(bytes: &[u8]) -> String {
    match TailPosition::decode(bytes) {
        Ok((p, _)) => format!("ino={} off={}", p.ino, p.offset),
        Err(_) => format!("unreadable position ({} bytes)", bytes.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_describe() {
        let fp = Fingerprint {
            len: 256,
            hash: [7; 32],
        };
        let p = TailPosition::new(
            2049,
            1315,
            &fp,
            5 << 30,
            "app.log.1",
            1_765_000_000_123_456_789,
        );
        let bytes = p.encode().unwrap();
        assert_eq!(TailPosition::decode(&bytes), Ok((p, fp)));
        assert_eq!(describe(&bytes), "ino=1315 off=5368709120");
        assert_eq!(describe(b"{}"), "unreadable position (2 bytes)");
        // Positions stored before `name` and `mtime_ns` existed still resume.
        let old = format!(
            r#"{{"dev":2049,"ino":1315,"fp":"{}","fp_len":256,"offset":7}}"#,
            hex::encode([7u8; 32])
        );
        let (p, got_fp) = TailPosition::decode(old.as_bytes()).unwrap();
        assert_eq!((p.offset, p.name, p.mtime_ns, got_fp), (7, None, None, fp));
        let short_fp = br#"{"dev":1,"ino":2,"fp":"abcd","fp_len":2,"offset":0}"#;
        assert!(TailPosition::decode(short_fp).is_err());
    }
}
