//! Row images of a rows event rendered, in table column order.

use ferry_protocol::messages::Field;
use ferry_protocol::record_buf::ValueRef;

use super::rows::Cell;
use super::schema::{Col, Kind, Shape};
use super::values::{self, Form};

/// A column bitmap (which columns an image holds) as plain flags.
pub(crate) fn bools<I, B>(bits: Option<I>) -> Option<Vec<bool>>
where
    I: IntoIterator<Item = B>,
    B: std::ops::Deref<Target = bool>,
{
    bits.map(|b| b.into_iter().map(|x| *x).collect())
}

/// Where a rendered value is.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// Not in the image.
    Absent,
    Null,
    Text(usize, usize),
    Bytes(usize, usize),
}

/// A row image rendered into buffers kept from row to row: no allocation
/// per value or per row once they have grown.
#[derive(Debug, Default)]
pub(crate) struct Rendered {
    text: String,
    bytes: Vec<u8>,
    slots: Vec<Slot>,
}

impl Rendered {
    /// Renders `row`, an image of a row of `shape` (per column, its value
    /// when the image holds it), in place of the last.
    pub(crate) fn render<'v>(
        &mut self,
        shape: &Shape,
        row: impl IntoIterator<Item = Option<Cell<'v>>>,
    ) -> Result<(), String> {
        self.text.clear();
        self.bytes.clear();
        self.slots.clear();
        let mut cols = shape.cols.iter();
        for v in row {
            let Some(c) = cols.next() else {
                return Err(format!(
                    "the row image has more columns than the table's {}",
                    shape.cols.len()
                ));
            };
            let Some(v) = v else {
                self.slots.push(Slot::Absent);
                continue;
            };
            let (t, b) = (self.text.len(), self.bytes.len());
            self.slots.push(
                match values::render_cell(c, v, &mut self.text, &mut self.bytes)? {
                    Form::Null => Slot::Null,
                    Form::Text => Slot::Text(t, self.text.len()),
                    Form::Bytes => Slot::Bytes(b, self.bytes.len()),
                },
            );
        }
        if self.slots.len() != shape.cols.len() {
            return Err(format!(
                "the row image has {} columns, the table {}",
                self.slots.len(),
                shape.cols.len()
            ));
        }
        Ok(())
    }

    /// Column `i`'s value, when the image holds it.
    pub(crate) fn get(&self, i: usize) -> Option<ValueRef<'_>> {
        match self.slots.get(i)? {
            Slot::Absent => None,
            Slot::Null => Some(ValueRef::Null(true)),
            Slot::Text(a, b) => self.text.get(*a..*b).map(ValueRef::Text),
            Slot::Bytes(a, b) => self.bytes.get(*a..*b).map(ValueRef::Bytes),
        }
    }
}

/// `raw:COLUMN` for each character column of `fields` whose bytes are not text
/// in its character set and so travel as bytes (`values::render`): a consumer
/// sees which values are raw, and nothing was replaced or dropped.
pub(crate) fn raw_flags<'a>(
    shape: &Shape,
    fields: impl IntoIterator<Item = &'a Field>,
) -> Vec<String> {
    let mut flags: Vec<String> = Vec::new();
    for f in fields {
        let Some(v) = &f.value else { continue };
        let raw = shape
            .cols
            .iter()
            .any(|c| c.name == f.name && is_raw(c, v.into()));
        let flag = format!("raw:{}", f.name);
        if raw && !flags.contains(&flag) {
            flags.push(flag);
        }
    }
    flags
}

/// Whether `v`, a value of `col`, is character data travelling as its bytes
/// (not text in the column's character set).
pub(crate) fn is_raw(col: &Col, v: ValueRef<'_>) -> bool {
    matches!(v, ValueRef::Bytes(_)) && matches!(col.kind, Kind::Text(_))
}
