//! Version skew between an agent and the exchange, against the real exchange
//! over QUIC. An agent of the previous protocol version (3: strict admission
//! and incarnations, PostgreSQL-shaped `RowChange` records instead of the
//! source-neutral `Row`) is served in its own version and its records are
//! stored and read back as it wrote them; an agent one version newer than the
//! exchange, and one older than the oldest it serves, is refused with an error
//! naming both versions, before anything is stored.
//!
//! The older agent is played by a client written against the protocol crate
//! with `Hello.version = MIN_PROTOCOL_VERSION`, sending what a version-3 agent
//! sends (the wire messages are the same definitions; version 4 added record
//! kinds, it changed none). Building the previous release from git and running
//! its binary is not done here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use ferry_protocol::batch::encode_records;
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::messages::{
    column, frame::Msg, record::Body, Column, Hello, Record, RecordList, RowChange, RowOp, Sharing,
    StreamDecl,
};
use ferry_protocol::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use ferry_tests::*;
use ferry_transport::tls::{client_config, TlsFiles};
use ferry_transport::{FrameReader, FrameWriter};

const DEPT: &str = "210102-MZ";
const STREAM: &str = "hall";

/// Connects as the agent enrolled in `dir`, says `Hello` in `version`, and
/// returns the connection and the exchange's answer.
async fn hello(
    dir: &Path,
    addr: &str,
    agent: &str,
    version: u32,
) -> (quinn::Connection, quinn::Endpoint, Msg) {
    let client = client_config(&TlsFiles {
        ca: &dir.join("ca.pem"),
        cert: &dir.join("agent.pem"),
        key: &dir.join("agent.key"),
    })
    .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(addr.parse().unwrap(), "localhost")
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv, MAX_FRAME);
    w.send(Msg::Hello(Hello {
        version,
        agent_id: agent.into(),
        department: DEPT.into(),
        streams: vec![StreamDecl {
            name: STREAM.into(),
            catalog_id: "210100-MZ-0042".into(),
            sharing: Sharing::Unconditional as i32,
            kind: "postgres".into(),
            incarnation: format!("{agent}-buffer"),
            ..Default::default()
        }],
        software: format!("ferry-agent (protocol {version})"),
        ..Default::default()
    }))
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), r.next())
        .await
        .expect("an answer to Hello")
        .unwrap()
        .expect("an answer to Hello");
    // The control stream lives as long as the connection.
    std::mem::forget((w, r));
    (conn, endpoint, answer)
}

/// What a version-3 agent's PostgreSQL source wrote: `RowChange` records.
fn v3_records() -> Vec<Record> {
    (0..20u32)
        .map(|i| Record {
            time_unix_ms: 1_765_000_000_000 + u64::from(i),
            position: format!("0/{:X}", 0x1000 + i),
            body: Some(Body::RowChange(RowChange {
                schema: "public".into(),
                table: "hall".into(),
                op: RowOp::Insert as i32,
                xid: 700,
                commit_lsn: 0x2000,
                commit_time_unix_us: 1_765_000_000_000_000,
                change_index: i,
                last_in_txn: i == 19,
                snapshot: false,
                columns: vec![
                    Column {
                        name: "id".into(),
                        type_name: "int4".into(),
                        type_oid: 23,
                        value: Some(column::Value::Text(i.to_string())),
                    },
                    Column {
                        name: "name".into(),
                        type_name: "text".into(),
                        type_oid: 25,
                        value: Some(column::Value::Text(format!("沈阳 {i}"))),
                    },
                ],
                old_key: Vec::new(),
                ..Default::default()
            })),
        })
        .collect()
}

#[test]
fn an_older_agent_is_served_and_a_newer_one_refused_by_name() {
    let t = TestDir::new("version-skew");
    let ex = Exchange::start_new(&t.mkdir("exchange"));
    let old_dir = t.path().join("old");
    ex.enroll("old-01", DEPT, &old_dir);
    let new_dir = t.path().join("new");
    ex.enroll("new-01", DEPT, &new_dir);
    let addr = ex.address();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The previous version: answered in it, its records stored and acked.
    let acked = rt.block_on(async {
        let (conn, _endpoint, answer) =
            hello(&old_dir, &addr, "old-01", MIN_PROTOCOL_VERSION).await;
        let Msg::Welcome(w) = answer else {
            panic!("a version-{MIN_PROTOCOL_VERSION} agent was not welcomed: {answer:?}");
        };
        assert_eq!(
            w.version, MIN_PROTOCOL_VERSION,
            "answered in the agent's version"
        );
        assert_eq!(w.streams[0].next_seq, 1);
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut w = FrameWriter::new(send);
        let mut r = FrameReader::new(recv, MAX_FRAME);
        let batch = encode_records(&RecordList {
            records: v3_records(),
        })
        .unwrap()
        .into_batch(STREAM.into(), 1);
        w.send(Msg::Batch(batch)).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), r.next()).await {
                Ok(Ok(Some(Msg::Ack(a)))) if a.up_to_seq >= 20 => break a.up_to_seq,
                Ok(Ok(Some(_))) => continue,
                other => panic!("no ack for the version-3 batch: {other:?}"),
            }
        }
    });
    assert_eq!(acked, 20);
    let records = ex.records("old-01", STREAM);
    assert_eq!(records.len(), 20, "{records:?}");
    for (i, r) in records.iter().enumerate() {
        let row = r.get("row").unwrap_or_else(|| panic!("not a row: {r}"));
        assert_eq!(row["columns"]["id"], i.to_string(), "{r}");
        assert_eq!(row["columns"]["name"], format!("沈阳 {i}"), "{r}");
    }

    // One version newer than the exchange, and one older than it serves:
    // refused, naming both versions; nothing stored.
    for version in [PROTOCOL_VERSION + 1, MIN_PROTOCOL_VERSION - 1] {
        let answer = rt.block_on(async { hello(&new_dir, &addr, "new-01", version).await.2 });
        let Msg::Error(e) = answer else {
            panic!("a version-{version} agent was not refused: {answer:?}");
        };
        note(format!("version {version}: {}", e.message));
        let advice = if version > PROTOCOL_VERSION {
            "upgrade the exchange before its agents"
        } else {
            "upgrade the agent"
        };
        assert!(
            e.message.contains(&format!(
                "incompatible protocol version {version} (this end speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})"
            )) && e.message.contains(advice),
            "{}",
            e.message
        );
    }
    assert!(ex.records("new-01", STREAM).is_empty());
}
