//! Prometheus metrics (`[metrics] listen`): `GET /metrics` answers, over plain
//! HTTP, with the fleet, the store and the deliveries as this node sees them, in
//! the OpenMetrics text format (`prometheus-client`), every name prefixed
//! `ferry_exchange_`.
//!
//! Nothing runs between scrapes. Each scrape reads the live state through one
//! [`Collector`]: the registry (agents, their last heartbeats), this node's
//! connections, the alarms, the deliveries' status and the store directory's
//! size (walked at most once per [`STORE_SIZE_EVERY`]). The one figure that
//! cannot be read back at scrape time, how many records this node stored, is
//! counted by the committer thread after each group commit ([`Counting`]), so
//! `records_stored_total` is a true counter and `rate()` of it is the ingest
//! rate.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `agents` | gauge | `state` (`online`, `reconnecting`, `offline`) |
//! | `connections` | gauge | |
//! | `stream_backlog_bytes`, `stream_backlog_records` | gauge | `agent`, `stream` |
//! | `records_stored_total` | counter | `agent`, `stream` |
//! | `alarms_active` | gauge | `kind` |
//! | `store_bytes` | gauge (embedded store only) | |
//! | `delivery_lag_records`, `delivery_lag_seconds` | gauge | `delivery`, `agent`, `stream` |
//! | `store_up` | gauge | |

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use ferry_metrics::{render, Collector, DescriptorEncoder, Families, Registry};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::alarms::Alarms;
use crate::delivery::Statuses;
use crate::fleet::{Fleet, State};
use crate::store::{now_unix_ms, Backend, Incoming, Item, SharedStore, StoreError};

pub use ferry_metrics::CONTENT_TYPE_OPENMETRICS;

/// The store directory is walked at most this often: a store of many received
/// files takes a while to walk, and its size changes slowly.
pub const STORE_SIZE_EVERY: Duration = Duration::from_secs(30);

/// Alarm kinds reported as 0 when none is active, so an alert or a graph has a
/// series before the first alarm (`alarms.rs` documents each; a kind missing
/// here still appears while active).
const ALARM_KINDS: [&str; 9] = [
    "offline",
    "backlog",
    "buffer_full",
    "retained_wal",
    "cert_expiring",
    "seq_gap",
    "held",
    "source_error",
    "delivery",
];

/// Everything a scrape reads.
pub struct Parts {
    pub store: SharedStore,
    pub fleet: Arc<Fleet>,
    pub alarms: Arc<Alarms>,
    pub deliveries: Statuses,
    pub stored: StoredCounts,
    /// Open agent connections on this node (handshakes included).
    pub connections: Box<dyn Fn() -> usize + Send + Sync>,
    /// The running configuration: `[dashboard] offline_after` gives the same
    /// states as the dashboard's.
    pub config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::ExchangeConfig>>,
    /// The directory whose size is `store_bytes` (the embedded store's); `None`:
    /// no such metric (the records are on the JetStream servers).
    pub store_dir: Option<PathBuf>,
}

/// Binds `listen` (an error names the address) and serves `/metrics` until
/// `shutdown`; `None` when `[metrics] listen` is not set.
pub async fn start(
    listen: Option<&str>,
    parts: Parts,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("[metrics] listen {listen:?} is not an address:port"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("[metrics] listening on {addr}"))?;
    info!(listen = %listener.local_addr().unwrap_or(addr), "serving metrics at /metrics (http)");
    let registry = Arc::new(registry(LiveState::new(parts)));
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                // The collector reads the store, whose methods block.
                match tokio::task::spawn_blocking(move || render(&registry)).await {
                    Ok(Ok(text)) => {
                        ([(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)], text).into_response()
                    }
                    Ok(Err(_)) | Err(_) => {
                        warn!("the metrics could not be encoded");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }
        }),
    );
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            warn!(error = %e, "the metrics endpoint failed");
        }
    })))
}

fn registry(collector: impl Collector) -> Registry {
    ferry_metrics::registry("ferry_exchange", collector)
}

/// Records stored per (agent, stream) by this process, for
/// `records_stored_total`: written by the committer thread ([`Counting`]), read
/// by each scrape.
#[derive(Clone, Default)]
pub struct StoredCounts(Arc<Mutex<BTreeMap<(String, String), u64>>>);

impl StoredCounts {
    fn get(&self) -> BTreeMap<(String, String), u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// The committer's side of [`StoredCounts`]: how many records each item of a
/// group newly stored. An ack says only how far a stream is stored, and a
/// batch acked again (the agent resent it after a lost ack) stores nothing, so
/// each stream's stored watermark is kept here (read from the store the first
/// time the stream is seen in this process) and a batch counts only the seqs
/// past it. Owned by the committer thread, so the watermarks need no lock.
///
/// With a JetStream store shared by several nodes, a node counts what it
/// stored itself; a watermark it read earlier may be behind what another node
/// stored since, so a duplicate of that arriving here (rare: an agent resends
/// only after it reconnected, from the next seq its `Welcome` gave) would be
/// counted again.
pub struct Counting {
    counts: StoredCounts,
    /// agent → stream → the highest seq known stored.
    marks: HashMap<String, HashMap<String, u64>>,
}

impl Counting {
    pub fn new(counts: StoredCounts) -> Self {
        Counting {
            counts,
            marks: HashMap::new(),
        }
    }

    /// Before `items` are committed: the watermark of each stream not seen yet
    /// in this process (one read per stream and process). A failed read leaves
    /// it unknown: the stream's first batch then counts whole.
    pub fn before(&mut self, store: &dyn Backend, items: &[Incoming]) {
        for item in items {
            let stream = item.stream();
            if self
                .marks
                .get(&item.agent)
                .is_some_and(|m| m.contains_key(stream))
            {
                continue;
            }
            if let Ok(next) = store.next_expected(&item.agent, stream) {
                self.marks
                    .entry(item.agent.clone())
                    .or_default()
                    .insert(stream.to_string(), next.saturating_sub(1));
            }
        }
    }

    /// After the commit: adds what each stored item newly stored to its
    /// stream's count. `results` are `commit_group`'s, in `items`' order.
    pub fn after(&mut self, items: &[Incoming], results: &[Result<u64, StoreError>]) {
        let mut added: Vec<(&str, &str, u64)> = Vec::new();
        for (item, result) in items.iter().zip(results) {
            let Ok(up_to) = result else { continue };
            let (first, last, records) = match &item.item {
                Item::Batch(b) if b.record_count > 0 => (
                    b.first_seq,
                    b.first_seq + u64::from(b.record_count) - 1,
                    true,
                ),
                Item::Batch(_) => continue,
                // A declared loss moves the watermark and stores no record.
                Item::Lost(l) => (l.from_seq, l.to_seq, false),
            };
            let mark = self
                .marks
                .entry(item.agent.clone())
                .or_default()
                .entry(item.stream().to_string())
                .or_insert(first.saturating_sub(1));
            // The cumulative ack may already cover later items of the group.
            let top = (*up_to).min(last);
            let new = top.saturating_sub((*mark).max(first.saturating_sub(1)));
            *mark = (*mark).max(top);
            if records && new > 0 {
                added.push((&item.agent, item.stream(), new));
            }
        }
        if added.is_empty() {
            return;
        }
        if let Ok(mut m) = self.counts.0.lock() {
            for (agent, stream, n) in added {
                *m.entry((agent.to_string(), stream.to_string()))
                    .or_default() += n;
            }
        }
    }
}

/// What one scrape reports: read from the live state by [`LiveState`], or made
/// by hand in tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Agents per state; `None` when the registry could not be read.
    pub agents: Option<[u64; 3]>,
    pub connections: u64,
    /// (agent, stream, backlog bytes, backlog records), from the last heartbeats.
    pub backlogs: Vec<(String, String, u64, u64)>,
    /// Records stored by this process per (agent, stream).
    pub stored: BTreeMap<(String, String), u64>,
    /// Active alarms per kind.
    pub alarms: BTreeMap<String, u64>,
    pub store_bytes: Option<u64>,
    /// (delivery, agent, stream, lag in records, lag in seconds).
    pub deliveries: Vec<(String, String, String, u64, f64)>,
}

const STATES: [(State, &str); 3] = [
    (State::Online, "online"),
    (State::Reconnecting, "reconnecting"),
    (State::Offline, "offline"),
];

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut f = Families { enc: &mut enc };
        f.gauge(
            "store_up",
            "1 when this scrape could read the store's registry; 0: agents and backlogs are missing",
            u64::from(self.agents.is_some()),
        )?;
        if let Some(agents) = &self.agents {
            f.gauges(
                "agents",
                "Agents by connection state, as the dashboard shows them",
                STATES
                    .iter()
                    .zip(agents)
                    .map(|((_, name), n)| ([("state", *name)], *n)),
            )?;
        }
        f.gauge(
            "connections",
            "Open agent connections on this node (QUIC and TCP, handshakes included)",
            self.connections,
        )?;
        let by_stream = |a: &str, s: &str| [("agent", a.to_string()), ("stream", s.to_string())];
        f.gauges(
            "stream_backlog_bytes",
            "Bytes buffered at the agent and not yet acknowledged, per its last heartbeat",
            self.backlogs
                .iter()
                .map(|(a, s, bytes, _)| (by_stream(a, s), *bytes)),
        )?;
        f.gauges(
            "stream_backlog_records",
            "Records buffered at the agent and not yet acknowledged (head seq - acked seq), per its last heartbeat",
            self.backlogs
                .iter()
                .map(|(a, s, _, records)| (by_stream(a, s), *records)),
        )?;
        f.counters(
            "records_stored",
            "Records this exchange process stored (duplicates not counted)",
            self.stored.iter().map(|((a, s), n)| (by_stream(a, s), *n)),
        )?;
        f.gauges(
            "alarms_active",
            "Active alarms by kind (acknowledged ones included)",
            self.alarms
                .iter()
                .map(|(k, n)| ([("kind", k.as_str())], *n)),
        )?;
        if let Some(bytes) = self.store_bytes {
            f.gauge(
                "store_bytes",
                "Disk space the store directory takes (allocated blocks), bytes; measured at most every 30 s",
                bytes,
            )?;
        }
        let by_delivery = |d: &str, a: &str, s: &str| {
            [
                ("delivery", d.to_string()),
                ("agent", a.to_string()),
                ("stream", s.to_string()),
            ]
        };
        f.gauges(
            "delivery_lag_records",
            "Records stored and not yet passed on by the delivery",
            self.deliveries
                .iter()
                .map(|(d, a, s, n, _)| (by_delivery(d, a, s), *n)),
        )?;
        f.gauges(
            "delivery_lag_seconds",
            "Age of the oldest record the delivery has not passed on, seconds (0 when caught up)",
            self.deliveries
                .iter()
                .map(|(d, a, s, _, secs)| (by_delivery(d, a, s), *secs)),
        )
    }
}

/// The collector the endpoint registers: a [`Snapshot`] of the live state at
/// each scrape.
struct LiveState {
    parts: Parts,
    store_size: Option<StoreSize>,
}

impl fmt::Debug for LiveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveState").finish_non_exhaustive()
    }
}

impl LiveState {
    fn new(parts: Parts) -> Self {
        let store_size = parts.store_dir.clone().map(StoreSize::new);
        LiveState { parts, store_size }
    }

    fn snapshot(&self) -> Snapshot {
        let p = &self.parts;
        let mut snap = Snapshot {
            connections: (p.connections)() as u64,
            stored: p.stored.get(),
            store_bytes: self.store_size.as_ref().map(StoreSize::get),
            ..Default::default()
        };
        match p.store.agents() {
            Ok(agents) => {
                let now = now_unix_ms();
                let offline_after = p.config.borrow().dashboard.offline_after;
                let mut states = [0u64; 3];
                for rec in &agents {
                    let state = p.fleet.connection(rec, now, offline_after).state;
                    if let Some(i) = STATES.iter().position(|(s, _)| *s == state) {
                        states[i] += 1;
                    }
                    for s in rec.status.iter().flat_map(|h| &h.streams) {
                        snap.backlogs.push((
                            rec.agent_id.clone(),
                            s.name.clone(),
                            s.buffered_bytes,
                            s.head_seq.saturating_sub(s.acked_seq),
                        ));
                        // A stream that stored nothing since this process
                        // started is at 0, not absent: `increase()` then sees
                        // its first records.
                        snap.stored
                            .entry((rec.agent_id.clone(), s.name.clone()))
                            .or_default();
                    }
                }
                snap.agents = Some(states);
            }
            Err(e) => warn!(error = %e, "metrics: the registry cannot be read"),
        }
        for kind in ALARM_KINDS {
            snap.alarms.insert(kind.to_string(), 0);
        }
        for a in p.alarms.active() {
            *snap.alarms.entry(a.kind).or_default() += 1;
        }
        snap.deliveries = p
            .deliveries
            .snapshot()
            .into_iter()
            .map(|s| (s.delivery, s.agent, s.stream, s.lag_records, s.lag_seconds))
            .collect();
        snap
    }
}

impl Collector for LiveState {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        self.snapshot().encode(enc)
    }
}

/// The size of a directory tree, measured at most once per [`STORE_SIZE_EVERY`].
struct StoreSize {
    dir: PathBuf,
    /// When it was last measured, and what it came to. The lock is held while
    /// walking, so concurrent scrapes wait for one walk instead of each doing one.
    last: Mutex<Option<(Instant, u64)>>,
}

impl StoreSize {
    fn new(dir: PathBuf) -> Self {
        StoreSize {
            dir,
            last: Mutex::new(None),
        }
    }

    fn get(&self) -> u64 {
        let Ok(mut last) = self.last.lock() else {
            return 0;
        };
        match *last {
            Some((at, bytes)) if at.elapsed() < STORE_SIZE_EVERY => bytes,
            _ => {
                let bytes = disk_usage(&self.dir);
                *last = Some((Instant::now(), bytes));
                bytes
            }
        }
    }
}

/// Allocated bytes of the regular files under `dir` (a sparse received file
/// counts what it takes, not its length). Symlinks are not followed; entries
/// that vanish during the walk (retention removing them) are skipped.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_protocol::messages::{Batch, Lost};

    /// The exposition of a small fixture, line by line: counters carry
    /// `_total` and their type, labels are escaped, the message ends with `# EOF`.
    #[test]
    fn a_snapshot_encodes_as_openmetrics() {
        let snap = Snapshot {
            agents: Some([1, 0, 2]),
            connections: 1,
            backlogs: vec![("hp-01".into(), "hall-log".into(), 4096, 12)],
            stored: [(("hp-01".into(), "hall-log".into()), 40)].into(),
            alarms: [("offline".to_string(), 2), ("held".to_string(), 0)].into(),
            store_bytes: Some(1 << 20),
            deliveries: vec![("archive".into(), "hp-01".into(), "a\"b".into(), 3, 1.5)],
        };
        let text = render(&registry(snap)).unwrap();
        let want = [
            "# TYPE ferry_exchange_store_up gauge",
            "ferry_exchange_store_up 1",
            "# TYPE ferry_exchange_agents gauge",
            "ferry_exchange_agents{state=\"online\"} 1",
            "ferry_exchange_agents{state=\"reconnecting\"} 0",
            "ferry_exchange_agents{state=\"offline\"} 2",
            "ferry_exchange_connections 1",
            "ferry_exchange_stream_backlog_bytes{agent=\"hp-01\",stream=\"hall-log\"} 4096",
            "ferry_exchange_stream_backlog_records{agent=\"hp-01\",stream=\"hall-log\"} 12",
            "# TYPE ferry_exchange_records_stored counter",
            "ferry_exchange_records_stored_total{agent=\"hp-01\",stream=\"hall-log\"} 40",
            "ferry_exchange_alarms_active{kind=\"held\"} 0",
            "ferry_exchange_alarms_active{kind=\"offline\"} 2",
            "ferry_exchange_store_bytes 1048576",
            "ferry_exchange_delivery_lag_records{delivery=\"archive\",agent=\"hp-01\",stream=\"a\\\"b\"} 3",
            "ferry_exchange_delivery_lag_seconds{delivery=\"archive\",agent=\"hp-01\",stream=\"a\\\"b\"} 1.5",
        ];
        let lines: Vec<&str> = text.lines().collect();
        for w in want {
            assert!(lines.contains(&w), "{w:?} not in:\n{text}");
        }
        assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
        // Without a readable registry: no agents family, and store_up says so.
        let text = render(&registry(Snapshot::default())).unwrap();
        assert!(text.contains("ferry_exchange_store_up 0\n"), "{text}");
        assert!(!text.contains("ferry_exchange_agents{"), "{text}");
        assert!(!text.contains("store_bytes"), "{text}");
    }

    fn batch(agent: &str, stream: &str, first_seq: u64, record_count: u32) -> Incoming {
        Incoming {
            agent: agent.into(),
            item: Item::Batch(Batch {
                stream: stream.into(),
                first_seq,
                record_count,
                ..Default::default()
            }),
        }
    }

    /// The count follows what was newly stored: a group whose cumulative acks
    /// run ahead of each item, a resent (duplicate) batch, a partly duplicated
    /// one, a declared loss, a refused batch.
    #[test]
    fn counting_skips_duplicates_and_losses() {
        let counts = StoredCounts::default();
        let mut c = Counting::new(counts.clone());
        // Seqs 1..=10 were stored by an earlier process.
        c.marks
            .entry("a".into())
            .or_default()
            .insert("s".into(), 10);
        let items = vec![
            batch("a", "s", 11, 5),
            batch("a", "s", 16, 5),
            batch("a", "s", 1, 10),
        ];
        // Acks cumulative over the whole group.
        c.after(&items, &[Ok(20), Ok(20), Ok(20)]);
        assert_eq!(counts.get()[&("a".into(), "s".into())], 10);
        let lost = Incoming {
            agent: "a".into(),
            item: Item::Lost(Lost {
                stream: "s".into(),
                from_seq: 21,
                to_seq: 25,
                ..Default::default()
            }),
        };
        let items = vec![
            batch("a", "s", 18, 3),
            lost,
            batch("a", "s", 26, 4),
            batch("a", "s", 30, 1),
        ];
        c.after(
            &items,
            &[Ok(20), Ok(25), Ok(29), Err(StoreError::Resend("x".into()))],
        );
        assert_eq!(counts.get()[&("a".into(), "s".into())], 14);
        // A stream never seen and whose watermark could not be read counts
        // its first batch whole.
        c.after(&[batch("b", "t", 7, 2)], &[Ok(8)]);
        assert_eq!(counts.get()[&("b".into(), "t".into())], 2);
    }
}
