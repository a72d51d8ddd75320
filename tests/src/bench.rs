//! Pieces the benchmark binaries (`ferry-bench`, `pg-bench`) share: running the
//! release binaries that sit beside them, an exchange + agent pair, and /proc
//! readings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A binary next to the running benchmark (both live in `target/release`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().join(name)
}

/// A port free for UDP and TCP (the exchange listens on both): the tests'
/// own choice, below the ephemeral range.
pub use crate::free_udp_port;

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a live process used so far.
pub fn cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the
            // 14th and 15th fields of the whole line.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let u: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((u + st) / hz)
        })
        .unwrap_or(0.0)
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemons' log level: `FERRY_BENCH_LOG`, else `warn` (their logs are kept
/// beside each run's data while it lasts).
fn log_level() -> String {
    std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

/// A fresh exchange and one enrolled agent whose config gets `stream` appended.
pub struct Pair {
    pub dir: PathBuf,
    pub exchange: Proc,
    pub agent: Option<Proc>,
}

impl Pair {
    pub fn new(dir: &Path, stream: &str) -> Result<Pair> {
        Pair::with_exchange(dir, stream, |cfg| cfg)
    }

    /// [`Pair::new`] with the exchange's config passed through `edit` before it
    /// starts (another store, a delivery).
    pub fn with_exchange(
        dir: &Path,
        stream: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Result<Pair> {
        std::fs::create_dir_all(dir)?;
        let port = free_udp_port();
        let ex = dir.join("ex");
        let ag = dir.join("ag");
        run(Command::new(bin("ferry-exchange"))
            .args(["init", "--dir"])
            .arg(&ex)
            .args(["--listen", &format!("127.0.0.1:{port}")]))?;
        run(Command::new(bin("ferry-exchange"))
            .args(["enroll", "--config"])
            .arg(ex.join("exchange.toml"))
            .args([
                "--agent-id",
                "bench",
                "--department",
                "000000-BENCH",
                "--out",
            ])
            .arg(&ag))?;
        let mut cfg = OpenOptions::new()
            .append(true)
            .open(ag.join("agent.toml"))?;
        write!(cfg, "\n{stream}")?;
        let ex_cfg = ex.join("exchange.toml");
        std::fs::write(&ex_cfg, edit(std::fs::read_to_string(&ex_cfg)?))?;
        let exchange = Proc(
            Command::new(bin("ferry-exchange"))
                .args(["serve", "--config"])
                .arg(ex.join("exchange.toml"))
                .env("FERRY_LOG", log_level())
                .stderr(File::create(dir.join("exchange.log"))?)
                .spawn()?,
        );
        // Serving once its admin socket answers (bound after the QUIC endpoint).
        let sock = ex.join("store").join("exchange.sock");
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the exchange did not start; log in {}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Pair {
            dir: dir.to_path_buf(),
            exchange,
            agent: None,
        })
    }

    pub fn start_agent(&mut self) -> Result<u32> {
        let child = Command::new(bin("ferry-agent"))
            .args(["run", "--config"])
            .arg(self.dir.join("ag/agent.toml"))
            .env("FERRY_LOG", log_level())
            .stderr(File::create(self.dir.join("agent.log"))?)
            .spawn()?;
        let pid = child.id();
        self.agent = Some(Proc(child));
        Ok(pid)
    }

    /// The one stream's status entry.
    /// Asks the agent's admin socket directly (`status` and a newline, as
    /// `ferry-agent status` does): polling through a process per look would cost
    /// this 2-core machine the CPU the measurement is about.
    pub fn stream_status(&self) -> Option<serde_json::Value> {
        use std::io::Read;
        let mut sock =
            std::os::unix::net::UnixStream::connect(self.dir.join("ag/data/agent.sock")).ok()?;
        sock.write_all(b"status\n").ok()?;
        let mut reply = Vec::new();
        sock.read_to_end(&mut reply).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&reply).ok()?;
        v["streams"].get(0).cloned()
    }

    /// Polls the stream's status until `done`; bails on a source error or after
    /// `timeout`.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        let mut last = serde_json::Value::Null;
        loop {
            if let Some(s) = self.stream_status() {
                if done(&s) {
                    return Ok(s);
                }
                if let Some(e) = s["source_error"].as_str() {
                    bail!("source error while waiting for {what}: {e}");
                }
                last = s;
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out waiting for {what}; last status {last}; logs in {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop_agent(&mut self) {
        self.agent = None;
    }

    /// Distinct snapshot rows (`item`s of blocks, by seq) the exchange holds,
    /// read through `ferry-exchange records`.
    pub fn snapshot_rows(&self, stream: &str) -> Result<u64> {
        use std::io::BufRead;
        let mut child = Command::new(bin("ferry-exchange"))
            .args(["records", "--config"])
            .arg(self.dir.join("ex/exchange.toml"))
            .args(["--agent", "bench", "--stream", stream])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().context("records stdout")?;
        let mut seen = std::collections::HashSet::new();
        for line in std::io::BufReader::new(out).lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            if v["row"]["snapshot"] == true {
                seen.insert((v["seq"].as_u64(), v["item"].as_u64()));
            }
        }
        if !child.wait()?.success() {
            bail!("ferry-exchange records failed");
        }
        Ok(seen.len() as u64)
    }
}

/// Bytes of each line [`write_log`] writes, newline included.
pub const LINE_LEN: usize = 256;

/// Log-like 256-byte lines: a timestamp, the line number, a user, a status, a
/// random latency and 80 characters of base64 from random bytes, so that zstd
/// finds what it finds in real logs (ratio about 3.5), not a run of padding.
pub fn write_log(path: &Path, lines: u64) -> Result<()> {
    use base64::Engine as _;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut rng = rand::rng();
    let mut noise = [0u8; 60];
    for i in 0..lines {
        rand::Rng::fill(&mut rng, &mut noise[..]);
        let data = base64::engine::general_purpose::STANDARD.encode(noise);
        let head = format!(
            "2026-11-25T13:{:02}:{:02}.{:06}Z seq={i:020} user=u{:06} action=request.completed status=200 latency_us={:06} msg=\"served\" data={data}",
            (i / 60_000_000) % 60,
            (i / 1_000_000) % 60,
            i % 1_000_000,
            i % 977,
            rand::Rng::random_range(&mut rng, 0..1_000_000),
        );
        writeln!(w, "{head:<width$}", width = LINE_LEN - 1)?;
    }
    w.flush()?;
    Ok(())
}
