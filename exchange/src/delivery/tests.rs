#![allow(clippy::unwrap_used)]

use super::*;
use crate::store::Ledger;

fn delivery(streams: &[&str]) -> DeliverySection {
    DeliverySection {
        name: "d".into(),
        kind: DeliveryKind::Files,
        streams: streams.iter().map(|s| s.to_string()).collect(),
        path: Some("/nonexistent".into()),
        dsn: None,
        password_file: None,
        schema: None,
        bookkeeping: "ferry".into(),
        url: None,
        subject: "ferry.{agent}.{stream}".into(),
        jetstream_stream: "FERRY_DELIVERY".into(),
    }
}

fn class(sharing: &str) -> ClassChange {
    ClassChange {
        from_seq: 1,
        catalog_id: "c".into(),
        sharing: sharing.into(),
        since_unix_ms: 0,
    }
}

#[test]
fn patterns_parse_agent_and_stream_with_wildcards() {
    assert!(Pattern::parse("a1/s").unwrap().exact());
    assert!(!Pattern::parse("*/s").unwrap().exact());
    assert!(!Pattern::parse("a1/*").unwrap().exact());
    for bad in ["a1", "a1/s/x", "/s", "a1/", "a b/s", "*s/t", "../s"] {
        assert!(Pattern::parse(bad).is_none(), "{bad:?} parsed");
    }
}

/// A wildcard reaches only unconditional records; naming a stream exactly is
/// the approval a conditional one needs; a record stored before any class was
/// recorded counts as conditional.
#[test]
fn wildcards_reach_only_unconditional_records() {
    let sub = Subscription::new(&delivery(&["*/open", "a1/named", "a2/*"]));
    let (u, c) = (class("unconditional"), class("conditional"));
    assert!(sub.admits("a9", "open", Some(&u)));
    assert!(!sub.admits("a9", "open", Some(&c)));
    assert!(!sub.admits("a9", "open", None));
    assert!(sub.admits("a1", "named", Some(&c)));
    assert!(sub.admits("a1", "named", None));
    assert!(!sub.admits("a1", "other", Some(&u)));
    assert!(sub.admits("a2", "x", Some(&u)));
    assert!(!sub.admits("a2", "x", Some(&c)));
    assert!(sub.names("a2", "x") && sub.names("a9", "open") && !sub.names("a9", "x"));
}

/// The class in force for a record is the last one declared at or before its seq.
#[test]
fn a_class_change_applies_from_its_seq_on() {
    let meta = crate::store::StreamMeta {
        classes: vec![
            ClassChange {
                from_seq: 1,
                ..class("conditional")
            },
            ClassChange {
                from_seq: 50,
                ..class("unconditional")
            },
        ],
        ..Default::default()
    };
    let sub = Subscription::new(&delivery(&["*/s"]));
    assert!(!sub.admits("a", "s", meta.class_at(49)));
    assert!(sub.admits("a", "s", meta.class_at(50)));
}

fn line_batch(first: u64, n: u64) -> crate::store::Incoming {
    use ferry_protocol::messages::{record::Body, Record, RecordList};
    let e = ferry_protocol::batch::encode_records(&RecordList {
        records: (first..first + n)
            .map(|i| Record {
                time_unix_ms: 1,
                position: String::new(),
                body: Some(Body::Line(format!("line {i}").into_bytes())),
            })
            .collect(),
    })
    .unwrap();
    crate::store::Incoming {
        agent: "a1".into(),
        item: crate::store::Item::Batch(e.into_batch("s".into(), first)),
    }
}

fn seqs(store: &dyn crate::store::Backend) -> Vec<u64> {
    let mut out = Vec::new();
    store
        .records("a1", "s", 1, &mut |r, _| {
            out.push(r.seq);
            true
        })
        .unwrap();
    out
}

/// Retention removes only what every delivery naming the stream passed, and
/// only what is older than the age; the next seq stays, so the stream goes on.
#[test]
fn retention_removes_only_what_every_delivery_passed() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Embedded::open(dir.path(), 1 << 20).unwrap();
    store.count_segment_references().unwrap();
    for first in [1, 11, 21, 31] {
        store.commit_group(&[line_batch(first, 10)]);
    }
    let subs = vec![
        ("fast".to_string(), Subscription::new(&delivery(&["a1/s"]))),
        ("slow".to_string(), Subscription::new(&delivery(&["*/s"]))),
    ];
    let status = |d: &str, cp: u64| StreamStatus {
        checkpoint: cp,
        ..StreamStatus::new(d, "a1", "s")
    };
    let future = now_unix_ms() + 60_000;
    // One delivery has not reported: nothing goes.
    retain_once(&store, &subs, &[status("fast", 40)], future).unwrap();
    assert_eq!(seqs(&store).len(), 40);
    // Both passed 25: the entries wholly below 26 go (1..=20).
    retain_once(
        &store,
        &subs,
        &[status("fast", 40), status("slow", 25)],
        future,
    )
    .unwrap();
    assert_eq!(seqs(&store).first(), Some(&21));
    // Too young: nothing goes.
    retain_once(&store, &subs, &[status("fast", 40), status("slow", 40)], 0).unwrap();
    assert_eq!(seqs(&store).first(), Some(&21));
    retain_once(
        &store,
        &subs,
        &[status("fast", 40), status("slow", 40)],
        future,
    )
    .unwrap();
    assert!(seqs(&store).is_empty());
    assert_eq!(store.next_expected("a1", "s").unwrap(), 41);
    let r = store.commit_group(&[line_batch(41, 5)]);
    assert_eq!(*r[0].as_ref().unwrap(), 45);
    assert_eq!(seqs(&store), (41..=45).collect::<Vec<_>>());
}

/// A stopping exchange applies no further chunk: a pass begun with its
/// shutdown cancelled delivers nothing of a backlog of several chunks (it
/// used to work through up to 16 chunks per stream first), and the same pass
/// with a live token takes the whole backlog.
#[tokio::test]
async fn a_pass_applies_no_chunk_once_the_exchange_is_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore =
        Arc::new(crate::store::Embedded::open(&dir.path().join("store"), 1 << 20).unwrap());
    let backlog = 3 * CHUNK_RECORDS as u64;
    for first in (1..=backlog).step_by(5_000) {
        store.commit_group(&[line_batch(first, 5_000)]);
    }
    let mut d = delivery(&["a1/s"]);
    d.path = Some(dir.path().join("out"));
    let sub = Subscription::new(&d);
    let statuses = Statuses::default();
    let mut progress = Progress::default();
    // One pass; whether it progressed, and the sink's checkpoint after it.
    let mut pass_with = async |token: &CancellationToken| {
        let progressed = pass(&d, &sub, &store, &statuses, &mut progress, token)
            .await
            .unwrap();
        let sink = progress.sink.as_mut().unwrap();
        (progressed, sink.checkpoint("a1", "s").await.unwrap())
    };
    let stopping = CancellationToken::new();
    stopping.cancel();
    assert_eq!(pass_with(&stopping).await, (false, 0));
    assert_eq!(pass_with(&CancellationToken::new()).await, (true, backlog));
}
