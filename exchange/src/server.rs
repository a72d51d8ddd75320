//! `ferry-exchange serve`: the QUIC endpoint and, on the same port, the TCP
//! listener for agents whose network blocks UDP (TLS 1.3 + yamux, see
//! `ferry_transport::link`); one task per connection of either, one committer
//! thread shared by all connections (group commit: many agents, one sync).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::messages::{frame::Msg, Ack, Error as WireError, ErrorCode, ProbeReply};
use ferry_protocol::session::{
    valid_stream_name, ExchangeSession, PeerIdentity, SessionError, DEFAULT_WINDOW,
};
use ferry_transport::framed::{Budget, Grant};
use ferry_transport::link::{RecvHalf, SendHalf, TcpServerConfig};
use ferry_transport::tls::{server_config_limited, tcp_server_config, TlsFiles};
use ferry_transport::{FrameReader, FrameWriter, Link};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::config::ExchangeConfig;
use crate::store::{now_unix_ms, Backend, Incoming, Item, SharedStore, StoreError};

/// Exit status after a failed store sync (EX_IOERR), so a supervisor restarts it.
pub const EXIT_STORE_FAILED: i32 = 74;

/// Most batches one group commit takes.
const MAX_GROUP: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// A stored item's cumulative ack and the files in it that failed their
/// SHA-256 (or why it was not stored).
type Answer = Result<(u64, Vec<String>), (ErrorCode, String)>;
type Reply = oneshot::Sender<Answer>;

struct StoreRequest {
    incoming: Incoming,
    reply: Reply,
}

/// The committer thread: takes every batch waiting from any connection, stores the
/// group with one sync, then answers each.
fn spawn_committer(
    store: SharedStore,
    stored: crate::metrics::StoredCounts,
) -> (mpsc::Sender<StoreRequest>, std::thread::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<StoreRequest>(4096);
    let handle = std::thread::Builder::new()
        .name("store-committer".into())
        .spawn(move || {
            let mut counting = crate::metrics::Counting::new(stored);
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                let mut bytes = 0usize;
                while group.len() < MAX_GROUP && bytes < 64 << 20 {
                    match rx.try_recv() {
                        Ok(r) => {
                            bytes += r.incoming.payload_len();
                            group.push(r)
                        }
                        Err(_) => break,
                    }
                }
                let (items, replies): (Vec<Incoming>, Vec<Reply>) =
                    group.into_iter().map(|r| (r.incoming, r.reply)).unzip();
                counting.before(&*store, &items);
                let results = store.commit_group(&items);
                counting.after(&items, &results);
                for ((reply, item), result) in replies.into_iter().zip(&items).zip(results) {
                    let result = result.map(|up_to| (up_to, rejected_in(&*store, item)));
                    let _ = reply.send(result.map_err(|e| match e {
                        StoreError::Invalid(m) => (ErrorCode::Protocol, m),
                        StoreError::Resend(m) => (ErrorCode::Resend, m),
                        other => (ErrorCode::Internal, other.to_string()),
                    }));
                }
                if store.poisoned() {
                    // As PostgreSQL since 2018: after a failed fsync the pages the
                    // kernel dropped cannot be told from the ones it kept. Restart
                    // from what is on disk; agents resend what was not acked.
                    error!("ALARM: a store sync failed; exiting so the exchange restarts from what is on disk");
                    std::thread::sleep(Duration::from_millis(300));
                    std::process::exit(EXIT_STORE_FAILED);
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

/// Serves `cfg`, read from `path`: a reload (SIGHUP, `ferry-exchange reload`)
/// reads that file again.
pub async fn serve(cfg: ExchangeConfig, path: PathBuf, shutdown: CancellationToken) -> Result<()> {
    let mut cfg = cfg;
    std::fs::create_dir_all(&cfg.store.dir)
        .with_context(|| format!("creating the store directory {}", cfg.store.dir.display()))?;
    let store = tokio::task::block_in_place(|| crate::store::open(&cfg.store))?;
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
    // The same port over TCP, for agents whose network drops UDP (port 0 in
    // `listen` picks one for UDP; TCP takes the same number).
    let tcp_listen = SocketAddr::new(
        listen.ip(),
        endpoint.local_addr().map_or(listen.port(), |a| a.port()),
    );
    let tcp = tokio::net::TcpListener::bind(tcp_listen)
        .await
        .with_context(|| format!("listening on {tcp_listen} (TCP)"))?;
    let tcp_tls = Arc::new(std::sync::RwLock::new(tcp_config(&cfg)?));
    let stored = crate::metrics::StoredCounts::default();
    let (commits, committer) = spawn_committer(store.clone(), stored.clone());
    // What all connections together may make the exchange hold (see [limits]).
    let mut shared = Budget::shared(cfg.limits.max_queued_bytes);
    let admin = crate::admin::bind(&cfg.admin_socket())?;
    let live = Live::default();
    live.set_revoked(
        crate::trust::revoked(&cfg)?
            .into_iter()
            .map(|r| r.serial)
            .collect(),
    );
    let (reloads, mut reload_requests) = mpsc::channel(4);
    let (config_reloads, mut config_reload_requests) = mpsc::channel(4);
    reload_on_sighup(config_reloads.clone());
    // The configuration as the running exchange has it; a reload replaces it.
    let (current, config) = watch::channel(Arc::new(cfg.clone()));
    let mut running =
        crate::delivery::Deliveries::start(&cfg.deliveries, store.clone(), shutdown.clone());
    let deliveries = running.statuses();
    let retention = cfg.store.retain.map(|age| {
        crate::delivery::start_retention(
            age,
            running.sections(),
            deliveries.clone(),
            store.clone(),
            shutdown.clone(),
        )
    });
    let alarms = crate::alarms::Alarms::open(&cfg.store.dir);
    if let Some(url) = &cfg.dashboard.alarm_webhook {
        alarms.set_webhook(crate::webhook::Webhook::start(
            url,
            cfg.dashboard.alarm_webhook_ca.as_deref(),
            &cfg.exchange.public_address,
        )?);
    }
    let alarm_task = crate::alarms::start(
        alarms.clone(),
        store.clone(),
        live.fleet(),
        deliveries.clone(),
        config.clone(),
        shutdown.clone(),
    );
    let metrics_task = crate::metrics::start(
        cfg.metrics.listen.as_deref(),
        crate::metrics::Parts {
            store: store.clone(),
            fleet: live.fleet(),
            alarms: alarms.clone(),
            deliveries: deliveries.clone(),
            stored,
            connections: Box::new({
                let live = live.clone();
                move || live.count()
            }),
            config: config.clone(),
            store_dir: cfg.store.local_dir().map(Into::into),
        },
        shutdown.clone(),
    )
    .await?;
    let history = crate::history::History::open(&cfg.store.dir)
        .with_context(|| format!("opening the fleet history in {}", cfg.store.dir.display()))?;
    let history_task = crate::history::start(history.clone(), store.clone(), shutdown.clone());
    let dashboard_task = crate::dashboard::start(
        crate::dashboard::Parts {
            store: store.clone(),
            fleet: live.fleet(),
            history,
            alarms,
            cfg: config.clone(),
            reloads: reloads.clone(),
            deliveries: deliveries.clone(),
        },
        shutdown.clone(),
    )
    .await?;
    let admin_task = tokio::spawn(crate::admin::serve(
        admin,
        store.clone(),
        reloads,
        config_reloads,
        live.clone(),
        deliveries,
        shutdown.clone(),
    ));

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(listen = %endpoint.local_addr().unwrap_or(listen), store = %cfg.store.dir.display(), "exchange serving");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(answer) = reload_requests.recv() => {
                let r = reload_trust(&cfg, &endpoint, &tcp_tls, &live).map_err(|e| format!("{e:#}"));
                if let Err(e) = &r {
                    warn!(error = %e, "the revocation list could not be taken");
                }
                let _ = answer.send(r);
            }
            Some(answer) = config_reload_requests.recv() => {
                let r = match crate::config::load(&path).and_then(|next| {
                    check_tls(&next)?;
                    reloadable(&cfg, &next)?;
                    Ok(next)
                }) {
                    Err(e) => Err(format!("{e:#}")),
                    Ok(next) => {
                        // TLS files and revocations first: the one step that
                        // can still fail leaves everything else as it was.
                        match reload_trust(&next, &endpoint, &tcp_tls, &live) {
                            Err(e) => Err(format!("{e:#}")),
                            Ok(_) => {
                                let summary = config_changes(&cfg, &next);
                                if next.limits.max_queued_bytes != cfg.limits.max_queued_bytes {
                                    // Connections made from now on share the new bound.
                                    shared = Budget::shared(next.limits.max_queued_bytes);
                                }
                                running.apply(&next.deliveries).await;
                                cfg = next;
                                current.send_replace(Arc::new(cfg.clone()));
                                Ok(summary)
                            }
                        }
                    }
                };
                match &r {
                    Ok(changes) => info!(%changes, "configuration reloaded"),
                    Err(e) => error!("reload refused, the running configuration stays: {e}"),
                }
                let _ = answer.send(r);
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                if live.count() >= cfg.limits.max_connections {
                    warn!(%remote, max_connections = cfg.limits.max_connections, "refusing a connection: [limits] max_connections reached");
                    incoming.refuse();
                    continue;
                }
                let store = store.clone();
                let commits = commits.clone();
                let live = live.clone();
                let limits = ConnLimits {
                    budget: Budget::new(cfg.limits.max_connection_bytes, shared.clone()),
                    frame_timeout: cfg.limits.frame_timeout,
                };
                tokio::spawn(
                    async move {
                        let link = match incoming.await {
                            Ok(c) => Link::Quic(c),
                            Err(e) => {
                                info!(error = %format!("{:#}", anyhow::Error::new(e).context("TLS handshake refused")), "connection ended");
                                return;
                            }
                        };
                        if let Err(e) = connection(link, store, commits, live, limits).await {
                            info!(error = %format!("{e:#}"), "connection ended");
                        }
                    }
                    .instrument(info_span!("conn", %remote, transport = "quic")),
                );
            }
            accepted = tcp.accept() => {
                let (socket, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "cannot accept a TCP connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if live.count() >= cfg.limits.max_connections {
                    warn!(%remote, max_connections = cfg.limits.max_connections, "refusing a connection: [limits] max_connections reached");
                    drop(socket);
                    continue;
                }
                let tls = match tcp_tls.read() {
                    Ok(t) => t.clone(),
                    Err(_) => continue,
                };
                let store = store.clone();
                let commits = commits.clone();
                let live = live.clone();
                let limits = ConnLimits {
                    budget: Budget::new(cfg.limits.max_connection_bytes, shared.clone()),
                    frame_timeout: cfg.limits.frame_timeout,
                };
                // QUIC handshakes in progress end with the endpoint; a TCP one
                // would hold the committer's queue past shutdown.
                let stop = shutdown.clone();
                tokio::spawn(
                    stop.run_until_cancelled_owned(async move {
                        let link = match tokio::time::timeout(
                            HANDSHAKE_TIMEOUT,
                            ferry_transport::link::accept_tcp(socket, remote, &tls),
                        )
                        .await
                        {
                            Ok(Ok(l)) => l,
                            Ok(Err(e)) => {
                                info!(error = %format!("{e:#}"), "connection ended");
                                return;
                            }
                            Err(_) => {
                                info!("connection ended: no TLS handshake within 15s");
                                return;
                            }
                        };
                        if let Err(e) = connection(link, store, commits, live, limits).await {
                            info!(error = %format!("{e:#}"), "connection ended");
                        }
                    })
                    .instrument(info_span!("conn", %remote, transport = "tcp")),
                );
            }
        }
    }
    info!("shutting down");
    // The endpoint closes the QUIC connections; TCP links only this closes, and
    // their handlers hold the committer's queue open until they end.
    live.close_all(b"exchange shutting down");
    endpoint.close(0u32.into(), b"exchange shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    drop(commits);
    let _ = admin_task.await;
    let _ = alarm_task.await;
    let _ = history_task.await;
    for t in dashboard_task.into_iter().chain(metrics_task) {
        let _ = t.await;
    }
    running.stopped().await;
    if let Some(t) = retention {
        let _ = t.await;
    }
    let _ = tokio::task::spawn_blocking(move || committer.join()).await;
    tokio::task::spawn_blocking(move || store.sync()).await??;
    let _ = std::fs::remove_file(cfg.admin_socket());
    Ok(())
}

/// Whether the TLS files (CA, certificate, key, revocation list) load, as
/// `serve` loads them (`check-config`).
pub fn check_tls(cfg: &ExchangeConfig) -> Result<()> {
    quic_config(cfg)?;
    tcp_config(cfg)?;
    Ok(())
}

/// The endpoint's TLS setup, with the revocation list if there is one.
fn quic_config(cfg: &ExchangeConfig) -> Result<quinn::ServerConfig> {
    let crl = crate::trust::crl_path(cfg);
    server_config_limited(
        &TlsFiles {
            ca: &cfg.tls.ca,
            cert: &cfg.tls.cert,
            key: &cfg.tls.key,
        },
        crl.as_deref(),
        cfg.limits.max_streams_per_connection,
    )
}

/// The TCP listener's TLS setup: [`quic_config`]'s certificates, client
/// verification and revocation list.
fn tcp_config(cfg: &ExchangeConfig) -> Result<TcpServerConfig> {
    let crl = crate::trust::crl_path(cfg);
    tcp_server_config(
        &TlsFiles {
            ca: &cfg.tls.ca,
            cert: &cfg.tls.cert,
            key: &cfg.tls.key,
        },
        crl.as_deref(),
        cfg.limits.max_streams_per_connection,
    )
}

/// An open agent connection: certificate serial, agent id, the connection.
type LiveConn = (String, String, Link);

/// Open agent connections by certificate serial and agent id, so a revocation or
/// an operator's decision can end them, and a new connection of an agent replaces
/// its older one.
#[derive(Clone, Default)]
pub(crate) struct Live(
    Arc<std::sync::Mutex<std::collections::HashMap<usize, LiveConn>>>,
    Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
    Arc<crate::fleet::Fleet>,
);

/// Connections one agent may have open at once: after `Hello` a new one replaces
/// the older ones, so this only bounds handshakes that never get that far.
const MAX_PER_AGENT: usize = 4;

/// What one connection may make the exchange hold.
struct ConnLimits {
    budget: Budget,
    frame_timeout: Duration,
}

impl Live {
    /// Who is connected, since when, over what (for the dashboard and alarms).
    pub(crate) fn fleet(&self) -> Arc<crate::fleet::Fleet> {
        self.2.clone()
    }

    fn count(&self) -> usize {
        self.0.lock().map_or(0, |m| m.len())
    }

    /// The revoked certificate serials, as of the last reload.
    fn set_revoked(&self, serials: std::collections::HashSet<String>) {
        if let Ok(mut r) = self.1.write() {
            *r = serials;
        }
    }

    fn is_revoked(&self, serial: &str) -> bool {
        self.1.read().is_ok_and(|r| r.contains(serial))
    }

    /// Registers a connection; `None` when its agent already has
    /// [`MAX_PER_AGENT`] open (handshakes that never send `Hello` included).
    fn add(&self, serial: &str, agent: &str, conn: &Link) -> Option<LiveGuard> {
        let mut m = self.0.lock().ok()?;
        if m.values().filter(|(_, a, _)| a == agent).count() >= MAX_PER_AGENT {
            return None;
        }
        m.insert(
            conn.stable_id(),
            (serial.to_string(), agent.to_string(), conn.clone()),
        );
        self.2
            .connected(agent, conn.transport(), &conn.remote_address().to_string());
        Some(LiveGuard {
            live: self.clone(),
            id: conn.stable_id(),
            agent: agent.to_string(),
        })
    }

    /// The open connections of `agent` other than `this`.
    fn others(&self, agent: &str, this: usize) -> Vec<Link> {
        self.0.lock().map_or_else(
            |_| Vec::new(),
            |m| {
                m.iter()
                    .filter(|(id, (_, a, _))| a == agent && **id != this)
                    .map(|(_, (_, _, c))| c.clone())
                    .collect()
            },
        )
    }

    /// Closes every open connection.
    fn close_all(&self, reason: &[u8]) {
        if let Ok(m) = self.0.lock() {
            for (_, _, conn) in m.values() {
                conn.close(0, reason);
            }
        }
    }

    /// Closes the connections of `agent` other than `keep`; returns how many.
    pub(crate) fn close_agent(&self, agent: &str, keep: Option<usize>, reason: &[u8]) -> usize {
        let mut closed = 0;
        if let Ok(m) = self.0.lock() {
            for (id, (_, a, conn)) in m.iter() {
                if a == agent && Some(*id) != keep {
                    conn.close(ErrorCode::Held as u32, reason);
                    closed += 1;
                }
            }
        }
        closed
    }
}

struct LiveGuard {
    live: Live,
    id: usize,
    agent: String,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.live.0.lock() {
            m.remove(&self.id);
        }
        self.live.2.disconnected(&self.agent);
    }
}

/// SIGHUP reads the configuration again, as `ferry-exchange reload` does; the
/// outcome is in the log.
fn reload_on_sighup(reloads: crate::admin::ConfigReloads) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP: reload with `ferry-exchange reload`");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let (tx, rx) = oneshot::channel();
            if reloads.send(tx).await.is_err() {
                return;
            }
            let _ = rx.await;
        }
    });
}

/// Refuses a reload that changes what is bound for the process's life.
fn reloadable(old: &ExchangeConfig, new: &ExchangeConfig) -> Result<()> {
    let fixed = [
        (
            "[exchange] listen",
            old.exchange.listen != new.exchange.listen,
        ),
        (
            "[store]",
            format!("{:?}", old.store) != format!("{:?}", new.store),
        ),
        (
            "[dashboard] listen, cert or key",
            (
                &old.dashboard.listen,
                &old.dashboard.cert,
                &old.dashboard.key,
            ) != (
                &new.dashboard.listen,
                &new.dashboard.cert,
                &new.dashboard.key,
            ),
        ),
        (
            "[dashboard] alarm_webhook or alarm_webhook_ca",
            (
                &old.dashboard.alarm_webhook,
                &old.dashboard.alarm_webhook_ca,
            ) != (
                &new.dashboard.alarm_webhook,
                &new.dashboard.alarm_webhook_ca,
            ),
        ),
        ("[metrics] listen", old.metrics.listen != new.metrics.listen),
    ];
    let changed: Vec<&str> = fixed.iter().filter(|f| f.1).map(|f| f.0).collect();
    if !changed.is_empty() {
        anyhow::bail!(
            "{} changed: it is bound while the exchange runs; restart the exchange (systemctl restart ferry-exchange) to change it",
            changed.join(", ")
        );
    }
    Ok(())
}

/// What a reload changes, for the log and the `reload` command.
fn config_changes(old: &ExchangeConfig, new: &ExchangeConfig) -> String {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut parts = Vec::new();
    for (what, changed) in [
        ("[exchange]", differs(&old.exchange, &new.exchange)),
        ("[tls]", differs(&old.tls, &new.tls)),
        ("[limits]", differs(&old.limits, &new.limits)),
        ("[dashboard]", differs(&old.dashboard, &new.dashboard)),
    ] {
        if changed {
            parts.push(format!("{what} changed"));
        }
    }
    let by_name = |c: &ExchangeConfig| -> Vec<(String, String)> {
        c.deliveries
            .iter()
            .map(|d| (d.name.clone(), format!("{d:?}")))
            .collect()
    };
    parts.extend(ferry_protocol::reload::named_changes(
        "delivery ",
        by_name(old),
        by_name(new),
    ));
    if parts.is_empty() {
        "nothing changed (TLS files and revocations read again)".to_string()
    } else {
        parts.join("; ")
    }
}

/// Takes the revocation list anew for new handshakes and closes the open
/// connections of revoked certificates; returns how many it closed.
fn reload_trust(
    cfg: &ExchangeConfig,
    endpoint: &quinn::Endpoint,
    tcp_tls: &std::sync::RwLock<TcpServerConfig>,
    live: &Live,
) -> Result<usize> {
    let revoked: std::collections::HashSet<String> = crate::trust::revoked(cfg)?
        .into_iter()
        .map(|r| r.serial)
        .collect();
    // The set first, then the endpoint, then the sweep: a handshake that began
    // under the old list and registers after the sweep still finds its serial
    // here (`Live::add`), so no revoked connection survives.
    live.set_revoked(revoked.clone());
    endpoint.set_server_config(Some(quic_config(cfg)?));
    let tcp = tcp_config(cfg)?;
    if let Ok(mut t) = tcp_tls.write() {
        *t = tcp;
    }
    let mut closed = 0;
    if let Ok(m) = live.0.lock() {
        for (serial, _, conn) in m.values() {
            if revoked.contains(serial) {
                conn.close(
                    ErrorCode::Forbidden as u32,
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

/// One agent connection, over either transport, from its verified TLS session
/// to its end.
async fn connection(
    conn: Link,
    store: SharedStore,
    commits: mpsc::Sender<StoreRequest>,
    live: Live,
    limits: ConnLimits,
) -> Result<()> {
    let remote = conn.remote_address();
    let id = conn.peer_identity()?;
    let Some(_live) = live.add(&id.serial, &id.agent_id, &conn) else {
        conn.close(
            ErrorCode::TooLarge as u32,
            b"too many connections of this agent",
        );
        return Err(anyhow!(
            "agent {} already has {MAX_PER_AGENT} connections open; refused",
            id.agent_id
        ));
    };
    // A handshake that began before a revocation was taken.
    if live.is_revoked(&id.serial) {
        conn.close(
            ErrorCode::Forbidden as u32,
            ferry_transport::tls::REVOKED_REASON,
        );
        return Err(anyhow!("certificate {} is revoked", id.serial));
    }
    if !valid_stream_name(&id.agent_id) {
        conn.close(2, b"agent id not acceptable");
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
            Some(Msg::Probe(_)) => {
                // `ferry-agent doctor`: the clock and version, no session.
                let reply = ProbeReply {
                    unix_ms: now_unix_ms(),
                    software: env!("CARGO_PKG_VERSION").to_string(),
                };
                control.send(Msg::ProbeReply(reply)).await?;
                control.finish().await;
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.closed()).await;
                debug!("answered a doctor's probe");
                return Ok(());
            }
            _ => {
                control.send(wire_error(ErrorCode::Protocol, "expected Hello", "")).await?;
                conn.close(1, b"expected Hello");
                return Err(anyhow!("first frame was not Hello"));
            }
        };
        let mut session = ExchangeSession::new(PeerIdentity {
            agent_id: id.agent_id.clone(),
            department: id.department.clone(),
        });
        // Plans only for a Hello that passes the session's checks (identity,
        // sharing): a refused agent must not leave holds or incarnations behind.
        let plans = match session.check_hello(&hello) {
            Ok(()) => {
                let twin = twin_of(&live, &id.agent_id, conn.stable_id(), remote).await;
                let mut plans = std::collections::BTreeMap::new();
                for s in &hello.streams {
                    let store = store.clone();
                    let agent = id.agent_id.clone();
                    let decl = s.clone();
                    let twin = twin.clone();
                    let plan = tokio::task::spawn_blocking(move || {
                        if let Some(why) = twin {
                            store.hold(&agent, &decl, &why)?;
                        }
                        store.plan_stream(&agent, &decl)
                    })
                    .await??;
                    plans.insert(s.name.clone(), plan);
                }
                plans
            }
            Err(_) => Default::default(),
        };
        let welcome = match session.handle_hello(&hello, |d| plans.get(&d.name).cloned().unwrap_or_default(), MAX_FRAME as u32) {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "refusing agent");
                control.send(wire_error(e.code(), e.to_string(), "")).await?;
                control.finish().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                conn.close(close_code(&e), e.to_string().as_bytes());
                return Err(e.into());
            }
        };
        let mut record = {
            let store = store.clone();
            let agent = id.agent_id.clone();
            tokio::task::spawn_blocking(move || store.agent(&agent)).await??.unwrap_or_default()
        };
        record.agent_id = id.agent_id.clone();
        record.department = id.department.clone();
        record.cert_serial = id.serial.clone();
        record.last_seen_unix_ms = now_unix_ms();
        record.remote = remote.to_string();
        record.transport = conn.transport().to_string();
        record.software = hello.software.clone();
        record.config_digest = hello.config_digest.clone();
        record.streams = hello.streams.iter().map(|s| s.name.clone()).collect();
        put_agent(&store, &record).await?;
        for s in &welcome.streams {
            if !s.held.is_empty() {
                warn!(stream = %s.name, reason = %s.held, "stream held");
            }
        }
        control.send(Msg::Welcome(welcome)).await?;
        // A restarted agent must not wait for its dead connection's idle timeout,
        // and two processes of one identity must not ship side by side.
        let replaced = live.close_agent(&id.agent_id, Some(conn.stable_id()), b"replaced by a newer connection of this agent");
        if replaced > 0 {
            info!(replaced, "closed this agent's older connections");
        }
        info!(streams = hello.streams.len(), transport = conn.transport(), "agent connected");

        let session = Arc::new(session);
        let limits = Arc::new(limits);
        loop {
            tokio::select! {
                bi = conn.accept_bi() => {
                    let (send, recv) = bi?;
                    let session = session.clone();
                    let commits = commits.clone();
                    let conn = conn.clone();
                    let limits = limits.clone();
                    tokio::spawn(async move {
                        if let Err(e) = data_stream(send, recv, session, commits, &conn, &limits).await {
                            debug!(error = %format!("{e:#}"), "data stream ended");
                        }
                    }.in_current_span());
                }
                frame = control_in.next() => match frame {
                    Ok(Some(Msg::Status(status))) => {
                        record.last_seen_unix_ms = now_unix_ms();
                        let heartbeat = crate::store::Heartbeat::from_status(&status, record.last_seen_unix_ms);
                        record.status = Some(heartbeat);
                        put_agent(&store, &record).await?;
                    }
                    Ok(Some(_)) => {
                        conn.close(1, b"unexpected frame on the control stream");
                        return Err(anyhow!("unexpected frame on the control stream"));
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let _ = control.send(wire_error(ErrorCode::Protocol, format!("{e:#}"), "")).await;
                        conn.close(1, b"malformed frame");
                        return Err(e);
                    }
                },
            }
        }
    }
    .instrument(span)
    .await
}

/// Updates the registry off the async threads.
async fn put_agent(store: &SharedStore, record: &crate::store::AgentRecord) -> Result<()> {
    let store = store.clone();
    let record = record.clone();
    tokio::task::spawn_blocking(move || store.put_agent(&record)).await??;
    Ok(())
}

/// The files of a stored (or duplicate) batch that failed their SHA-256 at the
/// exchange: a resend of the batch is told again, so the agent learns it even if
/// it lost the first ack.
fn rejected_in(store: &dyn Backend, item: &Incoming) -> Vec<String> {
    let Item::Batch(b) = &item.item else {
        return Vec::new();
    };
    let last = b.first_seq + u64::from(b.record_count) - 1;
    store
        .rejected_files(&item.agent, &b.stream, b.first_seq, last)
        .unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the files that failed their SHA-256");
            Vec::new()
        })
}

/// The longest an older connection of an agent is watched for an answer to the
/// probe when a new one says `Hello`.
const TWIN_PROBE: Duration = Duration::from_secs(2);

/// Whether another process is live under `agent`'s identity (a cloned server, a
/// copied certificate): an older connection of the agent still answers while the
/// new one says `Hello`. Each older connection is sent an ack-eliciting packet (a
/// stream opened and finished at once; agents never accept streams, their QUIC
/// stack acknowledges it within its ack delay, their yamux resets it); a live
/// peer's answer arrives within a few round trips. A restarted agent's old connection is silent
/// (its process is gone), so the restart costs at most [`TWIN_PROBE`] and holds
/// nothing. Returns the reason to hold the agent's streams.
async fn twin_of(
    live: &Live,
    agent: &str,
    this: usize,
    remote: std::net::SocketAddr,
) -> Option<String> {
    let others = live.others(agent, this);
    if others.is_empty() {
        return None;
    }
    let before: Vec<u64> = others.iter().map(Link::received).collect();
    let mut wait = Duration::from_millis(250);
    for c in &others {
        c.probe(Duration::from_millis(200)).await;
        wait = wait.max(c.rtt() * 4 + Duration::from_millis(250));
    }
    tokio::time::sleep(wait.min(TWIN_PROBE)).await;
    for (c, b) in others.iter().zip(before) {
        if c.close_reason().is_none() && c.received() > b {
            let reason = format!(
                "two processes ship as agent {agent} at once (connections from {} and {remote}): a cloned server or a copied certificate; their seqs would collide",
                c.remote_address()
            );
            error!(agent, %reason, "ALARM: holding the agent's streams");
            return Some(reason);
        }
    }
    None
}

fn close_code(e: &SessionError) -> u32 {
    e.code() as u32
}

/// One data stream: batches in, acks out, pipelined so a window of batches is in
/// the store's queue at once.
async fn data_stream(
    send: SendHalf,
    recv: RecvHalf,
    session: Arc<ExchangeSession>,
    commits: mpsc::Sender<StoreRequest>,
    conn: &Link,
    limits: &ConnLimits,
) -> Result<()> {
    // The grant of the frame's bytes is held until its ack is out.
    type Pending = (String, oneshot::Receiver<Answer>, Option<Grant>);
    // Batches and losses of this stream not yet acknowledged: the agent may have
    // at most the window Welcome gave. Counted down before each ack is sent, so
    // the count here is never below what the agent believes is in flight.
    let outstanding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let outstanding_acks = outstanding.clone();
    let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(256);
    let mut writer = FrameWriter::new(send);
    let acks_conn = conn.clone();
    let ack_session = session.clone();
    let acks = tokio::spawn(async move {
        while let Some((stream, rx, grant)) = pending_rx.recv().await {
            let result = rx.await;
            outstanding_acks.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            drop(grant);
            match result {
                Ok(Ok((up_to, rejected_files))) => {
                    let up_to_seq = ack_session.agent_seq(&stream, up_to);
                    if writer
                        .send(Msg::Ack(Ack {
                            stream,
                            up_to_seq,
                            rejected_files,
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
                    writer.finish().await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    acks_conn.close(code as u32, b"batch not stored");
                    return;
                }
                Err(_) => return,
            }
        }
    });
    let mut reader = FrameReader::new(recv, MAX_FRAME);
    let result = loop {
        // Seqs are translated to the exchange's numbering here (they differ only
        // after an operator accepted a new buffer as a continuation).
        let (frame, grant) = match reader
            .next_within(&limits.budget, limits.frame_timeout)
            .await
        {
            Ok(Some((m, g))) => (Ok(Some(m)), Some(g)),
            Ok(None) => (Ok(None), None),
            Err(e) => (Err(e), None),
        };
        let item = match frame {
            Ok(Some(Msg::Batch(mut b))) => {
                if let Err(e) = session.handle_batch(&b) {
                    warn!(stream = %b.stream, error = %e, "batch refused");
                    break Err((e.code(), e.to_string(), b.stream));
                }
                b.first_seq = session.store_seq(&b.stream, b.first_seq);
                Item::Batch(b)
            }
            Ok(Some(Msg::Lost(mut l))) => {
                if let Err(e) = session.handle_lost(&l) {
                    warn!(stream = %l.stream, error = %e, "loss declaration refused");
                    break Err((e.code(), e.to_string(), l.stream));
                }
                l.from_seq = session.store_seq(&l.stream, l.from_seq);
                l.to_seq = session.store_seq(&l.stream, l.to_seq);
                Item::Lost(l)
            }
            Ok(Some(_)) => {
                break Err((
                    ErrorCode::Protocol,
                    "only Batch and Lost frames belong on a data stream".to_string(),
                    String::new(),
                ))
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err((ErrorCode::Protocol, format!("{e:#}"), String::new())),
        };
        let (reply, rx) = oneshot::channel();
        let incoming = Incoming {
            agent: session.peer().agent_id.clone(),
            item,
        };
        let stream = incoming.stream().to_string();
        let in_flight = outstanding.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if in_flight > DEFAULT_WINDOW as usize {
            break Err((
                ErrorCode::TooLarge,
                format!(
                    "more than the window of {DEFAULT_WINDOW} unacknowledged batches on stream {stream}"
                ),
                stream,
            ));
        }
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
        if pending_tx.send((stream, rx, grant)).await.is_err() {
            break Ok(());
        }
    };
    if let Err((code, message, stream)) = result {
        // Report through the ack writer so the error follows the acks already due.
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err((code, message.clone())));
        outstanding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = pending_tx.send((stream, rx, None)).await;
        drop(pending_tx);
        let _ = acks.await;
        return Err(anyhow!(message));
    }
    drop(pending_tx);
    let _ = acks.await;
    Ok(())
}
