//! The PostgreSQL mirror against a real, throwaway PostgreSQL server (see
//! `ferry_tests::pg`): records go in as an agent would ship them, and the mirror
//! tables are read back as text and compared with what the source held.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ferry_pg::mirror::{Mirror, MirrorConfig, MirrorError};
use ferry_protocol::copy_text::text_value;
use ferry_protocol::messages::{
    column, record::Body, Column, Record, RowBlock, RowChange, RowOp, SchemaChange, SchemaColumn,
};
use ferry_tests::pg::{text_rows, PgServer};
use tokio_postgres::Client;

/// A source table as the agent describes it: `(name, format_type, type oid, key)`.
struct Src {
    ns: &'static str,
    name: &'static str,
    cols: Vec<(&'static str, &'static str, u32, bool)>,
    identity: &'static str,
}

const INT: u32 = 23;
const TEXT: u32 = 25;

impl Src {
    fn new(name: &'static str, cols: &[(&'static str, &'static str, u32, bool)]) -> Src {
        Src {
            ns: "public",
            name,
            cols: cols.to_vec(),
            identity: "default",
        }
    }

    fn shape(&self) -> Record {
        record(Body::SchemaChange(SchemaChange {
            schema: self.ns.into(),
            table: self.name.into(),
            columns: self
                .cols
                .iter()
                .map(|&(name, ty, oid, key)| SchemaColumn {
                    name: name.into(),
                    type_name: ty.into(),
                    type_oid: oid,
                    key,
                })
                .collect(),
            replica_identity: self.identity.into(),
            commit_lsn: 1,
        }))
    }

    /// Columns from values in column order; `None` is NULL, `"\0unchanged"` an
    /// unchanged TOAST value.
    fn columns(&self, values: &[Option<&str>]) -> Vec<Column> {
        assert_eq!(values.len(), self.cols.len());
        self.cols
            .iter()
            .zip(values)
            .map(|(&(name, ty, oid, _), v)| Column {
                name: name.into(),
                type_name: ty.into(),
                type_oid: oid,
                value: Some(match v {
                    None => column::Value::Null(true),
                    Some("\0unchanged") => column::Value::UnchangedToast(true),
                    Some(v) => text_value(oid, v),
                }),
            })
            .collect()
    }

    fn key_columns(&self, values: &[Option<&str>]) -> Vec<Column> {
        self.columns(values)
            .into_iter()
            .zip(&self.cols)
            .filter(|(_, c)| c.3 || self.identity == "full")
            .map(|(c, _)| c)
            .collect()
    }

    fn change(&self, op: RowOp, columns: Vec<Column>, old_key: Vec<Column>) -> Record {
        record(Body::RowChange(RowChange {
            schema: self.ns.into(),
            table: self.name.into(),
            op: op as i32,
            last_in_txn: true,
            columns,
            old_key,
            ..Default::default()
        }))
    }

    fn insert(&self, values: &[Option<&str>]) -> Record {
        self.change(RowOp::Insert, self.columns(values), vec![])
    }

    fn update(&self, values: &[Option<&str>]) -> Record {
        self.change(RowOp::Update, self.columns(values), vec![])
    }

    /// An update that changed the key (or any update under REPLICA IDENTITY FULL):
    /// the old row's identity travels along.
    fn update_from(&self, old: &[Option<&str>], values: &[Option<&str>]) -> Record {
        self.change(RowOp::Update, self.columns(values), self.key_columns(old))
    }

    fn delete(&self, old: &[Option<&str>]) -> Record {
        self.change(RowOp::Delete, vec![], self.key_columns(old))
    }

    fn truncate(&self) -> Record {
        self.change(RowOp::Truncate, vec![], vec![])
    }
}

fn record(body: Body) -> Record {
    Record {
        time_unix_ms: 1,
        position: String::new(),
        body: Some(body),
    }
}

/// `(seq, record)` pairs numbered from `first`.
fn numbered(first: u64, records: Vec<Record>) -> Vec<(u64, Record)> {
    (first..).zip(records).collect()
}

async fn mirror(server: &PgServer, db: &str, cfg: MirrorConfig) -> Result<Mirror, MirrorError> {
    mirror_as(server, db, cfg, "ferry-mirror-test").await
}

/// A mirror whose connection shows as `app` in `pg_stat_activity`.
async fn mirror_as(
    server: &PgServer,
    db: &str,
    cfg: MirrorConfig,
    app: &str,
) -> Result<Mirror, MirrorError> {
    let mut c: tokio_postgres::Config = server.dsn(db).parse().unwrap();
    c.application_name(app);
    Mirror::connect(c, None, cfg).await
}

/// Every row of `sql`, values as the server's text output.
async fn rows(db: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    text_rows(db, sql)
        .await
        .into_iter()
        .map(|r| r.into_iter().map(|(_, v)| v).collect())
        .collect()
}

fn r(values: &[Option<&str>]) -> Vec<Option<String>> {
    values.iter().map(|v| v.map(str::to_string)).collect()
}

fn fatal(e: MirrorError) -> String {
    match e {
        MirrorError::Fatal(m) => m,
        MirrorError::Retry(m) => panic!("expected a fatal error, got Retry({m})"),
    }
}

fn person() -> Src {
    Src::new(
        "person",
        &[
            ("id", "integer", INT, true),
            ("name", "text", TEXT, false),
            ("cv", "text", TEXT, false),
        ],
    )
}

/// Inserts, updates (one keeping an unchanged TOAST value, one changing the key),
/// deletes and a truncate, applied in several calls, leave the mirror holding
/// exactly the source's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_converge_to_the_source_state() {
    let server = PgServer::start();
    let db = server.database("m1").await;
    let mut m = mirror(&server, "m1", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let p = person();

    // 1. Shape, then rows: the table is created with the key as primary key.
    let batch1 = vec![
        p.shape(),
        p.insert(&[Some("1"), Some("Ann"), Some("long cv 1")]),
        p.insert(&[Some("2"), Some("Bob"), Some("long cv 2")]),
        p.insert(&[Some("3"), Some("Cy"), None]),
        // Updated twice in the same apply: the last image wins.
        p.update(&[Some("2"), Some("Bobby"), Some("long cv 2")]),
        p.update(&[Some("2"), Some("Robert"), Some("long cv 2")]),
    ];
    let a = m.apply("a1", "s1", &numbered(1, batch1)).await.unwrap();
    assert_eq!((a.records, a.skipped, a.checkpoint), (6, 0, 6));
    let pk = rows(
        &db,
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = 'mirror.person'::regclass AND i.indisprimary",
    )
    .await;
    assert_eq!(pk, vec![r(&[Some("id")])]);

    // 2. An update that did not touch the TOASTed cv keeps it; a key change moves
    //    the row; a delete removes one; a key is deleted and inserted again.
    let batch2 = vec![
        p.update(&[Some("1"), Some("Anna"), Some("\0unchanged")]),
        p.update_from(
            &[Some("3"), Some("Cy"), None],
            &[Some("30"), Some("Cy"), None],
        ),
        p.delete(&[Some("2"), None, None]),
        p.insert(&[Some("4"), Some("Dee"), Some("cv 4")]),
        p.delete(&[Some("4"), None, None]),
        p.insert(&[Some("4"), Some("Dee again"), None]),
    ];
    let a = m.apply("a1", "s1", &numbered(7, batch2)).await.unwrap();
    assert_eq!((a.records, a.checkpoint), (6, 12));
    assert_eq!(
        rows(&db, "SELECT id, name, cv FROM mirror.person ORDER BY id").await,
        vec![
            r(&[Some("1"), Some("Anna"), Some("long cv 1")]),
            r(&[Some("4"), Some("Dee again"), None]),
            r(&[Some("30"), Some("Cy"), None]),
        ]
    );

    // 3. A truncate empties the table, rows after it in the same apply stay.
    let batch3 = vec![
        p.insert(&[Some("5"), Some("lost"), None]),
        p.truncate(),
        p.insert(&[Some("6"), Some("Fay"), None]),
    ];
    m.apply("a1", "s1", &numbered(13, batch3)).await.unwrap();
    assert_eq!(
        rows(&db, "SELECT id, name, cv FROM mirror.person ORDER BY id").await,
        vec![r(&[Some("6"), Some("Fay"), None])]
    );
    assert_eq!(m.checkpoint("a1", "s1").await.unwrap(), 15);
    let all = m.checkpoints().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].0.as_str(), all[0].1.as_str(), all[0].2),
        ("a1", "s1", 15)
    );
    assert!(
        all[0].3 > 1_600_000_000_000,
        "applied_at in Unix ms: {}",
        all[0].3
    );

    // 4. A mirror started afresh (a restarted exchange) has no shape of the table:
    //    it applies rows to the table as the catalog has it.
    drop(m);
    let mut m = mirror(&server, "m1", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    m.apply(
        "a1",
        "s1",
        &numbered(16, vec![p.update(&[Some("6"), Some("Faye"), None])]),
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&db, "SELECT id, name FROM mirror.person ORDER BY id").await,
        vec![r(&[Some("6"), Some("Faye")])]
    );
    // ... but rows of a table it never had are refused, naming it.
    let other = Src::new("ghost", &[("id", "integer", INT, true)]);
    let e = fatal(
        m.apply("a1", "s1", &numbered(17, vec![other.insert(&[Some("1")])]))
            .await
            .unwrap_err(),
    );
    assert!(
        e.contains("mirror.ghost") && e.contains("does not exist"),
        "{e}"
    );
    assert_eq!(m.checkpoint("a1", "s1").await.unwrap(), 16);
}

/// The checkpoint moves in the same transaction as the rows: applying the same
/// records again, or an overlapping range, applies nothing twice. A keyless table
/// shows it: a duplicate would be a second row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_the_same_records_twice_applies_them_once() {
    let server = PgServer::start();
    let db = server.database("m2").await;
    let mut m = mirror(&server, "m2", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let log = Src::new(
        "log",
        &[("at", "integer", INT, false), ("what", "text", TEXT, false)],
    );
    let mut records = vec![log.shape()];
    for i in 1..=20 {
        records.push(log.insert(&[Some(&i.to_string()), Some("event")]));
    }
    let records = numbered(1, records);
    let a = m.apply("a1", "s1", &records[..11]).await.unwrap();
    assert_eq!((a.records, a.skipped, a.checkpoint), (11, 0, 11));
    let a = m.apply("a1", "s1", &records[..11]).await.unwrap();
    assert_eq!((a.records, a.skipped, a.checkpoint), (0, 11, 11));
    let a = m.apply("a1", "s1", &records[5..]).await.unwrap();
    assert_eq!((a.records, a.skipped, a.checkpoint), (10, 6, 21));
    let count = rows(&db, "SELECT count(*), count(DISTINCT at) FROM mirror.log").await;
    assert_eq!(count, vec![r(&[Some("20"), Some("20")])]);
    // Another stream has its own checkpoint; another delivery too.
    assert_eq!(m.checkpoint("a1", "s2").await.unwrap(), 0);
    let other = mirror(&server, "m2", MirrorConfig::new("d2", "mirror2"))
        .await
        .unwrap();
    assert_eq!(other.checkpoint("a1", "s1").await.unwrap(), 0);
    // Records out of order are the caller's bug, refused before anything is done.
    let mut swapped = records[..2].to_vec();
    swapped.swap(0, 1);
    let e = fatal(m.apply("a1", "s1", &swapped).await.unwrap_err());
    assert!(e.contains("out of order"), "{e}");
}

/// The backend of the mirror connected as `app` waits for a lock, having
/// written (it has an xid): its pid.
async fn blocked(db: &Client, app: &str) -> Option<String> {
    rows(
        db,
        &format!(
            "SELECT pid FROM pg_stat_activity
             WHERE application_name = '{app}' AND wait_event_type = 'Lock'
               AND backend_xid IS NOT NULL"
        ),
    )
    .await
    .pop()
    .and_then(|r| r[0].clone())
}

/// Drives `apply` until the backend of `app` waits for a lock; returns its
/// pid. What becomes of `apply` is the caller's.
async fn until_blocked<F>(db: &Client, app: &str, apply: std::pin::Pin<&mut F>) -> String
where
    F: std::future::Future,
    F::Output: std::fmt::Debug,
{
    let mut apply = apply;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::select! {
            r = &mut apply => panic!("the apply cannot finish while gate is locked: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if let Some(pid) = blocked(db, app).await {
                    return pid;
                }
                let all = "SELECT application_name, state, wait_event, left(query, 60)
                           FROM pg_stat_activity WHERE datname = current_database()";
                if tokio::time::Instant::now() > deadline {
                    panic!("the apply of {app} never reached the lock: {:?}", rows(db, all).await);
                }
            }
        }
    }
}

/// A transaction of the mirror that dies half-way leaves the previous checkpoint
/// and none of its rows, whether its backend is terminated, its connection
/// dropped (the exchange crashed), or its future dropped (the caller gave up);
/// the retry applies everything, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_apply_leaves_the_previous_checkpoint_and_no_rows() {
    let server = PgServer::start();
    let db = server.database("m3").await;
    let cfg = || MirrorConfig::new("d1", "mirror");
    let mut m = mirror_as(&server, "m3", cfg(), "m-kill").await.unwrap();
    let acct = Src::new(
        "acct",
        &[("id", "integer", INT, true), ("note", "text", TEXT, false)],
    );
    let gate = Src::new("gate", &[("id", "integer", INT, true)]);
    m.apply(
        "a1",
        "s1",
        &numbered(
            1,
            vec![
                acct.shape(),
                acct.insert(&[Some("0"), Some("before")]),
                gate.shape(),
            ],
        ),
    )
    .await
    .unwrap();

    // The next apply writes 100,000 snapshot rows of acct (row blocks), makes sure
    // they are written (a shape flushes the table's run), then truncates gate,
    // which the test holds locked: the transaction stops there, rows written.
    let mut big = Vec::new();
    for b in 0..10 {
        let text: String = (0..10_000)
            .map(|i| format!("{}\tsnap\n", b * 10_000 + i + 1))
            .collect();
        big.push(record(Body::RowBlock(RowBlock {
            schema: "public".into(),
            table: "acct".into(),
            columns: vec![
                SchemaColumn {
                    name: "id".into(),
                    type_name: "integer".into(),
                    type_oid: INT,
                    key: true,
                },
                SchemaColumn {
                    name: "note".into(),
                    type_name: "text".into(),
                    type_oid: TEXT,
                    key: false,
                },
            ],
            commit_lsn: 2,
            first_index: b * 10_000,
            row_count: 10_000,
            copy_text: text,
        })));
    }
    big.push(acct.shape());
    big.push(gate.truncate());
    let big = numbered(4, big);
    let mut locker = server.client("m3").await;
    let hold = locker.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE mirror.gate IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    // 1. The backend is terminated while it waits.
    let result = {
        let apply = m.apply("a1", "s1", &big);
        tokio::pin!(apply);
        let pid = until_blocked(&db, "m-kill", apply.as_mut()).await;
        db.batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
            .await
            .unwrap();
        apply.await
    };
    match result {
        Err(MirrorError::Retry(_)) => {}
        other => panic!("a terminated backend is worth a retry: {other:?}"),
    }

    // 2. The mirror is dropped while it waits: its connection closes.
    let mut dropped = mirror_as(&server, "m3", cfg(), "m-drop").await.unwrap();
    {
        let apply = dropped.apply("a1", "s1", &big);
        tokio::pin!(apply);
        until_blocked(&db, "m-drop", apply).await;
    }
    drop(dropped);
    // Its backend notices only once the lock is granted; until it has gone it
    // still holds the stream's checkpoint row, as any applier does.
    hold.rollback().await.unwrap();
    let hold = locker.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE mirror.gate IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    // 3. The apply's future is dropped while it waits, and the same mirror is
    //    used again: its next call rolls the transaction back first.
    let mut abandoned = mirror_as(&server, "m3", cfg(), "m-abandon").await.unwrap();
    {
        let apply = abandoned.apply("a1", "s1", &big);
        tokio::pin!(apply);
        until_blocked(&db, "m-abandon", apply).await;
    }
    hold.rollback().await.unwrap();
    assert_eq!(abandoned.checkpoint("a1", "s1").await.unwrap(), 3);

    // None left a row or moved the checkpoint.
    assert_eq!(
        rows(&db, "SELECT count(*) FROM mirror.acct").await,
        vec![r(&[Some("1")])]
    );

    // 4. The retry (the first mirror reconnects by itself) applies everything once;
    //    so does a retry of it.
    let a = m.apply("a1", "s1", &big).await.unwrap();
    assert_eq!((a.records, a.checkpoint), (12, 15));
    let a = abandoned.apply("a1", "s1", &big).await.unwrap();
    assert_eq!((a.records, a.skipped, a.checkpoint), (0, 12, 15));
    assert_eq!(
        rows(&db, "SELECT count(*), min(id), max(id) FROM mirror.acct").await,
        vec![r(&[Some("100001"), Some("0"), Some("100000")])]
    );
}

/// Shapes evolve the mirror: a new column is added, a widened type follows, a
/// dropped column stays (new rows leave it NULL); a type change that could lose
/// data stops the delivery naming table and column, applying nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shapes_add_columns_and_refuse_incompatible_type_changes() {
    let server = PgServer::start();
    let db = server.database("m4").await;
    let mut m = mirror(&server, "m4", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let v1 = Src::new(
        "person",
        &[
            ("id", "integer", INT, true),
            ("name", "text", TEXT, false),
            ("born", "date", 1082, false),
        ],
    );
    let v2 = Src::new(
        "person",
        &[
            ("id", "bigint", 20, true),
            ("name", "text", TEXT, false),
            ("born", "date", 1082, false),
            ("city", "character varying(40)", 1043, false),
        ],
    );
    let v3 = Src::new(
        "person",
        &[
            ("id", "bigint", 20, true),
            ("born", "date", 1082, false),
            ("city", "character varying(40)", 1043, false),
        ],
    );
    let records = vec![
        v1.shape(),
        v1.insert(&[Some("1"), Some("Ann"), Some("1990-01-02")]),
        v2.shape(),
        v2.insert(&[Some("5000000000"), Some("Bob"), None, Some("Wuhan")]),
        v3.shape(),
        v3.insert(&[Some("3"), Some("2001-03-04"), Some("Xi'an")]),
    ];
    m.apply("a1", "s1", &numbered(1, records)).await.unwrap();
    assert_eq!(
        rows(
            &db,
            "SELECT id, name, born, city FROM mirror.person ORDER BY id"
        )
        .await,
        vec![
            r(&[Some("1"), Some("Ann"), Some("1990-01-02"), None]),
            r(&[Some("3"), None, Some("2001-03-04"), Some("Xi'an")]),
            r(&[Some("5000000000"), Some("Bob"), None, Some("Wuhan")]),
        ]
    );
    assert_eq!(
        rows(
            &db,
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = 'mirror.person'::regclass AND attname = 'id'"
        )
        .await,
        vec![r(&[Some("bigint")])]
    );

    // born becomes an integer: a date column cannot follow.
    let v4 = Src::new(
        "person",
        &[
            ("id", "bigint", 20, true),
            ("born", "integer", INT, false),
            ("city", "character varying(40)", 1043, false),
        ],
    );
    let e = fatal(
        m.apply(
            "a1",
            "s1",
            &numbered(
                7,
                vec![
                    v3.insert(&[Some("4"), None, None]),
                    v4.shape(),
                    v4.insert(&[Some("5"), Some("1990"), None]),
                ],
            ),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        e.contains("mirror.person") && e.contains("\"born\"") && e.contains("date"),
        "{e}"
    );
    assert_eq!(m.checkpoint("a1", "s1").await.unwrap(), 6);
    assert_eq!(
        rows(&db, "SELECT count(*) FROM mirror.person").await,
        vec![r(&[Some("3")])],
        "nothing of the failed apply is there"
    );
}

/// The first stream that delivers a table owns its mirror table; another stream
/// (or another source schema of the same stream, or another delivery) mirroring
/// into it is refused, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_cannot_share_a_mirror_table() {
    let server = PgServer::start();
    let db = server.database("m5").await;
    let mut m = mirror(&server, "m5", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let p = person();
    m.apply(
        "a1",
        "s1",
        &numbered(
            1,
            vec![p.shape(), p.insert(&[Some("1"), Some("Ann"), None])],
        ),
    )
    .await
    .unwrap();

    let e = fatal(
        m.apply("a2", "s9", &numbered(1, vec![p.shape()]))
            .await
            .unwrap_err(),
    );
    assert!(
        e.contains("a1/s1") && e.contains("a2/s9") && e.contains("mirror.person"),
        "{e}"
    );
    // Rows without a shape, from a mirror with nothing cached: the same.
    let mut fresh = mirror(&server, "m5", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let e = fatal(
        fresh
            .apply(
                "a2",
                "s9",
                &numbered(1, vec![p.insert(&[Some("2"), None, None])]),
            )
            .await
            .unwrap_err(),
    );
    assert!(e.contains("a1/s1") && e.contains("a2/s9"), "{e}");
    // The same stream's table of another schema would land in the same table.
    let mut hr = person();
    hr.ns = "hr";
    let e = fatal(
        fresh
            .apply("a1", "s1", &numbered(3, vec![hr.shape()]))
            .await
            .unwrap_err(),
    );
    assert!(
        e.contains("public.person") && e.contains("hr.person"),
        "{e}"
    );
    // Another delivery writing the same schema.
    let mut d2 = mirror(&server, "m5", MirrorConfig::new("d2", "mirror"))
        .await
        .unwrap();
    let e = fatal(
        d2.apply("a1", "s1", &numbered(1, vec![p.shape()]))
            .await
            .unwrap_err(),
    );
    assert!(e.contains("\"d1\"") && e.contains("\"d2\""), "{e}");
    assert_eq!(
        rows(&db, "SELECT id FROM mirror.person").await,
        vec![r(&[Some("1")])]
    );
    // The bookkeeping may not live inside the mirror schema.
    let mut same = MirrorConfig::new("d3", "ferry");
    same.bookkeeping = "ferry".into();
    let e = fatal(mirror(&server, "m5", same).await.err().unwrap());
    assert!(e.contains("bookkeeping"), "{e}");
}

/// Names are always quoted: quotes, spaces, upper case and Chinese survive as
/// schema, table and column names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_with_quotes_and_chinese() {
    let server = PgServer::start();
    let db = server.database("m6").await;
    let mut m = mirror(&server, "m6", MirrorConfig::new("d1", "镜像 \"Mirror\""))
        .await
        .unwrap();
    let t = Src::new(
        "户籍 \"人口\"",
        &[
            ("ID", "integer", INT, true),
            ("姓名", "text", TEXT, false),
            ("a\"b c", "text", TEXT, false),
        ],
    );
    let records = vec![
        t.shape(),
        t.insert(&[Some("1"), Some("张三"), Some("x")]),
        t.insert(&[Some("2"), Some("李四"), None]),
        t.update(&[Some("1"), Some("张三丰"), Some("y\"z")]),
        t.delete(&[Some("2"), None, None]),
    ];
    m.apply("a1", "s1", &numbered(1, records)).await.unwrap();
    assert_eq!(
        rows(
            &db,
            r#"SELECT "ID", "姓名", "a""b c" FROM "镜像 ""Mirror"""."户籍 ""人口""" ORDER BY 1"#
        )
        .await,
        vec![r(&[Some("1"), Some("张三丰"), Some("y\"z")])]
    );
}

/// Values keep their exact text: numeric(30,10), timestamptz, bytea, jsonb,
/// NULL, text with tabs and backslashes, and the rest, both through the keyed
/// upsert and through the keyless COPY. The source is a real table; its rows are
/// read the way the agent reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_exactly() {
    let server = PgServer::start();
    let db = server.database("m7").await;
    db.batch_execute(
        r#"CREATE TABLE public.vals (
            id int PRIMARY KEY, amount numeric(30,10), at timestamptz, photo bytea, doc jsonb,
            note text, big bigint, f8 float8, f4 real, ok bool, day date, t time,
            ts timestamp, span interval, uid uuid, code char(5), nums int[], small int2, n numeric);
        INSERT INTO public.vals VALUES
          (1, 12345678901234567890.0123456789, '2024-02-29 23:59:59.999999+08',
           '\x00ff5c0a09'::bytea, '{"b": [1, 2.50, null], "a": "中文\t"}',
           E'tab\there\nnew\\line 中文', 9223372036854775807, 0.1, 1.5, true, '2024-02-29',
           '23:59:59.5', '1999-12-31 23:59:59', '1 year 2 mons 3 days 04:05:06.789',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ab', '{1,2,NULL}', -32768, 'NaN'),
          (2, -0.0000000001, '1970-01-01 00:00:00+00', '\x'::bytea, '[]', '', -1,
           '-Infinity', 'NaN', false, '0001-01-01', '00:00', '2000-01-01 00:00',
           '-1 days', '00000000-0000-0000-0000-000000000000', '', '{}', 0, 1e-20),
          (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL);"#,
    )
    .await
    .unwrap();
    let cols = rows(
        &db,
        "SELECT attname, format_type(atttypid, atttypmod), atttypid::int, (attname = 'id')::text
         FROM pg_attribute WHERE attrelid = 'public.vals'::regclass AND attnum > 0 ORDER BY attnum",
    )
    .await;
    let leak =
        |s: &Option<String>| -> &'static str { Box::leak(s.clone().unwrap().into_boxed_str()) };
    let spec: Vec<(&'static str, &'static str, u32, bool)> = cols
        .iter()
        .map(|c| {
            (
                leak(&c[0]),
                leak(&c[1]),
                c[2].as_deref().unwrap().parse().unwrap(),
                c[3].as_deref() == Some("true"),
            )
        })
        .collect();
    let source = rows(&db, "SELECT * FROM public.vals ORDER BY id").await;

    let keyed = Src::new("vals", &spec);
    let mut keyless = Src::new("vals_log", &spec);
    for c in &mut keyless.cols {
        c.3 = false;
    }
    // The keyed table gets each row twice: first only its key (written by COPY),
    // then in a later apply its values (written by UPDATE), so both paths carry
    // every value. The keyless table gets the rows by COPY.
    let mut first = vec![keyed.shape(), keyless.shape()];
    let mut second = Vec::new();
    for row in &source {
        let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
        let mut bare = vec![None; values.len()];
        bare[0] = values[0];
        first.push(keyed.insert(&bare));
        first.push(keyless.insert(&values));
        second.push(keyed.update(&values));
    }
    let mut m = mirror(&server, "m7", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let n = first.len() as u64;
    m.apply("a1", "s1", &numbered(1, first)).await.unwrap();
    m.apply("a1", "s1", &numbered(n + 1, second)).await.unwrap();

    let expect: Vec<Vec<Option<String>>> = source.clone();
    for table in ["mirror.vals", "mirror.vals_log"] {
        let got = rows(&db, &format!("SELECT * FROM {table} ORDER BY id")).await;
        assert_eq!(got, expect, "{table}");
    }
    let types = rows(
        &db,
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = 'mirror.vals'::regclass AND attname IN ('amount', 'doc', 'nums', 'code')
         ORDER BY attname",
    )
    .await;
    assert_eq!(
        types,
        vec![
            r(&[Some("amount"), Some("numeric(30,10)")]),
            r(&[Some("code"), Some("text")]),
            r(&[Some("doc"), Some("jsonb")]),
            r(&[Some("nums"), Some("text")]),
        ]
    );
}

/// A table without primary key gets every inserted row exactly once, identical
/// rows included; a delete (or an update under REPLICA IDENTITY FULL) removes one
/// matching row, never all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_table_gets_every_row_exactly_once() {
    let server = PgServer::start();
    let db = server.database("m8").await;
    let mut m = mirror(&server, "m8", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let mut log = Src::new(
        "log",
        &[("at", "integer", INT, false), ("what", "text", TEXT, false)],
    );
    log.identity = "full";
    let mut records = vec![log.shape()];
    for i in 0..3000 {
        let at = (i % 1000).to_string();
        records.push(log.insert(&[Some(&at), Some("same")]));
    }
    let records = numbered(1, records);
    m.apply("a1", "s1", &records[..1500]).await.unwrap();
    m.apply("a1", "s1", &records[1000..]).await.unwrap();
    assert_eq!(
        rows(&db, "SELECT count(*), count(DISTINCT at) FROM mirror.log").await,
        vec![r(&[Some("3000"), Some("1000")])]
    );

    let more = numbered(
        3002,
        vec![
            // One of the three (7, same) rows goes.
            log.delete(&[Some("7"), Some("same")]),
            // One of the three (8, same) rows changes.
            log.update_from(&[Some("8"), Some("same")], &[Some("8"), Some("changed")]),
            // Inserted and deleted within one apply: never there.
            log.insert(&[Some("5000"), None]),
            log.delete(&[Some("5000"), None]),
            // A NULL matches a NULL.
            log.insert(&[Some("6000"), None]),
        ],
    );
    m.apply("a1", "s1", &more).await.unwrap();
    m.apply("a1", "s1", &more).await.unwrap();
    assert_eq!(
        rows(
            &db,
            "SELECT at, what, count(*) FROM mirror.log WHERE at IN (7, 8, 5000, 6000)
             GROUP BY 1, 2 ORDER BY 1, 2"
        )
        .await,
        vec![
            r(&[Some("7"), Some("same"), Some("2")]),
            r(&[Some("8"), Some("changed"), Some("1")]),
            r(&[Some("8"), Some("same"), Some("2")]),
            r(&[Some("6000"), None, Some("1")]),
        ]
    );
    m.apply(
        "a1",
        "s1",
        &numbered(3007, vec![log.delete(&[Some("6000"), None])]),
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&db, "SELECT count(*) FROM mirror.log WHERE at = 6000").await,
        vec![r(&[Some("0")])]
    );
}

/// Many rows of new keys go into the table by COPY; when such a COPY meets a key
/// the table has, its rows are taken back and written the long way (existing
/// keys updated, new ones copied), in the same transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_rows_of_known_keys_are_updated_not_duplicated() {
    let server = PgServer::start();
    let db = server.database("m9").await;
    let mut m = mirror(&server, "m9", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let p = person();
    let mut first = vec![p.shape()];
    for i in 0..1000 {
        first.push(p.insert(&[Some(&i.to_string()), Some("v1"), None]));
    }
    m.apply("a1", "s1", &numbered(1, first)).await.unwrap();
    // Updates of every key, and 10 new keys, in one apply.
    let mut second = Vec::new();
    for i in 0..1010 {
        second.push(p.update(&[Some(&i.to_string()), Some("v2"), Some("cv")]));
    }
    let a = m.apply("a1", "s1", &numbered(1002, second)).await.unwrap();
    assert_eq!((a.records, a.checkpoint), (1010, 2011));
    assert_eq!(
        rows(
            &db,
            "SELECT count(*), count(DISTINCT id), min(name), max(name), min(cv) FROM mirror.person"
        )
        .await,
        vec![r(&[
            Some("1010"),
            Some("1010"),
            Some("v2"),
            Some("v2"),
            Some("cv")
        ])]
    );
    // New keys again, after the table was found to have keys: still once each.
    let third: Vec<Record> = (2000..2600)
        .map(|i| p.insert(&[Some(&i.to_string()), Some("v3"), None]))
        .collect();
    m.apply("a1", "s1", &numbered(2012, third)).await.unwrap();
    assert_eq!(
        rows(
            &db,
            "SELECT count(*), count(DISTINCT id) FROM mirror.person"
        )
        .await,
        vec![r(&[Some("1610"), Some("1610")])]
    );

    // New keys stream into the table as they come; then, in the same apply, a
    // streamed key is updated and another deleted, and more new keys follow (a
    // second stream, which must not carry the updated key again).
    let mut fourth: Vec<Record> = (3000..3600)
        .map(|i| p.insert(&[Some(&i.to_string()), Some("v4"), None]))
        .collect();
    fourth.push(p.update(&[Some("3000"), Some("v4 again"), Some("cv")]));
    fourth.push(p.delete(&[Some("3001"), None, None]));
    fourth.extend((3600..4200).map(|i| p.insert(&[Some(&i.to_string()), Some("v4"), None])));
    fourth.push(p.update(&[Some("3002"), Some("v4 late"), Some("\0unchanged")]));
    fourth.push(p.delete(&[Some("4199"), None, None]));
    m.apply("a1", "s1", &numbered(2612, fourth)).await.unwrap();
    assert_eq!(
        rows(
            &db,
            "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM mirror.person WHERE id >= 3000"
        )
        .await,
        vec![r(&[Some("1198"), Some("1198"), Some("3000"), Some("4198")])]
    );
    assert_eq!(
        rows(
            &db,
            "SELECT id, name, cv FROM mirror.person WHERE id IN (3000, 3001, 3002, 3003) ORDER BY id"
        )
        .await,
        vec![
            r(&[Some("3000"), Some("v4 again"), Some("cv")]),
            r(&[Some("3002"), Some("v4 late"), None]),
            r(&[Some("3003"), Some("v4"), None]),
        ]
    );
}

/// A long random history of one table (new keys in runs long enough to be
/// streamed, updates, updates keeping an unchanged value, deletes, key changes),
/// with another table's rows and shapes in between, applied in chunks of random
/// sizes: the mirror ends exactly as a model of the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_converge_to_the_model() {
    use std::collections::BTreeMap;

    let server = PgServer::start();
    let db = server.database("m10").await;
    let mut m = mirror(&server, "m10", MirrorConfig::new("d1", "mirror"))
        .await
        .unwrap();
    let p = person();
    let other = Src::new(
        "other",
        &[("k", "integer", INT, true), ("v", "text", TEXT, false)],
    );
    // A small deterministic generator (64-bit LCG).
    let mut seed: u64 = 0x5eed_f3e2;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let mut model: BTreeMap<i64, (String, Option<String>)> = BTreeMap::new();
    let mut fresh = 0i64;
    let mut records = vec![p.shape(), other.shape()];
    for step in 0..12_000 {
        let keys: Vec<i64> = model.keys().copied().collect();
        let pick = |r: u64| keys[(r as usize) % keys.len()];
        let roll = next(100);
        let name = format!("n{step}");
        // Stretches of only new keys (streamed), then of known keys updated
        // (streamed, refused by the table, written the long way).
        let roll = match step {
            0..1_500 | 6_000..7_000 => 0,
            1_500..1_600 | 7_000..7_100 => 60 + roll % 40,
            3_000..4_000 => 60,
            _ => roll,
        };
        if keys.is_empty() || roll < 55 {
            fresh += 1;
            let cv = (roll % 3 != 0).then(|| format!("cv{step}"));
            records.push(p.insert(&[Some(&fresh.to_string()), Some(&name), cv.as_deref()]));
            model.insert(fresh, (name, cv));
        } else if roll < 75 {
            let k = pick(next(1 << 30));
            let cv = format!("cv{step}");
            records.push(p.update(&[Some(&k.to_string()), Some(&name), Some(&cv)]));
            model.insert(k, (name, Some(cv)));
        } else if roll < 82 {
            let k = pick(next(1 << 30));
            records.push(p.update(&[Some(&k.to_string()), Some(&name), Some("\0unchanged")]));
            if let Some(row) = model.get_mut(&k) {
                row.0 = name;
            }
        } else if roll < 92 {
            let k = pick(next(1 << 30));
            records.push(p.delete(&[Some(&k.to_string()), None, None]));
            model.remove(&k);
        } else if roll < 97 {
            let k = pick(next(1 << 30));
            fresh += 1;
            let (_, cv) = model.remove(&k).unwrap_or_default();
            records.push(p.update_from(
                &[Some(&k.to_string()), None, None],
                &[Some(&fresh.to_string()), Some(&name), cv.as_deref()],
            ));
            model.insert(fresh, (name, cv));
        } else if roll < 99 {
            records.push(other.insert(&[Some(&step.to_string()), Some("x")]));
        } else {
            records.push(other.shape());
        }
    }
    let records = numbered(1, records);
    let mut at = 0;
    while at < records.len() {
        let n = 1 + next(1_500) as usize;
        let end = (at + n).min(records.len());
        m.apply("a1", "s1", &records[at..end]).await.unwrap();
        at = end;
    }
    let expect: Vec<Vec<Option<String>>> = model
        .iter()
        .map(|(k, (name, cv))| vec![Some(k.to_string()), Some(name.clone()), cv.clone()])
        .collect();
    assert_eq!(
        rows(&db, "SELECT id, name, cv FROM mirror.person ORDER BY id").await,
        expect
    );
}
