//! `ferry-agent salvage`: recovers what is intact from a damaged buffer.
//!
//! Every batch entry carries a CRC32C, so each one is either intact or not. The
//! salvage copies the intact ones (and each stream's head, acked watermark and
//! source position) into a fresh buffer, records every damaged stretch as a lost
//! range (`l:` keys: the shipper declares them lost to the exchange, which records
//! them as a gap), keeps the buffer's incarnation id, then swaps the directories, keeping the damaged one
//! beside it for inspection. Nothing is dropped silently: every lost seq range is
//! in the report, by stream.
//!
//! A damaged entry's range runs from its key's seq to just before the next
//! batch's (or to the head for the last one): seqs are dense, so that is exactly
//! what it held, even when its own header is unreadable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_protocol::entry::{self, Decoded};
use ferry_transport::segments::Segments;
use serde::Serialize;

use super::{batch_key, lost_key, prefixed, read_u64, Buffer, BufferError, Stored};

/// What the salvage found for one stream.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct StreamSalvage {
    pub name: String,
    pub acked: u64,
    pub head: u64,
    pub intact_batches: u64,
    pub intact_records: u64,
    /// Seq ranges (inclusive) that were durable but are damaged beyond recovery.
    pub lost: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SalvageReport {
    pub streams: Vec<StreamSalvage>,
    /// Where the damaged buffer was moved.
    pub damaged_dir: PathBuf,
}

impl SalvageReport {
    pub fn lost_records(&self) -> u64 {
        self.streams
            .iter()
            .flat_map(|s| &s.lost)
            .map(|(a, b)| b - a + 1)
            .sum()
    }
}

struct Found {
    key_seq: u64,
    /// The verified entry, or why it is damaged.
    entry: Result<Vec<u8>, String>,
}

/// Salvages the buffer at `dir` (which must not be open). On success `dir` holds
/// the recovered buffer and the damaged one is at `report.damaged_dir`.
pub fn salvage(dir: &Path, cache_bytes: u64) -> Result<SalvageReport, BufferError> {
    let io = |source| BufferError::Sync {
        dir: dir.to_path_buf(),
        source,
    };
    let sled_err = |source| BufferError::Sled {
        dir: dir.to_path_buf(),
        source,
    };
    // Held to the end: the damaged directory is this process's alone.
    let (_dir_lock, _torn) = ferry_transport::durable::own_dir(dir).map_err(io)?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .open()
        .map_err(|e| BufferError::Damaged {
            dir: dir.to_path_buf(),
            detail: format!(
                "sled's own files cannot be opened ({e}), so no batch can be attributed to its stream; nothing was changed"
            ),
        })?;
    let segments = Segments::open(&dir.join("segments")).map_err(io)?;

    let mut meta: BTreeMap<String, StreamSalvage> = BTreeMap::new();
    let mut positions: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (prefix, which) in [(&b"h:"[..], 0), (&b"a:"[..], 1), (&b"p:"[..], 2)] {
        for kv in db.scan_prefix(prefix) {
            let (k, v) = kv.map_err(sled_err)?;
            let name = String::from_utf8_lossy(&k[2..]).into_owned();
            let st = meta.entry(name.clone()).or_insert_with(|| StreamSalvage {
                name: name.clone(),
                ..Default::default()
            });
            match which {
                0 => st.head = read_u64(&v).unwrap_or(0),
                1 => st.acked = read_u64(&v).unwrap_or(0),
                _ => {
                    positions.insert(name, v.to_vec());
                }
            }
        }
    }
    let mut old_lost: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for kv in db.scan_prefix(b"l:") {
        let (k, v) = kv.map_err(sled_err)?;
        let Some(nul) = k.iter().position(|&b| b == 0) else {
            continue;
        };
        let name = String::from_utf8_lossy(&k[2..nul]).into_owned();
        if let (Some(from), Some(to)) = (read_u64(&k[nul + 1..]), read_u64(&v)) {
            old_lost.entry(name).or_default().push((from, to));
        }
    }

    let mut found: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for kv in db.scan_prefix(b"b:") {
        let (k, v) = kv.map_err(sled_err)?;
        let Some(nul) = k.iter().position(|&b| b == 0) else {
            continue;
        };
        let name = String::from_utf8_lossy(&k[2..nul]).into_owned();
        let Some(key_seq) = read_u64(&k[nul + 1..]) else {
            continue;
        };
        let bytes = match Stored::parse(&v) {
            Stored::Inline(b) => Ok(b.to_vec()),
            Stored::External { loc, .. } => segments.read(&loc).map_err(|e| {
                format!(
                    "segments/{:016x}.seg, {} bytes at offset {}: {e}",
                    loc.segment, loc.len, loc.offset
                )
            }),
        };
        let entry = bytes.and_then(|b| match entry::verify(&b) {
            Decoded::Valid(batch) if batch.first_seq == key_seq => Ok(b),
            Decoded::Valid(batch) => Err(format!(
                "the entry under seq {key_seq} holds seq {}",
                batch.first_seq
            )),
            Decoded::Corrupted { reason } | Decoded::FailedDeserialization { reason } => {
                Err(reason)
            }
        });
        found
            .entry(name)
            .or_default()
            .push(Found { key_seq, entry });
    }
    // The salvaged buffer is the same buffer to the exchange: it keeps the id
    // (an unreadable one gets a new id, and the exchange holds its streams).
    let incarnation = db.get(super::INCARNATION_KEY).ok().flatten();
    drop(db);

    // The new buffer, beside the old one.
    let fresh_dir = sibling(dir, "salvaged");
    if fresh_dir.exists() {
        std::fs::remove_dir_all(&fresh_dir).map_err(io)?;
    }
    let fresh = Buffer::open(&fresh_dir, cache_bytes)?;
    let mut batch = sled::Batch::default();
    if let Some(id) = incarnation {
        batch.insert(super::INCARNATION_KEY, id);
    }
    let mut intact: Vec<(Vec<u8>, u64, u32, Vec<u8>)> = Vec::new();
    for (name, st) in meta.iter_mut() {
        let entries = found.remove(name).unwrap_or_default();
        let mut lost: Vec<(u64, u64)> = old_lost.remove(name).unwrap_or_default();
        for (i, f) in entries.iter().enumerate() {
            let end = entries
                .get(i + 1)
                .map_or(st.head, |n| n.key_seq.saturating_sub(1));
            if end <= st.acked {
                continue;
            }
            match &f.entry {
                Ok(bytes) => {
                    let (first, last) = entry::seq_range(bytes).unwrap_or((f.key_seq, f.key_seq));
                    let count = u32::try_from(last + 1 - first).unwrap_or(u32::MAX);
                    st.intact_batches += 1;
                    st.intact_records += u64::from(count);
                    intact.push((batch_key(name, f.key_seq), first, count, bytes.clone()));
                }
                Err(why) => {
                    let from = f.key_seq.max(st.acked + 1);
                    tracing::error!(stream = %name, from, to = end, reason = %why, "batch damaged beyond recovery");
                    lost.push((from, end));
                }
            }
        }
        lost.sort_unstable();
        st.lost = merge(lost);
        for &(from, to) in &st.lost {
            batch.insert(lost_key(name, from), &to.to_be_bytes()[..]);
        }
        batch.insert(prefixed(b"h:", name), &st.head.to_be_bytes()[..]);
        batch.insert(prefixed(b"a:", name), &st.acked.to_be_bytes()[..]);
        if let Some(p) = positions.get(name) {
            batch.insert(prefixed(b"p:", name), p.clone());
        }
    }
    for (k, v) in fresh
        .segments
        .place(intact, super::INLINE_MAX)
        .map_err(io)?
    {
        batch.insert(k, v);
    }
    fresh.db.apply_batch(batch).map_err(|e| fresh.sled_err(e))?;
    fresh.close()?;
    drop(fresh);
    // The fresh buffer must open as a healthy one before it replaces the old.
    drop(Buffer::open(&fresh_dir, cache_bytes)?);

    let damaged_dir = sibling(dir, &format!("damaged-{}", crate::status::now_unix()));
    std::fs::rename(dir, &damaged_dir).map_err(io)?;
    std::fs::rename(&fresh_dir, dir).map_err(io)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(SalvageReport {
        streams: meta.into_values().collect(),
        damaged_dir,
    })
}

/// `dir` with `.suffix` appended to its name.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    dir.with_file_name(name)
}

/// Joins adjacent or overlapping ranges.
fn merge(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in sorted {
        match out.last_mut() {
            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}
