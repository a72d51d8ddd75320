//! The committer: the one writer of the buffer. It takes commit requests from all
//! sources, compresses them, writes each group atomically, makes it durable with one
//! sync (group commit), and only then answers the sources.
//!
//! Backpressure (DESIGN invariant 4): while the buffer holds `max_size` or more,
//! the committer stops taking requests; the bounded channel fills and every
//! source's `commit` waits. Nothing is dropped. Acks free space and wake it.

use std::sync::Arc;
use std::time::Duration;

use ferry_adapters::{CommitRequest, Committed};
use ferry_protocol::batch::{encode_records, EncodedRecords};
use ferry_protocol::messages::RecordList;
use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

use crate::buffer::{Buffer, CommitItem};
use crate::status::Board;

/// Most requests folded into one group commit.
const MAX_GROUP: usize = 512;

pub struct Committer {
    pub buffer: Arc<Buffer>,
    pub names: Vec<String>,
    pub max_size: u64,
    pub rx: mpsc::Receiver<CommitRequest>,
    /// Signalled after every durable commit (the shipper waits on it).
    pub durable: Arc<Notify>,
    /// Signalled when acks free space.
    pub space: Arc<Notify>,
    pub board: Arc<Board>,
}

type Answer = tokio::sync::oneshot::Sender<Result<Option<Committed>, String>>;

/// A request ready for the buffer: stream index, compressed records, position.
type Encoded = (usize, Option<EncodedRecords>, Vec<u8>);

impl Committer {
    /// Runs until every source has dropped its sender.
    pub async fn run(mut self) {
        let mut full = false;
        loop {
            // 1. Backpressure: no new requests while the buffer is over its bound.
            if self.buffer.total_bytes() >= self.max_size {
                if !full {
                    full = true;
                    self.board.set_buffer_full(true);
                    warn!(
                        buffered = self.buffer.total_bytes(),
                        max_size = self.max_size,
                        "ALARM: buffer full, sources paused until the exchange acknowledges data"
                    );
                }
                // Acks wake us; the timeout re-checks in case a wakeup raced.
                tokio::select! {
                    _ = self.space.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if self.rx.is_closed() && self.rx.is_empty() {
                    return;
                }
                continue;
            }
            if full {
                full = false;
                self.board.set_buffer_full(false);
                info!(
                    buffered = self.buffer.total_bytes(),
                    "buffer below its bound again, sources resume"
                );
            }
            // 2. Take one request, then whatever else is already waiting.
            let Some(first) = self.rx.recv().await else {
                return;
            };
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            self.commit(group).await;
        }
    }

    async fn commit(&mut self, group: Vec<CommitRequest>) {
        let buffer = self.buffer.clone();
        let names = self.names.clone();
        let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
        let mut work = Vec::with_capacity(group.len());
        for r in group {
            answers.push(r.done);
            work.push((r.stream, r.records, r.position));
        }
        let result = tokio::task::spawn_blocking(move || {
            // Compression happens here, off the async threads, once per batch: the
            // buffer stores what will travel.
            let mut encoded: Vec<Result<Encoded, String>> = Vec::with_capacity(work.len());
            for (stream, records, position) in work {
                if stream >= names.len() {
                    encoded.push(Err(format!("unknown stream index {stream}")));
                    continue;
                }
                if records.is_empty() {
                    encoded.push(Ok((stream, None, position)));
                    continue;
                }
                match encode_records(&RecordList { records }) {
                    Ok(e) => encoded.push(Ok((stream, Some(e), position))),
                    Err(e) => encoded.push(Err(format!("stream {}: {e}", names[stream]))),
                }
            }
            let items: Vec<CommitItem<'_>> = encoded
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|(stream, records, position)| CommitItem {
                    stream: &names[*stream],
                    records: records.clone(),
                    position,
                })
                .collect();
            let committed = if items.is_empty() {
                Ok(Vec::new())
            } else {
                buffer.commit_group(&items)
            };
            (
                encoded.into_iter().map(|r| r.err()).collect::<Vec<_>>(),
                committed,
            )
        })
        .await;
        let (rejections, committed) = match result {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "buffer commit task failed");
                for a in answers {
                    let _ = a.send(Err(format!("buffer commit task failed: {e}")));
                }
                return;
            }
        };
        match committed {
            Ok(done) => {
                self.board.set_write_error(None);
                let mut done = done.into_iter();
                for (answer, rejection) in answers.into_iter().zip(rejections) {
                    let _ = match rejection {
                        Some(e) => answer.send(Err(e)),
                        None => answer.send(Ok(done.next().flatten())),
                    };
                }
                self.durable.notify_one();
            }
            Err(e) => {
                let msg = e.to_string();
                error!(error = %msg, "ALARM: buffer write failed; sources will retry from their last durable position");
                self.board.set_write_error(Some(msg.clone()));
                for a in answers {
                    let _ = a.send(Err(msg.clone()));
                }
                // Let a full disk or a transient error settle before the next try.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
