//! A table's shape from a binlog table map's own metadata, for rows written
//! before a later `ALTER TABLE` (see the module doc of `mysql.rs`).

use std::collections::HashMap;

use mysql_async::binlog::events::TableMapEvent;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::conn::classify;
use super::schema::{Charset, Col, Kind, Shape};
use crate::SourceError;

/// A table's shape as a table map with `binlog_row_metadata = FULL` states it:
/// for rows written before a later `ALTER TABLE`, which `information_schema`
/// no longer describes. `collations` maps collation ids to character sets (the
/// server's `information_schema.COLLATIONS`). `Ok(None)`: the table map has no
/// column names (`binlog_row_metadata = MINIMAL`). Types are spelled without
/// lengths (`varchar`, not `varchar(32)`), and MariaDB's `JSON` reads as text.
pub(crate) fn from_table_map(
    tme: &TableMapEvent<'_>,
    collations: &HashMap<u16, String>,
) -> Result<Option<Shape>, SourceError> {
    use mysql_async::binlog::events::{OptionalMetaExtractor, OptionalMetadataField};
    use ColumnType::*;
    let name = format!("{}.{}", tme.database_name(), tme.table_name());
    let broken = |e: std::io::Error| {
        SourceError::Other(format!(
            "the table map of {name} has unreadable metadata: {e}"
        ))
    };
    let meta = OptionalMetaExtractor::new(tme.iter_optional_meta()).map_err(broken)?;
    let names: Vec<String> = meta
        .iter_column_name()
        .map(|n| n.map(|n| n.name().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(broken)?;
    let n = tme.columns_count() as usize;
    if names.len() != n {
        return Ok(None);
    }
    let keys: Vec<u64> = meta
        .iter_primary_key()
        .collect::<Result<_, _>>()
        .map_err(broken)?;
    let mut enums = Vec::new();
    let mut sets = Vec::new();
    for f in tme.iter_optional_meta() {
        match f.map_err(broken)? {
            OptionalMetadataField::EnumStrValue(e) => {
                for v in e.iter_values() {
                    let v = v.map_err(broken)?;
                    enums.push(
                        v.values()
                            .iter()
                            .map(|x| x.value().into_owned())
                            .collect::<Vec<_>>(),
                    );
                }
            }
            OptionalMetadataField::SetStrValue(s) => {
                for v in s.iter_values() {
                    let v = v.map_err(broken)?;
                    sets.push(
                        v.values()
                            .iter()
                            .map(|x| x.value().into_owned())
                            .collect::<Vec<_>>(),
                    );
                }
            }
            _ => {}
        }
    }
    let (mut enums, mut sets) = (enums.into_iter(), sets.into_iter());
    let mut signed = meta.iter_signedness();
    let mut charsets = meta.iter_charset();
    let mut es_charsets = meta.iter_enum_and_set_charset();
    let mut cols = Vec::with_capacity(n);
    for (i, col_name) in names.into_iter().enumerate() {
        let t = tme.get_column_type(i).ok().flatten().ok_or_else(|| {
            SourceError::Other(format!(
                "the table map of {name}: column {i} has an unknown type"
            ))
        })?;
        let m = tme.get_column_metadata(i).unwrap_or(&[]);
        let m0 = m.first().copied().unwrap_or(0);
        let unsigned = if t.is_numeric_type() {
            signed.next().unwrap_or(false)
        } else {
            false
        };
        let charset = if t.is_character_type() {
            let id = charsets.next().transpose().map_err(broken)?;
            id.and_then(|id| collations.get(&id).cloned())
        } else if t.is_enum_or_set_type() {
            let id = es_charsets.next().transpose().map_err(broken)?;
            id.and_then(|id| collations.get(&id).cloned())
        } else {
            None
        };
        let int = |bytes: u8, spelled: &str| {
            (
                Kind::Int { bytes, unsigned },
                spelled.to_string(),
                if unsigned {
                    format!("{spelled} unsigned")
                } else {
                    spelled.to_string()
                },
            )
        };
        let fsp = m0.min(6);
        let with_fsp = |s: &str| {
            if fsp > 0 {
                format!("{s}({fsp})")
            } else {
                s.to_string()
            }
        };
        let textual = |spelled: &str, bin: &str| -> Result<(Kind, String, String), SourceError> {
            match charset.as_deref() {
                None | Some("binary") => Ok((Kind::Binary, bin.to_string(), bin.to_string())),
                Some(cs) => {
                    let k = Charset::of(cs).map(Kind::Text).ok_or_else(|| {
                        SourceError::Fatal(format!(
                            "column {name}.{col_name} has character set {cs}, which the mysql source does not decode"
                        ))
                    })?;
                    Ok((k, spelled.to_string(), spelled.to_string()))
                }
            }
        };
        let (mut precision, mut scale) = (None, None);
        let (kind, data_type, column_type) = match t {
            MYSQL_TYPE_TINY => int(1, "tinyint"),
            MYSQL_TYPE_SHORT => int(2, "smallint"),
            MYSQL_TYPE_INT24 => int(3, "mediumint"),
            MYSQL_TYPE_LONG => int(4, "int"),
            MYSQL_TYPE_LONGLONG => int(8, "bigint"),
            MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL => {
                let (p, s) = (u32::from(m0), u32::from(m.get(1).copied().unwrap_or(0)));
                (precision, scale) = (Some(p), Some(s));
                (Kind::Decimal, "decimal".into(), format!("decimal({p},{s})"))
            }
            MYSQL_TYPE_FLOAT => (Kind::Float, "float".into(), "float".into()),
            MYSQL_TYPE_DOUBLE => (Kind::Double, "double".into(), "double".into()),
            MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING => textual("varchar", "varbinary")?,
            MYSQL_TYPE_STRING => textual("char", "binary")?,
            MYSQL_TYPE_BLOB
            | MYSQL_TYPE_TINY_BLOB
            | MYSQL_TYPE_MEDIUM_BLOB
            | MYSQL_TYPE_LONG_BLOB => textual("text", "blob")?,
            MYSQL_TYPE_JSON => (Kind::Json, "json".into(), "json".into()),
            MYSQL_TYPE_NEWDATE | MYSQL_TYPE_DATE => (Kind::Date, "date".into(), "date".into()),
            MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => {
                (Kind::Time(fsp), "time".into(), with_fsp("time"))
            }
            MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 => {
                (Kind::DateTime(fsp), "datetime".into(), with_fsp("datetime"))
            }
            MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => (
                Kind::Timestamp(fsp),
                "timestamp".into(),
                with_fsp("timestamp"),
            ),
            MYSQL_TYPE_YEAR => (Kind::Year, "year".into(), "year".into()),
            MYSQL_TYPE_BIT => (Kind::Bit, "bit".into(), "bit".into()),
            MYSQL_TYPE_ENUM => {
                let m = enums.next().unwrap_or_default();
                let spelled = format!("enum({})", quoted(&m));
                (Kind::Enum(m), "enum".into(), spelled)
            }
            MYSQL_TYPE_SET => {
                let m = sets.next().unwrap_or_default();
                let spelled = format!("set({})", quoted(&m));
                (Kind::Set(m), "set".into(), spelled)
            }
            _ => (Kind::OtherBytes, "geometry".into(), "geometry".into()),
        };
        cols.push(Col {
            key: keys.contains(&(i as u64)),
            name: col_name,
            data_type,
            column_type,
            charset: if matches!(kind, Kind::Text(_)) {
                charset
            } else {
                None
            },
            precision,
            scale,
            kind,
        });
    }
    // The table map lists the key's columns in the key's order.
    let pk = keys
        .iter()
        .filter_map(|&k| usize::try_from(k).ok().filter(|&k| k < cols.len()))
        .collect();
    Ok(Some(Shape {
        database: tme.database_name().into_owned(),
        table: tme.table_name().into_owned(),
        cols,
        pk,
    }))
}

fn quoted(members: &[String]) -> String {
    members
        .iter()
        .map(|m| format!("'{}'", m.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Collation id → character set name, from the server.
pub(crate) async fn collations(conn: &mut Conn) -> Result<HashMap<u16, String>, SourceError> {
    let rows: Vec<(u64, String)> = conn
        .query(
            "SELECT ID, CHARACTER_SET_NAME FROM information_schema.COLLATIONS WHERE ID IS NOT NULL",
        )
        .await
        .map_err(|e| classify("reading information_schema.COLLATIONS", e))?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, cs)| u16::try_from(id).ok().map(|id| (id, cs)))
        .collect())
}
