//! `ferry-exchange serve`: the QUIC endpoint, one task per connection, one
//! committer thread shared by all connections (group commit: many agents, one sync).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::messages::{frame::Msg, Ack, Error as WireError, ErrorCode};
use ferry_protocol::session::{valid_stream_name, ExchangeSession, PeerIdentity, SessionError};
use ferry_transport::tls::{peer_identity, server_config, TlsFiles};
use ferry_transport::{FrameReader, FrameWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::config::ExchangeConfig;
use crate::store::{now_unix_ms, Incoming, Store, StoreError};

/// Most batches one group commit takes.
const MAX_GROUP: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

type Reply = oneshot::Sender<Result<u64, (ErrorCode, String)>>;

struct StoreRequest {
    incoming: Incoming,
    reply: Reply,
}

/// The committer thread: takes every batch waiting from any connection, stores the
/// group with one sync, then answers each.
fn spawn_committer(store: Arc<Store>) -> (mpsc::Sender<StoreRequest>, std::thread::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<StoreRequest>(4096);
    let handle = std::thread::Builder::new()
        .name("store-committer".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                let mut bytes = 0usize;
                while group.len() < MAX_GROUP && bytes < 64 << 20 {
                    match rx.try_recv() {
                        Ok(r) => {
                            bytes += r.incoming.batch.payload.len();
                            group.push(r)
                        }
                        Err(_) => break,
                    }
                }
                let (items, replies): (Vec<Incoming>, Vec<Reply>) =
                    group.into_iter().map(|r| (r.incoming, r.reply)).unzip();
                let results = store.commit_group(&items);
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result.map_err(|e| match e {
                        StoreError::Invalid(m) => (ErrorCode::Protocol, m),
                        other => (ErrorCode::Internal, other.to_string()),
                    }));
                }
            }
        });
    match handle {
        Ok(h) => (tx, h),
        // Spawning a thread fails only when the process is out of resources.
        Err(e) => {
            error!(error = %e, "cannot start the store committer thread");
            std::process::exit(1);
        }
    }
}

pub async fn serve(cfg: ExchangeConfig, shutdown: CancellationToken) -> Result<()> {
    let store_dir = cfg.store.dir.clone();
    let cache = cfg.store.cache_size;
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("creating the store directory {}", store_dir.display()))?;
    let store =
        Arc::new(tokio::task::spawn_blocking(move || Store::open(&store_dir, cache)).await??);
    let quic = quic_config(&cfg)?;
    let listen: SocketAddr = cfg.exchange.listen.parse().with_context(|| {
        format!(
            "exchange.listen {:?} is not an address:port",
            cfg.exchange.listen
        )
    })?;
    let secret = ferry_transport::tls::reset_secret(&cfg.store.dir.join("reset.key"))?;
    let socket =
        std::net::UdpSocket::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for QUIC"))?;
    let endpoint = quinn::Endpoint::new(
        ferry_transport::tls::server_endpoint_config(&secret),
        Some(quic),
        socket,
        runtime,
    )
    .with_context(|| format!("listening on {listen}"))?;
    let (commits, committer) = spawn_committer(store.clone());
    let admin = crate::admin::bind(&cfg.admin_socket())?;
    let (reloads, mut reload_requests) = mpsc::channel(4);
    let admin_task = tokio::spawn(crate::admin::serve(
        admin,
        store.clone(),
        reloads,
        shutdown.clone(),
    ));
    let live = Live::default();

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(listen = %endpoint.local_addr().unwrap_or(listen), store = %cfg.store.dir.display(), "exchange serving");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(answer) = reload_requests.recv() => {
                let r = reload_trust(&cfg, &endpoint, &live).map_err(|e| format!("{e:#}"));
                if let Err(e) = &r {
                    warn!(error = %e, "the revocation list could not be taken");
                }
                let _ = answer.send(r);
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let store = store.clone();
                let commits = commits.clone();
                let live = live.clone();
                let remote = incoming.remote_address();
                tokio::spawn(
                    async move {
                        if let Err(e) = connection(incoming, store, commits, live).await {
                            info!(error = %format!("{e:#}"), "connection ended");
                        }
                    }
                    .instrument(info_span!("conn", %remote)),
                );
            }
        }
    }
    info!("shutting down");
    endpoint.close(0u32.into(), b"exchange shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    drop(commits);
    let _ = admin_task.await;
    let _ = tokio::task::spawn_blocking(move || committer.join()).await;
    store.close()?;
    let _ = std::fs::remove_file(cfg.admin_socket());
    Ok(())
}

/// The endpoint's TLS setup, with the revocation list if there is one.
fn quic_config(cfg: &ExchangeConfig) -> Result<quinn::ServerConfig> {
    let crl = crate::trust::crl_path(cfg);
    server_config(
        &TlsFiles {
            ca: &cfg.tls.ca,
            cert: &cfg.tls.cert,
            key: &cfg.tls.key,
        },
        crl.as_deref(),
    )
}

/// Open agent connections by certificate serial, so a revocation can end them.
#[derive(Clone, Default)]
struct Live(Arc<std::sync::Mutex<std::collections::HashMap<usize, (String, quinn::Connection)>>>);

impl Live {
    fn add(&self, serial: &str, conn: &quinn::Connection) -> LiveGuard {
        if let Ok(mut m) = self.0.lock() {
            m.insert(conn.stable_id(), (serial.to_string(), conn.clone()));
        }
        LiveGuard {
            live: self.clone(),
            id: conn.stable_id(),
        }
    }
}

struct LiveGuard {
    live: Live,
    id: usize,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.live.0.lock() {
            m.remove(&self.id);
        }
    }
}

/// Takes the revocation list anew for new handshakes and closes the open
/// connections of revoked certificates; returns how many it closed.
fn reload_trust(cfg: &ExchangeConfig, endpoint: &quinn::Endpoint, live: &Live) -> Result<usize> {
    endpoint.set_server_config(Some(quic_config(cfg)?));
    let revoked: std::collections::HashSet<String> = crate::trust::revoked(cfg)?
        .into_iter()
        .map(|r| r.serial)
        .collect();
    let mut closed = 0;
    if let Ok(m) = live.0.lock() {
        for (serial, conn) in m.values() {
            if revoked.contains(serial) {
                conn.close(
                    (ErrorCode::Forbidden as u32).into(),
                    ferry_transport::tls::REVOKED_REASON,
                );
                closed += 1;
            }
        }
    }
    info!(
        revoked = revoked.len(),
        closed, "revocation list taken; revoked agents' connections closed"
    );
    Ok(closed)
}

fn wire_error(code: ErrorCode, message: impl Into<String>, stream: &str) -> Msg {
    Msg::Error(WireError {
        code: code as i32,
        message: message.into(),
        stream: stream.to_string(),
    })
}

async fn connection(
    incoming: quinn::Incoming,
    store: Arc<Store>,
    commits: mpsc::Sender<StoreRequest>,
    live: Live,
) -> Result<()> {
    let remote = incoming.remote_address();
    let conn = incoming.await.context("TLS handshake refused")?;
    let id = peer_identity(&conn)?;
    let _live = live.add(&id.serial, &conn);
    if !valid_stream_name(&id.agent_id) {
        conn.close(2u32.into(), b"agent id not acceptable");
        return Err(anyhow!(
            "certificate CN {:?} is not a valid agent id",
            id.agent_id
        ));
    }
    let span = info_span!("agent", agent = %id.agent_id);
    async move {
        let (send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
            .await
            .context("no control stream within 15s")??;
        let mut control = FrameWriter::new(send);
        let mut control_in = FrameReader::new(recv, MAX_FRAME);
        let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, control_in.next()).await?? {
            Some(Msg::Hello(h)) => h,
            _ => {
                control.send(wire_error(ErrorCode::Protocol, "expected Hello", "")).await?;
                conn.close(1u32.into(), b"expected Hello");
                return Err(anyhow!("first frame was not Hello"));
            }
        };
        let mut next = std::collections::BTreeMap::new();
        for s in &hello.streams {
            let n = store.next_expected(&id.agent_id, &s.name)?;
            next.insert(s.name.clone(), n);
        }
        let mut session = ExchangeSession::new(PeerIdentity {
            agent_id: id.agent_id.clone(),
            department: id.department.clone(),
        });
        let welcome = match session.handle_hello(&hello, |s| next.get(s).copied().unwrap_or(1), MAX_FRAME as u32) {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "refusing agent");
                control.send(wire_error(e.code(), e.to_string(), "")).await?;
                control.finish();
                tokio::time::sleep(Duration::from_millis(200)).await;
                conn.close(close_code(&e), e.to_string().as_bytes());
                return Err(e.into());
            }
        };
        let mut record = store.agent(&id.agent_id)?.unwrap_or_default();
        record.agent_id = id.agent_id.clone();
        record.department = id.department.clone();
        record.cert_serial = id.serial.clone();
        record.last_seen_unix_ms = now_unix_ms();
        record.remote = remote.to_string();
        record.software = hello.software.clone();
        record.config_digest = hello.config_digest.clone();
        record.streams = hello.streams.iter().map(|s| s.name.clone()).collect();
        store.put_agent(&record)?;
        control.send(Msg::Welcome(welcome)).await?;
        info!(streams = hello.streams.len(), "agent connected");

        let session = Arc::new(session);
        loop {
            tokio::select! {
                bi = conn.accept_bi() => {
                    let (send, recv) = bi?;
                    let session = session.clone();
                    let commits = commits.clone();
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        if let Err(e) = data_stream(send, recv, session, commits, &conn).await {
                            debug!(error = %format!("{e:#}"), "data stream ended");
                        }
                    }.in_current_span());
                }
                frame = control_in.next() => match frame {
                    Ok(Some(Msg::Status(status))) => {
                        record.last_seen_unix_ms = now_unix_ms();
                        record.status = Some(serde_json::json!({
                            "buffer_full": status.buffer_full,
                            "cert_not_after_unix": status.cert_not_after_unix,
                            "streams": status.streams.iter().map(|s| serde_json::json!({
                                "name": s.name, "head_seq": s.head_seq, "acked_seq": s.acked_seq,
                                "buffered_batches": s.buffered_batches, "buffered_bytes": s.buffered_bytes,
                            })).collect::<Vec<_>>(),
                        }));
                        store.put_agent(&record)?;
                    }
                    Ok(Some(_)) => {
                        conn.close(1u32.into(), b"unexpected frame on the control stream");
                        return Err(anyhow!("unexpected frame on the control stream"));
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let _ = control.send(wire_error(ErrorCode::Protocol, format!("{e:#}"), "")).await;
                        conn.close(1u32.into(), b"malformed frame");
                        return Err(e);
                    }
                },
            }
        }
    }
    .instrument(span)
    .await
}

fn close_code(e: &SessionError) -> quinn::VarInt {
    (e.code() as u32).into()
}

/// One data stream: batches in, acks out, pipelined so a window of batches is in
/// the store's queue at once.
async fn data_stream(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: Arc<ExchangeSession>,
    commits: mpsc::Sender<StoreRequest>,
    conn: &quinn::Connection,
) -> Result<()> {
    type Pending = (String, oneshot::Receiver<Result<u64, (ErrorCode, String)>>);
    let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(256);
    let mut writer = FrameWriter::new(send);
    let acks_conn = conn.clone();
    let acks = tokio::spawn(async move {
        while let Some((stream, rx)) = pending_rx.recv().await {
            match rx.await {
                Ok(Ok(up_to)) => {
                    if writer
                        .send(Msg::Ack(Ack {
                            stream,
                            up_to_seq: up_to,
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(Err((code, message))) => {
                    warn!(%stream, %message, "batch not stored");
                    let _ = writer.send(wire_error(code, message, &stream)).await;
                    writer.finish();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    acks_conn.close((code as u32).into(), b"batch not stored");
                    return;
                }
                Err(_) => return,
            }
        }
    });
    let mut reader = FrameReader::new(recv, MAX_FRAME);
    let result = loop {
        let batch = match reader.next().await {
            Ok(Some(Msg::Batch(b))) => b,
            Ok(Some(_)) => {
                break Err((
                    ErrorCode::Protocol,
                    "only Batch frames belong on a data stream".to_string(),
                    String::new(),
                ))
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err((ErrorCode::Protocol, format!("{e:#}"), String::new())),
        };
        if let Err(e) = session.handle_batch(&batch) {
            warn!(stream = %batch.stream, error = %e, "batch refused");
            break Err((e.code(), e.to_string(), batch.stream));
        }
        let (reply, rx) = oneshot::channel();
        let stream = batch.stream.clone();
        let incoming = Incoming {
            agent: session.peer().agent_id.clone(),
            batch,
        };
        if commits
            .send(StoreRequest { incoming, reply })
            .await
            .is_err()
        {
            break Err((
                ErrorCode::Internal,
                "the exchange is shutting down".into(),
                stream,
            ));
        }
        if pending_tx.send((stream, rx)).await.is_err() {
            break Ok(());
        }
    };
    if let Err((code, message, stream)) = result {
        // Report through the ack writer so the error follows the acks already due.
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err((code, message.clone())));
        let _ = pending_tx.send((stream, rx)).await;
        drop(pending_tx);
        let _ = acks.await;
        return Err(anyhow!(message));
    }
    drop(pending_tx);
    let _ = acks.await;
    Ok(())
}
