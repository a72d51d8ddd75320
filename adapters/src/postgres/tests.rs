//! Configuration and pure helpers; the source itself is tested against a real
//! PostgreSQL in `adapters/tests/postgres.rs`.

use super::*;
use crate::SourceConfig;

fn parse(toml_src: &str) -> Result<PostgresConfig, String> {
    #[derive(serde::Deserialize)]
    struct W {
        source: SourceConfig,
    }
    let w: W = toml::from_str(toml_src).map_err(|e| e.to_string())?;
    match w.source {
        SourceConfig::Postgres(c) => Ok(c),
        other => Err(format!("not postgres: {other:?}")),
    }
}

const FULL: &str = r#"source = { kind = "postgres", dsn = "host=127.0.0.1 port=5432 user=ferry dbname=hukou",
  password_file = "/etc/ferry/pg.pass", tables = ["public.person", "public.household"],
  slot = "ferry_hp_mz_01", publication = "ferry_pub", snapshot = "initial",
  max_retained_wal = "2GiB", heartbeat_interval = "30s", snapshot_rows_per_second = 5000,
  snapshot_chunk_rows = 2000 }"#;

#[test]
fn full_config_parses_and_validates() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.tables, vec!["public.person", "public.household"]);
    assert_eq!(c.snapshot, SnapshotMode::Initial);
    assert_eq!(c.max_retained_wal, Size(2 << 30));
    assert_eq!(c.heartbeat_interval.0, std::time::Duration::from_secs(30));
    assert_eq!(c.snapshot_rows_per_second, Some(5000));
    assert_eq!(c.snapshot_chunk_rows, 2000);
    c.validate().unwrap();
    assert_eq!(SourceConfig::Postgres(c).kind(), "postgres");
}

#[test]
fn defaults() {
    let c = parse(
        r#"source = { kind = "postgres", dsn = "host=db user=ferry dbname=x", tables = ["public.t"], slot = "s", publication = "p" }"#,
    )
    .unwrap();
    assert_eq!(
        c,
        PostgresConfig::new("host=db user=ferry dbname=x", &["public.t"], "s", "p")
    );
    assert_eq!(c.snapshot, SnapshotMode::Initial);
    assert_eq!(c.max_retained_wal, Size(1 << 30));
    assert_eq!(c.heartbeat_interval.0, std::time::Duration::from_secs(60));
    assert_eq!(c.snapshot_chunk_rows, 50_000);
    c.validate().unwrap();
}

#[test]
fn unknown_keys_are_errors() {
    let e = parse(
        r#"source = { kind = "postgres", dsn = "host=db user=u", tables = ["public.t"], slot = "s", publication = "p", slots = "x" }"#,
    )
    .unwrap_err();
    assert!(e.contains("unknown field `slots`"), "{e}");
    let e = parse(
        r#"source = { kind = "postgres", dsn = "host=db user=u", tables = ["public.t"], slot = "s", publication = "p", snapshot = "sometimes" }"#,
    )
    .unwrap_err();
    assert!(e.contains("initial"), "{e}");
}

#[test]
fn validation_names_the_key() {
    let base = PostgresConfig::new(
        "host=127.0.0.1 user=ferry dbname=d",
        &["public.t"],
        "s1",
        "p",
    );
    let bad = |f: &dyn Fn(&mut PostgresConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c.validate().unwrap_err()
    };
    assert!(bad(&|c| c.tables = vec!["person".into()]).contains("schema.table"));
    assert!(bad(&|c| c.tables = vec![]).starts_with("source.tables"));
    assert!(bad(&|c| c.tables = vec!["public.t".into(), "public.t".into()]).contains("twice"));
    assert!(bad(&|c| c.slot = "Bad-Slot".into()).starts_with("source.slot"));
    assert!(bad(&|c| c.dsn = "host=/var/run/postgresql user=u".into()).contains("Unix-socket"));
    assert!(bad(&|c| c.dsn = "host=db".into()).contains("user"));
    assert!(bad(&|c| c.dsn = "host=db user=u sslmode=prefer".into()).contains("sslmode=require"));
    assert!(bad(&|c| c.dsn = "host=db user=u sslmode=verify-full".into()).contains("sslrootcert"));
    let mut missing_ca = base.clone();
    missing_ca.dsn = "host=db user=u sslmode=verify-ca sslrootcert=/nonexistent".into();
    missing_ca.validate().unwrap();
    assert!(missing_ca
        .check_environment()
        .unwrap_err()
        .contains("/nonexistent"));
    assert!(bad(&|c| c.dsn = "host=db user=u options='-c x=y'".into()).contains("options"));
    assert!(bad(&|c| c.dsn = "host='unterminated".into()).starts_with("source.dsn"));
    assert!(bad(&|c| c.snapshot_chunk_rows = 0).starts_with("source.snapshot_chunk_rows"));
    assert!(bad(&|c| c.snapshot_rows_per_second = Some(0))
        .starts_with("source.snapshot_rows_per_second"));
    assert!(
        bad(&|c| c.heartbeat_interval = Duration(std::time::Duration::from_millis(10)))
            .starts_with("source.heartbeat_interval")
    );
    assert!(bad(&|c| {
        c.password_env = Some("X".into());
        c.password_file = Some("/x".into());
    })
    .contains("not both"));
}

#[test]
fn passwords_come_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pg.pass");
    std::fs::write(&f, "s3cr'et\n").unwrap();
    let mut c = PostgresConfig::new(
        "host=127.0.0.1 port=5433 user=ferry dbname=hukou",
        &["public.t"],
        "s",
        "p",
    );
    c.password_file = Some(f.clone());
    c.check_environment().unwrap();
    let t = conn::target(&c).unwrap();
    assert_eq!(t.pg.get_password(), Some(&b"s3cr'et"[..]));
    assert!(t.repl.contains("password='s3cr''et'"), "{}", t.repl);
    assert!(t.repl.contains("replication=database"));
    assert_eq!(t.desc, "ferry@127.0.0.1:5433/hukou");

    c.password_file = Some(dir.path().join("missing"));
    assert!(c.check_environment().unwrap_err().contains("cannot read"));
    c.password_file = None;
    c.password_env = Some("FERRY_TEST_PG_PASSWORD_UNSET_42".into());
    assert!(c
        .check_environment()
        .unwrap_err()
        .contains("FERRY_TEST_PG_PASSWORD_UNSET_42"));
}

#[test]
fn describe_unreadable() {
    assert_eq!(describe_position(b"nope"), "unreadable position (4 bytes)");
}

#[test]
fn literals_are_quoted() {
    assert_eq!(sql::quote_literal("it's"), "'it''s'");
    assert_eq!(sql::quote_literal(r"a\b"), r"E'a\\b'");
    assert_eq!(sql::quote_ident(r#"we"ird"#), r#""we""ird""#);
}

#[test]
fn tls_settings_are_taken_from_either_dsn_form() {
    use ferry_pg::tls::TlsMode;
    let take_tls = |dsn| ferry_pg::dsn::take_tls(conn::DSN_KEY, dsn);
    let (rest, tls) = take_tls(
        "host=db port=5433 user=u sslmode=verify-full sslrootcert='/etc/ferry/pg ca.pem' dbname=x",
    )
    .unwrap();
    assert_eq!(rest, "host='db' port='5433' user='u' dbname='x'");
    assert_eq!(tls.mode, TlsMode::VerifyFull);
    assert_eq!(
        tls.root.as_deref(),
        Some(std::path::Path::new("/etc/ferry/pg ca.pem"))
    );
    let (rest, tls) = take_tls("host = db user=it\\'s").unwrap();
    assert_eq!(rest, "host='db' user='it\\'s'");
    assert_eq!(tls.mode, TlsMode::Disable);
    let (rest, tls) = take_tls(
        "postgresql://u@db:5433/x?sslmode=require&application_name=a&sslrootcert=%2Fca.pem",
    )
    .unwrap();
    assert_eq!(rest, "postgresql://u@db:5433/x?application_name=a");
    assert_eq!(tls.mode, TlsMode::Require);
    assert_eq!(tls.root.as_deref(), Some(std::path::Path::new("/ca.pem")));
    assert!(take_tls("host=db sslmode=bogus")
        .unwrap_err()
        .contains("bogus"));
    assert!(take_tls("host='db").unwrap_err().contains("quote"));
    // Client certificates would be dropped on the replication connection: refused
    // by name, in either form, rather than failing at the server.
    for dsn in [
        "host=db user=u sslmode=verify-full sslrootcert=/ca.pem sslcert=/c.pem sslkey=/k.pem",
        "postgresql://u@db/x?sslmode=verify-full&sslkey=%2Fk.pem",
        "host=db user=u sslcrl=/crl.pem",
    ] {
        let e = take_tls(dsn).unwrap_err();
        assert!(
            e.starts_with("source.dsn: ssl") && e.contains("not supported"),
            "{e}"
        );
    }
}
