//! What the server must provide, checked by `doctor` (each problem a failed
//! check with its fix) and before every stream starts (each problem a fatal
//! error naming its fix): the binary log on and in ROW format, a `server_id`
//! other than this source's, the privileges of a binlog reader, and every
//! table of `source.tables`.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::conn::{self, variable};
use super::{split_table, MysqlConfig};
use crate::{DoctorCheck, SourceError};

/// One problem and its fix.
pub(crate) struct Problem {
    pub check: &'static str,
    pub detail: String,
    pub fix: String,
}

impl Problem {
    pub(crate) fn fatal(self) -> SourceError {
        SourceError::Fatal(format!("{}: {}", self.detail, self.fix))
    }
}

/// Whether the server is MariaDB (from `VERSION()`).
pub(crate) async fn is_mariadb(c: &mut Conn) -> Result<bool, SourceError> {
    Ok(conn::query_text(c, "SELECT VERSION()")
        .await?
        .is_some_and(|v| v.contains("MariaDB")))
}

/// Checks `doctor` reports but a starting stream does not stop for.
const ADVISORY: &[&str] = &[
    "privileges",
    "binlog row image",
    "binlog row metadata",
    "replica server ids",
    "binlog retention",
];

/// Binlogs kept for less than this are reported (seconds).
const RETENTION: u64 = 7 * 86_400;

/// Runs every check; `Err` only when the server cannot be asked at all.
pub(crate) async fn problems(
    c: &mut Conn,
    cfg: &MysqlConfig,
) -> Result<Vec<(&'static str, Option<Problem>)>, SourceError> {
    let mut out = Vec::new();
    let log_bin = variable(c, "log_bin").await?;
    out.push((
        "binary log",
        (!matches!(log_bin.as_deref(), Some("1" | "ON"))).then(|| Problem {
            check: "binary log",
            detail: format!(
                "the server's binary log is off (log_bin = {})",
                log_bin.unwrap_or_default()
            ),
            fix: "start the server with log_bin (e.g. log_bin = binlog in [mysqld]) and restart it"
                .into(),
        }),
    ));
    let format = variable(c, "binlog_format").await?.unwrap_or_default();
    out.push((
        "binlog format",
        (!format.eq_ignore_ascii_case("ROW")).then(|| Problem {
            check: "binlog format",
            detail: format!("binlog_format is {format}, not ROW: row changes are not in the binary log"),
            fix: "SET GLOBAL binlog_format = 'ROW' (and binlog_format = ROW in the server's configuration)".into(),
        }),
    ));
    let server_id = variable(c, "server_id").await?.unwrap_or_default();
    out.push((
        "server id",
        (server_id == cfg.server_id.to_string()).then(|| Problem {
            check: "server id",
            detail: format!(
                "source.server_id {} is the server's own server_id",
                cfg.server_id
            ),
            fix: "choose another source.server_id, unique among the server's replicas".into(),
        }),
    ));
    // Advisory (`doctor` only, see `ADVISORY`): what works but risks loss of
    // detail, a clash, or the agent's place in the binlog.
    let image = variable(c, "binlog_row_image").await?.unwrap_or_default();
    out.push((
        "binlog row image",
        (!image.is_empty() && !image.eq_ignore_ascii_case("FULL")).then(|| Problem {
            check: "binlog row image",
            detail: format!(
                "binlog_row_image is {image}: updates carry only the changed columns (the others arrive as unchanged) and deletes only the key"
            ),
            fix: "SET GLOBAL binlog_row_image = 'FULL' (and binlog_row_image = FULL in the server's configuration)".into(),
        }),
    ));
    let metadata = variable(c, "binlog_row_metadata")
        .await?
        .unwrap_or_default();
    out.push((
        "binlog row metadata",
        (!metadata.is_empty() && !metadata.eq_ignore_ascii_case("FULL")).then(|| Problem {
            check: "binlog row metadata",
            detail: format!(
                "binlog_row_metadata is {metadata}: rows the agent reads only after their table was altered cannot be labelled, and stop the stream"
            ),
            fix: "SET GLOBAL binlog_row_metadata = 'FULL' (and binlog_row_metadata = FULL in the server's configuration)".into(),
        }),
    ));
    let replicas: Vec<mysql_async::Row> = c.query("SHOW SLAVE HOSTS").await.unwrap_or_default();
    let clash = replicas
        .iter()
        .any(|r| r.get::<Option<u32>, _>(0).flatten() == Some(cfg.server_id));
    out.push((
        "replica server ids",
        clash.then(|| Problem {
            check: "replica server ids",
            detail: format!(
                "a replica with server id {} is connected to the server (SHOW SLAVE HOSTS); if it is not this agent, the two keep disconnecting each other",
                cfg.server_id
            ),
            fix: "give source.server_id a number no replica of this server uses".into(),
        }),
    ));
    let days: f64 = variable(c, "expire_logs_days")
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let seconds: u64 = variable(c, "binlog_expire_logs_seconds")
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kept = if seconds > 0 {
        seconds
    } else {
        (days * 86_400.0) as u64
    };
    out.push((
        "binlog retention",
        (kept > 0 && kept < RETENTION).then(|| Problem {
            check: "binlog retention",
            detail: format!(
                "the server purges binlogs after {:.1} days: an agent that cannot read for longer (a network outage, a long weekend) loses its place and its stream stops",
                kept as f64 / 86_400.0
            ),
            fix: format!(
                "SET GLOBAL binlog_expire_logs_seconds = {RETENTION} (7 days; expire_logs_days = 7 on older servers), and the same in the server's configuration"
            ),
        }),
    ));
    let grants: Vec<String> = c
        .query("SHOW GRANTS")
        .await
        .map_err(|e| conn::classify("SHOW GRANTS", e))?;
    let has = |p: &str| {
        grants.iter().any(|g| {
            let g = g.to_ascii_uppercase();
            g.contains("ALL PRIVILEGES ON *.*") || (g.contains(p) && g.contains(" ON *.*"))
        })
    };
    let mut missing = Vec::new();
    if !has("REPLICATION SLAVE") && !has("REPLICATION REPLICA") {
        missing.push("REPLICATION SLAVE");
    }
    if !has("REPLICATION CLIENT") && !has("BINLOG MONITOR") {
        missing.push("REPLICATION CLIENT");
    }
    out.push((
        "privileges",
        (!missing.is_empty()).then(|| Problem {
            check: "privileges",
            detail: format!("the source's user lacks {}", missing.join(" and ")),
            fix: format!(
                "GRANT {}, SELECT ON *.* TO the source's user",
                missing.join(", ")
            ),
        }),
    ));
    for t in &cfg.tables {
        let Ok((db, table)) = split_table(t) else {
            continue;
        };
        let n: Option<u64> = c
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (db, table),
            )
            .await
            .map_err(|e| conn::classify("reading information_schema.TABLES", e))?;
        let problem = if n.unwrap_or(0) == 0 {
            Some(Problem {
                check: "table",
                detail: format!("table {t} does not exist (or the source's user may not see it)"),
                fix: format!("create {t}, GRANT SELECT on it to the source's user, or remove it from source.tables"),
            })
        } else {
            match c
                .query_drop(format!(
                    "SELECT 1 FROM `{}`.`{}` LIMIT 0",
                    db.replace('`', "``"),
                    table.replace('`', "``")
                ))
                .await
            {
                Ok(()) => None,
                Err(e) => Some(Problem {
                    check: "table",
                    detail: format!("table {t} cannot be read: {e}"),
                    fix: format!("GRANT SELECT ON {t} TO the source's user"),
                }),
            }
        };
        out.push(("table", problem));
    }
    Ok(out)
}

/// Before a stream starts: the first problem, as a fatal error. The
/// privileges are left to the server itself (a refused binlog request is fatal
/// too): `SHOW GRANTS` does not list what a role grants, and a guess must not
/// stop a stream that works.
pub(crate) async fn preflight(c: &mut Conn, cfg: &MysqlConfig) -> Result<(), SourceError> {
    for (check, p) in problems(c, cfg).await? {
        if let Some(p) = p.filter(|_| !ADVISORY.contains(&check)) {
            return Err(p.fatal());
        }
    }
    Ok(())
}

/// `ferry-agent doctor` for a mysql source.
pub(crate) async fn doctor(cfg: &MysqlConfig) -> Vec<DoctorCheck> {
    let fail = |name: &str, detail: String, fix: Option<String>| DoctorCheck {
        name: format!("mysql {name}"),
        ok: false,
        detail,
        fix,
    };
    if let Err(e) = cfg.check_environment() {
        return vec![fail("password", e, None)];
    }
    let (opts, dsn) = match conn::opts(cfg) {
        Ok(o) => o,
        Err(e) => return vec![fail("connection", e.to_string(), None)],
    };
    let mut c = match conn::connect(&opts, &dsn).await {
        Ok(c) => c,
        Err(e) => return vec![fail("connection", e.to_string(), None)],
    };
    let mut checks = vec![DoctorCheck {
        name: "mysql connection".into(),
        ok: true,
        detail: dsn.describe(),
        fix: None,
    }];
    match problems(&mut c, cfg).await {
        Err(e) => checks.push(fail("checks", e.to_string(), None)),
        Ok(ps) => {
            for (name, p) in ps {
                checks.push(match p {
                    None => DoctorCheck {
                        name: format!("mysql {name}"),
                        ok: true,
                        detail: String::new(),
                        fix: None,
                    },
                    Some(p) => fail(p.check, p.detail, Some(p.fix)),
                });
            }
        }
    }
    let _ = c.disconnect().await;
    checks
}
