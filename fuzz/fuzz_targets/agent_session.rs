//! `AgentSession` driven by arbitrary sequences: local buffer state, `Welcome`s
//! (arbitrary entries, next seqs, held strings, versions, windows), `Ack`s with
//! arbitrary seqs, `on_durable`, and the driver's `poll_send` / `on_sent` /
//! `on_lost_sent`, either obeying `poll_send` or with arbitrary numbers.
//!
//! What comes from the exchange (`Welcome`, `Ack`) is fully arbitrary. What comes
//! from the agent's own buffer and driver (local acked/head/lost, `on_durable`,
//! raw `on_sent` / `on_lost_sent` numbers) stays below 2^62: seqs are dense
//! counters from 1 and never come near `u64::MAX`; local lost ranges are
//! disjoint and within the head, as salvage writes them.
//!
//! Asserted, besides never panicking:
//! * the acked watermark never goes backwards, and moves only to what was sent
//!   (or what `Welcome` says the exchange already holds);
//! * `Welcome` is refused unless it is the first, speaks `PROTOCOL_VERSION` and
//!   names every declared stream with a next seq > 0; its verdicts are one per
//!   declared stream and agree with the numbers (held, agent behind, exchange
//!   behind, acked ahead, in step);
//! * nothing is offered to send before `Welcome`, or on a held stream;
//! * `poll_send` only ever declares lost seqs the buffer lost (or the exchange
//!   lost after acking), only offers durable seqs, never a seq inside a range to
//!   declare lost, and keeps the window (as long as the driver obeys it).
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use ferry_protocol::messages::{Ack, Hello, Sharing, StreamDecl, StreamWelcome, Welcome};
use ferry_protocol::session::{AgentSession, LocalStream, Next, ResumeVerdict, DEFAULT_WINDOW};
use ferry_protocol::PROTOCOL_VERSION;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 3] = ["a", "b", "c"];
/// Seqs from the agent's own side stay below this.
const LOCAL_MAX: u64 = 1 << 62;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Name {
    Known(u8),
    /// A stream this agent did not declare.
    Unknown,
}

impl Name {
    fn get(self) -> &'static str {
        match self {
            Name::Known(i) => NAMES[usize::from(i) % NAMES.len()],
            Name::Unknown => "zz",
        }
    }
}

#[derive(Arbitrary, Debug)]
struct ArbLocal {
    /// Declared in `Hello`.
    declared: bool,
    /// Known to the buffer (otherwise: nothing acked, nothing held).
    known: bool,
    acked: u64,
    head_above: u16,
    /// Disjoint lost ranges, as (gap before, length - 1), from acked - some.
    lost: Vec<(u8, u8)>,
    lost_start_below: u8,
}

/// A seq relative to something the fuzzer cannot see, or any number.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Seq {
    AckedPlus(i16),
    HeadPlus(i16),
    SentPlus(i16),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    name: Name,
    next: Seq,
    held: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Welcome {
        version_ok: bool,
        version: u32,
        max_window: u32,
        entries: Vec<Entry>,
        /// Add an entry (next = acked + 1) for each declared stream not named.
        complete: bool,
    },
    Ack {
        name: Name,
        up_to: Seq,
    },
    Durable {
        name: Name,
        head: u64,
    },
    /// Do what `poll_send` says, with a batch of up to `len` + 1 records.
    Obey {
        name: Name,
        below: u8,
        len: u8,
    },
    RawSent {
        name: Name,
        first: Seq,
        last: Seq,
    },
    RawLost {
        name: Name,
        from: Seq,
        to: Seq,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    streams: [ArbLocal; 3],
    ops: Vec<Op>,
}

/// What the fuzzer knows of one declared stream, from what it did.
#[derive(Debug, Default, Clone)]
struct Model {
    /// Highest seq durable in the buffer.
    head: u64,
    /// Every seq the agent may declare lost (inclusive ranges).
    lost: Vec<(u64, u64)>,
    /// Highest seq put on the wire (or known held by the exchange).
    sent: u64,
    acked: u64,
    blocked: bool,
}

fn seq(s: Seq, m: Option<&Model>, local: bool) -> u64 {
    let m = m.cloned().unwrap_or_default();
    let v = match s {
        Seq::AckedPlus(d) => m.acked.saturating_add_signed(i64::from(d)),
        Seq::HeadPlus(d) => m.head.saturating_add_signed(i64::from(d)),
        Seq::SentPlus(d) => m.sent.saturating_add_signed(i64::from(d)),
        Seq::Any(v) => v,
    };
    if local {
        v % LOCAL_MAX
    } else {
        v
    }
}

fuzz_target!(|input: Input| {
    let mut hello = Hello {
        version: PROTOCOL_VERSION,
        agent_id: "agent".into(),
        department: "d".into(),
        ..Default::default()
    };
    let mut local = BTreeMap::new();
    let mut model: BTreeMap<&'static str, Model> = BTreeMap::new();
    for (i, l) in input.streams.iter().enumerate() {
        let name = NAMES[i];
        if !l.declared {
            continue;
        }
        hello.streams.push(StreamDecl {
            name: name.into(),
            catalog_id: "c".into(),
            sharing: Sharing::Conditional as i32,
            kind: "tail".into(),
            incarnation: "inc".into(),
            ..Default::default()
        });
        let mut m = Model::default();
        if l.known {
            let acked = l.acked % LOCAL_MAX;
            let mut lost = Vec::new();
            let mut at = acked.saturating_sub(u64::from(l.lost_start_below)).max(1);
            for &(gap, len) in &l.lost {
                let from = at + u64::from(gap);
                let to = from + u64::from(len);
                lost.push((from, to));
                at = to + 2;
            }
            let top = lost.last().map_or(0, |r| r.1);
            let head = (acked + u64::from(l.head_above)).max(top);
            local.insert(
                name.to_string(),
                LocalStream {
                    acked,
                    head,
                    lost: lost.clone(),
                },
            );
            m.head = head;
            m.acked = acked;
            m.sent = acked;
            // What is at or below acked is never declared: it was acknowledged.
            m.lost = lost
                .into_iter()
                .filter(|&(_, to)| to > acked)
                .map(|(from, to)| (from.max(acked + 1), to))
                .collect();
        }
        model.insert(name, m);
    }
    let mut agent = AgentSession::new(hello.clone(), &local);
    assert!(!agent.is_established());
    assert_eq!(agent.hello(), hello);
    let mut established = false;
    let mut window = DEFAULT_WINDOW as usize;
    // Whether the driver only ever did what `poll_send` said.
    let mut obedient = true;

    for op in &input.ops {
        match op {
            Op::Welcome {
                version_ok,
                version,
                max_window,
                entries,
                complete,
            } => {
                let mut w = Welcome {
                    version: if *version_ok {
                        PROTOCOL_VERSION
                    } else {
                        *version
                    },
                    max_frame: 1 << 20,
                    max_window: *max_window,
                    ..Default::default()
                };
                for e in entries {
                    let name = e.name.get();
                    w.streams.push(StreamWelcome {
                        name: name.into(),
                        next_seq: seq(e.next, model.get(name), false),
                        held: e.held.clone().unwrap_or_default(),
                    });
                }
                if *complete {
                    for (name, m) in &model {
                        if !w.streams.iter().any(|s| s.name == *name) {
                            w.streams.push(StreamWelcome {
                                name: name.to_string(),
                                next_seq: m.acked + 1,
                                held: String::new(),
                            });
                        }
                    }
                }
                // The last entry of a name counts.
                let offered: BTreeMap<&str, &StreamWelcome> =
                    w.streams.iter().map(|s| (s.name.as_str(), s)).collect();
                let valid = !established
                    && w.version == PROTOCOL_VERSION
                    && model
                        .keys()
                        .all(|n| offered.get(n).is_some_and(|s| s.next_seq > 0));
                let before: Vec<u64> = model.keys().map(|n| agent.acked(n)).collect();
                let result = agent.handle_welcome(&w);
                assert_eq!(result.is_ok(), valid, "Welcome {w:?} -> {result:?}");
                let Ok(verdicts) = result else {
                    for (n, b) in model.keys().zip(before) {
                        assert!(agent.acked(n) >= b, "watermark of {n} went back");
                    }
                    if established {
                        // A second Welcome is refused before anything changes.
                        continue;
                    }
                    // The driver drops a session whose Welcome failed (the shipper's
                    // `?`), and a failed Welcome may have changed some streams
                    // already (see the report); nothing more to drive.
                    return;
                };
                established = true;
                assert!(agent.is_established());
                if *max_window > 0 {
                    window = window.min(*max_window as usize);
                }
                let names: Vec<&str> = verdicts.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(names, model.keys().copied().collect::<Vec<_>>());
                for (name, verdict) in &verdicts {
                    let m = model.get_mut(name.as_str()).expect("a declared stream");
                    let s = offered[name.as_str()];
                    let exchange_acked = s.next_seq - 1;
                    match verdict {
                        ResumeVerdict::Held { reason } => {
                            assert!(!s.held.is_empty());
                            assert_eq!(reason, &s.held);
                        }
                        _ if !s.held.is_empty() => panic!("held stream {name} got {verdict:?}"),
                        ResumeVerdict::AgentBehind {
                            exchange_next,
                            local_head,
                        } => {
                            assert_eq!((*exchange_next, *local_head), (s.next_seq, m.head));
                            assert!(exchange_acked > m.head);
                        }
                        ResumeVerdict::ExchangeBehind {
                            exchange_next,
                            local_acked,
                        } => {
                            assert_eq!((*exchange_next, *local_acked), (s.next_seq, m.acked));
                            assert!(exchange_acked < m.acked && exchange_acked <= m.head);
                            // Acked records the exchange lost: declared lost.
                            m.lost.push((s.next_seq, m.acked));
                        }
                        ResumeVerdict::AckedAhead { up_to } => {
                            assert_eq!(*up_to, exchange_acked);
                            assert!(exchange_acked > m.acked && exchange_acked <= m.head);
                            m.acked = exchange_acked;
                            m.sent = m.sent.max(exchange_acked);
                        }
                        ResumeVerdict::InStep => assert_eq!(exchange_acked, m.acked),
                    }
                    assert_eq!(agent.acked(name), m.acked, "watermark of {name}");
                    m.blocked = !verdict.may_send();
                }
            }
            Op::Ack { name, up_to } => {
                let name = name.get();
                let before = agent.acked(name);
                let in_flight = agent.in_flight(name);
                let ack = Ack {
                    stream: name.into(),
                    up_to_seq: seq(*up_to, model.get(name), false), ..Default::default() };
                let result = agent.handle_ack(&ack);
                let after = agent.acked(name);
                assert!(
                    after >= before,
                    "watermark of {name} went back: {before} -> {after}"
                );
                assert!(agent.in_flight(name) <= in_flight);
                let Some(m) = model.get_mut(name) else {
                    assert!(result.is_err(), "ack for an undeclared stream");
                    continue;
                };
                match result {
                    Ok(Some(w)) => {
                        assert_eq!(w, ack.up_to_seq);
                        assert_eq!(after, w);
                        assert!(w > before);
                        assert!(
                            w <= m.sent,
                            "ack up to {w} of {name} accepted, only {} was sent",
                            m.sent
                        );
                        m.acked = w;
                    }
                    Ok(None) => assert_eq!(after, before),
                    Err(_) => {
                        assert_eq!(after, before);
                        assert_eq!(agent.in_flight(name), in_flight);
                    }
                }
            }
            Op::Durable { name, head } => {
                let name = name.get();
                let head = head % LOCAL_MAX;
                agent.on_durable(name, head);
                if let Some(m) = model.get_mut(name) {
                    m.head = m.head.max(head);
                }
            }
            Op::Obey { name, below, len } => {
                let name = name.get();
                let next = agent.poll_send(name);
                let Some(m) = model.get_mut(name) else {
                    assert_eq!(next, None, "something to send on an undeclared stream");
                    continue;
                };
                if !established || m.blocked {
                    assert_eq!(next, None, "sending on {name} before Welcome or while held");
                }
                let in_flight = agent.in_flight(name);
                if obedient {
                    assert!(
                        in_flight <= window,
                        "window of {window} exceeded: {in_flight}"
                    );
                }
                match next.clone() {
                    None => {}
                    Some(Next::Lost { from, to, reason }) => {
                        assert!(from <= to);
                        assert!(!reason.is_empty());
                        assert!(
                            m.lost.iter().any(|&(f, t)| f <= from && to <= t),
                            "declaring {from}..={to} of {name} lost; known lost: {:?}",
                            m.lost
                        );
                        agent
                            .on_lost_sent(name, from, to)
                            .unwrap_or_else(|e| panic!("doing what poll_send said: {e}"));
                        m.sent = m.sent.max(to);
                    }
                    Some(Next::Records(s)) => {
                        assert!(s <= m.head, "offering seq {s} above head {}", m.head);
                        assert!(s >= 1);
                        if obedient {
                            assert!(
                                !m.lost.iter().any(|&(f, t)| f <= s && s <= t),
                                "offering seq {s} of {name}, which is to be declared lost: {:?}",
                                m.lost
                            );
                        }
                        // A buffered batch holding `s`: it may start below it (part of
                        // it acked), never runs into a lost range.
                        let first = s.saturating_sub(u64::from(*below)).max(1);
                        let lost_above = m
                            .lost
                            .iter()
                            .filter(|&&(f, _)| f > s)
                            .map(|&(f, _)| f - 1)
                            .min()
                            .unwrap_or(u64::MAX);
                        let last = (s + u64::from(*len)).min(m.head).min(lost_above);
                        agent
                            .on_sent(name, first, last)
                            .unwrap_or_else(|e| panic!("doing what poll_send said: {e}"));
                        m.sent = m.sent.max(last);
                    }
                }
                if obedient && next.is_some() {
                    assert_eq!(agent.in_flight(name), in_flight + 1);
                    assert!(agent.in_flight(name) <= window);
                }
            }
            Op::RawSent { name, first, last } => {
                let name = name.get();
                let (first, last) = (
                    seq(*first, model.get(name), true),
                    seq(*last, model.get(name), true),
                );
                let r = agent.on_sent(name, first, last);
                if let Some(m) = model.get_mut(name) {
                    if r.is_ok() {
                        assert!(
                            first <= last && last <= m.head,
                            "{first}..={last} over {}",
                            m.head
                        );
                        m.sent = m.sent.max(last);
                        obedient = false;
                    }
                } else {
                    assert!(r.is_err());
                }
            }
            Op::RawLost { name, from, to } => {
                let name = name.get();
                let (from, to) = (
                    seq(*from, model.get(name), true),
                    seq(*to, model.get(name), true),
                );
                let r = agent.on_lost_sent(name, from, to);
                if let Some(m) = model.get_mut(name) {
                    if r.is_ok() {
                        assert!(from <= to);
                        m.sent = m.sent.max(to);
                        obedient = false;
                    }
                } else {
                    assert!(r.is_err());
                }
            }
        }
        for (name, m) in &model {
            assert_eq!(agent.acked(name), m.acked, "watermark of {name}");
            if obedient {
                assert!(
                    m.acked <= m.head,
                    "{name} acked {} past head {}",
                    m.acked,
                    m.head
                );
            }
        }
    }
});
