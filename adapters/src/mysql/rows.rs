//! The row images of a rows event, read straight from the event's bytes.
//!
//! `mysql_common`'s own row iterator builds, for every column of every row, a
//! `Column` with its database, table and column names copied into fresh
//! allocations, and parses the table map's optional metadata again for every
//! row; on a bulk load that was most of the source's time. This reader takes
//! what a value's decoding needs from the table map once ([`Layout`]) and
//! decodes each value with `mysql_common`'s own `BinlogValue` parser, borrowing
//! the event's bytes, so the values are exactly the ones its iterator yields;
//! strings it reads itself, as that parser does, but as slices of the event
//! ([`Cell::Bytes`]) instead of a fresh copy each (`DECIMAL` and short `TIME`
//! values, too, it reads itself: see [`decimal`] and [`time2_short`]).
//!
//! Row image format (MySQL's `log_event.cc`, WL#2955): per row, for an update
//! event the before image then the after image, each: for the after image of a
//! `PARTIAL_UPDATE_ROWS_EVENT` a length-encoded `value_options` and, with
//! `PARTIAL_JSON_UPDATES`, a bitmap of the JSON columns sent as diffs; a null
//! bitmap of one bit per column present in the image; the values of the
//! present, non-null columns.

use mysql_async::binlog::events::{OptionalMetaExtractor, RowsEventData, TableMapEvent};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_common::io::ParseBuf;
use mysql_common::misc::raw::int::LenEnc;
use mysql_common::misc::raw::RawInt;

use super::values::padded;

/// `BinlogRowValueOptions::PARTIAL_JSON_UPDATES`.
const PARTIAL_JSON_UPDATES: u64 = 1;

/// What decoding a value of each column needs, from one table map.
#[derive(Debug)]
pub(crate) struct Layout {
    cols: Vec<ColLayout>,
}

#[derive(Debug)]
struct ColLayout {
    ty: ColumnType,
    meta: Vec<u8>,
    unsigned: bool,
}

impl Layout {
    pub(crate) fn of(tme: &TableMapEvent<'_>) -> Result<Layout, String> {
        let meta = OptionalMetaExtractor::new(tme.iter_optional_meta())
            .map_err(|e| format!("the table map's metadata does not decode: {e}"))?;
        let mut signedness = meta.iter_signedness();
        let n = tme.columns_count() as usize;
        let mut cols = Vec::with_capacity(n);
        for i in 0..n {
            let ty = match tme.get_column_type(i) {
                Ok(Some(t)) => t,
                Ok(None) => return Err(format!("the table map gives column {i} no type")),
                Err(e) => return Err(format!("the table map's column {i}: {e}")),
            };
            // Signedness is listed for the numeric columns, in order.
            let unsigned = ty.is_numeric_type() && signedness.next().unwrap_or(false);
            cols.push(ColLayout {
                ty,
                meta: tme.get_column_metadata(i).unwrap_or(&[]).to_vec(),
                unsigned,
            });
        }
        Ok(Layout { cols })
    }

    pub(crate) fn len(&self) -> usize {
        self.cols.len()
    }
}

/// A value of a row image.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell<'a> {
    /// As `mysql_common`'s `BinlogValue` parser reads it.
    Parsed(BinlogValue<'a>),
    /// A character or binary string (`CHAR`, `VARCHAR`, the `BLOB`s and
    /// `TEXT`s, `GEOMETRY`): the event's own bytes, not a copy of them.
    Bytes(&'a [u8]),
}

impl<'a> From<BinlogValue<'a>> for Cell<'a> {
    fn from(v: BinlogValue<'a>) -> Self {
        Cell::Parsed(v)
    }
}

/// One image: per table column, its value when the image holds it.
pub(crate) type Image<'a> = Vec<Option<Cell<'a>>>;

/// The rows of `re`: (before image, after image), each as the event type has
/// them. `before`/`after` say which columns each image holds.
pub(crate) struct Rows<'a> {
    layout: &'a Layout,
    buf: ParseBuf<'a>,
    before: Option<&'a [bool]>,
    after: Option<&'a [bool]>,
    partial: bool,
}

impl<'a> Rows<'a> {
    pub(crate) fn new(
        layout: &'a Layout,
        re: &'a RowsEventData<'a>,
        before: Option<&'a [bool]>,
        after: Option<&'a [bool]>,
    ) -> Result<Rows<'a>, String> {
        if re.num_columns() as usize != layout.len() {
            return Err(format!(
                "the rows event has {} columns and its table map {}",
                re.num_columns(),
                layout.len()
            ));
        }
        Ok(Rows {
            layout,
            buf: ParseBuf(re.rows_data()),
            before,
            after,
            partial: matches!(re, RowsEventData::PartialUpdateRowsEvent(_)),
        })
    }

    /// Reads the next row's images into `before` and `after` (emptied first;
    /// reused from row to row, so no allocation per row); says which the
    /// event holds, `None` after the last row.
    pub(crate) fn next_into(
        &mut self,
        before: &mut Image<'a>,
        after: &mut Image<'a>,
    ) -> Option<std::io::Result<(bool, bool)>> {
        if self.buf.is_empty() {
            return None;
        }
        before.clear();
        after.clear();
        let mut read = || {
            if let Some(p) = self.before {
                self.image(p, false, before)?;
            }
            if let Some(p) = self.after {
                self.image(p, self.partial, after)?;
            }
            Ok((self.before.is_some(), self.after.is_some()))
        };
        let r = read();
        if r.is_err() {
            // Nothing after a damaged row can be located.
            self.buf = ParseBuf(&[]);
        }
        Some(r)
    }

    fn image(
        &mut self,
        present: &[bool],
        shared: bool,
        out: &mut Image<'a>,
    ) -> std::io::Result<()> {
        let cols = &self.layout.cols;
        // JSON columns sent as diffs (partial updates only).
        let mut diffs: Option<&'a [u8]> = None;
        if shared {
            let options: RawInt<LenEnc> = self.buf.parse(())?;
            if *options & PARTIAL_JSON_UPDATES != 0 {
                let json = cols
                    .iter()
                    .filter(|c| c.ty == ColumnType::MYSQL_TYPE_JSON)
                    .count();
                diffs = Some(self.buf.parse(json.div_ceil(8))?);
            }
        }
        let n_present = present.iter().filter(|p| **p).count();
        let nulls: &'a [u8] = self.buf.parse(n_present.div_ceil(8))?;
        let (mut k, mut json_i) = (0usize, 0usize);
        for (i, c) in cols.iter().enumerate() {
            let is_partial = if c.ty == ColumnType::MYSQL_TYPE_JSON {
                let bit = diffs.is_some_and(|d| bit(d, json_i));
                json_i += 1;
                bit
            } else {
                false
            };
            if !present.get(i).copied().unwrap_or(false) {
                out.push(None);
                continue;
            }
            let null = if k < nulls.len() * 8 {
                bit(nulls, k)
            } else {
                true
            };
            k += 1;
            out.push(Some(if null {
                Cell::Parsed(BinlogValue::Value(mysql_async::Value::NULL))
            } else if c.ty == ColumnType::MYSQL_TYPE_TIME2 && matches!(c.meta.first(), Some(1 | 2))
            {
                Cell::Parsed(BinlogValue::Value(time2_short(&mut self.buf)?))
            } else if c.ty == ColumnType::MYSQL_TYPE_NEWDECIMAL {
                Cell::Parsed(BinlogValue::Value(mysql_async::Value::Bytes(decimal(
                    &mut self.buf,
                    &c.meta,
                )?)))
            } else if let Some(len_bytes) = string_length_bytes(c)? {
                let len: &'a [u8] = self.buf.parse(len_bytes)?;
                // Little-endian, 1 to 4 bytes.
                let n = len
                    .iter()
                    .rev()
                    .fold(0usize, |n, &b| (n << 8) | usize::from(b));
                Cell::Bytes(self.buf.parse(n)?)
            } else {
                Cell::Parsed(self.buf.parse::<BinlogValue<'a>>((
                    c.ty,
                    &c.meta[..],
                    c.unsigned,
                    is_partial,
                ))?)
            }));
        }
        Ok(())
    }
}

impl<'a> Iterator for Rows<'a> {
    type Item = std::io::Result<(Option<Image<'a>>, Option<Image<'a>>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let (mut before, mut after) = (Vec::new(), Vec::new());
        Some(
            self.next_into(&mut before, &mut after)?
                .map(|(b, a)| (b.then_some(before), a.then_some(after))),
        )
    }
}

/// Reads the rows of `re` with this reader and with `mysql_common`'s own
/// iterator and returns how many rows agree, or where they first differ
/// (`adapters/tests/mysql.rs` runs it over every rows event of a real binlog).
/// The two differ, by design, on negative `TIME(1)`/`TIME(2)` values.
#[doc(hidden)]
pub fn agree_with_mysql_common(
    re: &RowsEventData<'_>,
    tme: &TableMapEvent<'_>,
) -> Result<usize, String> {
    let layout = Layout::of(tme)?;
    let before = super::image::bools(re.columns_before_image());
    let after = super::image::bools(re.columns_after_image());
    let ours = Rows::new(&layout, re, before.as_deref(), after.as_deref())?;
    let theirs = re.rows(tme);
    let mut n = 0;
    for (i, (a, b)) in ours.zip(theirs).enumerate() {
        let a = a.map_err(|e| format!("row {i}: this reader: {e}"))?;
        let b = b.map_err(|e| format!("row {i}: mysql_common: {e}"))?;
        let same = |mine: Option<Image<'_>>,
                    row: Option<mysql_async::binlog::row::BinlogRow>,
                    present: Option<&[bool]>|
         -> Result<(), String> {
            let (Some(mine), Some(row), Some(present)) = (mine, row, present) else {
                return Ok(());
            };
            let mut j = 0;
            for (c, v) in mine.iter().enumerate() {
                let want = if present.get(c).copied().unwrap_or(false) {
                    j += 1;
                    row.as_ref(j - 1)
                } else {
                    None
                };
                let v = v.clone().map(|v| match v {
                    Cell::Parsed(p) => p,
                    Cell::Bytes(b) => BinlogValue::Value(mysql_async::Value::Bytes(b.to_vec())),
                });
                if v.as_ref() != want {
                    return Err(format!(
                        "row {i} column {c}: {v:?} here, {want:?} by mysql_common"
                    ));
                }
            }
            Ok(())
        };
        same(a.0, b.0, before.as_deref())?;
        same(a.1, b.1, after.as_deref())?;
        n += 1;
    }
    if n != re.rows(tme).count() {
        return Err(format!(
            "{n} rows here, {} by mysql_common",
            re.rows(tme).count()
        ));
    }
    Ok(n)
}

/// For a column of a string type, how many bytes its values' length takes,
/// read from its metadata as `mysql_common`'s `BinlogValue` parser reads it
/// (`binlog/value.rs`, whose values these are, borrowed instead of copied);
/// `None` for the other types.
fn string_length_bytes(c: &ColLayout) -> std::io::Result<Option<usize>> {
    use ColumnType::*;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let meta = |i: usize| {
        c.meta
            .get(i)
            .map(|b| usize::from(*b))
            .ok_or_else(|| bad("string column metadata too short"))
    };
    Ok(Some(match c.ty {
        MYSQL_TYPE_TINY_BLOB
        | MYSQL_TYPE_MEDIUM_BLOB
        | MYSQL_TYPE_LONG_BLOB
        | MYSQL_TYPE_BLOB
        | MYSQL_TYPE_GEOMETRY
        | MYSQL_TYPE_VECTOR => match meta(0)? {
            n @ 1..=4 => n,
            _ => return Err(bad("Unknown BLOB")),
        },
        MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING => {
            // The longest value.
            if (meta(0)? | (meta(1)? << 8)) < 256 {
                1
            } else {
                2
            }
        }
        MYSQL_TYPE_STRING => {
            // The longest value, with a long CHAR()'s high bits in byte 0.
            let longest = if meta(0)? >= 1 {
                let (b0, b1) = (meta(0)?, meta(1)?);
                if b0 & 0x30 != 0x30 {
                    b1 | (((b0 & 0x30) ^ 0x30) << 4)
                } else {
                    b1
                }
            } else {
                meta(0)? | (meta(1)? << 8)
            };
            if longest < 256 {
                1
            } else {
                2
            }
        }
        _ => return Ok(None),
    }))
}

/// A `TIME(1)` or `TIME(2)` value (`TIME2` with one byte of fraction).
/// `mysql_common` 0.37 reads a negative one wrongly: it takes the fraction's
/// complement in a `u32` (`my_time_packed_from_binary`), which wraps, so
/// `-01:00:00.5` came out as a positive time. MySQL's own reading
/// (`my_time_packed_from_binary` in `my_time.cc`): the integer part is 3
/// bytes big-endian less 0x800000, the fraction one byte of hundredths; a
/// negative value with a fraction stores `0x100 - fraction` and the integer
/// part one lower, for binary sort order.
fn time2_short(buf: &mut ParseBuf<'_>) -> std::io::Result<mysql_async::Value> {
    use mysql_common::binlog::misc::{my_packed_time_make, time_from_packed, TIMEF_INT_OFS};
    let b: &[u8] = buf.parse(4)?;
    let mut int = i64::from(u32::from_be_bytes([0, b[0], b[1], b[2]])) - TIMEF_INT_OFS;
    let mut frac = i64::from(b[3]);
    if int < 0 && frac > 0 {
        int += 1;
        frac -= 0x100;
    }
    Ok(time_from_packed(my_packed_time_make(int, frac * 10_000)))
}

/// Decimal digits per 4-byte group of a binary `DECIMAL`.
const DIG_PER_DEC: usize = 9;
/// Bytes holding a group of 0–9 digits.
const DIG_TO_BYTES: [usize; DIG_PER_DEC + 1] = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4];

/// A `DECIMAL(precision, scale)` value (`meta`: precision, scale) in the text
/// `mysql_common` renders it as (`Decimal::read_bin`, then `Display`): an
/// optional `-`, the integer part without leading zeros (`0` when there is
/// none), and exactly `scale` fraction digits. Read here because
/// `mysql_common` renders each 9-digit group through `format!`, a tenth of
/// the source's time on a table with one decimal column.
///
/// MySQL's binary form (`decimal2bin` in `decimal.c`): the integer digits,
/// then the fraction digits, in big-endian groups of nine digits in four
/// bytes, the group at the integer part's start and the one at the
/// fraction's end shorter ([`DIG_TO_BYTES`]); the first byte's top bit
/// flipped, and every byte inverted for a negative value.
fn decimal(buf: &mut ParseBuf<'_>, meta: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let (precision, scale) = match meta {
        [p, s, ..] if s <= p => (usize::from(*p), usize::from(*s)),
        _ => {
            return Err(bad(format!(
                "DECIMAL metadata {meta:?} is not a precision and scale"
            )))
        }
    };
    let intg = precision - scale;
    let (intg_full, prefix) = (intg / DIG_PER_DEC, intg % DIG_PER_DEC);
    let (frac_full, suffix) = (scale / DIG_PER_DEC, scale % DIG_PER_DEC);
    let size = (intg_full + frac_full) * 4 + DIG_TO_BYTES[prefix] + DIG_TO_BYTES[suffix];
    let raw: &[u8] = buf.parse(size)?;
    let Some(first) = raw.first() else {
        return Err(bad("a DECIMAL of no digits".into()));
    };
    // A positive value has the first byte's top bit set.
    let mask: u8 = if first & 0x80 != 0 { 0 } else { 0xff };
    let mut at = 0;
    let mut group = |len: usize| -> u32 {
        let mut v: u32 = 0;
        for (k, b) in raw[at..at + len].iter().enumerate() {
            let b = if at + k == 0 { b ^ 0x80 } else { *b };
            v = (v << 8) | u32::from(b ^ mask);
        }
        at += len;
        v
    };
    let mut out = String::with_capacity(precision + 2);
    if mask != 0 {
        out.push('-');
    }
    let mut itoa = itoa::Buffer::new();
    // The integer part, leading zero groups left out.
    let mut started = false;
    let groups = std::iter::once((prefix, DIG_TO_BYTES[prefix]))
        .filter(|(digits, _)| *digits > 0)
        .chain(std::iter::repeat_n((DIG_PER_DEC, 4), intg_full));
    for (_, len) in groups {
        let v = group(len);
        if started {
            padded(&mut out, v.into(), DIG_PER_DEC);
        } else if v != 0 {
            out.push_str(itoa.format(v));
            started = true;
        }
    }
    if !started {
        out.push('0');
    }
    if scale > 0 {
        out.push('.');
        for _ in 0..frac_full {
            let v = group(4);
            padded(&mut out, v.into(), DIG_PER_DEC);
        }
        if suffix > 0 {
            let v = group(DIG_TO_BYTES[suffix]);
            padded(&mut out, v.into(), suffix);
        }
    }
    if mask != 0 && !started && scale == 0 {
        // A negative zero without a fraction: mysql_common drops the sign.
        out.remove(0);
    }
    Ok(out.into_bytes())
}

/// Bit `i` of an LSB-first bitmap.
fn bit(bytes: &[u8], i: usize) -> bool {
    bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An event as a binlog holds it: the 19-byte v4 header, then `body`.
    fn event(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend(1_767_236_645u32.to_le_bytes()); // timestamp
        e.push(kind);
        e.extend(1u32.to_le_bytes()); // server id
        e.extend((19 + body.len() as u32).to_le_bytes());
        e.extend(0u32.to_le_bytes()); // next position
        e.extend(0u16.to_le_bytes()); // flags
        e.extend(body);
        e
    }

    /// MySQL 5.7/8.x write rows events of version 2 (`WRITE_ROWS_EVENT`, 30,
    /// with an extra-data field after the table id), MariaDB version 1: no
    /// live server here writes them. Built by hand as MySQL's `log_event.cc`
    /// lays them out (a table map of a `BIGINT`, a `VARCHAR(10)` of utf8mb4
    /// and a `JSON`, then one row, its JSON in MySQL's binary format), read by
    /// this reader and by `mysql_common`'s, which must agree, and rendered.
    #[test]
    fn a_mysql_v2_rows_event_is_read_and_rendered() {
        use super::super::schema::{Charset, Col, Kind};
        use mysql_async::binlog::events::EventData;
        use mysql_common::binlog::{consts::BinlogVersion, EventStreamReader};
        let table_id = [42u8, 0, 0, 0, 0, 0];
        let mut tm = table_id.to_vec();
        tm.extend([1, 0]); // flags
        tm.extend([4, b's', b'h', b'o', b'p', 0, 1, b't', 0]);
        tm.push(3); // columns
        tm.extend([0x08, 0x0f, 0xf5]); // LONGLONG, VARCHAR, JSON
        tm.extend([3, 40, 0, 4]); // metadata: VARCHAR max 40 bytes, JSON length in 4 bytes
        tm.push(0b110); // nullable: note, j
        #[rustfmt::skip]
        let json: &[u8] = &[
            0x00, 0x01, 0x00, 0x18, 0x00, 0x0b, 0x00, 0x01, 0x00, 0x02, 0x0c, 0x00, b'a',
            0x02, 0x00, 0x0c, 0x00, 0x05, 0x01, 0x00, 0x0c, 0x0a, 0x00, 0x01, b'x',
        ];
        let mut rows = table_id.to_vec();
        rows.extend([1, 0]); // flags: end of statement
        rows.extend([2, 0]); // extra data: its length field alone
        rows.push(3); // columns
        rows.push(0b111); // all present
        rows.push(0); // the row: nothing NULL
        rows.extend(7u64.to_le_bytes());
        let note = "沈阳".as_bytes();
        rows.push(note.len() as u8);
        rows.extend(note);
        rows.extend((json.len() as u32).to_le_bytes());
        rows.extend(json);

        let mut reader = EventStreamReader::new(BinlogVersion::Version4);
        let tm = event(19, &tm);
        let tme_event = reader.read(&tm[..]).unwrap().unwrap();
        let Ok(Some(EventData::TableMapEvent(tme))) = tme_event.read_data() else {
            panic!("not a table map: {tme_event:?}");
        };
        let rows = event(30, &rows);
        let rows_event = reader.read(&rows[..]).unwrap().unwrap();
        let Ok(Some(EventData::RowsEvent(re))) = rows_event.read_data() else {
            panic!("not a rows event: {rows_event:?}");
        };
        assert!(matches!(re, RowsEventData::WriteRowsEvent(_)), "{re:?}");
        assert_eq!(agree_with_mysql_common(&re, &tme), Ok(1));

        let layout = Layout::of(&tme).unwrap();
        let after = super::super::image::bools(re.columns_after_image());
        let mut reader = Rows::new(&layout, &re, None, after.as_deref()).unwrap();
        let (mut b, mut a) = (Vec::new(), Vec::new());
        assert!(matches!(
            reader.next_into(&mut b, &mut a),
            Some(Ok((false, true)))
        ));
        assert!(reader.next_into(&mut b, &mut a).is_none());
        let col = Col::named;
        let cols = [
            col(
                "id",
                Kind::Int {
                    bytes: 8,
                    unsigned: false,
                },
            ),
            col("note", Kind::Text(Charset::Utf8)),
            col("j", Kind::Json),
        ];
        let rendered: Vec<String> = cols
            .iter()
            .zip(a)
            .map(|(c, v)| {
                let (mut text, mut bytes) = (String::new(), Vec::new());
                super::super::values::render_cell(c, v.unwrap(), &mut text, &mut bytes).unwrap();
                text
            })
            .collect();
        assert_eq!(rendered, ["7", "沈阳", r#"{"a":[1,"x"]}"#]);
    }

    /// MySQL's own examples (`my_time.cc`): disk bytes → value.
    #[test]
    fn short_fraction_times_read_as_mysql_writes_them() {
        let read = |b: [u8; 4]| {
            let mut buf = ParseBuf(&b);
            time2_short(&mut buf).unwrap()
        };
        use mysql_async::Value::Time;
        // (disk bytes, value): 00:00:00.00, -00:00:00.01, -00:00:00.99,
        // -00:00:01.00, -00:00:01.01, -00:00:01.10
        let examples = [
            ([0x80, 0, 0, 0], Time(false, 0, 0, 0, 0, 0)),
            ([0x7f, 0xff, 0xff, 0xff], Time(true, 0, 0, 0, 0, 10_000)),
            ([0x7f, 0xff, 0xff, 0x9d], Time(true, 0, 0, 0, 0, 990_000)),
            ([0x7f, 0xff, 0xff, 0x00], Time(true, 0, 0, 0, 1, 0)),
            ([0x7f, 0xff, 0xfe, 0xff], Time(true, 0, 0, 0, 1, 10_000)),
            ([0x7f, 0xff, 0xfe, 0xf6], Time(true, 0, 0, 0, 1, 100_000)),
        ];
        for (bytes, want) in examples {
            assert_eq!(read(bytes), want, "{bytes:02x?}");
        }
        // 838:59:59.99 = 34 days 22 hours.
        let hms = (838 << 12) | (59 << 6) | 59;
        let [_, a, b, c] = (0x800000u32 + hms).to_be_bytes();
        assert_eq!(read([a, b, c, 99]), Time(false, 34, 22, 59, 59, 990_000));
    }

    /// Decimals read here render as `mysql_common`'s reader renders them,
    /// for every precision and scale MySQL allows (1–65, scale up to 30 and
    /// the precision), random values of every length and both signs, zero
    /// and negative zero.
    #[test]
    fn decimals_read_as_mysql_common_reads_them() {
        use mysql_common::binlog::decimal::Decimal;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut checked = 0;
        for precision in 1..=65usize {
            for scale in 0..=precision.min(30) {
                let intg = precision - scale;
                for case in 0..24 {
                    // The groups, integer part first, each (digits, bytes).
                    let mut groups = Vec::new();
                    if intg % DIG_PER_DEC > 0 {
                        groups.push(intg % DIG_PER_DEC);
                    }
                    groups.extend(std::iter::repeat_n(DIG_PER_DEC, intg / DIG_PER_DEC));
                    groups.extend(std::iter::repeat_n(DIG_PER_DEC, scale / DIG_PER_DEC));
                    if scale % DIG_PER_DEC > 0 {
                        groups.push(scale % DIG_PER_DEC);
                    }
                    let mut bytes = Vec::new();
                    for digits in groups {
                        // Zero, or a value of a random number of digits.
                        let v = match case {
                            0 | 1 => 0,
                            _ => {
                                let width = (next() % (digits as u64 + 1)) as u32;
                                (next() % 10u64.pow(width)) as u32
                            }
                        };
                        let len = DIG_TO_BYTES[digits];
                        bytes.extend_from_slice(&v.to_be_bytes()[4 - len..]);
                    }
                    let negative = case == 1 || (case > 1 && next() & 1 == 1);
                    if negative {
                        bytes.iter_mut().for_each(|b| *b = !*b);
                    }
                    bytes[0] ^= 0x80;
                    let want = Decimal::read_bin(&bytes[..], precision, scale, false)
                        .unwrap()
                        .to_string();
                    let mut buf = ParseBuf(&bytes);
                    let got = decimal(&mut buf, &[precision as u8, scale as u8]).unwrap();
                    assert!(buf.is_empty(), "DECIMAL({precision},{scale}) left bytes");
                    assert_eq!(
                        String::from_utf8(got).unwrap(),
                        want,
                        "DECIMAL({precision},{scale}) {bytes:02x?}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 20_000);
        // Metadata that is not a precision and scale is an error, not a panic.
        assert!(decimal(&mut ParseBuf(&[0x80]), &[2, 5]).is_err());
        assert!(decimal(&mut ParseBuf(&[0x80]), &[]).is_err());
        assert!(decimal(&mut ParseBuf(&[]), &[5, 2]).is_err());
    }

    #[test]
    fn bits_are_read_lsb_first() {
        let b = [0b0000_0101u8, 0b1000_0000];
        let got: Vec<bool> = (0..16).map(|i| bit(&b, i)).collect();
        let mut want = vec![false; 16];
        (want[0], want[2], want[15]) = (true, true, true);
        assert_eq!(got, want);
        assert!(!bit(&b, 16));
    }
}
