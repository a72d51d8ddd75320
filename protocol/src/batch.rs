//! A batch's records as they are stored in the agent's buffer, sent, and stored at
//! the exchange: a protobuf [`RecordList`], compressed with zstd.
//!
//! Decoding is bounded: `raw_len` is checked against [`MAX_RAW_BATCH`] before
//! decompressing, and the decompressor may not produce more than `raw_len` bytes,
//! so a hostile payload cannot balloon in memory.

use prost::Message;

use crate::messages::{Batch, Compression, RecordList};

/// Largest uncompressed batch: 8 MiB.
pub const MAX_RAW_BATCH: usize = 8 * 1024 * 1024;

/// zstd level: level 1 is the speed/ratio sweet spot measured for this pipeline.
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch of {len} uncompressed bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("unknown compression {0}")]
    UnknownCompression(i32),
    #[error("batch payload does not decompress: {0}")]
    Decompress(String),
    #[error("batch payload is {actual} bytes uncompressed, header says {declared}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("batch payload is not a record list: {0}")]
    Decode(String),
    #[error("batch header says {declared} records, payload holds {actual}")]
    CountMismatch { declared: usize, actual: usize },
    #[error("batch holds no records")]
    Empty,
}

/// The encoded payload of a batch, without its stream and seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedRecords {
    pub record_count: u32,
    pub compression: Compression,
    pub raw_len: u32,
    pub payload: Vec<u8>,
}

impl EncodedRecords {
    pub fn into_batch(self, stream: String, first_seq: u64) -> Batch {
        Batch {
            stream,
            first_seq,
            record_count: self.record_count,
            compression: self.compression as i32,
            payload: self.payload,
            raw_len: self.raw_len,
        }
    }
}

/// Encodes and compresses records.
pub fn encode_records(list: &RecordList) -> Result<EncodedRecords, BatchError> {
    if list.records.is_empty() {
        return Err(BatchError::Empty);
    }
    let raw = list.encode_to_vec();
    if raw.len() > MAX_RAW_BATCH {
        return Err(BatchError::TooLarge {
            len: raw.len(),
            limit: MAX_RAW_BATCH,
        });
    }
    let payload = zstd::bulk::compress(&raw, ZSTD_LEVEL)
        .map_err(|e| BatchError::Decompress(format!("compressing: {e}")))?;
    Ok(EncodedRecords {
        record_count: list.records.len() as u32,
        compression: Compression::Zstd,
        raw_len: raw.len() as u32,
        payload,
    })
}

/// Decompresses and decodes a batch payload, checking every declared size.
pub fn decode_records(
    compression: i32,
    raw_len: u32,
    record_count: u32,
    payload: &[u8],
) -> Result<RecordList, BatchError> {
    let raw_len = raw_len as usize;
    if raw_len > MAX_RAW_BATCH {
        return Err(BatchError::TooLarge {
            len: raw_len,
            limit: MAX_RAW_BATCH,
        });
    }
    let raw = match Compression::try_from(compression) {
        Ok(Compression::None) => payload.to_vec(),
        Ok(Compression::Zstd) => zstd::bulk::decompress(payload, raw_len)
            .map_err(|e| BatchError::Decompress(e.to_string()))?,
        Err(_) => return Err(BatchError::UnknownCompression(compression)),
    };
    if raw.len() != raw_len {
        return Err(BatchError::LengthMismatch {
            declared: raw_len,
            actual: raw.len(),
        });
    }
    let list = RecordList::decode(raw.as_slice()).map_err(|e| BatchError::Decode(e.to_string()))?;
    if list.records.len() != record_count as usize {
        return Err(BatchError::CountMismatch {
            declared: record_count as usize,
            actual: list.records.len(),
        });
    }
    if list.records.is_empty() {
        return Err(BatchError::Empty);
    }
    Ok(list)
}

/// Decodes a received [`Batch`].
pub fn decode_batch(batch: &Batch) -> Result<RecordList, BatchError> {
    decode_records(
        batch.compression,
        batch.raw_len,
        batch.record_count,
        &batch.payload,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{record::Body, Record};
    use proptest::prelude::*;

    fn lines(n: usize) -> RecordList {
        RecordList {
            records: (0..n)
                .map(|i| Record {
                    time_unix_ms: i as u64,
                    position: format!("off={i}"),
                    body: Some(Body::Line(format!("line {i}").into_bytes())),
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let list = lines(1000);
        let enc = encode_records(&list).unwrap();
        assert!(enc.payload.len() < enc.raw_len as usize);
        let batch = enc.into_batch("s".into(), 7);
        assert_eq!(decode_batch(&batch).unwrap(), list);
    }

    #[test]
    fn lying_headers_are_errors() {
        let enc = encode_records(&lines(3)).unwrap();
        let mut b = enc.clone().into_batch("s".into(), 1);
        b.record_count = 4;
        assert!(matches!(
            decode_batch(&b),
            Err(BatchError::CountMismatch { .. })
        ));
        let mut b = enc.clone().into_batch("s".into(), 1);
        b.raw_len -= 1;
        assert!(decode_batch(&b).is_err());
        let mut b = enc.into_batch("s".into(), 1);
        b.raw_len = u32::MAX;
        assert!(matches!(decode_batch(&b), Err(BatchError::TooLarge { .. })));
    }

    #[test]
    fn empty_batches_are_refused() {
        assert_eq!(
            encode_records(&RecordList::default()),
            Err(BatchError::Empty)
        );
    }

    proptest! {
        #[test]
        fn garbage_payload_never_panics(
            compression in 0i32..3, raw_len in 0u32..100_000, count in 0u32..10,
            payload in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let _ = decode_records(compression, raw_len, count, &payload);
        }
    }
}
