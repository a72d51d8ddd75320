//! Both session state machines wired through an in-memory "network" whose links
//! can lose messages and break, with an in-memory store at the exchange. No
//! sockets, no sleeps: a whole connection's life runs in microseconds, so
//! proptest can try thousands of loss patterns.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::messages::StreamDecl;

const STREAM: &str = "s";

fn hello(agent: &str) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        agent_id: agent.into(),
        department: "d".into(),
        streams: vec![StreamDecl {
            name: STREAM.into(),
            catalog_id: "c-1".into(),
            sharing: Sharing::Conditional as i32,
            kind: "tail".into(),
        }],
        ..Default::default()
    }
}

fn peer(agent: &str) -> PeerIdentity {
    PeerIdentity {
        agent_id: agent.into(),
        department: "d".into(),
    }
}

/// The agent's durable buffer: batches of 3 records, seq 1..=n.
struct Buffer {
    batches: BTreeMap<u64, u64>, // first -> last
    acked: u64,
}

impl Buffer {
    fn new(records: u64) -> Self {
        let mut batches = BTreeMap::new();
        let mut s = 1;
        while s <= records {
            let last = (s + 2).min(records);
            batches.insert(s, last);
            s = last + 1;
        }
        Self { batches, acked: 0 }
    }
    fn head(&self) -> u64 {
        self.batches
            .values()
            .next_back()
            .copied()
            .unwrap_or(self.acked)
    }
    /// The buffered batch holding `seq`.
    fn batch_at(&self, seq: u64) -> Option<(u64, u64)> {
        self.batches
            .range(..=seq)
            .next_back()
            .filter(|(_, &l)| l >= seq)
            .map(|(&f, &l)| (f, l))
    }
    fn ack(&mut self, up_to: u64) {
        self.acked = self.acked.max(up_to);
        self.batches.retain(|_, l| *l > up_to);
    }
}

/// The exchange's store: seq -> times stored.
#[derive(Default)]
struct Store {
    next: u64,
    stored: BTreeMap<u64, u32>,
}

impl Store {
    fn commit(&mut self, first: u64, last: u64) -> u64 {
        if self.next == 0 {
            self.next = 1;
        }
        let count = (last - first + 1) as u32;
        if let Admission::Store { skip, gap_from } = admit(self.next, first, count) {
            assert_eq!(gap_from, None, "no gap may occur without data loss");
            for seq in first + u64::from(skip)..=last {
                *self.stored.entry(seq).or_default() += 1;
            }
            self.next = last + 1;
        }
        self.next - 1
    }
}

/// Runs connections until everything is acknowledged. `breaks` decides, per message
/// index (counted across connections), whether the link breaks there; past its end
/// the link holds, so every run terminates. A break kills the connection: in-flight messages
/// are lost on both directions).
fn deliver_all(records: u64, breaks: &[bool]) -> (Buffer, Store, usize) {
    let mut buf = Buffer::new(records);
    let mut store = Store::default();
    let mut tick = 0usize;
    let mut connections = 0;
    while buf.acked < records {
        connections += 1;
        assert!(connections < 10_000, "no progress");
        let local = BTreeMap::from([(
            STREAM.to_string(),
            LocalStream {
                acked: buf.acked,
                head: buf.head(),
            },
        )]);
        let mut agent = AgentSession::new(hello("a1"), &local);
        let mut ex = ExchangeSession::new(peer("a1"));
        let welcome = ex
            .handle_hello(&agent.hello(), |_| store.next.max(1), 1 << 20)
            .unwrap();
        let verdicts = agent.handle_welcome(&welcome).unwrap();
        for (_, v) in &verdicts {
            match v {
                ResumeVerdict::AckedAhead { up_to } => buf.ack(*up_to),
                ResumeVerdict::InStep => {}
                other => panic!("unexpected verdict {other:?}"),
            }
        }
        let mut to_exchange: VecDeque<Batch> = VecDeque::new();
        let mut to_agent: VecDeque<Ack> = VecDeque::new();
        'conn: loop {
            while let Some(seq) = agent.poll_send(STREAM) {
                let (first, last) = buf.batch_at(seq).unwrap();
                agent.on_sent(STREAM, first, last).unwrap();
                to_exchange.push_back(Batch {
                    stream: STREAM.into(),
                    first_seq: first,
                    record_count: (last - first + 1) as u32,
                    ..Default::default()
                });
            }
            if to_exchange.is_empty() && to_agent.is_empty() {
                break;
            }
            if let Some(b) = to_exchange.pop_front() {
                tick += 1;
                if breaks.get(tick).copied().unwrap_or(false) {
                    break 'conn;
                }
                ex.handle_batch(&b).unwrap();
                let up_to = store.commit(b.first_seq, b.first_seq + u64::from(b.record_count) - 1);
                to_agent.push_back(Ack {
                    stream: STREAM.into(),
                    up_to_seq: up_to,
                });
            }
            if let Some(a) = to_agent.pop_front() {
                tick += 1;
                if breaks.get(tick).copied().unwrap_or(false) {
                    break 'conn;
                }
                if let Some(w) = agent.handle_ack(&a).unwrap() {
                    buf.ack(w);
                }
            }
        }
    }
    (buf, store, connections)
}

#[test]
fn lossless_link_delivers_in_one_connection() {
    let (buf, store, conns) = deliver_all(100, &[false]);
    assert_eq!(conns, 1);
    assert_eq!(buf.acked, 100);
    assert_eq!(store.stored.len(), 100);
    assert!(store.stored.values().all(|&n| n == 1));
}

proptest! {
    /// Whatever messages a broken link loses, every record is stored exactly once.
    #[test]
    fn broken_links_never_lose_or_duplicate(
        records in 1u64..200,
        breaks in proptest::collection::vec(prop::bool::weighted(0.15), 1..64),
    ) {
        let (buf, store, _) = deliver_all(records, &breaks);
        prop_assert_eq!(buf.acked, records);
        prop_assert_eq!(store.stored.len() as u64, records);
        prop_assert!(store.stored.values().all(|&n| n == 1));
        prop_assert_eq!(store.stored.keys().copied().collect::<Vec<_>>(), (1..=records).collect::<Vec<_>>());
    }

    #[test]
    fn admit_never_stores_a_seq_twice(next in 1u64..1000, first in 1u64..1000, count in 1u32..100) {
        match admit(next, first, count) {
            Admission::Duplicate => prop_assert!(first + u64::from(count) <= next),
            Admission::Store { skip, gap_from } => {
                prop_assert!(first + u64::from(skip) >= next);
                prop_assert!(skip < count);
                prop_assert_eq!(gap_from.is_some(), first > next);
            }
        }
    }
}

#[test]
fn window_limits_batches_in_flight() {
    let local = BTreeMap::from([(
        STREAM.to_string(),
        LocalStream {
            acked: 0,
            head: 1000,
        },
    )]);
    let mut a = AgentSession::new(hello("a1"), &local);
    let mut ex = ExchangeSession::new(peer("a1"));
    let w = ex.handle_hello(&a.hello(), |_| 1, 1 << 20).unwrap();
    a.handle_welcome(&w).unwrap();
    let mut sent = 0;
    while let Some(seq) = a.poll_send(STREAM) {
        a.on_sent(STREAM, seq, seq).unwrap();
        sent += 1;
    }
    assert_eq!(sent, DEFAULT_WINDOW as usize);
    assert_eq!(
        a.handle_ack(&Ack {
            stream: STREAM.into(),
            up_to_seq: 2
        }),
        Ok(Some(2))
    );
    assert_eq!(a.in_flight(STREAM), DEFAULT_WINDOW as usize - 2);
    // Stale acks are ignored, acks for unsent seqs are violations.
    assert_eq!(
        a.handle_ack(&Ack {
            stream: STREAM.into(),
            up_to_seq: 1
        }),
        Ok(None)
    );
    assert!(a
        .handle_ack(&Ack {
            stream: STREAM.into(),
            up_to_seq: 999
        })
        .is_err());
}

#[test]
fn hello_must_match_certificate_and_sharing() {
    let mut ex = ExchangeSession::new(peer("a1"));
    let err = ex.handle_hello(&hello("a2"), |_| 1, 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Forbidden);

    let mut h = hello("a1");
    h.streams[0].sharing = Sharing::NotShared as i32;
    let err = ExchangeSession::new(peer("a1"))
        .handle_hello(&h, |_| 1, 1)
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Forbidden);
}

/// The exchange serves agents of every version it knows, in their version; an
/// agent newer than the exchange is refused, so it never sends records the
/// exchange could not read.
#[test]
fn versions_are_answered_in_kind_and_newer_agents_refused() {
    for v in crate::MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
        let mut h = hello("a1");
        h.version = v;
        let w = ExchangeSession::new(peer("a1"))
            .handle_hello(&h, |_| 1, 1)
            .unwrap();
        assert_eq!(w.version, v);
    }
    for v in [0, PROTOCOL_VERSION + 1] {
        let mut h = hello("a1");
        h.version = v;
        let e = ExchangeSession::new(peer("a1"))
            .handle_hello(&h, |_| 1, 1)
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Version, "{e}");
    }
    // A Welcome in another version than the agent speaks stops the agent.
    let mut a = AgentSession::new(hello("a1"), &BTreeMap::new());
    let old = Welcome {
        version: PROTOCOL_VERSION - 1,
        ..Default::default()
    };
    assert_eq!(
        a.handle_welcome(&old).unwrap_err().code(),
        ErrorCode::Version
    );
}

#[test]
fn batches_for_undeclared_streams_are_forbidden() {
    let mut ex = ExchangeSession::new(peer("a1"));
    assert!(ex.handle_batch(&Batch::default()).is_err());
    ex.handle_hello(&hello("a1"), |_| 1, 1).unwrap();
    let b = Batch {
        stream: "other".into(),
        first_seq: 1,
        record_count: 1,
        ..Default::default()
    };
    assert_eq!(
        ex.handle_batch(&b).unwrap_err().code(),
        ErrorCode::Forbidden
    );
}

#[test]
fn welcome_verdicts() {
    let local = BTreeMap::from([(
        STREAM.to_string(),
        LocalStream {
            acked: 10,
            head: 20,
        },
    )]);
    let verdict = |next| {
        let mut a = AgentSession::new(hello("a1"), &local);
        let w = Welcome {
            version: PROTOCOL_VERSION,
            streams: vec![crate::messages::StreamWelcome {
                name: STREAM.into(),
                next_seq: next,
            }],
            ..Default::default()
        };
        a.handle_welcome(&w).unwrap()[0].1.clone()
    };
    assert_eq!(verdict(11), ResumeVerdict::InStep);
    assert_eq!(verdict(16), ResumeVerdict::AckedAhead { up_to: 15 });
    assert_eq!(
        verdict(1),
        ResumeVerdict::ExchangeBehind {
            exchange_next: 1,
            local_acked: 10
        }
    );
    assert_eq!(
        verdict(30),
        ResumeVerdict::AgentBehind {
            exchange_next: 30,
            local_head: 20
        }
    );
}
