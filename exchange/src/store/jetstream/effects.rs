//! The bookkeeping a stored message causes: file records (with the SHA-256
//! check when a file's last chunk arrives), rejected files, declared gaps.
//!
//! Every update here may be applied twice (by the node that stored the message
//! and by a node that later finds it last on its subject) and by two nodes at
//! once: a file's entry remembers the last seq applied to it, lists are
//! updated by value, and every write is revision-checked and retried.

use ferry_protocol::messages::{record::Body, Record};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{error, info};

use super::names;
use super::Inner;
use crate::store::{FileRecord, Gap, StoreError};

/// A received file as the `files` bucket holds it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(super) struct FileEntry {
    #[serde(flatten)]
    pub record: FileRecord,
    /// Seq of the file's first chunk: where its bytes start in the record log.
    pub first_seq: u64,
    /// The last seq whose record this entry reflects.
    pub applied_seq: u64,
}

/// A file whose bytes did not match their SHA-256, completed at `seq`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct Rejected {
    pub seq: u64,
    pub file_id: String,
}

/// SHA-256 of a file's chunks applied in order by this node, so its last
/// chunk does not have to read the whole file back.
#[derive(Clone)]
pub(super) struct RunningHash {
    hasher: Sha256,
    /// The offset the next chunk must start at.
    next_offset: u64,
    /// The entry's `applied_seq` when this hash was last fed: if another node
    /// applied a chunk since, this hash missed it.
    applied_seq: u64,
}

const MAX_RETRIES: usize = 50;

impl Inner {
    pub(super) async fn file_entry(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<Option<(FileEntry, u64)>, StoreError> {
        let key = names::file_key(agent, stream, file_id);
        Ok(self
            .kv_get::<FileEntry>(&self.files, &key)
            .await?
            .and_then(|(e, rev)| e.map(|e| (e, rev))))
    }

    /// Every file of a stream, in the order they were completed.
    pub(super) async fn files(
        &self,
        agent: &str,
        stream: &str,
    ) -> Result<Vec<FileRecord>, StoreError> {
        let filter = format!("{}.*", names::stream_key(agent, stream));
        let mut out: Vec<FileRecord> = self
            .kv_scan(&self.files, &filter)
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice::<FileEntry>(&v).ok())
            .map(|e| e.record)
            .collect();
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }

    pub(super) async fn gaps(&self, agent: &str, stream: &str) -> Result<Vec<Gap>, StoreError> {
        let key = names::stream_key(agent, stream);
        Ok(self
            .kv_get::<Vec<Gap>>(&self.gaps, &key)
            .await?
            .and_then(|(v, _)| v)
            .unwrap_or_default())
    }

    /// The stream's rejected files (cached per subject; see `SubjectState`).
    pub(super) async fn rejected(
        &self,
        agent: &str,
        stream: &str,
    ) -> Result<Vec<Rejected>, StoreError> {
        let state = self.subject_state(agent, stream);
        let mut st = state.lock().await;
        if let Some(list) = &st.rejected {
            return Ok(list.clone());
        }
        let key = names::stream_key(agent, stream);
        let list = self
            .kv_get::<Vec<Rejected>>(&self.rejected, &key)
            .await?
            .and_then(|(v, _)| v)
            .unwrap_or_default();
        st.rejected = Some(list.clone());
        Ok(list)
    }

    /// Records a declared loss (once, whoever applies it).
    pub(super) async fn apply_gap(
        &self,
        agent: &str,
        stream: &str,
        gap: &Gap,
    ) -> Result<(), StoreError> {
        let key = names::stream_key(agent, stream);
        for _ in 0..MAX_RETRIES {
            let (mut list, rev) = match self.kv_get::<Vec<Gap>>(&self.gaps, &key).await? {
                Some((v, rev)) => (v.unwrap_or_default(), Some(rev)),
                None => (Vec::new(), None),
            };
            if list.iter().any(|g| g.from == gap.from) {
                return Ok(());
            }
            list.push(gap.clone());
            list.sort_by_key(|g| g.from);
            if self.kv_write(&self.gaps, &key, &list, rev).await? {
                return Ok(());
            }
        }
        Err(self.remote(
            format!("recording a gap of {agent}/{stream}"),
            "other nodes kept changing it",
        ))
    }

    async fn add_rejected(
        &self,
        agent: &str,
        stream: &str,
        add: &[Rejected],
    ) -> Result<(), StoreError> {
        let key = names::stream_key(agent, stream);
        for _ in 0..MAX_RETRIES {
            let (mut list, rev) = match self.kv_get::<Vec<Rejected>>(&self.rejected, &key).await? {
                Some((v, rev)) => (v.unwrap_or_default(), Some(rev)),
                None => (Vec::new(), None),
            };
            let before = list.len();
            for r in add {
                if !list.contains(r) {
                    list.push(r.clone());
                }
            }
            if list.len() == before {
                return Ok(());
            }
            list.sort_by_key(|r| r.seq);
            if self.kv_write(&self.rejected, &key, &list, rev).await? {
                return Ok(());
            }
        }
        Err(self.remote(
            format!("recording a rejected file of {agent}/{stream}"),
            "other nodes kept changing it",
        ))
    }

    /// Applies the file records among `records` (seqs from `first`, chunk data
    /// included) to the files bucket, and a file that fails its SHA-256 to the
    /// rejected list.
    pub(super) async fn apply_files(
        &self,
        agent: &str,
        stream: &str,
        first: u64,
        records: &[Record],
    ) -> Result<(), StoreError> {
        // Each file's records, in seq order, files in order of appearance.
        let mut by_file: Vec<(&str, Vec<(u64, &Record)>)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let id = match &r.body {
                Some(Body::FileChunk(c)) => c.file_id.as_str(),
                Some(Body::FileAbort(a)) => a.file_id.as_str(),
                _ => continue,
            };
            let seq = first + i as u64;
            match by_file.iter_mut().find(|(f, _)| *f == id) {
                Some((_, v)) => v.push((seq, r)),
                None => by_file.push((id, vec![(seq, r)])),
            }
        }
        for (id, recs) in by_file {
            self.apply_file(agent, stream, id, &recs).await?;
        }
        Ok(())
    }

    async fn apply_file(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
        recs: &[(u64, &Record)],
    ) -> Result<(), StoreError> {
        let key = names::file_key(agent, stream, file_id);
        for _ in 0..MAX_RETRIES {
            let (entry, rev) = match self.file_entry(agent, stream, file_id).await? {
                Some((e, rev)) => (Some(e), Some(rev)),
                None => (None, None),
            };
            let existed = entry.is_some();
            let mut e = entry.unwrap_or_default();
            let mut hash = self.hashers.lock().ok().and_then(|h| h.get(&key).cloned());
            let mut rejected = Vec::new();
            let mut changed = false;
            for &(seq, r) in recs {
                if (existed || changed) && seq <= e.applied_seq {
                    continue;
                }
                match &r.body {
                    Some(Body::FileChunk(c)) => {
                        if !existed && !changed {
                            e.record = FileRecord {
                                file_id: c.file_id.clone(),
                                path: c.path.clone(),
                                status: "receiving".into(),
                                ..Default::default()
                            };
                            e.first_seq = seq;
                        }
                        let end_off = c.offset + c.data.len() as u64;
                        hash = match hash.take() {
                            Some(mut h)
                                if h.next_offset == c.offset && h.applied_seq == e.applied_seq =>
                            {
                                h.hasher.update(&c.data);
                                h.next_offset = end_off;
                                Some(h)
                            }
                            _ if c.offset == 0 && e.applied_seq == 0 => {
                                let mut hasher = Sha256::new();
                                hasher.update(&c.data);
                                Some(RunningHash {
                                    hasher,
                                    next_offset: end_off,
                                    applied_seq: 0,
                                })
                            }
                            _ => None,
                        };
                        e.record.received = e.record.received.max(end_off);
                        if let Some(end) = &c.end {
                            let digest = match hash.take() {
                                Some(h) if h.next_offset == end.size => {
                                    h.hasher.finalize().to_vec()
                                }
                                _ => {
                                    self.file_digest(
                                        agent,
                                        stream,
                                        file_id,
                                        e.first_seq,
                                        seq,
                                        end.size,
                                    )
                                    .await?
                                }
                            };
                            e.record.size = end.size;
                            e.record.sha256 = hex::encode(&end.sha256);
                            e.record.seq = seq;
                            if digest == end.sha256 {
                                e.record.status = "complete".into();
                                info!(agent, stream, path = %c.path, size = end.size, "file received");
                            } else {
                                e.record.status = "sha256-mismatch".into();
                                e.record.reason = Some(format!(
                                    "received bytes hash to {}",
                                    hex::encode(&digest)
                                ));
                                error!(agent, stream, path = %c.path, file_id = %c.file_id, seq, "received file does not match its SHA-256; kept for inspection, the agent is told to send it again");
                                rejected.push(Rejected {
                                    seq,
                                    file_id: c.file_id.clone(),
                                });
                            }
                        }
                    }
                    Some(Body::FileAbort(a)) => {
                        e.record.file_id = a.file_id.clone();
                        e.record.path = a.path.clone();
                        e.record.status = "aborted".into();
                        e.record.seq = seq;
                        e.record.reason = Some(a.reason.clone());
                        if e.first_seq == 0 {
                            e.first_seq = seq;
                        }
                        hash = None;
                    }
                    _ => continue,
                }
                e.applied_seq = seq;
                if let Some(h) = hash.as_mut() {
                    h.applied_seq = seq;
                }
                changed = true;
            }
            if !changed {
                return Ok(());
            }
            // Every ack covering the seq must name a rejected file, so the list
            // is written before the entry that marks the seq applied.
            if !rejected.is_empty() {
                self.add_rejected(agent, stream, &rejected).await?;
            }
            if self.kv_write(&self.files, &key, &e, rev).await? {
                if let Ok(mut h) = self.hashers.lock() {
                    match hash {
                        Some(hash) => h.insert(key, hash),
                        None => h.remove(&key),
                    };
                }
                return Ok(());
            }
        }
        Err(self.remote(
            format!("recording file {file_id} of {agent}/{stream}"),
            "other nodes kept changing it",
        ))
    }

    /// SHA-256 of a file's bytes `0..size` as the record log holds them, its
    /// chunks read from `first_seq` up to `upto` (from the stream leader).
    async fn file_digest(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
        first_seq: u64,
        upto: u64,
        size: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let mut chunks = self
            .file_chunks(agent, stream, file_id, first_seq, Some(upto), true)
            .await?;
        let mut h = Sha256::new();
        let mut pos = 0u64;
        let zeros = vec![0u8; 64 * 1024];
        let pad = |h: &mut Sha256, pos: &mut u64, to: u64| {
            while *pos < to {
                let n = (to - *pos).min(zeros.len() as u64) as usize;
                h.update(&zeros[..n]);
                *pos += n as u64;
            }
        };
        while let Some((offset, data)) = chunks.next(self).await? {
            pad(&mut h, &mut pos, offset.min(size));
            let end = offset + data.len() as u64;
            if end > pos && offset <= pos {
                let from = (pos - offset) as usize;
                let to = (end.min(size) - offset) as usize;
                if from < to {
                    h.update(&data[from..to]);
                    pos = offset + to as u64;
                }
            }
        }
        pad(&mut h, &mut pos, size);
        Ok(h.finalize().to_vec())
    }
}
