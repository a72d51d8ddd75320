//! How fast the mirror applies rows, against the fastest way into PostgreSQL: a
//! plain `COPY` of the same rows into the same server.
//!
//! Against a throwaway server (`ferry_tests::pg`, fsync off unless `--durable`,
//! autovacuum off),
//! each round times
//!
//! * (a) `COPY pgbench_accounts FROM STDIN` of N rows (aid int primary key, bid
//!   int, abalance int, filler char(84)) into an empty table, one transaction;
//! * (b) `Mirror::apply` of the same rows as insert row changes (after the
//!   table's shape), in chunks of 5,000 records, one transaction each, into an
//!   empty mirror table;
//!
//! and prints rows/s of both and their ratio; after the rounds, the medians.
//!
//! ```text
//! cargo run --release -p ferry-pg --example mirror_bench -- [ROWS] [ROUNDS] [--durable]
//! ```

use std::error::Error;
use std::io::Cursor;
use std::time::Instant;

use ferry_pg::mirror::{Mirror, MirrorConfig};
use ferry_protocol::messages::{
    column, record::Body, Column, Record, RowChange, RowOp, SchemaChange, SchemaColumn,
};
use ferry_tests::pg::PgServer;
use futures_util::SinkExt;

const CHUNK: usize = 5_000;

const COLUMNS: [(&str, &str, u32, bool); 4] = [
    ("aid", "integer", 23, true),
    ("bid", "integer", 23, false),
    ("abalance", "integer", 23, false),
    ("filler", "character(84)", 1042, false),
];

/// Row `i` as pgbench writes it: 100,000 accounts per branch, blank filler.
fn row(i: usize) -> [String; 4] {
    [
        i.to_string(),
        (i / 100_000 + 1).to_string(),
        ((i * 7919) % 10_000).to_string(),
        format!("{:<84}", format!("account {i}")),
    ]
}

fn records(n: usize) -> Vec<(u64, Record)> {
    let record = |body| Record {
        time_unix_ms: 1,
        position: String::new(),
        body: Some(body),
    };
    let mut out = Vec::with_capacity(n + 1);
    out.push(record(Body::SchemaChange(SchemaChange {
        schema: "public".into(),
        table: "pgbench_accounts".into(),
        columns: COLUMNS
            .iter()
            .map(|&(name, ty, oid, key)| SchemaColumn {
                name: name.into(),
                type_name: ty.into(),
                type_oid: oid,
                key,
            })
            .collect(),
        replica_identity: "default".into(),
        commit_lsn: 1,
    })));
    for i in 1..=n {
        let columns = COLUMNS
            .iter()
            .zip(row(i))
            .map(|(&(name, ty, oid, _), v)| Column {
                name: name.into(),
                type_name: ty.into(),
                type_oid: oid,
                value: Some(column::Value::Text(v)),
            })
            .collect();
        out.push(record(Body::RowChange(RowChange {
            schema: "public".into(),
            table: "pgbench_accounts".into(),
            op: RowOp::Insert as i32,
            last_in_txn: true,
            columns,
            ..Default::default()
        })));
    }
    (1..).zip(out).collect()
}

fn copy_text(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 110);
    for i in 1..=n {
        out.extend_from_slice(row(i).join("\t").as_bytes());
        out.push(b'\n');
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1).collect::<Vec<_>>();
    let durable = args.iter().any(|a| a == "--durable");
    args.retain(|a| a != "--durable");
    let n: usize = args.first().map_or(Ok(200_000), |a| a.parse())?;
    let rounds: usize = args.get(1).map_or(Ok(3), |a| a.parse())?;

    let server = if durable {
        PgServer::start_durable()
    } else {
        PgServer::start()
    };
    let db = server.database("bench").await;
    // Autovacuum would analyze one round's tables while the next is measured.
    db.batch_execute("ALTER SYSTEM SET autovacuum = off")
        .await?;
    db.batch_execute("SELECT pg_reload_conf()").await?;
    let config: tokio_postgres::Config = server.dsn("bench").parse()?;
    let text = copy_text(n);
    let records = records(n);
    println!(
        "{n} rows of pgbench_accounts, mirror chunks of {CHUNK} records, fsync {}",
        if durable { "on" } else { "off" }
    );

    let (mut copy_rates, mut mirror_rates) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        db.batch_execute(
            "DROP TABLE IF EXISTS public.pgbench_accounts;
             CREATE TABLE public.pgbench_accounts
               (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
             CHECKPOINT",
        )
        .await?;
        let t = Instant::now();
        let sink = db
            .copy_in::<_, Cursor<Vec<u8>>>("COPY public.pgbench_accounts FROM STDIN")
            .await?;
        let mut sink = std::pin::pin!(sink);
        for piece in text.chunks(1 << 20) {
            sink.as_mut().send(Cursor::new(piece.to_vec())).await?;
        }
        let copied = sink.as_mut().finish().await?;
        let copy_secs = t.elapsed().as_secs_f64();
        assert_eq!(copied as usize, n);

        let schema = format!("mirror_{round}");
        db.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CHECKPOINT"
        ))
        .await?;
        let mut m = Mirror::connect(
            config.clone(),
            None,
            MirrorConfig::new(format!("bench{round}"), schema.clone()),
        )
        .await?;
        let t = Instant::now();
        for chunk in records.chunks(CHUNK) {
            m.apply("agent", "stream", chunk).await?;
        }
        let mirror_secs = t.elapsed().as_secs_f64();
        let count = db
            .query_one(
                &format!("SELECT count(*) FROM {schema}.pgbench_accounts"),
                &[],
            )
            .await?
            .get::<_, i64>(0);
        assert_eq!(count as usize, n);

        let (c, m) = (n as f64 / copy_secs, n as f64 / mirror_secs);
        println!(
            "round {round}: COPY {c:>9.0} rows/s ({copy_secs:.2} s)   mirror {m:>9.0} rows/s ({mirror_secs:.2} s)   ratio {:.2}",
            m / c
        );
        copy_rates.push(c);
        mirror_rates.push(m);
    }
    let (c, m) = (median(copy_rates), median(mirror_rates));
    println!(
        "median: COPY {c:.0} rows/s, mirror {m:.0} rows/s, ratio {:.2}",
        m / c
    );
    Ok(())
}
