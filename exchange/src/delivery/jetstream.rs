//! `kind = "jetstream"`: records published on per-stream subjects of a NATS
//! JetStream, exactly once by the same means as the JetStream store. Each
//! message carries the records of a seq range as JSON lines (the shape
//! `ferry-exchange records` prints), with `Ferry-First-Seq` and `Ferry-Last-Seq`
//! headers; every publish is conditional on the subject's last message
//! (`Nats-Expected-Last-Subject-Sequence`). The checkpoint is the subject's
//! last message itself: its `Ferry-Last-Seq`, so there is nothing to keep in
//! step, and a crash between two publishes of a chunk resumes after the last
//! one that was acknowledged.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind};
use ferry_protocol::messages::Record;

use super::DeliveryError;
use crate::config::DeliverySection;
use crate::store::{subject_token, SharedStore};

/// Room left in a message for its headers.
const HEADROOM: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct JsSink {
    js: jetstream::Context,
    subject: String,
    /// Per (agent, stream): the subject's last stream sequence and Ferry-Last-Seq.
    last: HashMap<(String, String), (u64, u64)>,
    max_message: usize,
    /// The JetStream stream the subjects belong to.
    name: String,
}

fn retry(what: &str) -> impl Fn(String) -> DeliveryError + '_ {
    move |e| DeliveryError::Retry(format!("{what}: {e}"))
}

impl JsSink {
    pub async fn open(d: &DeliverySection) -> Result<JsSink, DeliveryError> {
        let url = d.url.as_deref().unwrap_or_default();
        let client = tokio::time::timeout(TIMEOUT, async_nats::connect(url))
            .await
            .map_err(|_| DeliveryError::Retry(format!("connecting to {url}: timed out")))?
            .map_err(|e| DeliveryError::Retry(format!("connecting to {url}: {e}")))?;
        let max_message = (client.server_info().max_payload)
            .saturating_sub(HEADROOM)
            .max(4096);
        let js = jetstream::new(client);
        let name = d.jetstream_stream.clone();
        let subject = d.subject.clone();
        let wildcard = subject
            .replace("{delivery}", &subject_token(&d.name))
            .replace("{agent}", "*")
            .replace("{stream}", "*");
        js.get_or_create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![wildcard],
            ..Default::default()
        })
        .await
        .map_err(|e| retry("opening the JetStream stream")(format!("{name}: {e}")))?;
        Ok(JsSink {
            js,
            subject: subject.replace("{delivery}", &subject_token(&d.name)),
            last: HashMap::new(),
            max_message,
            name,
        })
    }

    fn subject_of(&self, agent: &str, stream: &str) -> String {
        self.subject
            .replace("{agent}", &subject_token(agent))
            .replace("{stream}", &subject_token(stream))
    }

    /// The subject's last message: (stream sequence, Ferry-Last-Seq).
    async fn last_of(&mut self, agent: &str, stream: &str) -> Result<(u64, u64), DeliveryError> {
        let key = (agent.to_string(), stream.to_string());
        if let Some(&l) = self.last.get(&key) {
            return Ok(l);
        }
        let subject = self.subject_of(agent, stream);
        let s = self
            .js
            .get_stream(self.stream_name())
            .await
            .map_err(|e| DeliveryError::Retry(e.to_string()))?;
        let l = match s.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => {
                let seq = m
                    .headers
                    .get("Ferry-Last-Seq")
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .ok_or_else(|| {
                        DeliveryError::Fatal(format!(
                            "the last message on {subject} has no Ferry-Last-Seq header: another publisher writes this subject"
                        ))
                    })?;
                (m.sequence, seq)
            }
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => (0, 0),
            Err(e) => return Err(DeliveryError::Retry(format!("reading {subject}: {e}"))),
        };
        self.last.insert(key, l);
        Ok(l)
    }

    fn stream_name(&self) -> String {
        self.name.clone()
    }

    pub async fn checkpoint(&mut self, agent: &str, stream: &str) -> Result<u64, DeliveryError> {
        Ok(self.last_of(agent, stream).await?.1)
    }

    pub async fn apply(
        &mut self,
        store: &SharedStore,
        agent: &str,
        stream: &str,
        records: Vec<(u64, Record)>,
        stored: Vec<u64>,
        last: u64,
    ) -> Result<(), DeliveryError> {
        let subject = self.subject_of(agent, stream);
        let (mut seq_on_subject, done) = self.last_of(agent, stream).await?;
        // Rendered as `records` prints them, cut into messages that fit.
        let mut messages: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        let mut body = Vec::new();
        let mut first = done + 1;
        {
            let store = store.clone();
            let (a, st) = (agent.to_string(), stream.to_string());
            let rendered = tokio::task::spawn_blocking(move || {
                records
                    .into_iter()
                    .zip(stored)
                    .filter(|((seq, _), _)| *seq > done)
                    .map(|((seq, r), stored_ms)| {
                        let file = |id: &str| store.file(&a, &st, id).ok().flatten();
                        let mut out = Vec::new();
                        for l in crate::records::record_lines(seq, &r, stored_ms, &file) {
                            out.extend_from_slice(l.to_string().as_bytes());
                            out.push(b'\n');
                        }
                        (seq, out)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| DeliveryError::Retry(e.to_string()))?;
            for (seq, lines) in rendered {
                if lines.len() > self.max_message {
                    return Err(DeliveryError::Fatal(format!(
                        "record {seq} of {agent}/{stream} renders to {} bytes, more than a message of this server may carry ({})",
                        lines.len(),
                        self.max_message
                    )));
                }
                if !body.is_empty() && body.len() + lines.len() > self.max_message {
                    messages.push((first, seq - 1, std::mem::take(&mut body)));
                    first = seq;
                }
                body.extend_from_slice(&lines);
            }
        }
        // Records this delivery does not take are not published; the last
        // message's Ferry-Last-Seq covers them.
        if !body.is_empty() {
            messages.push((first, last, body));
        }
        for (from, to, payload) in messages {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Ferry-First-Seq", from.to_string().as_str());
            h.insert("Ferry-Last-Seq", to.to_string().as_str());
            h.insert(
                "Nats-Expected-Last-Subject-Sequence",
                seq_on_subject.to_string().as_str(),
            );
            let sent = self
                .js
                .publish_with_headers(subject.clone(), h, payload.into())
                .await;
            let acked = match sent {
                Ok(f) => tokio::time::timeout(TIMEOUT, f).await.map_err(|_| {
                    DeliveryError::Retry(format!("publishing to {subject}: no acknowledgement"))
                })?,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => {
                    seq_on_subject = ack.sequence;
                    self.last
                        .insert((agent.to_string(), stream.to_string()), (ack.sequence, to));
                }
                Err(e) => {
                    // Unknown or refused: the next call reads the subject's last
                    // message again, which is the truth.
                    self.last.remove(&(agent.to_string(), stream.to_string()));
                    let wrong_last = matches!(e.kind(), PublishErrorKind::WrongLastSequence);
                    return Err(DeliveryError::Retry(format!(
                        "publishing to {subject}{}: {e}",
                        if wrong_last {
                            " (another publisher moved the subject)"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }
        Ok(())
    }
}
