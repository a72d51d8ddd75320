//! Sans-IO session state machines of both ends of `ferry/1`.
//!
//! The drivers (the agent's shipper, the exchange's connection handler) own the
//! sockets and the clock; these types own the rules: what may be sent when, what an
//! acknowledgement means, and what the exchange admits. They never do I/O.
//!
//! Exchange of a connection:
//! ```text
//! agent                                  exchange
//!   Hello{agent_id, streams} ─────────────▶  handle_hello: identity and sharing checks
//!   ◀──────────── Welcome{stream → next_seq}
//!   handle_welcome: resume verdict per stream
//!   Batch{stream, first_seq, n} ──────────▶  handle_batch + admit(): dedup by seq
//!   Lost{stream, from, to}      ──────────▶  (a declared hole, in seq order)
//!   ◀───────────── Ack{stream, up_to_seq}    (only after the store is durable)
//!   handle_ack: cumulative, never backwards
//! ```
//!
//! # Admission is strict
//! The exchange stores a batch only when it continues exactly at the stream's next
//! expected seq (or overlaps it: the overlap is dropped as a duplicate). A batch
//! that starts past it is refused ([`Admission::Ahead`]) and the agent resends
//! from the next seq `Welcome` gives. The only way past a missing seq is an
//! explicit [`Lost`] declaration from the agent, recorded as a gap. So a batch the
//! exchange could not store (a full disk, a damaged entry) never turns into a hole
//! that the next batch papers over and the agent then deletes.
//!
//! # Incarnations and holds
//! Each agent buffer has a random incarnation id. The exchange remembers, per
//! (agent, stream), the incarnation whose seqs it holds; [`continuity`] decides
//! whether a `Hello` continues that stream. A new incarnation, or a buffer whose
//! head is behind what the exchange holds (a restored backup, a cloned server),
//! is *held*: nothing of that stream is stored until an operator accepts it as a
//! continuation (from then on its seqs map onto the exchange's after a recorded
//! boundary: `offset`) or refuses it. A hold is kept by the exchange, so a
//! reconnect never lifts it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::messages::{Ack, Batch, ErrorCode, Hello, Lost, Sharing, StreamDecl, Welcome};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Default number of unacknowledged batches per stream.
pub const DEFAULT_WINDOW: u32 = 16;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// `ours`: the version or range this end speaks; `advice`: what to do.
    #[error("incompatible protocol version {peer} (this end speaks {ours}): {advice}")]
    Version {
        peer: u32,
        ours: String,
        advice: &'static str,
    },
    #[error("stream {stream} is held at the exchange: {reason}")]
    Held { stream: String, reason: String },
}

impl SessionError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Protocol(_) => ErrorCode::Protocol,
            SessionError::Forbidden(_) => ErrorCode::Forbidden,
            SessionError::Version { .. } => ErrorCode::Version,
            SessionError::Held { .. } => ErrorCode::Held,
        }
    }
}

fn protocol(msg: impl Into<String>) -> SessionError {
    SessionError::Protocol(msg.into())
}

/// A stream name: 1–128 characters of `[A-Za-z0-9._-]`, so it is safe as a key and
/// a directory name at the exchange.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

// ───────────────────────────── agent end ─────────────────────────────

/// What the agent learns about one stream from `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeVerdict {
    /// The exchange holds exactly what this agent knows was acknowledged.
    InStep,
    /// The exchange durably holds more than this agent saw acknowledged (an ack was
    /// lost with a connection): everything up to `up_to` counts as acknowledged.
    AckedAhead { up_to: u64 },
    /// The exchange expects a seq below one it acknowledged before: its store lost
    /// data (restored from backup, wiped). Those records are gone from this agent's
    /// buffer, so this must be reported, not papered over.
    ExchangeBehind {
        exchange_next: u64,
        local_acked: u64,
    },
    /// The exchange holds seqs this agent never produced (its buffer was wiped and
    /// it restarted numbering). Sending would be deduplicated away, so the stream is
    /// held until an operator resolves it.
    AgentBehind { exchange_next: u64, local_head: u64 },
    /// The exchange holds the stream until an operator decides (see [`continuity`]).
    Held { reason: String },
}

impl ResumeVerdict {
    /// Whether the stream may ship after this verdict.
    pub fn may_send(&self) -> bool {
        !matches!(
            self,
            ResumeVerdict::AgentBehind { .. } | ResumeVerdict::Held { .. }
        )
    }
}

/// What to put on the wire next for a stream (see [`AgentSession::poll_send`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The buffered batch holding this seq.
    Records(u64),
    /// Declare seqs `from ..= to` lost (a [`Lost`] message).
    Lost { from: u64, to: u64, reason: String },
}

#[derive(Debug, Clone)]
struct SendState {
    /// Every seq `<= acked` is acknowledged.
    acked: u64,
    /// Highest seq durable in the local buffer.
    head: u64,
    /// Next seq to put on the wire.
    next_to_send: u64,
    /// Batches on the wire, oldest first: (first_seq, last_seq).
    in_flight: VecDeque<(u64, u64)>,
    blocked: bool,
    /// Ranges to declare lost when `next_to_send` reaches them: from → (to, why).
    lost: BTreeMap<u64, (u64, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentState {
    AwaitingWelcome,
    Established,
}

/// The agent's side of one connection.
#[derive(Debug)]
pub struct AgentSession {
    state: AgentState,
    hello: Hello,
    streams: BTreeMap<String, SendState>,
    window: usize,
}

/// Local knowledge of one stream when a connection starts.
#[derive(Debug, Clone, Default)]
pub struct LocalStream {
    pub acked: u64,
    pub head: u64,
    /// Seq ranges `(from, to)` above `acked` that were durable once but are gone
    /// from the buffer (damage recovered by `salvage`): declared lost, never skipped.
    pub lost: Vec<(u64, u64)>,
}

impl AgentSession {
    /// `local` gives, for each stream declared in `hello`, what the buffer knows.
    pub fn new(hello: Hello, local: &BTreeMap<String, LocalStream>) -> Self {
        let streams = hello
            .streams
            .iter()
            .map(|d| {
                let l = local.get(&d.name).cloned().unwrap_or_default();
                (
                    d.name.clone(),
                    SendState {
                        acked: l.acked,
                        head: l.head.max(l.acked),
                        next_to_send: l.acked + 1,
                        in_flight: VecDeque::new(),
                        blocked: true,
                        lost: l
                            .lost
                            .iter()
                            .filter(|&&(from, to)| from <= to && to > l.acked)
                            .map(|&(from, to)| {
                                (
                                    from.max(l.acked + 1),
                                    (to, "lost to damage in the agent's buffer (recovered by salvage)".to_string()),
                                )
                            })
                            .collect(),
                    },
                )
            })
            .collect();
        Self {
            state: AgentState::AwaitingWelcome,
            hello,
            streams,
            window: DEFAULT_WINDOW as usize,
        }
    }

    pub fn hello(&self) -> Hello {
        self.hello.clone()
    }

    pub fn is_established(&self) -> bool {
        self.state == AgentState::Established
    }

    pub fn handle_welcome(
        &mut self,
        welcome: &Welcome,
    ) -> Result<Vec<(String, ResumeVerdict)>, SessionError> {
        if self.state != AgentState::AwaitingWelcome {
            return Err(protocol("second Welcome on one connection"));
        }
        if welcome.version != PROTOCOL_VERSION {
            return Err(SessionError::Version {
                peer: welcome.version,
                ours: PROTOCOL_VERSION.to_string(),
                advice: "the exchange answered in another version than the agent speaks; \
                         upgrade the exchange and the agent to the same release",
            });
        }
        if welcome.max_window > 0 {
            self.window = self.window.min(welcome.max_window as usize);
        }
        let offered: BTreeMap<&str, (u64, &str)> = welcome
            .streams
            .iter()
            .map(|s| (s.name.as_str(), (s.next_seq, s.held.as_str())))
            .collect();
        let mut verdicts = Vec::new();
        for (name, st) in self.streams.iter_mut() {
            let Some(&(next, held)) = offered.get(name.as_str()) else {
                return Err(protocol(format!("Welcome does not mention stream {name}")));
            };
            if next == 0 {
                return Err(protocol(format!("Welcome offers seq 0 for stream {name}")));
            }
            let exchange_acked = next - 1;
            st.next_to_send = st.acked + 1;
            let verdict = if !held.is_empty() {
                ResumeVerdict::Held {
                    reason: held.to_string(),
                }
            } else if exchange_acked > st.head {
                ResumeVerdict::AgentBehind {
                    exchange_next: next,
                    local_head: st.head,
                }
            } else if exchange_acked < st.acked {
                // Those records were acknowledged and are gone from this buffer:
                // declare them lost, so the exchange records the hole instead of
                // refusing every later batch.
                st.next_to_send = next;
                st.lost.insert(
                    next,
                    (
                        st.acked,
                        "acknowledged by the exchange before, then lost by it (its store was restored or wiped)".to_string(),
                    ),
                );
                ResumeVerdict::ExchangeBehind {
                    exchange_next: next,
                    local_acked: st.acked,
                }
            } else if exchange_acked > st.acked {
                st.acked = exchange_acked;
                st.next_to_send = exchange_acked + 1;
                ResumeVerdict::AckedAhead {
                    up_to: exchange_acked,
                }
            } else {
                ResumeVerdict::InStep
            };
            st.blocked = !verdict.may_send();
            verdicts.push((name.clone(), verdict));
        }
        self.state = AgentState::Established;
        Ok(verdicts)
    }

    /// The buffer made seqs up to `head` durable.
    pub fn on_durable(&mut self, stream: &str, head: u64) {
        if let Some(st) = self.streams.get_mut(stream) {
            st.head = st.head.max(head);
        }
    }

    /// What to send next on `stream`, if the window has room and there is
    /// something durable to send: the batch holding a seq, or a declaration that a
    /// range is lost.
    pub fn poll_send(&self, stream: &str) -> Option<Next> {
        let st = self.streams.get(stream)?;
        if self.state != AgentState::Established || st.blocked || st.in_flight.len() >= self.window
        {
            return None;
        }
        if let Some((_, (to, reason))) = st
            .lost
            .range(..=st.next_to_send)
            .next_back()
            .filter(|(_, (to, _))| *to >= st.next_to_send)
        {
            return Some(Next::Lost {
                from: st.next_to_send,
                to: *to,
                reason: reason.clone(),
            });
        }
        if st.next_to_send > st.head {
            return None;
        }
        Some(Next::Records(st.next_to_send))
    }

    /// The driver sent a [`Lost`] declaration for `from ..= to` of `stream`.
    pub fn on_lost_sent(&mut self, stream: &str, from: u64, to: u64) -> Result<(), SessionError> {
        let st = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| protocol(format!("declaring a loss on undeclared stream {stream}")))?;
        if from != st.next_to_send || to < from {
            return Err(protocol(format!(
                "loss {from}..={to} of {stream} does not continue at {}",
                st.next_to_send
            )));
        }
        st.in_flight.push_back((from, to));
        st.next_to_send = to + 1;
        st.lost.retain(|_, (end, _)| *end > to);
        Ok(())
    }

    /// The driver put records `first ..= last` of `stream` on the wire.
    pub fn on_sent(&mut self, stream: &str, first: u64, last: u64) -> Result<(), SessionError> {
        let st = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| protocol(format!("sending on undeclared stream {stream}")))?;
        // A buffered batch may start below next_to_send when the exchange acked part
        // of it; the exchange trims the overlap by seq.
        if first > st.next_to_send || last < st.next_to_send || last > st.head {
            return Err(protocol(format!(
                "batch {first}..={last} of {stream} does not continue at {}",
                st.next_to_send
            )));
        }
        st.in_flight.push_back((first, last));
        st.next_to_send = last + 1;
        Ok(())
    }

    /// Applies a cumulative ack; returns the new watermark if it moved.
    pub fn handle_ack(&mut self, ack: &Ack) -> Result<Option<u64>, SessionError> {
        let st = self
            .streams
            .get_mut(&ack.stream)
            .ok_or_else(|| protocol(format!("ack for unknown stream {}", ack.stream)))?;
        if ack.up_to_seq >= st.next_to_send {
            return Err(protocol(format!(
                "ack up to {} of {} but only {} was sent",
                ack.up_to_seq,
                ack.stream,
                st.next_to_send - 1
            )));
        }
        // A declared loss below the local watermark (records the exchange lost
        // after acknowledging them) is acked without moving it: free its slot first.
        while st
            .in_flight
            .front()
            .is_some_and(|&(_, last)| last <= ack.up_to_seq)
        {
            st.in_flight.pop_front();
        }
        if ack.up_to_seq <= st.acked {
            return Ok(None);
        }
        st.acked = ack.up_to_seq;
        Ok(Some(ack.up_to_seq))
    }

    pub fn in_flight(&self, stream: &str) -> usize {
        self.streams.get(stream).map_or(0, |s| s.in_flight.len())
    }

    pub fn acked(&self, stream: &str) -> u64 {
        self.streams.get(stream).map_or(0, |s| s.acked)
    }
}

// ──────────────────────────── exchange end ────────────────────────────

/// Who is on the other end, as proven by its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub agent_id: String,
    pub department: String,
}

/// What the exchange does with a batch, given the next seq its store expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Every record is already stored: ack again, store nothing.
    Duplicate,
    /// Store the batch's records from index `skip` on.
    Store { skip: u32 },
    /// The batch starts past the next expected seq: refuse it (nothing is stored
    /// past a missing seq unless the agent declared the seqs between lost).
    Ahead { expected: u64 },
}

/// Dedup by seq: the one rule that makes retries harmless, and the strict one that
/// makes a missing seq impossible to skip by accident.
pub fn admit(next_expected: u64, first_seq: u64, record_count: u32) -> Admission {
    let last = first_seq + u64::from(record_count) - 1;
    if last < next_expected {
        Admission::Duplicate
    } else if first_seq <= next_expected {
        Admission::Store {
            skip: (next_expected - first_seq) as u32,
        }
    } else {
        Admission::Ahead {
            expected: next_expected,
        }
    }
}

/// What the exchange does with a declared loss of `from ..= to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossAdmission {
    /// Already past it: ack again.
    Duplicate,
    /// Record seqs `from ..= to` as lost and move the next expected seq past them.
    Record { from: u64, to: u64 },
    /// The declaration starts past the next expected seq: refuse it.
    Ahead { expected: u64 },
}

pub fn admit_loss(next_expected: u64, from: u64, to: u64) -> LossAdmission {
    if to < next_expected {
        LossAdmission::Duplicate
    } else if from <= next_expected {
        LossAdmission::Record {
            from: next_expected,
            to,
        }
    } else {
        LossAdmission::Ahead {
            expected: next_expected,
        }
    }
}

/// What the exchange holds of one (agent, stream), for judging a `Hello`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamRecord {
    /// Next expected seq, in the exchange's numbering (1: nothing stored).
    pub next_seq: u64,
    /// The buffer incarnation whose seqs continue the stream (empty: none yet).
    pub incarnation: String,
    /// That incarnation's seq `s` is stored as `s + offset` (0 unless an operator
    /// accepted a new buffer as a continuation).
    pub offset: u64,
    /// Why the stream is held, if it is.
    pub held: Option<String>,
}

/// The exchange's judgement of a declared stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continuity {
    /// The buffer the exchange knows: ship.
    Continue,
    /// A stream the exchange holds nothing of yet: remember this incarnation.
    Adopt,
    /// Hold the stream, for this reason, until an operator decides.
    Hold(String),
}

/// Whether a declared stream continues what the exchange holds. Pure, so both the
/// rule and its edge cases are tested without a server.
pub fn continuity(rec: &StreamRecord, decl: &StreamDecl) -> Continuity {
    if let Some(why) = &rec.held {
        return Continuity::Hold(why.clone());
    }
    let holds = rec.next_seq.saturating_sub(1);
    if rec.incarnation.is_empty() {
        return if holds == 0 {
            Continuity::Adopt
        } else {
            Continuity::Hold(format!(
                "the exchange holds seqs 1..={holds} of this stream from a buffer it cannot identify; buffer {} must be accepted or refused by an operator",
                decl.incarnation
            ))
        };
    }
    if rec.incarnation != decl.incarnation {
        return Continuity::Hold(format!(
            "a new buffer (incarnation {}) for a stream the exchange holds up to seq {holds} from buffer {}: the agent's data directory was wiped, reinstalled or replaced; its seqs would collide with the stored ones",
            decl.incarnation, rec.incarnation
        ));
    }
    let head = decl.head_seq.saturating_add(rec.offset);
    if head < holds {
        return Continuity::Hold(format!(
            "the agent's buffer reached seq {head} but the exchange holds up to {holds} from this same buffer: it was restored from a backup or the server was cloned; its new seqs would collide with stored ones"
        ));
    }
    Continuity::Continue
}

/// The exchange's seq after `first + count` (agent numbering) of a stream,
/// `None` when it would not fit in a u64: such a range is refused, never
/// admitted (the store and `admit` compute with it unchecked).
fn follows(plan: &StreamPlan, first: u64, count: u32) -> Option<u64> {
    first
        .checked_add(plan.offset)?
        .checked_add(u64::from(count))?
        .checked_add(1)
}

/// What the driver decided for one declared stream before `Welcome`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPlan {
    /// Next expected seq, in the exchange's numbering.
    pub next_seq: u64,
    pub offset: u64,
    pub held: Option<String>,
}

/// The exchange's side of one connection.
#[derive(Debug)]
pub struct ExchangeSession {
    peer: PeerIdentity,
    streams: Option<BTreeMap<String, StreamPlan>>,
}

impl ExchangeSession {
    pub fn new(peer: PeerIdentity) -> Self {
        Self {
            peer,
            streams: None,
        }
    }

    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Checks `Hello` against the certificate's identity and the sharing rules.
    /// `plan` tells, per declared stream, what the store expects next and whether
    /// the stream is held (see [`continuity`]).
    pub fn handle_hello(
        &mut self,
        hello: &Hello,
        plan: impl Fn(&StreamDecl) -> StreamPlan,
        max_frame: u32,
    ) -> Result<Welcome, SessionError> {
        self.check_hello(hello)?;
        let plans: BTreeMap<String, StreamPlan> = hello
            .streams
            .iter()
            .map(|d| (d.name.clone(), plan(d)))
            .collect();
        let welcome = Welcome {
            // Answered in the agent's version.
            version: hello.version,
            streams: plans
                .iter()
                .map(|(n, p)| crate::messages::StreamWelcome {
                    name: n.clone(),
                    // In the agent's numbering.
                    next_seq: p.next_seq.saturating_sub(p.offset).max(1),
                    held: p.held.clone().unwrap_or_default(),
                })
                .collect(),
            max_frame,
            max_window: DEFAULT_WINDOW,
            exchange: String::new(),
        };
        self.streams = Some(plans);
        Ok(welcome)
    }

    /// The checks of [`handle_hello`](Self::handle_hello) alone: version,
    /// identity, stream names, sharing classes, incarnations. A driver runs them
    /// before it records anything about the declared streams.
    pub fn check_hello(&self, hello: &Hello) -> Result<(), SessionError> {
        if self.streams.is_some() {
            return Err(protocol("second Hello on one connection"));
        }
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
            return Err(SessionError::Version {
                peer: hello.version,
                ours: format!("{MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"),
                advice: if hello.version > PROTOCOL_VERSION {
                    "the agent is newer than this exchange; upgrade the exchange before its agents"
                } else {
                    "this exchange no longer serves an agent that old; upgrade the agent"
                },
            });
        }
        if hello.agent_id != self.peer.agent_id {
            return Err(SessionError::Forbidden(format!(
                "Hello claims agent {:?} but the certificate belongs to {:?}",
                hello.agent_id, self.peer.agent_id
            )));
        }
        if hello.department != self.peer.department {
            return Err(SessionError::Forbidden(format!(
                "Hello claims department {:?} but the certificate says {:?}",
                hello.department, self.peer.department
            )));
        }
        let mut names = BTreeSet::new();
        for s in &hello.streams {
            if s.incarnation.is_empty() || s.incarnation.len() > 64 {
                return Err(protocol(format!(
                    "stream {} declares no valid buffer incarnation",
                    s.name
                )));
            }
            if !valid_stream_name(&s.name) {
                return Err(protocol(format!("invalid stream name {:?}", s.name)));
            }
            match Sharing::try_from(s.sharing) {
                Ok(Sharing::Unconditional | Sharing::Conditional) => {}
                Ok(Sharing::NotShared) => {
                    return Err(SessionError::Forbidden(format!(
                        "stream {} is declared not-shared (不予共享); its data may not leave the department",
                        s.name
                    )))
                }
                _ => {
                    return Err(protocol(format!(
                        "stream {} declares no sharing class",
                        s.name
                    )))
                }
            }
            if s.catalog_id.is_empty() {
                return Err(protocol(format!(
                    "stream {} declares no catalog id",
                    s.name
                )));
            }
            if !names.insert(s.name.clone()) {
                return Err(protocol(format!("stream {} declared twice", s.name)));
            }
        }
        Ok(())
    }

    fn plan(&self, stream: &str) -> Result<&StreamPlan, SessionError> {
        let Some(streams) = &self.streams else {
            return Err(protocol("data before Hello"));
        };
        let plan = streams.get(stream).ok_or_else(|| {
            SessionError::Forbidden(format!(
                "agent {} did not declare stream {stream:?}",
                self.peer.agent_id
            ))
        })?;
        if let Some(reason) = &plan.held {
            return Err(SessionError::Held {
                stream: stream.to_string(),
                reason: reason.clone(),
            });
        }
        Ok(plan)
    }

    /// The exchange's number for the agent's seq `seq` of `stream`.
    pub fn store_seq(&self, stream: &str, seq: u64) -> u64 {
        let offset = self.plan(stream).map_or(0, |p| p.offset);
        seq.saturating_add(offset)
    }

    /// The agent's number for the exchange's seq `seq` of `stream` (for acks).
    pub fn agent_seq(&self, stream: &str, seq: u64) -> u64 {
        let offset = self.plan(stream).map_or(0, |p| p.offset);
        seq.saturating_sub(offset)
    }

    /// Checks a loss declaration: handshake done, stream declared and not held,
    /// a sane range whose end, in the exchange's numbering, leaves room for a
    /// next seq.
    pub fn handle_lost(&self, lost: &Lost) -> Result<(), SessionError> {
        let plan = self.plan(&lost.stream)?;
        if lost.from_seq == 0 || lost.to_seq < lost.from_seq {
            return Err(protocol(format!(
                "loss of {} from {} to {}",
                lost.stream, lost.from_seq, lost.to_seq
            )));
        }
        follows(plan, lost.to_seq, 0).ok_or_else(|| {
            protocol(format!(
                "loss of {} up to {} overflows the seq range",
                lost.stream, lost.to_seq
            ))
        })?;
        Ok(())
    }

    /// Checks that a batch may be stored: handshake done, stream declared by this
    /// agent, sane header. Dedup happens at the store with [`admit`].
    pub fn handle_batch(&self, batch: &Batch) -> Result<(), SessionError> {
        let plan = self.plan(&batch.stream)?;
        if batch.first_seq == 0 || batch.record_count == 0 {
            return Err(protocol(format!(
                "batch of {} with first_seq {} and {} records",
                batch.stream, batch.first_seq, batch.record_count
            )));
        }
        // In the exchange's numbering (the agent's plus an accepted offset): the
        // store computes `last + 1` from it.
        if follows(plan, batch.first_seq, batch.record_count).is_none() {
            return Err(protocol("batch seq range overflows"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
