//! A fleet of simulated agents for `fleet-load`: many agents, each with its own
//! certificate signed by the exchange's CA, each speaking `ferry/1` through
//! [`AgentSession`] as `ferry-agent`'s shipper does (Hello with the buffer's
//! incarnation, head and acked seq per stream; Welcome's next seqs; batches on
//! one data stream per Ferry stream within the window; cumulative acks; a
//! `Status` heartbeat every 10 s on the control stream).
//!
//! What is simulated is only the agent's source and buffer: a stream's head
//! advances with the clock at its share of the offered rate, in batches of a
//! fixed number of lines, and a batch's payload is taken from a small pool of
//! pre-encoded (zstd) payloads of log-like lines instead of being read and
//! encoded per batch. The seqs, windows and acks are real, and the exchange
//! checks, decompresses and stores every batch as it would an agent's; the pool
//! only keeps the load generator from taking the CPU the exchange is measured on
//! (both share this machine's two cores).

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_protocol::batch::{encode_buf, EncodedRecords};
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::messages::{frame::Msg, Hello, Sharing, Status, StreamDecl, StreamStatus};
use ferry_protocol::record_buf::RecordBuf;
use ferry_protocol::session::{AgentSession, LocalStream, Next, ResumeVerdict};
use ferry_transport::tls::{client_config, TlsFiles};
use ferry_transport::{FrameReader, FrameWriter};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Payloads in the pool; batches cycle through them by seq.
const POOL: usize = 64;

pub mod dashboard;
mod enroll;
pub use enroll::{
    department_of, enroll_fleet, raise_nofile, read_exchange, Enrolled, ExchangeFiles,
};

/// The load: how many lines, in what batches, for how long.
#[derive(Debug, Clone)]
pub struct Load {
    pub streams: usize,
    /// Lines per second, all agents and streams together.
    pub rate: f64,
    pub seconds: f64,
    /// Lines per batch.
    pub batch: u32,
    pub line_bytes: usize,
    /// QUIC endpoints (UDP sockets) the agents are spread over.
    pub endpoints: usize,
    /// Handshakes at once while the fleet connects.
    pub connect_parallel: usize,
    /// How long the fleet may take to connect before the load starts anyway.
    pub connect_timeout: Duration,
    /// How long after the load the agents wait for their last acks.
    pub drain: Duration,
    /// Between an agent's `Status` heartbeats (an agent's is 10 s; shorter
    /// floods the registry).
    pub heartbeat: Duration,
}

/// What the fleet did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Agents that completed a handshake at least once.
    pub connected: AtomicUsize,
    /// Agents connected now.
    pub online: AtomicUsize,
    pub records_acked: AtomicU64,
    pub records_sent: AtomicU64,
    pub batches_sent: AtomicU64,
    pub heartbeats: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    samples: Mutex<Vec<String>>,
    /// The load's window is over: stop producing.
    produce_done: AtomicBool,
}

impl Counters {
    fn error(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.samples.lock() {
            if s.len() < 10 && !s.contains(&msg) {
                s.push(msg);
            }
        }
    }

    pub fn error_samples(&self) -> Vec<String> {
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Log-like lines of `bytes` bytes (timestamp, counter, user, status, latency,
/// base64 of random bytes, padded), so zstd compresses them as it does real logs
/// (ratio ≈ 3.5), as `bench::write_log` writes them.
fn pool(batch: u32, line_bytes: usize) -> Result<Vec<EncodedRecords>> {
    use base64::Engine as _;
    let mut rng = rand::rng();
    let now = ferry_now_ms();
    let mut noise = vec![0u8; (line_bytes / 4).max(8)];
    (0..POOL)
        .map(|p| {
            let mut buf = RecordBuf::with_capacity(batch as usize * (line_bytes + 24));
            for i in 0..batch {
                rng.fill(&mut noise[..]);
                let data = base64::engine::general_purpose::STANDARD.encode(&noise);
                let mut line = format!(
                    "2026-12-06T10:{:02}:{:02}.{:06}Z n={p:04}{i:06} user=u{:06} action=request.completed status=200 latency_us={:06} data={data}",
                    i % 60,
                    p % 60,
                    i * 7 % 1_000_000,
                    rng.random_range(0..1_000_000),
                    rng.random_range(0..1_000_000),
                );
                line.truncate(line_bytes.saturating_sub(1).max(1));
                while line.len() < line_bytes.saturating_sub(1) {
                    line.push(' ');
                }
                let position = format!("{}", u64::from(i) * line_bytes as u64);
                buf.push_line(now, &position, line.as_bytes());
            }
            encode_buf(&buf).map_err(|e| anyhow!("encoding a batch: {e}"))
        })
        .collect()
}

fn ferry_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Per agent: the buffer it simulates.
struct Buffer {
    incarnation: String,
    head: Vec<u64>,
    acked: Vec<u64>,
}

impl Buffer {
    fn load(dir: &Path, streams: usize) -> Buffer {
        let fresh = || Buffer {
            incarnation: format!("fleet-{:016x}", rand::rng().random::<u64>()),
            head: vec![0; streams],
            acked: vec![0; streams],
        };
        let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else {
            return fresh();
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return fresh();
        };
        let seqs = |k: &str| -> Vec<u64> {
            (0..streams)
                .map(|j| v[k][j].as_u64().unwrap_or(0))
                .collect()
        };
        match v["incarnation"].as_str() {
            Some(inc) if !inc.is_empty() => Buffer {
                incarnation: inc.to_string(),
                head: seqs("head"),
                acked: seqs("acked"),
            },
            _ => fresh(),
        }
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let v = json!({"incarnation": self.incarnation, "head": self.head, "acked": self.acked});
        std::fs::write(dir.join("state.json"), v.to_string())
            .with_context(|| format!("writing {}", dir.join("state.json").display()))
    }
}

fn stream_name(j: usize) -> String {
    format!("log-{j}")
}

/// Shared by all agent tasks.
struct Fleet {
    load: Load,
    addr: SocketAddr,
    counters: Arc<Counters>,
    pool: Vec<EncodedRecords>,
    /// Handshakes at once.
    connecting: Semaphore,
    /// When the load starts (`None` while the fleet connects).
    start: watch::Receiver<Option<Instant>>,
    started_unix: u64,
    agents: usize,
}

/// Runs `agents` against the exchange at `addr`: connects them all, then sends
/// `load` from the instant it sends on `start_tx`'s behalf (the caller learns it
/// through the returned receiver), then lets them drain. Returns when every agent
/// is done.
pub async fn run(
    agents: Vec<Enrolled>,
    addr: SocketAddr,
    load: Load,
    counters: Arc<Counters>,
    started: watch::Sender<Option<Instant>>,
) -> Result<()> {
    let pool = pool(load.batch, load.line_bytes)?;
    let mut endpoints = Vec::new();
    for _ in 0..load.endpoints.max(1) {
        endpoints.push(
            quinn::Endpoint::client(([127, 0, 0, 1], 0).into())
                .context("opening a UDP socket for QUIC")?,
        );
    }
    let n = agents.len();
    let fleet = Arc::new(Fleet {
        connecting: Semaphore::new(load.connect_parallel.max(1)),
        load,
        addr,
        counters: counters.clone(),
        pool,
        start: started.subscribe(),
        started_unix: ferry_now_ms() / 1000,
        agents: n,
    });
    let mut tasks = Vec::with_capacity(n);
    for (i, a) in agents.into_iter().enumerate() {
        let client = client_config(&TlsFiles {
            ca: &a.dir.join("ca.pem"),
            cert: &a.dir.join("agent.pem"),
            key: &a.dir.join("agent.key"),
        })?;
        let endpoint = endpoints[i % endpoints.len()].clone();
        let fleet = fleet.clone();
        tasks.push(tokio::spawn(agent_task(a, fleet, endpoint, client)));
    }
    // Start once every agent connected (or the connect timeout passed), a
    // second later so the last ones are settled.
    let deadline = Instant::now() + fleet.load.connect_timeout;
    while counters.connected.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now() + Duration::from_secs(1);
    started.send_replace(Some(t0));
    tokio::time::sleep_until(t0 + Duration::from_secs_f64(fleet.load.seconds)).await;
    counters.produce_done.store(true, Ordering::Relaxed);
    for t in tasks {
        if let Err(e) = t.await {
            counters.error(format!("agent task failed: {e}"));
        }
    }
    for e in &endpoints {
        e.close(0u32.into(), b"fleet done");
    }
    for e in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
    }
    Ok(())
}

/// One agent: connect, ship, reconnect after a failure (after a second), until
/// the load is over and acknowledged (or the drain time ran out).
async fn agent_task(
    a: Enrolled,
    fleet: Arc<Fleet>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
) {
    let mut buf = Buffer::load(&a.dir, fleet.load.streams);
    let mut produced = vec![0u64; fleet.load.streams];
    let mut base: Option<Vec<u64>> = None;
    let mut ever = false;
    loop {
        let r = session(
            &a,
            &fleet,
            &endpoint,
            &client,
            &mut buf,
            &mut base,
            &mut produced,
            &mut ever,
        )
        .await;
        match r {
            Ok(()) => break,
            Err(e) => {
                fleet.counters.error(format!("{}: {e:#}", a.id));
                if drain_over(&fleet) {
                    break;
                }
                fleet.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    if let Err(e) = buf.save(&a.dir) {
        fleet.counters.error(format!("{}: {e:#}", a.id));
    }
}

fn drain_over(fleet: &Fleet) -> bool {
    match *fleet.start.borrow() {
        Some(t0) => {
            Instant::now() > t0 + Duration::from_secs_f64(fleet.load.seconds) + fleet.load.drain
        }
        None => false,
    }
}

enum Event {
    Frame(Msg),
    Closed(String),
}

fn spawn_reader(mut reader: FrameReader, tx: mpsc::Sender<Event>) {
    tokio::spawn(async move {
        loop {
            let ev = match reader.next().await {
                Ok(Some(msg)) => Event::Frame(msg),
                Ok(None) => Event::Closed("the exchange closed a stream".into()),
                Err(e) => Event::Closed(format!("{e:#}")),
            };
            let end = matches!(ev, Event::Closed(_));
            if tx.send(ev).await.is_err() || end {
                return;
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
async fn session(
    a: &Enrolled,
    fleet: &Fleet,
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    buf: &mut Buffer,
    base: &mut Option<Vec<u64>>,
    produced: &mut [u64],
    ever: &mut bool,
) -> Result<()> {
    let load = &fleet.load;
    let names: Vec<String> = (0..load.streams).map(stream_name).collect();
    let conn = {
        let _permit = fleet.connecting.acquire().await?;
        endpoint
            .connect_with(client.clone(), fleet.addr, "localhost")?
            .await
            .context("QUIC handshake")?
    };
    let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
    let mut control = FrameWriter::new(send);
    let mut control_in = FrameReader::new(recv, MAX_FRAME);
    let local: BTreeMap<String, LocalStream> = names
        .iter()
        .enumerate()
        .map(|(j, n)| {
            (
                n.clone(),
                LocalStream {
                    acked: buf.acked[j],
                    head: buf.head[j],
                    lost: Vec::new(),
                },
            )
        })
        .collect();
    let hello = Hello {
        version: ferry_protocol::PROTOCOL_VERSION,
        agent_id: a.id.clone(),
        department: a.department.clone(),
        config_digest: "fleet-load".into(),
        software: format!("fleet-load {}", env!("CARGO_PKG_VERSION")),
        streams: names
            .iter()
            .enumerate()
            .map(|(j, n)| StreamDecl {
                name: n.clone(),
                catalog_id: format!("210100-FL-{j:04}"),
                sharing: Sharing::Unconditional as i32,
                kind: "tail".into(),
                incarnation: buf.incarnation.clone(),
                head_seq: buf.head[j],
                acked_seq: buf.acked[j],
            })
            .collect(),
    };
    let mut session = AgentSession::new(hello, &local);
    control.send(Msg::Hello(session.hello())).await?;
    let welcome = match control_in.next().await? {
        Some(Msg::Welcome(w)) => w,
        Some(Msg::Error(e)) => bail!("the exchange refused the agent: {}", e.message),
        other => bail!("no Welcome: {other:?}"),
    };
    for (name, verdict) in session.handle_welcome(&welcome)? {
        let j = names.iter().position(|n| *n == name).unwrap_or(0);
        match verdict {
            ResumeVerdict::InStep => {}
            ResumeVerdict::AckedAhead { up_to } => {
                let delta = up_to.saturating_sub(buf.acked[j]);
                fleet
                    .counters
                    .records_acked
                    .fetch_add(delta, Ordering::Relaxed);
                buf.acked[j] = up_to;
            }
            other => bail!("stream {name}: {other:?}"),
        }
    }
    if !*ever {
        *ever = true;
        fleet.counters.connected.fetch_add(1, Ordering::Relaxed);
    }
    fleet.counters.online.fetch_add(1, Ordering::Relaxed);
    let result = ship(
        a,
        fleet,
        &conn,
        &names,
        &mut control,
        control_in,
        &mut session,
        buf,
        base,
        produced,
    )
    .await;
    fleet.counters.online.fetch_sub(1, Ordering::Relaxed);
    conn.close(0u32.into(), b"fleet agent done");
    result
}

#[allow(clippy::too_many_arguments)]
async fn ship(
    a: &Enrolled,
    fleet: &Fleet,
    conn: &quinn::Connection,
    names: &[String],
    control: &mut FrameWriter,
    control_in: FrameReader,
    session: &mut AgentSession,
    buf: &mut Buffer,
    base: &mut Option<Vec<u64>>,
    produced: &mut [u64],
) -> Result<()> {
    let load = &fleet.load;
    let per_stream = load.rate / ((fleet.agents * load.streams).max(1) as f64);
    let batch = u64::from(load.batch);
    // A batch is due every `batch / per_stream` seconds; look twice as often,
    // each agent at its own phase so the fleet's batches do not arrive in bursts.
    let period = Duration::from_secs_f64((batch as f64 / per_stream / 2.0).clamp(0.01, 1.0));
    let (phase, beat): (f64, f64) = {
        let mut rng = rand::rng();
        (rng.random(), rng.random())
    };
    let mut tick = tokio::time::interval_at(Instant::now() + period.mul_f64(phase), period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every = fleet.load.heartbeat;
    let mut heartbeat = tokio::time::interval_at(Instant::now() + every.mul_f64(beat), every);
    let (events_tx, mut events) = mpsc::channel::<Event>(256);
    spawn_reader(control_in, events_tx.clone());
    let mut writers: Vec<Option<FrameWriter>> = names.iter().map(|_| None).collect();
    let mut start = fleet.start.clone();
    loop {
        pump(fleet, conn, names, session, buf, &mut writers, &events_tx).await?;
        let t0 = *start.borrow();
        if fleet.counters.produce_done.load(Ordering::Relaxed) {
            let drained = buf.acked.iter().zip(&buf.head).all(|(a, h)| a >= h);
            if drained || drain_over(fleet) {
                // As an agent shutting down: end the streams, then the connection.
                for w in writers.iter_mut().flatten() {
                    w.finish().await;
                }
                control.finish().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(());
            }
        }
        tokio::select! {
            biased;
            ev = events.recv() => match ev {
                Some(Event::Frame(Msg::Ack(ack))) => {
                    if let Some(up_to) = session.handle_ack(&ack)? {
                        if let Some(j) = names.iter().position(|n| *n == ack.stream) {
                            let delta = up_to.saturating_sub(buf.acked[j]);
                            fleet.counters.records_acked.fetch_add(delta, Ordering::Relaxed);
                            buf.acked[j] = up_to;
                        }
                    }
                }
                Some(Event::Frame(Msg::Error(e))) => bail!("the exchange reported an error on stream {:?}: {}", e.stream, e.message),
                Some(Event::Frame(other)) => bail!("unexpected frame from the exchange: {other:?}"),
                Some(Event::Closed(why)) => bail!("{why}"),
                None => bail!("event queue closed"),
            },
            _ = tick.tick() => {
                // The source: lines at this stream's share of the rate since t0,
                // made durable in whole batches.
                if let (Some(t0), false) = (t0, fleet.counters.produce_done.load(Ordering::Relaxed)) {
                    let now = Instant::now();
                    if now >= t0 {
                        let b = base.get_or_insert_with(|| buf.head.clone());
                        let due = (per_stream * (now - t0).as_secs_f64()) as u64;
                        for j in 0..names.len() {
                            while due >= produced[j] + batch {
                                produced[j] += batch;
                            }
                            buf.head[j] = buf.head[j].max(b[j] + produced[j]);
                        }
                    }
                }
            }
            _ = heartbeat.tick() => {
                control.send(Msg::Status(status(a, fleet, names, buf))).await?;
                fleet.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            _ = start.changed() => {}
            e = conn.closed() => return Err(anyhow::Error::new(e).context("connection lost")),
        }
    }
}

/// Sends every batch the session allows (as the shipper's `pump`): the batch at
/// the next seq, up to the head, from the pool.
async fn pump(
    fleet: &Fleet,
    conn: &quinn::Connection,
    names: &[String],
    session: &mut AgentSession,
    buf: &Buffer,
    writers: &mut [Option<FrameWriter>],
    events: &mpsc::Sender<Event>,
) -> Result<()> {
    let batch = u64::from(fleet.load.batch);
    for (j, name) in names.iter().enumerate() {
        session.on_durable(name, buf.head[j]);
        while let Some(next) = session.poll_send(name) {
            let msg = match next {
                Next::Records(seq) => {
                    let count = (buf.head[j] - seq + 1).min(batch);
                    let encoded = if count == batch {
                        fleet.pool[(seq / batch) as usize % fleet.pool.len()].clone()
                    } else {
                        // A tail left by an earlier run with another batch size.
                        let mut b = RecordBuf::new();
                        for i in 0..count {
                            b.push_line(
                                ferry_now_ms(),
                                &format!("{}", seq + i),
                                b"fleet-load line",
                            );
                        }
                        encode_buf(&b).map_err(|e| anyhow!("encoding a batch: {e}"))?
                    };
                    let last = seq + count - 1;
                    session.on_sent(name, seq, last)?;
                    fleet
                        .counters
                        .records_sent
                        .fetch_add(count, Ordering::Relaxed);
                    fleet.counters.batches_sent.fetch_add(1, Ordering::Relaxed);
                    Msg::Batch(encoded.into_batch(name.clone(), seq))
                }
                Next::Lost { from, to, .. } => {
                    bail!("stream {name}: the session wants seqs {from}..={to} declared lost, which a simulated buffer never loses")
                }
            };
            if writers[j].is_none() {
                let (send, recv) = conn.open_bi().await.context("opening a data stream")?;
                spawn_reader(FrameReader::new(recv, MAX_FRAME), events.clone());
                writers[j] = Some(FrameWriter::new(send));
            }
            if let Some(w) = writers[j].as_mut() {
                w.send(msg).await?;
            }
        }
    }
    Ok(())
}

/// The heartbeat, with what a tail agent's `status` would report.
fn status(a: &Enrolled, fleet: &Fleet, names: &[String], buf: &Buffer) -> Status {
    let line = fleet.load.line_bytes as u64;
    let batch = u64::from(fleet.load.batch);
    let streams: Vec<StreamStatus> = names
        .iter()
        .enumerate()
        .map(|(j, n)| {
            let backlog = buf.head[j].saturating_sub(buf.acked[j]);
            StreamStatus {
                name: n.clone(),
                buffered_batches: backlog.div_ceil(batch),
                buffered_bytes: backlog * line,
                acked_seq: buf.acked[j],
                head_seq: buf.head[j],
                position: format!("{}", buf.head[j] * line),
                kind: "tail".into(),
                ..Default::default()
            }
        })
        .collect();
    Status {
        time_unix_ms: ferry_now_ms(),
        buffer_bytes: streams.iter().map(|s| s.buffered_bytes).sum(),
        buffer_max_bytes: 1 << 30,
        streams,
        software: format!("fleet-load {}", env!("CARGO_PKG_VERSION")),
        cert_not_after_unix: a.cert_not_after_unix,
        host: a.id.clone(),
        started_unix: fleet.started_unix,
        ..Default::default()
    }
}
