//! The directory source against real files in a temporary folder, with the test
//! buffer of `testkit` standing in for the agent.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_protocol::messages::{record, FileAbort, FileChunk};
use sha2::{Digest, Sha256};

use super::testkit::Store;
use super::*;
use crate::{SourceConfig, SourceError};

fn config(dir: &Path, complete: Complete) -> DirectoryConfig {
    DirectoryConfig {
        complete,
        chunk_size: Size(4096),
        quiet_period: Duration(std::time::Duration::from_millis(300)),
        rescan_interval: Duration(std::time::Duration::from_millis(200)),
        ..DirectoryConfig::new(dir)
    }
}

/// Puts a file into a watched outbox as producers are told to: written under a
/// hidden temporary name, then renamed. A plain `fs::write` creates the file empty
/// first, and with `complete = "rename"` the source takes a file as soon as it sees
/// it: a scan between the create and the write (a busy machine makes that window
/// long) sends it empty, then again whole, as a new file, once it has changed.
fn drop_in(path: &Path, content: &[u8]) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn source(cfg: &DirectoryConfig) -> Box<dyn Source> {
    Box::new(DirectorySource::new(cfg.clone()))
}

fn chunks(store: &Store) -> Vec<FileChunk> {
    store
        .records()
        .into_iter()
        .filter_map(|r| match r.body {
            Some(record::Body::FileChunk(c)) => Some(c),
            _ => None,
        })
        .collect()
}

fn aborts(store: &Store) -> Vec<FileAbort> {
    store
        .records()
        .into_iter()
        .filter_map(|r| match r.body {
            Some(record::Body::FileAbort(a)) => Some(a),
            _ => None,
        })
        .collect()
}

/// A file as the exchange would rebuild it from its chunks.
#[derive(Debug)]
struct Received {
    /// Rank of its first chunk among all chunks.
    order: usize,
    path: String,
    data: Vec<u8>,
    chunks: usize,
    end: Option<(u64, Vec<u8>)>,
}

/// Reassembles every file id, asserting that its chunks are contiguous, in order,
/// with no offset twice.
fn received(store: &Store) -> BTreeMap<String, Received> {
    let mut out: BTreeMap<String, Received> = BTreeMap::new();
    for (i, c) in chunks(store).into_iter().enumerate() {
        let r = out.entry(c.file_id.clone()).or_insert(Received {
            order: i,
            path: c.path.clone(),
            data: Vec::new(),
            chunks: 0,
            end: None,
        });
        assert_eq!(r.path, c.path, "one file id, one path");
        assert!(r.end.is_none(), "chunk after the end of {}", c.file_id);
        assert_eq!(
            c.offset,
            r.data.len() as u64,
            "chunk of {} out of place",
            c.path
        );
        r.data.extend_from_slice(&c.data);
        r.chunks += 1;
        r.end = c.end.map(|e| (e.size, e.sha256));
    }
    out
}

/// The complete transfers of `name`, in the order they started.
fn complete(store: &Store, name: &str) -> Vec<Received> {
    let mut v: Vec<Received> = received(store)
        .into_values()
        .filter(|r| r.path == name && r.end.is_some())
        .collect();
    v.sort_by_key(|r| r.order);
    v
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

fn assert_whole(r: &Received, content: &[u8]) {
    assert_eq!(r.data, content, "content of {}", r.path);
    assert_eq!(
        r.end,
        Some((content.len() as u64, sha(content))),
        "end of {}",
        r.path
    );
}

fn pattern_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_empty_tiny_and_multi_chunk_files_and_moves_them_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let big = pattern_bytes(3 * 4096 + 123, 7);
    std::fs::write(dir.path().join("empty.bin"), b"").unwrap();
    std::fs::write(dir.path().join("one.bin"), b"x").unwrap();
    std::fs::write(dir.path().join("multi.bin"), &big).unwrap();
    let store = Store::new();
    let mut run = store.start(source(&config(dir.path(), Complete::Rename)));

    run.wait_for("three complete files", || {
        received(&store)
            .values()
            .filter(|r| r.end.is_some())
            .count()
            == 3
    })
    .await;
    let empty = complete(&store, "empty.bin");
    let one = complete(&store, "one.bin");
    let multi = complete(&store, "multi.bin");
    assert_eq!((empty.len(), one.len(), multi.len()), (1, 1, 1));
    assert_eq!(empty[0].chunks, 1, "a 0-byte file is one chunk");
    assert_whole(&empty[0], b"");
    assert_eq!(one[0].chunks, 1);
    assert_whole(&one[0], b"x");
    assert_eq!(multi[0].chunks, 4, "3 full chunks of 4 KiB and 123 bytes");
    assert_whole(&multi[0], &big);
    assert_eq!(store.count(), 6);
    let ids: Vec<String> = received(&store).into_keys().collect();
    assert!(ids
        .iter()
        .all(|id| id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit())));
    assert!(describe_position(&store.position().unwrap()).starts_with("idle; 3 files awaiting ack"));

    // Not acknowledged yet: everything stays in the outbox.
    for n in ["empty.bin", "one.bin", "multi.bin"] {
        assert!(dir.path().join(n).exists(), "{n} moved before its ack");
    }
    store.ack(store.head());
    let sent = dir.path().join("sent");
    run.wait_for("files moved to sent/", || {
        ["empty.bin", "one.bin", "multi.bin"]
            .iter()
            .all(|n| sent.join(n).exists() && !dir.path().join(n).exists())
    })
    .await;
    assert_eq!(std::fs::read(sent.join("multi.bin")).unwrap(), big);
    run.wait_for("a position without awaiting files", || {
        describe_position(&store.position().unwrap()) == "idle; 0 awaiting ack"
    })
    .await;
    assert_eq!(store.count(), 6, "moving sends nothing");
    assert!(matches!(run.stop().await, Err(SourceError::Shutdown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_ack_and_same_name_sent_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Complete::Rename);
    cfg.after_send = AfterSend::Delete;
    std::fs::write(dir.path().join("a.txt"), b"first").unwrap();
    let store = Store::new();
    let mut run = store.start(source(&cfg));
    run.wait_for("a.txt sent", || complete(&store, "a.txt").len() == 1)
        .await;
    assert!(dir.path().join("a.txt").exists(), "deleted before its ack");

    // A new a.txt while the old one awaits its ack is not taken: it is listed.
    let probe = dir.path().join("probe.txt");
    std::fs::write(dir.path().join(".a.txt.tmp"), b"second").unwrap();
    drop_in(&probe, b"p");
    run.wait_for("probe sent", || complete(&store, "probe.txt").len() == 1)
        .await;
    std::fs::rename(dir.path().join(".a.txt.tmp"), dir.path().join("a.txt")).unwrap();
    // Older than probe2, so it would go first if it were taken while listed.
    let probe2 = dir.path().join("probe2.txt");
    drop_in(&probe2, b"p2");
    run.wait_for("probe2 sent", || complete(&store, "probe2.txt").len() == 1)
        .await;
    assert_eq!(
        complete(&store, "a.txt").len(),
        1,
        "a listed name is not taken again"
    );

    store.ack(store.head());
    // The acked entry no longer matches the file at a.txt (replaced): it is dropped
    // without deleting the new file, which is then sent as a file of its own.
    run.wait_for("the new a.txt sent", || {
        complete(&store, "a.txt").len() == 2
    })
    .await;
    let both = complete(&store, "a.txt");
    assert_whole(&both[0], b"first");
    assert_whole(&both[1], b"second");
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"second");
    store.ack(store.head());
    run.wait_for("everything deleted", || {
        !dir.path().join("a.txt").exists() && !probe.exists() && !probe2.exists()
    })
    .await;
    assert!(
        !dir.path().join("sent").exists(),
        "delete mode creates no sent dir"
    );
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_mode_waits_for_a_growing_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Complete::Quiet);
    cfg.quiet_period = Duration(std::time::Duration::from_secs(1));
    let path = dir.path().join("growing.log");
    let store = Store::new();
    let mut run = store.start(source(&cfg));

    // Appends every 50 ms, far inside the 1 s quiet period.
    let mut expect = Vec::new();
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..20 {
        let piece = pattern_bytes(1000, i);
        std::io::Write::write_all(&mut f, &piece).unwrap();
        expect.extend_from_slice(&piece);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(f);
    run.wait_for("growing.log sent", || {
        complete(&store, "growing.log").len() == 1
    })
    .await;
    assert!(
        aborts(&store).is_empty(),
        "taken before it was complete: {:?}",
        aborts(&store)
    );
    assert_eq!(received(&store).len(), 1, "one transfer only");
    assert_whole(&complete(&store, "growing.log")[0], &expect);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_mode_takes_only_marked_files_and_removes_the_marker() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Complete::Marker);
    std::fs::write(dir.path().join("a.csv"), b"a,1").unwrap();
    let store = Store::new();
    let mut run = store.start(source(&cfg));

    std::fs::write(dir.path().join("b.csv"), b"b,2").unwrap();
    std::fs::write(dir.path().join("b.csv.done"), b"").unwrap();
    run.wait_for("b.csv sent", || complete(&store, "b.csv").len() == 1)
        .await;
    assert!(
        complete(&store, "a.csv").is_empty(),
        "a.csv has no marker yet"
    );
    assert!(
        complete(&store, "b.csv.done").is_empty(),
        "markers are not data"
    );

    std::fs::write(dir.path().join("a.csv.done"), b"").unwrap();
    run.wait_for("a.csv sent", || complete(&store, "a.csv").len() == 1)
        .await;
    assert_whole(&complete(&store, "a.csv")[0], b"a,1");
    assert_eq!(received(&store).len(), 2);

    assert!(
        dir.path().join("a.csv.done").exists(),
        "marker removed before the ack"
    );
    store.ack(store.head());
    let sent = dir.path().join("sent");
    run.wait_for("files moved and markers removed", || {
        sent.join("a.csv").exists()
            && sent.join("b.csv").exists()
            && !dir.path().join("a.csv.done").exists()
            && !dir.path().join("b.csv.done").exists()
    })
    .await;
    assert!(!sent.join("a.csv.done").exists());
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_mode_ignores_temporary_hidden_and_unmatched_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Complete::Rename);
    cfg.pattern = "*.xml".into();
    // A long rescan interval: only filesystem events can wake the source promptly.
    cfg.rescan_interval = Duration(std::time::Duration::from_secs(3600));
    let store = Store::new();
    let mut run = store.start(source(&cfg));
    for n in ["x.xml.tmp", "y.xml.part", ".z.xml", "notes.txt"] {
        std::fs::write(dir.path().join(n), n).unwrap();
    }
    std::fs::create_dir(dir.path().join("sub.xml")).unwrap();
    drop_in(&dir.path().join("probe.xml"), b"<p/>");
    run.wait_for("probe.xml sent (woken by an event)", || {
        complete(&store, "probe.xml").len() == 1
    })
    .await;
    assert_eq!(
        received(&store).len(),
        1,
        "only probe.xml: {:?}",
        received(&store)
    );

    std::fs::rename(dir.path().join("x.xml.tmp"), dir.path().join("x.xml")).unwrap();
    run.wait_for("x.xml sent", || complete(&store, "x.xml").len() == 1)
        .await;
    assert_whole(&complete(&store, "x.xml")[0], b"x.xml.tmp");
    assert_eq!(received(&store).len(), 2);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_file_resumes_at_the_next_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Complete::Rename);
    let content = pattern_bytes(10 * 4096 + 77, 3);
    std::fs::write(dir.path().join("big.dat"), &content).unwrap();
    let store = Store::new();
    store.hold_at(3);
    let mut run = store.start(source(&cfg));
    run.wait_for("3 chunks durable", || store.count() == 3)
        .await;
    // The fourth chunk is in flight when the process dies: it never becomes durable.
    assert!(matches!(run.stop().await, Err(SourceError::Shutdown)));
    let pos = describe_position(&store.position().unwrap());
    assert!(
        pos.starts_with("sending big.dat at 12288/41037 (file "),
        "{pos}"
    );

    store.release();
    let mut run = store.start(source(&cfg));
    run.wait_for("big.dat complete", || {
        complete(&store, "big.dat").len() == 1
    })
    .await;
    let all = received(&store);
    assert_eq!(all.len(), 1, "one file id across the restart");
    assert_eq!(store.count(), 11, "11 chunks, none twice");
    assert_whole(&complete(&store, "big.dat")[0], &content);
    assert!(aborts(&store).is_empty());
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_files_awaiting_ack_sends_nothing_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Complete::Rename);
    std::fs::write(dir.path().join("a.bin"), b"aaaa").unwrap();
    std::fs::write(dir.path().join("gone.bin"), b"gggg").unwrap();
    let store = Store::new();
    let mut run = store.start(source(&cfg));
    run.wait_for("both sent", || received(&store).len() == 2)
        .await;
    run.wait_for("both listed", || {
        describe_position(&store.position().unwrap()) == "idle; 2 files awaiting ack"
    })
    .await;
    run.stop().await.unwrap_err();
    std::fs::remove_file(dir.path().join("gone.bin")).unwrap();

    let mut run = store.start(source(&cfg));
    drop_in(&dir.path().join("b.bin"), b"bbbb");
    run.wait_for("b.bin sent", || complete(&store, "b.bin").len() == 1)
        .await;
    assert_eq!(
        complete(&store, "a.bin").len(),
        1,
        "a.bin was not sent again"
    );
    assert_eq!(store.count(), 3);
    assert!(dir.path().join("a.bin").exists(), "not acknowledged yet");

    store.ack(store.head());
    run.wait_for("a.bin and b.bin moved", || {
        let sent = dir.path().join("sent");
        sent.join("a.bin").exists() && sent.join("b.bin").exists()
    })
    .await;
    run.wait_for("an empty awaiting list", || {
        describe_position(&store.position().unwrap()) == "idle; 0 awaiting ack"
    })
    .await;
    assert_eq!(store.count(), 3);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_modified_mid_send_is_aborted_and_resent_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Complete::Rename);
    let path = dir.path().join("m.dat");
    let mut content = pattern_bytes(10 * 4096, 9);
    std::fs::write(&path, &content).unwrap();
    let store = Store::new();
    store.hold_at(2);
    let mut run = store.start(source(&cfg));
    run.wait_for("2 chunks durable", || store.count() == 2)
        .await;
    let first_id = chunks(&store)[0].file_id.clone();

    let extra = b"appended while the file was being sent";
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, extra).unwrap();
    drop(f);
    content.extend_from_slice(extra);
    store.release();

    run.wait_for("m.dat resent", || complete(&store, "m.dat").len() == 1)
        .await;
    let ab = aborts(&store);
    assert_eq!(ab.len(), 1, "{ab:?}");
    assert_eq!(ab[0].file_id, first_id);
    assert_eq!(ab[0].path, "m.dat");
    assert!(ab[0].reason.contains("size"), "{}", ab[0].reason);
    let all = received(&store);
    assert_eq!(all.len(), 2, "the aborted transfer and the full one");
    assert!(all[&first_id].end.is_none(), "the torn transfer never ends");
    let done = complete(&store, "m.dat");
    assert_ne!(all.keys().find(|k| **k != first_id), None);
    assert_whole(&done[0], &content);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_changed_while_stopped_is_aborted_then_resent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Complete::Rename);
    let path = dir.path().join("c.dat");
    std::fs::write(&path, pattern_bytes(5 * 4096, 1)).unwrap();
    let store = Store::new();
    store.hold_at(2);
    let mut run = store.start(source(&cfg));
    run.wait_for("2 chunks durable", || store.count() == 2)
        .await;
    run.stop().await.unwrap_err();
    let replacement = pattern_bytes(3 * 4096 + 5, 2);
    drop_in(&path, &replacement);

    store.release();
    let mut run = store.start(source(&cfg));
    run.wait_for("c.dat resent", || complete(&store, "c.dat").len() == 1)
        .await;
    let ab = aborts(&store);
    assert_eq!(ab.len(), 1);
    assert!(ab[0].reason.contains("inode"), "{}", ab[0].reason);
    assert_whole(&complete(&store, "c.dat")[0], &replacement);
    run.stop().await.unwrap_err();
}

/// A sparse file just over 4 GiB: offsets and sizes past `u32::MAX` must survive
/// chunking, the position and the end record. Slow (hashes 4 GiB twice), so opt-in:
/// `cargo test -p ferry-adapters -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reads and hashes 4 GiB"]
async fn file_over_4_gib() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.img");
    let size: u64 = (4 << 30) + 5;
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size - 5).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail!", size - 5).unwrap();
    drop(f);
    let mut expect = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..4096 {
        expect.update(&zeros);
    }
    expect.update(b"tail!");
    let expect = expect.finalize().to_vec();

    let mut cfg = config(dir.path(), Complete::Rename);
    cfg.chunk_size = Size(MAX_CHUNK_SIZE);
    let store = Store::lean();
    let mut run = store.start(source(&cfg));
    run.wait_for("the end chunk", || {
        chunks(&store).last().is_some_and(|c| c.end.is_some())
    })
    .await;
    let all = chunks(&store);
    let lens = store.data_lens();
    assert_eq!(all.len(), 1025, "1024 chunks of 4 MiB and one of 5 bytes");
    let mut off = 0u64;
    for (c, len) in all.iter().zip(&lens) {
        assert_eq!(c.offset, off);
        off += *len as u64;
    }
    assert_eq!(all[1024].offset, 4 << 30);
    let end = all[1024].end.clone().unwrap();
    assert_eq!((off, end.size), (size, size));
    assert_eq!(end.sha256, expect);
    run.stop().await.unwrap_err();
}

#[test]
fn config_defaults_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let json = serde_json::json!({ "kind": "directory", "path": dir.path() });
    let SourceConfig::Directory(c) = serde_json::from_value::<SourceConfig>(json).unwrap() else {
        panic!("not a directory config");
    };
    assert_eq!(c, DirectoryConfig::new(dir.path()));
    assert_eq!(c.chunk_size, Size(1 << 20));
    assert_eq!(c.quiet_period.0, std::time::Duration::from_secs(2));
    assert_eq!(c.effective_sent_dir(), dir.path().join("sent"));
    assert_eq!(c.validate(), Ok(()));

    let full = serde_json::json!({
        "kind": "directory", "path": dir.path(), "pattern": "*.xml", "after_send": "delete",
        "complete": "marker", "marker_suffix": ".ok", "chunk_size": "64KiB",
        "rescan_interval": "1m", "quiet_period": "500ms", "sent_dir": "/tmp/x"
    });
    let SourceConfig::Directory(c) = serde_json::from_value::<SourceConfig>(full).unwrap() else {
        panic!("not a directory config");
    };
    assert_eq!(
        (c.complete, c.after_send, c.chunk_size),
        (Complete::Marker, AfterSend::Delete, Size(65536))
    );

    let unknown = serde_json::json!({ "kind": "directory", "path": "/x", "chunk": "1MiB" });
    assert!(serde_json::from_value::<SourceConfig>(unknown).is_err());

    let missing = DirectoryConfig::new("/nonexistent/ferry-outbox");
    assert_eq!(missing.validate(), Ok(()));
    assert_eq!(
        missing.check_environment(),
        Err("source.path: /nonexistent/ferry-outbox does not exist or is not a directory".into())
    );
    let bad = |f: &dyn Fn(&mut DirectoryConfig)| {
        let mut c = DirectoryConfig::new(dir.path());
        f(&mut c);
        c.validate().unwrap_err()
    };
    assert!(bad(&|c| c.pattern = "[".into()).starts_with("source.pattern:"));
    assert!(bad(&|c| c.chunk_size = Size(5 << 20)).starts_with("source.chunk_size:"));
    assert!(bad(&|c| c.chunk_size = Size(0)).starts_with("source.chunk_size:"));
    assert!(bad(&|c| c.sent_dir = Some(dir.path().to_path_buf())).starts_with("source.sent_dir:"));
    assert!(bad(&|c| {
        c.complete = Complete::Marker;
        c.marker_suffix = String::new();
    })
    .starts_with("source.marker_suffix:"));
}

/// Creates a FIFO at `path`.
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Whoever can write the outbox must not be able to make the agent ship a file it
/// can read elsewhere (its own private key), nor stall it on a FIFO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_and_special_files_are_refused_and_left_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let outside = tempfile::tempdir().unwrap();
    let secret = b"-----BEGIN PRIVATE KEY----- the agent's key, never to be shipped";
    let secret_path = outside.path().join("agent.key");
    std::fs::write(&secret_path, secret).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("key.csv");
    let fifo = dir.path().join("pipe.csv");
    std::os::unix::fs::symlink(&secret_path, &link).unwrap();
    mkfifo(&fifo);
    std::fs::write(dir.path().join("ok.csv"), b"a,1").unwrap();
    let store = Store::new();
    let mut run = store.start(source(&config(dir.path(), Complete::Rename)));

    run.wait_for("ok.csv sent", || complete(&store, "ok.csv").len() == 1)
        .await;
    store.ack(store.head());
    let sent = dir.path().join("sent");
    run.wait_for("ok.csv moved", || sent.join("ok.csv").exists())
        .await;
    // Several rescans later (every 200 ms), and a file written after them is still
    // taken: the source neither took the link nor hangs on the FIFO.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    drop_in(&dir.path().join("later.csv"), b"b,2");
    run.wait_for("later.csv sent", || {
        complete(&store, "later.csv").len() == 1
    })
    .await;

    let names: Vec<String> = received(&store).into_values().map(|r| r.path).collect();
    assert_eq!(names.len(), 2, "only the regular files: {names:?}");
    for c in chunks(&store) {
        assert!(
            !c.data.windows(secret.len()).any(|w| w == secret),
            "the secret was shipped as {}",
            c.path
        );
    }
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(std::fs::read(&secret_path).unwrap(), secret);
    assert!(!sent.join("key.csv").exists() && !sent.join("pipe.csv").exists());
    run.stop().await.unwrap_err();
}

/// The value of `key` in the stored position's awaiting entries, in order.
fn awaiting_field(store: &Store, key: &str) -> Vec<serde_json::Value> {
    let pos: serde_json::Value = serde_json::from_slice(&store.position().unwrap()).unwrap();
    pos["awaiting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[key].clone())
        .collect()
}

/// The seq of the record ending `name`'s transfer `file_id`.
fn end_seq(store: &Store, file_id: &str) -> u64 {
    store
        .records_with_seqs()
        .into_iter()
        .find_map(|(seq, r)| match r.body {
            Some(record::Body::FileChunk(c)) if c.file_id == file_id && c.end.is_some() => {
                Some(seq)
            }
            _ => None,
        })
        .unwrap()
}

/// A restarted source may find a position naming a file as sent whose last chunk the
/// buffer does not hold (its commit was written, then its sync failed): the file must
/// stay in the outbox until the seq of its own last chunk is acknowledged, not
/// whatever was durable when the source started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_leaves_only_after_its_own_last_seq_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Complete::Rename);
    std::fs::write(dir.path().join("x.bin"), b"xxxx").unwrap();
    let store = Store::new();
    let mut run = store.start(source(&cfg));
    run.wait_for("x.bin sent", || complete(&store, "x.bin").len() == 1)
        .await;
    // Renamed into place: in rename mode a file is taken as soon as it appears.
    drop_in(&dir.path().join("f.bin"), &pattern_bytes(2 * 4096 + 9, 4));
    run.wait_for("f.bin sent and listed", || {
        complete(&store, "f.bin").len() == 1
            && describe_position(&store.position().unwrap()) == "idle; 2 files awaiting ack"
    })
    .await;
    run.stop().await.unwrap_err();
    // The position knows each file's last seq exactly.
    let ids: Vec<String> = ["x.bin", "f.bin"]
        .iter()
        .map(|n| {
            received(&store)
                .into_iter()
                .find(|(_, r)| r.path == *n)
                .unwrap()
                .0
        })
        .collect();
    let (x_end, f_end) = (end_seq(&store, &ids[0]), end_seq(&store, &ids[1]));
    assert_eq!((x_end, f_end), (1, 4));
    assert_eq!(awaiting_field(&store, "seq"), [x_end, f_end]);

    // f.bin's chunks were written, but the sync failed: the buffer holds seq 1 only,
    // and the exchange acknowledged all of it.
    store.lose_after(x_end);
    store.ack(x_end);
    let mut run = store.start(source(&cfg));
    let sent = dir.path().join("sent");
    run.wait_for("x.bin moved", || sent.join("x.bin").exists())
        .await;
    run.wait_for("f.bin sent again, or moved", || {
        sent.join("f.bin").exists() || (complete(&store, "f.bin").len() == 1 && store.count() > 2)
    })
    .await;
    assert!(
        dir.path().join("f.bin").exists() && !sent.join("f.bin").exists(),
        "f.bin left the outbox though its end was never acknowledged"
    );
    let ab = aborts(&store);
    assert_eq!(ab.len(), 1, "{ab:?}");
    assert_eq!(ab[0].file_id, ids[1], "the lost transfer is ended");
    let again = complete(&store, "f.bin");
    let new_id = received(&store)
        .into_iter()
        .find(|(_, r)| r.path == "f.bin" && r.end.is_some())
        .unwrap()
        .0;
    assert_ne!(new_id, ids[1], "sent again under a new id");
    assert_whole(&again[0], &pattern_bytes(2 * 4096 + 9, 4));

    // Acknowledged up to just before its last chunk: still not leaving.
    let last = end_seq(&store, &new_id);
    store.ack(last - 1);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        dir.path().join("f.bin").exists(),
        "moved before its last seq was acked"
    );
    store.ack(last);
    run.wait_for("f.bin moved", || sent.join("f.bin").exists())
        .await;
    assert!(!dir.path().join("f.bin").exists());
    run.stop().await.unwrap_err();
}

/// The check is made on the open descriptor, so an entry swapped for a link or a
/// special file after the scan is refused at open too, and a FIFO does not block it.
#[test]
fn open_regular_refuses_all_but_regular_files() {
    use super::fsops::{open_regular, Opened, Refusal};
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"secret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("plain"), b"plain").unwrap();
    std::os::unix::fs::symlink(&secret, d.join("link")).unwrap();
    std::os::unix::fs::symlink(d.join("plain"), d.join("inner-link")).unwrap();
    mkfifo(&d.join("fifo"));
    std::fs::create_dir(d.join("sub")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();
    let kind = |n: &str| match open_regular(&d.join(n)).unwrap() {
        Opened::Regular(f, st) => {
            assert_eq!(st.size, f.metadata().unwrap().len());
            None
        }
        Opened::Refused(r) => Some(r),
    };
    assert_eq!(kind("plain"), None);
    assert_eq!(kind("link"), Some(Refusal::Symlink));
    assert_eq!(
        kind("inner-link"),
        Some(Refusal::Symlink),
        "even to a file in the outbox"
    );
    assert_eq!(kind("fifo"), Some(Refusal::Fifo));
    assert_eq!(kind("sub"), Some(Refusal::Directory));
    assert_eq!(kind("sock"), Some(Refusal::Socket));
}

#[test]
fn scan_lists_refused_entries_but_not_the_sent_dir() {
    use super::fsops::{scan, Refusal, ScanRules};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.csv"), b"a").unwrap();
    std::os::unix::fs::symlink(d.join("a.csv"), d.join("b.csv")).unwrap();
    mkfifo(&d.join("c.csv"));
    std::fs::create_dir(d.join("sent")).unwrap();
    std::fs::create_dir(d.join("archive")).unwrap();
    std::os::unix::fs::symlink("/nonexistent", d.join("dangling")).unwrap();
    let rules = ScanRules {
        pattern: glob::Pattern::new("*").unwrap(),
        complete: Complete::Quiet,
        marker_suffix: ".done".into(),
        sent_dir: Some(d.join("sent")),
    };
    let s = scan(d, &rules).unwrap();
    let files: Vec<&str> = s.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(files, ["a.csv"]);
    let mut refused = s.refused.clone();
    refused.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        refused,
        [
            ("archive".to_string(), Refusal::Directory),
            ("b.csv".to_string(), Refusal::Symlink),
            ("c.csv".to_string(), Refusal::Fifo),
            ("dangling".to_string(), Refusal::Symlink),
        ]
    );
}

/// Like `file_leaves_only_after_its_own_last_seq_is_acked`, for the file in
/// progress: a position claiming chunks the buffer does not hold must not be
/// continued after them (the exchange would get a file with a hole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_chunks_beyond_the_head_sends_the_file_again_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Complete::Rename);
    let content = pattern_bytes(6 * 4096 + 5, 8);
    std::fs::write(dir.path().join("big.dat"), &content).unwrap();
    let store = Store::new();
    store.hold_at(3);
    let mut run = store.start(source(&cfg));
    run.wait_for("3 chunks durable", || store.count() == 3)
        .await;
    run.stop().await.unwrap_err();
    let old_id = chunks(&store)[0].file_id.clone();
    // Chunks 2 and 3 were written, then their sync failed.
    store.lose_after(1);
    store.release();
    let mut run = store.start(source(&cfg));
    run.wait_for("big.dat complete", || {
        complete(&store, "big.dat").len() == 1
    })
    .await;
    let ab = aborts(&store);
    assert_eq!(ab.len(), 1, "{ab:?}");
    assert_eq!(ab[0].file_id, old_id);
    assert!(ab[0].reason.contains("seq"), "{}", ab[0].reason);
    // `received` also checks that no transfer has a hole.
    assert_whole(&complete(&store, "big.dat")[0], &content);
    run.stop().await.unwrap_err();
}

fn entry_of(dir: &Path, name: &str) -> position::FileEntry {
    let st = fsops::stat_path(&dir.join(name)).unwrap().unwrap();
    position::FileEntry {
        file_id: "00000000000000aa".into(),
        name: name.into(),
        dev: st.dev,
        ino: st.ino,
        size: st.size,
        mtime_ns: st.mtime_ns,
    }
}

/// A same-filesystem move is durable in both directories before it counts as done.
#[test]
fn move_syncs_both_directories() {
    use super::fsops::{move_into, Step};
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("out");
    let sent = outbox.join("sent");
    std::fs::create_dir(&outbox).unwrap();
    std::fs::write(outbox.join("r.csv"), b"r,1").unwrap();
    let entry = entry_of(&outbox, "r.csv");
    let mut steps = Vec::new();
    let to = move_into(&outbox, &entry, &sent, &mut |s| steps.push(s)).unwrap();
    assert_eq!(to, sent.join("r.csv"));
    assert_eq!(
        steps,
        [
            // The sent dir was created: its entry in the outbox made durable.
            Step::SyncedDir(outbox.clone()),
            Step::Renamed(sent.join("r.csv")),
            Step::SyncedDir(sent.clone()),
            Step::SyncedDir(outbox.clone()),
        ]
    );
}

/// The move to another filesystem: the source goes only after the copy and the
/// sent dir are durable, and the outbox is synced after it went.
#[test]
fn copy_across_filesystems_removes_the_source_last() {
    use super::fsops::{copy_across, Step};
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("out");
    let sent = dir.path().join("sent");
    std::fs::create_dir(&outbox).unwrap();
    std::fs::create_dir(&sent).unwrap();
    let content = pattern_bytes(100_000, 5);
    let src = outbox.join("r.bin");
    std::fs::write(&src, &content).unwrap();
    let entry = entry_of(&outbox, "r.bin");
    let target = sent.join("r.bin");
    let mut steps = Vec::new();
    copy_across(&outbox, &entry, &target, &mut |s| {
        // At every step before the unlink the source is intact; from the copy on,
        // the target is whole.
        match &s {
            Step::Copied(_) | Step::SyncedDir(_)
                if !steps.contains(&Step::Unlinked(src.clone())) =>
            {
                assert_eq!(std::fs::read(&src).unwrap(), content);
            }
            _ => {}
        }
        assert_eq!(std::fs::read(&target).unwrap(), content);
        steps.push(s);
    })
    .unwrap();
    assert_eq!(
        steps,
        [
            Step::Copied(target.clone()),
            Step::SyncedDir(sent.clone()),
            Step::Unlinked(src.clone()),
            Step::SyncedDir(outbox.clone()),
        ]
    );
    assert!(!src.exists());

    // A file changed after its ack is neither copied nor removed.
    std::fs::write(&src, &content).unwrap();
    let stale = entry_of(&outbox, "r.bin");
    std::fs::write(&src, b"rewritten").unwrap();
    let mut steps = Vec::new();
    let err = copy_across(&outbox, &stale, &sent.join("r.bin.1"), &mut |s| {
        steps.push(s)
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("changed after it was acknowledged"),
        "{err}"
    );
    assert!(steps.is_empty());
    assert!(!sent.join("r.bin.1").exists());
    assert_eq!(std::fs::read(&src).unwrap(), b"rewritten");
}

/// The real EXDEV path, when this machine has a second filesystem at hand
/// (`/dev/shm`, a tmpfs on Linux); skipped otherwise.
#[test]
fn move_into_another_filesystem() {
    use super::fsops::{move_into, Step};
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("no /dev/shm: skipping the cross-filesystem move");
        return;
    };
    let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
    if dev(dir.path()) == dev(other.path()) {
        eprintln!("/dev/shm is on the same filesystem: skipping the cross-filesystem move");
        return;
    }
    let content = pattern_bytes(50_000, 6);
    std::fs::write(dir.path().join("x.bin"), &content).unwrap();
    let entry = entry_of(dir.path(), "x.bin");
    let mut steps = Vec::new();
    let to = move_into(dir.path(), &entry, other.path(), &mut |s| steps.push(s)).unwrap();
    assert_eq!(to, other.path().join("x.bin"));
    assert_eq!(std::fs::read(&to).unwrap(), content);
    assert!(!dir.path().join("x.bin").exists());
    assert_eq!(
        steps,
        [
            Step::Copied(to.clone()),
            Step::SyncedDir(other.path().to_path_buf()),
            Step::Unlinked(dir.path().join("x.bin")),
            Step::SyncedDir(dir.path().to_path_buf()),
        ]
    );
}

/// A position written before seqs were recorded: its files wait for everything that
/// was durable when the source started (their last chunks are at most that), and
/// are not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_without_seqs_from_an_older_version() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Complete::Rename);
    std::fs::write(dir.path().join("a.bin"), b"aaaa").unwrap();
    let e = entry_of(dir.path(), "a.bin");
    let old = serde_json::json!({
        "current": null,
        "awaiting": [{ "file_id": e.file_id, "name": e.name, "dev": e.dev, "ino": e.ino,
                       "size": e.size, "mtime_ns": e.mtime_ns }],
    });
    let store = Store::new();
    store.set_durable(serde_json::to_vec(&old).unwrap(), 5);
    store.ack(4);
    let mut run = store.start(source(&cfg));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        dir.path().join("a.bin").exists(),
        "moved before the head at start was acked"
    );
    store.ack(5);
    let sent = dir.path().join("sent");
    run.wait_for("a.bin moved", || sent.join("a.bin").exists())
        .await;
    assert_eq!(store.count(), 0, "nothing sent again");
    run.stop().await.unwrap_err();
}
