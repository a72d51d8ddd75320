//! The tail source's loop: read a batch, commit it, and at the end of the file look
//! for rotation, truncation or a missing file; wait only when there is nothing to do.
//! A rotated file, once drained, leads to the next file of the chain (`walk`).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use std::fmt::Write as _;

use ferry_protocol::record_buf::RecordBuf;

use super::chain::{Finished, Ident, Siblings};
use super::file;
use super::lines::{self, Limits};
use super::walk::{self, Origin, Step};
use super::{StartAt, TailConfig, MAX_BATCH_BYTES_LIMIT, MAX_BATCH_LINES_LIMIT, MAX_LINE_LIMIT};
use crate::directory::watch::DirWatch;
use crate::{now_unix_ms, Inflight, SourceContext, SourceError};

/// Batches of one file in flight to the buffer at once (see [`Inflight`]).
const INFLIGHT: usize = 4;

pub(super) async fn run(cfg: TailConfig, ctx: SourceContext) -> Result<(), SourceError> {
    let limits = Limits {
        // Clamped again here: a config that skipped `validate` must not loop forever.
        max_line: cfg.max_line.0.clamp(4, MAX_LINE_LIMIT) as usize,
        max_lines: cfg.max_batch_lines.clamp(1, MAX_BATCH_LINES_LIMIT),
        max_bytes: cfg.max_batch_bytes.0.clamp(1, MAX_BATCH_BYTES_LIMIT) as usize,
    };
    let poll = cfg
        .poll_interval
        .0
        .max(std::time::Duration::from_millis(10));
    let parent = file::parent_of(&cfg.path);
    let path_name = file::name_of(&cfg.path);
    let siblings =
        Arc::new(Siblings::new(&cfg.path, cfg.rotated.as_deref()).map_err(SourceError::Other)?);
    let mut watch = DirWatch::start(&parent, "source.path");
    let resumed = walk::resume(&cfg.path, &siblings, ctx.resume.as_deref()).await?;
    let mut cur = resumed.cur;
    // Lines were lost (see `walk`). The alarm ends this run as soon as a position
    // past them is durable: the agent shows the error in `status` and metrics and
    // starts the source again, which goes on from that position without raising it
    // again. Until a file to move to exists, the alarm waits here.
    let mut alarm = resumed.alarm;
    // Rotated files read to their end in this run: never read again.
    let mut finished = Finished::default();
    // `start_at = "end"` skips only what the file held when the source first started.
    let mut skip_existing = ctx.resume.is_none() && cfg.start_at == StartAt::End;
    let mut trouble = Trouble::default();
    // Only line batches are pipelined; every other commit waits for itself and so
    // for everything before it.
    let mut inflight: Inflight<()> = Inflight::new(INFLIGHT);

    loop {
        if let Some(t) = cur.as_ref() {
            if let Some(a) = alarm.take() {
                ctx.commit(Vec::new(), t.position().encode()?).await?;
                return Err(SourceError::Other(a));
            }
        }
        let Some(t) = cur.as_mut() else {
            match file::open(&cfg.path, &path_name, false) {
                Ok(Some(mut t)) => {
                    trouble.clear(&cfg.path);
                    if std::mem::take(&mut skip_existing) {
                        t.offset = t.file.metadata().map(|m| m.len()).unwrap_or(0);
                        tracing::info!(
                            offset = t.offset,
                            "start_at = end: skipping what the file already holds"
                        );
                        ctx.commit(Vec::new(), t.position().encode()?).await?;
                    }
                    cur = Some(t);
                    continue;
                }
                Ok(None) => {
                    skip_existing = false;
                    trouble.report(&cfg.path, "file does not exist (yet); waiting for it", None);
                }
                Err(e) => trouble.report(&cfg.path, "cannot open the file; retrying", Some(&e)),
            }
            wait(&ctx, &mut watch, &parent, poll).await?;
            continue;
        };

        let probe = file::read(t, limits.window()).await;
        let probe = match probe {
            Ok(p) => {
                trouble.clear(&cfg.path);
                p
            }
            Err(e) => {
                trouble.report(&cfg.path, "cannot read the file; retrying", Some(&e));
                inflight.drain().await?;
                wait(&ctx, &mut watch, &parent, poll).await?;
                continue;
            }
        };
        if !probe.intact {
            tracing::warn!(ino = t.ino, offset = t.offset, "file was truncated or rewritten in place (copytruncate?); reading it again from the start");
            t.offset = 0;
            t.fp = probe.fresh_fp;
            t.mtime_ns = probe.mtime_ns;
            ctx.commit(Vec::new(), t.position().encode()?).await?;
            continue;
        }
        let split = lines::split(
            &probe.buf,
            t.offset,
            t.rotated && probe.at_eof,
            &limits,
            cfg.encoding,
        );
        if split.consumed > 0 {
            if split.pieces > 0 {
                tracing::warn!(
                    ino = t.ino,
                    offset = t.offset,
                    pieces = split.pieces,
                    max_line = limits.max_line,
                    "line longer than max_line shipped in pieces"
                );
            }
            let ino = t.ino;
            // One clock reading per batch: the lines were read together.
            let now = now_unix_ms();
            let mut records = RecordBuf::with_capacity(split.consumed + 40 * split.lines.len());
            let mut position = String::with_capacity(48);
            for l in &split.lines {
                position.clear();
                // Writing to a String cannot fail.
                let _ = write!(position, "ino={ino} off={}", l.start);
                records.push_line(now, &position, &l.text);
            }
            t.fp = probe.fresh_fp;
            t.mtime_ns = probe.mtime_ns;
            t.offset += split.consumed as u64;
            inflight
                .push(&ctx, records, t.position().encode()?, ())
                .await?;
            continue;
        }
        // At the end of what the file holds: nothing may stay in flight while the
        // source looks around or sleeps.
        inflight.drain().await?;

        // Nothing complete left in the file: has it been replaced at the path?
        let at_path = match std::fs::metadata(&cfg.path) {
            Ok(m) => Some((m.dev(), m.ino())),
            Err(_) => None,
        };
        if at_path == Some((t.dev, t.ino)) {
            t.rotated = false;
        } else if !t.rotated {
            // With no file at the path (the writer makes the next one with its next
            // line), rotated copies newer than this file tell it was renamed away.
            let renamed = at_path.is_some()
                || matches!(
                    next_file(&cfg.path, &path_name, &siblings, t.finished(), &finished).await,
                    Ok(Some(Step { next: Some(_), .. }))
                );
            if renamed {
                tracing::info!(
                    ino = t.ino,
                    offset = t.offset,
                    "file rotated; draining the old file before following the next one"
                );
                t.rotated = true;
                continue;
            }
        } else {
            let done = t.finished();
            match next_file(&cfg.path, &path_name, &siblings, done, &finished).await {
                Ok(Some(Step {
                    next: Some(next),
                    unreadable,
                })) => {
                    trouble.clear(&cfg.path);
                    tracing::info!(
                        old_ino = t.ino,
                        new_ino = next.ino,
                        next = %next.name,
                        "old file drained; following the next file from its start"
                    );
                    finished.push(done);
                    let lost = (!unreadable.is_empty())
                        .then(|| walk::unreadable_alarm(&cfg.path, &unreadable, &next));
                    // The position moves to the next file now: after a restart the
                    // chain is followed from there, and this file is not read again.
                    ctx.commit(Vec::new(), next.position().encode()?).await?;
                    if let Some(a) = lost {
                        return Err(SourceError::Other(a));
                    }
                    cur = Some(next);
                    continue;
                }
                // Nothing to move to yet, or a copy changed while being looked at.
                Ok(_) => {}
                Err(e) => trouble.report(
                    &cfg.path,
                    "cannot look for the next rotated file; retrying",
                    Some(&e),
                ),
            }
        }
        wait(&ctx, &mut watch, &parent, poll).await?;
    }
}

/// The file after the drained file `done` (see [`walk::successor`]), on the
/// blocking pool.
async fn next_file(
    path: &Path,
    path_name: &str,
    siblings: &Arc<Siblings>,
    done: Ident,
    finished: &Finished,
) -> io::Result<Option<Step>> {
    let origin = Origin::File {
        dev: done.dev,
        ino: done.ino,
        mtime_ns: done.mtime_ns,
    };
    // `done` counts as read whole: a compressed copy of it is no loss.
    let mut seen = finished.clone();
    seen.push(done);
    let (path, path_name, siblings) = (
        path.to_path_buf(),
        path_name.to_string(),
        Arc::clone(siblings),
    );
    tokio::task::spawn_blocking(move || {
        walk::successor(&path, &path_name, &siblings, origin, &seen)
    })
    .await
    .map_err(io::Error::other)?
}

/// Waits for an event in the directory, the poll timer, or shutdown.
async fn wait(
    ctx: &SourceContext,
    watch: &mut DirWatch,
    parent: &Path,
    poll: std::time::Duration,
) -> Result<(), SourceError> {
    if !watch.is_active() && parent.is_dir() {
        watch.retry("source.path");
    }
    tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => Err(SourceError::Shutdown),
        _ = watch.changed() => Ok(()),
        _ = tokio::time::sleep(poll) => Ok(()),
    }
}

/// Logs a persistent problem once, and its end.
#[derive(Default)]
struct Trouble {
    reported: Option<String>,
}

impl Trouble {
    fn report(&mut self, path: &Path, what: &str, err: Option<&io::Error>) {
        if self.reported.as_deref() == Some(what) {
            return;
        }
        match err {
            Some(e) => tracing::warn!(path = %path.display(), error = %e, "{what}"),
            None => tracing::warn!(path = %path.display(), "{what}"),
        }
        self.reported = Some(what.to_string());
    }

    fn clear(&mut self, path: &Path) {
        if self.reported.take().is_some() {
            tracing::info!(path = %path.display(), "file available again");
        }
    }
}
