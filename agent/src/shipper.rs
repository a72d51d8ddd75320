//! The shipper: one connection to the exchange, one stream per Ferry stream, a
//! window of unacknowledged batches per stream, acks that drain the buffer,
//! reconnect with jittered backoff.
//!
//! The connection is QUIC. Where UDP is blocked (a QUIC handshake that does not
//! complete within [`QUIC_WITHIN`]), the same protocol goes over TLS 1.3 on TCP
//! to the same port (`ferry_transport::link`); while on TCP the shipper tries
//! QUIC every [`QUIC_PROBE_EVERY`] and, once a handshake succeeds, ends the TCP
//! session so the next connection is QUIC again. A refusal (a TLS alert, the
//! exchange at capacity) is an answer, not a blocked network: no fallback.
//!
//! The rules (what may be sent, what an ack means, how to resume) live in
//! `ferry_protocol::session::AgentSession`; this file only moves bytes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_adapters::Backoff;
use ferry_protocol::batch::join_payloads;
use ferry_protocol::entry::StoredBatch;
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::messages::{frame::Msg, Batch, ErrorCode, Hello, Lost, Status, StreamStatus};
use ferry_protocol::session::{AgentSession, LocalStream, Next, ResumeVerdict};
use ferry_transport::link::TcpClientConfig;
use ferry_transport::{FrameReader, FrameWriter, Link};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::buffer::Buffer;
use crate::status::Board;

const HEARTBEAT: Duration = Duration::from_secs(10);
/// A QUIC handshake not done by then means UDP does not get through: TCP instead.
const QUIC_WITHIN: Duration = Duration::from_secs(5);
/// While on TCP, how often a QUIC handshake is tried again.
const QUIC_PROBE_EVERY: Duration = Duration::from_secs(30);
/// Buffered batches smaller than this (uncompressed) are joined with the ones
/// after them ([`Shipper::coalesce`]) ...
const COALESCE_BELOW: usize = 256 << 10;
/// ... up to this many bytes uncompressed ...
const COALESCE_RAW: usize = 1 << 20;
/// ... and this many parts.
const COALESCE_MAX_PARTS: usize = 64;
/// Under a `[bandwidth]` cap, batches leave in pieces of this size.
const PACE_PIECE: usize = 16 * 1024;

/// How often a capped writer whose charged bytes ran ahead of the wire looks
/// whether the transport has caught up.
const WIRE_POLL: Duration = Duration::from_millis(5);

pub struct Shipper {
    pub address: String,
    pub server_name: String,
    pub client: quinn::ClientConfig,
    /// The same certificates for the TCP fallback.
    pub tcp: TcpClientConfig,
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
    /// What `status` reports, for the heartbeat (set once the agent runs).
    pub report: Arc<std::sync::OnceLock<crate::admin::Reporter>>,
    /// The `[bandwidth]` cap batches are sent under.
    pub throttle: Arc<crate::bandwidth::Throttle>,
}

/// Reconnect delays: full jitter, ceiling 200 ms doubling up to 30 s.
fn reconnect_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(30))
}

enum Event {
    Frame(Msg),
    Closed(String),
}

/// How a session ended without an error.
enum Ended {
    Closed,
    /// QUIC works again: the TCP session was ended to reconnect over QUIC.
    QuicAgain,
}

/// The outcome of a QUIC handshake.
enum QuicAttempt {
    Up(quinn::Connection),
    /// No answer in time: UDP is probably blocked on the way.
    Unreachable(String),
    /// The exchange (or the local stack) answered no: TCP would not help.
    Refused(anyhow::Error),
}

impl Shipper {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = reconnect_backoff();
        let mut attempts = 0u64;
        let mut transport: Option<&'static str> = None;
        loop {
            attempts += 1;
            self.board.connecting(&self.address, attempts);
            let result = self
                .connect_and_ship(&shutdown, &mut backoff, &mut transport)
                .await;
            if shutdown.is_cancelled() {
                break;
            }
            let (msg, extra) = match result {
                // Straight back over QUIC: nothing failed.
                Ok(Ended::QuicAgain) => continue,
                Ok(Ended::Closed) => ("connection closed".to_string(), Duration::ZERO),
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
            let delay = backoff.next_delay() + extra;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One session: QUIC if a handshake completes within [`QUIC_WITHIN`], else
    /// TCP. `transport` is what the last session used, so each switch is logged
    /// once.
    async fn connect_and_ship(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        transport: &mut Option<&'static str>,
    ) -> Result<Ended> {
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
        let result = match self.connect_quic(&endpoint, addr).await {
            QuicAttempt::Up(conn) => {
                if *transport == Some("tcp") {
                    info!(exchange = %self.address, "QUIC gets through again; back on QUIC");
                }
                *transport = Some("quic");
                self.ship_on(Link::Quic(conn), addr, shutdown, backoff, None)
                    .await
            }
            QuicAttempt::Refused(e) => Err(e),
            QuicAttempt::Unreachable(why) => self
                .ship_on_tcp(&endpoint, addr, shutdown, backoff, transport, &why)
                .await
                .with_context(|| format!("over TCP, after QUIC: {why}")),
        };
        endpoint.close(0u32.into(), b"agent closing");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        result
    }

    async fn connect_quic(&self, endpoint: &quinn::Endpoint, addr: SocketAddr) -> QuicAttempt {
        let connecting = match endpoint.connect_with(self.client.clone(), addr, &self.server_name) {
            Ok(c) => c,
            Err(e) => {
                return QuicAttempt::Refused(
                    anyhow::Error::new(e)
                        .context(format!("connecting to {} ({addr})", self.address)),
                )
            }
        };
        match tokio::time::timeout(QUIC_WITHIN, connecting).await {
            Ok(Ok(conn)) => QuicAttempt::Up(conn),
            Err(_) => QuicAttempt::Unreachable(format!("no QUIC handshake within {QUIC_WITHIN:?}")),
            Ok(Err(quinn::ConnectionError::TimedOut)) => {
                QuicAttempt::Unreachable("the QUIC handshake timed out".into())
            }
            Ok(Err(e)) => QuicAttempt::Refused(
                anyhow::Error::new(e).context(format!("connecting to {} ({addr})", self.address)),
            ),
        }
    }

    /// A session over TCP, with QUIC tried in the background every
    /// [`QUIC_PROBE_EVERY`]: the first handshake that completes ends the session.
    async fn ship_on_tcp(
        &self,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        transport: &mut Option<&'static str>,
        quic_failed: &str,
    ) -> Result<Ended> {
        let link = ferry_transport::link::connect_tcp(addr, &self.server_name, &self.tcp).await?;
        // Only a TCP connection that works makes this a fallback: an exchange
        // that is down answers neither.
        if *transport != Some("tcp") {
            warn!(exchange = %self.address, why = %quic_failed, "QUIC does not get through (UDP blocked?); falling back to TLS over TCP on the same port");
        }
        *transport = Some("tcp");
        let quic_back = CancellationToken::new();
        let prober = tokio::spawn(probe_quic(
            endpoint.clone(),
            self.client.clone(),
            addr,
            self.server_name.clone(),
            quic_back.clone(),
        ));
        let result = self
            .ship_on(link.clone(), addr, shutdown, backoff, Some(&quic_back))
            .await;
        prober.abort();
        // Why the link ended (the exchange's close reason, a TLS alert such as
        // a revoked certificate) reaches the streams only as their end: say it.
        match result {
            Err(e) => match tokio::time::timeout(Duration::from_millis(200), link.closed()).await {
                Ok(why) => Err(e.context(why)),
                Err(_) => Err(e),
            },
            ok => ok,
        }
    }

    async fn ship_on(
        &self,
        conn: Link,
        addr: SocketAddr,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        quic_back: Option<&CancellationToken>,
    ) -> Result<Ended> {
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
        backoff.reset();
        self.board.connected(&self.address, conn.transport());
        info!(exchange = %self.address, %addr, transport = conn.transport(), "connected to the exchange");

        let (events_tx, mut events) = mpsc::channel::<Event>(1024);
        // Control stream replies (errors) come through the same event queue.
        spawn_reader(control_in, events_tx.clone());
        let mut writers: Vec<Option<FrameWriter>> = (0..self.names.len()).map(|_| None).collect();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            // Shutdown does not wait for a pump: under a low cap, sending the
            // window of batches can take minutes. A frame cut off here is in a
            // connection closed at once; the exchange drops it unacknowledged
            // and it is sent again on the next connection.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    conn.close(0, b"agent shutting down");
                    return Ok(Ended::Closed);
                }
                r = self.pump(&conn, &mut session, &mut writers, &events_tx) => r?,
            }
            tokio::select! {
                biased;
                // 1. Shutdown: stop sending; what is unacked stays buffered.
                _ = shutdown.cancelled() => {
                    conn.close(0, b"agent shutting down");
                    return Ok(Ended::Closed);
                }
                // 1b. On TCP, QUIC got through again: reconnect over it. What is
                // unacked is sent again and acknowledged as duplicates.
                _ = async {
                    match quic_back {
                        Some(t) => t.cancelled().await,
                        None => std::future::pending().await,
                    }
                } => {
                    conn.close(0, b"back to QUIC");
                    return Ok(Ended::QuicAgain);
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
        conn: &Link,
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
                    if matches!(msg, Msg::Batch(_)) && self.throttle.capped() {
                        // Paced in pieces, so a large batch does not leave in
                        // one burst. Each piece is charged before it is
                        // written, plus what the wire carried beyond what was
                        // charged (over QUIC: headers, acks,
                        // retransmissions); a writer whose charged bytes ran
                        // ahead of the wire waits for the transport first.
                        let throttle = &self.throttle;
                        w.send_paced(msg, PACE_PIECE, |n| async move {
                            let id = conn.stable_id();
                            let slack = throttle.slack(PACE_PIECE as u64);
                            while let Some(wire) = conn.wire_bytes_sent() {
                                if throttle.ahead_of_wire(id, wire) <= slack
                                    || conn.close_reason().is_some()
                                {
                                    break;
                                }
                                tokio::time::sleep(WIRE_POLL).await;
                            }
                            let owed = throttle.charge_piece(id, conn.wire_bytes_sent(), n as u64);
                            throttle.take(owed as usize).await;
                        })
                        .await?;
                    } else {
                        w.send(msg).await?;
                    }
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

    /// The heartbeat: what `ferry-agent status` shows, per stream and for the
    /// buffer, typed.
    fn heartbeat(&self) -> Status {
        let mut status = Status {
            time_unix_ms: ferry_adapters::now_unix_ms(),
            buffer_full: self.board.buffer_full() || self.board.disk_low(),
            disk_low: self.board.disk_low(),
            software: env!("CARGO_PKG_VERSION").to_string(),
            cert_not_after_unix: self.cert_not_after_unix,
            host: host_name(),
            ..Default::default()
        };
        match self.report.get() {
            Some(report) => {
                let r = report();
                status.started_unix = r.started_unix;
                status.buffer_bytes = r.buffer.bytes;
                status.buffer_max_bytes = r.buffer.max_bytes;
                status.streams = r
                    .streams
                    .into_iter()
                    .map(|v| StreamStatus {
                        name: v.name,
                        buffered_batches: v.buffered_batches,
                        buffered_bytes: v.buffered_bytes,
                        acked_seq: v.acked_seq,
                        head_seq: v.head_seq,
                        position: v.position,
                        error: v.source_error.unwrap_or_default(),
                        kind: v.kind,
                        lost: v
                            .lost
                            .iter()
                            .map(|&[from, to]| ferry_protocol::messages::SeqRange { from, to })
                            .collect(),
                        gauges: v.gauges,
                        ship_error: v.ship_error.unwrap_or_default(),
                    })
                    .collect();
            }
            None => {
                let states = self.buffer.states();
                status.streams = self
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
                    .collect();
            }
        }
        status
    }
}

/// This host's name, as the kernel has it.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
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

/// While on TCP: a QUIC handshake every [`QUIC_PROBE_EVERY`], closed at once;
/// the first that completes cancels `back`.
async fn probe_quic(
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: String,
    back: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + QUIC_PROBE_EVERY,
        QUIC_PROBE_EVERY,
    );
    loop {
        tick.tick().await;
        let Ok(connecting) = endpoint.connect_with(client.clone(), addr, &server_name) else {
            continue;
        };
        match tokio::time::timeout(QUIC_WITHIN, connecting).await {
            Ok(Ok(conn)) => {
                conn.close(0u32.into(), b"probe: QUIC gets through");
                back.cancel();
                return;
            }
            Ok(Err(e)) => debug!(error = %e, "QUIC still does not get through"),
            Err(_) => debug!("QUIC still does not get through"),
        }
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
