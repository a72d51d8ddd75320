//! PostgreSQL's COPY text format, as `COPY ... TO STDOUT` writes it: one row per
//! line, fields separated by tabs, `\N` for NULL, backslash escapes for the
//! delimiter, newlines and backslashes. A field's text, once unescaped, is what
//! the type's output function wrote: the same text a simple query returns.
//!
//! The agent reads snapshot rows in this format and ships them in
//! [`Rows`] blocks as they came; [`check_block`] is what the exchange holds a
//! block to, and [`rows_of`] turns one back into the [`Row`]s it stands for
//! ([`block_rows`]: a [`RowBlock`] of protocol version 3 into its [`RowChange`]s).

use std::ops::Range;

use memchr::{memchr, memchr_iter};

use crate::messages::{
    column, field, Column, Field, Row, RowBlock, RowChange, RowOp, Rows, ValueType,
};

/// PostgreSQL's `bytea` type: its text output (`\x` + hex) travels as bytes.
pub const BYTEA_OID: u32 = 17;

/// Joins COPY data messages into complete lines. The server sends one row per
/// message, but the protocol does not promise it; rows split across messages
/// are carried over.
#[derive(Default)]
pub struct Lines {
    carry: Vec<u8>,
}

impl Lines {
    /// Calls `f` with every complete line (without its newline) of `chunk`, after
    /// whatever an earlier chunk left unfinished.
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rest = chunk;
        if !self.carry.is_empty() {
            let Some(nl) = memchr(b'\n', rest) else {
                self.carry.extend_from_slice(rest);
                return Ok(());
            };
            self.carry.extend_from_slice(&rest[..nl]);
            rest = &rest[nl + 1..];
            let line = std::mem::take(&mut self.carry);
            f(&line)?;
            self.carry = line;
            self.carry.clear();
        }
        while let Some(nl) = memchr(b'\n', rest) {
            f(&rest[..nl])?;
            rest = &rest[nl + 1..];
        }
        self.carry.extend_from_slice(rest);
        Ok(())
    }

    /// Bytes of an unfinished line, if the data ended inside one.
    pub fn unfinished(&self) -> usize {
        self.carry.len()
    }
}

/// Where a field's text is: in the line itself, or unescaped into scratch space.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Span {
    Null,
    Line(Range<usize>),
    Scratch(Range<usize>),
}

/// A malformed COPY line.
#[derive(Debug, PartialEq, Eq)]
pub enum CopyError {
    /// The line had this many fields, not the number asked for.
    Fields(usize),
    /// A field's text is not UTF-8 (field number, from 0).
    Utf8(usize),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Fields(n) => write!(f, "a COPY row has {n} fields"),
            CopyError::Utf8(i) => write!(f, "field {} of a COPY row is not UTF-8", i + 1),
        }
    }
}

/// The fields of one line; reused from line to line.
#[derive(Default)]
pub struct Fields {
    spans: Vec<Span>,
    scratch: Vec<u8>,
}

impl Fields {
    /// Splits `line` into exactly `n` fields, unescaping those that need it and
    /// checking that every one is UTF-8; returns the line as text, for [`get`].
    ///
    /// [`get`]: Fields::get
    pub fn split<'l>(&mut self, line: &'l [u8], n: usize) -> Result<&'l str, CopyError> {
        // Escapes are ASCII, so the raw line is UTF-8 exactly when every field
        // written unescaped is; what an escape stands for is checked below.
        let text = std::str::from_utf8(line).map_err(|e| {
            let bad = e.valid_up_to();
            CopyError::Utf8(line[..bad].iter().filter(|&&b| b == b'\t').count())
        })?;
        self.spans.clear();
        self.scratch.clear();
        let mut start = 0;
        loop {
            let end = memchr(b'\t', &line[start..]).map_or(line.len(), |i| start + i);
            let raw = &line[start..end];
            let span = if raw == b"\\N" {
                Span::Null
            } else if memchr(b'\\', raw).is_some() {
                let at = self.scratch.len();
                unescape(raw, &mut self.scratch);
                if std::str::from_utf8(&self.scratch[at..]).is_err() {
                    return Err(CopyError::Utf8(self.spans.len()));
                }
                Span::Scratch(at..self.scratch.len())
            } else {
                Span::Line(start..end)
            };
            self.spans.push(span);
            if end == line.len() {
                break;
            }
            start = end + 1;
        }
        if self.spans.len() != n {
            return Err(CopyError::Fields(self.spans.len()));
        }
        Ok(text)
    }

    /// Field `i` of the line last split (`line`, as `split` returned it): `None`
    /// for NULL.
    pub fn get<'a>(&'a self, line: &'a str, i: usize) -> Option<&'a str> {
        match self.spans.get(i)? {
            Span::Null => None,
            Span::Line(r) => line.get(r.clone()),
            // Checked by `split`; escaped fields are rare.
            Span::Scratch(r) => std::str::from_utf8(self.scratch.get(r.clone())?).ok(),
        }
    }
}

/// Appends the unescaped text of a raw field to `out`, as PostgreSQL's COPY FROM
/// reads it: `\b \f \n \r \t \v`, up to three octal digits, `\x` and one or two
/// hex digits, and a backslash before any other byte stands for that byte.
fn unescape(raw: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        i += 1;
        if c != b'\\' || i == raw.len() {
            out.push(c);
            continue;
        }
        let e = raw[i];
        i += 1;
        let byte = match e {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                (v & 0xff) as u8
            }
            b'x' => {
                let hex = |b: u8| (b as char).to_digit(16);
                match raw.get(i).copied().and_then(hex) {
                    None => b'x',
                    Some(h) => {
                        i += 1;
                        let mut v = h;
                        if let Some(l) = raw.get(i).copied().and_then(hex) {
                            v = v * 16 + l;
                            i += 1;
                        }
                        v as u8
                    }
                }
            }
            other => other,
        };
        out.push(byte);
    }
}

/// Checks the text of a [`RowBlock`]: exactly `rows` lines, each ending in `\n`
/// and holding `ncols` fields, every field UTF-8 once unescaped.
pub fn check_block(text: &str, ncols: usize, rows: u64) -> Result<(), String> {
    let bytes = text.as_bytes();
    if !bytes.is_empty() && bytes[bytes.len() - 1] != b'\n' {
        return Err("the last row does not end in a newline".into());
    }
    let mut fields = Fields::default();
    let mut n: u64 = 0;
    let mut start = 0;
    for end in memchr_iter(b'\n', bytes) {
        let line = &bytes[start..end];
        start = end + 1;
        let ok = if ncols == 0 {
            line.is_empty()
        } else if memchr(b'\\', line).is_none() {
            // Nothing escaped: the text is UTF-8 already; count the fields.
            memchr_iter(b'\t', line).count() + 1 == ncols
        } else {
            fields
                .split(line, ncols)
                .map_err(|e| format!("row {n} of the block: {e}"))?;
            true
        };
        if !ok {
            let got = if line.is_empty() {
                0
            } else {
                memchr_iter(b'\t', line).count() + 1
            };
            return Err(format!(
                "row {n} of the block has {got} fields, the block declares {ncols} columns"
            ));
        }
        n += 1;
    }
    if n != rows {
        return Err(format!("the block declares {rows} rows and holds {n}"));
    }
    Ok(())
}

/// Calls `row(i, values)` for every line of a block's COPY text, with each
/// field's unescaped text (`None` for NULL), after holding the text to
/// `ncols` fields and `rows` lines.
pub(crate) fn each_line(
    text: &str,
    ncols: usize,
    rows: u32,
    mut row: impl FnMut(usize, &mut dyn Iterator<Item = Option<&str>>),
) -> Result<(), String> {
    check_block(text, ncols, u64::from(rows))?;
    let mut fields = Fields::default();
    for (i, line) in text.split_terminator('\n').enumerate() {
        if ncols == 0 {
            row(i, &mut std::iter::empty());
            continue;
        }
        let line = fields
            .split(line.as_bytes(), ncols)
            .map_err(|e| format!("row {i} of the block: {e}"))?;
        row(i, &mut (0..ncols).map(|j| fields.get(line, j)));
    }
    Ok(())
}

/// The row changes a [`RowBlock`] stands for, in order (see its documentation).
pub fn block_rows(b: &RowBlock) -> Result<Vec<RowChange>, String> {
    let mut out = Vec::with_capacity(b.row_count as usize);
    each_line(&b.copy_text, b.columns.len(), b.row_count, |i, values| {
        let columns = b
            .columns
            .iter()
            .zip(values)
            .map(|(c, v)| Column {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                type_oid: c.type_oid,
                value: Some(match v {
                    None => column::Value::Null(true),
                    Some(v) => text_value(c.type_oid, v),
                }),
            })
            .collect();
        let index = b.first_index.saturating_add(i as u64);
        out.push(RowChange {
            schema: b.schema.clone(),
            table: b.table.clone(),
            op: RowOp::Insert as i32,
            xid: 0,
            commit_lsn: b.commit_lsn,
            commit_time_unix_us: 0,
            change_index: u32::try_from(index).unwrap_or(u32::MAX),
            last_in_txn: true,
            snapshot: true,
            columns,
            ..Default::default()
        });
    })?;
    Ok(out)
}

/// The [`Row`]s a [`Rows`] block stands for, in order (see its documentation).
pub fn rows_of(b: &Rows) -> Result<Vec<Row>, String> {
    let mut out = Vec::with_capacity(b.row_count as usize);
    each_line(&b.copy_text, b.columns.len(), b.row_count, |i, values| {
        let columns = b
            .columns
            .iter()
            .zip(values)
            .map(|(c, v)| Field {
                name: c.name.clone(),
                value_type: c.value_type,
                value: Some(match v {
                    None => field::Value::Null(true),
                    Some(v) => field_value(c.value_type, v),
                }),
            })
            .collect();
        let index = b.first_index.saturating_add(i as u64);
        out.push(Row {
            schema: b.schema.clone(),
            table: b.table.clone(),
            op: RowOp::Insert as i32,
            position: b.position.clone(),
            change_index: u32::try_from(index).unwrap_or(u32::MAX),
            last_in_txn: true,
            snapshot: true,
            columns,
            source: b.source.clone(),
            ..Default::default()
        });
    })?;
    Ok(out)
}

/// Where COPY text is written: bytes, or a `String` (every escape is ASCII,
/// so text written into a `String` stays UTF-8 without being checked again).
pub trait CopySink {
    fn put(&mut self, s: &str);
    /// One ASCII byte.
    fn put_ascii(&mut self, b: u8);
}

impl CopySink for Vec<u8> {
    fn put(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }
    fn put_ascii(&mut self, b: u8) {
        self.push(b);
    }
}

impl CopySink for String {
    fn put(&mut self, s: &str) {
        self.push_str(s);
    }
    fn put_ascii(&mut self, b: u8) {
        self.push(char::from(b));
    }
}

/// Appends `v` as one field of COPY text: `\N` for NULL, the text with
/// backslash, tab, newline and carriage return escaped (what [`Fields`] reads
/// back as `v`).
pub fn push_text(out: &mut impl CopySink, v: Option<&str>) {
    let Some(s) = v else {
        out.put("\\N");
        return;
    };
    // Most values hold nothing to escape: a pass without an early exit inside
    // each chunk, which the compiler turns into vector compares, then one copy
    // (the byte-by-byte loop below was a tenth of a snapshot's CPU).
    let special = |b: u8| matches!(b, b'\\' | b'\t' | b'\n' | b'\r');
    if !s
        .as_bytes()
        .chunks(64)
        .any(|c| c.iter().fold(false, |seen, &b| seen | special(b)))
    {
        out.put(s);
        return;
    }
    let mut from = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escaped = match byte {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => continue,
        };
        // Escapes are ASCII: `i` is a character boundary.
        out.put(&s[from..i]);
        out.put(escaped);
        from = i + 1;
    }
    out.put(&s[from..]);
}

/// Appends `b` as one field of COPY text in binary text output: `\x` + hex,
/// its backslash escaped (read back by [`field_value`] for a
/// [`ValueType::Bytes`] column).
pub fn push_bytes(out: &mut impl CopySink, b: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.put("\\\\x");
    for byte in b {
        out.put_ascii(HEX[usize::from(byte >> 4)]);
        out.put_ascii(HEX[usize::from(byte & 0xf)]);
    }
}

/// Binary text output: `\x` + an even number of hex digits, as its bytes.
fn hex_bytes(v: &str) -> Option<Vec<u8>> {
    v.strip_prefix("\\x").and_then(|h| hex::decode(h).ok())
}

/// A value from its text output, as both snapshot and streamed rows carry it:
/// `bytea` text output (`\x` + an even number of hex digits) as its bytes,
/// everything else as text.
pub fn text_value(type_oid: u32, v: &str) -> column::Value {
    if type_oid == BYTEA_OID {
        if let Some(b) = hex_bytes(v) {
            return column::Value::Bytes(b);
        }
    }
    column::Value::Text(v.to_string())
}

/// A [`Field`] value from its text form: a [`ValueType::Bytes`] value written
/// as `\x` + hex as its bytes, everything else as text.
pub fn field_value(value_type: i32, v: &str) -> field::Value {
    if value_type == ValueType::Bytes as i32 {
        if let Some(b) = hex_bytes(v) {
            return field::Value::Bytes(b);
        }
    }
    field::Value::Text(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &[u8], n: usize) -> Vec<Option<String>> {
        let mut f = Fields::default();
        let text = f.split(line, n).unwrap();
        (0..n).map(|i| f.get(text, i).map(str::to_string)).collect()
    }

    #[test]
    fn plain_null_and_escaped_fields() {
        assert_eq!(
            fields(b"1\t\\N\tabc\t", 4),
            vec![
                Some("1".into()),
                None,
                Some("abc".into()),
                Some(String::new())
            ]
        );
        assert_eq!(
            fields(b"a\\tb\\nc\\\\d\\re\\bf\\fg\\vh", 1),
            vec![Some("a\tb\nc\\d\re\u{8}f\u{c}g\u{b}h".into())]
        );
        // bytea's text output arrives with its backslash escaped.
        assert_eq!(fields(b"\\\\x00ff", 1), vec![Some("\\x00ff".into())]);
        // `\N` inside a longer field is not NULL; an escaped `\N` neither.
        assert_eq!(fields(b"\\\\N", 1), vec![Some("\\N".into())]);
        assert_eq!(fields(b"x\\N", 1), vec![Some("xN".into())]);
        assert_eq!(
            fields(b"\\101\\x42\\x4\\xz\\7", 1),
            vec![Some("AB\u{4}xz\u{7}".into())]
        );
        assert_eq!(
            fields("沈阳市\t\\N".as_bytes(), 2),
            vec![Some("沈阳市".into()), None]
        );
    }

    #[test]
    fn wrong_field_counts_and_bad_utf8_are_errors() {
        let mut f = Fields::default();
        assert_eq!(f.split(b"1\t2", 3).err(), Some(CopyError::Fields(2)));
        assert_eq!(f.split(b"1\t2\t3\t4", 3).err(), Some(CopyError::Fields(4)));
        assert_eq!(f.split(b"1\t\xff", 2).err(), Some(CopyError::Utf8(1)));
        assert_eq!(f.split(b"1\t2\t\\377", 3).err(), Some(CopyError::Utf8(2)));
    }

    fn col(name: &str, oid: u32) -> crate::messages::SchemaColumn {
        crate::messages::SchemaColumn {
            name: name.into(),
            type_name: if oid == BYTEA_OID { "bytea" } else { "text" }.into(),
            type_oid: oid,
            key: false,
        }
    }

    fn block(text: &str, rows: u32) -> RowBlock {
        RowBlock {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![col("id", 20), col("b", BYTEA_OID), col("note", 25)],
            commit_lsn: 7,
            first_index: 40,
            row_count: rows,
            copy_text: text.into(),
        }
    }

    #[test]
    fn a_block_stands_for_its_row_changes() {
        let b = block("1\t\\\\x00ff\ta\\tb\n2\t\\\\N\t\\N\n3\t\\\\xzz\t\n", 3);
        let rows = block_rows(&b).unwrap();
        assert_eq!(rows.len(), 3);
        let values: Vec<Vec<Option<column::Value>>> = rows
            .iter()
            .map(|r| r.columns.iter().map(|c| c.value.clone()).collect())
            .collect();
        let text = |s: &str| Some(column::Value::Text(s.into()));
        let null = Some(column::Value::Null(true));
        assert_eq!(
            values,
            vec![
                vec![
                    text("1"),
                    Some(column::Value::Bytes(vec![0, 255])),
                    text("a\tb")
                ],
                vec![text("2"), text("\\N"), null],
                // Not bytea hex: kept as the text it is.
                vec![text("3"), text("\\xzz"), text("")],
            ]
        );
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(
                (r.op, r.snapshot, r.last_in_txn, r.xid, r.commit_lsn),
                (RowOp::Insert as i32, true, true, 0, 7)
            );
            assert_eq!(r.change_index, 40 + i as u32);
            assert_eq!((r.schema.as_str(), r.table.as_str()), ("public", "t"));
            assert_eq!(r.columns[2].name, "note");
        }
    }

    #[test]
    fn malformed_blocks_are_refused_with_the_row() {
        let refused = |text: &str, rows: u32| check_block(text, 3, u64::from(rows)).unwrap_err();
        assert!(refused("1\ta\tb\n", 2).contains("declares 2 rows and holds 1"));
        assert!(refused("1\ta\tb\n2\ta\n", 2).contains("row 1 of the block has 2 fields"));
        assert!(refused("1\ta\tb\tc\n", 1).contains("row 0 of the block has 4 fields"));
        assert!(refused("1\ta\tb", 1).contains("newline"));
        // An escape that stands for a byte that is not UTF-8.
        assert!(refused("1\ta\t\\377\n", 1).contains("not UTF-8"));
        assert!(check_block("", 3, 0).is_ok());
        assert!(check_block("\n\n", 0, 2).is_ok());
        assert!(block_rows(&block("1\ta\n", 1)).is_err());
    }

    #[test]
    fn lines_split_across_messages_are_joined() {
        let data = b"1\ta\n2\tb\n3\tccc\n";
        for cut1 in 0..data.len() {
            for cut2 in cut1..data.len() {
                let mut l = Lines::default();
                let mut got: Vec<Vec<u8>> = Vec::new();
                for part in [&data[..cut1], &data[cut1..cut2], &data[cut2..]] {
                    l.feed::<()>(part, |line| {
                        got.push(line.to_vec());
                        Ok(())
                    })
                    .unwrap();
                }
                assert_eq!(
                    got,
                    vec![b"1\ta".to_vec(), b"2\tb".to_vec(), b"3\tccc".to_vec()],
                    "cuts at {cut1}, {cut2}"
                );
                assert_eq!(l.unfinished(), 0);
            }
        }
    }

    #[test]
    fn written_fields_read_back() {
        let mut line = Vec::new();
        push_text(&mut line, Some("a\tb\nc\\d\re"));
        line.push(b'\t');
        push_text(&mut line, None);
        line.push(b'\t');
        push_bytes(&mut line, &[0, 0xff]);
        line.push(b'\t');
        push_text(&mut line, Some("\\N"));
        assert_eq!(
            fields(&line, 4),
            vec![
                Some("a\tb\nc\\d\re".into()),
                None,
                Some("\\x00ff".into()),
                Some("\\N".into())
            ]
        );
        assert_eq!(
            field_value(ValueType::Bytes as i32, "\\x00ff"),
            field::Value::Bytes(vec![0, 0xff])
        );
    }

    proptest::proptest! {
        /// Whatever PostgreSQL's COPY TO escaping writes, the reader gives back.
        #[test]
        fn escaped_text_round_trips(values in proptest::collection::vec(
            // Longer than one 64-byte chunk of `push_text`'s first pass.
            proptest::option::of("[\\PC\t\n\r\\\\\u{8}\u{b}\u{c}]{0,150}"), 1..6)) {
            let mut line = Vec::new();
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    line.push(b'\t');
                }
                match v {
                    None => line.extend_from_slice(b"\\N"),
                    Some(s) => {
                        for &b in s.as_bytes() {
                            match b {
                                b'\\' => line.extend_from_slice(b"\\\\"),
                                b'\t' => line.extend_from_slice(b"\\t"),
                                b'\n' => line.extend_from_slice(b"\\n"),
                                b'\r' => line.extend_from_slice(b"\\r"),
                                0x08 => line.extend_from_slice(b"\\b"),
                                0x0b => line.extend_from_slice(b"\\v"),
                                0x0c => line.extend_from_slice(b"\\f"),
                                _ => line.push(b),
                            }
                        }
                    }
                }
            }
            proptest::prop_assert_eq!(fields(&line, values.len()), values);
        }
    }
}
