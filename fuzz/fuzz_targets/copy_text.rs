//! PostgreSQL's COPY text format (`ferry_protocol::copy_text`) on arbitrary input:
//! `Lines::feed` (lines split across messages), `Fields::split`/`get` (fields,
//! NULL, unescaping), `check_block` (what the exchange holds a `RowBlock` to),
//! `block_rows` and `text_value`.
//!
//! Besides never panicking:
//! * `Lines` gives the same lines however the data is cut, and keeps the rest;
//! * `split` is consistent with the line (field count, NULL, unescaped fields
//!   verbatim) and its errors name a real field;
//! * escaping values as `COPY TO` does (or with any of the other escapes COPY FROM
//!   reads: octal, hex, a backslash before a plain character) and splitting gives
//!   the values back;
//! * `check_block` accepts exactly the texts whose lines each split into the
//!   declared columns, with the declared row count;
//! * `block_rows` succeeds exactly when `check_block` does, with one `RowChange`
//!   per row as `RowBlock`'s doc describes it.
#![no_main]

use arbitrary::Arbitrary;
use ferry_protocol::copy_text::{
    block_rows, check_block, text_value, CopyError, Fields, Lines, BYTEA_OID,
};
use ferry_protocol::messages::{column, RowBlock, RowOp, SchemaColumn};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Escape {
    /// As `COPY TO` writes it: only the special characters escaped.
    Copy,
    /// Three octal digits.
    Octal,
    /// `\x` and two hex digits.
    Hex,
    /// A backslash before the character (plain characters other than the escape letters).
    Backslash,
}

#[derive(Arbitrary, Debug)]
enum Mode {
    Lines {
        cuts: Vec<u16>,
        data: Vec<u8>,
    },
    Split {
        n: u8,
        line: Vec<u8>,
    },
    RoundTrip {
        values: Vec<Option<String>>,
        escapes: Vec<Escape>,
    },
    Block {
        /// `None`: the field count of the first line.
        ncols: Option<u8>,
        /// `None`: the number of newlines.
        rows: Option<u64>,
        text: String,
    },
    BlockRows {
        columns: Vec<(String, bool)>,
        /// `None`: the number of newlines.
        row_count: Option<u32>,
        first_index: u64,
        commit_lsn: u64,
        text: String,
    },
    TextValue {
        bytea: bool,
        v: String,
    },
}

fn lines(cuts: &[u16], data: &[u8]) {
    let mut l = Lines::default();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut at = 0;
    let mut pieces: Vec<usize> = cuts
        .iter()
        .map(|&c| {
            let n = usize::from(c) % (data.len() - at + 1);
            at += n;
            n
        })
        .collect();
    pieces.push(data.len() - at);
    let mut at = 0;
    for n in pieces {
        l.feed::<()>(&data[at..at + n], |line| {
            assert!(!line.contains(&b'\n'));
            got.push(line.to_vec());
            Ok(())
        })
        .expect("the callback never fails");
        at += n;
    }
    let mut want: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let rest = want.pop().expect("split gives at least one part");
    assert_eq!(got, want, "lines differ with cuts {cuts:?}");
    assert_eq!(l.unfinished(), rest.len());

    // A failing callback stops the feed at that line and returns its error.
    let mut l = Lines::default();
    let mut seen = 0;
    let stop = want.len() / 2;
    let r = l.feed(data, |_| {
        if seen == stop {
            return Err(seen);
        }
        seen += 1;
        Ok(())
    });
    if stop < want.len() {
        assert_eq!(r, Err(stop));
    } else {
        assert_eq!(r, Ok(()));
    }
}

fn split(line: &[u8], n: usize) {
    let mut f = Fields::default();
    let raw: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
    match f.split(line, n) {
        Ok(text) => {
            assert_eq!(text.as_bytes(), line);
            assert_eq!(raw.len(), n);
            for (i, r) in raw.iter().enumerate() {
                let got = f.get(text, i);
                if *r == b"\\N" {
                    assert_eq!(got, None, "field {i}");
                } else {
                    let got = got.unwrap_or_else(|| panic!("field {i} is NULL"));
                    if !r.contains(&b'\\') {
                        assert_eq!(got.as_bytes(), *r, "field {i}");
                    } else {
                        // Unescaping never makes a field longer.
                        assert!(got.len() <= r.len(), "field {i}");
                    }
                }
            }
            assert_eq!(f.get(text, n), None);
        }
        Err(CopyError::Fields(k)) => {
            assert_eq!(k, raw.len());
            assert_ne!(k, n);
            assert!(std::str::from_utf8(line).is_ok());
        }
        Err(CopyError::Utf8(i)) => assert!(i < raw.len(), "field {i} of {}", raw.len()),
    }
}

fn push_escaped(v: &str, esc: &mut dyn Iterator<Item = &Escape>, line: &mut Vec<u8>) {
    let mut buf = [0u8; 4];
    for c in v.chars() {
        let bytes = c.encode_utf8(&mut buf).as_bytes();
        let special = matches!(c, '\\' | '\t' | '\n' | '\r' | '\u{8}' | '\u{b}' | '\u{c}');
        // Every byte of a character escaped, or none: the raw line stays UTF-8.
        match esc.next().unwrap_or(&Escape::Copy) {
            Escape::Octal => {
                for b in bytes {
                    line.extend_from_slice(format!("\\{b:03o}").as_bytes());
                }
            }
            Escape::Hex => {
                for b in bytes {
                    line.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                }
            }
            // `\N` alone would be NULL; the letters and digits start other escapes.
            Escape::Backslash if !special && !"bfnrtvxN01234567".contains(c) => {
                line.push(b'\\');
                line.extend_from_slice(bytes);
            }
            _ => match c {
                '\\' => line.extend_from_slice(b"\\\\"),
                '\t' => line.extend_from_slice(b"\\t"),
                '\n' => line.extend_from_slice(b"\\n"),
                '\r' => line.extend_from_slice(b"\\r"),
                '\u{8}' => line.extend_from_slice(b"\\b"),
                '\u{b}' => line.extend_from_slice(b"\\v"),
                '\u{c}' => line.extend_from_slice(b"\\f"),
                _ => line.extend_from_slice(bytes),
            },
        }
    }
}

fn round_trip(values: &[Option<String>], escapes: &[Escape]) {
    if values.is_empty() {
        return;
    }
    let mut esc = escapes.iter();
    let mut line = Vec::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            line.push(b'\t');
        }
        match v {
            None => line.extend_from_slice(b"\\N"),
            Some(s) => push_escaped(s, &mut esc, &mut line),
        }
    }
    let mut f = Fields::default();
    let text = f.split(&line, values.len()).unwrap_or_else(|e| {
        panic!(
            "escaped line {:?} does not split: {e}",
            String::from_utf8_lossy(&line)
        )
    });
    let got: Vec<Option<String>> = (0..values.len())
        .map(|i| f.get(text, i).map(str::to_string))
        .collect();
    assert_eq!(got, values, "line {:?}", String::from_utf8_lossy(&line));
}

/// What `check_block` must say, from `Fields::split` line by line.
fn block_verdict(text: &str, ncols: usize, rows: u64) -> bool {
    if !text.is_empty() && !text.ends_with('\n') {
        return false;
    }
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    if lines.len() as u64 != rows {
        return false;
    }
    let mut f = Fields::default();
    lines.iter().all(|l| {
        if ncols == 0 {
            l.is_empty()
        } else {
            f.split(l.as_bytes(), ncols).is_ok()
        }
    })
}

fn newlines(text: &str) -> u64 {
    text.bytes().filter(|&b| b == b'\n').count() as u64
}

fn block(ncols: Option<u8>, rows: Option<u64>, text: &str) {
    let ncols = ncols.map_or_else(
        || text.split('\n').next().map_or(1, |l| l.split('\t').count()),
        usize::from,
    );
    let rows = rows.unwrap_or_else(|| newlines(text));
    let got = check_block(text, ncols, rows);
    assert_eq!(
        got.is_ok(),
        block_verdict(text, ncols, rows),
        "check_block({text:?}, {ncols}, {rows}) = {got:?}"
    );
}

fn rows_of_block(
    columns: &[(String, bool)],
    row_count: Option<u32>,
    first_index: u64,
    commit_lsn: u64,
    text: &str,
) {
    let b = RowBlock {
        schema: "public".into(),
        table: "t".into(),
        columns: columns
            .iter()
            .map(|(name, bytea)| SchemaColumn {
                name: name.clone(),
                type_name: if *bytea { "bytea" } else { "text" }.into(),
                type_oid: if *bytea { BYTEA_OID } else { 25 },
                key: false,
            })
            .collect(),
        commit_lsn,
        first_index,
        row_count: row_count.unwrap_or(newlines(text).min(u64::from(u32::MAX)) as u32),
        copy_text: text.to_string(),
    };
    let checked = check_block(&b.copy_text, b.columns.len(), u64::from(b.row_count));
    let rows = match block_rows(&b) {
        Ok(rows) => rows,
        Err(e) => {
            assert!(checked.is_err(), "block_rows refuses a checked block: {e}");
            return;
        }
    };
    assert!(
        checked.is_ok(),
        "block_rows accepts a block check_block refuses"
    );
    assert_eq!(rows.len(), b.row_count as usize);
    let mut f = Fields::default();
    for (i, (r, line)) in rows.iter().zip(text.split_terminator('\n')).enumerate() {
        assert_eq!((r.schema.as_str(), r.table.as_str()), ("public", "t"));
        assert_eq!(
            (r.op, r.xid, r.commit_lsn, r.snapshot, r.last_in_txn),
            (RowOp::Insert as i32, 0, commit_lsn, true, true)
        );
        let index = first_index.saturating_add(i as u64);
        assert_eq!(u64::from(r.change_index), index.min(u64::from(u32::MAX)));
        assert_eq!(r.columns.len(), b.columns.len());
        if b.columns.is_empty() {
            continue;
        }
        let line = f.split(line.as_bytes(), b.columns.len()).expect("checked");
        for (j, (c, sc)) in r.columns.iter().zip(&b.columns).enumerate() {
            assert_eq!(
                (&c.name, &c.type_name, c.type_oid),
                (&sc.name, &sc.type_name, sc.type_oid)
            );
            let want = match f.get(line, j) {
                None => column::Value::Null(true),
                Some(v) => text_value(sc.type_oid, v),
            };
            assert_eq!(c.value.as_ref(), Some(&want), "row {i} column {j}");
        }
    }
}

fn value(bytea: bool, v: &str) {
    let oid = if bytea { BYTEA_OID } else { 25 };
    match text_value(oid, v) {
        column::Value::Bytes(b) => {
            assert!(bytea);
            let hex = v
                .strip_prefix("\\x")
                .expect("bytea text output starts with \\x");
            assert_eq!(hex.len(), 2 * b.len());
            let again: String = b.iter().map(|x| format!("{x:02x}")).collect();
            assert_eq!(again, hex.to_ascii_lowercase());
        }
        column::Value::Text(t) => {
            assert_eq!(t, v);
            if bytea {
                let hex = v.strip_prefix("\\x");
                assert!(
                    hex.is_none_or(
                        |h| h.len() % 2 == 1 || !h.bytes().all(|c| c.is_ascii_hexdigit())
                    ),
                    "bytea hex {v:?} kept as text"
                );
            }
        }
        other => panic!("text_value gave {other:?}"),
    }
}

fuzz_target!(|mode: Mode| {
    match mode {
        Mode::Lines { cuts, data } => lines(&cuts, &data),
        Mode::Split { n, line } => split(&line, usize::from(n)),
        Mode::RoundTrip { values, escapes } => round_trip(&values, &escapes),
        Mode::Block { ncols, rows, text } => block(ncols, rows, &text),
        Mode::BlockRows {
            columns,
            row_count,
            first_index,
            commit_lsn,
            text,
        } => rows_of_block(&columns, row_count, first_index, commit_lsn, &text),
        Mode::TextValue { bytea, v } => value(bytea, &v),
    }
});
