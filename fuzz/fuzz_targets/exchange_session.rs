//! `ExchangeSession` driven by arbitrary `Hello`s (versions, identities, stream
//! names, sharing classes, catalog ids, incarnations), an arbitrary `StreamPlan`
//! per declared stream (given directly, or judged by `continuity` from an
//! arbitrary `StreamRecord` as the exchange's store does), then arbitrary
//! `Batch`es and `Lost`s, fed through `handle_batch` / `handle_lost`,
//! `store_seq` and the pure `admit` / `admit_loss` against a model of the
//! store's next seq, acks mapped back with `agent_seq`; plus `admit`,
//! `admit_loss` and `continuity` on their own.
//!
//! Asserted, besides never panicking:
//! * `handle_hello` accepts exactly the Hellos `check_hello` promises to check
//!   (version range, identity, stream names, incarnations, sharing class, catalog
//!   id, no stream twice); a not-shared stream is never accepted; a second Hello
//!   is refused;
//! * `Welcome` answers in the agent's version with one entry per declared stream,
//!   in the agent's numbering (never seq 0), holds as planned;
//! * `handle_batch` / `handle_lost` accept only after Hello, on declared streams
//!   that are not held, with sane headers;
//! * admission is dense: `Store { skip }` only when `first + skip` is the next
//!   expected seq (`skip` < count), `Duplicate` only when every seq is below it,
//!   `Ahead` only past it; `admit_loss` records only from the next expected seq,
//!   never past it; what the session accepted can be admitted, and the stream
//!   can continue after it (its next seq does not overflow);
//! * `continuity` continues a stream only with the incarnation the exchange
//!   knows and a head not behind what it holds; adopts only a stream it holds
//!   nothing of; a hold is sticky.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use ferry_protocol::messages::{Batch, Hello, Lost, Sharing, StreamDecl};
use ferry_protocol::session::{
    admit, admit_loss, continuity, valid_stream_name, Admission, Continuity, ExchangeSession,
    LossAdmission, PeerIdentity, SessionError, StreamPlan, StreamRecord, DEFAULT_WINDOW,
};
use ferry_protocol::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 4] = ["s", "t.log", "u-1", "v_2"];

#[derive(Arbitrary, Debug, Clone)]
enum Name {
    Known(u8),
    Any(String),
}

impl Name {
    fn get(&self) -> String {
        match self {
            Name::Known(i) => NAMES[usize::from(*i) % NAMES.len()].to_string(),
            Name::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Text {
    Same,
    Empty,
    Any(String),
}

impl Text {
    fn get(&self, same: &str) -> String {
        match self {
            Text::Same => same.to_string(),
            Text::Empty => String::new(),
            Text::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct ArbDecl {
    name: Name,
    catalog: Text,
    sharing: i32,
    incarnation: Text,
    head_seq: u64,
    acked_seq: u64,
}

#[derive(Arbitrary, Debug)]
struct ArbHello {
    version: Option<u32>,
    agent: Text,
    department: Text,
    streams: Vec<ArbDecl>,
}

#[derive(Arbitrary, Debug, Clone)]
struct ArbRecord {
    next_seq: u64,
    /// The incarnation the exchange knows: none, the declared one, or another.
    incarnation: Text,
    offset: u64,
    held: Option<String>,
}

#[derive(Arbitrary, Debug, Clone)]
enum ArbPlan {
    Direct {
        next_seq: u64,
        offset: u64,
        held: Option<String>,
    },
    /// As the exchange's store plans a stream: `continuity` of what it holds.
    Judged(ArbRecord),
}

/// A seq near the model's next expected one (in the agent's numbering), or any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Seq {
    NextPlus(i16),
    /// Near the top of the seq space.
    MaxMinus(u16),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Hello(ArbHello),
    Batch { name: Name, first: Seq, count: u32 },
    Lost { name: Name, from: Seq, to: Seq },
    Admit { next: u64, first: u64, count: u32 },
    AdmitLoss { next: u64, from: u64, to: u64 },
    Continuity { rec: ArbRecord, decl: ArbDecl },
}

#[derive(Arbitrary, Debug)]
struct Input {
    plans: Vec<ArbPlan>,
    ops: Vec<Op>,
}

const AGENT: &str = "agent-1";
const DEPT: &str = "dept";

fn decl(d: &ArbDecl) -> StreamDecl {
    StreamDecl {
        name: d.name.get(),
        catalog_id: d.catalog.get("cat-1"),
        sharing: d.sharing % 5,
        kind: "tail".into(),
        incarnation: d.incarnation.get("inc-1"),
        head_seq: d.head_seq,
        acked_seq: d.acked_seq,
    }
}

/// A hold always has a reason: the exchange's store only holds a stream with
/// `continuity`'s reason or an operator's refusal, never with an empty one. An
/// empty reason would be sent as "not held" in `Welcome` (`held` empty: it may
/// ship) while the session refuses the stream's batches, so it stays out of the
/// input (see the report).
fn reason(held: &Option<String>) -> Option<String> {
    held.as_ref().map(|h| {
        if h.is_empty() {
            "held".to_string()
        } else {
            h.clone()
        }
    })
}

fn record(r: &ArbRecord, decl: &StreamDecl) -> StreamRecord {
    StreamRecord {
        next_seq: r.next_seq,
        incarnation: r.incarnation.get(&decl.incarnation),
        offset: r.offset,
        held: reason(&r.held),
    }
}

/// `continuity`'s promises.
fn check_continuity(rec: &StreamRecord, decl: &StreamDecl) -> Continuity {
    let c = continuity(rec, decl);
    let holds = rec.next_seq.saturating_sub(1);
    match &c {
        Continuity::Continue => {
            assert!(rec.held.is_none(), "a held stream continues");
            assert!(!rec.incarnation.is_empty(), "an unknown buffer continues");
            assert_eq!(
                rec.incarnation, decl.incarnation,
                "another buffer continues"
            );
            assert!(
                decl.head_seq.saturating_add(rec.offset) >= holds,
                "a buffer behind what the exchange holds continues"
            );
        }
        Continuity::Adopt => {
            assert!(rec.held.is_none(), "a held stream is adopted");
            assert!(
                rec.incarnation.is_empty(),
                "a known stream is adopted again"
            );
            assert_eq!(holds, 0, "a stream holding seqs is adopted");
        }
        Continuity::Hold(why) => {
            assert!(!why.is_empty());
            if let Some(h) = &rec.held {
                assert_eq!(why, h, "a hold changed its reason");
            }
        }
    }
    if rec.held.is_some() {
        assert!(matches!(c, Continuity::Hold(_)), "a hold was lifted");
    }
    if !rec.incarnation.is_empty() && rec.incarnation != decl.incarnation {
        assert!(
            matches!(c, Continuity::Hold(_)),
            "a new buffer was not held"
        );
    }
    c
}

fn plan(p: &ArbPlan, d: &StreamDecl) -> StreamPlan {
    match p {
        ArbPlan::Direct {
            next_seq,
            offset,
            held,
        } => StreamPlan {
            next_seq: *next_seq,
            offset: *offset,
            held: reason(held),
        },
        ArbPlan::Judged(r) => {
            let rec = record(r, d);
            let held = match check_continuity(&rec, d) {
                Continuity::Continue | Continuity::Adopt => None,
                Continuity::Hold(why) => Some(why),
            };
            StreamPlan {
                next_seq: rec.next_seq,
                offset: rec.offset,
                held,
            }
        }
    }
}

/// What `check_hello` documents it checks.
fn hello_is_valid(h: &Hello) -> bool {
    let mut names = BTreeSet::new();
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&h.version)
        && h.agent_id == AGENT
        && h.department == DEPT
        && h.streams.iter().all(|s| {
            !s.incarnation.is_empty()
                && s.incarnation.len() <= 64
                && valid_stream_name(&s.name)
                && matches!(
                    Sharing::try_from(s.sharing),
                    Ok(Sharing::Unconditional | Sharing::Conditional)
                )
                && !s.catalog_id.is_empty()
                && names.insert(s.name.clone())
        })
}

fn check_admit(next: u64, first: u64, count: u32) -> Admission {
    let a = admit(next, first, count);
    let last = first + u64::from(count) - 1;
    match a {
        Admission::Store { skip } => {
            assert!(skip < count, "skip {skip} of {count}");
            assert_eq!(
                first + u64::from(skip),
                next,
                "Store from {first} + {skip} with {next} expected"
            );
            assert!(last >= next);
        }
        Admission::Duplicate => assert!(last < next, "{first}..={last} is not all below {next}"),
        Admission::Ahead { expected } => {
            assert_eq!(expected, next);
            assert!(first > next, "{first} refused as ahead of {next}");
        }
    }
    a
}

fn check_admit_loss(next: u64, from: u64, to: u64) -> LossAdmission {
    let a = admit_loss(next, from, to);
    match a {
        LossAdmission::Record { from: f, to: t } => {
            assert_eq!(f, next, "a loss recorded from {f}, {next} expected");
            assert!(
                from <= next,
                "a loss declared from {from} recorded at {next}"
            );
            assert_eq!(t, to);
            assert!(f <= t);
        }
        LossAdmission::Duplicate => assert!(to < next),
        LossAdmission::Ahead { expected } => {
            assert_eq!(expected, next);
            assert!(from > next);
        }
    }
    a
}

fuzz_target!(|input: Input| {
    let mut session = ExchangeSession::new(PeerIdentity {
        agent_id: AGENT.into(),
        department: DEPT.into(),
    });
    assert_eq!(session.peer().agent_id, AGENT);
    // The session's plans once a Hello was accepted, and the store's next
    // expected seq per stream (exchange numbering).
    let mut plans: Option<BTreeMap<String, StreamPlan>> = None;
    let mut next: BTreeMap<String, u64> = BTreeMap::new();

    for op in &input.ops {
        match op {
            Op::Hello(h) => {
                let hello = Hello {
                    version: h.version.unwrap_or(PROTOCOL_VERSION),
                    agent_id: h.agent.get(AGENT),
                    department: h.department.get(DEPT),
                    config_digest: String::new(),
                    streams: h.streams.iter().map(decl).collect(),
                    software: "fuzz".into(),
                };
                let pick = |d: &StreamDecl| -> StreamPlan {
                    let i = hello.streams.iter().position(|s| s == d).unwrap_or(0);
                    input.plans.get(i).map_or_else(
                        || StreamPlan {
                            next_seq: 1,
                            ..Default::default()
                        },
                        |p| plan(p, d),
                    )
                };
                let checked = session.check_hello(&hello);
                let result = session.handle_hello(&hello, pick, 1 << 20);
                assert_eq!(checked.is_ok(), result.is_ok());
                let valid = plans.is_none() && hello_is_valid(&hello);
                assert_eq!(result.is_ok(), valid, "Hello {hello:?} -> {result:?}");
                if let Err(e) = &result {
                    if hello
                        .streams
                        .iter()
                        .any(|s| s.sharing == Sharing::NotShared as i32)
                        && plans.is_none()
                        && (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version)
                        && hello.agent_id == AGENT
                        && hello.department == DEPT
                    {
                        // Refused, for that or for an earlier stream's fault.
                        assert!(matches!(
                            e,
                            SessionError::Forbidden(_) | SessionError::Protocol(_)
                        ));
                    }
                    continue;
                }
                let Ok(welcome) = result else { continue };
                assert_eq!(
                    welcome.version, hello.version,
                    "Welcome not in the agent's version"
                );
                assert_eq!(welcome.max_window, DEFAULT_WINDOW);
                let declared: Vec<String> = hello.streams.iter().map(|s| s.name.clone()).collect();
                let mut sorted = declared.clone();
                sorted.sort();
                let names: Vec<String> = welcome.streams.iter().map(|s| s.name.clone()).collect();
                assert_eq!(names, sorted);
                let mut p = BTreeMap::new();
                for (d, w) in hello.streams.iter().zip(&declared) {
                    let sp = pick(d);
                    let entry = welcome
                        .streams
                        .iter()
                        .find(|s| &s.name == w)
                        .expect("named");
                    assert!(entry.next_seq >= 1, "Welcome offers seq 0");
                    assert_eq!(entry.next_seq, sp.next_seq.saturating_sub(sp.offset).max(1));
                    assert_eq!(entry.held, sp.held.clone().unwrap_or_default());
                    // `Welcome` tells the agent it may ship exactly when the session
                    // will take the stream's batches.
                    assert_eq!(entry.held.is_empty(), sp.held.is_none());
                    next.insert(w.clone(), sp.next_seq.max(1));
                    p.insert(w.clone(), sp);
                }
                plans = Some(p);
                assert!(
                    session.check_hello(&hello).is_err(),
                    "a second Hello passes"
                );
            }
            Op::Batch { name, first, count } => {
                let stream = name.get();
                let first_seq = match first {
                    Seq::Any(v) => *v,
                    Seq::MaxMinus(v) => u64::MAX - u64::from(*v),
                    Seq::NextPlus(d) => {
                        let n = next.get(&stream).copied().unwrap_or(1);
                        session
                            .agent_seq(&stream, n)
                            .saturating_add_signed(i64::from(*d))
                    }
                };
                let batch = Batch {
                    stream: stream.clone(),
                    first_seq,
                    record_count: *count,
                    compression: 0,
                    payload: Vec::new(),
                    raw_len: 0,
                };
                let r = session.handle_batch(&batch);
                let plan = plans.as_ref().and_then(|p| p.get(&stream));
                let open = plan.is_some_and(|p| p.held.is_none());
                // Found by this target: a range must fit in the store's numbering
                // (the agent's plus the plan's offset), with room for a next seq.
                let offset = plan.map_or(0, |p| p.offset);
                let sane = first_seq >= 1
                    && *count >= 1
                    && first_seq
                        .checked_add(offset)
                        .and_then(|f| f.checked_add(u64::from(*count)))
                        .and_then(|f| f.checked_add(1))
                        .is_some();
                assert_eq!(r.is_ok(), open && sane, "{batch:?} -> {r:?}");
                if plan.is_some_and(|p| p.held.is_some()) {
                    assert!(matches!(r, Err(SessionError::Held { .. })));
                }
                let Some(plan) = plan.filter(|_| r.is_ok()) else {
                    continue;
                };
                // As the exchange's server does: into the store's numbering, admit.
                let first = session.store_seq(&stream, first_seq);
                if let Some(v) = first_seq.checked_add(plan.offset) {
                    assert_eq!(first, v);
                    assert_eq!(session.agent_seq(&stream, first), first_seq);
                }
                assert!(
                    first.checked_add(u64::from(*count)).is_some(),
                    "handle_batch accepted {}+{} records of {stream}, but in the store's \
                     numbering (offset {}) it is {first}+{count}: the range overflows",
                    first_seq,
                    count,
                    plan.offset
                );
                let n = next.get_mut(&stream).expect("a declared stream");
                if let Admission::Store { .. } = check_admit(*n, first, *count) {
                    *n = first + u64::from(*count);
                }
                let ack = session.agent_seq(&stream, *n - 1);
                assert_eq!(ack, (*n - 1).saturating_sub(plan.offset));
            }
            Op::Lost { name, from, to } => {
                let stream = name.get();
                let n = next.get(&stream).copied().unwrap_or(1);
                let s = |x: &Seq| match x {
                    Seq::Any(v) => *v,
                    Seq::MaxMinus(v) => u64::MAX - u64::from(*v),
                    Seq::NextPlus(d) => session
                        .agent_seq(&stream, n)
                        .saturating_add_signed(i64::from(*d)),
                };
                let lost = Lost {
                    stream: stream.clone(),
                    from_seq: s(from),
                    to_seq: s(to),
                    reason: "damaged".into(),
                };
                let r = session.handle_lost(&lost);
                let plan = plans.as_ref().and_then(|p| p.get(&stream));
                let open = plan.is_some_and(|p| p.held.is_none());
                let offset = plan.map_or(0, |p| p.offset);
                let sane = lost.from_seq >= 1
                    && lost.to_seq >= lost.from_seq
                    && lost
                        .to_seq
                        .checked_add(offset)
                        .and_then(|t| t.checked_add(1))
                        .is_some();
                assert_eq!(r.is_ok(), open && sane, "{lost:?} -> {r:?}");
                if r.is_err() {
                    continue;
                }
                let (f, t) = (
                    session.store_seq(&stream, lost.from_seq),
                    session.store_seq(&stream, lost.to_seq),
                );
                let n = next.get_mut(&stream).expect("a declared stream");
                if let LossAdmission::Record { to, .. } = check_admit_loss(*n, f, t) {
                    *n = to.checked_add(1).unwrap_or_else(|| {
                        panic!(
                            "handle_lost accepted a loss of {stream} up to seq {} (store seq \
                             {to}): nothing can follow it, the next seq overflows",
                            lost.to_seq
                        )
                    });
                }
            }
            Op::Admit { next, first, count } => {
                // `admit`'s domain: what `handle_batch` lets through.
                if *first >= 1 && *count >= 1 && first.checked_add(u64::from(*count)).is_some() {
                    check_admit(*next, *first, *count);
                }
            }
            Op::AdmitLoss { next, from, to } => {
                if *from >= 1 && to >= from {
                    check_admit_loss(*next, *from, *to);
                }
            }
            Op::Continuity { rec, decl: d } => {
                let d = decl(d);
                check_continuity(&record(rec, &d), &d);
            }
        }
    }
    // Unknown and undeclared streams map seqs unchanged.
    assert_eq!(session.store_seq("\u{0}undeclared", 7), 7);
    assert_eq!(session.agent_seq("\u{0}undeclared", 7), 7);
});
