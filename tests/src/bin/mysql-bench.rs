//! `mysql-bench`: the mysql source's throughput next to MariaDB's own tools,
//! measured in the same run against the same throwaway server.
//!
//! ```text
//! cargo build --release --bins && target/release/mysql-bench --runs 3
//! ```
//!
//! One throwaway MariaDB (`ferry_tests::mysql`, the server binaries of the Debian
//! package `mariadb-server`: binlog in ROW format, `binlog_row_metadata = FULL`,
//! `sync_binlog = 0`, `innodb_flush_log_at_trx_commit = 2`; the bench raises
//! `innodb_buffer_pool_size` to 512 MiB, `--buffer-pool-mib N`, so the loaded
//! table stays in memory). The replication user `ferry` (`REPLICATION SLAVE`,
//! `REPLICATION CLIENT`, `SELECT`) connects over TCP for every reader: Ferry,
//! `mariadb-binlog` and `mariadb-dump`. Per run, on a fresh table
//! `shop.t (id BIGINT PRIMARY KEY, payload VARCHAR(200) CHARACTER SET utf8mb4,
//! name_gbk VARCHAR(32) CHARACTER SET gbk, amount DECIMAL(20,4), ts DATETIME(6))`:
//!
//! * `FLUSH BINARY LOGS`, `start` = `SHOW MASTER STATUS`. A fresh exchange and
//!   agent (`ferry-exchange`, `ferry-agent`, release build) with a mysql stream
//!   (`snapshot = "never"`) is started and stopped (SIGTERM) once its stream
//!   position (at `start`) is durable, so its next start resumes there.
//! * The load: `--rows` INSERTs in 10 transactions (`--insert-txns N`; `INSERT …
//!   SELECT` from the sequence engine's `seq_A_to_B`), then `rows/10` UPDATEs
//!   and `rows/10` DELETEs in 5 transactions each; `end` = `SHOW MASTER STATUS`
//!   after it.
//! * Decoding alone: `mariadb-binlog --read-from-remote-server --verbose
//!   --base64-output=DECODE-ROWS --start-position START --stop-position END
//!   FILE… > /dev/null`: row changes/s from start to exit, MariaDB's own binlog
//!   reader rendering every row (after the clock stopped, the same command's
//!   output is checked to hold every row change of the load).
//! * Ferry streaming: the agent is started again; row changes/s from its start
//!   until the exchange acknowledged every change (plus the table's Table record)
//!   and the stream's durable position is at `end`: durable in the agent's buffer
//!   and in the exchange's store; also until the position reached `end` (every
//!   change durable in the agent's buffer). Ferry reads the binlog after
//!   `mariadb-binlog` in the first run, before it in the second, and so on,
//!   each on a settled server (see the snapshot below).
//! * Initial snapshot: a fresh exchange + agent with `snapshot = "initial"`
//!   (default chunk size) on the loaded table (`rows - rows/10` rows): rows/s from
//!   agent start until the exchange acknowledged every row, next to
//!   `mariadb-dump --quick --single-transaction shop t > /dev/null`; also until the
//!   last row was durable in the agent's buffer. Each run measures
//!   `--snapshot-pairs N` (3) such pairs on its one load, a fresh agent and
//!   exchange each time: a pair takes seconds, a load and its settling half a
//!   minute, and the sub-second timings need many samples. `mariadb-dump` goes
//!   first in a run's first pair, Ferry in the second, and so on (and the other
//!   way round in the next run); before each, the bench waits
//!   until InnoDB has purged the load's old row versions (history list length 0)
//!   and written its dirty pages, which otherwise take a server thread's CPU for
//!   the first second or so of whichever reader comes first.
//!
//! `--snapshot-only` skips the streaming figures. The report prints medians and
//! every run (every pair, for the snapshot), as markdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_tests::bench::{bin, cpu_secs, median, rss_kib, Pair};
use ferry_tests::mysql::MariaDb;

const USER: &str = "ferry";
const PASSWORD: &str = "s3cret";
/// INSERT transactions (default of `--insert-txns`).
const INSERT_TXNS: u64 = 10;
/// UPDATE transactions, and as many DELETE transactions.
const CHANGE_TXNS: u64 = 5;

const TABLE: &str = "CREATE TABLE shop.t (
    id BIGINT PRIMARY KEY,
    payload VARCHAR(200) CHARACTER SET utf8mb4,
    name_gbk VARCHAR(32) CHARACTER SET gbk,
    amount DECIMAL(20,4),
    ts DATETIME(6)) ENGINE=InnoDB";

/// A binlog position, `file:pos`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BinlogPos {
    file: String,
    pos: u64,
}

impl BinlogPos {
    /// The numeric suffix of the file name (`binlog.000042` → 42).
    fn number(&self) -> u64 {
        self.file
            .rsplit_once('.')
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or(0)
    }

    fn key(&self) -> (u64, u64) {
        (self.number(), self.pos)
    }

    /// The file of number `n`, named like this one.
    fn file_numbered(&self, n: u64) -> String {
        let (base, num) = self.file.rsplit_once('.').unwrap();
        format!("{base}.{n:0width$}", width = num.len())
    }
}

impl std::fmt::Display for BinlogPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

/// `SHOW MASTER STATUS`.
fn master_status(db: &MariaDb) -> BinlogPos {
    let out = db.sql("SHOW MASTER STATUS");
    let mut f = out.split('\t');
    let file = f.next().unwrap_or_default().to_string();
    let pos = f.next().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
    assert!(
        !file.is_empty() && pos > 0,
        "SHOW MASTER STATUS said {out:?}"
    );
    BinlogPos { file, pos }
}

/// The position a mysql stream's status names (`binlog FILE:POS[, gtid …]`), when
/// no transaction is half durable and no snapshot is running.
fn status_position(s: &serde_json::Value) -> Option<BinlogPos> {
    let p = s["position"].as_str()?;
    let rest = p.strip_prefix("binlog ")?;
    if p.contains("changes of the transaction") {
        return None;
    }
    let at = rest.split(',').next()?.trim();
    let (file, pos) = at.rsplit_once(':')?;
    Some(BinlogPos {
        file: file.to_string(),
        pos: pos.parse().ok()?,
    })
}

struct Ctx {
    db: MariaDb,
    insert_txns: u64,
    password_file: PathBuf,
    buffer_pool_mib: u64,
}

fn my_stream(ctx: &Ctx, server_id: u32, snapshot: &str) -> String {
    format!(
        "[[stream]]\nname = \"t\"\ncatalog_id = \"BENCH-MY\"\nsharing = \"unconditional\"\nsource = {{ kind = \"mysql\", dsn = \"{}\", password_file = \"{}\", server_id = {server_id}, tables = [\"shop.t\"], snapshot = \"{snapshot}\" }}\n",
        ctx.db.dsn(USER, "shop"),
        ctx.password_file.display()
    )
}

/// `n` inclusive ranges covering `lo..=hi`, none empty.
fn ranges(lo: u64, hi: u64, n: u64) -> Vec<(u64, u64)> {
    if lo > hi {
        return Vec::new();
    }
    let per = (hi - lo + 1).div_ceil(n);
    (0..n)
        .map(|i| (lo + i * per, (lo + (i + 1) * per - 1).min(hi)))
        .filter(|(a, b)| a <= b)
        .collect()
}

struct Loaded {
    start: BinlogPos,
    end: BinlogPos,
    inserts: u64,
    updates: u64,
    deletes: u64,
    /// Rows in the table after the load.
    remaining: u64,
    secs: f64,
}

impl Loaded {
    fn changes(&self) -> u64 {
        self.inserts + self.updates + self.deletes
    }
}

/// A fresh table and a fresh binlog file; `start` = the position once the
/// server stopped writing to it (MariaDB adds a binlog checkpoint event to a new
/// file in the background).
fn fresh_table(ctx: &Ctx) -> BinlogPos {
    ctx.db.sql(&format!(
        "DROP TABLE IF EXISTS shop.t; {TABLE}; FLUSH BINARY LOGS;"
    ));
    let mut at = master_status(&ctx.db);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = master_status(&ctx.db);
        if now == at {
            return at;
        }
        at = now;
    }
}

/// Waits (up to 120 s) until InnoDB has purged what the load deleted and
/// updated and written its dirty pages: that work runs in the server's own
/// threads for a second or more after a load and would take CPU from whichever
/// reader of the table came first.
fn settle(ctx: &Ctx) {
    let t = Instant::now();
    // Pages written at once rather than at the page cleaner's idle pace; the
    // setting is put back before anything is measured.
    let pct = ctx.db.sql("SELECT @@GLOBAL.innodb_max_dirty_pages_pct");
    ctx.db.sql("SET GLOBAL innodb_max_dirty_pages_pct = 0");
    let (mut history, mut dirty) = (0, 0);
    while t.elapsed() < Duration::from_secs(120) {
        let out = ctx.db.sql(
            "SELECT (SELECT COUNT FROM information_schema.INNODB_METRICS WHERE NAME = 'trx_rseg_history_len'), \
             (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'INNODB_BUFFER_POOL_PAGES_DIRTY')",
        );
        let mut f = out
            .split('\t')
            .map(|v| v.trim().parse::<u64>().unwrap_or(u64::MAX));
        history = f.next().unwrap_or(u64::MAX);
        dirty = f.next().unwrap_or(u64::MAX);
        if history == 0 && dirty == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ctx.db.sql(&format!(
        "SET GLOBAL innodb_max_dirty_pages_pct = {}",
        pct.trim()
    ));
    eprintln!(
        "  (server settled in {:.1} s: history list {history}, dirty pages {dirty})",
        t.elapsed().as_secs_f64()
    );
}

/// Ferry's measurement and its reference tool's, each on a settled server:
/// the tool first in even runs, Ferry first in odd ones, so neither always
/// gets the colder (or the warmer) caches.
fn in_turn<F, T>(
    ctx: &Ctx,
    run: usize,
    ferry: impl FnOnce() -> Result<F>,
    tool: impl FnOnce() -> Result<T>,
) -> Result<(F, T)> {
    if run % 2 == 1 {
        settle(ctx);
        let f = ferry()?;
        settle(ctx);
        Ok((f, tool()?))
    } else {
        settle(ctx);
        let t = tool()?;
        settle(ctx);
        Ok((ferry()?, t))
    }
}

/// The load; `end` = the position after it.
fn load(ctx: &Ctx, start: BinlogPos, rows: u64) -> Loaded {
    let db = &ctx.db;
    let t = Instant::now();
    for (a, b) in ranges(1, rows, ctx.insert_txns) {
        db.sql(&format!(
            "INSERT INTO shop.t SELECT seq, CONCAT('Größe-', MD5(seq), '-€'), CONCAT('上海', seq), \
             seq * 1.2345 / 7, TIMESTAMP'2026-12-06 08:00:00' + INTERVAL seq MICROSECOND FROM shop.seq_{a}_to_{b}"
        ));
    }
    let small = rows / 10;
    for (a, b) in ranges(1, small, CHANGE_TXNS) {
        db.sql(&format!(
            "UPDATE shop.t SET payload = MD5(payload), amount = amount + 1, ts = ts + INTERVAL 1 SECOND \
             WHERE id BETWEEN {a} AND {b}"
        ));
    }
    for (a, b) in ranges(rows - small + 1, rows, CHANGE_TXNS) {
        db.sql(&format!("DELETE FROM shop.t WHERE id BETWEEN {a} AND {b}"));
    }
    let secs = t.elapsed().as_secs_f64();
    let end = master_status(db);
    let remaining: u64 = db
        .sql("SELECT COUNT(*) FROM shop.t")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(remaining, rows - small);
    Loaded {
        start,
        end,
        inserts: rows,
        updates: small,
        deletes: small,
        remaining,
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

/// A MariaDB client tool, connecting as the replication user over TCP.
fn client(ctx: &Ctx, tool: &[&str]) -> Command {
    let path = tool
        .iter()
        .map(|n| Path::new("/usr/bin").join(n))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{} not found: install mariadb-client", tool[0]));
    let mut c = Command::new(path);
    c.arg("--no-defaults")
        .arg("--host=127.0.0.1")
        .arg(format!("--port={}", ctx.db.port))
        .arg(format!("--user={USER}"))
        .arg(format!("--password={PASSWORD}"));
    c
}

/// The binlog files from `start` to `end`, for `mariadb-binlog`.
fn files(load: &Loaded) -> Vec<String> {
    (load.start.number()..=load.end.number())
        .map(|n| load.start.file_numbered(n))
        .collect()
}

/// `mariadb-binlog -R --verbose --base64-output=DECODE-ROWS` from start to end:
/// seconds and CPU seconds.
fn binlog_decode(ctx: &Ctx, load: &Loaded) -> Result<(f64, f64)> {
    let mut c = client(ctx, &["mariadb-binlog", "mysqlbinlog"]);
    c.args([
        "--read-from-remote-server",
        "--verbose",
        "--base64-output=DECODE-ROWS",
    ])
    .arg(format!("--start-position={}", load.start.pos))
    .arg(format!("--stop-position={}", load.end.pos))
    .args(files(load))
    .stdin(Stdio::null())
    .stdout(File::create("/dev/null")?)
    .stderr(Stdio::piped());
    let cpu = children_cpu();
    let start = Instant::now();
    let out = c.output()?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu;
    if !out.status.success() {
        bail!(
            "mariadb-binlog failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("  mariadb-binlog {secs:.1} s ({cpu:.1} s CPU of its own)");
    Ok((secs, cpu))
}

/// After the clock stopped: the same `mariadb-binlog` command rendered every row
/// change of the load (its `### INSERT INTO`, `### UPDATE`, `### DELETE FROM`
/// lines counted).
fn binlog_check(ctx: &Ctx, load: &Loaded) -> Result<()> {
    use std::io::BufRead;
    let mut c = client(ctx, &["mariadb-binlog", "mysqlbinlog"]);
    let mut child = c
        .args([
            "--read-from-remote-server",
            "--verbose",
            "--base64-output=DECODE-ROWS",
        ])
        .arg(format!("--start-position={}", load.start.pos))
        .arg(format!("--stop-position={}", load.end.pos))
        .args(files(load))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().context("mariadb-binlog stdout")?;
    let (mut ins, mut upd, mut del) = (0u64, 0u64, 0u64);
    for line in std::io::BufReader::new(out).split(b'\n') {
        let line = line?;
        if line.starts_with(b"### INSERT INTO") {
            ins += 1;
        } else if line.starts_with(b"### UPDATE") {
            upd += 1;
        } else if line.starts_with(b"### DELETE FROM") {
            del += 1;
        }
    }
    if !child.wait()?.success() {
        bail!("mariadb-binlog failed (check run)");
    }
    if (ins, upd, del) != (load.inserts, load.updates, load.deletes) {
        bail!(
            "mariadb-binlog rendered {ins} inserts, {upd} updates, {del} deletes; the load made {}, {}, {}",
            load.inserts,
            load.updates,
            load.deletes
        );
    }
    Ok(())
}

/// `mariadb-dump --quick --single-transaction shop t > /dev/null`: seconds.
fn dump(ctx: &Ctx) -> Result<f64> {
    let mut c = client(ctx, &["mariadb-dump", "mysqldump"]);
    c.args(["--quick", "--single-transaction", "shop", "t"])
        .stdin(Stdio::null())
        .stdout(File::create("/dev/null")?)
        .stderr(Stdio::piped());
    let start = Instant::now();
    let out = c.output()?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "mariadb-dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

/// Stops the pair's agent with SIGTERM and waits for it.
fn terminate_agent(pair: &mut Pair) -> Result<()> {
    if let Some(mut p) = pair.agent.take() {
        // SAFETY: kill has no memory preconditions; the pid is our own child's,
        // not yet reaped.
        unsafe {
            libc::kill(p.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        while p.0.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the agent did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

struct FerryRun {
    secs: f64,
    /// Agent start until the last change (streaming: the stream's position at
    /// the load's end) or row (snapshot: the position moved to the binlog) was
    /// durable in the agent's buffer.
    buffered_secs: f64,
    agent_hwm_kib: u64,
    agent_cpu: f64,
    exchange_cpu: f64,
    /// Records the agent buffered (rows, blocks and Table records).
    head_seq: u64,
}

/// [`Pair::new`], up to three times: the exchange listens on TCP as well as on
/// the UDP port `Pair` picks free, and that TCP port may be taken (seen once:
/// "Address already in use" for a port a client's outgoing connection held).
fn new_pair(dir: &Path, stream: &str) -> Result<Pair> {
    let mut attempt = 1;
    loop {
        match Pair::new(dir, stream) {
            Ok(p) => return Ok(p),
            Err(e) if attempt < 3 => {
                let log = std::fs::read_to_string(dir.join("exchange.log")).unwrap_or_default();
                eprintln!("  the exchange did not start ({e}): {}", log.trim());
                std::fs::remove_dir_all(dir)?;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A pair whose agent committed its stream position (at `start`, or just past
/// it: returned) and stopped.
fn ferry_prepare(
    ctx: &Ctx,
    dir: &Path,
    server_id: u32,
    start: &BinlogPos,
) -> Result<(Pair, BinlogPos)> {
    let mut pair = new_pair(dir, &my_stream(ctx, server_id, "never"))?;
    pair.start_agent()?;
    let s = pair.wait(
        "the stream position committed",
        Duration::from_secs(120),
        |s| status_position(s).is_some(),
    )?;
    let at = status_position(&s).unwrap();
    if at.key() < start.key() || at.file != start.file {
        bail!("the new stream starts at {at}, expected {start}: {s}");
    }
    terminate_agent(&mut pair)?;
    Ok((pair, at))
}

/// `done` on two status readings in a row with the same `head_seq`. The agent's
/// buffer makes a group's position visible (`apply_batch`) before it syncs and
/// before it counts the group's records in `head_seq`, and `status` reads the
/// head before the position: for the length of a sync `status` shows the new
/// position with the old head (seen once, on a busy machine: the end position
/// with the last 20,000-change transaction missing from `head_seq` and
/// `acked_seq`). Two readings narrow that window; they cannot close it.
fn settled(done: impl Fn(&serde_json::Value) -> bool) -> impl FnMut(&serde_json::Value) -> bool {
    let mut last: Option<serde_json::Value> = None;
    move |s| {
        if !done(s) {
            last = None;
            return false;
        }
        let head = s["head_seq"].clone();
        let twice = last.as_ref() == Some(&head);
        last = Some(head);
        twice
    }
}

/// Agent start (resuming at the load's start) until the exchange acknowledged
/// every change and the stream's position reached the load's end.
fn ferry_stream(ctx: &Ctx, mut pair: Pair, load: &Loaded) -> Result<FerryRun> {
    let changes = load.changes();
    let end = load.end.key();
    let start = Instant::now();
    let pid = pair.start_agent()?;
    let reached = |s: &serde_json::Value| status_position(s).is_some_and(|p| p.key() >= end);
    // Readings whose position moved while `head_seq` did not (every commit of
    // this stream carries records): the position shown before its records are
    // counted (see `settled`).
    let mut early = 0u32;
    let mut prev: Option<(serde_json::Value, serde_json::Value)> = None;
    pair.wait(
        &format!("position {} durable in the agent's buffer", load.end),
        Duration::from_secs(1800),
        |s| {
            let now = (s["position"].clone(), s["head_seq"].clone());
            if let Some((p, h)) = &prev {
                if *p != now.0 && *h == now.1 && status_position(s).is_some() {
                    early += 1;
                }
            }
            prev = Some(now);
            reached(s)
        },
    )?;
    if early > 0 {
        eprintln!("  status showed a new position with the old head_seq {early} times");
    }
    let buffered_secs = start.elapsed().as_secs_f64();
    // Done: the end position, every change buffered and acknowledged. `status`
    // may show a position before the commit that carries it is synced and
    // counted in `head_seq` (see `settled`), so the head must hold every change;
    // a head short of it for 5 s at the end position is a loss.
    let mut short_since: Option<Instant> = None;
    let s = pair.wait(
        &format!("{changes} changes acknowledged, position {}", load.end),
        Duration::from_secs(1800),
        |s| {
            let head = s["head_seq"].as_u64().unwrap_or(0);
            if !(reached(s) && s["acked_seq"].as_u64() == Some(head)) {
                short_since = None;
                return false;
            }
            if head >= changes {
                return true;
            }
            short_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(5)
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let agent_hwm_kib = rss_kib(pid, "VmHWM");
    let agent_cpu = cpu_secs(pid);
    let exchange_cpu = cpu_secs(pair.exchange.0.id());
    let head_seq = s["head_seq"].as_u64().unwrap_or(0);
    if head_seq < changes {
        pair.stop_agent();
        diagnose(ctx, &pair, load);
        bail!(
            "expected at least {changes} records, the agent buffered: {s}; logs and data kept in {}",
            pair.dir.display()
        );
    }
    pair.stop_agent();
    if std::env::var_os("FERRY_BENCH_LOG").is_some() {
        eprint!("{}", std::fs::read_to_string(pair.dir.join("agent.log"))?);
    }
    Ok(FerryRun {
        secs,
        buffered_secs,
        agent_hwm_kib,
        agent_cpu,
        exchange_cpu,
        head_seq,
    })
}

/// After a streaming run that lost changes: the exchange's rows per
/// transaction (`txn`, `source_position`, op) next to the load's transactions in
/// the binlog (`SHOW BINLOG EVENTS`), to stderr.
fn diagnose(ctx: &Ctx, pair: &Pair, load: &Loaded) {
    use std::collections::BTreeMap;
    use std::io::BufRead;
    let mut per: BTreeMap<String, (String, String, u64, u64, u64)> = BTreeMap::new();
    let child = Command::new(bin("ferry-exchange"))
        .args(["records", "--config"])
        .arg(pair.dir.join("ex/exchange.toml"))
        .args(["--agent", "bench", "--stream", "t"])
        .stdout(Stdio::piped())
        .spawn();
    if let Ok(mut child) = child {
        if let Some(out) = child.stdout.take() {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let Some(row) = v.get("row") else { continue };
                let at = row["source_position"].as_str().unwrap_or("?").to_string();
                let e = per.entry(at).or_insert_with(|| {
                    (
                        row["txn"].as_str().unwrap_or("").to_string(),
                        row["op"].as_str().unwrap_or("").to_string(),
                        0,
                        u64::MAX,
                        0,
                    )
                });
                let c = row["change"].as_u64().unwrap_or(0);
                e.2 += 1;
                e.3 = e.3.min(c);
                e.4 = e.4.max(c);
            }
        }
        let _ = child.wait();
    }
    eprintln!(
        "exchange rows per transaction (position, txn, op, rows, first change, last change):"
    );
    for (at, (txn, op, n, lo, hi)) in &per {
        eprintln!("  {at} {txn} {op} {n} {lo}..={hi}");
    }
    eprintln!("the load's transactions in the binlog (GTID and XID events):");
    for f in files(load) {
        let ev = ctx
            .db
            .try_sql(&format!("SHOW BINLOG EVENTS IN '{f}'"))
            .unwrap_or_else(|e| e);
        for l in ev
            .lines()
            .filter(|l| l.contains("\tGtid\t") || l.contains("\tXid\t"))
        {
            eprintln!("  {l}");
        }
    }
    if let Ok(log) = std::fs::read_to_string(pair.dir.join("agent.log")) {
        eprintln!("agent.log:\n{log}");
    }
}

/// Agent start until the snapshot of `rows` rows is acknowledged.
fn ferry_snapshot(ctx: &Ctx, dir: &Path, server_id: u32, rows: u64) -> Result<FerryRun> {
    let mut pair = new_pair(dir, &my_stream(ctx, server_id, "initial"))?;
    let start = Instant::now();
    let pid = pair.start_agent()?;
    let streaming = |s: &serde_json::Value| status_position(s).is_some();
    pair.wait(
        "the snapshot buffered",
        Duration::from_secs(1800),
        streaming,
    )?;
    let buffered_secs = start.elapsed().as_secs_f64();
    let s = pair.wait(
        "the snapshot acknowledged",
        Duration::from_secs(1800),
        settled(|s| streaming(s) && s["acked_seq"] == s["head_seq"]),
    )?;
    let secs = start.elapsed().as_secs_f64();
    let agent_hwm_kib = rss_kib(pid, "VmHWM");
    let agent_cpu = cpu_secs(pid);
    let exchange_cpu = cpu_secs(pair.exchange.0.id());
    let mut head_seq = s["head_seq"].as_u64().unwrap_or(0);
    if head_seq < 2 {
        bail!("expected a Table record and the snapshot's rows: {s}");
    }
    // Clock stopped. Before the agent goes: its head unchanged and acknowledged
    // for a second (a last group still syncing when the clock stopped would
    // show here; see `settled`).
    let mut stable = Instant::now();
    while stable.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
        let Some(now) = pair.stream_status() else {
            continue;
        };
        let h = now["head_seq"].as_u64().unwrap_or(0);
        if h != head_seq || now["acked_seq"].as_u64() != Some(h) {
            if h != head_seq {
                eprintln!("  (snapshot: head_seq {head_seq} → {h} after the clock stopped)");
            }
            head_seq = h;
            stable = Instant::now();
        }
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
    Ok(FerryRun {
        secs,
        buffered_secs,
        agent_hwm_kib,
        agent_cpu,
        exchange_cpu,
        head_seq,
    })
}

struct Streaming {
    decode_secs: f64,
    decode_cpu: f64,
    stream: FerryRun,
}

struct Run {
    /// The machine's 1-minute load average as the run began (`/proc/loadavg`).
    loadavg: f64,
    load: Loaded,
    /// `None` with `--snapshot-only`.
    streaming: Option<Streaming>,
    /// Per snapshot pair (`--snapshot-pairs`): `mariadb-dump`'s seconds and
    /// Ferry's snapshot, each on the settled server, in alternating order.
    snapshots: Vec<(f64, FerryRun)>,
}

fn one_run(ctx: &Ctx, base: &Path, r: usize, rows: u64, opts: &Opts) -> Result<Run> {
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let server_id = 100 + 2 * r as u32;
    let mut start = fresh_table(ctx);
    let d = base.join(format!("stream-{r}"));
    let pair = if opts.snapshot_only {
        None
    } else {
        let (pair, at) = ferry_prepare(ctx, &d, server_id, &start)?;
        start = at;
        Some(pair)
    };
    let load = load(ctx, start, rows);
    eprintln!(
        "  {} changes in {:.1} s, binlog {} to {}",
        load.changes(),
        load.secs,
        load.start,
        load.end
    );
    let streaming = match pair {
        None => None,
        Some(pair) => {
            let (stream, (decode_secs, decode_cpu)) = in_turn(
                ctx,
                r,
                || ferry_stream(ctx, pair, &load),
                || binlog_decode(ctx, &load),
            )?;
            binlog_check(ctx, &load)?;
            std::fs::remove_dir_all(&d)?;
            eprintln!(
                "  ferry streaming {:.1} s (buffered {:.1} s, {} records)",
                stream.secs, stream.buffered_secs, stream.head_seq
            );
            Some(Streaming {
                decode_secs,
                decode_cpu,
                stream,
            })
        }
    };
    // A snapshot pair takes seconds where a load and its settling take half a
    // minute: several pairs per load give the noisy sub-second timings more
    // samples. Each agent is a fresh one, with a server id of its own.
    let mut snapshots = Vec::new();
    for p in 0..opts.snapshot_pairs {
        let d = base.join(format!("snapshot-{r}-{p}"));
        let snapshot_id = 1000 + (r * opts.snapshot_pairs + p) as u32;
        let (snapshot, dump_secs) = in_turn(
            ctx,
            r + p,
            || ferry_snapshot(ctx, &d, snapshot_id, load.remaining),
            || dump(ctx),
        )?;
        eprintln!("  mariadb-dump {dump_secs:.2} s");
        std::fs::remove_dir_all(&d)?;
        eprintln!(
            "  ferry snapshot {:.2} s (buffered {:.2} s, {} records, agent CPU {:.2} s)",
            snapshot.secs, snapshot.buffered_secs, snapshot.head_seq, snapshot.agent_cpu
        );
        snapshots.push((dump_secs, snapshot));
    }
    Ok(Run {
        loadavg,
        load,
        streaming,
        snapshots,
    })
}

/// What `main`'s arguments ask of each run.
struct Opts {
    snapshot_only: bool,
    snapshot_pairs: usize,
}

fn main() -> Result<()> {
    let mut runs = 3usize;
    let mut rows = 1_000_000u64;
    let mut opts = Opts {
        snapshot_only: false,
        snapshot_pairs: 3,
    };
    let mut buffer_pool_mib = 512u64;
    let mut insert_txns = INSERT_TXNS;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .context("missing value")
                .and_then(|v| v.replace('_', "").parse::<u64>().context("not a number"))
        };
        match a.as_str() {
            "--runs" => runs = val()? as usize,
            "--rows" => rows = val()?,
            "--buffer-pool-mib" => buffer_pool_mib = val()?,
            "--insert-txns" => insert_txns = val()?.max(1),
            "--snapshot-only" => opts.snapshot_only = true,
            "--snapshot-pairs" => opts.snapshot_pairs = val()? as usize,
            other => bail!(
                "unknown argument {other}; use --runs N --rows N --insert-txns N --buffer-pool-mib N \
                 --snapshot-only --snapshot-pairs N"
            ),
        }
    }
    if runs == 0 || rows < 10 || opts.snapshot_pairs == 0 {
        bail!("--runs and --snapshot-pairs must be at least 1, --rows at least 10");
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
        .prefix("ferry-mysql-bench")
        .tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let password_file = base.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n"))?;
    let db = MariaDb::start();
    db.replication_user("shop", USER, PASSWORD);
    db.sql(&format!(
        "SET GLOBAL innodb_buffer_pool_size = {}",
        buffer_pool_mib << 20
    ));
    let ctx = Ctx {
        db,
        insert_txns,
        password_file,
        buffer_pool_mib,
    };
    let version = ctx.db.sql("SELECT VERSION()");

    let mut results = Vec::new();
    for r in 0..runs {
        eprintln!("run {}/{runs}", r + 1);
        match one_run(&ctx, base.path(), r, rows, &opts) {
            Ok(run) => results.push(run),
            Err(e) => {
                // The daemons' logs and stores stay for a look.
                let kept = base.keep();
                bail!(
                    "run {} failed (files kept in {}): {e:#}",
                    r + 1,
                    kept.display()
                );
            }
        }
    }
    report(&ctx, &version, rows, opts.snapshot_pairs, &results);
    Ok(())
}

fn report(ctx: &Ctx, version: &str, rows: u64, pairs: usize, results: &[Run]) {
    let runs = results.len();
    let first = &results[0].load;
    let k = |x: f64| format!("{:.0}k", x / 1000.0);
    let list = |v: &[f64], fmt: &dyn Fn(f64) -> String| {
        v.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(", ")
    };
    let ratios = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let streamed: Vec<(&Run, &Streaming)> = results
        .iter()
        .filter_map(|r| r.streaming.as_ref().map(|s| (r, s)))
        .collect();
    let of = |f: &dyn Fn(&Run, &Streaming) -> f64| -> Vec<f64> {
        streamed.iter().map(|(r, s)| f(r, s)).collect()
    };
    let decode = of(&|r, s| r.load.changes() as f64 / s.decode_secs);
    let ferry = of(&|r, s| r.load.changes() as f64 / s.stream.secs);
    let stream_ratio = of(&|_, s| s.decode_secs / s.stream.secs);
    let ferry_buffered = of(&|r, s| r.load.changes() as f64 / s.stream.buffered_secs);
    let ferry_buffered_ratio = of(&|_, s| s.decode_secs / s.stream.buffered_secs);
    let each = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { results.iter().map(f).collect() };
    let load = each(&|r| r.load.changes() as f64 / r.load.secs);
    // Every snapshot pair of every run, with the rows its table held.
    let snapshots: Vec<(u64, f64, &FerryRun)> = results
        .iter()
        .flat_map(|r| r.snapshots.iter().map(|(d, s)| (r.load.remaining, *d, s)))
        .collect();
    let pair = |f: &dyn Fn(f64, f64, &FerryRun) -> f64| -> Vec<f64> {
        snapshots
            .iter()
            .map(|&(rows, dump, s)| f(rows as f64, dump, s))
            .collect()
    };
    let dump = pair(&|rows, d, _| rows / d);
    let snap = pair(&|rows, _, s| rows / s.secs);
    let snap_ratio = pair(&|_, d, s| d / s.secs);
    let buffered = pair(&|rows, _, s| rows / s.buffered_secs);
    let buffered_ratio = pair(&|_, d, s| d / s.buffered_secs);

    println!(
        "MariaDB {version} (binlog ROW, sync_binlog = 0, innodb_flush_log_at_trx_commit = 2, buffer pool {} MiB), \
         {} row changes per run: {} INSERTs in {} transactions, then {} UPDATEs and {} DELETEs in \
         {CHANGE_TXNS} transactions each; snapshot of the {} rows left; {runs} runs, {pairs} snapshot pairs each",
        ctx.buffer_pool_mib,
        first.changes(),
        first.inserts,
        ctx.insert_txns,
        first.updates,
        first.deletes,
        first.remaining,
    );
    println!();
    println!("```sh");
    println!(
        "target/release/mysql-bench --runs {runs} --rows {rows} --insert-txns {} --snapshot-pairs {pairs}",
        ctx.insert_txns
    );
    println!(
        "mariadb-binlog --read-from-remote-server --host=127.0.0.1 --port=P --user=ferry --password=… \\\n    \
         --verbose --base64-output=DECODE-ROWS --start-position=START --stop-position=END binlog.NNNNNN > /dev/null"
    );
    println!(
        "mariadb-dump --host=127.0.0.1 --port=P --user=ferry --password=… --quick --single-transaction shop t > /dev/null"
    );
    println!("```");
    println!();
    println!("| figure | median | runs |");
    println!("| --- | --- | --- |");
    println!(
        "| machine load average (1 min) as the run began | | {} |",
        results
            .iter()
            .map(|r| format!("{:.1}", r.loadavg))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| load (mariadb client), changes/s | {} | {} |",
        k(median(&load)),
        list(&load, &k)
    );
    if !streamed.is_empty() {
        println!(
            "| mariadb-binlog -R --verbose --base64-output=DECODE-ROWS → /dev/null, changes/s | {} | {} |",
            k(median(&decode)),
            list(&decode, &k)
        );
        println!(
            "| CPU seconds mariadb-binlog | | {} |",
            streamed
                .iter()
                .map(|(_, s)| format!("{:.1}", s.decode_cpu))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "| Ferry streaming e2e durable, changes/s | {} ({:.2}× mariadb-binlog) | {} |",
            k(median(&ferry)),
            median(&stream_ratio),
            list(&ferry, &k)
        );
        println!(
            "| ratio Ferry streaming / mariadb-binlog | {:.2} | {} |",
            median(&stream_ratio),
            ratios(&stream_ratio)
        );
        println!(
            "| Ferry streaming into the agent's durable buffer, changes/s | {} ({:.2}× mariadb-binlog) | {} |",
            k(median(&ferry_buffered)),
            median(&ferry_buffered_ratio),
            list(&ferry_buffered, &k)
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
                .map(|(_, s)| format!("{:.2} / {:.2}", s.stream.agent_cpu, s.stream.exchange_cpu))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "| mariadb-dump --quick --single-transaction → /dev/null, rows/s | {} | {} |",
        k(median(&dump)),
        list(&dump, &k)
    );
    println!(
        "| Ferry initial snapshot e2e durable, rows/s | {} ({:.2}× mariadb-dump) | {} |",
        k(median(&snap)),
        median(&snap_ratio),
        list(&snap, &k)
    );
    println!(
        "| ratio Ferry snapshot / mariadb-dump | {:.2} | {} |",
        median(&snap_ratio),
        ratios(&snap_ratio)
    );
    println!(
        "| Ferry initial snapshot into the agent's durable buffer, rows/s | {} ({:.2}× mariadb-dump) | {} |",
        k(median(&buffered)),
        median(&buffered_ratio),
        list(&buffered, &k)
    );
    println!(
        "| agent peak RSS, snapshot | {} | {} |",
        mib(snapshots
            .iter()
            .map(|(_, _, s)| s.agent_hwm_kib)
            .max()
            .unwrap_or(0)),
        snapshots
            .iter()
            .map(|(_, _, s)| mib(s.agent_hwm_kib))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| CPU seconds agent / exchange, snapshot | | {} |",
        snapshots
            .iter()
            .map(|(_, _, s)| format!("{:.2} / {:.2}", s.agent_cpu, s.exchange_cpu))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
