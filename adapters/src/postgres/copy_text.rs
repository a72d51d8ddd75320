//! PostgreSQL's COPY text format, as `COPY ... TO STDOUT` writes it: one row per
//! line, fields separated by tabs, `\N` for NULL, backslash escapes for the
//! delimiter, newlines and backslashes. A field's text, once unescaped, is what
//! the type's output function wrote: the same text a simple query returns.

use std::ops::Range;

use memchr::memchr;

/// Joins COPY data messages into complete lines. The server sends one row per
/// message, but the protocol does not promise it; rows split across messages
/// are carried over.
#[derive(Default)]
pub(crate) struct Lines {
    carry: Vec<u8>,
}

impl Lines {
    /// Calls `f` with every complete line (without its newline) of `chunk`, after
    /// whatever an earlier chunk left unfinished.
    pub(crate) fn feed<E>(
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
    pub(crate) fn unfinished(&self) -> usize {
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
pub(crate) enum CopyError {
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
pub(crate) struct Fields {
    spans: Vec<Span>,
    scratch: Vec<u8>,
}

impl Fields {
    /// Splits `line` into exactly `n` fields, unescaping those that need it and
    /// checking that every one is UTF-8; returns the line as text, for [`get`].
    ///
    /// [`get`]: Fields::get
    pub(crate) fn split<'l>(&mut self, line: &'l [u8], n: usize) -> Result<&'l str, CopyError> {
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
    pub(crate) fn get<'a>(&'a self, line: &'a str, i: usize) -> Option<&'a str> {
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

    proptest::proptest! {
        /// Whatever PostgreSQL's COPY TO escaping writes, the reader gives back.
        #[test]
        fn escaped_text_round_trips(values in proptest::collection::vec(
            proptest::option::of("[\\PC\t\n\r\\\\\u{8}\u{b}\u{c}]{0,12}"), 1..6)) {
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
