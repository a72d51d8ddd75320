//! The spine of Ferry: files and log lines go from an agent to the exchange intact,
//! exactly once, in order, through the kinds of rotation real loggers do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use ferry_tests::*;

const AGENT: &str = "hp-mz-01";
const DEPT: &str = "210102-MZ";

/// Files of 0 B, 1 B, 10 MiB of random bytes and a sparse 4 GiB + 1 B file, renamed
/// into an outbox, arrive at the exchange complete with the SHA-256 computed here;
/// the agent then moves them to `outbox/sent/`, and `export` gives back the same bytes.
#[test]
fn files_of_every_size_arrive_intact() {
    let t = TestDir::new("spine-files");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let outbox = t.mkdir("outbox");
    agent.add_stream(&outbox_stream("outbox", "210100-MZ-0001", &outbox));

    // The small ones, written the way `complete = "rename"` expects.
    let small: Vec<(&str, Vec<u8>)> = vec![
        ("empty.bin", Vec::new()),
        ("one.bin", vec![0x5a]),
        ("ten-mib.bin", random_bytes(10 << 20)),
    ];
    let mut want: Vec<(String, u64, String)> = Vec::new();
    for (name, bytes) in &small {
        write_atomic(&outbox, name, bytes);
        want.push((name.to_string(), bytes.len() as u64, sha256_hex(bytes)));
    }

    // The big one: 4 GiB + 1 byte, mostly holes, a few non-zero bytes at the start,
    // in the middle and at the very end.
    let big_name = "sparse-4g.bin";
    let big_len: u64 = (4 << 30) + 1;
    let tmp = tmp_name(&outbox, big_name);
    {
        let f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&tmp)
            .unwrap();
        f.set_len(big_len).unwrap();
        f.write_all_at(b"FERRY-START", 0).unwrap();
        f.write_all_at(b"\x01middle\xff", 2 << 30).unwrap();
        f.write_all_at(b"\x7f", big_len - 1).unwrap();
        f.sync_all().unwrap();
    }
    note("hashing the sparse file");
    let big_sha = sha256_file(&tmp);
    note("hashed");
    std::fs::rename(&tmp, outbox.join(big_name)).unwrap();
    want.push((big_name.to_string(), big_len, big_sha.clone()));

    agent.start();
    note("agent started");

    let files = ex
        .wait_records(AGENT, "outbox", LONG * 2, "4 complete files", |recs| {
            recs.iter()
                .filter(|r| r["file"]["status"] == "complete")
                .count()
                >= want.len()
        })
        .into_iter()
        .filter_map(|r| r.get("file").cloned())
        .collect::<Vec<_>>();
    let complete: Vec<_> = files.iter().filter(|f| f["status"] == "complete").collect();
    assert_eq!(
        complete.len(),
        want.len(),
        "exactly one complete record per file: {files:?}"
    );
    for (name, size, sha) in &want {
        let rec = complete
            .iter()
            .find(|f| f["path"] == name.as_str())
            .unwrap_or_else(|| panic!("no complete record for {name}: {files:?}"));
        assert_eq!(rec["size"].as_u64(), Some(*size), "size of {name}");
        assert_eq!(
            rec["sha256"].as_str(),
            Some(sha.as_str()),
            "sha256 of {name}"
        );
    }

    note("all files complete at the exchange");
    // Acknowledged files leave the outbox for outbox/sent/, untouched.
    let sent = outbox.join("sent");
    let mut names: Vec<String> = want.iter().map(|w| w.0.clone()).collect();
    names.sort();
    wait_until(LONG, "every file to be moved to outbox/sent/", || {
        agent.assert_alive();
        file_names(&sent) == names && file_names(&outbox).is_empty()
    });
    for (name, bytes) in &small {
        assert_eq!(
            &std::fs::read(sent.join(name)).unwrap(),
            bytes,
            "sent/{name} unchanged"
        );
    }
    assert_eq!(
        std::fs::metadata(sent.join(big_name)).unwrap().len(),
        big_len
    );

    note("all files in sent/");
    // What the exchange exports is byte for byte what was written.
    let export = t.path().join("export");
    let reply = ex.export(AGENT, "outbox", &export);
    note("exported");
    assert_eq!(reply.len(), want.len(), "export reply: {reply:?}");
    for (name, bytes) in &small {
        assert_eq!(
            &std::fs::read(export.join(name)).unwrap(),
            bytes,
            "exported {name}"
        );
    }
    let exported_big = export.join(big_name);
    assert_eq!(std::fs::metadata(&exported_big).unwrap().len(), big_len);
    assert_eq!(sha256_file(&exported_big), big_sha, "exported {big_name}");
    note("export checked");

    agent.stop();
    ex.stop();
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|i| format!("{prefix}-{i:05} some text for line {i}"))
        .collect()
}

/// Lines written across a rename rotation (`app.log` → `app.log.1`, a new `app.log`)
/// and a copytruncate rotation (copied away, then truncated in place) arrive exactly
/// once each, in the order they were written; a last line without `\n` in the file
/// rotated away is shipped as it is.
#[test]
fn lines_survive_rename_and_copytruncate_rotation() {
    let t = TestDir::new("spine-lines");
    let mut ex = Exchange::start_new(&t.mkdir("exchange"));
    let mut agent = ex.enroll(AGENT, DEPT, &t.path().join("agent"));
    let logs = t.mkdir("logs");
    let log = logs.join("app.log");
    agent.add_stream(&tail_stream("hall-log", "210100-MZ-0002", &log));

    let mut want = numbered("a", 0..500);
    append_lines(&log, &want);
    agent.start();
    assert_same_sequence(
        &ex.wait_lines(AGENT, "hall-log", want.len(), LONG),
        &want,
        "before rotation",
    );

    // Rename rotation: more lines, one left without its newline, then the file is
    // renamed away and a new app.log is written.
    let more = numbered("a", 500..700);
    append_lines(&log, &more);
    want.extend(more);
    append_raw(&log, b"a-partial last line without newline");
    want.push("a-partial last line without newline".into());
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    let fresh = numbered("b", 0..300);
    append_lines(&log, &fresh);
    want.extend(fresh);
    assert_same_sequence(
        &ex.wait_lines(AGENT, "hall-log", want.len(), LONG),
        &want,
        "after rename rotation",
    );

    // Copytruncate: lines written before the copy must have been read before the
    // truncation (that race is inherent to copytruncate), so wait for them first.
    let before = numbered("b", 300..400);
    append_lines(&log, &before);
    want.extend(before);
    assert_same_sequence(
        &ex.wait_lines(AGENT, "hall-log", want.len(), LONG),
        &want,
        "before copytruncate",
    );
    std::fs::copy(&log, logs.join("app.log.2")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    let after = numbered("c", 0..250);
    append_lines(&log, &after);
    want.extend(after);
    let got = ex.wait_lines(AGENT, "hall-log", want.len(), LONG);
    assert_same_sequence(&got, &want, "after copytruncate");

    // Nothing more trickles in (no line sent twice after the fact): a marker line
    // written last arrives right after the expected ones.
    append_lines(&log, &["the end"]);
    want.push("the end".into());
    let got = ex.wait_lines(AGENT, "hall-log", want.len(), LONG);
    assert_same_sequence(&got, &want, "final");

    let seqs: Vec<u64> = ex
        .records(AGENT, "hall-log")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs increase");
    check_positions(&ex);

    agent.stop();
    ex.stop();
}

/// Every line record has a position `ino=… off=…`.
fn check_positions(ex: &Exchange) {
    for r in ex.records(AGENT, "hall-log") {
        let pos = r["position"].as_str().unwrap_or_default();
        assert!(
            pos.starts_with("ino=") && tail_offset(pos).is_some(),
            "line record without a tail position: {r}"
        );
    }
}
