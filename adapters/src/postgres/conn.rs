//! Where and how to connect: the DSN, the password, and what a failure means
//! (retry, or stop with a message that tells the operator what to fix). Parsing
//! the DSN, its TLS settings and the password is `ferry_pg::dsn`'s; this module
//! adds what only the replication source needs (no `options`, the conninfo for
//! pg_walstream) and names the keys `source.*`.

use ferry_pg::dsn::DsnTls;
use ferry_pg::tls;
use pg_walstream::ReplicationError;
use tokio_postgres::error::SqlState;

use super::PostgresConfig;
use crate::SourceError;

/// How a session of the source ended.
#[derive(Debug)]
pub(crate) enum Fail {
    /// Worth retrying after a pause (server unreachable or restarting).
    Retry(String),
    /// Needs the operator; the message says what to fix.
    Fatal(String),
    /// Shutdown, or an error of the agent's buffer: passed through as is.
    Source(SourceError),
}

impl From<SourceError> for Fail {
    fn from(e: SourceError) -> Self {
        Fail::Source(e)
    }
}

pub(crate) type Result<T> = std::result::Result<T, Fail>;

/// Connection settings for both connections the source opens.
#[derive(Clone)]
pub(crate) struct Target {
    /// The SQL connection (snapshot, catalog queries, heartbeat).
    pub pg: tokio_postgres::Config,
    /// The replication connection, as a conninfo string for pg_walstream.
    pub repl: String,
    /// `user@host:port/dbname`, for messages.
    pub desc: String,
    pub user: String,
    /// TLS of the SQL connection; `None`: `sslmode=disable`.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// The configuration key every DSN message names.
pub(crate) const DSN_KEY: &str = "source.dsn";

/// What `validate` checks of the DSN; returns it parsed: the rest for
/// tokio-postgres, and the TLS settings.
pub(crate) fn check_dsn(
    dsn: &str,
) -> std::result::Result<(tokio_postgres::Config, DsnTls), String> {
    let (c, tls) = ferry_pg::dsn::parse(DSN_KEY, dsn)?;
    if c.get_options().is_some() {
        return Err("source.dsn: options=... is not supported: the replication connection cannot carry them, so the snapshot and the stream would render values differently".into());
    }
    Ok((c, tls))
}

/// The DSN's `sslrootcert` can be read here (a host check, like the password file).
pub(crate) fn check_tls_files(dsn: &str) -> std::result::Result<(), String> {
    ferry_pg::dsn::check_tls_files(DSN_KEY, dsn)
}

/// The password from `password_file` (first line) or `password_env`; `None` when
/// neither is configured (the DSN may carry one, or the server trusts the host).
pub(crate) fn read_password(cfg: &PostgresConfig) -> std::result::Result<Option<String>, String> {
    ferry_pg::dsn::read_password(
        "source",
        cfg.password_file.as_deref(),
        cfg.password_env.as_deref(),
    )
}

/// A value for pg_walstream's conninfo parser, which folds `''` into a quote
/// and knows no backslash escapes.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

pub(crate) fn target(cfg: &PostgresConfig) -> std::result::Result<Target, String> {
    let (mut pg, dsn_tls) = check_dsn(&cfg.dsn)?;
    let tls = ferry_pg::dsn::prepare(DSN_KEY, &mut pg, &dsn_tls, read_password(cfg)?)?;
    let (host, port) = ferry_pg::dsn::tcp_address(DSN_KEY, &pg)?;
    let user = pg.get_user().unwrap_or_default().to_string();
    let dbname = pg.get_dbname().unwrap_or(&user).to_string();
    let mut repl = format!(
        "host={} port={port} user={} dbname={} sslmode={} replication=database connect_timeout=10",
        conninfo_value(&host),
        conninfo_value(&user),
        conninfo_value(&dbname),
        dsn_tls.mode.as_str()
    );
    if let Some(root) = &dsn_tls.root {
        repl.push_str(&format!(
            " sslrootcert={}",
            conninfo_value(&root.to_string_lossy())
        ));
    }
    if let Some(pw) = pg.get_password() {
        repl.push_str(&format!(
            " password={}",
            conninfo_value(&String::from_utf8_lossy(pw))
        ));
    }
    Ok(Target {
        desc: format!("{user}@{host}:{port}/{dbname}"),
        pg,
        repl,
        user,
        tls,
    })
}

/// What a tokio-postgres error means for the source.
pub(crate) fn classify_sql(target: &Target, what: &str, e: &tokio_postgres::Error) -> Fail {
    let Some(db) = e.as_db_error() else {
        let msg = e.to_string();
        if msg.contains("password missing") {
            return Fail::Fatal(format!(
                "PostgreSQL at {} asks for a password but none is configured: set source.password_file or source.password_env",
                target.desc
            ));
        }
        let detail = std::error::Error::source(e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        if tls::refused_certificate(e) {
            return Fail::Fatal(format!(
                "{what} ({}): the server's TLS certificate was refused{detail}. Check sslrootcert (the CA that signed the server's certificate) and, for sslmode=verify-full, that the certificate names the host in source.dsn",
                target.desc
            ));
        }
        return Fail::Retry(format!("{what} ({}): {msg}{detail}", target.desc));
    };
    let code = db.code();
    let msg = db.message();
    if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        return Fail::Fatal(format!(
            "PostgreSQL at {} refused the login of user {:?}: {msg}. Check the password (source.password_file / source.password_env) and pg_hba.conf",
            target.desc, target.user
        ));
    }
    if *code == SqlState::INVALID_CATALOG_NAME {
        return Fail::Fatal(format!(
            "{what} ({}): {msg}. Check dbname in source.dsn",
            target.desc
        ));
    }
    // Connection trouble, rollbacks (serialization, deadlock), resources (disk,
    // memory, connections), operator intervention (shutdown), objects busy or
    // locked, the server's own I/O and internal errors: another session may get
    // past them. Everything else (a missing object, a privilege) needs the
    // operator.
    let class = &code.code()[..2];
    if matches!(class, "08" | "40" | "53" | "57" | "58" | "XX")
        || *code == SqlState::OBJECT_IN_USE
        || *code == SqlState::LOCK_NOT_AVAILABLE
    {
        return Fail::Retry(format!("{what} ({}): {msg}", target.desc));
    }
    Fail::Fatal(format!(
        "{what} ({}): {msg} [SQLSTATE {}]. `ferry-agent doctor` checks what the source needs and prints the fix for each problem",
        target.desc,
        code.code()
    ))
}

/// What a pg_walstream error means for the source.
pub(crate) fn classify_repl(target: &Target, what: &str, e: ReplicationError) -> Fail {
    match e {
        ReplicationError::Cancelled(_) => Fail::Source(SourceError::Shutdown),
        ReplicationError::Authentication(m) => Fail::Fatal(format!(
            "PostgreSQL at {} refused the replication login of user {:?}: {m}. Check the password, that the role has REPLICATION, and that pg_hba.conf has a `replication` line for it",
            target.desc, target.user
        )),
        ReplicationError::PermanentConnection(m)
        | ReplicationError::Config(m)
        | ReplicationError::ReplicationSlot(m) => {
            Fail::Fatal(format!("{what} ({}): {m}", target.desc))
        }
        other => {
            let m = other.to_string();
            if m.contains("pg_hba.conf") || m.contains("password authentication failed") {
                return Fail::Fatal(format!(
                    "{what} ({}): {m}. Check the password, and that pg_hba.conf has a `replication` line for user {:?}",
                    target.desc, target.user
                ));
            }
            if m.contains("must be superuser or replication role")
                || m.contains("permission denied")
            {
                return Fail::Fatal(format!(
                    "{what} ({}): {m}. Fix: ALTER ROLE {} WITH REPLICATION;",
                    target.desc,
                    super::sql::quote_ident(&target.user)
                ));
            }
            Fail::Retry(format!("{what} ({}): {m}", target.desc))
        }
    }
}
