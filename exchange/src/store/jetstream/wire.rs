//! Record messages: their headers, how a batch is cut to fit the server's
//! `max_payload`, and how a reader puts a record cut into parts back together.
//!
//! ```text
//! header                    value
//! Ferry-Kind                batch | part | lost
//! Ferry-First-Seq           first seq the message stands for
//! Ferry-Last-Seq            last seq (a part: its record's seq, like First)
//! Ferry-Stored              when the exchange stored it, Unix ms
//! Ferry-Part                part: "I/N", 1-based
//! Ferry-Part-Start          part 2..N: stream sequence of part 1
//! Ferry-Files               "1" when the records hold file chunks or aborts
//! ```
//! A `batch` payload is a batch entry ([`ferry_protocol::entry`]: checksummed,
//! zstd-compressed `RecordList`) of seqs First..=Last; a `part` payload is a
//! slice of the entry of one record too large for one message; a `lost`
//! payload is the [`Gap`] (JSON) the agent declared.
//!
//! The next seq a subject expects follows from its last message alone: Last + 1,
//! except after a part that is not its record's last (a writer stopped half way
//! through a record): that record is not stored and is next. Its stray parts stay
//! in the log; a reader drops a record's parts when part 1 of it starts again or
//! another message follows.

use async_nats::HeaderMap;
use ferry_protocol::batch::{check_batch, decode_batch, encode_records, EncodedRecords};
use ferry_protocol::entry::{self, Decoded, StoredBatch};
use ferry_protocol::messages::{record::Body, Batch, Compression, Record, RecordList};
use prost::Message as _;

use crate::store::{Gap, StoreError};

pub(super) const KIND: &str = "Ferry-Kind";
pub(super) const FIRST: &str = "Ferry-First-Seq";
pub(super) const LAST: &str = "Ferry-Last-Seq";
pub(super) const STORED: &str = "Ferry-Stored";
pub(super) const PART: &str = "Ferry-Part";
pub(super) const PART_START: &str = "Ferry-Part-Start";
pub(super) const FILES: &str = "Ferry-Files";
pub(super) const EXPECTED_LAST: &str = "Nats-Expected-Last-Subject-Sequence";

/// Room left in each message for its headers.
pub(super) const HEADER_ROOM: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Batch,
    Part,
    Lost,
}

/// What a record message's headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    pub kind: Kind,
    pub first: u64,
    pub last: u64,
    pub stored_unix_ms: u64,
    /// Part `index` of `count` (1-based), for [`Kind::Part`].
    pub part: (u32, u32),
    /// Stream sequence of part 1, on parts after it (0 otherwise).
    pub part_start: u64,
    pub files: bool,
}

impl Head {
    /// The seq the subject expects after this message.
    pub fn next(&self) -> u64 {
        match self.kind {
            Kind::Part if self.part.0 < self.part.1 => self.first,
            _ => self.last + 1,
        }
    }

    /// Whether this message completes what it stands for (a batch, a loss, a
    /// record's last part).
    pub fn completes(&self) -> bool {
        self.kind != Kind::Part || self.part.0 == self.part.1
    }

    pub fn headers(&self, expected_last_subject_seq: u64) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            EXPECTED_LAST,
            expected_last_subject_seq.to_string().as_str(),
        );
        h.insert(
            KIND,
            match self.kind {
                Kind::Batch => "batch",
                Kind::Part => "part",
                Kind::Lost => "lost",
            },
        );
        h.insert(FIRST, self.first.to_string().as_str());
        h.insert(LAST, self.last.to_string().as_str());
        h.insert(STORED, self.stored_unix_ms.to_string().as_str());
        if self.kind == Kind::Part {
            h.insert(PART, format!("{}/{}", self.part.0, self.part.1).as_str());
            if self.part.0 > 1 {
                h.insert(PART_START, self.part_start.to_string().as_str());
            }
        }
        if self.files {
            h.insert(FILES, "1");
        }
        h
    }

    pub fn parse(h: &HeaderMap) -> Result<Head, String> {
        let text = |k: &str| h.get(k).map(|v| v.as_str().to_string());
        let num = |k: &str| -> Result<u64, String> {
            let t = text(k).ok_or_else(|| format!("no {k} header"))?;
            t.parse().map_err(|_| format!("{k} {t:?} is not a number"))
        };
        let kind = match text(KIND).as_deref() {
            Some("batch") => Kind::Batch,
            Some("part") => Kind::Part,
            Some("lost") => Kind::Lost,
            other => return Err(format!("{KIND} is {other:?}")),
        };
        let first = num(FIRST)?;
        let last = num(LAST)?;
        if first == 0 || last < first {
            return Err(format!("seqs {first}..={last}"));
        }
        let mut head = Head {
            kind,
            first,
            last,
            stored_unix_ms: num(STORED).unwrap_or(0),
            part: (1, 1),
            part_start: 0,
            files: text(FILES).as_deref() == Some("1"),
        };
        if kind == Kind::Part {
            let t = text(PART).ok_or_else(|| format!("a part without {PART}"))?;
            let (i, n) = t
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)))
                .ok_or_else(|| format!("{PART} {t:?}"))?;
            if i == 0 || i > n || first != last {
                return Err(format!("part {t} of seqs {first}..={last}"));
            }
            head.part = (i, n);
            if i > 1 {
                head.part_start = num(PART_START)?;
            }
        }
        Ok(head)
    }
}

/// One message read back from the record log.
#[derive(Debug)]
pub(super) struct Stored {
    /// Its stream sequence.
    pub seq: u64,
    pub head: Head,
    pub payload: Vec<u8>,
}

/// One message to publish.
pub(super) struct Piece {
    pub head: Head,
    pub payload: Vec<u8>,
    /// The records this piece completes (chunk data included), first at
    /// `head.first`, when they hold file records: what the file bookkeeping needs.
    pub records: Option<Vec<Record>>,
    /// The loss a `lost` piece records.
    pub gap: Option<Gap>,
}

/// Whether a file id can name a file (as the embedded store requires).
pub(super) fn valid_file_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The checks the embedded store makes while writing file chunks, made before
/// anything is published: a refused batch leaves no trace.
fn check_file_records(first: u64, records: &[Record]) -> Result<(), StoreError> {
    for (i, r) in records.iter().enumerate() {
        let seq = first + i as u64;
        match &r.body {
            Some(Body::FileChunk(c)) => {
                if !valid_file_id(&c.file_id) || c.path.is_empty() {
                    return Err(StoreError::Invalid(format!(
                        "seq {seq}: file chunk with file id {:?} and path {:?}",
                        c.file_id, c.path
                    )));
                }
                let end_off = c.offset + c.data.len() as u64;
                if let Some(end) = &c.end {
                    if end.size != end_off {
                        return Err(StoreError::Invalid(format!(
                            "seq {seq}: file {:?} declares {} bytes but its last chunk ends at byte {end_off}",
                            c.path, end.size
                        )));
                    }
                }
            }
            Some(Body::FileAbort(a)) if !valid_file_id(&a.file_id) => {
                return Err(StoreError::Invalid(format!(
                    "seq {seq}: file abort with file id {:?}",
                    a.file_id
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The messages that store `b` from its record `skip` on, each at most `limit`
/// bytes of payload. A batch that fits and needs no decoding travels as it
/// arrived; otherwise its records are packed into batches that fit, and a record
/// that fits in none alone is cut into parts.
pub(super) fn batch_pieces(
    b: &Batch,
    skip: u32,
    stamp: u64,
    limit: usize,
) -> Result<Vec<Piece>, StoreError> {
    let invalid = |e: ferry_protocol::batch::BatchError| {
        StoreError::Invalid(format!("stream {} seq {}: {e}", b.stream, b.first_seq))
    };
    let has_files = check_batch(b).map_err(invalid)?.has_files;
    let first = b.first_seq + u64::from(skip);
    if skip == 0 && !has_files {
        let encoded = EncodedRecords {
            record_count: b.record_count,
            compression: Compression::try_from(b.compression).unwrap_or(Compression::None),
            raw_len: b.raw_len,
            payload: b.payload.clone(),
        };
        let e = entry::encode(first, &encoded, stamp);
        if e.len() <= limit {
            return Ok(vec![Piece {
                head: batch_head(first, first + u64::from(b.record_count) - 1, stamp, false),
                payload: e,
                records: None,
                gap: None,
            }]);
        }
    }
    let records: Vec<Record> = decode_batch(b)
        .map_err(invalid)?
        .records
        .into_iter()
        .skip(skip as usize)
        .collect();
    if has_files {
        check_file_records(first, &records)?;
    }
    // Pack by encoded size scaled by how well the batch compressed; a group that
    // still comes out too large is halved.
    let ratio = (b.payload.len() as f64 / f64::from(b.raw_len.max(1))).clamp(0.01, 1.1);
    let target = limit as f64 * 0.8;
    let mut pieces = Vec::new();
    let mut group: Vec<Record> = Vec::new();
    let mut group_first = first;
    let mut estimate = 0.0;
    for r in records {
        let size = (r.encoded_len() + 8) as f64 * ratio;
        if !group.is_empty() && estimate + size > target {
            let n = group.len() as u64;
            pack(
                group_first,
                std::mem::take(&mut group),
                stamp,
                limit,
                has_files,
                &mut pieces,
            )?;
            group_first += n;
            estimate = 0.0;
        }
        estimate += size;
        group.push(r);
    }
    if !group.is_empty() {
        pack(group_first, group, stamp, limit, has_files, &mut pieces)?;
    }
    Ok(pieces)
}

fn batch_head(first: u64, last: u64, stamp: u64, files: bool) -> Head {
    Head {
        kind: Kind::Batch,
        first,
        last,
        stored_unix_ms: stamp,
        part: (1, 1),
        part_start: 0,
        files,
    }
}

fn pack(
    first: u64,
    records: Vec<Record>,
    stamp: u64,
    limit: usize,
    has_files: bool,
    out: &mut Vec<Piece>,
) -> Result<(), StoreError> {
    let list = RecordList { records };
    let encoded = encode_records(&list).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let e = entry::encode(first, &encoded, stamp);
    let mut records = list.records;
    let n = records.len();
    if e.len() <= limit {
        out.push(Piece {
            head: batch_head(first, first + n as u64 - 1, stamp, has_files),
            payload: e,
            records: has_files.then_some(records),
            gap: None,
        });
        return Ok(());
    }
    if n > 1 {
        let rest = records.split_off(n / 2);
        pack(first, records, stamp, limit, has_files, out)?;
        return pack(first + (n / 2) as u64, rest, stamp, limit, has_files, out);
    }
    // One record larger than a message: its entry travels in parts.
    let count = e.len().div_ceil(limit);
    let count32 =
        u32::try_from(count).map_err(|_| StoreError::Invalid("record too large".into()))?;
    let mut records = has_files.then_some(records);
    for (i, slice) in e.chunks(limit).enumerate() {
        let index = i as u32 + 1;
        out.push(Piece {
            head: Head {
                kind: Kind::Part,
                first,
                last: first,
                stored_unix_ms: stamp,
                part: (index, count32),
                part_start: 0,
                files: has_files,
            },
            payload: slice.to_vec(),
            records: if index == count32 {
                records.take()
            } else {
                None
            },
            gap: None,
        });
    }
    Ok(())
}

/// The message recording a declared loss.
pub(super) fn lost_piece(gap: &Gap) -> Result<Piece, StoreError> {
    Ok(Piece {
        head: Head {
            kind: Kind::Lost,
            first: gap.from,
            last: gap.to,
            stored_unix_ms: gap.detected_unix_ms,
            part: (1, 1),
            part_start: 0,
            files: false,
        },
        payload: serde_json::to_vec(gap).map_err(|e| StoreError::Invalid(e.to_string()))?,
        records: None,
        gap: Some(gap.clone()),
    })
}

/// Decodes a batch entry read back, checking it stands for the seqs its headers say.
pub(super) fn decode_entry(head: &Head, bytes: &[u8], at: u64) -> Result<StoredBatch, StoreError> {
    let stored = match entry::decode(bytes) {
        Decoded::Valid(b) => b,
        Decoded::Corrupted { reason } | Decoded::FailedDeserialization { reason } => {
            return Err(StoreError::Damaged(format!(
                "record message at stream sequence {at}: {reason}"
            )))
        }
    };
    if stored.first_seq != head.first || stored.last_seq() != head.last {
        return Err(StoreError::Damaged(format!(
            "record message at stream sequence {at}: its entry holds seqs {}..={}, its headers say {}..={}",
            stored.first_seq,
            stored.last_seq(),
            head.first,
            head.last
        )));
    }
    Ok(stored)
}

/// The records of a decoded entry.
pub(super) fn entry_records(stored: &StoredBatch, at: u64) -> Result<Vec<Record>, StoreError> {
    ferry_protocol::batch::decode_records(
        stored.compression as i32,
        stored.raw_len,
        stored.record_count,
        &stored.payload,
    )
    .map(|l| l.records)
    .map_err(|e| StoreError::Damaged(format!("record message at stream sequence {at}: {e}")))
}

/// What a run of messages of one subject holds, in order: whole entries, with
/// a record cut into parts put back together.
#[derive(Default)]
pub(super) struct Assembler {
    /// The record being put together: its seq, the next part expected, the
    /// number of parts and the bytes so far.
    partial: Option<(u64, u32, u32, Vec<u8>)>,
}

/// A complete thing read back.
pub(super) enum Whole {
    Entry(StoredBatch),
    Lost(Gap),
}

impl Assembler {
    pub fn feed(&mut self, m: Stored) -> Result<Option<Whole>, StoreError> {
        let h = &m.head;
        match h.kind {
            Kind::Batch => {
                self.partial = None;
                Ok(Some(Whole::Entry(decode_entry(h, &m.payload, m.seq)?)))
            }
            Kind::Lost => {
                self.partial = None;
                let gap = serde_json::from_slice(&m.payload).map_err(|e| {
                    StoreError::Damaged(format!("loss message at stream sequence {}: {e}", m.seq))
                })?;
                Ok(Some(Whole::Lost(gap)))
            }
            Kind::Part => {
                let (i, n) = h.part;
                let mut bytes = match self.partial.take() {
                    _ if i == 1 => Vec::new(),
                    Some((seq, next, count, bytes))
                        if seq == h.first && next == i && count == n =>
                    {
                        bytes
                    }
                    // A part whose predecessors were not read (the read began
                    // inside the record) or belong to an abandoned attempt.
                    _ => return Ok(None),
                };
                bytes.extend_from_slice(&m.payload);
                if i < n {
                    self.partial = Some((h.first, i + 1, n, bytes));
                    return Ok(None);
                }
                Ok(Some(Whole::Entry(decode_entry(h, &bytes, m.seq)?)))
            }
        }
    }
}
