//! A captured table's shape from `information_schema`, in neutral terms, and
//! whether a binlog table map still matches it.

use ferry_protocol::messages::{record, Record, Table, TableColumn};
use ferry_protocol::rows::NeutralType;
use mysql_async::binlog::events::TableMapEvent;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use sha2::{Digest, Sha256};

use super::conn::classify;
use crate::{now_unix_ms, SourceError};

/// The source kind written into records.
pub(crate) const MYSQL: &str = "mysql";

/// How a column's character data is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Charset {
    Utf8,
    Utf32,
    Other(&'static encoding_rs::Encoding),
}

impl Charset {
    /// The decoder of MySQL character set `name`; `None`: not known here.
    pub(crate) fn of(name: &str) -> Option<Charset> {
        use encoding_rs::*;
        Some(match name {
            "utf8" | "utf8mb3" | "utf8mb4" | "ascii" => Charset::Utf8,
            // gb18030 is a superset of gbk, which is one of gb2312.
            "gbk" | "gb2312" | "gb18030" => Charset::Other(GB18030),
            // MySQL's latin1 is windows-1252.
            "latin1" => Charset::Other(WINDOWS_1252),
            "ucs2" | "utf16" => Charset::Other(UTF_16BE),
            "utf16le" => Charset::Other(UTF_16LE),
            "utf32" => Charset::Utf32,
            "big5" => Charset::Other(BIG5),
            "sjis" | "cp932" => Charset::Other(SHIFT_JIS),
            "ujis" | "eucjpms" => Charset::Other(EUC_JP),
            "euckr" => Charset::Other(EUC_KR),
            "cp1250" => Charset::Other(WINDOWS_1250),
            "cp1251" => Charset::Other(WINDOWS_1251),
            "cp1256" => Charset::Other(WINDOWS_1256),
            "cp1257" => Charset::Other(WINDOWS_1257),
            "latin2" => Charset::Other(ISO_8859_2),
            "greek" => Charset::Other(ISO_8859_7),
            "hebrew" => Charset::Other(ISO_8859_8),
            "latin7" => Charset::Other(ISO_8859_13),
            "koi8r" => Charset::Other(KOI8_R),
            "koi8u" => Charset::Other(KOI8_U),
            "tis620" => Charset::Other(WINDOWS_874),
            _ => return None,
        })
    }
}

/// What a column's values are, for decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Integer of this many bytes.
    Int {
        bytes: u8,
        unsigned: bool,
    },
    Decimal,
    Float,
    Double,
    Text(Charset),
    Binary,
    Json,
    Date,
    /// `TIME(fsp)`.
    Time(u8),
    /// `DATETIME(fsp)`.
    DateTime(u8),
    /// `TIMESTAMP(fsp)`.
    Timestamp(u8),
    Year,
    Bit,
    Enum(Vec<String>),
    Set(Vec<String>),
    /// Spatial and other types: bytes.
    OtherBytes,
}

#[derive(Debug, Clone)]
pub(crate) struct Col {
    pub name: String,
    pub data_type: String,
    /// `COLUMN_TYPE`, MySQL's full spelling (`decimal(30,10)`, `int(10) unsigned`).
    pub column_type: String,
    pub charset: Option<String>,
    pub precision: Option<u32>,
    pub scale: Option<u32>,
    pub key: bool,
    pub kind: Kind,
}

#[cfg(test)]
impl Col {
    /// A column of `kind`, nothing else said about it (unit tests).
    pub(crate) fn named(name: &str, kind: Kind) -> Col {
        Col {
            name: name.into(),
            data_type: String::new(),
            column_type: String::new(),
            charset: None,
            precision: None,
            scale: None,
            key: false,
            kind,
        }
    }
}

/// A captured table's shape.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub database: String,
    pub table: String,
    pub cols: Vec<Col>,
    /// The primary key's columns (indexes into `cols`) in the key's order.
    pub pk: Vec<usize>,
}

impl Shape {
    pub(crate) fn name(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }

    pub(crate) fn has_key(&self) -> bool {
        self.cols.iter().any(|c| c.key)
    }

    /// Short digest of what a [`Table`] states.
    pub(crate) fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for c in &self.cols {
            h.update(format!(
                "{}\0{}\0{}\0{}\n",
                c.name,
                c.column_type,
                c.charset.as_deref().unwrap_or(""),
                c.key
            ));
        }
        hex::encode(&h.finalize()[..8])
    }

    pub(crate) fn neutral(c: &Col) -> NeutralType {
        match &c.kind {
            Kind::Int { bytes, unsigned } => match (bytes, unsigned) {
                (1, _) | (2, false) => NeutralType::Int16,
                (2, true) | (3, _) | (4, false) => NeutralType::Int32,
                (4, true) | (8, false) => NeutralType::Int64,
                _ => NeutralType::Decimal {
                    precision: Some(20),
                    scale: Some(0),
                },
            },
            Kind::Decimal => NeutralType::Decimal {
                precision: c.precision,
                scale: c.scale,
            },
            Kind::Float => NeutralType::Float32,
            Kind::Double => NeutralType::Float64,
            Kind::Text(_) => NeutralType::Text,
            Kind::Binary => NeutralType::Bytes,
            Kind::Json => NeutralType::Json,
            Kind::Date => NeutralType::Date,
            Kind::Time(_) => NeutralType::Time,
            Kind::DateTime(_) => NeutralType::Timestamp,
            Kind::Timestamp(_) => NeutralType::TimestampTz,
            Kind::Year => NeutralType::Int16,
            Kind::Bit | Kind::Enum(_) | Kind::Set(_) | Kind::OtherBytes => {
                NeutralType::Other(c.column_type.clone())
            }
        }
    }

    pub(crate) fn table_columns(&self) -> Vec<TableColumn> {
        self.cols
            .iter()
            .map(|c| Shape::neutral(c).to_column(&c.name, &c.column_type, c.key))
            .collect()
    }

    pub(crate) fn table_record(&self, position: &str) -> Record {
        Record {
            time_unix_ms: now_unix_ms(),
            position: format!("{position} schema {}", self.name()),
            body: Some(record::Body::Table(Table {
                schema: self.database.clone(),
                table: self.table.clone(),
                columns: self.table_columns(),
                identity: if self.has_key() {
                    "primary key"
                } else {
                    "full"
                }
                .to_string(),
                position: position.as_bytes().to_vec(),
                source: MYSQL.to_string(),
            })),
        }
    }

    /// Whether a table map's columns are the ones this shape describes (count,
    /// and each binlog type one the column's declared type is written as).
    pub(crate) fn matches(&self, tme: &TableMapEvent<'_>) -> bool {
        tme.columns_count() as usize == self.cols.len()
            && self.cols.iter().enumerate().all(|(i, c)| {
                tme.get_column_type(i)
                    .ok()
                    .flatten()
                    .is_some_and(|t| binlog_type_fits(&c.data_type, t))
            })
    }
}

/// Whether a column declared `data_type` may appear as binlog type `t`.
fn binlog_type_fits(data_type: &str, t: ColumnType) -> bool {
    use ColumnType::*;
    match data_type {
        "tinyint" | "bool" | "boolean" => t == MYSQL_TYPE_TINY,
        "smallint" => t == MYSQL_TYPE_SHORT,
        "mediumint" => t == MYSQL_TYPE_INT24,
        "int" | "integer" => t == MYSQL_TYPE_LONG,
        "bigint" => t == MYSQL_TYPE_LONGLONG,
        "decimal" | "numeric" => matches!(t, MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL),
        "float" => t == MYSQL_TYPE_FLOAT,
        "double" | "real" => t == MYSQL_TYPE_DOUBLE,
        "char" | "binary" => matches!(t, MYSQL_TYPE_STRING | MYSQL_TYPE_VAR_STRING),
        "varchar" | "varbinary" => matches!(t, MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING),
        "tinytext" | "text" | "mediumtext" | "longtext" | "tinyblob" | "blob" | "mediumblob"
        | "longblob" => matches!(
            t,
            MYSQL_TYPE_BLOB | MYSQL_TYPE_TINY_BLOB | MYSQL_TYPE_MEDIUM_BLOB | MYSQL_TYPE_LONG_BLOB
        ),
        "json" => matches!(t, MYSQL_TYPE_JSON | MYSQL_TYPE_BLOB),
        "date" => matches!(t, MYSQL_TYPE_NEWDATE | MYSQL_TYPE_DATE),
        "time" => matches!(t, MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2),
        "datetime" => matches!(t, MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2),
        "timestamp" => matches!(t, MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2),
        "year" => t == MYSQL_TYPE_YEAR,
        "bit" => t == MYSQL_TYPE_BIT,
        "enum" => matches!(t, MYSQL_TYPE_ENUM | MYSQL_TYPE_STRING),
        "set" => matches!(t, MYSQL_TYPE_SET | MYSQL_TYPE_STRING),
        // Spatial types and whatever a newer server adds: a blob on the wire.
        _ => matches!(t, MYSQL_TYPE_GEOMETRY | MYSQL_TYPE_BLOB),
    }
}

/// The members of `enum('a','b')` / `set('a','b')`, unquoted.
fn members(column_type: &str) -> Vec<String> {
    let inner = column_type
        .split_once('(')
        .map(|(_, r)| r.strip_suffix(')').unwrap_or(r))
        .unwrap_or("");
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = inner.chars().peekable();
    let mut quoted = false;
    while let Some(ch) = chars.next() {
        match (quoted, ch) {
            (false, '\'') => quoted = true,
            (true, '\'') if chars.peek() == Some(&'\'') => {
                chars.next();
                cur.push('\'');
            }
            (true, '\'') => {
                quoted = false;
                out.push(std::mem::take(&mut cur));
            }
            (true, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (true, c) => cur.push(c),
            (false, _) => {}
        }
    }
    out
}

fn kind_of(
    table: &str,
    name: &str,
    data_type: &str,
    column_type: &str,
    charset: Option<&str>,
    fsp: u8,
    json: bool,
) -> Result<Kind, SourceError> {
    let unsigned = column_type.contains("unsigned");
    let text = |charset: Option<&str>| -> Result<Kind, SourceError> {
        match charset {
            None | Some("binary") => Ok(Kind::Binary),
            Some(cs) => Charset::of(cs).map(Kind::Text).ok_or_else(|| {
                SourceError::Fatal(format!(
                    "column {table}.{name} has character set {cs}, which the mysql source does not decode; \
                     convert the column (ALTER TABLE ... CONVERT TO CHARACTER SET utf8mb4) or leave the table out of source.tables"
                ))
            }),
        }
    };
    Ok(match data_type {
        "tinyint" => Kind::Int { bytes: 1, unsigned },
        "smallint" => Kind::Int { bytes: 2, unsigned },
        "mediumint" => Kind::Int { bytes: 3, unsigned },
        "int" | "integer" => Kind::Int { bytes: 4, unsigned },
        "bigint" => Kind::Int { bytes: 8, unsigned },
        "decimal" | "numeric" => Kind::Decimal,
        "float" => Kind::Float,
        "double" | "real" => Kind::Double,
        "json" => Kind::Json,
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" if json => Kind::Json,
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => text(charset)?,
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => Kind::Binary,
        "date" => Kind::Date,
        "time" => Kind::Time(fsp),
        "datetime" => Kind::DateTime(fsp),
        "timestamp" => Kind::Timestamp(fsp),
        "year" => Kind::Year,
        "bit" => Kind::Bit,
        "enum" => Kind::Enum(members(column_type)),
        "set" => Kind::Set(members(column_type)),
        _ => Kind::OtherBytes,
    })
}

type ColumnRow = (
    String,
    String,
    String,
    Option<String>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

/// Reads a table's shape; `Ok(None)` when the table does not exist.
pub(crate) async fn load(
    conn: &mut Conn,
    database: &str,
    table: &str,
) -> Result<Option<Shape>, SourceError> {
    let name = format!("{database}.{table}");
    let what = format!("reading the columns of {name} from information_schema");
    let rows: Vec<ColumnRow> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME, \
                    NUMERIC_PRECISION, NUMERIC_SCALE, DATETIME_PRECISION \
             FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        .await
        .map_err(|e| classify(&what, e))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let keys: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
             ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        .await
        .map_err(|e| classify(&what, e))?;
    // MariaDB's JSON is LONGTEXT with a json_valid() check; MySQL has none of
    // this table (ER_UNKNOWN_TABLE) and a real JSON type.
    let checks: Vec<String> = conn
        .exec(
            "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?",
            (database, table),
        )
        .await
        .unwrap_or_default();
    let mut cols = Vec::with_capacity(rows.len());
    for (name, data_type, column_type, charset, precision, scale, dt_precision) in rows {
        let data_type = data_type.to_ascii_lowercase();
        let json = checks.iter().any(|c| {
            let c = c.to_ascii_lowercase().replace(' ', "");
            c == format!("json_valid(`{}`)", name.to_ascii_lowercase())
        });
        let fsp = dt_precision.unwrap_or(0).min(6) as u8;
        let kind = kind_of(
            &format!("{database}.{table}"),
            &name,
            &data_type,
            &column_type,
            charset.as_deref(),
            fsp,
            json,
        )?;
        let decimal = kind == Kind::Decimal;
        cols.push(Col {
            key: keys.contains(&name),
            name,
            data_type,
            column_type,
            charset,
            precision: if decimal {
                precision.map(|p| p as u32)
            } else {
                None
            },
            scale: if decimal {
                scale.map(|s| s as u32)
            } else {
                None
            },
            kind,
        });
    }
    let pk = keys
        .iter()
        .filter_map(|k| cols.iter().position(|c: &Col| &c.name == k))
        .collect();
    Ok(Some(Shape {
        database: database.to_string(),
        table: table.to_string(),
        cols,
        pk,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn enum_and_set_members_unquote() {
        assert_eq!(members("enum('a','b c','it''s')"), ["a", "b c", "it's"]);
        assert_eq!(members("set('x')"), ["x"]);
        assert!(members("enum()").is_empty());
    }

    #[test]
    fn charsets_map_to_decoders() {
        assert_eq!(
            Charset::of("gbk"),
            Some(Charset::Other(encoding_rs::GB18030))
        );
        assert_eq!(Charset::of("utf8mb4"), Some(Charset::Utf8));
        assert_eq!(
            Charset::of("latin1"),
            Some(Charset::Other(encoding_rs::WINDOWS_1252))
        );
        assert_eq!(Charset::of("armscii8"), None);
        let e = kind_of(
            "d.t",
            "c",
            "varchar",
            "varchar(3)",
            Some("armscii8"),
            0,
            false,
        )
        .unwrap_err();
        assert!(e.is_fatal() && e.to_string().contains("d.t.c"), "{e}");
    }
}
