//! Row images of a rows event as [`Field`]s in table column order.

use ferry_protocol::messages::{field, Field};

use super::rows::Image;
use super::schema::{Col, Kind, Shape};
use super::values;

/// A column bitmap (which columns an image holds) as plain flags.
pub(crate) fn bools<I, B>(bits: Option<I>) -> Option<Vec<bool>>
where
    I: IntoIterator<Item = B>,
    B: std::ops::Deref<Target = bool>,
{
    bits.map(|b| b.into_iter().map(|x| *x).collect())
}

/// A row image: per table column, its value when the image holds it.
pub(crate) fn image(shape: &Shape, row: Image<'_>) -> Result<Vec<Option<field::Value>>, String> {
    if row.len() != shape.cols.len() {
        return Err(format!(
            "the row image has {} columns, the table {}",
            row.len(),
            shape.cols.len()
        ));
    }
    shape
        .cols
        .iter()
        .zip(row)
        .map(|(c, v)| v.map(|v| values::decode(c, v)).transpose())
        .collect()
}

/// `raw:COLUMN` for each character column of `fields` whose bytes are not text
/// in its character set and so travel as bytes (`values::decode`): a consumer
/// sees which values are raw, and nothing was replaced or dropped.
pub(crate) fn raw_flags<'a>(
    shape: &Shape,
    fields: impl IntoIterator<Item = &'a Field>,
) -> Vec<String> {
    let mut flags: Vec<String> = Vec::new();
    for f in fields {
        let Some(v) = &f.value else { continue };
        let raw = shape.cols.iter().any(|c| c.name == f.name && is_raw(c, v));
        let flag = format!("raw:{}", f.name);
        if raw && !flags.contains(&flag) {
            flags.push(flag);
        }
    }
    flags
}

/// Whether `v`, a value of `col`, is character data travelling as its bytes
/// (not text in the column's character set).
pub(crate) fn is_raw(col: &Col, v: &field::Value) -> bool {
    matches!(v, field::Value::Bytes(_)) && matches!(col.kind, Kind::Text(_))
}
