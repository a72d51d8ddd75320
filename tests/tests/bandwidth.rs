//! `[bandwidth]`: with a backlog far larger than the cap, what the agent sends
//! through the proxy on loopback stays within 10 % of the cap over a minute,
//! and `status` shows the cap in force and the time held back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_tests::faults::UdpProxy;
use ferry_tests::{note, tail_stream, wait_until, Exchange, TestDir, SHORT};

const CAP: u64 = 400_000;

#[test]
fn the_cap_holds_over_a_minute() {
    let t = TestDir::new("bandwidth");
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let proxy = UdpProxy::start(ex.address().parse().unwrap());
    let mut agent = ex.enroll("hp-bw-01", "210102001", &t.path().join("agent"));
    agent.set("address", &format!("\"{}\"", proxy.address()));
    // Lines zstd cannot shrink much: random bytes, base64.
    let log = t.mkdir("logs").join("app.log");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
    let mut line = [0u8; 300];
    for i in 0..180_000u32 {
        rand::Rng::fill(&mut rand::rng(), &mut line[..]);
        writeln!(
            f,
            "{i} {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, line)
        )
        .unwrap();
    }
    f.flush().unwrap();
    drop(f);
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    agent.add_stream(&format!("\n[bandwidth]\nlimit = \"{}B\"\n", CAP));
    agent.start();

    wait_until(SHORT, "the agent to ship", || {
        proxy.stats().upstream_bytes.load(Ordering::Relaxed) > 2 * CAP
    });
    // Sampled every 5 s: the minute's rate, and every 10 s window of it. A
    // window is allowed the limiter's one-second burst and the tenth of a
    // second the writer may run ahead of the wire, nothing like the bursts of
    // several times the cap that a transport releasing its send buffer at
    // line rate made, followed by half a minute of silence.
    let wire = || proxy.stats().upstream_bytes.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut samples = vec![(0.0, wire())];
    for _ in 0..12 {
        std::thread::sleep(Duration::from_secs(5));
        samples.push((start.elapsed().as_secs_f64(), wire()));
    }
    let rate_between = |a: (f64, u64), b: (f64, u64)| (b.1 - a.1) as f64 / (b.0 - a.0);
    let rate = rate_between(samples[0], samples[12]);
    let windows: Vec<u64> = samples
        .windows(3)
        .map(|w| rate_between(w[0], w[2]) as u64)
        .collect();
    let drops = proxy.kernel_drops();
    let report = format!(
        "{rate:.0} bytes/s on the wire over a minute against a cap of {CAP}; \
         10 s windows {windows:?}; the proxy's socket dropped {drops} datagrams"
    );
    note(&report);
    assert!(
        (0.9 * CAP as f64..=1.1 * CAP as f64).contains(&rate),
        "{report}"
    );
    let top = windows.iter().copied().max().unwrap_or(0);
    assert!(top as f64 <= 1.25 * CAP as f64, "{report}");
    // The link is cut for three seconds. The agent's writes must wait for the
    // transport, not pile up in its send buffer for it to release at line
    // rate once the link is back.
    proxy.cut(true);
    std::thread::sleep(Duration::from_secs(3));
    proxy.cut(false);
    let restored = (start.elapsed().as_secs_f64(), wire());
    std::thread::sleep(Duration::from_secs(10));
    let after = rate_between(restored, (start.elapsed().as_secs_f64(), wire()));
    let report = format!("{report}; {after:.0} bytes/s in the 10 s after a 3 s cut");
    note(&report);
    assert!(after <= 1.25 * CAP as f64, "{report}");
    let status = agent.status();
    let bw = &status["bandwidth"];
    assert_eq!(bw["cap_bytes_per_second"], CAP, "{status}");
    assert!(bw["held_back_seconds"].as_f64().unwrap() > 30.0, "{status}");
    // The backlog is still there: the cap, not the source, set the pace.
    let backlog = status["streams"][0]["buffered_bytes"].as_u64().unwrap();
    assert!(backlog > 10 * CAP, "{status}");
}

/// Under a cap, the agent is killed twice with SIGKILL and the link cut while a
/// backlog ships: every line arrives once, in order. The writer's wait for the
/// transport must neither lose what it charged nor hang on a dead connection.
#[test]
fn a_capped_agent_killed_and_cut_loses_and_repeats_nothing() {
    const LINES: usize = 30_000;
    let t = TestDir::new("bandwidth-kill");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let proxy = UdpProxy::start(ex.address().parse().unwrap());
    let mut agent = ex.enroll("hp-bw-02", "210102001", &t.path().join("agent"));
    agent.set("address", &format!("\"{}\"", proxy.address()));
    let log = t.mkdir("logs").join("app.log");
    let mut line = [0u8; 150];
    let lines: Vec<String> = (0..LINES)
        .map(|i| {
            rand::Rng::fill(&mut rand::rng(), &mut line[..]);
            let text = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, line);
            format!("{i:06} {text}")
        })
        .collect();
    ferry_tests::append_lines(&log, &lines);
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    // About 6 MB at 1 MB/s: the kills and the cut land mid-flight.
    agent.add_stream("\n[bandwidth]\nlimit = \"1MB\"\n");
    agent.start();
    let shipped = || proxy.stats().upstream_bytes.load(Ordering::Relaxed);
    wait_until(SHORT, "the agent to ship 1 MB", || shipped() > 1_000_000);
    agent.kill9();
    agent.start();
    wait_until(SHORT, "the agent to ship 1 MB more", || {
        shipped() > 2_000_000
    });
    proxy.cut(true);
    std::thread::sleep(Duration::from_secs(2));
    proxy.cut(false);
    wait_until(SHORT, "the agent to ship 1 MB more", || {
        shipped() > 3_000_000
    });
    agent.kill9();
    agent.start();
    let got = ex.wait_lines("hp-bw-02", "hall-log", LINES, ferry_tests::LONG);
    assert_eq!(got.len(), LINES, "a line arrived twice");
    for (i, (got, want)) in got.iter().zip(&lines).enumerate() {
        assert_eq!(got, want, "line {i}");
    }
    note(format!(
        "{LINES} lines once, in order, through two kills and a cut"
    ));
}

/// SIGTERM does not wait for a capped send: under a 10 kB/s cap the window of
/// batches in flight would take minutes to leave. The agent stops at once, and
/// with the cap raised everything arrives once, in order: the frame cut off was
/// never acknowledged and goes again.
#[test]
fn a_capped_agent_stops_at_once_and_loses_nothing() {
    const LINES: usize = 20_000;
    let t = TestDir::new("bandwidth-stop");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let proxy = UdpProxy::start(ex.address().parse().unwrap());
    let mut agent = ex.enroll("hp-bw-03", "210102001", &t.path().join("agent"));
    agent.set("address", &format!("\"{}\"", proxy.address()));
    let log = t.mkdir("logs").join("app.log");
    let mut line = [0u8; 150];
    let lines: Vec<String> = (0..LINES)
        .map(|i| {
            rand::Rng::fill(&mut rand::rng(), &mut line[..]);
            let text = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, line);
            format!("{i:06} {text}")
        })
        .collect();
    ferry_tests::append_lines(&log, &lines);
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
    agent.add_stream("\n[bandwidth]\nlimit = \"10kB\"\n");
    agent.start();
    let shipped = || proxy.stats().upstream_bytes.load(Ordering::Relaxed);
    wait_until(SHORT, "the agent to ship 30 kB", || shipped() > 30_000);
    let asked = Instant::now();
    agent.stop();
    let took = asked.elapsed();
    note(format!(
        "stopped {took:?} after SIGTERM, {} bytes shipped",
        shipped()
    ));
    assert!(took < Duration::from_secs(15), "SIGTERM took {took:?}");
    agent.edit(|t| t.replace("limit = \"10kB\"", "limit = \"100MB\""));
    agent.start();
    let got = ex.wait_lines("hp-bw-03", "hall-log", LINES, ferry_tests::LONG);
    assert_eq!(got.len(), LINES, "a line arrived twice");
    for (i, (got, want)) in got.iter().zip(&lines).enumerate() {
        assert_eq!(got, want, "line {i}");
    }
}
