//! Mirror tables as the catalog describes them, their creation and evolution
//! from shapes, and who owns them.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ferry_protocol::rows::{NeutralType, TableShape};
use futures_util::future::try_join;
use tokio_postgres::Client;

use super::{classify, MirrorError, State};
use crate::sql::{qualified, quote_ident};

/// The stream a mirror table belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Owner {
    pub agent: String,
    pub stream: String,
}

/// A column of a mirror table.
#[derive(Clone, Debug)]
pub(super) struct Column {
    pub name: String,
    /// `"name"`.
    pub quoted: String,
    /// `format_type` of the column, e.g. `numeric(30,10)`: what values are cast to.
    pub ty: String,
    /// Values travel as bytes (`bytea`), not text.
    pub bytea: bool,
}

/// A mirror table, as the catalog describes it.
#[derive(Debug)]
pub(super) struct Table {
    pub name: String,
    /// `"schema"."table"`, for SQL.
    pub qualified: String,
    /// `schema.table`, for messages.
    pub display: String,
    pub columns: Vec<Column>,
    pub index: HashMap<String, usize>,
    /// The primary key's columns (indexes into `columns`), in key order; empty:
    /// the table has no primary key.
    pub key: Vec<usize>,
    /// The last rows written found none of their keys in the table: the next
    /// ones are tried as new first (see `runs.rs`).
    pub appending: AtomicBool,
}

impl Table {
    /// An error for a row the table cannot take.
    pub fn bad_data(&self, what: &str) -> MirrorError {
        MirrorError::Fatal(format!(
            "bad data for the mirror table {}: {what}",
            self.display
        ))
    }
}

/// A table `"m"."t"` of `id integer`, `Note "x" text`, `photo bytea`, with the
/// primary key `key`.
#[cfg(test)]
pub(super) fn test_table(key: Vec<usize>) -> Table {
    let col = |name: &str, ty: &str| Column {
        name: name.into(),
        quoted: quote_ident(name),
        ty: ty.into(),
        bytea: ty == "bytea",
    };
    let columns = vec![
        col("id", "integer"),
        col("Note \"x\"", "text"),
        col("photo", "bytea"),
    ];
    Table {
        name: "t".into(),
        qualified: r#""m"."t""#.into(),
        display: "m.t".into(),
        index: columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect(),
        columns,
        key,
        appending: Default::default(),
    }
}

/// Who delivers into a mirror table: the stream and its source namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Claim {
    pub owner: Owner,
    pub namespace: String,
}

impl State {
    /// The mirror table rows of `namespace.name` go to. With `required`, a missing
    /// table is an error (rows for a table no shape created); without, `None`.
    pub(super) async fn table(
        &mut self,
        tx: &Client,
        owner: &Owner,
        namespace: &str,
        name: &str,
        required: bool,
    ) -> Result<Option<Arc<Table>>, MirrorError> {
        // Called for every row: the cached case allocates nothing.
        if let Some((held, t)) = self.tables.get(name) {
            if held.owner != *owner || held.namespace != namespace {
                let claim = Claim {
                    owner: owner.clone(),
                    namespace: namespace.to_string(),
                };
                return Err(self.conflict(name, held, &claim));
            }
            return Ok(Some(t.clone()));
        }
        let claim = Claim {
            owner: owner.clone(),
            namespace: namespace.to_string(),
        };
        let Some(t) = read_table(tx, &self.cfg.schema, name).await? else {
            if required {
                return Err(MirrorError::Fatal(format!(
                    "rows of {namespace}.{name} from {}/{} arrived, but the mirror table {}.{name} does not exist and no shape of the table came before them. Resume the delivery from the stream's first record (or one carrying the table's shape), or create the table by hand",
                    owner.agent, owner.stream, self.cfg.schema
                )));
            }
            return Ok(None);
        };
        self.claim(tx, &claim, name).await?;
        let t = Arc::new(t);
        self.tables.insert(name.to_string(), (claim, t.clone()));
        Ok(Some(t))
    }

    /// Brings the mirror table in line with a shape: creates it, adds columns,
    /// widens types; refuses what would lose data.
    pub(super) async fn shape(
        &mut self,
        tx: &Client,
        owner: &Owner,
        shape: &TableShape,
    ) -> Result<(), MirrorError> {
        let name = &shape.table;
        let claim = Claim {
            owner: owner.clone(),
            namespace: shape.namespace.clone(),
        };
        match self.tables.get(name) {
            Some((held, _)) if *held != claim => return Err(self.conflict(name, held, &claim)),
            Some(_) => {}
            None => self.claim(tx, &claim, name).await?,
        }
        let schema = &self.cfg.schema;
        let q = qualified(schema, name);
        let label = format!("{schema}.{name}");
        let keys: Vec<&str> = shape
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.as_str())
            .collect();
        let ddl = match read_table(tx, schema, name).await? {
            None => {
                let mut parts: Vec<String> = shape
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", quote_ident(&c.name), pg_type(&c.ty)))
                    .collect();
                if !keys.is_empty() {
                    parts.push(format!("PRIMARY KEY ({})", idents(&keys)));
                }
                tracing::info!(table = %label, "creating the mirror table");
                Some(format!("CREATE TABLE {q} ({})", parts.join(", ")))
            }
            Some(current) => {
                evolve(&current, shape, &keys)?.map(|alter| format!("ALTER TABLE {q} {alter}"))
            }
        };
        if let Some(ddl) = ddl {
            tx.batch_execute(&ddl)
                .await
                .map_err(|e| classify(&format!("changing the mirror table {label}"), &e))?;
        }
        let Some(t) = read_table(tx, schema, name).await? else {
            return Err(MirrorError::Fatal(format!(
                "the mirror table {label} is missing right after it was created"
            )));
        };
        self.tables.insert(name.clone(), (claim, Arc::new(t)));
        Ok(())
    }

    /// Records `claim` as the owner of mirror table `name` unless someone else
    /// owns it (in this delivery or another one mirroring into the same schema).
    async fn claim(&self, tx: &Client, claim: &Claim, name: &str) -> Result<(), MirrorError> {
        let insert = format!(
            "INSERT INTO {} (delivery, schema, table_name, agent, stream, source_namespace)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            self.owners
        );
        let select = format!(
            "SELECT delivery, agent, stream, source_namespace FROM {}
             WHERE schema = $1 AND table_name = $2 ORDER BY claimed_at",
            self.owners
        );
        let cfg = &self.cfg;
        let (_, rows) = try_join(
            tx.execute(
                &insert,
                &[
                    &cfg.delivery,
                    &cfg.schema,
                    &name,
                    &claim.owner.agent,
                    &claim.owner.stream,
                    &claim.namespace,
                ],
            ),
            tx.query(&select, &[&cfg.schema, &name]),
        )
        .await
        .map_err(|e| classify("claiming a mirror table", &e))?;
        for r in rows {
            let delivery: String = r.get(0);
            let held = Claim {
                owner: Owner {
                    agent: r.get(1),
                    stream: r.get(2),
                },
                namespace: r.get(3),
            };
            if delivery != cfg.delivery {
                return Err(MirrorError::Fatal(format!(
                    "the mirror table {}.{name} belongs to delivery {delivery:?} (stream {}/{}); delivery {:?} cannot mirror {}/{} into it: give the deliveries different schemas",
                    cfg.schema, held.owner.agent, held.owner.stream, cfg.delivery, claim.owner.agent, claim.owner.stream
                )));
            }
            if held != *claim {
                return Err(self.conflict(name, &held, claim));
            }
        }
        Ok(())
    }

    fn conflict(&self, name: &str, held: &Claim, other: &Claim) -> MirrorError {
        MirrorError::Fatal(format!(
            "the mirror table {}.{name} is owned by stream {}/{} (source table {}.{name}); stream {}/{} also delivers {}.{name}, and one table cannot mirror both. Deliver one of them into another schema (another delivery)",
            self.cfg.schema,
            held.owner.agent,
            held.owner.stream,
            held.namespace,
            other.owner.agent,
            other.owner.stream,
            other.namespace
        ))
    }
}

/// The `ALTER TABLE` actions that bring `current` to `shape`, if any.
fn evolve(
    current: &Table,
    shape: &TableShape,
    keys: &[&str],
) -> Result<Option<String>, MirrorError> {
    let mut actions = Vec::new();
    for c in &shape.columns {
        let wanted = pg_type(&c.ty);
        let Some(&i) = current.index.get(&c.name) else {
            tracing::info!(table = %current.display, column = %c.name, ty = %wanted, "adding a column to the mirror table");
            actions.push(format!("ADD COLUMN {} {wanted}", quote_ident(&c.name)));
            continue;
        };
        let have = &current.columns[i].ty;
        match change(have, &wanted) {
            Change::Same => {}
            Change::Widen => {
                tracing::info!(table = %current.display, column = %c.name, from = %have, to = %wanted, "widening a column of the mirror table");
                let col = quote_ident(&c.name);
                actions.push(format!("ALTER COLUMN {col} TYPE {wanted} USING {col}::{wanted}"));
            }
            Change::Incompatible => {
                return Err(MirrorError::Fatal(format!(
                    "the mirror table {}: column {:?} is {have}, and the source now sends it as {wanted}; converting it could lose or reject data. Fix the mirror by hand (ALTER TABLE ... ALTER COLUMN ... TYPE, or rename the table so the mirror creates it anew), then resume the delivery",
                    current.display, c.name
                )))
            }
        }
    }
    for col in &current.columns {
        if !shape.columns.iter().any(|c| c.name == col.name) {
            tracing::warn!(table = %current.display, column = %col.name, "the source no longer has this column; the mirror keeps it and new rows leave it NULL");
        }
    }
    let have_keys: Vec<&str> = current
        .key
        .iter()
        .map(|&i| current.columns[i].name.as_str())
        .collect();
    if !keys.is_empty() {
        if have_keys.is_empty() {
            actions.push(format!("ADD PRIMARY KEY ({})", idents(keys)));
        } else if !same_set(&have_keys, keys) {
            return Err(MirrorError::Fatal(format!(
                "the mirror table {} has the primary key ({}) and the source's key is now ({}); rows would be matched by the wrong columns. Change the mirror's primary key by hand, then resume the delivery",
                current.display,
                have_keys.join(", "),
                keys.join(", ")
            )));
        }
    }
    // A shape without key (REPLICA IDENTITY FULL) keeps the mirror's primary key:
    // its rows still carry the key columns, and updates carry the whole old row.
    Ok((!actions.is_empty()).then(|| actions.join(", ")))
}

fn same_set(a: &[&str], b: &[&str]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

fn idents(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The mirror's column type for a neutral type, spelled as `format_type` spells
/// it (so it compares with the catalog as text).
pub(super) fn pg_type(t: &NeutralType) -> String {
    match t {
        NeutralType::Bool => "boolean".into(),
        NeutralType::Int16 => "smallint".into(),
        NeutralType::Int32 => "integer".into(),
        NeutralType::Int64 => "bigint".into(),
        NeutralType::Float32 => "real".into(),
        NeutralType::Float64 => "double precision".into(),
        NeutralType::Decimal { precision, scale } => match (precision, scale) {
            (Some(p), s) if (1..=1000).contains(p) && s.unwrap_or(0) <= *p => {
                format!("numeric({p},{})", s.unwrap_or(0))
            }
            _ => "numeric".into(),
        },
        NeutralType::Text | NeutralType::Other(_) => "text".into(),
        NeutralType::Bytes => "bytea".into(),
        NeutralType::Date => "date".into(),
        NeutralType::Time => "time without time zone".into(),
        NeutralType::Timestamp => "timestamp without time zone".into(),
        NeutralType::TimestampTz => "timestamp with time zone".into(),
        NeutralType::Interval => "interval".into(),
        NeutralType::Uuid => "uuid".into(),
        NeutralType::Json => "jsonb".into(),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    Same,
    /// Every value of the current type converts to the wanted one exactly.
    Widen,
    Incompatible,
}

/// Whether a mirror column of type `have` can follow a source column now of type
/// `wanted` (both as `format_type` spells them).
pub(super) fn change(have: &str, wanted: &str) -> Change {
    if have == wanted {
        return Change::Same;
    }
    // Every type has a text output, and the source's values are that text.
    if wanted == "text" {
        return Change::Widen;
    }
    // Decimal digits before the point, and after it; None: unlimited.
    let digits = |t: &str| -> Option<(Option<u32>, u32)> {
        match t {
            "smallint" => Some((Some(5), 0)),
            "integer" => Some((Some(10), 0)),
            "bigint" => Some((Some(19), 0)),
            "numeric" => Some((None, u32::MAX)),
            _ => {
                let (p, s) = t
                    .strip_prefix("numeric(")?
                    .strip_suffix(')')?
                    .split_once(',')?;
                let (p, s): (u32, u32) = (p.trim().parse().ok()?, s.trim().parse().ok()?);
                Some((Some(p.checked_sub(s)?), s))
            }
        }
    };
    let integer = |t: &str| matches!(t, "smallint" | "integer" | "bigint");
    let widen = match (digits(have), digits(wanted)) {
        // An integer type only grows into a larger integer type (or numeric):
        // numeric values would not fit an integer column.
        (Some(_), Some(_)) if integer(wanted) && !integer(have) => false,
        (Some((hi, hs)), Some((wi, ws))) => {
            let int_ok = match (hi, wi) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(h), Some(w)) => w >= h,
            };
            int_ok && ws >= hs
        }
        _ => have == "real" && wanted == "double precision",
    };
    if widen {
        Change::Widen
    } else {
        Change::Incompatible
    }
}

/// The mirror table `schema.name` as the catalog describes it; `None` if missing.
pub(super) async fn read_table(
    tx: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<Table>, MirrorError> {
    let label = format!("{schema}.{name}");
    let fail = |e: tokio_postgres::Error| classify(&format!("reading the catalog of {label}"), &e);
    let Some(rel) = tx
        .query_opt(
            "SELECT c.oid, c.relkind::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await
        .map_err(fail)?
    else {
        return Ok(None);
    };
    let oid: u32 = rel.get(0);
    let kind: String = rel.get(1);
    if kind != "r" && kind != "p" {
        return Err(MirrorError::Fatal(format!(
            "{label} exists and is not a table (relkind {kind}); the mirror cannot write into it: rename it or mirror into another schema"
        )));
    }
    let rows = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    a.atttypid = 'bytea'::regtype,
                    coalesce((SELECT k.ord FROM unnest(i.indkey::int2[]) WITH ORDINALITY
                              AS k(attnum, ord) WHERE k.attnum = a.attnum), 0)::int4
             FROM pg_attribute a
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(fail)?;
    let mut columns = Vec::with_capacity(rows.len());
    let mut key = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let name: String = r.get(0);
        let pos: i32 = r.get(3);
        if pos > 0 {
            key.push((pos, i));
        }
        columns.push(Column {
            quoted: quote_ident(&name),
            name,
            ty: r.get(1),
            bytea: r.get(2),
        });
    }
    key.sort_unstable();
    Ok(Some(Table {
        name: name.to_string(),
        qualified: qualified(schema, name),
        display: label,
        index: columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect(),
        columns,
        key: key.into_iter().map(|(_, i)| i).collect(),
        appending: AtomicBool::new(true),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neutral_types_map_to_catalog_spellings() {
        let dec = |p, s| NeutralType::Decimal {
            precision: p,
            scale: s,
        };
        assert_eq!(pg_type(&dec(Some(30), Some(10))), "numeric(30,10)");
        assert_eq!(pg_type(&dec(Some(12), None)), "numeric(12,0)");
        assert_eq!(pg_type(&dec(None, None)), "numeric");
        assert_eq!(pg_type(&dec(Some(2), Some(5))), "numeric");
        assert_eq!(pg_type(&dec(Some(1001), Some(0))), "numeric");
        assert_eq!(pg_type(&NeutralType::Json), "jsonb");
        assert_eq!(pg_type(&NeutralType::Other("point".into())), "text");
        assert_eq!(
            pg_type(&NeutralType::TimestampTz),
            "timestamp with time zone"
        );
        assert_eq!(pg_type(&NeutralType::Bytes), "bytea");
    }

    #[test]
    fn only_lossless_type_changes_are_followed() {
        use Change::*;
        for (have, wanted, expect) in [
            ("integer", "integer", Same),
            ("smallint", "integer", Widen),
            ("integer", "bigint", Widen),
            ("bigint", "integer", Incompatible),
            ("integer", "numeric", Widen),
            ("integer", "numeric(12,2)", Widen),
            ("bigint", "numeric(12,2)", Incompatible),
            ("numeric(10,2)", "numeric(12,2)", Widen),
            ("numeric(10,2)", "numeric(12,4)", Widen),
            ("numeric(10,2)", "numeric(10,4)", Incompatible),
            ("numeric(10,2)", "numeric", Widen),
            ("numeric", "numeric(30,10)", Incompatible),
            ("numeric(5,0)", "bigint", Incompatible),
            ("real", "double precision", Widen),
            ("double precision", "real", Incompatible),
            ("integer", "text", Widen),
            ("character varying(20)", "text", Widen),
            ("text", "integer", Incompatible),
            ("integer", "timestamp with time zone", Incompatible),
            (
                "timestamp without time zone",
                "timestamp with time zone",
                Incompatible,
            ),
        ] {
            assert_eq!(change(have, wanted), expect, "{have} -> {wanted}");
        }
    }
}
