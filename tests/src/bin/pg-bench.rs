//! `pg-bench`: the postgres source's throughput next to PostgreSQL's own tools,
//! measured in the same run against the same throwaway server.
//!
//! ```text
//! cargo build --release --bins && target/release/pg-bench --runs 3
//! ```
//!
//! One throwaway PostgreSQL (`ferry_tests::pg`, the server binaries of the Debian
//! package `postgresql`; `fsync = off` on the server, `on` with `--server-fsync`).
//! Per run, on a fresh table
//! `t (id bigint primary key, payload text, ts timestamptz)`:
//!
//! * three logical slots (pgoutput) are created, then the load is committed:
//!   `--rows` INSERTs in 10 transactions, then (unless `--no-updates`) as many
//!   UPDATEs in 10 transactions; `end` = `pg_current_wal_lsn()` after it; then
//!   `VACUUM ANALYZE` and `CHECKPOINT` (autovacuum is off for the table), so no
//!   background work overlaps a measurement.
//! * server-side decoding only: `SELECT count(*) FROM
//!   pg_logical_slot_get_binary_changes(...)` with pgoutput v1 up to `end`, in one
//!   backend, nothing sent over the network: the decoding ceiling.
//! * `pg_recvlogical`: `--start` on its slot with `-o proto_version=1 -o
//!   publication_names=...`, `--endpos end`, output to `/dev/null`: changes/s from
//!   start to exit. PostgreSQL's own streaming client; it makes two `write` calls
//!   per message, which on machines with costly system calls makes it CPU-bound
//!   below the decoding ceiling.
//! * Ferry streaming: a fresh `ferry-exchange` + `ferry-agent` (release build) with a
//!   postgres stream on the third slot (`snapshot = "never"`): changes/s from agent
//!   start until the exchange acknowledged every change (plus the table's one
//!   Table record), durable in the agent's buffer and in the exchange's store.
//! * Initial snapshot: a fresh exchange + agent with `snapshot = "initial"` (default
//!   chunk size) on the loaded table: rows/s from agent start until the exchange
//!   acknowledged every row, next to `psql -c "COPY t TO STDOUT" > /dev/null`;
//!   also until the last row was durable in the agent's buffer (the exchange still
//!   receiving and storing alongside).
//!
//! `--source 'stream_in_progress = false'` adds keys to the stream's source table
//! (to compare settings). `--snapshot-only` skips the streaming figures (slots, decoding, pg_recvlogical,
//! Ferry streaming): the load, COPY and the snapshot, for working on the snapshot.
//!
//! The report prints medians and every run, as markdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_tests::bench::{bin, cpu_secs, median, rss_kib, Pair};
use ferry_tests::pg::PgServer;

const DB: &str = "bench";
const PUBLICATION: &str = "bench_pub";
/// Transactions per load phase.
const TXNS: u64 = 10;

/// `--source 'key = value, ...'`: more keys for the stream's `source` table.
static SOURCE_EXTRA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn pg_stream(server: &PgServer, slot: &str, extra: &str) -> String {
    let extra = match SOURCE_EXTRA.get() {
        Some(more) => format!("{extra}, {more}"),
        None => extra.to_string(),
    };
    format!(
        "[[stream]]\nname = \"t\"\ncatalog_id = \"BENCH-PG\"\nsharing = \"unconditional\"\nsource = {{ kind = \"postgres\", dsn = \"{}\", tables = [\"public.t\"], slot = \"{slot}\", publication = \"{PUBLICATION}\", {extra} }}\n",
        server.dsn(DB)
    )
}

/// Drops a slot once no connection holds it any more.
fn drop_slot(server: &PgServer, slot: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let _ = server.try_psql(
            DB,
            &format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"),
        );
        let left = server.psql(
            DB,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        );
        if left == "0" {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("replication slot {slot} is still in use after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lsn_text(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

struct Loaded {
    changes: u64,
    end_lsn: u64,
    secs: f64,
}

/// A fresh table and publication, two slots, then the load.
fn load(server: &PgServer, rows: u64, updates: bool, slots: &[&str]) -> Loaded {
    server.psql(
        DB,
        &format!(
            "DROP PUBLICATION IF EXISTS {PUBLICATION}; DROP TABLE IF EXISTS public.t;
             CREATE TABLE public.t (id bigint PRIMARY KEY, payload text, ts timestamptz)
               WITH (autovacuum_enabled = false);
             CREATE PUBLICATION {PUBLICATION} FOR TABLE public.t;"
        ),
    );
    for s in slots {
        server.psql(
            DB,
            &format!("SELECT pg_create_logical_replication_slot('{s}', 'pgoutput')"),
        );
    }
    let start = Instant::now();
    let per = rows.div_ceil(TXNS);
    let mut changes = 0;
    for i in 0..TXNS {
        let (a, b) = (i * per + 1, ((i + 1) * per).min(rows));
        if a > b {
            break;
        }
        server.psql(
            DB,
            &format!(
                "INSERT INTO public.t SELECT g, md5(g::text), now() FROM generate_series({a}, {b}) g"
            ),
        );
        changes += b - a + 1;
    }
    if updates {
        for i in 0..TXNS {
            let (a, b) = (i * per + 1, ((i + 1) * per).min(rows));
            if a > b {
                break;
            }
            server.psql(
                DB,
                &format!(
                    "UPDATE public.t SET payload = md5(payload), ts = now() WHERE id BETWEEN {a} AND {b}"
                ),
            );
            changes += b - a + 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let end_lsn = server.current_wal_lsn();
    // A quiet server for the measurements: no autovacuum or checkpoint catching
    // up with the load while one of them runs.
    server.psql(DB, "VACUUM ANALYZE public.t");
    server.psql(DB, "CHECKPOINT");
    Loaded {
        changes,
        end_lsn,
        secs,
    }
}

/// CPU seconds (user + system) of this process's reaped children so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the struct we pass; no other preconditions.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Server-side decoding alone, no client: `SELECT count(*) FROM
/// pg_logical_slot_get_binary_changes(...)` (pgoutput v1) up to `end`: seconds.
fn sql_decode(server: &PgServer, slot: &str, end_lsn: u64) -> Result<f64> {
    let start = Instant::now();
    let n = server
        .try_psql(
            DB,
            &format!(
                "SELECT count(*) FROM pg_logical_slot_get_binary_changes('{slot}', '{}', NULL, 'proto_version', '1', 'publication_names', '{PUBLICATION}')",
                lsn_text(end_lsn)
            ),
        )
        .map_err(anyhow::Error::msg)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!("  server-side decoding {secs:.1} s ({n} messages)");
    Ok(secs)
}

/// `pg_recvlogical --start ... --endpos END -f /dev/null`: seconds.
fn recvlogical(server: &PgServer, slot: &str, end_lsn: u64) -> Result<f64> {
    let cpu = children_cpu();
    let start = Instant::now();
    let out = Command::new(server.bin("pg_recvlogical"))
        .arg("-d")
        .arg(server.dsn(DB))
        .args(["--slot", slot, "--start", "--no-loop"])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            &format!("publication_names={PUBLICATION}"),
        ])
        .args(["--endpos", &lsn_text(end_lsn), "-f", "/dev/null"])
        .stdin(Stdio::null())
        .output()?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "  pg_recvlogical {secs:.1} s ({:.1} s CPU of its own)",
        children_cpu() - cpu
    );
    Ok(secs)
}

struct FerryRun {
    secs: f64,
    /// Snapshot only: agent start until its last row was durable in the agent's
    /// buffer (the stream's position moved to streaming).
    buffered_secs: f64,
    agent_hwm_kib: u64,
    agent_cpu: f64,
    exchange_cpu: f64,
}

/// Agent start until the exchange acknowledged `changes` + the Table record.
fn ferry_stream(dir: &Path, server: &PgServer, slot: &str, changes: u64) -> Result<FerryRun> {
    let mut pair = Pair::new(dir, &pg_stream(server, slot, "snapshot = \"never\""))?;
    let want = changes + 1;
    let start = Instant::now();
    let pid = pair.start_agent()?;
    let s = pair.wait(
        &format!("seq {want} acknowledged"),
        Duration::from_secs(1800),
        |s| s["acked_seq"].as_u64() >= Some(want),
    )?;
    let secs = start.elapsed().as_secs_f64();
    let agent_hwm_kib = rss_kib(pid, "VmHWM");
    let agent_cpu = cpu_secs(pid);
    let exchange_cpu = cpu_secs(pair.exchange.0.id());
    if s["head_seq"].as_u64() != Some(want) {
        bail!("expected {changes} changes and one Table record, the agent buffered: {s}");
    }
    pair.stop_agent();
    drop_slot(server, slot)?;
    Ok(FerryRun {
        secs,
        buffered_secs: 0.0,
        agent_hwm_kib,
        agent_cpu,
        exchange_cpu,
    })
}

/// Agent start until the snapshot of `rows` rows is acknowledged.
fn ferry_snapshot(dir: &Path, server: &PgServer, slot: &str, rows: u64) -> Result<FerryRun> {
    let mut pair = Pair::new(dir, &pg_stream(server, slot, "snapshot = \"initial\""))?;
    let start = Instant::now();
    let pid = pair.start_agent()?;
    let streaming = |s: &serde_json::Value| {
        s["position"]
            .as_str()
            .is_some_and(|p| p.starts_with("streaming"))
    };
    pair.wait(
        "the snapshot buffered",
        Duration::from_secs(1800),
        streaming,
    )?;
    let buffered_secs = start.elapsed().as_secs_f64();
    let s = pair.wait(
        "the snapshot acknowledged",
        Duration::from_secs(1800),
        |s| streaming(s) && s["acked_seq"] == s["head_seq"],
    )?;
    let secs = start.elapsed().as_secs_f64();
    let agent_hwm_kib = rss_kib(pid, "VmHWM");
    let agent_cpu = cpu_secs(pid);
    let exchange_cpu = cpu_secs(pair.exchange.0.id());
    if s["acked_seq"].as_u64().unwrap_or(0) < 2 {
        bail!("expected a Table record and the snapshot's rows: {s}");
    }
    pair.stop_agent();
    if std::env::var_os("FERRY_BENCH_LOG").is_some() {
        eprint!("{}", std::fs::read_to_string(dir.join("agent.log"))?);
    }
    // After the clock stopped: every row arrived, once.
    let got = pair.snapshot_rows("t")?;
    if got != rows {
        bail!("expected {rows} snapshot rows at the exchange, found {got}");
    }
    drop_slot(server, slot)?;
    Ok(FerryRun {
        secs,
        buffered_secs,
        agent_hwm_kib,
        agent_cpu,
        exchange_cpu,
    })
}

/// `psql -c "COPY t TO STDOUT" > /dev/null`: seconds.
fn copy_out(server: &PgServer) -> Result<f64> {
    let start = Instant::now();
    let st = server
        .psql_command(DB)
        .args(["-c", "COPY public.t TO STDOUT"])
        .stdin(Stdio::null())
        .stdout(File::create("/dev/null")?)
        .status()?;
    let secs = start.elapsed().as_secs_f64();
    if !st.success() {
        bail!("psql COPY failed: {st}");
    }
    Ok(secs)
}

struct Run {
    load: Loaded,
    /// `None` with `--snapshot-only`.
    streaming: Option<Streaming>,
    copy_secs: f64,
    snapshot: FerryRun,
}

struct Streaming {
    decode_secs: f64,
    recv_secs: f64,
    stream: FerryRun,
}

/// Server-side decoding, `pg_recvlogical` and Ferry on the three slots.
fn streaming(
    base: &tempfile::TempDir,
    r: usize,
    server: &PgServer,
    load: &Loaded,
    [decode_slot, recv_slot, ferry_slot]: [&str; 3],
) -> Result<Streaming> {
    // Alternate whether Ferry reads the WAL first or last, so it does not
    // always get the colder (or the warmer) caches.
    let d = base.path().join(format!("stream-{r}"));
    let mut stream = None;
    if r % 2 == 1 {
        stream = Some(ferry_stream(&d, server, ferry_slot, load.changes)?);
    }
    let decode_secs = sql_decode(server, decode_slot, load.end_lsn)?;
    drop_slot(server, decode_slot)?;
    let recv_secs = recvlogical(server, recv_slot, load.end_lsn)?;
    drop_slot(server, recv_slot)?;
    let stream = match stream {
        Some(s) => s,
        None => ferry_stream(&d, server, ferry_slot, load.changes)?,
    };
    std::fs::remove_dir_all(&d)?;
    eprintln!("  ferry streaming {:.1} s", stream.secs);
    Ok(Streaming {
        decode_secs,
        recv_secs,
        stream,
    })
}

fn main() -> Result<()> {
    let mut runs = 3usize;
    let mut rows = 1_000_000u64;
    let mut updates = true;
    let mut snapshot_only = false;
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
            "--no-updates" => updates = false,
            "--snapshot-only" => snapshot_only = true,
            "--server-fsync" => server_fsync = true,
            "--source" => {
                let more = args.next().context("--source needs 'key = value, ...'")?;
                let _ = SOURCE_EXTRA.set(more);
            }
            other => bail!(
                "unknown argument {other}; use --runs N --rows N --no-updates --snapshot-only --server-fsync --source 'key = value, ...'"
            ),
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
        .prefix("ferry-pg-bench")
        .tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let server = if server_fsync {
        PgServer::start_durable()
    } else {
        PgServer::start()
    };
    server.psql("postgres", &format!("CREATE DATABASE {DB}"));
    let version = server.psql(DB, "SHOW server_version");

    let mut results = Vec::new();
    for r in 0..runs {
        let (decode_slot, recv_slot, ferry_slot, snap_slot) = (
            format!("decode_{r}"),
            format!("recv_{r}"),
            format!("ferry_{r}"),
            format!("snap_{r}"),
        );
        eprintln!("run {}/{runs}: loading", r + 1);
        let slots: &[&str] = if snapshot_only {
            &[]
        } else {
            &[&decode_slot, &recv_slot, &ferry_slot]
        };
        let load = load(&server, rows, updates, slots);
        eprintln!(
            "  {} changes in {:.1} s, WAL end {}",
            load.changes,
            load.secs,
            lsn_text(load.end_lsn)
        );
        let streaming = if snapshot_only {
            None
        } else {
            Some(streaming(
                &base,
                r,
                &server,
                &load,
                [&decode_slot, &recv_slot, &ferry_slot],
            )?)
        };
        let copy_secs = copy_out(&server)?;
        eprintln!("  COPY {copy_secs:.1} s");
        let d = base.path().join(format!("snapshot-{r}"));
        let snapshot = ferry_snapshot(&d, &server, &snap_slot, rows)?;
        std::fs::remove_dir_all(&d)?;
        eprintln!("  ferry snapshot {:.1} s", snapshot.secs);
        results.push(Run {
            load,
            streaming,
            copy_secs,
            snapshot,
        });
    }

    let changes = results[0].load.changes;
    let k = |x: f64| format!("{:.0}k", x / 1000.0);
    let list = |v: &[f64], fmt: &dyn Fn(f64) -> String| {
        v.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(", ")
    };
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let streamed: Vec<(&Run, &Streaming)> = results
        .iter()
        .filter_map(|r| r.streaming.as_ref().map(|s| (r, s)))
        .collect();
    let of = |f: &dyn Fn(&Run, &Streaming) -> f64| -> Vec<f64> {
        streamed.iter().map(|(r, s)| f(r, s)).collect()
    };
    let recv = of(&|r, s| r.load.changes as f64 / s.recv_secs);
    let ferry = of(&|r, s| r.load.changes as f64 / s.stream.secs);
    let decode = of(&|r, s| r.load.changes as f64 / s.decode_secs);
    let stream_ratio = of(&|_, s| s.recv_secs / s.stream.secs);
    let decode_ratio = of(&|_, s| s.decode_secs / s.stream.secs);
    let each = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { results.iter().map(f).collect() };
    let copy = each(&|r| rows as f64 / r.copy_secs);
    let snap = each(&|r| rows as f64 / r.snapshot.secs);
    let snap_ratio = each(&|r| r.copy_secs / r.snapshot.secs);
    let buffered = each(&|r| rows as f64 / r.snapshot.buffered_secs);
    let buffered_ratio = each(&|r| r.copy_secs / r.snapshot.buffered_secs);
    println!(
        "PostgreSQL {version} (fsync = {}), {changes} row changes per run: {rows} INSERTs{} in transactions of {}; {runs} runs",
        if server_fsync { "on" } else { "off" },
        if updates {
            format!(" then {rows} UPDATEs")
        } else {
            String::new()
        },
        rows.div_ceil(TXNS)
    );
    println!();
    println!("| figure | median | runs |");
    println!("| --- | --- | --- |");
    println!(
        "| load (psql), changes/s | {} | {} |",
        k(median(
            &results
                .iter()
                .map(|r| r.load.changes as f64 / r.load.secs)
                .collect::<Vec<_>>()
        )),
        list(
            &results
                .iter()
                .map(|r| r.load.changes as f64 / r.load.secs)
                .collect::<Vec<_>>(),
            &k
        )
    );
    if !streamed.is_empty() {
        println!(
        "| server-side decoding only (pg_logical_slot_get_binary_changes, pgoutput v1), changes/s | {} | {} |",
        k(median(&decode)),
        list(&decode, &k)
    );
        println!(
            "| pg_recvlogical (pgoutput v1 → /dev/null), changes/s | {} | {} |",
            k(median(&recv)),
            list(&recv, &k)
        );
        println!(
        "| Ferry streaming e2e durable, changes/s | {} ({:.2}× pg_recvlogical, {:.2}× server-side decoding) | {} |",
        k(median(&ferry)),
        median(&stream_ratio),
        median(&decode_ratio),
        list(&ferry, &k)
    );
        println!(
            "| agent peak RSS, streaming | {} | {} |",
            mib(streamed
                .iter()
                .map(|(_, s)| s.stream.agent_hwm_kib)
                .max()
                .unwrap_or(0)),
            streamed
                .iter()
                .map(|(_, s)| mib(s.stream.agent_hwm_kib))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "| CPU seconds agent / exchange, streaming | | {} |",
            streamed
                .iter()
                .map(|(_, s)| format!("{:.1} / {:.1}", s.stream.agent_cpu, s.stream.exchange_cpu))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "| COPY t TO STDOUT (psql → /dev/null), rows/s | {} | {} |",
        k(median(&copy)),
        list(&copy, &k)
    );
    println!(
        "| Ferry initial snapshot e2e durable, rows/s | {} ({:.2}× COPY) | {} |",
        k(median(&snap)),
        median(&snap_ratio),
        list(&snap, &k)
    );
    println!(
        "| Ferry initial snapshot into the agent's durable buffer, rows/s | {} ({:.2}× COPY) | {} |",
        k(median(&buffered)),
        median(&buffered_ratio),
        list(&buffered, &k)
    );
    println!(
        "| agent peak RSS, snapshot | {} | {} |",
        mib(results
            .iter()
            .map(|r| r.snapshot.agent_hwm_kib)
            .max()
            .unwrap_or(0)),
        results
            .iter()
            .map(|r| mib(r.snapshot.agent_hwm_kib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| CPU seconds agent / exchange, snapshot | | {} |",
        results
            .iter()
            .map(|r| format!(
                "{:.1} / {:.1}",
                r.snapshot.agent_cpu, r.snapshot.exchange_cpu
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
