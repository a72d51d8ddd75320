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
            incarnation: "inc-1".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn plan1(_: &StreamDecl) -> StreamPlan {
    StreamPlan {
        next_seq: 1,
        ..Default::default()
    }
}

fn peer(agent: &str) -> PeerIdentity {
    PeerIdentity {
        agent_id: agent.into(),
        department: "d".into(),
    }
}

/// The agent's durable buffer: batches of 3 records, seq 1..=n; the batches
/// listed in `lost` (by index) were destroyed by damage and are recorded as lost.
struct Buffer {
    batches: BTreeMap<u64, u64>, // first -> last
    lost: Vec<(u64, u64)>,
    acked: u64,
}

impl Buffer {
    fn new(records: u64, damaged: &[bool]) -> Self {
        let mut batches = BTreeMap::new();
        let mut lost = Vec::new();
        let mut s = 1;
        let mut i = 0;
        while s <= records {
            let last = (s + 2).min(records);
            if damaged.get(i).copied().unwrap_or(false) {
                lost.push((s, last));
            } else {
                batches.insert(s, last);
            }
            s = last + 1;
            i += 1;
        }
        Self {
            batches,
            lost,
            acked: 0,
        }
    }
    fn head(&self) -> u64 {
        let batches = self.batches.values().next_back().copied().unwrap_or(0);
        let lost = self.lost.last().map_or(0, |l| l.1);
        batches.max(lost).max(self.acked)
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
        self.lost.retain(|l| l.1 > up_to);
    }
}

/// The exchange's store: seq -> times stored, and the seqs declared lost.
#[derive(Default)]
struct Store {
    next: u64,
    stored: BTreeMap<u64, u32>,
    lost: Vec<(u64, u64)>,
}

impl Store {
    /// `Err` when the batch is refused (it does not continue the stream).
    fn commit(&mut self, first: u64, last: u64) -> Result<u64, u64> {
        self.next = self.next.max(1);
        let count = (last - first + 1) as u32;
        match admit(self.next, first, count) {
            Admission::Store { skip } => {
                for seq in first + u64::from(skip)..=last {
                    *self.stored.entry(seq).or_default() += 1;
                }
                self.next = last + 1;
            }
            Admission::Duplicate => {}
            Admission::Ahead { expected } => return Err(expected),
        }
        Ok(self.next - 1)
    }

    fn declare_lost(&mut self, from: u64, to: u64) -> Result<u64, u64> {
        self.next = self.next.max(1);
        match admit_loss(self.next, from, to) {
            LossAdmission::Record { from, to } => {
                self.lost.push((from, to));
                self.next = to + 1;
            }
            LossAdmission::Duplicate => {}
            LossAdmission::Ahead { expected } => return Err(expected),
        }
        Ok(self.next - 1)
    }
}

enum Wire {
    Batch(Batch),
    Lost(u64, u64),
}

/// Runs connections until everything is acknowledged. `breaks` decides, per message
/// index (counted across connections), whether the link breaks there; past its end
/// the link holds, so every run terminates. A break kills the connection: in-flight messages
/// are lost on both directions). `refusals` decides, per batch the exchange
/// receives, whether its store fails to store it (a full disk): the exchange then
/// reports the error and closes the connection, as the real one does.
fn deliver_all(
    records: u64,
    breaks: &[bool],
    damaged: &[bool],
    refusals: &[bool],
) -> (Buffer, Store, usize) {
    let mut buf = Buffer::new(records, damaged);
    let mut store = Store::default();
    let mut received = 0usize;
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
                lost: buf.lost.clone(),
            },
        )]);
        let mut agent = AgentSession::new(hello("a1"), &local);
        let mut ex = ExchangeSession::new(peer("a1"));
        let welcome = ex
            .handle_hello(
                &agent.hello(),
                |_| StreamPlan {
                    next_seq: store.next.max(1),
                    ..Default::default()
                },
                1 << 20,
            )
            .unwrap();
        let verdicts = agent.handle_welcome(&welcome).unwrap();
        for (_, v) in &verdicts {
            match v {
                ResumeVerdict::AckedAhead { up_to } => buf.ack(*up_to),
                ResumeVerdict::InStep => {}
                other => panic!("unexpected verdict {other:?}"),
            }
        }
        let mut to_exchange: VecDeque<Wire> = VecDeque::new();
        let mut to_agent: VecDeque<Ack> = VecDeque::new();
        'conn: loop {
            while let Some(next) = agent.poll_send(STREAM) {
                match next {
                    Next::Records(seq) => {
                        let (first, last) = buf.batch_at(seq).unwrap();
                        agent.on_sent(STREAM, first, last).unwrap();
                        to_exchange.push_back(Wire::Batch(Batch {
                            stream: STREAM.into(),
                            first_seq: first,
                            record_count: (last - first + 1) as u32,
                            ..Default::default()
                        }));
                    }
                    Next::Lost { from, to, .. } => {
                        agent.on_lost_sent(STREAM, from, to).unwrap();
                        to_exchange.push_back(Wire::Lost(from, to));
                    }
                }
            }
            if to_exchange.is_empty() && to_agent.is_empty() {
                break;
            }
            if let Some(w) = to_exchange.pop_front() {
                tick += 1;
                if breaks.get(tick).copied().unwrap_or(false) {
                    break 'conn;
                }
                let result = match w {
                    Wire::Batch(b) => {
                        ex.handle_batch(&b).unwrap();
                        received += 1;
                        if refusals.get(received).copied().unwrap_or(false) {
                            // The store failed to write it: error, connection closed.
                            break 'conn;
                        }
                        store.commit(b.first_seq, b.first_seq + u64::from(b.record_count) - 1)
                    }
                    Wire::Lost(from, to) => store.declare_lost(from, to),
                };
                let Ok(up_to) = result else {
                    // Refused (an earlier one was not stored): the exchange closes
                    // the connection and the agent resends from its next seq.
                    break 'conn;
                };
                to_agent.push_back(Ack {
                    stream: STREAM.into(),
                    up_to_seq: up_to,
                    ..Default::default()
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

/// Every seq once, in order, except the ones declared lost, which are exactly
/// the damaged batches.
fn check_delivered(records: u64, damaged: &[bool], buf: &Buffer, store: &Store) {
    let expected_lost = Buffer::new(records, damaged).lost;
    assert_eq!(buf.acked, records);
    assert_eq!(store.lost, expected_lost, "only declared losses are gaps");
    let lost = |seq: u64| expected_lost.iter().any(|&(f, t)| (f..=t).contains(&seq));
    let want: Vec<u64> = (1..=records).filter(|&s| !lost(s)).collect();
    assert_eq!(store.stored.keys().copied().collect::<Vec<_>>(), want);
    assert!(store.stored.values().all(|&n| n == 1));
}

#[test]
fn lossless_link_delivers_in_one_connection() {
    let (buf, store, conns) = deliver_all(100, &[false], &[], &[]);
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
        let (buf, store, _) = deliver_all(records, &breaks, &[], &[]);
        check_delivered(records, &[], &buf, &store);
    }

    /// A store that refuses batches (a full disk at the exchange) and a buffer
    /// with damaged batches, over a breaking link: what the store refused is sent
    /// again, never skipped; the only holes are the declared losses.
    #[test]
    fn refusals_and_declared_losses_never_become_silent_gaps(
        records in 1u64..200,
        breaks in proptest::collection::vec(prop::bool::weighted(0.1), 1..64),
        damaged in proptest::collection::vec(prop::bool::weighted(0.1), 0..70),
        refusals in proptest::collection::vec(prop::bool::weighted(0.2), 0..64),
    ) {
        let (buf, store, _) = deliver_all(records, &breaks, &damaged, &refusals);
        check_delivered(records, &damaged, &buf, &store);
    }

    #[test]
    fn admit_never_stores_a_seq_twice_nor_past_a_missing_one(next in 1u64..1000, first in 1u64..1000, count in 1u32..100) {
        match admit(next, first, count) {
            Admission::Duplicate => prop_assert!(first + u64::from(count) <= next),
            Admission::Store { skip } => {
                prop_assert_eq!(first + u64::from(skip), next);
                prop_assert!(skip < count);
            }
            Admission::Ahead { expected } => {
                prop_assert!(first > next);
                prop_assert_eq!(expected, next);
            }
        }
    }
}

/// A refused batch is not a gap: the next batch of the stream is refused too,
/// until the missing one is stored or declared lost.
#[test]
fn a_batch_past_a_missing_seq_is_refused_not_stored() {
    let mut store = Store::default();
    assert_eq!(store.commit(1, 3), Ok(3));
    // 4..=6 refused by the disk: 7..=9 must not be stored.
    assert_eq!(store.commit(7, 9), Err(4));
    assert_eq!(store.declare_lost(5, 6), Err(4));
    assert_eq!(store.commit(4, 6), Ok(6));
    assert_eq!(store.commit(7, 9), Ok(9));
    assert_eq!(store.declare_lost(10, 12), Ok(12));
    assert_eq!(store.lost, vec![(10, 12)]);
    // Repeated declarations are acked again, never recorded twice.
    assert_eq!(store.declare_lost(10, 12), Ok(12));
    assert_eq!(store.lost, vec![(10, 12)]);
}

fn decl(incarnation: &str, head: u64) -> StreamDecl {
    StreamDecl {
        name: STREAM.into(),
        incarnation: incarnation.into(),
        head_seq: head,
        ..Default::default()
    }
}

/// The rule that keeps a wiped, restored or cloned buffer from being merged into
/// the seqs of the one the exchange holds.
#[test]
fn continuity_holds_new_incarnations_and_buffers_behind() {
    let fresh = StreamRecord {
        next_seq: 1,
        ..Default::default()
    };
    assert_eq!(continuity(&fresh, &decl("x", 0)), Continuity::Adopt);
    let held = StreamRecord {
        next_seq: 101,
        incarnation: "x".into(),
        ..Default::default()
    };
    assert_eq!(continuity(&held, &decl("x", 100)), Continuity::Continue);
    assert_eq!(continuity(&held, &decl("x", 150)), Continuity::Continue);
    // Wiped: a new incarnation, even one whose head passed the exchange's.
    assert!(
        matches!(continuity(&held, &decl("y", 150)), Continuity::Hold(r) if r.contains("new buffer"))
    );
    // Restored from a backup: same incarnation, head behind.
    assert!(
        matches!(continuity(&held, &decl("x", 60)), Continuity::Hold(r) if r.contains("restored"))
    );
    // An unidentified stream that already holds data is not adopted blindly.
    let legacy = StreamRecord {
        next_seq: 11,
        ..Default::default()
    };
    assert!(matches!(
        continuity(&legacy, &decl("x", 10)),
        Continuity::Hold(_)
    ));
    // A hold is sticky: a matching Hello does not lift it.
    let sticky = StreamRecord {
        held: Some("decide".into()),
        ..held.clone()
    };
    assert_eq!(
        continuity(&sticky, &decl("x", 100)),
        Continuity::Hold("decide".into())
    );
    // Accepted as a continuation at offset 100: its seq 1 is the exchange's 101.
    let accepted = StreamRecord {
        next_seq: 131,
        incarnation: "y".into(),
        offset: 100,
        held: None,
    };
    assert_eq!(continuity(&accepted, &decl("y", 30)), Continuity::Continue);
    assert!(matches!(
        continuity(&accepted, &decl("y", 20)),
        Continuity::Hold(_)
    ));
}

/// After an accepted boundary the agent speaks its own numbering and the
/// exchange stores its own.
#[test]
fn an_accepted_boundary_translates_seqs_both_ways() {
    let mut ex = ExchangeSession::new(peer("a1"));
    let w = ex
        .handle_hello(
            &hello("a1"),
            |_| StreamPlan {
                next_seq: 131,
                offset: 100,
                held: None,
            },
            1,
        )
        .unwrap();
    assert_eq!(w.streams[0].next_seq, 31);
    assert_eq!(ex.store_seq(STREAM, 31), 131);
    assert_eq!(ex.agent_seq(STREAM, 140), 40);
}

/// A held stream ships nothing: the agent is told why and stops; the exchange
/// refuses its batches and losses anyway.
#[test]
fn a_held_stream_is_refused_at_both_ends() {
    let mut ex = ExchangeSession::new(peer("a1"));
    let w = ex
        .handle_hello(
            &hello("a1"),
            |_| StreamPlan {
                next_seq: 101,
                offset: 0,
                held: Some("new buffer".into()),
            },
            1,
        )
        .unwrap();
    let b = Batch {
        stream: STREAM.into(),
        first_seq: 101,
        record_count: 1,
        ..Default::default()
    };
    assert_eq!(ex.handle_batch(&b).unwrap_err().code(), ErrorCode::Held);
    let local = BTreeMap::from([(
        STREAM.to_string(),
        LocalStream {
            acked: 0,
            head: 150,
            lost: vec![],
        },
    )]);
    let mut a = AgentSession::new(hello("a1"), &local);
    let v = a.handle_welcome(&w).unwrap();
    assert_eq!(
        v[0].1,
        ResumeVerdict::Held {
            reason: "new buffer".into()
        }
    );
    assert_eq!(a.poll_send(STREAM), None);
}

#[test]
fn window_limits_batches_in_flight() {
    let local = BTreeMap::from([(
        STREAM.to_string(),
        LocalStream {
            acked: 0,
            head: 1000,
            lost: vec![],
        },
    )]);
    let mut a = AgentSession::new(hello("a1"), &local);
    let mut ex = ExchangeSession::new(peer("a1"));
    let w = ex.handle_hello(&a.hello(), plan1, 1 << 20).unwrap();
    a.handle_welcome(&w).unwrap();
    let mut sent = 0;
    while let Some(Next::Records(seq)) = a.poll_send(STREAM) {
        a.on_sent(STREAM, seq, seq).unwrap();
        sent += 1;
    }
    assert_eq!(sent, DEFAULT_WINDOW as usize);
    assert_eq!(
        a.handle_ack(&Ack {
            stream: STREAM.into(),
            up_to_seq: 2,
            ..Default::default()
        }),
        Ok(Some(2))
    );
    assert_eq!(a.in_flight(STREAM), DEFAULT_WINDOW as usize - 2);
    // Stale acks are ignored, acks for unsent seqs are violations.
    assert_eq!(
        a.handle_ack(&Ack {
            stream: STREAM.into(),
            up_to_seq: 1,
            ..Default::default()
        }),
        Ok(None)
    );
    assert!(a
        .handle_ack(&Ack {
            stream: STREAM.into(),
            up_to_seq: 999,
            ..Default::default()
        })
        .is_err());
}

#[test]
fn hello_must_match_certificate_and_sharing() {
    let mut ex = ExchangeSession::new(peer("a1"));
    let err = ex.handle_hello(&hello("a2"), plan1, 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Forbidden);

    let mut h = hello("a1");
    h.streams[0].sharing = Sharing::NotShared as i32;
    let err = ExchangeSession::new(peer("a1"))
        .handle_hello(&h, plan1, 1)
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
            .handle_hello(&h, plan1, 1)
            .unwrap();
        assert_eq!(w.version, v);
    }
    for v in [0, PROTOCOL_VERSION + 1] {
        let mut h = hello("a1");
        h.version = v;
        let e = ExchangeSession::new(peer("a1"))
            .handle_hello(&h, plan1, 1)
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
    ex.handle_hello(&hello("a1"), plan1, 1).unwrap();
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
            lost: vec![],
        },
    )]);
    let verdict = |next| {
        let mut a = AgentSession::new(hello("a1"), &local);
        let w = Welcome {
            version: PROTOCOL_VERSION,
            streams: vec![crate::messages::StreamWelcome {
                name: STREAM.into(),
                next_seq: next,
                held: String::new(),
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
    // Records the exchange lost after acknowledging them are declared lost, then
    // shipping goes on from the buffer.
    let mut a = AgentSession::new(hello("a1"), &local);
    a.handle_welcome(&Welcome {
        version: PROTOCOL_VERSION,
        streams: vec![crate::messages::StreamWelcome {
            name: STREAM.into(),
            next_seq: 4,
            held: String::new(),
        }],
        ..Default::default()
    })
    .unwrap();
    let Some(Next::Lost {
        from: 4, to: 10, ..
    }) = a.poll_send(STREAM)
    else {
        panic!("expected a loss declaration of 4..=10");
    };
    a.on_lost_sent(STREAM, 4, 10).unwrap();
    assert_eq!(a.poll_send(STREAM), Some(Next::Records(11)));
    assert_eq!(
        a.handle_ack(&Ack {
            stream: STREAM.into(),
            up_to_seq: 10,
            ..Default::default()
        }),
        Ok(None)
    );
    assert_eq!(a.in_flight(STREAM), 0);
    assert_eq!(
        verdict(30),
        ResumeVerdict::AgentBehind {
            exchange_next: 30,
            local_head: 20
        }
    );
}

/// Found by `fuzz/fuzz_targets/exchange_session.rs`. `handle_batch` refuses a
/// batch whose seq range overflows, but the exchange's server then moves the
/// batch into its own numbering (`store_seq`, saturating) and admits it there:
/// with an offset (a buffer an operator accepted as a continuation) a batch the
/// session accepted overflows `admit`'s `first_seq + record_count - 1`. A
/// debug build panics ("attempt to add with overflow"); a release build wraps
/// and takes the batch for a duplicate.
#[test]
fn a_batch_the_session_accepts_can_be_admitted_in_the_store_numbering() {
    let mut ex = ExchangeSession::new(peer("a1"));
    let plan = |_: &StreamDecl| StreamPlan {
        next_seq: 5,
        offset: 10,
        held: None,
    };
    ex.handle_hello(&hello("a1"), plan, 1 << 20).unwrap();
    let batch = Batch {
        stream: STREAM.into(),
        first_seq: u64::MAX - 20,
        record_count: 15,
        ..Default::default()
    };
    if ex.handle_batch(&batch).is_ok() {
        // What `exchange/src/server.rs` and `store::stage_batch` do with it.
        let first = ex.store_seq(STREAM, batch.first_seq);
        let _ = admit(5, first, batch.record_count);
    }
}

/// Found by `fuzz/fuzz_targets/exchange_session.rs`. `handle_lost` accepts a
/// loss up to seq `u64::MAX` (`handle_batch` refuses the like for a batch), so
/// once `admit_loss` records it nothing can follow: the exchange's store
/// computes the stream's next seq as `to + 1` (`exchange/src/store/mod.rs`,
/// `commit`), which panics in a debug build and wraps to 0 in a release build,
/// after which every later batch of the stream is refused as `Ahead`.
#[test]
fn a_loss_the_session_accepts_can_be_followed() {
    let mut ex = ExchangeSession::new(peer("a1"));
    ex.handle_hello(&hello("a1"), plan1, 1 << 20).unwrap();
    let lost = Lost {
        stream: STREAM.into(),
        from_seq: 1,
        to_seq: u64::MAX,
        reason: "damaged".into(),
    };
    if ex.handle_lost(&lost).is_ok() {
        let (from, to) = (
            ex.store_seq(STREAM, lost.from_seq),
            ex.store_seq(STREAM, lost.to_seq),
        );
        if let LossAdmission::Record { to, .. } = admit_loss(1, from, to) {
            assert!(
                to.checked_add(1).is_some(),
                "a loss up to seq {to} was accepted: the stream's next seq overflows"
            );
        }
    }
}
