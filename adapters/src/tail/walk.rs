//! Where the source goes next. At a start: the file of the stored position, at the
//! path or among the rotated copies (same dev, inode and fingerprint). Once a
//! rotated file is drained: the next plain copy after it (see `chain` for the
//! order), until the file at the path. Lines the source cannot ship on the way (the
//! stored file is gone, a copy in the chain is compressed) make an alarm: logged at
//! error level here, and its text is returned for the operator.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::chain::{self, After, Finished, Siblings};
use super::file::{self, Opened, Tailed};
use super::position::{Fingerprint, TailPosition};
use crate::SourceError;

/// How often a start looks for the stored file while rotated copies change under
/// it (a rotation in progress) before it gives up; the agent then starts the
/// source again a little later.
const ATTEMPTS: usize = 5;

/// The file the chain is followed from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Origin {
    /// Drained: it was last changed at `mtime_ns`.
    File { dev: u64, ino: u64, mtime_ns: u64 },
    /// Not found any more; last changed at or after `mtime_ns`, if known.
    Gone { mtime_ns: Option<u64> },
}

/// The next file to read.
pub(super) struct Step {
    /// From its start; `None`: nothing to move to yet (no newer copy, no file at
    /// the path).
    pub next: Option<Tailed>,
    /// Compressed copies between the origin and `next`: lines only they hold
    /// cannot be shipped.
    pub unreadable: Vec<PathBuf>,
}

/// What follows `origin`: the oldest plain rotated copy newer than it that `seen`
/// does not hold, else the file at `path`. `Ok(None)`: a copy changed while it was
/// looked at; look again.
pub(super) fn successor(
    path: &Path,
    path_name: &str,
    siblings: &Siblings,
    origin: Origin,
    seen: &Finished,
) -> io::Result<Option<Step>> {
    let list = siblings.list(path)?;
    let after = match origin {
        Origin::File { dev, ino, mtime_ns } => list
            .iter()
            .position(|c| (c.dev, c.ino) == (dev, ino))
            .map_or(After::Mtime(mtime_ns), After::Listed),
        Origin::Gone { mtime_ns } => mtime_ns.map_or(After::Unknown, After::Mtime),
    };
    let mut unreadable = Vec::new();
    for c in chain::newer(&list, after) {
        if c.compressed {
            if seen.is_copy(c, &list) {
                tracing::debug!(file = %c.path.display(), "compressed copy of a file read whole or still listed; nothing to ship");
            } else {
                unreadable.push(c.path.clone());
            }
            continue;
        }
        if seen.read(c) {
            tracing::debug!(file = %c.path.display(), "read whole already; not read again");
            continue;
        }
        match file::open_rotated(c)? {
            Opened::File(t) => {
                return Ok(Some(Step {
                    next: Some(t),
                    unreadable,
                }))
            }
            Opened::Compressed => unreadable.push(c.path.clone()),
            Opened::Changed => return Ok(None),
        }
    }
    let next = file::open(path, path_name, false).map_err(|e| file::named(path, e))?;
    let next = next.filter(|n| match origin {
        Origin::File { dev, ino, .. } => (n.dev, n.ino) != (dev, ino),
        Origin::Gone { .. } => true,
    });
    Ok(Some(Step { next, unreadable }))
}

/// Where a start continues, and the alarm to raise first if lines were lost.
#[derive(Default)]
pub(super) struct Resumed {
    pub cur: Option<Tailed>,
    pub alarm: Option<String>,
}

/// Finds where to continue from the stored position: the file at `path` if it is
/// still the same file, else the rotated copy holding it (drained first, then the
/// copies after it), else an alarm and the first file after it.
pub(super) async fn resume(
    path: &Path,
    siblings: &Arc<Siblings>,
    stored: Option<&[u8]>,
) -> Result<Resumed, SourceError> {
    let Some(bytes) = stored else {
        return Ok(Resumed::default());
    };
    let (pos, fp) = TailPosition::decode(bytes).map_err(SourceError::Other)?;
    let (p, s) = (path.to_path_buf(), Arc::clone(siblings));
    let found = tokio::task::spawn_blocking(move || {
        for _ in 0..ATTEMPTS {
            if let Some(r) = find_stored(&p, &s, &pos, &fp)? {
                return Ok(r);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(io::Error::other(
            "the rotated copies kept changing while they were looked at",
        ))
    })
    .await
    .map_err(|e| SourceError::Other(format!("looking for the stored file: {e}")))?;
    found.map_err(|e| {
        SourceError::io(
            format!(
                "looking for the file of the stored position beside {} (check the folder can be read; the source retries)",
                path.display()
            ),
            e,
        )
    })
}

/// One look for the stored file; `Ok(None)`: something changed under it, look again.
fn find_stored(
    path: &Path,
    siblings: &Siblings,
    pos: &TailPosition,
    fp: &Fingerprint,
) -> io::Result<Option<Resumed>> {
    let found = |t: Tailed| {
        Some(Resumed {
            cur: Some(t),
            alarm: None,
        })
    };
    let path_name = file::name_of(path);
    if let Ok(m) = std::fs::metadata(path) {
        if (m.dev(), m.ino()) == (pos.dev, pos.ino) {
            match take(path, &path_name, false, pos, fp)? {
                Take::File(t) => {
                    tracing::info!(
                        ino = pos.ino,
                        offset = pos.offset,
                        "resuming the file at the stored offset"
                    );
                    return Ok(found(t));
                }
                Take::Changed => return Ok(None),
                Take::Other => {
                    // Copytruncate (or the inode reused by a new file): the file at
                    // the path is read again from its start.
                    tracing::warn!(ino = pos.ino, offset = pos.offset, "the file was truncated or rewritten since the stored position; reading it from the start");
                    return Ok(Some(Resumed::default()));
                }
            }
        }
    }
    let list = siblings.list(path)?;
    if let Some(c) = list.iter().find(|c| (c.dev, c.ino) == (pos.dev, pos.ino)) {
        match take(&c.path, &c.name, true, pos, fp)? {
            Take::File(t) => {
                tracing::info!(rotated_to = %c.path.display(), ino = pos.ino, offset = pos.offset, "the file was rotated while stopped; draining the rotated copy, then the copies after it");
                return Ok(found(t));
            }
            Take::Changed => return Ok(None),
            // Its inode now holds another file: the stored one is gone.
            Take::Other => {}
        }
    }
    let origin = Origin::Gone {
        mtime_ns: pos.mtime_ns,
    };
    let Some(step) = successor(path, &path_name, siblings, origin, &Finished::default())? else {
        return Ok(None);
    };
    let alarm = gone_alarm(path, pos, &step);
    Ok(Some(Resumed {
        cur: step.next,
        alarm: Some(alarm),
    }))
}

enum Take {
    File(Tailed),
    /// Removed or replaced between the listing and the open.
    Changed,
    /// The same inode holds other bytes, or fewer than the stored offset.
    Other,
}

/// Opens `p` at the stored offset if it is the stored file.
fn take(
    p: &Path,
    name: &str,
    rotated: bool,
    pos: &TailPosition,
    fp: &Fingerprint,
) -> io::Result<Take> {
    let file = match File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Take::Changed),
        Err(e) => return Err(file::named(p, e)),
    };
    let meta = file.metadata().map_err(|e| file::named(p, e))?;
    if (meta.dev(), meta.ino()) != (pos.dev, pos.ino) {
        return Ok(Take::Changed);
    }
    if !file::still_matches(&file, meta.len(), fp, pos.offset).map_err(|e| file::named(p, e))? {
        return Ok(Take::Other);
    }
    Ok(Take::File(Tailed {
        file: Arc::new(file),
        dev: pos.dev,
        ino: pos.ino,
        fp: *fp,
        offset: pos.offset,
        rotated,
        name: name.to_string(),
        mtime_ns: file::mtime_ns(&meta),
    }))
}

/// Where the source goes on, for an alarm.
fn going_on(path: &Path, next: Option<&Tailed>) -> String {
    match next {
        Some(t) => format!(
            "continuing with {}",
            file::parent_of(path).join(&t.name).display()
        ),
        None => format!("waiting for {} to appear", path.display()),
    }
}

fn list(files: &[PathBuf]) -> String {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    names.join(", ")
}

/// Logs each compressed copy that may hold lines that were not shipped.
fn warn_compressed(files: &[PathBuf]) {
    for f in files {
        tracing::warn!(file = %f.display(), "rotated copy is compressed: tail reads plain text only, so lines only it holds are not shipped");
    }
}

const DECOMPRESS: &str = "decompress them and ship their lines by hand; with logrotate, \
`delaycompress` keeps the newest rotated copy plain so tail can read it";

/// The stored file is gone: lines written to it after the stored offset, if any,
/// were never shipped.
fn gone_alarm(path: &Path, pos: &TailPosition, step: &Step) -> String {
    let last_seen = pos.name.as_ref().map(|n| file::parent_of(path).join(n));
    let file = match &last_seen {
        Some(p) => format!("the file last seen as {}", p.display()),
        None => format!(
            "the file of the stored position (in {})",
            file::parent_of(path).display()
        ),
    };
    let going_on = going_on(path, step.next.as_ref());
    tracing::error!(
        file = %last_seen.as_deref().unwrap_or(path).display(),
        ino = pos.ino,
        shipped = pos.offset,
        next = %going_on,
        "ALARM: the file of the stored position is gone; lines written to it after the shipped bytes were not shipped"
    );
    warn_compressed(&step.unreadable);
    let mut text = format!(
        "ALARM: lines may be lost: {file} (inode {}) is gone; its first {} bytes were shipped, \
         anything written to it after them was not. If it still exists elsewhere (moved, \
         compressed), ship the rest by hand.",
        pos.ino, pos.offset
    );
    if !step.unreadable.is_empty() {
        text.push_str(&format!(
            " Compressed rotated copies after it may hold more unshipped lines: {}; {DECOMPRESS}.",
            list(&step.unreadable)
        ));
    }
    if pos.mtime_ns.is_none() {
        text.push_str(
            " Rotated copies were not read: the stored position, written by an older agent, \
             does not tell which of them are newer.",
        );
    }
    text.push_str(&format!(" The source is {going_on}."));
    text
}

/// Compressed copies in the chain: the lines only they hold were not shipped.
pub(super) fn unreadable_alarm(path: &Path, unreadable: &[PathBuf], next: &Tailed) -> String {
    let going_on = going_on(path, Some(next));
    warn_compressed(unreadable);
    tracing::error!(
        files = %list(unreadable),
        next = %going_on,
        "ALARM: compressed rotated copies in the chain; the lines only they hold were not shipped"
    );
    format!(
        "ALARM: lines may be lost: rotated copies of {} in the chain are compressed and tail \
         reads plain text only, so the lines only they hold were not shipped: {}; {DECOMPRESS}. \
         The source is {going_on}.",
        path.display(),
        list(unreadable)
    )
}
