//! What the JetStream backend promises beyond the contract every backend keeps
//! (`contract.rs`): two nodes on one stream, a crash between a publish and its
//! acknowledgement, a server killed with SIGKILL, a server that does not sync,
//! and batches and records larger than a message.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::batch::encode_records;
use ferry_protocol::messages::{record::Body, FileChunk, FileEnd, Record, RecordList};
use ferry_tests::nats::NatsServer;
use sha2::{Digest, Sha256};

use super::wire;
use super::*;

thread_local! {
    /// The servers of this test thread, by store directory: a contract test
    /// reopens its backend over the same directory and must find the same
    /// server. Dropped (servers killed) when the test's thread ends.
    static SERVERS: RefCell<HashMap<PathBuf, NatsServer>> = RefCell::new(HashMap::new());
}

/// `[store]` for a JetStream backend on `server`, node-local state in `dir`.
pub(in crate::store) fn section(dir: &Path, server: &NatsServer) -> StoreSection {
    let mut s = StoreSection::embedded(dir.to_path_buf());
    s.kind = "jetstream".into();
    s.url = Some(server.url());
    s.monitor = Some(server.monitor());
    s
}

/// Opens a JetStream backend over `dir` on a server of its own, started at
/// the first open of `dir` in this test (the contract tests' `Open`).
pub(in crate::store) fn open_for(dir: &Path) -> SharedStore {
    let cfg = SERVERS.with(|s| {
        let mut s = s.borrow_mut();
        let server = s.entry(dir.to_path_buf()).or_insert_with(NatsServer::start);
        section(dir, server)
    });
    Arc::new(JetStream::open(&cfg).unwrap())
}

/// The line of seq `seq`: the same whichever batch carries it, as an agent's
/// resend carries the same records.
fn line(seq: u64) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..120)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'!' + (x % 90) as u8
        })
        .collect()
}

fn lines_batch(stream: &str, first: u64, n: u64) -> Incoming {
    records_batch(
        stream,
        first,
        (first..first + n)
            .map(|s| Record {
                time_unix_ms: 1,
                position: String::new(),
                body: Some(Body::Line(line(s))),
            })
            .collect(),
    )
}

fn records_batch(stream: &str, first: u64, records: Vec<Record>) -> Incoming {
    let e = encode_records(&RecordList { records }).unwrap();
    Incoming {
        agent: "a1".into(),
        item: Item::Batch(e.into_batch(stream.into(), first)),
    }
}

fn chunk(id: &str, offset: u64, data: &[u8], end: Option<&[u8]>) -> Record {
    Record {
        time_unix_ms: 1,
        position: String::new(),
        body: Some(Body::FileChunk(FileChunk {
            file_id: id.into(),
            path: format!("in/{id}.bin"),
            offset,
            data: data.to_vec(),
            end: end.map(|whole| FileEnd {
                size: whole.len() as u64,
                sha256: Sha256::digest(whole).to_vec(),
            }),
        })),
    }
}

/// Bytes that do not compress.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every stored line of a stream: (seq, line).
fn stored(store: &dyn Backend, stream: &str, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    store
        .records("a1", stream, from, &mut |r, _| {
            if let Some(Body::Line(l)) = r.record.body {
                out.push((r.seq, l));
            }
            true
        })
        .unwrap();
    out
}

fn assert_exactly(store: &dyn Backend, stream: &str, n: u64) {
    let got = stored(store, stream, 1);
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    for (s, l) in got {
        assert!(l == line(s), "seq {s} holds another record");
    }
    assert_eq!(store.next_expected("a1", stream).unwrap(), n + 1);
}

/// How many messages the record log holds for (a1, `stream`).
fn messages_on(js: &JetStream, stream: &str) -> usize {
    let subject = js.inner.names.subject("a1", stream);
    js.block(async {
        let mut n = 0;
        let mut info = js.inner.stream.info_with_subjects(&subject).await.unwrap();
        while let Some(item) = futures_util::StreamExt::next(&mut info).await {
            n += item.unwrap().1;
        }
        n
    })
}

/// Two exchange nodes on one JetStream, given the same stream's batches in
/// overlapping cuts at the same time (an agent that moved to the other node
/// and resent): every seq is stored once, in order, whoever stored it.
#[test]
fn two_nodes_committing_one_stream_store_every_seq_once_in_order() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 600;
    // A third node that commits nothing is woken by the others' commits.
    let watcher = JetStream::open(&section(dir.path(), &server)).unwrap();
    let mut woken = watcher.subscribe();
    woken.borrow_and_update();
    let node = |cut: u64| {
        let store = JetStream::open(&section(dir.path(), &server)).unwrap();
        std::thread::spawn(move || {
            let mut next = 1;
            let mut i = 0;
            while next <= N {
                // Batches of varying length, cut differently on each node.
                let n = (1 + (i * cut) % 9).min(N - next + 1);
                i += 1;
                match store.commit_group(&[lines_batch("s", next, n)]).remove(0) {
                    Ok(up_to) => {
                        assert!(up_to >= next + n - 1, "acked {up_to} for {next}+{n}");
                        next = up_to + 1;
                    }
                    Err(StoreError::Resend(_)) => next = store.next_expected("a1", "s").unwrap(),
                    Err(e) => panic!("{e}"),
                }
            }
        })
    };
    let (a, b) = (node(5), node(7));
    a.join().unwrap();
    b.join().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !woken.has_changed().unwrap() {
        assert!(
            Instant::now() < until,
            "commits of other nodes woke no subscriber"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A third node reads what the two stored.
    let c = JetStream::open(&section(dir.path(), &server)).unwrap();
    assert_exactly(&c, "s", N);
    // A node that knows nothing of the subject finds where seq 300 starts.
    let d = JetStream::open(&section(dir.path(), &server)).unwrap();
    let from_300 = stored(&d, "s", 300);
    assert_eq!(from_300.first().unwrap().0, 300);
    assert_eq!(from_300.len() as u64, N - 299);
}

/// The crash between publish and acknowledgement: the batch reached
/// JetStream but the node never learnt it. The agent's resend, to the same
/// node or to a restarted one, is acked as a duplicate and stored once.
#[test]
fn a_resend_of_a_batch_stored_without_an_ack_is_a_duplicate() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = JetStream::open(&section(dir.path(), &server)).unwrap();
    assert_eq!(
        *store.commit_group(&[lines_batch("s", 1, 3)])[0]
            .as_ref()
            .unwrap(),
        3
    );
    // Publish 4..=6 behind the node's back, as it would have.
    let subject = store.inner.names.subject("a1", "s");
    let Incoming {
        item: Item::Batch(b),
        ..
    } = lines_batch("s", 4, 3)
    else {
        unreachable!()
    };
    store.block(async {
        let last = store.inner.last_message(&subject).await.unwrap().unwrap();
        for p in wire::batch_pieces(&b, 0, now_unix_ms(), store.inner.message_limit()).unwrap() {
            store
                .inner
                .js
                .publish_with_headers(subject.clone(), p.head.headers(last.seq), p.payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    // The same node still believes 4 is next: its conditional publish fails,
    // it reads the subject again, and finds the batch there.
    assert_eq!(
        *store.commit_group(&[lines_batch("s", 4, 3)])[0]
            .as_ref()
            .unwrap(),
        6
    );
    // A restarted node learns it from the subject at once.
    drop(store);
    let store = JetStream::open(&section(dir.path(), &server)).unwrap();
    assert_eq!(
        *store.commit_group(&[lines_batch("s", 4, 3)])[0]
            .as_ref()
            .unwrap(),
        6
    );
    assert_eq!(
        *store.commit_group(&[lines_batch("s", 2, 6)])[0]
            .as_ref()
            .unwrap(),
        7
    );
    assert_exactly(&store, "s", 7);
    assert_eq!(messages_on(&store, "s"), 3, "one message per stored batch");
}

/// nats-server killed with SIGKILL while a node commits in a loop, then
/// restarted; the node resends what was not acked: every seq exactly once, and
/// everything acked survived the kill.
#[test]
fn a_server_killed_mid_commit_loses_nothing_acked_and_stores_nothing_twice() {
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = JetStream::open(&section(dir.path(), &server)).unwrap();
    const N: u64 = 3000;
    let acked = Arc::new(Mutex::new(0u64));
    let committer = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut next = 1;
            let mut failures = 0;
            let start = Instant::now();
            while next <= N {
                assert!(
                    start.elapsed() < Duration::from_secs(240),
                    "stuck at seq {next}"
                );
                let n = 7.min(N - next + 1);
                match store.commit_group(&[lines_batch("s", next, n)]).remove(0) {
                    Ok(up_to) => {
                        next = up_to + 1;
                        *acked.lock().unwrap() = up_to;
                    }
                    // Not stored (or not known to be): resend from the next seq.
                    Err(_) => {
                        failures += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            assert!(!store.poisoned());
            (store, failures)
        })
    };
    // Two kills, each in the middle of the loop (the server is restarted from
    // this thread: it dies with the thread that started it).
    for round in 1..=2 {
        let seen = *acked.lock().unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while *acked.lock().unwrap() < seen + 300 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = *acked.lock().unwrap();
        server.kill9();
        std::thread::sleep(Duration::from_millis(700));
        server.restart();
        eprintln!("kill {round}: killed after seq {before}");
    }
    let (store, failures) = committer.join().unwrap();
    eprintln!("{failures} commits failed around the kills");
    assert_exactly(&store, "s", N);
    // What a node that never saw the kills reads.
    let fresh = JetStream::open(&section(dir.path(), &server)).unwrap();
    assert_exactly(&fresh, "s", N);
}

/// A `MakeWriter` into a shared buffer, to read what was logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Debian's nats-server 2.9 with JetStream at its defaults syncs every two
/// minutes: refused with what to do; accepted, with an alarm at start, only
/// when the operator says so.
#[test]
fn a_server_that_acknowledges_before_syncing_is_refused_unless_allowed() {
    let Some(server) = NatsServer::start_debian_defaults() else {
        assert!(
            ferry_tests::host_has(
                false,
                "Debian's nats-server (/usr/sbin/nats-server): apt-get install nats-server"
            ),
            "unreachable"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = section(dir.path(), &server);
    let err = JetStream::open(&cfg).err().expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Unsafe(_)), "{msg}");
    for needle in [
        "acknowledges a write before it is on disk",
        "every 2 minutes",
        "sync_interval: always",
        "allow_unsynced_acks = true",
        "replicas = 3",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in: {msg}");
    }
    cfg.allow_unsynced_acks = true;
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .finish();
    let store = tracing::subscriber::with_default(subscriber, || JetStream::open(&cfg)).unwrap();
    let logged = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("ALARM: the JetStream server")),
        "no alarm logged: {logged}"
    );
    assert_eq!(
        *store.commit_group(&[lines_batch("s", 1, 3)])[0]
            .as_ref()
            .unwrap(),
        3
    );
    assert_exactly(&store, "s", 3);
}

/// A 3 MiB file chunk and a batch of 5 MiB, each larger than a message
/// (max_payload is 1 MiB), are split across messages and read back
/// byte-identical, by the node that stored them and by another one; a file
/// completed on another node than its first chunk is checked by reading its
/// bytes back from the log.
#[test]
fn records_and_batches_larger_than_a_message_read_back_whole() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = JetStream::open(&section(dir.path(), &server)).unwrap();
    assert_eq!(a.inner.client.server_info().max_payload, 1 << 20);

    let whole = noise(3 << 20, 7);
    let r = a.commit_group(&[records_batch(
        "d",
        1,
        vec![chunk("f1", 0, &whole, Some(&whole))],
    )]);
    assert_eq!(*r[0].as_ref().unwrap(), 1);
    assert!(messages_on(&a, "d") >= 4, "a 3 MiB record in parts");
    let f = a.file("a1", "d", "f1").unwrap().unwrap();
    assert_eq!((f.status.as_str(), f.size, f.seq), ("complete", 3 << 20, 1));

    // 5 MiB of lines in one batch.
    let n = (5 << 20) / 121;
    let before = messages_on(&a, "d");
    let r = a.commit_group(&[lines_batch("d", 2, n)]);
    assert_eq!(*r[0].as_ref().unwrap(), 1 + n);
    assert!(
        messages_on(&a, "d") - before >= 5,
        "a 5 MiB batch in several messages"
    );

    // A file whose 3 MiB first chunk one node stores and whose end another does.
    let second = noise((3 << 20) + 12345, 11);
    let (head, tail) = second.split_at(3 << 20);
    let r = a.commit_group(&[records_batch("d", n + 2, vec![chunk("f2", 0, head, None)])]);
    assert_eq!(*r[0].as_ref().unwrap(), n + 2);
    let b = JetStream::open(&section(dir.path(), &server)).unwrap();
    let r = b.commit_group(&[records_batch(
        "d",
        n + 3,
        vec![chunk("f2", 3 << 20, tail, Some(&second))],
    )]);
    assert_eq!(*r[0].as_ref().unwrap(), n + 3);
    assert_eq!(b.file("a1", "d", "f2").unwrap().unwrap().status, "complete");

    for store in [&a, &b] {
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut store.open_file("a1", "d", "f1").unwrap(), &mut got)
            .unwrap();
        assert!(got == whole, "f1 read back differs");
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut store.open_file("a1", "d", "f2").unwrap(), &mut got)
            .unwrap();
        assert!(got == second, "f2 read back differs");
        let lines = stored(store, "d", 2);
        assert_eq!(lines.len() as u64, n);
        assert!(
            lines.iter().all(|(s, l)| *l == line(*s)),
            "a line read back differs"
        );
        // A read from the middle of the batch starts where asked.
        let mid = stored(store, "d", 2 + n / 2);
        assert_eq!(mid.first().unwrap().0, 2 + n / 2);
        assert_eq!(mid.len() as u64, n - n / 2);
        // File chunks come without their bytes.
        let mut chunks = 0;
        store
            .records("a1", "d", 1, &mut |r, _| {
                if let Some(Body::FileChunk(c)) = r.record.body {
                    assert!(c.data.is_empty());
                    chunks += 1;
                }
                true
            })
            .unwrap();
        assert_eq!(chunks, 3);
    }
    // A node that never read this stream starts a read inside the big batch.
    let c = JetStream::open(&section(dir.path(), &server)).unwrap();
    let mid = stored(&c, "d", 2 + n / 3);
    assert_eq!(mid.first().unwrap().0, 2 + n / 3);
    assert_eq!(mid.len() as u64, n - n / 3);
    assert_eq!(
        b.files("a1", "d")
            .unwrap()
            .iter()
            .map(|f| f.file_id.as_str())
            .collect::<Vec<_>>(),
        vec!["f1", "f2"]
    );
}

/// The blocking methods work from every kind of caller the exchange has: a
/// runtime's worker under `block_in_place` (the server opens the store so), an
/// async function on a current-thread runtime (the offline report), and the
/// store may be dropped there.
#[test]
fn the_blocking_methods_work_from_inside_a_runtime() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = section(dir.path(), &server);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt
        .block_on(rt.spawn(async move {
            let store = tokio::task::block_in_place(|| crate::store::open(&cfg)).unwrap();
            let acks =
                tokio::task::block_in_place(|| store.commit_group(&[lines_batch("s", 1, 3)]));
            assert_eq!(*acks[0].as_ref().unwrap(), 3);
            store
        }))
        .unwrap();
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current.block_on(async move {
        assert_eq!(store.streams().unwrap().len(), 1);
        assert_exactly(&*store, "s", 3);
        drop(store);
    });
}
