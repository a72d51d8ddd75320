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
