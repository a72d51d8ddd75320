//! The durable buffer: every captured change lives here from the moment its source
//! is told "durable" until the exchange acknowledged it.
//!
//! # Layout (one sled tree)
//!
//! ```text
//! key                                   value
//! "b:" stream 0x00 first_seq(u64 BE)    a batch entry (see entry.rs): crc32c, header,
//!                                       the compressed RecordList exactly as sent;
//!                                       or, for entries over INLINE_MAX bytes,
//!                                       'L' locator(20) first_seq(u64 BE) count(u32 BE)
//!                                       naming the entry in `segments/`
//! "p:" stream                           the source's position after its last batch
//! "h:" stream                           head: highest durable seq (u64 BE); committer only
//! "a:" stream                           acked: every seq <= it was acknowledged (u64 BE);
//!                                       written only on acks
//! "l:" stream 0x00 from(u64 BE)         to (u64 BE): seqs `from..=to` were durable once
//!                                       but lost to damage; written only by `salvage`
//! "r:" stream 0x00 file_id              (empty): the exchange rejected this file (its
//!                                       SHA-256 did not match); synced before the ack
//!                                       that reported it moves the watermark, removed
//!                                       once the source no longer lists the file
//! "i:"                                  the buffer's incarnation id (32 hex digits),
//!                                       random, written when the buffer is created,
//!                                       carried over by `salvage`
//! ```
//! Head and acked live under separate keys because different tasks write them
//! concurrently; neither write may carry a stale copy of the other.
//!
//! Large entries live in append-only segment files (`ferry_transport::segments`)
//! because sled keeps every value of a resident node in memory whatever its cache
//! size: with them inline an agent's memory grew with what it buffered. Small
//! entries (the low-latency path) stay inline, so a commit of a few lines costs one
//! sync, not two.
//!
//! # Invariants
//! * A batch, its stream's new head and the source position after it are written in
//!   ONE `apply_batch`, so after any crash either all three exist or none does.
//! * A commit is acknowledged to the source only after `flush()` **and** an fdatasync
//!   of sled's files: sled 0.34's `flush()` issues only `sync_file_range`, which
//!   neither flushes the device cache nor persists file size, and it never syncs its
//!   `blobs/` files. `ferry_transport::durable::Syncer` closes that gap.
//! * Per stream, seqs are dense: buffered batches cover `acked+1 ..= head` without
//!   holes. Opening checks this and every checksum, and refuses a damaged buffer.
//! * Batches are removed only after an ack; removal needs no sync, because a batch
//!   that reappears after a crash is re-sent and dropped by the exchange's dedup.
//!   A segment file is deleted only after the removals that emptied it were synced
//!   (by the next group commit or `close`), so a batch that reappears always finds
//!   its bytes.
//! * An external entry's bytes are fdatasync'd before the sled write that names
//!   them: a durable locator never points at bytes that may vanish.
//! * A failed write or sync poisons the buffer for this process: sled's memory may
//!   then hold a head and a source position the disk does not, and Linux reports
//!   a writeback error only once, so a later sync would succeed over lost pages.
//!   Nothing more is committed; the agent exits and restarts from what is on disk
//!   (as PostgreSQL does since 2018). Deleting an emptied segment file after a
//!   good sync is not a commit failure: it is retried after the next one.
//! * The incarnation id tells this buffer from a wiped, reinstalled or replaced
//!   one: the exchange never merges a new buffer's seqs into an old one's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ferry_adapters::Committed;
use ferry_protocol::batch::EncodedRecords;
use ferry_transport::durable::Syncer;
use ferry_transport::segments::{BatchRef, Locator, Segments};
use tracing::warn;

use ferry_protocol::entry::{self, Decoded, StoredBatch};

mod salvage;
pub use salvage::salvage;

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer at {dir}: {source}")]
    Sled {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("buffer at {dir}: making a commit durable failed: {source}")]
    Sync {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("buffer at {dir} is damaged: {detail}. The agent refuses to start so that nothing is lost; `ferry-agent salvage --config FILE` recovers every intact batch and reports what it cannot")]
    Damaged { dir: PathBuf, detail: String },
    #[error("buffer at {0}: an earlier write or sync failed in this process; the agent must restart from what is on disk")]
    Poisoned(PathBuf),
}

/// What the buffer knows about one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Highest seq durable in the buffer (0: none yet).
    pub head: u64,
    /// Every seq `<= acked` was acknowledged by the exchange.
    pub acked: u64,
    pub batches: u64,
    pub bytes: u64,
}

/// One unit for [`Buffer::commit_group`].
pub struct CommitItem<'a> {
    pub stream: &'a str,
    pub records: Option<&'a EncodedRecords>,
    pub position: &'a [u8],
}

/// Entries larger than this go to segment files.
const INLINE_MAX: usize = 16 * 1024;

/// A stored batch value: the entry itself, or where it is.
enum Stored<'a> {
    Inline(&'a [u8]),
    External {
        loc: Locator,
        first: u64,
        count: u32,
    },
}

impl<'a> Stored<'a> {
    fn parse(v: &'a [u8]) -> Self {
        match BatchRef::parse(v) {
            Some(r) => Stored::External {
                loc: r.loc,
                first: r.first_seq,
                count: r.record_count,
            },
            None => Stored::Inline(v),
        }
    }

    /// The seqs covered, from what sled holds alone.
    fn seq_range(&self) -> Option<(u64, u64)> {
        match self {
            Stored::Inline(v) => entry::seq_range(v),
            Stored::External { first, count, .. } => {
                (*count > 0).then(|| (*first, first + u64::from(*count) - 1))
            }
        }
    }

    /// Bytes of the entry itself (what `max_size` counts).
    fn entry_len(&self) -> u64 {
        match self {
            Stored::Inline(v) => v.len() as u64,
            Stored::External { loc, .. } => u64::from(loc.len),
        }
    }
}

pub struct Buffer {
    dir: PathBuf,
    db: sled::Db,
    segments: Segments,
    /// Segments emptied by acks, deleted after the next sync.
    doomed: Mutex<Vec<u64>>,
    syncer: Mutex<Syncer>,
    streams: Mutex<BTreeMap<String, StreamState>>,
    /// Each stream's last durable source position: what `p:` holds once the
    /// sync after its write returned, published with the heads (readers never
    /// see a position before it is durable, nor ahead of its seqs).
    positions: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Per stream: seqs lost to damage, `from → to` (see `salvage`).
    lost: Mutex<BTreeMap<String, BTreeMap<u64, u64>>>,
    total_bytes: AtomicU64,
    incarnation: String,
    poisoned: std::sync::atomic::AtomicBool,
    /// (stream, file id) the exchange rejected; see `r:` keys.
    rejected: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// This process owns the directory while the buffer is open (last: let go
    /// after the database).
    _dir_lock: ferry_transport::durable::DirLock,
}

fn rejected_key(stream: &str, file_id: &str) -> Vec<u8> {
    [b"r:", stream.as_bytes(), &[0], file_id.as_bytes()].concat()
}

/// The key of the buffer's incarnation id.
const INCARNATION_KEY: &[u8] = b"i:";

/// A fresh incarnation id: 128 random bits, hex.
pub fn new_incarnation() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn batch_key(stream: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + stream.len() + 8);
    k.extend_from_slice(b"b:");
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn lost_key(stream: &str, from: u64) -> Vec<u8> {
    let mut k = batch_key(stream, from);
    k[0] = b'l';
    k
}

fn prefixed(prefix: &[u8], stream: &str) -> Vec<u8> {
    [prefix, stream.as_bytes()].concat()
}

fn read_u64(v: &[u8]) -> Option<u64> {
    let b: [u8; 8] = v.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

impl Buffer {
    /// Opens (or creates) the buffer and checks every entry.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, BufferError> {
        let sled_err = |source| BufferError::Sled {
            dir: dir.to_path_buf(),
            source,
        };
        let sync_err = |source| BufferError::Sync {
            dir: dir.to_path_buf(),
            source,
        };
        let (dir_lock, torn) = ferry_transport::durable::own_dir(dir).map_err(sync_err)?;
        for name in torn {
            warn!(file = %name, "removed a snapshot file a crash left half-written");
        }
        let db = ferry_transport::durable::open_sled(
            &sled::Config::new()
                .path(dir)
                .cache_capacity(cache_bytes)
                // Batches are committed and synced explicitly; a background flusher
                // would only add writes.
                .flush_every_ms(None),
        )
        .map_err(|e| match e {
            sled::Error::Corruption { .. } => BufferError::Damaged {
                dir: dir.to_path_buf(),
                detail: e.to_string(),
            },
            e => sled_err(e),
        })?;
        let syncer = Syncer::open(dir).map_err(sync_err)?;
        let segments = Segments::open(&dir.join("segments")).map_err(sync_err)?;
        let stored = db.get(INCARNATION_KEY).map_err(sled_err)?;
        let created = stored.is_none();
        let incarnation = match stored {
            Some(v) => String::from_utf8(v.to_vec())
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 64)
                .ok_or_else(|| BufferError::Damaged {
                    dir: dir.to_path_buf(),
                    detail: "the incarnation id is not readable".into(),
                })?,
            None => {
                let id = new_incarnation();
                db.insert(INCARNATION_KEY, id.as_bytes())
                    .map_err(sled_err)?;
                id
            }
        };
        let buffer = Buffer {
            dir: dir.to_path_buf(),
            db,
            segments,
            doomed: Mutex::new(Vec::new()),
            syncer: Mutex::new(syncer),
            streams: Mutex::new(BTreeMap::new()),
            positions: Mutex::new(BTreeMap::new()),
            lost: Mutex::new(BTreeMap::new()),
            total_bytes: AtomicU64::new(0),
            incarnation,
            poisoned: std::sync::atomic::AtomicBool::new(false),
            rejected: Mutex::new(Default::default()),
            _dir_lock: dir_lock,
        };
        for kv in buffer.db.scan_prefix(b"p:") {
            let (k, v) = kv.map_err(sled_err)?;
            let stream = String::from_utf8_lossy(&k[2..]).into_owned();
            if let Ok(mut p) = buffer.positions.lock() {
                p.insert(stream, v.to_vec());
            }
        }
        for kv in buffer.db.scan_prefix(b"r:") {
            let (k, _) = kv.map_err(sled_err)?;
            let rest = &k[2..];
            if let Some(nul) = rest.iter().position(|&b| b == 0) {
                let stream = String::from_utf8_lossy(&rest[..nul]).into_owned();
                let file = String::from_utf8_lossy(&rest[nul + 1..]).into_owned();
                if let Ok(mut r) = buffer.rejected.lock() {
                    r.insert((stream, file));
                }
            }
        }
        buffer.scan()?;
        // A new id must be durable before any seq is shipped under it; an
        // existing one already is, and opening needs no sync of its own.
        if created {
            buffer.sync()?;
        }
        Ok(buffer)
    }

    /// The buffer's incarnation id (see the module doc).
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// Records, durably, files the exchange rejected (the ack that named them is
    /// applied only after this returns, so a crash cannot lose the rejection
    /// while keeping the ack).
    pub fn record_rejected(&self, stream: &str, file_ids: &[String]) -> Result<(), BufferError> {
        let mut batch = sled::Batch::default();
        for f in file_ids {
            batch.insert(rejected_key(stream, f), &[][..]);
        }
        let written = self
            .db
            .apply_batch(batch)
            .map_err(|e| self.sled_err(e))
            .and_then(|()| self.sync());
        if written.is_err() {
            self.poisoned.store(true, Ordering::SeqCst);
        }
        written?;
        if let Ok(mut r) = self.rejected.lock() {
            for f in file_ids {
                r.insert((stream.to_string(), f.clone()));
            }
        }
        Ok(())
    }

    /// Whether a write or sync failed in this process.
    pub fn poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    fn damaged(&self, detail: String) -> BufferError {
        BufferError::Damaged {
            dir: self.dir.clone(),
            detail,
        }
    }

    fn sled_err(&self, source: sled::Error) -> BufferError {
        BufferError::Sled {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Rebuilds per-stream state and verifies checksums and seq density.
    fn scan(&self) -> Result<(), BufferError> {
        let mut streams: BTreeMap<String, StreamState> = BTreeMap::new();
        for (prefix, is_head) in [(&b"h:"[..], true), (&b"a:"[..], false)] {
            for kv in self.db.scan_prefix(prefix) {
                let (k, v) = kv.map_err(|e| self.sled_err(e))?;
                let name = String::from_utf8_lossy(&k[2..]).into_owned();
                let n = read_u64(&v).ok_or_else(|| {
                    self.damaged(format!("stream {name}: metadata of {} bytes", v.len()))
                })?;
                let st = streams.entry(name).or_default();
                if is_head {
                    st.head = n;
                } else {
                    st.acked = n;
                }
            }
        }
        let lost = self.read_lost(&streams)?;
        let skip = |name: &str, mut want: u64| {
            if let Some(l) = lost.get(name) {
                while let Some(&to) = l.get(&want) {
                    want = to + 1;
                }
            }
            want
        };
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        let mut total = 0;
        for kv in self.db.scan_prefix(b"b:") {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let Some(nul) = k.iter().position(|&b| b == 0) else {
                return Err(self.damaged("a batch key without a stream separator".into()));
            };
            let name = String::from_utf8_lossy(&k[2..nul]).into_owned();
            let stored = Stored::parse(&v);
            let acked = streams.get(&name).map_or(0, |s| s.acked);
            // An ack's removal is not synced, so batches at or below `acked` may
            // reappear after a crash: they are harmless and dropped here (before
            // their bytes are looked for: their segment may be gone).
            if stored.seq_range().is_some_and(|(_, last)| last <= acked) {
                let _ = self.db.remove(&k);
                continue;
            }
            let external;
            let bytes: &[u8] = match &stored {
                Stored::Inline(v) => v,
                Stored::External { loc, first, .. } => {
                    external = self.segments.read(loc).map_err(|e| {
                        self.damaged(format!(
                            "stream {name}, batch at seq {first}: its segment file (segments/{:016x}.seg, {} bytes at offset {}) cannot be read: {e}",
                            loc.segment, loc.len, loc.offset
                        ))
                    })?;
                    &external
                }
            };
            let batch = match entry::verify(bytes) {
                Decoded::Valid(b) => b,
                Decoded::Corrupted { reason } | Decoded::FailedDeserialization { reason } => {
                    return Err(self.damaged(format!(
                        "stream {name}, batch entry {:?}: {reason}",
                        &k[nul + 1..]
                    )))
                }
            };
            let st = streams.get_mut(&name).ok_or_else(|| {
                self.damaged(format!("stream {name} has batches but no metadata"))
            })?;
            if let Stored::External { loc, first, count } = &stored {
                if (*first, *count) != (batch.first_seq, batch.record_count) {
                    return Err(self.damaged(format!(
                        "stream {name}: the locator of seq {first} names an entry of seq {}",
                        batch.first_seq
                    )));
                }
                self.segments
                    .retain(loc)
                    .map_err(|e| self.damaged(e.to_string()))?;
            }
            let start = lost
                .get(&name)
                .and_then(|l| l.keys().next().copied())
                .map_or(batch.first_seq, |f| f.min(batch.first_seq));
            let want = expected.entry(name.clone()).or_insert(start);
            *want = skip(&name, *want);
            if batch.first_seq != *want {
                return Err(self.damaged(format!(
                    "stream {name}: batch starts at seq {} where {} was expected",
                    batch.first_seq, want
                )));
            }
            *want = batch.last_seq() + 1;
            st.batches += 1;
            st.bytes += stored.entry_len();
            total += stored.entry_len();
        }
        self.segments
            .remove_unreferenced()
            .map_err(|source| BufferError::Sync {
                dir: self.dir.clone(),
                source,
            })?;
        for (name, st) in &streams {
            let next = expected
                .get(name)
                .copied()
                .or_else(|| lost.get(name).and_then(|l| l.keys().next().copied()));
            if let Some(next) = next.map(|n| skip(name, n)) {
                if next != st.head + 1 {
                    return Err(self.damaged(format!(
                        "stream {name}: batches end at seq {} but the head is {}",
                        next - 1,
                        st.head
                    )));
                }
            }
        }
        self.total_bytes.store(total, Ordering::Relaxed);
        if let Ok(mut s) = self.streams.lock() {
            *s = streams;
        }
        if let Ok(mut l) = self.lost.lock() {
            *l = lost;
        }
        Ok(())
    }

    /// Lost ranges above each stream's acked watermark (others are dropped).
    fn read_lost(
        &self,
        streams: &BTreeMap<String, StreamState>,
    ) -> Result<BTreeMap<String, BTreeMap<u64, u64>>, BufferError> {
        let mut lost: BTreeMap<String, BTreeMap<u64, u64>> = BTreeMap::new();
        for kv in self.db.scan_prefix(b"l:") {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let parsed = k.iter().position(|&b| b == 0).and_then(|nul| {
                let name = String::from_utf8_lossy(&k[2..nul]).into_owned();
                Some((name, read_u64(&k[nul + 1..])?, read_u64(&v)?))
            });
            let Some((name, from, to)) = parsed else {
                return Err(self.damaged(format!("a lost-range record {k:?} is malformed")));
            };
            if to <= streams.get(&name).map_or(0, |s| s.acked) {
                let _ = self.db.remove(&k);
                continue;
            }
            lost.entry(name).or_default().insert(from, to);
        }
        Ok(lost)
    }

    /// Every range lost to damage, per stream.
    pub fn lost_ranges(&self) -> BTreeMap<String, Vec<(u64, u64)>> {
        self.lost
            .lock()
            .map(|l| {
                l.iter()
                    .map(|(n, r)| (n.clone(), r.iter().map(|(&a, &b)| (a, b)).collect()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn state(&self, stream: &str) -> StreamState {
        self.streams
            .lock()
            .ok()
            .and_then(|s| s.get(stream).copied())
            .unwrap_or_default()
    }

    pub fn states(&self) -> BTreeMap<String, StreamState> {
        self.streams.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// The last durable position of a stream's source.
    pub fn position(&self, stream: &str) -> Result<Option<Vec<u8>>, BufferError> {
        let p = self
            .positions
            .lock()
            .map_err(|_| self.damaged("buffer position lock poisoned".into()))?;
        Ok(p.get(stream).cloned())
    }

    /// Writes every item atomically per item, then makes them all durable with one
    /// sync (group commit). Returns the seqs given to each item's records.
    pub fn commit_group(
        &self,
        items: &[CommitItem<'_>],
    ) -> Result<Vec<Option<Committed>>, BufferError> {
        if self.poisoned() {
            return Err(BufferError::Poisoned(self.dir.clone()));
        }
        let result = self.commit_group_inner(items);
        if result.is_err() {
            self.poisoned.store(true, Ordering::SeqCst);
        }
        result
    }

    fn commit_group_inner(
        &self,
        items: &[CommitItem<'_>],
    ) -> Result<Vec<Option<Committed>>, BufferError> {
        // Only the committer calls this, so heads cannot move underneath it; the lock
        // is not held during the write and sync, so the shipper and acks go on.
        let mut heads: BTreeMap<String, StreamState> = BTreeMap::new();
        {
            let streams = self
                .streams
                .lock()
                .map_err(|_| self.damaged("buffer state lock poisoned".into()))?;
            for item in items {
                let st = streams.get(item.stream).copied().unwrap_or_default();
                heads.entry(item.stream.to_string()).or_insert(StreamState {
                    batches: 0,
                    bytes: 0,
                    ..st
                });
            }
        }
        let mut out = Vec::with_capacity(items.len());
        let mut added = 0u64;
        let mut batch = sled::Batch::default();
        let stamp = ferry_adapters::now_unix_ms();
        // Entries first; the large ones then go to segment files (durable before
        // the sled write that names them).
        let mut placed_entries = Vec::new();
        for item in items {
            let st = heads.entry(item.stream.to_string()).or_default();
            let committed = item.records.map(|rec| {
                let first = st.head + 1;
                st.head += u64::from(rec.record_count);
                let value = entry::encode(first, rec, stamp);
                st.batches += 1;
                st.bytes += value.len() as u64;
                added += value.len() as u64;
                placed_entries.push((
                    batch_key(item.stream, first),
                    first,
                    rec.record_count,
                    value,
                ));
                Committed {
                    first_seq: first,
                    last_seq: st.head,
                }
            });
            batch.insert(prefixed(b"p:", item.stream), item.position);
            batch.insert(prefixed(b"h:", item.stream), &st.head.to_be_bytes()[..]);
            out.push(committed);
        }
        ferry_transport::failpoint::hit("agent-before-segment-append").map_err(|source| {
            BufferError::Sync {
                dir: self.dir.clone(),
                source,
            }
        })?;
        let placed = self
            .segments
            .place(placed_entries, INLINE_MAX)
            .map_err(|source| BufferError::Sync {
                dir: self.dir.clone(),
                source,
            })?;
        for (k, v) in placed {
            batch.insert(k, v);
        }
        // Segments emptied by acks before this point: their removals are made
        // durable by the sync below, after which the files may go.
        let doomed = self
            .doomed
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        // One apply_batch for the whole group: each item's batch, position and
        // metadata are in it together, so they become visible (and durable) together.
        let written = self
            .db
            .apply_batch(batch)
            .map_err(|e| self.sled_err(e))
            .and_then(|()| {
                ferry_transport::failpoint::hit("agent-after-apply-before-sync").map_err(|source| {
                    BufferError::Sync {
                        dir: self.dir.clone(),
                        source,
                    }
                })
            })
            .and_then(|()| self.sync());
        if let Err(e) = written {
            // The removals that emptied them are not known durable: keep them
            // (the buffer is poisoned anyway; a restart rescans the segments).
            if let Ok(mut d) = self.doomed.lock() {
                d.extend(doomed);
            }
            return Err(e);
        }
        ferry_transport::failpoint::hit("agent-after-sync-before-answer").map_err(|source| {
            BufferError::Sync {
                dir: self.dir.clone(),
                source,
            }
        })?;
        self.delete_segments_or_retry(doomed);
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| self.damaged("buffer state lock poisoned".into()))?;
        let mut positions = self
            .positions
            .lock()
            .map_err(|_| self.damaged("buffer position lock poisoned".into()))?;
        for (name, delta) in heads {
            let st = streams.entry(name).or_default();
            st.head = delta.head;
            st.batches += delta.batches;
            st.bytes += delta.bytes;
        }
        // In item order: the last item of a stream holds its newest position.
        for item in items {
            positions.insert(item.stream.to_string(), item.position.to_vec());
        }
        self.total_bytes.fetch_add(added, Ordering::Relaxed);
        Ok(out)
    }

    fn sync(&self) -> Result<(), BufferError> {
        let mut syncer = self
            .syncer
            .lock()
            .map_err(|_| self.damaged("sync lock poisoned".into()))?;
        syncer.sync(&self.db).map_err(|source| BufferError::Sync {
            dir: self.dir.clone(),
            source,
        })
    }

    /// The buffered batch holding `seq`, if any.
    pub fn batch_at(&self, stream: &str, seq: u64) -> Result<Option<StoredBatch>, BufferError> {
        let lo = batch_key(stream, 0);
        let hi = batch_key(stream, seq);
        let Some(kv) = self.db.range(lo..=hi).next_back() else {
            return Ok(None);
        };
        let (_, v) = kv.map_err(|e| self.sled_err(e))?;
        let external;
        let bytes: &[u8] = match Stored::parse(&v) {
            Stored::Inline(v) => v,
            Stored::External { loc, .. } => {
                external = self.segments.read(&loc).map_err(|e| {
                    self.damaged(format!(
                        "stream {stream}, batch holding seq {seq}: segments/{:016x}.seg cannot be read: {e}",
                        loc.segment
                    ))
                })?;
                &external
            }
        };
        match entry::decode(bytes) {
            Decoded::Valid(b) if b.last_seq() >= seq => Ok(Some(b)),
            Decoded::Valid(_) => Ok(None),
            Decoded::Corrupted { reason } | Decoded::FailedDeserialization { reason } => Err(self
                .damaged(format!(
                    "stream {stream}, batch holding seq {seq}: {reason}"
                ))),
        }
    }

    /// Drops every batch of `stream` fully covered by `up_to`. Returns bytes freed.
    pub fn ack(&self, stream: &str, up_to: u64) -> Result<u64, BufferError> {
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| self.damaged("buffer state lock poisoned".into()))?;
        let st = streams.entry(stream.to_string()).or_default();
        if up_to <= st.acked {
            return Ok(0);
        }
        let mut batch = sled::Batch::default();
        let mut freed = 0u64;
        let mut removed = 0u64;
        let mut released = Vec::new();
        let mut acked = st.acked;
        for kv in self
            .db
            .range(batch_key(stream, 0)..batch_key(stream, up_to + 1))
        {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let stored = Stored::parse(&v);
            let Some((_, last)) = stored.seq_range() else {
                continue;
            };
            if last > up_to {
                break;
            }
            acked = last;
            freed += stored.entry_len();
            removed += 1;
            if let Stored::External { loc, .. } = stored {
                released.push(loc);
            }
            batch.remove(k);
        }
        // The exchange only ever acks whole batches; a watermark inside a batch keeps
        // that batch until the rest of it is acked.
        // A lost range is acknowledged like a batch: the exchange's ack of a later
        // seq covers it (the exchange recorded it as a gap).
        if let Ok(mut l) = self.lost.lock() {
            if let Some(ranges) = l.get_mut(stream) {
                let done: Vec<(u64, u64)> = ranges
                    .range(..=up_to)
                    .filter(|(_, &to)| to <= up_to)
                    .map(|(&f, &t)| (f, t))
                    .collect();
                for (from, to) in done {
                    ranges.remove(&from);
                    batch.remove(lost_key(stream, from));
                    acked = acked.max(to);
                }
            }
        }
        let new_acked = st.acked.max(acked);
        batch.insert(prefixed(b"a:", stream), &new_acked.to_be_bytes()[..]);
        self.db.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        st.acked = new_acked;
        st.batches -= removed.min(st.batches);
        st.bytes -= freed.min(st.bytes);
        // Only now are the entries gone from sled: a segment whose last reference
        // is released may be deleted after the next sync.
        let emptied: Vec<u64> = released
            .iter()
            .filter_map(|loc| self.segments.release(loc))
            .collect();
        if !emptied.is_empty() {
            if let Ok(mut d) = self.doomed.lock() {
                d.extend(emptied);
            }
        }
        self.total_bytes
            .fetch_sub(freed.min(self.total_bytes()), Ordering::Relaxed);
        Ok(freed)
    }

    /// Deletes emptied segment files after a good sync; one that cannot be
    /// deleted now is not a commit failure: it is tried again after the next sync
    /// (and an unreferenced segment is removed at the next open anyway).
    fn delete_segments_or_retry(&self, ids: Vec<u64>) {
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.delete_segments(ids.clone()) {
            warn!(dir = %self.dir.display(), error = %e, "could not delete emptied segment files; trying again after the next commit");
            if let Ok(mut d) = self.doomed.lock() {
                d.extend(ids);
            }
        }
    }

    fn delete_segments(&self, ids: Vec<u64>) -> Result<(), BufferError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.segments
            .delete(&ids)
            .map_err(|source| BufferError::Sync {
                dir: self.dir.clone(),
                source,
            })
    }

    /// Bytes in segment files on disk.
    #[cfg(test)]
    pub fn segment_bytes(&self) -> u64 {
        self.segments.disk_bytes()
    }

    /// Free bytes for unprivileged writers on the buffer's filesystem, if known.
    pub fn free_disk_bytes(&self) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is a valid C string and `st` a buffer statvfs fills.
        let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        // SAFETY: statvfs returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        // fsblkcnt_t and c_ulong are 32 bits on some targets.
        #[allow(clippy::useless_conversion)]
        let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
        Some(avail.saturating_mul(frsize))
    }

    /// Flushes and syncs before shutdown; deletes segments acks emptied.
    pub fn close(&self) -> Result<(), BufferError> {
        let doomed = self
            .doomed
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        self.sync()?;
        self.delete_segments_or_retry(doomed);
        Ok(())
    }
}

impl ferry_adapters::RejectedFiles for Buffer {
    fn is_rejected(&self, stream: &str, file_id: &str) -> bool {
        self.rejected
            .lock()
            .is_ok_and(|r| r.contains(&(stream.to_string(), file_id.to_string())))
    }

    fn forget(&self, stream: &str, file_id: &str) {
        if let Ok(mut r) = self.rejected.lock() {
            r.remove(&(stream.to_string(), file_id.to_string()));
        }
        // Not synced: a rejection that reappears after a crash names a file the
        // source no longer lists, and is forgotten again.
        let _ = self.db.remove(rejected_key(stream, file_id));
    }
}

#[cfg(test)]
mod tests;
