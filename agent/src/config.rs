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
    #[serde(default, rename = "stream")]
    pub streams: Vec<StreamConfig>,
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
}

fn default_max_size() -> Size {
    Size(2 << 30)
}

fn default_cache_size() -> Size {
    Size(8 << 20)
}

impl Default for BufferSection {
    fn default() -> Self {
        Self {
            max_size: default_max_size(),
            cache_size: default_cache_size(),
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

/// The loaded configuration with the file it came from and its digest.
#[derive(Debug)]
pub struct Loaded {
    pub config: AgentConfig,
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
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
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
    let key_offset = |key: &str| text.find(key).unwrap_or(0);

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
    for (key, file) in [
        ("ca", &config.exchange.ca),
        ("cert", &config.exchange.cert),
        ("key", &config.exchange.key),
    ] {
        if let Err(e) = std::fs::metadata(file) {
            return Err(err_at(
                &text,
                key_offset(&format!("{key} =")),
                format!("exchange.{key}: cannot read {}: {e}", file.display()),
            ));
        }
    }
    match ferry_transport::tls::identity_in_file(&config.exchange.cert) {
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
    }

    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    Ok(Loaded { config, digest })
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

    #[test]
    fn line_and_column() {
        let t = "a\nbc\ndef";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 2));
        assert_eq!(line_col(t, 7), (3, 3));
    }
}
