//! The ordinary SQL connection (tokio-postgres): catalog look-ups, slot state,
//! heartbeat, and the snapshot's COPY.

use std::collections::HashMap;

use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::conn::{classify_sql, Fail, Result, Target};
use super::position::parse_lsn;

pub(crate) use ferry_pg::sql::{qualified, quote_ident, quote_literal};

pub(crate) struct Sql {
    pub client: Client,
    target: Target,
    task: JoinHandle<()>,
}

impl Drop for Sql {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A column as the snapshot copies it and the stream describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ColInfo {
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
    /// `format_type(oid, typmod)`, e.g. `numeric(30,10)`.
    pub type_name: String,
    /// `format_type(oid, NULL)`, for casts of key literals.
    pub base_type: String,
    /// Flagged as replica identity the way pgoutput flags it.
    pub key: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct TableInfo {
    pub schema: String,
    pub table: String,
    /// `d`efault, `n`othing, `f`ull, `i`ndex.
    pub replident: char,
    pub reltuples: f64,
    pub has_pk: bool,
    /// Published columns in table order.
    pub cols: Vec<ColInfo>,
    /// Columns to page the snapshot by (primary key, else replica-identity index);
    /// empty: page by `ctid`.
    pub page_key: Vec<String>,
    /// The publication's row filter (PostgreSQL 15+), if any.
    pub row_filter: Option<String>,
}

pub(crate) fn replident_name(c: char) -> &'static str {
    match c {
        'n' => "nothing",
        'f' => "full",
        'i' => "index",
        _ => "default",
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<u64>,
    /// Bytes of WAL between the slot's restart LSN and the server's current LSN.
    pub retained: Option<u64>,
    pub wal_status: Option<String>,
}

/// What a publication says about one table.
#[derive(Debug, Clone, Default)]
pub(crate) struct PubTable {
    /// Published columns (PostgreSQL 15+ column lists); `None`: all.
    pub columns: Option<Vec<String>>,
    pub row_filter: Option<String>,
}

impl Sql {
    pub(crate) async fn connect(target: &Target) -> Result<Sql> {
        let fail =
            |e: tokio_postgres::Error| classify_sql(target, "cannot connect to PostgreSQL", &e);
        let (client, task) = ferry_pg::connect(&target.pg, target.tls.as_ref())
            .await
            .map_err(fail)?;
        Ok(Sql {
            client,
            target: target.clone(),
            task,
        })
    }

    pub(crate) fn fail(&self, what: &str, e: &tokio_postgres::Error) -> Fail {
        classify_sql(&self.target, what, e)
    }

    /// Rows of a simple (text-protocol) query: values exactly as the server's
    /// output functions render them.
    pub(crate) async fn text_rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let msgs = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| self.fail("query failed", &e))?;
        let mut out = Vec::new();
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
            }
        }
        Ok(out)
    }

    /// The data of a `COPY ... TO STDOUT` statement, as the server sends it.
    pub(crate) async fn copy_out(&self, sql: &str) -> Result<tokio_postgres::CopyOutStream> {
        self.client
            .copy_out(sql)
            .await
            .map_err(|e| self.fail("the snapshot's COPY failed", &e))
    }

    pub(crate) async fn execute(&self, sql: &str) -> Result<()> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.fail("statement failed", &e))
    }

    pub(crate) async fn server_version(&self) -> Result<i32> {
        let r = self
            .client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .map_err(|e| self.fail("cannot read the server version", &e))?;
        Ok(r.get(0))
    }

    pub(crate) async fn current_database(&self) -> Result<String> {
        let r = self
            .client
            .query_one("SELECT current_database()::text", &[])
            .await
            .map_err(|e| self.fail("cannot read the database name", &e))?;
        Ok(r.get(0))
    }

    pub(crate) async fn slot_info(&self, slot: &str) -> Result<Option<SlotInfo>> {
        let rows = self
            .client
            .query(
                "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text,
                        ((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                               ELSE pg_current_wal_lsn() END) - restart_lsn)::int8,
                        wal_status
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| self.fail("cannot read pg_replication_slots", &e))?;
        Ok(rows.first().map(|r| SlotInfo {
            plugin: r.get(0),
            database: r.get(1),
            active_pid: r.get(2),
            confirmed_flush: r.get::<_, Option<String>>(3).and_then(|s| parse_lsn(&s)),
            retained: r.get::<_, Option<i64>>(4).map(|v| v.max(0) as u64),
            wal_status: r.get(5),
        }))
    }

    /// Who holds a backend: `application_name` and client address.
    pub(crate) async fn backend(&self, pid: i32) -> Result<String> {
        let rows = self
            .client
            .query(
                "SELECT coalesce(application_name, ''), coalesce(client_addr::text, 'local'),
                        coalesce(usename::text, '')
                 FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .map_err(|e| self.fail("cannot read pg_stat_activity", &e))?;
        Ok(match rows.first() {
            Some(r) => format!(
                "pid {pid}, application {:?}, user {:?}, from {}",
                r.get::<_, String>(0),
                r.get::<_, String>(2),
                r.get::<_, String>(1)
            ),
            None => format!("pid {pid}"),
        })
    }

    /// `None`: no such publication. Otherwise its tables, `schema.table`.
    pub(crate) async fn publication(
        &self,
        name: &str,
        version: i32,
    ) -> Result<Option<HashMap<String, PubTable>>> {
        let exists = self
            .client
            .query("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
            .await
            .map_err(|e| self.fail("cannot read pg_publication", &e))?;
        if exists.is_empty() {
            return Ok(None);
        }
        let sql = if version >= 150000 {
            "SELECT schemaname::text, tablename::text, attnames::text[], rowfilter
             FROM pg_publication_tables WHERE pubname = $1"
        } else {
            "SELECT schemaname::text, tablename::text, NULL::text[], NULL::text
             FROM pg_publication_tables WHERE pubname = $1"
        };
        let rows = self
            .client
            .query(sql, &[&name])
            .await
            .map_err(|e| self.fail("cannot read pg_publication_tables", &e))?;
        let mut out = HashMap::new();
        for r in rows {
            let key = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
            out.insert(
                key,
                PubTable {
                    columns: r.get(2),
                    row_filter: r.get(3),
                },
            );
        }
        Ok(Some(out))
    }

    /// Which of insert, update, delete, truncate the publication leaves out.
    pub(crate) async fn unpublished_actions(&self, name: &str) -> Result<Vec<&'static str>> {
        let rows = self
            .client
            .query(
                "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
                &[&name],
            )
            .await
            .map_err(|e| self.fail("cannot read pg_publication", &e))?;
        let Some(r) = rows.first() else {
            return Ok(Vec::new());
        };
        Ok(["insert", "update", "delete", "truncate"]
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !r.get::<_, bool>(*i))
            .map(|(_, a)| a)
            .collect())
    }

    /// The table's published columns and keys; `None` when it does not exist.
    pub(crate) async fn table_info(
        &self,
        schema: &str,
        table: &str,
        publ: Option<&PubTable>,
    ) -> Result<Option<TableInfo>> {
        let rows = self
            .client
            .query(
                "SELECT c.oid, c.relreplident::text, c.reltuples::float8
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &table],
            )
            .await
            .map_err(|e| self.fail("cannot read pg_class", &e))?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let oid: u32 = r.get(0);
        let replident = r.get::<_, String>(1).chars().next().unwrap_or('d');
        let reltuples: f64 = r.get(2);
        let key_sql = |flag: &str| {
            format!(
                "SELECT a.attname::text FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = $1 AND i.{flag} ORDER BY k.ord"
            )
        };
        let names = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
            rows.iter().map(|r| r.get::<_, String>(0)).collect()
        };
        let pk = names(
            self.client
                .query(&key_sql("indisprimary"), &[&oid])
                .await
                .map_err(|e| self.fail("cannot read the primary key", &e))?,
        );
        let ri = names(
            self.client
                .query(&key_sql("indisreplident"), &[&oid])
                .await
                .map_err(|e| self.fail("cannot read the replica identity index", &e))?,
        );
        let crows = self
            .client
            .query(
                "SELECT attname::text, atttypid, atttypmod, format_type(atttypid, atttypmod),
                        format_type(atttypid, NULL)
                 FROM pg_attribute
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
                 ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(|e| self.fail("cannot read pg_attribute", &e))?;
        let identity: &[String] = match replident {
            'd' => &pk,
            'i' => &ri,
            _ => &[],
        };
        let mut cols = Vec::new();
        for r in crows {
            let name: String = r.get(0);
            if let Some(Some(published)) = publ.map(|p| &p.columns) {
                if !published.contains(&name) {
                    continue;
                }
            }
            cols.push(ColInfo {
                key: replident == 'f' || identity.contains(&name),
                name,
                type_oid: r.get(1),
                typmod: r.get(2),
                type_name: r.get(3),
                base_type: r.get(4),
            });
        }
        let page_key = if !pk.is_empty() { pk.clone() } else { ri };
        Ok(Some(TableInfo {
            schema: schema.to_string(),
            table: table.to_string(),
            replident,
            reltuples,
            has_pk: !pk.is_empty(),
            cols,
            page_key,
            row_filter: publ.and_then(|p| p.row_filter.clone()),
        }))
    }

    /// `format_type(oid, typmod)`.
    pub(crate) async fn type_name(&self, oid: u32, typmod: i32) -> Result<String> {
        let r = self
            .client
            .query_one("SELECT format_type($1, $2)", &[&oid, &typmod])
            .await
            .map_err(|e| self.fail("cannot look up a type name", &e))?;
        Ok(r.get::<_, Option<String>>(0)
            .unwrap_or_else(|| format!("oid {oid}")))
    }

    /// Writes a non-transactional logical message, so an idle database's slot
    /// sees something to advance over.
    pub(crate) async fn heartbeat(&self) -> Result<()> {
        self.client
            .execute(
                "SELECT pg_logical_emit_message(false, 'ferry-heartbeat', now()::text)",
                &[],
            )
            .await
            .map(|_| ())
            .map_err(|e| self.fail("cannot write the heartbeat message", &e))
    }
}
