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
                    records: Some(records(3, "x")),
                    position: b"p1",
                },
                CommitItem {
                    stream: "b",
                    records: Some(records(2, "y")),
                    position: b"q1",
                },
                CommitItem {
                    stream: "a",
                    records: Some(records(4, "z")),
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
    let b = Buffer::open(&path, 1 << 20).unwrap();
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
    let b = Buffer::open(&path, 1 << 20).unwrap();
    assert_eq!(b.state("a").acked, 3);
    assert_eq!(b.state("a").head, 7);
    b.ack("a", 7).unwrap();
    assert_eq!(b.state("a").batches, 0);
    assert_eq!(b.state("b").batches, 1);
}
