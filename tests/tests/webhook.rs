//! `[dashboard] alarm_webhook`: a real exchange POSTs the alarm a killed agent
//! raises, and its clearing when the agent is back, to a webhook that refuses
//! the first attempt (the event is sent again).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use ferry_tests::*;
use serde_json::Value;

/// A webhook on loopback: answers 500 to the first POST, 200 to the others,
/// and keeps the bodies of the POSTs it took.
fn webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/ferry", listener.local_addr().unwrap());
    let taken = Arc::new(Mutex::new(Vec::new()));
    let seen = taken.clone();
    std::thread::spawn(move || {
        let mut first = true;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            assert!(
                request_line.starts_with("POST /hooks/ferry "),
                "{request_line}"
            );
            let status = if first { "500 Not Now" } else { "200 OK" };
            if !first {
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
            }
            first = false;
            let _ = conn.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (url, taken)
}

fn has(events: &Mutex<Vec<Value>>, event: &str, agent: &str) -> bool {
    events.lock().unwrap().iter().any(|e| {
        e["event"] == event && e["alarm"]["kind"] == "offline" && e["alarm"]["agent"] == agent
    })
}

#[test]
fn alarms_reach_the_webhook_raised_and_cleared() {
    let (url, events) = webhook();
    let t = TestDir::new("webhook");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    ex.append_config(&format!(
        "\n[dashboard]\noffline_after = \"2s\"\nalarm_webhook = \"{url}\"\n"
    ));
    ex.start();
    let mut agent = ex.enroll("hp-wh-01", "210102-WH", &t.path().join("agent"));
    let log = t.mkdir("logs").join("app.log");
    std::fs::write(&log, "一\n").unwrap();
    agent.add_stream(&tail_stream("events", "210100-0009", &log));
    agent.start();
    ex.wait_lines("hp-wh-01", "events", 1, SHORT);

    agent.kill9();
    wait_until(LONG, "the offline alarm at the webhook", || {
        has(&events, "raised", "hp-wh-01")
    });
    agent.start();
    wait_until(LONG, "the cleared alarm at the webhook", || {
        has(&events, "cleared", "hp-wh-01")
    });
    let events = events.lock().unwrap();
    let raised = events.iter().find(|e| e["event"] == "raised").unwrap();
    assert_eq!(raised["alarm"]["id"], "offline:hp-wh-01:");
    assert!(raised["exchange"].is_string(), "{raised}");
    assert!(!raised["alarm"]["message"].as_str().unwrap().is_empty());
}
