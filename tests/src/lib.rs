//! End-to-end test harness: real `ferry-exchange` and `ferry-agent` processes in a
//! temporary directory, driven through their command lines only.
//!
//! * [`Exchange`]: `init` on a free port, `serve`, `kill -9`, restart, `records`,
//!   `export`, `enroll`.
//! * [`Agent`]: an enrolled agent whose `agent.toml` gets `[[stream]]` sections;
//!   `run`, `kill -9`, SIGTERM, `status --json`, `check-config`.
//! * Helpers to produce input the way real writers do (appended lines, files renamed
//!   into an outbox), digests, and [`wait_until`].
//! * [`pg`]: throwaway PostgreSQL servers (also used by `ferry-adapters`' tests).
//!
//! Nothing here sleeps for correctness: every wait polls a condition with a generous
//! deadline, so a slow machine only makes the tests slower. Every process writes its
//! stderr to a log file in the test's directory; when a test panics, the guards print
//! the tail of those logs (and the agent's last status) before killing the processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub mod bench;
pub mod faults;
pub mod fleet;
pub mod mysql;
pub mod nats;
pub mod pg;

/// Deadline for things that should happen "soon" (a process starting, a status
/// changing).
pub const SHORT: Duration = Duration::from_secs(60);
/// Deadline for data to arrive at the exchange.
pub const LONG: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------
// Binaries, directories, waiting
// ---------------------------------------------------------------------------------

/// `target/debug/<name>`, next to the directory holding the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --bins -p ferry-agent -p ferry-exchange` before `cargo test -p ferry-tests`",
        path.display()
    );
    path
}

/// A temporary directory for one test, removed afterwards unless the test failed
/// and `FERRY_TEST_KEEP=1` is set.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferry-e2e-{name}-"))
            .tempdir()
            .expect("creating the test directory");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("test dir").path()
    }

    /// `self/<rel>`, created as a directory.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var("FERRY_TEST_KEEP").as_deref() == Ok("1") {
            if let Some(d) = self.dir.take() {
                let kept = d.keep();
                eprintln!("test directory kept: {}", kept.display());
            }
        }
    }
}

/// Prints a progress note with the time since the test binary started (shown by
/// libtest only for failing tests, or with `--nocapture`).
pub fn note(msg: impl std::fmt::Display) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    let name = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("[{:>8.2}s {name}] {msg}", t.as_secs_f64());
}

/// Polls `cond` every 100 ms until it holds; panics naming `what` after `timeout`.
/// For tests that need something of the host: `true` when it is there. Otherwise
/// the test is skipped with a note, except under CI, where it fails saying what is
/// missing (`what`).
pub fn host_has(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "{what}");
    note(format!("skipped: {what}"));
    false
}

/// libfaketime, which fakes the wall clock of one process (`LD_PRELOAD` it);
/// `None` without the Debian package faketime.
pub fn libfaketime() -> Option<PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib").ok()?;
    dirs.flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketime.so.1")])
        .find(|p| p.is_file())
}

pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Like [`wait_until`], for a condition that produces a value.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free TCP port on loopback (bound, then released).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// `GET path` from `addr` over HTTP/1.1: the body of a 200 answer.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A port on 127.0.0.1 free right now for UDP and for TCP (the exchange listens
/// on both), chosen *below* the kernel's ephemeral
/// range: agents open a new ephemeral UDP socket on every reconnect, and an
/// exchange restarted on a port from that range could find it taken by one of them.
pub fn free_udp_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    if low > 12000 {
        let mut rng = rand::rng();
        for _ in 0..200 {
            let port = rng.random_range(10000..low);
            // The exchange listens on the port over TCP too (agents' fallback).
            if UdpSocket::bind(("127.0.0.1", port)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    let s = UdpSocket::bind("127.0.0.1:0").expect("binding a UDP socket");
    s.local_addr().expect("local_addr").port()
}

fn run_output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command that must succeed; returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = run_output(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// The text of a log file after its last `===== ... =====` banner (what the latest
/// process wrote).
pub fn since_last_banner(path: &Path) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    match text.rfind("\n=====") {
        Some(i) => text[i + 1..].to_string(),
        None => text,
    }
}

/// How many lines of a log file contain `needle`.
pub fn count_in_log(path: &Path, needle: &str) -> usize {
    std::fs::read(path)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter(|l| l.contains(needle))
                .count()
        })
        .unwrap_or(0)
}

/// The last `n` lines of a log file.
pub fn tail_of(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running child process whose stderr and stdout go to `log`.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(mut cmd: Command, log: &Path, banner: &str) -> Proc {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("opening the log file");
        writeln!(f, "===== {banner} =====").expect("log banner");
        let err = f.try_clone().expect("log handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(err))
            .env("FERRY_LOG", "info");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Proc { child }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    fn terminate(mut self, timeout: Duration) -> ExitStatus {
        // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "pid {} did not exit within {timeout:?} of SIGTERM",
                    self.pid()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------
// Exchange
// ---------------------------------------------------------------------------------

/// One exchange: its directory (`exchange.toml`, CA, store) and, when started, its
/// `serve` process.
pub struct Exchange {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    log: PathBuf,
    proc: Option<Proc>,
    starts: u32,
    /// Extra environment for the exchange's process (e.g. armed failpoints).
    env: Vec<(String, String)>,
    /// The `ferry-exchange` binary `serve` runs, when not this build's.
    program: Option<PathBuf>,
}

impl Exchange {
    /// `ferry-exchange init --dir DIR --listen 127.0.0.1:PORT` on a free port.
    pub fn init(dir: &Path) -> Exchange {
        let port = free_udp_port();
        run_ok(
            Command::new(bin("ferry-exchange"))
                .arg("init")
                .arg("--dir")
                .arg(dir)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}")),
        );
        let config = dir.join("exchange.toml");
        assert!(config.is_file(), "init wrote no {}", config.display());
        Exchange {
            dir: dir.to_path_buf(),
            config,
            port,
            log: dir.join("exchange.log"),
            proc: None,
            starts: 0,
            env: Vec::new(),
            program: None,
        }
    }

    /// Sets (or with `None` removes) an environment variable for the exchange
    /// processes started from now on.
    /// Serves with `program` (another build's `ferry-exchange`) from the next
    /// start on; `None`: this build's.
    pub fn set_program(&mut self, program: Option<PathBuf>) {
        self.program = program;
    }

    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Waits up to `timeout` for the running exchange to exit by itself; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let st = wait_for(timeout, "the exchange to exit", || {
            self.proc.as_mut().and_then(Proc::exited)
        });
        self.proc = None;
        st
    }

    /// `init` and `start`.
    pub fn start_new(dir: &Path) -> Exchange {
        let mut ex = Exchange::init(dir);
        ex.start();
        ex
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The running exchange's process id.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("store").join("exchange.sock")
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the current (latest) process logged so far.
    pub fn log_since_start(&self) -> String {
        since_last_banner(&self.log)
    }

    /// Spawns `serve` and waits until it answers on its admin socket (bound after
    /// the QUIC endpoint, so the exchange is then reachable).
    pub fn start(&mut self) {
        self.spawn();
        let sock = self.admin_socket();
        wait_until(SHORT, "the exchange to serve", || {
            self.assert_alive();
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }

    /// Spawns `serve` without waiting for it (it may be armed to crash at once).
    pub fn spawn(&mut self) {
        assert!(self.proc.is_none(), "exchange already started");
        self.starts += 1;
        let program = self
            .program
            .clone()
            .unwrap_or_else(|| bin("ferry-exchange"));
        let mut cmd = Command::new(program);
        cmd.arg("serve").arg("--config").arg(&self.config);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn(
            cmd,
            &self.log,
            &format!("exchange start #{}", self.starts),
        ));
    }

    pub fn is_running(&mut self) -> bool {
        match self.proc.as_mut() {
            Some(p) => p.exited().is_none(),
            None => false,
        }
    }

    /// Panics (with the log) if the exchange was started and has exited.
    pub fn assert_alive(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            if let Some(st) = p.exited() {
                panic!(
                    "the exchange exited unexpectedly ({st}); log:\n{}",
                    tail_of(&self.log, 80)
                );
            }
        }
    }

    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM; the exchange must exit cleanly.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            let st = p.terminate(SHORT);
            assert!(
                st.success(),
                "the exchange exited with {st} on SIGTERM; log:\n{}",
                tail_of(&self.log, 60)
            );
        }
    }

    /// `kill -9` (if running) and start again.
    pub fn restart(&mut self) {
        self.kill9();
        self.start();
    }

    /// `ferry-exchange revoke` with `args`: its output, whether it succeeded or not.
    pub fn revoke(&self, args: &[&str]) -> Output {
        run_output(self.cli("revoke").args(args))
    }

    /// `ferry-exchange user add --token-file FILE`: a machine user of `role`.
    /// Its API token, and the user as the command listed it.
    pub fn add_token_user(&self, name: &str, role: &str, token_file: &Path) -> (String, Value) {
        let listed = run_ok(
            Command::new(bin("ferry-exchange"))
                .args(["user", "add", "--config"])
                .arg(&self.config)
                .args(["--name", name, "--role", role, "--token-file"])
                .arg(token_file),
        );
        let token = std::fs::read_to_string(token_file)
            .unwrap_or_else(|e| panic!("{}: {e}", token_file.display()))
            .trim()
            .to_string();
        let listed = serde_json::from_str(listed.trim())
            .unwrap_or_else(|e| panic!("user add printed {listed:?}: {e}"));
        (token, listed)
    }

    fn cli(&self, sub: &str) -> Command {
        let mut cmd = Command::new(bin("ferry-exchange"));
        cmd.arg(sub).arg("--config").arg(&self.config);
        cmd
    }

    /// `ferry-exchange deliveries`: one JSON value per (delivery, agent, stream).
    pub fn deliveries(&self) -> Vec<Value> {
        json_lines(&run_ok(&mut self.cli("deliveries")))
    }

    /// `deliveries`, or `None` when the command fails (e.g. while a crashed
    /// exchange is starting again).
    pub fn try_deliveries(&self) -> Option<Vec<Value>> {
        let out = self.cli("deliveries").output().ok()?;
        out.status
            .success()
            .then(|| json_lines(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Points `[store]` at a JetStream server (`kind = "jetstream"`).
    pub fn use_jetstream(&self, url: &str, monitor: &str) {
        let cfg = std::fs::read_to_string(&self.config).unwrap_or_default();
        let cfg = cfg
            .lines()
            .filter(|l| !l.trim_start().starts_with("kind = \"embedded\""))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(
                "[store]\n",
                &format!(
                    "[store]\nkind = \"jetstream\"\nurl = \"{url}\"\nmonitor = \"{monitor}\"\n"
                ),
            );
        std::fs::write(&self.config, cfg + "\n")
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config.display()));
    }

    /// A second node of this exchange in `dir`: the same configuration and
    /// certificates (the CA and trust files copied), its own port and local
    /// store directory. Not started.
    pub fn another_node(&self, dir: &Path) -> Exchange {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut todo = vec![(self.dir.clone(), dir.to_path_buf())];
        while let Some((from, to)) = todo.pop() {
            for e in std::fs::read_dir(&from).into_iter().flatten().flatten() {
                let (src, dst) = (e.path(), to.join(e.file_name()));
                if e.file_name() == "store" || e.file_name().to_string_lossy().ends_with(".log") {
                    continue;
                }
                if src.is_dir() {
                    std::fs::create_dir_all(&dst).unwrap_or_default();
                    todo.push((src, dst));
                } else {
                    std::fs::copy(&src, &dst)
                        .unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
                }
            }
        }
        let port = free_udp_port();
        let config = dir.join("exchange.toml");
        let cfg = std::fs::read_to_string(&config)
            .unwrap_or_default()
            .replace(&format!(":{}\"", self.port), &format!(":{port}\""));
        std::fs::write(&config, cfg)
            .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        Exchange {
            dir: dir.to_path_buf(),
            config,
            port,
            log: dir.join("exchange.log"),
            proc: None,
            starts: 0,
            env: Vec::new(),
            program: None,
        }
    }

    /// Appends `text` (e.g. a `[[delivery]]` section) to exchange.toml.
    pub fn append_config(&self, text: &str) {
        let mut cfg = std::fs::read_to_string(&self.config).unwrap_or_default();
        cfg.push_str(text);
        std::fs::write(&self.config, cfg)
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config.display()));
    }

    /// `ferry-exchange records --agent A --stream S --from FROM`.
    fn records_cmd(&self, agent: &str, stream: &str, from: u64) -> Command {
        let mut cmd = self.cli("records");
        cmd.args(["--agent", agent, "--stream", stream, "--from"])
            .arg(from.to_string());
        cmd
    }

    /// `ferry-exchange records --from FROM`: the records of a stream from seq `from`
    /// on, in seq order.
    pub fn records_from(&self, agent: &str, stream: &str, from: u64) -> Vec<Value> {
        json_lines(&run_ok(&mut self.records_cmd(agent, stream, from)))
    }

    /// Streams the line texts of records `from..` to `each` (seq, text) without
    /// holding them all: for runs that store tens of millions of lines. Returns the
    /// seq after the last one seen.
    pub fn each_line_from(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        mut each: impl FnMut(u64, &str),
    ) -> u64 {
        self.each_record_from(agent, stream, from, |seq, v| {
            if let Some(t) = v.get("text").and_then(Value::as_str) {
                each(seq, t);
            }
        })
    }

    /// Streams the records `from..` to `each` (seq, record as `records`
    /// prints it) without holding them all. Returns the seq after the last one.
    pub fn each_record_from(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        mut each: impl FnMut(u64, &Value),
    ) -> u64 {
        use std::io::BufRead;
        let mut child = self
            .records_cmd(agent, stream, from)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("running ferry-exchange records");
        let out = child.stdout.take().expect("stdout");
        let mut next = from;
        for line in std::io::BufReader::with_capacity(1 << 20, out).lines() {
            let line = line.expect("reading records");
            let v: Value = serde_json::from_str(&line).expect("a JSON record");
            let seq = v["seq"].as_u64().expect("seq");
            each(seq, &v);
            next = seq + 1;
        }
        assert!(
            child.wait().expect("records").success(),
            "ferry-exchange records failed"
        );
        next
    }

    /// `ferry-exchange records`: every record of a stream, in seq order.
    pub fn records(&self, agent: &str, stream: &str) -> Vec<Value> {
        json_lines(&run_ok(
            self.cli("records")
                .args(["--agent", agent, "--stream", stream]),
        ))
    }

    /// The `text` of every line record of a stream, in seq order.
    pub fn lines(&self, agent: &str, stream: &str) -> Vec<String> {
        self.records(agent, stream)
            .iter()
            .filter_map(|r| r.get("text").and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    /// The `file` objects of every file record of a stream, in seq order.
    pub fn files(&self, agent: &str, stream: &str) -> Vec<Value> {
        self.records(agent, stream)
            .iter()
            .filter_map(|r| r.get("file").cloned())
            .collect()
    }

    /// `ferry-exchange export ... --to DIR`: its JSON reply lines.
    pub fn export(&self, agent: &str, stream: &str, to: &Path) -> Vec<Value> {
        json_lines(&run_ok(
            self.cli("export")
                .args(["--agent", agent, "--stream", stream, "--to"])
                .arg(to),
        ))
    }

    /// `ferry-exchange gaps`: seq ranges of a stream that never arrived.
    pub fn gaps(&self, agent: &str, stream: &str) -> Vec<Value> {
        json_lines(&run_ok(
            self.cli("gaps")
                .args(["--agent", agent, "--stream", stream]),
        ))
    }

    /// `ferry-exchange agents`.
    pub fn agents(&self) -> Vec<Value> {
        json_lines(&run_ok(&mut self.cli("agents")))
    }

    /// Polls `records` until `done(records)`, checking that the exchange stays up.
    pub fn wait_records(
        &mut self,
        agent: &str,
        stream: &str,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let start = Instant::now();
        loop {
            self.assert_alive();
            let last = self.records(agent, stream);
            if done(&last) {
                return last;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what} (agent {agent} stream {stream}: {} records so far, last: {})",
                    last.len(),
                    last.last().map(Value::to_string).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until a stream holds at least `n` line records; returns their texts.
    /// Reads incrementally (`--from`), so waiting for many lines stays cheap.
    pub fn wait_lines(
        &mut self,
        agent: &str,
        stream: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<String> {
        let start = Instant::now();
        let mut texts = Vec::new();
        let mut next = 1;
        loop {
            self.assert_alive();
            for r in self.records_from(agent, stream, next) {
                next = r["seq"].as_u64().expect("seq") + 1;
                if let Some(t) = r.get("text").and_then(Value::as_str) {
                    texts.push(t.to_string());
                }
            }
            if texts.len() >= n {
                return texts;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {n} lines (agent {agent} stream {stream}: {} so far, last: {:?})",
                    texts.len(),
                    texts.last()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `ferry-exchange resolve --agent A --stream S` with `args` (`--accept`, or
    /// `--refuse --reason R`): its output.
    pub fn resolve(&self, agent: &str, stream: &str, args: &[&str]) -> Output {
        run_output(
            self.cli("resolve")
                .args(["--agent", agent, "--stream", stream])
                .args(args),
        )
    }

    /// `ferry-exchange enroll` with extra `args`: its output, success or not.
    pub fn enroll_output(
        &self,
        agent_id: &str,
        department: &str,
        out: &Path,
        args: &[&str],
    ) -> Output {
        run_output(
            self.cli("enroll")
                .args(["--agent-id", agent_id, "--department", department, "--out"])
                .arg(out)
                .args(args),
        )
    }

    /// `ferry-exchange enroll`: a new agent directory `out` with `agent.toml`.
    pub fn enroll(&self, agent_id: &str, department: &str, out: &Path) -> Agent {
        run_ok(
            self.cli("enroll")
                .args(["--agent-id", agent_id, "--department", department, "--out"])
                .arg(out),
        );
        Agent::at(agent_id, out)
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- exchange log {} (last 80 lines) -----\n{}\n----- end of exchange log -----",
                self.log.display(),
                tail_of(&self.log, 80)
            );
        }
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------

/// An enrolled agent: its directory, `agent.toml`, and when started its `run` process.
pub struct Agent {
    pub id: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    starts: u32,
    /// Extra environment for the agent's process (e.g. a faked clock).
    env: Vec<(String, String)>,
    /// The `ferry-agent` binary `run` runs, when not this build's.
    program: Option<PathBuf>,
}

/// `[[stream]]` for a `tail` source.
pub fn tail_stream(name: &str, catalog_id: &str, path: &Path) -> String {
    format!(
        "\n[[stream]]\nname = \"{name}\"\ncatalog_id = \"{catalog_id}\"\nsharing = \"unconditional\"\nsource = {{ kind = \"tail\", path = \"{}\" }}\n",
        path.display()
    )
}

/// `[[stream]]` for a `postgres` source; `extra` adds source keys, e.g.
/// `snapshot = "never", heartbeat_interval = "1s"`.
pub fn postgres_stream(
    name: &str,
    catalog_id: &str,
    dsn: &str,
    tables: &[&str],
    slot: &str,
    publication: &str,
    extra: &str,
) -> String {
    let tables: Vec<String> = tables.iter().map(|t| format!("\"{t}\"")).collect();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        "\n[[stream]]\nname = \"{name}\"\ncatalog_id = \"{catalog_id}\"\nsharing = \"conditional\"\nsource = {{ kind = \"postgres\", dsn = \"{dsn}\", tables = [{}], slot = \"{slot}\", publication = \"{publication}\"{extra} }}\n",
        tables.join(", ")
    )
}

/// The LSN a postgres stream's position description (`status`) names as where
/// streaming starts: `streaming from 0/1A2B3C8 ...`, also during the snapshot
/// (`...; streaming from 0/1A2B3C8 after it`).
pub fn pg_position_lsn(position: &str) -> Option<u64> {
    let rest = &position[position.find("streaming from ")? + "streaming from ".len()..];
    let lsn = rest.split([' ', ';']).next()?;
    pg::parse_lsn(lsn)
}

/// `[[stream]]` for a `directory` source whose writers rename finished files in.
pub fn outbox_stream(name: &str, catalog_id: &str, path: &Path) -> String {
    outbox_stream_with(name, catalog_id, path, "")
}

/// [`outbox_stream`] with more source keys, e.g. `chunk_size = "8KiB"`.
pub fn outbox_stream_with(name: &str, catalog_id: &str, path: &Path, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        "\n[[stream]]\nname = \"{name}\"\ncatalog_id = \"{catalog_id}\"\nsharing = \"conditional\"\nsource = {{ kind = \"directory\", path = \"{}\", complete = \"rename\"{extra} }}\n",
        path.display()
    )
}

impl Agent {
    /// The agent whose `agent.toml` is in `dir` (not started).
    pub fn at(id: &str, dir: &Path) -> Agent {
        let config = dir.join("agent.toml");
        assert!(config.is_file(), "enroll wrote no {}", config.display());
        Agent {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            config,
            log: dir.join("agent.log"),
            proc: None,
            starts: 0,
            env: Vec::new(),
            program: None,
        }
    }

    /// Runs `program` (another build's `ferry-agent`) from the next start on;
    /// `None`: this build's.
    pub fn set_program(&mut self, program: Option<PathBuf>) {
        self.program = program;
    }

    /// Sets an environment variable for the agent processes started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// A copy of this (stopped) agent's whole directory at `dir` — certificate,
    /// key and buffer, as a cloned virtual machine has them — with its
    /// `agent.toml` pointing at the copy, and every other path `from` in it
    /// replaced by `to` (e.g. the folder of a tailed log).
    pub fn clone_to(&self, dir: &Path, from: &Path, to: &Path) -> Agent {
        assert!(self.proc.is_none(), "clone a stopped agent");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&self.dir)
            .arg(dir)
            .status()
            .expect("running cp");
        assert!(
            status.success(),
            "cp -a {} {}",
            self.dir.display(),
            dir.display()
        );
        let _ = std::fs::remove_file(dir.join("agent.log"));
        let clone = Agent::at(&self.id, dir);
        clone.edit(|t| {
            t.replace(&self.dir.display().to_string(), &dir.display().to_string())
                .replace(&from.display().to_string(), &to.display().to_string())
        });
        clone
    }

    /// Removes an environment variable set with [`Agent::set_env`].
    pub fn unset_env(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
    }

    /// Waits up to `timeout` for the running agent to exit by itself; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let st = wait_for(timeout, "the agent to exit", || {
            self.proc.as_mut().and_then(Proc::exited)
        });
        self.proc = None;
        st
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("reading agent.toml")
    }

    /// Rewrites `agent.toml` through `f`.
    pub fn edit(&self, f: impl FnOnce(String) -> String) {
        let text = f(self.config_text());
        std::fs::write(&self.config, text).expect("writing agent.toml");
    }

    /// Replaces the (first) line starting with `key =` by `key = value`.
    pub fn set(&self, key: &str, value: &str) {
        self.edit(|t| replace_key(&t, key, value));
    }

    /// Appends a `[[stream]]` section (see [`tail_stream`], [`outbox_stream`]).
    pub fn add_stream(&self, section: &str) {
        self.edit(|t| t + section);
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the current (latest) process logged so far.
    pub fn log_since_start(&self) -> String {
        since_last_banner(&self.log)
    }

    /// The running agent's process id.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Spawns `run` without waiting for it to be up.
    pub fn spawn(&mut self) {
        assert!(self.proc.is_none(), "agent already started");
        self.starts += 1;
        let program = self.program.clone().unwrap_or_else(|| bin("ferry-agent"));
        let mut cmd = Command::new(program);
        cmd.arg("run").arg("--config").arg(&self.config);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn(
            cmd,
            &self.log,
            &format!("agent start #{}", self.starts),
        ));
    }

    /// Spawns `run` and waits until its admin socket answers `status`.
    pub fn start(&mut self) {
        self.spawn();
        wait_until(SHORT, "the agent to answer status", || {
            self.assert_alive();
            self.status_json().is_some()
        });
    }

    /// Panics (with the log) if the agent was started and has exited.
    pub fn assert_alive(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            if let Some(st) = p.exited() {
                panic!(
                    "the agent exited unexpectedly ({st}); log:\n{}",
                    tail_of(&self.log, 80)
                );
            }
        }
    }

    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM; the agent must exit cleanly.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            let st = p.terminate(SHORT);
            assert!(
                st.success(),
                "the agent exited with {st} on SIGTERM; log:\n{}",
                tail_of(&self.log, 60)
            );
        }
    }

    /// `ferry-agent status --json` for observers on other threads, which may ask
    /// while the agent is being killed: `None` unless it answered.
    pub fn status_at(config: &Path) -> Option<Value> {
        let out = run_output(
            Command::new(bin("ferry-agent"))
                .arg("status")
                .arg("--config")
                .arg(config)
                .arg("--json"),
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `ferry-agent status --json`; `None` when the agent is not running (exit 3).
    pub fn status_json(&self) -> Option<Value> {
        let out = run_output(
            Command::new(bin("ferry-agent"))
                .arg("status")
                .arg("--config")
                .arg(&self.config)
                .arg("--json"),
        );
        match out.status.code() {
            Some(0) => Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!("status --json printed no JSON ({e}): {}", describe(&out))
            })),
            Some(3) => None,
            _ => panic!("ferry-agent status failed: {}", describe(&out)),
        }
    }

    /// The running agent's status (panics if it does not answer).
    pub fn status(&mut self) -> Value {
        self.assert_alive();
        self.status_json().expect("the agent answers status")
    }

    /// The status entry of one stream.
    pub fn stream_status(&mut self, stream: &str) -> Value {
        let st = self.status();
        st["streams"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == stream).cloned())
            .unwrap_or_else(|| panic!("no stream {stream:?} in status {st}"))
    }

    /// `ferry-agent check-config --config FILE`: what this host lacks (certificate
    /// files, folders) is only a warning.
    pub fn check_config(config: &Path) -> Output {
        run_output(
            Command::new(bin("ferry-agent"))
                .arg("check-config")
                .arg("--config")
                .arg(config),
        )
    }

    /// `ferry-agent check-config --strict --config FILE`: what this host lacks is an
    /// error too.
    pub fn check_config_strict(config: &Path) -> Output {
        run_output(
            Command::new(bin("ferry-agent"))
                .arg("check-config")
                .arg("--strict")
                .arg("--config")
                .arg(config),
        )
    }

    /// `ferry-agent run --config FILE` expected to exit by itself (a refused config).
    pub fn run_to_exit(config: &Path, timeout: Duration) -> Output {
        let mut child = Command::new(bin("ferry-agent"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ferry-agent run");
        let start = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            if start.elapsed() > timeout {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "ferry-agent run kept running with {}: {}",
                    config.display(),
                    describe(&out)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("wait")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if self.proc.is_some() {
                let st = self
                    .status_json()
                    .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                    .unwrap_or_else(|| "(not running)".into());
                eprintln!("----- agent {} status -----\n{st}", self.id);
            }
            eprintln!(
                "----- agent {} log {} (last 80 lines) -----\n{}\n----- end of agent log -----",
                self.id,
                self.log.display(),
                tail_of(&self.log, 80)
            );
        }
        self.kill9();
    }
}

/// `text` with the first line that starts with `key =` replaced by `key = value`.
pub fn replace_key(text: &str, key: &str, value: &str) -> String {
    let mut done = false;
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if !done && t.starts_with(key) && t[key.len()..].trim_start().starts_with('=') {
            out.push_str(&format!("{key} = {value}"));
            done = true;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    assert!(done, "no `{key} =` line in:\n{text}");
    out
}

/// 1-based number of the first line of `text` that starts with `prefix`.
pub fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(prefix))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"))
}

/// Parses `off=N` out of a tail position description (`ino=… off=…`).
pub fn tail_offset(position: &str) -> Option<u64> {
    position
        .split_whitespace()
        .find_map(|w| w.strip_prefix("off="))
        .and_then(|n| n.parse().ok())
}

// ---------------------------------------------------------------------------------
// Input, the way real writers produce it
// ---------------------------------------------------------------------------------

/// Appends each string plus `\n` to `path` (created if missing), as a logger does.
pub fn append_lines<S: AsRef<str>>(path: &Path, lines: &[S]) {
    let mut buf = String::new();
    for l in lines {
        buf.push_str(l.as_ref());
        buf.push('\n');
    }
    append_raw(path, buf.as_bytes());
}

/// Appends raw bytes to `path` (created if missing).
pub fn append_raw(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all(bytes).expect("appending");
}

/// The temporary name a writer uses before renaming `name` into `dir`.
pub fn tmp_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp"))
}

/// Every regular file under `dir` (relative path → SHA-256), hidden ones aside.
pub fn tree(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, sha256_file(&p));
            }
        }
    }
    out
}

/// Writes `dir/.name.tmp`, then renames it to `dir/name` (what `complete = "rename"`
/// expects from writers).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let tmp = tmp_name(dir, name);
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).expect("renaming into the outbox");
    dest
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill(&mut v[..]);
    v
}

/// Random lowercase hex of `n` characters (incompressible-ish text).
pub fn random_hex(n: usize) -> String {
    let mut s = hex::encode(random_bytes(n.div_ceil(2)));
    s.truncate(n);
    s
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).expect("reading");
        if n == 0 {
            return hex::encode(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// Names of the regular files directly in `dir` (not hidden ones), sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Asserts that `got` is exactly `want`, reporting the first difference, counts and
/// duplicates rather than two huge lists.
pub fn assert_same_sequence(got: &[String], want: &[String], what: &str) {
    if got == want {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    let dups: Vec<&String> = got.iter().filter(|l| !seen.insert(*l)).take(10).collect();
    let got_set: std::collections::HashSet<&String> = got.iter().collect();
    let missing: Vec<&String> = want
        .iter()
        .filter(|l| !got_set.contains(l))
        .take(10)
        .collect();
    let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
    let ctx = |v: &[String], i: usize| -> Vec<String> {
        v[i.saturating_sub(3)..(i + 3).min(v.len())].to_vec()
    };
    let at = first_diff.unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: got {} lines, want {}; first difference at index {at}: got {:?}, want {:?}; duplicates (first 10): {dups:?}; missing (first 10): {missing:?}",
        got.len(),
        want.len(),
        ctx(got, at),
        ctx(want, at),
    );
}
