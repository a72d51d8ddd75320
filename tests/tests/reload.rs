//! Configuration reload of a running agent, with real processes under load:
//! `ferry-agent reload` and SIGHUP refuse a broken file (file:line:column,
//! exit 78) and change nothing; a valid one adds, removes and changes streams
//! in the same process; `kill -9` in the middle of a reload loses nothing.
//! Every line of the streams that stay arrives once, in order; a removed
//! stream ships everything it had buffered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use ferry_tests::faults::{checked_line, LineWriter, Verdict};
use ferry_tests::*;

const AGENT: &str = "hp-rl-01";
const DEPT: &str = "210102-RL";

fn reload(config: &Path) -> Output {
    Command::new(bin("ferry-agent"))
        .args(["reload", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

fn stream_names(agent: &mut Agent) -> Vec<String> {
    agent.status()["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

fn sighup(pid: i32) {
    // SAFETY: kill has no memory preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

#[test]
fn reload_under_load_adds_removes_changes_and_refuses_broken_files() {
    let t = TestDir::new("reload");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let base = std::fs::read_to_string(&agent.config).unwrap();
    let logs = t.mkdir("logs");
    let (a, b, c) = (logs.join("a.log"), logs.join("b.log"), logs.join("c.log"));
    for p in [&a, &b, &c] {
        std::fs::write(p, b"").unwrap();
    }
    let config = agent.config.clone();
    let write = |streams: &[String]| {
        std::fs::write(&config, format!("{base}{}", streams.concat())).unwrap();
    };
    let stream_a = tail_stream("a", "210100-0001", &a);
    let stream_b = tail_stream("b", "210100-0002", &b);
    write(&[stream_a.clone(), stream_b.clone()]);
    agent.start();
    let pid = agent.pid().unwrap();
    let wa = LineWriter::start(a.clone(), "a", 2000);
    let wb = LineWriter::start(b.clone(), "b", 2000);
    let wc = LineWriter::start(c.clone(), "c", 2000);
    ex.wait_lines(AGENT, "a", 200, SHORT);

    // A broken file: refused by `reload` with where the error is, and by
    // SIGHUP in the log; the running configuration stays.
    write(&[
        stream_a.clone(),
        stream_b.clone(),
        "\n[[stream]]\nname = \"broken\"\n".to_string(),
    ]);
    let out = reload(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("agent.toml:") && stderr.contains("not reloaded"),
        "{stderr}"
    );
    sighup(pid);
    wait_until(SHORT, "the SIGHUP reload to be refused", || {
        agent.log_since_start().contains("reload refused")
    });
    // (`status` itself reads the file for the admin socket: the good one back.)
    write(&[stream_a.clone(), stream_b.clone()]);
    assert_eq!(stream_names(&mut agent), ["a", "b"]);
    assert_eq!(agent.pid(), Some(pid));

    // Remove b, add c, change a: applied by the same process.
    let changed_a = stream_a.replace(" }", ", max_batch_lines = 50 }");
    assert_ne!(changed_a, stream_a);
    write(&[changed_a.clone(), tail_stream("c", "210100-0003", &c)]);
    let out = reload(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("added c") && stdout.contains("removed b") && stdout.contains("changed a"),
        "{stdout}"
    );
    let produced_b = wb.finish();
    assert_eq!(agent.pid(), Some(pid), "the agent was not restarted");
    let names = stream_names(&mut agent);
    assert!(
        names.starts_with(&["a".to_string(), "c".to_string()]),
        "{names:?}"
    );
    ex.wait_lines(AGENT, "c", 200, SHORT);

    // The same file again, by SIGHUP: every stream starts again from its
    // durable position.
    sighup(pid);
    wait_until(SHORT, "the SIGHUP reload", || {
        agent.log_since_start().contains("the file is unchanged")
    });
    // Killed in the middle of the next reload: the new process resumes from
    // the durable positions.
    sighup(pid);
    std::thread::sleep(Duration::from_millis(20));
    agent.kill9();
    agent.start();
    std::thread::sleep(Duration::from_secs(1));
    let produced_a = wa.finish();
    let produced_c = wc.finish();

    for (stream, tag, produced) in [("a", "a", produced_a), ("c", "c", produced_c)] {
        let got = ex.wait_lines(AGENT, stream, produced, LONG);
        std::thread::sleep(Duration::from_millis(500));
        let again = ex.lines(AGENT, stream);
        assert!(again.len() >= got.len());
        Verdict::of_lines(tag, produced, &again).assert_clean(&format!("stream {stream}"));
    }
    // b: what its source read before it was removed, once and in order, and
    // nothing left unacknowledged in the buffer.
    wait_until(SHORT, "b's buffered batches to be acknowledged", || {
        agent.status()["streams"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == "b")
            .all(|s| s["acked_seq"] == s["head_seq"])
    });
    let got_b = ex.lines(AGENT, "b");
    assert!(!got_b.is_empty() && got_b.len() <= produced_b);
    for (i, line) in got_b.iter().enumerate() {
        assert_eq!(
            line,
            &checked_line("b", i),
            "line {i} of the removed stream"
        );
    }
    assert!(ex.gaps(AGENT, "a").is_empty() && ex.gaps(AGENT, "c").is_empty());
    agent.assert_alive();
}
