use ferry_protocol::batch::encode_records;
use ferry_protocol::messages::{record::Body, Record, RecordList};

use super::*;

fn records(n: usize, tag: &str) -> EncodedRecords {
    encode_records(&RecordList {
        records: (0..n)
            .map(|i| Record {
                time_unix_ms: 1,
                position: String::new(),
                body: Some(Body::Line(format!("{tag}-{i}").into_bytes())),
            })
            .collect(),
    })
    .unwrap()
}

/// Opens the buffer again after a drop (`open_sled` waits for the lock a
/// dropped handle's threads may still hold).
fn reopen(path: &std::path::Path) -> Result<Buffer, BufferError> {
    Buffer::open(path, 1 << 20)
}

#[test]
fn commits_are_dense_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buf");
    {
        let b = Buffer::open(&path, 1 << 20).unwrap();
        let out = b
            .commit_group(&[
                CommitItem {
                    stream: "a",
                    records: Some(&records(3, "x")),
                    position: b"p1",
                },
                CommitItem {
                    stream: "b",
                    records: Some(&records(2, "y")),
                    position: b"q1",
                },
                CommitItem {
                    stream: "a",
                    records: Some(&records(4, "z")),
                    position: b"p2",
                },
                CommitItem {
                    stream: "a",
                    records: None,
                    position: b"p3",
                },
            ])
            .unwrap();
        assert_eq!(
            out[0],
            Some(Committed {
                first_seq: 1,
                last_seq: 3
            })
        );
        assert_eq!(
            out[1],
            Some(Committed {
                first_seq: 1,
                last_seq: 2
            })
        );
        assert_eq!(
            out[2],
            Some(Committed {
                first_seq: 4,
                last_seq: 7
            })
        );
        assert_eq!(out[3], None);
    }
    let b = reopen(&path).unwrap();
    assert_eq!(
        b.state("a"),
        StreamState {
            head: 7,
            acked: 0,
            batches: 2,
            bytes: b.state("a").bytes
        }
    );
    assert_eq!(b.position("a").unwrap().as_deref(), Some(&b"p3"[..]));
    assert_eq!(b.batch_at("a", 5).unwrap().unwrap().first_seq, 4);
    assert_eq!(b.batch_at("a", 8).unwrap(), None);

    // Acks remove whole batches only, and the watermark survives reopen.
    b.ack("a", 3).unwrap();
    assert_eq!(b.state("a").acked, 3);
    assert_eq!(b.state("a").batches, 1);
    assert_eq!(b.batch_at("a", 2).unwrap(), None);
    drop(b);
    let b = reopen(&path).unwrap();
    assert_eq!(b.state("a").acked, 3);
    assert_eq!(b.state("a").head, 7);
    b.ack("a", 7).unwrap();
    assert_eq!(b.state("a").batches, 0);
    assert_eq!(b.state("b").batches, 1);
}

/// A batch whose stored entry is `size` bytes of noise: too big to stay inline.
fn large(count: u32, size: usize, fill: u8) -> EncodedRecords {
    EncodedRecords {
        record_count: count,
        compression: ferry_protocol::messages::Compression::Zstd,
        raw_len: size as u32,
        payload: (0..size).map(|i| (i as u8) ^ fill).collect(),
    }
}

#[test]
fn large_batches_live_in_segments_and_leave_with_their_acks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buf");
    let chunk = 1 << 20;
    let want = |seq: u64| large(1, chunk, seq as u8);
    {
        let b = Buffer::open(&path, 1 << 20).unwrap();
        // 80 MiB: more than one segment.
        for seq in 1..=80u64 {
            let rec = want(seq);
            b.commit_group(&[CommitItem {
                stream: "files",
                records: Some(&rec),
                position: format!("p{seq}").as_bytes(),
            }])
            .unwrap();
        }
        assert!(b.segment_bytes() >= 80 * chunk as u64);
        // sled itself holds locators only.
        let batch = b.batch_at("files", 42).unwrap().unwrap();
        assert_eq!(batch.payload, want(42).payload);
    }
    // Reopening checks every entry and finds them all.
    let b = reopen(&path).unwrap();
    assert_eq!(b.state("files").head, 80);
    assert_eq!(b.state("files").batches, 80);
    assert_eq!(b.position("files").unwrap().unwrap(), b"p80");
    assert_eq!(
        b.batch_at("files", 80).unwrap().unwrap().payload,
        want(80).payload
    );
    // Acks release the first segment; it goes with the next sync.
    b.ack("files", 70).unwrap();
    let before = b.segment_bytes();
    let rec = want(81);
    b.commit_group(&[CommitItem {
        stream: "files",
        records: Some(&rec),
        position: b"p81",
    }])
    .unwrap();
    assert!(
        b.segment_bytes() < before,
        "the emptied segment was not deleted ({} bytes before, {} after)",
        before,
        b.segment_bytes()
    );
    assert_eq!(
        b.batch_at("files", 75).unwrap().unwrap().payload,
        want(75).payload
    );
    drop(b);
    let b = reopen(&path).unwrap();
    assert_eq!(b.state("files").acked, 70);
    assert_eq!(b.state("files").batches, 11);
}

#[test]
fn a_damaged_segment_is_refused_at_open_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buf");
    {
        let b = Buffer::open(&path, 1 << 20).unwrap();
        let rec = large(3, 100_000, 1);
        b.commit_group(&[CommitItem {
            stream: "s",
            records: Some(&rec),
            position: b"p",
        }])
        .unwrap();
    }
    let seg = std::fs::read_dir(path.join("segments"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[5000] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let err = reopen(&path).err().unwrap().to_string();
    assert!(err.contains("damaged") && err.contains("checksum"), "{err}");
    // A truncated segment: the entry cannot be read at all.
    std::fs::write(&seg, &bytes[..1000]).unwrap();
    let err = reopen(&path).err().unwrap().to_string();
    assert!(
        err.contains("segments/") && err.contains("cannot be read"),
        "{err}"
    );
}

/// A position becomes visible with the seqs committed with it, once both are
/// durable: read in that order, a position is never ahead of the head (it
/// used to be readable from sled before the sync, ahead of the head, so
/// `status` showed a position whose changes were not counted yet).
#[test]
fn a_position_is_never_visible_ahead_of_its_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let buf = std::sync::Arc::new(Buffer::open(&dir.path().join("buf"), 1 << 20).unwrap());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (buf, done) = (buf.clone(), done.clone());
        std::thread::spawn(move || {
            let mut checked = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // The position names the head it was committed with.
                let pos = buf.position("a").unwrap();
                let head = buf.state("a").head;
                if let Some(p) = pos {
                    let at: u64 = String::from_utf8(p).unwrap().parse().unwrap();
                    assert!(at <= head, "position of seq {at} visible with head {head}");
                    checked += 1;
                }
            }
            checked
        })
    };
    let one = records(1, "x");
    for i in 1..=200u64 {
        let position = i.to_string();
        buf.commit_group(&[CommitItem {
            stream: "a",
            records: Some(&one),
            position: position.as_bytes(),
        }])
        .unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

/// A second opener while the buffer is open (an offline command while the
/// agent starts) is refused and leaves the owner's files alone: it used to
/// remove every `.generating` snapshot before finding sled's lock held,
/// among them one the owner was writing, which then failed.
#[test]
fn a_second_opener_leaves_the_owners_snapshot_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buf");
    let owner = Buffer::open(&path, 1 << 20).unwrap();
    let writing = path.join("snap.00000000FFFFFFFF.generating");
    std::fs::write(&writing, b"being written").unwrap();
    let second = Buffer::open(&path, 1 << 20);
    assert!(second.is_err(), "two owners of one buffer");
    assert!(
        writing.exists(),
        "the second opener removed the owner's snapshot"
    );
    drop(owner);
    // The owner gone, the next opener clears what it left torn.
    drop(reopen(&path).unwrap());
    assert!(!writing.exists());
}
