//! The postgres source's failure modes against a real PostgreSQL: each ends with
//! an error that says what is wrong and how to fix it; `doctor` reports the same.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferry_adapters::postgres::{doctor, PostgresSource, SnapshotMode};
use ferry_adapters::{Source, SourceContext, SourceError, SourceFuture};
use ferry_tests::pg::PgServer;
use support::committer::Store;
use support::config;

/// Drops a replication slot once no walsender holds it: a source that just
/// stopped leaves its server process exiting for a moment.
async fn drop_slot(db: &tokio_postgres::Client, slot: &str) {
    let sql = format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"
    );
    for _ in 0..300 {
        if db.execute(&sql, &[]).await.unwrap() == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("replication slot {slot} stayed active for 30 s");
}

/// The message of a fatal error: the run under the supervisor ended on it (a
/// retryable one would have been retried instead).
fn message(r: Result<(), SourceError>) -> String {
    match r {
        Err(SourceError::Fatal(m)) => m,
        other => panic!("expected a fatal error with a message, got {other:?}"),
    }
}

/// A source that counts its instances.
struct Counted {
    inner: PostgresSource,
    runs: Arc<AtomicUsize>,
}

impl Source for Counted {
    fn run(&self, ctx: SourceContext) -> SourceFuture {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.inner.run(ctx)
    }
}

/// A table that does not exist cannot appear by restarting the source: the error
/// is fatal, names the table and the fix, and the source is run once, not
/// restarted every few seconds for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_fatal_and_not_restarted() {
    let server = PgServer::start();
    let db = server.database("d5").await;
    db.batch_execute(
        "CREATE TABLE public.a (id int PRIMARY KEY);
         CREATE PUBLICATION ferry_pub FOR TABLE public.a;",
    )
    .await
    .unwrap();
    let cfg = config(&server, "d5", &["public.a", "public.gone"], "s5");
    let runs = Arc::new(AtomicUsize::new(0));
    let store = Store::new();
    let r = store
        .start_source(Box::new(Counted {
            inner: PostgresSource::new(cfg),
            runs: Arc::clone(&runs),
        }))
        .ended(30)
        .await;
    let e = r.unwrap_err();
    assert!(e.is_fatal(), "{e:?}");
    let m = e.to_string();
    assert!(
        m.contains("table public.gone (source.tables) does not exist"),
        "{m}"
    );
    assert!(m.contains("remove it from source.tables"), "{m}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "restarted after a fatal error"
    );
    assert!(store.position().is_none(), "nothing was committed");
}

/// A server that is not there yet is retryable: the same run keeps trying (with
/// backoff) and captures once it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_retried_until_it_answers() {
    let server = PgServer::start();
    let db = server.database("d6").await;
    support::acct(&db, 3).await;
    let mut cfg = config(&server, "d6", &["public.acct"], "s6");
    cfg.snapshot = SnapshotMode::Never;
    // Nothing listens on `port` until the forwarder below starts.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.dsn = format!("host=127.0.0.1 port={port} user=postgres dbname=d6");
    let runs = Arc::new(AtomicUsize::new(0));
    let store = Store::new();
    let mut run = store.start_source(Box::new(Counted {
        inner: PostgresSource::new(cfg),
        runs: Arc::clone(&runs),
    }));
    run.wait_for("a few attempts", 30, || runs.load(Ordering::SeqCst) >= 3)
        .await;
    assert!(store.position().is_none());
    // The server "comes up": the port now leads to it.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let to = server.port;
    let forwarder = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    run.wait_for("streaming", 60, || {
        store.phase().as_deref() == Some("streaming")
    })
    .await;
    assert!(matches!(run.stop().await, Err(SourceError::Shutdown)));
    forwarder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_what_is_missing_with_the_fix() {
    let server = PgServer::start();
    let db = server.database("d1").await;
    db.batch_execute(
        "CREATE TABLE public.person (id int PRIMARY KEY, name text);
         CREATE TABLE public.nokey (a int);",
    )
    .await
    .unwrap();
    let cfg = config(&server, "d1", &["public.person", "public.nokey"], "s1");
    let checks = doctor(&cfg).await;
    let get = |name: &str| {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name} in {checks:#?}"))
            .clone()
    };
    for ok in [
        "connect",
        "wal_level",
        "max_replication_slots",
        "max_wal_senders",
        "replication privilege",
        "replication connection",
        "select on public.person",
        "replica identity of public.person",
    ] {
        assert!(get(ok).ok, "{:?}", get(ok));
    }
    let p = get("publication");
    assert!(!p.ok);
    assert_eq!(
        p.fix.as_deref(),
        Some(r#"CREATE PUBLICATION "ferry_pub" FOR TABLE "public"."person", "public"."nokey";"#)
    );
    let nk = get("replica identity of public.nokey");
    assert!(!nk.ok && nk.fix.unwrap().contains("REPLICA IDENTITY FULL"));

    db.batch_execute("CREATE PUBLICATION ferry_pub FOR TABLE public.person")
        .await
        .unwrap();
    let checks = doctor(&cfg).await;
    let c = checks
        .iter()
        .find(|c| c.name == "publication contains public.nokey")
        .unwrap();
    assert!(!c.ok);
    assert_eq!(
        c.fix.as_deref(),
        Some(r#"ALTER PUBLICATION "ferry_pub" ADD TABLE "public"."nokey";"#)
    );
    assert!(checks.iter().find(|c| c.name == "publication").unwrap().ok);

    let mut bad = cfg.clone();
    bad.dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=nosuchdb",
        server.port
    );
    let checks = doctor(&bad).await;
    assert_eq!(checks.len(), 1);
    assert!(
        !checks[0].ok && checks[0].detail.contains("nosuchdb"),
        "{checks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_held_by_another_consumer_is_a_clear_error() {
    let server = PgServer::start();
    let db = server.database("d2").await;
    support::acct(&db, 3).await;
    db.batch_execute("SELECT pg_create_logical_replication_slot('s2', 'pgoutput')")
        .await
        .unwrap();
    // pg_recvlogical is a client: it may run as root.
    let mut holder = std::process::Command::new(server.bin("pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "d2",
        ])
        .args(["-S", "s2", "--start", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=ferry_pub"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = ferry_tests::pg::text_rows(
            &db,
            "SELECT active FROM pg_replication_slots WHERE slot_name = 's2'",
        )
        .await;
        if r[0][0].1.as_deref() == Some("t") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pg_recvlogical did not take the slot"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut cfg = config(&server, "d2", &["public.acct"], "s2");
    cfg.snapshot = SnapshotMode::Never;
    let store = Store::new();
    let m = message(store.start(&cfg).ended(60).await);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(m.contains("is in use by another connection"), "{m}");
    assert!(m.contains("pg_recvlogical"), "{m}");
    assert!(m.contains("source.slot"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_used_and_a_wrong_one_is_a_clear_error() {
    let server = PgServer::start();
    let db = server.database("d3").await;
    support::acct(&db, 3).await;
    db.batch_execute(
        "CREATE ROLE pwuser LOGIN REPLICATION PASSWORD 'right horse';
         GRANT SELECT ON public.acct TO pwuser;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pg.pass");
    std::fs::write(&pass, "wrong\n").unwrap();
    let mut cfg = config(&server, "d3", &["public.acct"], "s3");
    cfg.dsn = server.dsn_as("pwuser", "d3");
    cfg.password_file = Some(pass.clone());
    let store = Store::new();
    let m = message(store.start(&cfg).ended(30).await);
    assert!(m.contains("refused the login of user \"pwuser\""), "{m}");
    assert!(m.contains("password_file"), "{m}");

    // With the right one, the SQL and the replication connection both get in.
    std::fs::write(&pass, "right horse\n").unwrap();
    let mut run = store.start(&cfg);
    run.wait_for("the snapshot", 30, || {
        store.phase().as_deref() == Some("streaming")
    })
    .await;
    db.batch_execute("INSERT INTO public.acct VALUES (10, 0, 'x')")
        .await
        .unwrap();
    run.wait_for("the row", 30, || {
        store.any_record(|r| {
            matches!(&r.body, Some(ferry_protocol::messages::record::Body::Row(c)) if !c.snapshot)
        })
    })
    .await;
    // The three rows of the snapshot and the one streamed.
    assert_eq!(support::model::rows(&store.records()).len(), 4);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_problems_name_the_fix() {
    let server = PgServer::start();
    let db = server.database("d4").await;
    db.batch_execute(
        "CREATE TABLE public.a (id int PRIMARY KEY);
         CREATE TABLE public.b (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let store = Store::new();
    let cfg = config(&server, "d4", &["public.a", "public.b"], "s4");

    let m = message(store.start(&cfg).ended(30).await);
    assert!(
        m.contains(r#"CREATE PUBLICATION "ferry_pub" FOR TABLE "public"."a", "public"."b";"#),
        "{m}"
    );
    db.batch_execute("CREATE PUBLICATION ferry_pub FOR TABLE public.a")
        .await
        .unwrap();
    let m = message(store.start(&cfg).ended(30).await);
    assert!(
        m.contains(r#"ALTER PUBLICATION "ferry_pub" ADD TABLE "public"."b";"#),
        "{m}"
    );
    let mut missing = cfg.clone();
    missing.tables = vec!["public.a".into(), "public.nope".into()];
    let m = message(store.start(&missing).ended(30).await);
    assert!(
        m.contains("table public.nope (source.tables) does not exist"),
        "{m}"
    );
    assert!(store.position().is_none(), "nothing was committed");

    // A slot left over without a stored position is not silently reused.
    db.batch_execute("SELECT pg_create_logical_replication_slot('s4', 'pgoutput')")
        .await
        .unwrap();
    let mut one = cfg.clone();
    one.tables = vec!["public.a".into()];
    let m = message(store.start(&one).ended(30).await);
    assert!(m.contains("SELECT pg_drop_replication_slot('s4');"), "{m}");
    drop_slot(&db, "s4").await;

    // Streaming, then the slot disappears (a failover to a standby without it):
    // refused, never re-snapshotted.
    let mut run = store.start(&one);
    run.wait_for("streaming", 30, || {
        store.phase().as_deref() == Some("streaming")
    })
    .await;
    run.stop().await.unwrap_err();
    drop_slot(&db, "s4").await;
    let m = message(store.start(&one).ended(30).await);
    assert!(
        m.contains("does not exist, but the stored position says streaming had reached"),
        "{m}"
    );
    assert!(m.contains("will not re-snapshot silently"), "{m}");
    let still: Option<String> =
        ferry_tests::pg::text_rows(&db, "SELECT slot_name FROM pg_replication_slots")
            .await
            .first()
            .and_then(|r| r[0].1.clone());
    assert_eq!(
        still, None,
        "no slot was created behind the operator's back"
    );

    // Another slot name for a stream that has a position: refused.
    let mut renamed = one.clone();
    renamed.slot = "s4b".into();
    let m = message(store.start(&renamed).ended(30).await);
    assert!(m.contains("belongs to replication slot \"s4\""), "{m}");
}
