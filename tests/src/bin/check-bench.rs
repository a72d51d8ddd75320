//! `check-bench`: what the exchange spends on one received snapshot piece,
//! next to the part of it nothing can avoid (decompressing it).
//!
//! ```text
//! cargo build --release --bins && target/release/check-bench --rounds 9
//! ```
//!
//! The piece is what `mysql-bench`'s snapshot sends: one `Rows` record of
//! 45,000 rows of its table (a `BIGINT` key, a `Größe-<md5>-€` text, a GBK
//! `上海<n>`, a `DECIMAL(20,4)`, a `DATETIME(6)`) as COPY text, about 4.6 MB,
//! zstd level 1 as the agent compresses it. Per round, each of
//!
//! * **decompress**: zstd alone, into a buffer of the declared size;
//! * **check**: `check_batch`, the exchange's check before it stores a batch
//!   as it arrived (decompress, walk the protobuf, UTF-8 and the COPY text's
//!   rows and fields);
//! * **decode**: `decode_batch`, a full prost decode, as a consumer reads it;
//!
//! runs 20 times; the report gives the median round's MB/s (uncompressed bytes)
//! and every round.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_protocol::batch::{check_batch, decode_batch, encode_buf};
use ferry_protocol::messages::{record, Batch, Record, Rows, TableColumn};
use ferry_protocol::record_buf::RecordBuf;

const ROWS: u64 = 45_000;
const PER_ROUND: u32 = 20;

fn piece() -> Batch {
    let mut text = String::new();
    for seq in 100_001..100_001 + ROWS {
        // Stands in for MD5(seq): 32 hex digits that differ row to row.
        let h = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let _ = writeln!(
            text,
            "{seq}\tGröße-{h:016x}{:016x}-€\t上海{seq}\t{}.{:04}\t2026-12-06 08:00:00.{:06}",
            h.rotate_left(7),
            seq * 12_345 / 70_000,
            seq % 10_000,
            seq % 1_000_000
        );
    }
    let columns = ["id", "payload", "name_gbk", "amount", "ts"]
        .iter()
        .map(|n| TableColumn {
            name: n.to_string(),
            key: *n == "id",
            ..Default::default()
        })
        .collect();
    let rec = Record {
        time_unix_ms: 1,
        position: format!("snapshot shop.t #0-{}", ROWS - 1),
        body: Some(record::Body::Rows(Rows {
            schema: "shop".into(),
            table: "t".into(),
            columns,
            position: b"binlog.000002:4".to_vec(),
            first_index: 0,
            row_count: ROWS as u32,
            copy_text: text,
            source: "mysql".into(),
        })),
    };
    let mut buf = RecordBuf::new();
    buf.push(&rec);
    encode_buf(&buf).unwrap().into_batch("t".into(), 1)
}

/// Seconds per call of `f`, one round.
fn round(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..PER_ROUND {
        f();
    }
    t.elapsed().as_secs_f64() / f64::from(PER_ROUND)
}

fn main() -> Result<()> {
    let mut rounds = 9usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().context("missing value")?.parse()?,
            other => bail!("unknown argument {other}; use --rounds N"),
        }
    }
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let batch = piece();
    let raw = f64::from(batch.raw_len);
    let mut zstd = zstd::bulk::Decompressor::new()?;
    let mut times: [Vec<f64>; 3] = Default::default();
    for _ in 0..rounds {
        times[0].push(round(|| {
            let out = zstd
                .decompress(&batch.payload, batch.raw_len as usize)
                .unwrap();
            assert_eq!(out.len(), batch.raw_len as usize);
        }));
        times[1].push(round(|| {
            assert_eq!(check_batch(&batch).unwrap().records, 1);
        }));
        times[2].push(round(|| {
            assert_eq!(decode_batch(&batch).unwrap().records.len(), 1);
        }));
    }
    println!(
        "one snapshot piece: {ROWS} rows, {:.1} MB as COPY text, {:.1} MB compressed; {rounds} rounds of {PER_ROUND}",
        raw / 1e6,
        batch.payload.len() as f64 / 1e6
    );
    println!();
    println!("| step | median MB/s | per round, ms per piece |");
    println!("| --- | --- | --- |");
    for (name, t) in ["decompress (the limit)", "check_batch", "decode_batch"]
        .iter()
        .zip(&mut times)
    {
        let listed: Vec<String> = t.iter().map(|s| format!("{:.2}", s * 1e3)).collect();
        t.sort_by(f64::total_cmp);
        let median = t[t.len() / 2];
        println!(
            "| {name} | {:.0} | {} |",
            raw / median / 1e6,
            listed.join(", ")
        );
    }
    Ok(())
}
