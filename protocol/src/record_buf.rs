//! Records written straight into the bytes of a [`RecordList`], for sources that
//! produce many small records (tailed lines) or a few large ones (snapshot row
//! blocks): no [`Record`] value,
//! no allocation per record. The bytes are exactly what prost encodes for the same
//! records (tests compare them), so the buffer, the wire and the exchange cannot
//! tell the two paths apart.
//!
//! [`RecordList`]: crate::messages::RecordList

use prost::encoding::{encoded_len_varint, key_len};
use prost::Message;

use crate::messages::{field, Record};

/// `RecordList.records`.
const LIST_RECORDS: u32 = 1;
/// `Record` fields.
const RECORD_TIME: u32 = 1;
const RECORD_POSITION: u32 = 2;
const RECORD_LINE: u32 = 3;
const RECORD_ROW: u32 = 9;
/// `Row` fields.
const ROW_SCHEMA: u32 = 1;
const ROW_TABLE: u32 = 2;
const ROW_OP: u32 = 3;
const ROW_TXN: u32 = 4;
const ROW_POSITION: u32 = 5;
const ROW_COMMIT_TIME: u32 = 6;
const ROW_CHANGE_INDEX: u32 = 7;
const ROW_LAST_IN_TXN: u32 = 8;
const ROW_SNAPSHOT: u32 = 9;
const ROW_COLUMNS: u32 = 10;
const ROW_OLD_KEY: u32 = 11;
const ROW_FLAGS: u32 = 12;
const ROW_SOURCE: u32 = 13;
/// `Field` fields.
const FIELD_NAME: u32 = 1;
const FIELD_VALUE_TYPE: u32 = 2;

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
        put_field(&mut self.raw, tag, s);
    }

    fn put_varint(&mut self, tag: u32, v: u64) {
        if v != 0 {
            put_key(&mut self.raw, tag, 0);
            put_uvarint(&mut self.raw, v);
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

    /// A `Record` with a [`Row`](crate::messages::Row) body: `head` holds its
    /// fields 1–9, `tail` the rest (columns, old key, flags, source), encoded.
    pub fn push_row(
        &mut self,
        time_unix_ms: u64,
        position: &str,
        head: &RowHead<'_>,
        tail: &RowTail,
    ) {
        let row_len = head.encoded_len() + tail.raw.len();
        self.record_head(time_unix_ms, position, field_len(RECORD_ROW, row_len));
        put_key(&mut self.raw, RECORD_ROW, 2);
        put_uvarint(&mut self.raw, row_len as u64);
        head.encode(&mut self.raw);
        self.raw.extend_from_slice(&tail.raw);
    }

    /// Takes the bytes, leaving the buffer empty.
    pub fn take(&mut self) -> RecordBuf {
        std::mem::take(self)
    }

    pub fn into_raw(mut self) -> (Vec<u8>, u32) {
        (std::mem::take(&mut self.raw), self.count)
    }
}

/// Fields 1–9 of a [`Row`](crate::messages::Row), borrowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowHead<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    pub op: i32,
    pub txn: &'a str,
    pub position: &'a [u8],
    pub commit_time_unix_us: i64,
    pub change_index: u32,
    pub last_in_txn: bool,
    pub snapshot: bool,
}

impl RowHead<'_> {
    fn encoded_len(&self) -> usize {
        str_len(ROW_SCHEMA, self.schema.as_bytes())
            + str_len(ROW_TABLE, self.table.as_bytes())
            + varint_len(ROW_OP, self.op as i64 as u64)
            + str_len(ROW_TXN, self.txn.as_bytes())
            + str_len(ROW_POSITION, self.position)
            + varint_len(ROW_COMMIT_TIME, self.commit_time_unix_us as u64)
            + varint_len(ROW_CHANGE_INDEX, u64::from(self.change_index))
            + varint_len(ROW_LAST_IN_TXN, u64::from(self.last_in_txn))
            + varint_len(ROW_SNAPSHOT, u64::from(self.snapshot))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, ROW_SCHEMA, self.schema.as_bytes());
        put_str(out, ROW_TABLE, self.table.as_bytes());
        put_var(out, ROW_OP, self.op as i64 as u64);
        put_str(out, ROW_TXN, self.txn.as_bytes());
        put_str(out, ROW_POSITION, self.position);
        put_var(out, ROW_COMMIT_TIME, self.commit_time_unix_us as u64);
        put_var(out, ROW_CHANGE_INDEX, u64::from(self.change_index));
        put_var(out, ROW_LAST_IN_TXN, u64::from(self.last_in_txn));
        put_var(out, ROW_SNAPSHOT, u64::from(self.snapshot));
    }
}

/// Fields 10–13 of a [`Row`](crate::messages::Row), encoded as they are
/// added, in this order: [`column`](RowTail::column)s,
/// [`old_key`](RowTail::old_key) fields, [`flag`](RowTail::flag)s,
/// [`source`](RowTail::source). Reused from row to row.
#[derive(Debug, Default, Clone)]
pub struct RowTail {
    raw: Vec<u8>,
}

/// A [`field::Value`] borrowed: what a source that renders values into
/// buffers of its own hands to [`RowTail::column_ref`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueRef<'a> {
    Text(&'a str),
    /// SQL NULL (`true`; prost keeps the flag as given).
    Null(bool),
    Unchanged(bool),
    Bytes(&'a [u8]),
}

/// `field::Value` tags.
const VALUE_TEXT: u32 = 4;
const VALUE_NULL: u32 = 5;
const VALUE_UNCHANGED: u32 = 6;
const VALUE_BYTES: u32 = 7;

impl<'a> From<&'a field::Value> for ValueRef<'a> {
    fn from(v: &'a field::Value) -> Self {
        match v {
            field::Value::Text(t) => ValueRef::Text(t),
            field::Value::Null(n) => ValueRef::Null(*n),
            field::Value::Unchanged(u) => ValueRef::Unchanged(*u),
            field::Value::Bytes(b) => ValueRef::Bytes(b),
        }
    }
}

impl ValueRef<'_> {
    /// The value owned.
    pub fn to_value(self) -> field::Value {
        match self {
            ValueRef::Text(t) => field::Value::Text(t.to_string()),
            ValueRef::Null(n) => field::Value::Null(n),
            ValueRef::Unchanged(u) => field::Value::Unchanged(u),
            ValueRef::Bytes(b) => field::Value::Bytes(b.to_vec()),
        }
    }

    /// The oneof as prost writes it: a set member is written even when empty.
    fn encoded_len(&self) -> usize {
        match self {
            ValueRef::Text(t) => field_len(VALUE_TEXT, t.len()),
            ValueRef::Bytes(b) => field_len(VALUE_BYTES, b.len()),
            ValueRef::Null(_) => key_len(VALUE_NULL) + 1,
            ValueRef::Unchanged(_) => key_len(VALUE_UNCHANGED) + 1,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ValueRef::Text(t) => put_field(out, VALUE_TEXT, t.as_bytes()),
            ValueRef::Bytes(b) => put_field(out, VALUE_BYTES, b),
            // A oneof's member is written even when false.
            ValueRef::Null(n) => {
                put_key(out, VALUE_NULL, 0);
                out.push(u8::from(*n));
            }
            ValueRef::Unchanged(u) => {
                put_key(out, VALUE_UNCHANGED, 0);
                out.push(u8::from(*u));
            }
        }
    }
}

impl RowTail {
    pub fn clear(&mut self) {
        self.raw.clear();
    }

    /// One of `columns`.
    pub fn column(&mut self, name: &str, value_type: i32, value: &field::Value) {
        self.field(ROW_COLUMNS, name, value_type, value.into());
    }

    /// One of `old_key`.
    pub fn old_key(&mut self, name: &str, value_type: i32, value: &field::Value) {
        self.field(ROW_OLD_KEY, name, value_type, value.into());
    }

    /// [`column`](RowTail::column) from a borrowed value.
    pub fn column_ref(&mut self, name: &str, value_type: i32, value: ValueRef<'_>) {
        self.field(ROW_COLUMNS, name, value_type, value);
    }

    /// [`old_key`](RowTail::old_key) from a borrowed value.
    pub fn old_key_ref(&mut self, name: &str, value_type: i32, value: ValueRef<'_>) {
        self.field(ROW_OLD_KEY, name, value_type, value);
    }

    pub fn flag(&mut self, flag: &str) {
        // A repeated string is written even when empty.
        put_field(&mut self.raw, ROW_FLAGS, flag.as_bytes());
    }

    pub fn source(&mut self, source: &str) {
        put_str(&mut self.raw, ROW_SOURCE, source.as_bytes());
    }

    fn field(&mut self, tag: u32, name: &str, value_type: i32, value: ValueRef<'_>) {
        let len = str_len(FIELD_NAME, name.as_bytes())
            + varint_len(FIELD_VALUE_TYPE, value_type as i64 as u64)
            + value.encoded_len();
        put_key(&mut self.raw, tag, 2);
        put_uvarint(&mut self.raw, len as u64);
        put_str(&mut self.raw, FIELD_NAME, name.as_bytes());
        put_var(&mut self.raw, FIELD_VALUE_TYPE, value_type as i64 as u64);
        value.encode(&mut self.raw);
    }
}

/// A length-delimited field, written even when empty.
fn put_field(out: &mut Vec<u8>, tag: u32, s: &[u8]) {
    put_key(out, tag, 2);
    put_uvarint(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// A string or bytes field, left out when empty (proto3).
fn put_str(out: &mut Vec<u8>, tag: u32, s: &[u8]) {
    if !s.is_empty() {
        put_key(out, tag, 2);
        put_uvarint(out, s.len() as u64);
        out.extend_from_slice(s);
    }
}

/// A varint field, left out when 0 (proto3).
fn put_var(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        put_key(out, tag, 0);
        put_uvarint(out, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{record::Body, RecordList};
    use proptest::prelude::*;

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

    fn field_strategy() -> impl Strategy<Value = crate::messages::Field> {
        let value = prop_oneof![
            ".{0,12}".prop_map(field::Value::Text),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(field::Value::Bytes),
            any::<bool>().prop_map(field::Value::Null),
            any::<bool>().prop_map(field::Value::Unchanged),
        ];
        (".{0,8}", 0i32..20, value).prop_map(|(name, value_type, v)| crate::messages::Field {
            name,
            value_type,
            value: Some(v),
        })
    }

    fn row_strategy() -> impl Strategy<Value = (u64, String, crate::messages::Row)> {
        let fields = || proptest::collection::vec(field_strategy(), 0..5);
        (
            (
                any::<u64>(),
                ".{0,10}",
                ".{0,6}",
                ".{0,6}",
                -2i32..4,
                ".{0,8}",
            ),
            (
                proptest::collection::vec(any::<u8>(), 0..10),
                any::<i64>(),
                any::<u32>(),
                any::<bool>(),
                any::<bool>(),
            ),
            (
                fields(),
                fields(),
                proptest::collection::vec(".{0,6}", 0..3),
                ".{0,6}",
            ),
        )
            .prop_map(
                |(
                    (t, p, schema, table, op, txn),
                    (position, commit, index, last, snapshot),
                    (columns, old_key, flags, source),
                )| {
                    (
                        t,
                        p,
                        crate::messages::Row {
                            schema,
                            table,
                            op,
                            txn,
                            position,
                            commit_time_unix_us: commit,
                            change_index: index,
                            last_in_txn: last,
                            snapshot,
                            columns,
                            old_key,
                            flags,
                            source,
                        },
                    )
                },
            )
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

        /// Rows written through `push_row` are byte for byte prost's.
        #[test]
        fn rows_encode_as_prost_does(
            rows in proptest::collection::vec(row_strategy(), 0..8)
        ) {
            let mut buf = RecordBuf::new();
            let mut list = RecordList::default();
            let mut tail = RowTail::default();
            for (t, p, row) in &rows {
                tail.clear();
                for f in &row.columns {
                    tail.column(&f.name, f.value_type, f.value.as_ref().unwrap());
                }
                for f in &row.old_key {
                    tail.old_key(&f.name, f.value_type, f.value.as_ref().unwrap());
                }
                for f in &row.flags {
                    tail.flag(f);
                }
                tail.source(&row.source);
                let head = RowHead {
                    schema: &row.schema,
                    table: &row.table,
                    op: row.op,
                    txn: &row.txn,
                    position: &row.position,
                    commit_time_unix_us: row.commit_time_unix_us,
                    change_index: row.change_index,
                    last_in_txn: row.last_in_txn,
                    snapshot: row.snapshot,
                };
                buf.push_row(*t, p, &head, &tail);
                list.records.push(Record {
                    time_unix_ms: *t,
                    position: p.clone(),
                    body: Some(Body::Row(row.clone())),
                });
            }
            prop_assert_eq!(buf.count() as usize, rows.len());
            let want = list.encode_to_vec();
            prop_assert_eq!(buf.as_bytes(), want.as_slice());
        }
    }
}
