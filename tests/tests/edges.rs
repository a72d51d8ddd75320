//! Nothing lost at the edges: when something *refuses* or *fails* rather than
//! dies. A buffer wiped under a running fleet, a write or sync that fails on
//! either end, a batch the exchange cannot store, and every named crash window
//! (`ferry_transport::failpoint`): each is driven here against real agent and
//! exchange processes, and each ends with every line stored once, in order, and no
//! gap the agent did not declare.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use ferry_tests::faults::{checked_line, LineWriter, Verdict};
use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";
const STREAM: &str = "hall-log";
const TAG: &str = "e";
/// `EX_IOERR`: both daemons exit with it after a failed write or sync.
const EXIT_IO: i32 = 74;

/// An exchange and an agent with a tail stream on `logs/app.log`.
fn setup(t: &TestDir) -> (Exchange, Agent, PathBuf) {
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream(STREAM, "210100-MZ-0002", &log));
    (ex, agent, log)
}

/// Waits for a process's log to say its failpoints are armed: a binary built
/// without the feature (`cargo build -p ferry-agent` alone) would otherwise make
/// a scenario silently not happen.
fn assert_armed(log: impl Fn() -> String) {
    wait_until(
        SHORT,
        "the failpoints to be armed (build with `cargo build --workspace --bins`)",
        || log().contains("failpoints armed"),
    );
}

/// Every produced line once, in order, and no gap at the exchange.
fn assert_converged(ex: &mut Exchange, produced: usize) {
    let got = ex.wait_lines(AGENT, STREAM, produced, LONG);
    std::thread::sleep(Duration::from_millis(500));
    let again = ex.lines(AGENT, STREAM);
    assert!(again.len() >= got.len());
    Verdict::of_lines(TAG, produced, &again).assert_clean("after the failure");
    let gaps = ex.gaps(AGENT, STREAM);
    assert!(gaps.is_empty(), "gaps nobody declared: {gaps:?}");
}

/// The reproduced loss: an agent's data directory is wiped (a reinstalled
/// server), it buffers more lines than the exchange already holds, and before
/// this fix the exchange dropped the first of them as duplicates of the old
/// buffer's seqs. Now the new buffer's incarnation is held — sticky across
/// reconnects and restarts, visible in `status` and `agents` — until the operator
/// accepts it as a continuation; then every line of the new buffer arrives after a
/// recorded boundary, none lost, none merged.
#[test]
fn a_wiped_buffer_is_held_until_accepted_never_deduplicated_away() {
    let t = TestDir::new("edges-wiped");
    let (mut ex, mut agent, log) = setup(&t);
    let first: Vec<String> = (0..100).map(|i| checked_line(TAG, i)).collect();
    append_lines(&log, &first);
    agent.start();
    ex.wait_lines(AGENT, STREAM, 100, LONG);
    agent.stop();

    // The server is reinstalled: the buffer is gone, the log is still there and
    // grows to 150 lines, which the new buffer reads from the start.
    std::fs::remove_dir_all(agent.dir.join("data")).unwrap();
    let more: Vec<String> = (100..150).map(|i| checked_line(TAG, i)).collect();
    append_lines(&log, &more);
    agent.start();
    let held = wait_for(SHORT, "the stream to be reported held", || {
        let st = agent.stream_status(STREAM);
        st["ship_error"]
            .as_str()
            .filter(|e| e.contains("holds this stream"))
            .map(str::to_string)
    });
    note(format!("agent status: {held}"));
    assert!(held.contains("new buffer"), "{held}");
    let agents = ex.agents();
    let holds = agents[0]["held"].as_array().expect("agents lists holds");
    assert_eq!(holds.len(), 1, "{agents:?}");
    assert_eq!(holds[0]["stream"], STREAM);

    // Sticky: a restart of the agent and one of the exchange do not release it.
    agent.stop();
    ex.restart();
    agent.start();
    wait_until(SHORT, "the hold to be reported again", || {
        agent.stream_status(STREAM)["ship_error"]
            .as_str()
            .is_some_and(|e| e.contains("holds this stream"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ex.lines(AGENT, STREAM).len(),
        100,
        "nothing of the held buffer was stored"
    );

    // Refusing keeps it held, with the operator's reason shown to the agent.
    let out = ex.resolve(
        AGENT,
        STREAM,
        &["--refuse", "--reason", "checking with the district"],
    );
    assert!(out.status.success(), "{out:?}");
    wait_until(SHORT, "the refusal to reach the agent", || {
        agent.stream_status(STREAM)["ship_error"]
            .as_str()
            .is_some_and(|e| e.contains("checking with the district"))
    });

    // Accepted: the new buffer continues the stream after a boundary at seq 101.
    let out = ex.resolve(AGENT, STREAM, &["--accept"]);
    assert!(out.status.success(), "{out:?}");
    let lines = ex.wait_lines(AGENT, STREAM, 250, LONG);
    let want: Vec<String> = first.iter().chain(&first).chain(&more).cloned().collect();
    assert_eq!(
        lines, want,
        "the old 100 lines, then the new buffer's 150, once each"
    );
    assert!(ex.gaps(AGENT, STREAM).is_empty());
    wait_until(SHORT, "the ship error to clear", || {
        agent.stream_status(STREAM)["ship_error"].is_null()
    });
    agent.stop();
}

/// A cloned server: the agent's whole directory (certificate, key, buffer, the
/// same incarnation) copied to a second machine, and both run. Their seqs would
/// collide, and neither's head is behind, so only liveness tells: the exchange
/// sees two processes answering under one identity and holds the streams,
/// sticky; nothing of the clone is merged into the original's stream.
#[test]
fn a_cloned_agent_running_beside_its_original_is_held() {
    let t = TestDir::new("edges-clone");
    let (mut ex, mut agent, log) = setup(&t);
    append_lines(
        &log,
        &(0..50).map(|i| checked_line(TAG, i)).collect::<Vec<_>>(),
    );
    agent.start();
    ex.wait_lines(AGENT, STREAM, 50, LONG);
    agent.stop();
    let logs2 = t.mkdir("logs2");
    std::fs::copy(&log, logs2.join("app.log")).unwrap();
    let mut clone = agent.clone_to(&t.path().join("clone"), log.parent().unwrap(), &logs2);
    agent.start();
    clone.start();
    append_lines(
        &log,
        &(50..70).map(|i| checked_line(TAG, i)).collect::<Vec<_>>(),
    );
    append_lines(
        &logs2.join("app.log"),
        &(0..20)
            .map(|i| checked_line("clone", i))
            .collect::<Vec<_>>(),
    );
    let reason = wait_for(LONG, "the exchange to hold the stream", || {
        let agents = ex.agents();
        agents[0]["held"]
            .as_array()
            .and_then(|h| h.first())
            .and_then(|h| h["reason"].as_str().map(str::to_string))
    });
    note(format!("held: {reason}"));
    assert!(reason.contains("two processes"), "{reason}");
    for a in [&mut agent, &mut clone] {
        wait_until(SHORT, "both agents to report the hold", || {
            a.stream_status(STREAM)["ship_error"]
                .as_str()
                .is_some_and(|e| e.contains("holds this stream"))
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    let lines = ex.lines(AGENT, STREAM);
    assert!(
        lines.iter().all(|l| !l.starts_with("clone")),
        "a line of the clone was stored as the original's: {:?}",
        lines.iter().find(|l| l.starts_with("clone"))
    );
    agent.stop();
    clone.stop();
}

/// The directory source's window between moving acknowledged files to `sent/`
/// and recording that: the agent aborts there, restarts, finds the files gone
/// from the outbox and sends nothing twice; every file is at the exchange once,
/// whole.
#[test]
fn a_crash_between_moving_a_sent_file_and_recording_it_sends_nothing_twice() {
    let t = TestDir::new("edges-dir-window");
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let outbox = t.mkdir("outbox");
    agent.add_stream(&outbox_stream("drop", "210100-MZ-0009", &outbox));
    let mut sums = Vec::new();
    for i in 0..6 {
        let data = random_bytes(20_000 + i * 1000);
        sums.push(sha256_hex(&data));
        write_atomic(&outbox, &format!("f{i}.bin"), &data);
    }
    // The first round of moves crashes: how many rounds the acknowledgements
    // make depends on timing (all six files may be acknowledged at once).
    agent.set_env(
        "FERRY_FAILPOINTS",
        "directory-after-move-before-record=return(crash)",
    );
    agent.spawn();
    assert_armed(|| agent.log_since_start());
    let st = agent.wait_exit(LONG);
    assert!(!st.success(), "{st}");
    assert!(
        !file_names(&outbox.join("sent")).is_empty(),
        "nothing was moved before the crash"
    );
    agent.unset_env("FERRY_FAILPOINTS");
    agent.start();
    wait_until(LONG, "every file to reach sent/", || {
        file_names(&outbox.join("sent")).len() == 6
    });
    std::thread::sleep(Duration::from_secs(1));
    let files = ex.files(AGENT, "drop");
    let mut got: Vec<String> = files
        .iter()
        .filter(|f| f["status"] == "complete")
        .map(|f| f["sha256"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    sums.sort();
    assert_eq!(got, sums, "every file once, whole: {files:?}");
    assert!(ex.gaps(AGENT, "drop").is_empty());
    agent.stop();
}

/// An exchange started with `spec` armed (`FERRY_FAILPOINTS`), and an agent
/// with an outbox stream `drop` (8 KiB chunks, `extra` source keys) holding
/// `data` as `name`, started.
fn outbox_beside_failing_exchange(
    t: &TestDir,
    spec: &str,
    extra: &str,
    name: &str,
    data: &[u8],
) -> (Exchange, Agent, PathBuf) {
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    ex.set_env("FERRY_FAILPOINTS", Some(spec));
    ex.start();
    assert_armed(|| ex.log_since_start());
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let outbox = t.mkdir("outbox");
    agent.add_stream(&outbox_stream_with(
        "drop",
        "210100-MZ-0009",
        &outbox,
        &format!("chunk_size = \"8KiB\"{extra}"),
    ));
    write_atomic(&outbox, name, data);
    agent.start();
    (ex, agent, outbox)
}

/// An exchange restored empty while a large file is half sent: the agent declares
/// the acknowledged chunks lost, sends the rest, and the exchange's copy (holes
/// where those chunks were) fails its SHA-256. Before, that file was acknowledged
/// and the outbox copy moved or deleted — the department's only good copy. Now
/// the exchange keeps the bad copy, names the file in its acks, and the agent
/// sends it again whole; the outbox copy leaves only after a complete one arrived.
#[test]
fn a_file_that_fails_its_digest_at_the_exchange_is_sent_again_whole() {
    let t = TestDir::new("edges-digest");
    let data = random_bytes(8 << 20);
    // A slow disk at the exchange (5 ms per chunk), so the file is still on its
    // way when the exchange is wiped.
    let (mut ex, mut agent, outbox) = outbox_beside_failing_exchange(
        &t,
        "exchange-file-chunk-write=sleep(5)",
        ", after_send = \"delete\"",
        "big.bin",
        &data,
    );
    let partial = ex.dir.join("store").join("files").join(AGENT).join("drop");
    let received = wait_for(LONG, "part of the file to arrive", || {
        let len = std::fs::read_dir(&partial)
            .ok()?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()?;
        (len >= 1 << 20).then_some(len)
    });
    assert!(
        (received as usize) < data.len(),
        "the whole file arrived before the wipe"
    );
    ex.kill9();
    std::fs::remove_dir_all(ex.dir.join("store")).unwrap();
    ex.set_env("FERRY_FAILPOINTS", None);
    ex.start();
    let files = wait_for(LONG, "a complete copy at the exchange", || {
        let f = ex.files(AGENT, "drop");
        f.iter().any(|r| r["status"] == "complete").then_some(f)
    });
    note(format!("exchange files: {files:?}"));
    let complete: Vec<_> = files.iter().filter(|r| r["status"] == "complete").collect();
    assert_eq!(complete.len(), 1, "{files:?}");
    assert_eq!(complete[0]["sha256"], sha256_hex(&data));
    assert!(
        files.iter().any(|r| r["status"] == "sha256-mismatch"),
        "the damaged copy is kept for inspection: {files:?}"
    );
    assert!(
        agent.log_since_start().contains("sending it again whole"),
        "the agent resent the file"
    );
    wait_until(
        SHORT,
        "the outbox copy to be deleted after the good copy",
        || !outbox.join("big.bin").exists(),
    );
    agent.stop();
}

/// An exchange killed and restarted answers its old connections' packets with a
/// stateless reset, so agents reconnect at once instead of waiting out QUIC's
/// 30 s idle timeout (before, the connection ids were keyed per process and the
/// restarted exchange dropped those packets as invalid).
#[test]
fn a_restarted_exchange_resets_the_old_connections_at_once() {
    let t = TestDir::new("edges-reset");
    let (mut ex, mut agent, log) = setup(&t);
    agent.start();
    append_lines(
        &log,
        &(0..10).map(|i| checked_line(TAG, i)).collect::<Vec<_>>(),
    );
    ex.wait_lines(AGENT, STREAM, 10, LONG);
    ex.kill9();
    ex.start();
    append_lines(
        &log,
        &(10..20).map(|i| checked_line(TAG, i)).collect::<Vec<_>>(),
    );
    ex.wait_lines(AGENT, STREAM, 20, LONG);
    let text = agent.log_since_start();
    let ended = text
        .lines()
        .find(|l| l.contains("not connected to the exchange"))
        .unwrap_or("(no line)");
    assert!(
        ended.contains("reset by peer"),
        "the old connection was not reset: {ended}"
    );
    agent.stop();
}

/// Enrolling an agent id that still has a live certificate would put two servers
/// behind one identity: refused unless `--replace` says it is a reinstall.
#[test]
fn enroll_refuses_an_agent_id_with_a_live_certificate() {
    let t = TestDir::new("edges-enroll");
    let ex = Exchange::init(&t.mkdir("exchange"));
    ex.enroll(AGENT, DEPT, &t.path().join("first"));
    let out = ex.enroll_output(AGENT, DEPT, &t.path().join("second"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already has a live certificate"), "{err}");
    assert!(!t.path().join("second").join("agent.toml").exists());
    let out = ex.enroll_output(AGENT, DEPT, &t.path().join("second"), &["--replace"]);
    assert!(out.status.success(), "{out:?}");
}

/// A batch the exchange cannot store (its disk refuses a file chunk) is refused,
/// not turned into a gap the next batch papers over: the agent sends it again and
/// the file arrives whole, its outbox copy moved only after that.
#[test]
fn a_chunk_the_exchange_cannot_write_is_sent_again_not_skipped() {
    let t = TestDir::new("edges-refused");
    let data = random_bytes(80 * 1024);
    // The fourth chunk write fails with ENOSPC, once.
    let (ex, mut agent, outbox) = outbox_beside_failing_exchange(
        &t,
        "exchange-file-chunk-write=3*off->1*return(enospc)",
        "",
        "report.bin",
        &data,
    );
    let files = wait_for(LONG, "the file to be complete", || {
        let f = ex.files(AGENT, "drop");
        f.iter().any(|r| r["status"] == "complete").then_some(f)
    });
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0]["sha256"], sha256_hex(&data));
    assert!(ex.gaps(AGENT, "drop").is_empty());
    assert!(
        ex.log_since_start().contains("injected") || ex.log_since_start().contains("No space"),
        "the failpoint never fired (built without failpoints?)"
    );
    wait_until(SHORT, "the file to leave the outbox", || {
        outbox.join("sent").join("report.bin").is_file()
    });
    agent.stop();
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Who {
    Agent,
    Exchange,
}

/// Arms `spec` (`FERRY_FAILPOINTS`) on `who`, ships lines until that process
/// exits by itself, checks how it exited (with `io_error`: status 74 and an
/// ALARM in its log; otherwise any failure, e.g. an abort), restarts it unarmed,
/// and checks that every line arrived once, in order, with no gap.
fn fail_and_recover(name: &str, who: Who, spec: &str, io_error: bool) {
    let t = TestDir::new(name);
    let (mut ex, mut agent, log) = setup(&t);
    if who == Who::Exchange {
        ex.stop();
        ex.set_env("FERRY_FAILPOINTS", Some(spec));
        ex.start();
    } else {
        agent.set_env("FERRY_FAILPOINTS", spec);
    }
    let writer = LineWriter::start(log, TAG, 2_000);
    agent.spawn();
    match who {
        Who::Exchange => assert_armed(|| ex.log_since_start()),
        Who::Agent => assert_armed(|| agent.log_since_start()),
    }
    let (st, log_text) = match who {
        Who::Exchange => (ex.wait_exit(LONG), ex.log_since_start()),
        Who::Agent => (agent.wait_exit(LONG), agent.log_since_start()),
    };
    if io_error {
        assert_eq!(st.code(), Some(EXIT_IO), "{spec}: {st}");
        assert!(log_text.contains("ALARM"), "{spec}: {log_text}");
    } else {
        assert!(!st.success(), "{spec}: {st}");
    }
    match who {
        Who::Exchange => {
            ex.set_env("FERRY_FAILPOINTS", None);
            ex.start();
            agent.assert_alive();
        }
        Who::Agent => {
            agent.unset_env("FERRY_FAILPOINTS");
            agent.start();
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let produced = writer.finish();
    assert_converged(&mut ex, produced);
    agent.stop();
}

/// A failed write or sync of the agent's buffer: it stops capturing, raises the
/// alarm and exits with EX_IOERR, and the restarted agent reuses no seq and
/// loses no line (before, the source resumed from an unsynced position with the
/// old head and overwrote a batch).
#[test]
fn a_failed_buffer_sync_stops_the_agent_and_loses_nothing() {
    fail_and_recover(
        "edges-agent-sync",
        Who::Agent,
        "agent-after-apply-before-sync=20*off->1*return(eio)",
        true,
    );
}

/// A failed sync at the exchange: it exits with EX_IOERR instead of acknowledging
/// batches whose pages the kernel may have dropped; restarted, it holds every line
/// once (before, a retried fdatasync succeeded over lost pages).
#[test]
fn a_failed_exchange_sync_restarts_it_and_acks_only_what_is_durable() {
    fail_and_recover(
        "edges-exchange-sync",
        Who::Exchange,
        "exchange-after-apply-before-sync=10*off->1*return(eio)",
        true,
    );
}

/// Every named crash window (ARCHITECTURE.md lists them): the process is aborted
/// exactly there while lines keep coming, restarted without the failpoint, and
/// the exchange ends with every line once, in order, and no gap. An I/O error in
/// the agent's segment append is fatal like a failed sync.
#[test]
fn a_crash_in_each_named_window_loses_and_repeats_nothing() {
    for (who, window) in [
        (Who::Agent, "agent-before-segment-append"),
        (Who::Agent, "agent-after-apply-before-sync"),
        (Who::Agent, "agent-after-sync-before-answer"),
        (Who::Agent, "agent-after-ack-before-delete"),
        (Who::Exchange, "exchange-after-apply-before-sync"),
        (Who::Exchange, "exchange-after-sync-before-ack"),
    ] {
        note(format!("crash window {window}"));
        let spec = format!("{window}=5*off->1*return(crash)");
        fail_and_recover(&format!("edges-{window}"), who, &spec, false);
    }
    fail_and_recover(
        "edges-segment-eio",
        Who::Agent,
        "agent-before-segment-append=5*off->1*return(eio)",
        true,
    );
}
