//! The SQL text of the mirror's statements, with the parameter types each is
//! prepared with: values travel as `text` (or `bytea`) and are cast in SQL to the
//! column's type, so the server's own input functions read them.

use std::collections::HashMap;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::schema::Table;
use super::{classify, MirrorError};

/// Prepared statements by SQL text, for the connection's life.
pub(super) type Statements = HashMap<String, Statement>;

/// The statement for `sql`: from the cache, or prepared now (and kept).
pub(super) async fn prepare(
    tx: &Client,
    stmts: &mut Statements,
    sql: String,
    types: &[Type],
) -> Result<Statement, MirrorError> {
    if let Some(s) = stmts.get(&sql) {
        return Ok(s.clone());
    }
    let s = tx
        .prepare_typed(&sql, types)
        .await
        .map_err(|e| classify("preparing a statement of the mirror", &e))?;
    stmts.insert(sql, s.clone());
    Ok(s)
}

/// `::type` to cast a text parameter to column `c`'s type (nothing for text and
/// bytea, which arrive as such).
fn cast(t: &Table, c: usize) -> String {
    let col = &t.columns[c];
    if col.bytea || col.ty == "text" {
        String::new()
    } else {
        format!("::{}", col.ty)
    }
}

fn array_type(t: &Table, c: usize) -> Type {
    if t.columns[c].bytea {
        Type::BYTEA_ARRAY
    } else {
        Type::TEXT_ARRAY
    }
}

fn scalar_type(t: &Table, c: usize) -> Type {
    if t.columns[c].bytea {
        Type::BYTEA
    } else {
        Type::TEXT
    }
}

/// `$1, $2, ...` and `c0, c1, ...` (or another prefix): the parameters and the
/// column aliases of an `unnest` over `n` arrays.
fn unnest_parts(n: usize, alias: &str) -> (String, String) {
    (
        (1..=n)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", "),
        (0..n)
            .map(|i| format!("{alias}{i}"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The (1-based) positions among the given keys of those the table has.
pub(super) fn probe_sql(t: &Table) -> (String, Vec<Type>) {
    let (params, aliases) = unnest_parts(t.key.len(), "k");
    let sql = format!(
        "SELECT u.ord FROM unnest({params}) WITH ORDINALITY AS u({aliases}, ord) JOIN {} AS t ON {}",
        t.qualified,
        t.key
            .iter()
            .enumerate()
            .map(|(i, &c)| format!("t.{} = u.k{i}{}", t.columns[c].quoted, cast(t, c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    );
    (sql, t.key.iter().map(|&c| array_type(t, c)).collect())
}

/// `UPDATE ... FROM unnest(...)` of the non-key columns among `cols`, matched by
/// key; `None` if every column is part of the key (nothing to update).
pub(super) fn update_sql(t: &Table, cols: &[usize]) -> Option<(String, Vec<Type>)> {
    let (params, aliases) = unnest_parts(cols.len(), "c");
    let set: Vec<String> = cols
        .iter()
        .enumerate()
        .filter(|(_, c)| !t.key.contains(c))
        .map(|(i, &c)| format!("{} = u.c{i}{}", t.columns[c].quoted, cast(t, c)))
        .collect();
    if set.is_empty() {
        return None;
    }
    let matches: Vec<String> = t
        .key
        .iter()
        .filter_map(|k| {
            let i = cols.iter().position(|c| c == k)?;
            Some(format!(
                "t.{} = u.c{i}{}",
                t.columns[*k].quoted,
                cast(t, *k)
            ))
        })
        .collect();
    let sql = format!(
        "UPDATE {} AS t SET {} FROM unnest({params}) AS u({aliases}) WHERE {}",
        t.qualified,
        set.join(", "),
        matches.join(" AND ")
    );
    Some((sql, cols.iter().map(|&c| array_type(t, c)).collect()))
}

/// `INSERT ... ON CONFLICT (key) DO UPDATE` of one row whose `unchanged` columns
/// keep their stored value (NULL if the row is new).
pub(super) fn upsert_one_sql(t: &Table, cols: &[usize], unchanged: &[bool]) -> (String, Vec<Type>) {
    let names: Vec<&str> = cols.iter().map(|&c| t.columns[c].quoted.as_str()).collect();
    let values: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("${}{}", i + 1, cast(t, c)))
        .collect();
    let set: Vec<String> = cols
        .iter()
        .enumerate()
        .filter(|(i, c)| !t.key.contains(c) && !unchanged[*i])
        .map(|(_, &c)| {
            let q = &t.columns[c].quoted;
            format!("{q} = EXCLUDED.{q}")
        })
        .collect();
    let key: Vec<&str> = t
        .key
        .iter()
        .map(|&c| t.columns[c].quoted.as_str())
        .collect();
    let action = if set.is_empty() {
        "NOTHING".to_string()
    } else {
        format!("UPDATE SET {}", set.join(", "))
    };
    let sql = format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO {action}",
        t.qualified,
        names.join(", "),
        values.join(", "),
        key.join(", ")
    );
    (sql, cols.iter().map(|&c| scalar_type(t, c)).collect())
}

/// `DELETE ... USING unnest(keys)`: the rows with any of the keys.
pub(super) fn delete_sql(t: &Table) -> (String, Vec<Type>) {
    let (params, aliases) = unnest_parts(t.key.len(), "k");
    let sql = format!(
        "DELETE FROM {} AS t USING unnest({params}) AS d({aliases}) WHERE {}",
        t.qualified,
        t.key
            .iter()
            .enumerate()
            .map(|(i, &c)| format!("t.{} = d.k{i}{}", t.columns[c].quoted, cast(t, c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    );
    (sql, t.key.iter().map(|&c| array_type(t, c)).collect())
}

/// Deletes ONE row whose columns `cols` hold the given values (NULL matching NULL).
pub(super) fn delete_one_sql(t: &Table, cols: &[usize]) -> (String, Vec<Type>) {
    let sql = format!(
        "DELETE FROM {q} WHERE ctid = (SELECT ctid FROM {q} WHERE {} LIMIT 1)",
        cols.iter()
            .enumerate()
            .map(|(i, &c)| format!(
                "{} IS NOT DISTINCT FROM ${}{}",
                t.columns[c].quoted,
                i + 1,
                cast(t, c)
            ))
            .collect::<Vec<_>>()
            .join(" AND "),
        q = t.qualified,
    );
    (sql, cols.iter().map(|&c| scalar_type(t, c)).collect())
}

#[cfg(test)]
mod tests {
    use super::super::schema::test_table;
    use super::*;

    #[test]
    fn statements_cast_text_and_update_only_non_key_columns() {
        let t = test_table(vec![0]);
        let (sql, types) = probe_sql(&t);
        assert_eq!(
            sql,
            r#"SELECT u.ord FROM unnest($1) WITH ORDINALITY AS u(k0, ord) JOIN "m"."t" AS t ON t."id" = u.k0::integer"#
        );
        assert_eq!(types, vec![Type::TEXT_ARRAY]);
        let (sql, types) = update_sql(&t, &[1, 0, 2]).unwrap();
        assert_eq!(
            sql,
            r#"UPDATE "m"."t" AS t SET "Note ""x""" = u.c0, "photo" = u.c2 FROM unnest($1, $2, $3) AS u(c0, c1, c2) WHERE t."id" = u.c1::integer"#
        );
        assert_eq!(
            types,
            vec![Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::BYTEA_ARRAY]
        );
        assert!(
            update_sql(&t, &[0]).is_none(),
            "only key columns: nothing to update"
        );
        let (sql, types) = upsert_one_sql(&t, &[0, 1, 2], &[false, false, true]);
        assert_eq!(
            sql,
            r#"INSERT INTO "m"."t" ("id", "Note ""x""", "photo") VALUES ($1::integer, $2, $3) ON CONFLICT ("id") DO UPDATE SET "Note ""x""" = EXCLUDED."Note ""x""""#
        );
        assert_eq!(types, vec![Type::TEXT, Type::TEXT, Type::BYTEA]);
        let (sql, _) = upsert_one_sql(&t, &[0, 1], &[false, true]);
        assert!(sql.ends_with("DO NOTHING"), "{sql}");
    }

    #[test]
    fn deletes_by_key_and_one_row_by_value() {
        let t = test_table(vec![0]);
        assert_eq!(
            delete_sql(&t).0,
            r#"DELETE FROM "m"."t" AS t USING unnest($1) AS d(k0) WHERE t."id" = d.k0::integer"#
        );
        assert_eq!(
            delete_one_sql(&test_table(vec![]), &[0, 1]).0,
            r#"DELETE FROM "m"."t" WHERE ctid = (SELECT ctid FROM "m"."t" WHERE "id" IS NOT DISTINCT FROM $1::integer AND "Note ""x""" IS NOT DISTINCT FROM $2 LIMIT 1)"#
        );
    }
}
