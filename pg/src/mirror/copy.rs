//! `COPY ... FROM STDIN` into a mirror table, in COPY's text format, sent in
//! pieces so the server parses one while the next is encoded.

use std::io::Cursor;
use std::pin::Pin;

use ferry_protocol::rows::Value;
use futures_util::future::try_join;
use futures_util::SinkExt;
use tokio_postgres::{Client, CopyInSink};

use super::schema::Table;
use super::statements::{prepare, Statements};
use super::values::copy_field;
use super::{classify, MirrorError};

/// Bytes per COPY data message.
pub(super) const COPY_PIECE: usize = 64 << 10;

/// Why a `COPY` failed: the server refused it (a key the table has, say), or a
/// value could not be written.
pub(super) enum CopyError {
    Sql(tokio_postgres::Error),
    Mirror(MirrorError),
}

impl CopyError {
    pub(super) fn into_mirror(self, t: &Table) -> MirrorError {
        match self {
            CopyError::Sql(e) => classify(&format!("copying rows into {}", t.display), &e),
            CopyError::Mirror(e) => e,
        }
    }

    /// For a `COPY` whose table is no longer known.
    pub(super) fn into_mirror_unnamed(self) -> MirrorError {
        match self {
            CopyError::Sql(e) => classify("copying rows", &e),
            CopyError::Mirror(e) => e,
        }
    }

    /// The server refused a row because its key is in the table already.
    pub(super) fn is_known_key(&self) -> bool {
        matches!(self, CopyError::Sql(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
    }
}

/// An open `COPY` of the columns `cols` into one table. Until it is finished
/// nothing else can be sent on the connection.
pub(super) struct CopyIn {
    /// The table's name.
    pub table: String,
    cols: Vec<usize>,
    sink: Pin<Box<CopyInSink<Cursor<Vec<u8>>>>>,
    buf: Vec<u8>,
}

impl CopyIn {
    /// Starts the `COPY`; with `savepoint`, after setting the savepoint
    /// `ferry_copy` (in the same round trip).
    pub(super) async fn open(
        tx: &Client,
        stmts: &mut Statements,
        t: &Table,
        cols: &[usize],
        savepoint: bool,
    ) -> Result<CopyIn, CopyError> {
        let sql = format!(
            "COPY {} ({}) FROM STDIN",
            t.qualified,
            cols.iter()
                .map(|&c| t.columns[c].quoted.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let stmt = prepare(tx, stmts, sql, &[])
            .await
            .map_err(CopyError::Mirror)?;
        let sink = if savepoint {
            try_join(
                tx.batch_execute("SAVEPOINT ferry_copy"),
                tx.copy_in::<_, Cursor<Vec<u8>>>(&stmt),
            )
            .await
            .map_err(CopyError::Sql)?
            .1
        } else {
            tx.copy_in::<_, Cursor<Vec<u8>>>(&stmt)
                .await
                .map_err(CopyError::Sql)?
        };
        Ok(CopyIn {
            table: t.name.clone(),
            cols: cols.to_vec(),
            sink: Box::pin(sink),
            buf: Vec::with_capacity(COPY_PIECE),
        })
    }

    /// Adds a row (values of the columns given to `open`, in that order).
    pub(super) fn row<'v>(
        &mut self,
        t: &Table,
        values: impl Iterator<Item = &'v Value>,
    ) -> Result<(), MirrorError> {
        for (i, (&c, v)) in self.cols.iter().zip(values).enumerate() {
            if i > 0 {
                self.buf.push(b'\t');
            }
            copy_field(&mut self.buf, t, c, v)?;
        }
        self.buf.push(b'\n');
        Ok(())
    }

    /// Whether a piece is ready to be sent.
    pub(super) fn ready(&self) -> bool {
        self.buf.len() >= COPY_PIECE
    }

    /// Sends what is encoded.
    pub(super) async fn send(&mut self) -> Result<(), CopyError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(COPY_PIECE));
        self.sink
            .as_mut()
            .send(Cursor::new(piece))
            .await
            .map_err(CopyError::Sql)
    }

    /// Sends the rest and ends the `COPY`: only now does the server say whether
    /// it took the rows.
    pub(super) async fn finish(mut self) -> Result<(), CopyError> {
        self.send().await?;
        self.sink
            .as_mut()
            .finish()
            .await
            .map(|_| ())
            .map_err(CopyError::Sql)
    }
}

/// `COPY`s rows (values of the columns `cols`) into the table; with
/// `savepoint`, after setting the savepoint `ferry_copy`.
pub(super) async fn copy_rows<'r>(
    tx: &Client,
    stmts: &mut Statements,
    t: &Table,
    cols: &[usize],
    mut rows: impl Iterator<Item = &'r Vec<Value>>,
    savepoint: bool,
) -> Result<(), CopyError> {
    let Some(first) = rows.next() else {
        if savepoint {
            tx.batch_execute("SAVEPOINT ferry_copy")
                .await
                .map_err(CopyError::Sql)?;
        }
        return Ok(());
    };
    let mut copy = CopyIn::open(tx, stmts, t, cols, savepoint).await?;
    for row in std::iter::once(first).chain(rows) {
        copy.row(t, row.iter()).map_err(CopyError::Mirror)?;
        if copy.ready() {
            copy.send().await?;
        }
    }
    copy.finish().await
}
