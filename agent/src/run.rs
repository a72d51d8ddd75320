//! `ferry-agent run`: wires sources → committer → buffer → shipper, serves the
//! admin socket, talks to systemd, and shuts down in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_protocol::messages::{Hello, StreamDecl};
use ferry_transport::tls::{client_config, tcp_client_config, TlsFiles};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::buffer::Buffer;
use crate::committer::Committer;
use crate::config::Loaded;
use crate::shipper::Shipper;
use crate::sources::StreamSource;
use crate::status::{AgentStatus, Board, BufferStatus, StreamView};
use crate::{admin, metrics, status};

/// Bounded hand-over from sources to the committer: small, so a full buffer stops
/// sources almost at once.
const COMMIT_QUEUE: usize = 64;

pub async fn run(loaded: Loaded, shutdown: CancellationToken) -> Result<()> {
    let cfg = &loaded.config;
    let data_dir = &cfg.agent.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data_dir {}", data_dir.display()))?;
    let listener = admin::bind(&cfg.admin_socket())?;
    let metrics_listener = match cfg.metrics_listen() {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };

    let buffer_dir = cfg.buffer_dir();
    let cache = cfg.buffer.cache_size.0;
    let buffer =
        Arc::new(tokio::task::spawn_blocking(move || Buffer::open(&buffer_dir, cache)).await??);
    let names: Vec<String> = cfg.streams.iter().map(|s| s.name().to_string()).collect();
    let board = Arc::new(Board::default());
    let durable = Arc::new(Notify::new());
    let space = Arc::new(Notify::new());
    let (commit_tx, commit_rx) = mpsc::channel(COMMIT_QUEUE);
    let mut acked_tx = Vec::new();
    let mut acked_rx = Vec::new();
    for n in &names {
        let (tx, rx) = watch::channel(buffer.state(n).acked);
        acked_tx.push(tx);
        acked_rx.push(rx);
    }

    let committer = tokio::spawn(
        Committer {
            buffer: buffer.clone(),
            names: names.clone(),
            max_size: cfg.buffer.max_size.0,
            min_free: cfg.buffer.min_free.0,
            rx: commit_rx,
            durable: durable.clone(),
            space: space.clone(),
            board: board.clone(),
        }
        .run(),
    );

    let tls_files = TlsFiles {
        ca: &cfg.exchange.ca,
        cert: &cfg.exchange.cert,
        key: &cfg.exchange.key,
    };
    let client = client_config(&tls_files)?;
    let tcp = tcp_client_config(&tls_files)?;
    let hello = Hello {
        version: ferry_protocol::PROTOCOL_VERSION,
        agent_id: cfg.agent.id.clone(),
        department: cfg.agent.department.clone(),
        config_digest: loaded.digest.clone(),
        streams: cfg
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
            .collect(),
        software: env!("CARGO_PKG_VERSION").to_string(),
    };
    let cert_not_after_unix = ferry_transport::tls::identity_in_file(&cfg.exchange.cert)
        .map_or(0, |id| id.not_after_unix.max(0) as u64);
    if let Some(alarm) = status::cert_alarm(cert_not_after_unix, status::now_unix()) {
        warn!("{alarm}");
    }
    let report = Arc::new(std::sync::OnceLock::new());
    let throttle = Arc::new(crate::bandwidth::Throttle::new(
        cfg.bandwidth
            .schedule(crate::bandwidth::local_offset_secs())
            .map_err(|(_, e)| anyhow::anyhow!(e))?,
    ));
    let shipper = tokio::spawn(
        Shipper {
            address: cfg.exchange.address.clone(),
            server_name: cfg.server_name(),
            client,
            tcp,
            hello,
            buffer: buffer.clone(),
            names: names.clone(),
            acked: acked_tx,
            durable,
            space,
            board: board.clone(),
            cert_not_after_unix,
            report: report.clone(),
            throttle: throttle.clone(),
        }
        .run(shutdown.clone())
        .instrument(info_span!("shipper", exchange = %cfg.exchange.address)),
    );

    let sources: Vec<_> = cfg
        .streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            StreamSource {
                index: i,
                name: s.name().to_string(),
                config: s.source().clone(),
                buffer: buffer.clone(),
                board: board.clone(),
                acked: acked_rx[i].clone(),
                commits: commit_tx.clone(),
                shutdown: shutdown.clone(),
                spool_dir: data_dir.join("spool"),
            }
            .spawn()
        })
        .collect();
    drop(commit_tx);

    let reporter = {
        let throttle = throttle.clone();
        let buffer = buffer.clone();
        let board = board.clone();
        let views: Vec<StreamView> = cfg
            .streams
            .iter()
            .map(|s| StreamView {
                name: s.name().to_string(),
                kind: s.source().kind().to_string(),
                catalog_id: s.catalog_id.clone(),
                sharing: s.sharing().as_config().to_string(),
                ..Default::default()
            })
            .collect();
        let source_cfgs: Vec<_> = cfg.streams.iter().map(|s| s.source().clone()).collect();
        let agent_id = cfg.agent.id.clone();
        let max_bytes = cfg.buffer.max_size.0;
        let started = status::now_unix();
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
            for (v, sc) in r.streams.iter_mut().zip(&source_cfgs) {
                v.lost = lost
                    .get(&v.name)
                    .map(|l| l.iter().map(|&(a, b)| [a, b]).collect())
                    .unwrap_or_default();
                let st = buffer.state(&v.name);
                v.head_seq = st.head;
                v.acked_seq = st.acked;
                v.buffered_batches = st.batches;
                v.buffered_bytes = st.bytes;
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
    let metrics_task = metrics_listener
        .map(|l| tokio::spawn(metrics::serve(l, reporter.clone(), shutdown.clone())));
    let admin_task = tokio::spawn(admin::serve(listener, reporter, shutdown.clone()));

    notify_systemd(&[sd_notify::NotifyState::Ready]);
    spawn_watchdog(shutdown.clone());
    info!(
        agent = %cfg.agent.id,
        streams = names.len(),
        data_dir = %data_dir.display(),
        "agent running"
    );

    shutdown.cancelled().await;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    info!("shutting down");
    for s in sources {
        let _ = s.await;
    }
    // Sources are gone, so the committer finishes what was handed over and ends.
    if tokio::time::timeout(Duration::from_secs(30), committer)
        .await
        .is_err()
    {
        warn!("the committer did not finish within 30s");
    }
    let _ = shipper.await;
    let _ = admin_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(cfg.admin_socket());
    tokio::task::spawn_blocking(move || buffer.close()).await??;
    info!("stopped");
    Ok(())
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
