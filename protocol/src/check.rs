//! Checking an encoded [`RecordList`] without decoding it: the exchange stores
//! line and row batches as they arrived, so it only needs to know they are well
//! formed (every record and nested message framed correctly, every string UTF-8,
//! the record count right) and whether any record concerns files. Walking the
//! bytes costs no allocation per record, where a prost decode allocates every
//! string and vector of every record only to drop them.
//!
//! The check is never looser than prost: whatever it accepts, prost decodes, with
//! the same record count (a property test holds it to that). It is stricter in one
//! point: the long-deprecated group wire types are refused even in unknown fields.
//!
//! [`RecordList`]: crate::messages::RecordList

use prost::encoding::decode_varint;

#[derive(Clone, Copy)]
enum Kind {
    Varint,
    /// Length-delimited UTF-8.
    Str,
    Bytes,
    Msg(&'static [(u32, Kind)]),
    /// A `RowBlock` or `Rows` (spec given): walked as a message, then its COPY
    /// text checked (both keep columns, row count and text at tags 3, 6, 7).
    Block(&'static [(u32, Kind)]),
}

use Kind::{Block, Bytes, Msg, Str, Varint};

const FILE_END: &[(u32, Kind)] = &[(1, Varint), (2, Bytes)];
const FILE_CHUNK: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Varint),
    (4, Bytes),
    (5, Msg(FILE_END)),
];
const FILE_ABORT: &[(u32, Kind)] = &[(1, Str), (2, Str), (3, Str)];
const COLUMN: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Varint),
    (4, Str),
    (5, Varint),
    (6, Varint),
    (7, Bytes),
];
const ROW_CHANGE: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Varint),
    (4, Varint),
    (5, Varint),
    (6, Varint),
    (7, Varint),
    (8, Varint),
    (9, Varint),
    (10, Msg(COLUMN)),
    (11, Msg(COLUMN)),
    (12, Varint),
    (13, Varint),
];
const SCHEMA_COLUMN: &[(u32, Kind)] = &[(1, Str), (2, Str), (3, Varint), (4, Varint)];
const SCHEMA_CHANGE: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Msg(SCHEMA_COLUMN)),
    (4, Str),
    (5, Varint),
];
const ROW_BLOCK: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Msg(SCHEMA_COLUMN)),
    (4, Varint),
    (5, Varint),
    (6, Varint),
    // The COPY text: UTF-8, checked by `row_block` (once, not twice).
    (7, Bytes),
];
const FIELD: &[(u32, Kind)] = &[
    (1, Str),
    (2, Varint),
    (4, Str),
    (5, Varint),
    (6, Varint),
    (7, Bytes),
];
const ROW: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Varint),
    (4, Str),
    (5, Bytes),
    (6, Varint),
    (7, Varint),
    (8, Varint),
    (9, Varint),
    (10, Msg(FIELD)),
    (11, Msg(FIELD)),
    (12, Str),
    (13, Str),
];
const TABLE_COLUMN: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Varint),
    (4, Varint),
    (5, Varint),
    (6, Varint),
];
const TABLE: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Msg(TABLE_COLUMN)),
    (4, Str),
    (5, Bytes),
    (6, Str),
];
const ROWS: &[(u32, Kind)] = &[
    (1, Str),
    (2, Str),
    (3, Msg(TABLE_COLUMN)),
    (4, Bytes),
    (5, Varint),
    (6, Varint),
    // The COPY text: UTF-8, checked by `row_block` (once, not twice).
    (7, Bytes),
    (8, Str),
];
const RECORD: &[(u32, Kind)] = &[
    (1, Varint),
    (2, Str),
    (3, Bytes),
    (4, Msg(FILE_CHUNK)),
    (5, Msg(FILE_ABORT)),
    (6, Msg(ROW_CHANGE)),
    (7, Msg(SCHEMA_CHANGE)),
    (8, Block(ROW_BLOCK)),
    (9, Msg(ROW)),
    (10, Msg(TABLE)),
    (11, Block(ROWS)),
];
/// `Record` body tags of file records.
const FILE_TAGS: u64 = (1 << 4) | (1 << 5);

/// What [`check_list`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub records: usize,
    /// Some record is a `FileChunk` or `FileAbort`.
    pub has_files: bool,
}

/// Checks the bytes of a `RecordList`.
pub fn check_list(mut buf: &[u8]) -> Result<Checked, String> {
    let mut out = Checked {
        records: 0,
        has_files: false,
    };
    while !buf.is_empty() {
        let (tag, wire) = key(&mut buf)?;
        if tag == 1 && wire == 2 {
            let rec = take_len(&mut buf)?;
            let seen = walk(rec, RECORD).map_err(|e| format!("record {}: {e}", out.records))?;
            out.has_files |= seen & FILE_TAGS != 0;
            out.records += 1;
        } else if tag == 1 {
            return Err(format!("record list: field 1 has wire type {wire}"));
        } else {
            skip(&mut buf, wire)?;
        }
    }
    Ok(out)
}

/// A varint; most keys and lengths are one byte, taken without prost's loop.
#[inline(always)]
fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    if let Some((&b, rest)) = buf.split_first() {
        if b < 0x80 {
            *buf = rest;
            return Ok(u64::from(b));
        }
    }
    decode_varint(buf).map_err(|e| e.to_string())
}

#[inline(always)]
fn key(buf: &mut &[u8]) -> Result<(u32, u64), String> {
    let k = varint(buf)?;
    if k > u64::from(u32::MAX) {
        return Err(format!("invalid key {k}"));
    }
    let tag = (k >> 3) as u32;
    if tag == 0 {
        return Err("invalid tag 0".into());
    }
    Ok((tag, k & 7))
}

#[inline(always)]
fn take_len<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = varint(buf)?;
    let len = usize::try_from(len).map_err(|_| "length overflow".to_string())?;
    if len > buf.len() {
        return Err(format!(
            "field of {len} bytes with {} bytes left",
            buf.len()
        ));
    }
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

fn skip(buf: &mut &[u8], wire: u64) -> Result<(), String> {
    let n = match wire {
        0 => {
            varint(buf)?;
            return Ok(());
        }
        1 => 8,
        2 => {
            take_len(buf)?;
            return Ok(());
        }
        5 => 4,
        w => return Err(format!("unsupported wire type {w}")),
    };
    if buf.len() < n {
        return Err("truncated fixed-width field".into());
    }
    *buf = &buf[n..];
    Ok(())
}

/// Checks one message against `spec`; returns a mask of the tags (< 64) seen.
fn walk(mut buf: &[u8], spec: &[(u32, Kind)]) -> Result<u64, String> {
    let mut seen = 0u64;
    while !buf.is_empty() {
        let (tag, wire) = key(&mut buf)?;
        // Specs list tags 1, 2, 3, ... in order.
        let entry = (tag as usize)
            .checked_sub(1)
            .and_then(|i| spec.get(i))
            .filter(|(t, _)| *t == tag)
            .or_else(|| spec.iter().find(|(t, _)| *t == tag));
        let Some(&(_, kind)) = entry else {
            skip(&mut buf, wire)?;
            continue;
        };
        let again = tag < 64 && seen & (1 << tag) != 0;
        if tag < 64 {
            seen |= 1 << tag;
        }
        let want = if matches!(kind, Varint) { 0 } else { 2 };
        if wire != want {
            return Err(format!("field {tag} has wire type {wire}, expected {want}"));
        }
        match kind {
            Varint => {
                varint(&mut buf)?;
            }
            Str => {
                utf8(take_len(&mut buf)?).map_err(|e| format!("field {tag}: {e}"))?;
            }
            Bytes => {
                take_len(&mut buf)?;
            }
            Msg(inner) => {
                let m = take_len(&mut buf)?;
                walk(m, inner).map_err(|e| format!("field {tag}: {e}"))?;
            }
            Block(block) => {
                // prost merges a repeated message field into one block, which
                // checking each occurrence alone would not see: refuse it (an
                // agent never writes one).
                if again {
                    return Err(format!("field {tag}: a second row block in one record"));
                }
                let m = take_len(&mut buf)?;
                walk(m, block).map_err(|e| format!("field {tag}: {e}"))?;
                row_block(m).map_err(|e| format!("field {tag}: {e}"))?;
            }
        }
    }
    Ok(seen)
}

/// A string field's bytes as text. A snapshot piece's COPY text is megabytes,
/// rarely all ASCII where the data is Chinese: simdutf8's vector pass (std's,
/// run twice over it, was a quarter of the exchange's CPU on a MySQL
/// snapshot), and std's error, which says where, only for bytes that fail.
fn utf8(s: &[u8]) -> Result<&str, String> {
    simdutf8::basic::from_utf8(s).map_err(|_| match std::str::from_utf8(s) {
        Err(e) => e.to_string(),
        Ok(_) => "invalid UTF-8".to_string(),
    })
}

/// The COPY text of a `RowBlock` or `Rows` that [`walk`] found well formed: one line per
/// declared row, one field per declared column (as prost would read it: the
/// last occurrence of a scalar field wins).
fn row_block(mut buf: &[u8]) -> Result<(), String> {
    let (mut columns, mut rows, mut text) = (0usize, 0u64, "");
    while !buf.is_empty() {
        let (tag, wire) = key(&mut buf)?;
        match (tag, wire) {
            (3, 2) => {
                take_len(&mut buf)?;
                columns += 1;
            }
            (6, 0) => rows = varint(&mut buf)? & u64::from(u32::MAX),
            (7, 2) => {
                // Every occurrence, as prost would (the walk took it as bytes).
                text = utf8(take_len(&mut buf)?).map_err(|e| format!("field 7: {e}"))?;
            }
            _ => skip(&mut buf, wire)?,
        }
    }
    crate::copy_text::check_block(text, columns, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{
        column, field, record::Body, Column, Field, FileChunk, FileEnd, Record, RecordList, Row,
        RowBlock, RowChange, Rows, SchemaColumn, TableColumn, ValueType,
    };
    use proptest::prelude::*;
    use prost::Message;

    fn sample() -> RecordList {
        RecordList {
            records: vec![
                Record {
                    time_unix_ms: 5,
                    position: "off=1".into(),
                    body: Some(Body::Line(b"hello".to_vec())),
                },
                Record {
                    time_unix_ms: 0,
                    position: String::new(),
                    body: Some(Body::RowChange(RowChange {
                        schema: "public".into(),
                        table: "t".into(),
                        op: 1,
                        commit_lsn: 99,
                        columns: vec![Column {
                            name: "id".into(),
                            type_name: "int".into(),
                            type_oid: 23,
                            value: Some(column::Value::Text("1".into())),
                        }],
                        ..Default::default()
                    })),
                },
            ],
        }
    }

    fn row() -> Record {
        Record {
            time_unix_ms: 2,
            position: "lsn=0/63 n=0".into(),
            body: Some(Body::Row(Row {
                schema: "public".into(),
                table: "t".into(),
                op: 2,
                txn: "731".into(),
                position: 99u64.to_be_bytes().to_vec(),
                columns: vec![Field {
                    name: "id".into(),
                    value_type: ValueType::Int32 as i32,
                    value: Some(field::Value::Text("1".into())),
                }],
                old_key: vec![Field {
                    name: "b".into(),
                    value_type: ValueType::Bytes as i32,
                    value: Some(field::Value::Bytes(vec![0, 0xff])),
                }],
                flags: vec!["cascade".into()],
                source: "postgres".into(),
                ..Default::default()
            })),
        }
    }

    fn file() -> Record {
        Record {
            time_unix_ms: 1,
            position: "f".into(),
            body: Some(Body::FileChunk(FileChunk {
                file_id: "x".into(),
                path: "a.xml".into(),
                offset: 0,
                data: vec![1, 2, 3],
                end: Some(FileEnd {
                    size: 3,
                    sha256: vec![0; 32],
                }),
            })),
        }
    }

    #[test]
    fn counts_records_and_sees_files() {
        let mut list = sample();
        let c = check_list(&list.encode_to_vec()).unwrap();
        assert_eq!(
            c,
            Checked {
                records: 2,
                has_files: false
            }
        );
        list.records.push(file());
        let c = check_list(&list.encode_to_vec()).unwrap();
        assert_eq!(
            c,
            Checked {
                records: 3,
                has_files: true
            }
        );
    }

    /// The same rows as a version 4 `Rows` block.
    fn rows(text: &str, rows: u32) -> Record {
        Record {
            time_unix_ms: 3,
            position: "snapshot public.t #0-1".into(),
            body: Some(Body::Rows(Rows {
                schema: "public".into(),
                table: "t".into(),
                columns: ["id", "note"]
                    .iter()
                    .map(|n| TableColumn {
                        name: n.to_string(),
                        source_type: "text".into(),
                        value_type: ValueType::Text as i32,
                        key: *n == "id",
                        ..Default::default()
                    })
                    .collect(),
                position: 9u64.to_be_bytes().to_vec(),
                first_index: 0,
                row_count: rows,
                copy_text: text.into(),
                source: "postgres".into(),
            })),
        }
    }

    fn block(text: &str, rows: u32) -> Record {
        Record {
            time_unix_ms: 3,
            position: "snapshot public.t #0-1".into(),
            body: Some(Body::RowBlock(RowBlock {
                schema: "public".into(),
                table: "t".into(),
                columns: ["id", "note"]
                    .iter()
                    .map(|n| SchemaColumn {
                        name: n.to_string(),
                        type_name: "text".into(),
                        type_oid: 25,
                        key: *n == "id",
                    })
                    .collect(),
                commit_lsn: 9,
                first_index: 0,
                row_count: rows,
                copy_text: text.into(),
            })),
        }
    }

    #[test]
    fn row_blocks_are_held_to_their_rows_and_columns() {
        for make in [block, rows] {
            let mut list = sample();
            list.records.push(make("1\tone\n2\t\\N\n", 2));
            assert_eq!(check_list(&list.encode_to_vec()).unwrap().records, 3);
            for (text, rows, why) in [
                ("1\tone\n", 2, "declares 2 rows"),
                ("1\tone\n2\n", 2, "row 1 of the block has 1 fields"),
                ("1\tone\tx\n", 1, "has 3 fields"),
            ] {
                let mut list = sample();
                list.records.push(make(text, rows));
                let e = check_list(&list.encode_to_vec()).unwrap_err();
                assert!(e.contains("record 2") && e.contains(why), "{e}");
            }
        }
    }

    /// Found by `fuzz/fuzz_targets/batch.rs`. A record whose body field 8
    /// (`RowBlock`) occurs twice: prost merges the two messages into one block
    /// (columns appended, scalars the second one leaves unset kept from the
    /// first), while `row_block` checks each occurrence on its own. Both pass
    /// here: A = 0 columns, row_count 1, text "\n"; B = 2 empty columns, nothing
    /// else. prost reads one block of 2 columns, 1 row and the text "\n", which
    /// `RowBlock`'s doc says the exchange refuses and `block_rows` does refuse.
    #[test]
    fn a_record_with_two_row_blocks_is_checked_as_prost_merges_them() {
        let raw: &[u8] = &[
            0x0a, 0x0d, // RecordList.records, 13 bytes
            0x42, 0x05, // Record.row_block (8), 5 bytes: A
            0x30, 0x01, //   row_count = 1
            0x3a, 0x01, 0x0a, //   copy_text = "\n"
            0x42, 0x04, // Record.row_block (8) again, 4 bytes: B
            0x1a, 0x00, //   columns: SchemaColumn {}
            0x1a, 0x00, //   columns: SchemaColumn {}
        ];
        let list = RecordList::decode(raw).unwrap();
        let Some(Body::RowBlock(b)) = &list.records[0].body else {
            panic!("prost reads a row block: {list:?}");
        };
        assert_eq!(
            (b.columns.len(), b.row_count, b.copy_text.as_str()),
            (2, 1, "\n")
        );
        let refused = crate::copy_text::block_rows(b).unwrap_err();
        assert!(
            check_list(raw).is_err(),
            "check_list passes a block prost reads as one that block_rows refuses: {refused}"
        );
    }

    #[test]
    fn bad_utf8_in_a_nested_string_is_refused() {
        let mut list = sample();
        if let Some(Body::RowChange(r)) = list.records[1].body.as_mut() {
            r.columns[0].value = Some(column::Value::Text("\u{7ff}".into()));
        }
        let mut raw = list.encode_to_vec();
        // The two bytes of U+07FF (0xDF 0xBF) become an invalid sequence.
        let at = raw.windows(2).position(|w| w == [0xDF, 0xBF]).unwrap();
        raw[at + 1] = 0x41;
        assert!(RecordList::decode(raw.as_slice()).is_err());
        let e = check_list(&raw).unwrap_err();
        assert!(e.contains("record 1"), "{e}");
    }

    /// A block's COPY text is checked once, by `row_block`, not by the walk:
    /// still refused when any occurrence of it is not UTF-8, long text (the
    /// vector path) and short, as prost refuses it.
    #[test]
    fn bad_utf8_in_a_blocks_text_is_refused_in_every_occurrence() {
        let long = format!("1\t{}\n2\t沈阳市\n", "哈尔滨".repeat(40));
        for make in [block, rows] {
            for text in [long.as_str(), "1\t大连\n2\t沈阳市\n"] {
                let mut list = sample();
                list.records.push(make(text, 2));
                let mut raw = list.encode_to_vec();
                assert_eq!(check_list(&raw).unwrap().records, 3);
                // The last byte of 市 becomes 0x41: an invalid sequence.
                let at = raw.windows(3).rposition(|w| w == "市".as_bytes()).unwrap();
                raw[at + 2] = 0x41;
                assert!(RecordList::decode(raw.as_slice()).is_err());
                let e = check_list(&raw).unwrap_err();
                assert!(e.contains("record 2") && e.contains("field 7"), "{e}");
            }
        }
        // Two occurrences of the text, the first one broken.
        let text = |t: &[u8]| [&[0x3a, t.len() as u8][..], t].concat();
        let mut body = text(&[0xff, b'\n']);
        body.extend(text(b"\n"));
        body.extend([0x30, 0x01]); // row_count = 1
        let record = [&[0x42, body.len() as u8][..], &body].concat();
        let raw = [&[0x0a, record.len() as u8][..], &record].concat();
        assert!(RecordList::decode(raw.as_slice()).is_err());
        assert!(check_list(&raw).is_err());
    }

    proptest! {
        /// Never looser than prost, on arbitrary bytes.
        #[test]
        fn accepts_only_what_prost_decodes(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(c) = check_list(&raw) {
                let l = RecordList::decode(raw.as_slice());
                prop_assert!(l.is_ok(), "checked {:?} but prost says {:?}", c, l);
                prop_assert_eq!(l.unwrap().records.len(), c.records);
            }
        }

        /// ... and on damaged valid batches, which reach deeper into the walk.
        #[test]
        fn damaged_batches_are_never_passed_that_prost_refuses(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()) {
            let mut list = sample();
            list.records.push(file());
            list.records.push(block("1\tone\n2\t\\N\n", 2));
            list.records.push(rows("1\tone\n2\t\\N\n", 2));
            list.records.push(row());
            let mut raw = list.encode_to_vec();
            let i = at.index(raw.len());
            if cut { raw.truncate(i) } else { raw[i] = byte }
            if let Ok(c) = check_list(&raw) {
                let l = RecordList::decode(raw.as_slice());
                prop_assert!(l.is_ok(), "checked {:?} but prost says {:?}", c, l);
                let l = l.unwrap();
                prop_assert_eq!(l.records.len(), c.records);
                let files = l.records.iter().any(|r| matches!(r.body, Some(Body::FileChunk(_) | Body::FileAbort(_))));
                // A record naming two bodies is taken as its last by prost; the
                // check may see a file where there is none (the careful way).
                prop_assert!(!files || c.has_files);
            }
        }

        /// Whatever prost encodes passes.
        #[test]
        fn passes_what_prost_encodes(lines in proptest::collection::vec(".{0,20}", 0..10)) {
            let mut list = sample();
            for l in &lines {
                list.records.push(Record { time_unix_ms: 1, position: l.clone(), body: Some(Body::Line(l.clone().into_bytes())) });
            }
            let c = check_list(&list.encode_to_vec()).unwrap();
            prop_assert_eq!(c.records, list.records.len());
        }
    }
}
