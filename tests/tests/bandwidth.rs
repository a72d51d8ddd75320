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
    let start = Instant::now();
    let before = proxy.stats().upstream_bytes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(60));
    let sent = proxy.stats().upstream_bytes.load(Ordering::Relaxed) - before;
    let rate = sent as f64 / start.elapsed().as_secs_f64();
    note(format!(
        "{rate:.0} bytes/s on the wire against a cap of {CAP}"
    ));
    assert!(
        (0.9 * CAP as f64..=1.1 * CAP as f64).contains(&rate),
        "{rate:.0} bytes/s on the wire; the cap is {CAP}"
    );
    let status = agent.status();
    let bw = &status["bandwidth"];
    assert_eq!(bw["cap_bytes_per_second"], CAP, "{status}");
    assert!(bw["held_back_seconds"].as_f64().unwrap() > 30.0, "{status}");
    // The backlog is still there: the cap, not the source, set the pace.
    let backlog = status["streams"][0]["buffered_bytes"].as_u64().unwrap();
    assert!(backlog > 10 * CAP, "{status}");
}
