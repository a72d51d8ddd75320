//! Trust: the exchange operator revokes an agent's certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use ferry_tests::*;

const DEPT: &str = "210102-MZ";
const STREAM: &str = "hall-log";

fn lines(agent: &str, from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("{agent} line {i}")).collect()
}

fn enrolled(ex: &Exchange, t: &TestDir, id: &str) -> (Agent, std::path::PathBuf) {
    let agent = ex.enroll(id, DEPT, &t.path().join(id));
    let log = t.mkdir("logs").join(format!("{id}.log"));
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream(STREAM, "210100-MZ-0002", &log));
    (agent, log)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Two agents ship lines; the operator revokes one (`ferry-exchange revoke
/// --agent-id`) while both are connected. The revoked agent's connection is closed
/// at once and every new handshake refused (its status says why), also after the
/// exchange restarts; it keeps capturing into its buffer; the other agent is not
/// touched. Enrolled again with a new certificate, it drains its buffer: every line
/// arrives exactly once, in order.
#[test]
fn a_revoked_agent_is_cut_off_at_once_and_loses_nothing() {
    let t = TestDir::new("trust-revoke");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let (mut a, log_a) = enrolled(&ex, &t, "hp-mz-01");
    let (mut b, log_b) = enrolled(&ex, &t, "hp-mz-02");
    a.start();
    b.start();
    append_lines(&log_a, &lines("a", 0, 100));
    append_lines(&log_b, &lines("b", 0, 100));
    ex.wait_lines("hp-mz-01", STREAM, 100, LONG);
    ex.wait_lines("hp-mz-02", STREAM, 100, LONG);

    let out = ex.revoke(&["--agent-id", "hp-mz-01", "--reason", "key-compromise"]);
    assert!(out.status.success(), "revoke failed: {}", text(&out.stderr));
    let revoked: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0]["agent_id"], "hp-mz-01");
    assert_eq!(revoked[0]["reason"], "key-compromise");
    assert!(
        text(&out.stderr).contains("1 open connection(s) closed"),
        "{}",
        text(&out.stderr)
    );
    // Revoking again revokes nothing new.
    let again = ex.revoke(&["--agent-id", "hp-mz-01"]);
    assert!(again.status.success() && again.stdout.is_empty());

    wait_until(SHORT, "the revoked agent to be cut off", || {
        a.status()["connection"]["state"] != "connected"
    });
    append_lines(&log_a, &lines("a", 100, 200));
    append_lines(&log_b, &lines("b", 100, 200));
    ex.wait_lines("hp-mz-02", STREAM, 200, LONG);
    let refused = |a: &mut Agent| {
        wait_for(
            SHORT,
            "the agent to say its certificate was revoked",
            || {
                let st = a.status();
                let e = st["connection"]["last_error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (st["connection"]["state"] != "connected" && e.contains("revoked")).then_some(e)
            },
        )
    };
    note(format!("revoked agent: {}", refused(&mut a)));
    wait_until(SHORT, "the revoked agent to buffer its new lines", || {
        let s = a.stream_status(STREAM);
        s["head_seq"].as_u64() > s["acked_seq"].as_u64()
    });

    let revoked = |ex: &Exchange, id: &str| {
        ex.agents()
            .into_iter()
            .find(|a| a["agent_id"] == id)
            .map(|a| a["revoked"].clone())
    };
    assert_eq!(revoked(&ex, "hp-mz-01"), Some(serde_json::json!(true)));
    assert_eq!(revoked(&ex, "hp-mz-02"), Some(serde_json::json!(false)));
    // Both ends know when a certificate runs out (enrolment issues 825 days).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let in_800_days = now + 800 * 86_400;
    assert!(b.status()["cert_not_after_unix"].as_u64() > Some(in_800_days));
    wait_until(SHORT, "the exchange to hear the certificate's end", || {
        ex.agents().iter().any(|a| {
            a["agent_id"] == "hp-mz-02"
                && a["status"]["cert_not_after_unix"].as_u64() > Some(in_800_days)
        })
    });

    // The list survives the exchange.
    ex.kill9();
    ex.start();
    append_lines(&log_b, &lines("b", 200, 250));
    ex.wait_lines("hp-mz-02", STREAM, 250, LONG);
    std::thread::sleep(Duration::from_secs(3));
    note(format!("after an exchange restart: {}", refused(&mut a)));
    assert_eq!(ex.lines("hp-mz-01", STREAM), lines("a", 0, 100));

    // A new certificate for the same agent: what it buffered arrives, once.
    let fresh = t.path().join("hp-mz-01-again");
    ex.enroll("hp-mz-01", DEPT, &fresh);
    a.stop();
    for f in ["agent.pem", "agent.key"] {
        std::fs::copy(fresh.join(f), a.dir.join(f)).unwrap();
    }
    a.start();
    append_lines(&log_a, &lines("a", 200, 220));
    let got = ex.wait_lines("hp-mz-01", STREAM, 220, LONG);
    assert_eq!(got, lines("a", 0, 220));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ex.lines("hp-mz-01", STREAM), lines("a", 0, 220));
    assert_eq!(ex.lines("hp-mz-02", STREAM), lines("b", 0, 250));
    assert!(ex.gaps("hp-mz-01", STREAM).is_empty());
    assert_eq!(revoked(&ex, "hp-mz-01"), Some(serde_json::json!(false)));

    // What cannot be revoked says why.
    let none = ex.revoke(&["--agent-id", "nobody"]);
    assert!(!none.status.success());
    assert!(
        text(&none.stderr).contains("no certificate issued to \"nobody\""),
        "{}",
        text(&none.stderr)
    );
    let wrong = ex.revoke(&[
        "--agent-id",
        "hp-mz-02",
        "--cert",
        &Path::new(&fresh).join("agent.pem").display().to_string(),
    ]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains("is \"hp-mz-01\"'s certificate"),
        "{}",
        text(&wrong.stderr)
    );
    a.stop();
    b.stop();
    ex.stop();
}
