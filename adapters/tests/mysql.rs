//! The mysql source against a real MariaDB server (see `ferry_tests::mysql`), with
//! the in-test buffer of `support::committer` that can crash and restart it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use ferry_adapters::mysql::{MysqlConfig, MysqlSource};
use ferry_adapters::KindConfig;
use ferry_protocol::messages::{Record, RowOp, ValueType};
use ferry_tests::mysql::MariaDb;
use support::committer::{Running, Store};
use support::model::{rows, schemas, text, Model, Row};

const PLACE: &str = "CREATE TABLE shop.place (
    id INT PRIMARY KEY,
    name_gbk VARCHAR(32) CHARACTER SET gbk,
    name_utf8 VARCHAR(64) CHARACTER SET utf8mb4,
    amount DECIMAL(30,10),
    at DATETIME(3),
    data BLOB) ENGINE=InnoDB";

const COLUMNS: [&str; 6] = ["id", "name_gbk", "name_utf8", "amount", "at", "data"];

/// A server with database `shop`, table `shop.place`, and the replication user
/// `ferry` whose password is in a file; the source's config for it.
fn setup() -> (MariaDb, MysqlConfig, tempfile::TempDir) {
    let db = MariaDb::start();
    db.replication_user("shop", "ferry", "s3cret");
    db.sql(PLACE);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let mut cfg = MysqlConfig::new(db.dsn("ferry", "shop"), &["shop.place"], 4242);
    cfg.password_file = Some(pw);
    cfg.validate().unwrap();
    (db, cfg, dir)
}

fn start(store: &Store, cfg: &MysqlConfig) -> Running {
    store.start_source(Box::new(MysqlSource::new(cfg.clone())))
}

/// Starts the source and waits until its starting position is durable.
async fn started(store: &Store, cfg: &MysqlConfig) -> Running {
    let mut run = start(store, cfg);
    run.wait_for("the starting position", 30, || {
        store.raw_position().is_some()
    })
    .await;
    run
}

/// The table as the server has it, keyed and rendered like the model
/// (`data` as `\x` + hex, as the model renders bytes).
fn db_state(db: &MariaDb, extra: &[&str]) -> BTreeMap<Vec<String>, Row> {
    let mut cols: Vec<&str> = COLUMNS.to_vec();
    cols.extend(extra);
    let select: Vec<String> = cols
        .iter()
        .map(|c| match *c {
            "at" => "CAST(at AS CHAR)".to_string(),
            "data" => "LOWER(HEX(data))".to_string(),
            c => c.to_string(),
        })
        .collect();
    let out = db.sql(&format!(
        "SELECT {} FROM shop.place ORDER BY id",
        select.join(", ")
    ));
    let mut state = BTreeMap::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let mut row = Row::new();
        for (c, v) in cols.iter().zip(line.split('\t')) {
            let v = (v != "NULL").then(|| {
                if *c == "data" {
                    format!("\\x{v}")
                } else {
                    unescape_batch(v)
                }
            });
            row.insert(c.to_string(), v);
        }
        state.insert(vec![row["id"].clone().unwrap()], row);
    }
    state
}

/// A value as the client's batch mode printed it, with its escapes undone.
fn unescape_batch(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Inserts a marker row and waits until the capture has it: everything
/// committed before it has arrived too.
async fn catch_up(db: &MariaDb, run: &mut Running, store: &Store, id: i32) {
    db.sql(&format!(
        "INSERT INTO shop.place (id, name_utf8) VALUES ({id}, 'marker')"
    ));
    let want = id.to_string();
    run.wait_for("the marker row", 60, || {
        store.any_record(|r| {
            support::model::record_rows(r).iter().any(|c| {
                c.columns
                    .iter()
                    .any(|f| f.name == "id" && text(f).as_deref() == Some(want.as_str()))
            })
        })
    })
    .await;
}

/// Every change appears once, and each transaction's changes are numbered
/// 0.. with `last_in_txn` on the last, all sharing one position and txn.
fn assert_transactions_whole(records: &[Record]) {
    let mut by_pos: BTreeMap<Vec<u8>, Vec<(u32, bool, String)>> = BTreeMap::new();
    for c in rows(records).into_iter().filter(|c| !c.snapshot) {
        assert_eq!(c.source, "mysql");
        by_pos.entry(c.position.clone()).or_default().push((
            c.change_index,
            c.last_in_txn,
            c.txn.clone(),
        ));
    }
    for (pos, changes) in by_pos {
        let pos = String::from_utf8(pos).unwrap();
        assert!(pos.starts_with("binlog.") && pos.contains(':'), "{pos}");
        let idx: Vec<u32> = changes.iter().map(|c| c.0).collect();
        let want: Vec<u32> = (0..changes.len() as u32).collect();
        assert_eq!(
            idx, want,
            "transaction at {pos}: changes missing, repeated or out of order"
        );
        let lasts: Vec<bool> = changes.iter().map(|c| c.1).collect();
        let mut want_last = vec![false; changes.len()];
        *want_last.last_mut().unwrap() = true;
        assert_eq!(
            lasts, want_last,
            "transaction at {pos}: last_in_txn misplaced"
        );
        let txn = &changes[0].2;
        assert!(
            txn.split('-').count() == 3 && changes.iter().all(|c| &c.2 == txn),
            "transaction at {pos}: txn {txn:?} is not one MariaDB GTID"
        );
    }
}

/// Inserts, updates (one of them changing the key) and deletes across a few
/// transactions, with GBK and utf8mb4 text, an exact decimal, a DATETIME(3) and
/// a BLOB, then a column added by DDL: the records, applied by key, give the
/// table the server has, with the shape announced before the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_arrive_as_the_table_has_them() {
    let (db, cfg, _dir) = setup();
    let store = Store::new();
    let mut run = started(&store, &cfg).await;

    db.sql(
        "BEGIN;
         INSERT INTO shop.place VALUES
           (1, '沈阳市', '沈阳 😀', 12345.6789, '2026-01-02 03:04:05.678', X'00ff10'),
           (2, '大连', 'Dalian', -0.0000000001, '2026-02-03 04:05:06.000', X''),
           (3, '哈尔滨', '哈尔滨', 99999999999999999999.9999999999, '1999-12-31 23:59:59.999', NULL);
         COMMIT;",
    );
    db.sql(
        "BEGIN;
         UPDATE shop.place SET amount = amount + 1, name_gbk = '大连市' WHERE id = 2;
         UPDATE shop.place SET id = 20 WHERE id = 2;
         DELETE FROM shop.place WHERE id = 3;
         COMMIT;",
    );
    db.sql("INSERT INTO shop.place (id, name_gbk) VALUES (4, NULL), (5, '沈阳市')");
    db.sql("ALTER TABLE shop.place ADD COLUMN note VARCHAR(10) CHARACTER SET latin1");
    db.sql("UPDATE shop.place SET note = 'café'");
    catch_up(&db, &mut run, &store, 999).await;
    run.stop().await.unwrap_err();

    let records = store.records();
    let model = Model::apply_all(&records);
    let expected = db_state(&db, &["note"]);
    support::model::assert_same(&model.table("shop.place"), &expected);
    assert_eq!(
        expected[&vec!["1".to_string()]]["name_gbk"].as_deref(),
        Some("沈阳市")
    );
    assert_eq!(
        expected[&vec!["20".to_string()]]["name_gbk"].as_deref(),
        Some("大连市")
    );
    assert_transactions_whole(&records);

    // The shape, before the first row, and again after the DDL.
    let tables = schemas(&records);
    assert!(tables.len() >= 2, "{tables:?}");
    let first = &tables[0];
    let ty = |name: &str| first.columns.iter().find(|c| c.name == name).unwrap();
    assert!(ty("id").key && !ty("name_gbk").key);
    assert_eq!(ty("amount").value_type, ValueType::Decimal as i32);
    assert_eq!(
        (ty("amount").precision, ty("amount").scale),
        (Some(30), Some(10))
    );
    assert_eq!(ty("name_gbk").value_type, ValueType::Text as i32);
    assert_eq!(ty("data").value_type, ValueType::Bytes as i32);
    assert_eq!(ty("at").value_type, ValueType::Timestamp as i32);
    assert_eq!(ty("at").source_type, "datetime(3)");
    assert_eq!(first.identity, "primary key");
    assert!(tables
        .last()
        .unwrap()
        .columns
        .iter()
        .any(|c| c.name == "note"));

    // old_key: the key update and the delete carry the old key only.
    let changes = rows(&records);
    let key_update = changes
        .iter()
        .find(|c| {
            c.op == RowOp::Update as i32
                && c.columns
                    .iter()
                    .any(|f| f.name == "id" && text(f).as_deref() == Some("20"))
                && !c.old_key.is_empty()
        })
        .expect("the update that changed the key");
    assert_eq!(key_update.old_key.len(), 1);
    assert_eq!(text(&key_update.old_key[0]).as_deref(), Some("2"));
    let delete = changes
        .iter()
        .find(|c| c.op == RowOp::Delete as i32)
        .unwrap();
    assert_eq!(text(&delete.old_key[0]).as_deref(), Some("3"));
    let plain_update = changes
        .iter()
        .find(|c| c.op == RowOp::Update as i32 && c.old_key.is_empty());
    assert!(
        plain_update.is_some(),
        "an update that kept its key has no old_key"
    );

    // status and metrics read the stored position.
    let p = store.raw_position().unwrap();
    let kind = cfg.kind();
    assert!(
        kind.describe_position(&p).starts_with("binlog binlog."),
        "{}",
        kind.describe_position(&p)
    );
    assert!(kind
        .position_gauges(&p)
        .iter()
        .any(|(n, v)| *n == "mysql_binlog_pos" && *v > 4));
}

/// A crash in the middle of a transaction split over several commits, and
/// binlog rotations before and while the source is down: after the restart
/// nothing is missing and nothing is there twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_and_rotations_lose_and_repeat_nothing() {
    let (db, cfg, _dir) = setup();
    let store = Store::new();
    let mut run = started(&store, &cfg).await;

    for i in 1..=3 {
        db.sql(&format!(
            "INSERT INTO shop.place (id, name_gbk, amount) VALUES ({i}, '哈尔滨', {i}.5)"
        ));
    }
    db.sql("FLUSH BINARY LOGS");
    db.sql("UPDATE shop.place SET name_utf8 = 'rotated' WHERE id = 1");
    catch_up(&db, &mut run, &store, 100).await;
    assert!(
        store.position().unwrap()["file"].as_str().unwrap() != "binlog.000001",
        "the position followed the rotation: {:?}",
        store.position()
    );

    // 12,000 rows in one transaction: two commits; the second one crashes.
    store.crash_after(1);
    db.sql(
        "INSERT INTO shop.place (id, name_gbk, name_utf8, amount)
         SELECT 1000 + seq, '大连', CONCAT('row ', seq), seq / 7 FROM shop.seq_1_to_12000",
    );
    run.ended(60).await.unwrap_err();
    let p = store.position().unwrap();
    // The first piece: the changes read when it passed 10,000, but the last.
    let done = p["partial"]["done"].as_u64().unwrap();
    assert!((10_000..12_000).contains(&done), "{p}");

    // While the source is down: more changes and another rotation.
    db.sql("UPDATE shop.place SET amount = amount * 2 WHERE id BETWEEN 1001 AND 1100");
    db.sql("FLUSH BINARY LOGS");
    db.sql("DELETE FROM shop.place WHERE id BETWEEN 2001 AND 2500");
    db.sql("BEGIN; UPDATE shop.place SET id = 5 WHERE id = 3; DELETE FROM shop.place WHERE id = 2; COMMIT;");

    let mut run = start(&store, &cfg);
    catch_up(&db, &mut run, &store, 200).await;
    run.stop().await.unwrap_err();

    let records = store.records();
    assert_transactions_whole(&records);
    let big = rows(&records)
        .into_iter()
        .filter(|c| {
            c.op == RowOp::Insert as i32
                && text(&c.columns[0])
                    .and_then(|id| id.parse::<i32>().ok())
                    .is_some_and(|id| (1001..=13000).contains(&id))
        })
        .count();
    assert_eq!(big, 12_000, "every row of the split transaction, once");
    let model = Model::apply_all(&records);
    support::model::assert_same(&model.table("shop.place"), &db_state(&db, &[]));
}

/// A table of `source.tables` that does not exist stops the stream with a
/// fatal error that names it, rather than a restart loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_fatal_and_named() {
    let (db, mut cfg, _dir) = setup();
    cfg.tables.push("shop.nope".into());
    let store = Store::new();
    let run = start(&store, &cfg);
    let e = run.ended(30).await.unwrap_err();
    assert!(e.is_fatal(), "{e}");
    assert!(e.to_string().contains("shop.nope"), "{e}");

    // doctor says the same, with the fix, and finds the rest in order.
    let checks = cfg.doctor().await;
    let bad: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
    assert_eq!(bad.len(), 1, "{checks:?}");
    assert!(
        bad[0].detail.contains("shop.nope") && bad[0].fix.is_some(),
        "{bad:?}"
    );
    drop(db);
}

/// The same server id as the server's own, a wrong password: fatal, each
/// saying what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_settings_are_fatal_with_their_fix() {
    let (_db, cfg, dir) = setup();
    let mut same_id = cfg.clone();
    same_id.server_id = 1;
    let e = start(&Store::new(), &same_id).ended(30).await.unwrap_err();
    assert!(e.is_fatal() && e.to_string().contains("server_id"), "{e}");

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let mut bad_pw = cfg.clone();
    bad_pw.password_file = Some(wrong);
    let e = start(&Store::new(), &bad_pw).ended(30).await.unwrap_err();
    assert!(e.is_fatal() && e.to_string().contains("password"), "{e}");
}

/// An idle server keeps the stream alive with heartbeats: the binlog dump
/// session is the same one after longer than the source's 30 s silence limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_kept_alive_by_heartbeats() {
    let (db, cfg, _dir) = setup();
    let store = Store::new();
    let mut run = started(&store, &cfg).await;
    let dump = "SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'";
    run.wait_for("the binlog dump session", 30, || !db.sql(dump).is_empty())
        .await;
    let before = db.sql(dump);
    tokio::time::sleep(std::time::Duration::from_secs(35)).await;
    assert_eq!(db.sql(dump), before, "the binlog connection was replaced");
    catch_up(&db, &mut run, &store, 1).await;
    run.stop().await.unwrap_err();
}

/// The server killed and started again under a running stream: the source
/// reconnects (a retryable error) and resumes where its durable position is,
/// with nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_is_retried_without_loss() {
    let (mut db, cfg, _dir) = setup();
    let store = Store::new();
    let mut run = started(&store, &cfg).await;
    db.sql("INSERT INTO shop.place (id, name_gbk) VALUES (1, '沈阳市'), (2, '大连')");
    catch_up(&db, &mut run, &store, 100).await;
    db.restart();
    db.sql("UPDATE shop.place SET name_gbk = '哈尔滨' WHERE id = 2");
    db.sql("DELETE FROM shop.place WHERE id = 1");
    catch_up(&db, &mut run, &store, 101).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    assert_transactions_whole(&records);
    support::model::assert_same(
        &Model::apply_all(&records).table("shop.place"),
        &db_state(&db, &[]),
    );
}

/// Runs one instance of the source from `resume`, answering every commit at
/// once, until `done` holds for what it committed; returns the records.
async fn run_once_from(
    cfg: &MysqlConfig,
    resume: Vec<u8>,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    use ferry_adapters::{CommitRequest, Source, SourceContext};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<CommitRequest>(4);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (_acked_tx, acked) = tokio::sync::watch::channel(0);
    let ctx = SourceContext::new(0, "t".into(), Some(resume), 0, acked, shutdown.clone(), tx);
    let task = tokio::spawn(MysqlSource::new(cfg.clone()).run(ctx));
    let mut records = Vec::new();
    while !done(&records) {
        let req = tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv())
            .await
            .expect("a commit within 30 s")
            .expect("the source is running");
        records.extend(req.records.into_list().unwrap());
        let _ = req.done.send(Ok(None));
    }
    shutdown.cancel();
    let _ = task.await.unwrap();
    records
}

/// A stored position without a GTID state (a MySQL server, or MariaDB before
/// its first GTID) resumes by binlog file and offset, across a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_without_gtid_resumes_by_file_and_offset() {
    let (db, cfg, _dir) = setup();
    let store = Store::new();
    let mut run = started(&store, &cfg).await;
    db.sql("INSERT INTO shop.place (id, name_gbk) VALUES (1, '沈阳市')");
    catch_up(&db, &mut run, &store, 100).await;
    run.stop().await.unwrap_err();
    let mut p = store.position().unwrap();
    assert!(!p["gtid"].as_str().unwrap().is_empty(), "{p}");
    p.as_object_mut().unwrap().remove("gtid");

    db.sql("INSERT INTO shop.place (id, name_gbk) VALUES (2, '大连')");
    db.sql("FLUSH BINARY LOGS");
    db.sql("UPDATE shop.place SET name_gbk = '哈尔滨' WHERE id = 1");
    db.sql("INSERT INTO shop.place (id, name_utf8) VALUES (101, 'marker')");
    let mut all = store.records();
    let later = run_once_from(&cfg, serde_json::to_vec(&p).unwrap(), |r| {
        rows(r).iter().any(|c| {
            c.columns
                .iter()
                .any(|f| f.name == "id" && text(f).as_deref() == Some("101"))
        })
    })
    .await;
    let ids: Vec<String> = rows(&later)
        .iter()
        .map(|c| text(&c.columns[0]).unwrap())
        .collect();
    assert_eq!(
        ids,
        ["2", "1", "101"],
        "exactly the changes after the position"
    );
    all.extend(later);
    assert_transactions_whole(&all);
    support::model::assert_same(
        &Model::apply_all(&all).table("shop.place"),
        &db_state(&db, &[]),
    );
}

/// Changes read after the table was altered (the source was down during the
/// migration): rows of the old shape are labelled from the table map's own
/// metadata (`binlog_row_metadata = FULL`), later ones from information_schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_before_an_alter_are_read_after_it() {
    let (db, cfg, _dir) = setup();
    let store = Store::new();
    let mut run = started(&store, &cfg).await;
    db.sql("INSERT INTO shop.place (id, name_gbk, amount) VALUES (1, '沈阳市', 1.5)");
    catch_up(&db, &mut run, &store, 100).await;
    run.stop().await.unwrap_err();

    db.sql(
        "INSERT INTO shop.place (id, name_gbk, at) VALUES (2, '大连', '2026-03-04 05:06:07.890')",
    );
    db.sql("UPDATE shop.place SET name_gbk = '哈尔滨', data = X'01' WHERE id = 1");
    db.sql("ALTER TABLE shop.place ADD COLUMN note VARCHAR(10) CHARACTER SET gbk");
    db.sql("UPDATE shop.place SET note = '大连'");
    db.sql("INSERT INTO shop.place (id, note) VALUES (3, '沈阳')");

    let mut run = start(&store, &cfg);
    catch_up(&db, &mut run, &store, 101).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    assert_transactions_whole(&records);
    support::model::assert_same(
        &Model::apply_all(&records).table("shop.place"),
        &db_state(&db, &["note"]),
    );
    let tables = schemas(&records);
    let from_map = tables
        .iter()
        .find(|t| t.columns.iter().any(|c| c.source_type == "varchar"))
        .expect("the old shape, from the table map");
    assert_eq!(from_map.columns.len(), 6);
    assert!(from_map.columns[0].key);
    assert_eq!(from_map.columns[3].source_type, "decimal(30,10)");
    assert!(tables
        .last()
        .unwrap()
        .columns
        .iter()
        .any(|c| c.name == "note"));
}

/// An XA transaction's changes are not supported: the stream stops with a
/// fatal error saying so rather than lose or misplace them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xa_transaction_is_refused_not_lost() {
    let (db, cfg, _dir) = setup();
    let store = Store::new();
    let run = started(&store, &cfg).await;
    db.sql("XA START 'x1'; INSERT INTO shop.place (id) VALUES (1); XA END 'x1'; XA PREPARE 'x1'; XA COMMIT 'x1';");
    db.sql("INSERT INTO shop.place (id) VALUES (2)");
    let e = run.ended(30).await.unwrap_err();
    assert!(e.is_fatal() && e.to_string().contains("XA"), "{e}");
}

/// Each column type arrives with its neutral type and in MySQL's text form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_renders_as_mysql_does() {
    let (db, mut cfg, _dir) = setup();
    db.sql(
        "CREATE TABLE shop.kinds (id INT PRIMARY KEY, ts TIMESTAMP(2) NULL, e ENUM('a','b'),
           s SET('x','y','z'), j JSON, u INT UNSIGNED, bu BIGINT UNSIGNED, ti TINYINT,
           t TIME(3), d DATE, f FLOAT, dbl DOUBLE, y YEAR, b BIT(10),
           lat VARCHAR(10) CHARACTER SET latin1, bin VARBINARY(4), tx TEXT CHARACTER SET gb2312)",
    );
    cfg.tables = vec!["shop.kinds".into()];
    let store = Store::new();
    let mut run = started(&store, &cfg).await;
    db.sql(
        "SET time_zone = '+08:00';
         INSERT INTO shop.kinds VALUES (1, '2026-01-01 11:04:05.12', 'b', 'x,z', '{\"k\": [1, 2]}',
           4294967295, 18446744073709551615, -128, '-26:03:04.5', '2026-02-28', 1.5, 2.25,
           2026, b'1000000001', 'café', X'00ff', '哈尔滨')",
    );
    run.wait_for("the row", 30, || !rows(&store.records()).is_empty())
        .await;
    run.stop().await.unwrap_err();
    let records = store.records();
    let row = &rows(&records)[0];
    let get = |n: &str| {
        let f = row.columns.iter().find(|f| f.name == n).unwrap();
        (text(f).unwrap(), ValueType::try_from(f.value_type).unwrap())
    };
    let want = [
        ("ts", "2026-01-01 03:04:05.12+00", ValueType::TimestampTz),
        ("e", "b", ValueType::Other),
        ("s", "x,z", ValueType::Other),
        ("u", "4294967295", ValueType::Int64),
        ("bu", "18446744073709551615", ValueType::Decimal),
        ("ti", "-128", ValueType::Int16),
        ("t", "-26:03:04.500", ValueType::Time),
        ("d", "2026-02-28", ValueType::Date),
        ("f", "1.5", ValueType::Float32),
        ("dbl", "2.25", ValueType::Float64),
        ("y", "2026", ValueType::Int16),
        ("b", "513", ValueType::Other),
        ("lat", "café", ValueType::Text),
        ("bin", "\\x00ff", ValueType::Bytes),
        ("tx", "哈尔滨", ValueType::Text),
    ];
    for (n, v, ty) in want {
        assert_eq!(get(n), (v.to_string(), ty), "column {n}");
    }
    let (j, jt) = get("j");
    assert_eq!(jt, ValueType::Json);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&j).unwrap(),
        serde_json::json!({"k": [1, 2]})
    );
    let table = &schemas(&records)[0];
    assert_eq!(table.columns[2].source_type, "enum('a','b')");

    // TIME(1) and TIME(2), negative ones too, as the server renders them
    // (the source reads these itself: see mysql/rows.rs).
    db.sql("CREATE TABLE shop.times (id INT PRIMARY KEY, t1 TIME(1), t2 TIME(2))");
    cfg.tables = vec!["shop.times".into()];
    let store = Store::new();
    let mut run = started(&store, &cfg).await;
    let times = [
        "00:00:00",
        "-01:00:00.5",
        "-00:00:00.01",
        "-00:00:00.99",
        "-00:00:01",
        "-00:00:01.01",
        "-00:00:01.1",
        "12:34:56.78",
        "-838:59:59.99",
        "838:59:59.99",
    ];
    for (i, t) in times.iter().enumerate() {
        db.sql(&format!(
            "INSERT INTO shop.times VALUES ({i}, '{t}', '{t}')"
        ));
    }
    run.wait_for("the rows", 30, || {
        rows(&store.records()).len() >= times.len()
    })
    .await;
    run.stop().await.unwrap_err();
    let server =
        db.sql("SELECT id, CAST(t1 AS CHAR), CAST(t2 AS CHAR) FROM shop.times ORDER BY id");
    let server: Vec<Vec<&str>> = server.lines().map(|l| l.split('\t').collect()).collect();
    let got = rows(&store.records());
    assert_eq!(got.len(), times.len());
    for (row, want) in got.iter().zip(&server) {
        let col = |n: &str| text(row.columns.iter().find(|f| f.name == n).unwrap()).unwrap();
        assert_eq!(
            [col("id"), col("t1"), col("t2")],
            [want[0], want[1], want[2]],
            "the server's rendering, then Ferry's"
        );
    }
}

/// A consistent initial snapshot of 3,000 rows, copied in pieces of 100 under
/// a rate limit while the table changes, crashed after nearly every piece and
/// then a few times while streaming: applied by key the records give the table
/// the server has, streamed changes each arrive once, and the snapshot's rows
/// came as blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_snapshot_meets_the_stream_across_crashes() {
    let (db, mut cfg, _dir) = setup();
    db.sql(
        "INSERT INTO shop.place (id, name_gbk, name_utf8, amount, at, data)
         SELECT seq, '沈阳市', CONCAT('行 ', seq, '\ttab\\\\'), seq / 7, '2026-01-02 03:04:05.678', X'00ff'
         FROM shop.seq_1_to_3000",
    );
    cfg.snapshot = ferry_adapters::mysql::SnapshotMode::Initial;
    cfg.snapshot_chunk_rows = 100;
    cfg.snapshot_rows_per_second = Some(4000);
    cfg.validate().unwrap();
    let store = Store::new();

    // Crash after one or two pieces each time, changing the table in between:
    // the copy resumes after its last durable key under a fresh view.
    let mut crashes = 0;
    for round in 0..40 {
        store.crash_after(1 + round % 2);
        let run = start(&store, &cfg);
        let ended = run.ended(60).await;
        assert!(
            matches!(ended, Err(ferry_adapters::SourceError::Shutdown)),
            "{ended:?}"
        );
        crashes += 1;
        let id = 10_000 + round;
        db.sql(&format!(
            "BEGIN;
             UPDATE shop.place SET amount = amount + 1, name_gbk = '哈尔滨' WHERE id % 40 = {};
             INSERT INTO shop.place (id, name_gbk, amount) VALUES ({id}, '大连', {round});
             DELETE FROM shop.place WHERE id = {};
             COMMIT;",
            round % 40,
            round * 70 + 3
        ));
        if store
            .position()
            .is_some_and(|p| p.get("snapshot").is_none())
        {
            break;
        }
    }
    assert!(
        crashes >= 15,
        "the snapshot crashed {crashes} times before it finished"
    );
    assert!(
        store.position().unwrap().get("snapshot").is_none(),
        "the snapshot finished: {:?}",
        store.position()
    );

    // Streaming: a few more crashes mid-transaction.
    for round in 0..5 {
        store.crash_after(0);
        let run = start(&store, &cfg);
        db.sql(&format!(
            "UPDATE shop.place SET name_utf8 = 'crash {round}' WHERE id BETWEEN 100 AND 200"
        ));
        let ended = run.ended(60).await;
        assert!(
            matches!(ended, Err(ferry_adapters::SourceError::Shutdown)),
            "{ended:?}"
        );
    }
    let mut run = start(&store, &cfg);
    catch_up(&db, &mut run, &store, 50_000).await;
    run.stop().await.unwrap_err();

    let records = store.records();
    assert_transactions_whole(&records);
    let blocks = records
        .iter()
        .filter(|r| {
            matches!(
                r.body,
                Some(ferry_protocol::messages::record::Body::Rows(_))
            )
        })
        .count();
    assert!(blocks >= 30, "snapshot rows come as blocks: {blocks}");
    let snapshot_rows: Vec<_> = rows(&records).into_iter().filter(|c| c.snapshot).collect();
    assert!(
        snapshot_rows.len() >= 2900,
        "{} snapshot rows",
        snapshot_rows.len()
    );
    let pos = String::from_utf8(snapshot_rows[0].position.clone()).unwrap();
    assert!(pos.starts_with("binlog."), "{pos}");
    let model = Model::apply_all(&records);
    support::model::assert_same(&model.table("shop.place"), &db_state(&db, &[]));
}

/// A row copied by the snapshot and the same row streamed from the binlog
/// arrive with the same values, type by type, GBK and latin1 text included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_stream_render_every_type_alike() {
    let (db, mut cfg, _dir) = setup();
    db.sql(
        "CREATE TABLE shop.kinds (id INT, ts TIMESTAMP(2) NULL, e ENUM('a','b'),
           s SET('x','y','z'), j JSON, u INT UNSIGNED, bu BIGINT UNSIGNED, ti TINYINT,
           t TIME(3), d DATE, dt DATETIME(6), f FLOAT, dbl DOUBLE, y YEAR, b BIT(10), dec_ DECIMAL(30,10),
           lat VARCHAR(10) CHARACTER SET latin1, bin VARBINARY(4), tx TEXT CHARACTER SET gb2312,
           g VARCHAR(10) CHARACTER SET utf8mb4, k VARCHAR(10) CHARACTER SET gbk, n INT NULL,
           t1 TIME(1), t2 TIME(2), PRIMARY KEY (k, id))",
    );
    let values = "'2026-01-01 11:04:05.12', 'b', 'x,z', '{\"k\": [1, 2]}',
           4294967295, 18446744073709551615, -128, '-26:03:04.5', '2026-02-28', '2026-02-28 01:02:03.000004',
           1.5, 2.25, 2026, b'1000000001', -12345678901234567890.0123456789, 'café€', X'00ff', '哈尔滨',
           '𠀀沈阳', '大连', NULL, '-01:00:00.5', '-838:59:59.99'";
    db.sql(&format!(
        "SET time_zone = '+08:00'; INSERT INTO shop.kinds VALUES (1, {values})"
    ));
    cfg.tables = vec!["shop.kinds".into()];
    cfg.snapshot = ferry_adapters::mysql::SnapshotMode::Initial;
    let store = Store::new();
    let mut run = start(&store, &cfg);
    run.wait_for("the snapshot", 30, || {
        store
            .position()
            .is_some_and(|p| p.get("snapshot").is_none() && p.get("file").is_some())
    })
    .await;
    db.sql(&format!(
        "SET time_zone = '+08:00'; INSERT INTO shop.kinds VALUES (2, {})",
        values.replace("'大连'", "'大连 2'")
    ));
    run.wait_for("the streamed row", 30, || rows(&store.records()).len() >= 2)
        .await;
    run.stop().await.unwrap_err();
    let records = store.records();
    let all = rows(&records);
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all[0].snapshot && !all[1].snapshot);
    let (a, b) = (&all[0].columns, &all[1].columns);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        if x.name == "id" || x.name == "k" {
            continue;
        }
        assert_eq!(
            (text(x), x.value_type),
            (text(y), y.value_type),
            "column {}: snapshot and stream differ",
            x.name
        );
    }
    let get = |n: &str| {
        a.iter()
            .find(|f| f.name == n)
            .and_then(text)
            .unwrap_or_default()
    };
    assert_eq!(get("ts"), "2026-01-01 03:04:05.12+00");
    assert_eq!(get("s"), "x,z");
    assert_eq!(get("b"), "513");
    assert_eq!(get("lat"), "café€");
    assert_eq!(get("g"), "𠀀沈阳");
    assert_eq!(get("k"), "大连");
    assert_eq!(get("dec_"), "-12345678901234567890.0123456789");
    // One table record, shipped by the snapshot and not again by the stream.
    assert_eq!(schemas(&records).len(), 1);
}

/// TLS as for PostgreSQL, against a server whose capture user must use it:
/// plain is refused by the server, `verify-full` with the server's CA
/// captures, a CA that did not sign the server's certificate stops the stream
/// naming `sslrootcert`, and `require` encrypts without checking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_checks_the_server_as_sslmode_says() {
    let (db, ca) = MariaDb::start_tls();
    db.replication_user("shop", "ferry", "s3cret");
    db.sql("ALTER USER 'ferry'@'127.0.0.1' REQUIRE SSL");
    db.sql(PLACE);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(
        &other,
        ferry_transport::pki::create_ca("another CA")
            .unwrap()
            .cert_pem,
    )
    .unwrap();
    let base = db.dsn("ferry", "shop");
    let config = |dsn: String| {
        let mut cfg = MysqlConfig::new(dsn, &["shop.place"], 4242);
        cfg.password_file = Some(pw.clone());
        cfg.validate().unwrap();
        cfg
    };

    let e = start(&Store::new(), &config(base.clone()))
        .ended(30)
        .await
        .unwrap_err();
    assert!(e.is_fatal() && e.to_string().contains("denied"), "{e}");

    let e = start(
        &Store::new(),
        &config(format!(
            "{base}?sslmode=verify-full&sslrootcert={}",
            other.display()
        )),
    )
    .ended(30)
    .await
    .unwrap_err();
    assert!(e.is_fatal() && e.to_string().contains("sslrootcert"), "{e}");

    for (i, query) in [
        format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        "sslmode=require".to_string(),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = config(format!("{base}?{query}"));
        cfg.check_environment().unwrap();
        let store = Store::new();
        let mut run = started(&store, &cfg).await;
        db.sql(&format!(
            "INSERT INTO shop.place (id, name_gbk) VALUES ({i}, '沈阳市')"
        ));
        run.wait_for("the row over TLS", 30, || {
            !rows(&store.records()).is_empty()
        })
        .await;
        run.stop().await.unwrap_err();
    }
}

/// Settings that work but risk detail or the agent's place: `doctor` reports
/// each with its fix, and a stream still starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_advises_on_row_image_metadata_and_retention() {
    let (db, cfg, _dir) = setup();
    db.sql(
        "SET GLOBAL binlog_row_image = 'MINIMAL'; SET GLOBAL binlog_row_metadata = 'MINIMAL';
         SET GLOBAL binlog_expire_logs_seconds = 86400;",
    );
    let checks = cfg.doctor().await;
    for (name, fix) in [
        ("binlog row image", "binlog_row_image = 'FULL'"),
        ("binlog row metadata", "binlog_row_metadata = 'FULL'"),
        ("binlog retention", "binlog_expire_logs_seconds = 604800"),
    ] {
        let c = checks
            .iter()
            .find(|c| c.name.ends_with(name))
            .unwrap_or_else(|| panic!("no check {name}: {checks:?}"));
        assert!(!c.ok, "{c:?}");
        assert!(c.fix.as_deref().unwrap_or("").contains(fix), "{c:?}");
    }
    let store = Store::new();
    let mut run = start(&store, &cfg);
    run.wait_for("the stream to start anyway", 30, || {
        store.raw_position().is_some()
    })
    .await;
    run.stop().await.unwrap_err();
    db.sql(
        "SET GLOBAL binlog_row_image = 'FULL'; SET GLOBAL binlog_row_metadata = 'FULL';
         SET GLOBAL binlog_expire_logs_seconds = 0;",
    );
    let checks = cfg.doctor().await;
    assert!(checks.iter().all(|c| c.ok), "{checks:?}");
}

/// Binlogs purged past the stored position: the stream stops loudly (fatal,
/// with the choices), never silently skipping what was in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_position_stops_the_stream_loudly() {
    let (db, cfg, _dir) = setup();
    let store = Store::new();
    let run = started(&store, &cfg).await;
    run.stop().await.unwrap_err();
    let before = store.commits();
    db.sql("INSERT INTO shop.place (id, name_utf8) VALUES (1, 'lost')");
    db.sql("FLUSH BINARY LOGS; FLUSH BINARY LOGS;");
    let last = db.sql("SHOW MASTER STATUS");
    let file = last.split('\t').next().unwrap().to_string();
    // The server keeps a file a replica's dump thread still reads (the stopped
    // source's may linger a moment): purge until the old files are gone.
    for _ in 0..100 {
        db.sql(&format!("PURGE BINARY LOGS TO '{file}'"));
        if db.sql("SHOW BINARY LOGS").lines().count() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(db.sql("SHOW BINARY LOGS").lines().count(), 1, "purged");
    let e = start(&store, &cfg).ended(30).await.unwrap_err();
    let text = e.to_string();
    assert!(e.is_fatal(), "{e}");
    assert!(
        text.contains("no longer has binlog") && text.contains("lost") && text.contains("snapshot"),
        "{e}"
    );
    assert_eq!(
        store.commits(),
        before,
        "nothing was committed past the gap"
    );
    assert!(rows(&store.records()).is_empty());
}

/// The source's own row reader (`mysql/rows.rs`) against `mysql_common`'s row
/// iterator on every rows event of a real binlog: every type (strings with
/// 1- to 4-byte lengths and a `CHAR` longer than 255 bytes among them), NULLs,
/// full, minimal and noblob row images, with full and minimal table-map
/// metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_row_reader_agrees_with_mysql_common_on_every_event() {
    use futures_util::StreamExt;
    use mysql_async::binlog::events::EventData;

    let (db, _cfg, _dir) = setup();
    db.sql(
        "CREATE TABLE shop.every (id INT PRIMARY KEY, ts TIMESTAMP(2) NULL, e ENUM('a','b'),
           s SET('x','y','z'), j JSON, u INT UNSIGNED, bu BIGINT UNSIGNED, ti TINYINT,
           si SMALLINT UNSIGNED, mi MEDIUMINT, t TIME(3), t0 TIME, d DATE, dt DATETIME(6),
           f FLOAT, dbl DOUBLE, y YEAR, b BIT(10), dec1 DECIMAL(30,10), dec2 DECIMAL(5,0),
           lat VARCHAR(10) CHARACTER SET latin1, ch CHAR(4) CHARACTER SET gbk,
           bin VARBINARY(4), bl BLOB, tx TEXT CHARACTER SET gb2312, big VARCHAR(300),
           lc CHAR(100) CHARACTER SET utf8mb4, tb TINYBLOB, mb MEDIUMBLOB,
           lt LONGTEXT CHARACTER SET utf8mb4, g GEOMETRY)",
    );
    let row = |id: i64| {
        format!(
            "({id}, '2026-01-01 11:04:05.12', 'b', 'x,z', '{{\"k\": [{id}, 2]}}', 4294967295,
             18446744073709551615, -128, 65535, -8388608, '-26:03:04.5', '838:59:59',
             '2026-02-28', '2026-02-28 23:59:59.999999', 1.5, 2.25, 2026, b'1000000001',
             -12345678901234567890.0123456789, 99999, 'café', '沈阳', X'00ff', X'0102', '哈尔滨',
             REPEAT('长', 300), REPEAT('沈', 100), X'01', REPEAT('m', 70000), '大连',
             POINT({id}, 2))"
        )
    };
    let mut sql = String::new();
    for (i, image) in ["FULL", "MINIMAL", "NOBLOB"].iter().enumerate() {
        let base = i as i64 * 100;
        sql.push_str(&format!(
            "SET SESSION binlog_row_image = '{image}';
             INSERT INTO shop.every VALUES {}, {};
             INSERT INTO shop.every (id) VALUES ({});
             UPDATE shop.every SET u = 7, big = 'short', j = NULL WHERE id = {};
             UPDATE shop.every SET id = {} WHERE id = {};
             DELETE FROM shop.every WHERE id = {};
             ",
            row(base + 1),
            row(base + 2),
            base + 3,
            base + 1,
            base + 50,
            base + 2,
            base + 3,
        ));
    }
    db.sql(&sql);
    db.sql("SET GLOBAL binlog_row_metadata = 'MINIMAL'");
    db.sql(&format!(
        "INSERT INTO shop.every VALUES {}; UPDATE shop.every SET ti = 1 WHERE id = 1001; DELETE FROM shop.every WHERE id = 1001;",
        row(1001)
    ));

    let opts =
        mysql_async::Opts::from_url(&format!("mysql://ferry:s3cret@127.0.0.1:{}/shop", db.port))
            .unwrap();
    let conn = mysql_async::Conn::new(opts).await.unwrap();
    let req = mysql_async::BinlogStreamRequest::new(4343)
        .with_filename(b"binlog.000001")
        .with_pos(4u64)
        .with_non_blocking();
    let mut stream = conn.get_binlog_stream(req).await.unwrap();
    let (mut events, mut rows) = (0, 0);
    while let Some(ev) = stream.next().await {
        let ev = ev.unwrap();
        if let Ok(Some(EventData::RowsEvent(re))) = ev.read_data() {
            let tme = stream.get_tme(re.table_id()).unwrap();
            if tme.table_name() != "every" {
                continue;
            }
            rows += ferry_adapters::mysql::agree_with_mysql_common(&re, tme)
                .unwrap_or_else(|e| panic!("rows event {events}: {e}"));
            events += 1;
        }
    }
    // 3 × (2 + 1 inserted, 1 + 1 updated, 1 deleted), then 3 more.
    assert_eq!(rows, 21, "{events} rows events");
}
