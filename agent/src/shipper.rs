//! The shipper: one QUIC connection to the exchange, one QUIC stream per Ferry
//! stream, a window of unacknowledged batches per stream, acks that drain the
//! buffer, reconnect with jittered backoff.
//!
//! The rules (what may be sent, what an ack means, how to resume) live in
//! `ferry_protocol::session::AgentSession`; this file only moves bytes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_protocol::batch::join_payloads;
use ferry_protocol::entry::StoredBatch;
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::messages::{frame::Msg, Batch, ErrorCode, Hello, Lost, Status, StreamStatus};
use ferry_protocol::session::{AgentSession, LocalStream, Next, ResumeVerdict};
use ferry_transport::{FrameReader, FrameWriter};
use rand::Rng;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::buffer::Buffer;
use crate::status::Board;

const HEARTBEAT: Duration = Duration::from_secs(10);
/// Buffered batches smaller than this (uncompressed) are joined with the ones
/// after them ([`Shipper::coalesce`]) ...
const COALESCE_BELOW: usize = 256 << 10;
/// ... up to this many bytes uncompressed ...
const COALESCE_RAW: usize = 1 << 20;
/// ... and this many parts.
const COALESCE_MAX_PARTS: usize = 64;

pub struct Shipper {
    pub address: String,
    pub server_name: String,
    pub client: quinn::ClientConfig,
    pub hello: Hello,
    pub buffer: Arc<Buffer>,
    pub names: Vec<String>,
    /// Per stream: the acked watermark, for sources waiting on acks.
    pub acked: Vec<watch::Sender<u64>>,
    pub durable: Arc<Notify>,
    pub space: Arc<Notify>,
    pub board: Arc<Board>,
    /// When this agent's certificate expires (Unix seconds), for the heartbeat.
    pub cert_not_after_unix: u64,
}

/// Exponential backoff with full jitter, 200 ms up to 30 s.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = 200u64.saturating_mul(1 << self.attempt.min(8)).min(30_000);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(rand::rng().random_range(cap / 2..=cap))
    }
}

enum Event {
    Frame(Msg),
    Closed(String),
}

impl Shipper {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff { attempt: 0 };
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            self.board.connecting(&self.address, attempts);
            let result = self.connect_and_ship(&shutdown, &mut backoff).await;
            if shutdown.is_cancelled() {
                break;
            }
            let (msg, extra) = match result {
                Ok(()) => ("connection closed".to_string(), Duration::ZERO),
                Err(e) if ferry_transport::tls::is_revoked(&e) => (
                    format!(
                        "ALARM: the exchange revoked this agent's certificate; data stays in the buffer until the exchange operator enrols the agent again and its new agent.pem and agent.key are in place (then restart the agent) ({e:#})"
                    ),
                    Duration::from_secs(30),
                ),
                Err(e) => {
                    let msg = format!("{e:#}");
                    // Refusals do not heal by retrying quickly.
                    let extra = if msg.contains("forbidden") {
                        Duration::from_secs(30)
                    } else {
                        Duration::ZERO
                    };
                    (msg, extra)
                }
            };
            warn!(exchange = %self.address, error = %msg, "not connected to the exchange; buffering");
            self.board.disconnected(msg);
            let delay = backoff.next() + extra;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect_and_ship(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<()> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&self.address)
            .await
            .with_context(|| format!("resolving {}", self.address))?
            .collect();
        // Government extranets are IPv4 first; take IPv6 only when that is all there is.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| anyhow!("{} resolves to no address", self.address))?;
        let bind: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).context("opening a UDP socket for QUIC")?;
        let result = self.ship_on(&endpoint, addr, shutdown, backoff).await;
        endpoint.close(0u32.into(), b"agent closing");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        result
    }

    async fn ship_on(
        &self,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<()> {
        let conn = endpoint
            .connect_with(self.client.clone(), addr, &self.server_name)?
            .await
            .with_context(|| format!("connecting to {} ({addr})", self.address))?;
        let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
        let mut control = FrameWriter::new(send);
        let mut control_in = FrameReader::new(recv, MAX_FRAME);

        let lost = self.buffer.lost_ranges();
        let local: BTreeMap<String, LocalStream> = self
            .buffer
            .states()
            .into_iter()
            .map(|(n, s)| {
                let lost = lost.get(&n).cloned().unwrap_or_default();
                (
                    n,
                    LocalStream {
                        acked: s.acked,
                        head: s.head,
                        lost,
                    },
                )
            })
            .collect();
        // The exchange judges each stream by this buffer's identity and heads.
        let mut hello = self.hello.clone();
        for d in &mut hello.streams {
            let st = local.get(&d.name).cloned().unwrap_or_default();
            d.incarnation = self.buffer.incarnation().to_string();
            d.head_seq = st.head;
            d.acked_seq = st.acked;
        }
        let mut session = AgentSession::new(hello, &local);
        control.send(Msg::Hello(session.hello())).await?;
        let welcome = match control_in.next().await? {
            Some(Msg::Welcome(w)) => w,
            Some(Msg::Error(e)) => bail!(
                "the exchange refused this agent ({}): {}",
                error_code(e.code),
                e.message
            ),
            Some(_) => bail!("the exchange answered Hello with something other than Welcome"),
            None => bail!("the exchange closed the control stream during the handshake"),
        };
        for (name, verdict) in session.handle_welcome(&welcome)? {
            match verdict {
                ResumeVerdict::InStep => self.board.set_ship_error(&name, None),
                ResumeVerdict::AckedAhead { up_to } => {
                    debug!(stream = %name, up_to, "exchange already holds more than was acked");
                    self.on_acked(&name, up_to)?;
                    self.board.set_ship_error(&name, None);
                }
                ResumeVerdict::ExchangeBehind {
                    exchange_next,
                    local_acked,
                } => {
                    let msg = format!(
                        "the exchange expects seq {exchange_next} but acknowledged up to {local_acked} before: its store lost data (seqs {exchange_next}..={local_acked} are no longer in this agent's buffer; declared lost to the exchange); shipping continues from {}",
                        local_acked + 1
                    );
                    error!(stream = %name, exchange_next, local_acked, "ALARM: {msg}");
                    self.board.set_ship_error(&name, Some(msg));
                }
                ResumeVerdict::Held { reason } => {
                    let msg = format!(
                        "ALARM: the exchange holds this stream until its operator decides (`ferry-exchange resolve`): {reason}; data stays in the buffer"
                    );
                    error!(stream = %name, %reason, "ALARM: stream held by the exchange");
                    self.board.set_ship_error(&name, Some(msg));
                }
                ResumeVerdict::AgentBehind {
                    exchange_next,
                    local_head,
                } => {
                    let msg = format!(
                        "the exchange already holds seqs up to {} but this agent's buffer only reached {local_head}: the buffer was reset; stream held until an operator resolves it",
                        exchange_next - 1
                    );
                    error!(stream = %name, exchange_next, local_head, "ALARM: {msg}");
                    self.board.set_ship_error(&name, Some(msg));
                }
            }
        }
        *backoff = Backoff { attempt: 0 };
        self.board.connected(&self.address);
        info!(exchange = %self.address, %addr, "connected to the exchange");

        let (events_tx, mut events) = mpsc::channel::<Event>(1024);
        // Control stream replies (errors) come through the same event queue.
        spawn_reader(control_in, events_tx.clone());
        let mut writers: Vec<Option<FrameWriter>> = (0..self.names.len()).map(|_| None).collect();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            self.pump(&conn, &mut session, &mut writers, &events_tx)
                .await?;
            tokio::select! {
                biased;
                // 1. Shutdown: stop sending; what is unacked stays buffered.
                _ = shutdown.cancelled() => {
                    conn.close(0u32.into(), b"agent shutting down");
                    return Ok(());
                }
                // 2. Acks and errors from the exchange.
                ev = events.recv() => match ev {
                    Some(Event::Frame(Msg::Ack(ack))) => {
                        if !ack.rejected_files.is_empty() {
                            warn!(stream = %ack.stream, files = ?ack.rejected_files, "the exchange received files damaged; they will be sent again");
                            self.buffer.record_rejected(&ack.stream, &ack.rejected_files)?;
                        }
                        if let Some(up_to) = session.handle_ack(&ack)? {
                            self.on_acked(&ack.stream, up_to)?;
                        }
                    }
                    Some(Event::Frame(Msg::Error(e))) => bail!(
                        "the exchange reported {} on stream {:?}: {}",
                        error_code(e.code), e.stream, e.message
                    ),
                    Some(Event::Frame(_)) => bail!("unexpected frame from the exchange"),
                    Some(Event::Closed(why)) => bail!("{why}"),
                    None => bail!("event queue closed"),
                },
                // 3. New durable data to send.
                _ = self.durable.notified() => {}
                // 4. Heartbeat.
                _ = heartbeat.tick() => {
                    ferry_protocol::record_buf::trim_spares();
                    control.send(Msg::Status(self.heartbeat())).await?;
                }
                e = conn.closed() => return Err(anyhow::Error::new(e).context("connection lost")),
            }
        }
    }

    /// Sends every batch the session allows.
    async fn pump(
        &self,
        conn: &quinn::Connection,
        session: &mut AgentSession,
        writers: &mut [Option<FrameWriter>],
        events: &mpsc::Sender<Event>,
    ) -> Result<()> {
        for (i, name) in self.names.iter().enumerate() {
            // The session's head is the one coalescing reads up to: a fresher
            // head read later would join batches the session has not seen.
            let head = self.buffer.state(name).head;
            session.on_durable(name, head);
            while let Some(next) = session.poll_send(name) {
                let msg = match next {
                    // Seqs lost to damage (recorded by `salvage`) or lost by the
                    // exchange after it acknowledged them: declared, never skipped
                    // silently; the exchange records the gap and acks past it.
                    Next::Lost { from, to, reason } => {
                        warn!(stream = %name, from, to, %reason, "declaring seqs lost to the exchange");
                        session.on_lost_sent(name, from, to)?;
                        Msg::Lost(Lost {
                            stream: name.clone(),
                            from_seq: from,
                            to_seq: to,
                            reason,
                        })
                    }
                    Next::Records(seq) => {
                        let Some(batch) = self.buffer.batch_at(name, seq)? else {
                            bail!("stream {name}: seq {seq} is durable but not in the buffer");
                        };
                        let batch = self.coalesce(name, batch, head)?;
                        let last = batch.first_seq + u64::from(batch.record_count) - 1;
                        session.on_sent(name, batch.first_seq, last)?;
                        Msg::Batch(batch)
                    }
                };
                if writers[i].is_none() {
                    let (send, recv) = conn.open_bi().await.context("opening a data stream")?;
                    spawn_reader(FrameReader::new(recv, MAX_FRAME), events.clone());
                    writers[i] = Some(FrameWriter::new(send));
                }
                if let Some(w) = writers[i].as_mut() {
                    w.send(msg).await?;
                }
            }
        }
        Ok(())
    }

    /// Small batches waiting one after another (a backlog after an outage, a
    /// source trickling a few lines per commit) leave as one: the window counts
    /// batches, so sixteen batches of fifty lines would hold a drain to 800 lines
    /// per round trip. Only what is durable (`..= head`) and contiguous is joined;
    /// the exchange and the acks work by seq, so a joined batch is acknowledged and
    /// released like its parts. A part that cannot be joined goes out alone.
    fn coalesce(&self, name: &str, first: StoredBatch, head: u64) -> Result<Batch> {
        if first.raw_len as usize >= COALESCE_BELOW {
            return Ok(first.into_batch(name.to_string()));
        }
        let mut raw = first.raw_len as usize;
        let mut parts = vec![first];
        while parts.len() < COALESCE_MAX_PARTS {
            let next = parts.last().map_or(0, |b| b.last_seq() + 1);
            if next > head {
                break;
            }
            let Some(b) = self.buffer.batch_at(name, next)? else {
                break;
            };
            if b.first_seq != next
                || b.raw_len as usize >= COALESCE_BELOW
                || raw + b.raw_len as usize > COALESCE_RAW
            {
                break;
            }
            raw += b.raw_len as usize;
            parts.push(b);
        }
        if parts.len() > 1 {
            let refs: Vec<(i32, u32, u32, &[u8])> = parts
                .iter()
                .map(|p| {
                    (
                        p.compression as i32,
                        p.raw_len,
                        p.record_count,
                        &p.payload[..],
                    )
                })
                .collect();
            match join_payloads(&refs) {
                Ok(e) => return Ok(e.into_batch(name.to_string(), parts[0].first_seq)),
                Err(e) => {
                    warn!(stream = %name, error = %e, "cannot join buffered batches; sending them one by one")
                }
            }
        }
        let first = parts.swap_remove(0);
        Ok(first.into_batch(name.to_string()))
    }

    fn on_acked(&self, stream: &str, up_to: u64) -> Result<()> {
        ferry_transport::failpoint::hit("agent-after-ack-before-delete")?;
        self.buffer.ack(stream, up_to)?;
        if let Some(i) = self.names.iter().position(|n| n == stream) {
            self.acked[i].send_replace(self.buffer.state(stream).acked);
        }
        self.space.notify_one();
        Ok(())
    }

    fn heartbeat(&self) -> Status {
        let states = self.buffer.states();
        Status {
            time_unix_ms: ferry_adapters::now_unix_ms(),
            streams: self
                .names
                .iter()
                .map(|n| {
                    let s = states.get(n).copied().unwrap_or_default();
                    StreamStatus {
                        name: n.clone(),
                        buffered_batches: s.batches,
                        buffered_bytes: s.bytes,
                        acked_seq: s.acked,
                        head_seq: s.head,
                        ..Default::default()
                    }
                })
                .collect(),
            buffer_full: self.board.buffer_full() || self.board.disk_low(),
            software: env!("CARGO_PKG_VERSION").to_string(),
            cert_not_after_unix: self.cert_not_after_unix,
        }
    }
}

fn error_code(code: i32) -> &'static str {
    match ErrorCode::try_from(code) {
        Ok(ErrorCode::Protocol) => "a protocol error",
        Ok(ErrorCode::Forbidden) => "forbidden",
        Ok(ErrorCode::TooLarge) => "a frame too large",
        Ok(ErrorCode::Internal) => "an internal error",
        Ok(ErrorCode::Version) => "a version mismatch",
        Ok(ErrorCode::Resend) => "a batch it did not store (resending)",
        Ok(ErrorCode::Held) => "a held stream",
        _ => "an unknown error",
    }
}

fn spawn_reader(mut reader: FrameReader, tx: mpsc::Sender<Event>) {
    tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(Some(msg)) => {
                    if tx.send(Event::Frame(msg)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tx
                        .send(Event::Closed("the exchange closed a stream".into()))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Event::Closed(format!("{e:#}"))).await;
                    return;
                }
            }
        }
    });
}
