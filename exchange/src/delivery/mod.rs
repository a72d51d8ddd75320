//! Deliveries: what agents shipped, fed on to where the city uses it.
//!
//! Each `[[delivery]]` of `exchange.toml` is one task. It keeps, per (agent,
//! stream) it receives, a checkpoint made durable by its sink together with what
//! it delivered (in the target database's own transaction for `postgres`; after
//! the files for `files`), so a crash anywhere neither repeats nor skips a
//! record. It is woken by the store after each durable commit (no polling),
//! reads from the store through the [`crate::store::Ledger`] seam, and applies
//! in chunks.
//!
//! **Sharing classes are enforced here.** A wildcard pattern (`*/STREAM`,
//! `AGENT/*`) matches only records stored while their stream was declared
//! `unconditional`; a `conditional` stream reaches only a delivery that names it
//! exactly. A record stored before the exchange recorded any class is treated as
//! conditional.

mod files;
mod jetstream;
mod postgres;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_protocol::messages::{record::Body, Record};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{DeliveryKind, DeliverySection};
use crate::store::{now_unix_ms, ClassChange, SharedStore};

/// Records one chunk reads before applying them (then up to the end of the
/// source transaction it is in).
const CHUNK_RECORDS: usize = 10_000;
/// A chunk is cut here even inside a source transaction.
const CHUNK_HARD_LIMIT: usize = 4 * CHUNK_RECORDS;
/// Encoded bytes one chunk reads before applying them (likewise extended).
const CHUNK_BYTES: usize = 8 << 20;
/// Chunks of one stream one pass applies before it looks at the others.
const CHUNKS_PER_PASS: usize = 16;
/// How long a delivery waits after a retryable failure, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One `AGENT/STREAM` pattern; `None` is `*`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    agent: Option<String>,
    stream: Option<String>,
}

impl Pattern {
    pub fn parse(s: &str) -> Option<Pattern> {
        let (a, st) = s.split_once('/')?;
        let part = |p: &str| -> Option<Option<String>> {
            if p == "*" {
                Some(None)
            } else if ferry_protocol::session::valid_stream_name(p) {
                Some(Some(p.to_string()))
            } else {
                None
            }
        };
        Some(Pattern {
            agent: part(a)?,
            stream: part(st)?,
        })
    }

    fn exact(&self) -> bool {
        self.agent.is_some() && self.stream.is_some()
    }

    fn matches(&self, agent: &str, stream: &str) -> bool {
        self.agent.as_deref().is_none_or(|a| a == agent)
            && self.stream.as_deref().is_none_or(|s| s == stream)
    }
}

/// What one delivery receives.
#[derive(Debug, Clone)]
pub struct Subscription {
    patterns: Vec<Pattern>,
}

impl Subscription {
    pub fn new(d: &DeliverySection) -> Subscription {
        Subscription {
            patterns: d.streams.iter().filter_map(|p| Pattern::parse(p)).collect(),
        }
    }

    /// Whether any pattern names (agent, stream), whatever its class.
    pub fn names(&self, agent: &str, stream: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(agent, stream))
    }

    /// Whether a record stored under `class` reaches this delivery.
    pub fn admits(&self, agent: &str, stream: &str, class: Option<&ClassChange>) -> bool {
        let unconditional = class.is_some_and(|c| c.sharing == "unconditional");
        self.patterns
            .iter()
            .any(|p| p.matches(agent, stream) && (p.exact() || unconditional))
    }
}

/// Why a chunk was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Worth retrying (target unreachable, restarting, a transient failure).
    #[error("{0}")]
    Retry(String),
    /// Needs an operator: this stream stops in this delivery until then.
    #[error("{0}")]
    Fatal(String),
}

/// Where a delivery writes.
enum Sink {
    Files(files::FilesSink),
    Postgres(Box<postgres::PgSink>),
    Jetstream(Box<jetstream::JsSink>),
}

impl Sink {
    async fn open(d: &DeliverySection) -> Result<Sink, DeliveryError> {
        match d.kind {
            DeliveryKind::Files => Ok(Sink::Files(files::FilesSink::open(d)?)),
            DeliveryKind::Postgres => {
                Ok(Sink::Postgres(Box::new(postgres::PgSink::open(d).await?)))
            }
            DeliveryKind::Jetstream => {
                Ok(Sink::Jetstream(Box::new(jetstream::JsSink::open(d).await?)))
            }
        }
    }

    /// The last seq delivered of (agent, stream); 0 when none.
    async fn checkpoint(&mut self, agent: &str, stream: &str) -> Result<u64, DeliveryError> {
        match self {
            Sink::Files(s) => s.checkpoint(agent, stream),
            Sink::Postgres(s) => s.checkpoint(agent, stream).await,
            Sink::Jetstream(s) => s.checkpoint(agent, stream).await,
        }
    }

    /// Delivers `records` (seq order) and makes the checkpoint `last` durable
    /// with them.
    async fn apply(
        &mut self,
        store: &SharedStore,
        agent: &str,
        stream: &str,
        records: Vec<(u64, Record)>,
        stored: Vec<u64>,
        last: u64,
    ) -> Result<(), DeliveryError> {
        match self {
            Sink::Files(s) => s.apply(store, agent, stream, records, last).await,
            Sink::Postgres(s) => s.apply(agent, stream, records, last).await,
            Sink::Jetstream(s) => s.apply(store, agent, stream, records, stored, last).await,
        }
    }
}

/// Where one delivery stands on one stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamStatus {
    pub delivery: String,
    pub agent: String,
    pub stream: String,
    /// Every record up to this seq was delivered (or is not for this delivery).
    pub checkpoint: u64,
    /// Records stored and not yet passed.
    pub lag_records: u64,
    /// Age of the oldest record not yet passed, seconds (0 when caught up).
    pub lag_seconds: f64,
    pub last_error: Option<String>,
    /// The stream stopped in this delivery until an operator acts (restart).
    pub stopped: bool,
    #[serde(skip)]
    oldest_pending_ms: Option<u64>,
}

impl StreamStatus {
    fn new(delivery: &str, agent: &str, stream: &str) -> Self {
        StreamStatus {
            delivery: delivery.into(),
            agent: agent.into(),
            stream: stream.into(),
            checkpoint: 0,
            lag_records: 0,
            lag_seconds: 0.0,
            last_error: None,
            stopped: false,
            oldest_pending_ms: None,
        }
    }

    /// The status as of now (ages computed at the time of asking).
    fn at(&self, now_ms: u64) -> StreamStatus {
        let mut s = self.clone();
        s.lag_seconds = self
            .oldest_pending_ms
            .map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
        s
    }
}

type Key = (String, String, String);

/// Every delivery's status, shared with the admin socket.
#[derive(Clone, Default)]
pub struct Statuses(Arc<Mutex<BTreeMap<Key, StreamStatus>>>);

impl Statuses {
    fn update(&self, delivery: &str, agent: &str, stream: &str, f: impl FnOnce(&mut StreamStatus)) {
        if let Ok(mut m) = self.0.lock() {
            let e = m
                .entry((delivery.into(), agent.into(), stream.into()))
                .or_insert_with(|| StreamStatus::new(delivery, agent, stream));
            f(e);
        }
    }

    /// Drops a delivery's lines (it was stopped by a reload).
    fn forget(&self, delivery: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.retain(|k, _| k.0 != delivery);
        }
    }

    /// One line per (delivery, agent, stream), in that order.
    pub fn snapshot(&self) -> Vec<StreamStatus> {
        let now = now_unix_ms();
        self.0
            .lock()
            .map(|m| m.values().map(|s| s.at(now)).collect())
            .unwrap_or_default()
    }
}

/// The configured deliveries, as the running exchange has them now (a reload
/// replaces them; retention reads them at every pass).
pub type Sections = Arc<std::sync::RwLock<Vec<DeliverySection>>>;

/// One task per delivery. A reload ([`Deliveries::apply`]) starts the added
/// ones, stops the removed ones and restarts the changed ones, and those with
/// a stream stopped on a fatal error; the others run on untouched.
pub struct Deliveries {
    store: SharedStore,
    statuses: Statuses,
    sections: Sections,
    shutdown: CancellationToken,
    running: BTreeMap<String, RunningDelivery>,
}

struct RunningDelivery {
    /// Its configuration, to tell a changed delivery on reload.
    config: String,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Deliveries {
    /// Starts one task per delivery.
    pub fn start(
        deliveries: &[DeliverySection],
        store: SharedStore,
        shutdown: CancellationToken,
    ) -> Deliveries {
        let mut d = Deliveries {
            store,
            statuses: Statuses::default(),
            sections: Sections::default(),
            shutdown,
            running: BTreeMap::new(),
        };
        d.spawn_missing(deliveries);
        d
    }

    pub fn statuses(&self) -> Statuses {
        self.statuses.clone()
    }

    pub fn sections(&self) -> Sections {
        self.sections.clone()
    }

    fn spawn_missing(&mut self, deliveries: &[DeliverySection]) {
        if let Ok(mut s) = self.sections.write() {
            *s = deliveries.to_vec();
        }
        for d in deliveries {
            if self.running.contains_key(&d.name) {
                continue;
            }
            let shutdown = self.shutdown.child_token();
            let task = tokio::spawn(run(
                d.clone(),
                self.store.clone(),
                self.statuses.clone(),
                shutdown.clone(),
            ));
            self.running.insert(
                d.name.clone(),
                RunningDelivery {
                    config: format!("{d:?}"),
                    shutdown,
                    task,
                },
            );
        }
    }

    /// Takes a reloaded configuration's deliveries. A delivery stops between
    /// chunks, each applied whole with its checkpoint, so stopping and
    /// starting again neither repeats nor skips a record.
    pub async fn apply(&mut self, deliveries: &[DeliverySection]) {
        let next: BTreeMap<&str, String> = deliveries
            .iter()
            .map(|d| (d.name.as_str(), format!("{d:?}")))
            .collect();
        let stalled: HashSet<String> = self
            .statuses
            .snapshot()
            .into_iter()
            .filter(|s| s.stopped)
            .map(|s| s.delivery)
            .collect();
        let stopping: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| {
                next.get(name.as_str()) != Some(&r.config) || stalled.contains(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stopping {
            if let Some(r) = self.running.remove(&name) {
                r.shutdown.cancel();
                let _ = r.task.await;
                self.statuses.forget(&name);
            }
        }
        self.spawn_missing(deliveries);
    }

    /// Waits for every delivery to stop (after the exchange's shutdown).
    pub async fn stopped(self) {
        for r in self.running.into_values() {
            let _ = r.task.await;
        }
    }
}

/// What one read of a stream gave.
struct Chunk {
    /// (seq, record) this delivery takes.
    records: Vec<(u64, Record)>,
    /// When each of `records` was stored (Unix ms).
    stored: Vec<u64>,
    /// The last seq read (passed records included).
    last: u64,
    /// When the first record after `last` was stored, if there is one.
    next_stored_ms: Option<u64>,
}

/// Reads the records after `cursor` of a stream on a blocking thread, keeping
/// those `keep` takes; started at once, so the next chunk is read while the
/// current one is applied.
fn read_chunk(
    store: SharedStore,
    agent: String,
    stream: String,
    cursor: u64,
    keep: impl Fn(u64, &Record) -> bool + Send + 'static,
) -> JoinHandle<Result<Chunk, DeliveryError>> {
    tokio::task::spawn_blocking(move || {
        let mut chunk = Chunk {
            records: Vec::new(),
            stored: Vec::new(),
            last: cursor,
            next_stored_ms: None,
        };
        let (mut read, mut bytes) = (0usize, 0usize);
        let mut full = false;
        store
            .records(&agent, &stream, cursor + 1, &mut |r, stored_ms| {
                if full {
                    // The first record not taken: how long it has waited.
                    chunk.next_stored_ms = Some(stored_ms);
                    return false;
                }
                read += 1;
                bytes += prost::Message::encoded_len(&r.record);
                chunk.last = r.seq;
                let ends_txn = ferry_protocol::rows::ends_txn(&r.record);
                if keep(r.seq, &r.record) {
                    chunk.records.push((r.seq, r.record));
                    chunk.stored.push(stored_ms);
                }
                // Past the soft limits, stop at the end of a source transaction.
                let soft = read >= CHUNK_RECORDS || bytes >= CHUNK_BYTES;
                full = soft && (ends_txn || read >= CHUNK_HARD_LIMIT || bytes >= 4 * CHUNK_BYTES);
                true
            })
            .map_err(|e| DeliveryError::Retry(format!("reading {agent}/{stream}: {e}")))?;
        Ok(chunk)
    })
}

async fn run(
    d: DeliverySection,
    store: SharedStore,
    statuses: Statuses,
    shutdown: CancellationToken,
) {
    let sub = Subscription::new(&d);
    let mut changes = store.subscribe();
    let mut progress = Progress::default();
    let mut backoff = Duration::from_millis(500);
    info!(delivery = %d.name, kind = ?d.kind, "delivery started");
    while !shutdown.is_cancelled() {
        changes.borrow_and_update();
        let (progressed, failed) = match pass(&d, &sub, &store, &statuses, &mut progress, &shutdown)
            .await
        {
            Ok(p) => (p, false),
            Err(e) => {
                warn!(delivery = %d.name, error = %e, retry_in = ?backoff, "delivery failed; retrying");
                progress.sink = None;
                (false, true)
            }
        };
        if progressed {
            backoff = Duration::from_millis(500);
            continue;
        }
        let wait = if failed {
            let w = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            w
        } else {
            MAX_BACKOFF
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = changes.changed(), if !failed => if r.is_err() { break },
            _ = tokio::time::sleep(wait) => {}
        }
    }
    info!(delivery = %d.name, "delivery stopped");
}

/// What a delivery keeps between passes.
#[derive(Default)]
struct Progress {
    /// Open while it works; dropped (to reconnect) on an error.
    sink: Option<Sink>,
    /// Each stream's checkpoint, once read from the sink.
    cursors: HashMap<(String, String), u64>,
    /// Streams stopped on a fatal error until an operator acts.
    stopped: HashSet<(String, String)>,
}

/// One pass over every stream the delivery receives. `Ok(true)` when it
/// delivered or passed anything; an `Err` drops the sink (reconnect). Once
/// `shutdown` is cancelled no further chunk is applied: a chunk is applied
/// whole with its checkpoint, so stopping between chunks loses nothing, and a
/// stopping exchange does not first work through its whole backlog.
async fn pass(
    d: &DeliverySection,
    sub: &Subscription,
    store: &SharedStore,
    statuses: &Statuses,
    progress: &mut Progress,
    shutdown: &CancellationToken,
) -> Result<bool, DeliveryError> {
    let Progress {
        sink,
        cursors,
        stopped,
    } = progress;
    let sink = match sink {
        Some(s) => s,
        None => sink.insert(Sink::open(d).await?),
    };
    let streams = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.streams())
            .await
            .map_err(|e| DeliveryError::Retry(e.to_string()))?
            .map_err(|e| DeliveryError::Retry(format!("listing streams: {e}")))?
    };
    let mut progressed = false;
    for info in streams {
        if shutdown.is_cancelled() {
            break;
        }
        let key = (info.agent.clone(), info.stream.clone());
        if !sub.names(&info.agent, &info.stream) || stopped.contains(&key) {
            continue;
        }
        let cursor = match cursors.get(&key) {
            Some(&c) => c,
            None => {
                let c = sink.checkpoint(&info.agent, &info.stream).await?;
                cursors.insert(key.clone(), c);
                c
            }
        };
        let stored_up_to = info.next_seq.saturating_sub(1);
        if cursor >= stored_up_to {
            statuses.update(&d.name, &info.agent, &info.stream, |s| {
                s.checkpoint = cursor;
                s.lag_records = 0;
                s.oldest_pending_ms = None;
            });
            continue;
        }
        // `keep` runs on the reading thread.
        let kinds = KindFilter::of(sink);
        let read = |from: u64| {
            let meta = info.meta.clone();
            let (agent, stream) = (info.agent.clone(), info.stream.clone());
            let sub = sub.clone();
            read_chunk(
                store.clone(),
                info.agent.clone(),
                info.stream.clone(),
                from,
                move |seq, r| kinds.takes(r) && sub.admits(&agent, &stream, meta.class_at(seq)),
            )
        };
        let mut cursor = cursor;
        let mut next = Some(read(cursor));
        for _ in 0..CHUNKS_PER_PASS {
            let Some(reading) = next.take() else { break };
            if shutdown.is_cancelled() {
                break;
            }
            let chunk = reading
                .await
                .map_err(|e| DeliveryError::Retry(format!("reading the store: {e}")))??;
            if chunk.last <= cursor {
                break;
            }
            // The next chunk is read while this one is applied.
            if chunk.last < stored_up_to {
                next = Some(read(chunk.last));
            }
            // Applied even when it took nothing, so the durable checkpoint covers
            // the records passed.
            let n = chunk.records.len();
            match sink
                .apply(
                    store,
                    &info.agent,
                    &info.stream,
                    chunk.records,
                    chunk.stored,
                    chunk.last,
                )
                .await
            {
                Ok(()) => {}
                Err(DeliveryError::Fatal(why)) => {
                    error!(delivery = %d.name, agent = %info.agent, stream = %info.stream, error = %why, "ALARM: delivery of this stream stopped until an operator acts");
                    statuses.update(&d.name, &info.agent, &info.stream, |s| {
                        s.last_error = Some(why.clone());
                        s.stopped = true;
                    });
                    stopped.insert(key.clone());
                    break;
                }
                Err(e) => {
                    statuses.update(&d.name, &info.agent, &info.stream, |s| {
                        s.last_error = Some(e.to_string());
                    });
                    return Err(e);
                }
            }
            tracing::debug!(delivery = %d.name, agent = %info.agent, stream = %info.stream, records = n, up_to = chunk.last, "delivered");
            cursor = chunk.last;
            cursors.insert(key.clone(), cursor);
            progressed = true;
            statuses.update(&d.name, &info.agent, &info.stream, |s| {
                s.checkpoint = cursor;
                s.lag_records = stored_up_to.saturating_sub(cursor);
                s.oldest_pending_ms = chunk.next_stored_ms;
                s.last_error = None;
            });
        }
    }
    Ok(progressed)
}

/// Which record kinds a sink takes, copyable onto the reading thread.
#[derive(Clone, Copy)]
enum KindFilter {
    Files,
    Rows,
    All,
}

impl KindFilter {
    fn of(sink: &Sink) -> KindFilter {
        match sink {
            Sink::Files(_) => KindFilter::Files,
            Sink::Postgres(_) => KindFilter::Rows,
            Sink::Jetstream(_) => KindFilter::All,
        }
    }

    fn takes(self, r: &Record) -> bool {
        match self {
            KindFilter::Files => matches!(&r.body, Some(Body::FileChunk(c)) if c.end.is_some()),
            KindFilter::All => true,
            KindFilter::Rows => ferry_protocol::rows::is_row_record(r),
        }
    }
}

/// The status of every (delivery, stream) from the sinks' durable checkpoints,
/// for `ferry-exchange deliveries` when no exchange is serving.
pub async fn offline_report(
    deliveries: &[DeliverySection],
    store: &SharedStore,
) -> Vec<StreamStatus> {
    let streams = store.streams().unwrap_or_default();
    let now = now_unix_ms();
    let mut out = Vec::new();
    for d in deliveries {
        let sub = Subscription::new(d);
        let mut sink = Sink::open(d).await;
        for info in streams.iter().filter(|i| sub.names(&i.agent, &i.stream)) {
            let mut s = StreamStatus::new(&d.name, &info.agent, &info.stream);
            let cp = match &mut sink {
                Ok(sink) => sink.checkpoint(&info.agent, &info.stream).await,
                Err(e) => Err(DeliveryError::Retry(e.to_string())),
            };
            match cp {
                Ok(c) => {
                    s.checkpoint = c;
                    let up_to = info.next_seq.saturating_sub(1);
                    s.lag_records = up_to.saturating_sub(c);
                    if c < up_to {
                        let _ = store.records(&info.agent, &info.stream, c + 1, &mut |_, t| {
                            s.oldest_pending_ms = Some(t);
                            false
                        });
                    }
                }
                Err(e) => s.last_error = Some(e.to_string()),
            }
            out.push(s.at(now));
        }
    }
    out
}

#[cfg(test)]
mod tests;

/// Retention (`[store] retain`): every minute (every half of `retain` when
/// that is shorter, at least every second), removes each stream's records
/// that every delivery naming the stream has passed (by its live checkpoint;
/// a delivery that has not reported on a stream since this start holds it
/// whole) and that were stored longer ago than `retain`. A stream no delivery
/// names goes by age alone.
pub fn start_retention(
    retain: Duration,
    deliveries: Sections,
    statuses: Statuses,
    store: SharedStore,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let every = (retain / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            // The deliveries before their checkpoints: one a reload adds has
            // no checkpoint yet, so it holds its streams whole.
            let Ok(subs) = deliveries.read().map(|d| {
                d.iter()
                    .map(|d| (d.name.clone(), Subscription::new(d)))
                    .collect::<Vec<_>>()
            }) else {
                continue;
            };
            let passed = statuses.snapshot();
            let store = store.clone();
            let cutoff = now_unix_ms().saturating_sub(retain.as_millis() as u64);
            let r =
                tokio::task::spawn_blocking(move || retain_once(&*store, &subs, &passed, cutoff))
                    .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "retention failed; retried in a minute"),
                Err(e) => warn!(error = %e, "retention task failed"),
            }
        }
    })
}

/// One round of retention (see [`start_retention`]).
pub fn retain_once(
    store: &dyn crate::store::Backend,
    subs: &[(String, Subscription)],
    passed: &[StreamStatus],
    stored_before_ms: u64,
) -> Result<(), crate::store::StoreError> {
    for info in store.streams()? {
        let mut below = info.next_seq;
        for (name, sub) in subs {
            if !sub.names(&info.agent, &info.stream) {
                continue;
            }
            let cp = passed
                .iter()
                .find(|s| s.delivery == *name && s.agent == info.agent && s.stream == info.stream)
                .map_or(0, |s| s.checkpoint);
            below = below.min(cp + 1);
        }
        if below <= 1 {
            continue;
        }
        let t = store.trim(&info.agent, &info.stream, below, stored_before_ms)?;
        if t.records > 0 {
            info!(agent = %info.agent, stream = %info.stream, records = t.records, files = t.files, first_kept = t.first_kept, "retention removed delivered records");
        }
    }
    Ok(())
}
