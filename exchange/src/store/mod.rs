//! The embedded store: what agents shipped, durable and deduplicated.
//!
//! # Layout
//! `STORE/db` is a sled database with one tree:
//! ```text
//! key                                              value
//! "n:" agent 0x00 stream                           next expected seq (u64 BE)
//! "b:" agent 0x00 stream 0x00 first_seq (u64 BE)   a batch entry (ferry_protocol::entry),
//!                                                  file chunks stripped of their data
//! "f:" agent 0x00 stream 0x00 file_id              FileRecord (JSON)
//! "g:" agent 0x00 stream 0x00 from (u64 BE)        Gap (JSON): seqs that never arrived
//! "a:" agent                                       AgentRecord (JSON): the fleet registry
//! ```
//! `STORE/files/AGENT/STREAM/FILE_ID` holds the bytes of received files, written
//! at their offsets (all-zero chunks are left as holes).
//!
//! A batch entry over `INLINE_MAX` bytes lives in `STORE/segments/` (append-only
//! files, `ferry_transport::segments`) and its "b:" value is a `BatchRef` naming
//! it: sled keeps every value of a resident node in memory whatever its cache
//! size, so with large entries inline the exchange's memory grew with what it
//! stored. A crash between the segment write and the sled commit leaves bytes no
//! reference names at the end of a segment; they are never read.
//!
//! # Invariants
//! * A seq is stored at most once: admission ([`ferry_protocol::session::admit`])
//!   compares each batch with the stream's next expected seq, and the batch, the new
//!   next expected seq and any file state change are applied in one `apply_batch`.
//! * An ack is sent only after the group commit holding the batch is durable: file
//!   bytes fdatasynced first, then sled flushed and its files fdatasynced.
//! * A file is `complete` only when every byte arrived and its SHA-256 matches the
//!   digest the agent computed.

mod files;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_protocol::batch::{check_batch, decode_batch, encode_records, EncodedRecords};
use ferry_protocol::entry::{self, Decoded};
use ferry_protocol::messages::{Batch, Compression, Record, RecordList};
use ferry_protocol::session::{admit, Admission};
use ferry_transport::durable::Syncer;
use ferry_transport::segments::{BatchRef, Segments};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

pub use files::FileRecord;

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
}

/// Seqs `from ..= to` of a stream never arrived (seen when a later seq did).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub detected_unix_ms: u64,
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
    /// The last heartbeat, as JSON.
    pub status: Option<serde_json::Value>,
    /// Serial (hex) of the certificate the agent last connected with.
    #[serde(default)]
    pub cert_serial: String,
}

/// A batch received from `agent`, to be stored.
pub struct Incoming {
    pub agent: String,
    pub batch: Batch,
}

/// One stored record, for `records`.
pub struct StoredRecord {
    pub seq: u64,
    pub record: Record,
}

pub struct Store {
    dir: PathBuf,
    files_dir: PathBuf,
    db: sled::Db,
    segments: Segments,
    syncer: Mutex<Syncer>,
    next: Mutex<HashMap<(String, String), u64>>,
    hashers: Mutex<files::Hashers>,
}

/// Entries larger than this go to segment files.
const INLINE_MAX: usize = 16 * 1024;

fn key(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn seq_key(prefix: &[u8], agent: &str, stream: &str, seq: u64) -> Vec<u8> {
    let mut k = key(prefix, &[agent, stream]);
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db_dir = dir.join("db");
        let files_dir = dir.join("files");
        std::fs::create_dir_all(&files_dir).map_err(|source| StoreError::Io {
            dir: dir.to_path_buf(),
            what: "creating the files directory".into(),
            source,
        })?;
        for name in ferry_transport::durable::clear_torn_snapshots(&db_dir).map_err(|source| {
            StoreError::Io {
                dir: db_dir.clone(),
                what: "clearing a torn sled snapshot".into(),
                source,
            }
        })? {
            warn!(file = %name, "removed a snapshot file a crash left half-written");
        }
        let db = sled::Config::new()
            .path(&db_dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Sled {
                dir: db_dir.clone(),
                source,
            })?;
        let syncer = Syncer::open(&db_dir).map_err(|source| StoreError::Io {
            dir: db_dir.clone(),
            what: "opening the log for syncing".into(),
            source,
        })?;
        let segments = Segments::open(&dir.join("segments")).map_err(|source| StoreError::Io {
            dir: dir.to_path_buf(),
            what: "opening the segment files".into(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files_dir,
            db,
            segments,
            syncer: Mutex::new(syncer),
            next: Mutex::new(HashMap::new()),
            hashers: Mutex::new(files::Hashers::default()),
        })
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            dir: self.dir.clone(),
            source,
        }
    }

    /// The next seq the store expects from `agent` on `stream` (1 for a new stream).
    pub fn next_expected(&self, agent: &str, stream: &str) -> Result<u64, StoreError> {
        if let Some(n) = self
            .next
            .lock()
            .ok()
            .and_then(|m| m.get(&(agent.to_string(), stream.to_string())).copied())
        {
            return Ok(n);
        }
        let v = self
            .db
            .get(key(b"n:", &[agent, stream]))
            .map_err(|e| self.sled_err(e))?;
        Ok(match v {
            Some(v) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                u64::from_be_bytes(b)
            }
            Some(_) => return Err(StoreError::Damaged(format!("next seq of {agent}/{stream}"))),
            None => 1,
        })
    }

    /// Stores a group of batches with one sync. Returns, per batch, the cumulative
    /// ack for its stream (or why it was refused).
    pub fn commit_group(&self, items: &[Incoming]) -> Vec<Result<u64, StoreError>> {
        let mut results: Vec<Result<u64, StoreError>> = Vec::with_capacity(items.len());
        let mut staged: HashMap<(String, String), u64> = HashMap::new();
        let mut batch = sled::Batch::default();
        let mut writes = files::GroupWrites::default();
        let mut entries: Vec<(Vec<u8>, u64, u32, Vec<u8>)> = Vec::new();
        let now = now_unix_ms();
        for item in items {
            let b = &item.batch;
            let k = (item.agent.clone(), b.stream.clone());
            let next = match staged.get(&k) {
                Some(&n) => n,
                None => match self.next_expected(&item.agent, &b.stream) {
                    Ok(n) => n,
                    Err(e) => {
                        results.push(Err(e));
                        continue;
                    }
                },
            };
            let (skip, gap_from) = match admit(next, b.first_seq, b.record_count) {
                Admission::Duplicate => {
                    results.push(Ok(next - 1));
                    continue;
                }
                Admission::Store { skip, gap_from } => (skip, gap_from),
            };
            let first = b.first_seq + u64::from(skip);
            let invalid = |e: ferry_protocol::batch::BatchError| {
                StoreError::Invalid(format!("stream {} seq {}: {e}", b.stream, b.first_seq))
            };
            // Lines and rows are stored as they arrived once checked; only file
            // records (written out here) and partly duplicated batches are decoded.
            let has_files = match check_batch(b) {
                Ok(c) => c.has_files,
                Err(e) => {
                    results.push(Err(invalid(e)));
                    continue;
                }
            };
            let encoded = if skip == 0 && !has_files {
                EncodedRecords {
                    record_count: b.record_count,
                    compression: Compression::try_from(b.compression).unwrap_or(Compression::None),
                    raw_len: b.raw_len,
                    payload: b.payload.clone(),
                }
            } else {
                let list = match decode_batch(b) {
                    Ok(l) => l,
                    Err(e) => {
                        results.push(Err(invalid(e)));
                        continue;
                    }
                };
                let mut records: Vec<Record> =
                    list.records.into_iter().skip(skip as usize).collect();
                if has_files {
                    let dir = self.files_dir.join(&item.agent).join(&b.stream);
                    if let Err(e) = writes.apply(
                        &dir,
                        &item.agent,
                        &b.stream,
                        first,
                        &mut records,
                        &mut batch,
                        self,
                    ) {
                        results.push(Err(e));
                        continue;
                    }
                }
                match encode_records(&RecordList { records }) {
                    Ok(e) => e,
                    Err(e) => {
                        results.push(Err(StoreError::Invalid(e.to_string())));
                        continue;
                    }
                }
            };
            let last = first + u64::from(encoded.record_count) - 1;
            entries.push((
                seq_key(b"b:", &item.agent, &b.stream, first),
                first,
                encoded.record_count,
                entry::encode(first, &encoded, now),
            ));
            if let Some(from) = gap_from {
                let gap = Gap {
                    from,
                    to: b.first_seq - 1,
                    detected_unix_ms: now,
                };
                warn!(agent = %item.agent, stream = %b.stream, from, to = gap.to, "seq gap: these records never arrived");
                if let Ok(v) = serde_json::to_vec(&gap) {
                    batch.insert(seq_key(b"g:", &item.agent, &b.stream, from), v);
                }
            }
            batch.insert(
                key(b"n:", &[&item.agent, &b.stream]),
                &(last + 1).to_be_bytes()[..],
            );
            staged.insert(k, last + 1);
            results.push(Ok(last));
        }
        if let Err(e) = self
            .place_entries(entries, &mut batch)
            .and_then(|()| self.make_durable(batch, &mut writes))
        {
            error!(error = %e, "store commit failed; the batches will be retried by their agents");
            if let Ok(mut h) = self.hashers.lock() {
                h.forget(writes.touched());
            }
            // sled may have applied part of the group before the sync failed: re-read
            // these streams' next seq from the database rather than trust the cache.
            if let Ok(mut n) = self.next.lock() {
                for k in staged.keys() {
                    n.remove(k);
                }
            }
            let msg = e.to_string();
            return items
                .iter()
                .map(|_| Err(StoreError::Damaged(msg.clone())))
                .collect();
        }
        if let Ok(mut n) = self.next.lock() {
            n.extend(staged);
        }
        writes.after_commit();
        results
    }

    /// Puts each entry in the sled batch: small ones inline, large ones into
    /// segment files (durable when this returns) with a reference in sled.
    fn place_entries(
        &self,
        entries: Vec<(Vec<u8>, u64, u32, Vec<u8>)>,
        batch: &mut sled::Batch,
    ) -> Result<(), StoreError> {
        let placed = self
            .segments
            .place(entries, INLINE_MAX)
            .map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                what: "writing batch entries to segment files".into(),
                source,
            })?;
        for (k, v) in placed {
            batch.insert(k, v);
        }
        Ok(())
    }

    fn make_durable(
        &self,
        batch: sled::Batch,
        writes: &mut files::GroupWrites,
    ) -> Result<(), StoreError> {
        writes.sync().map_err(|source| StoreError::Io {
            dir: self.files_dir.clone(),
            what: "syncing received file data".into(),
            source,
        })?;
        self.db.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.close()
    }

    /// Records of a stream from seq `from` on, in seq order.
    pub fn records(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        mut each: impl FnMut(StoredRecord, u64) -> bool,
    ) -> Result<(), StoreError> {
        let lo = seq_key(b"b:", agent, stream, 0);
        let hi = seq_key(b"b:", agent, stream, u64::MAX);
        // Start at the batch holding `from`.
        let start = self
            .db
            .range(lo.clone()..=seq_key(b"b:", agent, stream, from))
            .next_back()
            .transpose()
            .map_err(|e| self.sled_err(e))?
            .map_or(lo, |(k, _)| k.to_vec());
        for kv in self.db.range(start..=hi) {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let external;
            let bytes: &[u8] = match BatchRef::parse(&v) {
                Some(r) => {
                    external = self.segments.read(&r.loc).map_err(|e| {
                        StoreError::Damaged(format!(
                            "entry {k:?}: segments/{:016x}.seg ({} bytes at offset {}) cannot be read: {e}",
                            r.loc.segment, r.loc.len, r.loc.offset
                        ))
                    })?;
                    &external
                }
                None => &v,
            };
            let stored = match entry::decode(bytes) {
                Decoded::Valid(b) => b,
                Decoded::Corrupted { reason } | Decoded::FailedDeserialization { reason } => {
                    return Err(StoreError::Damaged(format!("entry {k:?}: {reason}")))
                }
            };
            let list = ferry_protocol::batch::decode_records(
                stored.compression as i32,
                stored.raw_len,
                stored.record_count,
                &stored.payload,
            )
            .map_err(|e| StoreError::Damaged(format!("entry {k:?}: {e}")))?;
            for (i, record) in list.records.into_iter().enumerate() {
                let seq = stored.first_seq + i as u64;
                if seq >= from && !each(StoredRecord { seq, record }, stored.stamp_unix_ms) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    pub fn file(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<Option<FileRecord>, StoreError> {
        files::get(self, agent, stream, file_id)
    }

    pub fn files(&self, agent: &str, stream: &str) -> Result<Vec<FileRecord>, StoreError> {
        files::list(self, agent, stream)
    }

    pub fn file_path(&self, agent: &str, stream: &str, file_id: &str) -> PathBuf {
        self.files_dir.join(agent).join(stream).join(file_id)
    }

    pub fn gaps(&self, agent: &str, stream: &str) -> Result<Vec<Gap>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(key(b"g:", &[agent, stream, ""])) {
            let (_, v) = kv.map_err(|e| self.sled_err(e))?;
            if let Ok(g) = serde_json::from_slice(&v) {
                out.push(g);
            }
        }
        Ok(out)
    }

    /// Updates the fleet registry (not synced: it is rebuilt by the next heartbeat).
    pub fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(rec).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.db
            .insert(key(b"a:", &[&rec.agent_id]), v)
            .map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    pub fn agent(&self, agent: &str) -> Result<Option<AgentRecord>, StoreError> {
        let v = self
            .db
            .get(key(b"a:", &[agent]))
            .map_err(|e| self.sled_err(e))?;
        Ok(v.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"a:") {
            let (_, v) = kv.map_err(|e| self.sled_err(e))?;
            if let Ok(a) = serde_json::from_slice(&v) {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Makes everything written so far durable (also the last step of a commit).
    pub fn close(&self) -> Result<(), StoreError> {
        let mut s = self
            .syncer
            .lock()
            .map_err(|_| StoreError::Damaged("sync lock poisoned".into()))?;
        s.sync(&self.db).map_err(|source| StoreError::Io {
            dir: self.dir.clone(),
            what: "syncing the database".into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests;
