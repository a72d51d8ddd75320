//! Proof under faults: the link between agent and exchange drops, delays,
//! duplicates and reorders packets or is cut outright, and the exchange loses its
//! store; every scenario ends with the checker's verdict (0 lost, 0 duplicated,
//! 0 out of order, 0 altered) or a loud, specific alarm.
//!
//! `FERRY_SOAK=1` runs the long variants (a 5-minute cut, 5 minutes of a lossy
//! link); CI runs the short ones.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_tests::faults::{checked_line, soak, Faults, LineChecker, LineWriter, UdpProxy, Verdict};
use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";
const TAG: &str = "f";

/// An exchange, and an agent with a tail stream.
fn setup(t: &TestDir) -> (Exchange, Agent, PathBuf) {
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    (ex, agent, log)
}

/// An exchange, a fault proxy in front of it with `faults`, and an agent with a
/// tail stream that reaches the exchange through the proxy.
fn setup_via_proxy(t: &TestDir, faults: Faults) -> (Exchange, Agent, PathBuf, UdpProxy) {
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let proxy = UdpProxy::start(ex.address().parse().unwrap());
    proxy.set(faults);
    let agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    agent.set("address", &format!("\"{}\"", proxy.address()));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    (ex, agent, log, proxy)
}

fn verdict(ex: &mut Exchange, produced: usize, timeout: Duration) -> Verdict {
    let got = ex.wait_lines(AGENT, "hall-log", produced, timeout);
    // Anything late (a duplicate) would show in a second look.
    std::thread::sleep(Duration::from_millis(500));
    let again = ex.lines(AGENT, "hall-log");
    assert!(again.len() >= got.len());
    Verdict::of_lines(TAG, produced, &again)
}

fn wait_drained(agent: &mut Agent) {
    wait_until(LONG, "the agent's buffer to drain", || {
        let s = agent.stream_status("hall-log");
        s["buffered_batches"] == 0 && s["head_seq"] == s["acked_seq"]
    });
}

/// 5% of packets lost, 50 ms (± 10 ms) of delay, 5% reordered and 1% duplicated,
/// in both directions, for the whole run: lines and a file still arrive exactly
/// once and in order.
#[test]
fn a_lossy_slow_reordering_link_delivers_everything_once() {
    let t = TestDir::new("faults-lossy");
    let (mut ex, mut agent, log, proxy) = setup_via_proxy(
        &t,
        Faults {
            drop: 0.05,
            duplicate: 0.01,
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(10),
            reorder: 0.05,
            cut: false,
        },
    );
    let outbox = t.mkdir("outbox");
    agent.add_stream(&outbox_stream("outbox", "210100-MZ-0001", &outbox));
    agent.start();

    let secs = if soak() { 300 } else { 15 };
    let writer = LineWriter::start(log, TAG, 2_000);
    let file = random_bytes(3 << 20);
    write_atomic(&outbox, "report.dat", &file);
    std::thread::sleep(Duration::from_secs(secs));
    let produced = writer.finish();
    note(format!(
        "{produced} lines written over {secs} s; proxy so far: {}",
        proxy.stats()
    ));

    verdict(&mut ex, produced, LONG).assert_clean("5% loss, 50 ms delay, reordering");
    let done = ex.wait_records(AGENT, "outbox", LONG, "the file complete", |r| {
        r.iter().any(|r| r["file"]["status"] == "complete")
    });
    let f = done
        .iter()
        .find(|r| r["file"]["status"] == "complete")
        .unwrap();
    assert_eq!(f["file"]["sha256"], sha256_hex(&file));
    wait_drained(&mut agent);
    let stats = proxy.stats();
    note(format!("proxy: {stats}"));
    assert!(
        stats.dropped.load(Ordering::Relaxed) > 0,
        "the proxy dropped packets"
    );
    assert!(
        stats.reordered.load(Ordering::Relaxed) > 0,
        "the proxy reordered packets"
    );
    assert!(ex.gaps(AGENT, "hall-log").is_empty());
}

/// The link is cut under load for longer than the QUIC idle timeout (35 s; 5
/// minutes with FERRY_SOAK=1): the agent notices, says so in `status`, keeps
/// capturing into its buffer, and drains it once the link is back. The drain rate
/// is reported.
#[test]
fn a_cut_link_is_buffered_through_and_drained_after() {
    let t = TestDir::new("faults-cut");
    let (mut ex, mut agent, log, proxy) = setup_via_proxy(&t, Faults::default());
    agent.start();

    let writer = LineWriter::start(log, TAG, 5_000);
    ex.wait_lines(AGENT, "hall-log", 1_000, LONG);
    let cut_for = Duration::from_secs(if soak() { 300 } else { 35 });
    proxy.cut(true);
    let cut_at = Instant::now();
    note(format!("link cut for {cut_for:?}"));
    let st = wait_for(LONG, "status to show the link down", || {
        let st = agent.status();
        (st["connection"]["state"] != "connected").then_some(st)
    });
    note(format!(
        "after {:?}: {}",
        cut_at.elapsed(),
        st["connection"]
    ));
    std::thread::sleep(cut_for.saturating_sub(cut_at.elapsed()));
    let s = agent.stream_status("hall-log");
    let backlog = s["head_seq"].as_u64().unwrap() - s["acked_seq"].as_u64().unwrap();
    assert!(
        backlog > 0 && s["buffered_batches"].as_u64().unwrap() > 0,
        "the agent buffered during the cut: {s}"
    );
    proxy.cut(false);
    let restored = Instant::now();
    note(format!("link restored; {backlog} records buffered"));
    wait_until(LONG, "the agent to reconnect", || {
        agent.status()["connection"]["state"] == "connected"
    });
    let reconnected = Instant::now();
    let s = agent.stream_status("hall-log");
    let backlog = s["head_seq"].as_u64().unwrap() - s["acked_seq"].as_u64().unwrap();
    wait_drained(&mut agent);
    let drain = reconnected.elapsed().as_secs_f64();
    note(format!(
        "reconnected {:.1} s after the link returned; drained {backlog} records (new ones arriving at 5,000/s meanwhile) in {drain:.1} s: {:.0} records/s",
        (reconnected - restored).as_secs_f64(),
        backlog as f64 / drain
    ));
    let produced = writer.finish();
    verdict(&mut ex, produced, LONG).assert_clean("link cut under load");
    wait_drained(&mut agent);
    assert!(ex.gaps(AGENT, "hall-log").is_empty());
}

/// The exchange comes back from disaster recovery with an empty store: the agent
/// notices that the exchange expects seqs it had already acknowledged and raises
/// an alarm naming them, instead of silently resending or skipping; it carries on
/// with new data, and the exchange shows the hole as a gap.
#[test]
fn an_exchange_restored_empty_is_reported_loudly() {
    let t = TestDir::new("faults-wiped");
    let (mut ex, mut agent, log) = setup(&t);
    agent.start();
    let first: Vec<String> = (0..500).map(|i| checked_line(TAG, i)).collect();
    append_lines(&log, &first);
    ex.wait_lines(AGENT, "hall-log", 500, LONG);
    wait_drained(&mut agent);

    ex.stop();
    let store = store_dir(&ex.config);
    note(format!("wiping the exchange's store {}", store.display()));
    std::fs::remove_dir_all(&store).unwrap();
    ex.start();
    let more: Vec<String> = (500..600).map(|i| checked_line(TAG, i)).collect();
    append_lines(&log, &more);

    let err = wait_for(LONG, "the agent to raise the alarm", || {
        let s = agent.stream_status("hall-log");
        s["ship_error"].as_str().map(str::to_string)
    });
    note(format!("agent says: {err}"));
    assert!(
        err.contains("lost data") && err.contains("1..=500"),
        "the alarm names the lost seqs: {err}"
    );
    assert!(
        agent.log_since_start().contains("ALARM"),
        "the journal shows an ALARM"
    );
    // New data still flows, and the exchange shows what it lost as a gap.
    let got = ex.wait_lines(AGENT, "hall-log", 100, LONG);
    assert_eq!(
        got, more,
        "after the wipe the exchange holds exactly the new lines"
    );
    let gaps = ex.gaps(AGENT, "hall-log");
    note(format!("exchange gaps: {gaps:?}"));
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(
        (gaps[0]["from"].as_u64(), gaps[0]["to"].as_u64()),
        (Some(1), Some(500))
    );
}

/// `[store] dir` of an exchange config.
fn store_dir(config: &Path) -> PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .skip_while(|l| l.trim() != "[store]")
        .find(|l| l.trim_start().starts_with("dir"))
        .expect("[store] dir in exchange.toml");
    let v = line.split_once('=').unwrap().1.trim().trim_matches('"');
    let p = PathBuf::from(v);
    if p.is_absolute() {
        p
    } else {
        config.parent().unwrap().join(p)
    }
}

/// A tmpfs mounted over a directory for the length of a test (root only).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs on {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The agent's disk fills up (a small tmpfs as its data_dir, then a file eating
/// the space): before any write can fail, sources pause, `status` shows
/// `buffer.disk_low` and the journal an ALARM; when the space comes back they
/// resume by themselves and nothing was lost or duplicated.
#[test]
fn a_full_disk_pauses_sources_until_space_returns() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !host_has(root, "this test mounts a tmpfs: run it as root") {
        return;
    }
    let t = TestDir::new("faults-disk");
    let (mut ex, mut agent, log) = setup(&t);
    let data = agent.dir.join("data");
    let fs = Tmpfs::mount(&data, 96);
    agent.edit(|c| c.replace("[buffer]\n", "[buffer]\nmin_free = \"16MiB\"\n"));
    assert!(agent.config_text().contains("min_free = \"16MiB\""));
    agent.start();
    let writer = LineWriter::start(log, TAG, 2_000);
    ex.wait_lines(AGENT, "hall-log", 1_000, LONG);

    // Eat the space down to 8 MiB, below min_free.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xA5u8; 1 << 20];
        while fs.free() > 8 << 20 {
            f.write_all(&block).unwrap();
            f.sync_data().unwrap();
        }
    }
    note(format!("disk filled: {} bytes free", fs.free()));
    wait_until(SHORT, "status to show disk_low", || {
        agent.status()["buffer"]["disk_low"] == true
    });
    // Paused: lines keep being written but the buffer takes none of them.
    let head = agent.stream_status("hall-log")["head_seq"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let later = agent.stream_status("hall-log")["head_seq"]
        .as_u64()
        .unwrap();
    assert!(
        later <= head + 4_000,
        "sources paused: head {head} → {later}"
    );
    let paused = agent.stream_status("hall-log")["head_seq"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent.stream_status("hall-log")["head_seq"]
            .as_u64()
            .unwrap(),
        paused,
        "nothing is taken while the disk is low"
    );
    assert!(agent
        .log_since_start()
        .contains("ALARM: the buffer's disk is nearly full"));
    assert!(
        agent.status()["buffer"]["write_error"].is_null(),
        "no write failed"
    );

    std::fs::remove_file(&filler).unwrap();
    note(format!("space returned: {} bytes free", fs.free()));
    wait_until(SHORT, "the alarm to clear", || {
        agent.status()["buffer"]["disk_low"] == false
    });
    let produced = writer.finish();
    verdict(&mut ex, produced, LONG).assert_clean("disk full on the agent");
    wait_drained(&mut agent);
    agent.stop();
    drop(fs);
}

/// Resident memory (KiB) and open file descriptors of a running process. Panics
/// when they cannot be read: a figure of 0 would make a memory bound pass
/// without anything having been measured.
fn footprint(pid: i32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"))
        .count();
    (rss, fds)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

/// 20,000 lines/s through a link with 1% loss and 10 ms delay, sampling the
/// agent's memory and file descriptors: both stay flat, and after draining the
/// buffer on disk is back near where it started. 40 s in CI; FERRY_SOAK=1 runs an
/// hour (FERRY_SOAK_SECS overrides). The curve is printed.
#[test]
fn a_soak_at_20k_lines_per_second_keeps_memory_and_descriptors_flat() {
    let secs: u64 = std::env::var("FERRY_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if soak() { 3600 } else { 40 });
    let t = TestDir::new("faults-soak");
    let (mut ex, mut agent, log, proxy) = setup_via_proxy(
        &t,
        Faults {
            drop: 0.01,
            delay: Duration::from_millis(10),
            ..Faults::default()
        },
    );
    agent.start();
    let pid = agent.pid().unwrap();
    let buffer = agent.dir.join("data").join("buffer");
    let disk_at_start = dir_bytes(&buffer);

    let writer = LineWriter::start(log, TAG, 20_000);
    let every = Duration::from_secs((secs / 20).max(2));
    let start = Instant::now();
    let mut curve: Vec<(u64, u64, usize)> = Vec::new();
    let mut ex_peak = 0u64;
    // What arrived is checked as the run goes: an hour is 72 million lines.
    let mut checker = LineChecker::new(TAG);
    let mut next = 1;
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(every);
        agent.assert_alive();
        ex.assert_alive();
        let (rss, fds) = footprint(pid);
        curve.push((start.elapsed().as_secs(), rss, fds));
        let ex_pid = ex.pid().expect("the exchange runs throughout the soak");
        ex_peak = ex_peak.max(footprint(ex_pid).0);
        next = ex.each_line_from(AGENT, "hall-log", next, |seq, t| checker.feed(seq, t));
    }
    let produced = writer.finish();
    wait_until(LONG, "every line to arrive", || {
        next = ex.each_line_from(AGENT, "hall-log", next, |seq, t| checker.feed(seq, t));
        checker.stored() >= produced
    });
    wait_drained(&mut agent);
    std::thread::sleep(Duration::from_millis(500));
    ex.each_line_from(AGENT, "hall-log", next, |seq, t| checker.feed(seq, t));
    let checker_stored = checker.stored();
    checker
        .finish(produced)
        .assert_clean("soak at 20k lines/s, 1% loss");
    std::thread::sleep(Duration::from_secs(2));
    let disk_after = dir_bytes(&buffer);
    let (rss_end, fds_end) = footprint(pid);
    let rows: Vec<String> = curve
        .iter()
        .map(|(s, r, f)| format!("{s}s {:.1}MiB {f}fd", *r as f64 / 1024.0))
        .collect();
    note(format!("agent footprint over the run: {}", rows.join(", ")));
    note(format!(
        "exchange peak RSS {:.1} MiB holding {} lines",
        ex_peak as f64 / 1024.0,
        checker_stored
    ));
    assert!(ex_peak > 0, "the exchange's memory was never measured");
    assert!(
        ex_peak <= 256 * 1024,
        "the exchange stays within 256 MiB however much it stores: {ex_peak} KiB"
    );
    note(format!(
        "after draining: {:.1} MiB RSS, {fds_end} fds; buffer on disk {:.1} MiB at start, {:.1} MiB after; {}",
        rss_end as f64 / 1024.0,
        disk_at_start as f64 / 1048576.0,
        disk_after as f64 / 1048576.0,
        proxy.stats()
    ));
    // Flat: the second half never exceeds the first half's peak by more than a
    // quarter plus 8 MiB, and descriptors do not climb.
    let half = curve.len() / 2;
    let peak = |s: &[(u64, u64, usize)]| s.iter().map(|c| c.1).max().unwrap_or(0);
    let (early, late) = (peak(&curve[..half.max(1)]), peak(&curve[half..]));
    assert!(
        late <= early + early / 4 + 8 * 1024,
        "agent memory grew: {early} KiB peak in the first half, {late} KiB in the second"
    );
    let fds: Vec<usize> = curve.iter().map(|c| c.2).collect();
    let (lo, hi) = (
        fds.iter().min().copied().unwrap_or(0),
        fds.iter().max().copied().unwrap_or(0),
    );
    assert!(hi <= lo + 8, "file descriptors climbed from {lo} to {hi}");
    assert!(
        disk_after <= disk_at_start + (64 << 20),
        "the buffer did not shrink back after draining: {disk_at_start} → {disk_after} bytes"
    );
}

/// Bytes of the agent's buffer are flipped while it is stopped (the exchange was
/// away, so everything was still buffered): the agent refuses to start, naming the
/// damage; `ferry-agent salvage` recovers every intact batch and reports the lost
/// seq range; the agent then ships the rest, the exchange shows exactly that range
/// as a gap, and nothing else is missing, duplicated or altered.
#[test]
fn a_damaged_buffer_is_refused_salvaged_and_its_loss_shown_as_a_gap() {
    use ferry_tests::faults::long_line;
    let t = TestDir::new("faults-salvage");
    let (mut ex, mut agent, log) = setup(&t);
    ex.stop();
    agent.start();
    let mut produced = 0usize;
    for _ in 0..6 {
        let lines: Vec<String> = (produced..produced + 1500)
            .map(|i| long_line(TAG, i))
            .collect();
        append_lines(&log, &lines);
        produced += 1500;
        wait_until(SHORT, "the burst to be durable", || {
            agent.stream_status("hall-log")["head_seq"].as_u64() == Some(produced as u64)
        });
    }
    agent.stop();

    let segments = agent.dir.join("data/buffer/segments");
    let seg = std::fs::read_dir(&segments)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("large batches live in segment files")
        .path();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5A;
    }
    std::fs::write(&seg, &bytes).unwrap();
    note(format!(
        "flipped 16 bytes at offset {mid} of {}",
        seg.display()
    ));

    let out = Agent::run_to_exit(&agent.config, SHORT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent must refuse a damaged buffer"
    );
    assert!(
        err.contains("damaged") && err.contains("checksum") && err.contains("ferry-agent salvage"),
        "the refusal names the damage and the way out: {err}"
    );

    let out = std::process::Command::new(bin("ferry-agent"))
        .args(["salvage", "--json", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "salvage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    note(format!("salvage report: {report}"));
    let stream = &report["streams"][0];
    let lost: Vec<(u64, u64)> = stream["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert!(
        !lost.is_empty(),
        "the flipped bytes cost at least one batch: {report}"
    );
    let lost_count: u64 = lost.iter().map(|(a, b)| b - a + 1).sum();
    assert_eq!(
        stream["intact_records"].as_u64().unwrap() + lost_count,
        produced as u64,
        "every record is either recovered or reported lost"
    );

    ex.start();
    agent.start();
    let more: Vec<String> = (produced..produced + 100)
        .map(|i| long_line(TAG, i))
        .collect();
    append_lines(&log, &more);
    produced += 100;
    let want = produced - lost_count as usize;
    ex.wait_lines(AGENT, "hall-log", want, LONG);
    wait_drained(&mut agent);
    let got = ex.lines(AGENT, "hall-log");
    let v = Verdict::of_lines_made(TAG, produced, &got, |i| long_line(TAG, i));
    note(format!("verdict after salvage: {v}"));
    assert_eq!((v.duplicated, v.out_of_order, v.altered), (0, 0, 0), "{v}");
    // Exactly the reported seqs are missing (line i has seq i + 1).
    let reported: Vec<usize> = lost
        .iter()
        .flat_map(|&(a, b)| (a..=b).map(|s| s as usize - 1))
        .collect();
    assert_eq!(
        v.missing_indexes, reported,
        "missing lines are the lost seqs"
    );
    let gaps: Vec<(u64, u64)> = ex
        .gaps(AGENT, "hall-log")
        .iter()
        .map(|g| (g["from"].as_u64().unwrap(), g["to"].as_u64().unwrap()))
        .collect();
    assert_eq!(gaps, lost, "the exchange shows the loss as a gap");
    assert!(agent.stream_status("hall-log")["lost"]
        .as_array()
        .is_none_or(|l| l.is_empty()));
}

/// The agent's wall clock jumps while it runs (set back 3 hours, then forward 6,
/// then back to the truth) and it is restarted with its clock 3 hours behind: it
/// keeps shipping, it still accepts the exchange's certificate, and every line
/// arrives once, in order. Sequence numbers, offsets and acks never look at the
/// wall clock; only the records' capture times show the jumps.
#[test]
fn clock_jumps_on_the_agent_reorder_and_lose_nothing() {
    let lib = libfaketime();
    if !host_has(
        lib.is_some(),
        "libfaketime is missing: install the Debian package faketime",
    ) {
        return;
    }
    let Some(lib) = lib else { return };
    let t = TestDir::new("faults-clock");
    let (mut ex, mut agent, log) = setup(&t);
    let clock = t.path().join("clock");
    let set_clock = |offset: &str| std::fs::write(&clock, offset).unwrap();
    set_clock("-3h");
    agent.set_env("LD_PRELOAD", lib.to_str().unwrap());
    agent.set_env("FAKETIME_TIMESTAMP_FILE", clock.to_str().unwrap());
    agent.set_env("FAKETIME_CACHE_DURATION", "1");
    // Only the wall clock jumps; the monotonic clock never does on a real system.
    agent.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    agent.start();
    let writer = LineWriter::start(log, TAG, 1_000);
    ex.wait_lines(AGENT, "hall-log", 500, LONG);
    let skew = |ex: &Exchange| {
        let recs = ex.records(AGENT, "hall-log");
        let last = recs.last().cloned().unwrap_or_default();
        let t = last["time"].as_str().unwrap_or_default().to_string();
        (recs.len(), t)
    };
    note(format!("clock 3 h behind: {:?}", skew(&ex)));
    for offset in ["+3h", "+0", "-3h"] {
        set_clock(offset);
        std::thread::sleep(Duration::from_secs(3));
        note(format!("clock {offset}: {:?}", skew(&ex)));
    }
    // A restart with the clock 3 hours behind: a new TLS handshake, certificates
    // checked against the skewed clock.
    agent.kill9();
    agent.start();
    std::thread::sleep(Duration::from_secs(3));
    set_clock("+0");
    let produced = writer.finish();
    verdict(&mut ex, produced, LONG).assert_clean("clock jumps on the agent");
    wait_drained(&mut agent);
    let times: Vec<String> = ex
        .records(AGENT, "hall-log")
        .iter()
        .filter_map(|r| r["time"].as_str().map(str::to_string))
        .collect();
    let (first, last) = (times.first().cloned(), times.last().cloned());
    note(format!("capture times from {first:?} to {last:?}"));
    assert!(ex.gaps(AGENT, "hall-log").is_empty());
    // The scenario happened only if the agent's clock was really moved: capture
    // times (the agent's clock) must run hours behind and hours ahead of the
    // exchange's storage times (its real clock).
    let skews: Vec<i64> = ex
        .records(AGENT, "hall-log")
        .iter()
        .filter_map(|r| Some(unix_secs(r["time"].as_str()?)? - unix_secs(r["stored"].as_str()?)?))
        .collect();
    let (behind, ahead) = (
        skews.iter().copied().min().unwrap_or(0),
        skews.iter().copied().max().unwrap_or(0),
    );
    note(format!(
        "agent clock skew seen in records: {behind} s .. {ahead} s"
    ));
    assert!(
        behind < -2 * 3600 && ahead > 2 * 3600,
        "the agent's clock was not faked (libfaketime not in effect?): skew {behind} s .. {ahead} s"
    );
}

/// Seconds since the epoch of an RFC 3339 time as `records` prints it.
fn unix_secs(t: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339(t).ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64)
}
