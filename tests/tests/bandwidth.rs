//! `[bandwidth]`: with a backlog far larger than the cap, what the agent sends
//! through the proxy on loopback stays within 10 % of the cap over a minute,
//! and `status` shows the cap in force and the time held back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_tests::faults::UdpProxy;
use ferry_tests::{note, tail_stream, wait_until, Agent, Exchange, TestDir, LONG, SHORT};

const CAP: u64 = 400_000;

/// An agent behind the fault proxy, under `[bandwidth] limit`, with a backlog
/// of numbered lines zstd cannot shrink much (random bytes, base64) in one
/// tailed log.
struct Capped {
    ex: Exchange,
    proxy: UdpProxy,
    agent: Agent,
    id: &'static str,
    lines: Vec<String>,
    _dir: TestDir,
}

impl Capped {
    /// `lines` lines of `width` random bytes each; the agent is not started.
    fn new(id: &'static str, lines: usize, width: usize, limit: &str) -> Capped {
        let t = TestDir::new(id);
        let ex = Exchange::start_new(&t.mkdir("exchange"));
        let proxy = UdpProxy::start(ex.address().parse().unwrap());
        let agent = ex.enroll(id, "210102001", &t.path().join("agent"));
        agent.set("address", &format!("\"{}\"", proxy.address()));
        let log = t.mkdir("logs").join("app.log");
        let mut bytes = vec![0u8; width];
        let lines: Vec<String> = (0..lines)
            .map(|i| {
                rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
                let text =
                    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes);
                format!("{i:06} {text}")
            })
            .collect();
        ferry_tests::append_lines(&log, &lines);
        agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));
        agent.add_stream(&format!("\n[bandwidth]\nlimit = \"{limit}\"\n"));
        Capped {
            ex,
            proxy,
            agent,
            id,
            lines,
            _dir: t,
        }
    }

    /// Bytes the agent sent into the proxy so far.
    fn shipped(&self) -> u64 {
        self.proxy.stats().upstream_bytes.load(Ordering::Relaxed)
    }

    /// Waits for every line of the backlog and checks each arrived once, in order.
    fn expect_every_line_once(&mut self) {
        let n = self.lines.len();
        let got = self.ex.wait_lines(self.id, "hall-log", n, LONG);
        assert_eq!(got.len(), n, "a line arrived twice");
        for (i, (got, want)) in got.iter().zip(&self.lines).enumerate() {
            assert_eq!(got, want, "line {i}");
        }
    }
}

#[test]
fn the_cap_holds_over_a_minute() {
    let mut c = Capped::new("hp-bw-01", 180_000, 300, &format!("{CAP}B"));
    c.agent.start();
    let (proxy, agent) = (&c.proxy, &mut c.agent);
    let wire = || proxy.stats().upstream_bytes.load(Ordering::Relaxed);
    wait_until(SHORT, "the agent to ship", || wire() > 2 * CAP);
    // Sampled every 5 s: the minute's rate, and every 10 s window of it. A
    // window is allowed the limiter's one-second burst and the tenth of a
    // second the writer may run ahead of the wire, nothing like the bursts of
    // several times the cap that a transport releasing its send buffer at
    // line rate made, followed by half a minute of silence.
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
    // About 6 MB at 1 MB/s: the kills and the cut land mid-flight.
    let mut c = Capped::new("hp-bw-02", 30_000, 150, "1MB");
    c.agent.start();
    wait_until(SHORT, "the agent to ship 1 MB", || c.shipped() > 1_000_000);
    c.agent.kill9();
    c.agent.start();
    wait_until(SHORT, "the agent to ship 1 MB more", || {
        c.shipped() > 2_000_000
    });
    c.proxy.cut(true);
    std::thread::sleep(Duration::from_secs(2));
    c.proxy.cut(false);
    wait_until(SHORT, "the agent to ship 1 MB more", || {
        c.shipped() > 3_000_000
    });
    c.agent.kill9();
    c.agent.start();
    c.expect_every_line_once();
    note("30,000 lines once, in order, through two kills and a cut");
}

/// SIGTERM does not wait for a capped send: under a 10 kB/s cap the window of
/// batches in flight would take minutes to leave. The agent stops at once, and
/// with the cap raised everything arrives once, in order: the frame cut off was
/// never acknowledged and goes again.
#[test]
fn a_capped_agent_stops_at_once_and_loses_nothing() {
    let mut c = Capped::new("hp-bw-03", 20_000, 150, "10kB");
    c.agent.start();
    wait_until(SHORT, "the agent to ship 30 kB", || c.shipped() > 30_000);
    let asked = Instant::now();
    c.agent.stop();
    let took = asked.elapsed();
    note(format!(
        "stopped {took:?} after SIGTERM, {} bytes shipped",
        c.shipped()
    ));
    assert!(took < Duration::from_secs(15), "SIGTERM took {took:?}");
    c.agent
        .edit(|t| t.replace("limit = \"10kB\"", "limit = \"100MB\""));
    c.agent.start();
    c.expect_every_line_once();
}
