//! Users (bucket `STREAM_users`, one key per user name) and the audit log
//! (stream `STREAM_audit`, one message per entry on subject `STREAM.audit`).
//!
//! # Appending to the audit log from several nodes
//! An append reads the subject's last message from the stream leader (its
//! stream sequence `L` and the entry in it), makes the next entry, and
//! publishes it with `Nats-Expected-Last-Subject-Sequence: L`. The server
//! stores it only if `L` is still the subject's last message, so of the
//! nodes that read the same last entry exactly one appends after it: seqs are
//! never taken twice and the chain never forks. The others are told
//! wrong-last-sequence and start again from the new last entry.
//!
//! When the outcome is unknown (a timeout, a lost connection) the appender
//! reads the message right after `L` on the subject: the entry that took the
//! slot. If it is this append's entry (the same hash) the append succeeded;
//! if it is another, this entry can never be stored (its condition is gone)
//! and the append starts again; if the slot is empty the same entry is
//! published again, on the same condition, so at most one copy lands.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

use super::names::{self, Names};
use super::Inner;
use crate::store::{now_unix_ms, AuditEntry, StoreError, User};

/// Conflicts and unanswered publishes tolerated by one append.
const MAX_ATTEMPTS: u32 = 64;

/// The audit stream, created if missing.
pub(super) async fn ensure_audit_stream(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<stream::Stream, String> {
    let name = names.audit_stream();
    let stream = super::open_stream(
        js,
        &name,
        "Ferry: the exchange's audit log, hash-chained",
        names.audit_subject(),
        replicas,
    )
    .await?;
    if !stream
        .cached_info()
        .config
        .subjects
        .contains(&names.audit_subject())
    {
        return Err(format!(
            "stream {name} exists without subject {}; this exchange keeps its audit log there (name another [store] stream, or fix that one)",
            names.audit_subject()
        ));
    }
    Ok(stream)
}

impl Inner {
    pub(super) async fn put_user(&self, user: &User) -> Result<(), StoreError> {
        self.kv_put(&self.users, &names::encode(&user.name), user)
            .await
    }

    pub(super) async fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .kv_get::<User>(&self.users, &names::encode(name))
            .await?
            .and_then(|(v, _)| v))
    }

    pub(super) async fn users(&self) -> Result<Vec<User>, StoreError> {
        self.kv_scan(&self.users, ">")
            .await?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v).map_err(|e| {
                    StoreError::Damaged(format!("user {k} in bucket {}: {e}", self.users.name))
                })
            })
            .collect()
    }

    pub(super) async fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        let key = names::encode(name);
        match self.kv_get::<serde_json::Value>(&self.users, &key).await? {
            Some((Some(_), _)) => {
                self.kv_delete(&self.users, &key).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The audit entry in `m`.
    fn audit_entry(&self, payload: &[u8], sequence: u64) -> Result<AuditEntry, StoreError> {
        serde_json::from_slice(payload).map_err(|e| {
            StoreError::Damaged(format!(
                "audit entry at stream sequence {sequence} of {}: {e}",
                self.names.audit_stream()
            ))
        })
    }

    /// The last entry and its stream sequence (0 and `None`: the log is empty),
    /// from the stream leader.
    async fn last_audit(&self) -> Result<(u64, Option<AuditEntry>), StoreError> {
        let subject = self.names.audit_subject();
        match self.audit.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok((m.sequence, Some(self.audit_entry(&m.payload, m.sequence)?))),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok((0, None)),
            Err(e) => Err(self.remote("reading the last audit entry", e)),
        }
    }

    /// The entry that took the slot after stream sequence `last`, if any.
    async fn audit_after(&self, last: u64) -> Result<Option<AuditEntry>, StoreError> {
        let subject = self.names.audit_subject();
        match self
            .audit
            .raw_message_builder()
            .next_by_subject(&subject)
            .sequence(last + 1)
            .send()
            .await
        {
            Ok(m) => Ok(Some(self.audit_entry(&m.payload, m.sequence)?)),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(self.remote("reading an audit entry", e)),
        }
    }

    pub(super) async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<AuditEntry, StoreError> {
        let subject = self.names.audit_subject();
        // The entry being appended and the stream sequence it must follow.
        let mut attempt: Option<(u64, AuditEntry)> = None;
        let mut last_error = String::new();
        for n in 0..MAX_ATTEMPTS {
            if n > 0 {
                // Apart from the appender that won, so the next round has one winner too.
                let jitter = rand::random::<u64>() % (5 * u64::from(n.min(10)) + 1);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let (expected, entry) = match attempt.take() {
                Some((expected, entry)) => match self.audit_after(expected).await? {
                    Some(taken) if taken.hash == entry.hash => return Ok(entry),
                    // Someone else's entry took the slot: start again after the last.
                    Some(_) => {
                        self.fresh_audit_entry(actor, action, target, &detail)
                            .await?
                    }
                    // Nothing took it: the same entry again, on the same condition.
                    None => (expected, entry),
                },
                None => {
                    self.fresh_audit_entry(actor, action, target, &detail)
                        .await?
                }
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            let payload =
                serde_json::to_vec(&entry).map_err(|e| StoreError::Invalid(e.to_string()))?;
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await;
            let ack = match sent {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(ack) if ack.stream == self.names.audit_stream() && ack.sequence > expected => {
                    return Ok(entry)
                }
                Ok(ack) => {
                    return Err(self.remote(
                        format!("appending to the audit log on {subject}"),
                        format!(
                            "the server acknowledged it in stream {} at sequence {} (expected after {expected} in {})",
                            ack.stream,
                            ack.sequence,
                            self.names.audit_stream()
                        ),
                    ))
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    return Err(self.remote(
                        format!("appending to the audit log on {subject}"),
                        format!(
                            "no stream takes it ({e}); was stream {} deleted?",
                            self.names.audit_stream()
                        ),
                    ))
                }
                Err(e) => {
                    last_error = e.to_string();
                    attempt = Some((expected, entry));
                }
            }
        }
        Err(self.remote(
            format!("appending to the audit log on {subject}"),
            format!("no append succeeded in {MAX_ATTEMPTS} attempts; last: {last_error}"),
        ))
    }

    /// The next entry after the log's current last one, and that one's stream sequence.
    async fn fresh_audit_entry(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> Result<(u64, AuditEntry), StoreError> {
        let (last, prev) = self.last_audit().await?;
        Ok((
            last,
            AuditEntry::next(
                prev.as_ref(),
                now_unix_ms(),
                actor,
                action,
                target,
                detail.clone(),
            ),
        ))
    }

    /// At most `limit` entries from seq `from` on. The stream holds only the
    /// audit subject, appended one after the other, so an entry's stream
    /// sequence is its seq; should it not be (a stream made by hand), the read
    /// starts again from the beginning.
    pub(super) async fn audit(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let from = from.max(1);
        let mut out = self.audit_run(from, from, limit).await?;
        if from > 1 && out.first().is_some_and(|e| e.seq > from) {
            out = self.audit_run(1, from, limit).await?;
        }
        Ok(out)
    }

    /// Entries with seq `from` or more, read from stream sequence `start` on.
    async fn audit_run(
        &self,
        start: u64,
        from: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let what = || format!("reading the audit log from seq {from}");
        let c = self
            .audit
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.names.audit_subject(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| self.remote(what(), e))?;
        if c.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = c.messages().await.map_err(|e| self.remote(what(), e))?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .map_err(|_| self.remote(what(), "no message within 30 s"))?
                .ok_or_else(|| self.remote(what(), "the log ended early"))?
                .map_err(|e| self.remote(what(), e))?;
            let info = m.info().map_err(|e| self.remote(what(), e))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            let e = self.audit_entry(&m.payload, sequence)?;
            if e.seq >= from {
                out.push(e);
            }
            if pending == 0 || out.len() >= limit {
                return Ok(out);
            }
        }
    }
}
