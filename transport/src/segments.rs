//! Large values beside sled, in append-only segment files.
//!
//! sled 0.34 keeps every value of a resident tree node in memory, and values above
//! a quarter of its segment size go to blob files whose size its cache does not
//! count: `cache_capacity` then bounds nothing. Measured: an agent that buffered
//! 390 MiB of poorly compressible lines while the exchange was down held 309 MiB
//! resident with an 8 MiB cache. So large values live here instead and sled holds
//! a 20-byte [`Locator`].
//!
//! # Layout
//!
//! ```text
//! DIR/0000000000000001.seg   values appended back to back, nothing else
//! DIR/0000000000000002.seg   ← the active segment: the only one ever written
//! ```
//!
//! # Invariants
//! * A value is durable when [`Segments::append`] returns: its bytes are
//!   fdatasync'd, and a segment created for it is in a synced directory. Whoever
//!   stores its locator (in sled) does so afterwards, so a durable locator never
//!   points at bytes that may vanish.
//! * Segments are never appended to after a restart: a crash may leave bytes no
//!   locator names at the end of the last one; they are never read.
//! * A segment is deleted only when no value in it is referenced any more
//!   ([`Segments::release`]) **and** the caller made that release durable: it
//!   collects the segment ids and deletes them with [`Segments::delete`] after its
//!   next sync, so a crash cannot resurrect a locator into a deleted file.
//! * Values carry their own checksum (the batch entry format); this module only
//!   moves bytes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A segment is closed once it holds this much; the next value opens a new one.
pub const SEGMENT_MAX: u64 = 64 << 20;

/// Where a value is: segment id, offset, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

impl Locator {
    pub const ENCODED_LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..16].copy_from_slice(&self.offset.to_be_bytes());
        out[16..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(Locator {
            segment: u64::from_be_bytes(b[..8].try_into().ok()?),
            offset: u64::from_be_bytes(b[8..16].try_into().ok()?),
            len: u32::from_be_bytes(b[16..].try_into().ok()?),
        })
    }
}

/// What a store keeps in sled for a batch entry that lives in a segment: a tag
/// byte no entry starts with (entries start with their version, 1), the locator,
/// and the seqs the entry covers, so acks and scans need not read the segment.
///
/// ```text
/// 'L' | locator (20) | first_seq u64 BE | record_count u32 BE
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRef {
    pub loc: Locator,
    pub first_seq: u64,
    pub record_count: u32,
}

impl BatchRef {
    const TAG: u8 = b'L';
    pub const ENCODED_LEN: usize = 1 + Locator::ENCODED_LEN + 8 + 4;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::ENCODED_LEN);
        v.push(Self::TAG);
        v.extend_from_slice(&self.loc.encode());
        v.extend_from_slice(&self.first_seq.to_be_bytes());
        v.extend_from_slice(&self.record_count.to_be_bytes());
        v
    }

    /// `None` when `v` is not a reference (an inline entry).
    pub fn parse(v: &[u8]) -> Option<Self> {
        if v.len() != Self::ENCODED_LEN || v[0] != Self::TAG {
            return None;
        }
        let at = 1 + Locator::ENCODED_LEN;
        Some(BatchRef {
            loc: Locator::decode(&v[1..at])?,
            first_seq: u64::from_be_bytes(v[at..at + 8].try_into().ok()?),
            record_count: u32::from_be_bytes(v[at + 8..].try_into().ok()?),
        })
    }
}

struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    next_id: u64,
    /// Per segment: values still referenced.
    live: BTreeMap<u64, u64>,
    /// Open files of segments read from (the active one included).
    files: BTreeMap<u64, Arc<File>>,
}

pub struct Segments {
    dir: PathBuf,
    state: Mutex<State>,
}

fn segment_id(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn poisoned() -> io::Error {
    io::Error::other("segment state lock poisoned")
}

impl Segments {
    /// Opens (or creates) `dir`. Call [`Self::retain`] for every stored locator,
    /// then [`Self::remove_unreferenced`].
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let mut max = 0;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if let Some(id) = e.file_name().to_str().and_then(segment_id) {
                max = max.max(id);
            }
        }
        Ok(Segments {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                next_id: max + 1,
                ..State::default()
            }),
        })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.seg"))
    }

    /// Counts a stored reference to `loc` (at open, while scanning).
    pub fn retain(&self, loc: &Locator) -> io::Result<()> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        *st.live.entry(loc.segment).or_default() += 1;
        Ok(())
    }

    /// Deletes the segments no locator refers to (after the scan at open).
    /// Returns how many were removed.
    pub fn remove_unreferenced(&self) -> io::Result<usize> {
        let st = self.state.lock().map_err(|_| poisoned())?;
        let mut removed = 0;
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let Some(id) = e.file_name().to_str().and_then(segment_id) else {
                continue;
            };
            if !st.live.contains_key(&id) {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Appends values to the active segment (opening a new one as needed) and makes
    /// them durable. Returns their locators, in order.
    pub fn append(&self, values: &[&[u8]]) -> io::Result<Vec<Locator>> {
        let mut touched: Vec<Arc<File>> = Vec::new();
        let mut created = false;
        let mut out = Vec::with_capacity(values.len());
        {
            let mut st = self.state.lock().map_err(|_| poisoned())?;
            for v in values {
                let len = u32::try_from(v.len())
                    .map_err(|_| io::Error::other("value larger than 4 GiB"))?;
                let rotate = st.active.as_ref().is_none_or(|a| a.len >= SEGMENT_MAX);
                if rotate {
                    let id = st.next_id;
                    st.next_id += 1;
                    let file = Arc::new(
                        OpenOptions::new()
                            .create_new(true)
                            .read(true)
                            .write(true)
                            .open(self.path(id))?,
                    );
                    // A full segment that is already empty is not deleted here:
                    // the releases that emptied it may not be durable yet. Its id
                    // went to the caller with the last release (see `delete`).
                    st.files.insert(id, Arc::clone(&file));
                    st.active = Some(Active { id, file, len: 0 });
                    created = true;
                }
                let Some(a) = st.active.as_mut() else {
                    return Err(io::Error::other("no active segment"));
                };
                a.file.write_all_at(v, a.len)?;
                out.push(Locator {
                    segment: a.id,
                    offset: a.len,
                    len,
                });
                a.len += u64::from(len);
                if !touched.iter().any(|f| Arc::ptr_eq(f, &a.file)) {
                    touched.push(Arc::clone(&a.file));
                }
                let id = a.id;
                *st.live.entry(id).or_default() += 1;
            }
        }
        // Outside the lock: readers go on while the disk syncs.
        for f in &touched {
            f.sync_data()?;
        }
        if created {
            sync_dir(&self.dir)?;
        }
        Ok(out)
    }

    /// Places batch entries for a sled write: entries over `inline_max` bytes are
    /// appended here (durable when this returns) and replaced by their
    /// [`BatchRef`]; the others stay as they are. Takes `(key, first_seq,
    /// record_count, entry)`; returns `(key, value)` to insert, in order.
    pub fn place(
        &self,
        entries: Vec<(Vec<u8>, u64, u32, Vec<u8>)>,
        inline_max: usize,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let large: Vec<&[u8]> = entries
            .iter()
            .filter(|e| e.3.len() > inline_max)
            .map(|e| e.3.as_slice())
            .collect();
        let mut locs = if large.is_empty() {
            Vec::new()
        } else {
            self.append(&large)?
        }
        .into_iter();
        let mut out = Vec::with_capacity(entries.len());
        for (key, first_seq, record_count, value) in entries {
            if value.len() > inline_max {
                let loc = locs
                    .next()
                    .ok_or_else(|| io::Error::other("a segment write returned too few locators"))?;
                let r = BatchRef {
                    loc,
                    first_seq,
                    record_count,
                };
                out.push((key, r.encode()));
            } else {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// Reads a value back.
    pub fn read(&self, loc: &Locator) -> io::Result<Vec<u8>> {
        let file = {
            let mut st = self.state.lock().map_err(|_| poisoned())?;
            match st.files.get(&loc.segment) {
                Some(f) => Arc::clone(f),
                None => {
                    let f = Arc::new(File::open(self.path(loc.segment))?);
                    st.files.insert(loc.segment, Arc::clone(&f));
                    f
                }
            }
        };
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset)?;
        Ok(buf)
    }

    /// Drops one reference to `loc`. Returns the segment's id when nothing in it is
    /// referenced any more: delete it with [`Self::delete`] once this release is
    /// durable.
    pub fn release(&self, loc: &Locator) -> Option<u64> {
        let mut st = self.state.lock().ok()?;
        let n = st.live.get_mut(&loc.segment)?;
        *n = n.saturating_sub(1);
        (*n == 0).then_some(loc.segment)
    }

    /// Deletes segments [`Self::release`] emptied, unless one was referenced again
    /// since. An emptied active segment goes too (the next value opens a new one),
    /// so a drained buffer gives its disk space back. Call it from the thread that
    /// appends.
    pub fn delete(&self, ids: &[u64]) -> io::Result<()> {
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        for &id in ids {
            if st.live.get(&id).copied().unwrap_or(0) > 0 {
                continue;
            }
            if st.active.as_ref().is_some_and(|a| a.id == id) {
                st.active = None;
            }
            st.live.remove(&id);
            st.files.remove(&id);
            match std::fs::remove_file(self.path(id)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Bytes in segment files (for status and tests).
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn values_round_trip_and_segments_go_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let s = Segments::open(dir.path()).unwrap();
        let big = vec![7u8; SEGMENT_MAX as usize];
        let locs = s.append(&[&big, b"small", &big]).unwrap();
        assert_eq!(s.read(&locs[1]).unwrap(), b"small");
        assert_eq!(s.read(&locs[0]).unwrap(), big);
        // The first segment is full after one value: the next ones open another.
        assert_ne!(locs[0].segment, locs[1].segment);
        assert_eq!(locs[1].segment, locs[2].segment);
        let doomed = s.release(&locs[0]).unwrap();
        s.delete(&[doomed]).unwrap();
        assert!(s.read(&locs[0]).is_err());
        // The active segment goes too once all of it is released.
        assert_eq!(s.release(&locs[1]), None);
        let active = s.release(&locs[2]).unwrap();
        assert_eq!(s.read(&locs[2]).unwrap(), big);
        s.delete(&[active]).unwrap();
        assert!(s.read(&locs[2]).is_err());
        let next = s.append(&[b"after"]).unwrap()[0];
        assert_ne!(next.segment, locs[2].segment);
        assert_eq!(s.read(&next).unwrap(), b"after");
    }

    #[test]
    fn reopening_never_appends_to_an_old_segment_and_drops_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let kept = {
            let s = Segments::open(dir.path()).unwrap();
            let a = s.append(&[b"one"]).unwrap()[0];
            s.append(&[&vec![1u8; SEGMENT_MAX as usize]]).unwrap();
            s.append(&[b"three"]).unwrap();
            a
        };
        let s = Segments::open(dir.path()).unwrap();
        s.retain(&kept).unwrap();
        assert_eq!(s.remove_unreferenced().unwrap(), 1);
        assert_eq!(s.read(&kept).unwrap(), b"one");
        let next = s.append(&[b"four"]).unwrap()[0];
        assert!(next.segment > kept.segment + 1);
        assert_eq!(Locator::decode(&next.encode()), Some(next));
    }
}
