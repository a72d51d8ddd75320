//! A stand-in for the agent's buffer, for source tests: it gives every committed
//! record a dense seq, keeps the last position, and lets a test acknowledge seqs,
//! hold commits back, and stop and restart a source on the stored position the way
//! the agent would after a crash.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_protocol::messages::{record, Record};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{CommitRequest, Committed, Source, SourceContext, SourceError};

#[derive(Default)]
struct Durable {
    records: Vec<(u64, Record)>,
    position: Option<Vec<u8>>,
    head: u64,
    /// With `lean`: chunk data is dropped on arrival and only its length kept here
    /// (index = record index), so multi-gigabyte transfers fit in memory.
    lean: bool,
    data_lens: Vec<usize>,
}

/// The durable state that survives source restarts.
#[derive(Clone)]
pub(crate) struct Store {
    durable: Arc<Mutex<Durable>>,
    acked: watch::Sender<u64>,
    /// Commits carrying records wait while this many records are already stored.
    limit: watch::Sender<usize>,
}

pub(crate) struct Running {
    shutdown: CancellationToken,
    source: JoinHandle<Result<(), SourceError>>,
    committer: JoinHandle<()>,
}

impl Store {
    pub(crate) fn new() -> Self {
        Store {
            durable: Arc::default(),
            acked: watch::channel(0).0,
            limit: watch::channel(usize::MAX).0,
        }
    }

    /// A store that keeps chunk lengths but not chunk data.
    pub(crate) fn lean() -> Self {
        let s = Store::new();
        s.durable.lock().unwrap().lean = true;
        s
    }

    /// Length of each record's chunk data as it arrived (0 for other records).
    pub(crate) fn data_lens(&self) -> Vec<usize> {
        self.durable.lock().unwrap().data_lens.clone()
    }

    /// Runs `source` with the stored position as its resume point.
    pub(crate) fn start(&self, source: Box<dyn Source>) -> Running {
        let (tx, mut rx) = mpsc::channel::<CommitRequest>(4);
        let shutdown = CancellationToken::new();
        let (resume, head) = {
            let d = self.durable.lock().unwrap();
            (d.position.clone(), d.head)
        };
        let ctx = SourceContext::new(
            0,
            "test".into(),
            resume,
            head,
            self.acked.subscribe(),
            shutdown.clone(),
            tx,
        );
        let durable = Arc::clone(&self.durable);
        let mut limit = self.limit.subscribe();
        let stop = shutdown.clone();
        let committer = tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.recv() => match r { Some(r) => r, None => return },
                };
                if !req.records.is_empty() {
                    let stored = durable.lock().unwrap().records.len();
                    tokio::select! {
                        // Dropping the request unanswered is a crash before it was
                        // durable: the source sees `Shutdown`.
                        _ = stop.cancelled() => return,
                        r = limit.wait_for(|&l| stored < l) => if r.is_err() { return },
                    }
                }
                let mut d = durable.lock().unwrap();
                let answer = if req.records.is_empty() {
                    None
                } else {
                    let first_seq = d.head + 1;
                    for mut rec in req.records.into_list().unwrap() {
                        let mut len = 0;
                        if let Some(record::Body::FileChunk(c)) = rec.body.as_mut() {
                            len = c.data.len();
                            if d.lean {
                                c.data = Vec::new();
                            }
                        }
                        d.data_lens.push(len);
                        d.head += 1;
                        let seq = d.head;
                        d.records.push((seq, rec));
                    }
                    Some(Committed {
                        first_seq,
                        last_seq: d.head,
                    })
                };
                d.position = Some(req.position);
                drop(d);
                let _ = req.done.send(Ok(answer));
            }
        });
        let source = tokio::spawn(source.run(ctx));
        Running {
            shutdown,
            source,
            committer,
        }
    }

    pub(crate) fn records(&self) -> Vec<Record> {
        let d = self.durable.lock().unwrap();
        d.records.iter().map(|(_, r)| r.clone()).collect()
    }

    /// Every stored record with the seq the buffer gave it.
    pub(crate) fn records_with_seqs(&self) -> Vec<(u64, Record)> {
        self.durable.lock().unwrap().records.clone()
    }

    /// The buffer forgets every record above `seq` but keeps the last position: what
    /// a restarted source sees after a commit was written but its sync failed (the
    /// agent's head stays at the last synced seq while the stored position already
    /// names what came after it).
    pub(crate) fn lose_after(&self, seq: u64) {
        let mut d = self.durable.lock().unwrap();
        let keep = d.records.iter().take_while(|(s, _)| *s <= seq).count();
        d.records.truncate(keep);
        d.data_lens.truncate(keep);
        d.head = d.head.min(seq);
    }

    /// A buffer as another version left it: `position` stored with `head` (and
    /// none of the records before it).
    pub(crate) fn set_durable(&self, position: Vec<u8>, head: u64) {
        let mut d = self.durable.lock().unwrap();
        d.position = Some(position);
        d.head = head;
    }

    pub(crate) fn count(&self) -> usize {
        self.durable.lock().unwrap().records.len()
    }

    pub(crate) fn position(&self) -> Option<Vec<u8>> {
        self.durable.lock().unwrap().position.clone()
    }

    pub(crate) fn head(&self) -> u64 {
        self.durable.lock().unwrap().head
    }

    /// The exchange acknowledged every seq `<= seq`.
    pub(crate) fn ack(&self, seq: u64) {
        self.acked.send_replace(seq);
    }

    /// Lets commits with records through only while fewer than `n` records are stored.
    pub(crate) fn hold_at(&self, n: usize) {
        self.limit.send_replace(n);
    }

    pub(crate) fn release(&self) {
        self.limit.send_replace(usize::MAX);
    }
}

impl Running {
    /// Polls `cond` until it holds; fails the test after 20 s or if the source ended.
    pub(crate) async fn wait_for(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if cond() {
                return;
            }
            if self.source.is_finished() {
                let r = (&mut self.source).await;
                panic!("source ended while waiting for {what}: {r:?}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Cancels the source (a shutdown or crash) and returns how it ended.
    pub(crate) async fn stop(self) -> Result<(), SourceError> {
        self.shutdown.cancel();
        let r = self.source.await.unwrap();
        self.committer.await.unwrap();
        r
    }
}
