//! `ferry-agent doctor`: what the database must provide, checked one by one, each
//! failure with the SQL (or setting) that fixes it.

use pg_walstream::PgReplicationConnection;

use super::conn::{self, Fail};
use super::sql::{qualified, quote_ident, quote_literal, Sql};
use super::{split_table, PostgresConfig};
use crate::DoctorCheck;

fn check(
    name: impl Into<String>,
    ok: bool,
    detail: impl Into<String>,
    fix: Option<String>,
) -> DoctorCheck {
    DoctorCheck {
        name: name.into(),
        ok,
        detail: detail.into(),
        fix: if ok { None } else { fix },
    }
}

fn failed(name: &str, e: Fail) -> DoctorCheck {
    let detail = match e {
        Fail::Retry(m) | Fail::Fatal(m) => m,
        Fail::Source(e) => e.to_string(),
    };
    check(name, false, detail, None)
}

/// Checks the database against `cfg`: connection, `wal_level`, slots and WAL
/// senders, the role's privileges, the publication and each table's replica
/// identity. Never fails itself; a check that cannot run is reported as failed.
pub async fn doctor(cfg: &PostgresConfig) -> Vec<DoctorCheck> {
    let mut out = Vec::new();
    let target = match conn::target(cfg) {
        Ok(t) => t,
        Err(e) => {
            out.push(check("configuration", false, e, None));
            return out;
        }
    };
    let sql = match Sql::connect(&target).await {
        Ok(s) => s,
        Err(e) => {
            out.push(failed("connect", e));
            return out;
        }
    };
    out.push(check(
        "connect",
        true,
        format!("connected to {}", target.desc),
        None,
    ));
    let role = quote_ident(&target.user);

    match setting(&sql, "wal_level").await {
        Ok(v) => out.push(check(
            "wal_level",
            v == "logical",
            format!("wal_level = {v}"),
            Some("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into()),
        )),
        Err(e) => out.push(failed("wal_level", e)),
    }
    let slot_exists = matches!(sql.slot_info(&cfg.slot).await, Ok(Some(_)));
    for (name, count_sql) in [
        (
            "max_replication_slots",
            "SELECT count(*) FROM pg_replication_slots",
        ),
        (
            "max_wal_senders",
            "SELECT count(*) FROM pg_stat_replication",
        ),
    ] {
        let r = async {
            let max: i64 = setting(&sql, name).await?.parse().unwrap_or(0);
            let used = count(&sql, count_sql).await?;
            Ok::<_, Fail>((max, used))
        }
        .await;
        match r {
            Ok((max, used)) => {
                let need = if name == "max_replication_slots" && slot_exists {
                    0
                } else {
                    1
                };
                out.push(check(
                    name,
                    used + need <= max,
                    format!("{used} of {max} in use"),
                    Some(format!(
                        "ALTER SYSTEM SET {name} = {}; then restart PostgreSQL",
                        (max + 4).max(10)
                    )),
                ))
            }
            Err(e) => out.push(failed(name, e)),
        }
    }
    match count(
        &sql,
        "SELECT count(*) FROM pg_roles WHERE rolname = current_user AND (rolreplication OR rolsuper)",
    )
    .await
    {
        Ok(n) => out.push(check(
            "replication privilege",
            n > 0,
            format!("role {} {} REPLICATION", target.user, if n > 0 { "has" } else { "lacks" }),
            Some(format!("ALTER ROLE {role} WITH REPLICATION;")),
        )),
        Err(e) => out.push(failed("replication privilege", e)),
    }
    // pg_hba.conf must allow a replication connection too.
    match PgReplicationConnection::connect(&target.repl).and_then(|mut c| c.identify_system()) {
        Ok(_) => out.push(check("replication connection", true, "IDENTIFY_SYSTEM answered", None)),
        Err(e) => out.push(check(
            "replication connection",
            false,
            e.to_string(),
            Some(format!(
                "allow it in pg_hba.conf, e.g. `host replication {} <agent address>/32 scram-sha-256`, then SELECT pg_reload_conf();",
                target.user
            )),
        )),
    }

    let version = sql.server_version().await.unwrap_or(0);
    let publ = sql.publication(&cfg.publication, version).await;
    let all: Vec<String> = cfg
        .tables
        .iter()
        .filter_map(|t| split_table(t).ok().map(|(s, n)| qualified(s, n)))
        .collect();
    let publ = match publ {
        Ok(p) => {
            out.push(check(
                "publication",
                p.is_some(),
                format!(
                    "publication {:?} {}",
                    cfg.publication,
                    if p.is_some() {
                        "exists"
                    } else {
                        "does not exist"
                    }
                ),
                Some(format!(
                    "CREATE PUBLICATION {} FOR TABLE {};",
                    quote_ident(&cfg.publication),
                    all.join(", ")
                )),
            ));
            p
        }
        Err(e) => {
            out.push(failed("publication", e));
            None
        }
    };
    if publ.is_some() {
        match sql.unpublished_actions(&cfg.publication).await {
            Ok(left) => out.push(check(
                "publication actions",
                left.is_empty(),
                if left.is_empty() {
                    "publishes insert, update, delete, truncate".to_string()
                } else {
                    format!("does not publish {}", left.join(", "))
                },
                Some(format!(
                    "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                    quote_ident(&cfg.publication)
                )),
            )),
            Err(e) => out.push(failed("publication actions", e)),
        }
    }
    for t in &cfg.tables {
        let Ok((schema, table)) = split_table(t) else {
            continue;
        };
        let q = qualified(schema, table);
        let info = match sql
            .table_info(schema, table, publ.as_ref().and_then(|p| p.get(t)))
            .await
        {
            Ok(Some(i)) => i,
            Ok(None) => {
                out.push(check(format!("table {t}"), false, "does not exist", None));
                continue;
            }
            Err(e) => {
                out.push(failed(&format!("table {t}"), e));
                continue;
            }
        };
        let sel = count(
            &sql,
            &format!(
                "SELECT count(*) WHERE has_table_privilege(current_user, {}, 'SELECT')",
                quote_literal(&q)
            ),
        )
        .await;
        match sel {
            Ok(n) => out.push(check(
                format!("select on {t}"),
                n > 0,
                format!(
                    "role {} {} SELECT",
                    target.user,
                    if n > 0 { "has" } else { "lacks" }
                ),
                Some(format!("GRANT SELECT ON {q} TO {role};")),
            )),
            Err(e) => out.push(failed(&format!("select on {t}"), e)),
        }
        if let Some(p) = &publ {
            let inside = p.contains_key(t);
            out.push(check(
                format!("publication contains {t}"),
                inside,
                if inside {
                    "published"
                } else {
                    "not in the publication"
                },
                Some(format!(
                    "ALTER PUBLICATION {} ADD TABLE {q};",
                    quote_ident(&cfg.publication)
                )),
            ));
        }
        let (ok, detail) = match info.replident {
            'f' => (true, "REPLICA IDENTITY FULL".to_string()),
            'i' => (true, "REPLICA IDENTITY USING INDEX".to_string()),
            'n' => (
                false,
                "REPLICA IDENTITY NOTHING: updates and deletes are refused while published"
                    .to_string(),
            ),
            _ if info.has_pk => (true, "primary key".to_string()),
            _ => (
                false,
                "no primary key: updates and deletes are refused while published".to_string(),
            ),
        };
        out.push(check(
            format!("replica identity of {t}"),
            ok,
            detail,
            Some(format!(
                "add a primary key, or: ALTER TABLE {q} REPLICA IDENTITY FULL;"
            )),
        ));
    }
    out
}

async fn setting(sql: &Sql, name: &str) -> Result<String, Fail> {
    let r = sql
        .client
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .map_err(|e| sql.fail(&format!("cannot read {name}"), &e))?;
    Ok(r.get(0))
}

async fn count(sql: &Sql, q: &str) -> Result<i64, Fail> {
    let r = sql
        .client
        .query_one(q, &[])
        .await
        .map_err(|e| sql.fail("query failed", &e))?;
    Ok(r.get(0))
}
