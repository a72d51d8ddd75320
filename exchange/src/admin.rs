//! The exchange's local admin socket (`STORE/exchange.sock`, mode 0600). The store
//! is locked by the running exchange, so `records` and `export` ask it here; when
//! no exchange runs, the commands open the store themselves.
//!
//! Request: one JSON line `{"cmd": "records"|"export"|"agents", ...}`.
//! Reply: JSON lines, the last one `{"done": N}` or `{"error": "..."}`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::DeliverySection;
use crate::delivery::Statuses;
use crate::records;
use crate::server::Live;
use crate::store::{Decision, SharedStore};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Records {
        agent: String,
        stream: String,
        from: u64,
    },
    Export {
        agent: String,
        stream: String,
        to: PathBuf,
    },
    Agents,
    Gaps {
        agent: String,
        stream: String,
    },
    /// Take the revocation list anew and close revoked agents' connections
    /// (`revoke` asks this of a running exchange).
    Reload,
    /// Read the configuration file again and apply what changed (`reload`,
    /// SIGHUP): limits, deliveries, alarm thresholds, TLS files, revocations.
    ReloadConfig,
    /// Where each delivery stands on each stream it receives.
    Deliveries,
    /// Decide on a held stream: accept it as a continuation, or refuse it.
    Resolve {
        agent: String,
        stream: String,
        accept: bool,
        #[serde(default)]
        reason: String,
    },
    /// `ferry-exchange user …` (password hashes, never passwords).
    User {
        op: crate::users::UserOp,
    },
    /// The audit log from seq `from` on.
    Audit {
        from: u64,
    },
    /// Append an administrative action done outside the store (`enroll`,
    /// `revoke`: certificate files) to the audit log.
    Record {
        actor: String,
        action: String,
        target: String,
        detail: serde_json::Value,
    },
}

/// What the server does for a [`Request::Reload`]: the number of connections it
/// closed, or why it could not.
pub type Reloads = tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<usize, String>>>;

/// What the server does for a [`Request::ReloadConfig`]: what changed, or why
/// the file was refused (the running configuration then stays).
pub type ConfigReloads =
    tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<String, String>>>;

pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another exchange is already serving this store ({} answers)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// What `deliveries` reports from.
pub enum Deliveries<'a> {
    /// The running exchange's deliveries.
    Live(&'a Statuses),
    /// No exchange runs: the sinks' durable checkpoints.
    Offline(&'a [DeliverySection]),
}

/// Runs one request against a store, writing reply lines.
pub fn execute(
    store: &SharedStore,
    deliveries: &Deliveries<'_>,
    req: &Request,
    out: &mut dyn Write,
) -> Result<u64> {
    match req {
        Request::Deliveries => {
            let lines = match deliveries {
                Deliveries::Live(s) => s.snapshot(),
                Deliveries::Offline(cfg) => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(crate::delivery::offline_report(cfg, store)),
            };
            for l in &lines {
                writeln!(out, "{}", serde_json::to_string(l)?)?;
            }
            Ok(lines.len() as u64)
        }
        Request::Records {
            agent,
            stream,
            from,
        } => records::write_records(&**store, agent, stream, *from, out),
        Request::Export { agent, stream, to } => records::export(&**store, agent, stream, to, out),
        Request::Agents => {
            let agents = store.agents()?;
            let holds = store.holds()?;
            for a in &agents {
                let mut v = serde_json::to_value(a)?;
                let held: Vec<serde_json::Value> = holds
                    .iter()
                    .filter(|(agent, _, _)| *agent == a.agent_id)
                    .map(|(_, stream, h)| {
                        serde_json::json!({
                            "stream": stream, "reason": h.reason, "since_unix_ms": h.since_unix_ms,
                            "incarnation": h.incarnation, "head_seq": h.head_seq,
                            "acked_seq": h.acked_seq, "refused": h.refused,
                        })
                    })
                    .collect();
                if let Some(o) = v.as_object_mut() {
                    o.insert("held".into(), serde_json::Value::Array(held));
                }
                writeln!(out, "{v}")?;
            }
            Ok(agents.len() as u64)
        }
        Request::Resolve {
            agent,
            stream,
            accept,
            reason,
        } => {
            let decision = if *accept {
                Decision::Accept
            } else {
                Decision::Refuse(if reason.is_empty() {
                    "no reason given".into()
                } else {
                    reason.clone()
                })
            };
            let meta = store.resolve(agent, stream, &decision)?;
            writeln!(out, "{}", serde_json::to_string(&meta)?)?;
            Ok(1)
        }
        Request::Gaps { agent, stream } => {
            let gaps = store.gaps(agent, stream)?;
            for g in &gaps {
                writeln!(out, "{}", serde_json::to_string(g)?)?;
            }
            Ok(gaps.len() as u64)
        }
        // No exchange is serving: it reads the list when it starts.
        Request::Reload => Ok(0),
        Request::ReloadConfig => bail!("no exchange is serving this store"),
        Request::User { op } => crate::users::execute(&**store, op, out),
        Request::Audit { from } => crate::audit::write_entries(&**store, *from, out),
        Request::Record {
            actor,
            action,
            target,
            detail,
        } => {
            let entry = store.append_audit(actor, action, target, detail.clone())?;
            writeln!(out, "{}", serde_json::json!({ "audit_seq": entry.seq }))?;
            Ok(1)
        }
    }
}

/// Hands a request to the serving loop and waits for its answer.
async fn ask_server<T>(
    server: &tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<T, String>>>,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    match server.send(tx).await {
        Ok(()) => rx
            .await
            .unwrap_or_else(|_| Err("the exchange is stopping".into())),
        Err(_) => Err("the exchange is stopping".into()),
    }
}

pub async fn serve(
    listener: UnixListener,
    store: SharedStore,
    reloads: Reloads,
    config_reloads: ConfigReloads,
    live: Live,
    deliveries: Statuses,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
            },
        };
        let store = store.clone();
        let reloads = reloads.clone();
        let config_reloads = config_reloads.clone();
        let live = live.clone();
        let deliveries = deliveries.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            if let Ok(Request::ReloadConfig) = serde_json::from_str::<Request>(&line) {
                let reply = match ask_server(&config_reloads).await {
                    Ok(changes) => format!(
                        "{}\n{}\n",
                        serde_json::json!({ "reloaded": changes }),
                        serde_json::json!({ "done": 0 })
                    ),
                    Err(e) => format!("{}\n", serde_json::json!({ "error": e })),
                };
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.shutdown().await;
                return;
            }
            if let Ok(Request::Reload) = serde_json::from_str::<Request>(&line) {
                let tail = match ask_server(&reloads).await {
                    Ok(n) => serde_json::json!({ "done": n }),
                    Err(e) => serde_json::json!({ "error": e }),
                };
                let _ = w.write_all(format!("{tail}\n").as_bytes()).await;
                let _ = w.shutdown().await;
                return;
            }
            // Replies stream out in chunks, so a long `records` never sits in memory.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
            let work = tokio::task::spawn_blocking(move || {
                let mut out = ChunkWriter {
                    buf: Vec::new(),
                    tx,
                };
                let tail = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        match execute(&store, &Deliveries::Live(&deliveries), &req, &mut out) {
                            Ok(n) => {
                                if let Request::Resolve { agent, .. } = &req {
                                    // The agent reconnects and is welcomed anew.
                                    live.close_agent(
                                        agent,
                                        None,
                                        b"the exchange operator resolved a held stream",
                                    );
                                }
                                serde_json::json!({ "done": n })
                            }
                            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
                        }
                    }
                    Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
                };
                let _ = writeln!(out, "{tail}");
                let _ = out.flush();
            });
            while let Some(chunk) = rx.recv().await {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = work.await;
            let _ = w.shutdown().await;
        });
    }
}

/// A `Write` that hands 64 KiB chunks to the async side.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 << 10 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.tx
                .blocking_send(std::mem::take(&mut self.buf))
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    }
}

/// Sends a request to a running exchange, copying reply lines (but the final
/// status line) to `out`. `Ok(None)` when no exchange answers.
pub async fn ask(socket: &Path, req: &Request, out: &mut dyn Write) -> Result<Option<u64>> {
    let Ok(stream) = UnixStream::connect(socket).await else {
        return Ok(None);
    };
    let (r, mut w) = stream.into_split();
    w.write_all(serde_json::to_string(req)?.as_bytes()).await?;
    w.write_all(b"\n").await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(n) = v.get("done").and_then(|d| d.as_u64()) {
            return Ok(Some(n));
        }
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            bail!("{e}");
        }
        writeln!(out, "{line}")?;
    }
    bail!("the exchange closed the admin connection early")
}
