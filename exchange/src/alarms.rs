//! Alarms the exchange raises about its fleet, evaluated every
//! [`EVALUATE_EVERY`] from the registry, this node's connections, held streams
//! and the deliveries, against `[dashboard]`'s thresholds.
//!
//! An alarm is identified by its kind, agent and stream (`offline:hp-01:`), so a
//! condition that stays true stays one alarm. When the condition ends the alarm
//! clears and moves to the history; an operator acknowledges an active alarm with
//! a note, which stays with it. Raised and cleared alarms go to the journal
//! (`ALARM` at warn level) and, with `[dashboard] alarm_webhook`, to a webhook
//! (`webhook.rs`). State is this node's, kept in `alarms.json` in the
//! store directory (written whole, atomically, on every change) so a restart
//! keeps acknowledgements and history.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::DashboardSection;
use crate::delivery::Statuses;
use crate::fleet::{Fleet, State};
use crate::store::{now_unix_ms, SharedStore};

/// How often the conditions are looked at.
pub const EVALUATE_EVERY: Duration = Duration::from_secs(2);
/// Cleared alarms kept in the history.
const HISTORY: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ack {
    pub by: String,
    pub note: String,
    pub at_unix_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Alarm {
    /// `kind:agent:stream`.
    pub id: String,
    /// `offline`, `backlog`, `buffer_full`, `retained_wal`, `cert_expiring`,
    /// `seq_gap`, `held`, `source_error`, `delivery`.
    pub kind: String,
    pub agent: String,
    /// Empty for alarms about the whole agent.
    pub stream: String,
    /// In English, for the journal, the webhook and scripts.
    pub message: String,
    /// The message's catalogue key (`alarm_text.KEY` in the dashboard's
    /// catalogues) and its values, so each operator reads it in their
    /// language; empty where the text comes from elsewhere (a source's error).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text_key: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    pub since_unix_ms: u64,
    /// Set once the condition ended.
    pub cleared_unix_ms: Option<u64>,
    pub acknowledged: Option<Ack>,
}

impl Alarm {
    pub fn active(&self) -> bool {
        self.cleared_unix_ms.is_none()
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Book {
    active: BTreeMap<String, Alarm>,
    history: VecDeque<Alarm>,
}

impl Book {
    fn active_newest_first(&self) -> Vec<Alarm> {
        let mut out: Vec<Alarm> = self.active.values().cloned().collect();
        out.sort_by_key(|a| std::cmp::Reverse(a.since_unix_ms));
        out
    }
}

/// The alarms of this node.
pub struct Alarms {
    book: Mutex<Book>,
    path: PathBuf,
    /// `[dashboard] alarm_webhook`, once set.
    webhook: std::sync::OnceLock<crate::webhook::Webhook>,
    /// The last audit entry read for acknowledgements ([`Alarms::take_acks`]).
    audit_seen: Mutex<u64>,
}

/// How much earlier than this node raised an alarm an acknowledgement made on
/// another node may be and still count: nodes evaluate a few seconds apart.
const ACK_SKEW_MS: u64 = 10_000;

/// A condition that holds now.
struct Condition {
    kind: &'static str,
    agent: String,
    stream: String,
    message: Text,
}

/// An alarm's message: English text, and its catalogue key and values.
struct Text {
    english: String,
    key: &'static str,
    args: BTreeMap<String, String>,
}

impl Text {
    fn new(key: &'static str, args: &[(&str, String)], english: String) -> Text {
        Text {
            english,
            key,
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    /// Text from elsewhere (an agent's or a delivery's error), as it is.
    fn verbatim(english: String) -> Text {
        Text {
            english,
            key: "",
            args: BTreeMap::new(),
        }
    }
}

impl Alarms {
    /// Opens the alarm book in `dir` (a damaged file is set aside, not fatal).
    pub fn open(dir: &std::path::Path) -> Arc<Alarms> {
        let path = dir.join("alarms.json");
        let book = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "the alarm book cannot be read; starting a new one (the old one is kept as alarms.json.damaged)");
                let _ = std::fs::rename(&path, path.with_extension("json.damaged"));
                Book::default()
            }),
            Err(_) => Book::default(),
        };
        Arc::new(Alarms {
            book: Mutex::new(book),
            path,
            webhook: std::sync::OnceLock::new(),
            audit_seen: Mutex::new(0),
        })
    }

    /// Takes acknowledgements made on other nodes sharing the store: each is
    /// an `alarm_ack` entry of the shared audit log (written by whichever
    /// node's dashboard took it). An entry acknowledges this node's active
    /// alarm of that id unless it is already acknowledged, or the entry is
    /// older than the alarm (it acknowledged an earlier raising). Reads only
    /// the entries after the last one read.
    pub fn take_acks(
        &self,
        store: &dyn crate::store::Registry,
    ) -> Result<(), crate::store::StoreError> {
        let Ok(mut seen) = self.audit_seen.lock() else {
            return Ok(());
        };
        loop {
            let entries = store.audit(*seen + 1, 1000)?;
            let Some(last) = entries.last() else {
                return Ok(());
            };
            *seen = last.seq;
            let acks: Vec<_> = entries.iter().filter(|e| e.action == "alarm_ack").collect();
            if acks.is_empty() {
                continue;
            }
            let Ok(mut b) = self.book.lock() else {
                return Ok(());
            };
            let mut taken = false;
            for e in acks {
                let Some(a) = b.active.get_mut(&e.target) else {
                    continue;
                };
                if a.acknowledged.is_some() || e.time_unix_ms + ACK_SKEW_MS < a.since_unix_ms {
                    continue;
                }
                let by = e.actor.split_once(':').map_or(e.actor.as_str(), |(_, n)| n);
                a.acknowledged = Some(Ack {
                    by: by.to_string(),
                    note: e.detail["note"].as_str().unwrap_or_default().to_string(),
                    at_unix_ms: e.time_unix_ms,
                });
                // The node that took it told the journal and the webhook.
                info!(alarm = %e.target, by, "alarm acknowledged on another node");
                taken = true;
            }
            if taken {
                self.save(&b);
            }
        }
    }

    /// Sends every alarm raised, acknowledged or cleared from now on to `w` too.
    pub fn set_webhook(&self, w: crate::webhook::Webhook) {
        let _ = self.webhook.set(w);
    }

    fn notify(&self, event: &str, alarm: &Alarm) {
        if let Some(w) = self.webhook.get() {
            w.send(event, alarm);
        }
    }

    /// The active alarms, newest first (no copy of the history).
    pub fn active(&self) -> Vec<Alarm> {
        self.book
            .lock()
            .map(|b| b.active_newest_first())
            .unwrap_or_default()
    }

    /// Active alarms first (newest first), then the history (newest first).
    pub fn list(&self) -> Vec<Alarm> {
        let Ok(b) = self.book.lock() else {
            return Vec::new();
        };
        let mut out = b.active_newest_first();
        out.extend(b.history.iter().rev().cloned());
        out
    }

    /// Acknowledges the active alarm `id`.
    pub fn acknowledge(&self, id: &str, by: &str, note: &str) -> Result<Alarm, String> {
        let mut b = self
            .book
            .lock()
            .map_err(|_| "the alarm book is poisoned".to_string())?;
        let Some(a) = b.active.get_mut(id) else {
            return Err(format!("no active alarm {id:?}"));
        };
        a.acknowledged = Some(Ack {
            by: by.to_string(),
            note: note.to_string(),
            at_unix_ms: now_unix_ms(),
        });
        let a = a.clone();
        info!(alarm = %id, by, note, "alarm acknowledged");
        self.save(&b);
        self.notify("acknowledged", &a);
        Ok(a)
    }

    /// Raises what newly holds and clears what no longer does.
    fn apply(&self, now: u64, conditions: Vec<Condition>) {
        let Ok(mut b) = self.book.lock() else {
            return;
        };
        let mut holding = BTreeMap::new();
        for c in conditions {
            let id = format!("{}:{}:{}", c.kind, c.agent, c.stream);
            holding.insert(id, c);
        }
        let mut changed = false;
        let ended: Vec<String> = b
            .active
            .keys()
            .filter(|id| !holding.contains_key(*id))
            .cloned()
            .collect();
        for id in ended {
            if let Some(mut a) = b.active.remove(&id) {
                a.cleared_unix_ms = Some(now);
                warn!(alarm = %a.id, kind = %a.kind, agent = %a.agent, stream = %a.stream, "ALARM cleared: {}", a.message);
                self.notify("cleared", &a);
                b.history.push_back(a);
                if b.history.len() > HISTORY {
                    b.history.pop_front();
                }
                changed = true;
            }
        }
        for (id, c) in holding {
            match b.active.get_mut(&id) {
                Some(a) => {
                    if a.message != c.message.english {
                        a.message = c.message.english;
                        a.text_key = c.message.key.to_string();
                        a.args = c.message.args;
                        changed = true;
                    }
                }
                None => {
                    warn!(alarm = %id, kind = c.kind, agent = %c.agent, stream = %c.stream, "ALARM: {}", c.message.english);
                    let a = Alarm {
                        id: id.clone(),
                        kind: c.kind.to_string(),
                        agent: c.agent,
                        stream: c.stream,
                        message: c.message.english,
                        text_key: c.message.key.to_string(),
                        args: c.message.args,
                        since_unix_ms: now,
                        cleared_unix_ms: None,
                        acknowledged: None,
                    };
                    self.notify("raised", &a);
                    b.active.insert(id, a);
                    changed = true;
                }
            }
        }
        if changed {
            self.save(&b);
        }
    }

    fn save(&self, b: &Book) {
        let tmp = self.path.with_extension("json.tmp");
        let r = serde_json::to_vec(b)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = r {
            warn!(path = %self.path.display(), error = %e, "cannot write the alarm book");
        }
    }
}

/// What holds now, from the registry, the connections, holds and deliveries.
fn conditions(
    store: &SharedStore,
    fleet: &Fleet,
    deliveries: &Statuses,
    cfg: &DashboardSection,
    now: u64,
) -> Vec<Condition> {
    let mut out = Vec::new();
    let mut push = |kind, agent: &str, stream: &str, message: Text| {
        out.push(Condition {
            kind,
            agent: agent.to_string(),
            stream: stream.to_string(),
            message,
        })
    };
    let agents = store.agents().unwrap_or_else(|e| {
        warn!(error = %e, "alarms: cannot read the registry");
        Vec::new()
    });
    for rec in &agents {
        let a = rec.agent_id.as_str();
        let conn = fleet.connection(rec, now, cfg.offline_after);
        if conn.state == State::Offline {
            let since = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(conn.since_unix_ms),
            )
            .to_string();
            push(
                "offline",
                a,
                "",
                Text::new(
                    "offline",
                    &[("since_ms", conn.since_unix_ms.to_string())],
                    format!("no connection since {since}"),
                ),
            );
        }
        let Some(hb) = &rec.status else { continue };
        if hb.buffer_full || hb.disk_low {
            push(
                "buffer_full",
                a,
                "",
                if hb.disk_low {
                    Text::new("disk_low", &[], "the agent's disk is nearly full".into())
                } else {
                    Text::new(
                        "buffer_full",
                        &[
                            ("bytes", hb.buffer_bytes.to_string()),
                            ("max", hb.buffer_max_bytes.to_string()),
                        ],
                        format!(
                            "the agent's buffer is full ({} of {} bytes)",
                            hb.buffer_bytes, hb.buffer_max_bytes
                        ),
                    )
                },
            );
        } else if hb.buffer_max_bytes > 0 && hb.buffer_bytes * 10 >= hb.buffer_max_bytes * 8 {
            push(
                "buffer_full",
                a,
                "",
                Text::new(
                    "buffer_high",
                    &[
                        ("bytes", hb.buffer_bytes.to_string()),
                        ("max", hb.buffer_max_bytes.to_string()),
                    ],
                    format!(
                        "the agent's buffer is above 80 % ({} of {} bytes)",
                        hb.buffer_bytes, hb.buffer_max_bytes
                    ),
                ),
            );
        }
        let expires_ms = hb.cert_not_after_unix.saturating_mul(1000);
        if hb.cert_not_after_unix > 0
            && expires_ms.saturating_sub(now) < cfg.cert_expiry_alarm.as_millis() as u64
        {
            let at = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(hb.cert_not_after_unix),
            )
            .to_string();
            push(
                "cert_expiring",
                a,
                "",
                Text::new(
                    "cert_expiring",
                    &[("at_ms", (hb.cert_not_after_unix * 1000).to_string())],
                    format!("the agent's certificate expires {at}"),
                ),
            );
        }
        for s in &hb.streams {
            if s.buffered_bytes > cfg.backlog_alarm {
                push(
                    "backlog",
                    a,
                    &s.name,
                    Text::new(
                        "backlog",
                        &[
                            ("bytes", s.buffered_bytes.to_string()),
                            ("batches", s.buffered_batches.to_string()),
                            ("from", (s.acked_seq + 1).to_string()),
                            ("to", s.head_seq.to_string()),
                        ],
                        format!(
                            "{} bytes in {} batches wait at the agent (seqs {}..{})",
                            s.buffered_bytes,
                            s.buffered_batches,
                            s.acked_seq + 1,
                            s.head_seq
                        ),
                    ),
                );
            }
            if let Some(&wal) = s.gauges.get(ferry_protocol::messages::RETAINED_WAL_GAUGE) {
                if wal > cfg.retained_wal_alarm {
                    push(
                        "retained_wal",
                        a,
                        &s.name,
                        Text::new(
                            "retained_wal",
                            &[("bytes", wal.to_string())],
                            format!("the replication slot retains {wal} bytes of WAL"),
                        ),
                    );
                }
            }
            if !s.error.is_empty() {
                push("source_error", a, &s.name, Text::verbatim(s.error.clone()));
            }
            if !s.lost.is_empty() {
                let ranges: Vec<String> =
                    s.lost.iter().map(|[f, t]| format!("{f}..={t}")).collect();
                push(
                    "seq_gap",
                    a,
                    &s.name,
                    Text::new(
                        "seq_gap",
                        &[("ranges", ranges.join(", "))],
                        format!("seqs declared lost: {}", ranges.join(", ")),
                    ),
                );
            }
        }
    }
    match store.holds() {
        Ok(holds) => {
            for (agent, stream, hold) in holds {
                push("held", &agent, &stream, Text::verbatim(hold.reason.clone()));
            }
        }
        Err(e) => warn!(error = %e, "alarms: cannot read held streams"),
    }
    for d in deliveries.snapshot() {
        if let Some(e) = &d.last_error {
            push(
                "delivery",
                &d.agent,
                &d.stream,
                Text::verbatim(format!("delivery {}: {e}", d.delivery)),
            );
        }
    }
    out
}

/// Evaluates the alarms every [`EVALUATE_EVERY`] until `shutdown`.
pub fn start(
    alarms: Arc<Alarms>,
    store: SharedStore,
    fleet: Arc<Fleet>,
    deliveries: Statuses,
    config: tokio::sync::watch::Receiver<Arc<crate::config::ExchangeConfig>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVALUATE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (alarms, store, fleet, deliveries, cfg) = (
                alarms.clone(),
                store.clone(),
                fleet.clone(),
                deliveries.clone(),
                // Thresholds as of now: a reload may have changed them.
                config.borrow().dashboard.clone(),
            );
            let _ = tokio::task::spawn_blocking(move || {
                let now = now_unix_ms();
                let c = conditions(&store, &fleet, &deliveries, &cfg, now);
                alarms.apply(now, c);
                if let Err(e) = alarms.take_acks(&*store) {
                    warn!(error = %e, "cannot read acknowledgements from the audit log");
                }
            })
            .await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(kind: &'static str, agent: &str) -> Condition {
        Condition {
            kind,
            agent: agent.into(),
            stream: String::new(),
            message: Text::verbatim(format!("{kind} of {agent}")),
        }
    }

    /// Two nodes sharing a store each keep their own alarm book; an operator
    /// acknowledges on one, and the other takes it from the shared audit log,
    /// but not for a later raising of the same alarm.
    #[test]
    fn an_acknowledgement_on_another_node_reaches_this_one_through_the_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::Embedded::open(&dir.path().join("store"), 1 << 20).unwrap());
        for node in ["here", "there"] {
            std::fs::create_dir(dir.path().join(node)).unwrap();
        }
        let here = Alarms::open(&dir.path().join("here"));
        let there = Alarms::open(&dir.path().join("there"));
        let t0 = now_unix_ms();
        for node in [&here, &there] {
            node.apply(t0, vec![cond("offline", "a1"), cond("offline", "a2")]);
        }
        // Acknowledged on the other node: its dashboard audits it.
        there
            .acknowledge("offline:a1:", "duty", "机房断电")
            .unwrap();
        store
            .append_audit(
                "web:duty",
                "alarm_ack",
                "offline:a1:",
                serde_json::json!({"note": "机房断电"}),
            )
            .unwrap();
        here.take_acks(&*store).unwrap();
        let by_id = |a: &Alarms, id: &str| a.active().into_iter().find(|x| x.id == id).unwrap();
        let ack = by_id(&here, "offline:a1:").acknowledged.unwrap();
        assert_eq!((ack.by.as_str(), ack.note.as_str()), ("duty", "机房断电"));
        assert!(by_id(&here, "offline:a2:").acknowledged.is_none());
        // Kept across a restart of this node.
        let reopened = Alarms::open(&dir.path().join("here"));
        assert!(by_id(&reopened, "offline:a1:").acknowledged.is_some());
        // A node that raised the alarm a minute after the acknowledgement (a
        // later raising): the old entry does not count for it.
        std::fs::create_dir(dir.path().join("late")).unwrap();
        let late = Alarms::open(&dir.path().join("late"));
        late.apply(t0 + 60_000, vec![cond("offline", "a1")]);
        late.take_acks(&*store).unwrap();
        assert!(by_id(&late, "offline:a1:").acknowledged.is_none());
    }

    /// The conditions read the heartbeat's figures by the names the sources
    /// give them: a PostgreSQL slot retaining more WAL than the threshold
    /// raises `retained_wal`.
    #[test]
    fn a_slot_retaining_too_much_wal_raises_an_alarm() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            Arc::new(crate::store::Embedded::open(&dir.path().join("store"), 1 << 20).unwrap());
        let cfg = DashboardSection::default();
        let now = now_unix_ms();
        let stream = crate::store::StreamHeartbeat {
            name: "person".into(),
            kind: "postgres".into(),
            gauges: [(
                ferry_protocol::messages::RETAINED_WAL_GAUGE.to_string(),
                cfg.retained_wal_alarm + 1,
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        store
            .put_agent(&crate::store::AgentRecord {
                agent_id: "a1".into(),
                last_seen_unix_ms: now,
                status: Some(crate::store::Heartbeat {
                    received_unix_ms: now,
                    streams: vec![stream],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap();
        let c = conditions(&store, &Fleet::default(), &Statuses::default(), &cfg, now);
        assert!(
            c.iter()
                .any(|c| c.kind == "retained_wal" && c.agent == "a1" && c.stream == "person"),
            "{:?}",
            c.iter()
                .map(|c| (c.kind, &c.message.english))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn raised_acknowledged_cleared_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = Alarms::open(dir.path());
        a.apply(1, vec![cond("offline", "a1"), cond("held", "a2")]);
        a.apply(2, vec![cond("offline", "a1"), cond("held", "a2")]);
        assert_eq!(a.list().iter().filter(|x| x.active()).count(), 2);
        a.acknowledge("offline:a1:", "duty", "城东机房断电")
            .unwrap();
        assert!(a.acknowledge("offline:zz:", "duty", "x").is_err());
        a.apply(3, vec![cond("held", "a2")]);
        let l = a.list();
        let off = l.iter().find(|x| x.id == "offline:a1:").unwrap();
        assert_eq!(off.cleared_unix_ms, Some(3));
        assert_eq!(off.acknowledged.as_ref().unwrap().note, "城东机房断电");
        // A restart keeps the book.
        let again = Alarms::open(dir.path());
        assert_eq!(again.list(), l);
    }
}
