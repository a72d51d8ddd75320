//! Who is connected right now, and the fleet as the dashboard shows it.
//!
//! An agent is **online** while it has an open connection to this exchange, or
//! its last heartbeat (every 10 s) is fresh: with several exchange nodes on one
//! store, the connection may be another node's, and the registry's `last_seen`
//! says so. It is **offline** once it has had neither for `offline_after`
//! (`[dashboard]`); in between it is **reconnecting**. A killed agent's
//! connection ends at the QUIC (or TCP keepalive) idle timeout of 30 s, and its
//! heartbeats stop with it, so it shows offline within `offline_after` + 30 s; a
//! live agent sends a heartbeat every 10 s and never flaps.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::store::{now_unix_ms, AgentRecord};

/// A heartbeat younger than this counts as a connection (another node's).
const FRESH_HEARTBEAT: Duration = Duration::from_secs(30);

/// This node's open agent connections.
pub struct Fleet {
    inner: Mutex<HashMap<String, Presence>>,
    /// When this exchange started: an agent it never saw connected has been
    /// without a connection (here) since then.
    started_unix_ms: u64,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            inner: Mutex::default(),
            started_unix_ms: now_unix_ms(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Presence {
    connections: usize,
    transport: String,
    remote: String,
    /// When the current connection opened, or the last one closed.
    since_unix_ms: u64,
}

/// How an agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Online,
    Reconnecting,
    Offline,
}

/// An agent's connection as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionView {
    pub state: State,
    pub online: bool,
    /// `quic`, or `tcp` where UDP is blocked (the last one seen).
    pub transport: String,
    pub remote: String,
    /// Since when the agent has been in `state`'s connection (connected, or
    /// without one), Unix ms.
    pub since_unix_ms: u64,
}

impl Fleet {
    pub(crate) fn connected(&self, agent: &str, transport: &str, remote: &str) {
        if let Ok(mut m) = self.inner.lock() {
            let p = m.entry(agent.to_string()).or_default();
            if p.connections == 0 {
                p.since_unix_ms = now_unix_ms();
            }
            p.connections += 1;
            p.transport = transport.to_string();
            p.remote = remote.to_string();
        }
    }

    pub(crate) fn disconnected(&self, agent: &str) {
        if let Ok(mut m) = self.inner.lock() {
            if let Some(p) = m.get_mut(agent) {
                p.connections = p.connections.saturating_sub(1);
                if p.connections == 0 {
                    p.since_unix_ms = now_unix_ms();
                }
            }
        }
    }

    /// How the registry's `rec` stands at `now`.
    pub fn connection(
        &self,
        rec: &AgentRecord,
        now: u64,
        offline_after: Duration,
    ) -> ConnectionView {
        let here = self
            .inner
            .lock()
            .ok()
            .and_then(|m| m.get(&rec.agent_id).cloned());
        let heartbeat_ms = rec.status.as_ref().map_or(rec.last_seen_unix_ms, |h| {
            h.received_unix_ms.max(rec.last_seen_unix_ms)
        });
        let fresh = now.saturating_sub(heartbeat_ms) < FRESH_HEARTBEAT.as_millis() as u64;
        let (transport, remote) = match &here {
            Some(p) if p.connections > 0 => (p.transport.clone(), p.remote.clone()),
            _ => (rec.transport.clone(), rec.remote.clone()),
        };
        if let Some(p) = here.as_ref().filter(|p| p.connections > 0) {
            return ConnectionView {
                state: State::Online,
                online: true,
                transport,
                remote,
                since_unix_ms: p.since_unix_ms,
            };
        }
        if fresh {
            return ConnectionView {
                state: State::Online,
                online: true,
                transport,
                remote,
                since_unix_ms: heartbeat_ms,
            };
        }
        // The last sign of a connection: its heartbeat, its end here, or (never
        // seen here) this node's start.
        let gone = heartbeat_ms.max(here.map_or(self.started_unix_ms, |p| p.since_unix_ms));
        let state = if now.saturating_sub(gone) >= offline_after.as_millis() as u64 {
            State::Offline
        } else {
            State::Reconnecting
        };
        ConnectionView {
            state,
            online: false,
            transport,
            remote,
            since_unix_ms: gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Heartbeat;

    fn rec(last_seen: u64) -> AgentRecord {
        AgentRecord {
            agent_id: "a1".into(),
            last_seen_unix_ms: last_seen,
            status: Some(Heartbeat {
                received_unix_ms: last_seen,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn online_reconnecting_offline() {
        let f = Fleet::default();
        let after = Duration::from_secs(60);
        let now = now_unix_ms();
        // Never connected here, no heartbeat for long: offline once the node
        // has run `offline_after` without seeing it (not at once on start).
        let old = rec(now - 3_600_000);
        assert_eq!(f.connection(&old, now, after).state, State::Reconnecting);
        assert_eq!(
            f.connection(&old, now + 61_000, after).state,
            State::Offline
        );
        // Connected here: online whatever the heartbeat says.
        f.connected("a1", "quic", "127.0.0.1:5");
        let v = f.connection(&old, now + 61_000, after);
        assert!(v.online && v.transport == "quic", "{v:?}");
        // The connection ends: reconnecting, then offline after `offline_after`.
        f.disconnected("a1");
        let t = now_unix_ms();
        assert_eq!(f.connection(&old, t, after).state, State::Reconnecting);
        assert_eq!(f.connection(&old, t + 60_000, after).state, State::Offline);
        // A fresh heartbeat (another node's connection) is online.
        assert!(f.connection(&rec(t), t + 5_000, after).online);
    }
}
