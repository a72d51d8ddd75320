//! The Ferry wire contract (ALPN `ferry/1`).
//!
//! * [`messages`]: the protobuf messages (prost).
//! * [`entry`]: a batch at rest (checksummed), in the agent's buffer and the exchange's store.
//! * [`frame`]: length-prefixed framing with a hard size limit.
//! * [`copy_text`]: PostgreSQL's COPY text format, in which snapshot rows travel.
//! * [`batch`]: encoding of a batch's records (protobuf, then zstd) as it is stored and sent.
//! * [`session`]: the sans-IO state machines of the agent end and the exchange end.
//! * [`rows`]: a source-neutral view of database records (shapes, upserts, deletes)
//!   that deliveries consume.
//!
//! Architecture invariant: this crate performs no I/O, owns no clock and knows
//! nothing of tokio, quinn or sled. Everything here is deterministic and can be
//! driven by tests with arbitrary inputs.

pub mod batch;
pub mod check;
pub mod copy_text;
pub mod entry;
pub mod frame;
pub mod messages;
pub mod record_buf;
pub mod reload;
pub mod rows;
pub mod session;

/// The ALPN protocol id both ends require.
pub const ALPN: &[u8] = b"ferry/1";

/// Wire protocol version carried in `Hello` and `Welcome`: the version this end
/// speaks. Version 2 added `RowBlock` records (snapshot rows in blocks); version 3
/// strict admission (a missing seq is only ever skipped when the agent declares it
/// `Lost`) and buffer incarnations with holds; version 4 the source-neutral row
/// envelope (`Row`, `Table`, `Rows` records, which database sources write instead
/// of the PostgreSQL-shaped `RowChange`, `SchemaChange`, `RowBlock`). An exchange
/// reads both kinds of record in every session: a buffer written before an
/// upgrade ships as it is.
pub const PROTOCOL_VERSION: u32 = 4;

/// The oldest agent version the exchange still serves. An exchange answers in the
/// agent's version; one that only speaks an older version refuses a newer agent
/// (`Version`), so records it could not read never reach it: upgrade the exchange
/// first. Agents before version 3 are refused: they rely on the exchange storing
/// past a missing seq, which it no longer does.
pub const MIN_PROTOCOL_VERSION: u32 = 3;
