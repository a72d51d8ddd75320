//! Bad input never takes a daemon down: garbage datagrams, agents with certificates
//! from another CA, configurations that are wrong in the ways operators get them
//! wrong. Each is refused with a message that says what is wrong, and a running
//! exchange (and agent) carries on serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};

use ferry_tests::*;
use rand::Rng;

const DEPT: &str = "210102-MZ";

/// Lines `prefix-000000..` appended to `log`.
fn some_lines(log: &Path, prefix: &str, n: usize) -> Vec<String> {
    let lines: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:06}")).collect();
    append_lines(log, &lines);
    lines
}

/// ~1000 garbage datagrams (random bytes, and random bytes dressed as QUIC v1
/// Initial packets) sent to the exchange's port do not hurt it: it keeps running
/// and an agent that connects afterwards gets its lines stored.
#[test]
fn garbage_datagrams_do_not_stop_the_exchange() {
    let t = TestDir::new("bad-udp");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = rand::rng();
    for i in 0..1000 {
        let len = rng.random_range(1..=1500);
        let mut d = random_bytes(len);
        if i % 2 == 0 && len >= 1200 {
            // Long header, Initial, version 1: the server has to try decrypting it.
            d[0] = 0xc0 | (d[0] & 0x0f);
            d[1..5].copy_from_slice(&1u32.to_be_bytes());
            d[5] = 8;
        }
        sock.send_to(&d, ("127.0.0.1", ex.port)).unwrap();
    }
    note("1000 datagrams sent");
    ex.assert_alive();

    let mut agent = ex.enroll("hp-mz-01", DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    let want = some_lines(&log, "after-garbage", 100);
    agent.start();
    let got = ex.wait_lines("hp-mz-01", "hall-log", want.len(), LONG);
    assert_same_sequence(&got, &want, "lines after the garbage");
    assert!(ex.is_running());
    agent.stop();
    ex.stop();
}

/// An agent enrolled by another exchange (another CA), pointed at this exchange,
/// does not get in: with its own CA it rejects the exchange's certificate, and given
/// this exchange's CA the exchange rejects its certificate. Either way `status`
/// shows it not connected with a last error about the certificate, nothing is stored
/// under its id, and the exchange keeps serving its own agent.
#[test]
fn agent_from_another_ca_is_refused() {
    let t = TestDir::new("bad-ca");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut own = ex.enroll("hp-mz-01", DEPT, &t.path().join("own"));
    let own_log = t.mkdir("own-logs").join("app.log");
    own.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &own_log));
    own.start();

    // A second CA: another exchange, never started, enrolls "hp-xx-09".
    let other = Exchange::init(&t.mkdir("other-exchange"));
    let mut stranger = other.enroll("hp-xx-09", "999999-XX", &t.path().join("stranger"));
    stranger.set("address", &format!("\"localhost:{}\"", ex.port));
    let stranger_log = t.mkdir("stranger-logs").join("app.log");
    stranger.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &stranger_log));
    some_lines(&stranger_log, "stranger", 50);

    // 1. The stranger trusts only its own CA: it refuses the exchange's certificate.
    stranger.start();
    let st = wait_for(LONG, "the stranger to report a connection error", || {
        let st = stranger.status();
        st["connection"]["last_error"]
            .as_str()
            .is_some()
            .then_some(st)
    });
    note(format!("stranger (own CA): {}", st["connection"]));
    assert_ne!(st["connection"]["state"], "connected", "{st}");
    let err = st["connection"]["last_error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(
        err.contains("certificate"),
        "last_error names the certificate problem: {err}"
    );
    stranger.stop();

    // 2. The stranger trusts this exchange's CA: now the exchange refuses it. Every
    // error it reports over several attempts (in `status` and in its log, which has
    // one line per attempt) must say why.
    std::fs::copy(ex.dir.join("ca.pem"), stranger.dir.join("ca.pem")).unwrap();
    stranger.start();
    let mut errors = std::collections::BTreeSet::new();
    wait_until(LONG, "six refused attempts", || {
        let st = stranger.status();
        assert_ne!(
            st["connection"]["state"], "connected",
            "the stranger got in: {st}"
        );
        if let Some(e) = st["connection"]["last_error"].as_str() {
            errors.insert(e.to_string());
        }
        st["connection"]["attempts"].as_u64().unwrap_or(0) >= 6 && !errors.is_empty()
    });
    for line in stranger.log_since_start().lines() {
        if line.contains("not connected to the exchange") {
            if let Some((_, e)) = line.split_once("error=") {
                errors.insert(e.trim().to_string());
            }
        }
    }
    note(format!("stranger (exchange's CA) errors: {errors:?}"));
    let s = stranger.stream_status("hall-log");
    assert_eq!(
        s["acked_seq"], 0,
        "nothing acknowledged to the stranger: {s}"
    );

    // The exchange is still up, stored nothing for the stranger, and still serves
    // its own agent.
    ex.assert_alive();
    assert!(
        ex.records("hp-xx-09", "hall-log").is_empty(),
        "nothing stored for the stranger"
    );
    assert!(
        ex.agents().iter().all(|a| a["agent_id"] != "hp-xx-09"),
        "the stranger is not a known agent: {:?}",
        ex.agents()
    );
    let want = some_lines(&own_log, "own", 100);
    let got = ex.wait_lines("hp-mz-01", "hall-log", want.len(), LONG);
    assert_same_sequence(&got, &want, "the exchange's own agent");

    // Checked last, so the checks above run whatever this finds.
    for e in &errors {
        let e = e.to_lowercase();
        assert!(
            e.contains("certificate") || e.contains("tls") || e.contains("handshake"),
            "last_error names the TLS/certificate problem: {e:?} (all seen: {errors:?})"
        );
    }

    stranger.stop();
    own.stop();
    ex.stop();
}

/// An agent whose configured `id` is not the name in its certificate cannot speak
/// for another agent: `check-config` refuses the file naming both ids, and `run`
/// exits non-zero without starting.
#[test]
fn agent_id_must_match_its_certificate() {
    let t = TestDir::new("bad-id");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let agent = ex.enroll("hp-mz-01", DEPT, &t.path().join("agent"));
    assert!(
        Agent::check_config(&agent.config).status.success(),
        "the enrolled config is valid"
    );
    agent.set("id", "\"hp-mz-02\"");

    let out = Agent::check_config(&agent.config);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(78), "check-config refuses: {err}");
    assert!(
        err.contains("hp-mz-02") && err.contains("hp-mz-01") && err.contains("does not match"),
        "the message names the mismatch: {err}"
    );
    assert!(
        err.contains("agent.toml:"),
        "the message names the file: {err}"
    );

    let out = Agent::run_to_exit(&agent.config, SHORT);
    let run_err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "run refuses: {run_err}");
    assert!(
        run_err.contains("does not match"),
        "run says why: {run_err}"
    );
    ex.assert_alive();
    assert!(ex.agents().is_empty(), "no agent reached the exchange");
    ex.stop();
}

/// A copy of `agent`'s config, changed by `f`, in its own directory.
fn variant(agent: &Agent, t: &TestDir, name: &str, f: impl FnOnce(String) -> String) -> PathBuf {
    let dir = t.mkdir(name);
    let path = dir.join("agent.toml");
    std::fs::write(&path, f(agent.config_text())).unwrap();
    path
}

/// What `check-config` (plain and `--strict`) and `run` say about a broken config:
/// all exit 78 (EX_CONFIG), and the message names `PATH:LINE:` and contains each of
/// `needles`.
fn assert_refused(config: &Path, line: usize, needles: &[&str]) -> String {
    let at = format!("{}:{line}:", config.display());
    let mut err = String::new();
    for strict in [false, true] {
        let out = if strict {
            Agent::check_config_strict(config)
        } else {
            Agent::check_config(config)
        };
        err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(
            out.status.code(),
            Some(78),
            "check-config (strict: {strict}) exit code for {}: {err}",
            config.display()
        );
        assert!(err.contains(&at), "the error points at {at}: {err}");
        for n in needles {
            assert!(err.contains(n), "the error mentions {n:?}: {err}");
        }
    }
    let out = Agent::run_to_exit(config, SHORT);
    let run_err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(78),
        "run refuses {}: {run_err}",
        config.display()
    );
    assert!(
        run_err.contains(&at),
        "run reports the same place {at}: {run_err}"
    );
    err
}

/// Configuration mistakes are refused with FILE:LINE:COL and a message naming the
/// problem — an unknown key, a wrong type, a missing certificate file, a stream
/// classified not-shared — while a running exchange and agent carry on.
#[test]
fn config_errors_name_file_line_and_problem() {
    let t = TestDir::new("bad-config");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll("hp-mz-01", DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    let out = Agent::check_config(&agent.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.start();
    let mut want = some_lines(&log, "before", 20);
    ex.wait_lines("hp-mz-01", "hall-log", want.len(), LONG);
    let good = agent.config_text();

    // Unknown key in [agent]: reported at the key, line and column 1.
    let line = line_of(&good, "[agent]") + 1;
    let cfg = variant(&agent, &t, "unknown-key", |t| {
        t.replacen("[agent]\n", "[agent]\ncolour = \"red\"\n", 1)
    });
    let err = assert_refused(&cfg, line, &["unknown field", "colour"]);
    assert!(
        err.contains(&format!("agent.toml:{line}:1:")),
        "column 1: {err}"
    );

    // Wrong type.
    let line = line_of(&good, "max_size");
    let cfg = variant(&agent, &t, "wrong-type", |t| {
        replace_key(&t, "max_size", "true")
    });
    assert_refused(&cfg, line, &[]);

    // Missing certificate file: the message names the path. A plain `check-config`
    // (run before deploying) only warns about what this host lacks; `--strict` and
    // `run` refuse.
    let missing = t.path().join("nowhere").join("agent.pem");
    let line = line_of(&good, "cert =");
    let cfg = variant(&agent, &t, "missing-cert", |t| {
        replace_key(&t, "cert", &format!("\"{}\"", missing.display()))
    });
    let at = format!("{}:{line}:", cfg.display());
    let out = Agent::check_config(&cfg);
    let warn = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "plain check-config only warns: {warn}"
    );
    assert!(
        warn.contains("warning") && warn.contains(&at),
        "the warning points at {at}: {warn}"
    );
    assert!(
        warn.contains(&missing.display().to_string()),
        "the warning names the path: {warn}"
    );
    let out = Agent::check_config_strict(&cfg);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(78),
        "check-config --strict refuses: {err}"
    );
    assert!(
        err.contains(&at) && err.contains(&missing.display().to_string()),
        "names {at} and the path: {err}"
    );
    let out = Agent::run_to_exit(&cfg, SHORT);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(78), "run refuses: {err}");
    assert!(
        err.contains(&at) && err.contains(&missing.display().to_string()),
        "names {at} and the path: {err}"
    );

    // A stream classified not-shared must never be shipped.
    let line = line_of(&good, "sharing =");
    let cfg = variant(&agent, &t, "not-shared", |t| {
        replace_key(&t, "sharing", "\"not-shared\"")
    });
    assert_refused(&cfg, line, &["not-shared"]);

    // The daemons did not notice: both still up, lines still flow.
    ex.assert_alive();
    agent.assert_alive();
    want.extend(some_lines(&log, "after", 20));
    let got = ex.wait_lines("hp-mz-01", "hall-log", want.len(), LONG);
    assert_same_sequence(&got, &want, "lines after the config errors");
    agent.stop();
    ex.stop();
}
