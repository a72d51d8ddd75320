//! The JetStream backend: the exchange's system of record on a NATS JetStream
//! server or cluster, shared by any number of exchange nodes.
//!
//! # Layout
//! One JetStream stream (`[store] stream`, default `FERRY`) holds every record
//! message; key-value buckets hold what is read and changed by key:
//! ```text
//! where                              key                   value
//! stream FERRY, subject              (one subject per      record messages, in seq order
//!   FERRY.rec.AGENT.STREAM            agent and stream)    (headers and payloads: wire.rs)
//! bucket FERRY_meta                  AGENT.STREAM          StreamMeta (JSON): incarnation,
//!                                                          offset, hold, boundaries, classes
//! bucket FERRY_files                 AGENT.STREAM.FILE     FileRecord (JSON) + the seq of the
//!                                                          file's first chunk + the last seq
//!                                                          applied to it
//! bucket FERRY_gaps                  AGENT.STREAM          [Gap] (JSON): declared losses
//! bucket FERRY_rejected              AGENT.STREAM          [{seq, file_id}]: files whose bytes
//!                                                          did not match their SHA-256
//! bucket FERRY_agents                AGENT                 AgentRecord (JSON): the registry
//! bucket FERRY_users                 USER                  User (JSON): users of the exchange
//! stream FERRY_audit, subject        (one subject)         AuditEntry (JSON), one per message,
//!   FERRY.audit                                            in seq order (users.rs)
//! ```
//! `AGENT`, `STREAM` and `FILE` are names made into one subject token each
//! (`names.rs`). File bytes stay in the record messages (any node reads them);
//! `open_file` reads them back from the file's first chunk on. The CA, issued
//! certificates and revocations are not here: they stay in the files under
//! `[tls] trust_dir`, which nodes share through the operator's configuration
//! management (the CA key must stay off serving hosts).
//!
//! # Invariants
//! * **A seq is stored at most once, with no time-limited window.** Every
//!   publish carries `Nats-Expected-Last-Subject-Sequence`: the stream sequence
//!   of the subject's last message as this node knows it. The server stores the
//!   message only if that is still the subject's last one, so two nodes, or a
//!   retry after a crash between publish and acknowledgement, can never store a
//!   seq twice. On a wrong-last-sequence answer the node re-reads the subject's
//!   last message (from the stream leader), takes the next seq from its headers
//!   and judges the batch again with [`ferry_protocol::session::admit`]: a
//!   duplicate is acked, a batch ahead is refused (`Resend`).
//! * **Nothing past a missing seq**: the same admission as the embedded store;
//!   after a refused item a stream's later items in the group are refused.
//! * **An ack means JetStream acknowledged** every message of the batch, and the
//!   server syncs before it acknowledges (checked at open from its monitoring
//!   endpoint: `sync_interval: always`; see `varz.rs`). A message outcome that
//!   is unknown (a timeout, a lost connection) is resolved by re-reading the
//!   subject's last message; the batch is acked only if the seqs are there. The
//!   conditional publish makes a late arrival of the lost message harmless: it
//!   is stored only if nothing followed it, and whoever writes next sees it.
//! * **A message fits the server's `max_payload`**: a larger batch is cut by
//!   records into several messages, published one after the other, each
//!   conditional on the one before; a record larger than a message (a file
//!   chunk) is cut into parts that readers put back together (`wire.rs`).
//!   One publish is in flight per subject; a group's subjects go concurrently.
//! * **Bookkeeping follows the log.** File records, gaps and rejected files are
//!   written to their buckets after the message that causes them is
//!   acknowledged and before the next message of the subject is published. A
//!   node that finds a message last on its subject (at its first use of the
//!   subject, or after a wrong-last-sequence) applies that message's
//!   bookkeeping again; every update is idempotent (files remember the last seq
//!   applied) and revision-checked, so nodes never overwrite each other.
//! * **The next seq of a stream** is its last message's Last + 1 (1 for an
//!   empty subject). It is cached per node and moved only by acknowledged
//!   publishes; a stream whose last message goes *back* below what this process
//!   acknowledged means the server lost acknowledged data: the store is poisoned.
//! * `subscribe()` wakes on commits of any node: after each local commit, and
//!   from a headers-only ordered consumer over the record subjects.

mod commit;
mod effects;
mod kv;
mod meta;
mod names;
mod read;
mod runtime;
mod users;
mod varz;
mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use ferry_protocol::messages::StreamDecl;
use ferry_protocol::session::StreamPlan;
use futures_util::StreamExt;
use tracing::{debug, error, info};

use self::kv::Bucket;
use self::names::Names;
use self::runtime::Runtime;
use super::*;
use crate::config::StoreSection;

/// The JetStream backend (see the module doc).
pub struct JetStream {
    rt: Arc<Runtime>,
    inner: Arc<Inner>,
}

/// The connection and what this node knows; used from the runtime's futures.
pub(super) struct Inner {
    names: Names,
    /// The server's URL, for messages.
    server: String,
    dir: PathBuf,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    meta: Bucket,
    files: Bucket,
    gaps: Bucket,
    rejected: Bucket,
    agents: Bucket,
    users: Bucket,
    /// The audit log's stream (`users.rs`).
    audit: stream::Stream,
    /// Per (agent, stream): its tip, under a lock held while publishing to it
    /// (one publish in flight per subject).
    subjects: Mutex<HashMap<(String, String), commit::SharedState>>,
    /// Per subject: stream sequences of messages by their first seq, to start
    /// reads near where they begin (bounded; see `read.rs`).
    hints: Mutex<HashMap<String, BTreeMap<u64, u64>>>,
    /// Running SHA-256 of files whose chunks this node applied in order.
    hashers: Mutex<HashMap<String, effects::RunningHash>>,
    poisoned: AtomicBool,
    /// Bumped after every commit, local or seen from another node.
    commits: tokio::sync::watch::Sender<u64>,
}

/// How long one request or publish acknowledgement may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl JetStream {
    /// Connects to `[store] url`, refuses a server that acknowledges before it
    /// syncs (unless `allow_unsynced_acks`), and creates the stream and buckets
    /// that are missing.
    pub fn open(cfg: &StoreSection) -> Result<Self, StoreError> {
        let url = cfg.url.clone().unwrap_or_default();
        let monitor = cfg.monitor.clone().unwrap_or_default();
        let rt = Arc::new(Runtime::start().map_err(|source| StoreError::Io {
            dir: cfg.dir.clone(),
            what: "starting the JetStream client's runtime".into(),
            source,
        })?);
        let d = rt
            .block(varz::durability(&monitor))
            .map_err(|detail| StoreError::Remote {
                server: monitor.clone(),
                what: "reading whether JetStream syncs before it acknowledges".into(),
                detail,
            })?;
        if !d.sync_always {
            let why = unsynced(&monitor, &d);
            if !cfg.allow_unsynced_acks {
                return Err(StoreError::Unsafe(format!(
                    "{why}; the exchange refuses to store on it. Set `sync_interval: always` in the server's jetstream block (it then syncs before it acknowledges); or, knowingly, run the stream with replicas = 3 across failure domains and set allow_unsynced_acks = true in [store]"
                )));
            }
            // Logged on the caller's thread, at every start.
            error!(monitor = %monitor, version = %d.version, "ALARM: {why}; starting anyway because [store] allow_unsynced_acks = true: an acknowledged batch can be lost in a power failure unless replicas on other failure domains hold it");
        }
        let inner = Arc::new(rt.block(Inner::connect(cfg, &url))?);
        rt.handle().spawn(watch_commits(Arc::downgrade(&inner)));
        info!(server = %url, stream = %cfg.stream, max_payload = inner.client.server_info().max_payload, "JetStream store open");
        Ok(Self { rt, inner })
    }

    fn block<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        self.rt.block(f)
    }
}

/// Why a server that does not sync before it acknowledges is unsafe.
fn unsynced(monitor: &str, d: &varz::Durability) -> String {
    let every = d.sync_interval_ns.map_or_else(
        || "every 2 minutes (the default)".to_string(),
        |ns| {
            format!(
                "every {}",
                humantime::format_duration(Duration::from_nanos(ns))
            )
        },
    );
    format!(
        "the JetStream server at {monitor} (nats-server {}) acknowledges a write before it is on disk: it syncs {every}, and its /varz does not show jetstream.config.sync_always = true; records it acknowledged (and the exchange acknowledged to agents, which then delete them) can vanish in a power failure",
        d.version
    )
}

impl Inner {
    async fn connect(cfg: &StoreSection, url: &str) -> Result<Inner, StoreError> {
        let remote = |what: &str, e: &dyn std::fmt::Display| StoreError::Remote {
            server: url.to_string(),
            what: what.to_string(),
            detail: e.to_string(),
        };
        let mut opts = async_nats::ConnectOptions::new()
            .name("ferry-exchange")
            .connection_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT));
        if let Some(creds) = &cfg.credentials {
            opts = opts
                .credentials_file(creds)
                .await
                .map_err(|source| StoreError::Io {
                    dir: creds.clone(),
                    what: "reading the NATS credentials file".into(),
                    source,
                })?;
        }
        if let Some(ca) = &cfg.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = opts
            .connect(url)
            .await
            .map_err(|e| remote("connecting", &e))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        let names = Names::new(&cfg.stream);
        let stream = ensure_stream(&js, &names, cfg.replicas)
            .await
            .map_err(|e| remote("opening the record stream", &e))?;
        let bucket = |what: &'static str| {
            let js = js.clone();
            let name = names.bucket(what);
            async move {
                Bucket::open(&js, &name, cfg.replicas)
                    .await
                    .map_err(|e| remote(&format!("opening the key-value bucket {name}"), &e))
            }
        };
        Ok(Inner {
            meta: bucket("meta").await?,
            files: bucket("files").await?,
            gaps: bucket("gaps").await?,
            rejected: bucket("rejected").await?,
            agents: bucket("agents").await?,
            users: bucket("users").await?,
            audit: users::ensure_audit_stream(&js, &names, cfg.replicas)
                .await
                .map_err(|e| remote("opening the audit stream", &e))?,
            names,
            server: url.to_string(),
            dir: cfg.dir.clone(),
            client,
            js,
            stream,
            subjects: Mutex::new(HashMap::new()),
            hints: Mutex::new(HashMap::new()),
            hashers: Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
            commits: tokio::sync::watch::Sender::new(0),
        })
    }

    fn remote(&self, what: impl Into<String>, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Remote {
            server: self.server.clone(),
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    fn poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    fn bump(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The record stream, created if missing; one made by someone else must take
/// this backend's subjects and allow direct gets.
async fn ensure_stream(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<stream::Stream, String> {
    let stream = open_stream(
        js,
        &names.stream,
        "Ferry: records agents shipped, one subject per agent and stream",
        names.record_filter(),
        replicas,
    )
    .await?;
    let c = &stream.cached_info().config;
    if !c.subjects.contains(&names.record_filter()) || !c.allow_direct {
        return Err(format!(
            "stream {} exists with subjects {:?} and allow_direct = {}; this exchange needs subjects [{:?}] and allow_direct = true (name another [store] stream, or fix that one)",
            names.stream,
            c.subjects,
            c.allow_direct,
            names.record_filter()
        ));
    }
    Ok(stream)
}

/// Gets the file stream `name`, or creates it: `subject`, `replicas`, nothing
/// ever deleted or purged, direct gets allowed. Another node creating it at the
/// same moment is fine. The caller checks an existing stream's settings.
pub(super) async fn open_stream(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    subject: String,
    replicas: usize,
) -> Result<stream::Stream, String> {
    if let Ok(s) = js.get_stream(name).await {
        return Ok(s);
    }
    let config = stream::Config {
        name: name.to_string(),
        description: Some(description.into()),
        subjects: vec![subject],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(s) => Ok(s),
        // Another node may have created it meanwhile.
        Err(e) => js
            .get_stream(name)
            .await
            .map_err(|_| format!("creating stream {name}: {e}")),
    }
}

/// Bumps the commit counter for every record message any node stores: a
/// headers-only ordered consumer from the newest message on, made again when
/// it fails (with one bump then, for what may have passed meanwhile).
async fn watch_commits(inner: Weak<Inner>) {
    let mut first = true;
    loop {
        let Some(i) = inner.upgrade() else { return };
        let created = i
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: i.names.record_filter(),
                deliver_policy: consumer::DeliverPolicy::New,
                headers_only: true,
                ..Default::default()
            })
            .await;
        let messages = match created {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match messages {
            Ok(mut messages) => {
                if !first {
                    i.bump();
                }
                first = false;
                drop(i);
                while let Some(m) = messages.next().await {
                    let Some(i) = inner.upgrade() else { return };
                    match m {
                        Ok(_) => i.bump(),
                        Err(e) => {
                            debug!(error = %e, "commit watcher interrupted");
                            break;
                        }
                    }
                }
            }
            Err(e) => debug!(error = %e, "cannot start the commit watcher"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Ledger for JetStream {
    fn commit_group(&self, items: &[Incoming]) -> Vec<Result<u64, StoreError>> {
        let results = self.block(self.inner.commit_group(items));
        if results.iter().any(Result::is_ok) {
            self.inner.bump();
        }
        results
    }

    fn poisoned(&self) -> bool {
        self.inner.poisoned()
    }

    fn next_expected(&self, agent: &str, stream: &str) -> Result<u64, StoreError> {
        self.block(self.inner.next_expected(agent, stream))
    }

    fn plan_stream(&self, agent: &str, decl: &StreamDecl) -> Result<StreamPlan, StoreError> {
        self.block(self.inner.plan_stream(agent, decl))
    }

    fn hold(&self, agent: &str, decl: &StreamDecl, reason: &str) -> Result<(), StoreError> {
        self.block(self.inner.update_meta(agent, &decl.name, |meta| {
            if meta.hold.is_some() {
                return Ok((false, ()));
            }
            meta.hold = Some(Hold::of(decl, reason));
            Ok((true, ()))
        }))
        .map(|_| ())
    }

    fn resolve(
        &self,
        agent: &str,
        stream: &str,
        decision: &Decision,
    ) -> Result<StreamMeta, StoreError> {
        self.block(self.inner.resolve(agent, stream, decision))
    }

    fn holds(&self) -> Result<Vec<(String, String, Hold)>, StoreError> {
        self.block(self.inner.holds())
    }

    fn streams(&self) -> Result<Vec<StreamInfo>, StoreError> {
        self.block(self.inner.streams())
    }

    fn stream_meta(&self, agent: &str, stream: &str) -> Result<StreamMeta, StoreError> {
        self.block(self.inner.meta_entry(agent, stream))
            .map(|(m, _)| m)
    }

    fn records(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        each: &mut dyn FnMut(StoredRecord, u64) -> bool,
    ) -> Result<(), StoreError> {
        read::records(&self.rt, &self.inner, agent, stream, from, each)
    }

    fn file(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<Option<FileRecord>, StoreError> {
        self.block(self.inner.file_entry(agent, stream, file_id))
            .map(|e| e.map(|(e, _)| e.record))
    }

    fn files(&self, agent: &str, stream: &str) -> Result<Vec<FileRecord>, StoreError> {
        self.block(self.inner.files(agent, stream))
    }

    fn open_file(
        &self,
        agent: &str,
        stream: &str,
        file_id: &str,
    ) -> Result<Box<dyn std::io::Read + Send>, StoreError> {
        let reader = read::FileReader::open(&self.rt, &self.inner, agent, stream, file_id)?;
        Ok(Box::new(reader))
    }

    fn rejected_files(
        &self,
        agent: &str,
        stream: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .block(self.inner.rejected(agent, stream))?
            .into_iter()
            .filter(|r| (from..=to).contains(&r.seq))
            .map(|r| r.file_id)
            .collect())
    }

    fn gaps(&self, agent: &str, stream: &str) -> Result<Vec<Gap>, StoreError> {
        self.block(self.inner.gaps(agent, stream))
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.commits.subscribe()
    }

    /// Every acknowledged publish is durable (the server syncs before it
    /// acknowledges), so there is nothing left to sync.
    fn sync(&self) -> Result<(), StoreError> {
        if self.inner.poisoned() {
            return Err(StoreError::Poisoned(self.inner.dir.clone()));
        }
        Ok(())
    }
}

impl Registry for JetStream {
    /// Updates the fleet registry (every node sees it).
    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.block(self.inner.put_agent(rec))
    }

    fn agent(&self, agent: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.block(self.inner.agent(agent))
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.block(self.inner.agents())
    }

    fn put_user(&self, user: &User) -> Result<(), StoreError> {
        self.block(self.inner.put_user(user))
    }

    fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.block(self.inner.user(name))
    }

    fn users(&self) -> Result<Vec<User>, StoreError> {
        self.block(self.inner.users())
    }

    fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        self.block(self.inner.remove_user(name))
    }

    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<AuditEntry, StoreError> {
        self.block(self.inner.append_audit(actor, action, target, detail))
    }

    fn audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.block(self.inner.audit(from_seq, limit))
    }
}

#[cfg(test)]
pub(super) mod tests;

/// One NATS subject token standing for an agent or stream name (`.` and `_`
/// escaped; see `names.rs`), for subjects built outside the store (deliveries).
pub fn subject_token(name: &str) -> String {
    names::encode(name)
}
