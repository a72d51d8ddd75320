//! The dashboard as a user's browser reaches it: HTTPS with the exchange's CA,
//! `POST /api/login`, then the session cookie on every request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// Where the dashboard is and who logs in.
pub struct Login {
    pub base: String,
    pub ca: PathBuf,
    pub user: String,
    pub password: String,
}

/// The dashboard's answer times, ms.
#[derive(Default)]
pub struct Timings {
    pub overview: Vec<f64>,
    pub agents: Vec<f64>,
    pub page: Vec<f64>,
    /// Requests that ended after the load's window.
    pub after_load: usize,
    pub last_overview: Value,
}

pub fn https_agent(ca: &Path) -> Result<ureq::Agent> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading {}", ca.display()))?
    {
        roots
            .add(c.with_context(|| format!("parsing {}", ca.display()))?)
            .with_context(|| format!("the CA in {} is not usable", ca.display()))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(ureq::AgentBuilder::new()
        .tls_config(Arc::new(tls))
        .timeout(Duration::from_secs(60))
        .build())
}

/// Logs in, then times `n` rounds of `GET /api/overview`, `GET /api/agents`
/// and `GET /` (one after another, on one kept-alive connection as a browser's).
pub fn probe(login: &Login, n: usize, load_end: Instant) -> Result<Timings> {
    let agent = https_agent(&login.ca)?;
    let r = agent
        .post(&format!("{}/api/login", login.base))
        .send_json(json!({"name": login.user, "password": login.password}))
        .with_context(|| format!("logging in to {} as {}", login.base, login.user))?;
    let cookie = r
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .context("the login answer set no session cookie")?
        .to_string();
    let get = |path: &str| -> Result<(f64, Vec<u8>)> {
        let t = Instant::now();
        let r = agent
            .get(&format!("{}{path}", login.base))
            .set("Cookie", &cookie)
            .call()
            .with_context(|| format!("GET {path}"))?;
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut r.into_reader(), &mut body)
            .with_context(|| format!("reading the answer to GET {path}"))?;
        Ok((t.elapsed().as_secs_f64() * 1000.0, body))
    };
    let mut t = Timings::default();
    for _ in 0..n {
        let (ms, body) = get("/api/overview")?;
        t.overview.push(ms);
        t.last_overview = serde_json::from_slice(&body).unwrap_or(Value::Null);
        t.agents.push(get("/api/agents")?.0);
        t.page.push(get("/")?.0);
        if Instant::now() > load_end {
            t.after_load += 1;
        }
    }
    Ok(t)
}

/// Nearest-rank percentile.
pub fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}
