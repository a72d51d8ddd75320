//! The postgres source against a real PostgreSQL server (see `ferry_tests::pg`), with
//! an in-test buffer that can crash and restart the source.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use ferry_adapters::postgres::describe_position;
use ferry_protocol::messages::{field, RowOp};
use ferry_tests::pg::PgServer;
use support::committer::Store;
use support::model::{self, rows, schemas, text, Model};
use support::{config, FlushWatch};

const PERSON: &str = "CREATE TABLE public.person (
    id int PRIMARY KEY, big bigint, amount numeric(30,10), name text, photo bytea,
    born timestamptz, day date, ok bool, uid uuid, doc jsonb, nums int[], note text, blob text);
  ALTER TABLE public.person ALTER COLUMN blob SET STORAGE EXTERNAL;";

fn col<'a>(
    c: &'a ferry_protocol::messages::Row,
    name: &str,
) -> &'a ferry_protocol::messages::Field {
    c.columns
        .iter()
        .find(|x| x.name == name)
        .unwrap_or_else(|| panic!("no column {name} in {c:?}"))
}

fn phase_is(store: &Store, p: &str) -> bool {
    store.phase().as_deref() == Some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_arrive_exactly_as_committed() {
    let server = PgServer::start();
    let db = server.database("t1").await;
    db.batch_execute(PERSON).await.unwrap();
    db.batch_execute(
        "CREATE TABLE public.household (id bigint PRIMARY KEY, city text);
         CREATE TABLE public.other (id int PRIMARY KEY);
         CREATE PUBLICATION ferry_pub FOR TABLE public.person, public.household, public.other;
         INSERT INTO public.household VALUES (1, '大连');",
    )
    .await
    .unwrap();
    let cfg = config(&server, "t1", &["public.person", "public.household"], "s1");
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t1", "s1", &store).await;
    let mut run = store.start(&cfg);
    run.wait_for("the snapshot", 30, || phase_is(&store, "streaming"))
        .await;

    // One transaction per call: several statements in one simple query share one.
    for sql in [
        "INSERT INTO public.person VALUES (1, 9223372036854775807, 12345678901234567890.0123456789,
           '沈阳市', '\\xdeadbeef', '2024-03-01 12:34:56.789+08', '2024-03-01', true,
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"城市\": \"沈阳\", \"a\": [1, 2]}',
           '{1,2,NULL}', NULL, repeat('x', 100000))",
        "BEGIN;
           INSERT INTO public.household VALUES (2, '沈阳');
           INSERT INTO public.other VALUES (1);
           UPDATE public.household SET city = '哈尔滨' WHERE id = 1;
           DELETE FROM public.household WHERE id = 2;
         COMMIT",
        "BEGIN; INSERT INTO public.person (id) VALUES (99); ROLLBACK",
        "UPDATE public.person SET note = 'changed' WHERE id = 1",
        "UPDATE public.person SET id = 2 WHERE id = 1",
        "DELETE FROM public.person WHERE id = 2",
        "TRUNCATE public.household",
        "INSERT INTO public.household VALUES (3, 'marker')",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    run.wait_for("the marker row", 30, || {
        rows(&store.records()).iter().any(|c| {
            c.table == "household"
                && c.columns
                    .iter()
                    .any(|x| text(x).as_deref() == Some("marker"))
        })
    })
    .await;
    let records = store.records();
    let all = rows(&records);

    // The snapshot: one schema per table, then household's row.
    let sc = schemas(&records);
    assert_eq!(sc.len(), 2, "{sc:?}");
    assert_eq!(sc[0].table, "person");
    let types: Vec<(&str, &str, bool)> = sc[0]
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.source_type.as_str(), c.key))
        .collect();
    assert_eq!(
        &types[..4],
        &[
            ("id", "integer", true),
            ("big", "bigint", false),
            ("amount", "numeric(30,10)", false),
            ("name", "text", false)
        ]
    );
    assert_eq!(types[10], ("nums", "integer[]", false));
    assert_eq!(types[5].1, "timestamp with time zone");
    assert!(all[0].snapshot && all[0].table == "household" && all[0].op == RowOp::Insert as i32);
    assert_eq!(text(col(&all[0], "city")).as_deref(), Some("大连"));

    // Streamed, in commit order; the rolled-back insert and `other` never appear.
    let streamed: Vec<_> = all.iter().filter(|c| !c.snapshot).collect();
    let ops: Vec<(&str, i32)> = streamed.iter().map(|c| (c.table.as_str(), c.op)).collect();
    use RowOp::*;
    assert_eq!(
        ops,
        vec![
            ("person", Insert as i32),
            ("household", Insert as i32),
            ("household", Update as i32),
            ("household", Delete as i32),
            ("person", Update as i32),
            ("person", Update as i32),
            ("person", Delete as i32),
            ("household", Truncate as i32),
            ("household", Insert as i32),
        ]
    );
    let ins = streamed[0];
    let t = |n: &str| text(col(ins, n));
    assert_eq!(t("big").as_deref(), Some("9223372036854775807"));
    assert_eq!(
        t("amount").as_deref(),
        Some("12345678901234567890.0123456789")
    );
    assert_eq!(t("name").as_deref(), Some("沈阳市"));
    assert_eq!(
        col(ins, "photo").value,
        Some(field::Value::Bytes(vec![0xde, 0xad, 0xbe, 0xef]))
    );
    assert_eq!(t("born").as_deref(), Some("2024-03-01 12:34:56.789+08"));
    assert_eq!(t("day").as_deref(), Some("2024-03-01"));
    assert_eq!(t("ok").as_deref(), Some("t"));
    assert_eq!(
        t("uid").as_deref(),
        Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    );
    assert_eq!(
        t("doc").as_deref(),
        Some(r#"{"a": [1, 2], "城市": "沈阳"}"#)
    );
    assert_eq!(t("nums").as_deref(), Some("{1,2,NULL}"));
    assert_eq!(col(ins, "note").value, Some(field::Value::Null(true)));
    assert_eq!(t("blob").map(|b| b.len()), Some(100_000));
    assert!(
        ins.txn.parse::<u32>().is_ok_and(|x| x > 0)
            && ins.source == "postgres"
            && ins.commit_time_unix_us > 0
            && ins.last_in_txn,
        "{} {} {}",
        ins.txn,
        ins.commit_time_unix_us,
        ins.last_in_txn
    );

    // The multi-statement transaction: one commit LSN, numbered, last flagged.
    let txn = &streamed[1..4];
    assert!(txn
        .iter()
        .all(|c| c.position == txn[0].position && c.txn == txn[0].txn));
    assert_eq!(
        txn.iter().map(|c| c.change_index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        txn.iter().map(|c| c.last_in_txn).collect::<Vec<_>>(),
        vec![false, false, true]
    );
    assert_eq!(text(&txn[2].old_key[0]).as_deref(), Some("2"));
    assert!(model::lsn(streamed[0]) < model::lsn(txn[0]));

    // The TOAST value the update did not touch is marked, not nulled.
    let upd = streamed[4];
    assert_eq!(text(col(upd, "note")).as_deref(), Some("changed"));
    assert_eq!(col(upd, "blob").value, Some(field::Value::Unchanged(true)));
    assert!(upd.old_key.is_empty(), "key unchanged: no old key");
    // A key change carries the old key.
    assert_eq!(text(&streamed[5].old_key[0]).as_deref(), Some("1"));
    assert_eq!(text(col(streamed[5], "id")).as_deref(), Some("2"));
    assert_eq!(streamed[6].old_key.len(), 1);
    assert_eq!(text(&streamed[6].old_key[0]).as_deref(), Some("2"));

    // Applied by key, the capture equals the tables.
    let m = Model::apply_all(&records);
    model::assert_same(
        &m.table("public.household"),
        &model::table_state(&db, "public.household", &["id"]).await,
    );
    model::assert_same(
        &m.table("public.person"),
        &model::table_state(&db, "public.person", &["id"]).await,
    );
    model::assert_streamed_once(&records);

    let d = describe_position(&store.raw_position().unwrap());
    assert!(d.starts_with("streaming from "), "{d}");
    run.stop().await.unwrap_err();
    watch.check().await;
}

/// The snapshot encodes rows its own way (straight into the batch bytes); a row
/// read by the snapshot and the same values streamed must arrive alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rows_render_like_streamed_ones() {
    let server = PgServer::start();
    let db = server.database("t10").await;
    db.batch_execute(PERSON).await.unwrap();
    let row = |id: i32| {
        format!(
            "INSERT INTO public.person VALUES ({id}, -9223372036854775808, -0.0000000001,
               E'tab\\there\\nnew line \\\\ 沈阳', '\\x00ff10', '2024-03-01 12:34:56.789+08', '2024-03-01',
               false, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"k\": \"v\"}}', '{{}}', NULL,
               repeat('y', 50000))"
        )
    };
    db.batch_execute(&format!(
        "{}; CREATE PUBLICATION ferry_pub FOR TABLE public.person",
        row(1)
    ))
    .await
    .unwrap();
    db.batch_execute("CREATE TABLE public.acct (id int PRIMARY KEY, balance int, note text); ALTER PUBLICATION ferry_pub ADD TABLE public.acct")
        .await
        .unwrap();
    let cfg = config(&server, "t10", &["public.person", "public.acct"], "s10");
    let store = Store::new();
    let mut run = store.start(&cfg);
    run.wait_for("the snapshot", 30, || phase_is(&store, "streaming"))
        .await;
    db.batch_execute(&row(2)).await.unwrap();
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    let all = rows(&records);
    let person: Vec<_> = all.iter().filter(|c| c.table == "person").collect();
    assert_eq!(person.len(), 2, "{person:?}");
    assert!(person[0].snapshot && !person[1].snapshot);
    let without_id = |c: &ferry_protocol::messages::Row| {
        c.columns
            .iter()
            .filter(|x| x.name != "id")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(without_id(person[0]), without_id(person[1]));
    assert_eq!(
        col(person[0], "photo").value,
        Some(field::Value::Bytes(vec![0x00, 0xff, 0x10]))
    );
    assert_eq!(
        text(col(person[0], "name")).as_deref(),
        Some("tab\there\nnew line \\ 沈阳")
    );
    assert_eq!(col(person[0], "note").value, Some(field::Value::Null(true)));
    assert_eq!(text(col(person[0], "blob")).map(|b| b.len()), Some(50_000));
    model::assert_streamed_once(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_mid_stream_emits_schema_changes() {
    let server = PgServer::start();
    let db = server.database("t2").await;
    db.batch_execute(
        "CREATE TABLE public.t (id int PRIMARY KEY, a text);
         CREATE PUBLICATION ferry_pub FOR TABLE public.t;",
    )
    .await
    .unwrap();
    let mut cfg = config(&server, "t2", &["public.t"], "s2");
    cfg.snapshot = ferry_adapters::postgres::SnapshotMode::Never;
    let store = Store::new();
    let mut run = store.start(&cfg);
    run.wait_for("streaming", 30, || phase_is(&store, "streaming"))
        .await;
    for sql in [
        "INSERT INTO public.t VALUES (1, 'x')",
        "ALTER TABLE public.t ADD COLUMN b int",
        "INSERT INTO public.t VALUES (2, 'y', 5)",
        "ALTER TABLE public.t DROP COLUMN a",
        "INSERT INTO public.t VALUES (3, 6)",
        "ALTER TABLE public.t ALTER COLUMN b TYPE bigint",
        "INSERT INTO public.t VALUES (4, 7)",
        "BEGIN; INSERT INTO public.t VALUES (5, 8); ALTER TABLE public.t ADD COLUMN c text;
         INSERT INTO public.t VALUES (6, 9, 'z'); COMMIT",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    run.wait_for("row 6", 30, || rows(&store.records()).len() == 6)
        .await;
    run.stop().await.unwrap_err();

    // Each row follows the schema that describes it.
    let mut shape: Vec<String> = Vec::new();
    let mut types: Vec<String> = Vec::new();
    let mut seen = Vec::new();
    for r in store.records() {
        match r.body {
            Some(ferry_protocol::messages::record::Body::Table(s)) => {
                shape = s
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.source_type))
                    .collect();
                types = s
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.value_type))
                    .collect();
                seen.push(shape.join(", "));
            }
            Some(ferry_protocol::messages::record::Body::Row(c)) => {
                let cols: Vec<String> = c
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.value_type))
                    .collect();
                assert_eq!(
                    cols, types,
                    "row {:?} does not have the announced shape",
                    c.columns
                );
            }
            Some(ferry_protocol::messages::record::Body::Rows(b)) => {
                let cols: Vec<String> = b
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.source_type))
                    .collect();
                assert_eq!(
                    cols, shape,
                    "a snapshot block does not have the announced shape"
                );
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        vec![
            "id integer, a text",
            "id integer, a text, b integer",
            "id integer, b integer",
            "id integer, b bigint",
            "id integer, b bigint, c text",
        ]
    );

    // A restart does not announce the same shape again.
    let before = store.count();
    let mut run = store.start(&cfg);
    db.batch_execute("INSERT INTO public.t VALUES (7, 10, 'w')")
        .await
        .unwrap();
    run.wait_for("row 7", 30, || store.count() > before).await;
    run.stop().await.unwrap_err();
    let recs = store.records();
    assert_eq!(schemas(&recs).len(), 5);
    let last = rows(&recs).pop().unwrap();
    assert_eq!(text(col(&last, "c")).as_deref(), Some("w"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_is_split_and_survives_a_crash_midway() {
    let server = PgServer::start();
    let db = server.database("t3").await;
    support::acct(&db, 10).await;
    let mut cfg = config(&server, "t3", &["public.acct"], "s3");
    cfg.snapshot = ferry_adapters::postgres::SnapshotMode::Never;
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t3", "s3", &store).await;
    let run = store.start(&cfg);
    let mut run = run;
    run.wait_for("streaming", 30, || phase_is(&store, "streaming"))
        .await;

    // ~20 MB in one transaction: 20,000 rows of 1 KiB.
    store.crash_after(2);
    let commits_before = store.commits();
    db.batch_execute(
        "INSERT INTO public.acct SELECT g, g, repeat(md5(g::text), 32) FROM generate_series(100, 20099) g",
    )
    .await
    .unwrap();
    run.ended(60).await.unwrap_err();
    let p = store.position().unwrap();
    let done = p["partial"]["done"]
        .as_u64()
        .expect("a partial transaction is stored");
    assert!(done > 0 && done < 20_000, "{p}");
    assert_eq!(store.commits() - commits_before, 2);
    assert!(describe_position(&store.raw_position().unwrap()).contains("in progress"));

    let mut run = store.start(&cfg);
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    let big: Vec<_> = rows(&records)
        .into_iter()
        .filter(|c| {
            c.columns.len() == 3
                && text(&c.columns[0]).is_some_and(|id| id.parse::<i32>().unwrap() >= 100)
        })
        .collect();
    assert_eq!(big.len(), 20_000);
    assert!(big.iter().all(|c| c.position == big[0].position));
    model::assert_streamed_once(&records);
    assert!(
        store.commits() - commits_before >= 6,
        "split into several commits"
    );
    assert_acct_matches(&db, &records).await;
    watch.check().await;
}

/// Every snapshot row and streamed change once; applied by key, the records equal
/// `public.acct` now.
async fn assert_snapshot_and_stream_converged(
    db: &tokio_postgres::Client,
    records: &[ferry_protocol::messages::Record],
) {
    model::assert_snapshot_rows_once(records, "public.acct", "id");
    model::assert_streamed_once(records);
    let m = Model::apply_all(records);
    model::assert_same(
        &m.table("public.acct"),
        &model::table_state(db, "public.acct", &["id"]).await,
    );
}

/// The records applied by key equal `public.acct` now, but for rows 1..=99, which
/// predate the slot (snapshot = "never").
async fn assert_acct_matches(
    db: &tokio_postgres::Client,
    records: &[ferry_protocol::messages::Record],
) {
    let m = Model::apply_all(records);
    let db_rows = model::table_state(
        db,
        "(SELECT * FROM public.acct WHERE id >= 100 OR id < 0) q",
        &["id"],
    )
    .await;
    model::assert_same(&m.table("public.acct"), &db_rows);
}

/// A server that streams every transaction over 64 kB while it is in progress.
async fn streaming_server(
    db: &str,
    slot: &str,
) -> (
    PgServer,
    tokio_postgres::Client,
    ferry_adapters::postgres::PostgresConfig,
) {
    let server = PgServer::start();
    let admin = server.client("postgres").await;
    admin
        .batch_execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let client = server.database(db).await;
    support::acct(&client, 10).await;
    let mut cfg = config(&server, db, &["public.acct"], slot);
    cfg.snapshot = ferry_adapters::postgres::SnapshotMode::Never;
    (server, client, cfg)
}

/// Transactions of the slot the server streamed while in progress.
async fn streamed_txns(client: &tokio_postgres::Client, slot: &str) -> i64 {
    client
        .query_one(
            "SELECT coalesce(stream_txns, 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// The row ids of the records, in the order they arrived, per commit LSN.
fn ids_by_txn(records: &[ferry_protocol::messages::Record]) -> Vec<(u64, Vec<i32>)> {
    let mut out: Vec<(u64, Vec<i32>)> = Vec::new();
    for c in rows(records) {
        let Some(id) = c.columns.first().and_then(text) else {
            continue;
        };
        let id: i32 = id.parse().unwrap();
        match out.last_mut() {
            Some((lsn, ids)) if *lsn == model::lsn(&c) => ids.push(id),
            _ => out.push((model::lsn(&c), vec![id])),
        }
    }
    out
}

/// The first transaction of `records` holds exactly the rows `ids`, in order;
/// every streamed change is there once; applied, the records equal the table.
async fn assert_first_txn(
    db: &tokio_postgres::Client,
    records: &[ferry_protocol::messages::Record],
    ids: std::ops::Range<i32>,
) {
    let txns = ids_by_txn(records);
    assert_eq!(txns[0].1, ids.collect::<Vec<i32>>());
    model::assert_streamed_once(records);
    assert_acct_matches(db, records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_received_in_progress_arrive_whole_in_commit_order() {
    let (server, db, cfg) = streaming_server("t12", "s12").await;
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t12", "s12", &store).await;
    let mut run = store.start(&cfg);
    run.wait_for("streaming", 30, || phase_is(&store, "streaming"))
        .await;

    // A: large, open across other commits. R: large, rolled back.
    let a = server.client("t12").await;
    let r = server.client("t12").await;
    a.batch_execute(
        "BEGIN; INSERT INTO public.acct SELECT g, g, repeat(md5(g::text), 4) FROM generate_series(1000, 5999) g",
    )
    .await
    .unwrap();
    r.batch_execute(
        "BEGIN; INSERT INTO public.acct SELECT g, g, repeat('r', 200) FROM generate_series(10000, 12999) g",
    )
    .await
    .unwrap();
    db.batch_execute("INSERT INTO public.acct VALUES (100, 1, 'small, first')")
        .await
        .unwrap();
    a.batch_execute(
        "INSERT INTO public.acct SELECT g, g, repeat(md5(g::text), 4) FROM generate_series(6000, 6999) g; UPDATE public.acct SET note = 'changed in A' WHERE id = 100",
    )
    .await
    .unwrap();
    r.batch_execute("ROLLBACK").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    db.batch_execute("INSERT INTO public.acct VALUES (101, 1, 'small, last')")
        .await
        .unwrap();
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    assert!(
        streamed_txns(&db, "s12").await >= 2,
        "the server streamed the large transactions in progress"
    );

    let records = store.records();
    let txns = ids_by_txn(&records);
    let order: Vec<i32> = txns.iter().map(|(_, ids)| ids[0]).collect();
    assert_eq!(order, vec![100, 1000, 101, -1], "commit order: {order:?}");
    let big = &txns[1].1;
    let mut want: Vec<i32> = (1000..7000).collect();
    want.push(100);
    assert_eq!(big, &want, "A whole, in its own order");
    assert!(rows(&records).iter().all(|c| c
        .columns
        .first()
        .and_then(text)
        .unwrap()
        .parse::<i32>()
        .unwrap()
        < 10000));
    let last: Vec<_> = rows(&records)
        .into_iter()
        .filter(|c| c.last_in_txn)
        .collect();
    assert_eq!(last.len(), 4);
    model::assert_streamed_once(&records);
    assert_acct_matches(&db, &records).await;
    watch.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_rolled_back_in_a_streamed_transaction_is_never_shipped() {
    let (server, db, cfg) = streaming_server("t13", "s13").await;
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t13", "s13", &store).await;
    let mut run = store.start(&cfg);
    run.wait_for("streaming", 30, || phase_is(&store, "streaming"))
        .await;
    db.batch_execute(
        "BEGIN;
         INSERT INTO public.acct SELECT g, g, repeat('a', 200) FROM generate_series(1000, 2999) g;
         SAVEPOINT s;
         INSERT INTO public.acct SELECT g, g, repeat('s', 200) FROM generate_series(20000, 22999) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO public.acct SELECT g, g, repeat('b', 200) FROM generate_series(3000, 3999) g;
         COMMIT",
    )
    .await
    .unwrap();
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    assert_eq!(
        ids_by_txn(&records).len(),
        2,
        "the transaction, then the marker"
    );
    assert_first_txn(&db, &records, 1000..4000).await;
    watch.check().await;
}

/// The spool cannot be written (here: its folder would be under a regular file;
/// in life, the agent's disk is full): the source reconnects without in-progress
/// streaming and the transaction arrives whole at its commit all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_spool_falls_back_to_whole_transactions() {
    let (server, db, cfg) = streaming_server("t15", "s15").await;
    let store = Store::new();
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    store.spool_in(not_a_dir.path().join("spool"));
    let watch = FlushWatch::start(&server, "t15", "s15", &store).await;
    let mut run = store.start(&cfg);
    run.wait_for("streaming", 30, || phase_is(&store, "streaming"))
        .await;
    db.batch_execute(
        "INSERT INTO public.acct SELECT g, g, repeat(md5(g::text), 8) FROM generate_series(1000, 4999) g",
    )
    .await
    .unwrap();
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    assert_first_txn(&db, &store.records(), 1000..5000).await;
    watch.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_a_streamed_transaction_commits_loses_and_repeats_nothing() {
    let (server, db, cfg) = streaming_server("t14", "s14").await;
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t14", "s14", &store).await;
    let mut run = store.start(&cfg);
    run.wait_for("streaming", 30, || phase_is(&store, "streaming"))
        .await;
    // ~30 MB, committed to the buffer in several pieces; the source dies after
    // the second.
    store.crash_after(2);
    db.batch_execute(
        "INSERT INTO public.acct SELECT g, g, repeat(md5(g::text), 32) FROM generate_series(1000, 30999) g",
    )
    .await
    .unwrap();
    run.ended(60).await.unwrap_err();
    assert!(
        store.position().unwrap()["partial"]["done"]
            .as_u64()
            .unwrap()
            > 0
    );
    let mut run = store.start(&cfg);
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    assert!(streamed_txns(&db, "s14").await >= 1);
    assert_first_txn(&db, &store.records(), 1000..31000).await;
    watch.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_under_concurrent_writes_converges() {
    let server = PgServer::start();
    let db = server.database("t4").await;
    support::acct(&db, 20_000).await;
    let mut cfg = config(&server, "t4", &["public.acct"], "s4");
    cfg.snapshot_chunk_rows = 1000;
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t4", "s4", &store).await;
    let writer = support::Writer::start(&server, "t4", 20_000, 5, 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut run = store.start(&cfg);
    run.wait_for("the snapshot", 60, || phase_is(&store, "streaming"))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let txns = writer.stop().await;
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    assert!(rows(&records).iter().filter(|c| c.snapshot).count() >= 19_000);
    assert!(rows(&records).iter().filter(|c| !c.snapshot).count() as u64 >= txns);
    assert_snapshot_and_stream_converged(&db, &records).await;
    watch.check().await;
}

/// Starts the source and crashes it after a random `pause_ms` (seeded), up to
/// `rounds` times, until at least `hits` crashes landed mid-snapshot and the
/// snapshot is done; then starts it once more and returns it, streaming.
async fn crash_through_the_snapshot(
    store: &Store,
    cfg: &ferry_adapters::postgres::PostgresConfig,
    seed: u64,
    rounds: usize,
    pause_ms: std::ops::Range<u64>,
    hits: usize,
) -> support::committer::Running {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mid_snapshot = 0;
    for _ in 0..rounds {
        let run = store.start(cfg);
        tokio::time::sleep(Duration::from_millis(rng.random_range(pause_ms.clone()))).await;
        let before = store.phase();
        run.stop().await.unwrap_err();
        if before.as_deref() == Some("snapshot") {
            mid_snapshot += 1;
        }
        if phase_is(store, "streaming") && mid_snapshot >= hits {
            break;
        }
    }
    assert!(
        mid_snapshot >= hits,
        "only {mid_snapshot} crashes hit the snapshot"
    );
    let mut run = store.start(cfg);
    run.wait_for("the snapshot", 60, || phase_is(store, "streaming"))
        .await;
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_during_the_snapshot_converge() {
    let server = PgServer::start();
    let db = server.database("t5").await;
    support::acct(&db, 30_000).await;
    let mut cfg = config(&server, "t5", &["public.acct"], "s5");
    cfg.snapshot_chunk_rows = 500;
    cfg.snapshot_rows_per_second = Some(15_000);
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t5", "s5", &store).await;
    let writer = support::Writer::start(&server, "t5", 30_000, 5, 5).await;
    let mut run = crash_through_the_snapshot(&store, &cfg, 5, 20, 150..600, 5).await;
    writer.stop().await;
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    assert_snapshot_and_stream_converged(&db, &records).await;
    watch.check().await;
}

/// Wide rows: the copy is committed in pieces cut at 4 MiB before
/// `snapshot_chunk_rows` is reached, each with the key of its own last row.
/// Crashes between pieces resume after that row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_between_the_pieces_of_a_wide_chunk_converge() {
    let server = PgServer::start();
    let db = server.database("t11").await;
    support::acct(&db, 3_000).await;
    db.batch_execute("UPDATE public.acct SET note = repeat(md5(id::text), 256)")
        .await
        .unwrap();
    let mut cfg = config(&server, "t11", &["public.acct"], "s11");
    cfg.snapshot_chunk_rows = 1_000;
    cfg.snapshot_rows_per_second = Some(800);
    let store = Store::new();
    let mut run = crash_through_the_snapshot(&store, &cfg, 11, 12, 100..700, 3).await;
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    model::assert_snapshot_rows_once(&records, "public.acct", "id");
    let m = Model::apply_all(&records);
    model::assert_same(
        &m.table("public.acct"),
        &model::table_state(&db, "public.acct", &["id"]).await,
    );
}

/// Rows of megabytes: a snapshot block never grows past what one record may
/// carry (a row that would not fit starts the next block), and a row too large
/// for any record stops the source with the table named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_of_large_rows_stay_within_a_record() {
    use ferry_protocol::messages::record::Body;
    use prost::Message;
    let server = PgServer::start();
    let db = server.database("t17").await;
    // About 3.8 MiB each: two do not fit in one record.
    db.batch_execute(
        "CREATE TABLE public.big (id int PRIMARY KEY, body text);
         INSERT INTO public.big SELECT g, repeat(md5(g::text), 124500 + g) FROM generate_series(1, 5) g;
         INSERT INTO public.big SELECT g, md5(g::text) FROM generate_series(6, 50) g;
         CREATE TABLE public.huge (id int PRIMARY KEY, body text);
         INSERT INTO public.huge VALUES (1, repeat('x', 8 * 1024 * 1024));
         CREATE PUBLICATION ferry_pub FOR TABLE public.big, public.huge;",
    )
    .await
    .unwrap();
    let store = Store::new();
    let mut run = store.start(&config(&server, "t17", &["public.big"], "s17"));
    run.wait_for("the snapshot", 60, || phase_is(&store, "streaming"))
        .await;
    run.stop().await.unwrap_err();
    let records = store.records();
    let blocks: Vec<_> = records
        .iter()
        .filter(|r| matches!(r.body, Some(Body::Rows(_))))
        .collect();
    assert_eq!(blocks.len(), 5, "one block per large row");
    for b in &blocks {
        assert!(
            b.encoded_len() <= 7 << 20,
            "a block of {} bytes",
            b.encoded_len()
        );
    }
    model::assert_snapshot_rows_once(&records, "public.big", "id");
    model::assert_same(
        &Model::apply_all(&records).table("public.big"),
        &model::table_state(&db, "public.big", &["id"]).await,
    );

    let store = Store::new();
    let run = store.start(&config(&server, "t17", &["public.huge"], "s17b"));
    let e = run.ended(60).await.unwrap_err().to_string();
    assert!(e.contains("a row of public.huge is 8388610 bytes"), "{e}");
    assert!(!store.any_record(|r| matches!(r.body, Some(Body::Rows(_)))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_while_streaming_lose_and_repeat_nothing() {
    use rand::{Rng, SeedableRng};
    let server = PgServer::start();
    let db = server.database("t6").await;
    support::acct(&db, 2_000).await;
    let cfg = config(&server, "t6", &["public.acct"], "s6");
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t6", "s6", &store).await;
    let mut run = store.start(&cfg);
    run.wait_for("the snapshot", 60, || phase_is(&store, "streaming"))
        .await;
    run.stop().await.unwrap_err();
    let writer = support::Writer::start(&server, "t6", 2_000, 40, 6).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for cycle in 0..6 {
        let run = store.start(&cfg);
        if cycle % 2 == 1 {
            // Crash inside a commit rather than between them.
            store.crash_after(rng.random_range(1..20));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..900))).await;
        run.stop().await.unwrap_err();
        store.crash_after(u64::MAX);
    }
    let mut run = store.start(&cfg);
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.stop().await;
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    model::assert_streamed_once(&records);
    let m = Model::apply_all(&records);
    model::assert_same(
        &m.table("public.acct"),
        &model::table_state(&db, "public.acct", &["id"]).await,
    );
    watch.check().await;
}

/// `public.acct` (10 rows) in database `db`, and a source streaming it on `slot`
/// without a snapshot.
async fn streaming_acct(
    server: &PgServer,
    db: &str,
    slot: &str,
) -> (tokio_postgres::Client, Store, support::committer::Running) {
    let client = server.database(db).await;
    support::acct(&client, 10).await;
    let mut cfg = config(server, db, &["public.acct"], slot);
    cfg.snapshot = ferry_adapters::postgres::SnapshotMode::Never;
    let store = Store::new();
    let mut run = store.start(&cfg);
    run.wait_for("streaming", 30, || phase_is(&store, "streaming"))
        .await;
    (client, store, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_stream_is_survived() {
    let server = PgServer::start();
    let (db, store, mut run) = streaming_acct(&server, "t7", "s7").await;
    for i in 100..150 {
        db.batch_execute(&format!(
            "INSERT INTO public.acct VALUES ({i}, 0, 'before')"
        ))
        .await
        .unwrap();
    }
    run.wait_for("the first rows", 30, || rows(&store.records()).len() >= 50)
        .await;
    drop(db);
    server.restart();
    let db = server.client("t7").await;
    for i in 150..200 {
        db.batch_execute(&format!("INSERT INTO public.acct VALUES ({i}, 0, 'after')"))
            .await
            .unwrap();
    }
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    model::assert_streamed_once(&records);
    let m = Model::apply_all(&records);
    let got: Vec<_> = m.table("public.acct").into_keys().collect();
    assert_eq!(got.len(), 101, "rows 100..200 and the marker");
}

/// A fast shutdown waits until every logical walsender's client has flushed the
/// server's last sent position, which is past anything captured when other WAL
/// follows the last captured commit. Between transactions the source makes that
/// position durable and confirms it, so it never holds the department's server up;
/// the slot still moves only with what is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_shutdown_of_postgres_does_not_wait_for_the_source() {
    let server = PgServer::start();
    let (db, store, mut run) = streaming_acct(&server, "t9", "s9").await;
    for i in 100..120 {
        db.batch_execute(&format!("INSERT INTO public.acct VALUES ({i}, 0, 'x')"))
            .await
            .unwrap();
    }
    let now = server.current_wal_lsn();
    run.wait_until("the slot to confirm the inserts", 30, || async {
        ferry_tests::pg::confirmed_flush(&db, "s9")
            .await
            .is_some_and(|c| c >= now)
    })
    .await;
    // WAL after the last captured commit (a table outside the publication): the
    // server sends past everything the source will ever make durable.
    db.batch_execute("CREATE TABLE public.unpublished (id int PRIMARY KEY); INSERT INTO public.unpublished VALUES (1)")
        .await
        .unwrap();
    let now = server.current_wal_lsn();
    run.wait_until(
        "the walsender to send the unpublished writes",
        30,
        || async {
            let sent = ferry_tests::pg::text_rows(
            &db,
            "SELECT sent_lsn::text FROM pg_stat_replication WHERE application_name <> 'flushwatch'",
        )
        .await;
            sent.iter()
                .filter_map(|r| r[0].1.as_deref().and_then(ferry_tests::pg::parse_lsn))
                .any(|s| s >= now)
        },
    )
    .await;
    drop(db);
    let started = std::time::Instant::now();
    assert!(
        server.restart_fast_within(20),
        "pg_ctl stop -m fast waited for the idle source for 20 s; server log:\n{}",
        server.log()
    );
    ferry_tests::note(format!(
        "fast restart with an idle source attached: {:?}",
        started.elapsed()
    ));
    // The source reconnects and carries on after the restart.
    let db = server.client("t9").await;
    db.batch_execute("INSERT INTO public.acct VALUES (500, 0, 'after')")
        .await
        .unwrap();
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    model::assert_streamed_once(&records);
    let m = Model::apply_all(&records);
    assert_eq!(
        m.table("public.acct").len(),
        22,
        "rows 100..120, 500 and the marker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_advance_the_slot_of_an_idle_database() {
    let server = PgServer::start();
    let db = server.database("t8").await;
    support::acct(&db, 10).await;
    db.batch_execute("CREATE TABLE public.unpublished (id int PRIMARY KEY, pad text)")
        .await
        .unwrap();
    let mut cfg = config(&server, "t8", &["public.acct"], "s8");
    cfg.snapshot = ferry_adapters::postgres::SnapshotMode::Never;
    let store = Store::new();
    let watch = FlushWatch::start(&server, "t8", "s8", &store).await;
    let mut run = store.start(&cfg);
    run.wait_for("streaming", 30, || phase_is(&store, "streaming"))
        .await;
    db.batch_execute("INSERT INTO public.unpublished SELECT g, repeat('x', 1000) FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    let now = ferry_tests::pg::text_rows(&db, "SELECT pg_current_wal_lsn()").await;
    let now = ferry_tests::pg::parse_lsn(now[0][0].1.as_deref().unwrap()).unwrap();
    run.wait_until(
        "the slot to move past the unpublished writes",
        30,
        || async {
            let c = ferry_tests::pg::confirmed_flush(&db, "s8")
                .await
                .unwrap_or(0);
            // The retained WAL is measured beside the stream; it shows once a
            // position written after the measurement is durable.
            let shown = store
                .raw_position()
                .is_some_and(|p| describe_position(&p).contains("slot retains"));
            c >= now && store.durable_lsn().unwrap_or(0) >= now && shown
        },
    )
    .await;
    assert_eq!(store.count(), 0, "heartbeats add no records");
    run.stop().await.unwrap_err();
    watch.check().await;
}

/// TLS to PostgreSQL: with `sslmode=verify-full` and the server's CA the snapshot
/// and the stream work for a role that pg_hba lets in over TLS only (so both the
/// SQL and the replication connection were encrypted); a certificate from another
/// CA and a plain connection are refused at once, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_is_verified() {
    let server = PgServer::start_tls();
    let db = server.database("t16").await;
    support::acct(&db, 50).await;
    db.batch_execute(
        "CREATE ROLE tlsuser LOGIN REPLICATION; GRANT SELECT ON ALL TABLES IN SCHEMA public TO tlsuser",
    )
    .await
    .unwrap();
    let dsn = |extra: &str| {
        format!(
            "host=127.0.0.1 port={} user=tlsuser dbname=t16 {extra}",
            server.port
        )
    };
    let mut cfg = config(&server, "t16", &["public.acct"], "s16");

    // Plain: refused by the server.
    cfg.dsn = dsn("sslmode=disable");
    let err = Store::new().start(&cfg).ended(30).await.unwrap_err();
    assert!(err.to_string().contains("no encryption"), "{err}");

    // Another CA: refused by the agent.
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), PgServer::unrelated_ca_pem()).unwrap();
    cfg.dsn = dsn(&format!(
        "sslmode=verify-full sslrootcert={}",
        other.path().display()
    ));
    let err = Store::new().start(&cfg).ended(30).await.unwrap_err();
    assert!(err.to_string().contains("certificate was refused"), "{err}");

    cfg.dsn = dsn(&format!(
        "sslmode=verify-full sslrootcert='{}'",
        server.tls_ca().display()
    ));
    let store = Store::new();
    let mut run = store.start(&cfg);
    run.wait_for("the snapshot", 60, || phase_is(&store, "streaming"))
        .await;
    db.batch_execute("UPDATE public.acct SET note = 'over TLS' WHERE id = 7")
        .await
        .unwrap();
    support::catch_up(&db, &mut run, &store).await;
    run.stop().await.unwrap_err();
    let records = store.records();
    assert_snapshot_and_stream_converged(&db, &records).await;
}
