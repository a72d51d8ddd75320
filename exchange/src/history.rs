//! The fleet's history: per agent and stream, once a minute, the acknowledged
//! seq, the head seq and the backlog bytes of its last heartbeat, kept for
//! [`KEEP`] in a sled database of its own (`history/` in the node's store
//! directory, an 8 MiB cache), pruned every hour. The dashboard draws
//! throughput (acknowledged records per minute) and backlog from it.
//!
//! Size: one point is a 16-byte key tail plus a 24-byte value, so 10,080 points
//! a week per stream: about 0.5 MB per stream on disk, whatever the load.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::store::{now_unix_ms, SharedStore};

/// How long points are kept.
pub const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
const MINUTE_MS: u64 = 60_000;

pub struct History {
    db: sled::Db,
    /// This process owns the history while it is open (last: let go after
    /// the database).
    _dir_lock: ferry_transport::durable::DirLock,
}

/// One minute of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// The minute's start, Unix ms.
    pub t: u64,
    pub acked_seq: u64,
    pub head_seq: u64,
    pub backlog_bytes: u64,
}

fn prefix(agent: &str, stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(agent.len() + stream.len() + 2);
    k.extend_from_slice(agent.as_bytes());
    k.push(0);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k
}

fn key(agent: &str, stream: &str, minute: u64) -> Vec<u8> {
    let mut k = prefix(agent, stream);
    k.extend_from_slice(&minute.to_be_bytes());
    k
}

impl History {
    pub fn open(dir: &Path) -> Result<Arc<History>, sled::Error> {
        let path = dir.join("history");
        // A crash in the middle of a snapshot of this sled too leaves a torn
        // one that sled then refuses to open past.
        let (dir_lock, torn) = ferry_transport::durable::own_dir(&path).map_err(sled::Error::Io)?;
        for name in torn {
            tracing::warn!(file = %name, "removed a fleet history snapshot file a crash left half-written");
        }
        let db = ferry_transport::durable::open_sled(
            &sled::Config::new().path(&path).cache_capacity(8 << 20),
        )?;
        Ok(Arc::new(History {
            db,
            _dir_lock: dir_lock,
        }))
    }

    /// Records every agent's last heartbeat (if fresher than two minutes) as
    /// the point of minute `now`.
    pub fn sample(&self, store: &SharedStore, now: u64) -> Result<usize, String> {
        let minute = now / MINUTE_MS;
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for rec in store.agents().map_err(|e| e.to_string())? {
            let Some(hb) = &rec.status else { continue };
            if now.saturating_sub(hb.received_unix_ms) > 2 * MINUTE_MS {
                continue;
            }
            for s in &hb.streams {
                let mut v = Vec::with_capacity(24);
                v.extend_from_slice(&s.acked_seq.to_be_bytes());
                v.extend_from_slice(&s.head_seq.to_be_bytes());
                v.extend_from_slice(&s.buffered_bytes.to_be_bytes());
                batch.insert(key(&rec.agent_id, &s.name, minute), v);
                n += 1;
            }
        }
        self.db.apply_batch(batch).map_err(|e| e.to_string())?;
        Ok(n)
    }

    /// The points of one stream from `since` (Unix ms) on, oldest first.
    pub fn points(&self, agent: &str, stream: &str, since: u64) -> Vec<Point> {
        let from = key(agent, stream, since / MINUTE_MS);
        let p = prefix(agent, stream);
        let mut out = Vec::new();
        for (k, v) in self.db.range(from..).flatten() {
            if !k.starts_with(&p) {
                break;
            }
            let (Some(m), Some(v)) = (k.get(p.len()..), v.get(..24)) else {
                continue;
            };
            let n = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
            out.push(Point {
                t: n(m) * MINUTE_MS,
                acked_seq: n(&v[..8]),
                head_seq: n(&v[8..16]),
                backlog_bytes: n(&v[16..24]),
            });
        }
        out
    }

    /// Removes points older than [`KEEP`] before `now`.
    pub fn prune(&self, now: u64) -> usize {
        let cutoff = now.saturating_sub(KEEP.as_millis() as u64) / MINUTE_MS;
        let mut removed = 0;
        let mut at: Vec<u8> = Vec::new();
        // Each stream's old points sit at the start of its prefix.
        loop {
            let Some(Ok((k, _))) = self.db.range(at.clone()..).next() else {
                break;
            };
            let Some(split) = k.len().checked_sub(8) else {
                break;
            };
            let p = k[..split].to_vec();
            let end = [p.as_slice(), &cutoff.to_be_bytes()].concat();
            for (old, _) in self.db.range(p.clone()..end).flatten() {
                if self.db.remove(old).is_ok() {
                    removed += 1;
                }
            }
            // The next stream: past every key of this prefix.
            at = [p.as_slice(), &[0xff; 9]].concat();
        }
        removed
    }
}

/// Samples once a minute and prunes once an hour until `shutdown`.
pub fn start(
    history: Arc<History>,
    store: SharedStore,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(MINUTE_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            ticks += 1;
            let (h, s) = (history.clone(), store.clone());
            let prune = ticks % 60 == 1;
            let r = tokio::task::spawn_blocking(move || {
                let now = now_unix_ms();
                if prune {
                    h.prune(now);
                }
                h.sample(&s, now)
            })
            .await;
            if let Ok(Err(e)) = r {
                warn!(error = %e, "history: cannot sample the fleet");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AgentRecord, Heartbeat, StreamHeartbeat};

    /// A kill in the middle of sled's snapshot write (the delivery crash tests
    /// found one) leaves a torn `.generating` file: the history still opens.
    #[test]
    fn a_torn_snapshot_does_not_stop_the_history_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        drop(History::open(dir.path()).unwrap());
        std::fs::write(
            dir.path()
                .join("history")
                .join("snap.00000000FFFFFFFF.generating"),
            b"torn",
        )
        .unwrap();
        History::open(dir.path()).unwrap();
    }

    #[test]
    fn sampled_read_back_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::Embedded::open(&dir.path().join("store"), 1 << 20).unwrap());
        let h = History::open(dir.path()).unwrap();
        let t0 = 1_800_000_000_000u64;
        for (i, t) in [t0, t0 + MINUTE_MS, t0 + 2 * MINUTE_MS]
            .into_iter()
            .enumerate()
        {
            let mut rec = AgentRecord {
                agent_id: "a1".into(),
                ..Default::default()
            };
            rec.status = Some(Heartbeat {
                received_unix_ms: t,
                streams: ["s1", "s2"]
                    .iter()
                    .map(|n| StreamHeartbeat {
                        name: n.to_string(),
                        acked_seq: 100 * i as u64,
                        head_seq: 100 * i as u64 + 5,
                        buffered_bytes: 4096,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
            store.put_agent(&rec).unwrap();
            assert_eq!(h.sample(&store, t).unwrap(), 2);
        }
        let p = h.points("a1", "s1", t0 + MINUTE_MS);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[1].acked_seq, p[1].head_seq, p[1].backlog_bytes),
            (200, 205, 4096)
        );
        // A stale heartbeat is not sampled again.
        assert_eq!(h.sample(&store, t0 + 10 * MINUTE_MS).unwrap(), 0);
        // A week later only what is younger than KEEP stays.
        let later = t0 + KEEP.as_millis() as u64 + 2 * MINUTE_MS + 1;
        assert_eq!(h.prune(later), 2 * 2);
        assert_eq!(h.points("a1", "s1", 0).len(), 1);
        assert_eq!(h.points("a1", "s2", 0).len(), 1);
    }
}
