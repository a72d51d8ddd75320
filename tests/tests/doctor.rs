//! `ferry-agent doctor` checks the link to a real exchange: all well; the
//! exchange down (UDP and TCP, each with its fix); a name that does not
//! resolve; a CA that is not the exchange's; a revoked certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use ferry_tests::*;

const AGENT: &str = "hp-dr-01";

/// Exit status and stdout of `ferry-agent doctor`.
fn doctor(config: &Path) -> (i32, String) {
    doctor_with(config, &[])
}

/// [`doctor`] with these variables in its environment.
fn doctor_with(config: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin("ferry-agent"))
        .args(["doctor", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    note(format!("doctor:\n{text}"));
    (out.status.code().unwrap_or(-1), text)
}

/// The line of check `name`, and the `fix:` line after it (if any).
fn line_of_check<'t>(text: &'t str, name: &str) -> (&'t str, Option<&'t str>) {
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.contains(name) {
            let fix = lines.next().filter(|f| f.trim_start().starts_with("fix:"));
            return (l, fix);
        }
    }
    panic!("no check {name:?} in:\n{text}");
}

#[test]
fn doctor_checks_the_link_to_the_exchange() {
    let t = TestDir::new("doctor");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let agent = ex.enroll(AGENT, "210102-DR", &t.path().join("agent"));

    let (code, out) = doctor(&agent.config);
    assert_eq!(code, 0, "{out}");
    for name in [
        "exchange: certificate files",
        "exchange: agent certificate",
        "exchange: DNS",
        "exchange: QUIC (UDP)",
        "exchange: TLS over TCP",
        "exchange: clock",
    ] {
        let (line, _) = line_of_check(&out, name);
        assert!(line.starts_with("ok"), "{line}");
    }
    assert!(line_of_check(&out, "exchange: QUIC (UDP)")
        .0
        .contains("handshake with"));
    assert!(
        line_of_check(&out, "exchange: clock")
            .0
            .contains("in step with the exchange's"),
        "{out}"
    );
    let connected = ex.agents();

    // This host's clock 30 s behind the exchange's (libfaketime fakes the
    // doctor's wall clock only).
    let lib = libfaketime();
    if host_has(
        lib.is_some(),
        "libfaketime is missing: install the Debian package faketime",
    ) {
        let lib = lib.unwrap();
        let (code, out) = doctor_with(
            &agent.config,
            &[
                ("LD_PRELOAD", lib.to_str().unwrap()),
                ("FAKETIME", "-30s"),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        );
        assert_eq!(code, 1, "{out}");
        let (line, fix) = line_of_check(&out, "exchange: clock");
        assert!(
            line.starts_with("FAIL") && line.contains("behind the exchange's"),
            "{out}"
        );
        let ahead: i64 = line
            .split_once('(')
            .and_then(|(_, r)| r.split_once(" ms"))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or_else(|| panic!("no offset in {line}"));
        assert!((29_000..=31_000).contains(&ahead), "{line}");
        assert!(fix.unwrap().contains("timedatectl set-ntp true"), "{out}");
        for name in ["exchange: QUIC (UDP)", "exchange: TLS over TCP"] {
            let (line, _) = line_of_check(&out, name);
            assert!(line.starts_with("ok"), "{line}");
        }
    }
    // The doctor's connections opened no session: the exchange lists no
    // agent it did not list before.
    assert_eq!(ex.agents(), connected);

    // A CA that did not sign the exchange's certificate.
    let ca = agent.dir.join("ca.pem");
    let good_ca = std::fs::read(&ca).unwrap();
    std::fs::write(
        &ca,
        ferry_transport::pki::create_ca("another CA")
            .unwrap()
            .cert_pem,
    )
    .unwrap();
    let (code, out) = doctor(&agent.config);
    assert_eq!(code, 1);
    let (line, fix) = line_of_check(&out, "exchange: QUIC (UDP)");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(fix.unwrap().contains("exchange.ca"), "{out}");
    std::fs::write(&ca, good_ca).unwrap();

    // A name that does not resolve.
    let config = std::fs::read_to_string(&agent.config).unwrap();
    let address = config
        .lines()
        .find_map(|l| l.strip_prefix("address = "))
        .unwrap()
        .to_string();
    agent.set("address", "\"no-such-exchange.invalid:4433\"");
    let (code, out) = doctor(&agent.config);
    assert_eq!(code, 1);
    let (line, fix) = line_of_check(&out, "exchange: DNS");
    assert!(line.starts_with("FAIL") && fix.is_some(), "{out}");
    agent.set("address", &address);

    // A revoked certificate: the handshake completes, then the exchange closes.
    let revoked = ex.revoke(&["--agent-id", AGENT, "--reason", "key-compromise"]);
    assert!(revoked.status.success());
    let (code, out) = doctor(&agent.config);
    assert_eq!(code, 1);
    let (line, fix) = line_of_check(&out, "exchange: QUIC (UDP)");
    assert!(
        line.starts_with("FAIL") && line.contains("revoked"),
        "{out}"
    );
    assert!(fix.unwrap().contains("enrol the agent again"), "{out}");

    // The exchange down: neither UDP nor TCP answers, each with its fix.
    ex.stop();
    let (code, out) = doctor(&agent.config);
    assert_eq!(code, 1);
    let (quic, quic_fix) = line_of_check(&out, "exchange: QUIC (UDP)");
    assert!(quic.starts_with("FAIL"), "{quic}");
    assert!(quic_fix.unwrap().contains("UDP"), "{out}");
    let (tcp, tcp_fix) = line_of_check(&out, "exchange: TLS over TCP");
    assert!(tcp.starts_with("FAIL") && tcp_fix.is_some(), "{out}");
}
