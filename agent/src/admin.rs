//! The local admin socket (`DATA_DIR/agent.sock`, mode 0600): `ferry-agent status`
//! asks the running agent for its report here, `ferry-agent reload` has it read
//! its configuration again. One request line, one JSON reply.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::run::Reload;
use crate::status::AgentStatus;

pub type Reporter = Arc<dyn Fn() -> AgentStatus + Send + Sync>;

/// Binds the socket, replacing a stale one left by a killed agent.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agent is already running with this data_dir (its admin socket {} answers)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale admin socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(
    listener: UnixListener,
    report: Reporter,
    reloads: mpsc::Sender<Reload>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    continue;
                }
            },
        };
        let report = report.clone();
        let reloads = reloads.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, report, reloads).await {
                debug!(error = %e, "admin request failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, report: Reporter, reloads: mpsc::Sender<Reload>) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let reply = match line.trim() {
        "status" => serde_json::to_string(&report())?,
        "reload" => {
            let (tx, rx) = oneshot::channel();
            let answer = match reloads.send(Reload { reply: Some(tx) }).await {
                Err(_) => Err("the agent is shutting down".to_string()),
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err("the agent is shutting down".to_string())),
            };
            match answer {
                Ok(changes) => serde_json::json!({ "reloaded": changes }).to_string(),
                Err(e) => serde_json::json!({ "refused": e }).to_string(),
            }
        }
        other => serde_json::json!({ "error": format!("unknown request {other:?}") }).to_string(),
    };
    w.write_all(reply.as_bytes()).await?;
    w.write_all(b"\n").await?;
    w.shutdown().await?;
    Ok(())
}

/// Asks a running agent for its status.
pub async fn query(path: &Path) -> Result<AgentStatus> {
    let stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("no agent answers on {}", path.display()))?;
    let (r, mut w) = stream.into_split();
    w.write_all(b"status\n").await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    serde_json::from_str(&line).with_context(|| format!("unreadable reply on {}", path.display()))
}

/// How a running agent answered `reload`.
pub enum ReloadAnswer {
    Reloaded(String),
    Refused(String),
}

/// Asks a running agent to read its configuration again, and waits for the
/// outcome (its streams stopped and started again, or the file refused).
pub async fn reload(path: &Path) -> Result<ReloadAnswer> {
    let stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("no agent answers on {}", path.display()))?;
    let (r, mut w) = stream.into_split();
    w.write_all(b"reload\n").await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("unreadable reply on {}", path.display()))?;
    match (
        v["reloaded"].as_str(),
        v["refused"].as_str(),
        v["error"].as_str(),
    ) {
        (Some(c), _, _) => Ok(ReloadAnswer::Reloaded(c.to_string())),
        (_, Some(e), _) => Ok(ReloadAnswer::Refused(e.to_string())),
        (_, _, Some(e)) => bail!("the agent on {} does not reload: {e}", path.display()),
        _ => bail!("unexpected reply on {}: {line}", path.display()),
    }
}
