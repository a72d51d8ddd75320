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

use crate::messages::Record;

/// `RecordList.records`.
const LIST_RECORDS: u32 = 1;
/// `Record` fields.
const RECORD_TIME: u32 = 1;
const RECORD_POSITION: u32 = 2;
const RECORD_LINE: u32 = 3;

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

    /// Takes the bytes, leaving the buffer empty.
    pub fn take(&mut self) -> RecordBuf {
        std::mem::take(self)
    }

    pub fn into_raw(mut self) -> (Vec<u8>, u32) {
        (std::mem::take(&mut self.raw), self.count)
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
    }
}
