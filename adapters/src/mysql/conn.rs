//! Where and how to connect: the DSN, the password, and what a failure means
//! (retry, or stop with a message that tells the operator what to fix).

use ferry_pg::dsn::DsnTls;
use ferry_pg::tls::TlsMode;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, SslOpts};

use super::MysqlConfig;
use crate::SourceError;

/// `mysql://USER[:PASSWORD]@HOST[:PORT][/DATABASE][?sslmode=MODE&sslrootcert=FILE]`,
/// parsed. TLS as for PostgreSQL (`ferry_pg::tls`): `sslmode` `disable` (the
/// default), `require` (encrypted, the server unchecked unless `sslrootcert`
/// is given, then as `verify-ca`), `verify-ca` (the chain up to
/// `sslrootcert`), `verify-full` (also the host name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dsn {
    pub user: String,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    pub database: Option<String>,
    pub tls: DsnTls,
}

impl Dsn {
    pub(crate) fn parse(dsn: &str) -> Result<Dsn, String> {
        let bad = |why: &str| {
            format!("source.dsn: {why}; write mysql://USER@HOST:PORT/DATABASE (the password in password_file or password_env)")
        };
        let rest = dsn
            .strip_prefix("mysql://")
            .ok_or_else(|| bad("does not start with mysql://"))?;
        let mut tls = DsnTls {
            mode: TlsMode::Disable,
            root: None,
        };
        let rest = match rest.split_once('?') {
            None => rest,
            Some((rest, query)) => {
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                    match k {
                        "sslmode" => tls.mode = TlsMode::parse(KEY, &v)?,
                        "sslrootcert" => tls.root = Some(v.into_owned().into()),
                        other => {
                            return Err(bad(&format!(
                                "option {other:?} is not supported (only sslmode and sslrootcert)"
                            )))
                        }
                    }
                }
                if tls.mode == TlsMode::Disable && tls.root.is_some() {
                    return Err(format!(
                        "{KEY}: sslrootcert is given but sslmode is disable; set sslmode=verify-full (or verify-ca)"
                    ));
                }
                if matches!(tls.mode, TlsMode::VerifyCa | TlsMode::VerifyFull) && tls.root.is_none()
                {
                    return Err(ferry_pg::tls::needs_root(KEY, tls.mode));
                }
                rest
            }
        };
        let (userinfo, hostpart) = rest
            .rsplit_once('@')
            .ok_or_else(|| bad("names no user (USER@ before the host)"))?;
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p.to_string())),
            None => (userinfo, None),
        };
        if user.is_empty() {
            return Err(bad("the user is empty"));
        }
        let (hostport, database) = match hostpart.split_once('/') {
            Some((h, d)) if !d.is_empty() => (h, Some(d.to_string())),
            Some((h, _)) => (h, None),
            None => (hostpart, None),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad(&format!("port {p:?} is not a number")))?,
            ),
            _ => (hostport, 3306),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        Ok(Dsn {
            user: user.to_string(),
            password,
            host: host.to_string(),
            port,
            database,
            tls,
        })
    }

    /// `user@host:port`, for messages.
    pub(crate) fn describe(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }
}

/// The password from `password_file` (first line) or `password_env`; `None` when
/// neither is configured.
pub(crate) fn read_password(cfg: &MysqlConfig) -> Result<Option<String>, String> {
    ferry_pg::dsn::read_password(
        "source",
        cfg.password_file.as_deref(),
        cfg.password_env.as_deref(),
    )
}

/// Connection options for both connections the source opens.
pub(crate) fn opts(cfg: &MysqlConfig) -> Result<(Opts, Dsn), SourceError> {
    let dsn = Dsn::parse(&cfg.dsn).map_err(SourceError::Fatal)?;
    let password = read_password(cfg)
        .map_err(SourceError::Fatal)?
        .or_else(|| dsn.password.clone());
    let b = OptsBuilder::default()
        .ip_or_hostname(dsn.host.clone())
        .tcp_port(dsn.port)
        .user(Some(dsn.user.clone()))
        .pass(password)
        .db_name(dsn.database.clone())
        // The server's own socket would bypass the host the operator named.
        .prefer_socket(false)
        .ssl_opts(ssl_opts(&dsn.tls)?);
    Ok((Opts::from(b), dsn))
}

/// The key messages name.
const KEY: &str = "source.dsn";

/// mysql_async's TLS settings for the DSN's `sslmode`; `None` for `disable`.
fn ssl_opts(tls: &DsnTls) -> Result<Option<SslOpts>, SourceError> {
    let mode = match (tls.mode, &tls.root) {
        (TlsMode::Disable, _) => return Ok(None),
        (TlsMode::Require, Some(_)) => TlsMode::VerifyCa,
        (m, _) => m,
    };
    // mysql_async builds its rustls configuration with the process's default
    // provider, and more than one is compiled in: ring, as everywhere in Ferry.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = SslOpts::default();
    Ok(Some(match (mode, &tls.root) {
        (TlsMode::Require, _) => opts
            .with_danger_accept_invalid_certs(true)
            .with_danger_skip_domain_validation(true),
        (_, None) => return Err(SourceError::Fatal(ferry_pg::tls::needs_root(KEY, mode))),
        (_, Some(root)) => {
            // Read now, so a missing or unreadable file is named here.
            let pem = std::fs::read(root).map_err(|e| {
                SourceError::Fatal(format!("{KEY}: sslrootcert {}: {e}", root.display()))
            })?;
            opts.with_root_certs(vec![pem.into()])
                .with_disable_built_in_roots(true)
                .with_danger_skip_domain_validation(mode == TlsMode::VerifyCa)
        }
    }))
}

/// Opens an ordinary connection, within 10 s.
pub(crate) async fn connect(opts: &Opts, dsn: &Dsn) -> Result<Conn, SourceError> {
    match tokio::time::timeout(std::time::Duration::from_secs(10), Conn::new(opts.clone())).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(classify(&format!("connecting to {}", dsn.describe()), e)),
        Err(_) => Err(SourceError::Other(format!(
            "connecting to {}: no answer within 10 s",
            dsn.describe()
        ))),
    }
}

/// Server error codes that a new attempt cannot get past.
const ACCESS_DENIED: u16 = 1045;
const DB_ACCESS_DENIED: u16 = 1044;
const BAD_DB: u16 = 1049;
const SPECIFIC_ACCESS_DENIED: u16 = 1227;
const TABLE_ACCESS_DENIED: u16 = 1142;
/// ER_MASTER_FATAL_ERROR_READING_BINLOG: the requested binlog or GTID is gone.
const FATAL_READING_BINLOG: u16 = 1236;

/// Turns a driver error into a source error: what the operator must fix is
/// fatal, with the fix; the rest (network, server restarting) is retried.
pub(crate) fn classify(what: &str, e: mysql_async::Error) -> SourceError {
    if refused_certificate(&e) {
        return SourceError::Fatal(format!(
            "{what}: the server's certificate was refused ({e}): {KEY}'s sslrootcert must be the CA \
             that signed it, and with sslmode=verify-full the certificate must name the host"
        ));
    }
    if let mysql_async::Error::Server(s) = &e {
        let fix = match s.code {
            ACCESS_DENIED => {
                Some("check the user and password (source.password_file / source.password_env)")
            }
            DB_ACCESS_DENIED | BAD_DB => Some("check the database named in source.dsn"),
            SPECIFIC_ACCESS_DENIED | TABLE_ACCESS_DENIED => Some(
                "GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT ON *.* TO the source's user",
            ),
            FATAL_READING_BINLOG => Some(
                "the server no longer has the binlog the stored position needs (purged, or a \
                 different server): the changes in between are lost; remove the stream's position \
                 to start over from the server's current position",
            ),
            _ => None,
        };
        if let Some(fix) = fix {
            return SourceError::Fatal(format!("{what}: {} (error {}): {fix}", s.message, s.code));
        }
    }
    SourceError::Other(format!("{what}: {e}"))
}

/// Whether `e` is the TLS handshake refusing the server's certificate
/// (rustls's error somewhere in its chain of sources).
fn refused_certificate(e: &mysql_async::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map_or(err, |i| i as &(dyn std::error::Error + 'static));
        if matches!(
            inner.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_))
        ) {
            return true;
        }
        next = err.source();
    }
    false
}

/// One value of a single-row, single-column query, as text.
pub(crate) async fn query_text(conn: &mut Conn, sql: &str) -> Result<Option<String>, SourceError> {
    let v: Option<Option<String>> = conn.query_first(sql).await.map_err(|e| classify(sql, e))?;
    Ok(v.flatten())
}

/// A global variable's value (`SELECT @@global.NAME`); `None` when the server
/// does not know it.
pub(crate) async fn variable(conn: &mut Conn, name: &str) -> Result<Option<String>, SourceError> {
    match conn
        .query_first::<Option<String>, _>(format!("SELECT @@global.{name}"))
        .await
    {
        Ok(v) => Ok(v.flatten()),
        // ER_UNKNOWN_SYSTEM_VARIABLE
        Err(mysql_async::Error::Server(s)) if s.code == 1193 => Ok(None),
        Err(e) => Err(classify(&format!("reading @@{name}"), e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn dsns_parse_or_name_the_key() {
        let d = Dsn::parse("mysql://ferry@db1:3307/shop").unwrap();
        assert_eq!(
            (
                d.user.as_str(),
                d.host.as_str(),
                d.port,
                d.database.as_deref()
            ),
            ("ferry", "db1", 3307, Some("shop"))
        );
        let d = Dsn::parse("mysql://ferry:pw@127.0.0.1").unwrap();
        assert_eq!(
            (d.port, d.password.as_deref(), d.database),
            (3306, Some("pw"), None)
        );
        let d = Dsn::parse("mysql://u@[::1]:3306/x").unwrap();
        assert_eq!((d.host.as_str(), d.port), ("::1", 3306));
        for bad in [
            "db1:3306",
            "mysql://db1:3306/shop",
            "mysql://@db1/shop",
            "mysql://u@db1:port/shop",
            "mysql://u@db1/shop?ssl=1",
            "mysql://u@db1/shop?sslmode=prefer",
            "mysql://u@db1/shop?sslmode=verify-full",
            "mysql://u@db1/shop?sslrootcert=/ca.pem",
        ] {
            let e = Dsn::parse(bad).unwrap_err();
            assert!(e.starts_with("source.dsn:"), "{bad}: {e}");
        }
        let d =
            Dsn::parse("mysql://u@db1/shop?sslmode=verify-ca&sslrootcert=/etc/ferry/db%20ca.pem")
                .unwrap();
        assert_eq!(d.database.as_deref(), Some("shop"));
        assert_eq!(
            d.tls,
            DsnTls {
                mode: TlsMode::VerifyCa,
                root: Some("/etc/ferry/db ca.pem".into())
            }
        );
        assert_eq!(
            Dsn::parse("mysql://u@db1/shop").unwrap().tls.mode,
            TlsMode::Disable
        );
    }
}
