//! An authenticated agent must not be able to starve the exchange. A client
//! written against the protocol crate misbehaves in each way the limits bound —
//! many connections, an unbounded window, stalled half frames on many streams, a
//! file declaring 10 TiB — while a well-behaved agent ships alongside: the
//! greedy client is slowed or cut off with an error naming the limit, the
//! exchange's memory stays bounded, and every line of the good agent arrives.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_protocol::batch::encode_records;
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::messages::{
    frame::Msg, record::Body, FileChunk, FileEnd, Hello, Record, RecordList, Sharing, StreamDecl,
};
use ferry_tests::faults::{LineWriter, Verdict};
use ferry_tests::*;
use ferry_transport::tls::{client_config, TlsFiles};
use ferry_transport::{FrameReader, FrameWriter};

const DEPT: &str = "210102-MZ";
const TAG: &str = "g";

/// A connected misbehaving client: its connection and control stream after a
/// successful `Hello`.
struct Greedy {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

async fn connect(dir: &Path, addr: &str, agent: &str, streams: &[&str]) -> anyhow::Result<Greedy> {
    let client = client_config(&TlsFiles {
        ca: &dir.join("ca.pem"),
        cert: &dir.join("agent.pem"),
        key: &dir.join("agent.key"),
    })?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(client);
    let conn = endpoint.connect(addr.parse()?, "localhost")?.await?;
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv, MAX_FRAME);
    w.send(Msg::Hello(Hello {
        version: ferry_protocol::PROTOCOL_VERSION,
        agent_id: agent.into(),
        department: DEPT.into(),
        streams: streams
            .iter()
            .map(|s| StreamDecl {
                name: s.to_string(),
                catalog_id: "210100-MZ-0099".into(),
                sharing: Sharing::Unconditional as i32,
                kind: "tail".into(),
                incarnation: "greedy".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }))
    .await?;
    match r.next().await? {
        Some(Msg::Welcome(_)) => {}
        other => anyhow::bail!("no Welcome: {other:?}"),
    }
    // Keep the control stream open for the connection's life.
    std::mem::forget((w, r));
    Ok(Greedy {
        conn,
        _endpoint: endpoint,
    })
}

fn lines_batch(stream: &str, first: u64, n: usize) -> ferry_protocol::messages::Batch {
    let records = (0..n)
        .map(|i| Record {
            time_unix_ms: 1,
            position: String::new(),
            body: Some(Body::Line(
                format!("greedy {first} {i} {}", "x".repeat(200)).into_bytes(),
            )),
        })
        .collect();
    encode_records(&RecordList { records })
        .unwrap()
        .into_batch(stream.into(), first)
}

/// Reads a stream until the exchange's error frame or the connection's end;
/// what it said.
async fn error_of(mut r: FrameReader, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r.next()).await {
            Err(_) => return "no answer".into(),
            Ok(Ok(Some(Msg::Error(e)))) => return e.message,
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return "stream finished".into(),
            Ok(Err(e)) => return format!("{e:#}"),
        }
    }
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_greedy_agent_is_bounded_and_the_others_keep_shipping() {
    let t = TestDir::new("greedy");
    let mut ex = Exchange::init(&t.mkdir("exchange"));
    // Tighter than the defaults, so the test runs in seconds.
    ex_limits(
        &ex,
        "max_connection_bytes = \"32MiB\"\nframe_timeout = \"5s\"\n",
    );
    ex.start();
    let good_log = t.mkdir("logs").join("app.log");
    std::fs::write(&good_log, b"").unwrap();
    let mut good = ex.enroll("good-01", DEPT, &t.path().join("good"));
    good.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &good_log));
    good.start();
    let greedy_dir = t.path().join("greedy");
    ex.enroll("greedy-01", DEPT, &greedy_dir);
    let writer = LineWriter::start(good_log, TAG, 2_000);
    let pid = ex.pid().unwrap();
    let rss_before = rss_kib(pid);
    let mut rss_peak = rss_before;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = ex.address();
    let mut peak = |what: &str| {
        let r = rss_kib(pid);
        rss_peak = rss_peak.max(r);
        note(format!("{what}: exchange RSS {:.1} MiB", r as f64 / 1024.0));
    };

    // 1. An unbounded window: 200 batches without waiting for an ack.
    let said = rt.block_on(async {
        let g = connect(&greedy_dir, &addr, "greedy-01", &["s1"])
            .await
            .unwrap();
        let (send, recv) = g.conn.open_bi().await.unwrap();
        let mut w = FrameWriter::new(send);
        for i in 0..200u64 {
            if w.send(Msg::Batch(lines_batch("s1", 1 + i * 100, 100)))
                .await
                .is_err()
            {
                break;
            }
        }
        error_of(FrameReader::new(recv, MAX_FRAME), Duration::from_secs(20)).await
    });
    note(format!("unbounded window: {said}"));
    assert!(said.contains("window"), "{said}");
    peak("after the unbounded window");

    // 2. Stalled half frames: 60 streams each declaring a 15 MiB frame, 1 MiB
    // sent, then silence. The connection's budget admits two; the rest wait on
    // flow control, and the stall closes the connection after frame_timeout.
    let started = Instant::now();
    let closed = rt.block_on(async {
        let streams: Vec<String> = (0..60).map(|i| format!("h{i}")).collect();
        let names: Vec<&str> = streams.iter().map(String::as_str).collect();
        let g = connect(&greedy_dir, &addr, "greedy-01", &names)
            .await
            .unwrap();
        let mut held = Vec::new();
        for _ in 0..60 {
            let Ok((mut send, recv)) = g.conn.open_bi().await else {
                break;
            };
            let mut head = (15u32 << 20).to_be_bytes().to_vec();
            head.extend(std::iter::repeat_n(0x0a_u8, 1 << 20));
            let _ = tokio::time::timeout(Duration::from_secs(2), send.write_all(&head)).await;
            held.push((send, recv));
        }
        tokio::time::timeout(Duration::from_secs(30), g.conn.closed()).await
    });
    note(format!(
        "stalled half frames: connection closed after {:?}: {closed:?}",
        started.elapsed()
    ));
    assert!(closed.is_ok(), "the stalled connection was never closed");
    peak("after stalled half frames");

    // 3. A file declaring 10 TiB after one byte: refused at once, nothing sized.
    let said = rt.block_on(async {
        let g = connect(&greedy_dir, &addr, "greedy-01", &["f1"])
            .await
            .unwrap();
        let (send, recv) = g.conn.open_bi().await.unwrap();
        let mut w = FrameWriter::new(send);
        let records = vec![Record {
            time_unix_ms: 1,
            position: String::new(),
            body: Some(Body::FileChunk(FileChunk {
                file_id: "huge".into(),
                path: "huge.bin".into(),
                offset: 0,
                data: vec![1],
                end: Some(FileEnd {
                    size: 10 << 40,
                    sha256: vec![0; 32],
                }),
            })),
        }];
        let batch = encode_records(&RecordList { records })
            .unwrap()
            .into_batch("f1".into(), 1);
        w.send(Msg::Batch(batch)).await.unwrap();
        error_of(FrameReader::new(recv, MAX_FRAME), Duration::from_secs(20)).await
    });
    note(format!("10 TiB file: {said}"));
    assert!(said.contains("declares"), "{said}");
    let huge = ex
        .dir
        .join("store")
        .join("files")
        .join("greedy-01")
        .join("f1")
        .join("huge");
    let allocated = std::fs::metadata(&huge).map_or(0, |m| m.len());
    assert!(
        allocated < 1 << 20,
        "the exchange sized the declared file: {allocated} bytes"
    );

    // 4. Many connections of one identity: at most a few open at once, each new
    // one after Hello replacing the older.
    let open = rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..40 {
            if let Ok(g) = connect(&greedy_dir, &addr, "greedy-01", &["m1"]).await {
                conns.push(g);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        conns
            .iter()
            .filter(|g| g.conn.close_reason().is_none())
            .count()
    });
    note(format!("40 connections of one agent: {open} still open"));
    assert!(open <= 1, "{open} connections of one agent stayed open");
    peak("after 40 connections");

    // The good agent never noticed: every line arrives once, in order.
    let produced = writer.finish();
    let got = ex.wait_lines("good-01", "hall-log", produced, LONG);
    Verdict::of_lines(TAG, produced, &got).assert_clean("beside a greedy agent");
    ex.assert_alive();
    note(format!(
        "exchange RSS {:.1} MiB before, peak {:.1} MiB",
        rss_before as f64 / 1024.0,
        rss_peak as f64 / 1024.0
    ));
    // 32 MiB per connection, the store's cache and the runtime: far below what
    // 60 half frames of 15 MiB would have cost (900 MiB).
    assert!(
        rss_peak < 400 * 1024,
        "exchange RSS peaked at {rss_peak} KiB"
    );
    good.stop();
}

/// Appends `[limits]` keys to the exchange's config.
fn ex_limits(ex: &Exchange, keys: &str) {
    let text = std::fs::read_to_string(&ex.config).unwrap();
    std::fs::write(&ex.config, format!("{text}\n[limits]\n{keys}")).unwrap();
}
