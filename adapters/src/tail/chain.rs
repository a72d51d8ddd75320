//! The rotated copies of the tailed file (the `rotated` glob): which exist, in
//! which order they were written, and which of them come after a given file.
//!
//! Order: modification time, oldest first. A rotated file is no longer written once
//! the writer reopened the path, so its last write places it among its siblings;
//! compressors keep the original's modification time (gzip, xz, zstd, bzip2 and
//! logrotate's `compress` all do), so a compressed copy sorts where its original
//! did. File systems with a coarse clock (ext4: one kernel tick, a few ms) give
//! files written in quick succession the same time; the names then tell
//! (`NAME.2` is older than `NAME.1`, dates sort as text).

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::file;
use super::position::Fingerprint;

/// Extensions of compressed rotated copies, which tail cannot read.
pub(super) const COMPRESSED: &[&str] = &["gz", "xz", "bz2", "zst"];

/// Files read whole that are remembered (see [`Finished`]); a rotation keeps a
/// handful of copies, so the newest few are all that can come up again.
const FINISHED_KEPT: usize = 64;

/// Where rotated copies of the file are looked for.
#[derive(Debug, Clone)]
pub(super) struct Siblings {
    dir: PathBuf,
    /// Put before a file's name when shown or stored: the glob's directory part
    /// (logrotate's `olddir`), empty when the copies sit beside the file.
    prefix: String,
    pattern: glob::Pattern,
}

/// One rotated copy, as listed.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    pub path: PathBuf,
    /// Relative to the folder of the followed file, for messages and positions.
    pub name: String,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: u64,
    /// Compressed, by its name.
    pub compressed: bool,
    rank: Rank,
}

/// The glob used when `rotated` is not set: the file's name, `.` or `-`, a digit,
/// anything (`app.log.1`, `app.log.2.gz`, `app.log-20261206`). The digit keeps
/// editors' and tools' files (`app.log.swp`, `app.log.lock`) out of the chain.
pub(super) fn default_glob(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    Some(format!("{}[.-][0-9]*", glob::Pattern::escape(&name)))
}

impl Siblings {
    /// From the followed path and the `rotated` key; the error names the key.
    pub(super) fn new(path: &Path, rotated: Option<&str>) -> Result<Siblings, String> {
        let parent = file::parent_of(path);
        let Some(glob) = rotated.map(str::to_string).or_else(|| default_glob(path)) else {
            return Err(format!(
                "source.path: {} does not name a file",
                path.display()
            ));
        };
        let (sub, names) = match glob.rsplit_once('/') {
            // `/x.*`: copies in the root folder.
            Some(("", names)) => ("/", names),
            Some((sub, names)) => (sub, names),
            None => ("", glob.as_str()),
        };
        if names.is_empty() {
            return Err(format!(
                "source.rotated: {glob:?} names no file; give a glob of the rotated copies' names, e.g. \"app.log.*\""
            ));
        }
        if sub.contains(['*', '?', '[']) {
            return Err(format!(
                "source.rotated: {glob:?}: wildcards are allowed in the file name only, not in the folder {sub:?}"
            ));
        }
        let pattern = glob::Pattern::new(names).map_err(|e| {
            format!("source.rotated: {glob:?} is not a valid glob: {e} (e.g. \"app.log.*\")")
        })?;
        let (dir, prefix) = match sub {
            "" => (parent, String::new()),
            sub => (parent.join(sub), format!("{}/", sub.trim_end_matches('/'))),
        };
        Ok(Siblings {
            dir,
            prefix,
            pattern,
        })
    }

    /// The rotated copies, oldest first; never the file at `current` (the followed
    /// path), even if the glob matches it. An error means the listing may be
    /// incomplete: the caller must not act on it.
    pub(super) fn list(&self, current: &Path) -> io::Result<Vec<Candidate>> {
        let exclude = std::fs::metadata(current).ok().map(|m| (m.dev(), m.ino()));
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            // An `olddir` not created yet holds no copies.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(file::named(&self.dir, e)),
        };
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let mut out: Vec<Candidate> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| file::named(&self.dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !self.pattern.matches_with(&name, opts) {
                continue;
            }
            let path = entry.path();
            if path == current {
                continue;
            }
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                // Rotated away or removed since the listing, or a dangling link.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(file::named(&path, e)),
            };
            let id = (meta.dev(), meta.ino());
            if !meta.is_file() || Some(id) == exclude || out.iter().any(|c| (c.dev, c.ino) == id) {
                continue;
            }
            out.push(Candidate {
                name: format!("{}{name}", self.prefix),
                dev: id.0,
                ino: id.1,
                mtime_ns: file::mtime_ns(&meta),
                compressed: compressed_by_name(&name),
                rank: Rank::of(&name),
                path,
            });
        }
        out.sort_by(|a, b| (a.mtime_ns, &a.rank, &a.name).cmp(&(b.mtime_ns, &b.rank, &b.name)));
        Ok(out)
    }
}

/// Which listed copies come after a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum After {
    /// The file is in the listing, at this index.
    Listed(usize),
    /// The file is gone; it was last changed at this time (ns): copies at least as
    /// new come after it. A copy exactly as new might be older, but reading a file
    /// twice is better than losing one, and two files last written within one
    /// clock tick are rare outside tests.
    Mtime(u64),
    /// Nothing is known of the file: no copy is taken as newer.
    Unknown,
}

/// The copies after `after`, oldest first.
pub(super) fn newer(list: &[Candidate], after: After) -> &[Candidate] {
    let from = match after {
        After::Listed(i) => i + 1,
        After::Mtime(m) => list.partition_point(|c| c.mtime_ns < m),
        After::Unknown => list.len(),
    };
    list.get(from..).unwrap_or_default()
}

/// Identity of a file read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ident {
    pub dev: u64,
    pub ino: u64,
    pub fp: Fingerprint,
    pub mtime_ns: u64,
}

/// The files this run of the source read to their end, newest last. A file can
/// come up again after it was read: written once more by a writer that reopened
/// late (it then sorts after newer copies), or compressed after the source
/// drained it (a new inode). Neither holds anything to ship.
#[derive(Debug, Clone, Default)]
pub(super) struct Finished {
    files: VecDeque<Ident>,
}

impl Finished {
    pub(super) fn push(&mut self, f: Ident) {
        self.files.retain(|x| (x.dev, x.ino) != (f.dev, f.ino));
        self.files.push_back(f);
        if self.files.len() > FINISHED_KEPT {
            self.files.pop_front();
        }
    }

    /// Whether plain `c` was read whole already: the same inode starting with the
    /// same bytes (an inode is reused as soon as it is freed).
    pub(super) fn read(&self, c: &Candidate) -> bool {
        self.files
            .iter()
            .any(|f| (f.dev, f.ino) == (c.dev, c.ino) && file::starts_with(&c.path, &f.fp))
    }

    /// Whether compressed `c` is a copy of a file that needs no reading of its
    /// own: of a plain file still in `list` (a copy in the making), or of a file
    /// read whole that is no longer in `list` (compressing removes the original)
    /// with the same modification time (see the module doc). A file still listed
    /// is not taken for the original by its time: that keeps the copy of an unread
    /// file last written within the same clock tick from passing for it.
    pub(super) fn is_copy(&self, c: &Candidate, list: &[Candidate]) -> bool {
        if being_compressed(c, list) {
            return true;
        }
        self.files.iter().any(|f| {
            f.mtime_ns == c.mtime_ns && !list.iter().any(|l| (l.dev, l.ino) == (f.dev, f.ino))
        })
    }
}

/// Whether compressed `c` is the copy of a plain file still listed beside it
/// (`X.gz` next to `X`): a compressor writes the copy, only then gives it the
/// original's time and removes the original. The original is in the listing and
/// taken on its own; its copy in the making is no other file.
fn being_compressed(c: &Candidate, list: &[Candidate]) -> bool {
    let Some((stem, _)) = c.name.rsplit_once('.') else {
        return false;
    };
    list.iter().any(|l| !l.compressed && l.name == stem)
}

fn compressed_by_name(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| COMPRESSED.iter().any(|c| c.eq_ignore_ascii_case(ext)))
}

/// Rotation order told by a name, newer greater: the tie-break for equal times.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// Dates and anything else: as text (`-20261206` < `-20261207`).
    Named(String),
    /// `.N` (up to 6 digits: longer is a date): counts up with age.
    Numbered(Reverse<u64>),
}

impl Rank {
    fn of(name: &str) -> Rank {
        let stem = match name.rsplit_once('.') {
            Some((stem, ext)) if COMPRESSED.iter().any(|c| c.eq_ignore_ascii_case(ext)) => stem,
            _ => name,
        };
        if let Some((_, digits)) = stem.rsplit_once('.') {
            if (1..=6).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(n) = digits.parse() {
                    return Rank::Numbered(Reverse(n));
                }
            }
        }
        Rank::Named(stem.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, mtime_ns: u64) -> Candidate {
        Candidate {
            path: PathBuf::from(name),
            name: name.to_string(),
            dev: 1,
            ino: mtime_ns,
            mtime_ns,
            compressed: compressed_by_name(name),
            rank: Rank::of(name),
        }
    }

    fn sorted(mut v: Vec<Candidate>) -> Vec<String> {
        v.sort_by(|a, b| (a.mtime_ns, &a.rank, &a.name).cmp(&(b.mtime_ns, &b.rank, &b.name)));
        v.into_iter().map(|c| c.name).collect()
    }

    #[test]
    fn equal_times_fall_back_to_the_rotation_order_of_the_names() {
        let same = sorted(vec![
            cand("app.log.1", 5),
            cand("app.log.10", 5),
            cand("app.log.2.gz", 5),
            cand("app.log.3", 5),
        ]);
        assert_eq!(
            same,
            ["app.log.10", "app.log.3", "app.log.2.gz", "app.log.1"]
        );
        let dates = sorted(vec![
            cand("app.log-20261207", 5),
            cand("app.log-20261205.gz", 5),
            cand("app.log-20261206", 5),
        ]);
        assert_eq!(
            dates,
            [
                "app.log-20261205.gz",
                "app.log-20261206",
                "app.log-20261207"
            ]
        );
        // The time comes first: a copy written later is newer whatever its name.
        let by_time = sorted(vec![cand("app.log.1", 9), cand("app.log.2", 10)]);
        assert_eq!(by_time, ["app.log.1", "app.log.2"]);
    }

    #[test]
    fn newer_after_a_listed_or_gone_file() {
        let list = [cand("c.3", 10), cand("c.2", 20), cand("c.1", 30)];
        let names = |s: &[Candidate]| s.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(newer(&list, After::Listed(0))), ["c.2", "c.1"]);
        assert_eq!(names(newer(&list, After::Listed(2))), Vec::<String>::new());
        assert_eq!(names(newer(&list, After::Mtime(20))), ["c.2", "c.1"]);
        assert_eq!(names(newer(&list, After::Mtime(21))), ["c.1"]);
        assert_eq!(names(newer(&list, After::Unknown)), Vec::<String>::new());
    }

    #[test]
    fn compressed_copies_of_finished_files_that_are_gone_are_held() {
        let mut done = Finished::default();
        done.push(Ident {
            dev: 1,
            ino: 77,
            fp: Fingerprint {
                len: 0,
                hash: [0; 32],
            },
            mtime_ns: 30,
        });
        let gz = cand("app.log.1.gz", 30);
        assert!(done.is_copy(&gz, &[]));
        assert!(!done.is_copy(&cand("app.log.1.gz", 31), &[]));
        // The original still there: the copy is of another file.
        let mut original = cand("app.log.2", 30);
        original.ino = 77;
        assert!(!done.is_copy(&gz, &[original]));
        // Its plain original still listed: a copy in the making, whatever its time.
        assert!(done.is_copy(&cand("app.log.3.gz", 99), &[cand("app.log.3", 10)]));
        assert!(Finished::default().is_copy(&cand("app.log.3.gz", 99), &[cand("app.log.3", 10)]));
        // A plain file needs the same inode (and first bytes).
        assert!(!done.read(&cand("app.log.1", 30)));
    }

    #[test]
    fn the_glob_and_its_folder() {
        let d = Siblings::new(Path::new("/var/log/a[1].log"), None).unwrap();
        assert_eq!(d.dir, Path::new("/var/log"));
        let opts = glob::MatchOptions::new();
        for yes in ["a[1].log.1", "a[1].log.2.gz", "a[1].log-20261206"] {
            assert!(d.pattern.matches_with(yes, opts), "{yes}");
        }
        for no in ["a[1].log", "a[1].log.swp", "a1.log.1", "b.log.1"] {
            assert!(!d.pattern.matches_with(no, opts), "{no}");
        }
        let old = Siblings::new(Path::new("/var/log/app.log"), Some("old/app.log.*")).unwrap();
        assert_eq!(
            (old.dir.as_path(), old.prefix.as_str()),
            (Path::new("/var/log/old"), "old/")
        );
        let err = |g: &str| Siblings::new(Path::new("/x.log"), Some(g)).unwrap_err();
        assert!(err("x.log.[").starts_with("source.rotated:"));
        assert!(err("old/").starts_with("source.rotated:"));
        assert!(err("*/x.log.*").starts_with("source.rotated:"));
    }
}
