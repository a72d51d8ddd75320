//! Reading the record log back: single messages, where a seq's message
//! starts, runs of messages, records and file bytes.
//!
//! A read starts at the message holding its first seq, found by bisection
//! over stream sequences (a subject's first seqs grow with its stream
//! sequences) narrowed by hints: the stream sequences of messages this node
//! published or read, kept per subject and thinned past [`MAX_HINTS`]. A run
//! of messages is read with direct gets (any replica, one round trip each);
//! a longer one continues with an ordered consumer. What decides a commit (the
//! last message, the parts of a record to put back together, the bytes of a
//! file to check against its SHA-256) is read from the stream leader.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind};
use ferry_protocol::entry::StoredBatch;
use ferry_protocol::messages::record::Body;
use futures_util::StreamExt;

use super::runtime::Runtime;
use super::wire::{self, Assembler, Head, Stored, Whole};
use super::Inner;
use crate::store::{StoreError, StoredRecord};

/// Hints kept per subject before every other one is dropped.
const MAX_HINTS: usize = 4096;
/// Messages read with direct gets before a run switches to a consumer.
const DIRECT_READS: u32 = 16;

impl Inner {
    fn stored(&self, m: StreamMessage) -> Result<Stored, StoreError> {
        let head = Head::parse(&m.headers).map_err(|e| {
            StoreError::Damaged(format!(
                "record message {} at stream sequence {}: {e}",
                m.subject, m.sequence
            ))
        })?;
        Ok(Stored {
            seq: m.sequence,
            head,
            payload: m.payload.to_vec(),
        })
    }

    /// The subject's last message, from the stream leader.
    pub(super) async fn last_message(&self, subject: &str) -> Result<Option<Stored>, StoreError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(self.stored(m)?)),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(self.remote(format!("reading the last message of {subject}"), e)),
        }
    }

    /// The first message of `subject` at or after stream sequence `seq`: from
    /// the stream leader, or (`leader` false) from any replica.
    pub(super) async fn next_message(
        &self,
        subject: &str,
        seq: u64,
        leader: bool,
    ) -> Result<Option<Stored>, StoreError> {
        let what = || format!("reading {subject} from stream sequence {seq}");
        let m = if leader {
            match self
                .stream
                .raw_message_builder()
                .next_by_subject(subject)
                .sequence(seq)
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                    return Ok(None)
                }
                Err(e) => return Err(self.remote(what(), e)),
            }
        } else {
            match self
                .stream
                .direct_get_builder()
                .next_by_subject(subject)
                .sequence(seq)
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(None),
                Err(e) => return Err(self.remote(what(), e)),
            }
        };
        self.stored(m).map(Some)
    }

    /// Remembers that the message of `subject` at stream sequence `seq` starts
    /// at seq `first`.
    pub(super) fn hint(&self, subject: &str, first: u64, seq: u64) {
        let Ok(mut all) = self.hints.lock() else {
            return;
        };
        let m = all.entry(subject.to_string()).or_default();
        m.entry(first)
            .and_modify(|s| *s = (*s).min(seq))
            .or_insert(seq);
        if m.len() > MAX_HINTS {
            let last = m.len() - 1;
            *m = std::mem::take(m)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == 0 || *i == last)
                .map(|(_, kv)| kv)
                .collect();
        }
    }

    /// Known messages around seq `from`: the stream sequence of one whose first
    /// seq is below it, and of the earliest known one whose first seq is not.
    fn hint_bounds(&self, subject: &str, from: u64) -> (Option<u64>, Option<u64>) {
        let Ok(all) = self.hints.lock() else {
            return (None, None);
        };
        let Some(m) = all.get(subject) else {
            return (None, None);
        };
        (
            m.range(..from).next_back().map(|(_, &s)| s),
            m.range(from..).next().map(|(_, &s)| s),
        )
    }

    /// Stream sequence of the message to start reading seq `from` at: the last
    /// one whose first seq is below `from` (it may hold `from`), else the
    /// subject's first message. `None` for an empty subject.
    pub(super) async fn locate(&self, subject: &str, from: u64) -> Result<Option<u64>, StoreError> {
        let (lo_hint, hi_hint) = self.hint_bounds(subject, from);
        let mut hi = match hi_hint {
            Some(h) => h,
            None => {
                let last = match self
                    .stream
                    .direct_get_builder()
                    .last_by_subject(subject)
                    .send()
                    .await
                {
                    Ok(m) => self.stored(m)?,
                    Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(None),
                    Err(e) => {
                        return Err(self.remote(format!("reading the last message of {subject}"), e))
                    }
                };
                self.hint(subject, last.head.first, last.seq);
                if last.head.first < from {
                    return Ok(Some(last.seq));
                }
                last.seq
            }
        };
        let mut lo = match lo_hint {
            Some(l) => l,
            None => match self.next_message(subject, 1, false).await? {
                None => return Ok(Some(hi)),
                Some(m) => {
                    self.hint(subject, m.head.first, m.seq);
                    if m.head.first >= from {
                        return Ok(Some(m.seq));
                    }
                    m.seq
                }
            },
        };
        while hi > lo + 1 {
            let mid = lo + (hi - lo) / 2;
            match self.next_message(subject, mid, false).await? {
                Some(m) if m.seq < hi && m.head.first < from => {
                    self.hint(subject, m.head.first, m.seq);
                    lo = m.seq;
                }
                Some(m) => {
                    self.hint(subject, m.head.first, m.seq);
                    hi = mid;
                }
                None => hi = mid,
            }
        }
        Ok(Some(lo))
    }

    /// The entry of a record cut into parts, `last` its last part: the parts
    /// before it read from the stream leader.
    pub(super) async fn reassemble(
        &self,
        subject: &str,
        last: Stored,
    ) -> Result<StoredBatch, StoreError> {
        let mut asm = Assembler::default();
        let mut seq = last.head.part_start;
        let (first, end) = (last.head.first, last.seq);
        let damaged = |why: &str| {
            StoreError::Damaged(format!(
                "{subject}: the parts of seq {first} ending at stream sequence {end}: {why}"
            ))
        };
        while seq < last.seq {
            let Some(m) = self.next_message(subject, seq, true).await? else {
                return Err(damaged("a part is missing"));
            };
            if m.seq >= last.seq {
                break;
            }
            seq = m.seq + 1;
            asm.feed(m)?;
        }
        match asm.feed(last)? {
            Some(Whole::Entry(e)) => Ok(e),
            _ => Err(damaged("the parts do not make the record")),
        }
    }

    /// The chunks of one file, from its first chunk's seq up to `upto` (the
    /// seq that completed it; `None`: as far as the log goes).
    pub(super) async fn file_chunks(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
        first_seq: u64,
        upto: Option<u64>,
        leader: bool,
    ) -> Result<FileChunks, StoreError> {
        let subject = self.names.subject(agent, stream);
        let start = self.locate(&subject, first_seq).await?;
        Ok(FileChunks {
            finished: start.is_none(),
            cursor: Cursor::new(subject, start.unwrap_or(0), leader),
            asm: Assembler::default(),
            file_id: file_id.to_string(),
            from: first_seq,
            upto,
            reached: 0,
            queue: VecDeque::new(),
        })
    }
}

/// A run of one subject's messages from a stream sequence on, to its end.
pub(super) struct Cursor {
    subject: String,
    next: u64,
    leader: bool,
    direct_left: u32,
    consumer: Option<pull::Ordered>,
    done: bool,
}

impl Cursor {
    pub fn new(subject: String, from: u64, leader: bool) -> Self {
        Cursor {
            subject,
            next: from,
            leader,
            direct_left: DIRECT_READS,
            consumer: None,
            done: false,
        }
    }

    pub async fn next(&mut self, inner: &Inner) -> Result<Option<Stored>, StoreError> {
        if self.done {
            return Ok(None);
        }
        if self.leader || (self.consumer.is_none() && self.direct_left > 0) {
            self.direct_left = self.direct_left.saturating_sub(1);
            let m = inner
                .next_message(&self.subject, self.next, self.leader)
                .await?;
            match &m {
                Some(m) => self.next = m.seq + 1,
                None => self.done = true,
            }
            return Ok(m);
        }
        let what = || {
            format!(
                "reading {} from stream sequence {}",
                self.subject, self.next
            )
        };
        if self.consumer.is_none() {
            let c = inner
                .stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: self.subject.clone(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: self.next,
                    },
                    // At most this many messages (each up to max_payload) wait
                    // in the client.
                    max_batch: 16,
                    ..Default::default()
                })
                .await
                .map_err(|e| inner.remote(what(), e))?;
            if c.cached_info().num_pending == 0 {
                self.done = true;
                return Ok(None);
            }
            self.consumer = Some(c.messages().await.map_err(|e| inner.remote(what(), e))?);
        }
        let Some(messages) = self.consumer.as_mut() else {
            return Ok(None);
        };
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| inner.remote(what(), "no message within 30 s"))?
            .ok_or_else(|| inner.remote(what(), "the consumer ended"))?
            .map_err(|e| inner.remote(what(), e))?;
        let info = m.info().map_err(|e| inner.remote(what(), e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        let head = m
            .headers
            .as_ref()
            .ok_or_else(|| "no headers".to_string())
            .and_then(Head::parse)
            .map_err(|e| {
                StoreError::Damaged(format!(
                    "record message {} at stream sequence {seq}: {e}",
                    self.subject
                ))
            })?;
        self.next = seq + 1;
        if pending == 0 {
            self.done = true;
        }
        Ok(Some(Stored {
            seq,
            head,
            payload: m.payload.to_vec(),
        }))
    }
}

/// Records of a stream from seq `from` on, in seq order, file chunks without
/// their bytes, until `each` returns false.
pub(super) fn records(
    rt: &Runtime,
    inner: &Inner,
    agent: &str,
    stream: &str,
    from: u64,
    each: &mut dyn FnMut(StoredRecord, u64) -> bool,
) -> Result<(), StoreError> {
    let subject = inner.names.subject(agent, stream);
    let Some(start) = rt.block(inner.locate(&subject, from))? else {
        return Ok(());
    };
    let mut cursor = Cursor::new(subject.clone(), start, false);
    let mut asm = Assembler::default();
    // Few messages on the first trip (a reader often wants one record), more
    // on each later one.
    let mut want = 1usize;
    loop {
        let run = rt.block(async {
            let mut v = Vec::new();
            let mut bytes = 0;
            while v.len() < want && bytes < 8 << 20 {
                match cursor.next(inner).await? {
                    Some(m) => {
                        bytes += m.payload.len();
                        v.push(m);
                    }
                    None => break,
                }
            }
            Ok::<_, StoreError>(v)
        })?;
        if run.is_empty() {
            return Ok(());
        }
        want = (want * 4).min(64);
        for m in run {
            let at = m.seq;
            inner.hint(&subject, m.head.first, at);
            let Some(Whole::Entry(stored)) = asm.feed(m)? else {
                continue;
            };
            if stored.last_seq() < from {
                continue;
            }
            for (i, mut record) in wire::entry_records(&stored, at)?.into_iter().enumerate() {
                let seq = stored.first_seq + i as u64;
                if seq < from {
                    continue;
                }
                if let Some(Body::FileChunk(c)) = &mut record.body {
                    c.data = Vec::new();
                }
                if !each(StoredRecord { seq, record }, stored.stamp_unix_ms) {
                    return Ok(());
                }
            }
        }
    }
}

/// The chunks of one file in log order: `(offset, bytes)`.
pub(super) struct FileChunks {
    cursor: Cursor,
    asm: Assembler,
    file_id: String,
    from: u64,
    upto: Option<u64>,
    /// The highest seq read so far.
    reached: u64,
    queue: VecDeque<(u64, Vec<u8>)>,
    finished: bool,
}

impl FileChunks {
    pub async fn next(&mut self, inner: &Inner) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        loop {
            if let Some(c) = self.queue.pop_front() {
                return Ok(Some(c));
            }
            if self.finished {
                return Ok(None);
            }
            let Some(m) = self.cursor.next(inner).await? else {
                self.finished = true;
                if let Some(upto) = self.upto {
                    if self.reached < upto {
                        return Err(StoreError::Damaged(format!(
                            "file {}: the record log ends at seq {} but the file's last chunk is seq {upto}",
                            self.file_id, self.reached
                        )));
                    }
                }
                continue;
            };
            let at = m.seq;
            match self.asm.feed(m)? {
                Some(Whole::Entry(stored)) => {
                    self.reached = self.reached.max(stored.last_seq());
                    if stored.last_seq() < self.from {
                        continue;
                    }
                    for (i, r) in wire::entry_records(&stored, at)?.into_iter().enumerate() {
                        let seq = stored.first_seq + i as u64;
                        if seq < self.from {
                            continue;
                        }
                        if self.upto.is_some_and(|u| seq > u) {
                            self.finished = true;
                            break;
                        }
                        if let Some(Body::FileChunk(c)) = r.body {
                            if c.file_id == self.file_id {
                                self.queue.push_back((c.offset, c.data));
                            }
                        }
                    }
                    if self.upto.is_some_and(|u| self.reached >= u) {
                        self.finished = true;
                    }
                }
                Some(Whole::Lost(g)) => self.reached = self.reached.max(g.to),
                None => {}
            }
        }
    }
}

/// The bytes of a received file, read from the record log as they are asked for.
pub(super) struct FileReader {
    rt: Arc<Runtime>,
    inner: Arc<Inner>,
    chunks: FileChunks,
    size: u64,
    pos: u64,
    /// A chunk not yet (wholly) given out.
    pending: Option<(u64, Vec<u8>)>,
    exhausted: bool,
}

impl FileReader {
    pub fn open(
        rt: &Arc<Runtime>,
        inner: &Arc<Inner>,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<FileReader, StoreError> {
        let not_found = |why: &str| StoreError::Io {
            dir: inner.dir.clone(),
            what: format!("opening file {file_id} of {agent}/{stream} from JetStream"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, why.to_string()),
        };
        let Some((e, _)) = rt.block(inner.file_entry(agent, stream, file_id))? else {
            return Err(not_found("no such file"));
        };
        if e.record.status == "aborted" {
            return Err(not_found("the agent aborted it"));
        }
        let done = e.record.status == "complete" || e.record.status == "sha256-mismatch";
        let upto = done.then_some(e.record.seq);
        let size = if done {
            e.record.size
        } else {
            e.record.received
        };
        let chunks =
            rt.block(inner.file_chunks(agent, stream, file_id, e.first_seq, upto, false))?;
        Ok(FileReader {
            rt: rt.clone(),
            inner: inner.clone(),
            chunks,
            size,
            pos: 0,
            pending: None,
            exhausted: false,
        })
    }
}

impl std::io::Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos >= self.size || out.is_empty() {
                return Ok(0);
            }
            if self.pending.is_none() && !self.exhausted {
                let next = self
                    .rt
                    .block(self.chunks.next(&self.inner))
                    .map_err(std::io::Error::other)?;
                match next {
                    Some(c) => self.pending = Some(c),
                    None => self.exhausted = true,
                }
            }
            // Bytes no chunk covers (a hole, or past the last chunk) are zeros.
            let hole_end = match &self.pending {
                Some((offset, _)) => (*offset).min(self.size),
                None => self.size,
            };
            if self.pos < hole_end {
                let n = ((hole_end - self.pos) as usize).min(out.len());
                out[..n].fill(0);
                self.pos += n as u64;
                return Ok(n);
            }
            let Some((offset, data)) = &self.pending else {
                return Ok(0);
            };
            let end = (offset + data.len() as u64).min(self.size);
            if self.pos >= end {
                self.pending = None;
                continue;
            }
            let from = (self.pos - offset) as usize;
            let n = ((end - self.pos) as usize).min(out.len());
            out[..n].copy_from_slice(&data[from..from + n]);
            self.pos += n as u64;
            return Ok(n);
        }
    }
}
