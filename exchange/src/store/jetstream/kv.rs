//! Key-value buckets: revision-checked reads and writes, and listing the keys
//! under a prefix.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Inner;
use crate::store::StoreError;

/// One bucket and the stream under it (for listing).
pub(super) struct Bucket {
    pub name: String,
    kv: kv::Store,
    stream: stream::Stream,
}

impl Bucket {
    /// Opens the bucket, creating it if missing. The bucket's stream is made
    /// here as the key-value API makes it (`KV_NAME`, subjects `$KV.NAME.>`,
    /// one value per key, direct gets), rather than with the client's
    /// `create_key_value`, which first reads account details that servers
    /// before 2.10 report in a form this client cannot read.
    pub async fn open(
        js: &jetstream::Context,
        name: &str,
        replicas: usize,
    ) -> Result<Bucket, String> {
        let stream_name = format!("KV_{name}");
        let stream = match js.get_stream(&stream_name).await {
            Ok(s) => s,
            Err(_) => {
                let created = js
                    .create_stream(stream::Config {
                        name: stream_name.clone(),
                        description: Some("Ferry exchange state".into()),
                        subjects: vec![format!("$KV.{name}.>")],
                        max_messages_per_subject: 1,
                        storage: stream::StorageType::File,
                        num_replicas: replicas,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(s) => s,
                    // Another node may have created it meanwhile.
                    Err(e) => js
                        .get_stream(&stream_name)
                        .await
                        .map_err(|_| format!("creating it: {e}"))?,
                }
            }
        };
        let kv = js.get_key_value(name).await.map_err(|e| e.to_string())?;
        Ok(Bucket {
            name: name.to_string(),
            kv,
            stream,
        })
    }
}

impl Inner {
    /// The value under `key` (`None` inside if deleted) and its revision.
    pub(super) async fn kv_get<T: DeserializeOwned>(
        &self,
        b: &Bucket,
        key: &str,
    ) -> Result<Option<(Option<T>, u64)>, StoreError> {
        let entry =
            b.kv.entry(key)
                .await
                .map_err(|e| self.remote(format!("reading {key} from {}", b.name), e))?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        if entry.operation != Operation::Put {
            return Ok(Some((None, entry.revision)));
        }
        let v = serde_json::from_slice(&entry.value)
            .map_err(|e| StoreError::Damaged(format!("{key} in bucket {}: {e}", b.name)))?;
        Ok(Some((Some(v), entry.revision)))
    }

    /// Writes `value` under `key` if it is still at `revision` (`None`: if it
    /// does not exist). `false` when another writer changed it first.
    pub(super) async fn kv_write<T: Serialize>(
        &self,
        b: &Bucket,
        key: &str,
        value: &T,
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        let v = serde_json::to_vec(value).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let what = || format!("writing {key} to {}", b.name);
        match revision {
            None => match b.kv.create(key, v.into()).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(self.remote(what(), e)),
            },
            Some(rev) => match b.kv.update(key, v.into(), rev).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(self.remote(what(), e)),
            },
        }
    }

    /// Writes `value` under `key`, whatever was there (the registry: each
    /// heartbeat rebuilds its record).
    pub(super) async fn kv_put<T: Serialize>(
        &self,
        b: &Bucket,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let v = serde_json::to_vec(value).map_err(|e| StoreError::Invalid(e.to_string()))?;
        b.kv.put(key, v.into())
            .await
            .map(drop)
            .map_err(|e| self.remote(format!("writing {key} to {}", b.name), e))
    }

    /// Deletes `key` (a delete marker: readers then find nothing).
    pub(super) async fn kv_delete(&self, b: &Bucket, key: &str) -> Result<(), StoreError> {
        b.kv.delete(key)
            .await
            .map_err(|e| self.remote(format!("deleting {key} from {}", b.name), e))
    }

    /// Every key matching `filter` (a subject pattern over keys, `>` for all)
    /// with its current value; deleted keys are left out.
    pub(super) async fn kv_scan(
        &self,
        b: &Bucket,
        filter: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = format!("$KV.{}.", b.name);
        let what = || format!("listing {filter} in {}", b.name);
        let c = b
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{prefix}{filter}"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| self.remote(what(), e))?;
        let mut out = Vec::new();
        if c.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = c.messages().await.map_err(|e| self.remote(what(), e))?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .map_err(|_| self.remote(what(), "no message within 30 s"))?
                .ok_or_else(|| self.remote(what(), "the listing ended early"))?
                .map_err(|e| self.remote(what(), e))?;
            let pending = m.info().map_err(|e| self.remote(what(), e))?.pending;
            let deleted = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|v| v.as_str() != "PUT");
            if !deleted {
                if let Some(key) = m.subject.as_str().strip_prefix(&prefix) {
                    out.push((key.to_string(), m.payload.to_vec()));
                }
            }
            if pending == 0 {
                return Ok(out);
            }
        }
    }
}
