//! Storing a group: admission against each subject's tip, conditional
//! publishes, and what to do when the answer is "someone else wrote first" or
//! no answer at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use ferry_protocol::messages::{Batch, Lost};
use ferry_protocol::session::{admit, admit_loss, Admission, LossAdmission};
use futures_util::future::join_all;
use tracing::{error, warn};

use super::effects::Rejected;
use super::wire::{self, Kind, Piece, Stored};
use super::Inner;
use crate::store::{Gap, Incoming, Item, StoreError};

/// Where a subject ends, as far as this node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tip {
    /// The next seq the stream expects.
    pub next: u64,
    /// Stream sequence of the subject's last message (0: none): what the next
    /// publish names as `Nats-Expected-Last-Subject-Sequence`.
    pub last: u64,
}

/// What this node knows of one subject, under its lock.
#[derive(Default)]
pub(super) struct SubjectState {
    /// `None` until read from the server, and again after an answer this node
    /// could not interpret: then the next use reads it afresh.
    tip: Option<Tip>,
    /// The highest next seq this process reported as stored. The subject's
    /// tip is never below it unless the server lost acknowledged messages.
    acked: u64,
    /// The stream's rejected files, as last read or written by this node;
    /// dropped whenever the tip is read afresh (another node may have added).
    pub rejected: Option<Vec<Rejected>>,
}

/// A subject's state and its lock.
pub(super) type SharedState = Arc<tokio::sync::Mutex<SubjectState>>;

/// Why a run of publishes stopped.
enum Stop {
    /// Another writer got there first: read the tip again and judge again.
    Conflict,
    /// No answer (timeout, connection lost): the message may or may not be stored.
    Unknown(String),
    /// Refused for good (the item's error).
    Failed(StoreError),
}

/// Conflicting writers or unanswered publishes tolerated per item before it is
/// refused (the agent sends it again).
const MAX_ATTEMPTS: u32 = 8;

impl Inner {
    pub(super) fn subject_state(&self, agent: &str, stream: &str) -> SharedState {
        let mut map = match self.subjects.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry((agent.to_string(), stream.to_string()))
            .or_default()
            .clone()
    }

    /// The next seq of a stream as this node knows it (read from the server on
    /// first use): everything below it is stored.
    pub(super) async fn next_expected(&self, agent: &str, stream: &str) -> Result<u64, StoreError> {
        if self.poisoned() {
            return Err(StoreError::Poisoned(self.dir.clone()));
        }
        let state = self.subject_state(agent, stream);
        let mut st = state.lock().await;
        match st.tip {
            Some(t) => Ok(t.next),
            None => Ok(self.load_tip(agent, stream, &mut st).await?.next),
        }
    }

    /// The next seq of a stream read from the server now (other nodes may have
    /// stored more than this node knows).
    pub(super) async fn fresh_next(&self, agent: &str, stream: &str) -> Result<u64, StoreError> {
        if self.poisoned() {
            return Err(StoreError::Poisoned(self.dir.clone()));
        }
        let state = self.subject_state(agent, stream);
        let mut st = state.lock().await;
        Ok(self.load_tip(agent, stream, &mut st).await?.next)
    }

    /// Reads the subject's last message from the stream leader: the tip follows
    /// from its headers. Its bookkeeping is applied again (idempotent): the node
    /// that stored it may have stopped before doing so.
    pub(super) async fn load_tip(
        &self,
        agent: &str,
        stream: &str,
        st: &mut SubjectState,
    ) -> Result<Tip, StoreError> {
        st.tip = None;
        st.rejected = None;
        let subject = self.names.subject(agent, stream);
        let last = self.last_message(&subject).await?;
        let tip = match &last {
            None => Tip { next: 1, last: 0 },
            Some(m) => Tip {
                next: m.head.next(),
                last: m.seq,
            },
        };
        if tip.next < st.acked {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::SeqCst);
            error!(agent, stream, server = %self.server, next = tip.next, acknowledged = st.acked, "ALARM: JetStream lost records it had acknowledged (the subject's last message is behind what this exchange acknowledged); the store is unusable until the exchange restarts; agents resend what the server still has not");
            return Err(StoreError::Poisoned(self.dir.clone()));
        }
        if let Some(m) = last {
            self.hint(&subject, m.head.first, m.seq);
            self.repair(agent, stream, m).await?;
        }
        st.tip = Some(tip);
        Ok(tip)
    }

    /// Stores a group: each subject's items in order, the subjects concurrently.
    pub(super) async fn commit_group(&self, items: &[Incoming]) -> Vec<Result<u64, StoreError>> {
        if self.poisoned() {
            return items
                .iter()
                .map(|_| Err(StoreError::Poisoned(self.dir.clone())))
                .collect();
        }
        // Each subject's items (with their place in the group), in order.
        type Items<'a> = Vec<(usize, &'a Incoming)>;
        let mut by_subject: Vec<((&str, &str), Items)> = Vec::new();
        let mut index: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let k = (item.agent.as_str(), item.stream());
            let slot = *index.entry(k).or_insert_with(|| {
                by_subject.push((k, Vec::new()));
                by_subject.len() - 1
            });
            by_subject[slot].1.push((i, item));
        }
        let stamp = crate::store::now_unix_ms();
        let done = join_all(
            by_subject
                .into_iter()
                .map(|((agent, stream), items)| self.commit_subject(agent, stream, items, stamp)),
        )
        .await;
        let mut results: Vec<Option<Result<u64, StoreError>>> =
            items.iter().map(|_| None).collect();
        for (i, r) in done.into_iter().flatten() {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Damaged("item not answered".into()))))
            .collect()
    }

    async fn commit_subject(
        &self,
        agent: &str,
        stream: &str,
        items: Vec<(usize, &Incoming)>,
        stamp: u64,
    ) -> Vec<(usize, Result<u64, StoreError>)> {
        let state = self.subject_state(agent, stream);
        let mut st = state.lock().await;
        let mut out = Vec::with_capacity(items.len());
        // After a refused item the stream's later items are refused too, so
        // nothing is ever stored past a seq that was not.
        let mut refused: Option<u64> = None;
        for (i, item) in items {
            if let Some(expected) = refused {
                out.push((
                    i,
                    Err(StoreError::Resend(format!(
                        "stream {stream}: an earlier batch was not stored; resend from seq {expected}"
                    ))),
                ));
                continue;
            }
            let r = if agent.is_empty() || stream.is_empty() {
                Err(StoreError::Invalid("empty agent or stream name".into()))
            } else {
                match &item.item {
                    Item::Batch(b) => self.store_batch(agent, stream, &mut st, b, stamp).await,
                    Item::Lost(l) => self.store_loss(agent, stream, &mut st, l, stamp).await,
                }
            };
            if r.is_err() {
                refused = Some(st.tip.map_or(0, |t| t.next));
            }
            out.push((i, r));
        }
        out
    }

    /// The tip, read from the server if this node does not know it.
    async fn tip(
        &self,
        agent: &str,
        stream: &str,
        st: &mut SubjectState,
    ) -> Result<Tip, StoreError> {
        match st.tip {
            Some(t) => Ok(t),
            None => self.load_tip(agent, stream, st).await,
        }
    }

    async fn store_batch(
        &self,
        agent: &str,
        stream: &str,
        st: &mut SubjectState,
        b: &Batch,
        stamp: u64,
    ) -> Result<u64, StoreError> {
        if b.record_count == 0 {
            return Err(StoreError::Invalid(format!(
                "stream {stream} seq {}: a batch of no records",
                b.first_seq
            )));
        }
        let mut attempt = 0;
        loop {
            let tip = self.tip(agent, stream, st).await.map_err(unreachable)?;
            let skip = match admit(tip.next, b.first_seq, b.record_count) {
                Admission::Duplicate => return Ok(tip.next - 1),
                Admission::Store { skip } => skip,
                Admission::Ahead { expected } => {
                    return Err(StoreError::Resend(format!(
                        "stream {stream} batch at seq {} does not continue at seq {expected}; resend from {expected}",
                        b.first_seq
                    )))
                }
            };
            let limit = self.message_limit();
            let pieces = wire::batch_pieces(b, skip, stamp, limit)?;
            match self.publish(agent, stream, st, pieces).await {
                Ok(()) => return Ok(st.tip.map_or(0, |t| t.next) - 1),
                Err(Stop::Failed(e)) => return Err(e),
                Err(stop) => {
                    self.after_stop(agent, stream, st, stop, &mut attempt)
                        .await?
                }
            }
        }
    }

    async fn store_loss(
        &self,
        agent: &str,
        stream: &str,
        st: &mut SubjectState,
        l: &Lost,
        stamp: u64,
    ) -> Result<u64, StoreError> {
        let mut attempt = 0;
        loop {
            let tip = self.tip(agent, stream, st).await.map_err(unreachable)?;
            let (from, to) = match admit_loss(tip.next, l.from_seq, l.to_seq) {
                LossAdmission::Duplicate => return Ok(tip.next - 1),
                LossAdmission::Ahead { expected } => {
                    return Err(StoreError::Resend(format!(
                        "stream {stream} loss declared from seq {} does not continue at seq {expected}; resend from {expected}",
                        l.from_seq
                    )))
                }
                LossAdmission::Record { from, to } => (from, to),
            };
            let gap = Gap {
                from,
                to,
                detected_unix_ms: stamp,
                reason: l.reason.clone(),
            };
            match self
                .publish(agent, stream, st, vec![wire::lost_piece(&gap)?])
                .await
            {
                Ok(()) => {
                    warn!(agent, stream, from, to, reason = %l.reason, "ALARM: the agent declared these records lost");
                    return Ok(to);
                }
                Err(Stop::Failed(e)) => return Err(e),
                Err(stop) => {
                    self.after_stop(agent, stream, st, stop, &mut attempt)
                        .await?
                }
            }
        }
    }

    /// After a conflict or an unknown outcome the tip is read again before the
    /// item is judged again; past [`MAX_ATTEMPTS`] the item is refused (and the
    /// agent resends it).
    async fn after_stop(
        &self,
        agent: &str,
        stream: &str,
        st: &mut SubjectState,
        stop: Stop,
        attempt: &mut u32,
    ) -> Result<(), StoreError> {
        st.tip = None;
        *attempt += 1;
        let why = match stop {
            Stop::Conflict => "another exchange node stored to this stream meanwhile".to_string(),
            Stop::Unknown(e) => {
                warn!(agent, stream, error = %e, "JetStream did not answer a publish; reading the stream's last message to see whether it was stored");
                tokio::time::sleep(Duration::from_millis(100 << (*attempt).min(5))).await;
                e
            }
            Stop::Failed(e) => return Err(e),
        };
        if *attempt >= MAX_ATTEMPTS {
            return Err(StoreError::Resend(format!(
                "stream {stream}: not stored after {attempt} attempts ({why}); resend",
            )));
        }
        Ok(())
    }

    /// The largest payload a message may have: the server's `max_payload`
    /// (it may change with the server the client is connected to) less room for
    /// the headers.
    pub(super) fn message_limit(&self) -> usize {
        self.client
            .server_info()
            .max_payload
            .saturating_sub(wire::HEADER_ROOM)
            .max(4096)
    }

    /// Publishes `pieces` one after the other, each conditional on the
    /// subject's last message being the one before it; moves the tip with each
    /// acknowledgement and applies each completed piece's bookkeeping before
    /// the next is published.
    async fn publish(
        &self,
        agent: &str,
        stream: &str,
        st: &mut SubjectState,
        pieces: Vec<Piece>,
    ) -> Result<(), Stop> {
        let subject = self.names.subject(agent, stream);
        let mut part_start = 0;
        for mut piece in pieces {
            let Some(tip) = st.tip else {
                return Err(Stop::Conflict);
            };
            if piece.head.kind == Kind::Part {
                if piece.head.part.0 == 1 {
                    part_start = 0;
                } else {
                    piece.head.part_start = part_start;
                }
            }
            let headers = piece.head.headers(tip.last);
            let sent = self
                .js
                .publish_with_headers(
                    subject.clone(),
                    headers,
                    std::mem::take(&mut piece.payload).into(),
                )
                .await;
            let ack = match sent {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            let ack = match ack {
                Ok(ack) => ack,
                Err(e) => {
                    return Err(match e.kind() {
                        PublishErrorKind::WrongLastSequence => Stop::Conflict,
                        PublishErrorKind::StreamNotFound => Stop::Failed(self.remote(
                            format!("publishing to {subject}"),
                            format!(
                                "no stream takes it ({e}); was stream {} deleted?",
                                self.names.stream
                            ),
                        )),
                        PublishErrorKind::MaxPayloadExceeded => {
                            Stop::Failed(self.remote(format!("publishing to {subject}"), e))
                        }
                        _ => Stop::Unknown(e.to_string()),
                    })
                }
            };
            if ack.stream != self.names.stream || ack.sequence <= tip.last || ack.duplicate {
                // The server did not do what the conditional publish asks: no
                // promise built on it holds any more.
                self.poisoned
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                error!(agent, stream, ack_stream = %ack.stream, ack_seq = ack.sequence, expected_after = tip.last, duplicate = ack.duplicate, "ALARM: JetStream acknowledged a conditional publish in a way that contradicts it; the store is unusable until the exchange restarts");
                return Err(Stop::Failed(StoreError::Poisoned(self.dir.clone())));
            }
            let next = piece.head.next();
            st.tip = Some(Tip {
                next,
                last: ack.sequence,
            });
            st.acked = st.acked.max(next);
            self.hint(&subject, piece.head.first, ack.sequence);
            if piece.head.kind == Kind::Part && piece.head.part.0 == 1 {
                part_start = ack.sequence;
            }
            if let Some(records) = piece.records.take() {
                // The rejected files are read again from the bucket: another
                // node may have applied (and rejected) them first.
                st.rejected = None;
                if let Err(e) = self
                    .apply_files(agent, stream, piece.head.first, &records)
                    .await
                {
                    // Stored, but its bookkeeping is not: whoever writes next
                    // reads this message as the last one and applies it.
                    st.tip = None;
                    return Err(Stop::Failed(e));
                }
            }
            if let Some(gap) = piece.gap.take() {
                if let Err(e) = self.apply_gap(agent, stream, &gap).await {
                    st.tip = None;
                    return Err(Stop::Failed(e));
                }
            }
        }
        Ok(())
    }

    /// Applies again the bookkeeping of a message found last on its subject.
    async fn repair(&self, agent: &str, stream: &str, m: Stored) -> Result<(), StoreError> {
        if !m.head.completes() {
            return Ok(());
        }
        match m.head.kind {
            Kind::Lost => {
                let gap: Gap = serde_json::from_slice(&m.payload).map_err(|e| {
                    StoreError::Damaged(format!("loss message at stream sequence {}: {e}", m.seq))
                })?;
                self.apply_gap(agent, stream, &gap).await
            }
            _ if !m.head.files => Ok(()),
            Kind::Batch => {
                let stored = wire::decode_entry(&m.head, &m.payload, m.seq)?;
                let records = wire::entry_records(&stored, m.seq)?;
                self.apply_files(agent, stream, m.head.first, &records)
                    .await
            }
            Kind::Part => {
                let subject = self.names.subject(agent, stream);
                let (seq, first) = (m.seq, m.head.first);
                let stored = self.reassemble(&subject, m).await?;
                let records = wire::entry_records(&stored, seq)?;
                self.apply_files(agent, stream, first, &records).await
            }
        }
    }
}

/// A failure to read the tip: the item is not stored and the agent resends it.
fn unreachable(e: StoreError) -> StoreError {
    match e {
        StoreError::Remote { .. } => StoreError::Resend(format!("{e}; resend")),
        other => other,
    }
}
