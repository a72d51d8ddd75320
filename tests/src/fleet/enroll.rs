//! Agents for the fleet, enrolled as `ferry-exchange enroll` enrols them: a
//! certificate each from the exchange's CA (CN = agent id, OU = department),
//! kept on record under the exchange's trust directory so `revoke` finds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ferry_transport::pki::{self, PemPair};
use ferry_transport::tls::identity_in_file;

/// What `fleet-load` needs of an exchange's configuration.
#[derive(Debug, Clone)]
pub struct ExchangeFiles {
    pub config: PathBuf,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub trust_dir: PathBuf,
    /// `[exchange] listen`.
    pub listen: SocketAddr,
    /// `[dashboard] listen`, if the dashboard is on.
    pub dashboard: Option<String>,
    pub store_dir: PathBuf,
}

/// Reads the paths and addresses out of `exchange.toml` (relative paths are
/// relative to its directory, as the exchange reads them).
pub fn read_exchange(config: &Path) -> Result<ExchangeFiles> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let v: toml::Value =
        toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let base = config.parent().unwrap_or(Path::new("."));
    let path = |section: &str, key: &str, default: &str| -> PathBuf {
        let p = v
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_str)
            .unwrap_or(default);
        base.join(p)
    };
    let listen = v
        .get("exchange")
        .and_then(|s| s.get("listen"))
        .and_then(toml::Value::as_str)
        .with_context(|| format!("{} has no [exchange] listen", config.display()))?;
    let mut listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("[exchange] listen {listen:?} is not an address:port"))?;
    if listen.ip().is_unspecified() {
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(ExchangeFiles {
        config: config.to_path_buf(),
        ca: path("tls", "ca", "ca.pem"),
        ca_key: path("tls", "ca_key", "ca.key"),
        trust_dir: path("tls", "trust_dir", "trust"),
        listen,
        dashboard: v
            .get("dashboard")
            .and_then(|s| s.get("listen"))
            .and_then(toml::Value::as_str)
            .map(str::to_string),
        store_dir: path("store", "dir", "store"),
    })
}

/// The department of the `i`th simulated agent: districts 210102 to 210114
/// (the dashboard groups by the first six characters), several departments each.
pub fn department_of(i: usize) -> String {
    const DEPTS: [&str; 8] = ["MZ", "GA", "RS", "WJ", "JY", "ZJ", "SW", "TJ"];
    format!("2101{:02}-{}", 2 + i % 13, DEPTS[(i / 13) % DEPTS.len()])
}

/// One enrolled simulated agent.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub id: String,
    pub department: String,
    pub dir: PathBuf,
    pub cert_not_after_unix: u64,
}

/// Issues (or reuses, when `dir/ID` holds a certificate of this CA) a
/// certificate for each of `n` agents, in-process with the exchange's CA as
/// `ferry-exchange enroll` does, and records each under
/// `TRUST_DIR/issued/ID/SERIAL.pem` as `enroll` does, so `revoke` finds them.
pub fn enroll_fleet(ex: &ExchangeFiles, dir: &Path, n: usize) -> Result<Vec<Enrolled>> {
    let ca = PemPair {
        cert_pem: std::fs::read_to_string(&ex.ca)
            .with_context(|| format!("reading the CA certificate {}", ex.ca.display()))?,
        key_pem: std::fs::read_to_string(&ex.ca_key)
            .with_context(|| format!("reading the CA key {}", ex.ca_key.display()))?,
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("fleet-{i:04}");
        let department = department_of(i);
        let adir = dir.join(&id);
        let cert = adir.join("agent.pem");
        let same_ca = std::fs::read_to_string(adir.join("ca.pem")).is_ok_and(|c| c == ca.cert_pem);
        let reuse = same_ca && identity_in_file(&cert).is_ok_and(|c| c.department == department);
        if !reuse {
            std::fs::create_dir_all(&adir)
                .with_context(|| format!("creating {}", adir.display()))?;
            let pair = pki::issue_agent(&ca, &id, &department)?;
            std::fs::write(adir.join("ca.pem"), &ca.cert_pem)?;
            std::fs::write(&cert, &pair.cert_pem)?;
            write_key(&adir.join("agent.key"), &pair.key_pem)?;
            // A new certificate starts a new buffer: forget the old state.
            let _ = std::fs::remove_file(adir.join("state.json"));
            let serial = identity_in_file(&cert)?.serial;
            let issued = ex.trust_dir.join("issued").join(&id);
            std::fs::create_dir_all(&issued)
                .with_context(|| format!("creating {}", issued.display()))?;
            std::fs::write(issued.join(format!("{serial}.pem")), &pair.cert_pem)
                .with_context(|| format!("recording the certificate in {}", issued.display()))?;
        }
        let not_after = identity_in_file(&cert)?.not_after_unix;
        out.push(Enrolled {
            id,
            department,
            dir: adir,
            cert_not_after_unix: u64::try_from(not_after).unwrap_or(0),
        });
    }
    Ok(out)
}

fn write_key(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

/// Raises the soft limit of open files to the hard limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}
