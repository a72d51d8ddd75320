//! The exchange's system of record, behind one seam.
//!
//! Everything the QUIC server, the admin socket, the command line and the
//! deliveries need from storage is in two traits: [`Ledger`] (what agents
//! shipped: admission, the batch log, declared losses, received files, holds)
//! and [`Registry`] (the fleet: who connected, from where, with what; the
//! exchange's users; the hash-chained audit log, `audit.rs`). A
//! backend implements both ([`Backend`]); the rest of the exchange holds a
//! [`SharedStore`] and never names a backend. Methods block: async callers go
//! through `spawn_blocking` or the committer thread.
//!
//! What every backend must keep (tested once for all in `contract.rs`):
//! * a seq is stored at most once, and nothing is stored past a missing seq
//!   unless the agent declared it lost ([`ferry_protocol::session::admit`]);
//! * an ack (`commit_group`'s result) and a next expected seq report only what
//!   is durable;
//! * once durability is in doubt the backend says so ([`Ledger::poisoned`]) and
//!   stores nothing more in this process;
//! * a stream's records read back in seq order, with file chunks' bytes
//!   available from [`Ledger::open_file`] once the file is complete.
//! * audit entries take seqs 1, 2, 3, … once each and each names the one
//!   before by its hash, whichever node or thread appends
//!   ([`Registry::append_audit`]); users and audit entries are durable when
//!   the call returns.
//!
//! Backends: `embedded` ([`embedded::Embedded`], sled and files under
//! `[store] dir`), the default; `jetstream` ([`jetstream::JetStream`], a NATS
//! JetStream server or cluster that several exchange nodes share).
//!
//! What no backend holds: the CA, the certificates issued to agents and their
//! revocations stay in the files under `[tls] trust_dir` (`trust.rs`). Nodes
//! sharing a JetStream store share those files through the operator's
//! configuration management, because the CA key must stay off serving hosts.

mod embedded;
mod jetstream;

use std::path::PathBuf;
use std::sync::Arc;

use ferry_protocol::messages::{Batch, Lost, Record, Sharing, StreamDecl};
use ferry_protocol::session::{continuity, Continuity, StreamPlan, StreamRecord};
use serde::{Deserialize, Serialize};

pub use crate::audit::AuditEntry;
pub use crate::users::User;
pub use embedded::Embedded;
pub use jetstream::{subject_token, JetStream};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {dir}: {source}")]
    Sled {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store at {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The batch itself is bad; the agent is told and nothing is stored.
    #[error("invalid batch: {0}")]
    Invalid(String),
    #[error("store damaged at {0}")]
    Damaged(String),
    /// Not stored because it does not continue the stream (an earlier batch was
    /// not stored): the agent resends from the next seq.
    #[error("{0}")]
    Resend(String),
    /// The store's server failed, could not be reached, or answered what the
    /// backend cannot use.
    #[error("store server {server}: {what}: {detail}")]
    Remote {
        server: String,
        what: String,
        detail: String,
    },
    /// The store would not keep the exchange's promises (an acknowledgement
    /// before the data is on disk): refused at open, with what to do.
    #[error("{0}")]
    Unsafe(String),
    /// A sync failed earlier in this process: nothing more is stored.
    #[error("the store at {0} could not make a commit durable; the exchange must restart from what is on disk")]
    Poisoned(PathBuf),
}

/// Seqs `from ..= to` of a stream never arrived: the agent declared them lost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub detected_unix_ms: u64,
    /// Why, as the agent declared it.
    #[serde(default)]
    pub reason: String,
}

/// A stream held until an operator decides (`ferry-exchange resolve`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Hold {
    pub reason: String,
    pub since_unix_ms: u64,
    /// The buffer that asked: its incarnation, head and acked watermark.
    pub incarnation: String,
    pub head_seq: u64,
    pub acked_seq: u64,
    /// Set when an operator refused the stream: why.
    #[serde(default)]
    pub refused: Option<String>,
}

impl Hold {
    /// A hold, from now, of the buffer that declared `decl`.
    fn of(decl: &StreamDecl, reason: &str) -> Self {
        Hold {
            reason: reason.to_string(),
            since_unix_ms: now_unix_ms(),
            incarnation: decl.incarnation.clone(),
            head_seq: decl.head_seq,
            acked_seq: decl.acked_seq,
            refused: None,
        }
    }
}

/// Where an operator accepted a new buffer as the continuation of a stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Boundary {
    /// The first seq (exchange numbering) that came from `incarnation`.
    pub from_seq: u64,
    pub incarnation: String,
    /// That buffer's seq `s` is stored as `s + offset`.
    pub offset: u64,
    pub accepted_unix_ms: u64,
    pub replaced: String,
}

/// What the exchange knows of one (agent, stream) besides its records.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamMeta {
    pub incarnation: String,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub hold: Option<Hold>,
    #[serde(default)]
    pub boundaries: Vec<Boundary>,
    /// Catalogue id and sharing class as declared, each from the seq it applied to.
    #[serde(default)]
    pub classes: Vec<ClassChange>,
}

/// An operator's decision on a held stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Continue the stream with the held buffer, after a recorded boundary.
    Accept,
    /// Keep refusing it, for this reason.
    Refuse(String),
}

/// An agent's heartbeat as the registry keeps it (the wire's `Status`, typed;
/// fields an older agent does not send stay at their defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Heartbeat {
    /// When the exchange received it, Unix ms.
    pub received_unix_ms: u64,
    pub host: String,
    pub software: String,
    /// Agent process start, Unix seconds.
    pub started_unix: u64,
    pub buffer_full: bool,
    pub disk_low: bool,
    pub buffer_bytes: u64,
    pub buffer_max_bytes: u64,
    pub cert_not_after_unix: u64,
    pub streams: Vec<StreamHeartbeat>,
}

/// One stream of a [`Heartbeat`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StreamHeartbeat {
    pub name: String,
    pub kind: String,
    pub head_seq: u64,
    pub acked_seq: u64,
    pub buffered_batches: u64,
    pub buffered_bytes: u64,
    /// The source's durable position, described.
    pub position: String,
    /// The source's last error (empty: none).
    pub error: String,
    /// Why the stream does not ship (empty: it does).
    pub ship_error: String,
    /// Seq ranges declared lost, `[from, to]`.
    pub lost: Vec<[u64; 2]>,
    /// Figures of the source's position (PostgreSQL: `postgres_retained_wal_bytes`, ...).
    pub gauges: std::collections::BTreeMap<String, u64>,
}

impl Heartbeat {
    pub fn from_status(s: &ferry_protocol::messages::Status, received_unix_ms: u64) -> Self {
        Heartbeat {
            received_unix_ms,
            host: s.host.clone(),
            software: s.software.clone(),
            started_unix: s.started_unix,
            buffer_full: s.buffer_full,
            disk_low: s.disk_low,
            buffer_bytes: s.buffer_bytes,
            buffer_max_bytes: s.buffer_max_bytes,
            cert_not_after_unix: s.cert_not_after_unix,
            streams: s
                .streams
                .iter()
                .map(|t| StreamHeartbeat {
                    name: t.name.clone(),
                    kind: t.kind.clone(),
                    head_seq: t.head_seq,
                    acked_seq: t.acked_seq,
                    buffered_batches: t.buffered_batches,
                    buffered_bytes: t.buffered_bytes,
                    position: t.position.clone(),
                    error: t.error.clone(),
                    ship_error: t.ship_error.clone(),
                    lost: t.lost.iter().map(|r| [r.from, r.to]).collect(),
                    gauges: t.gauges.clone(),
                })
                .collect(),
        }
    }
}

/// One entry of the fleet registry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentRecord {
    pub agent_id: String,
    pub department: String,
    pub last_seen_unix_ms: u64,
    pub remote: String,
    pub software: String,
    pub config_digest: String,
    pub streams: Vec<String>,
    /// The last heartbeat.
    pub status: Option<Heartbeat>,
    /// Serial (hex) of the certificate the agent last connected with.
    #[serde(default)]
    pub cert_serial: String,
    /// How the agent last connected: `quic`, or `tcp` where UDP is blocked.
    #[serde(default)]
    pub transport: String,
}

/// What an agent sent, to be stored (seqs already in the exchange's numbering).
pub enum Item {
    Batch(Batch),
    Lost(Lost),
}

/// An item received from `agent`.
pub struct Incoming {
    pub agent: String,
    pub item: Item,
}

impl Incoming {
    pub fn stream(&self) -> &str {
        match &self.item {
            Item::Batch(b) => &b.stream,
            Item::Lost(l) => &l.stream,
        }
    }

    pub fn payload_len(&self) -> usize {
        match &self.item {
            Item::Batch(b) => b.payload.len(),
            Item::Lost(_) => 0,
        }
    }
}

/// One stored record, for `records`.
pub struct StoredRecord {
    pub seq: u64,
    pub record: Record,
}

/// What the exchange knows about one file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    pub file_id: String,
    /// Path relative to the agent's watched directory.
    pub path: String,
    /// `receiving`, `complete`, `aborted` or `sha256-mismatch`.
    pub status: String,
    /// Declared size (known once the last chunk arrived).
    pub size: u64,
    /// Highest byte offset written so far.
    pub received: u64,
    /// Declared SHA-256, hex.
    pub sha256: String,
    /// Seq of the record that completed (or aborted) the file.
    pub seq: u64,
    pub reason: Option<String>,
}

/// What the exchange knows of a stream, for deliveries and the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInfo {
    pub agent: String,
    pub stream: String,
    /// Everything below this seq is stored (or declared lost).
    pub next_seq: u64,
    pub meta: StreamMeta,
}

/// What one [`Ledger::trim`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    pub records: u64,
    pub files: u64,
    /// The first seq still stored (the stream's next seq when none is).
    pub first_kept: u64,
}

/// The catalogue entry and sharing class a stream declared, from a seq on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClassChange {
    /// The first seq stored under this declaration.
    pub from_seq: u64,
    pub catalog_id: String,
    /// `unconditional`, `conditional` (`not-shared` streams never reach the exchange).
    pub sharing: String,
    pub since_unix_ms: u64,
}

/// What [`StreamMeta::judge`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    /// The record changed: the backend must store it durably.
    pub changed: bool,
    /// Why the stream is held (`None`: it may ship).
    pub held: Option<String>,
    /// The hold is new with this judgement (raise the alarm once).
    pub newly_held: bool,
}

impl StreamMeta {
    /// Judges a declared stream for `Welcome` against this record, the stream's
    /// next seq being `next_seq` (see `ferry_protocol::session::continuity`): a
    /// new catalogue id or sharing class applies from `next_seq` on; a stream's
    /// first buffer is remembered; a new incarnation or a buffer behind is held
    /// until an operator decides. Every backend persists the record when
    /// `changed`.
    /// Applies an operator's decision on the held stream, the stream's next seq
    /// being `next_seq`: accepting makes the held buffer a continuation from
    /// `next_seq` (its acked seq + 1 is stored there); refusing keeps the hold
    /// with the reason. Every backend persists the record after.
    pub fn resolve(
        &mut self,
        agent: &str,
        stream: &str,
        next_seq: u64,
        decision: &Decision,
    ) -> Result<(), StoreError> {
        let Some(hold) = self.hold.clone() else {
            return Err(StoreError::Invalid(format!(
                "stream {stream} of agent {agent} is not held"
            )));
        };
        match decision {
            Decision::Accept => {
                let offset = (next_seq - 1).saturating_sub(hold.acked_seq);
                self.boundaries.push(Boundary {
                    from_seq: next_seq,
                    incarnation: hold.incarnation.clone(),
                    offset,
                    accepted_unix_ms: now_unix_ms(),
                    replaced: self.incarnation.clone(),
                });
                self.incarnation = hold.incarnation;
                self.offset = offset;
                self.hold = None;
                tracing::warn!(
                    agent,
                    stream,
                    from_seq = next_seq,
                    offset,
                    "held stream accepted as a continuation"
                );
            }
            Decision::Refuse(why) => {
                if let Some(h) = self.hold.as_mut() {
                    h.refused = Some(why.clone());
                }
                tracing::warn!(agent, stream, reason = %why, "held stream refused");
            }
        }
        Ok(())
    }

    pub fn judge(&mut self, next_seq: u64, decl: &StreamDecl) -> Judged {
        let rec = StreamRecord {
            next_seq,
            incarnation: self.incarnation.clone(),
            offset: self.offset,
            held: self.hold.as_ref().map(|h| match &h.refused {
                Some(why) => format!("refused by the exchange operator: {why}"),
                None => h.reason.clone(),
            }),
        };
        let declared = (decl.catalog_id.as_str(), sharing_name(decl.sharing));
        let changed = self
            .classes
            .last()
            .is_none_or(|c| (c.catalog_id.as_str(), c.sharing.as_str()) != declared);
        if changed {
            // Applies to what is stored from now on; earlier records keep theirs.
            self.classes.push(ClassChange {
                from_seq: next_seq,
                catalog_id: declared.0.to_string(),
                sharing: declared.1.to_string(),
                since_unix_ms: now_unix_ms(),
            });
        }
        match continuity(&rec, decl) {
            Continuity::Continue => Judged {
                changed,
                held: None,
                newly_held: false,
            },
            Continuity::Adopt => {
                self.incarnation = decl.incarnation.clone();
                Judged {
                    changed: true,
                    held: None,
                    newly_held: false,
                }
            }
            Continuity::Hold(reason) => {
                let newly_held = self.hold.is_none();
                if newly_held {
                    self.hold = Some(Hold::of(decl, &reason));
                }
                Judged {
                    changed: changed || newly_held,
                    held: Some(reason),
                    newly_held,
                }
            }
        }
    }

    /// The declaration in force for the record at `seq` (`None` before any).
    pub fn class_at(&self, seq: u64) -> Option<&ClassChange> {
        self.classes.iter().rev().find(|c| c.from_seq <= seq)
    }
}

/// The record of batches: what each agent shipped, durable and deduplicated.
pub trait Ledger: Send + Sync {
    /// Stores a group of batches and loss declarations durably (one sync for
    /// all). Returns, per item, the cumulative ack for its stream or why it was
    /// not stored; a stream's items after a refused one are refused too.
    fn commit_group(&self, items: &[Incoming]) -> Vec<Result<u64, StoreError>>;
    /// Whether durability was lost in this process: nothing more is stored and
    /// the exchange must restart from what is durable.
    fn poisoned(&self) -> bool;
    /// The next seq expected from `agent` on `stream` (1 for a new stream);
    /// everything below it is durable.
    fn next_expected(&self, agent: &str, stream: &str) -> Result<u64, StoreError>;
    /// Judges a declared stream for `Welcome` (continuity of its buffer, holds),
    /// and records its catalogue id and sharing class when they changed.
    fn plan_stream(&self, agent: &str, decl: &StreamDecl) -> Result<StreamPlan, StoreError>;
    /// Holds a declared stream for `reason` (durably; a hold already there is kept).
    fn hold(&self, agent: &str, decl: &StreamDecl, reason: &str) -> Result<(), StoreError>;
    /// An operator's decision on a held stream.
    fn resolve(
        &self,
        agent: &str,
        stream: &str,
        decision: &Decision,
    ) -> Result<StreamMeta, StoreError>;
    /// Every held stream: (agent, stream, hold).
    fn holds(&self) -> Result<Vec<(String, String, Hold)>, StoreError>;
    /// Every stream the store holds anything of.
    fn streams(&self) -> Result<Vec<StreamInfo>, StoreError>;
    fn stream_meta(&self, agent: &str, stream: &str) -> Result<StreamMeta, StoreError>;
    /// Records of a stream from seq `from` on, in seq order, each with the time
    /// it was stored (Unix ms), until `each` returns false. File chunks come
    /// without their bytes: read those with [`Ledger::open_file`].
    fn records(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        each: &mut dyn FnMut(StoredRecord, u64) -> bool,
    ) -> Result<(), StoreError>;
    fn file(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<Option<FileRecord>, StoreError>;
    /// Every file of a stream, in the order they were completed.
    fn files(&self, agent: &str, stream: &str) -> Result<Vec<FileRecord>, StoreError>;
    /// The bytes of a received file.
    fn open_file(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<Box<dyn std::io::Read + Send>, StoreError>;
    /// The files completed at seqs `from ..= to` of a stream whose bytes did not
    /// match their SHA-256 (the agent must send them again).
    fn rejected_files(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<String>, StoreError>;
    /// Seqs the agent declared lost.
    fn gaps(&self, agent: &str, stream: &str) -> Result<Vec<Gap>, StoreError>;
    /// Removes a stream's records below seq `below` that were stored before
    /// `stored_before_ms` (Unix ms), with the bytes of files they completed:
    /// retention, once every delivery passed them. Whole stored entries only, so
    /// a few records at the edge may stay; the next expected seq, gaps and holds
    /// are kept. Backends that cannot trim say so.
    fn trim(
        &self,
        agent: &str,
        stream: &str,
        below: u64,
        stored_before_ms: u64,
    ) -> Result<Trimmed, StoreError> {
        let _ = (agent, stream, below, stored_before_ms);
        Err(StoreError::Invalid(
            "this store backend does not remove records (retention)".into(),
        ))
    }
    /// A receiver that changes after every durable commit (deliveries wait on it).
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<(), StoreError>;
}

/// The fleet registry (one record per agent, rebuilt by its next heartbeat),
/// the exchange's users and its audit log.
pub trait Registry: Send + Sync {
    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError>;
    fn agent(&self, agent: &str) -> Result<Option<AgentRecord>, StoreError>;
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;

    /// Writes a user's record (a new one, or a change), durably; every node
    /// sees it. The caller checked the name (`users::check_name`).
    fn put_user(&self, user: &User) -> Result<(), StoreError>;
    fn user(&self, name: &str) -> Result<Option<User>, StoreError>;
    /// Every user, in no particular order.
    fn users(&self) -> Result<Vec<User>, StoreError>;
    /// Removes a user durably; `false` when there was none of that name.
    fn remove_user(&self, name: &str) -> Result<bool, StoreError>;

    /// Appends an entry to the audit log, durably, and returns it: the
    /// backend assigns the next seq (1 for the first), the time and the hashes
    /// (`audit.rs`) atomically with every other appender, on this node or
    /// another sharing the store, so seqs run 1, 2, 3, … once each and the
    /// chain is never forked.
    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<AuditEntry, StoreError>;
    /// At most `limit` entries from seq `from_seq` on, in seq order.
    fn audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
}

/// A system of record: both halves.
pub trait Backend: Ledger + Registry {}
impl<T: Ledger + Registry> Backend for T {}

pub type SharedStore = Arc<dyn Backend>;

/// Opens the backend `[store]` names. Blocks; callable from a plain thread or
/// from `block_in_place` inside a runtime.
pub fn open(cfg: &crate::config::StoreSection) -> Result<SharedStore, StoreError> {
    match cfg.kind.as_str() {
        "jetstream" => Ok(Arc::new(JetStream::open(cfg)?)),
        _ => {
            let store = Embedded::open(&cfg.dir, cfg.cache_size)?;
            if cfg.retain.is_some() {
                store.count_segment_references()?;
            }
            Ok(Arc::new(store))
        }
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A sharing class as `exchange.toml` and the registry spell it.
pub fn sharing_name(s: i32) -> &'static str {
    Sharing::try_from(s)
        .unwrap_or(Sharing::Unspecified)
        .as_config()
}

#[cfg(test)]
mod contract;
