//! A received `Batch` with arbitrary header fields (compression, raw_len,
//! record_count) and an arbitrary payload (raw bytes, or a generated
//! `RecordList`, possibly damaged, compressed for real or not), into
//! `check::check_batch` and `batch::decode_batch`.
//!
//! The contract asserted (check.rs, batch.rs, messages.rs):
//! * neither panics;
//! * `check_batch` is never looser than prost: when it accepts, `decode_batch`
//!   succeeds with the same record count, which is the declared count (never 0),
//!   and `has_files` is set whenever a decoded record is a file record;
//! * the exchange stores row blocks on the check's word, so every `RowBlock` of a
//!   checked batch, as prost decodes it, is what `RowBlock`'s doc promises: its
//!   lines are `row_count` rows of one field per column (`copy_text::block_rows`
//!   succeeds and gives `row_count` rows);
//! * a failure before the records are looked at (limits, compression, lengths)
//!   is the same error from both;
//! * `check::check_list` alone is never looser than prost either;
//! * what prost encodes (well-formed row blocks) passes, with the exact file flag;
//! * a decoded batch re-encodes (`encode_records`) to one that decodes the same.
#![no_main]

use arbitrary::Arbitrary;
use ferry_protocol::batch::{
    check_batch, decode_batch, decode_records, encode_records, join_payloads, BatchError,
    MAX_RAW_BATCH,
};
use ferry_protocol::check::check_list;
use ferry_protocol::copy_text::{block_rows, check_block};
use ferry_protocol::messages::{
    column, record::Body, Batch, Column, Compression, FileAbort, FileChunk, FileEnd, Record,
    RecordList, RowBlock, RowChange, SchemaChange, SchemaColumn,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[derive(Arbitrary, Debug)]
enum Comp {
    /// `Compression::None`, the payload is the raw bytes.
    Plain,
    /// `Compression::Zstd`, the raw bytes compressed by the crate's own compressor.
    Zstd,
    /// `Compression::Zstd` over the raw bytes as they are (almost never a frame).
    ZstdAsIs,
    /// Any compression number, the payload as it is.
    Other(i32),
}

#[derive(Arbitrary, Debug)]
enum Len {
    Exact,
    Delta(i16),
    Any(u32),
}

impl Len {
    fn apply(&self, exact: u64) -> u32 {
        match *self {
            Len::Exact => exact as u32,
            Len::Delta(d) => (exact as i64 + i64::from(d)).clamp(0, i64::from(u32::MAX)) as u32,
            Len::Any(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Col {
    name: String,
    bytea: bool,
    key: bool,
}

#[derive(Arbitrary, Debug)]
enum BlockText {
    /// Rows of values (`None`: NULL), escaped as PostgreSQL's COPY TO writes them.
    Rows(Vec<Vec<Option<String>>>),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum ArbBody {
    Line(Vec<u8>),
    FileChunk {
        file_id: String,
        path: String,
        offset: u64,
        data: Vec<u8>,
        end: Option<(u64, Vec<u8>)>,
    },
    FileAbort {
        file_id: String,
        path: String,
        reason: String,
    },
    RowChange {
        table: String,
        op: i32,
        columns: Vec<(String, Option<String>)>,
        old_key: Vec<(String, Vec<u8>)>,
    },
    SchemaChange {
        table: String,
        columns: Vec<Col>,
    },
    RowBlock {
        columns: Vec<Col>,
        first_index: u64,
        /// `None`: the number of lines of the text.
        row_count: Option<u32>,
        text: BlockText,
    },
}

#[derive(Arbitrary, Debug)]
struct ArbRecord {
    time: u64,
    position: String,
    body: Option<ArbBody>,
    /// A second body in the same record (prost keeps the last one, merging two
    /// messages of the same kind).
    extra: Option<ArbBody>,
}

#[derive(Arbitrary, Debug)]
enum Damage {
    Set { at: u16, byte: u8 },
    Truncate { at: u16 },
    Insert { at: u16, bytes: Vec<u8> },
    Remove { at: u16, len: u8 },
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Raw(Vec<u8>),
    Structured {
        records: Vec<ArbRecord>,
        damage: Vec<Damage>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    compression: Comp,
    raw_len: Len,
    record_count: Len,
    payload: Payload,
}

fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{8}' => out.push_str("\\b"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            c => out.push(c),
        }
    }
}

fn schema_columns(cols: &[Col]) -> Vec<SchemaColumn> {
    cols.iter()
        .map(|c| SchemaColumn {
            name: c.name.clone(),
            type_name: if c.bytea { "bytea" } else { "text" }.into(),
            type_oid: if c.bytea { 17 } else { 25 },
            key: c.key,
        })
        .collect()
}

fn body(b: &ArbBody) -> Body {
    match b {
        ArbBody::Line(l) => Body::Line(l.clone()),
        ArbBody::FileChunk {
            file_id,
            path,
            offset,
            data,
            end,
        } => Body::FileChunk(FileChunk {
            file_id: file_id.clone(),
            path: path.clone(),
            offset: *offset,
            data: data.clone(),
            end: end.as_ref().map(|(size, sha256)| FileEnd {
                size: *size,
                sha256: sha256.clone(),
            }),
        }),
        ArbBody::FileAbort {
            file_id,
            path,
            reason,
        } => Body::FileAbort(FileAbort {
            file_id: file_id.clone(),
            path: path.clone(),
            reason: reason.clone(),
        }),
        ArbBody::RowChange {
            table,
            op,
            columns,
            old_key,
        } => Body::RowChange(RowChange {
            schema: "public".into(),
            table: table.clone(),
            op: *op,
            columns: columns
                .iter()
                .map(|(name, v)| Column {
                    name: name.clone(),
                    type_name: "text".into(),
                    type_oid: 25,
                    value: Some(match v {
                        Some(t) => column::Value::Text(t.clone()),
                        None => column::Value::Null(true),
                    }),
                })
                .collect(),
            old_key: old_key
                .iter()
                .map(|(name, b)| Column {
                    name: name.clone(),
                    type_name: "bytea".into(),
                    type_oid: 17,
                    value: Some(column::Value::Bytes(b.clone())),
                })
                .collect(),
            ..Default::default()
        }),
        ArbBody::SchemaChange { table, columns } => Body::SchemaChange(SchemaChange {
            schema: "public".into(),
            table: table.clone(),
            columns: schema_columns(columns),
            replica_identity: "default".into(),
            commit_lsn: 7,
        }),
        ArbBody::RowBlock {
            columns,
            first_index,
            row_count,
            text,
        } => {
            let copy_text = match text {
                BlockText::Raw(t) => t.clone(),
                BlockText::Rows(rows) => {
                    let mut t = String::new();
                    for row in rows {
                        for (i, v) in row.iter().enumerate() {
                            if i > 0 {
                                t.push('\t');
                            }
                            match v {
                                None => t.push_str("\\N"),
                                Some(v) => escape(v, &mut t),
                            }
                        }
                        t.push('\n');
                    }
                    t
                }
            };
            let lines = copy_text.bytes().filter(|&b| b == b'\n').count() as u32;
            Body::RowBlock(RowBlock {
                schema: "public".into(),
                table: "t".into(),
                columns: schema_columns(columns),
                commit_lsn: 9,
                first_index: *first_index,
                row_count: row_count.unwrap_or(lines),
                copy_text,
            })
        }
    }
}

fn is_file(r: &Record) -> bool {
    matches!(r.body, Some(Body::FileChunk(_) | Body::FileAbort(_)))
}

/// A `RowBlock` passes what the exchange holds it to.
fn block_ok(b: &RowBlock) -> bool {
    check_block(&b.copy_text, b.columns.len(), u64::from(b.row_count)).is_ok()
}

fn put_len_delimited(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// The raw `RecordList` bytes, and for undamaged input the list prost should read.
fn structured(records: &[ArbRecord], damage: &[Damage]) -> (Vec<u8>, Option<RecordList>) {
    let mut raw = Vec::new();
    let mut list = RecordList::default();
    let mut merged = false;
    for r in records {
        let rec = Record {
            time_unix_ms: r.time,
            position: r.position.clone(),
            body: r.body.as_ref().map(body),
        };
        let mut bytes = rec.encode_to_vec();
        if let Some(extra) = &r.extra {
            Record {
                time_unix_ms: 0,
                position: String::new(),
                body: Some(body(extra)),
            }
            .encode(&mut bytes)
            .expect("a Vec grows");
            merged = true;
        }
        put_len_delimited(1, &bytes, &mut raw);
        list.records.push(rec);
    }
    for d in damage {
        let n = raw.len();
        match d {
            Damage::Set { at, byte } if n > 0 => raw[usize::from(*at) % n] = *byte,
            Damage::Set { .. } => {}
            Damage::Truncate { at } => raw.truncate(usize::from(*at) % (n + 1)),
            Damage::Insert { at, bytes } => {
                let at = usize::from(*at) % (n + 1);
                raw.splice(at..at, bytes.iter().copied());
            }
            Damage::Remove { at, len } => {
                let at = usize::from(*at) % (n + 1);
                let end = (at + usize::from(*len)).min(n);
                raw.drain(at..end);
            }
        }
    }
    let pristine = damage.is_empty() && !merged;
    if pristine {
        assert_eq!(
            raw,
            list.encode_to_vec(),
            "the hand-framed list differs from prost's"
        );
    }
    (raw, pristine.then_some(list))
}

fuzz_target!(|input: Input| {
    let (raw, expected) = match &input.payload {
        Payload::Raw(bytes) => (bytes.clone(), None),
        Payload::Structured { records, damage } => structured(records, damage),
    };

    // The check on the bytes alone: never looser than prost.
    let prost_list = RecordList::decode(raw.as_slice());
    if let Ok(c) = check_list(&raw) {
        let l = prost_list
            .as_ref()
            .unwrap_or_else(|e| panic!("check_list accepted {c:?}, prost refuses: {e}"));
        assert_eq!(l.records.len(), c.records);
        assert!(c.has_files || !l.records.iter().any(is_file));
    }
    let exact_count = prost_list.as_ref().map_or(0, |l| l.records.len()) as u64;

    let (compression, payload, exact_raw_len) = match input.compression {
        Comp::Plain => (Compression::None as i32, raw.clone(), raw.len()),
        Comp::ZstdAsIs => (Compression::Zstd as i32, raw.clone(), raw.len()),
        Comp::Other(c) => (c, raw.clone(), raw.len()),
        Comp::Zstd => {
            // The crate's own compressor, reached through `join_payloads` of one
            // uncompressed part.
            let e = join_payloads(&[(Compression::None as i32, raw.len() as u32, 1, &raw)])
                .expect("one uncompressed part under the limit joins");
            assert_eq!(e.raw_len as usize, raw.len());
            assert_eq!(e.compression, Compression::Zstd);
            (Compression::Zstd as i32, e.payload, raw.len())
        }
    };
    assert!(exact_raw_len <= MAX_RAW_BATCH);
    let batch = Batch {
        stream: "s".into(),
        first_seq: 1,
        record_count: input.record_count.apply(exact_count),
        compression,
        payload,
        raw_len: input.raw_len.apply(exact_raw_len as u64),
    };

    let checked = check_batch(&batch);
    let decoded = decode_batch(&batch);
    assert_eq!(
        decoded,
        decode_records(
            batch.compression,
            batch.raw_len,
            batch.record_count,
            &batch.payload
        )
    );

    match &checked {
        Ok(c) => {
            let list = decoded.as_ref().unwrap_or_else(|e| {
                panic!("check_batch accepted {c:?} but decode_batch refuses: {e}")
            });
            assert_eq!(list.records.len(), c.records, "record counts differ");
            assert_eq!(c.records, batch.record_count as usize);
            assert!(c.records > 0, "an empty batch was accepted");
            assert!(
                c.has_files || !list.records.iter().any(is_file),
                "a file record the check did not see"
            );
            for (i, r) in list.records.iter().enumerate() {
                if let Some(Body::RowBlock(b)) = &r.body {
                    match block_rows(b) {
                        Ok(rows) => assert_eq!(rows.len(), b.row_count as usize),
                        Err(e) => panic!(
                            "check_batch accepted the batch, but record {i}'s RowBlock as \
                             prost decodes it ({} columns, row_count {}, text {:?}) is refused \
                             by block_rows: {e}",
                            b.columns.len(),
                            b.row_count,
                            b.copy_text
                        ),
                    }
                }
            }
            // What was accepted re-encodes to a batch that decodes the same.
            let again = encode_records(list).expect("a checked list re-encodes");
            let again = again.into_batch("s".into(), 1);
            assert_eq!(decode_batch(&again).as_ref(), Ok(list));
        }
        Err(
            e @ (BatchError::TooLarge { .. }
            | BatchError::UnknownCompression(_)
            | BatchError::Decompress(_)
            | BatchError::LengthMismatch { .. }),
        ) => {
            assert_eq!(
                decoded.as_ref().err(),
                Some(e),
                "the same payload fails differently"
            );
        }
        Err(_) => {}
    }

    // What prost encodes passes, as long as its row blocks are well formed.
    if let Some(list) = expected {
        let exact_headers = matches!(input.raw_len, Len::Exact)
            && matches!(input.record_count, Len::Exact)
            && matches!(input.compression, Comp::Plain | Comp::Zstd);
        let blocks_ok = list.records.iter().all(|r| match &r.body {
            Some(Body::RowBlock(b)) => block_ok(b),
            _ => true,
        });
        if exact_headers && !list.records.is_empty() {
            assert_eq!(decoded.as_ref(), Ok(&list));
            match &checked {
                Ok(c) => {
                    assert!(blocks_ok, "a malformed row block passed the check");
                    assert_eq!(c.has_files, list.records.iter().any(is_file));
                }
                Err(e) => assert!(!blocks_ok, "a well-formed batch was refused: {e}"),
            }
        }
    }
});
