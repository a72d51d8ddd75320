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
//! kinds, it changed none).
//!
//! With `FERRY_FULL=1` the previous release itself is built from this
//! repository's history (a second full build, so not in every CI run): its
//! agent ships to this exchange and is then upgraded in place, on the same
//! buffer, with nothing lost or repeated; this agent is refused by its
//! exchange with a message naming the versions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_protocol::batch::encode_records;
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::messages::{
    column, frame::Msg, record::Body, Column, Hello, Record, RecordList, RowChange, RowOp, Sharing,
    StreamDecl,
};
use ferry_protocol::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use ferry_tests::faults::{LineWriter, Verdict};
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

/// The last commit speaking protocol version 3: the one before 9a7a02f
/// introduced version 4 (the source-neutral row envelope).
const PREVIOUS_RELEASE: &str = "95658a5";

/// Builds the previous release's binaries from git (once; kept under
/// `target/previous-release`) and returns the directory holding them.
fn previous_release() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace");
    let base = root.join("target").join("previous-release");
    let src = base.join(PREVIOUS_RELEASE);
    if !src.join("Cargo.toml").is_file() {
        let known = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            known,
            "commit {PREVIOUS_RELEASE} is not in this clone's history (a shallow clone?): the previous release is built from it"
        );
        std::fs::create_dir_all(&src).unwrap();
        let unpacked = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "git -C '{}' archive {PREVIOUS_RELEASE} | tar -x -C '{}'",
                root.display(),
                src.display()
            ))
            .status()
            .unwrap();
        assert!(unpacked.success(), "git archive {PREVIOUS_RELEASE}");
    }
    let target = base.join("target");
    let started = std::time::Instant::now();
    let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--locked",
            "--bins",
            "-p",
            "ferry-agent",
            "-p",
            "ferry-exchange",
        ])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(built.success(), "building {PREVIOUS_RELEASE}");
    note(format!(
        "the previous release ({PREVIOUS_RELEASE}) built in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    target.join("debug")
}

#[test]
fn the_previous_release_from_git_works_with_this_one_or_is_refused_by_name() {
    if std::env::var("FERRY_FULL").as_deref() != Ok("1") {
        note("FERRY_FULL=1 builds the previous release from git and runs it against this one");
        return;
    }
    let old = previous_release();
    let t = TestDir::new("skew-git");
    const AGENT: &str = "hp-mz-31";

    // The previous release's agent ships to this exchange; then it is
    // upgraded in place (killed, this build started on its buffer) and the
    // stream goes on with nothing lost or repeated.
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let log = t.mkdir("logs").join("hall.log");
    std::fs::write(&log, b"").unwrap();
    agent.add_stream(&tail_stream(STREAM, "210100-MZ-0031", &log));
    agent.set_program(Some(old.join("ferry-agent")));
    agent.start();
    let writer = LineWriter::start(log.clone(), "h", 2000);
    ex.wait_lines(AGENT, STREAM, 500, LONG);
    agent.kill9();
    agent.set_program(None);
    agent.start();
    std::thread::sleep(Duration::from_secs(1));
    let produced = writer.finish();
    ex.wait_lines(AGENT, STREAM, produced, LONG);
    std::thread::sleep(Duration::from_millis(500));
    Verdict::of_lines("h", produced, &ex.lines(AGENT, STREAM))
        .assert_clean("the previous release's agent, then this one on its buffer");
    assert!(ex.gaps(AGENT, STREAM).is_empty());
    agent.assert_alive();
    note(format!(
        "{produced} lines from the previous release's agent and, after the upgrade, this one"
    ));

    // This agent (one version newer) against the previous release's exchange:
    // refused, and status says why.
    let mut old_ex = Exchange::init(&t.mkdir("old-exchange"));
    old_ex.set_program(Some(old.join("ferry-exchange")));
    old_ex.start();
    let mut newer = old_ex.enroll("hp-mz-32", DEPT, &t.path().join("newer"));
    newer.add_stream(&tail_stream(STREAM, "210100-MZ-0032", &log));
    newer.start();
    let why = wait_for(LONG, "the refusal in status", || {
        newer.status()["connection"]["last_error"]
            .as_str()
            .filter(|e| e.contains("version"))
            .map(str::to_string)
    });
    note(format!(
        "this agent at the previous release's exchange: {why}"
    ));
    assert!(
        why.contains(&PROTOCOL_VERSION.to_string()),
        "the refusal names no version: {why}"
    );
    newer.assert_alive();
}
