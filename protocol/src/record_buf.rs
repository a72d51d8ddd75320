//! Records written straight into the bytes of a [`RecordList`], for sources that
//! produce many small records (tailed lines, snapshot rows): no [`Record`] value,
//! no allocation per record. The bytes are exactly what prost encodes for the same
//! records (tests compare them), so the buffer, the wire and the exchange cannot
//! tell the two paths apart.
//!
//! [`RecordList`]: crate::messages::RecordList

use prost::encoding::{encoded_len_varint, key_len};
use prost::Message;

use crate::messages::{Record, RowOp};

/// `RecordList.records`.
const LIST_RECORDS: u32 = 1;
/// `Record` fields.
const RECORD_TIME: u32 = 1;
const RECORD_POSITION: u32 = 2;
const RECORD_LINE: u32 = 3;
const RECORD_ROW: u32 = 6;

/// One column value of a row being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueRef<'a> {
    Text(&'a str),
    Null,
    UnchangedToast,
    Bytes(&'a [u8]),
}

/// One column of a row being written (see `messages::Column`).
#[derive(Debug, Clone, Copy)]
pub struct ColumnRef<'a> {
    pub name: &'a str,
    pub type_name: &'a str,
    pub type_oid: u32,
    pub value: ValueRef<'a>,
}

/// The fields of a `RowChange` other than its columns.
#[derive(Debug, Clone, Copy)]
pub struct RowHead<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    pub op: RowOp,
    pub xid: u32,
    pub commit_lsn: u64,
    pub commit_time_unix_us: i64,
    pub change_index: u32,
    pub last_in_txn: bool,
    pub snapshot: bool,
}

/// The encoded records of one batch, in order.
///
/// A large buffer (a snapshot or transaction piece of megabytes) goes back to a
/// small pool when dropped and is handed out again by [`RecordBuf::with_capacity`]:
/// a fresh one would be new pages (the agent's allocator returns blocks this large
/// to the kernel) and writing a piece into new pages costs about as much as
/// encoding it. The pool holds a few buffers and lets them go once unused for
/// [`SPARE_IDLE`] (checked whenever it is used, and by [`trim_spares`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecordBuf {
    raw: Vec<u8>,
    count: u32,
}

/// Buffers at least this large are kept for reuse.
const SPARE_MIN: usize = 1 << 20;
/// At most this many are kept.
const SPARE_COUNT: usize = 3;
/// A spare unused this long is freed.
pub const SPARE_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

static SPARES: std::sync::Mutex<Vec<(std::time::Instant, Vec<u8>)>> =
    std::sync::Mutex::new(Vec::new());

/// The pool, without the spares unused for [`SPARE_IDLE`].
fn spares() -> std::sync::MutexGuard<'static, Vec<(std::time::Instant, Vec<u8>)>> {
    // The pool holds plain buffers; one poisoned by a panic elsewhere is still sound.
    let mut s = SPARES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    s.retain(|(at, _)| at.elapsed() < SPARE_IDLE);
    s
}

/// Frees the spare buffers unused for [`SPARE_IDLE`] (the pool does so itself
/// whenever it is used; this is for a process that stopped using it).
pub fn trim_spares() {
    drop(spares());
}

impl Drop for RecordBuf {
    fn drop(&mut self) {
        if self.raw.capacity() < SPARE_MIN {
            return;
        }
        let mut raw = std::mem::take(&mut self.raw);
        raw.clear();
        let mut s = spares();
        if s.len() < SPARE_COUNT {
            s.push((std::time::Instant::now(), raw));
        }
    }
}

/// Appends a varint as prost writes it, reserving once instead of per byte.
#[inline]
fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    if v < 0x80 {
        out.push(v as u8);
        return;
    }
    let mut tmp = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        tmp[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    tmp[n] = v as u8;
    out.extend_from_slice(&tmp[..=n]);
}

/// A field key: tag and wire type (0 varint, 2 length-delimited).
#[inline]
fn put_key(out: &mut Vec<u8>, tag: u32, wire: u32) {
    put_uvarint(out, u64::from((tag << 3) | wire));
}

fn str_len(tag: u32, s: &[u8]) -> usize {
    if s.is_empty() {
        0
    } else {
        field_len(tag, s.len())
    }
}

/// A length-delimited field of `len` bytes, key and length included.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn varint_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

fn bool_len(tag: u32, v: bool) -> usize {
    if v {
        key_len(tag) + 1
    } else {
        0
    }
}

impl RecordBuf {
    pub fn new() -> RecordBuf {
        RecordBuf::default()
    }

    pub fn with_capacity(bytes: usize) -> RecordBuf {
        let spare = if bytes >= SPARE_MIN {
            spares().pop().map(|(_, v)| v)
        } else {
            None
        };
        let raw = match spare {
            Some(mut v) => {
                v.reserve(bytes);
                v
            }
            None => Vec::with_capacity(bytes),
        };
        RecordBuf { raw, count: 0 }
    }

    /// Records written so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded bytes so far (the uncompressed size of the batch).
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// The `RecordList` bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Any record, through prost.
    pub fn push(&mut self, r: &Record) {
        put_key(&mut self.raw, LIST_RECORDS, 2);
        put_uvarint(&mut self.raw, r.encoded_len() as u64);
        r.encode_raw(&mut self.raw);
        self.count += 1;
    }

    fn put_bytes(&mut self, tag: u32, s: &[u8]) {
        if !s.is_empty() {
            self.put_field(tag, s);
        }
    }

    /// A length-delimited field, written even when empty (a oneof member).
    fn put_field(&mut self, tag: u32, s: &[u8]) {
        put_key(&mut self.raw, tag, 2);
        put_uvarint(&mut self.raw, s.len() as u64);
        self.raw.extend_from_slice(s);
    }

    fn put_varint(&mut self, tag: u32, v: u64) {
        if v != 0 {
            put_key(&mut self.raw, tag, 0);
            put_uvarint(&mut self.raw, v);
        }
    }

    fn put_bool(&mut self, tag: u32, v: bool) {
        if v {
            put_key(&mut self.raw, tag, 0);
            self.raw.push(1);
        }
    }

    /// Starts a record whose body is `body_len` bytes.
    fn record_head(&mut self, time_unix_ms: u64, position: &str, body_len: usize) {
        let len = varint_len(RECORD_TIME, time_unix_ms)
            + str_len(RECORD_POSITION, position.as_bytes())
            + body_len;
        put_key(&mut self.raw, LIST_RECORDS, 2);
        put_uvarint(&mut self.raw, len as u64);
        self.put_varint(RECORD_TIME, time_unix_ms);
        self.put_bytes(RECORD_POSITION, position.as_bytes());
        self.count += 1;
    }

    /// A `Record` with a `Line` body.
    pub fn push_line(&mut self, time_unix_ms: u64, position: &str, text: &[u8]) {
        self.record_head(time_unix_ms, position, field_len(RECORD_LINE, text.len()));
        self.put_field(RECORD_LINE, text);
    }

    /// A `Record` with a `RowChange` body; `old_key` columns as `columns`.
    pub fn push_row(
        &mut self,
        time_unix_ms: u64,
        position: &str,
        head: &RowHead<'_>,
        columns: &[ColumnRef<'_>],
        old_key: &[ColumnRef<'_>],
    ) {
        let cols: usize = columns.iter().map(|c| field_len(10, column_len(c))).sum();
        let old: usize = old_key.iter().map(|c| field_len(11, column_len(c))).sum();
        let row_len = str_len(1, head.schema.as_bytes())
            + str_len(2, head.table.as_bytes())
            + varint_len(3, head.op as i32 as u64)
            + varint_len(4, u64::from(head.xid))
            + varint_len(5, head.commit_lsn)
            + varint_len(6, head.commit_time_unix_us as u64)
            + varint_len(7, u64::from(head.change_index))
            + bool_len(8, head.last_in_txn)
            + bool_len(9, head.snapshot)
            + cols
            + old;
        self.raw.reserve(row_len + position.len() + 32);
        self.record_head(time_unix_ms, position, field_len(RECORD_ROW, row_len));
        put_key(&mut self.raw, RECORD_ROW, 2);
        put_uvarint(&mut self.raw, row_len as u64);
        self.put_bytes(1, head.schema.as_bytes());
        self.put_bytes(2, head.table.as_bytes());
        self.put_varint(3, head.op as i32 as u64);
        self.put_varint(4, u64::from(head.xid));
        self.put_varint(5, head.commit_lsn);
        self.put_varint(6, head.commit_time_unix_us as u64);
        self.put_varint(7, u64::from(head.change_index));
        self.put_bool(8, head.last_in_txn);
        self.put_bool(9, head.snapshot);
        for (tag, list) in [(10, columns), (11, old_key)] {
            for c in list {
                put_key(&mut self.raw, tag, 2);
                put_uvarint(&mut self.raw, column_len(c) as u64);
                self.put_bytes(1, c.name.as_bytes());
                self.put_bytes(2, c.type_name.as_bytes());
                self.put_varint(3, u64::from(c.type_oid));
                match c.value {
                    ValueRef::Text(t) => self.put_field(4, t.as_bytes()),
                    ValueRef::Null => {
                        put_key(&mut self.raw, 5, 0);
                        self.raw.push(1);
                    }
                    ValueRef::UnchangedToast => {
                        put_key(&mut self.raw, 6, 0);
                        self.raw.push(1);
                    }
                    ValueRef::Bytes(b) => self.put_field(7, b),
                }
            }
        }
    }

    /// Takes the bytes, leaving the buffer empty.
    pub fn take(&mut self) -> RecordBuf {
        std::mem::take(self)
    }

    pub fn into_raw(mut self) -> (Vec<u8>, u32) {
        (std::mem::take(&mut self.raw), self.count)
    }
}

fn column_len(c: &ColumnRef<'_>) -> usize {
    str_len(1, c.name.as_bytes())
        + str_len(2, c.type_name.as_bytes())
        + varint_len(3, u64::from(c.type_oid))
        + match c.value {
            ValueRef::Text(t) => field_len(4, t.len()),
            ValueRef::Null => key_len(5) + 1,
            ValueRef::UnchangedToast => key_len(6) + 1,
            ValueRef::Bytes(b) => field_len(7, b.len()),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{column, record::Body, Column, RecordList, RowChange};
    use proptest::prelude::*;

    fn owned(c: &ColumnRef<'_>) -> Column {
        Column {
            name: c.name.into(),
            type_name: c.type_name.into(),
            type_oid: c.type_oid,
            value: Some(match c.value {
                ValueRef::Text(t) => column::Value::Text(t.into()),
                ValueRef::Null => column::Value::Null(true),
                ValueRef::UnchangedToast => column::Value::UnchangedToast(true),
                ValueRef::Bytes(b) => column::Value::Bytes(b.to_vec()),
            }),
        }
    }

    /// Name, type name, type oid, value (see `to_ref`).
    type TestColumn = (String, String, u32, (u8, String, Vec<u8>));

    fn value() -> impl Strategy<Value = (u8, String, Vec<u8>)> {
        (
            0u8..4,
            ".{0,40}",
            proptest::collection::vec(any::<u8>(), 0..40),
        )
    }

    fn to_ref<'a>(v: &'a (u8, String, Vec<u8>)) -> ValueRef<'a> {
        match v.0 {
            0 => ValueRef::Text(&v.1),
            1 => ValueRef::Null,
            2 => ValueRef::UnchangedToast,
            _ => ValueRef::Bytes(&v.2),
        }
    }

    /// A large buffer dropped goes back to the pool; whoever gets it next starts
    /// from an empty buffer and writes the same bytes as into a fresh one.
    #[test]
    fn a_reused_buffer_starts_empty() {
        let line = vec![b'x'; 4096];
        let fill = |buf: &mut RecordBuf| {
            for i in 0..600 {
                buf.push_line(i, "p", &line);
            }
        };
        let mut first = RecordBuf::with_capacity(3 << 20);
        fill(&mut first);
        let want = first.as_bytes().to_vec();
        drop(first);
        let mut again = RecordBuf::with_capacity(3 << 20);
        assert_eq!((again.len(), again.count()), (0, 0));
        assert!(again.raw.capacity() >= 3 << 20);
        fill(&mut again);
        assert_eq!(again.as_bytes(), want.as_slice());
        let (raw, count) = again.into_raw();
        assert_eq!((raw.len(), count), (want.len(), 600));
        trim_spares();
    }

    proptest! {
        /// Byte for byte what prost writes for the same records.
        #[test]
        fn lines_encode_as_prost_does(
            lines in proptest::collection::vec((any::<u64>(), ".{0,30}", proptest::collection::vec(any::<u8>(), 0..300)), 0..20)
        ) {
            let mut buf = RecordBuf::new();
            let mut list = RecordList::default();
            for (t, p, text) in &lines {
                buf.push_line(*t, p, text);
                list.records.push(Record {
                    time_unix_ms: *t,
                    position: p.clone(),
                    body: Some(Body::Line(text.clone())),
                });
            }
            prop_assert_eq!(buf.count() as usize, lines.len());
            let want = list.encode_to_vec();
            prop_assert_eq!(buf.as_bytes(), want.as_slice());
        }

        #[test]
        fn rows_encode_as_prost_does(
            t in any::<u64>(), pos in ".{0,30}", schema in "[a-z]{0,8}", table in "[a-z]{0,8}",
            op in 0i32..5, xid in any::<u32>(), lsn in any::<u64>(), time in any::<i64>(),
            idx in any::<u32>(), last in any::<bool>(), snap in any::<bool>(),
            cols in proptest::collection::vec(("[a-z]{0,6}", "[a-z]{0,6}", any::<u32>(), value()), 0..6),
            old in proptest::collection::vec(("[a-z]{0,6}", "[a-z]{0,6}", any::<u32>(), value()), 0..3),
        ) {
            let op = RowOp::try_from(op).unwrap_or(RowOp::Unspecified);
            let head = RowHead {
                schema: &schema, table: &table, op, xid, commit_lsn: lsn,
                commit_time_unix_us: time, change_index: idx, last_in_txn: last, snapshot: snap,
            };
            let refs = |v: &[TestColumn]| -> Vec<Column> {
                v.iter().map(|(n, ty, oid, val)| owned(&ColumnRef {
                    name: n, type_name: ty, type_oid: *oid, value: to_ref(val),
                })).collect()
            };
            let c_refs: Vec<ColumnRef<'_>> = cols.iter().map(|(n, ty, oid, val)| ColumnRef {
                name: n, type_name: ty, type_oid: *oid, value: to_ref(val),
            }).collect();
            let o_refs: Vec<ColumnRef<'_>> = old.iter().map(|(n, ty, oid, val)| ColumnRef {
                name: n, type_name: ty, type_oid: *oid, value: to_ref(val),
            }).collect();
            let mut buf = RecordBuf::new();
            buf.push_row(t, &pos, &head, &c_refs, &o_refs);
            let rec = Record {
                time_unix_ms: t,
                position: pos.clone(),
                body: Some(Body::RowChange(RowChange {
                    schema: schema.clone(), table: table.clone(), op: op as i32, xid,
                    commit_lsn: lsn, commit_time_unix_us: time, change_index: idx,
                    last_in_txn: last, snapshot: snap, columns: refs(&cols), old_key: refs(&old),
                    truncate_cascade: false, truncate_restart_identity: false,
                })),
            };
            let list = RecordList { records: vec![rec.clone()] };
            let want = list.encode_to_vec();
            prop_assert_eq!(buf.as_bytes(), want.as_slice());
            let mut via_push = RecordBuf::new();
            via_push.push(&rec);
            prop_assert_eq!(via_push, buf);
        }
    }
}
