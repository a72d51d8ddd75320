//! `exchange.toml`: typed, unknown keys are errors, relative paths are taken from
//! the file's directory. `ferry-exchange init` writes a complete one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    pub exchange: ExchangeSection,
    pub tls: TlsSection,
    pub store: StoreSection,
    /// What one agent may make the exchange hold, so none can starve the others.
    /// Not written by `init` (the defaults hold; packaging/exchange.toml has them).
    #[serde(default, skip_serializing)]
    pub limits: LimitsSection,
}

/// `[limits]`: bounds in bytes and time on what agents may make the exchange
/// hold. An agent over one is slowed (budgets) or disconnected with an error
/// naming the limit; the others go on.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Open agent connections in all; more are refused until some close.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// QUIC streams one connection may have open at once: one per declared
    /// stream plus the control stream.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// Batches one connection may have received but not yet acknowledged
    /// (frames being read, queued for the store, being stored). Past it the
    /// exchange stops reading that connection until its acks free room.
    /// At least the largest frame (16 MiB).
    #[serde(default = "default_connection_bytes", with = "bytes")]
    pub max_connection_bytes: u64,
    /// The same for all connections together.
    #[serde(default = "default_queued_bytes", with = "bytes")]
    pub max_queued_bytes: u64,
    /// Once a frame's first byte arrived, the rest must follow within this.
    #[serde(default = "default_frame_timeout", with = "humantime_serde_lite")]
    pub frame_timeout: std::time::Duration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_streams_per_connection: default_max_streams(),
            max_connection_bytes: default_connection_bytes(),
            max_queued_bytes: default_queued_bytes(),
            frame_timeout: default_frame_timeout(),
        }
    }
}

fn default_max_connections() -> usize {
    4096
}
fn default_max_streams() -> u32 {
    64
}
fn default_connection_bytes() -> u64 {
    64 << 20
}
fn default_queued_bytes() -> u64 {
    1 << 30
}
fn default_frame_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

/// Byte sizes as an integer or a string with a unit (`"64MiB"`, `"1GiB"`, `"512KiB"`).
mod bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }

    pub fn parse(s: &str) -> Result<u64, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as \"64MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            other => return Err(format!("unknown size unit {other:?} (B, KiB, MiB, GiB)")),
        };
        n.checked_mul(mult)
            .ok_or_else(|| format!("{s:?} is too large"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => parse(&s).map_err(serde::de::Error::custom),
        }
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }
}

/// Durations as humantime strings (`"60s"`, `"2m"`).
mod humantime_serde_lite {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }

    pub fn serialize<S: Serializer>(v: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*v).to_string())
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSection {
    /// UDP address the QUIC endpoint listens on.
    pub listen: String,
    /// The address agents should dial, written into enrolled agents' configs.
    pub public_address: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    /// The CA's private key; only `enroll` reads it. Keep it off the serving host
    /// where policy demands.
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Issued agent certificates, revocations and the revocation list the
    /// endpoint checks (see `trust.rs`).
    #[serde(default = "default_trust_dir")]
    pub trust_dir: PathBuf,
}

fn default_trust_dir() -> PathBuf {
    "trust".into()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Directory of the embedded store (sled database and received files).
    pub dir: PathBuf,
    /// Memory the store may use to cache pages, bytes.
    #[serde(default = "default_cache")]
    pub cache_size: u64,
}

fn default_cache() -> u64 {
    64 << 20
}

pub fn load(path: &Path) -> Result<ExchangeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg: ExchangeConfig = toml::from_str(&text).map_err(|e| {
        let (line, col) = e.span().map_or((0, 0), |s| {
            let before = &text[..s.start.min(text.len())];
            (
                before.matches('\n').count() + 1,
                before
                    .rfind('\n')
                    .map_or(before.len(), |i| before.len() - i - 1)
                    + 1,
            )
        });
        anyhow::anyhow!("{}:{line}:{col}: {}", path.display(), e.message().trim())
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [
        &mut cfg.tls.ca,
        &mut cfg.tls.ca_key,
        &mut cfg.tls.cert,
        &mut cfg.tls.key,
        &mut cfg.tls.trust_dir,
        &mut cfg.store.dir,
    ] {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    let l = &cfg.limits;
    let frame = ferry_protocol::frame::MAX_FRAME as u64;
    if l.max_connection_bytes < frame || l.max_queued_bytes < l.max_connection_bytes {
        anyhow::bail!(
            "{}: [limits] max_connection_bytes ({}) must be at least the largest frame ({frame} bytes), and max_queued_bytes ({}) at least max_connection_bytes",
            path.display(),
            l.max_connection_bytes,
            l.max_queued_bytes
        );
    }
    if l.max_streams_per_connection < 2 || l.max_connections == 0 {
        anyhow::bail!(
            "{}: [limits] max_streams_per_connection must be at least 2 and max_connections at least 1",
            path.display()
        );
    }
    Ok(cfg)
}

impl ExchangeConfig {
    pub fn admin_socket(&self) -> PathBuf {
        self.store.dir.join("exchange.sock")
    }
}
