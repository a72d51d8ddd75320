//! What the running agent reports about itself: shared by the committer, the
//! shipper and the sources, read by the admin socket (`ferry-agent status`).

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub agent_id: String,
    pub pid: u32,
    pub version: String,
    pub started_unix: u64,
    pub connection: Connection,
    pub buffer: BufferStatus,
    pub streams: Vec<StreamView>,
    /// When the agent's certificate expires, Unix seconds (0 when unreadable).
    #[serde(default)]
    pub cert_not_after_unix: u64,
    /// The `[bandwidth]` cap in force and what it held back.
    #[serde(default)]
    pub bandwidth: crate::bandwidth::BandwidthStatus,
}

/// Warn this long before the agent's certificate expires: re-enrolling takes the
/// exchange operator and the department's IT staff.
pub const CERT_WARN_SECS: u64 = 30 * 24 * 3600;

/// An alarm when the certificate expires within [`CERT_WARN_SECS`] of `now` or
/// has expired.
pub fn cert_alarm(not_after_unix: u64, now_unix: u64) -> Option<String> {
    if not_after_unix == 0 {
        return None;
    }
    let when = humantime_days(not_after_unix.saturating_sub(now_unix));
    if not_after_unix <= now_unix {
        Some("ALARM: the agent's certificate has expired; the exchange refuses it until the agent is enrolled again".into())
    } else if not_after_unix - now_unix <= CERT_WARN_SECS {
        Some(format!(
            "ALARM: the agent's certificate expires in {when}; ask the exchange operator to enrol it again"
        ))
    } else {
        None
    }
}

fn humantime_days(secs: u64) -> String {
    let days = secs / 86_400;
    if days >= 1 {
        format!("{days} day{}", if days == 1 { "" } else { "s" })
    } else {
        format!("{} hours", secs / 3600)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Connection {
    /// `connecting`, `connected` or `disconnected`.
    pub state: String,
    pub exchange: String,
    pub since_unix: u64,
    pub attempts: u64,
    pub last_error: Option<String>,
    /// What carries the connection: `quic`, or `tcp` (TLS 1.3 over TCP) where
    /// UDP is blocked; the last one used while not connected.
    #[serde(default)]
    pub transport: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BufferStatus {
    pub bytes: u64,
    pub max_bytes: u64,
    /// Sources are paused because the buffer reached `max_size`.
    pub full: bool,
    /// Sources are paused because the filesystem of `data_dir` has less than
    /// `[buffer] min_free` left.
    #[serde(default)]
    pub disk_low: bool,
    /// The last buffer write error, if writes are failing now.
    pub write_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamView {
    pub name: String,
    pub kind: String,
    pub catalog_id: String,
    pub sharing: String,
    pub position: String,
    /// Highest seq durable in the buffer.
    pub head_seq: u64,
    /// Highest seq the exchange acknowledged.
    pub acked_seq: u64,
    pub buffered_batches: u64,
    pub buffered_bytes: u64,
    pub source_error: Option<String>,
    pub ship_error: Option<String>,
    /// Seq ranges `[from, to]` lost to buffer damage (recorded by `salvage`) and not
    /// yet acknowledged past.
    #[serde(default)]
    pub lost: Vec<[u64; 2]>,
    /// Figures of the source's durable position (`ferry_adapters::all_gauges`).
    #[serde(default)]
    pub gauges: std::collections::BTreeMap<String, u64>,
}

/// The mutable parts, updated by the tasks that know them.
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    connection: Connection,
    buffer_full: bool,
    disk_low: bool,
    write_error: Option<String>,
    source_errors: std::collections::BTreeMap<String, String>,
    ship_errors: std::collections::BTreeMap<String, String>,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Board {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> Option<R> {
        self.inner.lock().ok().map(|mut g| f(&mut g))
    }

    pub fn connecting(&self, exchange: &str, attempts: u64) {
        self.with(|i| {
            if i.connection.state != "connecting" {
                i.connection.since_unix = now_unix();
            }
            i.connection.state = "connecting".into();
            i.connection.exchange = exchange.to_string();
            i.connection.attempts = attempts;
        });
    }

    pub fn connected(&self, exchange: &str, transport: &str) {
        self.with(|i| {
            i.connection = Connection {
                state: "connected".into(),
                exchange: exchange.to_string(),
                since_unix: now_unix(),
                attempts: 0,
                last_error: None,
                transport: transport.to_string(),
            }
        });
    }

    pub fn disconnected(&self, error: String) {
        self.with(|i| {
            i.connection.state = "disconnected".into();
            i.connection.since_unix = now_unix();
            i.connection.last_error = Some(error);
        });
    }

    pub fn set_buffer_full(&self, full: bool) {
        self.with(|i| i.buffer_full = full);
    }

    pub fn set_disk_low(&self, low: bool) {
        self.with(|i| i.disk_low = low);
    }

    pub fn disk_low(&self) -> bool {
        self.with(|i| i.disk_low).unwrap_or(false)
    }

    pub fn buffer_full(&self) -> bool {
        self.with(|i| i.buffer_full).unwrap_or(false)
    }

    pub fn set_write_error(&self, e: Option<String>) {
        self.with(|i| i.write_error = e);
    }

    pub fn set_source_error(&self, stream: &str, e: Option<String>) {
        self.with(|i| match e {
            Some(e) => {
                i.source_errors.insert(stream.to_string(), e);
            }
            None => {
                i.source_errors.remove(stream);
            }
        });
    }

    pub fn set_ship_error(&self, stream: &str, e: Option<String>) {
        self.with(|i| match e {
            Some(e) => {
                i.ship_errors.insert(stream.to_string(), e);
            }
            None => {
                i.ship_errors.remove(stream);
            }
        });
    }

    /// Fills the parts of a report this board owns.
    pub fn fill(&self, report: &mut AgentStatus) {
        self.with(|i| {
            report.connection = i.connection.clone();
            report.buffer.full = i.buffer_full;
            report.buffer.disk_low = i.disk_low;
            report.buffer.write_error = i.write_error.clone();
            for s in report.streams.iter_mut() {
                s.source_error = i.source_errors.get(&s.name).cloned();
                s.ship_error = i.ship_errors.get(&s.name).cloned();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_near_its_end_raises_an_alarm() {
        let now = 1_800_000_000;
        assert_eq!(cert_alarm(0, now), None);
        assert_eq!(cert_alarm(now + 31 * 86_400, now), None);
        let soon = cert_alarm(now + 12 * 86_400, now).unwrap();
        assert!(soon.contains("expires in 12 days"), "{soon}");
        let hours = cert_alarm(now + 5 * 3600, now).unwrap();
        assert!(hours.contains("expires in 5 hours"), "{hours}");
        let gone = cert_alarm(now - 1, now).unwrap();
        assert!(gone.contains("has expired"), "{gone}");
    }
}
