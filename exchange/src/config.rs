//! `exchange.toml`: typed, unknown keys are errors, relative paths are taken from
//! the file's directory. `ferry-exchange init` writes a complete one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    pub exchange: ExchangeSection,
    pub tls: TlsSection,
    pub store: StoreSection,
    /// What one agent may make the exchange hold, so none can starve the others.
    /// Not written by `init` (the defaults hold; packaging/exchange.toml has them).
    #[serde(default, skip_serializing)]
    pub limits: LimitsSection,
    /// Where stored records go on to (`[[delivery]]`, none by default).
    #[serde(default, rename = "delivery", skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<DeliverySection>,
    /// The fleet dashboard over HTTPS (off unless `listen` is set).
    #[serde(default, skip_serializing_if = "DashboardSection::is_off")]
    pub dashboard: DashboardSection,
    /// Prometheus metrics over plain HTTP (off unless `listen` is set).
    #[serde(default, skip_serializing_if = "MetricsSection::is_off")]
    pub metrics: MetricsSection,
}

/// `[metrics]`: the fleet, the store and the deliveries as Prometheus metrics
/// at `GET /metrics` (`metrics.rs`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `ADDR:PORT` to serve plain HTTP on; unset: no metrics. No TLS and no
    /// login, like the agent's: bind it to a monitoring network or loopback.
    pub listen: Option<String>,
}

impl MetricsSection {
    fn is_off(&self) -> bool {
        self.listen.is_none()
    }
}

/// `[dashboard]`: the fleet at a glance over HTTPS, its JSON API and alarms.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardSection {
    /// `ADDR:PORT` to serve HTTPS on; unset: no dashboard.
    pub listen: Option<String>,
    /// Certificate and key to serve with; unset: the exchange's own
    /// (`[tls] cert`/`key`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// An agent with no open connection for this long is offline (and alarms).
    #[serde(default = "default_offline_after", with = "humantime_serde_lite")]
    pub offline_after: std::time::Duration,
    /// Alarm when a stream's backlog (buffered at the agent, not yet
    /// acknowledged) exceeds this many bytes.
    #[serde(default = "default_backlog_alarm", with = "bytes")]
    pub backlog_alarm: u64,
    /// Alarm when an agent's certificate expires within this.
    #[serde(default = "default_cert_alarm", with = "humantime_serde_lite")]
    pub cert_expiry_alarm: std::time::Duration,
    /// Alarm when a PostgreSQL source's slot retains more WAL than this.
    #[serde(default = "default_wal_alarm", with = "bytes")]
    pub retained_wal_alarm: u64,
    /// Idle web sessions end after this.
    #[serde(default = "default_session_idle", with = "humantime_serde_lite")]
    pub session_idle: std::time::Duration,
    /// `http://` or `https://` URL every raised and cleared alarm is POSTed to,
    /// as JSON (`webhook.rs`); unset: none.
    pub alarm_webhook: Option<String>,
    /// PEM file of the CA that signed an `https://` webhook's certificate;
    /// unset: the public web roots.
    pub alarm_webhook_ca: Option<PathBuf>,
}

impl Default for DashboardSection {
    fn default() -> Self {
        Self {
            listen: None,
            cert: None,
            key: None,
            offline_after: default_offline_after(),
            backlog_alarm: default_backlog_alarm(),
            cert_expiry_alarm: default_cert_alarm(),
            retained_wal_alarm: default_wal_alarm(),
            session_idle: default_session_idle(),
            alarm_webhook: None,
            alarm_webhook_ca: None,
        }
    }
}

impl DashboardSection {
    fn is_off(&self) -> bool {
        self.listen.is_none()
    }
}

fn default_offline_after() -> std::time::Duration {
    std::time::Duration::from_secs(300)
}
fn default_backlog_alarm() -> u64 {
    1 << 30
}
fn default_cert_alarm() -> std::time::Duration {
    std::time::Duration::from_secs(30 * 86_400)
}
fn default_wal_alarm() -> u64 {
    10 << 30
}
fn default_session_idle() -> std::time::Duration {
    std::time::Duration::from_secs(30 * 60)
}

/// One `[[delivery]]`: a subscriber fed every record of the streams it names,
/// each exactly once, with a durable checkpoint per (agent, stream).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySection {
    /// Identifies the delivery (checkpoints, `deliveries`, logs).
    pub name: String,
    /// `files`, `postgres` or `jetstream`.
    pub kind: DeliveryKind,
    /// What it receives: `AGENT/STREAM`, with `*` for either part. A wildcard
    /// matches only `unconditional` streams; a `conditional` stream must be named
    /// exactly (naming it is the approval).
    pub streams: Vec<String>,
    /// `files`: the directory received files are written under, as
    /// `PATH/AGENT/STREAM/<relative path>` (created if missing).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `postgres`: libpq key=value or a postgres:// URL (`sslmode`, `sslrootcert`).
    #[serde(default)]
    pub dsn: Option<String>,
    /// `jetstream`: the server, `nats://HOST:PORT`.
    #[serde(default)]
    pub url: Option<String>,
    /// `jetstream`: the subject template; `{agent}`, `{stream}` and `{delivery}`
    /// are replaced (names escaped into one token each).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// `jetstream`: the JetStream stream holding those subjects (created if
    /// missing).
    #[serde(default = "default_delivery_stream")]
    pub jetstream_stream: String,
    /// `postgres`: a file holding the password (else the DSN's, or none).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `postgres`: the schema the mirror tables are created in.
    #[serde(default)]
    pub schema: Option<String>,
    /// `postgres`: the schema of Ferry's own bookkeeping (checkpoints, table
    /// owners); never the target schema. Default `ferry`.
    #[serde(default = "default_bookkeeping")]
    pub bookkeeping: String,
}

fn default_subject() -> String {
    "ferry.{agent}.{stream}".into()
}

fn default_delivery_stream() -> String {
    "FERRY_DELIVERY".into()
}

fn default_bookkeeping() -> String {
    "ferry".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryKind {
    Files,
    Postgres,
    Jetstream,
}

/// `[limits]`: bounds in bytes and time on what agents may make the exchange
/// hold. An agent over one is slowed (budgets) or disconnected with an error
/// naming the limit; the others go on.
#[derive(Debug, Clone, Deserialize, Serialize)]
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

/// An optional duration as a humantime string.
mod humantime_opt {
    use serde::{Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        super::humantime_serde_lite::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer>(
        v: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::humantime_serde_lite::serialize(v, s),
            None => s.serialize_none(),
        }
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSection {
    /// Address the QUIC endpoint listens on (UDP); the TCP fallback listens on
    /// the same address and port.
    pub listen: String,
    /// The address agents should dial, written into enrolled agents' configs.
    pub public_address: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// The backend: `embedded` (sled and files under `dir`, the default) or
    /// `jetstream` (a NATS JetStream server or cluster, shared by several
    /// exchange nodes).
    #[serde(default = "default_store_kind")]
    pub kind: String,
    /// Directory of the embedded store (sled database and received files), the
    /// admin socket and node-local state.
    pub dir: PathBuf,
    /// Memory the store may use to cache pages, bytes (default 16 MiB: batches
    /// live in segment files, the cache holds the registry, stream states and
    /// the index of batches).
    #[serde(default = "default_cache")]
    pub cache_size: u64,
    /// `embedded`: remove records once every delivery naming their stream has
    /// passed them and they were stored longer ago than this (`"30d"`). Unset
    /// (the default): everything is kept.
    #[serde(
        default,
        with = "humantime_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub retain: Option<std::time::Duration>,
    /// `jetstream`: the server, `nats://HOST:PORT` (or `tls://HOST:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `jetstream`: the server's monitoring endpoint, `http://HOST:PORT`; read at
    /// start to check that JetStream syncs before it acknowledges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<String>,
    /// `jetstream`: a NATS credentials (`.creds`) file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,
    /// `jetstream`: the CA (PEM) that signed the server's certificate, for `tls://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// `jetstream`: the JetStream stream name (also the prefix of its subjects
    /// and key-value buckets). Default `FERRY`.
    #[serde(
        default = "default_jetstream_stream",
        skip_serializing_if = "is_default_stream"
    )]
    pub stream: String,
    /// `jetstream`: replicas of the stream and the buckets (1, 3 or 5).
    #[serde(default = "default_replicas", skip_serializing_if = "is_one")]
    pub replicas: usize,
    /// `jetstream`: start even though the server acknowledges before it syncs
    /// (an alarm is logged at every start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unsynced_acks: bool,
}

impl StoreSection {
    /// An embedded store in `dir`, with every other key at its default.
    pub fn embedded(dir: PathBuf) -> Self {
        Self {
            kind: default_store_kind(),
            dir,
            cache_size: default_cache(),
            retain: None,
            url: None,
            monitor: None,
            credentials: None,
            tls_ca: None,
            stream: default_jetstream_stream(),
            replicas: default_replicas(),
            allow_unsynced_acks: false,
        }
    }
}

impl StoreSection {
    /// Where the records themselves are on this node's disk: `dir` for the
    /// embedded store, `None` for JetStream (only node-local state is in `dir`).
    pub fn local_dir(&self) -> Option<&Path> {
        (self.kind == "embedded").then_some(self.dir.as_path())
    }
}

fn default_store_kind() -> String {
    "embedded".into()
}

fn default_jetstream_stream() -> String {
    "FERRY".into()
}

fn default_replicas() -> usize {
    1
}

fn is_default_stream(s: &str) -> bool {
    s == default_jetstream_stream()
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn default_cache() -> u64 {
    16 << 20
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
    for d in &mut cfg.deliveries {
        for p in [d.path.as_mut(), d.password_file.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
    for p in [
        cfg.store.credentials.as_mut(),
        cfg.store.tls_ca.as_mut(),
        cfg.dashboard.cert.as_mut(),
        cfg.dashboard.key.as_mut(),
        cfg.dashboard.alarm_webhook_ca.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    check_store(&cfg.store).map_err(|e| anyhow::anyhow!("{}: [store] {e}", path.display()))?;
    check_deliveries(&cfg.deliveries).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let d = &cfg.dashboard;
    if let Some(listen) = &d.listen {
        listen.parse::<std::net::SocketAddr>().map_err(|_| {
            anyhow::anyhow!(
                "{}: [dashboard] listen {listen:?} is not an address:port",
                path.display()
            )
        })?;
    }
    if let Some(url) = &d.alarm_webhook {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!(
                "{}: [dashboard] alarm_webhook {url:?} is not an http:// or https:// URL",
                path.display()
            );
        }
    }
    if let Some(listen) = &cfg.metrics.listen {
        listen.parse::<std::net::SocketAddr>().map_err(|_| {
            anyhow::anyhow!(
                "{}: [metrics] listen {listen:?} is not an address:port",
                path.display()
            )
        })?;
    }
    if d.cert.is_some() != d.key.is_some() {
        anyhow::bail!(
            "{}: [dashboard] cert and key go together: set both, or neither for the exchange's own",
            path.display()
        );
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

/// `[store]`: a known kind, and what that kind needs.
fn check_store(s: &StoreSection) -> std::result::Result<(), String> {
    let jetstream_keys = [
        ("url", s.url.is_some()),
        ("monitor", s.monitor.is_some()),
        ("credentials", s.credentials.is_some()),
        ("tls_ca", s.tls_ca.is_some()),
        ("stream", s.stream != default_jetstream_stream()),
        ("replicas", s.replicas != default_replicas()),
        ("allow_unsynced_acks", s.allow_unsynced_acks),
    ];
    match s.kind.as_str() {
        "embedded" => match jetstream_keys.iter().find(|(_, set)| *set) {
            Some((k, _)) => Err(format!(
                "{k} applies to kind = \"jetstream\", not to kind = \"embedded\""
            )),
            None => Ok(()),
        },
        "jetstream" if s.retain.is_some() => Err(
            "retain applies to kind = \"embedded\": a JetStream stream's retention is set on the server (max_age, limits)".into(),
        ),
        "jetstream" => {
            let url = s.url.as_deref().unwrap_or_default();
            if !["nats://", "tls://"].iter().any(|p| url.starts_with(p)) {
                return Err(format!(
                    "kind = \"jetstream\" needs url = \"nats://HOST:PORT\" (or tls://), not {url:?}"
                ));
            }
            let monitor = s.monitor.as_deref().unwrap_or_default();
            if !monitor.starts_with("http://") {
                return Err(format!(
                    "kind = \"jetstream\" needs monitor = \"http://HOST:PORT\" (the server's monitoring endpoint), not {monitor:?}"
                ));
            }
            if s.stream.is_empty()
                || s.stream.len() > 64
                || !s
                    .stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "stream = {:?}: letters, digits, '-' or '_', at most 64",
                    s.stream
                ));
            }
            if ![1, 3, 5].contains(&s.replicas) {
                return Err(format!("replicas = {}: 1, 3 or 5", s.replicas));
            }
            Ok(())
        }
        other => Err(format!(
            "kind = {other:?}: this exchange has the \"embedded\" and \"jetstream\" stores"
        )),
    }
}

/// Each `[[delivery]]` has a unique name, what its kind needs, and stream
/// patterns of the form `AGENT/STREAM`.
fn check_deliveries(ds: &[DeliverySection]) -> std::result::Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for d in ds {
        let at = format!("[[delivery]] {:?}", d.name);
        if d.name.is_empty() || !ferry_protocol::session::valid_stream_name(&d.name) {
            return Err(format!(
                "{at}: name must be letters, digits, '-', '_' or '.'"
            ));
        }
        if !names.insert(d.name.as_str()) {
            return Err(format!("{at}: two deliveries have this name"));
        }
        if d.streams.is_empty() {
            return Err(format!(
                "{at}: streams is empty, so it would receive nothing"
            ));
        }
        for p in &d.streams {
            if crate::delivery::Pattern::parse(p).is_none() {
                return Err(format!(
                    "{at}: stream pattern {p:?} is not AGENT/STREAM (either may be *)"
                ));
            }
        }
        let unused = |k: &str, set: bool| {
            if set {
                Err(format!("{at}: {k} does not apply to kind = {:?}", d.kind))
            } else {
                Ok(())
            }
        };
        match d.kind {
            DeliveryKind::Files => {
                if d.path.is_none() {
                    return Err(format!("{at}: kind = \"files\" needs path = \"DIR\""));
                }
                unused("dsn", d.dsn.is_some())?;
                unused("schema", d.schema.is_some())?;
                unused("password_file", d.password_file.is_some())?;
                unused("url", d.url.is_some())?;
            }
            DeliveryKind::Jetstream => {
                unused("path", d.path.is_some())?;
                unused("dsn", d.dsn.is_some())?;
                unused("schema", d.schema.is_some())?;
                let url = d.url.as_deref().unwrap_or_default();
                if !url.starts_with("nats://") {
                    return Err(format!(
                        "{at}: kind = \"jetstream\" needs url = \"nats://HOST:PORT\", not {url:?}"
                    ));
                }
                if !d.subject.contains("{agent}") || !d.subject.contains("{stream}") {
                    return Err(format!(
                        "{at}: subject {:?} must contain {{agent}} and {{stream}}, so each stream has its own subject",
                        d.subject
                    ));
                }
            }
            DeliveryKind::Postgres => {
                unused("path", d.path.is_some())?;
                let (Some(_), Some(schema)) = (&d.dsn, &d.schema) else {
                    return Err(format!(
                        "{at}: kind = \"postgres\" needs dsn = \"...\" and schema = \"NAME\""
                    ));
                };
                if schema.is_empty() || *schema == d.bookkeeping {
                    return Err(format!(
                        "{at}: schema {schema:?} must be set and differ from the bookkeeping schema {:?}",
                        d.bookkeeping
                    ));
                }
            }
        }
    }
    Ok(())
}

impl ExchangeConfig {
    pub fn admin_socket(&self) -> PathBuf {
        self.store.dir.join("exchange.sock")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The packaged example (`packaging/exchange.toml`) is a valid config, with
    /// its optional sections as documented.
    #[test]
    fn the_packaged_example_parses() {
        let text = include_str!("../../packaging/exchange.toml");
        let cfg: ExchangeConfig = toml::from_str(text).unwrap();
        assert_eq!(
            cfg.dashboard.offline_after,
            std::time::Duration::from_secs(300)
        );
        assert_eq!(cfg.dashboard.backlog_alarm, 1 << 30);
        assert!(cfg.dashboard.listen.is_none());
        assert!(cfg.metrics.listen.is_none());
    }

    fn load_with_store(store: &str) -> Result<ExchangeConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exchange.toml");
        std::fs::write(
            &path,
            format!(
                "[exchange]\nlisten = \"127.0.0.1:7443\"\npublic_address = \"x:7443\"\n\
                 [tls]\nca = \"ca.pem\"\nca_key = \"ca.key\"\ncert = \"e.pem\"\nkey = \"e.key\"\n\
                 [store]\ndir = \"store\"\n{store}"
            ),
        )
        .unwrap();
        load(&path)
    }

    /// `[metrics] listen` is off by default and must be an address:port.
    #[test]
    fn metrics_listen_is_checked() {
        assert!(load_with_store("").unwrap().metrics.listen.is_none());
        let c = load_with_store("[metrics]\nlisten = \"127.0.0.1:9465\"\n").unwrap();
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9465"));
        let e = load_with_store("[metrics]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(e.to_string().contains("[metrics] listen"), "{e}");
    }

    /// `[store] kind = "jetstream"` needs its server and monitor; its keys are
    /// refused on the embedded store; an unknown kind names the known ones.
    #[test]
    fn store_kinds_take_their_own_keys() {
        let c = load_with_store(
            "kind = \"jetstream\"\nurl = \"nats://n:4222\"\nmonitor = \"http://n:8222\"\ncredentials = \"f.creds\"\n",
        )
        .unwrap();
        assert_eq!((c.store.stream.as_str(), c.store.replicas), ("FERRY", 1));
        assert!(c.store.credentials.unwrap().is_absolute());
        let e = load_with_store("kind = \"jetstream\"\nurl = \"nats://n:4222\"\n").unwrap_err();
        assert!(e.to_string().contains("monitor"), "{e}");
        let e = load_with_store("url = \"nats://n:4222\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("url applies to kind = \"jetstream\""),
            "{e}"
        );
        let e = load_with_store(
            "kind = \"jetstream\"\nurl = \"nats://n:4222\"\nmonitor = \"http://n:8222\"\nstream = \"a.b\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("stream = \"a.b\""), "{e}");
        let e = load_with_store("kind = \"postgres\"\n").unwrap_err();
        assert!(e.to_string().contains("\"jetstream\""), "{e}");
        // `init` writes an embedded store without the JetStream keys.
        let written = toml::to_string_pretty(&StoreSection::embedded("store".into())).unwrap();
        assert_eq!(
            written,
            "kind = \"embedded\"\ndir = \"store\"\ncache_size = 16777216\n"
        );
    }
}
