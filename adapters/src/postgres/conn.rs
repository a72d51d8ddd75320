//! Where and how to connect: the DSN, the password, and what a failure means
//! (retry, or stop with a message that tells the operator what to fix).

use std::str::FromStr;

use pg_walstream::ReplicationError;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;

use super::tls::{self, TlsMode};
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

/// The DSN's TLS settings: `sslmode` (default `disable`) and `sslrootcert`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DsnTls {
    pub mode: TlsMode,
    pub root: Option<std::path::PathBuf>,
}

/// Splits `sslmode` and `sslrootcert` off a DSN (tokio-postgres knows neither
/// `verify-*` nor `sslrootcert`); returns the rest for tokio-postgres.
pub(crate) fn take_tls(dsn: &str) -> std::result::Result<(String, DsnTls), String> {
    let mut tls = DsnTls {
        mode: TlsMode::Disable,
        root: None,
    };
    let mut take = |k: &str, v: &str| -> std::result::Result<bool, String> {
        match k {
            "sslmode" => tls.mode = TlsMode::parse(v)?,
            "sslrootcert" => tls.root = Some(v.into()),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(format!(
                    "source.dsn: {k} is not supported: the replication connection cannot present a client certificate or check a revocation list; authenticate the role with a password (password_file, SCRAM) over sslmode=verify-full"
                ))
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let trimmed = dsn.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = trimmed.split_once('?') else {
            return Ok((trimmed.to_string(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(
                k,
                &percent_encoding::percent_decode_str(v).decode_utf8_lossy(),
            )? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, tls));
    }
    let mut kept = Vec::new();
    for (k, v) in conninfo_pairs(trimmed)? {
        if !take(&k, &v)? {
            kept.push(format!("{k}={}", libpq_value(&v)));
        }
    }
    Ok((kept.join(" "), tls))
}

/// `key = value` pairs of a libpq conninfo string (values optionally single-quoted,
/// backslash escapes).
fn conninfo_pairs(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return Err(format!(
                "source.dsn: cannot parse it: {key:?} has no value (key=value)"
            ));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut value = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    None => {
                        return Err(format!(
                            "source.dsn: the value of {key} has no closing quote"
                        ))
                    }
                    Some('\'') => break,
                    Some('\\') => value.extend(it.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// What `validate` checks of the DSN; returns it parsed: the rest for
/// tokio-postgres, and the TLS settings.
pub(crate) fn check_dsn(
    dsn: &str,
) -> std::result::Result<(tokio_postgres::Config, DsnTls), String> {
    let (rest, tls) = take_tls(dsn)?;
    let c = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| format!("source.dsn: cannot parse it: {e}"))?;
    match c.get_hosts() {
        [Host::Tcp(_)] => {}
        [] => return Err("source.dsn: give the server's address, e.g. host=127.0.0.1".into()),
        [_] => return Err(
            "source.dsn: Unix-socket hosts are not supported; use host=127.0.0.1 (a TCP address)"
                .into(),
        ),
        _ => return Err("source.dsn: give exactly one host".into()),
    }
    if c.get_ports().len() > 1 {
        return Err("source.dsn: give exactly one port".into());
    }
    if c.get_user().is_none() {
        return Err("source.dsn: give the user, e.g. user=ferry".into());
    }
    if matches!(tls.mode, TlsMode::VerifyCa | TlsMode::VerifyFull) && tls.root.is_none() {
        return Err(tls::needs_root(tls.mode));
    }
    if c.get_options().is_some() {
        return Err("source.dsn: options=... is not supported: the replication connection cannot carry them, so the snapshot and the stream would render values differently".into());
    }
    Ok((c, tls))
}

/// The DSN's `sslrootcert` can be read here (a host check, like the password file).
pub(crate) fn check_tls_files(dsn: &str) -> std::result::Result<(), String> {
    let (_, tls) = take_tls(dsn)?;
    tls::client_config(tls.mode, tls.root.as_deref()).map(|_| ())
}

/// The password from `password_file` (first line) or `password_env`; `None` when
/// neither is configured (the DSN may carry one, or the server trusts the host).
pub(crate) fn read_password(cfg: &PostgresConfig) -> std::result::Result<Option<String>, String> {
    if let Some(p) = &cfg.password_file {
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("source.password_file: cannot read {}: {e}", p.display()))?;
        let pw = text.lines().next().unwrap_or("").to_string();
        if pw.is_empty() {
            return Err(format!("source.password_file: {} is empty", p.display()));
        }
        return Ok(Some(pw));
    }
    if let Some(var) = &cfg.password_env {
        return match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            _ => Err(format!(
                "source.password_env: the environment variable {var} is not set (or empty)"
            )),
        };
    }
    Ok(None)
}

/// A value for a libpq-style conninfo, quoted.
/// A value for pg_walstream's conninfo parser, which folds `''` into a quote
/// and knows no backslash escapes.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// A value for tokio-postgres's conninfo parser (libpq's: backslash escapes).
fn libpq_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub(crate) fn target(cfg: &PostgresConfig) -> std::result::Result<Target, String> {
    let (mut pg, dsn_tls) = check_dsn(&cfg.dsn)?;
    if let Some(pw) = read_password(cfg)? {
        pg.password(pw);
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(std::time::Duration::from_secs(10));
    }
    pg.application_name("ferry");
    let host = match pg.get_hosts() {
        [Host::Tcp(h)] => h.clone(),
        _ => return Err("source.dsn: give the server's TCP address".into()),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or_default().to_string();
    let dbname = pg.get_dbname().unwrap_or(&user).to_string();
    let tls = tls::client_config(dsn_tls.mode, dsn_tls.root.as_deref())?;
    pg.ssl_mode(if tls.is_some() {
        SslMode::Require
    } else {
        SslMode::Disable
    });
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
    let class = &code.code()[..2];
    if matches!(class, "08" | "40" | "53" | "57") {
        return Fail::Retry(format!("{what} ({}): {msg}", target.desc));
    }
    Fail::Fatal(format!(
        "{what} ({}): {msg} [SQLSTATE {}]",
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
