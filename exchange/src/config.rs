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
    Ok(cfg)
}

impl ExchangeConfig {
    pub fn admin_socket(&self) -> PathBuf {
        self.store.dir.join("exchange.sock")
    }
}
