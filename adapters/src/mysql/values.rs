//! Binlog row values in MySQL's text rendering (see the module doc of
//! `mysql.rs` for each type's form).

use ferry_protocol::messages::field;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::Value;

use super::rows::Cell;
use super::schema::{Charset, Col, Kind};

/// How a rendered value travels: where [`render`] put it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    Null,
    /// Appended to the text.
    Text,
    /// Appended to the bytes: binary data, or character data that is not
    /// text in its column's character set (see `image::is_raw`).
    Bytes,
}

/// Renders a row image's value of `col` (see [`render`]).
pub(crate) fn render_cell(
    col: &Col,
    v: Cell<'_>,
    text: &mut String,
    bytes: &mut Vec<u8>,
) -> Result<Form, String> {
    match v {
        Cell::Bytes(b) => from_bytes(col, b, text, bytes),
        Cell::Parsed(v) => render(col, v, text, bytes),
    }
}

/// A value of `col` as it travels in a [`Field`](ferry_protocol::messages::Field).
pub(crate) fn decode(col: &Col, v: BinlogValue<'_>) -> Result<field::Value, String> {
    let (mut text, mut bytes) = (String::new(), Vec::new());
    Ok(match render(col, v, &mut text, &mut bytes)? {
        Form::Null => field::Value::Null(true),
        Form::Text => field::Value::Text(text),
        Form::Bytes => field::Value::Bytes(bytes),
    })
}

/// Renders a value of `col` onto the end of `text` or of `bytes`, without
/// an allocation of its own for the common types; says which (or NULL).
/// Rendering is most of what the source does per value: `itoa` and the
/// padded writers below instead of `format!`, which took a fifth of the
/// agent's time on a bulk load of dates and numbers.
pub(crate) fn render(
    col: &Col,
    v: BinlogValue<'_>,
    text: &mut String,
    bytes: &mut Vec<u8>,
) -> Result<Form, String> {
    let v = match v {
        BinlogValue::Value(v) => v,
        BinlogValue::Jsonb(_) => {
            return match Value::try_from(v) {
                Ok(Value::Bytes(b)) => {
                    text.push_str(&String::from_utf8_lossy(&b));
                    Ok(Form::Text)
                }
                Ok(Value::NULL) => Ok(Form::Null),
                Ok(other) => {
                    text.push_str(&other.as_sql(true));
                    Ok(Form::Text)
                }
                Err(e) => Err(format!(
                    "column {}: JSON value does not decode: {e}",
                    col.name
                )),
            };
        }
        BinlogValue::JsonDiff(_) => {
            return Err(format!(
                "column {}: a partial JSON update, which cannot be applied without the old value; \
                 set binlog_row_value_options = '' on the server",
                col.name
            ))
        }
    };
    let mut itoa = itoa::Buffer::new();
    match (v, &col.kind) {
        (Value::NULL, _) => return Ok(Form::Null),
        (Value::Int(i), Kind::Enum(m)) => text.push_str(member(m, i as u64)),
        (Value::Int(i), Kind::Timestamp(fsp)) => instant(text, i, 0, *fsp),
        (
            Value::Int(i),
            Kind::Int {
                bytes,
                unsigned: true,
            },
        ) if i < 0 && *bytes < 8 => {
            text.push_str(itoa.format(i + (1i64 << (8 * u32::from(*bytes)))));
        }
        (Value::Int(i), Kind::Int { unsigned: true, .. }) if i < 0 => {
            text.push_str(itoa.format(i as u64));
        }
        (Value::Int(i), _) => text.push_str(itoa.format(i)),
        (Value::UInt(u), _) => text.push_str(itoa.format(u)),
        (Value::Float(f), _) => text.push_str(&f.to_string()),
        (Value::Double(f), _) => text.push_str(&f.to_string()),
        (Value::Date(y, mo, d, ..), Kind::Date) => date(text, y.into(), mo, d),
        (Value::Date(y, mo, d, h, mi, s, us), kind) => {
            // A TIMESTAMP arrives as a date and time only from a query (the
            // snapshot's), in the session's time zone, which it sets to UTC.
            let (fsp, zone) = match kind {
                Kind::DateTime(f) => (*f, ""),
                Kind::Timestamp(f) => (*f, "+00"),
                _ => (0, ""),
            };
            date(text, y.into(), mo, d);
            text.push(' ');
            clock(text, h.into(), mi, s, us, fsp);
            text.push_str(zone);
        }
        (Value::Time(neg, days, h, mi, s, us), kind) => {
            let fsp = if let Kind::Time(f) = kind { *f } else { 0 };
            let hours = days * 24 + u32::from(h);
            if neg {
                text.push('-');
            }
            clock(text, hours, mi, s, us, fsp);
        }
        (Value::Bytes(b), _) => return from_bytes(col, &b, text, bytes),
    }
    Ok(Form::Text)
}

/// A value the server sent as bytes, rendered by its column's kind.
fn from_bytes(col: &Col, b: &[u8], text: &mut String, bytes: &mut Vec<u8>) -> Result<Form, String> {
    match &col.kind {
        // Bytes that are not text in the column's character set travel as
        // they are: never replaced, never dropped (see `image::raw_flags`).
        Kind::Text(cs) => {
            if !text_of(*cs, b, text) {
                bytes.extend_from_slice(b);
                return Ok(Form::Bytes);
            }
        }
        Kind::Json => text.push_str(&String::from_utf8_lossy(b)),
        Kind::Binary | Kind::OtherBytes => {
            bytes.extend_from_slice(b);
            return Ok(Form::Bytes);
        }
        Kind::Timestamp(fsp) => {
            // TIMESTAMP2 arrives as `seconds[.micros]` since the epoch.
            let s = String::from_utf8_lossy(b);
            let (sec, us) = match s.split_once('.') {
                Some((a, f)) => (a.parse().ok(), f.parse().ok()),
                None => (s.parse().ok(), Some(0)),
            };
            match (sec, us) {
                (Some(sec), Some(us)) => instant(text, sec, us, *fsp),
                _ => {
                    return Err(format!(
                        "column {}: TIMESTAMP {s:?} does not parse",
                        col.name
                    ))
                }
            }
        }
        Kind::Bit => text.push_str(
            itoa::Buffer::new()
                .format(b.iter().fold(0u128, |n, byte| (n << 8) | u128::from(*byte))),
        ),
        Kind::Set(m) => {
            let mut bits = 0u64;
            for (i, byte) in b.iter().take(8).enumerate() {
                bits |= u64::from(*byte) << (8 * i);
            }
            let names = m
                .iter()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .map(|(_, n)| n.as_str());
            for (k, n) in names.enumerate() {
                if k > 0 {
                    text.push(',');
                }
                text.push_str(n);
            }
        }
        // DECIMAL, YEAR, and what else mysql_common renders as text.
        _ => text.push_str(&String::from_utf8_lossy(b)),
    }
    Ok(Form::Text)
}

/// ENUM member `i` (1-based; 0 is the empty string MySQL stores for an
/// invalid value).
fn member(m: &[String], i: u64) -> &str {
    (i as usize)
        .checked_sub(1)
        .and_then(|i| m.get(i))
        .map_or("", String::as_str)
}

/// Appends `n` in decimal, zero-padded to `width` digits.
pub(crate) fn padded(out: &mut String, n: u64, width: usize) {
    let mut b = itoa::Buffer::new();
    let digits = b.format(n);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// Writes `n`'s last `buf.len()` decimal digits into `buf`, zero-padded.
fn digits(buf: &mut [u8], mut n: u32) {
    for b in buf.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Appends ASCII `buf` (digits and separators).
fn push_ascii(out: &mut String, buf: &[u8]) {
    out.push_str(std::str::from_utf8(buf).unwrap_or_default());
}

/// `YYYY-MM-DD`.
fn date(out: &mut String, y: i64, m: u8, d: u8) {
    if let (Ok(y @ 0..10_000), 0..100, 0..100) = (u32::try_from(y), m, d) {
        // Every date a server stores: written at once, not field by field.
        let mut b = *b"0000-00-00";
        digits(&mut b[0..4], y);
        digits(&mut b[5..7], m.into());
        digits(&mut b[8..10], d.into());
        return push_ascii(out, &b);
    }
    if y < 0 {
        out.push('-');
    }
    padded(out, y.unsigned_abs(), 4);
    out.push('-');
    padded(out, m.into(), 2);
    out.push('-');
    padded(out, d.into(), 2);
}

/// `HH:MM:SS[.f]`, with `fsp` digits of `micros`.
fn clock(out: &mut String, h: u32, mi: u8, s: u8, micros: u32, fsp: u8) {
    if let (0..100, 0..100, 0..100, 0..1_000_000) = (h, mi, s, micros) {
        let mut b = *b"00:00:00.000000";
        digits(&mut b[0..2], h);
        digits(&mut b[3..5], mi.into());
        digits(&mut b[6..8], s.into());
        // The first `fsp` of the six digits of `micros`.
        digits(&mut b[9..15], micros);
        let len = match fsp.min(6) {
            0 => 8,
            f => 9 + usize::from(f),
        };
        return push_ascii(out, &b[..len]);
    }
    padded(out, h.into(), 2);
    out.push(':');
    padded(out, mi.into(), 2);
    out.push(':');
    padded(out, s.into(), 2);
    if fsp > 0 {
        let fsp = u32::from(fsp.min(6));
        out.push('.');
        padded(out, (micros / 10u32.pow(6 - fsp)).into(), fsp as usize);
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS[.f]+00` (UTC).
fn instant(t: &mut String, secs: i64, micros: u32, fsp: u8) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    date(t, y, m as u8, d as u8);
    t.push(' ');
    clock(
        t,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u8,
        (rem % 60) as u8,
        micros,
        fsp,
    );
    t.push_str("+00");
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to a date.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Appends character data in `cs` to `out` as UTF-8; `false` (and `out` as
/// it was) when the bytes are not well formed in it.
fn text_of(cs: Charset, b: &[u8], out: &mut String) -> bool {
    match cs {
        Charset::Utf8 => match std::str::from_utf8(b) {
            Ok(t) => {
                out.push_str(t);
                true
            }
            Err(_) => false,
        },
        Charset::Other(enc) => {
            let mut decoder = enc.new_decoder_without_bom_handling();
            let Some(most) = decoder.max_utf8_buffer_length_without_replacement(b.len()) else {
                return false;
            };
            out.reserve(most);
            let was = out.len();
            let (result, _) = decoder.decode_to_string_without_replacement(b, out, true);
            let whole = matches!(result, encoding_rs::DecoderResult::InputEmpty);
            if !whole {
                out.truncate(was);
            }
            whole
        }
        Charset::Utf32 => {
            if !b.len().is_multiple_of(4) {
                return false;
            }
            let was = out.len();
            for c in b.chunks_exact(4) {
                match char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])) {
                    Some(ch) => out.push(ch),
                    None => {
                        out.truncate(was);
                        return false;
                    }
                }
            }
            true
        }
    }
}

/// A value the snapshot's query read, in the form the binlog carries it, so
/// that [`decode`] renders both alike: the query selects `ENUM` and `SET`
/// columns as `col+0`, their member number and bit set.
pub(crate) fn from_query(col: &Col, v: Value) -> Value {
    if !matches!(col.kind, Kind::Enum(_) | Kind::Set(_)) {
        // Every other column as the query returned it, without a UTF-8 pass
        // and a number parse of its bytes.
        return v;
    }
    let n = match v {
        Value::Int(i) => i as u64,
        Value::UInt(u) => u,
        // `col+0` arrives as DOUBLE on some servers.
        Value::Double(f) if f >= 0.0 => f as u64,
        Value::Bytes(ref b) => match std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()) {
            Some(n) => n,
            None => return v,
        },
        other => return other,
    };
    match col.kind {
        Kind::Enum(_) => Value::Int(n as i64),
        Kind::Set(_) => Value::Bytes(n.to_le_bytes().to_vec()),
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn col(kind: Kind) -> Col {
        Col::named("c", kind)
    }

    fn t(kind: Kind, v: Value) -> String {
        match decode(&col(kind), BinlogValue::Value(v)).unwrap() {
            field::Value::Text(s) => s,
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        /// The hand-written renderers write what `format!` wrote.
        #[test]
        fn dates_and_clocks_render_as_format_did(
            y in 0u16..=u16::MAX, mo in 0u8..=u8::MAX, d in 0u8..=u8::MAX, h in 0u32..900,
            mi in 0u8..60, s in 0u8..60, us in 0u32..1_000_000, fsp in 0u8..7,
            secs in 0i64..8_000_000_000,
        ) {
            let frac = if fsp == 0 { String::new() } else {
                format!(".{}", &format!("{us:06}")[..usize::from(fsp)])
            };
            let mut t = String::new();
            date(&mut t, y.into(), mo, d);
            t.push(' ');
            clock(&mut t, h, mi, s, us, fsp);
            proptest::prop_assert_eq!(t, format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}{frac}"));
            let (dy, dm, dd) = civil_from_days(secs.div_euclid(86_400));
            let rem = secs.rem_euclid(86_400);
            proptest::prop_assert_eq!(
                { let mut t = String::new(); instant(&mut t, secs, us, fsp); t },
                format!("{dy:04}-{dm:02}-{dd:02} {:02}:{:02}:{:02}{frac}+00", rem / 3600, rem % 3600 / 60, rem % 60)
            );
        }
    }

    /// MySQL 5.7+ writes a JSON column to the binlog in its binary JSON
    /// format (MariaDB writes JSON as text, so no live server here sends it):
    /// the value below is `{"a":[1,"x"]}` encoded by hand as MySQL's
    /// `json_binary.h` lays it out, read as the binlog reader reads a JSON
    /// column, and rendered as JSON text.
    #[test]
    fn mysql_binary_json_renders_as_json_text() {
        #[rustfmt::skip]
        let bytes: &[u8] = &[
            0x00, // small object
            0x01, 0x00, 0x18, 0x00, // 1 member, 24 bytes
            0x0b, 0x00, 0x01, 0x00, // key at offset 11, 1 byte
            0x02, 0x0c, 0x00, // value: a small array at offset 12
            b'a',
            // the array: 2 elements, 12 bytes
            0x02, 0x00, 0x0c, 0x00,
            0x05, 0x01, 0x00, // int16 1, inlined
            0x0c, 0x0a, 0x00, // a string at offset 10
            0x01, b'x',
        ];
        let v: mysql_async::binlog::jsonb::Value<'_> =
            mysql_common::io::ParseBuf(bytes).parse(()).unwrap();
        match decode(&col(Kind::Json), BinlogValue::Jsonb(v)).unwrap() {
            field::Value::Text(s) => assert_eq!(s, r#"{"a":[1,"x"]}"#),
            other => panic!("{other:?}"),
        }
        // A cut value is refused, by the reader or the renderer: never
        // rendered as a guess.
        let rendered = mysql_common::io::ParseBuf(&bytes[..10])
            .parse::<mysql_async::binlog::jsonb::Value<'_>>(())
            .map_err(|e| e.to_string())
            .and_then(|v| decode(&col(Kind::Json), BinlogValue::Jsonb(v)));
        assert!(rendered.is_err(), "{rendered:?}");
    }

    #[test]
    fn values_render_as_mysql_does() {
        assert_eq!(
            t(Kind::DateTime(3), Value::Date(2026, 1, 2, 3, 4, 5, 678_000)),
            "2026-01-02 03:04:05.678"
        );
        assert_eq!(
            t(Kind::DateTime(0), Value::Date(2026, 1, 2, 3, 4, 5, 0)),
            "2026-01-02 03:04:05"
        );
        assert_eq!(
            t(Kind::Date, Value::Date(2026, 1, 2, 0, 0, 0, 0)),
            "2026-01-02"
        );
        assert_eq!(
            t(Kind::Time(0), Value::Time(true, 1, 2, 3, 4, 0)),
            "-26:03:04"
        );
        assert_eq!(
            t(
                Kind::Timestamp(2),
                Value::Bytes(b"1767236645.120000".to_vec())
            ),
            "2026-01-01 03:04:05.12+00"
        );
        assert_eq!(
            t(
                Kind::Int {
                    bytes: 1,
                    unsigned: true
                },
                Value::Int(-1)
            ),
            "255"
        );
        assert_eq!(
            t(Kind::Enum(vec!["a".into(), "b".into()]), Value::Int(2)),
            "b"
        );
        assert_eq!(
            t(
                Kind::Set(vec!["a".into(), "b".into(), "c".into()]),
                Value::Bytes(vec![5])
            ),
            "a,c"
        );
        assert_eq!(t(Kind::Bit, Value::Bytes(vec![1, 2])), "258");
        assert_eq!(
            t(
                Kind::Text(Charset::Other(encoding_rs::GB18030)),
                Value::Bytes(vec![0xc9, 0xf2, 0xd1, 0xf4, 0xca, 0xd0])
            ),
            "沈阳市"
        );
        assert_eq!(
            t(
                Kind::Text(Charset::Other(encoding_rs::WINDOWS_1252)),
                Value::Bytes(vec![0x80])
            ),
            "€"
        );
        // What a query returns: a TIMESTAMP in the session's zone (UTC).
        assert_eq!(
            t(
                Kind::Timestamp(2),
                Value::Date(2026, 1, 1, 3, 4, 5, 120_000)
            ),
            "2026-01-01 03:04:05.12+00"
        );
        let set = col(Kind::Set(vec!["a".into(), "b".into(), "c".into()]));
        match decode(&set, BinlogValue::Value(from_query(&set, Value::UInt(5)))).unwrap() {
            field::Value::Text(s) => assert_eq!(s, "a,c"),
            other => panic!("{other:?}"),
        }
        let e = col(Kind::Enum(vec!["a".into(), "b".into()]));
        match decode(&e, BinlogValue::Value(from_query(&e, Value::UInt(2)))).unwrap() {
            field::Value::Text(s) => assert_eq!(s, "b"),
            other => panic!("{other:?}"),
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // Bytes that are not text in the column's character set stay bytes.
        for (cs, bad) in [
            (Charset::Utf8, vec![b'a', 0xff]),
            (Charset::Other(encoding_rs::GB18030), vec![0x81, 0x20]),
            (Charset::Utf32, vec![0, 0x11, 0, 0]),
        ] {
            assert_eq!(
                decode(
                    &col(Kind::Text(cs)),
                    BinlogValue::Value(Value::Bytes(bad.clone()))
                )
                .unwrap(),
                field::Value::Bytes(bad)
            );
        }
        assert!(matches!(
            decode(
                &col(Kind::Binary),
                BinlogValue::Value(Value::Bytes(vec![0, 1]))
            )
            .unwrap(),
            field::Value::Bytes(_)
        ));
    }
}
