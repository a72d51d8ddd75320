//! What is read and changed by key: each stream's metadata (incarnation,
//! holds, boundaries, declared classes) and the fleet registry. Every change
//! of a stream's metadata is revision-checked: two nodes deciding on one
//! stream at once cannot overwrite each other; the later one reads again and
//! decides again.

use ferry_protocol::messages::StreamDecl;
use ferry_protocol::session::StreamPlan;
use futures_util::StreamExt;
use tracing::error;

use super::{names, Inner};
use crate::store::*;

impl Inner {
    /// The stream's metadata and its revision.
    pub(super) async fn meta_entry(
        &self,
        agent: &str,
        stream: &str,
    ) -> Result<(StreamMeta, Option<u64>), StoreError> {
        let key = names::stream_key(agent, stream);
        Ok(match self.kv_get::<StreamMeta>(&self.meta, &key).await? {
            Some((m, rev)) => (m.unwrap_or_default(), Some(rev)),
            None => (StreamMeta::default(), None),
        })
    }

    /// Reads the stream's metadata, lets `f` change it, and writes it back only
    /// if no other node changed it meanwhile (else reads again and retries).
    /// `f` returns whether to write, and what to return.
    pub(super) async fn update_meta<R>(
        &self,
        agent: &str,
        stream: &str,
        mut f: impl FnMut(&mut StreamMeta) -> Result<(bool, R), StoreError> + Send,
    ) -> Result<(R, StreamMeta), StoreError> {
        let key = names::stream_key(agent, stream);
        for _ in 0..50 {
            let (mut meta, rev) = self.meta_entry(agent, stream).await?;
            let (write, r) = f(&mut meta)?;
            if !write || self.kv_write(&self.meta, &key, &meta, rev).await? {
                return Ok((r, meta));
            }
        }
        Err(self.remote(
            format!("updating the record of {agent}/{stream}"),
            "other nodes kept changing it",
        ))
    }

    pub(super) async fn plan_stream(
        &self,
        agent: &str,
        decl: &StreamDecl,
    ) -> Result<StreamPlan, StoreError> {
        let next_seq = self.fresh_next(agent, &decl.name).await?;
        let (held, meta) = self
            .update_meta(agent, &decl.name, |meta| {
                let judged = meta.judge(next_seq, decl);
                Ok((
                    judged.changed,
                    judged.held.map(|reason| (reason, judged.newly_held)),
                ))
            })
            .await?;
        let held = held.map(|(reason, new)| {
            if new {
                error!(agent, stream = %decl.name, %reason, "ALARM: stream held until an operator runs `ferry-exchange resolve`");
            }
            reason
        });
        Ok(StreamPlan {
            next_seq,
            offset: meta.offset,
            held,
        })
    }

    pub(super) async fn resolve(
        &self,
        agent: &str,
        stream: &str,
        decision: &Decision,
    ) -> Result<StreamMeta, StoreError> {
        let next_seq = self.fresh_next(agent, stream).await?;
        let ((), meta) = self
            .update_meta(agent, stream, |meta| {
                meta.resolve(agent, stream, next_seq, decision)?;
                Ok((true, ()))
            })
            .await?;
        Ok(meta)
    }

    pub(super) async fn holds(&self) -> Result<Vec<(String, String, Hold)>, StoreError> {
        let mut out = Vec::new();
        for (key, v) in self.kv_scan(&self.meta, ">").await? {
            let Ok(meta) = serde_json::from_slice::<StreamMeta>(&v) else {
                continue;
            };
            let (Some(hold), Some((agent, stream))) = (meta.hold, names::parse_stream_key(&key))
            else {
                continue;
            };
            out.push((agent, stream, hold));
        }
        Ok(out)
    }

    pub(super) async fn streams(&self) -> Result<Vec<StreamInfo>, StoreError> {
        let mut subjects = Vec::new();
        let mut list = self
            .stream
            .info_with_subjects(self.names.record_filter())
            .await
            .map_err(|e| self.remote("listing the record subjects", e))?;
        while let Some(item) = list.next().await {
            let (subject, _) = item.map_err(|e| self.remote("listing the record subjects", e))?;
            if let Some(pair) = self.names.parse_subject(&subject) {
                subjects.push(pair);
            }
        }
        subjects.sort();
        let mut out = Vec::new();
        for (agent, stream) in subjects {
            let next_seq = self.next_expected(&agent, &stream).await?;
            let (meta, _) = self.meta_entry(&agent, &stream).await?;
            out.push(StreamInfo {
                agent,
                stream,
                next_seq,
                meta,
            });
        }
        Ok(out)
    }

    pub(super) async fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.kv_put(&self.agents, &names::encode(&rec.agent_id), rec)
            .await
    }

    pub(super) async fn agent(&self, agent: &str) -> Result<Option<AgentRecord>, StoreError> {
        Ok(self
            .kv_get::<AgentRecord>(&self.agents, &names::encode(agent))
            .await?
            .and_then(|(v, _)| v))
    }

    pub(super) async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        Ok(self
            .kv_scan(&self.agents, ">")
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }
}
