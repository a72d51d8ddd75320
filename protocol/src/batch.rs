//! A batch's records as they are stored in the agent's buffer, sent, and stored at
//! the exchange: a protobuf [`RecordList`], compressed with zstd.
//!
//! Decoding is bounded: `raw_len` is checked against [`MAX_RAW_BATCH`] before
//! decompressing, and the decompressor may not produce more than `raw_len` bytes,
//! so a hostile payload cannot balloon in memory.

use std::cell::RefCell;

use prost::Message;

use crate::check::{check_list, Checked};
use crate::messages::{Batch, Compression, RecordList};
use crate::record_buf::RecordBuf;

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
    compress(&list.encode_to_vec(), list.records.len())
}

/// Compresses records already encoded into a [`RecordBuf`].
pub fn encode_buf(buf: &RecordBuf) -> Result<EncodedRecords, BatchError> {
    compress(buf.as_bytes(), buf.count() as usize)
}

fn compress(raw: &[u8], count: usize) -> Result<EncodedRecords, BatchError> {
    if count == 0 {
        return Err(BatchError::Empty);
    }
    if raw.len() > MAX_RAW_BATCH {
        return Err(BatchError::TooLarge {
            len: raw.len(),
            limit: MAX_RAW_BATCH,
        });
    }
    let payload =
        zstd_compress(raw).map_err(|e| BatchError::Decompress(format!("compressing: {e}")))?;
    Ok(EncodedRecords {
        record_count: count as u32,
        compression: Compression::Zstd,
        raw_len: raw.len() as u32,
        payload,
    })
}

thread_local! {
    // One zstd context per thread, kept: a fresh one per batch is an allocation of
    // half a megabyte, cleared, for each batch.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn zstd_compress(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let z = match &mut *c {
            Some(z) => z,
            None => c.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        z.compress(raw)
    })
}

fn zstd_decompress(payload: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let z = match &mut *d {
            Some(z) => z,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        z.decompress(payload, raw_len)
    })
}

/// Decompresses a batch payload, checking the declared sizes.
fn decompress(compression: i32, raw_len: u32, payload: &[u8]) -> Result<Vec<u8>, BatchError> {
    let raw_len = raw_len as usize;
    if raw_len > MAX_RAW_BATCH {
        return Err(BatchError::TooLarge {
            len: raw_len,
            limit: MAX_RAW_BATCH,
        });
    }
    let raw = match Compression::try_from(compression) {
        Ok(Compression::None) => payload.to_vec(),
        Ok(Compression::Zstd) => {
            zstd_decompress(payload, raw_len).map_err(|e| BatchError::Decompress(e.to_string()))?
        }
        Err(_) => return Err(BatchError::UnknownCompression(compression)),
    };
    if raw.len() != raw_len {
        return Err(BatchError::LengthMismatch {
            declared: raw_len,
            actual: raw.len(),
        });
    }
    Ok(raw)
}

fn count_matches(declared: u32, actual: usize) -> Result<(), BatchError> {
    if actual != declared as usize {
        return Err(BatchError::CountMismatch {
            declared: declared as usize,
            actual,
        });
    }
    if actual == 0 {
        return Err(BatchError::Empty);
    }
    Ok(())
}

/// Decompresses and decodes a batch payload, checking every declared size.
pub fn decode_records(
    compression: i32,
    raw_len: u32,
    record_count: u32,
    payload: &[u8],
) -> Result<RecordList, BatchError> {
    let raw = decompress(compression, raw_len, payload)?;
    let list = RecordList::decode(raw.as_slice()).map_err(|e| BatchError::Decode(e.to_string()))?;
    count_matches(record_count, list.records.len())?;
    Ok(list)
}

/// Decompresses a received batch and checks it as [`decode_batch`] would, without
/// decoding its records (see [`crate::check`]).
pub fn check_batch(batch: &Batch) -> Result<Checked, BatchError> {
    let raw = decompress(batch.compression, batch.raw_len, &batch.payload)?;
    let c = check_list(&raw).map_err(BatchError::Decode)?;
    count_matches(batch.record_count, c.records)?;
    Ok(c)
}

/// Joins the payloads of consecutive batches of one stream into one payload:
/// the bytes of `RecordList`s concatenate into the `RecordList` of all their
/// records. Each part is `(compression, raw_len, record_count, payload)`.
pub fn join_payloads(parts: &[(i32, u32, u32, &[u8])]) -> Result<EncodedRecords, BatchError> {
    let total: usize = parts.iter().map(|p| p.1 as usize).sum();
    if total > MAX_RAW_BATCH {
        return Err(BatchError::TooLarge {
            len: total,
            limit: MAX_RAW_BATCH,
        });
    }
    let mut raw = Vec::with_capacity(total);
    let mut count = 0usize;
    for &(compression, raw_len, record_count, payload) in parts {
        raw.extend_from_slice(&decompress(compression, raw_len, payload)?);
        count += record_count as usize;
    }
    compress(&raw, count)
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
    fn joined_payloads_hold_every_record_in_order() {
        let (a, b) = (lines(3), lines(5));
        let (ea, eb) = (encode_records(&a).unwrap(), encode_records(&b).unwrap());
        let part = |e: &EncodedRecords| {
            (
                e.compression as i32,
                e.raw_len,
                e.record_count,
                e.payload.clone(),
            )
        };
        let (pa, pb) = (part(&ea), part(&eb));
        let joined =
            join_payloads(&[(pa.0, pa.1, pa.2, &pa.3[..]), (pb.0, pb.1, pb.2, &pb.3[..])]).unwrap();
        assert_eq!(joined.record_count, 8);
        let got = decode_batch(&joined.into_batch("s".into(), 1)).unwrap();
        let want: Vec<_> = a.records.into_iter().chain(b.records).collect();
        assert_eq!(got.records, want);
        // A damaged part is an error, not a shorter batch.
        assert!(join_payloads(&[(pa.0, pa.1, pa.2, &pa.3[..1])]).is_err());
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
