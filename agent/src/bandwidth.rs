//! `[bandwidth]`: a cap on what the agent sends to the exchange, optionally by
//! schedule, so a district's link stays usable in office hours.
//!
//! ```toml
//! [bandwidth]
//! limit = "10MB"                 # per second, outside every window; unset: no cap
//! [[bandwidth.schedule]]
//! days = "mon-fri"               # "mon-fri", "sat,sun", "*"
//! from = "08:00"                 # local time, to "18:00" (exclusive); may wrap midnight
//! to = "18:00"
//! limit = "2MB"                  # or "unlimited"
//! ```
//!
//! The first window that holds the local time gives the cap, else `limit`. The
//! cap counts the bytes of the batches the agent sends (compressed, as they go
//! on the wire, less QUIC's framing). It is enforced with a GCRA limiter
//! (`governor`, in KiB cells, a second's worth of burst); a batch larger than
//! the burst waits for it piece by piece. The cap in force and the time spent
//! held back are in `status` and the metrics.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A cap: bytes per second, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<u64>);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim() == "unlimited" {
            return Ok(Limit(None));
        }
        let per = s.trim().trim_end_matches("/s");
        let bytes = ferry_adapters::parse_size(per).map_err(serde::de::Error::custom)?;
        if bytes < 1024 {
            return Err(serde::de::Error::custom(format!(
                "{s:?}: a cap below 1KB per second would stall the agent; use at least \"1KB\""
            )));
        }
        Ok(Limit(Some(bytes)))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthSection {
    /// The cap outside every window (per second); unset: none.
    pub limit: Option<Limit>,
    #[serde(default)]
    pub schedule: Vec<WindowConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub days: Spanned<String>,
    pub from: Spanned<String>,
    pub to: Spanned<String>,
    pub limit: Limit,
}

/// A parsed window: days of the week (Monday = 0) and minutes of the day.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    days: [bool; 7],
    from: u32,
    to: u32,
    limit: Option<u64>,
    text: String,
}

/// The schedule, in the host's local time.
#[derive(Debug, Clone)]
pub struct Schedule {
    default: Option<u64>,
    windows: Vec<Window>,
    /// Seconds east of UTC, read at start.
    offset_secs: i64,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> Result<usize, String> {
    DAYS.iter()
        .position(|d| *d == s.trim().to_ascii_lowercase())
        .ok_or_else(|| format!("{s:?} is not a day: mon, tue, wed, thu, fri, sat or sun"))
}

fn days(s: &str) -> Result<[bool; 7], String> {
    let mut out = [false; 7];
    if s.trim() == "*" {
        return Ok([true; 7]);
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    out[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => out[day(part)?] = true,
        }
    }
    Ok(out)
}

fn minutes(s: &str) -> Result<u32, String> {
    let bad =
        || format!("{s:?} is not a time of day like \"08:00\" (24:00 for midnight at the end)");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl BandwidthSection {
    /// The schedule, or the first bad key with its byte offset in the file.
    pub fn schedule(&self, offset_secs: i64) -> Result<Schedule, (usize, String)> {
        let mut windows = Vec::new();
        for w in &self.schedule {
            let d = days(w.days.get_ref())
                .map_err(|e| (w.days.span().start, format!("bandwidth.schedule days: {e}")))?;
            let from = minutes(w.from.get_ref())
                .map_err(|e| (w.from.span().start, format!("bandwidth.schedule from: {e}")))?;
            let to = minutes(w.to.get_ref())
                .map_err(|e| (w.to.span().start, format!("bandwidth.schedule to: {e}")))?;
            if from == to {
                return Err((
                    w.to.span().start,
                    "bandwidth.schedule: from and to are the same time; the window would be empty"
                        .into(),
                ));
            }
            windows.push(Window {
                days: d,
                from,
                to,
                limit: w.limit.0,
                text: format!(
                    "{} {}–{}",
                    w.days.get_ref(),
                    w.from.get_ref(),
                    w.to.get_ref()
                ),
            });
        }
        Ok(Schedule {
            default: self.limit.and_then(|l| l.0),
            windows,
            offset_secs,
        })
    }
}

impl Schedule {
    /// The cap at Unix time `unix_secs`, and the rule that gives it.
    pub fn cap_at(&self, unix_secs: i64) -> (Option<u64>, String) {
        let local = unix_secs + self.offset_secs;
        let minute = (local.rem_euclid(86_400) / 60) as u32;
        // 1970-01-01 was a Thursday (Monday = 0: 3).
        let weekday = ((local.div_euclid(86_400) + 3).rem_euclid(7)) as usize;
        for w in &self.windows {
            let inside = if w.from < w.to {
                w.days[weekday] && minute >= w.from && minute < w.to
            } else {
                // Wraps midnight: the evening belongs to the day it starts on.
                (w.days[weekday] && minute >= w.from)
                    || (w.days[(weekday + 6) % 7] && minute < w.to)
            };
            if inside {
                return (w.limit, w.text.clone());
            }
        }
        (self.default, "limit".into())
    }
}

/// What `status` shows of the cap.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BandwidthStatus {
    /// Bytes per second; `None`: no cap now.
    pub cap_bytes_per_second: Option<u64>,
    /// The rule in force: a schedule window, or `limit`.
    pub rule: String,
    /// Bytes charged against a cap since the start (on the wire over QUIC; 0
    /// while no cap was in force).
    pub sent_bytes: u64,
    /// Time spent waiting for the cap since the start, seconds.
    pub held_back_seconds: f64,
}

/// The limiter the shipper sends through.
pub struct Throttle {
    schedule: Schedule,
    current: Mutex<(
        Option<u64>,
        String,
        Option<std::sync::Arc<DefaultDirectRateLimiter>>,
    )>,
    sent: AtomicU64,
    held_ns: AtomicU64,
    /// (connection, bytes charged on it): the wire counter plus what was
    /// charged and written but not on the wire yet.
    charged: Mutex<(usize, u64)>,
    /// Bytes sent but not yet charged: less than one [`UNIT`].
    uncharged: AtomicU64,
}

/// The limiter counts in units of this many bytes. What is sent is charged
/// whole units at a time, the rest carried to the next charge: rounding each
/// charge up made the agent send measurably less than its cap (up to a unit
/// per charge).
const UNIT: u64 = 256;

impl Throttle {
    pub fn new(schedule: Schedule) -> Throttle {
        Throttle {
            schedule,
            current: Mutex::new((None, "limit".into(), None)),
            sent: AtomicU64::new(0),
            held_ns: AtomicU64::new(0),
            charged: Mutex::new((0, 0)),
            uncharged: AtomicU64::new(0),
        }
    }

    fn limiter(
        &self,
    ) -> (
        Option<u64>,
        Option<std::sync::Arc<DefaultDirectRateLimiter>>,
    ) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (cap, rule) = self.schedule.cap_at(now);
        let Ok(mut cur) = self.current.lock() else {
            return (None, None);
        };
        if cur.0 != cap || cur.2.is_none() && cap.is_some() {
            let limiter = cap.and_then(|c| {
                let units = NonZeroU32::new(u32::try_from((c / UNIT).max(1)).unwrap_or(u32::MAX))?;
                Some(std::sync::Arc::new(RateLimiter::direct(Quota::per_second(
                    units,
                ))))
            });
            *cur = (cap, rule, limiter);
        } else {
            cur.1 = rule;
        }
        (cur.0, cur.2.clone())
    }

    /// What the cap is charged for a piece of `n` bytes about to be written
    /// on connection `conn`, whose wire counter reads `wire` (`None`: a
    /// transport without one, charged what is written).
    ///
    /// The piece is charged before it is written, so writes cannot run ahead
    /// of the cap into the transport's buffers: charged after the fact, from
    /// the wire counter alone, a writer whose data the transport had not sent
    /// yet was charged nothing, filled megabytes of send buffer, and the
    /// transport then sent them at line rate. What the wire carried beyond
    /// what was charged (packet headers, acknowledgements, retransmissions) is
    /// added to the next charge.
    pub fn charge_piece(&self, conn: usize, wire: Option<u64>, n: u64) -> u64 {
        let Some(wire) = wire else {
            return n;
        };
        let Ok(mut c) = self.charged.lock() else {
            return n;
        };
        let before = if c.0 == conn { c.1 } else { 0 };
        let after = before.max(wire) + n;
        *c = (conn, after);
        after - before
    }

    /// Bytes charged on connection `conn`, whose wire counter reads `wire`,
    /// that the wire has not carried yet.
    pub fn ahead_of_wire(&self, conn: usize, wire: u64) -> u64 {
        match self.charged.lock() {
            Ok(c) if c.0 == conn => c.1.saturating_sub(wire),
            _ => 0,
        }
    }

    /// How far charged bytes may run ahead of the wire before the writer
    /// waits for the transport: a tenth of a second of the cap in force, at
    /// least `piece`. A transport held back (congestion or flow control)
    /// then releases at most this much at once when it opens again.
    pub fn slack(&self, piece: u64) -> u64 {
        self.limiter()
            .0
            .map_or(u64::MAX, |cap| (cap / 10).max(piece))
    }

    /// Whether a cap is in force now.
    pub fn capped(&self) -> bool {
        self.limiter().0.is_some()
    }

    /// Waits until `bytes` may be sent under the cap in force.
    pub async fn take(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        let (cap, Some(limiter)) = self.limiter() else {
            return;
        };
        let burst = u32::try_from(cap.map_or(1, |c| (c / UNIT).max(1))).unwrap_or(u32::MAX);
        let owed = self.uncharged.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        let whole = owed / UNIT;
        self.uncharged.fetch_sub(whole * UNIT, Ordering::Relaxed);
        let mut units = u32::try_from(whole).unwrap_or(u32::MAX);
        let started = Instant::now();
        while units > 0 {
            let n = units.min(burst);
            if let Some(n) = NonZeroU32::new(n) {
                if limiter.until_n_ready(n).await.is_err() {
                    break;
                }
            }
            units -= n;
        }
        let waited = started.elapsed();
        if waited > Duration::from_millis(1) {
            self.held_ns
                .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    pub fn status(&self) -> BandwidthStatus {
        let (cap, _) = self.limiter();
        let rule = self.current.lock().map(|c| c.1.clone()).unwrap_or_default();
        BandwidthStatus {
            cap_bytes_per_second: cap,
            rule,
            sent_bytes: self.sent.load(Ordering::Relaxed),
            held_back_seconds: self.held_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

static LOCAL_OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();

/// Reads the host's offset from UTC. Call before any thread starts: later the
/// read is refused on Unix (another thread may change the environment).
pub fn read_local_offset() {
    let secs = time::UtcOffset::current_local_offset().map_or(0, |o| i64::from(o.whole_seconds()));
    let _ = LOCAL_OFFSET.set(secs);
}

/// The offset [`read_local_offset`] read (UTC if it was not read).
pub fn local_offset_secs() -> i64 {
    LOCAL_OFFSET.get().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(toml_text: &str, offset: i64) -> Schedule {
        #[derive(Deserialize)]
        struct T {
            bandwidth: BandwidthSection,
        }
        let t: T = toml::from_str(toml_text).unwrap();
        t.bandwidth.schedule(offset).unwrap()
    }

    #[test]
    fn windows_by_local_time() {
        let s = sched(
            r#"
            [bandwidth]
            limit = "10MB"
            [[bandwidth.schedule]]
            days = "mon-fri"
            from = "08:00"
            to = "18:00"
            limit = "2MB"
            [[bandwidth.schedule]]
            days = "sat,sun"
            from = "22:00"
            to = "06:00"
            limit = "unlimited"
            "#,
            8 * 3600,
        );
        // 2026-12-07 00:00 in UTC+8 (a Monday) is 1796572800.
        let monday = 1_796_572_800;
        let monday_0930 = monday + 9 * 3600 + 1800;
        assert_eq!(s.cap_at(monday_0930).0, Some(2_000_000));
        assert_eq!(
            s.cap_at(monday_0930 + 9 * 3600).0,
            Some(10_000_000),
            "18:30"
        );
        // Sunday 23:00 and Monday 05:00 (the window that began Sunday).
        let sunday_2300 = monday - 3600;
        assert_eq!(s.cap_at(sunday_2300).0, None);
        assert_eq!(s.cap_at(sunday_2300 + 6 * 3600).0, None, "Monday 05:00");
        assert_eq!(
            s.cap_at(sunday_2300 + 7 * 3600).0,
            Some(10_000_000),
            "Monday 06:00"
        );
    }

    #[test]
    fn bad_keys_are_named() {
        #[derive(Deserialize)]
        struct T {
            bandwidth: BandwidthSection,
        }
        for (text, want) in [
            (
                "days = \"mon-fry\"\nfrom = \"08:00\"\nto = \"18:00\"\nlimit = \"2MB\"",
                "days",
            ),
            (
                "days = \"*\"\nfrom = \"8\"\nto = \"18:00\"\nlimit = \"2MB\"",
                "from",
            ),
            (
                "days = \"*\"\nfrom = \"08:00\"\nto = \"25:00\"\nlimit = \"2MB\"",
                "to",
            ),
        ] {
            let t: T =
                toml::from_str(&format!("[bandwidth]\n[[bandwidth.schedule]]\n{text}")).unwrap();
            let (_, e) = t.bandwidth.schedule(0).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!(toml::from_str::<T>("[bandwidth]\nlimit = \"10\"").is_err());
    }

    /// Sent in pieces of a datagram's size, the rate is the cap, not less:
    /// each piece used to be charged rounded up to a whole KiB (1,500 bytes
    /// as 2,048: a third under the cap).
    #[tokio::test]
    async fn small_pieces_are_charged_what_they_are() {
        let t = Throttle::new(sched("[bandwidth]\nlimit = \"200KB\"", 0));
        // The limiter's first second is a burst: spend it.
        t.take(200_000).await;
        let started = Instant::now();
        for _ in 0..133 {
            t.take(1500).await;
        }
        let took = started.elapsed().as_secs_f64();
        // 199,500 bytes at 200,000 bytes/s.
        assert!((0.85..1.25).contains(&took), "{took}");
    }

    #[tokio::test]
    async fn the_cap_holds() {
        let t = Throttle::new(sched("[bandwidth]\nlimit = \"512KB\"", 0));
        let started = Instant::now();
        // A second's burst, then 1 MB more at 500 KiB/s: about 2 s.
        for _ in 0..24 {
            t.take(64 << 10).await;
        }
        let took = started.elapsed().as_secs_f64();
        assert!((1.5..4.0).contains(&took), "{took}");
        let st = t.status();
        assert_eq!(st.cap_bytes_per_second, Some(512_000));
        assert!(st.held_back_seconds > 1.0, "{st:?}");
    }
}
