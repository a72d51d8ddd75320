//! The directory source's loop: one chunk, one scan or one wait per turn, with
//! acknowledged files finished first. Sending never waits for acks; acks are checked
//! between chunks and wake the loop when it is idle.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::messages::{record, FileAbort, FileChunk, FileEnd, Record};
use sha2::{Digest, Sha256};

use super::fsops::{self, AfterAck, Finalized, Opened, ScanRules, Seen, Stat};
use super::position::{FileEntry, InProgress, Position, Sent};
use super::watch::DirWatch;
use super::{AfterSend, Complete, DirectoryConfig, MAX_CHUNK_SIZE};
use crate::{now_unix_ms, Committed, Inflight, SourceContext, SourceError};

/// Chunks of the file being sent in flight to the buffer at once (see [`Inflight`]).
/// Only chunks before the last are pipelined: the last one's seq is what the file's
/// ack is awaited on, so it is committed on its own and waits for those before it.
const INFLIGHT: usize = 4;

/// How long a file that could not be opened or read is left alone before another try.
const RETRY_AFTER_ERROR: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) async fn run(cfg: DirectoryConfig, mut ctx: SourceContext) -> Result<(), SourceError> {
    let mut r = Runner::new(cfg)?;
    r.resume(&ctx).await?;
    let watch = DirWatch::start(&r.cfg.path, "source.path");
    loop {
        // 1. Acknowledged files first: they leave the outbox and the position.
        r.finish_acked(&ctx).await?;
        // 2. The file in progress, one chunk per turn so that acks interleave.
        if r.current.is_some() {
            r.send_chunk(&ctx).await?;
            continue;
        }
        // 3. The next complete file.
        if r.pick_next().await? {
            continue;
        }
        // 4. Nothing to do until an event, an ack or a timer.
        r.wait(&mut ctx, &watch).await?;
    }
}

/// The file being sent. `hasher` covers exactly `[0, offset)`.
struct Sending {
    entry: FileEntry,
    offset: u64,
    /// Seq of the chunk ending at `offset` (`None` before the first one).
    seq: Option<u64>,
    file: Arc<File>,
    hasher: Sha256,
}

/// A sent file waiting for the exchange's ack of its last chunk.
struct Awaiting {
    entry: FileEntry,
    /// Seq of its last chunk (the `FileEnd`); see the module doc for how it is known.
    seq: u64,
    /// After a failed move/delete, when to try again.
    retry_at: Option<Instant>,
}

impl Awaiting {
    fn acked(&self, acked: u64) -> bool {
        acked >= self.seq
    }
}

/// What re-reading the part of a file already sent found.
enum Reread {
    Ready(File, Sha256),
    Cancelled,
    NotTheFile(String),
}

/// When a file was first seen with its current stat (for quiet-period completion).
struct Observed {
    stat: Stat,
    since: Instant,
}

struct Runner {
    cfg: DirectoryConfig,
    /// `chunk_size` and `rescan_interval`, clamped: a config that skipped `validate`
    /// must not send empty chunks forever or rescan in a busy loop.
    chunk: u64,
    rescan: std::time::Duration,
    rules: Arc<ScanRules>,
    after: Arc<AfterAck>,
    current: Option<Sending>,
    awaiting: Vec<Awaiting>,
    quiet: HashMap<String, Observed>,
    /// Aborted files: whatever the mode, they must stay unchanged for a quiet period
    /// before they are taken again, so a file rewritten in place does not abort over
    /// and over.
    settle: HashSet<String>,
    blocked: HashMap<String, Instant>,
    warned_names: HashSet<OsString>,
    /// Names refused as not regular files and already warned about; pruned to the
    /// entries still there, so it stays small and a new offender is reported.
    refused_warned: HashSet<String>,
    scan_failing: bool,
    acks_closed: bool,
    /// The seq the buffer gives the next record this source commits (see the
    /// module doc: dense from the head at start).
    next_seq: u64,
    /// Chunk commits in flight, each with its predicted seq and file name.
    inflight: Inflight<(u64, String)>,
}

impl Runner {
    fn new(cfg: DirectoryConfig) -> Result<Self, SourceError> {
        let pattern = glob::Pattern::new(&cfg.pattern).map_err(|e| {
            SourceError::Other(format!(
                "source.pattern: {:?} is not a valid glob: {e}",
                cfg.pattern
            ))
        })?;
        let rules = Arc::new(ScanRules {
            pattern,
            complete: cfg.complete,
            marker_suffix: cfg.marker_suffix.clone(),
            sent_dir: (cfg.after_send == AfterSend::Move).then(|| cfg.effective_sent_dir()),
        });
        let after = Arc::new(AfterAck {
            dir: cfg.path.clone(),
            after_send: cfg.after_send,
            sent_dir: cfg.effective_sent_dir(),
            marker_suffix: (cfg.complete == Complete::Marker).then(|| cfg.marker_suffix.clone()),
        });
        Ok(Runner {
            chunk: cfg.chunk_size.0.clamp(1, MAX_CHUNK_SIZE),
            rescan: cfg
                .rescan_interval
                .0
                .max(std::time::Duration::from_millis(10)),
            cfg,
            rules,
            after,
            current: None,
            awaiting: Vec::new(),
            quiet: HashMap::new(),
            settle: HashSet::new(),
            blocked: HashMap::new(),
            warned_names: HashSet::new(),
            refused_warned: HashSet::new(),
            scan_failing: false,
            acks_closed: false,
            next_seq: 1,
            inflight: Inflight::new(INFLIGHT),
        })
    }

    /// The position to commit: `current` as given, plus every awaiting file and
    /// `extra` (the file whose last chunk goes in the same commit, with that chunk's
    /// seq).
    fn position(
        &self,
        current: Option<InProgress>,
        extra: Option<(&FileEntry, u64)>,
    ) -> Result<Vec<u8>, SourceError> {
        let awaiting = self
            .awaiting
            .iter()
            .map(|a| (&a.entry, a.seq))
            .chain(extra)
            .map(|(file, seq)| Sent {
                file: file.clone(),
                seq: Some(seq),
            })
            .collect();
        Position { current, awaiting }.encode()
    }

    fn current_position(&self) -> Option<InProgress> {
        self.current.as_ref().map(|c| InProgress {
            file: c.entry.clone(),
            offset: c.offset,
            seq: c.seq,
        })
    }

    /// Reserves the seqs the buffer will give the next `n` records; returns the
    /// first.
    fn claim_seqs(&mut self, n: u64) -> u64 {
        let first = self.next_seq;
        self.next_seq += n;
        first
    }

    /// Takes up the stored position: the awaiting files whose last chunk the buffer
    /// holds, and the file in progress if it is still the same, unchanged file and
    /// its chunks are in the buffer. Whatever the position claims beyond the
    /// buffer's head never became durable: those transfers are aborted and their
    /// files sent again whole, in one commit.
    async fn resume(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        let head = ctx.head_at_start;
        self.next_seq = head.saturating_add(1);
        let Some(bytes) = ctx.resume.as_deref() else {
            return Ok(());
        };
        let pos = Position::decode(bytes).map_err(SourceError::Other)?;
        let mut aborts = Vec::new();
        for s in pos.awaiting {
            match s.seq {
                Some(seq) if seq > head => {
                    let reason = format!(
                        "the stored position lists the file as sent with its last chunk at seq {seq}, \
                         but the agent's buffer holds this stream only up to seq {head}: \
                         that chunk never became durable"
                    );
                    let size = s.file.size;
                    aborts.push((s.file, size, reason));
                }
                // No seq: a position of a version that did not record them. Such a
                // position is only read when the agent starts on a buffer of that
                // version, and then head and position come from one sled write, so
                // the last chunk is at most `head`: a bound that never lets the file
                // go early, and is recorded as its seq from now on.
                seq => self.awaiting.push(Awaiting {
                    entry: s.file,
                    seq: seq.unwrap_or(head),
                    retry_at: None,
                }),
            }
        }
        if let Some(ip) = pos.current {
            if let Some(abort) = self.take_up(ctx, ip, head).await? {
                aborts.insert(0, abort);
            }
        }
        self.abort_all(ctx, aborts).await
    }

    /// Continues the stored file in progress, or says why it must be aborted:
    /// `(entry, offset, reason)`.
    async fn take_up(
        &mut self,
        ctx: &SourceContext,
        ip: InProgress,
        head: u64,
    ) -> Result<Option<(FileEntry, u64, String)>, SourceError> {
        let path = self.cfg.path.join(&ip.file.name);
        let reason = match (ip.seq, self.changed(&path, &ip.file)) {
            (Some(seq), _) if seq > head => format!(
                "the stored position has the file sent up to offset {} by seq {seq}, but the \
                 agent's buffer holds this stream only up to seq {head}: those chunks never \
                 became durable",
                ip.offset
            ),
            (_, Some(reason)) => reason,
            (_, None) if ip.offset > ip.file.size => format!(
                "the stored offset {} is past the end of the file ({} bytes)",
                ip.offset, ip.file.size
            ),
            (_, None) => {
                let cancel = ctx.shutdown.clone();
                let p = path.clone();
                let upto = ip.offset;
                let expect = ip.file.clone();
                let reread = tokio::task::spawn_blocking(move || {
                    Ok::<_, std::io::Error>(match fsops::open_regular(&p)? {
                        Opened::Regular(file, st) if st.matches(&expect) => {
                            match fsops::rehash(&file, upto, &cancel)? {
                                Some(h) => Reread::Ready(file, h),
                                None => Reread::Cancelled,
                            }
                        }
                        Opened::Regular(_, st) => Reread::NotTheFile(st.difference(&expect)),
                        Opened::Refused(why) => Reread::NotTheFile(why.reason().to_string()),
                    })
                })
                .await
                .map_err(|e| SourceError::Other(format!("re-reading {}: {e}", path.display())))?;
                match reread {
                    Ok(Reread::Ready(file, hasher)) => {
                        tracing::info!(file = %ip.file.name, file_id = %ip.file.file_id, offset = ip.offset, "resuming file transfer");
                        self.current = Some(Sending {
                            entry: ip.file,
                            offset: ip.offset,
                            seq: ip.seq,
                            file: Arc::new(file),
                            hasher,
                        });
                        return Ok(None);
                    }
                    Ok(Reread::Cancelled) => return Err(SourceError::Shutdown),
                    Ok(Reread::NotTheFile(reason)) => reason,
                    Err(e) => format!("cannot re-read the part already sent: {e}"),
                }
            }
        };
        Ok(Some((ip.file, ip.offset, reason)))
    }

    /// `None` if `path` is still the file `entry`; otherwise why not.
    fn changed(&self, path: &Path, entry: &FileEntry) -> Option<String> {
        match fsops::stat_path(path) {
            Ok(Some(st)) if st.matches(entry) => None,
            Ok(Some(st)) => Some(st.difference(entry)),
            Ok(None) => Some("the file disappeared".to_string()),
            Err(e) => Some(format!("cannot stat the file: {e}")),
        }
    }

    /// Ends the transfer of `entry` with a `FileAbort`; the file is taken again,
    /// under a new id, once it has settled.
    async fn abort(
        &mut self,
        ctx: &SourceContext,
        entry: FileEntry,
        offset: u64,
        reason: String,
    ) -> Result<(), SourceError> {
        self.abort_all(ctx, vec![(entry, offset, reason)]).await
    }

    /// [`Self::abort`] for several transfers, in one commit.
    async fn abort_all(
        &mut self,
        ctx: &SourceContext,
        aborts: Vec<(FileEntry, u64, String)>,
    ) -> Result<(), SourceError> {
        if aborts.is_empty() {
            return Ok(());
        }
        let mut recs = Vec::with_capacity(aborts.len());
        for (entry, offset, reason) in &aborts {
            tracing::warn!(file = %entry.name, file_id = %entry.file_id, offset, reason = %reason, "file transfer aborted; the file will be sent again once complete");
            recs.push(Record {
                time_unix_ms: now_unix_ms(),
                position: format!("{} off={offset}", entry.name),
                body: Some(record::Body::FileAbort(FileAbort {
                    file_id: entry.file_id.clone(),
                    path: entry.name.clone(),
                    reason: reason.clone(),
                })),
            });
        }
        let first = self.claim_seqs(recs.len() as u64);
        let pos = self.position(self.current_position(), None)?;
        let committed = ctx.commit(recs, pos).await?;
        let names: Vec<&str> = aborts.iter().map(|(e, ..)| e.name.as_str()).collect();
        check_seq(ctx, first, committed, "the FileAbort", &names.join(", "))?;
        for (entry, ..) in aborts {
            self.quiet.remove(&entry.name);
            self.settle.insert(entry.name);
        }
        Ok(())
    }

    /// Sends the next chunk of the current file (the last one carries `end`).
    async fn send_chunk(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        let Some(mut cur) = self.current.take() else {
            return Ok(());
        };
        let path = self.cfg.path.join(&cur.entry.name);
        if let Some(reason) = self.changed(&path, &cur.entry) {
            return self.abort(ctx, cur.entry, cur.offset, reason).await;
        }
        let offset = cur.offset;
        // `chunk` is at most 4 MiB, so the cast cannot truncate.
        let len = cur.entry.size.saturating_sub(offset).min(self.chunk) as usize;
        let file = Arc::clone(&cur.file);
        let mut hasher = cur.hasher.clone();
        let read = tokio::task::spawn_blocking(move || {
            let data = fsops::read_chunk(&file, offset, len)?;
            hasher.update(&data);
            Ok::<_, std::io::Error>((hasher, data))
        })
        .await
        .map_err(|e| SourceError::Other(format!("reading {}: {e}", path.display())))?;
        let (mut hasher, data) = match read {
            Ok(r) => r,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    self.blocked
                        .insert(cur.entry.name.clone(), Instant::now() + RETRY_AFTER_ERROR);
                }
                let reason = format!("reading {len} bytes at offset {offset} failed: {e}");
                return self.abort(ctx, cur.entry, offset, reason).await;
            }
        };
        let next = offset + len as u64;
        let last = next >= cur.entry.size;
        if last {
            // The bytes just read may be torn if a writer touched the file meanwhile.
            if let Some(reason) = self.changed(&path, &cur.entry) {
                return self.abort(ctx, cur.entry, offset, reason).await;
            }
        }
        let end = last.then(|| FileEnd {
            size: cur.entry.size,
            sha256: hasher.finalize_reset().to_vec(),
        });
        let rec = Record {
            time_unix_ms: now_unix_ms(),
            position: format!("{} off={offset}", cur.entry.name),
            body: Some(record::Body::FileChunk(FileChunk {
                file_id: cur.entry.file_id.clone(),
                path: cur.entry.name.clone(),
                offset,
                data,
                end,
            })),
        };
        let seq = self.claim_seqs(1);
        if last {
            // The file's last seq goes into the same commit as its last chunk: a
            // position never lists a file without the seq its ack is awaited on.
            let pos = self.position(None, Some((&cur.entry, seq)))?;
            let committed = ctx.commit(vec![rec], pos).await?;
            let Some(c) = committed else {
                return Err(SourceError::Buffer(format!(
                    "the buffer confirmed the last chunk of {} without a seq",
                    cur.entry.name
                )));
            };
            tracing::info!(file = %cur.entry.name, file_id = %cur.entry.file_id, size = cur.entry.size, seq = c.last_seq, "file sent; awaiting ack");
            let name = cur.entry.name.clone();
            self.awaiting.push(Awaiting {
                entry: cur.entry,
                seq: c.last_seq,
                retry_at: None,
            });
            if c.first_seq != seq {
                // The durable position names `seq` for this file, which may be acked
                // before its real last chunk: put the real one on record before
                // anything can act on it, then start over from the buffer's head.
                let pos = self.position(None, None)?;
                ctx.commit(Vec::new(), pos).await?;
                return check_seq(ctx, seq, Some(c), "the last chunk", &name);
            }
        } else {
            let pos = self.position(
                Some(InProgress {
                    file: cur.entry.clone(),
                    offset: next,
                    seq: Some(seq),
                }),
                None,
            )?;
            let done = self
                .inflight
                .push(ctx, vec![rec], pos, (seq, cur.entry.name.clone()))
                .await?;
            check_chunks(ctx, done)?;
            cur.offset = next;
            cur.seq = Some(seq);
            cur.hasher = hasher;
            self.current = Some(cur);
        }
        Ok(())
    }

    /// Moves or deletes every acknowledged file, then commits a position without them.
    async fn finish_acked(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        let acked = *ctx.acked.borrow();
        let now = Instant::now();
        let due: Vec<FileEntry> = self
            .awaiting
            .iter()
            .filter(|a| a.acked(acked) && a.retry_at.is_none_or(|t| t <= now))
            .map(|a| a.entry.clone())
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        // Acked, but the exchange's copy did not match its SHA-256: the file
        // stays and is sent again whole, as a new file.
        let (rejected, due): (Vec<FileEntry>, Vec<FileEntry>) =
            due.into_iter().partition(|e| ctx.file_rejected(&e.file_id));
        for e in &rejected {
            tracing::error!(file = %e.name, file_id = %e.file_id, "ALARM: the exchange received this file damaged (its SHA-256 did not match); sending it again whole");
        }
        let after = Arc::clone(&self.after);
        let results = tokio::task::spawn_blocking(move || {
            due.into_iter()
                .map(|e| {
                    let r = fsops::finalize(&after, &e);
                    (e, r)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| SourceError::Other(format!("finishing sent files: {e}")))?;
        let mut done: HashSet<String> = rejected.iter().map(|e| e.file_id.clone()).collect();
        for (e, r) in results {
            match r {
                Ok(Finalized::Done(Some(to))) => {
                    tracing::info!(file = %e.name, file_id = %e.file_id, moved_to = %to.display(), "file acknowledged and moved");
                }
                Ok(Finalized::Done(None)) => {
                    tracing::info!(file = %e.name, file_id = %e.file_id, "file acknowledged and deleted");
                }
                Ok(Finalized::Gone) => {
                    tracing::info!(file = %e.name, file_id = %e.file_id, "acknowledged file was already gone");
                }
                Ok(Finalized::Replaced) => {
                    tracing::warn!(file = %e.name, file_id = %e.file_id, "acknowledged file was modified or replaced after it was sent; leaving it in place to be sent as a new file");
                }
                Err(err) => {
                    tracing::warn!(file = %e.name, file_id = %e.file_id, error = %err, sent_dir = %self.after.sent_dir.display(), "cannot move or delete an acknowledged file; will retry");
                    let retry = now + self.rescan;
                    for a in self
                        .awaiting
                        .iter_mut()
                        .filter(|a| a.entry.file_id == e.file_id)
                    {
                        a.retry_at = Some(retry);
                    }
                    continue;
                }
            }
            done.insert(e.file_id);
        }
        if done.is_empty() {
            return Ok(());
        }
        // Moved (or deleted) but not yet recorded: a restart finds them gone.
        (ctx.failpoint)("directory-after-move-before-record")
            .map_err(|e| SourceError::Other(format!("recording sent files: {e}")))?;
        self.awaiting.retain(|a| !done.contains(&a.entry.file_id));
        let pos = self.position(self.current_position(), None)?;
        ctx.commit(Vec::new(), pos).await?;
        // Only now is no durable position left that lists them as awaiting.
        for e in &rejected {
            ctx.forget_rejected(&e.file_id);
        }
        Ok(())
    }

    /// Scans the folder and takes the oldest complete file. `Ok(false)` when there is
    /// nothing to take now.
    async fn pick_next(&mut self) -> Result<bool, SourceError> {
        let dir = self.cfg.path.clone();
        let rules = Arc::clone(&self.rules);
        let scan = tokio::task::spawn_blocking(move || fsops::scan(&dir, &rules))
            .await
            .map_err(|e| {
                SourceError::Other(format!("scanning {}: {e}", self.cfg.path.display()))
            })?;
        let scan = match scan {
            Ok(s) => {
                if self.scan_failing {
                    tracing::info!(dir = %self.cfg.path.display(), "outbox readable again");
                    self.scan_failing = false;
                }
                s
            }
            Err(e) => {
                if !self.scan_failing {
                    tracing::warn!(dir = %self.cfg.path.display(), error = %e, "cannot list the outbox (source.path); retrying");
                    self.scan_failing = true;
                }
                return Ok(false);
            }
        };
        for n in scan.non_utf8 {
            if !self.warned_names.contains(&n) {
                tracing::warn!(dir = %self.cfg.path.display(), name = ?n, "skipping a file whose name is not valid UTF-8; rename it to send it");
                self.warned_names.insert(n);
            }
        }
        let refused: HashSet<&str> = scan.refused.iter().map(|(n, _)| n.as_str()).collect();
        self.refused_warned.retain(|n| refused.contains(n.as_str()));
        for (name, why) in &scan.refused {
            self.warn_refused(name, *why);
        }
        let now = Instant::now();
        let present: HashSet<&str> = scan.files.iter().map(|s| s.name.as_str()).collect();
        self.quiet.retain(|k, _| present.contains(k.as_str()));
        self.settle.retain(|k| present.contains(k.as_str()));
        self.blocked.retain(|_, until| *until > now);

        let mut eligible: Vec<&Seen> = Vec::new();
        for s in &scan.files {
            if self.awaiting.iter().any(|a| a.entry.name == s.name)
                || self.blocked.contains_key(&s.name)
            {
                continue;
            }
            let needs_quiet = self.cfg.complete == Complete::Quiet || self.settle.contains(&s.name);
            if needs_quiet && !self.is_quiet(s, now) {
                continue;
            }
            eligible.push(s);
        }
        eligible.sort_by(|a, b| (a.stat.mtime_ns, &a.name).cmp(&(b.stat.mtime_ns, &b.name)));
        let Some(s) = eligible.first() else {
            return Ok(false);
        };
        let path = self.cfg.path.join(&s.name);
        let (file, st) = match fsops::open_regular(&path) {
            Ok(Opened::Regular(f, st)) => (f, st),
            // Swapped for a link or a special file since the scan.
            Ok(Opened::Refused(why)) => {
                self.warn_refused(&s.name, why);
                self.blocked.insert(s.name.clone(), now + RETRY_AFTER_ERROR);
                return Ok(true);
            }
            Err(e) => {
                tracing::warn!(file = %s.name, error = %e, "cannot open a complete file; will retry");
                self.blocked.insert(s.name.clone(), now + RETRY_AFTER_ERROR);
                return Ok(true);
            }
        };
        if st != s.stat {
            // Changed since the scan: it is not complete after all. Its writes wake
            // the loop again.
            self.quiet.remove(&s.name);
            return Ok(false);
        }
        let entry = FileEntry {
            file_id: format!("{:016x}", rand::random::<u64>()),
            name: s.name.clone(),
            dev: st.dev,
            ino: st.ino,
            size: st.size,
            mtime_ns: st.mtime_ns,
        };
        tracing::info!(file = %entry.name, file_id = %entry.file_id, size = entry.size, "sending file");
        self.quiet.remove(&entry.name);
        self.settle.remove(&entry.name);
        self.current = Some(Sending {
            entry,
            offset: 0,
            seq: None,
            file: Arc::new(file),
            hasher: Sha256::new(),
        });
        Ok(true)
    }

    /// Warns once about an entry that is not sent because it is not a regular file;
    /// it is left where it is.
    fn warn_refused(&mut self, name: &str, why: fsops::Refusal) {
        if self.refused_warned.insert(name.to_string()) {
            tracing::warn!(path = %self.cfg.path.join(name).display(), reason = why.reason(), "not sending an outbox entry that is not a regular file; left in place (replace it with the file itself to send it)");
        }
    }

    /// True once `s` has shown the same stat for `quiet_period`.
    fn is_quiet(&mut self, s: &Seen, now: Instant) -> bool {
        let period = self.cfg.quiet_period.0;
        match self.quiet.get(&s.name) {
            Some(o) if o.stat == s.stat => now.saturating_duration_since(o.since) >= period,
            _ => {
                self.quiet.insert(
                    s.name.clone(),
                    Observed {
                        stat: s.stat,
                        since: now,
                    },
                );
                period.is_zero()
            }
        }
    }

    async fn wait(&mut self, ctx: &mut SourceContext, watch: &DirWatch) -> Result<(), SourceError> {
        // Nothing may stay in flight while the source sleeps.
        let done = self.inflight.drain().await?;
        check_chunks(ctx, done)?;
        let now = Instant::now();
        let period = self.cfg.quiet_period.0;
        let deadline = self
            .quiet
            .values()
            .map(|o| o.since + period)
            .chain(self.blocked.values().copied())
            .chain(self.awaiting.iter().filter_map(|a| a.retry_at))
            .filter(|&t| t > now)
            .fold(now + self.rescan, Instant::min);
        let acked = *ctx.acked.borrow();
        // An ack that came after `finish_acked` looked: back to it now, not at the
        // next rescan (its change may already be marked seen).
        if self
            .awaiting
            .iter()
            .any(|a| a.retry_at.is_none() && a.acked(acked))
        {
            return Ok(());
        }
        let want_acks = !self.acks_closed
            && self
                .awaiting
                .iter()
                .any(|a| a.retry_at.is_none() && !a.acked(acked));
        let shutdown = ctx.shutdown.clone();
        tokio::select! {
            biased;
            // 1. Shutdown wins over everything.
            _ = shutdown.cancelled() => return Err(SourceError::Shutdown),
            // 2. An ack lets files leave the outbox.
            r = ctx.acked.changed(), if want_acks => {
                if r.is_err() {
                    // The agent dropped the ack watermark: no more acks will come, so
                    // stop waiting on it rather than spin.
                    self.acks_closed = true;
                }
            }
            // 3. Something changed in the folder.
            _ = watch.changed() => {}
            // 4. Rescan, quiet period over, or a retry due.
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        Ok(())
    }
}

/// Checks that the buffer gave a commit the seq this source predicted for it (and
/// wrote into positions). A mismatch means seqs of the stream are not dense from
/// the head at start, so the positions' seqs cannot be trusted: the source fails
/// and its restart starts counting from the buffer's head again.
fn check_seq(
    ctx: &SourceContext,
    predicted: u64,
    got: Option<Committed>,
    what: &str,
    file: &str,
) -> Result<(), SourceError> {
    match got {
        Some(c) if c.first_seq == predicted => Ok(()),
        Some(c) => Err(SourceError::Buffer(format!(
            "the buffer gave seq {} to {what} of {file}, but the source expected seq {predicted} \
             (the head was {} when it started and it is the stream's only writer); restarting \
             the source from its durable position. This is a bug: please report it with the \
             agent's log",
            c.first_seq, ctx.head_at_start
        ))),
        None => Err(SourceError::Buffer(format!(
            "the buffer confirmed {what} of {file} without a seq"
        ))),
    }
}

/// [`check_seq`] for chunk commits that came back from [`Inflight`].
fn check_chunks(
    ctx: &SourceContext,
    done: Vec<(Option<Committed>, (u64, String))>,
) -> Result<(), SourceError> {
    for (got, (predicted, name)) in done {
        check_seq(ctx, predicted, got, "a chunk", &name)?;
    }
    Ok(())
}
