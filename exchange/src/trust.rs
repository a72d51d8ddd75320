//! Which agent certificates the exchange trusts: every certificate `enroll`
//! issues is kept under `TRUST_DIR/issued/AGENT/SERIAL.pem`; `revoke` adds them to
//! `TRUST_DIR/revocations.json` (who, when, why) and writes the CA-signed list
//! `TRUST_DIR/crl.pem`, which the QUIC endpoint checks in every handshake. A
//! running exchange takes a new list at once (`serve` reloads it when `revoke`
//! asks over the admin socket) and closes the revoked agents' open connections.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferry_transport::pki::{self, PemPair, Reason, Revocation};
use serde::{Deserialize, Serialize};

use crate::config::ExchangeConfig;

/// One revoked certificate, as `revocations.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub agent_id: String,
    pub department: String,
    /// Serial number, hex.
    pub serial: String,
    pub revoked_unix: i64,
    pub reason: String,
}

fn issued_dir(cfg: &ExchangeConfig, agent_id: &str) -> PathBuf {
    cfg.tls.trust_dir.join("issued").join(agent_id)
}

fn registry_path(cfg: &ExchangeConfig) -> PathBuf {
    cfg.tls.trust_dir.join("revocations.json")
}

/// The revocation list the endpoint checks, if anything was ever revoked.
pub fn crl_path(cfg: &ExchangeConfig) -> Option<PathBuf> {
    let p = cfg.tls.trust_dir.join("crl.pem");
    p.exists().then_some(p)
}

/// Keeps a copy of a certificate `enroll` issued, so it can be revoked by agent id.
pub fn record_issued(cfg: &ExchangeConfig, agent_id: &str, cert_pem: &str) -> Result<String> {
    let id = identity(cert_pem)?;
    let dir = issued_dir(cfg, agent_id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomically(&dir.join(format!("{}.pem", id.serial)), cert_pem.as_bytes())?;
    Ok(id.serial)
}

/// Serials of the certificates issued to `agent_id` that are neither revoked nor
/// expired: while one exists, another server enrolled under the same id would
/// ship as the same agent.
pub fn live_certificates(cfg: &ExchangeConfig, agent_id: &str) -> Result<Vec<String>> {
    let revoked: std::collections::HashSet<String> =
        revoked(cfg)?.into_iter().map(|r| r.serial).collect();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut live = Vec::new();
    let dir = issued_dir(cfg, agent_id);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(live);
    };
    for e in entries {
        let path = e?.path();
        if path.extension().is_none_or(|x| x != "pem") {
            continue;
        }
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let id = identity(&pem).with_context(|| format!("{}", path.display()))?;
        if !revoked.contains(&id.serial) && id.not_after_unix > now {
            live.push(id.serial);
        }
    }
    live.sort();
    Ok(live)
}

fn identity(cert_pem: &str) -> Result<pki::CertIdentity> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("not a PEM certificate")?;
    pki::identity_of(&der)
}

/// Every revocation so far.
pub fn revoked(cfg: &ExchangeConfig) -> Result<Vec<Revoked>> {
    let path = registry_path(cfg);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("reading the revocations in {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Revokes every certificate issued to `agent_id` (and `extra`, a certificate
/// file, e.g. one issued before certificates were kept) that is not revoked yet;
/// rewrites the registry and the CRL. Returns what it revoked.
pub fn revoke(
    cfg: &ExchangeConfig,
    agent_id: Option<&str>,
    extra: Option<&Path>,
    reason: Reason,
) -> Result<Vec<Revoked>> {
    let mut certs: Vec<(PathBuf, String)> = Vec::new();
    if let Some(agent) = agent_id {
        let dir = issued_dir(cfg, agent);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries {
                let path = e?.path();
                if path.extension().is_some_and(|x| x == "pem") {
                    let pem = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    certs.push((path, pem));
                }
            }
        }
    }
    if let Some(path) = extra {
        let pem =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        certs.push((path.to_path_buf(), pem));
    }
    if certs.is_empty() {
        bail!(
            "no certificate issued to {:?} is on record in {}; pass the agent's certificate with --cert FILE",
            agent_id.unwrap_or_default(),
            cfg.tls.trust_dir.join("issued").display()
        );
    }
    let mut all = revoked(cfg)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut new = Vec::new();
    for (path, pem) in certs {
        let id = identity(&pem).with_context(|| format!("{}", path.display()))?;
        if let Some(agent) = agent_id {
            if id.agent_id != agent {
                bail!(
                    "{} is {:?}'s certificate, not {agent:?}'s",
                    path.display(),
                    id.agent_id
                );
            }
        }
        if all
            .iter()
            .chain(&new)
            .any(|r: &Revoked| r.serial == id.serial)
        {
            continue;
        }
        new.push(Revoked {
            agent_id: id.agent_id,
            department: id.department,
            serial: id.serial,
            revoked_unix: now,
            reason: reason.as_str().to_string(),
        });
    }
    if new.is_empty() {
        return Ok(new);
    }
    all.extend(new.iter().cloned());
    let ca = PemPair {
        cert_pem: std::fs::read_to_string(&cfg.tls.ca)
            .with_context(|| format!("reading the CA certificate {}", cfg.tls.ca.display()))?,
        key_pem: std::fs::read_to_string(&cfg.tls.ca_key).with_context(|| {
            format!(
                "reading the CA key {} (revoking signs a new list)",
                cfg.tls.ca_key.display()
            )
        })?,
    };
    let list: Vec<Revocation> = all
        .iter()
        .map(|r| Revocation {
            serial: r.serial.clone(),
            revoked_unix: r.revoked_unix,
            reason: Reason::parse(&r.reason).unwrap_or(Reason::Unspecified),
        })
        .collect();
    let crl = pki::crl(&ca, &list, all.len() as u64)?;
    std::fs::create_dir_all(&cfg.tls.trust_dir)
        .with_context(|| format!("creating {}", cfg.tls.trust_dir.display()))?;
    // The registry first: a crash between the two leaves a list that a rerun of
    // `revoke` rewrites, never a CRL naming what the registry does not.
    write_atomically(&registry_path(cfg), &serde_json::to_vec_pretty(&all)?)?;
    write_atomically(&cfg.tls.trust_dir.join("crl.pem"), crl.as_bytes())?;
    Ok(new)
}

/// Writes `path` whole or not at all: a temporary file beside it, synced, renamed
/// over it, the directory synced.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
