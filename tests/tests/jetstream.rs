//! The exchange on a NATS JetStream store, as processes: `ferry-exchange serve`
//! with `[store] kind = "jetstream"` against a throwaway nats-server 2.15
//! (`sync_interval: always`), killed and moved under load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ferry_tests::faults::{LineWriter, Verdict};
use ferry_tests::nats::NatsServer;
use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";
const STREAM: &str = "hall-log";
const TAG: &str = "j";

/// Every produced line once, in order, and no gap.
fn assert_every_line_once(ex: &mut Exchange, produced: usize, what: &str) {
    let got = ex.wait_lines(AGENT, STREAM, produced, LONG);
    std::thread::sleep(Duration::from_millis(500));
    let again = ex.lines(AGENT, STREAM);
    assert!(again.len() >= got.len());
    Verdict::of_lines(TAG, produced, &again).assert_clean(what);
    assert!(ex.gaps(AGENT, STREAM).is_empty(), "gaps nobody declared");
}

fn jetstream_exchange(t: &TestDir, nats: &NatsServer) -> Exchange {
    let ex = Exchange::init(&t.mkdir("exchange"));
    ex.use_jetstream(&nats.url(), &nats.monitor());
    ex
}

/// Under a steady stream of lines, the exchange is killed `-9` again and again
/// (between JetStream's acknowledgement and the agent's, among other places),
/// and nats-server itself once: every line is stored once, in order.
#[test]
fn kills_of_the_exchange_and_of_nats_server_lose_and_repeat_nothing() {
    let t = TestDir::new("js-kills");
    let mut nats = NatsServer::start();
    let mut ex = jetstream_exchange(&t, &nats);
    ex.start();
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream(STREAM, "210100-MZ-0002", &log));
    agent.start();
    let writer = LineWriter::start(log.clone(), TAG, 3000);
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(700 + 150 * round));
        if round == 4 {
            nats.kill9();
            std::thread::sleep(Duration::from_millis(500));
            nats.restart();
        } else {
            ex.kill9();
            ex.start();
        }
    }
    let produced = writer.finish();
    note(format!(
        "{produced} lines through 7 exchange kills and a nats-server kill"
    ));
    assert_every_line_once(&mut ex, produced, "after the kills");
    agent.stop();
}

/// Two exchange nodes on one JetStream, the agent moved from one to the other
/// under load (its config edited, restarted) six times: every line once, and
/// both nodes read the same records.
#[test]
fn two_exchange_nodes_share_one_jetstream_and_store_each_line_once() {
    let t = TestDir::new("js-nodes");
    let nats = NatsServer::start();
    let mut a = jetstream_exchange(&t, &nats);
    let mut b = a.another_node(&t.path().join("exchange-b"));
    a.start();
    b.start();
    let mut agent = a.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream(STREAM, "210100-MZ-0002", &log));
    agent.start();
    let writer = LineWriter::start(log.clone(), TAG, 3000);
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(900));
        let to = if round % 2 == 0 { &b } else { &a };
        agent.set("address", &format!("\"localhost:{}\"", to.port));
        agent.kill9();
        agent.start();
    }
    let produced = writer.finish();
    assert_every_line_once(&mut a, produced, "read through node a");
    assert_every_line_once(&mut b, produced, "read through node b");
    let agents = b.agents();
    assert!(
        agents.iter().any(|r| r["agent_id"] == AGENT),
        "the registry is shared: {agents:?}"
    );
    agent.stop();
}

/// Debian's nats-server 2.9 with default settings acknowledges before it syncs:
/// the exchange refuses to serve on it, naming the setting.
#[test]
fn an_exchange_refuses_a_jetstream_whose_acks_are_not_durable() {
    let t = TestDir::new("js-unsafe");
    let Some(nats) = NatsServer::start_debian_defaults() else {
        assert!(
            std::env::var("CI").is_err(),
            "Debian's nats-server is missing: apt-get install nats-server"
        );
        note("Debian's nats-server is not installed; skipped");
        return;
    };
    let mut ex = jetstream_exchange(&t, &nats);
    ex.spawn();
    let st = ex.wait_exit(SHORT);
    assert!(!st.success());
    let log = ex.log_since_start();
    assert!(
        log.contains("sync"),
        "the refusal does not name the setting: {log}"
    );
}

/// Every message of `subject` in stream `stream` on the server, in order, as
/// (Ferry-First-Seq, Ferry-Last-Seq, payload).
fn messages(url: &str, stream: &str, subject: &str) -> Vec<(u64, u64, String)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let s = js.get_stream(stream).await.unwrap();
        let last = s.cached_info().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let Ok(m) = s.get_raw_message(seq).await else {
                continue;
            };
            if m.subject.as_str() != subject {
                continue;
            }
            let h = |k: &str| {
                m.headers
                    .get(k)
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .unwrap()
            };
            out.push((
                h("Ferry-First-Seq"),
                h("Ferry-Last-Seq"),
                String::from_utf8(m.payload.to_vec()).unwrap(),
            ));
        }
        out
    })
}

/// A `[[delivery]] kind = "jetstream"` publishes every stored line once, in
/// order, on the stream's subject, through `kill -9` of the exchange (and so of
/// the delivery) under load: each publish is conditional on the subject's last
/// message, whose Ferry-Last-Seq is the checkpoint.
#[test]
fn a_jetstream_delivery_publishes_every_record_once_through_kills() {
    let t = TestDir::new("js-delivery");
    let nats = NatsServer::start();
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    ex.append_config(&format!(
        "\n[[delivery]]\nname = \"bus\"\nkind = \"jetstream\"\nurl = \"{}\"\nsubject = \"city.{{agent}}.{{stream}}\"\njetstream_stream = \"CITY\"\nstreams = [\"{AGENT}/{STREAM}\"]\n",
        nats.url()
    ));
    ex.start();
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream(STREAM, "210100-MZ-0002", &log));
    agent.start();
    let writer = LineWriter::start(log.clone(), TAG, 3000);
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(600 + 200 * round));
        ex.kill9();
        ex.start();
    }
    let produced = writer.finish();
    // The subject token escapes `-` no, `.` and `_` yes: hall-log stays.
    let subject = format!("city.{AGENT}.{STREAM}");
    let msgs = wait_for(LONG, "every line published", || {
        let m = messages(&nats.url(), "CITY", &subject);
        let n: usize = m.iter().map(|(_, _, p)| p.lines().count()).sum();
        (n >= produced).then_some(m)
    });
    let mut seqs = Vec::new();
    let mut texts = Vec::new();
    let mut next = 1;
    for (first, last, payload) in &msgs {
        assert_eq!(*first, next, "messages do not continue each other");
        next = last + 1;
        for l in payload.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            seqs.push(v["seq"].as_u64().unwrap());
            texts.push(v["text"].as_str().unwrap().to_string());
        }
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seqs not dense");
    Verdict::of_lines(TAG, produced, &texts).assert_clean("on the JetStream subject");
    note(format!(
        "{produced} lines in {} messages through 6 exchange kills",
        msgs.len()
    ));
    let d = ex.deliveries();
    assert_eq!(d[0]["checkpoint"], *seqs.last().unwrap(), "{d:?}");
    agent.stop();
}
