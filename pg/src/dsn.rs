//! Where and how to connect: a libpq-style DSN (`key=value` pairs or a
//! `postgresql://` URI), its TLS settings, and the password from a file or the
//! environment.
//!
//! tokio-postgres knows neither `sslmode=verify-*` nor `sslrootcert`, so
//! [`take_tls`] splits them off before the rest is handed to it. Every message
//! starts with the configuration key the value came from (`source.dsn`,
//! `delivery.dsn`, ...): the caller passes it in.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};

use crate::tls::{self, TlsMode};

/// The DSN's TLS settings: `sslmode` (default `disable`) and `sslrootcert`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnTls {
    pub mode: TlsMode,
    pub root: Option<PathBuf>,
}

/// Splits `sslmode` and `sslrootcert` off the DSN configured under `key`; returns
/// the rest for tokio-postgres. Client certificates and revocation lists
/// (`sslcert`, `sslkey`, `sslpassword`, `sslcrl`, `sslcrldir`) are refused by name
/// rather than silently dropped.
pub fn take_tls(key: &str, dsn: &str) -> Result<(String, DsnTls), String> {
    let mut tls = DsnTls {
        mode: TlsMode::Disable,
        root: None,
    };
    let mut take = |k: &str, v: &str| -> Result<bool, String> {
        match k {
            "sslmode" => tls.mode = TlsMode::parse(key, v)?,
            "sslrootcert" => tls.root = Some(v.into()),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(format!(
                    "{key}: {k} is not supported: Ferry's PostgreSQL connections present no client certificate and check no revocation list (the agent's replication connection cannot); authenticate the role with a password (password_file, SCRAM) over sslmode=verify-full"
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
    for (k, v) in conninfo_pairs(key, trimmed)? {
        if !take(&k, &v)? {
            kept.push(format!("{k}={}", libpq_value(&v)));
        }
    }
    Ok((kept.join(" "), tls))
}

/// `key = value` pairs of a libpq conninfo string (values optionally single-quoted,
/// backslash escapes).
fn conninfo_pairs(cfg_key: &str, s: &str) -> Result<Vec<(String, String)>, String> {
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
                "{cfg_key}: cannot parse it: {key:?} has no value (key=value)"
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
                            "{cfg_key}: the value of {key} has no closing quote"
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

/// A value for tokio-postgres's conninfo parser (libpq's: backslash escapes),
/// quoted.
pub fn libpq_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Parses the DSN configured under `key` and checks what every Ferry connection
/// needs: exactly one TCP host and port, a user, and `sslrootcert` for the
/// verifying modes. Returns the rest for tokio-postgres and the TLS settings.
pub fn parse(key: &str, dsn: &str) -> Result<(tokio_postgres::Config, DsnTls), String> {
    let (rest, tls) = take_tls(key, dsn)?;
    let c = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| format!("{key}: cannot parse it: {e}"))?;
    match c.get_hosts() {
        [Host::Tcp(_)] => {}
        [] => {
            return Err(format!(
                "{key}: give the server's address, e.g. host=127.0.0.1"
            ))
        }
        [_] => {
            return Err(format!(
                "{key}: Unix-socket hosts are not supported; use host=127.0.0.1 (a TCP address)"
            ))
        }
        _ => return Err(format!("{key}: give exactly one host")),
    }
    if c.get_ports().len() > 1 {
        return Err(format!("{key}: give exactly one port"));
    }
    if c.get_user().is_none() {
        return Err(format!("{key}: give the user, e.g. user=ferry"));
    }
    if matches!(tls.mode, TlsMode::VerifyCa | TlsMode::VerifyFull) && tls.root.is_none() {
        return Err(tls::needs_root(key, tls.mode));
    }
    Ok((c, tls))
}

/// The host and port of a DSN [`parse`] accepted.
pub fn tcp_address(key: &str, c: &tokio_postgres::Config) -> Result<(String, u16), String> {
    match c.get_hosts() {
        [Host::Tcp(h)] => Ok((h.clone(), c.get_ports().first().copied().unwrap_or(5432))),
        _ => Err(format!("{key}: give the server's TCP address")),
    }
}

/// The DSN's `sslrootcert` can be read here (a host check, like the password file).
pub fn check_tls_files(key: &str, dsn: &str) -> Result<(), String> {
    let (_, tls) = take_tls(key, dsn)?;
    tls::client_config(key, tls.mode, tls.root.as_deref()).map(|_| ())
}

/// The password from `password_file` (its first line) or the environment variable
/// `password_env`; `None` when neither is given (the DSN may carry one, or the
/// server trusts the host). `section` prefixes the keys in messages (`source`
/// gives `source.password_file`).
pub fn read_password(
    section: &str,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<String>, String> {
    if let Some(p) = file {
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("{section}.password_file: cannot read {}: {e}", p.display()))?;
        let pw = text.lines().next().unwrap_or("").to_string();
        if pw.is_empty() {
            return Err(format!("{section}.password_file: {} is empty", p.display()));
        }
        return Ok(Some(pw));
    }
    if let Some(var) = env {
        return match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            _ => Err(format!(
                "{section}.password_env: the environment variable {var} is not set (or empty)"
            )),
        };
    }
    Ok(None)
}

/// Makes a parsed DSN ready to connect: the password (if any), a 10 s connect
/// timeout unless the DSN sets one, `application_name=ferry`, and TLS as `sslmode`
/// says. Returns the rustls configuration to connect with (`None`: plain).
pub fn prepare(
    key: &str,
    config: &mut tokio_postgres::Config,
    tls: &DsnTls,
    password: Option<String>,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if let Some(pw) = password {
        config.password(pw);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name("ferry");
    let rustls = tls::client_config(key, tls.mode, tls.root.as_deref())?;
    config.ssl_mode(if rustls.is_some() {
        SslMode::Require
    } else {
        SslMode::Disable
    });
    Ok(rustls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_taken_from_either_dsn_form() {
        let take = |d: &str| take_tls("delivery.dsn", d);
        let (rest, tls) = take(
            "host=db port=5433 user=u sslmode=verify-full sslrootcert='/etc/ferry/pg ca.pem' dbname=x",
        )
        .unwrap();
        assert_eq!(rest, "host='db' port='5433' user='u' dbname='x'");
        assert_eq!(tls.mode, TlsMode::VerifyFull);
        assert_eq!(tls.root.as_deref(), Some(Path::new("/etc/ferry/pg ca.pem")));
        let (rest, tls) =
            take("postgresql://u@db:5433/x?sslmode=require&application_name=a").unwrap();
        assert_eq!(rest, "postgresql://u@db:5433/x?application_name=a");
        assert_eq!(tls.mode, TlsMode::Require);
    }

    /// Every message names the key it was given, so one parser serves the agent's
    /// `source.dsn` and the exchange's delivery settings alike.
    #[test]
    fn messages_name_the_configured_key() {
        for (dsn, says) in [
            ("host=db sslmode=bogus", "bogus"),
            ("host=db sslmode=prefer", "sslmode=require"),
            ("host='db", "closing quote"),
            ("host=db user=u sslcert=/c.pem", "sslcert is not supported"),
        ] {
            let e = take_tls("delivery.dsn", dsn).unwrap_err();
            assert!(e.starts_with("delivery.dsn: ") && e.contains(says), "{e}");
        }
        for (dsn, says) in [
            ("host=/run/postgresql user=u", "Unix-socket"),
            ("host=db", "give the user"),
            ("user=u", "address"),
            ("host=db user=u sslmode=verify-ca", "sslrootcert=FILE"),
        ] {
            let e = parse("delivery.dsn", dsn).unwrap_err();
            assert!(e.starts_with("delivery.dsn: ") && e.contains(says), "{e}");
        }
        let e = check_tls_files(
            "delivery.dsn",
            "host=db user=u sslmode=verify-ca sslrootcert=/nonexistent",
        )
        .unwrap_err();
        assert!(
            e.starts_with("delivery.dsn: sslrootcert /nonexistent"),
            "{e}"
        );
    }

    #[test]
    fn a_ready_config_has_password_timeout_and_tls() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pg.pass");
        std::fs::write(&f, "s3cr'et\nignored\n").unwrap();
        let pw = read_password("delivery", Some(&f), None).unwrap();
        let (mut c, tls) = parse("delivery.dsn", "host=127.0.0.1 port=5433 user=u").unwrap();
        assert_eq!(
            tcp_address("delivery.dsn", &c).unwrap(),
            ("127.0.0.1".to_string(), 5433)
        );
        let rustls = prepare("delivery.dsn", &mut c, &tls, pw).unwrap();
        assert!(rustls.is_none());
        assert_eq!(c.get_password(), Some(&b"s3cr'et"[..]));
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(10)));
        assert_eq!(c.get_application_name(), Some("ferry"));

        std::fs::write(&f, "\n").unwrap();
        let e = read_password("delivery", Some(&f), None).unwrap_err();
        assert!(
            e.starts_with("delivery.password_file: ") && e.contains("empty"),
            "{e}"
        );
        let e = read_password("delivery", None, Some("FERRY_TEST_PG_PW_UNSET_77")).unwrap_err();
        assert!(e.starts_with("delivery.password_env: "), "{e}");
        assert_eq!(read_password("delivery", None, None).unwrap(), None);
    }
}
