//! `ferry-agent run`: wires sources → committer → buffer → shipper, serves the
//! admin socket, talks to systemd, and shuts down in order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_protocol::messages::{Hello, StreamDecl};
use ferry_transport::tls::{client_config, tcp_client_config, TlsFiles};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use ferry_adapters::CommitRequest;

use crate::buffer::Buffer;
use crate::committer::{Committer, Limits, Slots};
use crate::config::Loaded;
use crate::shipper::Shipper;
use crate::sources::StreamSource;
use crate::status::{AgentStatus, Board, BufferStatus, StreamView};
use crate::{admin, metrics, status};

/// Bounded hand-over from sources to the committer: small, so a full buffer stops
/// sources almost at once.
const COMMIT_QUEUE: usize = 64;

/// A request to re-read the configuration (`ferry-agent reload`, SIGHUP); the
/// answer says what happened, or why the new file was refused.
pub struct Reload {
    pub reply: Option<oneshot::Sender<Result<String, String>>>,
}

pub async fn run(
    path: PathBuf,
    loaded: Loaded,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<Reload>,
    reload_tx: mpsc::Sender<Reload>,
) -> Result<()> {
    let cfg = &loaded.config;
    let data_dir = cfg.agent.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data_dir {}", data_dir.display()))?;
    let admin_path = cfg.admin_socket();
    let listener = admin::bind(&admin_path)?;
    let metrics_addr = cfg.metrics_listen();
    let metrics_listener = match metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let buffer_dir = cfg.buffer_dir();
    let cache = cfg.buffer.cache_size.0;
    let buffer =
        Arc::new(tokio::task::spawn_blocking(move || Buffer::open(&buffer_dir, cache)).await??);

    // The admin socket and the metrics endpoint outlive reloads: they answer
    // with the running generation's report.
    let current: Arc<RwLock<Option<admin::Reporter>>> = Arc::new(RwLock::new(None));
    let reporter: admin::Reporter = {
        let current = current.clone();
        Arc::new(move || {
            current
                .read()
                .ok()
                .and_then(|r| r.clone())
                .map(|r| r())
                .unwrap_or_default()
        })
    };
    let metrics_task = metrics_listener
        .map(|l| tokio::spawn(metrics::serve(l, reporter.clone(), shutdown.clone())));
    let admin_task = tokio::spawn(admin::serve(
        listener,
        reporter,
        reload_tx,
        shutdown.clone(),
    ));

    let started = status::now_unix();
    // Streams removed by a reload keep shipping what they buffered, declared
    // as they were.
    let mut declared: BTreeMap<String, StreamDecl> = BTreeMap::new();
    let mut prepared = Prepared::new(loaded, &mut declared)?;
    let mut spine = Spine::start(&buffer, &prepared.loaded);
    let mut shipping = spine.ship(&prepared, &declared, shutdown.child_token(), started);
    let mut first = true;
    loop {
        // Streams new to this configuration, changed by it, or stopped by a
        // fatal error start (again) from their durable positions; the others
        // keep running untouched.
        spine.start_sources(&prepared.loaded, &shutdown);
        if let Ok(mut c) = current.write() {
            *c = Some(shipping.reporter.clone());
        }
        if first {
            notify_systemd(&[sd_notify::NotifyState::Ready]);
            spawn_watchdog(shutdown.clone());
            first = false;
        }
        info!(
            agent = %prepared.loaded.config.agent.id,
            streams = prepared.loaded.config.streams.len(),
            data_dir = %data_dir.display(),
            "agent running"
        );
        // Until shutdown, or a reload with a valid configuration.
        let next = loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => break None,
                r = reloads.recv() => match r {
                    Some(r) => r,
                    None => break None,
                },
            };
            match reread(&path, &prepared.loaded, &data_dir, metrics_addr)
                .and_then(|l| Prepared::new(l, &mut declared))
            {
                Ok(next) => break Some((next, request)),
                Err(e) => {
                    error!("reload refused, the running configuration stays: {e:#}");
                    if let Some(reply) = request.reply {
                        let _ = reply.send(Err(format!("{e:#}")));
                    }
                }
            }
        };
        let Some((next, request)) = next else {
            notify_systemd(&[sd_notify::NotifyState::Stopping]);
            info!("shutting down");
            spine.stop(shipping).await;
            break;
        };
        notify_systemd(&[sd_notify::NotifyState::Reloading]);
        let summary = changes(&prepared.loaded, &next.loaded);
        info!(changes = %summary, "reloading the configuration: removed and changed streams stop after their commits in flight settle; changed ones start again from their durable positions");
        spine.stop_sources(&next.loaded).await;
        spine.limits.set(
            next.loaded.config.buffer.max_size.0,
            next.loaded.config.buffer.min_free.0,
        );
        // The exchange learns the new declarations (and the new digest), and
        // sees renewed TLS files, at the shipper's next connection: what was
        // in flight is sent again and acknowledged as duplicates.
        if next.loaded.digest != prepared.loaded.digest || next.tls_bytes != prepared.tls_bytes {
            shipping.stop().await;
            shipping = spine.ship(&next, &declared, shutdown.child_token(), started);
        }
        prepared = next;
        notify_systemd(&[sd_notify::NotifyState::Ready]);
        info!(changes = %summary, "configuration reloaded");
        if let Some(reply) = request.reply {
            let _ = reply.send(Ok(summary));
        }
    }
    let _ = admin_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&admin_path);
    tokio::task::spawn_blocking(move || buffer.close()).await??;
    info!("stopped");
    Ok(())
}

/// Reads the configuration again for a reload, holding it to what a running
/// agent can change: its data directory (buffer, admin socket) and metrics
/// address are bound for the process's life.
fn reread(
    path: &Path,
    old: &Loaded,
    data_dir: &Path,
    metrics: Option<std::net::SocketAddr>,
) -> Result<Loaded> {
    let new = crate::config::load(path, crate::config::Host::Required)?;
    let c = &new.config;
    if c.agent.data_dir != data_dir {
        anyhow::bail!(
            "agent.data_dir changed ({} to {}): the buffer cannot move while the agent runs; restart it instead",
            data_dir.display(),
            c.agent.data_dir.display()
        );
    }
    if c.metrics_listen() != metrics {
        anyhow::bail!("metrics.listen changed: restart the agent to move the metrics endpoint");
    }
    if c.buffer.cache_size.0 != old.config.buffer.cache_size.0 {
        anyhow::bail!("buffer.cache_size changed: restart the agent to resize the buffer's cache");
    }
    Ok(new)
}

/// What a reload changes, for the log and the `reload` command.
fn changes(old: &Loaded, new: &Loaded) -> String {
    let by_name = |l: &Loaded| -> Vec<(String, String)> {
        l.config
            .streams
            .iter()
            .map(|s| (s.name().to_string(), format!("{s:?}")))
            .collect()
    };
    let parts = ferry_protocol::reload::named_changes("", by_name(old), by_name(new));
    if old.digest == new.digest {
        "the file is unchanged".to_string()
    } else if parts.is_empty() {
        "streams unchanged (other settings changed)".to_string()
    } else {
        parts.join("; ")
    }
}

/// A configuration, with everything that can fail checked before anything
/// running is stopped.
struct Prepared {
    loaded: Loaded,
    /// The configured streams' declarations.
    decls: Vec<StreamDecl>,
    /// The CA, certificate and key as read (a renewed certificate in place
    /// reconnects the shipper with it, though the file is unchanged).
    tls_bytes: Vec<Vec<u8>>,
    client: quinn::ClientConfig,
    tcp: ferry_transport::link::TcpClientConfig,
    schedule: crate::bandwidth::Schedule,
}

impl Prepared {
    fn new(loaded: Loaded, declared: &mut BTreeMap<String, StreamDecl>) -> Result<Prepared> {
        let cfg = &loaded.config;
        let tls_files = TlsFiles {
            ca: &cfg.exchange.ca,
            cert: &cfg.exchange.cert,
            key: &cfg.exchange.key,
        };
        let client = client_config(&tls_files)?;
        let tcp = tcp_client_config(&tls_files)?;
        let tls_bytes = [tls_files.ca, tls_files.cert, tls_files.key]
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_default())
            .collect();
        let schedule = cfg
            .bandwidth
            .schedule(crate::bandwidth::local_offset_secs())
            .map_err(|(_, e)| anyhow::anyhow!(e))?;
        let decls: Vec<StreamDecl> = cfg
            .streams
            .iter()
            .map(|s| StreamDecl {
                name: s.name().to_string(),
                catalog_id: s.catalog_id.clone(),
                sharing: s.sharing() as i32,
                kind: s.source().kind().to_string(),
                // Filled per connection by the shipper, from the buffer.
                ..Default::default()
            })
            .collect();
        for d in &decls {
            declared.insert(d.name.clone(), d.clone());
        }
        Ok(Prepared {
            loaded,
            decls,
            tls_bytes,
            client,
            tcp,
            schedule,
        })
    }
}

/// One stream's running source.
struct RunningSource {
    /// Its configuration, to tell a changed stream on reload.
    config: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// What lives as long as the process, across reloads: the committer (the
/// buffer's one writer), the stream indices sources commit under, the
/// acknowledgement watermarks sources wait on, the board, and the sources
/// themselves.
struct Spine {
    buffer: Arc<Buffer>,
    slots: Arc<Slots>,
    limits: Arc<Limits>,
    board: Arc<Board>,
    durable: Arc<Notify>,
    space: Arc<Notify>,
    /// Per stream: the acked watermark (the shipper sends, sources watch).
    acked: BTreeMap<String, watch::Sender<u64>>,
    commits: mpsc::Sender<CommitRequest>,
    committer: tokio::task::JoinHandle<()>,
    sources: BTreeMap<String, RunningSource>,
}

impl Spine {
    fn start(buffer: &Arc<Buffer>, loaded: &Loaded) -> Spine {
        let cfg = &loaded.config;
        let slots = Arc::new(Slots::default());
        let limits = Arc::new(Limits::new(cfg.buffer.max_size.0, cfg.buffer.min_free.0));
        let board = Arc::new(Board::default());
        let durable = Arc::new(Notify::new());
        let space = Arc::new(Notify::new());
        let (commits, rx) = mpsc::channel(COMMIT_QUEUE);
        let committer = tokio::spawn(
            Committer {
                buffer: buffer.clone(),
                names: slots.clone(),
                limits: limits.clone(),
                rx,
                durable: durable.clone(),
                space: space.clone(),
                board: board.clone(),
            }
            .run(),
        );
        Spine {
            buffer: buffer.clone(),
            slots,
            limits,
            board,
            durable,
            space,
            acked: BTreeMap::new(),
            commits,
            committer,
            sources: BTreeMap::new(),
        }
    }

    fn acked(&mut self, name: &str) -> watch::Sender<u64> {
        let buffer = &self.buffer;
        self.acked
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(buffer.state(name).acked).0)
            .clone()
    }

    /// Stops the sources of streams that `next` removes or changes, and those
    /// a fatal error stopped; each waits for its commits in flight to settle.
    async fn stop_sources(&mut self, next: &Loaded) {
        let keep: BTreeMap<&str, String> = next
            .config
            .streams
            .iter()
            .map(|s| (s.name(), format!("{:?}", s.source())))
            .collect();
        let stopping: Vec<String> = self
            .sources
            .iter()
            .filter(|(name, r)| keep.get(name.as_str()) != Some(&r.config) || r.task.is_finished())
            .map(|(name, _)| name.clone())
            .collect();
        for name in stopping {
            if let Some(r) = self.sources.remove(&name) {
                r.shutdown.cancel();
                let _ = r.task.await;
                self.board.set_source_error(&name, None);
            }
        }
    }

    /// Starts a source for every configured stream that has none running.
    fn start_sources(&mut self, loaded: &Loaded, shutdown: &CancellationToken) {
        let data_dir = &loaded.config.agent.data_dir;
        for s in &loaded.config.streams {
            let name = s.name();
            if self.sources.contains_key(name) {
                continue;
            }
            let token = shutdown.child_token();
            let task = StreamSource {
                index: self.slots.index(name),
                name: name.to_string(),
                config: s.source().clone(),
                buffer: self.buffer.clone(),
                board: self.board.clone(),
                acked: self.acked(name).subscribe(),
                commits: self.commits.clone(),
                shutdown: token.clone(),
                spool_dir: data_dir.join("spool"),
            }
            .spawn();
            self.sources.insert(
                name.to_string(),
                RunningSource {
                    config: format!("{:?}", s.source()),
                    shutdown: token,
                    task,
                },
            );
        }
    }

    /// Starts a shipper for the configured streams, and for streams a reload
    /// removed that still hold unacknowledged batches (no source; it sends
    /// what they hold); returns it with the report it answers `status` from.
    fn ship(
        &mut self,
        prepared: &Prepared,
        declared: &BTreeMap<String, StreamDecl>,
        shutdown: CancellationToken,
        started: u64,
    ) -> Shipping {
        let cfg = &prepared.loaded.config;
        let mut decls = prepared.decls.clone();
        for (name, st) in self.buffer.states() {
            if decls.iter().any(|d| d.name == name) || st.head <= st.acked {
                continue;
            }
            match declared.get(&name) {
                Some(d) => {
                    warn!(stream = %name, unacknowledged = st.head - st.acked,
                        "stream removed from the configuration: it ships what it buffered, then stays idle");
                    decls.push(d.clone());
                }
                None => warn!(stream = %name, unacknowledged = st.head - st.acked,
                    "the buffer holds unacknowledged batches of a stream the configuration does not declare: \
                     they wait until the stream is configured again"),
            }
        }
        let names: Vec<String> = decls.iter().map(|d| d.name.clone()).collect();
        let acked = names.iter().map(|n| self.acked(n)).collect();
        let hello = Hello {
            version: ferry_protocol::PROTOCOL_VERSION,
            agent_id: cfg.agent.id.clone(),
            department: cfg.agent.department.clone(),
            config_digest: prepared.loaded.digest.clone(),
            streams: decls.clone(),
            software: env!("CARGO_PKG_VERSION").to_string(),
        };
        let cert_not_after_unix = ferry_transport::tls::identity_in_file(&cfg.exchange.cert)
            .map_or(0, |id| id.not_after_unix.max(0) as u64);
        if let Some(alarm) = status::cert_alarm(cert_not_after_unix, status::now_unix()) {
            warn!("{alarm}");
        }
        let report = Arc::new(std::sync::OnceLock::new());
        let throttle = Arc::new(crate::bandwidth::Throttle::new(prepared.schedule.clone()));
        let task = tokio::spawn(
            Shipper {
                address: cfg.exchange.address.clone(),
                server_name: cfg.server_name(),
                client: prepared.client.clone(),
                tcp: prepared.tcp.clone(),
                hello,
                buffer: self.buffer.clone(),
                names,
                acked,
                durable: self.durable.clone(),
                space: self.space.clone(),
                board: self.board.clone(),
                cert_not_after_unix,
                report: report.clone(),
                throttle: throttle.clone(),
            }
            .run(shutdown.clone())
            .instrument(info_span!("shipper", exchange = %cfg.exchange.address)),
        );

        let reporter = {
            let buffer = self.buffer.clone();
            let board = self.board.clone();
            let views: Vec<StreamView> = decls
                .iter()
                .map(|d| StreamView {
                    name: d.name.clone(),
                    kind: d.kind.clone(),
                    catalog_id: d.catalog_id.clone(),
                    sharing: ferry_protocol::messages::Sharing::try_from(d.sharing)
                        .unwrap_or(ferry_protocol::messages::Sharing::Unspecified)
                        .as_config()
                        .to_string(),
                    ..Default::default()
                })
                .collect();
            let source_cfgs: Vec<_> = cfg.streams.iter().map(|s| s.source().clone()).collect();
            let agent_id = cfg.agent.id.clone();
            let max_bytes = cfg.buffer.max_size.0;
            Arc::new(move || {
                let mut r = AgentStatus {
                    agent_id: agent_id.clone(),
                    pid: std::process::id(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    started_unix: started,
                    cert_not_after_unix,
                    buffer: BufferStatus {
                        bytes: buffer.total_bytes(),
                        max_bytes,
                        ..Default::default()
                    },
                    streams: views.clone(),
                    ..Default::default()
                };
                let lost = buffer.lost_ranges();
                for (i, v) in r.streams.iter_mut().enumerate() {
                    v.lost = lost
                        .get(&v.name)
                        .map(|l| l.iter().map(|&(a, b)| [a, b]).collect())
                        .unwrap_or_default();
                    let st = buffer.state(&v.name);
                    v.head_seq = st.head;
                    v.acked_seq = st.acked;
                    v.buffered_batches = st.batches;
                    v.buffered_bytes = st.bytes;
                    let Some(sc) = source_cfgs.get(i) else {
                        v.position =
                            "removed from the configuration; shipping what it buffered".into();
                        continue;
                    };
                    v.position = match buffer.position(&v.name) {
                        Ok(Some(p)) => {
                            v.gauges = sc
                                .position_gauges(&p)
                                .into_iter()
                                .map(|(k, n)| (k.to_string(), n))
                                .collect();
                            sc.describe_position(&p)
                        }
                        Ok(None) => "not started".into(),
                        Err(e) => format!("unreadable: {e}"),
                    };
                }
                board.fill(&mut r);
                r.bandwidth = throttle.status();
                r
            }) as admin::Reporter
        };
        let _ = report.set(reporter.clone());
        Shipping {
            shutdown,
            task,
            reporter,
        }
    }

    /// Stops in order: the sources (each waits for its commits in flight), then
    /// the committer with what was handed over, then the shipper.
    async fn stop(self, shipping: Shipping) {
        let Spine {
            sources,
            commits,
            committer,
            ..
        } = self;
        for r in sources.into_values() {
            r.shutdown.cancel();
            let _ = r.task.await;
        }
        drop(commits);
        if tokio::time::timeout(Duration::from_secs(30), committer)
            .await
            .is_err()
        {
            warn!("the committer did not finish within 30s");
        }
        shipping.stop().await;
    }
}

/// A running shipper and the report it heartbeats.
struct Shipping {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    reporter: admin::Reporter,
}

impl Shipping {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "cannot notify systemd");
    }
}

fn spawn_watchdog(shutdown: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => notify_systemd(&[sd_notify::NotifyState::Watchdog]),
            }
        }
    });
}
