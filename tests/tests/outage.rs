//! Exchange outages: the agent buffers while the exchange is away, says so in
//! `status`, pauses its sources when the buffer is full, and delivers everything,
//! exactly once, when the exchange returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("line-{i:06}")).collect()
}

/// With the exchange killed, lines keep being produced: `status --json` shows the
/// connection is not `connected` and the stream's head ahead of its acked seq with
/// batches buffered. Once the exchange is back every line arrives, once, in order,
/// and the buffer drains to zero batches.
#[test]
fn agent_buffers_while_the_exchange_is_down() {
    let t = TestDir::new("outage-down");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));

    let mut want = numbered(0..200);
    append_lines(&log, &want);
    agent.start();
    ex.wait_lines(AGENT, "hall-log", want.len(), LONG);
    wait_until(SHORT, "status to show the first lines acknowledged", || {
        let s = agent.stream_status("hall-log");
        s["acked_seq"] == s["head_seq"] && s["buffered_batches"] == 0
    });
    assert_eq!(agent.status()["connection"]["state"], "connected");

    ex.kill9();
    note("exchange killed");
    // Lines keep coming while the exchange is away, in several bursts so that
    // several batches are buffered.
    for k in 0..5 {
        let burst = numbered(want.len()..want.len() + 300);
        append_lines(&log, &burst);
        want.extend(burst);
        let head = wait_for(SHORT, "the burst to be durable in the buffer", || {
            let s = agent.stream_status("hall-log");
            let off = tail_offset(s["position"].as_str().unwrap_or_default())?;
            (off == std::fs::metadata(&log).unwrap().len()).then(|| s["head_seq"].as_u64().unwrap())
        });
        note(format!("burst {k} durable up to seq {head}"));
    }
    // The agent notices the exchange is gone (at the latest when the QUIC idle
    // timeout expires) and reports what it holds.
    let st = wait_for(LONG, "status to show the connection down", || {
        let st = agent.status();
        (st["connection"]["state"] != "connected").then_some(st)
    });
    note(format!("connection: {}", st["connection"]));
    let s = agent.stream_status("hall-log");
    assert!(
        s["head_seq"].as_u64().unwrap() > s["acked_seq"].as_u64().unwrap(),
        "head ahead of acked while the exchange is down: {s}"
    );
    assert!(
        s["buffered_batches"].as_u64().unwrap() > 0,
        "batches buffered: {s}"
    );
    assert!(
        s["buffered_bytes"].as_u64().unwrap() > 0,
        "bytes buffered: {s}"
    );
    assert!(
        !agent.status()["buffer"]["full"].as_bool().unwrap(),
        "2 GiB buffer is not full"
    );

    ex.start();
    note("exchange restarted");
    let got = ex.wait_lines(AGENT, "hall-log", want.len(), LONG);
    assert_same_sequence(&got, &want, "lines after the outage");
    let s = wait_for(LONG, "the buffer to drain", || {
        let s = agent.stream_status("hall-log");
        (s["buffered_batches"] == 0).then_some(s)
    });
    assert_eq!(
        s["acked_seq"], s["head_seq"],
        "everything acknowledged: {s}"
    );
    assert_eq!(s["buffered_bytes"], 0, "{s}");
    assert_eq!(agent.status()["connection"]["state"], "connected");
    assert_same_sequence(&ex.lines(AGENT, "hall-log"), &want, "lines, finally");

    agent.stop();
    ex.stop();
}

/// An agent with a 64 KiB buffer and no exchange: ~2 MB of (incompressible) lines
/// fill the buffer; `status` raises `buffer.full` and the tail position stops
/// advancing short of the end of the file. When the exchange comes up every line
/// arrives exactly once, in order: backpressure paused the source, it dropped nothing.
#[test]
fn full_buffer_pauses_the_source_and_loses_nothing() {
    let t = TestDir::new("outage-full");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    agent.set("max_size", "\"64KiB\"");
    let log = t.mkdir("logs").join("app.log");
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));

    // ~2 MB: 16,000 lines of 128 bytes, random hex so compression cannot make them
    // fit in 64 KiB.
    let want: Vec<String> = (0..16_000)
        .map(|i| format!("line-{i:06} {}", random_hex(116)))
        .collect();
    append_lines(&log, &want);
    let file_len = std::fs::metadata(&log).unwrap().len();
    assert!(file_len >= 2_000_000, "{file_len} bytes written");
    agent.start();

    let st = wait_for(LONG, "status to report the buffer full", || {
        let st = agent.status();
        (st["buffer"]["full"] == true).then_some(st)
    });
    assert_ne!(
        st["connection"]["state"], "connected",
        "no exchange is running: {st}"
    );
    assert_eq!(st["buffer"]["max_bytes"], 64 << 10);
    assert!(st["buffer"]["bytes"].as_u64().unwrap() >= 64 << 10, "{st}");

    // The source is paused: its position stays put, short of the end of the file,
    // over several looks spread across a few seconds (a paused source has no reason
    // to move; this only checks that it really does not).
    let s = agent.stream_status("hall-log");
    let pos = s["position"].as_str().unwrap().to_string();
    let off = tail_offset(&pos).expect("a tail position");
    assert!(
        off < file_len,
        "paused before the end of the file ({off} < {file_len})"
    );
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        let st = agent.status();
        let s = agent.stream_status("hall-log");
        assert_eq!(st["buffer"]["full"], true, "still full: {st}");
        assert_eq!(
            s["position"].as_str().unwrap(),
            pos,
            "the position does not advance while full"
        );
        assert_eq!(s["head_seq"], st["streams"][0]["head_seq"]);
    }
    let head = agent.stream_status("hall-log")["head_seq"].clone();
    note(format!("paused at {pos}, head {head}"));

    ex.start();
    note("exchange started");
    let got = ex.wait_lines(AGENT, "hall-log", want.len(), LONG);
    assert_same_sequence(&got, &want, "lines after the buffer was full");
    wait_until(LONG, "the buffer to drain and the alarm to clear", || {
        let st = agent.status();
        let s = &st["streams"][0];
        st["buffer"]["full"] == false
            && s["buffered_batches"] == 0
            && s["acked_seq"] == s["head_seq"]
    });
    let s = agent.stream_status("hall-log");
    assert_eq!(
        tail_offset(s["position"].as_str().unwrap()),
        Some(file_len),
        "read to the end: {s}"
    );
    assert_same_sequence(&ex.lines(AGENT, "hall-log"), &want, "lines, finally");

    agent.stop();
    ex.stop();
}
