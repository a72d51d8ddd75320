//! `delivery-bench`: the exchange's PostgreSQL delivery next to a plain `COPY`
//! of the same rows into the same server, measured in the same run.
//!
//! ```text
//! cargo build --release --bins && target/release/delivery-bench --runs 3 --rows 500000
//! ```
//!
//! One throwaway PostgreSQL (`ferry_tests::pg`; `fsync = off` on the server,
//! `on` with `--server-fsync`) with a source database `bench` and a target
//! database `mirror`. Per run, on a fresh table
//! `t (id bigint primary key, payload text, ts timestamptz)` of `--rows` rows:
//!
//! * Ceiling: `psql bench -c "COPY t TO STDOUT" | psql mirror -c "COPY ... FROM
//!   STDIN"` into an empty table of the same shape: rows/s.
//! * Snapshot delivery: an agent captures the table (`snapshot = "initial"`)
//!   into an exchange with no delivery; once acknowledged, the exchange is
//!   restarted with a `[[delivery]] kind = "postgres"` into `mirror` (schema
//!   `run_N`): rows/s from the moment it serves (its admin socket answers)
//!   until `deliveries` shows the stream caught up. Then the mirror's rows are checked equal to the source's.
//! * Streamed delivery (keeping up with capture): with the delivery running,
//!   every row is updated in 10 transactions; the seconds until the agent's
//!   capture is acknowledged, and until the delivery caught up, from the first
//!   UPDATE; the delivery's largest `lag_seconds` seen meanwhile.
//!
//! The report prints medians and every run, as markdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_tests::bench::{bin, median, Pair, Proc};
use ferry_tests::pg::PgServer;

const TXNS: u64 = 10;

fn fingerprint(server: &PgServer, db: &str, table: &str) -> String {
    server.psql(
        db,
        &format!("SELECT count(*) || ' ' || md5(string_agg(id || ',' || payload || ',' || ts::text, ';' ORDER BY id)) FROM {table}"),
    )
}

/// The delivery's status lines, through the admin socket.
fn deliveries(pair: &Pair) -> Vec<serde_json::Value> {
    let Ok(mut s) =
        std::os::unix::net::UnixStream::connect(pair.dir.join("ex/store/exchange.sock"))
    else {
        return Vec::new();
    };
    if s.write_all(b"{\"cmd\":\"deliveries\"}\n").is_err() {
        return Vec::new();
    }
    std::io::BufReader::new(s)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|v| v.get("delivery").is_some())
        .collect()
}

/// Polls until the delivery caught up with `seq`; the largest lag seen.
fn wait_delivered(pair: &Pair, seq: u64, timeout: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut worst: f64 = 0.0;
    loop {
        let d = deliveries(pair);
        if let Some(l) = d.first() {
            worst = worst.max(l["lag_seconds"].as_f64().unwrap_or(0.0));
            if let Some(e) = l["last_error"].as_str() {
                if l["stopped"] == true {
                    bail!("the delivery stopped: {e}");
                }
            }
            if l["checkpoint"].as_u64().unwrap_or(0) >= seq && l["lag_records"] == 0 {
                return Ok(worst);
            }
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for the delivery; last {d:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn restart_exchange(pair: &mut Pair, extra: &str) -> Result<()> {
    let cfg = pair.dir.join("ex/exchange.toml");
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str(extra);
    std::fs::write(&cfg, text)?;
    // Stop the running exchange (killed: its store is durable by construction).
    drop(std::mem::replace(
        &mut pair.exchange,
        Proc(Command::new("true").spawn()?),
    ));
    pair.exchange = Proc(
        Command::new(bin("ferry-exchange"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stderr(std::fs::File::create(pair.dir.join("exchange-2.log"))?)
            .spawn()?,
    );
    Ok(())
}

struct Run {
    copy_secs: f64,
    snapshot_secs: f64,
    captured_secs: f64,
    delivered_secs: f64,
    worst_lag: f64,
}

fn one_run(server: &PgServer, base: &std::path::Path, r: usize, rows: u64) -> Result<Run> {
    server.psql(
        "bench",
        "DROP PUBLICATION IF EXISTS bench_pub; DROP TABLE IF EXISTS public.t;
         CREATE TABLE public.t (id bigint PRIMARY KEY, payload text, ts timestamptz);
         CREATE PUBLICATION bench_pub FOR TABLE public.t;",
    );
    server.psql(
        "bench",
        &format!(
            "INSERT INTO public.t SELECT g, md5(g::text), now() FROM generate_series(1, {rows}) g"
        ),
    );
    server.psql("bench", "VACUUM ANALYZE public.t");
    server.psql("bench", "CHECKPOINT");
    // Ceiling: a plain COPY of the same rows into the same server.
    server.psql(
        "mirror",
        &format!("DROP TABLE IF EXISTS copy_{r}; CREATE TABLE copy_{r} (id bigint PRIMARY KEY, payload text, ts timestamptz)"),
    );
    let start = Instant::now();
    let mut out = server
        .psql_command("bench")
        .args(["-c", "COPY public.t TO STDOUT"])
        .stdout(Stdio::piped())
        .spawn()?;
    let st = server
        .psql_command("mirror")
        .args(["-c", &format!("COPY copy_{r} FROM STDIN")])
        .stdin(out.stdout.take().context("COPY stdout")?)
        .status()?;
    out.wait()?;
    let copy_secs = start.elapsed().as_secs_f64();
    if !st.success() {
        bail!("COPY into the mirror database failed");
    }
    eprintln!("  COPY {copy_secs:.2} s");

    let dir = base.join(format!("run-{r}"));
    let stream = format!(
        "[[stream]]\nname = \"t\"\ncatalog_id = \"BENCH-PG\"\nsharing = \"unconditional\"\nsource = {{ kind = \"postgres\", dsn = \"{}\", tables = [\"public.t\"], slot = \"bench_{r}\", publication = \"bench_pub\", snapshot = \"initial\", heartbeat_interval = \"1s\" }}\n",
        server.dsn("bench")
    );
    let mut pair = Pair::new(&dir, &stream)?;
    pair.start_agent()?;
    let streaming = |s: &serde_json::Value| {
        s["position"]
            .as_str()
            .is_some_and(|p| p.starts_with("streaming"))
    };
    let s = pair.wait(
        "the snapshot acknowledged",
        Duration::from_secs(1800),
        |s| streaming(s) && s["acked_seq"] == s["head_seq"],
    )?;
    let stored = s["acked_seq"].as_u64().unwrap_or(0);
    restart_exchange(
        &mut pair,
        &format!(
            "\n[[delivery]]\nname = \"bench{r}\"\nkind = \"postgres\"\ndsn = \"{}\"\nschema = \"run_{r}\"\nstreams = [\"bench/t\"]\n",
            server.dsn("mirror")
        ),
    )?;
    // From the moment the exchange serves (its admin socket answers): the
    // delivery's rate, not the exchange's start-up.
    let sock = pair.dir.join("ex/store/exchange.sock");
    let waiting = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if waiting.elapsed() > Duration::from_secs(60) {
            bail!("the exchange did not start");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let start = Instant::now();
    wait_delivered(&pair, stored, Duration::from_secs(1800))?;
    let snapshot_secs = start.elapsed().as_secs_f64();
    eprintln!("  snapshot delivered {snapshot_secs:.2} s");
    let want = fingerprint(server, "bench", "public.t");
    let got = fingerprint(server, "mirror", &format!("run_{r}.t"));
    if want != got {
        bail!("the mirror differs from the source after the snapshot: {got} vs {want}");
    }

    // Streamed changes while the delivery runs.
    let per = rows.div_ceil(TXNS);
    let start = Instant::now();
    for i in 0..TXNS {
        let (a, b) = (i * per + 1, ((i + 1) * per).min(rows));
        server.psql(
            "bench",
            &format!("UPDATE public.t SET payload = md5(payload), ts = now() WHERE id BETWEEN {a} AND {b}"),
        );
    }
    let end_lsn = server.current_wal_lsn();
    let s = pair.wait("the updates acknowledged", Duration::from_secs(1800), |s| {
        s["position"]
            .as_str()
            .and_then(ferry_tests::pg_position_lsn)
            .is_some_and(|l| l >= end_lsn)
            && s["acked_seq"] == s["head_seq"]
    })?;
    let captured_secs = start.elapsed().as_secs_f64();
    let worst_lag = wait_delivered(
        &pair,
        s["acked_seq"].as_u64().unwrap_or(0),
        Duration::from_secs(1800),
    )?;
    let delivered_secs = start.elapsed().as_secs_f64();
    eprintln!("  {rows} updates captured {captured_secs:.2} s, delivered {delivered_secs:.2} s, worst lag {worst_lag:.1} s");
    let want = fingerprint(server, "bench", "public.t");
    let got = fingerprint(server, "mirror", &format!("run_{r}.t"));
    if want != got {
        bail!("the mirror differs from the source after the updates: {got} vs {want}");
    }
    pair.stop_agent();
    drop(pair);
    let _ = server.try_psql(
        "bench",
        &format!("SELECT pg_drop_replication_slot('bench_{r}')"),
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(Run {
        copy_secs,
        snapshot_secs,
        captured_secs,
        delivered_secs,
        worst_lag,
    })
}

fn main() -> Result<()> {
    let mut runs = 3usize;
    let mut rows = 500_000u64;
    let mut server_fsync = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .context("missing value")
                .and_then(|v| v.parse::<u64>().context("not a number"))
        };
        match a.as_str() {
            "--runs" => runs = val()? as usize,
            "--rows" => rows = val()?,
            "--server-fsync" => server_fsync = true,
            other => bail!("unknown argument {other}; use --runs N --rows N --server-fsync"),
        }
    }
    if runs == 0 || rows == 0 {
        bail!("--runs and --rows must be at least 1");
    }
    for b in ["ferry-agent", "ferry-exchange"] {
        if !bin(b).exists() {
            bail!(
                "{} is missing: run `cargo build --release --bins` first",
                bin(b).display()
            );
        }
    }
    let base = tempfile::Builder::new()
        .prefix("ferry-delivery-bench")
        .tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let server = if server_fsync {
        PgServer::start_durable()
    } else {
        PgServer::start()
    };
    server.psql("postgres", "CREATE DATABASE bench");
    server.psql("postgres", "CREATE DATABASE mirror");
    let mut results = Vec::new();
    for r in 0..runs {
        eprintln!("run {}/{runs}", r + 1);
        results.push(one_run(&server, base.path(), r, rows)?);
    }
    let rate = |secs: f64| rows as f64 / secs;
    let col = |f: &dyn Fn(&Run) -> f64| median(&results.iter().map(f).collect::<Vec<_>>());
    println!(
        "PostgreSQL {} rows, {runs} runs, server fsync {}\n",
        rows,
        if server_fsync { "on" } else { "off" }
    );
    println!("| | median | runs |\n| --- | --- | --- |");
    let row = |name: &str, f: &dyn Fn(&Run) -> f64, unit: &str| {
        let all: Vec<String> = results.iter().map(|r| format!("{:.0}", f(r))).collect();
        println!("| {name} | {:.0} {unit} | {} |", col(f), all.join(", "));
    };
    row(
        "COPY into the target (ceiling)",
        &|r| rate(r.copy_secs),
        "rows/s",
    );
    row(
        "snapshot rows delivered",
        &|r| rate(r.snapshot_secs),
        "rows/s",
    );
    println!(
        "| ratio delivered / COPY | {:.2} | {} |",
        col(&|r| r.copy_secs / r.snapshot_secs),
        results
            .iter()
            .map(|r| format!("{:.2}", r.copy_secs / r.snapshot_secs))
            .collect::<Vec<_>>()
            .join(", ")
    );
    row(
        "updates captured (acked at the exchange)",
        &|r| rate(r.captured_secs),
        "rows/s",
    );
    row(
        "updates delivered (from the first UPDATE)",
        &|r| rate(r.delivered_secs),
        "rows/s",
    );
    println!(
        "| worst delivery lag during the updates | {:.1} s | {} |",
        col(&|r| r.worst_lag),
        results
            .iter()
            .map(|r| format!("{:.1}", r.worst_lag))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
