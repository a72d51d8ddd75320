//! The committer: the one writer of the buffer. It takes commit requests from all
//! sources, compresses them, writes each group atomically, makes it durable with one
//! sync (group commit), and only then answers the sources.
//!
//! Two stages, so compression never waits for a sync and a sync never waits for
//! compression:
//!
//! ```text
//!  sources ──▶ encode stage ──(≤ ENCODE_AHEAD in order)──▶ write stage ──▶ sled + fdatasync
//!              one blocking task per                       every request already
//!              request, in parallel                        encoded → one group
//! ```
//!
//! Order: requests are written in the order they arrived, so a source's commits
//! become durable in the order it submitted them. A failed commit refuses every
//! later request of the same stream and source instance (`CommitRequest::epoch`):
//! a source may keep several commits in flight, and a later one must never become
//! durable after an earlier one was lost.
//!
//! Backpressure (DESIGN invariant 4): while the buffer holds `max_size` or more,
//! the write stage stops taking requests; the bounded channels fill and every
//! source's `commit` waits. Nothing is dropped. Acks free space and wake it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_adapters::{CommitRequest, Committed, Records, Ticket};
use ferry_protocol::batch::{encode_buf, encode_records, EncodedRecords};
use ferry_protocol::messages::{Record, RecordList};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::buffer::{Buffer, CommitItem};
use crate::status::Board;

/// Most requests folded into one group commit.
const MAX_GROUP: usize = 512;
/// Requests encoded ahead of the write stage. Enough to keep both cores compressing
/// while a sync is under way, few enough that a full buffer stops sources at once.
const ENCODE_AHEAD: usize = 8;
/// Below this many raw bytes a batch is compressed inline: a blocking task would
/// cost more than the work (small batches are the latency path).
const INLINE_ENCODE_BYTES: usize = 16 * 1024;

/// Exit status after a failed buffer write or sync (EX_IOERR), so the supervisor
/// restarts the agent from what is on disk.
pub const EXIT_BUFFER_FAILED: i32 = 74;

/// Stream names by the index their sources commit under
/// ([`CommitRequest::stream`]). An index keeps its name for the process's life:
/// a reload appends streams it adds and never reorders, so a source that keeps
/// running across a reload keeps committing under its index.
#[derive(Debug, Default)]
pub struct Slots(RwLock<Arc<Vec<String>>>);

impl Slots {
    #[cfg(test)]
    pub fn new(names: Vec<String>) -> Slots {
        Slots(RwLock::new(Arc::new(names)))
    }

    /// The names as they are now (a reload may append more later).
    pub fn current(&self) -> Arc<Vec<String>> {
        self.0.read().map(|g| Arc::clone(&g)).unwrap_or_default()
    }

    /// The index of `name`, appended if it has none yet.
    pub fn index(&self, name: &str) -> usize {
        let Ok(mut g) = self.0.write() else {
            return usize::MAX;
        };
        if let Some(i) = g.iter().position(|n| n == name) {
            return i;
        }
        Arc::make_mut(&mut g).push(name.to_string());
        g.len() - 1
    }
}

/// The buffer's bounds, which a reload may change while the committer runs.
#[derive(Debug)]
pub struct Limits {
    max_size: AtomicU64,
    /// Free space to leave on the buffer's filesystem.
    min_free: AtomicU64,
}

impl Limits {
    pub fn new(max_size: u64, min_free: u64) -> Limits {
        Limits {
            max_size: AtomicU64::new(max_size),
            min_free: AtomicU64::new(min_free),
        }
    }

    pub fn set(&self, max_size: u64, min_free: u64) {
        self.max_size.store(max_size, Ordering::Relaxed);
        self.min_free.store(min_free, Ordering::Relaxed);
    }

    fn max_size(&self) -> u64 {
        self.max_size.load(Ordering::Relaxed)
    }

    fn min_free(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }
}

pub struct Committer {
    pub buffer: Arc<Buffer>,
    pub names: Arc<Slots>,
    pub limits: Arc<Limits>,
    pub rx: mpsc::Receiver<CommitRequest>,
    /// Signalled after every durable commit (the shipper waits on it).
    pub durable: Arc<Notify>,
    /// Signalled when acks free space.
    pub space: Arc<Notify>,
    pub board: Arc<Board>,
}

type Answer = tokio::sync::oneshot::Sender<Result<Option<Committed>, String>>;
type Encoded = Result<Option<EncodedRecords>, String>;

/// A request on its way through the encode stage.
struct Encoding {
    stream: usize,
    epoch: u64,
    position: Vec<u8>,
    done: Answer,
    work: Work,
    _ticket: Ticket,
}

enum Work {
    Ready(Encoded),
    Running(JoinHandle<Encoded>),
}

impl Work {
    fn is_ready(&self) -> bool {
        match self {
            Work::Ready(_) => true,
            Work::Running(h) => h.is_finished(),
        }
    }

    async fn result(self) -> Encoded {
        match self {
            Work::Ready(r) => r,
            Work::Running(h) => h
                .await
                .unwrap_or_else(|e| Err(format!("compressing a batch failed: {e}"))),
        }
    }
}

/// A request ready for the buffer.
struct Ready {
    stream: usize,
    epoch: u64,
    position: Vec<u8>,
    done: Answer,
    encoded: Encoded,
    _ticket: Ticket,
}

impl Encoding {
    async fn ready(self) -> Ready {
        Ready {
            stream: self.stream,
            epoch: self.epoch,
            position: self.position,
            done: self.done,
            encoded: self.work.result().await,
            _ticket: self._ticket,
        }
    }
}

fn encode(stream: &str, records: Records) -> Encoded {
    if records.is_empty() {
        return Ok(None);
    }
    match records {
        Records::List(records) => encode_records(&RecordList { records }),
        Records::Encoded(buf) => encode_buf(&buf),
    }
    .map(Some)
    .map_err(|e| format!("stream {stream}: {e}"))
}

/// Starts compressing each request as it arrives, and passes them on in order.
async fn encode_stage(
    mut rx: mpsc::Receiver<CommitRequest>,
    names: Arc<Slots>,
    tx: mpsc::Sender<Encoding>,
) {
    while let Some(r) = rx.recv().await {
        let names = names.current();
        let name = names.get(r.stream).cloned().unwrap_or_default();
        let raw: usize = match &r.records {
            Records::List(l) => l.iter().map(approx_len).sum(),
            Records::Encoded(b) => b.len(),
        };
        let work = if r.stream >= names.len() {
            Work::Ready(Err(format!("unknown stream index {}", r.stream)))
        } else if raw < INLINE_ENCODE_BYTES {
            Work::Ready(encode(&name, r.records))
        } else {
            let records = r.records;
            Work::Running(tokio::task::spawn_blocking(move || encode(&name, records)))
        };
        let e = Encoding {
            stream: r.stream,
            epoch: r.epoch,
            position: r.position,
            done: r.done,
            work,
            _ticket: r.ticket,
        };
        if tx.send(e).await.is_err() {
            return;
        }
    }
}

fn approx_len(r: &Record) -> usize {
    use ferry_protocol::messages::record::Body;
    16 + r.position.len()
        + match &r.body {
            Some(Body::Line(l)) => l.len(),
            Some(Body::FileChunk(c)) => c.data.len(),
            // Rows and the rest: assume big enough to be worth a task.
            _ => 256,
        }
}

impl Committer {
    /// Runs until every source has dropped its sender and everything handed over is
    /// written.
    pub async fn run(self) {
        let Committer {
            buffer,
            names,
            limits,
            rx,
            durable,
            space,
            board,
        } = self;
        let (tx, encoded) = mpsc::channel(ENCODE_AHEAD);
        let encoder = tokio::spawn(encode_stage(rx, Arc::clone(&names), tx));
        let mut writer = Writer {
            refused: Vec::new(),
            buffer,
            names,
            limits,
            rx: encoded,
            durable,
            space,
            board,
        };
        writer.run().await;
        let _ = encoder.await;
    }
}

struct Writer {
    buffer: Arc<Buffer>,
    names: Arc<Slots>,
    limits: Arc<Limits>,
    rx: mpsc::Receiver<Encoding>,
    durable: Arc<Notify>,
    space: Arc<Notify>,
    board: Arc<Board>,
    /// Per stream: requests of this epoch or older are refused (a commit of that
    /// source instance failed). 0: none.
    refused: Vec<u64>,
}

impl Writer {
    async fn run(&mut self) {
        let mut full = false;
        let mut low = false;
        let mut carry: Option<Encoding> = None;
        loop {
            // 1. Backpressure: no new requests while the buffer is over its bound or
            //    its disk is nearly full (a write that fails for want of space is
            //    worse than a pause: it would fail the sources over and over).
            let (max_size, min_free) = (self.limits.max_size(), self.limits.min_free());
            let over = self.buffer.total_bytes() >= max_size;
            let free = self.buffer.free_disk_bytes();
            let short = free.is_some_and(|f| f < min_free);
            if over != full {
                full = over;
                self.board.set_buffer_full(over);
                if over {
                    warn!(
                        buffered = self.buffer.total_bytes(),
                        max_size,
                        "ALARM: buffer full, sources paused until the exchange acknowledges data"
                    );
                } else {
                    info!(
                        buffered = self.buffer.total_bytes(),
                        "buffer below its bound again, sources resume"
                    );
                }
            }
            if short != low {
                low = short;
                self.board.set_disk_low(short);
                if short {
                    warn!(
                        free = free.unwrap_or(0),
                        min_free,
                        "ALARM: the buffer's disk is nearly full, sources paused until space is freed or the exchange acknowledges data"
                    );
                } else {
                    info!(
                        free = free.unwrap_or(0),
                        "disk space available again, sources resume"
                    );
                }
            }
            if over || short {
                // Acks wake us; the timeout re-checks (freed disk space sends no
                // signal).
                tokio::select! {
                    _ = self.space.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                if carry.is_none() && self.rx.is_closed() && self.rx.is_empty() {
                    return;
                }
                continue;
            }
            // 2. Take one request, then every following one already encoded.
            let first = match carry.take() {
                Some(e) => e,
                None => match self.rx.recv().await {
                    Some(e) => e,
                    None => return,
                },
            };
            let mut group = vec![first.ready().await];
            while group.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(e) if e.work.is_ready() => group.push(e.ready().await),
                    Ok(e) => {
                        // Still compressing: it heads the next group, so order holds.
                        carry = Some(e);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit(group).await;
        }
    }

    /// Writes a group; answers every request in it.
    async fn commit(&mut self, group: Vec<Ready>) {
        // Refusals first, in order: after a failed request of a source instance,
        // its later requests must fail too.
        let mut answers: Vec<(Answer, Option<String>)> = Vec::with_capacity(group.len());
        let mut work: Vec<(usize, u64, Option<EncodedRecords>, Vec<u8>)> = Vec::new();
        let mut tickets = Vec::with_capacity(group.len());
        for r in group {
            tickets.push(r._ticket);
            let refused = self.refused.get(r.stream).copied().unwrap_or(0);
            let verdict = if r.epoch <= refused {
                Some(format!(
                    "stream {}: an earlier commit of this source failed; it restarts from its last durable position",
                    self.name(r.stream)
                ))
            } else {
                match r.encoded {
                    Ok(records) => {
                        work.push((r.stream, r.epoch, records, r.position));
                        None
                    }
                    Err(e) => {
                        self.refuse(r.stream, r.epoch);
                        Some(e)
                    }
                }
            };
            answers.push((r.done, verdict));
        }
        let keys: Vec<(usize, u64)> = work.iter().map(|w| (w.0, w.1)).collect();
        let buffer = Arc::clone(&self.buffer);
        let names = self.names.current();
        let result = if work.is_empty() {
            Ok(Ok(Vec::new()))
        } else {
            tokio::task::spawn_blocking(move || {
                let items: Vec<CommitItem<'_>> = work
                    .iter()
                    .map(|(stream, _, records, position)| CommitItem {
                        stream: &names[*stream],
                        records: records.as_ref(),
                        position,
                    })
                    .collect();
                buffer.commit_group(&items)
            })
            .await
            .map_err(|e| format!("buffer commit task failed: {e}"))
        };
        let committed = match result {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e),
        };
        match committed {
            Ok(done) => {
                self.board.set_write_error(None);
                let mut done = done.into_iter();
                for (answer, verdict) in answers {
                    let _ = match verdict {
                        Some(e) => answer.send(Err(e)),
                        None => answer.send(Ok(done.next().flatten())),
                    };
                }
                self.durable.notify_one();
            }
            Err(msg) => {
                self.board.set_write_error(Some(msg.clone()));
                if self.buffer.poisoned() {
                    // Nothing was confirmed to any source, and nothing more may be
                    // written by this process (see the buffer's module doc): answer
                    // the requests, then exit so the supervisor restarts the agent
                    // from what is on disk.
                    error!(error = %msg, "ALARM: a buffer write or sync failed; the agent stops capturing and exits so it restarts from what is on disk");
                    for (answer, verdict) in answers {
                        let _ = answer.send(Err(verdict.unwrap_or_else(|| msg.clone())));
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    std::process::exit(EXIT_BUFFER_FAILED);
                }
                error!(error = %msg, "ALARM: buffer write failed; sources will retry from their last durable position");
                for (stream, epoch) in keys {
                    self.refuse(stream, epoch);
                }
                for (answer, verdict) in answers {
                    let _ = answer.send(Err(verdict.unwrap_or_else(|| msg.clone())));
                }
                // Let a full disk or a transient error settle before the next try.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        drop(tickets);
    }

    fn refuse(&mut self, stream: usize, epoch: u64) {
        if self.refused.len() <= stream {
            self.refused.resize(stream + 1, 0);
        }
        self.refused[stream] = self.refused[stream].max(epoch);
    }

    fn name(&self, stream: usize) -> String {
        self.names
            .current()
            .get(stream)
            .cloned()
            .unwrap_or_else(|| "?".into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ferry_adapters::SourceContext;
    use ferry_protocol::messages::record::Body;
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::*;

    fn line(text: &str) -> Record {
        Record {
            time_unix_ms: 1,
            position: String::new(),
            body: Some(Body::Line(text.as_bytes().to_vec())),
        }
    }

    /// A record too big for one batch: the encode stage refuses it.
    fn oversized() -> Record {
        Record {
            time_unix_ms: 1,
            position: String::new(),
            body: Some(Body::Line(vec![b'x'; 9 << 20])),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_commit_later_ones_of_that_source_fail_too() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = Arc::new(Buffer::open(&dir.path().join("buf"), 1 << 20).unwrap());
        let (tx, rx) = mpsc::channel(16);
        let committer = tokio::spawn(
            Committer {
                buffer: buffer.clone(),
                names: Arc::new(Slots::new(vec!["s".into()])),
                limits: Arc::new(Limits::new(1 << 30, 0)),
                rx,
                durable: Arc::new(Notify::new()),
                space: Arc::new(Notify::new()),
                board: Arc::new(Board::default()),
            }
            .run(),
        );
        let (_acked_tx, acked) = watch::channel(0);
        let shutdown = CancellationToken::new();
        let ctx = |resume, tx: &mpsc::Sender<CommitRequest>| {
            SourceContext::new(
                0,
                "s".into(),
                resume,
                0,
                acked.clone(),
                shutdown.clone(),
                tx.clone(),
            )
        };
        let first = ctx(None, &tx);
        // Three commits in flight at once; the middle one cannot be stored.
        let a = first
            .submit(vec![line("a")], b"after-a".to_vec())
            .await
            .unwrap();
        let b = first
            .submit(vec![oversized()], b"after-b".to_vec())
            .await
            .unwrap();
        let c = first
            .submit(vec![line("c")], b"after-c".to_vec())
            .await
            .unwrap();
        assert_eq!(
            a.durable().await.unwrap(),
            Some(Committed {
                first_seq: 1,
                last_seq: 1
            })
        );
        assert!(b.durable().await.is_err());
        let e = c.durable().await.unwrap_err().to_string();
        assert!(e.contains("an earlier commit of this source failed"), "{e}");
        // The position stays after the last commit that was durable: "c" must not
        // be durable with "b" lost before it.
        first.tracker().settled().await;
        assert_eq!(buffer.position("s").unwrap().unwrap(), b"after-a");
        assert_eq!(buffer.state("s").head, 1);

        // The restarted source (a new instance) is served again.
        let second = ctx(buffer.position("s").unwrap(), &tx);
        assert!(second.epoch() > first.epoch());
        let d = second
            .commit(vec![line("b2")], b"after-b2".to_vec())
            .await
            .unwrap();
        assert_eq!(
            d,
            Some(Committed {
                first_seq: 2,
                last_seq: 2
            })
        );
        drop((first, second, tx));
        committer.await.unwrap();
    }
}
