//! Running as a service: the systemd units pass `systemd-analyze` (a sandbox rated
//! 2.0 or better, no warnings), a missing or invalid configuration makes both
//! daemons exit 78 (EX_CONFIG, which the units' `RestartPreventExitStatus=` turns
//! into "do not restart"), and an agent started with `--daemon --log-file` keeps
//! its log in that file and reopens it on SIGUSR1 and SIGHUP, as logrotate's
//! `postrotate` asks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";
/// sysexits.h's EX_CONFIG.
const EX_CONFIG: i32 = 78;
/// The highest `systemd-analyze security` exposure the units may have ("OK" ends
/// at 4.9; both are hardened well below).
const MAX_EXPOSURE: f64 = 2.0;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn unit(name: &str) -> PathBuf {
    repo_root().join("systemd").join(name)
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

// ---------------------------------------------------------------------------------
// The units
// ---------------------------------------------------------------------------------

/// `systemd-analyze`, or `None` (a skip, except under CI) when the host lacks it.
fn systemd_analyze() -> Option<PathBuf> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    host_has(
        found,
        "systemd-analyze is missing: install the Debian package `systemd` (apt-get install systemd)",
    )
    .then(|| PathBuf::from("systemd-analyze"))
}

/// The exposure `systemd-analyze security --offline=true` gives `unit`, from its
/// closing line `→ Overall exposure level for NAME: 1.3 OK 🙂`.
fn exposure(analyze: &Path, unit: &Path) -> (f64, String) {
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "systemd-analyze security {}: {}\n{text}",
        unit.display(),
        stderr_of(&out)
    );
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"))
        .to_string();
    let figure = line
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no figure in {line:?}"));
    (figure, line)
}

/// Both units are sandboxed to an exposure of 2.0 or better.
#[test]
fn units_are_hardened() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    for name in ["ferry-agent.service", "ferry-exchange.service"] {
        let (figure, line) = exposure(&analyze, &unit(name));
        note(&line);
        assert!(
            figure <= MAX_EXPOSURE,
            "{name}: exposure {figure} above {MAX_EXPOSURE}: {line}"
        );
    }
}

/// A throwaway root for `systemd-analyze verify --root=`: systemd's own units
/// (verify loads what the units depend on), the units under test, and the built
/// binaries at the paths ExecStart= names (verify checks they are executable;
/// hard links, since a symlink would be resolved inside the root).
fn verify_root(t: &TestDir) -> (PathBuf, PathBuf) {
    let root = t.mkdir("root");
    let lib = t.mkdir("root/usr/lib/systemd");
    let copied = Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(&lib)
        .status()
        .unwrap();
    assert!(copied.success(), "copying /usr/lib/systemd/system");
    let units = t.mkdir("root/etc/systemd/system");
    for name in ["ferry-agent.service", "ferry-exchange.service"] {
        std::fs::copy(unit(name), units.join(name)).unwrap();
    }
    let bin_dir = t.mkdir("root/usr/bin");
    for name in ["ferry-agent", "ferry-exchange"] {
        let to = bin_dir.join(name);
        if std::fs::hard_link(bin(name), &to).is_err() {
            std::fs::copy(bin(name), &to).unwrap();
        }
    }
    (root, units)
}

/// `systemd-analyze verify` of `units` in `root`: its status and everything it said.
fn verify(analyze: &Path, root: &Path, units: &[PathBuf]) -> (bool, String) {
    let out = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("--man=no")
        .args(units)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
    (out.status.success(), said)
}

/// `systemd-analyze verify` accepts both units without a word: no unknown key, no
/// bad value, both ExecStart= binaries in place. An unknown key is only a warning
/// (exit 0), so silence is what is checked; a misspelt copy shows the check bites.
#[test]
fn units_verify_clean() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let t = TestDir::new("service-verify");
    let (root, dir) = verify_root(&t);
    let units = [
        dir.join("ferry-agent.service"),
        dir.join("ferry-exchange.service"),
    ];
    let (ok, said) = verify(&analyze, &root, &units);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    let broken = dir.join("ferry-broken.service");
    let text = std::fs::read_to_string(&units[0]).unwrap();
    std::fs::write(&broken, text.replace("ProtectClock=", "ProtectClok=")).unwrap();
    let (_, said) = verify(&analyze, &root, &[broken]);
    assert!(
        said.contains("ProtectClok"),
        "verify flags an unknown key: {said:?}"
    );
}

/// The units, the packaged example configs and the README agree on where things
/// are: configs in /etc/ferry, state in /var/lib/ferry and /var/lib/ferry-exchange.
#[test]
fn units_and_packaged_configs_agree() {
    let read = |rel: &str| std::fs::read_to_string(repo_root().join(rel)).unwrap();
    let agent = read("systemd/ferry-agent.service");
    let exchange = read("systemd/ferry-exchange.service");
    for (text, want) in [
        (
            &agent,
            "ExecStart=/usr/bin/ferry-agent run --config /etc/ferry/agent.toml",
        ),
        (&agent, "StateDirectory=ferry\n"),
        (&agent, "User=ferry\n"),
        (
            &exchange,
            "ExecStart=/usr/bin/ferry-exchange serve --config /etc/ferry/exchange.toml",
        ),
        (&exchange, "StateDirectory=ferry-exchange\n"),
        (&exchange, "User=ferry-exchange\n"),
    ] {
        assert!(text.contains(want), "a unit says {want:?}");
    }
    for text in [&agent, &exchange] {
        for want in [
            "ConfigurationDirectory=ferry\n",
            "RestartPreventExitStatus=78\n",
            "Restart=on-failure\n",
            "Type=notify\n",
            "WatchdogSec=",
        ] {
            assert!(text.contains(want), "both units say {want:?}");
        }
        // Every man page a unit points at is one the packages carry: generated
        // from the CLI (section 1, packaging/gen) or written (packaging/man/).
        for doc in text
            .lines()
            .filter_map(|l| l.strip_prefix("Documentation="))
            .flat_map(str::split_whitespace)
        {
            let page = doc.strip_prefix("man:").expect("Documentation=man:...");
            let (name, section) = page.trim_end_matches(')').split_once('(').unwrap();
            assert!(
                (section == "1" && ["ferry-agent", "ferry-exchange"].contains(&name))
                    || repo_root()
                        .join(format!("packaging/man/{name}.{section}"))
                        .is_file(),
                "a unit points at man:{page}, which no package carries"
            );
        }
    }
    assert!(agent.contains(
        "ExecCondition=/usr/bin/ferry-agent check-config --config /etc/ferry/agent.toml --has-streams\n"
    ));
    // The exchange waits for the server certificate `init` creates at the path
    // the packaged exchange.toml names (relative to /etc/ferry).
    assert!(exchange.contains("ConditionPathExists=/etc/ferry/exchange.pem\n"));
    assert!(read("packaging/exchange.toml").contains("\ncert = \"exchange.pem\"\n"));
    assert!(read("packaging/agent.toml").contains("data_dir = \"/var/lib/ferry\""));
    assert!(read("packaging/exchange.toml").contains("dir = \"/var/lib/ferry-exchange\""));
    let logrotate = read("packaging/logrotate/ferry-agent");
    assert!(logrotate.contains("kill -USR1"), "{logrotate}");
}

// ---------------------------------------------------------------------------------
// Readiness and watchdog
// ---------------------------------------------------------------------------------

/// systemd's side of `sd_notify`: a datagram socket the daemon is pointed at with
/// NOTIFY_SOCKET.
struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(t: &TestDir, name: &str) -> NotifySocket {
        let path = t.path().join(name);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        NotifySocket { sock, path }
    }

    /// Reads messages until one contains `want`; panics naming what arrived.
    fn wait_for(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < SHORT {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let done = msg.lines().any(|l| l == want);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
        }
        panic!("no {want} within {SHORT:?}; received {seen:?}");
    }
}

/// A daemon started as systemd starts it: NOTIFY_SOCKET, WATCHDOG_USEC and its
/// own pid in WATCHDOG_PID (a shell exports its pid and `exec`s the daemon, which
/// keeps it). Killed if the test fails.
struct Notified(std::process::Child);

impl Notified {
    fn spawn(
        name: &str,
        args: &[&str],
        config: &Path,
        notify: &NotifySocket,
        log: &Path,
    ) -> Notified {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
            .arg(bin(name))
            .args(args)
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify.path)
            // 400 ms: a ping every 200 ms.
            .env("WATCHDOG_USEC", "400000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Notified(child)
    }

    /// SIGTERM; the daemon must exit cleanly.
    fn stop(&mut self) {
        // SAFETY: kill(2) on this test's own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let status = self.0.wait().unwrap();
        assert!(status.success(), "exit on SIGTERM: {status}");
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Both daemons say READY=1 once they serve, then ping the watchdog (every half
/// of WATCHDOG_USEC) while they run, and STOPPING=1 on SIGTERM; the exchange pings
/// only after it answered on its admin socket.
#[test]
fn both_daemons_notify_ready_and_ping_the_watchdog() {
    let t = TestDir::new("service-notify");
    let ex = Exchange::init(&t.mkdir("exchange"));
    let agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));

    let ex_notify = NotifySocket::bind(&t, "exchange.notify");
    let mut exchange = Notified::spawn(
        "ferry-exchange",
        &["serve"],
        &ex.config,
        &ex_notify,
        &t.path().join("exchange.log"),
    );
    ex_notify.wait_for("READY=1");
    ex_notify.wait_for("WATCHDOG=1");
    ex_notify.wait_for("WATCHDOG=1");

    let agent_notify = NotifySocket::bind(&t, "agent.notify");
    let mut agent = Notified::spawn(
        "ferry-agent",
        &["run"],
        &agent.config,
        &agent_notify,
        &t.path().join("agent.log"),
    );
    agent_notify.wait_for("READY=1");
    agent_notify.wait_for("WATCHDOG=1");

    agent.stop();
    agent_notify.wait_for("STOPPING=1");
    exchange.stop();
    ex_notify.wait_for("STOPPING=1");
}

// ---------------------------------------------------------------------------------
// Exit status 78
// ---------------------------------------------------------------------------------

fn agent_cmd(args: &[&str], config: &Path) -> Output {
    Command::new(bin("ferry-agent"))
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn exchange_serve(config: &Path) -> Output {
    exchange_cmd("serve", config)
}

fn exchange_cmd(sub: &str, config: &Path) -> Output {
    Command::new(bin("ferry-exchange"))
        .arg(sub)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A configuration that cannot work makes both daemons exit 78 at once, naming
/// the file (and line, where there is one); failures that are not the
/// configuration's keep exiting 1.
#[test]
fn config_errors_exit_78() {
    let t = TestDir::new("service-exit78");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));

    // The agent: an unknown key, and no file at all.
    let bad = t.path().join("agent-bad.toml");
    std::fs::write(
        &bad,
        agent
            .config_text()
            .replacen("[agent]\n", "[agent]\ncolour = \"red\"\n", 1),
    )
    .unwrap();
    let missing = t.path().join("nowhere").join("agent.toml");
    for (args, config) in [
        (&["run"][..], &bad),
        (&["check-config"][..], &bad),
        (&["check-config", "--strict"][..], &bad),
        (&["run", "--daemon"][..], &bad),
        (&["run"][..], &missing),
        (&["check-config"][..], &missing),
    ] {
        let out = agent_cmd(args, config);
        let err = stderr_of(&out);
        assert_eq!(
            out.status.code(),
            Some(EX_CONFIG),
            "ferry-agent {args:?} --config {}: {err}",
            config.display()
        );
        assert!(
            err.contains(&config.display().to_string()),
            "names the file: {err}"
        );
    }
    let at = format!(
        "agent-bad.toml:{}:1: unknown field",
        line_of(&agent.config_text(), "[agent]") + 1
    );
    let err = stderr_of(&agent_cmd(&["run"], &bad));
    assert!(err.contains(&at), "points at {at}: {err}");
    // `status` of a broken file is no daemon start: it keeps exiting 1.
    assert_eq!(agent_cmd(&["status"], &bad).status.code(), Some(1));

    // The exchange: an unknown key, a value it refuses, no file at all.
    let good = std::fs::read_to_string(&ex.config).unwrap();
    let unknown = t.path().join("exchange-unknown.toml");
    std::fs::write(
        &unknown,
        good.replacen("[exchange]\n", "[exchange]\ncolour = \"red\"\n", 1),
    )
    .unwrap();
    let invalid = t.path().join("exchange-invalid.toml");
    // init writes no [limits]; a bound of no connections at all is refused.
    assert!(!good.contains("[limits]"), "{good}");
    std::fs::write(&invalid, format!("{good}\n[limits]\nmax_connections = 0\n")).unwrap();
    let nowhere = t.path().join("nowhere").join("exchange.toml");
    // A certificate file that is not there: `serve` and `check-config` both
    // refuse it, naming it.
    let no_cert = ex.dir.join("exchange-no-cert.toml");
    let gone = t.path().join("gone.pem");
    std::fs::write(
        &no_cert,
        replace_key(&good, "cert", &format!("\"{}\"", gone.display())),
    )
    .unwrap();
    for config in [&unknown, &invalid, &nowhere, &no_cert] {
        for sub in ["serve", "check-config"] {
            let out = exchange_cmd(sub, config);
            let err = stderr_of(&out);
            assert_eq!(
                out.status.code(),
                Some(EX_CONFIG),
                "ferry-exchange {sub} --config {}: {err}",
                config.display()
            );
            assert!(
                err.contains(&config.display().to_string()),
                "names the file: {err}"
            );
        }
    }
    let err = stderr_of(&exchange_cmd("check-config", &no_cert));
    assert!(err.contains("gone.pem"), "names the certificate: {err}");
    let out = exchange_cmd("check-config", &ex.config);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK"),
        "{}",
        stderr_of(&out)
    );

    // Not the configuration's fault: a second exchange on a store one already
    // serves (the store is locked) is refused with status 1.
    let out = exchange_serve(&ex.config);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a second exchange on the same store: {}",
        stderr_of(&out)
    );
    ex.assert_alive();
    ex.stop();
}

// ---------------------------------------------------------------------------------
// --daemon --log-file
// ---------------------------------------------------------------------------------

/// A process this test started with `--daemon` (not its child: daemonize forks
/// twice), killed if the test fails.
struct Daemon {
    pid: i32,
}

impl Daemon {
    fn alive(&self) -> bool {
        // A zombie (exited, not yet reaped by whoever adopted it) is gone too.
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => !matches!(
                stat.rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().next()),
                Some("Z" | "X")
            ),
            Err(_) => false,
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid this test read from the agent's pid file.
        let rc = unsafe { libc::kill(self.pid, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid);
    }

    fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        wait_until(SHORT, "the daemonised agent to exit", || !self.alive());
        self.pid = 0;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.pid > 0 && self.alive() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn text_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// An agent detached with `--daemon --log-file` logs its start to the file. After
/// the file is renamed (as logrotate does) and the agent gets SIGUSR1, a new file
/// at the original path receives the new lines and the renamed one stops growing;
/// SIGHUP does the same.
#[test]
fn daemon_log_file_is_reopened_on_sigusr1_and_sighup() {
    let t = TestDir::new("service-logfile");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let source = t.mkdir("logs").join("app.log");
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &source));
    let logs = t.mkdir("agent-logs");
    let log = logs.join("agent.log");
    let pid_file = t.path().join("agent.pid");

    // Step 1: start it detached. The command returns once the agent has forked
    // away; the daemon writes its pid file.
    let status = Command::new(bin("ferry-agent"))
        .arg("run")
        .arg("--config")
        .arg(&agent.config)
        .arg("--daemon")
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("--log-file")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ferry-agent run --daemon: {status}");
    let pid = wait_for(SHORT, "the pid file", || {
        text_of(&pid_file).trim().parse::<i32>().ok()
    });
    let mut daemon = Daemon { pid };
    wait_until(SHORT, "the startup lines in the log file", || {
        text_of(&log).contains("agent running")
    });
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o640,
        "a log file the agent creates is mode 0640"
    );
    assert!(
        Agent::status_at(&agent.config).is_some(),
        "the daemon answers status"
    );

    // Step 2: it ships while detached.
    append_lines(&source, &["one", "two"]);
    ex.wait_lines(AGENT, "hall-log", 2, LONG);

    // Step 3: rotate as logrotate does: rename, then SIGUSR1.
    let rotated = logs.join("agent.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    daemon.signal(libc::SIGUSR1);
    wait_until(SHORT, "the reopened log file", || {
        text_of(&log).contains("log file reopened")
    });
    let old_size = size_of(&rotated);
    let old = text_of(&rotated);
    assert!(
        old.contains("agent running"),
        "the startup lines stay in the old file"
    );
    assert!(
        !old.contains("log file reopened"),
        "the old file has no line of after: {old}"
    );

    // Step 4: SIGHUP reopens too (and reloads the configuration).
    std::fs::rename(&log, logs.join("agent.log.0")).unwrap();
    daemon.signal(libc::SIGHUP);
    wait_until(SHORT, "the log file reopened on SIGHUP", || {
        text_of(&log).contains("signal=\"SIGHUP\"") || text_of(&log).contains("signal=SIGHUP")
    });
    assert!(daemon.alive(), "SIGHUP did not end the agent");

    // Step 5: a clean stop logs into the newest file; the rotated ones stayed put.
    daemon.stop();
    assert!(
        text_of(&log).contains("stopped"),
        "the last lines went to the new file: {}",
        text_of(&log)
    );
    assert_eq!(
        size_of(&rotated),
        old_size,
        "the renamed file stopped growing"
    );
    ex.stop();
}
