//! Blocking filesystem work of the directory source. Everything here runs on the
//! blocking pool (`spawn_blocking`) and returns plain `io::Result`s; the runner adds
//! what and where.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
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

/// `Ok(None)` when nothing is at `path`.
pub(crate) fn stat_path(path: &Path) -> io::Result<Option<Stat>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(Stat::of(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Which directory entries are candidates at all (completeness is judged later).
#[derive(Debug, Clone)]
pub(crate) struct ScanRules {
    pub pattern: glob::Pattern,
    pub complete: Complete,
    pub marker_suffix: String,
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
}

/// Lists the regular files of `dir` that the rules admit. Subdirectories (the sent
/// dir among them), hidden files and, in marker mode, the markers themselves are
/// never candidates.
pub(crate) fn scan(dir: &Path, rules: &ScanRules) -> io::Result<Scan> {
    let mut out = Scan::default();
    let mut markers = HashSet::new();
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
        // Follows symlinks on purpose: a link to a complete file is shipped as that
        // file. An entry that vanished since `read_dir` is simply not a candidate.
        let meta = match std::fs::metadata(entry.path()) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !meta.is_file() {
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

/// Moves or deletes an acknowledged file, then removes its marker.
pub(crate) fn finalize(rules: &AfterAck, entry: &FileEntry) -> io::Result<Finalized> {
    let path = rules.dir.join(&entry.name);
    let outcome = match stat_path(&path)? {
        None => Finalized::Gone,
        Some(st) if !st.matches(entry) => return Ok(Finalized::Replaced),
        Some(_) => match rules.after_send {
            AfterSend::Delete => {
                remove_if_present(&path)?;
                Finalized::Done(None)
            }
            AfterSend::Move => {
                Finalized::Done(Some(move_into(&path, &rules.sent_dir, &entry.name)?))
            }
        },
    };
    // Also for `Gone`: a crash between the move and this removal leaves an orphan
    // marker, which would otherwise stay forever.
    if let Some(suffix) = &rules.marker_suffix {
        remove_if_present(&rules.dir.join(format!("{}{suffix}", entry.name)))?;
    }
    Ok(outcome)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves `src` into `dir` as `name`, or `name.1`, `name.2`… if taken: a sent file
/// never overwrites an earlier one.
fn move_into(src: &Path, dir: &Path, name: &str) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut target = dir.join(name);
    let mut n = 0u32;
    while std::fs::symlink_metadata(&target).is_ok() {
        n += 1;
        if n > 100_000 {
            return Err(io::Error::other(format!(
                "{} already holds {name} and its 100000 numbered variants",
                dir.display()
            )));
        }
        target = dir.join(format!("{name}.{n}"));
    }
    match std::fs::rename(src, &target) {
        Ok(()) => Ok(target),
        // `sent_dir` on another filesystem: copy, make the copy durable, then remove.
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(src, &target)?;
            File::open(&target)?.sync_all()?;
            std::fs::remove_file(src)?;
            Ok(target)
        }
        Err(e) => Err(e),
    }
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
            let to = move_into(&src, &sent, "r.csv").unwrap();
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
