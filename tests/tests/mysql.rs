//! The mysql source end to end with real processes: a throwaway MariaDB
//! (`ferry_tests::mysql`), the real agent and exchange over QUIC. While a
//! writer keeps changing the table, the agent is killed with `kill -9` twenty
//! times, during the initial snapshot and during streaming; at the end the
//! exchange's records, applied by primary key, equal the table row by row, and
//! every streamed change arrived exactly once. The same over a lossy link that
//! is cut for a while, with the exchange killed and restarted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::faults::{Faults, UdpProxy};
use ferry_tests::mysql::MariaDb;
use ferry_tests::{note, wait_until, Agent, Exchange, TestDir, LONG};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const AGENT: &str = "hp-sb-01";
const DEPT: &str = "210102005";
const STREAM: &str = "residents";
/// Rows in the table before the agent first starts.
const ROWS: u64 = 20_000;

type Row = BTreeMap<String, Option<String>>;

/// `[[stream]]` for a `mysql` source.
fn mysql_stream(dsn: &str, password_file: &std::path::Path, extra: &str) -> String {
    format!(
        "\n[[stream]]\nname = \"{STREAM}\"\ncatalog_id = \"210100-MZ-0007\"\nsharing = \"conditional\"\n\
         source = {{ kind = \"mysql\", dsn = \"{dsn}\", password_file = \"{}\", server_id = 4242, \
         tables = [\"shop.person\"], {extra} }}\n",
        password_file.display()
    )
}

/// Keeps changing `shop.person` in transactions of a few statements (one in
/// ten rolled back) until `stop`; returns how many committed.
fn write_until(db: &MariaDb, stop: &AtomicBool) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut next_id = ROWS as i64 + 1;
    let mut committed = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut sql = String::from("BEGIN;");
        for _ in 0..rng.random_range(1..5) {
            let id = rng.random_range(1..next_id);
            sql.push_str(&match rng.random_range(0..4) {
                0 => {
                    next_id += 1;
                    format!(
                        "INSERT INTO shop.person VALUES ({next_id}, '哈尔滨', {next_id}.25, 'new');"
                    )
                }
                1 => format!("DELETE FROM shop.person WHERE id = {id};"),
                2 => format!(
                    "UPDATE shop.person SET amount = amount + 1, note = 'u{committed}' WHERE id BETWEEN {id} AND {};",
                    id + 20
                ),
                _ => format!("UPDATE shop.person SET name = '大连', note = 'n{committed}' WHERE id = {id};"),
            });
        }
        let rollback = rng.random_range(0..10) == 0;
        sql.push_str(if rollback { "ROLLBACK;" } else { "COMMIT;" });
        if db.try_sql(&sql).is_ok() && !rollback {
            committed += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..20)));
    }
    committed
}

/// Values of a record's `columns`/`old_key` object, as text.
fn columns(v: &Value) -> Row {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string)))
                .collect()
        })
        .unwrap_or_default()
}

/// Applies the exchange's records by primary key; checks that no streamed
/// change came twice. Returns the table and (snapshot rows, streamed changes).
fn apply(records: &[Value]) -> (BTreeMap<i64, Row>, usize, usize) {
    let mut table = BTreeMap::new();
    let mut seen = HashSet::new();
    let (mut snapshot, mut streamed) = (0, 0);
    let id_of = |r: &Row| -> i64 { r["id"].as_deref().unwrap().parse().unwrap() };
    for r in records {
        let Some(row) = r.get("row") else { continue };
        if row["snapshot"] == true {
            snapshot += 1;
        } else {
            streamed += 1;
            let at = (
                row["source_position"].as_str().unwrap().to_string(),
                row["change"].as_u64().unwrap(),
            );
            assert!(seen.insert(at.clone()), "change {at:?} arrived twice");
        }
        match row["op"].as_str().unwrap() {
            "insert" | "update" => {
                if let Some(old) = row.get("old_key") {
                    table.remove(&id_of(&columns(old)));
                }
                let c = columns(&row["columns"]);
                table.insert(id_of(&c), c);
            }
            "delete" => {
                table.remove(&id_of(&columns(&row["old_key"])));
            }
            op => panic!("unexpected op {op} in {r}"),
        }
    }
    (table, snapshot, streamed)
}

/// The table as the server has it.
fn table_rows(db: &MariaDb) -> BTreeMap<i64, Row> {
    let out = db.sql("SELECT id, name, amount, note FROM shop.person ORDER BY id");
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let row: Row = ["id", "name", "amount", "note"]
                .iter()
                .zip(&f)
                .map(|(c, v)| (c.to_string(), (*v != "NULL").then(|| v.to_string())))
                .collect();
            (f[0].parse().unwrap(), row)
        })
        .collect()
}

/// A throwaway MariaDB with `shop.person` of [`ROWS`] rows and the capture
/// user, whose password is in the returned file.
fn database(t: &TestDir) -> (Arc<MariaDb>, PathBuf) {
    let db = Arc::new(MariaDb::start());
    db.replication_user("shop", "ferry", "s3cret");
    db.sql(
        "CREATE TABLE shop.person (id BIGINT PRIMARY KEY, name VARCHAR(32) CHARACTER SET gbk,
           amount DECIMAL(20,4), note VARCHAR(64));",
    );
    db.sql(&format!(
        "INSERT INTO shop.person SELECT seq, '沈阳市', seq / 3, CONCAT('n', seq) FROM shop.seq_1_to_{ROWS}"
    ));
    let pw = t.path().join("mysql.pass");
    std::fs::write(&pw, "s3cret\n").unwrap();
    (db, pw)
}

/// A writer thread changing the table until the flag is set.
fn writer(db: &Arc<MariaDb>) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (d, s) = (Arc::clone(db), Arc::clone(&stop));
    (stop, std::thread::spawn(move || write_until(&d, &s)))
}

/// Stops the writer, waits until a marker row is at the exchange with
/// everything acknowledged, and checks: no stream error, no gap, every row of
/// the table as the records applied by key give it, no streamed change twice.
fn converge(
    ex: &Exchange,
    agent: &mut Agent,
    db: &MariaDb,
    writer: (Arc<AtomicBool>, std::thread::JoinHandle<u64>),
) {
    std::thread::sleep(Duration::from_secs(1));
    writer.0.store(true, Ordering::Relaxed);
    let committed = writer.1.join().unwrap();
    assert!(
        committed > 50,
        "the writer committed {committed} transactions"
    );
    // A marker row: once it is at the exchange, so is everything before it.
    db.sql("INSERT INTO shop.person VALUES (999999999, '标记', 0, 'marker')");
    wait_until(LONG, "the marker row at the exchange", || {
        let s = agent.stream_status(STREAM);
        s["acked_seq"] == s["head_seq"]
            && ex
                .records(AGENT, STREAM)
                .iter()
                .rev()
                .take(50)
                .any(|r| r["row"]["columns"]["id"] == "999999999")
    });
    let st = agent.stream_status(STREAM);
    assert!(
        st["ship_error"].is_null() && st["source_error"].is_null(),
        "the stream reports no error: {st}"
    );
    let records = ex.records(AGENT, STREAM);
    let (got, snapshot, streamed) = apply(&records);
    note(format!(
        "{snapshot} snapshot rows and {streamed} streamed changes; {committed} transactions committed"
    ));
    // The writer runs from before the snapshot, so some rows may be gone.
    assert!(
        snapshot >= ROWS as usize * 9 / 10,
        "{snapshot} snapshot rows"
    );
    let want = table_rows(db);
    assert_eq!(got.len(), want.len(), "rows at the exchange vs the table");
    for (id, row) in &want {
        assert_eq!(got.get(id), Some(row), "row {id}");
    }
    assert!(ex.gaps(AGENT, STREAM).is_empty());
}

#[test]
fn kill_9_during_snapshot_and_streaming_loses_and_repeats_nothing() {
    let t = TestDir::new("mysql-e2e");
    let (db, pw) = database(&t);
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    agent.add_stream(&mysql_stream(
        &db.dsn("ferry", "shop"),
        &pw,
        "snapshot = \"initial\", snapshot_chunk_rows = 500, snapshot_rows_per_second = 3000",
    ));
    let writing = writer(&db);
    agent.start();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (mut in_snapshot, mut in_stream) = (0, 0);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        let pos = agent.stream_status(STREAM)["position"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if pos.starts_with("initial snapshot") {
            in_snapshot += 1;
        } else if pos.starts_with("binlog") {
            in_stream += 1;
        }
        agent.kill9();
        agent.start();
    }
    note(format!(
        "killed the agent {in_snapshot} times during the snapshot, {in_stream} while streaming"
    ));
    assert!(
        in_snapshot >= 3 && in_stream >= 3,
        "kills during the snapshot {in_snapshot}, while streaming {in_stream}"
    );
    converge(&ex, &mut agent, &db, writing);
}

/// The harness's faults with a MySQL stream: the snapshot and the stream go
/// over a link that loses 5 % of packets, delays, reorders and duplicates them;
/// the link is cut for a while, and the exchange is killed and restarted.
#[test]
fn a_lossy_cut_link_and_a_killed_exchange_lose_and_repeat_nothing() {
    let t = TestDir::new("mysql-faults");
    let (db, pw) = database(&t);
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let proxy = UdpProxy::start(ex.address().parse().unwrap());
    proxy.set(Faults {
        drop: 0.05,
        duplicate: 0.01,
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        reorder: 0.05,
        cut: false,
    });
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    agent.set("address", &format!("\"{}\"", proxy.address()));
    agent.add_stream(&mysql_stream(
        &db.dsn("ferry", "shop"),
        &pw,
        "snapshot = \"initial\", snapshot_chunk_rows = 2000",
    ));
    let writing = writer(&db);
    agent.start();
    std::thread::sleep(Duration::from_secs(3));
    proxy.cut(true);
    std::thread::sleep(Duration::from_secs(5));
    proxy.cut(false);
    std::thread::sleep(Duration::from_secs(2));
    ex.kill9();
    std::thread::sleep(Duration::from_secs(2));
    ex.start();
    std::thread::sleep(Duration::from_secs(2));
    converge(&ex, &mut agent, &db, writing);
    note(format!("proxy: {:?}", proxy.stats()));
}

/// One transaction of 1,000,000 rows: the agent commits it in pieces as it
/// reads it (it never holds the whole transaction), is killed with `kill -9`
/// while pieces of it are durable and the rest is not, and resumes inside it.
/// Every row arrives at the exchange exactly once, numbered 0..1,000,000 in
/// its transaction, the last one marked last; no gap.
#[test]
fn a_million_row_transaction_is_captured_in_pieces_through_kills() {
    const BIG: u64 = 1_000_000;
    let t = TestDir::new("mysql-big-txn");
    let db = MariaDb::start();
    db.replication_user("shop", "ferry", "s3cret");
    db.sql("CREATE TABLE shop.big (id BIGINT PRIMARY KEY, v VARCHAR(16) CHARACTER SET gbk)");
    let pw = t.path().join("mysql.pass");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    agent.add_stream(
        &mysql_stream(&db.dsn("ferry", "shop"), &pw, "snapshot = \"never\"")
            .replace("shop.person", "shop.big"),
    );
    agent.start();
    wait_until(LONG, "the starting position durable", || {
        agent.stream_status(STREAM)["position"]
            .as_str()
            .is_some_and(|p| p.starts_with("binlog"))
    });
    db.sql(&format!(
        "INSERT INTO shop.big SELECT seq, CONCAT('沈', seq) FROM shop.seq_1_to_{BIG}"
    ));
    // Killed while the transaction is part durable, each time further in.
    let mut kills = 0;
    let mut peak_kib = 0;
    let mut last_done = 0u64;
    while kills < 3 {
        let pos = wait_until_value(&mut agent, |p| {
            let done = p
                .split_once("; ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())?;
            (p.contains("of the transaction beginning at") && done > last_done)
                .then_some((p.to_string(), done))
        });
        let Some((pos, done)) = pos else { break };
        last_done = done;
        if let Some(pid) = agent.pid() {
            peak_kib = peak_kib.max(ferry_tests::bench::rss_kib(pid as u32, "VmHWM:"));
        }
        note(format!("kill -9 at {pos}"));
        agent.kill9();
        agent.start();
        kills += 1;
    }
    assert!(
        kills >= 1,
        "the agent was never killed inside the transaction"
    );
    wait_until(LONG, "the whole transaction acknowledged", || {
        let s = agent.stream_status(STREAM);
        s["acked_seq"] == s["head_seq"]
            && s["position"].as_str().is_some_and(|p| !p.contains("; "))
            && s["head_seq"].as_u64().unwrap_or(0) >= BIG
    });
    if let Some(pid) = agent.pid() {
        peak_kib = peak_kib.max(ferry_tests::bench::rss_kib(pid as u32, "VmHWM:"));
    }
    let mut seen = vec![false; BIG as usize];
    let (mut rows, mut last_flags, mut txns) = (0u64, 0, HashSet::new());
    ex.each_record_from(AGENT, STREAM, 1, |seq, r| {
        let Some(row) = r.get("row") else { return };
        let id: u64 = row["columns"]["id"].as_str().unwrap().parse().unwrap();
        let change = row["change"].as_u64().unwrap();
        assert_eq!(change, id - 1, "seq {seq}: row {id} numbered {change}");
        assert!(
            !std::mem::replace(&mut seen[change as usize], true),
            "row {id} twice"
        );
        if row["last_in_txn"] == true {
            last_flags += 1;
            assert_eq!(id, BIG, "seq {seq}: only the last row is marked last");
        }
        assert_eq!(row["columns"]["v"], format!("沈{id}"));
        txns.insert(row["source_position"].as_str().unwrap().to_string());
        rows += 1;
    });
    assert_eq!(rows, BIG, "every row once");
    assert_eq!(last_flags, 1);
    assert_eq!(txns.len(), 1, "one transaction: {txns:?}");
    assert!(ex.gaps(AGENT, STREAM).is_empty());
    note(format!(
        "{kills} kills inside the transaction; agent peak RSS {} MiB",
        peak_kib / 1024
    ));
    // The whole transaction as records would be about a gigabyte in memory.
    assert!(
        peak_kib < 256 * 1024,
        "the agent's peak RSS was {peak_kib} KiB: it held the transaction"
    );
}

/// Polls the stream's position line until `f` takes it; `None` once the
/// position no longer names a transaction in pieces (it ended).
fn wait_until_value<T>(agent: &mut Agent, f: impl Fn(&str) -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + LONG;
    while std::time::Instant::now() < deadline {
        let s = agent.stream_status(STREAM);
        let pos = s["position"].as_str().unwrap_or_default().to_string();
        if let Some(v) = f(&pos) {
            return Some(v);
        }
        if s["acked_seq"] == s["head_seq"]
            && s["head_seq"].as_u64().unwrap_or(0) > 0
            && !pos.contains("; ")
        {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the stream's position never moved on");
}
