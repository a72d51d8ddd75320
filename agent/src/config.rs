//! The agent's configuration: one TOML file, typed, every key documented in
//! `packaging/agent.toml`. Unknown keys are errors; every error names the file,
//! line and column.

use std::path::{Path, PathBuf};

use ferry_adapters::{Size, SourceConfig};
use ferry_protocol::messages::Sharing;
use ferry_protocol::session::valid_stream_name;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub agent: AgentSection,
    pub exchange: ExchangeSection,
    #[serde(default)]
    pub buffer: BufferSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// A cap on what is sent to the exchange, optionally by schedule.
    #[serde(default)]
    pub bandwidth: crate::bandwidth::BandwidthSection,
    #[serde(default, rename = "stream")]
    pub streams: Vec<StreamConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `address:port` to serve Prometheus metrics on (`GET /metrics`); off when unset.
    pub listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Must equal the CN of the agent certificate.
    pub id: String,
    pub department: String,
    pub data_dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSection {
    /// `host:port` of the exchange.
    pub address: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to verify in the exchange's certificate; defaults to the host of `address`.
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferSection {
    /// Bound on buffered (compressed) data; sources pause when it is reached.
    #[serde(default = "default_max_size")]
    pub max_size: Size,
    /// Memory the buffer may use to cache its pages.
    #[serde(default = "default_cache_size")]
    pub cache_size: Size,
    /// Free space to leave on the filesystem of `data_dir`: below it sources pause
    /// as when the buffer is full, before a write can fail for want of space.
    #[serde(default = "default_min_free")]
    pub min_free: Size,
}

fn default_max_size() -> Size {
    Size(2 << 30)
}

fn default_cache_size() -> Size {
    Size(8 << 20)
}

fn default_min_free() -> Size {
    Size(64 << 20)
}

impl Default for BufferSection {
    fn default() -> Self {
        Self {
            max_size: default_max_size(),
            cache_size: default_cache_size(),
            min_free: default_min_free(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: Spanned<String>,
    pub catalog_id: String,
    pub sharing: Spanned<String>,
    pub source: Spanned<SourceConfig>,
}

impl StreamConfig {
    pub fn name(&self) -> &str {
        self.name.get_ref()
    }

    /// Only valid after [`load`] checked it.
    pub fn sharing(&self) -> Sharing {
        Sharing::from_config(self.sharing.get_ref()).unwrap_or(Sharing::Unspecified)
    }

    pub fn source(&self) -> &SourceConfig {
        self.source.get_ref()
    }
}

/// A configuration error, displayed as `FILE:LINE:COLUMN: message`.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// How to treat what this host must provide (certificate files, source folders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// `run`: the agent cannot work without them; they are errors.
    Required,
    /// `check-config`: report them as warnings, so a configuration can be checked
    /// before it is deployed (and the packaged example passes).
    Advisory,
}

/// The loaded configuration, its digest, and host warnings (in [`Host::Advisory`]).
#[derive(Debug)]
pub struct Loaded {
    pub config: AgentConfig,
    pub warnings: Vec<ConfigError>,
    /// SHA-256 of the file, hex; sent in `Hello` so the exchange sees config drift.
    pub digest: String,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

/// Reads, parses and checks the configuration. Relative paths in `[agent]` and
/// `[exchange]` are taken relative to the file's directory.
pub fn load(path: &Path, host: Host) -> Result<Loaded, ConfigError> {
    let err_at = |text: &str, offset: usize, message: String| {
        let (line, column) = line_col(text, offset);
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            message,
        }
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message: format!("cannot read the configuration: {e}"),
    })?;
    let mut config: AgentConfig = toml::from_str(&text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        err_at(&text, offset, e.message().trim().to_string())
    })?;
    // Where `key = ...` is assigned (not where the word appears in a comment).
    let key_offset = |key: &str| {
        let key = key.trim_end_matches(" =");
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            let t = line.trim_start();
            if t.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
            {
                return offset + (line.len() - t.len());
            }
            offset += line.len();
        }
        0
    };

    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    resolve(&mut config.agent.data_dir);
    resolve(&mut config.exchange.ca);
    resolve(&mut config.exchange.cert);
    resolve(&mut config.exchange.key);

    if let Some(l) = &config.metrics.listen {
        if l.get_ref().parse::<std::net::SocketAddr>().is_err() {
            return Err(err_at(
                &text,
                l.span().start,
                format!(
                    "metrics.listen {:?} is not an address with a port, e.g. \"127.0.0.1:9464\"",
                    l.get_ref()
                ),
            ));
        }
    }
    if let Err((offset, message)) = config.bandwidth.schedule(0) {
        return Err(err_at(&text, offset, message));
    }
    if config.agent.id.is_empty() {
        return Err(err_at(&text, key_offset("id"), "agent.id is empty".into()));
    }
    if config.exchange.address.rsplit_once(':').is_none() {
        return Err(err_at(
            &text,
            key_offset("address"),
            format!(
                "exchange.address {:?} needs a port, e.g. \"exchange.example.gov.cn:7443\"",
                config.exchange.address
            ),
        ));
    }
    let mut warnings = Vec::new();
    let mut host_problem = |e: ConfigError| match host {
        Host::Required => Err(e),
        Host::Advisory => {
            warnings.push(e);
            Ok(())
        }
    };
    let mut certs_readable = true;
    for (key, file) in [
        ("ca", &config.exchange.ca),
        ("cert", &config.exchange.cert),
        ("key", &config.exchange.key),
    ] {
        if let Err(e) = std::fs::File::open(file) {
            certs_readable = false;
            host_problem(err_at(
                &text,
                key_offset(&format!("{key} =")),
                format!("exchange.{key}: cannot read {}: {e}", file.display()),
            ))?;
        }
    }
    let identity = if certs_readable {
        ferry_transport::tls::identity_in_file(&config.exchange.cert)
    } else {
        Err(anyhow::anyhow!("unreadable"))
    };
    match identity {
        Ok(id) if id.agent_id != config.agent.id => {
            return Err(err_at(
                &text,
                key_offset("id"),
                format!(
                    "agent.id {:?} does not match the certificate {} (issued to {:?})",
                    config.agent.id,
                    config.exchange.cert.display(),
                    id.agent_id
                ),
            ))
        }
        Ok(id) if id.department != config.agent.department => {
            return Err(err_at(
                &text,
                key_offset("department"),
                format!(
                    "agent.department {:?} does not match the certificate {} (issued for {:?})",
                    config.agent.department,
                    config.exchange.cert.display(),
                    id.department
                ),
            ))
        }
        Ok(_) => {}
        Err(_) if !certs_readable => {}
        Err(e) => {
            return Err(err_at(
                &text,
                key_offset("cert ="),
                format!("exchange.cert: {e:#}"),
            ))
        }
    }

    let mut names = std::collections::BTreeSet::new();
    for s in &config.streams {
        let name_at = s.name.span().start;
        if !valid_stream_name(s.name()) {
            return Err(err_at(
                &text,
                name_at,
                format!(
                    "stream name {:?} must be 1-128 characters of letters, digits, '.', '_' or '-'",
                    s.name()
                ),
            ));
        }
        if !names.insert(s.name().to_string()) {
            return Err(err_at(
                &text,
                name_at,
                format!("stream {:?} is defined twice", s.name()),
            ));
        }
        if s.catalog_id.trim().is_empty() {
            return Err(err_at(
                &text,
                name_at,
                format!("stream {:?}: catalog_id is empty", s.name()),
            ));
        }
        match Sharing::from_config(s.sharing.get_ref()) {
            None => {
                return Err(err_at(
                    &text,
                    s.sharing.span().start,
                    format!(
                        "stream {:?}: sharing {:?} is not one of \"unconditional\", \"conditional\", \"not-shared\"",
                        s.name(),
                        s.sharing.get_ref()
                    ),
                ))
            }
            Some(Sharing::NotShared) => {
                return Err(err_at(
                    &text,
                    s.sharing.span().start,
                    format!(
                        "stream {:?} is classified not-shared (不予共享): its data must never leave this server, so the agent refuses to ship it; remove the stream or correct its classification",
                        s.name()
                    ),
                ))
            }
            Some(_) => {}
        }
        if let Err(e) = s.source().validate() {
            return Err(err_at(
                &text,
                s.source.span().start,
                format!("stream {:?}: {e}", s.name()),
            ));
        }
        if let Err(e) = s.source().check_environment() {
            host_problem(err_at(
                &text,
                s.source.span().start,
                format!("stream {:?}: {e}", s.name()),
            ))?;
        }
    }

    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    Ok(Loaded {
        config,
        warnings,
        digest,
    })
}

impl AgentConfig {
    /// The name to expect in the exchange's certificate.
    pub fn server_name(&self) -> String {
        if let Some(n) = &self.exchange.server_name {
            return n.clone();
        }
        let host = self
            .exchange
            .address
            .rsplit_once(':')
            .map_or(self.exchange.address.as_str(), |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    }

    /// Where to serve metrics, if anywhere (checked by [`load`]).
    pub fn metrics_listen(&self) -> Option<std::net::SocketAddr> {
        self.metrics.listen.as_ref()?.get_ref().parse().ok()
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.agent.data_dir.join("agent.sock")
    }

    pub fn buffer_dir(&self) -> PathBuf {
        self.agent.data_dir.join("buffer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/agent.toml"
        ))
        .unwrap()
    }

    fn check(text: &str) -> Result<Loaded, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        load(&path, Host::Advisory)
    }

    #[test]
    fn packaged_example_is_accepted_with_host_warnings_only() {
        let loaded = check(&example()).unwrap();
        assert_eq!(loaded.config.streams.len(), 3);
        assert_eq!(loaded.config.buffer.max_size, Size(2 << 30));
        // Certificates, the outbox and the database password file do not exist on
        // the build machine.
        assert_eq!(loaded.warnings.len(), 5, "{:?}", loaded.warnings);
        let strict = {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, example()).unwrap();
            load(&path, Host::Required).unwrap_err()
        };
        assert!(strict.message.contains("/etc/ferry/ca.pem"), "{strict}");
    }

    #[test]
    fn errors_name_line_and_column() {
        let text = example().replace("[agent]\n", "[agent]\ncolour = \"red\"\n");
        let e = check(&text).unwrap_err();
        let line = text.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
        assert_eq!((e.line, e.column), (line, 1), "{e}");
        assert!(e.message.contains("unknown field `colour`"), "{e}");

        let e = check(&example().replace("max_size = \"2GiB\"", "max_size = true")).unwrap_err();
        assert!(
            e.message.contains("max_size") || e.message.contains("invalid type"),
            "{e}"
        );
        assert!(e.line > 1);

        let e = check(&example().replace("max_size = \"2GiB\"", "max_size = \"2 parsecs\""))
            .unwrap_err();
        assert!(e.message.contains("unknown unit"), "{e}");

        let on = example().replace(
            "# listen = \"127.0.0.1:9464\"",
            "listen = \"127.0.0.1:9464\"",
        );
        let loaded = check(&on).unwrap();
        assert_eq!(
            loaded.config.metrics_listen(),
            Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        let bad = on.replace("\"127.0.0.1:9464\"", "\"localhost\"");
        let e = check(&bad).unwrap_err();
        let line = bad.lines().position(|l| l.starts_with("listen")).unwrap() + 1;
        assert_eq!((e.line, e.column), (line, 10), "{e}");
        assert!(e.message.contains("metrics.listen \"localhost\""), "{e}");
    }

    #[test]
    fn not_shared_streams_are_refused() {
        let text = example().replacen("sharing = \"conditional\"", "sharing = \"not-shared\"", 1);
        let e = check(&text).unwrap_err();
        assert!(e.message.contains("not-shared"), "{e}");
        let line = text
            .lines()
            .position(|l| l.contains("\"not-shared\""))
            .unwrap()
            + 1;
        assert_eq!(e.line, line);
    }

    #[test]
    fn line_and_column() {
        let t = "a\nbc\ndef";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 2));
        assert_eq!(line_col(t, 7), (3, 3));
    }
}
