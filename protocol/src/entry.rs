//! A batch at rest: the entry format of the agent's buffer and the exchange's store.
//!
//! ```text
//! +--------+-------------+-----------+------------+--------------+----------+------------+-------------+
//! | ver u8 | crc32c u32  | first u64 | count u32  | compress u8  | raw u32  | stamp u64  | payload ... |
//! +--------+-------------+-----------+------------+--------------+----------+------------+-------------+
//!            crc32c covers every byte after itself (first .. end of payload); integers big-endian.
//! ```
//! The payload is exactly a `Batch.payload`: batches are stored as they travel,
//! compressed once. `stamp` is when this end stored it (Unix ms). Decoding tells
//! intact entries from damaged ones ([`Decoded`]), so a salvage can keep the former.

use crate::batch::EncodedRecords;
use crate::messages::{Batch, Compression};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + 8 + 4 + 1 + 4 + 8;

/// A batch read back from the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub first_seq: u64,
    pub record_count: u32,
    pub compression: Compression,
    pub raw_len: u32,
    pub stamp_unix_ms: u64,
    pub payload: Vec<u8>,
}

impl StoredBatch {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + u64::from(self.record_count) - 1
    }

    pub fn into_batch(self, stream: String) -> Batch {
        EncodedRecords {
            record_count: self.record_count,
            compression: self.compression,
            raw_len: self.raw_len,
            payload: self.payload,
        }
        .into_batch(stream, self.first_seq)
    }
}

/// What decoding an entry found: intact data, damage the checksum caught, or a
/// checksum-valid entry whose contents make no sense (a bug or a format change).
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Valid(StoredBatch),
    Corrupted { reason: String },
    FailedDeserialization { reason: String },
}

pub fn encode(first_seq: u64, rec: &EncodedRecords, stamp_unix_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + rec.payload.len());
    out.push(VERSION);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&first_seq.to_be_bytes());
    out.extend_from_slice(&rec.record_count.to_be_bytes());
    out.push(rec.compression as u8);
    out.extend_from_slice(&rec.raw_len.to_be_bytes());
    out.extend_from_slice(&stamp_unix_ms.to_be_bytes());
    out.extend_from_slice(&rec.payload);
    let crc = crc32c::crc32c(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_be_bytes());
    out
}

fn be<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// Checks an entry (checksum and header) without copying its payload; on success
/// the result holds an empty payload.
pub fn verify(bytes: &[u8]) -> Decoded {
    if bytes.len() < HEADER {
        return Decoded::Corrupted {
            reason: format!("entry of {} bytes is shorter than its header", bytes.len()),
        };
    }
    if bytes[0] != VERSION {
        return Decoded::FailedDeserialization {
            reason: format!("unknown entry version {}", bytes[0]),
        };
    }
    let crc = u32::from_be_bytes(be(bytes, 1));
    let actual = crc32c::crc32c(&bytes[5..]);
    if crc != actual {
        return Decoded::Corrupted {
            reason: format!("checksum mismatch (stored {crc:08x}, computed {actual:08x})"),
        };
    }
    let first_seq = u64::from_be_bytes(be(bytes, 5));
    let record_count = u32::from_be_bytes(be(bytes, 13));
    let compression = match bytes[17] {
        0 => Compression::None,
        1 => Compression::Zstd,
        c => {
            return Decoded::FailedDeserialization {
                reason: format!("unknown compression {c}"),
            }
        }
    };
    let raw_len = u32::from_be_bytes(be(bytes, 18));
    let stamp_unix_ms = u64::from_be_bytes(be(bytes, 22));
    if first_seq == 0
        || record_count == 0
        || first_seq.checked_add(u64::from(record_count)).is_none()
    {
        return Decoded::FailedDeserialization {
            reason: format!("entry claims first seq {first_seq} and {record_count} records"),
        };
    }
    Decoded::Valid(StoredBatch {
        first_seq,
        record_count,
        compression,
        raw_len,
        stamp_unix_ms,
        payload: Vec::new(),
    })
}

/// Checks and decodes an entry.
pub fn decode(bytes: &[u8]) -> Decoded {
    match verify(bytes) {
        Decoded::Valid(mut b) => {
            b.payload = bytes[HEADER..].to_vec();
            Decoded::Valid(b)
        }
        other => other,
    }
}

/// The seqs an entry covers, read from its header without checking the checksum:
/// for entries this process already verified (at open or when it wrote them).
pub fn seq_range(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < HEADER {
        return None;
    }
    let first = u64::from_be_bytes(be(bytes, 5));
    let count = u32::from_be_bytes(be(bytes, 13));
    (count > 0).then(|| (first, first + u64::from(count) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EncodedRecords {
        EncodedRecords {
            record_count: 3,
            compression: Compression::Zstd,
            raw_len: 10,
            payload: vec![1, 2, 3, 4, 5],
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(42, &sample(), 7);
        match decode(&bytes) {
            Decoded::Valid(b) => {
                assert_eq!(b.first_seq, 42);
                assert_eq!(b.last_seq(), 44);
                assert_eq!(b.payload, vec![1, 2, 3, 4, 5]);
                assert_eq!(b.stamp_unix_ms, 7);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = encode(42, &sample(), 7);
        for i in 1..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    !matches!(decode(&b), Decoded::Valid(_)),
                    "flip at byte {i} bit {bit} went unnoticed"
                );
            }
        }
        assert!(matches!(decode(&bytes[..10]), Decoded::Corrupted { .. }));
    }
}
