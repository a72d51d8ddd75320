//! Blocking filesystem work of the directory source. Everything here runs on the
//! blocking pool (`spawn_blocking`) and returns plain `io::Result`s; the runner adds
//! what and where.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::position::FileEntry;
use super::{AfterSend, Complete};

/// The part of a stat that tells whether a file is still the one taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

impl Stat {
    pub(crate) fn of(meta: &Metadata) -> Stat {
        let ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        Stat {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX }),
        }
    }

    pub(crate) fn matches(&self, e: &FileEntry) -> bool {
        self.dev == e.dev && self.ino == e.ino && self.size == e.size && self.mtime_ns == e.mtime_ns
    }

    /// Why `self` is not the file `e` any more, for `FileAbort.reason` and logs.
    pub(crate) fn difference(&self, e: &FileEntry) -> String {
        if self.dev != e.dev || self.ino != e.ino {
            "the file was replaced by another file (inode changed)".to_string()
        } else if self.size != e.size {
            format!(
                "the file changed size from {} to {} bytes",
                e.size, self.size
            )
        } else {
            "the file was modified (mtime changed)".to_string()
        }
    }
}

/// `Ok(None)` when nothing is at `path`. Does not follow a symlink: a link put where
/// a taken file was is another file (its own inode), never the file it points at.
pub(crate) fn stat_path(path: &Path) -> io::Result<Option<Stat>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(Stat::of(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why an entry whose name matches is not sent: only regular files are. A symlink
/// would let whoever can write the outbox ship any file the agent can read (its own
/// private key); a FIFO or device would block or have side effects when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Symlink,
    Directory,
    Fifo,
    Socket,
    Device,
}

impl Refusal {
    /// `None` for a regular file.
    pub(crate) fn of(t: FileType) -> Option<Refusal> {
        if t.is_file() {
            None
        } else if t.is_symlink() {
            Some(Refusal::Symlink)
        } else if t.is_dir() {
            Some(Refusal::Directory)
        } else if t.is_fifo() {
            Some(Refusal::Fifo)
        } else if t.is_socket() {
            Some(Refusal::Socket)
        } else {
            Some(Refusal::Device)
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::Symlink => {
                "it is a symbolic link; only regular files are sent, never what a link points at"
            }
            Refusal::Directory => "it is a directory; only regular files are sent",
            Refusal::Fifo => "it is a named pipe (FIFO); only regular files are sent",
            Refusal::Socket => "it is a socket; only regular files are sent",
            Refusal::Device => "it is a device file; only regular files are sent",
        }
    }
}

/// What [`open_regular`] found at a path.
#[derive(Debug)]
pub(crate) enum Opened {
    Regular(File, Stat),
    Refused(Refusal),
}

/// Opens `path` for reading only if it is a regular file. `O_NOFOLLOW` refuses a
/// symlink at the last component (the name comes from `read_dir`, so there is no
/// other), `O_NONBLOCK` keeps a FIFO from blocking the open until a writer comes
/// (it changes nothing for reads of a regular file), and the type is judged on the
/// open descriptor: a check by path could be raced by a rename between check and
/// open.
pub(crate) fn open_regular(path: &Path) -> io::Result<Opened> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Opened::Refused(Refusal::Symlink))
        }
        // What `open` answers for a socket.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Ok(Opened::Refused(Refusal::Socket))
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    Ok(match Refusal::of(meta.file_type()) {
        None => Opened::Regular(file, Stat::of(&meta)),
        Some(r) => Opened::Refused(r),
    })
}

/// Which directory entries are candidates at all (completeness is judged later).
#[derive(Debug, Clone)]
pub(crate) struct ScanRules {
    pub pattern: glob::Pattern,
    pub complete: Complete,
    pub marker_suffix: String,
    /// The sent dir, when it may be inside the outbox: skipped without a word.
    pub sent_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub name: String,
    pub stat: Stat,
}

#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub files: Vec<Seen>,
    /// Names that cannot travel as a UTF-8 `FileChunk.path`.
    pub non_utf8: Vec<OsString>,
    /// Entries the rules admit by name that are not regular files (see [`Refusal`]).
    pub refused: Vec<(String, Refusal)>,
}

/// Lists the regular files of `dir` that the rules admit. Hidden files and, in
/// marker mode, the markers themselves are never candidates; symlinks and other
/// non-regular entries whose names match are listed in `refused` (the sent dir
/// excepted), judged without following links.
pub(crate) fn scan(dir: &Path, rules: &ScanRules) -> io::Result<Scan> {
    let mut out = Scan::default();
    let mut markers = HashSet::new();
    let sent = rules
        .sent_dir
        .as_deref()
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| (m.dev(), m.ino()));
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let os_name = entry.file_name();
        let Some(name) = os_name.to_str() else {
            out.non_utf8.push(os_name);
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let is_marker =
            rules.complete == Complete::Marker && name.ends_with(rules.marker_suffix.as_str());
        if is_marker {
            markers.insert(name.to_string());
            continue;
        }
        if rules.complete == Complete::Rename && (name.ends_with(".tmp") || name.ends_with(".part"))
        {
            continue;
        }
        if !rules.pattern.matches(name) {
            continue;
        }
        // `DirEntry::metadata` is an lstat: a symlink is judged as the link it is.
        // An entry that vanished since `read_dir` is simply not a candidate.
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(why) = Refusal::of(meta.file_type()) {
            // Following the entry only to recognise the sent dir (a folder or a link
            // to one), never to read it.
            let is_sent = sent.is_some()
                && matches!(why, Refusal::Directory | Refusal::Symlink)
                && std::fs::metadata(entry.path()).is_ok_and(|m| Some((m.dev(), m.ino())) == sent);
            if !is_sent {
                out.refused.push((name.to_string(), why));
            }
            continue;
        }
        out.files.push(Seen {
            name: name.to_string(),
            stat: Stat::of(&meta),
        });
    }
    if rules.complete == Complete::Marker {
        out.files
            .retain(|s| markers.contains(&format!("{}{}", s.name, rules.marker_suffix)));
    }
    Ok(out)
}

/// Reads exactly `len` bytes at `offset`; `UnexpectedEof` means the file shrank.
pub(crate) fn read_chunk(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Rebuilds the SHA-256 state of bytes `[0, upto)`. `Ok(None)` if cancelled: a
/// multi-gigabyte re-read must not hold up shutdown.
pub(crate) fn rehash(
    file: &File,
    upto: u64,
    cancel: &CancellationToken,
) -> io::Result<Option<Sha256>> {
    const BLOCK: u64 = 1 << 20;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut off = 0u64;
    while off < upto {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        // Bounded by BLOCK, so the cast cannot truncate.
        let n = (upto - off).min(BLOCK) as usize;
        let Some(part) = buf.get_mut(..n) else {
            break;
        };
        file.read_exact_at(part, off)?;
        hasher.update(&*part);
        off += n as u64;
    }
    Ok(Some(hasher))
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Finalized {
    /// Moved (to the path given) or deleted.
    Done(Option<PathBuf>),
    /// Nothing at the path any more.
    Gone,
    /// Another file, or a modified one, is at the path now: left alone.
    Replaced,
}

/// What to do with an acknowledged file.
#[derive(Debug, Clone)]
pub(crate) struct AfterAck {
    pub dir: PathBuf,
    pub after_send: AfterSend,
    pub sent_dir: PathBuf,
    /// `Some(suffix)` in marker mode.
    pub marker_suffix: Option<String>,
}

/// Moves or deletes an acknowledged file, then removes its marker. Returns only
/// once what it did is durable (the directories fsync'd), because the caller then
/// commits a position without the file: a crash must not bring back a file the
/// position says is finished (it would be sent again) nor lose a moved one.
pub(crate) fn finalize(rules: &AfterAck, entry: &FileEntry) -> io::Result<Finalized> {
    let path = rules.dir.join(&entry.name);
    let outcome = match stat_path(&path)? {
        None => Finalized::Gone,
        Some(st) if !st.matches(entry) => return Ok(Finalized::Replaced),
        Some(_) => match rules.after_send {
            AfterSend::Delete => {
                remove_if_present(&path)?;
                sync_dir(&rules.dir)?;
                Finalized::Done(None)
            }
            AfterSend::Move => Finalized::Done(Some(move_into(
                &rules.dir,
                entry,
                &rules.sent_dir,
                &mut |_| {},
            )?)),
        },
    };
    // Also for `Gone`: a crash between the move and this removal leaves an orphan
    // marker, which would otherwise stay forever.
    if let Some(suffix) = &rules.marker_suffix {
        if remove_if_present(&rules.dir.join(format!("{}{suffix}", entry.name)))? {
            sync_dir(&rules.dir)?;
        }
    }
    Ok(outcome)
}

/// `true` if something was removed.
fn remove_if_present(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes the entries of `dir` durable (creations, renames, removals in it).
fn sync_dir(dir: &Path) -> io::Result<()> {
    // `Path::parent` of a one-component relative path is "".
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match File::open(dir).and_then(|d| d.sync_all()) {
        // Some network filesystems cannot fsync a directory at all; refusing there
        // would keep every sent file in the outbox forever, for no durability gained.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot fsync the directory {}: {e}", dir.display()),
            )
        }),
    }
}

/// The durable steps of a move, in the order taken; handed to an observer so tests
/// can check the order (a crash between any two must leave the file somewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Same filesystem: renamed to this path.
    Renamed(PathBuf),
    /// Other filesystem: copied to this path, the copy fsync'd.
    Copied(PathBuf),
    /// This directory fsync'd.
    SyncedDir(PathBuf),
    /// The source removed.
    Unlinked(PathBuf),
}

/// Creates `dir` and whatever parents it lacks, each made durable in its parent.
fn ensure_dir(dir: &Path, observe: &mut dyn FnMut(Step)) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent() {
            sync_dir(parent)?;
            observe(Step::SyncedDir(parent.to_path_buf()));
        }
    }
    Ok(())
}

/// Moves `entry` from `src_dir` into `dir` as its name, or `name.1`, `name.2`… if
/// taken: a sent file never overwrites an earlier one. Durable when it returns:
/// both directories are fsync'd, and across filesystems the source is removed
/// only once the copy and its directory entry are on disk.
pub(crate) fn move_into(
    src_dir: &Path,
    entry: &FileEntry,
    dir: &Path,
    observe: &mut dyn FnMut(Step),
) -> io::Result<PathBuf> {
    let name = entry.name.as_str();
    let src = src_dir.join(name);
    ensure_dir(dir, observe)?;
    let mut target = dir.join(name);
    let mut n = 0u32;
    while std::fs::symlink_metadata(&target).is_ok() {
        n += 1;
        if n > 100_000 {
            return Err(io::Error::other(format!(
                "{} already holds {name} and its 100000 numbered variants; move some away",
                dir.display()
            )));
        }
        target = dir.join(format!("{name}.{n}"));
    }
    match std::fs::rename(&src, &target) {
        Ok(()) => {
            observe(Step::Renamed(target.clone()));
            // The new entry first: a crash after the old one's removal is durable but
            // before the new one is would lose the file.
            sync_dir(dir)?;
            observe(Step::SyncedDir(dir.to_path_buf()));
            sync_dir(src_dir)?;
            observe(Step::SyncedDir(src_dir.to_path_buf()));
            Ok(target)
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_across(src_dir, entry, &target, observe)?;
            Ok(target)
        }
        Err(e) => Err(e),
    }
}

/// The move of `entry` out of `src_dir` to `target` on another filesystem: copy,
/// fsync the copy, fsync its directory, and only then remove the source and fsync
/// its directory. A crash at any point leaves the file in the outbox (sent again
/// later: a duplicate, never a loss) or safely in the sent dir.
pub(crate) fn copy_across(
    src_dir: &Path,
    entry: &FileEntry,
    target: &Path,
    observe: &mut dyn FnMut(Step),
) -> io::Result<()> {
    let src = src_dir.join(&entry.name);
    let target_dir = target.parent().unwrap_or(Path::new("."));
    // The acknowledged file itself, read through a descriptor checked to be it: a
    // path swapped since the stat must not be copied (and then removed) instead.
    let mut from = match open_regular(&src)? {
        Opened::Regular(f, st) if st.matches(entry) => f,
        Opened::Regular(_, st) => {
            return Err(io::Error::other(format!(
                "{} changed after it was acknowledged ({}); not moving it",
                src.display(),
                st.difference(entry)
            )))
        }
        Opened::Refused(why) => {
            return Err(io::Error::other(format!(
                "{} is no longer the acknowledged file: {}; not moving it",
                src.display(),
                why.reason()
            )))
        }
    };
    let mode = from.metadata()?.permissions().mode() & 0o7777;
    // `create_new`: never overwrite, nor write through a link planted at the target.
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(target)?;
    let copied = io::copy(&mut from, &mut to)
        .and_then(|n| {
            if n == entry.size {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "copied {n} of the {} bytes of {} to {}",
                    entry.size,
                    src.display(),
                    target.display()
                )))
            }
        })
        .and_then(|()| to.set_permissions(std::fs::Permissions::from_mode(mode)))
        .and_then(|()| to.sync_all())
        .map(|()| observe(Step::Copied(target.to_path_buf())))
        .and_then(|()| sync_dir(target_dir))
        .map(|()| observe(Step::SyncedDir(target_dir.to_path_buf())));
    if let Err(e) = copied {
        // A partial or not-yet-durable copy must not stay beside the next attempt's
        // `name.1`; the source is still in place. Best effort: the error that counts
        // is the copy's.
        drop(to);
        let _ = std::fs::remove_file(target);
        return Err(e);
    }
    // A writer may have put a new file at the path while this one was copied: that
    // one has not been sent and must stay. (The acknowledged content is safe in the
    // sent dir either way.)
    if !stat_path(&src)?.is_some_and(|st| st.matches(entry)) {
        return Ok(());
    }
    std::fs::remove_file(&src)?;
    observe(Step::Unlinked(src.clone()));
    sync_dir(src_dir)?;
    observe(Step::SyncedDir(src_dir.to_path_buf()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_into_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let sent = dir.path().join("sent");
        for (i, body) in ["one", "two", "three"].iter().enumerate() {
            let src = dir.path().join("r.csv");
            std::fs::write(&src, body).unwrap();
            let entry = FileEntry {
                file_id: "0".into(),
                name: "r.csv".into(),
                dev: 0,
                ino: 0,
                size: 0,
                mtime_ns: 0,
            };
            let to = move_into(dir.path(), &entry, &sent, &mut |_| {}).unwrap();
            let expect = if i == 0 {
                "r.csv".to_string()
            } else {
                format!("r.csv.{i}")
            };
            assert_eq!(to, sent.join(expect));
            assert!(!src.exists());
        }
        assert_eq!(std::fs::read_to_string(sent.join("r.csv")).unwrap(), "one");
        assert_eq!(
            std::fs::read_to_string(sent.join("r.csv.1")).unwrap(),
            "two"
        );
        assert_eq!(
            std::fs::read_to_string(sent.join("r.csv.2")).unwrap(),
            "three"
        );
    }

    #[test]
    fn scan_rules_by_mode() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "a.xml",
            "b.xml.tmp",
            "c.part",
            ".hidden",
            "d.txt",
            "a.xml.done",
            "e.xml",
        ] {
            std::fs::write(dir.path().join(n), n).unwrap();
        }
        std::fs::create_dir(dir.path().join("sent.xml")).unwrap();
        let names = |complete, pattern: &str| {
            let rules = ScanRules {
                pattern: glob::Pattern::new(pattern).unwrap(),
                complete,
                marker_suffix: ".done".into(),
                sent_dir: None,
            };
            let mut v: Vec<String> = scan(dir.path(), &rules)
                .unwrap()
                .files
                .into_iter()
                .map(|s| s.name)
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(Complete::Quiet, "*"),
            [
                "a.xml",
                "a.xml.done",
                "b.xml.tmp",
                "c.part",
                "d.txt",
                "e.xml"
            ]
        );
        assert_eq!(
            names(Complete::Rename, "*"),
            ["a.xml", "a.xml.done", "d.txt", "e.xml"]
        );
        assert_eq!(names(Complete::Marker, "*"), ["a.xml"]);
        assert_eq!(names(Complete::Quiet, "*.xml"), ["a.xml", "e.xml"]);
    }
}
