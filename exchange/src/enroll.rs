//! `init` (the exchange's CA, certificate and config) and `enroll` (an agent's key,
//! certificate and starter config).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferry_protocol::session::valid_stream_name;
use ferry_transport::pki::{self, PemPair};

use crate::config::{self, ExchangeConfig, ExchangeSection, StoreSection, TlsSection};

/// Writes a file that must not be readable by others (keys) or any file, refusing
/// to overwrite.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// `store_dir` goes into the config as given: a relative one is relative to `dir`.
pub fn init(dir: &Path, store_dir: &Path, names: &[String], listen: &str) -> Result<()> {
    let config_path = dir.join("exchange.toml");
    if config_path.exists() {
        return init_with_config(&config_path, names);
    }
    let listen_addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?} is not an address:port"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names: Vec<String> = if names.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        names.to_vec()
    };
    let ca = pki::create_ca("Ferry exchange CA")?;
    let server = pki::issue_server(&ca, &names)?;
    write_new(&dir.join("ca.pem"), &ca.cert_pem, 0o644)?;
    write_new(&dir.join("ca.key"), &ca.key_pem, 0o600)?;
    write_new(&dir.join("exchange.pem"), &server.cert_pem, 0o644)?;
    write_new(&dir.join("exchange.key"), &server.key_pem, 0o600)?;
    let cfg = ExchangeConfig {
        exchange: ExchangeSection {
            listen: listen.to_string(),
            public_address: format!("{}:{}", names[0], listen_addr.port()),
        },
        tls: TlsSection {
            ca: "ca.pem".into(),
            ca_key: "ca.key".into(),
            cert: "exchange.pem".into(),
            key: "exchange.key".into(),
            trust_dir: "trust".into(),
        },
        store: StoreSection::embedded(store_dir.to_path_buf()),
        limits: Default::default(),
        deliveries: Vec::new(),
        dashboard: Default::default(),
        metrics: Default::default(),
    };
    let text = format!(
        "# Ferry exchange configuration, written by `ferry-exchange init`.\n\
         # Every key is explained in packaging/exchange.toml. Relative paths are\n\
         # relative to this file's directory.\n\n{}",
        toml::to_string_pretty(&cfg)?
    );
    write_new(&config_path, &text, 0o644)?;
    println!("exchange initialised in {}", dir.display());
    println!("  CA certificate:       {}", dir.join("ca.pem").display());
    println!(
        "  server certificate:   {} (names: {})",
        dir.join("exchange.pem").display(),
        names.join(", ")
    );
    println!("  configuration:        {}", config_path.display());
    println!("  store:                {}", dir.join(store_dir).display());
    println!(
        "next: ferry-exchange serve --config {}",
        config_path.display()
    );
    Ok(())
}

/// `init` where `exchange.toml` is already in place (the packages install the
/// documented example as /etc/ferry/exchange.toml): creates the CA and the
/// server certificate at the paths its `[tls]` names and keeps the file as it
/// is (`--listen` and `--store-dir` are not applied: the file says). Refuses
/// when any of those files exists: an existing exchange's CA is never replaced.
fn init_with_config(config_path: &Path, names: &[String]) -> Result<()> {
    let cfg = config::load(config_path)?;
    let tls = &cfg.tls;
    for p in [&tls.ca, &tls.ca_key, &tls.cert, &tls.key] {
        if p.exists() {
            bail!(
                "{} already exists and {} too; refusing to replace an existing exchange's CA",
                config_path.display(),
                p.display()
            );
        }
    }
    let names: Vec<String> = if names.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        names.to_vec()
    };
    for p in [&tls.ca, &tls.ca_key, &tls.cert, &tls.key] {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    let ca = pki::create_ca("Ferry exchange CA")?;
    let server = pki::issue_server(&ca, &names)?;
    write_new(&tls.ca, &ca.cert_pem, 0o644)?;
    write_new(&tls.ca_key, &ca.key_pem, 0o600)?;
    write_new(&tls.cert, &server.cert_pem, 0o644)?;
    write_new(&tls.key, &server.key_pem, 0o600)?;
    println!(
        "exchange initialised with the configuration already in {} (kept as it is)",
        config_path.display()
    );
    println!("  CA certificate:       {}", tls.ca.display());
    println!(
        "  server certificate:   {} (names: {})",
        tls.cert.display(),
        names.join(", ")
    );
    println!("  store:                {}", cfg.store.dir.display());
    println!(
        "  listen:               {} (public_address {})",
        cfg.exchange.listen, cfg.exchange.public_address
    );
    let public_host = cfg
        .exchange
        .public_address
        .rsplit_once(':')
        .map_or(cfg.exchange.public_address.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if !names.iter().any(|n| n == public_host) {
        println!(
            "note: [exchange] public_address {} (what `enroll` tells agents to dial) is not among the certificate's names: edit it in {}",
            cfg.exchange.public_address,
            config_path.display()
        );
    }
    println!(
        "next: ferry-exchange serve --config {}",
        config_path.display()
    );
    Ok(())
}

/// An agent's certificate as issued: what goes to the agent host.
pub struct Issued {
    pub serial: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Issues a certificate for `agent_id` of `department` from the exchange's CA
/// and records it under the trust directory (what is not on record cannot be
/// revoked by id). Refuses a bad id or department, and an id that already has
/// a live certificate unless `replace`.
pub fn issue(
    cfg: &ExchangeConfig,
    agent_id: &str,
    department: &str,
    replace: bool,
) -> Result<Issued> {
    if !valid_stream_name(agent_id) {
        bail!("agent id {agent_id:?} must be 1-128 characters of letters, digits, '.', '_' or '-'");
    }
    if department.trim().is_empty() {
        bail!("the department must not be empty");
    }
    let ca = PemPair {
        cert_pem: std::fs::read_to_string(&cfg.tls.ca)
            .with_context(|| format!("reading the CA certificate {}", cfg.tls.ca.display()))?,
        key_pem: std::fs::read_to_string(&cfg.tls.ca_key)
            .with_context(|| format!("reading the CA key {}", cfg.tls.ca_key.display()))?,
    };
    let live = crate::trust::live_certificates(cfg, agent_id)?;
    if !live.is_empty() && !replace {
        bail!(
            "agent id {agent_id:?} already has a live certificate (serial {}): a second server enrolled under it would ship as the same agent and its data would collide with the first's. Enrol the new server under a new agent id; or, to replace this agent's certificate (a reinstalled server), enrol it again with replace (`enroll --replace`, or \"replace\" on the dashboard) and revoke the old one with `ferry-exchange revoke --agent-id {agent_id}` once it is no longer used",
            live.join(", ")
        );
    }
    let agent = pki::issue_agent(&ca, agent_id, department)?;
    let serial = crate::trust::record_issued(cfg, agent_id, &agent.cert_pem)?;
    Ok(Issued {
        serial,
        ca_pem: ca.cert_pem,
        cert_pem: agent.cert_pem,
        key_pem: agent.key_pem,
    })
}

/// Where an enrolled agent keeps its files.
pub struct AgentPaths<'a> {
    /// Where the agent's `agent.toml` will be.
    pub config: &'a str,
    pub data_dir: &'a str,
    pub ca: &'a str,
    pub cert: &'a str,
    pub key: &'a str,
}

/// The packaged agent's paths (`packaging/agent.toml`, the unit).
pub const PACKAGED: AgentPaths<'static> = AgentPaths {
    config: "/etc/ferry/agent.toml",
    data_dir: "/var/lib/ferry",
    ca: "/etc/ferry/ca.pem",
    cert: "/etc/ferry/agent.pem",
    key: "/etc/ferry/agent.key",
};

/// A starter `agent.toml` for an enrolled agent: identity, exchange, files;
/// streams left for local IT to add.
pub fn agent_toml(
    cfg: &ExchangeConfig,
    agent_id: &str,
    department: &str,
    at: &AgentPaths,
) -> String {
    let toml_str = |s: &str| toml::Value::String(s.to_string()).to_string();
    format!(
        r#"# Ferry agent configuration for {agent_id} (department {department}),
# written by `ferry-exchange enroll`. Every key is explained in the example
# agent.toml shipped with the package. Check it with:
#   ferry-agent check-config --config {cfgpath}

[agent]
id = {id}                      # must match the certificate's subject
department = {dept}
data_dir = {data}

[exchange]
address = {addr}
ca = {ca}
cert = {cert}
key = {key}

[buffer]
max_size = "2GiB"

# Add one [[stream]] section per source, for example:
#
# [[stream]]
# name = "marriage-registrations"
# catalog_id = "210100-MZ-0001"
# sharing = "conditional"       # unconditional | conditional | not-shared
# source = {{ kind = "directory", path = "/srv/outbox", pattern = "*.xml", after_send = "move" }}
#
# [[stream]]
# name = "hall-log"
# catalog_id = "210100-MZ-0002"
# sharing = "unconditional"
# source = {{ kind = "tail", path = "/var/log/hall/app.log", encoding = "gbk" }}
"#,
        cfgpath = at.config,
        id = toml_str(agent_id),
        dept = toml_str(department),
        data = toml_str(at.data_dir),
        addr = toml_str(&cfg.exchange.public_address),
        ca = toml_str(at.ca),
        cert = toml_str(at.cert),
        key = toml_str(at.key),
    )
}

/// `ferry-exchange enroll`: a new agent's files in `out`.
pub fn enroll(
    config_path: &Path,
    agent_id: &str,
    department: &str,
    out: &Path,
    data_dir: Option<&Path>,
    replace: bool,
) -> Result<()> {
    let cfg = config::load(config_path)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = absolute(out)?;
    let agent_toml_path = out.join("agent.toml");
    if agent_toml_path.exists() {
        bail!(
            "{} already exists; refusing to overwrite an enrolled agent",
            agent_toml_path.display()
        );
    }
    let issued = issue(&cfg, agent_id, department, replace)?;
    write_new(&out.join("ca.pem"), &issued.ca_pem, 0o644)?;
    write_new(&out.join("agent.pem"), &issued.cert_pem, 0o644)?;
    write_new(&out.join("agent.key"), &issued.key_pem, 0o600)?;
    let data_dir = match data_dir {
        Some(d) => absolute(d)?,
        None => out.join("data"),
    };
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let (config_s, data_s, ca_s, cert_s, key_s) = (
        s(agent_toml_path.clone()),
        s(data_dir),
        s(out.join("ca.pem")),
        s(out.join("agent.pem")),
        s(out.join("agent.key")),
    );
    let text = agent_toml(
        &cfg,
        agent_id,
        department,
        &AgentPaths {
            config: &config_s,
            data_dir: &data_s,
            ca: &ca_s,
            cert: &cert_s,
            key: &key_s,
        },
    );
    write_new(&agent_toml_path, &text, 0o644)?;
    crate::audit::record_cli(
        &cfg,
        "enroll",
        agent_id,
        serde_json::json!({"department": department, "serial": issued.serial, "replace": replace}),
    );
    println!("enrolled agent {agent_id} (department {department})");
    println!(
        "  certificate: {} (serial {})",
        out.join("agent.pem").display(),
        issued.serial
    );
    println!(
        "  key:         {} (mode 0600; copy it to the agent host securely)",
        out.join("agent.key").display()
    );
    println!("  config:      {}", agent_toml_path.display());
    Ok(())
}
