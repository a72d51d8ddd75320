//! systemd's watchdog for `serve` (`WatchdogSec=` in the unit).
//!
//! A timer alone would prove only that a timer fires. Each ping here is earned: the
//! task asks the running exchange, over its admin socket, where its deliveries
//! stand (an in-memory answer, no store I/O), and pings systemd only when the
//! answer arrives within the period. The answer comes from the admin task the
//! server spawned on the same runtime, so a wedged runtime or a dead admin loop
//! stops the pings, and systemd restarts the exchange, which resumes from its
//! durable store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::admin::Request;

/// When systemd asked for a watchdog (`WATCHDOG_USEC`), probes the exchange at
/// `socket` every half period and pings after each answer, until `shutdown`.
pub fn spawn(socket: PathBuf, shutdown: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        // Until the first answer the server may still be opening its store: a
        // missing answer is not news then (systemd counts only after READY=1).
        let mut answered = false;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            match tokio::time::timeout(period, probe(&socket)).await {
                Ok(Ok(())) => {
                    answered = true;
                    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]) {
                        warn!(error = %e, "cannot notify systemd");
                    }
                }
                Ok(Err(e)) if answered => warn!(
                    socket = %socket.display(),
                    error = %format!("{e:#}"),
                    "watchdog: the exchange did not answer on its admin socket; systemd is not pinged"
                ),
                Err(_) if answered => warn!(
                    socket = %socket.display(),
                    timeout = ?period,
                    "watchdog: the exchange did not answer on its admin socket in time; systemd is not pinged"
                ),
                _ => {}
            }
        }
    });
}

/// One `deliveries` request, read to its closing `{"done": N}` line.
async fn probe(socket: &Path) -> Result<()> {
    let (r, mut w) = UnixStream::connect(socket).await?.into_split();
    let mut request = serde_json::to_vec(&Request::Deliveries)?;
    request.push(b'\n');
    w.write_all(&request).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v.get("done").is_some() {
            return Ok(());
        }
        if let Some(e) = v.get("error") {
            bail!("the exchange answered with an error: {e}");
        }
    }
    bail!("the exchange closed the admin connection before its answer")
}
