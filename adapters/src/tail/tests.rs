//! The tail source against real files in a temporary folder, with the test buffer of
//! `directory::testkit` standing in for the agent.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ferry_protocol::messages::record;

use super::*;
use crate::directory::testkit::{Running, Store};
use crate::{SourceConfig, SourceError};

fn config(path: &Path) -> TailConfig {
    TailConfig {
        poll_interval: Duration(std::time::Duration::from_millis(50)),
        ..TailConfig::new(path)
    }
}

fn source(cfg: &TailConfig) -> Box<dyn Source> {
    Box::new(TailSource::new(cfg.clone()))
}

/// Every line record, as (text, position).
fn lines_at(store: &Store) -> Vec<(String, String)> {
    store
        .records()
        .into_iter()
        .map(|r| match r.body {
            Some(record::Body::Line(l)) => (String::from_utf8(l).unwrap(), r.position),
            other => panic!("not a line: {other:?}"),
        })
        .collect()
}

fn lines(store: &Store) -> Vec<String> {
    lines_at(store).into_iter().map(|(l, _)| l).collect()
}

fn append(path: &Path, data: &[u8]) {
    writer_with(path, data);
}

/// A writer holding `path` open for appending (as a logging process does), after
/// writing `data`.
fn writer_with(path: &Path, data: &[u8]) -> std::fs::File {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    f
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("line {i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_lines_arrive_in_order_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut cfg = config(&path);
    cfg.max_batch_lines = 50;
    append(&path, b"");
    let ino = std::fs::metadata(&path).unwrap().ino();
    let store = Store::new();
    let mut run = store.start(source(&cfg));

    let expect = numbered(0..300);
    let mut offsets = Vec::new();
    let mut off = 0usize;
    for chunk in expect.chunks(100) {
        let mut data = Vec::new();
        for (i, l) in chunk.iter().enumerate() {
            offsets.push(off + data.len());
            // Windows line ends lose their `\r` too.
            let end: &[u8] = if i % 7 == 0 { b"\r\n" } else { b"\n" };
            data.extend_from_slice(l.as_bytes());
            data.extend_from_slice(end);
        }
        off += data.len();
        append(&path, &data);
        let n = offsets.len();
        run.wait_for("a block of lines", || store.count() >= n)
            .await;
    }
    let got = lines_at(&store);
    assert_eq!(
        got.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>(),
        expect
    );
    let positions: Vec<String> = offsets
        .iter()
        .map(|o| format!("ino={ino} off={o}"))
        .collect();
    assert_eq!(
        got.into_iter().map(|(_, p)| p).collect::<Vec<_>>(),
        positions
    );
    assert_eq!(
        describe_position(&store.position().unwrap()),
        format!("ino={ino} off={off}")
    );
    assert!(matches!(run.stop().await, Err(SourceError::Shutdown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_line_waits_for_its_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, b"first\nabc");
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    run.wait_for("the first line", || store.count() == 1).await;
    append(&path, b"def\n");
    run.wait_for("the completed line", || store.count() == 2)
        .await;
    assert_eq!(lines(&store), ["first", "abcdef"]);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.log");
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    // Not needed for correctness; makes it likely the source saw the file missing.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    append(&path, b"hello\n");
    run.wait_for("the line", || store.count() == 1).await;
    assert_eq!(lines(&store), ["hello"]);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_at_end_skips_existing_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, b"old 1\nold 2\n");
    let mut cfg = config(&path);
    cfg.start_at = StartAt::End;
    let store = Store::new();
    let mut run = store.start(source(&cfg));
    run.wait_for("the end position", || store.position().is_some())
        .await;
    append(&path, b"new\n");
    run.wait_for("the new line", || store.count() == 1).await;
    assert_eq!(lines(&store), ["new"]);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_rotation_drains_the_old_file_then_follows_the_new() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut old = writer_with(&path, b"1\n2\n");
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    run.wait_for("lines 1-2", || store.count() == 2).await;

    std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    // The writer has not reopened yet: its last lines, and a line it never ended,
    // still go to the old file.
    old.write_all(b"3\n4\nunterminated").unwrap();
    drop(old);
    append(&path, b"5\n6\n");
    run.wait_for("all lines", || store.count() == 7).await;
    assert_eq!(
        lines(&store),
        ["1", "2", "3", "4", "unterminated", "5", "6"]
    );
    let new_ino = std::fs::metadata(&path).unwrap().ino();
    run.wait_for("position on the new file", || {
        describe_position(&store.position().unwrap()) == format!("ino={new_ino} off=4")
    })
    .await;
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copytruncate_rotation_restarts_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, b"a1\na2\na3\n");
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    run.wait_for("a1-a3", || store.count() == 3).await;

    // Shorter than the offset after truncation.
    std::fs::copy(&path, dir.path().join("app.log.1")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&path, b"b1\n");
    run.wait_for("b1", || store.count() == 4).await;

    // Longer than the offset, but the first bytes differ: the fingerprint tells.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&path, b"c1 is a longer line\nc2\n");
    run.wait_for("c1-c2", || store.count() == 6).await;
    assert_eq!(
        lines(&store),
        ["a1", "a2", "a3", "b1", "c1 is a longer line", "c2"]
    );
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gbk_file_arrives_as_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gbk.log");
    let (bytes, _, had_errors) = encoding_rs::GBK.encode("沈阳市民政局\r\n大连 哈尔滨\n");
    assert!(!had_errors);
    assert_eq!(
        bytes.get(..6),
        Some(&[0xc9, 0xf2, 0xd1, 0xf4, 0xca, 0xd0][..])
    );
    append(&path, &bytes);
    let mut cfg = config(&path);
    cfg.encoding = Encoding::Gbk;
    let store = Store::new();
    let mut run = store.start(source(&cfg));
    run.wait_for("two lines", || store.count() == 2).await;
    assert_eq!(lines(&store), ["沈阳市民政局", "大连 哈尔滨"]);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_line_is_split_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let long = "x".repeat(25);
    append(&path, format!("{long}\nshort\n").as_bytes());
    let mut cfg = config(&path);
    cfg.max_line = Size(10);
    let store = Store::new();
    let mut run = store.start(source(&cfg));
    run.wait_for("four records", || store.count() == 4).await;
    let got = lines_at(&store);
    let texts: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(texts, ["xxxxxxxxxx", "xxxxxxxxxx", "xxxxx", "short"]);
    let offs: Vec<&str> = got
        .iter()
        .map(|(_, p)| p.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(offs, ["off=0", "off=10", "off=20", "off=26"]);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_file_sends_no_line_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let expect = numbered(0..12);
    append(&path, (expect[..10].join("\n") + "\n").as_bytes());
    let mut cfg = config(&path);
    cfg.max_batch_lines = 2;
    let store = Store::new();
    store.hold_at(4);
    let run = store.start(source(&cfg));
    let mut run = run;
    run.wait_for("two batches durable", || store.count() == 4)
        .await;
    // The third batch is in flight when the process dies.
    assert!(matches!(run.stop().await, Err(SourceError::Shutdown)));

    store.release();
    append(&path, (expect[10..].join("\n") + "\n").as_bytes());
    let mut run = store.start(source(&cfg));
    run.wait_for("all lines", || store.count() >= 12).await;
    assert_eq!(lines(&store), expect);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_rotation_drains_the_rotated_copy_first() {
    let (dir, path, store) = read_then_stop(b"1\n2\n3\n").await;

    // While stopped: more lines, a rotation, a new file; a decoy sibling too, older
    // than the rotated copy (as a real `.2` is): copies are read in order of
    // modification time, and only those newer than the stored file.
    append(&path, b"4\n5\n");
    std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    append(&dir.path().join("app.log.2"), b"decoy\n");
    set_mtime(&dir.path().join("app.log.2"), hours_ago(24));
    append(&path, b"6\n7\n");

    let mut run = store.start(source(&config(&path)));
    run.wait_for("all lines", || store.count() == 7).await;
    assert_eq!(lines(&store), ["1", "2", "3", "4", "5", "6", "7"]);
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_when_the_rotated_copy_is_gone_reads_the_new_file_whole() {
    let (_dir, path, store) = read_then_stop(b"1\n2\n").await;

    std::fs::remove_file(&path).unwrap();
    append(&path, b"x\ny\nz\n");
    let mut run = store.start(source(&config(&path)));
    // Where the new file reuses the freed inode (ext4 does) only the fingerprint
    // tells it from the old one: it is read from its start, as after copytruncate.
    // Elsewhere (tmpfs) the stored file is plainly gone: an alarm, and the agent
    // starts the source again, past it.
    let past = format!("ino={} off=0", ino(&path));
    let seen = until(|| {
        store.count() == 5
            || store
                .position()
                .is_some_and(|p| describe_position(&p) == past)
    })
    .await;
    assert!(seen, "neither the new file nor the alarm");
    if store.count() < 5 {
        match run.stop().await {
            Err(SourceError::Other(msg)) => assert!(msg.contains("ALARM"), "{msg}"),
            other => panic!("expected an alarm, got {other:?}"),
        }
        run = store.start(source(&config(&path)));
    }
    run.wait_for("the new file", || store.count() == 5).await;
    assert_eq!(lines(&store), ["1", "2", "x", "y", "z"]);
    run.stop().await.unwrap_err();
}

/// logrotate's numbered scheme: `NAME.N[.gz]` becomes `NAME.N+1[.gz]` (oldest
/// first), then `NAME` becomes `NAME.1`; the caller then writes the new `NAME`.
fn rotate(path: &Path) {
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    let numbered = |n: usize, ext: &str| dir.join(format!("{name}.{n}{ext}"));
    let mut n = 1;
    while numbered(n, "").exists() || numbered(n, ".gz").exists() {
        n += 1;
    }
    for i in (1..n).rev() {
        for ext in ["", ".gz"] {
            if numbered(i, ext).exists() {
                std::fs::rename(numbered(i, ext), numbered(i + 1, ext)).unwrap();
            }
        }
    }
    std::fs::rename(path, numbered(1, "")).unwrap();
}

fn ino(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

fn mtime(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn set_mtime(path: &Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .append(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn hours_ago(h: u64) -> std::time::SystemTime {
    std::time::SystemTime::now() - std::time::Duration::from_secs(3600 * h)
}

/// A rotated copy compressed the way logrotate's `compress` leaves it: a new file
/// (gzip magic, the data does not matter: it is never read) with the original's
/// modification time, the original removed.
fn compress(plain: &Path) -> std::path::PathBuf {
    let gz = plain.with_file_name(format!(
        "{}.gz",
        plain.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&gz, [0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 3]).unwrap();
    set_mtime(&gz, mtime(plain));
    std::fs::remove_file(plain).unwrap();
    gz
}

/// Polls `cond` for up to 20 s. Unlike `Running::wait_for` it does not look at
/// the source, which may end right after making `cond` true (an alarm): between
/// `wait_for`'s look at `cond` and its look at the source, both can happen.
async fn until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}

/// Waits until the source moved its durable position to the start of file `ino`
/// and ended with an error (the alarm, which the agent shows in `status` and
/// metrics before starting the source again); returns the error's text.
async fn alarm(run: Running, store: &Store, ino: u64) -> String {
    let past = format!("ino={ino} off=0");
    let moved = until(|| {
        store
            .position()
            .is_some_and(|p| describe_position(&p) == past)
    })
    .await;
    let ended = run.stop().await;
    assert!(
        moved,
        "the position never moved to {past}; the source: {ended:?}"
    );
    match ended {
        Err(SourceError::Other(msg)) => msg,
        other => panic!("expected the source to end with an alarm, got {other:?}"),
    }
}

/// `app.log` in a new folder holding `text`: the source reads every line of it
/// (its position durable after the last), then stops, as an agent that is shut
/// down.
async fn read_then_stop(text: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, text);
    let want = text.iter().filter(|&&b| b == b'\n').count();
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    run.wait_for("the lines written", || store.count() == want)
        .await;
    run.stop().await.unwrap_err();
    (dir, path, store)
}

/// Waits until the position is at the end of `path` (so nothing more will come) and
/// returns every line shipped.
async fn settled_lines(run: &mut Running, store: &Store, path: &Path) -> Vec<String> {
    let end = format!(
        "ino={} off={}",
        ino(path),
        std::fs::metadata(path).unwrap().len()
    );
    run.wait_for("the position at the end of the current file", || {
        store
            .position()
            .is_some_and(|p| describe_position(&p) == end)
    })
    .await;
    lines(store)
}

/// The bug this guards against: after two rotations while stopped, only the file of
/// the stored position (now `app.log.2`) was drained and then `app.log`: every line
/// of `app.log.1` was lost without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_two_rotations_reads_every_file_of_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    // Shipped long ago: older than the stored position, never read again.
    append(&dir.path().join("app.log.1"), b"old 1\nold 2\n");
    set_mtime(&dir.path().join("app.log.1"), hours_ago(24));
    append(&path, b"1\n2\n3\n");
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    run.wait_for("lines 1-3", || store.count() == 3).await;
    run.stop().await.unwrap_err();

    // While stopped: the rest of the old file, two rotations, a line in each file.
    append(&path, b"4\n5\n");
    rotate(&path);
    append(&path, b"6\n7\n");
    rotate(&path);
    append(&path, b"8\n9\n");
    assert!(dir.path().join("app.log.3").exists());

    let mut run = store.start(source(&config(&path)));
    let got = settled_lines(&mut run, &store, &path).await;
    assert_eq!(got, ["1", "2", "3", "4", "5", "6", "7", "8", "9"]);
    run.stop().await.unwrap_err();
}

/// Two rotations while the source is held back by a full buffer: when it goes on,
/// it must walk the chain too, not jump from the old file to the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rotations_while_commits_are_held_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut cfg = config(&path);
    cfg.max_batch_lines = 2;
    let a = numbered(0..12);
    append(&path, (a[..10].join("\n") + "\n").as_bytes());
    let store = Store::new();
    store.hold_at(4);
    let mut run = store.start(source(&cfg));
    run.wait_for("the first two batches", || store.count() == 4)
        .await;

    // The source is stuck in `commit` in the middle of the first file.
    append(&path, (a[10..].join("\n") + "\n").as_bytes());
    rotate(&path);
    let b = numbered(100..104);
    append(&path, (b.join("\n") + "\n").as_bytes());
    rotate(&path);
    let c = numbered(200..203);
    append(&path, (c.join("\n") + "\n").as_bytes());
    // Long enough for a source that is not stuck to have looked around.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(store.count(), 4);

    store.release();
    let got = settled_lines(&mut run, &store, &path).await;
    assert_eq!(got, [a, b, c].concat());
    run.stop().await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_dateext_rotations_reads_the_dated_copies_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&dir.path().join("app.log-20261205"), b"shipped before\n");
    set_mtime(&dir.path().join("app.log-20261205"), hours_ago(48));
    append(&path, b"1\n2\n");
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    run.wait_for("lines 1-2", || store.count() == 2).await;
    run.stop().await.unwrap_err();

    append(&path, b"3\n");
    std::fs::rename(&path, dir.path().join("app.log-20261206")).unwrap();
    append(&path, b"4\n5\n");
    std::fs::rename(&path, dir.path().join("app.log-20261207")).unwrap();
    append(&path, b"6\n");

    let mut run = store.start(source(&config(&path)));
    let got = settled_lines(&mut run, &store, &path).await;
    assert_eq!(got, ["1", "2", "3", "4", "5", "6"]);
    run.stop().await.unwrap_err();
}

/// The file of the stored position was deleted while the source was stopped: the
/// lines written to it after the position are gone, which must be loud; the files
/// after it are still shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_file_in_the_chain_raises_an_alarm_naming_it_and_the_rest_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, b"1\n2\n");
    let s_ino = ino(&path);
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    run.wait_for("lines 1-2", || store.count() == 2).await;
    run.stop().await.unwrap_err();

    append(&path, b"lost\n");
    rotate(&path);
    append(&path, b"4\n5\n");
    rotate(&path);
    append(&path, b"6\n");
    // Every file is created before the deletion: the freed inode cannot be reused.
    std::fs::remove_file(dir.path().join("app.log.2")).unwrap();

    let run = store.start(source(&config(&path)));
    let msg = alarm(run, &store, ino(&dir.path().join("app.log.1"))).await;
    assert!(msg.contains("ALARM"), "{msg}");
    assert!(msg.contains(&format!("inode {s_ino}")), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");

    // The agent restarts the source, which goes on from where the alarm left it.
    let mut run = store.start(source(&config(&path)));
    let got = settled_lines(&mut run, &store, &path).await;
    assert_eq!(got, ["1", "2", "4", "5", "6"]);
    run.stop().await.unwrap_err();
}

/// A compressed file between the stored position and the current file holds lines
/// the source cannot read: an alarm names it, the files around it are shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_file_in_the_chain_raises_an_alarm_naming_it_and_the_rest_arrives() {
    let (dir, path, store) = read_then_stop(b"1\n2\n").await;

    append(&path, b"3\n");
    rotate(&path);
    append(&path, b"unreadable\n");
    rotate(&path);
    append(&path, b"5\n");
    let gz = compress(&dir.path().join("app.log.1"));

    let run = store.start(source(&config(&path)));
    let msg = alarm(run, &store, ino(&path)).await;
    assert!(msg.contains("ALARM"), "{msg}");
    assert!(msg.contains(&gz.display().to_string()), "{msg}");

    let mut run = store.start(source(&config(&path)));
    let got = settled_lines(&mut run, &store, &path).await;
    assert_eq!(got, ["1", "2", "3", "5"]);
    run.stop().await.unwrap_err();
}

/// logrotate's `compress` without `delaycompress`: the rotated copy is compressed
/// (and the plain one removed) right after the rotation. The source still holds
/// the old file open and drains it; the compressed copy of a file it read whole is
/// no loss and raises no alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressing_a_file_already_read_raises_no_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let mut old = writer_with(&path, b"1\n2\n");
    let store = Store::new();
    let mut run = store.start(source(&config(&path)));
    run.wait_for("lines 1-2", || store.count() == 2).await;

    rotate(&path);
    old.write_all(b"3\n").unwrap();
    drop(old);
    // Compressed at once: whether the source sees the plain copy or not, it drains
    // the file it holds open.
    compress(&dir.path().join("app.log.1"));
    append(&path, b"4\n");
    run.wait_for("lines 1-4", || store.count() == 4).await;
    // A second rotation, noticed after its compression for sure.
    rotate(&path);
    append(&path, b"5\n");
    compress(&dir.path().join("app.log.1"));
    let got = settled_lines(&mut run, &store, &path).await;
    assert_eq!(got, ["1", "2", "3", "4", "5"]);
    // Long enough for the source to look at the directory again.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    append(&path, b"6\n");
    run.wait_for("line 6", || store.count() == 6).await;
    assert!(matches!(run.stop().await, Err(SourceError::Shutdown)));
}

/// `rotated` for another naming scheme, with the copies in another folder
/// (logrotate's `olddir`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_rotated_glob_finds_copies_in_an_olddir() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let old = dir.path().join("old");
    std::fs::create_dir(&old).unwrap();
    let mut cfg = config(&path);
    cfg.rotated = Some("old/app-*.log".into());
    append(&path, b"1\n");
    let store = Store::new();
    let mut run = store.start(source(&cfg));
    run.wait_for("line 1", || store.count() == 1).await;
    run.stop().await.unwrap_err();

    append(&path, b"2\n");
    std::fs::rename(&path, old.join("app-20261206.log")).unwrap();
    append(&path, b"3\n");
    std::fs::rename(&path, old.join("app-20261207.log")).unwrap();
    append(&path, b"4\n");

    let mut run = store.start(source(&cfg));
    let got = settled_lines(&mut run, &store, &path).await;
    assert_eq!(got, ["1", "2", "3", "4"]);
    run.stop().await.unwrap_err();
}

#[test]
fn config_defaults_and_validation() {
    let json = serde_json::json!({ "kind": "tail", "path": "/var/log/app.log" });
    let SourceConfig::Tail(c) = serde_json::from_value::<SourceConfig>(json).unwrap() else {
        panic!("not a tail config");
    };
    assert_eq!(c, TailConfig::new("/var/log/app.log"));
    assert_eq!(
        (c.encoding, c.start_at, c.max_batch_lines),
        (Encoding::Utf8, StartAt::Beginning, 4000)
    );
    assert_eq!(c.poll_interval.0, std::time::Duration::from_millis(250));
    assert_eq!(
        (c.max_line, c.max_batch_bytes),
        (Size(1 << 20), Size(1 << 20))
    );
    assert_eq!(c.rotated, None);
    assert_eq!(c.validate(), Ok(()));

    let full = serde_json::json!({
        "kind": "tail", "path": "/x.log", "encoding": "gb18030", "start_at": "end",
        "poll_interval": "1s", "max_line": "64KiB", "max_batch_lines": 10, "max_batch_bytes": 4096,
        "rotated": "old/x.log-*"
    });
    let SourceConfig::Tail(c) = serde_json::from_value::<SourceConfig>(full).unwrap() else {
        panic!("not a tail config");
    };
    assert_eq!(
        (c.encoding, c.start_at, c.max_line),
        (Encoding::Gb18030, StartAt::End, Size(65536))
    );
    assert_eq!(c.rotated.as_deref(), Some("old/x.log-*"));
    assert_eq!(c.validate(), Ok(()));
    let bad_enc = serde_json::json!({ "kind": "tail", "path": "/x", "encoding": "latin1" });
    assert!(serde_json::from_value::<SourceConfig>(bad_enc).is_err());
    let unknown = serde_json::json!({ "kind": "tail", "path": "/x", "follow": true });
    assert!(serde_json::from_value::<SourceConfig>(unknown).is_err());

    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        TailConfig::new(dir.path()).validate(),
        Err(format!(
            "source.path: {} is a directory; tail follows one file",
            dir.path().display()
        ))
    );
    let bad = |f: &dyn Fn(&mut TailConfig)| {
        let mut c = TailConfig::new("/x.log");
        f(&mut c);
        c.validate().unwrap_err()
    };
    assert!(bad(&|c| c.max_line = Size(3)).starts_with("source.max_line:"));
    assert!(bad(&|c| c.max_line = Size(3 << 20)).starts_with("source.max_line:"));
    assert!(bad(&|c| c.max_batch_lines = 0).starts_with("source.max_batch_lines:"));
    assert!(bad(&|c| c.max_batch_bytes = Size(0)).starts_with("source.max_batch_bytes:"));
    assert!(bad(&|c| c.rotated = Some("x.log.[".into())).starts_with("source.rotated:"));
    assert!(bad(&|c| c.rotated = Some("*/x.log.1".into())).starts_with("source.rotated:"));
    assert!(
        bad(&|c| c.poll_interval = Duration(std::time::Duration::ZERO))
            .starts_with("source.poll_interval:")
    );
}
