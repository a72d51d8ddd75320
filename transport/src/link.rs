//! One agent–exchange connection, whatever carries it: QUIC, or — where a
//! network blocks UDP — TLS 1.3 over TCP with the streams multiplexed by yamux.
//!
//! Both carry the same `ferry/1` protocol: the same certificates and client
//! certificate verification (with the revocation list), the same ALPN, the same
//! frames on the same bidirectional streams, all opened by the agent. Code above
//! this module sees a [`Link`] and boxed stream halves and never asks which.
//!
//! The TCP link is a yamux `Connection` over a `tokio_rustls` stream. yamux
//! makes progress only while its connection is polled, so a driver task owns it:
//! it serves open requests that come over a channel, hands inbound streams to
//! [`Link::accept_bi`] (the exchange) or, at the agent, which never accepts
//! streams, reads the exchange's close notice from them (see [`Link::close`])
//! and drops them (dropping answers the peer, which is what a liveness probe
//! needs), and sends keep-alives. QUIC's keep-alive (5 s) and idle timeout
//! (30 s) have their twins here: yamux has neither, and a TCP connection to a
//! vanished host would otherwise look open for the ~15 minutes of the kernel's
//! retransmissions.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::pki::CertIdentity;

/// The write half of a stream: quinn's `SendStream` or a yamux stream's half.
/// `shutdown` finishes the stream (for quinn it calls `finish`).
pub type SendHalf = Box<dyn AsyncWrite + Send + Unpin>;
/// The read half of a stream; a read of 0 bytes is the peer's finish.
pub type RecvHalf = Box<dyn AsyncRead + Send + Unpin>;

/// How often an idle TCP link makes its peer answer, as QUIC's keep-alive.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// A TCP link that received nothing this long is dead, as QUIC's idle timeout.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest the agent waits for a TCP connection and its TLS handshake.
const TCP_CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// The longest a closing TCP link waits for its last frames to leave.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Why a link ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Quic(#[from] quinn::ConnectionError),
    /// This end closed it.
    #[error("closed locally ({code}): {reason}")]
    TcpClosedLocally { code: u32, reason: String },
    /// The exchange closed it with a code and reason (QUIC's application
    /// close, carried over TCP by a close notice: see [`Link::close`]).
    #[error("closed by the exchange ({code}): {reason}")]
    TcpClosedByPeer { code: u32, reason: String },
    /// The peer closed it, it timed out, or the TLS stream failed (a TLS alert
    /// such as a revoked certificate shows in the text).
    #[error("the TCP link ended: {0}")]
    Tcp(String),
}

/// One connection between an agent and the exchange.
#[derive(Clone)]
pub enum Link {
    Quic(quinn::Connection),
    Tcp(Arc<TcpLink>),
}

impl Link {
    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendHalf, RecvHalf), LinkError> {
        match self {
            Link::Quic(c) => {
                let (s, r) = c.open_bi().await?;
                Ok((Box::new(s), Box::new(r)))
            }
            Link::Tcp(t) => t.open_bi().await,
        }
    }

    /// The next stream the peer opened.
    pub async fn accept_bi(&self) -> Result<(SendHalf, RecvHalf), LinkError> {
        match self {
            Link::Quic(c) => {
                let (s, r) = c.accept_bi().await?;
                Ok((Box::new(s), Box::new(r)))
            }
            Link::Tcp(t) => t.accept_bi().await,
        }
    }

    /// Closes the link with an application code and reason; the peer sees both.
    /// Over TCP the exchange (yamux server) sends them first on a stream of
    /// their own, the close notice (4 bytes of code, big-endian, then the
    /// reason), which the agent's driver reads instead of dropping the stream;
    /// the agent, which never has a reason the exchange acts on, sends none.
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Link::Quic(c) => c.close(code.into(), reason),
            Link::Tcp(t) => t.close(code, reason),
        }
    }

    /// Waits until the link has ended; says why.
    pub async fn closed(&self) -> LinkError {
        match self {
            Link::Quic(c) => LinkError::Quic(c.closed().await),
            Link::Tcp(t) => t.closed().await,
        }
    }

    /// Why the link ended, if it has.
    pub fn close_reason(&self) -> Option<LinkError> {
        match self {
            Link::Quic(c) => c.close_reason().map(LinkError::Quic),
            Link::Tcp(t) => t.ended.borrow().clone(),
        }
    }

    /// An id unique among the links of this process while they are open.
    pub fn stable_id(&self) -> usize {
        match self {
            Link::Quic(c) => c.stable_id(),
            Link::Tcp(t) => t.id,
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Link::Quic(c) => c.remote_address(),
            Link::Tcp(t) => t.remote,
        }
    }

    /// Bytes this end put on the wire so far: QUIC's UDP payloads (every
    /// packet: data, acknowledgements, retransmissions), or `None` over TCP,
    /// whose bytes the kernel frames.
    pub fn wire_bytes_sent(&self) -> Option<u64> {
        match self {
            Link::Quic(c) => Some(c.stats().udp_tx.bytes),
            Link::Tcp(_) => None,
        }
    }

    /// `"quic"` or `"tcp"`, for logs and `status`.
    pub fn transport(&self) -> &'static str {
        match self {
            Link::Quic(_) => "quic",
            Link::Tcp(_) => "tcp",
        }
    }

    /// A counter that grows whenever the peer sends anything (QUIC datagrams,
    /// TCP bytes): a liveness probe compares it before and after [`probe`](Self::probe).
    pub fn received(&self) -> u64 {
        match self {
            Link::Quic(c) => c.stats().udp_rx.datagrams,
            Link::Tcp(t) => t.received.load(Ordering::Relaxed),
        }
    }

    /// The round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        match self {
            Link::Quic(c) => c.rtt(),
            Link::Tcp(t) => t.rtt,
        }
    }

    /// Makes a live peer send something within a round trip: a stream opened
    /// and finished at once (QUIC acknowledges it; yamux answers the new
    /// stream). Gives up after `within`.
    pub async fn probe(&self, within: Duration) {
        match self {
            Link::Quic(c) => {
                if let Ok(Ok((mut send, _recv))) = tokio::time::timeout(within, c.open_bi()).await {
                    let _ = send.finish();
                }
            }
            Link::Tcp(_) => {
                let _ = tokio::time::timeout(within, async {
                    if let Ok((mut send, _recv)) = self.open_bi().await {
                        // yamux opens a stream lazily: an empty write sends its SYN.
                        let _ = send.write(&[]).await;
                        let _ = send.shutdown().await;
                    }
                })
                .await;
            }
        }
    }

    /// The verified identity of the peer's certificate.
    pub fn peer_identity(&self) -> Result<CertIdentity> {
        match self {
            Link::Quic(c) => crate::tls::peer_identity(c),
            Link::Tcp(t) => crate::tls::identity_of_chain(&t.peer_certs),
        }
    }
}

/// The TCP side of a [`Link`]: handles to the task that drives the yamux
/// connection.
pub struct TcpLink {
    id: usize,
    remote: SocketAddr,
    rtt: Duration,
    peer_certs: Vec<CertificateDer<'static>>,
    opens: mpsc::Sender<oneshot::Sender<yamux::Stream>>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<yamux::Stream>>,
    received: Arc<AtomicU64>,
    close: CancellationToken,
    close_why: Arc<Mutex<Option<LinkError>>>,
    ended: watch::Receiver<Option<LinkError>>,
}

/// The last handle gone closes the link, as dropping every quinn `Connection`
/// does (the driver holds no handle, so it would otherwise run on, answering
/// probes for a session nobody uses).
impl Drop for TcpLink {
    fn drop(&mut self) {
        self.close.cancel();
    }
}

/// TCP link ids count down from the top so they never meet quinn's (addresses).
static NEXT_TCP_ID: AtomicUsize = AtomicUsize::new(usize::MAX);

impl TcpLink {
    async fn open_bi(&self) -> Result<(SendHalf, RecvHalf), LinkError> {
        let (tx, rx) = oneshot::channel();
        if self.opens.send(tx).await.is_err() {
            return Err(self.ended_now());
        }
        match rx.await {
            Ok(s) => Ok(split(s)),
            Err(_) => Err(self.ended_now()),
        }
    }

    async fn accept_bi(&self) -> Result<(SendHalf, RecvHalf), LinkError> {
        match self.inbound.lock().await.recv().await {
            Some(s) => Ok(split(s)),
            None => Err(self.ended_now()),
        }
    }

    fn close(&self, code: u32, reason: &[u8]) {
        if let Ok(mut why) = self.close_why.lock() {
            why.get_or_insert(LinkError::TcpClosedLocally {
                code,
                reason: String::from_utf8_lossy(reason).into_owned(),
            });
        }
        self.close.cancel();
    }

    async fn closed(&self) -> LinkError {
        let mut ended = self.ended.clone();
        let why = match ended.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone(),
            Err(_) => None,
        };
        why.unwrap_or_else(|| self.ended_now())
    }

    /// Why the link ended, once the driver has said so.
    fn ended_now(&self) -> LinkError {
        self.ended
            .borrow()
            .clone()
            .unwrap_or_else(|| LinkError::Tcp("the link's driver stopped".into()))
    }
}

/// The agent's TLS configuration for the TCP transport (see
/// [`tls::tcp_client_config`](crate::tls::tcp_client_config)).
#[derive(Clone)]
pub struct TcpClientConfig(pub(crate) Arc<rustls::ClientConfig>);

/// The exchange's TLS configuration for the TCP transport (see
/// [`tls::tcp_server_config`](crate::tls::tcp_server_config)).
#[derive(Clone)]
pub struct TcpServerConfig {
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) max_streams: usize,
}

/// Connects to the exchange over TCP: TLS 1.3 with this agent's certificate,
/// then yamux as the client.
pub async fn connect_tcp(
    addr: SocketAddr,
    server_name: &str,
    cfg: &TcpClientConfig,
) -> Result<Link> {
    let started = tokio::time::Instant::now();
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| anyhow!("{server_name:?} is not a server name: {e}"))?;
    // A network that drops packets rather than refusing must not hold the
    // shipper for the kernel's minutes of SYN retries.
    let tls = tokio::time::timeout(TCP_CONNECT_WITHIN, async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting over TCP to {addr}"))?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(cfg.0.clone())
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake over TCP with {addr}"))
    })
    .await
    .map_err(|_| {
        anyhow!("no TCP connection and TLS handshake with {addr} within {TCP_CONNECT_WITHIN:?}")
    })??;
    let peer_certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    Ok(start(
        tls,
        addr,
        peer_certs,
        started.elapsed() / 2,
        yamux::Mode::Client,
        crate::tls::MAX_STREAMS,
    ))
}

/// Takes an accepted TCP connection through the TLS handshake (the client's
/// certificate verified, revocations included) and starts yamux as the server.
pub async fn accept_tcp(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    cfg: &TcpServerConfig,
) -> Result<Link> {
    let started = tokio::time::Instant::now();
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsAcceptor::from(cfg.tls.clone())
        .accept(tcp)
        .await
        .context("TLS handshake refused")?;
    let peer_certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    Ok(start(
        tls,
        remote,
        peer_certs,
        started.elapsed() / 2,
        yamux::Mode::Server,
        cfg.max_streams,
    ))
}

/// The yamux configuration: `max_streams` open at once, and receive windows
/// that let a 16 MiB frame flow without waiting on every 256 KiB (each stream's
/// window grows with the measured bandwidth-delay product, all of them together
/// up to 32 MiB beyond the minimum, as QUIC's connection window).
fn yamux_config(max_streams: usize) -> yamux::Config {
    let max_streams = max_streams.clamp(1, 4096);
    let mut cfg = yamux::Config::default();
    // yamux asserts window >= streams × 256 KiB at each setter: no limit first,
    // then the streams, then the window that satisfies it.
    cfg.set_max_connection_receive_window(None);
    cfg.set_max_num_streams(max_streams);
    cfg.set_max_connection_receive_window(Some(
        max_streams * yamux::DEFAULT_CREDIT as usize + (32 << 20),
    ));
    cfg.set_split_send_size(64 << 10);
    cfg
}

fn start<T>(
    tls: T,
    remote: SocketAddr,
    peer_certs: Vec<CertificateDer<'static>>,
    rtt: Duration,
    mode: yamux::Mode,
    max_streams: usize,
) -> Link
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let received = Arc::new(AtomicU64::new(0));
    let io = Counted {
        inner: tls,
        received: received.clone(),
    };
    let conn = yamux::Connection::new(
        TokioAsyncReadCompatExt::compat(io),
        yamux_config(max_streams),
        mode,
    );
    let (opens_tx, opens_rx) = mpsc::channel(64);
    let (inbound_tx, inbound_rx) = mpsc::channel(max_streams.max(1));
    let (ended_tx, ended_rx) = watch::channel(None);
    let close = CancellationToken::new();
    let close_why = Arc::new(Mutex::new(None));
    let link = Arc::new(TcpLink {
        id: NEXT_TCP_ID.fetch_sub(1, Ordering::Relaxed),
        remote,
        rtt,
        peer_certs,
        opens: opens_tx.clone(),
        inbound: tokio::sync::Mutex::new(inbound_rx),
        received: received.clone(),
        close: close.clone(),
        close_why: close_why.clone(),
        ended: ended_rx,
    });
    let accepts = matches!(mode, yamux::Mode::Server).then_some(inbound_tx);
    tokio::spawn(async move {
        let peer_why = Arc::new(Mutex::new(None));
        let why = drive(
            conn,
            opens_rx,
            opens_tx,
            accepts,
            received,
            Reasons {
                close,
                local: &close_why,
                peer: &peer_why,
            },
        )
        .await;
        // The reason given to `close`, else the exchange's notice, else the driver's.
        let given = |m: &Mutex<Option<LinkError>>| m.lock().ok().and_then(|w| w.clone());
        let why = given(&close_why)
            .or_else(|| given(&peer_why))
            .unwrap_or(why);
        let _ = ended_tx.send(Some(why));
    });
    Link::Tcp(link)
}

/// How a link is told to close, and where the reasons for its end are kept.
struct Reasons<'a> {
    close: CancellationToken,
    /// Given to [`Link::close`].
    local: &'a Mutex<Option<LinkError>>,
    /// From the exchange's close notice.
    peer: &'a Mutex<Option<LinkError>>,
}

/// Polls the yamux connection until it ends: open requests, inbound streams,
/// keep-alives, a local close. Returns why it ended.
async fn drive<S>(
    mut conn: yamux::Connection<Compat<Counted<S>>>,
    mut opens: mpsc::Receiver<oneshot::Sender<yamux::Stream>>,
    probes: mpsc::Sender<oneshot::Sender<yamux::Stream>>,
    accepts: Option<mpsc::Sender<yamux::Stream>>,
    received: Arc<AtomicU64>,
    reasons: Reasons<'_>,
) -> LinkError
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Reasons {
        close,
        local: close_why,
        peer: peer_why,
    } = reasons;
    let mut waiting: Option<oneshot::Sender<yamux::Stream>> = None;
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = received.load(Ordering::Relaxed);
    let mut silent = Duration::ZERO;
    let cancelled = close.cancelled();
    tokio::pin!(cancelled);
    let why = std::future::poll_fn(|cx| {
        // 1. A local close: stop serving, send GoAway (below, after the loop).
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        // 2. Keep-alive and idle timeout.
        while keepalive.poll_tick(cx).is_ready() {
            let now = received.load(Ordering::Relaxed);
            if now != last_seen {
                last_seen = now;
                silent = Duration::ZERO;
                continue;
            }
            silent += KEEPALIVE;
            if silent >= IDLE_TIMEOUT {
                return Poll::Ready(Some(LinkError::Tcp(format!(
                    "nothing received for {IDLE_TIMEOUT:?} (idle timeout)"
                ))));
            }
            // Make the peer answer: a stream opened and finished at once.
            let probes = probes.clone();
            tokio::spawn(async move {
                let (tx, rx) = oneshot::channel();
                if probes.send(tx).await.is_ok() {
                    if let Ok(s) = rx.await {
                        let (mut send, _recv) = split(s);
                        let _ = send.write(&[]).await;
                        let _ = send.shutdown().await;
                    }
                }
            });
        }
        // 3. Streams this end asked for.
        loop {
            if waiting.is_none() {
                match opens.poll_recv(cx) {
                    Poll::Ready(Some(w)) => waiting = Some(w),
                    _ => break,
                }
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(s)) => {
                    if let Some(w) = waiting.take() {
                        // An opener that gave up drops the stream: yamux resets it.
                        let _ = w.send(s);
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(LinkError::Tcp(e.to_string()))),
                Poll::Pending => break,
            }
        }
        // 4. Streams the peer opened (and the connection's own progress).
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => match &accepts {
                    // A full queue or a handler gone: the stream is reset.
                    Some(a) => {
                        let _ = a.try_send(s);
                    }
                    None => read_notice(s, cx, peer_why),
                },
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(LinkError::Tcp(e.to_string())))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Some(LinkError::Tcp(
                        "the peer closed the connection".into(),
                    )))
                }
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await;
    match why {
        Some(why) => why,
        None => {
            let given = close_why.lock().ok().and_then(|w| w.clone());
            if let (true, Some(LinkError::TcpClosedLocally { code, reason })) =
                (accepts.is_some(), given)
            {
                // Queued before the GoAway: yamux's close sends the streams'
                // frames first.
                let mut notice = code.to_be_bytes().to_vec();
                notice.extend_from_slice(&reason.as_bytes()[..reason.len().min(NOTICE_REASON)]);
                let _ = tokio::time::timeout(CLOSE_LINGER, async {
                    if let Ok(s) = std::future::poll_fn(|cx| conn.poll_new_outbound(cx)).await {
                        let (mut send, _recv) = split(s);
                        let _ = send.write_all(&notice).await;
                        let _ = send.shutdown().await;
                    }
                })
                .await;
            }
            let _ =
                tokio::time::timeout(CLOSE_LINGER, std::future::poll_fn(|cx| conn.poll_close(cx)))
                    .await;
            LinkError::TcpClosedLocally {
                code: 0,
                reason: "closed".into(),
            }
        }
    }
}

/// The longest reason a close notice carries (QUIC allows about a datagram's).
const NOTICE_REASON: usize = 1000;

/// A stream the exchange opened to an agent: a close notice (its code and
/// reason kept as why the link ends), or a liveness probe (empty). The notice
/// arrives whole with the stream's first frame, so one read takes it; the
/// stream is then dropped, which answers the peer.
fn read_notice(s: yamux::Stream, cx: &mut Context<'_>, peer_why: &Mutex<Option<LinkError>>) {
    let mut s = FuturesAsyncReadCompatExt::compat(s);
    let mut raw = [0u8; 4 + NOTICE_REASON];
    let mut buf = ReadBuf::new(&mut raw);
    if let Poll::Ready(Ok(())) = Pin::new(&mut s).poll_read(cx, &mut buf) {
        if let [a, b, c, d, reason @ ..] = buf.filled() {
            if let Ok(mut why) = peer_why.lock() {
                *why = Some(LinkError::TcpClosedByPeer {
                    code: u32::from_be_bytes([*a, *b, *c, *d]),
                    reason: String::from_utf8_lossy(reason).into_owned(),
                });
            }
        }
    }
}

fn split(s: yamux::Stream) -> (SendHalf, RecvHalf) {
    let (r, w) = tokio::io::split(FuturesAsyncReadCompatExt::compat(s));
    (Box::new(w), Box::new(r))
}

/// A TLS stream that counts the bytes it receives (the liveness probe's and the
/// idle timeout's measure).
struct Counted<T> {
    inner: T,
    received: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::pki::{self, create_ca, issue_agent, issue_server};
    use crate::tls::{is_revoked, tcp_client_config, tcp_server_config, TlsFiles, REVOKED_REASON};

    /// A CA, the exchange's certificate for `exchange.test` and an agent's, as
    /// PEM files in `dir`; with `revoked`, a CRL that lists the agent's.
    fn pki_in(dir: &Path, revoked: bool) -> Option<std::path::PathBuf> {
        let ca = create_ca("test CA").unwrap();
        let server = issue_server(&ca, &["exchange.test".to_string()]).unwrap();
        let agent = issue_agent(&ca, "hp-mz-01", "210102-MZ").unwrap();
        for (name, text) in [
            ("ca.pem", &ca.cert_pem),
            ("server.pem", &server.cert_pem),
            ("server.key", &server.key_pem),
            ("agent.pem", &agent.cert_pem),
            ("agent.key", &agent.key_pem),
        ] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        revoked.then(|| {
            let serial = crate::tls::identity_in_file(&dir.join("agent.pem"))
                .unwrap()
                .serial;
            let list = pki::crl(
                &ca,
                &[pki::Revocation {
                    serial,
                    revoked_unix: 1_700_000_000,
                    reason: pki::Reason::KeyCompromise,
                }],
                1,
            )
            .unwrap();
            let path = dir.join("crl.pem");
            std::fs::write(&path, list).unwrap();
            path
        })
    }

    /// An agent's and the exchange's ends of one TCP link on loopback.
    async fn pair(revoked: bool) -> (Result<Link>, tokio::task::JoinHandle<Result<Link>>) {
        let dir = tempfile::tempdir().unwrap();
        let crl = pki_in(dir.path(), revoked);
        let server = tcp_server_config(
            &TlsFiles {
                ca: &dir.path().join("ca.pem"),
                cert: &dir.path().join("server.pem"),
                key: &dir.path().join("server.key"),
            },
            crl.as_deref(),
            16,
        )
        .unwrap();
        let client = tcp_client_config(&TlsFiles {
            ca: &dir.path().join("ca.pem"),
            cert: &dir.path().join("agent.pem"),
            key: &dir.path().join("agent.key"),
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exchange = tokio::spawn(async move {
            let (socket, remote) = listener.accept().await?;
            accept_tcp(socket, remote, &server).await
        });
        let agent = connect_tcp(addr, "exchange.test", &client).await;
        (agent, exchange)
    }

    #[tokio::test]
    async fn a_16_mib_frame_crosses_and_the_agent_is_identified() {
        let (agent, exchange) = pair(false).await;
        let (agent, exchange) = (agent.unwrap(), exchange.await.unwrap().unwrap());
        assert_eq!((agent.transport(), exchange.transport()), ("tcp", "tcp"));
        let id = exchange.peer_identity().unwrap();
        assert_eq!(
            (id.agent_id.as_str(), id.department.as_str()),
            ("hp-mz-01", "210102-MZ")
        );

        // The agent opens, writes 16 MiB and finishes; the exchange reads it all
        // and answers on the same stream.
        let (mut send, mut recv) = agent.open_bi().await.unwrap();
        let body: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = body.clone();
        let writer = tokio::spawn(async move {
            send.write_all(&body).await.unwrap();
            send.shutdown().await.unwrap();
        });
        let (mut answer, mut incoming) = exchange.accept_bi().await.unwrap();
        let mut got = Vec::new();
        incoming.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == expected, "the 16 MiB arrived intact");
        answer.write_all(b"ack").await.unwrap();
        answer.shutdown().await.unwrap();
        let mut back = Vec::new();
        recv.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"ack");
    }

    #[tokio::test]
    async fn a_live_peer_answers_a_probe_on_either_end() {
        let (agent, exchange) = pair(false).await;
        let (agent, exchange) = (agent.unwrap(), exchange.await.unwrap().unwrap());
        // The agent accepts no streams: its end resets the exchange's probe.
        let before = exchange.received();
        exchange.probe(Duration::from_millis(500)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(exchange.received() > before, "the agent answered");
        // The exchange hands the agent's probe to its handler, which finds it empty.
        let before = agent.received();
        agent.probe(Duration::from_millis(500)).await;
        let (_send, mut recv) = exchange.accept_bi().await.unwrap();
        let mut got = Vec::new();
        recv.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
        drop((_send, recv));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(agent.received() > before, "the exchange answered");
        assert!(agent.close_reason().is_none() && exchange.close_reason().is_none());
    }

    #[tokio::test]
    async fn the_exchange_close_reason_reaches_the_agent() {
        let (agent, exchange) = pair(false).await;
        let (agent, exchange) = (agent.unwrap(), exchange.await.unwrap().unwrap());
        exchange.close(3, REVOKED_REASON);
        let why = tokio::time::timeout(Duration::from_secs(5), agent.closed())
            .await
            .unwrap();
        assert!(
            matches!(&why, LinkError::TcpClosedByPeer { code: 3, reason } if reason.as_bytes() == REVOKED_REASON),
            "{why}"
        );
        assert!(is_revoked(
            &anyhow::anyhow!("the stream ended").context(why)
        ));
        let own = tokio::time::timeout(Duration::from_secs(5), exchange.closed())
            .await
            .unwrap();
        assert!(
            matches!(own, LinkError::TcpClosedLocally { code: 3, .. }),
            "{own}"
        );
        assert!(agent.open_bi().await.is_err());
    }

    #[tokio::test]
    async fn a_revoked_certificate_is_refused_and_the_agent_learns_why() {
        let (agent, exchange) = pair(true).await;
        assert!(exchange.await.unwrap().is_err());
        // TLS 1.3: the client is usually done before the server checked its
        // certificate, and the refusal arrives as an alert on the first read.
        let why = match agent {
            Err(e) => e,
            Ok(agent) => {
                if let Ok((mut send, _recv)) = agent.open_bi().await {
                    let _ = send.write_all(b"hello").await;
                }
                let why = tokio::time::timeout(Duration::from_secs(5), agent.closed())
                    .await
                    .unwrap();
                anyhow::anyhow!("the control stream ended").context(why)
            }
        };
        assert!(is_revoked(&why), "{why:#}");
    }
}
