//! One file being read: its identity (dev, inode, fingerprint), the check that an
//! offset still applies to it, and the reads, which block and so run on tokio's
//! blocking pool.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::chain::{Candidate, Ident};
use super::position::{Fingerprint, TailPosition, FP_MAX};

/// The file being read.
pub(super) struct Tailed {
    pub file: Arc<File>,
    pub dev: u64,
    pub ino: u64,
    pub fp: Fingerprint,
    /// Byte after the last newline already durable.
    pub offset: u64,
    /// The path names another file now (or this is a rotated copy): read to the
    /// end, then go on to the next file of the chain.
    pub rotated: bool,
    /// Relative to the folder of the path, as when the source opened it: stored
    /// with the position, it names the file in an alarm if the file is gone later.
    pub name: String,
    /// Modification time (ns since the epoch) at the last look.
    pub mtime_ns: u64,
}

impl Tailed {
    pub(super) fn position(&self) -> TailPosition {
        TailPosition::new(
            self.dev,
            self.ino,
            &self.fp,
            self.offset,
            &self.name,
            self.mtime_ns,
        )
    }

    /// The file as read whole, its time fresh from the open handle (the file may
    /// have been renamed or removed meanwhile).
    pub(super) fn finished(&self) -> Ident {
        let mtime_ns = self.file.metadata().map_or(self.mtime_ns, |m| mtime_ns(&m));
        Ident {
            dev: self.dev,
            ino: self.ino,
            fp: self.fp,
            mtime_ns,
        }
    }
}

/// What one look at the open file found.
pub(super) struct Probe {
    /// The fingerprint and the offset still fit the file.
    pub intact: bool,
    /// Fingerprint of the file as it is now (grown up to `FP_MAX`).
    pub fresh_fp: Fingerprint,
    pub buf: Vec<u8>,
    /// `buf` reaches the end of the file as it was stat'ed.
    pub at_eof: bool,
    /// Modification time when stat'ed: no later than the writes of `buf`'s bytes.
    pub mtime_ns: u64,
}

/// The folder of `path` (`.` for a bare name).
pub(super) fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The name stored for the file at the followed path itself.
pub(super) fn name_of(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// `e` with the file it is about, for messages.
pub(super) fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Modification time in ns since the epoch (0 before it).
pub(super) fn mtime_ns(meta: &Metadata) -> u64 {
    let secs = u64::try_from(meta.mtime()).unwrap_or(0);
    let nanos = u64::try_from(meta.mtime_nsec()).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Opens the file at `path` at offset 0; `Ok(None)` if there is none.
pub(super) fn open(path: &Path, name: &str, rotated: bool) -> io::Result<Option<Tailed>> {
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
        rotated,
        name: name.to_string(),
        mtime_ns: mtime_ns(&meta),
    }))
}

/// A listed rotated copy, opened.
pub(super) enum Opened {
    File(Tailed),
    /// Compressed, by its first bytes although not by its name.
    Compressed,
    /// Removed or replaced since it was listed.
    Changed,
}

/// Opens a rotated copy at offset 0, checking it is still the listed file.
pub(super) fn open_rotated(c: &Candidate) -> io::Result<Opened> {
    let t = match open(&c.path, &c.name, true) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(Opened::Changed),
        Err(e) => return Err(named(&c.path, e)),
    };
    if (t.dev, t.ino) != (c.dev, c.ino) {
        return Ok(Opened::Changed);
    }
    if compressed_data(&t.file).map_err(|e| named(&c.path, e))? {
        return Ok(Opened::Compressed);
    }
    Ok(Opened::File(t))
}

/// Whether the file starts like gzip, xz, zstd or bzip2 data: a copy compressed
/// under a name without the usual extension must not be shipped as lines of bytes.
fn compressed_data(file: &File) -> io::Result<bool> {
    let mut head = [0u8; 10];
    let got = read_full(file, &mut head, 0)?;
    let head = head.get(..got).unwrap_or_default();
    let bzip2 = match head {
        [b'B', b'Z', b'h', level, rest @ ..] if (b'1'..=b'9').contains(level) => {
            // A block or the end of the stream follows the level.
            rest.starts_with(&[0x31, 0x41, 0x59, 0x26, 0x53, 0x59])
                || rest.starts_with(&[0x17, 0x72, 0x45, 0x38, 0x50, 0x90])
        }
        _ => false,
    };
    Ok(bzip2
        || head.starts_with(&[0x1f, 0x8b, 0x08])
        || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
}

/// SHA-256 of the first `len` bytes, or of fewer if the file is shorter.
pub(super) fn fingerprint(file: &File, len: u64) -> io::Result<Fingerprint> {
    let mut buf = vec![0u8; len.min(FP_MAX) as usize];
    let got = read_full(file, &mut buf, 0)?;
    let head = buf.get(..got).unwrap_or_default();
    Ok(Fingerprint {
        len: got as u64,
        hash: Sha256::digest(head).into(),
    })
}

/// Whether the file at `path` starts with the bytes `fp` was taken of.
pub(super) fn starts_with(path: &Path, fp: &Fingerprint) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    file.metadata()
        .is_ok_and(|m| still_matches(&file, m.len(), fp, 0).unwrap_or(false))
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
pub(super) fn still_matches(
    file: &File,
    size: u64,
    fp: &Fingerprint,
    offset: u64,
) -> io::Result<bool> {
    Ok(size >= offset && size >= fp.len && fingerprint(file, fp.len)? == *fp)
}

/// Checks the open file against its fingerprint and reads up to `want` bytes at the
/// offset, on the blocking pool.
pub(super) async fn read(t: &Tailed, want: usize) -> io::Result<Probe> {
    let file = Arc::clone(&t.file);
    let (fp, offset) = (t.fp, t.offset);
    let r = tokio::task::spawn_blocking(move || {
        let meta = file.metadata()?;
        let (size, mtime_ns) = (meta.len(), mtime_ns(&meta));
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
                mtime_ns,
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
            mtime_ns,
        })
    })
    .await;
    r.map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_data_is_told_by_its_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let check = |bytes: &[u8]| {
            let p = dir.path().join("f");
            std::fs::write(&p, bytes).unwrap();
            compressed_data(&File::open(&p).unwrap()).unwrap()
        };
        assert!(check(&[0x1f, 0x8b, 0x08, 0, 0]));
        assert!(check(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0, 4]));
        assert!(check(&[0x28, 0xb5, 0x2f, 0xfd, 0x24]));
        assert!(check(b"BZh91AY&SY"));
        assert!(!check(b"BZh9 is how a log line might start\n"));
        assert!(!check(b"2026-12-06 10:00:00 started\n"));
        assert!(!check(b""));
    }
}
