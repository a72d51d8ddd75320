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
//!   ◀───────────── Ack{stream, up_to_seq}    (only after the store is durable)
//!   handle_ack: cumulative, never backwards
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::messages::{Ack, Batch, ErrorCode, Hello, Sharing, Welcome};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Default number of unacknowledged batches per stream.
pub const DEFAULT_WINDOW: u32 = 16;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("incompatible protocol version {peer} (this end speaks {ours})")]
    Version { peer: u32, ours: u32 },
}

impl SessionError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Protocol(_) => ErrorCode::Protocol,
            SessionError::Forbidden(_) => ErrorCode::Forbidden,
            SessionError::Version { .. } => ErrorCode::Version,
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
}

impl ResumeVerdict {
    /// Whether the stream may ship after this verdict.
    pub fn may_send(&self) -> bool {
        !matches!(self, ResumeVerdict::AgentBehind { .. })
    }
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
#[derive(Debug, Clone, Copy)]
pub struct LocalStream {
    pub acked: u64,
    pub head: u64,
}

impl AgentSession {
    /// `local` gives, for each stream declared in `hello`, what the buffer knows.
    pub fn new(hello: Hello, local: &BTreeMap<String, LocalStream>) -> Self {
        let streams = hello
            .streams
            .iter()
            .map(|d| {
                let l = local
                    .get(&d.name)
                    .copied()
                    .unwrap_or(LocalStream { acked: 0, head: 0 });
                (
                    d.name.clone(),
                    SendState {
                        acked: l.acked,
                        head: l.head.max(l.acked),
                        next_to_send: l.acked + 1,
                        in_flight: VecDeque::new(),
                        blocked: true,
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
                ours: PROTOCOL_VERSION,
            });
        }
        if welcome.max_window > 0 {
            self.window = self.window.min(welcome.max_window as usize);
        }
        let offered: BTreeMap<&str, u64> = welcome
            .streams
            .iter()
            .map(|s| (s.name.as_str(), s.next_seq))
            .collect();
        let mut verdicts = Vec::new();
        for (name, st) in self.streams.iter_mut() {
            let Some(&next) = offered.get(name.as_str()) else {
                return Err(protocol(format!("Welcome does not mention stream {name}")));
            };
            if next == 0 {
                return Err(protocol(format!("Welcome offers seq 0 for stream {name}")));
            }
            let exchange_acked = next - 1;
            let verdict = if exchange_acked > st.head {
                ResumeVerdict::AgentBehind {
                    exchange_next: next,
                    local_head: st.head,
                }
            } else if exchange_acked < st.acked {
                ResumeVerdict::ExchangeBehind {
                    exchange_next: next,
                    local_acked: st.acked,
                }
            } else if exchange_acked > st.acked {
                st.acked = exchange_acked;
                ResumeVerdict::AckedAhead {
                    up_to: exchange_acked,
                }
            } else {
                ResumeVerdict::InStep
            };
            st.next_to_send = st.acked + 1;
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

    /// The next seq to send on `stream`, if the window has room and there is
    /// something durable to send.
    pub fn poll_send(&self, stream: &str) -> Option<u64> {
        let st = self.streams.get(stream)?;
        if self.state != AgentState::Established
            || st.blocked
            || st.in_flight.len() >= self.window
            || st.next_to_send > st.head
        {
            return None;
        }
        Some(st.next_to_send)
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
        if ack.up_to_seq <= st.acked {
            return Ok(None);
        }
        st.acked = ack.up_to_seq;
        while st
            .in_flight
            .front()
            .is_some_and(|&(_, last)| last <= ack.up_to_seq)
        {
            st.in_flight.pop_front();
        }
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
    /// Store the batch's records from index `skip` on. If `gap_from` is set, seqs
    /// `gap_from .. first_seq` never arrived: record the gap.
    Store { skip: u32, gap_from: Option<u64> },
}

/// Dedup by seq: the one rule that makes retries harmless.
pub fn admit(next_expected: u64, first_seq: u64, record_count: u32) -> Admission {
    let last = first_seq + u64::from(record_count) - 1;
    if last < next_expected {
        Admission::Duplicate
    } else if first_seq < next_expected {
        Admission::Store {
            skip: (next_expected - first_seq) as u32,
            gap_from: None,
        }
    } else if first_seq == next_expected {
        Admission::Store {
            skip: 0,
            gap_from: None,
        }
    } else {
        Admission::Store {
            skip: 0,
            gap_from: Some(next_expected),
        }
    }
}

/// The exchange's side of one connection.
#[derive(Debug)]
pub struct ExchangeSession {
    peer: PeerIdentity,
    streams: Option<BTreeSet<String>>,
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
    /// `next_seq` tells, per stream, what the store expects next.
    pub fn handle_hello(
        &mut self,
        hello: &Hello,
        next_seq: impl Fn(&str) -> u64,
        max_frame: u32,
    ) -> Result<Welcome, SessionError> {
        if self.streams.is_some() {
            return Err(protocol("second Hello on one connection"));
        }
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
            return Err(SessionError::Version {
                peer: hello.version,
                ours: PROTOCOL_VERSION,
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
        let welcome = Welcome {
            // Answered in the agent's version.
            version: hello.version,
            streams: names
                .iter()
                .map(|n| crate::messages::StreamWelcome {
                    name: n.clone(),
                    next_seq: next_seq(n),
                })
                .collect(),
            max_frame,
            max_window: DEFAULT_WINDOW,
            exchange: String::new(),
        };
        self.streams = Some(names);
        Ok(welcome)
    }

    /// Checks that a batch may be stored: handshake done, stream declared by this
    /// agent, sane header. Dedup happens at the store with [`admit`].
    pub fn handle_batch(&self, batch: &Batch) -> Result<(), SessionError> {
        let Some(streams) = &self.streams else {
            return Err(protocol("Batch before Hello"));
        };
        if !streams.contains(&batch.stream) {
            return Err(SessionError::Forbidden(format!(
                "agent {} did not declare stream {:?}",
                self.peer.agent_id, batch.stream
            )));
        }
        if batch.first_seq == 0 || batch.record_count == 0 {
            return Err(protocol(format!(
                "batch of {} with first_seq {} and {} records",
                batch.stream, batch.first_seq, batch.record_count
            )));
        }
        if batch
            .first_seq
            .checked_add(u64::from(batch.record_count))
            .is_none()
        {
            return Err(protocol("batch seq range overflows"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
