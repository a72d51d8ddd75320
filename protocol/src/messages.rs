//! Protobuf messages of `ferry/1`, derived with prost (no `protoc` at build time).
//! Field tags are the wire contract: never renumber or reuse one.

/// One frame on any Ferry stream. The first frame on the control stream is `Hello`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    #[prost(oneof = "frame::Msg", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9")]
    pub msg: Option<frame::Msg>,
}

pub mod frame {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Msg {
        #[prost(message, tag = "1")]
        Hello(super::Hello),
        #[prost(message, tag = "2")]
        Welcome(super::Welcome),
        #[prost(message, tag = "3")]
        Status(super::Status),
        #[prost(message, tag = "4")]
        Batch(super::Batch),
        #[prost(message, tag = "5")]
        Ack(super::Ack),
        #[prost(message, tag = "6")]
        Error(super::Error),
        #[prost(message, tag = "7")]
        Lost(super::Lost),
        #[prost(message, tag = "8")]
        Probe(super::Probe),
        #[prost(message, tag = "9")]
        ProbeReply(super::ProbeReply),
    }
}

/// Instead of `Hello`, the first frame of `ferry-agent doctor`'s connection:
/// the exchange answers with a [`ProbeReply`] and opens no session (a running
/// agent's connection is left alone). An exchange older than the probe
/// answers it as a frame that is not `Hello`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Probe {}

/// The exchange's clock and software, for the doctor's checks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProbeReply {
    /// The exchange's clock as it answered, Unix milliseconds.
    #[prost(uint64, tag = "1")]
    pub unix_ms: u64,
    /// Exchange software version.
    #[prost(string, tag = "2")]
    pub software: String,
}

/// Sharing class of a stream in the resource catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Sharing {
    Unspecified = 0,
    /// 无条件共享
    Unconditional = 1,
    /// 有条件共享
    Conditional = 2,
    /// 不予共享: never leaves the server.
    NotShared = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Unspecified = 0,
    /// The peer sent something that is not valid `ferry/1`.
    Protocol = 1,
    /// The agent is not allowed to do this (identity, stream ownership, sharing class).
    Forbidden = 2,
    /// A frame or batch exceeded a limit.
    TooLarge = 3,
    /// The receiving end failed internally (its store); the sender should retry later.
    Internal = 4,
    /// Incompatible protocol version.
    Version = 5,
    /// The batch was not stored (it does not continue at the exchange's next seq,
    /// or an earlier batch of its stream was not stored): reconnect and resend from
    /// the next seq `Welcome` gives. Nothing after it was stored either.
    Resend = 6,
    /// The stream is held at the exchange until an operator decides (a new buffer
    /// incarnation, a buffer behind what the exchange holds): nothing is stored.
    Held = 7,
}

/// A stream as the agent declares it in `Hello`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamDecl {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub catalog_id: String,
    #[prost(enumeration = "Sharing", tag = "3")]
    pub sharing: i32,
    /// Source kind (`directory`, `tail`, ...), informational.
    #[prost(string, tag = "4")]
    pub kind: String,
    /// The agent buffer's incarnation id: random, created with the buffer, kept by
    /// `salvage`. A wiped or replaced buffer has a new one, so its seqs are never
    /// merged into the old buffer's (version 3).
    #[prost(string, tag = "5")]
    pub incarnation: String,
    /// Highest seq durable in the agent's buffer (version 3).
    #[prost(uint64, tag = "6")]
    pub head_seq: u64,
    /// Every seq up to this one was acknowledged to the agent (version 3).
    #[prost(uint64, tag = "7")]
    pub acked_seq: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub agent_id: String,
    #[prost(string, tag = "3")]
    pub department: String,
    /// SHA-256 of the agent's effective configuration, hex.
    #[prost(string, tag = "4")]
    pub config_digest: String,
    #[prost(message, repeated, tag = "5")]
    pub streams: Vec<StreamDecl>,
    /// Agent software version.
    #[prost(string, tag = "6")]
    pub software: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamWelcome {
    #[prost(string, tag = "1")]
    pub name: String,
    /// The next seq the exchange expects; everything below is durable there.
    #[prost(uint64, tag = "2")]
    pub next_seq: u64,
    /// Why the stream is held (empty: it may ship). A hold lasts until an operator
    /// accepts or refuses the stream at the exchange; reconnecting never lifts it.
    #[prost(string, tag = "3")]
    pub held: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Welcome {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(message, repeated, tag = "2")]
    pub streams: Vec<StreamWelcome>,
    /// Largest frame the exchange accepts, bytes.
    #[prost(uint32, tag = "3")]
    pub max_frame: u32,
    /// Unacknowledged batches the agent may have in flight per stream.
    #[prost(uint32, tag = "4")]
    pub max_window: u32,
    #[prost(string, tag = "5")]
    pub exchange: String,
}

/// The [`StreamStatus`] gauge a source reports the write-ahead log its
/// replication slot retains on the database server under (bytes); the
/// exchange alarms when it passes `[dashboard] retained_wal_alarm`.
pub const RETAINED_WAL_GAUGE: &str = "postgres_retained_wal_bytes";

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamStatus {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub buffered_batches: u64,
    #[prost(uint64, tag = "3")]
    pub buffered_bytes: u64,
    #[prost(uint64, tag = "4")]
    pub acked_seq: u64,
    #[prost(uint64, tag = "5")]
    pub head_seq: u64,
    #[prost(string, tag = "6")]
    pub position: String,
    #[prost(string, tag = "7")]
    pub error: String,
    /// Source kind (`directory`, `tail`, `postgres`, ...).
    #[prost(string, tag = "8")]
    pub kind: String,
    /// Seq ranges declared lost (buffer damage recovered by `salvage`).
    #[prost(message, repeated, tag = "9")]
    pub lost: Vec<SeqRange>,
    /// Figures of the source's durable position (PostgreSQL: `retained_wal_bytes`,
    /// `snapshot_rows_done`, `snapshot_rows_estimate`, ...), as the agent's
    /// `status` shows them.
    #[prost(btree_map = "string, uint64", tag = "10")]
    pub gauges: std::collections::BTreeMap<String, u64>,
    /// Why the stream does not ship, if it does not (refused or held).
    #[prost(string, tag = "11")]
    pub ship_error: String,
}

/// Seqs `from ..= to`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SeqRange {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub to: u64,
}

/// Periodic heartbeat from agent to exchange on the control stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(uint64, tag = "1")]
    pub time_unix_ms: u64,
    #[prost(message, repeated, tag = "2")]
    pub streams: Vec<StreamStatus>,
    #[prost(bool, tag = "3")]
    pub buffer_full: bool,
    #[prost(string, tag = "4")]
    pub software: String,
    #[prost(uint64, tag = "5")]
    pub cert_not_after_unix: u64,
    /// The agent's host name.
    #[prost(string, tag = "6")]
    pub host: String,
    /// When the agent process started, Unix seconds.
    #[prost(uint64, tag = "7")]
    pub started_unix: u64,
    /// Bytes in the agent's buffer, and the most it may hold.
    #[prost(uint64, tag = "8")]
    pub buffer_bytes: u64,
    #[prost(uint64, tag = "9")]
    pub buffer_max_bytes: u64,
    /// The buffer's disk is nearly full.
    #[prost(bool, tag = "10")]
    pub disk_low: bool,
}

/// Records `first_seq .. first_seq + record_count` of one stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    #[prost(string, tag = "1")]
    pub stream: String,
    #[prost(uint64, tag = "2")]
    pub first_seq: u64,
    #[prost(uint32, tag = "3")]
    pub record_count: u32,
    #[prost(enumeration = "Compression", tag = "4")]
    pub compression: i32,
    /// A [`RecordList`], compressed as `compression` says.
    #[prost(bytes = "vec", tag = "5")]
    pub payload: Vec<u8>,
    /// Length of the uncompressed `RecordList`, bounded by [`crate::batch::MAX_RAW_BATCH`].
    #[prost(uint32, tag = "6")]
    pub raw_len: u32,
}

/// The agent declares seqs `from_seq ..= to_seq` of `stream` lost: durable once but
/// gone (buffer damage recovered by `salvage`, or acknowledged records an exchange
/// restored from backup no longer has). The exchange records the range as a gap and
/// acknowledges it like a batch; it never stores past a missing seq otherwise.
/// Sent on the stream's data stream, in seq order with its batches (version 3).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Lost {
    #[prost(string, tag = "1")]
    pub stream: String,
    #[prost(uint64, tag = "2")]
    pub from_seq: u64,
    #[prost(uint64, tag = "3")]
    pub to_seq: u64,
    #[prost(string, tag = "4")]
    pub reason: String,
}

/// Cumulative: every seq `<= up_to_seq` of `stream` is durable at the exchange.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub stream: String,
    #[prost(uint64, tag = "2")]
    pub up_to_seq: u64,
    /// Files (by file id) completed in the acknowledged batch whose bytes did not
    /// match their SHA-256 at the exchange: stored for inspection, but not
    /// received. The agent must send each again whole and keep the original
    /// until then. Repeated in the ack of any resend of that batch.
    #[prost(string, repeated, tag = "3")]
    pub rejected_files: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(string, tag = "3")]
    pub stream: String,
}

/// One captured change.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// Capture time at the agent, Unix milliseconds.
    #[prost(uint64, tag = "1")]
    pub time_unix_ms: u64,
    /// The source position of this record, human readable (e.g. `ino=12 off=4096`).
    #[prost(string, tag = "2")]
    pub position: String,
    #[prost(oneof = "record::Body", tags = "3, 4, 5, 6, 7, 8, 9, 10, 11")]
    pub body: Option<record::Body>,
}

pub mod record {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// One line of a tailed file, UTF-8 after any transcoding, without its newline.
        #[prost(bytes = "vec", tag = "3")]
        Line(Vec<u8>),
        #[prost(message, tag = "4")]
        FileChunk(super::FileChunk),
        #[prost(message, tag = "5")]
        FileAbort(super::FileAbort),
        /// One row-level change captured from a database (or one row of an initial
        /// snapshot).
        #[prost(message, tag = "6")]
        RowChange(super::RowChange),
        /// The column set of a captured table, sent before the first row that has it.
        #[prost(message, tag = "7")]
        SchemaChange(super::SchemaChange),
        /// Many rows of one table from an initial snapshot, as the database's COPY
        /// wrote them.
        #[prost(message, tag = "8")]
        RowBlock(super::RowBlock),
        /// One row-level change of a database table, in the source-neutral
        /// envelope every database source writes (version 4).
        #[prost(message, tag = "9")]
        Row(super::Row),
        /// The columns of a captured table, source-neutral (version 4).
        #[prost(message, tag = "10")]
        Table(super::Table),
        /// Many snapshot rows of one table, source-neutral (version 4).
        #[prost(message, tag = "11")]
        Rows(super::Rows),
    }
}

/// A piece of a file taken from a directory drop. Chunks of one `file_id` arrive in
/// offset order; the last one carries `end`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileChunk {
    #[prost(string, tag = "1")]
    pub file_id: String,
    /// Path relative to the watched directory.
    #[prost(string, tag = "2")]
    pub path: String,
    #[prost(uint64, tag = "3")]
    pub offset: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub data: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub end: Option<FileEnd>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FileEnd {
    #[prost(uint64, tag = "1")]
    pub size: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub sha256: Vec<u8>,
}

/// The file `file_id` changed while it was being sent: drop what arrived of it; it
/// will be sent again, whole, under a new id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileAbort {
    #[prost(string, tag = "1")]
    pub file_id: String,
    #[prost(string, tag = "2")]
    pub path: String,
    #[prost(string, tag = "3")]
    pub reason: String,
}

/// What a [`RowChange`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RowOp {
    Unspecified = 0,
    Insert = 1,
    Update = 2,
    Delete = 3,
    /// The whole table was emptied; `columns` and `old_key` are empty.
    Truncate = 4,
}

/// One row-level change of a database table.
///
/// Transaction boundaries: the changes of one source transaction are contiguous in
/// seq order, share `xid` and `commit_lsn`, are numbered by `change_index` from 0,
/// and the last one carries `last_in_txn`. A consumer that applies transactionally
/// buffers until `last_in_txn`; `(commit_lsn, change_index)` identifies a streamed
/// change uniquely. Only committed transactions are ever captured.
///
/// Initial-snapshot rows carry `snapshot = true`, `op = INSERT`, `xid = 0`,
/// `commit_lsn` = the WAL position of the view the row was read under (the slot's
/// consistent point; later for a snapshot resumed after a crash), `change_index` =
/// the row's number within its table's copy, and `last_in_txn = true` (each stands
/// alone). A consumer applying by primary key (insert/update = upsert,
/// delete = remove) converges to the table's state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RowChange {
    #[prost(string, tag = "1")]
    pub schema: String,
    #[prost(string, tag = "2")]
    pub table: String,
    #[prost(enumeration = "RowOp", tag = "3")]
    pub op: i32,
    /// Source transaction id (0 for snapshot rows).
    #[prost(uint32, tag = "4")]
    pub xid: u32,
    /// LSN of the transaction's commit record (PostgreSQL), as a 64-bit number.
    #[prost(uint64, tag = "5")]
    pub commit_lsn: u64,
    /// Commit time, microseconds since the Unix epoch (0 when unknown).
    #[prost(int64, tag = "6")]
    pub commit_time_unix_us: i64,
    /// 0-based number of this change within its transaction.
    #[prost(uint32, tag = "7")]
    pub change_index: u32,
    #[prost(bool, tag = "8")]
    pub last_in_txn: bool,
    #[prost(bool, tag = "9")]
    pub snapshot: bool,
    /// The new row (INSERT, UPDATE), in table column order.
    #[prost(message, repeated, tag = "10")]
    pub columns: Vec<Column>,
    /// The old row's replica-identity columns (DELETE; UPDATE when the key changed),
    /// or the whole old row under `REPLICA IDENTITY FULL`.
    #[prost(message, repeated, tag = "11")]
    pub old_key: Vec<Column>,
    /// TRUNCATE ... CASCADE.
    #[prost(bool, tag = "12")]
    pub truncate_cascade: bool,
    /// TRUNCATE ... RESTART IDENTITY.
    #[prost(bool, tag = "13")]
    pub truncate_restart_identity: bool,
}

/// One column value, as the database's own text output renders it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Column {
    #[prost(string, tag = "1")]
    pub name: String,
    /// The type as the database names it (`numeric(30,10)`, `integer[]`).
    #[prost(string, tag = "2")]
    pub type_name: String,
    #[prost(uint32, tag = "3")]
    pub type_oid: u32,
    #[prost(oneof = "column::Value", tags = "4, 5, 6, 7")]
    pub value: Option<column::Value>,
}

pub mod column {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// The text output of the value (exact for numeric, with zone for timestamptz).
        #[prost(string, tag = "4")]
        Text(String),
        /// SQL NULL (always `true` when set).
        #[prost(bool, tag = "5")]
        Null(bool),
        /// An out-of-line (TOAST) value the UPDATE did not change and the database
        /// did not resend: keep the value the consumer already has.
        #[prost(bool, tag = "6")]
        UnchangedToast(bool),
        /// A `bytea` value's bytes (its text output is `\x` + hex of these).
        #[prost(bytes = "vec", tag = "7")]
        Bytes(Vec<u8>),
    }
}

/// The columns of a captured table. Sent before the first row of the table a source
/// ships (snapshot or stream) and again whenever the column names or types change
/// (ALTER TABLE ADD/DROP COLUMN, type change), immediately before the first row with
/// the new shape.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SchemaChange {
    #[prost(string, tag = "1")]
    pub schema: String,
    #[prost(string, tag = "2")]
    pub table: String,
    #[prost(message, repeated, tag = "3")]
    pub columns: Vec<SchemaColumn>,
    /// `default`, `nothing`, `full` or `index`.
    #[prost(string, tag = "4")]
    pub replica_identity: String,
    /// LSN of the transaction the new shape was first seen in (for a snapshot: the
    /// LSN the snapshot is consistent with).
    #[prost(uint64, tag = "5")]
    pub commit_lsn: u64,
}

/// Rows of one table read by an initial snapshot, carried as PostgreSQL's COPY
/// text format writes them (`COPY ... TO STDOUT`): one row per line, each line
/// ending in `\n`; fields separated by tabs, in `columns` order; `\N` for NULL;
/// a backslash escapes tab, newline, carriage return, backslash and the other
/// control characters (see [`crate::copy_text`]). A field's text, unescaped, is
/// the type's text output, exactly as a [`Column`]'s `Text` carries it.
///
/// Row `i` of the block stands for the [`RowChange`] with `op = INSERT`,
/// `snapshot = true`, `xid = 0`, this `commit_lsn`, `change_index = first_index + i`,
/// `last_in_txn = true` and these columns (a `bytea` value as its bytes):
/// [`crate::copy_text::block_rows`] gives exactly those. One record carries
/// thousands of rows, so snapshot rows travel, are checked and are stored as the
/// database wrote them instead of one message each. The exchange refuses a block
/// whose line count is not `row_count` or whose lines do not have one field per
/// column.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RowBlock {
    #[prost(string, tag = "1")]
    pub schema: String,
    #[prost(string, tag = "2")]
    pub table: String,
    /// The fields of every line, in order.
    #[prost(message, repeated, tag = "3")]
    pub columns: Vec<SchemaColumn>,
    /// The WAL position of the view the rows were read under (see [`RowChange`]).
    #[prost(uint64, tag = "4")]
    pub commit_lsn: u64,
    /// The table-copy row number of the first line.
    #[prost(uint64, tag = "5")]
    pub first_index: u64,
    #[prost(uint32, tag = "6")]
    pub row_count: u32,
    #[prost(string, tag = "7")]
    pub copy_text: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SchemaColumn {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub type_name: String,
    #[prost(uint32, tag = "3")]
    pub type_oid: u32,
    /// Part of the replica identity (normally the primary key).
    #[prost(bool, tag = "4")]
    pub key: bool,
}

/// A column's type in terms every consumer can map to its own (version 4). The
/// source's own spelling travels beside it in [`TableColumn::source_type`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ValueType {
    Unspecified = 0,
    Bool = 1,
    Int16 = 2,
    Int32 = 3,
    Int64 = 4,
    Float32 = 5,
    Float64 = 6,
    /// Exact decimal (precision and scale in [`TableColumn`]).
    Decimal = 7,
    Text = 8,
    /// Binary; values travel as [`field::Value::Bytes`].
    Bytes = 9,
    Date = 10,
    /// Time of day without a zone.
    Time = 11,
    /// Date and time without a zone.
    Timestamp = 12,
    /// An instant (date and time with a zone).
    TimestampTz = 13,
    Interval = 14,
    Uuid = 15,
    Json = 16,
    /// Anything else (`integer[]`, `point`, an enum, a MySQL `SET`): consumers
    /// go by [`TableColumn::source_type`].
    Other = 17,
}

/// One row-level change of a database table, as every database source writes it
/// (version 4; [`RowChange`] is its PostgreSQL-shaped predecessor, still read).
///
/// Transaction boundaries: the changes of one source transaction are contiguous in
/// seq order, share `txn` and `position`, are numbered by `change_index` from 0,
/// and the last one carries `last_in_txn`. A consumer that applies transactionally
/// buffers until `last_in_txn`; `(position, change_index)` identifies a streamed
/// change of one source uniquely. Only committed transactions are ever captured.
///
/// Initial-snapshot rows carry `snapshot = true`, `op = INSERT`, an empty `txn`,
/// `position` = the source position of the view the row was read under,
/// `change_index` = the row's number within its table's copy and
/// `last_in_txn = true` (each stands alone). A consumer applying by key
/// (insert/update = upsert, delete = remove) converges to the table's state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Row {
    /// The PostgreSQL schema, or the MySQL database.
    #[prost(string, tag = "1")]
    pub schema: String,
    #[prost(string, tag = "2")]
    pub table: String,
    #[prost(enumeration = "RowOp", tag = "3")]
    pub op: i32,
    /// The source's transaction id, as the source writes it (PostgreSQL: the
    /// xid in decimal; MySQL: the GTID); empty for snapshot rows.
    #[prost(string, tag = "4")]
    pub txn: String,
    /// The source position of the transaction, opaque to everyone but the
    /// source kind named in `source` (PostgreSQL: the commit LSN, 8 bytes
    /// big-endian, so byte order is LSN order; MySQL: `file:pos` of the
    /// transaction's first binlog event).
    #[prost(bytes = "vec", tag = "5")]
    pub position: Vec<u8>,
    /// Commit time, microseconds since the Unix epoch (0 when unknown).
    #[prost(int64, tag = "6")]
    pub commit_time_unix_us: i64,
    /// 0-based number of this change within its transaction.
    #[prost(uint32, tag = "7")]
    pub change_index: u32,
    #[prost(bool, tag = "8")]
    pub last_in_txn: bool,
    #[prost(bool, tag = "9")]
    pub snapshot: bool,
    /// The new row (INSERT, UPDATE), in table column order.
    #[prost(message, repeated, tag = "10")]
    pub columns: Vec<Field>,
    /// The old row's identifying columns (DELETE; UPDATE when the key changed), or
    /// the whole old row of a table identified by all its columns.
    #[prost(message, repeated, tag = "11")]
    pub old_key: Vec<Field>,
    /// Options of the operation as the source states them (PostgreSQL TRUNCATE:
    /// `cascade`, `restart_identity`).
    #[prost(string, repeated, tag = "12")]
    pub flags: Vec<String>,
    /// The source kind (`postgres`, `mysql`): how `txn` and `position` read.
    #[prost(string, tag = "13")]
    pub source: String,
}

/// One column value of a [`Row`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Field {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "ValueType", tag = "2")]
    pub value_type: i32,
    #[prost(oneof = "field::Value", tags = "4, 5, 6, 7")]
    pub value: Option<field::Value>,
}

pub mod field {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// The source's canonical text form of the value (exact for decimals,
        /// with the zone for instants).
        #[prost(string, tag = "4")]
        Text(String),
        /// SQL NULL (always `true` when set).
        #[prost(bool, tag = "5")]
        Null(bool),
        /// A value the change did not touch and the source did not resend
        /// (PostgreSQL's unchanged TOAST values): keep the value the consumer has.
        #[prost(bool, tag = "6")]
        Unchanged(bool),
        /// A binary value's bytes.
        #[prost(bytes = "vec", tag = "7")]
        Bytes(Vec<u8>),
    }
}

/// One column of a [`Table`] or [`Rows`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct TableColumn {
    #[prost(string, tag = "1")]
    pub name: String,
    /// The type as the source names it (`numeric(30,10)`, `varchar(20)`).
    #[prost(string, tag = "2")]
    pub source_type: String,
    #[prost(enumeration = "ValueType", tag = "3")]
    pub value_type: i32,
    /// Part of the key that identifies a row (the primary key, or the unique
    /// index the source identifies rows by). A table identified by its whole
    /// row has no key column.
    #[prost(bool, tag = "4")]
    pub key: bool,
    /// Decimal precision and scale, where the source declares them.
    #[prost(uint32, optional, tag = "5")]
    pub precision: Option<u32>,
    #[prost(uint32, optional, tag = "6")]
    pub scale: Option<u32>,
}

/// The columns of a captured table, source-neutral (version 4; [`SchemaChange`]
/// is its predecessor). Sent before the first row of the table a source ships
/// and again whenever the column names or types change, immediately before the
/// first row with the new shape.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Table {
    #[prost(string, tag = "1")]
    pub schema: String,
    #[prost(string, tag = "2")]
    pub table: String,
    #[prost(message, repeated, tag = "3")]
    pub columns: Vec<TableColumn>,
    /// How the source identifies rows, in its own words (PostgreSQL's replica
    /// identity: `default`, `index`, `full`, `nothing`).
    #[prost(string, tag = "4")]
    pub identity: String,
    /// Source position of the transaction the shape was first seen in (for a
    /// snapshot: the position it is consistent with), as in [`Row`].
    #[prost(bytes = "vec", tag = "5")]
    pub position: Vec<u8>,
    #[prost(string, tag = "6")]
    pub source: String,
}

/// Snapshot rows of one table in COPY text (see [`crate::copy_text`]: one row
/// per line, tab-separated fields in `columns` order, `\N` for NULL, backslash
/// escapes; a binary value as `\x` + hex of its bytes), source-neutral
/// (version 4; [`RowBlock`] is its predecessor, with the same tags for columns,
/// row count and text).
///
/// Row `i` stands for the [`Row`] with `op = INSERT`, `snapshot = true`, an
/// empty `txn`, this `position` and `source`, `change_index = first_index + i`,
/// `last_in_txn = true` and these columns: [`crate::copy_text::rows_of`] gives
/// exactly those. The exchange refuses a block whose line count is not
/// `row_count` or whose lines do not have one field per column.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Rows {
    #[prost(string, tag = "1")]
    pub schema: String,
    #[prost(string, tag = "2")]
    pub table: String,
    #[prost(message, repeated, tag = "3")]
    pub columns: Vec<TableColumn>,
    /// The source position of the view the rows were read under.
    #[prost(bytes = "vec", tag = "4")]
    pub position: Vec<u8>,
    /// The table-copy row number of the first line.
    #[prost(uint64, tag = "5")]
    pub first_index: u64,
    #[prost(uint32, tag = "6")]
    pub row_count: u32,
    #[prost(string, tag = "7")]
    pub copy_text: String,
    #[prost(string, tag = "8")]
    pub source: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RecordList {
    #[prost(message, repeated, tag = "1")]
    pub records: Vec<Record>,
}

impl Sharing {
    /// Parses the configuration spelling (`unconditional`, `conditional`, `not-shared`).
    pub fn from_config(s: &str) -> Option<Sharing> {
        match s {
            "unconditional" => Some(Sharing::Unconditional),
            "conditional" => Some(Sharing::Conditional),
            "not-shared" => Some(Sharing::NotShared),
            _ => None,
        }
    }

    pub fn as_config(self) -> &'static str {
        match self {
            Sharing::Unspecified => "unspecified",
            Sharing::Unconditional => "unconditional",
            Sharing::Conditional => "conditional",
            Sharing::NotShared => "not-shared",
        }
    }
}
