//! Crashes lose nothing and duplicate nothing: the agent, then the exchange, is
//! killed with SIGKILL at random moments while data keeps being produced, and in the
//! end the exchange holds every line once, in order, and every file once, intact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_tests::*;
use rand::Rng;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";

/// What the writer produced.
struct Produced {
    lines: usize,
    /// File name → SHA-256.
    files: BTreeMap<String, String>,
    rotated: bool,
}

/// A writer thread, the agent's busy neighbour: appends numbered lines to
/// `logs/app.log` in small bursts, drops small numbered files into the outbox
/// (written as `.NAME.tmp`, renamed in), and rotates the log once (rename to
/// `app.log.1`) when asked.
struct Writer {
    stop: Arc<AtomicBool>,
    rotate: Arc<AtomicBool>,
    handle: JoinHandle<Produced>,
}

impl Writer {
    fn start(log: PathBuf, outbox: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let rotate = Arc::new(AtomicBool::new(false));
        let (s, r) = (stop.clone(), rotate.clone());
        let handle = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || write_until(&log, &outbox, &s, &r))
            .unwrap();
        Writer {
            stop,
            rotate,
            handle,
        }
    }

    fn rotate(&self) {
        self.rotate.store(true, Ordering::SeqCst);
    }

    fn finish(self) -> Produced {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("the writer thread panicked")
    }
}

fn write_until(log: &Path, outbox: &Path, stop: &AtomicBool, rotate: &AtomicBool) -> Produced {
    let mut rng = rand::rng();
    let mut p = Produced {
        lines: 0,
        files: BTreeMap::new(),
        rotated: false,
    };
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        let burst = rng.random_range(1..=20);
        let lines: Vec<String> = (p.lines..p.lines + burst)
            .map(|i| format!("line-{i:06}"))
            .collect();
        append_lines(log, &lines);
        p.lines += burst;
        if round.is_multiple_of(6) {
            let name = format!("file-{:05}.dat", p.files.len());
            let size = rng.random_range(0..48 << 10);
            let bytes = random_bytes(size);
            write_atomic(outbox, &name, &bytes);
            p.files.insert(name, sha256_hex(&bytes));
        }
        if !p.rotated && rotate.load(Ordering::SeqCst) {
            let rotated = log.with_file_name("app.log.1");
            std::fs::rename(log, rotated).unwrap();
            p.rotated = true;
        }
        // Pacing only: a steady trickle rather than one burst.
        std::thread::sleep(Duration::from_millis(rng.random_range(15..45)));
    }
    p
}

/// One agent with a tail stream and an outbox stream.
fn setup(t: &TestDir) -> (Exchange, Agent, PathBuf, PathBuf) {
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let logs = t.mkdir("logs");
    let outbox = t.mkdir("outbox");
    let log = logs.join("app.log");
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    // Small chunks, so most files travel in several and kills land mid-file.
    agent.add_stream(&outbox_stream_with(
        "outbox",
        "210100-MZ-0001",
        &outbox,
        "chunk_size = \"8KiB\"",
    ));
    (ex, agent, log, outbox)
}

/// Waits until the exchange holds everything produced and the agent has nothing
/// left to send, then checks lines and files exactly.
fn verify_everything_arrived_once(
    ex: &mut Exchange,
    agent: &mut Agent,
    outbox: &Path,
    p: &Produced,
) {
    let want: Vec<String> = (0..p.lines).map(|i| format!("line-{i:06}")).collect();
    note(format!(
        "waiting for {} lines and {} files",
        p.lines,
        p.files.len()
    ));
    ex.wait_lines(AGENT, "hall-log", p.lines, LONG);
    ex.wait_records(AGENT, "outbox", LONG, "every file complete", |recs| {
        recs.iter()
            .filter(|r| r["file"]["status"] == "complete")
            .count()
            >= p.files.len()
    });
    // Everything acknowledged: nothing buffered, nothing left in the outbox, so no
    // late duplicate can still arrive after the check below.
    let sent: Vec<String> = p.files.keys().cloned().collect();
    wait_until(LONG, "the agent to have nothing left to send", || {
        let st = agent.status();
        let idle = st["streams"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["buffered_batches"] == 0 && s["head_seq"] == s["acked_seq"]);
        idle && file_names(outbox).is_empty() && file_names(&outbox.join("sent")) == sent
    });
    let st = agent.status();
    for s in st["streams"].as_array().unwrap() {
        assert!(s["ship_error"].is_null(), "shipping alarm: {s}");
    }
    for stream in ["hall-log", "outbox"] {
        let gaps = ex.gaps(AGENT, stream);
        assert!(
            gaps.is_empty(),
            "the exchange reports gaps in {stream}: {gaps:?}"
        );
    }

    // Lines: exactly line-000000 .. line-N, in order, each once.
    let got = ex.lines(AGENT, "hall-log");
    assert_same_sequence(&got, &want, "lines");
    assert_eq!(got.len(), p.lines, "line count");
    let unique: std::collections::BTreeSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicate lines");
    assert_eq!(
        unique,
        want.iter().collect::<std::collections::BTreeSet<_>>(),
        "the set of lines"
    );

    // Files: each exactly once among the complete ones, with its SHA-256.
    let files = ex.files(AGENT, "outbox");
    let mut complete: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in files.iter().filter(|f| f["status"] == "complete") {
        complete
            .entry(f["path"].as_str().unwrap().to_string())
            .or_default()
            .push(f["sha256"].as_str().unwrap().to_string());
    }
    let twice: Vec<_> = complete.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "files received complete more than once: {twice:?}"
    );
    let got_names: Vec<&String> = complete.keys().collect();
    let want_names: Vec<&String> = p.files.keys().collect();
    assert_eq!(got_names, want_names, "the set of complete files");
    for (name, sha) in &p.files {
        assert_eq!(&complete[name][0], sha, "sha256 of {name}");
    }
    let other: Vec<_> = files.iter().filter(|f| f["status"] != "complete").collect();
    note(format!(
        "{} lines, {} files verified; {} non-complete file records: {other:?}",
        got.len(),
        p.files.len(),
        other.len()
    ));
}

/// The agent is killed with SIGKILL 24 times while lines and files keep coming and
/// the log is rotated halfway, and restarted each time: mostly 50–700 ms after it
/// answered `status`, every fourth time within 100 ms of being spawned (while it
/// opens and recovers its buffer). The exchange ends up with every line exactly
/// once, in order, and every file exactly once with the right SHA-256.
#[test]
fn agent_killed_at_random_moments_loses_and_duplicates_nothing() {
    let t = TestDir::new("crash-agent");
    let (mut ex, mut agent, log, outbox) = setup(&t);
    let writer = Writer::start(log, outbox.clone());
    let mut rng = rand::rng();
    const KILLS: usize = 24;
    for i in 0..KILLS {
        if i == KILLS / 2 {
            writer.rotate();
        }
        if i % 4 == 3 {
            agent.spawn();
            std::thread::sleep(Duration::from_millis(rng.random_range(0..100)));
        } else {
            agent.start();
            std::thread::sleep(Duration::from_millis(rng.random_range(50..=700)));
        }
        agent.kill9();
    }
    agent.start();
    note(format!(
        "agent killed {KILLS} times; {} sessions at the exchange",
        count_in_log(ex.log_path(), "agent connected")
    ));
    let produced = writer.finish();
    assert!(produced.rotated, "the log was rotated midway");
    verify_everything_arrived_once(&mut ex, &mut agent, &outbox, &produced);
    agent.stop();
    ex.stop();
}

/// The exchange is killed with SIGKILL 12 times, 50–700 ms after each (re)start,
/// while the agent keeps shipping lines and files; it is restarted each time. Every
/// third kill waits first until the agent is connected to the new exchange process,
/// so those kills interrupt live sessions (batches stored but not yet acknowledged,
/// files half received); the others hit the exchange while it starts up and
/// recovers. The exchange ends up with every line exactly once, in order, and every
/// file exactly once with the right SHA-256.
///
/// After a SIGKILL the agent only notices the dead connection when the QUIC idle
/// timeout expires (up to 30 s), which is what makes this test take minutes.
#[test]
fn exchange_killed_at_random_moments_loses_and_duplicates_nothing() {
    let t = TestDir::new("crash-exchange");
    let (mut ex, mut agent, log, outbox) = setup(&t);
    agent.start();
    let writer = Writer::start(log, outbox.clone());
    let mut rng = rand::rng();
    const KILLS: usize = 12;
    let mut live = 0;
    for i in 0..KILLS {
        if i == KILLS / 2 {
            writer.rotate();
        }
        if i % 3 == 0 {
            wait_until(
                LONG,
                "the agent to connect to the restarted exchange",
                || {
                    ex.assert_alive();
                    ex.log_since_start().contains("agent connected")
                },
            );
            live += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..=700)));
        ex.kill9();
        ex.start();
        agent.assert_alive();
    }
    note(format!(
        "exchange killed {KILLS} times, {live} of them in a live session; {} sessions in all",
        count_in_log(ex.log_path(), "agent connected")
    ));
    let produced = writer.finish();
    assert!(produced.rotated, "the log was rotated midway");
    verify_everything_arrived_once(&mut ex, &mut agent, &outbox, &produced);
    agent.stop();
    ex.stop();
}

/// Both ends die over and over in one run: the agent is killed with SIGKILL
/// between 50 and 700 ms after each start, and after every second agent kill the
/// exchange is killed and restarted too, while lines and files keep coming and the
/// log is rotated halfway. 12 agent and 6 exchange kills; with FERRY_SOAK=1, 100
/// and 50. Every line arrives exactly once, in order, every file exactly once.
#[test]
fn agent_and_exchange_killed_in_one_run_lose_and_duplicate_nothing() {
    let (agent_kills, exchange_kills) = if ferry_tests::faults::soak() {
        (100, 50)
    } else {
        (12, 6)
    };
    let t = TestDir::new("crash-both");
    let (mut ex, mut agent, log, outbox) = setup(&t);
    let writer = Writer::start(log, outbox.clone());
    let mut rng = rand::rng();
    let mut ex_killed = 0;
    for i in 0..agent_kills {
        if i == agent_kills / 2 {
            writer.rotate();
        }
        agent.start();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..=700)));
        agent.kill9();
        if i % 2 == 1 && ex_killed < exchange_kills {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..=300)));
            ex.kill9();
            ex.start();
            ex_killed += 1;
        }
    }
    agent.start();
    note(format!(
        "agent killed {agent_kills} times, exchange {ex_killed} times; {} sessions at the exchange",
        count_in_log(ex.log_path(), "agent connected")
    ));
    let produced = writer.finish();
    assert!(produced.rotated, "the log was rotated midway");
    verify_everything_arrived_once(&mut ex, &mut agent, &outbox, &produced);
    agent.stop();
    ex.stop();
}
