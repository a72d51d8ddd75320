#![allow(clippy::unwrap_used)]

use ferry_protocol::batch::encode_records;
use ferry_protocol::messages::{record::Body, Record, RecordList};

use super::*;

/// Lines that do not compress, so the batch entry is far over `INLINE_MAX`.
fn noisy_lines(first: u64, n: u64) -> Vec<Vec<u8>> {
    (first..first + n)
        .map(|i| {
            let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..120)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b'!' + (x % 90) as u8
                })
                .collect()
        })
        .collect()
}

fn batch(stream: &str, first: u64, lines: &[Vec<u8>]) -> Incoming {
    let e = encode_records(&RecordList {
        records: lines
            .iter()
            .map(|l| Record {
                time_unix_ms: 1,
                position: String::new(),
                body: Some(Body::Line(l.clone())),
            })
            .collect(),
    })
    .unwrap();
    Incoming {
        agent: "a1".into(),
        batch: e.into_batch(stream.into(), first),
    }
}

fn stored_lines(store: &Store, stream: &str) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    store
        .records("a1", stream, 1, |r, _| {
            if let Some(Body::Line(l)) = r.record.body {
                out.push((r.seq, l));
            }
            true
        })
        .unwrap();
    out
}

#[test]
fn large_batches_are_stored_in_segments_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let big1 = noisy_lines(1, 2000);
    let small = noisy_lines(2001, 3);
    let big2 = noisy_lines(2004, 2000);
    {
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let acks = store.commit_group(&[
            batch("s", 1, &big1),
            batch("s", 2001, &small),
            batch("t", 1, &small),
        ]);
        assert_eq!(
            acks.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            vec![2000, 2003, 3]
        );
        // A resend of what is stored is a duplicate, acked and not stored again.
        let acks = store.commit_group(&[batch("s", 1, &big1), batch("s", 2004, &big2)]);
        assert_eq!(
            acks.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            vec![2003, 4003]
        );
        assert!(dir.path().join("segments").read_dir().unwrap().count() >= 1);
    }
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    let want: Vec<(u64, Vec<u8>)> = big1
        .iter()
        .chain(&small)
        .chain(&big2)
        .cloned()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l))
        .collect();
    assert_eq!(stored_lines(&store, "s"), want);
    assert_eq!(stored_lines(&store, "t").len(), 3);
    assert_eq!(store.next_expected("a1", "s").unwrap(), 4004);
}
