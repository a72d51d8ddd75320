//! The exchange's Prometheus endpoint (`[metrics] listen`): a scrape says what
//! the exchange stored, per agent and stream, as a counter that counts each
//! record once, across a restart of the exchange, and how the fleet stands.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";
const STREAM: &str = "hall-log";

/// `GET /metrics`, its body (panics on anything but a 200).
fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics").unwrap_or_else(|| panic!("no 200 from http://{addr}/metrics"))
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// One agent ships lines through a tail stream; the exchange's scrape counts
/// them in `records_stored_total` exactly, shows the agent online with one
/// connection, an empty backlog once its heartbeat says so and a delivery
/// caught up; after the exchange restarts it counts only what is stored from
/// then on (the records already held are not counted again).
#[test]
fn the_exchange_exports_what_it_stored() {
    let t = TestDir::new("exchange-metrics");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let received = t.mkdir("received");
    ex.append_config(&format!(
        "\n[metrics]\nlisten = \"{metrics}\"\n\n[[delivery]]\nname = \"archive\"\nkind = \"files\"\npath = \"{}\"\nstreams = [\"*/{STREAM}\"]\n",
        received.display()
    ));
    ex.start();

    // Before any agent: the fleet is empty, and the store is readable.
    let m = scrape(&metrics);
    assert_eq!(sample(&m, "ferry_exchange_store_up"), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, "ferry_exchange_agents{state=\"online\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(
        m.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF:\n{m}"
    );

    // The OpenMetrics content type, so Prometheus parses counters as counters.
    let reply = ureq::get(&format!("http://{metrics}/metrics"))
        .call()
        .unwrap();
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        reply.header("content-type")
    );

    // An agent ships 250 lines.
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    agent.add_stream(&tail_stream(STREAM, "210100-MZ-0002", &log));
    let lines: Vec<String> = (0..250).map(|i| format!("line {i}")).collect();
    append_lines(&log, &lines);
    agent.start();
    ex.wait_lines(AGENT, STREAM, 250, LONG);

    // Every line is counted once, the agent is online over one connection, and
    // once a heartbeat reported the acks its backlog is empty.
    let stored =
        format!("ferry_exchange_records_stored_total{{agent=\"{AGENT}\",stream=\"{STREAM}\"}}");
    let backlog =
        format!("ferry_exchange_stream_backlog_records{{agent=\"{AGENT}\",stream=\"{STREAM}\"}}");
    let m = wait_for(SHORT, "the metrics to show the agent's 250 lines", || {
        let m = scrape(&metrics);
        (sample(&m, &stored) == Some(250.0) && sample(&m, &backlog) == Some(0.0)).then_some(m)
    });
    assert!(
        m.contains("# TYPE ferry_exchange_records_stored counter\n"),
        "{m}"
    );
    assert_eq!(
        sample(&m, "ferry_exchange_agents{state=\"online\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "ferry_exchange_connections"), Some(1.0), "{m}");
    assert!(
        sample(&m, "ferry_exchange_store_bytes").is_some_and(|b| b > 0.0),
        "the embedded store's size:\n{m}"
    );
    assert_eq!(
        sample(&m, "ferry_exchange_alarms_active{kind=\"offline\"}"),
        Some(0.0),
        "{m}"
    );
    // The delivery has passed everything on (line records are not files: it
    // takes none of them, and its checkpoint moves past them).
    let lag = format!(
        "ferry_exchange_delivery_lag_records{{delivery=\"archive\",agent=\"{AGENT}\",stream=\"{STREAM}\"}}"
    );
    wait_until(SHORT, "the delivery's lag in the metrics", || {
        sample(&scrape(&metrics), &lag) == Some(0.0)
    });

    // The exchange restarts: its counter starts over at 0 for the stream (the
    // agent's heartbeat names it), and the agent's reconnection stores nothing
    // new, so nothing is counted until new lines come.
    ex.stop();
    ex.start();
    wait_until(
        SHORT,
        "the restarted exchange to show the stream at 0",
        || {
            let m = scrape(&metrics);
            sample(&m, &stored) == Some(0.0)
                && sample(&m, "ferry_exchange_connections") == Some(1.0)
        },
    );
    let more: Vec<String> = (250..290).map(|i| format!("line {i}")).collect();
    append_lines(&log, &more);
    ex.wait_lines(AGENT, STREAM, 290, LONG);
    wait_until(SHORT, "the metrics to count the 40 new lines", || {
        sample(&scrape(&metrics), &stored) == Some(40.0)
    });
    // And no more: a scrape a little later still says 40.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let m = scrape(&metrics);
    assert_eq!(sample(&m, &stored), Some(40.0), "{m}");
    note(format!("a scrape:\n{m}"));

    agent.stop();
    ex.stop();
}
