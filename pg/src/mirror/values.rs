//! Values as statements and `COPY` carry them: text for every type but
//! `bytea`, which travels as bytes.

use std::borrow::Cow;

use ferry_protocol::copy_text::{push_bytes, push_text};
use ferry_protocol::rows::Value;
use tokio_postgres::types::ToSql;

use super::schema::Table;
use super::MirrorError;

/// A statement parameter: one value, or one column of many rows.
pub(super) enum Param<'a> {
    Text(Option<&'a str>),
    Bytes(Option<Cow<'a, [u8]>>),
    Texts(Vec<Option<&'a str>>),
    Bytess(Vec<Option<Cow<'a, [u8]>>>),
}

impl<'a> Param<'a> {
    pub(super) fn scalar(t: &Table, c: usize, v: &'a Value) -> Result<Param<'a>, MirrorError> {
        Ok(if t.columns[c].bytea {
            Param::Bytes(bytes_of(t, c, v)?)
        } else {
            Param::Text(text_of(t, c, v)?)
        })
    }

    pub(super) fn column(
        t: &Table,
        c: usize,
        values: impl Iterator<Item = &'a Value>,
    ) -> Result<Param<'a>, MirrorError> {
        Ok(if t.columns[c].bytea {
            Param::Bytess(
                values
                    .map(|v| bytes_of(t, c, v))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            Param::Texts(values.map(|v| text_of(t, c, v)).collect::<Result<_, _>>()?)
        })
    }

    pub(super) fn refs<'p>(params: &'p [Param<'a>]) -> Vec<&'p (dyn ToSql + Sync)> {
        params
            .iter()
            .map(|p| -> &(dyn ToSql + Sync) {
                match p {
                    Param::Text(v) => v,
                    Param::Bytes(v) => v,
                    Param::Texts(v) => v,
                    Param::Bytess(v) => v,
                }
            })
            .collect()
    }
}

fn text_of<'a>(t: &Table, c: usize, v: &'a Value) -> Result<Option<&'a str>, MirrorError> {
    match v {
        Value::Text(s) => Ok(Some(s)),
        Value::Null | Value::Unchanged => Ok(None),
        Value::Bytes(_) => Err(t.bad_data(&format!(
            "bytes for the column {:?}, which is {}",
            t.columns[c].name, t.columns[c].ty
        ))),
    }
}

fn bytes_of<'a>(t: &Table, c: usize, v: &'a Value) -> Result<Option<Cow<'a, [u8]>>, MirrorError> {
    match v {
        Value::Bytes(b) => Ok(Some(Cow::Borrowed(b))),
        Value::Null | Value::Unchanged => Ok(None),
        Value::Text(s) => match bytea_text(s) {
            Some(b) => Ok(Some(Cow::Owned(b))),
            None => Err(t.bad_data(&format!(
                "the bytea column {:?} got text that is not bytea's text form",
                t.columns[c].name
            ))),
        },
    }
}

/// The bytes of bytea's text output: hex (`\x0aff`) or escape format (`a\012\\`).
fn bytea_text(s: &str) -> Option<Vec<u8>> {
    if let Some(hex) = s.strip_prefix("\\x") {
        let digits: Vec<u8> = hex
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| (b as char).to_digit(16).map(|d| d as u8))
            .collect::<Option<_>>()?;
        let pairs = digits.chunks_exact(2);
        if !pairs.remainder().is_empty() {
            return None;
        }
        return Some(pairs.map(|p| p[0] << 4 | p[1]).collect());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let oct = b.get(i + 1..i + 4)?;
            if !oct.iter().all(|d| (b'0'..=b'7').contains(d)) || oct[0] > b'3' {
                return None;
            }
            out.push(oct.iter().fold(0u8, |acc, d| (acc << 3) | (d - b'0')));
            i += 4;
        }
    }
    Some(out)
}

/// Appends a value as a field of COPY's text format.
pub(super) fn copy_field(
    buf: &mut Vec<u8>,
    t: &Table,
    c: usize,
    v: &Value,
) -> Result<(), MirrorError> {
    if t.columns[c].bytea {
        match bytes_of(t, c, v)? {
            None => push_text(buf, None),
            Some(b) => push_bytes(buf, &b),
        }
        return Ok(());
    }
    push_text(buf, text_of(t, c, v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::schema::test_table;
    use super::*;
    use ferry_protocol::copy_text::Fields;

    #[test]
    fn copy_fields_round_trip_through_the_copy_parser() {
        let t = test_table(vec![]);
        let mut buf = Vec::new();
        let note = "tab\there\nnew\\line\r";
        copy_field(&mut buf, &t, 0, &Value::Text("7".into())).unwrap();
        buf.push(b'\t');
        copy_field(&mut buf, &t, 1, &Value::Text(note.into())).unwrap();
        buf.push(b'\t');
        copy_field(&mut buf, &t, 2, &Value::Bytes(vec![0, 0xff, b'\\'])).unwrap();
        buf.push(b'\t');
        copy_field(&mut buf, &t, 1, &Value::Null).unwrap();
        let mut f = Fields::default();
        let line = f.split(&buf, 4).unwrap();
        assert_eq!(f.get(line, 0), Some("7"));
        assert_eq!(f.get(line, 1), Some(note));
        assert_eq!(f.get(line, 2), Some("\\x00ff5c"));
        assert_eq!(f.get(line, 3), None);
        // Bytes for a text column are bad data, named.
        let e = copy_field(&mut buf, &t, 1, &Value::Bytes(vec![1])).unwrap_err();
        assert!(e.to_string().contains("Note"), "{e}");
    }

    #[test]
    fn bytea_text_forms_decode() {
        assert_eq!(bytea_text("\\x00ff"), Some(vec![0, 255]));
        assert_eq!(bytea_text("\\x0"), None);
        assert_eq!(bytea_text("a\\000\\\\b"), Some(vec![b'a', 0, b'\\', b'b']));
        assert_eq!(bytea_text("\\9"), None);
    }
}
