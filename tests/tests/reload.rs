//! Configuration reload of a running agent, with real processes under load:
//! `ferry-agent reload` and SIGHUP refuse a broken file (file:line:column,
//! exit 78) and change nothing; a valid one adds, removes and changes streams
//! in the same process, restarting only the streams it changes; `kill -9` in
//! the middle of a reload loses nothing.
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

/// `PROGRAM reload --config CONFIG` (`ferry-agent` or `ferry-exchange`).
fn reload(program: &str, config: &Path) -> Output {
    Command::new(bin(program))
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

/// A `reload` refused with exit 78, saying so and naming each of `names`.
fn assert_refused(out: &Output, names: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    for n in names.iter().chain(&["not reloaded"]) {
        assert!(stderr.contains(n), "{n:?} not in {stderr}");
    }
}

/// A `reload` taken, its answer naming each of `changes`.
fn assert_reloaded(out: &Output, changes: &[&str]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    for c in changes {
        assert!(stdout.contains(c), "{c:?} not in {stdout}");
    }
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
    let d = logs.join("d.log");
    for p in [&a, &b, &c, &d] {
        std::fs::write(p, b"").unwrap();
    }
    let config = agent.config.clone();
    let write = |streams: &[String]| {
        std::fs::write(&config, format!("{base}{}", streams.concat())).unwrap();
    };
    let stream_a = tail_stream("a", "210100-0001", &a);
    let stream_b = tail_stream("b", "210100-0002", &b);
    let stream_c = tail_stream("c", "210100-0003", &c);
    // d stays as it is through every reload.
    let stream_d = tail_stream("d", "210100-0004", &d);
    write(&[stream_a.clone(), stream_b.clone(), stream_d.clone()]);
    agent.start();
    let pid = agent.pid().unwrap();
    let wa = LineWriter::start(a.clone(), "a", 2000);
    let wb = LineWriter::start(b.clone(), "b", 2000);
    let wc = LineWriter::start(c.clone(), "c", 2000);
    let wd = LineWriter::start(d.clone(), "d", 2000);
    ex.wait_lines(AGENT, "a", 200, SHORT);

    // A broken file: refused by `reload` with where the error is, and by
    // SIGHUP in the log; the running configuration stays.
    write(&[
        stream_a.clone(),
        stream_b.clone(),
        stream_d.clone(),
        "\n[[stream]]\nname = \"broken\"\n".to_string(),
    ]);
    assert_refused(&reload("ferry-agent", &config), &["agent.toml:"]);
    sighup(pid);
    wait_until(SHORT, "the SIGHUP reload to be refused", || {
        agent.log_since_start().contains("reload refused")
    });
    // (`status` itself reads the file for the admin socket: the good one back.)
    write(&[stream_a.clone(), stream_b.clone(), stream_d.clone()]);
    assert_eq!(stream_names(&mut agent), ["a", "b", "d"]);
    assert_eq!(agent.pid(), Some(pid));

    // Remove b, add c, change a: applied by the same process.
    let changed_a = stream_a.replace(" }", ", max_batch_lines = 50 }");
    assert_ne!(changed_a, stream_a);
    write(&[changed_a.clone(), stream_c.clone(), stream_d.clone()]);
    assert_reloaded(
        &reload("ferry-agent", &config),
        &["added c", "removed b", "changed a"],
    );
    let produced_b = wb.finish();
    assert_eq!(agent.pid(), Some(pid), "the agent was not restarted");
    let names = stream_names(&mut agent);
    assert!(
        names.starts_with(&["a".to_string(), "c".to_string(), "d".to_string()]),
        "{names:?}"
    );
    ex.wait_lines(AGENT, "c", 200, SHORT);

    // The same file again, by SIGHUP: nothing restarts.
    sighup(pid);
    wait_until(SHORT, "the SIGHUP reload", || {
        agent.log_since_start().contains("the file is unchanged")
    });
    // Only the streams a reload changed or added were started again.
    let text = agent.log_since_start();
    let starts = |stream: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("stream={stream} ")) && l.contains("source starting"))
            .count()
    };
    assert_eq!(
        [starts("a"), starts("b"), starts("c"), starts("d")],
        [2, 1, 1, 1],
        "{text}"
    );

    // A renewed certificate put in place, the file unchanged: the reload
    // reconnects with it, so revoking the old one cuts nothing off.
    let old_cert = agent.dir.join("old-agent.pem");
    std::fs::copy(agent.dir.join("agent.pem"), &old_cert).unwrap();
    let renewed = t.path().join("renewed");
    let out = ex.enroll_output(AGENT, DEPT, &renewed, &["--replace"]);
    assert!(out.status.success(), "{out:?}");
    for f in ["agent.pem", "agent.key"] {
        std::fs::copy(renewed.join(f), agent.dir.join(f)).unwrap();
    }
    let reloads = agent
        .log_since_start()
        .matches("configuration reloaded")
        .count();
    sighup(pid);
    wait_until(SHORT, "the reload with the renewed certificate", || {
        agent
            .log_since_start()
            .matches("configuration reloaded")
            .count()
            > reloads
    });
    let out = ex.revoke(&[
        "--cert",
        old_cert.to_str().unwrap(),
        "--reason",
        "superseded",
    ]);
    assert!(out.status.success(), "{out:?}");
    let before = ex.lines(AGENT, "d").len();
    ex.wait_lines(AGENT, "d", before + 500, SHORT);
    assert_eq!(
        agent.status()["connection"]["state"],
        "connected",
        "the agent was cut off with its renewed certificate"
    );

    // Killed in the middle of the next reload (c changes): the new process
    // resumes from the durable positions.
    write(&[
        changed_a.clone(),
        stream_c.replace(" }", ", max_batch_lines = 70 }"),
        stream_d.clone(),
    ]);
    sighup(pid);
    std::thread::sleep(Duration::from_millis(20));
    agent.kill9();
    agent.start();
    std::thread::sleep(Duration::from_secs(1));
    let produced_a = wa.finish();
    let produced_c = wc.finish();
    let produced_d = wd.finish();

    for (stream, tag, produced) in [
        ("a", "a", produced_a),
        ("c", "c", produced_c),
        ("d", "d", produced_d),
    ] {
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
    for stream in ["a", "c", "d"] {
        assert!(ex.gaps(AGENT, stream).is_empty(), "gaps in {stream}");
    }
    agent.assert_alive();
}

fn files_delivery(name: &str, out: &Path) -> String {
    format!(
        "\n[[delivery]]\nname = \"{name}\"\nkind = \"files\"\npath = \"{}\"\nstreams = [\"{AGENT}/drop\"]\n",
        out.display()
    )
}

/// The exchange reads its configuration again under load, in the same
/// process: a broken file and a change to what is bound for its life are
/// refused and change nothing; a valid one adds, changes and removes
/// deliveries and takes new limits and thresholds; `kill -9` in the middle of
/// a reload loses nothing. Every file arrives in the store once, and a
/// delivery added by a reload delivers every one of them.
#[test]
fn exchange_reload_under_load_applies_deliveries_and_refuses_broken_files() {
    let t = TestDir::new("reload-exchange");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let (first, second) = (t.path().join("first"), t.path().join("second"));
    let base = std::fs::read_to_string(&ex.config).unwrap();
    let config = ex.config.clone();
    let write =
        |extra: &[String]| std::fs::write(&config, format!("{base}{}", extra.concat())).unwrap();
    write(&[files_delivery("first", &first)]);
    ex.start();
    let pid = ex.pid();
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let outbox = t.mkdir("outbox");
    agent.add_stream(&outbox_stream("drop", "210100-0005", &outbox));
    agent.start();

    // Files keep arriving through everything below.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, outbox) = (stop.clone(), outbox.clone());
        std::thread::spawn(move || {
            let mut want = std::collections::BTreeMap::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = random_bytes(500 + i * 37 % 3000);
                let name = format!("f-{i:05}.csv");
                write_atomic(&outbox, &name, &data);
                want.insert(format!("{AGENT}/drop/{name}"), sha256_hex(&data));
                i += 1;
                std::thread::sleep(Duration::from_millis(15));
            }
            want
        })
    };
    wait_until(LONG, "the first delivery to deliver", || {
        tree(&first).len() >= 20
    });

    // A broken file: refused with where the error is, by `reload` and by
    // SIGHUP; the running configuration stays.
    write(&[
        files_delivery("first", &first),
        "\n[[delivery]]\nname = \"broken\"\nkind = \"nowhere\"\n".to_string(),
    ]);
    assert_refused(&reload("ferry-exchange", &config), &["exchange.toml:"]);
    sighup(pid.unwrap());
    wait_until(SHORT, "the SIGHUP reload to be refused", || {
        ex.log_since_start().contains("reload refused")
    });
    // What is bound for the process's life: refused, naming what to do.
    std::fs::write(
        &config,
        format!("{base}{}", files_delivery("first", &first))
            .replace("cache_size = ", "cache_size = 1"),
    )
    .unwrap();
    assert_refused(&reload("ferry-exchange", &config), &["[store]", "restart"]);
    assert!(ex.deliveries().iter().all(|l| l["delivery"] == "first"));

    // Add a delivery, change the limits and a threshold.
    let limits = "\n[limits]\nframe_timeout = \"30s\"\n\n[dashboard]\nbacklog_alarm = \"2GiB\"\n";
    write(&[
        files_delivery("first", &first),
        files_delivery("second", &second),
        limits.to_string(),
    ]);
    assert_reloaded(
        &reload("ferry-exchange", &config),
        &["delivery added: second", "[limits] changed"],
    );
    wait_until(LONG, "the added delivery to deliver", || {
        tree(&second).len() >= 20
    });

    // Remove the first by SIGHUP.
    write(&[files_delivery("second", &second), limits.to_string()]);
    sighup(pid.unwrap());
    wait_until(SHORT, "the SIGHUP reload", || {
        ex.log_since_start().contains("delivery removed: first")
    });
    wait_until(SHORT, "the removed delivery to leave `deliveries`", || {
        ex.deliveries().iter().all(|l| l["delivery"] == "second")
    });
    let delivered_first = tree(&first);
    assert_eq!(ex.pid(), pid, "the exchange was not restarted");

    // Killed in the middle of a reload that changes the second delivery: the
    // new process resumes from its checkpoint.
    write(&[files_delivery("second", &second).replace(
        &format!("[\"{AGENT}/drop\"]"),
        &format!("[\"{AGENT}/drop\", \"{AGENT}/other\"]"),
    )]);
    sighup(pid.unwrap());
    std::thread::sleep(Duration::from_millis(20));
    ex.kill9();
    ex.start();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let want = writer.join().unwrap();

    // Every file once in the store; the added delivery has every one, whole;
    // the removed one what it delivered before, whole, and nothing since.
    let stored = wait_for(LONG, "every file stored", || {
        let f = ex.files(AGENT, "drop");
        (f.len() >= want.len()).then_some(f)
    });
    assert_eq!(stored.len(), want.len(), "a file was stored twice");
    assert!(ex.gaps(AGENT, "drop").is_empty());
    wait_until(LONG, "the second delivery to deliver every file", || {
        tree(&second) == want
    });
    for (name, sum) in &delivered_first {
        assert_eq!(want.get(name), Some(sum), "{name} of the removed delivery");
    }
    assert_eq!(
        tree(&first),
        delivered_first,
        "the removed delivery delivered more"
    );
    note(format!(
        "{} files stored and delivered by the added delivery; the removed one delivered {}",
        want.len(),
        delivered_first.len()
    ));
    agent.assert_alive();
}
