//! The fleet registry under stress: a hundred simulated agents (the real
//! protocol, a certificate each: `ferry_tests::fleet`) shipping while they
//! flood the registry with heartbeats, the exchange killed with `kill -9` and
//! restarted under them. Afterwards every record is stored once, the registry
//! holds every agent with what it last reported, and the exchange's memory did
//! not grow with the heartbeats.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::fleet::{self, dashboard::https_agent, Counters, Load};
use ferry_tests::*;
use serde_json::Value;

const AGENTS: usize = 100;
const STREAMS: usize = 2;

fn rss_kib(pid: i32) -> u64 {
    ferry_tests::bench::rss_kib(pid as u32, "VmRSS:")
}

#[test]
fn the_registry_converges_under_reconnects_restarts_and_heartbeat_floods() {
    let t = TestDir::new("fleet-registry");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    let port = free_tcp_port();
    ex.append_config(&format!("\n[dashboard]\nlisten = \"127.0.0.1:{port}\"\n"));
    ex.start();
    let files = fleet::read_exchange(&ex.config).unwrap();
    let agents = fleet::enroll_fleet(&files, &t.mkdir("agents"), AGENTS).unwrap();

    // A machine user reads the registry through the API.
    let (token, _) = ex.add_token_user("checker", "auditor", &t.path().join("token"));
    let http = https_agent(&files.ca).unwrap();
    let get = |path: &str| -> Value {
        let r = http
            .get(&format!("https://127.0.0.1:{port}{path}"))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        r.into_json().unwrap()
    };

    // 100 agents × 2 streams, 4,000 lines/s, a heartbeat every 50 ms from
    // each (2,000 registry writes a second: 200 times a real fleet's).
    let load = Load {
        streams: STREAMS,
        rate: 4_000.0,
        seconds: 24.0,
        batch: 20,
        line_bytes: 200,
        endpoints: 2,
        connect_parallel: 16,
        connect_timeout: Duration::from_secs(120),
        drain: Duration::from_secs(60),
        heartbeat: Duration::from_millis(50),
    };
    let counters = Arc::new(Counters::default());
    let (tx, rx) = tokio::sync::watch::channel(None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = files.listen;
    let c = counters.clone();
    let l = load.clone();
    let fleet_thread = std::thread::spawn(move || rt.block_on(fleet::run(agents, addr, l, c, tx)));
    let t0 = loop {
        if let Some(t0) = *rx.borrow() {
            break t0.into_std();
        }
        assert!(
            !fleet_thread.is_finished(),
            "the fleet ended before its load"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    note(format!(
        "{} agents connected",
        counters.connected.load(Ordering::Relaxed)
    ));

    // Memory while flooded, before the restart and after it.
    let sample = |ex: &Exchange, until: Instant| -> u64 {
        let mut max = 0;
        while Instant::now() < until {
            max = max.max(ex.pid().map_or(0, rss_kib));
            std::thread::sleep(Duration::from_millis(200));
        }
        max
    };
    std::thread::sleep(Duration::from_secs(2));
    let early = sample(&ex, t0 + Duration::from_secs(7));
    ex.kill9();
    std::thread::sleep(Duration::from_millis(500));
    ex.start();
    // Everyone back, then the flood goes on against the new process.
    std::thread::sleep(Duration::from_secs(4));
    let mid = sample(&ex, t0 + Duration::from_secs(16));
    let late = sample(&ex, t0 + Duration::from_secs(24));
    note(format!(
        "exchange RSS max: {} MiB before the kill; {} MiB then {} MiB after the restart",
        early / 1024,
        mid / 1024,
        late / 1024
    ));
    fleet_thread.join().unwrap().unwrap();
    let sent = counters.records_sent.load(Ordering::Relaxed);
    let acked = counters.records_acked.load(Ordering::Relaxed);
    let beats = counters.heartbeats.load(Ordering::Relaxed);
    note(format!(
        "{sent} records sent, {acked} acknowledged, {beats} heartbeats, {} reconnects",
        counters.reconnects.load(Ordering::Relaxed)
    ));
    // (Sent counts what was resent after the restart too.)
    assert!(acked <= sent);
    assert!(beats > 20_000, "a flood: {beats} heartbeats");
    assert!(
        counters.reconnects.load(Ordering::Relaxed) >= AGENTS as u64,
        "every agent reconnected after the restart"
    );
    // Memory is bounded: 8 more seconds of flood after the restart did not
    // grow the exchange by more than 32 MiB.
    assert!(
        late <= mid + 32 * 1024,
        "exchange RSS grew from {mid} KiB to {late} KiB under the heartbeat flood"
    );

    // The registry: every agent once, with its department and what it last
    // reported; every stream stored exactly up to what the agent produced
    // (its simulated buffer's head, saved when it finished).
    let listed = get("/api/agents");
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), AGENTS, "agents in the registry");
    let mut stored_total = 0;
    for (i, a) in listed.iter().enumerate() {
        let id = format!("fleet-{i:04}");
        assert_eq!(a["id"], id.as_str());
        assert_eq!(a["department"], fleet::department_of(i).as_str());
        let streams = a["streams"].as_array().unwrap();
        assert_eq!(streams.len(), STREAMS, "{a}");
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(t.path().join("agents").join(&id).join("state.json")).unwrap(),
        )
        .unwrap();
        for s in streams {
            let name = s["name"].as_str().unwrap();
            let j: usize = name.trim_start_matches("log-").parse().unwrap();
            let head = state["head"][j].as_u64().unwrap();
            assert_eq!(
                state["acked"][j].as_u64(),
                Some(head),
                "{id}/{name}: all acknowledged"
            );
            let v = get(&format!("/api/agents/{id}/streams/{name}"));
            let stored = v["stored_up_to"].as_u64().unwrap();
            assert!(
                s["acked_seq"].as_u64().unwrap() <= stored,
                "{id}/{name}: the agent reported more acked than stored: {s} / {v}"
            );
            assert_eq!(
                stored, head,
                "{id}/{name}: stored exactly what was produced"
            );
            assert_eq!(v["gaps"], serde_json::json!([]), "{id}/{name}");
            stored_total += stored;
        }
    }
    assert_eq!(stored_total, acked, "records stored, all streams together");
}
