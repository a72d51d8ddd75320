#![allow(clippy::unwrap_used)]

use ferry_protocol::batch::encode_records;
use ferry_protocol::messages::{record::Body, Record, RecordList};

use super::*;

/// Entries over `INLINE_MAX` go to segment files, not into sled's memory.
#[test]
fn large_batches_are_stored_in_segment_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Embedded::open(dir.path(), 1 << 20).unwrap();
    // Lines that do not compress, so the entry is far over `INLINE_MAX`.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let records = (0..2000)
        .map(|_| Record {
            time_unix_ms: 1,
            position: String::new(),
            body: Some(Body::Line(
                (0..120)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        b'!' + (x % 90) as u8
                    })
                    .collect(),
            )),
        })
        .collect();
    let b = encode_records(&RecordList { records })
        .unwrap()
        .into_batch("s".into(), 1);
    let acks = store.commit_group(&[Incoming {
        agent: "a1".into(),
        item: Item::Batch(b),
    }]);
    assert_eq!(*acks[0].as_ref().unwrap(), 2000);
    let segs = dir.path().join("segments").read_dir().unwrap().count();
    assert!(segs >= 1, "no segment file");
}

/// Trimming gives the disk back: emptied segment files and the bytes of files
/// completed in the removed range are deleted once the removal is durable, and
/// after a reopen the counted references keep what is still stored.
#[test]
fn trimming_deletes_emptied_segments_and_removed_files() {
    use ferry_protocol::messages::{FileChunk, FileEnd};
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let store = Embedded::open(dir.path(), 1 << 20).unwrap();
    store.count_segment_references().unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut noisy = |n: usize| -> Vec<Record> {
        (0..n)
            .map(|_| Record {
                time_unix_ms: 1,
                position: String::new(),
                body: Some(Body::Line(
                    (0..120)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            b'!' + (x % 90) as u8
                        })
                        .collect(),
                )),
            })
            .collect()
    };
    let data = vec![7u8; 5000];
    let file = Record {
        time_unix_ms: 1,
        position: String::new(),
        body: Some(Body::FileChunk(FileChunk {
            file_id: "f1".into(),
            path: "a.csv".into(),
            offset: 0,
            data: data.clone(),
            end: Some(FileEnd {
                size: 5000,
                sha256: Sha256::digest(&data).to_vec(),
            }),
        })),
    };
    let batch = |first: u64, records: Vec<Record>| Incoming {
        agent: "a1".into(),
        item: Item::Batch(
            encode_records(&RecordList { records })
                .unwrap()
                .into_batch("s".into(), first),
        ),
    };
    let r = store.commit_group(&[batch(1, noisy(2000)), batch(2001, vec![file])]);
    assert_eq!(*r[1].as_ref().unwrap(), 2001);
    let segs = || dir.path().join("segments").read_dir().unwrap().count();
    let stored_file = dir.path().join("files/a1/s/f1");
    assert!(segs() >= 1 && stored_file.exists());
    drop(store);
    // Reopened: the references are counted again before anything is released.
    let store = Embedded::open(dir.path(), 1 << 20).unwrap();
    store.count_segment_references().unwrap();
    assert!(segs() >= 1);
    let t = store.trim("a1", "s", 2001, u64::MAX).unwrap();
    assert_eq!((t.records, t.files, t.first_kept), (2000, 0, 2001));
    assert_eq!(segs(), 0, "the emptied segment file is still there");
    assert!(stored_file.exists());
    let t = store.trim("a1", "s", 2002, u64::MAX).unwrap();
    assert_eq!((t.records, t.files, t.first_kept), (1, 1, 2002));
    assert!(!stored_file.exists());
    assert!(store.file("a1", "s", "f1").unwrap().is_none());
    assert_eq!(store.next_expected("a1", "s").unwrap(), 2002);
}

/// An audit entry rewritten in the store's files (here through a test hook)
/// is caught by `verify_chain`, which names its seq; so is one whose hash was
/// recomputed to match, at the seq after it.
#[test]
fn a_tampered_audit_entry_is_caught_by_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = Embedded::open(dir.path(), 1 << 20).unwrap();
    for i in 0..4 {
        store
            .append_audit(
                "cli:root",
                "user_add",
                &format!("u{i}"),
                serde_json::json!({"role": "operator"}),
            )
            .unwrap();
    }
    crate::audit::verify_chain(&store.audit(1, 100).unwrap()).unwrap();
    store.tamper_audit(2, |e| e.target = "intruder".into());
    let err = crate::audit::verify_chain(&store.audit(1, 100).unwrap()).unwrap_err();
    assert!(err.starts_with("seq 2:"), "{err}");
    store.tamper_audit(2, |e| e.hash = e.computed_hash());
    let err = crate::audit::verify_chain(&store.audit(1, 100).unwrap()).unwrap_err();
    assert!(err.starts_with("seq 3:"), "{err}");
}

/// A second opener while the store is open (`ferry-exchange records` while
/// the exchange starts, before its admin socket answers) is refused and
/// leaves the owner's files alone: it used to remove every `.generating`
/// snapshot before finding sled's lock held, among them one the starting
/// exchange was writing, which then failed ("No such file or directory").
#[test]
fn a_second_opener_leaves_the_owners_snapshot_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Embedded::open(dir.path(), 1 << 20).unwrap();
    let writing = dir
        .path()
        .join("db")
        .join("snap.00000000FFFFFFFF.generating");
    std::fs::write(&writing, b"being written").unwrap();
    let second = Embedded::open(dir.path(), 1 << 20);
    assert!(second.is_err(), "two owners of one store");
    assert!(
        writing.exists(),
        "the second opener removed the owner's snapshot"
    );
    drop(store);
}
