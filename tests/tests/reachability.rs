//! Reachability: some networks block UDP. The agent then ships the same protocol
//! over TLS 1.3 on TCP to the same port, says so in `status`, and returns to
//! QUIC once UDP gets through again; no line is lost or stored twice on the way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ferry_tests::faults::{LineWriter, UdpProxy, Verdict};
use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";
const TAG: &str = "r";

/// The transport `status` shows while connected, if connected.
fn connected_over(agent: &Agent) -> Option<String> {
    let st = agent.status_json()?;
    (st["connection"]["state"] == "connected").then(|| {
        st["connection"]["transport"]
            .as_str()
            .unwrap_or("")
            .to_string()
    })
}

/// Lines at a steady rate through the fault proxy. UDP is dropped and the agent
/// restarted (kill -9), so it needs a new connection: it is on TCP within 10 s.
/// UDP passes again: it is back on QUIC within 60 s. Every line arrives once, in
/// order.
#[test]
fn blocked_udp_falls_back_to_tcp_and_returns_to_quic() {
    let t = TestDir::new("reach-udp-blocked");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let proxy = UdpProxy::start(ex.address().parse().unwrap());
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    agent.set("address", &format!("\"{}\"", proxy.address()));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    agent.start();

    // 1. Over QUIC, 1,000 lines a second.
    let writer = LineWriter::start(log, TAG, 1_000);
    ex.wait_lines(AGENT, "hall-log", 500, LONG);
    assert_eq!(connected_over(&agent).as_deref(), Some("quic"));

    // 2. UDP blocked; the restarted agent's QUIC handshake gets no answer.
    proxy.block_udp(true);
    agent.kill9();
    let restarted = Instant::now();
    agent.start();
    wait_until(
        Duration::from_secs(10),
        "the agent to connect over TCP",
        || connected_over(&agent).as_deref() == Some("tcp"),
    );
    let fell_back = restarted.elapsed();
    note(format!(
        "UDP blocked: on TCP {:.1} s after the agent restarted",
        fell_back.as_secs_f64()
    ));
    // Lines keep arriving over TCP.
    let so_far = ex.lines(AGENT, "hall-log").len();
    ex.wait_lines(AGENT, "hall-log", so_far + 3_000, LONG);
    assert_eq!(connected_over(&agent).as_deref(), Some("tcp"));
    // The exchange's registry says so too.
    let transport = |ex: &Exchange| {
        ex.agents()
            .iter()
            .find(|a| a["agent_id"] == AGENT)
            .map(|a| a["transport"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(transport(&ex).as_deref(), Some("tcp"));
    assert!(
        agent
            .log_since_start()
            .contains("falling back to TLS over TCP"),
        "the journal says the agent fell back"
    );

    // 3. UDP passes again: the agent probes QUIC and goes back to it.
    proxy.block_udp(false);
    let restored = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "the agent to be back on QUIC",
        || connected_over(&agent).as_deref() == Some("quic"),
    );
    note(format!(
        "UDP restored: back on QUIC {:.1} s later",
        restored.elapsed().as_secs_f64()
    ));
    assert!(
        agent.log_since_start().contains("back on QUIC"),
        "the journal says the agent is back on QUIC"
    );
    let so_far = ex.lines(AGENT, "hall-log").len();
    ex.wait_lines(AGENT, "hall-log", so_far + 1_000, LONG);
    assert_eq!(transport(&ex).as_deref(), Some("quic"));

    // 4. Every line once, in order.
    let produced = writer.finish();
    let got = ex.wait_lines(AGENT, "hall-log", produced, LONG);
    std::thread::sleep(Duration::from_millis(500));
    let again = ex.lines(AGENT, "hall-log");
    assert!(again.len() >= got.len());
    Verdict::of_lines(TAG, produced, &again).assert_clean("UDP blocked, then restored");
    assert!(ex.gaps(AGENT, "hall-log").is_empty());
    assert!(
        [
            "transport=tcp",
            "transport=\"tcp\"",
            "\"transport\":\"tcp\""
        ]
        .iter()
        .any(|t| ex.log_since_start().contains(t)),
        "the exchange logged the agent's TCP connection"
    );
    agent.stop();
}

/// Trust holds over TCP as over QUIC: an agent shipping over TCP (UDP blocked
/// from the start) is revoked; its link is closed at once and it is told why
/// (the exchange's close reason crosses TCP), every later TCP handshake is
/// refused, and `status` raises the revocation ALARM.
#[test]
fn a_revoked_agent_on_tcp_is_cut_off_and_told_why() {
    let t = TestDir::new("reach-revoked-tcp");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let proxy = UdpProxy::start(ex.address().parse().unwrap());
    proxy.block_udp(true);
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    agent.set("address", &format!("\"{}\"", proxy.address()));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    agent.start();
    let lines =
        |from: usize, to: usize| (from..to).map(|i| format!("line {i}")).collect::<Vec<_>>();
    append_lines(&log, &lines(0, 100));
    ex.wait_lines(AGENT, "hall-log", 100, LONG);
    assert_eq!(connected_over(&agent).as_deref(), Some("tcp"));

    let out = ex.revoke(&["--agent-id", AGENT, "--reason", "key-compromise"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "revoke failed: {stderr}");
    assert!(stderr.contains("1 open connection(s) closed"), "{stderr}");
    let alarm = wait_for(
        SHORT,
        "the agent to say its certificate was revoked",
        || {
            let st = agent.status();
            let e = st["connection"]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (st["connection"]["state"] != "connected"
                && e.contains("ALARM: the exchange revoked this agent's certificate"))
            .then_some(e)
        },
    );
    note(format!("revoked agent on TCP: {alarm}"));
    // A restarted agent's new TCP handshake is refused (the TLS alert reaches it
    // on its first read): the same ALARM, and nothing more arrives.
    append_lines(&log, &lines(100, 150));
    agent.kill9();
    agent.start();
    let alarm = wait_for(SHORT, "the restarted agent to say it was revoked", || {
        let st = agent.status();
        let e = st["connection"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        e.contains("ALARM: the exchange revoked this agent's certificate")
            .then_some(e)
    });
    note(format!("restarted, over TCP: {alarm}"));
    assert_eq!(ex.lines(AGENT, "hall-log"), lines(0, 100));
    assert_ne!(agent.status()["connection"]["state"], "connected");
    agent.stop();
}
