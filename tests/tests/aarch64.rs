//! The agent built for aarch64 (Kunpeng, Phytium), run under qemu-user
//! against this build's exchange: it captures a tailed file, is killed with
//! `kill -9` mid-flight and started again on its buffer, and every line
//! arrives once, in order. `packaging/cross-aarch64.sh` builds the binary
//! (Debian's rustc-web with `libstd-rust-web-dev:arm64`), runs the unit tests
//! under qemu and then this test with `FERRY_AGENT_AARCH64` naming it
//! (`FERRY_FULL=1 bash .ci/run` runs the script); without it the test says so
//! and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use ferry_tests::faults::{LineWriter, Verdict};
use ferry_tests::*;

const AGENT: &str = "hp-kp-01";
const DEPT: &str = "210102-KP";
const STREAM: &str = "hall";

#[test]
fn the_aarch64_agent_under_qemu_ships_through_a_kill() {
    let Some(binary) = std::env::var_os("FERRY_AGENT_AARCH64").map(PathBuf::from) else {
        note("FERRY_AGENT_AARCH64 is not set: packaging/cross-aarch64.sh builds the aarch64 agent and runs this test");
        return;
    };
    assert!(binary.is_file(), "{} is missing", binary.display());
    let t = TestDir::new("aarch64");
    // qemu-user runs the binary with the arm64 C library Debian's multiarch
    // packages installed (/lib/ld-linux-aarch64.so.1).
    let wrapper = t.path().join("ferry-agent-aarch64");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec qemu-aarch64-static '{}' \"$@\"\n",
            binary.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let version = std::process::Command::new(&wrapper)
        .arg("--version")
        .output()
        .unwrap();
    assert!(version.status.success(), "{version:?}");
    note(format!(
        "under qemu: {}",
        String::from_utf8_lossy(&version.stdout).trim()
    ));

    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("hall.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream(STREAM, "210100-KP-0001", &log));
    agent.set_program(Some(wrapper));
    agent.start();
    let writer = LineWriter::start(log.clone(), "k", 1000);
    ex.wait_lines(AGENT, STREAM, 300, LONG);
    agent.kill9();
    std::thread::sleep(Duration::from_millis(300));
    agent.start();
    std::thread::sleep(Duration::from_secs(2));
    let produced = writer.finish();
    ex.wait_lines(AGENT, STREAM, produced, LONG);
    std::thread::sleep(Duration::from_millis(500));
    Verdict::of_lines("k", produced, &ex.lines(AGENT, STREAM))
        .assert_clean("the aarch64 agent through a kill -9");
    assert!(ex.gaps(AGENT, STREAM).is_empty());
    agent.assert_alive();
}
