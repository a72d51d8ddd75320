//! The embedded backend: sled and files under `[store] dir`, no server needed.
//!
//! # Layout
//! `STORE/db` is a sled database with one tree:
//! ```text
//! key                                              value
//! "n:" agent 0x00 stream                           next expected seq (u64 BE)
//! "b:" agent 0x00 stream 0x00 first_seq (u64 BE)   a batch entry (ferry_protocol::entry),
//!                                                  file chunks stripped of their data
//! "f:" agent 0x00 stream 0x00 file_id              FileRecord (JSON)
//! "g:" agent 0x00 stream 0x00 from (u64 BE)        Gap (JSON): seqs the agent declared lost
//! "m:" agent 0x00 stream 0x00 seq (u64 BE)         file id: a file whose bytes did not match
//!                                                  its SHA-256, completed at `seq`
//! "s:" agent 0x00 stream                           StreamMeta (JSON): buffer incarnation,
//!                                                  offset, hold, accepted boundaries
//! "a:" agent                                       AgentRecord (JSON): the fleet registry
//! "u:" user name                                   User (JSON): a user of the exchange
//! "l:" seq (u64 BE)                                AuditEntry (JSON): the audit log
//! ```
//! `STORE/files/AGENT/STREAM/FILE_ID` holds the bytes of received files, written
//! at their offsets (all-zero chunks are left as holes).
//!
//! A batch entry over `INLINE_MAX` (512) bytes lives in `STORE/segments/`
//! (append-only files, `ferry_transport::segments`) and its "b:" value is a
//! `BatchRef` naming it: sled keeps every value of a resident node in memory
//! whatever its cache size, and writes a node grown large as a blob file of its
//! own. With entries up to 16 KiB inline, a fleet of 1,000 agents sending
//! 100-line batches (3.5–7 KiB each) made the exchange grow to 1.1 GiB and its
//! committer open every blob file at each sync; with only references in sled it
//! stays under 200 MiB at the same 300,000 records/s (BENCHMARKS.md). A crash
//! between the segment write and the sled commit leaves bytes no reference
//! names at the end of a segment; they are never read.
//!
//! # Invariants
//! * A seq is stored at most once: admission ([`ferry_protocol::session::admit`])
//!   compares each batch with the stream's next expected seq, and the batch, the new
//!   next expected seq and any file state change are applied in one `apply_batch`.
//! * Nothing is stored past a missing seq: a batch that does not continue the
//!   stream is refused, and once one batch of a stream is refused in a group, every
//!   later one of that stream in the group is too. Only a `Lost` declaration from
//!   the agent moves the next seq past seqs that never arrived (a `g:` record).
//! * Only durable state is ever reported: the cache of next seqs is filled after
//!   the group commit, and a cache miss reads sled under the commit lock, so a
//!   `Welcome` never acknowledges what a later failed sync could take back.
//! * A failed sync poisons the store for this process ([`Store::poisoned`]): the
//!   kernel reports a writeback error once, so a retried fdatasync would succeed
//!   over lost pages. The server exits and its supervisor restarts it from disk.
//! * An ack is sent only after the group commit holding the batch is durable: file
//!   bytes fdatasynced first, then sled flushed and its files fdatasynced.
//! * A file is `complete` only when every byte arrived and its SHA-256 matches the
//!   digest the agent computed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_protocol::batch::{check_batch, decode_batch, encode_records, EncodedRecords};
use ferry_protocol::entry::{self, Decoded};
use ferry_protocol::messages::{Batch, Compression, Lost, Record, RecordList, StreamDecl};
use ferry_protocol::session::{admit, admit_loss, Admission, LossAdmission, StreamPlan};
use ferry_transport::durable::Syncer;
use ferry_transport::segments::{BatchRef, Segments};
use tracing::{error, warn};

use super::*;

mod files;
mod users;

pub struct Embedded {
    dir: PathBuf,
    files_dir: PathBuf,
    db: sled::Db,
    segments: Segments,
    syncer: Mutex<Syncer>,
    /// Next expected seq per (agent, stream), durable values only.
    next: Mutex<HashMap<(String, String), u64>>,
    hashers: Mutex<files::Hashers>,
    /// Held by the committer from its first write to the end of its sync, and by
    /// readers of state that is not in `next`: they never see an unsynced write.
    commit_lock: Mutex<()>,
    poisoned: std::sync::atomic::AtomicBool,
    /// Bumped after every durable commit ([`Ledger::subscribe`]).
    commits: tokio::sync::watch::Sender<u64>,
    /// Held by an audit append from reading the last entry to the end of its
    /// sync: one appender at a time, so the chain never forks.
    audit_lock: Mutex<()>,
    /// This process owns the store while it is open (last: let go after the
    /// database).
    _dir_lock: ferry_transport::durable::DirLock,
}

/// Entries larger than this go to segment files (see the module doc): only
/// a batch of a line or two is kept inline, where its reference would be
/// nearly as large as itself.
const INLINE_MAX: usize = 512;

pub(super) fn key(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

pub(super) fn seq_key(prefix: &[u8], agent: &str, stream: &str, seq: u64) -> Vec<u8> {
    let mut k = key(prefix, &[agent, stream]);
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// When an entry was stored, from its header.
fn entry_stamp(k: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    match entry::decode(bytes) {
        Decoded::Valid(b) => Ok(b.stamp_unix_ms),
        Decoded::Corrupted { reason } | Decoded::FailedDeserialization { reason } => {
            Err(StoreError::Damaged(format!("entry {k:?}: {reason}")))
        }
    }
}

impl Embedded {
    /// Counts every stored reference into the segment files and deletes the
    /// segments none refers to, so [`Ledger::trim`] can release them. Reads
    /// every batch key; done at start only where retention is configured.
    pub fn count_segment_references(&self) -> Result<usize, StoreError> {
        for kv in self.db.scan_prefix(b"b:") {
            let (_, v) = kv.map_err(|e| self.sled_err(e))?;
            if let Some(r) = BatchRef::parse(&v) {
                self.segments
                    .retain(&r.loc)
                    .map_err(|source| StoreError::Io {
                        dir: self.dir.clone(),
                        what: "counting segment references".into(),
                        source,
                    })?;
            }
        }
        self.segments
            .remove_unreferenced()
            .map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                what: "removing unreferenced segment files".into(),
                source,
            })
    }

    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db_dir = dir.join("db");
        let files_dir = dir.join("files");
        std::fs::create_dir_all(&files_dir).map_err(|source| StoreError::Io {
            dir: dir.to_path_buf(),
            what: "creating the files directory".into(),
            source,
        })?;
        let (dir_lock, torn) =
            ferry_transport::durable::own_dir(&db_dir).map_err(|source| StoreError::Io {
                dir: db_dir.clone(),
                what: "taking the store's lock and clearing torn sled snapshots".into(),
                source,
            })?;
        for name in torn {
            warn!(file = %name, "removed a snapshot file a crash left half-written");
        }
        let db = ferry_transport::durable::open_sled(
            &sled::Config::new()
                .path(&db_dir)
                .cache_capacity(cache_bytes)
                .flush_every_ms(None),
        )
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
            commit_lock: Mutex::new(()),
            poisoned: std::sync::atomic::AtomicBool::new(false),
            commits: tokio::sync::watch::Sender::new(0),
            audit_lock: Mutex::new(()),
            _dir_lock: dir_lock,
        })
    }

    fn lock_commits(&self) -> Result<std::sync::MutexGuard<'_, ()>, StoreError> {
        self.commit_lock
            .lock()
            .map_err(|_| StoreError::Damaged("commit lock poisoned".into()))
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            dir: self.dir.clone(),
            source,
        }
    }

    fn cached_next(&self, agent: &str, stream: &str) -> Option<u64> {
        self.next
            .lock()
            .ok()
            .and_then(|m| m.get(&(agent.to_string(), stream.to_string())).copied())
    }

    /// The stored next seq; the caller holds the commit lock (or is the committer),
    /// so what sled holds is synced.
    fn next_synced(&self, agent: &str, stream: &str) -> Result<u64, StoreError> {
        if self.poisoned() {
            return Err(StoreError::Poisoned(self.dir.clone()));
        }
        if let Some(n) = self.cached_next(agent, stream) {
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

    /// Puts one batch into the group's write. `Ok(Some(last))`: stored up to
    /// `last`; `Ok(None)`: a duplicate; `Err`: refused, nothing of it staged.
    #[allow(clippy::too_many_arguments)]
    fn stage_batch(
        &self,
        agent: &str,
        b: &Batch,
        next: u64,
        now: u64,
        batch: &mut sled::Batch,
        writes: &mut files::GroupWrites,
        entries: &mut Vec<(Vec<u8>, u64, u32, Vec<u8>)>,
    ) -> Result<Option<u64>, StoreError> {
        let skip = match admit(next, b.first_seq, b.record_count) {
            Admission::Duplicate => return Ok(None),
            Admission::Store { skip } => skip,
            Admission::Ahead { expected } => {
                return Err(StoreError::Resend(format!(
                    "stream {} batch at seq {} does not continue at seq {expected}; resend from {expected}",
                    b.stream, b.first_seq
                )))
            }
        };
        let first = b.first_seq + u64::from(skip);
        let invalid = |e: ferry_protocol::batch::BatchError| {
            StoreError::Invalid(format!("stream {} seq {}: {e}", b.stream, b.first_seq))
        };
        // Lines and rows are stored as they arrived once checked; only file
        // records (written out here) and partly duplicated batches are decoded.
        let has_files = check_batch(b).map_err(invalid)?.has_files;
        let encoded = if skip == 0 && !has_files {
            EncodedRecords {
                record_count: b.record_count,
                compression: Compression::try_from(b.compression).unwrap_or(Compression::None),
                raw_len: b.raw_len,
                payload: b.payload.clone(),
            }
        } else {
            let list = decode_batch(b).map_err(invalid)?;
            let mut records: Vec<Record> = list.records.into_iter().skip(skip as usize).collect();
            if has_files {
                let dir = self.files_dir.join(agent).join(&b.stream);
                // File metadata goes into the group's write only if the whole
                // batch is taken: a refused batch leaves no trace.
                let meta = writes.apply(&dir, agent, &b.stream, first, &mut records, self)?;
                for (k, v) in meta {
                    batch.insert(k, v);
                }
            }
            encode_records(&RecordList { records })
                .map_err(|e| StoreError::Invalid(e.to_string()))?
        };
        let last = first + u64::from(encoded.record_count) - 1;
        entries.push((
            seq_key(b"b:", agent, &b.stream, first),
            first,
            encoded.record_count,
            entry::encode(first, &encoded, now),
        ));
        Ok(Some(last))
    }

    /// Records a declared loss as a gap. `Some(to)` when it moved the stream on.
    fn stage_loss(
        &self,
        agent: &str,
        l: &Lost,
        next: u64,
        now: u64,
        batch: &mut sled::Batch,
    ) -> Result<Option<u64>, StoreError> {
        match admit_loss(next, l.from_seq, l.to_seq) {
            LossAdmission::Duplicate => Ok(None),
            LossAdmission::Ahead { expected } => Err(StoreError::Resend(format!(
                "stream {} loss declared from seq {} does not continue at seq {expected}; resend from {expected}",
                l.stream, l.from_seq
            ))),
            LossAdmission::Record { from, to } => {
                let gap = Gap {
                    from,
                    to,
                    detected_unix_ms: now,
                    reason: l.reason.clone(),
                };
                warn!(agent, stream = %l.stream, from, to, reason = %l.reason, "ALARM: the agent declared these records lost");
                let v = serde_json::to_vec(&gap).map_err(|e| StoreError::Invalid(e.to_string()))?;
                batch.insert(seq_key(b"g:", agent, &l.stream, from), v);
                Ok(Some(to))
            }
        }
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
        ferry_transport::failpoint::hit("exchange-after-apply-before-sync").map_err(|source| {
            StoreError::Io {
                dir: self.dir.clone(),
                what: "syncing the database".into(),
                source,
            }
        })?;
        self.sync_now()
    }

    /// Writes a stream record and makes it durable (the caller holds the commit lock).
    fn put_stream_meta(
        &self,
        agent: &str,
        stream: &str,
        meta: &StreamMeta,
    ) -> Result<(), StoreError> {
        let v = serde_json::to_vec(meta).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.db
            .insert(key(b"s:", &[agent, stream]), v)
            .map_err(|e| self.sled_err(e))?;
        self.sync_or_poison()
    }

    fn sync_or_poison(&self) -> Result<(), StoreError> {
        self.sync_now().inspect_err(|_| {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::SeqCst);
        })
    }

    /// Makes everything written so far durable (also the last step of a commit).
    fn sync_now(&self) -> Result<(), StoreError> {
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

impl Ledger for Embedded {
    /// Whether a sync failed in this process (see the module doc).
    fn poisoned(&self) -> bool {
        self.poisoned.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The next seq the store expects from `agent` on `stream` (1 for a new
    /// stream); everything below it is durable.
    fn next_expected(&self, agent: &str, stream: &str) -> Result<u64, StoreError> {
        if let Some(n) = self.cached_next(agent, stream) {
            return Ok(n);
        }
        let _commits = self.lock_commits()?;
        self.next_synced(agent, stream)
    }

    /// Stores a group of batches and loss declarations with one sync. Returns,
    /// per item, the cumulative ack for its stream (or why it was not stored).
    fn commit_group(&self, items: &[Incoming]) -> Vec<Result<u64, StoreError>> {
        let _commits = match self.lock_commits() {
            Ok(g) => g,
            Err(e) => {
                let msg = e.to_string();
                return items
                    .iter()
                    .map(|_| Err(StoreError::Damaged(msg.clone())))
                    .collect();
            }
        };
        if self.poisoned() {
            return items
                .iter()
                .map(|_| Err(StoreError::Poisoned(self.dir.clone())))
                .collect();
        }
        let mut results: Vec<Result<u64, StoreError>> = Vec::with_capacity(items.len());
        let mut staged: HashMap<(String, String), u64> = HashMap::new();
        // Streams with a refused item in this group: their later items are refused
        // too, so nothing is ever stored past a seq that was not.
        let mut refused: HashMap<(String, String), u64> = HashMap::new();
        let mut batch = sled::Batch::default();
        let mut writes = files::GroupWrites::default();
        let mut entries: Vec<(Vec<u8>, u64, u32, Vec<u8>)> = Vec::new();
        let now = now_unix_ms();
        for item in items {
            let k = (item.agent.clone(), item.stream().to_string());
            if let Some(&expected) = refused.get(&k) {
                results.push(Err(StoreError::Resend(format!(
                    "stream {}: an earlier batch was not stored; resend from seq {expected}",
                    k.1
                ))));
                continue;
            }
            let next = match staged.get(&k) {
                Some(&n) => n,
                None => match self.next_synced(&item.agent, &k.1) {
                    Ok(n) => n,
                    Err(e) => {
                        refused.insert(k, 0);
                        results.push(Err(e));
                        continue;
                    }
                },
            };
            let stored = match &item.item {
                Item::Batch(b) => self.stage_batch(
                    &item.agent,
                    b,
                    next,
                    now,
                    &mut batch,
                    &mut writes,
                    &mut entries,
                ),
                Item::Lost(l) => self.stage_loss(&item.agent, l, next, now, &mut batch),
            };
            match stored {
                Ok(Some(last)) => {
                    batch.insert(
                        key(b"n:", &[&item.agent, &k.1]),
                        &(last + 1).to_be_bytes()[..],
                    );
                    staged.insert(k, last + 1);
                    results.push(Ok(last));
                }
                Ok(None) => results.push(Ok(next - 1)),
                Err(e) => {
                    refused.insert(k, next);
                    results.push(Err(e));
                }
            }
        }
        if let Err(e) = self
            .place_entries(entries, &mut batch)
            .and_then(|()| self.make_durable(batch, &mut writes))
        {
            // sled's memory may now hold what the disk does not, and the kernel
            // reports a writeback error only once: nothing this process reads or
            // writes from here on can be trusted. The server exits on this.
            self.poisoned
                .store(true, std::sync::atomic::Ordering::SeqCst);
            error!(error = %e, "ALARM: store commit failed; the store is unusable until the exchange restarts from disk; the batches will be resent by their agents");
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
        self.commits.send_modify(|n| *n += 1);
        if let Err(e) = ferry_transport::failpoint::hit("exchange-after-sync-before-ack") {
            // Durable but not acknowledged: the agent resends and the exchange
            // acks it as a duplicate.
            let msg = e.to_string();
            return items
                .iter()
                .map(|_| Err(StoreError::Damaged(msg.clone())))
                .collect();
        }
        results
    }

    /// Judges a declared stream for `Welcome` (see `ferry_protocol::session::continuity`):
    /// a stream seen for the first time remembers its buffer's incarnation; a new
    /// incarnation or a buffer behind is held, durably, until an operator decides.
    fn plan_stream(&self, agent: &str, decl: &StreamDecl) -> Result<StreamPlan, StoreError> {
        let _commits = self.lock_commits()?;
        let next_seq = self.next_synced(agent, &decl.name)?;
        let mut meta = self.stream_meta(agent, &decl.name)?;
        let judged = meta.judge(next_seq, decl);
        if judged.newly_held {
            error!(agent, stream = %decl.name, reason = ?judged.held, "ALARM: stream held until an operator runs `ferry-exchange resolve`");
        }
        if judged.changed {
            self.put_stream_meta(agent, &decl.name, &meta)?;
        }
        let held = judged.held;
        Ok(StreamPlan {
            next_seq,
            offset: meta.offset,
            held,
        })
    }

    /// Holds a declared stream for `reason` (durably; a hold already there is kept).
    fn hold(&self, agent: &str, decl: &StreamDecl, reason: &str) -> Result<(), StoreError> {
        let _commits = self.lock_commits()?;
        let mut meta = self.stream_meta(agent, &decl.name)?;
        if meta.hold.is_some() {
            return Ok(());
        }
        meta.hold = Some(Hold::of(decl, reason));
        self.put_stream_meta(agent, &decl.name, &meta)
    }

    /// An operator's decision on a held stream. Accepting continues the stream
    /// with the held buffer: its first unacknowledged seq becomes the stream's next
    /// seq, a boundary recorded; refusing keeps it held with the reason given.
    fn resolve(
        &self,
        agent: &str,
        stream: &str,
        decision: &Decision,
    ) -> Result<StreamMeta, StoreError> {
        let _commits = self.lock_commits()?;
        let next_seq = self.next_synced(agent, stream)?;
        let mut meta = self.stream_meta(agent, stream)?;
        meta.resolve(agent, stream, next_seq, decision)?;
        self.put_stream_meta(agent, stream, &meta)?;
        Ok(meta)
    }

    /// Every held stream: (agent, stream, hold).
    fn holds(&self) -> Result<Vec<(String, String, Hold)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"s:") {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let Ok(meta) = serde_json::from_slice::<StreamMeta>(&v) else {
                continue;
            };
            let Some(hold) = meta.hold else { continue };
            let rest = String::from_utf8_lossy(&k[2..]).into_owned();
            let (agent, stream) = rest.split_once('\0').unwrap_or((&rest, ""));
            out.push((agent.to_string(), stream.to_string(), hold));
        }
        Ok(out)
    }

    fn stream_meta(&self, agent: &str, stream: &str) -> Result<StreamMeta, StoreError> {
        let v = self
            .db
            .get(key(b"s:", &[agent, stream]))
            .map_err(|e| self.sled_err(e))?;
        match v {
            Some(v) => serde_json::from_slice(&v).map_err(|e| {
                StoreError::Damaged(format!("stream record of {agent}/{stream}: {e}"))
            }),
            None => Ok(StreamMeta::default()),
        }
    }

    /// Records of a stream from seq `from` on, in seq order.
    fn records(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        each: &mut dyn FnMut(StoredRecord, u64) -> bool,
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

    fn file(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<Option<FileRecord>, StoreError> {
        files::get(self, agent, stream, file_id)
    }

    fn files(&self, agent: &str, stream: &str) -> Result<Vec<FileRecord>, StoreError> {
        files::list(self, agent, stream)
    }

    /// The files completed at seqs `from ..= to` of a stream whose bytes did not
    /// match their SHA-256 (the agent must send them again).
    fn rejected_files(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .db
            .range(seq_key(b"m:", agent, stream, from)..=seq_key(b"m:", agent, stream, to))
        {
            let (_, v) = kv.map_err(|e| self.sled_err(e))?;
            out.push(String::from_utf8_lossy(&v).into_owned());
        }
        Ok(out)
    }

    fn gaps(&self, agent: &str, stream: &str) -> Result<Vec<Gap>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(key(b"g:", &[agent, stream, ""])) {
            let (_, v) = kv.map_err(|e| self.sled_err(e))?;
            if let Ok(g) = serde_json::from_slice(&v) {
                out.push(g);
            }
        }
        Ok(out)
    }

    fn streams(&self) -> Result<Vec<StreamInfo>, StoreError> {
        let _commits = self.lock_commits()?;
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"n:") {
            let (k, _) = kv.map_err(|e| self.sled_err(e))?;
            let rest = String::from_utf8_lossy(&k[2..]).into_owned();
            let Some((agent, stream)) = rest.split_once('\0') else {
                continue;
            };
            out.push(StreamInfo {
                agent: agent.to_string(),
                stream: stream.to_string(),
                next_seq: self.next_synced(agent, stream)?,
                meta: self.stream_meta(agent, stream)?,
            });
        }
        Ok(out)
    }

    fn open_file(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<Box<dyn std::io::Read + Send>, StoreError> {
        let path = self.files_dir.join(agent).join(stream).join(file_id);
        let f = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            dir: self.files_dir.clone(),
            what: format!("opening {}", path.display()),
            source,
        })?;
        Ok(Box::new(f))
    }

    fn trim(
        &self,
        agent: &str,
        stream: &str,
        below: u64,
        stored_before_ms: u64,
    ) -> Result<Trimmed, StoreError> {
        let _commits = self.lock_commits()?;
        if self.poisoned() {
            return Err(StoreError::Poisoned(self.dir.clone()));
        }
        let mut out = Trimmed {
            first_kept: self.next_synced(agent, stream)?,
            ..Trimmed::default()
        };
        let mut batch = sled::Batch::default();
        let mut released = Vec::new();
        let lo = seq_key(b"b:", agent, stream, 0);
        let hi = seq_key(b"b:", agent, stream, u64::MAX);
        for kv in self.db.range(lo..=hi) {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let reference = BatchRef::parse(&v);
            let (first, count, stamp) = match &reference {
                Some(r) => {
                    let bytes = self.segments.read(&r.loc).map_err(|e| {
                        StoreError::Damaged(format!(
                            "entry {k:?} in segment {}: {e}",
                            r.loc.segment
                        ))
                    })?;
                    (r.first_seq, r.record_count, entry_stamp(&k, &bytes)?)
                }
                None => {
                    let stamp = entry_stamp(&k, &v)?;
                    match entry::decode(&v) {
                        Decoded::Valid(b) => (b.first_seq, b.record_count, stamp),
                        _ => return Err(StoreError::Damaged(format!("entry {k:?}"))),
                    }
                }
            };
            let last = first + u64::from(count).saturating_sub(1);
            if last >= below || stamp >= stored_before_ms {
                out.first_kept = first;
                break;
            }
            batch.remove(k);
            out.records += u64::from(count);
            if let Some(r) = reference {
                released.push(r.loc);
            }
        }
        if out.records == 0 {
            return Ok(out);
        }
        // Files completed (or aborted) in the removed range go with it.
        let mut gone_files = Vec::new();
        for f in files::list(self, agent, stream)? {
            if f.seq != 0 && f.seq < out.first_kept {
                batch.remove(files::file_key(agent, stream, &f.file_id));
                gone_files.push(self.files_dir.join(agent).join(stream).join(&f.file_id));
            }
        }
        self.db.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.sync_or_poison()?;
        // Only once the removal is durable: segment bytes and file bytes.
        let emptied: Vec<u64> = released
            .iter()
            .filter_map(|loc| self.segments.release(loc))
            .collect();
        if let Err(e) = self.segments.delete(&emptied) {
            warn!(error = %e, "emptied segment files could not be deleted; they are retried at the next trim");
        }
        for p in gone_files {
            match std::fs::remove_file(&p) {
                Ok(()) => out.files += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %p.display(), error = %e, "a retained file could not be deleted")
                }
            }
        }
        Ok(out)
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.sync_now()
    }
}

impl Registry for Embedded {
    /// Updates the fleet registry (not synced: it is rebuilt by the next heartbeat).
    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(rec).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.db
            .insert(key(b"a:", &[&rec.agent_id]), v)
            .map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    fn agent(&self, agent: &str) -> Result<Option<AgentRecord>, StoreError> {
        let v = self
            .db
            .get(key(b"a:", &[agent]))
            .map_err(|e| self.sled_err(e))?;
        Ok(v.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"a:") {
            let (_, v) = kv.map_err(|e| self.sled_err(e))?;
            if let Ok(a) = serde_json::from_slice(&v) {
                out.push(a);
            }
        }
        Ok(out)
    }

    fn put_user(&self, user: &User) -> Result<(), StoreError> {
        users::put_user(self, user)
    }

    fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        users::user(self, name)
    }

    fn users(&self) -> Result<Vec<User>, StoreError> {
        users::users(self)
    }

    fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        users::remove_user(self, name)
    }

    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<AuditEntry, StoreError> {
        users::append_audit(self, actor, action, target, detail)
    }

    fn audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        users::audit(self, from_seq, limit)
    }
}

#[cfg(test)]
mod tests;
