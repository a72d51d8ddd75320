//! Received files: chunk bytes written at their offsets, digest verified at the end.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_protocol::messages::{record::Body, Record};
use sha2::{Digest, Sha256};
use tracing::{error, info};

use super::{key, Embedded as Store};
use crate::store::{FileRecord, StoreError};

/// A sled key and value to write with the group.
pub(super) type KeyValue = (Vec<u8>, Vec<u8>);

pub(super) fn file_key(agent: &str, stream: &str, file_id: &str) -> Vec<u8> {
    key(b"f:", &[agent, stream, file_id])
}

pub(super) fn get(
    store: &Store,
    agent: &str,
    stream: &str,
    file_id: &str,
) -> Result<Option<FileRecord>, StoreError> {
    let v = store
        .db
        .get(file_key(agent, stream, file_id))
        .map_err(|e| store.sled_err(e))?;
    Ok(v.and_then(|v| serde_json::from_slice(&v).ok()))
}

pub(super) fn list(
    store: &Store,
    agent: &str,
    stream: &str,
) -> Result<Vec<FileRecord>, StoreError> {
    let mut out = Vec::new();
    for kv in store.db.scan_prefix(key(b"f:", &[agent, stream, ""])) {
        let (_, v) = kv.map_err(|e| store.sled_err(e))?;
        if let Ok(r) = serde_json::from_slice::<FileRecord>(&v) {
            out.push(r);
        }
    }
    out.sort_by_key(|r| r.seq);
    Ok(out)
}

/// Running SHA-256 of files whose chunks arrived contiguously from offset 0, so the
/// last chunk does not have to re-read the whole file. After a restart the state is
/// gone and the file is re-read once at the end.
#[derive(Default)]
pub(super) struct Hashers {
    map: HashMap<PathBuf, (Sha256, u64)>,
}

fn valid_file_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn sha256_of(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().to_vec());
        }
        h.update(&buf[..n]);
    }
}

/// File writes of one group commit.
#[derive(Default)]
pub(super) struct GroupWrites {
    open: HashMap<PathBuf, File>,
    new_dirs: HashSet<PathBuf>,
    staged: HashMap<Vec<u8>, FileRecord>,
    delete_after_commit: Vec<PathBuf>,
}

impl GroupWrites {
    fn file(&mut self, path: &Path) -> io::Result<&File> {
        if !self.open.contains_key(path) {
            let existed = path.exists();
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)?;
            if !existed {
                if let Some(d) = path.parent() {
                    self.new_dirs.insert(d.to_path_buf());
                }
            }
            self.open.insert(path.to_path_buf(), f);
        }
        self.open
            .get(path)
            .ok_or_else(|| io::Error::other("file handle vanished"))
    }

    /// Writes the chunks among `records` (seqs from `first_seq`) and strips their
    /// data, so the database keeps only metadata. Returns the file records to
    /// write with the batch; on an error nothing of this batch stays staged.
    pub(super) fn apply(
        &mut self,
        dir: &Path,
        agent: &str,
        stream: &str,
        first_seq: u64,
        records: &mut [Record],
        store: &Store,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let before = self.staged.clone();
        let mut meta = Vec::new();
        let r = self.apply_inner(dir, agent, stream, first_seq, records, &mut meta, store);
        if r.is_err() {
            self.staged = before;
        }
        r.map(|()| meta)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_inner(
        &mut self,
        dir: &Path,
        agent: &str,
        stream: &str,
        first_seq: u64,
        records: &mut [Record],
        batch: &mut Vec<KeyValue>,
        store: &Store,
    ) -> Result<(), StoreError> {
        let io_err = |what: String| {
            move |source| StoreError::Io {
                dir: dir.to_path_buf(),
                what,
                source,
            }
        };
        if !dir.is_dir() {
            // Every directory this creates must reach the disk with the first file
            // in it: fsync the parents of each new one (at the group's sync).
            let mut missing = Vec::new();
            let mut d = Some(dir);
            while let Some(p) = d.filter(|p| !p.exists()) {
                missing.push(p.to_path_buf());
                d = p.parent();
            }
            std::fs::create_dir_all(dir)
                .map_err(io_err("creating the stream's file directory".into()))?;
            for m in missing {
                if let Some(parent) = m.parent() {
                    self.new_dirs.insert(parent.to_path_buf());
                }
            }
        }
        for (i, r) in records.iter_mut().enumerate() {
            let seq = first_seq + i as u64;
            match &mut r.body {
                Some(Body::FileChunk(c)) => {
                    if !valid_file_id(&c.file_id) || c.path.is_empty() {
                        return Err(StoreError::Invalid(format!(
                            "seq {seq}: file chunk with file id {:?} and path {:?}",
                            c.file_id, c.path
                        )));
                    }
                    let fkey = file_key(agent, stream, &c.file_id);
                    let mut rec = match self.staged.remove(&fkey) {
                        Some(r) => r,
                        None => {
                            get(store, agent, stream, &c.file_id)?.unwrap_or_else(|| FileRecord {
                                file_id: c.file_id.clone(),
                                path: c.path.clone(),
                                status: "receiving".into(),
                                ..Default::default()
                            })
                        }
                    };
                    let path = dir.join(&c.file_id);
                    let end_off = c.offset + c.data.len() as u64;
                    {
                        let f = self
                            .file(&path)
                            .map_err(io_err(format!("opening {}", path.display())))?;
                        // All-zero chunks stay holes: sparse files stay sparse.
                        ferry_transport::failpoint::hit("exchange-file-chunk-write")
                            .map_err(io_err(format!("writing {}", path.display())))?;
                        if c.data.iter().any(|&b| b != 0) {
                            f.write_all_at(&c.data, c.offset)
                                .map_err(io_err(format!("writing {}", path.display())))?;
                        }
                    }
                    if let Ok(mut h) = store.hashers.lock() {
                        match h.map.get_mut(&path) {
                            Some((hasher, next)) if *next == c.offset => {
                                hasher.update(&c.data);
                                *next = end_off;
                            }
                            None if c.offset == 0 => {
                                let mut hasher = Sha256::new();
                                hasher.update(&c.data);
                                h.map.insert(path.clone(), (hasher, end_off));
                            }
                            _ => {
                                h.map.remove(&path);
                            }
                        }
                    }
                    rec.received = rec.received.max(end_off);
                    if let Some(end) = &c.end {
                        // The declared size is where the last chunk ends: a size
                        // taken on trust (a 10 TiB sparse file) would have the
                        // committer size and hash it while every agent waits.
                        if end.size != end_off {
                            return Err(StoreError::Invalid(format!(
                                "seq {seq}: file {:?} declares {} bytes but its last chunk ends at byte {end_off}",
                                c.path, end.size
                            )));
                        }
                        let f = self
                            .file(&path)
                            .map_err(io_err(format!("opening {}", path.display())))?;
                        f.set_len(end.size)
                            .map_err(io_err(format!("sizing {}", path.display())))?;
                        let running = store
                            .hashers
                            .lock()
                            .ok()
                            .and_then(|mut h| h.map.remove(&path));
                        let digest = match running {
                            Some((hasher, next)) if next == end.size => hasher.finalize().to_vec(),
                            _ => sha256_of(&path)
                                .map_err(io_err(format!("hashing {}", path.display())))?,
                        };
                        rec.size = end.size;
                        rec.sha256 = hex::encode(&end.sha256);
                        rec.seq = seq;
                        if digest == end.sha256 {
                            rec.status = "complete".into();
                            info!(agent, stream, path = %c.path, size = end.size, "file received");
                        } else {
                            rec.status = "sha256-mismatch".into();
                            rec.reason =
                                Some(format!("received bytes hash to {}", hex::encode(&digest)));
                            error!(agent, stream, path = %c.path, file_id = %c.file_id, seq, "received file does not match its SHA-256; kept for inspection, the agent is told to send it again");
                            // Every ack covering this seq names the file, so the
                            // agent keeps its copy and sends it again whole.
                            batch.push((
                                super::seq_key(b"m:", agent, stream, seq),
                                c.file_id.as_bytes().to_vec(),
                            ));
                        }
                    }
                    c.data = Vec::new();
                    if let Ok(v) = serde_json::to_vec(&rec) {
                        batch.push((fkey.clone(), v));
                    }
                    self.staged.insert(fkey, rec);
                }
                Some(Body::FileAbort(a)) => {
                    if !valid_file_id(&a.file_id) {
                        return Err(StoreError::Invalid(format!(
                            "seq {seq}: file abort with file id {:?}",
                            a.file_id
                        )));
                    }
                    let fkey = file_key(agent, stream, &a.file_id);
                    let mut rec = match self.staged.remove(&fkey) {
                        Some(r) => r,
                        None => get(store, agent, stream, &a.file_id)?.unwrap_or_default(),
                    };
                    rec.file_id = a.file_id.clone();
                    rec.path = a.path.clone();
                    rec.status = "aborted".into();
                    rec.seq = seq;
                    rec.reason = Some(a.reason.clone());
                    let path = dir.join(&a.file_id);
                    if let Ok(mut h) = store.hashers.lock() {
                        h.map.remove(&path);
                    }
                    self.delete_after_commit.push(path);
                    if let Ok(v) = serde_json::to_vec(&rec) {
                        batch.push((fkey.clone(), v));
                    }
                    self.staged.insert(fkey, rec);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// fdatasyncs every file written in this group, and the directories of new ones.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        for f in self.open.values() {
            f.sync_data()?;
        }
        for d in self.new_dirs.drain() {
            File::open(&d)?.sync_all()?;
        }
        Ok(())
    }

    /// Aborted files' bytes are deleted only once the abort is durable.
    pub(super) fn after_commit(self) {
        for p in self.delete_after_commit {
            let _ = std::fs::remove_file(p);
        }
    }
}
