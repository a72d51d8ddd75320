//! The tail source's loop: read a batch, commit it, and at the end of the file look
//! for rotation, truncation or a missing file; wait only when there is nothing to do.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::fmt::Write as _;

use ferry_protocol::record_buf::RecordBuf;
use sha2::{Digest, Sha256};

use super::lines::{self, Limits};
use super::position::{Fingerprint, TailPosition, FP_MAX};
use super::{StartAt, TailConfig, MAX_BATCH_BYTES_LIMIT, MAX_BATCH_LINES_LIMIT, MAX_LINE_LIMIT};
use crate::directory::watch::DirWatch;
use crate::{now_unix_ms, Inflight, SourceContext, SourceError};

/// Batches of one file in flight to the buffer at once (see [`Inflight`]).
const INFLIGHT: usize = 4;

/// The file being read.
struct Tailed {
    file: Arc<File>,
    dev: u64,
    ino: u64,
    fp: Fingerprint,
    /// Byte after the last newline already durable.
    offset: u64,
    /// The path names another file now (or this is a rotated copy found on restart):
    /// read to the end, then switch to the path.
    rotated: bool,
}

impl Tailed {
    fn position(&self) -> TailPosition {
        TailPosition::new(self.dev, self.ino, &self.fp, self.offset)
    }
}

/// What one look at the open file found.
struct Probe {
    /// The fingerprint and the offset still fit the file.
    intact: bool,
    /// Fingerprint of the file as it is now (grown up to `FP_MAX`).
    fresh_fp: Fingerprint,
    buf: Vec<u8>,
    /// `buf` reaches the end of the file as it was stat'ed.
    at_eof: bool,
}

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
    let parent = match cfg.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watch = DirWatch::start(&parent, "source.path");
    let mut cur = resume(&cfg.path, &parent, ctx.resume.as_deref()).await?;
    // `start_at = "end"` skips only what the file held when the source first started.
    let mut skip_existing = ctx.resume.is_none() && cfg.start_at == StartAt::End;
    let mut trouble = Trouble::default();
    // Only line batches are pipelined; every other commit waits for itself and so
    // for everything before it.
    let mut inflight: Inflight<()> = Inflight::new(INFLIGHT);

    loop {
        let Some(t) = cur.as_mut() else {
            match open(&cfg.path) {
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

        let probe = read(t, limits.window()).await;
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
        } else if at_path.is_some() && !t.rotated {
            tracing::info!(
                ino = t.ino,
                offset = t.offset,
                "file rotated; draining the old file before following the new one"
            );
            t.rotated = true;
            continue;
        } else if at_path.is_some() {
            match open(&cfg.path) {
                Ok(Some(next)) if (next.dev, next.ino) != (t.dev, t.ino) => {
                    tracing::info!(
                        old_ino = t.ino,
                        new_ino = next.ino,
                        "old file drained; following the new file from its start"
                    );
                    ctx.commit(Vec::new(), next.position().encode()?).await?;
                    cur = Some(next);
                    continue;
                }
                Ok(_) => {}
                Err(e) => trouble.report(&cfg.path, "cannot open the new file; retrying", Some(&e)),
            }
        }
        wait(&ctx, &mut watch, &parent, poll).await?;
    }
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

/// Opens the file at `path` at offset 0; `Ok(None)` if there is none.
fn open(path: &Path) -> io::Result<Option<Tailed>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let fp = fingerprint(&file, meta.len().min(FP_MAX))?;
    Ok(Some(Tailed {
        file: Arc::new(file),
        dev: meta.dev(),
        ino: meta.ino(),
        fp,
        offset: 0,
        rotated: false,
    }))
}

/// SHA-256 of the first `len` bytes, or of fewer if the file is shorter.
fn fingerprint(file: &File, len: u64) -> io::Result<Fingerprint> {
    let mut buf = vec![0u8; len.min(FP_MAX) as usize];
    let got = read_full(file, &mut buf, 0)?;
    let head = buf.get(..got).unwrap_or_default();
    Ok(Fingerprint {
        len: got as u64,
        hash: Sha256::digest(head).into(),
    })
}

/// `read_at` until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while let Some(rest) = buf.get_mut(got..) {
        if rest.is_empty() {
            break;
        }
        match file.read_at(rest, offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Whether `file` still is the file `fp` was taken of, and is at least `offset` long.
fn still_matches(file: &File, size: u64, fp: &Fingerprint, offset: u64) -> io::Result<bool> {
    Ok(size >= offset && size >= fp.len && fingerprint(file, fp.len)? == *fp)
}

/// Checks the open file against its fingerprint and reads up to `want` bytes at the
/// offset, on the blocking pool.
async fn read(t: &Tailed, want: usize) -> io::Result<Probe> {
    let file = Arc::clone(&t.file);
    let (fp, offset) = (t.fp, t.offset);
    let r = tokio::task::spawn_blocking(move || {
        let size = file.metadata()?.len();
        let intact = still_matches(&file, size, &fp, offset)?;
        let fresh_fp = if intact && (fp.len >= FP_MAX || size <= fp.len) {
            fp
        } else {
            fingerprint(&file, size.min(FP_MAX))?
        };
        if !intact {
            return Ok(Probe {
                intact,
                fresh_fp,
                buf: Vec::new(),
                at_eof: false,
            });
        }
        let n = (size - offset).min(want as u64) as usize;
        let mut buf = vec![0u8; n];
        let got = read_full(&file, &mut buf, offset)?;
        buf.truncate(got);
        Ok(Probe {
            intact,
            fresh_fp,
            buf,
            at_eof: offset + got as u64 >= size,
        })
    })
    .await;
    r.map_err(io::Error::other)?
}

/// Finds where to continue from the stored position: the file at `path` if it is
/// still the same file, else a rotated sibling holding it (drained first), else
/// nothing (the path is then read from its start).
async fn resume(
    path: &Path,
    parent: &Path,
    stored: Option<&[u8]>,
) -> Result<Option<Tailed>, SourceError> {
    let Some(bytes) = stored else {
        return Ok(None);
    };
    let (pos, fp) = TailPosition::decode(bytes).map_err(SourceError::Other)?;
    let (path, parent) = (path.to_path_buf(), parent.to_path_buf());
    let found = tokio::task::spawn_blocking(move || find_stored(&path, &parent, &pos, &fp))
        .await
        .map_err(|e| SourceError::Other(format!("looking for the stored file: {e}")))?;
    Ok(found)
}

fn find_stored(path: &Path, parent: &Path, pos: &TailPosition, fp: &Fingerprint) -> Option<Tailed> {
    let take = |p: &Path, rotated: bool| -> Option<Tailed> {
        let file = File::open(p).ok()?;
        let meta = file.metadata().ok()?;
        if (meta.dev(), meta.ino()) != (pos.dev, pos.ino) {
            return None;
        }
        still_matches(&file, meta.len(), fp, pos.offset)
            .ok()?
            .then(|| Tailed {
                file: Arc::new(file),
                dev: pos.dev,
                ino: pos.ino,
                fp: *fp,
                offset: pos.offset,
                rotated,
            })
    };
    if let Ok(m) = std::fs::metadata(path) {
        if (m.dev(), m.ino()) == (pos.dev, pos.ino) {
            if let Some(t) = take(path, false) {
                tracing::info!(
                    ino = pos.ino,
                    offset = pos.offset,
                    "resuming the file at the stored offset"
                );
                return Some(t);
            }
            tracing::warn!(ino = pos.ino, offset = pos.offset, "the file was truncated or rewritten since the stored position; reading it from the start");
            return None;
        }
    }
    let siblings = std::fs::read_dir(parent).into_iter().flatten().flatten();
    for entry in siblings {
        let p = entry.path();
        if p == path {
            continue;
        }
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && (m.dev(), m.ino()) == (pos.dev, pos.ino) => {}
            _ => continue,
        }
        if let Some(t) = take(&p, true) {
            tracing::info!(rotated_to = %p.display(), ino = pos.ino, offset = pos.offset, "the file was rotated while stopped; draining the rotated copy first");
            return Some(t);
        }
    }
    tracing::warn!(ino = pos.ino, offset = pos.offset, dir = %parent.display(), "the file of the stored position was not found (rotated away and removed?); reading the current file from the start");
    None
}
