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
        item: Item::Batch(e.into_batch(stream.into(), first)),
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

fn lost(stream: &str, from: u64, to: u64) -> Incoming {
    Incoming {
        agent: "a1".into(),
        item: Item::Lost(Lost {
            stream: stream.into(),
            from_seq: from,
            to_seq: to,
            reason: "damaged".into(),
        }),
    }
}

/// A batch the store refuses is not a gap: the later batches of its stream in the
/// same group are refused too (the agent resends from the next seq), other
/// streams go on, and no gap is recorded.
#[test]
fn a_refused_batch_refuses_its_streams_later_batches_and_leaves_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    let lines = noisy_lines(1, 3);
    let mut bad = batch("s", 4, &lines);
    if let Item::Batch(b) = &mut bad.item {
        b.record_count = 5; // does not match its payload: refused by the check
    }
    let results = store.commit_group(&[
        batch("s", 1, &lines),
        bad,
        batch("s", 7, &lines),
        batch("t", 1, &lines),
    ]);
    assert_eq!(results[0].as_ref().unwrap(), &3);
    assert!(
        matches!(results[1], Err(StoreError::Invalid(_))),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(StoreError::Resend(_))),
        "{:?}",
        results[2]
    );
    assert_eq!(results[3].as_ref().unwrap(), &3);
    assert_eq!(store.next_expected("a1", "s").unwrap(), 4);
    assert!(store.gaps("a1", "s").unwrap().is_empty());
    // Alone in a later group, a batch past the missing seq is refused as well.
    let results = store.commit_group(&[batch("s", 7, &lines)]);
    assert!(matches!(results[0], Err(StoreError::Resend(_))));
    // The resend continues the stream.
    let results = store.commit_group(&[batch("s", 4, &lines), batch("s", 7, &lines)]);
    assert_eq!(
        results.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        vec![6, 9]
    );
    assert_eq!(stored_lines(&store, "s").len(), 9);
}

/// Only a declared loss moves a stream past seqs that never arrived; it is
/// recorded as a gap with its reason, acknowledged, and idempotent.
#[test]
fn a_declared_loss_is_the_only_way_past_a_missing_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    let lines = noisy_lines(1, 3);
    let results = store.commit_group(&[
        batch("s", 1, &lines),
        lost("s", 4, 10),
        batch("s", 11, &lines),
        lost("s", 4, 10),
    ]);
    assert_eq!(
        results.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        vec![3, 10, 13, 13]
    );
    let gaps = store.gaps("a1", "s").unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!(
        (gaps[0].from, gaps[0].to, gaps[0].reason.as_str()),
        (4, 10, "damaged")
    );
    // A declaration past the next seq is refused, not recorded.
    let results = store.commit_group(&[lost("s", 20, 30)]);
    assert!(matches!(results[0], Err(StoreError::Resend(_))));
    assert_eq!(store.gaps("a1", "s").unwrap().len(), 1);
}

fn decl(incarnation: &str, head: u64, acked: u64) -> StreamDecl {
    StreamDecl {
        name: "s".into(),
        incarnation: incarnation.into(),
        head_seq: head,
        acked_seq: acked,
        ..Default::default()
    }
}

/// A wiped buffer (new incarnation) is held durably, across a restart of the
/// exchange and a reconnect; refusing keeps it held; accepting continues the
/// stream after a recorded boundary, the new buffer's seq 1 stored as the
/// exchange's next.
#[test]
fn a_new_incarnation_is_held_until_an_operator_decides() {
    let dir = tempfile::tempdir().unwrap();
    let lines = noisy_lines(1, 3);
    {
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let p = store.plan_stream("a1", &decl("old", 0, 0)).unwrap();
        assert_eq!((p.next_seq, p.held.is_none()), (1, true));
        store.commit_group(&[batch("s", 1, &lines), batch("s", 4, &lines)]);
        let p = store.plan_stream("a1", &decl("new", 150, 0)).unwrap();
        assert!(p.held.as_deref().unwrap().contains("new buffer"), "{p:?}");
    }
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    // Sticky: the old buffer coming back does not lift it either.
    let p = store.plan_stream("a1", &decl("old", 6, 6)).unwrap();
    assert!(p.held.is_some());
    assert_eq!(store.holds().unwrap().len(), 1);
    store
        .resolve("a1", "s", &Decision::Refuse("not ours".into()))
        .unwrap();
    let p = store.plan_stream("a1", &decl("new", 150, 0)).unwrap();
    assert!(p.held.as_deref().unwrap().contains("not ours"), "{p:?}");
    let meta = store.resolve("a1", "s", &Decision::Accept).unwrap();
    assert_eq!((meta.offset, meta.boundaries[0].from_seq), (6, 7));
    let p = store.plan_stream("a1", &decl("new", 150, 0)).unwrap();
    assert_eq!(
        p,
        StreamPlan {
            next_seq: 7,
            offset: 6,
            held: None
        }
    );
    assert!(store.holds().unwrap().is_empty());
    // Deciding on a stream that is not held is an error.
    assert!(store.resolve("a1", "s", &Decision::Accept).is_err());
}
