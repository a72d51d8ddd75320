//! The row images of a rows event, read straight from the event's bytes.
//!
//! `mysql_common`'s own row iterator builds, for every column of every row, a
//! `Column` with its database, table and column names copied into fresh
//! allocations, and parses the table map's optional metadata again for every
//! row; on a bulk load that was most of the source's time. This reader takes
//! what a value's decoding needs from the table map once ([`Layout`]) and
//! decodes each value with `mysql_common`'s own `BinlogValue` parser, borrowing
//! the event's bytes, so the values are exactly the ones its iterator yields.
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

/// One image: per table column, its value when the image holds it.
pub(crate) type Image<'a> = Vec<Option<BinlogValue<'a>>>;

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

    fn image(&mut self, present: &[bool], shared: bool) -> std::io::Result<Image<'a>> {
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
        let mut out = Vec::with_capacity(cols.len());
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
                BinlogValue::Value(mysql_async::Value::NULL)
            } else if c.ty == ColumnType::MYSQL_TYPE_TIME2 && matches!(c.meta.first(), Some(1 | 2))
            {
                BinlogValue::Value(time2_short(&mut self.buf)?)
            } else {
                self.buf
                    .parse::<BinlogValue<'a>>((c.ty, &c.meta[..], c.unsigned, is_partial))?
            }));
        }
        Ok(out)
    }
}

impl<'a> Iterator for Rows<'a> {
    type Item = std::io::Result<(Option<Image<'a>>, Option<Image<'a>>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let mut read = || {
            let before = match self.before {
                Some(p) => Some(self.image(p, false)?),
                None => None,
            };
            let after = match self.after {
                Some(p) => Some(self.image(p, self.partial)?),
                None => None,
            };
            Ok((before, after))
        };
        let r = read();
        if r.is_err() {
            // Nothing after a damaged row can be located.
            self.buf = ParseBuf(&[]);
        }
        Some(r)
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

/// Bit `i` of an LSB-first bitmap.
fn bit(bytes: &[u8], i: usize) -> bool {
    bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
